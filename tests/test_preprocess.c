/*
 * test_preprocess.c - the model-grid interpolation and normalisation
 * against hand-computed cases (a flux linear in wavelength is reproduced
 * exactly by linear interpolation, whatever the input grid and wherever
 * the masked pixels are), the quality flags and rejections, and the real
 * fixtures against a brute-force reference.
 */
#include "common.h"
#include "fits_io.h"
#include "kernels_cpu.h"
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

	/* each file through both implementations (AVX2 where the CPU has it) */
	for (size_t run = 0; run < 2 * sizeof(files) / sizeof(files[0]); run++) {
		const size_t f = run / 2;
		char path[512], err[512];
		mtlz_spectra sp = { 0 };

		mtlz_prep_ws_set_isa(ws, run & 1 ? MTLZ_ISA_GENERIC : MTLZ_ISA_AVX2);
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
			cr_assert_float_eq(mean / L, 1.0, 1e-5, "%s (%s): mean %g", files[f],
					   run & 1 ? "generic" : "default", mean / L);
			cr_assert_leq(maxd, 1e-5, "%s (%s): max rel diff %g", files[f],
				      run & 1 ? "generic" : "default", maxd);
		}
		mtlz_spectra_free(&sp);
	}
}

/* uniform integer in [0, n) */
static uint32_t below(mtlz_rng *r, uint32_t n)
{
	return (uint32_t)(mtlz_rng_uniform(r) * n);
}

/* A random spectrum on a uniform grid with the bad pixels a survey has:
 * scattered ones, runs of every length (at the ends too), non-finite flux
 * and ivar, mask bits; sometimes coarse or very fine steps, sometimes only
 * a few pixels. */
static void random_uniform(mtlz_spectrum *s, mtlz_rng *r, uint32_t *bits)
{
	static const double lin_steps[] = { 0.1, 0.5, 0.8, 1.0, 2.5, 7.0, 900.0 };
	static const double log_steps[] = { 1e-5, 5e-5, 1e-4, 3e-4, 0.05 };
	const int log = mtlz_rng_uniform(r) < 0.5;
	const double p_bad = (double[]){ 0.0, 0.001, 0.01, 0.05, 0.3 }[below(r, 5)];
	double start, step, end = 9000.0 + 400.0 * (mtlz_rng_uniform(r) - 0.6);
	size_t n;
	int runs;

	mtlz_spectrum_init(s);
	if (log) {
		step = log_steps[below(r, 5)];
		start = log10(3700.0 + 300.0 * mtlz_rng_uniform(r));
		n = (size_t)((log10(end) - start) / step) + 1;
	} else {
		step = lin_steps[below(r, 7)];
		start = 3700.0 + 300.0 * mtlz_rng_uniform(r);
		n = (size_t)((end - start) / step) + 1;
	}
	n = MTLZ_MAX(n, 2);
	cr_assert_eq(mtlz_spectrum_alloc(s, n, 1, 1, 0), MTLZ_OK);
	s->grid_kind = log ? MTLZ_GRID_LOGLAM : MTLZ_GRID_LINEAR;
	s->start = start;
	s->step = step;
	for (size_t i = 0; i < n; i++) {
		s->flux[i] = (float)(1.0 + 0.5 * sin((double)i / 37.0) + 0.4 * (mtlz_rng_uniform(r) - 0.5));
		s->ivar[i] = mtlz_rng_uniform(r) < p_bad ? 0.0f : 1.0f;
		s->and_mask[i] = mtlz_rng_uniform(r) < 0.02 ? 1u << below(r, 30) : 0;
	}
	runs = (int)below(r, 6);
	for (int k = 0; k < runs; k++) {
		const size_t len = 1 + below(r, (uint32_t)MTLZ_MIN(n, 600));
		const size_t at = k == 0 ? 0 : k == 1 ? n - len :
				  below(r, (uint32_t)(n - len + 1));

		for (size_t i = at; i < at + len; i++)
			s->ivar[i] = 0.0f;
	}
	if (mtlz_rng_uniform(r) < 0.2) {
		s->flux[below(r, (uint32_t)n)] = NAN;
		s->ivar[below(r, (uint32_t)n)] = INFINITY;
		s->flux[below(r, (uint32_t)n)] = -INFINITY;
	}
	*bits = mtlz_rng_uniform(r) < 0.3 ? 0x00ff00ffu : 0;
	snprintf(s->spec_id, sizeof(s->spec_id), "random-%s-%zu", log ? "log" : "lin", n);
}

/*
 * The AVX2 path against the portable one on 600 random spectra: the same
 * verdict, flags and quality numbers, and the same output to rounding (the
 * AVX2 path sums in another order and may fuse multiply-adds).
 */
Test(preprocess, avx2_path_matches_generic_on_random_spectra, .timeout = 120)
{
	static float ref[L];
	mtlz_prep_ws *wg = mtlz_prep_ws_new();
	mtlz_rng r;
	int n_ok = 0, n_rejected = 0;

	if (mtlz_prep_ws_set_isa(ws, MTLZ_ISA_AVX2) != MTLZ_ISA_AVX2)
		cr_skip_test("this CPU or build has no AVX2 path");
	cr_assert_eq(mtlz_prep_ws_set_isa(wg, MTLZ_ISA_GENERIC), MTLZ_ISA_GENERIC);
	mtlz_rng_seed(&r, 20261126);
	for (int k = 0; k < 600; k++) {
		mtlz_spectrum s;
		mtlz_prep_info a, g;
		char ea[256] = "", eg[256] = "";
		int ra, rg;

		random_uniform(&s, &r, &opts.and_mask_bits);
		ra = mtlz_preprocess(&s, &opts, ws, out, &a, ea, sizeof(ea));
		rg = mtlz_preprocess(&s, &opts, wg, ref, &g, eg, sizeof(eg));
		cr_assert_eq(ra, rg, "%s: %d (%s) vs %d (%s)", s.spec_id, ra, ea, rg, eg);
		cr_assert_str_eq(ea, eg);
		cr_assert_eq(a.reject, g.reject, "%s", s.spec_id);
		cr_assert_eq(a.flags, g.flags, "%s: flags %#x vs %#x", s.spec_id, a.flags, g.flags);
		cr_assert_eq(a.bad_frac, g.bad_frac, "%s", s.spec_id);
		cr_assert_eq(a.coverage, g.coverage, "%s", s.spec_id);
		cr_assert_float_eq(a.max_gap, g.max_gap, 1e-9 * fmax(1.0, g.max_gap), "%s: %g vs %g",
				   s.spec_id, a.max_gap, g.max_gap);
		if (ra == MTLZ_OK) {
			cr_assert_float_eq(a.mean_flux, g.mean_flux, 1e-12 * fabs(g.mean_flux),
					   "%s", s.spec_id);
			for (int j = 0; j < L; j++)
				cr_assert_float_eq(out[j], ref[j], 1e-6 * fmax(1.0, fabs(ref[j])),
						   "%s pixel %d: %.9g vs %.9g", s.spec_id, j,
						   (double)out[j], (double)ref[j]);
			n_ok++;
		} else {
			n_rejected++;
		}
		mtlz_spectrum_clear(&s);
	}
	opts.and_mask_bits = 0;
	/* both kinds of outcome were exercised */
	cr_assert_gt(n_ok, 200, "%d accepted", n_ok);
	cr_assert_gt(n_rejected, 10, "%d rejected", n_rejected);
	mtlz_prep_ws_free(wg);
}

/* The AVX2 path against brute force on random spectra small enough for it
 * (no mask bits: brute_force knows only ivar and finiteness). */
Test(preprocess, avx2_path_matches_brute_force_on_random_spectra, .timeout = 120)
{
	static float ref[L];
	mtlz_rng r;
	int tried = 0;

	if (mtlz_prep_ws_set_isa(ws, MTLZ_ISA_AVX2) != MTLZ_ISA_AVX2)
		cr_skip_test("this CPU or build has no AVX2 path");
	mtlz_rng_seed(&r, 7);
	while (tried < 40) {
		mtlz_spectrum s;
		mtlz_prep_info info;
		uint32_t bits;
		double maxd = 0;

		random_uniform(&s, &r, &bits);
		if (s.n > 12000 || mtlz_preprocess(&s, &opts, ws, out, &info, NULL, 0) != MTLZ_OK) {
			mtlz_spectrum_clear(&s);
			continue;
		}
		brute_force(&s, ref);
		for (int j = 0; j < L; j++)
			maxd = fmax(maxd, fabs(out[j] - ref[j]) / fmax(1.0, fabs(ref[j])));
		cr_assert_leq(maxd, 1e-5, "%s: max rel diff %g", s.spec_id, maxd);
		mtlz_spectrum_clear(&s);
		tried++;
	}
}

/* Every pattern of bad pixels on short uniform grids (2 to 10 pixels over
 * the whole window, linear and log): the AVX2 path against the portable
 * one. Short grids put the ends, single good pixels and runs next to each
 * other in every way. */
Test(preprocess, avx2_path_matches_generic_on_every_short_mask)
{
	static float ref[L];
	mtlz_prep_ws *wg = mtlz_prep_ws_new();
	int compared = 0;

	if (mtlz_prep_ws_set_isa(ws, MTLZ_ISA_AVX2) != MTLZ_ISA_AVX2)
		cr_skip_test("this CPU or build has no AVX2 path");
	mtlz_prep_ws_set_isa(wg, MTLZ_ISA_GENERIC);
	opts.min_coverage = 0.0; /* judge the interpolation, not the verdict */
	opts.max_bad_frac = 1.0;
	for (int log = 0; log < 2; log++) {
		for (size_t n = 2; n <= 10; n++) {
			for (unsigned bad = 0; bad < 1u << n; bad++) {
				mtlz_spectrum s;
				mtlz_prep_info a, g;
				int ra, rg;

				mtlz_spectrum_init(&s);
				cr_assert_eq(mtlz_spectrum_alloc(&s, n, 1, 0, 0), MTLZ_OK);
				s.grid_kind = log ? MTLZ_GRID_LOGLAM : MTLZ_GRID_LINEAR;
				s.start = log ? log10(3800.0) : 3800.0;
				s.step = log ? (log10(9100.0) - s.start) / (double)(n - 1) :
					       5300.0 / (double)(n - 1);
				for (size_t i = 0; i < n; i++) {
					s.flux[i] = (float)(1.0 + 0.1 * (double)((i * 7) % 5));
					s.ivar[i] = bad >> i & 1 ? 0.0f : 1.0f;
				}
				ra = mtlz_preprocess(&s, &opts, ws, out, &a, NULL, 0);
				rg = mtlz_preprocess(&s, &opts, wg, ref, &g, NULL, 0);
				cr_assert_eq(ra, rg, "n %zu bad %#x", n, bad);
				cr_assert_eq(a.flags, g.flags, "n %zu bad %#x", n, bad);
				cr_assert_float_eq(a.max_gap, g.max_gap, 1e-9 * fmax(1.0, g.max_gap),
						   "n %zu bad %#x", n, bad);
				if (ra == MTLZ_OK) {
					for (int j = 0; j < L; j++)
						cr_assert_float_eq(out[j], ref[j], 1e-6,
								   "n %zu bad %#x pixel %d", n, bad, j);
					compared++;
				}
				mtlz_spectrum_clear(&s);
			}
		}
	}
	mtlz_prep_opts_default(&opts);
	/* every pattern but the all-bad one is accepted */
	cr_assert_eq(compared, 2 * ((1 << 11) - 4 - 9), "%d compared", compared);
	mtlz_prep_ws_free(wg);
}
