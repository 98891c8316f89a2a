/*
 * test_avro_io.c - the Avro contract (the .avsc files in schemas/) and its codec:
 * framing detection, CRC-64-AVRO fingerprints against the Avro test-suite
 * values and an independent implementation (Debian's python3-avro), round
 * trips of spectra and results in all three framings (through the direct
 * fast path and through Avro C generic values), results read back with
 * nothing but result.avsc (plain Avro C, and Python when available),
 * writer -> reader resolution, and hostile input (truncations, random and
 * mutated bytes) that must never crash and never decode as OK by accident.
 */
#define _GNU_SOURCE /* memmem */
#include "avro_io.h"
#include "common.h"
#include "fits_io.h"
#include "preprocess.h"
#include "spectrum.h"

#include <avro.h>
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <dirent.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SCHEMAS MTLZ_SOURCE_DIR "/schemas"
#define PY "/usr/bin/python3"

static char regdir[64];
static mtlz_avro *av;
static char err[512];

static void write_file(const char *dir, const char *name, const void *buf, size_t len)
{
	char path[512];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "wb");
	cr_assert(f, "cannot write %s", path);
	cr_assert_eq(fwrite(buf, 1, len, f), len);
	fclose(f);
}

static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long n;

	cr_assert(f, "cannot read %s", path);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = malloc((size_t)n + 1);
	cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
	buf[n] = '\0';
	fclose(f);
	if (len)
		*len = (size_t)n;
	return buf;
}

static void copy_schema(const char *file, const char *as)
{
	char path[512], *s;
	size_t n;

	snprintf(path, sizeof(path), "%s/%s", SCHEMAS, file);
	s = slurp(path, &n);
	write_file(regdir, as, s, n);
	free(s);
}

static void setup(void)
{
	snprintf(regdir, sizeof(regdir), "/tmp/mtlz-avro-XXXXXX");
	cr_assert(mkdtemp(regdir));
	/* The registry: our own schemas under Confluent ids 1 and 2. */
	copy_schema("spectrum.avsc", "1.avsc");
	copy_schema("result.avsc", "2.avsc");
	av = mtlz_avro_new(SCHEMAS, regdir, err, sizeof(err));
	cr_assert(av, "%s", err);
}

static void teardown(void)
{
	DIR *d = opendir(regdir);
	struct dirent *de;
	char path[512];

	mtlz_avro_free(av);
	while (d && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", regdir, de->d_name);
		unlink(path);
	}
	if (d)
		closedir(d);
	rmdir(regdir);
}

TestSuite(avro_io, .init = setup, .fini = teardown);

static const int framings[3] = { MTLZ_FRAMING_CONFLUENT, MTLZ_FRAMING_SINGLE_OBJECT,
				 MTLZ_FRAMING_CONTAINER };

/* ------------------------------------------------------------------ */

Test(avro_io, framing_detect)
{
	static const uint8_t conf[] = { 0x00, 0, 0, 0, 7, 2, 'a' };
	static const uint8_t so[] = { 0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0 };
	static const uint8_t obj[] = { 'O', 'b', 'j', 0x01, 0 };
	static const uint8_t junk[] = { 'O', 'b', 'j', 0x02, 0 };

	cr_assert_eq(mtlz_framing_detect(conf, sizeof(conf)), MTLZ_FRAMING_CONFLUENT);
	cr_assert_eq(mtlz_framing_detect(conf, 4), MTLZ_FRAMING_UNKNOWN);
	cr_assert_eq(mtlz_framing_detect(so, sizeof(so)), MTLZ_FRAMING_SINGLE_OBJECT);
	cr_assert_eq(mtlz_framing_detect(so, 9), MTLZ_FRAMING_UNKNOWN);
	cr_assert_eq(mtlz_framing_detect(obj, sizeof(obj)), MTLZ_FRAMING_CONTAINER);
	cr_assert_eq(mtlz_framing_detect(obj, 3), MTLZ_FRAMING_UNKNOWN);
	cr_assert_eq(mtlz_framing_detect(junk, sizeof(junk)), MTLZ_FRAMING_UNKNOWN);
	cr_assert_eq(mtlz_framing_detect("{\"a\":1}", 7), MTLZ_FRAMING_UNKNOWN);
	cr_assert_eq(mtlz_framing_detect(NULL, 0), MTLZ_FRAMING_UNKNOWN);
	cr_assert_eq(mtlz_framing_detect(so, 0), MTLZ_FRAMING_UNKNOWN);

	for (int i = 0; i < 3; i++)
		cr_assert_eq(mtlz_framing_parse(mtlz_framing_name(framings[i])), framings[i]);
	cr_assert_eq(mtlz_framing_parse("single_object"), MTLZ_FRAMING_SINGLE_OBJECT);
	cr_assert_eq(mtlz_framing_parse("auto"), MTLZ_FRAMING_UNKNOWN);
	cr_assert_eq(mtlz_framing_parse("protobuf"), -1);
	cr_assert_str_eq(mtlz_decode_error_name(MTLZ_DECODE_SCHEMA), "schema");
	cr_assert_str_eq(mtlz_decode_error_name(MTLZ_DECODE_OVERSIZE), "oversize");
}

/* From the Avro test suite (share/test/data/schema-tests.txt), as signed
 * 64-bit decimals there. */
Test(avro_io, crc64_known_values)
{
	static const struct { const char *s; int64_t fp; } t[] = {
		{ "\"null\"", INT64_C(7195948357588979594) },
		{ "\"int\"", INT64_C(8247732601305521295) },
		{ "\"long\"", INT64_C(-3434872931120570953) },
		{ "\"string\"", INT64_C(-8142146995180207161) },
	};
	uint64_t fp;

	cr_assert_eq(mtlz_avro_crc64("\"int\"", 5), UINT64_C(0x7275d51a3f395c8f));
	cr_assert_eq(mtlz_avro_crc64("\"string\"", 8), UINT64_C(0x8f014872634503c7));
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(t); i++) {
		cr_assert_eq(mtlz_avro_crc64(t[i].s, strlen(t[i].s)), (uint64_t)t[i].fp, "%s", t[i].s);
		/* The same through the canonical form of a non-canonical spelling. */
		char obj[64];

		snprintf(obj, sizeof(obj), " { \"type\" : %s, \"doc\": \"x\" } ", t[i].s);
		cr_assert_eq(mtlz_avro_fingerprint(obj, strlen(obj), &fp, err, sizeof(err)), MTLZ_OK,
			     "%s", err);
		cr_assert_eq(fp, (uint64_t)t[i].fp, "%s", obj);
	}
}

Test(avro_io, canonical_form_rules)
{
	static const struct { const char *in, *pcf; } t[] = {
		{ "{\"type\":\"long\",\"logicalType\":\"timestamp-micros\"}", "\"long\"" },
		{ "[\"null\", {\"type\": \"string\"}]", "[\"null\",\"string\"]" },
		{ "{\"type\":\"fixed\",\"name\":\"F\",\"namespace\":\"x.y\",\"size\":16,"
		  "\"aliases\":[\"G\"]}",
		  "{\"name\":\"x.y.F\",\"type\":\"fixed\",\"size\":16}" },
		{ "{\"doc\":\"d\",\"fields\":[{\"type\":{\"type\":\"enum\",\"name\":\"E\","
		  "\"symbols\":[\"A\",\"B\"],\"default\":\"A\"},\"name\":\"e\",\"default\":\"A\"},"
		  "{\"name\":\"e2\",\"type\":\"E\"},{\"name\":\"o\",\"type\":\"other.E\"},"
		  "{\"name\":\"m\",\"type\":{\"values\":{\"type\":\"array\",\"items\":\"int\"},"
		  "\"type\":\"map\"}}],"
		  "\"name\":\"R\",\"namespace\":\"ns\",\"type\":\"record\"}",
		  "{\"name\":\"ns.R\",\"type\":\"record\",\"fields\":["
		  "{\"name\":\"e\",\"type\":{\"name\":\"ns.E\",\"type\":\"enum\",\"symbols\":[\"A\",\"B\"]}},"
		  "{\"name\":\"e2\",\"type\":\"ns.E\"},{\"name\":\"o\",\"type\":\"other.E\"},"
		  "{\"name\":\"m\",\"type\":{\"type\":\"map\",\"values\":{\"type\":\"array\",\"items\":\"int\"}}}]}" },
		/* A nested named type with its own namespace changes the enclosing one. */
		{ "{\"type\":\"record\",\"name\":\"a.R\",\"fields\":[{\"name\":\"s\",\"type\":"
		  "{\"type\":\"record\",\"name\":\"S\",\"namespace\":\"b\",\"fields\":"
		  "[{\"name\":\"t\",\"type\":{\"type\":\"fixed\",\"name\":\"T\",\"size\":1}}]}},"
		  "{\"name\":\"u\",\"type\":{\"type\":\"fixed\",\"name\":\"T\",\"size\":2}}]}",
		  "{\"name\":\"a.R\",\"type\":\"record\",\"fields\":[{\"name\":\"s\",\"type\":"
		  "{\"name\":\"b.S\",\"type\":\"record\",\"fields\":[{\"name\":\"t\",\"type\":"
		  "{\"name\":\"b.T\",\"type\":\"fixed\",\"size\":1}}]}},"
		  "{\"name\":\"u\",\"type\":{\"name\":\"a.T\",\"type\":\"fixed\",\"size\":2}}]}" },
	};
	char *out;

	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(t); i++) {
		cr_assert_eq(mtlz_avro_canonical_form(t[i].in, strlen(t[i].in), &out, err,
						      sizeof(err)), MTLZ_OK, "%s", err);
		cr_assert_str_eq(out, t[i].pcf);
		free(out);
	}
	cr_assert_eq(mtlz_avro_canonical_form("{\"a\":", 5, &out, err, sizeof(err)),
		     MTLZ_ERR_FORMAT);
	cr_assert_eq(mtlz_avro_canonical_form("{\"name\":\"x\"}", 12, &out, err, sizeof(err)),
		     MTLZ_ERR_FORMAT);
	cr_assert_null(out);
}

static int have_python_avro(void)
{
	return access(PY, X_OK) == 0 &&
	       system(PY " -c 'import avro.schema, avro.io, avro.datafile' 2>/dev/null") == 0;
}

/* python3-avro 1.11.1 computes the canonical form, not the fingerprint:
 * the third-party reader script does the CRC-64-AVRO over it. */
static const char py_fp[] =
	PY " " MTLZ_SOURCE_DIR "/tests/third_party_reader.py fingerprint %s %s";

Test(avro_io, fingerprint_matches_python_avro)
{
	char cmd[2048];
	uint64_t fp[2];
	FILE *p;

	if (!have_python_avro()) {
		cr_log_warn("python3-avro missing: independent fingerprint check skipped");
		return;
	}
	snprintf(cmd, sizeof(cmd), py_fp, SCHEMAS "/spectrum.avsc", SCHEMAS "/result.avsc");
	p = popen(cmd, "r");
	cr_assert(p);
	cr_assert_eq(fscanf(p, "%" SCNx64 " %" SCNx64, &fp[0], &fp[1]), 2);
	cr_assert_eq(pclose(p), 0);
	cr_assert_eq(mtlz_avro_spectrum_fingerprint(av), fp[0], "%016" PRIx64 " vs python %016" PRIx64,
		     mtlz_avro_spectrum_fingerprint(av), fp[0]);
	cr_assert_eq(mtlz_avro_result_fingerprint(av), fp[1], "%016" PRIx64 " vs python %016" PRIx64,
		     mtlz_avro_result_fingerprint(av), fp[1]);
}

/* ------------------------------------------------------------------ */
/* Spectra                                                             */

static void make_spectrum(mtlz_spectrum *s, int kind, int ivar, int mask, size_t n)
{
	mtlz_spectrum_init(s);
	cr_assert_eq(mtlz_spectrum_alloc(s, n, ivar, mask, kind == MTLZ_GRID_EXPLICIT), MTLZ_OK);
	snprintf(s->spec_id, sizeof(s->spec_id), "299489677444933632-k%d", kind);
	snprintf(s->survey, sizeof(s->survey), "%s", kind == MTLZ_GRID_LINEAR ? "desi" : "sdss");
	s->grid_kind = kind;
	s->start = kind == MTLZ_GRID_LOGLAM ? 3.5797 : 3600.0;
	s->step = kind == MTLZ_GRID_LOGLAM ? 1e-4 : 0.8;
	if (kind != MTLZ_GRID_LINEAR) {
		s->z = 0.0724;
		s->sn = 11.25;
		s->zwarning = 4;
	}
	for (size_t i = 0; i < n; i++) {
		if (s->wave)
			s->wave[i] = 3800.0 + 1.25 * (double)i + 1e-9 * (double)(i * i);
		s->flux[i] = (float)(1.0 + 0.5 * sin(0.01 * (double)i)) * 1e-17f * 1e17f;
		if (s->ivar)
			s->ivar[i] = i % 7 == 0 ? 0.0f : 0.25f + (float)i;
		if (s->and_mask)
			/* multi-byte varints, one-byte ones of both signs, zero */
			s->and_mask[i] = i % 5 == 0 ? 0x80000001u | (uint32_t)i << 8 :
					 i % 5 == 1 ? (uint32_t)(i % 64) :
					 i % 5 == 2 ? (uint32_t)-(int32_t)(i % 65) : 0;
	}
	if (n > 3) {
		s->flux[3] = NAN;      /* not a decode error: preprocessing handles it */
		s->flux[2] = -INFINITY;
	}
}

static void assert_same_float(const float *a, const float *b, size_t n, const char *what)
{
	cr_assert((a == NULL) == (b == NULL), "%s presence", what);
	if (a)
		cr_assert_eq(memcmp(a, b, n * sizeof(float)), 0, "%s differs", what);
}

static void assert_same_spectrum(const mtlz_spectrum *a, const mtlz_spectrum *b)
{
	cr_assert_str_eq(a->spec_id, b->spec_id);
	cr_assert_str_eq(a->survey, b->survey);
	cr_assert_eq(a->n, b->n);
	cr_assert_eq(a->grid_kind, b->grid_kind);
	cr_assert(isnan(a->z) ? isnan(b->z) : a->z == b->z, "z %g vs %g", a->z, b->z);
	cr_assert(isnan(a->sn) ? isnan(b->sn) : a->sn == b->sn, "sn %g vs %g", a->sn, b->sn);
	cr_assert_eq(a->zwarning, b->zwarning);
	if (a->grid_kind == MTLZ_GRID_EXPLICIT) {
		cr_assert(b->wave);
		cr_assert_eq(memcmp(a->wave, b->wave, a->n * sizeof(double)), 0, "wave differs");
	} else {
		cr_assert_null(b->wave);
		cr_assert_eq(a->start, b->start);
		cr_assert_eq(a->step, b->step);
	}
	assert_same_float(a->flux, b->flux, a->n, "flux");
	assert_same_float(a->ivar, b->ivar, a->n, "ivar");
	cr_assert((a->and_mask == NULL) == (b->and_mask == NULL), "mask presence");
	if (a->and_mask)
		cr_assert_eq(memcmp(a->and_mask, b->and_mask, a->n * sizeof(uint32_t)), 0,
			     "mask differs");
}

static uint8_t *encode(const mtlz_spectrum *s, int framing, size_t *len)
{
	uint8_t *buf;

	cr_assert_eq(mtlz_avro_encode_spectrum(av, s, framing, 1, &buf, len, err, sizeof(err)),
		     MTLZ_OK, "%s", err);
	cr_assert_eq(mtlz_framing_detect(buf, *len), framing);
	return buf;
}

Test(avro_io, spectrum_round_trip)
{
	for (int fast = 0; fast < 2; fast++) {
		mtlz_avro_set_fast_path(av, fast);
		for (int kind = 0; kind < 3; kind++)
			for (int opt = 0; opt < 4; opt++)
				for (int fr = 0; fr < 3; fr++) {
					mtlz_spectrum s, d;
					uint8_t *buf;
					size_t len;

					make_spectrum(&s, kind, opt & 1, opt & 2, 4000 + (size_t)kind);
					buf = encode(&s, framings[fr], &len);
					mtlz_spectrum_init(&d);
					cr_assert_eq(mtlz_avro_decode_spectrum(av, buf, len, &d, err,
									       sizeof(err)),
						     MTLZ_DECODE_OK, "kind %d opt %d %s fast %d: %s",
						     kind, opt, mtlz_framing_name(framings[fr]), fast,
						     err);
					assert_same_spectrum(&s, &d);
					free(buf);
					mtlz_spectrum_clear(&s);
					mtlz_spectrum_clear(&d);
				}
	}
}

/* What fits_io makes of SDSS/BOSS spec files and a DESI coadd survives the
 * contract unchanged (all but `source`, which the daemon fills). */
Test(avro_io, sdss_and_desi_fixtures_round_trip, .timeout = 60)
{
	static const char *files[] = { "spec-0266-51602-0001.fits", "spec-3586-55181-0003.fits",
				       "coadd-4-80613.fits" };

	for (size_t f = 0; f < MTLZ_ARRAY_SIZE(files); f++) {
		char path[512];
		mtlz_spectra sp = { 0 };

		snprintf(path, sizeof(path), "%s/%s", MTLZ_TEST_DATA, files[f]);
		cr_assert_eq(mtlz_fits_read(path, &sp, err, sizeof(err)), MTLZ_OK, "%s", err);
		for (size_t i = 0; i < sp.n; i++) {
			mtlz_spectrum d;
			uint8_t *buf;
			size_t len;

			buf = encode(&sp.v[i], MTLZ_FRAMING_SINGLE_OBJECT, &len);
			mtlz_spectrum_init(&d);
			cr_assert_eq(mtlz_avro_decode_spectrum(av, buf, len, &d, err, sizeof(err)),
				     MTLZ_DECODE_OK, "%s[%zu]: %s", files[f], i, err);
			assert_same_spectrum(&sp.v[i], &d);
			free(buf);
			mtlz_spectrum_clear(&d);
		}
		mtlz_spectra_free(&sp);
	}
}

Test(avro_io, spectrum_single_pixel_and_unknowns)
{
	mtlz_spectrum s, d;
	uint8_t *buf;
	size_t len;

	make_spectrum(&s, MTLZ_GRID_LINEAR, 0, 0, 1);
	s.z = NAN;
	s.sn = NAN;
	s.zwarning = -1;
	buf = encode(&s, MTLZ_FRAMING_SINGLE_OBJECT, &len);
	mtlz_spectrum_init(&d);
	cr_assert_eq(mtlz_avro_decode_spectrum(av, buf, len, &d, err, sizeof(err)),
		     MTLZ_DECODE_OK, "%s", err);
	assert_same_spectrum(&s, &d);
	cr_assert(isnan(d.z) && isnan(d.sn) && d.zwarning == -1);
	free(buf);
	mtlz_spectrum_clear(&s);
	mtlz_spectrum_clear(&d);
}

Test(avro_io, encode_rejects_bad_spectrum)
{
	mtlz_spectrum s;
	uint8_t *buf;
	size_t len;

	make_spectrum(&s, MTLZ_GRID_LOGLAM, 0, 0, 10);
	cr_assert_eq(mtlz_avro_encode_spectrum(av, &s, MTLZ_FRAMING_UNKNOWN, 1, &buf, &len, err,
					       sizeof(err)), MTLZ_ERR_INVALID);
	cr_assert_eq(mtlz_avro_encode_spectrum(av, &s, MTLZ_FRAMING_CONFLUENT, -1, &buf, &len,
					       err, sizeof(err)), MTLZ_ERR_INVALID);
	s.grid_kind = MTLZ_GRID_EXPLICIT;   /* without wave */
	cr_assert_eq(mtlz_avro_encode_spectrum(av, &s, MTLZ_FRAMING_CONFLUENT, 1, &buf, &len,
					       err, sizeof(err)), MTLZ_ERR_INVALID);
	cr_assert_null(buf);
	mtlz_spectrum_clear(&s);
}

/* A datum of our schema, built with plain Avro C, so content the encoder
 * refuses (mismatched lengths, NaN grid) can be tested. */
static uint8_t *raw_spectrum(const char *schema_file, int32_t id, size_t n_flux,
			     size_t n_ivar, double start, const char *spec_id, size_t *len)
{
	char path[512], *json = NULL;
	size_t jl, size;
	avro_schema_t sc;
	avro_value_iface_t *ifc;
	avro_value_t v, f, b, x;
	avro_writer_t w;
	uint8_t *buf;

	snprintf(path, sizeof(path), "%s", schema_file);
	json = slurp(path, &jl);
	cr_assert_eq(avro_schema_from_json_length(json, jl, &sc), 0, "%s", avro_strerror());
	free(json);
	ifc = avro_generic_class_from_schema(sc);
	cr_assert_eq(avro_generic_value_new(ifc, &v), 0);
	avro_value_get_by_name(&v, "spec_id", &f, NULL);
	avro_value_set_string(&f, spec_id);
	avro_value_get_by_name(&v, "survey", &f, NULL);
	avro_value_set_string(&f, "a-much-too-long-survey-name");
	if (avro_value_get_by_name(&v, "redshift", &f, NULL) == 0) {
		avro_value_set_branch(&f, 1, &b);
		if (avro_value_get_type(&b) == AVRO_FLOAT)
			avro_value_set_float(&b, 0.125f);
		else
			avro_value_set_double(&b, 0.125);
	}
	if (avro_value_get_by_name(&v, "zwarning", &f, NULL) == 0) {
		avro_value_set_branch(&f, 0, &b);
		avro_value_set_null(&b);
	}
	if (avro_value_get_by_name(&v, "sn_median", &f, NULL) == 0) {
		avro_value_set_branch(&f, 0, &b);
		avro_value_set_null(&b);
	}
	if (avro_value_get_by_name(&v, "legacy_note", &f, NULL) == 0)
		avro_value_set_string(&f, "written by an old pipeline");
	avro_value_get_by_name(&v, "wavelength", &f, NULL);
	avro_value_set_branch(&f, 1, &b);
	avro_value_get_by_name(&b, "start", &x, NULL);
	avro_value_set_double(&x, start);
	avro_value_get_by_name(&b, "step", &x, NULL);
	avro_value_set_double(&x, 0.8);
	avro_value_get_by_name(&v, "flux", &f, NULL);
	for (size_t i = 0; i < n_flux; i++) {
		avro_value_append(&f, &x, NULL);
		avro_value_set_float(&x, (float)i);
	}
	avro_value_get_by_name(&v, "ivar", &f, NULL);
	avro_value_set_branch(&f, n_ivar ? 1 : 0, &b);
	if (n_ivar)
		for (size_t i = 0; i < n_ivar; i++) {
			avro_value_append(&b, &x, NULL);
			avro_value_set_float(&x, 2.0f);
		}
	else
		avro_value_set_null(&b);
	if (avro_value_get_by_name(&v, "mask", &f, NULL) == 0) {
		avro_value_set_branch(&f, 0, &b);
		avro_value_set_null(&b);
	}
	cr_assert_eq(avro_value_sizeof(&v, &size), 0);
	buf = malloc(5 + size);
	buf[0] = 0;
	buf[1] = buf[2] = buf[3] = 0;
	buf[4] = (uint8_t)id;
	w = avro_writer_memory((const char *)buf + 5, (int64_t)size);
	cr_assert_eq(avro_value_write(w, &v), 0, "%s", avro_strerror());
	avro_writer_free(w);
	avro_value_decref(&v);
	avro_value_iface_decref(ifc);
	avro_schema_decref(sc);
	*len = 5 + size;
	return buf;
}

static void expect_decode(const uint8_t *buf, size_t len, int want, const char *what)
{
	mtlz_spectrum d;
	int rc;

	mtlz_spectrum_init(&d);
	rc = mtlz_avro_decode_spectrum(av, buf, len, &d, err, sizeof(err));
	cr_assert_eq(rc, want, "%s: got %s (%s), want %s", what, mtlz_decode_error_name(rc), err,
		     mtlz_decode_error_name(want));
	if (rc)
		cr_assert(d.flux == NULL && d.ivar == NULL && d.wave == NULL && d.and_mask == NULL);
	mtlz_spectrum_clear(&d);
}

Test(avro_io, invalid_content)
{
	const char *sp = SCHEMAS "/spectrum.avsc";
	uint8_t *buf;
	size_t len;

	for (int fast = 0; fast < 2; fast++) {
		mtlz_avro_set_fast_path(av, fast);
		buf = raw_spectrum(sp, 1, 100, 100, 3600.0, "ok", &len);
		expect_decode(buf, len, MTLZ_DECODE_OK, "valid");
		free(buf);
		buf = raw_spectrum(sp, 1, 100, 99, 3600.0, "ivar-short", &len);
		expect_decode(buf, len, MTLZ_DECODE_INVALID, "ivar length");
		free(buf);
		buf = raw_spectrum(sp, 1, 0, 0, 3600.0, "empty", &len);
		expect_decode(buf, len, MTLZ_DECODE_INVALID, "empty flux");
		free(buf);
		buf = raw_spectrum(sp, 1, 10, 0, NAN, "nan-start", &len);
		expect_decode(buf, len, MTLZ_DECODE_INVALID, "NaN start");
		free(buf);
		buf = raw_spectrum(sp, 1, 10, 0, INFINITY, "inf-start", &len);
		expect_decode(buf, len, MTLZ_DECODE_INVALID, "Inf start");
		free(buf);
		buf = raw_spectrum(sp, 1, 10, 0, 3600.0, "", &len);
		expect_decode(buf, len, MTLZ_DECODE_INVALID, "empty spec_id");
		free(buf);
		buf = raw_spectrum(sp, 1, 10, 0, 3600.0,
				   "0123456789012345678901234567890123456789012345678901234567890123",
				   &len);
		expect_decode(buf, len, MTLZ_DECODE_INVALID, "64-byte spec_id");
		free(buf);
	}
}

Test(avro_io, survey_truncated_not_rejected)
{
	mtlz_spectrum d;
	uint8_t *buf;
	size_t len;

	buf = raw_spectrum(SCHEMAS "/spectrum.avsc", 1, 10, 0, 3600.0, "x", &len);
	mtlz_spectrum_init(&d);
	cr_assert_eq(mtlz_avro_decode_spectrum(av, buf, len, &d, err, sizeof(err)),
		     MTLZ_DECODE_OK, "%s", err);
	cr_assert_str_eq(d.survey, "a-much-too-long");
	cr_assert_eq(d.z, 0.125);
	mtlz_spectrum_clear(&d);
	free(buf);
}

/* An older pipeline's schema: no zwarning/sn_median/mask/metadata, a float
 * redshift (promoted to double), fields in another order, and an extra
 * field the reader ignores. */
static const char old_schema[] =
	"{\"type\":\"record\",\"name\":\"Spectrum\",\"namespace\":\"survey.v1\",\"fields\":["
	"{\"name\":\"survey\",\"type\":\"string\"},"
	"{\"name\":\"spec_id\",\"type\":\"string\"},"
	"{\"name\":\"legacy_note\",\"type\":\"string\"},"
	"{\"name\":\"redshift\",\"type\":[\"null\",\"float\"]},"
	"{\"name\":\"wavelength\",\"type\":["
	" {\"type\":\"record\",\"name\":\"LogLinearGrid\",\"fields\":[{\"name\":\"log10_start\",\"type\":\"double\"},{\"name\":\"log10_step\",\"type\":\"double\"}]},"
	" {\"type\":\"record\",\"name\":\"LinearGrid\",\"fields\":[{\"name\":\"start\",\"type\":\"double\"},{\"name\":\"step\",\"type\":\"double\"}]}]},"
	"{\"name\":\"flux\",\"type\":{\"type\":\"array\",\"items\":\"float\"}},"
	"{\"name\":\"ivar\",\"type\":[\"null\",{\"type\":\"array\",\"items\":\"float\"}]}]}";

static void check_old(const uint8_t *buf, size_t len, const char *what)
{
	mtlz_spectrum d;

	mtlz_spectrum_init(&d);
	cr_assert_eq(mtlz_avro_decode_spectrum(av, buf, len, &d, err, sizeof(err)),
		     MTLZ_DECODE_OK, "%s: %s", what, err);
	cr_assert_str_eq(d.spec_id, "old-1");
	cr_assert_str_eq(d.survey, "a-much-too-long");
	cr_assert_eq(d.z, 0.125);           /* float 0.125 promoted exactly */
	cr_assert(isnan(d.sn));
	cr_assert_eq(d.zwarning, -1);
	cr_assert_eq(d.grid_kind, MTLZ_GRID_LINEAR);
	cr_assert_eq(d.start, 3600.0);
	cr_assert_eq(d.step, 0.8);
	cr_assert_eq(d.n, 50);
	cr_assert_eq(d.flux[49], 49.0f);
	cr_assert(d.ivar && d.ivar[0] == 2.0f);
	cr_assert_null(d.and_mask);
	mtlz_spectrum_clear(&d);
}

Test(avro_io, older_writer_schema_resolves)
{
	char path[512];
	uint8_t *buf, *so;
	size_t len;
	uint64_t fp;
	mtlz_avro *b;

	/* Confluent: id 42 -> <registry>/42.avsc. */
	write_file(regdir, "42.avsc", old_schema, strlen(old_schema));
	snprintf(path, sizeof(path), "%s/42.avsc", regdir);
	buf = raw_spectrum(path, 42, 50, 50, 3600.0, "old-1", &len);
	check_old(buf, len, "confluent");
	check_old(buf, len, "confluent, cached");

	/* Single-object: the registry dir was scanned when `b` was made. */
	b = av;
	av = mtlz_avro_new(SCHEMAS, regdir, err, sizeof(err));
	cr_assert(av, "%s", err);
	cr_assert_eq(mtlz_avro_fingerprint(old_schema, strlen(old_schema), &fp, err, sizeof(err)),
		     MTLZ_OK);
	so = malloc(len + 5);
	so[0] = 0xC3;
	so[1] = 0x01;
	for (int i = 0; i < 8; i++)
		so[2 + i] = (uint8_t)(fp >> (8 * i));
	memcpy(so + 10, buf + 5, len - 5);
	check_old(so, len + 5, "single-object");
	/* ... and through the generic path too (always, for a foreign schema). */
	mtlz_avro_set_fast_path(av, 0);
	check_old(so, len + 5, "single-object, generic");
	mtlz_avro_free(av);
	av = b;
	free(so);
	free(buf);
}

Test(avro_io, registry_rescanned_for_new_fingerprint)
{
	static const char v2[] =
		"{\"type\":\"record\",\"name\":\"Spectrum\",\"fields\":["
		"{\"name\":\"spec_id\",\"type\":\"string\"},{\"name\":\"survey\",\"type\":\"string\"},"
		"{\"name\":\"wavelength\",\"type\":[\"mtlz.LogLinearGrid\"]},"
		"{\"name\":\"flux\",\"type\":{\"type\":\"array\",\"items\":\"float\"}}]}";
	uint8_t msg[64] = { 0xC3, 0x01 };
	uint64_t fp;
	size_t n = 10;

	/* A schema referencing an undefined type is not Avro: SCHEMA error. */
	cr_assert_eq(mtlz_avro_fingerprint(v2, strlen(v2), &fp, err, sizeof(err)), MTLZ_OK);
	for (int i = 0; i < 8; i++)
		msg[2 + i] = (uint8_t)(fp >> (8 * i));
	msg[n++] = 2;
	msg[n++] = 'x';
	expect_decode(msg, n, MTLZ_DECODE_SCHEMA, "unknown fingerprint");
}

Test(avro_io, incompatible_writer_schemas)
{
	static const char *const bad[] = {
		/* flux of strings */
		"{\"type\":\"record\",\"name\":\"Spectrum\",\"fields\":["
		"{\"name\":\"spec_id\",\"type\":\"string\"},{\"name\":\"survey\",\"type\":\"string\"},"
		"{\"name\":\"wavelength\",\"type\":[{\"type\":\"record\",\"name\":\"LinearGrid\",\"fields\":"
		"[{\"name\":\"start\",\"type\":\"double\"},{\"name\":\"step\",\"type\":\"double\"}]}]},"
		"{\"name\":\"flux\",\"type\":{\"type\":\"array\",\"items\":\"string\"}}]}",
		/* no spec_id (no default in ours) */
		"{\"type\":\"record\",\"name\":\"Spectrum\",\"fields\":["
		"{\"name\":\"survey\",\"type\":\"string\"},"
		"{\"name\":\"wavelength\",\"type\":[{\"type\":\"record\",\"name\":\"LinearGrid\",\"fields\":"
		"[{\"name\":\"start\",\"type\":\"double\"},{\"name\":\"step\",\"type\":\"double\"}]}]},"
		"{\"name\":\"flux\",\"type\":{\"type\":\"array\",\"items\":\"float\"}}]}",
		/* a grid record without a field of ours, inside a union (Avro C
		 * 1.11 crashes resolving this one unless it is refused first) */
		"{\"type\":\"record\",\"name\":\"Spectrum\",\"fields\":["
		"{\"name\":\"spec_id\",\"type\":\"string\"},{\"name\":\"survey\",\"type\":\"string\"},"
		"{\"name\":\"wavelength\",\"type\":[{\"type\":\"record\",\"name\":\"LinearGrid\",\"fields\":"
		"[{\"name\":\"start\",\"type\":\"double\"},{\"name\":\"stride\",\"type\":\"double\"}]}]},"
		"{\"name\":\"flux\",\"type\":{\"type\":\"array\",\"items\":\"float\"}}]}",
		/* a named type defined twice (invalid; Avro C leaks on it) */
		"{\"type\":\"record\",\"name\":\"Spectrum\",\"fields\":["
		"{\"name\":\"a\",\"type\":{\"type\":\"fixed\",\"name\":\"F\",\"size\":1}},"
		"{\"name\":\"b\",\"type\":{\"type\":\"fixed\",\"name\":\"F\",\"size\":2}}]}",
		/* another record name */
		"{\"type\":\"record\",\"name\":\"Alert\",\"fields\":[{\"name\":\"spec_id\",\"type\":\"string\"}]}",
		/* not a record at all */
		"\"string\"",
		/* not Avro */
		"{\"type\":\"record\",\"name\":\"Spectrum\",\"fields\":[{\"name\":\"x\",\"type\":\"nosuch\"}]}",
		"this is not json",
	};
	uint8_t msg[16] = { 0x00, 0, 0, 0, 0, 2, 'a', 2, 'b', 0, 0 };
	char name[32];

	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(bad); i++) {
		snprintf(name, sizeof(name), "%zu.avsc", 100 + i);
		write_file(regdir, name, bad[i], strlen(bad[i]));
		msg[4] = (uint8_t)(100 + i);
		expect_decode(msg, 11, MTLZ_DECODE_SCHEMA, bad[i]);
		expect_decode(msg, 11, MTLZ_DECODE_SCHEMA, "cached failure");
		cr_assert(strstr(err, name), "message names the schema file: %s", err);
	}
	msg[4] = 99;   /* no such file */
	expect_decode(msg, 11, MTLZ_DECODE_SCHEMA, "unknown confluent id");
}

Test(avro_io, confluent_schema_cached)
{
	mtlz_spectrum s;
	uint8_t *buf;
	size_t len;
	char path[512];

	make_spectrum(&s, MTLZ_GRID_LOGLAM, 1, 1, 300);
	buf = encode(&s, MTLZ_FRAMING_CONFLUENT, &len);
	expect_decode(buf, len, MTLZ_DECODE_OK, "first");
	snprintf(path, sizeof(path), "%s/1.avsc", regdir);
	cr_assert_eq(unlink(path), 0);
	for (int i = 0; i < 100; i++)
		expect_decode(buf, len, MTLZ_DECODE_OK, "cached");
	copy_schema("spectrum.avsc", "1.avsc");
	free(buf);
	mtlz_spectrum_clear(&s);
}

/* More distinct container schemas than the cache holds: the LRU entry is
 * evicted and rebuilt on demand. */
/* Our schema's text with a different doc string: the same canonical form,
 * so a distinct container-cache entry that still takes the fast path. */
static int doc_variant(char *out, size_t size, int tag)
{
	char *json = slurp(SCHEMAS "/spectrum.avsc", NULL);
	const char *at = strstr(json, "\"doc\": \"");
	int n;

	cr_assert(at);
	n = snprintf(out, size, "%.*s\"doc\": \"variant %d, %s", (int)(at - json), json, tag,
		     at + 8);
	free(json);
	cr_assert_lt((size_t)n, size);
	return n;
}

static size_t put_varint(uint8_t *p, uint64_t v)
{
	size_t n = 0;
	uint64_t z = v << 1;   /* zig-zag of a non-negative value */

	while (z > 0x7f) {
		p[n++] = (uint8_t)(z | 0x80);
		z >>= 7;
	}
	p[n++] = (uint8_t)z;
	return n;
}

/* A container file around datum d built by hand (so the header's schema
 * text and sync marker are ours to choose). */
static uint8_t *container(const char *schema, size_t sl, const uint8_t *d, size_t dl,
			  size_t *len)
{
	uint8_t *m = malloc(sl + dl + 128);
	size_t n = 0;

	memcpy(m, "Obj\x01", 4);
	n = 4;
	n += put_varint(m + n, 2);
	n += put_varint(m + n, 11);
	memcpy(m + n, "avro.schema", 11);
	n += 11;
	n += put_varint(m + n, sl);
	memcpy(m + n, schema, sl);
	n += sl;
	n += put_varint(m + n, 10);
	memcpy(m + n, "avro.codec", 10);
	n += 10;
	n += put_varint(m + n, 4);
	memcpy(m + n, "null", 4);
	n += 4;
	m[n++] = 0;
	memset(m + n, 0xAB, 16);
	n += 16;
	n += put_varint(m + n, 1);
	n += put_varint(m + n, dl);
	memcpy(m + n, d, dl);
	n += dl;
	memset(m + n, 0xAB, 16);
	n += 16;
	*len = n;
	return m;
}

/* More distinct container schemas than the cache holds (64): least
 * recently used entries are evicted and rebuilt on demand. */
Test(avro_io, container_schema_cache_eviction)
{
	static char schema[8192];
	mtlz_spectrum s;
	uint8_t *conf, *m;
	size_t len, ml;

	make_spectrum(&s, MTLZ_GRID_LINEAR, 0, 0, 64);
	conf = encode(&s, MTLZ_FRAMING_CONFLUENT, &len);
	for (int i = 0; i < 200; i++) {
		int sl = doc_variant(schema, sizeof(schema), i % 70);

		m = container(schema, (size_t)sl, conf + 5, len - 5, &ml);
		expect_decode(m, ml, MTLZ_DECODE_OK, "container with a doc variant");
		m[ml - 1] ^= 1;
		expect_decode(m, ml, MTLZ_DECODE_AVRO, "sync marker mismatch");
		free(m);
	}
	/* Codecs other than null are refused, not misread. */
	m = container(schema, strlen(schema), conf + 5, len - 5, &ml);
	memcpy((uint8_t *)memmem(m, ml, "avro.codec", 10) + 11, "zstd", 4);
	expect_decode(m, ml, MTLZ_DECODE_AVRO, "zstd codec");
	free(m);
	free(conf);
	mtlz_spectrum_clear(&s);
}

Test(avro_io, oversize)
{
	mtlz_spectrum s;
	uint8_t *buf;
	size_t len;

	make_spectrum(&s, MTLZ_GRID_LOGLAM, 1, 0, 1000);
	buf = encode(&s, MTLZ_FRAMING_SINGLE_OBJECT, &len);
	mtlz_avro_set_max_message_bytes(av, len - 1);
	expect_decode(buf, len, MTLZ_DECODE_OVERSIZE, "one byte over");
	mtlz_avro_set_max_message_bytes(av, len);
	expect_decode(buf, len, MTLZ_DECODE_OK, "at the limit");
	free(buf);
	mtlz_spectrum_clear(&s);
}

/* ------------------------------------------------------------------ */
/* Hostile bytes                                                       */

Test(avro_io, truncated_messages_rejected)
{
	for (int fast = 0; fast < 2; fast++) {
		mtlz_avro_set_fast_path(av, fast);
		for (int fr = 0; fr < 3; fr++) {
			mtlz_spectrum s;
			uint8_t *buf;
			size_t len;

			make_spectrum(&s, fr, 1, 1, 40);
			buf = encode(&s, framings[fr], &len);
			for (size_t n = 0; n < len; n++) {
				/* A copy of exactly n bytes, so ASan sees any over-read. */
				uint8_t *t = malloc(n ? n : 1);
				mtlz_spectrum d;

				memcpy(t, buf, n);
				mtlz_spectrum_init(&d);
				cr_assert_neq(mtlz_avro_decode_spectrum(av, t, n, &d, err, sizeof(err)),
					      MTLZ_DECODE_OK, "%s truncated to %zu of %zu bytes",
					      mtlz_framing_name(framings[fr]), n, len);
				cr_assert_null(d.flux);
				free(t);
			}
			free(buf);
			mtlz_spectrum_clear(&s);
		}
	}
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint32_t)(rng_state >> 11);
}

Test(avro_io, random_bytes_rejected)
{
	uint64_t fp = mtlz_avro_spectrum_fingerprint(av);

	for (int i = 0; i < 500; i++) {
		size_t n = rnd() % 300;
		uint8_t *b = malloc(n ? n : 1);
		mtlz_spectrum d;

		for (size_t k = 0; k < n; k++)
			b[k] = (uint8_t)rnd();
		/* A third get a valid header, to get past the framing. */
		if (i % 3 == 1 && n >= 5) {
			b[0] = 0;
			b[1] = b[2] = b[3] = 0;
			b[4] = 1;
		} else if (i % 3 == 2 && n >= 10) {
			b[0] = 0xC3;
			b[1] = 0x01;
			for (int k = 0; k < 8; k++)
				b[2 + k] = (uint8_t)(fp >> (8 * k));
		}
		mtlz_spectrum_init(&d);
		cr_assert_neq(mtlz_avro_decode_spectrum(av, b, n, &d, err, sizeof(err)),
			      MTLZ_DECODE_OK, "random message %d decoded", i);
		free(b);
	}
}

/* Random byte flips in valid messages: any outcome but a crash, and an
 * OK decode must satisfy the contract's invariants. */
Test(avro_io, mutated_messages_never_crash)
{
	int n_ok = 0, n_bad = 0;

	for (int fast = 0; fast < 2; fast++) {
		mtlz_avro_set_fast_path(av, fast);
		for (int fr = 0; fr < 3; fr++) {
			mtlz_spectrum s;
			uint8_t *buf;
			size_t len;

			make_spectrum(&s, (fr + 1) % 3, 1, 1, 30);
			buf = encode(&s, framings[fr], &len);
			for (int i = 0; i < 1500; i++) {
				uint8_t *m = malloc(len);
				mtlz_spectrum d;
				int flips = 1 + (int)(rnd() % 3);

				memcpy(m, buf, len);
				for (int k = 0; k < flips; k++)
					m[rnd() % len] ^= (uint8_t)(1u << (rnd() % 8));
				mtlz_spectrum_init(&d);
				if (mtlz_avro_decode_spectrum(av, m, len, &d, err, sizeof(err)) ==
				    MTLZ_DECODE_OK) {
					n_ok++;
					cr_assert(d.n >= 1 && d.n <= 1000000 && d.flux);
					cr_assert(d.spec_id[0]);
					if (d.grid_kind == MTLZ_GRID_EXPLICIT)
						cr_assert(d.wave);
					else
						cr_assert(isfinite(d.start) && isfinite(d.step));
				} else {
					n_bad++;
				}
				mtlz_spectrum_clear(&d);
				free(m);
			}
			free(buf);
			mtlz_spectrum_clear(&s);
		}
	}
	cr_log_info("mutations: %d decoded, %d rejected", n_ok, n_bad);
	cr_assert_gt(n_bad, 0);
}

/* ------------------------------------------------------------------ */
/* Results                                                             */

static void make_result(mtlz_result_rec *r, int metal)
{
	memset(r, 0, sizeof(*r));
	snprintf(r->spec_id, sizeof(r->spec_id), "39627745431636871");
	r->cls = metal ? 1 : 3;
	r->prob[0] = 0.0625f;
	r->prob[1] = metal ? 0.75f : 0.0625f;
	r->prob[2] = 0.125f;
	r->prob[3] = metal ? 0.0625f : 0.75f;
	r->has_metal = metal;
	r->oh = metal ? 8.71 : 0.0;
	r->oh_sigma = metal ? 0.043 : 0.0;
	r->flags = MTLZ_FLAG_BLUE_SHORT | MTLZ_FLAG_LOW_SN;
	snprintf(r->model_sha256, sizeof(r->model_sha256), "%064x", 0xabcdef);
	snprintf(r->model_version, sizeof(r->model_version), "mtlz-cnn-1.2.0");
	snprintf(r->source_topic, sizeof(r->source_topic), "desi.spectra.v1");
	r->source_partition = 7;
	r->source_offset = INT64_C(123456789012);
	r->processed_us = INT64_C(1718000000123456);
}

static void assert_same_result(const mtlz_result_rec *a, const mtlz_result_rec *b)
{
	cr_assert_str_eq(a->spec_id, b->spec_id);
	cr_assert_eq(a->cls, b->cls);
	for (int i = 0; i < 4; i++)
		cr_assert_eq(a->prob[i], b->prob[i]);
	cr_assert_eq(a->has_metal, b->has_metal);
	if (a->has_metal) {
		cr_assert_eq(a->oh, b->oh);
		cr_assert_eq(a->oh_sigma, b->oh_sigma);
	} else {
		cr_assert(isnan(b->oh) && isnan(b->oh_sigma));
	}
	cr_assert_eq(a->flags, b->flags);
	cr_assert_str_eq(a->model_sha256, b->model_sha256);
	cr_assert_str_eq(a->model_version, b->model_version);
	cr_assert_str_eq(a->source_topic, b->source_topic);
	cr_assert_eq(a->source_partition, b->source_partition);
	cr_assert_eq(a->source_offset, b->source_offset);
	cr_assert_eq(a->processed_us, b->processed_us);
}

Test(avro_io, result_round_trip)
{
	for (int metal = 0; metal < 2; metal++)
		for (int fr = 0; fr < 3; fr++) {
			mtlz_result_rec r, d;
			const uint8_t *buf;
			size_t len;

			make_result(&r, metal);
			cr_assert_eq(mtlz_avro_encode_result(av, &r, framings[fr], 2, &buf, &len, err,
							     sizeof(err)), MTLZ_OK, "%s", err);
			cr_assert_eq(mtlz_framing_detect(buf, len), framings[fr]);
			cr_assert_eq(mtlz_avro_decode_result(av, buf, len, &d, err, sizeof(err)),
				     MTLZ_DECODE_OK, "%s: %s", mtlz_framing_name(framings[fr]), err);
			assert_same_result(&r, &d);
			/* A result is not a spectrum. */
			expect_decode(buf, len, MTLZ_DECODE_SCHEMA, "result as spectrum");
		}
}

Test(avro_io, result_buffer_owned_and_reused)
{
	mtlz_result_rec r;
	const uint8_t *b1, *b2;
	size_t l1, l2;

	make_result(&r, 1);
	cr_assert_eq(mtlz_avro_encode_result(av, &r, MTLZ_FRAMING_CONTAINER, 0, &b1, &l1, err,
					     sizeof(err)), MTLZ_OK);
	cr_assert_eq(mtlz_avro_encode_result(av, &r, MTLZ_FRAMING_SINGLE_OBJECT, 0, &b2, &l2, err,
					     sizeof(err)), MTLZ_OK);
	cr_assert_eq(b1, b2, "the smaller message reuses the buffer");
	r.cls = 4;
	cr_assert_eq(mtlz_avro_encode_result(av, &r, MTLZ_FRAMING_SINGLE_OBJECT, 0, &b2, &l2, err,
					     sizeof(err)), MTLZ_ERR_INVALID);
}

/* The contract is the schema file: plain Avro C, nothing of mtlz_avro. */
Test(avro_io, result_readable_with_schema_file_only)
{
	mtlz_result_rec r;
	const uint8_t *buf;
	size_t len, jl, sl;
	char *json = slurp(SCHEMAS "/result.avsc", &jl);
	avro_schema_t sc;
	avro_value_iface_t *ifc;
	avro_value_t v, f, b;
	avro_reader_t rd;
	const char *str;
	int e;
	int32_t i32;
	int64_t i64;
	float pf;

	cr_assert_eq(avro_schema_from_json_length(json, jl, &sc), 0, "%s", avro_strerror());
	free(json);
	ifc = avro_generic_class_from_schema(sc);
	cr_assert_eq(avro_generic_value_new(ifc, &v), 0);
	for (int fr = 0; fr < 2; fr++) {
		size_t hdr = fr == 0 ? 5 : 10;

		make_result(&r, fr);
		cr_assert_eq(mtlz_avro_encode_result(av, &r, framings[fr], 2, &buf, &len, err,
						     sizeof(err)), MTLZ_OK);
		rd = avro_reader_memory((const char *)buf + hdr, (int64_t)(len - hdr));
		cr_assert_eq(avro_value_read(rd, &v), 0, "%s", avro_strerror());
		avro_reader_free(rd);
		avro_value_get_by_name(&v, "spec_id", &f, NULL);
		avro_value_get_string(&f, &str, &sl);
		cr_assert_str_eq(str, r.spec_id);
		avro_value_get_by_name(&v, "class", &f, NULL);
		avro_value_get_enum(&f, &e);
		cr_assert_str_eq(avro_schema_enum_get(avro_value_get_schema(&f), e),
				 fr ? "STAR_FORMING" : "AGN");
		avro_value_get_by_name(&v, "prob_agn", &f, NULL);
		avro_value_get_float(&f, &pf);
		cr_assert_eq(pf, r.prob[3]);
		avro_value_get_by_name(&v, "metallicity", &f, NULL);
		avro_value_get_current_branch(&f, &b);
		if (fr) {
			double oh;

			avro_value_get_double(&b, &oh);
			cr_assert_eq(oh, 8.71);
		} else {
			cr_assert_eq(avro_value_get_type(&b), AVRO_NULL);
		}
		avro_value_get_by_name(&v, "quality_flags", &f, NULL);
		avro_value_get_int(&f, &i32);
		cr_assert_eq(i32, (int32_t)r.flags);
		avro_value_get_by_name(&v, "quality_flag_names", &f, NULL);
		avro_value_get_size(&f, &sl);
		cr_assert_eq(sl, 2);
		avro_value_get_by_index(&f, 1, &b, NULL);
		avro_value_get_string(&b, &str, &sl);
		cr_assert_str_eq(str, "LOW_SN");
		avro_value_get_by_name(&v, "source_offset", &f, NULL);
		avro_value_get_long(&f, &i64);
		cr_assert_eq(i64, r.source_offset);
		avro_value_get_by_name(&v, "processed_at", &f, NULL);
		avro_value_get_long(&f, &i64);
		cr_assert_eq(i64, r.processed_us);
	}
	avro_value_decref(&v);
	avro_value_iface_decref(ifc);
	avro_schema_decref(sc);
}

static const char py_read[] =
	PY " -c '\n"
	"import io, json, sys, avro.schema, avro.io, avro.datafile\n"
	"schema = avro.schema.parse(open(sys.argv[1]).read())\n"
	"raw = open(sys.argv[2], \"rb\").read()\n"
	"rec = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(raw[5:])))\n"
	"with avro.datafile.DataFileReader(open(sys.argv[3], \"rb\"), avro.io.DatumReader()) as r:\n"
	"    recs = list(r)\n"
	"assert len(recs) == 1 and recs[0][\"spec_id\"] == rec[\"spec_id\"]\n"
	"print(json.dumps(rec, default=str))\n"
	"' %s %s/res.bin %s/res.avro";

Test(avro_io, result_readable_by_python_avro)
{
	mtlz_result_rec r;
	const uint8_t *buf;
	size_t len;
	char cmd[2048], line[4096];
	json_t *j;
	json_error_t je;
	FILE *p;

	if (!have_python_avro()) {
		cr_log_warn("python3-avro missing: Python read-back skipped");
		return;
	}
	make_result(&r, 1);
	cr_assert_eq(mtlz_avro_encode_result(av, &r, MTLZ_FRAMING_CONFLUENT, 2, &buf, &len, err,
					     sizeof(err)), MTLZ_OK);
	write_file(regdir, "res.bin", buf, len);
	cr_assert_eq(mtlz_avro_encode_result(av, &r, MTLZ_FRAMING_CONTAINER, 2, &buf, &len, err,
					     sizeof(err)), MTLZ_OK);
	write_file(regdir, "res.avro", buf, len);
	snprintf(cmd, sizeof(cmd), py_read, SCHEMAS "/result.avsc", regdir, regdir);
	p = popen(cmd, "r");
	cr_assert(p);
	cr_assert(fgets(line, sizeof(line), p), "no output from python");
	cr_assert_eq(pclose(p), 0, "python failed");
	j = json_loads(line, 0, &je);
	cr_assert(j, "%s", line);
	cr_assert_str_eq(json_string_value(json_object_get(j, "spec_id")), r.spec_id);
	cr_assert_str_eq(json_string_value(json_object_get(j, "class")), "STAR_FORMING");
	cr_assert_float_eq(json_real_value(json_object_get(j, "metallicity")), 8.71, 1e-12);
	cr_assert_eq(json_integer_value(json_object_get(j, "quality_flags")), (json_int_t)r.flags);
	cr_assert_str_eq(json_string_value(json_array_get(json_object_get(j, "quality_flag_names"), 0)),
			 "BLUE_SHORT");
	cr_assert_eq(json_integer_value(json_object_get(j, "source_offset")), r.source_offset);
	cr_assert(strstr(json_string_value(json_object_get(j, "processed_at")), "2024-06-10"),
		  "timestamp-micros: %s", json_string_value(json_object_get(j, "processed_at")));
	json_decref(j);
}

/* An older consumer-side schema: a result written by an older mtlzd
 * without metallicity_sigma and quality_flag_names decodes with defaults. */
Test(avro_io, result_from_older_writer)
{
	static const char old_res[] =
		"{\"type\":\"record\",\"name\":\"Result\",\"namespace\":\"mtlz\",\"fields\":["
		"{\"name\":\"spec_id\",\"type\":\"string\"},"
		"{\"name\":\"class\",\"type\":{\"type\":\"enum\",\"name\":\"SpectralClass\","
		"\"symbols\":[\"PASSIVE\",\"STAR_FORMING\",\"COMPOSITE\",\"AGN\"]}},"
		"{\"name\":\"prob_passive\",\"type\":\"float\"},{\"name\":\"prob_star_forming\",\"type\":\"float\"},"
		"{\"name\":\"prob_composite\",\"type\":\"float\"},{\"name\":\"prob_agn\",\"type\":\"float\"},"
		"{\"name\":\"metallicity\",\"type\":[\"null\",\"double\"]},"
		"{\"name\":\"quality_flags\",\"type\":\"int\"},"
		"{\"name\":\"model_sha256\",\"type\":\"string\"},{\"name\":\"model_version\",\"type\":\"string\"},"
		"{\"name\":\"source_topic\",\"type\":\"string\"},{\"name\":\"source_partition\",\"type\":\"int\"},"
		"{\"name\":\"source_offset\",\"type\":\"long\"},{\"name\":\"processed_at\",\"type\":\"long\"}]}";
	/* spec_id "x", AGN, probs 0, null metallicity, flags 0, "", "", "t", 1, 2, 3 */
	uint8_t msg[64] = { 0x00, 0, 0, 0, 77 };
	size_t n = 5;
	mtlz_result_rec d;

	write_file(regdir, "77.avsc", old_res, strlen(old_res));
	msg[n++] = 2;
	msg[n++] = 'x';
	msg[n++] = 6;           /* enum index 3 */
	n += 16;                /* four zero floats */
	msg[n++] = 0;           /* metallicity null */
	msg[n++] = 0;           /* flags */
	msg[n++] = 0;
	msg[n++] = 0;
	msg[n++] = 2;
	msg[n++] = 't';
	msg[n++] = 2;
	msg[n++] = 4;
	msg[n++] = 6;
	cr_assert_eq(mtlz_avro_decode_result(av, msg, n, &d, err, sizeof(err)), MTLZ_DECODE_OK,
		     "%s", err);
	cr_assert_str_eq(d.spec_id, "x");
	cr_assert_eq(d.cls, 3);
	cr_assert_eq(d.has_metal, 0);
	cr_assert_str_eq(d.source_topic, "t");
	cr_assert_eq(d.source_partition, 1);
	cr_assert_eq(d.source_offset, 2);
	cr_assert_eq(d.processed_us, 3);
	/* One byte short / one byte extra. */
	cr_assert_eq(mtlz_avro_decode_result(av, msg, n - 1, &d, err, sizeof(err)), MTLZ_DECODE_AVRO);
	cr_assert_eq(mtlz_avro_decode_result(av, msg, n + 1, &d, err, sizeof(err)), MTLZ_DECODE_AVRO);
}

/* ---- Object-container files of many spectra (archives, mtlz-replay) ---- */

struct collect {
	mtlz_spectra got;
	size_t calls, stop_after;
};

static int collect_one(void *opaque, const mtlz_spectrum *s)
{
	struct collect *c = opaque;
	mtlz_spectrum *d = mtlz_spectra_push(&c->got);

	cr_assert(d);
	*d = *s;
	d->flux = malloc(s->n * sizeof(float));
	memcpy(d->flux, s->flux, s->n * sizeof(float));
	d->ivar = s->ivar ? malloc(s->n * sizeof(float)) : NULL;
	if (s->ivar)
		memcpy(d->ivar, s->ivar, s->n * sizeof(float));
	d->and_mask = s->and_mask ? malloc(s->n * sizeof(uint32_t)) : NULL;
	if (s->and_mask)
		memcpy(d->and_mask, s->and_mask, s->n * sizeof(uint32_t));
	d->wave = s->wave ? malloc(s->n * sizeof(double)) : NULL;
	if (s->wave)
		memcpy(d->wave, s->wave, s->n * sizeof(double));
	c->calls++;
	return c->stop_after && c->calls == c->stop_after ? 7 : 0;
}

/* Every spectrum of the five FITS fixtures (SDSS, BOSS, DESI coadd). */
static void read_fixtures(mtlz_spectra *all)
{
	static const char *files[] = { "spec-0266-51602-0001.fits", "spec-0266-51630-0174.fits",
				       "spec-0266-51602-0573.fits", "spec-3586-55181-0003.fits",
				       "coadd-4-80613.fits" };

	memset(all, 0, sizeof(*all));
	for (size_t f = 0; f < MTLZ_ARRAY_SIZE(files); f++) {
		char path[512];

		snprintf(path, sizeof(path), "%s/%s", MTLZ_TEST_DATA, files[f]);
		cr_assert_eq(mtlz_fits_read(path, all, err, sizeof(err)), MTLZ_OK, "%s", err);
	}
	cr_assert_geq(all->n, 5);
}

Test(avro_io, container_file_of_fixtures_round_trips_with_null_and_deflate, .timeout = 60)
{
	static const char *codecs[] = { "null", "deflate" };
	mtlz_spectra all;

	read_fixtures(&all);
	for (int fast = 0; fast < 2; fast++)
		for (size_t k = 0; k < 2; k++) {
			struct collect c = { { 0 }, 0, 0 };
			char path[512], want[600];

			mtlz_avro_set_fast_path(av, fast);
			snprintf(path, sizeof(path), "%s/archive-%s.avro", regdir, codecs[k]);
			cr_assert_eq(mtlz_avro_write_container(av, path, all.v, all.n, codecs[k], err,
							       sizeof(err)), MTLZ_OK, "%s", err);
			cr_assert_eq(mtlz_avro_read_container(av, path, collect_one, &c, err,
							      sizeof(err)), MTLZ_OK, "%s", err);
			cr_assert_eq(c.got.n, all.n, "%s: %zu records", codecs[k], c.got.n);
			for (size_t i = 0; i < all.n; i++) {
				assert_same_spectrum(&all.v[i], &c.got.v[i]);
				snprintf(want, sizeof(want), "%s[%zu]", path, i);
				cr_assert_str_eq(c.got.v[i].source, want);
			}
			mtlz_spectra_free(&c.got);
		}
	mtlz_avro_set_fast_path(av, 1);
	mtlz_spectra_free(&all);
}

Test(avro_io, container_file_read_stops_when_callback_returns_nonzero, .timeout = 60)
{
	struct collect c = { { 0 }, 0, 2 };
	mtlz_spectra all;
	char path[512];

	read_fixtures(&all);
	snprintf(path, sizeof(path), "%s/stop.avro", regdir);
	cr_assert_eq(mtlz_avro_write_container(av, path, all.v, all.n, "deflate", err,
					       sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_eq(mtlz_avro_read_container(av, path, collect_one, &c, err, sizeof(err)), 7);
	cr_assert_eq(c.calls, 2);
	assert_same_spectrum(&all.v[1], &c.got.v[1]);
	mtlz_spectra_free(&c.got);
	mtlz_spectra_free(&all);
}

static void expect_container_error(const char *path, const char *what)
{
	struct collect c = { { 0 }, 0, 0 };
	int rc;

	err[0] = '\0';
	rc = mtlz_avro_read_container(av, path, collect_one, &c, err, sizeof(err));
	cr_assert(rc == MTLZ_ERR_FORMAT || rc == MTLZ_ERR_IO, "%s: rc %d", what, rc);
	cr_assert(strstr(err, path), "%s: errstr \"%s\" does not name the file", what, err);
	mtlz_spectra_free(&c.got);
}

Test(avro_io, truncated_or_random_container_files_are_errors_naming_the_file, .timeout = 120)
{
	static const char *codecs[] = { "null", "deflate" };
	mtlz_spectra all;
	char path[512], cut[512];

	read_fixtures(&all);
	snprintf(cut, sizeof(cut), "%s/cut.avro", regdir);
	for (size_t k = 0; k < 2; k++) {
		uint8_t *buf;
		size_t len;

		snprintf(path, sizeof(path), "%s/whole-%s.avro", regdir, codecs[k]);
		cr_assert_eq(mtlz_avro_write_container(av, path, all.v, all.n, codecs[k], err,
						       sizeof(err)), MTLZ_OK, "%s", err);
		buf = (uint8_t *)slurp(path, &len);
		/* header, sync marker, first block header, inside blocks, last sync byte */
		for (size_t n = 0; n < len; n += (n < 64 ? 1 : n < 4096 ? 97 : 7919)) {
			FILE *f = fopen(cut, "wb");

			cr_assert(f);
			cr_assert_eq(fwrite(buf, 1, n, f), n);
			fclose(f);
			expect_container_error(cut, "truncated");
		}
		{
			FILE *f = fopen(cut, "wb");

			cr_assert_eq(fwrite(buf, 1, len - 1, f), len - 1);
			fclose(f);
			expect_container_error(cut, "last byte cut");
		}
		/* a flipped byte in the middle must not crash (error or, rarely, a
		 * float value changed: both fine) */
		for (size_t i = 0; i < 64; i++) {
			FILE *f = fopen(cut, "wb");
			struct collect c = { { 0 }, 0, 0 };
			size_t at = 4 + rnd() % (len - 4);

			buf[at] ^= (uint8_t)(1 + rnd() % 255);
			cr_assert_eq(fwrite(buf, 1, len, f), len);
			fclose(f);
			if (mtlz_avro_read_container(av, cut, collect_one, &c, err, sizeof(err)))
				cr_assert(strstr(err, cut), "errstr \"%s\"", err);
			mtlz_spectra_free(&c.got);
			free(buf);
			buf = (uint8_t *)slurp(path, &len);
		}
		free(buf);
	}
	for (int r = 0; r < 20; r++) {
		uint8_t junk[4096];
		FILE *f = fopen(cut, "wb");
		size_t n = 1 + rnd() % sizeof(junk);

		for (size_t i = 0; i < n; i++)
			junk[i] = (uint8_t)rnd();
		if (r % 2) /* a real magic, random after it */
			memcpy(junk, "Obj\x01", MTLZ_MIN(n, (size_t)4));
		cr_assert_eq(fwrite(junk, 1, n, f), n);
		fclose(f);
		expect_container_error(cut, "random bytes");
	}
	snprintf(path, sizeof(path), "%s/missing.avro", regdir);
	expect_container_error(path, "missing file");
	mtlz_spectra_free(&all);
}

Test(avro_io, container_file_with_older_writer_schema_resolves)
{
	struct collect c = { { 0 }, 0, 0 };
	char path[512];
	uint8_t *buf, *file;
	size_t len, flen;

	write_file(regdir, "42.avsc", old_schema, strlen(old_schema));
	snprintf(path, sizeof(path), "%s/42.avsc", regdir);
	buf = raw_spectrum(path, 42, 50, 50, 3600.0, "old-1", &len);
	file = container(old_schema, strlen(old_schema), buf + 5, len - 5, &flen);
	write_file(regdir, "old.avro", file, flen);
	snprintf(path, sizeof(path), "%s/old.avro", regdir);
	cr_assert_eq(mtlz_avro_read_container(av, path, collect_one, &c, err, sizeof(err)),
		     MTLZ_OK, "%s", err);
	cr_assert_eq(c.got.n, 1);
	cr_assert_str_eq(c.got.v[0].spec_id, "old-1");
	cr_assert_eq(c.got.v[0].z, 0.125);
	cr_assert_eq(c.got.v[0].zwarning, -1);
	cr_assert_eq(c.got.v[0].grid_kind, MTLZ_GRID_LINEAR);
	cr_assert_eq(c.got.v[0].n, 50);
	cr_assert_eq(c.got.v[0].flux[49], 49.0f);
	cr_assert_null(c.got.v[0].and_mask);
	mtlz_spectra_free(&c.got);
	free(file);
	free(buf);
}

Test(avro_io, container_file_with_unknown_codec_is_a_format_error)
{
	mtlz_spectrum s;
	char path[512];

	make_spectrum(&s, MTLZ_GRID_LOGLAM, 1, 1, 100);
	snprintf(path, sizeof(path), "%s/x.avro", regdir);
	cr_assert_eq(mtlz_avro_write_container(av, path, &s, 1, "snappy", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	cr_assert_eq(access(path, F_OK), -1);
	mtlz_spectrum_clear(&s);
}
