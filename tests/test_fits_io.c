/*
 * test_fits_io.c - Criterion tests for fits_io (core/fits_io.h).
 *
 * The survey fixtures in MTLZ_TEST_DATA are checked against values read
 * independently with cfitsio here, in the test; behaviours the real files
 * do not exercise (masked DESI pixels, arms off a common grid, SDSS files
 * without COEFF keywords or with a non-uniform loglam) use small synthetic
 * files written with cfitsio into a per-test temporary directory, as are
 * the broken files (truncated, random bytes, primary HDU only).
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>

#include "common.h"
#include "fits_io.h"

#include <dirent.h>
#include <fitsio.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SDSS_FULL MTLZ_TEST_DATA "/spec-0266-51602-0001.fits"
#define SDSS_FULL2 MTLZ_TEST_DATA "/spec-0266-51630-0174.fits"
#define SDSS_LITE MTLZ_TEST_DATA "/spec-0266-51602-0573.fits"
#define BOSS_FILE MTLZ_TEST_DATA "/spec-3586-55181-0003.fits"
#define DESI_COADD MTLZ_TEST_DATA "/coadd-4-80613.fits"
#define DESI_REDROCK MTLZ_TEST_DATA "/redrock-4-80613.fits"

static char tmpdir[128];
static char errstr[512];

static void setup(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/mtlz_fits_io_XXXXXX");
	cr_assert_not_null(mkdtemp(tmpdir));
	errstr[0] = '\0';
}

static void teardown(void)
{
	DIR *d = opendir(tmpdir);
	struct dirent *e;
	char p[512];

	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(p, sizeof(p), "%s/%s", tmpdir, e->d_name);
		unlink(p);
	}
	if (d)
		closedir(d);
	rmdir(tmpdir);
}

TestSuite(fits_io, .init = setup, .fini = teardown);

static const char *tmp_path(const char *name)
{
	static char p[4][512];
	static int k;

	k = (k + 1) % 4;
	snprintf(p[k], sizeof(p[k]), "%s/%s", tmpdir, name);
	return p[k];
}

/* ---- independent cfitsio reads ---------------------------------- */

static fitsfile *fx_open(const char *path, const char *hdu)
{
	fitsfile *f;
	int st = 0;

	fits_open_diskfile(&f, path, READONLY, &st);
	if (hdu)
		fits_movnam_hdu(f, ANY_HDU, (char *)hdu, 0, &st);
	cr_assert_eq(st, 0, "%s[%s]: cfitsio %d", path, hdu ? hdu : "", st);
	return f;
}

static void fx_close(fitsfile *f)
{
	int st = 0;

	fits_close_file(f, &st);
}

static long fx_nrows(const char *path, const char *hdu)
{
	fitsfile *f = fx_open(path, hdu);
	long n = 0;
	int st = 0;

	fits_get_num_rows(f, &n, &st);
	fx_close(f);
	cr_assert_eq(st, 0);
	return n;
}

/* Reads n elements of column `col` (case-insensitive) from row 1 on. */
static void fx_col(const char *path, const char *hdu, const char *col,
		   int type, long n, void *dst)
{
	fitsfile *f = fx_open(path, hdu);
	int st = 0, c;

	fits_get_colnum(f, CASEINSEN, (char *)col, &c, &st);
	fits_read_col(f, type, c, 1, 1, n, NULL, dst, NULL, &st);
	fx_close(f);
	cr_assert_eq(st, 0, "%s[%s] %s: cfitsio %d", path, hdu, col, st);
}

/* Reads n pixels of an image HDU starting at pixel `first` (1-based). */
static void fx_img(const char *path, const char *hdu, int type, long first,
		   long n, void *dst)
{
	fitsfile *f = fx_open(path, hdu);
	int st = 0;

	fits_read_img(f, type, first, n, NULL, dst, NULL, &st);
	fx_close(f);
	cr_assert_eq(st, 0, "%s[%s]: cfitsio %d", path, hdu, st);
}

static long fx_img_len(const char *path, const char *hdu)
{
	fitsfile *f = fx_open(path, hdu);
	long n = 0;
	int st = 0;

	fits_get_img_size(f, 1, &n, &st);
	fx_close(f);
	return n;
}

/* Reads a fixture expecting success and exactly `n` spectra. */
static void read_ok(const char *path, mtlz_spectra *sp, size_t n)
{
	int rc = mtlz_fits_read(path, sp, errstr, sizeof(errstr));

	cr_assert_eq(rc, MTLZ_OK, "%s: rc %d: %s", path, rc, errstr);
	cr_assert_eq(sp->n, n, "%s: %zu spectra, expected %zu", path, sp->n, n);
}

/* ---- SDSS / BOSS fixtures ---------------------------------------- */

Test(fits_io, sdss_full_file_gives_one_spectrum_on_loglam_grid)
{
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;

	read_ok(SDSS_FULL, &sp, 1);
	s = &sp.v[0];
	cr_assert_eq(s->n, 3835);
	cr_assert_eq(s->grid_kind, MTLZ_GRID_LOGLAM);
	cr_assert_float_eq(s->step, 1e-4, 1e-9);
	cr_assert_null(s->wave);
	cr_assert_not_null(s->flux);
	cr_assert_not_null(s->ivar);
	cr_assert_not_null(s->and_mask);
	cr_assert_str_eq(s->survey, "sdss");
	cr_assert_str_eq(s->spec_id, "299489676975171584");
	cr_assert_str_eq(s->source, SDSS_FULL);
	mtlz_spectra_free(&sp);
}

Test(fits_io, sdss_full_file_carries_specobj_redshift_and_sn)
{
	mtlz_spectra sp = { 0 };

	read_ok(SDSS_FULL, &sp, 1);
	cr_assert_float_eq(sp.v[0].z, 0.0213, 1e-3);
	cr_assert_eq(sp.v[0].zwarning, 0);
	cr_assert_float_eq(sp.v[0].sn, 38.1, 0.1);
	mtlz_spectra_free(&sp);
}

Test(fits_io, sdss_wavelengths_match_loglam_column)
{
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;
	double *ll = calloc(3835, sizeof(*ll));

	read_ok(SDSS_FULL, &sp, 1);
	s = &sp.v[0];
	fx_col(SDSS_FULL, "COADD", "loglam", TDOUBLE, 3835, ll);
	/* loglam is float32: half an ulp at 3.58 is 1.2e-7 dex, 0.99e-3 A at
	 * 3806 A here, so pixel 0 just meets 1e-3 A; further pixels are
	 * compared in log space, where the float rounding is uniform. */
	cr_assert_float_eq(mtlz_spectrum_wave(s, 0), pow(10.0, ll[0]), 1e-3);
	for (size_t k = 0; k < s->n; k += 383)
		cr_assert_float_eq(log10(mtlz_spectrum_wave(s, k)), ll[k], 2.5e-7,
				   "pixel %zu", k);
	free(ll);
	mtlz_spectra_free(&sp);
}

Test(fits_io, sdss_flux_ivar_and_mask_match_coadd_columns)
{
	static const size_t ks[] = { 0, 1, 1000, 2500, 3834 };
	mtlz_spectra sp = { 0 };
	float *flux = calloc(3835, sizeof(*flux)), *ivar = calloc(3835, sizeof(*ivar));
	int *mask = calloc(3835, sizeof(*mask));

	read_ok(SDSS_FULL, &sp, 1);
	fx_col(SDSS_FULL, "COADD", "flux", TFLOAT, 3835, flux);
	fx_col(SDSS_FULL, "COADD", "ivar", TFLOAT, 3835, ivar);
	fx_col(SDSS_FULL, "COADD", "and_mask", TINT, 3835, mask);
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(ks); i++) {
		size_t k = ks[i];

		cr_assert_eq(sp.v[0].flux[k], flux[k], "flux[%zu]", k);
		cr_assert_eq(sp.v[0].ivar[k], ivar[k], "ivar[%zu]", k);
		cr_assert_eq(sp.v[0].and_mask[k], (uint32_t)mask[k], "mask[%zu]", k);
	}
	free(flux);
	free(ivar);
	free(mask);
	mtlz_spectra_free(&sp);
}

Test(fits_io, sdss_lite_file_reads_like_full_file)
{
	mtlz_spectra sp = { 0 };

	read_ok(SDSS_LITE, &sp, 1);
	cr_assert_eq(sp.v[0].n, 3832);
	cr_assert_eq(sp.v[0].grid_kind, MTLZ_GRID_LOGLAM);
	cr_assert_float_eq(sp.v[0].z, 0.262, 1e-3);
	cr_assert_float_eq(sp.v[0].sn, 5.4, 0.1);
	cr_assert_str_eq(sp.v[0].spec_id, "299646907137943552");
	mtlz_spectra_free(&sp);
}

Test(fits_io, sdss_second_epoch_file_has_its_own_redshift)
{
	mtlz_spectra sp = { 0 };

	read_ok(SDSS_FULL2, &sp, 1);
	cr_assert_eq(sp.v[0].n, 3809);
	cr_assert_float_eq(sp.v[0].z, 0.0216, 1e-3);
	cr_assert_float_eq(sp.v[0].sn, 41.4, 0.1);
	mtlz_spectra_free(&sp);
}

Test(fits_io, boss_file_reads_spall_hdu)
{
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;
	long long id;
	char want[32];

	read_ok(BOSS_FILE, &sp, 1);
	s = &sp.v[0];
	cr_assert_eq(s->n, 4625);
	cr_assert_eq(s->grid_kind, MTLZ_GRID_LOGLAM);
	cr_assert_float_eq(s->step, 1e-4, 1e-9);
	cr_assert_eq(s->zwarning, 4);
	cr_assert_float_eq(s->z, 0.589, 1e-3);
	cr_assert_float_eq(s->sn, 2.15, 0.01);  /* SPALL has SN_MEDIAN_ALL */
	cr_assert_str_eq(s->survey, "boss");
	/* SPECOBJID is a 64-bit integer column here, a string in SPECOBJ. */
	fx_col(BOSS_FILE, "SPALL", "SPECOBJID", TLONGLONG, 1, &id);
	snprintf(want, sizeof(want), "%lld", id);
	cr_assert_str_eq(s->spec_id, want);
	cr_assert(mtlz_spectrum_wave(s, s->n - 1) > 10000.0);
	mtlz_spectra_free(&sp);
}

Test(fits_io, reads_append_to_existing_array)
{
	mtlz_spectra sp = { 0 };

	read_ok(SDSS_FULL, &sp, 1);
	cr_assert_eq(mtlz_fits_read(BOSS_FILE, &sp, errstr, sizeof(errstr)), 0);
	cr_assert_eq(sp.n, 2);
	cr_assert_eq(sp.v[0].n, 3835);
	cr_assert_eq(sp.v[1].n, 4625);
	mtlz_spectra_free(&sp);
}

/* ---- DESI fixture ------------------------------------------------ */

struct arm_raw {
	const char *name;
	long n, off;      /* pixels, first pixel on the merged 0.8 A grid */
	double w0;
	float *flux, *ivar;
	int *mask;
};

/* Reads target t of one arm of the DESI fixture, straight from the file. */
static void arm_raw_read(struct arm_raw *a, const char *name, long t)
{
	char hdu[32];

	a->name = name;
	snprintf(hdu, sizeof(hdu), "%s_WAVELENGTH", name);
	a->n = fx_img_len(DESI_COADD, hdu);
	fx_img(DESI_COADD, hdu, TDOUBLE, 1, 1, &a->w0);
	a->off = lround((a->w0 - 3600.0) / 0.8);
	a->flux = calloc((size_t)a->n, sizeof(float));
	a->ivar = calloc((size_t)a->n, sizeof(float));
	a->mask = calloc((size_t)a->n, sizeof(int));
	snprintf(hdu, sizeof(hdu), "%s_FLUX", name);
	fx_img(DESI_COADD, hdu, TFLOAT, t * a->n + 1, a->n, a->flux);
	snprintf(hdu, sizeof(hdu), "%s_IVAR", name);
	fx_img(DESI_COADD, hdu, TFLOAT, t * a->n + 1, a->n, a->ivar);
	snprintf(hdu, sizeof(hdu), "%s_MASK", name);
	fx_img(DESI_COADD, hdu, TINT, t * a->n + 1, a->n, a->mask);
}

static void arm_raw_free(struct arm_raw *a)
{
	free(a->flux);
	free(a->ivar);
	free(a->mask);
}

Test(fits_io, desi_coadd_gives_one_spectrum_per_fibermap_row)
{
	long n_targets = fx_nrows(DESI_COADD, "FIBERMAP");
	long long *tid = calloc((size_t)n_targets, sizeof(*tid));
	mtlz_spectra sp = { 0 };
	char want[64];

	cr_assert_gt(n_targets, 0);
	fx_col(DESI_COADD, "FIBERMAP", "TARGETID", TLONGLONG, n_targets, tid);
	read_ok(DESI_COADD, &sp, (size_t)n_targets);
	for (long t = 0; t < n_targets; t++) {
		const mtlz_spectrum *s = &sp.v[t];

		snprintf(want, sizeof(want), "%lld", tid[t]);
		cr_assert_str_eq(s->spec_id, want);
		cr_assert_str_eq(s->survey, "desi");
		snprintf(want, sizeof(want), "[%ld]", t);
		cr_assert(strstr(s->source, want) != NULL, "source %s", s->source);
		cr_assert_eq(s->grid_kind, MTLZ_GRID_LINEAR);
		cr_assert_float_eq(s->step, 0.8, 1e-9);
		cr_assert_leq(mtlz_spectrum_wave(s, 0), 3600.0 + 1e-9);
		cr_assert_geq(mtlz_spectrum_wave(s, s->n - 1), 9800.0);
		cr_assert_not_null(s->ivar);
		cr_assert_not_null(s->and_mask);
	}
	free(tid);
	mtlz_spectra_free(&sp);
}

/* Merged pixel j of target 0 against the raw arms: a pixel one arm covers
 * alone is copied bit for bit; an overlap is the ivar-weighted mean. */
Test(fits_io, desi_arms_merge_with_inverse_variance_weights)
{
	struct arm_raw arm[3];
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;
	long n_overlap = 0, n_single = 0;

	arm_raw_read(&arm[0], "B", 0);
	arm_raw_read(&arm[1], "R", 0);
	arm_raw_read(&arm[2], "Z", 0);
	read_ok(DESI_COADD, &sp, (size_t)fx_nrows(DESI_COADD, "FIBERMAP"));
	s = &sp.v[0];
	for (size_t j = 0; j < s->n; j++) {
		double sw = 0, swf = 0, sf = 0, want;
		int n_cover = 0, last = -1;

		for (int a = 0; a < 3; a++) {
			long i = (long)j - arm[a].off;
			double w;

			if (i < 0 || i >= arm[a].n)
				continue;
			w = arm[a].mask[i] ? 0.0 : arm[a].ivar[i];
			sw += w;
			swf += w * arm[a].flux[i];
			sf += arm[a].flux[i];
			n_cover++;
			last = a;
		}
		cr_assert_gt(n_cover, 0, "pixel %zu covered by no arm", j);
		if (n_cover == 1) {
			long i = (long)j - arm[last].off;

			cr_assert_eq(s->flux[j], arm[last].flux[i], "%s pixel %zu",
				     arm[last].name, j);
			n_single++;
			continue;
		}
		n_overlap++;
		want = sw > 0 ? swf / sw : sf / n_cover;
		cr_assert_float_eq(s->flux[j], want, 1e-6 * fabs(want) + 1e-30,
				   "overlap pixel %zu", j);
		cr_assert_float_eq(s->ivar[j], sw, 1e-6 * sw, "overlap pixel %zu", j);
	}
	/* B/R share 5760-5800 A (51 px), R/Z 7520-7620 A (126 px). */
	cr_assert_eq(n_overlap, 51 + 126);
	cr_assert_eq(n_single + n_overlap, (long)s->n);
	/* A B-only pixel: 4000 A is pixel 500 of B and of the merged grid. */
	cr_assert_eq(s->flux[500], arm[0].flux[500]);
	cr_assert_eq(s->ivar[500], arm[0].ivar[500]);
	for (int a = 0; a < 3; a++)
		arm_raw_free(&arm[a]);
	mtlz_spectra_free(&sp);
}

Test(fits_io, desi_redshift_comes_from_redrock_beside_coadd)
{
	long n = fx_nrows(DESI_REDROCK, "REDSHIFTS");
	long long *tid = calloc((size_t)n, sizeof(*tid));
	double *z = calloc((size_t)n, sizeof(*z));
	int *zwarn = calloc((size_t)n, sizeof(*zwarn));
	mtlz_spectra sp = { 0 };
	size_t matched = 0;

	fx_col(DESI_REDROCK, "REDSHIFTS", "TARGETID", TLONGLONG, n, tid);
	fx_col(DESI_REDROCK, "REDSHIFTS", "Z", TDOUBLE, n, z);
	fx_col(DESI_REDROCK, "REDSHIFTS", "ZWARN", TINT, n, zwarn);
	read_ok(DESI_COADD, &sp, (size_t)fx_nrows(DESI_COADD, "FIBERMAP"));
	for (size_t k = 0; k < sp.n; k++) {
		for (long i = 0; i < n; i++) {
			char id[32];

			snprintf(id, sizeof(id), "%lld", tid[i]);
			if (strcmp(id, sp.v[k].spec_id) != 0)
				continue;
			cr_assert_eq(sp.v[k].z, z[i]);
			cr_assert_eq(sp.v[k].zwarning, zwarn[i]);
			matched++;
		}
	}
	cr_assert_eq(matched, sp.n);
	cr_assert_float_eq(sp.v[0].z, 0.3687, 1e-4);
	free(tid);
	free(z);
	free(zwarn);
	mtlz_spectra_free(&sp);
}

static int cmp_dbl(const void *x, const void *y)
{
	double a = *(const double *)x, b = *(const double *)y;

	return (a > b) - (a < b);
}

Test(fits_io, desi_sn_is_median_pixel_sn_over_good_pixels)
{
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;
	double *v, want;
	size_t m = 0;

	read_ok(DESI_COADD, &sp, (size_t)fx_nrows(DESI_COADD, "FIBERMAP"));
	s = &sp.v[0];
	v = calloc(s->n, sizeof(*v));
	for (size_t i = 0; i < s->n; i++)
		if (s->ivar[i] > 0)
			v[m++] = s->flux[i] * sqrt((double)s->ivar[i]);
	cr_assert_gt(m, 0);
	qsort(v, m, sizeof(*v), cmp_dbl);
	want = m % 2 ? v[m / 2] : 0.5 * (v[m / 2 - 1] + v[m / 2]);
	cr_assert_float_eq(s->sn, want, 1e-9);
	free(v);
	mtlz_spectra_free(&sp);
}

/* ---- synthetic DESI files ---------------------------------------- */

#define SYN_NPIX 10
static const long long syn_tid[2] = { 11, 22 };

static void put_image(fitsfile *f, const char *name, int bitpix, int type,
		      int naxis, long n_pix, void *data, int *st)
{
	long ax[2] = { n_pix, 2 };

	fits_create_img(f, bitpix, naxis, ax, st);
	fits_write_key(f, TSTRING, "EXTNAME", (void *)name, NULL, st);
	fits_write_img(f, type, 1, naxis == 1 ? n_pix : 2 * n_pix, data, st);
}

/* One arm, two targets: flux = base + i + 100 t, ivar = w, mask from m[]. */
static void put_arm(fitsfile *f, const char *arm, double w0, float base,
		    float w, const int *m, int *st)
{
	double wave[SYN_NPIX];
	float flux[2 * SYN_NPIX], ivar[2 * SYN_NPIX];
	char name[32];

	for (int i = 0; i < SYN_NPIX; i++) {
		wave[i] = w0 + 0.8 * i;
		for (int t = 0; t < 2; t++) {
			flux[t * SYN_NPIX + i] = base + (float)i + 100.0f * (float)t;
			ivar[t * SYN_NPIX + i] = w;
		}
	}
	snprintf(name, sizeof(name), "%s_WAVELENGTH", arm);
	put_image(f, name, DOUBLE_IMG, TDOUBLE, 1, SYN_NPIX, wave, st);
	snprintf(name, sizeof(name), "%s_FLUX", arm);
	put_image(f, name, FLOAT_IMG, TFLOAT, 2, SYN_NPIX, flux, st);
	snprintf(name, sizeof(name), "%s_IVAR", arm);
	put_image(f, name, FLOAT_IMG, TFLOAT, 2, SYN_NPIX, ivar, st);
	snprintf(name, sizeof(name), "%s_MASK", arm);
	put_image(f, name, LONG_IMG, TINT, 2, SYN_NPIX, (void *)m, st);
}

/* coadd-synth.fits: arms B (3600 A) and R (starting at r0), 10 px each,
 * two targets (TARGETID 11, 22). Target 0 has B pixel 2 masked (8), B
 * pixel 8 masked (4) and pixel 9 masked in both arms (B 1|2, R 1|4). */
static const char *write_synth_coadd(double r0)
{
	const char *path = tmp_path("coadd-synth.fits");
	char *ttype[] = { "TARGETID" }, *tform[] = { "K" };
	int mb[2 * SYN_NPIX] = { 0 }, mr[2 * SYN_NPIX] = { 0 };
	fitsfile *f;
	int st = 0;

	mb[2] = 8;
	mb[8] = 4;
	mb[9] = 1 | 2;
	mr[1] = 1 | 4;
	fits_create_diskfile(&f, path, &st);
	fits_create_img(f, BYTE_IMG, 0, NULL, &st);
	fits_create_tbl(f, BINARY_TBL, 2, 1, ttype, tform, NULL, "FIBERMAP", &st);
	fits_write_col(f, TLONGLONG, 1, 1, 1, 2, (void *)syn_tid, &st);
	put_arm(f, "B", 3600.0, 1.0f, 1.0f, mb, &st);
	put_arm(f, "R", r0, 50.0f, 3.0f, mr, &st);
	fits_close_file(f, &st);
	cr_assert_eq(st, 0, "writing %s: cfitsio %d", path, st);
	return path;
}

/* redrock-synth.fits: TARGETID 22 (z 1.5, ZWARN 4) and 99; no 11. */
static void write_synth_redrock(void)
{
	const char *path = tmp_path("redrock-synth.fits");
	char *ttype[] = { "TARGETID", "Z", "ZWARN" }, *tform[] = { "K", "D", "K" };
	long long tid[2] = { 99, 22 }, zw[2] = { 0, 4 };
	double z[2] = { 0.1, 1.5 };
	fitsfile *f;
	int st = 0;

	fits_create_diskfile(&f, path, &st);
	fits_create_img(f, BYTE_IMG, 0, NULL, &st);
	fits_create_tbl(f, BINARY_TBL, 2, 3, ttype, tform, NULL, "REDSHIFTS", &st);
	fits_write_col(f, TLONGLONG, 1, 1, 1, 2, tid, &st);
	fits_write_col(f, TDOUBLE, 2, 1, 1, 2, z, &st);
	fits_write_col(f, TLONGLONG, 3, 1, 1, 2, zw, &st);
	fits_close_file(f, &st);
	cr_assert_eq(st, 0, "writing %s: cfitsio %d", path, st);
}

Test(fits_io, desi_masked_arm_pixels_drop_out_of_merge)
{
	const char *path = write_synth_coadd(3606.4);  /* R overlaps B px 8, 9 */
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;

	read_ok(path, &sp, 2);
	s = &sp.v[0];
	cr_assert_eq(s->grid_kind, MTLZ_GRID_LINEAR);
	cr_assert_eq(s->n, 18);
	/* Pixel 8: B masked, so R alone (flux 50, ivar 3). */
	cr_assert_eq(s->flux[8], 50.0f);
	cr_assert_eq(s->ivar[8], 3.0f);
	cr_assert_eq(s->and_mask[8], 0);
	/* Pixel 9: masked in both arms: plain mean, ivar 0, AND of masks. */
	cr_assert_float_eq(s->flux[9], (10.0 + 51.0) / 2, 1e-6);
	cr_assert_eq(s->ivar[9], 0.0f);
	cr_assert_eq(s->and_mask[9], 1);
	/* A masked pixel one arm covers alone keeps its mask, gets ivar 0. */
	cr_assert_eq(s->and_mask[2], 8);
	cr_assert_eq(s->ivar[2], 0.0f);
	cr_assert_eq(s->flux[2], 3.0f);
	cr_assert_eq(s->and_mask[0], 0);
	cr_assert_eq(s->ivar[0], 1.0f);
	/* Target 1 has no masks: weights 1 (B) and 3 (R). */
	cr_assert_float_eq(sp.v[1].flux[9], (1 * 110.0 + 3 * 151.0) / 4, 1e-4);
	cr_assert_eq(sp.v[1].ivar[9], 4.0f);
	mtlz_spectra_free(&sp);
}

Test(fits_io, desi_without_redrock_file_has_unknown_redshift)
{
	const char *path = write_synth_coadd(3606.4);
	mtlz_spectra sp = { 0 };

	read_ok(path, &sp, 2);
	cr_assert(isnan(sp.v[0].z));
	cr_assert_eq(sp.v[0].zwarning, -1);
	cr_assert_str_eq(sp.v[1].spec_id, "22");
	mtlz_spectra_free(&sp);
}

Test(fits_io, desi_redrock_matches_by_targetid_not_row)
{
	const char *path = write_synth_coadd(3606.4);
	mtlz_spectra sp = { 0 };

	write_synth_redrock();
	read_ok(path, &sp, 2);
	cr_assert(isnan(sp.v[0].z));          /* TARGETID 11: not in redrock */
	cr_assert_eq(sp.v[0].zwarning, -1);
	cr_assert_eq(sp.v[1].z, 1.5);         /* TARGETID 22: redrock row 2 */
	cr_assert_eq(sp.v[1].zwarning, 4);
	mtlz_spectra_free(&sp);
}

Test(fits_io, desi_arms_off_common_grid_fall_back_to_explicit)
{
	const char *path = write_synth_coadd(3606.7);  /* 0.3 A off B's grid */
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;

	read_ok(path, &sp, 2);
	s = &sp.v[0];
	cr_assert_eq(s->grid_kind, MTLZ_GRID_EXPLICIT);
	cr_assert_not_null(s->wave);
	/* R's 3606.7 A is inside B (ends 3607.2 A) and is dropped. */
	cr_assert_eq(s->n, 19);
	for (size_t i = 1; i < s->n; i++)
		cr_assert_gt(s->wave[i], s->wave[i - 1]);
	cr_assert_float_eq(s->wave[10], 3607.5, 1e-9);
	cr_assert_eq(s->flux[10], 51.0f);
	cr_assert_eq(s->flux[9], 10.0f);
	mtlz_spectra_free(&sp);
}

/* ---- synthetic SDSS files ---------------------------------------- */

/* spec-synth.fits: COADD with the given loglam (flux = 1 + i), SPECOBJ
 * without SPECOBJID nor SN_MEDIAN_ALL; COEFF0/1 in the primary when
 * coeff0 is finite. */
static const char *write_synth_sdss(const double *loglam, long n, double coeff0)
{
	const char *path = tmp_path("spec-synth.fits");
	char *ct[] = { "FLUX", "LOGLAM", "IVAR", "AND_MASK" };
	char *cf[] = { "E", "E", "E", "J" };
	char *mt[] = { "PLATE", "MJD", "FIBERID", "Z", "ZWARNING", "SN_MEDIAN" };
	char *mf[] = { "J", "J", "J", "E", "J", "5E" };
	float flux[64], ivar[64], sn[5] = { 1, 2, 3, 4, 5 };
	int mask[64] = { 0 }, pmf[3] = { 266, 51602, 7 }, zw = 0;
	double z = 0.1, c1 = 1e-4;
	fitsfile *f;
	int st = 0;

	cr_assert_leq(n, 64);
	for (long i = 0; i < n; i++) {
		flux[i] = 1.0f + (float)i;
		ivar[i] = 1.0f;
	}
	fits_create_diskfile(&f, path, &st);
	fits_create_img(f, BYTE_IMG, 0, NULL, &st);
	if (isfinite(coeff0)) {
		fits_write_key(f, TDOUBLE, "COEFF0", &coeff0, NULL, &st);
		fits_write_key(f, TDOUBLE, "COEFF1", &c1, NULL, &st);
	}
	fits_create_tbl(f, BINARY_TBL, n, 4, ct, cf, NULL, "COADD", &st);
	fits_write_col(f, TFLOAT, 1, 1, 1, n, flux, &st);
	fits_write_col(f, TDOUBLE, 2, 1, 1, n, (void *)loglam, &st);
	fits_write_col(f, TFLOAT, 3, 1, 1, n, ivar, &st);
	fits_write_col(f, TINT, 4, 1, 1, n, mask, &st);
	fits_create_tbl(f, BINARY_TBL, 1, 6, mt, mf, NULL, "SPECOBJ", &st);
	for (int c = 0; c < 3; c++)
		fits_write_col(f, TINT, c + 1, 1, 1, 1, &pmf[c], &st);
	fits_write_col(f, TDOUBLE, 4, 1, 1, 1, &z, &st);
	fits_write_col(f, TINT, 5, 1, 1, 1, &zw, &st);
	fits_write_col(f, TFLOAT, 6, 1, 1, 5, sn, &st);
	fits_close_file(f, &st);
	cr_assert_eq(st, 0, "writing %s: cfitsio %d", path, st);
	return path;
}

Test(fits_io, sdss_without_coeff_takes_grid_from_uniform_loglam)
{
	double ll[20];
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;

	for (int i = 0; i < 20; i++)
		ll[i] = 3.6 + 1e-4 * i;
	read_ok(write_synth_sdss(ll, 20, NAN), &sp, 1);
	s = &sp.v[0];
	cr_assert_eq(s->grid_kind, MTLZ_GRID_LOGLAM);
	cr_assert_float_eq(s->start, (float)3.6, 1e-9);
	/* The step comes from float32 ends: good to ~1e-8 dex. */
	cr_assert_float_eq(s->step, 1e-4, 1e-7);
	/* No SPECOBJID: plate-mjd-fiber; no SN_MEDIAN_ALL: r band of SN_MEDIAN. */
	cr_assert_str_eq(s->spec_id, "0266-51602-0007");
	cr_assert_float_eq(s->sn, 3.0, 1e-6);
	cr_assert_str_eq(s->survey, "sdss");
	mtlz_spectra_free(&sp);
}

Test(fits_io, sdss_coeff_grid_is_moved_onto_first_row)
{
	double ll[20];
	mtlz_spectra sp = { 0 };

	/* The plate grid starts 20 pixels bluer, as in the real files. */
	for (int i = 0; i < 20; i++)
		ll[i] = 3.5805 + 1e-4 * i;
	read_ok(write_synth_sdss(ll, 20, 3.5785), &sp, 1);
	cr_assert_eq(sp.v[0].grid_kind, MTLZ_GRID_LOGLAM);
	cr_assert_float_eq(sp.v[0].start, 3.5805, 1e-12);
	cr_assert_eq(sp.v[0].step, 1e-4);
	mtlz_spectra_free(&sp);
}

Test(fits_io, sdss_nonuniform_loglam_gives_explicit_grid)
{
	double ll[20];
	mtlz_spectra sp = { 0 };
	const mtlz_spectrum *s;

	for (int i = 0; i < 20; i++)
		ll[i] = 3.6 + 1e-4 * i + (i >= 10 ? 5e-4 : 0);  /* a gap */
	read_ok(write_synth_sdss(ll, 20, 3.6), &sp, 1);
	s = &sp.v[0];
	cr_assert_eq(s->grid_kind, MTLZ_GRID_EXPLICIT);
	cr_assert_not_null(s->wave);
	for (int i = 0; i < 20; i++)
		cr_assert_float_eq(s->wave[i], pow(10.0, (float)ll[i]), 1e-9,
				   "pixel %d", i);
	cr_assert_eq(s->flux[19], 20.0f);
	mtlz_spectra_free(&sp);
}

/* ---- broken input ------------------------------------------------ */

/* Expects `path` to fail with a message and leave `sp` (one spectrum
 * already in it) untouched. */
static void expect_reject(const char *path, const char *what)
{
	mtlz_spectra sp = { 0 };
	int rc;

	read_ok(SDSS_LITE, &sp, 1);
	errstr[0] = '\0';
	rc = mtlz_fits_read(path, &sp, errstr, sizeof(errstr));
	cr_assert_neq(rc, MTLZ_OK, "%s accepted", what);
	cr_assert_neq(errstr[0], '\0', "%s: no message", what);
	cr_assert(strstr(errstr, path) != NULL, "%s: message '%s' lacks the path",
		  what, errstr);
	cr_assert_eq(sp.n, 1, "%s: %zu spectra after failure", what, sp.n);
	cr_assert_eq(sp.v[0].n, 3832);
	mtlz_spectra_free(&sp);
}

/* Copies the first `len` bytes of src to the temp file `name`. */
static const char *write_prefix(const char *src, const char *name, long len)
{
	const char *path = tmp_path(name);
	FILE *in = fopen(src, "rb"), *out = fopen(path, "wb");
	char *buf = malloc((size_t)len);

	cr_assert(in && out && buf);
	cr_assert_eq(fread(buf, 1, (size_t)len, in), (size_t)len);
	cr_assert_eq(fwrite(buf, 1, (size_t)len, out), (size_t)len);
	fclose(in);
	fclose(out);
	free(buf);
	return path;
}

static long file_size(const char *path)
{
	FILE *f = fopen(path, "rb");
	long n;

	cr_assert_not_null(f);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fclose(f);
	return n;
}

Test(fits_io, missing_file_is_io_error_naming_path)
{
	mtlz_spectra sp = { 0 };
	const char *path = tmp_path("no-such-file.fits");
	int rc = mtlz_fits_read(path, &sp, errstr, sizeof(errstr));

	cr_assert_eq(rc, MTLZ_ERR_IO);
	cr_assert(strstr(errstr, path) != NULL, "errstr: %s", errstr);
	cr_assert_eq(sp.n, 0);
	mtlz_spectra_free(&sp);
}

Test(fits_io, file_truncated_at_half_is_rejected)
{
	static const char *const src[] = { SDSS_FULL, BOSS_FILE, DESI_COADD };

	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(src); i++)
		expect_reject(write_prefix(src[i], "half.fits",
					   file_size(src[i]) / 2), src[i]);
}

/* Cuts inside headers and data, on and off 2880-byte blocks: cfitsio
 * drops an HDU cut short silently, so these check the reader notices. */
Test(fits_io, file_truncated_anywhere_is_rejected)
{
	static const char *const src[] = { SDSS_FULL, BOSS_FILE, DESI_COADD };
	static const double cut[] = { 0.01, 0.1, 0.25, 0.27, 0.4, 0.75, 0.9, 0.999 };

	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(src); i++) {
		long size = file_size(src[i]);

		for (size_t k = 0; k < MTLZ_ARRAY_SIZE(cut); k++)
			expect_reject(write_prefix(src[i], "cut.fits",
						   (long)(cut[k] * (double)size)),
				      src[i]);
		expect_reject(write_prefix(src[i], "cut.fits", size - 2880),
			      src[i]);
	}
}

Test(fits_io, random_bytes_are_rejected)
{
	const char *path = tmp_path("random.fits");
	FILE *f = fopen(path, "wb");
	mtlz_rng rng;

	mtlz_rng_seed(&rng, 42);
	for (int i = 0; i < 20000; i++) {
		uint64_t v = mtlz_rng_next(&rng);

		fwrite(&v, sizeof(v), 1, f);
	}
	fclose(f);
	expect_reject(path, "random bytes");
}

Test(fits_io, primary_hdu_only_is_format_error)
{
	const char *path = tmp_path("primary.fits");
	mtlz_spectra sp = { 0 };
	fitsfile *f;
	int st = 0;

	fits_create_diskfile(&f, path, &st);
	fits_create_img(f, BYTE_IMG, 0, NULL, &st);
	fits_close_file(f, &st);
	cr_assert_eq(st, 0);
	expect_reject(path, "primary only");
	cr_assert_eq(mtlz_fits_read(path, &sp, errstr, sizeof(errstr)),
		     MTLZ_ERR_FORMAT);
	cr_assert(strstr(errstr, "expected") != NULL, "errstr: %s", errstr);
}

Test(fits_io, redrock_file_alone_is_not_a_spectrum_file)
{
	mtlz_spectra sp = { 0 };

	cr_assert_eq(mtlz_fits_read(DESI_REDROCK, &sp, errstr, sizeof(errstr)),
		     MTLZ_ERR_FORMAT);
	cr_assert(strstr(errstr, "REDSHIFTS") != NULL, "errstr: %s", errstr);
	cr_assert_eq(sp.n, 0);
}

/* ---- the array --------------------------------------------------- */

Test(fits_io, spectra_push_grows_and_initialises_slots)
{
	mtlz_spectra sp = { 0 };

	for (int i = 0; i < 100; i++) {
		mtlz_spectrum *s = mtlz_spectra_push(&sp);

		cr_assert_not_null(s);
		cr_assert(isnan(s->z) && isnan(s->sn));
		cr_assert_eq(s->zwarning, -1);
		cr_assert_eq(s->n, 0);
		snprintf(s->spec_id, sizeof(s->spec_id), "%d", i);
		cr_assert_eq(mtlz_spectrum_alloc(s, 4, 1, 1, 0), MTLZ_OK);
	}
	cr_assert_eq(sp.n, 100);
	cr_assert_geq(sp.cap, 100);
	cr_assert_str_eq(sp.v[37].spec_id, "37");
	mtlz_spectra_free(&sp);
	cr_assert_eq(sp.n, 0);
	cr_assert_null(sp.v);
	mtlz_spectra_free(&sp);
	mtlz_spectra_free(NULL);
}
