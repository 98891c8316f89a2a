/*
 * kernels_cpu.h - the CPU engine's layer kernels, on channels-last
 * ("NLC": one row of C floats per position) activations.
 *
 * Why channels-last: for a k-tap convolution the im2col row of output
 * position l is the k*Cin floats starting at input row l, contiguous in
 * memory, so the convolution is a GEMM whose A operand is the activation
 * itself (rows overlapping, stride Cin) and needs no copy. Our AVX2/FMA
 * micro-kernel (6 positions x 16 output channels in 12 ymm accumulators)
 * exploits that; OpenBLAS cannot (it requires lda >= K), so the BLAS path
 * pays an explicit im2col. Which path runs for which layer is chosen by
 * measurement (mtlz bench --layers; see docs/engine.md).
 *
 * Weights are packed once per model into panels of 16 output channels:
 * panel p holds [k*Cin][16] floats, row kk = tap * Cin + ci. Channel counts
 * are padded to a multiple of 16 with zero weights and biases, so padded
 * channels stay exactly zero through ReLU and max-pool.
 *
 * @locality any thread; kernels touch only the memory they are given.
 */
#ifndef MTLZ_KERNELS_CPU_H
#define MTLZ_KERNELS_CPU_H

#include <stddef.h>

#define MTLZ_NR 16 /* output channels per weight panel */

enum mtlz_isa {
	MTLZ_ISA_GENERIC = 0, /* portable C (compiler-vectorised for the baseline ISA) */
	MTLZ_ISA_AVX2 = 1,    /* AVX2 + FMA micro-kernels */
};

/* The ISA used by default: AVX2 when the CPU has AVX2 and FMA, unless the
 * environment variable MTLZ_CPU_ISA=generic forces the portable path. */
int mtlz_isa_detect(void);
const char *mtlz_isa_name(int isa);

static inline int mtlz_round_up(int x, int m)
{
	return (x + m - 1) / m * m;
}

/* Packs a PyTorch conv weight [cout][cin][k] (+ bias) into panels (above):
 * wp has (cout_pad/16) * k*cin_pad * 16 floats, bp has cout_pad floats.
 * cin_pad >= cin (input channels beyond cin get zero weights). */
void mtlz_pack_conv(const float *w, const float *b, int cout, int cin, int k,
		    int cin_pad, float *wp, float *bp);

/* The same weights as one row-major [K][cout_pad] matrix (K = k*cin_pad),
 * the B operand of the BLAS path. */
void mtlz_pack_conv_rows(const float *wp, int K, int cout_pad, float *wrow);

/* y[l][0..cout_pad) = act(b + sum_kk x[l*cin + kk] * wp[kk][.]) for l in
 * [l0, l1), kk in [0, k*cin). x holds the already padded input (row r of x
 * is input position r - pad); y has row stride ldy. relu: apply max(0, .). */
void mtlz_conv_nlc(int isa, const float *x, int cin, int k, int l0, int l1,
		   const float *wp, const float *bp, int cout_pad, float *y,
		   int ldy, int relu);

/* Same result through OpenBLAS sgemm on an explicit im2col copy (col must
 * hold (l1-l0) * k*cin floats); wrow is the weight as one row-major
 * [k*cin][cout_pad] matrix. Single-threaded BLAS call. */
void mtlz_conv_nlc_blas(const float *x, int cin, int k, int l0, int l1,
			const float *wrow, const float *bp, int cout_pad,
			float *y, int ldy, int relu, float *col);

/* The weight gradient of mtlz_conv_nlc, accumulated:
 *   c[kk][o] += sum_{g<n} x[g*cin + kk] * dy[g*ldd + o],  kk < k*cin, o < cout_pad
 * x is the padded input (row g of x = the first tap of output g), dy the
 * gradient of the n outputs (row stride ldd >= cout_pad, cout_pad a
 * multiple of 16), c the [k*cin][cout_pad] gradient in the panels' row
 * order (kk = tap * cin + ci). Rows are taken in chunks so that x and dy
 * stay in cache while every tile of c passes over them. */
void mtlz_conv_dw_nlc(int isa, const float *x, int cin, int k, int n,
		      const float *dy, int ldd, int cout_pad, float *c);

/* y[l][c] = max_{i<pool} x[l*pool + i][c], l in [l0, l1), c < C. */
void mtlz_maxpool_nlc(const float *x, int C, int pool, int l0, int l1, float *y);

/* mean over rows: out[c] = (1/len) sum_l x[l][c] (double accumulation). */
void mtlz_gap_nlc(const float *x, int len, int C, float *out);

/* y[r][o] = act(b[o] + sum_i x[r][i] * w[o][i]) for r < rows; w is the
 * PyTorch Linear layout [out][in]. Uses sgemm when rows > 1. */
void mtlz_linear(const float *x, int rows, int in, const float *w,
		 const float *b, int out, float *y, int relu);

#endif
