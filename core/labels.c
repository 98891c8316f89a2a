/*
 * labels.c - helpers for mtlz_labels (labels.h).
 */
#include "labels.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void mtlz_labels_init(mtlz_labels *l)
{
	memset(l, 0, sizeof(*l));
	l->cls = MTLZ_CLASS_NONE;
	l->oh = l->oh_err = l->log_mass = l->z = l->sn_r = NAN;
}

int mtlz_labels_kv_add(mtlz_label_kv *kv, int *n, const char *key, const char *fmt, ...)
{
	va_list ap;
	int i;

	for (i = 0; i < *n; i++)   /* a map: one value per key */
		if (strncmp(kv[i].key, key, sizeof(kv[i].key) - 1) == 0)
			break;
	if (i == MTLZ_LABEL_KV_MAX)
		return -1;
	snprintf(kv[i].key, sizeof(kv[i].key), "%s", key);
	va_start(ap, fmt);
	vsnprintf(kv[i].value, sizeof(kv[i].value), fmt, ap);
	va_end(ap);
	if (i == *n)
		(*n)++;
	return 0;
}

const char *mtlz_labels_kv_get(const mtlz_label_kv *kv, int n, const char *key)
{
	for (int i = 0; i < n; i++)
		if (strcmp(kv[i].key, key) == 0)
			return kv[i].value;
	return NULL;
}

static const char *const class_names[MTLZ_N_CLASSES] = {
	"passive", "star_forming", "composite", "agn",
};

const char *mtlz_class_name(int cls)
{
	return cls >= 0 && cls < MTLZ_N_CLASSES ? class_names[cls] : "none";
}

int mtlz_class_parse(const char *name)
{
	for (int k = 0; k < MTLZ_N_CLASSES; k++)
		if (strcmp(name, class_names[k]) == 0)
			return k;
	return strcmp(name, "none") == 0 ? MTLZ_CLASS_NONE : -2;
}
