/*
 * optim.c - Adam, ReduceLROnPlateau, DWA and the stratified split (optim.h).
 */
#include "optim.h"
#include "common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int mtlz_adam_init(mtlz_adam *a, size_t n, double lr)
{
	memset(a, 0, sizeof(*a));
	a->lr = lr;
	a->beta1 = 0.9;
	a->beta2 = 0.999;
	a->eps = 1e-8;
	a->n = n;
	a->m = calloc(n ? n : 1, sizeof(float));
	a->v = calloc(n ? n : 1, sizeof(float));
	if (!a->m || !a->v) {
		mtlz_adam_free(a);
		return MTLZ_ERR_NOMEM;
	}
	return MTLZ_OK;
}

void mtlz_adam_free(mtlz_adam *a)
{
	free(a->m);
	free(a->v);
	a->m = a->v = NULL;
}

void mtlz_adam_step(mtlz_adam *a, float *p, const float *g)
{
	const float b1 = (float)a->beta1, b2 = (float)a->beta2;
	double c1, c2;
	float step, eps;

	a->t++;
	c1 = 1.0 - pow(a->beta1, (double)a->t);
	c2 = 1.0 - pow(a->beta2, (double)a->t);
	/* as torch: p -= (lr / c1) * m / (sqrt(v) / sqrt(c2) + eps) */
	step = (float)(a->lr / c1);
	eps = (float)a->eps;
#pragma omp parallel for schedule(static)
	for (size_t i = 0; i < a->n; i++) {
		const float m = b1 * a->m[i] + (1 - b1) * g[i];
		const float v = b2 * a->v[i] + (1 - b2) * g[i] * g[i];

		a->m[i] = m;
		a->v[i] = v;
		p[i] -= step * m / (sqrtf(v) / (float)sqrt(c2) + eps);
	}
}

void mtlz_plateau_init(mtlz_plateau *s, double factor, int patience)
{
	memset(s, 0, sizeof(*s));
	s->factor = factor;
	s->patience = patience;
	s->threshold = 1e-4;
	s->min_lr = 0;
	s->best = INFINITY;
}

double mtlz_plateau_step(mtlz_plateau *s, double metric, double lr)
{
	if (metric < s->best * (1 - s->threshold)) {
		s->best = metric;
		s->bad = 0;
	} else {
		s->bad++;
	}
	if (s->bad > s->patience) {
		const double nl = MTLZ_MAX(lr * s->factor, s->min_lr);

		if (nl < lr)
			s->reductions++;
		lr = nl;
		s->bad = 0;
	}
	return lr;
}

void mtlz_dwa(int epoch, const double prev1[2], const double prev2[2], double T,
	      double lambda[2])
{
	double w[2] = { 1.0, 1.0 }, e[2], s;

	if (epoch > 2)
		for (int k = 0; k < 2; k++)
			w[k] = prev2[k] > 0 ? prev1[k] / prev2[k] : 1.0;
	/* subtract the max before exp: same ratios, no overflow */
	s = MTLZ_MAX(w[0], w[1]);
	e[0] = exp((w[0] - s) / T);
	e[1] = exp((w[1] - s) / T);
	for (int k = 0; k < 2; k++)
		lambda[k] = 2.0 * e[k] / (e[0] + e[1]);
}

void mtlz_split_stratified(const int *cls, size_t n, int n_classes, double frac_train,
			   double frac_val, uint64_t seed, uint8_t *part)
{
	size_t *idx = malloc((n ? n : 1) * sizeof(size_t));
	mtlz_rng r;

	mtlz_rng_seed(&r, seed);
	for (int c = -1; c < n_classes && idx; c++) {
		size_t m = 0, n_tr, n_va;

		for (size_t i = 0; i < n; i++) {
			const int ci = cls[i] >= 0 && cls[i] < n_classes ? cls[i] : -1;

			if (ci == c)
				idx[m++] = i;
		}
		mtlz_shuffle_idx(idx, m, &r);
		n_tr = (size_t)llround(frac_train * (double)m);
		n_va = (size_t)llround(frac_val * (double)m);
		n_va = MTLZ_MIN(n_va, m - n_tr);
		for (size_t j = 0; j < m; j++)
			part[idx[j]] = j < n_tr ? 0 : j < n_tr + n_va ? 1 : 2;
	}
	free(idx);
}
