/*
 * cmd_consume.c - `mtlz consume`: reads mtlzd's result topic from the
 * beginning, decodes each message with schemas/result.avsc alone and prints
 * one row per result (the same columns as `mtlz classify`, plus where the
 * input came from). Stops after --count results or --timeout seconds
 * without a new one.
 */
#define _GNU_SOURCE
#include "avro_io.h"
#include "cli.h"
#include "common.h"
#include "preprocess.h"

#include <getopt.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char usage[] =
	"usage: mtlz consume --brokers B [--topic results] [--count N] [--timeout S]\n"
	"Prints mtlzd's results from the start of the topic as CSV:\n"
	"  spec_id,class,p_passive,p_star_forming,p_composite,p_agn,oh,oh_sigma,flags,\n"
	"  model_sha256,source_topic,source_partition,source_offset\n"
	"  -b, --brokers B   bootstrap servers\n"
	"  -t, --topic T     result topic (default results)\n"
	"  -n, --count N     stop after N results\n"
	"  -w, --timeout S   stop after S seconds without a result (default 10)\n"
	"  -s, --stats       print only a summary: count, rate between the first and\n"
	"                    last processed_at, and latency = processed_at - input\n"
	"                    message timestamp (header mtlz.source.timestamp_ms)\n";

static int cmp_i64(const void *a, const void *b)
{
	const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return x < y ? -1 : x > y;
}

static const char *const class_names[] = { "passive", "star_forming", "composite", "agn" };

int cmd_consume(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "brokers", required_argument, 0, 'b' }, { "topic", required_argument, 0, 't' },
		{ "count", required_argument, 0, 'n' },   { "timeout", required_argument, 0, 'w' },
		{ "stats", no_argument, 0, 's' },
		{ "help", no_argument, 0, 'h' },          { 0, 0, 0, 0 },
	};
	const char *brokers = NULL, *topic = "results", *schemas = getenv("MTLZ_SCHEMA_DIR");
	int count = -1, timeout = 10, opt, n = 0, n_bad = 0, stats = 0;
	int64_t *lat = NULL, first_us = INT64_MAX, last_us = INT64_MIN;
	size_t n_lat = 0, cap_lat = 0;
	rd_kafka_conf_t *kc;
	rd_kafka_t *rk;
	rd_kafka_topic_partition_list_t *sub;
	mtlz_avro *avro;
	char err[512], group[64];
	double last;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "b:t:n:w:sh", opts, NULL)) != -1) {
		switch (opt) {
		case 'b': brokers = optarg; break;
		case 't': topic = optarg; break;
		case 'n':
			if (mtlz_parse_int(optarg, 0, 1 << 30, &count) < 0) {
				cli_error("consume: --count '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'w':
			if (mtlz_parse_int(optarg, 1, 86400, &timeout) < 0) {
				cli_error("consume: --timeout '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 's': stats = 1; break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	if (!brokers || optind != argc) {
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	avro = mtlz_avro_new(schemas ? schemas : MTLZ_SCHEMA_DIR, NULL, err, sizeof(err));
	if (!avro) {
		cli_error("consume: %s", err);
		return EXIT_RUNTIME;
	}
	kc = rd_kafka_conf_new();
	snprintf(group, sizeof(group), "mtlz-consume-%ld", (long)getpid());
	if (rd_kafka_conf_set(kc, "bootstrap.servers", brokers, err, sizeof(err)) ||
	    rd_kafka_conf_set(kc, "group.id", group, err, sizeof(err)) ||
	    rd_kafka_conf_set(kc, "auto.offset.reset", "earliest", err, sizeof(err)) ||
	    rd_kafka_conf_set(kc, "enable.auto.commit", "false", err, sizeof(err)) ||
	    /* results of aborted transactions (exactly_once) are not shown */
	    rd_kafka_conf_set(kc, "isolation.level", "read_committed", err, sizeof(err))) {
		cli_error("consume: %s", err);
		rd_kafka_conf_destroy(kc);
		mtlz_avro_free(avro);
		return EXIT_USAGE;
	}
	rk = rd_kafka_new(RD_KAFKA_CONSUMER, kc, err, sizeof(err));
	if (!rk) {
		cli_error("consume: %s", err);
		mtlz_avro_free(avro);
		return EXIT_RUNTIME;
	}
	rd_kafka_poll_set_consumer(rk);
	sub = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(sub, topic, RD_KAFKA_PARTITION_UA);
	rd_kafka_subscribe(rk, sub);
	rd_kafka_topic_partition_list_destroy(sub);
	if (!stats)
		printf("spec_id,class,p_passive,p_star_forming,p_composite,p_agn,oh,oh_sigma,flags,"
		       "model_sha256,source_topic,source_partition,source_offset\n");
	last = mtlz_now();
	while ((count < 0 || n < count) && mtlz_now() - last < timeout) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 200);
		mtlz_result_rec r;
		char flags[160];

		if (!m)
			continue;
		if (m->err) {
			if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
				cli_error("consume: %s", rd_kafka_message_errstr(m));
			rd_kafka_message_destroy(m);
			continue;
		}
		last = mtlz_now();
		if (mtlz_avro_decode_result(avro, m->payload, m->len, &r, err, sizeof(err))) {
			cli_error("consume: %s[%" PRId32 "]@%" PRId64 ": %s", topic,
				  m->partition, m->offset, err);
			n_bad++;
			rd_kafka_message_destroy(m);
			continue;
		}
		if (stats) {
			rd_kafka_headers_t *h;
			const void *v;
			size_t vl;

			first_us = MTLZ_MIN(first_us, r.processed_us);
			last_us = MTLZ_MAX(last_us, r.processed_us);
			if (rd_kafka_message_headers(m, &h) == 0 &&
			    rd_kafka_header_get_last(h, "mtlz.source.timestamp_ms", &v, &vl) == 0 &&
			    vl < 24) {
				char ts[24];

				memcpy(ts, v, vl);
				ts[vl] = '\0';
				if (n_lat == cap_lat) {
					cap_lat = cap_lat ? 2 * cap_lat : 1024;
					lat = realloc(lat, cap_lat * sizeof(*lat));
				}
				lat[n_lat++] = r.processed_us - 1000 * strtoll(ts, NULL, 10);
			}
			n++;
			rd_kafka_message_destroy(m);
			continue;
		}
		printf("%s,%s,%.6f,%.6f,%.6f,%.6f,", r.spec_id,
		       r.cls >= 0 && r.cls < 4 ? class_names[r.cls] : "?",
		       (double)r.prob[0], (double)r.prob[1], (double)r.prob[2], (double)r.prob[3]);
		if (r.has_metal)
			printf("%.4f,%.4f,", r.oh, r.oh_sigma);
		else
			printf(",,");
		printf("%s,%s,%s,%" PRId32 ",%" PRId64 "\n",
		       mtlz_flags_str(r.flags, flags, sizeof(flags)), r.model_sha256,
		       r.source_topic, r.source_partition, r.source_offset);
		fflush(stdout);
		n++;
		rd_kafka_message_destroy(m);
	}
	rd_kafka_consumer_close(rk);
	rd_kafka_destroy(rk);
	mtlz_avro_free(avro);
	if (stats) {
		const double span = n > 1 ? (last_us - first_us) / 1e6 : 0;

		qsort(lat, n_lat, sizeof(*lat), cmp_i64);
		printf("results=%d span_s=%.3f rate=%.1f results/s", n, span,
		       span > 0 ? (n - 1) / span : 0.0);
		if (n_lat)
			printf(" latency_ms p50=%.2f p99=%.2f max=%.2f",
			       lat[n_lat / 2] / 1e3, lat[(size_t)(n_lat * 0.99)] / 1e3,
			       lat[n_lat - 1] / 1e3);
		printf("\n");
		free(lat);
	}
	fprintf(stderr, "mtlz: %d results%s\n", n, n_bad ? ", some undecodable" : "");
	return n_bad || (count >= 0 && n < count) ? EXIT_RUNTIME : EXIT_OK;
}
