/*
 * labels.h - the training labels of one archived spectrum, as in
 * schemas/labelled_spectrum.avsc (mtlz.LabelledSpectrum minus its spectrum).
 * Written by `mtlz archive`, `mtlz import` and `mtlz synth`; read by the
 * trainer. Nullable numbers are NaN when null; text that does not fit is
 * truncated, map entries beyond MTLZ_LABEL_KV_MAX are dropped (counted in
 * n_dropped) when reading foreign archives.
 */
#ifndef MTLZ_LABELS_H
#define MTLZ_LABELS_H

#include <stddef.h>

#define MTLZ_LABEL_KV_MAX 24

enum mtlz_class {
	MTLZ_CLASS_NONE = -1,
	MTLZ_CLASS_PASSIVE = 0,
	MTLZ_CLASS_STAR_FORMING = 1,
	MTLZ_CLASS_COMPOSITE = 2,
	MTLZ_CLASS_AGN = 3,
	MTLZ_N_CLASSES = 4,
};

typedef struct mtlz_label_kv {
	char key[32];
	char value[96];
} mtlz_label_kv;

typedef struct mtlz_labels {
	int cls;                   /* enum mtlz_class; MTLZ_CLASS_NONE = null */
	double oh;                 /* 12 + log(O/H) */
	double oh_err;             /* dex */
	double log_mass;           /* log10 M* / Msun */
	double z;
	double sn_r;
	char source_name[96];
	char source_version[32];
	char source_method[128];
	int n_params, n_survey, n_dropped;
	mtlz_label_kv params[MTLZ_LABEL_KV_MAX];     /* label_source.parameters */
	mtlz_label_kv survey[MTLZ_LABEL_KV_MAX];     /* survey_labels */
} mtlz_labels;

/* Every field null / empty. */
void mtlz_labels_init(mtlz_labels *l);
/* Sets key=value (printf format) in kv[*n], replacing the key's value
 * if present, else appending; -1 when full. */
int mtlz_labels_kv_add(mtlz_label_kv *kv, int *n, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* The value of key in kv[n], or NULL. */
const char *mtlz_labels_kv_get(const mtlz_label_kv *kv, int n, const char *key);
/* "passive", "star_forming", "composite", "agn" (the model's class names),
 * or "none"; and back (-2 when unknown). */
const char *mtlz_class_name(int cls);
int mtlz_class_parse(const char *name);

#endif
