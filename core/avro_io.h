/*
 * avro_io.h - Avro (Avro C 1.11) encoding and decoding of the messages the
 * daemon reads and writes, with the schemas in the .avsc files in schemas/ as the
 * contract:
 *   spectrum.avsc  what a reduction pipeline publishes (-> mtlz_spectrum)
 *   result.avsc    what mtlzd publishes (mtlz_result_rec)
 *
 * Input framings, detected per message (mtlz_framing_detect):
 *   - Confluent wire format: 0x00 + 4-byte big-endian schema id; the
 *     writer schema is <schema_dir>/<id>.avsc,
 *   - Avro single-object encoding: 0xC3 0x01 + 8-byte little-endian
 *     CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form,
 *   - an Avro object-container file per message ("Obj\x01" magic; ZTF style).
 * Writer -> reader schema resolution goes through Avro C's resolved readers,
 * so a pipeline may publish an older or newer compatible spectrum schema.
 *
 * @locality one mtlz_avro per thread (it owns reusable Avro values and
 * buffers); none of it is thread-safe.
 */
#ifndef MTLZ_AVRO_IO_H
#define MTLZ_AVRO_IO_H

#include "labels.h"
#include "spectrum.h"

#include <stddef.h>
#include <stdint.h>

enum mtlz_framing {
	MTLZ_FRAMING_UNKNOWN = 0,
	MTLZ_FRAMING_CONFLUENT = 1,
	MTLZ_FRAMING_SINGLE_OBJECT = 2,
	MTLZ_FRAMING_CONTAINER = 3,
};

/* Dead-letter reason classes (header "mtlz.error.class"). */
enum mtlz_decode_error {
	MTLZ_DECODE_OK = 0,
	MTLZ_DECODE_FRAMING,     /* no known framing / truncated header */
	MTLZ_DECODE_SCHEMA,      /* unknown schema id / fingerprint, or incompatible schema */
	MTLZ_DECODE_AVRO,        /* bytes do not decode under the writer schema */
	MTLZ_DECODE_INVALID,     /* decodes, but the content is unusable (lengths, NaN grid...) */
	MTLZ_DECODE_OVERSIZE,    /* larger than input.max_message_bytes */
};

typedef struct mtlz_result_rec {
	char spec_id[64];
	int cls;                    /* 0 passive, 1 star_forming, 2 composite, 3 agn */
	float prob[4];
	int has_metal;              /* oh / oh_sigma present (null otherwise) */
	double oh, oh_sigma;
	uint32_t flags;             /* enum mtlz_flag bits */
	char model_sha256[65];
	char model_version[64];
	char source_topic[256];
	int32_t source_partition;
	int64_t source_offset;
	int64_t processed_us;       /* timestamp-micros */
} mtlz_result_rec;

typedef struct mtlz_avro mtlz_avro;

/* Loads spectrum.avsc and result.avsc from schemas_dir (the project's
 * schemas/ folder, installed with the daemon). registry_dir (may be NULL)
 * holds writer schemas for the Confluent framing as <id>.avsc. */
mtlz_avro *mtlz_avro_new(const char *schemas_dir, const char *registry_dir,
			 char *errstr, size_t errstr_size);
void mtlz_avro_free(mtlz_avro *a);

const char *mtlz_framing_name(int framing);
int mtlz_framing_parse(const char *name);        /* -1 if unknown */
int mtlz_framing_detect(const void *buf, size_t len);
const char *mtlz_decode_error_name(int err);     /* "framing", "schema", ... */

/* Decodes one input message (any framing) into *s (cleared first; owns its
 * arrays afterwards). Returns MTLZ_DECODE_OK or a reason class, with a
 * detail message in errstr. */
int mtlz_avro_decode_spectrum(mtlz_avro *a, const void *buf, size_t len,
			      mtlz_spectrum *s, char *errstr, size_t errstr_size);
/* Encodes *s under spectrum.avsc in the given framing into a malloc'ed
 * buffer (for mtlz-replay and tests). confluent_id is used for CONFLUENT. */
int mtlz_avro_encode_spectrum(mtlz_avro *a, const mtlz_spectrum *s, int framing,
			      int32_t confluent_id, uint8_t **buf, size_t *len,
			      char *errstr, size_t errstr_size);

/* Encodes a result under result.avsc; the buffer is owned by `a` and valid
 * until the next call. */
int mtlz_avro_encode_result(mtlz_avro *a, const mtlz_result_rec *r, int framing,
			    int32_t confluent_id, const uint8_t **buf, size_t *len,
			    char *errstr, size_t errstr_size);
int mtlz_avro_decode_result(mtlz_avro *a, const void *buf, size_t len,
			    mtlz_result_rec *r, char *errstr, size_t errstr_size);

/* CRC-64-AVRO fingerprint of the Parsing Canonical Form of result.avsc /
 * spectrum.avsc (also sent as a Kafka header). */
uint64_t mtlz_avro_result_fingerprint(const mtlz_avro *a);
uint64_t mtlz_avro_spectrum_fingerprint(const mtlz_avro *a);

/* ---- Additions (implementation helpers also used by tests and tools) ---- */

/* mtlz_framing_parse("auto") returns MTLZ_FRAMING_UNKNOWN (0): decoding
 * always detects the framing per message. */

/* Makes decode_* return MTLZ_DECODE_OVERSIZE for messages longer than
 * max_bytes (0, the default: no limit). */
void mtlz_avro_set_max_message_bytes(mtlz_avro *a, size_t max_bytes);
/* on (default): spectra written with exactly spectrum.avsc (same Parsing
 * Canonical Form) are decoded by a direct decoder; off: always through
 * Avro C generic values (tests compare the two). */
void mtlz_avro_set_fast_path(mtlz_avro *a, int on);

/* CRC-64-AVRO (Rabin) of a byte string. @locality any thread */
uint64_t mtlz_avro_crc64(const void *buf, size_t len);
/* Parsing Canonical Form of a schema given as JSON text, malloc'ed and
 * NUL-terminated in *out. MTLZ_OK, MTLZ_ERR_FORMAT or MTLZ_ERR_NOMEM.
 * @locality any thread */
int mtlz_avro_canonical_form(const char *json, size_t len, char **out,
			     char *errstr, size_t errstr_size);
/* CRC-64-AVRO of the Parsing Canonical Form of a schema's JSON text (what
 * single-object encoding carries, little-endian). @locality any thread */
int mtlz_avro_fingerprint(const char *json, size_t len, uint64_t *fp,
			  char *errstr, size_t errstr_size);

/* ---- Archives: Avro object-container files of many spectra ---- */

/* Streams every record of the object-container file at `path` (block by
 * block; never the whole file in memory), written with spectrum.avsc or a
 * compatible writer schema, codec "null" or "deflate". Each record is
 * checked against the writer schema before Avro C reads it, resolved to our
 * schema like a message (fast path included) and validated; fn gets each
 * spectrum (source "<path>[<index>]"; *s and its arrays are valid only during
 * the call: copy what you keep). An invalid or undecodable record is an
 * error (not skipped): MTLZ_ERR_FORMAT naming "<path>[<index>]", after fn
 * has seen the records before it. Stops when fn returns non-zero and returns
 * that value. MTLZ_OK; MTLZ_ERR_IO (cannot open/read) or MTLZ_ERR_FORMAT
 * (not a container, truncated, corrupt, unknown codec, incompatible
 * schema), with errstr naming the file. */
int mtlz_avro_read_container(mtlz_avro *a, const char *path,
			     int (*fn)(void *opaque, const mtlz_spectrum *s), void *opaque,
			     char *errstr, size_t errstr_size);
/* Writes n spectra as one object-container file under spectrum.avsc, codec
 * "null" (NULL too) or "deflate", in blocks of about 4 MB. MTLZ_OK, or
 * MTLZ_ERR_INVALID / MTLZ_ERR_IO / MTLZ_ERR_NOMEM (the file is removed). */
int mtlz_avro_write_container(mtlz_avro *a, const char *path, const mtlz_spectrum *s,
			      size_t n, const char *codec, char *errstr, size_t errstr_size);

/* Like mtlz_avro_read_container, for archive files of either
 * spectrum.avsc or labelled_spectrum.avsc records (told by the writer
 * schema's record name): fn gets labels = NULL for plain spectra. A labelled
 * writer schema may add or drop top-level label fields that have defaults. */
int mtlz_avro_read_archive_file(mtlz_avro *a, const char *path,
				int (*fn)(void *opaque, const mtlz_spectrum *s,
					  const mtlz_labels *labels),
				void *opaque, char *errstr, size_t errstr_size);

/* Streaming writer of one object-container file, block by block (about
 * 4 MB before compression), into "<path>.tmp", renamed to path by close()
 * so that readers never see half a file. labelled: records of
 * labelled_spectrum.avsc (append() needs labels) rather than spectrum.avsc.
 * codec: "null", "deflate", or "deflate-fast" (the same deflate codec in the
 * file, compressed with zlib's Z_RLE strategy: 3x faster on noisy floats,
 * worse on smooth data). Records are encoded directly (the same bytes as
 * mtlz_avro_encode_spectrum's datum; little-endian host). */
typedef struct mtlz_avro_writer mtlz_avro_writer;

mtlz_avro_writer *mtlz_avro_writer_open(mtlz_avro *a, const char *path, const char *codec,
					int labelled, char *errstr, size_t errstr_size);
int mtlz_avro_writer_append(mtlz_avro_writer *w, const mtlz_spectrum *s,
			    const mtlz_labels *labels, char *errstr, size_t errstr_size);
uint64_t mtlz_avro_writer_records(const mtlz_avro_writer *w);
/* Writes the last block, closes and renames; frees w in every case. */
int mtlz_avro_writer_close(mtlz_avro_writer *w, char *errstr, size_t errstr_size);
/* Drops the file (the temporary one); frees w. Accepts NULL. */
void mtlz_avro_writer_abort(mtlz_avro_writer *w);

#endif
