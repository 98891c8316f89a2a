/*
 * mc_rng.h - the MC-dropout masks, shared by every engine (C and CUDA).
 *
 * A spectrum's masks are a pure function of (seed, its input, mask index):
 * the key is FNV-1a over the bits of the preprocessed input spectrum (the
 * same bits whichever engine runs it; the features are not: their last bits
 * depend on the engine's summation order), and mask
 * k of the mc x C masks is 16 bits of splitmix64 draw k / 4 of that key
 * (counter-based, so a GPU thread computes any mask on its own, and the CPU
 * and CUDA engines draw the same masks for the same features). A unit is
 * kept when its 16 bits are below keep * 65536.
 */
#ifndef MTLZ_MC_RNG_H
#define MTLZ_MC_RNG_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define MTLZ_HD __host__ __device__ __forceinline__
#else
#define MTLZ_HD inline
#endif

static MTLZ_HD uint64_t mtlz_mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static MTLZ_HD uint64_t mtlz_mc_key(const float *f, int n, uint64_t seed)
{
	uint64_t h = 1469598103934665603ull ^ seed;
	uint32_t u;

	for (int i = 0; i < n; i++) {
		memcpy(&u, &f[i], 4);
		h = (h ^ u) * 1099511628211ull;
	}
	return h;
}

/* 1 when mask k of the spectrum with this key keeps its unit. */
static MTLZ_HD int mtlz_mc_keep(uint64_t key, uint64_t k, uint32_t keep16)
{
	uint64_t b = mtlz_mix64(key + ((k >> 2) + 1) * 0x9e3779b97f4a7c15ull);

	return (uint32_t)((b >> (16 * (k & 3))) & 0xffff) < keep16;
}

#endif
