/*
 * conv_direct.cu - a fused direct convolution for the long, narrow layers
 * (the first blocks: thousands of rows, 16-64 channels), where the GEMM
 * path's tap-stacked intermediate Z (k times the output) costs more memory
 * traffic than the arithmetic: one kernel reads the input once, keeps the
 * k*Cin x Cout product in registers and writes the activated (and pooled)
 * output once.
 *
 * A block owns BM consecutive output rows of one spectrum and BN output
 * channels. Per step of BK input channels it stages the BM + 2 input rows
 * (channel-major, so a thread's TM rows are consecutive words) and the
 * 3 x BK x BN weights in shared memory; each thread accumulates a TM x TN
 * register tile. Tiles never straddle spectra, and TM is a multiple of the
 * pool window, so a thread's rows hold whole pooling windows: the pool is
 * done in registers. Blocks at a spectrum's ends write its zero padding rows.
 *
 * Supported: k = 3, Cin % 8 == 0, Cout % 16 == 0, pool in {1, 2, 3}.
 *
 * The _first variant also does the network's first layer (Cin = 1, k = 3)
 * on the fly while staging the input tile: it reads the raw spectrum, and
 * the first layer's output (16 channels x every pixel, the largest
 * activation of the model) never goes through device memory.
 * engine_cuda.cu times this against the GEMM path per layer and keeps the
 * faster (docs/cuda.md).
 */
#include "common.cuh"
#include "kernels.cuh"

#define KW 3
#define BK 8

/* The first layer, fused: raw spectra x[n][L], its weights [cin][1][3]. */
struct first_layer {
	const float *x, *w, *b;
	int L;
};

template <int BM, int BN, int TM, int TN, int POOL, bool FIRST>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
k_conv_direct(const float *__restrict__ in, int lin_pad, int cin, const float *__restrict__ w,
	      const float *__restrict__ b, int cout, int lout, int pad, int rows_out,
	      float *__restrict__ out, struct first_layer f)
{
	constexpr int NT = (BM / TM) * (BN / TN), AR = BM + KW - 1;
	__shared__ float As[BK][AR + 1];
	__shared__ __align__(16) float Bs[KW][BK][BN];
	const int tid = threadIdx.x, tn = tid % (BN / TN), tm = tid / (BN / TN);
	const int t0 = blockIdx.x * BM, n0 = blockIdx.z * BN;
	const size_t i = blockIdx.y;
	const float *src = in + i * lin_pad * cin;
	float acc[TM][TN];

#pragma unroll
	for (int m = 0; m < TM; m++)
#pragma unroll
		for (int q = 0; q < TN; q++)
			acc[m][q] = 0.0f;
	for (int c0 = 0; c0 < cin; c0 += BK) {
		if (FIRST) {
			/* padded first-layer row R = t0 + r: relu(conv(x)) inside,
			 * zero in the padding */
			const float *xs = f.x + i * f.L;
			const int l1 = lin_pad - 2 * pad;

			for (int e = tid; e < AR * BK; e += NT) {
				const int r = e / BK, kk = e % BK, t1 = t0 + r - pad;
				float v = 0.0f;

				if (t1 >= 0 && t1 < l1) {
					v = f.b[c0 + kk];
#pragma unroll
					for (int j = 0; j < KW; j++) {
						const int sx = t1 + j - pad;

						if (sx >= 0 && sx < f.L)
							v = fmaf(f.w[(c0 + kk) * KW + j], xs[sx], v);
					}
					v = fmaxf(v, 0.0f);
				}
				As[kk][r] = v;
			}
		} else
		for (int e = tid; e < AR * (BK / 4); e += NT) {
			const int r = e / (BK / 4), c4 = (e % (BK / 4)) * 4, row = t0 + r;
			float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

			if (row < lin_pad)
				v = *reinterpret_cast<const float4 *>(src + (size_t)row * cin + c0 + c4);
			As[c4 + 0][r] = v.x;
			As[c4 + 1][r] = v.y;
			As[c4 + 2][r] = v.z;
			As[c4 + 3][r] = v.w;
		}
		for (int e = tid; e < KW * BK * (BN / 4); e += NT) {
			const int col4 = (e % (BN / 4)) * 4, kk = (e / (BN / 4)) % BK,
				  j = e / ((BN / 4) * BK);

			*reinterpret_cast<float4 *>(&Bs[j][kk][col4]) =
				*reinterpret_cast<const float4 *>(w + ((size_t)j * cin + c0 + kk) * cout +
								  n0 + col4);
		}
		__syncthreads();
#pragma unroll
		for (int j = 0; j < KW; j++)
#pragma unroll
			for (int kk = 0; kk < BK; kk++) {
				float a[TM], bb[TN];

#pragma unroll
				for (int m = 0; m < TM; m++)
					a[m] = As[kk][tm * TM + m + j];
#pragma unroll
				for (int q = 0; q < TN; q++)
					bb[q] = Bs[j][kk][tn * TN + q];
#pragma unroll
				for (int m = 0; m < TM; m++)
#pragma unroll
					for (int q = 0; q < TN; q++)
						acc[m][q] = fmaf(a[m], bb[q], acc[m][q]);
			}
		__syncthreads();
	}

	float bias[TN];
	float *dst = out + i * rows_out * cout + n0 + tn * TN;
	const int r0 = t0 + tm * TM;

#pragma unroll
	for (int q = 0; q < TN; q++)
		bias[q] = b[n0 + tn * TN + q];
	if (POOL == 1) {
#pragma unroll
		for (int m = 0; m < TM; m++)
			if (r0 + m < lout)
#pragma unroll
				for (int q = 0; q < TN; q++)
					dst[(size_t)(pad + r0 + m) * cout + q] =
						fmaxf(acc[m][q] + bias[q], 0.0f);
	} else {
		const int Lp = (lout - POOL) / POOL + 1;

#pragma unroll
		for (int w0 = 0; w0 < TM; w0 += POOL) {
			const int qo = (r0 + w0) / POOL;

			if (qo < Lp)
#pragma unroll
				for (int q = 0; q < TN; q++) {
					float v = acc[w0][q];

#pragma unroll
					for (int u = 1; u < POOL; u++)
						v = fmaxf(v, acc[w0 + u][q]);
					dst[(size_t)(pad + qo) * cout + q] = fmaxf(v + bias[q], 0.0f);
				}
		}
	}
	/* zero padding rows at the spectrum's two ends */
	if (blockIdx.x == 0 || blockIdx.x == gridDim.x - 1) {
		float *o = out + i * rows_out * cout + n0;

		for (int e = tid; e < pad * BN; e += NT) {
			const int r = e / BN, col = e % BN;

			if (blockIdx.x == 0)
				o[(size_t)r * cout + col] = 0.0f;
			if (blockIdx.x == gridDim.x - 1)
				o[(size_t)(rows_out - pad + r) * cout + col] = 0.0f;
		}
	}
}

int mtlz_cu_conv_direct_ok(int cin, int cout, int k, int pool)
{
	return k == KW && cin % BK == 0 && cout % 16 == 0 && pool >= 1 && pool <= 3;
}

template <int BM, int BN, int TM, int TN, bool FIRST>
static void launch(const float *in, int n, int lin_pad, int cin, const float *w,
		   const float *b, int cout, int lout, int pool, int pad, float *out,
		   struct first_layer f, cudaStream_t s)
{
	const int Lp = pool > 1 ? (lout - pool) / pool + 1 : lout;
	const int rows_out = Lp + 2 * pad;
	const int tiles = (pool > 1 ? Lp * pool : lout + BM - 1) / BM +
			  (pool > 1 && (Lp * pool) % BM ? 1 : 0);

	for (int i0 = 0; i0 < n; i0 += 65535) {
		dim3 grid(MTLZ_MAX(tiles, 1), MTLZ_MIN(n - i0, 65535), cout / BN);
		const float *src = FIRST ? in : in + (size_t)i0 * lin_pad * cin;
		float *dst = out + (size_t)i0 * rows_out * cout;
		struct first_layer fi = f;

		if (FIRST)
			fi.x = f.x + (size_t)i0 * f.L;
		if (pool == 1)
			k_conv_direct<BM, BN, TM, TN, 1, FIRST><<<grid, (BM / TM) * (BN / TN), 0, s>>>(
				src, lin_pad, cin, w, b, cout, lout, pad, rows_out, dst, fi);
		else if (pool == 2)
			k_conv_direct<BM, BN, TM, TN, 2, FIRST><<<grid, (BM / TM) * (BN / TN), 0, s>>>(
				src, lin_pad, cin, w, b, cout, lout, pad, rows_out, dst, fi);
		else
			k_conv_direct<BM, BN, TM, TN, 3, FIRST><<<grid, (BM / TM) * (BN / TN), 0, s>>>(
				src, lin_pad, cin, w, b, cout, lout, pad, rows_out, dst, fi);
	}
}

template <bool FIRST>
static void dispatch(const float *in, int n, int lin_pad, int cin, const float *w,
		     const float *b, int cout, int lout, int pool, int pad, float *out,
		     struct first_layer f, cudaStream_t s)
{
	if (cout % 64 == 0)
		launch<192, 64, 6, 8, FIRST>(in, n, lin_pad, cin, w, b, cout, lout, pool, pad, out, f, s);
	else if (cout % 32 == 0)
		launch<192, 32, 6, 4, FIRST>(in, n, lin_pad, cin, w, b, cout, lout, pool, pad, out, f, s);
	else
		launch<288, 16, 6, 4, FIRST>(in, n, lin_pad, cin, w, b, cout, lout, pool, pad, out, f, s);
}

void mtlz_cu_conv_direct(const float *in, int n, int lin_pad, int cin, const float *w,
			 const float *b, int cout, int lout, int pool, int pad, float *out,
			 cudaStream_t s)
{
	struct first_layer f = { NULL, NULL, NULL, 0 };

	dispatch<false>(in, n, lin_pad, cin, w, b, cout, lout, pool, pad, out, f, s);
}

void mtlz_cu_conv_direct_first(const float *x, int L, const float *w1, const float *b1,
			       int n, int lin_pad, int cin, const float *w, const float *b,
			       int cout, int lout, int pool, int pad, float *out, cudaStream_t s)
{
	struct first_layer f = { x, w1, b1, L };

	dispatch<true>(NULL, n, lin_pad, cin, w, b, cout, lout, pool, pad, out, f, s);
}
