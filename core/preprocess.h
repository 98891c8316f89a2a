/*
 * preprocess.h - puts a spectrum on the model grid (paper Section 2.2):
 * linear interpolation of the observed-frame flux onto wmin..wmax at dw
 * (3840-9000 A at 1 A: 5161 pixels), then division by the mean flux.
 *
 * Bad pixels are not used as interpolation nodes: by default those with
 * ivar <= 0 (the SDSS pipeline zeroes ivar where a pixel was rejected in
 * every exposure) or a non-finite flux/ivar; optionally also those with
 * chosen and_mask bits. Masking on any nonzero and_mask bit is deliberately
 * not the default: bits such as BRIGHTSKY flag usable data.
 *
 * Every spectrum gets quality flags; an unusable one is rejected with a
 * reason and a message, never with a crash or a NaN in the output. The
 * output of an accepted spectrum is always finite with mean exactly 1 (to
 * float rounding).
 *
 * @locality any thread; a mtlz_prep_ws is scratch memory owned by one thread.
 */
#ifndef MTLZ_PREPROCESS_H
#define MTLZ_PREPROCESS_H

#include "model.h"
#include "spectrum.h"

#include <stddef.h>
#include <stdint.h>

/* Quality flags (bit set): informational unless MTLZ_FLAG_REJECTED. */
enum mtlz_flag {
	MTLZ_FLAG_BLUE_SHORT = 1u << 0,  /* good data start redward of wmin: edge value held */
	MTLZ_FLAG_RED_SHORT = 1u << 1,   /* good data end blueward of wmax: edge value held */
	MTLZ_FLAG_BAD_PIXELS = 1u << 2,  /* bad-pixel fraction in the window above warn_bad_frac */
	MTLZ_FLAG_NONFINITE = 1u << 3,   /* NaN/Inf in flux or ivar (those pixels treated as bad) */
	MTLZ_FLAG_LARGE_GAP = 1u << 4,   /* a gap between good pixels wider than max_gap A */
	MTLZ_FLAG_ZWARNING = 1u << 5,    /* the survey's redshift warning is nonzero */
	MTLZ_FLAG_LOW_SN = 1u << 6,      /* S/N below min_sn (the paper selects S/N_r >= 5) */
	MTLZ_FLAG_REJECTED = 1u << 15,   /* not classified; see the reject reason */
};

enum mtlz_reject {
	MTLZ_REJECT_NONE = 0,
	MTLZ_REJECT_BAD_GRID,        /* wavelengths not finite / not increasing, step <= 0 */
	MTLZ_REJECT_NO_DATA,         /* no pixels, or no good pixel at all */
	MTLZ_REJECT_COVERAGE,        /* good data cover less than min_coverage of the window */
	MTLZ_REJECT_BAD_PIXELS,      /* more than max_bad_frac of the window is bad */
	MTLZ_REJECT_NONPOSITIVE_MEAN,/* mean flux <= 0 or not finite: cannot normalise */
};

typedef struct mtlz_prep_opts {
	mtlz_grid grid;          /* output grid (3840, 9000, 1) */
	uint32_t and_mask_bits;  /* and_mask bits that make a pixel bad; 0 = none */
	double min_coverage;     /* reject below this covered fraction of the window (0.9) */
	double max_bad_frac;     /* reject above this bad fraction (0.5) */
	double warn_bad_frac;    /* flag above this bad fraction (0.1) */
	double max_gap;          /* flag gaps wider than this, A (50) */
	double min_sn;           /* flag LOW_SN below this S/N (5); 0 = never */
} mtlz_prep_opts;

typedef struct mtlz_prep_info {
	uint32_t flags;          /* enum mtlz_flag bits */
	int reject;              /* enum mtlz_reject */
	double coverage;         /* covered fraction of the window, 0..1 */
	double bad_frac;         /* bad input pixels / input pixels inside the window */
	double max_gap;          /* widest gap between good pixels inside the window, A */
	double mean_flux;        /* mean of the interpolated flux before normalisation */
} mtlz_prep_info;

typedef struct mtlz_prep_ws mtlz_prep_ws;

void mtlz_prep_opts_default(mtlz_prep_opts *o);
mtlz_prep_ws *mtlz_prep_ws_new(void);
void mtlz_prep_ws_free(mtlz_prep_ws *ws);
/* Which implementation ws runs on linear and log-linear grids: MTLZ_ISA_AVX2
 * (vectorised; x86-64 builds on CPUs with AVX2 and FMA) or MTLZ_ISA_GENERIC
 * (portable C), as in kernels_cpu.h. A new ws takes mtlz_isa_detect(); tests
 * and `mtlz bench` set it to compare the two. Returns the one now in effect
 * (GENERIC where AVX2 was asked for but cannot run). */
int mtlz_prep_ws_set_isa(mtlz_prep_ws *ws, int isa);

/* Preprocesses `s` into out[mtlz_grid_length(&o->grid)]. Returns MTLZ_OK, or
 * MTLZ_ERR_REJECT with info->reject set and errstr naming the spectrum and
 * the problem (out is then zero-filled), or MTLZ_ERR_NOMEM. */
int mtlz_preprocess(const mtlz_spectrum *s, const mtlz_prep_opts *o,
		    mtlz_prep_ws *ws, float *out, mtlz_prep_info *info,
		    char *errstr, size_t errstr_size);

const char *mtlz_reject_str(int reject);
/* "BLUE_SHORT|BAD_PIXELS" or "" into buf; returns buf. */
char *mtlz_flags_str(uint32_t flags, char *buf, size_t size);

/* Parses an and_mask bit list: a number ("0x1800000") or comma-separated
 * SDSS SPPIXMASK names ("NODATA,FULLREJECT"). */
int mtlz_mask_bits_parse(const char *s, uint32_t *bits, char *errstr,
			 size_t errstr_size);

#endif
