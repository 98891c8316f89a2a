/*
 * cmd_calibrate.c - `mtlz calibrate --model IN --data DIR... -o OUT
 * [--split validation|all] [--seed S]`: fits the temperature of the class
 * softmax of an existing model on labelled archives and writes the model
 * with it in metadata "mtlz.calibration" (core/calib.h; the same fit
 * mtlz-retrain makes at the end of a run).
 *
 * --split validation (the default) fits on the validation part of the
 * split the model was trained with: mtlz-retrain's stratified split
 * (core/retrain.h: mtlz_retrain_split) re-derived from the seed and the
 * fractions in the model's "mtlz.training" manifest, over the same
 * archives (checked against the manifest's SHA-256 list). --seed S gives
 * the seed for a model without a manifest or overrides it (then data that
 * differ from the manifest's only warn). --split all fits on every
 * spectrum given (archives the model never saw).
 */
#define _POSIX_C_SOURCE 200809L
#include "archive.h"
#include "calib.h"
#include "cli.h"
#include "common.h"
#include "dataset.h"
#include "model.h"
#include "retrain.h"
#include "train.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char usage[] =
	"usage: mtlz calibrate --model IN --data DIR|FILE [--data ...] -o OUT [options]\n"
	"Fits the temperature T of the class softmax, softmax(logits / T), by minimum\n"
	"negative log-likelihood on labelled archives and writes the model with it\n"
	"(metadata mtlz.calibration; every engine applies it). The calibration JSON\n"
	"goes to stdout.\n"
	"  -m, --model FILE      the model to calibrate (safetensors)\n"
	"  -d, --data PATH       archive directory or .avro file (repeatable; further\n"
	"                        non-option arguments are data too)\n"
	"  -o, --output FILE     the calibrated model (written atomically; may be IN)\n"
	"      --split validation|all\n"
	"                        validation (default): the validation part of the model's\n"
	"                        training split, re-derived from its mtlz.training\n"
	"                        manifest (same archives needed); all: every spectrum\n"
	"      --seed S          split seed (default: the manifest's)\n"
	"      --threads T       threads of the forward pass (default: all cores)\n";

/* Whether the archives' files are, in order, those the manifest lists (by
 * SHA-256); explains the first difference in why. 1 same, 0 different,
 * -1 the files cannot be read. */
static int same_data(json_t *man_data, char **data, int n_data, char *why, size_t why_size)
{
	size_t k = 0;

	for (int i = 0; i < n_data; i++) {
		char **files, err[512];
		int n;

		if (mtlz_archive_files(data[i], &files, &n, err, sizeof(err))) {
			snprintf(why, why_size, "%s", err);
			return -1;
		}
		for (int f = 0; f < n; f++, k++) {
			const char *want = json_string_value(
				json_object_get(json_array_get(man_data, k), "sha256"));
			char hex[65] = "";

			if (mtlz_sha256_file(files[f], hex, err, sizeof(err))) {
				snprintf(why, why_size, "%s", err);
				mtlz_archive_files_free(files, n);
				return -1;
			}
			if (!want || strcmp(want, hex)) {
				snprintf(why, why_size, "%s is not the training's file %zu (%s)",
					 files[f], k + 1, want ? "a different SHA-256" : "more files");
				mtlz_archive_files_free(files, n);
				return 0;
			}
		}
		mtlz_archive_files_free(files, n);
	}
	if (k != json_array_size(man_data)) {
		snprintf(why, why_size, "%zu archive files given, the training read %zu", k,
			 json_array_size(man_data));
		return 0;
	}
	return 1;
}

int cmd_calibrate(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, 0, 'm' },
		{ "data", required_argument, 0, 'd' },
		{ "output", required_argument, 0, 'o' },
		{ "split", required_argument, 0, 'S' },
		{ "seed", required_argument, 0, 's' },
		{ "threads", required_argument, 0, 't' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	const char *model_path = NULL, *out_path = NULL, *split = "validation";
	const char *schemas = getenv("MTLZ_SCHEMA_DIR");
	char *data[256], err[1024], why[1024];
	int n_data = 0, threads = 0, seed_given = 0, opt, rc = EXIT_RUNTIME;
	unsigned long long seed = 0;
	const int B = 64;
	mtlz_dataset d = { 0 };
	mtlz_prep_opts prep;
	mtlz_model *m = NULL;
	mtlz_avro *avro = NULL;
	mtlz_trainer *t = NULL;
	mtlz_eval_item *items = NULL;
	mtlz_calib c;
	json_t *man = NULL;
	uint8_t *part = NULL;
	size_t *idx = NULL, n_idx = 0;
	char *js = NULL;
	double T_old;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "m:d:o:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'm': model_path = optarg; break;
		case 'd':
			if (n_data < 256)
				data[n_data++] = optarg;
			break;
		case 'o': out_path = optarg; break;
		case 'S':
			if (strcmp(optarg, "validation") && strcmp(optarg, "all")) {
				cli_error("calibrate: --split '%s': validation or all", optarg);
				return EXIT_USAGE;
			}
			split = optarg;
			break;
		case 's': {
			char *end;

			errno = 0;
			seed = strtoull(optarg, &end, 10);
			if (errno || end == optarg || *end) {
				cli_error("calibrate: --seed '%s' is not a number", optarg);
				return EXIT_USAGE;
			}
			seed_given = 1;
			break;
		}
		case 't':
			if (mtlz_parse_int(optarg, 1, 1024, &threads) < 0) {
				cli_error("calibrate: --threads '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	for (int i = optind; i < argc && n_data < 256; i++)
		data[n_data++] = argv[i];
	if (!model_path || !n_data || !out_path) {
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	m = mtlz_model_load(model_path, err, sizeof(err));
	if (!m) {
		cli_error("calibrate: %s", err);
		return EXIT_RUNTIME;
	}
	T_old = mtlz_model_temperature(m);
	if (mtlz_model_meta(m, "mtlz.training"))
		man = json_loads(mtlz_model_meta(m, "mtlz.training"), 0, NULL);
	if (!strcmp(split, "validation")) {
		json_t *sp = json_object_get(man, "split"), *hp = json_object_get(man, "hyperparameters");

		if (!seed_given && !json_is_integer(json_object_get(sp, "seed"))) {
			cli_error("calibrate: %s has no training manifest with the split's seed "
				  "(mtlz.training): give --seed S (the training run's) or --split all",
				  model_path);
			rc = EXIT_USAGE;
			goto out;
		}
		if (!seed_given)
			seed = (unsigned long long)json_integer_value(json_object_get(sp, "seed"));
		if (!strcmp(json_string_value(json_object_get(hp, "task")) ?
			    json_string_value(json_object_get(hp, "task")) : "", "metal"))
			cli_error("calibrate: warning: %s was trained for the metallicity only; its "
				  "class head is untrained", model_path);
	}
	avro = mtlz_avro_new(schemas ? schemas : MTLZ_SCHEMA_DIR, NULL, err, sizeof(err));
	if (!avro) {
		cli_error("calibrate: %s", err);
		goto out;
	}
	mtlz_prep_opts_default(&prep);
	prep.grid = *mtlz_model_grid(m);
	if (mtlz_dataset_load(&d, avro, data, n_data, &prep, err, sizeof(err))) {
		cli_error("calibrate: %s", err);
		goto out;
	}
	idx = malloc((d.n + 1) * sizeof(*idx));
	part = malloc(d.n + 1);
	items = calloc(d.n + 1, sizeof(*items));
	if (!idx || !part || !items) {
		cli_error("calibrate: out of memory");
		goto out;
	}
	if (!strcmp(split, "validation")) {
		json_t *hp = json_object_get(man, "hyperparameters");
		json_t *ft = json_object_get(hp, "frac_train"), *fv = json_object_get(hp, "frac_val");
		const double frac_train = json_is_number(ft) ? json_number_value(ft) : 0.6;
		const double frac_val = json_is_number(fv) ? json_number_value(fv) : 0.2;
		json_t *md = json_object_get(man, "data");

		if (json_is_array(md)) {
			const int same = same_data(md, data, n_data, why, sizeof(why));

			if (same < 0) {
				cli_error("calibrate: %s", why);
				goto out;
			}
			if (!same && !seed_given) {
				cli_error("calibrate: the data are not those %s was trained on (%s): "
					  "its validation split cannot be re-derived; give the training "
					  "archives, or --split all", model_path, why);
				goto out;
			}
			if (!same)
				cli_error("calibrate: warning: the data are not those %s was trained "
					  "on (%s): the split from seed %llu is not its validation split",
					  model_path, why, seed);
		}
		mtlz_retrain_split(d.cls, d.n, frac_train, frac_val, (uint64_t)seed, part);
		for (size_t i = 0; i < d.n; i++)
			if (part[i] == 1)
				idx[n_idx++] = i;
	} else {
		for (size_t i = 0; i < d.n; i++)
			idx[n_idx++] = i;
	}
	if (!n_idx) {
		cli_error("calibrate: no spectrum to fit on (%s split of %zu usable spectra)", split,
			  d.n);
		goto out;
	}
	t = mtlz_trainer_new(m, B, threads ? threads : (int)sysconf(_SC_NPROCESSORS_ONLN), err,
			     sizeof(err));
	if (!t || mtlz_calib_collect(t, B, &d, idx, n_idx, items, err, sizeof(err)) ||
	    mtlz_calib_fit(items, n_idx, &c, err, sizeof(err))) {
		cli_error("calibrate: %s", err);
		goto out;
	}
	js = mtlz_calib_json(&c, split);
	if (!js || mtlz_model_set_meta(m, "mtlz.calibration", js)) {
		cli_error("calibrate: out of memory");
		goto out;
	}
	if (mtlz_model_save(m, out_path, err, sizeof(err))) {
		cli_error("calibrate: %s", err);
		goto out;
	}
	printf("%s\n", js);
	fprintf(stderr, "mtlz: calibrate: temperature %.4f (was %.4f) fitted on %ld spectra (split "
		"%s), NLL %.4f -> %.4f, ECE %.4f -> %.4f -> %s\n", c.temperature, T_old, c.n,
		split, c.nll_before, c.nll_after, c.ece_before, c.ece_after, out_path);
	rc = EXIT_OK;
out:
	free(js);
	free(idx);
	free(part);
	free(items);
	json_decref(man);
	mtlz_trainer_free(t);
	mtlz_dataset_free(&d);
	mtlz_avro_free(avro);
	mtlz_model_free(m);
	return rc;
}
