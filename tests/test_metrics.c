/*
 * test_metrics.c - the evaluation metrics (metrics.h) against references
 * that do not share its code: hand-worked examples (written out in the
 * comments), a naive ECE, a brute-force NLL grid for temperature scaling,
 * the Gaussian 1/2 sigma fractions for coverage, and the normal
 * approximation of a binomial for the bootstrap; plus the JSON contract on
 * degenerate inputs (empty, unlabelled, no metallicity).
 */
#include "common.h"
#include "labels.h"
#include "metrics.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { P = MTLZ_CLASS_PASSIVE, SF = MTLZ_CLASS_STAR_FORMING, C = MTLZ_CLASS_COMPOSITE, A = MTLZ_CLASS_AGN };

/* An item with no label of any kind and no prediction. */
static mtlz_eval_item blank(void)
{
	mtlz_eval_item e;

	memset(&e, 0, sizeof(e));
	e.true_cls = MTLZ_CLASS_NONE;
	for (int c = 0; c < 4; c++) {
		e.prob[c] = NAN;
		e.logit[c] = NAN;
	}
	e.oh_true = e.oh_pred = e.oh_sigma = NAN;
	e.z = e.sn_r = e.log_mass = NAN;
	return e;
}

/* True class t, predicted class p (prob 0.7 on p, 0.1 elsewhere). */
static mtlz_eval_item cls_item(int t, int p)
{
	mtlz_eval_item e = blank();

	e.true_cls = t;
	for (int c = 0; c < 4; c++)
		e.prob[c] = c == p ? 0.7f : 0.1f;
	return e;
}

static mtlz_eval_item oh_item(double t, double p)
{
	mtlz_eval_item e = cls_item(SF, SF);

	e.oh_true = t;
	e.oh_pred = p;
	return e;
}

static double gauss(mtlz_rng *r)
{
	double u = mtlz_rng_uniform(r), v = mtlz_rng_uniform(r);

	return sqrt(-2 * log(1 - u)) * cos(2 * M_PI * v);
}

/* Number at obj.key (asserts it is a number). */
static double jd(const json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);

	cr_assert(json_is_number(v), "key %s is not a number", key);
	return json_number_value(v);
}

static int jnull(const json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);

	cr_assert(v, "key %s missing", key);
	return json_is_null(v);
}

/* Metrics of items whose JSON must encode (jansson refuses NaN). */
static json_t *report(const mtlz_eval_item *it, size_t n)
{
	char err[256] = "";
	json_t *j = mtlz_metrics_json(it, n, err, sizeof(err));
	char *s;

	cr_assert(j, "mtlz_metrics_json: %s", err);
	s = json_dumps(j, JSON_COMPACT);
	cr_assert(s, "json_dumps failed");
	free(s);
	return j;
}

/*
 * Confusion matrix (rows true, columns predicted):
 *
 *            P   SF   C   A   support
 *   P        5    0   1   0     6
 *   SF       0    8   2   0    10
 *   C        1    1   6   2    10
 *   A        0    0   1   3     4
 *   pred     6    9  10   5    30
 *
 * accuracy  = (5 + 8 + 6 + 3) / 30 = 22/30
 * precision = 5/6, 8/9, 6/10, 3/5
 * recall    = 5/6, 8/10, 6/10, 3/4
 * F1 = 2TP / (2TP + FP + FN) = 10/12, 16/(16+1+2) = 16/19, 12/(12+4+4) = 0.6,
 *      6/(6+2+1) = 6/9
 * macro F1 = (10/12 + 16/19 + 0.6 + 6/9) / 4
 * weighted recall = sum support * recall / 30 = 22/30 (= accuracy)
 */
static const int hand_cm[4][4] = {
	{ 5, 0, 1, 0 }, { 0, 8, 2, 0 }, { 1, 1, 6, 2 }, { 0, 0, 1, 3 },
};

static size_t hand_items(mtlz_eval_item *it)
{
	size_t n = 0;

	for (int t = 0; t < 4; t++)
		for (int p = 0; p < 4; p++)
			for (int k = 0; k < hand_cm[t][p]; k++)
				it[n++] = cls_item(t, p);
	return n;
}

Test(metrics, hand_confusion_matrix)
{
	mtlz_eval_item it[40];
	mtlz_class_metrics cm;
	size_t n = hand_items(it);
	const double prec[4] = { 5.0 / 6, 8.0 / 9, 0.6, 0.6 };
	const double rec[4] = { 5.0 / 6, 0.8, 0.6, 0.75 };
	const double f1[4] = { 10.0 / 12, 16.0 / 19, 0.6, 6.0 / 9 };
	json_t *j, *conf, *pc;

	it[n] = blank(); /* unlabelled: ignored */
	it[n].prob[0] = 1;
	it[n].prob[1] = it[n].prob[2] = it[n].prob[3] = 0;
	n++;
	mtlz_metrics_class(it, n, &cm);
	cr_assert_eq(cm.n, 30);
	cr_assert_float_eq(cm.accuracy, 22.0 / 30, 1e-12);
	for (int c = 0; c < 4; c++) {
		cr_assert_float_eq(cm.precision[c], prec[c], 1e-12, "class %d", c);
		cr_assert_float_eq(cm.recall[c], rec[c], 1e-12, "class %d", c);
		cr_assert_float_eq(cm.f1[c], f1[c], 1e-12, "class %d", c);
	}
	cr_assert_float_eq(cm.f1_macro, (10.0 / 12 + 16.0 / 19 + 0.6 + 6.0 / 9) / 4, 1e-12);
	cr_assert_float_eq(cm.precision_macro, (5.0 / 6 + 8.0 / 9 + 0.6 + 0.6) / 4, 1e-12);
	cr_assert_float_eq(cm.recall_macro, (5.0 / 6 + 0.8 + 0.6 + 0.75) / 4, 1e-12);
	cr_assert_float_eq(cm.recall_weighted, 22.0 / 30, 1e-12);

	j = report(it, n);
	cr_assert_eq(jd(j, "n_items"), 31);
	cr_assert_eq(jd(j, "n"), 30);
	cr_assert_float_eq(jd(j, "accuracy"), 22.0 / 30, 1e-12);
	cr_assert_float_eq(jd(j, "f1_macro"), cm.f1_macro, 1e-12);
	cr_assert_float_eq(jd(j, "precision_macro"), cm.precision_macro, 1e-12);
	cr_assert_float_eq(jd(j, "recall_macro"), cm.recall_macro, 1e-12);
	conf = json_object_get(j, "confusion");
	cr_assert_eq(json_array_size(conf), 4);
	for (int t = 0; t < 4; t++)
		for (int p = 0; p < 4; p++)
			cr_assert_eq(json_integer_value(json_array_get(json_array_get(conf, t), p)),
				     hand_cm[t][p], "confusion[%d][%d]", t, p);
	cr_assert_float_eq(json_real_value(json_array_get(json_array_get(
				   json_object_get(j, "confusion_normalized"), 2), 3)), 0.2, 1e-12);
	pc = json_object_get(j, "per_class");
	cr_assert_float_eq(jd(json_object_get(pc, "star_forming"), "precision"), 8.0 / 9, 1e-12);
	cr_assert_float_eq(jd(json_object_get(pc, "agn"), "recall"), 0.75, 1e-12);
	cr_assert_float_eq(jd(json_object_get(pc, "composite"), "f1"), 0.6, 1e-12);
	cr_assert_eq(jd(json_object_get(pc, "passive"), "support"), 6);
	json_decref(j);
}

/*
 * No AGN anywhere (truth or prediction): left out of the macro means.
 * One composite predicted for a passive galaxy, no composite in the truth:
 *   P: 2 true, 1 right -> precision 1/1, recall 1/2, F1 2/3
 *   SF: 2 true, 2 right -> 1, 1, 1
 *   C: 0 true, 1 predicted -> precision 0/1 = 0, recall undefined (null,
 *      0 in the means), F1 = 0/(0 + 1 + 0) = 0
 *   macro F1 = (2/3 + 1 + 0) / 3, macro recall = (1/2 + 1 + 0) / 3
 */
Test(metrics, absent_class_left_out_of_macro)
{
	mtlz_eval_item it[4] = { cls_item(P, P), cls_item(P, C), cls_item(SF, SF), cls_item(SF, SF) };
	mtlz_class_metrics cm;
	json_t *j, *agn, *comp;

	mtlz_metrics_class(it, 4, &cm);
	cr_assert_float_eq(cm.f1_macro, (2.0 / 3 + 1) / 3, 1e-12);
	cr_assert_float_eq(cm.recall_macro, 1.5 / 3, 1e-12);
	cr_assert_float_eq(cm.precision_macro, 2.0 / 3, 1e-12);
	cr_assert(isnan(cm.recall[C]));
	cr_assert(isnan(cm.precision[A]) && isnan(cm.recall[A]) && isnan(cm.f1[A]));

	j = report(it, 4);
	agn = json_object_get(json_object_get(j, "per_class"), "agn");
	cr_assert(jnull(agn, "precision") && jnull(agn, "recall") && jnull(agn, "f1"));
	cr_assert_eq(jd(agn, "support"), 0);
	comp = json_object_get(json_object_get(j, "per_class"), "composite");
	cr_assert_eq(jd(comp, "precision"), 0);
	cr_assert(jnull(comp, "recall"));
	cr_assert(json_is_null(json_array_get(json_object_get(j, "confusion_normalized"), C)),
		  "a row with no support cannot be normalised");
	json_decref(j);
}

/*
 * true = 8.0 8.5 8.7 9.0 8.8, pred = 8.1 8.4 8.8 9.0 8.6
 * r = pred - true = 0.1 -0.1 0.1 0 -0.2
 * bias = -0.1 / 5 = -0.02
 * MSE = (0.01 + 0.01 + 0.01 + 0 + 0.04) / 5 = 0.014
 * MAE = 0.5 / 5 = 0.1
 * SD: r - bias = 0.12 -0.08 0.12 0.02 -0.18, squares sum 0.068, / 5 = 0.0136,
 *     SD = sqrt(0.0136) = 0.116619...
 * R^2: mean true 8.6, sum (true - 8.6)^2 = 0.36 + 0.01 + 0.01 + 0.16 + 0.04
 *      = 0.58, R^2 = 1 - 0.07 / 0.58 = 0.879310...
 */
Test(metrics, oh_five_items_by_hand)
{
	const double t[5] = { 8.0, 8.5, 8.7, 9.0, 8.8 }, p[5] = { 8.1, 8.4, 8.8, 9.0, 8.6 };
	mtlz_eval_item it[8];
	mtlz_oh_metrics om;
	json_t *j, *oh;

	for (int i = 0; i < 5; i++)
		it[i] = oh_item(t[i], p[i]);
	it[5] = oh_item(7.0, 9.0);       /* an AGN with a metallicity: not star-forming */
	it[5].true_cls = A;
	it[6] = oh_item(NAN, 8.5);       /* star-forming without a label */
	it[7] = oh_item(8.5, NAN);       /* without a prediction */
	mtlz_metrics_oh(it, 8, &om);
	cr_assert_eq(om.n, 5);
	cr_assert_float_eq(om.bias, -0.02, 1e-12);
	cr_assert_float_eq(om.mse, 0.014, 1e-12);
	cr_assert_float_eq(om.mae, 0.1, 1e-12);
	cr_assert_float_eq(om.sd, sqrt(0.0136), 1e-12);
	cr_assert_float_eq(om.r2, 1 - 0.07 / 0.58, 1e-12);
	cr_assert_float_eq(om.sd, 0.116619, 1e-6, "the hand value");
	cr_assert_float_eq(om.r2, 0.879310, 1e-6, "the hand value");

	j = report(it, 8);
	oh = json_object_get(j, "oh");
	cr_assert_eq(jd(oh, "n"), 5);
	cr_assert_float_eq(jd(oh, "mse"), 0.014, 1e-12);
	cr_assert_float_eq(jd(oh, "mae"), 0.1, 1e-12);
	cr_assert_float_eq(jd(oh, "r2"), 1 - 0.07 / 0.58, 1e-12);
	cr_assert_float_eq(jd(oh, "sd"), sqrt(0.0136), 1e-12);
	cr_assert_float_eq(jd(oh, "bias"), -0.02, 1e-12);
	cr_assert_float_eq(mtlz_metrics_stat(it, 8, MTLZ_STAT_OH_SD), sqrt(0.0136), 1e-12);
	json_decref(j);
}

Test(metrics, r2_of_constant_truth_is_null)
{
	mtlz_eval_item it[3] = { oh_item(8.3, 8.2), oh_item(8.3, 8.4), oh_item(8.3, 8.3) };
	json_t *j;

	cr_assert(isnan(mtlz_metrics_stat(it, 3, MTLZ_STAT_OH_R2)));
	j = report(it, 3);
	cr_assert(jnull(json_object_get(j, "oh"), "r2"));
	cr_assert_float_eq(jd(json_object_get(j, "oh"), "sd"), sqrt(0.02 / 3), 1e-12);
	json_decref(j);
	j = report(it, 1); /* one item: SD 0, R^2 undefined */
	cr_assert_eq(jd(json_object_get(j, "oh"), "sd"), 0);
	cr_assert(jnull(json_object_get(j, "oh"), "r2"));
	json_decref(j);
}

/* Index of the by_z / by_sn bin holding count 1 (exactly one item each). */
static int bin_of_single(const json_t *arr, const char *count_key)
{
	int found = -1;

	for (size_t b = 0; b < json_array_size(arr); b++) {
		double c = jd(json_array_get(arr, b), count_key);

		cr_assert(c == 0 || c == 1);
		if (c == 1) {
			cr_assert_eq(found, -1, "item counted twice");
			found = (int)b;
		}
	}
	return found;
}

Test(metrics, items_on_bin_edges_land_in_the_bin_that_starts_there)
{
	/* value, expected bin (-1: none) */
	const struct { double v; int bin; } zs[] = {
		{ 0.0, 0 }, { 0.04, 1 }, { 0.0399999, 0 }, { 0.08, 2 }, { 0.12, 3 },
		{ 0.15, 4 }, { 0.20, 5 }, { 0.2999, 5 }, { 0.30, -1 }, { -0.001, -1 },
	};
	const struct { double v; int bin; } sns[] = {
		{ 5, 0 }, { 4.999, -1 }, { 10, 1 }, { 15, 2 }, { 20, 3 }, { 25, 4 },
		{ 30, 5 }, { 99.9, 5 }, { 100, -1 },
	};
	mtlz_eval_item e = oh_item(8.5, 8.5);
	json_t *j, *arr;
	long cnt[4];

	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(zs); i++) {
		e.z = zs[i].v;
		j = report(&e, 1);
		arr = json_object_get(j, "by_z");
		cr_assert_eq(json_array_size(arr), 6);
		cr_assert_eq(bin_of_single(arr, "n"), zs[i].bin, "z = %g", zs[i].v);
		cr_assert_eq(bin_of_single(arr, "oh_n"), zs[i].bin, "z = %g", zs[i].v);
		json_decref(j);
	}
	e.z = NAN;
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(sns); i++) {
		e.sn_r = sns[i].v;
		j = report(&e, 1);
		arr = json_object_get(j, "by_sn");
		cr_assert_eq(bin_of_single(arr, "n"), sns[i].bin, "S/N %g", sns[i].v);
		if (sns[i].bin >= 0) {
			json_t *b = json_array_get(arr, (size_t)sns[i].bin);

			cr_assert_eq(jd(b, "lo"), sns[i].bin == 0 ? 5 : sns[i].v == 99.9 ? 30 : sns[i].v);
		}
		json_decref(j);
	}

	/* uncertainty_by_oh: 0.1 dex bins of oh_true; 8.3 starts [8.3, 8.4) */
	{
		const double oh[] = { 8.3, 8.2999999, 8.0, 9.1, 8.7 };
		const double lo[] = { 8.3, 8.2, 8.0, 9.1, 8.7 };

		for (size_t i = 0; i < MTLZ_ARRAY_SIZE(oh); i++) {
			mtlz_eval_item u = oh_item(oh[i], oh[i] + 0.01);

			u.oh_sigma = 0.02;
			j = report(&u, 1);
			arr = json_object_get(j, "uncertainty_by_oh");
			cr_assert_eq(json_array_size(arr), 1);
			cr_assert_eq(jd(json_array_get(arr, 0), "lo"), lo[i], "oh %.7f", oh[i]);
			cr_assert_float_eq(jd(json_array_get(arr, 0), "hi"), lo[i] + 0.1, 1e-12);
			json_decref(j);
		}
	}

	/* mzr: 0.25 dex bins of [8.5, 11.5); 8.75 starts bin 1, 11.5 is out */
	{
		const double lm[] = { 8.5, 8.75, 8.7499, 11.25, 11.5, 8.4 };
		const int bin[] = { 0, 1, 0, 11, -1, -1 };

		for (size_t i = 0; i < MTLZ_ARRAY_SIZE(lm); i++) {
			mtlz_eval_item u = oh_item(8.8, 8.8);
			json_t *mzr;

			u.log_mass = lm[i];
			j = report(&u, 1);
			mzr = json_object_get(j, "mzr");
			cr_assert(json_is_object(mzr));
			cr_assert_eq(json_array_size(json_object_get(mzr, "bins")), 12);
			cr_assert_eq(bin_of_single(json_object_get(mzr, "bins"), "n"), bin[i],
				     "log M %g", lm[i]);
			cr_assert_eq(jd(mzr, "n_out_of_range"), bin[i] < 0);
			json_decref(j);
		}
	}

	/* ECE bins (lo, hi]: with 4 bins, confidence 0.5 is in (0.25, 0.5],
	 * 0.75 in (0.5, 0.75], 1 in (0.75, 1] (all exact in float) */
	{
		const float confs[] = { 0.5f, 0.75f, 1.0f, 0.5000001f };
		const int bins[] = { 1, 2, 3, 2 };

		for (size_t i = 0; i < MTLZ_ARRAY_SIZE(confs); i++) {
			mtlz_eval_item u = cls_item(P, P);

			u.prob[0] = confs[i];
			u.prob[1] = 1 - confs[i];
			u.prob[2] = u.prob[3] = 0;
			mtlz_ece(&u, 1, 4, cnt, NULL, NULL);
			for (int b = 0; b < 4; b++)
				cr_assert_eq(cnt[b], b == bins[i], "confidence %.7f bin %d", confs[i], b);
		}
	}
}

/* Items with random logits, classes drawn from softmax(logit / t0); prob
 * is softmax(logit / t_prob). */
static mtlz_eval_item *synth_cls(size_t n, double t0, double t_prob, uint64_t seed)
{
	mtlz_eval_item *it = malloc(n * sizeof(*it));
	mtlz_rng r;

	cr_assert(it);
	mtlz_rng_seed(&r, seed);
	for (size_t i = 0; i < n; i++) {
		double p[4], mx = -INFINITY, s = 0, u, acc = 0;
		int cls = 3;

		it[i] = blank();
		for (int c = 0; c < 4; c++) {
			it[i].logit[c] = (float)(2.5 * gauss(&r) + (c == (int)(i % 4) ? 2.0 : 0.0));
			mx = fmax(mx, it[i].logit[c] / t0);
		}
		for (int c = 0; c < 4; c++)
			s += p[c] = exp(it[i].logit[c] / t0 - mx);
		u = mtlz_rng_uniform(&r) * s;
		for (int c = 0; c < 4; c++) {
			acc += p[c];
			if (u < acc) {
				cls = c;
				break;
			}
		}
		it[i].true_cls = cls;
		mx = -INFINITY;
		s = 0;
		for (int c = 0; c < 4; c++)
			mx = fmax(mx, it[i].logit[c] / t_prob);
		for (int c = 0; c < 4; c++)
			s += p[c] = exp(it[i].logit[c] / t_prob - mx);
		for (int c = 0; c < 4; c++)
			it[i].prob[c] = (float)(p[c] / s);
	}
	return it;
}

/* Naive ECE: for each bin, scan every item (bin (b/B, (b+1)/B], confidence
 * 0 in bin 0). */
static double naive_ece(const mtlz_eval_item *it, size_t n, int nb)
{
	double ece = 0;
	size_t total = 0;

	for (size_t i = 0; i < n; i++)
		total += it[i].true_cls >= 0;
	for (int b = 0; b < nb; b++) {
		double lo = (double)b / nb, hi = (double)(b + 1) / nb, sc = 0, sa = 0;
		long cnt = 0;

		for (size_t i = 0; i < n; i++) {
			double c = 0;
			int am = 0;

			if (it[i].true_cls < 0)
				continue;
			for (int k = 0; k < 4; k++)
				if (it[i].prob[k] > c) {
					c = it[i].prob[k];
					am = k;
				}
			if ((c > lo || (b == 0 && c == 0)) && c <= hi) {
				cnt++;
				sc += c;
				sa += am == it[i].true_cls;
			}
		}
		if (cnt)
			ece += (double)cnt / (double)total * fabs(sa / cnt - sc / cnt);
	}
	return ece;
}

Test(metrics, ece_matches_naive_implementation)
{
	const size_t n = 5000;
	mtlz_eval_item *it = synth_cls(n, 1.5, 1.0, 7);
	long cnt[15], sum = 0;
	double conf[15], acc[15];

	it[3].true_cls = MTLZ_CLASS_NONE; /* skipped by both */
	for (int nb = 1; nb <= 20; nb++)
		cr_assert_float_eq(mtlz_ece(it, n, nb, NULL, NULL, NULL), naive_ece(it, n, nb), 1e-12,
				   "%d bins", nb);
	mtlz_ece(it, n, 15, cnt, conf, acc);
	for (int b = 0; b < 15; b++) {
		sum += cnt[b];
		cr_assert(cnt[b] ? conf[b] > (double)b / 15 && conf[b] <= (double)(b + 1) / 15
				 : isnan(conf[b]) && isnan(acc[b]));
	}
	cr_assert_eq(sum, (long)n - 1);
	cr_assert(isnan(mtlz_ece(it, 0, 15, NULL, NULL, NULL)));
	cr_assert(isnan(mtlz_ece(it, n, 0, NULL, NULL, NULL)));
	free(it);
}

/* Reference NLL at t, written out again here. */
static double ref_nll(const mtlz_eval_item *it, size_t n, double t)
{
	double s = 0;

	for (size_t i = 0; i < n; i++) {
		double z = 0;

		for (int c = 0; c < 4; c++)
			z += exp(it[i].logit[c] / t);
		s += log(z) - it[i].logit[it[i].true_cls] / t;
	}
	return s / (double)n;
}

Test(metrics, temperature_recovers_t0)
{
	const double t0s[] = { 0.5, 1.0, 2.0, 4.0 };
	const size_t n = 20000;

	for (size_t k = 0; k < MTLZ_ARRAY_SIZE(t0s); k++) {
		mtlz_eval_item *it = synth_cls(n, t0s[k], 1.0, 100 + k);
		double t = mtlz_fit_temperature(it, n), best_t = 0, best = INFINITY;

		cr_assert(fabs(t / t0s[k] - 1) < 0.04, "T0 %g: fitted %g", t0s[k], t);
		/* brute force on a 0.2 % grid around the fit: no better T */
		for (double g = t * 0.9; g < t * 1.1; g *= 1.002) {
			double v = ref_nll(it, n, g);

			if (v < best) {
				best = v;
				best_t = g;
			}
		}
		cr_assert(fabs(best_t / t - 1) < 0.004, "grid minimum %g, fitted %g", best_t, t);
		cr_assert(mtlz_temperature_nll(it, n, t) <= ref_nll(it, n, best_t) + 1e-9);
		cr_assert_float_eq(mtlz_temperature_nll(it, n, 1.3), ref_nll(it, n, 1.3), 1e-9);
		free(it);
	}
}

Test(metrics, temperature_scaling_lowers_ece)
{
	const size_t n = 20000;
	/* the model is overconfident: truth is softmax(logit / 2), prob softmax(logit) */
	mtlz_eval_item *it = synth_cls(n, 2.0, 1.0, 11);
	double before = mtlz_ece(it, n, 15, NULL, NULL, NULL), after, t;

	t = mtlz_fit_temperature(it, n);
	mtlz_apply_temperature(it, n, t);
	after = mtlz_ece(it, n, 15, NULL, NULL, NULL);
	cr_assert(before > 0.05, "overconfident set: ECE %g", before);
	cr_assert(after < before / 3, "ECE %g before, %g after T = %g", before, after, t);
	cr_assert(after < 0.02, "ECE after scaling %g", after);
	free(it);
}

Test(metrics, calibrated_set_has_small_ece)
{
	const size_t n = 20000;
	mtlz_eval_item *it = synth_cls(n, 1.0, 1.0, 12);
	double ece = mtlz_ece(it, n, 15, NULL, NULL, NULL);
	json_t *j;

	cr_assert(ece < 0.02, "calibrated set: ECE %g", ece);
	j = report(it, n);
	cr_assert_float_eq(jd(json_object_get(j, "calibration"), "ece"), ece, 1e-12);
	cr_assert_eq(json_array_size(json_object_get(json_object_get(j, "calibration"), "bins")), 15);
	json_decref(j);
	free(it);
}

Test(metrics, temperature_without_labels_or_logits_is_nan)
{
	mtlz_eval_item it[2] = { cls_item(P, P), blank() };

	cr_assert(isnan(mtlz_fit_temperature(it, 2)), "no logits");
	cr_assert(isnan(mtlz_fit_temperature(it, 0)));
	cr_assert(isnan(mtlz_fit_temperature(NULL, 0)));
}

Test(metrics, coverage_of_gaussian_residuals)
{
	const size_t n = 50000;
	mtlz_eval_item *it = malloc(n * sizeof(*it));
	json_t *j, *cov;
	mtlz_rng r;

	mtlz_rng_seed(&r, 3);
	for (size_t i = 0; i < n; i++) {
		double sigma = 0.01 + 0.09 * mtlz_rng_uniform(&r), t = 8 + mtlz_rng_uniform(&r);

		it[i] = oh_item(t, t + sigma * gauss(&r));
		it[i].oh_sigma = sigma;
	}
	it[0].oh_sigma = NAN; /* not counted */
	j = report(it, n);
	cov = json_object_get(j, "coverage");
	cr_assert_eq(jd(cov, "n"), n - 1);
	/* 0.6827 and 0.9545 for a standard normal; binomial SD 0.002 and 0.001 */
	cr_assert_float_eq(jd(cov, "within_1sigma"), 0.6827, 0.01);
	cr_assert_float_eq(jd(cov, "within_2sigma"), 0.9545, 0.005);
	/* and the per-bin sigma summary sees the same items */
	{
		json_t *u = json_object_get(j, "uncertainty_by_oh");
		double tot = 0;

		cr_assert_eq(json_array_size(u), 10);
		for (size_t b = 0; b < json_array_size(u); b++) {
			json_t *o = json_array_get(u, b);

			tot += jd(o, "n");
			cr_assert_float_eq(jd(o, "mean_sigma"), 0.055, 0.005);
			/* residual SD ~ rms sigma = sqrt(mean sigma^2) on U(0.01, 0.1) */
			cr_assert_float_eq(jd(o, "residual_sd"), sqrt((0.001 - 0.000001) / (3 * 0.09)), 0.005);
		}
		cr_assert_eq(tot, n - 1);
	}
	json_decref(j);
	free(it);
}

/* n items, accuracy ~0.8, star-forming with metallicity residual SD 0.05. */
static mtlz_eval_item *synth_mixed(size_t n, uint64_t seed)
{
	mtlz_eval_item *it = malloc(n * sizeof(*it));
	mtlz_rng r;

	cr_assert(it);
	mtlz_rng_seed(&r, seed);
	for (size_t i = 0; i < n; i++) {
		int t = (int)(i % 4), p = mtlz_rng_uniform(&r) < 0.8 ? t : (t + 1) % 4;
		double oh = 8 + mtlz_rng_uniform(&r);

		it[i] = cls_item(t, p);
		if (t == SF) {
			it[i].oh_true = oh;
			it[i].oh_pred = oh + 0.01 + 0.05 * gauss(&r);
		}
		it[i].z = 0.3 * mtlz_rng_uniform(&r);
		it[i].sn_r = 5 + 40 * mtlz_rng_uniform(&r);
	}
	return it;
}

Test(metrics, bootstrap_contains_value_and_narrows_with_n)
{
	const int stats[] = { MTLZ_STAT_ACCURACY, MTLZ_STAT_F1_MACRO, MTLZ_STAT_OH_SD,
			      MTLZ_STAT_OH_BIAS, MTLZ_STAT_OH_MAE, MTLZ_STAT_OH_MSE,
			      MTLZ_STAT_OH_R2 };
	mtlz_eval_item *it = synth_mixed(8000, 21);

	for (size_t s = 0; s < MTLZ_ARRAY_SIZE(stats); s++) {
		double w[2];
		const size_t ns[2] = { 400, 8000 };

		for (int k = 0; k < 2; k++) {
			double v = mtlz_metrics_stat(it, ns[k], stats[s]), lo, hi, lo2, hi2;

			cr_assert_eq(mtlz_bootstrap_ci(it, ns[k], stats[s], 400, 5, 0.95, &lo, &hi), MTLZ_OK);
			cr_assert(lo <= v && v <= hi, "stat %d n %zu: %g not in [%g, %g]",
				  stats[s], ns[k], v, lo, hi);
			cr_assert_eq(mtlz_bootstrap_ci(it, ns[k], stats[s], 400, 5, 0.95, &lo2, &hi2), MTLZ_OK);
			cr_assert(lo2 == lo && hi2 == hi, "same seed, same interval");
			w[k] = hi - lo;
			/* the replicates' median sits on the full-sample value (up
			 * to Monte Carlo noise ~2 % of the 95 % width): the
			 * resampling path computes the same statistic */
			cr_assert_eq(mtlz_bootstrap_ci(it, ns[k], stats[s], 400, 5, 0.02, &lo2, &hi2), MTLZ_OK);
			cr_assert(fabs((lo2 + hi2) / 2 - v) < 0.1 * w[k], "stat %d n %zu: median %g, value %g",
				  stats[s], ns[k], (lo2 + hi2) / 2, v);
		}
		/* 20x the items: about sqrt(20) = 4.5x narrower */
		cr_assert(w[1] < w[0] / 3 && w[1] > w[0] / 7, "stat %d widths %g %g",
			  stats[s], w[0], w[1]);
	}
	free(it);
}

Test(metrics, bootstrap_accuracy_matches_binomial_width)
{
	const size_t n = 2000;
	mtlz_eval_item *it = synth_mixed(n, 22);
	double p = mtlz_metrics_stat(it, n, MTLZ_STAT_ACCURACY), lo, hi;
	/* normal approximation of a binomial proportion: +-1.96 sqrt(p(1-p)/n) */
	double ref = 2 * 1.96 * sqrt(p * (1 - p) / (double)n);

	cr_assert_eq(mtlz_bootstrap_ci(it, n, MTLZ_STAT_ACCURACY, 2000, 9, 0.95, &lo, &hi), MTLZ_OK);
	cr_assert(fabs((hi - lo) / ref - 1) < 0.12, "width %g, normal approx %g", hi - lo, ref);
	cr_assert(fabs((lo + hi) / 2 - p) < ref / 10, "centred on %g: [%g, %g]", p, lo, hi);
	free(it);
}

/*
 * Widths of the metallicity intervals against normal theory, from sample
 * moments computed here: a mean of x (bias: x = r, MAE: |r|, MSE: r^2) has
 * standard error sd(x) / sqrt(m); the SD of Gaussian residuals has
 * sd / sqrt(2 m). A 95 % interval is 3.92 standard errors wide. The bias of
 * 0.05 makes the MSE's spread mostly its cross term 2 bias r.
 */
Test(metrics, bootstrap_oh_widths_match_normal_theory)
{
	const size_t n = 4000;
	mtlz_eval_item *it = malloc(n * sizeof(*it));
	double x[3][4000], se[4], mean, ss;
	const int stats[4] = { MTLZ_STAT_OH_BIAS, MTLZ_STAT_OH_MAE, MTLZ_STAT_OH_MSE, MTLZ_STAT_OH_SD };
	mtlz_rng r;

	mtlz_rng_seed(&r, 31);
	for (size_t i = 0; i < n; i++) {
		double t = 8 + mtlz_rng_uniform(&r), res = 0.05 + 0.03 * gauss(&r);

		it[i] = oh_item(t, t + res);
		res = it[i].oh_pred - it[i].oh_true;
		x[0][i] = res;
		x[1][i] = fabs(res);
		x[2][i] = res * res;
	}
	for (int s = 0; s < 3; s++) {
		mean = ss = 0;
		for (size_t i = 0; i < n; i++)
			mean += x[s][i] / (double)n;
		for (size_t i = 0; i < n; i++)
			ss += (x[s][i] - mean) * (x[s][i] - mean);
		se[s] = sqrt(ss / (double)n) / sqrt((double)n);
	}
	se[3] = mtlz_metrics_stat(it, n, MTLZ_STAT_OH_SD) / sqrt(2.0 * (double)n);
	for (int s = 0; s < 4; s++) {
		double lo, hi;

		cr_assert_eq(mtlz_bootstrap_ci(it, n, stats[s], 2000, 8, 0.95, &lo, &hi), MTLZ_OK);
		cr_assert(fabs((hi - lo) / (3.92 * se[s]) - 1) < 0.12, "stat %d: width %g, theory %g",
			  stats[s], hi - lo, 3.92 * se[s]);
	}
	free(it);
}

Test(metrics, bootstrap_rejects_bad_arguments)
{
	mtlz_eval_item it[2] = { cls_item(P, P), cls_item(A, A) };
	double lo = 0, hi = 0;

	cr_assert_eq(mtlz_bootstrap_ci(it, 2, MTLZ_STAT_OH_SD, 10, 1, 0.95, &lo, &hi),
		     MTLZ_ERR_INVALID, "no metallicity labels");
	cr_assert(isnan(lo) && isnan(hi));
	cr_assert_eq(mtlz_bootstrap_ci(it, 0, MTLZ_STAT_ACCURACY, 10, 1, 0.95, &lo, &hi), MTLZ_ERR_INVALID);
	cr_assert_eq(mtlz_bootstrap_ci(it, 2, MTLZ_N_STATS, 10, 1, 0.95, &lo, &hi), MTLZ_ERR_INVALID);
	cr_assert_eq(mtlz_bootstrap_ci(it, 2, MTLZ_STAT_ACCURACY, 0, 1, 0.95, &lo, &hi), MTLZ_ERR_INVALID);
	cr_assert_eq(mtlz_bootstrap_ci(it, 2, MTLZ_STAT_ACCURACY, 10, 1, 1.0, &lo, &hi), MTLZ_ERR_INVALID);
	cr_assert_eq(mtlz_bootstrap_ci(it, 2, MTLZ_STAT_ACCURACY, 10, 1, 0.9, &lo, &hi), MTLZ_OK);
	cr_assert(lo == 1 && hi == 1);
}

Test(metrics, json_bootstrap_intervals_when_asked)
{
	const size_t n = 2000;
	mtlz_eval_item *it = synth_mixed(n, 23);
	mtlz_metrics_opts o = { .n_boot = 200, .seed = 4 };
	char err[256] = "";
	json_t *j = mtlz_metrics_json_opts(it, n, &o, err, sizeof(err)), *ci, *plain;

	cr_assert(j, "%s", err);
	ci = json_object_get(j, "accuracy_ci");
	cr_assert_eq(json_array_size(ci), 2);
	cr_assert(json_number_value(json_array_get(ci, 0)) <= jd(j, "accuracy") &&
		  jd(j, "accuracy") <= json_number_value(json_array_get(ci, 1)));
	ci = json_object_get(json_object_get(j, "oh"), "sd_ci");
	cr_assert(json_number_value(json_array_get(ci, 0)) <= jd(json_object_get(j, "oh"), "sd"));
	for (size_t b = 0; b < 6; b++) {
		json_t *bin = json_array_get(json_object_get(j, "by_z"), b);

		cr_assert_eq(json_array_size(json_object_get(bin, "oh_sd_ci")), 2);
		cr_assert(json_number_value(json_array_get(json_object_get(bin, "accuracy_ci"), 0)) <=
			  jd(bin, "accuracy"));
	}
	cr_assert_eq(jd(json_object_get(j, "bootstrap"), "n_boot"), 200);
	plain = report(it, n);
	cr_assert_null(json_object_get(plain, "accuracy_ci"), "no CIs without n_boot");
	cr_assert_null(json_object_get(plain, "bootstrap"));
	json_decref(plain);
	json_decref(j);

	o.n_boot = -1;
	cr_assert_null(mtlz_metrics_json_opts(it, n, &o, err, sizeof(err)));
	cr_assert(strstr(err, "n_boot"), "%s", err);
	free(it);
}

Test(metrics, by_z_and_by_sn_match_their_subsets)
{
	const size_t n = 4000;
	mtlz_eval_item *it = synth_mixed(n, 24), *sub = malloc(n * sizeof(*sub));
	const double zlo[] = { 0, 0.04, 0.08, 0.12, 0.15, 0.20 }, zhi[] = { 0.04, 0.08, 0.12, 0.15, 0.20, 0.30 };
	json_t *j = report(it, n), *by = json_object_get(j, "by_z");
	double tot = 0;

	for (int b = 0; b < 6; b++) {
		json_t *o = json_array_get(by, (size_t)b);
		mtlz_oh_metrics om;
		size_t m = 0;

		for (size_t i = 0; i < n; i++)
			if (it[i].z >= zlo[b] && it[i].z < zhi[b])
				sub[m++] = it[i];
		mtlz_metrics_oh(sub, m, &om);
		cr_assert_eq(jd(o, "lo"), zlo[b]);
		cr_assert_eq(jd(o, "hi"), zhi[b]);
		cr_assert_eq(jd(o, "n"), m);
		cr_assert_float_eq(jd(o, "accuracy"), mtlz_metrics_stat(sub, m, MTLZ_STAT_ACCURACY), 1e-12);
		cr_assert_eq(jd(o, "oh_n"), om.n);
		cr_assert_float_eq(jd(o, "oh_sd"), om.sd, 1e-12);
		cr_assert_float_eq(jd(o, "oh_bias"), om.bias, 1e-12);
		cr_assert_float_eq(jd(o, "oh_mae"), om.mae, 1e-12);
		tot += jd(o, "n");
	}
	cr_assert_eq(tot, n, "z in [0, 0.3) for every item");
	by = json_object_get(j, "by_sn");
	tot = 0;
	for (int b = 0; b < 6; b++)
		tot += jd(json_array_get(by, (size_t)b), "n");
	cr_assert_eq(tot, n, "S/N in [5, 45) for every item");
	json_decref(j);
	free(sub);
	free(it);
}

/*
 * One MZR bin, [9.0, 9.25), five galaxies:
 *   true sorted 8.6 8.7 8.8 8.9 9.0: median 8.8;
 *   p16 at h = 4 x 0.16 = 0.64: 8.6 + 0.64 x 0.1 = 8.664;
 *   p84 at h = 3.36: 8.9 + 0.36 x 0.1 = 8.936; pred = true + 0.05.
 * Tremonti at the centre x = 9.125: -1.492 + 1.847 x 9.125
 *   - 0.08026 x 83.265625 = -1.492 + 16.853875 - 6.682899 = 8.678976.
 */
Test(metrics, mzr_bin_percentiles_by_hand)
{
	const double t[5] = { 8.9, 8.7, 8.8, 9.0, 8.6 };
	mtlz_eval_item it[6];
	json_t *j, *mzr, *b;

	for (int i = 0; i < 5; i++) {
		it[i] = oh_item(t[i], t[i] + 0.05);
		it[i].log_mass = 9.0 + 0.05 * i;
	}
	it[5] = oh_item(8.0, 8.0);
	it[5].log_mass = 12.0; /* out of range */
	j = report(it, 6);
	mzr = json_object_get(j, "mzr");
	cr_assert_eq(jd(mzr, "n"), 5);
	cr_assert_eq(jd(mzr, "n_out_of_range"), 1);
	b = json_array_get(json_object_get(mzr, "bins"), 2);
	cr_assert_eq(jd(b, "lo"), 9.0);
	cr_assert_eq(jd(b, "hi"), 9.25);
	cr_assert_eq(jd(b, "n"), 5);
	cr_assert_float_eq(jd(b, "true_median"), 8.8, 1e-12);
	cr_assert_float_eq(jd(b, "true_p16"), 8.664, 1e-12);
	cr_assert_float_eq(jd(b, "true_p84"), 8.936, 1e-12);
	cr_assert_float_eq(jd(b, "pred_median"), 8.85, 1e-12);
	cr_assert_float_eq(jd(b, "pred_p16"), 8.714, 1e-12);
	cr_assert_float_eq(jd(b, "pred_p84"), 8.986, 1e-12);
	cr_assert_float_eq(jd(b, "tremonti"), 8.678976, 1e-6);
	cr_assert_float_eq(mtlz_tremonti04_oh(10.0), -1.492 + 18.47 - 8.026, 1e-12);
	b = json_array_get(json_object_get(mzr, "bins"), 0);
	cr_assert_eq(jd(b, "n"), 0);
	cr_assert(jnull(b, "true_median") && jnull(b, "pred_p84"));
	cr_assert(!jnull(b, "tremonti"));
	json_decref(j);
}

/* Every key of the contract is there, whatever the input. */
static void assert_shape(const json_t *j, size_t n_expected)
{
	static const char *keys[] = {
		"n_items", "n", "classes", "accuracy", "f1_macro", "precision_macro", "recall_macro",
		"confusion", "per_class", "oh", "by_z", "by_sn", "uncertainty_by_oh",
		"calibration", "coverage", "mzr",
	};

	for (size_t k = 0; k < MTLZ_ARRAY_SIZE(keys); k++)
		cr_assert(json_object_get(j, keys[k]), "key %s missing", keys[k]);
	cr_assert_eq(jd(j, "n"), n_expected);
	cr_assert_eq(json_array_size(json_object_get(j, "by_z")), 6);
	cr_assert_eq(json_array_size(json_object_get(j, "by_sn")), 6);
	cr_assert_eq(json_object_size(json_object_get(j, "per_class")), 4);
}

Test(metrics, degenerate_inputs_give_valid_json)
{
	mtlz_eval_item it[3] = { blank(), blank(), blank() };
	char err[128];
	json_t *j;

	/* empty */
	j = report(NULL, 0);
	assert_shape(j, 0);
	cr_assert(jnull(j, "accuracy") && jnull(j, "f1_macro") && jnull(j, "precision_macro"));
	cr_assert_eq(jd(json_object_get(j, "oh"), "n"), 0);
	cr_assert(jnull(json_object_get(j, "oh"), "mse") && jnull(json_object_get(j, "oh"), "r2"));
	cr_assert(jnull(json_object_get(j, "calibration"), "ece"));
	cr_assert(jnull(json_object_get(j, "coverage"), "within_1sigma"));
	cr_assert(json_is_null(json_object_get(j, "mzr")));
	cr_assert_eq(json_array_size(json_object_get(j, "uncertainty_by_oh")), 0);
	cr_assert(jnull(json_array_get(json_object_get(j, "by_z"), 0), "accuracy"));
	json_decref(j);

	/* no class labels and no predictions, but z and S/N */
	it[0].z = 0.05;
	it[1].sn_r = 12;
	it[2].oh_true = 8.5; /* a metallicity without a class */
	it[2].oh_pred = 8.6;
	j = report(it, 3);
	assert_shape(j, 0);
	cr_assert_eq(jd(j, "n_items"), 3);
	cr_assert_eq(jd(json_object_get(j, "oh"), "n"), 0);
	json_decref(j);

	/* labels and predictions, no metallicity anywhere */
	it[0] = cls_item(SF, SF);
	it[1] = cls_item(A, C);
	it[2] = cls_item(SF, SF);
	it[2].oh_sigma = 0.1;
	it[2].log_mass = 10;
	j = report(it, 3);
	assert_shape(j, 3);
	cr_assert_float_eq(jd(j, "accuracy"), 2.0 / 3, 1e-12);
	cr_assert_eq(jd(json_object_get(j, "oh"), "n"), 0);
	cr_assert_eq(jd(json_object_get(j, "coverage"), "n"), 0);
	cr_assert(json_is_null(json_object_get(j, "mzr")));
	json_decref(j);

	/* a NULL array with items is a caller bug, reported */
	cr_assert_null(mtlz_metrics_json(NULL, 3, err, sizeof(err)));
	cr_assert(strstr(err, "3 items"), "%s", err);
	cr_assert(isnan(mtlz_metrics_stat(NULL, 3, MTLZ_STAT_ACCURACY)));
}
