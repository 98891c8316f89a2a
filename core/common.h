/*
 * common.h - status codes, error-string helpers and small utilities shared by
 * every module of libmtlz_core (model, engines, preprocessing, I/O).
 *
 * Errors follow librdkafka's convention: a function returns an int status
 * (MTLZ_OK is 0) and, when a person will read the failure, fills a caller
 * supplied `char *errstr, size_t errstr_size` with one line that names the
 * input and says what is wrong.
 */
#ifndef MTLZ_COMMON_H
#define MTLZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define MTLZ_VERSION "0.1.0"

enum mtlz_status {
	MTLZ_OK = 0,
	MTLZ_ERR_IO = -1,      /* file could not be opened, read or written */
	MTLZ_ERR_FORMAT = -2,  /* input is malformed or inconsistent */
	MTLZ_ERR_INVALID = -3, /* bad argument or configuration value */
	MTLZ_ERR_NOMEM = -4,   /* allocation failed */
	MTLZ_ERR_REJECT = -5,  /* input is well formed but unusable (spectrum) */
	MTLZ_ERR_UNSUPPORTED = -6,
};

/* Formats into errstr (if non-NULL) and returns `status`, so that an error
 * path reads `return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "...", ...)`. */
int mtlz_err(char *errstr, size_t errstr_size, int status, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

const char *mtlz_status_str(int status);

/* 64-byte aligned allocation (cache line / AVX-512 width); free with free(). */
void *mtlz_aligned_alloc(size_t size);

/* SHA-256 of a file as 64 lowercase hex digits (+ NUL) into hex[65]. */
int mtlz_sha256_file(const char *path, char hex[65], char *errstr,
		     size_t errstr_size);

/* Monotonic clock in seconds. */
double mtlz_now(void);

/* Small, fast, seedable PRNG (xoshiro256**) used for weight initialisation
 * and MC dropout: deterministic for a given seed on every platform. */
typedef struct mtlz_rng {
	uint64_t s[4];
} mtlz_rng;

void mtlz_rng_seed(mtlz_rng *r, uint64_t seed);
uint64_t mtlz_rng_next(mtlz_rng *r);
/* Uniform double in [0, 1). */
double mtlz_rng_uniform(mtlz_rng *r);
/* Re-executes the program (argv as given to main) with OMP_WAIT_POLICY=passive
 * unless the variable is set: libgomp reads it when it loads. Used where
 * OpenMP threads share the cores with other threads (the daemon's consume
 * thread, OpenBLAS's own threads in training): spinning idle OpenMP threads
 * would take their cores. Returns only if it did not re-exec. */
void mtlz_omp_passive(char **argv);

/* A whole decimal number in [lo, hi], all of s; 0, or -1 (out untouched). */
int mtlz_parse_int(const char *s, int lo, int hi, int *out);
/* Fisher-Yates shuffle of v[n] with r. */
void mtlz_shuffle_idx(size_t *v, size_t n, mtlz_rng *r);

#define MTLZ_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MTLZ_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MTLZ_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
