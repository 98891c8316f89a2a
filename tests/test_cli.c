/*
 * test_cli.c - the `mtlz` tool end to end on the real fixtures: classify
 * (CSV and JSON lines), preprocess (FITS out, read back with cfitsio), info,
 * bench and init, and the error conventions (exit codes 0/1/2, messages on
 * stderr naming the file).
 */
#include "common.h"
#include "fits_io.h"
#include "preprocess.h"
#include "util.h"

#include <criterion/criterion.h>
#include <fitsio.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MTLZ MTLZ_BIN_DIR "/mtlz"
#define DATA MTLZ_TEST_DATA
#define FIXTURES DATA "/spec-0266-51602-0001.fits " DATA "/spec-0266-51630-0174.fits " \
	DATA "/spec-0266-51602-0573.fits " DATA "/spec-3586-55181-0003.fits " \
	DATA "/coadd-4-80613.fits"

static char tmpdir[256], model[300];
static char *out_buf, *err_buf;

/* a shell command; stdout in out_buf, stderr in err_buf; the exit code */
#define run(...) tu_run(tmpdir, &out_buf, &err_buf, __VA_ARGS__)

static void setup(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/mtlz-test-cli-XXXXXX");
	cr_assert_not_null(mkdtemp(tmpdir));
	snprintf(model, sizeof(model), "%s/m.safetensors", tmpdir);
	cr_assert_eq(run(MTLZ " init -o %s --seed 3", model), 0, "%s", err_buf);
}

static void teardown(void)
{
	tu_run_cleanup(tmpdir, &out_buf, &err_buf);
}

TestSuite(cli, .init = setup, .fini = teardown, .timeout = 300);

/* Splits CSV text (no quoted fields in our fixtures) into lines. */
static int split_lines(char *s, char **lines, int max)
{
	int n = 0;

	for (char *save = NULL, *l = strtok_r(s, "\n", &save); l && n < max;
	     l = strtok_r(NULL, "\n", &save))
		lines[n++] = l;
	return n;
}

static int split_fields(char *line, char **f, int max)
{
	int n = 0;

	f[n++] = line;
	for (char *c = line; *c && n < max; c++)
		if (*c == ',') {
			*c = '\0';
			f[n++] = c + 1;
		}
	return n;
}

Test(cli, classify_csv_on_real_fixtures)
{
	char *lines[64], *f[16];
	int n, n_zwarn = 0;

	cr_assert_eq(run(MTLZ " classify --model %s --mc 20 " FIXTURES, model), 0, "%s", err_buf);
	n = split_lines(out_buf, lines, 64);
	cr_assert_str_eq(lines[0], "spec_id,class,p_passive,p_star_forming,p_composite,p_agn,oh,oh_sigma,flags");
	cr_assert_eq(n, 1 + 5, "4 SDSS/BOSS files and one DESI target: %d rows", n - 1);
	for (int i = 1; i < n; i++) {
		double sum = 0;
		const int nf = split_fields(lines[i], f, 16);

		cr_assert_eq(nf, 9, "row %d has %d fields", i, nf);
		cr_assert(strlen(f[0]) > 0);
		cr_assert(strcmp(f[1], "passive") == 0 || strcmp(f[1], "star_forming") == 0 ||
			  strcmp(f[1], "composite") == 0 || strcmp(f[1], "agn") == 0, "class %s", f[1]);
		for (int k = 2; k < 6; k++) {
			const double p = atof(f[k]);

			cr_assert(isfinite(p) && p >= 0 && p <= 1);
			sum += p;
		}
		cr_assert_float_eq(sum, 1.0, 1e-5);
		/* conditional regression: oh only for star-forming */
		if (strcmp(f[1], "star_forming") == 0)
			cr_assert(strlen(f[6]) > 0 && isfinite(atof(f[6])) && atof(f[7]) >= 0);
		else
			cr_assert(strlen(f[6]) == 0 && strlen(f[7]) == 0);
		cr_assert_not(strstr(f[8], "REJECTED"), "row %d rejected: %s", i, f[8]);
		n_zwarn += strstr(f[8], "ZWARNING") != NULL;
	}
	cr_assert_eq(n_zwarn, 1, "only the BOSS ZWARNING=4 file is flagged");
}

Test(cli, classify_jsonl_flags_boss_zwarning_and_fills_all_metallicities)
{
	char *lines[64];
	int n, seen_boss = 0;

	cr_assert_eq(run(MTLZ " classify -m %s --format jsonl --mc 20 --all-metallicities " FIXTURES,
			 model), 0, "%s", err_buf);
	n = split_lines(out_buf, lines, 64);
	cr_assert_eq(n, 5);
	for (int i = 0; i < n; i++) {
		json_error_t e;
		json_t *j = json_loads(lines[i], 0, &e);
		const char *src, *flags;

		cr_assert_not_null(j, "line %d not JSON: %s", i, e.text);
		src = json_string_value(json_object_get(j, "source"));
		flags = json_string_value(json_object_get(j, "flags"));
		cr_assert(src && flags);
		cr_assert(json_is_real(json_object_get(j, "oh")));
		cr_assert(isfinite(json_real_value(json_object_get(j, "oh"))));
		cr_assert(json_real_value(json_object_get(j, "oh_sigma")) > 0,
			  "MC dropout with p = 0.5 gives a nonzero sigma");
		if (strstr(src, "spec-3586-55181-0003")) {
			seen_boss = 1;
			cr_assert(strstr(flags, "ZWARNING"), "BOSS flags: %s", flags);
			cr_assert_float_eq(json_real_value(json_object_get(j, "z")), 0.589, 0.01);
		} else {
			cr_assert_not(strstr(flags, "ZWARNING"), "%s flags: %s", src, flags);
		}
		json_decref(j);
	}
	cr_assert(seen_boss);
}

Test(cli, unreadable_files_are_named_and_the_rest_carries_on)
{
	char *lines[16];

	cr_assert_eq(run(MTLZ " classify -m %s --mc 0 %s/nope.fits " DATA "/redrock-4-80613.fits "
			 DATA "/spec-0266-51602-0001.fits", model, tmpdir), 1);
	cr_assert(strstr(err_buf, "nope.fits"), "stderr: %s", err_buf);
	cr_assert(strstr(err_buf, "redrock-4-80613.fits"), "stderr: %s", err_buf);
	cr_assert_eq(split_lines(out_buf, lines, 16), 2, "header + the one good file");
}

Test(cli, usage_errors_exit_2)
{
	/* no --model is not a usage error: the default model (test_default_model.c) */
	cr_assert_eq(run(MTLZ " classify -m %s", model), 2);
	cr_assert(strstr(err_buf, "no input files"));
	cr_assert_eq(run(MTLZ " classify -m %s --format xml x.fits", model), 2);
	cr_assert_eq(run(MTLZ " classify -m %s --mc -1 x.fits", model), 2);
	cr_assert_eq(run(MTLZ " frobnicate"), 2);
	cr_assert_eq(run(MTLZ), 2);
	cr_assert_eq(run(MTLZ " --version"), 0);
	cr_assert(strstr(out_buf, "mtlz "));
	cr_assert_eq(run(MTLZ " --help"), 0);
	cr_assert(strstr(out_buf, "classify"));
	cr_assert_eq(run(MTLZ " classify --help"), 0);
}

Test(cli, corrupt_model_is_a_runtime_error_naming_it)
{
	char bad[320];
	FILE *f;

	snprintf(bad, sizeof(bad), "%s/bad.safetensors", tmpdir);
	f = fopen(bad, "w");
	fputs("\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", f);
	fclose(f);
	cr_assert_eq(run(MTLZ " classify -m %s " DATA "/spec-0266-51602-0001.fits", bad), 1);
	cr_assert(strstr(err_buf, "bad.safetensors"), "stderr: %s", err_buf);
	cr_assert_eq(run(MTLZ " info %s", bad), 1);
}

Test(cli, preprocess_writes_what_the_network_sees)
{
	char out[320], err[512];
	fitsfile *f;
	int st = 0, naxis;
	long naxes[2], nrows;
	static float row[5161], ref[5161];
	mtlz_spectra sp = { 0 };
	mtlz_prep_opts po;
	mtlz_prep_ws *ws = mtlz_prep_ws_new();
	mtlz_prep_info info;

	snprintf(out, sizeof(out), "%s/prep.fits", tmpdir);
	cr_assert_eq(run(MTLZ " preprocess -o %s " FIXTURES, out), 0, "%s", err_buf);
	cr_assert_eq(fits_open_file(&f, out, READONLY, &st), 0);
	fits_get_img_dim(f, &naxis, &st);
	fits_get_img_size(f, 2, naxes, &st);
	cr_assert_eq(naxis, 2);
	cr_assert_eq(naxes[0], 5161);
	cr_assert_eq(naxes[1], 5);
	/* row 4 (0-based 3) is the BOSS file: compare with the library */
	cr_assert_eq(mtlz_fits_read(DATA "/spec-3586-55181-0003.fits", &sp, err, sizeof(err)), 0);
	mtlz_prep_opts_default(&po);
	cr_assert_eq(mtlz_preprocess(&sp.v[0], &po, ws, ref, &info, err, sizeof(err)), 0);
	{
		long fpix[2] = { 1, 4 };
		double mean = 0;

		fits_read_pix(f, TFLOAT, fpix, 5161, NULL, row, NULL, &st);
		cr_assert_eq(st, 0);
		for (int j = 0; j < 5161; j++) {
			cr_assert_eq(row[j], ref[j]);
			mean += row[j];
		}
		cr_assert_float_eq(mean / 5161, 1.0, 1e-5);
	}
	fits_movnam_hdu(f, BINARY_TBL, "SPECTRA", 0, &st);
	fits_get_num_rows(f, &nrows, &st);
	cr_assert_eq(st, 0);
	cr_assert_eq(nrows, 5);
	{
		int col, zw;
		char flags[200], *pf = flags;

		fits_get_colnum(f, CASEINSEN, "ZWARNING", &col, &st);
		fits_read_col(f, TINT, col, 4, 1, 1, NULL, &zw, NULL, &st);
		cr_assert_eq(zw, 4);
		fits_get_colnum(f, CASEINSEN, "FLAG_NAMES", &col, &st);
		fits_read_col(f, TSTRING, col, 4, 1, 1, NULL, &pf, NULL, &st);
		cr_assert(strstr(flags, "ZWARNING"));
		cr_assert_eq(st, 0);
	}
	fits_close_file(f, &st);
	mtlz_spectra_free(&sp);
	mtlz_prep_ws_free(ws);
}

Test(cli, info_and_bench)
{
	char *lines[64];
	int n;

	cr_assert_eq(run(MTLZ " info %s", model), 0, "%s", err_buf);
	cr_assert(strstr(out_buf, "channels 16,32,64,128,256"), "%s", out_buf);
	cr_assert(strstr(out_buf, "parameters: "));
	cr_assert(strstr(out_buf, "meta mtlz.seed: 3"));
	cr_assert_eq(run(MTLZ " bench -m %s --threads 1 --batch 1,3 --seconds 0.2", model), 0, "%s", err_buf);
	n = split_lines(out_buf, lines, 64);
	cr_assert_geq(n, 1 + 2 + 2);
	for (int i = 1; i < n; i++) {
		const char *tail = strstr(lines[i], " spectra/s");

		cr_assert(tail && tail[10] == '\0', "line does not end in spectra/s: %s", lines[i]);
		cr_assert_gt(atof(strrchr(lines[i], ':') + 1), 0.0);
	}
}
