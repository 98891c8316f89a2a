/*
 * sdss_labels.c - SDSS selection quantities, SPZLINE labels and the
 * value-added catalogues (sdss_labels.h).
 */
#define _POSIX_C_SOURCE 200809L
#include "sdss_labels.h"
#include "bpt.h"
#include "common.h"

#include <fitsio.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- spec files ------------------------------------------------------- */

static int colnum(fitsfile *f, const char *name, int *col)
{
	int st = 0;

	return fits_get_colnum(f, CASEINSEN, (char *)name, col, &st) ? -1 : 0;
}

/* Element `elem` (1-based) of column `name` in row `row` as a double;
 * NaN when the column is absent or unreadable. */
static double col_double(fitsfile *f, const char *name, long row, long elem)
{
	double x = NAN;
	int col, any, st = 0;

	if (colnum(f, name, &col) || fits_read_col(f, TDOUBLE, col, row, elem, 1, NULL, &x,
						   &any, &st))
		return NAN;
	return x;
}

static int col_int(fitsfile *f, const char *name, long row, int dflt)
{
	const double x = col_double(f, name, row, 1);

	return isfinite(x) ? (int)x : dflt;
}

/* A string cell (at most size - 1 characters); "" when absent. */
static void col_string(fitsfile *f, const char *name, long row, char *out, size_t size)
{
	char buf[128] = "", *p = buf;
	int col, any, st = 0, type;
	long repeat, width;

	out[0] = '\0';
	if (colnum(f, name, &col) || fits_get_coltype(f, col, &type, &repeat, &width, &st) ||
	    type != TSTRING || repeat >= (long)sizeof(buf) ||
	    fits_read_col(f, TSTRING, col, row, 1, 1, NULL, &p, &any, &st))
		return;
	snprintf(out, size, "%s", buf);
}

/* SPECOBJID as a string (SDSS) or a 64-bit integer (unsigned via TZERO). */
static uint64_t col_specobjid(fitsfile *f, long row)
{
	char s[32];
	unsigned long long v = 0;
	int col, any, st = 0, type;
	long repeat, width;

	if (colnum(f, "SPECOBJID", &col) || fits_get_coltype(f, col, &type, &repeat, &width, &st))
		return 0;
	if (type == TSTRING) {
		char *end;

		col_string(f, "SPECOBJID", row, s, sizeof(s));
		v = strtoull(s, &end, 10);
		return end != s ? (uint64_t)v : 0;
	}
	if (fits_read_col(f, TULONGLONG, col, row, 1, 1, NULL, &v, &any, &st))
		return 0;
	return (uint64_t)v;
}

int mtlz_sdss_info_read(const char *path, mtlz_sdss_info *in, char *errstr,
			size_t errstr_size)
{
	static const double rest[MTLZ_SPZ_N_LINES] = { 4862.68, 5008.24, 6564.61, 6585.27 };
	fitsfile *f;
	int st = 0;
	long rows = 0;

	memset(in, 0, sizeof(*in));
	in->plate = in->mjd = in->fiber = -1;
	in->sn_r = NAN;
	for (int k = 0; k < MTLZ_SPZ_N_LINES; k++)
		in->flux[k] = in->err[k] = NAN;
	if (fits_open_file(&f, path, READONLY, &st))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: cannot open (cfitsio %d)",
				path, st);
	if (fits_movnam_hdu(f, BINARY_TBL, "SPECOBJ", 0, &st)) {
		st = 0;
		if (fits_movnam_hdu(f, BINARY_TBL, "SPALL", 0, &st)) {
			st = 0;
			fits_close_file(f, &st);
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"%s: no SPECOBJ or SPALL HDU (not an SDSS spec file)", path);
		}
	}
	in->specobjid = col_specobjid(f, 1);
	in->plate = col_int(f, "PLATE", 1, -1);
	in->mjd = col_int(f, "MJD", 1, -1);
	in->fiber = col_int(f, "FIBERID", 1, -1);
	in->sn_r = col_double(f, "SN_MEDIAN", 1, 3);
	col_string(f, "SUBCLASS", 1, in->subclass, sizeof(in->subclass));
	if (fits_movnam_hdu(f, BINARY_TBL, "SPZLINE", 0, &st) == 0 &&
	    fits_get_num_rows(f, &rows, &st) == 0) {
		for (long r = 1; r <= rows; r++) {
			const double w = col_double(f, "LINEWAVE", r, 1);

			for (int k = 0; k < MTLZ_SPZ_N_LINES; k++)
				if (fabs(w - rest[k]) < 0.5) {
					in->flux[k] = col_double(f, "LINEAREA", r, 1);
					in->err[k] = col_double(f, "LINEAREA_ERR", r, 1);
				}
		}
		in->have_lines = 1;
	}
	st = 0;
	fits_close_file(f, &st);
	return MTLZ_OK;
}

static int detected(const mtlz_sdss_info *in, int k)
{
	return isfinite(in->flux[k]) && isfinite(in->err[k]) && in->err[k] > 0 &&
	       in->flux[k] / in->err[k] >= 3.0;
}

int mtlz_labels_from_lines(const mtlz_sdss_info *in, mtlz_labels *lb, const char **why)
{
	const int all = detected(in, MTLZ_SPZ_HB) && detected(in, MTLZ_SPZ_OIII) &&
			detected(in, MTLZ_SPZ_HA) && detected(in, MTLZ_SPZ_NII);
	const int any = detected(in, MTLZ_SPZ_HB) || detected(in, MTLZ_SPZ_OIII) ||
			detected(in, MTLZ_SPZ_HA) || detected(in, MTLZ_SPZ_NII);
	const char *rule;
	double n2 = NAN, o3 = NAN;

	*why = NULL;
	lb->cls = MTLZ_CLASS_NONE;
	lb->oh = lb->oh_err = NAN;
	if (!in->have_lines) {
		*why = "no SPZLINE HDU";
		return lb->cls;
	}
	if (detected(in, MTLZ_SPZ_HA) && detected(in, MTLZ_SPZ_NII))
		n2 = log10(in->flux[MTLZ_SPZ_NII] / in->flux[MTLZ_SPZ_HA]);
	if (detected(in, MTLZ_SPZ_HB) && detected(in, MTLZ_SPZ_OIII))
		o3 = log10(in->flux[MTLZ_SPZ_OIII] / in->flux[MTLZ_SPZ_HB]);
	if (all) {
		lb->cls = mtlz_bpt_class(n2, o3);
		rule = "BPT";
	} else if (isfinite(n2)) {
		lb->cls = n2 < log10(0.6) ? MTLZ_CLASS_STAR_FORMING : MTLZ_CLASS_AGN;
		rule = "low S/N [N II]/Ha";
	} else if (strstr(in->subclass, "BROADLINE")) {
		lb->cls = MTLZ_CLASS_AGN;
		rule = "SUBCLASS BROADLINE";
	} else if (!any) {
		lb->cls = MTLZ_CLASS_PASSIVE;
		rule = "no line detected";
	} else {
		*why = "lines partly detected: no class";
		return lb->cls;
	}
	mtlz_labels_kv_add(lb->params, &lb->n_params, "class_rule", "%s", rule);
	if (isfinite(n2))
		mtlz_labels_kv_add(lb->params, &lb->n_params, "log_nii_ha", "%.4f", n2);
	if (isfinite(o3))
		mtlz_labels_kv_add(lb->params, &lb->n_params, "log_oiii_hb", "%.4f", o3);
	if (lb->cls == MTLZ_CLASS_STAR_FORMING) {
		if (all && isfinite(lb->oh = mtlz_oh_o3n2_pp04(o3, n2))) {
			mtlz_labels_kv_add(lb->params, &lb->n_params, "metallicity_from", "O3N2");
		} else if (isfinite(lb->oh = mtlz_oh_n2_pp04(n2))) {
			mtlz_labels_kv_add(lb->params, &lb->n_params, "metallicity_from", "N2");
		} else {
			*why = "star-forming, but outside the O3N2 and N2 calibrations";
		}
	}
	snprintf(lb->source_method, sizeof(lb->source_method),
		 "SPZLINE S/N>=3; BPT Kauffmann03/Kewley01, low-S/N Brinchmann04; "
		 "O/H O3N2 or N2 (Pettini & Pagel 2004)");
	return lb->cls;
}

/* ---- catalogues ------------------------------------------------------- */

struct key {
	uint64_t k;
	size_t row;
};

struct mtlz_catalog {
	mtlz_catalog_row *rows;
	size_t n;
	struct key *by_id, *by_pmf;   /* sorted */
	size_t n_id, n_pmf;
};

static uint64_t pmf_key(int plate, int mjd, int fiber)
{
	return ((uint64_t)(uint32_t)plate << 40) | ((uint64_t)(uint32_t)mjd << 16) |
	       (uint64_t)(uint16_t)fiber;
}

static int cmp_key(const void *a, const void *b)
{
	const uint64_t x = ((const struct key *)a)->k, y = ((const struct key *)b)->k;

	return x < y ? -1 : x > y;
}

static float fcol(fitsfile *f, const char *name, long row)
{
	const double x = col_double(f, name, row, 1);

	/* the catalogues write -9999 (or -99) for "no value" */
	return isfinite(x) && x > -99 ? (float)x : NAN;
}

void mtlz_catalog_free(mtlz_catalog *c)
{
	if (!c)
		return;
	free(c->rows);
	free(c->by_id);
	free(c->by_pmf);
	free(c);
}

size_t mtlz_catalog_rows(const mtlz_catalog *c)
{
	return c->n;
}

mtlz_catalog *mtlz_catalog_load(const char *path, int kind, char *errstr,
				size_t errstr_size)
{
	const char *cls_col = kind == MTLZ_CAT_MPAJHU ? "BPTCLASS" : "BPT";
	mtlz_catalog *c = NULL;
	fitsfile *f;
	int st = 0, n_hdu = 0, col, hdutype, have_id, have_pmf;
	long rows = 0;

	if (fits_open_file(&f, path, READONLY, &st)) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: cannot open (cfitsio %d)", path, st);
		return NULL;
	}
	fits_get_num_hdus(f, &n_hdu, &st);
	for (int h = 2; h <= n_hdu; h++) {   /* the first table with the class column */
		st = 0;
		if (fits_movabs_hdu(f, h, &hdutype, &st) == 0 && hdutype == BINARY_TBL &&
		    colnum(f, cls_col, &col) == 0)
			break;
		st = 1;
	}
	if (st) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s: no binary table with a %s "
			 "column (%s catalogue expected)", path, cls_col,
			 kind == MTLZ_CAT_MPAJHU ? "MPA-JHU galSpecExtra" :
			 "Portsmouth emissionLinesPort");
		goto out;
	}
	have_id = colnum(f, "SPECOBJID", &col) == 0;
	have_pmf = (colnum(f, "PLATEID", &col) == 0 || colnum(f, "PLATE", &col) == 0) &&
		   colnum(f, "MJD", &col) == 0 && colnum(f, "FIBERID", &col) == 0;
	if (!have_id && !have_pmf) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s: no SPECOBJID and no "
			 "PLATEID/PLATE + MJD + FIBERID columns to match spectra by", path);
		goto out;
	}
	fits_get_num_rows(f, &rows, &st);
	c = calloc(1, sizeof(*c));
	if (!c || !(c->rows = calloc((size_t)rows + 1, sizeof(*c->rows))) ||
	    !(c->by_id = calloc((size_t)rows + 1, sizeof(*c->by_id))) ||
	    !(c->by_pmf = calloc((size_t)rows + 1, sizeof(*c->by_pmf)))) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "%s: out of memory", path);
		mtlz_catalog_free(c);
		c = NULL;
		goto out;
	}
	for (long r = 1; r <= rows; r++) {
		mtlz_catalog_row *row = &c->rows[c->n];
		const char *pc = colnum(f, "PLATEID", &col) == 0 ? "PLATEID" : "PLATE";

		if (kind == MTLZ_CAT_MPAJHU) {
			row->bptclass = col_int(f, "BPTCLASS", r, -9999);
			row->oh_p16 = fcol(f, "OH_P16", r);
			row->oh_p50 = fcol(f, "OH_P50", r);
			row->oh_p84 = fcol(f, "OH_P84", r);
			row->lgm_tot_p50 = fcol(f, "LGM_TOT_P50", r);
			row->lgm_fib_p50 = fcol(f, "LGM_FIB_P50", r);
		} else {
			col_string(f, "BPT", r, row->bpt, sizeof(row->bpt));
		}
		if (have_id && (c->by_id[c->n_id].k = col_specobjid(f, r)) != 0)
			c->by_id[c->n_id++].row = c->n;
		if (have_pmf) {
			c->by_pmf[c->n_pmf].k = pmf_key(col_int(f, pc, r, -1), col_int(f, "MJD", r, -1),
							 col_int(f, "FIBERID", r, -1));
			c->by_pmf[c->n_pmf++].row = c->n;
		}
		c->n++;
	}
	qsort(c->by_id, c->n_id, sizeof(*c->by_id), cmp_key);
	qsort(c->by_pmf, c->n_pmf, sizeof(*c->by_pmf), cmp_key);
out:
	st = 0;
	fits_close_file(f, &st);
	return c;
}

static const struct key *find(const struct key *v, size_t n, uint64_t k)
{
	const struct key want = { k, 0 };

	return n ? bsearch(&want, v, n, sizeof(*v), cmp_key) : NULL;
}

const mtlz_catalog_row *mtlz_catalog_find(const mtlz_catalog *c, uint64_t specobjid,
					  int plate, int mjd, int fiber)
{
	const struct key *k = NULL;

	if (specobjid && c->n_id)
		k = find(c->by_id, c->n_id, specobjid);
	/* SPECOBJIDs changed between DR7 (MPA-JHU) and DR8+: fall back */
	if (!k && plate >= 0 && mjd >= 0 && fiber >= 0)
		k = find(c->by_pmf, c->n_pmf, pmf_key(plate, mjd, fiber));
	return k ? &c->rows[k->row] : NULL;
}
