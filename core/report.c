/*
 * report.c - the evaluation report (report.h): the evaluation run (model +
 * archives -> items -> metrics), the figures drawn with PLplot's pngcairo
 * device, and the report.md page that collects them (docs/report.md).
 *
 * Each figure is one PLplot session (plinit ... plend) writing one PNG,
 * drawn from the metrics JSON (the key names of metrics.h), from the
 * per-spectrum items (Fig. 6 density, MZR scatter) or from the training
 * history of the model's manifest (Figs. 4-5). PLplot is given only finite
 * numbers and non-empty ranges: it exits the process on errors, and its
 * cairo backend draws garbage for NaN. Colours follow the paper: blue for
 * classification / training, orange for metallicity / validation, black
 * for references (1:1, Tremonti et al. 2004).
 *
 * @locality any thread; the drawing holds plot_lock (PLplot's global state).
 */
#include "report.h"

#include "avro_io.h"
#include "common.h"
#include "dataset.h"
#include "labels.h"
#include "model.h"
#include "mtlz_engine.h"

#include <errno.h>
#include <math.h>
#include <plplot.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef __SANITIZE_ADDRESS__
/* fontconfig (through pango in the cairo driver) keeps its font cache for
 * the life of the process, and libltdl the loaded PLplot driver: neither is
 * ours to free, and LeakSanitizer would fail every ASan run that draws. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
	return "leak:libfontconfig.so\nleak:libltdl.so\n";
}
#endif

static pthread_mutex_t plot_lock = PTHREAD_MUTEX_INITIALIZER;

static const struct {
	const char *file, *caption;
} figs[MTLZ_N_FIGS] = {
	[MTLZ_FIG_LOSS] = { "loss.png", "Loss per task and epoch, training (solid) and "
			    "validation (dashed) (paper Fig. 4)." },
	[MTLZ_FIG_DWA] = { "dwa.png", "Dynamic Weight Average task weights per epoch, "
			   "classification and metallicity (paper Fig. 5)." },
	[MTLZ_FIG_OH] = { "oh_pred_vs_true.png", "Predicted vs true metallicity of the "
			  "star-forming spectra: density, 1:1 line, running median and 16th-84th "
			  "percentiles; residual histogram on top (paper Fig. 6)." },
	[MTLZ_FIG_UNCERTAINTY] = { "uncertainty.png", "MC-dropout 1-sigma uncertainty per bin "
				   "of predicted metallicity: mean and spread, next to the "
				   "actual residual SD (paper Fig. 7)." },
	[MTLZ_FIG_CONFUSION] = { "confusion.png", "Confusion matrix, counts and "
				 "row-normalised (recall on the diagonal) (paper Fig. 8)." },
	[MTLZ_FIG_RELIABILITY] = { "reliability.png", "Reliability diagram: accuracy vs "
				   "confidence per bin, the diagonal is perfect calibration; "
				   "ECE in the title." },
	[MTLZ_FIG_BY_Z] = { "by_z.png", "Accuracy and metallicity SD / bias per redshift "
			    "bin (paper Fig. 9a)." },
	[MTLZ_FIG_BY_SN] = { "by_sn.png", "Accuracy and metallicity SD / bias per S/N_r bin "
			     "(paper Fig. 9b)." },
	[MTLZ_FIG_MZR] = { "mzr.png", "Mass-metallicity relation: predicted and true medians "
			   "per 0.25 dex of log M* against the Tremonti et al. (2004) fit "
			   "(paper Fig. 10)." },
};

const char *mtlz_report_fig_file(int fig)
{
	return fig >= 0 && fig < MTLZ_N_FIGS ? figs[fig].file : NULL;
}

const char *mtlz_report_fig_caption(int fig)
{
	return fig >= 0 && fig < MTLZ_N_FIGS ? figs[fig].caption : NULL;
}

/* ---- JSON access: NaN for null or missing ---- */

static double jnum(const json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);

	return json_is_number(v) ? json_number_value(v) : NAN;
}

static double jat(const json_t *a, size_t i)
{
	json_t *v = json_array_get(a, i);

	return json_is_number(v) ? json_number_value(v) : NAN;
}

/* ---- drawing helpers ---- */

/* cmap0: 0 background, then the colours the figures name */
enum { C_BG, C_FG, C_BLUE, C_ORANGE, C_RED, C_PURPLE, C_GREY, C_GREEN, C_LGREY, C_LBLUE,
       C_WHITE, N_COLOURS };

static const PLINT pal_r[N_COLOURS] = { 255, 0, 31, 255, 214, 148, 127, 44, 200, 174, 255 };
static const PLINT pal_g[N_COLOURS] = { 255, 0, 119, 127, 39, 103, 127, 160, 200, 199, 255 };
static const PLINT pal_b[N_COLOURS] = { 255, 0, 180, 14, 40, 189, 127, 44, 200, 232, 255 };

/* Character height, relative to PLplot's default for the page. */
#define CH 0.85

/* Line styles of pllsty. */
enum { L_SOLID = 1, L_DASH = 2, L_LDASH = 3, L_DOT = 8 };

/* Sequential colour maps as anchors, interpolated into cmap1. */
static const unsigned char viridis[][3] = {
	{ 68, 1, 84 }, { 59, 82, 139 }, { 33, 145, 140 }, { 94, 201, 98 }, { 253, 231, 37 },
};
static const unsigned char blues[][3] = {
	{ 247, 251, 255 }, { 198, 219, 239 }, { 107, 174, 214 }, { 33, 113, 181 }, { 8, 48, 107 },
};

static void set_cmap1(const unsigned char (*a)[3], int n_anchors)
{
	PLINT r[256], g[256], b[256];

	for (int i = 0; i < 256; i++) {
		const double t = i / 255.0 * (n_anchors - 1);
		const int k = MTLZ_MIN((int)t, n_anchors - 2);
		const double f = t - k;

		r[i] = (PLINT)lround(a[k][0] + f * (a[k + 1][0] - a[k][0]));
		g[i] = (PLINT)lround(a[k][1] + f * (a[k + 1][1] - a[k][1]));
		b[i] = (PLINT)lround(a[k][2] + f * (a[k + 1][2] - a[k][2]));
	}
	plscmap1n(256);
	plscmap1(r, g, b, 256);
}

/* Starts a PLplot session writing path at w x h pixels. */
static void plot_begin(const char *path, int w, int h)
{
	plsdev("pngcairo");
	plsfnam(path);
	plspage(0, 0, w, h, 0, 0);
	plscmap0n(N_COLOURS);
	plscmap0(pal_r, pal_g, pal_b, N_COLOURS);
	plinit();
	pladv(0);
	plcol0(C_FG);
	plpsty(0);
	plwidth(1);
	plschr(0, CH);
	/* plain numbers up to 5 digits (0.045), not a "(x10^-2)" factor */
	plsxax(5, 0);
	plsyax(5, 0);
}

/* Ends the session; the PNG must exist and not be empty. */
static int plot_end(const char *path, char *errstr, size_t errstr_size)
{
	struct stat st;

	plend();
	if (stat(path, &st) || st.st_size == 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: PLplot wrote no image", path);
	return MTLZ_OK;
}

/* A non-empty range around [lo, hi] (pad: fraction of the span added on
 * both sides), at least min_span wide (centred); a non-finite range
 * becomes [0, 1]. */
static void fix_range(double *lo, double *hi, double pad, double min_span)
{
	double s;

	if (!isfinite(*lo) || !isfinite(*hi) || *lo > *hi) {
		*lo = 0;
		*hi = 1;
		return;
	}
	s = *hi - *lo;
	*lo -= pad * s;
	*hi += pad * s;
	/* also keeps the axis labels apart: PLplot prints as many digits as
	 * the span needs, not more */
	min_span = MTLZ_MAX(min_span, 1e-6 * MTLZ_MAX(fabs(*lo), fabs(*hi)) + 1e-9);
	if (*hi - *lo < min_span) {
		const double c = 0.5 * (*lo + *hi);

		*lo = c - 0.5 * min_span;
		*hi = c + 0.5 * min_span;
	}
}

static void minmax(const double *v, int n, double *lo, double *hi)
{
	for (int i = 0; i < n; i++) {
		if (!isfinite(v[i]))
			continue;
		*lo = MTLZ_MIN(*lo, v[i]);
		*hi = MTLZ_MAX(*hi, v[i]);
	}
}

/* A polyline through the finite points, broken where a value is missing. */
static void line_finite(int n, const double *x, const double *y)
{
	int i = 0;

	while (i < n) {
		int j = i;

		while (j < n && isfinite(x[j]) && isfinite(y[j]))
			j++;
		if (j - i >= 2)
			plline(j - i, x + i, y + i);
		i = j + 1;
	}
}

/* Symbol sym (a UTF-8 glyph) at every finite point. */
static void points(int n, const double *x, const double *y, const char *sym)
{
	for (int i = 0; i < n; i++)
		if (isfinite(x[i]) && isfinite(y[i]))
			plstring(1, &x[i], &y[i], sym);
}

static void hline(double x0, double x1, double y)
{
	const PLFLT x[2] = { x0, x1 }, yy[2] = { y, y };

	plline(2, x, yy);
}

/* Two series against the epoch: a blue solid and an orange dashed line, with
 * dots while there are few points (the loss and DWA figures). */
static void epoch_pair(int n, const double *x, const double *y1, const double *y2)
{
	plwidth(2);
	plcol0(C_BLUE);
	line_finite(n, x, y1);
	if (n < 30)
		points(n, x, y1, "•");
	plcol0(C_ORANGE);
	pllsty(L_DASH);
	line_finite(n, x, y2);
	pllsty(L_SOLID);
	if (n < 30)
		points(n, x, y2, "•");
	plwidth(1);
}

/* A filled rectangle with an outline. */
static void box(double x0, double x1, double y0, double y1, int fill, int edge)
{
	PLFLT x[5] = { x0, x1, x1, x0, x0 }, y[5] = { y0, y0, y1, y1, y0 };

	plcol0(fill);
	plfill(4, x, y);
	if (edge >= 0) {
		plcol0(edge);
		plline(5, x, y);
	}
}

/* Title over the whole page. */
static void page_title(const char *t)
{
	plvpor(0, 1, 0, 1);
	plwind(0, 1, 0, 1);
	plcol0(C_FG);
	plschr(0, 1.3 * CH);
	plptex(0.5, 0.955, 1, 0, 0.5, t);
	plschr(0, CH);
}

struct leg {
	const char *text;
	int col, lsty;   /* lsty 0: no line */
	const char *sym; /* NULL: no symbol */
	int box;         /* a colour box instead of a line */
};

/* A legend inside the current viewport at pos (PL_POSITION_*), or with
 * one_row as a single row centred just above the viewport. */
static void legend(const struct leg *e, int n, int pos, int one_row)
{
	PLINT opt[8], tcol[8], bcol[8], bpat[8], lcol[8], lsty[8], scol[8], snum[8];
	PLFLT bscale[8], bwidth[8], lwidth[8], sscale[8], w, h;
	const char *text[8], *sym[8];

	n = MTLZ_MIN(n, 8);
	for (int i = 0; i < n; i++) {
		opt[i] = (e[i].box ? PL_LEGEND_COLOR_BOX : 0) |
			 (e[i].lsty ? PL_LEGEND_LINE : 0) | (e[i].sym ? PL_LEGEND_SYMBOL : 0);
		tcol[i] = C_FG;
		text[i] = e[i].text;
		bcol[i] = e[i].col;
		bpat[i] = 0;
		bscale[i] = 0.8;
		bwidth[i] = 1;
		lcol[i] = e[i].col;
		lsty[i] = e[i].lsty ? e[i].lsty : 1;
		lwidth[i] = 2;
		scol[i] = e[i].col;
		sscale[i] = 1;
		snum[i] = 1;
		sym[i] = e[i].sym ? e[i].sym : "";
	}
	plschr(0, 0.9 * CH);
	if (one_row)
		pllegend(&w, &h, 0, PL_POSITION_TOP | PL_POSITION_OUTSIDE,
			 0.0, 0.01, 0.06, C_BG, C_FG, 1, 1, n, n, opt, 0.8, 0.8, 2.0, 0.0, tcol,
			 text, bcol, bpat, bscale, bwidth, lcol, lsty, lwidth, scol, sscale, snum,
			 sym);
	else
		pllegend(&w, &h, PL_LEGEND_BACKGROUND | PL_LEGEND_BOUNDING_BOX,
			 pos | PL_POSITION_INSIDE, 0.02, 0.03, 0.08, C_BG, C_FG, 1, 0, 0, n, opt,
			 1.0, 0.8, 2.2, 0.0, tcol, text, bcol, bpat, bscale, bwidth, lcol, lsty,
			 lwidth, scol, sscale, snum, sym);
	plschr(0, CH);
	pllsty(L_SOLID);
}

/* A vertical colour bar right of the current viewport, over [lo, hi] of
 * cmap1. */
static void colour_bar(double lo, double hi, const char *label)
{
	PLINT label_opts[1] = { PL_COLORBAR_LABEL_RIGHT }, sub[1] = { 0 }, n_values[1] = { 2 };
	const char *labels[1] = { label }, *axis[1] = { "bcvtm" };
	PLFLT ticks[1] = { 0 }, vals[2] = { lo, hi }, w, h;
	const PLFLT *values[1] = { vals };

	plcol0(C_FG);
	plschr(0, 0.9 * CH);
	plcolorbar(&w, &h, PL_COLORBAR_IMAGE, PL_POSITION_RIGHT | PL_POSITION_OUTSIDE, 0.02, 0,
		   0.035, 0.9, C_BG, C_FG, 1, 0, 0, 0, 0, 1, label_opts, labels, 1, axis, ticks,
		   sub, n_values, values);
	plschr(0, CH);
}

/* Linear-interpolated percentile q of v[0..n) (sorted in place). */
static int cmp_dbl(const void *a, const void *b)
{
	const double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double pct_sorted(const double *v, size_t n, double q)
{
	double h;
	size_t i;

	if (!n)
		return NAN;
	h = (double)(n - 1) * q;
	i = (size_t)h;
	return i + 1 < n ? v[i] + (h - (double)i) * (v[i + 1] - v[i]) : v[n - 1];
}

/* ---- Figs. 4-5: the training history ---- */

static int history_len(const json_t *h)
{
	return json_is_array(h) ? (int)json_array_size(h) : 0;
}

/* hist[i][key] for every epoch; x the epoch numbers. */
static void history_col(const json_t *h, const char *key, double *x, double *y, int n)
{
	for (int i = 0; i < n; i++) {
		json_t *e = json_array_get(h, (size_t)i);
		const double ep = jnum(e, "epoch");

		x[i] = isfinite(ep) ? ep : i + 1;
		y[i] = jnum(e, key);
	}
}

static int fig_loss(const char *path, const json_t *h, int w, int hgt, char *errstr,
		    size_t errstr_size)
{
	static const struct {
		const char *title, *train, *val;
	} panels[3] = {
		{ "Classification (focal loss)", "train_class", "val_class" },
		{ "Metallicity (masked MAE)", "train_metal", "val_metal" },
		{ "Total (DWA-weighted)", "train_total", "val_total" },
	};
	const int n = history_len(h);
	double *x = calloc((size_t)n, sizeof(*x)), *yt = calloc((size_t)n, sizeof(*yt)),
	       *yv = calloc((size_t)n, sizeof(*yv));
	int rc;

	if (!x || !yt || !yv) {
		free(x);
		free(yt);
		free(yv);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	}
	plot_begin(path, w, hgt);
	for (int p = 0; p < 3; p++) {
		double xlo = 1, xhi = MTLZ_MAX(n, 2), lo = INFINITY, hi = -INFINITY;
		int log_y = 1;

		history_col(h, panels[p].train, x, yt, n);
		history_col(h, panels[p].val, x, yv, n);
		minmax(x, n, &xlo, &xhi);
		minmax(yt, n, &lo, &hi);
		minmax(yv, n, &lo, &hi);
		/* losses can fall by orders of magnitude: a log axis when they
		 * span more than one (PLplot labels only the decades) */
		if (!(lo > 0) || hi / lo < 20)
			log_y = 0;
		if (log_y) {
			for (int i = 0; i < n; i++) {
				yt[i] = isfinite(yt[i]) ? log10(yt[i]) : NAN;
				yv[i] = isfinite(yv[i]) ? log10(yv[i]) : NAN;
			}
			lo = log10(lo);
			hi = log10(hi);
		}
		fix_range(&lo, &hi, 0.08, log_y ? 0.2 : 1e-3);
		plvpor(0.09 + p * 0.31, 0.09 + p * 0.31 + 0.25, 0.12, 0.84);
		plwind(xlo - 0.02 * (xhi - xlo), xhi + 0.02 * (xhi - xlo), lo, hi);
		plcol0(C_FG);
		plbox("bcnst", 0, 0, log_y ? "bcnstvl" : "bcnstv", 0, 0);
		pllab("epoch", p == 0 ? "loss" : "", panels[p].title);
		epoch_pair(n, x, yt, yv);
		if (p == 0) {
			const struct leg lg[2] = {
				{ "training", C_BLUE, L_SOLID, NULL, 0 },
				{ "validation", C_ORANGE, L_DASH, NULL, 0 },
			};

			legend(lg, 2, PL_POSITION_TOP | PL_POSITION_RIGHT, 0);
		}
	}
	page_title("Loss per epoch, training and validation");
	rc = plot_end(path, errstr, errstr_size);
	free(x);
	free(yt);
	free(yv);
	return rc;
}

static int fig_dwa(const char *path, const json_t *h, int w, int hgt, char *errstr,
		   size_t errstr_size)
{
	const int n = history_len(h);
	double *x = calloc((size_t)n, sizeof(*x)), *wc = calloc((size_t)n, sizeof(*wc)),
	       *wm = calloc((size_t)n, sizeof(*wm));
	double xlo = 1, xhi = MTLZ_MAX(n, 2), lo = 1, hi = 1;
	char title[160];
	int rc;
	const struct leg lg[3] = {
		{ "λ#d1#u classification", C_BLUE, L_SOLID, NULL, 0 },
		{ "λ#d2#u metallicity", C_ORANGE, L_DASH, NULL, 0 },
		{ "equal weights", C_GREY, L_DOT, NULL, 0 },
	};

	if (!x || !wc || !wm) {
		free(x);
		free(wc);
		free(wm);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	}
	history_col(h, "w_class", x, wc, n);
	history_col(h, "w_metal", x, wm, n);
	minmax(x, n, &xlo, &xhi);
	minmax(wc, n, &lo, &hi);
	minmax(wm, n, &lo, &hi);
	fix_range(&lo, &hi, 0.1, 0.1);
	plot_begin(path, w, hgt);
	plvpor(0.1, 0.95, 0.12, 0.88);
	plwind(xlo - 0.02 * (xhi - xlo), xhi + 0.02 * (xhi - xlo), lo, hi);
	plcol0(C_FG);
	plbox("bcnst", 0, 0, "bcnstv", 0, 0);
	snprintf(title, sizeof(title), "DWA task weights per epoch (%d epochs)", n);
	pllab("epoch", "task weight λ", title);
	plcol0(C_GREY);
	pllsty(L_DOT);
	hline(xlo - xhi, 2 * xhi, 1.0);
	pllsty(L_SOLID);
	epoch_pair(n, x, wc, wm);
	legend(lg, 3, PL_POSITION_TOP | PL_POSITION_RIGHT, 0);
	rc = plot_end(path, errstr, errstr_size);
	free(x);
	free(wc);
	free(wm);
	return rc;
}

/* ---- Fig. 6: predicted vs true metallicity ---- */

static int in_oh_set(const mtlz_eval_item *e)
{
	return e->true_cls == MTLZ_CLASS_STAR_FORMING && isfinite(e->oh_true) &&
	       isfinite(e->oh_pred) && fabs(e->oh_true) < 1e6 && fabs(e->oh_pred) < 1e6;
}

static int fig_oh(const char *path, const mtlz_report_input *in, int w, int hgt, char *errstr,
		  size_t errstr_size)
{
	const json_t *oh = json_object_get(in->metrics, "oh");
	size_t n = 0;
	double *t, *p, *r, *srt, xlo, xhi, ylo, yhi, rlo, rhi, zmax, cmax = 0;
	double **img = NULL, *cells = NULL, mx[64], med[64], p16[64], p84[64];
	int nb, nrb, nmb, rc;
	char title[160], txt[6][64];
	const struct leg lg[3] = {
		{ "1:1", C_FG, L_SOLID, NULL, 0 },
		{ "median Z#dpred#u", C_RED, L_SOLID, NULL, 0 },
		{ "16th-84th percentile", C_PURPLE, L_DASH, NULL, 0 },
	};

	t = malloc((in->n_items + 1) * sizeof(*t));
	p = malloc((in->n_items + 1) * sizeof(*p));
	r = malloc((in->n_items + 1) * sizeof(*r));
	srt = malloc((in->n_items + 1) * sizeof(*srt));
	if (!t || !p || !r || !srt) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < in->n_items; i++) {
		if (!in_oh_set(&in->items[i]))
			continue;
		t[n] = in->items[i].oh_true;
		p[n] = in->items[i].oh_pred;
		r[n] = p[n] - t[n];
		n++;
	}
	/* ranges from the 0.5-99.5 percentiles: a few wild predictions must
	 * not squeeze the bulk into one cell */
	memcpy(srt, t, n * sizeof(*t));
	qsort(srt, n, sizeof(*srt), cmp_dbl);
	xlo = pct_sorted(srt, n, 0.005);
	xhi = pct_sorted(srt, n, 0.995);
	memcpy(srt, p, n * sizeof(*p));
	qsort(srt, n, sizeof(*srt), cmp_dbl);
	ylo = pct_sorted(srt, n, 0.005);
	yhi = pct_sorted(srt, n, 0.995);
	memcpy(srt, r, n * sizeof(*r));
	qsort(srt, n, sizeof(*srt), cmp_dbl);
	rlo = pct_sorted(srt, n, 0.005);
	rhi = pct_sorted(srt, n, 0.995);
	fix_range(&xlo, &xhi, 0.05, 0.1);
	fix_range(&ylo, &yhi, 0.05, 0.1);
	fix_range(&rlo, &rhi, 0.05, 0.02);
	/* the same scale on both axes when the two ranges overlap (the 1:1
	 * line is then the diagonal); separate ones for a model far off */
	if (MTLZ_MAX(xhi, yhi) - MTLZ_MIN(xlo, ylo) < 1.5 * MTLZ_MAX(xhi - xlo, yhi - ylo)) {
		xlo = ylo = MTLZ_MIN(xlo, ylo);
		xhi = yhi = MTLZ_MAX(xhi, yhi);
	}
	nb = (int)MTLZ_MAX(10.0, MTLZ_MIN(80.0, 4 * cbrt((double)n)));
	img = malloc((size_t)nb * sizeof(*img));
	cells = calloc((size_t)nb * (size_t)nb, sizeof(*cells));
	if (!img || !cells) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out;
	}
	for (int i = 0; i < nb; i++)
		img[i] = cells + (size_t)i * (size_t)nb;
	for (size_t i = 0; i < n; i++) {
		const int ix = (int)floor((t[i] - xlo) / (xhi - xlo) * nb);
		const int iy = (int)floor((p[i] - ylo) / (yhi - ylo) * nb);

		if (ix >= 0 && ix < nb && iy >= 0 && iy < nb)
			cmax = MTLZ_MAX(cmax, ++img[ix][iy]);
	}
	/* colour = log10 count; empty cells below zmin stay background */
	for (int i = 0; i < nb * nb; i++)
		cells[i] = cells[i] > 0 ? log10(cells[i]) : -1;
	zmax = MTLZ_MAX(log10(MTLZ_MAX(cmax, 1)), 1.0);
	/* running median of Z_pred in bins of Z_true, bins with >= 3 spectra */
	nmb = MTLZ_MAX(5, MTLZ_MIN(25, nb / 2));
	for (int b = 0; b < nmb; b++) {
		const double lo = xlo + (xhi - xlo) * b / nmb, hi = xlo + (xhi - xlo) * (b + 1) / nmb;
		size_t m = 0;

		for (size_t i = 0; i < n; i++)
			if (t[i] >= lo && t[i] < hi)
				srt[m++] = p[i];
		qsort(srt, m, sizeof(*srt), cmp_dbl);
		mx[b] = 0.5 * (lo + hi);
		med[b] = m >= 3 ? pct_sorted(srt, m, 0.5) : NAN;
		p16[b] = m >= 3 ? pct_sorted(srt, m, 0.16) : NAN;
		p84[b] = m >= 3 ? pct_sorted(srt, m, 0.84) : NAN;
	}

	plot_begin(path, w, hgt);
	set_cmap1(viridis, (int)MTLZ_ARRAY_SIZE(viridis));
	/* top: residual histogram */
	nrb = (int)MTLZ_MAX(10.0, MTLZ_MIN(60.0, sqrt((double)n) * 2));
	{
		double cnt[60] = { 0 }, top = 1;

		for (size_t i = 0; i < n; i++) {
			const int k = (int)floor((r[i] - rlo) / (rhi - rlo) * nrb);

			if (k >= 0 && k < nrb)
				top = MTLZ_MAX(top, ++cnt[k]);
		}
		plvpor(0.1, 0.8, 0.76, 0.9);
		plwind(rlo, rhi, 0, top * 1.12);
		for (int k = 0; k < nrb; k++)
			if (cnt[k] > 0)
				box(rlo + (rhi - rlo) * k / nrb, rlo + (rhi - rlo) * (k + 1) / nrb, 0,
				    cnt[k], C_LBLUE, C_BLUE);
		if (rlo < 0 && rhi > 0) {
			const PLFLT zx[2] = { 0, 0 }, zy[2] = { 0, top * 1.12 };

			plcol0(C_FG);
			pllsty(L_DOT);
			plline(2, zx, zy);
			pllsty(L_SOLID);
		}
		plcol0(C_FG);
		plbox("bcnst", 0, 0, "bcnstv", 0, 0);
		plschr(0, 0.9 * CH);
		plmtex("b", 3.0, 0.5, 0.5, "ΔZ = Z#dpred#u - Z#dtrue#u (dex)");
		plmtex("l", 3.5, 0.5, 0.5, "N");
		plschr(0, CH);
		snprintf(title, sizeof(title), "Predicted vs true metallicity (star-forming, n = %zu)",
			 n);
		plmtex("t", 1.2, 0.5, 0.5, title);
	}
	/* main: density, 1:1, running median and percentiles */
	plvpor(0.1, 0.8, 0.11, 0.63);
	plwind(xlo, xhi, ylo, yhi);
	/* plimagefr, not plimage: plimage maps the colours over the data range
	 * (empty cells included), plimagefr over [0, zmax] like the colour bar */
	plimagefr((const PLFLT *const *)img, nb, nb, xlo, xhi, ylo, yhi, 0, zmax, 0, zmax, NULL,
		  NULL);
	plcol0(C_FG);
	plwidth(2);
	{
		const double lo = MTLZ_MAX(xlo, ylo), hi = MTLZ_MIN(xhi, yhi);

		if (lo < hi) {
			const PLFLT dx[2] = { lo, hi }, dy[2] = { lo, hi };

			plline(2, dx, dy);
		}
	}
	plcol0(C_RED);
	line_finite(nmb, mx, med);
	plcol0(C_PURPLE);
	pllsty(L_DASH);
	line_finite(nmb, mx, p16);
	line_finite(nmb, mx, p84);
	pllsty(L_SOLID);
	plwidth(1);
	plcol0(C_FG);
	plbox("bcnst", 0, 0, "bcnstv", 0, 0);
	pllab("Z#dtrue#u = 12 + log(O/H), label", "Z#dpred#u", "");
	snprintf(txt[0], sizeof(txt[0]), "μ = %+.4f dex", jnum(oh, "bias"));
	snprintf(txt[1], sizeof(txt[1]), "MSE = %.4f", jnum(oh, "mse"));
	snprintf(txt[2], sizeof(txt[2]), "MAE = %.4f", jnum(oh, "mae"));
	snprintf(txt[3], sizeof(txt[3]), "R#u2#d = %.4f", jnum(oh, "r2"));
	snprintf(txt[4], sizeof(txt[4]), "SD = %.4f dex", jnum(oh, "sd"));
	plschr(0, 0.9 * CH);
	for (int i = 0; i < 5; i++)
		plmtex("t", -1.5 - 1.4 * i, 0.03, 0.0, txt[i]);
	plschr(0, CH);
	legend(lg, 3, PL_POSITION_BOTTOM | PL_POSITION_RIGHT, 0);
	colour_bar(0, zmax, "log#d10#u N");
	rc = plot_end(path, errstr, errstr_size);
out:
	free(t);
	free(p);
	free(r);
	free(srt);
	free(img);
	free(cells);
	return rc;
}

/* ---- Fig. 7: MC-dropout uncertainty per bin of Z_pred ---- */

static int fig_uncertainty(const char *path, const json_t *bins, int w, int hgt, char *errstr,
			   size_t errstr_size)
{
	const int n = (int)MTLZ_MIN(json_array_size(bins), 512);
	double x[512], m[512], lo[512], hi[512], rs[512], xlo = INFINITY, xhi = -INFINITY,
	       ylo = 0, yhi = -INFINITY;
	const struct leg lg[2] = {
		{ "mean σ ± its SD (MC dropout)", C_FG, 0, "●", 0 },
		{ "actual residual SD", C_ORANGE, L_DASH, "■", 0 },
	};

	for (int i = 0; i < n; i++) {
		const json_t *b = json_array_get(bins, (size_t)i);
		const double s = jnum(b, "sd_sigma");

		x[i] = 0.5 * (jnum(b, "lo") + jnum(b, "hi"));
		m[i] = jnum(b, "mean_sigma");
		lo[i] = m[i] - (isfinite(s) ? s : 0);
		hi[i] = m[i] + (isfinite(s) ? s : 0);
		rs[i] = jnum(b, "residual_sd");
		xlo = MTLZ_MIN(xlo, jnum(b, "lo"));
		xhi = MTLZ_MAX(xhi, jnum(b, "hi"));
	}
	minmax(hi, n, &ylo, &yhi);
	minmax(rs, n, &ylo, &yhi);
	fix_range(&xlo, &xhi, 0.03, 0.1);
	if (!isfinite(yhi) || yhi <= 0)
		yhi = 1;
	yhi *= 1.15;
	plot_begin(path, w, hgt);
	plvpor(0.12, 0.95, 0.12, 0.88);
	plwind(xlo, xhi, 0, yhi);
	plcol0(C_FG);
	plbox("bcnst", 0, 0, "bcnstv", 0, 0);
	pllab("Z#dpred#u = 12 + log(O/H), predicted", "σ(Z#dpred#u) (dex)",
	      "MC-dropout uncertainty per 0.1 dex of Z#dpred#u");
	plcol0(C_ORANGE);
	pllsty(L_DASH);
	line_finite(n, x, rs);
	pllsty(L_SOLID);
	points(n, x, rs, "■");
	plcol0(C_FG);
	for (int i = 0; i < n; i++)
		if (isfinite(x[i]) && isfinite(lo[i]) && isfinite(hi[i]))
			plerry(1, &x[i], &lo[i], &hi[i]);
	points(n, x, m, "●");
	legend(lg, 2, PL_POSITION_TOP | PL_POSITION_RIGHT, 0);
	return plot_end(path, errstr, errstr_size);
}

/* ---- Fig. 8: confusion matrix ---- */

/* Panel viewports (normalised page coordinates); rows top to bottom are
 * the true classes in class order, columns the predicted ones. */
static const double cm_vp[2][4] = {
	{ 0.17, 0.53, 0.2, 0.8 },
	{ 0.61, 0.97, 0.2, 0.8 },
};

void mtlz_report_confusion_cell(int w, int h, int p, int r, int c, int *px, int *py)
{
	const double *v = cm_vp[p ? 1 : 0];
	const double fx = v[0] + (v[1] - v[0]) * (c + 0.5) / MTLZ_N_CLASSES;
	const double fy = v[3] - (v[3] - v[2]) * (r + 0.5) / MTLZ_N_CLASSES;

	*px = (int)lround(fx * w);
	*py = (int)lround((1 - fy) * h);
}

static int fig_confusion(const char *path, const json_t *metrics, int w, int hgt, char *errstr,
			 size_t errstr_size)
{
	static const char *const names[MTLZ_N_CLASSES] = { "passive", "star-forming", "composite",
							   "AGN" };
	/* the column labels on two lines: four columns are narrow */
	static const char *const col1[MTLZ_N_CLASSES] = { "passive", "star-", "composite", "AGN" },
				 *const col2[MTLZ_N_CLASSES] = { "", "forming", "", "" };
	const json_t *cm = json_object_get(metrics, "confusion"),
		     *cn = json_object_get(metrics, "confusion_normalized");
	double cmax = 1;
	char title[160];

	for (int r = 0; r < MTLZ_N_CLASSES; r++)
		for (int c = 0; c < MTLZ_N_CLASSES; c++) {
			const double v = jat(json_array_get(cm, (size_t)r), (size_t)c);

			if (isfinite(v))
				cmax = MTLZ_MAX(cmax, v);
		}
	plot_begin(path, w, hgt);
	set_cmap1(blues, (int)MTLZ_ARRAY_SIZE(blues));
	for (int p = 0; p < 2; p++) {
		plvpor(cm_vp[p][0], cm_vp[p][1], cm_vp[p][2], cm_vp[p][3]);
		plwind(0, MTLZ_N_CLASSES, 0, MTLZ_N_CLASSES);
		for (int r = 0; r < MTLZ_N_CLASSES; r++) {
			const json_t *row = json_array_get(p ? cn : cm, (size_t)r);
			const double y0 = MTLZ_N_CLASSES - 1 - r;

			for (int c = 0; c < MTLZ_N_CLASSES; c++) {
				const double v = jat(row, (size_t)c);
				const double f = p ? v : v / cmax;
				PLFLT bx[5] = { c, c + 1, c + 1, c, c }, by[5] = { y0, y0, y0 + 1,
										  y0 + 1, y0 };
				char t[32];

				if (isfinite(f)) {
					plcol1(MTLZ_MAX(0.0, MTLZ_MIN(1.0, f)));
					plfill(4, bx, by);
				} else {
					plcol0(C_LGREY);
					plfill(4, bx, by);
				}
				plcol0(C_GREY);
				plline(5, bx, by);
				if (!isfinite(v))
					snprintf(t, sizeof(t), "-");
				else if (p)
					snprintf(t, sizeof(t), "%.1f%%", 100 * v);
				else
					snprintf(t, sizeof(t), "%.0f", v);
				/* light text on the dark half of the map */
				plcol0(isfinite(f) && f > 0.55 ? C_WHITE : C_FG);
				plschr(0, 0.9 * CH);
				plptex(c + 0.5, y0 + 0.5 - 0.05, 1, 0, 0.5, t);
				plschr(0, CH);
			}
		}
		plcol0(C_FG);
		plbox("bc", 0, 0, "bc", 0, 0);
		plschr(0, 0.85 * CH);
		for (int k = 0; k < MTLZ_N_CLASSES; k++) {
			plmtex("b", 1.4, (k + 0.5) / MTLZ_N_CLASSES, 0.5, col1[k]);
			plmtex("b", 2.5, (k + 0.5) / MTLZ_N_CLASSES, 0.5, col2[k]);
			if (!p)
				plmtex("lv", 0.6, 1 - (k + 0.5) / MTLZ_N_CLASSES, 1.0, names[k]);
		}
		plschr(0, CH);
		plmtex("b", 4.2, 0.5, 0.5, "predicted class");
		if (!p)
			plmtex("l", 8.0, 0.5, 0.5, "true class");
		plmtex("t", 1.0, 0.5, 0.5, p ? "row-normalised (recall on the diagonal)" :
		       "counts");
	}
	snprintf(title, sizeof(title), "Confusion matrix (n = %.0f, accuracy %.4f)",
		 jnum(metrics, "n"), jnum(metrics, "accuracy"));
	page_title(title);
	return plot_end(path, errstr, errstr_size);
}

/* ---- reliability diagram ---- */

static int fig_reliability(const char *path, const json_t *cal, int w, int hgt, char *errstr,
			   size_t errstr_size)
{
	const json_t *bins = json_object_get(cal, "bins");
	const int n = (int)MTLZ_MIN(json_array_size(bins), 256);
	double conf[256], acc[256], cmax = 1;
	char title[160];
	const struct leg lg[3] = {
		{ "accuracy per bin", C_LBLUE, 0, NULL, 1 },
		{ "mean confidence vs accuracy", C_BLUE, L_SOLID, "●", 0 },
		{ "perfect calibration", C_FG, L_DASH, NULL, 0 },
	};

	plot_begin(path, w, hgt);
	plvpor(0.1, 0.95, 0.34, 0.9);
	plwind(0, 1, 0, 1.02);
	for (int i = 0; i < n; i++) {
		const json_t *b = json_array_get(bins, (size_t)i);
		const double c = jnum(b, "n");

		conf[i] = c > 0 ? jnum(b, "confidence") : NAN;
		acc[i] = c > 0 ? jnum(b, "accuracy") : NAN;
		if (isfinite(c))
			cmax = MTLZ_MAX(cmax, c);
		if (c > 0 && isfinite(acc[i]) && acc[i] > 0)
			box(jnum(b, "lo"), jnum(b, "hi"), 0, acc[i], C_LBLUE, C_BLUE);
	}
	plcol0(C_FG);
	pllsty(L_DASH);
	{
		const PLFLT d[2] = { 0, 1 };

		plline(2, d, d);
	}
	pllsty(L_SOLID);
	plcol0(C_BLUE);
	plwidth(2);
	line_finite(n, conf, acc);
	plwidth(1);
	points(n, conf, acc, "●");
	plcol0(C_FG);
	plbox("bcst", 0, 0, "bcnstv", 0, 0);
	plmtex("l", 3.5, 0.5, 0.5, "accuracy");
	snprintf(title, sizeof(title), "Reliability diagram: ECE = %.4f (%.0f bins, n = %.0f)",
		 jnum(cal, "ece"), jnum(cal, "n_bins"), jnum(cal, "n"));
	plmtex("t", 1.2, 0.5, 0.5, title);
	legend(lg, 3, PL_POSITION_TOP | PL_POSITION_LEFT, 0);
	/* bottom: how many spectra each bin holds */
	plvpor(0.1, 0.95, 0.1, 0.3);
	plwind(0, 1, 0, cmax * 1.1);
	for (int i = 0; i < n; i++) {
		const json_t *b = json_array_get(bins, (size_t)i);

		if (jnum(b, "n") > 0)
			box(jnum(b, "lo"), jnum(b, "hi"), 0, jnum(b, "n"), C_LGREY, C_GREY);
	}
	plcol0(C_FG);
	plbox("bcnst", 0, 0, "bcnstv", 0, 0);
	pllab("confidence (max class probability)", "spectra", "");
	return plot_end(path, errstr, errstr_size);
}

/* ---- Fig. 9: per redshift / S/N bin ---- */

static int fig_bins(const char *path, const json_t *bins, const char *what, const char *title,
		    int w, int hgt, char *errstr, size_t errstr_size)
{
	const int n = (int)MTLZ_MIN(json_array_size(bins), 64);
	double x[64], acc[64], alo[64], ahi[64], sd[64], slo[64], shi[64], bias[64];
	double a_lo = INFINITY, a_hi = -INFINITY, m_lo = 0, m_hi = 0;
	int has_aci = 0, has_sci = 0;
	const struct leg lga[1] = { { "classification accuracy", C_BLUE, L_SOLID, "●", 0 } };
	const struct leg lgm[2] = {
		{ "metallicity SD σ(ΔZ)", C_ORANGE, L_DASH, "■", 0 },
		{ "metallicity bias <ΔZ>", C_GREEN, L_LDASH, "▲", 0 },
	};

	for (int i = 0; i < n; i++) {
		const json_t *b = json_array_get(bins, (size_t)i),
			     *aci = json_object_get(b, "accuracy_ci"),
			     *sci = json_object_get(b, "oh_sd_ci");

		x[i] = i + 0.5;
		acc[i] = jnum(b, "accuracy");
		sd[i] = jnum(b, "oh_sd");
		bias[i] = jnum(b, "oh_bias");
		alo[i] = jat(aci, 0);
		ahi[i] = jat(aci, 1);
		slo[i] = jat(sci, 0);
		shi[i] = jat(sci, 1);
		has_aci |= isfinite(alo[i]) && isfinite(ahi[i]);
		has_sci |= isfinite(slo[i]) && isfinite(shi[i]);
	}
	minmax(acc, n, &a_lo, &a_hi);
	minmax(alo, n, &a_lo, &a_hi);
	minmax(ahi, n, &a_lo, &a_hi);
	fix_range(&a_lo, &a_hi, 0.15, 0.05);
	a_lo = MTLZ_MAX(a_lo, 0.0);
	a_hi = MTLZ_MIN(a_hi, 1.02);
	if (a_hi - a_lo < 0.02)
		a_lo = a_hi - 0.1;
	minmax(sd, n, &m_lo, &m_hi);
	minmax(bias, n, &m_lo, &m_hi);
	minmax(slo, n, &m_lo, &m_hi);
	minmax(shi, n, &m_lo, &m_hi);
	fix_range(&m_lo, &m_hi, 0.12, 0.01);

	plot_begin(path, w, hgt);
	/* top: accuracy, with the spectra per bin */
	plvpor(0.13, 0.95, 0.56, 0.85);
	plwind(0, n, a_lo, a_hi);
	plcol0(C_FG);
	plbox("bcg", 1, 0, "bcnstv", 0, 0);
	plmtex("l", 4.5, 0.5, 0.5, "accuracy");
	plcol0(C_BLUE);
	plwidth(2);
	line_finite(n, x, acc);
	plwidth(1);
	if (has_aci)
		for (int i = 0; i < n; i++)
			if (isfinite(alo[i]) && isfinite(ahi[i]))
				plerry(1, &x[i], &alo[i], &ahi[i]);
	points(n, x, acc, "●");
	plcol0(C_GREY);
	plschr(0, 0.85 * CH);
	for (int i = 0; i < n; i++) {
		const json_t *b = json_array_get(bins, (size_t)i);
		char t[48];

		snprintf(t, sizeof(t), "n %.0f / SF %.0f", jnum(b, "n"), jnum(b, "oh_n"));
		plmtex("b", -1.0, (i + 0.5) / n, 0.5, t);
	}
	plschr(0, CH);
	legend(lga, 1, 0, 1);
	/* bottom: metallicity SD and bias */
	plvpor(0.13, 0.95, 0.12, 0.45);
	plwind(0, n, m_lo, m_hi);
	plcol0(C_GREY);
	pllsty(L_DOT);
	hline(0, n, 0);
	pllsty(L_SOLID);
	plcol0(C_FG);
	plbox("bcg", 1, 0, "bcnstv", 0, 0);
	plmtex("l", 4.5, 0.5, 0.5, "σ(ΔZ), <ΔZ> (dex)");
	plwidth(2);
	plcol0(C_ORANGE);
	pllsty(L_DASH);
	line_finite(n, x, sd);
	plcol0(C_GREEN);
	pllsty(L_LDASH);
	line_finite(n, x, bias);
	pllsty(L_SOLID);
	plwidth(1);
	plcol0(C_ORANGE);
	if (has_sci)
		for (int i = 0; i < n; i++)
			if (isfinite(slo[i]) && isfinite(shi[i]))
				plerry(1, &x[i], &slo[i], &shi[i]);
	points(n, x, sd, "■");
	plcol0(C_GREEN);
	points(n, x, bias, "▲");
	plcol0(C_FG);
	plschr(0, 0.95 * CH);
	for (int i = 0; i < n; i++) {
		const json_t *b = json_array_get(bins, (size_t)i);
		char t[48];

		snprintf(t, sizeof(t), "[%g, %g)", jnum(b, "lo"), jnum(b, "hi"));
		plmtex("b", 1.3, (i + 0.5) / n, 0.5, t);
	}
	plschr(0, CH);
	plmtex("b", 3.0, 0.5, 0.5, what);
	legend(lgm, 2, 0, 1);
	page_title(title);
	return plot_end(path, errstr, errstr_size);
}

/* ---- Fig. 10: mass-metallicity relation ---- */

static int fig_mzr(const char *path, const mtlz_report_input *in, const json_t *mzr, int w,
		   int hgt, char *errstr, size_t errstr_size)
{
	const json_t *bins = json_object_get(mzr, "bins");
	const int n = (int)MTLZ_MIN(json_array_size(bins), 64);
	const double mlo = jnum(mzr, "lo"), mhi = jnum(mzr, "hi");
	const double xlo = isfinite(mlo) ? mlo : MTLZ_METRICS_MZR_LO,
		     xhi = isfinite(mhi) ? mhi : MTLZ_METRICS_MZR_HI;
	double x[64], pm[64], p16[64], p84[64], tm[64], tx[101], ty[101], tlo[101], thi[101];
	double ylo = INFINITY, yhi = -INFINITY;
	char title[160];
	const struct leg lg[5] = {
		{ "Tremonti et al. (2004)", C_FG, L_SOLID, NULL, 0 },
		{ "Tremonti ± 0.1 dex", C_FG, L_DASH, NULL, 0 },
		{ "predicted median", C_RED, L_SOLID, NULL, 0 },
		{ "predicted 16th-84th pct.", C_RED, L_DASH, NULL, 0 },
		{ "true median (labels)", C_BLUE, 0, "○", 0 },
	};

	for (int i = 0; i < n; i++) {
		const json_t *b = json_array_get(bins, (size_t)i);
		const int ok = jnum(b, "n") > 0;

		x[i] = jnum(b, "centre");
		pm[i] = ok ? jnum(b, "pred_median") : NAN;
		p16[i] = ok ? jnum(b, "pred_p16") : NAN;
		p84[i] = ok ? jnum(b, "pred_p84") : NAN;
		tm[i] = ok ? jnum(b, "true_median") : NAN;
	}
	for (int i = 0; i <= 100; i++) {
		tx[i] = xlo + (xhi - xlo) * i / 100;
		ty[i] = mtlz_tremonti04_oh(tx[i]);
		/* the scatter of the SDSS relation, Tremonti et al. (2004): ~0.1 dex */
		tlo[i] = ty[i] - 0.1;
		thi[i] = ty[i] + 0.1;
	}
	minmax(tlo, 101, &ylo, &yhi);
	minmax(thi, 101, &ylo, &yhi);
	minmax(p16, n, &ylo, &yhi);
	minmax(p84, n, &ylo, &yhi);
	minmax(pm, n, &ylo, &yhi);
	minmax(tm, n, &ylo, &yhi);
	fix_range(&ylo, &yhi, 0.08, 0.2);
	plot_begin(path, w, hgt);
	plvpor(0.12, 0.95, 0.12, 0.88);
	plwind(xlo, xhi, ylo, yhi);
	/* every star-forming spectrum in the mass range, faint */
	plcol0(C_LGREY);
	for (size_t i = 0; in->items && i < in->n_items; i++) {
		const mtlz_eval_item *e = &in->items[i];

		if (in_oh_set(e) && e->log_mass >= xlo && e->log_mass < xhi &&
		    e->oh_pred >= ylo && e->oh_pred <= yhi)
			plstring(1, &e->log_mass, &e->oh_pred, "•");
	}
	plcol0(C_FG);
	plwidth(2);
	plline(101, tx, ty);
	pllsty(L_DASH);
	plline(101, tx, tlo);
	plline(101, tx, thi);
	plcol0(C_RED);
	pllsty(L_SOLID);
	line_finite(n, x, pm);
	pllsty(L_DASH);
	line_finite(n, x, p16);
	line_finite(n, x, p84);
	pllsty(L_SOLID);
	plwidth(1);
	points(n, x, pm, "●");
	plcol0(C_BLUE);
	points(n, x, tm, "○");
	plcol0(C_FG);
	plbox("bcnst", 0, 0, "bcnstv", 0, 0);
	snprintf(title, sizeof(title), "Mass-metallicity relation (star-forming, n = %.0f)",
		 jnum(mzr, "n"));
	pllab("log(M#d*#u / M#d⊙#u)", "12 + log(O/H)", title);
	legend(lg, 5, PL_POSITION_BOTTOM | PL_POSITION_RIGHT, 0);
	return plot_end(path, errstr, errstr_size);
}

/* ---- the figures ---- */

static int has_device(const char *name)
{
	const char *menu_a[128], *dev_a[128];
	const char **menu = menu_a, **dev = dev_a;
	int n = 128;

	plgDevs(&menu, &dev, &n);
	for (int i = 0; i < n; i++)
		if (dev[i] && !strcmp(dev[i], name))
			return 1;
	return 0;
}

/* Number of bins of arr with key > 0. */
static long bins_with(const json_t *arr, const char *key)
{
	long k = 0;

	for (size_t i = 0; i < json_array_size(arr); i++)
		if (jnum(json_array_get(arr, i), key) > 0)
			k++;
	return k;
}

static long finite_in(const json_t *arr, const char *key)
{
	long k = 0;

	for (size_t i = 0; i < json_array_size(arr); i++)
		if (isfinite(jnum(json_array_get(arr, i), key)))
			k++;
	return k;
}

static int draw(int fig, const char *path, const mtlz_report_input *in, int w, int h,
		char *why, size_t why_size, char *errstr, size_t errstr_size)
{
	const json_t *m = in->metrics;
	const int n_hist = history_len(in->history);
	size_t n_oh = 0;

	switch (fig) {
	case MTLZ_FIG_LOSS:
	case MTLZ_FIG_DWA:
		if (!n_hist) {
			snprintf(why, why_size, "the model has no training history (metadata "
				 "mtlz.training has no \"history\": not trained by this mtlz-retrain)");
			return 1;
		}
		return fig == MTLZ_FIG_LOSS ? fig_loss(path, in->history, w, h, errstr, errstr_size) :
		       fig_dwa(path, in->history, w, h, errstr, errstr_size);
	case MTLZ_FIG_OH:
		if (!in->items) {
			snprintf(why, why_size, "no per-spectrum predictions were given");
			return 1;
		}
		for (size_t i = 0; i < in->n_items; i++)
			n_oh += (size_t)in_oh_set(&in->items[i]);
		if (n_oh < 2) {
			snprintf(why, why_size, "fewer than 2 star-forming spectra with a "
				 "metallicity label (%zu)", n_oh);
			return 1;
		}
		return fig_oh(path, in, w, h, errstr, errstr_size);
	case MTLZ_FIG_UNCERTAINTY:
		if (!finite_in(json_object_get(m, "uncertainty_by_oh_pred"), "mean_sigma")) {
			snprintf(why, why_size, "no MC-dropout uncertainties (evaluated with --mc 0, "
				 "or no star-forming spectrum with a metallicity label)");
			return 1;
		}
		return fig_uncertainty(path, json_object_get(m, "uncertainty_by_oh_pred"), w, h,
				       errstr, errstr_size);
	case MTLZ_FIG_CONFUSION:
		if (!(jnum(m, "n") > 0)) {
			snprintf(why, why_size, "no spectrum with a class label");
			return 1;
		}
		return fig_confusion(path, m, w, h, errstr, errstr_size);
	case MTLZ_FIG_RELIABILITY:
		if (!bins_with(json_object_get(json_object_get(m, "calibration"), "bins"), "n")) {
			snprintf(why, why_size, "no spectrum with a class label");
			return 1;
		}
		return fig_reliability(path, json_object_get(m, "calibration"), w, h, errstr,
				       errstr_size);
	case MTLZ_FIG_BY_Z:
		if (!bins_with(json_object_get(m, "by_z"), "n")) {
			snprintf(why, why_size, "no labelled spectrum has a redshift in [0, 0.3)");
			return 1;
		}
		return fig_bins(path, json_object_get(m, "by_z"), "redshift z",
				"Performance per redshift bin", w, h, errstr, errstr_size);
	case MTLZ_FIG_BY_SN:
		if (!bins_with(json_object_get(m, "by_sn"), "n")) {
			snprintf(why, why_size, "no labelled spectrum has an S/N_r in [5, 100)");
			return 1;
		}
		return fig_bins(path, json_object_get(m, "by_sn"), "S/N#dr#u",
				"Performance per S/N#dr#u bin", w, h, errstr, errstr_size);
	case MTLZ_FIG_MZR: {
		const json_t *mzr = json_object_get(m, "mzr");

		if (!json_is_object(mzr)) {
			snprintf(why, why_size, "no stellar masses in the data (no star-forming "
				 "spectrum with a metallicity label has log M*)");
			return 1;
		}
		if (!(jnum(mzr, "n") > 0)) {
			snprintf(why, why_size, "no star-forming spectrum with log M* in [%g, %g)",
				 MTLZ_METRICS_MZR_LO, MTLZ_METRICS_MZR_HI);
			return 1;
		}
		return fig_mzr(path, in, mzr, w, h, errstr, errstr_size);
	}
	}
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "unknown figure %d", fig);
}

int mtlz_report_plots(const char *dir, const mtlz_report_input *in, mtlz_report_result *res,
		      char *errstr, size_t errstr_size)
{
	const int w = in && in->width ? in->width : MTLZ_REPORT_WIDTH;
	const int h = in && in->height ? in->height : MTLZ_REPORT_HEIGHT;
	int rc = MTLZ_OK;

	memset(res, 0, sizeof(*res));
	if (!in || !json_is_object(in->metrics))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "report: no metrics");
	if (w < 200 || h < 150 || w > 10000 || h > 10000)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"report: plot size %dx%d outside 200x150 .. 10000x10000", w, h);
	pthread_mutex_lock(&plot_lock);
	if (!has_device("pngcairo")) {
		pthread_mutex_unlock(&plot_lock);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
				"report: PLplot has no pngcairo device (install plplot-driver-cairo)");
	}
	for (int f = 0; f < MTLZ_N_FIGS && rc == MTLZ_OK; f++) {
		char path[4096];
		int r;

		if (snprintf(path, sizeof(path), "%s/%s", dir, figs[f].file) >= (int)sizeof(path)) {
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "%s: path too long",
				      dir);
			break;
		}
		/* a figure of an earlier report must not outlive its data */
		if (unlink(path) && errno != ENOENT) {
			rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path,
				      strerror(errno));
			break;
		}
		r = draw(f, path, in, w, h, res->why_not[f], sizeof(res->why_not[f]), errstr,
			 errstr_size);
		if (r < 0)
			rc = r;
		else
			res->drawn[f] = r == MTLZ_OK;
	}
	pthread_mutex_unlock(&plot_lock);
	return rc;
}

/* ---- report.md ---- */

/* A number with `digits` decimals (0: an integer, < 0: with a sign), or a
 * dash for null. */
static void fmt(FILE *f, const json_t *v, int digits)
{
	if (!json_is_number(v))
		fputs("–", f);
	else if (digits < 0)
		fprintf(f, "%+.*f", -digits, json_number_value(v));
	else
		fprintf(f, "%.*f", digits, json_number_value(v));
}

static void write_page(FILE *f, const mtlz_report_input *in, const mtlz_report_result *res)
{
	static const char *const names[4] = { "passive", "star_forming", "composite", "agn" };
	const json_t *j = in->metrics, *oh = json_object_get(j, "oh"),
		     *conf = json_object_get(j, "confusion"), *pc = json_object_get(j, "per_class"),
		     *cal = json_object_get(j, "calibration"), *cov = json_object_get(j, "coverage");

	fputs("# mtlz evaluation\n\n", f);
	if (in->model)
		fprintf(f, "model: `%s`  \n", in->model);
	if (in->n_data) {
		fputs("data:", f);
		for (int i = 0; i < in->n_data; i++)
			fprintf(f, " `%s`", in->data[i]);
		fputs("  \n", f);
	}
	fprintf(f, "spectra: %lld", (long long)json_integer_value(json_object_get(j, "n_items")));
	if (json_is_integer(json_object_get(j, "rejected_by_preprocessing")))
		fprintf(f, " (%lld more rejected by preprocessing)", (long long)json_integer_value(
			json_object_get(j, "rejected_by_preprocessing")));
	fputs("\n\n## Key numbers\n\n| metric | value |\n|---|---|\n| accuracy | ", f);
	fmt(f, json_object_get(j, "accuracy"), 4);
	fputs(" |\n| F1 macro | ", f);
	fmt(f, json_object_get(j, "f1_macro"), 4);
	fputs(" |\n| metallicity SD (oh_sd) | ", f);
	fmt(f, json_object_get(oh, "sd"), 4);
	fputs(" dex |\n| metallicity bias (oh_bias) | ", f);
	fmt(f, json_object_get(oh, "bias"), -4);
	fputs(" dex |\n| ECE | ", f);
	fmt(f, json_object_get(cal, "ece"), 4);
	fputs(" |\n| coverage within 1σ / 2σ | ", f);
	fmt(f, json_object_get(cov, "within_1sigma"), 3);
	fputs(" / ", f);
	fmt(f, json_object_get(cov, "within_2sigma"), 3);
	fputs(" (n ", f);
	fmt(f, json_object_get(cov, "n"), 0);
	fputs(") |\n\n## Classification\n\naccuracy ", f);
	fmt(f, json_object_get(j, "accuracy"), 4);
	fputs(", macro F1 ", f);
	fmt(f, json_object_get(j, "f1_macro"), 4);
	fputs("\n\n| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n", f);
	for (int c = 0; c < 4; c++) {
		const json_t *e = json_object_get(pc, names[c]);

		fprintf(f, "| %s | ", names[c]);
		fmt(f, json_object_get(e, "precision"), 4);
		fputs(" | ", f);
		fmt(f, json_object_get(e, "recall"), 4);
		fputs(" | ", f);
		fmt(f, json_object_get(e, "f1"), 4);
		fputs(" | ", f);
		fmt(f, json_object_get(e, "support"), 0);
		fputs(" |\n", f);
	}
	fputs("\nconfusion (rows true, columns predicted):\n\n| | passive | star_forming | "
	      "composite | agn |\n|---|---|---|---|---|\n", f);
	for (int r = 0; r < 4; r++) {
		fprintf(f, "| %s |", names[r]);
		for (int c = 0; c < 4; c++)
			fprintf(f, " %lld |", (long long)json_integer_value(
				json_array_get(json_array_get(conf, (size_t)r), (size_t)c)));
		fputs("\n", f);
	}
	fputs("\n## Metallicity (star-forming)\n\nn ", f);
	fmt(f, json_object_get(oh, "n"), 0);
	fputs(", SD ", f);
	fmt(f, json_object_get(oh, "sd"), 4);
	fputs(" dex, bias ", f);
	fmt(f, json_object_get(oh, "bias"), -4);
	fputs(", MAE ", f);
	fmt(f, json_object_get(oh, "mae"), 4);
	fputs(", R² ", f);
	fmt(f, json_object_get(oh, "r2"), 4);
	fputs("\n\n## Figures\n\n", f);
	for (int i = 0; i < MTLZ_N_FIGS; i++) {
		if (res->drawn[i])
			fprintf(f, "![%s](%s)\n\n%s\n\n", figs[i].file, figs[i].file,
				figs[i].caption);
		else
			fprintf(f, "*%s not drawn: %s.* %s\n\n", figs[i].file, res->why_not[i],
				figs[i].caption);
	}
	fputs("The full numbers (per redshift and S/N bin, calibration bins, uncertainty bins, "
	      "MZR bins, bootstrap intervals) are in [metrics.json](metrics.json).\n", f);
}

int mtlz_report_write(const char *dir, const mtlz_report_input *in, char *errstr,
		      size_t errstr_size)
{
	char path[4096];
	mtlz_report_result res;
	FILE *f;
	int rc;

	if (!in || !json_is_object(in->metrics))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "report: no metrics");
	if (mkdir(dir, 0777) && errno != EEXIST)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", dir, strerror(errno));
	snprintf(path, sizeof(path), "%s/metrics.json", dir);
	if (json_dump_file(in->metrics, path, JSON_INDENT(1) | JSON_REAL_PRECISION(8)))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: cannot write", path);
	rc = mtlz_report_plots(dir, in, &res, errstr, errstr_size);
	if (rc)
		return rc;
	snprintf(path, sizeof(path), "%s/report.md", dir);
	f = fopen(path, "w");
	if (!f)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path, strerror(errno));
	write_page(f, in, &res);
	if (ferror(f) | fclose(f))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: write failed", path);
	return MTLZ_OK;
}

/* ---- the evaluation run ---- */

/* The "history" array of the model's training manifest (new reference),
 * or NULL. */
static json_t *model_history(const mtlz_model *m)
{
	const char *s = mtlz_model_meta(m, "mtlz.training");
	json_t *man = s ? json_loads(s, 0, NULL) : NULL, *h = json_object_get(man, "history");

	if (json_is_array(h))
		json_incref(h);
	else
		h = NULL;
	json_decref(man);
	return h;
}

json_t *mtlz_report_eval(const mtlz_report_eval_opts *o, mtlz_eval_item **items_out,
			 size_t *n_out, char *errstr, size_t errstr_size)
{
	const char *schemas = o->schema_dir ? o->schema_dir : getenv("MTLZ_SCHEMA_DIR");
	enum { B = 64 };
	mtlz_dataset d = { 0 };
	mtlz_prep_opts prep;
	mtlz_model *m = NULL;
	mtlz_avro *avro = NULL;
	mtlz_engine *e = NULL;
	mtlz_engine_opts eo;
	mtlz_eval_item *items = NULL;
	mtlz_output *out = NULL;
	mtlz_metrics_opts mo = { 0 };
	json_t *j = NULL, *hist = NULL;

	if (items_out)
		*items_out = NULL;
	if (n_out)
		*n_out = 0;
	if (!o->model || !o->n_data) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "a model and data are needed");
		return NULL;
	}
	if (!schemas) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "no schema directory (set MTLZ_SCHEMA_DIR)");
		return NULL;
	}
	m = mtlz_model_load(o->model, errstr, errstr_size);
	avro = m ? mtlz_avro_new(schemas, NULL, errstr, errstr_size) : NULL;
	if (!avro)
		goto out;
	mtlz_prep_opts_default(&prep);
	prep.grid = *mtlz_model_grid(m);
	if (mtlz_dataset_load(&d, avro, o->data, o->n_data, &prep, errstr, errstr_size))
		goto out;
	mtlz_engine_opts_default(&eo);
	eo.max_batch = B;
	eo.mc_samples = o->mc;
	if (o->threads)
		eo.n_threads = o->threads;
	e = mtlz_engine_new(&eo, errstr, errstr_size);
	if (!e || mtlz_engine_set_model(e, m, errstr, errstr_size))
		goto out;
	items = calloc(d.n + 1, sizeof(*items));
	out = calloc(B, sizeof(*out));
	if (!items || !out) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		goto out;
	}
	for (size_t s = 0; s < d.n; s += B) {
		const int nb = (int)MTLZ_MIN((size_t)B, d.n - s);

		if (mtlz_engine_run(e, d.x + s * (size_t)d.L, nb, o->mc, out, errstr, errstr_size))
			goto out;
		for (int i = 0; i < nb; i++) {
			mtlz_eval_item *it = &items[s + (size_t)i];

			it->true_cls = d.cls[s + (size_t)i];
			for (int k = 0; k < 4; k++) {
				it->prob[k] = out[i].prob[k];
				/* log p: softmax(log p / T) is temperature scaling */
				it->logit[k] = logf(MTLZ_MAX(out[i].prob[k], 1e-30f));
			}
			it->oh_true = d.oh[s + (size_t)i];
			it->oh_pred = out[i].metal;
			it->oh_sigma = out[i].metal_sigma;
			it->z = d.z[s + (size_t)i];
			it->sn_r = d.sn_r[s + (size_t)i];
			it->log_mass = d.log_mass[s + (size_t)i];
		}
	}
	mo.n_boot = o->n_boot;
	mo.seed = o->seed;
	j = mtlz_metrics_json_opts(items, d.n, &mo, errstr, errstr_size);
	if (!j)
		goto out;
	json_object_set_new(j, "model", json_string(o->model));
	json_object_set_new(j, "rejected_by_preprocessing", json_integer((json_int_t)d.n_rejected));
	if (o->report_dir) {
		mtlz_report_input in = {
			.metrics = j, .items = items, .n_items = d.n, .model = o->model,
			.data = o->data, .n_data = o->n_data, .width = o->width,
			.height = o->height,
		};

		hist = model_history(m);
		in.history = hist;
		if (mtlz_report_write(o->report_dir, &in, errstr, errstr_size)) {
			json_decref(j);
			j = NULL;
			goto out;
		}
	}
	if (items_out) {
		*items_out = items;
		items = NULL;
	}
	if (n_out)
		*n_out = d.n;
out:
	json_decref(hist);
	free(items);
	free(out);
	mtlz_engine_free(e);
	mtlz_dataset_free(&d);
	mtlz_avro_free(avro);
	mtlz_model_free(m);
	return j;
}
