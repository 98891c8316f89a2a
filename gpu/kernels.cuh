/*
 * kernels.cuh - the CUDA engine's own kernels; the matrix work is cuBLAS
 * (engine_cuda.cu). Activations are channels-last with `pad` zero rows
 * around each spectrum: act[i][pad + t][c], row stride C.
 *
 * A convolution of Cin -> Cout channels, kernel k, is one GEMM
 *   Z[i*Lin_pad + r][j*Cout + co] = sum_ci act[i][r][ci] * W[co][ci][j]
 * (all k taps side by side, so N = k*Cout even where Cout is small), then
 * an epilogue that adds the taps at their shifts, the bias and the ReLU,
 * and for the second convolution of a block the max-pool:
 *   y[i][t][co] = relu(b[co] + sum_j Z[i*Lin_pad + t + j][j*Cout + co]).
 * Each launch writes every element of its output, padding rows included.
 */
#ifndef MTLZ_GPU_KERNELS_CUH
#define MTLZ_GPU_KERNELS_CUH

#include <cuda_runtime.h>
#include <stdint.h>

/* Cin = 1 first layer straight from the unpadded input x[n][L] (no GEMM:
 * K = 1 would waste it). W[Cout][1][k]. */
void mtlz_cu_conv_first(const float *x, int n, int L, const float *w, const float *b,
			int Cout, int k, int pad, float *y, cudaStream_t s);
/* Epilogue, no pool: y[n][Lout + 2 pad][Cout]. */
void mtlz_cu_conv_epilogue(const float *Z, int n, int Lin_pad, int Lout, int Cout, int k,
			   const float *b, int pad, float *y, cudaStream_t s);
/* Epilogue with max-pool (window = stride = pool): y[n][Lp + 2 pad][Cout]. */
void mtlz_cu_conv_epilogue_pool(const float *Z, int n, int Lin_pad, int Lout, int Cout,
				int k, const float *b, int pool, int pad, float *y,
				cudaStream_t s);
/* Fused direct convolution (conv_direct.cu): in[n][lin_pad][cin] ->
 * relu(conv + b) [max-pooled when pool > 1] into out[n][rows + 2 pad][cout],
 * padding rows zeroed; w is [k][cin][cout]. _ok says whether a layer shape
 * is supported (k = 3, cin % 8 == 0, cout % 16 == 0, pool <= 3). */
int mtlz_cu_conv_direct_ok(int cin, int cout, int k, int pool);
void mtlz_cu_conv_direct(const float *in, int n, int lin_pad, int cin, const float *w,
			 const float *b, int cout, int lout, int pool, int pad, float *out,
			 cudaStream_t s);
/* The same with the network's first layer (Cin = 1, k = 3, weights w1
 * [cin][1][3], bias b1) computed on the fly from the raw spectra x[n][L]:
 * the first layer's output is never written. */
void mtlz_cu_conv_direct_first(const float *x, int L, const float *w1, const float *b1,
			       int n, int lin_pad, int cin, const float *w, const float *b,
			       int cout, int lout, int pool, int pad, float *out, cudaStream_t s);
/* The same two on TF32 tensor cores (mma.sync, sm_80+; precision=tf32
 * only): _ok needs cin % 16 == 0. */
int mtlz_cu_conv_mma_ok(int cin, int cout, int k, int pool);
/* Nonzero when this binary holds the tensor-core code (built for sm_80+;
 * a device of compute capability >= 8 is needed as well). */
int mtlz_cu_mma_built(void);
void mtlz_cu_conv_mma(const float *in, int n, int lin_pad, int cin, const float *w,
		      const float *b, int cout, int lout, int pool, int pad, float *out,
		      cudaStream_t s);
void mtlz_cu_conv_mma_first(const float *x, int L, const float *w1, const float *b1, int n,
			    int lin_pad, int cin, const float *w, const float *b, int cout,
			    int lout, int pool, int pad, float *out, cudaStream_t s);
/* The input gradient of a training convolution as a transposed one on the
 * same tensor cores: dx[i][t][c] = [mask[i][pad + t][c] > 0] *
 * sum_j sum_co dy[i][t + j - shift][co] wf[j][co][c] for t < n_out, zero
 * for n_out <= t < rows; dy rows outside [0, rows) read as zero. dy and dx
 * have `rows` rows per spectrum; cin = the layer's cout, cout = its cin;
 * wf[j][co][ci] = W[co][ci][k - 1 - j]; shift = k - 1 - pad; mask may be
 * NULL. */
void mtlz_cu_conv_mma_dx(const float *dy, int n, int rows, int cin, const float *wf, int cout,
			 int n_out, int shift, int pad, const float *mask, float *dx,
			 cudaStream_t s);
/* Global average pool of act[n][L + 2 pad][C] over the L inner rows. */
void mtlz_cu_gap(const float *act, int n, int L, int C, int pad, float *g, cudaStream_t s);
/* Squeeze-and-excitation on the pooled vector: feat = g * sigmoid(W2 relu(W1 g + b1) + b2)
 * (GAP(x * s) = s * GAP(x), as in the CPU engine). H = C / r <= 1024. */
void mtlz_cu_attention(const float *g, int n, int C, int H, const float *w1,
		       const float *b1, const float *w2, const float *b2, float *feat,
		       cudaStream_t s);
/* Both heads of n spectra in one launch (small batches: one block per
 * spectrum and head, a warp per output unit), ReLU between layers.
 * out[0] = logits [n][out of class head], out[1] = metal [n]. */
struct mtlz_cu_heads {
	int n_layers[2];
	int in[2][5], out[2][5];
	const float *w[2][5], *b[2][5];
	float *y[2];
	int width; /* widest layer */
};
void mtlz_cu_heads_fused(const float *feat, int n, const struct mtlz_cu_heads *h,
			 cudaStream_t s);
/* y[rows][cols] += b[cols]; relu when asked. */
void mtlz_cu_bias_act(float *y, size_t rows, int cols, const float *b, int relu,
		      cudaStream_t s);
/* MC-dropout keys: key[i] = mtlz_mc_key(x[i], L, seed). */
void mtlz_cu_mc_keys(const float *x, int n, int L, uint64_t seed, uint64_t *key,
		     cudaStream_t s);
/* rows[i*mc + t][c] = keep(key[i], t*C + c) ? feat[i][c] / keep : 0. */
void mtlz_cu_mc_rows(const float *feat, const uint64_t *key, int n, int mc, int C,
		     uint32_t keep16, float scale, float *rows, cudaStream_t s);
/* sigma[i] = population std of v[i*mc .. i*mc + mc) (double sums). */
void mtlz_cu_mc_sigma(const float *v, int n, int mc, double *sigma, cudaStream_t s);
/* Fills n floats with v (autotuning inputs). */
void mtlz_cu_fill(float *p, size_t n, float v, cudaStream_t s);
/* Fills n floats with NaN (poison mode: proves every output is written). */
void mtlz_cu_poison(float *p, size_t n, cudaStream_t s);

#endif
