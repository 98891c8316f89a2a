/*
 * sdss_labels.h - labels for SDSS spectra as the paper's Section 2.1 builds
 * them (docs/labels.md):
 *   - the selection quantities of a spec file (S/N_r, identifiers,
 *     SUBCLASS) and its pipeline emission-line fits (HDU SPZLINE);
 *   - the two value-added catalogues as FITS tables: MPA-JHU galSpecExtra
 *     (BPTCLASS, OH_P16/P50/P84, LGM_TOT_P50, LGM_FIB_P50) and Portsmouth
 *     emissionLinesPort (BPT), matched by SPECOBJID or PLATE/MJD/FIBERID;
 *   - labels from the line fits when no catalogue is at hand.
 */
#ifndef MTLZ_SDSS_LABELS_H
#define MTLZ_SDSS_LABELS_H

#include "labels.h"

#include <stddef.h>
#include <stdint.h>

enum { MTLZ_SPZ_HB, MTLZ_SPZ_OIII, MTLZ_SPZ_HA, MTLZ_SPZ_NII, MTLZ_SPZ_N_LINES };

typedef struct mtlz_sdss_info {
	uint64_t specobjid;         /* 0 when the file has none */
	int plate, mjd, fiber;      /* -1 when absent */
	double sn_r;                /* SN_MEDIAN[r] (element 3 of ugriz); NaN absent */
	char subclass[32];
	int have_lines;             /* SPZLINE read */
	/* Hb 4861, [O III] 5007, Ha 6563, [N II] 6584: LINEAREA and
	 * LINEAREA_ERR (err <= 0: not measured) */
	double flux[MTLZ_SPZ_N_LINES], err[MTLZ_SPZ_N_LINES];
} mtlz_sdss_info;

/* Reads the SPECOBJ (SDSS) or SPALL (BOSS) row and SPZLINE of a spec file.
 * A file without SPZLINE is not an error (have_lines = 0). */
int mtlz_sdss_info_read(const char *path, mtlz_sdss_info *info, char *errstr,
			size_t errstr_size);

/* Labels from the line fits (S/N >= 3 = detected):
 *   all four lines detected: BPT class (Kauffmann 2003 / Kewley 2001);
 *   else Ha and [N II] detected: Brinchmann et al. (2004) low-S/N classes,
 *     star-forming if [N II]/Ha < 0.6, else AGN;
 *   else SUBCLASS contains BROADLINE: AGN (broad lines are not on the BPT);
 *   else none of the four detected: passive;
 *   else no class (*why says so).
 * Star-forming galaxies get 12 + log(O/H) from O3N2 (PP04) when all four
 * lines are detected and O3N2 < 1.9, else from N2 when in its range, else
 * none (*why). Sets cls, oh (oh_err stays null: the line fits carry no
 * calibration uncertainty), source_method and params. Returns cls. */
int mtlz_labels_from_lines(const mtlz_sdss_info *in, mtlz_labels *lb, const char **why);

/* A value-added catalogue table. */
enum { MTLZ_CAT_MPAJHU, MTLZ_CAT_PORTSMOUTH };

typedef struct mtlz_catalog_row {
	int bptclass;               /* MPA-JHU BPTCLASS */
	float oh_p16, oh_p50, oh_p84;
	float lgm_tot_p50, lgm_fib_p50;
	char bpt[24];               /* Portsmouth BPT */
} mtlz_catalog_row;

typedef struct mtlz_catalog mtlz_catalog;

/* Loads the first binary table of path that has the kind's class column
 * (BPTCLASS, or BPT) and SPECOBJID or PLATEID/PLATE + MJD + FIBERID. */
mtlz_catalog *mtlz_catalog_load(const char *path, int kind, char *errstr,
				size_t errstr_size);
void mtlz_catalog_free(mtlz_catalog *c);
size_t mtlz_catalog_rows(const mtlz_catalog *c);
/* The row of a spectrum (by SPECOBJID when both have one; else, or when
 * that finds nothing, by plate, MJD and fiber: SPECOBJIDs differ between
 * DR7 and DR8+), or NULL. */
const mtlz_catalog_row *mtlz_catalog_find(const mtlz_catalog *c, uint64_t specobjid,
					  int plate, int mjd, int fiber);

#endif
