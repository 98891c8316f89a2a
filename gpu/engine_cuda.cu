/*
 * engine_cuda.cu - the CUDA backend of struct mtlz_engine_backend_i.
 *
 * One batch: the input goes from a pinned host buffer to the device; each
 * convolution is one cuBLAS SGEMM with the k taps side by side (N = k*Cout)
 * and a fused epilogue (tap shifts + bias + ReLU [+ max-pool], kernels.cuh);
 * global average pool, squeeze-and-excitation, then the heads as SGEMMs
 * over the whole batch. MC dropout re-runs only the metallicity head, on
 * n*mc dropped-out copies of the features (one SGEMM per layer), with the
 * masks of core/mc_rng.h, so the CPU and CUDA engines draw the same masks.
 * Logits, metallicity and sigma come back to pinned host memory; the
 * softmax (with the calibration temperature) is the host code the CPU
 * engine uses too (mtlz_softmax_outputs).
 *
 * Small batches are launch-bound (about 40 launches): their whole sequence,
 * copies included, is captured once per (batch size, MC passes) into a CUDA
 * graph and replayed. Every buffer is allocated once, by reserve(), for the
 * largest batch, so a graph's pointers stay valid; set_model() only copies
 * new weights into the same device arrays when the architecture is
 * unchanged, so graphs survive a model swap (hot reload).
 *
 * Each convolution has two implementations where the shape allows: the
 * GEMM path above and a fused direct kernel (conv_direct.cu) that never
 * writes Z, and for the second layer a variant that also computes the first
 * (Cin = 1) layer on the fly. set_model() times the candidates for every
 * layer at a small (8) and a large (min(max_batch, 1024)) batch and keeps
 * the fastest for each; describe() shows the choice per layer (f: first
 * layer kernel, g: GEMM path, d: direct, F: direct with the first layer
 * fused in; with precision tf32 also t and T: the same two direct kernels
 * on TF32 tensor cores).
 *
 * Environment (for tests and benches): MTLZ_CUDA_DEVICE (ordinal, default
 * 0), MTLZ_CUDA_GRAPHS (largest batch replayed from a graph, default 64;
 * 0 = never), MTLZ_CUDA_POISON=1 (fill every intermediate buffer with NaN
 * before each batch: an element a kernel fails to write shows up as NaN),
 * MTLZ_CUDA_CONV=gemm|direct|mma (force one convolution path where
 * possible; mma needs tf32, else it means direct),
 * MTLZ_CUDA_PROFILE=1 (events between stages, no graphs; the mean time of
 * each stage per batch size is printed to stderr when the engine is freed).
 */
#include "common.cuh"
#include "kernels.cuh"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "engine_impl.h"
}

#define MAX_LAYERS (2 * MTLZ_MAX_BLOCKS)
#define MAX_GRAPHS 128
/* Batches up to this size run both heads in one fused launch (a block per
 * spectrum and head); larger ones as cuBLAS GEMMs over the batch. */
#define HEADS_FUSED_MAX 64

struct cu_layer {
	int cin, cout, k;
	int lin_pad;       /* input rows per spectrum, padding included */
	int lout;          /* conv output rows */
	int pool;          /* > 0: max-pool after (second conv of a block) */
	float *w;          /* cin == 1: [cout][k]; else [cin][k*cout] */
	float *b;
	float *wd;         /* direct kernel: [k][cin][cout]; NULL when unsupported */
	int direct[2];     /* [0] batches <= 16, [1] larger ones: 0 GEMM path,
			    * 1 direct kernel, 2 direct kernel with the first
			    * layer fused in (layer 1 only; layer 0 is skipped),
			    * 3 and 4: the same two as TF32 tensor-core kernels */
};

struct cu_head {
	int n_layers;
	int in[MTLZ_MAX_HIDDEN + 1], out[MTLZ_MAX_HIDDEN + 1];
	float *w[MTLZ_MAX_HIDDEN + 1], *b[MTLZ_MAX_HIDDEN + 1];
};

struct cu_graph {
	int n, mc;
	cudaGraphExec_t exec;
};

#define MAX_STAGES 32
#define MAX_PROF 8

/* MTLZ_CUDA_PROFILE: per batch size, the summed time of each stage */
struct cu_prof {
	int n, calls, n_stages;
	const char *name[MAX_STAGES];
	double ms[MAX_STAGES];
};

struct cuda_ctx {
	int dev, max_batch, mc_reserved, tf32, poison, graph_max;
	int conv_mode;     /* 0 auto (timed), 1 gemm, 2 direct, 3 mma */
	int mma;           /* TF32 tensor-core direct kernel usable (tf32, sm_80+) */
	uint64_t seed;
	char desc[256];
	char desc_full[512];
	cudaStream_t st;
	cublasHandle_t blas;
	void *blas_ws;

	mtlz_arch arch;
	int reserved, has_weights;
	struct cu_layer conv[MAX_LAYERS];
	int n_conv, c_last, len_last, att_hidden, h_width;
	float *att_w1, *att_b1, *att_w2, *att_b2;
	struct cu_head head[2];
	double target_offset, target_scale;
	float dropout, inv_temp;

	/* device, sized by reserve() */
	float *x, *act0, *act1, *z, *g, *feat, *h0, *h1, *logits, *metal, *mc_rows, *mc_out;
	double *sigma;
	uint64_t *keys;
	size_t act_floats, z_floats, h_floats;
	/* pinned host */
	float *hx, *h_logits, *h_metal;
	double *h_sigma;

	struct cu_graph graphs[MAX_GRAPHS];
	int n_graphs;

	int profile, n_ev;
	cudaEvent_t ev[MAX_STAGES + 1];
	const char *ev_name[MAX_STAGES + 1];
	struct cu_prof prof[MAX_PROF];
	int n_prof;
};

/* Profile mode: an event after a stage. */
static void mark(struct cuda_ctx *c, const char *name)
{
	if (!c->profile || c->n_ev > MAX_STAGES)
		return;
	c->ev_name[c->n_ev] = name;
	cudaEventRecord(c->ev[c->n_ev++], c->st);
}

static void prof_collect(struct cuda_ctx *c, int n)
{
	struct cu_prof *p = NULL;

	for (int i = 0; i < c->n_prof; i++)
		if (c->prof[i].n == n)
			p = &c->prof[i];
	if (!p && c->n_prof < MAX_PROF) {
		p = &c->prof[c->n_prof++];
		memset(p, 0, sizeof(*p));
		p->n = n;
	}
	if (!p)
		return;
	p->calls++;
	p->n_stages = c->n_ev - 1;
	for (int i = 1; i < c->n_ev; i++) {
		float ms = 0;

		cudaEventElapsedTime(&ms, c->ev[i - 1], c->ev[i]);
		p->name[i - 1] = c->ev_name[i];
		p->ms[i - 1] += ms;
	}
}

static void prof_print(const struct cuda_ctx *c)
{
	for (int i = 0; i < c->n_prof; i++) {
		const struct cu_prof *p = &c->prof[i];
		double tot = 0;

		for (int s = 0; s < p->n_stages; s++)
			tot += p->ms[s];
		fprintf(stderr, "cuda profile: batch %d, %d calls, %.3f ms per batch:\n", p->n,
			p->calls, tot / p->calls);
		for (int s = 0; s < p->n_stages; s++)
			fprintf(stderr, "  %-22s %9.3f ms %5.1f%%\n", p->name[s], p->ms[s] / p->calls,
				100 * p->ms[s] / tot);
	}
}

static int env_int(const char *name, int dflt)
{
	const char *s = getenv(name);
	char *end;
	long v;

	if (!s || !*s)
		return dflt;
	v = strtol(s, &end, 10);
	return *end == '\0' && v >= 0 && v <= 1 << 20 ? (int)v : dflt;
}

static void drop_graphs(struct cuda_ctx *c)
{
	for (int i = 0; i < c->n_graphs; i++)
		cudaGraphExecDestroy(c->graphs[i].exec);
	c->n_graphs = 0;
}

static void free_buffers(struct cuda_ctx *c)
{
	drop_graphs(c);
	cudaFree(c->x); cudaFree(c->act0); cudaFree(c->act1); cudaFree(c->z);
	cudaFree(c->g); cudaFree(c->feat); cudaFree(c->h0); cudaFree(c->h1);
	cudaFree(c->logits); cudaFree(c->metal); cudaFree(c->mc_rows);
	cudaFree(c->mc_out); cudaFree(c->sigma); cudaFree(c->keys);
	cudaFreeHost(c->hx); cudaFreeHost(c->h_logits); cudaFreeHost(c->h_metal);
	cudaFreeHost(c->h_sigma);
	c->x = c->act0 = c->act1 = c->z = c->g = c->feat = c->h0 = c->h1 = NULL;
	c->logits = c->metal = c->mc_rows = c->mc_out = NULL;
	c->sigma = NULL;
	c->keys = NULL;
	c->hx = c->h_logits = c->h_metal = NULL;
	c->h_sigma = NULL;
	c->reserved = 0;
}

static void free_weights(struct cuda_ctx *c)
{
	for (int i = 0; i < c->n_conv; i++) {
		cudaFree(c->conv[i].w);
		cudaFree(c->conv[i].b);
		cudaFree(c->conv[i].wd);
		c->conv[i].w = c->conv[i].b = c->conv[i].wd = NULL;
	}
	c->n_conv = 0;
	cudaFree(c->att_w1); cudaFree(c->att_b1); cudaFree(c->att_w2); cudaFree(c->att_b2);
	c->att_w1 = c->att_b1 = c->att_w2 = c->att_b2 = NULL;
	for (int h = 0; h < 2; h++)
		for (int i = 0; i < c->head[h].n_layers; i++) {
			cudaFree(c->head[h].w[i]);
			cudaFree(c->head[h].b[i]);
		}
	memset(c->head, 0, sizeof(c->head));
	c->has_weights = 0;
}

static void *cuda_init(const mtlz_engine_opts *o, char *errstr, size_t errstr_size)
{
	struct cuda_ctx *c;
	cudaDeviceProp p;
	cudaError_t e;
	int count = 0;
	const int dev = o->device > 0 ? o->device : env_int("MTLZ_CUDA_DEVICE", 0);
	const char *prec = o->precision ? o->precision : "fp32";

	e = cudaGetDeviceCount(&count);
	if (e != cudaSuccess || count == 0) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
			 "cuda: no usable CUDA device (cudaGetDeviceCount: %s)",
			 e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
		cudaGetLastError();
		return NULL;
	}
	if (dev >= count) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "cuda: device %d requested, this machine has %d (0..%d)", dev,
			 count, count - 1);
		return NULL;
	}
	if (strcmp(prec, "fp32") != 0 && strcmp(prec, "tf32") != 0) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "cuda: precision '%s' (fp32 or tf32)", prec);
		return NULL;
	}
	c = (struct cuda_ctx *)calloc(1, sizeof(*c));
	if (!c) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	c->dev = dev;
	c->max_batch = o->max_batch;
	c->mc_reserved = o->mc_samples;
	c->seed = o->seed;
	c->tf32 = strcmp(prec, "tf32") == 0;
	c->poison = env_int("MTLZ_CUDA_POISON", 0) != 0;
	c->profile = env_int("MTLZ_CUDA_PROFILE", 0) != 0;
	c->graph_max = c->poison || c->profile ? 0 : env_int("MTLZ_CUDA_GRAPHS", 64);
	{
		const char *cm = getenv("MTLZ_CUDA_CONV");

		c->conv_mode = !cm ? 0 : strcmp(cm, "gemm") == 0 ? 1 : strcmp(cm, "direct") == 0 ? 2 :
			       strcmp(cm, "mma") == 0 ? 3 : 0;
	}
	if ((e = cudaSetDevice(dev)) != cudaSuccess ||
	    (e = cudaGetDeviceProperties(&p, dev)) != cudaSuccess ||
	    (e = cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking)) != cudaSuccess ||
	    (e = cudaMalloc(&c->blas_ws, 32u << 20)) != cudaSuccess) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "cuda: device %d: %s", dev,
			 cudaGetErrorString(e));
		goto fail;
	}
	if (mtlz_cublas_load(errstr, errstr_size))
		goto fail;
	if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS) {
		c->blas = NULL;
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "cuda: cuBLAS initialisation failed");
		goto fail;
	}
	if (cublasSetStream(c->blas, c->st) != CUBLAS_STATUS_SUCCESS ||
	    cublasSetWorkspace(c->blas, c->blas_ws, 32u << 20) != CUBLAS_STATUS_SUCCESS ||
	    cublasSetMathMode(c->blas, c->tf32 ? CUBLAS_TF32_TENSOR_OP_MATH :
					       CUBLAS_PEDANTIC_MATH) != CUBLAS_STATUS_SUCCESS) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "cuda: cuBLAS initialisation failed");
		goto fail;
	}
	for (int i = 0; c->profile && i <= MAX_STAGES; i++)
		cudaEventCreate(&c->ev[i]);
	c->mma = c->tf32 && p.major >= 8 && mtlz_cu_mma_built();
	snprintf(c->desc, sizeof(c->desc),
		 "cuda device=%d %.64s (sm_%d%d, %d SMs, %.1f GiB) precision=%s graphs<=%d%s",
		 dev, p.name, p.major, p.minor, p.multiProcessorCount,
		 (double)p.totalGlobalMem / (1u << 30), prec, c->graph_max,
		 c->poison ? " POISON" : "");
	return c;
fail:
	if (c->blas)
		cublasDestroy(c->blas);
	if (c->st)
		cudaStreamDestroy(c->st);
	cudaFree(c->blas_ws);
	cudaGetLastError();
	free(c);
	return NULL;
}

/* Per-spectrum sizes of every buffer, from the architecture. */
static void plan(struct cuda_ctx *c, const mtlz_arch *a)
{
	const int pad = a->padding;
	int len = a->input_length, cin = 1, n = 0;

	c->act_floats = 0;
	c->z_floats = 0;
	for (int b = 0; b < a->n_blocks; b++)
		for (int j = 0; j < 2; j++) {
			struct cu_layer *L = &c->conv[n++];

			L->cin = cin;
			L->cout = a->channels[b];
			L->k = a->kernel;
			L->lin_pad = len + 2 * pad;
			L->lout = len + 2 * pad - a->kernel + 1;
			L->pool = j == 1 ? a->pool : 0;
			if (cin > 1)
				c->z_floats = MTLZ_MAX(c->z_floats,
						       (size_t)L->lin_pad * L->k * L->cout);
			len = L->pool ? (L->lout - L->pool) / L->pool + 1 : L->lout;
			c->act_floats = MTLZ_MAX(c->act_floats, (size_t)(len + 2 * pad) * L->cout);
			cin = L->cout;
		}
	c->n_conv = n;
	c->c_last = cin;
	c->len_last = len;
	c->att_hidden = a->attention_reduction ? cin / a->attention_reduction : 0;
	c->h_width = cin;
	for (int i = 0; i < a->n_hidden; i++)
		c->h_width = MTLZ_MAX(c->h_width, a->hidden[i]);
	c->h_width = MTLZ_MAX(c->h_width, a->n_classes);
}

#define DEV_ALLOC(ptr, count) CU_TRY(cudaMalloc((void **)&(ptr), (size_t)(count) * sizeof(*(ptr))))
#define HOST_ALLOC(ptr, count) CU_TRY(cudaHostAlloc((void **)&(ptr), (size_t)(count) * sizeof(*(ptr)), cudaHostAllocDefault))

static int reserve_all(struct cuda_ctx *c, int B, int mc, char *errstr, size_t errstr_size)
{
	const size_t rows = (size_t)B * MTLZ_MAX(mc, 1);
	const int L = c->arch.input_length;

	DEV_ALLOC(c->x, (size_t)B * L);
	DEV_ALLOC(c->act0, (size_t)B * c->act_floats);
	DEV_ALLOC(c->act1, (size_t)B * c->act_floats);
	DEV_ALLOC(c->z, (size_t)B * c->z_floats);
	DEV_ALLOC(c->g, (size_t)B * c->c_last);
	DEV_ALLOC(c->feat, (size_t)B * c->c_last);
	DEV_ALLOC(c->h0, rows * c->h_width);
	DEV_ALLOC(c->h1, rows * c->h_width);
	DEV_ALLOC(c->logits, (size_t)B * c->arch.n_classes);
	DEV_ALLOC(c->metal, B);
	DEV_ALLOC(c->mc_rows, (size_t)B * MTLZ_MAX(mc, 1) * c->c_last);
	DEV_ALLOC(c->mc_out, rows);
	DEV_ALLOC(c->sigma, B);
	DEV_ALLOC(c->keys, B);
	HOST_ALLOC(c->hx, (size_t)B * L);
	HOST_ALLOC(c->h_logits, (size_t)B * c->arch.n_classes);
	HOST_ALLOC(c->h_metal, B);
	HOST_ALLOC(c->h_sigma, B);
	return MTLZ_OK;
}

static int cuda_reserve(void *ctx, const mtlz_arch *a, int max_batch, int mc, char *errstr,
			size_t errstr_size)
{
	struct cuda_ctx *c = (struct cuda_ctx *)ctx;
	int rc;

	if (c->reserved && memcmp(&c->arch, a, sizeof(*a)) == 0 && max_batch <= c->max_batch &&
	    mc <= c->mc_reserved)
		return MTLZ_OK;
	CU_TRY(cudaSetDevice(c->dev));
	free_weights(c);
	free_buffers(c);
	c->arch = *a;
	c->max_batch = max_batch;
	c->mc_reserved = mc;
	plan(c, a);
	rc = reserve_all(c, max_batch, mc, errstr, errstr_size);
	if (rc) {
		char why[384];

		snprintf(why, sizeof(why), "%s", errstr ? errstr : "");
		free_buffers(c);
		cudaGetLastError();
		return mtlz_err(errstr, errstr_size, rc,
				"cuda engine: cannot reserve buffers for batch %d with %d "
				"MC passes (%.2f GiB of activations): %s", max_batch, mc,
				(double)max_batch * (2 * c->act_floats + c->z_floats) * 4 /
					(1u << 30), why);
	}
	c->reserved = 1;
	return MTLZ_OK;
}

/* Copies a model tensor to a device array, allocating it the first time. */
static int upload(float **dst, const float *src, size_t n, char *errstr, size_t errstr_size)
{
	if (!*dst)
		CU_TRY(cudaMalloc((void **)dst, n * sizeof(float)));
	CU_TRY(cudaMemcpy(*dst, src, n * sizeof(float), cudaMemcpyHostToDevice));
	return MTLZ_OK;
}

static int upload_named(float **dst, const mtlz_model *m, const char *name, char *errstr,
			size_t errstr_size)
{
	const mtlz_tensor *t = mtlz_model_find(m, name);

	if (!t)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"cuda engine: model has no tensor '%s'", name);
	return upload(dst, t->data, t->n, errstr, errstr_size);
}

static int choose_conv(struct cuda_ctx *c, char *errstr, size_t errstr_size);

static int cuda_set_model(void *ctx, const mtlz_model *m, char *errstr, size_t errstr_size)
{
	struct cuda_ctx *c = (struct cuda_ctx *)ctx;
	const mtlz_arch *a = mtlz_model_arch(m);
	char name[64];
	float *tmp = NULL;
	int rc;

	/* reserve() ran for this arch (engine_reg.c): the layer plan is set and
	 * weights already on the device are overwritten in place. */
	CU_TRY(cudaSetDevice(c->dev));
	for (int i = 0; i < c->n_conv; i++) {
		struct cu_layer *L = &c->conv[i];
		const mtlz_tensor *w;

		w = mtlz_model_find(m, mtlz_name_conv(name, sizeof(name), i / 2, i % 2, 0));
		if (!w)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"cuda engine: model has no tensor '%s'", name);
		if (L->cin == 1) {
			rc = upload(&L->w, w->data, w->n, errstr, errstr_size);
		} else {
			/* [cout][cin][k] -> [cin][k*cout], and [k][cin][cout] for the
			 * direct kernel */
			tmp = (float *)malloc(w->n * sizeof(float));
			if (!tmp)
				return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
			for (int co = 0; co < L->cout; co++)
				for (int ci = 0; ci < L->cin; ci++)
					for (int j = 0; j < L->k; j++)
						tmp[((size_t)ci * L->k + j) * L->cout + co] =
							w->data[((size_t)co * L->cin + ci) * L->k + j];
			rc = upload(&L->w, tmp, w->n, errstr, errstr_size);
			if (!rc && mtlz_cu_conv_direct_ok(L->cin, L->cout, L->k, L->pool ? L->pool : 1)) {
				for (int co = 0; co < L->cout; co++)
					for (int ci = 0; ci < L->cin; ci++)
						for (int j = 0; j < L->k; j++)
							tmp[((size_t)j * L->cin + ci) * L->cout + co] =
								w->data[((size_t)co * L->cin + ci) * L->k + j];
				rc = upload(&L->wd, tmp, w->n, errstr, errstr_size);
			}
			free(tmp);
		}
		if (rc)
			return rc;
		if ((rc = upload_named(&L->b, m, mtlz_name_conv(name, sizeof(name), i / 2, i % 2, 1),
				       errstr, errstr_size)))
			return rc;
	}
	if (c->att_hidden &&
	    ((rc = upload_named(&c->att_w1, m, "attention.squeeze.weight", errstr, errstr_size)) ||
	     (rc = upload_named(&c->att_b1, m, "attention.squeeze.bias", errstr, errstr_size)) ||
	     (rc = upload_named(&c->att_w2, m, "attention.excite.weight", errstr, errstr_size)) ||
	     (rc = upload_named(&c->att_b2, m, "attention.excite.bias", errstr, errstr_size))))
		return rc;
	for (int h = 0; h < 2; h++) {
		struct cu_head *H = &c->head[h];
		int in = c->c_last;

		H->n_layers = a->n_hidden + 1;
		for (int i = 0; i < H->n_layers; i++) {
			H->in[i] = in;
			H->out[i] = i < a->n_hidden ? a->hidden[i] : (h ? 1 : a->n_classes);
			if ((rc = upload_named(&H->w[i], m, mtlz_name_head(name, sizeof(name), h, i, 0),
					       errstr, errstr_size)))
				return rc;
			if ((rc = upload_named(&H->b[i], m, mtlz_name_head(name, sizeof(name), h, i, 1),
					       errstr, errstr_size)))
				return rc;
			in = H->out[i];
		}
	}
	mtlz_model_target(m, &c->target_offset, &c->target_scale);
	c->dropout = a->dropout;
	c->inv_temp = (float)(1.0 / mtlz_model_temperature(m));
	c->has_weights = 1;
	/* MC passes depend on dropout > 0, which graphs bake in */
	drop_graphs(c);
	return choose_conv(c, errstr, errstr_size);
}

static const float one = 1.0f, zero = 0.0f;

/* rows x in -> rows x out through one head (row-major activations). */
static int run_head(struct cuda_ctx *c, const struct cu_head *H, const float *x, int rows,
		    float *y, char *errstr, size_t errstr_size)
{
	const float *src = x;

	for (int i = 0; i < H->n_layers; i++) {
		float *dst = i == H->n_layers - 1 ? y : (i & 1 ? c->h1 : c->h0);

		/* Y^T[out x rows] = W[out x in] X^T: W is row-major [out][in] */
		BLAS_TRY(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, H->out[i], rows, H->in[i],
				     &one, H->w[i], H->in[i], src, H->in[i], &zero, dst,
				     H->out[i]));
		mtlz_cu_bias_act(dst, (size_t)rows, H->out[i], H->b[i], i < H->n_layers - 1, c->st);
		LAUNCH_TRY("bias_act");
		src = dst;
	}
	return MTLZ_OK;
}

/* One convolution layer, in -> out, by the GEMM path or the direct kernel. */
static int conv_layer(struct cuda_ctx *c, const struct cu_layer *Lr, int n, const float *in,
		      float *out, int direct, char *errstr, size_t errstr_size)
{
	const int pad = c->arch.padding;

	if (Lr->cin == 1) {
		mtlz_cu_conv_first(c->x, n, c->arch.input_length, Lr->w, Lr->b, Lr->cout, Lr->k,
				   pad, out, c->st);
		LAUNCH_TRY("conv_first");
	} else if (direct == 2 || direct == 4) {
		const struct cu_layer *L0 = &c->conv[0];

		(direct == 2 ? mtlz_cu_conv_direct_first : mtlz_cu_conv_mma_first)(
			c->x, c->arch.input_length, L0->w, L0->b, n, Lr->lin_pad, Lr->cin, Lr->wd,
			Lr->b, Lr->cout, Lr->lout, Lr->pool ? Lr->pool : 1, pad, out, c->st);
		LAUNCH_TRY(direct == 2 ? "conv_direct_first" : "conv_mma_first");
	} else if (direct == 3) {
		mtlz_cu_conv_mma(in, n, Lr->lin_pad, Lr->cin, Lr->wd, Lr->b, Lr->cout, Lr->lout,
				 Lr->pool ? Lr->pool : 1, pad, out, c->st);
		LAUNCH_TRY("conv_mma");
	} else if (direct) {
		mtlz_cu_conv_direct(in, n, Lr->lin_pad, Lr->cin, Lr->wd, Lr->b, Lr->cout, Lr->lout,
				    Lr->pool ? Lr->pool : 1, pad, out, c->st);
		LAUNCH_TRY("conv_direct");
	} else {
		const int N = Lr->k * Lr->cout;

		/* Z^T[N x n*lin_pad] = Wc^T X^T; Wc row-major [cin][N] */
		BLAS_TRY(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, N, n * Lr->lin_pad,
				     Lr->cin, &one, Lr->w, N, in, Lr->cin, &zero, c->z, N));
		if (Lr->pool)
			mtlz_cu_conv_epilogue_pool(c->z, n, Lr->lin_pad, Lr->lout, Lr->cout, Lr->k,
						   Lr->b, Lr->pool, pad, out, c->st);
		else
			mtlz_cu_conv_epilogue(c->z, n, Lr->lin_pad, Lr->lout, Lr->cout, Lr->k, Lr->b,
					      pad, out, c->st);
		LAUNCH_TRY(Lr->pool ? "conv_epilogue_pool" : "conv_epilogue");
	}
	return MTLZ_OK;
}

/* Median of 5 timed runs of one layer by one path (conv_layer's direct), in ms. */
static int time_layer(struct cuda_ctx *c, const struct cu_layer *Lr, int n, int direct,
		      cudaEvent_t e0, cudaEvent_t e1, float *ms, char *errstr, size_t errstr_size)
{
	float t[5];
	int rc;

	if ((rc = conv_layer(c, Lr, n, c->act0, c->act1, direct, errstr, errstr_size)))
		return rc;
	for (int r = 0; r < 5; r++) {
		CU_TRY(cudaEventRecord(e0, c->st));
		if ((rc = conv_layer(c, Lr, n, c->act0, c->act1, direct, errstr, errstr_size)))
			return rc;
		CU_TRY(cudaEventRecord(e1, c->st));
		CU_TRY(cudaEventSynchronize(e1));
		CU_TRY(cudaEventElapsedTime(&t[r], e0, e1));
	}
	for (int a = 0; a < 5; a++)
		for (int b = a + 1; b < 5; b++)
			if (t[b] < t[a]) {
				float x = t[a];

				t[a] = t[b];
				t[b] = x;
			}
	*ms = t[2];
	return MTLZ_OK;
}

/* Picks the GEMM path, the direct kernel or (tf32) the tensor-core direct
 * kernel for every layer, by timing them at a small and a large batch (or
 * as MTLZ_CUDA_CONV says). */
static int choose_conv(struct cuda_ctx *c, char *errstr, size_t errstr_size)
{
	static const char code[] = "gdFtT";
	const int nb[2] = { MTLZ_MIN(c->max_batch, 8), MTLZ_MIN(c->max_batch, 1024) };
	char pick[2][MAX_LAYERS + 1];
	cudaEvent_t e0, e1;
	int rc = MTLZ_OK;

	memset(pick, 0, sizeof(pick));
	CU_TRY(cudaEventCreate(&e0));
	if (cudaEventCreate(&e1) != cudaSuccess) {
		cudaEventDestroy(e0);
		CU_TRY(cudaGetLastError());
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "cuda: cudaEventCreate failed");
	}
	mtlz_cu_fill(c->x, (size_t)nb[1] * c->arch.input_length, 1.0f, c->st);
	mtlz_cu_fill(c->act0, (size_t)nb[1] * c->act_floats, 0.5f, c->st);
	mtlz_cu_fill(c->act1, (size_t)nb[1] * c->act_floats, 0.5f, c->st);
	for (int b = 0; b < 2 && rc == MTLZ_OK; b++)
		for (int i = 0; i < c->n_conv && rc == MTLZ_OK; i++) {
			struct cu_layer *Lr = &c->conv[i];
			/* layer 1 after a Cin = 1, k = 3 first layer can take it in */
			const int fuse = i == 1 && c->conv[0].cin == 1 && c->conv[0].k == 3;
			const int mma = c->mma && mtlz_cu_conv_mma_ok(Lr->cin, Lr->cout, Lr->k,
								      Lr->pool ? Lr->pool : 1);
			float t[5], t0 = 0;
			int best = 0;

			Lr->direct[b] = 0;
			pick[b][i] = Lr->cin == 1 ? 'f' : 'g';
			if (!Lr->wd || c->conv_mode == 1)
				continue;
			if (c->conv_mode == 2 || (c->conv_mode == 3 && !mma)) {
				Lr->direct[b] = fuse ? 2 : 1;
			} else if (c->conv_mode == 3) {
				Lr->direct[b] = fuse ? 4 : 3;
			} else {
				/* candidates: 0 GEMM, 1 direct, 2 direct + first layer,
				 * 3 mma, 4 mma + first layer; a fused one also saves
				 * layer 0's own time t0 */
				for (int d = 0; d < 5; d++)
					t[d] = 1e30f;
				for (int d = 0; d < 5 && !rc; d++) {
					if (((d == 2 || d == 4) && !fuse) || (d >= 3 && !mma))
						continue;
					rc = time_layer(c, Lr, nb[b], d, e0, e1, &t[d], errstr,
							errstr_size);
				}
				if (!rc && fuse)
					rc = time_layer(c, &c->conv[0], nb[b], 0, e0, e1, &t0, errstr,
							errstr_size);
				if (rc)
					break;
				for (int d = 1; d < 5; d++)
					if ((d == 2 || d == 4 ? t[d] - t0 : t[d]) <
					    (best == 2 || best == 4 ? t[best] - t0 : t[best]))
						best = d;
				Lr->direct[b] = best;
			}
			pick[b][i] = code[Lr->direct[b]];
		}
	cudaEventDestroy(e0);
	cudaEventDestroy(e1);
	if (rc)
		return rc;
	CU_TRY(cudaStreamSynchronize(c->st));
	snprintf(c->desc_full, sizeof(c->desc_full), "%s conv[<=16]=%s conv[>16]=%s", c->desc,
		 pick[0], pick[1]);
	return MTLZ_OK;
}

static void poison_all(struct cuda_ctx *c, int n, int mc)
{
	const size_t rows = (size_t)n * MTLZ_MAX(mc, 1);

	mtlz_cu_poison(c->act0, (size_t)n * c->act_floats, c->st);
	mtlz_cu_poison(c->act1, (size_t)n * c->act_floats, c->st);
	mtlz_cu_poison(c->z, (size_t)n * c->z_floats, c->st);
	mtlz_cu_poison(c->g, (size_t)n * c->c_last, c->st);
	mtlz_cu_poison(c->feat, (size_t)n * c->c_last, c->st);
	mtlz_cu_poison(c->h0, rows * c->h_width, c->st);
	mtlz_cu_poison(c->h1, rows * c->h_width, c->st);
	mtlz_cu_poison(c->logits, (size_t)n * c->arch.n_classes, c->st);
	mtlz_cu_poison(c->metal, n, c->st);
	mtlz_cu_poison(c->mc_rows, rows * c->c_last, c->st);
	mtlz_cu_poison(c->mc_out, rows, c->st);
}

/* Everything from the pinned input to the pinned outputs, enqueued on st. */
static int enqueue(struct cuda_ctx *c, int n, int mc, char *errstr, size_t errstr_size)
{
	const mtlz_arch *a = &c->arch;
	const int L = a->input_length, pad = a->padding, C = c->c_last, K = a->n_classes;
	const int do_mc = mc > 0 && c->dropout > 0.0f;
	float *in = c->act0, *out = c->act1, *t;
	int rc;

	c->n_ev = 0;
	mark(c, "start");
	CU_TRY(cudaMemcpyAsync(c->x, c->hx, (size_t)n * L * sizeof(float),
			       cudaMemcpyHostToDevice, c->st));
	mark(c, "copy in");
	if (c->poison)
		poison_all(c, n, mc);
	for (int i = 0; i < c->n_conv; i++) {
		const struct cu_layer *Lr = &c->conv[i];

		if (i == 0 && c->n_conv > 1 && c->conv[1].wd &&
		    (c->conv[1].direct[n > 16] == 2 || c->conv[1].direct[n > 16] == 4))
			continue; /* done inside layer 1 */
		if ((rc = conv_layer(c, Lr, n, in, out, Lr->wd ? Lr->direct[n > 16] : 0, errstr,
				     errstr_size)))
			return rc;
		{
			static const char *const names[MAX_LAYERS] = {
				"conv 1.1", "conv 1.2+pool", "conv 2.1", "conv 2.2+pool",
				"conv 3.1", "conv 3.2+pool", "conv 4.1", "conv 4.2+pool",
				"conv 5.1", "conv 5.2+pool", "conv 6.1", "conv 6.2+pool",
				"conv 7.1", "conv 7.2+pool", "conv 8.1", "conv 8.2+pool" };

			mark(c, names[i]);
		}
		t = in; in = out; out = t;
	}
	mtlz_cu_gap(in, n, c->len_last, C, pad, c->g, c->st);
	LAUNCH_TRY("gap");
	if (c->att_hidden) {
		mtlz_cu_attention(c->g, n, C, c->att_hidden, c->att_w1, c->att_b1, c->att_w2,
				  c->att_b2, c->feat, c->st);
		LAUNCH_TRY("attention");
	} else {
		CU_TRY(cudaMemcpyAsync(c->feat, c->g, (size_t)n * C * sizeof(float),
				       cudaMemcpyDeviceToDevice, c->st));
	}
	mark(c, "gap+attention");
	if (n <= HEADS_FUSED_MAX && c->head[0].n_layers <= 5) {
		struct mtlz_cu_heads h;

		memset(&h, 0, sizeof(h));
		h.width = c->h_width;
		for (int hd = 0; hd < 2; hd++) {
			h.n_layers[hd] = c->head[hd].n_layers;
			for (int l = 0; l < c->head[hd].n_layers; l++) {
				h.in[hd][l] = c->head[hd].in[l];
				h.out[hd][l] = c->head[hd].out[l];
				h.w[hd][l] = c->head[hd].w[l];
				h.b[hd][l] = c->head[hd].b[l];
			}
		}
		h.y[0] = c->logits;
		h.y[1] = c->metal;
		mtlz_cu_heads_fused(c->feat, n, &h, c->st);
		LAUNCH_TRY("heads_fused");
	} else if ((rc = run_head(c, &c->head[0], c->feat, n, c->logits, errstr, errstr_size)) ||
		   (rc = run_head(c, &c->head[1], c->feat, n, c->metal, errstr, errstr_size))) {
		return rc;
	}
	mark(c, "heads");
	if (do_mc) {
		const float keep = 1.0f - c->dropout;

		mtlz_cu_mc_keys(c->x, n, L, c->seed, c->keys, c->st);
		LAUNCH_TRY("mc_keys");
		mtlz_cu_mc_rows(c->feat, c->keys, n, mc, C, (uint32_t)lrintf(keep * 65536.0f),
				1.0f / keep, c->mc_rows, c->st);
		LAUNCH_TRY("mc_rows");
		if ((rc = run_head(c, &c->head[1], c->mc_rows, n * mc, c->mc_out, errstr,
				   errstr_size)))
			return rc;
		mtlz_cu_mc_sigma(c->mc_out, n, mc, c->sigma, c->st);
		LAUNCH_TRY("mc_sigma");
		mark(c, "mc dropout");
		CU_TRY(cudaMemcpyAsync(c->h_sigma, c->sigma, (size_t)n * sizeof(double),
				       cudaMemcpyDeviceToHost, c->st));
	}
	CU_TRY(cudaMemcpyAsync(c->h_logits, c->logits, (size_t)n * K * sizeof(float),
			       cudaMemcpyDeviceToHost, c->st));
	CU_TRY(cudaMemcpyAsync(c->h_metal, c->metal, (size_t)n * sizeof(float),
			       cudaMemcpyDeviceToHost, c->st));
	mark(c, "copy out");
	return MTLZ_OK;
}

/* The graph for (n, mc), captured on first use; NULL when graphs are off
 * for this size or the cache is full. */
static int graph_for(struct cuda_ctx *c, int n, int mc, cudaGraphExec_t *exec, char *errstr,
		     size_t errstr_size)
{
	cudaGraph_t g = NULL;
	int rc;

	*exec = NULL;
	if (n > c->graph_max)
		return MTLZ_OK;
	for (int i = 0; i < c->n_graphs; i++)
		if (c->graphs[i].n == n && c->graphs[i].mc == mc) {
			*exec = c->graphs[i].exec;
			return MTLZ_OK;
		}
	if (c->n_graphs == MAX_GRAPHS)
		return MTLZ_OK;
	CU_TRY(cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal));
	rc = enqueue(c, n, mc, errstr, errstr_size);
	if (rc) {
		cudaStreamEndCapture(c->st, &g);
		if (g)
			cudaGraphDestroy(g);
		return rc;
	}
	CU_TRY(cudaStreamEndCapture(c->st, &g));
	{
		cudaError_t e = cudaGraphInstantiate(exec, g, 0);

		cudaGraphDestroy(g);
		CU_TRY(e);
	}
	c->graphs[c->n_graphs].n = n;
	c->graphs[c->n_graphs].mc = mc;
	c->graphs[c->n_graphs++].exec = *exec;
	return MTLZ_OK;
}

static int cuda_run(void *ctx, const float *x, int n, int mc, mtlz_output *out, char *errstr,
		    size_t errstr_size)
{
	struct cuda_ctx *c = (struct cuda_ctx *)ctx;
	const int L = c->arch.input_length, K = c->arch.n_classes;
	const int do_mc = mc > 0 && c->dropout > 0.0f;
	cudaGraphExec_t exec;
	int rc;

	if (!c->has_weights || n > c->max_batch || mc > c->mc_reserved)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"cuda engine: batch %d with %d MC passes exceeds the reserved "
				"%d x %d", n, mc, c->max_batch, c->mc_reserved);
	CU_TRY(cudaSetDevice(c->dev));
	if (x != c->hx)
		memcpy(c->hx, x, (size_t)n * L * sizeof(float));
	if (graph_for(c, n, mc, &exec, errstr, errstr_size)) {
		/* capture or instantiation failed (e.g. out of memory): the same
		 * work runs without a graph; a real fault shows up there */
		cudaGetLastError();
		exec = NULL;
		if (errstr && errstr_size)
			errstr[0] = '\0';
	}
	if (exec)
		CU_TRY(cudaGraphLaunch(exec, c->st));
	else if ((rc = enqueue(c, n, mc, errstr, errstr_size)))
		return rc;
	CU_TRY(cudaStreamSynchronize(c->st));
	if (c->profile)
		prof_collect(c, n);
	mtlz_softmax_outputs(c->h_logits, n, K, c->inv_temp, out);
	for (int i = 0; i < n; i++) {
		out[i].metal = (float)(c->h_metal[i] * c->target_scale + c->target_offset);
		out[i].metal_sigma = mc <= 0 ? NAN :
				     do_mc ? (float)(c->h_sigma[i] * fabs(c->target_scale)) : 0.0f;
	}
	return MTLZ_OK;
}

static float *cuda_input_buffer(void *ctx)
{
	return ((struct cuda_ctx *)ctx)->hx;
}

static const char *cuda_describe(void *ctx)
{
	struct cuda_ctx *c = (struct cuda_ctx *)ctx;

	return c->desc_full[0] ? c->desc_full : c->desc;
}

static void cuda_free(void *ctx)
{
	struct cuda_ctx *c = (struct cuda_ctx *)ctx;

	if (!c)
		return;
	cudaSetDevice(c->dev);
	if (c->profile) {
		prof_print(c);
		for (int i = 0; i <= MAX_STAGES; i++)
			cudaEventDestroy(c->ev[i]);
	}
	free_buffers(c);
	free_weights(c);
	cublasDestroy(c->blas);
	cudaFree(c->blas_ws);
	cudaStreamDestroy(c->st);
	free(c);
}

extern "C" const struct mtlz_engine_backend_i mtlz_engine_cuda = {
	/* .name = */ "cuda",
	/* .init = */ cuda_init,
	/* .reserve = */ cuda_reserve,
	/* .set_model = */ cuda_set_model,
	/* .run = */ cuda_run,
	/* .sync = */ NULL,
	/* .describe = */ cuda_describe,
	/* .free = */ cuda_free,
	/* .input_buffer = */ cuda_input_buffer,
};
