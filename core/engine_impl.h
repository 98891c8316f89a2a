/*
 * engine_impl.h - what a backend implements (compare ggml's
 * ggml_backend_i). Each backend fills one const struct with designated
 * initialisers; engine_reg.c lists them.
 */
#ifndef MTLZ_ENGINE_IMPL_H
#define MTLZ_ENGINE_IMPL_H

#include "mtlz_engine.h"

struct mtlz_engine_backend_i {
	const char *name;
	/* Allocates the backend context; NULL with errstr on failure. */
	void *(*init)(const mtlz_engine_opts *opts, char *errstr, size_t errstr_size);
	/* Sizes every buffer for arch and the largest batch (optional: set_model
	 * reserves when NULL). */
	int (*reserve)(void *ctx, const mtlz_arch *arch, int max_batch,
		       int mc_samples, char *errstr, size_t errstr_size);
	int (*set_model)(void *ctx, const mtlz_model *m, char *errstr,
			 size_t errstr_size);
	int (*run)(void *ctx, const float *x, int n, int mc_samples,
		   mtlz_output *out, char *errstr, size_t errstr_size);
	/* Waits for outstanding asynchronous work (optional). */
	int (*sync)(void *ctx);
	/* One line: ISA, threads, device. */
	const char *(*describe)(void *ctx);
	void (*free)(void *ctx);
	/* The backend's own input buffer of max_batch x input_length floats
	 * (pinned host memory on CUDA), or NULL: run() skips the copy when x is
	 * this buffer (optional). */
	float *(*input_buffer)(void *ctx);
};

extern const struct mtlz_engine_backend_i mtlz_engine_cpu;

/* Softmax of the class logits / T (temperature scaling; inv_t = 1/T) into
 * out[i].prob and the argmax into out[i].cls: the same host code for every
 * backend, so the engines' probabilities agree to the logits' rounding. */
void mtlz_softmax_outputs(const float *logits, int n, int K, float inv_t, mtlz_output *out);

/* Registry lookup by name; NULL if not compiled in. */
const struct mtlz_engine_backend_i *mtlz_engine_backend_find(const char *name);

#endif
