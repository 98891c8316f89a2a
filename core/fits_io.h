/*
 * fits_io.h - reads reduced survey spectrum files with cfitsio into
 * mtlz_spectrum records (spectrum.h).
 *
 * Supported, detected from the HDU names:
 *   - SDSS spec files, full and lite (HDU 1 COADD: flux, loglam, ivar,
 *     and_mask; HDU 2 SPECOBJ), and BOSS spec files whose HDU 2 is SPALL;
 *     one spectrum per file. Carries SPECOBJID, Z, ZWARNING, SN_MEDIAN_ALL.
 *   - DESI coadd files (B/R/Z_WAVELENGTH, _FLUX, _IVAR, _MASK, FIBERMAP):
 *     one spectrum per target, the three arms merged on their common
 *     0.8 A grid with inverse-variance weights where they overlap. Redshift
 *     and ZWARN come from the redrock-*.fits file beside the coadd when
 *     there is one (same tile/petal suffix).
 */
#ifndef MTLZ_FITS_IO_H
#define MTLZ_FITS_IO_H

#include "spectrum.h"

#include <stddef.h>

typedef struct mtlz_spectra {
	mtlz_spectrum *v;
	size_t n, cap;
} mtlz_spectra;

/* Appends every spectrum of `path` to `out`. On error nothing is appended
 * and errstr names the file, the HDU/column and the problem. */
int mtlz_fits_read(const char *path, mtlz_spectra *out, char *errstr,
		   size_t errstr_size);

/* Appends an (empty, initialised) spectrum and returns it, or NULL. */
mtlz_spectrum *mtlz_spectra_push(mtlz_spectra *s);
void mtlz_spectra_free(mtlz_spectra *s);

#endif
