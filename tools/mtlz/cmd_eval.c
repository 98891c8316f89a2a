/*
 * cmd_eval.c - `mtlz eval --model MODEL --data DIR... [--report DIR]`: runs
 * a model over labelled archives with the inference engine (as mtlzd would)
 * and prints the paper's metrics as JSON on stdout (core/metrics.h: key
 * names are a contract). --report DIR also writes metrics.json, the
 * figures as PNG and a report.md page that collects them (core/report.h,
 * docs/report.md). The evaluation itself is mtlz_report_eval, shared with
 * `mtlz-retrain --eval`.
 */
#include "cli.h"
#include "common.h"
#include "report.h"

#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

static const char usage[] =
	"usage: mtlz eval --model MODEL --data DIR|FILE [--data ...] [options]\n"
	"Evaluates a model on labelled archives; prints the metrics as JSON on stdout.\n"
	"  -m, --model FILE     the model (safetensors)\n"
	"  -d, --data PATH      archive directory or .avro file (repeatable)\n"
	"      --mc N           MC-dropout passes for the metallicity sigma (default 100)\n"
	"      --threads T      engine threads (default: all cores)\n"
	"      --bootstrap N    bootstrap resamples for confidence intervals (default 0)\n"
	"      --seed S         bootstrap seed (default 1)\n"
	"      --report DIR     also write DIR/metrics.json, the figures (PNG) and\n"
	"                       DIR/report.md (docs/report.md)\n"
	"      --plot-size WxH  size of the figures in pixels (default 960x720)\n";

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
		{ "plot-size", required_argument, 0, 'P' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	const char *schemas = getenv("MTLZ_SCHEMA_DIR");
	char *data[256], err[1024], tail;
	int n_data = 0, opt, rc = EXIT_RUNTIME;
	mtlz_report_eval_opts o = { .mc = 100, .seed = 1 };
	json_t *j;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "m:d:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'm': o.model = optarg; break;
		case 'd':
			if (n_data < 256)
				data[n_data++] = optarg;
			break;
		case 'M':
			if (mtlz_parse_int(optarg, 0, 10000, &o.mc) < 0) {
				cli_error("eval: --mc '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 't':
			if (mtlz_parse_int(optarg, 1, 1024, &o.threads) < 0) {
				cli_error("eval: --threads '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'b':
			if (mtlz_parse_int(optarg, 0, 100000, &o.n_boot) < 0) {
				cli_error("eval: --bootstrap '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 's': o.seed = strtoull(optarg, NULL, 10); break;
		case 'r': o.report_dir = optarg; break;
		case 'P':
			if (sscanf(optarg, "%dx%d%c", &o.width, &o.height, &tail) != 2 ||
			    o.width < 200 || o.height < 150 || o.width > 10000 || o.height > 10000) {
				cli_error("eval: --plot-size '%s' invalid (WxH, 200x150 .. 10000x10000)",
					  optarg);
				return EXIT_USAGE;
			}
			break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	for (int i = optind; i < argc && n_data < 256; i++)
		data[n_data++] = argv[i];
	if (!o.model || !n_data) {
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	o.data = data;
	o.n_data = n_data;
	o.schema_dir = schemas ? schemas : MTLZ_SCHEMA_DIR;
	j = mtlz_report_eval(&o, NULL, NULL, err, sizeof(err));
	if (!j) {
		cli_error("eval: %s", err);
		return EXIT_RUNTIME;
	}
	if (json_dumpf(j, stdout, JSON_INDENT(1) | JSON_REAL_PRECISION(8)) || putchar('\n') == EOF ||
	    fflush(stdout)) {
		cli_error("eval: cannot write the metrics");
		goto out;
	}
	fprintf(stderr, "mtlz: eval: %lld spectra (%lld rejected by preprocessing), accuracy %.4f%s%s\n",
		(long long)json_integer_value(json_object_get(j, "n_items")),
		(long long)json_integer_value(json_object_get(j, "rejected_by_preprocessing")),
		json_number_value(json_object_get(j, "accuracy")),
		o.report_dir ? "; report in " : "", o.report_dir ? o.report_dir : "");
	rc = EXIT_OK;
out:
	json_decref(j);
	return rc;
}
