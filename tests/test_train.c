/*
 * test_train.c - the trainer's backward pass and losses (core/train.h):
 *   - every parameter tensor's gradient and the input gradient against
 *     central finite differences in double precision, with attention,
 *     dropout active and both losses, and without attention;
 *   - the float trainer agrees with the double one;
 *   - the forward pass agrees with the inference engine;
 *   - the focal loss and the masked MAE against hand-computed values,
 *     including a batch with no star-forming sample (0, zero gradient);
 *   - single-task modes leave the other head's gradient at zero.
 */
#include "common.h"
#include "model.h"
#include "mtlz_engine.h"
#include "train.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define B 5

static char err[512];

/* A small model of the paper's architecture: 2 blocks (4 and 8 channels),
 * attention, 2 hidden head layers, input length 40. (With fewer channels
 * most ReLUs of a random model are dead and the checks become vacuous;
 * check_params asserts that every tensor gets some gradient.) */
static int tiny_kernel = 3; /* convolution taps of tiny_model ('same' padding) */

static mtlz_model *tiny_model(int attention, uint64_t seed)
{
	mtlz_arch a;
	mtlz_grid g = { 4000.0, 4039.0, 1.0 };
	mtlz_model *m;

	mtlz_arch_default(&a);
	a.input_length = 40;
	a.n_blocks = 2;
	a.channels[0] = 4;
	a.channels[1] = 8;
	a.pool = 2;
	a.kernel = tiny_kernel;
	a.padding = (tiny_kernel - 1) / 2;
	a.attention_reduction = attention ? 2 : 0;
	a.n_hidden = 2;
	a.hidden[0] = 6;
	a.hidden[1] = 5;
	a.dropout = 0.3f;
	m = mtlz_model_new_random(&a, &g, seed, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	if (tiny_kernel != 3)
		mtlz_model_init_he(m, seed); /* live ReLUs at this size */
	/* metallicity = y * 0.5 + 8.5: the target scale must enter the gradient */
	mtlz_model_set_target(m, 8.5, 0.5);
	return m;
}

static float x[B * 40];
static int cls[B] = { 0, 1, 2, 1, -1 };
static float oh[B];

static void make_batch(mtlz_batch *b, uint64_t seed)
{
	mtlz_rng r;

	mtlz_rng_seed(&r, seed);
	for (int i = 0; i < B * 40; i++)
		x[i] = (float)(0.2 + 2.0 * mtlz_rng_uniform(&r));
	oh[0] = NAN;
	oh[1] = 8.7f;    /* star-forming with a label */
	oh[2] = 8.1f;    /* composite: its metallicity must not count */
	oh[3] = 8.95f;
	oh[4] = NAN;
	b->x = x;
	b->cls = cls;
	b->oh = oh;
	b->n = B;
}

static double total_loss(mtlz_trainer_d *t, const mtlz_batch *b, const mtlz_loss_opts *o,
			 const double *xd)
{
	mtlz_losses l;

	cr_assert_eq(xd ? mtlz_trainer_d_step_x(t, xd, b, o, &l, NULL, NULL, err, sizeof(err)) :
		     mtlz_trainer_d_step(t, b, o, &l, NULL, NULL, NULL, NULL, err, sizeof(err)),
		     0, "%s", err);
	return l.total;
}

/* max over i of |analytic - numeric| / max(1e-4, |numeric|) for the
 * parameters [off, off + n), central differences with step h. Three
 * threads (more than this machine's cores, an odd split of every OpenMP
 * loop and BLAS call): the gradient must not depend on the split. */
static void check_params(const char *what, int attention, int task)
{
	mtlz_model *m = tiny_model(attention, 11);
	mtlz_trainer_d *t = mtlz_trainer_d_new(m, B, 3, err, sizeof(err));
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses l;
	double *g, *p, worst = 0;
	const double h = 1e-6;
	size_t n, worst_i = 0, off = 0;

	cr_assert_not_null(t, "%s", err);
	make_batch(&b, 3);
	mtlz_loss_opts_default(&o);
	o.train = 1;         /* dropout on: masks depend on (seed, sample) only */
	o.seed = 99;
	o.w_class = 0.7;
	o.w_metal = 1.3;
	o.task = task;
	n = mtlz_trainer_d_n_params(t);
	g = calloc(n, sizeof(double));
	cr_assert_eq(mtlz_trainer_d_step(t, &b, &o, &l, g, NULL, NULL, NULL, err, sizeof(err)), 0);
	cr_assert_gt(l.n_metal, 0);
	p = mtlz_trainer_d_params(t);
	for (size_t i = 0; i < n; i++) {
		const double keep = p[i];
		double lp, lm, num, rel;

		p[i] = keep + h;
		lp = total_loss(t, &b, &o, NULL);
		p[i] = keep - h;
		lm = total_loss(t, &b, &o, NULL);
		p[i] = keep;
		num = (lp - lm) / (2 * h);
		rel = fabs(g[i] - num) / fmax(1e-4, fabs(num));
		if (rel > worst) {
			worst = rel;
			worst_i = i;
		}
	}
	/* every tensor: name the worst one on failure */
	for (size_t k = 0; k < mtlz_model_n_tensors(m); k++) {
		const mtlz_tensor *tt = mtlz_model_tensor(m, k);

		if (worst_i >= off && worst_i < off + tt->n)
			cr_assert_lt(worst, 1e-5, "%s: worst relative error %.3g in %s[%zu]", what,
				     worst, tt->name, worst_i - off);
		off += tt->n;
	}
	cr_assert_eq(off, n, "the packed parameters are the model's tensors");
	/* and the check was not vacuous: every tensor the loss reaches has a
	 * non-zero gradient somewhere */
	off = 0;
	for (size_t k = 0; k < mtlz_model_n_tensors(m); k++) {
		const mtlz_tensor *tt = mtlz_model_tensor(m, k);
		const int other = (task == MTLZ_TASK_CLASS && strstr(tt->name, "heads.metal")) ||
				  (task == MTLZ_TASK_METAL && strstr(tt->name, "heads.class"));
		double mass = 0;

		for (size_t i = 0; i < tt->n; i++)
			mass += fabs(g[off + i]);
		if (!other)
			cr_assert_gt(mass, 0.0, "%s: %s has no gradient at all", what, tt->name);
		off += tt->n;
	}
	free(g);
	mtlz_trainer_d_free(t);
	mtlz_model_free(m);
}

Test(train, gradient_of_every_parameter_matches_finite_differences)
{
	check_params("attention, both tasks", 1, MTLZ_TASK_BOTH);
}

Test(train, gradient_without_attention_matches_finite_differences)
{
	check_params("no attention", 0, MTLZ_TASK_BOTH);
}

Test(train, gradient_with_five_tap_kernels_matches_finite_differences)
{
	tiny_kernel = 5;
	check_params("kernel 5, padding 2", 0, MTLZ_TASK_BOTH);
	tiny_kernel = 3;
}

Test(train, gradient_of_single_task_losses_matches_finite_differences)
{
	check_params("class only", 1, MTLZ_TASK_CLASS);
	check_params("metal only", 1, MTLZ_TASK_METAL);
}

Test(train, input_gradient_matches_finite_differences)
{
	mtlz_model *m = tiny_model(1, 5);
	mtlz_trainer_d *t = mtlz_trainer_d_new(m, B, 1, err, sizeof(err));
	double xd[B * 40], dx[B * 40], worst = 0;
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses l;
	const double h = 1e-6;

	make_batch(&b, 8);
	for (int i = 0; i < B * 40; i++)
		xd[i] = x[i];
	mtlz_loss_opts_default(&o);
	cr_assert_eq(mtlz_trainer_d_step_x(t, xd, &b, &o, &l, NULL, dx, err, sizeof(err)), 0,
		     "%s", err);
	for (int i = 0; i < B * 40; i++) {
		const double keep = xd[i];
		double lp, lm, num;

		xd[i] = keep + h;
		lp = total_loss(t, &b, &o, xd);
		xd[i] = keep - h;
		lm = total_loss(t, &b, &o, xd);
		xd[i] = keep;
		num = (lp - lm) / (2 * h);
		worst = fmax(worst, fabs(dx[i] - num) / fmax(1e-4, fabs(num)));
	}
	cr_assert_lt(worst, 1e-5, "worst relative error of d loss / d x: %.3g", worst);
	mtlz_trainer_d_free(t);
	mtlz_model_free(m);
}

Test(train, float_trainer_agrees_with_double)
{
	mtlz_model *m = tiny_model(1, 21);
	mtlz_trainer *tf = mtlz_trainer_new(m, B, 2, err, sizeof(err));
	mtlz_trainer_d *td = mtlz_trainer_d_new(m, B, 1, err, sizeof(err));
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses lf, ld;
	size_t n = mtlz_trainer_n_params(tf);
	float *gf = calloc(n, sizeof(float));
	double *gd = calloc(n, sizeof(double)), num = 0, den = 0;

	make_batch(&b, 4);
	mtlz_loss_opts_default(&o);
	o.train = 1;
	o.seed = 7;
	cr_assert_eq(mtlz_trainer_step(tf, &b, &o, &lf, gf, NULL, NULL, NULL, err, sizeof(err)), 0);
	cr_assert_eq(mtlz_trainer_d_step(td, &b, &o, &ld, gd, NULL, NULL, NULL, err, sizeof(err)), 0);
	cr_assert_float_eq(lf.total, ld.total, 1e-5 * fabs(ld.total) + 1e-7);
	for (size_t i = 0; i < n; i++) {
		num += (gf[i] - gd[i]) * (gf[i] - gd[i]);
		den += gd[i] * gd[i];
	}
	cr_assert_lt(sqrt(num / den), 1e-4, "relative L2 difference %.3g", sqrt(num / den));
	free(gf);
	free(gd);
	mtlz_trainer_free(tf);
	mtlz_trainer_d_free(td);
	mtlz_model_free(m);
}

/* train_step = gradient + Adam: from zero moments the first update is,
 * by hand, p - lr * g / (|g| + eps) (m = 0.1 g, v = 0.001 g^2, bias
 * corrections 0.1 and 0.001) */
Test(train, train_step_is_the_gradient_then_one_adam_update)
{
	mtlz_model *m = tiny_model(1, 22);
	mtlz_trainer *t = mtlz_trainer_new(m, B, 2, err, sizeof(err));
	mtlz_trainer *ref = mtlz_trainer_new(m, B, 2, err, sizeof(err));
	size_t n = mtlz_trainer_n_params(t);
	float *g = calloc(n, sizeof(float)), *p0 = malloc(n * sizeof(float));
	const double lr = 1e-3;
	double worst = 0;
	mtlz_adam a;
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses l, lr_ref;
	long moved = 0, nonzero = 0;

	cr_assert(t && ref, "%s", err);
	make_batch(&b, 4);
	mtlz_loss_opts_default(&o);
	o.train = 1;
	o.seed = 9;
	memcpy(p0, mtlz_trainer_params(t), n * sizeof(float));
	cr_assert_eq(mtlz_trainer_step(ref, &b, &o, &lr_ref, g, NULL, NULL, NULL, err,
				       sizeof(err)), 0, "%s", err);
	cr_assert_eq(mtlz_adam_init(&a, n, lr), 0);
	cr_assert_eq(mtlz_trainer_train_step(t, &b, &o, &a, &l, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(a.t, 1);
	cr_assert_float_eq(l.total, lr_ref.total, 1e-6 * fabs(lr_ref.total));
	for (size_t i = 0; i < n; i++) {
		const double want = p0[i] - lr * g[i] / (fabs(g[i]) + 1e-8);
		const double got = mtlz_trainer_params(t)[i];

		worst = fmax(worst, fabs(got - want));
		moved += got != p0[i];
		nonzero += g[i] != 0;
	}
	cr_assert_lt(worst, 1e-6, "worst parameter error after one Adam step: %g", worst);
	cr_assert_gt(nonzero, 10);
	cr_assert_eq(moved, nonzero, "%ld parameters moved, %ld have a gradient", moved, nonzero);
	/* the sync of a CPU trainer is a no-op */
	cr_assert_eq(mtlz_trainer_sync(t, err, sizeof(err)), 0);
	mtlz_adam_free(&a);
	free(g);
	free(p0);
	mtlz_trainer_free(t);
	mtlz_trainer_free(ref);
	mtlz_model_free(m);
}

Test(train, cpu_trainer_precision_is_fp32_only)
{
	mtlz_model *m = tiny_model(1, 23);
	mtlz_trainer *t = mtlz_trainer_new(m, B, 1, err, sizeof(err));

	cr_assert_eq(mtlz_trainer_set_precision(t, "fp32", err, sizeof(err)), 0);
	cr_assert_neq(mtlz_trainer_set_precision(t, "tf32", err, sizeof(err)), 0);
	cr_assert(strstr(err, "tf32") && strstr(err, "cuda"), "%s", err);
	cr_assert_neq(mtlz_trainer_set_precision(t, "fp16", err, sizeof(err)), 0);
	cr_assert(strstr(err, "fp16"), "%s", err);
	cr_assert_null(mtlz_trainer_input_buffer(t));
	mtlz_trainer_free(t);
	mtlz_model_free(m);
}

Test(train, forward_pass_agrees_with_the_inference_engine)
{
	mtlz_model *m = tiny_model(1, 31);
	mtlz_trainer *t = mtlz_trainer_new(m, B, 1, err, sizeof(err));
	mtlz_engine_opts eo;
	mtlz_engine *e;
	mtlz_output out[B];
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses l;
	float logits[B * 4], metal[B];

	make_batch(&b, 9);
	mtlz_loss_opts_default(&o);   /* train = 0: no dropout */
	cr_assert_eq(mtlz_trainer_step(t, &b, &o, &l, NULL, NULL, logits, metal, err,
				       sizeof(err)), 0);
	mtlz_engine_opts_default(&eo);
	eo.max_batch = B;
	eo.n_threads = 1;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	cr_assert_not_null(e, "%s", err);
	cr_assert_eq(mtlz_engine_set_model(e, m, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(mtlz_engine_run(e, x, B, 0, out, err, sizeof(err)), 0, "%s", err);
	for (int i = 0; i < B; i++) {
		double mx = logits[i * 4], s = 0;

		for (int k = 1; k < 4; k++)
			mx = fmax(mx, logits[i * 4 + k]);
		for (int k = 0; k < 4; k++)
			s += exp(logits[i * 4 + k] - mx);
		for (int k = 0; k < 4; k++)
			cr_assert_float_eq(out[i].prob[k], exp(logits[i * 4 + k] - mx) / s, 1e-5);
		cr_assert_float_eq(out[i].metal, metal[i], 1e-4);
	}
	mtlz_engine_free(e);
	mtlz_trainer_free(t);
	mtlz_model_free(m);
}

Test(train, losses_against_hand_computation)
{
	mtlz_model *m = tiny_model(1, 41);
	mtlz_trainer_d *t = mtlz_trainer_d_new(m, B, 1, err, sizeof(err));
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses l;
	double logits[B * 4], metal[B], fl = 0, mae;

	make_batch(&b, 10);
	mtlz_loss_opts_default(&o);
	o.w_class = 2.0;
	o.w_metal = 3.0;
	cr_assert_eq(mtlz_trainer_d_step(t, &b, &o, &l, NULL, NULL, logits, metal, err,
					 sizeof(err)), 0);
	/* focal loss, alpha 0.25, gamma 2, over the 4 labelled samples */
	for (int i = 0; i < 4; i++) {
		double s = 0, pt;

		for (int k = 0; k < 4; k++)
			s += exp(logits[i * 4 + k]);
		pt = exp(logits[i * 4 + cls[i]]) / s;
		fl += -0.25 * (1 - pt) * (1 - pt) * log(pt);
	}
	cr_assert_eq(l.n_cls, 4);
	cr_assert_float_eq(l.cls, fl / 4, 1e-12);
	/* masked MAE: samples 1 and 3 (star-forming with a label); sample 2's
	 * label is ignored because it is composite */
	mae = (fabs(metal[1] - (double)oh[1]) + fabs(metal[3] - (double)oh[3])) / 2;
	cr_assert_eq(l.n_metal, 2);
	cr_assert_float_eq(l.metal, mae, 1e-9);
	cr_assert_float_eq(l.total, 2.0 * l.cls + 3.0 * l.metal, 1e-12);
	mtlz_trainer_d_free(t);
	mtlz_model_free(m);
}

/* Sum of |grad| over the tensors whose name starts with prefix. */
static double grad_mass(const mtlz_model *m, const double *g, const char *prefix)
{
	size_t off = 0;
	double s = 0;

	for (size_t k = 0; k < mtlz_model_n_tensors(m); k++) {
		const mtlz_tensor *tt = mtlz_model_tensor(m, k);

		if (strncmp(tt->name, prefix, strlen(prefix)) == 0)
			for (size_t i = 0; i < tt->n; i++) {
				cr_assert(isfinite(g[off + i]), "%s[%zu] is not finite", tt->name, i);
				s += fabs(g[off + i]);
			}
		off += tt->n;
	}
	return s;
}

Test(train, no_star_forming_sample_gives_zero_metal_loss_and_gradient)
{
	mtlz_model *m = tiny_model(1, 51);
	mtlz_trainer_d *t = mtlz_trainer_d_new(m, B, 1, err, sizeof(err));
	static const int no_sf[B] = { 0, 2, 3, 0, -1 };
	double *g = calloc(mtlz_trainer_d_n_params(t), sizeof(double));
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses l;

	make_batch(&b, 12);
	b.cls = no_sf;
	mtlz_loss_opts_default(&o);
	cr_assert_eq(mtlz_trainer_d_step(t, &b, &o, &l, g, NULL, NULL, NULL, err, sizeof(err)), 0);
	cr_assert_eq(l.n_metal, 0);
	cr_assert_eq(l.metal, 0.0, "masked MAE of nothing is 0, not NaN");
	cr_assert_eq(grad_mass(m, g, "heads.metal."), 0.0);
	cr_assert_gt(grad_mass(m, g, "heads.class."), 0.0);
	free(g);
	mtlz_trainer_d_free(t);
	mtlz_model_free(m);
}

Test(train, single_task_leaves_the_other_head_alone)
{
	mtlz_model *m = tiny_model(1, 61);
	mtlz_trainer_d *t = mtlz_trainer_d_new(m, B, 1, err, sizeof(err));
	double *g = calloc(mtlz_trainer_d_n_params(t), sizeof(double));
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses l;

	make_batch(&b, 13);
	mtlz_loss_opts_default(&o);
	o.task = MTLZ_TASK_CLASS;
	cr_assert_eq(mtlz_trainer_d_step(t, &b, &o, &l, g, NULL, NULL, NULL, err, sizeof(err)), 0);
	cr_assert_eq(grad_mass(m, g, "heads.metal."), 0.0);
	cr_assert_gt(grad_mass(m, g, "backbone."), 0.0);
	cr_assert_float_eq(l.total, l.cls, 1e-15);
	o.task = MTLZ_TASK_METAL;
	cr_assert_eq(mtlz_trainer_d_step(t, &b, &o, &l, g, NULL, NULL, NULL, err, sizeof(err)), 0);
	cr_assert_eq(grad_mass(m, g, "heads.class."), 0.0);
	cr_assert_gt(grad_mass(m, g, "heads.metal."), 0.0);
	cr_assert_float_eq(l.total, l.metal, 1e-15);
	free(g);
	mtlz_trainer_d_free(t);
	mtlz_model_free(m);
}
