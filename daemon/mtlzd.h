/*
 * mtlzd.h - the daemon's shared state. Long-lived threads:
 *
 *   consume  polls Kafka; for each input message records its offset (in
 *            arrival order), reserves the next position of the open batch
 *            slot and queues (message, slot, position) for a preprocess
 *            worker; closes a slot on batch.max_size or batch.max_delay_ms;
 *            serves rebalances; sends systemd notifications.
 *   prep-N   preprocess.threads workers: decode (Avro), validate and
 *            preprocess a message straight into its reserved slot position
 *            (the slot keeps the message until it is released), or
 *            dead-letter it and hand it back to librdkafka.
 *   infer    owns the engine (and every CUDA call): takes the oldest closed
 *            slot once all its positions are filled, compacts it (drops the
 *            dead-lettered positions), runs it, dead-letters any spectrum
 *            whose outputs cannot be published (non-finite), encodes the
 *            results and produces them in position order (= arrival order).
 *   deliver  serves the producer's delivery reports: an input offset is
 *            stored for commit only once its result (or its dead-letter
 *            record) is acknowledged, in offset order per partition.
 *
 * Slots go to infer strictly in the order they were closed, whatever order
 * the workers finish in, so results of a partition are produced in input
 * order and exactly_once transactions commit offsets in order.
 *
 * With delivery.guarantee exactly_once (txn.c) each slot is one Kafka
 * transaction: the infer thread produces the slot's results and its deferred
 * dead letters and sends the slot's input offsets in the same transaction;
 * an abortable error aborts it and the consume thread rewinds the consumer
 * to the last committed positions.
 *
 * Batch slots are preallocated (a ring of MTLZD_SLOTS), sized for the largest
 * batch, so pinned host memory and one CUDA stream per slot can replace them
 * without reshaping the pipeline. The worker queue holds at most every
 * position of every slot, so it never fills: backpressure stays where it
 * was, the consume thread waiting for a free slot.
 */
#ifndef MTLZD_H
#define MTLZD_H

#include "avro_io.h"
#include "conf.h"
#include "model.h"
#include "offsets.h"
#include "mtlz_engine.h"
#include "preprocess.h"

#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>

#define MTLZD_SLOTS 3
#define MTLZD_TXN_MAX_ABORTS 6   /* consecutive aborted transactions: give up */
#define MTLZD_STAR_FORMING 1  /* class index (checked against the model at start) */

/* Dead-letter reason classes: decode errors, then preprocessing rejects,
 * then outputs the engine gave that cannot be published. */
enum mtlzd_reason {
	MTLZD_R_FRAMING, MTLZD_R_SCHEMA, MTLZD_R_AVRO, MTLZD_R_INVALID,
	MTLZD_R_OVERSIZE, MTLZD_R_BAD_GRID, MTLZD_R_NO_DATA, MTLZD_R_COVERAGE,
	MTLZD_R_BAD_PIXELS, MTLZD_R_NONPOSITIVE_MEAN, MTLZD_R_NONFINITE_OUTPUT,
	MTLZD_N_REASONS
};

struct mtlzd_counters {
	atomic_uint_fast64_t consumed;
	atomic_uint_fast64_t results_produced;
	atomic_uint_fast64_t results_delivered;
	atomic_uint_fast64_t dlq_produced;
	atomic_uint_fast64_t dlq_delivered;
	atomic_uint_fast64_t delivery_failed;
	atomic_uint_fast64_t batches;
	atomic_uint_fast64_t dlq_by_reason[MTLZD_N_REASONS];
	atomic_uint_fast64_t offsets_stored;
	atomic_uint_fast64_t txn_committed;    /* exactly_once */
	atomic_uint_fast64_t txn_aborted;
	atomic_uint_fast64_t rewinds;
	/* where the time goes (microseconds, summed) */
	atomic_uint_fast64_t consume_busy_us;  /* decode + preprocess (not waiting) */
	atomic_uint_fast64_t engine_busy_us;   /* mtlz_engine_run */
	atomic_uint_fast64_t publish_busy_us;  /* encode + produce */
};

struct mtlzd_item {
	char spec_id[64];
	int32_t partition;
	int64_t offset;
	int64_t ts_ms;            /* input message timestamp (-1 if none) */
	uint32_t flags;
};

/* A dead-letter record, ready to produce: the original value and key
 * (truncated to fit the producer's message.max.bytes, see the headers) and
 * the original headers plus mtlz.error.* / mtlz.source.*. Deferred to its
 * slot's transaction in exactly_once, with value and key copied (buf):
 * the message they came from is handed back to librdkafka first. */
struct mtlzd_dead {
	const void *value, *key;
	size_t value_len, key_len;
	rd_kafka_headers_t *hdrs;  /* owned until produced */
	int32_t partition;
	int64_t offset;
	void *buf;                 /* owned copy of value + key (deferred only) */
};

/* What a reserved slot position holds (mtlzd_slot.state). */
enum mtlzd_pos {
	MTLZD_POS_PENDING,        /* a worker has it */
	MTLZD_POS_SPECTRUM,       /* preprocessed into x, items filled */
	MTLZD_POS_DEAD,           /* a deferred dead letter in dead[] (exactly_once) */
	MTLZD_POS_EMPTY,          /* dead-lettered at once, or dropped (fatal) */
};

/*
 * A batch slot. The consume thread reserves positions 0..n_res-1 in arrival
 * order; workers fill them in any order, each only its own position; once
 * closed and n_filled == n_res the infer thread compacts it: spectra to
 * x/items[0..n), deferred dead letters to dead[0..n_dead).
 */
struct mtlzd_slot {
	int cap;                  /* batch.max_size */
	int n_res;                /* positions reserved (consume thread) */
	int n_filled;             /* positions finished by workers (d->lock) */
	int closed;               /* no more reservations (d->lock) */
	int n;                    /* after compaction: spectra in x/items */
	int n_dead;               /* after compaction: deferred dead letters */
	double opened_at;
	float *x;                 /* [max_batch][input_length] */
	struct mtlzd_item *items; /* [max_batch] */
	rd_kafka_message_t **msg; /* [max_batch] each spectrum's input, held until
				   * release: its dead letter if the output is bad */
	mtlz_output *out;         /* [max_batch] */
	struct mtlzd_dead *dead;  /* [max_batch] */
	unsigned char *state;     /* [max_batch] enum mtlzd_pos */
};

/* One message for a preprocess worker: it owns m until it destroys it. */
struct mtlzd_job {
	rd_kafka_message_t *m;
	int slot, pos;
};

/* A preprocess worker and what it reuses from message to message. */
struct mtlzd_worker {
	struct mtlzd *d;
	int id;
	pthread_t thr;
	int started;
	mtlz_avro *avro;
	mtlz_prep_ws *ws;
};

/* Wakes librdkafka's fetcher when its prefetch queue runs low after being
 * full (fetch_wake.c). */
struct mtlzd_wake {
	rd_kafka_t *rk;
	rd_kafka_queue_t *q;          /* the consumer queue (its length) */
	long queued_min_msgs, queued_max_kbytes;
	double mean_len;              /* consume thread */
	int armed;                    /* consume thread: the queue was high */
	int started;
	pthread_t thr;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int pending, stop;            /* under lock */
	atomic_uint_fast64_t wakes;   /* ListOffsets rounds sent */
};

struct mtlzd {
	const mtlz_conf *conf;
	rd_kafka_t *consumer, *producer;
	rd_kafka_topic_t *out_topic;

	mtlz_model *model;
	char model_sha256[65];
	char model_version[64];
	char result_fp[17];         /* hex CRC-64-AVRO of result.avsc (header) */
	mtlz_engine *engine;
	mtlz_prep_opts prep;
	mtlz_avro *avro_out;        /* infer thread's (each worker has its own) */
	int output_framing;
	int L;

	/* slot ring: free and ready queues of slot indices */
	struct mtlzd_slot slots[MTLZD_SLOTS];
	int free_q[MTLZD_SLOTS], n_free;
	int ready_q[MTLZD_SLOTS], ready_head, n_ready;
	int open_slot;              /* owned by consume, -1 if none */
	int busy;                   /* slots handed to infer and not yet back */
	pthread_mutex_t lock;
	pthread_cond_t cond_ready, cond_free;

	/* preprocess workers and their queue (FIFO, MTLZD_SLOTS x max_batch) */
	struct mtlzd_worker *workers;
	int n_workers;
	struct mtlzd_job *jobs;
	int jobs_cap, jobs_head, n_jobs;
	int work_stop;              /* under work_lock */
	pthread_mutex_t work_lock;
	pthread_cond_t cond_work;

	mtlz_offsets *tracker;
	atomic_int consumer_closing;  /* the deliver thread commits no more */
	rd_kafka_queue_t *commit_q;   /* results of the deliver thread's commits */
	atomic_uint commits_ok;       /* librdkafka's auto-commits that succeeded */
	atomic_int commit_hold;       /* rebalance callbacks to come before the
				       * deliver thread commits again (consume) */
	int revoke_pending;           /* consume: a revoke awaits its assign */
	struct mtlzd_counters cnt;
	struct mtlzd_wake wake;

	/* exactly_once: next offset to read per partition after the last
	 * committed transaction (or the first offset consumed since the
	 * partition was assigned); -1 = unknown. Under lock. */
	int eos;
	char txn_id[256];
	size_t dlq_max_value;         /* dead-letter values are cut to this */
	int txn_failures;             /* consecutive aborts (infer thread) */
	int64_t *txn_pos;
	int n_txn_pos;
	atomic_int rewind;            /* a transaction aborted: rewind */

	volatile sig_atomic_t *stop;  /* set by SIGTERM/SIGINT */
	atomic_int infer_stop, deliver_stop;
	atomic_int fatal;             /* a fatal error: stop and exit non-zero */
	atomic_int joined;            /* first assignment seen */
	int paused;                   /* consume thread: the assignment is paused */
	double pause_after_s;         /* no free slot this long: pause */
	atomic_uint_fast64_t pauses;  /* times paused */
	atomic_int_fast64_t infer_alive_us;
	pthread_t infer_thr, deliver_thr;
};

/* The kafka.consumer.* and kafka.producer.* pass-through properties, each
 * given to librdkafka's configuration as mtlzd_start will give it (names
 * and values are checked there; what only a client's creation checks, such
 * as conflicting settings, is not): the first it refuses, naming the key.
 * @locality main thread */
int mtlzd_check_kafka(const mtlz_conf *conf, char *errstr, size_t errstr_size);

/* Sets up Kafka clients, model, engine and threads from a validated conf.
 * @locality main thread */
int mtlzd_start(struct mtlzd *d, const mtlz_conf *conf, volatile sig_atomic_t *stop,
		char *errstr, size_t errstr_size);
/* The consume loop; returns when *stop is set (drained and committed) or on
 * a fatal error (non-zero). @locality main thread (becomes the consumer). */
int mtlzd_run(struct mtlzd *d);
void mtlzd_destroy(struct mtlzd *d);

const char *mtlzd_reason_name(int r);

/* fetch_wake.c. start: after the consumer is created (its configuration
 * gives the queue limits); note: after each message the consume thread
 * takes (msg_len: its size); stop: before the consumer is closed. */
int mtlzd_wake_start(struct mtlzd_wake *w, rd_kafka_t *rk);
void mtlzd_wake_note(struct mtlzd_wake *w, size_t msg_len);
void mtlzd_wake_stop(struct mtlzd_wake *w);

/* pipeline.c, shared with txn.c */
int64_t mtlzd_now_us(void);  /* CLOCK_REALTIME, microseconds */
void mtlzd_set_fatal(struct mtlzd *d);
int mtlzd_publish_results(struct mtlzd *d, struct mtlzd_slot *s);
int mtlzd_dead_letter_send(struct mtlzd *d, struct mtlzd_dead *dl);
void mtlzd_slot_release(struct mtlzd_slot *s);
/* Hands the open slot (if it holds anything) to the infer thread.
 * @locality consume thread; takes d->lock */
void mtlzd_close_open_slot(struct mtlzd *d);

/* txn.c: exactly_once */
int mtlzd_txn_init(struct mtlzd *d, char *errstr, size_t errstr_size);
/* Runs slot s's outputs as one transaction: 0 committed, 1 aborted (the
 * consume thread must rewind), -1 fatal. @locality infer thread */
int mtlzd_txn_run(struct mtlzd *d, struct mtlzd_slot *s);
/* Notes the first offset consumed for a partition. @locality consume */
void mtlzd_txn_seen(struct mtlzd *d, int32_t partition, int64_t offset);
void mtlzd_txn_forget(struct mtlzd *d, int32_t partition);
/* Seeks the consumer back to the committed positions. @locality consume */
void mtlzd_txn_rewind(struct mtlzd *d);

#endif
