/*
 * spectrum.h - one observed-frame reduced spectrum as a survey pipeline
 * delivers it, on its native wavelength grid, before preprocessing.
 *
 * The same struct is filled from SDSS/BOSS spec files and DESI coadds
 * (fits_io.h), from Avro messages (the daemon) and from archives, so every
 * later stage sees one representation. Wavelengths are vacuum Angstrom.
 */
#ifndef MTLZ_SPECTRUM_H
#define MTLZ_SPECTRUM_H

#include <stddef.h>
#include <stdint.h>

enum mtlz_grid_kind {
	MTLZ_GRID_LOGLAM = 0,   /* lambda_i = 10^(start + i * step) (SDSS loglam) */
	MTLZ_GRID_LINEAR = 1,   /* lambda_i = start + i * step (DESI) */
	MTLZ_GRID_EXPLICIT = 2, /* lambda_i = wave[i], strictly increasing */
};

typedef struct mtlz_spectrum {
	char spec_id[64];       /* SDSS: SPECOBJID (or plate-mjd-fiber); DESI: TARGETID */
	char survey[16];        /* "sdss", "boss", "desi", ... */
	char source[256];       /* where it came from, for messages: "file.fits[3]" */
	double z;               /* redshift; NaN when unknown */
	double sn;              /* median S/N per pixel (SN_MEDIAN_ALL or equivalent); NaN unknown */
	int zwarning;           /* ZWARNING / ZWARN; -1 unknown */

	int grid_kind;          /* enum mtlz_grid_kind */
	double start, step;     /* for LOGLAM (log10 A) and LINEAR (A) */
	size_t n;               /* pixels */
	double *wave;           /* EXPLICIT only, n values; else NULL */
	float *flux;            /* n values (any unit; normalised away) */
	float *ivar;            /* n values or NULL; 0 = bad pixel */
	uint32_t *and_mask;     /* n values or NULL */
} mtlz_spectrum;

/* Sets every field to "unknown/empty" (z = sn = NaN, zwarning = -1). */
void mtlz_spectrum_init(mtlz_spectrum *s);
/* Allocates flux (and ivar / and_mask / wave when asked) for n pixels. */
int mtlz_spectrum_alloc(mtlz_spectrum *s, size_t n, int with_ivar,
			int with_mask, int with_wave);
/* Frees the arrays and re-initialises; accepts NULL. */
void mtlz_spectrum_clear(mtlz_spectrum *s);
/* Wavelength of pixel i in A, whatever the grid kind. */
double mtlz_spectrum_wave(const mtlz_spectrum *s, size_t i);

#endif
