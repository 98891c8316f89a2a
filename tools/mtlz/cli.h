/*
 * cli.h - shared pieces of the `mtlz` command-line tool: subcommand entry
 * points, exit codes and the input loop that turns FITS files into
 * preprocessed spectra.
 */
#ifndef MTLZ_CLI_H
#define MTLZ_CLI_H

#include "fits_io.h"
#include "preprocess.h"

#include <stdint.h>

enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2 };

int cmd_init(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_classify(int argc, char **argv);
int cmd_preprocess(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_consume(int argc, char **argv);
int cmd_import(int argc, char **argv);
int cmd_archive(int argc, char **argv);
int cmd_synth(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_calibrate(int argc, char **argv);

/* Prints "mtlz: <msg>" to stderr. */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Parses a positive int / comma list of positive ints; -1 on error. */
int cli_parse_int_list(const char *s, int lo, int hi, int *out, int max);

/*
 * One preprocessed spectrum, as the input loop hands it over. Spectra are
 * produced file by file in input order; a file that cannot be read is
 * reported on stderr (naming it) and skipped, the others carry on.
 */
typedef struct cli_item {
	const mtlz_spectrum *s;
	const float *x;          /* model-grid flux (zeros if rejected) */
	mtlz_prep_info info;
	const char *reject_msg;  /* non-empty when rejected */
} cli_item;

typedef int (*cli_item_fn)(void *opaque, const cli_item *it);

/* Reads each file, preprocesses every spectrum in it with `o`, and calls
 * fn for each. Returns the number of files that could not be read, or -1 if
 * fn failed. */
int cli_for_each_spectrum(char **files, int n_files, const mtlz_prep_opts *o,
			  cli_item_fn fn, void *opaque);

#endif
