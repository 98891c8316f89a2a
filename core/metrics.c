/*
 * metrics.c - evaluation metrics of the classifier and the metallicity
 * regressor (metrics.h has the definitions and the JSON contract).
 *
 * Every statistic is computed by one index-based routine (an optional list
 * of item indices, NULL meaning all), so that the full-sample value, the
 * per-bin values and the bootstrap resamples all go through the same code.
 * Called by the evaluation tools, never from the daemon's hot path, so the
 * scratch buffers are allocated per call.
 *
 * @locality any thread; no locks.
 */
#include "metrics.h"

#include "common.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define IDX(idx, j) ((idx) ? (idx)[(j)] : (j))

/* Floor of p_true in the calibration NLL, so one confident mistake with a
 * float probability of exactly 0 does not make the mean infinite. */
#define NLL_P_FLOOR 1e-7

#define T_MIN 0.05
#define T_MAX 20.0

static const double z_bins[][2] = {
	{ 0.0, 0.04 }, { 0.04, 0.08 }, { 0.08, 0.12 },
	{ 0.12, 0.15 }, { 0.15, 0.20 }, { 0.20, 0.30 },
};

static const double sn_bins[][2] = {
	{ 5, 10 }, { 10, 15 }, { 15, 20 }, { 20, 25 }, { 25, 30 }, { 30, 100 },
};

/* ---- which items count where (metrics.h, top) ---- */

static int has_pred(const mtlz_eval_item *e)
{
	for (int c = 0; c < MTLZ_N_CLASSES; c++)
		if (!isfinite(e->prob[c]))
			return 0;
	return 1;
}

static int in_class_set(const mtlz_eval_item *e)
{
	return e->true_cls >= 0 && e->true_cls < MTLZ_N_CLASSES && has_pred(e);
}

static int in_oh_set(const mtlz_eval_item *e)
{
	return e->true_cls == MTLZ_CLASS_STAR_FORMING && isfinite(e->oh_true) &&
	       isfinite(e->oh_pred);
}

static int in_sigma_set(const mtlz_eval_item *e)
{
	return in_oh_set(e) && isfinite(e->oh_sigma) && e->oh_sigma >= 0;
}

static int in_logit_set(const mtlz_eval_item *e)
{
	if (e->true_cls < 0 || e->true_cls >= MTLZ_N_CLASSES)
		return 0;
	for (int c = 0; c < MTLZ_N_CLASSES; c++)
		if (!isfinite(e->logit[c]))
			return 0;
	return 1;
}

static int stat_is_class(int stat)
{
	return stat == MTLZ_STAT_ACCURACY || stat == MTLZ_STAT_F1_MACRO;
}

static int in_stat_set(const mtlz_eval_item *e, int stat)
{
	return stat_is_class(stat) ? in_class_set(e) : in_oh_set(e);
}

static int argmax4(const float *p)
{
	int best = 0;

	for (int c = 1; c < MTLZ_N_CLASSES; c++)
		if (p[c] > p[best])
			best = c;
	return best;
}

static double max4(const float *p)
{
	return p[argmax4(p)];
}

/* ---- small numeric helpers ---- */

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* Percentile p in [0, 1] of sorted x[0..m-1], numpy's linear rule. */
static double pct_sorted(const double *x, size_t m, double p)
{
	double h, f;
	size_t k;

	if (m == 0)
		return NAN;
	h = (double)(m - 1) * p;
	k = (size_t)floor(h);
	if (k >= m - 1)
		return x[m - 1];
	f = h - (double)k;
	return x[k] + f * (x[k + 1] - x[k]);
}

/* Population mean and standard deviation of x[0..m-1] (two passes). */
static void mean_sd(const double *x, size_t m, double *mean, double *sd)
{
	double s = 0, ss = 0;

	if (m == 0) {
		*mean = *sd = NAN;
		return;
	}
	for (size_t i = 0; i < m; i++)
		s += x[i];
	s /= (double)m;
	for (size_t i = 0; i < m; i++)
		ss += (x[i] - s) * (x[i] - s);
	*mean = s;
	*sd = sqrt(ss / (double)m);
}

/* Bin b of B equal-width confidence bins (b/B, (b+1)/B]; the final
 * adjustment makes the assignment agree exactly with the edges b/B that
 * are reported, whatever ceil() made of the product. */
static int conf_bin(double c, int nb)
{
	int b;

	if (!(c > 0))
		return 0;
	if (c >= 1)
		return nb - 1;
	b = (int)ceil(c * nb) - 1;
	b = MTLZ_MAX(0, MTLZ_MIN(b, nb - 1));
	while (b > 0 && c <= (double)b / nb)
		b--;
	while (b < nb - 1 && c > (double)(b + 1) / nb)
		b++;
	return b;
}

/* Bin k = [k / per_dex, (k + 1) / per_dex) of x (|x| < 1e6); the edges
 * k / per_dex are correctly rounded, so 8.3 is the lower edge of its bin
 * as the decimal literal says. */
static long dex_bin(double x, int per_dex)
{
	long k = (long)floor(x * per_dex);

	while (x < (double)k / per_dex)
		k--;
	while (x >= (double)(k + 1) / per_dex)
		k++;
	return k;
}

/* ---- classification ---- */

/* Everything else in *out from out->confusion (the rest zeroed). */
static void class_finish(mtlz_class_metrics *out)
{
	double sp = 0, sr = 0, sf = 0, wp = 0, wr = 0, wf = 0;
	long correct = 0;
	int n_present = 0;

	for (int t = 0; t < MTLZ_N_CLASSES; t++) {
		for (int p = 0; p < MTLZ_N_CLASSES; p++) {
			out->support[t] += out->confusion[t][p];
			out->predicted[p] += out->confusion[t][p];
		}
		out->n += (size_t)out->support[t];
		correct += out->confusion[t][t];
	}
	out->accuracy = out->n ? (double)correct / (double)out->n : NAN;
	for (int c = 0; c < MTLZ_N_CLASSES; c++) {
		long tp = out->confusion[c][c];
		long fp = out->predicted[c] - tp, fn = out->support[c] - tp;
		double p, r, f;

		out->precision[c] = out->predicted[c] ? (double)tp / (double)out->predicted[c] : NAN;
		out->recall[c] = out->support[c] ? (double)tp / (double)out->support[c] : NAN;
		out->f1[c] = 2 * tp + fp + fn ? 2.0 * (double)tp / (double)(2 * tp + fp + fn) : NAN;
		if (!out->support[c] && !out->predicted[c])
			continue;
		/* sklearn zero_division=0: an undefined value of a present class is 0 */
		p = isnan(out->precision[c]) ? 0 : out->precision[c];
		r = isnan(out->recall[c]) ? 0 : out->recall[c];
		f = isnan(out->f1[c]) ? 0 : out->f1[c];
		sp += p;
		sr += r;
		sf += f;
		wp += (double)out->support[c] * p;
		wr += (double)out->support[c] * r;
		wf += (double)out->support[c] * f;
		n_present++;
	}
	out->precision_macro = n_present ? sp / n_present : NAN;
	out->recall_macro = n_present ? sr / n_present : NAN;
	out->f1_macro = n_present ? sf / n_present : NAN;
	out->precision_weighted = out->n ? wp / (double)out->n : NAN;
	out->recall_weighted = out->n ? wr / (double)out->n : NAN;
	out->f1_weighted = out->n ? wf / (double)out->n : NAN;
}

static void class_metrics_idx(const mtlz_eval_item *it, const size_t *idx,
			      size_t m, mtlz_class_metrics *out)
{
	memset(out, 0, sizeof(*out));
	for (size_t j = 0; j < m; j++) {
		const mtlz_eval_item *e = &it[IDX(idx, j)];

		if (in_class_set(e))
			out->confusion[e->true_cls][argmax4(e->prob)]++;
	}
	class_finish(out);
}

void mtlz_metrics_class(const mtlz_eval_item *it, size_t n, mtlz_class_metrics *out)
{
	class_metrics_idx(it, NULL, it ? n : 0, out);
}

/* ---- metallicity ---- */

static void oh_metrics_idx(const mtlz_eval_item *it, const size_t *idx, size_t m,
			   mtlz_oh_metrics *out)
{
	double sr = 0, sa = 0, s2 = 0, st = 0, ss_dev = 0, ss_tot = 0;
	double tmin = INFINITY, tmax = -INFINITY, mean_r, mean_t;
	size_t k = 0;

	for (size_t j = 0; j < m; j++) {
		const mtlz_eval_item *e = &it[IDX(idx, j)];
		double r;

		if (!in_oh_set(e))
			continue;
		r = e->oh_pred - e->oh_true;
		sr += r;
		sa += fabs(r);
		s2 += r * r;
		st += e->oh_true;
		tmin = MTLZ_MIN(tmin, e->oh_true);
		tmax = MTLZ_MAX(tmax, e->oh_true);
		k++;
	}
	out->n = k;
	if (k == 0) {
		out->mse = out->mae = out->r2 = out->sd = out->bias = NAN;
		return;
	}
	mean_r = sr / (double)k;
	mean_t = st / (double)k;
	for (size_t j = 0; j < m; j++) {
		const mtlz_eval_item *e = &it[IDX(idx, j)];
		double d;

		if (!in_oh_set(e))
			continue;
		d = e->oh_pred - e->oh_true - mean_r;
		ss_dev += d * d;
		ss_tot += (e->oh_true - mean_t) * (e->oh_true - mean_t);
	}
	out->bias = mean_r;
	out->mse = s2 / (double)k;
	out->mae = sa / (double)k;
	out->sd = sqrt(ss_dev / (double)k);
	/* tmin == tmax rather than ss_tot == 0: the mean of equal values need
	 * not be exactly that value, which would leave a tiny ss_tot */
	out->r2 = k >= 2 && tmax > tmin ? 1.0 - s2 / ss_tot : NAN;
}

void mtlz_metrics_oh(const mtlz_eval_item *it, size_t n, mtlz_oh_metrics *out)
{
	oh_metrics_idx(it, NULL, it ? n : 0, out);
}

/* ---- statistics and the bootstrap ---- */

static double stat_idx(const mtlz_eval_item *it, const size_t *idx, size_t m, int stat)
{
	mtlz_class_metrics cm;
	mtlz_oh_metrics om;

	if (stat_is_class(stat)) {
		class_metrics_idx(it, idx, m, &cm);
		return stat == MTLZ_STAT_ACCURACY ? cm.accuracy : cm.f1_macro;
	}
	oh_metrics_idx(it, idx, m, &om);
	switch (stat) {
	case MTLZ_STAT_OH_SD: return om.sd;
	case MTLZ_STAT_OH_BIAS: return om.bias;
	case MTLZ_STAT_OH_MAE: return om.mae;
	case MTLZ_STAT_OH_MSE: return om.mse;
	case MTLZ_STAT_OH_R2: return om.r2;
	default: return NAN;
	}
}

double mtlz_metrics_stat(const mtlz_eval_item *it, size_t n, int stat)
{
	if (stat < 0 || stat >= MTLZ_N_STATS || !it)
		return NAN;
	return stat_idx(it, NULL, n, stat);
}

/* Uniform index in [0, m) (m >= 1). */
static size_t rng_below(mtlz_rng *r, size_t m)
{
	size_t k = (size_t)(mtlz_rng_uniform(r) * (double)m);

	return k < m ? k : m - 1;
}

/*
 * One bootstrap replicate of stat from m draws out of the eligible items,
 * reduced beforehand to what the statistic needs: code[] = true * 4 +
 * predicted for class statistics; residuals r[] and truths t[] for the oh
 * ones, accumulated around the full-sample means (cr, ct) so that the
 * one-pass variances do not cancel. Same definitions as class_finish and
 * oh_metrics_idx, several times faster than going back to the items.
 */
typedef struct boot_data {
	size_t m;
	unsigned char *code;
	double *r, *t;
	double cr, ct;
} boot_data;

static double boot_replicate(const boot_data *d, int stat, mtlz_rng *rng)
{
	const double m = (double)d->m;
	double sd = 0, sd2 = 0, sa = 0, se = 0, se2 = 0, tmin = INFINITY, tmax = -INFINITY;
	double mean_d, mse, var;
	mtlz_class_metrics cm;

	if (stat_is_class(stat)) {
		memset(&cm, 0, sizeof(cm));
		for (size_t j = 0; j < d->m; j++) {
			unsigned c = d->code[rng_below(rng, d->m)];

			cm.confusion[c >> 2][c & 3]++;
		}
		class_finish(&cm);
		return stat == MTLZ_STAT_ACCURACY ? cm.accuracy : cm.f1_macro;
	}
	for (size_t j = 0; j < d->m; j++) {
		size_t k = rng_below(rng, d->m);
		double dr = d->r[k] - d->cr, dt = d->t[k] - d->ct;

		sd += dr;
		sd2 += dr * dr;
		sa += fabs(d->r[k]);
		se += dt;
		se2 += dt * dt;
		tmin = MTLZ_MIN(tmin, d->t[k]);
		tmax = MTLZ_MAX(tmax, d->t[k]);
	}
	mean_d = sd / m;
	mse = sd2 / m + 2 * d->cr * mean_d + d->cr * d->cr;
	var = MTLZ_MAX(0.0, sd2 / m - mean_d * mean_d);
	switch (stat) {
	case MTLZ_STAT_OH_SD: return sqrt(var);
	case MTLZ_STAT_OH_BIAS: return d->cr + mean_d;
	case MTLZ_STAT_OH_MAE: return sa / m;
	case MTLZ_STAT_OH_MSE: return mse;
	case MTLZ_STAT_OH_R2:
		return d->m >= 2 && tmax > tmin ? 1.0 - m * mse / (se2 - se * se / m) : NAN;
	default: return NAN;
	}
}

/* Percentile bootstrap over the eligible items elig[0..m-1]. */
static int boot_ci_elig(const mtlz_eval_item *it, const size_t *elig, size_t m,
			int stat, int n_boot, uint64_t seed, double level,
			double *lo, double *hi)
{
	boot_data d = { .m = m };
	double *vals = NULL;
	size_t k = 0;
	int rc = MTLZ_ERR_NOMEM;
	mtlz_rng r;

	*lo = *hi = NAN;
	if (m == 0)
		return MTLZ_ERR_INVALID;
	if (stat_is_class(stat)) {
		d.code = malloc(m);
		if (!d.code)
			goto out_free;
		for (size_t j = 0; j < m; j++) {
			const mtlz_eval_item *e = &it[elig[j]];

			d.code[j] = (unsigned char)(e->true_cls * 4 + argmax4(e->prob));
		}
	} else {
		d.r = malloc(m * sizeof(*d.r));
		d.t = malloc(m * sizeof(*d.t));
		if (!d.r || !d.t)
			goto out_free;
		for (size_t j = 0; j < m; j++) {
			const mtlz_eval_item *e = &it[elig[j]];

			d.r[j] = e->oh_pred - e->oh_true;
			d.t[j] = e->oh_true;
			d.cr += d.r[j];
			d.ct += d.t[j];
		}
		d.cr /= (double)m;
		d.ct /= (double)m;
	}
	vals = malloc((size_t)n_boot * sizeof(*vals));
	if (!vals)
		goto out_free;
	mtlz_rng_seed(&r, seed);
	for (int b = 0; b < n_boot; b++) {
		double v = boot_replicate(&d, stat, &r);

		if (isfinite(v))
			vals[k++] = v;
	}
	if (k) {
		qsort(vals, k, sizeof(*vals), cmp_double);
		*lo = pct_sorted(vals, k, (1 - level) / 2);
		*hi = pct_sorted(vals, k, (1 + level) / 2);
	}
	rc = MTLZ_OK;
out_free:
	free(vals);
	free(d.code);
	free(d.r);
	free(d.t);
	return rc;
}

/* The items of idx[0..m-1] (NULL: 0..m-1) eligible for stat, into out. */
static size_t collect_stat_set(const mtlz_eval_item *it, const size_t *idx, size_t m,
			       int stat, size_t *out)
{
	size_t k = 0;

	for (size_t j = 0; j < m; j++)
		if (in_stat_set(&it[IDX(idx, j)], stat))
			out[k++] = IDX(idx, j);
	return k;
}

int mtlz_bootstrap_ci(const mtlz_eval_item *it, size_t n, int stat, int n_boot,
		      uint64_t seed, double level, double *lo, double *hi)
{
	size_t *elig, m;
	int rc;

	*lo = *hi = NAN;
	if (stat < 0 || stat >= MTLZ_N_STATS || n_boot < 1 || !(level > 0 && level < 1) ||
	    (!it && n))
		return MTLZ_ERR_INVALID;
	elig = malloc((n + 1) * sizeof(*elig));
	if (!elig)
		return MTLZ_ERR_NOMEM;
	m = collect_stat_set(it, NULL, n, stat, elig);
	rc = boot_ci_elig(it, elig, m, stat, n_boot, seed, level, lo, hi);
	free(elig);
	return rc;
}

/* ---- temperature scaling ---- */

/* NLL of softmax(logit / t) of one item (in the logit set). */
static double item_nll(const mtlz_eval_item *e, double t)
{
	double z[MTLZ_N_CLASSES], mx = -INFINITY, se = 0;

	for (int c = 0; c < MTLZ_N_CLASSES; c++) {
		z[c] = e->logit[c] / t;
		mx = MTLZ_MAX(mx, z[c]);
	}
	for (int c = 0; c < MTLZ_N_CLASSES; c++)
		se += exp(z[c] - mx);
	return mx + log(se) - z[e->true_cls];
}

double mtlz_temperature_nll(const mtlz_eval_item *it, size_t n, double t)
{
	double s = 0;
	size_t k = 0;

	if (!it || !(t > 0))
		return NAN;
	for (size_t i = 0; i < n; i++) {
		if (!in_logit_set(&it[i]))
			continue;
		s += item_nll(&it[i], t);
		k++;
	}
	return k ? s / (double)k : NAN;
}

double mtlz_fit_temperature(const mtlz_eval_item *it, size_t n)
{
	const double g = (sqrt(5.0) - 1) / 2;
	double a = log(T_MIN), b = log(T_MAX), c, d, fc, fd, best, fbest;

	if (!isfinite(mtlz_temperature_nll(it, n, 1.0)))
		return NAN;
	c = b - g * (b - a);
	d = a + g * (b - a);
	fc = mtlz_temperature_nll(it, n, exp(c));
	fd = mtlz_temperature_nll(it, n, exp(d));
	while (b - a > 1e-7) {
		if (fc <= fd) {
			b = d;
			d = c;
			fd = fc;
			c = b - g * (b - a);
			fc = mtlz_temperature_nll(it, n, exp(c));
		} else {
			a = c;
			c = d;
			fc = fd;
			d = a + g * (b - a);
			fd = mtlz_temperature_nll(it, n, exp(d));
		}
	}
	best = (a + b) / 2;
	fbest = mtlz_temperature_nll(it, n, exp(best));
	/* a flat or monotone NLL converges onto an end; make sure we say so */
	if (mtlz_temperature_nll(it, n, T_MIN) < fbest)
		return T_MIN;
	if (mtlz_temperature_nll(it, n, T_MAX) < fbest)
		return T_MAX;
	return exp(best);
}

void mtlz_apply_temperature(mtlz_eval_item *it, size_t n, double t)
{
	if (!it || !(t > 0))
		return;
	for (size_t i = 0; i < n; i++) {
		mtlz_eval_item *e = &it[i];
		double z[MTLZ_N_CLASSES], mx = -INFINITY, se = 0;
		int ok = 1;

		for (int c = 0; c < MTLZ_N_CLASSES; c++)
			ok &= isfinite(e->logit[c]);
		if (!ok)
			continue;
		for (int c = 0; c < MTLZ_N_CLASSES; c++) {
			z[c] = e->logit[c] / t;
			mx = MTLZ_MAX(mx, z[c]);
		}
		for (int c = 0; c < MTLZ_N_CLASSES; c++)
			se += (z[c] = exp(z[c] - mx));
		for (int c = 0; c < MTLZ_N_CLASSES; c++)
			e->prob[c] = (float)(z[c] / se);
	}
}

/* ---- calibration ---- */

double mtlz_ece(const mtlz_eval_item *it, size_t n, int n_bins, long *count,
		double *conf, double *acc)
{
	double *sc, *sa, ece = 0;
	long *cnt;
	size_t total = 0;

	if (n_bins < 1)
		return NAN;
	cnt = calloc((size_t)n_bins, sizeof(*cnt));
	sc = calloc((size_t)n_bins, sizeof(*sc));
	sa = calloc((size_t)n_bins, sizeof(*sa));
	if (!cnt || !sc || !sa) {
		ece = NAN;
		goto out_free;
	}
	for (size_t i = 0; it && i < n; i++) {
		const mtlz_eval_item *e = &it[i];
		double c;
		int b;

		if (!in_class_set(e))
			continue;
		c = max4(e->prob);
		b = conf_bin(c, n_bins);
		cnt[b]++;
		sc[b] += c;
		sa[b] += argmax4(e->prob) == e->true_cls;
		total++;
	}
	for (int b = 0; b < n_bins; b++) {
		double mc = cnt[b] ? sc[b] / (double)cnt[b] : NAN;
		double ma = cnt[b] ? sa[b] / (double)cnt[b] : NAN;

		if (count)
			count[b] = cnt[b];
		if (conf)
			conf[b] = mc;
		if (acc)
			acc[b] = ma;
		if (cnt[b])
			ece += (double)cnt[b] / (double)total * fabs(ma - mc);
	}
	if (!total)
		ece = NAN;
out_free:
	free(cnt);
	free(sc);
	free(sa);
	return ece;
}

double mtlz_tremonti04_oh(double x)
{
	return -1.492 + 1.847 * x - 0.08026 * x * x;
}

/* ---- JSON ---- */

/* jansson refuses NaN and infinities: undefined numbers become null. */
static json_t *jnum(double v)
{
	return isfinite(v) ? json_real(v) : json_null();
}

/* json_object_set_new / json_array_append_new take NULL values and NULL
 * containers (returning -1), so a failed allocation anywhere surfaces here
 * as *bad without a check at every call. */
static void put(json_t *o, const char *key, json_t *v, int *bad)
{
	if (json_object_set_new(o, key, v))
		*bad = 1;
}

static void push(json_t *a, json_t *v, int *bad)
{
	if (json_array_append_new(a, v))
		*bad = 1;
}

static json_t *jpair(double a, double b, int *bad)
{
	json_t *p = json_array();

	push(p, jnum(a), bad);
	push(p, jnum(b), bad);
	return p;
}

typedef struct json_ctx {
	const mtlz_eval_item *it;
	size_t n;
	const mtlz_metrics_opts *opts;
	size_t *scratch;     /* n + 1 indices */
	size_t *elig;        /* n + 1 indices */
	double *va, *vb;     /* n + 1 values */
	int bad;
} json_ctx;

/* Bootstrap CI of stat over idx[0..m-1] (NULL: all) as [lo, hi]; nulls
 * when no item is eligible. */
static json_t *ci_json(json_ctx *x, const size_t *idx, size_t m, int stat, uint64_t salt)
{
	size_t k = collect_stat_set(x->it, idx, m, stat, x->elig);
	double lo, hi;
	int rc = boot_ci_elig(x->it, x->elig, k, stat, x->opts->n_boot,
			      x->opts->seed ^ (salt * 0x9e3779b97f4a7c15ULL),
			      x->opts->ci_level, &lo, &hi);

	if (rc == MTLZ_ERR_NOMEM)
		x->bad = 1;
	return jpair(lo, hi, &x->bad);
}

static void put_class(json_ctx *x, json_t *root)
{
	mtlz_class_metrics cm;
	json_t *names = json_array(), *conf = json_array(), *norm = json_array();
	json_t *per = json_object();

	class_metrics_idx(x->it, NULL, x->n, &cm);
	put(root, "n", json_integer((json_int_t)cm.n), &x->bad);
	for (int c = 0; c < MTLZ_N_CLASSES; c++)
		push(names, json_string(mtlz_class_name(c)), &x->bad);
	put(root, "classes", names, &x->bad);
	put(root, "accuracy", jnum(cm.accuracy), &x->bad);
	put(root, "precision_macro", jnum(cm.precision_macro), &x->bad);
	put(root, "recall_macro", jnum(cm.recall_macro), &x->bad);
	put(root, "f1_macro", jnum(cm.f1_macro), &x->bad);
	put(root, "precision_weighted", jnum(cm.precision_weighted), &x->bad);
	put(root, "recall_weighted", jnum(cm.recall_weighted), &x->bad);
	put(root, "f1_weighted", jnum(cm.f1_weighted), &x->bad);
	if (x->opts->n_boot > 0) {
		put(root, "accuracy_ci", ci_json(x, NULL, x->n, MTLZ_STAT_ACCURACY, 1), &x->bad);
		put(root, "f1_macro_ci", ci_json(x, NULL, x->n, MTLZ_STAT_F1_MACRO, 2), &x->bad);
	}
	for (int t = 0; t < MTLZ_N_CLASSES; t++) {
		json_t *row = json_array(), *nrow = cm.support[t] ? json_array() : json_null();

		for (int p = 0; p < MTLZ_N_CLASSES; p++) {
			push(row, json_integer(cm.confusion[t][p]), &x->bad);
			if (cm.support[t])
				push(nrow, json_real((double)cm.confusion[t][p] /
						     (double)cm.support[t]), &x->bad);
		}
		push(conf, row, &x->bad);
		push(norm, nrow, &x->bad);
	}
	put(root, "confusion", conf, &x->bad);
	put(root, "confusion_normalized", norm, &x->bad);
	for (int c = 0; c < MTLZ_N_CLASSES; c++) {
		json_t *o = json_object();

		put(o, "precision", jnum(cm.precision[c]), &x->bad);
		put(o, "recall", jnum(cm.recall[c]), &x->bad);
		put(o, "f1", jnum(cm.f1[c]), &x->bad);
		put(o, "support", json_integer(cm.support[c]), &x->bad);
		put(o, "predicted", json_integer(cm.predicted[c]), &x->bad);
		put(per, mtlz_class_name(c), o, &x->bad);
	}
	put(root, "per_class", per, &x->bad);
}

static void put_oh(json_ctx *x, json_t *root)
{
	mtlz_oh_metrics om;
	json_t *o = json_object();

	oh_metrics_idx(x->it, NULL, x->n, &om);
	put(o, "n", json_integer((json_int_t)om.n), &x->bad);
	put(o, "mse", jnum(om.mse), &x->bad);
	put(o, "mae", jnum(om.mae), &x->bad);
	put(o, "r2", jnum(om.r2), &x->bad);
	put(o, "sd", jnum(om.sd), &x->bad);
	put(o, "bias", jnum(om.bias), &x->bad);
	if (x->opts->n_boot > 0) {
		put(o, "sd_ci", ci_json(x, NULL, x->n, MTLZ_STAT_OH_SD, 3), &x->bad);
		put(o, "bias_ci", ci_json(x, NULL, x->n, MTLZ_STAT_OH_BIAS, 4), &x->bad);
		put(o, "mae_ci", ci_json(x, NULL, x->n, MTLZ_STAT_OH_MAE, 5), &x->bad);
	}
	put(root, "oh", o, &x->bad);
}

/* by_z (use_sn 0) or by_sn (1). */
static json_t *bins_json(json_ctx *x, const double (*edges)[2], size_t n_bins, int use_sn)
{
	json_t *arr = json_array();

	for (size_t b = 0; b < n_bins; b++) {
		json_t *o = json_object();
		mtlz_class_metrics cm;
		mtlz_oh_metrics om;
		size_t m = 0;

		for (size_t i = 0; i < x->n; i++) {
			double v = use_sn ? x->it[i].sn_r : x->it[i].z;

			if (v >= edges[b][0] && v < edges[b][1])
				x->scratch[m++] = i;
		}
		class_metrics_idx(x->it, x->scratch, m, &cm);
		oh_metrics_idx(x->it, x->scratch, m, &om);
		put(o, "lo", json_real(edges[b][0]), &x->bad);
		put(o, "hi", json_real(edges[b][1]), &x->bad);
		put(o, "n", json_integer((json_int_t)cm.n), &x->bad);
		put(o, "accuracy", jnum(cm.accuracy), &x->bad);
		put(o, "oh_n", json_integer((json_int_t)om.n), &x->bad);
		put(o, "oh_sd", jnum(om.sd), &x->bad);
		put(o, "oh_bias", jnum(om.bias), &x->bad);
		put(o, "oh_mae", jnum(om.mae), &x->bad);
		if (x->opts->n_boot > 0) {
			uint64_t salt = 100 + 10 * b + 1000 * (uint64_t)use_sn;

			put(o, "accuracy_ci", ci_json(x, x->scratch, m, MTLZ_STAT_ACCURACY, salt), &x->bad);
			put(o, "oh_sd_ci", ci_json(x, x->scratch, m, MTLZ_STAT_OH_SD, salt + 1), &x->bad);
		}
		push(arr, o, &x->bad);
	}
	return arr;
}

typedef struct keyed {
	long k;
	size_t i;
} keyed;

static int cmp_keyed(const void *a, const void *b)
{
	const keyed *p = a, *q = b;

	if (p->k != q->k)
		return (p->k > q->k) - (p->k < q->k);
	return (p->i > q->i) - (p->i < q->i);
}

/* uncertainty_by_oh (by_pred 0: bins of oh_true) or _pred (1). */
static json_t *uncertainty_json(json_ctx *x, int by_pred)
{
	const int per_dex = (int)lround(1.0 / MTLZ_METRICS_OH_BIN_DEX);
	json_t *arr = json_array();
	keyed *ks = malloc((x->n + 1) * sizeof(*ks));
	size_t m = 0;

	if (!ks) {
		x->bad = 1;
		return arr;
	}
	for (size_t i = 0; i < x->n; i++) {
		const mtlz_eval_item *e = &x->it[i];
		double v = by_pred ? e->oh_pred : e->oh_true;

		if (in_sigma_set(e) && fabs(v) < 1e6)
			ks[m++] = (keyed){ dex_bin(v, per_dex), i };
	}
	qsort(ks, m, sizeof(*ks), cmp_keyed);
	for (size_t s = 0; s < m;) {
		size_t e = s, cnt;
		double mean, sd, r_mean, r_sd, med;
		json_t *o = json_object();

		while (e < m && ks[e].k == ks[s].k)
			e++;
		cnt = e - s;
		for (size_t j = s; j < e; j++) {
			const mtlz_eval_item *it = &x->it[ks[j].i];

			x->va[j - s] = it->oh_sigma;
			x->vb[j - s] = it->oh_pred - it->oh_true;
		}
		mean_sd(x->va, cnt, &mean, &sd);
		mean_sd(x->vb, cnt, &r_mean, &r_sd);
		qsort(x->va, cnt, sizeof(double), cmp_double);
		med = pct_sorted(x->va, cnt, 0.5);
		put(o, "lo", json_real((double)ks[s].k / per_dex), &x->bad);
		put(o, "hi", json_real((double)(ks[s].k + 1) / per_dex), &x->bad);
		put(o, "n", json_integer((json_int_t)cnt), &x->bad);
		put(o, "mean_sigma", jnum(mean), &x->bad);
		put(o, "median_sigma", jnum(med), &x->bad);
		put(o, "sd_sigma", jnum(sd), &x->bad);
		put(o, "residual_sd", jnum(r_sd), &x->bad);
		push(arr, o, &x->bad);
		s = e;
	}
	free(ks);
	return arr;
}

static json_t *calibration_json(json_ctx *x)
{
	const int nb = x->opts->n_ece_bins;
	json_t *o = json_object(), *bins = json_array();
	long *cnt = malloc((size_t)nb * sizeof(*cnt));
	double *conf = malloc((size_t)nb * sizeof(*conf));
	double *acc = malloc((size_t)nb * sizeof(*acc));
	double ece, nll = 0, brier = 0;
	size_t k = 0;

	if (!cnt || !conf || !acc) {
		x->bad = 1;
		goto out_free;
	}
	ece = mtlz_ece(x->it, x->n, nb, cnt, conf, acc);
	for (size_t i = 0; i < x->n; i++) {
		const mtlz_eval_item *e = &x->it[i];

		if (!in_class_set(e))
			continue;
		nll -= log(MTLZ_MAX((double)e->prob[e->true_cls], NLL_P_FLOOR));
		for (int c = 0; c < MTLZ_N_CLASSES; c++) {
			double d = e->prob[c] - (c == e->true_cls);

			brier += d * d;
		}
		k++;
	}
	put(o, "n", json_integer((json_int_t)k), &x->bad);
	put(o, "n_bins", json_integer(nb), &x->bad);
	put(o, "ece", jnum(ece), &x->bad);
	put(o, "nll", jnum(k ? nll / (double)k : NAN), &x->bad);
	put(o, "brier", jnum(k ? brier / (double)k : NAN), &x->bad);
	for (int b = 0; b < nb; b++) {
		json_t *bo = json_object();

		put(bo, "lo", json_real((double)b / nb), &x->bad);
		put(bo, "hi", json_real((double)(b + 1) / nb), &x->bad);
		put(bo, "n", json_integer(cnt[b]), &x->bad);
		put(bo, "confidence", jnum(conf[b]), &x->bad);
		put(bo, "accuracy", jnum(acc[b]), &x->bad);
		push(bins, bo, &x->bad);
	}
out_free:
	put(o, "bins", bins, &x->bad);
	free(cnt);
	free(conf);
	free(acc);
	return o;
}

static json_t *coverage_json(json_ctx *x)
{
	json_t *o = json_object();
	size_t k = 0, in1 = 0, in2 = 0;

	for (size_t i = 0; i < x->n; i++) {
		const mtlz_eval_item *e = &x->it[i];
		double r;

		if (!in_sigma_set(e))
			continue;
		r = fabs(e->oh_pred - e->oh_true);
		in1 += r <= e->oh_sigma;
		in2 += r <= 2 * e->oh_sigma;
		k++;
	}
	put(o, "n", json_integer((json_int_t)k), &x->bad);
	put(o, "within_1sigma", jnum(k ? (double)in1 / (double)k : NAN), &x->bad);
	put(o, "within_2sigma", jnum(k ? (double)in2 / (double)k : NAN), &x->bad);
	return o;
}

static json_t *mzr_json(json_ctx *x)
{
	const int per_dex = (int)lround(1.0 / MTLZ_METRICS_MZR_BIN_DEX);
	const long k0 = lround(MTLZ_METRICS_MZR_LO * per_dex);
	const long k1 = lround(MTLZ_METRICS_MZR_HI * per_dex);
	size_t with_mass = 0, in_range = 0;
	json_t *o, *bins;

	for (size_t i = 0; i < x->n; i++) {
		const mtlz_eval_item *e = &x->it[i];

		if (!in_oh_set(e) || !isfinite(e->log_mass))
			continue;
		with_mass++;
		in_range += e->log_mass >= MTLZ_METRICS_MZR_LO && e->log_mass < MTLZ_METRICS_MZR_HI;
	}
	if (!with_mass)
		return json_null();
	o = json_object();
	bins = json_array();
	put(o, "n", json_integer((json_int_t)in_range), &x->bad);
	put(o, "n_out_of_range", json_integer((json_int_t)(with_mass - in_range)), &x->bad);
	put(o, "lo", json_real(MTLZ_METRICS_MZR_LO), &x->bad);
	put(o, "hi", json_real(MTLZ_METRICS_MZR_HI), &x->bad);
	for (long k = k0; k < k1; k++) {
		double lo = (double)k / per_dex, hi = (double)(k + 1) / per_dex;
		double centre = (lo + hi) / 2;
		json_t *bo = json_object();
		size_t m = 0;

		for (size_t i = 0; i < x->n; i++) {
			const mtlz_eval_item *e = &x->it[i];

			if (!in_oh_set(e) || !isfinite(e->log_mass) ||
			    e->log_mass < MTLZ_METRICS_MZR_LO || e->log_mass >= MTLZ_METRICS_MZR_HI ||
			    dex_bin(e->log_mass, per_dex) != k)
				continue;
			x->va[m] = e->oh_true;
			x->vb[m] = e->oh_pred;
			m++;
		}
		qsort(x->va, m, sizeof(double), cmp_double);
		qsort(x->vb, m, sizeof(double), cmp_double);
		put(bo, "lo", json_real(lo), &x->bad);
		put(bo, "hi", json_real(hi), &x->bad);
		put(bo, "centre", json_real(centre), &x->bad);
		put(bo, "n", json_integer((json_int_t)m), &x->bad);
		put(bo, "true_median", jnum(pct_sorted(x->va, m, 0.5)), &x->bad);
		put(bo, "true_p16", jnum(pct_sorted(x->va, m, 0.16)), &x->bad);
		put(bo, "true_p84", jnum(pct_sorted(x->va, m, 0.84)), &x->bad);
		put(bo, "pred_median", jnum(pct_sorted(x->vb, m, 0.5)), &x->bad);
		put(bo, "pred_p16", jnum(pct_sorted(x->vb, m, 0.16)), &x->bad);
		put(bo, "pred_p84", jnum(pct_sorted(x->vb, m, 0.84)), &x->bad);
		put(bo, "tremonti", jnum(mtlz_tremonti04_oh(centre)), &x->bad);
		push(bins, bo, &x->bad);
	}
	put(o, "bins", bins, &x->bad);
	return o;
}

json_t *mtlz_metrics_json_opts(const mtlz_eval_item *it, size_t n,
			       const mtlz_metrics_opts *opts, char *errstr,
			       size_t errstr_size)
{
	mtlz_metrics_opts o = opts ? *opts : (mtlz_metrics_opts){ 0 };
	json_ctx x = { .it = it, .n = n, .opts = &o };
	json_t *root = NULL;

	if (!it && n) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "metrics: %zu items but no item array", n);
		return NULL;
	}
	if (o.n_ece_bins < 0 || o.n_ece_bins > 1000 || o.n_boot < 0 ||
	    (o.ci_level != 0 && !(o.ci_level > 0 && o.ci_level < 1))) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "metrics: options n_ece_bins=%d (0..1000), n_boot=%d (>= 0), "
			 "ci_level=%g (0 or in (0, 1)) out of range",
			 o.n_ece_bins, o.n_boot, o.ci_level);
		return NULL;
	}
	if (!o.n_ece_bins)
		o.n_ece_bins = MTLZ_METRICS_ECE_BINS;
	if (!o.ci_level)
		o.ci_level = 0.95;
	x.scratch = malloc((n + 1) * sizeof(*x.scratch));
	x.elig = malloc((n + 1) * sizeof(*x.elig));
	x.va = malloc((n + 1) * sizeof(*x.va));
	x.vb = malloc((n + 1) * sizeof(*x.vb));
	root = json_object();
	if (!x.scratch || !x.elig || !x.va || !x.vb || !root) {
		x.bad = 1;
		goto out_free;
	}
	put(root, "n_items", json_integer((json_int_t)n), &x.bad);
	put_class(&x, root);
	put_oh(&x, root);
	put(root, "by_z", bins_json(&x, z_bins, MTLZ_ARRAY_SIZE(z_bins), 0), &x.bad);
	put(root, "by_sn", bins_json(&x, sn_bins, MTLZ_ARRAY_SIZE(sn_bins), 1), &x.bad);
	put(root, "uncertainty_by_oh", uncertainty_json(&x, 0), &x.bad);
	put(root, "uncertainty_by_oh_pred", uncertainty_json(&x, 1), &x.bad);
	put(root, "calibration", calibration_json(&x), &x.bad);
	put(root, "coverage", coverage_json(&x), &x.bad);
	put(root, "mzr", mzr_json(&x), &x.bad);
	if (o.n_boot > 0) {
		json_t *bo = json_object();

		put(bo, "n_boot", json_integer(o.n_boot), &x.bad);
		put(bo, "seed", json_integer((json_int_t)o.seed), &x.bad);
		put(bo, "level", json_real(o.ci_level), &x.bad);
		put(root, "bootstrap", bo, &x.bad);
	}
out_free:
	free(x.scratch);
	free(x.elig);
	free(x.va);
	free(x.vb);
	if (x.bad) {
		json_decref(root);
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
			 "metrics: out of memory building the report of %zu items", n);
		return NULL;
	}
	return root;
}

json_t *mtlz_metrics_json(const mtlz_eval_item *it, size_t n, char *errstr,
			  size_t errstr_size)
{
	return mtlz_metrics_json_opts(it, n, NULL, errstr, errstr_size);
}
