/*
 * pipeline.c - mtlzd's data path (see mtlzd.h for the threads):
 * Kafka -> (consume) reserve a slot position -> (prep workers) decode +
 * preprocess into it -> (infer) engine -> encode -> Kafka, with at-least-once
 * offset handling and a dead-letter topic.
 */
#define _GNU_SOURCE
#include "mtlzd.h"
#include "batcher.h"
#include "common.h"
#include "log.h"

#include <assert.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

static const char *const reason_names[MTLZD_N_REASONS] = {
	"framing", "schema", "avro", "invalid", "oversize",
	"bad_grid", "no_data", "coverage", "bad_pixels", "nonpositive_mean",
	"nonfinite_output",
};

const char *mtlzd_reason_name(int r)
{
	return r >= 0 && r < MTLZD_N_REASONS ? reason_names[r] : "unknown";
}

int64_t mtlzd_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Delivery-report opaque: partition and offset packed in one pointer. */
static void *pack_po(int32_t p, int64_t off)
{
	return (void *)(uintptr_t)(((uint64_t)(uint32_t)p << 48) |
				   ((uint64_t)off & 0xffffffffffffull));
}

static void unpack_po(void *op, int32_t *p, int64_t *off)
{
	const uint64_t v = (uint64_t)(uintptr_t)op;

	*p = (int32_t)(v >> 48);
	*off = (int64_t)(v & 0xffffffffffffull);
}

/* Marks a fatal error and wakes every waiter, so that the threads stop.
 * @locality any thread; takes d->lock */
void mtlzd_set_fatal(struct mtlzd *d)
{
	pthread_mutex_lock(&d->lock);
	atomic_store(&d->fatal, 1);
	pthread_cond_broadcast(&d->cond_free);
	pthread_cond_broadcast(&d->cond_ready);
	pthread_mutex_unlock(&d->lock);
}

/* ---- offsets -------------------------------------------------------- */

/* The output for (p, off) is acknowledged: store the commit position.
 * @locality whichever thread serves the producer's delivery reports */
static void offset_done(struct mtlzd *d, int32_t p, int64_t off)
{
	const int64_t pos = mtlz_offsets_done(d->tracker, p, off);
	rd_kafka_topic_partition_list_t *l;

	if (pos < 0)
		return;
	l = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(l, d->conf->topics_input, p)->offset = pos;
	/* fails harmlessly (__STATE) for a partition no longer assigned */
	if (rd_kafka_offsets_store(d->consumer, l) == RD_KAFKA_RESP_ERR_NO_ERROR)
		atomic_fetch_add(&d->cnt.offsets_stored, 1);
	rd_kafka_topic_partition_list_destroy(l);
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	struct mtlzd *d = opaque;
	const int dlq = strcmp(rd_kafka_topic_name(m->rkt), d->conf->topics_dead_letter) == 0;
	int32_t p;
	int64_t off;

	unpack_po(m->_private, &p, &off);
	if (d->eos) {
		/* exactly_once counts results when their transaction commits;
		 * messages purged by an abort are expected, not failures */
		if (!m->err || m->err == RD_KAFKA_RESP_ERR__PURGE_QUEUE ||
		    m->err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT)
			return;
		/* the transaction fails to commit and is aborted (txn.c) */
		atomic_fetch_add(&d->cnt.delivery_failed, 1);
		mtlz_log(MTLZ_LOG_WARN, "event=delivery_failed topic=%s partition=%" PRId32
			 " offset=%" PRId64 " error=\"%s\" detail=\"the transaction aborts\"",
			 rd_kafka_topic_name(m->rkt), p, off, rd_kafka_err2str(m->err));
		return;
	}
	if (m->err) {
		/* The idempotent producer already retried until message.timeout.ms:
		 * the output is lost for this run. Do not advance the offset;
		 * stop, so that a restart reads the input again. */
		atomic_fetch_add(&d->cnt.delivery_failed, 1);
		mtlz_log(MTLZ_LOG_ERROR, "event=delivery_failed topic=%s partition=%" PRId32
			 " offset=%" PRId64 " error=\"%s\"", rd_kafka_topic_name(m->rkt), p,
			 off, rd_kafka_err2str(m->err));
		mtlzd_set_fatal(d);
		return;
	}
	atomic_fetch_add(dlq ? &d->cnt.dlq_delivered : &d->cnt.results_delivered, 1);
	if (!d->eos)
		offset_done(d, p, off);
}

/* ---- producing ------------------------------------------------------ */

/* Produces one message, retrying while the local queue is full (that is the
 * backpressure: the caller's thread waits, slots stay busy, the consume
 * thread stops taking messages and then pauses, see backpressure()).
 * Returns 0, or -1 on a non-retriable error (fatal in at_least_once; in
 * exactly_once the transaction aborts or fails). */
static int produce(struct mtlzd *d, const char *topic, const void *val, size_t len,
		   const char *key, size_t klen, rd_kafka_headers_t *hdrs, void *op)
{
	rd_kafka_resp_err_t err;

	for (;;) {
		err = rd_kafka_producev(d->producer, RD_KAFKA_V_TOPIC(topic),
					RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
					RD_KAFKA_V_VALUE((void *)val, len),
					RD_KAFKA_V_KEY(key, klen), RD_KAFKA_V_HEADERS(hdrs),
					RD_KAFKA_V_OPAQUE(op), RD_KAFKA_V_END);
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
			break;
		rd_kafka_poll(d->producer, 100);
	}
	if (err) {
		rd_kafka_headers_destroy(hdrs);
		mtlz_log(MTLZ_LOG_ERROR, "event=produce_failed topic=%s error=\"%s\"", topic,
			 rd_kafka_err2str(err));
		if (!d->eos)
			mtlzd_set_fatal(d);
		return -1;
	}
	return 0;
}

/* Produces a dead-letter record (headers handed over to librdkafka or
 * freed). @locality consume thread (at_least_once), infer thread
 * (exactly_once) */
int mtlzd_dead_letter_send(struct mtlzd *d, struct mtlzd_dead *dl)
{
	rd_kafka_headers_t *h = dl->hdrs;

	dl->hdrs = NULL;
	if (produce(d, d->conf->topics_dead_letter, dl->value, dl->value_len, dl->key,
		    dl->key_len, h, pack_po(dl->partition, dl->offset)) < 0)
		return -1;
	atomic_fetch_add(&d->cnt.dlq_produced, 1);
	return 0;
}

/* The dead-letter record of m: its value and key (not copied) and headers. */
static void dead_letter_build(struct mtlzd *d, const rd_kafka_message_t *m, int reason,
			      const char *detail, struct mtlzd_dead *dl)
{
	rd_kafka_headers_t *orig = NULL, *h;
	char buf[32];

	if (rd_kafka_message_headers(m, &orig) == RD_KAFKA_RESP_ERR_NO_ERROR && orig)
		h = rd_kafka_headers_copy(orig);
	else
		h = rd_kafka_headers_new(6);
	rd_kafka_header_add(h, "mtlz.error.class", -1, mtlzd_reason_name(reason), -1);
	rd_kafka_header_add(h, "mtlz.error.detail", -1, detail, -1);
	rd_kafka_header_add(h, "mtlz.source.topic", -1, rd_kafka_topic_name(m->rkt), -1);
	snprintf(buf, sizeof(buf), "%" PRId32, m->partition);
	rd_kafka_header_add(h, "mtlz.source.partition", -1, buf, -1);
	snprintf(buf, sizeof(buf), "%" PRId64, m->offset);
	rd_kafka_header_add(h, "mtlz.source.offset", -1, buf, -1);
	memset(dl, 0, sizeof(*dl));
	dl->value = m->payload;
	dl->value_len = m->len;
	dl->key = m->key;
	dl->key_len = MTLZ_MIN(m->key_len, (size_t)1024);
	if (dl->value_len > d->dlq_max_value) {
		/* the producer (and broker) would refuse it: keep the head */
		snprintf(buf, sizeof(buf), "%zu", m->len);
		rd_kafka_header_add(h, "mtlz.error.value_truncated_from", -1, buf, -1);
		dl->value_len = d->dlq_max_value;
	}
	dl->hdrs = h;
	dl->partition = m->partition;
	dl->offset = m->offset;
}

/* Produces dl now (at_least_once: 0), or defers it to *into, to be
 * produced in its slot's transaction (exactly_once: 1), with value and key
 * copied since the message they point into is handed back to librdkafka
 * first; -1 out of memory (fatal: not processed, so not committed). */
static int dead_letter_route(struct mtlzd *d, struct mtlzd_dead *dl, struct mtlzd_dead *into)
{
	if (!d->eos) {
		mtlzd_dead_letter_send(d, dl);
		return 0;
	}
	dl->buf = malloc(dl->value_len + dl->key_len + 1);
	if (!dl->buf) {
		rd_kafka_headers_destroy(dl->hdrs);
		mtlz_log(MTLZ_LOG_ERROR, "event=out_of_memory detail=\"dead letter\"");
		mtlzd_set_fatal(d);
		return -1;
	}
	if (dl->value_len)
		memcpy(dl->buf, dl->value, dl->value_len);
	if (dl->key_len)
		memcpy((char *)dl->buf + dl->value_len, dl->key, dl->key_len);
	dl->value = dl->buf;
	dl->key = dl->key ? (char *)dl->buf + dl->value_len : NULL;
	*into = *dl;
	return 1;
}

/* Dead-letters m, whose reserved position is (s, pos): now, or deferred to
 * that position (dead_letter_route). @locality a preprocess worker */
static void dead_letter(struct mtlzd *d, struct mtlzd_slot *s, int pos,
			const rd_kafka_message_t *m, int reason, const char *detail)
{
	struct mtlzd_dead dl;

	atomic_fetch_add(&d->cnt.dlq_by_reason[reason], 1);
	mtlz_log(MTLZ_LOG_DEBUG, "event=dead_letter partition=%" PRId32 " offset=%" PRId64
		 " class=%s detail=\"%s\"", m->partition, m->offset,
		 mtlzd_reason_name(reason), detail);
	dead_letter_build(d, m, reason, detail, &dl);
	s->state[pos] = dead_letter_route(d, &dl, &s->dead[pos]) == 1 ? MTLZD_POS_DEAD :
									   MTLZD_POS_EMPTY;
}

/* ---- slots ---------------------------------------------------------- */

/* Positions reserved in s (what batch.max_size and the delay count). */
static int slot_count(const struct mtlzd_slot *s)
{
	return s->n_res;
}

/* All of a closed slot's positions are filled. @locks d->lock */
static int slot_filled(const struct mtlzd_slot *s)
{
	return s->closed && s->n_filled == s->n_res;
}

void mtlzd_close_open_slot(struct mtlzd *d)
{
	struct mtlzd_slot *s;

	if (d->open_slot < 0 || slot_count(&d->slots[d->open_slot]) == 0)
		return;
	s = &d->slots[d->open_slot];
	pthread_mutex_lock(&d->lock);
	s->closed = 1;
	d->ready_q[(d->ready_head + d->n_ready) % MTLZD_SLOTS] = d->open_slot;
	d->n_ready++;
	d->busy++;
	pthread_cond_broadcast(&d->cond_ready);
	pthread_mutex_unlock(&d->lock);
	d->open_slot = -1;
}

/*
 * Makes sure there is an open slot, waiting for the infer thread if all are
 * busy. The consume loop waits for a free slot before it polls (see
 * backpressure()), so this waits only for a message that a poll returned
 * anyway (a rebalance callback closed the open slot, or a message of a
 * paused partition slipped through). @locality consume thread
 */
static int ensure_open_slot(struct mtlzd *d)
{
	struct mtlzd_slot *s;

	if (d->open_slot >= 0)
		return 0;
	pthread_mutex_lock(&d->lock);
	while (d->n_free == 0 && !atomic_load(&d->fatal))
		pthread_cond_wait(&d->cond_free, &d->lock);
	if (d->n_free == 0) {
		pthread_mutex_unlock(&d->lock);
		return -1;
	}
	d->open_slot = d->free_q[--d->n_free];
	s = &d->slots[d->open_slot];
	s->n_res = s->n_filled = s->closed = 0;
	s->n = s->n_dead = 0;
	pthread_mutex_unlock(&d->lock);
	s->opened_at = mtlz_now();
	return 0;
}

/* Moves spectrum i's item and held message down to position n < i. */
static void slot_move_spectrum(struct mtlzd_slot *s, int n, int i)
{
	s->items[n] = s->items[i];
	s->msg[n] = s->msg[i];
	s->msg[i] = NULL;
}

/* Moves a filled slot's spectra to x/items[0..n) and its deferred dead
 * letters to dead[0..n_dead), keeping arrival order.
 * @locality the thread that owns the filled slot (infer; consume at stop) */
static void slot_compact(struct mtlzd *d, struct mtlzd_slot *s)
{
	int n = 0, nd = 0;

	for (int i = 0; i < s->n_res; i++) {
		switch (s->state[i]) {
		case MTLZD_POS_SPECTRUM:
			if (i != n) {
				memcpy(s->x + (size_t)n * d->L, s->x + (size_t)i * d->L,
				       (size_t)d->L * sizeof(float));
				slot_move_spectrum(s, n, i);
			}
			n++;
			break;
		case MTLZD_POS_DEAD:
			if (i != nd) {
				s->dead[nd] = s->dead[i];
				memset(&s->dead[i], 0, sizeof(s->dead[i]));
			}
			nd++;
			break;
		default:
			assert(s->state[i] == MTLZD_POS_EMPTY);
			break;
		}
	}
	s->n = n;
	s->n_dead = nd;
}

/* Drops what a slot holds beyond its preallocated buffers (deferred dead
 * letters, compacted or not; the input messages, handed back to
 * librdkafka). */
void mtlzd_slot_release(struct mtlzd_slot *s)
{
	for (int i = 0; s->dead && i < s->cap; i++) {
		if (s->dead[i].hdrs)
			rd_kafka_headers_destroy(s->dead[i].hdrs);
		free(s->dead[i].buf);
		memset(&s->dead[i], 0, sizeof(s->dead[i]));
	}
	for (int i = 0; s->msg && i < s->cap; i++)
		if (s->msg[i]) {
			rd_kafka_message_destroy(s->msg[i]);
			s->msg[i] = NULL;
		}
	s->n_dead = 0;
	s->n = 0;
	s->n_res = s->n_filled = 0;
}

/* Whether the consume thread has somewhere to put the next message. */
static int slot_available(struct mtlzd *d)
{
	int free_;

	if (d->open_slot >= 0)
		return 1;
	pthread_mutex_lock(&d->lock);
	free_ = d->n_free > 0;
	pthread_mutex_unlock(&d->lock);
	return free_;
}

/* Pauses (or resumes) every assigned partition; partitions assigned while
 * paused are paused by on_rebalance. @locality consume thread */
static void set_paused(struct mtlzd *d, int pause, double waited_s)
{
	rd_kafka_topic_partition_list_t *a = NULL;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	int n = 0;

	if (rd_kafka_assignment(d->consumer, &a) == RD_KAFKA_RESP_ERR_NO_ERROR && a) {
		n = a->cnt;
		if (n)
			err = pause ? rd_kafka_pause_partitions(d->consumer, a) :
				      rd_kafka_resume_partitions(d->consumer, a);
		for (int i = 0; !err && i < n; i++)
			err = a->elems[i].err;
		rd_kafka_topic_partition_list_destroy(a);
	}
	/* not expected for partitions we hold; a partition left unpaused
	 * can only bring a message that then waits for a slot, as before */
	if (err)
		mtlz_log(MTLZ_LOG_WARN, "event=%s_failed error=\"%s\"", pause ? "pause" : "resume",
			 rd_kafka_err2str(err));
	d->paused = pause;
	if (pause) {
		atomic_fetch_add(&d->pauses, 1);
		mtlz_log(MTLZ_LOG_WARN, "event=paused partitions=%d waited_ms=%.0f detail=\"no "
			 "batch slot free: the engine or the output topic is stalled; consumption "
			 "paused, polling goes on\"", n, waited_s * 1000);
	} else {
		mtlz_log(MTLZ_LOG_INFO, "event=resumed partitions=%d paused_ms=%.0f", n,
			 waited_s * 1000);
	}
}

/*
 * Backpressure, called before each poll: 1 if the consume thread may take
 * a message, 0 if every slot is busy (the engine or the output topic is
 * slower than the input; the producer's queue is bounded, so a stalled
 * output stops the infer thread and with it the slots).
 *
 * First it waits without polling, up to pause_after_s: librdkafka's
 * prefetch queue fills to queued.max.messages.kbytes and its fetcher
 * stops, so memory stays bounded whatever the backlog, and the prefetched
 * messages are kept for when a slot frees (the usual case: a backlog
 * draining, each wait shorter than a batch). Past that (an outage), it
 * pauses the assignment and polls again (0 with nothing taken): a consumer
 * that stops polling for max.poll.interval.ms is evicted from its group,
 * and polling also serves rebalances. Pausing drops the prefetched
 * messages; they are fetched again after the resume, from the position of
 * the last message taken. @locality consume thread
 */
static int backpressure(struct mtlzd *d, double *stalled_since)
{
	const double now = mtlz_now();
	struct timespec ts;

	if (slot_available(d)) {
		if (d->paused)
			set_paused(d, 0, now - *stalled_since);
		*stalled_since = 0;
		return 1;
	}
	if (*stalled_since == 0)
		*stalled_since = now;
	if (d->paused)
		return 1; /* poll: nothing comes from a paused partition */
	if (now - *stalled_since >= d->pause_after_s) {
		set_paused(d, 1, now - *stalled_since);
		return 1;
	}
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += 100 * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&d->lock);
	if (d->n_free == 0 && !atomic_load(&d->fatal))
		pthread_cond_timedwait(&d->cond_free, &d->lock, &ts);
	pthread_mutex_unlock(&d->lock);
	return 0;
}

/* Waits until every slot is back (in-flight batches produced).
 * @locality consume thread */
static void drain_slots(struct mtlzd *d)
{
	mtlzd_close_open_slot(d);
	pthread_mutex_lock(&d->lock);
	while (d->busy > 0 && !atomic_load(&d->fatal))
		pthread_cond_wait(&d->cond_free, &d->lock);
	pthread_mutex_unlock(&d->lock);
}

/* ---- consume -------------------------------------------------------- */

static int prep_reason(int reject)
{
	switch (reject) {
	case MTLZ_REJECT_BAD_GRID: return MTLZD_R_BAD_GRID;
	case MTLZ_REJECT_NO_DATA: return MTLZD_R_NO_DATA;
	case MTLZ_REJECT_COVERAGE: return MTLZD_R_COVERAGE;
	case MTLZ_REJECT_BAD_PIXELS: return MTLZD_R_BAD_PIXELS;
	default: return MTLZD_R_NONPOSITIVE_MEAN;
	}
}

static int decode_reason(int e)
{
	switch (e) {
	case MTLZ_DECODE_FRAMING: return MTLZD_R_FRAMING;
	case MTLZ_DECODE_SCHEMA: return MTLZD_R_SCHEMA;
	case MTLZ_DECODE_AVRO: return MTLZD_R_AVRO;
	case MTLZ_DECODE_OVERSIZE: return MTLZD_R_OVERSIZE;
	default: return MTLZD_R_INVALID;
	}
}

/* One input message, taken over from librdkafka: its offset is recorded (in
 * arrival order), the next position of the open slot is reserved for it and
 * a worker is given the rest. @locality consume thread */
static void handle_message(struct mtlzd *d, rd_kafka_message_t *m)
{
	struct mtlzd_slot *s;
	struct mtlzd_job *j;
	int pos;

	atomic_fetch_add(&d->cnt.consumed, 1);
	if (d->eos)
		mtlzd_txn_seen(d, m->partition, m->offset);
	else if (mtlz_offsets_add(d->tracker, m->partition, m->offset) < 0)
		mtlz_log(MTLZ_LOG_WARN, "event=offset_out_of_order partition=%" PRId32
			 " offset=%" PRId64, m->partition, m->offset);
	if (ensure_open_slot(d) < 0) {
		rd_kafka_message_destroy(m);
		return; /* fatal: not processed, so not committed */
	}
	s = &d->slots[d->open_slot];
	pos = s->n_res++;
	s->state[pos] = MTLZD_POS_PENDING;
	pthread_mutex_lock(&d->work_lock);
	/* every queued job holds a reserved position: the queue cannot fill */
	assert(d->n_jobs < d->jobs_cap);
	j = &d->jobs[(d->jobs_head + d->n_jobs) % d->jobs_cap];
	j->m = m;
	j->slot = d->open_slot;
	j->pos = pos;
	d->n_jobs++;
	pthread_cond_signal(&d->cond_work);
	pthread_mutex_unlock(&d->work_lock);
	if (mtlzd_batch_full(slot_count(s), d->conf->batch_max_size))
		mtlzd_close_open_slot(d);
}

/* ---- preprocess workers --------------------------------------------- */

/* Decodes, validates and preprocesses j's message into its slot position
 * (1: the slot keeps the message), or dead-letters it (0: the caller hands
 * it back). @locality a preprocess worker (owns j->m) */
static int prep_job(struct mtlzd_worker *w, const struct mtlzd_job *j)
{
	struct mtlzd *d = w->d;
	struct mtlzd_slot *s = &d->slots[j->slot];
	const rd_kafka_message_t *m = j->m;
	struct mtlzd_item *it = &s->items[j->pos];
	mtlz_spectrum sp;
	mtlz_prep_info info;
	char err[512];
	int64_t t0;
	int e, rc;

	if (atomic_load(&d->fatal)) {
		s->state[j->pos] = MTLZD_POS_EMPTY; /* stopping: read again later */
		return 0;
	}
	if (m->len > (size_t)d->conf->input_max_message_bytes) {
		snprintf(err, sizeof(err), "%zu bytes, input.max_message_bytes is %d",
			 m->len, d->conf->input_max_message_bytes);
		dead_letter(d, s, j->pos, m, MTLZD_R_OVERSIZE, err);
		return 0;
	}
	mtlz_spectrum_init(&sp);
	t0 = mtlzd_now_us();
	e = mtlz_avro_decode_spectrum(w->avro, m->payload, m->len, &sp, err, sizeof(err));
	if (e != MTLZ_DECODE_OK) {
		atomic_fetch_add(&d->cnt.consume_busy_us, (uint64_t)(mtlzd_now_us() - t0));
		mtlz_spectrum_clear(&sp);
		dead_letter(d, s, j->pos, m, decode_reason(e), err);
		return 0;
	}
	snprintf(sp.source, sizeof(sp.source), "%s[%" PRId32 "]@%" PRId64,
		 rd_kafka_topic_name(m->rkt), m->partition, m->offset);
	rc = mtlz_preprocess(&sp, &d->prep, w->ws, s->x + (size_t)j->pos * d->L, &info,
			     err, sizeof(err));
	atomic_fetch_add(&d->cnt.consume_busy_us, (uint64_t)(mtlzd_now_us() - t0));
	if (rc != MTLZ_OK) {
		mtlz_spectrum_clear(&sp);
		dead_letter(d, s, j->pos, m, info.reject ? prep_reason(info.reject) :
			    MTLZD_R_INVALID, err);
		return 0;
	}
	snprintf(it->spec_id, sizeof(it->spec_id), "%s", sp.spec_id);
	it->partition = m->partition;
	it->offset = m->offset;
	it->ts_ms = rd_kafka_message_timestamp(m, NULL);
	it->flags = info.flags;
	mtlz_spectrum_clear(&sp);
	s->msg[j->pos] = j->m;
	s->state[j->pos] = MTLZD_POS_SPECTRUM;
	return 1;
}

/* @locality preprocess worker thread */
static void *worker_main(void *arg)
{
	struct mtlzd_worker *w = arg;
	struct mtlzd *d = w->d;

	for (;;) {
		struct mtlzd_job j;
		struct mtlzd_slot *s;

		pthread_mutex_lock(&d->work_lock);
		while (d->n_jobs == 0 && !d->work_stop)
			pthread_cond_wait(&d->cond_work, &d->work_lock);
		if (d->n_jobs == 0) {  /* stopping, and nothing left */
			pthread_mutex_unlock(&d->work_lock);
			break;
		}
		j = d->jobs[d->jobs_head];
		d->jobs_head = (d->jobs_head + 1) % d->jobs_cap;
		d->n_jobs--;
		pthread_mutex_unlock(&d->work_lock);

		if (!prep_job(w, &j))
			rd_kafka_message_destroy(j.m);
		s = &d->slots[j.slot];
		pthread_mutex_lock(&d->lock);
		s->n_filled++;
		if (slot_filled(s))
			pthread_cond_broadcast(&d->cond_ready);
		pthread_mutex_unlock(&d->lock);
	}
	return NULL;
}

/* Starts n preprocess workers. @locality main thread */
static int workers_start(struct mtlzd *d, int n, char *errstr, size_t errstr_size)
{
	const char *schemas = getenv("MTLZ_SCHEMA_DIR");
	const mtlz_conf *c = d->conf;

	if (!schemas)
		schemas = MTLZ_SCHEMA_DIR;
	d->jobs_cap = MTLZD_SLOTS * c->batch_max_size;
	d->jobs = calloc((size_t)d->jobs_cap, sizeof(*d->jobs));
	d->workers = calloc((size_t)n, sizeof(*d->workers));
	if (!d->jobs || !d->workers)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory (workers)");
	d->n_workers = n;
	for (int i = 0; i < n; i++) {
		struct mtlzd_worker *w = &d->workers[i];
		char name[16];

		w->d = d;
		w->id = i;
		w->avro = mtlz_avro_new(schemas, c->input_schema_dir[0] ? c->input_schema_dir :
					NULL, errstr, errstr_size);
		if (!w->avro)
			return MTLZ_ERR_FORMAT;
		w->ws = mtlz_prep_ws_new();
		if (!w->ws)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		if (pthread_create(&w->thr, NULL, worker_main, w))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
					"cannot start preprocess thread %d", i);
		w->started = 1;
		snprintf(name, sizeof(name), "mtlzd-prep%u", (unsigned)i % 100u);
		pthread_setname_np(w->thr, name);
	}
	return MTLZ_OK;
}

/* Lets the workers finish every queued job, then joins them; idempotent.
 * @locality main thread */
static void workers_stop(struct mtlzd *d)
{
	pthread_mutex_lock(&d->work_lock);
	d->work_stop = 1;
	pthread_cond_broadcast(&d->cond_work);
	pthread_mutex_unlock(&d->work_lock);
	for (int i = 0; i < d->n_workers; i++)
		if (d->workers[i].started) {
			pthread_join(d->workers[i].thr, NULL);
			d->workers[i].started = 0;
		}
}

/* ---- infer ---------------------------------------------------------- */

/* Encodes and produces slot s's results; -1 on the first failure.
 * @locality infer thread */
int mtlzd_publish_results(struct mtlzd *d, struct mtlzd_slot *s)
{
	for (int i = 0; i < s->n; i++) {
		const mtlz_output *o = &s->out[i];
		mtlz_result_rec r;
		rd_kafka_headers_t *h;
		const uint8_t *buf;
		size_t len;
		char err[256];

		memset(&r, 0, sizeof(r));
		snprintf(r.spec_id, sizeof(r.spec_id), "%s", s->items[i].spec_id);
		r.cls = o->cls;
		memcpy(r.prob, o->prob, sizeof(r.prob));
		r.has_metal = o->cls == MTLZD_STAR_FORMING; /* the conditional regression */
		r.oh = o->metal;
		r.oh_sigma = isfinite(o->metal_sigma) ? o->metal_sigma : 0.0;
		r.flags = s->items[i].flags;
		memcpy(r.model_sha256, d->model_sha256, sizeof(r.model_sha256));
		snprintf(r.model_version, sizeof(r.model_version), "%s", d->model_version);
		snprintf(r.source_topic, sizeof(r.source_topic), "%s", d->conf->topics_input);
		r.source_partition = s->items[i].partition;
		r.source_offset = s->items[i].offset;
		r.processed_us = mtlzd_now_us();
		if (mtlz_avro_encode_result(d->avro_out, &r, d->output_framing,
					    d->conf->output_schema_id, &buf, &len, err,
					    sizeof(err)) != MTLZ_OK) {
			mtlz_log(MTLZ_LOG_ERROR, "event=encode_failed spec_id=%s error=\"%s\"",
				 r.spec_id, err);
			mtlzd_set_fatal(d);
			return -1;
		}
		h = rd_kafka_headers_new(3);
		rd_kafka_header_add(h, "mtlz.model.sha256", -1, d->model_sha256, -1);
		rd_kafka_header_add(h, "mtlz.schema.fingerprint", -1, d->result_fp, -1);
		if (s->items[i].ts_ms >= 0) {
			char ts[24];

			snprintf(ts, sizeof(ts), "%" PRId64, s->items[i].ts_ms);
			rd_kafka_header_add(h, "mtlz.source.timestamp_ms", -1, ts, -1);
		}
		if (produce(d, d->conf->topics_output, buf, len, r.spec_id, strlen(r.spec_id),
			    h, pack_po(r.source_partition, r.source_offset)) < 0)
			return -1;
		atomic_fetch_add(&d->cnt.results_produced, 1);
	}
	return 0;
}

/* Runs the engine on slot s; on failure retries once (a transient device
 * error), then gives up: the caller stops the daemon with nothing committed
 * for this slot. @locality infer thread */
static int run_engine(struct mtlzd *d, struct mtlzd_slot *s)
{
	char err[512];

	for (int attempt = 1;; attempt++) {
		if (mtlz_engine_run(d->engine, s->x, s->n, d->conf->engine_mc_samples, s->out,
				    err, sizeof(err)) == MTLZ_OK)
			return 0;
		mtlz_log(MTLZ_LOG_ERROR, "event=engine_error engine=%s attempt=%d batch=%d "
			 "first=%" PRId32 "@%" PRId64 " error=\"%s\" detail=\"%s\"",
			 mtlz_engine_name(d->engine), attempt, s->n, s->items[0].partition,
			 s->items[0].offset, err, attempt < 2 ? "retrying the batch" :
			 "stopping: nothing committed for this batch, it is read again "
			 "after the restart");
		if (attempt == 2)
			return -1;
	}
}

/*
 * Dead-letters every spectrum of slot s whose outputs cannot be published
 * (mtlz_output_check: non-finite or inconsistent) with its original
 * message, now or with the slot's transaction (dead_letter_route), and
 * closes the gap in items/out/msg: nothing NaN is ever produced and the
 * input still gets its one outcome. @locality infer thread
 */
static void quarantine_outputs(struct mtlzd *d, struct mtlzd_slot *s)
{
	const int K = mtlz_model_arch(d->model)->n_classes;
	int n = 0;

	for (int i = 0; i < s->n; i++) {
		char why[160], detail[256];
		struct mtlzd_dead dl;

		if (mtlz_output_check(&s->out[i], K, MTLZD_STAR_FORMING,
				      d->conf->engine_mc_samples, why, sizeof(why)) == 0) {
			if (i != n) {
				slot_move_spectrum(s, n, i);
				s->out[n] = s->out[i];
			}
			n++;
			continue;
		}
		snprintf(detail, sizeof(detail), "engine %s, model %.12s: %s",
			 mtlz_engine_name(d->engine), d->model_sha256, why);
		atomic_fetch_add(&d->cnt.dlq_by_reason[MTLZD_R_NONFINITE_OUTPUT], 1);
		mtlz_log(MTLZ_LOG_WARN, "event=dead_letter partition=%" PRId32 " offset=%" PRId64
			 " spec_id=%s class=%s detail=\"%s\"", s->items[i].partition,
			 s->items[i].offset, s->items[i].spec_id,
			 mtlzd_reason_name(MTLZD_R_NONFINITE_OUTPUT), detail);
		dead_letter_build(d, s->msg[i], MTLZD_R_NONFINITE_OUTPUT, detail, &dl);
		if (dead_letter_route(d, &dl, &s->dead[s->n_dead]) == 1)
			s->n_dead++;  /* n + n_dead <= cap */
		rd_kafka_message_destroy(s->msg[i]);
		s->msg[i] = NULL;
	}
	s->n = n;
}

/* @locality infer thread: owns the engine */
static void *infer_main(void *arg)
{
	struct mtlzd *d = arg;

	for (;;) {
		struct mtlzd_slot *s;
		int64_t t0, t1;
		int idx;

		/* the oldest closed slot, once its workers are done with it:
		 * slots run in the order they were closed */
		pthread_mutex_lock(&d->lock);
		while (!(d->n_ready > 0 && slot_filled(&d->slots[d->ready_q[d->ready_head]])) &&
		       !(d->n_ready == 0 && atomic_load(&d->infer_stop))) {
			struct timespec ts;

			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += 1;
			pthread_cond_timedwait(&d->cond_ready, &d->lock, &ts);
			atomic_store(&d->infer_alive_us, mtlzd_now_us());
		}
		if (d->n_ready == 0) {
			pthread_mutex_unlock(&d->lock);
			break;
		}
		idx = d->ready_q[d->ready_head];
		d->ready_head = (d->ready_head + 1) % MTLZD_SLOTS;
		d->n_ready--;
		pthread_mutex_unlock(&d->lock);

		s = &d->slots[idx];
		slot_compact(d, s);
		t0 = mtlzd_now_us();
		if (atomic_load(&d->rewind) || atomic_load(&d->fatal)) {
			/* read past an aborted transaction, or stopping: dropped,
			 * read again */
		} else if (s->n > 0 && run_engine(d, s) < 0) {
			mtlzd_set_fatal(d);
		} else {
			t1 = mtlzd_now_us();
			quarantine_outputs(d, s);
			if (atomic_load(&d->fatal)) {
				/* a dead letter could not be kept: nothing of this
				 * slot is produced or committed, it is read again */
			} else if (!d->eos) {
				mtlzd_publish_results(d, s);
			} else if (mtlzd_txn_run(d, s) > 0) {
				atomic_store(&d->rewind, 1);
			}
			if (s->n + s->n_dead > 0)
				atomic_fetch_add(&d->cnt.batches, 1);
			atomic_fetch_add(&d->cnt.engine_busy_us, (uint64_t)(t1 - t0));
			atomic_fetch_add(&d->cnt.publish_busy_us, (uint64_t)(mtlzd_now_us() - t1));
		}
		atomic_store(&d->infer_alive_us, mtlzd_now_us());
		mtlzd_slot_release(s);
		pthread_mutex_lock(&d->lock);
		d->free_q[d->n_free++] = idx;
		d->busy--;
		pthread_cond_broadcast(&d->cond_free);
		pthread_mutex_unlock(&d->lock);
	}
	return NULL;
}

/*
 * mtlzd's own commits carry this callback, so that the configured
 * offset_commit_cb (on_offset_commit) hears only librdkafka's auto-commits:
 * librdkafka calls the configured one for a commit that brings no callback
 * of its own. Their results are read elsewhere (the commit queue's events,
 * or the synchronous call's return value).
 */
static void own_commit_done(rd_kafka_t *rk, rd_kafka_resp_err_t err,
			    rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
	(void)rk;
	(void)err;
	(void)offsets;
	(void)opaque;
}

/* Commits the stored offsets and waits for the result. */
static rd_kafka_resp_err_t commit_sync(rd_kafka_t *rk)
{
	return rd_kafka_commit_queue(rk, NULL, NULL, own_commit_done, NULL);
}

/* The delivery thread's commits (at-least-once). */
struct commit_state {
	uint64_t stored;          /* offsets_stored at the last commit */
	int in_flight;            /* a commit awaits its result */
	int paused;               /* a commit failed: none until the group is stable */
	unsigned commits_ok;      /* d->commits_ok when paused */
};

/*
 * Commits what the delivery reports stored, at once rather than at the next
 * auto-commit, so that after a crash only the batches whose output was not
 * yet acknowledged are read again: one asynchronous commit at a time, its
 * result read from d->commit_q.
 *
 * Not while the group rebalances: in librdkafka before 2.10 a manual
 * commit that meets the generation bump of a rebalance makes the consumer
 * drop its assignment as lost (librdkafka issue #4059, fixed by PR #4908),
 * and then the next owner re-reads everything since the last commit. Seen
 * here: a daemon joining mid-stream made the working one lose its
 * partitions and 236-300 of 300 inputs were processed twice. So:
 *  - none from a revoke callback until the rebalance is over
 *    (d->commit_hold, kept by on_rebalance): a cooperative rebalance that
 *    revoked anything has a second round after our callbacks, the rejoin
 *    that hands the revoked partitions over, and a commit sent during it
 *    queues behind the JoinGroup on the coordinator's connection, comes
 *    back ILLEGAL_GENERATION with the next generation, and that one
 *    failure loses the assignment (seen under ASan with
 *    kafka.consumer.debug=cgrp, 2026-11-27: 7-47 inputs twice);
 *  - none after a failed commit until the group is known to be stable.
 * Either ends when one of librdkafka's own auto-commits succeeds (it holds
 * them back while the group rebalances, so a success means a stable
 * group; except its commit of the partitions a revoke gives up, which
 * on_offset_commit ignores); without that a failure that met no rebalance
 * of ours (a coordinator moving, a request error) paused these commits for
 * good.
 * @locality deliver thread
 */
static void commit_stored(struct mtlzd *d, struct commit_state *c)
{
	rd_kafka_event_t *ev;
	uint64_t stored;

	while ((ev = rd_kafka_queue_poll(d->commit_q, 0))) {
		const rd_kafka_resp_err_t err = rd_kafka_event_error(ev);

		mtlz_log(MTLZ_LOG_DEBUG, "event=commit_result type=%s error=\"%s\"",
			 rd_kafka_event_name(ev), rd_kafka_err2str(err));
		if (rd_kafka_event_type(ev) == RD_KAFKA_EVENT_OFFSET_COMMIT) {
			c->in_flight = 0;
			if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET) {
				c->paused = 1;
				c->commits_ok = atomic_load(&d->commits_ok);
				mtlz_log(MTLZ_LOG_DEBUG, "event=commit_paused error=\"%s\"",
					 rd_kafka_err2str(err));
			}
		}
		rd_kafka_event_destroy(ev);
	}
	if (c->paused && atomic_load(&d->commits_ok) != c->commits_ok) {
		c->paused = 0;
		mtlz_log(MTLZ_LOG_DEBUG, "event=commit_resumed");
	}
	stored = atomic_load(&d->cnt.offsets_stored);
	if (c->in_flight || c->paused || atomic_load(&d->commit_hold) > 0 ||
	    stored == c->stored || atomic_load(&d->consumer_closing))
		return;
	c->stored = stored;
	c->in_flight = rd_kafka_commit_queue(d->consumer, NULL, d->commit_q, own_commit_done,
					     NULL) == RD_KAFKA_RESP_ERR_NO_ERROR;
	mtlz_log(MTLZ_LOG_DEBUG, "event=commit_sent stored=%" PRIu64 " in_flight=%d", stored,
		 c->in_flight);
}

/* @locality deliver thread */
static void *deliver_main(void *arg)
{
	struct mtlzd *d = arg;
	struct commit_state c = { 0 };

	while (!atomic_load(&d->deliver_stop)) {
		rd_kafka_poll(d->producer, 100);
		if (!d->eos)
			commit_stored(d, &c);
	}
	return NULL;
}

/* ---- rebalances ----------------------------------------------------- */

/* @locality consume thread (inside rd_kafka_consumer_poll) */
static void on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
			 rd_kafka_topic_partition_list_t *parts, void *opaque)
{
	struct mtlzd *d = opaque;
	const int coop = strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
	rd_kafka_error_t *e = NULL;

	if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
		if (coop)
			e = rd_kafka_incremental_assign(rk, parts);
		else
			rd_kafka_assign(rk, parts);
		/* librdkafka keeps an application pause on a partition across
		 * unassign and assign: set it to ours either way */
		if (d->paused)
			rd_kafka_pause_partitions(rk, parts);
		else
			rd_kafka_resume_partitions(rk, parts);
		atomic_store(&d->joined, 1);
		/* the assign that ends a revoke's round, then the one that ends
		 * the rejoin round (cooperative): see commit_stored */
		d->revoke_pending = 0;
		if (atomic_load(&d->commit_hold) > 0)
			atomic_fetch_sub(&d->commit_hold, 1);
		mtlz_log(MTLZ_LOG_INFO, "event=assigned partitions=%d protocol=%s",
			 parts->cnt, rd_kafka_rebalance_protocol(rk));
	} else {
		/* Finish what is in flight for everything we hold, let the
		 * deliveries store their offsets, commit, then let go. If the
		 * assignment is lost, another member may already own the
		 * partitions: what is in flight still completes (duplicates
		 * are possible in at-least-once, loss is not). */
		const int lost = rd_kafka_assignment_lost(rk);

		/* no per-batch commits until the rebalance is over: its assign,
		 * and with cooperative the rejoin round's (commit_stored) */
		atomic_store(&d->commit_hold, coop ? 2 : 1);
		d->revoke_pending = 1;
		drain_slots(d);
		if (!d->eos) {
			rd_kafka_flush(d->producer, 30 * 1000);
			if (!lost)
				commit_sync(rk);
		}
		/* exactly_once: the offsets were committed in the transactions */
		for (int i = 0; i < parts->cnt; i++) {
			mtlz_offsets_drop(d->tracker, parts->elems[i].partition);
			if (d->eos)
				mtlzd_txn_forget(d, parts->elems[i].partition);
		}
		if (coop)
			e = rd_kafka_incremental_unassign(rk, parts);
		else
			rd_kafka_assign(rk, NULL);
		if (lost)
			mtlz_log(MTLZ_LOG_WARN, "event=revoked partitions=%d lost=1 detail=\"the "
				 "group expired our generation: offsets since the last commit "
				 "cannot be committed, their inputs are read again by the next "
				 "owner (duplicates, no loss)\"", parts->cnt);
		else
			mtlz_log(MTLZ_LOG_INFO, "event=revoked partitions=%d lost=0", parts->cnt);
	}
	if (e) {
		mtlz_log(MTLZ_LOG_ERROR, "event=rebalance_failed error=\"%s\"",
			 rd_kafka_error_string(e));
		rd_kafka_error_destroy(e);
	}
}

/* librdkafka's auto-commits (mtlzd's own carry own_commit_done): a full
 * success counts in d->commits_ok (the group is stable: the deliver
 * thread's paused commits may resume); a failure is logged, as librdkafka
 * itself would without this callback. @locality consume thread (inside
 * consumer_poll) */
static void on_offset_commit(rd_kafka_t *rk, rd_kafka_resp_err_t err,
			     rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
	struct mtlzd *d = opaque;

	(void)rk;
	for (int i = 0; !err && offsets && i < offsets->cnt; i++)
		err = offsets->elems[i].err;
	if (!err) {
		atomic_fetch_add(&d->commits_ok, 1);
		/* the group is stable; but not the commit librdkafka makes
		 * for the partitions a revoke gives up, which answers before
		 * the revoke's round (and the rejoin) is over */
		if (!d->revoke_pending)
			atomic_store(&d->commit_hold, 0);
	}
	else if (err != RD_KAFKA_RESP_ERR__NO_OFFSET)
		mtlz_log(MTLZ_LOG_WARN, "event=auto_commit_failed error=\"%s\"",
			 rd_kafka_err2str(err));
}

static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
	struct mtlzd *d = opaque;

	if (rd_kafka_fatal_error(rk, NULL, 0)) {
		mtlz_log(MTLZ_LOG_ERROR, "event=kafka_fatal client=%s error=\"%s\"",
			 rd_kafka_name(rk), reason);
		mtlzd_set_fatal(d);
		return;
	}
	/* transient (broker down, transport): librdkafka retries with backoff */
	mtlz_log(MTLZ_LOG_WARN, "event=kafka_error client=%s error=\"%s: %s\"",
		 rd_kafka_name(rk), rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

/* ---- start / run / stop --------------------------------------------- */

static int set_kv(rd_kafka_conf_t *kc, const char *k, const char *v, char *errstr,
		  size_t errstr_size)
{
	char e[256];

	if (rd_kafka_conf_set(kc, k, v, e, sizeof(e)) != RD_KAFKA_CONF_OK)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"librdkafka property %s=%s: %s", k, v, e);
	return MTLZ_OK;
}

int mtlzd_check_kafka(const mtlz_conf *c, char *errstr, size_t errstr_size)
{
	for (int role = 0; role < 2; role++) {
		const mtlz_kv *pass = role ? c->kafka_producer : c->kafka_consumer;
		const int n = role ? c->n_kafka_producer : c->n_kafka_consumer;

		for (int i = 0; i < n; i++) {
			rd_kafka_conf_t *kc = rd_kafka_conf_new();
			char e[256];
			const rd_kafka_conf_res_t r = rd_kafka_conf_set(kc, pass[i].key, pass[i].value,
									 e, sizeof(e));

			rd_kafka_conf_destroy(kc);
			if (r != RD_KAFKA_CONF_OK)
				return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
						"kafka.%s.%s = %s: librdkafka: %s",
						role ? "producer" : "consumer", pass[i].key,
						pass[i].value, e);
		}
	}
	return MTLZ_OK;
}

/* librdkafka's own log lines (its threads) as our logfmt lines, with our
 * timestamps. Not filtered by log.level: librdkafka filters by its own
 * log_level and emits debug lines only where kafka.*.debug asks for them. */
static void on_rdkafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	char msg[768];
	size_t n = 0;

	for (const char *p = buf; *p && n < sizeof(msg) - 2; p++) {
		if (*p == '"' || *p == '\\')
			msg[n++] = '\\';
		msg[n++] = *p == '\n' ? ' ' : *p;
	}
	msg[n] = '\0';
	mtlz_log_raw(level <= 3 ? MTLZ_LOG_ERROR : level == 4 ? MTLZ_LOG_WARN :
		     level <= 6 ? MTLZ_LOG_INFO : MTLZ_LOG_DEBUG,
		     "event=rdkafka client=%s fac=%s msg=\"%s\"", rd_kafka_name(rk), fac, msg);
}

static rd_kafka_t *make_client(struct mtlzd *d, rd_kafka_type_t type, char *errstr,
			       size_t errstr_size)
{
	const mtlz_conf *c = d->conf;
	rd_kafka_conf_t *kc = rd_kafka_conf_new();
	const mtlz_kv *pass = type == RD_KAFKA_CONSUMER ? c->kafka_consumer : c->kafka_producer;
	const int n_pass = type == RD_KAFKA_CONSUMER ? c->n_kafka_consumer : c->n_kafka_producer;
	/* our defaults first; the operator's pass-through properties win */
	static const char *const consumer_defaults[][2] = {
		{ "enable.auto.offset.store", "false" },
		{ "enable.auto.commit", "true" },
		{ "auto.commit.interval.ms", "1000" },
		{ "auto.offset.reset", "earliest" },
		{ "partition.assignment.strategy", "cooperative-sticky" },
		{ "queued.min.messages", "1000" },          /* bounded prefetch: RSS */
		{ "queued.max.messages.kbytes", "32768" },
		/* the queue limits above are checked only before a Fetch is
		 * sent; one response may still bring fetch.max.bytes (counted
		 * compressed): small compressible messages made a 1M backlog
		 * 427 MB resident at librdkafka's 50 MB (bench/backlog_rss.sh) */
		{ "fetch.max.bytes", "4194304" },
	};
	static const char *const producer_defaults[][2] = {
		{ "enable.idempotence", "true" },
		{ "linger.ms", "5" },
		{ "queue.buffering.max.kbytes", "65536" },
	};
	rd_kafka_t *rk;

	if (set_kv(kc, "bootstrap.servers", c->kafka_brokers, errstr, errstr_size) ||
	    set_kv(kc, "client.id", "mtlzd", errstr, errstr_size))
		goto out_conf;
	rd_kafka_conf_set_log_cb(kc, on_rdkafka_log);
	if (type == RD_KAFKA_CONSUMER) {
		if (set_kv(kc, "group.id", c->kafka_group_id, errstr, errstr_size))
			goto out_conf;
		for (size_t i = 0; i < MTLZ_ARRAY_SIZE(consumer_defaults); i++)
			if (set_kv(kc, consumer_defaults[i][0], consumer_defaults[i][1], errstr, errstr_size))
				goto out_conf;
		/* exactly_once: offsets go only through the transactions, and
		 * only committed upstream records are read */
		if (d->eos && (set_kv(kc, "enable.auto.commit", "false", errstr, errstr_size) ||
			       set_kv(kc, "isolation.level", "read_committed", errstr, errstr_size)))
			goto out_conf;
		rd_kafka_conf_set_rebalance_cb(kc, on_rebalance);
		rd_kafka_conf_set_offset_commit_cb(kc, on_offset_commit);
	} else {
		for (size_t i = 0; i < MTLZ_ARRAY_SIZE(producer_defaults); i++)
			if (set_kv(kc, producer_defaults[i][0], producer_defaults[i][1], errstr, errstr_size))
				goto out_conf;
		if (d->eos && set_kv(kc, "transactional.id", d->txn_id, errstr, errstr_size))
			goto out_conf;
		rd_kafka_conf_set_dr_msg_cb(kc, on_delivery);
	}
	for (int i = 0; i < n_pass; i++)
		if (set_kv(kc, pass[i].key, pass[i].value, errstr, errstr_size))
			goto out_conf;
	if (type == RD_KAFKA_PRODUCER) {
		/* dead letters copy the input: cut them to what the producer
		 * sends, leaving room for key and headers */
		char v[32];
		size_t vs = sizeof(v);
		long mmb = 1000000;

		if (rd_kafka_conf_get(kc, "message.max.bytes", v, &vs) == RD_KAFKA_CONF_OK)
			mmb = atol(v);
		d->dlq_max_value = (size_t)MTLZ_MAX(mmb - 65536, 1024L);
	}
	rd_kafka_conf_set_error_cb(kc, on_error);
	rd_kafka_conf_set_opaque(kc, d);
	rk = rd_kafka_new(type, kc, errstr, errstr_size);
	if (rk)
		return rk;
out_conf:
	rd_kafka_conf_destroy(kc);
	return NULL;
}

/* How long backpressure waits without polling before it pauses: well
 * inside max.poll.interval.ms (300 s), so polling resumes long before the
 * group would evict us. */
static double pause_after_s(rd_kafka_t *consumer)
{
	char v[32];
	size_t vs = sizeof(v);
	const long mpi = rd_kafka_conf_get(rd_kafka_conf(consumer), "max.poll.interval.ms", v,
					   &vs) == RD_KAFKA_CONF_OK ? atol(v) : 300000;

	return MTLZ_MIN(5.0, mpi / 4000.0);
}

static int alloc_slots(struct mtlzd *d)
{
	const int B = d->conf->batch_max_size;

	for (int i = 0; i < MTLZD_SLOTS; i++) {
		struct mtlzd_slot *s = &d->slots[i];

		s->x = mtlz_aligned_alloc((size_t)B * d->L * sizeof(float));
		s->items = calloc((size_t)B, sizeof(*s->items));
		s->out = calloc((size_t)B, sizeof(*s->out));
		s->dead = calloc((size_t)B, sizeof(*s->dead));
		s->state = calloc((size_t)B, sizeof(*s->state));
		s->msg = calloc((size_t)B, sizeof(*s->msg));
		if (!s->x || !s->items || !s->out || !s->dead || !s->state || !s->msg)
			return MTLZ_ERR_NOMEM;
		s->cap = B;
		d->free_q[d->n_free++] = i;
	}
	d->open_slot = -1;
	return MTLZ_OK;
}

static int load_model(struct mtlzd *d, char *errstr, size_t errstr_size)
{
	const mtlz_conf *c = d->conf;
	mtlz_engine_opts eo;
	const char *v;
	double t0;
	int rc;

	d->model = mtlz_model_load(c->model_path, errstr, errstr_size);
	if (!d->model)
		return MTLZ_ERR_FORMAT;
	rc = mtlz_sha256_file(c->model_path, d->model_sha256, errstr, errstr_size);
	if (rc)
		return rc;
	/* result.avsc's class enum is the paper's four classes, in this order */
	for (int k = 0; k < 4; k++) {
		static const char *const want[] = { "passive", "star_forming", "composite", "agn" };

		if (mtlz_model_arch(d->model)->n_classes != 4 ||
		    strcmp(mtlz_model_class_name(d->model, k), want[k]) != 0)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: classes must be passive,star_forming,composite,agn "
					"(result.avsc); this model has %d classes",
					c->model_path, mtlz_model_arch(d->model)->n_classes);
	}
	v = c->model_version[0] ? c->model_version : mtlz_model_meta(d->model, "mtlz.version");
	snprintf(d->model_version, sizeof(d->model_version), "%s", v ? v : "unversioned");
	mtlz_engine_opts_default(&eo);
	eo.kind = c->engine_kind;
	eo.n_threads = c->engine_threads;
	eo.max_batch = c->batch_max_size;
	eo.mc_samples = c->engine_mc_samples;
	eo.seed = (uint64_t)c->engine_seed;
	eo.precision = c->engine_precision;
	d->engine = mtlz_engine_new(&eo, errstr, errstr_size);
	if (!d->engine)
		return MTLZ_ERR_INVALID;
	rc = mtlz_engine_set_model(d->engine, d->model, errstr, errstr_size);
	if (rc)
		return rc;
	d->L = mtlz_model_arch(d->model)->input_length;
	/* warm-up before READY: every batch size the engine will see (CUDA
	 * graphs captured, kernels loaded, buffers and weights paged in) */
	t0 = mtlz_now();
	rc = mtlz_engine_warmup(d->engine, c->engine_mc_samples, errstr, errstr_size);
	if (rc)
		return rc;
	mtlz_log(MTLZ_LOG_INFO, "event=warmup engine=%s max_batch=%d mc=%d ms=%.0f",
		 mtlz_engine_name(d->engine), c->batch_max_size, c->engine_mc_samples,
		 (mtlz_now() - t0) * 1000);
	mtlz_prep_opts_default(&d->prep);
	d->prep.grid = *mtlz_model_grid(d->model);
	if (c->preprocess_mask_bits[0])
		rc = mtlz_mask_bits_parse(c->preprocess_mask_bits, &d->prep.and_mask_bits,
					  errstr, errstr_size);
	return rc;
}

int mtlzd_start(struct mtlzd *d, const mtlz_conf *c, volatile sig_atomic_t *stop,
		char *errstr, size_t errstr_size)
{
	const char *schemas = getenv("MTLZ_SCHEMA_DIR");
	rd_kafka_topic_partition_list_t *sub;
	rd_kafka_resp_err_t err;
	long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
	int rc, n_prep;

	memset(d, 0, sizeof(*d));
	d->conf = c;
	d->stop = stop;
	pthread_mutex_init(&d->lock, NULL);
	pthread_cond_init(&d->cond_ready, NULL);
	pthread_cond_init(&d->cond_free, NULL);
	pthread_mutex_init(&d->work_lock, NULL);
	pthread_cond_init(&d->cond_work, NULL);
	d->eos = strcmp(c->delivery_guarantee, "exactly_once") == 0;
	if (d->eos) {
		char host[128] = "localhost";

		gethostname(host, sizeof(host) - 1);
		if (c->delivery_transactional_id[0])
			snprintf(d->txn_id, sizeof(d->txn_id), "%s", c->delivery_transactional_id);
		else
			snprintf(d->txn_id, sizeof(d->txn_id), "mtlzd-%s-%s", c->kafka_group_id, host);
	}
	/* 0: enough to keep a GPU engine fed (one thread decodes and
	 * preprocesses ~10,000 spectra/s), never more than there are cores */
	n_prep = c->preprocess_threads ? c->preprocess_threads :
		 (int)MTLZ_MAX(1L, MTLZ_MIN(4L, n_cpu));
	d->tracker = mtlz_offsets_new();
	if (!d->tracker)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	rc = load_model(d, errstr, errstr_size);
	if (rc)
		return rc;
	if (!schemas)
		schemas = MTLZ_SCHEMA_DIR;
	d->avro_out = mtlz_avro_new(schemas, NULL, errstr, errstr_size);
	if (!d->avro_out)
		return MTLZ_ERR_FORMAT;
	d->output_framing = mtlz_framing_parse(c->output_framing);
	snprintf(d->result_fp, sizeof(d->result_fp), "%016" PRIx64,
		 mtlz_avro_result_fingerprint(d->avro_out));
	if (alloc_slots(d))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory (slots)");
	rc = workers_start(d, n_prep, errstr, errstr_size);
	if (rc)
		return rc;
	d->producer = make_client(d, RD_KAFKA_PRODUCER, errstr, errstr_size);
	if (!d->producer)
		return MTLZ_ERR_INVALID;
	if (d->eos && mtlzd_txn_init(d, errstr, errstr_size))
		return MTLZ_ERR_IO;
	d->consumer = make_client(d, RD_KAFKA_CONSUMER, errstr, errstr_size);
	if (!d->consumer)
		return MTLZ_ERR_INVALID;
	rd_kafka_poll_set_consumer(d->consumer);
	d->commit_q = rd_kafka_queue_new(d->consumer);
	d->pause_after_s = pause_after_s(d->consumer);
	if (mtlzd_wake_start(&d->wake, d->consumer))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "cannot start threads");
	sub = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(sub, c->topics_input, RD_KAFKA_PARTITION_UA);
	err = rd_kafka_subscribe(d->consumer, sub);
	rd_kafka_topic_partition_list_destroy(sub);
	if (err)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "subscribe %s: %s",
				c->topics_input, rd_kafka_err2str(err));
	atomic_store(&d->infer_alive_us, mtlzd_now_us());
	if (pthread_create(&d->infer_thr, NULL, infer_main, d) ||
	    pthread_create(&d->deliver_thr, NULL, deliver_main, d))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "cannot start threads");
	pthread_setname_np(d->infer_thr, "mtlzd-infer");
	pthread_setname_np(d->deliver_thr, "mtlzd-deliver");
	mtlz_log(MTLZ_LOG_INFO, "event=started model=%s sha256=%s version=%s engine=\"%s\" "
		 "input=%s output=%s dead_letter=%s batch=%d delay_ms=%d preprocess_threads=%d "
		 "guarantee=%s%s%s",
		 c->model_path, d->model_sha256, d->model_version,
		 mtlz_engine_describe(d->engine), c->topics_input, c->topics_output,
		 c->topics_dead_letter, c->batch_max_size, c->batch_max_delay_ms, n_prep,
		 c->delivery_guarantee, d->eos ? " transactional_id=" : "", d->eos ? d->txn_id : "");
	return MTLZ_OK;
}

/* Sum over the assignment of (high watermark - position). */
/* Messages behind the high watermark on the assigned partitions this
 * consumer has read from; partitions it has not read from yet (no
 * position: where it starts is the committed offset, which only a broker
 * round trip would tell) are counted in *unread, not in the lag, so the
 * lag is a lower bound while *unread > 0; a partition known to be empty
 * counts in neither. */
static int64_t consumer_lag(struct mtlzd *d, int *unread)
{
	rd_kafka_topic_partition_list_t *a = NULL;
	int64_t lag = 0;

	*unread = 0;
	if (rd_kafka_assignment(d->consumer, &a) || !a)
		return -1;
	rd_kafka_position(d->consumer, a);
	for (int i = 0; i < a->cnt; i++) {
		int64_t lo, hi;

		if (rd_kafka_get_watermark_offsets(d->consumer, a->elems[i].topic,
						   a->elems[i].partition, &lo, &hi) != 0)
			lo = hi = -1;
		if (a->elems[i].offset < 0) {
			/* nothing consumed: an empty partition (watermarks
			 * known, equal) is no lag, anything else unknown */
			*unread += !(lo >= 0 && hi <= lo);
			continue;
		}
		if (hi >= 0 && hi > a->elems[i].offset)
			lag += hi - a->elems[i].offset;
	}
	rd_kafka_topic_partition_list_destroy(a);
	return lag;
}

/* What the watchdog saw at its last look. */
struct watchdog_seen {
	uint64_t done;    /* results + dead letters delivered */
	int pending;      /* work was waiting then */
};

/*
 * Whether the processing loop makes progress, for WATCHDOG=1 (looked at
 * every WatchdogSec / 4): the infer thread is alive (it beats at least
 * once a second, also when idle) and either something was delivered since
 * the last look, or work was not waiting at both looks (idle: nothing to
 * do is no stall). A batch that waits a whole look with nothing delivered
 * (engine hung, output blocked) starves the watchdog, and systemd restarts
 * the daemon; at-least-once loses nothing by that.
 * @locality consume thread
 */
static int watchdog_progress(struct mtlzd *d, uint64_t wd_usec, struct watchdog_seen *w)
{
	const uint64_t done = atomic_load(&d->cnt.results_delivered) +
			      atomic_load(&d->cnt.dlq_delivered);
	int pending, ok;

	pthread_mutex_lock(&d->lock);
	pending = d->busy > 0;
	pthread_mutex_unlock(&d->lock);
	pending |= d->open_slot >= 0 && slot_count(&d->slots[d->open_slot]) > 0;
	ok = mtlzd_now_us() - atomic_load(&d->infer_alive_us) < (int64_t)wd_usec / 2 &&
	     (done != w->done || !pending || !w->pending);
	w->done = done;
	w->pending = pending;
	return ok;
}

static void report_status(struct mtlzd *d, double dt, uint64_t *last_results)
{
	const uint64_t res = atomic_load(&d->cnt.results_delivered);
	uint64_t dlq = 0;
	const double rate = dt > 0 ? (double)(res - *last_results) / dt : 0;
	int unread;
	const int64_t lag = consumer_lag(d, &unread);
	char by_class[MTLZD_N_REASONS * 40] = "";
	size_t used = 0;

	/* dead_letter=<all> and dead_letter.<class>=<n> for each class seen */
	for (int r = 0; r < MTLZD_N_REASONS; r++) {
		const uint64_t n = atomic_load(&d->cnt.dlq_by_reason[r]);

		dlq += n;
		if (n && used < sizeof(by_class))
			used += (size_t)snprintf(by_class + used, sizeof(by_class) - used,
						 " dead_letter.%s=%" PRIu64, mtlzd_reason_name(r), n);
	}
	*last_results = res;
	mtlz_log(MTLZ_LOG_INFO, "event=status rate=%.1f consumed=%" PRIu64 " results=%" PRIu64
		 " dead_letter=%" PRIu64 "%s batches=%" PRIu64 " lag=%" PRId64 " unread_partitions=%d"
		 " consume_busy_ms=%" PRIu64 " engine_busy_ms=%" PRIu64 " publish_busy_ms=%" PRIu64
		 " fetch_wakes=%" PRIu64 " paused=%d pauses=%" PRIu64,
		 rate, (uint64_t)atomic_load(&d->cnt.consumed), res, dlq, by_class,
		 (uint64_t)atomic_load(&d->cnt.batches), lag, unread,
		 (uint64_t)atomic_load(&d->cnt.consume_busy_us) / 1000,
		 (uint64_t)atomic_load(&d->cnt.engine_busy_us) / 1000,
		 (uint64_t)atomic_load(&d->cnt.publish_busy_us) / 1000,
		 (uint64_t)atomic_load(&d->wake.wakes), d->paused,
		 (uint64_t)atomic_load(&d->pauses));
	if (d->eos)
		mtlz_log(MTLZ_LOG_INFO, "event=txn_status transactions=%" PRIu64 " aborted=%" PRIu64
			 " rewinds=%" PRIu64, (uint64_t)atomic_load(&d->cnt.txn_committed),
			 (uint64_t)atomic_load(&d->cnt.txn_aborted),
			 (uint64_t)atomic_load(&d->cnt.rewinds));
	sd_notifyf(0, "STATUS=%.1f spectra/s, lag %s%" PRId64 ", %" PRIu64 " results, %" PRIu64
		   " dead-lettered%s", rate, unread > 0 ? ">= " : "", lag, res, dlq,
		   d->paused ? ", paused (engine or output stalled)" : "");
}

int mtlzd_run(struct mtlzd *d)
{
	const mtlz_conf *c = d->conf;
	const double delay = c->batch_max_delay_ms / 1000.0;
	double last_status = mtlz_now();
	uint64_t wd_usec = 0, last_results = 0;
	int64_t wd_last_us = 0;
	struct watchdog_seen wd = { 0 };
	rd_kafka_resp_err_t err;
	double stalled_since = 0;
	int ready = 0, rc = 0;

	if (sd_watchdog_enabled(0, &wd_usec) <= 0)
		wd_usec = 0;
	while (!*d->stop && !atomic_load(&d->fatal)) {
		const struct mtlzd_slot *os;
		rd_kafka_message_t *m = NULL;
		double now;

		if (atomic_load(&d->rewind))
			mtlzd_txn_rewind(d);
		if (backpressure(d, &stalled_since)) {
			os = d->open_slot >= 0 ? &d->slots[d->open_slot] : NULL;
			m = rd_kafka_consumer_poll(d->consumer, os ?
				mtlzd_batch_poll_ms(slot_count(os), os->opened_at, delay,
						    mtlz_now(), 100) : 100);
		}
		if (m && !m->err) {
			mtlzd_wake_note(&d->wake, m->len);
			handle_message(d, m);  /* takes m over */
		} else if (m) {
			if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
				mtlz_log(MTLZ_LOG_WARN, "event=consume_error error=\"%s\"",
					 rd_kafka_message_errstr(m));
			rd_kafka_message_destroy(m);
		}
		now = mtlz_now();
		os = d->open_slot >= 0 ? &d->slots[d->open_slot] : NULL;
		if (os && mtlzd_batch_due(slot_count(os), os->opened_at, delay, now))
			mtlzd_close_open_slot(d);
		if (!ready && atomic_load(&d->joined)) {
			ready = 1;
			sd_notify(0, "READY=1");
			mtlz_log(MTLZ_LOG_INFO, "event=ready");
		}
		if (wd_usec && ready && mtlzd_now_us() - wd_last_us >= (int64_t)wd_usec / 4) {
			wd_last_us = mtlzd_now_us();
			if (watchdog_progress(d, wd_usec, &wd))
				sd_notify(0, "WATCHDOG=1");
		}
		if ((now - last_status) * 1000 >= c->status_interval_ms) {
			report_status(d, now - last_status, &last_results);
			last_status = now;
		}
	}
	sd_notify(0, "STOPPING=1");
	mtlz_log(MTLZ_LOG_INFO, "event=stopping fatal=%d", atomic_load(&d->fatal));
	if (!atomic_load(&d->fatal)) {
		drain_slots(d);
		if (rd_kafka_flush(d->producer, 60 * 1000))
			rc = -1;
		/* exactly_once: the transactions committed the offsets; a batch
		 * aborted just now is simply read again by the next owner */
		err = d->eos ? RD_KAFKA_RESP_ERR_NO_ERROR : commit_sync(d->consumer);
		if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
			mtlz_log(MTLZ_LOG_WARN, "event=commit_failed error=\"%s\"",
				 rd_kafka_err2str(err));
	}
	/* the workers hand every message they hold back to librdkafka; a
	 * slot still open (fatal stop) is dropped: not committed, read again */
	workers_stop(d);
	if (d->open_slot >= 0)
		mtlzd_slot_release(&d->slots[d->open_slot]);
	mtlzd_wake_stop(&d->wake);
	report_status(d, 0, &last_results);  /* while the assignment gives the lag */
	atomic_store(&d->consumer_closing, 1);
	rd_kafka_consumer_close(d->consumer);
	return atomic_load(&d->fatal) || rc ? 1 : 0;
}

void mtlzd_destroy(struct mtlzd *d)
{
	workers_stop(d);  /* first: the infer thread waits for filled slots */
	atomic_store(&d->infer_stop, 1);
	pthread_mutex_lock(&d->lock);
	pthread_cond_broadcast(&d->cond_ready);
	pthread_mutex_unlock(&d->lock);
	if (d->infer_thr)
		pthread_join(d->infer_thr, NULL);
	atomic_store(&d->deliver_stop, 1);
	if (d->deliver_thr)
		pthread_join(d->deliver_thr, NULL);
	/* what slots hold (dead-letter copies, headers) */
	for (int i = 0; i < MTLZD_SLOTS; i++)
		mtlzd_slot_release(&d->slots[i]);
	/* the producer first: its last delivery reports (after a fatal stop)
	 * store offsets through the consumer handle, which must still exist
	 * (closed: the store fails harmlessly) */
	if (d->producer) {
		rd_kafka_flush(d->producer, 5000);
		rd_kafka_destroy(d->producer);
	}
	mtlzd_wake_stop(&d->wake);
	if (d->commit_q)
		rd_kafka_queue_destroy(d->commit_q);
	if (d->consumer)
		rd_kafka_destroy(d->consumer);
	for (int i = 0; i < MTLZD_SLOTS; i++) {
		free(d->slots[i].dead);
		free(d->slots[i].x);
		free(d->slots[i].items);
		free(d->slots[i].out);
		free(d->slots[i].state);
		free(d->slots[i].msg);
	}
	for (int i = 0; i < d->n_workers; i++) {
		mtlz_avro_free(d->workers[i].avro);
		mtlz_prep_ws_free(d->workers[i].ws);
	}
	free(d->workers);
	free(d->jobs);
	mtlz_avro_free(d->avro_out);
	mtlz_engine_free(d->engine);
	mtlz_model_free(d->model);
	mtlz_offsets_free(d->tracker);
	free(d->txn_pos);
	pthread_cond_destroy(&d->cond_ready);
	pthread_cond_destroy(&d->cond_free);
	pthread_mutex_destroy(&d->lock);
	pthread_cond_destroy(&d->cond_work);
	pthread_mutex_destroy(&d->work_lock);
}
