/*
 * mtlz-devbroker - an embedded Kafka-protocol broker for demos and tests,
 * built on librdkafka's own mock cluster (rdkafka_mock.h). It listens on
 * loopback, creates the topics, prints "bootstrap=HOST:PORT" as its first
 * line on stdout and runs until SIGTERM/SIGINT.
 *
 * Real deployments point mtlzd at any Kafka cluster; this exists so that
 * the README's commands and the integration tests work on a fresh machine
 * with no Kafka installed. Its limits are librdkafka 2.0.2's mock cluster's
 * (docs/daemon.md): no transaction markers, TxnOffsetCommit not stored.
 *
 * Fault injection for tests: SIGUSR1 takes broker 1 down, SIGUSR2 brings it
 * back up, SIGHUP injects request errors (rd_kafka_mock_push_request_errors)
 * of the kind chosen by --hup-errors:
 *   retriable  the next Produce, Fetch and OffsetCommit requests fail with
 *              errors a client retries;
 *   abortable  the next AddPartitionsToTxn fails (TOPIC_AUTHORIZATION_FAILED):
 *              the transaction in progress must be aborted;
 *   fenced     the next EndTxn fails with PRODUCER_FENCED, as when a newer
 *              instance with the same transactional.id has started (the mock
 *              cluster does not fence by itself).
 * The mock checks idempotent sequence numbers only for transactional
 * producers: a Produce error injected while a producer has a later request
 * for the same partition in flight loses the rejected messages (librdkafka
 * counts them acked by the later success). Producers that must lose nothing
 * under retriable errors use max.in.flight.requests.per.connection=1 here
 * (docs/daemon.md, "The dev broker's limits").
 */
#define _DEFAULT_SOURCE
#include "common.h"

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include <getopt.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static volatile sig_atomic_t want_down, want_up, want_errors;

static void on_signal(int sig)
{
	if (sig == SIGHUP)
		want_errors = 1;
	else if (sig == SIGUSR1)
		want_down = 1;
	else if (sig == SIGUSR2)
		want_up = 1;
	else
		stop = 1;
}

static const char usage[] =
	"usage: mtlz-devbroker [--partitions N] [--topics a,b,...] [--brokers N]\n"
	"                      [--bootstrap-file FILE]\n"
	"                      [--hup-errors retriable|abortable|fenced]\n"
	"Starts librdkafka's mock Kafka cluster on loopback, creates the topics\n"
	"(default spectra,results,spectra.dlq with 4 partitions), prints\n"
	"bootstrap=HOST:PORT first on stdout and runs until SIGTERM or SIGINT.\n"
	"SIGUSR1 takes broker 1 down, SIGUSR2 brings it back; SIGHUP injects\n"
	"request errors: retriable (the next Produce, Fetch and OffsetCommit fail;\n"
	"the default), abortable (the next AddPartitionsToTxn fails: the open\n"
	"transaction must abort) or fenced (the next EndTxn says PRODUCER_FENCED).\n"
	"With retriable errors, an idempotent producer with more than one request\n"
	"in flight can lose messages (the mock does not check their sequence):\n"
	"use max.in.flight.requests.per.connection=1.\n";

/* A whole number in [lo, hi] from option `name`'s argument, or -1 with a
 * message naming the option and the value. */
static int whole_arg(const char *name, const char *arg, int lo, int hi, int *out)
{
	if (mtlz_parse_int(arg, lo, hi, out) == 0)
		return 0;
	fprintf(stderr, "mtlz-devbroker: %s '%s': not a whole number from %d to %d\n", name, arg,
		lo, hi);
	return -1;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "partitions", required_argument, 0, 'p' },
		{ "topics", required_argument, 0, 't' },
		{ "brokers", required_argument, 0, 'b' },
		{ "bootstrap-file", required_argument, 0, 'f' },
		{ "hup-errors", required_argument, 0, 'e' },
		{ "help", no_argument, 0, 'h' },
		{ "version", no_argument, 0, 'V' },
		{ 0, 0, 0, 0 },
	};
	const char *topics = "spectra,results,spectra.dlq", *bfile = NULL;
	const char *hup = "retriable";
	int partitions = 4, n_brokers = 1, c;
	char errstr[512], *list, *save = NULL, *tok;
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_mock_cluster_t *mc;
	struct sigaction sa;

	while ((c = getopt_long(argc, argv, "p:t:b:f:h", opts, NULL)) != -1) {
		switch (c) {
		case 'p':
			if (whole_arg("--partitions", optarg, 1, 1000, &partitions))
				return 2;
			break;
		case 't': topics = optarg; break;
		case 'b':
			if (whole_arg("--brokers", optarg, 1, 16, &n_brokers))
				return 2;
			break;
		case 'f': bfile = optarg; break;
		case 'e': hup = optarg; break;
		case 'h': fputs(usage, stdout); return 0;
		case 'V': printf("mtlz-devbroker (librdkafka %s)\n", rd_kafka_version_str()); return 0;
		default: fputs(usage, stderr); return 2;
		}
	}
	if (optind != argc || partitions < 1 || partitions > 1000 || n_brokers < 1 ||
	    n_brokers > 16 || !*topics || (strcmp(hup, "retriable") && strcmp(hup, "abortable") &&
					   strcmp(hup, "fenced"))) {
		fputs(usage, stderr);
		return 2;
	}
	/* The mock cluster builds each fetch response (up to the consumer's
	 * fetch.max.bytes, megabytes) in a fresh buffer. Left to glibc those
	 * come from mmap or from per-thread heaps that are given back when
	 * empty, so every response is page-faulted and zeroed anew: ~7 faults
	 * a spectrum, ~25 % of this process's CPU in a drain (bench/e2e.sh).
	 * Keep them on the heap and keep the heap: a dev broker holds every
	 * message in memory anyway. */
	mallopt(M_MMAP_THRESHOLD, 32 << 20);
	mallopt(M_TRIM_THRESHOLD, 256 << 20);
	conf = rd_kafka_conf_new();
	rd_kafka_conf_set(conf, "log_level", "3", NULL, 0);
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (!rk) {
		fprintf(stderr, "mtlz-devbroker: %s\n", errstr);
		rd_kafka_conf_destroy(conf);
		return 1;
	}
	mc = rd_kafka_mock_cluster_new(rk, n_brokers);
	if (!mc) {
		fprintf(stderr, "mtlz-devbroker: cannot start the mock cluster\n");
		rd_kafka_destroy(rk);
		return 1;
	}
	list = strdup(topics);
	for (tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		rd_kafka_resp_err_t err = rd_kafka_mock_topic_create(mc, tok, partitions, 1);

		if (err) {
			fprintf(stderr, "mtlz-devbroker: topic %s: %s\n", tok, rd_kafka_err2str(err));
			free(list);
			rd_kafka_mock_cluster_destroy(mc);
			rd_kafka_destroy(rk);
			return 1;
		}
	}
	free(list);
	printf("bootstrap=%s\n", rd_kafka_mock_cluster_bootstraps(mc));
	fflush(stdout);
	if (bfile) {
		FILE *f = fopen(bfile, "w");

		if (!f || fprintf(f, "%s\n", rd_kafka_mock_cluster_bootstraps(mc)) < 0 ||
		    fclose(f) != 0) {
			perror(bfile);
			rd_kafka_mock_cluster_destroy(mc);
			rd_kafka_destroy(rk);
			return 1;
		}
	}
	fprintf(stderr, "mtlz-devbroker: %d broker(s), topics %s x %d partitions; "
		"SIGTERM to stop\n", n_brokers, topics, partitions);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	while (!stop) {
		if (want_down) {
			want_down = 0;
			rd_kafka_mock_broker_set_down(mc, 1);
			fprintf(stderr, "mtlz-devbroker: broker 1 down\n");
		}
		if (want_errors) {
			/* Kafka API keys: Produce 0, Fetch 1, OffsetCommit 8,
			 * AddPartitionsToTxn 24, EndTxn 26 */
			want_errors = 0;
			if (strcmp(hup, "abortable") == 0) {
				rd_kafka_mock_push_request_errors(mc, 24, 1,
					RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED);
			} else if (strcmp(hup, "fenced") == 0) {
				rd_kafka_mock_push_request_errors(mc, 26, 1,
					RD_KAFKA_RESP_ERR_PRODUCER_FENCED);
			} else {
			rd_kafka_mock_push_request_errors(mc, 0, 3,
				RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
				RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
				RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS);
			rd_kafka_mock_push_request_errors(mc, 1, 2,
				RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
				RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT);
			rd_kafka_mock_push_request_errors(mc, 8, 2,
				RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
				RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS);
			}
			fprintf(stderr, "mtlz-devbroker: %s request errors injected\n", hup);
		}
		if (want_up) {
			want_up = 0;
			rd_kafka_mock_broker_set_up(mc, 1);
			fprintf(stderr, "mtlz-devbroker: broker 1 up\n");
		}
		usleep(50 * 1000);
	}
	rd_kafka_mock_cluster_destroy(mc);
	rd_kafka_destroy(rk);
	return 0;
}
