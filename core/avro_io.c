/*
 * avro_io.c - Avro encoding and decoding of the daemon's messages (see
 * avro_io.h). The consume thread turns each Kafka payload into a
 * mtlz_spectrum here; the infer thread turns each classification into a
 * Result message here.
 *
 * Decoding a spectrum goes:
 *   framing (Confluent id / single-object fingerprint / container header)
 *   -> writer schema, looked up in a small per-mtlz_avro cache
 *   -> datum bytes, then either
 *      (a) the fast path, when the writer schema has the same Parsing
 *          Canonical Form as our spectrum.avsc (the usual case): a direct,
 *          bounds-checked decoder straight into the mtlz_spectrum arrays;
 *      (b) otherwise Avro C: the bytes are first checked against the
 *          writer schema by walk_datum() (Avro C allocates whatever length
 *          a string or array header claims, so hostile bytes must never
 *          reach it unchecked), then read through a resolved writer
 *          (avro_resolved_writer_new) into a generic value of our schema,
 *          from which the fields are copied by name.
 * Avro C 1.11 does not apply reader defaults, so for (b) the reader
 * schema is ours minus the top-level fields that the writer lacks and that
 * have a "default" (all of ours that do default to null / {} / []), and
 * the extraction treats a missing field as its default.
 *
 * Avro C 1.11 has no Parsing Canonical Form or fingerprint, so both are
 * implemented here on the jansson parse of the schema text.
 *
 * Every cache entry (writer schema, reader schema, resolved interface,
 * values) lives until mtlz_avro_free() or until it is the least recently
 * used of MTLZ_AVRO_MAX_CACHE entries; nothing is allocated per message
 * except the spectrum's own arrays (which the caller owns).
 */
#define _POSIX_C_SOURCE 200809L
#include "avro_io.h"
#include "common.h"
#include "preprocess.h"

#include <avro.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define MTLZ_AVRO_MAX_PIXELS 1000000u
#define MTLZ_AVRO_MAX_CACHE 64
#define MTLZ_AVRO_MAX_DEPTH 64             /* schema nesting, JSON and binary walks */
#define MTLZ_AVRO_MAX_SCHEMA_BYTES (1u << 20)
#define MTLZ_AVRO_RESCAN_S 5.0             /* registry rescan on an unknown fingerprint */
#define MTLZ_AVRO_WALK_ITEMS 1000000u      /* items of zero-byte types a datum may hold */

/* ------------------------------------------------------------------ */
/* CRC-64-AVRO and Parsing Canonical Form                              */

#define CRC64_AVRO_EMPTY 0xc15d213aa4d7a795ULL

static uint64_t crc64_table[256];
static pthread_once_t crc64_once = PTHREAD_ONCE_INIT;

static void crc64_init(void)
{
	for (int i = 0; i < 256; i++) {
		uint64_t fp = (uint64_t)i;

		for (int j = 0; j < 8; j++)
			fp = (fp >> 1) ^ (CRC64_AVRO_EMPTY & -(fp & 1));
		crc64_table[i] = fp;
	}
}

uint64_t mtlz_avro_crc64(const void *buf, size_t len)
{
	const uint8_t *p = buf;
	uint64_t fp = CRC64_AVRO_EMPTY;

	pthread_once(&crc64_once, crc64_init);
	for (size_t i = 0; i < len; i++)
		fp = (fp >> 8) ^ crc64_table[(fp ^ p[i]) & 0xff];
	return fp;
}

/* Growable string; `oom` latches the first allocation failure. */
struct sbuf {
	char *p;
	size_t len, cap;
	int oom;
};

static void sb_putn(struct sbuf *b, const char *s, size_t n)
{
	if (b->oom)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		char *p;

		while (cap < b->len + n + 1)
			cap *= 2;
		p = realloc(b->p, cap);
		if (!p) {
			b->oom = 1;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void sb_puts(struct sbuf *b, const char *s)
{
	sb_putn(b, s, strlen(s));
}

/* A JSON string literal: UTF-8 as is, only '"', '\' and controls escaped. */
static void sb_qstr(struct sbuf *b, const char *s)
{
	sb_putn(b, "\"", 1);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		char esc[8];

		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			sb_putn(b, esc, 2);
		} else if (c < 0x20) {
			snprintf(esc, sizeof(esc), "\\u%04x", c);
			sb_putn(b, esc, 6);
		} else {
			sb_putn(b, (const char *)&c, 1);
		}
	}
	sb_putn(b, "\"", 1);
}

static int is_primitive(const char *t)
{
	static const char *const p[] = { "null", "boolean", "int", "long",
					 "float", "double", "bytes", "string" };

	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(p); i++)
		if (strcmp(t, p[i]) == 0)
			return 1;
	return 0;
}

struct pcf {
	struct sbuf out;
	json_t *seen;     /* object used as a set of defined full names */
	char err[256];
};

static void full_name(const char *name, const char *ns, char *out, size_t size)
{
	if (strchr(name, '.') || !ns || !*ns)
		snprintf(out, size, "%s", name);
	else
		snprintf(out, size, "%s.%s", ns, name);
}

static int pcf_emit(struct pcf *c, json_t *j, const char *ns, int depth);

static int pcf_named(struct pcf *c, json_t *j, const char *t, const char *ns, int depth)
{
	json_t *jn = json_object_get(j, "name"), *jns = json_object_get(j, "namespace");
	char full[512], inner_ns[512];
	const char *dot;

	if (!json_is_string(jn)) {
		snprintf(c->err, sizeof(c->err), "a %s has no name", t);
		return -1;
	}
	if (strchr(json_string_value(jn), '.'))
		full_name(json_string_value(jn), NULL, full, sizeof(full));
	else if (json_is_string(jns))
		full_name(json_string_value(jn), json_string_value(jns), full, sizeof(full));
	else
		full_name(json_string_value(jn), ns, full, sizeof(full));
	dot = strrchr(full, '.');
	snprintf(inner_ns, sizeof(inner_ns), "%.*s", dot ? (int)(dot - full) : 0, full);

	/* Invalid Avro, and Avro C 1.11 leaks the record when it parses one. */
	if (json_object_get(c->seen, full)) {
		snprintf(c->err, sizeof(c->err), "named type %.200s defined twice", full);
		return -1;
	}
	if (json_object_set_new(c->seen, full, json_true())) {
		c->out.oom = 1;
		return -1;
	}
	sb_puts(&c->out, "{\"name\":");
	sb_qstr(&c->out, full);
	if (strcmp(t, "enum") == 0) {
		json_t *sym = json_object_get(j, "symbols"), *v;
		size_t i;

		if (!json_is_array(sym)) {
			snprintf(c->err, sizeof(c->err), "enum %.200s has no symbols", full);
			return -1;
		}
		sb_puts(&c->out, ",\"type\":\"enum\",\"symbols\":[");
		json_array_foreach(sym, i, v) {
			if (!json_is_string(v)) {
				snprintf(c->err, sizeof(c->err), "enum %.200s: symbol is not a string", full);
				return -1;
			}
			if (i)
				sb_puts(&c->out, ",");
			sb_qstr(&c->out, json_string_value(v));
		}
		sb_puts(&c->out, "]}");
	} else if (strcmp(t, "fixed") == 0) {
		json_t *sz = json_object_get(j, "size");
		char num[32];

		if (!json_is_integer(sz) || json_integer_value(sz) < 0) {
			snprintf(c->err, sizeof(c->err), "fixed %.200s has no valid size", full);
			return -1;
		}
		snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(sz));
		sb_puts(&c->out, ",\"type\":\"fixed\",\"size\":");
		sb_puts(&c->out, num);
		sb_puts(&c->out, "}");
	} else { /* record or error */
		json_t *fields = json_object_get(j, "fields"), *f;
		size_t i;

		if (!json_is_array(fields)) {
			snprintf(c->err, sizeof(c->err), "record %.200s has no fields", full);
			return -1;
		}
		sb_puts(&c->out, ",\"type\":\"record\",\"fields\":[");
		json_array_foreach(fields, i, f) {
			json_t *fn = json_object_get(f, "name");

			if (!json_is_string(fn) || !json_object_get(f, "type")) {
				snprintf(c->err, sizeof(c->err), "record %.200s: field %zu has no name or type",
					 full, i);
				return -1;
			}
			sb_puts(&c->out, i ? ",{\"name\":" : "{\"name\":");
			sb_qstr(&c->out, json_string_value(fn));
			sb_puts(&c->out, ",\"type\":");
			if (pcf_emit(c, json_object_get(f, "type"), inner_ns, depth + 1))
				return -1;
			sb_puts(&c->out, "}");
		}
		sb_puts(&c->out, "]}");
	}
	return 0;
}

/* Appends the Parsing Canonical Form of schema `j` (enclosing namespace
 * `ns`) to c->out: [PRIMITIVES] [FULLNAMES] [STRIP] [ORDER] [STRINGS]
 * [INTEGERS] [WHITESPACE] of the Avro specification. */
static int pcf_emit(struct pcf *c, json_t *j, const char *ns, int depth)
{
	const char *t;

	if (depth > MTLZ_AVRO_MAX_DEPTH) {
		snprintf(c->err, sizeof(c->err), "schema nested deeper than %d", MTLZ_AVRO_MAX_DEPTH);
		return -1;
	}
	if (json_is_string(j)) {
		char full[512];

		t = json_string_value(j);
		if (is_primitive(t)) {
			sb_qstr(&c->out, t);
		} else {
			full_name(t, ns, full, sizeof(full));
			sb_qstr(&c->out, full);
		}
		return 0;
	}
	if (json_is_array(j)) {
		json_t *v;
		size_t i;

		sb_puts(&c->out, "[");
		json_array_foreach(j, i, v) {
			if (i)
				sb_puts(&c->out, ",");
			if (pcf_emit(c, v, ns, depth + 1))
				return -1;
		}
		sb_puts(&c->out, "]");
		return 0;
	}
	if (!json_is_object(j) || !json_object_get(j, "type")) {
		snprintf(c->err, sizeof(c->err), "a schema must be a string, an array or an object with \"type\"");
		return -1;
	}
	if (!json_is_string(json_object_get(j, "type")))
		return pcf_emit(c, json_object_get(j, "type"), ns, depth + 1);
	t = json_string_value(json_object_get(j, "type"));
	if (is_primitive(t)) {
		sb_qstr(&c->out, t);   /* drops logicalType and every other attribute */
		return 0;
	}
	if (strcmp(t, "array") == 0 || strcmp(t, "map") == 0) {
		const char *key = t[0] == 'a' ? "items" : "values";
		json_t *sub = json_object_get(j, key);

		if (!sub) {
			snprintf(c->err, sizeof(c->err), "%s without \"%s\"", t, key);
			return -1;
		}
		sb_puts(&c->out, t[0] == 'a' ? "{\"type\":\"array\",\"items\":"
					     : "{\"type\":\"map\",\"values\":");
		if (pcf_emit(c, sub, ns, depth + 1))
			return -1;
		sb_puts(&c->out, "}");
		return 0;
	}
	if (strcmp(t, "record") == 0 || strcmp(t, "error") == 0 ||
	    strcmp(t, "enum") == 0 || strcmp(t, "fixed") == 0)
		return pcf_named(c, j, t, ns, depth);
	/* {"type": "some.Name"}: a reference to a named type. */
	return pcf_emit(c, json_object_get(j, "type"), ns, depth + 1);
}

static int pcf_of_json(json_t *root, char **out, char *errstr, size_t errstr_size)
{
	struct pcf c;
	int rc = MTLZ_OK;

	memset(&c, 0, sizeof(c));
	c.seen = json_object();
	if (!c.seen)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	if (pcf_emit(&c, root, "", 0)) {
		rc = c.out.oom ? mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory")
			       : mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					  "not an Avro schema: %s", c.err);
	} else if (c.out.oom) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	}
	json_decref(c.seen);
	if (rc) {
		free(c.out.p);
		return rc;
	}
	*out = c.out.p;
	return MTLZ_OK;
}

int mtlz_avro_canonical_form(const char *json, size_t len, char **out,
			     char *errstr, size_t errstr_size)
{
	json_error_t jerr;
	json_t *root;
	int rc;

	*out = NULL;
	root = json_loadb(json, len, JSON_DECODE_ANY, &jerr);
	if (!root)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"schema is not JSON: line %d: %s", jerr.line, jerr.text);
	rc = pcf_of_json(root, out, errstr, errstr_size);
	json_decref(root);
	return rc;
}

static int fingerprint_json(json_t *root, uint64_t *fp, char *errstr, size_t errstr_size)
{
	char *pcf;
	int rc = pcf_of_json(root, &pcf, errstr, errstr_size);

	if (rc)
		return rc;
	*fp = mtlz_avro_crc64(pcf, strlen(pcf));
	free(pcf);
	return MTLZ_OK;
}

int mtlz_avro_fingerprint(const char *json, size_t len, uint64_t *fp,
			  char *errstr, size_t errstr_size)
{
	char *pcf;
	int rc = mtlz_avro_canonical_form(json, len, &pcf, errstr, errstr_size);

	if (rc)
		return rc;
	*fp = mtlz_avro_crc64(pcf, strlen(pcf));
	free(pcf);
	return MTLZ_OK;
}

/* ------------------------------------------------------------------ */
/* Binary cursor and the datum walk                                    */

struct cur {
	const uint8_t *p, *end;
};

static size_t cur_left(const struct cur *c)
{
	return (size_t)(c->end - c->p);
}

/* Zig-zag varint, at most 10 bytes. */
static int cur_long(struct cur *c, int64_t *out)
{
	uint64_t v = 0;

	for (int shift = 0; shift < 64; shift += 7) {
		uint8_t b;

		if (c->p >= c->end)
			return -1;
		b = *c->p++;
		v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80)) {
			*out = (int64_t)((v >> 1) ^ (0 - (v & 1)));
			return 0;
		}
	}
	return -1;
}

static int cur_int(struct cur *c, int32_t *out)
{
	int64_t v;

	if (cur_long(c, &v) || v < INT32_MIN || v > INT32_MAX)
		return -1;
	*out = (int32_t)v;
	return 0;
}

static uint32_t ld_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
	       (uint32_t)p[3] << 24;
}

static uint64_t ld_le64(const uint8_t *p)
{
	return (uint64_t)ld_le32(p) | (uint64_t)ld_le32(p + 4) << 32;
}

static int cur_double(struct cur *c, double *out)
{
	uint64_t u;

	if (cur_left(c) < 8)
		return -1;
	u = ld_le64(c->p);
	memcpy(out, &u, sizeof(*out));
	c->p += 8;
	return 0;
}

/* A string or bytes: length-checked pointer into the message. */
static int cur_bytes(struct cur *c, const uint8_t **p, size_t *len)
{
	int64_t n;

	if (cur_long(c, &n) || n < 0 || (uint64_t)n > cur_left(c))
		return -1;
	*p = c->p;
	*len = (size_t)n;
	c->p += n;
	return 0;
}

/* Next array/map block: item count (0 at the end). A negative count is
 * followed by the block's byte size, which we do not need. */
static int cur_block(struct cur *c, uint64_t *count)
{
	int64_t n, size;

	if (cur_long(c, &n))
		return -1;
	if (n < 0) {
		if (n == INT64_MIN || cur_long(c, &size) || size < 0)
			return -1;
		n = -n;
	}
	*count = (uint64_t)n;
	return 0;
}

struct walk {
	size_t items_left;   /* array/map items left: datum bytes + MTLZ_AVRO_WALK_ITEMS */
	char err[128];
};

/* Checks that the bytes at c hold one datum of schema s, advancing c past
 * it; every length and count is checked against the bytes left, so that
 * Avro C can then read the same bytes without a giant allocation. */
static int walk_datum(avro_schema_t s, struct cur *c, struct walk *w, int depth)
{
	int64_t l;
	int32_t i32;
	const uint8_t *p;
	size_t n;

	if (depth > MTLZ_AVRO_MAX_DEPTH) {
		snprintf(w->err, sizeof(w->err), "schema nested deeper than %d", MTLZ_AVRO_MAX_DEPTH);
		return -1;
	}
	switch (avro_typeof(s)) {
	case AVRO_STRING:
	case AVRO_BYTES:
		if (cur_bytes(c, &p, &n))
			goto out_trunc;
		return 0;
	case AVRO_INT32:
		if (cur_int(c, &i32))
			goto out_trunc;
		return 0;
	case AVRO_INT64:
		if (cur_long(c, &l))
			goto out_trunc;
		return 0;
	case AVRO_FLOAT:
	case AVRO_DOUBLE:
	case AVRO_BOOLEAN:
		n = avro_typeof(s) == AVRO_FLOAT ? 4 : avro_typeof(s) == AVRO_DOUBLE ? 8 : 1;
		if (cur_left(c) < n)
			goto out_trunc;
		c->p += n;
		return 0;
	case AVRO_NULL:
		return 0;
	case AVRO_RECORD:
		for (size_t i = 0; i < avro_schema_record_size(s); i++)
			if (walk_datum(avro_schema_record_field_get_by_index(s, (int)i), c, w,
				       depth + 1))
				return -1;
		return 0;
	case AVRO_ENUM:
		if (cur_long(c, &l))
			goto out_trunc;
		if (l < 0 || l >= avro_schema_enum_number_of_symbols(s)) {
			snprintf(w->err, sizeof(w->err), "enum %s index %" PRId64 " out of range",
				 avro_schema_name(s), l);
			return -1;
		}
		return 0;
	case AVRO_FIXED:
		if (avro_schema_fixed_size(s) < 0 ||
		    (uint64_t)avro_schema_fixed_size(s) > cur_left(c))
			goto out_trunc;
		c->p += avro_schema_fixed_size(s);
		return 0;
	case AVRO_MAP:
	case AVRO_ARRAY: {
		avro_schema_t item = avro_typeof(s) == AVRO_MAP ? avro_schema_map_values(s)
							       : avro_schema_array_items(s);
		for (;;) {
			uint64_t count;

			if (cur_block(c, &count))
				goto out_trunc;
			if (count == 0)
				return 0;
			/* Bounds the work on arrays of zero-byte items too. */
			if (count > w->items_left) {
				snprintf(w->err, sizeof(w->err), "block of %" PRIu64 " items in %zu bytes",
					 count, cur_left(c));
				return -1;
			}
			w->items_left -= count;
			for (uint64_t k = 0; k < count; k++) {
				if (avro_typeof(s) == AVRO_MAP && cur_bytes(c, &p, &n))
					goto out_trunc;
				if (walk_datum(item, c, w, depth + 1))
					return -1;
			}
		}
	}
	case AVRO_UNION:
		if (cur_long(c, &l))
			goto out_trunc;
		if (l < 0 || (uint64_t)l >= avro_schema_union_size(s)) {
			snprintf(w->err, sizeof(w->err), "union branch %" PRId64 " out of range", l);
			return -1;
		}
		return walk_datum(avro_schema_union_branch(s, (int)l), c, w, depth + 1);
	case AVRO_LINK:
		return walk_datum(avro_schema_link_target(s), c, w, depth + 1);
	}
	snprintf(w->err, sizeof(w->err), "unknown schema type %d", (int)avro_typeof(s));
	return -1;

out_trunc:
	snprintf(w->err, sizeof(w->err), "truncated or malformed %s %zu bytes before the end",
		 avro_schema_type_name(s), cur_left(c));
	return -1;
}

/* ------------------------------------------------------------------ */
/* Our schemas, the registry, the writer-schema cache                  */

enum { TARGET_SPECTRUM = 0, TARGET_RESULT = 1, TARGET_LABELLED = 2, N_TARGETS = 3 };
enum { KEY_FP = 0, KEY_ID = 1, KEY_TEXT = 2 };

/* One of our own schemas (spectrum.avsc, result.avsc, labelled_spectrum.avsc). */
struct ours {
	const char *what;           /* "spectrum.avsc" */
	json_t *json;
	char *text;                 /* compact JSON, written into container headers */
	size_t text_len;
	uint64_t fp;
	avro_schema_t schema;
	avro_value_iface_t *iface;
	avro_value_t value;         /* reused by the encoder */
	int has_value;
	uint8_t *hdr;               /* container file header incl. sync marker */
	size_t hdr_len;
	uint8_t sync[16];
};

/* A writer schema seen in messages, resolved against one of ours. */
struct wschema {
	int target, key_kind;
	uint64_t key;
	char *text;                 /* KEY_TEXT: exact schema text of the container */
	size_t text_len;
	int status;                 /* MTLZ_DECODE_OK, or MTLZ_DECODE_SCHEMA (cached failure) */
	char err[512];
	int direct;                 /* same canonical form as ours */
	avro_schema_t writer, reader;
	avro_value_iface_t *reader_iface, *resolved_iface;
	avro_value_t reader_value, resolved_value;
	int has_reader_value, has_resolved_value;
	uint64_t last_use;
};

struct known_schema {
	uint64_t fp;
	char *path;
};

struct mtlz_avro {
	struct ours ours[N_TARGETS];
	char *registry_dir;
	struct known_schema *known;
	size_t n_known;
	double known_scan_s;
	struct wschema *cache[MTLZ_AVRO_MAX_CACHE];
	size_t n_cache;
	uint64_t use_clock;
	avro_reader_t reader;
	avro_writer_t writer;
	uint8_t *out;               /* encode_result's buffer */
	size_t out_cap;
	size_t max_message_bytes;   /* 0 = no limit */
	int fast_path;
};

static int read_file(const char *path, char **buf, size_t *len, char *errstr,
		     size_t errstr_size)
{
	FILE *f = fopen(path, "rb");
	struct stat st;
	char *p;

	if (!f)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path, strerror(errno));
	if (fstat(fileno(f), &st) || !S_ISREG(st.st_mode) ||
	    (uint64_t)st.st_size > MTLZ_AVRO_MAX_SCHEMA_BYTES) {
		fclose(f);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
				"%s: not a regular file of at most %u bytes", path,
				MTLZ_AVRO_MAX_SCHEMA_BYTES);
	}
	p = malloc((size_t)st.st_size + 1);
	if (!p) {
		fclose(f);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	}
	*len = fread(p, 1, (size_t)st.st_size, f);
	if (ferror(f)) {
		free(p);
		fclose(f);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: read error", path);
	}
	fclose(f);
	p[*len] = '\0';
	*buf = p;
	return MTLZ_OK;
}

static size_t put_long(uint8_t *p, int64_t v)
{
	uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
	size_t n = 0;

	while (z > 0x7f) {
		p[n++] = (uint8_t)(z | 0x80);
		z >>= 7;
	}
	p[n++] = (uint8_t)z;
	return n;
}

static size_t put_bytes(uint8_t *p, const void *s, size_t len)
{
	size_t n = put_long(p, (int64_t)len);

	memcpy(p + n, s, len);
	return n + len;
}

static int ours_load(struct ours *o, const char *dir, const char *file,
		     char *errstr, size_t errstr_size)
{
	char path[4096], *raw = NULL;
	size_t len, n;
	json_error_t jerr;
	int rc;

	o->what = file;
	snprintf(path, sizeof(path), "%s/%s", dir, file);
	rc = read_file(path, &raw, &len, errstr, errstr_size);
	if (rc)
		return rc;
	o->json = json_loadb(raw, len, JSON_DECODE_ANY, &jerr);
	free(raw);
	if (!o->json)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s: line %d: %s", path,
				jerr.line, jerr.text);
	rc = fingerprint_json(o->json, &o->fp, errstr, errstr_size);
	if (rc)
		return rc;
	o->text = json_dumps(o->json, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
	if (!o->text)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	o->text_len = strlen(o->text);
	if (avro_schema_from_json_length(o->text, o->text_len, &o->schema)) {
		o->schema = NULL;
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s: %s", path,
				avro_strerror());
	}
	if (!is_avro_record(o->schema))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s: not a record", path);
	o->iface = avro_generic_class_from_schema(o->schema);
	if (!o->iface || avro_generic_value_new(o->iface, &o->value))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "%s: %s", path,
				avro_strerror());
	o->has_value = 1;

	/* Container header: magic, {avro.schema, avro.codec}, sync marker. */
	for (int i = 0; i < 8; i++) {
		o->sync[i] = (uint8_t)(o->fp >> (8 * i));
		o->sync[8 + i] = (uint8_t)(~o->fp >> (8 * i));
	}
	o->hdr = malloc(4 + 10 + 2 * 32 + 10 + o->text_len + 16 + 10 + 16);
	if (!o->hdr)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	memcpy(o->hdr, "Obj\x01", 4);
	n = 4;
	n += put_long(o->hdr + n, 2);
	n += put_bytes(o->hdr + n, "avro.schema", 11);
	n += put_bytes(o->hdr + n, o->text, o->text_len);
	n += put_bytes(o->hdr + n, "avro.codec", 10);
	n += put_bytes(o->hdr + n, "null", 4);
	n += put_long(o->hdr + n, 0);
	memcpy(o->hdr + n, o->sync, 16);
	o->hdr_len = n + 16;
	return MTLZ_OK;
}

static void ours_free(struct ours *o)
{
	if (o->has_value)
		avro_value_decref(&o->value);
	if (o->iface)
		avro_value_iface_decref(o->iface);
	if (o->schema)
		avro_schema_decref(o->schema);
	json_decref(o->json);
	free(o->text);
	free(o->hdr);
}

static void known_free(mtlz_avro *a)
{
	for (size_t i = 0; i < a->n_known; i++)
		free(a->known[i].path);
	free(a->known);
	a->known = NULL;
	a->n_known = 0;
}

/* Fingerprints every .avsc file in the registry dir (single-object framing).
 * Files that do not parse are skipped: a registry may hold other things. */
static int registry_scan(mtlz_avro *a, char *errstr, size_t errstr_size)
{
	DIR *d;
	struct dirent *de;
	size_t cap = 0;

	known_free(a);
	a->known_scan_s = mtlz_now();
	if (!a->registry_dir)
		return MTLZ_OK;
	d = opendir(a->registry_dir);
	if (!d)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "schema registry dir %s: %s",
				a->registry_dir, strerror(errno));
	while ((de = readdir(d))) {
		size_t nl = strlen(de->d_name), len;
		char path[4096], *raw;
		uint64_t fp;

		if (nl < 6 || strcmp(de->d_name + nl - 5, ".avsc") != 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", a->registry_dir, de->d_name);
		if (read_file(path, &raw, &len, NULL, 0))
			continue;
		if (mtlz_avro_fingerprint(raw, len, &fp, NULL, 0)) {
			free(raw);
			continue;
		}
		free(raw);
		if (a->n_known == cap) {
			struct known_schema *k = realloc(a->known, (cap ? 2 * cap : 16) * sizeof(*k));

			if (!k)
				break;
			a->known = k;
			cap = cap ? 2 * cap : 16;
		}
		a->known[a->n_known].fp = fp;
		a->known[a->n_known].path = strdup(path);
		if (a->known[a->n_known].path)
			a->n_known++;
	}
	closedir(d);
	return MTLZ_OK;
}

static void wschema_free(struct wschema *e)
{
	if (!e)
		return;
	if (e->has_resolved_value)
		avro_value_decref(&e->resolved_value);
	if (e->resolved_iface)
		avro_value_iface_decref(e->resolved_iface);
	if (e->has_reader_value)
		avro_value_decref(&e->reader_value);
	if (e->reader_iface)
		avro_value_iface_decref(e->reader_iface);
	if (e->reader)
		avro_schema_decref(e->reader);
	if (e->writer)
		avro_schema_decref(e->writer);
	free(e->text);
	free(e);
}

/* Our schema minus the top-level fields that have a default and that the
 * writer lacks (Avro C 1.11 does not fill defaults); NULL on failure. */
static avro_schema_t effective_reader(const struct ours *o, avro_schema_t writer)
{
	json_t *copy, *fields;
	avro_schema_t r = NULL;
	int removed = 0;
	char *txt;

	if (!is_avro_record(writer))
		return avro_schema_incref(o->schema);
	copy = json_deep_copy(o->json);
	fields = json_object_get(copy, "fields");
	for (size_t i = 0; i < json_array_size(fields);) {
		json_t *f = json_array_get(fields, i);
		const char *name = json_string_value(json_object_get(f, "name"));

		if (name && json_object_get(f, "default") &&
		    avro_schema_record_field_get_index(writer, name) < 0) {
			json_array_remove(fields, i);
			removed = 1;
			continue;
		}
		i++;
	}
	if (!removed) {
		json_decref(copy);
		return avro_schema_incref(o->schema);
	}
	txt = json_dumps(copy, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(copy);
	if (txt && avro_schema_from_json_length(txt, strlen(txt), &r))
		r = NULL;
	free(txt);
	return r;
}

static const char *simple_name(avro_schema_t s)
{
	const char *n = avro_schema_name(s), *dot;

	if (!n)
		return "";
	dot = strrchr(n, '.');
	return dot ? dot + 1 : n;
}

static int named_same(avro_schema_t w, avro_schema_t r)
{
	return strcmp(simple_name(w), simple_name(r)) == 0;
}

/* 1 when writer w resolves to reader r under the rules Avro C 1.11
 * implements (promotions int->long->float->double, no reader defaults, no
 * string<->bytes), made stricter where Avro C is unsafe or lax:
 *   - every branch of a writer union must resolve (Avro C defers that to
 *     read time);
 *   - writer enum symbols must equal the reader's first symbols in order
 *     (Avro C maps enums by index);
 *   - when a reader union's branch of the same kind precedes the matching
 *     one and does not resolve, or an array/map's items do not resolve,
 *     we refuse before Avro C sees it: avro_resolved_writer_new() crashes
 *     on those failure paths (1.11.1, arrays and maps).
 * On 0, a reason is in why. */
static int compat(avro_schema_t w, avro_schema_t r, int depth, char *why, size_t why_size)
{
	avro_type_t wt, rt;

	if (depth > MTLZ_AVRO_MAX_DEPTH) {
		snprintf(why, why_size, "schemas nested deeper than %d", MTLZ_AVRO_MAX_DEPTH);
		return 0;
	}
	while (is_avro_link(w))
		w = avro_schema_link_target(w);
	while (is_avro_link(r))
		r = avro_schema_link_target(r);
	wt = avro_typeof(w);
	rt = avro_typeof(r);
	if (wt == AVRO_UNION) {
		for (size_t i = 0; i < avro_schema_union_size(w); i++)
			if (!compat(avro_schema_union_branch(w, (int)i), r, depth + 1, why, why_size))
				return 0;
		return 1;
	}
	if (rt == AVRO_UNION) {
		for (size_t i = 0; i < avro_schema_union_size(r); i++) {
			avro_schema_t b = avro_schema_union_branch(r, (int)i);
			avro_type_t bt;

			while (is_avro_link(b))
				b = avro_schema_link_target(b);
			bt = avro_typeof(b);
			if (compat(w, b, depth + 1, why, why_size))
				return 1;
			if (bt == wt && (!is_avro_named_type(b) || named_same(w, b)))
				return 0;   /* Avro C would try it and might crash */
		}
		snprintf(why, why_size, "no branch of a reader union takes a writer %s",
			 avro_schema_type_name(w));
		return 0;
	}
	switch (wt) {
	case AVRO_INT32:
		if (rt == AVRO_INT32 || rt == AVRO_INT64 || rt == AVRO_FLOAT || rt == AVRO_DOUBLE)
			return 1;
		break;
	case AVRO_INT64:
		if (rt == AVRO_INT64 || rt == AVRO_FLOAT || rt == AVRO_DOUBLE)
			return 1;
		break;
	case AVRO_FLOAT:
		if (rt == AVRO_FLOAT || rt == AVRO_DOUBLE)
			return 1;
		break;
	case AVRO_STRING:
	case AVRO_BYTES:
	case AVRO_DOUBLE:
	case AVRO_BOOLEAN:
	case AVRO_NULL:
		if (rt == wt)
			return 1;
		break;
	case AVRO_ARRAY:
		if (rt != AVRO_ARRAY)
			break;
		return compat(avro_schema_array_items(w), avro_schema_array_items(r), depth + 1,
			      why, why_size);
	case AVRO_MAP:
		if (rt != AVRO_MAP)
			break;
		return compat(avro_schema_map_values(w), avro_schema_map_values(r), depth + 1,
			      why, why_size);
	case AVRO_FIXED:
		if (rt != AVRO_FIXED || !named_same(w, r) ||
		    avro_schema_fixed_size(w) != avro_schema_fixed_size(r))
			break;
		return 1;
	case AVRO_ENUM: {
		int nw = avro_schema_enum_number_of_symbols(w);

		if (rt != AVRO_ENUM || !named_same(w, r))
			break;
		if (nw > avro_schema_enum_number_of_symbols(r))
			goto out_enum;
		for (int i = 0; i < nw; i++)
			if (strcmp(avro_schema_enum_get(w, i), avro_schema_enum_get(r, i)) != 0)
				goto out_enum;
		return 1;
out_enum:
		snprintf(why, why_size, "enum %s: the writer's symbols must be the reader's first "
			 "symbols, in order", simple_name(w));
		return 0;
	}
	case AVRO_RECORD:
		if (rt != AVRO_RECORD || !named_same(w, r))
			break;
		for (size_t i = 0; i < avro_schema_record_size(r); i++) {
			const char *fname = avro_schema_record_field_name(r, (int)i);
			/* Not avro_schema_record_field_get(): it returns garbage
			 * for a missing name. */
			int wi = avro_schema_record_field_get_index(w, fname);
			avro_schema_t wf = wi < 0 ? NULL
					   : avro_schema_record_field_get_by_index(w, wi);

			if (!wf) {
				snprintf(why, why_size, "record %s: the writer has no field %s",
					 simple_name(r), fname);
				return 0;
			}
			if (!compat(wf, avro_schema_record_field_get_by_index(r, (int)i), depth + 1,
				    why, why_size)) {
				char inner[200];

				snprintf(inner, sizeof(inner), "%s", why);
				snprintf(why, why_size, "field %s: %s", fname, inner);
				return 0;
			}
		}
		return 1;
	default:
		break;
	}
	snprintf(why, why_size, "a writer %s %s cannot be read as a %s %s",
		 avro_schema_type_name(w), is_avro_named_type(w) ? simple_name(w) : "",
		 avro_schema_type_name(r), is_avro_named_type(r) ? simple_name(r) : "");
	return 0;
}

static void entry_fail(struct wschema *e, const char *what, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void entry_fail(struct wschema *e, const char *what, const char *fmt, ...)
{
	char msg[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	snprintf(e->err, sizeof(e->err), "%.300s: %s", what, msg);
	e->status = MTLZ_DECODE_SCHEMA;
}

/* Builds a cache entry for writer schema text `text` (JSON). Failures are
 * recorded in the entry (status MTLZ_DECODE_SCHEMA) so that they are
 * cached too; NULL only when out of memory. */
static struct wschema *entry_build(mtlz_avro *a, int target, int key_kind, uint64_t key,
				   const char *text, size_t text_len, const char *what)
{
	struct ours *o = &a->ours[target];
	struct wschema *e = calloc(1, sizeof(*e));
	json_error_t jerr;
	json_t *root;
	uint64_t fp;
	char perr[160];

	if (!e)
		return NULL;
	e->target = target;
	e->key_kind = key_kind;
	e->key = key;
	if (key_kind == KEY_TEXT) {
		e->text = malloc(text_len ? text_len : 1);
		if (!e->text) {
			free(e);
			return NULL;
		}
		memcpy(e->text, text, text_len);
		e->text_len = text_len;
	}
	root = json_loadb(text, text_len, JSON_DECODE_ANY, &jerr);
	if (!root) {
		entry_fail(e, what, "writer schema is not JSON: %s", jerr.text);
		return e;
	}
	if (fingerprint_json(root, &fp, perr, sizeof(perr))) {
		json_decref(root);
		entry_fail(e, what, "%s", perr);
		return e;
	}
	json_decref(root);
	if (avro_schema_from_json_length(text, text_len, &e->writer)) {
		e->writer = NULL;
		entry_fail(e, what, "writer schema: %s", avro_strerror());
		return e;
	}
	e->direct = fp == o->fp;
	e->reader = e->direct ? avro_schema_incref(o->schema) : effective_reader(o, e->writer);
	if (!e->reader) {
		entry_fail(e, what, "cannot build the reader schema: %s", avro_strerror());
		return e;
	}
	e->reader_iface = avro_generic_class_from_schema(e->reader);
	if (!e->reader_iface || avro_generic_value_new(e->reader_iface, &e->reader_value)) {
		entry_fail(e, what, "%s", avro_strerror());
		return e;
	}
	e->has_reader_value = 1;
	if (!e->direct) {
		char why[256] = "";

		if (!compat(e->writer, e->reader, 0, why, sizeof(why))) {
			entry_fail(e, what, "writer schema incompatible with %s: %s",
				   avro_schema_name(o->schema), why);
			return e;
		}
		e->resolved_iface = avro_resolved_writer_new(e->writer, e->reader);
		if (!e->resolved_iface) {
			entry_fail(e, what, "writer schema incompatible with %s: %s",
				   avro_schema_name(o->schema), avro_strerror());
			return e;
		}
		if (avro_resolved_writer_new_value(e->resolved_iface, &e->resolved_value)) {
			entry_fail(e, what, "%s", avro_strerror());
			return e;
		}
		e->has_resolved_value = 1;
		avro_resolved_writer_set_dest(&e->resolved_value, &e->reader_value);
	}
	e->status = MTLZ_DECODE_OK;
	return e;
}

static struct wschema *cache_find(mtlz_avro *a, int target, int key_kind, uint64_t key,
				  const char *text, size_t text_len)
{
	for (size_t i = 0; i < a->n_cache; i++) {
		struct wschema *e = a->cache[i];

		if (e->target == target && e->key_kind == key_kind && e->key == key &&
		    (key_kind != KEY_TEXT ||
		     (e->text_len == text_len && memcmp(e->text, text, text_len) == 0))) {
			e->last_use = ++a->use_clock;
			return e;
		}
	}
	return NULL;
}

static void cache_insert(mtlz_avro *a, struct wschema *e)
{
	if (a->n_cache == MTLZ_AVRO_MAX_CACHE) {
		size_t lru = 0;

		for (size_t i = 1; i < a->n_cache; i++)
			if (a->cache[i]->last_use < a->cache[lru]->last_use)
				lru = i;
		wschema_free(a->cache[lru]);
		a->cache[lru] = a->cache[--a->n_cache];
	}
	e->last_use = ++a->use_clock;
	a->cache[a->n_cache++] = e;
}

/* Writer schema for a message: returns the entry, or NULL with a reason
 * class in *cls and a message in errstr. */
static struct wschema *writer_lookup(mtlz_avro *a, int target, int key_kind, uint64_t key,
				     const char *text, size_t text_len, int *cls,
				     char *errstr, size_t errstr_size)
{
	struct ours *o = &a->ours[target];
	struct wschema *e = cache_find(a, target, key_kind, key, text, text_len);
	char what[4200], *raw = NULL;
	size_t len = 0;

	if (e)
		goto out_check;
	if (key_kind == KEY_TEXT) {
		snprintf(what, sizeof(what), "container schema");
		e = entry_build(a, target, key_kind, key, text, text_len, what);
	} else if (key_kind == KEY_FP && key == o->fp) {
		snprintf(what, sizeof(what), "fingerprint %016" PRIx64 " (%s)", key, o->what);
		e = entry_build(a, target, key_kind, key, o->text, o->text_len, what);
	} else if (key_kind == KEY_FP) {
		const char *path = NULL;

		for (int pass = 0; pass < 2 && !path; pass++) {
			for (size_t i = 0; i < a->n_known && !path; i++)
				if (a->known[i].fp == key)
					path = a->known[i].path;
			if (!path && pass == 0 && a->registry_dir &&
			    mtlz_now() - a->known_scan_s >= MTLZ_AVRO_RESCAN_S)
				registry_scan(a, NULL, 0);
		}
		if (!path) {
			*cls = mtlz_err(errstr, errstr_size, MTLZ_DECODE_SCHEMA,
					"unknown writer schema fingerprint %016" PRIx64
					" (not %s, not in %s)", key, o->what,
					a->registry_dir ? a->registry_dir : "a registry dir");
			return NULL;
		}
		snprintf(what, sizeof(what), "fingerprint %016" PRIx64 " (%s)", key, path);
		if (read_file(path, &raw, &len, errstr, errstr_size)) {
			*cls = MTLZ_DECODE_SCHEMA;
			return NULL;
		}
		e = entry_build(a, target, key_kind, key, raw, len, what);
	} else {
		if (!a->registry_dir) {
			*cls = mtlz_err(errstr, errstr_size, MTLZ_DECODE_SCHEMA,
					"confluent schema id %" PRIu32
					": no schema registry dir configured", (uint32_t)key);
			return NULL;
		}
		snprintf(what, sizeof(what), "%s/%" PRIu32 ".avsc", a->registry_dir,
			 (uint32_t)key);
		if (read_file(what, &raw, &len, errstr, errstr_size)) {
			/* Not cached: the schema may be added to the registry later. */
			*cls = MTLZ_DECODE_SCHEMA;
			return NULL;
		}
		e = entry_build(a, target, key_kind, key, raw, len, what);
	}
	free(raw);
	if (!e) {
		*cls = mtlz_err(errstr, errstr_size, MTLZ_DECODE_SCHEMA, "out of memory");
		return NULL;
	}
	cache_insert(a, e);
out_check:
	if (e->status != MTLZ_DECODE_OK) {
		*cls = mtlz_err(errstr, errstr_size, e->status, "%s", e->err);
		return NULL;
	}
	return e;
}

/* ------------------------------------------------------------------ */
/* Framing                                                             */

const char *mtlz_framing_name(int framing)
{
	switch (framing) {
	case MTLZ_FRAMING_CONFLUENT: return "confluent";
	case MTLZ_FRAMING_SINGLE_OBJECT: return "single_object";
	case MTLZ_FRAMING_CONTAINER: return "container";
	}
	return "unknown";
}

int mtlz_framing_parse(const char *name)
{
	if (!name)
		return -1;
	if (strcmp(name, "confluent") == 0)
		return MTLZ_FRAMING_CONFLUENT;
	if (strcmp(name, "single_object") == 0 || strcmp(name, "single-object") == 0)
		return MTLZ_FRAMING_SINGLE_OBJECT;
	if (strcmp(name, "container") == 0)
		return MTLZ_FRAMING_CONTAINER;
	if (strcmp(name, "auto") == 0)
		return MTLZ_FRAMING_UNKNOWN;   /* detect per message */
	return -1;
}

int mtlz_framing_detect(const void *buf, size_t len)
{
	const uint8_t *p = buf;

	if (!p)
		return MTLZ_FRAMING_UNKNOWN;
	if (len >= 5 && p[0] == 0x00)
		return MTLZ_FRAMING_CONFLUENT;
	if (len >= 10 && p[0] == 0xC3 && p[1] == 0x01)
		return MTLZ_FRAMING_SINGLE_OBJECT;
	if (len >= 4 && memcmp(p, "Obj\x01", 4) == 0)
		return MTLZ_FRAMING_CONTAINER;
	return MTLZ_FRAMING_UNKNOWN;
}

const char *mtlz_decode_error_name(int err)
{
	switch (err) {
	case MTLZ_DECODE_OK: return "ok";
	case MTLZ_DECODE_FRAMING: return "framing";
	case MTLZ_DECODE_SCHEMA: return "schema";
	case MTLZ_DECODE_AVRO: return "avro";
	case MTLZ_DECODE_INVALID: return "invalid";
	case MTLZ_DECODE_OVERSIZE: return "oversize";
	}
	return "unknown";
}

/* The datum inside a one-record container file (null codec). */
static int container_datum(const uint8_t *buf, size_t len, const char **schema,
			   size_t *schema_len, struct cur *datum, char *errstr,
			   size_t errstr_size)
{
	struct cur c = { buf + 4, buf + len };
	const uint8_t *codec = NULL, *sync, *p;
	size_t codec_len = 0, n_records = 0, n;
	uint64_t count;

	*schema = NULL;
	for (;;) {
		if (cur_block(&c, &count))
			goto out_trunc;
		if (count == 0)
			break;
		if (count > cur_left(&c))
			goto out_trunc;
		for (uint64_t k = 0; k < count; k++) {
			const uint8_t *key, *val;
			size_t kl, vl;

			if (cur_bytes(&c, &key, &kl) || cur_bytes(&c, &val, &vl))
				goto out_trunc;
			if (kl == 11 && memcmp(key, "avro.schema", 11) == 0) {
				*schema = (const char *)val;
				*schema_len = vl;
			} else if (kl == 10 && memcmp(key, "avro.codec", 10) == 0) {
				codec = val;
				codec_len = vl;
			}
		}
	}
	if (cur_left(&c) < 16)
		goto out_trunc;
	sync = c.p;
	c.p += 16;
	if (!*schema)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
				"container header has no avro.schema");
	if (codec && !(codec_len == 4 && memcmp(codec, "null", 4) == 0))
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
				"container codec \"%.*s\" not supported (only null)",
				(int)MTLZ_MIN(codec_len, 32), (const char *)codec);
	while (cur_left(&c)) {
		int64_t cnt, size;

		if (cur_long(&c, &cnt) || cnt < 0 || cur_long(&c, &size) || size < 0 ||
		    (uint64_t)size > cur_left(&c) || cur_left(&c) - (size_t)size < 16)
			goto out_trunc;
		p = c.p;
		n = (size_t)size;
		c.p += n;
		if (memcmp(c.p, sync, 16) != 0)
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
					"container block sync marker mismatch");
		c.p += 16;
		if (cnt == 0)
			continue;
		if (n_records + (uint64_t)cnt > 1)
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
					"container holds more than one record");
		n_records = 1;
		datum->p = p;
		datum->end = p + n;
	}
	if (n_records != 1)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
				"container holds no record");
	return MTLZ_DECODE_OK;

out_trunc:
	return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
			"container file truncated or malformed at byte %zu of %zu",
			(size_t)(c.p - buf), len);
}

/* Framing -> writer schema entry + datum bytes. */
static int unframe(mtlz_avro *a, int target, const void *buf, size_t len,
		   struct wschema **ep, struct cur *datum, char *errstr, size_t errstr_size)
{
	const uint8_t *p = buf;
	int cls = MTLZ_DECODE_OK;

	*ep = NULL;
	if (a->max_message_bytes && len > a->max_message_bytes)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_OVERSIZE,
				"%zu bytes, the limit is %zu", len, a->max_message_bytes);
	switch (mtlz_framing_detect(buf, len)) {
	case MTLZ_FRAMING_CONFLUENT: {
		uint32_t id = (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 |
			      (uint32_t)p[3] << 8 | p[4];

		*ep = writer_lookup(a, target, KEY_ID, id, NULL, 0, &cls, errstr, errstr_size);
		datum->p = p + 5;
		datum->end = p + len;
		break;
	}
	case MTLZ_FRAMING_SINGLE_OBJECT:
		*ep = writer_lookup(a, target, KEY_FP, ld_le64(p + 2), NULL, 0, &cls, errstr,
				    errstr_size);
		datum->p = p + 10;
		datum->end = p + len;
		break;
	case MTLZ_FRAMING_CONTAINER: {
		const char *schema = NULL;
		size_t schema_len = 0;

		cls = container_datum(p, len, &schema, &schema_len, datum, errstr, errstr_size);
		if (cls)
			return cls;
		if (schema_len > MTLZ_AVRO_MAX_SCHEMA_BYTES)
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_SCHEMA,
					"container schema of %zu bytes", schema_len);
		*ep = writer_lookup(a, target, KEY_TEXT, mtlz_avro_crc64(schema, schema_len),
				    schema, schema_len, &cls, errstr, errstr_size);
		break;
	}
	default:
		if (len && p[0] == 0x00)
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_FRAMING,
					"truncated Confluent header (%zu bytes)", len);
		if (len && p[0] == 0xC3 && (len < 2 || p[1] == 0x01))
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_FRAMING,
					"truncated single-object header (%zu bytes)", len);
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_FRAMING,
				"no known Avro framing (%zu bytes, first %02x %02x)", len,
				len > 0 ? p[0] : 0, len > 1 ? p[1] : 0);
	}
	return *ep ? MTLZ_DECODE_OK : cls;
}

/* Checks the datum against the writer schema, then reads it with Avro C
 * into e->reader_value (through the resolved writer unless identical). */
static int generic_read(mtlz_avro *a, struct wschema *e, struct cur *datum, char *errstr,
			size_t errstr_size)
{
	struct walk w = { .items_left = cur_left(datum) + MTLZ_AVRO_WALK_ITEMS };
	struct cur c = *datum;

	if (walk_datum(e->writer, &c, &w, 0))
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO, "%s", w.err);
	if (c.p != c.end)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
				"%zu bytes after the datum", cur_left(&c));
	avro_reader_memory_set_source(a->reader, (const char *)datum->p,
				      (int64_t)cur_left(datum));
	if (avro_value_read(a->reader, e->direct ? &e->reader_value : &e->resolved_value))
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO, "%s", avro_strerror());
	return MTLZ_DECODE_OK;
}

/* ------------------------------------------------------------------ */
/* Spectrum decoding                                                   */

struct lens {
	size_t flux, ivar, mask, wave;
};

static int set_ids(mtlz_spectrum *s, const char *id, size_t id_len, const char *survey,
		   size_t survey_len, char *errstr, size_t errstr_size)
{
	if (id_len == 0 || id_len >= sizeof(s->spec_id) || memchr(id, '\0', id_len))
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
				"spec_id \"%.*s\" (%zu bytes): must be 1..%zu bytes without NUL",
				(int)MTLZ_MIN(id_len, 64), id, id_len, sizeof(s->spec_id) - 1);
	memcpy(s->spec_id, id, id_len);
	s->spec_id[id_len] = '\0';
	/* The survey tag is informational: longer ones are truncated. */
	survey_len = MTLZ_MIN(survey_len, sizeof(s->survey) - 1);
	memcpy(s->survey, survey, survey_len);
	s->survey[survey_len] = '\0';
	return MTLZ_DECODE_OK;
}

/* The content checks both decoding paths share. */
static int spectrum_check(const mtlz_spectrum *s, const struct lens *l, char *errstr,
			  size_t errstr_size)
{
	if (l->flux == 0 || l->flux > MTLZ_AVRO_MAX_PIXELS)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
				"spec_id %s: flux has %zu samples, allowed 1..%u", s->spec_id,
				l->flux, MTLZ_AVRO_MAX_PIXELS);
	if (s->ivar && l->ivar != l->flux)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
				"spec_id %s: ivar has %zu samples, flux %zu", s->spec_id,
				l->ivar, l->flux);
	if (s->and_mask && l->mask != l->flux)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
				"spec_id %s: mask has %zu samples, flux %zu", s->spec_id,
				l->mask, l->flux);
	if (s->grid_kind == MTLZ_GRID_EXPLICIT && l->wave != l->flux)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
				"spec_id %s: wavelength grid has %zu samples, flux %zu",
				s->spec_id, l->wave, l->flux);
	if (s->grid_kind != MTLZ_GRID_EXPLICIT && (!isfinite(s->start) || !isfinite(s->step)))
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
				"spec_id %s: wavelength grid start %g step %g not finite",
				s->spec_id, s->start, s->step);
	return MTLZ_DECODE_OK;
}

/* Fast path: array blocks of fixed-size or varint items straight into a
 * malloc'ed array. `kind`: 'f' float, 'd' double, 'i' int (as uint32). */
static int direct_array(struct cur *c, int kind, void **out, size_t *n, const char *field,
			char *errstr, size_t errstr_size)
{
	size_t size = kind == 'd' ? 8 : 4, min_bytes = kind == 'i' ? 1 : size;
	uint8_t *v = NULL;
	uint64_t count;

	*n = 0;
	for (;;) {
		uint8_t *nv;

		if (cur_block(c, &count))
			goto out_trunc;
		if (count == 0)
			break;
		if (count > cur_left(c) / min_bytes)
			goto out_trunc;
		if (*n + count > MTLZ_AVRO_MAX_PIXELS) {
			free(v);
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
					"%s has more than %u samples", field, MTLZ_AVRO_MAX_PIXELS);
		}
		nv = realloc(v, (*n + count) * size);
		if (!nv) {
			free(v);
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
					"%s: out of memory", field);
		}
		v = nv;
		if (kind == 'i') {
			uint32_t *d = (uint32_t *)v + *n;

			for (uint64_t k = 0; k < count; k++) {
				int32_t x;

				/* one-byte varints (mask values 0..63: most pixels)
				 * without the general loop */
				if (c->p < c->end && !(*c->p & 0x80)) {
					const uint32_t b = *c->p++;

					d[k] = (b >> 1) ^ (0u - (b & 1));
					continue;
				}
				if (cur_int(c, &x))
					goto out_trunc;
				d[k] = (uint32_t)x;
			}
		} else if (kind == 'f') {
			float *d = (float *)v + *n;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
			memcpy(d, c->p, 4 * count); /* Avro floats are little-endian IEEE */
#else
			for (uint64_t k = 0; k < count; k++) {
				uint32_t u = ld_le32(c->p + 4 * k);

				memcpy(&d[k], &u, 4);
			}
#endif
			c->p += 4 * count;
		} else {
			double *d = (double *)v + *n;

			for (uint64_t k = 0; k < count; k++) {
				uint64_t u = ld_le64(c->p + 8 * k);

				memcpy(&d[k], &u, 8);
			}
			c->p += 8 * count;
		}
		*n += count;
	}
	*out = v;
	return MTLZ_DECODE_OK;

out_trunc:
	free(v);
	return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO, "%s truncated or malformed", field);
}

static int direct_union(struct cur *c, int64_t n_branches, int64_t *branch)
{
	return cur_long(c, branch) || *branch < 0 || *branch >= n_branches ? -1 : 0;
}

/* Decodes a datum written with exactly our spectrum.avsc (same canonical
 * form), field by field in schema order. */
static int direct_spectrum_fields(struct cur *c, mtlz_spectrum *s, struct lens *l,
				  char *errstr, size_t errstr_size)
{
	const uint8_t *id, *survey, *k, *v;
	size_t id_len, survey_len, kl, vl;
	int64_t b;
	int32_t zw;
	uint64_t count;
	void *tmp = NULL;
	int rc;

	if (cur_bytes(c, &id, &id_len) || cur_bytes(c, &survey, &survey_len))
		goto out_trunc;
	rc = set_ids(s, (const char *)id, id_len, (const char *)survey, survey_len, errstr,
		     errstr_size);
	if (rc)
		return rc;
	if (direct_union(c, 2, &b) || (b == 1 && cur_double(c, &s->z)))
		goto out_trunc;
	if (direct_union(c, 2, &b) || (b == 1 && cur_int(c, &zw)))
		goto out_trunc;
	if (b == 1)
		s->zwarning = zw;
	if (direct_union(c, 2, &b) || (b == 1 && cur_double(c, &s->sn)))
		goto out_trunc;
	if (direct_union(c, 3, &b))
		goto out_trunc;
	s->grid_kind = b == 0 ? MTLZ_GRID_LOGLAM : b == 1 ? MTLZ_GRID_LINEAR : MTLZ_GRID_EXPLICIT;
	if (b == 2) {
		rc = direct_array(c, 'd', &tmp, &l->wave, "wavelength", errstr, errstr_size);
		if (rc)
			return rc;
		s->wave = tmp;
	} else if (cur_double(c, &s->start) || cur_double(c, &s->step)) {
		goto out_trunc;
	}
	rc = direct_array(c, 'f', &tmp, &l->flux, "flux", errstr, errstr_size);
	if (rc)
		return rc;
	s->flux = tmp;
	if (direct_union(c, 2, &b))
		goto out_trunc;
	if (b == 1) {
		rc = direct_array(c, 'f', &tmp, &l->ivar, "ivar", errstr, errstr_size);
		if (rc)
			return rc;
		s->ivar = tmp;
		if (!s->ivar && !(s->ivar = malloc(sizeof(float))))
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO, "out of memory");
	}
	if (direct_union(c, 2, &b))
		goto out_trunc;
	if (b == 1) {
		rc = direct_array(c, 'i', &tmp, &l->mask, "mask", errstr, errstr_size);
		if (rc)
			return rc;
		s->and_mask = tmp;
		if (!s->and_mask && !(s->and_mask = malloc(sizeof(uint32_t))))
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO, "out of memory");
	}
	for (;;) {   /* metadata: not kept, but checked */
		if (cur_block(c, &count))
			goto out_trunc;
		if (count == 0)
			break;
		if (count > cur_left(c))
			goto out_trunc;
		for (uint64_t i = 0; i < count; i++)
			if (cur_bytes(c, &k, &kl) || cur_bytes(c, &v, &vl))
				goto out_trunc;
	}
	return MTLZ_DECODE_OK;

out_trunc:
	return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
			"spectrum datum truncated or malformed %zu bytes before its end",
			cur_left(c));
}

static int datum_end(const struct cur *c, const mtlz_spectrum *s, char *errstr,
		     size_t errstr_size)
{
	if (c->p != c->end)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
				"spec_id %s: %zu bytes after the datum", s->spec_id, cur_left(c));
	return MTLZ_DECODE_OK;
}

static int direct_spectrum(struct cur *c, mtlz_spectrum *s, struct lens *l, char *errstr,
			   size_t errstr_size)
{
	int rc = direct_spectrum_fields(c, s, l, errstr, errstr_size);

	return rc ? rc : datum_end(c, s, errstr, errstr_size);
}

/* Generic-value helpers: a missing field (defaulted away) returns -1. */
static int gv_field(avro_value_t *rec, const char *name, avro_value_t *out)
{
	return avro_value_get_by_name(rec, name, out, NULL) ? -1 : 0;
}

/* 1 with the branch in *out when the union field holds a non-null value. */
static int gv_present(avro_value_t *rec, const char *name, avro_value_t *out)
{
	avro_value_t u;

	if (gv_field(rec, name, &u))
		return 0;
	if (avro_value_get_type(&u) == AVRO_UNION &&
	    avro_value_get_current_branch(&u, out))
		return 0;
	if (avro_value_get_type(&u) != AVRO_UNION)
		*out = u;
	return avro_value_get_type(out) != AVRO_NULL;
}

static int gv_string(avro_value_t *rec, const char *name, const char **s, size_t *len)
{
	avro_value_t v;
	size_t size;

	if (gv_field(rec, name, &v) || avro_value_get_string(&v, s, &size))
		return -1;
	*len = size ? size - 1 : 0;   /* Avro C counts the NUL terminator */
	return 0;
}

/* A copy of an array value of float ('f'), double ('d') or int ('i', as
 * uint32) in a malloc'ed array (NULL on failure). */
static void *gv_array(avro_value_t *arr, int kind, size_t *n)
{
	size_t count;
	void *out;

	if (avro_value_get_size(arr, &count) || count > MTLZ_AVRO_MAX_PIXELS)
		return NULL;
	*n = count;
	out = malloc((count ? count : 1) * (kind == 'd' ? 8 : 4));
	if (!out)
		return NULL;
	for (size_t i = 0; i < count; i++) {
		avro_value_t e;
		int32_t x;
		int rc;

		if (avro_value_get_by_index(arr, i, &e, NULL))
			goto out_free;
		if (kind == 'f')
			rc = avro_value_get_float(&e, (float *)out + i);
		else if (kind == 'd')
			rc = avro_value_get_double(&e, (double *)out + i);
		else if (!(rc = avro_value_get_int(&e, &x)))
			((uint32_t *)out)[i] = (uint32_t)x;
		if (rc)
			goto out_free;
	}
	return out;

out_free:
	free(out);
	return NULL;
}

static int generic_spectrum(avro_value_t *rec, mtlz_spectrum *s, struct lens *l,
			    char *errstr, size_t errstr_size)
{
	avro_value_t v, g, f;
	const char *id, *survey, *kind;
	size_t id_len, survey_len;
	int32_t zw;
	int rc;

	if (gv_string(rec, "spec_id", &id, &id_len) ||
	    gv_string(rec, "survey", &survey, &survey_len))
		goto out_avro;
	rc = set_ids(s, id, id_len, survey, survey_len, errstr, errstr_size);
	if (rc)
		return rc;
	if (gv_present(rec, "redshift", &v) && avro_value_get_double(&v, &s->z))
		goto out_avro;
	if (gv_present(rec, "zwarning", &v)) {
		if (avro_value_get_int(&v, &zw))
			goto out_avro;
		s->zwarning = zw;
	}
	if (gv_present(rec, "sn_median", &v) && avro_value_get_double(&v, &s->sn))
		goto out_avro;
	if (!gv_present(rec, "wavelength", &g))
		goto out_avro;
	kind = avro_schema_name(avro_value_get_schema(&g));
	if (kind && strcmp(kind, "ExplicitGrid") == 0) {
		s->grid_kind = MTLZ_GRID_EXPLICIT;
		if (gv_field(&g, "wave", &f) || !(s->wave = gv_array(&f, 'd', &l->wave)))
			goto out_avro;
	} else if (kind && (strcmp(kind, "LogLinearGrid") == 0 ||
			    strcmp(kind, "LinearGrid") == 0)) {
		int lg = kind[1] == 'o';

		s->grid_kind = lg ? MTLZ_GRID_LOGLAM : MTLZ_GRID_LINEAR;
		if (gv_field(&g, lg ? "log10_start" : "start", &f) ||
		    avro_value_get_double(&f, &s->start) ||
		    gv_field(&g, lg ? "log10_step" : "step", &f) ||
		    avro_value_get_double(&f, &s->step))
			goto out_avro;
	} else {
		goto out_avro;
	}
	if (gv_field(rec, "flux", &f) || !(s->flux = gv_array(&f, 'f', &l->flux)))
		goto out_avro;
	if (gv_present(rec, "ivar", &v) && !(s->ivar = gv_array(&v, 'f', &l->ivar)))
		goto out_avro;
	if (gv_present(rec, "mask", &v) && !(s->and_mask = gv_array(&v, 'i', &l->mask)))
		goto out_avro;
	return MTLZ_DECODE_OK;

out_avro:
	return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
			"spectrum record does not have the expected fields (%s)", avro_strerror());
}

int mtlz_avro_decode_spectrum(mtlz_avro *a, const void *buf, size_t len,
			      mtlz_spectrum *s, char *errstr, size_t errstr_size)
{
	struct wschema *e;
	struct cur datum;
	struct lens l = { 0, 0, 0, 0 };
	int rc;

	mtlz_spectrum_clear(s);
	rc = unframe(a, TARGET_SPECTRUM, buf, len, &e, &datum, errstr, errstr_size);
	if (rc)
		return rc;
	if (e->direct && a->fast_path) {
		rc = direct_spectrum(&datum, s, &l, errstr, errstr_size);
	} else {
		rc = generic_read(a, e, &datum, errstr, errstr_size);
		if (!rc)
			rc = generic_spectrum(&e->reader_value, s, &l, errstr, errstr_size);
	}
	if (!rc)
		rc = spectrum_check(s, &l, errstr, errstr_size);
	if (rc)
		mtlz_spectrum_clear(s);
	else
		s->n = l.flux;
	return rc;
}

/* ------------------------------------------------------------------ */
/* Encoding                                                            */

/* Frames the datum in o's generic value `v` into *dst (malloc'ed when
 * *dst_cap is NULL, else the buffer *dst of capacity *dst_cap, grown). */
static int frame_value(mtlz_avro *a, struct ours *o, avro_value_t *v, int framing,
		       int32_t confluent_id, uint8_t **dst, size_t *dst_cap, size_t *out_len,
		       char *errstr, size_t errstr_size)
{
	size_t size, total, n = 0;
	uint8_t *p;

	if (framing == MTLZ_FRAMING_CONFLUENT && confluent_id < 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"confluent framing needs a schema id >= 0, got %" PRId32,
				confluent_id);
	if (framing != MTLZ_FRAMING_CONFLUENT && framing != MTLZ_FRAMING_SINGLE_OBJECT &&
	    framing != MTLZ_FRAMING_CONTAINER)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"cannot encode with framing %d", framing);
	if (avro_value_sizeof(v, &size))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "%s: %s", o->what,
				avro_strerror());
	total = framing == MTLZ_FRAMING_CONFLUENT ? 5 + size
		: framing == MTLZ_FRAMING_SINGLE_OBJECT ? 10 + size
		: o->hdr_len + 20 + size + 16;
	if (!dst_cap) {
		p = malloc(total);
	} else if (*dst_cap < total) {
		p = realloc(*dst, total);
		if (p) {
			*dst = p;
			*dst_cap = total;
		}
	} else {
		p = *dst;
	}
	if (!p)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory (%zu bytes)",
				total);
	if (framing == MTLZ_FRAMING_CONFLUENT) {
		p[0] = 0;
		p[1] = (uint8_t)((uint32_t)confluent_id >> 24);
		p[2] = (uint8_t)((uint32_t)confluent_id >> 16);
		p[3] = (uint8_t)((uint32_t)confluent_id >> 8);
		p[4] = (uint8_t)confluent_id;
		n = 5;
	} else if (framing == MTLZ_FRAMING_SINGLE_OBJECT) {
		p[0] = 0xC3;
		p[1] = 0x01;
		for (int i = 0; i < 8; i++)
			p[2 + i] = (uint8_t)(o->fp >> (8 * i));
		n = 10;
	} else {
		memcpy(p, o->hdr, o->hdr_len);
		n = o->hdr_len;
		n += put_long(p + n, 1);
		n += put_long(p + n, (int64_t)size);
	}
	avro_writer_memory_set_dest(a->writer, (const char *)p + n, (int64_t)size);
	if (avro_value_write(a->writer, v)) {
		if (!dst_cap)
			free(p);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "%s: %s", o->what,
				avro_strerror());
	}
	n += size;
	if (framing == MTLZ_FRAMING_CONTAINER) {
		memcpy(p + n, o->sync, 16);
		n += 16;
	}
	if (!dst_cap)
		*dst = p;
	*out_len = n;
	return MTLZ_OK;
}

static int set_str(avro_value_t *rec, const char *name, const char *s, size_t max)
{
	avro_value_t f;
	size_t n = strnlen(s, max);

	/* Avro C's string length counts a NUL terminator. */
	char tmp[512];

	if (n >= sizeof(tmp))
		n = sizeof(tmp) - 1;
	memcpy(tmp, s, n);
	tmp[n] = '\0';
	return gv_field(rec, name, &f) || avro_value_set_string_len(&f, tmp, n + 1);
}

/* Sets union field `name` to null (present = 0) or its non-null branch 1. */
static int set_opt(avro_value_t *rec, const char *name, int present, avro_value_t *branch)
{
	avro_value_t u, nb;

	if (gv_field(rec, name, &u))
		return -1;
	if (!present)
		return avro_value_set_branch(&u, 0, &nb) || avro_value_set_null(&nb);
	return avro_value_set_branch(&u, 1, branch);
}

static int set_float_array(avro_value_t *arr, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		avro_value_t e;

		if (avro_value_append(arr, &e, NULL) || avro_value_set_float(&e, x[i]))
			return -1;
	}
	return 0;
}

int mtlz_avro_encode_spectrum(mtlz_avro *a, const mtlz_spectrum *s, int framing,
			      int32_t confluent_id, uint8_t **buf, size_t *len,
			      char *errstr, size_t errstr_size)
{
	struct ours *o = &a->ours[TARGET_SPECTRUM];
	avro_value_t *v = &o->value, f, g, x;
	int kind = s->grid_kind;

	*buf = NULL;
	*len = 0;
	if (!s->flux || s->n == 0 || s->n > MTLZ_AVRO_MAX_PIXELS ||
	    kind < MTLZ_GRID_LOGLAM || kind > MTLZ_GRID_EXPLICIT ||
	    (kind == MTLZ_GRID_EXPLICIT && !s->wave))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"spec_id %.63s: cannot encode (n=%zu, grid kind %d, flux %s, wave %s)",
				s->spec_id, s->n, kind, s->flux ? "set" : "NULL",
				s->wave ? "set" : "NULL");
	avro_value_reset(v);
	if (set_str(v, "spec_id", s->spec_id, sizeof(s->spec_id)) ||
	    set_str(v, "survey", s->survey, sizeof(s->survey)))
		goto out_avro;
	if (set_opt(v, "redshift", !isnan(s->z), &x) ||
	    (!isnan(s->z) && avro_value_set_double(&x, s->z)))
		goto out_avro;
	if (set_opt(v, "zwarning", s->zwarning >= 0, &x) ||
	    (s->zwarning >= 0 && avro_value_set_int(&x, s->zwarning)))
		goto out_avro;
	if (set_opt(v, "sn_median", !isnan(s->sn), &x) ||
	    (!isnan(s->sn) && avro_value_set_double(&x, s->sn)))
		goto out_avro;
	if (gv_field(v, "wavelength", &f) || avro_value_set_branch(&f, kind, &g))
		goto out_avro;
	if (kind == MTLZ_GRID_EXPLICIT) {
		if (gv_field(&g, "wave", &f))
			goto out_avro;
		for (size_t i = 0; i < s->n; i++)
			if (avro_value_append(&f, &x, NULL) || avro_value_set_double(&x, s->wave[i]))
				goto out_avro;
	} else {
		int lg = kind == MTLZ_GRID_LOGLAM;

		if (gv_field(&g, lg ? "log10_start" : "start", &f) ||
		    avro_value_set_double(&f, s->start) ||
		    gv_field(&g, lg ? "log10_step" : "step", &f) ||
		    avro_value_set_double(&f, s->step))
			goto out_avro;
	}
	if (gv_field(v, "flux", &f) || set_float_array(&f, s->flux, s->n))
		goto out_avro;
	if (set_opt(v, "ivar", s->ivar != NULL, &x) ||
	    (s->ivar && set_float_array(&x, s->ivar, s->n)))
		goto out_avro;
	if (set_opt(v, "mask", s->and_mask != NULL, &x))
		goto out_avro;
	for (size_t i = 0; s->and_mask && i < s->n; i++)
		if (avro_value_append(&x, &f, NULL) ||
		    avro_value_set_int(&f, (int32_t)s->and_mask[i]))
			goto out_avro;
	return frame_value(a, o, v, framing, confluent_id, buf, NULL, len, errstr, errstr_size);

out_avro:
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "spec_id %.63s: %s",
			s->spec_id, avro_strerror());
}

int mtlz_avro_encode_result(mtlz_avro *a, const mtlz_result_rec *r, int framing,
			    int32_t confluent_id, const uint8_t **buf, size_t *len,
			    char *errstr, size_t errstr_size)
{
	static const char *const prob_names[4] = { "prob_passive", "prob_star_forming",
						   "prob_composite", "prob_agn" };
	struct ours *o = &a->ours[TARGET_RESULT];
	avro_value_t *v = &o->value, f, x;
	char names[256], *tok, *save;
	int metal = r->has_metal && isfinite(r->oh);
	int rc;

	*buf = NULL;
	*len = 0;
	if (r->cls < 0 || r->cls > 3)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"spec_id %.63s: class %d out of range", r->spec_id, r->cls);
	avro_value_reset(v);
	if (set_str(v, "spec_id", r->spec_id, sizeof(r->spec_id)) ||
	    gv_field(v, "class", &f) || avro_value_set_enum(&f, r->cls))
		goto out_avro;
	for (int i = 0; i < 4; i++)
		if (gv_field(v, prob_names[i], &f) || avro_value_set_float(&f, r->prob[i]))
			goto out_avro;
	if (set_opt(v, "metallicity", metal, &x) || (metal && avro_value_set_double(&x, r->oh)))
		goto out_avro;
	metal = metal && isfinite(r->oh_sigma);
	if (set_opt(v, "metallicity_sigma", metal, &x) ||
	    (metal && avro_value_set_double(&x, r->oh_sigma)))
		goto out_avro;
	if (gv_field(v, "quality_flags", &f) || avro_value_set_int(&f, (int32_t)r->flags) ||
	    gv_field(v, "quality_flag_names", &f))
		goto out_avro;
	mtlz_flags_str(r->flags, names, sizeof(names));
	for (tok = strtok_r(names, "|", &save); tok; tok = strtok_r(NULL, "|", &save))
		if (avro_value_append(&f, &x, NULL) || avro_value_set_string(&x, tok))
			goto out_avro;
	if (set_str(v, "model_sha256", r->model_sha256, sizeof(r->model_sha256)) ||
	    set_str(v, "model_version", r->model_version, sizeof(r->model_version)) ||
	    set_str(v, "source_topic", r->source_topic, sizeof(r->source_topic)) ||
	    gv_field(v, "source_partition", &f) ||
	    avro_value_set_int(&f, r->source_partition) ||
	    gv_field(v, "source_offset", &f) || avro_value_set_long(&f, r->source_offset) ||
	    gv_field(v, "processed_at", &f) || avro_value_set_long(&f, r->processed_us))
		goto out_avro;
	rc = frame_value(a, o, v, framing, confluent_id, &a->out, &a->out_cap, len, errstr,
			 errstr_size);
	if (!rc)
		*buf = a->out;
	return rc;

out_avro:
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "spec_id %.63s: %s",
			r->spec_id, avro_strerror());
}

/* ------------------------------------------------------------------ */
/* Result decoding                                                     */

static void copy_str(char *dst, size_t size, const char *s, size_t len)
{
	len = MTLZ_MIN(len, size - 1);
	memcpy(dst, s, len);
	dst[len] = '\0';
}

int mtlz_avro_decode_result(mtlz_avro *a, const void *buf, size_t len,
			    mtlz_result_rec *r, char *errstr, size_t errstr_size)
{
	static const char *const prob_names[4] = { "prob_passive", "prob_star_forming",
						   "prob_composite", "prob_agn" };
	struct wschema *e;
	struct cur datum;
	avro_value_t *rec, f;
	const char *s;
	size_t n;
	int32_t i32;
	int rc, cls;

	memset(r, 0, sizeof(*r));
	rc = unframe(a, TARGET_RESULT, buf, len, &e, &datum, errstr, errstr_size);
	if (rc)
		return rc;
	rc = generic_read(a, e, &datum, errstr, errstr_size);
	if (rc)
		return rc;
	rec = &e->reader_value;
	if (gv_string(rec, "spec_id", &s, &n))
		goto out_avro;
	copy_str(r->spec_id, sizeof(r->spec_id), s, n);
	if (gv_field(rec, "class", &f) || avro_value_get_enum(&f, &cls))
		goto out_avro;
	if (cls < 0 || cls > 3)
		return mtlz_err(errstr, errstr_size, MTLZ_DECODE_INVALID,
				"spec_id %s: class %d out of range", r->spec_id, cls);
	r->cls = cls;
	for (int i = 0; i < 4; i++)
		if (gv_field(rec, prob_names[i], &f) || avro_value_get_float(&f, &r->prob[i]))
			goto out_avro;
	r->oh = r->oh_sigma = NAN;
	if (gv_present(rec, "metallicity", &f)) {
		if (avro_value_get_double(&f, &r->oh))
			goto out_avro;
		r->has_metal = 1;
	}
	if (gv_present(rec, "metallicity_sigma", &f) && avro_value_get_double(&f, &r->oh_sigma))
		goto out_avro;
	if (gv_field(rec, "quality_flags", &f) || avro_value_get_int(&f, &i32))
		goto out_avro;
	r->flags = (uint32_t)i32;
	if (gv_string(rec, "model_sha256", &s, &n))
		goto out_avro;
	copy_str(r->model_sha256, sizeof(r->model_sha256), s, n);
	if (gv_string(rec, "model_version", &s, &n))
		goto out_avro;
	copy_str(r->model_version, sizeof(r->model_version), s, n);
	if (gv_string(rec, "source_topic", &s, &n))
		goto out_avro;
	copy_str(r->source_topic, sizeof(r->source_topic), s, n);
	if (gv_field(rec, "source_partition", &f) || avro_value_get_int(&f, &r->source_partition) ||
	    gv_field(rec, "source_offset", &f) || avro_value_get_long(&f, &r->source_offset) ||
	    gv_field(rec, "processed_at", &f) || avro_value_get_long(&f, &r->processed_us))
		goto out_avro;
	return MTLZ_DECODE_OK;

out_avro:
	return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
			"result record does not have the expected fields (%s)", avro_strerror());
}

/* ------------------------------------------------------------------ */
/* Lifetime                                                            */

mtlz_avro *mtlz_avro_new(const char *schemas_dir, const char *registry_dir,
			 char *errstr, size_t errstr_size)
{
	static const char dummy[1];
	mtlz_avro *a = calloc(1, sizeof(*a));

	if (!a) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	a->fast_path = 1;
	if (ours_load(&a->ours[TARGET_SPECTRUM], schemas_dir, "spectrum.avsc", errstr,
		      errstr_size) ||
	    ours_load(&a->ours[TARGET_RESULT], schemas_dir, "result.avsc", errstr, errstr_size) ||
	    ours_load(&a->ours[TARGET_LABELLED], schemas_dir, "labelled_spectrum.avsc", errstr,
		      errstr_size))
		goto out_free;
	if (registry_dir) {
		a->registry_dir = strdup(registry_dir);
		if (!a->registry_dir) {
			mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
			goto out_free;
		}
		if (registry_scan(a, errstr, errstr_size))
			goto out_free;
	}
	a->reader = avro_reader_memory(dummy, 0);
	a->writer = avro_writer_memory(dummy, 0);
	if (!a->reader || !a->writer) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out_free;
	}
	return a;

out_free:
	mtlz_avro_free(a);
	return NULL;
}

void mtlz_avro_free(mtlz_avro *a)
{
	if (!a)
		return;
	for (size_t i = 0; i < a->n_cache; i++)
		wschema_free(a->cache[i]);
	ours_free(&a->ours[TARGET_SPECTRUM]);
	ours_free(&a->ours[TARGET_RESULT]);
	ours_free(&a->ours[TARGET_LABELLED]);
	known_free(a);
	free(a->registry_dir);
	if (a->reader)
		avro_reader_free(a->reader);
	if (a->writer)
		avro_writer_free(a->writer);
	free(a->out);
	free(a);
}

uint64_t mtlz_avro_result_fingerprint(const mtlz_avro *a)
{
	return a->ours[TARGET_RESULT].fp;
}

uint64_t mtlz_avro_spectrum_fingerprint(const mtlz_avro *a)
{
	return a->ours[TARGET_SPECTRUM].fp;
}

void mtlz_avro_set_max_message_bytes(mtlz_avro *a, size_t max_bytes)
{
	a->max_message_bytes = max_bytes;
}

void mtlz_avro_set_fast_path(mtlz_avro *a, int on)
{
	a->fast_path = on;
}

/* ------------------------------------------------------------------ */
/* Labels (labelled_spectrum.avsc after its spectrum field)            */

static void copy_text(char *dst, size_t size, const void *src, size_t len)
{
	if (len >= size)
		len = size - 1;     /* truncated (labels.h) */
	memcpy(dst, src, len);
	dst[len] = '\0';
	for (size_t i = 0; i < len; i++)
		if (dst[i] == '\0')
			dst[i] = ' ';
}

static void kv_put(mtlz_labels *lb, mtlz_label_kv *kv, int *n, const void *k, size_t kl,
		   const void *v, size_t vl)
{
	if (*n >= MTLZ_LABEL_KV_MAX) {
		lb->n_dropped++;
		return;
	}
	copy_text(kv[*n].key, sizeof(kv[*n].key), k, kl);
	copy_text(kv[*n].value, sizeof(kv[*n].value), v, vl);
	(*n)++;
}

static int direct_opt_double(struct cur *c, double *x)
{
	int64_t b;

	*x = NAN;
	if (direct_union(c, 2, &b))
		return -1;
	return b == 1 ? cur_double(c, x) : 0;
}

static int direct_map(struct cur *c, mtlz_labels *lb, mtlz_label_kv *kv, int *n)
{
	const uint8_t *k, *v;
	size_t kl, vl;
	uint64_t count;

	for (;;) {
		if (cur_block(c, &count))
			return -1;
		if (count == 0)
			return 0;
		if (count > cur_left(c))
			return -1;
		for (uint64_t i = 0; i < count; i++) {
			if (cur_bytes(c, &k, &kl) || cur_bytes(c, &v, &vl))
				return -1;
			kv_put(lb, kv, n, k, kl, v, vl);
		}
	}
}

/* The label fields in our schema's order (after walk_datum checked them). */
static int direct_labels(struct cur *c, mtlz_labels *lb, char *errstr, size_t errstr_size)
{
	const uint8_t *p;
	size_t len;
	int64_t b, sym;

	mtlz_labels_init(lb);
	if (direct_union(c, 2, &b) || (b == 1 && (cur_long(c, &sym) || sym < 0 ||
						  sym >= MTLZ_N_CLASSES)))
		goto out_bad;
	lb->cls = b == 1 ? (int)sym : MTLZ_CLASS_NONE;
	if (direct_opt_double(c, &lb->oh) || direct_opt_double(c, &lb->oh_err) ||
	    direct_opt_double(c, &lb->log_mass) || direct_opt_double(c, &lb->z) ||
	    direct_opt_double(c, &lb->sn_r))
		goto out_bad;
	if (cur_bytes(c, &p, &len))
		goto out_bad;
	copy_text(lb->source_name, sizeof(lb->source_name), p, len);
	if (cur_bytes(c, &p, &len))
		goto out_bad;
	copy_text(lb->source_version, sizeof(lb->source_version), p, len);
	if (cur_bytes(c, &p, &len))
		goto out_bad;
	copy_text(lb->source_method, sizeof(lb->source_method), p, len);
	if (direct_map(c, lb, lb->params, &lb->n_params) ||
	    direct_map(c, lb, lb->survey, &lb->n_survey))
		goto out_bad;
	return MTLZ_DECODE_OK;

out_bad:
	return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
			"label fields truncated or malformed %zu bytes before the end",
			cur_left(c));
}

static void gv_opt_double(avro_value_t *rec, const char *name, double *x)
{
	avro_value_t v;

	*x = NAN;
	if (gv_present(rec, name, &v) && avro_value_get_double(&v, x))
		*x = NAN;
}

static void gv_text(avro_value_t *rec, const char *name, char *dst, size_t size)
{
	const char *s;
	size_t len;

	if (gv_string(rec, name, &s, &len) == 0)
		copy_text(dst, size, s, len);
}

static void gv_map(avro_value_t *rec, const char *name, mtlz_labels *lb, mtlz_label_kv *kv,
		   int *n)
{
	avro_value_t m, v;
	size_t count, vl;
	const char *key, *s;

	if (gv_field(rec, name, &m) || avro_value_get_size(&m, &count))
		return;
	for (size_t i = 0; i < count; i++)
		if (avro_value_get_by_index(&m, i, &v, &key) == 0 &&
		    avro_value_get_string(&v, &s, &vl) == 0)
			kv_put(lb, kv, n, key, strlen(key), s, vl ? vl - 1 : 0);
}

static int generic_labels(avro_value_t *rec, mtlz_labels *lb, char *errstr,
			  size_t errstr_size)
{
	avro_value_t v;
	int sym;

	mtlz_labels_init(lb);
	if (gv_present(rec, "class", &v)) {
		if (avro_value_get_enum(&v, &sym) || sym < 0 || sym >= MTLZ_N_CLASSES)
			return mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
					"class label is not one of the four classes");
		lb->cls = sym;
	}
	gv_opt_double(rec, "metallicity", &lb->oh);
	gv_opt_double(rec, "metallicity_err", &lb->oh_err);
	gv_opt_double(rec, "log_stellar_mass", &lb->log_mass);
	gv_opt_double(rec, "redshift", &lb->z);
	gv_opt_double(rec, "sn_r", &lb->sn_r);
	if (gv_field(rec, "label_source", &v) == 0) {
		gv_text(&v, "name", lb->source_name, sizeof(lb->source_name));
		gv_text(&v, "version", lb->source_version, sizeof(lb->source_version));
		gv_text(&v, "method", lb->source_method, sizeof(lb->source_method));
		gv_map(&v, "parameters", lb, lb->params, &lb->n_params);
	}
	gv_map(rec, "survey_labels", lb, lb->survey, &lb->n_survey);
	return MTLZ_DECODE_OK;
}

/* Encoding: a growable byte buffer. */
struct obuf {
	uint8_t *p;
	size_t len, cap;
	int oom;
};

static uint8_t *ob_room(struct obuf *b, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		uint8_t *q;

		while (cap < b->len + n)
			cap *= 2;
		q = realloc(b->p, cap);
		if (!q) {
			b->oom = 1;
			return NULL;
		}
		b->p = q;
		b->cap = cap;
	}
	return b->p + b->len;
}

static void ob_long(struct obuf *b, int64_t v)
{
	uint8_t *p = ob_room(b, 10);

	if (p)
		b->len += put_long(p, v);
}

static void ob_bytes(struct obuf *b, const void *s, size_t n)
{
	uint8_t *p = ob_room(b, 10 + n);

	if (p)
		b->len += put_bytes(p, s, n);
}

static void ob_str(struct obuf *b, const char *s)
{
	ob_bytes(b, s, strlen(s));
}

static void ob_f64(struct obuf *b, double x)
{
	uint8_t *p = ob_room(b, 8);
	uint64_t u;

	if (!p)
		return;
	memcpy(&u, &x, 8);
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(u >> (8 * i));
	b->len += 8;
}

static void ob_opt_double(struct obuf *b, double x)
{
	if (!isfinite(x)) {
		ob_long(b, 0);
		return;
	}
	ob_long(b, 1);
	ob_f64(b, x);
}

static void ob_map(struct obuf *b, const mtlz_label_kv *kv, int n)
{
	if (n > 0) {
		ob_long(b, n);
		for (int i = 0; i < n; i++) {
			ob_str(b, kv[i].key);
			ob_str(b, kv[i].value);
		}
	}
	ob_long(b, 0);
}

static void encode_labels(struct obuf *b, const mtlz_labels *lb)
{
	if (lb->cls >= 0 && lb->cls < MTLZ_N_CLASSES) {
		ob_long(b, 1);
		ob_long(b, lb->cls);
	} else {
		ob_long(b, 0);
	}
	ob_opt_double(b, lb->oh);
	ob_opt_double(b, lb->oh_err);
	ob_opt_double(b, lb->log_mass);
	ob_opt_double(b, lb->z);
	ob_opt_double(b, lb->sn_r);
	ob_str(b, lb->source_name);
	ob_str(b, lb->source_version);
	ob_str(b, lb->source_method);
	ob_map(b, lb->params, lb->n_params);
	ob_map(b, lb->survey, lb->n_survey);
}

/* ------------------------------------------------------------------ */
/* Object-container files (archives of many spectra)                   */

#define MTLZ_AVRO_MAX_BLOCK (256u << 20)   /* bytes of one block, compressed or not */

struct cfile {
	FILE *f;
	const char *path;
	uint64_t left;              /* bytes of the file not read yet */
};

static int cf_read(struct cfile *cf, void *p, size_t n)
{
	if (n > cf->left || fread(p, 1, n, cf->f) != n)
		return -1;
	cf->left -= n;
	return 0;
}

/* Zig-zag varint; -1 at end of file or when malformed. */
static int cf_long(struct cfile *cf, int64_t *out)
{
	uint64_t v = 0;

	for (int shift = 0; shift < 64; shift += 7) {
		uint8_t b;

		if (cf_read(cf, &b, 1))
			return -1;
		v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80)) {
			*out = (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
			return 0;
		}
	}
	return -1;
}

static int cf_bytes(struct cfile *cf, char **out, size_t *len)
{
	int64_t n;

	*out = NULL;
	if (cf_long(cf, &n) || n < 0 || (uint64_t)n > cf->left ||
	    (uint64_t)n > MTLZ_AVRO_MAX_SCHEMA_BYTES)
		return -1;
	*out = malloc((size_t)n + 1);
	if (!*out || cf_read(cf, *out, (size_t)n)) {
		free(*out);
		*out = NULL;
		return -1;
	}
	(*out)[n] = '\0';
	*len = (size_t)n;
	return 0;
}

static int grow(uint8_t **buf, size_t *cap, size_t need)
{
	uint8_t *p;

	if (need <= *cap)
		return 0;
	p = realloc(*buf, need);
	if (!p)
		return -1;
	*buf = p;
	*cap = need;
	return 0;
}

/* Raw deflate (RFC 1951, as the Avro "deflate" codec) of in into *out. */
static int inflate_block(const uint8_t *in, size_t in_len, uint8_t **out, size_t *cap,
			 size_t *out_len)
{
	z_stream z;
	int zr;

	memset(&z, 0, sizeof(z));
	if (inflateInit2(&z, -15) != Z_OK)
		return -1;
	if (grow(out, cap, MTLZ_MAX(4 * in_len, (size_t)4096))) {
		inflateEnd(&z);
		return -1;
	}
	z.next_in = (Bytef *)in;
	z.avail_in = (uInt)in_len;
	*out_len = 0;
	for (;;) {
		if (*out_len == *cap &&
		    (*cap >= MTLZ_AVRO_MAX_BLOCK || grow(out, cap, MTLZ_MIN(2 * *cap,
									  (size_t)MTLZ_AVRO_MAX_BLOCK)))) {
			inflateEnd(&z);
			return -1;
		}
		z.next_out = *out + *out_len;
		z.avail_out = (uInt)(*cap - *out_len);
		zr = inflate(&z, Z_NO_FLUSH);
		*out_len = *cap - z.avail_out;
		if (zr == Z_STREAM_END)
			break;
		if (zr != Z_OK && zr != Z_BUF_ERROR) {
			inflateEnd(&z);
			return -1;
		}
		if (zr == Z_BUF_ERROR && z.avail_in == 0) {   /* input ended early */
			inflateEnd(&z);
			return -1;
		}
	}
	inflateEnd(&z);
	/* Python's avro (1.11) writes zlib.compress(data)[2:-1]: the raw stream
	 * followed by 3 bytes of the zlib trailer; other writers add nothing. */
	return z.avail_in <= 4 ? 0 : -1;
}

/* The record name of a writer schema text ("LabelledSpectrum"...), or "". */
static void schema_name(const char *text, size_t len, char *out, size_t size)
{
	json_t *root = json_loadb(text, len, JSON_DECODE_ANY, NULL);
	const char *n = json_is_object(root) ?
		json_string_value(json_object_get(root, "name")) : NULL;
	const char *dot = n ? strrchr(n, '.') : NULL;

	snprintf(out, size, "%s", dot ? dot + 1 : n ? n : "");
	json_decref(root);
}

int mtlz_avro_read_archive_file(mtlz_avro *a, const char *path,
				int (*fn)(void *opaque, const mtlz_spectrum *s,
					  const mtlz_labels *labels),
				void *opaque, char *errstr, size_t errstr_size)
{
	char rec_name[64];
	int labelled, target;
	mtlz_labels lb;
	struct cfile cf = { NULL, path, 0 };
	struct stat st;
	char magic[4], *schema = NULL, *codec = NULL, *key = NULL, *val = NULL;
	size_t schema_len = 0, codec_len = 0, kl, vl, cap = 0, zcap = 0, index = 0;
	uint8_t sync[16], bsync[16], *block = NULL, *plain = NULL;
	int use_deflate = 0, rc = MTLZ_OK, cls = 0;
	struct wschema *e;
	mtlz_spectrum s;
	int64_t count;

	mtlz_spectrum_init(&s);
	cf.f = fopen(path, "rb");
	if (!cf.f)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path, strerror(errno));
	if (fstat(fileno(cf.f), &st) || !S_ISREG(st.st_mode)) {
		fclose(cf.f);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: not a regular file", path);
	}
	cf.left = (uint64_t)st.st_size;
	if (cf_read(&cf, magic, 4) || memcmp(magic, "Obj\x01", 4) != 0) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			      "%s: not an Avro object-container file (no Obj\\x01 magic)", path);
		goto out;
	}
	for (;;) {   /* header metadata map */
		int64_t size;

		if (cf_long(&cf, &count))
			goto out_hdr;
		if (count == 0)
			break;
		if (count < 0) {
			if (count == INT64_MIN || cf_long(&cf, &size))
				goto out_hdr;
			count = -count;
		}
		if ((uint64_t)count > cf.left)
			goto out_hdr;
		for (int64_t k = 0; k < count; k++) {
			if (cf_bytes(&cf, &key, &kl) || cf_bytes(&cf, &val, &vl))
				goto out_hdr;
			if (kl == 11 && memcmp(key, "avro.schema", 11) == 0 && !schema) {
				schema = val;
				schema_len = vl;
				val = NULL;
			} else if (kl == 10 && memcmp(key, "avro.codec", 10) == 0 && !codec) {
				codec = val;
				codec_len = vl;
				val = NULL;
			}
			free(key);
			free(val);
			key = val = NULL;
		}
	}
	if (cf_read(&cf, sync, 16))
		goto out_hdr;
	if (!schema) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			      "%s: container header has no avro.schema", path);
		goto out;
	}
	if (codec && codec_len == 7 && memcmp(codec, "deflate", 7) == 0) {
		use_deflate = 1;
	} else if (codec && !(codec_len == 4 && memcmp(codec, "null", 4) == 0)) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			      "%s: container codec \"%.32s\" not supported (null, deflate)", path,
			      codec);
		goto out;
	}
	schema_name(schema, schema_len, rec_name, sizeof(rec_name));
	labelled = strcmp(rec_name, "LabelledSpectrum") == 0;
	target = labelled ? TARGET_LABELLED : TARGET_SPECTRUM;
	e = writer_lookup(a, target, KEY_TEXT, mtlz_avro_crc64(schema, schema_len),
			  schema, schema_len, &cls, errstr, errstr_size);
	if (!e) {
		char msg[400];

		snprintf(msg, sizeof(msg), "%s", errstr ? errstr : "");
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s: %s", path, msg);
		goto out;
	}
	while (cf.left > 0) {   /* data blocks */
		int64_t size;
		const uint8_t *data;
		size_t data_len;
		struct cur c;

		if (cf_long(&cf, &count) || count < 0 || cf_long(&cf, &size) || size < 0 ||
		    (uint64_t)size > cf.left || (uint64_t)size > MTLZ_AVRO_MAX_BLOCK)
			goto out_block;
		if (grow(&block, &cap, (size_t)size ? (size_t)size : 1) ||
		    cf_read(&cf, block, (size_t)size) || cf_read(&cf, bsync, 16))
			goto out_block;
		if (memcmp(bsync, sync, 16) != 0) {
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				      "%s: block sync marker mismatch before record %zu", path,
				      index);
			goto out;
		}
		data = block;
		data_len = (size_t)size;
		if (use_deflate && count > 0) {
			if (inflate_block(block, (size_t)size, &plain, &zcap, &data_len)) {
				rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					      "%s: block with record %zu does not inflate", path,
					      index);
				goto out;
			}
			data = plain;
		}
		c.p = data;
		c.end = data + data_len;
		if ((uint64_t)count > data_len)
			goto out_block;
		for (int64_t k = 0; k < count; k++, index++) {
			struct walk w = { .items_left = cur_left(&c) + MTLZ_AVRO_WALK_ITEMS };
			struct lens l = { 0, 0, 0, 0 };
			struct cur datum = c;

			if (walk_datum(e->writer, &c, &w, 0)) {
				rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s[%zu]: %s",
					      path, index, w.err);
				goto out;
			}
			datum.end = c.p;
			mtlz_spectrum_clear(&s);
			if (e->direct && a->fast_path) {
				cls = direct_spectrum_fields(&datum, &s, &l, errstr, errstr_size);
				if (!cls && labelled)
					cls = direct_labels(&datum, &lb, errstr, errstr_size);
				if (!cls)
					cls = datum_end(&datum, &s, errstr, errstr_size);
			} else {
				avro_value_t sv;

				cls = generic_read(a, e, &datum, errstr, errstr_size);
				if (!cls && labelled && gv_field(&e->reader_value, "spectrum", &sv))
					cls = mtlz_err(errstr, errstr_size, MTLZ_DECODE_AVRO,
						       "record has no spectrum field");
				else if (!cls)
					cls = generic_spectrum(labelled ? &sv : &e->reader_value,
							       &s, &l, errstr, errstr_size);
				if (!cls && labelled)
					cls = generic_labels(&e->reader_value, &lb, errstr,
							     errstr_size);
			}
			if (!cls)
				cls = spectrum_check(&s, &l, errstr, errstr_size);
			if (cls) {
				char msg[400];

				snprintf(msg, sizeof(msg), "%s", errstr ? errstr : "");
				rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					      "%s[%zu]: %s record: %s", path, index,
					      mtlz_decode_error_name(cls), msg);
				goto out;
			}
			s.n = l.flux;
			snprintf(s.source, sizeof(s.source), "%.200s[%zu]", path, index);
			rc = fn(opaque, &s, labelled ? &lb : NULL);
			if (rc)
				goto out;
		}
		if (c.p != c.end) {
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				      "%s: %zu bytes after record %zu in its block", path,
				      cur_left(&c), index ? index - 1 : 0);
			goto out;
		}
	}
	goto out;

out_hdr:
	rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
		      "%s: container header truncated or malformed", path);
	goto out;
out_block:
	rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
		      "%s: container file truncated or malformed at record %zu (byte %" PRIu64
		      " of %" PRIu64 ")", path, index, (uint64_t)st.st_size - cf.left,
		      (uint64_t)st.st_size);
out:
	mtlz_spectrum_clear(&s);
	free(key);
	free(val);
	free(schema);
	free(codec);
	free(block);
	free(plain);
	fclose(cf.f);
	return rc;
}

/* fast: zlib's Z_RLE strategy, 3x faster than the default on noisy floats
 * at about the same size (synthetic spectra), but poor on smooth or rounded
 * data (the atlas archive doubles in size), so it is a choice. */
static int deflate_block(const uint8_t *in, size_t in_len, uint8_t **out, size_t *cap,
			 size_t *out_len, int fast)
{
	z_stream z;
	size_t bound;

	memset(&z, 0, sizeof(z));
	if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -15, 8,
			 fast ? Z_RLE : Z_DEFAULT_STRATEGY) !=
	    Z_OK)
		return -1;
	bound = deflateBound(&z, (uLong)in_len);
	if (grow(out, cap, bound)) {
		deflateEnd(&z);
		return -1;
	}
	z.next_in = (Bytef *)in;
	z.avail_in = (uInt)in_len;
	z.next_out = *out;
	z.avail_out = (uInt)bound;
	if (deflate(&z, Z_FINISH) != Z_STREAM_END) {
		deflateEnd(&z);
		return -1;
	}
	*out_len = bound - z.avail_out;
	deflateEnd(&z);
	return 0;
}

struct container_adapter {
	int (*fn)(void *opaque, const mtlz_spectrum *s);
	void *opaque;
};

static int container_adapt(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	const struct container_adapter *ad = opaque;

	(void)l;
	return ad->fn(ad->opaque, s);
}

int mtlz_avro_read_container(mtlz_avro *a, const char *path,
			     int (*fn)(void *opaque, const mtlz_spectrum *s), void *opaque,
			     char *errstr, size_t errstr_size)
{
	struct container_adapter ad = { fn, opaque };

	return mtlz_avro_read_archive_file(a, path, container_adapt, &ad, errstr, errstr_size);
}

static int put_block(FILE *f, const struct ours *o, size_t count, const uint8_t *p, size_t n)
{
	uint8_t h[20];
	size_t hl = put_long(h, (int64_t)count);

	hl += put_long(h + hl, (int64_t)n);
	return fwrite(h, 1, hl, f) != hl || fwrite(p, 1, n, f) != n ||
	       fwrite(o->sync, 1, 16, f) != 16;
}

static void ob_f32_array(struct obuf *b, const float *x, size_t n)
{
	uint8_t *p;

	if (n) {
		ob_long(b, (int64_t)n);
		p = ob_room(b, 4 * n);
		if (!p)
			return;
		memcpy(p, x, 4 * n);
		b->len += 4 * n;
	}
	ob_long(b, 0);
}

/* Encodes a Spectrum datum (spectrum.avsc, field by field) straight into b:
 * the same bytes as the generic-value path of mtlz_avro_encode_spectrum,
 * about ten times faster, for the archive writer. Assumes a little-endian
 * host, as Avro's float/double encoding does. */
static void encode_spectrum_direct(struct obuf *b, const mtlz_spectrum *s)
{
	ob_bytes(b, s->spec_id, strnlen(s->spec_id, sizeof(s->spec_id)));
	ob_bytes(b, s->survey, strnlen(s->survey, sizeof(s->survey)));
	ob_long(b, !isnan(s->z));
	if (!isnan(s->z))
		ob_f64(b, s->z);
	ob_long(b, s->zwarning >= 0);
	if (s->zwarning >= 0)
		ob_long(b, s->zwarning);
	ob_long(b, !isnan(s->sn));
	if (!isnan(s->sn))
		ob_f64(b, s->sn);
	ob_long(b, s->grid_kind);
	if (s->grid_kind == MTLZ_GRID_EXPLICIT) {
		ob_long(b, (int64_t)s->n);
		for (size_t i = 0; i < s->n; i++)
			ob_f64(b, s->wave[i]);
		ob_long(b, 0);
	} else {
		ob_f64(b, s->start);
		ob_f64(b, s->step);
	}
	ob_f32_array(b, s->flux, s->n);
	ob_long(b, s->ivar != NULL);
	if (s->ivar)
		ob_f32_array(b, s->ivar, s->n);
	ob_long(b, s->and_mask != NULL);
	if (s->and_mask) {
		ob_long(b, (int64_t)s->n);
		for (size_t i = 0; i < s->n; i++)
			ob_long(b, (int32_t)s->and_mask[i]);
		ob_long(b, 0);
	}
	ob_long(b, 0);   /* metadata: {} (mtlz_spectrum carries none) */
}

struct mtlz_avro_writer {
	mtlz_avro *a;
	FILE *f;
	char *path, *tmp;
	int target, deflate, fast;
	struct obuf blk;            /* the block being filled, uncompressed */
	uint8_t *z;
	size_t zcap, in_block;
	uint64_t records;
};

#define MTLZ_AVRO_BLOCK_TARGET (4u << 20)

mtlz_avro_writer *mtlz_avro_writer_open(mtlz_avro *a, const char *path, const char *codec,
					int labelled, char *errstr, size_t errstr_size)
{
	mtlz_avro_writer *w;
	const struct ours *o = &a->ours[labelled ? TARGET_LABELLED : TARGET_SPECTRUM];
	struct obuf h = { 0 };

	if (!codec)
		codec = "null";
	if (strcmp(codec, "deflate") != 0 && strcmp(codec, "deflate-fast") != 0 &&
	    strcmp(codec, "null") != 0) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "%s: codec \"%s\" not supported (null, deflate, deflate-fast)", path,
			 codec);
		return NULL;
	}
	w = calloc(1, sizeof(*w));
	if (w) {
		w->path = strdup(path);
		w->tmp = malloc(strlen(path) + 5);
	}
	if (!w || !w->path || !w->tmp) {
		if (w) {
			free(w->path);
			free(w->tmp);
		}
		free(w);
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	sprintf(w->tmp, "%s.tmp", path);
	w->a = a;
	w->target = labelled ? TARGET_LABELLED : TARGET_SPECTRUM;
	w->deflate = strncmp(codec, "deflate", 7) == 0;
	w->fast = strcmp(codec, "deflate-fast") == 0;
	if (!ob_room(&h, 4))
		goto out_nomem;
	memcpy(h.p, "Obj\x01", 4);
	h.len = 4;
	ob_long(&h, 2);
	ob_str(&h, "avro.schema");
	ob_bytes(&h, o->text, o->text_len);
	ob_str(&h, "avro.codec");
	ob_str(&h, w->deflate ? "deflate" : "null");   /* deflate-fast is deflate */
	ob_long(&h, 0);
	if (!ob_room(&h, 16))
		goto out_nomem;
	memcpy(h.p + h.len, o->sync, 16);
	h.len += 16;
	if (h.oom)
		goto out_nomem;
	w->f = fopen(w->tmp, "wb");
	if (!w->f) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", w->tmp, strerror(errno));
		goto out_free;
	}
	if (fwrite(h.p, 1, h.len, w->f) != h.len) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: write error: %s", w->tmp,
			 strerror(errno));
		goto out_free;
	}
	free(h.p);
	return w;

out_nomem:
	mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
out_free:
	free(h.p);
	mtlz_avro_writer_abort(w);
	return NULL;
}

static int writer_flush(mtlz_avro_writer *w, char *errstr, size_t errstr_size)
{
	const uint8_t *p = w->blk.p;
	size_t len = w->blk.len;

	if (!w->in_block)
		return MTLZ_OK;
	if (w->deflate) {
		if (deflate_block(w->blk.p, w->blk.len, &w->z, &w->zcap, &len, w->fast))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "%s: deflate failed",
					w->path);
		p = w->z;
	}
	if (put_block(w->f, &w->a->ours[w->target], w->in_block, p, len))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: write error: %s", w->tmp,
				strerror(errno));
	w->in_block = 0;
	w->blk.len = 0;
	return MTLZ_OK;
}

int mtlz_avro_writer_append(mtlz_avro_writer *w, const mtlz_spectrum *s,
			    const mtlz_labels *labels, char *errstr, size_t errstr_size)
{
	if ((w->target == TARGET_LABELLED) != (labels != NULL))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"%s: labels %s for this archive", w->path,
				labels ? "not expected" : "required");
	if (!s->flux || s->n == 0 || s->n > MTLZ_AVRO_MAX_PIXELS ||
	    s->grid_kind < MTLZ_GRID_LOGLAM || s->grid_kind > MTLZ_GRID_EXPLICIT ||
	    (s->grid_kind == MTLZ_GRID_EXPLICIT && !s->wave))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"spec_id %.63s: cannot encode (n=%zu, grid kind %d)", s->spec_id,
				s->n, s->grid_kind);
	encode_spectrum_direct(&w->blk, s);
	if (labels)
		encode_labels(&w->blk, labels);
	if (w->blk.oom)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	w->in_block++;
	w->records++;
	if (w->blk.len >= MTLZ_AVRO_BLOCK_TARGET)
		return writer_flush(w, errstr, errstr_size);
	return MTLZ_OK;
}

uint64_t mtlz_avro_writer_records(const mtlz_avro_writer *w)
{
	return w->records;
}

void mtlz_avro_writer_abort(mtlz_avro_writer *w)
{
	if (!w)
		return;
	if (w->f) {
		fclose(w->f);
		unlink(w->tmp);
	}
	free(w->blk.p);
	free(w->z);
	free(w->path);
	free(w->tmp);
	free(w);
}

int mtlz_avro_writer_close(mtlz_avro_writer *w, char *errstr, size_t errstr_size)
{
	int rc = writer_flush(w, errstr, errstr_size);

	if (!rc && (fflush(w->f) || ferror(w->f)))
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: write error: %s", w->tmp,
			      strerror(errno));
	if (!rc) {
		FILE *f = w->f;

		w->f = NULL;
		if (fclose(f))
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", w->tmp,
				      strerror(errno));
		else if (rename(w->tmp, w->path))
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "rename %s: %s", w->path,
				      strerror(errno));
		if (rc)
			unlink(w->tmp);
	}
	mtlz_avro_writer_abort(w);
	return rc;
}

int mtlz_avro_write_container(mtlz_avro *a, const char *path, const mtlz_spectrum *s,
			      size_t n, const char *codec, char *errstr, size_t errstr_size)
{
	mtlz_avro_writer *w = mtlz_avro_writer_open(a, path, codec, 0, errstr, errstr_size);

	if (!w)
		return codec && strcmp(codec, "null") && strncmp(codec, "deflate", 7) ?
			MTLZ_ERR_INVALID : MTLZ_ERR_IO;
	for (size_t i = 0; i < n; i++) {
		int rc = mtlz_avro_writer_append(w, &s[i], NULL, errstr, errstr_size);

		if (rc) {
			mtlz_avro_writer_abort(w);
			return rc;
		}
	}
	return mtlz_avro_writer_close(w, errstr, errstr_size);
}
