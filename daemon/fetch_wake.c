/*
 * fetch_wake.c - keeps librdkafka's fetcher awake while a backlog drains.
 *
 * librdkafka before 2.3 (Debian 12 ships 2.0.2) stops fetching a partition
 * once the consumer's prefetch queue is over queued.min.messages or
 * queued.max.messages.kbytes, and looks at it again only when its broker
 * thread wakes: on an op, on socket IO, or after a fixed second
 * (librdkafka issue #2879; 2.3 added fetch.queue.backoff.ms for it). While
 * mtlzd drains a backlog the queue is always full, so every fill is
 * followed by a stall: the daemon empties 32 MB (778 of the bundled
 * spectra) in ~0.6 s and then waits out the rest of the second with
 * nothing to read (measured: three waits of 167-205 ms in a drain of
 * 4,000, ~15 % of it; docs/daemon.md).
 *
 * The cure is an op on the broker threads once the queue has run low
 * after being full: a ListOffsets request (rd_kafka_offsets_for_times for
 * the assignment, one request per partition leader) queues a transmit op
 * on each leader's broker thread, which then decides again and fetches.
 * It is sent from a thread of its own (the call waits for the reply), at
 * most once per fill of the queue, and never while the queue stays low
 * (a slow steady stream costs nothing).
 */
#define _GNU_SOURCE
#include "mtlzd.h"

#include "common.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>

/* The queue length (in messages) at which librdkafka stops fetching, as
 * well as we can tell: queued.min.messages, or the byte limit over the
 * mean message size seen so far. @locality consume thread */
static long stop_level(const struct mtlzd_wake *w)
{
	long lvl = w->queued_min_msgs;

	if (w->mean_len > 0) {
		const double by_bytes = (double)w->queued_max_kbytes * 1024.0 / w->mean_len;

		if (by_bytes < (double)lvl)
			lvl = (long)by_bytes;
	}
	return MTLZ_MAX(lvl, 1L);
}

void mtlzd_wake_note(struct mtlzd_wake *w, size_t msg_len)
{
	long qlen, stop;

	if (!w->started)
		return;
	/* running mean of the message size, weight 1/64 */
	w->mean_len = w->mean_len > 0 ? w->mean_len + ((double)msg_len - w->mean_len) / 64.0 :
		      (double)msg_len;
	qlen = (long)rd_kafka_queue_length(w->q);
	stop = stop_level(w);
	/* qlen + 1: the queue as it was with this message in it */
	if (qlen + 1 >= MTLZ_MAX(stop / 2, 1L))
		w->armed = 1;  /* the fetcher may stop (or have stopped) */
	if (w->armed && qlen <= stop / 4) {
		w->armed = 0;
		pthread_mutex_lock(&w->lock);
		w->pending = 1;
		pthread_cond_signal(&w->cond);
		pthread_mutex_unlock(&w->lock);
	}
}

/* One ListOffsets round per leader of the assignment. @locality wake thread */
static void wake_fetchers(struct mtlzd_wake *w)
{
	rd_kafka_topic_partition_list_t *a = NULL;
	rd_kafka_resp_err_t err;

	if (rd_kafka_assignment(w->rk, &a) || !a)
		return;
	if (a->cnt > 0) {
		for (int i = 0; i < a->cnt; i++)
			a->elems[i].offset = -1; /* the latest offset: any answer does */
		err = rd_kafka_offsets_for_times(w->rk, a, 1000); /* a stop waits for it */
		atomic_fetch_add(&w->wakes, 1);
		if (err)
			mtlz_log(MTLZ_LOG_DEBUG, "event=fetch_wake_failed error=\"%s\"",
				 rd_kafka_err2str(err));
	}
	rd_kafka_topic_partition_list_destroy(a);
}

static void *wake_main(void *arg)
{
	struct mtlzd_wake *w = arg;

	pthread_mutex_lock(&w->lock);
	for (;;) {
		while (!w->pending && !w->stop)
			pthread_cond_wait(&w->cond, &w->lock);
		if (w->stop)
			break;
		w->pending = 0;
		pthread_mutex_unlock(&w->lock);
		wake_fetchers(w);
		pthread_mutex_lock(&w->lock);
	}
	pthread_mutex_unlock(&w->lock);
	return NULL;
}

/* A property of rk's configuration as a number, or def. */
static long conf_long(rd_kafka_t *rk, const char *name, long def)
{
	char v[64];
	size_t n = sizeof(v);

	if (rd_kafka_conf_get(rd_kafka_conf(rk), name, v, &n) != RD_KAFKA_CONF_OK)
		return def;
	return atol(v);
}

int mtlzd_wake_start(struct mtlzd_wake *w, rd_kafka_t *rk)
{
	memset(w, 0, sizeof(*w));
	w->rk = rk;
	w->queued_min_msgs = conf_long(rk, "queued.min.messages", 100000);
	w->queued_max_kbytes = conf_long(rk, "queued.max.messages.kbytes", 65536);
	w->q = rd_kafka_queue_get_consumer(rk);
	if (!w->q)
		return -1;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	if (pthread_create(&w->thr, NULL, wake_main, w)) {
		rd_kafka_queue_destroy(w->q);
		w->q = NULL;
		return -1;
	}
	pthread_setname_np(w->thr, "mtlzd-fetchwake");
	w->started = 1;
	return 0;
}

void mtlzd_wake_stop(struct mtlzd_wake *w)
{
	if (!w->started)
		return;
	pthread_mutex_lock(&w->lock);
	w->stop = 1;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
	pthread_join(w->thr, NULL);
	rd_kafka_queue_destroy(w->q);
	pthread_mutex_destroy(&w->lock);
	pthread_cond_destroy(&w->cond);
	w->started = 0;
}
