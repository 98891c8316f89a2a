/*
 * engine_cpu.c - the CPU backend: OpenMP threads, our AVX2/FMA convolution
 * kernels (kernels_cpu.h) for the backbone, OpenBLAS sgemm for the heads
 * and the MC-dropout passes.
 *
 * Work split. A batch of n >= threads spectra is split by spectrum: each
 * thread runs whole spectra through the backbone in its own two ping-pong
 * buffers, which for this model (<= 330 KB per activation) stay in the
 * core's L2. A batch smaller than the thread count (the daemon's batch of 1
 * at low rate) runs spectrum by spectrum with all threads sharing each
 * layer's rows, a barrier between layers: that is what batch-1 latency needs.
 *
 * Heads (tiny) run once per batch as sgemm over all spectra; only the
 * metallicity head is re-run for MC dropout, since dropout sits only in the
 * heads: the backbone runs once, the head mc times (paper Section 4.2.1).
 */
#include "engine_impl.h"
#include "common.h"
#include "kernels_cpu.h"
#include "mc_rng.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_LAYERS (2 * MTLZ_MAX_BLOCKS)

struct conv_layer {
	int cin, cin_pad, cout, cout_pad, k;
	int len_out;        /* output rows */
	int use_blas;       /* sgemm on im2col instead of the micro-kernel */
	float *wp;          /* panels (kernels_cpu.h) */
	float *wrow;        /* [k*cin_pad][cout_pad] for the BLAS path */
	float *bp;
};

struct head {
	int n_layers;
	int in[MTLZ_MAX_HIDDEN + 1], out[MTLZ_MAX_HIDDEN + 1];
	float *w[MTLZ_MAX_HIDDEN + 1], *b[MTLZ_MAX_HIDDEN + 1];
};

struct cpu_ctx {
	int isa, n_threads, max_batch, mc_reserved;
	uint64_t seed;
	char desc[128];

	mtlz_arch arch;
	int reserved;       /* buffers sized for arch/max_batch/mc_reserved */
	struct conv_layer conv[MAX_LAYERS];
	int n_conv;
	int c_last, c_last_pad, len_last;
	int att_hidden;
	float *att_w1, *att_b1, *att_w2, *att_b2;
	struct head head[2]; /* 0 = class, 1 = metal */
	double target_offset, target_scale;
	float dropout;
	float inv_temp;     /* 1 / calibration temperature */

	/* per thread */
	float **buf0, **buf1, **col;
	size_t buf_floats, col_floats;
	/* per batch */
	float *feat;        /* [max_batch][c_last] */
	float **hs0, **hs1; /* per thread head activations, [max(mc,1)][h_width] */
	int h_width;
	float *metal_mc;    /* [max_batch][max(mc, 1)] head outputs */
	float *mc_rows;     /* [max_batch * mc][c_last] dropped-out features */
	float *logits;      /* [max_batch][n_classes] */
};

static void *cpu_init(const mtlz_engine_opts *o, char *errstr, size_t errstr_size)
{
	struct cpu_ctx *c = calloc(1, sizeof(*c));
	const char *conv_env = getenv("MTLZ_CPU_CONV");

	if (!c) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	c->isa = mtlz_isa_detect();
	c->n_threads = o->n_threads > 0 ? o->n_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
	if (c->n_threads < 1)
		c->n_threads = 1;
	c->max_batch = o->max_batch;
	c->mc_reserved = o->mc_samples;
	c->seed = o->seed;
	/* Our threads call OpenBLAS concurrently: it must not spawn its own. */
	openblas_set_num_threads(1);
	snprintf(c->desc, sizeof(c->desc), "cpu isa=%s threads=%d conv=%s",
		 mtlz_isa_name(c->isa), c->n_threads,
		 conv_env ? conv_env : "auto");
	return c;
}

static void free_buffers(struct cpu_ctx *c)
{
	for (int i = 0; c->buf0 && i < c->n_threads; i++) {
		free(c->buf0[i]);
		free(c->buf1[i]);
		free(c->col[i]);
		if (c->hs0)
			free(c->hs0[i]);
		if (c->hs1)
			free(c->hs1[i]);
	}
	free(c->hs0);
	free(c->hs1);
	c->hs0 = c->hs1 = NULL;
	free(c->buf0);
	free(c->buf1);
	free(c->col);
	c->buf0 = c->buf1 = c->col = NULL;
	free(c->feat);
	free(c->metal_mc);
	free(c->mc_rows);
	free(c->logits);
	c->feat = c->metal_mc = c->mc_rows = c->logits = NULL;
	c->reserved = 0;
}

static void free_weights(struct cpu_ctx *c)
{
	for (int i = 0; i < c->n_conv; i++) {
		free(c->conv[i].wp);
		free(c->conv[i].wrow);
		free(c->conv[i].bp);
	}
	c->n_conv = 0;
	free(c->att_w1);
	free(c->att_b1);
	free(c->att_w2);
	free(c->att_b2);
	c->att_w1 = c->att_b1 = c->att_w2 = c->att_b2 = NULL;
	for (int h = 0; h < 2; h++)
		for (int i = 0; i < c->head[h].n_layers; i++) {
			free(c->head[h].w[i]);
			free(c->head[h].b[i]);
		}
	memset(c->head, 0, sizeof(c->head));
}

static int same_arch(const mtlz_arch *a, const mtlz_arch *b)
{
	return memcmp(a, b, sizeof(*a)) == 0;
}

/*
 * Which layers take the BLAS path. Measured on this project's Zen 4 machine
 * (docs/engine.md): inside the engine our prepacked 6x16 AVX2 kernel beats
 * im2col + OpenBLAS sgemm on every layer (OpenBLAS wins the wide layers
 * only when timed alone with hot caches; in the pipeline it repacks the
 * weights on every call), so with AVX2 every layer is ours. Without AVX2 the
 * portable kernel is ~10x slower than OpenBLAS, which then takes every layer
 * but the first (K = 3). MTLZ_CPU_CONV=own|blas forces either, for benches.
 */
static int want_blas(const struct cpu_ctx *c, int cin_pad, int cout_pad)
{
	const char *env = getenv("MTLZ_CPU_CONV");

	if (env && strcmp(env, "blas") == 0)
		return 1;
	if (env && strcmp(env, "own") == 0)
		return 0;
	return c->isa != MTLZ_ISA_AVX2 && cin_pad > 1;
}

static int cpu_reserve(void *ctx, const mtlz_arch *a, int max_batch, int mc,
		       char *errstr, size_t errstr_size)
{
	struct cpu_ctx *c = ctx;
	size_t rows_max = 0, col_max = 0;
	int len = a->input_length, cin_pad = 1, width = 0;

	if (c->reserved && same_arch(&c->arch, a) && max_batch <= c->max_batch &&
	    mc <= c->mc_reserved)
		return MTLZ_OK;
	free_buffers(c);
	c->arch = *a;
	c->max_batch = max_batch;
	c->mc_reserved = mc;
	/* Largest activation (rows incl. padding x padded channels) and im2col. */
	rows_max = (size_t)(len + 2 * a->padding);
	for (int b = 0; b < a->n_blocks; b++) {
		int cp = mtlz_round_up(a->channels[b], MTLZ_NR);

		for (int k = 0; k < 2; k++) {
			int lo = len + 2 * a->padding - a->kernel + 1;
			size_t act = (size_t)(lo + 2 * a->padding) * (size_t)cp;
			size_t col = (size_t)lo * (size_t)(a->kernel * cin_pad);

			rows_max = MTLZ_MAX(rows_max, act);
			col_max = MTLZ_MAX(col_max, col);
			len = lo;
			cin_pad = cp;
		}
		len = (len - a->pool) / a->pool + 1;
	}
	c->buf_floats = rows_max + 64;
	c->col_floats = col_max + 64;
	c->buf0 = calloc((size_t)c->n_threads, sizeof(float *));
	c->buf1 = calloc((size_t)c->n_threads, sizeof(float *));
	c->col = calloc((size_t)c->n_threads, sizeof(float *));
	c->hs0 = calloc((size_t)c->n_threads, sizeof(float *));
	c->hs1 = calloc((size_t)c->n_threads, sizeof(float *));
	if (!c->buf0 || !c->buf1 || !c->col || !c->hs0 || !c->hs1)
		goto out_nomem;
	for (int i = 0; i < c->n_threads; i++) {
		c->buf0[i] = mtlz_aligned_alloc(c->buf_floats * sizeof(float));
		c->buf1[i] = mtlz_aligned_alloc(c->buf_floats * sizeof(float));
		c->col[i] = mtlz_aligned_alloc(c->col_floats * sizeof(float));
		if (!c->buf0[i] || !c->buf1[i] || !c->col[i])
			goto out_nomem;
	}
	width = a->channels[a->n_blocks - 1];
	for (int i = 0; i < a->n_hidden; i++)
		width = MTLZ_MAX(width, a->hidden[i]);
	width = MTLZ_MAX(width, a->n_classes);
	c->h_width = width;
	for (int i = 0; i < c->n_threads; i++) {
		c->hs0[i] = mtlz_aligned_alloc((size_t)MTLZ_MAX(mc, 1) * width * sizeof(float));
		c->hs1[i] = mtlz_aligned_alloc((size_t)MTLZ_MAX(mc, 1) * width * sizeof(float));
		if (!c->hs0[i] || !c->hs1[i])
			goto out_nomem;
	}
	c->feat = mtlz_aligned_alloc((size_t)max_batch * (size_t)width * sizeof(float));
	c->metal_mc = mtlz_aligned_alloc((size_t)max_batch * MTLZ_MAX(mc, 1) * sizeof(float));
	c->mc_rows = mtlz_aligned_alloc((size_t)max_batch * (size_t)mc *
					(size_t)a->channels[a->n_blocks - 1] * sizeof(float));
	c->logits = mtlz_aligned_alloc((size_t)max_batch * (size_t)a->n_classes *
				       sizeof(float));
	if (!c->feat || !c->metal_mc || !c->mc_rows || !c->logits)
		goto out_nomem;
	c->reserved = 1;
	return MTLZ_OK;
out_nomem:
	free_buffers(c);
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
			"cpu engine: out of memory reserving buffers");
}

static float *copy_tensor(const mtlz_model *m, const char *name)
{
	const mtlz_tensor *t = mtlz_model_find(m, name);
	float *p = t ? malloc(t->n * sizeof(float)) : NULL;

	if (p)
		memcpy(p, t->data, t->n * sizeof(float));
	return p;
}

static int cpu_set_model(void *ctx, const mtlz_model *m, char *errstr,
			 size_t errstr_size)
{
	struct cpu_ctx *c = ctx;
	const mtlz_arch *a = mtlz_model_arch(m);
	int len = a->input_length, cin = 1, cin_pad = 1;
	char name[64];

	free_weights(c);
	for (int b = 0; b < a->n_blocks; b++) {
		for (int k = 0; k < 2; k++) {
			struct conv_layer *L = &c->conv[c->n_conv++];
			const mtlz_tensor *w, *bias;
			size_t K;

			w = mtlz_model_find(m, mtlz_name_conv(name, sizeof(name), b, k, 0));
			bias = mtlz_model_find(m, mtlz_name_conv(name, sizeof(name), b, k, 1));
			L->cin = cin;
			L->cin_pad = cin_pad;
			L->cout = a->channels[b];
			L->cout_pad = mtlz_round_up(L->cout, MTLZ_NR);
			L->k = a->kernel;
			L->len_out = len + 2 * a->padding - a->kernel + 1;
			L->use_blas = want_blas(c, L->cin_pad, L->cout_pad);
			K = (size_t)L->k * (size_t)L->cin_pad;
			L->wp = mtlz_aligned_alloc(K * (size_t)L->cout_pad * sizeof(float));
			L->wrow = mtlz_aligned_alloc(K * (size_t)L->cout_pad * sizeof(float));
			L->bp = mtlz_aligned_alloc((size_t)L->cout_pad * sizeof(float));
			if (!w || !bias || !L->wp || !L->wrow || !L->bp)
				goto out_nomem;
			mtlz_pack_conv(w->data, bias->data, L->cout, L->cin, L->k,
				       L->cin_pad, L->wp, L->bp);
			mtlz_pack_conv_rows(L->wp, (int)K, L->cout_pad, L->wrow);
			len = L->len_out;
			cin = L->cout;
			cin_pad = L->cout_pad;
		}
		len = (len - a->pool) / a->pool + 1;
	}
	c->c_last = cin;
	c->c_last_pad = cin_pad;
	c->len_last = len;
	c->att_hidden = a->attention_reduction ? cin / a->attention_reduction : 0;
	if (c->att_hidden) {
		c->att_w1 = copy_tensor(m, "attention.squeeze.weight");
		c->att_b1 = copy_tensor(m, "attention.squeeze.bias");
		c->att_w2 = copy_tensor(m, "attention.excite.weight");
		c->att_b2 = copy_tensor(m, "attention.excite.bias");
		if (!c->att_w1 || !c->att_b1 || !c->att_w2 || !c->att_b2)
			goto out_nomem;
	}
	for (int h = 0; h < 2; h++) {
		struct head *H = &c->head[h];
		int in = cin;

		H->n_layers = a->n_hidden + 1;
		for (int i = 0; i < H->n_layers; i++) {
			H->in[i] = in;
			H->out[i] = i < a->n_hidden ? a->hidden[i] : (h ? 1 : a->n_classes);
			H->w[i] = copy_tensor(m, mtlz_name_head(name, sizeof(name), h, i, 0));
			H->b[i] = copy_tensor(m, mtlz_name_head(name, sizeof(name), h, i, 1));
			if (!H->w[i] || !H->b[i])
				goto out_nomem;
			in = H->out[i];
		}
	}
	mtlz_model_target(m, &c->target_offset, &c->target_scale);
	c->dropout = a->dropout;
	c->inv_temp = (float)(1.0 / mtlz_model_temperature(m));
	return MTLZ_OK;
out_nomem:
	free_weights(c);
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
			"cpu engine: out of memory packing weights");
}

/* Rows [r0, r1) of a layer for thread tid of nth, in whole micro-tiles. */
static void split_rows(int len, int tid, int nth, int *r0, int *r1)
{
	const int tiles = (len + 5) / 6, per = (tiles + nth - 1) / nth;

	*r0 = MTLZ_MIN(len, tid * per * 6);
	*r1 = MTLZ_MIN(len, (tid + 1) * per * 6);
}

static void team_barrier(int nth)
{
	if (nth > 1) {
#pragma omp barrier
	}
}

/*
 * One spectrum through the backbone and the attention into feat[c_last].
 * Called by nth threads together (team mode, tid = omp thread number) or by
 * one thread alone (nth = 1) using scratch set `slot`.
 */
static void backbone(struct cpu_ctx *c, const float *x, float *feat, int slot,
		     int tid, int nth)
{
	const mtlz_arch *a = &c->arch;
	const int pad = a->padding;
	float *in = c->buf0[slot], *out = c->buf1[slot], *t;
	int len = a->input_length, stride = 1, r0, r1;

	if (tid == 0) {
		memset(in, 0, (size_t)pad * sizeof(float));
		memcpy(in + pad, x, (size_t)len * sizeof(float));
		memset(in + pad + len, 0, (size_t)pad * sizeof(float));
	}
	team_barrier(nth);
	for (int i = 0; i < c->n_conv; i++) {
		const struct conv_layer *L = &c->conv[i];
		const int last_of_block = i & 1;
		/* conv1 writes a padded buffer for conv2; conv2 feeds the pool */
		const int opad = last_of_block ? 0 : pad;
		float *y = out + (size_t)opad * L->cout_pad;

		split_rows(L->len_out, tid, nth, &r0, &r1);
		if (L->use_blas)
			mtlz_conv_nlc_blas(in, stride, L->k, r0, r1, L->wrow, L->bp,
					   L->cout_pad, y, L->cout_pad, 1,
					   c->col[nth > 1 ? tid : slot]);
		else
			mtlz_conv_nlc(c->isa, in, stride, L->k, r0, r1, L->wp, L->bp,
				      L->cout_pad, y, L->cout_pad, 1);
		if (tid == 0 && opad) {
			memset(out, 0, (size_t)opad * L->cout_pad * sizeof(float));
			memset(y + (size_t)L->len_out * L->cout_pad, 0,
			       (size_t)opad * L->cout_pad * sizeof(float));
		}
		len = L->len_out;
		stride = L->cout_pad;
		team_barrier(nth);
		t = in; in = out; out = t;
		if (last_of_block) {
			const int lp = (len - a->pool) / a->pool + 1;

			split_rows(lp, tid, nth, &r0, &r1);
			mtlz_maxpool_nlc(in, stride, a->pool, r0, r1,
					 out + (size_t)pad * stride);
			if (tid == 0) {
				memset(out, 0, (size_t)pad * stride * sizeof(float));
				memset(out + (size_t)(pad + lp) * stride, 0,
				       (size_t)pad * stride * sizeof(float));
			}
			len = lp;
			team_barrier(nth);
			t = in; in = out; out = t;
		}
	}
	if (tid != 0)
		return;
	/* in: [pad + len rows][stride]; GAP, then squeeze-and-excitation. Since
	 * GAP(x * s) = s * GAP(x) per channel, scale the pooled vector. */
	{
		float g[4096 + 16], h[4096];
		const int C = c->c_last;

		mtlz_gap_nlc(in + (size_t)pad * stride, len, stride, g);
		if (c->att_hidden) {
			for (int j = 0; j < c->att_hidden; j++) {
				float acc = c->att_b1[j];

				for (int ch = 0; ch < C; ch++)
					acc += c->att_w1[(size_t)j * C + ch] * g[ch];
				h[j] = acc > 0.0f ? acc : 0.0f;
			}
			for (int ch = 0; ch < C; ch++) {
				float acc = c->att_b2[ch];

				for (int j = 0; j < c->att_hidden; j++)
					acc += c->att_w2[(size_t)ch * c->att_hidden + j] * h[j];
				feat[ch] = g[ch] / (1.0f + expf(-acc));
			}
		} else {
			memcpy(feat, g, (size_t)C * sizeof(float));
		}
	}
}

/* rows x in -> rows x out through one head, in the calling thread; h0/h1
 * are that thread's scratch (rows x h_width each). */
static void run_head(const struct cpu_ctx *c, const struct head *H,
		     const float *x, int rows, float *y, float *h0, float *h1)
{
	const float *src = x;

	for (int i = 0; i < H->n_layers; i++) {
		float *dst = i == H->n_layers - 1 ? y : (i & 1 ? h1 : h0);

		mtlz_linear(src, rows, H->in[i], H->w[i], H->b[i], H->out[i], dst,
			    i < H->n_layers - 1);
		src = dst;
	}
}

/* Heads of spectrum i: logits, the deterministic metallicity and, with
 * mc > 0, the MC-dropout passes of the metallicity head (sigma = population
 * std). Each spectrum is computed on its own, so its outputs do not depend
 * on the batch it came in, and its dropout masks are keyed by its own
 * input spectrum (mc_rng.h). */
static void heads_one(struct cpu_ctx *c, const float *x, int i, int mc, mtlz_output *o,
		      int tid)
{
	const int C = c->c_last;
	const float *f = c->feat + (size_t)i * C;
	float *h0 = c->hs0[tid], *h1 = c->hs1[tid], *v = c->metal_mc + (size_t)i * MTLZ_MAX(mc, 1);
	float metal;

	run_head(c, &c->head[0], f, 1, c->logits + (size_t)i * c->arch.n_classes, h0, h1);
	run_head(c, &c->head[1], f, 1, &metal, h0, h1);
	o->metal = (float)(metal * c->target_scale + c->target_offset);
	o->metal_sigma = NAN;
	if (mc > 0 && c->dropout > 0.0f) {
		const float keep = 1.0f - c->dropout, scale = 1.0f / keep;
		float *rows = c->mc_rows + (size_t)i * mc * C;
		double s = 0, s2 = 0;
		/* Bernoulli(keep), resolved to 1/65536 (mc_rng.h) */
		const uint32_t keep16 = (uint32_t)lrintf(keep * 65536.0f);
		const size_t n_mask = (size_t)mc * C;
		const uint64_t key = mtlz_mc_key(x, c->arch.input_length, c->seed);

		for (size_t k = 0; k < n_mask; k++)
			rows[k] = mtlz_mc_keep(key, k, keep16) ? f[k % C] * scale : 0.0f;
		run_head(c, &c->head[1], rows, mc, v, h0, h1);
		for (int t = 0; t < mc; t++)
			s += v[t];
		s /= mc;
		for (int t = 0; t < mc; t++)
			s2 += (v[t] - s) * (v[t] - s);
		o->metal_sigma = (float)(sqrt(s2 / mc) * fabs(c->target_scale));
	} else if (mc > 0) {
		o->metal_sigma = 0.0f; /* no dropout: every pass is the same */
	}
}

static int cpu_run(void *ctx, const float *x, int n, int mc, mtlz_output *out,
		   char *errstr, size_t errstr_size)
{
	struct cpu_ctx *c = ctx;
	const int L = c->arch.input_length, C = c->c_last;

	if (n > c->max_batch || mc > c->mc_reserved)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"cpu engine: batch %d with %d MC passes exceeds the "
				"reserved %d x %d", n, mc, c->max_batch,
				c->mc_reserved);
	if (n >= c->n_threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(c->n_threads)
		for (int i = 0; i < n; i++)
			backbone(c, x + (size_t)i * L, c->feat + (size_t)i * C,
				 omp_get_thread_num(), 0, 1);
	} else {
		for (int i = 0; i < n; i++) {
#pragma omp parallel num_threads(c->n_threads)
			backbone(c, x + (size_t)i * L, c->feat + (size_t)i * C, 0,
				 omp_get_thread_num(), omp_get_num_threads());
		}
	}
#pragma omp parallel for schedule(dynamic, 1) num_threads(MTLZ_MIN(n, c->n_threads)) if (mc > 0 || n > 16)
	for (int i = 0; i < n; i++)
		heads_one(c, x + (size_t)i * L, i, mc, &out[i], omp_get_thread_num());
	mtlz_softmax_outputs(c->logits, n, c->arch.n_classes, c->inv_temp, out);
	return MTLZ_OK;
}

static const char *cpu_describe(void *ctx)
{
	return ((struct cpu_ctx *)ctx)->desc;
}

static void cpu_free(void *ctx)
{
	struct cpu_ctx *c = ctx;

	if (!c)
		return;
	free_buffers(c);
	free_weights(c);
	free(c);
}

const struct mtlz_engine_backend_i mtlz_engine_cpu = {
	.name = "cpu",
	.init = cpu_init,
	.reserve = cpu_reserve,
	.set_model = cpu_set_model,
	.run = cpu_run,
	.sync = NULL,
	.describe = cpu_describe,
	.free = cpu_free,
};
