/*
 * mtlz_engine.h - the one inference interface. A batch of preprocessed
 * spectra (each mtlz_grid_length() floats, mean 1) goes in; class
 * probabilities, metallicity and its MC-dropout uncertainty come out.
 *
 * Backends (CPU now, CUDA later) sit behind struct mtlz_engine_backend_i in
 * engine_impl.h; callers never see which one runs. An engine owns its packed
 * copy of the weights, so a new model can be set between two batches
 * (mtlz_engine_set_model) and the old mtlz_model freed at once: that is how
 * the daemon will hot-reload.
 *
 * @locality one thread at a time per engine (the daemon's infer thread); the
 * engine runs its own worker threads inside mtlz_engine_run().
 */
#ifndef MTLZ_ENGINE_H
#define MTLZ_ENGINE_H

#include "model.h"

#include <stddef.h>
#include <stdint.h>

typedef struct mtlz_engine mtlz_engine;

typedef struct mtlz_engine_opts {
	const char *kind;   /* "cpu" (default when NULL), "cuda", or "auto": the
			     * GPU when one is usable, else the CPU (describe()
			     * says which, and why not the GPU) */
	int n_threads;      /* worker threads; 0 = one per online CPU */
	int max_batch;      /* largest n passed to run(); buffers are sized once (64) */
	int mc_samples;     /* MC-dropout passes reserved for (paper: 100); 0 = none */
	uint64_t seed;      /* MC-dropout seed */
	int device;         /* CUDA device ordinal (0; MTLZ_CUDA_DEVICE when 0) */
	const char *precision; /* "fp32" (default when NULL) or "tf32" (CUDA only:
				* tensor-core GEMMs, ~1e-3 relative error) */
} mtlz_engine_opts;

typedef struct mtlz_output {
	float prob[MTLZ_MAX_CLASSES]; /* softmax of the class head */
	int cls;                      /* argmax */
	float metal;                  /* 12 + log(O/H), deterministic pass (dropout off) */
	float metal_sigma;            /* std of the MC-dropout passes; NaN when mc = 0 */
} mtlz_output;

typedef struct mtlz_engine_stats {
	uint64_t n_batches;
	uint64_t n_spectra;
	double busy_s;                /* wall time inside run() */
} mtlz_engine_stats;

void mtlz_engine_opts_default(mtlz_engine_opts *o);

/* Creates an engine of opts->kind; errstr says why not (e.g. "cuda: this
 * build has no CUDA support"). */
mtlz_engine *mtlz_engine_new(const mtlz_engine_opts *opts, char *errstr,
			     size_t errstr_size);
/* Packs the model's weights into the engine. Between batches only. */
int mtlz_engine_set_model(mtlz_engine *e, const mtlz_model *m, char *errstr,
			  size_t errstr_size);
/* Runs n <= max_batch spectra x[n][input_length]. mc_samples passes of the
 * metallicity head with dropout give metal_sigma (0: skip, NaN sigma).
 * The same spectrum gives the same sigma whatever batch it is in: each
 * spectrum's dropout masks are keyed by the seed and its own input
 * (core/mc_rng.h), identically in every engine. */
int mtlz_engine_run(mtlz_engine *e, const float *x, int n, int mc_samples,
		    mtlz_output *out, char *errstr, size_t errstr_size);
/* The engine's own input buffer (pinned host memory on CUDA) of
 * max_batch x input_length floats, or NULL: preprocess into it and pass it
 * as x to run() to save a copy. Valid until the next set_model(). */
float *mtlz_engine_input_buffer(mtlz_engine *e);
/* Runs one batch of every power-of-two size up to max_batch (and max_batch)
 * with mc passes — on CUDA also every size up to 64, each of which has its
 * own CUDA graph — so that graphs are captured and kernels loaded before the
 * first real batch. */
int mtlz_engine_warmup(mtlz_engine *e, int mc_samples, char *errstr, size_t errstr_size);
const char *mtlz_engine_name(const mtlz_engine *e);
/* A one-line description: backend, ISA, threads. */
const char *mtlz_engine_describe(const mtlz_engine *e);
void mtlz_engine_get_stats(const mtlz_engine *e, mtlz_engine_stats *s);
void mtlz_engine_free(mtlz_engine *e);

/*
 * Whether one output can be published: every probability finite and in
 * [0, 1], their sum within 1e-3 of 1, cls in [0, n_classes) and one of the
 * largest probabilities; when cls == metal_class (the conditional
 * regression) a finite metallicity, and with mc_samples > 0 a finite,
 * non-negative sigma. 0 if so; otherwise -1 and why says which value is
 * wrong. Weights are checked finite at load and inputs are normalized, so
 * this guards against what neither catches (a diverged model whose finite
 * weights overflow, a device fault).
 */
int mtlz_output_check(const mtlz_output *o, int n_classes, int metal_class, int mc_samples,
		      char *why, size_t why_size);

/* Comma-separated list of the backends compiled into this build. */
const char *mtlz_engine_kinds(void);

#endif
