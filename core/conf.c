/*
 * conf.c - mtlzd's configuration: one table of every setting, and the code
 * that loads it from YAML, overrides it from `--set key=value`, checks the
 * keys against each other and prints it back.
 *
 * The daemon calls, once, on the main thread at startup: mtlz_conf_init,
 * mtlz_conf_load (the file named by --config), mtlz_conf_set (each --set, in
 * order), mtlz_conf_validate, and for --check-config mtlz_conf_dump. After
 * that every module gets a const pointer and nothing here runs again, so
 * there are no locks.
 *
 * settings[] below is the only place a key is declared (like Redis'
 * static_configs[] in config.c): its dotted name, type, default, limits,
 * optional value check, help text and the offset of its field in mtlz_conf.
 * Loading, --set, dumping, init and free are all driven by that table; adding
 * a setting means adding a field to mtlz_conf and one row here.
 *
 * The YAML file is a mapping whose nested keys are joined with dots:
 * `batch: {max_size: 8}` and `batch.max_size: 8` both set batch.max_size.
 * kafka.consumer and kafka.producer are pass-through maps: whatever follows
 * "kafka.consumer." is a librdkafka property name taken verbatim (those
 * contain dots themselves, "fetch.wait.max.ms"), its value the scalar's text.
 * Operators' typos are errors, not warnings: unknown keys, duplicate keys,
 * wrong types and out-of-range values all stop the load with
 * "file:line:column: <dotted key> ...".
 */
#define _GNU_SOURCE
#include "conf.h"

#include "common.h"
#include "preprocess.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <yaml.h>

/* Longest dotted key accepted, pass-through property names included. */
#define CONF_KEY_MAX 256
/* Deepest mapping nesting accepted in the file. */
#define CONF_DEPTH_MAX 16

enum conf_type {
	CONF_STRING, /* char *, any text ("" allowed) */
	CONF_ENUM,   /* char *, one of values[] (matched case-insensitively,
		      * stored in the table's spelling) */
	CONF_INT,    /* int, min..max */
	CONF_INT64,  /* long long, min..max */
	CONF_KV,     /* mtlz_kv[MTLZ_CONF_MAX_PASSTHROUGH] + int count */
};

typedef struct conf_setting {
	const char *name;          /* dotted key, as in the YAML file and --set */
	enum conf_type type;
	size_t offset;             /* of the field in mtlz_conf */
	size_t count_offset;       /* CONF_KV: of the n_ field */
	const char *def_str;       /* CONF_STRING, CONF_ENUM */
	long long def_int;         /* CONF_INT, CONF_INT64 */
	long long min, max;        /* CONF_INT, CONF_INT64 */
	const char *const *values; /* CONF_ENUM: NULL-terminated */
	/* (optional) Extra check of a string value; message without the key. */
	int (*check)(const char *value, char *errstr, size_t errstr_size);
	const char *help;          /* one line; printed by mtlz_conf_dump */
} conf_setting;

#define STRING_CONF(n, field, def, chk, h) \
	{ .name = (n), .type = CONF_STRING, .offset = offsetof(mtlz_conf, field), \
	  .def_str = (def), .check = (chk), .help = (h) }
#define ENUM_CONF(n, field, def, vals, h) \
	{ .name = (n), .type = CONF_ENUM, .offset = offsetof(mtlz_conf, field), \
	  .def_str = (def), .values = (vals), .help = (h) }
#define INT_CONF(n, field, def, lo, hi, h) \
	{ .name = (n), .type = CONF_INT, .offset = offsetof(mtlz_conf, field), \
	  .def_int = (def), .min = (lo), .max = (hi), .help = (h) }
#define INT64_CONF(n, field, def, lo, hi, h) \
	{ .name = (n), .type = CONF_INT64, .offset = offsetof(mtlz_conf, field), \
	  .def_int = (def), .min = (lo), .max = (hi), .help = (h) }
#define KV_CONF(n, field, count, h) \
	{ .name = (n), .type = CONF_KV, .offset = offsetof(mtlz_conf, field), \
	  .count_offset = offsetof(mtlz_conf, count), .help = (h) }

static const char *const input_framings[] = {
	"auto", "confluent", "single_object", "container", NULL };
static const char *const output_framings[] = {
	"single_object", "confluent", "container", NULL };
static const char *const engine_kinds[] = { "cpu", "cuda", "auto", NULL };
static const char *const precisions[] = { "fp32", "tf32", NULL };
static const char *const guarantees[] = { "at_least_once", "exactly_once", NULL };
static const char *const log_levels[] = { "debug", "info", "warn", "error", NULL };
static const char *const log_timestamps[] = { "auto", "on", "off", NULL };

static int check_mask_bits(const char *value, char *errstr, size_t errstr_size)
{
	uint32_t bits;

	return mtlz_mask_bits_parse(value, &bits, errstr, errstr_size);
}

/*
 * Every setting mtlzd has. Rows sharing a first component must stay
 * together: mtlz_conf_dump prints them as one YAML section.
 */
static const conf_setting settings[] = {
	STRING_CONF("kafka.brokers", kafka_brokers, "localhost:9092", NULL,
		"bootstrap brokers, comma-separated host:port"),
	STRING_CONF("kafka.group_id", kafka_group_id, "mtlzd", NULL,
		"consumer group; instances in one group share the input partitions"),
	KV_CONF("kafka.consumer", kafka_consumer, n_kafka_consumer,
		"raw librdkafka consumer properties, passed verbatim"),
	KV_CONF("kafka.producer", kafka_producer, n_kafka_producer,
		"raw librdkafka producer properties, passed verbatim"),

	STRING_CONF("topics.input", topics_input, "spectra", NULL,
		"topic the spectra are consumed from"),
	STRING_CONF("topics.output", topics_output, "results", NULL,
		"topic the classification results are produced to"),
	STRING_CONF("topics.dead_letter", topics_dead_letter, "spectra.dlq", NULL,
		"topic unusable input messages are copied to"),

	ENUM_CONF("input.framing", input_framing, "auto", input_framings,
		"Avro framing of input messages"),
	STRING_CONF("input.schema_dir", input_schema_dir, "", NULL,
		"writer schemas for Confluent framing, <dir>/<id>.avsc; \"\" = none"),
	INT_CONF("input.max_message_bytes", input_max_message_bytes, 4194304,
		1024, 268435456, "largest input message accepted, bytes"),

	ENUM_CONF("output.framing", output_framing, "single_object", output_framings,
		"Avro framing of results"),
	INT_CONF("output.schema_id", output_schema_id, -1, -1, INT32_MAX,
		"schema registry id written with confluent output framing; -1 = unset"),

	STRING_CONF("model.path", model_path, "", NULL,
		"model weights (.safetensors); \"\" = the default model "
		"($MTLZ_MODEL, else the installed, else the source tree's "
		"models/default.safetensors)"),
	STRING_CONF("model.version", model_version, "", NULL,
		"version string carried into results; \"\" = taken from the model file"),

	ENUM_CONF("engine.kind", engine_kind, "cpu", engine_kinds,
		"inference backend; auto = the GPU when one is usable, else the CPU"),
	INT_CONF("engine.threads", engine_threads, 0, 0, 1024,
		"inference worker threads; 0 = one per online CPU"),
	INT_CONF("engine.mc_samples", engine_mc_samples, 100, 0, 10000,
		"MC-dropout passes per spectrum for the metallicity uncertainty; 0 = none"),
	INT64_CONF("engine.seed", engine_seed, 42, 0, LLONG_MAX,
		"MC-dropout seed"),
	ENUM_CONF("engine.precision", engine_precision, "fp32", precisions,
		"GEMM precision; tf32 = tensor cores (CUDA only)"),

	INT_CONF("batch.max_size", batch_max_size, 64, 1, 4096,
		"most spectra per inference micro-batch"),
	INT_CONF("batch.max_delay_ms", batch_max_delay_ms, 50, 0, 60000,
		"longest a partial micro-batch waits for more spectra, ms"),

	INT_CONF("preprocess.threads", preprocess_threads, 0, 0, 64,
		"decode and preprocessing worker threads; 0 = min(4, online CPUs)"),
	STRING_CONF("preprocess.mask_bits", preprocess_mask_bits, "", check_mask_bits,
		"and_mask bits that also make a pixel bad: a number or SPPIXMASK names; \"\" = none"),

	ENUM_CONF("delivery.guarantee", delivery_guarantee, "at_least_once", guarantees,
		"delivery guarantee (exactly_once uses Kafka transactions)"),
	STRING_CONF("delivery.transactional_id", delivery_transactional_id, "", NULL,
		"Kafka transactional.id for exactly_once; \"\" = derived by mtlzd"),

	ENUM_CONF("log.level", log_level, "info", log_levels,
		"lowest level logged"),
	ENUM_CONF("log.timestamps", log_timestamps, "auto", log_timestamps,
		"ts= (UTC) at the head of each line; auto = unless journald stamps them"),
	INT_CONF("status.interval_ms", status_interval_ms, 10000, 100, 3600000,
		"period of the status/rates log line and systemd status, ms"),
};

#define N_SETTINGS MTLZ_ARRAY_SIZE(settings)

/* librdkafka properties that dedicated settings own; a pass-through copy
 * would make it unclear which one wins. */
static const struct {
	const char *property;
	const char *setting;
} owned_properties[] = {
	{ "bootstrap.servers", "kafka.brokers" },
	{ "metadata.broker.list", "kafka.brokers" },
	{ "group.id", "kafka.group_id" },
	{ "transactional.id", "delivery.transactional_id" },
};

static char **str_field(mtlz_conf *c, const conf_setting *s)
{
	return (char **)((char *)c + s->offset);
}

static const char *str_value(const mtlz_conf *c, const conf_setting *s)
{
	const char *v = *(char *const *)((const char *)c + s->offset);

	return v ? v : "";
}

static mtlz_kv *kv_array(mtlz_conf *c, const conf_setting *s)
{
	return (mtlz_kv *)((char *)c + s->offset);
}

static int *kv_count(mtlz_conf *c, const conf_setting *s)
{
	return (int *)((char *)c + s->count_offset);
}

static const conf_setting *find_setting(const char *name)
{
	for (size_t i = 0; i < N_SETTINGS; i++)
		if (strcmp(settings[i].name, name) == 0)
			return &settings[i];
	return NULL;
}

/* The pass-through setting `key` falls under ("kafka.consumer.x.y" gives
 * kafka.consumer), or NULL. */
static const conf_setting *find_kv_prefix(const char *key)
{
	for (size_t i = 0; i < N_SETTINGS; i++) {
		size_t n = strlen(settings[i].name);

		if (settings[i].type == CONF_KV &&
		    strncmp(key, settings[i].name, n) == 0 && key[n] == '.')
			return &settings[i];
	}
	return NULL;
}

/* True when some key lies below `prefix` ("batch" for batch.max_size). */
static bool is_section(const char *prefix)
{
	size_t n = strlen(prefix);

	for (size_t i = 0; i < N_SETTINGS; i++)
		if (strncmp(settings[i].name, prefix, n) == 0 &&
		    settings[i].name[n] == '.')
			return true;
	return false;
}

static size_t edit_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b), row[CONF_KEY_MAX + 1];

	if (lb > CONF_KEY_MAX)
		return SIZE_MAX;
	for (size_t j = 0; j <= lb; j++)
		row[j] = j;
	for (size_t i = 1; i <= la; i++) {
		size_t diag = row[0];

		row[0] = i;
		for (size_t j = 1; j <= lb; j++) {
			size_t up = row[j];
			size_t best = diag + (a[i - 1] != b[j - 1]);

			best = MTLZ_MIN(best, row[j] + 1);
			best = MTLZ_MIN(best, row[j - 1] + 1);
			row[j] = best;
			diag = up;
		}
	}
	return row[lb];
}

/* " (did you mean 'batch.max_size'?)" for a near miss, else "". */
static const char *suggest(const char *key, char *buf, size_t size)
{
	const char *best = NULL;
	size_t best_d = 3; /* further than two edits is not a typo */

	for (size_t i = 0; i < N_SETTINGS; i++) {
		size_t d = edit_distance(key, settings[i].name);

		if (d < best_d) {
			best_d = d;
			best = settings[i].name;
		}
	}
	if (!best)
		return "";
	snprintf(buf, size, " (did you mean '%s'?)", best);
	return buf;
}

/* Parses a whole decimal integer; false on anything else (overflow sets
 * *overflow so the caller can report a range instead). */
static bool parse_ll(const char *s, long long *v, bool *overflow)
{
	char *end;

	*overflow = false;
	if (!(*s == '-' || *s == '+' || (*s >= '0' && *s <= '9')))
		return false;
	errno = 0;
	*v = strtoll(s, &end, 10);
	if (end == s || *end != '\0' || (end == s + 1 && (*s == '-' || *s == '+')))
		return false;
	if (errno == ERANGE)
		*overflow = true;
	return true;
}

/*
 * Sets scalar setting s (not CONF_KV) from text, all checks included. On
 * error c is unchanged and errstr says "<key> = '<value>' ..." (the caller
 * adds where the value came from).
 */
static int set_value(mtlz_conf *c, const conf_setting *s, const char *text,
		     char *errstr, size_t errstr_size)
{
	char why[256];
	char *copy;
	long long v;
	bool overflow;

	switch (s->type) {
	case CONF_STRING:
		if (s->check && s->check(text, why, sizeof(why)) != MTLZ_OK)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"%s = '%s': %s", s->name, text, why);
		copy = strdup(text);
		if (!copy)
			goto out_nomem;
		free(*str_field(c, s));
		*str_field(c, s) = copy;
		return MTLZ_OK;

	case CONF_ENUM:
		for (const char *const *a = s->values; *a; a++) {
			if (strcasecmp(text, *a) != 0)
				continue;
			copy = strdup(*a);
			if (!copy)
				goto out_nomem;
			free(*str_field(c, s));
			*str_field(c, s) = copy;
			return MTLZ_OK;
		}
		{
			char list[256] = "";
			size_t used = 0;

			for (const char *const *a = s->values; *a; a++)
				used += snprintf(list + used, sizeof(list) - used, "%s%s",
						 a == s->values ? "" : ", ", *a);
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"%s = '%s' is not one of: %s", s->name, text, list);
		}

	case CONF_INT:
	case CONF_INT64:
		if (!parse_ll(text, &v, &overflow))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"%s = '%s' is not an integer", s->name, text);
		if (overflow || v < s->min || v > s->max)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"%s = %s out of range %lld..%lld", s->name, text,
					s->min, s->max);
		if (s->type == CONF_INT)
			*(int *)((char *)c + s->offset) = (int)v;
		else
			*(long long *)((char *)c + s->offset) = v;
		return MTLZ_OK;

	case CONF_KV:
		break;
	}
	assert(!"set_value on a pass-through setting");
	return MTLZ_ERR_INVALID;

out_nomem:
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
			"%s: out of memory", s->name);
}

/*
 * Adds or replaces property `prop` of pass-through setting s. *index gets
 * the slot used (for duplicate detection while loading).
 */
static int set_kv(mtlz_conf *c, const conf_setting *s, const char *prop,
		  const char *value, int *index, char *errstr, size_t errstr_size)
{
	mtlz_kv *kv = kv_array(c, s);
	int *n = kv_count(c, s);
	char *v;
	int i;

	if (*prop == '\0')
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"%s: empty librdkafka property name", s->name);
	for (i = 0; i < *n; i++)
		if (strcmp(kv[i].key, prop) == 0)
			break;
	if (i == MTLZ_CONF_MAX_PASSTHROUGH)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"%s.%s: more than %d %s properties", s->name, prop,
				MTLZ_CONF_MAX_PASSTHROUGH, s->name);
	v = strdup(value);
	if (!v)
		goto out_nomem;
	if (i == *n) {
		kv[i].key = strdup(prop);
		if (!kv[i].key) {
			free(v);
			goto out_nomem;
		}
		(*n)++;
	} else {
		free(kv[i].value);
	}
	kv[i].value = v;
	*index = i;
	return MTLZ_OK;

out_nomem:
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
			"%s.%s: out of memory", s->name, prop);
}

void mtlz_conf_init(mtlz_conf *c)
{
	memset(c, 0, sizeof(*c));
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const conf_setting *s = &settings[i];

		switch (s->type) {
		case CONF_STRING:
		case CONF_ENUM:
			/* NULL on OOM reads as "" and validate reports it. */
			*str_field(c, s) = strdup(s->def_str);
			break;
		case CONF_INT:
			*(int *)((char *)c + s->offset) = (int)s->def_int;
			break;
		case CONF_INT64:
			*(long long *)((char *)c + s->offset) = s->def_int;
			break;
		case CONF_KV:
			break;
		}
	}
}

void mtlz_conf_free(mtlz_conf *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const conf_setting *s = &settings[i];

		if (s->type == CONF_STRING || s->type == CONF_ENUM) {
			free(*str_field(c, s));
			*str_field(c, s) = NULL;
		} else if (s->type == CONF_KV) {
			mtlz_kv *kv = kv_array(c, s);
			int *n = kv_count(c, s);

			for (int j = 0; j < *n; j++) {
				free(kv[j].key);
				free(kv[j].value);
				kv[j].key = kv[j].value = NULL;
			}
			*n = 0;
		}
	}
}

/* Deep copy of src into dst (uninitialised); on failure dst is freed. */
static int conf_copy(mtlz_conf *dst, const mtlz_conf *src)
{
	*dst = *src;
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const conf_setting *s = &settings[i];

		if (s->type == CONF_STRING || s->type == CONF_ENUM)
			*str_field(dst, s) = NULL;
		else if (s->type == CONF_KV)
			for (int j = 0; j < *kv_count(dst, s); j++)
				kv_array(dst, s)[j].key = kv_array(dst, s)[j].value = NULL;
	}
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const conf_setting *s = &settings[i];

		if (s->type == CONF_STRING || s->type == CONF_ENUM) {
			*str_field(dst, s) = strdup(str_value(src, s));
			if (!*str_field(dst, s))
				goto out_free_dst;
		} else if (s->type == CONF_KV) {
			mtlz_kv *d = kv_array(dst, s);
			const mtlz_kv *from = kv_array((mtlz_conf *)src, s);

			for (int j = 0; j < *kv_count(dst, s); j++) {
				d[j].key = strdup(from[j].key);
				d[j].value = strdup(from[j].value);
				if (!d[j].key || !d[j].value)
					goto out_free_dst;
			}
		}
	}
	return MTLZ_OK;

out_free_dst:
	/* Entries not reached yet are NULL, which free() accepts. */
	mtlz_conf_free(dst);
	return MTLZ_ERR_NOMEM;
}

/* ---- loading YAML ------------------------------------------------------ */

struct load_ctx {
	const char *file;
	yaml_document_t *doc;
	mtlz_conf *c;
	unsigned char *visited;          /* per node: reached once already */
	bool seen[N_SETTINGS];
	yaml_mark_t seen_at[N_SETTINGS];
	/* Pass-through slots set by this file, per CONF_KV setting. */
	bool kv_seen[N_SETTINGS][MTLZ_CONF_MAX_PASSTHROUGH];
	yaml_mark_t kv_seen_at[N_SETTINGS][MTLZ_CONF_MAX_PASSTHROUGH];
	char *errstr;
	size_t errstr_size;
};

/* Formats "file:line:column: message" (libyaml marks are 0-based). */
static int load_err(struct load_ctx *x, int status, yaml_mark_t m,
		    const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static int load_err(struct load_ctx *x, int status, yaml_mark_t m,
		    const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return mtlz_err(x->errstr, x->errstr_size, status, "%s:%zu:%zu: %s",
			x->file, m.line + 1, m.column + 1, msg);
}

static const char *node_kind(const yaml_node_t *n)
{
	switch (n->type) {
	case YAML_MAPPING_NODE: return "a mapping";
	case YAML_SEQUENCE_NODE: return "a sequence";
	default: return "a scalar";
	}
}

static bool is_null_scalar(const yaml_node_t *n)
{
	const char *v = (const char *)n->data.scalar.value;

	if (n->type != YAML_SCALAR_NODE ||
	    n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return false;
	return n->data.scalar.length == 0 || strcmp(v, "~") == 0 ||
	       strcmp(v, "null") == 0 || strcmp(v, "Null") == 0 ||
	       strcmp(v, "NULL") == 0;
}

/* A scalar node's text, refusing embedded NUL bytes. */
static int scalar_text(struct load_ctx *x, const yaml_node_t *n, const char *key,
		       const char **text)
{
	*text = (const char *)n->data.scalar.value;
	if (strlen(*text) != n->data.scalar.length)
		return load_err(x, MTLZ_ERR_INVALID, n->start_mark,
				"%s: value contains a NUL byte", key);
	return MTLZ_OK;
}

/* Marks node n as walked; a node reached twice came through a YAML alias,
 * which a configuration file has no use for (and which would let a small
 * file expand exponentially). */
static int visit(struct load_ctx *x, yaml_node_t *n)
{
	size_t i = (size_t)(n - x->doc->nodes.start);

	if (x->visited[i])
		return load_err(x, MTLZ_ERR_FORMAT, n->start_mark,
				"YAML aliases are not supported");
	x->visited[i] = 1;
	return MTLZ_OK;
}

static int load_kv(struct load_ctx *x, const conf_setting *s, const char *key,
		   yaml_node_t *key_node, yaml_node_t *value)
{
	const char *text;
	int idx = -1, rc;
	size_t si = (size_t)(s - settings);
	char why[512];

	if (value->type == YAML_SEQUENCE_NODE)
		return load_err(x, MTLZ_ERR_INVALID, value->start_mark,
				"%s: expected a scalar, got a sequence "
				"(librdkafka lists are comma-separated strings)", key);
	rc = scalar_text(x, value, key, &text);
	if (rc != MTLZ_OK)
		return rc;
	if (is_null_scalar(value))
		text = ""; /* as for string settings: "x:" and "x: ~" are "" */
	rc = set_kv(x->c, s, key + strlen(s->name) + 1, text, &idx, why, sizeof(why));
	if (rc != MTLZ_OK)
		return load_err(x, rc, key_node->start_mark, "%s", why);
	if (x->kv_seen[si][idx])
		return load_err(x, MTLZ_ERR_INVALID, key_node->start_mark,
				"duplicate key '%s' (first set at line %zu, column %zu)",
				key, x->kv_seen_at[si][idx].line + 1,
				x->kv_seen_at[si][idx].column + 1);
	x->kv_seen[si][idx] = true;
	x->kv_seen_at[si][idx] = key_node->start_mark;
	return MTLZ_OK;
}

/*
 * Walks mapping `map` whose keys lie below `prefix` ("" at the top). `kv` is
 * the pass-through setting when inside kafka.consumer / kafka.producer:
 * there every key is a property name, and nested mappings only join with
 * dots.
 */
static int load_mapping(struct load_ctx *x, yaml_node_t *map, const char *prefix,
			const conf_setting *kv, int depth)
{
	char key[CONF_KEY_MAX + 1], hint[CONF_KEY_MAX + 32];
	int rc;

	if (depth > CONF_DEPTH_MAX)
		return load_err(x, MTLZ_ERR_FORMAT, map->start_mark,
				"%s: mappings nested deeper than %d", prefix,
				CONF_DEPTH_MAX);
	for (yaml_node_pair_t *p = map->data.mapping.pairs.start;
	     p < map->data.mapping.pairs.top; p++) {
		yaml_node_t *k = yaml_document_get_node(x->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(x->doc, p->value);
		const conf_setting *s, *pt;
		const char *name;
		int n;

		if ((rc = visit(x, k)) != MTLZ_OK || (rc = visit(x, v)) != MTLZ_OK)
			return rc;
		if (k->type != YAML_SCALAR_NODE)
			return load_err(x, MTLZ_ERR_FORMAT, k->start_mark,
					"%s%skeys must be scalars, got %s", prefix,
					*prefix ? ": " : "", node_kind(k));
		if ((rc = scalar_text(x, k, *prefix ? prefix : "key", &name)) != MTLZ_OK)
			return rc;
		n = snprintf(key, sizeof(key), "%s%s%s", prefix, *prefix ? "." : "", name);
		if (n < 0 || (size_t)n >= sizeof(key))
			return load_err(x, MTLZ_ERR_INVALID, k->start_mark,
					"key '%.40s...' longer than %d bytes", key,
					CONF_KEY_MAX);
		/* A key repeated in one mapping, sections included: YAML forbids
		 * it and libyaml does not check. */
		for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < p; q++) {
			yaml_node_t *qk = yaml_document_get_node(x->doc, q->key);

			if (strcmp((const char *)qk->data.scalar.value, name) == 0)
				return load_err(x, MTLZ_ERR_INVALID, k->start_mark,
						"duplicate key '%s' (first set at line "
						"%zu, column %zu)", key,
						qk->start_mark.line + 1,
						qk->start_mark.column + 1);
		}

		/* Inside kafka.consumer / kafka.producer, or a flat key such as
		 * "kafka.consumer.fetch.wait.max.ms" written outside it. */
		pt = kv ? kv : find_kv_prefix(key);
		if (pt) {
			if (v->type == YAML_MAPPING_NODE)
				rc = load_mapping(x, v, key, pt, depth + 1);
			else
				rc = load_kv(x, pt, key, k, v);
			if (rc != MTLZ_OK)
				return rc;
			continue;
		}

		s = find_setting(key);
		if (s && s->type == CONF_KV) {
			if (v->type == YAML_MAPPING_NODE)
				rc = load_mapping(x, v, key, s, depth + 1);
			else if (is_null_scalar(v))
				rc = MTLZ_OK; /* every property commented out */
			else
				rc = load_err(x, MTLZ_ERR_INVALID, v->start_mark,
					      "%s: expected a mapping of librdkafka "
					      "properties, got %s", key, node_kind(v));
			if (rc != MTLZ_OK)
				return rc;
		} else if (s) {
			size_t si = (size_t)(s - settings);
			const char *text;
			char why[512];

			if (x->seen[si])
				return load_err(x, MTLZ_ERR_INVALID, k->start_mark,
						"duplicate key '%s' (first set at line "
						"%zu, column %zu)", key,
						x->seen_at[si].line + 1,
						x->seen_at[si].column + 1);
			x->seen[si] = true;
			x->seen_at[si] = k->start_mark;
			if (v->type != YAML_SCALAR_NODE)
				return load_err(x, MTLZ_ERR_INVALID, v->start_mark,
						"%s: expected a scalar, got %s", key,
						node_kind(v));
			if ((rc = scalar_text(x, v, key, &text)) != MTLZ_OK)
				return rc;
			if ((s->type == CONF_STRING) && is_null_scalar(v))
				text = "";
			rc = set_value(x->c, s, text, why, sizeof(why));
			if (rc != MTLZ_OK)
				return load_err(x, rc, v->start_mark, "%s", why);
		} else if (is_section(key)) {
			if (v->type == YAML_MAPPING_NODE)
				rc = load_mapping(x, v, key, NULL, depth + 1);
			else if (is_null_scalar(v))
				rc = MTLZ_OK; /* every key of the section commented out */
			else
				rc = load_err(x, MTLZ_ERR_INVALID, v->start_mark,
					      "%s: expected a mapping, got %s", key,
					      node_kind(v));
			if (rc != MTLZ_OK)
				return rc;
		} else {
			return load_err(x, MTLZ_ERR_INVALID, k->start_mark,
					"unknown key '%s'%s", key,
					suggest(key, hint, sizeof(hint)));
		}
	}
	return MTLZ_OK;
}

static int parse_error(const char *file, const yaml_parser_t *p, char *errstr,
		       size_t errstr_size)
{
	char ctx[256] = "";

	if (p->error == YAML_MEMORY_ERROR)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
				"%s: out of memory while parsing", file);
	if (p->error == YAML_READER_ERROR)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: byte %zu: %s", file, p->problem_offset,
				p->problem ? p->problem : "unreadable input");
	if (p->context)
		snprintf(ctx, sizeof(ctx), " (%s at line %zu, column %zu)", p->context,
			 p->context_mark.line + 1, p->context_mark.column + 1);
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			"%s:%zu:%zu: YAML syntax error: %s%s", file,
			p->problem_mark.line + 1, p->problem_mark.column + 1,
			p->problem ? p->problem : "unknown problem", ctx);
}

int mtlz_conf_load(mtlz_conf *c, const char *path, char *errstr, size_t errstr_size)
{
	yaml_parser_t parser;
	yaml_document_t doc, extra;
	yaml_node_t *root, *extra_root;
	struct load_ctx *x = NULL;
	struct stat st;
	mtlz_conf tmp;
	FILE *f;
	int rc;

	f = fopen(path, "r");
	if (!f)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path,
				strerror(errno));
	if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path,
			      strerror(EISDIR));
		goto out_close;
	}
	if (!yaml_parser_initialize(&parser)) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "%s: out of memory",
			      path);
		goto out_close;
	}
	yaml_parser_set_input_file(&parser, f);
	if (!yaml_parser_load(&parser, &doc)) {
		rc = parse_error(path, &parser, errstr, errstr_size);
		goto out_parser;
	}

	root = yaml_document_get_root_node(&doc);
	if (root) {
		/* A second document would be silently ignored otherwise. */
		if (!yaml_parser_load(&parser, &extra)) {
			rc = parse_error(path, &parser, errstr, errstr_size);
			goto out_doc;
		}
		extra_root = yaml_document_get_root_node(&extra);
		if (extra_root)
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				      "%s:%zu:%zu: more than one YAML document", path,
				      extra_root->start_mark.line + 1,
				      extra_root->start_mark.column + 1);
		yaml_document_delete(&extra);
		if (extra_root)
			goto out_doc;
	}
	if (!root || is_null_scalar(root)) {
		rc = MTLZ_OK; /* empty file: everything keeps its value */
		goto out_doc;
	}
	if (root->type != YAML_MAPPING_NODE) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			      "%s:%zu:%zu: expected a mapping of settings at the top "
			      "level, got %s", path, root->start_mark.line + 1,
			      root->start_mark.column + 1, node_kind(root));
		goto out_doc;
	}

	/* Work on a copy so that a failed load leaves c as it was. */
	x = calloc(1, sizeof(*x));
	if (!x)
		goto out_nomem;
	x->visited = calloc((size_t)(doc.nodes.top - doc.nodes.start), 1);
	if (!x->visited)
		goto out_nomem;
	if (conf_copy(&tmp, c) != MTLZ_OK)
		goto out_nomem;
	x->file = path;
	x->doc = &doc;
	x->c = &tmp;
	x->errstr = errstr;
	x->errstr_size = errstr_size;
	rc = visit(x, root);
	if (rc == MTLZ_OK)
		rc = load_mapping(x, root, "", NULL, 0);
	if (rc == MTLZ_OK) {
		mtlz_conf_free(c);
		*c = tmp;
	} else {
		mtlz_conf_free(&tmp);
	}
	goto out_free_ctx;

out_nomem:
	rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "%s: out of memory", path);
out_free_ctx:
	if (x)
		free(x->visited);
	free(x);
out_doc:
	yaml_document_delete(&doc);
out_parser:
	yaml_parser_delete(&parser);
out_close:
	fclose(f);
	return rc;
}

int mtlz_conf_set(mtlz_conf *c, const char *key_eq_value, char *errstr,
		  size_t errstr_size)
{
	const char *eq = strchr(key_eq_value, '='), *value;
	const conf_setting *s;
	char key[CONF_KEY_MAX + 1], why[512], hint[CONF_KEY_MAX + 32];
	size_t klen;
	int rc, idx;

	if (!eq)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"--set '%s': expected dotted.key=value", key_eq_value);
	klen = (size_t)(eq - key_eq_value);
	if (klen == 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"--set '%s': empty key before '='", key_eq_value);
	if (klen > CONF_KEY_MAX)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"--set: key '%.40s...' longer than %d bytes",
				key_eq_value, CONF_KEY_MAX);
	memcpy(key, key_eq_value, klen);
	key[klen] = '\0';
	value = eq + 1;

	s = find_setting(key);
	if (s && s->type == CONF_KV)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"--set %s: name one property, %s.<property>=value",
				key, key);
	if (s)
		rc = set_value(c, s, value, why, sizeof(why));
	else if ((s = find_kv_prefix(key)))
		rc = set_kv(c, s, key + strlen(s->name) + 1, value, &idx, why,
			    sizeof(why));
	else
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"--set: unknown key '%s'%s", key,
				suggest(key, hint, sizeof(hint)));
	if (rc != MTLZ_OK)
		return mtlz_err(errstr, errstr_size, rc, "--set: %s", why);
	return MTLZ_OK;
}

int mtlz_conf_validate(const mtlz_conf *c, char *errstr, size_t errstr_size)
{
	const char *in = c->topics_input, *out = c->topics_output;
	const char *dlq = c->topics_dead_letter;

	for (size_t i = 0; i < N_SETTINGS; i++) {
		const conf_setting *s = &settings[i];

		if ((s->type == CONF_STRING || s->type == CONF_ENUM) &&
		    !*(char *const *)((const char *)c + s->offset))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
					"%s: no value (out of memory in mtlz_conf_init?)",
					s->name);
	}
	if (!*c->model_path)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"model.path is empty: set it to the model's "
				".safetensors file");
	if (!*c->kafka_brokers)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"kafka.brokers is empty");
	if (!*c->kafka_group_id)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"kafka.group_id is empty");
	if (!*in || !*out || !*dlq)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"%s is empty", !*in ? "topics.input" :
				!*out ? "topics.output" : "topics.dead_letter");
	if (strcmp(in, out) == 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"topics.input and topics.output are both '%s'", in);
	if (strcmp(dlq, in) == 0 || strcmp(dlq, out) == 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"topics.dead_letter '%s' is also topics.%s", dlq,
				strcmp(dlq, in) == 0 ? "input" : "output");
	if (strcmp(c->input_framing, "confluent") == 0 && !*c->input_schema_dir)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"input.framing = confluent needs input.schema_dir "
				"(writer schemas as <dir>/<id>.avsc)");
	if (strcmp(c->output_framing, "confluent") == 0 && c->output_schema_id < 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"output.framing = confluent needs output.schema_id >= 0 "
				"(the results schema's registry id)");
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const conf_setting *s = &settings[i];
		const mtlz_kv *kv = kv_array((mtlz_conf *)c, s);

		if (s->type != CONF_KV)
			continue;
		for (int j = 0; j < *kv_count((mtlz_conf *)c, s); j++)
			for (size_t k = 0; k < MTLZ_ARRAY_SIZE(owned_properties); k++)
				if (strcmp(kv[j].key, owned_properties[k].property) == 0)
					return mtlz_err(errstr, errstr_size,
							MTLZ_ERR_INVALID,
							"%s.%s: set %s instead", s->name,
							kv[j].key,
							owned_properties[k].setting);
	}
	if (strcmp(c->engine_precision, "fp32") != 0 && strcmp(c->engine_kind, "cpu") == 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"engine.precision = %s needs engine.kind cuda or auto "
				"(the CPU engine is fp32)", c->engine_precision);
	/* delivery.transactional_id may stay "" with exactly_once: mtlzd then
	 * derives one (see etc/mtlzd.yaml). */
	return MTLZ_OK;
}

/* ---- dumping YAML ------------------------------------------------------ */

/* Writes s as a YAML double-quoted scalar. */
static void dump_quoted(FILE *f, const char *s)
{
	fputc('"', f);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\')
			fprintf(f, "\\%c", *p);
		else if (*p < 0x20 || *p == 0x7f)
			fprintf(f, "\\x%02x", *p);
		else
			fputc(*p, f);
	}
	fputc('"', f);
}

/* Number of dot-separated components of name. */
static int n_components(const char *name)
{
	int n = 1;

	for (; *name; name++)
		n += *name == '.';
	return n;
}

/* Component i of name: its start and length. */
static size_t component(const char *name, int i, const char **start)
{
	for (; i > 0; i--)
		name = strchr(name, '.') + 1;
	*start = name;
	return strcspn(name, ".");
}

void mtlz_conf_dump(const mtlz_conf *c, FILE *f)
{
	const char *prev = NULL;

	fprintf(f, "# mtlzd %s effective configuration (every key; "
		"see etc/mtlzd.yaml)\n", MTLZ_VERSION);
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const conf_setting *s = &settings[i];
		int n = n_components(s->name), common = 0, d = n - 1;
		const char *a, *b, *leaf;
		size_t la, lb, lleaf;

		/* Sections shared with the previous key stay open. */
		while (prev && common < n - 1 && common < n_components(prev) - 1) {
			la = component(s->name, common, &a);
			lb = component(prev, common, &b);
			if (la != lb || memcmp(a, b, la) != 0)
				break;
			common++;
		}
		if (common == 0)
			fputc('\n', f);
		for (int j = common; j < n - 1; j++) {
			la = component(s->name, j, &a);
			fprintf(f, "%*s%.*s:\n", 2 * j, "", (int)la, a);
		}
		lleaf = component(s->name, n - 1, &leaf);
		fprintf(f, "%*s# %s", 2 * d, "", s->help);
		if (s->type == CONF_ENUM)
			for (const char *const *val = s->values; *val; val++)
				fprintf(f, "%s%s", val == s->values ? ": " : " | ", *val);
		if (s->type == CONF_INT || s->type == CONF_INT64)
			fprintf(f, " (%lld..%lld)", s->min, s->max);
		fprintf(f, "\n%*s%.*s:", 2 * d, "", (int)lleaf, leaf);
		switch (s->type) {
		case CONF_STRING:
			fputc(' ', f);
			dump_quoted(f, str_value(c, s));
			fputc('\n', f);
			break;
		case CONF_ENUM:
			fprintf(f, " %s\n", str_value(c, s));
			break;
		case CONF_INT:
			fprintf(f, " %d\n", *(const int *)((const char *)c + s->offset));
			break;
		case CONF_INT64:
			fprintf(f, " %lld\n",
				*(const long long *)((const char *)c + s->offset));
			break;
		case CONF_KV: {
			const mtlz_kv *kv = kv_array((mtlz_conf *)c, s);
			int nkv = *kv_count((mtlz_conf *)c, s);

			fputs(nkv ? "\n" : " {}\n", f);
			for (int j = 0; j < nkv; j++) {
				fprintf(f, "%*s", 2 * (d + 1), "");
				dump_quoted(f, kv[j].key);
				fputs(": ", f);
				dump_quoted(f, kv[j].value);
				fputc('\n', f);
			}
			break;
		}
		}
		prev = s->name;
	}
}

/* ---- the default model ------------------------------------------------ */

#ifndef MTLZ_MODEL_INSTALLED
#define MTLZ_MODEL_INSTALLED "/usr/local/share/mtlz/models/default.safetensors"
#endif
#ifndef MTLZ_MODEL_SOURCE
#define MTLZ_MODEL_SOURCE "models/default.safetensors"
#endif

static bool is_file(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int mtlz_default_model(char *path, size_t path_size, const char **from,
		       char *errstr, size_t errstr_size)
{
	static const struct {
		const char *path, *from;
	} builtin[] = {
		{ MTLZ_MODEL_INSTALLED, "installed" },
		{ MTLZ_MODEL_SOURCE, "source tree" },
	};
	const char *env = getenv("MTLZ_MODEL");
	struct stat st;

	if (env && *env) {
		if (stat(env, &st))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
					"MTLZ_MODEL=%s: %s", env, strerror(errno));
		if (!S_ISREG(st.st_mode))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
					"MTLZ_MODEL=%s: not a regular file", env);
		if (strlen(env) >= path_size)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"MTLZ_MODEL=%s: path too long", env);
		snprintf(path, path_size, "%s", env);
		*from = "$MTLZ_MODEL";
		return MTLZ_OK;
	}
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(builtin); i++)
		if (is_file(builtin[i].path) && strlen(builtin[i].path) < path_size) {
			snprintf(path, path_size, "%s", builtin[i].path);
			*from = builtin[i].from;
			return MTLZ_OK;
		}
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
			"no model given and no default model: MTLZ_MODEL is not set, "
			"and neither %s (installed) nor %s (source tree) exists",
			MTLZ_MODEL_INSTALLED, MTLZ_MODEL_SOURCE);
}

int mtlz_conf_resolve_model(mtlz_conf *c, const char **from, char *errstr,
			    size_t errstr_size)
{
	char path[4096], *copy;
	int rc;

	if (c->model_path && *c->model_path) {
		*from = "model.path";
		return MTLZ_OK;
	}
	rc = mtlz_default_model(path, sizeof(path), from, errstr, errstr_size);
	if (rc != MTLZ_OK)
		return rc;
	copy = strdup(path);
	if (!copy)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	free(c->model_path);
	c->model_path = copy;
	return MTLZ_OK;
}
