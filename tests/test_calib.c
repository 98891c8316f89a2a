/*
 * test_calib.c - temperature scaling (core/calib.h) and where it lands:
 *   - the fit against an independent brute-force grid search of the NLL,
 *     on synthetic logits whose labels are drawn from softmax(z / T0): the
 *     fitted T is close to T0, the NLL and the ECE fall;
 *   - "mtlz.calibration" survives save + load (mtlz_model_temperature),
 *     and a malformed one is refused at load, naming the key;
 *   - the CPU engine's probabilities are softmax(z / T): the same model and
 *     input at T = 1 and T = 2 give p2 = p1^(1/2) normalised, and both match
 *     the trainer's logits through an independent softmax;
 *   - a tiny mtlz-retrain run writes mtlz.calibration (fitted on the
 *     validation split) and the manifest's history, one entry per epoch;
 *     --no-calibrate, `calibrate: false` and an empty validation split
 *     write none and say why; an --init model's calibration is dropped;
 *   - `mtlz calibrate` re-derives the validation split from the manifest
 *     (the same T as mtlz-retrain's), fits on all data with --split all,
 *     and refuses a model without a manifest or data it was not trained on.
 */
#define _GNU_SOURCE
#include "archive.h"
#include "calib.h"
#include "common.h"
#include "metrics.h"
#include "model.h"
#include "mtlz_engine.h"
#include "retrain.h"
#include "train.h"
#include "util.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static char dir[64], archive[128], archive2[128], init[128];
static char err[1024];

static void setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/mtlz-test-calib-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
	snprintf(archive, sizeof(archive), "%s/archive", dir);
	snprintf(archive2, sizeof(archive2), "%s/archive2", dir);
	snprintf(init, sizeof(init), "%s/init.safetensors", dir);
}

static void teardown(void)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (!getenv("MTLZ_TEST_KEEP"))
		cr_assert_eq(system(cmd), 0);
}

TestSuite(calib, .init = setup, .fini = teardown, .timeout = 600);

/* ---- the fit ---- */

static double gauss(mtlz_rng *r)
{
	const double u1 = 1.0 - mtlz_rng_uniform(r), u2 = mtlz_rng_uniform(r);

	return sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

/* n items with logits ~ N(0, 3^2) and labels drawn from softmax(z / T0). */
static mtlz_eval_item *synthetic(size_t n, double T0, uint64_t seed)
{
	mtlz_eval_item *it = calloc(n, sizeof(*it));
	mtlz_rng r;

	cr_assert_not_null(it);
	mtlz_rng_seed(&r, seed);
	for (size_t i = 0; i < n; i++) {
		double p[4], s = 0, u, c = 0;
		int y = 3;

		for (int k = 0; k < 4; k++) {
			it[i].logit[k] = (float)(3 * gauss(&r));
			s += p[k] = exp(it[i].logit[k] / T0);
		}
		u = mtlz_rng_uniform(&r) * s;
		for (int k = 0; k < 4; k++) {
			c += p[k];
			if (u < c) {
				y = k;
				break;
			}
		}
		it[i].true_cls = y;
		it[i].oh_true = it[i].oh_pred = it[i].oh_sigma = NAN;
		it[i].z = it[i].sn_r = it[i].log_mass = NAN;
	}
	return it;
}

/* The mean NLL computed here, independently of metrics.c. */
static double ref_nll(const mtlz_eval_item *it, size_t n, double T)
{
	double s = 0;
	size_t k = 0;

	for (size_t i = 0; i < n; i++) {
		double mx = -INFINITY, se = 0;

		if (it[i].true_cls < 0 || !isfinite(it[i].logit[0]))
			continue;
		for (int c = 0; c < 4; c++)
			mx = fmax(mx, it[i].logit[c] / T);
		for (int c = 0; c < 4; c++)
			se += exp(it[i].logit[c] / T - mx);
		s += mx + log(se) - it[i].logit[it[i].true_cls] / T;
		k++;
	}
	return s / (double)k;
}

static void check_fit(double T0, uint64_t seed)
{
	const size_t n = 20000, n_grid = 6000;
	mtlz_eval_item *it = synthetic(n + 2, T0, seed);
	const double lo = log(0.05), hi = log(20), step = (hi - lo) / (double)n_grid;
	double best_T = 0, best = INFINITY;
	mtlz_calib c;

	/* two items the fit must ignore: no class label, NaN logits */
	it[n].true_cls = MTLZ_CLASS_NONE;
	it[n + 1].logit[2] = NAN;
	for (size_t j = 0; j <= n_grid; j++) {
		const double T = exp(lo + step * (double)j), v = ref_nll(it, n, T);

		if (v < best) {
			best = v;
			best_T = T;
		}
	}
	cr_assert_eq(mtlz_calib_fit(it, n + 2, &c, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_eq(c.n, (long)n);
	cr_assert_leq(fabs(log(c.temperature) - log(best_T)), step,
		      "T0 %g: fitted %.6f, grid %.6f", T0, c.temperature, best_T);
	cr_assert_leq(ref_nll(it, n, c.temperature), best + 1e-12,
		      "the fit is at least as good as the grid's best");
	cr_assert_float_eq(c.nll_after, ref_nll(it, n, c.temperature), 1e-12);
	cr_assert_float_eq(c.nll_before, ref_nll(it, n, 1.0), 1e-12);
	cr_assert_lt(fabs(c.temperature / T0 - 1), 0.05, "T0 %g, fitted %.4f", T0,
		     c.temperature);
	cr_assert_leq(c.nll_after, c.nll_before);
	cr_assert_lt(c.ece_after, c.ece_before, "ECE %.4f -> %.4f", c.ece_before, c.ece_after);
	cr_assert_lt(c.ece_after, 0.02, "calibrated: ECE %.4f", c.ece_after);
	/* the items are left at softmax(z / T) */
	{
		double s = 0;

		for (int k = 0; k < 4; k++)
			s += exp(it[0].logit[k] / c.temperature);
		cr_assert_float_eq(it[0].prob[1], exp(it[0].logit[1] / c.temperature) / s, 1e-6);
	}
	free(it);
}

Test(calib, fit_finds_the_true_temperature_overconfident)
{
	check_fit(2.5, 1);
}

Test(calib, fit_finds_the_true_temperature_underconfident)
{
	check_fit(0.6, 2);
}

Test(calib, fit_at_the_true_temperature_one_changes_little)
{
	mtlz_eval_item *it = synthetic(20000, 1.0, 3);
	mtlz_calib c;

	cr_assert_eq(mtlz_calib_fit(it, 20000, &c, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_lt(fabs(c.temperature - 1), 0.05, "%.4f", c.temperature);
	cr_assert_leq(c.nll_after, c.nll_before);
	free(it);
}

Test(calib, fit_without_labels_is_refused)
{
	mtlz_eval_item *it = synthetic(10, 1.0, 4);
	mtlz_calib c;

	for (int i = 0; i < 10; i++)
		it[i].true_cls = MTLZ_CLASS_NONE;
	cr_assert_neq(mtlz_calib_fit(it, 10, &c, err, sizeof(err)), MTLZ_OK);
	cr_assert(strstr(err, "class label"), "%s", err);
	cr_assert_eq(c.temperature, 1);
	free(it);
}

Test(calib, json_has_the_contract_keys)
{
	const mtlz_calib c = { 1.75, 12, 0.9, 0.8, 0.1, 0.05 };
	char *s = mtlz_calib_json(&c, "validation");
	json_t *j = json_loads(s, 0, NULL);

	cr_assert_not_null(j, "%s", s);
	cr_assert_str_eq(json_string_value(json_object_get(j, "method")), "temperature");
	cr_assert_eq(json_number_value(json_object_get(j, "temperature")), 1.75);
	cr_assert_str_eq(json_string_value(json_object_get(j, "fitted_on")), "validation");
	cr_assert_eq(json_integer_value(json_object_get(j, "n")), 12);
	cr_assert_eq(json_number_value(json_object_get(j, "nll_before")), 0.9);
	cr_assert_eq(json_number_value(json_object_get(j, "nll_after")), 0.8);
	cr_assert_eq(json_number_value(json_object_get(j, "ece_before")), 0.1);
	cr_assert_eq(json_number_value(json_object_get(j, "ece_after")), 0.05);
	json_decref(j);
	free(s);
}

/* ---- the model file ---- */

/* A small model (the paper's layout, fewer channels), He-initialised, with
 * the class head's output layer scaled so the probabilities are far from
 * uniform. */
static mtlz_model *small_model(void)
{
	return tu_small_model(5);
}

Test(calib, temperature_survives_save_and_load)
{
	mtlz_model *m = small_model(), *l;
	const mtlz_calib c = { 1.2345678901234567, 100, 1, 0.9, 0.2, 0.1 };
	char path[160], *js = mtlz_calib_json(&c, "validation");

	snprintf(path, sizeof(path), "%s/cal.safetensors", dir);
	cr_assert_eq(mtlz_model_temperature(m), 1.0, "no calibration: T = 1");
	cr_assert_eq(mtlz_model_set_meta(m, "mtlz.calibration", js), MTLZ_OK);
	cr_assert_eq(mtlz_model_save(m, path, err, sizeof(err)), MTLZ_OK, "%s", err);
	l = mtlz_model_load(path, err, sizeof(err));
	cr_assert_not_null(l, "%s", err);
	cr_assert_eq(mtlz_model_temperature(l), 1.2345678901234567, "%.17g",
		     mtlz_model_temperature(l));
	cr_assert_str_eq(mtlz_model_meta(l, "mtlz.calibration"), js);
	mtlz_model_free(l);
	mtlz_model_free(m);
	free(js);
}

Test(calib, malformed_calibration_is_refused_at_load)
{
	static const char *const bad[] = {
		"not json", "[1.5]", "{\"method\":\"temperature\"}", "{\"temperature\":0}",
		"{\"temperature\":-1}", "{\"temperature\":150}", "{\"temperature\":\"2\"}",
	};
	mtlz_model *m = small_model();
	char path[160];

	snprintf(path, sizeof(path), "%s/bad.safetensors", dir);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		mtlz_model *l;

		mtlz_model_set_meta(m, "mtlz.calibration", bad[i]);
		cr_assert_eq(mtlz_model_save(m, path, err, sizeof(err)), MTLZ_OK, "%s", err);
		err[0] = '\0';
		l = mtlz_model_load(path, err, sizeof(err));
		cr_assert_null(l, "%s must be refused", bad[i]);
		cr_assert(strstr(err, "mtlz.calibration") && strstr(err, path),
			  "the error names the file and the key: %s", err);
	}
	mtlz_model_free(m);
}

/* ---- the engine applies it ---- */

static void engine_probs(const mtlz_model *m, const float *x, int n, mtlz_output *out)
{
	mtlz_engine_opts eo;
	mtlz_engine *e;

	mtlz_engine_opts_default(&eo);
	eo.max_batch = n;
	eo.n_threads = 2;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	cr_assert_not_null(e, "%s", err);
	cr_assert_eq(mtlz_engine_set_model(e, m, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_eq(mtlz_engine_run(e, x, n, 0, out, err, sizeof(err)), MTLZ_OK, "%s", err);
	mtlz_engine_free(e);
}

Test(calib, engine_probabilities_are_softmax_of_logits_over_t)
{
	enum { N = 6 };
	mtlz_model *m = small_model();
	const int L = mtlz_model_arch(m)->input_length;
	float *x = malloc((size_t)N * L * sizeof(float)), logits[N * 4], metal[N], oh[N];
	float *w;
	size_t nw;
	int cls[N];
	mtlz_output p1[N], p2[N];
	mtlz_trainer *t;
	mtlz_loss_opts lo;
	mtlz_losses l;
	mtlz_rng r;
	double spread = 0;
	char name[64];

	cr_assert_not_null(x);
	snprintf(name, sizeof(name), "heads.class.fc%d.weight", mtlz_model_arch(m)->n_hidden + 1);
	w = mtlz_model_data(m, name);
	cr_assert_not_null(w, "%s", name);
	nw = mtlz_model_find(m, name)->n;
	for (size_t i = 0; i < nw; i++)
		w[i] *= 8;
	mtlz_rng_seed(&r, 11);
	for (int i = 0; i < N; i++) {
		const double line = 4000 + 800 * i;

		for (int k = 0; k < L; k++)
			x[(size_t)i * L + k] = (float)(1 + 0.1 * gauss(&r) +
				3 * exp(-0.5 * pow((3840 + k - line) / 5, 2)));
		cls[i] = i % 4;
		oh[i] = NAN;
	}
	/* the same model and input at T = 1 and at T = 2 */
	engine_probs(m, x, N, p1);
	mtlz_model_set_meta(m, "mtlz.calibration", "{\"method\":\"temperature\",\"temperature\":2}");
	cr_assert_eq(mtlz_model_temperature(m), 2.0);
	engine_probs(m, x, N, p2);
	/* independent logits: the trainer's forward pass, dropout off */
	t = mtlz_trainer_new(m, N, 1, err, sizeof(err));
	cr_assert_not_null(t, "%s", err);
	mtlz_loss_opts_default(&lo);
	lo.train = 0;
	{
		const mtlz_batch b = { x, cls, oh, N };

		cr_assert_eq(mtlz_trainer_step(t, &b, &lo, &l, NULL, NULL, logits, metal, err,
					       sizeof(err)), MTLZ_OK, "%s", err);
	}
	for (int i = 0; i < N; i++) {
		double s1 = 0, sz1 = 0, sz2 = 0, mx = -INFINITY;

		for (int k = 0; k < 4; k++) {
			s1 += sqrt(p1[i].prob[k]);
			mx = fmax(mx, logits[i * 4 + k]);
		}
		for (int k = 0; k < 4; k++) {
			sz1 += exp(logits[i * 4 + k] - mx);
			sz2 += exp((logits[i * 4 + k] - mx) / 2);
		}
		for (int k = 0; k < 4; k++) {
			const double want2 = sqrt(p1[i].prob[k]) / s1;

			cr_assert_float_eq(p2[i].prob[k], want2, 1e-5,
					   "spectrum %d class %d: p(T=2) %.7f, p(T=1)^(1/2) normalised "
					   "%.7f", i, k, p2[i].prob[k], want2);
			cr_assert_float_eq(p1[i].prob[k], exp(logits[i * 4 + k] - mx) / sz1, 1e-4);
			cr_assert_float_eq(p2[i].prob[k], exp((logits[i * 4 + k] - mx) / 2) / sz2, 1e-4);
			spread = fmax(spread, fabs(p1[i].prob[k] - p2[i].prob[k]));
		}
		cr_assert_eq(p1[i].cls, p2[i].cls, "the argmax does not move");
	}
	cr_assert_gt(spread, 0.05, "the test has teeth: T changes the probabilities (%.3f)",
		     spread);
	mtlz_trainer_free(t);
	mtlz_model_free(m);
	free(x);
}

/* ---- mtlz-retrain and mtlz calibrate ---- */

/* weaker lines and more noise than the trainer's tests: the classes
 * overlap, so there is something to calibrate */
static void write_archive(const char *path, int n, uint64_t seed)
{
	const struct tu_archive o = { path, "c", n, seed, 0.6, 0.2, 0 };

	tu_write_archive(&o);
}

static void write_init(const char *calibration)
{
	mtlz_model *m = small_model();

	if (calibration)
		mtlz_model_set_meta(m, "mtlz.calibration", calibration);
	cr_assert_eq(mtlz_model_save(m, init, err, sizeof(err)), 0, "%s", err);
	mtlz_model_free(m);
}

static void opts(mtlz_retrain_opts *o, char **data, const char *out, int epochs)
{
	mtlz_retrain_opts_default(o);
	o->data = data;
	o->n_data = 1;
	o->out = out;
	o->init = init;
	o->epochs = epochs;
	o->batch = 16;
	o->threads = 2;
	o->seed = 9;
	o->schema_dir = MTLZ_SOURCE_DIR "/schemas";
}

static json_t *meta_json(const char *model, const char *key)
{
	mtlz_model *m = mtlz_model_load(model, err, sizeof(err));
	const char *s;
	json_t *j;

	cr_assert_not_null(m, "%s", err);
	s = mtlz_model_meta(m, key);
	j = s ? json_loads(s, 0, NULL) : NULL;
	cr_assert(!s || j, "%s: %s is not JSON", model, key);
	mtlz_model_free(m);
	return j;
}

static const char *const history_keys[] = {
	"train_class", "train_metal", "train_total", "val_class", "val_metal", "val_total",
	"w_class", "w_metal", "lr", "seconds",
};

Test(calib, retrain_writes_calibration_and_history)
{
	char out[160], cmd[1024];
	char *data[1] = { archive };
	mtlz_retrain_opts o;
	mtlz_retrain_result *res = calloc(1, sizeof(*res));
	json_t *cal, *man, *h, *mc;
	mtlz_model *m;
	size_t i;
	json_t *e;

	write_archive(archive, 120, 31);
	write_init("{\"method\":\"temperature\",\"temperature\":3}");
	snprintf(out, sizeof(out), "%s/model.safetensors", dir);
	opts(&o, data, out, 3);
	cr_assert_eq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(res->calibrated, 1, "skipped: %s", res->calib_skipped);
	cal = meta_json(out, "mtlz.calibration");
	cr_assert_not_null(cal, "mtlz.calibration written");
	cr_assert_str_eq(json_string_value(json_object_get(cal, "method")), "temperature");
	cr_assert_str_eq(json_string_value(json_object_get(cal, "fitted_on")), "validation");
	cr_assert_eq(json_integer_value(json_object_get(cal, "n")), res->n_val);
	cr_assert_eq(json_number_value(json_object_get(cal, "temperature")),
		     res->calib_val.temperature);
	cr_assert_leq(json_number_value(json_object_get(cal, "nll_after")),
		      json_number_value(json_object_get(cal, "nll_before")));
	cr_assert(json_is_number(json_object_get(cal, "ece_before")) &&
		  json_is_number(json_object_get(cal, "ece_after")));
	m = mtlz_model_load(out, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	cr_assert_eq(mtlz_model_temperature(m), res->calib_val.temperature);
	mtlz_model_free(m);
	/* the manifest: history, one entry per epoch, and the test-split ECE */
	man = meta_json(out, "mtlz.training");
	cr_assert_not_null(man);
	h = json_object_get(man, "history");
	cr_assert_eq(json_array_size(h), 3, "one history entry per epoch");
	json_array_foreach(h, i, e) {
		cr_assert_eq(json_integer_value(json_object_get(e, "epoch")), (json_int_t)i + 1);
		for (size_t k = 0; k < sizeof(history_keys) / sizeof(history_keys[0]); k++)
			cr_assert(json_is_number(json_object_get(e, history_keys[k])),
				  "history[%zu].%s", i, history_keys[k]);
		cr_assert_eq(json_number_value(json_object_get(e, "val_total")),
			     res->log[i].val_total);
		cr_assert_eq(json_number_value(json_object_get(e, "w_class")),
			     res->log[i].lambda[0]);
	}
	mc = json_object_get(man, "calibration");
	cr_assert_eq(json_number_value(json_object_get(mc, "temperature")),
		     res->calib_val.temperature);
	cr_assert_eq(json_integer_value(json_object_get(json_object_get(mc, "test"), "n")),
		     res->n_test);
	cr_assert(json_is_number(json_object_get(json_object_get(mc, "test"), "ece_after")));
	cr_assert(json_is_true(json_object_get(json_object_get(man, "hyperparameters"),
					       "calibrate")));
	json_decref(man);

	/* mtlz calibrate: the validation split re-derived from the manifest
	 * gives mtlz-retrain's temperature */
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz calibrate --model %s --data %s -o "
		 "%s/recal.safetensors --threads 2 > %s/recal.json 2>%s/recal.log", out, archive,
		 dir, dir, dir);
	cr_assert_eq(system(cmd), 0, "mtlz calibrate (see %s/recal.log)", dir);
	snprintf(cmd, sizeof(cmd), "%s/recal.safetensors", dir);
	{
		json_t *rc = meta_json(cmd, "mtlz.calibration");
		const double T = json_number_value(json_object_get(rc, "temperature"));

		cr_assert_float_eq(T, res->calib_val.temperature, 1e-6 * T,
				   "recalibrated %.9f, retrain %.9f", T, res->calib_val.temperature);
		cr_assert_eq(json_integer_value(json_object_get(rc, "n")), res->n_val);
		json_decref(rc);
	}
	/* --split all: every spectrum */
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz calibrate --model %s --data %s -o "
		 "%s/all.safetensors --split all >/dev/null 2>>%s/recal.log", out, archive, dir, dir);
	cr_assert_eq(system(cmd), 0, "mtlz calibrate --split all (see %s/recal.log)", dir);
	snprintf(cmd, sizeof(cmd), "%s/all.safetensors", dir);
	{
		json_t *rc = meta_json(cmd, "mtlz.calibration");

		cr_assert_str_eq(json_string_value(json_object_get(rc, "fitted_on")), "all");
		cr_assert_eq(json_integer_value(json_object_get(rc, "n")), 120);
		json_decref(rc);
	}
	/* other data than the training's: refused, unless --seed says so */
	write_archive(archive2, 60, 32);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz calibrate --model %s --data %s -o "
		 "%s/x.safetensors 2>%s/other.log", out, archive2, dir, dir);
	cr_assert_eq(WEXITSTATUS(system(cmd)), 1);
	snprintf(cmd, sizeof(cmd), "grep -q 'not those' %s/other.log", dir);
	cr_assert_eq(system(cmd), 0, "says the data differ (see %s/other.log)", dir);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz calibrate --model %s --data %s -o "
		 "%s/x.safetensors --seed 4 >/dev/null 2>%s/other.log && grep -q warning %s/other.log",
		 out, archive2, dir, dir, dir);
	cr_assert_eq(system(cmd), 0, "--seed: a warning, not a refusal");
	/* a model without a manifest: its split is unknown */
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz calibrate --model %s --data %s -o "
		 "%s/x.safetensors 2>%s/noman.log", init, archive, dir, dir);
	cr_assert_eq(WEXITSTATUS(system(cmd)), 2);
	snprintf(cmd, sizeof(cmd), "grep -q -- '--seed' %s/noman.log", dir);
	cr_assert_eq(system(cmd), 0, "suggests --seed or --split all");
	json_decref(cal);
	free(res);
}

Test(calib, retrain_skips_calibration_when_asked_or_impossible)
{
	char out[160];
	char *data[1] = { archive };
	mtlz_retrain_opts o;
	mtlz_retrain_result *res = calloc(1, sizeof(*res));
	json_t *man;
	mtlz_model *m;

	write_archive(archive, 60, 33);
	/* the init model's calibration must not survive into the output */
	write_init("{\"method\":\"temperature\",\"temperature\":3}");
	snprintf(out, sizeof(out), "%s/nocal.safetensors", dir);
	opts(&o, data, out, 1);
	o.no_calibrate = 1;
	cr_assert_eq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(res->calibrated, 0);
	m = mtlz_model_load(out, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	cr_assert_null(mtlz_model_meta(m, "mtlz.calibration"));
	cr_assert_eq(mtlz_model_temperature(m), 1.0);
	mtlz_model_free(m);
	man = meta_json(out, "mtlz.training");
	cr_assert(strstr(json_string_value(json_object_get(json_object_get(man, "calibration"),
							   "skipped")), "no-calibrate"));
	cr_assert_eq(json_array_size(json_object_get(man, "history")), 1);
	json_decref(man);
	/* no validation split: skipped, with the reason */
	opts(&o, data, out, 1);
	o.frac_train = 0.8;
	o.frac_val = 0;
	cr_assert_eq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(res->n_val, 0);
	cr_assert_eq(res->calibrated, 0);
	cr_assert(strstr(res->calib_skipped, "validation split is empty"), "%s",
		  res->calib_skipped);
	m = mtlz_model_load(out, err, sizeof(err));
	cr_assert_null(mtlz_model_meta(m, "mtlz.calibration"));
	mtlz_model_free(m);
	free(res);
}

/* The command line: --no-calibrate and `calibrate: false` skip it and say
 * so on stderr; a bad value of the key exits 2. */
Test(calib, cli_flag_and_yaml_key)
{
	char cmd[1024], out[160], yaml[160];
	FILE *f;

	write_archive(archive, 60, 34);
	write_init(NULL);
	snprintf(out, sizeof(out), "%s/cli.safetensors", dir);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz-retrain --data %s -o %s --init %s "
		 "--epochs 1 --batch 16 --threads 1 2>%s/on.log && grep -q 'calibration: "
		 "temperature' %s/on.log", archive, out, init, dir, dir);
	cr_assert_eq(system(cmd), 0, "calibrated by default (see %s/on.log)", dir);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz-retrain --data %s -o %s --init %s "
		 "--epochs 1 --batch 16 --threads 1 --no-calibrate 2>%s/off.log && grep -q "
		 "'calibration skipped' %s/off.log", archive, out, init, dir, dir);
	cr_assert_eq(system(cmd), 0, "--no-calibrate (see %s/off.log)", dir);
	snprintf(yaml, sizeof(yaml), "%s/c.yaml", dir);
	f = fopen(yaml, "w");
	fprintf(f, "epochs: 1\nbatch: 16\ncalibrate: false\n");
	fclose(f);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz-retrain --config %s --data %s -o %s "
		 "--init %s --threads 1 2>%s/yaml.log && grep -q 'calibration skipped' %s/yaml.log",
		 yaml, archive, out, init, dir, dir);
	cr_assert_eq(system(cmd), 0, "calibrate: false (see %s/yaml.log)", dir);
	f = fopen(yaml, "w");
	fprintf(f, "calibrate: maybe\n");
	fclose(f);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz-retrain --config %s --data %s -o %s "
		 "2>%s/bad.log", yaml, archive, out, dir);
	cr_assert_eq(WEXITSTATUS(system(cmd)), 2);
	snprintf(cmd, sizeof(cmd), "grep -q 'c.yaml:1:12: calibrate: bad value' %s/bad.log", dir);
	cr_assert_eq(system(cmd), 0, "names file, line, column and key");
	/* the shipped configuration has the key */
	snprintf(cmd, sizeof(cmd), "grep -q '^calibrate: true' %s/etc/retrain.yaml",
		 MTLZ_SOURCE_DIR);
	cr_assert_eq(system(cmd), 0);
}

Test(calib, model_with_other_than_four_classes_is_refused)
{
	mtlz_arch a;
	mtlz_grid g;
	mtlz_model *m;
	mtlz_trainer *t;
	mtlz_eval_item item;

	mtlz_arch_default(&a);
	mtlz_grid_default(&g);
	a.n_classes = 5;
	m = mtlz_model_new_random(&a, &g, 3, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	t = mtlz_trainer_new(m, 2, 1, err, sizeof(err));
	cr_assert_not_null(t, "%s", err);
	/* refused before any data is touched (the eval items hold 4 logits) */
	cr_assert_neq(mtlz_calib_collect(t, 2, NULL, NULL, 0, &item, err, sizeof(err)), MTLZ_OK);
	cr_assert(strstr(err, "5 classes"), "%s", err);
	mtlz_trainer_free(t);
	mtlz_model_free(m);
}
