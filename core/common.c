/*
 * common.c - error formatting, aligned allocation, clock and PRNG.
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <errno.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int mtlz_err(char *errstr, size_t errstr_size, int status, const char *fmt, ...)
{
	va_list ap;

	if (errstr && errstr_size) {
		va_start(ap, fmt);
		vsnprintf(errstr, errstr_size, fmt, ap);
		va_end(ap);
	}
	return status;
}

const char *mtlz_status_str(int status)
{
	switch (status) {
	case MTLZ_OK: return "ok";
	case MTLZ_ERR_IO: return "i/o error";
	case MTLZ_ERR_FORMAT: return "format error";
	case MTLZ_ERR_INVALID: return "invalid argument";
	case MTLZ_ERR_NOMEM: return "out of memory";
	case MTLZ_ERR_REJECT: return "rejected";
	case MTLZ_ERR_UNSUPPORTED: return "unsupported";
	}
	return "unknown error";
}

void *mtlz_aligned_alloc(size_t size)
{
	void *p = NULL;

	if (size == 0)
		size = 64;
	if (posix_memalign(&p, 64, (size + 63) & ~(size_t)63) != 0)
		return NULL;
	return p;
}

double mtlz_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9E3779B97F4A7C15ull);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

void mtlz_rng_seed(mtlz_rng *r, uint64_t seed)
{
	for (int i = 0; i < 4; i++)
		r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

uint64_t mtlz_rng_next(mtlz_rng *r)
{
	uint64_t *s = r->s;
	uint64_t result = rotl(s[1] * 5, 7) * 9;
	uint64_t t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

double mtlz_rng_uniform(mtlz_rng *r)
{
	return (double)(mtlz_rng_next(r) >> 11) * 0x1.0p-53;
}

int mtlz_parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

void mtlz_omp_passive(char **argv)
{
	if (!getenv("OMP_WAIT_POLICY")) {
		char self[4096];
		const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);

		setenv("OMP_WAIT_POLICY", "passive", 1);
		/* by its real path: the process name (ps, pgrep, the journal)
		 * stays the program's, not "exe" */
		if (n > 0) {
			self[n] = '\0';
			execv(self, argv);
		}
		execv("/proc/self/exe", argv);
		/* if exec fails, run on with the default policy */
	}
}

void mtlz_shuffle_idx(size_t *v, size_t n, mtlz_rng *r)
{
	for (size_t j = n; j > 1; j--) {
		size_t k = (size_t)(mtlz_rng_uniform(r) * (double)j), t;

		k = k < j - 1 ? k : j - 1;
		t = v[j - 1], v[j - 1] = v[k], v[k] = t;
	}
}

int mtlz_sha256_file(const char *path, char hex[65], char *errstr,
		     size_t errstr_size)
{
	unsigned char buf[1 << 16], md[EVP_MAX_MD_SIZE];
	unsigned int md_len = 0;
	EVP_MD_CTX *ctx;
	FILE *f = fopen(path, "rb");
	size_t n;
	int rc = MTLZ_OK;

	if (!f)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path,
				strerror(errno));
	ctx = EVP_MD_CTX_new();
	if (!ctx || !EVP_DigestInit_ex(ctx, EVP_sha256(), NULL)) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "sha256: out of memory");
		goto out;
	}
	while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
		EVP_DigestUpdate(ctx, buf, n);
	if (ferror(f)) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: read error", path);
		goto out;
	}
	EVP_DigestFinal_ex(ctx, md, &md_len);
	for (unsigned int i = 0; i < md_len && i < 32; i++)
		snprintf(hex + 2 * i, 3, "%02x", md[i]);
	hex[64] = '\0';
out:
	EVP_MD_CTX_free(ctx);
	fclose(f);
	return rc;
}
