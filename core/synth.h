/*
 * synth.h - physically grounded synthetic SDSS-like galaxy spectra with
 * their training labels, for training at scale, load tests and demos
 * (`mtlz synth`; the model and its references are in docs/synth.md).
 *
 * A spectrum is built as a survey would observe a galaxy: a non-negative
 * mixture of E-MILES single-stellar-population spectra (Vazdekis et al.
 * 2016) broadened by the stellar velocity dispersion and the instrument,
 * attenuated by dust (Calzetti et al. 2000 for the stars, Cardelli et al.
 * 1989 for the gas), plus emission lines whose ratios are drawn inside the
 * BPT region of the drawn class (Kauffmann et al. 2003, Kewley et al. 2001,
 * Kewley et al. 2006) and, for star-forming galaxies, tied to the drawn
 * 12 + log(O/H) by the inverted O3N2 calibration of Pettini & Pagel (2004);
 * redshifted, sampled on the SDSS log-linear grid (step 1e-4 in log10 A,
 * about 3800-9200 A), with sky- and source-dependent noise scaled to a drawn
 * S/N_r, inverse variance and a few masked pixels.
 *
 * Spectrum `index` of seed S depends only on (S, index): its random stream
 * is seeded from the pair, so an archive does not depend on the number of
 * threads or on how the work is split. Everything the generator needs is
 * loaded and precomputed by mtlz_synth_new (the SSPs on a common log rest
 * grid, pre-broadened per velocity-dispersion bin); making one spectrum is
 * a mixture sum, dust, a shift, the lines and the noise, and allocates
 * nothing.
 *
 * @locality mtlz_synth_new/free: one thread. A built mtlz_synth is read-only
 * and may be shared by any number of threads, each with its own
 * mtlz_synth_ws.
 */
#ifndef MTLZ_SYNTH_H
#define MTLZ_SYNTH_H

#include "labels.h"
#include "spectrum.h"

#include <stddef.h>
#include <stdint.h>

#define MTLZ_SYNTH_VERSION "mtlz-synth 1"
#define MTLZ_SYNTH_N_SSP 20

/* The emission lines the generator puts in (vacuum rest wavelengths in
 * mtlz_synth_line_wave). */
enum mtlz_synth_line {
	MTLZ_LINE_OII_3727 = 0,  /* [O II] 3727.09 (the doublet's blue line) */
	MTLZ_LINE_OII_3730,      /* [O II] 3729.88 */
	MTLZ_LINE_HD,            /* H-delta 4102.89 */
	MTLZ_LINE_HG,            /* H-gamma 4341.68 */
	MTLZ_LINE_HB,            /* H-beta 4862.68 */
	MTLZ_LINE_OIII_4959,     /* [O III] 4960.30 = 5007 / 2.98 */
	MTLZ_LINE_OIII_5007,     /* [O III] 5008.24 */
	MTLZ_LINE_OI_6300,       /* [O I] 6302.05 */
	MTLZ_LINE_NII_6548,      /* [N II] 6549.86 = 6584 / 3.05 */
	MTLZ_LINE_HA,            /* H-alpha 6564.61 */
	MTLZ_LINE_NII_6584,      /* [N II] 6585.27 */
	MTLZ_LINE_SII_6717,      /* [S II] 6718.29 */
	MTLZ_LINE_SII_6731,      /* [S II] 6732.68 */
	MTLZ_SYNTH_N_LINES,
};

/* SDSS SPPIXMASK bits the generator sets in and_mask. */
#define MTLZ_SYNTH_MASK_FULLREJECT (1u << 18)  /* masked: ivar = 0, flux = 0 */
#define MTLZ_SYNTH_MASK_BRIGHTSKY (1u << 23)   /* on a bright sky line; usable */

enum mtlz_synth_agn {
	MTLZ_SYNTH_AGN_NONE = 0,
	MTLZ_SYNTH_AGN_SEYFERT = 1,
	MTLZ_SYNTH_AGN_LINER = 2,
};

typedef struct mtlz_synth_opts {
	uint64_t seed;
	double class_mix[MTLZ_N_CLASSES];  /* relative frequency, enum mtlz_class order */
	double sn_min, sn_max;             /* S/N_r per pixel, drawn log-uniform */
	double z_min, z_max;               /* redshift range, 0 <= z_min <= z_max <= 1 */
} mtlz_synth_opts;

/* What one spectrum was made of beyond its labels (tests and demos). Line
 * fluxes are observed (after dust), in the spectrum's flux unit times A
 * (1e-17 erg/s/cm2); 0 for a line that was not put in. */
typedef struct mtlz_synth_truth {
	int agn_branch;                    /* enum mtlz_synth_agn */
	double line_flux[MTLZ_SYNTH_N_LINES];
	double log_nii_ha, log_oiii_hb;    /* intrinsic (dust-free) BPT ratios; NaN: no lines */
	double ew_ha;                      /* rest-frame EW of H-alpha, A, emission > 0 */
	double av_gas, av_star;            /* A_V of the gas (Cardelli) and stars (Calzetti) */
	double sigma_star, sigma_gas;      /* km/s, before the instrument */
	const float *model;                /* the noiseless flux, n values (valid as *s) */
	const float *continuum;            /* model without the emission lines: the
					    * dust-attenuated stellar continuum */
} mtlz_synth_truth;

typedef struct mtlz_synth mtlz_synth;
typedef struct mtlz_synth_ws mtlz_synth_ws;

/* seed 0, equal class mix, S/N_r 5-30, z 0.002-0.3 (the paper's cuts). */
void mtlz_synth_opts_default(mtlz_synth_opts *o);

/* MTLZ_OK, or MTLZ_ERR_INVALID with errstr naming the bad option. */
int mtlz_synth_opts_check(const mtlz_synth_opts *o, char *errstr, size_t errstr_size);

/* Checks o, loads the 20 E-MILES SSP spectra and SSP_Wavelength_Vacuum.fits
 * from ssp_dir and precomputes everything (about 0.3 s; uses up to
 * n_threads OpenMP threads, 0 = OpenMP's default). NULL with errstr naming
 * the option or the file and the problem. */
mtlz_synth *mtlz_synth_new(const char *ssp_dir, const mtlz_synth_opts *o, int n_threads,
			   char *errstr, size_t errstr_size);
/* Accepts NULL. */
void mtlz_synth_free(mtlz_synth *g);

/* Scratch and output buffers for one thread. NULL when out of memory. */
mtlz_synth_ws *mtlz_synth_ws_new(const mtlz_synth *g);
void mtlz_synth_ws_free(mtlz_synth_ws *ws);

/* Makes spectrum `index` into ws and points *s, *labels (and *truth when
 * truth is non-NULL) at it; they stay valid until the next call with ws.
 * Deterministic in (o->seed, index). Cannot fail.
 * @locality any thread, with its own ws; g is only read. */
void mtlz_synth_make(const mtlz_synth *g, mtlz_synth_ws *ws, uint64_t index,
		     const mtlz_spectrum **s, const mtlz_labels **labels,
		     const mtlz_synth_truth **truth);

/* Vacuum rest wavelength of a line in A (enum mtlz_synth_line). */
double mtlz_synth_line_wave(int line);

/* The label_source.method text written with every spectrum. */
const char *mtlz_synth_method(void);

#endif
