/*
 * engine_reg.c - the backend registry and the thin mtlz_engine wrapper
 * (counters, argument checks) shared by every backend. The only file that
 * knows which backends a build has.
 */
#include "engine_impl.h"
#include "common.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef MTLZ_WITH_CUDA
extern const struct mtlz_engine_backend_i mtlz_engine_cuda;
#endif

static const struct mtlz_engine_backend_i *const backends[] = {
	&mtlz_engine_cpu,
#ifdef MTLZ_WITH_CUDA
	&mtlz_engine_cuda,
#endif
};

struct mtlz_engine {
	const struct mtlz_engine_backend_i *be;
	void *ctx;
	mtlz_engine_opts opts;
	int has_model;
	int input_length;
	mtlz_engine_stats stats;
	char auto_note[300];/* "auto" engines: the choice and why */
	char desc[640];     /* the backend's line + auto_note, built by describe() */
	long n_runs;        /* run() calls with n > 0, for MTLZ_FAULT_ENGINE */
};

/*
 * Fault injection, for tests of the callers' error handling (mtlzd's
 * retry-then-stop, tests/test_daemon.c): MTLZ_FAULT_ENGINE=N makes the Nth
 * mtlz_engine_run() of each engine (counting batches with n > 0; warm-up
 * does not count) fail as a device error would; "N+" makes the Nth and
 * every later call fail. MTLZ_FAULT_ENGINE_NAN=N (or "N+") instead lets
 * the call run and then makes the first spectrum's outputs NaN, as a
 * diverged model would (mtlzd's non-finite output guard).
 * MTLZ_FAULT_ENGINE_STALL=N:MS makes the Nth call sleep MS milliseconds
 * first, as a hung device would (mtlzd's backpressure). Unset or empty
 * (always in production): no effect.
 */
static int fault_injected(const char *var, long call)
{
	const char *v = getenv(var);
	char *end;
	long n;

	if (!v || !*v)
		return 0;
	n = strtol(v, &end, 10);
	if (n < 1)
		return 0;
	return *end == '+' ? call >= n : call == n;
}

static void fault_stall(long call)
{
	const char *v = getenv("MTLZ_FAULT_ENGINE_STALL");
	char *end;
	long n, ms;

	if (!v || !*v)
		return;
	n = strtol(v, &end, 10);
	if (n != call || *end != ':')
		return;
	ms = strtol(end + 1, &end, 10);
	if (ms > 0 && ms <= 600000) {
		struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
	}
}

const char *mtlz_engine_kinds(void)
{
#ifdef MTLZ_WITH_CUDA
	return "cpu,cuda";
#else
	return "cpu";
#endif
}

const struct mtlz_engine_backend_i *mtlz_engine_backend_find(const char *name)
{
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(backends); i++)
		if (strcmp(backends[i]->name, name) == 0)
			return backends[i];
	return NULL;
}

void mtlz_engine_opts_default(mtlz_engine_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->kind = "cpu";
	o->n_threads = 0;
	o->max_batch = 64;
	o->mc_samples = 0;
	o->seed = 42;
}

mtlz_engine *mtlz_engine_new(const mtlz_engine_opts *opts, char *errstr,
			     size_t errstr_size)
{
	const char *kind = opts->kind ? opts->kind : "cpu";
	const struct mtlz_engine_backend_i *be;
	mtlz_engine *e;

	if (strcmp(kind, "auto") == 0) {
		/* The GPU when one is usable; the reason it is not, in describe() */
		char why[256] = "this build has no CUDA engine";
		mtlz_engine_opts o = *opts;

		if (mtlz_engine_backend_find("cuda")) {
			o.kind = "cuda";
			e = mtlz_engine_new(&o, why, sizeof(why));
			if (e) {
				snprintf(e->auto_note, sizeof(e->auto_note), "engine auto: GPU found");
				return e;
			}
		}
		o.kind = "cpu";
		o.precision = NULL;
		e = mtlz_engine_new(&o, errstr, errstr_size);
		if (e)
			snprintf(e->auto_note, sizeof(e->auto_note), "engine auto: no GPU: %.260s", why);
		return e;
	}
	be = mtlz_engine_backend_find(kind);
	if (!be) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
			 "engine '%s' is not available in this build (have: %s)",
			 kind, mtlz_engine_kinds());
		return NULL;
	}
	if (opts->max_batch < 1 || opts->max_batch > 65536 || opts->n_threads < 0 ||
	    opts->mc_samples < 0 || opts->mc_samples > 10000) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "engine options out of range (max_batch %d, threads %d, "
			 "mc %d)", opts->max_batch, opts->n_threads, opts->mc_samples);
		return NULL;
	}
	if (opts->precision && strcmp(opts->precision, "fp32") != 0 &&
	    strcmp(be->name, "cuda") != 0) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "engine %s: precision '%s' is a CUDA option (the CPU engine is fp32)",
			 be->name, opts->precision);
		return NULL;
	}
	e = calloc(1, sizeof(*e));
	if (!e) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	e->be = be;
	e->opts = *opts;
	e->opts.kind = be->name;
	e->ctx = be->init(&e->opts, errstr, errstr_size);
	if (!e->ctx) {
		free(e);
		return NULL;
	}
	return e;
}

int mtlz_engine_set_model(mtlz_engine *e, const mtlz_model *m, char *errstr,
			  size_t errstr_size)
{
	int rc;

	if (e->be->reserve) {
		rc = e->be->reserve(e->ctx, mtlz_model_arch(m), e->opts.max_batch,
				    e->opts.mc_samples, errstr, errstr_size);
		if (rc)
			return rc;
	}
	rc = e->be->set_model(e->ctx, m, errstr, errstr_size);
	e->has_model = rc == MTLZ_OK;
	e->input_length = mtlz_model_arch(m)->input_length;
	return rc;
}

int mtlz_engine_run(mtlz_engine *e, const float *x, int n, int mc_samples,
		    mtlz_output *out, char *errstr, size_t errstr_size)
{
	double t0;
	int rc;

	if (!e->has_model)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"engine %s: no model set", e->be->name);
	if (n < 0 || n > e->opts.max_batch)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"engine %s: batch of %d, reserved for at most %d",
				e->be->name, n, e->opts.max_batch);
	if (mc_samples < 0 || mc_samples > 10000)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"engine %s: %d MC-dropout passes (0..10000)",
				e->be->name, mc_samples);
	if (n == 0)
		return MTLZ_OK;
	if (fault_injected("MTLZ_FAULT_ENGINE", ++e->n_runs))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
				"engine %s: injected fault (MTLZ_FAULT_ENGINE=%s, call %ld)",
				e->be->name, getenv("MTLZ_FAULT_ENGINE"), e->n_runs);
	fault_stall(e->n_runs);
	t0 = mtlz_now();
	rc = e->be->run(e->ctx, x, n, mc_samples, out, errstr, errstr_size);
	if (rc == MTLZ_OK && e->be->sync)
		rc = e->be->sync(e->ctx);
	e->stats.busy_s += mtlz_now() - t0;
	if (rc == MTLZ_OK && fault_injected("MTLZ_FAULT_ENGINE_NAN", e->n_runs)) {
		for (int k = 0; k < MTLZ_MAX_CLASSES; k++)
			out[0].prob[k] = NAN;
		out[0].metal = out[0].metal_sigma = NAN;
	}
	if (rc == MTLZ_OK) {
		e->stats.n_batches++;
		e->stats.n_spectra += (uint64_t)n;
	}
	return rc;
}

void mtlz_softmax_outputs(const float *logits, int n, int K, float inv_t, mtlz_output *out)
{
	for (int i = 0; i < n; i++) {
		const float *z = logits + (size_t)i * K;
		float mx = z[0], s = 0.0f;
		int arg = 0;

		for (int k = 1; k < K; k++)
			if (z[k] > mx) {
				mx = z[k];
				arg = k;
			}
		for (int k = 0; k < K; k++) {
			out[i].prob[k] = expf((z[k] - mx) * inv_t);
			s += out[i].prob[k];
		}
		for (int k = 0; k < K; k++)
			out[i].prob[k] /= s;
		out[i].cls = arg;
	}
}

int mtlz_output_check(const mtlz_output *o, int n_classes, int metal_class, int mc_samples,
		      char *why, size_t why_size)
{
	double sum = 0;

	for (int k = 0; k < n_classes; k++) {
		if (!isfinite(o->prob[k]) || o->prob[k] < 0.0f || o->prob[k] > 1.0f) {
			snprintf(why, why_size, "class probability %d is %g", k, (double)o->prob[k]);
			return -1;
		}
		sum += o->prob[k];
	}
	if (fabs(sum - 1.0) > 1e-3) {
		snprintf(why, why_size, "class probabilities sum to %.6f", sum);
		return -1;
	}
	if (o->cls < 0 || o->cls >= n_classes) {
		snprintf(why, why_size, "class %d of %d", o->cls, n_classes);
		return -1;
	}
	for (int k = 0; k < n_classes; k++)
		if (o->prob[k] > o->prob[o->cls]) {
			snprintf(why, why_size, "class %d has probability %g, below class %d's %g",
				 o->cls, (double)o->prob[o->cls], k, (double)o->prob[k]);
			return -1;
		}
	if (o->cls != metal_class)
		return 0;
	if (!isfinite(o->metal)) {
		snprintf(why, why_size, "metallicity is %g", (double)o->metal);
		return -1;
	}
	if (mc_samples > 0 && !(isfinite(o->metal_sigma) && o->metal_sigma >= 0.0f)) {
		snprintf(why, why_size, "metallicity sigma is %g", (double)o->metal_sigma);
		return -1;
	}
	return 0;
}

const char *mtlz_engine_name(const mtlz_engine *e) { return e->be->name; }

const char *mtlz_engine_describe(const mtlz_engine *e)
{
	const char *line = e->be->describe ? e->be->describe(e->ctx) : e->be->name;

	if (!e->auto_note[0])
		return line;
	/* rebuilt on each call: the backend's line grows once a model is set
	 * (the CUDA engine's convolution choices) */
	snprintf(((mtlz_engine *)e)->desc, sizeof(e->desc), "%s (%s)", line, e->auto_note);
	return e->desc;
}

float *mtlz_engine_input_buffer(mtlz_engine *e)
{
	return e->has_model && e->be->input_buffer ? e->be->input_buffer(e->ctx) : NULL;
}

int mtlz_engine_warmup(mtlz_engine *e, int mc_samples, char *errstr, size_t errstr_size)
{
	const int B = e->opts.max_batch, L = e->input_length;
	mtlz_output *out;
	float *x;
	int rc = MTLZ_OK;

	if (!e->has_model)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"engine %s: no model set", e->be->name);
	x = malloc((size_t)B * L * sizeof(float));
	out = malloc((size_t)B * sizeof(*out));
	if (!x || !out) {
		free(x);
		free(out);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	}
	/* a flat continuum with a wiggle: finite, non-trivial features */
	for (size_t i = 0; i < (size_t)B * L; i++)
		x[i] = 1.0f + 0.1f * sinf((float)(i % (size_t)L) * 0.01f);
	/* CUDA: every size up to 64 (each has its own CUDA graph, and the
	 * daemon's batches closed by max_delay_ms take any size); above that,
	 * and on the CPU, the powers of two and max_batch */
	{
		const int every = strcmp(e->be->name, "cuda") == 0 ? MTLZ_MIN(B, 64) : 1;

		for (int n = 1; rc == MTLZ_OK; n = n < every ? n + 1 :
				 n < B && n * 2 > B ? B : n * 2) {
			rc = e->be->run(e->ctx, x, n, mc_samples, out, errstr, errstr_size);
			if (n == B)
				break;
		}
	}
	free(x);
	free(out);
	return rc;
}

void mtlz_engine_get_stats(const mtlz_engine *e, mtlz_engine_stats *s)
{
	*s = e->stats;
}

void mtlz_engine_free(mtlz_engine *e)
{
	if (!e)
		return;
	e->be->free(e->ctx);
	free(e);
}
