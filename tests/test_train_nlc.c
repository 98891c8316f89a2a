/*
 * test_train_nlc.c - the float trainer's channels-last trunk
 * (core/train_nlc.h) against the double-precision trainer, whose gradients
 * test_train.c checks against central finite differences:
 *   - loss, every parameter tensor's gradient and the input gradient, for
 *     architectures that exercise the geometry: channel counts below, at and
 *     above 16 (up to 5 panels of 16), kernels of 1, 3, 4 and 5 taps, padding
 *     0..2, pools 1..4, with and without attention, a batch smaller than
 *     the trainer's maximum;
 *   - the portable kernels (MTLZ_CPU_ISA=generic) and the im2col trunk
 *     (MTLZ_TRAIN_TRUNK=im2col) the same way;
 *   - the same step twice gives bit-identical gradients (fixed thread
 *     count); 1 and 3 threads agree to rounding;
 *   - the weight-gradient kernel mtlz_conv_dw_nlc against a naive sum.
 */
#include "common.h"
#include "kernels_cpu.h"
#include "model.h"
#include "train.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAXB 7
#define LEN 61

static char err[512];

struct arch_case {
	int n_blocks, ch[3], kernel, padding, pool, attention;
};

static mtlz_model *model_for(const struct arch_case *c, uint64_t seed)
{
	mtlz_arch a;
	mtlz_grid g = { 4000.0, 4000.0 + LEN - 1, 1.0 };
	mtlz_model *m;

	mtlz_arch_default(&a);
	a.input_length = LEN;
	a.n_blocks = c->n_blocks;
	for (int b = 0; b < c->n_blocks; b++)
		a.channels[b] = c->ch[b];
	a.kernel = c->kernel;
	a.padding = c->padding;
	a.pool = c->pool;
	a.attention_reduction = c->attention ? 2 : 0;
	if (c->attention && c->ch[c->n_blocks - 1] % 2)
		a.attention_reduction = 1;
	a.n_hidden = 2;
	a.hidden[0] = 6;
	a.hidden[1] = 5;
	a.dropout = 0.3f;
	m = mtlz_model_new_random(&a, &g, seed, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_init_he(m, seed);   /* live ReLUs */
	mtlz_model_set_target(m, 8.5, 0.5);
	return m;
}

static float x[MAXB * LEN], oh[MAXB];
static int cls[MAXB];

static void make_batch(mtlz_batch *b, int n, uint64_t seed)
{
	mtlz_rng r;

	mtlz_rng_seed(&r, seed);
	for (int i = 0; i < n * LEN; i++)
		x[i] = (float)(2.0 * mtlz_rng_uniform(&r) - 0.4);
	for (int i = 0; i < n; i++) {
		cls[i] = i % 5 == 4 ? -1 : i % 4;
		oh[i] = cls[i] == 1 ? (float)(8.3 + 0.6 * mtlz_rng_uniform(&r)) : NAN;
	}
	b->x = x;
	b->cls = cls;
	b->oh = oh;
	b->n = n;
}

static double rel_l2f(const float *a, const double *ref, size_t n, double *ref_norm)
{
	double num = 0, den = 0;

	for (size_t i = 0; i < n; i++) {
		num += (a[i] - ref[i]) * (a[i] - ref[i]);
		den += ref[i] * ref[i];
	}
	*ref_norm = sqrt(den);
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* One training step of the float trainer (whatever trunk the environment
 * selects) against the double trainer on the same batch. */
static void check_against_double(const struct arch_case *c, int n, int threads,
				 const char *want_desc)
{
	mtlz_model *m = model_for(c, 40 + (uint64_t)c->kernel * 7 + (uint64_t)c->pool);
	mtlz_trainer *tf = mtlz_trainer_new(m, MAXB, threads, err, sizeof(err));
	mtlz_trainer_d *td = mtlz_trainer_d_new(m, MAXB, 1, err, sizeof(err));
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses lf, ld;
	size_t np;
	float *gf, *dxf = calloc((size_t)n * LEN, sizeof(float));
	double *gd, *dxd = calloc((size_t)n * LEN, sizeof(double)), norm, e;

	cr_assert_not_null(tf, "%s", err);
	cr_assert_not_null(td, "%s", err);
	cr_assert(strstr(mtlz_trainer_describe(tf), want_desc), "trunk '%s', wanted '%s'",
		  mtlz_trainer_describe(tf), want_desc);
	np = mtlz_trainer_n_params(tf);
	gf = calloc(np, sizeof(float));
	gd = calloc(np, sizeof(double));
	make_batch(&b, n, 5 + (uint64_t)n);
	mtlz_loss_opts_default(&o);
	o.train = 1;
	o.seed = 11;
	cr_assert_eq(mtlz_trainer_step(tf, &b, &o, &lf, gf, dxf, NULL, NULL, err, sizeof(err)), 0,
		     "%s", err);
	cr_assert_eq(mtlz_trainer_d_step(td, &b, &o, &ld, gd, dxd, NULL, NULL, err, sizeof(err)),
		     0, "%s", err);
	cr_assert_float_eq(lf.total, ld.total, 1e-5 * fabs(ld.total) + 1e-7,
			   "loss %.9g against %.9g", lf.total, ld.total);
	for (int i = 0; i < 2 * c->n_blocks; i++)
		for (int part = 0; part < 2; part++) {
			char name[64];
			size_t cnt;
			long off = mtlz_trainer_param_offset(
				tf, mtlz_name_conv(name, sizeof(name), i / 2, i % 2, part), &cnt);

			cr_assert_geq(off, 0, "%s", name);
			e = rel_l2f(gf + off, gd + off, cnt, &norm);
			cr_assert_gt(norm, 0, "%s: no gradient at all (dead model?)", name);
			cr_assert_lt(e, 2e-4, "%s: relative L2 difference %.3g (k=%d pad=%d pool=%d)",
				     name, e, c->kernel, c->padding, c->pool);
		}
	e = rel_l2f(gf, gd, np, &norm);
	cr_assert_lt(e, 1e-4, "all parameters: relative L2 difference %.3g", e);
	e = rel_l2f(dxf, dxd, (size_t)n * LEN, &norm);
	cr_assert_gt(norm, 0);
	cr_assert_lt(e, 2e-4, "input gradient: relative L2 difference %.3g", e);
	free(gf);
	free(gd);
	free(dxf);
	free(dxd);
	mtlz_trainer_free(tf);
	mtlz_trainer_d_free(td);
	mtlz_model_free(m);
}

static const struct arch_case cases[] = {
	{ 2, { 4, 8 }, 3, 1, 2, 1 },        /* below 16 channels */
	{ 2, { 16, 32 }, 3, 1, 3, 1 },      /* whole panels, the paper's pool */
	{ 3, { 5, 20, 7 }, 5, 2, 2, 0 },    /* above 16, 5 taps, no attention */
	{ 2, { 8, 16 }, 3, 0, 1, 1 },       /* no padding, no pooling */
	{ 2, { 3, 17 }, 4, 1, 3, 1 },       /* even kernel: outputs shrink */
	{ 2, { 6, 12 }, 3, 2, 2, 0 },       /* padding beyond 'same': outputs grow */
	{ 2, { 80, 24 }, 1, 0, 4, 1 },      /* one tap, pool 4 leaving a remainder, 5 panels */
	{ 3, { 20, 80, 40 }, 3, 1, 3, 1 },  /* several panels in and out */
};

Test(train_nlc, gradients_match_the_double_trainer)
{
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		check_against_double(&cases[i], MAXB, 2, "channels-last");
}

Test(train_nlc, partial_batch_with_more_threads_than_needed)
{
	check_against_double(&cases[2], 3, 3, "channels-last");
	check_against_double(&cases[0], 1, 2, "channels-last");
}

Test(train_nlc, portable_kernels_match_the_double_trainer)
{
	setenv("MTLZ_CPU_ISA", "generic", 1);
	check_against_double(&cases[1], MAXB, 2, "generic");
	check_against_double(&cases[4], MAXB, 1, "generic");
	unsetenv("MTLZ_CPU_ISA");
}

Test(train_nlc, im2col_trunk_matches_the_double_trainer)
{
	setenv("MTLZ_TRAIN_TRUNK", "im2col", 1);
	check_against_double(&cases[1], MAXB, 2, "im2col");
	check_against_double(&cases[2], MAXB, 1, "im2col");
	unsetenv("MTLZ_TRAIN_TRUNK");
}

/* the gradient of a batch, through the float trainer with `threads` */
static float *gradient(mtlz_model *m, int threads, size_t *np)
{
	mtlz_trainer *t = mtlz_trainer_new(m, MAXB, threads, err, sizeof(err));
	mtlz_batch b;
	mtlz_loss_opts o;
	mtlz_losses l;
	float *g;

	cr_assert_not_null(t, "%s", err);
	*np = mtlz_trainer_n_params(t);
	g = calloc(*np, sizeof(float));
	make_batch(&b, MAXB, 3);
	mtlz_loss_opts_default(&o);
	o.train = 1;
	o.seed = 5;
	cr_assert_eq(mtlz_trainer_step(t, &b, &o, &l, g, NULL, NULL, NULL, err, sizeof(err)), 0);
	mtlz_trainer_free(t);
	return g;
}

Test(train_nlc, deterministic_for_a_thread_count)
{
	mtlz_model *m = model_for(&cases[2], 77);
	size_t np;
	float *a = gradient(m, 2, &np), *b = gradient(m, 2, &np), *c = gradient(m, 1, &np);
	double num = 0, den = 0;

	cr_assert_eq(memcmp(a, b, np * sizeof(float)), 0, "two identical steps differ");
	for (size_t i = 0; i < np; i++) {
		num += (double)(a[i] - c[i]) * (a[i] - c[i]);
		den += (double)c[i] * c[i];
	}
	cr_assert_gt(den, 0);
	cr_assert_lt(sqrt(num / den), 1e-5, "1 and 2 threads: relative difference %.3g",
		     sqrt(num / den));
	free(a);
	free(b);
	free(c);
	mtlz_model_free(m);
}

/* c[kk][o] += sum_g x[g*cin + kk] dy[g*ldd + o], against a double sum */
static void check_dw(int isa, int cin, int k, int n, int cout_pad, int ldd)
{
	const int K = k * cin;
	float *xx = malloc((size_t)(n + k) * cin * sizeof(float));
	float *dy = malloc((size_t)n * ldd * sizeof(float));
	float *c = malloc((size_t)K * cout_pad * sizeof(float));
	mtlz_rng r;

	mtlz_rng_seed(&r, (uint64_t)(cin * 131 + k * 17 + n));
	for (int i = 0; i < (n + k) * cin; i++)
		xx[i] = (float)(mtlz_rng_uniform(&r) - 0.5);
	for (int i = 0; i < n * ldd; i++)
		dy[i] = (float)(mtlz_rng_uniform(&r) - 0.5);
	for (int i = 0; i < K * cout_pad; i++)
		c[i] = 0.25f;   /* accumulates onto what is there */
	mtlz_conv_dw_nlc(isa, xx, cin, k, n, dy, ldd, cout_pad, c);
	for (int kk = 0; kk < K; kk++)
		for (int o = 0; o < cout_pad; o++) {
			double ref = 0.25, mag = 0;

			for (int g = 0; g < n; g++) {
				ref += (double)xx[(size_t)g * cin + kk] * dy[(size_t)g * ldd + o];
				mag += fabs((double)xx[(size_t)g * cin + kk] * dy[(size_t)g * ldd + o]);
			}
			cr_assert_float_eq(c[(size_t)kk * cout_pad + o], ref, 1e-6 * mag + 1e-6,
					   "isa %d cin %d k %d n %d: c[%d][%d] = %.8g, want %.8g",
					   isa, cin, k, n, kk, o, c[(size_t)kk * cout_pad + o], ref);
		}
	free(xx);
	free(dy);
	free(c);
}

Test(train_nlc, weight_gradient_kernel_against_a_naive_sum)
{
	static const int v[][5] = {
		/* cin, k, n, cout_pad, ldd */
		{ 1, 3, 300, 16, 16 },     /* the spectrum: K = 3, a 3-row tail tile */
		{ 16, 3, 257, 16, 16 },    /* n across two chunks and a remainder */
		{ 32, 5, 40, 48, 48 },     /* several panels */
		{ 7, 2, 1, 32, 48 },       /* one row, ldd beyond the panels */
		{ 64, 3, 129, 64, 64 },
	};
	const int isa = mtlz_isa_detect();

	for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
		check_dw(MTLZ_ISA_GENERIC, v[i][0], v[i][1], v[i][2], v[i][3], v[i][4]);
		check_dw(isa, v[i][0], v[i][1], v[i][2], v[i][3], v[i][4]);
	}
}
