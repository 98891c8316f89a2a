/*
 * main.c - mtlzd: command line, configuration, signals; the data path is in
 * pipeline.c. Runs in the foreground; under systemd (Type=notify) it sends
 * READY=1 once the model is warm and the consumer has joined its group.
 *
 * Exit codes: 0 clean stop (SIGTERM/SIGINT: drained and committed),
 * 1 runtime / fatal error, 2 usage or configuration error.
 */
#define _GNU_SOURCE
#include "common.h"
#include "conf.h"
#include "log.h"
#include "mtlzd.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static const char usage[] =
	"usage: mtlzd --config FILE [--set KEY=VALUE]... [--check-config]\n"
	"Streams spectra from Kafka through the MTLforGalSpecZ model and\n"
	"publishes Avro results (see etc/mtlzd.yaml for every key).\n"
	"  -c, --config FILE     YAML configuration\n"
	"  -s, --set KEY=VALUE   override a key by its dotted path (repeatable)\n"
	"      --check-config    validate, print the effective configuration, exit\n"
	"  -h, --help, --version\n"
	"Environment: MTLZ_SCHEMA_DIR overrides where spectrum.avsc/result.avsc are;\n"
	"MTLZ_MODEL names the model when model.path is empty (else the installed,\n"
	"else the source tree's models/default.safetensors).\n";

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", required_argument, 0, 'c' },
		{ "set", required_argument, 0, 's' },
		{ "check-config", no_argument, 0, 'C' },
		{ "help", no_argument, 0, 'h' },
		{ "version", no_argument, 0, 'V' },
		{ 0, 0, 0, 0 },
	};
	const char *path = NULL, *model_from = NULL;
	char **sets = calloc((size_t)argc, sizeof(char *)), err[1024];
	int n_sets = 0, check = 0, opt, rc, lvl;
	struct mtlzd d;
	struct sigaction sa;
	mtlz_conf conf;

	/* OpenMP's default wait policy spins idle engine threads for a while
	 * after every batch, taking the core the consume thread needs (measured:
	 * end-to-end 70 % of engine-only with it, 94 % without; docs/daemon.md).
	 * libgomp reads the variable when it loads, so set it and re-exec once;
	 * an operator's own setting is kept. */
	mtlz_omp_passive(argv);
	while ((opt = getopt_long(argc, argv, "c:s:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'c': path = optarg; break;
		case 's': sets[n_sets++] = optarg; break;
		case 'C': check = 1; break;
		case 'h': fputs(usage, stdout); free(sets); return 0;
		case 'V': printf("mtlzd %s (engines: %s)\n", MTLZ_VERSION, mtlz_engine_kinds());
			  free(sets); return 0;
		default: fputs(usage, stderr); free(sets); return 2;
		}
	}
	if (!path || optind != argc) {
		fputs(usage, stderr);
		free(sets);
		return 2;
	}
	mtlz_conf_init(&conf);
	rc = mtlz_conf_load(&conf, path, err, sizeof(err));
	for (int i = 0; rc == MTLZ_OK && i < n_sets; i++)
		rc = mtlz_conf_set(&conf, sets[i], err, sizeof(err));
	free(sets);
	if (rc == MTLZ_OK)   /* model.path "": the default model */
		rc = mtlz_conf_resolve_model(&conf, &model_from, err, sizeof(err));
	if (rc == MTLZ_OK)
		rc = mtlz_conf_validate(&conf, err, sizeof(err));
	if (rc == MTLZ_OK)
		rc = mtlzd_check_kafka(&conf, err, sizeof(err));
	if (rc != MTLZ_OK) {
		fprintf(stderr, "mtlzd: %s\n", err);
		mtlz_conf_free(&conf);
		return 2;
	}
	if (check) {
		if (strcmp(model_from, "model.path"))
			fprintf(stderr, "mtlzd: model.path is empty: default model %s (from %s)\n",
				conf.model_path, model_from);
		mtlz_conf_dump(&conf, stdout);
		mtlz_conf_free(&conf);
		return 0;
	}
	lvl = mtlz_log_level_parse(conf.log_level);
	if (lvl >= 0)
		mtlz_log_level = lvl;
	/* journald stamps each line itself; it sets JOURNAL_STREAM for the
	 * service's stderr */
	mtlz_log_timestamps = !strcmp(conf.log_timestamps, "on") ||
			      (!strcmp(conf.log_timestamps, "auto") && !getenv("JOURNAL_STREAM"));
	if (strcmp(model_from, "model.path"))
		mtlz_log(MTLZ_LOG_INFO, "event=default_model path=%s from=\"%s\"",
			 conf.model_path, model_from);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	if (mtlzd_start(&d, &conf, &stop, err, sizeof(err)) != MTLZ_OK) {
		mtlz_log(MTLZ_LOG_ERROR, "event=start_failed error=\"%s\"", err);
		mtlzd_destroy(&d);
		mtlz_conf_free(&conf);
		return 1;
	}
	rc = mtlzd_run(&d);
	mtlzd_destroy(&d);
	mtlz_conf_free(&conf);
	mtlz_log(MTLZ_LOG_INFO, "event=exit code=%d", rc);
	return rc;
}
