/*
 * safetensors.h - reader and writer for the safetensors format
 * (https://github.com/huggingface/safetensors): an 8-byte little-endian
 * header length, a JSON header mapping tensor names to
 * {dtype, shape, data_offsets}, an optional "__metadata__" object of
 * string -> string, then one byte buffer holding every tensor.
 *
 * The reader trusts nothing in the file: every length, offset, shape and
 * dtype is checked before a byte of tensor data is touched, so a truncated or
 * hostile file yields an error message, never a crash. It is generic; the
 * model module (model.h) checks names and shapes against an architecture.
 */
#ifndef MTLZ_SAFETENSORS_H
#define MTLZ_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define MTLZ_ST_MAX_DIMS 8
/* A header larger than this is refused (the reference implementation uses
 * 100 MB); it bounds what a corrupt length field can make us allocate. */
#define MTLZ_ST_MAX_HEADER (100u * 1024u * 1024u)

typedef struct mtlz_st mtlz_st;

typedef struct mtlz_st_tensor {
	const char *name;
	const char *dtype;        /* "F32", "F16", "I64", ... as in the file */
	int ndim;
	int64_t shape[MTLZ_ST_MAX_DIMS];
	const void *data;         /* inside the reader's buffer; may be unaligned */
	size_t nbytes;
} mtlz_st_tensor;

/* Reads and validates `path`. On failure returns NULL and writes the reason,
 * prefixed with the path, into errstr. Free with mtlz_st_free(). */
mtlz_st *mtlz_st_read(const char *path, char *errstr, size_t errstr_size);

/* Same, from a memory buffer (copied); `name` is used in messages. */
mtlz_st *mtlz_st_read_mem(const void *buf, size_t len, const char *name,
			  char *errstr, size_t errstr_size);

void mtlz_st_free(mtlz_st *st);

size_t mtlz_st_count(const mtlz_st *st);
/* Tensors in file order of their data offsets. */
const mtlz_st_tensor *mtlz_st_get(const mtlz_st *st, size_t i);
const mtlz_st_tensor *mtlz_st_find(const mtlz_st *st, const char *name);
/* Value of a __metadata__ key, or NULL. */
const char *mtlz_st_meta(const mtlz_st *st, const char *key);
size_t mtlz_st_meta_count(const mtlz_st *st);
void mtlz_st_meta_at(const mtlz_st *st, size_t i, const char **key,
		     const char **value);

/* Writer input: F32 tensors only (all mtlz writes). */
typedef struct mtlz_st_out {
	const char *name;
	int ndim;
	int64_t shape[MTLZ_ST_MAX_DIMS];
	const float *data;
} mtlz_st_out;

/* Writes tensors (in the order given) and metadata (n_meta key/value pairs)
 * to `path` atomically: a temporary file in the same directory is written,
 * fsync'ed and renamed over `path`. */
int mtlz_st_write(const char *path, const mtlz_st_out *tensors, size_t n,
		  const char *const *meta_keys, const char *const *meta_values,
		  size_t n_meta, char *errstr, size_t errstr_size);

#endif
