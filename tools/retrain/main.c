/*
 * mtlz-retrain - trains the model from labelled archives as the paper does
 * (core/retrain.h; docs/retrain.md):
 *
 *   mtlz-retrain --data DIR... -o MODEL.safetensors [--config etc/retrain.yaml]
 *       [--epochs N] [--seed S] [--threads T] [--init MODEL]
 *       [--task both|class|metal] [--no-attention] [--resume CHECKPOINT]
 *       [--no-calibrate]
 *
 * Every hyper-parameter has the paper's value as default; a YAML file can
 * hold them and flags override it. SIGINT/SIGTERM write a checkpoint and
 * exit 0; --resume continues from it. At the end the class temperature is
 * fitted on the validation split and stored in the model (core/calib.h)
 * unless --no-calibrate.
 */
#define _POSIX_C_SOURCE 200809L
#include "common.h"
#include "report.h"
#include "retrain.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <yaml.h>

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

static const char usage[] =
	"usage: mtlz-retrain --data DIR|FILE [--data ...] -o MODEL.safetensors [options]\n"
	"Trains the MTLforGalSpecZ model on labelled archives (mtlz archive / import /\n"
	"synth) with the paper's recipe; every number below defaults to the paper's.\n"
	"  -d, --data PATH           archive directory or .avro file (repeatable; further\n"
	"                            non-option arguments are data too)\n"
	"  -o, --output MODEL        the trained model (written atomically at the end)\n"
	"  -c, --config FILE         YAML with any of the settings below (etc/retrain.yaml)\n"
	"      --epochs N            100            --batch N         128\n"
	"      --lr X                1e-3 (Adam)    --seed S          1\n"
	"      --plateau-factor X    0.1            --plateau-patience N  10\n"
	"      --focal-alpha X       0.25           --focal-gamma X   2.0\n"
	"      --dwa-temperature X   1.0            --split-train X   0.6\n"
	"      --split-validation X  0.2 (the rest is the test split)\n"
	"      --threads T           all cores\n"
	"      --engine cpu|cuda     cpu; cuda runs the passes on the GPU (docs/cuda.md)\n"
	"      --precision fp32|tf32 fp32; tf32: tensor-core GEMMs (cuda only; docs/cuda.md)\n"
	"      --task both|class|metal   single-task baselines (paper Sec. 4.2.2)\n"
	"      --no-attention        the attention ablation (paper Sec. 4.3)\n"
	"      --dropout P           head dropout of a new model (0.5)\n"
	"      --init MODEL          start from a model (fine-tuning)\n"
	"      --resume CHECKPOINT   continue an interrupted run (same data and options)\n"
	"      --checkpoint PATH     where checkpoints go (default MODEL.ckpt)\n"
	"      --max-batches N       at most N batches per epoch (speed measurements)\n"
	"      --no-calibrate        no temperature scaling of the class probabilities\n"
	"                            (default: fitted on the validation split at the end)\n"
	"or: mtlz-retrain --eval MODEL ARCHIVE... [--report DIR] [--threads T]\n"
	"  evaluates MODEL on the archives as `mtlz eval` does (metrics JSON on stdout,\n"
	"  --report DIR: metrics.json, figures and report.md; docs/report.md)\n";

struct cfg {
	mtlz_retrain_opts o;
	char *data[256];
	int n_data;
	int task_set;
};

/* One setting by name (YAML key or long flag without "--"); -1 if unknown,
 * -2 if the value is bad. */
static int apply(struct cfg *c, const char *key, const char *val)
{
	mtlz_retrain_opts *o = &c->o;
	char *end;
	double x = strtod(val, &end);
	const int num = end != val && *end == '\0';
	static const struct { const char *name; int kind; size_t off; } keys[] = {
#define D(n, f) { n, 'd', offsetof(mtlz_retrain_opts, f) }
#define I(n, f) { n, 'i', offsetof(mtlz_retrain_opts, f) }
		I("epochs", epochs), I("batch", batch), D("lr", lr),
		D("plateau-factor", plateau_factor), D("plateau.factor", plateau_factor),
		I("plateau-patience", plateau_patience), I("plateau.patience", plateau_patience),
		D("focal-alpha", focal_alpha), D("focal.alpha", focal_alpha),
		D("focal-gamma", focal_gamma), D("focal.gamma", focal_gamma),
		D("dwa-temperature", dwa_T), D("dwa.temperature", dwa_T),
		D("split-train", frac_train), D("split.train", frac_train),
		D("split-validation", frac_val), D("split.validation", frac_val),
		I("threads", threads), D("dropout", dropout),
#undef D
#undef I
	};

	if (!strcmp(key, "seed")) {
		unsigned long long s = strtoull(val, &end, 10);

		if (*end || end == val)
			return -2;
		o->seed = s;
		return 0;
	}
	if (!strcmp(key, "task")) {
		o->task = !strcmp(val, "both") ? MTLZ_TASK_BOTH : !strcmp(val, "class") ?
			  MTLZ_TASK_CLASS : !strcmp(val, "metal") ? MTLZ_TASK_METAL : -1;
		return o->task < 0 ? -2 : 0;
	}
	if (!strcmp(key, "engine")) {
		if (strcmp(val, "cpu") && strcmp(val, "cuda"))
			return -2;
		o->engine = !strcmp(val, "cuda") ? "cuda" : "cpu";
		return 0;
	}
	if (!strcmp(key, "precision")) {
		if (strcmp(val, "fp32") && strcmp(val, "tf32"))
			return -2;
		o->precision = !strcmp(val, "tf32") ? "tf32" : "fp32";
		return 0;
	}
	if (!strcmp(key, "calibrate")) {
		if (strcmp(val, "true") && strcmp(val, "false"))
			return -2;
		o->no_calibrate = !strcmp(val, "false");
		return 0;
	}
	if (!strcmp(key, "attention")) {
		if (strcmp(val, "true") && strcmp(val, "false"))
			return -2;
		o->no_attention = !strcmp(val, "false");
		return 0;
	}
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		if (strcmp(key, keys[i].name))
			continue;
		if (!num || !isfinite(x))
			return -2;
		if (keys[i].kind == 'i') {
			if (x != floor(x) || x < 0 || x > 1e9)
				return -2;
			*(int *)((char *)o + keys[i].off) = (int)x;
		} else {
			*(double *)((char *)o + keys[i].off) = x;
		}
		return 0;
	}
	return -1;
}

/* A YAML mapping of settings, one level of nesting ("plateau: {factor:}"). */
static int read_config(struct cfg *c, const char *path)
{
	FILE *f = fopen(path, "r");
	yaml_parser_t p;
	yaml_event_t ev;
	char key[64] = "", parent[64] = "", full[140];
	int depth = 0, want_key = 1, rc = 0, done = 0;

	if (!f) {
		fprintf(stderr, "mtlz-retrain: %s: %s\n", path, strerror(errno));
		return -1;
	}
	yaml_parser_initialize(&p);
	yaml_parser_set_input_file(&p, f);
	while (!done && rc == 0) {
		if (!yaml_parser_parse(&p, &ev)) {
			fprintf(stderr, "mtlz-retrain: %s:%zu:%zu: %s\n", path,
				p.problem_mark.line + 1, p.problem_mark.column + 1, p.problem);
			rc = -1;
			break;
		}
		switch (ev.type) {
		case YAML_MAPPING_START_EVENT:
			depth++;
			if (depth == 2)
				snprintf(parent, sizeof(parent), "%s", key);
			if (depth > 2) {
				fprintf(stderr, "mtlz-retrain: %s:%zu: nesting too deep\n", path,
					ev.start_mark.line + 1);
				rc = -1;
			}
			want_key = 1;
			break;
		case YAML_MAPPING_END_EVENT:
			depth--;
			parent[0] = '\0';
			want_key = 1;
			break;
		case YAML_SCALAR_EVENT:
			if (want_key) {
				snprintf(key, sizeof(key), "%s", (char *)ev.data.scalar.value);
				want_key = 0;
			} else {
				int r;

				snprintf(full, sizeof(full), "%s%s%s", parent, parent[0] ? "." : "", key);
				r = apply(c, full, (char *)ev.data.scalar.value);
				if (r == -1)
					fprintf(stderr, "mtlz-retrain: %s:%zu:%zu: unknown key %s\n", path,
						ev.start_mark.line + 1, ev.start_mark.column + 1, full);
				else if (r == -2)
					fprintf(stderr, "mtlz-retrain: %s:%zu:%zu: %s: bad value '%s'\n",
						path, ev.start_mark.line + 1, ev.start_mark.column + 1,
						full, (char *)ev.data.scalar.value);
				rc = r ? -1 : 0;
				want_key = 1;
			}
			break;
		case YAML_SEQUENCE_START_EVENT:
			fprintf(stderr, "mtlz-retrain: %s:%zu: lists are not settings\n", path,
				ev.start_mark.line + 1);
			rc = -1;
			break;
		case YAML_STREAM_END_EVENT:
			done = 1;
			break;
		default:
			break;
		}
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&p);
	fclose(f);
	return rc;
}

struct show {
	int tty;
	double last;
};

static void fmt_time(double s, char *buf, size_t n)
{
	if (s < 0 || !isfinite(s))
		snprintf(buf, n, "?");
	else if (s >= 3600)
		snprintf(buf, n, "%dh%02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
	else
		snprintf(buf, n, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
}

static void progress(void *opaque, const mtlz_progress *p)
{
	struct show *sh = opaque;
	const double per_epoch = p->batch > 0 ? p->epoch_s / p->batch * p->n_batches : 0;
	const double eta = per_epoch * (p->epochs - p->epoch) + (per_epoch - p->epoch_s);
	char e[32];

	fmt_time(eta, e, sizeof(e));
	if (p->epoch_done) {
		fprintf(stderr, "%sepoch %d/%d  train cls %.4f metal %.4f  val cls %.4f metal %.4f "
			"total %.4f  lambda %.3f/%.3f  lr %.1e  %.1f s  ETA %s\n",
			sh->tty ? "\r\033[K" : "", p->epoch, p->epochs, p->loss_cls, p->loss_metal,
			p->val_cls, p->val_metal, p->val_total, p->lambda[0], p->lambda[1], p->lr,
			p->epoch_s, e);
		return;
	}
	if (sh->tty && mtlz_now() - sh->last > 0.2) {
		sh->last = mtlz_now();
		fprintf(stderr, "\r\033[Kepoch %d/%d  batch %ld/%ld  loss cls %.4f metal %.4f  "
			"lambda %.3f/%.3f  lr %.1e  ETA %s", p->epoch, p->epochs, p->batch,
			p->n_batches, p->loss_cls, p->loss_metal, p->lambda[0], p->lambda[1], p->lr, e);
	}
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "data", required_argument, 0, 'd' },
		{ "output", required_argument, 0, 'o' },
		{ "config", required_argument, 0, 'c' },
		{ "init", required_argument, 0, 'I' },
		{ "resume", required_argument, 0, 'R' },
		{ "checkpoint", required_argument, 0, 'K' },
		{ "no-attention", no_argument, 0, 'A' },
		{ "max-batches", required_argument, 0, 'M' },
		{ "no-calibrate", no_argument, 0, 'C' },
		{ "eval", required_argument, 0, 'E' }, { "report", required_argument, 0, 'P' },
		{ "epochs", required_argument, 0, 1 }, { "batch", required_argument, 0, 1 },
		{ "lr", required_argument, 0, 1 }, { "seed", required_argument, 0, 1 },
		{ "plateau-factor", required_argument, 0, 1 },
		{ "plateau-patience", required_argument, 0, 1 },
		{ "focal-alpha", required_argument, 0, 1 }, { "focal-gamma", required_argument, 0, 1 },
		{ "dwa-temperature", required_argument, 0, 1 },
		{ "split-train", required_argument, 0, 1 },
		{ "split-validation", required_argument, 0, 1 },
		{ "threads", required_argument, 0, 1 }, { "task", required_argument, 0, 1 },
		{ "dropout", required_argument, 0, 1 }, { "engine", required_argument, 0, 1 },
		{ "precision", required_argument, 0, 1 },
		{ "help", no_argument, 0, 'h' }, { "version", no_argument, 0, 'V' },
		{ 0, 0, 0, 0 },
	};
	static struct cfg c;
	static mtlz_retrain_result res;
	struct show sh = { isatty(2), 0 };
	const char *config = NULL, *eval_model = NULL, *report = NULL;
	char err[1024];
	struct sigaction sa;
	int opt, li, rc;

	/* OpenMP loops and OpenBLAS's own threads take turns on the cores: idle
	 * OpenMP threads must sleep, not spin (measured with mtlz bench --train,
	 * batch 128, 2 threads: 160 spectra/s spinning, 234 passive) */
	mtlz_omp_passive(argv);
	mtlz_retrain_opts_default(&c.o);
	/* the config file first, so that flags override it */
	for (int i = 1; i < argc - 1; i++)
		if (!strcmp(argv[i], "--config") || !strcmp(argv[i], "-c"))
			config = argv[i + 1];
	if (config && read_config(&c, config))
		return 2;
	while ((opt = getopt_long(argc, argv, "d:o:c:h", opts, &li)) != -1) {
		switch (opt) {
		case 'd':
			if (c.n_data < 256)
				c.data[c.n_data++] = optarg;
			break;
		case 'o': c.o.out = optarg; break;
		case 'c': break;
		case 'I': c.o.init = optarg; break;
		case 'R': c.o.resume = optarg; break;
		case 'K': c.o.checkpoint = optarg; break;
		case 'A': c.o.no_attention = 1; break;
		case 'M': c.o.max_batches = atol(optarg); break;
		case 'C': c.o.no_calibrate = 1; break;
		case 'E': eval_model = optarg; break;
		case 'P': report = optarg; break;
		case 1:
			if (apply(&c, opts[li].name, optarg)) {
				fprintf(stderr, "mtlz-retrain: --%s '%s': bad value\n", opts[li].name,
					optarg);
				return 2;
			}
			break;
		case 'h': fputs(usage, stdout); return 0;
		case 'V': printf("mtlz-retrain %s\n", MTLZ_VERSION); return 0;
		default: fputs(usage, stderr); return 2;
		}
	}
	for (int i = optind; i < argc && c.n_data < 256; i++)
		c.data[c.n_data++] = argv[i];
	if (eval_model && c.n_data) {
		/* the evaluation of `mtlz eval` (core/report.h), MC dropout 100 */
		mtlz_report_eval_opts eo = {
			.model = eval_model, .data = c.data, .n_data = c.n_data, .mc = 100,
			.threads = c.o.threads, .seed = 1, .report_dir = report,
			.schema_dir = getenv("MTLZ_SCHEMA_DIR") ? NULL : MTLZ_SCHEMA_DIR,
		};
		json_t *j = mtlz_report_eval(&eo, NULL, NULL, err, sizeof(err));

		if (!j) {
			fprintf(stderr, "mtlz-retrain: eval: %s\n", err);
			return 1;
		}
		rc = json_dumpf(j, stdout, JSON_INDENT(1) | JSON_REAL_PRECISION(8)) ||
		     putchar('\n') == EOF || fflush(stdout);
		json_decref(j);
		return rc ? 1 : 0;
	}
	if (!c.n_data || !c.o.out || report) {
		fputs(usage, stderr);
		return 2;
	}
	/* checked before the archives are read */
	if (c.o.precision && !strcmp(c.o.precision, "tf32") &&
	    (!c.o.engine || strcmp(c.o.engine, "cuda"))) {
		fputs("mtlz-retrain: precision tf32 needs the cuda trainer (--engine cuda); "
		      "the CPU trains in fp32\n", stderr);
		return 2;
	}
	c.o.data = c.data;
	c.o.n_data = c.n_data;
	c.o.stop = &stop_flag;
	c.o.progress = progress;
	c.o.opaque = &sh;
	if (!getenv("MTLZ_SCHEMA_DIR"))
		c.o.schema_dir = MTLZ_SCHEMA_DIR;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	rc = mtlz_retrain_run(&c.o, &res, err, sizeof(err));
	if (sh.tty)
		fputs("\r\033[K", stderr);
	if (rc) {
		fprintf(stderr, "mtlz-retrain: %s\n", err);
		return 1;
	}
	if (res.stopped) {
		fprintf(stderr, "mtlz-retrain: stopped after %d epoch(s); checkpoint %s%s "
			"(continue with --resume)\n", res.epochs_done,
			c.o.checkpoint ? c.o.checkpoint : c.o.out, c.o.checkpoint ? "" : ".ckpt");
		return 0;
	}
	if (res.calibrated && res.calib_test.n)
		fprintf(stderr, "mtlz-retrain: calibration: temperature %.4f fitted on %ld validation "
			"spectra (NLL %.4f -> %.4f, ECE %.4f -> %.4f); test split ECE %.4f -> %.4f "
			"(n %ld)\n", res.calib_val.temperature, res.calib_val.n,
			res.calib_val.nll_before, res.calib_val.nll_after, res.calib_val.ece_before,
			res.calib_val.ece_after, res.calib_test.ece_before, res.calib_test.ece_after,
			res.calib_test.n);
	else if (res.calibrated)
		fprintf(stderr, "mtlz-retrain: calibration: temperature %.4f fitted on %ld validation "
			"spectra (NLL %.4f -> %.4f, ECE %.4f -> %.4f); no labelled test spectrum\n",
			res.calib_val.temperature, res.calib_val.n, res.calib_val.nll_before,
			res.calib_val.nll_after, res.calib_val.ece_before, res.calib_val.ece_after);
	else
		fprintf(stderr, "mtlz-retrain: calibration skipped: %s\n", res.calib_skipped);
	fprintf(stderr, "mtlz-retrain: %d epochs; split train %ld / validation %ld / test %ld "
		"(%ld rejected by preprocessing); test accuracy %.4f, metallicity SD %.4f dex "
		"bias %+.4f (n %ld) -> %s\n", res.epochs_done, res.n_train, res.n_val, res.n_test,
		res.n_rejected, res.test_accuracy, res.test_oh_sd, res.test_oh_bias, res.test_oh_n,
		c.o.out);
	return 0;
}
