/*
 * bpt.h - emission-line diagnostics and strong-line metallicities used to
 * label spectra (docs/labels.md has the references):
 *
 *   Kauffmann et al. (2003, MNRAS 346, 1055), eq. 1:
 *     log([O III]/Hb) = 0.61 / (log([N II]/Ha) - 0.05) + 1.30
 *   Kewley et al. (2001, ApJ 556, 121), eq. 5:
 *     log([O III]/Hb) = 0.61 / (log([N II]/Ha) - 0.47) + 1.19
 *   Pettini & Pagel (2004, MNRAS 348, L59):
 *     O3N2: 12 + log(O/H) = 8.73 - 0.32 O3N2, O3N2 = log([O III]/Hb) - log([N II]/Ha),
 *           valid for O3N2 < 1.9
 *     N2:   12 + log(O/H) = 8.90 + 0.57 N2,   N2 = log([N II]/Ha), valid -2.5 < N2 < -0.3
 *
 * and the paper's Table 1 mapping of the two catalogues' classes.
 */
#ifndef MTLZ_BPT_H
#define MTLZ_BPT_H

#include "labels.h"

/* The demarcation curves: log([O III]/Hb) on the line at x = log([N II]/Ha);
 * +inf right of the asymptote (x >= 0.05 resp. 0.47). */
double mtlz_bpt_kauffmann03(double x);
double mtlz_bpt_kewley01(double x);
/* Star-forming below Kauffmann, composite between, AGN above Kewley (or
 * right of the asymptotes). */
int mtlz_bpt_class(double log_nii_ha, double log_oiii_hb);

/* 12 + log(O/H), or NaN outside the calibration's range. */
double mtlz_oh_o3n2_pp04(double log_oiii_hb, double log_nii_ha);
double mtlz_oh_n2_pp04(double log_nii_ha);

/* Paper Table 1: MPA-JHU BPTCLASS -1 passive, 1/2 star-forming, 3
 * composite, 4/5 AGN; anything else MTLZ_CLASS_NONE. */
int mtlz_class_from_bptclass(int bptclass);
/* Paper Table 1: Portsmouth emissionLinesPort BPT "BLANK" passive, "Star
 * Forming", "Composite", "LINER"/"Seyfert"/"LINER/Seyfert" AGN (case and
 * surrounding blanks ignored); anything else MTLZ_CLASS_NONE. */
int mtlz_class_from_portsmouth(const char *bpt);

#endif
