/*
 * metrics.h - evaluation metrics of the classifier and the metallicity
 * regressor, as the paper reports them (Sect. 4.1, Figs. 6-10), for
 * `mtlz eval` and `mtlz-retrain`.
 *
 * The caller runs the model over a labelled set and fills one mtlz_eval_item
 * per spectrum; this module turns the items into numbers (structs, or one
 * jansson object whose key names are a contract used by scripts). Nothing
 * here touches the pipeline: every function is a pure function of its
 * arguments.
 *
 * @locality any thread; no locks (no shared state).
 *
 * Which items count where:
 *   class metrics  true_cls in 0..3 and all four prob finite; the predicted
 *                  class is the argmax of prob (first one on ties).
 *   oh metrics     true_cls == MTLZ_CLASS_STAR_FORMING, oh_true and oh_pred
 *                  finite (residual = oh_pred - oh_true).
 *   coverage, uncertainty_by_oh
 *                  the oh set, and oh_sigma finite and >= 0.
 *   mzr            the oh set, and log_mass in [8.5, 11.5) (the range of the
 *                  Tremonti et al. 2004 fit, as in the paper's Sect. 4.5).
 *   temperature    true_cls in 0..3 and all four logit finite.
 *
 * Definitions (Sect. 4.1; scikit-learn conventions, which the paper used):
 *   accuracy   correct / n.
 *   precision  TP / (TP + FP), recall TP / (TP + FN), F1 = 2PR / (P + R)
 *              = 2TP / (2TP + FP + FN), per class.
 *   macro      unweighted mean over the classes present in the truth or in
 *              the predictions (classes absent from both are left out); a
 *              present class whose precision or recall is undefined (0/0)
 *              contributes 0 to the mean (sklearn zero_division=0).
 *   weighted   mean weighted by support (weighted recall == accuracy). The
 *              paper's Table 4 / Sect. 4.4 figures, where recall equals
 *              accuracy, look like weighted averages; both are reported.
 *   per class  precision / recall / f1 are NaN (null in JSON) when their
 *              denominator is 0: precision with no predictions of the
 *              class, recall with no support, f1 when TP + FP + FN == 0.
 *   MSE, MAE   mean of r^2 and |r|, r = pred - true; bias = mean r;
 *   SD         population standard deviation of r around its mean
 *              (1/n, as numpy.std): MSE == SD^2 + bias^2;
 *   R^2        1 - sum r^2 / sum (true - mean true)^2; NaN (null) when
 *              n < 2 or the true values have zero variance.
 *   ECE        sum_b n_b / n |acc_b - conf_b| over equal-width bins of the
 *              confidence (max prob), bin b = (b/B, (b+1)/B] (a confidence of
 *              0 goes into bin 0), Guo et al. (2017).
 *   percentiles  linear interpolation between order statistics (numpy's
 *              default): p of sorted x[0..m-1] is at h = (m - 1) p.
 *
 * Bins are half-open [lo, hi): an item exactly on an edge belongs to the
 * bin that starts there. Values outside every bin are in no bin.
 *
 * Undefined numbers are NaN in the structs and null in JSON (jansson cannot
 * encode NaN); counts are always numbers (0 for empty sets).
 */
#ifndef MTLZ_METRICS_H
#define MTLZ_METRICS_H

#include "labels.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

typedef struct mtlz_eval_item {
	int true_cls;            /* 0..3, or MTLZ_CLASS_NONE (no class label: skipped for class metrics) */
	float prob[4];           /* predicted class probabilities (sum 1) */
	float logit[4];          /* raw logits (for temperature scaling); may be NaN if unknown */
	double oh_true;          /* 12+log(O/H) label; NaN when none */
	double oh_pred;          /* predicted metallicity */
	double oh_sigma;         /* MC-dropout sigma; NaN when not computed */
	double z, sn_r, log_mass;/* NaN when unknown */
} mtlz_eval_item;

#define MTLZ_METRICS_ECE_BINS 15
/* Width of the uncertainty_by_oh bins (dex of 12+log(O/H)). */
#define MTLZ_METRICS_OH_BIN_DEX 0.1
/* Width and range of the mzr bins (dex of log M*). */
#define MTLZ_METRICS_MZR_BIN_DEX 0.25
#define MTLZ_METRICS_MZR_LO 8.5
#define MTLZ_METRICS_MZR_HI 11.5

/* Statistics mtlz_metrics_stat and mtlz_bootstrap_ci know. */
enum mtlz_stat {
	MTLZ_STAT_ACCURACY,
	MTLZ_STAT_F1_MACRO,
	MTLZ_STAT_OH_SD,
	MTLZ_STAT_OH_BIAS,
	MTLZ_STAT_OH_MAE,
	MTLZ_STAT_OH_MSE,
	MTLZ_STAT_OH_R2,
	MTLZ_N_STATS,
};

typedef struct mtlz_class_metrics {
	size_t n;                                   /* items with a class label and a prediction */
	long confusion[MTLZ_N_CLASSES][MTLZ_N_CLASSES]; /* [true][predicted] */
	long support[MTLZ_N_CLASSES];               /* row sums */
	long predicted[MTLZ_N_CLASSES];             /* column sums */
	double accuracy;
	double precision[MTLZ_N_CLASSES], recall[MTLZ_N_CLASSES], f1[MTLZ_N_CLASSES];
	double precision_macro, recall_macro, f1_macro;
	double precision_weighted, recall_weighted, f1_weighted;
} mtlz_class_metrics;

typedef struct mtlz_oh_metrics {
	size_t n;                /* star-forming items with oh_true and oh_pred */
	double mse, mae, r2, sd, bias;
} mtlz_oh_metrics;

/* Options of mtlz_metrics_json_opts; zero fields take the defaults. */
typedef struct mtlz_metrics_opts {
	int n_ece_bins;          /* 0: MTLZ_METRICS_ECE_BINS */
	int n_boot;              /* bootstrap resamples for the *_ci keys; 0: no CIs */
	uint64_t seed;           /* bootstrap seed */
	double ci_level;         /* 0: 0.95 */
} mtlz_metrics_opts;

/* Classification metrics of the items (see the top of this file). */
void mtlz_metrics_class(const mtlz_eval_item *it, size_t n, mtlz_class_metrics *out);

/* Metallicity metrics of the star-forming items with a label. */
void mtlz_metrics_oh(const mtlz_eval_item *it, size_t n, mtlz_oh_metrics *out);

/* One statistic (enum mtlz_stat) over all n items; NaN when undefined
 * (no eligible item, or R^2 with zero variance) or stat is unknown. */
double mtlz_metrics_stat(const mtlz_eval_item *it, size_t n, int stat);

/* Tremonti et al. (2004) mass-metallicity relation:
 * 12+log(O/H) = -1.492 + 1.847 x - 0.08026 x^2, x = log M* / Msun
 * (fit valid for 8.5 < x < 11.5). */
double mtlz_tremonti04_oh(double log_mass);

/* Computes every metric over n items; returns a jansson json_t* object
 * (caller json_decref) or NULL with errstr (it NULL with n > 0: invalid;
 * out of memory). n == 0 gives a valid object with n = 0. Same as
 * mtlz_metrics_json_opts with opts NULL (no bootstrap CIs).
 *
 * Keys (null where undefined):
 *   n_items                  all items given
 *   n                        items counted for class metrics
 *   classes                  the class names in class order
 *   accuracy, precision_macro, recall_macro, f1_macro,
 *   precision_weighted, recall_weighted, f1_weighted
 *   confusion                4x4 counts, rows = true, columns = predicted
 *   confusion_normalized     rows divided by support (Fig. 8); a row with no
 *                            support is null
 *   per_class.<name>         {precision, recall, f1, support, predicted}
 *   oh                       {n, mse, mae, r2, sd, bias}
 *   by_z, by_sn              [{lo, hi, n, accuracy, oh_n, oh_sd, oh_bias,
 *                            oh_mae}] over redshift [0,0.04) [0.04,0.08)
 *                            [0.08,0.12) [0.12,0.15) [0.15,0.20) [0.20,0.30)
 *                            and S/N_r [5,10) [10,15) [15,20) [20,25) [25,30)
 *                            [30,100) (Sects. 4.2.3-4.2.4, Fig. 9)
 *   uncertainty_by_oh        non-empty 0.1 dex bins of oh_true, ascending:
 *                            [{lo, hi, n, mean_sigma, median_sigma, sd_sigma,
 *                            residual_sd}] (sd_sigma: spread of sigma, the
 *                            bars of Fig. 7; residual_sd: the actual scatter;
 *                            |value| >= 1e6 is skipped as a sentinel)
 *   uncertainty_by_oh_pred   the same binned by oh_pred (Fig. 7's x axis)
 *   calibration              {n, n_bins, ece, nll, brier, bins: [{lo, hi, n,
 *                            confidence, accuracy}]} (all bins, empty ones
 *                            with n 0); nll = mean -ln max(p_true, 1e-7),
 *                            brier = mean sum_k (p_k - [k == true])^2
 *   coverage                 {n, within_1sigma, within_2sigma}: fractions with
 *                            |pred - true| <= 1 sigma, <= 2 sigma
 *   mzr                      null when no item of the oh set has a finite
 *                            log_mass, else {n (in [8.5, 11.5)),
 *                            n_out_of_range, lo, hi, bins: [{lo, hi, centre,
 *                            n, true_median, true_p16, true_p84, pred_median,
 *                            pred_p16, pred_p84, tremonti}]}: all twelve
 *                            0.25 dex bins of [8.5, 11.5), tremonti at the
 *                            bin centre (Fig. 10)
 * With opts->n_boot > 0 also (percentile bootstrap, [lo, hi] arrays):
 *   bootstrap {n_boot, seed (as a signed 64-bit integer), level}, accuracy_ci, f1_macro_ci, oh.sd_ci,
 *   oh.bias_ci, oh.mae_ci, and accuracy_ci, oh_sd_ci in each by_z / by_sn bin
 *   (resampled within the bin). */
json_t *mtlz_metrics_json(const mtlz_eval_item *it, size_t n, char *errstr,
			  size_t errstr_size);
json_t *mtlz_metrics_json_opts(const mtlz_eval_item *it, size_t n,
			       const mtlz_metrics_opts *opts, char *errstr,
			       size_t errstr_size);

/* Temperature scaling (Guo et al. 2017): the T > 0 minimising the mean
 * negative log-likelihood of softmax(logit / T) over the items with a class
 * label and finite logits; golden-section search on log T in
 * [log 0.05, log 20] (the NLL is convex in 1/T, so unimodal there; a
 * minimum beyond the range gives the range's end). NaN when no item
 * qualifies. Fit it on a validation set, not on the set it is judged on. */
double mtlz_fit_temperature(const mtlz_eval_item *it, size_t n);

/* Mean negative log-likelihood of softmax(logit / t) over the items the fit
 * uses; NaN when none (or t <= 0). */
double mtlz_temperature_nll(const mtlz_eval_item *it, size_t n, double t);

/* Sets prob = softmax(logit / t) for every item with finite logits (t > 0;
 * others are left alone). */
void mtlz_apply_temperature(mtlz_eval_item *it, size_t n, double t);

/* Expected calibration error with n_bins equal-width confidence bins
 * (confidence = max prob, accuracy = argmax == true) over the items counted
 * for class metrics; fills per-bin counts / mean confidence / accuracy
 * (NaN for empty bins) into arrays of n_bins if non-NULL. NaN when no item
 * qualifies or n_bins < 1. */
double mtlz_ece(const mtlz_eval_item *it, size_t n, int n_bins, long *count,
		double *conf, double *acc);

/* Bootstrap: percentile confidence interval at `level` (e.g. 0.95) of
 * statistic `stat` (enum mtlz_stat). The items eligible for the statistic
 * (the class set or the oh set) are resampled with replacement, n_boot
 * times, from an rng seeded with `seed` (same seed, same interval);
 * resamples where the statistic is undefined are dropped. Returns MTLZ_OK,
 * or MTLZ_ERR_INVALID (bad stat, n_boot < 1, level outside (0, 1), no
 * eligible item; *lo = *hi = NaN) or MTLZ_ERR_NOMEM. */
int mtlz_bootstrap_ci(const mtlz_eval_item *it, size_t n, int stat, int n_boot,
		      uint64_t seed, double level, double *lo, double *hi);

#endif
