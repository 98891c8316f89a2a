/*
 * safetensors.c - see safetensors.h. The header is parsed with jansson (a
 * small, well-kept JSON library that rejects duplicate keys for us).
 */
#define _POSIX_C_SOURCE 200809L
#include "safetensors.h"
#include "common.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct mtlz_st {
	uint8_t *buf;             /* whole file */
	size_t len;
	json_t *header;
	mtlz_st_tensor *tensors;
	size_t n_tensors;
	const char **meta_keys;
	const char **meta_values;
	size_t n_meta;
};

static int dtype_size(const char *dt)
{
	static const struct { const char *name; int size; } t[] = {
		{ "F64", 8 }, { "F32", 4 }, { "F16", 2 }, { "BF16", 2 },
		{ "I64", 8 }, { "I32", 4 }, { "I16", 2 }, { "I8", 1 },
		{ "U64", 8 }, { "U32", 4 }, { "U16", 2 }, { "U8", 1 },
		{ "BOOL", 1 }, { "F8_E4M3", 1 }, { "F8_E5M2", 1 },
	};
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(t); i++)
		if (strcmp(dt, t[i].name) == 0)
			return t[i].size;
	return 0;
}

void mtlz_st_free(mtlz_st *st)
{
	if (!st)
		return;
	json_decref(st->header);
	free(st->tensors);
	free(st->meta_keys);
	free(st->meta_values);
	free(st->buf);
	free(st);
}

static int cmp_offset(const void *a, const void *b)
{
	const mtlz_st_tensor *x = a, *y = b;
	const uint8_t *px = x->data, *py = y->data;

	if (px != py)
		return px < py ? -1 : 1;
	return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* Parses one tensor entry; `data` is the start of the byte buffer. */
static int parse_entry(mtlz_st_tensor *t, const char *key, json_t *v,
		       const uint8_t *data, size_t data_len, const char *name,
		       char *errstr, size_t errstr_size)
{
	json_t *dt, *shape, *offs, *e;
	size_t i;
	int64_t n = 1;
	uint64_t begin, end;
	int esz;

	t->name = key;
	if (!json_is_object(v))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: tensor '%s': entry is not an object", name, key);
	dt = json_object_get(v, "dtype");
	shape = json_object_get(v, "shape");
	offs = json_object_get(v, "data_offsets");
	if (!json_is_string(dt) || !json_is_array(shape) || !json_is_array(offs))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: tensor '%s': needs string dtype, array shape "
				"and array data_offsets", name, key);
	t->dtype = json_string_value(dt);
	esz = dtype_size(t->dtype);
	if (!esz)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: tensor '%s': unknown dtype '%s'", name, key, t->dtype);
	if (json_array_size(shape) > MTLZ_ST_MAX_DIMS)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: tensor '%s': %zu dimensions (at most %d)", name,
				key, json_array_size(shape), MTLZ_ST_MAX_DIMS);
	t->ndim = (int)json_array_size(shape);
	json_array_foreach(shape, i, e) {
		json_int_t d = json_is_integer(e) ? json_integer_value(e) : -1;

		if (d < 0 || d > ((int64_t)1 << 40))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: tensor '%s': bad shape dimension %zu",
					name, key, i);
		t->shape[i] = d;
		/* checked before multiplying: n * d could wrap to 0 */
		if (d && n > ((int64_t)1 << 40) / d)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: tensor '%s': shape too large", name, key);
		n *= d;
		if (n > ((int64_t)1 << 40))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: tensor '%s': shape too large", name, key);
	}
	if (json_array_size(offs) != 2 || !json_is_integer(json_array_get(offs, 0)) ||
	    !json_is_integer(json_array_get(offs, 1)) ||
	    json_integer_value(json_array_get(offs, 0)) < 0 ||
	    json_integer_value(json_array_get(offs, 1)) < 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: tensor '%s': data_offsets must be two "
				"non-negative integers", name, key);
	begin = (uint64_t)json_integer_value(json_array_get(offs, 0));
	end = (uint64_t)json_integer_value(json_array_get(offs, 1));
	if (end < begin || end > data_len)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: tensor '%s': data_offsets [%llu, %llu] outside "
				"the %zu-byte data buffer (file truncated?)", name,
				key, (unsigned long long)begin,
				(unsigned long long)end, data_len);
	if (end - begin != (uint64_t)n * (uint64_t)esz)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: tensor '%s': %llu bytes for %lld elements of "
				"%s", name, key, (unsigned long long)(end - begin),
				(long long)n, t->dtype);
	t->data = data + begin;
	t->nbytes = (size_t)(end - begin);
	return MTLZ_OK;
}

static int parse(mtlz_st *st, const char *name, char *errstr, size_t errstr_size)
{
	uint64_t hlen = 0;
	json_error_t jerr;
	const char *key;
	json_t *v, *meta = NULL;
	const uint8_t *data;
	size_t data_len, n = 0, i;
	int rc;

	if (st->len < 8)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: %zu bytes, too short for a safetensors file",
				name, st->len);
	for (i = 0; i < 8; i++)
		hlen |= (uint64_t)st->buf[i] << (8 * i);
	if (hlen < 2 || hlen > MTLZ_ST_MAX_HEADER || hlen > st->len - 8)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: header length %llu invalid for a %zu-byte file "
				"(truncated or not safetensors)", name,
				(unsigned long long)hlen, st->len);
	st->header = json_loadb((const char *)st->buf + 8, (size_t)hlen,
				JSON_REJECT_DUPLICATES, &jerr);
	if (!st->header)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: header JSON: %s (column %d)", name, jerr.text,
				jerr.column);
	if (!json_is_object(st->header))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"%s: header is not a JSON object", name);
	data = st->buf + 8 + hlen;
	data_len = st->len - 8 - (size_t)hlen;

	st->tensors = calloc(json_object_size(st->header) + 1, sizeof(*st->tensors));
	if (!st->tensors)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
				"%s: out of memory", name);
	json_object_foreach(st->header, key, v) {
		if (strcmp(key, "__metadata__") == 0) {
			meta = v;
			continue;
		}
		rc = parse_entry(&st->tensors[n], key, v, data, data_len, name,
				 errstr, errstr_size);
		if (rc)
			return rc;
		n++;
	}
	st->n_tensors = n;

	/* The spec: tensors may not overlap and the buffer has no holes. */
	qsort(st->tensors, n, sizeof(*st->tensors), cmp_offset);
	{
		const uint8_t *pos = data;

		for (i = 0; i < n; i++) {
			const uint8_t *b = st->tensors[i].data;

			if (b < pos)
				return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
						"%s: tensor '%s' overlaps tensor '%s'",
						name, st->tensors[i].name,
						st->tensors[i - 1].name);
			if (b > pos)
				return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
						"%s: %zu unused bytes before tensor '%s'",
						name, (size_t)(b - pos), st->tensors[i].name);
			pos = b + st->tensors[i].nbytes;
		}
		if (pos != data + data_len)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: %zu trailing bytes after the last tensor",
					name, (size_t)(data + data_len - pos));
	}

	if (meta) {
		if (!json_is_object(meta))
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: __metadata__ is not an object", name);
		st->meta_keys = calloc(json_object_size(meta) + 1, sizeof(char *));
		st->meta_values = calloc(json_object_size(meta) + 1, sizeof(char *));
		if (!st->meta_keys || !st->meta_values)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM,
					"%s: out of memory", name);
		json_object_foreach(meta, key, v) {
			if (!json_is_string(v))
				return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
						"%s: __metadata__ value of '%s' is not "
						"a string", name, key);
			st->meta_keys[st->n_meta] = key;
			st->meta_values[st->n_meta++] = json_string_value(v);
		}
	}
	return MTLZ_OK;
}

mtlz_st *mtlz_st_read_mem(const void *buf, size_t len, const char *name,
			  char *errstr, size_t errstr_size)
{
	mtlz_st *st = calloc(1, sizeof(*st));

	if (!st || !(st->buf = malloc(len ? len : 1))) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "%s: out of memory", name);
		free(st);
		return NULL;
	}
	memcpy(st->buf, buf, len);
	st->len = len;
	if (parse(st, name, errstr, errstr_size) != MTLZ_OK) {
		mtlz_st_free(st);
		return NULL;
	}
	return st;
}

mtlz_st *mtlz_st_read(const char *path, char *errstr, size_t errstr_size)
{
	FILE *f = fopen(path, "rb");
	mtlz_st *st = NULL;
	uint8_t *buf = NULL;
	long len;

	if (!f) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path, strerror(errno));
		return NULL;
	}
	if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 ||
	    fseek(f, 0, SEEK_SET) != 0) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: cannot seek: %s",
			 path, strerror(errno));
		goto out_close;
	}
	buf = malloc((size_t)len + 1);
	if (!buf) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "%s: out of memory", path);
		goto out_close;
	}
	if (fread(buf, 1, (size_t)len, f) != (size_t)len) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: short read", path);
		goto out_free_buf;
	}
	st = calloc(1, sizeof(*st));
	if (!st) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "%s: out of memory", path);
		goto out_free_buf;
	}
	st->buf = buf;
	st->len = (size_t)len;
	buf = NULL;
	if (parse(st, path, errstr, errstr_size) != MTLZ_OK) {
		mtlz_st_free(st);
		st = NULL;
	}
out_free_buf:
	free(buf);
out_close:
	fclose(f);
	return st;
}

size_t mtlz_st_count(const mtlz_st *st) { return st->n_tensors; }

const mtlz_st_tensor *mtlz_st_get(const mtlz_st *st, size_t i)
{
	return i < st->n_tensors ? &st->tensors[i] : NULL;
}

const mtlz_st_tensor *mtlz_st_find(const mtlz_st *st, const char *name)
{
	for (size_t i = 0; i < st->n_tensors; i++)
		if (strcmp(st->tensors[i].name, name) == 0)
			return &st->tensors[i];
	return NULL;
}

const char *mtlz_st_meta(const mtlz_st *st, const char *key)
{
	for (size_t i = 0; i < st->n_meta; i++)
		if (strcmp(st->meta_keys[i], key) == 0)
			return st->meta_values[i];
	return NULL;
}

size_t mtlz_st_meta_count(const mtlz_st *st) { return st->n_meta; }

void mtlz_st_meta_at(const mtlz_st *st, size_t i, const char **key,
		     const char **value)
{
	*key = i < st->n_meta ? st->meta_keys[i] : NULL;
	*value = i < st->n_meta ? st->meta_values[i] : NULL;
}

int mtlz_st_write(const char *path, const mtlz_st_out *tensors, size_t n,
		  const char *const *meta_keys, const char *const *meta_values,
		  size_t n_meta, char *errstr, size_t errstr_size)
{
	json_t *hdr = json_object(), *meta = NULL;
	char *js = NULL, tmp[4096];
	size_t jlen, padded, off = 0, i;
	uint8_t lenbuf[8];
	FILE *f = NULL;
	int rc = MTLZ_ERR_NOMEM;

	if (!hdr)
		goto out;
	if (n_meta) {
		meta = json_object();
		if (!meta)
			goto out;
		for (i = 0; i < n_meta; i++) {
			json_t *v = json_string(meta_values[i]);

			/* NULL for invalid UTF-8 */
			if (!v || json_object_set_new(meta, meta_keys[i], v)) {
				json_decref(meta);
				rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					      "%s: metadata '%s' is not valid UTF-8",
					      path, meta_keys[i]);
				goto out;
			}
		}
		json_object_set_new(hdr, "__metadata__", meta);
	}
	for (i = 0; i < n; i++) {
		if (strcmp(tensors[i].name, "__metadata__") == 0 ||
		    json_object_get(hdr, tensors[i].name)) {
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				      "%s: tensor name '%s' reserved or repeated",
				      path, tensors[i].name);
			goto out;
		}
	}
	for (i = 0; i < n; i++) {
		json_t *e = json_object(), *shape = json_array();
		size_t cnt = 1;

		for (int d = 0; d < tensors[i].ndim; d++) {
			json_array_append_new(shape, json_integer(tensors[i].shape[d]));
			cnt *= (size_t)tensors[i].shape[d];
		}
		json_object_set_new(e, "dtype", json_string("F32"));
		json_object_set_new(e, "shape", shape);
		json_object_set_new(e, "data_offsets",
				    json_pack("[II]", (json_int_t)off,
					      (json_int_t)(off + 4 * cnt)));
		json_object_set_new(hdr, tensors[i].name, e);
		off += 4 * cnt;
	}
	js = json_dumps(hdr, JSON_COMPACT);
	if (!js)
		goto out;
	jlen = strlen(js);
	padded = (jlen + 7) & ~(size_t)7; /* keeps the data 8-byte aligned */
	for (i = 0; i < 8; i++)
		lenbuf[i] = (uint8_t)((uint64_t)padded >> (8 * i));

	if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid()) >=
	    (int)sizeof(tmp)) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			      "%s: path too long", path);
		goto out;
	}
	f = fopen(tmp, "wb");
	if (!f) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", tmp,
			      strerror(errno));
		goto out;
	}
	rc = MTLZ_ERR_IO;
	if (fwrite(lenbuf, 1, 8, f) != 8 || fwrite(js, 1, jlen, f) != jlen)
		goto out_write;
	for (i = jlen; i < padded; i++)
		if (fputc(' ', f) == EOF)
			goto out_write;
	for (i = 0; i < n; i++) {
		size_t cnt = 1;

		for (int d = 0; d < tensors[i].ndim; d++)
			cnt *= (size_t)tensors[i].shape[d];
		/* Little-endian host assumed (checked in model.c at startup). */
		if (fwrite(tensors[i].data, 4, cnt, f) != cnt)
			goto out_write;
	}
	if (fflush(f) != 0 || fsync(fileno(f)) != 0)
		goto out_write;
	if (fclose(f) != 0) {
		f = NULL;
		goto out_write;
	}
	f = NULL;
	if (rename(tmp, path) != 0) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: rename: %s",
			      path, strerror(errno));
		unlink(tmp);
		goto out;
	}
	rc = MTLZ_OK;
	goto out;
out_write:
	rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: write failed: %s",
		      tmp, strerror(errno));
	if (f)
		fclose(f);
	unlink(tmp);
out:
	free(js);
	json_decref(hdr);
	return rc;
}
