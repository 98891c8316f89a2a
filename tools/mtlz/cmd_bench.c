/*
 * cmd_bench.c - `mtlz bench`: engine and preprocessing throughput. Every
 * configuration prints one line ending in "N spectra/s"; --layers adds a
 * per-layer comparison of our convolution kernel with OpenBLAS sgemm.
 * Numbers, not assertions: timing belongs in benchmarks, not tests.
 */
#include "cli.h"
#include "common.h"
#include "kernels_cpu.h"
#include "mtlz_engine.h"
#include "optim.h"
#include "train.h"

#include <getopt.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
	"usage: mtlz bench [--model M] [--engine cpu] [--threads T] [--batch B] [options]\n"
	"  -m, --model FILE    model (default: a random model of the paper's architecture)\n"
	"  -e, --engine KIND   engine backend: cpu (default), cuda or auto\n"
	"      --precision P   fp32 (default) or tf32 (cuda only)\n"
	"  -t, --threads LIST  thread counts, e.g. 1,2 (default: 1 and all cores)\n"
	"  -b, --batch LIST    batch sizes (default 1,64; up to 65536)\n"
	"      --mc N          MC-dropout passes per spectrum (default 0)\n"
	"      --seconds S     time per configuration (default 3)\n"
	"      --layers        per-layer timing: own kernel vs OpenBLAS\n"
	"      --no-preprocess skip the preprocessing benchmark\n"
	"      --no-engine     skip the engine benchmark\n"
	"      --train         training step (forward + backward + Adam) instead of\n"
	"                      inference, random labels; also projects s/epoch on 60,000\n";

static double gauss(mtlz_rng *r)
{
	double u = mtlz_rng_uniform(r), v = mtlz_rng_uniform(r);

	return sqrt(-2.0 * log(u + 1e-300)) * cos(2.0 * M_PI * v);
}

static int cmp_double(const void *a, const void *b)
{
	const double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static int bench_engine(const mtlz_model *m, const char *kind, const char *precision,
			int threads, int batch, int mc, double seconds)
{
	const int L = mtlz_model_arch(m)->input_length;
	const double flops = mtlz_arch_flops(mtlz_model_arch(m));
	mtlz_engine_opts eo;
	mtlz_engine *e;
	mtlz_output *out = calloc((size_t)batch, sizeof(*out));
	float *x = malloc((size_t)batch * L * sizeof(float));
	double *lat = malloc(200000 * sizeof(double)), t0, t = 0;
	const float *xin = x;
	long n_calls = 0;
	mtlz_rng rng;
	char err[512];

	mtlz_engine_opts_default(&eo);
	eo.kind = kind;
	eo.n_threads = threads;
	eo.max_batch = batch;
	eo.mc_samples = mc;
	eo.precision = precision;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	if (!e || !out || !x || !lat || mtlz_engine_set_model(e, m, err, sizeof(err))) {
		cli_error("bench: %s", e ? err : "cannot create engine");
		mtlz_engine_free(e);
		free(out); free(x); free(lat);
		return -1;
	}
	mtlz_rng_seed(&rng, 7);
	for (size_t i = 0; i < (size_t)batch * L; i++)
		x[i] = (float)(1.0 + 0.1 * gauss(&rng));
	/* The daemon preprocesses straight into the engine's own (pinned)
	 * input buffer where it has one: so does the bench. */
	if (mtlz_engine_input_buffer(e)) {
		memcpy(mtlz_engine_input_buffer(e), x, (size_t)batch * L * sizeof(float));
		xin = mtlz_engine_input_buffer(e);
	}
	for (int w = 0; w < 3; w++)
		mtlz_engine_run(e, xin, batch, mc, out, err, sizeof(err));
	t0 = mtlz_now();
	do {
		const double c0 = mtlz_now();

		if (mtlz_engine_run(e, xin, batch, mc, out, err, sizeof(err))) {
			cli_error("bench: %s", err);
			break;
		}
		t = mtlz_now();
		if (n_calls < 200000)
			lat[n_calls] = t - c0;
		n_calls++;
	} while (t - t0 < seconds);
	if (n_calls == 0) {
		mtlz_engine_free(e);
		free(out); free(x); free(lat);
		return -1;
	}
	{
		const double rate = (double)n_calls * batch / (t - t0);
		const long nl = n_calls < 200000 ? n_calls : 200000;

		qsort(lat, (size_t)nl, sizeof(double), cmp_double);
		printf("engine=%s %s batch=%d mc=%d gflops=%.1f p50_ms=%.3f p99_ms=%.3f: "
		       "%.1f spectra/s\n", kind, mtlz_engine_describe(e), batch, mc,
		       rate * flops / 1e9, 1e3 * lat[nl / 2],
		       1e3 * lat[(long)(nl * 0.99)], rate);
		fflush(stdout);
	}
	mtlz_engine_free(e);
	free(out);
	free(x);
	free(lat);
	return 0;
}

/* A synthetic SDSS-like (log-linear, 3835 px) or DESI-like (linear 0.8 A,
 * 7781 px) spectrum with a few bad pixels. */
static void synth_spectrum(mtlz_spectrum *s, int desi, mtlz_rng *r)
{
	const size_t n = desi ? 7781 : 3835;

	mtlz_spectrum_init(s);
	mtlz_spectrum_alloc(s, n, 1, 1, 0);
	s->grid_kind = desi ? MTLZ_GRID_LINEAR : MTLZ_GRID_LOGLAM;
	s->start = desi ? 3600.0 : 3.5797;
	s->step = desi ? 0.8 : 1e-4;
	for (size_t i = 0; i < n; i++) {
		s->flux[i] = (float)(10.0 + gauss(r));
		s->ivar[i] = mtlz_rng_uniform(r) < 0.01 ? 0.0f : 1.0f;
	}
}

/* Spectra a second through mtlz_preprocess with implementation isa. */
static double prep_rate(int desi, int isa, int threads, double seconds)
{
	long total = 0;
	double t0 = mtlz_now();

#pragma omp parallel num_threads(threads) reduction(+ : total)
	{
		mtlz_prep_opts po;
		mtlz_prep_ws *ws = mtlz_prep_ws_new();
		mtlz_spectrum s;
		mtlz_prep_info info;
		mtlz_rng r;
		float *out;

		mtlz_prep_opts_default(&po);
		mtlz_prep_ws_set_isa(ws, isa);
		out = malloc((size_t)mtlz_grid_length(&po.grid) * sizeof(float));
		mtlz_rng_seed(&r, (uint64_t)omp_get_thread_num() + 1);
		synth_spectrum(&s, desi, &r);
		while (mtlz_now() - t0 < seconds) {
			for (int k = 0; k < 100; k++)
				mtlz_preprocess(&s, &po, ws, out, &info, NULL, 0);
			total += 100;
		}
		mtlz_spectrum_clear(&s);
		mtlz_prep_ws_free(ws);
		free(out);
	}
	return (double)total / (mtlz_now() - t0);
}

/* The default implementation and, where it is not the portable one, the
 * portable one too, side by side. */
static void bench_preprocess(int threads, double seconds)
{
	mtlz_prep_ws *probe = mtlz_prep_ws_new();
	const int isa = probe ? mtlz_prep_ws_set_isa(probe, MTLZ_ISA_AVX2) : MTLZ_ISA_GENERIC;

	mtlz_prep_ws_free(probe);
	for (int desi = 0; desi < 2; desi++) {
		const char *grid = desi ? "desi-linear-7781px" : "sdss-loglam-3835px";
		const double rate = prep_rate(desi, isa, threads, seconds);

		printf("preprocess grid=%s threads=%d impl=%s: %.0f spectra/s\n", grid, threads,
		       mtlz_isa_name(isa), rate);
		if (isa != MTLZ_ISA_GENERIC) {
			const double generic = prep_rate(desi, MTLZ_ISA_GENERIC, threads, seconds);

			printf("preprocess grid=%s threads=%d impl=generic (%s/generic x%.2f): "
			       "%.0f spectra/s\n", grid, threads, mtlz_isa_name(isa),
			       rate / generic, generic);
		}
		fflush(stdout);
	}
}

/* Times one call of f over `reps` repetitions; returns ms per call. */
#define TIME_MS(reps, stmt)                                                    \
	({                                                                     \
		double _t0 = mtlz_now();                                       \
		for (int _i = 0; _i < (reps); _i++) {                          \
			stmt;                                                  \
		}                                                              \
		1e3 * (mtlz_now() - _t0) / (reps);                             \
	})

static void bench_layers(const mtlz_model *m)
{
	const mtlz_arch *a = mtlz_model_arch(m);
	const int isa = mtlz_isa_detect();
	int len = a->input_length, cin = 1, cin_pad = 1;
	mtlz_rng rng;

	mtlz_rng_seed(&rng, 3);
	printf("# per-layer, one spectrum, 1 thread, isa=%s\n", mtlz_isa_name(isa));
	for (int b = 0; b < a->n_blocks; b++) {
		for (int k = 0; k < 2; k++) {
			const int cout = a->channels[b], cp = mtlz_round_up(cout, MTLZ_NR);
			const int lo = len + 2 * a->padding - a->kernel + 1;
			const size_t K = (size_t)a->kernel * cin_pad;
			float *x = mtlz_aligned_alloc((size_t)(len + 2 * a->padding) * cin_pad * 4);
			float *wp = mtlz_aligned_alloc(K * cp * 4), *bp = mtlz_aligned_alloc(cp * 4);
			float *wrow = mtlz_aligned_alloc(K * cp * 4);
			float *y = mtlz_aligned_alloc((size_t)lo * cp * 4);
			float *col = mtlz_aligned_alloc((size_t)lo * K * 4);
			float *w = malloc((size_t)cout * cin * a->kernel * 4), *bias = malloc(cout * 4);
			double t_own, t_blas, mflop = 2.0 * a->kernel * cin * cout * lo / 1e6;
			int reps;

			for (size_t i = 0; i < (size_t)(len + 2 * a->padding) * cin_pad; i++)
				x[i] = (float)gauss(&rng);
			for (size_t i = 0; i < (size_t)cout * cin * a->kernel; i++)
				w[i] = (float)gauss(&rng);
			for (int i = 0; i < cout; i++)
				bias[i] = 0.1f;
			mtlz_pack_conv(w, bias, cout, cin, a->kernel, cin_pad, wp, bp);
			mtlz_pack_conv_rows(wp, (int)K, cp, wrow);
			reps = (int)MTLZ_MAX(10.0, 3000.0 / mflop);
			t_own = TIME_MS(reps, mtlz_conv_nlc(isa, x, cin_pad, a->kernel, 0, lo, wp, bp, cp, y, cp, 1));
			t_blas = TIME_MS(reps, mtlz_conv_nlc_blas(x, cin_pad, a->kernel, 0, lo, wrow, bp, cp, y, cp, 1, col));
			printf("layer block%d.conv%d cin=%d cout=%d len=%d mflop=%.2f "
			       "own_ms=%.4f (%.1f GFLOP/s) blas_ms=%.4f (%.1f GFLOP/s) own/blas speed=%.2f\n",
			       b, k + 1, cin, cout, lo, mflop, t_own, mflop / t_own,
			       t_blas, mflop / t_blas, t_blas / t_own);
			free(x); free(wp); free(bp); free(wrow); free(y); free(col); free(w); free(bias);
			len = lo;
			cin = cout;
			cin_pad = cp;
		}
		len = (len - a->pool) / a->pool + 1;
	}
	fflush(stdout);
}

/* Training steps (mtlz_trainer_train_step: forward, backward, Adam) of a
 * batch of random spectra and labels (a quarter of them star-forming with
 * a metallicity) for `seconds`, after one warm-up step; the batch sits in
 * the trainer's input buffer when it has one, as mtlz-retrain gathers it. */
static int bench_train(mtlz_model *m, const char *kind, const char *precision, int threads,
		       int B, double seconds)
{
	const int L = mtlz_model_arch(m)->input_length;
	float *xo = malloc((size_t)B * L * sizeof(float)), *oh = malloc((size_t)B * sizeof(float));
	int *cls = malloc((size_t)B * sizeof(int)), steps = 0, rc = 0;
	char err[256] = "out of memory";
	mtlz_trainer *t = mtlz_trainer_new_kind(m, B, threads, kind, err, sizeof(err));
	float *x = t && mtlz_trainer_input_buffer(t) ? mtlz_trainer_input_buffer(t) : xo;
	mtlz_adam adam = { 0 };
	mtlz_loss_opts lo;
	mtlz_losses l;
	mtlz_rng r;
	double t0, dt;

	if (!xo || !oh || !cls || !t || mtlz_adam_init(&adam, mtlz_trainer_n_params(t), 1e-3) ||
	    mtlz_trainer_set_precision(t, precision, err, sizeof(err))) {
		cli_error("bench: training, batch %d: %s", B, err);
		rc = -1;
		goto out;
	}
	mtlz_rng_seed(&r, 1);
	for (size_t i = 0; i < (size_t)B * L; i++)
		x[i] = (float)(0.5 + mtlz_rng_uniform(&r));
	for (int i = 0; i < B; i++) {
		cls[i] = i % 4;
		oh[i] = cls[i] == 1 ? 8.5f + 0.3f * (float)mtlz_rng_uniform(&r) : NAN;
	}
	mtlz_loss_opts_default(&lo);
	lo.train = 1;
	const mtlz_batch b = { x, cls, oh, B };
	for (t0 = mtlz_now(), dt = 0; steps == 0 || dt < seconds; ) {
		if (mtlz_trainer_train_step(t, &b, &lo, &adam, &l, err, sizeof(err))) {
			cli_error("bench: %s", err);
			rc = -1;
			goto out;
		}
		if (steps++ == 0) {   /* warm-up: first touch of every buffer */
			if (mtlz_trainer_sync(t, err, sizeof(err))) {
				cli_error("bench: %s", err);
				rc = -1;
				goto out;
			}
			t0 = mtlz_now();
		}
		if ((steps - 1) % 16 == 0 || mtlz_now() - t0 >= seconds) {
			/* the device may run a step behind: count finished work */
			if (mtlz_trainer_sync(t, err, sizeof(err))) {
				cli_error("bench: %s", err);
				rc = -1;
				goto out;
			}
			dt = mtlz_now() - t0;
		}
	}
	steps--;
	printf("train engine=%s (%s) threads=%d batch=%d: %.1f spectra/s, %.4f s/step, "
	       "%.1f s per epoch of 60000\n", kind ? kind : "cpu", mtlz_trainer_describe(t),
	       threads, B, steps * B / dt, dt / steps, 60000.0 / (steps * B / dt));
	fflush(stdout);
out:
	mtlz_adam_free(&adam);
	mtlz_trainer_free(t);
	free(xo);
	free(oh);
	free(cls);
	return rc;
}

int cmd_bench(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, 0, 'm' },
		{ "engine", required_argument, 0, 'e' },
		{ "threads", required_argument, 0, 't' },
		{ "batch", required_argument, 0, 'b' },
		{ "mc", required_argument, 0, 'M' },
		{ "seconds", required_argument, 0, 'S' },
		{ "layers", no_argument, 0, 'l' },
		{ "no-preprocess", no_argument, 0, 'P' },
		{ "no-engine", no_argument, 0, 'E' },
		{ "train", no_argument, 0, 'T' },
		{ "precision", required_argument, 0, 'p' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	int threads[16], batches[16], n_threads = 0, n_batches = 2, mc = 0;
	int layers = 0, do_prep = 1, do_engine = 1, train = 0, opt;
	const char *model_path = NULL, *kind = "cpu", *precision = NULL;
	double seconds = 3.0;
	mtlz_model *m;
	mtlz_arch a;
	mtlz_grid g;
	char err[512], *end;

	batches[0] = 1;
	batches[1] = 64;
	optind = 1;
	while ((opt = getopt_long(argc, argv, "m:e:t:b:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'm': model_path = optarg; break;
		case 'e': kind = optarg; break;
		case 'p': precision = optarg; break;
		case 't':
			n_threads = cli_parse_int_list(optarg, 1, 1024, threads, 16);
			if (n_threads < 0) {
				cli_error("bench: --threads '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'b':
			n_batches = cli_parse_int_list(optarg, 1, 65536, batches, 16);
			if (n_batches < 0) {
				cli_error("bench: --batch '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'M':
			if (mtlz_parse_int(optarg, 0, 10000, &mc) < 0) {
				cli_error("bench: --mc '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'S':
			seconds = strtod(optarg, &end);
			if (*end || !(seconds > 0) || seconds > 3600) {
				cli_error("bench: --seconds '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'l': layers = 1; break;
		case 'P': do_prep = 0; break;
		case 'E': do_engine = 0; break;
		case 'T': train = 1; break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	if (optind != argc) {
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	if (n_threads == 0) {
		threads[n_threads++] = 1;
		if (omp_get_num_procs() > 1)
			threads[n_threads++] = omp_get_num_procs();
	}
	if (model_path) {
		m = mtlz_model_load(model_path, err, sizeof(err));
	} else {
		mtlz_arch_default(&a);
		mtlz_grid_default(&g);
		m = mtlz_model_new_random(&a, &g, 1, err, sizeof(err));
	}
	if (!m) {
		cli_error("bench: %s", err);
		return EXIT_RUNTIME;
	}
	printf("# mtlz %s bench: model %s, %.1f MFLOP per spectrum\n", MTLZ_VERSION,
	       model_path ? model_path : "(random, paper architecture)",
	       mtlz_arch_flops(mtlz_model_arch(m)) / 1e6);
	if (layers)
		bench_layers(m);
	if (train) {
		for (int t = 0; t < n_threads; t++)
			for (int b = 0; b < n_batches; b++)
				if (bench_train(m, strcmp(kind, "cuda") == 0 ? "cuda" : NULL, precision,
						threads[t], batches[b], seconds)) {
					mtlz_model_free(m);
					return EXIT_RUNTIME;
				}
		mtlz_model_free(m);
		return EXIT_OK;
	}
	for (int t = 0; do_engine && t < n_threads; t++)
		for (int b = 0; b < n_batches; b++)
			if (bench_engine(m, kind, precision, threads[t], batches[b], mc, seconds)) {
				mtlz_model_free(m);
				return EXIT_RUNTIME;
			}
	for (int t = 0; do_prep && t < n_threads; t++)
		bench_preprocess(threads[t], seconds);
	mtlz_model_free(m);
	return EXIT_OK;
}
