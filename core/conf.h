/*
 * conf.h - mtlzd's configuration: one table of every setting (name, type,
 * default, limits, help) in conf.c, loaded from YAML (libyaml), overridden
 * by `--set dotted.key=value`, validated once at startup. After that the
 * daemon's modules get a const pointer.
 *
 * Keys (dotted paths into the YAML mapping):
 *   kafka.brokers, kafka.group_id, kafka.consumer.* and kafka.producer.*
 *   (raw librdkafka properties, passed through verbatim),
 *   topics.input, topics.output, topics.dead_letter,
 *   input.framing (auto | confluent | single_object | container),
 *   input.schema_dir (Confluent ids: <dir>/<id>.avsc), input.max_message_bytes,
 *   output.framing (single_object | confluent | container), output.schema_id,
 *   model.path (empty: the default model, mtlz_default_model), model.version,
 *   engine.kind (cpu | cuda | auto), engine.threads, engine.mc_samples,
 *   engine.seed, engine.precision (fp32 | tf32),
 *   batch.max_size, batch.max_delay_ms,
 *   preprocess.threads, preprocess.mask_bits,
 *   delivery.guarantee (at_least_once | exactly_once), delivery.transactional_id,
 *   log.level (debug | info | warn | error), status.interval_ms
 */
#ifndef MTLZ_CONF_H
#define MTLZ_CONF_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define MTLZ_CONF_MAX_PASSTHROUGH 64

typedef struct mtlz_kv {
	char *key;    /* librdkafka property name, e.g. "security.protocol" */
	char *value;
} mtlz_kv;

typedef struct mtlz_conf {
	char *kafka_brokers;
	char *kafka_group_id;
	mtlz_kv kafka_consumer[MTLZ_CONF_MAX_PASSTHROUGH];
	int n_kafka_consumer;
	mtlz_kv kafka_producer[MTLZ_CONF_MAX_PASSTHROUGH];
	int n_kafka_producer;

	char *topics_input;
	char *topics_output;
	char *topics_dead_letter;

	char *input_framing;        /* "auto" */
	char *input_schema_dir;     /* "" = none */
	int input_max_message_bytes;/* 4 MiB */
	char *output_framing;       /* "single_object" */
	int output_schema_id;       /* for confluent output framing */

	char *model_path;
	char *model_version;        /* free text carried into results; "" = from file */

	char *engine_kind;          /* "cpu" | "cuda" | "auto" */
	int engine_threads;         /* 0 = all cores */
	int engine_mc_samples;      /* 100 */
	long long engine_seed;
	char *engine_precision;     /* "fp32" | "tf32" (CUDA only) */

	int batch_max_size;         /* 64 */
	int batch_max_delay_ms;     /* 50 */

	int preprocess_threads;     /* 0 = min(4, online CPUs) */
	char *preprocess_mask_bits; /* "" = none */

	char *delivery_guarantee;   /* "at_least_once" */
	char *delivery_transactional_id;

	char *log_level;            /* "info" */
	char *log_timestamps;       /* "auto" | "on" | "off" */
	int status_interval_ms;     /* 10000 */
} mtlz_conf;

/* Sets every key to its default. */
void mtlz_conf_init(mtlz_conf *c);
/* Loads a YAML file over the current values. Unknown keys, wrong types and
 * out-of-range values are errors naming the key, file, line and column. */
int mtlz_conf_load(mtlz_conf *c, const char *path, char *errstr, size_t errstr_size);
/* One `--set key=value` override ("kafka.consumer.X" adds a pass-through). */
int mtlz_conf_set(mtlz_conf *c, const char *key_eq_value, char *errstr,
		  size_t errstr_size);
/* Cross-key checks (e.g. confluent output needs output.schema_id). */
int mtlz_conf_validate(const mtlz_conf *c, char *errstr, size_t errstr_size);
/* Writes the effective configuration as YAML (for --check-config). */
void mtlz_conf_dump(const mtlz_conf *c, FILE *f);
void mtlz_conf_free(mtlz_conf *c);

/*
 * The default model, for mtlzd and `mtlz classify` when none is configured:
 *   1. $MTLZ_MODEL when it is set and not empty (it must then exist: a
 *      missing file is an error naming it, never a silent fallback);
 *   2. MTLZ_MODEL_INSTALLED, the installed copy of models/default.safetensors
 *      (${CMAKE_INSTALL_FULL_DATADIR}/mtlz/models/default.safetensors,
 *      compiled in), when that file exists;
 *   3. MTLZ_MODEL_SOURCE, the source tree's models/default.safetensors
 *      (compiled in), when that file exists.
 * Writes the path into path[path_size] and where it came from ("$MTLZ_MODEL",
 * "installed", "source tree") into *from. MTLZ_ERR_IO when no
 * candidate exists (the message lists the paths looked at).
 */
int mtlz_default_model(char *path, size_t path_size, const char **from,
		       char *errstr, size_t errstr_size);
/* mtlzd: model.path empty -> mtlz_default_model's path (*from as above);
 * otherwise unchanged and *from = "model.path". Call before
 * mtlz_conf_validate. */
int mtlz_conf_resolve_model(mtlz_conf *c, const char **from, char *errstr,
			    size_t errstr_size);

#endif
