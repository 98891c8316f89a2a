/*
 * test_safetensors.c - the safetensors reader and writer (core/safetensors.c).
 *
 * Files are built byte by byte here (mk_file: 8-byte little-endian header
 * length, JSON header, data), independently of mtlz_st_write, so the reader
 * is checked against the format and not against our own writer. Every
 * malformed case must give NULL and a message naming the problem; the suite
 * runs under ASan/UBSan in CI, so "no crash, no leak" is checked too.
 */
#define _GNU_SOURCE
#include "common.h"
#include "safetensors.h"
#include "util.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[64];

static void setup(void)
{
	tu_mkdtemp(tmpdir, sizeof(tmpdir), "st");
}

static void teardown(void)
{
	tu_rmtree(tmpdir);
}

TestSuite(safetensors, .init = setup, .fini = teardown);

static void tmp_path(char *out, size_t n, const char *name)
{
	snprintf(out, n, "%s/%s", tmpdir, name);
}

/* A safetensors image: LE u64 length of `json`, `json`, then `data`.
 * malloc'ed; *len gets its size. */
static uint8_t *mk_file(const char *json, const void *data, size_t data_len,
			size_t *len)
{
	size_t jl = strlen(json);
	uint8_t *b = malloc(8 + jl + data_len + 1);

	cr_assert_not_null(b);
	for (int i = 0; i < 8; i++)
		b[i] = (uint8_t)((uint64_t)jl >> (8 * i));
	memcpy(b + 8, json, jl);
	if (data_len)
		memcpy(b + 8 + jl, data, data_len);
	*len = 8 + jl + data_len;
	return b;
}

static void write_bytes(const char *path, const void *b, size_t n)
{
	FILE *f = fopen(path, "wb");

	cr_assert_not_null(f, "%s", path);
	cr_assert_eq(fwrite(b, 1, n, f), n);
	cr_assert_eq(fclose(f), 0);
}

static uint8_t *read_bytes(const char *path, size_t *n)
{
	FILE *f = fopen(path, "rb");
	uint8_t *b;
	long len;

	cr_assert_not_null(f, "%s", path);
	fseek(f, 0, SEEK_END);
	len = ftell(f);
	fseek(f, 0, SEEK_SET);
	b = malloc((size_t)len + 1);
	cr_assert_eq(fread(b, 1, (size_t)len, f), (size_t)len);
	fclose(f);
	*n = (size_t)len;
	return b;
}

/* Reading `json` + `data` from memory fails with a message containing
 * `want` (and the name given to the reader). */
static void expect_reject_buf(const uint8_t *b, size_t n, const char *want)
{
	char err[512] = "";
	mtlz_st *st = mtlz_st_read_mem(b, n, "case.st", err, sizeof(err));

	cr_assert_null(st, "accepted a bad file (expected '%s')", want);
	cr_assert_neq(err[0], '\0', "no error message (expected '%s')", want);
	cr_assert_not_null(strstr(err, "case.st"), "message lacks the name: %s", err);
	cr_assert_not_null(strstr(err, want), "message '%s' lacks '%s'", err, want);
}

static void expect_reject(const char *json, const void *data, size_t data_len,
			  const char *want)
{
	size_t n;
	uint8_t *b = mk_file(json, data, data_len, &n);

	expect_reject_buf(b, n, want);
	free(b);
}

/* The hand-made two-tensor file used by several tests: "idx" (I64 [3]) is
 * listed first in the JSON but stored after "w" (F32 [2,3]). */
static const char valid_json[] =
	"{\"__metadata__\":{\"format\":\"pt\",\"note\":\"z=0.1\"},"
	"\"idx\":{\"dtype\":\"I64\",\"shape\":[3],\"data_offsets\":[24,48]},"
	"\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}";

static void valid_data(uint8_t data[48])
{
	const float w[6] = { 1.0f, -2.5f, 3.25f, 0.0f, 1e-30f, -7.0f };
	const int64_t idx[3] = { 5, -1, (int64_t)1 << 40 };

	memcpy(data, w, 24);
	memcpy(data + 24, idx, 24);
}

static void check_valid(const mtlz_st *st)
{
	const mtlz_st_tensor *w, *idx;
	float fw[6];
	int64_t iv[3];

	cr_assert_eq(mtlz_st_count(st), 2);
	/* file order is data-offset order */
	cr_assert_str_eq(mtlz_st_get(st, 0)->name, "w");
	cr_assert_str_eq(mtlz_st_get(st, 1)->name, "idx");
	cr_assert_null(mtlz_st_get(st, 2));
	w = mtlz_st_find(st, "w");
	idx = mtlz_st_find(st, "idx");
	cr_assert_not_null(w);
	cr_assert_not_null(idx);
	cr_assert_null(mtlz_st_find(st, "nope"));
	cr_assert_null(mtlz_st_find(st, "__metadata__"));
	cr_assert_str_eq(w->dtype, "F32");
	cr_assert_eq(w->ndim, 2);
	cr_assert_eq(w->shape[0], 2);
	cr_assert_eq(w->shape[1], 3);
	cr_assert_eq(w->nbytes, 24);
	memcpy(fw, w->data, sizeof(fw));
	cr_assert_eq(fw[0], 1.0f);
	cr_assert_eq(fw[1], -2.5f);
	cr_assert_eq(fw[2], 3.25f);
	cr_assert_eq(fw[3], 0.0f);
	cr_assert_eq(fw[4], 1e-30f);
	cr_assert_eq(fw[5], -7.0f);
	cr_assert_str_eq(idx->dtype, "I64");
	cr_assert_eq(idx->ndim, 1);
	cr_assert_eq(idx->shape[0], 3);
	cr_assert_eq(idx->nbytes, 24);
	cr_assert_eq((const uint8_t *)idx->data - (const uint8_t *)w->data, 24);
	memcpy(iv, idx->data, sizeof(iv));
	cr_assert_eq(iv[0], 5);
	cr_assert_eq(iv[1], -1);
	cr_assert_eq(iv[2], (int64_t)1 << 40);
	cr_assert_eq(mtlz_st_meta_count(st), 2);
	cr_assert_str_eq(mtlz_st_meta(st, "format"), "pt");
	cr_assert_str_eq(mtlz_st_meta(st, "note"), "z=0.1");
	cr_assert_null(mtlz_st_meta(st, "missing"));
}

Test(safetensors, write_then_read_is_bit_exact_and_aligned)
{
	char path[512], err[512] = "";
	float a[6], b[4], c[1] = { -0.0f }, d[2 * 2 * 5];
	mtlz_st_out out[4] = {
		{ "layer.a", 2, { 2, 3 }, a },
		{ "layer.b", 1, { 4 }, b },
		{ "scalar", 0, { 0 }, c },
		{ "cube", 3, { 2, 2, 5 }, d },
	};
	const char *keys[] = { "format", "mtlz.note" };
	const char *vals[] = { "pt", "{\"quoted\":\"json\", \"x\":1}" };
	mtlz_rng r;
	mtlz_st *st;
	uint8_t *raw;
	size_t n_raw;
	uint64_t hlen = 0;
	json_t *hdr;
	json_error_t jerr;
	uint64_t expect_off = 0;

	mtlz_rng_seed(&r, 42);
	for (size_t i = 0; i < 6; i++)
		a[i] = (float)(mtlz_rng_uniform(&r) * 2 - 1);
	b[0] = NAN;
	b[1] = INFINITY;
	b[2] = 1.17549435e-38f;
	b[3] = 1.4e-45f; /* denormal */
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(d); i++)
		d[i] = (float)i * 0.1f;
	tmp_path(path, sizeof(path), "rt.safetensors");
	cr_assert_eq(mtlz_st_write(path, out, 4, keys, vals, 2, err, sizeof(err)),
		     MTLZ_OK, "%s", err);

	st = mtlz_st_read(path, err, sizeof(err));
	cr_assert_not_null(st, "%s", err);
	cr_assert_eq(mtlz_st_count(st), 4);
	for (size_t i = 0; i < 4; i++) {
		const mtlz_st_tensor *t = mtlz_st_get(st, i);
		size_t cnt = 1;

		/* offset order equals write order */
		cr_assert_str_eq(t->name, out[i].name);
		cr_assert_str_eq(t->dtype, "F32");
		cr_assert_eq(t->ndim, out[i].ndim, "%s", t->name);
		for (int k = 0; k < t->ndim; k++) {
			cr_assert_eq(t->shape[k], out[i].shape[k]);
			cnt *= (size_t)out[i].shape[k];
		}
		cr_assert_eq(t->nbytes, 4 * cnt, "%s", t->name);
		cr_assert_eq(memcmp(t->data, out[i].data, t->nbytes), 0,
			     "%s not bit-exact", t->name);
		cr_assert_eq(mtlz_st_find(st, out[i].name), t);
	}
	cr_assert_eq(mtlz_st_meta_count(st), 2);
	cr_assert_str_eq(mtlz_st_meta(st, "format"), "pt");
	cr_assert_str_eq(mtlz_st_meta(st, "mtlz.note"), vals[1]);
	mtlz_st_free(st);
	/* nothing but the target file is left behind (no temporary) */
	{
		DIR *dir = opendir(tmpdir);
		struct dirent *e;
		int n = 0;

		while ((e = readdir(dir)))
			n += e->d_name[0] != '.';
		closedir(dir);
		cr_assert_eq(n, 1, "temporary file left behind");
	}

	/* The raw layout, parsed here without the reader. */
	raw = read_bytes(path, &n_raw);
	cr_assert_geq(n_raw, 8);
	for (int i = 0; i < 8; i++)
		hlen |= (uint64_t)raw[i] << (8 * i);
	cr_assert_eq(hlen % 8, 0, "header length %llu not a multiple of 8",
		     (unsigned long long)hlen);
	cr_assert_leq(8 + hlen, n_raw);
	hdr = json_loadb((const char *)raw + 8, (size_t)hlen, 0, &jerr);
	cr_assert_not_null(hdr, "raw header: %s", jerr.text);
	cr_assert_eq(json_object_size(hdr), 5);
	cr_assert_str_eq(json_string_value(json_object_get(
				 json_object_get(hdr, "__metadata__"), "format")), "pt");
	for (size_t i = 0; i < 4; i++) {
		json_t *e = json_object_get(hdr, out[i].name);
		json_t *o = json_object_get(e, "data_offsets");
		json_t *s = json_object_get(e, "shape");
		uint64_t cnt = 1, b0, b1;

		cr_assert_not_null(e, "%s", out[i].name);
		cr_assert_str_eq(json_string_value(json_object_get(e, "dtype")), "F32");
		cr_assert_eq(json_array_size(s), (size_t)out[i].ndim);
		for (int k = 0; k < out[i].ndim; k++) {
			cr_assert_eq(json_integer_value(json_array_get(s, k)),
				     out[i].shape[k]);
			cnt *= (uint64_t)out[i].shape[k];
		}
		cr_assert_eq(json_array_size(o), 2);
		b0 = (uint64_t)json_integer_value(json_array_get(o, 0));
		b1 = (uint64_t)json_integer_value(json_array_get(o, 1));
		cr_assert_eq(b0, expect_off, "%s starts at %llu, expected %llu",
			     out[i].name, (unsigned long long)b0,
			     (unsigned long long)expect_off);
		cr_assert_eq(b1 - b0, 4 * cnt);
		cr_assert_eq(memcmp(raw + 8 + hlen + b0, out[i].data, 4 * cnt), 0);
		expect_off = b1;
	}
	cr_assert_eq(8 + hlen + expect_off, n_raw, "data buffer size");
	json_decref(hdr);
	free(raw);
}

Test(safetensors, reads_hand_made_file_from_memory_and_disk)
{
	uint8_t data[48], *b;
	size_t n;
	char err[512] = "", path[512];
	mtlz_st *st;

	valid_data(data);
	b = mk_file(valid_json, data, sizeof(data), &n);
	st = mtlz_st_read_mem(b, n, "mem", err, sizeof(err));
	cr_assert_not_null(st, "%s", err);
	check_valid(st);
	mtlz_st_free(st);

	tmp_path(path, sizeof(path), "hand.safetensors");
	write_bytes(path, b, n);
	free(b);
	st = mtlz_st_read(path, err, sizeof(err));
	cr_assert_not_null(st, "%s", err);
	check_valid(st);
	mtlz_st_free(st);
}

Test(safetensors, reads_empty_header_and_zero_size_tensor)
{
	char err[512] = "";
	size_t n;
	uint8_t *b = mk_file("{}", NULL, 0, &n);
	mtlz_st *st = mtlz_st_read_mem(b, n, "empty", err, sizeof(err));

	cr_assert_not_null(st, "%s", err);
	cr_assert_eq(mtlz_st_count(st), 0);
	cr_assert_eq(mtlz_st_meta_count(st), 0);
	mtlz_st_free(st);
	free(b);

	b = mk_file("{\"z\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[0,0]}}",
		    NULL, 0, &n);
	st = mtlz_st_read_mem(b, n, "zero", err, sizeof(err));
	cr_assert_not_null(st, "%s", err);
	cr_assert_eq(mtlz_st_get(st, 0)->nbytes, 0);
	mtlz_st_free(st);
	free(b);
}

Test(safetensors, rejects_file_shorter_than_8_bytes)
{
	const uint8_t b[7] = { 2, 0, 0, 0, 0, 0, 0 };

	for (size_t n = 0; n < sizeof(b); n++)
		expect_reject_buf(b, n, "too short");
}

Test(safetensors, rejects_header_length_larger_than_file)
{
	uint8_t data[48], *b;
	size_t n;

	valid_data(data);
	b = mk_file(valid_json, data, sizeof(data), &n);
	b[0] = 0xff;
	b[1] = 0xff; /* ~65 kB header in a ~250-byte file */
	expect_reject_buf(b, n, "header length");
	memset(b, 0xff, 8); /* 2^64 - 1: must not wrap around */
	expect_reject_buf(b, n, "header length");
	free(b);
}

Test(safetensors, rejects_header_not_json)
{
	expect_reject("{\"a\": {\"dtype\": \"F32\", ", NULL, 0, "header JSON");
	expect_reject("not json at all", NULL, 0, "header JSON");
}

Test(safetensors, rejects_header_json_not_object)
{
	expect_reject("[1, 2, 3]", NULL, 0, "not a JSON object");
}

Test(safetensors, rejects_unknown_dtype)
{
	float v = 1;

	expect_reject("{\"t\":{\"dtype\":\"F31\",\"shape\":[1],\"data_offsets\":[0,4]}}",
		      &v, 4, "unknown dtype 'F31'");
}

Test(safetensors, rejects_negative_shape_dimension)
{
	float v[2] = { 1, 2 };

	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[-2,-1],\"data_offsets\":[0,8]}}",
		      v, 8, "'t': bad shape dimension");
	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}",
		      v, 8, "'t': bad shape dimension");
}

/* 2^40 x 2^40 elements wraps to 0 in 64 bits: must be refused, not read as
 * an empty tensor that claims a huge shape. */
Test(safetensors, rejects_shape_whose_size_overflows)
{
	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[1099511627776,"
		      "1099511627776],\"data_offsets\":[0,0]}}", NULL, 0, "'t'");
	expect_reject("{\"t\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,"
		      "4294967296],\"data_offsets\":[0,0]}}", NULL, 0, "'t'");
}

Test(safetensors, rejects_offsets_end_before_begin)
{
	float v[2] = { 1, 2 };

	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}",
		      v, 8, "'t': data_offsets [8, 4]");
	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}",
		      v, 8, "'t': data_offsets");
}

Test(safetensors, rejects_offsets_beyond_truncated_buffer)
{
	uint8_t data[48], *b;
	size_t n;

	valid_data(data);
	b = mk_file(valid_json, data, sizeof(data), &n);
	expect_reject_buf(b, n - 4, "'idx': data_offsets [24, 48] outside");
	free(b);
	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":"
		      "[9223372036854775800,9223372036854775807]}}", NULL, 0,
		      "'t': data_offsets [9223372036854775800, 9223372036854775807] outside");
}

Test(safetensors, every_truncation_fails_cleanly)
{
	uint8_t data[48], *b;
	size_t n;
	char err[512], path[512];

	valid_data(data);
	b = mk_file(valid_json, data, sizeof(data), &n);
	for (size_t len = 0; len < n; len++) {
		mtlz_st *st;

		err[0] = '\0';
		st = mtlz_st_read_mem(b, len, "cut", err, sizeof(err));
		cr_assert_null(st, "truncated to %zu of %zu bytes but accepted", len, n);
		cr_assert_neq(err[0], '\0', "no message at length %zu", len);
	}
	/* and through a file */
	tmp_path(path, sizeof(path), "cut.safetensors");
	write_bytes(path, b, n - 4);
	err[0] = '\0';
	cr_assert_null(mtlz_st_read(path, err, sizeof(err)));
	cr_assert_not_null(strstr(err, path), "%s", err);
	cr_assert_not_null(strstr(err, "truncated"), "%s", err);
	free(b);
}

Test(safetensors, rejects_size_mismatch_between_shape_and_offsets)
{
	float v[3] = { 1, 2, 3 };

	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]}}",
		      v, 12, "'t': 12 bytes for 2 elements");
	/* right element count, wrong dtype width */
	expect_reject("{\"t\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,4]}}",
		      v, 4, "'t': 4 bytes for 1 elements");
}

Test(safetensors, rejects_overlapping_offsets)
{
	float v[3] = { 1, 2, 3 };

	expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
		      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
		      v, 12, "overlaps");
	/* identical ranges */
	expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
		      "\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}",
		      v, 12, "overlaps");
}

Test(safetensors, rejects_hole_between_tensors)
{
	float v[3] = { 1, 2, 3 };

	expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
		      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
		      v, 12, "4 unused bytes before tensor 'b'");
	/* a hole at the very start */
	expect_reject("{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
		      v, 12, "unused bytes before tensor 'b'");
}

Test(safetensors, rejects_trailing_bytes)
{
	uint8_t data[52];

	valid_data(data);
	memset(data + 48, 0, 4);
	expect_reject(valid_json, data, sizeof(data), "4 trailing bytes");
}

Test(safetensors, rejects_duplicate_keys)
{
	float v[2] = { 1, 2 };

	expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
		      "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
		      v, 8, "duplicate");
	expect_reject("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", NULL, 0,
		      "duplicate");
}

Test(safetensors, rejects_metadata_with_non_string_value)
{
	float v = 1;

	expect_reject("{\"__metadata__\":{\"ok\":\"x\",\"epochs\":30},"
		      "\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
		      &v, 4, "__metadata__ value of 'epochs'");
	expect_reject("{\"__metadata__\":[\"x\"]}", NULL, 0, "__metadata__");
}

Test(safetensors, rejects_tensor_entry_of_wrong_kind)
{
	float v = 1;

	expect_reject("{\"t\":[1,2]}", NULL, 0, "'t'");
	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[1]}}", &v, 4, "'t'");
	expect_reject("{\"t\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],"
		      "\"data_offsets\":[0,4]}}", &v, 4, "'t': 9 dimensions");
}

Test(safetensors, missing_file_names_the_path)
{
	char path[512], err[512] = "";

	tmp_path(path, sizeof(path), "does-not-exist.safetensors");
	cr_assert_null(mtlz_st_read(path, err, sizeof(err)));
	cr_assert_not_null(strstr(err, path), "%s", err);
	cr_assert_not_null(strstr(err, "No such file"), "%s", err);
}

/* Touches every byte the reader hands out, so ASan sees any bad pointer. */
static void walk(const mtlz_st *st)
{
	unsigned sum = 0;

	for (size_t i = 0; i < mtlz_st_count(st); i++) {
		const mtlz_st_tensor *t = mtlz_st_get(st, i);

		sum += (unsigned)strlen(t->name) + (unsigned)strlen(t->dtype);
		for (size_t j = 0; j < t->nbytes; j++)
			sum += ((const uint8_t *)t->data)[j];
	}
	for (size_t i = 0; i < mtlz_st_meta_count(st); i++) {
		const char *k, *v;

		mtlz_st_meta_at(st, i, &k, &v);
		sum += (unsigned)strlen(k) + (unsigned)strlen(v);
	}
	(void)sum;
}

Test(safetensors, random_garbage_never_crashes)
{
	mtlz_rng r;
	uint8_t buf[1024], data[48], *valid;
	size_t n_valid;
	char err[256];
	int n_ok = 0;

	mtlz_rng_seed(&r, 20240501);
	for (int it = 0; it < 200; it++) {
		size_t len = (size_t)(mtlz_rng_next(&r) % sizeof(buf));
		mtlz_st *st;

		for (size_t i = 0; i < len; i++)
			buf[i] = (uint8_t)mtlz_rng_next(&r);
		/* half of them with a plausible header length */
		if (len >= 8 && it % 2) {
			uint64_t h = mtlz_rng_next(&r) % (len - 7);

			for (int i = 0; i < 8; i++)
				buf[i] = (uint8_t)(h >> (8 * i));
			buf[8] = '{';
		}
		err[0] = '\0';
		st = mtlz_st_read_mem(buf, len, "garbage", err, sizeof(err));
		if (st) {
			walk(st);
			mtlz_st_free(st);
		} else {
			cr_assert_neq(err[0], '\0', "buffer %d: NULL without message", it);
		}
	}
	/* and 200 valid files with a few bytes flipped */
	valid_data(data);
	valid = mk_file(valid_json, data, sizeof(data), &n_valid);
	for (int it = 0; it < 200; it++) {
		mtlz_st *st;
		int flips = 1 + (int)(mtlz_rng_next(&r) % 3);

		memcpy(buf, valid, n_valid);
		for (int f = 0; f < flips; f++)
			buf[mtlz_rng_next(&r) % n_valid] = (uint8_t)mtlz_rng_next(&r);
		err[0] = '\0';
		st = mtlz_st_read_mem(buf, n_valid, "mutant", err, sizeof(err));
		if (st) {
			walk(st);
			mtlz_st_free(st);
			n_ok++;
		} else {
			cr_assert_neq(err[0], '\0', "mutant %d: NULL without message", it);
		}
	}
	free(valid);
	cr_assert_lt(n_ok, 200, "no mutant was rejected");
}
