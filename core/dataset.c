/*
 * dataset.c - archives -> preprocessed in-memory training set (dataset.h).
 */
#include "dataset.h"
#include "archive.h"
#include "common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct load_ctx {
	mtlz_dataset *d;
	const mtlz_prep_opts *prep;
	mtlz_prep_ws *ws;
	char *errstr;
	size_t errstr_size;
};

static int grow(mtlz_dataset *d)
{
	const size_t cap = d->cap ? 2 * d->cap : 1024;
	float *x = realloc(d->x, cap * (size_t)d->L * sizeof(float));

	if (!x)
		return -1;
	d->x = x;
#define GROW(f) do { void *p_ = realloc(d->f, cap * sizeof(*d->f)); if (!p_) return -1; \
		     d->f = p_; } while (0)
	GROW(cls);
	GROW(oh);
	GROW(z);
	GROW(sn_r);
	GROW(log_mass);
	GROW(flags);
	GROW(id);
#undef GROW
	d->cap = cap;
	return 0;
}

static int add_one(void *opaque, const mtlz_spectrum *s, const mtlz_labels *l)
{
	struct load_ctx *c = opaque;
	mtlz_dataset *d = c->d;
	mtlz_prep_info info;
	char err[256];

	d->n_read++;
	if (d->n == d->cap && grow(d))
		return mtlz_err(c->errstr, c->errstr_size, MTLZ_ERR_NOMEM,
				"out of memory at %zu spectra", d->n);
	if (mtlz_preprocess(s, c->prep, c->ws, d->x + d->n * (size_t)d->L, &info, err,
			    sizeof(err)) != MTLZ_OK) {
		d->n_rejected++;
		return 0;
	}
	d->cls[d->n] = l ? l->cls : -1;
	d->n_no_label += d->cls[d->n] < 0;
	d->oh[d->n] = l && l->cls == 1 && isfinite(l->oh) ? (float)l->oh : NAN;
	d->z[d->n] = (float)(l && isfinite(l->z) ? l->z : s->z);
	d->sn_r[d->n] = (float)(l ? l->sn_r : NAN);
	d->log_mass[d->n] = (float)(l ? l->log_mass : NAN);
	d->flags[d->n] = info.flags;
	snprintf(d->id[d->n], sizeof(d->id[0]), "%s", s->spec_id);
	d->n++;
	return 0;
}

int mtlz_dataset_load(mtlz_dataset *d, mtlz_avro *a, char *const *paths, int n_paths,
		      const mtlz_prep_opts *prep, char *errstr, size_t errstr_size)
{
	struct load_ctx c = { d, prep, mtlz_prep_ws_new(), errstr, errstr_size };
	const int L = mtlz_grid_length(&prep->grid);
	int rc;

	if (!c.ws)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	if (d->L && d->L != L) {
		mtlz_prep_ws_free(c.ws);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"grid of %d pixels, the dataset has %d", L, d->L);
	}
	d->L = L;
	rc = mtlz_archive_read(a, paths, n_paths, add_one, &c, errstr, errstr_size);
	mtlz_prep_ws_free(c.ws);
	return rc;
}

void mtlz_dataset_free(mtlz_dataset *d)
{
	free(d->x);
	free(d->cls);
	free(d->oh);
	free(d->z);
	free(d->sn_r);
	free(d->log_mass);
	free(d->flags);
	free(d->id);
	memset(d, 0, sizeof(*d));
}

void mtlz_dataset_counts(const mtlz_dataset *d, const size_t *idx, size_t n, long counts[4],
			 long *n_oh)
{
	memset(counts, 0, 4 * sizeof(long));
	*n_oh = 0;
	if (!idx)
		n = d->n;
	for (size_t k = 0; k < n; k++) {
		const size_t i = idx ? idx[k] : k;

		if (d->cls[i] >= 0 && d->cls[i] < 4)
			counts[d->cls[i]]++;
		*n_oh += isfinite(d->oh[i]);
	}
}
