/*
 * synth.c - synthetic SDSS-like labelled galaxy spectra (synth.h). The model,
 * its calibrations and its parameter distributions are documented, with
 * references, in docs/synth.md; keep the two in step.
 *
 * Startup (mtlz_synth_new) does everything that does not depend on the
 * spectrum: it reads the 20 E-MILES SSPs (53,689 fluxes each, on the vacuum
 * wavelengths of SSP_Wavelength_Vacuum.fits), puts them on one rest-frame
 * log10-lambda grid with the SDSS pixel step (1e-4) broadened, for each
 * stellar velocity-dispersion bin, from the SSPs' own 2.51 A FWHM to
 * sqrt(sigma_star^2 + sigma_instrument^2) (R = 2000), and tabulates the dust
 * law, the sky, the throughput, the luminosity distance and the pixel
 * edges of the observed grid. Because the rest and observed grids share the
 * step, redshifting is a shift by a whole number of pixels plus one
 * constant fraction, and a Gaussian in velocity has a constant width in
 * pixels; a spectrum then costs a mixture sum over a few SSPs, a smooth
 * dust factor, one linear resampling, the line profiles and the noise.
 */
#include "synth.h"
#include "bpt.h"
#include "common.h"

#include <assert.h>
#include <fitsio.h>
#include <inttypes.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define C_KMS 299792.458
#define LN10 2.302585092994046
#define PIX_LOG 1e-4                            /* SDSS log10-lambda step */
#define PIX_KMS (C_KMS * LN10 * PIX_LOG)        /* 69.03 km/s per pixel */
#define FWHM_TO_SIGMA (1.0 / 2.3548200450309493)
#define R_INST 2000.0
#define SIGMA_INST_KMS (C_KMS / R_INST * FWHM_TO_SIGMA)   /* 63.7 km/s */
#define SSP_FWHM_A 2.51                         /* E-MILES, Vazdekis et al. 2016 */
#define KERNEL_MIN_A 0.6                        /* narrowest gather kernel, A */
#define LSUN_ERG_S 3.828e33
#define MPC_CM 3.0856775814913673e24
#define H0 70.0
#define PI 3.14159265358979323846
#define OMEGA_M 0.3

/* Observed grid: integer log10-lambda pixel numbers (1e-4 units). SDSS
 * spectra start at 3.5795-3.5830 (3800-3830 A) and end at 3.9630-3.9645
 * (9183-9215 A); each spectrum draws its own ends. */
#define OBS_I0_MIN 35795
#define OBS_I0_MAX 35830
#define OBS_I1_MIN 39630
#define OBS_I1_MAX 39645
#define OBS_N_MAX (OBS_I1_MAX - OBS_I0_MIN + 1)
#define R_BAND_LO_A 5500.0                      /* S/N_r window, observed */
#define R_BAND_HI_A 6900.0

/* Stellar velocity-dispersion bins, km/s. */
#define SIG_MIN 30.0
#define SIG_STEP 10.0
#define N_SIG_BINS 33                           /* 30 .. 350 */

#define N_AGES 5
#define N_METALS 4
#define SSP_NATIVE_N 53689
#define MAX_COMP 5

static const char *const ssp_metal_tag[N_METALS] = { "m1.31", "m0.40", "p0.00", "p0.22" };
static const double ssp_metal[N_METALS] = { -1.31, -0.40, 0.00, 0.22 };
static const char *const ssp_age_tag[N_AGES] = { "00.0631", "00.2512", "01.0000",
						 "04.4668", "12.5893" };
static const double ssp_age_gyr[N_AGES] = { 0.0631, 0.2512, 1.0, 4.4668, 12.5893 };

/* SDSS vacuum wavelengths (the SPZLINE LINEWAVE values). */
static const double line_wave[MTLZ_SYNTH_N_LINES] = {
	[MTLZ_LINE_OII_3727] = 3727.092, [MTLZ_LINE_OII_3730] = 3729.875,
	[MTLZ_LINE_HD] = 4102.892, [MTLZ_LINE_HG] = 4341.684, [MTLZ_LINE_HB] = 4862.683,
	[MTLZ_LINE_OIII_4959] = 4960.295, [MTLZ_LINE_OIII_5007] = 5008.240,
	[MTLZ_LINE_OI_6300] = 6302.046, [MTLZ_LINE_NII_6548] = 6549.859,
	[MTLZ_LINE_HA] = 6564.614, [MTLZ_LINE_NII_6584] = 6585.268,
	[MTLZ_LINE_SII_6717] = 6718.294, [MTLZ_LINE_SII_6731] = 6732.678,
};

/* Case B recombination (10^4 K, n_e = 100 cm^-3; Osterbrock & Ferland 2006)
 * relative to H-beta. */
#define BALMER_HA_HB 2.86
#define BALMER_HG_HB 0.468
#define BALMER_HD_HB 0.259
#define OIII_5007_4959 2.98
#define NII_6584_6548 3.05

/* H-alpha pseudo-continuum windows (rest, vacuum A) for EW(H-alpha). */
static const double ha_cont_win[2][2] = { { 6490.0, 6530.0 }, { 6600.0, 6640.0 } };

/* Night-sky emission lines (vacuum A, approximate) and their peak heights
 * relative to the sky continuum at 6500 A, at R = 2000: [O I], Na D and the
 * brightest OH Meinel lines. A noise model, not a sky library. */
static const double sky_lines[][2] = {
	{ 5578.9, 9.0 }, { 5891.6, 2.5 }, { 5897.6, 2.0 }, { 6302.0, 4.0 }, { 6365.5, 1.5 },
	{ 6865.9, 1.5 }, { 6925.1, 1.5 }, { 7278.4, 2.0 }, { 7318.3, 2.5 }, { 7342.9, 2.5 },
	{ 7371.3, 2.5 }, { 7573.8, 2.0 }, { 7752.8, 2.5 }, { 7796.3, 3.0 }, { 7823.7, 2.5 },
	{ 7916.0, 3.0 }, { 7995.6, 3.0 }, { 8346.9, 4.0 }, { 8401.5, 4.5 }, { 8432.5, 4.0 },
	{ 8467.7, 4.0 }, { 8507.0, 3.5 }, { 8763.7, 3.5 }, { 8829.5, 5.0 }, { 8888.3, 5.0 },
	{ 8922.1, 4.0 }, { 8945.9, 4.5 }, { 8960.6, 3.5 }, { 8990.9, 4.0 }, { 9003.6, 4.0 },
	{ 9040.5, 4.0 }, { 9051.8, 3.5 }, { 9101.0, 3.5 }, { 9154.0, 3.0 }, { 9194.0, 4.0 },
};

/* Sky continuum (per pixel, relative) and spectrograph throughput against
 * wavelength; linear in between. */
static const double sky_cont_tab[][2] = {
	{ 3700, 0.70 }, { 4500, 0.60 }, { 5500, 0.90 }, { 6500, 1.00 }, { 7500, 1.20 },
	{ 8500, 1.50 }, { 9300, 1.60 },
};
static const double thr_tab[][2] = {
	{ 3700, 0.25 }, { 3800, 0.30 }, { 4000, 0.55 }, { 4500, 0.85 }, { 5000, 1.00 },
	{ 5800, 0.95 }, { 6000, 0.85 }, { 6200, 0.92 }, { 7000, 1.00 }, { 8000, 0.90 },
	{ 8800, 0.70 }, { 9300, 0.40 },
};

/* Age (0.063, 0.25, 1, 4.5, 12.6 Gyr) preferences per class and metallicity
 * ([M/H] -1.31, -0.40, 0, +0.22) preferences per stellar-mass range. */
static const double age_pref[MTLZ_N_CLASSES][N_AGES] = {
	[MTLZ_CLASS_PASSIVE] = { 0.00, 0.00, 0.10, 0.40, 0.50 },
	[MTLZ_CLASS_STAR_FORMING] = { 0.30, 0.25, 0.20, 0.15, 0.10 },
	[MTLZ_CLASS_COMPOSITE] = { 0.10, 0.20, 0.25, 0.25, 0.20 },
	[MTLZ_CLASS_AGN] = { 0.05, 0.10, 0.20, 0.30, 0.35 },
};
static const double metal_pref[3][N_METALS] = {
	{ 0.30, 0.40, 0.20, 0.10 },   /* log M < 9.5 */
	{ 0.10, 0.30, 0.40, 0.20 },   /* 9.5 .. 10.5 */
	{ 0.02, 0.18, 0.45, 0.35 },   /* > 10.5 */
};
/* log10 M* ~ N(mean, sd) truncated to [lo, hi], per class. */
static const double mass_dist[MTLZ_N_CLASSES][4] = {
	[MTLZ_CLASS_PASSIVE] = { 10.8, 0.35, 9.8, 11.8 },
	[MTLZ_CLASS_STAR_FORMING] = { 9.8, 0.55, 8.5, 11.2 },
	[MTLZ_CLASS_COMPOSITE] = { 10.5, 0.35, 9.5, 11.5 },
	[MTLZ_CLASS_AGN] = { 10.7, 0.30, 9.8, 11.6 },
};

struct mtlz_synth {
	mtlz_synth_opts o;
	double class_cum[MTLZ_N_CLASSES];
	double log_sn_min, log_sn_max, z_pdf_max;

	/* Rest grid: pixel j at log10 lambda = (j0 + j) * 1e-4. */
	long j0;
	int n_rest;
	float *ssp;                  /* [N_SIG_BINS][20][n_rest], unit mean flux at 5500 A */
	float *calz;                 /* Calzetti k'(lambda) per rest pixel */
	double ell[MTLZ_SYNTH_N_SSP];/* SSP L_lambda at 5500 A, Lsun/A per Msun */
	double ha_cont[N_SIG_BINS][MTLZ_SYNTH_N_SSP]; /* H-alpha pseudo-continuum, unit flux */
	double calz_ha;              /* k'(6564.6) */
	double line_alav[MTLZ_SYNTH_N_LINES];         /* Cardelli A_lambda / A_V */

	/* Observed grid, absolute pixels OBS_I0_MIN .. OBS_I1_MAX. */
	double edge[OBS_N_MAX + 1];  /* lower edge of each pixel, A */
	float thr[OBS_N_MAX];        /* throughput */
	float sky[OBS_N_MAX];        /* sky per pixel, relative to its continuum at 6500 A */
	uint8_t bright[OBS_N_MAX];   /* sky line peak above 3 x the sky continuum */
	int r_lo, r_hi;              /* absolute pixels of the S/N_r window */

	double dl_mpc[1001];         /* luminosity distance at z = 0, 0.001, ... 1 */

	/* Ziggurat (Marsaglia & Tsang 2000), 128 layers. */
	uint32_t zk[128];
	double zw[128], zf[128];
};

struct mtlz_synth_ws {
	mtlz_spectrum s;             /* arrays of OBS_N_MAX values; n set per spectrum */
	mtlz_labels labels;
	mtlz_synth_truth truth;
	float *rest, *model, *cont, *var, *tmp;
};

/* Everything drawn for one spectrum. */
struct draw {
	int cls, branch;
	double log_mass, z, sn_r, oh;
	int n_comp, comp[MAX_COMP];
	double frac[MAX_COMP];       /* light fractions at 5500 A */
	int bin;
	double sigma_star, sigma_gas, av_gas, e_star;
	int has_lines;
	double ew_ha, n2, o3, s2, o1, o2, sii_ratio, oii_ratio;
	double fib, sky_q;
	int i0, i1;
};

/* ---- random numbers ------------------------------------------------- */

static double uni(mtlz_rng *r)
{
	return mtlz_rng_uniform(r);
}

/* Uniform in (0, 1): safe for log(). */
static double uni_open(mtlz_rng *r)
{
	return ((double)(mtlz_rng_next(r) >> 11) + 0.5) * 0x1.0p-53;
}

static void zig_init(mtlz_synth *g)
{
	const double m1 = 2147483648.0, vn = 9.91256303526217e-3;
	double dn = 3.442619855899, tn = dn, q = vn / exp(-0.5 * dn * dn);

	g->zk[0] = (uint32_t)((dn / q) * m1);
	g->zk[1] = 0;
	g->zw[0] = q / m1;
	g->zw[127] = dn / m1;
	g->zf[0] = 1.0;
	g->zf[127] = exp(-0.5 * dn * dn);
	for (int i = 126; i >= 1; i--) {
		dn = sqrt(-2.0 * log(vn / dn + exp(-0.5 * dn * dn)));
		g->zk[i + 1] = (uint32_t)((dn / tn) * m1);
		tn = dn;
		g->zf[i] = exp(-0.5 * dn * dn);
		g->zw[i] = dn / m1;
	}
}

/* Standard normal deviate: ziggurat, layer from the low bits and the
 * abscissa from the high 32 bits of one 64-bit draw. */
static double gauss(const mtlz_synth *g, mtlz_rng *r)
{
	for (;;) {
		const uint64_t u = mtlz_rng_next(r);
		const int iz = (int)(u & 127);
		const int32_t hz = (int32_t)(uint32_t)(u >> 32);
		const uint32_t az = hz < 0 ? (uint32_t)(-(int64_t)hz) : (uint32_t)hz;
		const double x = hz * g->zw[iz];

		if (az < g->zk[iz])
			return x;
		if (iz == 0) {   /* the tail beyond 3.4426 */
			double xt, yt;

			do {
				xt = -log(uni_open(r)) / 3.442619855899;
				yt = -log(uni_open(r));
			} while (yt + yt < xt * xt);
			return hz > 0 ? 3.442619855899 + xt : -3.442619855899 - xt;
		}
		if (g->zf[iz] + uni(r) * (g->zf[iz - 1] - g->zf[iz]) < exp(-0.5 * x * x))
			return x;
	}
}

static double trunc_normal(const mtlz_synth *g, mtlz_rng *r, double mu, double sd,
			   double lo, double hi)
{
	for (int k = 0; k < 64; k++) {
		const double x = mu + sd * gauss(g, r);

		if (x >= lo && x <= hi)
			return x;
	}
	return mu < lo ? lo : mu > hi ? hi : mu;
}

static int pick(mtlz_rng *r, const double *p, int n)
{
	double sum = 0, u;

	for (int i = 0; i < n; i++)
		sum += p[i];
	u = uni(r) * sum;
	for (int i = 0; i < n; i++) {
		if (u < p[i])
			return i;
		u -= p[i];
	}
	for (int i = n - 1; i > 0; i--)   /* rounding: the last non-zero one */
		if (p[i] > 0)
			return i;
	return 0;
}

static double clampd(double x, double lo, double hi)
{
	return x < lo ? lo : x > hi ? hi : x;
}

/* ---- physics tables ------------------------------------------------- */

/* Calzetti et al. (2000) starburst attenuation k'(lambda), R'_V = 4.05. */
static double calzetti_k(double lam_a)
{
	const double x = lam_a * 1e-4;   /* um */
	double k;

	if (x < 0.63)
		k = 2.659 * (-2.156 + 1.509 / x - 0.198 / (x * x) + 0.011 / (x * x * x)) + 4.05;
	else
		k = 2.659 * (-1.857 + 1.040 / x) + 4.05;
	return k > 0 ? k : 0;
}

/* Cardelli, Clayton & Mathis (1989) A_lambda / A_V, R_V = 3.1 (optical and
 * near-infrared branches). */
static double cardelli_alav(double lam_a)
{
	const double x = 1e4 / lam_a, rv = 3.1;   /* 1/um */
	double a, b;

	if (x < 1.1) {
		a = 0.574 * pow(x, 1.61);
		b = -0.527 * pow(x, 1.61);
	} else {
		const double y = x - 1.82;

		a = 1 + y * (0.17699 + y * (-0.50447 + y * (-0.02427 + y * (0.72085 +
		    y * (0.01979 + y * (-0.77530 + y * 0.32999))))));
		b = y * (1.41338 + y * (2.28305 + y * (1.07233 + y * (-5.38434 +
		    y * (-0.62251 + y * (5.30260 + y * -2.09002))))));
	}
	return a + b / rv;
}

/* Andrews & Martini (2013) mass-metallicity relation, eq. 5. */
static double mzr_am13(double log_mass)
{
	return 8.798 - log10(1 + pow(10.0, 0.640 * (8.901 - log_mass)));
}

/* p(z) up to a constant: an SDSS main-sample-like redshift distribution
 * peaking at z = 0.08. */
static double z_pdf(double z)
{
	return z <= 0 ? 0 : z * z * exp(-pow(z / 0.066, 1.5));
}

static double table_interp(const double (*t)[2], int n, double x)
{
	if (x <= t[0][0])
		return t[0][1];
	for (int i = 1; i < n; i++)
		if (x <= t[i][0])
			return t[i - 1][1] + (t[i][1] - t[i - 1][1]) * (x - t[i - 1][0]) /
			       (t[i][0] - t[i - 1][0]);
	return t[n - 1][1];
}

static double lum_dist_mpc(const mtlz_synth *g, double z)
{
	const double x = z * 1000.0;
	int k = (int)x;

	if (k >= 1000)
		return g->dl_mpc[1000];
	return g->dl_mpc[k] + (g->dl_mpc[k + 1] - g->dl_mpc[k]) * (x - k);
}

static void dist_init(mtlz_synth *g)
{
	/* Flat LCDM: D_C = c/H0 int dz/E(z), trapezoids of 1e-4. */
	double dc = 0, e_prev = 1;

	g->dl_mpc[0] = 0;
	for (int k = 1; k <= 1000; k++) {
		for (int s = 1; s <= 10; s++) {
			const double z = (k - 1) * 1e-3 + s * 1e-4;
			const double e = 1 / sqrt(OMEGA_M * pow(1 + z, 3) + (1 - OMEGA_M));

			dc += 0.5 * (e + e_prev) * 1e-4;
			e_prev = e;
		}
		g->dl_mpc[k] = (1 + k * 1e-3) * dc * C_KMS / H0;
	}
}

static void obs_init(mtlz_synth *g)
{
	for (int k = 0; k <= OBS_N_MAX; k++)
		g->edge[k] = pow(10.0, (OBS_I0_MIN + k - 0.5) * PIX_LOG);
	for (int k = 0; k < OBS_N_MAX; k++) {
		const double lam = pow(10.0, (OBS_I0_MIN + k) * PIX_LOG);
		const double cont = table_interp(sky_cont_tab, (int)MTLZ_ARRAY_SIZE(sky_cont_tab),
						 lam);
		double lines = 0;

		for (size_t l = 0; l < MTLZ_ARRAY_SIZE(sky_lines); l++) {
			const double sig = sky_lines[l][0] / R_INST * FWHM_TO_SIGMA;
			const double d = (lam - sky_lines[l][0]) / sig;

			if (fabs(d) < 6)
				lines += sky_lines[l][1] * exp(-0.5 * d * d);
		}
		g->sky[k] = (float)(cont + lines);
		g->bright[k] = lines > 3 * cont;
		g->thr[k] = (float)table_interp(thr_tab, (int)MTLZ_ARRAY_SIZE(thr_tab), lam);
	}
	g->r_lo = (int)ceil(log10(R_BAND_LO_A) / PIX_LOG);
	g->r_hi = (int)floor(log10(R_BAND_HI_A) / PIX_LOG);
}

/* ---- loading and broadening the SSPs --------------------------------- */

static int fits_err(char *errstr, size_t errstr_size, const char *path, int status)
{
	char text[FLEN_STATUS];

	fits_get_errstatus(status, text);
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s (cfitsio %d)", path, text,
			status);
}

/* Reads the primary array of path (SSP_NATIVE_N values) into out. For an
 * SSP (check_grid) also checks CRVAL1 = 1680.2 and CDELT1 = 0.9 A. */
static int read_primary(const char *path, int check_grid, double *out, char *errstr,
			size_t errstr_size)
{
	fitsfile *f;
	int st = 0, naxis = 0;
	long naxes[2] = { 0, 0 };

	if (fits_open_file(&f, path, READONLY, &st))
		return fits_err(errstr, errstr_size, path, st);
	if (fits_get_img_dim(f, &naxis, &st) || fits_get_img_size(f, 2, naxes, &st)) {
		fits_close_file(f, &st);
		return fits_err(errstr, errstr_size, path, st);
	}
	if (naxis != 1 || naxes[0] != SSP_NATIVE_N) {
		fits_close_file(f, &st);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: primary array is %dD with %ld values; an E-MILES SSP has "
				"1D %d", path, naxis, naxes[0], SSP_NATIVE_N);
	}
	if (check_grid) {
		double crval = 0, cdelt = 0;

		fits_read_key(f, TDOUBLE, "CRVAL1", &crval, NULL, &st);
		fits_read_key(f, TDOUBLE, "CDELT1", &cdelt, NULL, &st);
		if (st || fabs(crval - 1680.2) > 1e-6 || fabs(cdelt - 0.9) > 1e-9) {
			st = 0;
			fits_close_file(f, &st);
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: CRVAL1 = %g, CDELT1 = %g; expected the E-MILES "
					"grid 1680.2 + 0.9 i A", path, crval, cdelt);
		}
	}
	if (fits_read_img(f, TDOUBLE, 1, SSP_NATIVE_N, NULL, out, NULL, &st)) {
		int st2 = 0;

		fits_close_file(f, &st2);
		return fits_err(errstr, errstr_size, path, st);
	}
	fits_close_file(f, &st);
	for (long k = 0; k < SSP_NATIVE_N; k++)
		if (!isfinite(out[k]) || (check_grid && out[k] < 0))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: value %ld is %g", path, k + 1, out[k]);
	return MTLZ_OK;
}

struct native {
	double wave[SSP_NATIVE_N];   /* vacuum A */
	double dw[SSP_NATIVE_N];     /* pixel widths */
	float *flux;                 /* [SSP_NATIVE_N][20], SSP-minor */
};

/* Kernel sigma in A at rest wavelength lam for stellar dispersion sig_star:
 * what is missing between the SSPs' 2.51 A FWHM and the target
 * sqrt(sig_star^2 + sig_instrument^2), floored at KERNEL_MIN_A. */
static double kernel_sigma_a(double lam, double sig_star)
{
	const double ssp_kms = C_KMS * SSP_FWHM_A * FWHM_TO_SIGMA / lam;
	const double v2 = sig_star * sig_star + SIGMA_INST_KMS * SIGMA_INST_KMS - ssp_kms * ssp_kms;
	const double s = v2 > 0 ? lam * sqrt(v2) / C_KMS : 0;

	return s > KERNEL_MIN_A ? s : KERNEL_MIN_A;
}

/* Gaussian-weighted mean of the 20 native SSPs around lam (sigma sa, A),
 * into acc. *k0 is a search hint: the first native pixel at or above
 * lam - 4 sa for a previous, smaller lam. */
static void gather(const struct native *nv, double lam, double sa, long *k0, double *acc)
{
	const double lo = lam - 4 * sa, hi = lam + 4 * sa, inv = 1 / sa;
	double wsum = 0;
	long k = *k0;

	while (k > 0 && nv->wave[k - 1] >= lo)
		k--;
	while (k < SSP_NATIVE_N && nv->wave[k] < lo)
		k++;
	*k0 = k;
	memset(acc, 0, MTLZ_SYNTH_N_SSP * sizeof(*acc));
	for (; k < SSP_NATIVE_N && nv->wave[k] <= hi; k++) {
		const double d = (nv->wave[k] - lam) * inv;
		const double w = exp(-0.5 * d * d) * nv->dw[k];
		const float *f = nv->flux + (size_t)k * MTLZ_SYNTH_N_SSP;

		for (int i = 0; i < MTLZ_SYNTH_N_SSP; i++)
			acc[i] += w * f[i];
		wsum += w;
	}
	assert(wsum > 0);
	for (int i = 0; i < MTLZ_SYNTH_N_SSP; i++)
		acc[i] /= wsum;
}

static int load_native(const char *dir, struct native *nv, double *ell, char *errstr,
		       size_t errstr_size)
{
	char path[4096];
	double *buf = malloc(SSP_NATIVE_N * sizeof(double));
	int rc;

	if (!buf)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	snprintf(path, sizeof(path), "%s/SSP_Wavelength_Vacuum.fits", dir);
	rc = read_primary(path, 0, nv->wave, errstr, errstr_size);
	for (long k = 1; rc == MTLZ_OK && k < SSP_NATIVE_N; k++)
		if (!(nv->wave[k] > nv->wave[k - 1]))
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				      "%s: wavelengths not increasing at value %ld", path, k + 1);
	if (rc == MTLZ_OK && fabs(nv->wave[0] - 1680.2) > 2.0)
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			      "%s: first wavelength %.3f A; expected about 1680.7 (vacuum)",
			      path, nv->wave[0]);
	for (int i = 0; rc == MTLZ_OK && i < MTLZ_SYNTH_N_SSP; i++) {
		double sum = 0;
		int cnt = 0;

		snprintf(path, sizeof(path),
			 "%s/Ech1.30Z%sT%s_iPp0.00_baseFe_LIS5.0.fits.gz", dir,
			 ssp_metal_tag[i / N_AGES], ssp_age_tag[i % N_AGES]);
		rc = read_primary(path, 1, buf, errstr, errstr_size);
		for (long k = 0; rc == MTLZ_OK && k < SSP_NATIVE_N; k++) {
			nv->flux[(size_t)k * MTLZ_SYNTH_N_SSP + i] = (float)buf[k];
			if (nv->wave[k] >= 5450 && nv->wave[k] <= 5550) {
				sum += buf[k];
				cnt++;
			}
		}
		if (rc == MTLZ_OK && !(cnt > 0 && sum > 0))
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				      "%s: no positive flux at 5450-5550 A", path);
		if (rc == MTLZ_OK)
			ell[i] = sum / cnt;
	}
	for (long k = 0; rc == MTLZ_OK && k < SSP_NATIVE_N; k++)
		nv->dw[k] = k == 0 ? nv->wave[1] - nv->wave[0] :
			    k == SSP_NATIVE_N - 1 ? nv->wave[k] - nv->wave[k - 1] :
			    0.5 * (nv->wave[k + 1] - nv->wave[k - 1]);
	free(buf);
	return rc;
}

int mtlz_synth_opts_check(const mtlz_synth_opts *o, char *errstr, size_t errstr_size)
{
	double sum = 0;

	for (int c = 0; c < MTLZ_N_CLASSES; c++) {
		if (!isfinite(o->class_mix[c]) || o->class_mix[c] < 0)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"class mix: %s weight %g is not a number >= 0",
					mtlz_class_name(c), o->class_mix[c]);
		sum += o->class_mix[c];
	}
	if (!(sum > 0))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"class mix: all four weights are 0");
	if (!(o->sn_min > 0 && o->sn_min <= o->sn_max && o->sn_max <= 1000))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"S/N range %g..%g: need 0 < min <= max <= 1000", o->sn_min,
				o->sn_max);
	if (!(o->z_min >= 0 && o->z_min <= o->z_max && o->z_max <= 1))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"redshift range %g..%g: need 0 <= min <= max <= 1", o->z_min,
				o->z_max);
	return MTLZ_OK;
}

void mtlz_synth_opts_default(mtlz_synth_opts *o)
{
	memset(o, 0, sizeof(*o));
	for (int c = 0; c < MTLZ_N_CLASSES; c++)
		o->class_mix[c] = 1;
	o->sn_min = 5;
	o->sn_max = 30;
	o->z_min = 0.002;
	o->z_max = 0.3;
}

mtlz_synth *mtlz_synth_new(const char *ssp_dir, const mtlz_synth_opts *o, int n_threads,
			   char *errstr, size_t errstr_size)
{
	struct native *nv = NULL;
	mtlz_synth *g;
	double sum = 0;
	long j1;
	int rc;

	if (mtlz_synth_opts_check(o, errstr, errstr_size))
		return NULL;
	g = calloc(1, sizeof(*g));
	nv = calloc(1, sizeof(*nv));
	if (nv)
		nv->flux = malloc((size_t)SSP_NATIVE_N * MTLZ_SYNTH_N_SSP * sizeof(float));
	if (!g || !nv || !nv->flux) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out_free;
	}
	g->o = *o;
	for (int c = 0; c < MTLZ_N_CLASSES; c++)
		sum += o->class_mix[c];
	for (int c = 0; c < MTLZ_N_CLASSES; c++)
		g->class_cum[c] = (c ? g->class_cum[c - 1] : 0) + o->class_mix[c] / sum;
	g->log_sn_min = log(o->sn_min);
	g->log_sn_max = log(o->sn_max);
	for (int k = 0; k <= 1000; k++) {
		const double z = o->z_min + (o->z_max - o->z_min) * k / 1000.0;

		g->z_pdf_max = fmax(g->z_pdf_max, z_pdf(z));
	}
	g->z_pdf_max *= 1.02;   /* the grid may miss the peak by a little */
	zig_init(g);
	dist_init(g);
	obs_init(g);
	for (int l = 0; l < MTLZ_SYNTH_N_LINES; l++)
		g->line_alav[l] = cardelli_alav(line_wave[l]);
	g->calz_ha = calzetti_k(line_wave[MTLZ_LINE_HA]);

	rc = load_native(ssp_dir, nv, g->ell, errstr, errstr_size);
	if (rc)
		goto out_free;

	/* Rest grid covering the observed range at every allowed redshift,
	 * with a pixel to spare at both ends for the interpolation. */
	g->j0 = (long)floor(OBS_I0_MIN - log10(1 + o->z_max) / PIX_LOG) - 2;
	j1 = (long)ceil(OBS_I1_MAX - log10(1 + o->z_min) / PIX_LOG) + 2;
	g->n_rest = (int)(j1 - g->j0 + 1);
	g->ssp = malloc((size_t)N_SIG_BINS * MTLZ_SYNTH_N_SSP * g->n_rest * sizeof(float));
	g->calz = malloc((size_t)g->n_rest * sizeof(float));
	if (!g->ssp || !g->calz) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out_free;
	}
	for (int j = 0; j < g->n_rest; j++)
		g->calz[j] = (float)calzetti_k(pow(10.0, (g->j0 + j) * PIX_LOG));

	if (n_threads <= 0)
		n_threads = omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
	for (int b = 0; b < N_SIG_BINS; b++) {
		const double sig = SIG_MIN + SIG_STEP * b;
		float *dst = g->ssp + (size_t)b * MTLZ_SYNTH_N_SSP * g->n_rest;
		double acc[MTLZ_SYNTH_N_SSP];
		long k0 = 0;
		int cnt = 0;

		for (int j = 0; j < g->n_rest; j++) {
			const double lam = pow(10.0, (g->j0 + j) * PIX_LOG);

			gather(nv, lam, kernel_sigma_a(lam, sig), &k0, acc);
			for (int i = 0; i < MTLZ_SYNTH_N_SSP; i++)
				dst[(size_t)i * g->n_rest + j] = (float)(acc[i] / g->ell[i]);
		}
		/* The H-alpha pseudo-continuum of each SSP at this dispersion,
		 * sampled on the same log grid. */
		memset(g->ha_cont[b], 0, sizeof(g->ha_cont[b]));
		k0 = 0;
		for (int w = 0; w < 2; w++) {
			for (long p = (long)ceil(log10(ha_cont_win[w][0]) / PIX_LOG);
			     p * PIX_LOG <= log10(ha_cont_win[w][1]); p++) {
				const double lam = pow(10.0, p * PIX_LOG);

				gather(nv, lam, kernel_sigma_a(lam, sig), &k0, acc);
				for (int i = 0; i < MTLZ_SYNTH_N_SSP; i++)
					g->ha_cont[b][i] += acc[i] / g->ell[i];
				cnt++;
			}
		}
		for (int i = 0; i < MTLZ_SYNTH_N_SSP; i++)
			g->ha_cont[b][i] /= cnt;
	}
	free(nv->flux);
	free(nv);
	return g;

out_free:
	if (nv)
		free(nv->flux);
	free(nv);
	mtlz_synth_free(g);
	return NULL;
}

void mtlz_synth_free(mtlz_synth *g)
{
	if (!g)
		return;
	free(g->ssp);
	free(g->calz);
	free(g);
}

mtlz_synth_ws *mtlz_synth_ws_new(const mtlz_synth *g)
{
	mtlz_synth_ws *ws = calloc(1, sizeof(*ws));

	(void)g;
	if (!ws)
		return NULL;
	mtlz_spectrum_init(&ws->s);
	if (mtlz_spectrum_alloc(&ws->s, OBS_N_MAX, 1, 1, 0) != MTLZ_OK)
		goto out_free;
	ws->rest = malloc((OBS_N_MAX + 2) * sizeof(float));
	ws->model = malloc(OBS_N_MAX * sizeof(float));
	ws->cont = malloc(OBS_N_MAX * sizeof(float));
	ws->var = malloc(OBS_N_MAX * sizeof(float));
	ws->tmp = malloc(OBS_N_MAX * sizeof(float));
	if (!ws->rest || !ws->model || !ws->cont || !ws->var || !ws->tmp)
		goto out_free;
	return ws;

out_free:
	mtlz_synth_ws_free(ws);
	return NULL;
}

void mtlz_synth_ws_free(mtlz_synth_ws *ws)
{
	if (!ws)
		return;
	mtlz_spectrum_clear(&ws->s);
	free(ws->rest);
	free(ws->model);
	free(ws->cont);
	free(ws->var);
	free(ws->tmp);
	free(ws);
}

double mtlz_synth_line_wave(int line)
{
	return line >= 0 && line < MTLZ_SYNTH_N_LINES ? line_wave[line] : NAN;
}

const char *mtlz_synth_method(void)
{
	return "E-MILES SSP mix, Calzetti00/Cardelli89 dust; lines in Kauffmann03/Kewley01 "
	       "BPT regions; SF O/H = PP04 O3N2 (docs/synth.md)";
}

/* ---- drawing one galaxy ---------------------------------------------- */

/* The emission-line ratios (log10, dust-free) of the class: [N II]6584/Ha,
 * [O III]5007/Hb, [S II]6717+6731/Ha, [O I]6300/Ha, [O II]3727+3729/Hb. */
static void draw_ratios(const mtlz_synth *g, mtlz_rng *r, struct draw *d)
{
	const int liner = d->branch == MTLZ_SYNTH_AGN_LINER;
	double lo, hi;

	switch (d->cls) {
	case MTLZ_CLASS_STAR_FORMING: {
		/* O3N2 fixed by O/H (PP04 inverted); the point sits delta dex
		 * below the Kauffmann curve on that O3N2 line:
		 * o3 = K03(n2) - delta and o3 - n2 = O3N2, a quadratic in
		 * u = n2 - 0.05. */
		const double o3n2 = (8.73 - d->oh) / 0.32;
		const double delta = 0.2 + 0.3 * uni(r);
		const double b = o3n2 - 1.25 + delta;
		const double u = 0.5 * (-b - sqrt(b * b + 2.44));

		d->n2 = u + 0.05;
		d->o3 = o3n2 + d->n2;
		/* Below Kewley et al. (2001) in the [S II] and [O I] diagrams. */
		d->s2 = fmin(-0.55 + 0.1 * gauss(g, r), 0.32 + 0.72 / (d->o3 + 0.15 - 1.30));
		d->o1 = fmin(-1.6 + 0.15 * gauss(g, r), -0.59 + 0.73 / (d->o3 + 0.15 - 1.33));
		d->o2 = 0.45 - 0.5 * (d->oh - 8.5) + 0.08 * gauss(g, r);
		break;
	}
	case MTLZ_CLASS_COMPOSITE: {
		/* Between the curves, 30-70 % of the horizontal gap between
		 * Kauffmann (xk) and Kewley (xw) at the drawn [O III]/Hb. */
		double xk, xw;

		d->o3 = -0.5 + 0.8 * uni(r);
		xk = 0.05 + 0.61 / (d->o3 - 1.30);
		xw = 0.47 + 0.61 / (d->o3 - 1.19);
		d->n2 = xk + (0.3 + 0.4 * uni(r)) * (xw - xk);
		d->s2 = -0.4 + 0.1 * gauss(g, r);
		d->o1 = -1.3 + 0.15 * gauss(g, r);
		d->o2 = 0.4 + 0.1 * gauss(g, r);
		break;
	}
	default:   /* AGN, and the faint lines of some passive galaxies (LINER-like) */
		for (int k = 0;; k++) {
			if (liner) {
				d->n2 = 0.15 + 0.12 * gauss(g, r);
				d->o3 = 0.10 + 0.15 * gauss(g, r);
			} else {
				d->n2 = -0.05 + 0.15 * gauss(g, r);
				d->o3 = 0.85 + 0.15 * gauss(g, r);
			}
			/* 0.1 dex inside the AGN region in both ratios. */
			if (mtlz_bpt_class(d->n2 - 0.1, d->o3 - 0.1) == MTLZ_CLASS_AGN &&
			    fabs(d->n2) < 0.6 && d->o3 > -0.4 && d->o3 < 1.3)
				break;
			if (k == 32) {
				d->n2 = liner ? 0.2 : 0.0;
				d->o3 = liner ? 0.2 : 0.9;
				break;
			}
		}
		/* Seyfert above, LINER below the Kewley et al. (2006) lines in
		 * the [S II] and [O I] diagrams; both above Kewley et al. 2001. */
		if (liner) {
			lo = fmax((d->o3 + 0.05 - 0.76) / 1.89,
				  d->o3 - 0.05 < 1.30 ? 0.32 + 0.72 / (d->o3 - 0.05 - 1.30) : -9);
			d->s2 = fmax(0.0 + 0.1 * gauss(g, r), lo);
			lo = fmax((d->o3 + 0.05 - 1.30) / 1.18,
				  d->o3 - 0.05 < 1.33 ? -0.59 + 0.73 / (d->o3 - 0.05 - 1.33) : -9);
			d->o1 = fmax(-0.8 + 0.12 * gauss(g, r), lo);
			d->o2 = 0.6 + 0.15 * gauss(g, r);
		} else {
			/* For o3 in (0.4, 1.3) the Kewley 2001 bound lo stays
			 * below the Kewley 2006 bound hi. */
			hi = (d->o3 - 0.05 - 0.76) / 1.89;
			lo = d->o3 - 0.05 < 1.30 ? 0.32 + 0.72 / (d->o3 - 0.05 - 1.30) : -9;
			d->s2 = clampd(-0.3 + 0.1 * gauss(g, r), lo, hi);
			hi = (d->o3 - 0.05 - 1.30) / 1.18;
			lo = d->o3 - 0.05 < 1.33 ? -0.59 + 0.73 / (d->o3 - 0.05 - 1.33) : -9;
			d->o1 = clampd(-1.0 + 0.15 * gauss(g, r), lo, hi);
			d->o2 = 0.45 + 0.15 * gauss(g, r);
		}
		break;
	}
	d->sii_ratio = clampd(1.3 + 0.08 * gauss(g, r), 0.5, 1.45);   /* 6717/6731 */
	d->oii_ratio = clampd(1.35 + 0.1 * gauss(g, r), 0.35, 1.5);   /* 3729/3726 */
}

static void draw_galaxy(const mtlz_synth *g, mtlz_rng *r, struct draw *d)
{
	const double u_cls = uni(r);
	const double *md;
	double w[MTLZ_SYNTH_N_SSP] = { 0 }, wsum = 0, young = 0, sig;
	int n_comp, mbin;

	memset(d, 0, sizeof(*d));
	d->cls = -1;
	for (int c = 0; c < MTLZ_N_CLASSES; c++) {
		if (g->o.class_mix[c] <= 0)
			continue;
		d->cls = c;   /* the last class with weight, should rounding leave u_cls over */
		if (u_cls < g->class_cum[c])
			break;
	}
	md = mass_dist[d->cls];
	d->log_mass = trunc_normal(g, r, md[0], md[1], md[2], md[3]);

	/* Redshift: rejection from the SDSS-like p(z) inside the range. */
	d->z = g->o.z_min;
	for (int k = 0; k < 1000 && g->o.z_max > g->o.z_min; k++) {
		const double z = g->o.z_min + (g->o.z_max - g->o.z_min) * uni(r);

		if (uni(r) * g->z_pdf_max <= z_pdf(z) || k == 999) {
			d->z = z;
			break;
		}
	}
	d->sn_r = exp(g->log_sn_min + (g->log_sn_max - g->log_sn_min) * uni(r));

	/* Stellar populations: 2-5 SSPs, exponential light weights at 5500 A. */
	mbin = d->log_mass < 9.5 ? 0 : d->log_mass < 10.5 ? 1 : 2;
	n_comp = 2 + (int)(4 * uni(r));
	for (int c = 0; c < n_comp; c++) {
		int age = pick(r, age_pref[d->cls], N_AGES);
		const int met = pick(r, metal_pref[mbin], N_METALS);
		double x;

		if (d->cls == MTLZ_CLASS_STAR_FORMING && c == 0)
			age = uni(r) < 0.5 ? 0 : 1;   /* a young population */
		x = -log(uni_open(r));
		if (d->cls == MTLZ_CLASS_PASSIVE && age == 2)
			x *= 0.3;                      /* at most a small 1 Gyr share */
		w[met * N_AGES + age] += x;
	}
	for (int i = 0; i < MTLZ_SYNTH_N_SSP; i++)
		wsum += w[i];
	for (int i = 0; i < MTLZ_SYNTH_N_SSP; i++) {
		if (w[i] <= 0)
			continue;
		assert(d->n_comp < MAX_COMP);
		d->comp[d->n_comp] = i;
		d->frac[d->n_comp] = w[i] / wsum;
		if (i % N_AGES <= 1)
			young += w[i] / wsum;
		d->n_comp++;
	}

	/* Faber-Jackson-like dispersion, to the nearest bin. */
	sig = pow(10.0, 2.0 + 0.28 * (d->log_mass - 10) + 0.06 * gauss(g, r));
	d->bin = (int)lround((clampd(sig, SIG_MIN, SIG_MIN + SIG_STEP * (N_SIG_BINS - 1)) -
			      SIG_MIN) / SIG_STEP);
	d->sigma_star = SIG_MIN + SIG_STEP * d->bin;

	/* Dust: A_V of the gas (Cardelli, R_V = 3.1); the stars see
	 * E_s(B-V) = 0.44 E(B-V)_gas through Calzetti's law. */
	switch (d->cls) {
	case MTLZ_CLASS_STAR_FORMING:
		d->av_gas = clampd(0.9 + 0.5 * (d->log_mass - 10) + 0.35 * gauss(g, r), 0, 3);
		break;
	case MTLZ_CLASS_COMPOSITE:
		d->av_gas = clampd(1.2 + 0.4 * gauss(g, r), 0, 3);
		break;
	case MTLZ_CLASS_AGN:
		d->av_gas = clampd(0.9 + 0.4 * gauss(g, r), 0, 3);
		break;
	default:
		d->av_gas = clampd(0.3 + 0.25 * gauss(g, r), 0, 1.2);
		break;
	}
	d->e_star = 0.44 * d->av_gas / 3.1;

	/* Emission lines. */
	d->has_lines = 1;
	switch (d->cls) {
	case MTLZ_CLASS_STAR_FORMING:
		d->oh = trunc_normal(g, r, mzr_am13(d->log_mass), 0.08, 8.15, 8.80);
		d->ew_ha = pow(10.0, clampd(0.8 + young + 0.2 * gauss(g, r), 0.5, 2.5));
		d->sigma_gas = 40 + 70 * uni(r);
		break;
	case MTLZ_CLASS_COMPOSITE:
		d->ew_ha = pow(10.0, trunc_normal(g, r, 1.05, 0.2, 0.7, 1.8));
		d->sigma_gas = 60 + 90 * uni(r);
		break;
	case MTLZ_CLASS_AGN:
		d->branch = uni(r) < 0.5 ? MTLZ_SYNTH_AGN_SEYFERT : MTLZ_SYNTH_AGN_LINER;
		d->ew_ha = d->branch == MTLZ_SYNTH_AGN_SEYFERT ?
			   pow(10.0, trunc_normal(g, r, 1.25, 0.25, 0.7, 2.0)) :
			   pow(10.0, trunc_normal(g, r, 0.6, 0.15, 0.3, 0.95));
		d->sigma_gas = 120 + 80 * uni(r);
		break;
	default:   /* passive: no lines, or lines far below detection */
		d->has_lines = uni(r) < 0.4;
		d->branch = MTLZ_SYNTH_AGN_LINER;   /* the shape of the faint lines */
		d->ew_ha = d->has_lines ? 0.01 + 0.04 * uni(r) : 0;
		d->sigma_gas = 80 + 120 * uni(r);
		break;
	}
	if (d->has_lines)
		draw_ratios(g, r, d);
	if (d->cls == MTLZ_CLASS_PASSIVE)
		d->branch = MTLZ_SYNTH_AGN_NONE;

	/* Observation: fibre light fraction, sky level, grid ends. */
	d->fib = 0.2 + 0.3 * uni(r);
	d->sky_q = exp(log(0.3) + (log(3.0) - log(0.3)) * uni(r));
	d->i0 = OBS_I0_MIN + (int)((OBS_I0_MAX - OBS_I0_MIN + 1) * uni(r));
	d->i1 = OBS_I1_MIN + (int)((OBS_I1_MAX - OBS_I1_MIN + 1) * uni(r));
}

/* ---- rendering -------------------------------------------------------- */

static void swapf(float *a, float *b)
{
	const float t = *a;

	*a = *b;
	*b = t;
}

/* The element of rank n/2 of x[0..n), finite values (Wirth's selection;
 * x is reordered). */
static float median(float *x, int n)
{
	const int k = n / 2;
	int lo = 0, hi = n - 1;

	assert(n > 0);
	while (lo < hi) {
		const float piv = x[k];
		int i = lo, j = hi;

		do {
			while (x[i] < piv)
				i++;
			while (piv < x[j])
				j--;
			if (i <= j)
				swapf(&x[i++], &x[j--]);
		} while (i <= j);
		if (j < k)
			lo = i;
		if (k < i)
			hi = j;
	}
	return x[k];
}

static void put_line(const mtlz_synth *g, float *m, const struct draw *d, double flux,
		     double lam_rest, double sig_kms)
{
	/* A Gaussian in velocity is a Gaussian of constant width in log10
	 * lambda: work in pixels, integrate over each pixel (erf at its
	 * edges) and divide by the pixel's width in A, so the line's flux is
	 * exact whatever its width. */
	const int n = d->i1 - d->i0 + 1;
	const double pc = log10(lam_rest * (1 + d->z)) / PIX_LOG - d->i0;
	const double sp = sig_kms / PIX_KMS, inv = 1 / (sp * sqrt(2.0));
	const int half = (int)ceil(6 * sp) + 1;
	const int a = MTLZ_MAX((int)floor(pc) - half, 0), b = MTLZ_MIN((int)ceil(pc) + half, n - 1);
	const double *edge = g->edge + (d->i0 - OBS_I0_MIN);
	double e_lo;

	if (flux <= 0 || a > b)
		return;
	e_lo = erf((a - 0.5 - pc) * inv);
	for (int i = a; i <= b; i++) {
		const double e_hi = erf((i + 0.5 - pc) * inv);

		m[i] += (float)(flux * 0.5 * (e_hi - e_lo) / (edge[i + 1] - edge[i]));
		e_lo = e_hi;
	}
}

static void render(const mtlz_synth *g, mtlz_synth_ws *ws, const struct draw *d,
		   mtlz_rng *r, mtlz_synth_truth *t, int *n_masked)
{
	const int n = d->i1 - d->i0 + 1;
	const double p = (double)(d->i0 - g->j0) - log10(1 + d->z) / PIX_LOG;
	const long jb = (long)floor(p);
	const double fr = p - (double)jb;
	const float *ssp = g->ssp + (size_t)d->bin * MTLZ_SYNTH_N_SSP * g->n_rest;
	const int off = d->i0 - OBS_I0_MIN;
	float *rest = ws->rest, *m = ws->model, *var = ws->var, *tmp = ws->tmp;
	mtlz_spectrum *s = &ws->s;
	double ml = 0, ha_cont = 0, scale, sc, dl, m_r, rho, kappa;
	int k;

	assert(jb >= 0 && jb + n < g->n_rest);
	assert(n <= OBS_N_MAX);

	/* Continuum: the light-weighted SSP mixture on rest pixels jb..jb+n. */
	memset(rest, 0, (size_t)(n + 1) * sizeof(float));
	for (int c = 0; c < d->n_comp; c++) {
		const float *src = ssp + (size_t)d->comp[c] * g->n_rest + jb;
		const float w = (float)d->frac[c];

		for (int j = 0; j <= n; j++)
			rest[j] += w * src[j];
		ml += d->frac[c] / g->ell[d->comp[c]];
		ha_cont += d->frac[c] * g->ha_cont[d->bin][d->comp[c]];
	}
	/* Dust on the stars: the factor is smooth, so exp() every 16 pixels
	 * and linear in between (error < 1e-4). */
	if (d->e_star > 0) {
		const double a = -0.4 * LN10 * d->e_star;
		const float *kc = g->calz + jb;
		double att0 = exp(a * kc[0]);

		for (int j0 = 0; j0 < n; j0 += 16) {
			const int j1 = MTLZ_MIN(j0 + 16, n);
			const double att1 = exp(a * kc[j1]);
			const double step = (att1 - att0) / (j1 - j0);

			for (int j = j0; j < j1; j++)
				rest[j] *= (float)(att0 + step * (j - j0));
			att0 = att1;
		}
		rest[n] *= (float)att0;
		ha_cont *= exp(a * g->calz_ha);
	}
	/* Physical flux (1e-17 erg/s/cm2/A): mass over M/L, the fibre's share,
	 * the luminosity distance; F_obs(lambda) = L(lambda / (1+z)) / (1+z). */
	/* At z -> 0 peculiar velocities dominate: no nearer than 10 Mpc. */
	dl = fmax(lum_dist_mpc(g, d->z), 10.0) * MPC_CM;
	scale = pow(10.0, d->log_mass) / ml * LSUN_ERG_S * d->fib / (4 * PI * dl * dl) * 1e17;
	sc = scale / (1 + d->z);
	{
		const float w0 = (float)(sc * (1 - fr)), w1 = (float)(sc * fr);

		for (int i = 0; i < n; i++)
			m[i] = w0 * rest[i] + w1 * rest[i + 1];
	}
	memcpy(ws->cont, m, (size_t)n * sizeof(float));

	/* Emission lines. */
	memset(t->line_flux, 0, sizeof(t->line_flux));
	if (d->has_lines && d->ew_ha > 0) {
		const double ha_obs = d->ew_ha * ha_cont * scale;
		const double ha = ha_obs * pow(10.0, 0.4 * d->av_gas * g->line_alav[MTLZ_LINE_HA]);
		const double hb = ha / BALMER_HA_HB, oiii = pow(10.0, d->o3) * hb;
		const double nii = pow(10.0, d->n2) * ha, sii = pow(10.0, d->s2) * ha;
		const double oii = pow(10.0, d->o2) * hb;
		const double sig = sqrt(d->sigma_gas * d->sigma_gas +
					SIGMA_INST_KMS * SIGMA_INST_KMS);
		double *lf = t->line_flux;

		lf[MTLZ_LINE_OII_3727] = oii / (1 + d->oii_ratio);
		lf[MTLZ_LINE_OII_3730] = oii * d->oii_ratio / (1 + d->oii_ratio);
		lf[MTLZ_LINE_HD] = BALMER_HD_HB * hb;
		lf[MTLZ_LINE_HG] = BALMER_HG_HB * hb;
		lf[MTLZ_LINE_HB] = hb;
		lf[MTLZ_LINE_OIII_4959] = oiii / OIII_5007_4959;
		lf[MTLZ_LINE_OIII_5007] = oiii;
		lf[MTLZ_LINE_OI_6300] = pow(10.0, d->o1) * ha;
		lf[MTLZ_LINE_NII_6548] = nii / NII_6584_6548;
		lf[MTLZ_LINE_HA] = ha;
		lf[MTLZ_LINE_NII_6584] = nii;
		lf[MTLZ_LINE_SII_6717] = sii * d->sii_ratio / (1 + d->sii_ratio);
		lf[MTLZ_LINE_SII_6731] = sii / (1 + d->sii_ratio);
		for (int l = 0; l < MTLZ_SYNTH_N_LINES; l++) {
			lf[l] *= pow(10.0, -0.4 * d->av_gas * g->line_alav[l]);
			put_line(g, m, d, lf[l], line_wave[l], sig);
		}
	}

	/* Noise: source and sky photons through the throughput,
	 * var = kappa^2 (m / T + q m_r sky / T^2), kappa such that the median
	 * of m / sigma over the r window is the drawn S/N_r. */
	k = 0;
	for (int i = g->r_lo - d->i0; i <= g->r_hi - d->i0; i++)
		tmp[k++] = m[i];
	m_r = median(tmp, k);
	{
		const float qm = (float)(d->sky_q * m_r);
		const float *thr = g->thr + off, *sky = g->sky + off;

		for (int i = 0; i < n; i++) {
			const float it = 1 / thr[i];

			var[i] = (m[i] > 0 ? m[i] : 0) * it + qm * sky[i] * it * it;
		}
	}
	k = 0;
	for (int i = g->r_lo - d->i0; i <= g->r_hi - d->i0; i++)
		tmp[k++] = m[i] / sqrtf(var[i]);
	rho = median(tmp, k);
	kappa = rho / d->sn_r;
	{
		/* The resampled rest spectrum is spent: its buffer takes the
		 * normal deviates, so that the loop below vectorises. */
		float *nrm = rest;
		const float kf = (float)kappa, ik2 = (float)(1 / (kappa * kappa));

		for (int i = 0; i < n; i++)
			nrm[i] = (float)gauss(g, r);
		for (int i = 0; i < n; i++) {
			s->flux[i] = m[i] + kf * sqrtf(var[i]) * nrm[i];
			s->ivar[i] = ik2 / var[i];
			s->and_mask[i] = g->bright[off + i] ? MTLZ_SYNTH_MASK_BRIGHTSKY : 0;
		}
	}
	/* Median S/N over all pixels (SN_MEDIAN_ALL), from every 4th. */
	k = 0;
	for (int i = 0; i < n; i += 4)
		tmp[k++] = m[i] * sqrtf(s->ivar[i]);
	s->sn = median(tmp, k);

	/* A few rejected pixels (cosmic rays, bad columns): 0-3 runs of 1-4. */
	*n_masked = 0;
	for (int runs = pick(r, (const double[]){ 0.4, 0.3, 0.2, 0.1 }, 4); runs > 0; runs--) {
		const int at = (int)(n * uni(r)), len = 1 + (int)(4 * uni(r));

		for (int i = at; i < at + len && i < n; i++) {
			*n_masked += !(s->and_mask[i] & MTLZ_SYNTH_MASK_FULLREJECT);
			s->and_mask[i] |= MTLZ_SYNTH_MASK_FULLREJECT;
			s->ivar[i] = 0;
			s->flux[i] = 0;
		}
	}
	s->n = (size_t)n;
}

/* ---- labels ------------------------------------------------------------ */

static void fill_labels(const mtlz_synth *g, const struct draw *d, uint64_t index,
			const mtlz_synth_truth *t, int n_masked, mtlz_labels *l)
{
	char buf[96];
	size_t len = 0;
	double age_lw = 0, mh_lw = 0;

	mtlz_labels_init(l);
	l->cls = d->cls;
	l->oh = d->cls == MTLZ_CLASS_STAR_FORMING ? d->oh : NAN;
	l->log_mass = d->log_mass;
	l->z = d->z;
	l->sn_r = d->sn_r;
	snprintf(l->source_name, sizeof(l->source_name), "synthetic");
	snprintf(l->source_version, sizeof(l->source_version), "%s", MTLZ_SYNTH_VERSION);
	snprintf(l->source_method, sizeof(l->source_method), "%s", mtlz_synth_method());

	buf[0] = '\0';
	for (int c = 0; c < d->n_comp; c++) {
		const int i = d->comp[c];

		age_lw += d->frac[c] * log10(ssp_age_gyr[i % N_AGES]);
		mh_lw += d->frac[c] * ssp_metal[i / N_AGES];
		len += (size_t)snprintf(buf + len, sizeof(buf) - len, "%s%d:%.3f", c ? "," : "",
					i, d->frac[c]);
	}
	mtlz_labels_kv_add(l->params, &l->n_params, "seed", "%" PRIu64, g->o.seed);
	mtlz_labels_kv_add(l->params, &l->n_params, "index", "%" PRIu64, index);
	mtlz_labels_kv_add(l->params, &l->n_params, "ssp_light_5500", "%s", buf);
	mtlz_labels_kv_add(l->params, &l->n_params, "age_lw_gyr", "%.3g", pow(10.0, age_lw));
	mtlz_labels_kv_add(l->params, &l->n_params, "mh_lw", "%.3f", mh_lw);
	mtlz_labels_kv_add(l->params, &l->n_params, "sigma_star_kms", "%.0f", d->sigma_star);
	mtlz_labels_kv_add(l->params, &l->n_params, "av_gas", "%.3f", t->av_gas);
	mtlz_labels_kv_add(l->params, &l->n_params, "av_star", "%.3f", t->av_star);
	mtlz_labels_kv_add(l->params, &l->n_params, "ew_ha", "%.4g", t->ew_ha);
	if (d->has_lines) {
		mtlz_labels_kv_add(l->params, &l->n_params, "sigma_gas_kms", "%.0f", d->sigma_gas);
		mtlz_labels_kv_add(l->params, &l->n_params, "flux_ha", "%.4g",
				   t->line_flux[MTLZ_LINE_HA]);
		mtlz_labels_kv_add(l->params, &l->n_params, "flux_hb", "%.4g",
				   t->line_flux[MTLZ_LINE_HB]);
		mtlz_labels_kv_add(l->params, &l->n_params, "log_nii_ha", "%.4f", d->n2);
		mtlz_labels_kv_add(l->params, &l->n_params, "log_oiii_hb", "%.4f", d->o3);
		mtlz_labels_kv_add(l->params, &l->n_params, "log_sii_ha", "%.4f", d->s2);
		mtlz_labels_kv_add(l->params, &l->n_params, "log_oi_ha", "%.4f", d->o1);
		mtlz_labels_kv_add(l->params, &l->n_params, "log_oii_hb", "%.4f", d->o2);
	}
	if (d->cls == MTLZ_CLASS_AGN)
		mtlz_labels_kv_add(l->params, &l->n_params, "agn_branch", "%s",
				   d->branch == MTLZ_SYNTH_AGN_SEYFERT ? "seyfert" : "liner");
	mtlz_labels_kv_add(l->params, &l->n_params, "fiber_frac", "%.3f", d->fib);
	mtlz_labels_kv_add(l->params, &l->n_params, "sky_ratio", "%.3f", d->sky_q);
	mtlz_labels_kv_add(l->params, &l->n_params, "n_masked", "%d", n_masked);
}

void mtlz_synth_make(const mtlz_synth *g, mtlz_synth_ws *ws, uint64_t index,
		     const mtlz_spectrum **s, const mtlz_labels **labels,
		     const mtlz_synth_truth **truth)
{
	mtlz_synth_truth *t = &ws->truth;
	struct draw d;
	mtlz_rng r;
	uint64_t key;
	int n_masked;

	/* The stream of (seed, index): a bijection of index for a given
	 * seed, then splitmix64 inside mtlz_rng_seed. */
	key = g->o.seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
	key = (key ^ (key >> 31)) * 0xBF58476D1CE4E5B9ull;
	key ^= index * 0xD1B54A32D192ED03ull;
	mtlz_rng_seed(&r, key);

	draw_galaxy(g, &r, &d);
	memset(t, 0, sizeof(*t));
	t->agn_branch = d.branch;
	t->ew_ha = d.ew_ha;
	t->av_gas = d.av_gas;
	t->av_star = 4.05 * d.e_star;
	t->sigma_star = d.sigma_star;
	t->sigma_gas = d.has_lines ? d.sigma_gas : 0;
	t->log_nii_ha = d.has_lines ? d.n2 : NAN;
	t->log_oiii_hb = d.has_lines ? d.o3 : NAN;
	render(g, ws, &d, &r, t, &n_masked);
	t->model = ws->model;
	t->continuum = ws->cont;

	snprintf(ws->s.spec_id, sizeof(ws->s.spec_id), "synth-%" PRIu64 "-%" PRIu64,
		 g->o.seed, index);
	snprintf(ws->s.survey, sizeof(ws->s.survey), "synthetic");
	snprintf(ws->s.source, sizeof(ws->s.source), "mtlz synth --seed %" PRIu64 " [%" PRIu64 "]",
		 g->o.seed, index);
	ws->s.z = d.z;
	ws->s.zwarning = 0;
	ws->s.grid_kind = MTLZ_GRID_LOGLAM;
	ws->s.start = d.i0 * PIX_LOG;
	ws->s.step = PIX_LOG;
	fill_labels(g, &d, index, t, n_masked, &ws->labels);

	*s = &ws->s;
	*labels = &ws->labels;
	if (truth)
		*truth = t;
}
