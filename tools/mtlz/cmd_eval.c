/*
 * cmd_eval.c - `mtlz eval --model MODEL --data DIR... [--report DIR]`: runs
 * a model over labelled archives with the inference engine (as mtlzd would)
 * and prints the paper's metrics as JSON on stdout (core/metrics.h: key
 * names are a contract). --report DIR also writes metrics.json and a
 * report.md page. Plots are not written yet (docs/retrain.md).
 */
#include "cli.h"
#include "common.h"
#include "dataset.h"
#include "metrics.h"
#include "model.h"
#include "mtlz_engine.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char usage[] =
	"usage: mtlz eval --model MODEL --data DIR|FILE [--data ...] [options]\n"
	"Evaluates a model on labelled archives; prints the metrics as JSON on stdout.\n"
	"  -m, --model FILE     the model (safetensors)\n"
	"  -d, --data PATH      archive directory or .avro file (repeatable)\n"
	"      --mc N           MC-dropout passes for the metallicity sigma (default 100)\n"
	"      --threads T      engine threads (default: all cores)\n"
	"      --bootstrap N    bootstrap resamples for confidence intervals (default 0)\n"
	"      --seed S         bootstrap seed (default 1)\n"
	"      --report DIR     also write DIR/metrics.json and DIR/report.md\n";

/* A number of the report with `digits` decimals (0: an integer, < 0: with
 * a sign), or a dash for null. */
static void fmt(FILE *f, json_t *v, int digits)
{
	if (!json_is_number(v))
		fputs("–", f);
	else if (digits < 0)
		fprintf(f, "%+.*f", -digits, json_number_value(v));
	else
		fprintf(f, "%.*f", digits, json_number_value(v));
}

static int write_report(const char *dir, const char *model, json_t *j, char **data, int n_data)
{
	char path[4096];
	FILE *f;
	json_t *pc, *oh = json_object_get(j, "oh"), *conf = json_object_get(j, "confusion");
	static const char *const names[4] = { "passive", "star_forming", "composite", "agn" };

	if (mkdir(dir, 0777) && errno != EEXIST) {
		cli_error("eval: %s: %s", dir, strerror(errno));
		return -1;
	}
	snprintf(path, sizeof(path), "%s/metrics.json", dir);
	if (json_dump_file(j, path, JSON_INDENT(1) | JSON_REAL_PRECISION(8))) {
		cli_error("eval: cannot write %s", path);
		return -1;
	}
	snprintf(path, sizeof(path), "%s/report.md", dir);
	f = fopen(path, "w");
	if (!f) {
		cli_error("eval: %s: %s", path, strerror(errno));
		return -1;
	}
	fprintf(f, "# mtlz evaluation\n\nmodel: `%s`  \ndata:", model);
	for (int i = 0; i < n_data; i++)
		fprintf(f, " `%s`", data[i]);
	fprintf(f, "  \nspectra: %lld\n\n## Classification\n\naccuracy ",
		(long long)json_integer_value(json_object_get(j, "n")));
	fmt(f, json_object_get(j, "accuracy"), 4);
	fputs(", macro F1 ", f);
	fmt(f, json_object_get(j, "f1_macro"), 4);
	fputs("\n\n| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n", f);
	pc = json_object_get(j, "per_class");
	for (int c = 0; c < 4; c++) {
		json_t *e = json_object_get(pc, names[c]);

		fprintf(f, "| %s | ", names[c]);
		fmt(f, json_object_get(e, "precision"), 4);
		fputs(" | ", f);
		fmt(f, json_object_get(e, "recall"), 4);
		fputs(" | ", f);
		fmt(f, json_object_get(e, "f1"), 4);
		fputs(" | ", f);
		fmt(f, json_object_get(e, "support"), 0);
		fputs(" |\n", f);
	}
	fputs("\nconfusion (rows true, columns predicted):\n\n| | passive | star_forming | "
	      "composite | agn |\n|---|---|---|---|---|\n", f);
	for (int r = 0; r < 4; r++) {
		fprintf(f, "| %s |", names[r]);
		for (int c = 0; c < 4; c++)
			fprintf(f, " %lld |", (long long)json_integer_value(
				json_array_get(json_array_get(conf, (size_t)r), (size_t)c)));
		fputs("\n", f);
	}
	fputs("\n## Metallicity (star-forming)\n\nn ", f);
	fmt(f, json_object_get(oh, "n"), 0);
	fputs(", SD ", f);
	fmt(f, json_object_get(oh, "sd"), 4);
	fputs(" dex, bias ", f);
	fmt(f, json_object_get(oh, "bias"), -4);
	fputs(", MAE ", f);
	fmt(f, json_object_get(oh, "mae"), 4);
	fputs(", R² ", f);
	fmt(f, json_object_get(oh, "r2"), 4);
	fputs("\n\nThe full numbers (per redshift and S/N bin, calibration, coverage, MZR) "
	      "are in metrics.json.\n", f);
	return fclose(f) ? -1 : 0;
}

int cmd_eval(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, 0, 'm' },
		{ "data", required_argument, 0, 'd' },
		{ "mc", required_argument, 0, 'M' },
		{ "threads", required_argument, 0, 't' },
		{ "bootstrap", required_argument, 0, 'b' },
		{ "seed", required_argument, 0, 's' },
		{ "report", required_argument, 0, 'r' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	const char *model_path = NULL, *report = NULL, *schemas = getenv("MTLZ_SCHEMA_DIR");
	char *data[256], err[1024];
	int n_data = 0, mc = 100, threads = 0, n_boot = 0, opt, rc = EXIT_RUNTIME;
	unsigned long long seed = 1;
	mtlz_dataset d = { 0 };
	mtlz_prep_opts prep;
	mtlz_model *m = NULL;
	mtlz_avro *avro = NULL;
	mtlz_engine *e = NULL;
	mtlz_engine_opts eo;
	mtlz_eval_item *items = NULL;
	mtlz_output *out = NULL;
	mtlz_metrics_opts mo = { 0 };
	json_t *j = NULL;
	const int B = 64;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "m:d:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'm': model_path = optarg; break;
		case 'd':
			if (n_data < 256)
				data[n_data++] = optarg;
			break;
		case 'M':
			if (cli_parse_int(optarg, 0, 10000, &mc) < 0) {
				cli_error("eval: --mc '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 't':
			if (cli_parse_int(optarg, 1, 1024, &threads) < 0) {
				cli_error("eval: --threads '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'b':
			if (cli_parse_int(optarg, 0, 100000, &n_boot) < 0) {
				cli_error("eval: --bootstrap '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 's': seed = strtoull(optarg, NULL, 10); break;
		case 'r': report = optarg; break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	for (int i = optind; i < argc && n_data < 256; i++)
		data[n_data++] = argv[i];
	if (!model_path || !n_data) {
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	m = mtlz_model_load(model_path, err, sizeof(err));
	avro = m ? mtlz_avro_new(schemas ? schemas : MTLZ_SCHEMA_DIR, NULL, err, sizeof(err)) : NULL;
	if (!avro) {
		cli_error("eval: %s", err);
		goto out;
	}
	mtlz_prep_opts_default(&prep);
	prep.grid = *mtlz_model_grid(m);
	if (mtlz_dataset_load(&d, avro, data, n_data, &prep, err, sizeof(err))) {
		cli_error("eval: %s", err);
		goto out;
	}
	mtlz_engine_opts_default(&eo);
	eo.max_batch = B;
	eo.mc_samples = mc;
	if (threads)
		eo.n_threads = threads;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	if (!e || mtlz_engine_set_model(e, m, err, sizeof(err))) {
		cli_error("eval: %s", err);
		goto out;
	}
	items = calloc(d.n + 1, sizeof(*items));
	out = calloc(B, sizeof(*out));
	if (!items || !out) {
		cli_error("eval: out of memory");
		goto out;
	}
	for (size_t s = 0; s < d.n; s += B) {
		const int nb = (int)MTLZ_MIN((size_t)B, d.n - s);

		if (mtlz_engine_run(e, d.x + s * (size_t)d.L, nb, mc, out, err, sizeof(err))) {
			cli_error("eval: %s", err);
			goto out;
		}
		for (int i = 0; i < nb; i++) {
			mtlz_eval_item *it = &items[s + (size_t)i];

			it->true_cls = d.cls[s + (size_t)i];
			for (int k = 0; k < 4; k++) {
				it->prob[k] = out[i].prob[k];
				/* log p: softmax(log p / T) is temperature scaling */
				it->logit[k] = logf(MTLZ_MAX(out[i].prob[k], 1e-30f));
			}
			it->oh_true = d.oh[s + (size_t)i];
			it->oh_pred = out[i].metal;
			it->oh_sigma = out[i].metal_sigma;
			it->z = d.z[s + (size_t)i];
			it->sn_r = d.sn_r[s + (size_t)i];
			it->log_mass = d.log_mass[s + (size_t)i];
		}
	}
	mo.n_boot = n_boot;
	mo.seed = seed;
	j = mtlz_metrics_json_opts(items, d.n, &mo, err, sizeof(err));
	if (!j) {
		cli_error("eval: %s", err);
		goto out;
	}
	json_object_set_new(j, "model", json_string(model_path));
	json_object_set_new(j, "rejected_by_preprocessing", json_integer((json_int_t)d.n_rejected));
	if (json_dumpf(j, stdout, JSON_INDENT(1) | JSON_REAL_PRECISION(8)) || putchar('\n') == EOF) {
		cli_error("eval: cannot write the metrics");
		goto out;
	}
	if (report && write_report(report, model_path, j, data, n_data))
		goto out;
	fprintf(stderr, "mtlz: eval: %zu spectra (%zu rejected by preprocessing), accuracy %.4f\n",
		d.n, d.n_rejected, json_number_value(json_object_get(j, "accuracy")));
	rc = EXIT_OK;
out:
	json_decref(j);
	free(items);
	free(out);
	mtlz_engine_free(e);
	mtlz_dataset_free(&d);
	mtlz_avro_free(avro);
	mtlz_model_free(m);
	return rc;
}
