/*
 * dataset.h - a labelled training set in memory: archived spectra
 * (archive.h) preprocessed onto the model grid (preprocess.h), with their
 * labels, as the trainer consumes them. 5161 floats per spectrum: 100,000
 * spectra take 2 GB.
 */
#ifndef MTLZ_DATASET_H
#define MTLZ_DATASET_H

#include "avro_io.h"
#include "preprocess.h"

#include <stddef.h>
#include <stdint.h>

typedef struct mtlz_dataset {
	int L;                    /* model-grid length */
	size_t n, cap;
	float *x;                 /* [n][L] */
	int *cls;                 /* [n]: 0..3 or -1 */
	float *oh;                /* [n]: NaN unless star-forming with a label */
	float *z, *sn_r, *log_mass;
	uint32_t *flags;          /* preprocessing quality flags */
	char (*id)[64];
	/* what loading saw */
	size_t n_read, n_rejected, n_no_label;
} mtlz_dataset;

/* Reads every record of the archives (files or directories), preprocesses
 * it with `prep` (whose grid sets L) and appends it. Spectra that
 * preprocessing rejects are counted in n_rejected and skipped; those
 * without a class label are kept (cls -1: they count for nothing but
 * are there for the metal-only task if they carry a metallicity). */
int mtlz_dataset_load(mtlz_dataset *d, mtlz_avro *a, char *const *paths, int n_paths,
		      const mtlz_prep_opts *prep, char *errstr, size_t errstr_size);
void mtlz_dataset_free(mtlz_dataset *d);
/* Per-class counts (0..3) and of metallicity labels, over idx[n] (all if NULL). */
void mtlz_dataset_counts(const mtlz_dataset *d, const size_t *idx, size_t n, long counts[4],
			 long *n_oh);

#endif
