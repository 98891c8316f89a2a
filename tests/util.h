/*
 * util.h - small helpers shared by the test binaries: a private temporary
 * directory per test, removed with everything in it.
 */
#ifndef MTLZ_TEST_UTIL_H
#define MTLZ_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

struct mtlz_model;

/* Creates /tmp/mtlz_<tag>_XXXXXX into dir (asserts on failure). */
void tu_mkdtemp(char *dir, size_t size, const char *tag);
/* Removes dir and every file directly in it (test directories are flat). */
void tu_rmtree(const char *dir);
/* Runs the shell command printf(fmt, ...) with its stdout captured into
 * *out and its stderr into *err (both replaced, NUL-terminated; stderr
 * goes through dir/stderr). Returns the exit code, -1 if it was killed. */
int tu_run(const char *dir, char **out, char **err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* A labelled archive (mtlz_archive_writer, part files in path) of n
 * synthetic spectra, 3800-9198 A: classes in the pattern passive,
 * star-forming, composite, star-forming, AGN, star-forming; each but
 * passive a line of height `line` at its own wavelength over a continuum
 * with uniform noise of width `noise`, tilted at random when `tilt`; the
 * star-forming ones a metallicity 8.3..8.9 that an H-beta-side line
 * follows. Spec ids are id_prefix and the index. */
struct tu_archive {
	const char *path, *id_prefix;
	int n;
	uint64_t seed;
	double line, noise;
	int tilt;
};
void tu_write_archive(const struct tu_archive *o);
/* Ends what tu_run left: frees *out and *err (set to NULL) and removes
 * dir with everything below it (asserts). */
void tu_run_cleanup(const char *dir, char **out, char **err);
/* A small model: the paper's layout with channels 4/8/8/16/16, attention
 * 1/4, heads 16/8, dropout 0.2, He-initialised from seed (asserts). */
struct mtlz_model *tu_small_model(uint64_t seed);

#endif
