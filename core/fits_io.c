/*
 * fits_io.c - see fits_io.h. Turns the reduced-spectrum files that SDSS,
 * BOSS and DESI serve into mtlz_spectrum records, the first step of the
 * offline tools (archive ingestion, evaluation) before preprocessing.
 *
 * Everything goes through cfitsio. The file type is detected from the HDU
 * names, whole columns and image rows are read with one call each, and every
 * cfitsio status is turned into an MTLZ_ERR_* code with a message naming the
 * file, the HDU, the column and cfitsio's text. Files are opened with
 * fits_open_diskfile so that '[' or '!' in a path is never parsed as
 * cfitsio's extended file-name syntax.
 *
 * SDSS/BOSS: one spectrum from COADD (flux, loglam, ivar, and_mask) and
 * SPECOBJ (SDSS) or SPALL (BOSS). The loglam grid is taken from the primary
 * header COEFF0/COEFF1 (full double precision) when the column lies on it;
 * per-object files are trimmed from the plate's grid, so COEFF0 may be a
 * whole number of pixels bluer than loglam[0] and the start is moved onto
 * the first row. Otherwise the float32 column itself gives the grid when it
 * is uniform, else the wavelengths are stored explicitly.
 *
 * DESI coadds: one spectrum per FIBERMAP row, the B/R/Z arms merged onto
 * their common linear grid (see desi_merge_linear()). Redshifts come from
 * the redrock-*.fits file beside the coadd when there is one.
 *
 * Locality: any thread; no shared state (the cfitsio in use is reentrant).
 */
#define _POSIX_C_SOURCE 200809L
#include "fits_io.h"
#include "common.h"

#include <ctype.h>
#include <errno.h>
#include <fitsio.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FIO_MAX_PIX 1000000       /* pixels per spectrum or arm, exclusive */
#define FIO_MAX_TARGETS 100000    /* DESI FIBERMAP rows, exclusive */
#define FIO_COEFF_TOL 1e-5        /* loglam column vs COEFF0/COEFF1 grid */
#define FIO_UNIFORM_TOL 1e-6      /* loglam column vs its own linear fit */
#define FIO_DESI_GRID_TOL 1e-3    /* Angstrom, arm pixel vs common grid */
#define FIO_MAX_STRCOL 1024       /* chars in a string cell we will read */

enum fio_type { FIO_UNKNOWN, FIO_SDSS, FIO_DESI };

/* One open file and where its errors go. */
struct rd {
	const char *path;
	fitsfile *f;
	char *errstr;
	size_t errstr_size;
	int coadd_hdu, meta_hdu;  /* SDSS: absolute HDU numbers */
	const char *meta_name;    /* "SPECOBJ" or "SPALL" */
};

/* ------------------------------------------------------------------ */
/* Errors and small cfitsio wrappers                                   */

/* Formats "<path>: <where>: <cfitsio text>" and maps the cfitsio status to
 * an MTLZ status: open/read failures are I/O, the rest is format. */
static int rd_fail(struct rd *r, int st, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int rd_fail(struct rd *r, int st, const char *fmt, ...)
{
	char where[256], text[FLEN_STATUS];
	va_list ap;
	int rc = MTLZ_ERR_FORMAT;

	va_start(ap, fmt);
	vsnprintf(where, sizeof(where), fmt, ap);
	va_end(ap);
	fits_get_errstatus(st, text);
	fits_clear_errmsg();
	if (st == FILE_NOT_OPENED || st == READ_ERROR)
		rc = MTLZ_ERR_IO;
	else if (st == MEMORY_ALLOCATION)
		rc = MTLZ_ERR_NOMEM;
	return mtlz_err(r->errstr, r->errstr_size, rc, "%s: %s: %s (cfitsio %d)%s",
			r->path, where, text, st,
			st == END_OF_FILE ? ", file truncated?" : "");
}

/* Sets *found to whether an HDU named `name` exists (and moves to it). */
static int rd_has_hdu(struct rd *r, const char *name, int *found)
{
	int st = 0;

	*found = 0;
	if (fits_movnam_hdu(r->f, ANY_HDU, (char *)name, 0, &st) == 0) {
		*found = 1;
		return MTLZ_OK;
	}
	if (st == BAD_HDU_NUM) {
		fits_clear_errmsg();
		return MTLZ_OK;
	}
	return rd_fail(r, st, "looking for HDU %s", name);
}

/* Looks a column up case-insensitively; *col = 0 when absent and
 * !required. A duplicated name resolves to its first column. */
static int rd_colnum(struct rd *r, const char *hdu, const char *name,
		     int required, int *col)
{
	int st = 0;

	*col = 0;
	fits_get_colnum(r->f, CASEINSEN, (char *)name, col, &st);
	if (st == COL_NOT_UNIQUE)
		st = 0;
	if (st == COL_NOT_FOUND && !required) {
		fits_clear_errmsg();
		*col = 0;
		return MTLZ_OK;
	}
	if (st)
		return rd_fail(r, st, "HDU %s column %s", hdu, name);
	return MTLZ_OK;
}

/* Elements per row of a column (its TFORM repeat count). */
static int rd_repeat(struct rd *r, const char *hdu, const char *name, int col,
		     long *repeat, int *typecode)
{
	int st = 0;
	long width;

	if (fits_get_coltype(r->f, col, typecode, repeat, &width, &st))
		return rd_fail(r, st, "HDU %s column %s", hdu, name);
	return MTLZ_OK;
}

/* Reads n elements of column `col` from `row`, starting at element `elem`. */
static int rd_col(struct rd *r, const char *hdu, const char *name, int col,
		  int type, long row, long elem, long n, void *dst)
{
	int st = 0;

	if (fits_read_col(r->f, type, col, row, elem, n, NULL, dst, NULL, &st))
		return rd_fail(r, st, "HDU %s column %s", hdu, name);
	return MTLZ_OK;
}

static int rd_nrows(struct rd *r, const char *hdu, long *n)
{
	int st = 0;

	if (fits_get_num_rows(r->f, n, &st))
		return rd_fail(r, st, "HDU %s: number of rows", hdu);
	return MTLZ_OK;
}

/* Copies s into dst without surrounding blanks, truncating to dst_size. */
static void copy_trimmed(char *dst, size_t dst_size, const char *s)
{
	size_t n;

	while (*s == ' ')
		s++;
	n = strlen(s);
	while (n && s[n - 1] == ' ')
		n--;
	if (n >= dst_size)
		n = dst_size - 1;
	memcpy(dst, s, n);
	dst[n] = '\0';
}

/* Reads string column `name` of `row` into dst, trimmed. */
static int rd_str(struct rd *r, const char *hdu, const char *name, int col,
		  long row, char *dst, size_t dst_size)
{
	long repeat;
	int tc, rc;
	char *buf, *p;

	rc = rd_repeat(r, hdu, name, col, &repeat, &tc);
	if (rc)
		return rc;
	if (repeat < 0 || repeat > FIO_MAX_STRCOL)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: HDU %s column %s: %ld-character strings "
				"(at most %d)", r->path, hdu, name, repeat,
				FIO_MAX_STRCOL);
	buf = calloc((size_t)repeat + 1, 1);
	if (!buf)
		return MTLZ_ERR_NOMEM;
	p = buf;
	rc = rd_col(r, hdu, name, col, TSTRING, row, 1, 1, &p);
	if (!rc)
		copy_trimmed(dst, dst_size, buf);
	free(buf);
	return rc;
}

/* ------------------------------------------------------------------ */
/* Output array                                                        */

/* Makes room for `extra` more spectra without changing s->n. */
static int spectra_reserve(mtlz_spectra *s, size_t extra)
{
	size_t cap = s->cap ? s->cap : 8;
	mtlz_spectrum *v;

	if (extra > SIZE_MAX / sizeof(*v) - s->n)
		return MTLZ_ERR_NOMEM;
	if (s->n + extra <= s->cap)
		return MTLZ_OK;
	while (cap < s->n + extra)
		cap = cap > SIZE_MAX / 2 / sizeof(*v) ? s->n + extra : cap * 2;
	v = realloc(s->v, cap * sizeof(*v));
	if (!v)
		return MTLZ_ERR_NOMEM;
	s->v = v;
	s->cap = cap;
	return MTLZ_OK;
}

mtlz_spectrum *mtlz_spectra_push(mtlz_spectra *s)
{
	mtlz_spectrum *sp;

	if (spectra_reserve(s, 1))
		return NULL;
	sp = &s->v[s->n++];
	mtlz_spectrum_init(sp);
	return sp;
}

void mtlz_spectra_free(mtlz_spectra *s)
{
	if (!s)
		return;
	for (size_t i = 0; i < s->n; i++)
		mtlz_spectrum_clear(&s->v[i]);
	free(s->v);
	s->v = NULL;
	s->n = s->cap = 0;
}

/* ------------------------------------------------------------------ */
/* Detection                                                           */

/* Writes "PRIMARY, COADD, ..." (the HDU names found) into buf. */
static void list_hdus(struct rd *r, char *buf, size_t size)
{
	int st = 0, n = 0, type;
	size_t len = 0;

	buf[0] = '\0';
	fits_get_num_hdus(r->f, &n, &st);
	for (int h = 1; h <= n && !st && len + 1 < size; h++) {
		char name[FLEN_VALUE] = "";
		int kst = 0;

		if (fits_movabs_hdu(r->f, h, &type, &st))
			break;
		fits_read_key(r->f, TSTRING, "EXTNAME", name, NULL, &kst);
		snprintf(buf + len, size - len, "%s%s", h > 1 ? ", " : "",
			 name[0] ? name : (h == 1 ? "PRIMARY" : "(unnamed)"));
		len = strlen(buf);
	}
	fits_clear_errmsg();
}

/* SDSS files without EXTNAMEs: HDU 2 is a binary table with loglam, flux
 * and ivar columns. */
static int sdss_unnamed_coadd(struct rd *r, int *found)
{
	static const char *const need[] = { "loglam", "flux", "ivar" };
	int st = 0, n = 0, type, col;

	*found = 0;
	if (fits_get_num_hdus(r->f, &n, &st))
		return rd_fail(r, st, "counting HDUs");
	if (n < 2)
		return MTLZ_OK;
	if (fits_movabs_hdu(r->f, 2, &type, &st))
		return rd_fail(r, st, "HDU 2");
	if (type != BINARY_TBL)
		return MTLZ_OK;
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(need); i++) {
		int rc = rd_colnum(r, "2", need[i], 0, &col);

		if (rc || !col)
			return rc;
	}
	*found = 1;
	return MTLZ_OK;
}

/* An SDSS/BOSS spec file: a COADD table (named, or unnamed HDU 2) and a
 * SPECOBJ or SPALL table; remembers where they are. */
static int detect_sdss(struct rd *r, int *is_sdss)
{
	int rc, found;

	*is_sdss = 0;
	rc = rd_has_hdu(r, "COADD", &found);
	if (!rc && !found)
		rc = sdss_unnamed_coadd(r, &found);
	if (rc || !found)
		return rc;
	fits_get_hdu_num(r->f, &r->coadd_hdu);

	r->meta_name = "SPECOBJ";
	rc = rd_has_hdu(r, r->meta_name, &found);
	if (!rc && !found) {
		r->meta_name = "SPALL";
		rc = rd_has_hdu(r, r->meta_name, &found);
	}
	if (rc || !found)
		return rc;
	fits_get_hdu_num(r->f, &r->meta_hdu);
	*is_sdss = 1;
	return MTLZ_OK;
}

/* Sets *type from the HDU names; MTLZ_ERR_FORMAT, listing the HDUs found,
 * when the file is neither kind. */
static int detect(struct rd *r, int *type)
{
	static const char *const arms[] = { "B_FLUX", "R_FLUX", "Z_FLUX" };
	char names[200];
	int rc, found = 0, arm = 0;

	*type = FIO_UNKNOWN;
	rc = rd_has_hdu(r, "FIBERMAP", &found);
	for (size_t i = 0; !rc && found && !arm && i < MTLZ_ARRAY_SIZE(arms); i++)
		rc = rd_has_hdu(r, arms[i], &arm);
	if (rc)
		return rc;
	if (found && arm) {
		*type = FIO_DESI;
		return MTLZ_OK;
	}
	rc = detect_sdss(r, &found);
	if (rc)
		return rc;
	if (found) {
		*type = FIO_SDSS;
		return MTLZ_OK;
	}
	list_hdus(r, names, sizeof(names));
	return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
			"%s: not a spectrum file we know: expected an SDSS/BOSS "
			"spec file (COADD and SPECOBJ or SPALL HDUs) or a DESI "
			"coadd (B/R/Z_FLUX and FIBERMAP HDUs), found HDUs: %s",
			r->path, names);
}

/* ------------------------------------------------------------------ */
/* SDSS / BOSS                                                         */

struct sdss_hdr {
	int have_coeff;
	double coeff0, coeff1;
	int plate, mjd, fiber;  /* -1 when absent */
};

/* Optional primary-header keywords; a missing or unparsable one is absent. */
static void sdss_read_primary(struct rd *r, struct sdss_hdr *h)
{
	int st = 0, type;

	h->plate = h->mjd = h->fiber = -1;
	h->have_coeff = 0;
	if (fits_movabs_hdu(r->f, 1, &type, &st))
		goto out;
	fits_read_key(r->f, TDOUBLE, "COEFF0", &h->coeff0, NULL, &st);
	fits_read_key(r->f, TDOUBLE, "COEFF1", &h->coeff1, NULL, &st);
	h->have_coeff = !st && isfinite(h->coeff0) && h->coeff1 > 0 &&
			h->coeff1 < 1;
	st = 0;
	fits_read_key(r->f, TINT, "PLATEID", &h->plate, NULL, &st);
	st = 0;
	fits_read_key(r->f, TINT, "MJD", &h->mjd, NULL, &st);
	st = 0;
	fits_read_key(r->f, TINT, "FIBERID", &h->fiber, NULL, &st);
out:
	fits_clear_errmsg();
}

/* Whether every ll[i] is within tol of start + i * step (NaN is not). */
static int on_grid(const double *ll, size_t n, double start, double step,
		   double tol)
{
	for (size_t i = 0; i < n; i++)
		if (!(fabs(ll[i] - (start + (double)i * step)) <= tol))
			return 0;
	return 1;
}

/* Chooses the grid of an SDSS spectrum from its loglam column; see the
 * file comment. */
static int sdss_set_grid(struct rd *r, mtlz_spectrum *s, const double *ll,
			 const struct sdss_hdr *h)
{
	size_t n = s->n;

	if (h->have_coeff && isfinite(ll[0])) {
		double k = round((ll[0] - h->coeff0) / h->coeff1);
		double start = h->coeff0 + k * h->coeff1;

		if (fabs(k) < FIO_MAX_PIX &&
		    on_grid(ll, n, start, h->coeff1, FIO_COEFF_TOL)) {
			s->grid_kind = MTLZ_GRID_LOGLAM;
			s->start = start;
			s->step = h->coeff1;
			return MTLZ_OK;
		}
	}
	if (n >= 2) {
		double step = (ll[n - 1] - ll[0]) / (double)(n - 1);

		if (step > 0 && on_grid(ll, n, ll[0], step, FIO_UNIFORM_TOL)) {
			s->grid_kind = MTLZ_GRID_LOGLAM;
			s->start = ll[0];
			s->step = step;
			return MTLZ_OK;
		}
	}
	s->wave = calloc(n, sizeof(*s->wave));
	if (!s->wave)
		return MTLZ_ERR_NOMEM;
	s->grid_kind = MTLZ_GRID_EXPLICIT;
	for (size_t i = 0; i < n; i++) {
		s->wave[i] = pow(10.0, ll[i]);
		if (!isfinite(s->wave[i]) || (i && !(s->wave[i] > s->wave[i - 1])))
			return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
					"%s: HDU COADD column loglam: row %zu is %g; "
					"loglam must be finite and increasing",
					r->path, i + 1, ll[i]);
	}
	return MTLZ_OK;
}

/* Finds a COADD column and checks it holds one value per row. */
static int sdss_coadd_col(struct rd *r, const char *name, int required,
			  int *col)
{
	long repeat;
	int tc, rc;

	rc = rd_colnum(r, "COADD", name, required, col);
	if (rc || !*col)
		return rc;
	rc = rd_repeat(r, "COADD", name, *col, &repeat, &tc);
	if (!rc && repeat != 1)
		rc = mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
			      "%s: HDU COADD column %s: %ld values per row, "
			      "expected 1", r->path, name, repeat);
	return rc;
}

/* Reads flux, ivar, and_mask into s and the loglam column into *ll. */
static int sdss_read_coadd(struct rd *r, mtlz_spectrum *s, double **ll)
{
	int st = 0, type, rc, c_flux, c_ll, c_ivar, c_mask;
	long n;

	if (fits_movabs_hdu(r->f, r->coadd_hdu, &type, &st))
		return rd_fail(r, st, "HDU COADD");
	rc = rd_nrows(r, "COADD", &n);
	if (rc)
		return rc;
	if (n <= 0 || n >= FIO_MAX_PIX)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: HDU COADD: %ld pixels (expected 1 to %d)",
				r->path, n, FIO_MAX_PIX - 1);
	if ((rc = sdss_coadd_col(r, "flux", 1, &c_flux)) ||
	    (rc = sdss_coadd_col(r, "loglam", 1, &c_ll)) ||
	    (rc = sdss_coadd_col(r, "ivar", 0, &c_ivar)) ||
	    (rc = sdss_coadd_col(r, "and_mask", 0, &c_mask)))
		return rc;
	rc = mtlz_spectrum_alloc(s, (size_t)n, c_ivar != 0, c_mask != 0, 0);
	if (rc)
		return rc;
	*ll = calloc((size_t)n, sizeof(**ll));
	if (!*ll)
		return MTLZ_ERR_NOMEM;
	rc = rd_col(r, "COADD", "flux", c_flux, TFLOAT, 1, 1, n, s->flux);
	if (!rc)
		rc = rd_col(r, "COADD", "loglam", c_ll, TDOUBLE, 1, 1, n, *ll);
	if (!rc && c_ivar)
		rc = rd_col(r, "COADD", "ivar", c_ivar, TFLOAT, 1, 1, n, s->ivar);
	/* int and uint32_t share a representation; the bits are what count. */
	if (!rc && c_mask)
		rc = rd_col(r, "COADD", "and_mask", c_mask, TINT, 1, 1, n,
			    (int *)s->and_mask);
	return rc;
}

/* Reads SPECOBJID (string, or signed/unsigned 64-bit integer) into id. */
static int sdss_read_specobjid(struct rd *r, int col, char *id, size_t size)
{
	const char *hdu = r->meta_name;
	unsigned long long u;
	long long v;
	long repeat;
	int tc, st = 0, rc;

	rc = rd_repeat(r, hdu, "SPECOBJID", col, &repeat, &tc);
	if (rc)
		return rc;
	if (tc == TSTRING)
		return rd_str(r, hdu, "SPECOBJID", col, 1, id, size);
	/* SPECOBJID is unsigned: stored as K with TZERO = 2^63 it overflows
	 * a signed read; stored as plain K its top bit reads negative. */
	fits_read_col(r->f, TLONGLONG, col, 1, 1, 1, NULL, &v, NULL, &st);
	if (st == NUM_OVERFLOW) {
		st = 0;
		fits_clear_errmsg();
		fits_read_col(r->f, TULONGLONG, col, 1, 1, 1, NULL, &u, NULL, &st);
	} else {
		u = (unsigned long long)v;
	}
	if (st)
		return rd_fail(r, st, "HDU %s column SPECOBJID", hdu);
	snprintf(id, size, "%llu", u);
	return MTLZ_OK;
}

/* spec_id: SPECOBJID, else PLATE-MJD-FIBERID (zero-padded as in the spec
 * file names) from the table or, failing that, the primary header, else
 * the file name without directory. */
static int sdss_read_id(struct rd *r, mtlz_spectrum *s, const struct sdss_hdr *h)
{
	static const char *const pmf[] = { "PLATE", "MJD", "FIBERID" };
	int v[3] = { h->plate, h->mjd, h->fiber };
	int rc, col;

	rc = rd_colnum(r, r->meta_name, "SPECOBJID", 0, &col);
	if (!rc && col)
		rc = sdss_read_specobjid(r, col, s->spec_id, sizeof(s->spec_id));
	if (rc || s->spec_id[0])
		return rc;
	for (int i = 0; i < 3; i++) {
		rc = rd_colnum(r, r->meta_name, pmf[i], 0, &col);
		if (!rc && col)
			rc = rd_col(r, r->meta_name, pmf[i], col, TINT, 1, 1, 1,
				    &v[i]);
		if (rc)
			return rc;
	}
	if (v[0] >= 0 && v[1] >= 0 && v[2] >= 0)
		snprintf(s->spec_id, sizeof(s->spec_id), "%04d-%05d-%04d", v[0],
			 v[1], v[2]);
	else
		copy_trimmed(s->spec_id, sizeof(s->spec_id),
			     strrchr(r->path, '/') ? strrchr(r->path, '/') + 1 :
			     r->path);
	return MTLZ_OK;
}

/* Reads element `elem` of an optional numeric column; *present says if
 * the column exists with that many elements. */
static int meta_num(struct rd *r, const char *name, long elem, int type,
		    void *dst, int *present)
{
	long repeat;
	int rc, col, tc;

	*present = 0;
	rc = rd_colnum(r, r->meta_name, name, 0, &col);
	if (rc || !col)
		return rc;
	rc = rd_repeat(r, r->meta_name, name, col, &repeat, &tc);
	if (rc || tc == TSTRING || repeat < elem)
		return rc;
	*present = 1;
	return rd_col(r, r->meta_name, name, col, type, 1, elem, 1, dst);
}

/* z, zwarning, sn and survey from SPECOBJ/SPALL. S/N: SN_MEDIAN_ALL, else
 * the r band (element 3 of 5, ugriz) of SN_MEDIAN, else NaN. Survey: the
 * SURVEY column lowercased when present ("sdss", "boss", "eboss",
 * "segue1", ...), else "boss" for a SPALL HDU and "sdss" for SPECOBJ. */
static int sdss_read_meta(struct rd *r, mtlz_spectrum *s, const struct sdss_hdr *h)
{
	int st = 0, type, rc, have, col;
	long nrows;

	if (fits_movabs_hdu(r->f, r->meta_hdu, &type, &st))
		return rd_fail(r, st, "HDU %s", r->meta_name);
	rc = rd_nrows(r, r->meta_name, &nrows);
	if (!rc && nrows < 1)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: HDU %s: no rows", r->path, r->meta_name);
	if (!rc)
		rc = meta_num(r, "Z", 1, TDOUBLE, &s->z, &have);
	if (!rc)
		rc = meta_num(r, "ZWARNING", 1, TINT, &s->zwarning, &have);
	if (!rc)
		rc = meta_num(r, "SN_MEDIAN_ALL", 1, TDOUBLE, &s->sn, &have);
	if (!rc && !have)
		rc = meta_num(r, "SN_MEDIAN", 3, TDOUBLE, &s->sn, &have);
	if (!rc)
		rc = sdss_read_id(r, s, h);
	if (!rc)
		rc = rd_colnum(r, r->meta_name, "SURVEY", 0, &col);
	if (!rc && col)
		rc = rd_str(r, r->meta_name, "SURVEY", col, 1, s->survey,
			    sizeof(s->survey));
	if (rc)
		return rc;
	for (char *p = s->survey; *p; p++)
		*p = (char)tolower((unsigned char)*p);
	if (!s->survey[0])
		snprintf(s->survey, sizeof(s->survey), "%s",
			 strcmp(r->meta_name, "SPALL") == 0 ? "boss" : "sdss");
	return MTLZ_OK;
}

/* Fills s (init'ed) from an SDSS/BOSS spec file; clears s on error. */
static int sdss_read(struct rd *r, mtlz_spectrum *s)
{
	struct sdss_hdr h;
	double *ll = NULL;
	int rc;

	sdss_read_primary(r, &h);
	rc = sdss_read_coadd(r, s, &ll);
	if (rc)
		goto out_clear;
	rc = sdss_set_grid(r, s, ll, &h);
	if (rc)
		goto out_clear;
	rc = sdss_read_meta(r, s, &h);
	if (rc)
		goto out_clear;
	snprintf(s->source, sizeof(s->source), "%s", r->path);
	free(ll);
	return MTLZ_OK;

out_clear:
	free(ll);
	mtlz_spectrum_clear(s);
	return rc;
}

/* ------------------------------------------------------------------ */
/* DESI                                                                */

#define DESI_MAX_ARMS 3

struct desi_arm {
	char name[2];            /* "B", "R" or "Z" */
	int hdu_flux, hdu_ivar, hdu_mask;  /* absolute HDU numbers, mask 0 if none */
	long n_pix;
	double *wave;
	float *flux, *ivar;      /* one target's row */
	int32_t *mask;           /* one target's row, NULL when no _MASK */
	long off;                /* first pixel on the merged linear grid */
};

struct desi {
	long n_targets;
	long long *targetid;
	double *z;               /* from redrock, NaN when unmatched */
	int *zwarn;              /* -1 when unmatched */
	struct desi_arm arm[DESI_MAX_ARMS];
	int n_arms;
	int linear;              /* arms share one linear grid */
	double start, step;      /* the merged grid when linear */
	long n_pix;              /* merged pixels */
	double *acc_w, *acc_wf, *acc_f, *scratch;  /* n_pix each */
	int *acc_n;
	uint32_t *acc_mask;
};

static void desi_free(struct desi *d)
{
	for (int a = 0; a < d->n_arms; a++) {
		free(d->arm[a].wave);
		free(d->arm[a].flux);
		free(d->arm[a].ivar);
		free(d->arm[a].mask);
	}
	free(d->targetid);
	free(d->z);
	free(d->zwarn);
	free(d->acc_w);
	free(d->acc_wf);
	free(d->acc_f);
	free(d->scratch);
	free(d->acc_n);
	free(d->acc_mask);
}

/* Checks an X_FLUX/X_IVAR/X_MASK image is n_pix x n_targets. */
static int desi_check_image(struct rd *r, const struct desi *d,
			    const struct desi_arm *a, const char *hdu)
{
	long ax[2] = { 0, 1 };
	int st = 0, naxis = 0;

	if (fits_get_img_dim(r->f, &naxis, &st) ||
	    fits_get_img_size(r->f, 2, ax, &st))
		return rd_fail(r, st, "HDU %s: image size", hdu);
	if ((naxis == 2 || (naxis == 1 && d->n_targets == 1)) &&
	    ax[0] == a->n_pix && (naxis == 1 || ax[1] == d->n_targets))
		return MTLZ_OK;
	return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
			"%s: HDU %s: image is %ld x %ld (%d axes), expected "
			"%ld x %ld (%s_WAVELENGTH pixels x FIBERMAP rows)",
			r->path, hdu, ax[0], naxis == 2 ? ax[1] : 1, naxis,
			a->n_pix, d->n_targets, a->name);
}

/* Moves to HDU <arm>_<what>, checks its shape and remembers its number. */
static int desi_find_image(struct rd *r, const struct desi *d,
			   const struct desi_arm *a, const char *what,
			   int required, int *hdu_num)
{
	char hdu[32];
	int rc, found;

	*hdu_num = 0;
	snprintf(hdu, sizeof(hdu), "%s_%s", a->name, what);
	rc = rd_has_hdu(r, hdu, &found);
	if (rc)
		return rc;
	if (!found)
		return required ? mtlz_err(r->errstr, r->errstr_size,
					   MTLZ_ERR_FORMAT, "%s: HDU %s missing "
					   "(%s_FLUX is present)", r->path, hdu,
					   a->name) : MTLZ_OK;
	rc = desi_check_image(r, d, a, hdu);
	if (!rc)
		fits_get_hdu_num(r->f, hdu_num);
	return rc;
}

/* Reads <arm>_WAVELENGTH and locates the arm's images. */
static int desi_open_arm(struct rd *r, const struct desi *d, struct desi_arm *a)
{
	char hdu[32];
	int rc, st = 0, naxis = 0, found;
	long n = 0;

	snprintf(hdu, sizeof(hdu), "%s_WAVELENGTH", a->name);
	rc = rd_has_hdu(r, hdu, &found);
	if (!rc && !found)
		rc = mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
			      "%s: HDU %s missing", r->path, hdu);
	if (rc)
		return rc;
	if (fits_get_img_dim(r->f, &naxis, &st) ||
	    fits_get_img_size(r->f, 1, &n, &st))
		return rd_fail(r, st, "HDU %s: image size", hdu);
	if (naxis != 1 || n <= 0 || n >= FIO_MAX_PIX)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: HDU %s: %d axes of %ld pixels, expected one "
				"axis of 1 to %d", r->path, hdu, naxis, n,
				FIO_MAX_PIX - 1);
	a->n_pix = n;
	a->wave = calloc((size_t)n, sizeof(*a->wave));
	a->flux = calloc((size_t)n, sizeof(*a->flux));
	a->ivar = calloc((size_t)n, sizeof(*a->ivar));
	a->mask = calloc((size_t)n, sizeof(*a->mask));
	if (!a->wave || !a->flux || !a->ivar || !a->mask)
		return MTLZ_ERR_NOMEM;
	if (fits_read_img(r->f, TDOUBLE, 1, n, NULL, a->wave, NULL, &st))
		return rd_fail(r, st, "HDU %s", hdu);
	for (long i = 0; i < n; i++)
		if (!isfinite(a->wave[i]) || (i && !(a->wave[i] > a->wave[i - 1])))
			return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
					"%s: HDU %s: pixel %ld is %g A; wavelengths "
					"must be finite and increasing", r->path, hdu,
					i, a->wave[i]);
	if ((rc = desi_find_image(r, d, a, "FLUX", 1, &a->hdu_flux)) ||
	    (rc = desi_find_image(r, d, a, "IVAR", 1, &a->hdu_ivar)) ||
	    (rc = desi_find_image(r, d, a, "MASK", 0, &a->hdu_mask)))
		return rc;
	return MTLZ_OK;
}

static int cmp_arm_start(const void *x, const void *y)
{
	const struct desi_arm *a = x, *b = y;

	return (a->wave[0] > b->wave[0]) - (a->wave[0] < b->wave[0]);
}

/* Decides whether the arms (sorted blue to red) share one linear grid:
 * every pixel of every arm within 1e-3 A of start + j * step, the step
 * taken from the bluest arm. Sets start/step/n_pix and each arm's offset,
 * or n_pix to the pixel count of the explicit fallback. */
static int desi_plan_grid(struct rd *r, struct desi *d)
{
	const struct desi_arm *blue = &d->arm[0];
	double step, end = -INFINITY;

	d->start = blue->wave[0];
	step = blue->n_pix > 1 ? (blue->wave[blue->n_pix - 1] - d->start) /
				 (double)(blue->n_pix - 1) : 0;
	/* The tolerance must stay well below half a pixel for the rounding
	 * to land each arm pixel on its merged pixel. */
	d->linear = step > 4 * FIO_DESI_GRID_TOL;
	for (int k = 0; k < d->n_arms && d->linear; k++) {
		struct desi_arm *a = &d->arm[k];
		double j0 = round((a->wave[0] - d->start) / step);

		a->off = (long)j0;
		d->linear = j0 >= 0 && j0 < FIO_MAX_PIX &&
			    on_grid(a->wave, (size_t)a->n_pix, d->start + j0 * step,
				    step, FIO_DESI_GRID_TOL);
		end = fmax(end, a->wave[a->n_pix - 1]);
	}
	d->step = step;
	d->n_pix = d->linear ? lround((end - d->start) / step) + 1 : 0;
	for (int k = 0; k < d->n_arms && d->linear; k++)
		d->linear = d->arm[k].off + d->arm[k].n_pix <= d->n_pix;
	if (!d->linear)
		d->n_pix = 0;
	for (int k = 0; k < d->n_arms && !d->linear; k++)
		d->n_pix += d->arm[k].n_pix;  /* upper bound for the fallback */
	if (d->n_pix <= 0 || d->n_pix >= FIO_MAX_PIX)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: merged B/R/Z grid has %ld pixels (expected 1 "
				"to %d)", r->path, d->n_pix, FIO_MAX_PIX - 1);
	return MTLZ_OK;
}

/* Reads the arms present (B, R, Z; at least one) and plans their grid. */
static int desi_open_arms(struct rd *r, struct desi *d)
{
	static const char names[] = "BRZ";
	int rc, found;

	for (int i = 0; names[i]; i++) {
		char hdu[16];
		struct desi_arm *a = &d->arm[d->n_arms];

		snprintf(hdu, sizeof(hdu), "%c_FLUX", names[i]);
		rc = rd_has_hdu(r, hdu, &found);
		if (rc)
			return rc;
		if (!found)
			continue;
		a->name[0] = names[i];
		d->n_arms++;
		rc = desi_open_arm(r, d, a);
		if (rc)
			return rc;
	}
	if (!d->n_arms)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: no B/R/Z_FLUX HDU", r->path);
	qsort(d->arm, (size_t)d->n_arms, sizeof(d->arm[0]), cmp_arm_start);
	return desi_plan_grid(r, d);
}

/* Reads FIBERMAP TARGETID and allocates the per-target tables. */
static int desi_read_fibermap(struct rd *r, struct desi *d)
{
	int rc, col, found;
	long n;

	rc = rd_has_hdu(r, "FIBERMAP", &found);
	if (!rc)
		rc = rd_nrows(r, "FIBERMAP", &n);
	if (rc)
		return rc;
	if (n <= 0 || n >= FIO_MAX_TARGETS)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: HDU FIBERMAP: %ld rows (expected 1 to %d)",
				r->path, n, FIO_MAX_TARGETS - 1);
	d->n_targets = n;
	d->targetid = calloc((size_t)n, sizeof(*d->targetid));
	d->z = calloc((size_t)n, sizeof(*d->z));
	d->zwarn = calloc((size_t)n, sizeof(*d->zwarn));
	if (!d->targetid || !d->z || !d->zwarn)
		return MTLZ_ERR_NOMEM;
	for (long i = 0; i < n; i++) {
		d->z[i] = NAN;
		d->zwarn[i] = -1;
	}
	rc = rd_colnum(r, "FIBERMAP", "TARGETID", 1, &col);
	if (!rc)
		rc = rd_col(r, "FIBERMAP", "TARGETID", col, TLONGLONG, 1, 1, n,
			    d->targetid);
	return rc;
}

struct rr_row {
	long long targetid;
	double z;
	int zwarn;
};

static int cmp_rr(const void *x, const void *y)
{
	const struct rr_row *a = x, *b = y;

	return (a->targetid > b->targetid) - (a->targetid < b->targetid);
}


/* Reads REDSHIFTS (TARGETID, Z, ZWARN) of an open redrock file into a
 * table sorted by TARGETID. */
static int rr_read(struct rd *rr, struct rr_row **rows, long *n_rows)
{
	long long *tid = NULL;
	double *z = NULL;
	int *zw = NULL;
	int rc, found, c_tid, c_z, c_zw;
	long n = 0;

	rc = rd_has_hdu(rr, "REDSHIFTS", &found);
	if (!rc && !found)
		rc = mtlz_err(rr->errstr, rr->errstr_size, MTLZ_ERR_FORMAT,
			      "%s: HDU REDSHIFTS missing", rr->path);
	if (!rc)
		rc = rd_nrows(rr, "REDSHIFTS", &n);
	if (!rc && (n < 0 || n >= FIO_MAX_TARGETS))
		rc = mtlz_err(rr->errstr, rr->errstr_size, MTLZ_ERR_FORMAT,
			      "%s: HDU REDSHIFTS: %ld rows", rr->path, n);
	if (rc || (rc = rd_colnum(rr, "REDSHIFTS", "TARGETID", 1, &c_tid)) ||
	    (rc = rd_colnum(rr, "REDSHIFTS", "Z", 1, &c_z)) ||
	    (rc = rd_colnum(rr, "REDSHIFTS", "ZWARN", 1, &c_zw)))
		return rc;
	tid = calloc((size_t)n + 1, sizeof(*tid));
	z = calloc((size_t)n + 1, sizeof(*z));
	zw = calloc((size_t)n + 1, sizeof(*zw));
	*rows = calloc((size_t)n + 1, sizeof(**rows));
	if (!tid || !z || !zw || !*rows) {
		rc = MTLZ_ERR_NOMEM;
		goto out_free;
	}
	*n_rows = n;
	if (n && ((rc = rd_col(rr, "REDSHIFTS", "TARGETID", c_tid, TLONGLONG,
			       1, 1, n, tid)) ||
		  (rc = rd_col(rr, "REDSHIFTS", "Z", c_z, TDOUBLE, 1, 1, n, z)) ||
		  (rc = rd_col(rr, "REDSHIFTS", "ZWARN", c_zw, TINT, 1, 1, n, zw))))
		goto out_free;
	for (long i = 0; i < n; i++)
		(*rows)[i] = (struct rr_row){ tid[i], z[i], zw[i] };
	qsort(*rows, (size_t)n, sizeof(**rows), cmp_rr);
out_free:
	free(tid);
	free(z);
	free(zw);
	return rc;
}

/* Fills d->z / d->zwarn from redrock-<rest> beside coadd-<rest>, matching
 * on TARGETID. No such file is not an error; an unreadable one is. */
static int desi_read_redrock(struct rd *r, struct desi *d)
{
	const char *slash = strrchr(r->path, '/');
	const char *base = slash ? slash + 1 : r->path;
	struct rd rr = { .errstr = r->errstr, .errstr_size = r->errstr_size };
	struct rr_row *rows = NULL;
	char *rr_path;
	long n_rows = 0;
	int st = 0, rc;

	if (strncmp(base, "coadd-", 6) != 0)
		return MTLZ_OK;
	rr_path = malloc(strlen(r->path) + 3);
	if (!rr_path)
		return MTLZ_ERR_NOMEM;
	sprintf(rr_path, "%.*sredrock-%s", (int)(base - r->path), r->path,
		base + 6);
	rc = MTLZ_OK;
	if (access(rr_path, F_OK) != 0)
		goto out_free_path;
	rr.path = rr_path;
	if (fits_open_diskfile(&rr.f, rr_path, READONLY, &st)) {
		rc = rd_fail(&rr, st, "opening the redrock file of %s", r->path);
		goto out_free_path;
	}
	rc = rr_read(&rr, &rows, &n_rows);
	for (long t = 0; !rc && t < d->n_targets; t++) {
		struct rr_row key = { .targetid = d->targetid[t] };
		struct rr_row *hit = n_rows ? bsearch(&key, rows, (size_t)n_rows,
						      sizeof(*rows), cmp_rr) : NULL;

		if (hit) {
			d->z[t] = hit->z;
			d->zwarn[t] = hit->zwarn;
		}
	}
	free(rows);
	st = 0;
	fits_close_file(rr.f, &st);
out_free_path:
	free(rr_path);
	return rc;
}

/* Reads row t of an image HDU (n values starting at pixel t * n + 1). */
static int desi_read_row(struct rd *r, int hdu_num, const char *arm,
			 const char *what, long t, long n, int type, void *dst)
{
	int st = 0, hdutype;

	if (fits_movabs_hdu(r->f, hdu_num, &hdutype, &st) ||
	    fits_read_img(r->f, type, (LONGLONG)t * n + 1, n, NULL, dst, NULL, &st))
		return rd_fail(r, st, "HDU %s_%s row %ld", arm, what, t);
	return MTLZ_OK;
}

/* Loads target t of every arm into the arms' row buffers. A pixel whose
 * MASK is set, or whose ivar or flux is not usable, gets ivar 0. */
static int desi_load_target(struct rd *r, struct desi *d, long t)
{
	for (int k = 0; k < d->n_arms; k++) {
		struct desi_arm *a = &d->arm[k];
		int rc;

		rc = desi_read_row(r, a->hdu_flux, a->name, "FLUX", t, a->n_pix,
				   TFLOAT, a->flux);
		if (!rc)
			rc = desi_read_row(r, a->hdu_ivar, a->name, "IVAR", t,
					   a->n_pix, TFLOAT, a->ivar);
		if (!rc && a->hdu_mask)
			rc = desi_read_row(r, a->hdu_mask, a->name, "MASK", t,
					   a->n_pix, TINT, a->mask);
		if (rc)
			return rc;
		for (long i = 0; i < a->n_pix; i++)
			if (a->mask[i] || !(a->ivar[i] > 0) || !isfinite(a->ivar[i]) ||
			    !isfinite(a->flux[i]))
				a->ivar[i] = 0;
	}
	return MTLZ_OK;
}

/* Merges the loaded arms onto the common linear grid. Overlaps are
 * combined with inverse-variance weights (flux = sum ivar_i f_i / sum
 * ivar_i, ivar = sum ivar_i; the plain mean and ivar 0 when every weight
 * is 0). and_mask is the AND of the covering arms' masks, SDSS's meaning
 * of and_mask: set only when the pixel is bad in every arm, i.e. when the
 * merged ivar is 0 because of the masks. Pixels no arm covers (a gap) get
 * flux 0, ivar 0, mask 0. */
static void desi_merge_linear(struct desi *d, mtlz_spectrum *s)
{
	size_t n = (size_t)d->n_pix;

	memset(d->acc_w, 0, n * sizeof(*d->acc_w));
	memset(d->acc_wf, 0, n * sizeof(*d->acc_wf));
	memset(d->acc_f, 0, n * sizeof(*d->acc_f));
	memset(d->acc_n, 0, n * sizeof(*d->acc_n));
	for (int k = 0; k < d->n_arms; k++) {
		const struct desi_arm *a = &d->arm[k];

		for (long i = 0; i < a->n_pix; i++) {
			size_t j = (size_t)(a->off + i);
			uint32_t m = (uint32_t)a->mask[i];

			d->acc_w[j] += a->ivar[i];
			d->acc_wf[j] += (double)a->ivar[i] * a->flux[i];
			d->acc_f[j] += a->flux[i];
			d->acc_mask[j] = d->acc_n[j]++ ? d->acc_mask[j] & m : m;
		}
	}
	for (size_t j = 0; j < n; j++) {
		if (!d->acc_n[j]) {
			s->flux[j] = 0;
			s->ivar[j] = 0;
			s->and_mask[j] = 0;
			continue;
		}
		s->flux[j] = (float)(d->acc_w[j] > 0 ? d->acc_wf[j] / d->acc_w[j] :
				     d->acc_f[j] / d->acc_n[j]);
		s->ivar[j] = (float)d->acc_w[j];
		s->and_mask[j] = d->acc_mask[j];
	}
	s->grid_kind = MTLZ_GRID_LINEAR;
	s->start = d->start;
	s->step = d->step;
}

/* Fallback when the arms are not on one grid: concatenate them blue to
 * red on an explicit grid, dropping the redder arm's pixels that do not
 * extend past the bluer arm's last wavelength. */
static void desi_merge_explicit(struct desi *d, mtlz_spectrum *s)
{
	size_t j = 0;

	for (int k = 0; k < d->n_arms; k++) {
		const struct desi_arm *a = &d->arm[k];

		for (long i = 0; i < a->n_pix; i++) {
			if (j && !(a->wave[i] > s->wave[j - 1]))
				continue;
			s->wave[j] = a->wave[i];
			s->flux[j] = a->flux[i];
			s->ivar[j] = a->ivar[i];
			s->and_mask[j] = (uint32_t)a->mask[i];
			j++;
		}
	}
	s->n = j;
	s->grid_kind = MTLZ_GRID_EXPLICIT;
}

static int cmp_double(const void *x, const void *y)
{
	double a = *(const double *)x, b = *(const double *)y;

	return (a > b) - (a < b);
}

/* Median of flux * sqrt(ivar) over pixels with ivar > 0, NaN when none.
 * DESI files carry no SN_MEDIAN_ALL; this is its per-pixel equivalent. */
static double median_sn(const mtlz_spectrum *s, double *scratch)
{
	size_t m = 0;

	for (size_t i = 0; i < s->n; i++)
		if (s->ivar[i] > 0)
			scratch[m++] = s->flux[i] * sqrt((double)s->ivar[i]);
	if (!m)
		return NAN;
	qsort(scratch, m, sizeof(*scratch), cmp_double);
	return m % 2 ? scratch[m / 2] : 0.5 * (scratch[m / 2 - 1] + scratch[m / 2]);
}

/* Builds spectrum t (init'ed) from the arms. */
static int desi_build(struct rd *r, struct desi *d, long t, mtlz_spectrum *s)
{
	int rc;

	rc = desi_load_target(r, d, t);
	if (rc)
		return rc;
	rc = mtlz_spectrum_alloc(s, (size_t)d->n_pix, 1, 1, !d->linear);
	if (rc)
		return rc;
	if (d->linear)
		desi_merge_linear(d, s);
	else
		desi_merge_explicit(d, s);
	s->sn = median_sn(s, d->scratch);
	s->z = d->z[t];
	s->zwarning = d->zwarn[t];
	snprintf(s->spec_id, sizeof(s->spec_id), "%lld", d->targetid[t]);
	snprintf(s->survey, sizeof(s->survey), "desi");
	snprintf(s->source, sizeof(s->source), "%s[%ld]", r->path, t);
	return MTLZ_OK;
}

static int desi_alloc_scratch(struct desi *d)
{
	size_t n = (size_t)d->n_pix;

	d->acc_w = calloc(n, sizeof(*d->acc_w));
	d->acc_wf = calloc(n, sizeof(*d->acc_wf));
	d->acc_f = calloc(n, sizeof(*d->acc_f));
	d->scratch = calloc(n, sizeof(*d->scratch));
	d->acc_n = calloc(n, sizeof(*d->acc_n));
	d->acc_mask = calloc(n, sizeof(*d->acc_mask));
	if (!d->acc_w || !d->acc_wf || !d->acc_f || !d->scratch || !d->acc_n ||
	    !d->acc_mask)
		return MTLZ_ERR_NOMEM;
	return MTLZ_OK;
}

/* Fills the n_targets slots after out->v[out->n - 1] (without counting
 * them in out->n) and sets *n_out; on error every slot is cleared. */
static int desi_read(struct rd *r, mtlz_spectra *out, size_t *n_out)
{
	struct desi d = { 0 };
	long t = 0;
	int rc;

	*n_out = 0;
	if ((rc = desi_read_fibermap(r, &d)) || (rc = desi_open_arms(r, &d)) ||
	    (rc = desi_alloc_scratch(&d)) || (rc = desi_read_redrock(r, &d)))
		goto out_free;
	rc = spectra_reserve(out, (size_t)d.n_targets);
	if (rc)
		goto out_free;
	for (t = 0; t < d.n_targets; t++) {
		mtlz_spectrum *s = &out->v[out->n + (size_t)t];

		mtlz_spectrum_init(s);
		rc = desi_build(r, &d, t, s);
		if (rc) {
			t++;  /* clear the slot that failed too */
			break;
		}
	}
	if (rc) {
		while (t-- > 0)
			mtlz_spectrum_clear(&out->v[out->n + (size_t)t]);
		goto out_free;
	}
	*n_out = (size_t)d.n_targets;
out_free:
	desi_free(&d);
	return rc;
}

/* ------------------------------------------------------------------ */
/* Entry point                                                         */

/* Whether the bytes at `offset` start an extension header (cfitsio found
 * no HDU there, so it is a header cut short). */
static int xtension_at(const char *path, long long offset)
{
	char key[8];
	FILE *fp = fopen(path, "rb");
	int hit = 0;

	if (!fp)
		return 0;
	if (fseeko(fp, (off_t)offset, SEEK_SET) == 0 &&
	    fread(key, 1, sizeof(key), fp) == sizeof(key))
		hit = memcmp(key, "XTENSION", sizeof(key)) == 0;
	fclose(fp);
	return hit;
}

/* Rejects a truncated file. cfitsio stops looking for HDUs quietly at the
 * end of the file, so a file cut short after the HDUs we need would
 * otherwise read "fine" (a DESI coadd would silently lose its R and Z
 * arms): the last HDU's data, padding included, must fit in the file, and
 * what follows it must not be the start of another (incomplete) header.
 * Other trailing bytes (FITS "special records") are allowed. */
static int check_complete(struct rd *r)
{
	LONGLONG head, data, end;
	struct stat sb;
	int st = 0, n = 0, type;

	if (stat(r->path, &sb) != 0)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_IO,
				"%s: stat: %s", r->path, strerror(errno));
	if (fits_get_num_hdus(r->f, &n, &st) ||
	    fits_movabs_hdu(r->f, n, &type, &st) ||
	    fits_get_hduaddrll(r->f, &head, &data, &end, &st))
		return rd_fail(r, st, "HDU %d (the last)", n);
	if (end > (LONGLONG)sb.st_size)
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: truncated: HDU %d ends at byte %lld but the "
				"file has %lld bytes", r->path, n, (long long)end,
				(long long)sb.st_size);
	if (end < (LONGLONG)sb.st_size && xtension_at(r->path, end))
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: truncated: the header of HDU %d (at byte %lld) "
				"is incomplete", r->path, n + 1, (long long)end);
	return MTLZ_OK;
}

/* Reads the open file into new slots of out; see fits_io.h. */
static int read_open(struct rd *r, mtlz_spectra *out)
{
	size_t n = 0;
	int rc, type;

	rc = check_complete(r);
	if (!rc)
		rc = detect(r, &type);
	if (rc)
		return rc;
	if (type == FIO_DESI) {
		rc = desi_read(r, out, &n);
	} else {
		rc = spectra_reserve(out, 1);
		if (!rc) {
			mtlz_spectrum_init(&out->v[out->n]);
			rc = sdss_read(r, &out->v[out->n]);
			n = 1;
		}
	}
	if (!rc)
		out->n += n;
	return rc;
}

/* Explains why fits_open_diskfile failed with status st. */
static int open_failed(struct rd *r, int st)
{
	struct stat sb;

	if (st == FILE_NOT_OPENED && access(r->path, R_OK) != 0) {
		fits_clear_errmsg();
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_IO,
				"%s: cannot open: %s", r->path, strerror(errno));
	}
	/* A short read of a file that is no whole number of 2880-byte FITS
	 * blocks is a bad file, not a failing disk. */
	if (st == READ_ERROR && stat(r->path, &sb) == 0 &&
	    sb.st_size % 2880 != 0) {
		fits_clear_errmsg();
		return mtlz_err(r->errstr, r->errstr_size, MTLZ_ERR_FORMAT,
				"%s: opening: %lld bytes, not a whole number of "
				"2880-byte FITS blocks (truncated, or not FITS)",
				r->path, (long long)sb.st_size);
	}
	return rd_fail(r, st, "opening");
}

int mtlz_fits_read(const char *path, mtlz_spectra *out, char *errstr,
		   size_t errstr_size)
{
	struct rd r = { .path = path, .errstr = errstr, .errstr_size = errstr_size };
	int st = 0, rc;

	if (!path || !out)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"mtlz_fits_read: NULL %s", path ? "out" : "path");
	if (errstr && errstr_size)
		errstr[0] = '\0';
	if (fits_open_diskfile(&r.f, path, READONLY, &st))
		return open_failed(&r, st);
	rc = read_open(&r, out);
	st = 0;
	fits_close_file(r.f, &st);
	fits_clear_errmsg();
	return rc;
}
