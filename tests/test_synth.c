/*
 * test_synth.c - `mtlz synth` and core/synth.h: deterministic bytes (seed,
 * threads, chunking), spectra that land in their class's BPT region when
 * their own lines are measured back, star-forming metallicities that agree
 * with O3N2 of the measured lines, labels, grid, ivar/mask and S/N_r, and
 * the error conventions for bad options.
 *
 * The line measurement here is deliberately independent of the generator:
 * its own vacuum wavelengths, side-band medians in the observed frame at the
 * label redshift, a linear continuum and a window sum.
 */
#include "archive.h"
#include "bpt.h"
#include "common.h"
#include "synth.h"
#include "util.h"

#include <criterion/criterion.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MTLZ MTLZ_BIN_DIR "/mtlz"
#define SSP_DIR MTLZ_SOURCE_DIR "/data/emiles-ssp"
#define SCHEMAS MTLZ_SOURCE_DIR "/schemas"

static char dir[256];

static void setup(void)
{
	tu_mkdtemp(dir, sizeof(dir), "synth");
}

static void teardown(void)
{
	char cmd[300];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	cr_assert_eq(system(cmd), 0);
}

/* Runs a shell command with stderr into dir/stderr; the exit code. */
static int run(const char *fmt, ...)
{
	char cmd[2048];
	va_list ap;
	int st;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd) - 300, fmt, ap);
	va_end(ap);
	snprintf(cmd + strlen(cmd), 300, " >%.100s/stdout 2>%.100s/stderr", dir, dir);
	st = system(cmd);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static const char *stderr_text(void)
{
	static char buf[8192];
	char path[300];
	FILE *f;
	size_t n = 0;

	snprintf(path, sizeof(path), "%s/stderr", dir);
	f = fopen(path, "r");
	if (f) {
		n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
	}
	buf[n] = '\0';
	return buf;
}

TestSuite(synth, .init = setup, .fini = teardown, .timeout = 120);

/* ---- determinism ------------------------------------------------------ */

static int same_files(const char *a, const char *b)
{
	char cmd[700];

	snprintf(cmd, sizeof(cmd), "cmp -s %s %s", a, b);
	return system(cmd) == 0;
}

Test(synth, same_seed_same_bytes_whatever_the_threads)
{
	char a[300], b[300];

	cr_assert_eq(run(MTLZ " synth -n 300 --per-file 100 --seed 7 --threads 1 -o %s/a", dir),
		     0, "%s", stderr_text());
	cr_assert_eq(run(MTLZ " synth -n 300 --per-file 100 --seed 7 --threads 2 -o %s/b", dir),
		     0, "%s", stderr_text());
	cr_assert(strstr(stderr_text(), "spectra/s"), "no rate on stderr: %s", stderr_text());
	cr_assert_eq(run(MTLZ " synth -n 300 --per-file 100 --seed 8 --threads 2 -o %s/c", dir),
		     0, "%s", stderr_text());
	for (int f = 0; f < 3; f++) {
		snprintf(a, sizeof(a), "%s/a/part-%05d.avro", dir, f);
		snprintf(b, sizeof(b), "%s/b/part-%05d.avro", dir, f);
		cr_assert(same_files(a, b), "%s and %s differ (threads 1 vs 2)", a, b);
		snprintf(b, sizeof(b), "%s/c/part-%05d.avro", dir, f);
		cr_assert_not(same_files(a, b), "seeds 7 and 8 gave the same %s", a);
	}
	snprintf(a, sizeof(a), "%s/a/part-00003.avro", dir);
	cr_assert_neq(access(a, F_OK), 0, "a fourth file was written");
}

struct first_spectra {
	int n;
	uint32_t hash[64];
	char id[64][64];
};

static uint32_t fnv(const void *p, size_t len, uint32_t h)
{
	const unsigned char *c = p;

	for (size_t i = 0; i < len; i++)
		h = (h ^ c[i]) * 16777619u;
	return h;
}

static uint32_t spectrum_hash(const mtlz_spectrum *s)
{
	uint32_t h = fnv(s->flux, s->n * sizeof(float), 2166136261u);

	h = fnv(s->ivar, s->n * sizeof(float), h);
	h = fnv(s->and_mask, s->n * sizeof(uint32_t), h);
	return fnv(&s->start, sizeof(s->start), h);
}

static int collect_first(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct first_spectra *fs = opaque;

	(void)l;
	if (fs->n < 64) {
		fs->hash[fs->n] = spectrum_hash(s);
		snprintf(fs->id[fs->n], sizeof(fs->id[0]), "%s", s->spec_id);
		fs->n++;
	}
	return 0;
}

/* Spectrum i depends on (seed, i) only: made alone, in reverse order, by
 * another generator instance, it is the archive's record i. */
Test(synth, spectrum_depends_only_on_seed_and_index)
{
	char path[300], err[512], *paths[1] = { path };
	struct first_spectra fs = { 0 };
	mtlz_synth_opts o;
	mtlz_synth *g;
	mtlz_synth_ws *ws;
	mtlz_avro *a;

	cr_assert_eq(run(MTLZ " synth -n 40 --seed 11 --per-file 16 --threads 2 -o %s/a", dir),
		     0, "%s", stderr_text());
	a = mtlz_avro_new(SCHEMAS, NULL, err, sizeof(err));
	cr_assert_not_null(a, "%s", err);
	snprintf(path, sizeof(path), "%s/a", dir);
	cr_assert_eq(mtlz_archive_read(a, paths, 1, collect_first, &fs, err, sizeof(err)), 0,
		     "%s", err);
	cr_assert_eq(fs.n, 40);
	mtlz_synth_opts_default(&o);
	o.seed = 11;
	g = mtlz_synth_new(SSP_DIR, &o, 1, err, sizeof(err));
	cr_assert_not_null(g, "%s", err);
	ws = mtlz_synth_ws_new(g);
	for (int i = 39; i >= 0; i--) {
		const mtlz_spectrum *s;
		const mtlz_labels *l;

		mtlz_synth_make(g, ws, (uint64_t)i, &s, &l, NULL);
		cr_assert_str_eq(s->spec_id, fs.id[i]);
		cr_assert_eq(spectrum_hash(s), fs.hash[i], "record %d differs from a lone make", i);
	}
	mtlz_synth_ws_free(ws);
	mtlz_synth_free(g);
	mtlz_avro_free(a);
}

/* ---- measuring the lines back ------------------------------------------ */

enum { L_HB, L_OIII, L_HA, L_NII, N_MEAS };

/* Vacuum rest wavelengths (SDSS line list) and continuum side bands, rest A. */
static const double meas_wave[N_MEAS] = { 4862.683, 5008.240, 6564.614, 6585.268 };
static const double meas_band[N_MEAS][4] = {
	{ 4828, 4848, 4877, 4897 },
	{ 4978, 4996, 5020, 5040 },
	{ 6500, 6535, 6600, 6630 },
	{ 6500, 6535, 6600, 6630 },
};

static double pix_wave(const mtlz_spectrum *s, long i)
{
	return pow(10.0, s->start + (double)i * s->step);
}

static int cmp_float(const void *x, const void *y)
{
	const float a = *(const float *)x, b = *(const float *)y;

	return (a > b) - (a < b);
}

/* Median flux of the good pixels with observed wavelength in [lo, hi], and
 * its variance (pi/2 sigma^2 / n for the median of n Gaussian values). */
static int band_median(const mtlz_spectrum *s, double lo, double hi, double *med, double *var)
{
	float v[400];
	double sum_var = 0;
	int n = 0;

	for (long i = 0; i < (long)s->n; i++) {
		const double w = pix_wave(s, i);

		if (w >= lo && w <= hi && s->ivar[i] > 0 && n < 400) {
			v[n++] = s->flux[i];
			sum_var += 1 / s->ivar[i];
		}
	}
	if (n < 5)
		return -1;
	qsort(v, (size_t)n, sizeof(float), cmp_float);
	*med = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
	*var = 1.5707963 * (sum_var / n) / n;
	return 0;
}

/* Flux and its error of line k: sum over +-hw (rest A) of flux minus a
 * line through the two side-band medians; the error counts the pixels'
 * noise and the continuum's. -1 when not measurable (out of range or a
 * masked pixel in the window). */
static int measure_line(const mtlz_spectrum *s, double z, int k, double hw, double *flux,
			double *err)
{
	const double zp = 1 + z, lc = meas_wave[k] * zp;
	const double *b = meas_band[k];
	const double x1 = 0.5 * (b[0] + b[1]) * zp, x2 = 0.5 * (b[2] + b[3]) * zp;
	const double a = (lc - x1) / (x2 - x1);
	double m1, m2, v1, v2, f = 0, v = 0, width = 0;
	int n = 0;

	if (band_median(s, b[0] * zp, b[1] * zp, &m1, &v1) ||
	    band_median(s, b[2] * zp, b[3] * zp, &m2, &v2))
		return -1;
	for (long i = 0; i < (long)s->n; i++) {
		const double w = pix_wave(s, i);
		const double dw = w * (pow(10.0, 0.5 * s->step) - pow(10.0, -0.5 * s->step));

		if (w < lc - hw * zp || w > lc + hw * zp)
			continue;
		if (!(s->ivar[i] > 0))
			return -1;
		f += (s->flux[i] - (m1 + (m2 - m1) * (w - x1) / (x2 - x1))) * dw;
		v += dw * dw / s->ivar[i];
		width += dw;
		n++;
	}
	if (n < 3)
		return -1;
	*flux = f;
	*err = sqrt(v + width * width * ((1 - a) * (1 - a) * v1 + a * a * v2));
	return 0;
}

struct bpt_stats {
	mtlz_synth *g;                      /* the archive's generator, to regenerate */
	mtlz_synth_ws *ws;
	long n[MTLZ_N_CLASSES];             /* spectra of each class */
	long measured[MTLZ_N_CLASSES];      /* all four lines at S/N >= 3 */
	long in_region[MTLZ_N_CLASSES];     /* ... and mtlz_bpt_class == class */
	long raw_measured[MTLZ_N_CLASSES];  /* the same without continuum subtraction */
	long raw_in_region[MTLZ_N_CLASSES];
	long passive_detected;              /* passive with a line at S/N >= 3 */
	long passive_detected5;             /* ... at S/N >= 5 */
	long oh_n, oh_ok;                   /* star-forming O3N2 within 0.1 dex */
	double oh_worst;
};

/* Measures Hb, [O III], Ha, [N II] of s; 1 when all four have S/N >= 3
 * (ratios in *n2, *o3), *detected when any has. */
static int measure_bpt(const mtlz_spectrum *s, const mtlz_labels *l, double *n2, double *o3,
		       int *detected, int *detected5)
{
	const char *sg = mtlz_labels_kv_get(l->params, l->n_params, "sigma_gas_kms");
	const double sig = sg ? atof(sg) : 150;
	double f[N_MEAS], e[N_MEAS];
	int ok = 1;

	*detected = *detected5 = 0;
	for (int k = 0; k < N_MEAS; k++) {
		/* +-2.5 sigma of the line (gas and R = 2000), at least 2 A. */
		const double hw = fmax(2.0, 2.5 * meas_wave[k] *
				       sqrt(sig * sig + 63.7 * 63.7) / 299792.458);

		if (measure_line(s, l->z, k, hw, &f[k], &e[k])) {
			ok = 0;
			continue;
		}
		if (f[k] < 3 * e[k])
			ok = 0;
		else
			*detected = 1;
		if (f[k] >= 5 * e[k])
			*detected5 = 1;
	}
	if (ok) {
		*n2 = log10(f[L_NII] / f[L_HA]);
		*o3 = log10(f[L_OIII] / f[L_HB]);
	}
	return ok;
}

/* For each archived spectrum: measure the lines on the spectrum minus its
 * stellar continuum (regenerated from (seed, index), as a survey pipeline
 * subtracts its fitted continuum: the SSPs' Balmer absorption would
 * otherwise eat 0.1-0.3 dex of H-beta), and, for information, on the raw
 * spectrum. */
static int bpt_fn(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct bpt_stats *st = opaque;
	const char *idx = mtlz_labels_kv_get(l->params, l->n_params, "index");
	const mtlz_spectrum *gs;
	const mtlz_labels *gl;
	const mtlz_synth_truth *t;
	mtlz_spectrum sub = *s;
	float flux[4000];
	double n2, o3;
	int detected, detected5;

	cr_assert(l->cls >= 0 && l->cls < MTLZ_N_CLASSES, "%s: class %d", s->spec_id, l->cls);
	cr_assert_not_null(idx);
	mtlz_synth_make(st->g, st->ws, strtoull(idx, NULL, 10), &gs, &gl, &t);
	cr_assert_str_eq(gs->spec_id, s->spec_id);
	cr_assert_eq(gs->n, s->n);
	cr_assert_leq(s->n, 4000);
	for (size_t i = 0; i < s->n; i++)
		flux[i] = s->flux[i] - t->continuum[i];
	sub.flux = flux;

	st->n[l->cls]++;
	if (measure_bpt(s, l, &n2, &o3, &detected, &detected5) && l->cls != MTLZ_CLASS_PASSIVE) {
		st->raw_measured[l->cls]++;
		st->raw_in_region[l->cls] += mtlz_bpt_class(n2, o3) == l->cls;
	}
	if (l->cls == MTLZ_CLASS_PASSIVE) {
		measure_bpt(&sub, l, &n2, &o3, &detected, &detected5);
		st->passive_detected += detected;
		st->passive_detected5 += detected5;
	} else if (measure_bpt(&sub, l, &n2, &o3, &detected, &detected5)) {
		st->measured[l->cls]++;
		st->in_region[l->cls] += mtlz_bpt_class(n2, o3) == l->cls;
		if (l->cls == MTLZ_CLASS_STAR_FORMING) {
			const double oh = mtlz_oh_o3n2_pp04(o3, n2);
			const double d = isfinite(oh) ? fabs(oh - l->oh) : 9;

			st->oh_n++;
			st->oh_ok += d < 0.1;
			st->oh_worst = fmax(st->oh_worst, d);
		}
	}
	return 0;
}

static void generate_and_measure(int n, const char *mix, const double *class_mix,
				 struct bpt_stats *st)
{
	char path[300], err[512], *paths[1] = { path };
	mtlz_synth_opts o;
	mtlz_avro *a;

	cr_assert_eq(run(MTLZ " synth -n %d --seed 2024 --per-file 1000 --threads 2 %s -o %s/bpt",
			 n, mix, dir), 0, "%s", stderr_text());
	a = mtlz_avro_new(SCHEMAS, NULL, err, sizeof(err));
	cr_assert_not_null(a, "%s", err);
	memset(st, 0, sizeof(*st));
	mtlz_synth_opts_default(&o);
	o.seed = 2024;
	memcpy(o.class_mix, class_mix, sizeof(o.class_mix));
	st->g = mtlz_synth_new(SSP_DIR, &o, 2, err, sizeof(err));
	cr_assert_not_null(st->g, "%s", err);
	st->ws = mtlz_synth_ws_new(st->g);
	snprintf(path, sizeof(path), "%s/bpt", dir);
	cr_assert_eq(mtlz_archive_read(a, paths, 1, bpt_fn, st, err, sizeof(err)), 0, "%s", err);
	mtlz_synth_ws_free(st->ws);
	mtlz_synth_free(st->g);
	mtlz_avro_free(a);
	for (int c = 0; c < MTLZ_N_CLASSES; c++)
		cr_log_info("%-12s n %4ld measured %4ld in region %4ld (raw spectrum: %4ld, %4ld)",
			    mtlz_class_name(c), st->n[c], st->measured[c], st->in_region[c],
			    st->raw_measured[c], st->raw_in_region[c]);
	cr_log_info("passive with a line at S/N >= 3: %ld, >= 5: %ld; SF O/H within 0.1: "
		    "%ld/%ld (worst %.3f)", st->passive_detected, st->passive_detected5, st->oh_ok,
		    st->oh_n, st->oh_worst);
}

Test(synth, measured_lines_land_in_the_class_bpt_region)
{
	static const double equal[MTLZ_N_CLASSES] = { 1, 1, 1, 1 };
	struct bpt_stats st;

	generate_and_measure(2400, "", equal, &st);
	for (int c = MTLZ_CLASS_STAR_FORMING; c <= MTLZ_CLASS_AGN; c++) {
		cr_assert_geq(st.measured[c], 0.4 * st.n[c], "%s: only %ld of %ld with all four "
			      "lines at S/N >= 3", mtlz_class_name(c), st.measured[c], st.n[c]);
		cr_assert_geq(st.in_region[c], 0.9 * st.measured[c],
			      "%s: %ld of %ld measured spectra in the class's BPT region",
			      mtlz_class_name(c), st.in_region[c], st.measured[c]);
	}
	cr_assert_geq(st.n[MTLZ_CLASS_PASSIVE], 400);
	/* Noise alone puts one of the four measurements of about 1 % of
	 * line-free spectra over 3 sigma. */
	cr_assert_leq(st.passive_detected, 0.03 * st.n[MTLZ_CLASS_PASSIVE],
		      "%ld of %ld passive spectra have a line at S/N >= 3",
		      st.passive_detected, st.n[MTLZ_CLASS_PASSIVE]);
	cr_assert_leq(st.passive_detected5, 0.005 * st.n[MTLZ_CLASS_PASSIVE],
		      "%ld of %ld passive spectra have a line at S/N >= 5",
		      st.passive_detected5, st.n[MTLZ_CLASS_PASSIVE]);
}

Test(synth, star_forming_metallicity_matches_measured_o3n2)
{
	static const double sf_only[MTLZ_N_CLASSES] = { 0, 1, 0, 0 };
	struct bpt_stats st;

	generate_and_measure(1000, "--class-mix 0,1,0,0", sf_only, &st);
	cr_assert_eq(st.n[MTLZ_CLASS_STAR_FORMING], 1000, "--class-mix 0,1,0,0 gave other classes");
	cr_assert_geq(st.oh_n, 700);
	cr_assert_geq(st.oh_ok, 0.9 * st.oh_n, "O3N2 of the measured lines within 0.1 dex of "
		      "the label for %ld of %ld", st.oh_ok, st.oh_n);
}

/* ---- labels, grid, ivar, mask, S/N ------------------------------------- */

struct label_check {
	long n, n_metal, n_masked_px, n_bright;
	long by_class[MTLZ_N_CLASSES];
	double z_min, z_max, sn_lo, sn_hi;
	long sn_bad;
	double sn_worst;
};

static int label_fn(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct label_check *c = opaque;
	const double w0 = pix_wave(s, 0), w1 = pix_wave(s, (long)s->n - 1);
	float sn[2000];
	int n_sn = 0;

	c->n++;
	cr_assert(l->cls >= 0 && l->cls < MTLZ_N_CLASSES);
	c->by_class[l->cls]++;
	if (l->cls == MTLZ_CLASS_STAR_FORMING) {
		cr_assert(isfinite(l->oh) && l->oh >= 8.1 && l->oh <= 8.85, "%s: O/H %g",
			  s->spec_id, l->oh);
		c->n_metal++;
	} else {
		cr_assert(isnan(l->oh), "%s: %s with a metallicity", s->spec_id,
			  mtlz_class_name(l->cls));
	}
	cr_assert(l->z >= c->z_min && l->z <= c->z_max, "%s: z %g", s->spec_id, l->z);
	cr_assert_float_eq(s->z, l->z, 1e-12);
	cr_assert(l->sn_r >= c->sn_lo && l->sn_r <= c->sn_hi, "%s: sn_r %g", s->spec_id, l->sn_r);
	cr_assert(isfinite(l->log_mass) && l->log_mass > 8 && l->log_mass < 12.5);
	cr_assert_str_eq(l->source_name, "synthetic");
	cr_assert_str_eq(l->source_version, "mtlz-synth 1");
	cr_assert(strlen(l->source_method) > 10);
	cr_assert_not_null(mtlz_labels_kv_get(l->params, l->n_params, "seed"));
	cr_assert_not_null(mtlz_labels_kv_get(l->params, l->n_params, "index"));
	cr_assert_not_null(mtlz_labels_kv_get(l->params, l->n_params, "av_gas"));
	cr_assert_not_null(mtlz_labels_kv_get(l->params, l->n_params, "sigma_star_kms"));
	cr_assert_not_null(mtlz_labels_kv_get(l->params, l->n_params, "ew_ha"));
	cr_assert_not_null(mtlz_labels_kv_get(l->params, l->n_params, "ssp_light_5500"));
	cr_assert_eq(s->zwarning, 0);

	/* SDSS log-linear grid, about 3800-9200 A, the first pixel varying. */
	cr_assert_eq(s->grid_kind, MTLZ_GRID_LOGLAM);
	cr_assert_float_eq(s->step, 1e-4, 1e-12);
	cr_assert(fabs(s->start * 1e4 - round(s->start * 1e4)) < 1e-6,
		  "start %.8f not on the SDSS pixel grid", s->start);
	cr_assert(w0 > 3790 && w0 < 3840 && w1 > 9150 && w1 < 9250, "%s: %.1f-%.1f A",
		  s->spec_id, w0, w1);
	cr_assert(s->ivar && s->and_mask);
	for (size_t i = 0; i < s->n; i++) {
		cr_assert(isfinite(s->flux[i]) && isfinite(s->ivar[i]));
		if (s->ivar[i] > 0) {
			cr_assert_eq(s->and_mask[i] & MTLZ_SYNTH_MASK_FULLREJECT, 0);
		} else {
			cr_assert_eq(s->ivar[i], 0);
			cr_assert(s->and_mask[i] & MTLZ_SYNTH_MASK_FULLREJECT,
				  "%s: pixel %zu has ivar 0 and mask %#x", s->spec_id, i,
				  s->and_mask[i]);
			c->n_masked_px++;
		}
		c->n_bright += (s->and_mask[i] & MTLZ_SYNTH_MASK_BRIGHTSKY) != 0;
	}

	for (long i = 0; i < (long)s->n; i++) {
		const double w = pix_wave(s, i);

		if (w >= 5500 && w <= 6900 && s->ivar[i] > 0 && n_sn < 2000)
			sn[n_sn++] = s->flux[i] * sqrtf(s->ivar[i]);
	}
	cr_assert_gt(n_sn, 500);
	qsort(sn, (size_t)n_sn, sizeof(float), cmp_float);
	{
		const double rel = fabs(sn[n_sn / 2] / l->sn_r - 1);

		c->sn_bad += rel > 0.2;
		c->sn_worst = fmax(c->sn_worst, rel);
	}
	return 0;
}

static void check_labels(const char *extra, double z_min, double z_max, double sn_lo,
			 double sn_hi, struct label_check *c)
{
	char path[300], err[512], *paths[1] = { path };
	mtlz_avro *a;

	cr_assert_eq(run(MTLZ " synth -n 400 --seed 5 --per-file 150 %s -o %s/l", extra, dir), 0,
		     "%s", stderr_text());
	a = mtlz_avro_new(SCHEMAS, NULL, err, sizeof(err));
	cr_assert_not_null(a, "%s", err);
	snprintf(path, sizeof(path), "%s/l", dir);
	memset(c, 0, sizeof(*c));
	c->z_min = z_min;
	c->z_max = z_max;
	c->sn_lo = sn_lo;
	c->sn_hi = sn_hi;
	cr_assert_eq(mtlz_archive_read(a, paths, 1, label_fn, c, err, sizeof(err)), 0, "%s", err);
	mtlz_avro_free(a);
	cr_assert_eq(c->n, 400);
	cr_assert_eq(c->sn_bad, 0, "%ld spectra with the measured S/N_r off the label by > 20 %% "
		     "(worst %.0f %%)", c->sn_bad, 100 * c->sn_worst);
}

Test(synth, labels_grid_ivar_and_sn_as_specified)
{
	struct label_check c;

	check_labels("", 0.002, 0.3, 5, 30, &c);
	for (int k = 0; k < MTLZ_N_CLASSES; k++)   /* equal mix: about 100 each */
		cr_assert(c.by_class[k] > 60 && c.by_class[k] < 140, "%s: %ld of 400",
			  mtlz_class_name(k), c.by_class[k]);
	cr_assert_eq(c.n_metal, c.by_class[MTLZ_CLASS_STAR_FORMING]);
	cr_assert_gt(c.n_masked_px, 0, "no masked pixels at all");
	cr_assert_lt(c.n_masked_px, 400 * 12, "more than a few masked pixels");
	cr_assert_gt(c.n_bright, 0, "no bright-sky pixels flagged");
}

Test(synth, ranges_and_class_mix_are_respected)
{
	struct label_check c;

	check_labels("--z-range 0.1,0.12 --sn-range 20,25 --class-mix 1,0,0,3", 0.1, 0.12, 20, 25,
		     &c);
	cr_assert_eq(c.by_class[MTLZ_CLASS_STAR_FORMING] + c.by_class[MTLZ_CLASS_COMPOSITE], 0);
	cr_assert(c.by_class[MTLZ_CLASS_AGN] > 2 * c.by_class[MTLZ_CLASS_PASSIVE],
		  "agn %ld vs passive %ld for a 1:3 mix", c.by_class[MTLZ_CLASS_AGN],
		  c.by_class[MTLZ_CLASS_PASSIVE]);
}

/* z = 0 (no luminosity distance) and z = 1 (the rest grid's far end). */
Test(synth, extreme_redshifts_give_finite_spectra)
{
	static const double zs[] = { 0.0, 1.0 };
	char err[512];

	for (size_t k = 0; k < sizeof(zs) / sizeof(zs[0]); k++) {
		mtlz_synth_opts o;
		mtlz_synth *g;
		mtlz_synth_ws *ws;

		mtlz_synth_opts_default(&o);
		o.z_min = o.z_max = zs[k];
		g = mtlz_synth_new(SSP_DIR, &o, 2, err, sizeof(err));
		cr_assert_not_null(g, "%s", err);
		ws = mtlz_synth_ws_new(g);
		for (uint64_t i = 0; i < 100; i++) {
			const mtlz_spectrum *s;
			const mtlz_labels *l;

			mtlz_synth_make(g, ws, i, &s, &l, NULL);
			cr_assert_float_eq(l->z, zs[k], 1e-12);
			cr_assert(isfinite(s->sn) && s->sn > 0);
			for (size_t p = 0; p < s->n; p++)
				cr_assert(isfinite(s->flux[p]) && isfinite(s->ivar[p]) &&
					  s->ivar[p] >= 0, "z %g, spectrum %" PRIu64 " pixel %zu: "
					  "flux %g ivar %g", zs[k], i, p, s->flux[p], s->ivar[p]);
		}
		mtlz_synth_ws_free(ws);
		mtlz_synth_free(g);
	}
}

/* ---- errors ------------------------------------------------------------ */

Test(synth, bad_options_are_refused_with_a_reason)
{
	static const struct {
		const char *args, *want;
		int code;
	} cases[] = {
		{ "-n 0", "--count '0'", 2 },
		{ "-n -5", "--count", 2 },
		{ "-n 10 --seed -1", "--seed '-1'", 2 },
		{ "-n 10 --seed 12x", "--seed '12x'", 2 },
		{ "-n 10 --class-mix 1,1,1", "--class-mix", 2 },
		{ "-n 10 --class-mix 0,0,0,0", "class mix", 2 },
		{ "-n 10 --z-range 0.3,0.1", "redshift range", 2 },
		{ "-n 10 --sn-range 0,30", "S/N range", 2 },
		{ "-n 10 --codec lz4", "--codec 'lz4'", 2 },
		{ "-n 10 --ssp-dir /nonexistent/emiles", "/nonexistent/emiles", 2 },
	};

	for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
		cr_assert_eq(run(MTLZ " synth %s -o %s/out", cases[k].args, dir), cases[k].code,
			     "'%s': exit code (stderr: %s)", cases[k].args, stderr_text());
		cr_assert(strstr(stderr_text(), cases[k].want), "'%s': stderr does not name %s: %s",
			  cases[k].args, cases[k].want, stderr_text());
	}
	cr_assert_eq(run(MTLZ " synth -o %s/out", dir), 2);
	cr_assert(strstr(stderr_text(), "--count"), "%s", stderr_text());
}

Test(synth, missing_ssp_files_are_runtime_errors_naming_them)
{
	/* $MTLZ_DATA_DIR without emiles-ssp/, then one without the SSPs. */
	cr_assert_eq(run("MTLZ_DATA_DIR=%s " MTLZ " synth -n 10 -o %s/out", dir, dir), 1);
	cr_assert(strstr(stderr_text(), "emiles-ssp") && strstr(stderr_text(), "MTLZ_DATA_DIR"),
		  "%s", stderr_text());
	cr_assert_eq(run("mkdir %s/emiles-ssp && cp " SSP_DIR "/SSP_Wavelength_Vacuum.fits %s/"
			 "emiles-ssp/ && MTLZ_DATA_DIR=%s " MTLZ " synth -n 10 -o %s/out",
			 dir, dir, dir, dir), 1);
	cr_assert(strstr(stderr_text(), "Ech1.30Zm1.31T00.0631_iPp0.00_baseFe_LIS5.0.fits.gz"),
		  "%s", stderr_text());
}

Test(synth, an_existing_archive_is_not_overwritten)
{
	cr_assert_eq(run(MTLZ " synth -n 5 -o %s/out", dir), 0, "%s", stderr_text());
	cr_assert_eq(run(MTLZ " synth -n 5 -o %s/out", dir), 1);
	cr_assert(strstr(stderr_text(), "already holds an archive"), "%s", stderr_text());
}
