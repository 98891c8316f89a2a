/*
 * test_engine.c - the CPU engine against the naive reference (ref_nn.c):
 * every layer kernel on random inputs (odd lengths, batch > 1, both ISA
 * paths and the BLAS path), then whole models end to end, MC dropout and
 * model swapping between batches.
 */
#include "common.h"
#include "kernels_cpu.h"
#include "model.h"
#include "mtlz_engine.h"
#include "ref_nn.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static void fill(float *v, size_t n, mtlz_rng *r, double lo, double hi)
{
	for (size_t i = 0; i < n; i++)
		v[i] = (float)(lo + (hi - lo) * mtlz_rng_uniform(r));
}

/* max |a - b| / max(1e-3, max |b|), the relative error used throughout */
static double rel_err(const float *a, const float *b, size_t n)
{
	double num = 0, den = 1e-3;

	for (size_t i = 0; i < n; i++) {
		num = fmax(num, fabs((double)a[i] - b[i]));
		den = fmax(den, fabs((double)b[i]));
	}
	return num / den;
}

/* Runs one conv layer through the engine's kernel (channels-last, packed)
 * and through the reference (channels-first); compares. */
static void check_conv(int isa, int use_blas, int cin, int cout, int len, int k,
		       int pad, unsigned seed)
{
	const int cin_pad = cin == 1 ? 1 : mtlz_round_up(cin, MTLZ_NR);
	const int cp = mtlz_round_up(cout, MTLZ_NR), lo = len + 2 * pad - k + 1;
	const size_t K = (size_t)k * cin_pad;
	float *x = calloc((size_t)cin * len, 4), *w = calloc((size_t)cout * cin * k, 4);
	float *b = calloc(cout, 4), *ref = calloc((size_t)cout * lo, 4);
	float *xn = calloc((size_t)(len + 2 * pad) * cin_pad, 4);
	float *wp = mtlz_aligned_alloc(K * cp * 4), *bp = mtlz_aligned_alloc(cp * 4);
	float *wrow = calloc(K * cp, 4), *y = calloc((size_t)lo * cp, 4);
	float *col = calloc((size_t)lo * K, 4), *got = calloc((size_t)cout * lo, 4);
	mtlz_rng r;
	int lo_ref;

	mtlz_rng_seed(&r, seed);
	fill(x, (size_t)cin * len, &r, -1, 1);
	fill(w, (size_t)cout * cin * k, &r, -0.5, 0.5);
	fill(b, cout, &r, -0.5, 0.5);
	ref_conv1d(x, cin, len, w, b, cout, k, pad, ref, &lo_ref);
	ref_relu(ref, cout * lo_ref);
	cr_assert_eq(lo_ref, lo);
	for (int i = 0; i < cin; i++)
		for (int l = 0; l < len; l++)
			xn[(size_t)(l + pad) * cin_pad + i] = x[(size_t)i * len + l];
	mtlz_pack_conv(w, b, cout, cin, k, cin_pad, wp, bp);
	mtlz_pack_conv_rows(wp, (int)K, cp, wrow);
	/* two row ranges, as the team split does */
	if (use_blas) {
		mtlz_conv_nlc_blas(xn, cin_pad, k, 0, lo / 2, wrow, bp, cp, y, cp, 1, col);
		mtlz_conv_nlc_blas(xn, cin_pad, k, lo / 2, lo, wrow, bp, cp, y, cp, 1, col);
	} else {
		mtlz_conv_nlc(isa, xn, cin_pad, k, 0, lo / 2, wp, bp, cp, y, cp, 1);
		mtlz_conv_nlc(isa, xn, cin_pad, k, lo / 2, lo, wp, bp, cp, y, cp, 1);
	}
	for (int o = 0; o < cout; o++)
		for (int l = 0; l < lo; l++)
			got[(size_t)o * lo + l] = y[(size_t)l * cp + o];
	for (int o = cout; o < cp; o++)
		for (int l = 0; l < lo; l++)
			cr_assert_eq(y[(size_t)l * cp + o], 0.0f, "padded channel %d not zero", o);
	cr_assert_leq(rel_err(got, ref, (size_t)cout * lo), 1e-5,
		      "conv isa=%d blas=%d cin=%d cout=%d len=%d k=%d: rel err %g",
		      isa, use_blas, cin, cout, len, k, rel_err(got, ref, (size_t)cout * lo));
	free(x); free(w); free(b); free(ref); free(xn); free(wp); free(bp);
	free(wrow); free(y); free(col); free(got);
}

Test(engine, conv_matches_reference_all_paths)
{
	static const int shapes[][5] = {
		/* cin, cout, len, k, pad */
		{ 1, 16, 5161, 3, 1 }, { 16, 16, 97, 3, 1 }, { 16, 32, 61, 3, 1 },
		{ 3, 5, 13, 3, 1 },    { 7, 20, 11, 5, 2 },  { 64, 128, 23, 3, 1 },
		{ 128, 256, 7, 3, 1 }, { 16, 16, 1, 3, 1 },  { 5, 16, 9, 3, 0 },
	};
	const int isa = mtlz_isa_detect();

	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
		const int *v = shapes[s];

		check_conv(MTLZ_ISA_GENERIC, 0, v[0], v[1], v[2], v[3], v[4], 10 + s);
		check_conv(isa, 0, v[0], v[1], v[2], v[3], v[4], 20 + s);
		check_conv(isa, 1, v[0], v[1], v[2], v[3], v[4], 30 + s);
	}
}

Test(engine, maxpool_matches_reference)
{
	const int C = 32, len = 100, pool = 3;
	float x[32 * 100], xn[100 * 32], ref[32 * 33], y[33 * 32];
	mtlz_rng r;
	int lo;

	mtlz_rng_seed(&r, 5);
	fill(x, C * len, &r, -1, 1);
	for (int c = 0; c < C; c++)
		for (int l = 0; l < len; l++)
			xn[l * C + c] = x[c * len + l];
	ref_maxpool(x, C, len, pool, ref, &lo);
	cr_assert_eq(lo, 33); /* floor(100 / 3): the last pixel is dropped */
	mtlz_maxpool_nlc(xn, C, pool, 0, lo, y);
	for (int c = 0; c < C; c++)
		for (int l = 0; l < lo; l++)
			cr_assert_eq(y[l * C + c], ref[c * lo + l]);
}

Test(engine, linear_matches_reference_batched)
{
	enum { ROWS = 5, IN = 37, OUT = 19 };
	float x[ROWS * IN], w[OUT * IN], b[OUT], y[ROWS * OUT], ref[OUT];
	mtlz_rng r;

	mtlz_rng_seed(&r, 6);
	fill(x, sizeof(x) / 4, &r, -1, 1);
	fill(w, sizeof(w) / 4, &r, -1, 1);
	fill(b, OUT, &r, -1, 1);
	for (int rows = 1; rows <= ROWS; rows += ROWS - 1) {
		mtlz_linear(x, rows, IN, w, b, OUT, y, 0);
		for (int i = 0; i < rows; i++) {
			ref_linear(x + i * IN, IN, w, b, OUT, ref);
			cr_assert_leq(rel_err(y + i * OUT, ref, OUT), 1e-5);
		}
	}
}

/* A small architecture that exercises every code path quickly. */
static void small_arch(mtlz_arch *a, mtlz_grid *g)
{
	mtlz_arch_default(a);
	mtlz_grid_default(g);
	g->wmin = 4000;
	g->wmax = 4400;
	g->dw = 1;
	a->input_length = 401;
	a->n_blocks = 3;
	a->channels[0] = 8;
	a->channels[1] = 24;
	a->channels[2] = 32;
	a->attention_reduction = 4;
	a->hidden[0] = 20;
	a->hidden[1] = 12;
}

static void check_model(mtlz_model *m, int n, int threads, unsigned seed)
{
	const mtlz_arch *a = mtlz_model_arch(m);
	const int L = a->input_length, C = a->channels[a->n_blocks - 1];
	float *x = malloc((size_t)n * L * 4), probs[MTLZ_MAX_CLASSES], metal, *feat = malloc(C * 4);
	mtlz_output *out = calloc(n, sizeof(*out));
	mtlz_engine_opts eo;
	mtlz_engine *e;
	double off, scale;
	char err[256];
	mtlz_rng r;

	mtlz_rng_seed(&r, seed);
	fill(x, (size_t)n * L, &r, 0.2, 1.8);
	mtlz_engine_opts_default(&eo);
	eo.n_threads = threads;
	eo.max_batch = n;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	cr_assert_not_null(e, "%s", err);
	cr_assert_eq(mtlz_engine_set_model(e, m, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_eq(mtlz_engine_run(e, x, n, 0, out, err, sizeof(err)), MTLZ_OK, "%s", err);
	mtlz_model_target(m, &off, &scale);
	for (int i = 0; i < n; i++) {
		int arg = 0;

		ref_forward(m, x + (size_t)i * L, probs, &metal, feat);
		for (int k = 1; k < a->n_classes; k++)
			if (probs[k] > probs[arg])
				arg = k;
		cr_assert_leq(rel_err(out[i].prob, probs, a->n_classes), 1e-5,
			      "spectrum %d probs rel err %g", i,
			      rel_err(out[i].prob, probs, a->n_classes));
		cr_assert_eq(out[i].cls, arg);
		cr_assert_float_eq(out[i].metal, metal * scale + off,
				   1e-5 * fmax(1.0, fabs(metal * scale + off)));
		cr_assert(isnan(out[i].metal_sigma));
	}
	mtlz_engine_free(e);
	free(x);
	free(out);
	free(feat);
}

Test(engine, small_model_matches_reference_batch_and_team_modes)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;

	small_arch(&a, &g);
	m = mtlz_model_new_random(&a, &g, 11, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_set_target(m, 8.5, 0.3);
	check_model(m, 5, 1, 1);
	check_model(m, 5, 2, 2);  /* batch mode, 2 threads */
	check_model(m, 1, 2, 3);  /* team mode: one spectrum, 2 threads */
	mtlz_model_free(m);
}

Test(engine, small_model_without_attention_and_padding_zero)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;

	small_arch(&a, &g);
	a.attention_reduction = 0;
	a.padding = 0;
	a.kernel = 5;
	a.pool = 2;
	m = mtlz_model_new_random(&a, &g, 12, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	check_model(m, 3, 2, 4);
	mtlz_model_free(m);
}

Test(engine, paper_model_matches_reference, .timeout = 300)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;

	mtlz_arch_default(&a);
	mtlz_grid_default(&g);
	m = mtlz_model_new_random(&a, &g, 13, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	check_model(m, 3, 2, 5);
	mtlz_model_free(m);
}

Test(engine, generic_isa_matches_reference)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;

	setenv("MTLZ_CPU_ISA", "generic", 1);
	small_arch(&a, &g);
	m = mtlz_model_new_random(&a, &g, 14, err, sizeof(err));
	check_model(m, 4, 2, 6);
	mtlz_model_free(m);
	unsetenv("MTLZ_CPU_ISA");
}

Test(engine, mc_dropout_sigma_is_independent_of_batching)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;
	mtlz_engine_opts eo;
	mtlz_engine *e;
	mtlz_output o4[4], o1;
	float x[4 * 401];
	mtlz_rng r;

	small_arch(&a, &g);
	m = mtlz_model_new_random(&a, &g, 15, err, sizeof(err));
	mtlz_rng_seed(&r, 7);
	fill(x, sizeof(x) / 4, &r, 0.2, 1.8);
	mtlz_engine_opts_default(&eo);
	eo.max_batch = 4;
	eo.mc_samples = 50;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	cr_assert_eq(mtlz_engine_set_model(e, m, err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(mtlz_engine_run(e, x, 4, 50, o4, err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(mtlz_engine_run(e, x + 2 * 401, 1, 50, &o1, err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(o1.metal_sigma, o4[2].metal_sigma);
	for (int i = 0; i < 4; i++)
		cr_assert(o4[i].metal_sigma > 0 && isfinite(o4[i].metal_sigma));
	/* more passes than reserved is refused, not overrun */
	cr_assert_neq(mtlz_engine_run(e, x, 4, 51, o4, err, sizeof(err)), MTLZ_OK);
	mtlz_engine_free(e);
	mtlz_model_free(m);
}

Test(engine, mc_dropout_without_dropout_gives_zero_sigma)
{
	/* Dropout 0 gives identical passes: sigma exactly 0. */
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;
	mtlz_engine_opts eo;
	mtlz_engine *e;
	mtlz_output o;
	float x[401];

	small_arch(&a, &g);
	a.dropout = 0.0f;
	m = mtlz_model_new_random(&a, &g, 16, err, sizeof(err));
	for (int i = 0; i < 401; i++)
		x[i] = 1.0f;
	mtlz_engine_opts_default(&eo);
	eo.max_batch = 1;
	eo.mc_samples = 10;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	mtlz_engine_set_model(e, m, err, sizeof(err));
	cr_assert_eq(mtlz_engine_run(e, x, 1, 10, &o, err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(o.metal_sigma, 0.0f);
	mtlz_engine_free(e);
	mtlz_model_free(m);
}

Test(engine, model_swap_between_batches)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m1, *m2;
	mtlz_engine_opts eo;
	mtlz_engine *e;
	mtlz_output o1, o2, o1b;
	float x[401], p[MTLZ_MAX_CLASSES], metal, feat[32];
	mtlz_rng r;

	small_arch(&a, &g);
	m1 = mtlz_model_new_random(&a, &g, 17, err, sizeof(err));
	m2 = mtlz_model_new_random(&a, &g, 18, err, sizeof(err));
	mtlz_rng_seed(&r, 8);
	fill(x, 401, &r, 0.5, 1.5);
	mtlz_engine_opts_default(&eo);
	eo.max_batch = 1;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	mtlz_engine_set_model(e, m1, err, sizeof(err));
	mtlz_engine_run(e, x, 1, 0, &o1, err, sizeof(err));
	mtlz_engine_set_model(e, m2, err, sizeof(err));
	mtlz_model_free(m2); /* the engine keeps its own packed copy */
	mtlz_engine_run(e, x, 1, 0, &o2, err, sizeof(err));
	ref_forward(m1, x, p, &metal, feat);
	cr_assert_float_eq(o1.metal, metal, 1e-5);
	cr_assert_neq(o1.metal, o2.metal);
	mtlz_engine_set_model(e, m1, err, sizeof(err));
	mtlz_engine_run(e, x, 1, 0, &o1b, err, sizeof(err));
	cr_assert_eq(o1.metal, o1b.metal);
	mtlz_engine_free(e);
	mtlz_model_free(m1);
}

Test(engine, rejects_batches_beyond_reservation)
{
	mtlz_engine_opts eo;
	mtlz_engine *e;
	char err[256];
	mtlz_output o[3];
	float x[3];

	mtlz_engine_opts_default(&eo);
	eo.max_batch = 2;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	cr_assert_neq(mtlz_engine_run(e, x, 1, 0, o, err, sizeof(err)), MTLZ_OK,
		      "run without a model must fail");
	cr_assert(strstr(err, "no model"));
	mtlz_engine_free(e);
	eo.kind = "tpu";
	cr_assert_null(mtlz_engine_new(&eo, err, sizeof(err)));
	cr_assert(strstr(err, "tpu"));
}

Test(engine, mc_dropout_sigma_matches_analytic_variance_of_linear_head)
{
	/* With no hidden layer the metal head is linear: y = b + sum_i w_i m_i
	 * f_i / keep, m_i ~ Bernoulli(keep), so Var y = (1 - keep) / keep *
	 * sum_i (w_i f_i)^2. 4000 passes estimate the std to ~1.1 %. */
	enum { MC = 4000 };
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;
	mtlz_engine_opts eo;
	mtlz_engine *e;
	mtlz_output o;
	float x[401], p[MTLZ_MAX_CLASSES], metal, feat[32];
	const float *w;
	double var = 0;
	mtlz_rng r;

	small_arch(&a, &g);
	a.n_hidden = 0;
	a.dropout = 0.3f;
	m = mtlz_model_new_random(&a, &g, 19, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_set_target(m, 8.0, 0.5);
	mtlz_rng_seed(&r, 9);
	fill(x, 401, &r, 0.5, 1.5);
	ref_forward(m, x, p, &metal, feat);
	w = mtlz_model_find(m, "heads.metal.fc1.weight")->data;
	for (int i = 0; i < 32; i++)
		var += (double)w[i] * w[i] * feat[i] * feat[i];
	var *= 0.3 / 0.7;
	mtlz_engine_opts_default(&eo);
	eo.max_batch = 1;
	eo.mc_samples = MC;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	cr_assert_eq(mtlz_engine_set_model(e, m, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_eq(mtlz_engine_run(e, x, 1, MC, &o, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_float_eq(o.metal_sigma, 0.5 * sqrt(var), 0.05 * 0.5 * sqrt(var),
			   "MC sigma %g, analytic %g", (double)o.metal_sigma, 0.5 * sqrt(var));
	mtlz_engine_free(e);
	mtlz_model_free(m);
}

Test(engine, global_average_pool_matches_reference)
{
	enum { LEN = 21, C = 48 };
	float x[LEN * C], g[C];
	mtlz_rng r;

	mtlz_rng_seed(&r, 10);
	fill(x, LEN * C, &r, -2, 2);
	mtlz_gap_nlc(x, LEN, C, g);
	for (int c = 0; c < C; c++) {
		double s = 0;

		for (int l = 0; l < LEN; l++)
			s += x[l * C + c];
		cr_assert_float_eq(g[c], s / LEN, 1e-6);
	}
}

/* A well-formed output (star-forming, sigma from 100 passes), by hand. */
static mtlz_output good_output(void)
{
	const mtlz_output o = { .prob = { 0.1f, 0.7f, 0.15f, 0.05f }, .cls = 1,
				.metal = 8.9f, .metal_sigma = 0.04f };

	return o;
}

static int check(const mtlz_output *o, int mc, char *why)
{
	return mtlz_output_check(o, 4, 1, mc, why, 160);
}

Test(engine, output_check_refuses_what_cannot_be_published)
{
	char why[160];
	mtlz_output o = good_output();

	cr_assert_eq(check(&o, 100, why), 0);
	/* each defect on its own, and the check names the value */
	o.prob[2] = NAN;
	cr_assert_eq(check(&o, 100, why), -1);
	cr_assert(strstr(why, "probability 2") && strstr(why, "nan"), "%s", why);
	o = good_output();
	o.prob[0] = INFINITY;
	cr_assert_eq(check(&o, 100, why), -1);
	o = good_output();
	o.prob[0] = -0.1f;
	o.prob[2] = 0.35f;  /* sums to 1 still */
	cr_assert_eq(check(&o, 100, why), -1, "a negative probability");
	o = good_output();
	o.prob[3] = 0.5f;  /* sums to 1.45 */
	cr_assert_eq(check(&o, 100, why), -1);
	cr_assert(strstr(why, "sum to 1.45"), "%s", why);
	o = good_output();
	o.cls = 4;
	cr_assert_eq(check(&o, 100, why), -1, "class out of range");
	o.cls = -1;
	cr_assert_eq(check(&o, 100, why), -1);
	o = good_output();
	o.cls = 2;  /* 0.15 < 0.7: not the argmax */
	cr_assert_eq(check(&o, 100, why), -1);
	cr_assert(strstr(why, "below class 1"), "%s", why);
	o = good_output();
	o.metal = NAN;
	cr_assert_eq(check(&o, 100, why), -1, "star-forming needs a metallicity");
	cr_assert(strstr(why, "metallicity is nan"), "%s", why);
	o = good_output();
	o.metal_sigma = NAN;
	cr_assert_eq(check(&o, 100, why), -1, "with MC passes, a sigma");
	cr_assert_eq(check(&o, 0, why), 0, "without MC passes the sigma is NaN by design");
	o.metal_sigma = -1.0f;
	cr_assert_eq(check(&o, 100, why), -1);
	/* not star-forming: the metallicity is not published, whatever it is */
	o = good_output();
	o.prob[1] = 0.1f;
	o.prob[0] = 0.7f;
	o.cls = 0;
	o.metal = o.metal_sigma = NAN;
	cr_assert_eq(check(&o, 100, why), 0);
	/* ties: either of two equal largest probabilities is the class */
	o = good_output();
	o.prob[0] = o.prob[1] = 0.4f;
	o.prob[2] = 0.15f;
	cr_assert_eq(check(&o, 100, why), 0);
	o.cls = 0;
	cr_assert_eq(check(&o, 100, why), 0);
}
