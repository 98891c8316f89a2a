/*
 * kernels_cpu.c - see kernels_cpu.h. Two implementations of each hot kernel:
 * portable C, and AVX2/FMA intrinsics compiled with a per-function target
 * attribute so that one binary runs everywhere and picks at run time.
 */
#include "kernels_cpu.h"

#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MR 6 /* output positions per micro-tile (AVX2: 6 x 2 ymm accumulators) */

int mtlz_isa_detect(void)
{
	const char *env = getenv("MTLZ_CPU_ISA");

	if (env && strcmp(env, "generic") == 0)
		return MTLZ_ISA_GENERIC;
#if defined(__x86_64__) || defined(__i386__)
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
		return MTLZ_ISA_AVX2;
#endif
	return MTLZ_ISA_GENERIC;
}

const char *mtlz_isa_name(int isa)
{
	return isa == MTLZ_ISA_AVX2 ? "avx2" : "generic";
}

void mtlz_pack_conv(const float *w, const float *b, int cout, int cin, int k,
		    int cin_pad, float *wp, float *bp)
{
	const int cout_pad = mtlz_round_up(cout, MTLZ_NR);
	const int K = k * cin_pad;

	memset(wp, 0, (size_t)cout_pad * (size_t)K * sizeof(float));
	memset(bp, 0, (size_t)cout_pad * sizeof(float));
	for (int o = 0; o < cout; o++) {
		float *panel = wp + (size_t)(o / MTLZ_NR) * (size_t)K * MTLZ_NR;

		for (int i = 0; i < cin; i++)
			for (int t = 0; t < k; t++)
				panel[(size_t)(t * cin_pad + i) * MTLZ_NR + o % MTLZ_NR] =
					w[((size_t)o * cin + i) * k + t];
		bp[o] = b[o];
	}
}

void mtlz_pack_conv_rows(const float *wp, int K, int cout_pad, float *wrow)
{
	for (size_t kk = 0; kk < (size_t)K; kk++)
		for (int o = 0; o < cout_pad; o++)
			wrow[kk * (size_t)cout_pad + (size_t)o] =
				wp[(size_t)(o / MTLZ_NR) * (size_t)K * MTLZ_NR +
				   kk * MTLZ_NR + (size_t)(o % MTLZ_NR)];
}

/* ---- portable path ---------------------------------------------------- */

static void conv_generic(const float *x, int cin, int K, int l0, int l1,
			 const float *wp, const float *bp, int cout_pad,
			 float *y, int ldy, int relu)
{
	for (int n0 = 0; n0 < cout_pad; n0 += MTLZ_NR) {
		const float *w = wp + (size_t)n0 * K;

		for (int l = l0; l < l1; l++) {
			const float *a = x + (size_t)l * cin;
			float acc[MTLZ_NR];

			for (int j = 0; j < MTLZ_NR; j++)
				acc[j] = bp[n0 + j];
			for (int kk = 0; kk < K; kk++)
				for (int j = 0; j < MTLZ_NR; j++)
					acc[j] += a[kk] * w[kk * MTLZ_NR + j];
			for (int j = 0; j < MTLZ_NR; j++)
				y[(size_t)l * ldy + n0 + j] =
					relu && acc[j] < 0.0f ? 0.0f : acc[j];
		}
	}
}

/* ---- AVX2 + FMA path -------------------------------------------------- */

#if defined(__x86_64__)
/* mr rows x 16 channels; mr is a constant after inlining, so the
 * accumulators live in registers. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
ukr_avx2(const float *a, int cin, int K, const float *w, const float *b,
	 float *y, int ldy, int relu, const int mr)
{
	__m256 acc[MR][2];

#pragma GCC unroll 6
	for (int r = 0; r < mr; r++) {
		acc[r][0] = _mm256_loadu_ps(b);
		acc[r][1] = _mm256_loadu_ps(b + 8);
	}
	for (int kk = 0; kk < K; kk++) {
		const __m256 w0 = _mm256_load_ps(w + kk * MTLZ_NR);
		const __m256 w1 = _mm256_load_ps(w + kk * MTLZ_NR + 8);

#pragma GCC unroll 6
		for (int r = 0; r < mr; r++) {
			const __m256 v = _mm256_broadcast_ss(a + (size_t)r * cin + kk);

			acc[r][0] = _mm256_fmadd_ps(v, w0, acc[r][0]);
			acc[r][1] = _mm256_fmadd_ps(v, w1, acc[r][1]);
		}
	}
	if (relu) {
		const __m256 z = _mm256_setzero_ps();

#pragma GCC unroll 6
		for (int r = 0; r < mr; r++) {
			acc[r][0] = _mm256_max_ps(acc[r][0], z);
			acc[r][1] = _mm256_max_ps(acc[r][1], z);
		}
	}
#pragma GCC unroll 6
	for (int r = 0; r < mr; r++) {
		_mm256_storeu_ps(y + (size_t)r * ldy, acc[r][0]);
		_mm256_storeu_ps(y + (size_t)r * ldy + 8, acc[r][1]);
	}
}

__attribute__((target("avx2,fma"))) static void
conv_avx2(const float *x, int cin, int K, int l0, int l1, const float *wp,
	  const float *bp, int cout_pad, float *y, int ldy, int relu)
{
	for (int n0 = 0; n0 < cout_pad; n0 += MTLZ_NR) {
		const float *w = wp + (size_t)n0 * K;
		const float *b = bp + n0;
		int l = l0;

		for (; l + MR <= l1; l += MR)
			ukr_avx2(x + (size_t)l * cin, cin, K, w, b,
				 y + (size_t)l * ldy + n0, ldy, relu, MR);
		switch (l1 - l) {
		case 5: ukr_avx2(x + (size_t)l * cin, cin, K, w, b, y + (size_t)l * ldy + n0, ldy, relu, 5); break;
		case 4: ukr_avx2(x + (size_t)l * cin, cin, K, w, b, y + (size_t)l * ldy + n0, ldy, relu, 4); break;
		case 3: ukr_avx2(x + (size_t)l * cin, cin, K, w, b, y + (size_t)l * ldy + n0, ldy, relu, 3); break;
		case 2: ukr_avx2(x + (size_t)l * cin, cin, K, w, b, y + (size_t)l * ldy + n0, ldy, relu, 2); break;
		case 1: ukr_avx2(x + (size_t)l * cin, cin, K, w, b, y + (size_t)l * ldy + n0, ldy, relu, 1); break;
		default: break;
		}
	}
}
#endif

void mtlz_conv_nlc(int isa, const float *x, int cin, int k, int l0, int l1,
		   const float *wp, const float *bp, int cout_pad, float *y,
		   int ldy, int relu)
{
#if defined(__x86_64__)
	if (isa == MTLZ_ISA_AVX2) {
		conv_avx2(x, cin, k * cin, l0, l1, wp, bp, cout_pad, y, ldy, relu);
		return;
	}
#endif
	conv_generic(x, cin, k * cin, l0, l1, wp, bp, cout_pad, y, ldy, relu);
}

/* ---- weight gradient ------------------------------------------------- */

#define DW_CHUNK 128 /* rows of x and dy per pass over the tiles of c */

static void dw_generic(const float *x, int cin, int K, int n, const float *dy,
		       int ldd, int cout_pad, float *c)
{
	for (int g = 0; g < n; g++) {
		const float *a = x + (size_t)g * cin, *d = dy + (size_t)g * ldd;

		for (int kk = 0; kk < K; kk++) {
			const float v = a[kk];
			float *cr = c + (size_t)kk * cout_pad;

			for (int o = 0; o < cout_pad; o++)
				cr[o] += v * d[o];
		}
	}
}

#if defined(__x86_64__)
/* c[r][0..16) += sum_{g<n} x[g*cin + r] * d[g*ldd + 0..16), r < mr. */
__attribute__((target("avx2,fma"), always_inline)) static inline void
ukr_dw_avx2(const float *x, int cin, const float *d, int ldd, int n, float *c,
	    int ldc, const int mr)
{
	__m256 acc[MR][2];

#pragma GCC unroll 6
	for (int r = 0; r < mr; r++) {
		acc[r][0] = _mm256_setzero_ps();
		acc[r][1] = _mm256_setzero_ps();
	}
	for (int g = 0; g < n; g++) {
		const __m256 w0 = _mm256_loadu_ps(d + (size_t)g * ldd);
		const __m256 w1 = _mm256_loadu_ps(d + (size_t)g * ldd + 8);

#pragma GCC unroll 6
		for (int r = 0; r < mr; r++) {
			const __m256 v = _mm256_broadcast_ss(x + (size_t)g * cin + r);

			acc[r][0] = _mm256_fmadd_ps(v, w0, acc[r][0]);
			acc[r][1] = _mm256_fmadd_ps(v, w1, acc[r][1]);
		}
	}
#pragma GCC unroll 6
	for (int r = 0; r < mr; r++) {
		float *cr = c + (size_t)r * ldc;

		_mm256_storeu_ps(cr, _mm256_add_ps(_mm256_loadu_ps(cr), acc[r][0]));
		_mm256_storeu_ps(cr + 8, _mm256_add_ps(_mm256_loadu_ps(cr + 8), acc[r][1]));
	}
}

__attribute__((target("avx2,fma"))) static void
dw_avx2(const float *x, int cin, int K, int n, const float *dy, int ldd,
	int cout_pad, float *c)
{
	for (int g0 = 0; g0 < n; g0 += DW_CHUNK) {
		const int gn = n - g0 < DW_CHUNK ? n - g0 : DW_CHUNK;
		const float *xa = x + (size_t)g0 * cin, *da = dy + (size_t)g0 * ldd;

		for (int o = 0; o < cout_pad; o += MTLZ_NR) {
			int kk = 0;

			for (; kk + MR <= K; kk += MR)
				ukr_dw_avx2(xa + kk, cin, da + o, ldd, gn,
					    c + (size_t)kk * cout_pad + o, cout_pad, MR);
			switch (K - kk) {
			case 5: ukr_dw_avx2(xa + kk, cin, da + o, ldd, gn, c + (size_t)kk * cout_pad + o, cout_pad, 5); break;
			case 4: ukr_dw_avx2(xa + kk, cin, da + o, ldd, gn, c + (size_t)kk * cout_pad + o, cout_pad, 4); break;
			case 3: ukr_dw_avx2(xa + kk, cin, da + o, ldd, gn, c + (size_t)kk * cout_pad + o, cout_pad, 3); break;
			case 2: ukr_dw_avx2(xa + kk, cin, da + o, ldd, gn, c + (size_t)kk * cout_pad + o, cout_pad, 2); break;
			case 1: ukr_dw_avx2(xa + kk, cin, da + o, ldd, gn, c + (size_t)kk * cout_pad + o, cout_pad, 1); break;
			default: break;
			}
		}
	}
}
#endif

void mtlz_conv_dw_nlc(int isa, const float *x, int cin, int k, int n,
		      const float *dy, int ldd, int cout_pad, float *c)
{
#if defined(__x86_64__)
	if (isa == MTLZ_ISA_AVX2) {
		dw_avx2(x, cin, k * cin, n, dy, ldd, cout_pad, c);
		return;
	}
#endif
	dw_generic(x, cin, k * cin, n, dy, ldd, cout_pad, c);
}

static void bias_act(float *y, int rows, int ldy, const float *b, int n, int relu)
{
	for (int r = 0; r < rows; r++) {
		float *row = y + (size_t)r * ldy;

		for (int j = 0; j < n; j++) {
			const float v = row[j] + b[j];

			row[j] = relu && v < 0.0f ? 0.0f : v;
		}
	}
}

void mtlz_conv_nlc_blas(const float *x, int cin, int k, int l0, int l1,
			const float *wrow, const float *bp, int cout_pad,
			float *y, int ldy, int relu, float *col)
{
	const int K = k * cin, M = l1 - l0;

	if (M <= 0)
		return;
	for (int l = l0; l < l1; l++)
		memcpy(col + (size_t)(l - l0) * K, x + (size_t)l * cin,
		       (size_t)K * sizeof(float));
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, cout_pad, K,
		    1.0f, col, K, wrow, cout_pad, 0.0f, y + (size_t)l0 * ldy, ldy);
	bias_act(y + (size_t)l0 * ldy, M, ldy, bp, cout_pad, relu);
}

void mtlz_maxpool_nlc(const float *x, int C, int pool, int l0, int l1, float *y)
{
	for (int l = l0; l < l1; l++) {
		const float *in = x + (size_t)l * pool * C;
		float *out = y + (size_t)l * C;

		memcpy(out, in, (size_t)C * sizeof(float));
		for (int i = 1; i < pool; i++)
			for (int c = 0; c < C; c++)
				out[c] = in[(size_t)i * C + c] > out[c] ?
						 in[(size_t)i * C + c] : out[c];
	}
}

void mtlz_gap_nlc(const float *x, int len, int C, float *out)
{
	double acc[4096];

	for (int c0 = 0; c0 < C; c0 += 4096) {
		const int cn = C - c0 < 4096 ? C - c0 : 4096;

		for (int c = 0; c < cn; c++)
			acc[c] = 0.0;
		for (int l = 0; l < len; l++)
			for (int c = 0; c < cn; c++)
				acc[c] += x[(size_t)l * C + c0 + c];
		for (int c = 0; c < cn; c++)
			out[c0 + c] = (float)(acc[c] / len);
	}
}

void mtlz_linear(const float *x, int rows, int in, const float *w,
		 const float *b, int out, float *y, int relu)
{
	if (rows > 1) {
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in,
			    1.0f, x, in, w, in, 0.0f, y, out);
	} else {
		for (int o = 0; o < out; o++) {
			float acc = 0.0f;

			for (int i = 0; i < in; i++)
				acc += x[i] * w[(size_t)o * in + i];
			y[o] = acc;
		}
	}
	bias_act(y, rows, out, b, out, relu);
}
