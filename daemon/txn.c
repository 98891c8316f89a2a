/*
 * txn.c - delivery.guarantee exactly_once: one Kafka transaction per batch
 * slot, in the pattern of librdkafka's examples/transactions.c:
 *
 *   begin_transaction
 *   produce the slot's results and its deferred dead letters
 *   send_offsets_to_transaction(the slot's input offsets + 1, group metadata)
 *   commit_transaction
 *
 * Errors, by librdkafka's classes: retriable ones (send_offsets, commit,
 * abort) are retried with backoff; an abortable one aborts the transaction,
 * the slots read after it are dropped and the consume thread seeks every
 * partition back to the position after the last committed transaction
 * (kept here, so no round trip and no dependence on the broker storing
 * TxnOffsetCommit), after a backoff that doubles with each consecutive
 * abort; MTLZD_TXN_MAX_ABORTS in a row, a fatal error (e.g. fenced by a
 * newer instance with the same transactional.id) or one that is neither
 * retriable nor abortable stop the daemon with exit code 1, with nothing
 * committed for the failed batch (systemd restarts it; the batch is read
 * again).
 */
#define _GNU_SOURCE
#include "mtlzd.h"
#include "common.h"
#include "log.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TXN_TIMEOUT_MS 30000     /* init_transactions, seek */

int mtlzd_txn_init(struct mtlzd *d, char *errstr, size_t errstr_size)
{
	rd_kafka_error_t *e = rd_kafka_init_transactions(d->producer, TXN_TIMEOUT_MS);
	int rc;

	if (!e)
		return MTLZ_OK;
	rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
		      "exactly_once: init_transactions (transactional.id %s): %s", d->txn_id,
		      rd_kafka_error_string(e));
	rd_kafka_error_destroy(e);
	return rc;
}

/* @locality consume thread; takes d->lock */
void mtlzd_txn_seen(struct mtlzd *d, int32_t p, int64_t off)
{
	if (p < 0)
		return;
	pthread_mutex_lock(&d->lock);
	if (p >= d->n_txn_pos) {
		const int n = MTLZ_MAX(p + 1, 2 * d->n_txn_pos);
		int64_t *v = realloc(d->txn_pos, (size_t)n * sizeof(*v));

		if (!v) {
			pthread_mutex_unlock(&d->lock);
			mtlz_log(MTLZ_LOG_ERROR, "event=out_of_memory detail=\"txn positions\"");
			mtlzd_set_fatal(d);
			return;
		}
		for (int i = d->n_txn_pos; i < n; i++)
			v[i] = -1;
		d->txn_pos = v;
		d->n_txn_pos = n;
	}
	if (d->txn_pos[p] < 0)
		d->txn_pos[p] = off;
	pthread_mutex_unlock(&d->lock);
}

/* @locality consume thread (rebalance callback); takes d->lock */
void mtlzd_txn_forget(struct mtlzd *d, int32_t p)
{
	pthread_mutex_lock(&d->lock);
	if (p >= 0 && p < d->n_txn_pos)
		d->txn_pos[p] = -1;
	pthread_mutex_unlock(&d->lock);
}

/* The next offset to read per partition once slot s is committed. */
static rd_kafka_topic_partition_list_t *slot_offsets(struct mtlzd *d,
						     const struct mtlzd_slot *s)
{
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(4);
	const char *topic = d->conf->topics_input;

	for (int i = 0; i < s->n + s->n_dead; i++) {
		const int32_t p = i < s->n ? s->items[i].partition : s->dead[i - s->n].partition;
		const int64_t off = i < s->n ? s->items[i].offset : s->dead[i - s->n].offset;
		rd_kafka_topic_partition_t *tp = rd_kafka_topic_partition_list_find(l, topic, p);

		if (!tp) {
			tp = rd_kafka_topic_partition_list_add(l, topic, p);
			tp->offset = off + 1;
		} else if (off + 1 > tp->offset) {
			tp->offset = off + 1;
		}
	}
	return l;
}

static void advance(struct mtlzd *d, const rd_kafka_topic_partition_list_t *l)
{
	pthread_mutex_lock(&d->lock);
	for (int i = 0; i < l->cnt; i++) {
		const int32_t p = l->elems[i].partition;

		/* a partition revoked meanwhile was forgotten: keep it so */
		if (p < d->n_txn_pos && d->txn_pos[p] >= 0)
			d->txn_pos[p] = l->elems[i].offset;
	}
	pthread_mutex_unlock(&d->lock);
}

/* Sleeps ms in 100 ms steps, staying alive for the watchdog; 0, or -1 when
 * the daemon is stopping. @locality infer thread */
static int pause_ms(struct mtlzd *d, int ms)
{
	for (; ms > 0; ms -= 100) {
		if (*d->stop || atomic_load(&d->fatal))
			return -1;
		usleep(100 * 1000);
		atomic_store(&d->infer_alive_us, mtlzd_now_us());
	}
	return 0;
}

static void txn_fatal(struct mtlzd *d, const char *step, const char *msg)
{
	mtlz_log(MTLZ_LOG_ERROR, "event=txn_fatal step=%s error=\"%s\" detail=\"nothing "
		 "committed for this batch; stopping\"", step, msg);
	mtlzd_set_fatal(d);
}

/* Retries a retriable error of `step` up to TXN_RETRIES times with backoff;
 * returns the final error (NULL on success). */
#define TXN_RETRIES 8
#define TXN_RETRY(d, step, call)                                                     \
	({                                                                           \
		rd_kafka_error_t *e_ = (call);                                       \
		for (int try_ = 1; e_ && rd_kafka_error_is_retriable(e_) &&          \
		     !rd_kafka_error_is_fatal(e_) && try_ <= TXN_RETRIES; try_++) {  \
			mtlz_log(MTLZ_LOG_WARN, "event=txn_retry step=%s try=%d "    \
				 "error=\"%s\"", step, try_, rd_kafka_error_string(e_)); \
			rd_kafka_error_destroy(e_);                                  \
			if (pause_ms(d, 100 << MTLZ_MIN(try_, 6)))                   \
				break;                                               \
			e_ = (call);                                                 \
		}                                                                    \
		e_;                                                                  \
	})

int mtlzd_txn_run(struct mtlzd *d, struct mtlzd_slot *s)
{
	rd_kafka_topic_partition_list_t *offs = NULL;
	rd_kafka_consumer_group_metadata_t *cgmd = NULL;
	rd_kafka_error_t *e;
	const char *step = "begin_transaction";
	int backoff;

	e = rd_kafka_begin_transaction(d->producer);
	if (e)
		goto failed;
	step = "produce";
	if (mtlzd_publish_results(d, s) < 0)
		goto produce_failed;
	for (int i = 0; i < s->n_dead; i++)
		if (mtlzd_dead_letter_send(d, &s->dead[i]) < 0)
			goto produce_failed;
	offs = slot_offsets(d, s);
	/* the current generation: a rebalance may have begun since these
	 * inputs were read (this is answered by librdkafka's own thread) */
	cgmd = rd_kafka_consumer_group_metadata(d->consumer);
	step = "send_offsets_to_transaction";
	e = TXN_RETRY(d, step, rd_kafka_send_offsets_to_transaction(d->producer, offs, cgmd, -1));
	if (e)
		goto failed;
	step = "commit_transaction";
	e = TXN_RETRY(d, step, rd_kafka_commit_transaction(d->producer, -1));
	if (e)
		goto failed;
	advance(d, offs);
	rd_kafka_topic_partition_list_destroy(offs);
	rd_kafka_consumer_group_metadata_destroy(cgmd);
	atomic_fetch_add(&d->cnt.txn_committed, 1);
	atomic_fetch_add(&d->cnt.results_delivered, (uint64_t)s->n);
	atomic_fetch_add(&d->cnt.dlq_delivered, (uint64_t)s->n_dead);
	d->txn_failures = 0;
	return 0;

produce_failed:
	/* produce() logged it: the transaction is abortable (__STATE) or the
	 * producer failed fatally; anything else cannot succeed on a retry */
	if (rd_kafka_fatal_error(d->producer, NULL, 0)) {
		txn_fatal(d, step, "the producer failed fatally (see kafka_fatal)");
		goto out;
	}
	goto abort;
failed:
	if (rd_kafka_error_is_fatal(e) || !rd_kafka_error_txn_requires_abort(e)) {
		/* fatal (e.g. fenced), or neither retriable nor abortable:
		 * librdkafka says treat as fatal */
		txn_fatal(d, step, rd_kafka_error_string(e));
		rd_kafka_error_destroy(e);
		goto out;
	}
	mtlz_log(MTLZ_LOG_WARN, "event=txn_abortable step=%s error=\"%s\"", step,
		 rd_kafka_error_string(e));
	rd_kafka_error_destroy(e);
abort:
	e = TXN_RETRY(d, "abort_transaction", rd_kafka_abort_transaction(d->producer, -1));
	if (e) {
		txn_fatal(d, "abort_transaction", rd_kafka_error_string(e));
		rd_kafka_error_destroy(e);
		goto out;
	}
	atomic_fetch_add(&d->cnt.txn_aborted, 1);
	d->txn_failures++;
	mtlz_log(MTLZ_LOG_WARN, "event=txn_aborted results=%d dead_letters=%d attempt=%d "
		 "detail=\"rewinding to the last committed offsets\"", s->n, s->n_dead,
		 d->txn_failures);
	if (d->txn_failures >= MTLZD_TXN_MAX_ABORTS) {
		/* the same batch keeps failing: stop rather than spin */
		char msg[96];

		snprintf(msg, sizeof(msg), "%d consecutive aborted transactions",
			 d->txn_failures);
		txn_fatal(d, "abort_transaction", msg);
		goto out;
	}
	backoff = 100 << MTLZ_MIN(d->txn_failures, 8);
	pause_ms(d, MTLZ_MIN(backoff, 30000));
	if (offs)
		rd_kafka_topic_partition_list_destroy(offs);
	if (cgmd)
		rd_kafka_consumer_group_metadata_destroy(cgmd);
	return 1;
out:
	if (offs)
		rd_kafka_topic_partition_list_destroy(offs);
	if (cgmd)
		rd_kafka_consumer_group_metadata_destroy(cgmd);
	return -1;
}

void mtlzd_txn_rewind(struct mtlzd *d)
{
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(8);
	rd_kafka_error_t *e;

	/* the open slot was read past the aborted batch: hand it over too (its
	 * workers may still be filling it); the infer thread drops every slot
	 * handed over while rewinding */
	mtlzd_close_open_slot(d);
	pthread_mutex_lock(&d->lock);
	while (d->busy > 0 && !atomic_load(&d->fatal))
		pthread_cond_wait(&d->cond_free, &d->lock);
	for (int p = 0; p < d->n_txn_pos; p++)
		if (d->txn_pos[p] >= 0)
			rd_kafka_topic_partition_list_add(l, d->conf->topics_input, p)->offset =
				d->txn_pos[p];
	pthread_mutex_unlock(&d->lock);
	if (atomic_load(&d->fatal))
		goto out;
	/* seeking purges what was fetched past these positions */
	e = rd_kafka_seek_partitions(d->consumer, l, TXN_TIMEOUT_MS);
	if (e) {
		mtlz_log(MTLZ_LOG_ERROR, "event=rewind_failed error=\"%s\"", rd_kafka_error_string(e));
		rd_kafka_error_destroy(e);
		mtlzd_set_fatal(d);
		goto out;
	}
	for (int i = 0; i < l->cnt; i++)
		if (l->elems[i].err) {
			mtlz_log(MTLZ_LOG_ERROR, "event=rewind_failed partition=%" PRId32 " error=\"%s\"",
				 l->elems[i].partition, rd_kafka_err2str(l->elems[i].err));
			mtlzd_set_fatal(d);
			goto out;
		}
	atomic_fetch_add(&d->cnt.rewinds, 1);
	mtlz_log(MTLZ_LOG_INFO, "event=rewound partitions=%d", l->cnt);
	atomic_store(&d->rewind, 0);
out:
	rd_kafka_topic_partition_list_destroy(l);
}
