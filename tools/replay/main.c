/*
 * mtlz-replay - produces spectra to a Kafka topic, the way a reduction
 * pipeline would: from SDSS/BOSS spec files and DESI coadds (FITS), archived
 * Avro object-container files of spectra (*.avro, read record by record with
 * mtlz_avro_read_container), or directories of them, encoded as Avro
 * (schemas/spectrum.avsc) in the chosen
 * framing. Paced by --rate, bounded by --count, repeated with --loop; waits
 * for every delivery report and prints a progress line each second and a
 * final delivered/failed count. This is how a pipeline team tests mtlzd.
 *
 * Exit codes: 0 everything delivered, 1 some message failed or an input
 * could not be read, 2 usage.
 */
#define _GNU_SOURCE
#include "avro_io.h"
#include "common.h"
#include "fits_io.h"

#include <dirent.h>
#include <getopt.h>
#include <librdkafka/rdkafka.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static long n_delivered, n_failed;

/* The first SIGINT/SIGTERM stops sending; what was sent is still waited
 * for (delivery reports, the final count). A second one stops waiting. */
static void on_signal(int sig)
{
	(void)sig;
	if (stop < 2)
		stop++;
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	(void)rk;
	(void)opaque;
	if (m->err) {
		n_failed++;
		fprintf(stderr, "mtlz-replay: delivery failed: %s\n", rd_kafka_err2str(m->err));
	} else {
		n_delivered++;
	}
}

static const char usage[] =
	"usage: mtlz-replay --brokers B --topic T [--framing F] [--rate R] [--count N]\n"
	"                   [--loop] FILE|DIR...\n"
	"Produces every spectrum of the SDSS/BOSS spec files, DESI coadds and Avro\n"
	"object-container files (*.avro: archived spectrum records, codec null or\n"
	"deflate) given (directories are searched for *.fits, *.fit and *.avro)\n"
	"to topic T as Avro.\n"
	"  -b, --brokers B       bootstrap servers (e.g. the dev broker's bootstrap=)\n"
	"  -t, --topic T         topic\n"
	"  -f, --framing F       single_object (default) | confluent | container\n"
	"      --confluent-id N  schema id for the confluent framing (default 1)\n"
	"  -r, --rate R          spectra per second (default: as fast as possible)\n"
	"  -n, --count N         stop after N messages\n"
	"  -l, --loop            repeat the inputs until --count or SIGINT; pass k > 0\n"
	"                        sends spec_id \"<id>#k\" (distinct ids and keys)\n"
	"  -X, --property K=V    raw librdkafka producer property (repeatable; overrides\n"
	"                        the defaults enable.idempotence=true, linger.ms=5)\n"
	"SIGINT/SIGTERM stops sending, waits for the delivery of what was sent and\n"
	"prints the final count (exit 0 if all delivered); a second one stops waiting.\n"
	"Environment: MTLZ_SCHEMA_DIR overrides where spectrum.avsc is.\n";

struct replay {
	rd_kafka_t *rk;
	mtlz_avro *avro;
	const char *topic;
	int framing, confluent_id;
	double rate, t0, last_progress;
	long count, n_sent, n_bad_inputs;
	mtlz_spectra *cache;      /* --loop: every spectrum read once, kept */
};

static void progress(struct replay *r, int final)
{
	const double dt = mtlz_now() - r->t0;

	fprintf(final ? stdout : stderr,
		"%s sent=%ld delivered=%ld failed=%ld rate=%.1f/s\n",
		final ? "replay: done" : "replay:", r->n_sent, n_delivered, n_failed,
		dt > 0 ? r->n_sent / dt : 0.0);
	fflush(final ? stdout : stderr);
}

/* Produces one spectrum, pacing to --rate. Returns -1 to stop. */
static int send_one(struct replay *r, const mtlz_spectrum *s)
{
	uint8_t *buf = NULL;
	size_t len = 0;
	char err[512];
	rd_kafka_resp_err_t e;

	if (stop || (r->count >= 0 && r->n_sent >= r->count))
		return -1;
	if (r->rate > 0) {
		const double due = r->t0 + r->n_sent / r->rate, now = mtlz_now();

		if (due > now) {
			struct timespec ts = { (time_t)(due - now),
					       (long)((due - now - (time_t)(due - now)) * 1e9) };

			nanosleep(&ts, NULL);
		}
	}
	if (mtlz_avro_encode_spectrum(r->avro, s, r->framing, r->confluent_id, &buf, &len,
				      err, sizeof(err)) != MTLZ_OK) {
		fprintf(stderr, "mtlz-replay: %s: %s\n", s->source, err);
		r->n_bad_inputs++;
		return 0;
	}
	do {
		e = rd_kafka_producev(r->rk, RD_KAFKA_V_TOPIC(r->topic),
				      RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_FREE),
				      RD_KAFKA_V_VALUE(buf, len),
				      RD_KAFKA_V_KEY(s->spec_id, strlen(s->spec_id)),
				      RD_KAFKA_V_END);
		if (e == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			rd_kafka_poll(r->rk, 100);
	} while (e == RD_KAFKA_RESP_ERR__QUEUE_FULL && !stop);
	if (e) {
		free(buf);
		if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL)
			fprintf(stderr, "mtlz-replay: produce: %s\n", rd_kafka_err2str(e));
		return -1;
	}
	r->n_sent++;
	rd_kafka_poll(r->rk, 0);
	if (mtlz_now() - r->last_progress >= 1.0) {
		progress(r, 0);
		r->last_progress = mtlz_now();
	}
	return 0;
}

static int is_fits(const char *name)
{
	const size_t n = strlen(name);

	return (n > 5 && strcmp(name + n - 5, ".fits") == 0) ||
	       (n > 4 && strcmp(name + n - 4, ".fit") == 0);
}

static int is_avro(const char *name)
{
	const size_t n = strlen(name);

	return n > 5 && strcmp(name + n - 5, ".avro") == 0;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int send_file(struct replay *r, const char *path);

/* Every *.fits, *.fit and *.avro file of a directory, in name order, recursively. */
static int send_dir(struct replay *r, const char *dir)
{
	struct dirent *e;
	DIR *dp = opendir(dir);
	char **names = NULL;
	size_t n = 0, cap = 0;
	int rc = 0;

	if (!dp) {
		perror(dir);
		r->n_bad_inputs++;
		return 0;
	}
	while ((e = readdir(dp))) {
		if (e->d_name[0] == '.')
			continue;
		if (n == cap) {
			cap = cap ? 2 * cap : 64;
			names = realloc(names, cap * sizeof(*names));
		}
		if (asprintf(&names[n], "%s/%s", dir, e->d_name) < 0)
			break;
		n++;
	}
	closedir(dp);
	qsort(names, n, sizeof(*names), cmp_str);
	for (size_t i = 0; i < n; i++) {
		struct stat st;

		if (rc == 0 && stat(names[i], &st) == 0 &&
		    (S_ISDIR(st.st_mode) || is_fits(names[i]) || is_avro(names[i])))
			rc = S_ISDIR(st.st_mode) ? send_dir(r, names[i]) : send_file(r, names[i]);
		free(names[i]);
	}
	free(names);
	return rc;
}

/* mtlz_avro_read_container callback: --loop keeps a deep copy in the
 * cache (the record's arrays are freed after the call), else sends it.
 * Returns 1 to stop (send_one said so), 2 when out of memory. */
static int on_record(void *opaque, const mtlz_spectrum *s)
{
	struct replay *r = opaque;
	mtlz_spectrum *c;

	if (!r->cache)
		return send_one(r, s) ? 1 : 0;
	c = mtlz_spectra_push(r->cache);
	if (!c)
		return 2;
	*c = *s;
	c->wave = NULL;
	c->flux = NULL;
	c->ivar = NULL;
	c->and_mask = NULL;
	if (mtlz_spectrum_alloc(c, s->n, s->ivar != NULL, s->and_mask != NULL,
				s->wave != NULL) != MTLZ_OK)
		return 2;
	memcpy(c->flux, s->flux, s->n * sizeof(*s->flux));
	if (s->ivar)
		memcpy(c->ivar, s->ivar, s->n * sizeof(*s->ivar));
	if (s->and_mask)
		memcpy(c->and_mask, s->and_mask, s->n * sizeof(*s->and_mask));
	if (s->wave)
		memcpy(c->wave, s->wave, s->n * sizeof(*s->wave));
	return 0;
}

static int send_file(struct replay *r, const char *path)
{
	mtlz_spectra sp = { 0 };
	struct stat st;
	char err[512];
	int rc = 0;

	if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
		return send_dir(r, path);
	if (is_avro(path)) {
		rc = mtlz_avro_read_container(r->avro, path, on_record, r, err, sizeof(err));
		if (rc == 1)
			return -1;   /* send_one asked to stop */
		if (rc != MTLZ_OK) {
			fprintf(stderr, "mtlz-replay: %s\n", rc == 2
				? "out of memory caching spectra" : err);
			r->n_bad_inputs++;
		}
		return 0;
	}
	if (mtlz_fits_read(path, r->cache ? r->cache : &sp, err, sizeof(err)) != MTLZ_OK) {
		fprintf(stderr, "mtlz-replay: %s\n", err);
		r->n_bad_inputs++;
		return 0;
	}
	if (r->cache)
		return 0; /* sent from the cache */
	for (size_t i = 0; i < sp.n && rc == 0; i++)
		rc = send_one(r, &sp.v[i]);
	mtlz_spectra_free(&sp);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "brokers", required_argument, 0, 'b' }, { "topic", required_argument, 0, 't' },
		{ "framing", required_argument, 0, 'f' }, { "rate", required_argument, 0, 'r' },
		{ "count", required_argument, 0, 'n' },   { "loop", no_argument, 0, 'l' },
		{ "confluent-id", required_argument, 0, 'I' },
		{ "property", required_argument, 0, 'X' }, { "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	struct replay r = { .framing = MTLZ_FRAMING_SINGLE_OBJECT, .confluent_id = 1, .count = -1 };
	const char *brokers = NULL, *schemas = getenv("MTLZ_SCHEMA_DIR");
	rd_kafka_conf_t *kc = rd_kafka_conf_new();
	char err[512], *end;
	int loop = 0, opt, rc = 0;
	struct sigaction sa;

	/* our defaults before the options: -X KEY=VALUE overrides them */
	if (rd_kafka_conf_set(kc, "enable.idempotence", "true", err, sizeof(err)) ||
	    rd_kafka_conf_set(kc, "linger.ms", "5", err, sizeof(err))) {
		fprintf(stderr, "mtlz-replay: %s\n", err);
		return 2;
	}
	while ((opt = getopt_long(argc, argv, "b:t:f:r:n:lX:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'b': brokers = optarg; break;
		case 't': r.topic = optarg; break;
		case 'f':
			r.framing = mtlz_framing_parse(optarg);
			if (r.framing <= 0) {
				fprintf(stderr, "mtlz-replay: unknown framing '%s'\n", optarg);
				return 2;
			}
			break;
		case 'r':
			r.rate = strtod(optarg, &end);
			if (*end || !(r.rate > 0)) {
				fprintf(stderr, "mtlz-replay: --rate '%s' must be > 0\n", optarg);
				return 2;
			}
			break;
		case 'n':
			r.count = strtol(optarg, &end, 10);
			if (*end || r.count < 0) {
				fprintf(stderr, "mtlz-replay: --count '%s' invalid\n", optarg);
				return 2;
			}
			break;
		case 'l': loop = 1; break;
		case 'I': r.confluent_id = atoi(optarg); break;
		case 'X': {
			char *eq = strchr(optarg, '=');

			if (!eq) {
				fprintf(stderr, "mtlz-replay: -X needs KEY=VALUE\n");
				return 2;
			}
			*eq = '\0';
			if (rd_kafka_conf_set(kc, optarg, eq + 1, err, sizeof(err))) {
				fprintf(stderr, "mtlz-replay: %s\n", err);
				return 2;
			}
			break;
		}
		case 'h': fputs(usage, stdout); return 0;
		default: fputs(usage, stderr); return 2;
		}
	}
	if (!brokers || !r.topic || optind >= argc) {
		fputs(usage, stderr);
		return 2;
	}
	r.avro = mtlz_avro_new(schemas ? schemas : MTLZ_SCHEMA_DIR, NULL, err, sizeof(err));
	if (!r.avro) {
		fprintf(stderr, "mtlz-replay: %s\n", err);
		return 1;
	}
	if (rd_kafka_conf_set(kc, "bootstrap.servers", brokers, err, sizeof(err))) {
		fprintf(stderr, "mtlz-replay: %s\n", err);
		return 2;
	}
	rd_kafka_conf_set_dr_msg_cb(kc, on_delivery);
	r.rk = rd_kafka_new(RD_KAFKA_PRODUCER, kc, err, sizeof(err));
	if (!r.rk) {
		fprintf(stderr, "mtlz-replay: %s\n", err);
		return 1;
	}
	{
		/* connect before the clock starts: message timestamps then
		 * measure the pipeline, not our own broker connection */
		const struct rd_kafka_metadata *md = NULL;
		rd_kafka_topic_t *t = rd_kafka_topic_new(r.rk, r.topic, NULL);
		rd_kafka_resp_err_t e = rd_kafka_metadata(r.rk, 0, t, &md, 10000);

		rd_kafka_topic_destroy(t);
		if (e) {
			fprintf(stderr, "mtlz-replay: %s: topic %s: %s\n", brokers, r.topic,
				rd_kafka_err2str(e));
			rd_kafka_destroy(r.rk);
			mtlz_avro_free(r.avro);
			return 1;
		}
		rd_kafka_metadata_destroy(md);
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	r.t0 = r.last_progress = mtlz_now();
	if (loop) {
		/* read every input once; then cycle through them in memory */
		static mtlz_spectra cache;

		r.cache = &cache;
		for (int i = optind; i < argc; i++)
			send_file(&r, argv[i]);
		r.cache = NULL;
		r.t0 = r.last_progress = mtlz_now();
		/* pass k > 0 sends "<spec_id>#k": distinct ids (and record keys,
		 * so partitions) as distinct spectra from a pipeline would have */
		for (long pass = 0; cache.n && rc == 0; pass++)
			for (size_t i = 0; i < cache.n && rc == 0; i++) {
				mtlz_spectrum s = cache.v[i];

				if (pass)
					snprintf(s.spec_id, sizeof(s.spec_id), "%.40s#%ld",
						 cache.v[i].spec_id, pass);
				rc = send_one(&r, &s);
			}
		mtlz_spectra_free(&cache);
	} else {
		for (int i = optind; i < argc && rc == 0; i++)
			rc = send_file(&r, argv[i]);
	}
	while (stop < 2 && rd_kafka_outq_len(r.rk) > 0 &&
	       rd_kafka_flush(r.rk, 1000) == RD_KAFKA_RESP_ERR__TIMED_OUT)
		progress(&r, 0);
	progress(&r, 1);
	rd_kafka_destroy(r.rk);
	mtlz_avro_free(r.avro);
	return n_failed || r.n_bad_inputs || n_delivered != r.n_sent ? 1 : 0;
}
