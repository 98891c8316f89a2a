/*
 * cmd_classify.c - `mtlz classify`: FITS spectra in, one row per spectrum
 * out (CSV or JSON lines), in input order. Spectra are micro-batched
 * through the engine exactly as the daemon does; rejected spectra still get
 * a row (class empty, flags REJECTED) and their reason on stderr.
 */
#include "cli.h"
#include "common.h"
#include "conf.h"
#include "mtlz_engine.h"

#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
	"usage: mtlz classify [--model MODEL] [options] FILE...\n"
	"Classifies every spectrum in the SDSS/BOSS spec files and DESI coadds\n"
	"given and prints one row each:\n"
	"  spec_id,class,p_passive,p_star_forming,p_composite,p_agn,oh,oh_sigma,flags\n"
	"oh = 12+log(O/H) and oh_sigma (its MC-dropout 1-sigma) are filled only\n"
	"for spectra classified star-forming (the paper's conditional regression).\n"
	"  -m, --model FILE        model (.safetensors); default: $MTLZ_MODEL, else the\n"
	"                          installed, else the source tree's\n"
	"                          models/default.safetensors (named on stderr)\n"
	"  -f, --format csv|jsonl  output format (default csv)\n"
	"      --mc N              MC-dropout passes for oh_sigma (default 100; 0 = off)\n"
	"      --all-metallicities fill oh/oh_sigma for every class\n"
	"  -t, --threads N         engine threads (default: all cores)\n"
	"  -b, --batch N           micro-batch size (default 64)\n"
	"      --mask-bits BITS    also treat pixels with these and_mask bits as bad\n"
	"                          (number or SDSS names, e.g. NODATA,FULLREJECT)\n"
	"      --seed N            MC-dropout seed (default 42)\n"
	"Exit status: 0 ok, 1 a file could not be read or a runtime error, 2 usage.\n";

struct pending {
	char spec_id[64];
	char source[256];
	double z, sn;
	uint32_t flags;
	int reject;
	int slot;            /* index in the engine batch, -1 if rejected */
};

struct classify {
	mtlz_engine *engine;
	const mtlz_model *model;
	int jsonl, all_metal, mc, batch, sf_class;
	float *x;            /* [batch][L] */
	int L, n_x;
	struct pending *rows;
	int n_rows;
	mtlz_output *out;
	long n_printed, n_rejected;
};

static void print_csv_field(const char *s)
{
	if (!strpbrk(s, ",\"\n")) {
		fputs(s, stdout);
		return;
	}
	putchar('"');
	for (; *s; s++) {
		if (*s == '"')
			putchar('"');
		putchar(*s);
	}
	putchar('"');
}

static void print_row(struct classify *c, const struct pending *p)
{
	const mtlz_output *o = p->slot >= 0 ? &c->out[p->slot] : NULL;
	const int K = mtlz_model_arch(c->model)->n_classes;
	const int with_oh = o && (c->all_metal || o->cls == c->sf_class);
	char flags[160];

	mtlz_flags_str(p->flags, flags, sizeof(flags));
	if (c->jsonl) {
		json_t *j = json_object();
		char *s;

		json_object_set_new(j, "spec_id", json_string(p->spec_id));
		json_object_set_new(j, "class", o ? json_string(mtlz_model_class_name(c->model, o->cls)) : json_null());
		for (int k = 0; k < K; k++) {
			char key[48];

			snprintf(key, sizeof(key), "p_%s", mtlz_model_class_name(c->model, k));
			json_object_set_new(j, key, o ? json_real(o->prob[k]) : json_null());
		}
		json_object_set_new(j, "oh", with_oh ? json_real(o->metal) : json_null());
		json_object_set_new(j, "oh_sigma", with_oh && isfinite(o->metal_sigma) ?
				    json_real(o->metal_sigma) : json_null());
		json_object_set_new(j, "flags", json_string(flags));
		json_object_set_new(j, "reject", p->reject ? json_string(mtlz_reject_str(p->reject)) : json_null());
		json_object_set_new(j, "z", isfinite(p->z) ? json_real(p->z) : json_null());
		json_object_set_new(j, "sn", isfinite(p->sn) ? json_real(p->sn) : json_null());
		json_object_set_new(j, "source", json_string(p->source));
		s = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(7));
		puts(s);
		free(s);
		json_decref(j);
	} else {
		print_csv_field(p->spec_id);
		printf(",%s", o ? mtlz_model_class_name(c->model, o->cls) : "");
		for (int k = 0; k < K; k++)
			o ? printf(",%.6f", (double)o->prob[k]) : printf(",");
		if (with_oh)
			printf(",%.4f", (double)o->metal);
		else
			printf(",");
		if (with_oh && isfinite(o->metal_sigma))
			printf(",%.4f,", (double)o->metal_sigma);
		else
			printf(",,");
		print_csv_field(flags);
		putchar('\n');
	}
	c->n_printed++;
}

static int flush(struct classify *c)
{
	char err[512];

	if (c->n_x && mtlz_engine_run(c->engine, c->x, c->n_x, c->mc, c->out,
				      err, sizeof(err)) != MTLZ_OK) {
		cli_error("classify: %s", err);
		return -1;
	}
	for (int i = 0; i < c->n_rows; i++)
		print_row(c, &c->rows[i]);
	c->n_rows = 0;
	c->n_x = 0;
	return 0;
}

static int on_item(void *opaque, const cli_item *it)
{
	struct classify *c = opaque;
	struct pending *p = &c->rows[c->n_rows++];

	snprintf(p->spec_id, sizeof(p->spec_id), "%s", it->s->spec_id);
	snprintf(p->source, sizeof(p->source), "%s", it->s->source);
	p->z = it->s->z;
	p->sn = it->s->sn;
	p->flags = it->info.flags;
	p->reject = it->info.reject;
	p->slot = -1;
	if (!(it->info.flags & MTLZ_FLAG_REJECTED)) {
		p->slot = c->n_x;
		memcpy(c->x + (size_t)c->n_x * c->L, it->x, (size_t)c->L * sizeof(float));
		c->n_x++;
	} else {
		c->n_rejected++;
	}
	/* rows holds at most 2 * batch entries: rejected rows ride along */
	if (c->n_x == c->batch || c->n_rows == 2 * c->batch)
		return flush(c);
	return 0;
}

int cmd_classify(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "model", required_argument, 0, 'm' },
		{ "format", required_argument, 0, 'f' },
		{ "mc", required_argument, 0, 'M' },
		{ "all-metallicities", no_argument, 0, 'A' },
		{ "threads", required_argument, 0, 't' },
		{ "batch", required_argument, 0, 'b' },
		{ "mask-bits", required_argument, 0, 'k' },
		{ "seed", required_argument, 0, 's' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	struct classify c = { .mc = 100, .batch = 64, .sf_class = -1 };
	const char *model_path = NULL;
	char default_model[4096];
	mtlz_engine_opts eo;
	mtlz_prep_opts po;
	mtlz_model *m = NULL;
	char err[512];
	int opt, rc = EXIT_RUNTIME, n_failed;

	mtlz_engine_opts_default(&eo);
	mtlz_prep_opts_default(&po);
	optind = 1;
	while ((opt = getopt_long(argc, argv, "m:f:t:b:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'm': model_path = optarg; break;
		case 'f':
			if (strcmp(optarg, "csv") && strcmp(optarg, "jsonl")) {
				cli_error("classify: --format must be csv or jsonl, not '%s'", optarg);
				return EXIT_USAGE;
			}
			c.jsonl = strcmp(optarg, "jsonl") == 0;
			break;
		case 'M':
			if (mtlz_parse_int(optarg, 0, 10000, &c.mc) < 0) {
				cli_error("classify: --mc '%s' must be 0..10000", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'A': c.all_metal = 1; break;
		case 't':
			if (mtlz_parse_int(optarg, 1, 1024, &eo.n_threads) < 0) {
				cli_error("classify: --threads '%s' must be 1..1024", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'b':
			if (mtlz_parse_int(optarg, 1, 4096, &c.batch) < 0) {
				cli_error("classify: --batch '%s' must be 1..4096", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'k':
			if (mtlz_mask_bits_parse(optarg, &po.and_mask_bits, err, sizeof(err))) {
				cli_error("classify: --mask-bits: %s", err);
				return EXIT_USAGE;
			}
			break;
		case 's': eo.seed = strtoull(optarg, NULL, 0); break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		cli_error("classify: no input files");
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	if (!model_path) {
		const char *from;

		if (mtlz_default_model(default_model, sizeof(default_model), &from,
				       err, sizeof(err))) {
			cli_error("classify: %s", err);
			return EXIT_RUNTIME;
		}
		model_path = default_model;
		fprintf(stderr, "mtlz: classify: no --model: default model %s (from %s)\n",
			model_path, from);
	}
	m = mtlz_model_load(model_path, err, sizeof(err));
	if (!m) {
		cli_error("%s", err);
		return EXIT_RUNTIME;
	}
	po.grid = *mtlz_model_grid(m);
	eo.max_batch = c.batch;
	eo.mc_samples = c.mc;
	c.model = m;
	c.L = mtlz_model_arch(m)->input_length;
	for (int k = 0; k < mtlz_model_arch(m)->n_classes; k++)
		if (strcmp(mtlz_model_class_name(m, k), "star_forming") == 0)
			c.sf_class = k;
	c.engine = mtlz_engine_new(&eo, err, sizeof(err));
	if (!c.engine || mtlz_engine_set_model(c.engine, m, err, sizeof(err))) {
		cli_error("classify: %s", err);
		goto out;
	}
	c.x = malloc((size_t)c.batch * c.L * sizeof(float));
	c.rows = calloc((size_t)c.batch * 2, sizeof(*c.rows));
	c.out = calloc((size_t)c.batch, sizeof(*c.out));
	if (!c.x || !c.rows || !c.out) {
		cli_error("out of memory");
		goto out;
	}
	if (c.jsonl == 0) {
		printf("spec_id,class");
		for (int k = 0; k < mtlz_model_arch(m)->n_classes; k++)
			printf(",p_%s", mtlz_model_class_name(m, k));
		printf(",oh,oh_sigma,flags\n");
	}
	n_failed = cli_for_each_spectrum(argv + optind, argc - optind, &po, on_item, &c);
	if (n_failed < 0 || flush(&c) < 0)
		goto out;
	fprintf(stderr, "mtlz: %ld spectra, %ld rejected, %d unreadable file%s\n",
		c.n_printed, c.n_rejected, n_failed, n_failed == 1 ? "" : "s");
	rc = n_failed ? EXIT_RUNTIME : EXIT_OK;
out:
	fflush(stdout);
	free(c.x);
	free(c.rows);
	free(c.out);
	mtlz_engine_free(c.engine);
	mtlz_model_free(m);
	return rc;
}
