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

/* The first layer's activation relu(b + sum_j w[c][j] x[t1 + j - pad]) of
 * channel c at row t1 of spectrum x (zero outside the l1 rows: padding). */
__device__ __forceinline__ float first_layer_at(const struct first_layer &f, const float *xs,
						int t1, int l1, int pad, int c)
{
	float v = 0.0f;

	if (t1 >= 0 && t1 < l1) {
		v = f.b[c];
#pragma unroll
		for (int j = 0; j < KW; j++) {
			const int sx = t1 + j - pad;

			if (sx >= 0 && sx < f.L)
				v = fmaf(f.w[c * KW + j], xs[sx], v);
		}
		v = fmaxf(v, 0.0f);
	}
	return v;
}

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
				const int r = e / BK, kk = e % BK;

				As[kk][r] = first_layer_at(f, xs, t0 + r - pad, l1, pad, c0 + kk);
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

/*
 * TF32 tensor-core variant (precision=tf32 only): the same fused direct
 * convolution as an implicit GEMM on mma.sync.m16n8k8 (sm_80+). Per
 * spectrum, M = output rows, N = Cout, K = 3 taps x Cin; the K loop runs
 * over chunks of 16 input channels and, inside a chunk, over the taps: tap
 * j's A operand is the staged input slab shifted down by j rows, so the
 * im2col matrix is never formed, not even in shared memory.
 *
 * A block computes BM rows x BN channels with (BM/WM) x (BN/WN) warps; a
 * warp holds a WM x WN tile of m16n8 accumulators. Operands are rounded to
 * TF32 (cvt.rna) once, when staged. Shared-memory strides are chosen so the
 * fragment loads are free of bank conflicts (A: row stride 20 words, B: BN
 * + 8). After the K loop the accumulators go through shared memory, where
 * whole pooling windows are reduced and bias + ReLU applied, and the
 * output is written row by row (coalesced). A tile advances STEP = the
 * largest multiple of the pool window <= BM rows, so windows never straddle
 * tiles (the last BM - STEP rows of a tile are computed and dropped: 1 of
 * 64 when pooling by 3).
 */
#define MMA_BK 16

__device__ __forceinline__ float to_tf32(float x)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	uint32_t r;

	asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
	return __uint_as_float(r);
#else
	return x;
#endif
}

/* DX mode (training's input gradient, a transposed convolution): the
 * input is dY with `shift` = k - 1 - pad rows of zeros in front; the
 * weights are the flipped ones, [k][cout][cin]; no bias, no ReLU: the
 * output is masked by the previous layer's activation (mask > 0; none when
 * mask is NULL) for t < lout and zero for lout <= t < rows_out, at rows t
 * (no padding offset). */
struct dx_args {
	const float *mask;
	int shift;
};

template <int BM, int BN, int WM, int WN, int POOL, bool FIRST, bool DX>
__global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32)
k_conv_mma(const float *__restrict__ in, int lin_pad, int cin, const float *__restrict__ w,
	   const float *__restrict__ b, int cout, int lout, int pad, int rows_out,
	   float *__restrict__ out, struct first_layer f, struct dx_args dx)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	constexpr int NT = (BM / WM) * (BN / WN) * 32, AR = BM + KW - 1;
	constexpr int MT = WM / 16, NF = WN / 8, STEP = BM / POOL * POOL;
	constexpr int AS = MMA_BK + 4, BS = BN + 8, CS = BN + 4;
	struct stage {
		float A[AR][AS];
		float B[KW][MMA_BK][BS];
	};
	union smem {
		struct stage s;
		float C[BM][CS];
	};
	__shared__ __align__(16) union smem sm;
	const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
	const int g = lane >> 2, t4 = lane & 3;
	const int wm = (warp / (BN / WN)) * WM, wn = (warp % (BN / WN)) * WN;
	const int t0 = blockIdx.x * STEP, n0 = blockIdx.z * BN;
	const size_t i = blockIdx.y;
	const float *src = in + i * lin_pad * cin;
	float acc[MT][NF][4];

#pragma unroll
	for (int mt = 0; mt < MT; mt++)
#pragma unroll
		for (int nf = 0; nf < NF; nf++)
#pragma unroll
			for (int q = 0; q < 4; q++)
				acc[mt][nf][q] = 0.0f;
	for (int c0 = 0; c0 < cin; c0 += MMA_BK) {
		if (FIRST) {
			const float *xs = f.x + i * f.L;
			const int l1 = lin_pad - 2 * pad;

			for (int e = tid; e < AR * MMA_BK; e += NT) {
				const int r = e / MMA_BK, kk = e % MMA_BK;

				sm.s.A[r][kk] = to_tf32(first_layer_at(f, xs, t0 + r - pad, l1, pad,
								       c0 + kk));
			}
		} else
			for (int e = tid; e < AR * (MMA_BK / 4); e += NT) {
				const int r = e / (MMA_BK / 4), c4 = (e % (MMA_BK / 4)) * 4,
					  row = t0 + r - (DX ? dx.shift : 0);
				float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

				if ((!DX || row >= 0) && row < lin_pad)
					v = *reinterpret_cast<const float4 *>(src + (size_t)row * cin +
									  c0 + c4);
				v.x = to_tf32(v.x);
				v.y = to_tf32(v.y);
				v.z = to_tf32(v.z);
				v.w = to_tf32(v.w);
				*reinterpret_cast<float4 *>(&sm.s.A[r][c4]) = v;
			}
		for (int e = tid; e < KW * MMA_BK * (BN / 4); e += NT) {
			const int col4 = (e % (BN / 4)) * 4, kk = (e / (BN / 4)) % MMA_BK,
				  j = e / ((BN / 4) * MMA_BK);
			float4 v = *reinterpret_cast<const float4 *>(
				w + ((size_t)j * cin + c0 + kk) * cout + n0 + col4);

			v.x = to_tf32(v.x);
			v.y = to_tf32(v.y);
			v.z = to_tf32(v.z);
			v.w = to_tf32(v.w);
			*reinterpret_cast<float4 *>(&sm.s.B[j][kk][col4]) = v;
		}
		__syncthreads();
#pragma unroll
		for (int j = 0; j < KW; j++)
#pragma unroll
			for (int k8 = 0; k8 < MMA_BK; k8 += 8) {
				uint32_t a[MT][4], bf[NF][2];

#pragma unroll
				for (int mt = 0; mt < MT; mt++) {
					const int r = wm + mt * 16 + g + j;

					a[mt][0] = __float_as_uint(sm.s.A[r][k8 + t4]);
					a[mt][1] = __float_as_uint(sm.s.A[r + 8][k8 + t4]);
					a[mt][2] = __float_as_uint(sm.s.A[r][k8 + t4 + 4]);
					a[mt][3] = __float_as_uint(sm.s.A[r + 8][k8 + t4 + 4]);
				}
#pragma unroll
				for (int nf = 0; nf < NF; nf++) {
					bf[nf][0] = __float_as_uint(sm.s.B[j][k8 + t4][wn + nf * 8 + g]);
					bf[nf][1] = __float_as_uint(sm.s.B[j][k8 + t4 + 4][wn + nf * 8 + g]);
				}
#pragma unroll
				for (int mt = 0; mt < MT; mt++)
#pragma unroll
					for (int nf = 0; nf < NF; nf++)
						asm volatile(
							"mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
							"{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
							"{%0,%1,%2,%3};\n"
							: "+f"(acc[mt][nf][0]), "+f"(acc[mt][nf][1]),
							  "+f"(acc[mt][nf][2]), "+f"(acc[mt][nf][3])
							: "r"(a[mt][0]), "r"(a[mt][1]), "r"(a[mt][2]),
							  "r"(a[mt][3]), "r"(bf[nf][0]), "r"(bf[nf][1]));
			}
		__syncthreads();
	}

	/* accumulators -> shared (the staging buffers are free now) */
#pragma unroll
	for (int mt = 0; mt < MT; mt++)
#pragma unroll
		for (int nf = 0; nf < NF; nf++) {
			const int r = wm + mt * 16 + g, col = wn + nf * 8 + 2 * t4;

			*reinterpret_cast<float2 *>(&sm.C[r][col]) =
				make_float2(acc[mt][nf][0], acc[mt][nf][1]);
			*reinterpret_cast<float2 *>(&sm.C[r + 8][col]) =
				make_float2(acc[mt][nf][2], acc[mt][nf][3]);
		}
	__syncthreads();

	float *o = out + i * rows_out * cout + n0;
	const int Lp = POOL > 1 ? (lout - POOL) / POOL + 1 : lout;

	if constexpr (DX) {
		const float *mk = dx.mask ? dx.mask + (i * rows_out + pad) * cout + n0 : NULL;

		for (int e = tid; e < BM * (BN / 4); e += NT) {
			const int r = e / (BN / 4), col = (e % (BN / 4)) * 4, t = t0 + r;
			float4 v = *reinterpret_cast<const float4 *>(&sm.C[r][col]);

			if (t >= rows_out)
				continue;
			if (t >= lout) {
				v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
			} else if (mk) {
				const float4 m = *reinterpret_cast<const float4 *>(
					mk + (size_t)t * cout + col);

				v.x = m.x > 0.0f ? v.x : 0.0f;
				v.y = m.y > 0.0f ? v.y : 0.0f;
				v.z = m.z > 0.0f ? v.z : 0.0f;
				v.w = m.w > 0.0f ? v.w : 0.0f;
			}
			*reinterpret_cast<float4 *>(o + (size_t)t * cout + col) = v;
		}
	} else {
		for (int e = tid; e < STEP / POOL * (BN / 4); e += NT) {
			const int q = e / (BN / 4), col = (e % (BN / 4)) * 4, qo = t0 / POOL + q;
			float4 v = *reinterpret_cast<const float4 *>(&sm.C[q * POOL][col]);
			/* scalar loads: the trainer's biases sit in its packed
			 * parameter vector, not 16-byte aligned in general */
			const float4 bb = make_float4(b[n0 + col], b[n0 + col + 1], b[n0 + col + 2],
						      b[n0 + col + 3]);

			if (qo >= Lp)
				continue;
#pragma unroll
			for (int u = 1; u < POOL; u++) {
				const float4 x = *reinterpret_cast<const float4 *>(&sm.C[q * POOL + u][col]);

				v.x = fmaxf(v.x, x.x);
				v.y = fmaxf(v.y, x.y);
				v.z = fmaxf(v.z, x.z);
				v.w = fmaxf(v.w, x.w);
			}
			v.x = fmaxf(v.x + bb.x, 0.0f);
			v.y = fmaxf(v.y + bb.y, 0.0f);
			v.z = fmaxf(v.z + bb.z, 0.0f);
			v.w = fmaxf(v.w + bb.w, 0.0f);
			*reinterpret_cast<float4 *>(o + (size_t)(pad + qo) * cout + col) = v;
		}
		/* zero padding rows at the spectrum's two ends */
		if (blockIdx.x == 0 || blockIdx.x == gridDim.x - 1)
			for (int e = tid; e < pad * BN; e += NT) {
				const int r = e / BN, col = e % BN;

				if (blockIdx.x == 0)
					o[(size_t)r * cout + col] = 0.0f;
				if (blockIdx.x == gridDim.x - 1)
					o[(size_t)(rows_out - pad + r) * cout + col] = 0.0f;
			}
	}
#else
	__trap();
#endif
}

/* The tensor-core kernels exist in this binary only when it was compiled
 * for sm_80 or later (elsewhere they are a __trap()): the PTX the loaded
 * code came from says which. */
int mtlz_cu_mma_built(void)
{
	cudaFuncAttributes a;

	if (cudaFuncGetAttributes(&a, k_conv_mma<128, 16, 32, 16, 1, false, false>) != cudaSuccess) {
		cudaGetLastError();
		return 0;
	}
	return a.ptxVersion >= 80;
}

int mtlz_cu_conv_mma_ok(int cin, int cout, int k, int pool)
{
	return k == KW && cin % MMA_BK == 0 && cout % 16 == 0 && pool >= 1 && pool <= 3;
}

/* All launches of one tile configuration; in DX mode rows_out is given
 * (the gradient's row stride), else it follows from lout, pool and pad. */
template <int BM, int BN, int WM, int WN, bool FIRST, bool DX>
static void launch_mma(const float *in, int n, int lin_pad, int cin, const float *w,
		       const float *b, int cout, int lout, int pool, int pad, int rows_out,
		       float *out, struct first_layer f, struct dx_args dx, cudaStream_t s)
{
	constexpr int NT = (BM / WM) * (BN / WN) * 32;
	const int Lp = pool > 1 ? (lout - pool) / pool + 1 : lout;
	const int step = BM / pool * pool;
	const int need = DX ? rows_out : pool > 1 ? Lp * pool : lout;
	const int tiles = MTLZ_MAX((need + step - 1) / step, 1);

	if (!DX)
		rows_out = Lp + 2 * pad;
	for (int i0 = 0; i0 < n; i0 += 65535) {
		dim3 grid(tiles, MTLZ_MIN(n - i0, 65535), cout / BN);
		const float *src = FIRST ? in : in + (size_t)i0 * lin_pad * cin;
		float *dst = out + (size_t)i0 * rows_out * cout;
		struct first_layer fi = f;
		struct dx_args di = dx;

		if (FIRST)
			fi.x = f.x + (size_t)i0 * f.L;
		if (DX && dx.mask)
			di.mask = dx.mask + (size_t)i0 * rows_out * cout;
		if (pool == 1)
			k_conv_mma<BM, BN, WM, WN, 1, FIRST, DX><<<grid, NT, 0, s>>>(
				src, lin_pad, cin, w, b, cout, lout, pad, rows_out, dst, fi, di);
		else if (DX)
			; /* a gradient is never pooled here */
		else if (pool == 2)
			k_conv_mma<BM, BN, WM, WN, 2, FIRST, false><<<grid, NT, 0, s>>>(
				src, lin_pad, cin, w, b, cout, lout, pad, rows_out, dst, fi, di);
		else
			k_conv_mma<BM, BN, WM, WN, 3, FIRST, false><<<grid, NT, 0, s>>>(
				src, lin_pad, cin, w, b, cout, lout, pad, rows_out, dst, fi, di);
	}
}

template <bool FIRST, bool DX>
static void dispatch_mma(const float *in, int n, int lin_pad, int cin, const float *w,
			 const float *b, int cout, int lout, int pool, int pad, int rows_out,
			 float *out, struct first_layer f, struct dx_args dx, cudaStream_t s)
{
	if (cout % 128 == 0)
		launch_mma<64, 128, 32, 64, FIRST, DX>(in, n, lin_pad, cin, w, b, cout, lout, pool,
						       pad, rows_out, out, f, dx, s);
	else if (cout % 64 == 0)
		launch_mma<128, 64, 64, 32, FIRST, DX>(in, n, lin_pad, cin, w, b, cout, lout, pool,
						       pad, rows_out, out, f, dx, s);
	else if (cout % 32 == 0)
		launch_mma<128, 32, 32, 32, FIRST, DX>(in, n, lin_pad, cin, w, b, cout, lout, pool,
						       pad, rows_out, out, f, dx, s);
	else
		launch_mma<128, 16, 32, 16, FIRST, DX>(in, n, lin_pad, cin, w, b, cout, lout, pool,
						       pad, rows_out, out, f, dx, s);
}

void mtlz_cu_conv_mma(const float *in, int n, int lin_pad, int cin, const float *w,
		      const float *b, int cout, int lout, int pool, int pad, float *out,
		      cudaStream_t s)
{
	struct first_layer f = { NULL, NULL, NULL, 0 };
	struct dx_args dx = { NULL, 0 };

	dispatch_mma<false, false>(in, n, lin_pad, cin, w, b, cout, lout, pool, pad, 0, out, f, dx,
				   s);
}

void mtlz_cu_conv_mma_first(const float *x, int L, const float *w1, const float *b1, int n,
			    int lin_pad, int cin, const float *w, const float *b, int cout,
			    int lout, int pool, int pad, float *out, cudaStream_t s)
{
	struct first_layer f = { x, w1, b1, L };
	struct dx_args dx = { NULL, 0 };

	dispatch_mma<true, false>(NULL, n, lin_pad, cin, w, b, cout, lout, pool, pad, 0, out, f,
				  dx, s);
}

void mtlz_cu_conv_mma_dx(const float *dy, int n, int rows, int cin, const float *wf, int cout,
			 int n_out, int shift, int pad, const float *mask, float *dx,
			 cudaStream_t s)
{
	struct first_layer f = { NULL, NULL, NULL, 0 };
	struct dx_args d = { mask, shift };

	dispatch_mma<false, true>(dy, n, rows, cin, wf, NULL, cout, n_out, 1, pad, rows, dx, f, d,
				  s);
}
