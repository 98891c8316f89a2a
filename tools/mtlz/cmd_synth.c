/*
 * cmd_synth.c - `mtlz synth -n N --seed S -o DIR`: synthetic labelled
 * SDSS-like spectra (core/synth.h, docs/synth.md) straight into a training
 * archive (archive.h layout: DIR/part-00000.avro, -00001, ... of per_file
 * records each).
 *
 * Files are the unit of parallel work: thread t makes whole files, each
 * spectrum from its own (seed, index) stream, so the bytes of every file
 * are the same whatever --threads is. A file appears under its name only
 * once complete; on an error the incomplete files are removed and the
 * complete ones stay. The rate is printed on stderr.
 */
#define _GNU_SOURCE
#include "archive.h"
#include "cli.h"
#include "common.h"
#include "synth.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char usage[] =
	"usage: mtlz synth -n N -o DIR [options]\n"
	"Generates N synthetic labelled SDSS-like galaxy spectra (E-MILES stellar\n"
	"populations, dust, velocity dispersion, class-consistent emission lines,\n"
	"SDSS sampling and noise; docs/synth.md) into a training archive.\n"
	"  -n, --count N           number of spectra (>= 1)\n"
	"  -o, --output DIR        archive directory (created; must not hold an archive)\n"
	"      --seed S            random seed, 0 .. 2^64-1 (default 1); the same seed\n"
	"                          gives the same bytes\n"
	"      --per-file N        spectra per archive file (default 10000)\n"
	"      --threads T         worker threads (default: OpenMP's, i.e. the CPUs);\n"
	"                          work is split by file, output does not depend on T\n"
	"      --class-mix P,S,C,A relative frequency of passive, star-forming,\n"
	"                          composite, AGN (default 0.25,0.25,0.25,0.25)\n"
	"      --sn-range LO,HI    S/N_r per pixel, drawn log-uniform (default 5,30)\n"
	"      --z-range LO,HI     redshift range, within 0..1 (default 0.002,0.3)\n"
	"      --ssp-dir DIR       E-MILES SSP spectra (default $MTLZ_DATA_DIR/emiles-ssp,\n"
	"                          else the source tree's data/emiles-ssp)\n"
	"      --codec C           deflate-fast (default: deflate with zlib's Z_RLE, 3x\n"
	"                          faster on these noisy spectra at the same size),\n"
	"                          deflate or null\n";

struct worker {
	mtlz_avro *avro;
	mtlz_synth_ws *ws;
	double t_gen, t_write;       /* seconds spent making / encoding+writing */
	long by_class[MTLZ_N_CLASSES];
	int failed;
	char err[768];
};

struct job {
	const mtlz_synth *g;
	const char *dir, *codec;
	uint64_t n, per_file;
	int stop;                    /* set by the first failing thread (atomic) */
};

static int stopped(struct job *jb)
{
	int v;

#pragma omp atomic read
	v = jb->stop;
	return v;
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (*s < '0' || *s > '9')     /* strtoull accepts "-1" and blanks */
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

/* "a,b,..." into exactly n finite doubles. */
static int parse_doubles(const char *s, double *out, int n)
{
	const char *p = s;

	for (int i = 0; i < n; i++) {
		char *end;

		errno = 0;
		out[i] = strtod(p, &end);
		if (errno || end == p || !isfinite(out[i]))
			return -1;
		if (i < n - 1 && *end != ',')
			return -1;
		p = end + (i < n - 1);
	}
	return *p ? -1 : 0;
}

/* Makes file f: spectra f * per_file .. up to n. Returns 0, or -1 with the
 * reason in me->err (the incomplete file removed).
 * @locality one OpenMP worker; me is its own. */
static int make_file(struct job *jb, struct worker *me, uint64_t f)
{
	const uint64_t first = f * jb->per_file;
	const uint64_t last = MTLZ_MIN(first + jb->per_file, jb->n);
	char path[4096];
	mtlz_avro_writer *w;
	double t0, t1, t2;

	/* The name archive.c's writer gives the file_no-th file. */
	snprintf(path, sizeof(path), "%s/part-%05" PRIu64 ".avro", jb->dir, f);
	w = mtlz_avro_writer_open(me->avro, path, jb->codec, 1, me->err, sizeof(me->err));
	if (!w)
		return -1;
	t0 = mtlz_now();
	for (uint64_t i = first; i < last; i++) {
		const mtlz_spectrum *s;
		const mtlz_labels *l;

		if ((i & 255) == 0 && stopped(jb)) {
			snprintf(me->err, sizeof(me->err), "%.700s: stopped", path);
			mtlz_avro_writer_abort(w);
			return -1;
		}
		mtlz_synth_make(jb->g, me->ws, i, &s, &l, NULL);
		t1 = mtlz_now();
		if (mtlz_avro_writer_append(w, s, l, me->err, sizeof(me->err))) {
			mtlz_avro_writer_abort(w);
			return -1;
		}
		t2 = mtlz_now();
		me->t_gen += t1 - t0;
		me->t_write += t2 - t1;
		me->by_class[l->cls]++;
		t0 = t2;
	}
	if (mtlz_avro_writer_close(w, me->err, sizeof(me->err)))
		return -1;
	me->t_write += mtlz_now() - t0;
	return 0;
}

/* Where the SSPs are: --ssp-dir, $MTLZ_DATA_DIR/emiles-ssp, the build's
 * source tree. *from says which, for messages. */
static const char *find_ssp_dir(const char *opt, char *buf, size_t size, const char **from)
{
	const char *env = getenv("MTLZ_DATA_DIR");

	if (opt) {
		*from = "--ssp-dir";
		return opt;
	}
	if (env && *env) {
		snprintf(buf, size, "%s/emiles-ssp", env);
		*from = "$MTLZ_DATA_DIR";
		return buf;
	}
	*from = "the source tree";
	return MTLZ_SCHEMA_DIR "/../data/emiles-ssp";
}

int cmd_synth(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "count", required_argument, 0, 'n' },
		{ "output", required_argument, 0, 'o' },
		{ "seed", required_argument, 0, 's' },
		{ "per-file", required_argument, 0, 'p' },
		{ "threads", required_argument, 0, 't' },
		{ "class-mix", required_argument, 0, 'm' },
		{ "sn-range", required_argument, 0, 'S' },
		{ "z-range", required_argument, 0, 'z' },
		{ "ssp-dir", required_argument, 0, 'd' },
		{ "codec", required_argument, 0, 'c' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	const char *out = NULL, *ssp_opt = NULL, *ssp_from, *ssp_dir, *codec = "deflate-fast";
	const char *schemas = getenv("MTLZ_SCHEMA_DIR");
	char err[768], ssp_buf[4096];
	struct job jb = { 0 };
	struct worker *wk = NULL;
	mtlz_synth_opts so;
	mtlz_synth *g = NULL;
	mtlz_archive_writer *probe;
	struct stat st;
	uint64_t n = 0, n_files;
	long by_class[MTLZ_N_CLASSES] = { 0 };
	double t_start, t_setup, t_run, t_gen = 0, t_write = 0;
	int opt, n_threads = omp_get_max_threads(), per_file = 10000, have_n = 0;
	int rc = EXIT_RUNTIME, failed = 0;

	mtlz_synth_opts_default(&so);
	so.seed = 1;
	optind = 1;
	while ((opt = getopt_long(argc, argv, "n:o:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'n':
			if (parse_u64(optarg, &n) || n < 1 || n > 1000000000000ull) {
				cli_error("synth: --count '%s': need a whole number of spectra, "
					  "1 .. 10^12", optarg);
				return EXIT_USAGE;
			}
			have_n = 1;
			break;
		case 'o': out = optarg; break;
		case 's':
			if (parse_u64(optarg, &so.seed)) {
				cli_error("synth: --seed '%s': need a whole number 0 .. "
					  "18446744073709551615", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'p':
			if (mtlz_parse_int(optarg, 1, 1 << 30, &per_file) < 0) {
				cli_error("synth: --per-file '%s': need 1 .. %d", optarg, 1 << 30);
				return EXIT_USAGE;
			}
			break;
		case 't':
			if (mtlz_parse_int(optarg, 1, 1024, &n_threads) < 0) {
				cli_error("synth: --threads '%s': need 1 .. 1024", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'm':
			if (parse_doubles(optarg, so.class_mix, MTLZ_N_CLASSES)) {
				cli_error("synth: --class-mix '%s': need four numbers "
					  "P,S,C,A (passive, star-forming, composite, AGN)",
					  optarg);
				return EXIT_USAGE;
			}
			break;
		case 'S':
		case 'z': {
			double pair[2];

			if (parse_doubles(optarg, pair, 2)) {
				cli_error("synth: --%s '%s': need LO,HI", opt == 'S' ? "sn-range" :
					  "z-range", optarg);
				return EXIT_USAGE;
			}
			if (opt == 'S') {
				so.sn_min = pair[0];
				so.sn_max = pair[1];
			} else {
				so.z_min = pair[0];
				so.z_max = pair[1];
			}
			break;
		}
		case 'd': ssp_opt = optarg; break;
		case 'c': codec = optarg; break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	if (optind != argc) {
		cli_error("synth: unexpected argument '%s'", argv[optind]);
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	if (!have_n || !out) {
		cli_error("synth: %s is required", !have_n ? "-n/--count" : "-o/--output");
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	if (strcmp(codec, "deflate") && strcmp(codec, "deflate-fast") && strcmp(codec, "null")) {
		cli_error("synth: --codec '%s': deflate-fast, deflate or null", codec);
		return EXIT_USAGE;
	}
	if (mtlz_synth_opts_check(&so, err, sizeof(err))) {
		cli_error("synth: %s", err);
		return EXIT_USAGE;
	}
	ssp_dir = find_ssp_dir(ssp_opt, ssp_buf, sizeof(ssp_buf), &ssp_from);
	if (stat(ssp_dir, &st) || !S_ISDIR(st.st_mode)) {
		cli_error("synth: E-MILES SSP directory %s (from %s): %s", ssp_dir, ssp_from,
			  stat(ssp_dir, &st) ? strerror(errno) : "not a directory");
		return ssp_opt ? EXIT_USAGE : EXIT_RUNTIME;
	}

	t_start = mtlz_now();
	g = mtlz_synth_new(ssp_dir, &so, n_threads, err, sizeof(err));
	if (!g) {
		cli_error("synth: %s", err);
		return EXIT_RUNTIME;
	}
	wk = calloc((size_t)n_threads, sizeof(*wk));
	if (!wk) {
		cli_error("synth: out of memory");
		goto out_free;
	}
	for (int t = 0; t < n_threads; t++) {
		wk[t].avro = mtlz_avro_new(schemas ? schemas : MTLZ_SCHEMA_DIR, NULL, err,
					   sizeof(err));
		wk[t].ws = wk[t].avro ? mtlz_synth_ws_new(g) : NULL;
		if (!wk[t].ws) {
			cli_error("synth: %s", wk[t].avro ? "out of memory" : err);
			goto out_free;
		}
	}
	/* The archive writer creates the directory and refuses one that
	 * already holds an archive; it writes nothing until its first add. */
	probe = mtlz_archive_writer_open(wk[0].avro, out, "part", (size_t)per_file, codec, err,
					 sizeof(err));
	if (!probe) {
		cli_error("synth: %s", err);
		goto out_free;
	}
	mtlz_archive_writer_abort(probe);
	t_setup = mtlz_now() - t_start;

	jb.g = g;
	jb.dir = out;
	jb.codec = codec;
	jb.n = n;
	jb.per_file = (uint64_t)per_file;
	n_files = (n + jb.per_file - 1) / jb.per_file;
	t_run = mtlz_now();
#pragma omp parallel num_threads(n_threads)
	{
		struct worker *me = &wk[omp_get_thread_num()];

#pragma omp for schedule(dynamic, 1)
		for (uint64_t f = 0; f < n_files; f++) {
			if (me->failed || stopped(&jb))
				continue;
			if (make_file(&jb, me, f)) {
				me->failed = 1;
#pragma omp atomic write
				jb.stop = 1;
			}
		}
	}
	t_run = mtlz_now() - t_run;

	for (int t = 0; t < n_threads; t++) {
		/* The first real error, not the "stopped" of the others. */
		if (wk[t].failed && !failed && !strstr(wk[t].err, ": stopped")) {
			cli_error("synth: %s", wk[t].err);
			failed = 1;
		}
		t_gen += wk[t].t_gen;
		t_write += wk[t].t_write;
		for (int c = 0; c < MTLZ_N_CLASSES; c++)
			by_class[c] += wk[t].by_class[c];
	}
	if (jb.stop) {
		if (!failed)
			cli_error("synth: stopped");
		cli_error("synth: %s holds the complete files only", out);
		goto out_free;
	}
	fprintf(stderr,
		"synth: %" PRIu64 " spectra into %s (%" PRIu64 " file%s, %s): passive %ld, "
		"star_forming %ld, composite %ld, agn %ld\n"
		"synth: %.2f s, %.0f spectra/s with %d thread%s (%.0f per thread); per "
		"spectrum: generate %.0f us, encode+write %.0f us; setup %.2f s\n",
		n, out, n_files, n_files == 1 ? "" : "s", codec, by_class[0], by_class[1],
		by_class[2], by_class[3], t_run, (double)n / t_run, n_threads,
		n_threads == 1 ? "" : "s",
		(double)n / t_run / MTLZ_MIN((uint64_t)n_threads, n_files), t_gen / (double)n * 1e6,
		t_write / (double)n * 1e6, t_setup);
	rc = EXIT_OK;

out_free:
	for (int t = 0; wk && t < n_threads; t++) {
		mtlz_synth_ws_free(wk[t].ws);
		mtlz_avro_free(wk[t].avro);
	}
	free(wk);
	mtlz_synth_free(g);
	return rc;
}
