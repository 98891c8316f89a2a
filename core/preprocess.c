/*
 * preprocess.c - native grid -> model grid (see preprocess.h).
 *
 * Uniform grids (linear, log-linear): one branch-free pass compacts the good
 * pixels and records, per input pixel, the last good node at or before it;
 * the output pass computes each output wavelength's pixel coordinate
 * directly, so there is no search and, between adjacent good pixels, no
 * division or transcendental (wavelengths are computed only across gaps).
 * Explicit grids: good nodes (wavelength, flux) and a merge-walk.
 * O(n_in + n_out) either way: 22-26k spectra/s per core (mtlz bench).
 * On CPUs with AVX2 the uniform grids take a vectorised path instead (see
 * collect_uniform_avx2): 60-75k spectra/s per core, x2.3-3.2.
 */
#define _GNU_SOURCE
#include "preprocess.h"
#include "common.h"
#include "kernels_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PREP_HAVE_AVX2 1
#endif

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mtlz_prep_ws {
	double *gw;   /* good-node wavelengths */
	float *gf;    /* good-node fluxes */
	int32_t *gi;  /* good-node pixel indices (uniform grids) */
	int32_t *rank;/* per input pixel: index of the last good node at or before it */
	int32_t *ok;  /* AVX2 path: per input pixel -1 if good, else 0 */
	int32_t *runs;/* AVX2 path: interior runs of bad pixels, (first, last) pairs */
	size_t cap;
	int isa;      /* MTLZ_ISA_*: which uniform-grid implementation runs */
	/* log10 of the output wavelengths, for log-linear inputs; cached per grid */
	double *logw;
	mtlz_grid logw_grid;
	int n_logw;
};

void mtlz_prep_opts_default(mtlz_prep_opts *o)
{
	mtlz_grid_default(&o->grid);
	o->and_mask_bits = 0;
	o->min_coverage = 0.9;
	o->max_bad_frac = 0.5;
	o->warn_bad_frac = 0.1;
	o->max_gap = 50.0;
	o->min_sn = 5.0;
}

mtlz_prep_ws *mtlz_prep_ws_new(void)
{
	mtlz_prep_ws *ws = calloc(1, sizeof(mtlz_prep_ws));

	if (ws)
		mtlz_prep_ws_set_isa(ws, MTLZ_ISA_AVX2); /* the best this CPU runs */
	return ws;
}

int mtlz_prep_ws_set_isa(mtlz_prep_ws *ws, int isa)
{
#ifdef PREP_HAVE_AVX2
	ws->isa = isa == MTLZ_ISA_AVX2 && mtlz_isa_detect() == MTLZ_ISA_AVX2 ?
		  MTLZ_ISA_AVX2 : MTLZ_ISA_GENERIC;
#else
	(void)isa;
	ws->isa = MTLZ_ISA_GENERIC;
#endif
	return ws->isa;
}

void mtlz_prep_ws_free(mtlz_prep_ws *ws)
{
	if (!ws)
		return;
	free(ws->gw);
	free(ws->gf);
	free(ws->rank);
	free(ws->gi);
	free(ws->ok);
	free(ws->runs);
	free(ws->logw);
	free(ws);
}

static int ws_reserve(mtlz_prep_ws *ws, size_t n)
{
	double *gw;
	float *gf;
	int32_t *rank;

	if (n <= ws->cap)
		return MTLZ_OK;
	gw = realloc(ws->gw, n * sizeof(*gw));
	if (!gw)
		return MTLZ_ERR_NOMEM;
	ws->gw = gw;
	gf = realloc(ws->gf, n * sizeof(*gf));
	if (!gf)
		return MTLZ_ERR_NOMEM;
	ws->gf = gf;
	rank = realloc(ws->rank, n * sizeof(*rank));
	if (!rank)
		return MTLZ_ERR_NOMEM;
	ws->rank = rank;
	rank = realloc(ws->gi, n * sizeof(*rank));
	if (!rank)
		return MTLZ_ERR_NOMEM;
	ws->gi = rank;
	rank = realloc(ws->ok, n * sizeof(*rank));
	if (!rank)
		return MTLZ_ERR_NOMEM;
	ws->ok = rank;
	rank = realloc(ws->runs, (n + 1) * sizeof(*rank)); /* (n + 1) / 2 runs at most */
	if (!rank)
		return MTLZ_ERR_NOMEM;
	ws->runs = rank;
	ws->cap = n;
	return MTLZ_OK;
}

static int ws_logw(mtlz_prep_ws *ws, const mtlz_grid *g, int n_out)
{
	if (ws->logw && ws->n_logw == n_out && ws->logw_grid.wmin == g->wmin &&
	    ws->logw_grid.dw == g->dw)
		return MTLZ_OK;
	free(ws->logw);
	ws->logw = malloc((size_t)n_out * sizeof(double));
	if (!ws->logw)
		return MTLZ_ERR_NOMEM;
	for (int j = 0; j < n_out; j++)
		ws->logw[j] = log10(g->wmin + j * g->dw);
	ws->logw_grid = *g;
	ws->n_logw = n_out;
	return MTLZ_OK;
}

const char *mtlz_reject_str(int reject)
{
	switch (reject) {
	case MTLZ_REJECT_NONE: return "none";
	case MTLZ_REJECT_BAD_GRID: return "bad_grid";
	case MTLZ_REJECT_NO_DATA: return "no_data";
	case MTLZ_REJECT_COVERAGE: return "coverage";
	case MTLZ_REJECT_BAD_PIXELS: return "bad_pixels";
	case MTLZ_REJECT_NONPOSITIVE_MEAN: return "nonpositive_mean";
	}
	return "unknown";
}

char *mtlz_flags_str(uint32_t flags, char *buf, size_t size)
{
	static const struct { uint32_t bit; const char *name; } t[] = {
		{ MTLZ_FLAG_BLUE_SHORT, "BLUE_SHORT" },
		{ MTLZ_FLAG_RED_SHORT, "RED_SHORT" },
		{ MTLZ_FLAG_BAD_PIXELS, "BAD_PIXELS" },
		{ MTLZ_FLAG_NONFINITE, "NONFINITE" },
		{ MTLZ_FLAG_LARGE_GAP, "LARGE_GAP" },
		{ MTLZ_FLAG_ZWARNING, "ZWARNING" },
		{ MTLZ_FLAG_LOW_SN, "LOW_SN" },
		{ MTLZ_FLAG_REJECTED, "REJECTED" },
	};
	size_t n = 0;

	if (size)
		buf[0] = '\0';
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(t); i++) {
		if (!(flags & t[i].bit) || n >= size)
			continue;
		n += (size_t)snprintf(buf + n, size - n, "%s%s", n ? "|" : "", t[i].name);
	}
	return buf;
}

/* SDSS SPPIXMASK bit names (and_mask / or_mask of spec files). */
static const char *const sppixmask[32] = {
	[0] = "NOPLUG", [1] = "BADTRACE", [2] = "BADFLAT", [3] = "BADARC",
	[4] = "MANYBADCOLUMNS", [5] = "MANYREJECTED", [6] = "LARGESHIFT",
	[7] = "BADSKYFIBER", [8] = "NEARWHOPPER", [9] = "WHOPPER",
	[10] = "SMEARIMAGE", [11] = "SMEARHIGHSN", [12] = "SMEARMEDSN",
	[16] = "NEARBADPIXEL", [17] = "LOWFLAT", [18] = "FULLREJECT",
	[19] = "PARTIALREJECT", [20] = "SCATTEREDLIGHT", [21] = "CROSSTALK",
	[22] = "NOSKY", [23] = "BRIGHTSKY", [24] = "NODATA", [25] = "COMBINEREJ",
	[26] = "BADFLUXFACTOR", [27] = "BADSKYCHI", [28] = "REDMONSTER",
};

int mtlz_mask_bits_parse(const char *s, uint32_t *bits, char *errstr,
			 size_t errstr_size)
{
	char buf[512], *save = NULL, *tok, *end;
	unsigned long v;

	*bits = 0;
	v = strtoul(s, &end, 0);
	if (*s && *end == '\0' && v <= 0xffffffffUL) {
		*bits = (uint32_t)v;
		return MTLZ_OK;
	}
	snprintf(buf, sizeof(buf), "%s", s);
	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		int i;

		for (i = 0; i < 32; i++)
			if (sppixmask[i] && strcasecmp(tok, sppixmask[i]) == 0)
				break;
		if (i == 32)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"unknown and_mask bit '%s' (a number or SDSS "
					"SPPIXMASK names such as NODATA,FULLREJECT)", tok);
		*bits |= 1u << i;
	}
	return MTLZ_OK;
}

/* Wavelength of pixel i of a uniform (linear or log-linear) grid. */
static inline double wave_of(const mtlz_spectrum *s, long i)
{
	if (s->grid_kind == MTLZ_GRID_LINEAR)
		return s->start + (double)i * s->step;
	return exp(2.302585092994045684 * (s->start + (double)i * s->step));
}

/* Pixel coordinate of wavelength w (log10 w given for log grids). */
static inline double pixel_of(const mtlz_spectrum *s, double w, double log10w)
{
	return ((s->grid_kind == MTLZ_GRID_LINEAR ? w : log10w) - s->start) / s->step;
}

struct nodes {
	size_t n_good, n_in, n_bad;
	int nonfinite;
	double first_w, last_w, max_gap;
};

/*
 * Explicit grids: fills ws->gw/gf with the good nodes; counts input and bad
 * pixels inside [lo, hi] and finds the widest gap there. Fails if the
 * wavelengths are not finite and strictly increasing.
 */
static int collect_explicit(const mtlz_spectrum *s, const mtlz_prep_opts *o,
			    mtlz_prep_ws *ws, double lo, double hi, struct nodes *nd)
{
	const uint32_t *mask = o->and_mask_bits ? s->and_mask : NULL;
	double prev = -1.0;
	size_t g = 0;

	for (size_t i = 0; i < s->n; i++) {
		const double w = s->wave[i];
		const float f = s->flux[i];
		int ok = isfinite(f);

		if (!isfinite(w) || (i && !(w > s->wave[i - 1])))
			return MTLZ_ERR_REJECT;
		if (s->ivar)
			ok &= isfinite(s->ivar[i]) && s->ivar[i] > 0.0f;
		nd->nonfinite |= !isfinite(f) || (s->ivar && !isfinite(s->ivar[i]));
		if (mask)
			ok &= !(mask[i] & o->and_mask_bits);
		if (w >= lo && w <= hi) {
			nd->n_in++;
			nd->n_bad += !ok;
		}
		if (!ok)
			continue;
		if (prev >= 0.0 && w > lo && prev < hi)
			nd->max_gap = MTLZ_MAX(nd->max_gap, MTLZ_MIN(w, hi) - MTLZ_MAX(prev, lo));
		prev = w;
		ws->gw[g] = w;
		ws->gf[g] = f;
		g++;
	}
	nd->n_good = g;
	if (g) {
		nd->first_w = ws->gw[0];
		nd->last_w = ws->gw[g - 1];
	}
	return MTLZ_OK;
}

/* Pixel i usable: finite flux, finite positive ivar (if any), none of bits
 * in its mask (if any). *nf collects non-finite flux or ivar. */
static inline __attribute__((always_inline)) int
pixel_good(const float *flux, const float *ivar, const uint32_t *mask, uint32_t bits,
	   long i, int *nf)
{
	const int fin = isfinite(flux[i]) != 0;
	int ok = fin;

	*nf |= !fin;
	if (ivar) {
		const int vfin = isfinite(ivar[i]) != 0;

		*nf |= !vfin;
		ok &= vfin & (ivar[i] > 0.0f);
	}
	if (mask)
		ok &= (mask[i] & bits) == 0;
	return ok;
}

/* The compaction loop, specialised (after inlining) for which of ivar and
 * and_mask are present. Returns the number of good nodes. */
static inline __attribute__((always_inline)) long
compact(const float *flux, const float *ivar, const uint32_t *mask,
	uint32_t bits, long n, int32_t *gi, float *gf, int32_t *rank, int *nonfinite,
	const int with_ivar, const int with_mask)
{
	long g = 0;
	int nf = 0;

	for (long i = 0; i < n; i++) {
		const int ok = pixel_good(flux, with_ivar ? ivar : NULL, with_mask ? mask : NULL,
					  bits, i, &nf);

		gi[g] = (int32_t)i;
		gf[g] = flux[i];
		g += ok;
		rank[i] = (int32_t)(g - 1);
	}
	*nonfinite = nf;
	return g;
}

/* The input pixels inside the window [lo, hi] on a uniform grid: [*ilo, *ihi]
 * (empty when *ihi < *ilo). */
static void window_pixels(const mtlz_spectrum *s, double lo, double hi, long *ilo, long *ihi)
{
	*ilo = MTLZ_MAX((long)ceil(pixel_of(s, lo, log10(lo)) - 1e-9), 0);
	*ihi = MTLZ_MIN((long)floor(pixel_of(s, hi, log10(hi)) + 1e-9), (long)s->n - 1);
}

/*
 * Uniform grids: one branch-free pass stores the good nodes as pixel indices
 * (gi, gf) and rank[i] = index of the last good node at or before pixel i.
 * Wavelengths are computed only where needed: at the ends and across gaps.
 */
static void collect_uniform(const mtlz_spectrum *s, const mtlz_prep_opts *o,
			    mtlz_prep_ws *ws, double lo, double hi, struct nodes *nd)
{
	const float *flux = s->flux, *ivar = s->ivar;
	const uint32_t *mask = o->and_mask_bits ? s->and_mask : NULL;
	const uint32_t bits = o->and_mask_bits;
	const long n = (long)s->n;
	int32_t *gi = ws->gi, *rank = ws->rank;
	float *gf = ws->gf;
	long g = 0, ilo, ihi;
	int nf = 0;

	if (ivar && mask)
		g = compact(flux, ivar, mask, bits, n, gi, gf, rank, &nf, 1, 1);
	else if (ivar)
		g = compact(flux, ivar, NULL, 0, n, gi, gf, rank, &nf, 1, 0);
	else if (mask)
		g = compact(flux, NULL, mask, bits, n, gi, gf, rank, &nf, 0, 1);
	else
		g = compact(flux, NULL, NULL, 0, n, gi, gf, rank, &nf, 0, 0);
	nd->n_good = (size_t)g;
	nd->nonfinite = nf;
	/* input pixels inside the window, and how many of them are good */
	window_pixels(s, lo, hi, &ilo, &ihi);
	if (ihi >= ilo) {
		const long good = rank[ihi] - (ilo > 0 ? rank[ilo - 1] : -1);

		nd->n_in = (size_t)(ihi - ilo + 1);
		nd->n_bad = nd->n_in - (size_t)good;
	}
	if (!g)
		return;
	nd->first_w = wave_of(s, gi[0]);
	nd->last_w = wave_of(s, gi[g - 1]);
	for (long k = 0; k + 1 < g; k++) {
		double a, b;

		if (gi[k + 1] - gi[k] == 1 && k)
			continue; /* regular spacing: measured once, at k = 0 */
		a = MTLZ_MAX(wave_of(s, gi[k]), lo);
		b = MTLZ_MIN(wave_of(s, gi[k + 1]), hi);
		if (b - a > nd->max_gap)
			nd->max_gap = b - a;
	}
}

#ifdef PREP_HAVE_AVX2
/*
 * The AVX2 path for uniform grids. Instead of compacting the good pixels
 * (a serial loop), it keeps a per-pixel good flag, ws->ok, and the list of
 * interior runs of bad pixels, ws->runs. An output whose pixel coordinate x
 * falls between two adjacent good pixels (the common case) is interpolated
 * four at a time from (ok[i], ok[i + 1]) and (flux[i], flux[i + 1]) with
 * i = floor(x), fetched by loads and permutes (gathers where the input grid
 * is much finer than the output), in the same arithmetic as the scalar
 * path; the rest (ends held, gaps) go through interp_one(). The results
 * match the generic path to rounding (tests/test_preprocess.c checks both
 * against each other and against a brute-force reference).
 */
__attribute__((target("avx2,fma")))
static long good_flags_avx2(const float *flux, const float *ivar, const uint32_t *mask,
			    uint32_t bits, long n, int32_t *ok, int *nonfinite)
{
	const __m256i absm = _mm256_set1_epi32(0x7fffffff);
	const __m256i inf = _mm256_set1_epi32(0x7f800000);
	const __m256i zero = _mm256_setzero_si256(), vbits = _mm256_set1_epi32((int)bits);
	__m256i fin_all = _mm256_set1_epi32(-1), cnt = zero;
	long i = 0, g;
	int nf = 0;

	for (; i + 8 <= n; i += 8) {
		const __m256i f = _mm256_loadu_si256((const __m256i *)(flux + i));
		/* finite: |bits| below those of infinity (NaNs are above) */
		__m256i good = _mm256_cmpgt_epi32(inf, _mm256_and_si256(f, absm));

		fin_all = _mm256_and_si256(fin_all, good);
		if (ivar) {
			const __m256i v = _mm256_loadu_si256((const __m256i *)(ivar + i));
			const __m256i vfin = _mm256_cmpgt_epi32(inf, _mm256_and_si256(v, absm));

			fin_all = _mm256_and_si256(fin_all, vfin);
			/* a finite float is > 0 exactly when its bits are > 0 as int */
			good = _mm256_and_si256(good, _mm256_and_si256(vfin, _mm256_cmpgt_epi32(v, zero)));
		}
		if (mask) {
			const __m256i m = _mm256_loadu_si256((const __m256i *)(mask + i));

			good = _mm256_and_si256(good, _mm256_cmpeq_epi32(_mm256_and_si256(m, vbits), zero));
		}
		_mm256_storeu_si256((__m256i *)(ok + i), good);
		cnt = _mm256_sub_epi32(cnt, good);
	}
	nf = _mm256_movemask_epi8(fin_all) != -1;
	{
		int32_t c[8];

		_mm256_storeu_si256((__m256i *)c, cnt);
		g = (long)c[0] + c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7];
	}
	for (; i < n; i++) { /* the last n % 8 */
		const int good = pixel_good(flux, ivar, mask, bits, i, &nf);

		ok[i] = -good;
		g += good;
	}
	*nonfinite = nf;
	return g;
}

/* Good pixels in [lo, hi]. */
__attribute__((target("avx2,fma")))
static long count_good_avx2(const int32_t *ok, long lo, long hi)
{
	long g = 0;

	for (long i = lo; i <= hi; i++)
		g -= ok[i];
	return g;
}

/* Fills ws->runs with the (first, last) bad pixel of every run strictly
 * between the first good pixel F and the last, L; returns how many. Whole
 * blocks of 8 good pixels are skipped with one compare. */
__attribute__((target("avx2,fma")))
static long find_runs_avx2(const int32_t *ok, long F, long L, int32_t *runs)
{
	long r = 0, i = F + 1;

	while (i < L) {
		if (i + 8 <= L &&
		    _mm256_movemask_ps(_mm256_castsi256_ps(
			    _mm256_loadu_si256((const __m256i *)(ok + i)))) == 0xff) {
			i += 8;
			continue;
		}
		if (ok[i]) {
			i++;
			continue;
		}
		runs[2 * r] = (int32_t)i;
		while (!ok[i]) /* ends: ok[L] is good */
			i++;
		runs[2 * r + 1] = (int32_t)(i - 1);
		r++;
	}
	return r;
}

static void collect_uniform_avx2(const mtlz_spectrum *s, const mtlz_prep_opts *o,
				 mtlz_prep_ws *ws, double lo, double hi, struct nodes *nd,
				 long *F, long *L, long *n_runs)
{
	const long n = (long)s->n;
	const int32_t *ok = ws->ok;
	long g, ilo, ihi, f, l;
	int nf = 0;

	g = good_flags_avx2(s->flux, s->ivar, o->and_mask_bits ? s->and_mask : NULL,
			    o->and_mask_bits, n, ws->ok, &nf);
	nd->n_good = (size_t)g;
	nd->nonfinite = nf;
	window_pixels(s, lo, hi, &ilo, &ihi);
	if (ihi >= ilo) {
		nd->n_in = (size_t)(ihi - ilo + 1);
		nd->n_bad = nd->n_in - (size_t)count_good_avx2(ok, ilo, ihi);
	}
	*n_runs = 0;
	if (!g)
		return;
	for (f = 0; !ok[f]; f++)
		;
	for (l = n - 1; !ok[l]; l--)
		;
	*F = f;
	*L = l;
	nd->first_w = wave_of(s, f);
	nd->last_w = wave_of(s, l);
	*n_runs = g == l - f + 1 ? 0 : find_runs_avx2(ok, f, l, ws->runs);
	/* the widest gap between good nodes: as collect_uniform, the first
	 * pair (regular spacing, measured once) and every run of bad pixels */
	if (l > f && ok[f + 1]) { /* else a run starts at f + 1 */
		const double a = MTLZ_MAX(wave_of(s, f), lo), b = MTLZ_MIN(wave_of(s, f + 1), hi);

		nd->max_gap = MTLZ_MAX(nd->max_gap, b - a);
	}
	for (long r = 0; r < *n_runs; r++) {
		const double a = MTLZ_MAX(wave_of(s, ws->runs[2 * r] - 1), lo);
		const double b = MTLZ_MIN(wave_of(s, ws->runs[2 * r + 1] + 1), hi);

		if (b - a > nd->max_gap)
			nd->max_gap = b - a;
	}
}
#endif /* PREP_HAVE_AVX2 */

static int grid_ok(const mtlz_spectrum *s)
{
	if (s->n < 2 || !s->flux)
		return s->n >= 1 && s->flux;
	switch (s->grid_kind) {
	case MTLZ_GRID_LOGLAM:
		return isfinite(s->start) && isfinite(s->step) && s->step > 0 &&
		       s->start > -2 && s->start + (double)s->n * s->step < 8;
	case MTLZ_GRID_LINEAR:
		return isfinite(s->start) && isfinite(s->step) && s->step > 0 &&
		       isfinite(s->start + (double)s->n * s->step);
	case MTLZ_GRID_EXPLICIT:
		return s->wave != NULL;
	}
	return 0;
}

static int __attribute__((format(printf, 8, 9)))
reject(const mtlz_spectrum *s, mtlz_prep_info *info, float *out, size_t n_out,
       int why, char *errstr, size_t errstr_size, const char *fmt, ...)
{
	char detail[160];
	va_list ap;

	info->reject = why;
	info->flags |= MTLZ_FLAG_REJECTED;
	memset(out, 0, n_out * sizeof(*out));
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_REJECT, "%s%s%s%s: %s",
			s->spec_id[0] ? s->spec_id : "spectrum",
			s->source[0] ? " (" : "", s->source,
			s->source[0] ? ")" : "", detail);
}

/* Value at w between good nodes p and p + 1 (p = -1 / last: edge held). */
static inline double interp_at(const mtlz_prep_ws *ws, long p, size_t n_good,
			       double w)
{
	double t;

	if (p < 0)
		return ws->gf[0];
	if ((size_t)p + 1 >= n_good)
		return ws->gf[n_good - 1];
	t = (w - ws->gw[p]) / (ws->gw[p + 1] - ws->gw[p]);
	return ws->gf[p] + t * ((double)ws->gf[p + 1] - ws->gf[p]);
}

/* Explicit grids: merge-walk, p = last node with gw[p] <= w. */
static double interp_walk(const mtlz_prep_ws *ws, size_t n_good, double w0,
			  double dw, int n_out, float *out)
{
	double sum = 0.0;
	long p = -1;

	for (int j = 0; j < n_out; j++) {
		const double w = w0 + j * dw;
		double f;

		while ((size_t)(p + 1) < n_good && ws->gw[p + 1] <= w)
			p++;
		f = interp_at(ws, p, n_good, w);
		out[j] = (float)f;
		sum += f;
	}
	return sum;
}

/* Linear-in-wavelength weight of the right node for an output at distance
 * d (pixels, 0 <= d < 1) past the left of two adjacent pixels: d itself on a
 * linear grid; on a log grid expm1(d al) / expm1(al), al = step ln 10, with
 * a cubic for the numerator (d al < 2.3e-4) and inv_c = 1 / expm1(al). */
static inline double adjacent_weight(double d, int lin, double al, double inv_c)
{
	const double u = d * al;

	return lin ? d : u * (1.0 + u * (0.5 + u * (1.0 / 6.0))) * inv_c;
}

/*
 * Uniform grids: the pixel coordinate x of each output wavelength is
 * computed directly and rank[] gives the good node at or before it, so there
 * is no search. Between adjacent good pixels the linear-in-wavelength weight
 * needs no division: t = x - a on a linear grid, and on a log grid
 * t = expm1(u) / expm1(step ln 10) with u = (x - a) step ln 10 < 2.3e-4,
 * where a cubic gives expm1 to 1e-16. Across gaps the wavelengths are used.
 */
static double interp_uniform(const mtlz_spectrum *s, const mtlz_prep_ws *ws,
			     size_t n_good, double w0, double dw, int n_out,
			     float *out)
{
	const int lin = s->grid_kind == MTLZ_GRID_LINEAR;
	const double inv = 1.0 / s->step, last = (double)(s->n - 1);
	const double al = s->step * 2.302585092994045684, inv_c = 1.0 / expm1(al);
	const int32_t *gi = ws->gi, *rank = ws->rank;
	const float *gf = ws->gf;
	const long g = (long)n_good;
	double sum = 0.0;

	for (int j = 0; j < n_out; j++) {
		const double w = w0 + j * dw;
		const double x = ((lin ? w : ws->logw[j]) - s->start) * inv;
		const long p = x < 0.0 ? -1 : rank[(size_t)(x < last ? x : last)];
		double f, t;

		if (p < 0) {
			f = gf[0];
		} else if (p + 1 >= g) {
			f = gf[g - 1];
		} else {
			const long a = gi[p], b = gi[p + 1];

			if (b == a + 1) {
				t = adjacent_weight(x - (double)a, lin, al, inv_c);
			} else {
				const double wa = wave_of(s, a), wb = wave_of(s, b);

				t = (w - wa) / (wb - wa);
			}
			f = gf[p] + t * ((double)gf[p + 1] - gf[p]);
		}
		out[j] = (float)f;
		sum += f;
	}
	return sum;
}

#ifdef PREP_HAVE_AVX2
/* Output at pixel coordinate x (wavelength w), one at a time: between two
 * adjacent good pixels as interp_uniform; before the first good pixel F or
 * from the last, L, on, the end is held; otherwise x lies across a run of
 * bad pixels, found by bisection, and the weight is linear in wavelength. */
static double interp_one(const mtlz_spectrum *s, const mtlz_prep_ws *ws, long F, long L,
			 long n_runs, double al, double inv_c, double x, double w)
{
	const int32_t *runs = ws->runs;
	const float *fl = s->flux;
	long i, lo = 0, hi = n_runs - 1, a, b;
	double wa, wb;

	if (x < (double)F)
		return fl[F];
	i = (long)x;
	if (i >= L)
		return fl[L];
	if (ws->ok[i] && ws->ok[i + 1]) {
		const double t = adjacent_weight(x - (double)i, s->grid_kind == MTLZ_GRID_LINEAR,
						 al, inv_c);

		return fl[i] + t * ((double)fl[i + 1] - fl[i]);
	}
	/* the last run starting at or before i + 1: the one holding i, or,
	 * when i is good, the one starting at i + 1 */
	while (lo < hi) {
		const long mid = (lo + hi + 1) / 2;

		if (runs[2 * mid] <= i + 1)
			lo = mid;
		else
			hi = mid - 1;
	}
	if (n_runs == 0) /* not reached: [F, L] without a run is all good */
		return fl[i];
	a = runs[2 * lo] - 1;
	b = runs[2 * lo + 1] + 1;
	wa = wave_of(s, a);
	wb = wave_of(s, b);
	return fl[a] + (w - wa) / (wb - wa) * ((double)fl[b] - fl[a]);
}

__attribute__((target("avx2,fma")))
static double interp_uniform_avx2(const mtlz_spectrum *s, const mtlz_prep_ws *ws, long F,
				  long L, long n_runs, double w0, double dw, int n_out,
				  float *out)
{
	const int lin = s->grid_kind == MTLZ_GRID_LINEAR;
	const double inv = 1.0 / s->step;
	const double al = s->step * 2.302585092994045684, inv_c = 1.0 / expm1(al);
	const __m256d vinv = _mm256_set1_pd(inv), vstart = _mm256_set1_pd(s->start);
	const __m256d vw0 = _mm256_set1_pd(w0), vdw = _mm256_set1_pd(dw);
	const __m256d vF = _mm256_set1_pd((double)F), vL = _mm256_set1_pd((double)L);
	/* n >= 2: i <= n - 2, so the pair gathers read flux[0..n-1] and ok[0..n-1] */
	const __m256d vmax = _mm256_set1_pd((double)(s->n - 2)), vzero = _mm256_setzero_pd();
	const __m256d val = _mm256_set1_pd(al), vinvc = _mm256_set1_pd(inv_c);
	const __m256d one = _mm256_set1_pd(1.0), half = _mm256_set1_pd(0.5);
	const __m256d sixth = _mm256_set1_pd(1.0 / 6.0);
	const __m256d step4 = _mm256_set_pd(3.0, 2.0, 1.0, 0.0);
	const __m256i deint = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
	const long n = (long)s->n;
	const long long *okp = (const long long *)(const void *)ws->ok;
	const long long *flp = (const long long *)(const void *)s->flux;
	__m256d vsum = _mm256_setzero_pd();
	double sum = 0.0, part[4];
	int j = 0;

	for (; j + 4 <= n_out; j += 4) {
		const __m256d w = _mm256_add_pd(vw0, _mm256_mul_pd(
			_mm256_add_pd(_mm256_set1_pd((double)j), step4), vdw));
		const __m256d x = _mm256_mul_pd(
			_mm256_sub_pd(lin ? w : _mm256_loadu_pd(ws->logw + j), vstart), vinv);
		/* clamped so that the gathers stay inside the arrays; where x is
		 * in [n - 2, n - 1) the clamp leaves i = floor(x) as it is */
		const __m256d xc = _mm256_min_pd(_mm256_max_pd(x, vzero), vmax);
		const __m128i i = _mm256_cvttpd_epi32(xc);
		const int i0 = _mm_cvtsi128_si32(i);
		__m256d fast, d, t, fa, fb, f;
		__m256i okpair;
		int m;

		if (_mm_extract_epi32(i, 3) - i0 <= 6 && i0 + 8 <= n) {
			/* x is increasing: the four pairs lie in the 8 pixels from
			 * i0, so two loads and permutes do what gathers would */
			const __m128i li = _mm_sub_epi32(i, _mm_set1_epi32(i0));
			const __m256i la = _mm256_castsi128_si256(li);
			const __m256i lb = _mm256_castsi128_si256(_mm_add_epi32(li, _mm_set1_epi32(1)));
			const __m256 f8 = _mm256_loadu_ps(s->flux + i0);
			const __m256i o8 = _mm256_loadu_si256((const __m256i *)(ws->ok + i0));

			fa = _mm256_cvtps_pd(_mm256_castps256_ps128(_mm256_permutevar8x32_ps(f8, la)));
			fb = _mm256_cvtps_pd(_mm256_castps256_ps128(_mm256_permutevar8x32_ps(f8, lb)));
			okpair = _mm256_cvtepi32_epi64(_mm_and_si128(
				_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(o8, la)),
				_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(o8, lb))));
		} else {
			/* (ok[i], ok[i + 1]) and (flux[i], flux[i + 1]) as 64-bit gathers */
			__m256 pair = _mm256_castsi256_ps(_mm256_i32gather_epi64(flp, i, 4));

			pair = _mm256_permutevar8x32_ps(pair, deint);
			fa = _mm256_cvtps_pd(_mm256_castps256_ps128(pair));
			fb = _mm256_cvtps_pd(_mm256_extractf128_ps(pair, 1));
			okpair = _mm256_i32gather_epi64(okp, i, 4);
		}
		/* both good (-1): a regular pair, unless outside [F, L) */
		fast = _mm256_castsi256_pd(_mm256_cmpeq_epi64(okpair, _mm256_set1_epi64x(-1)));
		fast = _mm256_and_pd(fast, _mm256_cmp_pd(x, vF, _CMP_GE_OQ));
		fast = _mm256_and_pd(fast, _mm256_cmp_pd(x, vL, _CMP_LT_OQ));
		m = _mm256_movemask_pd(fast);
		d = _mm256_sub_pd(x, _mm256_cvtepi32_pd(i));
		if (lin) {
			t = d;
		} else {
			/* u (1 + u (1/2 + u / 6)) / expm1(al), as interp_uniform */
			const __m256d u = _mm256_mul_pd(d, val);

			t = _mm256_add_pd(half, _mm256_mul_pd(u, sixth));
			t = _mm256_add_pd(one, _mm256_mul_pd(u, t));
			t = _mm256_mul_pd(_mm256_mul_pd(u, t), vinvc);
		}
		f = _mm256_add_pd(fa, _mm256_mul_pd(t, _mm256_sub_pd(fb, fa)));
		if (m != 0xf) {
			double fv[4], xv[4], wv[4];

			_mm256_storeu_pd(fv, f);
			_mm256_storeu_pd(xv, x);
			_mm256_storeu_pd(wv, w);
			for (int k = 0; k < 4; k++)
				if (!(m >> k & 1))
					fv[k] = interp_one(s, ws, F, L, n_runs, al, inv_c,
							   xv[k], wv[k]);
			f = _mm256_loadu_pd(fv);
		}
		_mm_storeu_ps(out + j, _mm256_cvtpd_ps(f));
		vsum = _mm256_add_pd(vsum, f);
	}
	_mm256_storeu_pd(part, vsum);
	sum = (part[0] + part[1]) + (part[2] + part[3]);
	for (; j < n_out; j++) {
		const double w = w0 + j * dw;
		const double f = interp_one(s, ws, F, L, n_runs, al, inv_c,
					    ((lin ? w : ws->logw[j]) - s->start) * inv, w);

		out[j] = (float)f;
		sum += f;
	}
	return sum;
}
#endif /* PREP_HAVE_AVX2 */

int mtlz_preprocess(const mtlz_spectrum *s, const mtlz_prep_opts *o,
		    mtlz_prep_ws *ws, float *out, mtlz_prep_info *info,
		    char *errstr, size_t errstr_size)
{
	const double w0 = o->grid.wmin, dw = o->grid.dw;
	const int n_out = mtlz_grid_length(&o->grid);
	const double w1 = w0 + (n_out - 1) * dw;
	struct nodes nd = { 0 };
	double sum = 0.0, lo, hi;
	long F = 0, Lg = 0, n_runs = 0; /* AVX2 path: first, last good pixel; runs */
#ifdef PREP_HAVE_AVX2
	const int vec = ws->isa == MTLZ_ISA_AVX2 && s->grid_kind != MTLZ_GRID_EXPLICIT &&
			s->n >= 2;
#else
	const int vec = 0;
#endif

	memset(info, 0, sizeof(*info));
	if (s->zwarning > 0)
		info->flags |= MTLZ_FLAG_ZWARNING;
	if (o->min_sn > 0 && isfinite(s->sn) && s->sn < o->min_sn)
		info->flags |= MTLZ_FLAG_LOW_SN;
	if (!grid_ok(s))
		return reject(s, info, out, (size_t)n_out, MTLZ_REJECT_BAD_GRID,
			      errstr, errstr_size,
			      "wavelength grid invalid (%zu pixels, step %g)",
			      s->n, s->step);
	if (ws_reserve(ws, s->n) != MTLZ_OK)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
#ifdef PREP_HAVE_AVX2
	if (vec)
		collect_uniform_avx2(s, o, ws, w0, w1, &nd, &F, &Lg, &n_runs);
	else
#endif
	if (s->grid_kind != MTLZ_GRID_EXPLICIT)
		collect_uniform(s, o, ws, w0, w1, &nd);
	else if (collect_explicit(s, o, ws, w0, w1, &nd) != MTLZ_OK)
		return reject(s, info, out, (size_t)n_out, MTLZ_REJECT_BAD_GRID,
			      errstr, errstr_size,
			      "explicit wavelengths not finite and strictly "
			      "increasing");
	if (nd.nonfinite)
		info->flags |= MTLZ_FLAG_NONFINITE;
	info->bad_frac = nd.n_in ? (double)nd.n_bad / (double)nd.n_in : 1.0;
	if (nd.n_good == 0)
		return reject(s, info, out, (size_t)n_out, MTLZ_REJECT_NO_DATA,
			      errstr, errstr_size,
			      "no good pixel (%zu pixels, all masked or "
			      "non-finite)", s->n);

	lo = MTLZ_MAX(nd.first_w, w0);
	hi = MTLZ_MIN(nd.last_w, w1);
	info->coverage = hi > lo ? (hi - lo) / (w1 - w0) : 0.0;
	if (nd.first_w > w0 + dw)
		info->flags |= MTLZ_FLAG_BLUE_SHORT;
	if (nd.last_w < w1 - dw)
		info->flags |= MTLZ_FLAG_RED_SHORT;
	if (info->coverage < o->min_coverage)
		return reject(s, info, out, (size_t)n_out, MTLZ_REJECT_COVERAGE,
			      errstr, errstr_size,
			      "good data cover %.1f%% of the model grid "
			      "(minimum %.0f%%)", 100.0 * info->coverage,
			      100.0 * o->min_coverage);
	if (info->bad_frac > o->max_bad_frac)
		return reject(s, info, out, (size_t)n_out, MTLZ_REJECT_BAD_PIXELS,
			      errstr, errstr_size,
			      "%.1f%% of the pixels in the window are bad "
			      "(maximum %.0f%%)", 100.0 * info->bad_frac,
			      100.0 * o->max_bad_frac);
	if (info->bad_frac > o->warn_bad_frac)
		info->flags |= MTLZ_FLAG_BAD_PIXELS;

	info->max_gap = nd.max_gap;
	if (nd.max_gap > o->max_gap)
		info->flags |= MTLZ_FLAG_LARGE_GAP;
	if (s->grid_kind == MTLZ_GRID_EXPLICIT)
		sum = interp_walk(ws, nd.n_good, w0, dw, n_out, out);
	else if (s->grid_kind == MTLZ_GRID_LINEAR ||
		 ws_logw(ws, &o->grid, n_out) == MTLZ_OK)
#ifdef PREP_HAVE_AVX2
		sum = vec ? interp_uniform_avx2(s, ws, F, Lg, n_runs, w0, dw, n_out, out) :
#endif
			    interp_uniform(s, ws, nd.n_good, w0, dw, n_out, out);
	else
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	info->mean_flux = sum / n_out;
	if (!(info->mean_flux > 0.0) || !isfinite(info->mean_flux) ||
	    !isfinite((float)(1.0 / info->mean_flux)))
		return reject(s, info, out, (size_t)n_out,
			      MTLZ_REJECT_NONPOSITIVE_MEAN, errstr, errstr_size,
			      "mean flux on the model grid is %g, cannot "
			      "normalise", info->mean_flux);
	{
		const float inv = (float)(1.0 / info->mean_flux);

		for (int j = 0; j < n_out; j++)
			out[j] *= inv;
	}
	return MTLZ_OK;
}
