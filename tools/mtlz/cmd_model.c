/*
 * cmd_model.c - `mtlz init` (random model) and `mtlz info` (describe one).
 */
#include "cli.h"
#include "common.h"
#include "model.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char init_usage[] =
	"usage: mtlz init -o MODEL.safetensors [options]\n"
	"Writes a randomly initialised, untrained model (PyTorch's default\n"
	"initialisation, deterministic for a seed) with the paper's architecture\n"
	"unless options change it.\n"
	"  -o, --output FILE            where to write (required)\n"
	"      --seed N                 random seed (default 1)\n"
	"      --channels C1,C2,...     conv block channels (default 16,32,64,128,256)\n"
	"      --hidden H1,H2           head hidden sizes (default 128,64)\n"
	"      --attention-reduction R  SE squeeze C/R channels; 0 = off (default 16)\n"
	"      --dropout P              head dropout rate (default 0.5)\n";

int cmd_init(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "output", required_argument, 0, 'o' },
		{ "seed", required_argument, 0, 's' },
		{ "channels", required_argument, 0, 'c' },
		{ "hidden", required_argument, 0, 'H' },
		{ "attention-reduction", required_argument, 0, 'r' },
		{ "dropout", required_argument, 0, 'd' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	const char *out = NULL;
	unsigned long long seed = 1;
	mtlz_arch a;
	mtlz_grid g;
	mtlz_model *m;
	char err[512], *end;
	int c, rc;

	mtlz_arch_default(&a);
	mtlz_grid_default(&g);
	optind = 1;
	while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
		switch (c) {
		case 'o': out = optarg; break;
		case 's':
			seed = strtoull(optarg, &end, 0);
			if (*end) {
				cli_error("init: --seed '%s' is not a number", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'c':
			a.n_blocks = cli_parse_int_list(optarg, 1, 4096, a.channels, MTLZ_MAX_BLOCKS);
			if (a.n_blocks < 0) {
				cli_error("init: --channels '%s' must be 1..%d sizes", optarg, MTLZ_MAX_BLOCKS);
				return EXIT_USAGE;
			}
			break;
		case 'H':
			a.n_hidden = cli_parse_int_list(optarg, 1, 65536, a.hidden, MTLZ_MAX_HIDDEN);
			if (a.n_hidden < 0) {
				cli_error("init: --hidden '%s' must be 1..%d sizes", optarg, MTLZ_MAX_HIDDEN);
				return EXIT_USAGE;
			}
			break;
		case 'r':
			if (mtlz_parse_int(optarg, 0, 4096, &a.attention_reduction) < 0) {
				cli_error("init: --attention-reduction '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'd':
			a.dropout = strtof(optarg, &end);
			if (*end) {
				cli_error("init: --dropout '%s' is not a number", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'h': fputs(init_usage, stdout); return EXIT_OK;
		default: fputs(init_usage, stderr); return EXIT_USAGE;
		}
	}
	if (!out || optind != argc) {
		fputs(init_usage, stderr);
		return EXIT_USAGE;
	}
	if (mtlz_arch_validate(&a, err, sizeof(err)) != MTLZ_OK) {
		cli_error("init: %s", err);
		return EXIT_USAGE;
	}
	m = mtlz_model_new_random(&a, &g, seed, err, sizeof(err));
	if (!m) {
		cli_error("init: %s", err);
		return EXIT_RUNTIME;
	}
	rc = mtlz_model_save(m, out, err, sizeof(err));
	if (rc != MTLZ_OK)
		cli_error("init: %s", err);
	else
		fprintf(stderr, "mtlz: wrote %s (%zu parameters, seed %llu, untrained)\n",
			out, mtlz_model_n_params(m), seed);
	mtlz_model_free(m);
	return rc == MTLZ_OK ? EXIT_OK : EXIT_RUNTIME;
}

int cmd_info(int argc, char **argv)
{
	const mtlz_arch *a;
	const mtlz_grid *g;
	mtlz_model *m;
	double off, scale;
	char err[512];

	if (argc == 2 && strcmp(argv[1], "--help") == 0) {
		puts("usage: mtlz info MODEL.safetensors\n"
		     "Prints the architecture, parameter count, cost and metadata.");
		return EXIT_OK;
	}
	if (argc != 2) {
		fputs("usage: mtlz info MODEL.safetensors\n", stderr);
		return EXIT_USAGE;
	}
	m = mtlz_model_load(argv[1], err, sizeof(err));
	if (!m) {
		cli_error("%s", err);
		return EXIT_RUNTIME;
	}
	a = mtlz_model_arch(m);
	g = mtlz_model_grid(m);
	mtlz_model_target(m, &off, &scale);
	printf("model: %s\n", argv[1]);
	printf("grid: %g-%g A step %g (%d pixels)\n", g->wmin, g->wmax, g->dw,
	       a->input_length);
	printf("blocks: %d x [conv k=%d pad=%d, ReLU, conv, ReLU, maxpool %d]; channels",
	       a->n_blocks, a->kernel, a->padding, a->pool);
	for (int b = 0; b < a->n_blocks; b++)
		printf("%s%d", b ? "," : " ", a->channels[b]);
	printf("\nfeature length after backbone: %d\n", mtlz_arch_length_after(a, a->n_blocks));
	if (a->attention_reduction)
		printf("attention: squeeze-and-excitation %d -> %d -> %d\n",
		       a->channels[a->n_blocks - 1],
		       a->channels[a->n_blocks - 1] / a->attention_reduction,
		       a->channels[a->n_blocks - 1]);
	else
		printf("attention: off\n");
	printf("heads: dropout %.3g, hidden", (double)a->dropout);
	for (int i = 0; i < a->n_hidden; i++)
		printf("%s%d", i ? "," : " ", a->hidden[i]);
	printf("; classes");
	for (int c = 0; c < a->n_classes; c++)
		printf("%s%s", c ? "," : " ", mtlz_model_class_name(m, c));
	printf("; metallicity = output * %.9g + %.9g\n", scale, off);
	printf("parameters: %zu\n", mtlz_model_n_params(m));
	printf("cost: %.1f MFLOP per spectrum\n", mtlz_arch_flops(a) / 1e6);
	for (size_t i = 0; i < mtlz_model_meta_count(m); i++) {
		const char *k, *v;

		mtlz_model_meta_at(m, i, &k, &v);
		printf("meta %s: %s\n", k, v);
	}
	mtlz_model_free(m);
	return EXIT_OK;
}
