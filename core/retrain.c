/*
 * retrain.c - the training loop (retrain.h).
 *
 * Determinism: the split, the initialisation, each epoch's order and each
 * batch's dropout masks derive from the seed alone; with the same thread
 * count the same run gives the same bits, and a run resumed from a
 * checkpoint continues exactly where it stopped.
 *
 * Checkpoint: a model file (the current parameters, loadable by any tool
 * through mtlz_model_load_ext) with optim.adam_m / optim.adam_v tensors and
 * the training state as JSON in metadata "mtlz.checkpoint", written
 * atomically.
 *
 * Calibration: after the last epoch the class temperature is fitted on the
 * validation split (calib.h) and stored in "mtlz.calibration" of the
 * written model; the manifest also scores it on the test split. A model
 * being trained never carries a calibration: an --init model's is dropped
 * (its logits change), so checkpoints and uncalibrated outputs have none.
 */
#define _POSIX_C_SOURCE 200809L
#include "retrain.h"
#include "archive.h"
#include "common.h"
#include "dataset.h"
#include "optim.h"
#include "preprocess.h"
#include "safetensors.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void mtlz_retrain_opts_default(mtlz_retrain_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->epochs = 100;
	o->batch = 128;
	o->lr = 1e-3;
	o->plateau_factor = 0.1;
	o->plateau_patience = 10;
	o->focal_alpha = 0.25;
	o->focal_gamma = 2.0;
	o->dwa_T = 1.0;
	o->frac_train = 0.6;
	o->frac_val = 0.2;
	o->seed = 1;
	o->task = MTLZ_TASK_BOTH;
	o->dropout = -1;
}

/* Everything a checkpoint restores besides the parameters. */
struct state {
	int epoch;            /* epochs complete */
	long batch;           /* batches done in the current epoch */
	double sum_cls, sum_met; /* this epoch's running sums */
	long n_cls_b, n_met_b;   /* batches that had class / metal samples */
	double lr;
	mtlz_plateau plateau;
	long adam_t;
};

static uint64_t mix(uint64_t a, uint64_t b)
{
	uint64_t z = a ^ (b + 0x9e3779b97f4a7c15ull + (a << 6) + (a >> 2));

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

void mtlz_retrain_split(const int *cls, size_t n, double frac_train, double frac_val,
			uint64_t seed, uint8_t *part)
{
	mtlz_split_stratified(cls, n, 4, frac_train, frac_val, mix(seed, 2), part);
}

static void shuffle(size_t *v, size_t n, uint64_t seed)
{
	mtlz_rng r;

	mtlz_rng_seed(&r, seed);
	mtlz_shuffle_idx(v, n, &r);
}

/* Gathers batch rows idx[0..n) of d into contiguous buffers. */
static void gather(const mtlz_dataset *d, const size_t *idx, int n, float *x, int *cls,
		   float *oh)
{
	for (int i = 0; i < n; i++) {
		memcpy(x + (size_t)i * d->L, d->x + idx[i] * (size_t)d->L, (size_t)d->L * sizeof(float));
		cls[i] = d->cls[idx[i]];
		oh[i] = d->oh[idx[i]];
	}
}

/* Mean losses over a split, dropout off; also class hits and metallicity
 * residuals when asked. */
static int evaluate(mtlz_trainer *t, const mtlz_dataset *d, const size_t *idx, size_t n,
		    int B, const mtlz_loss_opts *lo_in, float *x, int *cls, float *oh,
		    float *logits, float *metal, double *lc, double *lm, long *hits, long *n_lab,
		    double *res_sum, double *res_sq, long *n_res, char *errstr, size_t errstr_size)
{
	mtlz_loss_opts lo = *lo_in;
	double sc = 0, sm = 0;
	long nc = 0, nm = 0;

	lo.train = 0;
	*hits = *n_lab = *n_res = 0;
	*res_sum = *res_sq = 0;
	for (size_t s = 0; s < n; s += (size_t)B) {
		const int nb = (int)MTLZ_MIN((size_t)B, n - s);
		const mtlz_batch b = { x, cls, oh, nb };
		mtlz_losses l;
		int rc;

		gather(d, idx + s, nb, x, cls, oh);
		rc = mtlz_trainer_step(t, &b, &lo, &l, NULL, NULL, logits, metal, errstr,
				       errstr_size);
		if (rc)
			return rc;
		sc += l.cls * l.n_cls;
		nc += l.n_cls;
		sm += l.metal * l.n_metal;
		nm += l.n_metal;
		for (int i = 0; i < nb; i++) {
			int arg = 0;

			for (int k = 1; k < 4; k++)
				if (logits[i * 4 + k] > logits[i * 4 + arg])
					arg = k;
			if (cls[i] >= 0) {
				(*n_lab)++;
				*hits += arg == cls[i];
			}
			if (cls[i] == 1 && isfinite(oh[i])) {
				const double r = (double)metal[i] - oh[i];

				*res_sum += r;
				*res_sq += r * r;
				(*n_res)++;
			}
		}
	}
	*lc = nc ? sc / nc : 0;
	*lm = nm ? sm / nm : 0;
	return MTLZ_OK;
}

static char *state_json(const mtlz_retrain_opts *o, const struct state *st,
			const mtlz_retrain_result *res)
{
	json_t *j = json_object(), *hist = json_array();
	char *s;

	json_object_set_new(j, "epoch", json_integer(st->epoch));
	json_object_set_new(j, "batch", json_integer(st->batch));
	json_object_set_new(j, "sum_cls", json_real(st->sum_cls));
	json_object_set_new(j, "sum_met", json_real(st->sum_met));
	json_object_set_new(j, "n_cls_b", json_integer(st->n_cls_b));
	json_object_set_new(j, "n_met_b", json_integer(st->n_met_b));
	json_object_set_new(j, "lr", json_real(st->lr));
	json_object_set_new(j, "plateau_best", isfinite(st->plateau.best) ?
			    json_real(st->plateau.best) : json_null());
	json_object_set_new(j, "plateau_bad", json_integer(st->plateau.bad));
	json_object_set_new(j, "plateau_reductions", json_integer(st->plateau.reductions));
	json_object_set_new(j, "adam_t", json_integer(st->adam_t));
	json_object_set_new(j, "seed", json_integer((json_int_t)o->seed));
	json_object_set_new(j, "threads", json_integer(o->threads));
	for (int e = 0; e < st->epoch; e++) {
		const mtlz_epoch_log *l = &res->log[e];

		json_array_append_new(hist, json_pack("{s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f}",
			"train_cls", l->train_cls, "train_metal", l->train_metal,
			"train_total", l->train_total, "val_cls", l->val_cls,
			"val_metal", l->val_metal, "val_total", l->val_total,
			"lambda_cls", l->lambda[0], "lambda_metal", l->lambda[1], "lr", l->lr,
			"seconds", l->seconds));
	}
	json_object_set_new(j, "history", hist);
	s = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	return s;
}

static int state_parse(const char *txt, struct state *st, mtlz_retrain_result *res,
		       char *errstr, size_t errstr_size)
{
	json_error_t je;
	json_t *j = json_loads(txt, 0, &je), *h, *v;
	size_t i;

	if (!j)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "checkpoint state: %s",
				je.text);
	st->epoch = (int)json_integer_value(json_object_get(j, "epoch"));
	st->batch = (long)json_integer_value(json_object_get(j, "batch"));
	st->sum_cls = json_number_value(json_object_get(j, "sum_cls"));
	st->sum_met = json_number_value(json_object_get(j, "sum_met"));
	st->n_cls_b = (long)json_integer_value(json_object_get(j, "n_cls_b"));
	st->n_met_b = (long)json_integer_value(json_object_get(j, "n_met_b"));
	st->lr = json_number_value(json_object_get(j, "lr"));
	v = json_object_get(j, "plateau_best");
	st->plateau.best = json_is_number(v) ? json_number_value(v) : INFINITY;
	st->plateau.bad = (int)json_integer_value(json_object_get(j, "plateau_bad"));
	st->plateau.reductions = (int)json_integer_value(json_object_get(j, "plateau_reductions"));
	st->adam_t = (long)json_integer_value(json_object_get(j, "adam_t"));
	h = json_object_get(j, "history");
	if (st->epoch < 0 || st->epoch > MTLZ_RETRAIN_MAX_EPOCHS || !json_is_array(h) ||
	    json_array_size(h) != (size_t)st->epoch || !(st->lr > 0)) {
		json_decref(j);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"checkpoint state is inconsistent");
	}
	json_array_foreach(h, i, v) {
		mtlz_epoch_log *l = &res->log[i];

		l->train_cls = json_number_value(json_object_get(v, "train_cls"));
		l->train_metal = json_number_value(json_object_get(v, "train_metal"));
		l->train_total = json_number_value(json_object_get(v, "train_total"));
		l->val_cls = json_number_value(json_object_get(v, "val_cls"));
		l->val_metal = json_number_value(json_object_get(v, "val_metal"));
		l->val_total = json_number_value(json_object_get(v, "val_total"));
		l->lambda[0] = json_number_value(json_object_get(v, "lambda_cls"));
		l->lambda[1] = json_number_value(json_object_get(v, "lambda_metal"));
		l->lr = json_number_value(json_object_get(v, "lr"));
		l->seconds = json_number_value(json_object_get(v, "seconds"));
	}
	json_decref(j);
	return MTLZ_OK;
}

static int save_checkpoint(const char *path, mtlz_model *m, mtlz_trainer *t,
			   const mtlz_adam *adam, const mtlz_retrain_opts *o,
			   const struct state *st, const mtlz_retrain_result *res, char *errstr,
			   size_t errstr_size)
{
	mtlz_st_out ex[2] = {
		{ "optim.adam_m", 1, { (int64_t)adam->n }, adam->m },
		{ "optim.adam_v", 1, { (int64_t)adam->n }, adam->v },
	};
	char *js = state_json(o, st, res);
	int rc;

	if (!js)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	if (mtlz_trainer_store(t, m)) {
		free(js);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
				"checkpoint: the trainer's parameters could not be read back");
	}
	mtlz_model_set_meta(m, "mtlz.checkpoint", js);
	free(js);
	rc = mtlz_model_save_ext(m, path, ex, 2, errstr, errstr_size);
	mtlz_model_set_meta(m, "mtlz.checkpoint", NULL);
	return rc;
}

/* Temperature scaling at the end of a run (calib.h): fits T on the
 * validation split with the trained parameters in t, scores it on the test
 * split and stores it in m's "mtlz.calibration". Nothing to fit on (no
 * validation spectrum with a class label, or the class head not trained)
 * is not an error: res->calib_skipped says why. */
static int calibrate(const mtlz_retrain_opts *o, mtlz_retrain_result *res, mtlz_trainer *t,
		     int B, const mtlz_dataset *d, const size_t *va, size_t n_va, const size_t *te,
		     size_t n_te, mtlz_model *m, char *errstr, size_t errstr_size)
{
	mtlz_eval_item *items;
	char why[128];
	char *js;
	int rc;

	if (o->no_calibrate) {
		snprintf(res->calib_skipped, sizeof(res->calib_skipped), "not asked (--no-calibrate)");
		return MTLZ_OK;
	}
	if (o->task == MTLZ_TASK_METAL) {
		snprintf(res->calib_skipped, sizeof(res->calib_skipped),
			 "task metal: the class head is not trained");
		return MTLZ_OK;
	}
	if (!n_va) {
		snprintf(res->calib_skipped, sizeof(res->calib_skipped),
			 "the validation split is empty");
		return MTLZ_OK;
	}
	items = calloc(MTLZ_MAX(n_va, n_te), sizeof(*items));
	if (!items)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	rc = mtlz_calib_collect(t, B, d, va, n_va, items, errstr, errstr_size);
	if (rc)
		goto out_free_items;
	if (mtlz_calib_fit(items, n_va, &res->calib_val, why, sizeof(why))) {
		snprintf(res->calib_skipped, sizeof(res->calib_skipped), "validation split: %s",
			 why);
		goto out_free_items;
	}
	if (n_te) {
		rc = mtlz_calib_collect(t, B, d, te, n_te, items, errstr, errstr_size);
		if (rc)
			goto out_free_items;
		mtlz_calib_score(items, n_te, res->calib_val.temperature, &res->calib_test);
	}
	js = mtlz_calib_json(&res->calib_val, "validation");
	if (!js || mtlz_model_set_meta(m, "mtlz.calibration", js)) {
		free(js);
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out_free_items;
	}
	free(js);
	res->calibrated = 1;
out_free_items:
	free(items);
	return rc;
}

/* jansson refuses NaN: undefined numbers are null. */
static json_t *jnum(double v)
{
	return isfinite(v) ? json_real(v) : json_null();
}

/* The manifest's "calibration": the temperature, its fit on the validation
 * split and its effect on the test split; or why there is none. */
static json_t *calibration_json(const mtlz_retrain_result *res)
{
	const mtlz_calib *v = &res->calib_val, *t = &res->calib_test;

	if (!res->calibrated)
		return json_pack("{s:n,s:s}", "temperature", "skipped", res->calib_skipped);
	return json_pack("{s:o,s:s,s:{s:I,s:o,s:o,s:o,s:o},s:{s:I,s:o,s:o,s:o,s:o}}",
		"temperature", jnum(v->temperature), "fitted_on", "validation",
		"validation", "n", (json_int_t)v->n, "nll_before", jnum(v->nll_before),
		"nll_after", jnum(v->nll_after), "ece_before", jnum(v->ece_before),
		"ece_after", jnum(v->ece_after),
		"test", "n", (json_int_t)t->n, "nll_before", jnum(t->nll_before),
		"nll_after", jnum(t->nll_after), "ece_before", jnum(t->ece_before),
		"ece_after", jnum(t->ece_after));
}

/* The per-epoch history of the manifest: one object per complete epoch,
 * with the key names that the plots read (docs/retrain.md). */
static json_t *history_json(const mtlz_retrain_result *res, int n_epochs)
{
	json_t *h = json_array();

	for (int e = 0; e < n_epochs; e++) {
		const mtlz_epoch_log *l = &res->log[e];

		json_array_append_new(h, json_pack("{s:i,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f}",
			"epoch", e + 1, "train_class", l->train_cls, "train_metal",
			l->train_metal, "train_total", l->train_total, "val_class", l->val_cls,
			"val_metal", l->val_metal, "val_total", l->val_total, "w_class",
			l->lambda[0], "w_metal", l->lambda[1], "lr", l->lr, "seconds",
			l->seconds));
	}
	return h;
}

/* The training manifest stored in the output model's metadata. */
static char *manifest(const mtlz_retrain_opts *o, const mtlz_retrain_result *res,
		      const struct state *st)
{
	json_t *j = json_object(), *data = json_array(), *hp;
	char *s;

	for (int i = 0; i < o->n_data; i++) {
		char **files;
		int n;

		if (mtlz_archive_files(o->data[i], &files, &n, NULL, 0) == MTLZ_OK) {
			for (int k = 0; k < n; k++) {
				char hex[65] = "";

				mtlz_sha256_file(files[k], hex, NULL, 0);
				json_array_append_new(data, json_pack("{s:s,s:s}", "path", files[k],
								      "sha256", hex));
			}
			mtlz_archive_files_free(files, n);
		}
	}
	hp = json_pack("{s:i,s:i,s:f,s:f,s:i,s:f,s:f,s:f,s:f,s:f,s:s,s:b,s:I,s:i,s:b}",
		       "epochs", o->epochs, "batch", o->batch, "lr", o->lr,
		       "plateau_factor", o->plateau_factor, "plateau_patience",
		       o->plateau_patience, "focal_alpha", o->focal_alpha, "focal_gamma",
		       o->focal_gamma, "dwa_T", o->dwa_T, "frac_train", o->frac_train,
		       "frac_val", o->frac_val, "task",
		       o->task == MTLZ_TASK_CLASS ? "class" : o->task == MTLZ_TASK_METAL ? "metal" :
		       "both", "attention", !o->no_attention, "seed", (json_int_t)o->seed,
		       "threads", o->threads, "calibrate", !o->no_calibrate);
	json_object_set_new(hp, "engine", json_string(o->engine ? o->engine : "cpu"));
	json_object_set_new(hp, "precision", json_string(o->precision ? o->precision : "fp32"));
	json_object_set_new(j, "data", data);
	json_object_set_new(j, "split", json_pack("{s:I,s:i,s:i,s:i,s:s}", "seed",
		(json_int_t)o->seed, "train", (int)res->n_train, "validation", (int)res->n_val,
		"test", (int)res->n_test, "method", "stratified by class"));
	json_object_set_new(j, "hyperparameters", hp);
	json_object_set_new(j, "init", o->init ? json_string(o->init) : json_null());
	{
		char hex[65];

		json_object_set_new(j, "init_sha256",
				    o->init && mtlz_sha256_file(o->init, hex, NULL, 0) == MTLZ_OK ?
					    json_string(hex) : json_null());
	}
	json_object_set_new(j, "epochs_done", json_integer(st->epoch));
	json_object_set_new(j, "history", history_json(res, st->epoch));
	json_object_set_new(j, "calibration", calibration_json(res));
	/* no labelled test spectrum (e.g. --split-train 0.8 --split-validation
	 * 0.2): null, not a fake 0 */
	json_object_set_new(j, "final", json_pack("{s:f,s:o,s:o,s:o,s:i,s:i}",
		"val_total", st->epoch ? res->log[st->epoch - 1].val_total : 0.0,
		"test_accuracy", res->test_n ? json_real(res->test_accuracy) : json_null(),
		"test_oh_sd", res->test_oh_n > 1 ? json_real(res->test_oh_sd) : json_null(),
		"test_oh_bias", res->test_oh_n ? json_real(res->test_oh_bias) : json_null(),
		"test_oh_n", (int)res->test_oh_n, "test_n", (int)res->test_n));
	s = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	return s;
}

int mtlz_retrain_run(const mtlz_retrain_opts *o, mtlz_retrain_result *res, char *errstr,
		     size_t errstr_size)
{
	const char *schemas = o->schema_dir ? o->schema_dir : getenv("MTLZ_SCHEMA_DIR");
	char ckpt[4096];
	mtlz_dataset d = { 0 };
	mtlz_prep_opts prep;
	mtlz_avro *avro = NULL;
	mtlz_model *m = NULL;
	mtlz_trainer *t = NULL;
	mtlz_adam adam = { 0 };
	mtlz_st *extra = NULL;
	struct state st;
	uint8_t *part = NULL;
	size_t *tr = NULL, *va = NULL, *te = NULL, n_tr = 0, n_va = 0, n_te = 0;
	float *x = NULL, *oh = NULL, *logits = NULL, *metal = NULL;
	int *cls = NULL, rc = MTLZ_OK, B = o->batch, x_owned = 0;
	double t_start = mtlz_now();

	memset(res, 0, sizeof(*res));
	memset(&st, 0, sizeof(st));
	if (o->epochs < 1 || o->epochs > MTLZ_RETRAIN_MAX_EPOCHS || B < 1 || !(o->lr > 0) ||
	    o->n_data < 1 || !o->out)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"retrain: epochs 1..%d, batch >= 1, lr > 0, data and output needed",
				MTLZ_RETRAIN_MAX_EPOCHS);
	snprintf(ckpt, sizeof(ckpt), "%s", o->checkpoint ? o->checkpoint : "");
	if (!ckpt[0])
		snprintf(ckpt, sizeof(ckpt), "%s.ckpt", o->out);

	/* ---- the model: resumed, fine-tuned or new ---- */
	if (o->resume) {
		const char *js;

		m = mtlz_model_load_ext(o->resume, &extra, errstr, errstr_size);
		if (!m)
			return MTLZ_ERR_FORMAT;
		js = mtlz_model_meta(m, "mtlz.checkpoint");
		if (!js || !*js) {
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				      "%s: a model, not a checkpoint (no mtlz.checkpoint)", o->resume);
			goto out;
		}
		rc = state_parse(js, &st, res, errstr, errstr_size);
		if (rc)
			goto out;
	} else if (o->init) {
		m = mtlz_model_load(o->init, errstr, errstr_size);
		if (!m)
			return MTLZ_ERR_FORMAT;
	} else {
		mtlz_arch a;
		mtlz_grid g;

		mtlz_arch_default(&a);
		mtlz_grid_default(&g);
		if (o->no_attention)
			a.attention_reduction = 0;
		if (o->dropout >= 0)
			a.dropout = (float)o->dropout;
		m = mtlz_model_new_random(&a, &g, mix(o->seed, 1), errstr, errstr_size);
		if (!m)
			return MTLZ_ERR_INVALID;
		mtlz_model_init_he(m, mix(o->seed, 1));
	}
	/* a temperature fitted to other logits means nothing for this run */
	mtlz_model_set_meta(m, "mtlz.calibration", NULL);
	/* ---- data ---- */
	avro = mtlz_avro_new(schemas ? schemas : "schemas", NULL, errstr, errstr_size);
	if (!avro) {
		rc = MTLZ_ERR_FORMAT;
		goto out;
	}
	mtlz_prep_opts_default(&prep);
	prep.grid = *mtlz_model_grid(m);
	rc = mtlz_dataset_load(&d, avro, o->data, o->n_data, &prep, errstr, errstr_size);
	if (rc)
		goto out;
	res->n_rejected = (long)d.n_rejected;
	if (d.n < 3) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			      "%zu usable spectra in the archives (%zu rejected by preprocessing)",
			      d.n, d.n_rejected);
		goto out;
	}
	part = malloc(d.n);
	tr = malloc(d.n * sizeof(size_t));
	va = malloc(d.n * sizeof(size_t));
	te = malloc(d.n * sizeof(size_t));
	cls = malloc((size_t)B * sizeof(int));
	oh = malloc((size_t)B * sizeof(float));
	logits = malloc((size_t)B * 4 * sizeof(float));
	metal = malloc((size_t)B * sizeof(float));
	if (!part || !tr || !va || !te || !cls || !oh || !logits || !metal) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out;
	}
	mtlz_retrain_split(d.cls, d.n, o->frac_train, o->frac_val, o->seed, part);
	for (size_t i = 0; i < d.n; i++) {
		if (part[i] == 0)
			tr[n_tr++] = i;
		else if (part[i] == 1)
			va[n_va++] = i;
		else
			te[n_te++] = i;
	}
	res->n_train = (long)n_tr;
	res->n_val = (long)n_va;
	res->n_test = (long)n_te;
	/* metallicity target: standardised on the training split, for new
	 * models and for an --init model that was never trained (mtlz init) */
	if (!o->resume && (!o->init || !mtlz_model_meta(m, "mtlz.training"))) {
		double s = 0, s2 = 0;
		long k = 0;

		for (size_t i = 0; i < n_tr; i++)
			if (isfinite(d.oh[tr[i]])) {
				s += d.oh[tr[i]];
				s2 += (double)d.oh[tr[i]] * d.oh[tr[i]];
				k++;
			}
		if (k >= 2) {
			const double mu = s / k, sd = sqrt(MTLZ_MAX(s2 / k - mu * mu, 1e-6));

			mtlz_model_set_target(m, mu, sd);
		} else {
			mtlz_model_set_target(m, 8.7, 0.2);   /* no labels: a typical range */
		}
	}
	/* ---- trainer and optimiser ---- */
	if (mtlz_model_arch(m)->n_classes != MTLZ_N_CLASSES) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			      "%s: the model has %d classes; training archives label the "
			      "paper's %d (passive, star-forming, composite, AGN)",
			      o->init ? o->init : o->resume ? o->resume : "model",
			      mtlz_model_arch(m)->n_classes, MTLZ_N_CLASSES);
		goto out;
	}
	t = mtlz_trainer_new_kind(m, B, o->threads > 0 ? o->threads :
				  (int)sysconf(_SC_NPROCESSORS_ONLN), o->engine, errstr, errstr_size);
	if (!t) {
		rc = MTLZ_ERR_NOMEM;
		goto out;
	}
	if ((rc = mtlz_trainer_set_precision(t, o->precision, errstr, errstr_size)))
		goto out;
	/* batches are gathered where the trainer reads them fastest (pinned
	 * memory for cuda) */
	x = mtlz_trainer_input_buffer(t);
	x_owned = !x;
	if (!x)
		x = malloc((size_t)B * d.L * sizeof(float));
	if (!x || mtlz_adam_init(&adam, mtlz_trainer_n_params(t), o->lr)) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out;
	}
	if (o->resume) {
		const mtlz_st_tensor *am = mtlz_st_find(extra, "optim.adam_m");
		const mtlz_st_tensor *av = mtlz_st_find(extra, "optim.adam_v");

		if (!am || !av || am->nbytes != adam.n * sizeof(float) ||
		    av->nbytes != adam.n * sizeof(float)) {
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				      "%s: optimiser state missing or of the wrong size", o->resume);
			goto out;
		}
		memcpy(adam.m, am->data, am->nbytes);
		memcpy(adam.v, av->data, av->nbytes);
		adam.t = st.adam_t;
		adam.lr = st.lr;
	} else {
		st.lr = o->lr;
		mtlz_plateau_init(&st.plateau, o->plateau_factor, o->plateau_patience);
	}
	st.plateau.factor = o->plateau_factor;
	st.plateau.patience = o->plateau_patience;
	st.plateau.threshold = 1e-4;

	/* ---- epochs ---- */
	for (; st.epoch < o->epochs; ) {
		const int ep = st.epoch + 1;   /* 1-based, as the paper counts */
		const long n_batches = (long)((n_tr + (size_t)B - 1) / (size_t)B);
		const long use_batches = o->max_batches > 0 ? MTLZ_MIN(n_batches, o->max_batches) :
							      n_batches;
		double lambda[2], prev1[2] = { 1, 1 }, prev2[2] = { 1, 1 }, t_ep = mtlz_now();
		mtlz_loss_opts lo;
		mtlz_epoch_log *lg = &res->log[st.epoch];

		if (ep > 2) {
			prev1[0] = res->log[ep - 2].train_cls;
			prev1[1] = res->log[ep - 2].train_metal;
			prev2[0] = res->log[ep - 3].train_cls;
			prev2[1] = res->log[ep - 3].train_metal;
		}
		mtlz_dwa(ep, prev1, prev2, o->dwa_T, lambda);
		mtlz_loss_opts_default(&lo);
		lo.focal_alpha = o->focal_alpha;
		lo.focal_gamma = o->focal_gamma;
		lo.w_class = lambda[0];
		lo.w_metal = lambda[1];
		lo.task = o->task;
		/* this epoch's order: from the split's order, so that a resumed
		 * run sees the same */
		for (size_t i = 0, k = 0; i < d.n; i++)
			if (part[i] == 0)
				tr[k++] = i;
		shuffle(tr, n_tr, mix(o->seed, 1000 + (uint64_t)ep));
		for (; st.batch < use_batches; st.batch++) {
			const size_t s0 = (size_t)st.batch * (size_t)B;
			const int nb = (int)MTLZ_MIN((size_t)B, n_tr - s0);
			const mtlz_batch b = { x, cls, oh, nb };
			mtlz_losses l;

			if (o->stop && *o->stop) {
				res->stopped = 1;
				break;
			}
			gather(&d, tr + s0, nb, x, cls, oh);
			lo.train = 1;
			lo.seed = mix(mix(o->seed, (uint64_t)ep), (uint64_t)st.batch);
			adam.lr = st.lr;
			rc = mtlz_trainer_train_step(t, &b, &lo, &adam, &l, errstr, errstr_size);
			if (rc)
				goto out;
			st.adam_t = adam.t;
			if (l.n_cls) {
				st.sum_cls += l.cls;
				st.n_cls_b++;
			}
			if (l.n_metal) {
				st.sum_met += l.metal;
				st.n_met_b++;
			}
			if (o->progress) {
				mtlz_progress p = { ep, o->epochs, st.batch + 1, use_batches,
						    st.n_cls_b ? st.sum_cls / st.n_cls_b : 0,
						    st.n_met_b ? st.sum_met / st.n_met_b : 0,
						    { lambda[0], lambda[1] }, st.lr,
						    mtlz_now() - t_start, mtlz_now() - t_ep, 0, 0, 0, 0 };

				o->progress(o->opaque, &p);
			}
		}
		/* the parameters and moments back from the device, if they are there */
		if ((rc = mtlz_trainer_sync(t, errstr, errstr_size)))
			goto out;
		if (res->stopped)
			break;
		/* end of epoch: validation, DWA history, scheduler, checkpoint */
		lg->train_cls = st.n_cls_b ? st.sum_cls / st.n_cls_b : 0;
		lg->train_metal = st.n_met_b ? st.sum_met / st.n_met_b : 0;
		lg->train_total = lambda[0] * lg->train_cls + lambda[1] * lg->train_metal;
		lg->lambda[0] = lambda[0];
		lg->lambda[1] = lambda[1];
		lg->lr = st.lr;
		if (n_va) {
			long hits, nl, nr;
			double rs, rq;

			rc = evaluate(t, &d, va, n_va, B, &lo, x, cls, oh, logits, metal,
				      &lg->val_cls, &lg->val_metal, &hits, &nl, &rs, &rq, &nr, errstr,
				      errstr_size);
			if (rc)
				goto out;
		}
		lg->val_total = (o->task != MTLZ_TASK_METAL ? lambda[0] * lg->val_cls : 0) +
				(o->task != MTLZ_TASK_CLASS ? lambda[1] * lg->val_metal : 0);
		st.lr = mtlz_plateau_step(&st.plateau, n_va ? lg->val_total : lg->train_total,
					  st.lr);
		lg->seconds = mtlz_now() - t_ep;
		st.epoch++;
		st.batch = 0;
		st.sum_cls = st.sum_met = 0;
		st.n_cls_b = st.n_met_b = 0;
		res->epochs_done = st.epoch;
		if (o->progress) {
			mtlz_progress p = { ep, o->epochs, use_batches, use_batches,
					    lg->train_cls, lg->train_metal, { lambda[0], lambda[1] },
					    lg->lr, mtlz_now() - t_start, lg->seconds, 1,
					    lg->val_cls, lg->val_metal, lg->val_total };

			o->progress(o->opaque, &p);
		}
		rc = save_checkpoint(ckpt, m, t, &adam, o, &st, res, errstr, errstr_size);
		if (rc)
			goto out;
	}
	res->epochs_done = st.epoch;
	if (res->stopped) {
		rc = save_checkpoint(ckpt, m, t, &adam, o, &st, res, errstr, errstr_size);
		goto out;
	}
	/* ---- test split, then the model file ---- */
	{
		mtlz_loss_opts lo;
		double lc, lm, rs = 0, rq = 0;
		long hits = 0, nl = 0, nr = 0;
		char *man;

		mtlz_loss_opts_default(&lo);
		lo.task = o->task;
		if (n_te) {
			rc = evaluate(t, &d, te, n_te, B, &lo, x, cls, oh, logits, metal, &lc, &lm,
				      &hits, &nl, &rs, &rq, &nr, errstr, errstr_size);
			if (rc)
				goto out;
		}
		res->test_accuracy = nl ? (double)hits / nl : 0;
		res->test_n = nl;
		res->test_oh_n = nr;
		res->test_oh_bias = nr ? rs / nr : 0;
		res->test_oh_sd = nr > 1 ? sqrt(MTLZ_MAX(rq / nr - res->test_oh_bias *
							   res->test_oh_bias, 0)) : 0;
		if (mtlz_trainer_store(t, m)) {
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
				      "the trainer's parameters could not be read back");
			goto out;
		}
		rc = calibrate(o, res, t, B, &d, va, n_va, te, n_te, m, errstr, errstr_size);
		if (rc)
			goto out;
		man = manifest(o, res, &st);
		if (man) {
			mtlz_model_set_meta(m, "mtlz.training", man);
			free(man);
		}
		{
			/* replaces the starting model's line ("He initialisation,
			 * untrained", or the --init model's own) */
			char prov[1024];

			snprintf(prov, sizeof(prov), "trained by mtlz-retrain %s: %d epochs from %s; "
				 "data, split, hyper-parameters and history in mtlz.training",
				 MTLZ_VERSION, st.epoch, o->init ? o->init : "He initialisation");
			mtlz_model_set_meta(m, "mtlz.provenance", prov);
		}
		mtlz_model_set_meta(m, "mtlz.checkpoint", NULL);
		rc = mtlz_model_save(m, o->out, errstr, errstr_size);
	}
out:
	free(part);
	free(tr);
	free(va);
	free(te);
	if (x_owned)
		free(x);
	free(cls);
	free(oh);
	free(logits);
	free(metal);
	mtlz_adam_free(&adam);
	mtlz_trainer_free(t);
	mtlz_st_free(extra);
	mtlz_model_free(m);
	mtlz_avro_free(avro);
	mtlz_dataset_free(&d);
	return rc;
}
