/*
 * train_cuda.cu - the training passes on the GPU: the same forward and
 * backward as core/train_impl.h (which is the reference, checked against
 * finite differences), with cuBLAS for every product and small kernels for
 * the rest. mtlz_trainer_new_kind(..., "cuda") wraps it (core/train.c):
 * mtlz_cuda_trainer_step() uploads the host's parameters (2 MB for the
 * paper's model) and can download the gradient, as the CPU trainer's step
 * gives it; mtlz_cuda_trainer_adam_step() (below) keeps the parameters and
 * Adam's moments on the device instead.
 *
 * Layout: channels-last with `pad` zero rows around each spectrum, as in
 * the inference engine. A convolution's forward is the tap-stacked GEMM +
 * epilogue of engine_cuda.cu. Its backward:
 *   dW_j = dY^T X_j   (X_j: the padded input shifted by j rows; one GEMM
 *                      over the whole batch, because dY is zero outside
 *                      each spectrum's valid rows)
 *   db   = column sums of dY (GEMV with ones)
 *   dX   = gather_j P[row - j][j*Cin + ci] with P = dY W_t, W_t[co][j*Cin+ci]
 * Gradient maps ("dy layout") hold row t of a convolution's output at row t
 * of a buffer with the row count of that convolution's padded input.
 * The losses and their output gradients are computed on the host by the
 * CPU trainer's own code (mtlz_train_losses), and the dropout masks are the
 * CPU trainer's (same seed, same sample index), so the two trainers take
 * the same step.
 *
 * mtlz_cuda_trainer_adam_step() keeps the parameters and Adam's moments on
 * the device between steps (the update is one kernel, the same arithmetic
 * as mtlz_adam_step); mtlz_cuda_trainer_download() brings them back for
 * validation and checkpoints. Such a step returns once the losses are
 * known: its backward and update run on while the host gathers the next
 * batch, and an error in them is reported by the next call.
 */
#include "common.cuh"
#include "kernels.cuh"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "train.h"
}

#define TPB 256
#define NL (2 * MTLZ_MAX_BLOCKS)

struct tconv {
	int cin, cout;
	size_t ow, ob;
	float *wc;   /* [cin][k*cout] forward */
	float *wt;   /* [cout][k*cin] backward */
	float *wd;   /* [k][cin][cout] the direct kernel's */
	float *wf;   /* [k][cout][cin], taps flipped: the transposed (dX) kernel's */
	int fwd;     /* forward: 0 GEMM + epilogue, 1 direct kernel (conv_direct.cu),
		      * 2 its TF32 tensor-core version (tf32 only) */
	int dw;      /* dW: 0 one GEMM per tap, 1/2 k_dw_narrow with ~2048/~256 rows a block,
		      * 3 k_dw_mma (tf32 only) */
	int dx;      /* dX: 0 GEMM + k_gather, 1 TF32 tensor-core transposed conv (tf32 only) */
};

struct thead {
	int n_layers, in[MTLZ_MAX_HIDDEN + 1], out[MTLZ_MAX_HIDDEN + 1];
	size_t ow[MTLZ_MAX_HIDDEN + 1], ob[MTLZ_MAX_HIDDEN + 1];
	float *act[MTLZ_MAX_HIDDEN + 2]; /* act[0] = dropped-out features */
};

struct mtlz_cuda_trainer {
	int dev, Bmax, B, nb, k, pad, pool, C, H, K, L, maxw;
	char desc[256], dev_desc[128];
	cudaStream_t st;
	cublasHandle_t blas;
	void *ws;
	size_t n_p;
	float *p, *g;
	double tgt_off, tgt_scale;
	float dropout;
	int len[MTLZ_MAX_BLOCKS + 1], l1[MTLZ_MAX_BLOCKS], l2[MTLZ_MAX_BLOCKS];
	int rp0[MTLZ_MAX_BLOCKS], rp1[MTLZ_MAX_BLOCKS];
	struct tconv conv[NL];
	size_t o_aw1, o_ab1, o_aw2, o_ab2;
	struct thead head[2];
	float *x, *X[MTLZ_MAX_BLOCKS + 1], *R1[MTLZ_MAX_BLOCKS], *Y2[MTLZ_MAX_BLOCKS];
	float *z, *dA, *dB, *tmpw, *ones;
	float *dwpart;  /* [DW_MAX_BLOCKS][k][32][32]: k_dw_narrow's partial sums */
	float *gap, *ah, *as, *feat, *mask, *dfeat, *dg, *dh0, *dh1, *da2, *dha, *dlog, *dmet;
	float *h_out, *h_dlog, *h_dmet, *h_mask; /* pinned */
	float *h_x;  /* pinned [Bmax][L]: a batch gathered here is copied asynchronously */
	float *am, *av; /* Adam's moments (adam_step) */
	int tf32, cc_major;
	/* MTLZ_CUDA_PROFILE=1: device time of the forward and the backward */
	int profile;
	long prof_steps;
	double prof_fwd_ms, prof_bwd_ms;
	cudaEvent_t ev[4];
	/* per convolution: forward, dW (+ db), dX; events at each boundary */
	cudaEvent_t cev[NL][5];
	double prof_conv_ms[NL][3];
};

/* ---------------------------------------------------------------- kernels */

/* x rounded to TF32 (round to nearest), as the mma operand's bits */
__device__ __forceinline__ uint32_t to_tf32_bits(float x)
{
	uint32_t r;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#else
	r = __float_as_uint(x);
#endif
	return r;
}

/* wc[ci][j*cout + co] = wt[co][j*cin + ci] = wd[j][ci][co] =
 * wf[k-1-j][co][ci] = W[co][ci][j] */
__global__ void k_repack(const float *__restrict__ W, int cin, int cout, int k,
			 float *__restrict__ wc, float *__restrict__ wt, float *__restrict__ wd,
			 float *__restrict__ wf)
{
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= cout * cin * k)
		return;
	const int j = idx % k, ci = (idx / k) % cin, co = idx / (k * cin);
	const float v = W[idx];

	wc[(size_t)ci * k * cout + j * cout + co] = v;
	wt[(size_t)co * k * cin + j * cin + ci] = v;
	wd[((size_t)j * cin + ci) * cout + co] = v;
	wf[((size_t)(k - 1 - j) * cout + co) * cin + ci] = v;
}

/* X0[b][pad + t] = x[b][t], zero padding rows (one channel) */
__global__ void k_pad_input(const float *__restrict__ x, int B, int L, int pad,
			    float *__restrict__ X0)
{
	const int rows = L + 2 * pad;
	const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= (size_t)B * rows)
		return;
	const int r = (int)(idx % rows), b = (int)(idx / rows), t = r - pad;

	X0[idx] = t >= 0 && t < L ? x[(size_t)b * L + t] : 0.0f;
}

/* P[b][pad + q][c] = max_u Y2[b][pad + q*pool + u][c]; zero padding rows */
__global__ void k_pool_fwd(const float *__restrict__ Y2, int B, int l2, int lp, int pool,
			   int C, int pad, float *__restrict__ P)
{
	const int rows = lp + 2 * pad, yrows = l2 + 2 * pad;
	const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= (size_t)B * rows * C)
		return;
	const int c = (int)(idx % C), r = (int)((idx / C) % rows), b = (int)(idx / ((size_t)C * rows));
	const int q = r - pad;
	float v = 0.0f;

	if (q >= 0 && q < lp) {
		const float *y = Y2 + ((size_t)b * yrows + pad + (size_t)q * pool) * C + c;

		v = y[0];
		for (int u = 1; u < pool; u++)
			v = fmaxf(v, y[(size_t)u * C]);
	}
	P[idx] = v;
}

/* dY2 (rows `rows` per spectrum) from dP (rows dp_rows): the gradient goes to
 * the first maximum of each window, when the pooled value is > 0 */
__global__ void k_pool_bwd(const float *__restrict__ dP, int dp_rows,
			   const float *__restrict__ Y2, int l2, int lp, int pool, int C, int pad,
			   int B, int rows, float *__restrict__ dY)
{
	const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= (size_t)B * rows * C)
		return;
	const int c = (int)(idx % C), t = (int)((idx / C) % rows), b = (int)(idx / ((size_t)C * rows));
	const int q = t / pool;
	float v = 0.0f;

	if (t < lp * pool) {
		const float *y = Y2 + ((size_t)b * (l2 + 2 * pad) + pad + (size_t)q * pool) * C + c;
		int best = 0;

		for (int u = 1; u < pool; u++)
			if (y[(size_t)u * C] > y[(size_t)best * C])
				best = u;
		if (t - q * pool == best && y[(size_t)best * C] > 0.0f)
			v = dP[((size_t)b * dp_rows + q) * C + c];
	}
	dY[idx] = v;
}

/* out[b][t][c] = [mask[b][pad + t][c] > 0] * sum_j P[b*rp + pad + t - j][j*C + c]
 * for t < n_out, 0 for n_out <= t < out_rows */
__global__ void k_gather(const float *__restrict__ P, int B, int rp, int k, int C, int pad,
			 int n_out, const float *__restrict__ mask, int out_rows,
			 float *__restrict__ out)
{
	const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= (size_t)B * out_rows * C)
		return;
	const int c = (int)(idx % C), t = (int)((idx / C) % out_rows),
		  b = (int)(idx / ((size_t)C * out_rows));
	float v = 0.0f;

	if (t < n_out && (!mask || mask[((size_t)b * rp + pad + t) * C + c] > 0.0f))
		for (int j = 0; j < k; j++) {
			const int r = pad + t - j;

			if (r >= 0 && r < rp)
				v += P[((size_t)b * rp + r) * k * C + (size_t)j * C + c];
		}
	out[idx] = v;
}

/*
 * dW of a narrow convolution (cin % 4 == 0, cout * cin <= 1024: the long
 * early layers, where cuBLAS's GEMMs with a 10^5..10^6-long inner
 * dimension and a 16 x 16 output ran at a fraction of the bandwidth):
 *   part[blk][j][co][ci] = sum over the block's rows s of dY[s][co] X[s+j][ci]
 * A thread owns (co, 4 ci) and all K taps; it walks its rows keeping the K
 * input rows s..s+K-1 in registers, so each row costs one float4 and one
 * float load for 4K FMAs. G groups of threads per block split the block's
 * rows and are summed in shared memory; k_dw_reduce sums the blocks in a
 * fixed order (deterministic) into PyTorch's [cout][cin][k] layout.
 */
template <int K>
__global__ void k_dw_narrow(const float *__restrict__ X, const float *__restrict__ dY, long M,
			    int cin, int cout, long R, float *__restrict__ part)
{
	extern __shared__ float red[];
	const int c4 = cin >> 2, set = cout * c4, G = blockDim.x / set, n = K * cout * cin;
	const int g = threadIdx.x / set, u = threadIdx.x % set;
	const int co = u / c4, ci = (u % c4) * 4;
	const long r0 = (long)blockIdx.x * R, per = (R + G - 1) / G;
	const long a = r0 + (long)g * per;
	const long b = min(a + per, min(r0 + R, M));
	float acc[K][4];
	float4 xw[K];

#pragma unroll
	for (int j = 0; j < K; j++)
		acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
	if (a < b) {
#pragma unroll
		for (int j = 0; j < K - 1; j++)
			xw[j] = *(const float4 *)(X + (a + j) * cin + ci);
#pragma unroll 4
		for (long s = a; s < b; s++) {
			const float d = dY[s * cout + co];

			xw[K - 1] = *(const float4 *)(X + (s + K - 1) * cin + ci);
#pragma unroll
			for (int j = 0; j < K; j++) {
				acc[j][0] += d * xw[j].x;
				acc[j][1] += d * xw[j].y;
				acc[j][2] += d * xw[j].z;
				acc[j][3] += d * xw[j].w;
			}
#pragma unroll
			for (int j = 0; j < K - 1; j++)
				xw[j] = xw[j + 1];
		}
	}
#pragma unroll
	for (int j = 0; j < K; j++)
		for (int q = 0; q < 4; q++)
			red[(size_t)g * n + ((size_t)j * cout + co) * cin + ci + q] = acc[j][q];
	__syncthreads();
	for (int o = threadIdx.x; o < n; o += blockDim.x) {
		float v = 0.0f;

		for (int gg = 0; gg < G; gg++)
			v += red[(size_t)gg * n + o];
		part[(size_t)blockIdx.x * n + o] = v;
	}
}

/* grad[(co*cin + ci)*k + j] = sum over blocks of part[blk][j][co][ci] */
__global__ void k_dw_reduce(const float *__restrict__ part, int nblk, int k, int cout, int cin,
			    float *__restrict__ grad)
{
	const int n = k * cout * cin, o = blockIdx.x * blockDim.x + threadIdx.x;

	if (o >= n)
		return;
	const int j = o / (cout * cin), co = (o / cin) % cout, ci = o % cin;
	float v = 0.0f;

	for (int b = 0; b < nblk; b++)
		v += part[(size_t)b * n + o];
	grad[((size_t)co * cin + ci) * k + j] = v;
}

#define DW_MAX_BLOCKS 1024
#define DW_THREADS 256

/*
 * dW on TF32 tensor cores (tf32 only, k = 3, 16 | cout, 16 | cin): the same
 * partial sums as k_dw_narrow, part[blk][j][co][ci] = sum over the block's
 * rows s of dY[s][co] X[s+j][ci], as mma.sync m16n8k8 with M = 16 output
 * channels, N = 16 input channels (two n8 tiles) and K = 8 rows per step.
 * Fragments are read straight from global memory (a warp's load covers 4
 * rows x 32 bytes; a row of X serves the three taps from registers). A
 * block (8 warps) owns R rows and one 16 x 16 tile (grid.y); each warp
 * takes every 8th group of 8 rows, and the warps' sums are added in shared
 * memory in a fixed order, then k_dw_reduce adds the blocks in a fixed
 * order: deterministic.
 */
#define DWM_WARPS 8
__global__ void __launch_bounds__(DWM_WARPS * 32)
k_dw_mma(const float *__restrict__ X, const float *__restrict__ dY, long M, int cin, int cout,
	 long R, float *__restrict__ part)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	__shared__ float red[DWM_WARPS][3][16][17];
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
	const int tiles_ci = cin / 16, co0 = (blockIdx.y / tiles_ci) * 16,
		  ci0 = (blockIdx.y % tiles_ci) * 16;
	const long r0 = (long)blockIdx.x * R, r1 = min(r0 + R, M), xrows = M + 2;
	float acc[3][2][4];

#pragma unroll
	for (int j = 0; j < 3; j++)
#pragma unroll
		for (int nf = 0; nf < 2; nf++)
#pragma unroll
			for (int q = 0; q < 4; q++)
				acc[j][nf][q] = 0.0f;
	for (long s0 = r0 + warp * 8; s0 < r1; s0 += DWM_WARPS * 8) {
		uint32_t a[4], xr[7][2];
		const long sa = s0 + t4, sb = s0 + t4 + 4;

		a[0] = to_tf32_bits(sa < r1 ? dY[sa * cout + co0 + g] : 0.0f);
		a[1] = to_tf32_bits(sa < r1 ? dY[sa * cout + co0 + g + 8] : 0.0f);
		a[2] = to_tf32_bits(sb < r1 ? dY[sb * cout + co0 + g] : 0.0f);
		a[3] = to_tf32_bits(sb < r1 ? dY[sb * cout + co0 + g + 8] : 0.0f);
#pragma unroll
		for (int u = 0; u < 7; u++) {
			const long r = s0 + t4 + u;

#pragma unroll
			for (int nf = 0; nf < 2; nf++)
				xr[u][nf] = to_tf32_bits(r < xrows ? X[r * cin + ci0 + nf * 8 + g] : 0.0f);
		}
#pragma unroll
		for (int j = 0; j < 3; j++)
#pragma unroll
			for (int nf = 0; nf < 2; nf++)
				asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
					     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
					     : "+f"(acc[j][nf][0]), "+f"(acc[j][nf][1]),
					       "+f"(acc[j][nf][2]), "+f"(acc[j][nf][3])
					     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
					       "r"(xr[j][nf]), "r"(xr[j + 4][nf]));
	}
	/* C fragment: rows (co) g, g + 8; columns (ci) 2 t4, 2 t4 + 1 */
#pragma unroll
	for (int j = 0; j < 3; j++)
#pragma unroll
		for (int nf = 0; nf < 2; nf++) {
			const int c = nf * 8 + 2 * t4;

			red[warp][j][g][c] = acc[j][nf][0];
			red[warp][j][g][c + 1] = acc[j][nf][1];
			red[warp][j][g + 8][c] = acc[j][nf][2];
			red[warp][j][g + 8][c + 1] = acc[j][nf][3];
		}
	__syncthreads();
	for (int o = threadIdx.x; o < 3 * 256; o += blockDim.x) {
		const int j = o / 256, m = (o / 16) % 16, c = o % 16;
		float v = 0.0f;

		for (int w = 0; w < DWM_WARPS; w++)
			v += red[w][j][m][c];
		part[(size_t)blockIdx.x * 3 * cout * cin + ((size_t)j * cout + co0 + m) * cin + ci0 + c] =
			v;
	}
#else
	__trap();
#endif
}

/* grad[ow + (co*cin + ci)*k + j] = T[j][co][ci] */
__global__ void k_scatter_dw(const float *__restrict__ T, int cin, int cout, int k,
			     float *__restrict__ g)
{
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= cout * cin * k)
		return;
	const int j = idx % k, ci = (idx / k) % cin, co = idx / (k * cin);

	g[idx] = T[((size_t)j * cout + co) * cin + ci];
}

/* as = sigmoid(as + b2); feat = gap * as */
__global__ void k_att_fwd(float *__restrict__ as, const float *__restrict__ b2,
			  const float *__restrict__ gap, float *__restrict__ feat, int B, int C)
{
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= B * C)
		return;
	const float s = 1.0f / (1.0f + expf(-(as[idx] + b2[idx % C])));

	as[idx] = s;
	feat[idx] = gap[idx] * s;
}

/* y = a * b (elementwise), or y += a * b */
__global__ void k_mul(const float *__restrict__ a, const float *__restrict__ b, int n,
		      int accumulate, float *__restrict__ y)
{
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;

	if (idx < n)
		y[idx] = (accumulate ? y[idx] : 0.0f) + a[idx] * b[idx];
}

/* dy = 0 where act <= 0 (ReLU backward) */
__global__ void k_relu_bwd(float *__restrict__ dy, const float *__restrict__ act, int n)
{
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;

	if (idx < n && act[idx] <= 0.0f)
		dy[idx] = 0.0f;
}

/* dg = dfeat * as; da2 = dfeat * gap * as * (1 - as) */
__global__ void k_att_bwd(const float *__restrict__ dfeat, const float *__restrict__ as,
			  const float *__restrict__ gap, int n, float *__restrict__ dg,
			  float *__restrict__ da2)
{
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= n)
		return;
	dg[idx] = dfeat[idx] * as[idx];
	da2[idx] = dfeat[idx] * gap[idx] * as[idx] * (1.0f - as[idx]);
}

/* dP[b][q][c] = dg[b][c] / Lf for q < Lf; zero rows up to rows */
__global__ void k_gap_bwd(const float *__restrict__ dg, int B, int Lf, int rows, int C,
			  float *__restrict__ dP)
{
	const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= (size_t)B * rows * C)
		return;
	const int c = (int)(idx % C), q = (int)((idx / C) % rows), b = (int)(idx / ((size_t)C * rows));

	dP[idx] = q < Lf ? dg[(size_t)b * C + c] / (float)Lf : 0.0f;
}

/* ------------------------------------------------------------------ setup */

static const float one = 1.0f, zero = 0.0f;

static int autotune(struct mtlz_cuda_trainer *t, char *errstr, size_t errstr_size);

/* After an error: copies from the pinned staging buffers may still be in
 * flight, so let the stream finish before the caller reuses anything, and
 * clear the error state for the next call. */
static void settle(struct mtlz_cuda_trainer *t)
{
	cudaStreamSynchronize(t->st);
	cudaGetLastError();
}

static long offset_of(const mtlz_model *m, const char *name)
{
	size_t off = 0;

	for (size_t i = 0; i < mtlz_model_n_tensors(m); i++) {
		const mtlz_tensor *t = mtlz_model_tensor(m, i);

		if (strcmp(t->name, name) == 0)
			return (long)off;
		off += t->n;
	}
	return -1;
}

#define DALLOC(ptr, count) CU_TRY(cudaMalloc((void **)&(ptr), (size_t)(count) * sizeof(float)))

static int alloc_all(struct mtlz_cuda_trainer *t, char *errstr, size_t errstr_size)
{
	const int B = t->B, k = t->k;
	size_t zmax = 0, dmax = 0, rmax = 0, wmax = 0;

	DALLOC(t->p, t->n_p);
	DALLOC(t->g, t->n_p);
	DALLOC(t->am, t->n_p);
	DALLOC(t->av, t->n_p);
	DALLOC(t->x, (size_t)B * t->L);
	for (int b = 0; b < t->nb; b++) {
		const int cin = t->conv[2 * b].cin, c = t->conv[2 * b].cout;

		DALLOC(t->X[b], (size_t)B * t->rp0[b] * cin);
		DALLOC(t->R1[b], (size_t)B * t->rp1[b] * c);
		DALLOC(t->Y2[b], (size_t)B * (t->l2[b] + 2 * t->pad) * c);
		zmax = MTLZ_MAX(zmax, (size_t)t->rp0[b] * k * MTLZ_MAX(c, cin));
		zmax = MTLZ_MAX(zmax, (size_t)t->rp1[b] * k * c);
		dmax = MTLZ_MAX(dmax, (size_t)MTLZ_MAX(t->rp0[b], t->rp1[b]) * MTLZ_MAX(c, cin));
		rmax = MTLZ_MAX(rmax, (size_t)MTLZ_MAX(t->rp0[b], t->rp1[b]));
		wmax = MTLZ_MAX(wmax, (size_t)k * c * MTLZ_MAX(c, cin)); /* conv2: c x c */
		for (int j = 0; j < 2; j++) {
			struct tconv *cv = &t->conv[2 * b + j];

			DALLOC(cv->wc, (size_t)cv->cin * k * cv->cout);
			DALLOC(cv->wt, (size_t)cv->cin * k * cv->cout);
			DALLOC(cv->wd, (size_t)cv->cin * k * cv->cout);
			DALLOC(cv->wf, (size_t)cv->cin * k * cv->cout);
		}
	}
	DALLOC(t->X[t->nb], (size_t)B * (t->len[t->nb] + 2 * t->pad) * t->C);
	dmax = MTLZ_MAX(dmax, (size_t)(t->len[t->nb] + 2 * t->pad) * t->C);
	DALLOC(t->z, (size_t)B * zmax);
	DALLOC(t->dA, (size_t)B * dmax);
	DALLOC(t->dB, (size_t)B * dmax);
	DALLOC(t->tmpw, wmax);
	DALLOC(t->dwpart, (size_t)DW_MAX_BLOCKS * k * 1024);
	DALLOC(t->ones, (size_t)B * rmax);
	mtlz_cu_fill(t->ones, (size_t)B * rmax, 1.0f, t->st);
	DALLOC(t->gap, (size_t)B * t->C);
	DALLOC(t->ah, (size_t)B * (t->H + 1));
	DALLOC(t->as, (size_t)B * t->C);
	DALLOC(t->feat, (size_t)B * t->C);
	DALLOC(t->mask, (size_t)2 * B * t->C);
	DALLOC(t->dfeat, (size_t)B * t->C);
	DALLOC(t->dg, (size_t)B * t->C);
	DALLOC(t->dh0, (size_t)B * t->maxw);
	DALLOC(t->dh1, (size_t)B * t->maxw);
	DALLOC(t->da2, (size_t)B * t->C);
	DALLOC(t->dha, (size_t)B * (t->H + 1));
	DALLOC(t->dlog, (size_t)B * t->K);
	DALLOC(t->dmet, B);
	for (int h = 0; h < 2; h++)
		for (int i = 0; i <= t->head[h].n_layers; i++)
			DALLOC(t->head[h].act[i], (size_t)B * (i ? t->head[h].out[i - 1] : t->C));
	CU_TRY(cudaHostAlloc((void **)&t->h_out, (size_t)B * (t->K + 1) * sizeof(float), 0));
	/* metal_dex lives at h_out + Bmax*K, dmet at h_dlog + Bmax*K */
	CU_TRY(cudaHostAlloc((void **)&t->h_dlog, (size_t)B * (t->K + 1) * sizeof(float), 0));
	CU_TRY(cudaHostAlloc((void **)&t->h_mask, (size_t)2 * B * t->C * sizeof(float), 0));
	CU_TRY(cudaHostAlloc((void **)&t->h_x, (size_t)B * t->L * sizeof(float), 0));
	t->h_dmet = t->h_dlog + (size_t)t->Bmax * t->K;
	return MTLZ_OK;
}

extern "C" void mtlz_cuda_trainer_free(struct mtlz_cuda_trainer *t)
{
	if (!t)
		return;
	cudaSetDevice(t->dev);
	cudaStreamSynchronize(t->st);
	if (t->profile) {
		if (t->prof_steps)
			fprintf(stderr, "cuda trainer profile: %ld steps, forward %.3f ms, backward "
				"%.3f ms per step (device time, batch <= %d)\n", t->prof_steps,
				t->prof_fwd_ms / t->prof_steps, t->prof_bwd_ms / t->prof_steps, t->Bmax);
		for (int i = 0; t->prof_steps && i < 2 * t->nb; i++)
			fprintf(stderr, "cuda trainer profile: conv %d.%d (%d -> %d): forward %.3f, "
				"dW %.3f, dX %.3f ms per step\n", i / 2 + 1, i % 2 + 1, t->conv[i].cin,
				t->conv[i].cout, t->prof_conv_ms[i][0] / t->prof_steps,
				t->prof_conv_ms[i][1] / t->prof_steps,
				t->prof_conv_ms[i][2] / t->prof_steps);
		for (int i = 0; i < 4; i++)
			cudaEventDestroy(t->ev[i]);
		for (int i = 0; i < NL; i++)
			for (int j = 0; j < 5; j++)
				cudaEventDestroy(t->cev[i][j]);
	}
	cudaFree(t->p); cudaFree(t->g); cudaFree(t->x); cudaFree(t->am); cudaFree(t->av);
	for (int b = 0; b <= MTLZ_MAX_BLOCKS; b++)
		cudaFree(t->X[b]);
	for (int b = 0; b < MTLZ_MAX_BLOCKS; b++) {
		cudaFree(t->R1[b]);
		cudaFree(t->Y2[b]);
	}
	for (int i = 0; i < NL; i++) {
		cudaFree(t->conv[i].wc);
		cudaFree(t->conv[i].wt);
		cudaFree(t->conv[i].wd);
		cudaFree(t->conv[i].wf);
	}
	cudaFree(t->z); cudaFree(t->dA); cudaFree(t->dB); cudaFree(t->tmpw); cudaFree(t->ones);
	cudaFree(t->dwpart);
	cudaFree(t->gap); cudaFree(t->ah); cudaFree(t->as); cudaFree(t->feat); cudaFree(t->mask);
	cudaFree(t->dfeat); cudaFree(t->dg); cudaFree(t->dh0); cudaFree(t->dh1); cudaFree(t->da2);
	cudaFree(t->dha); cudaFree(t->dlog); cudaFree(t->dmet);
	for (int h = 0; h < 2; h++)
		for (int i = 0; i <= MTLZ_MAX_HIDDEN + 1; i++)
			cudaFree(t->head[h].act[i]);
	cudaFreeHost(t->h_out); cudaFreeHost(t->h_dlog); cudaFreeHost(t->h_mask);
	cudaFreeHost(t->h_x);
	if (t->blas)
		cublasDestroy(t->blas);
	cudaFree(t->ws);
	if (t->st)
		cudaStreamDestroy(t->st);
	free(t);
}

extern "C" struct mtlz_cuda_trainer *mtlz_cuda_trainer_new(const mtlz_model *m, int max_batch,
							   char *errstr, size_t errstr_size)
{
	const mtlz_arch *a = mtlz_model_arch(m);
	struct mtlz_cuda_trainer *t;
	cudaDeviceProp prop;
	char name[64];
	int count = 0, cin = 1;
	const char *env = getenv("MTLZ_CUDA_DEVICE");

	if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
		cudaGetLastError();
		mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
			 "cuda trainer: no usable CUDA device");
		return NULL;
	}
	t = (struct mtlz_cuda_trainer *)calloc(1, sizeof(*t));
	if (!t) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	t->dev = env ? atoi(env) : 0;
	if (t->dev < 0 || t->dev >= count) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "cuda trainer: device %d requested, this machine has %d", t->dev, count);
		free(t);
		return NULL;
	}
	if (a->kernel != 2 * a->padding + 1) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
			 "cuda trainer: only 'same' convolutions (kernel = 2 padding + 1)");
		free(t);
		return NULL;
	}
	t->B = t->Bmax = max_batch;
	t->nb = a->n_blocks;
	t->k = a->kernel;
	t->pad = a->padding;
	t->pool = a->pool;
	t->K = a->n_classes;
	t->L = a->input_length;
	t->dropout = a->dropout;
	t->n_p = mtlz_model_n_params(m);
	mtlz_model_target(m, &t->tgt_off, &t->tgt_scale);
	t->len[0] = a->input_length;
	for (int b = 0; b < a->n_blocks; b++) {
		const int c = a->channels[b];

		t->l1[b] = t->len[b] + 2 * t->pad - t->k + 1;
		t->l2[b] = t->l1[b] + 2 * t->pad - t->k + 1;
		t->len[b + 1] = (t->l2[b] - t->pool) / t->pool + 1;
		t->rp0[b] = t->len[b] + 2 * t->pad;
		t->rp1[b] = t->l1[b] + 2 * t->pad;
		for (int j = 0; j < 2; j++) {
			struct tconv *cv = &t->conv[2 * b + j];

			cv->cin = j ? c : cin;
			cv->cout = c;
			cv->ow = (size_t)offset_of(m, mtlz_name_conv(name, sizeof(name), b, j, 0));
			cv->ob = (size_t)offset_of(m, mtlz_name_conv(name, sizeof(name), b, j, 1));
		}
		cin = c;
	}
	t->C = cin;
	t->H = a->attention_reduction ? cin / a->attention_reduction : 0;
	if (t->H) {
		t->o_aw1 = (size_t)offset_of(m, "attention.squeeze.weight");
		t->o_ab1 = (size_t)offset_of(m, "attention.squeeze.bias");
		t->o_aw2 = (size_t)offset_of(m, "attention.excite.weight");
		t->o_ab2 = (size_t)offset_of(m, "attention.excite.bias");
	}
	t->maxw = cin;
	for (int h = 0; h < 2; h++) {
		struct thead *H = &t->head[h];
		int in = cin;

		H->n_layers = a->n_hidden + 1;
		for (int i = 0; i < H->n_layers; i++) {
			H->in[i] = in;
			H->out[i] = i < a->n_hidden ? a->hidden[i] : (h ? 1 : a->n_classes);
			H->ow[i] = (size_t)offset_of(m, mtlz_name_head(name, sizeof(name), h, i, 0));
			H->ob[i] = (size_t)offset_of(m, mtlz_name_head(name, sizeof(name), h, i, 1));
			t->maxw = MTLZ_MAX(t->maxw, H->out[i]);
			in = H->out[i];
		}
	}
	if (mtlz_cublas_load(errstr, errstr_size)) {
		mtlz_cuda_trainer_free(t);
		return NULL;
	}
	if (cudaSetDevice(t->dev) != cudaSuccess || cudaGetDeviceProperties(&prop, t->dev) != cudaSuccess ||
	    cudaStreamCreateWithFlags(&t->st, cudaStreamNonBlocking) != cudaSuccess ||
	    cudaMalloc(&t->ws, 32u << 20) != cudaSuccess ||
	    cublasCreate(&t->blas) != CUBLAS_STATUS_SUCCESS ||
	    cublasSetStream(t->blas, t->st) != CUBLAS_STATUS_SUCCESS ||
	    cublasSetWorkspace(t->blas, t->ws, 32u << 20) != CUBLAS_STATUS_SUCCESS ||
	    cublasSetMathMode(t->blas, CUBLAS_PEDANTIC_MATH) != CUBLAS_STATUS_SUCCESS) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "cuda trainer: device %d: %s", t->dev,
			 cudaGetErrorString(cudaGetLastError()));
		mtlz_cuda_trainer_free(t);
		return NULL;
	}
	if (alloc_all(t, errstr, errstr_size)) {
		mtlz_cuda_trainer_free(t);
		cudaGetLastError();
		return NULL;
	}
	t->profile = getenv("MTLZ_CUDA_PROFILE") && atoi(getenv("MTLZ_CUDA_PROFILE")) > 0;
	for (int i = 0; t->profile && i < 4; i++)
		cudaEventCreate(&t->ev[i]);
	for (int i = 0; t->profile && i < NL; i++)
		for (int j = 0; j < 5; j++)
			cudaEventCreate(&t->cev[i][j]);
	/* the tensor-core kernels need the device and this binary's code */
	t->cc_major = mtlz_cu_mma_built() ? prop.major : 0;
	snprintf(t->dev_desc, sizeof(t->dev_desc), "cuda device=%d %.64s (sm_%d%d) batch<=%d", t->dev,
		 prop.name, prop.major, prop.minor, max_batch);
	if (autotune(t, errstr, errstr_size)) {
		mtlz_cuda_trainer_free(t);
		cudaGetLastError();
		return NULL;
	}
	return t;
}

extern "C" const char *mtlz_cuda_trainer_describe(const struct mtlz_cuda_trainer *t)
{
	return t->desc;
}

extern "C" float *mtlz_cuda_trainer_input_buffer(struct mtlz_cuda_trainer *t)
{
	return t->h_x;
}

extern "C" int mtlz_cuda_trainer_set_tf32(struct mtlz_cuda_trainer *t, int on, char *errstr,
					  size_t errstr_size)
{
	if (!!on == t->tf32)
		return MTLZ_OK;
	CU_TRY(cudaSetDevice(t->dev));
	BLAS_TRY(cublasSetMathMode(t->blas, on ? CUBLAS_TF32_TENSOR_OP_MATH :
						 CUBLAS_PEDANTIC_MATH));
	t->tf32 = !!on;
	return autotune(t, errstr, errstr_size);   /* the GEMMs' speed changed */
}

extern "C" void mtlz_cuda_trainer_set_target(struct mtlz_cuda_trainer *t, double off,
					     double scale)
{
	t->tgt_off = off;
	t->tgt_scale = scale;
}

/* ------------------------------------------------------------------ step */

#define GRID(n) mtlz_blocks((size_t)(n), TPB), TPB, 0, t->st

/* rows x in -> rows x out, Y = X W^T (+ bias, ReLU unless last) */
static int linear(struct mtlz_cuda_trainer *t, const float *X, int rows, int in, size_t ow,
		  size_t ob, int out, float *Y, int relu, char *errstr, size_t errstr_size)
{
	BLAS_TRY(cublasSgemm(t->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &one, t->p + ow, in,
			     X, in, &zero, Y, out));
	mtlz_cu_bias_act(Y, (size_t)rows, out, t->p + ob, relu, t->st);
	LAUNCH_TRY("bias_act");
	return MTLZ_OK;
}

/* dW += dY^T X, db += colsum dY, dX = dY W (dX may be NULL) */
static int linear_bwd(struct mtlz_cuda_trainer *t, const float *X, const float *dY, int rows,
		      int in, size_t ow, size_t ob, int out, float *dX, char *errstr,
		      size_t errstr_size)
{
	BLAS_TRY(cublasSgemm(t->blas, CUBLAS_OP_N, CUBLAS_OP_T, in, out, rows, &one, X, in, dY,
			     out, &one, t->g + ow, in));
	BLAS_TRY(cublasSgemv(t->blas, CUBLAS_OP_N, out, rows, &one, dY, out, t->ones, 1, &one,
			     t->g + ob, 1));
	if (dX)
		BLAS_TRY(cublasSgemm(t->blas, CUBLAS_OP_N, CUBLAS_OP_N, in, rows, out, &one,
				     t->p + ow, in, dY, out, &zero, dX, in));
	return MTLZ_OK;
}

/* conv forward: X [B][rows_in][cin] padded -> relu(conv) padded [B][lout + 2 pad][cout] */
/* k_dw_narrow's shapes: 4 | cin, cout * cin <= 1024, 3 or 5 taps */
static int dw_narrow_fits(const struct mtlz_cuda_trainer *t, const struct tconv *cv)
{
	return cv->cin % 4 == 0 && cv->cout * cv->cin <= 1024 && (t->k == 3 || t->k == 5);
}

/* k_dw_mma's shapes (tf32 on sm_80+): 3 taps, 16 | cin, 16 | cout */
static int dw_mma_fits(const struct mtlz_cuda_trainer *t, const struct tconv *cv)
{
	return t->tf32 && t->cc_major >= 8 && t->k == 3 && cv->cin % 16 == 0 &&
	       cv->cout % 16 == 0 && (size_t)cv->cout * cv->cin <= (size_t)DW_MAX_BLOCKS * 1024;
}

#define PROF(cv, j)                                                            \
	do {                                                                   \
		if (t->profile)                                                \
			cudaEventRecord(t->cev[(cv) - t->conv][j], t->st);     \
	} while (0)

static int conv_fwd(struct mtlz_cuda_trainer *t, const struct tconv *cv, const float *X,
		    int rows_in, int lout, float *Y, char *errstr, size_t errstr_size)
{
	const int N = t->k * cv->cout;

	PROF(cv, 0);
	if (cv->fwd) {
		(cv->fwd == 2 ? mtlz_cu_conv_mma : mtlz_cu_conv_direct)(
			X, t->B, rows_in, cv->cin, cv->wd, t->p + cv->ob, cv->cout, lout, 1, t->pad, Y,
			t->st);
		LAUNCH_TRY(cv->fwd == 2 ? "conv_mma" : "conv_direct");
		PROF(cv, 1);
		return MTLZ_OK;
	}
	BLAS_TRY(cublasSgemm(t->blas, CUBLAS_OP_N, CUBLAS_OP_N, N, t->B * rows_in, cv->cin, &one,
			     cv->wc, N, X, cv->cin, &zero, t->z, N));
	mtlz_cu_conv_epilogue(t->z, t->B, rows_in, lout, cv->cout, t->k, t->p + cv->ob, t->pad,
			      Y, t->st);
	LAUNCH_TRY("conv_epilogue");
	PROF(cv, 1);
	return MTLZ_OK;
}

/* dX of a convolution (see conv_bwd) */
static int conv_dx(struct mtlz_cuda_trainer *t, const struct tconv *cv, const float *dY,
		   int rows, float *dX, int n_out, const float *mask, char *errstr,
		   size_t errstr_size)
{
	const int k = t->k;

	if (cv->dx) {
		mtlz_cu_conv_mma_dx(dY, t->B, rows, cv->cout, cv->wf, cv->cin, n_out, k - 1 - t->pad,
				    t->pad, mask, dX, t->st);
		LAUNCH_TRY("conv_mma_dx");
		return MTLZ_OK;
	}
	BLAS_TRY(cublasSgemm(t->blas, CUBLAS_OP_N, CUBLAS_OP_N, k * cv->cin, t->B * rows, cv->cout,
			     &one, cv->wt, k * cv->cin, dY, cv->cout, &zero, t->z, k * cv->cin));
	k_gather<<<GRID((size_t)t->B * rows * cv->cin)>>>(t->z, t->B, rows, k, cv->cin, t->pad,
							   n_out, mask, rows, dX);
	LAUNCH_TRY("gather");
	return MTLZ_OK;
}

/* conv backward: X [B][rows][cin] padded input, dY [B][rows][cout] (dy
 * layout): dW, db; when dX: P = dY W_t, then dX[b][t] (t < n_out, dy layout
 * of `rows` rows) gathered, masked by mask (padded like X) when not NULL */
static int conv_bwd(struct mtlz_cuda_trainer *t, const struct tconv *cv, const float *X,
		    const float *dY, int rows, float *dX, int n_out, const float *mask,
		    char *errstr, size_t errstr_size)
{
	const int k = t->k, M = t->B * rows - (k - 1);
	const size_t nw = (size_t)cv->cout * cv->cin;
	int rc;

	PROF(cv, 2);
	if (cv->dw == 3) {
		/* ~2048 rows a block, fewer blocks where the partial sums of a
		 * wide layer would not fit dwpart (DW_MAX_BLOCKS x k x 1024) */
		const long cap = MTLZ_MAX(1L, (long)DW_MAX_BLOCKS * 1024 / (long)nw);
		const long want = MTLZ_MIN(cap, MTLZ_MAX(1L, (long)M / 2048));
		const long R = ((((long)M + want - 1) / want) + 63) / 64 * 64;
		const int nblk = (int)(((long)M + R - 1) / R);
		dim3 grid(nblk, (cv->cout / 16) * (cv->cin / 16));

		k_dw_mma<<<grid, DWM_WARPS * 32, 0, t->st>>>(X, dY, M, cv->cin, cv->cout, R,
							       t->dwpart);
		LAUNCH_TRY("dw_mma");
		k_dw_reduce<<<GRID(nw * k)>>>(t->dwpart, nblk, k, cv->cout, cv->cin, t->g + cv->ow);
		LAUNCH_TRY("dw_reduce");
	} else if (cv->dw) {
		const int set = cv->cout * (cv->cin / 4), threads = DW_THREADS / set * set;
		const long want = MTLZ_MIN((long)DW_MAX_BLOCKS,
					   MTLZ_MAX(1L, (long)M / (cv->dw == 1 ? 2048 : 256)));
		const long R = MTLZ_MAX(((long)M + want - 1) / want,
					((long)M + DW_MAX_BLOCKS - 1) / DW_MAX_BLOCKS);
		const int nblk = (int)(((long)M + R - 1) / R);
		const size_t shm = (size_t)(threads / set) * k * nw * sizeof(float);

		if (k == 3)
			k_dw_narrow<3><<<nblk, threads, shm, t->st>>>(X, dY, M, cv->cin, cv->cout, R,
								     t->dwpart);
		else
			k_dw_narrow<5><<<nblk, threads, shm, t->st>>>(X, dY, M, cv->cin, cv->cout, R,
								     t->dwpart);
		LAUNCH_TRY("dw_narrow");
		k_dw_reduce<<<GRID(nw * k)>>>(t->dwpart, nblk, k, cv->cout, cv->cin, t->g + cv->ow);
		LAUNCH_TRY("dw_reduce");
	} else {
		for (int j = 0; j < k; j++)
			BLAS_TRY(cublasSgemm(t->blas, CUBLAS_OP_N, CUBLAS_OP_T, cv->cin, cv->cout, M,
					     &one, X + (size_t)j * cv->cin, cv->cin, dY, cv->cout,
					     &zero, t->tmpw + j * nw, cv->cin));
		k_scatter_dw<<<GRID(nw * k)>>>(t->tmpw, cv->cin, cv->cout, k, t->g + cv->ow);
		LAUNCH_TRY("scatter_dw");
	}
	BLAS_TRY(cublasSgemv(t->blas, CUBLAS_OP_N, cv->cout, t->B * rows, &one, dY, cv->cout,
			     t->ones, 1, &zero, t->g + cv->ob, 1));
	PROF(cv, 3);
	if (!dX) {
		PROF(cv, 4);
		return MTLZ_OK;
	}
	rc = conv_dx(t, cv, dY, rows, dX, n_out, mask, errstr, errstr_size);
	PROF(cv, 4);
	return rc;
}

/* mean milliseconds of 3 runs of op() after one */
template <typename F>
static int time_op(struct mtlz_cuda_trainer *t, cudaEvent_t e[2], F op, float *ms,
		   char *errstr, size_t errstr_size)
{
	int rc = op();

	CU_TRY(cudaEventRecord(e[0], t->st));
	for (int r = 0; r < 3 && !rc; r++)
		rc = op();
	CU_TRY(cudaEventRecord(e[1], t->st));
	CU_TRY(cudaEventSynchronize(e[1]));
	CU_TRY(cudaEventElapsedTime(ms, e[0], e[1]));
	*ms /= 3;
	return rc;
}

/*
 * Every convolution's forward (GEMM + epilogue, or the direct kernel where
 * conv_direct.cu takes the shape) and dW (a GEMM per tap, or k_dw_narrow
 * at ~2048 or ~256 rows a block) timed at the largest batch, the fastest
 * kept: which wins depends on the layer's length and width, the batch and
 * the precision (the direct kernels are fp32 FMA only). The buffers' values
 * do not matter to the timing. Under tf32 the forward also has the direct
 * kernel's tensor-core version and dX (GEMM + gather) a transposed
 * convolution on the same kernel. MTLZ_CUDA_DX=gemm|mma,
 * MTLZ_CUDA_TRAIN_CONV=gemm|direct|mma and
 * MTLZ_CUDA_DW=gemm|narrow|narrow2048|mma force a path where it applies.
 */
static int autotune(struct mtlz_cuda_trainer *t, char *errstr, size_t errstr_size)
{
	const char *fe = getenv("MTLZ_CUDA_TRAIN_CONV"), *de = getenv("MTLZ_CUDA_DW");
	const char *xe = getenv("MTLZ_CUDA_DX");
	/* 1 mma, 0 gemm, -1 timed (unset or unknown) */
	const int xforce = !xe ? -1 : !strcmp(xe, "mma") ? 1 : !strcmp(xe, "gemm") ? 0 : -1;
	char fs[NL + 1] = "", ds[NL + 1] = "", xs[NL + 1] = "";
	cudaEvent_t e[2] = { 0, 0 };
	int rc = MTLZ_OK;

	t->B = t->Bmax;
	if (cudaSetDevice(t->dev) != cudaSuccess || cudaEventCreate(&e[0]) != cudaSuccess ||
	    cudaEventCreate(&e[1]) != cudaSuccess) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "cuda trainer: autotune: %s",
			      cudaGetErrorString(cudaGetLastError()));
		goto out;
	}
	for (int i = 0; i < 2 * t->nb && rc == MTLZ_OK; i++) {
		struct tconv *cv = &t->conv[i];
		const int b = i / 2, second = i % 2;
		const float *X = second ? t->R1[b] : t->X[b];
		float *Y = second ? t->Y2[b] : t->R1[b];
		const int rows = second ? t->rp1[b] : t->rp0[b], lout = second ? t->l2[b] : t->l1[b];
		int fcand[3], nf = 0, dcand[4], nd = 0;
		float best = INFINITY, ms = 0;

		if (cv->cin > 1) {   /* the first layer is conv_first, always */
			const int direct = mtlz_cu_conv_direct_ok(cv->cin, cv->cout, t->k, 1);
			const int mma = t->tf32 && t->cc_major >= 8 &&
					mtlz_cu_conv_mma_ok(cv->cin, cv->cout, t->k, 1);

			/* forced: gemm; direct where it applies; mma where it
			 * applies, else direct, as the engine does; unknown or
			 * unset: every path that applies, timed */
			const int f = !fe ? 0 : !strcmp(fe, "gemm") ? 1 : !strcmp(fe, "direct") ? 2 :
				      !strcmp(fe, "mma") ? 3 : 0;

			if (f == 0) {
				fcand[nf++] = 0;
				if (direct)
					fcand[nf++] = 1;
				if (mma)
					fcand[nf++] = 2;
			} else {
				fcand[nf++] = f == 3 && mma ? 2 : f >= 2 && direct ? 1 : 0;
			}
		}
		cv->fwd = nf ? fcand[0] : 0;
		for (int c = 0; nf > 1 && c < nf && rc == MTLZ_OK; c++) {
			cv->fwd = fcand[c];
			rc = time_op(t, e, [&] { return conv_fwd(t, cv, X, rows, lout, Y, errstr,
								 errstr_size); }, &ms, errstr,
				     errstr_size);
			if (ms < best) {
				best = ms;
				fcand[0] = fcand[c];
			}
		}
		cv->fwd = nf ? fcand[0] : 0;
		if (!de) {   /* every path that takes the shape, timed */
			dcand[nd++] = 0;
			if (dw_narrow_fits(t, cv)) {
				dcand[nd++] = 1;
				dcand[nd++] = 2;
			}
			if (dw_mma_fits(t, cv))
				dcand[nd++] = 3;
		} else if (dw_narrow_fits(t, cv) && !strcmp(de, "narrow2048")) {
			dcand[nd++] = 1;
		} else if (dw_narrow_fits(t, cv) && !strcmp(de, "narrow")) {
			dcand[nd++] = 2;
		} else if (dw_mma_fits(t, cv) && !strcmp(de, "mma")) {
			dcand[nd++] = 3;
		} else {     /* gemm, or a path that does not exist here */
			dcand[nd++] = 0;
		}
		best = INFINITY;
		for (int c = 0; nd > 1 && c < nd && rc == MTLZ_OK; c++) {
			cv->dw = dcand[c];
			rc = time_op(t, e, [&] { return conv_bwd(t, cv, X, t->dA, rows, NULL, 0, NULL,
								 errstr, errstr_size); }, &ms, errstr,
				     errstr_size);
			if (ms < best) {
				best = ms;
				dcand[0] = dcand[c];
			}
		}
		cv->dw = dcand[0];
		/* dX (the first convolution's is never needed: '-') */
		cv->dx = 0;
		if (i > 0 && t->tf32 && t->cc_major >= 8 &&
		    mtlz_cu_conv_mma_ok(cv->cout, cv->cin, t->k, 1) && xforce != 0) {
			float tm[2] = { 0, 1 };

			for (int c = 0; c < 2 && xforce < 0 && rc == MTLZ_OK; c++) {
				cv->dx = c;
				rc = time_op(t, e, [&] { return conv_dx(t, cv, t->dA, rows, t->dB,
									second ? t->l1[b] : t->len[b],
									second ? X : NULL, errstr,
									errstr_size); }, &tm[c], errstr,
					     errstr_size);
			}
			cv->dx = xforce > 0 || tm[1] < tm[0];
		}
		fs[i] = cv->cin == 1 ? 'f' : "gdt"[cv->fwd];
		ds[i] = "gNnt"[cv->dw];
		xs[i] = i == 0 ? '-' : "gt"[cv->dx];
	}
	fs[2 * t->nb] = ds[2 * t->nb] = xs[2 * t->nb] = '\0';
	snprintf(t->desc, sizeof(t->desc), "%s %s fwd=%s dW=%s dX=%s", t->dev_desc,
		 t->tf32 ? "tf32" : "fp32", fs, ds, xs);
out:
	if (e[0])
		cudaEventDestroy(e[0]);
	if (e[1])
		cudaEventDestroy(e[1]);
	if (rc != MTLZ_OK)
		settle(t);
	return rc;
}

static int step(struct mtlz_cuda_trainer *t, const float *params, const mtlz_batch *bt,
		const mtlz_loss_opts *o, mtlz_losses *loss, int backward, float *grad,
		float *logits_out, float *metal_out, char *errstr, size_t errstr_size);

extern "C" int mtlz_cuda_trainer_step(struct mtlz_cuda_trainer *t, const float *params,
				      const mtlz_batch *bt, const mtlz_loss_opts *o,
				      mtlz_losses *loss, float *grad, float *logits_out,
				      float *metal_out, char *errstr, size_t errstr_size)
{
	const int rc = step(t, params, bt, o, loss, grad != NULL, grad, logits_out, metal_out,
			    errstr, errstr_size);

	if (rc != MTLZ_OK)
		settle(t);
	return rc;
}

/* params: the host parameters to upload, or NULL when the device's are
 * current (adam_step); backward: compute the gradient into t->g, and
 * download it into grad when that is not NULL (then the step synchronises) */
static int step(struct mtlz_cuda_trainer *t, const float *params, const mtlz_batch *bt,
		const mtlz_loss_opts *o, mtlz_losses *loss, int backward, float *grad,
		float *logits_out, float *metal_out, char *errstr, size_t errstr_size)
{
	const int B = bt->n, C = t->C, K = t->K, nb = t->nb, pad = t->pad;
	float *metal_dex = t->h_out + (size_t)t->Bmax * K;
	float *dP = t->dA, *dY = t->dB, *tmp;
	int rc = MTLZ_OK, dp_rows;

	if (B < 1 || B > t->Bmax)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "batch of %d (1..%d)", B,
				t->Bmax);
	t->B = B; /* the helpers below size their work by t->B */
	{
		CU_TRY(cudaSetDevice(t->dev));
		/* ---- parameters, input, masks ---- */
		if (params)
			CU_TRY(cudaMemcpyAsync(t->p, params, t->n_p * sizeof(float),
					       cudaMemcpyHostToDevice, t->st));
		for (int i = 0; i < 2 * nb; i++) {
			const struct tconv *cv = &t->conv[i];

			k_repack<<<GRID(cv->cout * cv->cin * t->k)>>>(t->p + cv->ow, cv->cin, cv->cout,
								       t->k, cv->wc, cv->wt, cv->wd, cv->wf);
		}
		LAUNCH_TRY("repack");
		CU_TRY(cudaMemcpyAsync(t->x, bt->x, (size_t)B * t->L * sizeof(float),
				       cudaMemcpyHostToDevice, t->st));
		k_pad_input<<<GRID((size_t)B * t->rp0[0])>>>(t->x, B, t->L, pad, t->X[0]);
		LAUNCH_TRY("pad_input");
		for (int h = 0; h < 2; h++)
			mtlz_train_dropout_masks(t->h_mask + (size_t)h * B * C, B, C, h,
						 o->train ? t->dropout : 0.0f, o->seed);
		CU_TRY(cudaMemcpyAsync(t->mask, t->h_mask, (size_t)2 * B * C * sizeof(float),
				       cudaMemcpyHostToDevice, t->st));
		/* ---- forward ---- */
		if (t->profile)
			cudaEventRecord(t->ev[0], t->st);
		for (int b = 0; b < nb; b++) {
			const struct tconv *c1 = &t->conv[2 * b], *c2 = &t->conv[2 * b + 1];

			if (c1->cin == 1) {
				PROF(c1, 0);
				mtlz_cu_conv_first(t->x, B, t->L, t->p + c1->ow, t->p + c1->ob, c1->cout,
						   t->k, pad, t->R1[b], t->st);
				LAUNCH_TRY("conv_first");
				PROF(c1, 1);
			} else if ((rc = conv_fwd(t, c1, t->X[b], t->rp0[b], t->l1[b], t->R1[b],
						  errstr, errstr_size))) {
				goto out;
			}
			if ((rc = conv_fwd(t, c2, t->R1[b], t->rp1[b], t->l2[b], t->Y2[b], errstr,
					   errstr_size)))
				goto out;
			k_pool_fwd<<<GRID((size_t)B * (t->len[b + 1] + 2 * pad) * c2->cout)>>>(
				t->Y2[b], B, t->l2[b], t->len[b + 1], t->pool, c2->cout, pad, t->X[b + 1]);
			LAUNCH_TRY("pool_fwd");
		}
		mtlz_cu_gap(t->X[nb], B, t->len[nb], C, pad, t->gap, t->st);
		LAUNCH_TRY("gap");
		if (t->H) {
			if ((rc = linear(t, t->gap, B, C, t->o_aw1, t->o_ab1, t->H, t->ah, 1, errstr,
					 errstr_size)))
				goto out;
			BLAS_TRY(cublasSgemm(t->blas, CUBLAS_OP_T, CUBLAS_OP_N, C, B, t->H, &one,
					     t->p + t->o_aw2, t->H, t->ah, t->H, &zero, t->as, C));
			k_att_fwd<<<GRID(B * C)>>>(t->as, t->p + t->o_ab2, t->gap, t->feat, B, C);
			LAUNCH_TRY("att_fwd");
		} else {
			CU_TRY(cudaMemcpyAsync(t->feat, t->gap, (size_t)B * C * sizeof(float),
					       cudaMemcpyDeviceToDevice, t->st));
		}
		for (int h = 0; h < 2; h++) {
			struct thead *H = &t->head[h];

			k_mul<<<GRID(B * C)>>>(t->feat, t->mask + (size_t)h * B * C, B * C, 0, H->act[0]);
			LAUNCH_TRY("mul");
			for (int i = 0; i < H->n_layers; i++)
				if ((rc = linear(t, H->act[i], B, H->in[i], H->ow[i], H->ob[i], H->out[i],
						 H->act[i + 1], i < H->n_layers - 1, errstr, errstr_size)))
					goto out;
		}
		if (t->profile)
			cudaEventRecord(t->ev[1], t->st);
		CU_TRY(cudaMemcpyAsync(t->h_out, t->head[0].act[t->head[0].n_layers],
				       (size_t)B * K * sizeof(float), cudaMemcpyDeviceToHost, t->st));
		CU_TRY(cudaMemcpyAsync(metal_dex, t->head[1].act[t->head[1].n_layers],
				       (size_t)B * sizeof(float), cudaMemcpyDeviceToHost, t->st));
		CU_TRY(cudaStreamSynchronize(t->st));
		/* ---- losses (host, the CPU trainer's code) ---- */
		for (int b = 0; b < B; b++)
			metal_dex[b] = (float)(metal_dex[b] * t->tgt_scale + t->tgt_off);
		mtlz_train_losses(t->h_out, metal_dex, bt, K, t->tgt_scale, o, t->h_dlog, t->h_dmet,
				  loss);
		if (logits_out)
			memcpy(logits_out, t->h_out, (size_t)B * K * sizeof(float));
		if (metal_out)
			memcpy(metal_out, metal_dex, (size_t)B * sizeof(float));
		rc = MTLZ_OK;
		if (!backward)
			goto out;
		/* ---- backward ---- */
		CU_TRY(cudaMemcpyAsync(t->dlog, t->h_dlog, (size_t)B * K * sizeof(float),
				       cudaMemcpyHostToDevice, t->st));
		CU_TRY(cudaMemcpyAsync(t->dmet, t->h_dmet, (size_t)B * sizeof(float),
				       cudaMemcpyHostToDevice, t->st));
		CU_TRY(cudaMemsetAsync(t->g, 0, t->n_p * sizeof(float), t->st));
		if (t->profile)
			cudaEventRecord(t->ev[2], t->st);
		for (int h = 0; h < 2; h++) {
			struct thead *H = &t->head[h];
			float *dy = t->dh0, *dx = t->dh1, *tmp;

			CU_TRY(cudaMemcpyAsync(dy, h ? t->dmet : t->dlog,
					       (size_t)B * H->out[H->n_layers - 1] * sizeof(float),
					       cudaMemcpyDeviceToDevice, t->st));
			for (int i = H->n_layers - 1; i >= 0; i--) {
				if (i < H->n_layers - 1) {
					k_relu_bwd<<<GRID(B * H->out[i])>>>(dy, H->act[i + 1], B * H->out[i]);
					LAUNCH_TRY("relu_bwd");
				}
				if ((rc = linear_bwd(t, H->act[i], dy, B, H->in[i], H->ow[i], H->ob[i],
						     H->out[i], dx, errstr, errstr_size)))
					goto out;
				tmp = dy; dy = dx; dx = tmp;
			}
			k_mul<<<GRID(B * C)>>>(dy, t->mask + (size_t)h * B * C, B * C, h, t->dfeat);
			LAUNCH_TRY("mul");
		}
		if (t->H) {
			k_att_bwd<<<GRID(B * C)>>>(t->dfeat, t->as, t->gap, B * C, t->dg, t->da2);
			LAUNCH_TRY("att_bwd");
			if ((rc = linear_bwd(t, t->ah, t->da2, B, t->H, t->o_aw2, t->o_ab2, C, t->dha,
					     errstr, errstr_size)))
				goto out;
			k_relu_bwd<<<GRID(B * t->H)>>>(t->dha, t->ah, B * t->H);
			LAUNCH_TRY("relu_bwd");
			if ((rc = linear_bwd(t, t->gap, t->dha, B, C, t->o_aw1, t->o_ab1, t->H, NULL,
					     errstr, errstr_size)))
				goto out;
			/* dg += dh W1 */
			BLAS_TRY(cublasSgemm(t->blas, CUBLAS_OP_N, CUBLAS_OP_N, C, B, t->H, &one,
					     t->p + t->o_aw1, C, t->dha, t->H, &one, t->dg, C));
		} else {
			CU_TRY(cudaMemcpyAsync(t->dg, t->dfeat, (size_t)B * C * sizeof(float),
					       cudaMemcpyDeviceToDevice, t->st));
		}
		{
			dp_rows = t->len[nb] + 2 * pad;
			k_gap_bwd<<<GRID((size_t)B * dp_rows * C)>>>(t->dg, B, t->len[nb], dp_rows, C, dP);
			LAUNCH_TRY("gap_bwd");
			for (int b = nb - 1; b >= 0; b--) {
				const struct tconv *c1 = &t->conv[2 * b], *c2 = &t->conv[2 * b + 1];
				const int c = c2->cout;

				k_pool_bwd<<<GRID((size_t)B * t->rp1[b] * c)>>>(dP, dp_rows, t->Y2[b],
					t->l2[b], t->len[b + 1], t->pool, c, pad, B, t->rp1[b], dY);
				LAUNCH_TRY("pool_bwd");
				/* conv2: input R1; its dX is conv1's output gradient (ReLU mask R1) */
				if ((rc = conv_bwd(t, c2, t->R1[b], dY, t->rp1[b], dP, t->l1[b], t->R1[b],
						   errstr, errstr_size)))
					goto out;
				tmp = dP; dP = dY; dY = tmp;   /* dY: conv1's output gradient */
				/* conv1: input X[b]; its dX is the previous block's pooled gradient */
				if ((rc = conv_bwd(t, c1, t->X[b], dY, t->rp0[b], b ? dP : NULL,
						   t->len[b], NULL, errstr, errstr_size)))
					goto out;
				dp_rows = t->rp0[b];
			}
		}
		if (t->profile)
			cudaEventRecord(t->ev[3], t->st);
		if (grad)
			CU_TRY(cudaMemcpyAsync(grad, t->g, t->n_p * sizeof(float),
					       cudaMemcpyDeviceToHost, t->st));
		if (grad || t->profile)
			CU_TRY(cudaStreamSynchronize(t->st));
		if (t->profile) {
			float f = 0, bw = 0;

			cudaEventElapsedTime(&f, t->ev[0], t->ev[1]);
			cudaEventElapsedTime(&bw, t->ev[2], t->ev[3]);
			t->prof_fwd_ms += f;
			t->prof_bwd_ms += bw;
			for (int i = 0; i < 2 * nb; i++) {
				float e[3] = { 0, 0, 0 };

				cudaEventElapsedTime(&e[0], t->cev[i][0], t->cev[i][1]);
				cudaEventElapsedTime(&e[1], t->cev[i][2], t->cev[i][3]);
				cudaEventElapsedTime(&e[2], t->cev[i][3], t->cev[i][4]);
				for (int j = 0; j < 3; j++)
					t->prof_conv_ms[i][j] += e[j];
			}
			t->prof_steps++;
		}
	}
out:
	return rc;
}

/* ------------------------------------------------------------------ Adam */

/* mtlz_adam_step's arithmetic, element by element */
__global__ void k_adam(float *__restrict__ p, const float *__restrict__ g, float *__restrict__ m,
		       float *__restrict__ v, size_t n, float b1, float b2, float step,
		       float sqrt_c2, float eps)
{
	const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (i >= n)
		return;
	const float gi = g[i];
	const float mi = b1 * m[i] + (1 - b1) * gi;
	const float vi = b2 * v[i] + (1 - b2) * gi * gi;

	m[i] = mi;
	v[i] = vi;
	p[i] -= step * mi / (sqrtf(vi) / sqrt_c2 + eps);
}

static int adam_launch(struct mtlz_cuda_trainer *t, mtlz_adam *a, char *errstr,
		       size_t errstr_size)
{
	const double c1 = 1.0 - pow(a->beta1, (double)(a->t + 1));
	const double c2 = 1.0 - pow(a->beta2, (double)(a->t + 1));

	k_adam<<<GRID(t->n_p)>>>(t->p, t->g, t->am, t->av, t->n_p, (float)a->beta1,
				 (float)a->beta2, (float)(a->lr / c1), (float)sqrt(c2), (float)a->eps);
	LAUNCH_TRY("adam");
	a->t++;
	return MTLZ_OK;
}

extern "C" int mtlz_cuda_trainer_adam_step(struct mtlz_cuda_trainer *t, const float *params,
					   mtlz_adam *a, const mtlz_batch *bt,
					   const mtlz_loss_opts *o, mtlz_losses *loss,
					   char *errstr, size_t errstr_size)
{
	int rc;

	if (a->n != t->n_p)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"cuda trainer: Adam state for %zu parameters, the model has %zu",
				a->n, t->n_p);
	if (params) {
		CU_TRY(cudaSetDevice(t->dev));
		CU_TRY(cudaMemcpyAsync(t->p, params, t->n_p * sizeof(float),
				       cudaMemcpyHostToDevice, t->st));
		CU_TRY(cudaMemcpyAsync(t->am, a->m, t->n_p * sizeof(float),
				       cudaMemcpyHostToDevice, t->st));
		CU_TRY(cudaMemcpyAsync(t->av, a->v, t->n_p * sizeof(float),
				       cudaMemcpyHostToDevice, t->st));
	}
	rc = step(t, NULL, bt, o, loss, 1, NULL, NULL, NULL, errstr, errstr_size);
	if (rc == MTLZ_OK)
		rc = adam_launch(t, a, errstr, errstr_size);
	if (rc != MTLZ_OK)
		settle(t);
	return rc;
}

extern "C" int mtlz_cuda_trainer_download(struct mtlz_cuda_trainer *t, float *params, float *m,
					  float *v, char *errstr, size_t errstr_size)
{
	CU_TRY(cudaSetDevice(t->dev));
	CU_TRY(cudaMemcpyAsync(params, t->p, t->n_p * sizeof(float), cudaMemcpyDeviceToHost,
			       t->st));
	if (m)
		CU_TRY(cudaMemcpyAsync(m, t->am, t->n_p * sizeof(float), cudaMemcpyDeviceToHost,
				       t->st));
	if (v)
		CU_TRY(cudaMemcpyAsync(v, t->av, t->n_p * sizeof(float), cudaMemcpyDeviceToHost,
				       t->st));
	CU_TRY(cudaStreamSynchronize(t->st));
	return MTLZ_OK;
}
