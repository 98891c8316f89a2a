/*
 * calib.c - temperature scaling of the class probabilities (calib.h): the
 * logits of a labelled set through the trainer's forward pass, the fit of
 * T by minimum NLL (metrics.c) and the "mtlz.calibration" JSON.
 */
#include "calib.h"
#include "common.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int mtlz_calib_collect(mtlz_trainer *t, int batch, const mtlz_dataset *d, const size_t *idx,
		       size_t n, mtlz_eval_item *items, char *errstr, size_t errstr_size)
{
	float *x, *oh, *logits, *metal;
	int *cls, rc = MTLZ_OK;
	mtlz_loss_opts lo;

	if (batch < 1)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "calibration: batch < 1");
	if (mtlz_trainer_n_classes(t) != MTLZ_N_CLASSES)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"calibration: the model has %d classes, the labelled archives %d",
				mtlz_trainer_n_classes(t), MTLZ_N_CLASSES);
	x = malloc((size_t)batch * (size_t)d->L * sizeof(float));
	oh = malloc((size_t)batch * sizeof(float));
	logits = malloc((size_t)batch * MTLZ_N_CLASSES * sizeof(float));
	metal = malloc((size_t)batch * sizeof(float));
	cls = malloc((size_t)batch * sizeof(int));
	if (!x || !oh || !logits || !metal || !cls) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out_free;
	}
	mtlz_loss_opts_default(&lo);
	lo.train = 0;   /* dropout off: the network as the engines run it */
	for (size_t s = 0; s < n; s += (size_t)batch) {
		const int nb = (int)MTLZ_MIN((size_t)batch, n - s);
		const mtlz_batch b = { x, cls, oh, nb };
		mtlz_losses l;

		for (int i = 0; i < nb; i++) {
			const size_t r = idx ? idx[s + (size_t)i] : s + (size_t)i;

			memcpy(x + (size_t)i * (size_t)d->L, d->x + r * (size_t)d->L,
			       (size_t)d->L * sizeof(float));
			cls[i] = d->cls[r];
			oh[i] = d->oh[r];
		}
		rc = mtlz_trainer_step(t, &b, &lo, &l, NULL, NULL, logits, metal, errstr,
				       errstr_size);
		if (rc)
			goto out_free;
		for (int i = 0; i < nb; i++) {
			const size_t r = idx ? idx[s + (size_t)i] : s + (size_t)i;
			mtlz_eval_item *e = &items[s + (size_t)i];

			memset(e, 0, sizeof(*e));
			e->true_cls = d->cls[r] >= 0 && d->cls[r] < MTLZ_N_CLASSES ? d->cls[r] :
										      MTLZ_CLASS_NONE;
			for (int k = 0; k < MTLZ_N_CLASSES; k++)
				e->logit[k] = logits[i * MTLZ_N_CLASSES + k];
			e->oh_true = d->oh[r];
			e->oh_pred = metal[i];
			e->oh_sigma = NAN;
			e->z = d->z ? d->z[r] : NAN;
			e->sn_r = d->sn_r ? d->sn_r[r] : NAN;
			e->log_mass = d->log_mass ? d->log_mass[r] : NAN;
		}
	}
	mtlz_apply_temperature(items, n, 1.0);
out_free:
	free(x);
	free(oh);
	free(logits);
	free(metal);
	free(cls);
	return rc;
}

void mtlz_calib_score(mtlz_eval_item *it, size_t n, double T, mtlz_calib *c)
{
	memset(c, 0, sizeof(*c));
	c->temperature = T;
	for (size_t i = 0; i < n; i++) {
		int ok = it[i].true_cls >= 0 && it[i].true_cls < MTLZ_N_CLASSES;

		for (int k = 0; k < 4; k++)
			ok &= isfinite(it[i].logit[k]);
		c->n += ok;
	}
	c->nll_before = mtlz_temperature_nll(it, n, 1.0);
	mtlz_apply_temperature(it, n, 1.0);
	c->ece_before = mtlz_ece(it, n, MTLZ_METRICS_ECE_BINS, NULL, NULL, NULL);
	c->nll_after = mtlz_temperature_nll(it, n, T);
	mtlz_apply_temperature(it, n, T);
	c->ece_after = mtlz_ece(it, n, MTLZ_METRICS_ECE_BINS, NULL, NULL, NULL);
}

int mtlz_calib_fit(mtlz_eval_item *it, size_t n, mtlz_calib *c, char *errstr,
		   size_t errstr_size)
{
	const double T = mtlz_fit_temperature(it, n);

	if (!isfinite(T)) {
		memset(c, 0, sizeof(*c));
		c->temperature = 1;
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"no spectrum with a class label among the %zu to calibrate on", n);
	}
	mtlz_calib_score(it, n, T, c);
	return MTLZ_OK;
}

/* jansson refuses NaN: undefined numbers are null. */
static json_t *num(double v)
{
	return isfinite(v) ? json_real(v) : json_null();
}

char *mtlz_calib_json(const mtlz_calib *c, const char *fitted_on)
{
	json_t *j = json_object();
	char *s;

	json_object_set_new(j, "method", json_string("temperature"));
	json_object_set_new(j, "temperature", json_real(c->temperature));
	json_object_set_new(j, "fitted_on", json_string(fitted_on ? fitted_on : ""));
	json_object_set_new(j, "n", json_integer(c->n));
	json_object_set_new(j, "nll_before", num(c->nll_before));
	json_object_set_new(j, "nll_after", num(c->nll_after));
	json_object_set_new(j, "ece_before", num(c->ece_before));
	json_object_set_new(j, "ece_after", num(c->ece_after));
	json_object_set_new(j, "ece_bins", json_integer(MTLZ_METRICS_ECE_BINS));
	s = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(17));
	json_decref(j);
	return s;
}
