/*
 * kernels.cu - the CUDA engine's element-wise and small kernels
 * (kernels.cuh says what each computes). One thread per output element,
 * channel fastest, so a warp reads and writes consecutive addresses.
 */
#include "kernels.cuh"
#include "common.cuh"

#include <math.h>

extern "C" {
#include "mc_rng.h"
}

#define TPB 256

/* Grids here are (elements of one spectrum, spectra): 32-bit index math
 * within a spectrum (64-bit division costs more than the memory access). */
#define SPECTRA_Y 65535

__global__ void k_conv_first(const float *__restrict__ x, int L,
			     const float *__restrict__ w, const float *__restrict__ b,
			     int Cout, int k, int pad, float *__restrict__ y)
{
	const int Lout = L + 2 * pad - k + 1, rows = Lout + 2 * pad;
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;
	const size_t i = blockIdx.y;

	if (idx >= rows * Cout)
		return;
	const int co = idx % Cout, t = idx / Cout - pad;
	float v = 0.0f;

	if (t >= 0 && t < Lout) {
		const float *xi = x + i * L;

		v = b[co];
		for (int j = 0; j < k; j++) {
			const int s = t + j - pad;

			if (s >= 0 && s < L)
				v += xi[s] * w[co * k + j];
		}
		v = fmaxf(v, 0.0f);
	}
	y[i * rows * Cout + idx] = v;
}

void mtlz_cu_conv_first(const float *x, int n, int L, const float *w, const float *b,
			int Cout, int k, int pad, float *y, cudaStream_t s)
{
	const int per = (L + 2 * pad - k + 1 + 2 * pad) * Cout;

	for (int i0 = 0; i0 < n; i0 += SPECTRA_Y) {
		dim3 grid(mtlz_blocks((size_t)per, TPB), MTLZ_MIN(n - i0, SPECTRA_Y));

		k_conv_first<<<grid, TPB, 0, s>>>(x + (size_t)i0 * L, L, w, b, Cout, k, pad,
						  y + (size_t)i0 * per);
	}
}

/* b[co] + sum_j Z[(base + j)][j*Cout + co], Z rows of k*Cout */
__device__ __forceinline__ float conv_at(const float *__restrict__ Z, size_t base,
					 int Cout, int k, int co, float bias)
{
	const size_t ld = (size_t)k * Cout;
	float v = bias;

	for (int j = 0; j < k; j++)
		v += Z[(base + j) * ld + (size_t)j * Cout + co];
	return v;
}

__global__ void k_conv_epilogue(const float *__restrict__ Z, int Lin_pad, int Lout,
				int Cout, int k, const float *__restrict__ b, int pad,
				float *__restrict__ y)
{
	const int rows = Lout + 2 * pad;
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;
	const size_t i = blockIdx.y;

	if (idx >= rows * Cout)
		return;
	const int co = idx % Cout, t = idx / Cout - pad;
	float v = 0.0f;

	if (t >= 0 && t < Lout)
		v = fmaxf(conv_at(Z, i * Lin_pad + t, Cout, k, co, b[co]), 0.0f);
	y[i * rows * Cout + idx] = v;
}

void mtlz_cu_conv_epilogue(const float *Z, int n, int Lin_pad, int Lout, int Cout, int k,
			   const float *b, int pad, float *y, cudaStream_t s)
{
	const int per = (Lout + 2 * pad) * Cout;

	for (int i0 = 0; i0 < n; i0 += SPECTRA_Y) {
		dim3 grid(mtlz_blocks((size_t)per, TPB), MTLZ_MIN(n - i0, SPECTRA_Y));

		k_conv_epilogue<<<grid, TPB, 0, s>>>(Z + (size_t)i0 * Lin_pad * k * Cout, Lin_pad,
						     Lout, Cout, k, b, pad, y + (size_t)i0 * per);
	}
}

__global__ void k_conv_epilogue_pool(const float *__restrict__ Z, int Lin_pad,
				     int Lout, int Cout, int k, const float *__restrict__ b,
				     int pool, int pad, float *__restrict__ y)
{
	const int Lp = (Lout - pool) / pool + 1, rows = Lp + 2 * pad;
	const int idx = blockIdx.x * blockDim.x + threadIdx.x;
	const size_t i = blockIdx.y;

	if (idx >= rows * Cout)
		return;
	const int co = idx % Cout, q = idx / Cout - pad;
	float v = 0.0f;

	if (q >= 0 && q < Lp) {
		const size_t base = i * Lin_pad + (size_t)q * pool;
		const float bias = b[co];

		v = conv_at(Z, base, Cout, k, co, bias);
		for (int u = 1; u < pool; u++)
			v = fmaxf(v, conv_at(Z, base + u, Cout, k, co, bias));
		v = fmaxf(v, 0.0f); /* relu(max) = max(relu) */
	}
	y[i * rows * Cout + idx] = v;
}

void mtlz_cu_conv_epilogue_pool(const float *Z, int n, int Lin_pad, int Lout, int Cout,
				int k, const float *b, int pool, int pad, float *y,
				cudaStream_t s)
{
	const int Lp = (Lout - pool) / pool + 1, per = (Lp + 2 * pad) * Cout;

	for (int i0 = 0; i0 < n; i0 += SPECTRA_Y) {
		dim3 grid(mtlz_blocks((size_t)per, TPB), MTLZ_MIN(n - i0, SPECTRA_Y));

		k_conv_epilogue_pool<<<grid, TPB, 0, s>>>(Z + (size_t)i0 * Lin_pad * k * Cout,
							  Lin_pad, Lout, Cout, k, b, pool, pad,
							  y + (size_t)i0 * per);
	}
}

__global__ void k_gap(const float *__restrict__ act, int n, int L, int C, int pad,
		      float *__restrict__ g)
{
	size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= (size_t)n * C)
		return;
	const int c = (int)(idx % C), i = (int)(idx / C);
	const float *a = act + ((size_t)i * (L + 2 * pad) + pad) * C + c;
	float s = 0.0f;

	for (int t = 0; t < L; t++)
		s += a[(size_t)t * C];
	g[idx] = s / (float)L;
}

void mtlz_cu_gap(const float *act, int n, int L, int C, int pad, float *g, cudaStream_t s)
{
	k_gap<<<mtlz_blocks((size_t)n * C, TPB), TPB, 0, s>>>(act, n, L, C, pad, g);
}

/* One block per spectrum; C + H floats of shared memory. */
__global__ void k_attention(const float *__restrict__ g, int C, int H,
			    const float *__restrict__ w1, const float *__restrict__ b1,
			    const float *__restrict__ w2, const float *__restrict__ b2,
			    float *__restrict__ feat)
{
	extern __shared__ float sh[];
	float *gs = sh, *hs = sh + C;
	const int i = blockIdx.x;

	for (int c = threadIdx.x; c < C; c += blockDim.x)
		gs[c] = g[(size_t)i * C + c];
	__syncthreads();
	for (int j = threadIdx.x; j < H; j += blockDim.x) {
		float a = b1[j];

		for (int c = 0; c < C; c++)
			a += w1[(size_t)j * C + c] * gs[c];
		hs[j] = fmaxf(a, 0.0f);
	}
	__syncthreads();
	for (int c = threadIdx.x; c < C; c += blockDim.x) {
		float a = b2[c];

		for (int j = 0; j < H; j++)
			a += w2[(size_t)c * H + j] * hs[j];
		feat[(size_t)i * C + c] = gs[c] / (1.0f + expf(-a));
	}
}

void mtlz_cu_attention(const float *g, int n, int C, int H, const float *w1,
		       const float *b1, const float *w2, const float *b2, float *feat,
		       cudaStream_t s)
{
	const int threads = C < 1024 ? ((C + 31) / 32) * 32 : 1024;

	k_attention<<<n, threads, (size_t)(C + H) * sizeof(float), s>>>(g, C, H, w1, b1, w2,
									 b2, feat);
}

__global__ void k_heads_fused(const float *__restrict__ feat, struct mtlz_cu_heads h)
{
	extern __shared__ float sh[];
	float *cur = sh, *nxt = sh + h.width;
	const int i = blockIdx.x, hd = blockIdx.y, lane = threadIdx.x & 31,
		  warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	const int C = h.in[hd][0];

	for (int k = threadIdx.x; k < C; k += blockDim.x)
		cur[k] = feat[(size_t)i * C + k];
	__syncthreads();
	for (int l = 0; l < h.n_layers[hd]; l++) {
		const int in = h.in[hd][l], out = h.out[hd][l], last = l == h.n_layers[hd] - 1;
		const float *W = h.w[hd][l];

		for (int o = warp; o < out; o += warps) {
			float a = 0.0f;

			for (int k = lane; k < in; k += 32)
				a += W[(size_t)o * in + k] * cur[k];
			for (int off = 16; off > 0; off >>= 1)
				a += __shfl_down_sync(0xffffffffu, a, off);
			if (lane == 0) {
				a += h.b[hd][l][o];
				if (last)
					h.y[hd][(size_t)i * out + o] = a;
				else
					nxt[o] = fmaxf(a, 0.0f);
			}
		}
		__syncthreads();
		{
			float *t = cur;

			cur = nxt;
			nxt = t;
		}
	}
}

void mtlz_cu_heads_fused(const float *feat, int n, const struct mtlz_cu_heads *h,
			 cudaStream_t s)
{
	dim3 grid(n, 2);

	k_heads_fused<<<grid, 256, 2 * (size_t)h->width * sizeof(float), s>>>(feat, *h);
}

__global__ void k_bias_act(float *__restrict__ y, size_t rows, int cols,
			   const float *__restrict__ b, int relu)
{
	size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= rows * cols)
		return;
	float v = y[idx] + b[idx % cols];

	y[idx] = relu ? fmaxf(v, 0.0f) : v;
}

void mtlz_cu_bias_act(float *y, size_t rows, int cols, const float *b, int relu,
		      cudaStream_t s)
{
	k_bias_act<<<mtlz_blocks(rows * cols, TPB), TPB, 0, s>>>(y, rows, cols, b, relu);
}

__global__ void k_mc_keys(const float *__restrict__ x, int n, int L, uint64_t seed,
			  uint64_t *__restrict__ key)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;

	if (i < n)
		key[i] = mtlz_mc_key(x + (size_t)i * L, L, seed);
}

void mtlz_cu_mc_keys(const float *x, int n, int L, uint64_t seed, uint64_t *key,
		     cudaStream_t s)
{
	k_mc_keys<<<mtlz_blocks((size_t)n, 64), 64, 0, s>>>(x, n, L, seed, key);
}

__global__ void k_mc_rows(const float *__restrict__ feat, const uint64_t *__restrict__ key,
			  int n, int mc, int C, uint32_t keep16, float scale,
			  float *__restrict__ rows)
{
	const size_t per = (size_t)mc * C;
	size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx >= (size_t)n * per)
		return;
	const int i = (int)(idx / per);
	const size_t k = idx % per;
	const int c = (int)(k % C);

	rows[idx] = mtlz_mc_keep(key[i], k, keep16) ? feat[(size_t)i * C + c] * scale : 0.0f;
}

void mtlz_cu_mc_rows(const float *feat, const uint64_t *key, int n, int mc, int C,
		     uint32_t keep16, float scale, float *rows, cudaStream_t s)
{
	const size_t total = (size_t)n * mc * C;

	k_mc_rows<<<mtlz_blocks(total, TPB), TPB, 0, s>>>(feat, key, n, mc, C, keep16, scale,
							   rows);
}

__global__ void k_mc_sigma(const float *__restrict__ v, int n, int mc, double *__restrict__ sigma)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;

	if (i >= n)
		return;
	const float *p = v + (size_t)i * mc;
	double s = 0, s2 = 0;

	for (int t = 0; t < mc; t++)
		s += p[t];
	s /= mc;
	for (int t = 0; t < mc; t++)
		s2 += (p[t] - s) * (p[t] - s);
	sigma[i] = sqrt(s2 / mc);
}

void mtlz_cu_mc_sigma(const float *v, int n, int mc, double *sigma, cudaStream_t s)
{
	k_mc_sigma<<<mtlz_blocks((size_t)n, 64), 64, 0, s>>>(v, n, mc, sigma);
}

__global__ void k_fill(float *p, size_t n, float v)
{
	size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx < n)
		p[idx] = v;
}

void mtlz_cu_fill(float *p, size_t n, float v, cudaStream_t s)
{
	if (n)
		k_fill<<<mtlz_blocks(n, TPB), TPB, 0, s>>>(p, n, v);
}

__global__ void k_poison(float *p, size_t n)
{
	size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;

	if (idx < n)
		p[idx] = __int_as_float(0x7fc00000);
}

void mtlz_cu_poison(float *p, size_t n, cudaStream_t s)
{
	if (n)
		k_poison<<<mtlz_blocks(n, TPB), TPB, 0, s>>>(p, n);
}
