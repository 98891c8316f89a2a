/*
 * test_preprocess.c - the model-grid interpolation and normalisation
 * against hand-computed cases (a flux linear in wavelength is reproduced
 * exactly by linear interpolation, whatever the input grid and wherever
 * the masked pixels are), the quality flags and rejections, and the real
 * fixtures against a brute-force reference.
 */
#include "common.h"
#include "fits_io.h"
#include "preprocess.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define L 5161

static mtlz_prep_opts opts;
static mtlz_prep_ws *ws;
static float out[L];

static void setup(void)
{
	mtlz_prep_opts_default(&opts);
	ws = mtlz_prep_ws_new();
}

static void teardown(void)
{
	mtlz_prep_ws_free(ws);
}

TestSuite(preprocess, .init = setup, .fini = teardown);

/* f(lambda) = a + b lambda; its mean over the output grid is a + b * 6420
 * (the grid 3840..9000 is symmetric about 6420). */
static double lin(double w) { return 2.0 + 0.001 * w; }

static void expect_linear(const float *o, double tol)
{
	const double mean = lin(6420.0);

	for (int j = 0; j < L; j++)
		cr_assert_float_eq(o[j], lin(3840.0 + j) / mean, tol,
				   "pixel %d: %g vs %g", j, (double)o[j],
				   lin(3840.0 + j) / mean);
}

static void make_linear(mtlz_spectrum *s, int kind, double start, double step,
			size_t n, int ivar)
{
	mtlz_spectrum_init(s);
	cr_assert_eq(mtlz_spectrum_alloc(s, n, ivar, ivar, kind == MTLZ_GRID_EXPLICIT), MTLZ_OK);
	s->grid_kind = kind;
	s->start = start;
	s->step = step;
	for (size_t i = 0; i < n; i++) {
		if (kind == MTLZ_GRID_EXPLICIT)
			s->wave[i] = start + step * (double)i + 0.3 * step * sin((double)i);
		s->flux[i] = (float)lin(mtlz_spectrum_wave(s, i));
		if (ivar)
			s->ivar[i] = 1.0f;
	}
	strcpy(s->spec_id, "test");
}

Test(preprocess, linear_grid_reproduces_linear_flux)
{
	mtlz_spectrum s;
	mtlz_prep_info info;

	make_linear(&s, MTLZ_GRID_LINEAR, 3600.0, 0.8, 8000, 0);
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	expect_linear(out, 2e-6);
	cr_assert_eq(info.flags, 0);
	cr_assert_float_eq(info.coverage, 1.0, 1e-12);
	cr_assert_float_eq(info.mean_flux, lin(6420.0), 1e-6);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, loglam_grid_interpolates_linearly_in_wavelength)
{
	/* SDSS grid: 10^(3.5797 + 1e-4 i); linear-in-lambda interpolation of
	 * a linear flux is exact, a log-lambda interpolation would not be. */
	mtlz_spectrum s;
	mtlz_prep_info info;

	make_linear(&s, MTLZ_GRID_LOGLAM, 3.5797, 1e-4, 3850, 1);
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	expect_linear(out, 2e-6);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, explicit_irregular_grid)
{
	mtlz_spectrum s;
	mtlz_prep_info info;

	make_linear(&s, MTLZ_GRID_EXPLICIT, 3700.0, 1.7, 3300, 0);
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	expect_linear(out, 2e-6);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, two_nodes_hand_computed)
{
	/* nodes (3840, 1) and (9000, 3): out_j = (1 + 2 j / 5160) / 2 */
	mtlz_spectrum s;
	mtlz_prep_info info;

	mtlz_spectrum_init(&s);
	mtlz_spectrum_alloc(&s, 2, 0, 0, 1);
	s.wave[0] = 3840.0;
	s.wave[1] = 9000.0;
	s.flux[0] = 1.0f;
	s.flux[1] = 3.0f;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	cr_assert_float_eq(out[0], 0.5f, 1e-7);
	cr_assert_float_eq(out[2580], 1.0f, 1e-7);
	cr_assert_float_eq(out[L - 1], 1.5f, 1e-7);
	cr_assert_float_eq(out[1000], (1.0 + 2.0 * 1000 / 5160) / 2.0, 1e-6);
	cr_assert(info.flags & MTLZ_FLAG_LARGE_GAP);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, masked_pixels_are_not_nodes)
{
	mtlz_spectrum s;
	mtlz_prep_info info;

	make_linear(&s, MTLZ_GRID_LINEAR, 3600.0, 0.8, 8000, 1);
	for (int i = 2000; i < 2100; i++) { /* ivar = 0 with garbage flux */
		s.ivar[i] = 0.0f;
		s.flux[i] = 1e6f;
	}
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	expect_linear(out, 2e-6);
	cr_assert_float_eq(info.bad_frac, 100.0 / 6451.0, 2e-4);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, and_mask_bits_only_when_asked)
{
	mtlz_spectrum s;
	mtlz_prep_info info;

	make_linear(&s, MTLZ_GRID_LINEAR, 3600.0, 0.8, 8000, 1);
	for (int i = 3000; i < 3010; i++) {
		s.and_mask[i] = 1u << 23; /* BRIGHTSKY: usable data by default */
		s.flux[i] = 1e4f;
	}
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	cr_assert_gt(fabs(out[(int)(3600 + 0.8 * 3005 - 3840)] -
			  lin(3600 + 0.8 * 3005) / lin(6420)), 1.0,
		     "flagged pixel must be used when its bit is not selected");
	cr_assert_eq(mtlz_mask_bits_parse("BRIGHTSKY", &opts.and_mask_bits, NULL, 0), MTLZ_OK);
	cr_assert_eq(opts.and_mask_bits, 1u << 23);
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	expect_linear(out, 2e-6);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, nonfinite_input_is_flagged_and_skipped)
{
	mtlz_spectrum s;
	mtlz_prep_info info;

	make_linear(&s, MTLZ_GRID_LINEAR, 3600.0, 0.8, 8000, 1);
	s.flux[500] = NAN;
	s.flux[4000] = INFINITY;
	s.ivar[4100] = NAN;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	cr_assert(info.flags & MTLZ_FLAG_NONFINITE);
	expect_linear(out, 2e-6);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, partial_coverage_holds_edge_and_flags)
{
	/* good data from 4000 A: pixels 3840..3999 hold f(4000) */
	mtlz_spectrum s;
	mtlz_prep_info info;
	double sum = 0;

	make_linear(&s, MTLZ_GRID_LINEAR, 4000.0, 1.0, 5500, 0);
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	cr_assert(info.flags & MTLZ_FLAG_BLUE_SHORT);
	cr_assert_not(info.flags & MTLZ_FLAG_RED_SHORT);
	cr_assert_float_eq(info.coverage, 5000.0 / 5160.0, 1e-9);
	for (int j = 0; j < L; j++)
		sum += j < 160 ? lin(4000.0) : lin(3840.0 + j);
	for (int j = 0; j < L; j += 37) {
		const double f = j < 160 ? lin(4000.0) : lin(3840.0 + j);

		cr_assert_float_eq(out[j], f / (sum / L), 2e-6);
	}
	mtlz_spectrum_clear(&s);
}

Test(preprocess, insufficient_coverage_is_rejected)
{
	mtlz_spectrum s;
	mtlz_prep_info info;
	char err[256];

	make_linear(&s, MTLZ_GRID_LINEAR, 6000.0, 1.0, 3500, 0);
	strcpy(s.source, "x.fits");
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err)), MTLZ_ERR_REJECT);
	cr_assert_eq(info.reject, MTLZ_REJECT_COVERAGE);
	cr_assert(info.flags & MTLZ_FLAG_REJECTED);
	cr_assert(strstr(err, "test") && strstr(err, "x.fits") && strstr(err, "cover"), "%s", err);
	for (int j = 0; j < L; j++)
		cr_assert_eq(out[j], 0.0f);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, too_many_bad_pixels_rejected_some_flagged)
{
	mtlz_spectrum s;
	mtlz_prep_info info;

	make_linear(&s, MTLZ_GRID_LINEAR, 3600.0, 0.8, 8000, 1);
	for (int i = 0; i < 8000; i += 5) /* 20 % bad, spread out */
		s.ivar[i] = 0.0f;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	cr_assert(info.flags & MTLZ_FLAG_BAD_PIXELS);
	expect_linear(out, 2e-6);
	for (int i = 0; i < 8000; i++)
		if (i % 3)
			s.ivar[i] = 0.0f; /* two thirds bad */
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_ERR_REJECT);
	cr_assert_eq(info.reject, MTLZ_REJECT_BAD_PIXELS);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, unusable_spectra_rejected_never_nan)
{
	mtlz_spectrum s;
	mtlz_prep_info info;
	char err[256];

	/* all NaN */
	make_linear(&s, MTLZ_GRID_LINEAR, 3600.0, 0.8, 8000, 0);
	for (int i = 0; i < 8000; i++)
		s.flux[i] = NAN;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err)), MTLZ_ERR_REJECT);
	cr_assert_eq(info.reject, MTLZ_REJECT_NO_DATA);
	/* negative mean */
	for (int i = 0; i < 8000; i++)
		s.flux[i] = -1.0f;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err)), MTLZ_ERR_REJECT);
	cr_assert_eq(info.reject, MTLZ_REJECT_NONPOSITIVE_MEAN);
	/* huge values whose sum overflows float */
	for (int i = 0; i < 8000; i++)
		s.flux[i] = 3e38f;
	mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err));
	for (int j = 0; j < L; j++)
		cr_assert(isfinite(out[j]));
	/* bad grids */
	s.step = 0.0;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err)), MTLZ_ERR_REJECT);
	cr_assert_eq(info.reject, MTLZ_REJECT_BAD_GRID);
	s.step = NAN;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err)), MTLZ_ERR_REJECT);
	s.n = 0;
	s.step = 1.0;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err)), MTLZ_ERR_REJECT);
	mtlz_spectrum_clear(&s);
	/* explicit wavelengths going backwards */
	make_linear(&s, MTLZ_GRID_EXPLICIT, 3700.0, 1.7, 3300, 0);
	s.wave[100] = s.wave[99];
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err)), MTLZ_ERR_REJECT);
	cr_assert_eq(info.reject, MTLZ_REJECT_BAD_GRID);
	s.wave[100] = NAN;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, err, sizeof(err)), MTLZ_ERR_REJECT);
	mtlz_spectrum_clear(&s);
}

Test(preprocess, survey_warnings_become_flags)
{
	mtlz_spectrum s;
	mtlz_prep_info info;
	char buf[128];

	make_linear(&s, MTLZ_GRID_LINEAR, 3600.0, 0.8, 8000, 0);
	s.zwarning = 4;
	s.sn = 3.0;
	cr_assert_eq(mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0), MTLZ_OK);
	cr_assert_eq(info.flags, MTLZ_FLAG_ZWARNING | MTLZ_FLAG_LOW_SN);
	cr_assert_str_eq(mtlz_flags_str(info.flags, buf, sizeof(buf)), "ZWARNING|LOW_SN");
	mtlz_spectrum_clear(&s);
}

Test(preprocess, mask_bit_names)
{
	uint32_t b;
	char err[128];

	cr_assert_eq(mtlz_mask_bits_parse("NODATA,FULLREJECT", &b, err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(b, (1u << 24) | (1u << 18));
	cr_assert_eq(mtlz_mask_bits_parse("0x10", &b, err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(b, 16u);
	cr_assert_neq(mtlz_mask_bits_parse("NOSUCHBIT", &b, err, sizeof(err)), MTLZ_OK);
	cr_assert(strstr(err, "NOSUCHBIT"));
}

/* Brute force: for each output wavelength scan every pixel for the nearest
 * good neighbours, wavelengths from pow() each time. */
static void brute_force(const mtlz_spectrum *s, float *o)
{
	double sum = 0;

	for (int j = 0; j < L; j++) {
		const double w = 3840.0 + j;
		long lo = -1, hi = -1, first = -1, last = -1;
		double f;

		for (size_t i = 0; i < s->n; i++) {
			const double wi = mtlz_spectrum_wave(s, i);
			const int good = isfinite(s->flux[i]) &&
					 (!s->ivar || (isfinite(s->ivar[i]) && s->ivar[i] > 0));

			if (!good)
				continue;
			if (first < 0)
				first = (long)i;
			last = (long)i;
			if (wi <= w)
				lo = (long)i;
			if (wi > w && hi < 0)
				hi = (long)i;
		}
		if (lo < 0)
			f = s->flux[first];
		else if (hi < 0)
			f = s->flux[last];
		else {
			const double a = mtlz_spectrum_wave(s, (size_t)lo), b = mtlz_spectrum_wave(s, (size_t)hi);

			f = s->flux[lo] + (w - a) / (b - a) * ((double)s->flux[hi] - s->flux[lo]);
		}
		o[j] = (float)f;
		sum += f;
	}
	for (int j = 0; j < L; j++)
		o[j] = (float)(o[j] / (sum / L));
}

Test(preprocess, real_fixtures_match_brute_force, .timeout = 120)
{
	static const char *files[] = {
		"spec-0266-51602-0001.fits", "spec-0266-51630-0174.fits",
		"spec-0266-51602-0573.fits", "spec-3586-55181-0003.fits",
		"coadd-4-80613.fits",
	};
	static float ref[L];

	for (size_t f = 0; f < sizeof(files) / sizeof(files[0]); f++) {
		char path[512], err[512];
		mtlz_spectra sp = { 0 };

		snprintf(path, sizeof(path), "%s/%s", MTLZ_TEST_DATA, files[f]);
		cr_assert_eq(mtlz_fits_read(path, &sp, err, sizeof(err)), MTLZ_OK, "%s", err);
		cr_assert_geq(sp.n, 1);
		for (size_t i = 0; i < sp.n; i++) {
			mtlz_prep_info info;
			double mean = 0, maxd = 0;

			cr_assert_eq(mtlz_preprocess(&sp.v[i], &opts, ws, out, &info, err, sizeof(err)),
				     MTLZ_OK, "%s: %s", files[f], err);
			brute_force(&sp.v[i], ref);
			for (int j = 0; j < L; j++) {
				cr_assert(isfinite(out[j]));
				mean += out[j];
				maxd = fmax(maxd, fabs(out[j] - ref[j]) / fmax(1.0, fabs(ref[j])));
			}
			cr_assert_float_eq(mean / L, 1.0, 1e-5, "%s: mean %g", files[f], mean / L);
			cr_assert_leq(maxd, 1e-5, "%s: max rel diff %g", files[f], maxd);
		}
		mtlz_spectra_free(&sp);
	}
}
