/*
 * test_archive.c - training archives (labelled_spectrum.avsc containers),
 * the BPT / strong-line / Table 1 labelling rules, and `mtlz import`:
 *   - write -> stream back: every field equal (both codecs, several files);
 *   - the embedded Spectrum schema is spectrum.avsc's (canonical forms);
 *   - Python's avro reads our archives, and we read Python's, including a
 *     writer schema that dropped and added label fields;
 *   - damaged files are errors naming file and record, never crashes;
 *   - demarcations and calibrations against hand-computed values;
 *   - the atlas import counts, the shipped archive is what the import
 *     writes, CSV input with bad rows skipped and reported.
 */
#define _GNU_SOURCE
#include "archive.h"
#include "avro_io.h"
#include "bpt.h"
#include "sdss_labels.h"
#include "common.h"
#include "util.h"

#include <criterion/criterion.h>
#include <fitsio.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define BIN MTLZ_BIN_DIR
#define PY "/usr/bin/python3"

static char dir[64];
static mtlz_avro *avro;
static char err[512];

static void setup(void)
{
	tu_mkdtemp(dir, sizeof(dir), "mtlz-test-archive");
	avro = mtlz_avro_new(MTLZ_SOURCE_DIR "/schemas", NULL, err, sizeof(err));
	cr_assert_not_null(avro, "%s", err);
}

static void teardown(void)
{
	char cmd[128];

	mtlz_avro_free(avro);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);  /* archives are directories */
	if (!getenv("MTLZ_TEST_KEEP"))
		cr_assert_eq(system(cmd), 0);
}

TestSuite(archive, .init = setup, .fini = teardown, .timeout = 300);

/* Spectrum i of a test set: every grid kind, with and without ivar/mask. */
static void make_spectrum(mtlz_spectrum *s, int i, mtlz_rng *r)
{
	const size_t n = 50 + (size_t)(mtlz_rng_uniform(r) * 300);

	mtlz_spectrum_init(s);
	cr_assert_eq(mtlz_spectrum_alloc(s, n, i % 2, i % 3 == 0, i % 3 == 2), 0);
	snprintf(s->spec_id, sizeof(s->spec_id), "test-%d", i);
	snprintf(s->survey, sizeof(s->survey), "%s", i % 2 ? "sdss" : "desi");
	s->z = i % 4 ? 0.01 * i : NAN;
	s->sn = i % 5 ? 3.5 + i : NAN;
	s->zwarning = i % 6 ? i : -1;
	s->grid_kind = i % 3 == 2 ? MTLZ_GRID_EXPLICIT : i % 3;
	s->start = s->grid_kind == MTLZ_GRID_LOGLAM ? 3.5798 : 3600.0 + i;
	s->step = s->grid_kind == MTLZ_GRID_LOGLAM ? 1e-4 : 0.8;
	for (size_t k = 0; k < n; k++) {
		s->flux[k] = (float)(mtlz_rng_uniform(r) * 10 - 1);
		if (s->ivar)
			s->ivar[k] = (float)mtlz_rng_uniform(r);
		if (s->and_mask)
			s->and_mask[k] = (uint32_t)(mtlz_rng_next(r) & 0xffffffffu);
		if (s->wave)
			s->wave[k] = 3700.0 + 2.5 * (double)k + 0.1 * mtlz_rng_uniform(r);
	}
}

static void make_labels(mtlz_labels *l, int i)
{
	mtlz_labels_init(l);
	l->cls = i % 5 == 4 ? MTLZ_CLASS_NONE : i % 4;
	if (l->cls == MTLZ_CLASS_STAR_FORMING) {
		l->oh = 8.5 + 0.01 * i;
		l->oh_err = i % 2 ? 0.04 : NAN;
	}
	l->log_mass = i % 3 ? 9.5 + 0.1 * i : NAN;
	l->z = 0.02 * i;
	l->sn_r = i % 2 ? 7.25 : NAN;
	snprintf(l->source_name, sizeof(l->source_name), "unit test");
	snprintf(l->source_version, sizeof(l->source_version), "v%d", i);
	snprintf(l->source_method, sizeof(l->source_method), "made up");
	for (int k = 0; k < i % 4; k++)
		mtlz_labels_kv_add(l->params, &l->n_params, k ? "seed" : "mix", "%d", k * i);
	mtlz_labels_kv_add(l->survey, &l->n_survey, "BPTCLASS", "%d", i % 6 - 1);
}

static int same_double(double a, double b)
{
	return (isnan(a) && isnan(b)) || memcmp(&a, &b, sizeof(a)) == 0;
}

struct collect {
	int n;
	mtlz_rng rng;
	int failures;
};

static int check_record(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct collect *c = opaque;
	mtlz_spectrum want;
	mtlz_labels wl;

	make_spectrum(&want, c->n, &c->rng);
	make_labels(&wl, c->n);
	cr_assert_not_null(l, "labels present");
	cr_expect_str_eq(s->spec_id, want.spec_id);
	cr_expect_str_eq(s->survey, want.survey);
	cr_expect(same_double(s->z, want.z) && same_double(s->sn, want.sn), "%s z/sn", s->spec_id);
	cr_expect_eq(s->zwarning, want.zwarning);
	cr_expect_eq(s->grid_kind, want.grid_kind);
	cr_expect_eq(s->n, want.n);
	if (s->n == want.n) {
		cr_expect_eq(memcmp(s->flux, want.flux, s->n * 4), 0, "%s flux", s->spec_id);
		cr_expect_eq(!s->ivar, !want.ivar);
		if (s->ivar && want.ivar)
			cr_expect_eq(memcmp(s->ivar, want.ivar, s->n * 4), 0);
		cr_expect_eq(!s->and_mask, !want.and_mask);
		if (s->and_mask && want.and_mask)
			cr_expect_eq(memcmp(s->and_mask, want.and_mask, s->n * 4), 0);
		if (want.wave)
			cr_expect_eq(memcmp(s->wave, want.wave, s->n * 8), 0);
		else
			cr_expect(same_double(s->start, want.start) &&
				  same_double(s->step, want.step));
	}
	cr_expect_eq(l->cls, wl.cls);
	cr_expect(same_double(l->oh, wl.oh) && same_double(l->oh_err, wl.oh_err) &&
		  same_double(l->log_mass, wl.log_mass) && same_double(l->z, wl.z) &&
		  same_double(l->sn_r, wl.sn_r), "%s numeric labels", s->spec_id);
	cr_expect_str_eq(l->source_name, wl.source_name);
	cr_expect_str_eq(l->source_version, wl.source_version);
	cr_expect_str_eq(l->source_method, wl.source_method);
	cr_expect_eq(l->n_params, wl.n_params);
	cr_expect_eq(l->n_survey, wl.n_survey);
	for (int k = 0; k < l->n_params && k < wl.n_params; k++)
		cr_expect(!strcmp(l->params[k].key, wl.params[k].key) &&
			  !strcmp(l->params[k].value, wl.params[k].value));
	cr_expect_str_eq(l->survey[0].value, wl.survey[0].value);
	mtlz_spectrum_clear(&want);
	c->n++;
	return 0;
}

static void write_set(const char *sub, int n, const char *codec, size_t per_file)
{
	char path[300];
	mtlz_archive_writer *w;
	mtlz_rng r;

	mtlz_rng_seed(&r, 42);
	snprintf(path, sizeof(path), "%s/%s", dir, sub);
	w = mtlz_archive_writer_open(avro, path, "part", per_file, codec, err, sizeof(err));
	cr_assert_not_null(w, "%s", err);
	for (int i = 0; i < n; i++) {
		mtlz_spectrum s;
		mtlz_labels l;

		make_spectrum(&s, i, &r);
		make_labels(&l, i);
		cr_assert_eq(mtlz_archive_writer_add(w, &s, &l, err, sizeof(err)), 0, "%s", err);
		mtlz_spectrum_clear(&s);
	}
	cr_assert_eq(mtlz_archive_writer_count(w), (uint64_t)n);
	cr_assert_eq(mtlz_archive_writer_close(w, err, sizeof(err)), 0, "%s", err);
}

Test(archive, round_trip_every_field_both_codecs_several_files)
{
	static const char *const codecs[] = { "deflate", "null" };

	for (int c = 0; c < 2; c++) {
		char path[300], **files;
		char *paths[1] = { path };
		struct collect col = { 0 };
		int n;

		snprintf(path, sizeof(path), "%s/%s", dir, codecs[c]);
		write_set(codecs[c], 40, codecs[c], 15);
		cr_assert_eq(mtlz_archive_files(path, &files, &n, err, sizeof(err)), 0);
		cr_assert_eq(n, 3, "40 records at 15 per file: 3 files");
		cr_assert(strstr(files[0], "part-00000.avro") && strstr(files[2], "part-00002.avro"));
		mtlz_archive_files_free(files, n);
		mtlz_rng_seed(&col.rng, 42);
		cr_assert_eq(mtlz_archive_read(avro, paths, 1, check_record, &col, err,
					       sizeof(err)), 0, "%s", err);
		cr_assert_eq(col.n, 40);
	}
}

Test(archive, generic_reader_path_reads_the_same)
{
	char path[300];
	char *paths[1] = { path };
	struct collect col = { 0 };

	write_set("g", 12, "deflate", 0);
	snprintf(path, sizeof(path), "%s/g", dir);
	mtlz_avro_set_fast_path(avro, 0);
	mtlz_rng_seed(&col.rng, 42);
	cr_assert_eq(mtlz_archive_read(avro, paths, 1, check_record, &col, err, sizeof(err)), 0,
		     "%s", err);
	cr_assert_eq(col.n, 12);
}

Test(archive, writer_refuses_a_directory_holding_an_archive)
{
	char path[300];

	write_set("a", 2, "null", 0);
	snprintf(path, sizeof(path), "%s/a", dir);
	cr_assert_null(mtlz_archive_writer_open(avro, path, "part", 0, "null", err, sizeof(err)));
	cr_assert(strstr(err, "already holds an archive"), "%s", err);
}

static int count_fn(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	(void)s;
	(void)l;
	(*(int *)opaque)++;
	return 0;
}

Test(archive, damaged_files_are_errors_naming_file_and_record)
{
	char path[300], cut[320], cmd[800];
	char *paths[1] = { cut };
	struct stat st;
	int n = 0;

	write_set("d", 30, "null", 0);
	snprintf(path, sizeof(path), "%s/d/part-00000.avro", dir);
	cr_assert_eq(stat(path, &st), 0);
	/* every 997th truncation length: an error or fewer records, never a crash */
	for (off_t len = 0; len < st.st_size; len += 997) {
		int rc;

		snprintf(cut, sizeof(cut), "%s/cut.avro", dir);
		snprintf(cmd, sizeof(cmd), "head -c %lld %s > %s", (long long)len, path, cut);
		cr_assert_eq(system(cmd), 0);
		n = 0;
		rc = mtlz_archive_read(avro, paths, 1, count_fn, &n, err, sizeof(err));
		cr_assert_neq(rc, 0, "a file cut at %lld bytes is an error", (long long)len);
		cr_assert(strstr(err, "cut.avro"), "the message names the file: %s", err);
		cr_assert_lt(n, 30);
	}
}

Test(archive, embedded_spectrum_schema_is_spectrum_avsc)
{
	char cmd[1024];

	/* canonical forms compared by Python's avro (an independent parser) */
	snprintf(cmd, sizeof(cmd), PY " -c \"import avro.schema as S;"
		 "a=S.parse(open('%s/schemas/spectrum.avsc').read());"
		 "b=S.parse(open('%s/schemas/labelled_spectrum.avsc').read());"
		 "f=[x for x in b.fields if x.name=='spectrum'][0].type;"
		 "assert a.canonical_form==f.canonical_form\"", MTLZ_SOURCE_DIR, MTLZ_SOURCE_DIR);
	cr_assert_eq(system(cmd), 0, "the spectrum field differs from spectrum.avsc");
}

Test(archive, python_avro_reads_our_files)
{
	char cmd[1024], line[256];
	FILE *p;
	int n = -1, sf = -1;
	double oh = 0;

	write_set("py", 20, "deflate", 0);
	snprintf(cmd, sizeof(cmd), PY " -c \"from avro.datafile import DataFileReader as R;"
		 "from avro.io import DatumReader as D;"
		 "r=list(R(open('%s/py/part-00000.avro','rb'),D()));"
		 "print(len(r), sum(x['class']=='STAR_FORMING' for x in r), repr(r[1]['metallicity']))\"",
		 dir);
	p = popen(cmd, "r");
	cr_assert_not_null(p);
	cr_assert_not_null(fgets(line, sizeof(line), p));
	pclose(p);
	cr_assert_eq(sscanf(line, "%d %d %lf", &n, &sf, &oh), 3, "python said: %s", line);
	cr_assert_eq(n, 20);
	/* classes i % 4 for i % 5 != 4 over i < 20: i = 1, 5, 13, 17 */
	cr_assert_eq(sf, 4);
	cr_assert_float_eq(oh, 8.51, 1e-12);
}

struct evolved {
	int n;
	double oh, err_oh;
	int cls;
};

static int evolved_fn(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct evolved *e = opaque;

	cr_assert_str_eq(s->spec_id, "py-1");
	cr_assert_eq(s->n, 3);
	cr_assert_float_eq(s->flux[2], 3.0f, 0);
	e->n++;
	e->cls = l->cls;
	e->oh = l->oh;
	e->err_oh = l->oh_err;
	return 0;
}

Test(archive, we_read_python_files_with_an_evolved_label_schema)
{
	char cmd[4096], path[300];
	char *paths[1] = { path };
	struct evolved e = { 0 };

	/* a writer that dropped metallicity_err and added a field: resolved */
	snprintf(path, sizeof(path), "%s/evolved.avro", dir);
	snprintf(cmd, sizeof(cmd), PY " - <<'EOF'\n"
		 "import json, avro.schema\n"
		 "from avro.datafile import DataFileWriter\n"
		 "from avro.io import DatumWriter\n"
		 "s = json.load(open('%s/schemas/labelled_spectrum.avsc'))\n"
		 "s['fields'] = [f for f in s['fields'] if f['name'] != 'metallicity_err']\n"
		 "s['fields'].append({'name': 'pipeline_note', 'type': 'string', 'default': ''})\n"
		 "w = DataFileWriter(open('%s', 'wb'), DatumWriter(), avro.schema.parse(json.dumps(s)),\n"
		 "                   codec='deflate')\n"
		 "w.append({'spectrum': {'spec_id': 'py-1', 'survey': 'sdss', 'redshift': 0.1,\n"
		 "  'zwarning': 0, 'sn_median': None,\n"
		 "  'wavelength': {'start': 4000.0, 'step': 1.0}, 'flux': [1.0, 2.0, 3.0],\n"
		 "  'ivar': None, 'mask': None, 'metadata': {}},\n"
		 "  'class': 'STAR_FORMING', 'metallicity': 8.7, 'log_stellar_mass': None,\n"
		 "  'redshift': 0.1, 'sn_r': 12.0,\n"
		 "  'label_source': {'name': 'python', 'version': '', 'method': '', 'parameters': {}},\n"
		 "  'survey_labels': {}, 'pipeline_note': 'hello'})\n"
		 "w.close()\n"
		 "EOF", MTLZ_SOURCE_DIR, path);
	cr_assert_eq(system(cmd), 0);
	cr_assert_eq(mtlz_archive_read(avro, paths, 1, evolved_fn, &e, err, sizeof(err)), 0,
		     "%s", err);
	cr_assert_eq(e.n, 1);
	cr_assert_eq(e.cls, MTLZ_CLASS_STAR_FORMING);
	cr_assert_float_eq(e.oh, 8.7, 1e-12);
	cr_assert(isnan(e.err_oh), "a field the writer lacks reads as null");
}

/* ---- labelling rules, against hand-computed values -------------------- */

Test(labels, demarcation_lines_and_bpt_class)
{
	/* Kauffmann03 at x = -0.5: 0.61 / -0.55 + 1.30 = 0.190909...;
	 * Kewley01 at x = -0.5: 0.61 / -0.97 + 1.19 = 0.561134... */
	cr_assert_float_eq(mtlz_bpt_kauffmann03(-0.5), 0.61 / -0.55 + 1.30, 1e-15);
	cr_assert_float_eq(mtlz_bpt_kauffmann03(-0.5), 0.1909090909, 1e-9);
	cr_assert_float_eq(mtlz_bpt_kewley01(-0.5), 0.5611340206, 1e-9);
	cr_assert(isinf(mtlz_bpt_kauffmann03(0.05)) && isinf(mtlz_bpt_kewley01(0.5)));
	cr_assert_eq(mtlz_bpt_class(-0.5, 0.0), MTLZ_CLASS_STAR_FORMING);
	cr_assert_eq(mtlz_bpt_class(-0.5, 0.4), MTLZ_CLASS_COMPOSITE);
	cr_assert_eq(mtlz_bpt_class(-0.5, 0.7), MTLZ_CLASS_AGN);
	/* x = 0.2: Kewley01 = 0.61 / -0.27 + 1.19 = -1.069 */
	cr_assert_eq(mtlz_bpt_class(0.2, -1.5), MTLZ_CLASS_COMPOSITE, "right of Kauffmann's asymptote");
	cr_assert_eq(mtlz_bpt_class(0.2, -0.5), MTLZ_CLASS_AGN);
	cr_assert_eq(mtlz_bpt_class(0.6, -0.5), MTLZ_CLASS_AGN, "right of Kewley's asymptote");
	cr_assert_eq(mtlz_bpt_class(NAN, 0.1), MTLZ_CLASS_NONE);
}

Test(labels, strong_line_calibrations)
{
	/* O3N2 = -0.2809 - (-0.315) = 0.0341; 8.73 - 0.32 * 0.0341 = 8.719088 */
	cr_assert_float_eq(mtlz_oh_o3n2_pp04(-0.2809, -0.315), 8.719088, 1e-12);
	cr_assert(isnan(mtlz_oh_o3n2_pp04(1.5, -0.5)), "O3N2 = 2.0 is outside the calibration");
	/* N2 = -1: 8.90 - 0.57 = 8.33 */
	cr_assert_float_eq(mtlz_oh_n2_pp04(-1.0), 8.33, 1e-12);
	cr_assert(isnan(mtlz_oh_n2_pp04(-0.2)) && isnan(mtlz_oh_n2_pp04(-2.6)));
}

Test(labels, table_1_mappings)
{
	static const struct { int code, cls; } mpa[] = {
		{ -1, MTLZ_CLASS_PASSIVE }, { 1, MTLZ_CLASS_STAR_FORMING },
		{ 2, MTLZ_CLASS_STAR_FORMING }, { 3, MTLZ_CLASS_COMPOSITE },
		{ 4, MTLZ_CLASS_AGN }, { 5, MTLZ_CLASS_AGN }, { 0, MTLZ_CLASS_NONE },
		{ 6, MTLZ_CLASS_NONE }, { -9999, MTLZ_CLASS_NONE },
	};
	static const struct { const char *s; int cls; } port[] = {
		{ "BLANK", MTLZ_CLASS_PASSIVE }, { "Star Forming", MTLZ_CLASS_STAR_FORMING },
		{ "Composite", MTLZ_CLASS_COMPOSITE }, { "LINER", MTLZ_CLASS_AGN },
		{ "Seyfert", MTLZ_CLASS_AGN }, { "LINER/Seyfert", MTLZ_CLASS_AGN },
		{ "  star forming ", MTLZ_CLASS_STAR_FORMING }, { "", MTLZ_CLASS_NONE },
		{ "Star", MTLZ_CLASS_NONE },
	};

	for (size_t i = 0; i < sizeof(mpa) / sizeof(mpa[0]); i++)
		cr_expect_eq(mtlz_class_from_bptclass(mpa[i].code), mpa[i].cls, "BPTCLASS %d",
			     mpa[i].code);
	for (size_t i = 0; i < sizeof(port) / sizeof(port[0]); i++)
		cr_expect_eq(mtlz_class_from_portsmouth(port[i].s), port[i].cls, "BPT '%s'",
			     port[i].s);
}

/* ---- mtlz import ------------------------------------------------------ */

/* Runs a command; returns its exit status, stderr in <dir>/<log>. */
static int run(const char *log, const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	snprintf(cmd + n, sizeof(cmd) - (size_t)n, " 2>%s/%s", dir, log);
	n = system(cmd);
	return WIFEXITED(n) ? WEXITSTATUS(n) : -1;
}

static int log_has(const char *log, const char *what)
{
	char path[300], buf[8192] = "";
	FILE *f;
	size_t n;

	snprintf(path, sizeof(path), "%s/%s", dir, log);
	f = fopen(path, "r");
	if (!f)
		return 0;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return strstr(buf, what) != NULL;
}

struct class_count {
	int n, by[MTLZ_N_CLASSES + 1], metal;
};

static int class_fn(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct class_count *c = opaque;

	cr_assert_eq(s->grid_kind, MTLZ_GRID_EXPLICIT);
	c->n++;
	c->by[l->cls < 0 ? MTLZ_N_CLASSES : l->cls]++;
	if (isfinite(l->oh)) {
		c->metal++;
		cr_assert_eq(l->cls, MTLZ_CLASS_STAR_FORMING, "only star-forming labels carry O/H");
	}
	return 0;
}

Test(archive, atlas_import_counts_and_the_shipped_archive_is_current)
{
	char out[300], shipped[300];
	char *paths[1] = { out };
	struct class_count c = { 0 };

	snprintf(out, sizeof(out), "%s/atlas", dir);
	/* the same command as data/sdss-atlas/make-archive.sh */
	cr_assert_eq(run("import.log", BIN "/mtlz import -o %s --source \"galaxy-line-atlas "
			 "(SDSS DR18 spectra, MPA-JHU labels)\" --source-version DR18 "
			 "--metallicity o3n2 %s/data/sdss-atlas/sdss_dr18_atlas.jsonl.gz", out,
			 MTLZ_SOURCE_DIR), 0);
	cr_assert_eq(mtlz_archive_read(avro, paths, 1, class_fn, &c, err, sizeof(err)), 0,
		     "%s", err);
	cr_assert_eq(c.n, 768);
	cr_assert_eq(c.by[MTLZ_CLASS_PASSIVE], 157);
	cr_assert_eq(c.by[MTLZ_CLASS_STAR_FORMING], 251);
	cr_assert_eq(c.by[MTLZ_CLASS_COMPOSITE], 146);
	cr_assert_eq(c.by[MTLZ_CLASS_AGN], 214);
	cr_assert_eq(c.metal, 244);
	snprintf(shipped, sizeof(shipped), "%s/data/sdss-atlas/archive", MTLZ_SOURCE_DIR);
	cr_assert_eq(run("cmp.log", "cmp %s/part-00000.avro %s/part-00000.avro", out, shipped), 0,
		     "data/sdss-atlas/archive differs from a fresh import: rerun "
		     "data/sdss-atlas/make-archive.sh");
}

Test(archive, csv_import_reports_bad_rows_and_keeps_the_rest)
{
	char csv[300], out[300];
	char *paths[1] = { out };
	struct class_count c = { 0 };
	FILE *f;

	snprintf(csv, sizeof(csv), "%s/in.csv", dir);
	snprintf(out, sizeof(out), "%s/csv", dir);
	f = fopen(csv, "w");
	fprintf(f, "spec_id,z,class,oh_p50,wavelength,flux,note\n"
		"a1,0.05,1,8.91,\"[4000,4001,4002]\",\"[1,2,3]\",\"hello, world\"\n"
		"a2,0.06,Composite,,4000 4001 4002,1;2;3,\n"
		"a3,0.07,4,,\"[4000,4001]\",\"[1,2,3]\",bad lengths\n"
		"a4,0.08,LINER,,\"[4000,3999,4002]\",\"[1,2,3]\",decreasing\n"
		"a5,0.09,-1\n"
		"a6,0.10,star_forming,8.5,4000 4001,5 6,\n");
	fclose(f);
	cr_assert_eq(run("csv.log", BIN "/mtlz import -o %s %s", out, csv), 1,
		     "skipped rows make the exit status 1");
	cr_assert(log_has("csv.log", "in.csv:4: skipped: wavelength: not an array of 3"));
	cr_assert(log_has("csv.log", "in.csv:5: skipped: wavelength[1]"));
	cr_assert(log_has("csv.log", "in.csv:6: skipped: 3 cells, the header has 7"));
	cr_assert_eq(mtlz_archive_read(avro, paths, 1, class_fn, &c, err, sizeof(err)), 0,
		     "%s", err);
	cr_assert_eq(c.n, 3);
	cr_assert_eq(c.by[MTLZ_CLASS_STAR_FORMING], 2);
	cr_assert_eq(c.by[MTLZ_CLASS_COMPOSITE], 1);
	cr_assert_eq(c.metal, 2, "oh_p50 is the metallicity field");
}

/* ---- mtlz archive: the paper's Section 2.1 selection ------------------- */

/* A copy of a real SDSS spec file with its SPECOBJ row changed. */
static void make_spec(int i, double z, int zwarning, double sn_r)
{
	char path[300], cmd[1400], id[32];
	char *idp = id;
	fitsfile *f;
	int st = 0, col;
	float snm[5] = { 1, 2, (float)sn_r, 4, 5 };
	float zf = (float)z;
	int plate = 1000 + i, mjd = 50000, fiber = i;

	snprintf(path, sizeof(path), "%s/specs/spec-%04d.fits", dir, i);
	snprintf(cmd, sizeof(cmd), "mkdir -p %s/specs && cp %s/spec-0266-51602-0001.fits %s && "
		 "chmod u+w %s", dir, MTLZ_TEST_DATA, path, path);
	cr_assert_eq(system(cmd), 0);
	snprintf(id, sizeof(id), "%d", 700000 + i);
	cr_assert_eq(fits_open_file(&f, path, READWRITE, &st), 0);
	cr_assert_eq(fits_movnam_hdu(f, BINARY_TBL, "SPECOBJ", 0, &st), 0);
#define SET(name, type, val) \
	cr_assert_eq(fits_get_colnum(f, CASEINSEN, name, &col, &st), 0); \
	cr_assert_eq(fits_write_col(f, type, col, 1, 1, 1, val, &st), 0, "%s: %d", name, st)
	SET("SPECOBJID", TSTRING, &idp);
	SET("Z", TFLOAT, &zf);
	SET("ZWARNING", TINT, &zwarning);
	SET("PLATE", TINT, &plate);
	SET("MJD", TINT, &mjd);
	SET("FIBERID", TINT, &fiber);
	cr_assert_eq(fits_get_colnum(f, CASEINSEN, "SN_MEDIAN", &col, &st), 0);
	cr_assert_eq(fits_write_col(f, TFLOAT, col, 1, 1, 5, snm, &st), 0);
#undef SET
	cr_assert_eq(fits_close_file(f, &st), 0);
}

struct cat_row {
	int i;            /* spectrum; < 0: no row */
	int bptclass;
	float oh16, oh50, oh84;
	const char *bpt;  /* NULL: not in Portsmouth */
};

/* galSpecExtra (SPECOBJID as 64-bit integer) and emissionLinesPort
 * (PLATE/MJD/FIBERID), with the real column names and types. */
static void make_catalogues(const struct cat_row *rows, int n)
{
	static char *mpa_t[] = { "SPECOBJID", "BPTCLASS", "OH_P16", "OH_P50", "OH_P84",
				 "LGM_TOT_P50", "LGM_FIB_P50" };
	static char *mpa_f[] = { "K", "J", "E", "E", "E", "E", "E" };
	static char *port_t[] = { "PLATE", "MJD", "FIBERID", "BPT" };
	static char *port_f[] = { "J", "J", "J", "16A" };
	char path[300];
	fitsfile *f;
	int st = 0;
	long rm = 0, rp = 0;

	snprintf(path, sizeof(path), "!%s/galSpecExtra.fits", dir);
	cr_assert_eq(fits_create_file(&f, path, &st), 0);
	cr_assert_eq(fits_create_tbl(f, BINARY_TBL, 0, 7, mpa_t, mpa_f, NULL, "galSpecExtra",
				     &st), 0);
	for (int k = 0; k < n; k++) {
		LONGLONG id = 700000 + rows[k].i;
		float mass = 10.5f, fib = 9.8f;

		if (rows[k].i < 0 || rows[k].bptclass == -99)
			continue;
		rm++;
		fits_write_col(f, TLONGLONG, 1, rm, 1, 1, &id, &st);
		fits_write_col(f, TINT, 2, rm, 1, 1, (void *)&rows[k].bptclass, &st);
		fits_write_col(f, TFLOAT, 3, rm, 1, 1, (void *)&rows[k].oh16, &st);
		fits_write_col(f, TFLOAT, 4, rm, 1, 1, (void *)&rows[k].oh50, &st);
		fits_write_col(f, TFLOAT, 5, rm, 1, 1, (void *)&rows[k].oh84, &st);
		fits_write_col(f, TFLOAT, 6, rm, 1, 1, &mass, &st);
		fits_write_col(f, TFLOAT, 7, rm, 1, 1, &fib, &st);
	}
	cr_assert_eq(fits_close_file(f, &st), 0, "cfitsio %d", st);
	snprintf(path, sizeof(path), "!%s/emissionLinesPort.fits", dir);
	cr_assert_eq(fits_create_file(&f, path, &st), 0);
	cr_assert_eq(fits_create_tbl(f, BINARY_TBL, 0, 4, port_t, port_f, NULL,
				     "emissionLinesPort", &st), 0);
	for (int k = 0; k < n; k++) {
		int plate = 1000 + rows[k].i, mjd = 50000, fiber = rows[k].i;
		char *b = (char *)rows[k].bpt;

		if (rows[k].i < 0 || !b)
			continue;
		rp++;
		fits_write_col(f, TINT, 1, rp, 1, 1, &plate, &st);
		fits_write_col(f, TINT, 2, rp, 1, 1, &mjd, &st);
		fits_write_col(f, TINT, 3, rp, 1, 1, &fiber, &st);
		fits_write_col(f, TSTRING, 4, rp, 1, 1, &b, &st);
	}
	cr_assert_eq(fits_close_file(f, &st), 0, "cfitsio %d", st);
}

struct by_id {
	int n, cls[32];
	double oh[32], oh_err[32];
};

static int by_id_fn(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct by_id *b = opaque;
	int i = atoi(s->spec_id) - 700000;

	cr_assert(i >= 0 && i < 32, "spec_id %s", s->spec_id);
	b->n++;
	b->cls[i] = l->cls;
	b->oh[i] = l->oh;
	b->oh_err[i] = l->oh_err;
	return 0;
}

static const struct cat_row sel_rows[] = {
	/* i, BPTCLASS (-99: not in MPA-JHU), OH p16/p50/p84, Portsmouth BPT */
	{ 1, 1, 8.8f, 8.9f, 9.0f, "Star Forming" },   /* z = 0.001: cut */
	{ 2, 1, 8.8f, 8.9f, 9.0f, "Star Forming" },   /* z = 0.35: cut */
	{ 3, 1, 8.8f, 8.9f, 9.0f, "Star Forming" },   /* ZWARNING = 4: cut */
	{ 4, 1, 8.8f, 8.9f, 9.0f, "Star Forming" },   /* S/N_r = 4.9: cut */
	{ 5, -99, 0, 0, 0, "Star Forming" },           /* not in MPA-JHU */
	{ 6, 1, 8.8f, 8.9f, 9.0f, NULL },              /* not in Portsmouth */
	{ 7, 1, 8.8f, 8.9f, 9.0f, "Composite" },       /* disagree */
	{ 8, 1, -9999, -9999, -9999, "Star Forming" }, /* OH_P50 = -9999 */
	{ 9, 2, 8.70f, 8.80f, 8.94f, "Star Forming" }, /* star-forming */
	{ 10, -1, -9999, -9999, -9999, "BLANK" },      /* passive */
	{ 11, 3, -9999, -9999, -9999, "Composite" },   /* composite */
	{ 12, 4, -9999, -9999, -9999, "Seyfert" },     /* AGN */
	{ 13, 5, -9999, -9999, -9999, "LINER" },       /* AGN */
	{ 14, 4, -9999, -9999, -9999, "LINER/Seyfert" }, /* AGN */
	{ 15, 0, -9999, -9999, -9999, "BLANK" },       /* BPTCLASS 0: no class */
	{ 16, 1, 8.8f, 8.9f, 9.0f, "Star Forming" },   /* S/N_r = 5.0: kept */
};

static void make_selection_inputs(void)
{
	const int n = sizeof(sel_rows) / sizeof(sel_rows[0]);

	for (int k = 0; k < n; k++) {
		const int i = sel_rows[k].i;

		make_spec(i, i == 1 ? 0.001 : i == 2 ? 0.35 : 0.05, i == 3 ? 4 : 0,
			  i == 4 ? 4.9 : i == 16 ? 5.0 : 20.0);
	}
	make_catalogues(sel_rows, n);
}

Test(archive, paper_selection_every_cut_and_table_1)
{
	char out[300];
	char *paths[1] = { out };
	struct by_id b = { 0 };

	make_selection_inputs();
	snprintf(out, sizeof(out), "%s/sel", dir);
	cr_assert_eq(run("sel.log", BIN "/mtlz archive -o %s --mpajhu %s/galSpecExtra.fits "
			 "--portsmouth %s/emissionLinesPort.fits %s/specs", out, dir, dir, dir), 0);
	cr_assert(log_has("sel.log", "16 spectra read from 16 files"));
	cr_assert(log_has("sel.log", "removed        2  redshift outside the range"));
	cr_assert(log_has("sel.log", "removed        1  ZWARNING != 0"));
	cr_assert(log_has("sel.log", "removed        1  S/N_r below the minimum"));
	cr_assert(log_has("sel.log", "removed        1  not in the MPA-JHU catalogue"));
	cr_assert(log_has("sel.log", "removed        1  not in the Portsmouth catalogue"));
	cr_assert(log_has("sel.log", "removed        2  no agreed class (Table 1)"));
	cr_assert(log_has("sel.log", "removed        1  star-forming without a metallicity"));
	cr_assert(log_has("sel.log", "kept 7: passive 1, star_forming 2, composite 1, agn 3"));
	cr_assert_eq(mtlz_archive_read(avro, paths, 1, by_id_fn, &b, err, sizeof(err)), 0,
		     "%s", err);
	cr_assert_eq(b.n, 7);
	cr_assert_eq(b.cls[9], MTLZ_CLASS_STAR_FORMING);
	cr_assert_float_eq(b.oh[9], 8.80, 1e-6);
	cr_assert_float_eq(b.oh_err[9], 0.5 * (8.94 - 8.70), 1e-6, "half the 16-84 range");
	cr_assert_eq(b.cls[10], MTLZ_CLASS_PASSIVE);
	cr_assert(isnan(b.oh[10]), "only star-forming labels carry O/H");
	cr_assert_eq(b.cls[11], MTLZ_CLASS_COMPOSITE);
	cr_assert(b.cls[12] == MTLZ_CLASS_AGN && b.cls[13] == MTLZ_CLASS_AGN &&
		  b.cls[14] == MTLZ_CLASS_AGN);
	cr_assert_eq(b.cls[16], MTLZ_CLASS_STAR_FORMING, "S/N_r = 5 passes S/N_r >= 5");
}

Test(archive, balanced_subsampling_is_seeded)
{
	char a[300], b2[300], c[300];
	char *paths[1] = { a };
	struct by_id b = { 0 };

	make_selection_inputs();
	snprintf(a, sizeof(a), "%s/bal-a", dir);
	snprintf(b2, sizeof(b2), "%s/bal-b", dir);
	snprintf(c, sizeof(c), "%s/bal-c", dir);
	for (int k = 0; k < 3; k++)
		cr_assert_eq(run("bal.log", BIN "/mtlz archive -o %s --mpajhu %s/galSpecExtra.fits "
				 "--portsmouth %s/emissionLinesPort.fits --balance --seed %d %s/specs",
				 k == 0 ? a : k == 1 ? b2 : c, dir, dir, k == 2 ? 8 : 7, dir), 0);
	cr_assert(log_has("bal.log", "removed        3  balanced subsampling"));
	cr_assert(log_has("bal.log", "kept 4: passive 1, star_forming 1, composite 1, agn 1"));
	cr_assert_eq(mtlz_archive_read(avro, paths, 1, by_id_fn, &b, err, sizeof(err)), 0);
	cr_assert_eq(b.n, 4);
	cr_assert_eq(run("cmp.log", "cmp %s/part-00000.avro %s/part-00000.avro", a, b2), 0,
		     "the same seed draws the same spectra");
	(void)c;
}

struct spz {
	int n;
	char ids[8][64];
	int cls[8];
};

static int spz_fn(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct spz *z = opaque;

	cr_assert_lt(z->n, 8);
	snprintf(z->ids[z->n], sizeof(z->ids[0]), "%s", s->spec_id);
	z->cls[z->n++] = l->cls;
	cr_assert_str_eq(l->source_name, "SDSS SPZLINE");
	return 0;
}

Test(archive, spzline_labels_on_the_real_fixtures)
{
	char out[300];
	char *paths[1] = { out };
	struct spz z = { 0 };
	mtlz_sdss_info in;
	mtlz_labels lb;
	const char *why;

	/* spec-0266-51602-0001: Hb S/N 0.7, [N II]/Ha = 250.3/465.8 (log -0.27
	 * < log 0.6): low-S/N star-forming; N2 = -0.27 is outside PP04's N2 range */
	cr_assert_eq(mtlz_sdss_info_read(MTLZ_TEST_DATA "/spec-0266-51602-0001.fits", &in, err,
					 sizeof(err)), 0, "%s", err);
	cr_assert_float_eq(in.flux[MTLZ_SPZ_HA], 465.805, 1e-3);
	cr_assert_float_eq(in.err[MTLZ_SPZ_NII], 11.453, 1e-3);
	mtlz_labels_init(&lb);
	cr_assert_eq(mtlz_labels_from_lines(&in, &lb, &why), MTLZ_CLASS_STAR_FORMING);
	cr_assert(isnan(lb.oh) && why && strstr(why, "outside"), "%s", why ? why : "-");

	snprintf(out, sizeof(out), "%s/spz", dir);
	cr_assert_eq(run("spz.log", BIN "/mtlz archive -o %s %s/spec-0266-51602-0001.fits "
			 "%s/spec-0266-51630-0174.fits %s/spec-0266-51602-0573.fits "
			 "%s/spec-3586-55181-0003.fits", out, MTLZ_TEST_DATA, MTLZ_TEST_DATA,
			 MTLZ_TEST_DATA, MTLZ_TEST_DATA), 0);
	/* 3586-55181-0003: z = 0.589, ZWARNING = 4: cut (by z, the first cut) */
	cr_assert(log_has("spz.log", "removed        1  redshift outside the range"));
	cr_assert(log_has("spz.log", "removed        1  star-forming without a metallicity"));
	cr_assert_eq(mtlz_archive_read(avro, paths, 1, spz_fn, &z, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(z.n, 2);
	/* 51630-0174: SUBCLASS BROADLINE, Ha not fitted: AGN;
	 * 51602-0573: no line with S/N >= 3: passive */
	cr_assert_eq(z.cls[0], MTLZ_CLASS_AGN, "%s", z.ids[0]);
	cr_assert_eq(z.cls[1], MTLZ_CLASS_PASSIVE, "%s", z.ids[1]);
}
