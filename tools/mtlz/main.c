/*
 * main.c - the `mtlz` command-line tool: dispatches to a subcommand.
 * Exit codes: 0 ok, 1 runtime error, 2 usage error.
 */
#include "cli.h"
#include "common.h"
#include "mtlz_engine.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
	"usage: mtlz <command> [options]\n"
	"\n"
	"Classify galaxy spectra (passive, star-forming, composite, AGN) and\n"
	"estimate the gas-phase metallicity 12+log(O/H) with a multi-task 1D CNN\n"
	"(MTLforGalSpecZ).\n"
	"\n"
	"commands:\n"
	"  classify    FITS spectra in, one table row per spectrum out\n"
	"  preprocess  write the model-grid spectra the network sees, as FITS\n"
	"  bench       engine and preprocessing throughput\n"
	"  info        architecture, parameter count and metadata of a model\n"
	"  init        write a randomly initialised (untrained) model\n"
	"  consume     print mtlzd's results from a Kafka topic\n"
	"  import      labelled spectra from JSON lines / CSV into a training archive\n"
	"  archive     SDSS spec files + catalogues -> training archive (paper Sec. 2.1)\n"
	"  synth       synthetic labelled SDSS-like spectra into a training archive\n"
	"  eval        a model's metrics on labelled archives (JSON; --report DIR)\n"
	"  calibrate   fit the class temperature of a model on labelled archives\n"
	"\n"
	"Run 'mtlz <command> --help' for a command's options.\n"
	"options: --help, --version\n";

void cli_error(const char *fmt, ...)
{
	va_list ap;

	fputs("mtlz: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

int cli_parse_int_list(const char *s, int lo, int hi, int *out, int max)
{
	char buf[256], *save = NULL, *tok;
	int n = 0;

	if (strlen(s) >= sizeof(buf))
		return -1;
	strcpy(buf, s);
	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		if (n == max || mtlz_parse_int(tok, lo, hi, &out[n]) < 0)
			return -1;
		n++;
	}
	return n ? n : -1;
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		int (*fn)(int, char **);
	} cmds[] = {
		{ "classify", cmd_classify }, { "preprocess", cmd_preprocess },
		{ "bench", cmd_bench },       { "info", cmd_info },
		{ "init", cmd_init },         { "consume", cmd_consume },
		{ "import", cmd_import },     { "archive", cmd_archive },
		{ "synth", cmd_synth },       { "eval", cmd_eval },
		{ "calibrate", cmd_calibrate },
	};

	if (argc < 2) {
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
	    strcmp(argv[1], "help") == 0) {
		fputs(usage, stdout);
		return EXIT_OK;
	}
	if (strcmp(argv[1], "bench") == 0)   /* --train: as mtlz-retrain runs */
		for (int i = 2; i < argc; i++)
			if (strcmp(argv[i], "--train") == 0)
				mtlz_omp_passive(argv);
	if (strcmp(argv[1], "--version") == 0) {
		printf("mtlz %s (engines: %s)\n", MTLZ_VERSION, mtlz_engine_kinds());
		return EXIT_OK;
	}
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(cmds); i++)
		if (strcmp(argv[1], cmds[i].name) == 0)
			return cmds[i].fn(argc - 1, argv + 1);
	cli_error("unknown command '%s' (try 'mtlz --help')", argv[1]);
	return EXIT_USAGE;
}
