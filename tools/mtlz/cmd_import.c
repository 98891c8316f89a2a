/*
 * cmd_import.c - `mtlz import -o DIR FILE...`: labelled spectra from JSON
 * lines or CSV (gzip or not) into a training archive (archive.h). The field
 * mapping is in docs/labels.md; every record that cannot be imported is
 * reported with file:line and skipped, the others carry on.
 */
#define _GNU_SOURCE
#include "archive.h"
#include "bpt.h"
#include "cli.h"
#include "common.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

static const char usage[] =
	"usage: mtlz import -o DIR [options] FILE...\n"
	"Imports labelled spectra from JSON lines (.jsonl, .ndjson, .json) or CSV (.csv),\n"
	"gzip-compressed or not, into a training archive (a directory of Avro\n"
	"container files of schemas/labelled_spectrum.avsc). docs/labels.md has the\n"
	"field mapping.\n"
	"  -o, --output DIR        archive directory (created; must not hold an archive)\n"
	"      --format F          auto (by extension), jsonl or csv\n"
	"      --field KEY=NAME    read KEY from field NAME (KEY: spec_id, survey, redshift,\n"
	"                          zwarning, sn_median, wavelength, loglam, flux, ivar,\n"
	"                          mask, class, metallicity, metallicity_err, log_mass,\n"
	"                          sn_r, log_nii_ha, log_oiii_hb); repeatable\n"
	"      --survey NAME       survey tag when the records have none (default sdss)\n"
	"      --metallicity M     auto (a metallicity field, else O3N2 from the two line\n"
	"                          ratios), column, o3n2, n2 or none; only star-forming\n"
	"                          labels carry one\n"
	"      --source NAME       label source name (default: import of FILE)\n"
	"      --source-version V  label source version\n"
	"      --per-file N        records per archive file (default 10000)\n"
	"      --codec C           deflate (default) or null\n";

enum field_key {
	F_SPEC_ID, F_SURVEY, F_REDSHIFT, F_ZWARNING, F_SN_MEDIAN, F_WAVELENGTH, F_LOGLAM,
	F_FLUX, F_IVAR, F_MASK, F_CLASS, F_METAL, F_METAL_ERR, F_LOG_MASS, F_SN_R,
	F_LOG_NII_HA, F_LOG_OIII_HB, N_FIELDS
};

/* Canonical key, then the names tried by default (first found wins). */
static const char *const default_names[N_FIELDS][6] = {
	{ "spec_id", "spec_id", "spec_obj_id", "specobjid", "targetid", NULL },
	{ "survey", "survey", NULL },
	{ "redshift", "redshift", "z", NULL },
	{ "zwarning", "zwarning", "zwarn", NULL },
	{ "sn_median", "sn_median", "sn_median_all", "snr", NULL },
	{ "wavelength", "wavelength", "wave", "lambda", NULL },
	{ "loglam", "loglam", NULL },
	{ "flux", "flux", NULL },
	{ "ivar", "ivar", NULL },
	{ "mask", "mask", "and_mask", NULL },
	{ "class", "class", "bpt_class", "bptclass", "bpt", NULL },
	{ "metallicity", "metallicity", "oh_p50", "oh", NULL },
	{ "metallicity_err", "metallicity_err", "oh_err", NULL },
	{ "log_mass", "log_mass", "lgm_tot_p50", "log_stellar_mass", NULL },
	{ "sn_r", "sn_r", "snr_r", NULL },
	{ "log_nii_ha", "log_nii_ha", NULL },
	{ "log_oiii_hb", "log_oiii_hb", NULL },
};

enum { M_AUTO, M_COLUMN, M_O3N2, M_N2, M_NONE };

struct import {
	const char *override[N_FIELDS];
	const char *survey, *source, *source_version;
	int metal_mode;
	mtlz_archive_writer *w;
	long n_ok, n_skipped, by_class[MTLZ_N_CLASSES + 1], n_metal;
	int class_numeric_seen, class_text_seen;
};

/* ---- reading lines (gzip or plain, any length) ------------------------ */

struct lines {
	gzFile f;
	char *buf;
	size_t cap;
	long lineno;
};

/* Next line without its newline, or NULL at the end. */
static char *next_line(struct lines *ls)
{
	size_t len = 0;

	if (!ls->buf && !(ls->buf = malloc(ls->cap = 1 << 16)))
		return NULL;
	for (;;) {
		if (!gzgets(ls->f, ls->buf + len, (int)MTLZ_MIN(ls->cap - len, (size_t)1 << 30))) {
			if (len == 0)
				return NULL;
			break;
		}
		len += strlen(ls->buf + len);
		if (len && ls->buf[len - 1] == '\n')
			break;
		if (ls->cap - len < 2) {
			char *nb = realloc(ls->buf, ls->cap * 2);

			if (!nb)
				return NULL;
			ls->buf = nb;
			ls->cap *= 2;
		}
	}
	while (len && (ls->buf[len - 1] == '\n' || ls->buf[len - 1] == '\r'))
		ls->buf[--len] = '\0';
	ls->lineno++;
	return ls->buf;
}

/* ---- CSV rows as JSON objects ---------------------------------------- */

/* Splits a CSV line in place (RFC 4180 quoting within one line); returns
 * the number of cells, -1 on an unterminated quote. */
static int csv_split(char *line, char **cells, int max)
{
	int n = 0;
	char *p = line;

	for (;;) {
		char *out = p, *start = p;

		if (n == max)
			return -1;
		if (*p == '"') {
			p++;
			for (;;) {
				if (*p == '\0')
					return -1;
				if (*p == '"' && p[1] == '"') {
					*out++ = '"';
					p += 2;
				} else if (*p == '"') {
					p++;
					break;
				} else {
					*out++ = *p++;
				}
			}
			while (*p && *p != ',')
				p++;
		} else {
			while (*p && *p != ',')
				p++;
			out = p;
		}
		cells[n++] = start;
		if (*p == '\0') {
			*out = '\0';
			return n;
		}
		*out = '\0';
		p++;
	}
}

/* A CSV cell as JSON: empty -> null, a number, an array ("[1,2]" or
 * numbers separated by blanks or ';'), else a string. */
static json_t *csv_value(const char *cell)
{
	char *end;
	double x;

	while (isspace((unsigned char)*cell))
		cell++;
	if (*cell == '\0')
		return json_null();
	if (*cell == '[')
		return json_loads(cell, JSON_DECODE_ANY, NULL);
	x = strtod(cell, &end);
	if (end != cell) {
		while (isspace((unsigned char)*end))
			end++;
		if (*end == '\0') {
			long long i = strtoll(cell, &end, 10);

			return *end == '\0' || isspace((unsigned char)*end) ?
				json_integer(i) : json_real(x);
		}
		if (*end == ';' || isspace((unsigned char)end[-1])) {
			json_t *arr = json_array();
			const char *p = cell;

			while (arr && *p) {
				x = strtod(p, &end);
				if (end == p) {
					json_decref(arr);
					return json_string(cell);
				}
				json_array_append_new(arr, json_real(x));
				p = end;
				while (isspace((unsigned char)*p) || *p == ';')
					p++;
			}
			return arr;
		}
	}
	return json_string(cell);
}

/* ---- one record ------------------------------------------------------ */

static json_t *get(const struct import *im, json_t *rec, int key)
{
	json_t *v;

	if (im->override[key])
		return json_object_get(rec, im->override[key]);
	for (int i = 1; i < 6 && default_names[key][i]; i++)
		if ((v = json_object_get(rec, default_names[key][i])))
			return v;
	return NULL;
}

static int is_mapped(const struct import *im, json_t *rec, const char *name)
{
	for (int k = 0; k < N_FIELDS; k++) {
		json_t *v = get(im, rec, k);

		if (v && v == json_object_get(rec, name) &&
		    (k == F_WAVELENGTH || k == F_LOGLAM || k == F_FLUX || k == F_IVAR ||
		     k == F_MASK || k == F_SPEC_ID || k == F_SURVEY))
			return 1;
	}
	return 0;
}

static double num(json_t *v)
{
	return json_is_number(v) ? json_number_value(v) : NAN;
}

/* A numeric array into a new float/double buffer; -1 if not one. */
static int get_array(json_t *v, size_t n_want, int dbl, void **out, size_t *n)
{
	size_t len = json_array_size(v);

	if (!json_is_array(v) || len == 0 || (n_want && len != n_want))
		return -1;
	*out = malloc(len * (dbl ? 8 : 4));
	if (!*out)
		return -1;
	for (size_t i = 0; i < len; i++) {
		json_t *e = json_array_get(v, i);
		double x = json_is_null(e) ? NAN : num(e);

		if (!json_is_null(e) && !json_is_number(e)) {
			free(*out);
			*out = NULL;
			return -1;
		}
		if (dbl)
			((double *)*out)[i] = x;
		else
			((float *)*out)[i] = (float)x;
	}
	*n = len;
	return 0;
}

static int parse_class(struct import *im, json_t *v)
{
	if (json_is_integer(v)) {
		im->class_numeric_seen = 1;
		return mtlz_class_from_bptclass((int)json_integer_value(v));
	}
	if (json_is_string(v)) {
		const char *s = json_string_value(v);
		int c = mtlz_class_parse(s);

		im->class_text_seen = 1;
		if (c >= MTLZ_CLASS_NONE)
			return c;
		if (strcasecmp(s, "star-forming") == 0 || strcasecmp(s, "starforming") == 0)
			return MTLZ_CLASS_STAR_FORMING;
		return mtlz_class_from_portsmouth(s);
	}
	return MTLZ_CLASS_NONE;
}

static void survey_labels(const struct import *im, json_t *rec, mtlz_labels *lb)
{
	const char *k;
	json_t *v;

	json_object_foreach(rec, k, v) {
		char text[96] = "";

		if (is_mapped(im, rec, k))
			continue;
		if (json_is_string(v)) {
			snprintf(text, sizeof(text), "%s", json_string_value(v));
		} else if (json_is_integer(v)) {
			snprintf(text, sizeof(text), "%lld", (long long)json_integer_value(v));
		} else if (json_is_real(v)) {
			snprintf(text, sizeof(text), "%.10g", json_real_value(v));
		} else if (json_is_boolean(v)) {
			snprintf(text, sizeof(text), "%s", json_is_true(v) ? "true" : "false");
		} else if (json_is_array(v) && json_array_size(v) < 32) {
			size_t i;
			json_t *e;

			json_array_foreach(v, i, e)
				if (json_is_string(e))
					snprintf(text + strlen(text), sizeof(text) - strlen(text),
						 "%s%s", i ? "," : "", json_string_value(e));
		} else {
			continue;   /* null, objects, long arrays */
		}
		if (mtlz_labels_kv_add(lb->survey, &lb->n_survey, k, "%s", text) < 0)
			lb->n_dropped++;
	}
}

/* Converts one record; on failure returns -1 with the reason in why. */
static int convert(struct import *im, json_t *rec, mtlz_spectrum *s, mtlz_labels *lb,
		   char *why, size_t why_size)
{
	json_t *v, *wave = get(im, rec, F_WAVELENGTH), *loglam = get(im, rec, F_LOGLAM);
	void *p;
	size_t n;

	if (!json_is_object(rec))
		return snprintf(why, why_size, "not a JSON object"), -1;
	v = get(im, rec, F_SPEC_ID);
	if (json_is_string(v) && json_string_length(v) > 0 && json_string_length(v) < 64)
		snprintf(s->spec_id, sizeof(s->spec_id), "%s", json_string_value(v));
	else if (json_is_integer(v))
		snprintf(s->spec_id, sizeof(s->spec_id), "%lld", (long long)json_integer_value(v));
	else if (json_is_integer(json_object_get(rec, "plate")) &&
		 json_is_integer(json_object_get(rec, "mjd")) &&
		 json_is_integer(json_object_get(rec, "fiber")))
		snprintf(s->spec_id, sizeof(s->spec_id), "%04lld-%05lld-%04lld",
			 (long long)json_integer_value(json_object_get(rec, "plate")),
			 (long long)json_integer_value(json_object_get(rec, "mjd")),
			 (long long)json_integer_value(json_object_get(rec, "fiber")));
	else
		return snprintf(why, why_size, "no usable spec_id (1..63 characters)"), -1;
	v = get(im, rec, F_SURVEY);
	snprintf(s->survey, sizeof(s->survey), "%s", json_is_string(v) ? json_string_value(v) :
		 im->survey);
	s->z = num(get(im, rec, F_REDSHIFT));
	v = get(im, rec, F_ZWARNING);
	s->zwarning = json_is_integer(v) ? (int)json_integer_value(v) : -1;
	s->sn = num(get(im, rec, F_SN_MEDIAN));
	if (get_array(get(im, rec, F_FLUX), 0, 0, &p, &n))
		return snprintf(why, why_size, "flux: missing or not an array of numbers"), -1;
	s->flux = p;
	s->n = n;
	s->grid_kind = MTLZ_GRID_EXPLICIT;
	if (wave) {
		if (get_array(wave, n, 1, &p, &n))
			return snprintf(why, why_size, "wavelength: not an array of %zu numbers", s->n), -1;
		s->wave = p;
	} else if (loglam) {
		if (get_array(loglam, n, 1, &p, &n))
			return snprintf(why, why_size, "loglam: not an array of %zu numbers", s->n), -1;
		s->wave = p;
		for (size_t i = 0; i < n; i++)
			s->wave[i] = pow(10.0, s->wave[i]);
	} else {
		return snprintf(why, why_size, "no wavelength (or loglam) array"), -1;
	}
	for (size_t i = 0; i < n; i++)
		if (!isfinite(s->wave[i]) || s->wave[i] <= 0 || (i && s->wave[i] <= s->wave[i - 1]))
			return snprintf(why, why_size, "wavelength[%zu] = %g: not positive, finite "
					"and strictly increasing", i, s->wave[i]), -1;
	v = get(im, rec, F_IVAR);
	if (v && !json_is_null(v)) {
		if (get_array(v, n, 0, &p, &n))
			return snprintf(why, why_size, "ivar: not an array of %zu numbers", s->n), -1;
		s->ivar = p;
	}
	v = get(im, rec, F_MASK);
	if (v && !json_is_null(v)) {
		double *m;

		if (get_array(v, n, 1, &p, &n))
			return snprintf(why, why_size, "mask: not an array of %zu numbers", s->n), -1;
		m = p;
		s->and_mask = malloc(n * sizeof(uint32_t));
		if (!s->and_mask) {
			free(m);
			return snprintf(why, why_size, "out of memory"), -1;
		}
		for (size_t i = 0; i < n; i++)
			s->and_mask[i] = isfinite(m[i]) && m[i] >= 0 ? (uint32_t)m[i] : 0;
		free(m);
	}

	lb->cls = parse_class(im, get(im, rec, F_CLASS));
	lb->z = s->z;
	lb->log_mass = num(get(im, rec, F_LOG_MASS));
	lb->sn_r = num(get(im, rec, F_SN_R));
	if (lb->cls == MTLZ_CLASS_STAR_FORMING) {
		const double col = num(get(im, rec, F_METAL));
		const double n2 = num(get(im, rec, F_LOG_NII_HA));
		const double o3 = num(get(im, rec, F_LOG_OIII_HB));

		switch (im->metal_mode) {
		case M_AUTO:
			lb->oh = isfinite(col) && col > 0 ? col : mtlz_oh_o3n2_pp04(o3, n2);
			if (isfinite(lb->oh))
				mtlz_labels_kv_add(lb->params, &lb->n_params, "metallicity_from",
						   "%s", isfinite(col) && col > 0 ? "field" : "o3n2");
			break;
		case M_COLUMN: lb->oh = isfinite(col) && col > 0 ? col : NAN; break;
		case M_O3N2: lb->oh = mtlz_oh_o3n2_pp04(o3, n2); break;
		case M_N2: lb->oh = mtlz_oh_n2_pp04(n2); break;
		default: break;
		}
		if (isfinite(lb->oh))
			lb->oh_err = num(get(im, rec, F_METAL_ERR));
	}
	survey_labels(im, rec, lb);
	return 0;
}

static const char *metal_method(int mode)
{
	switch (mode) {
	case M_AUTO: return "metallicity field, else O3N2 (Pettini & Pagel 2004)";
	case M_COLUMN: return "metallicity field";
	case M_O3N2: return "O3N2 (Pettini & Pagel 2004): 8.73 - 0.32 O3N2, O3N2 < 1.9";
	case M_N2: return "N2 (Pettini & Pagel 2004): 8.90 + 0.57 N2, -2.5 < N2 < -0.3";
	default: return "none";
	}
}

static int import_file(struct import *im, const char *path, int format)
{
	struct lines ls = { 0 };
	char *line, **header = NULL, *hdr_copy = NULL, why[256], err[512];
	char base[256];
	int n_header = 0, rc = 0;

	ls.f = gzopen(path, "rb");
	if (!ls.f) {
		cli_error("import: %s: %s", path, strerror(errno ? errno : EIO));
		return -1;
	}
	snprintf(base, sizeof(base), "%s", path);
	if (format == 0) {   /* auto */
		char tmp[256];
		size_t l;

		snprintf(tmp, sizeof(tmp), "%s", path);
		l = strlen(tmp);
		if (l > 3 && strcmp(tmp + l - 3, ".gz") == 0)
			tmp[l - 3] = '\0';
		l = strlen(tmp);
		format = l > 4 && strcasecmp(tmp + l - 4, ".csv") == 0 ? 2 : 1;
	}
	while ((line = next_line(&ls))) {
		json_t *rec = NULL;
		mtlz_spectrum s;
		mtlz_labels lb;
		json_error_t jerr;

		if (*line == '\0' || (format == 1 && *line == '#'))
			continue;
		if (format == 2 && !header) {
			hdr_copy = strdup(line);
			header = calloc(4096, sizeof(*header));
			if (!hdr_copy || !header ||
			    (n_header = csv_split(hdr_copy, header, 4096)) < 1) {
				cli_error("import: %s:%ld: cannot read the CSV header", path,
					  ls.lineno);
				rc = -1;
				break;
			}
			continue;
		}
		if (format == 1) {
			rec = json_loads(line, 0, &jerr);
			if (!rec)
				snprintf(why, sizeof(why), "not JSON: %s (column %d)", jerr.text,
					 jerr.column);
		} else {
			char *cells[4096];
			int n = csv_split(line, cells, 4096);

			if (n != n_header) {
				snprintf(why, sizeof(why), "%d cells, the header has %d", n, n_header);
			} else {
				rec = json_object();
				for (int i = 0; rec && i < n; i++)
					json_object_set_new(rec, header[i], csv_value(cells[i]));
			}
		}
		mtlz_spectrum_init(&s);
		mtlz_labels_init(&lb);
		snprintf(lb.source_name, sizeof(lb.source_name), "%s",
			 im->source ? im->source : "mtlz import");
		snprintf(lb.source_version, sizeof(lb.source_version), "%s",
			 im->source_version ? im->source_version : "");
		snprintf(lb.source_method, sizeof(lb.source_method),
			 "class: Table 1 of the paper; metallicity: %s", metal_method(im->metal_mode));
		mtlz_labels_kv_add(lb.params, &lb.n_params, "file", "%s", basename(base));
		if (rec && convert(im, rec, &s, &lb, why, sizeof(why)) == 0) {
			mtlz_labels_kv_add(lb.params, &lb.n_params, "line", "%ld", ls.lineno);
			if (mtlz_archive_writer_add(im->w, &s, &lb, err, sizeof(err))) {
				cli_error("import: %s:%ld: %s", path, ls.lineno, err);
				rc = -1;
			} else {
				im->n_ok++;
				im->by_class[lb.cls < 0 ? MTLZ_N_CLASSES : lb.cls]++;
				im->n_metal += isfinite(lb.oh);
			}
		} else {
			cli_error("import: %s:%ld: skipped: %s", path, ls.lineno, why);
			im->n_skipped++;
		}
		json_decref(rec);
		mtlz_spectrum_clear(&s);
		if (rc)
			break;
	}
	if (rc == 0 && !gzeof(ls.f)) {
		int zerr;

		cli_error("import: %s:%ld: read error: %s", path, ls.lineno, gzerror(ls.f, &zerr));
		rc = -1;
	}
	gzclose(ls.f);
	free(ls.buf);
	free(header);
	free(hdr_copy);
	return rc;
}

int cmd_import(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "output", required_argument, 0, 'o' },
		{ "format", required_argument, 0, 'F' },
		{ "field", required_argument, 0, 'f' },
		{ "survey", required_argument, 0, 's' },
		{ "metallicity", required_argument, 0, 'm' },
		{ "source", required_argument, 0, 'S' },
		{ "source-version", required_argument, 0, 'V' },
		{ "per-file", required_argument, 0, 'n' },
		{ "codec", required_argument, 0, 'c' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	static const char *const metal_modes[] = { "auto", "column", "o3n2", "n2", "none" };
	struct import im = { .survey = "sdss", .metal_mode = M_AUTO };
	const char *out = NULL, *codec = "deflate", *schemas = getenv("MTLZ_SCHEMA_DIR");
	int opt, format = 0, per_file = 10000, failed = 0;
	char err[512];
	mtlz_avro *avro;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'o': out = optarg; break;
		case 'F':
			format = !strcmp(optarg, "auto") ? 0 : !strcmp(optarg, "jsonl") ? 1 :
				 !strcmp(optarg, "csv") ? 2 : -1;
			if (format < 0) {
				cli_error("import: --format '%s': auto, jsonl or csv", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'f': {
			char *eq = strchr(optarg, '=');
			int k;

			for (k = 0; eq && k < N_FIELDS; k++)
				if (strlen(default_names[k][0]) == (size_t)(eq - optarg) &&
				    strncmp(optarg, default_names[k][0], (size_t)(eq - optarg)) == 0)
					break;
			if (!eq || k == N_FIELDS || !eq[1]) {
				cli_error("import: --field '%s': expected KEY=NAME with a KEY "
					  "listed in --help", optarg);
				return EXIT_USAGE;
			}
			im.override[k] = eq + 1;
			break;
		}
		case 's': im.survey = optarg; break;
		case 'm':
			im.metal_mode = -1;
			for (int k = 0; k < 5; k++)
				if (strcmp(optarg, metal_modes[k]) == 0)
					im.metal_mode = k;
			if (im.metal_mode < 0) {
				cli_error("import: --metallicity '%s': auto, column, o3n2, n2 or none",
					  optarg);
				return EXIT_USAGE;
			}
			break;
		case 'S': im.source = optarg; break;
		case 'V': im.source_version = optarg; break;
		case 'n':
			if (mtlz_parse_int(optarg, 1, 1 << 30, &per_file) < 0) {
				cli_error("import: --per-file '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'c': codec = optarg; break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	if (!out || optind == argc) {
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	if (strcmp(codec, "deflate") && strcmp(codec, "null")) {
		cli_error("import: --codec '%s': deflate or null", codec);
		return EXIT_USAGE;
	}
	avro = mtlz_avro_new(schemas ? schemas : MTLZ_SCHEMA_DIR, NULL, err, sizeof(err));
	if (!avro) {
		cli_error("import: %s", err);
		return EXIT_RUNTIME;
	}
	im.w = mtlz_archive_writer_open(avro, out, "part", (size_t)per_file, codec, err,
					sizeof(err));
	if (!im.w) {
		cli_error("import: %s", err);
		mtlz_avro_free(avro);
		return EXIT_RUNTIME;
	}
	for (int i = optind; i < argc; i++)
		failed |= import_file(&im, argv[i], format) != 0;
	if (mtlz_archive_writer_close(im.w, err, sizeof(err))) {
		cli_error("import: %s", err);
		failed = 1;
	}
	mtlz_avro_free(avro);
	fprintf(stderr, "import: %ld spectra into %s, %ld skipped; classes: passive %ld, "
		"star_forming %ld, composite %ld, agn %ld, none %ld; metallicities %ld\n",
		im.n_ok, out, im.n_skipped, im.by_class[0], im.by_class[1], im.by_class[2],
		im.by_class[3], im.by_class[4], im.n_metal);
	return failed || im.n_skipped ? EXIT_RUNTIME : EXIT_OK;
}
