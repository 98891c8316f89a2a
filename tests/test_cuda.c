/*
 * test_cuda.c - the CUDA engine against the CPU engine (an independent
 * implementation: our AVX2 kernels and OpenBLAS vs cuBLAS and gpu/
 * kernels), on the paper's architecture and on a small odd-sized one:
 * forward outputs (relative error <= 1e-4 in fp32), MC-dropout sigma (same
 * masks, core/mc_rng.h), poisoned buffers (every element written), batch
 * independence, a model swap under captured graphs, TF32, and the error
 * paths (no device, a device that does not exist, out of memory, engine
 * auto). Where no CUDA device is present (CI) the parity tests are skipped
 * with the reason, and the no-device behaviour is tested instead.
 */
#include "common.h"
#include "model.h"
#include "mtlz_engine.h"

#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char why_no_gpu[256];

/* 1 when this build has the CUDA engine and a device answers. */
static int have_gpu(void)
{
	mtlz_engine_opts o;
	mtlz_engine *e;

	if (!strstr(mtlz_engine_kinds(), "cuda")) {
		snprintf(why_no_gpu, sizeof(why_no_gpu), "this build has no CUDA engine");
		return 0;
	}
	mtlz_engine_opts_default(&o);
	o.kind = "cuda";
	e = mtlz_engine_new(&o, why_no_gpu, sizeof(why_no_gpu));
	mtlz_engine_free(e);
	return e != NULL;
}

#define NEED_GPU()                                                           \
	do {                                                                 \
		if (!have_gpu())                                             \
			cr_skip_test("no CUDA device: %s", why_no_gpu);      \
	} while (0)

/* Spectrum-like inputs: continuum near 1, a few emission lines, noise. */
static void spectra(float *x, int n, int L, uint64_t seed)
{
	mtlz_rng r;

	mtlz_rng_seed(&r, seed);
	for (int i = 0; i < n; i++) {
		const double tilt = 0.5 * (mtlz_rng_uniform(&r) - 0.5);

		for (int t = 0; t < L; t++) {
			double v = 1.0 + tilt * ((double)t / L - 0.5) +
				   0.05 * (mtlz_rng_uniform(&r) - 0.5);

			for (int l = 1; l <= 3; l++) {
				const double d = (t - 0.2 * l * L) / 3.0;

				v += (1.0 + i % 4) * 0.5 * exp(-0.5 * d * d);
			}
			x[(size_t)i * L + t] = (float)v;
		}
	}
}

static mtlz_model *paper_model(uint64_t seed)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;

	mtlz_arch_default(&a);
	mtlz_grid_default(&g);
	m = mtlz_model_new_random(&a, &g, seed, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_init_he(m, seed); /* live activations through all layers */
	mtlz_model_set_target(m, 0.0, 1.0);
	return m;
}

/* A small architecture with odd sizes (not multiples of any tile). */
static mtlz_model *odd_model(uint64_t seed, int attention)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;

	memset(&a, 0, sizeof(a));
	a.input_length = 401;
	a.n_blocks = 3;
	a.channels[0] = 5;
	a.channels[1] = 12;
	a.channels[2] = 33;
	a.kernel = 5;
	a.padding = 2;
	a.pool = 2;
	a.attention_reduction = attention ? 3 : 0;
	a.n_hidden = 2;
	a.hidden[0] = 19;
	a.hidden[1] = 7;
	a.n_classes = 4;
	a.dropout = 0.3f;
	g.wmin = 4000;
	g.dw = 1;
	g.wmax = 4400;
	m = mtlz_model_new_random(&a, &g, seed, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_init_he(m, seed);
	return m;
}

/* Shapes the direct convolution kernel takes, with a max-pool of 2 and
 * channel counts that pick each of its tile configurations (16, 32, 64). */
static mtlz_model *pool2_model(uint64_t seed)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256];
	mtlz_model *m;

	memset(&a, 0, sizeof(a));
	a.input_length = 997;
	a.n_blocks = 3;
	a.channels[0] = 16;
	a.channels[1] = 48;
	a.channels[2] = 64;
	a.kernel = 3;
	a.padding = 1;
	a.pool = 2;
	a.attention_reduction = 4;
	a.n_hidden = 1;
	a.hidden[0] = 24;
	a.n_classes = 4;
	a.dropout = 0.5f;
	g.wmin = 4000;
	g.dw = 1;
	g.wmax = 4996;
	m = mtlz_model_new_random(&a, &g, seed, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_init_he(m, seed);
	return m;
}

static mtlz_engine *engine(const char *kind, const mtlz_model *m, int max_batch, int mc,
			   const char *precision)
{
	mtlz_engine_opts o;
	mtlz_engine *e;
	char err[512];

	mtlz_engine_opts_default(&o);
	o.kind = kind;
	o.max_batch = max_batch;
	o.mc_samples = mc;
	o.precision = precision;
	e = mtlz_engine_new(&o, err, sizeof(err));
	cr_assert_not_null(e, "%s engine: %s", kind, err);
	cr_assert_eq(mtlz_engine_set_model(e, m, err, sizeof(err)), MTLZ_OK, "%s", err);
	return e;
}

static void run(mtlz_engine *e, const float *x, int n, int mc, mtlz_output *o)
{
	char err[512];

	for (int i = 0; i < n; i++)
		o[i].metal = o[i].metal_sigma = NAN;
	cr_assert_eq(mtlz_engine_run(e, x, n, mc, o, err, sizeof(err)), MTLZ_OK, "%s", err);
}

struct errs {
	double prob, metal, sigma;
};

/* ||a - b|| / ||b|| over the batch, for probabilities, metallicity, sigma */
static struct errs compare(const mtlz_output *a, const mtlz_output *b, int n, int K)
{
	double dp = 0, np = 0, dm = 0, nm = 0, ds = 0, ns = 0;
	struct errs r;

	for (int i = 0; i < n; i++) {
		for (int k = 0; k < K; k++) {
			cr_assert(isfinite(a[i].prob[k]), "spectrum %d prob %d not finite", i, k);
			dp += pow(a[i].prob[k] - b[i].prob[k], 2);
			np += pow(b[i].prob[k], 2);
		}
		cr_assert(isfinite(a[i].metal), "spectrum %d metallicity not finite", i);
		dm += pow(a[i].metal - b[i].metal, 2);
		nm += pow(b[i].metal, 2);
		if (!isnan(b[i].metal_sigma)) {
			cr_assert(isfinite(a[i].metal_sigma), "spectrum %d sigma not finite", i);
			ds += pow(a[i].metal_sigma - b[i].metal_sigma, 2);
			ns += pow(b[i].metal_sigma, 2);
		}
	}
	r.prob = sqrt(dp / fmax(np, 1e-30));
	r.metal = sqrt(dm / fmax(nm, 1e-30));
	r.sigma = ns > 0 ? sqrt(ds / ns) : 0;
	return r;
}

/* CPU top-1 minus top-2 probability: a class may flip under TF32 only
 * where this is tiny. */
static double top2_gap(const mtlz_output *o, int K)
{
	double p1 = -1, p2 = -1;

	for (int k = 0; k < K; k++)
		if (o->prob[k] > p1) {
			p2 = p1;
			p1 = o->prob[k];
		} else if (o->prob[k] > p2) {
			p2 = o->prob[k];
		}
	return p1 - p2;
}

/* The CUDA engine (precision prec, NULL = fp32) against the CPU engine on
 * the same inputs: relative errors <= tol, the same classes (under TF32,
 * except near ties). */
static void parity_prec(mtlz_model *m, const int *sizes, int n_sizes, int mc, double tol,
			const char *prec, const char *want_path)
{
	const int L = mtlz_model_arch(m)->input_length, K = mtlz_model_arch(m)->n_classes;
	int B = 0;

	for (int s = 0; s < n_sizes; s++)
		B = sizes[s] > B ? sizes[s] : B;
	{
		float *x = malloc((size_t)B * L * sizeof(float));
		mtlz_output *oc = calloc((size_t)B, sizeof(*oc)), *og = calloc((size_t)B, sizeof(*og));
		mtlz_engine *cpu = engine("cpu", m, B, mc, NULL), *gpu = engine("cuda", m, B, mc, prec);

		if (want_path)
			cr_assert(strpbrk(strstr(mtlz_engine_describe(gpu), "conv["), want_path),
				  "no layer on path '%s': %s", want_path, mtlz_engine_describe(gpu));

		for (int s = 0; s < n_sizes; s++) {
			struct errs e;

			spectra(x, sizes[s], L, 100 + (uint64_t)s);
			run(cpu, x, sizes[s], mc, oc);
			run(gpu, x, sizes[s], mc, og);
			e = compare(og, oc, sizes[s], K);
			cr_log_info("batch %d mc %d: rel err prob %.2e metal %.2e sigma %.2e",
				    sizes[s], mc, e.prob, e.metal, e.sigma);
			cr_assert_leq(e.prob, tol, "batch %d: prob rel err %g", sizes[s], e.prob);
			cr_assert_leq(e.metal, tol, "batch %d: metal rel err %g", sizes[s], e.metal);
			cr_assert_leq(e.sigma, 10 * tol, "batch %d: sigma rel err %g", sizes[s], e.sigma);
			for (int i = 0; i < sizes[s]; i++)
				if (!prec || top2_gap(&oc[i], K) > 2e-2)
					cr_assert_eq(og[i].cls, oc[i].cls, "spectrum %d: class %d vs %d",
						     i, og[i].cls, oc[i].cls);
		}
		mtlz_engine_free(cpu);
		mtlz_engine_free(gpu);
		free(x);
		free(oc);
		free(og);
	}
}

static void parity(mtlz_model *m, const int *sizes, int n_sizes, int mc, double tol)
{
	parity_prec(m, sizes, n_sizes, mc, tol, NULL, NULL);
}

Test(cuda, forward_matches_cpu_paper_model, .timeout = 300)
{
	static const int sizes[] = { 1, 3, 64, 65, 200 }; /* graphs (<= 64) and direct */
	mtlz_model *m;

	NEED_GPU();
	m = paper_model(11);
	parity(m, sizes, 5, 0, 1e-4);
	mtlz_model_free(m);
}

Test(cuda, forward_matches_cpu_odd_model_with_and_without_attention)
{
	static const int sizes[] = { 1, 7, 33 };

	NEED_GPU();
	for (int att = 0; att <= 1; att++) {
		mtlz_model *m = odd_model(21 + (uint64_t)att, att);

		parity(m, sizes, 3, 0, 1e-4);
		mtlz_model_free(m);
	}
}

Test(cuda, forward_matches_cpu_on_each_convolution_path, .timeout = 300)
{
	static const int sizes[] = { 1, 17, 40 }; /* both autotune buckets */
	static const char *const modes[] = { "gemm", "direct" };

	NEED_GPU();
	for (int k = 0; k < 2; k++) {
		mtlz_model *p = paper_model(31 + (uint64_t)k), *q = pool2_model(41 + (uint64_t)k);

		setenv("MTLZ_CUDA_CONV", modes[k], 1);
		cr_log_info("MTLZ_CUDA_CONV=%s", modes[k]);
		parity(p, sizes, 3, 10, 1e-4);
		parity(q, sizes, 3, 10, 1e-4);
		unsetenv("MTLZ_CUDA_CONV");
		mtlz_model_free(p);
		mtlz_model_free(q);
	}
}

/* The TF32 tensor-core direct kernels (every tile configuration: 16, 32,
 * 48, 64, 128 and 256 output channels; pools 1, 2, 3; with and without the
 * first layer fused in) against the CPU engine in fp32: the error is TF32
 * rounding (10-bit mantissa: 1e-4..1e-2 relative after ten layers and the
 * heads, the most on a single spectrum whose metallicity output is small),
 * not a wrong index or a missed element (O(1)). */
Test(cuda, tf32_tensor_core_convolutions_match_cpu, .timeout = 300)
{
	static const int sizes[] = { 1, 17, 40 };

	NEED_GPU();
	setenv("MTLZ_CUDA_CONV", "mma", 1);
	for (int k = 0; k < 2; k++) {
		mtlz_model *m = k ? pool2_model(43) : paper_model(33);

		parity_prec(m, sizes, 3, 10, 2e-2, "tf32", "tT");
		mtlz_model_free(m);
	}
	unsetenv("MTLZ_CUDA_CONV");
}

Test(cuda, autotuned_paths_are_named_in_describe)
{
	mtlz_model *m;
	mtlz_engine *g;
	const char *d;

	NEED_GPU();
	m = paper_model(19);
	g = engine("cuda", m, 64, 0, NULL);
	d = mtlz_engine_describe(g);
	cr_log_info("%s", d);
	/* first layer 'f' (Cin = 1), then one of g/d per layer, per bucket */
	cr_assert(strstr(d, "conv[<=16]=f") && strstr(d, "conv[>16]=f"), "%s", d);
	cr_assert(strspn(strstr(d, "conv[>16]=") + strlen("conv[>16]=") + 1, "gdF") == 9, "%s", d);
	mtlz_engine_free(g);
	/* tf32 adds the tensor-core kernels t/T to the candidates */
	g = engine("cuda", m, 64, 0, "tf32");
	d = mtlz_engine_describe(g);
	cr_log_info("%s", d);
	cr_assert(strspn(strstr(d, "conv[>16]=") + strlen("conv[>16]=") + 1, "gdFtT") == 9, "%s", d);
	cr_assert_eq(strlen(strstr(d, "conv[>16]=") + strlen("conv[>16]=")), 10, "%s", d);
	mtlz_engine_free(g);
	mtlz_model_free(m);
}

Test(cuda, mc_dropout_sigma_matches_cpu_same_masks, .timeout = 300)
{
	static const int sizes[] = { 2, 40 };
	mtlz_model *m;

	NEED_GPU();
	m = paper_model(12);
	parity(m, sizes, 2, 100, 1e-4);
	mtlz_model_free(m);
}

/* Every intermediate buffer NaN before each batch: an element a kernel
 * failed to write would reach the outputs. fp32 as autotuned, then tf32
 * with the tensor-core kernels forced. */
Test(cuda, poisoned_buffers_every_element_written)
{
	static const char *const prec[2] = { NULL, "tf32" }, *const conv[2] = { NULL, "mma" };
	const int n = 9, L = 5161, K = 4;
	mtlz_model *m;
	float *x;

	NEED_GPU();
	m = paper_model(13);
	x = malloc((size_t)n * L * sizeof(float));
	spectra(x, n, L, 5);
	setenv("MTLZ_CUDA_GRAPHS", "0", 1);
	for (int v = 0; v < 2; v++) {
		mtlz_engine *clean, *poisoned;
		mtlz_output a[9], b[9];
		struct errs e;

		if (conv[v])
			setenv("MTLZ_CUDA_CONV", conv[v], 1);
		clean = engine("cuda", m, n, 20, prec[v]);
		setenv("MTLZ_CUDA_POISON", "1", 1);
		poisoned = engine("cuda", m, n, 20, prec[v]);
		unsetenv("MTLZ_CUDA_POISON");
		unsetenv("MTLZ_CUDA_CONV");
		cr_assert(strstr(mtlz_engine_describe(poisoned), "POISON"), "%s",
			  mtlz_engine_describe(poisoned));
		cr_log_info("%s", mtlz_engine_describe(poisoned));
		run(clean, x, n, 20, a);
		run(poisoned, x, n, 20, b);
		e = compare(b, a, n, K);
		cr_assert_leq(e.prob, 1e-6, "poisoned run differs: %g", e.prob);
		cr_assert_leq(e.metal, 1e-6, "poisoned run differs: %g", e.metal);
		cr_assert_leq(e.sigma, 1e-6, "poisoned run differs: %g", e.sigma);
		mtlz_engine_free(clean);
		mtlz_engine_free(poisoned);
	}
	unsetenv("MTLZ_CUDA_GRAPHS");
	mtlz_model_free(m);
	free(x);
}

Test(cuda, spectrum_result_independent_of_batch_and_graph)
{
	const int L = 5161;
	mtlz_model *m;
	mtlz_engine *g;
	mtlz_output big[100], one;
	float *x;

	NEED_GPU();
	m = paper_model(14);
	x = malloc((size_t)100 * L * sizeof(float));
	spectra(x, 100, L, 6);
	g = engine("cuda", m, 100, 30, NULL);
	run(g, x, 100, 30, big);
	for (int i = 0; i < 100; i += 33) {
		run(g, x + (size_t)i * L, 1, 30, &one); /* graph path */
		cr_assert_float_eq(one.metal, big[i].metal, 1e-5 * fabs(big[i].metal) + 1e-6);
		cr_assert_float_eq(one.metal_sigma, big[i].metal_sigma,
				   1e-4 * big[i].metal_sigma + 1e-7);
		cr_assert_float_eq(one.prob[0], big[i].prob[0], 1e-5);
	}
	mtlz_engine_free(g);
	mtlz_model_free(m);
	free(x);
}

Test(cuda, model_swap_between_batches_under_graphs)
{
	static const int sizes[] = { 4 };
	const int L = 5161, K = 4;
	mtlz_model *a, *b;
	mtlz_engine *g, *cpu;
	mtlz_output og[4], oc[4];
	float *x;
	char err[512];
	struct errs e;

	NEED_GPU();
	a = paper_model(15);
	b = paper_model(16);
	mtlz_model_set_meta(b, "mtlz.calibration", "{\"method\":\"temperature\",\"temperature\":1.7}");
	x = malloc((size_t)4 * L * sizeof(float));
	spectra(x, 4, L, 7);
	g = engine("cuda", a, 4, 10, NULL);
	run(g, x, 4, 10, og); /* captures the graph for (4, 10) with model a */
	cr_assert_eq(mtlz_engine_set_model(g, b, err, sizeof(err)), MTLZ_OK, "%s", err);
	cpu = engine("cpu", b, 4, 10, NULL);
	run(g, x, 4, 10, og);
	run(cpu, x, 4, 10, oc);
	e = compare(og, oc, 4, K);
	cr_assert_leq(e.prob, 1e-4, "after swap: prob rel err %g", e.prob);
	cr_assert_leq(e.metal, 1e-4, "after swap: metal rel err %g", e.metal);
	(void)sizes;
	mtlz_engine_free(g);
	mtlz_engine_free(cpu);
	mtlz_model_free(a);
	mtlz_model_free(b);
	free(x);
}

Test(cuda, tf32_is_an_explicit_option_with_measured_error)
{
	const int n = 32, L = 5161, K = 4;
	mtlz_model *m;
	mtlz_engine *t, *cpu;
	mtlz_output ot[32], oc[32];
	float *x;
	struct errs e;

	NEED_GPU();
	m = paper_model(17);
	x = malloc((size_t)n * L * sizeof(float));
	spectra(x, n, L, 8);
	t = engine("cuda", m, n, 0, "tf32");
	cr_assert(strstr(mtlz_engine_describe(t), "precision=tf32"));
	cpu = engine("cpu", m, n, 0, NULL);
	run(t, x, n, 0, ot);
	run(cpu, x, n, 0, oc);
	e = compare(ot, oc, n, K);
	cr_log_info("tf32 vs cpu fp32: rel err prob %.2e metal %.2e", e.prob, e.metal);
	cr_assert_leq(e.prob, 1e-2, "tf32 prob rel err %g", e.prob);
	cr_assert_leq(e.metal, 1e-2, "tf32 metal rel err %g", e.metal);
	mtlz_engine_free(t);
	mtlz_engine_free(cpu);
	mtlz_model_free(m);
	free(x);
}

Test(cuda, device_that_does_not_exist_is_refused)
{
	mtlz_engine_opts o;
	char err[256] = "";

	NEED_GPU();
	mtlz_engine_opts_default(&o);
	o.kind = "cuda";
	o.device = 999;
	cr_assert_null(mtlz_engine_new(&o, err, sizeof(err)));
	cr_assert(strstr(err, "device 999 requested"), "%s", err);
}

Test(cuda, out_of_memory_is_a_clear_error_and_engine_survives)
{
	mtlz_model *m;
	mtlz_engine_opts o;
	mtlz_engine *e;
	char err[512] = "";

	NEED_GPU();
	m = paper_model(18);
	mtlz_engine_opts_default(&o);
	o.kind = "cuda";
	o.max_batch = 65536; /* 65536 x 10000 MC rows: terabytes */
	o.mc_samples = 10000;
	e = mtlz_engine_new(&o, err, sizeof(err));
	cr_assert_not_null(e, "%s", err);
	cr_assert_neq(mtlz_engine_set_model(e, m, err, sizeof(err)), MTLZ_OK);
	cr_assert(strstr(err, "cannot reserve"), "%s", err);
	cr_log_info("%s", err);
	mtlz_engine_free(e);
	/* the device is still usable afterwards */
	e = engine("cuda", m, 2, 0, NULL);
	mtlz_engine_free(e);
	mtlz_model_free(m);
}

/* These run everywhere, CI included: without a device, asking for the GPU
 * fails loudly and auto says why it chose the CPU. */
Test(cuda, without_device_cuda_fails_loudly_and_auto_says_why)
{
	mtlz_engine_opts o;
	mtlz_engine *e;
	char err[256] = "";

	if (have_gpu()) {
		mtlz_engine_opts_default(&o);
		o.kind = "auto";
		e = mtlz_engine_new(&o, err, sizeof(err));
		cr_assert_not_null(e, "%s", err);
		cr_assert(strstr(mtlz_engine_describe(e), "GPU found"), "%s",
			  mtlz_engine_describe(e));
		cr_assert_str_eq(mtlz_engine_name(e), "cuda");
		mtlz_engine_free(e);
		return;
	}
	mtlz_engine_opts_default(&o);
	o.kind = "cuda";
	e = mtlz_engine_new(&o, err, sizeof(err));
	cr_assert_null(e, "cuda engine created without a device");
	cr_assert(strstr(err, "cuda"), "%s", err);
	o.kind = "auto";
	e = mtlz_engine_new(&o, err, sizeof(err));
	cr_assert_not_null(e, "%s", err);
	cr_assert_str_eq(mtlz_engine_name(e), "cpu");
	cr_assert(strstr(mtlz_engine_describe(e), "no GPU"), "%s", mtlz_engine_describe(e));
	mtlz_engine_free(e);
}

Test(cuda, precision_tf32_refused_by_cpu_engine)
{
	mtlz_engine_opts o;
	char err[256] = "";

	mtlz_engine_opts_default(&o);
	o.kind = "cpu";
	o.precision = "tf32";
	cr_assert_null(mtlz_engine_new(&o, err, sizeof(err)));
	cr_assert(strstr(err, "CUDA option"), "%s", err);
}

/* ---- training ---------------------------------------------------------- */

#include "optim.h"
#include "train.h"

/* A batch with every class, star-forming ones with metallicities, one
 * unlabelled spectrum. */
static void labels(int n, int *cls, float *oh, uint64_t seed)
{
	mtlz_rng r;

	mtlz_rng_seed(&r, seed);
	for (int i = 0; i < n; i++) {
		cls[i] = i == n - 1 ? -1 : (int)(mtlz_rng_next(&r) % 4);
		oh[i] = cls[i] == 1 ? (float)(8.3 + 0.4 * mtlz_rng_uniform(&r)) : NAN;
	}
	cls[0] = 1;
	oh[0] = 8.9f;
}

static double tensor_rel(const float *a, const float *b, size_t n)
{
	double d = 0, s = 0;

	for (size_t i = 0; i < n; i++) {
		d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
		s += (double)b[i] * b[i];
	}
	return sqrt(d / fmax(s, 1e-30));
}

static void train_parity(mtlz_model *m, int n, double tol_total, double tol_tensor)
{
	const int L = mtlz_model_arch(m)->input_length;
	char err[512];
	mtlz_trainer *tc = mtlz_trainer_new_kind(m, n, 2, "cpu", err, sizeof(err));
	mtlz_trainer *tg = mtlz_trainer_new_kind(m, n, 2, "cuda", err, sizeof(err));
	float *x = malloc((size_t)n * L * sizeof(float)), *oh = malloc(n * sizeof(float));
	int *cls = malloc(n * sizeof(int));
	size_t np;
	float *gc, *gg;
	mtlz_batch b;
	mtlz_loss_opts lo;
	mtlz_losses lc, lg;

	cr_assert_not_null(tc, "%s", err);
	cr_assert_not_null(tg, "%s", err);
	np = mtlz_trainer_n_params(tc);
	gc = malloc(np * sizeof(float));
	gg = malloc(np * sizeof(float));
	spectra(x, n, L, 77);
	labels(n, cls, oh, 78);
	b.x = x;
	b.cls = cls;
	b.oh = oh;
	b.n = n;
	mtlz_loss_opts_default(&lo);
	lo.train = 1;
	lo.seed = 99;
	lo.w_class = 1.3;
	lo.w_metal = 0.7;
	cr_assert_eq(mtlz_trainer_step(tc, &b, &lo, &lc, gc, NULL, NULL, NULL, err, sizeof(err)),
		     MTLZ_OK, "%s", err);
	cr_assert_eq(mtlz_trainer_step(tg, &b, &lo, &lg, gg, NULL, NULL, NULL, err, sizeof(err)),
		     MTLZ_OK, "%s", err);
	cr_log_info("losses cpu %.6f/%.6f cuda %.6f/%.6f; grad rel err %.2e", lc.cls, lc.metal,
		    lg.cls, lg.metal, tensor_rel(gg, gc, np));
	cr_assert_float_eq(lg.cls, lc.cls, 1e-4 * fabs(lc.cls) + 1e-7);
	cr_assert_float_eq(lg.metal, lc.metal, 1e-4 * fabs(lc.metal) + 1e-7);
	cr_assert_leq(tensor_rel(gg, gc, np), tol_total, "gradient rel err %g",
		      tensor_rel(gg, gc, np));
	for (size_t i = 0; i < mtlz_model_n_tensors(m); i++) {
		const mtlz_tensor *t = mtlz_model_tensor(m, i);
		size_t cnt;
		long off = mtlz_trainer_param_offset(tc, t->name, &cnt);
		double e = tensor_rel(gg + off, gc + off, cnt);

		cr_assert_leq(e, tol_tensor, "%s: gradient rel err %g", t->name, e);
	}
	mtlz_trainer_free(tc);
	mtlz_trainer_free(tg);
	free(x); free(oh); free(cls); free(gc); free(gg);
}

Test(cuda, train_step_gradients_match_cpu_paper_model, .timeout = 300)
{
	mtlz_model *m;

	NEED_GPU();
	m = paper_model(51);
	mtlz_model_set_target(m, 8.6, 0.2);
	train_parity(m, 6, 1e-4, 1e-3);
	mtlz_model_free(m);
}

Test(cuda, train_step_gradients_match_cpu_other_shapes)
{
	NEED_GPU();
	for (int v = 0; v < 3; v++) {
		mtlz_model *m = v == 2 ? pool2_model(53) : odd_model(52 + (uint64_t)v, v);

		train_parity(m, 9, 1e-4, 1e-3);
		mtlz_model_free(m);
	}
}

/* the same on each path the trainer's autotuning can take: every
 * convolution by GEMMs; the direct forward kernel and k_dw_narrow at
 * either block size wherever they take the shape */
static void train_parity_forced(const char *fwd, const char *dw)
{
	mtlz_model *m;

	setenv("MTLZ_CUDA_TRAIN_CONV", fwd, 1);
	setenv("MTLZ_CUDA_DW", dw, 1);
	m = paper_model(54);
	mtlz_model_set_target(m, 8.6, 0.2);
	train_parity(m, 5, 1e-4, 1e-3);
	mtlz_model_free(m);
	for (int v = 0; v < 3; v++) {
		m = v == 2 ? pool2_model(55) : odd_model(56 + (uint64_t)v, v);
		train_parity(m, 7, 1e-4, 1e-3);
		mtlz_model_free(m);
	}
}

Test(cuda, train_step_gradients_match_cpu_gemm_paths, .timeout = 300)
{
	NEED_GPU();
	train_parity_forced("gemm", "gemm");
}

Test(cuda, train_step_gradients_match_cpu_direct_and_narrow_dw, .timeout = 300)
{
	NEED_GPU();
	train_parity_forced("direct", "narrow");
	train_parity_forced("direct", "narrow2048");
	{
		/* and the paths were taken: conv 1.2 (16 -> 16) takes both */
		mtlz_model *m = paper_model(57);
		char err[256];
		mtlz_trainer *t = mtlz_trainer_new_kind(m, 4, 1, "cuda", err, sizeof(err));
		const char *d;

		cr_assert_not_null(t, "%s", err);
		d = mtlz_trainer_describe(t);
		cr_log_info("%s", d);
		cr_assert(strstr(d, "fwd=fd") && strstr(d, "dW=gN"), "%s", d);
		mtlz_trainer_free(t);
		mtlz_model_free(m);
	}
}

/* A CPU and a CUDA trainer of the pool-2 model, their Adam states and a
 * batch of n spectra: the two Adam tests below */
struct twin {
	mtlz_model *m;
	mtlz_trainer *t[2];
	mtlz_adam ad[2];
	float *x, *oh;
	int *cls, n, L;
	size_t np;
};

static void twin_open(struct twin *w, uint64_t seed, int n, double lr)
{
	char err[512];

	w->m = pool2_model(seed);
	w->n = n;
	w->L = mtlz_model_arch(w->m)->input_length;
	w->t[0] = mtlz_trainer_new_kind(w->m, n, 2, "cpu", err, sizeof(err));
	w->t[1] = mtlz_trainer_new_kind(w->m, n, 2, "cuda", err, sizeof(err));
	cr_assert(w->t[0] && w->t[1], "%s", err);
	w->np = mtlz_trainer_n_params(w->t[0]);
	w->x = malloc((size_t)n * w->L * sizeof(float));
	w->oh = malloc(n * sizeof(float));
	w->cls = malloc(n * sizeof(int));
	for (int k = 0; k < 2; k++)
		cr_assert_eq(mtlz_adam_init(&w->ad[k], w->np, lr), MTLZ_OK);
}

/* step s's batch: spectra, labels and dropout seed from seed0 + s */
static mtlz_batch twin_batch(struct twin *w, uint64_t seed0, int s, mtlz_loss_opts *lo)
{
	const mtlz_batch b = { w->x, w->cls, w->oh, w->n };

	spectra(w->x, w->n, w->L, seed0 + (uint64_t)s);
	labels(w->n, w->cls, w->oh, seed0 + 100 + (uint64_t)s);
	mtlz_loss_opts_default(lo);
	lo->train = 1;
	lo->seed = seed0 + 200 + (uint64_t)s;
	return b;
}

static void twin_close(struct twin *w)
{
	for (int k = 0; k < 2; k++) {
		mtlz_adam_free(&w->ad[k]);
		mtlz_trainer_free(w->t[k]);
	}
	mtlz_model_free(w->m);
	free(w->x);
	free(w->oh);
	free(w->cls);
}

/* the gradient of each trainer, Adam on the host for both */
Test(cuda, training_steps_with_adam_match_cpu, .timeout = 300)
{
	const int steps = 6;
	struct twin w;
	char err[512];
	float *g;

	NEED_GPU();
	twin_open(&w, 61, 8, 1e-3);
	g = malloc(w.np * sizeof(float));
	for (int s = 0; s < steps; s++) {
		mtlz_loss_opts lo;
		const mtlz_batch b = twin_batch(&w, 200, s, &lo);
		mtlz_losses l;

		for (int k = 0; k < 2; k++) {
			cr_assert_eq(mtlz_trainer_step(w.t[k], &b, &lo, &l, g, NULL, NULL, NULL, err,
						       sizeof(err)), MTLZ_OK, "%s", err);
			mtlz_adam_step(&w.ad[k], mtlz_trainer_params(w.t[k]), g);
		}
	}
	{
		const double e = tensor_rel(mtlz_trainer_params(w.t[1]),
					    mtlz_trainer_params(w.t[0]), w.np);

		cr_log_info("%d Adam steps: parameter rel diff %.2e", steps, e);
		cr_assert_leq(e, 1e-3, "parameters after %d steps differ: %g", steps, e);
	}
	free(g);
	twin_close(&w);
}

/* mtlz_trainer_train_step with Adam on the device against the CPU
 * trainer's train_step: the steps run ahead of the host, and host reads in
 * between (a validation step, mtlz_trainer_params) bring the state back */
Test(cuda, device_adam_train_steps_match_cpu, .timeout = 300)
{
	const int steps = 7;
	struct twin w;
	char err[512];
	float *lg[2];
	size_t np;

	NEED_GPU();
	twin_open(&w, 62, 8, 2e-3);
	np = w.np;
	lg[0] = malloc((size_t)w.n * 4 * sizeof(float));
	lg[1] = malloc((size_t)w.n * 4 * sizeof(float));
	for (int s = 0; s < steps; s++) {
		mtlz_loss_opts lo;
		const mtlz_batch b = twin_batch(&w, 500, s, &lo);
		mtlz_losses l[2];

		for (int k = 0; k < 2; k++) {
			w.ad[k].lr = s < 4 ? 2e-3 : 2e-4;   /* a scheduler's cut */
			cr_assert_eq(mtlz_trainer_train_step(w.t[k], &b, &lo, &w.ad[k], &l[k], err,
							     sizeof(err)), MTLZ_OK, "%s", err);
		}
		cr_assert_float_eq(l[1].cls, l[0].cls, 1e-3 * fabs(l[0].cls) + 1e-6);
		cr_assert_eq(w.ad[1].t, w.ad[0].t);
		if (s == 2) {   /* a validation pass in between: no dropout, no update */
			lo.train = 0;
			for (int k = 0; k < 2; k++)
				cr_assert_eq(mtlz_trainer_step(w.t[k], &b, &lo, &l[k], NULL, NULL,
							       lg[k], NULL, err, sizeof(err)),
					     MTLZ_OK, "%s", err);
			cr_assert_leq(tensor_rel(lg[1], lg[0], (size_t)w.n * 4), 1e-4);
		}
		if (s == 4)     /* a host read (checkpoint) in between */
			cr_assert_leq(tensor_rel(mtlz_trainer_params(w.t[1]),
						 mtlz_trainer_params(w.t[0]), np), 1e-3);
	}
	cr_assert_eq(mtlz_trainer_sync(w.t[1], err, sizeof(err)), MTLZ_OK, "%s", err);
	{
		const double e = tensor_rel(mtlz_trainer_params(w.t[1]),
					    mtlz_trainer_params(w.t[0]), np);
		const double em = tensor_rel(w.ad[1].m, w.ad[0].m, np);
		const double ev = tensor_rel(w.ad[1].v, w.ad[0].v, np);

		cr_log_info("%d device-Adam steps: parameters %.2e, m %.2e, v %.2e", steps, e, em,
			    ev);
		cr_assert_leq(e, 1e-3, "parameters after %d steps differ: %g", steps, e);
		cr_assert_leq(em, 1e-3, "Adam m differs: %g", em);
		cr_assert_leq(ev, 1e-3, "Adam v differs: %g", ev);
		/* and the update really happened on the device */
		cr_assert_gt(tensor_rel(w.ad[1].m, w.ad[1].v, np), 0.0);
	}
	free(lg[0]);
	free(lg[1]);
	twin_close(&w);
}

/* TF32 training: the gradient within TF32's rounding of the fp32 one, with
 * the TF32 trainer's forward, input and weight gradients on cuBLAS (fwd =
 * "gemm") or on the tensor-core kernels: the direct convolution, its
 * transposed version and k_dw_mma (fwd = "mma"). A wrong index or a missed
 * mask would be an O(1) error. */
static void tf32_gradient(const char *fwd)
{
	const int n = 6;
	mtlz_model *m;
	mtlz_trainer *t[2];
	char err[512];
	float *x, *oh, *g[2];
	int *cls, L;
	size_t np;
	mtlz_batch b;
	mtlz_loss_opts lo;
	mtlz_losses l;

	NEED_GPU();
	/* the same paths in both trainers (autotuning could pick others under
	 * TF32, and different paths alone would differ in the last bits) */
	setenv("MTLZ_CUDA_TRAIN_CONV", "gemm", 1);
	setenv("MTLZ_CUDA_DW", "gemm", 1);
	m = paper_model(63);
	mtlz_model_set_target(m, 8.6, 0.2);
	L = mtlz_model_arch(m)->input_length;
	t[0] = mtlz_trainer_new_kind(m, n, 2, "cuda", err, sizeof(err));
	t[1] = mtlz_trainer_new_kind(m, n, 2, "cuda", err, sizeof(err));
	cr_assert(t[0] && t[1], "%s", err);
	unsetenv("MTLZ_CUDA_TRAIN_CONV");
	unsetenv("MTLZ_CUDA_DW");
	if (fwd) {
		setenv("MTLZ_CUDA_TRAIN_CONV", fwd, 1);
		setenv("MTLZ_CUDA_DX", fwd, 1);
		setenv("MTLZ_CUDA_DW", fwd, 1);
	}
	cr_assert_eq(mtlz_trainer_set_precision(t[1], "tf32", err, sizeof(err)), MTLZ_OK, "%s",
		     err);
	unsetenv("MTLZ_CUDA_TRAIN_CONV");
	unsetenv("MTLZ_CUDA_DX");
	unsetenv("MTLZ_CUDA_DW");
	cr_log_info("%s", mtlz_trainer_describe(t[1]));
	cr_assert(strstr(mtlz_trainer_describe(t[1]), "tf32"), "%s", mtlz_trainer_describe(t[1]));
	if (fwd) {
		/* f (first layer), then every layer on the path asked for */
		const int mma = !strcmp(fwd, "mma");
		const char *d = mtlz_trainer_describe(t[1]);

		cr_assert(strstr(d, mma ? "fwd=fttttttttt" : "fwd=fggggggggg"), "%s", d);
		cr_assert(strstr(d, mma ? "dX=-ttttttttt" : "dX=-ggggggggg"), "%s", d);
		cr_assert(strstr(d, mma ? "dW=gttttttttt" : "dW=gggggggggg"), "%s", d);
	} else {
		fwd = "autotuned";
	}
	np = mtlz_trainer_n_params(t[0]);
	x = malloc((size_t)n * L * sizeof(float));
	oh = malloc(n * sizeof(float));
	cls = malloc(n * sizeof(int));
	spectra(x, n, L, 81);
	labels(n, cls, oh, 82);
	b.x = x; b.cls = cls; b.oh = oh; b.n = n;
	mtlz_loss_opts_default(&lo);
	lo.train = 1;
	lo.seed = 83;
	for (int k = 0; k < 2; k++) {
		g[k] = malloc(np * sizeof(float));
		cr_assert_eq(mtlz_trainer_step(t[k], &b, &lo, &l, g[k], NULL, NULL, NULL, err,
					       sizeof(err)), MTLZ_OK, "%s", err);
	}
	{
		const double e = tensor_rel(g[1], g[0], np);

		cr_log_info("tf32 trainer: gradient rel diff from fp32 %.2e", e);
		/* TF32 keeps 10 mantissa bits: ~1e-3 per product, and ReLU masks
		 * and pooling winners that flip on it (1.9e-2 measured on an
		 * H200 in both variants, bench/results run 9) */
		cr_assert_leq(e, 3e-2, "tf32 gradient off by %g", e);
		cr_assert_gt(e, 0.0, "tf32 gave the fp32 gradient bit for bit: not in use?");
	}
	/* each tensor on its own: a small layer's wrong dW would hide in the
	 * total's norm */
	for (size_t i = 0; i < mtlz_model_n_tensors(m); i++) {
		const mtlz_tensor *tn = mtlz_model_tensor(m, i);
		size_t cnt;
		const long off = mtlz_trainer_param_offset(t[0], tn->name, &cnt);
		const double e = tensor_rel(g[1] + off, g[0] + off, cnt);

		cr_log_info("tf32 (%s) %s: rel diff %.2e", fwd, tn->name, e);
		cr_assert_leq(e, 0.2, "%s: tf32 gradient off by %g", tn->name, e);
	}
	for (int k = 0; k < 2; k++) {
		mtlz_trainer_free(t[k]);
		free(g[k]);
	}
	mtlz_model_free(m);
	free(x); free(oh); free(cls);
}

Test(cuda, tf32_trainer_gradients_close_to_fp32, .timeout = 300)
{
	tf32_gradient("gemm");
}

Test(cuda, tf32_trainer_tensor_core_forward_close_to_fp32, .timeout = 300)
{
	tf32_gradient("mma");
}

/* nothing forced: the TF32 trainer times every forward, dW (GEMM, both
 * k_dw_narrow block sizes, k_dw_mma) and dX candidate of every layer */
Test(cuda, tf32_trainer_autotuned_close_to_fp32, .timeout = 300)
{
	tf32_gradient(NULL);
}

Test(cuda, cuda_trainer_without_device_says_why)
{
	mtlz_model *m;
	char err[256] = "";
	mtlz_trainer *t;

	if (have_gpu())
		cr_skip_test("a CUDA device is present");
	m = pool2_model(71);
	t = mtlz_trainer_new_kind(m, 4, 1, "cuda", err, sizeof(err));
	cr_assert_null(t);
	cr_assert(strstr(err, "cuda"), "%s", err);
	mtlz_model_free(m);
}
