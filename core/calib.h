/*
 * calib.h - temperature scaling of the class probabilities (Guo et al.
 * 2017): one scalar T > 0 such that softmax(z / T) of the class logits z
 * matches how often the model is right. T is fitted on labelled spectra
 * the model was not trained on (the validation split) by minimising the
 * mean negative log-likelihood of the true class (core/metrics.h:
 * mtlz_fit_temperature, a golden-section search over log T), and stored in
 * the model's metadata "mtlz.calibration", which every engine applies
 * (model.h: mtlz_model_temperature). The argmax, hence the predicted class
 * and the accuracy, does not change.
 *
 * Used by mtlz-retrain after training (core/retrain.c) and by
 * `mtlz calibrate` on an existing model. The logits come from the trainer's
 * forward pass with dropout off (the same numbers the inference engine's
 * softmax sees, tests/test_train.c), not from the engine, whose output is
 * already scaled by the model's current temperature.
 *
 * @locality any thread; a trainer is used by one thread at a time.
 */
#ifndef MTLZ_CALIB_H
#define MTLZ_CALIB_H

#include "dataset.h"
#include "metrics.h"
#include "train.h"

#include <stddef.h>

/* A fitted (or scored) temperature and its effect on the items it was
 * computed on. "before" is the uncalibrated model (T = 1). */
typedef struct mtlz_calib {
	double temperature;      /* T; 1 when not fitted */
	long n;                  /* items with a class label and finite logits */
	double nll_before, nll_after; /* mean -ln p_true at T = 1 and at T */
	double ece_before, ece_after; /* ECE, MTLZ_METRICS_ECE_BINS bins, at T = 1 and at T */
} mtlz_calib;

/* Runs the forward pass of trainer t (dropout off; its current parameters)
 * over the spectra idx[0..n) of d (all of d in order when idx is NULL) in
 * batches of at most `batch` (t's max_batch) and fills items[0..n):
 * true_cls, logit, prob = softmax(logit) (T = 1), oh_true, oh_pred, z,
 * sn_r, log_mass (oh_sigma NaN). Returns MTLZ_OK or the trainer's error. */
int mtlz_calib_collect(mtlz_trainer *t, int batch, const mtlz_dataset *d, const size_t *idx,
		       size_t n, mtlz_eval_item *items, char *errstr, size_t errstr_size);

/* Scores temperature T on the items: n, the NLL and the ECE at T = 1 and
 * at T into *c (c->temperature = T). Leaves every item's prob at
 * softmax(logit / T). */
void mtlz_calib_score(mtlz_eval_item *it, size_t n, double T, mtlz_calib *c);

/* Fits T on the items (mtlz_fit_temperature) and scores it
 * (mtlz_calib_score). MTLZ_ERR_INVALID, explained, when no item has a
 * class label and finite logits. */
int mtlz_calib_fit(mtlz_eval_item *it, size_t n, mtlz_calib *c, char *errstr,
		   size_t errstr_size);

/* The "mtlz.calibration" metadata value (malloc'ed, NULL when out of
 * memory): {"method": "temperature", "temperature": T, "fitted_on":
 * fitted_on, "n": n, "nll_before", "nll_after", "ece_before", "ece_after",
 * "ece_bins"}; undefined numbers are null. */
char *mtlz_calib_json(const mtlz_calib *c, const char *fitted_on);

#endif
