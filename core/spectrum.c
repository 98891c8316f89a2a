/*
 * spectrum.c - see spectrum.h.
 */
#include "spectrum.h"
#include "common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void mtlz_spectrum_init(mtlz_spectrum *s)
{
	memset(s, 0, sizeof(*s));
	s->z = NAN;
	s->sn = NAN;
	s->zwarning = -1;
}

int mtlz_spectrum_alloc(mtlz_spectrum *s, size_t n, int with_ivar,
			int with_mask, int with_wave)
{
	s->n = n;
	s->flux = calloc(n ? n : 1, sizeof(float));
	if (with_ivar)
		s->ivar = calloc(n ? n : 1, sizeof(float));
	if (with_mask)
		s->and_mask = calloc(n ? n : 1, sizeof(uint32_t));
	if (with_wave) {
		s->wave = calloc(n ? n : 1, sizeof(double));
		s->grid_kind = MTLZ_GRID_EXPLICIT;
	}
	if (!s->flux || (with_ivar && !s->ivar) || (with_mask && !s->and_mask) ||
	    (with_wave && !s->wave)) {
		mtlz_spectrum_clear(s);
		return MTLZ_ERR_NOMEM;
	}
	return MTLZ_OK;
}

void mtlz_spectrum_clear(mtlz_spectrum *s)
{
	if (!s)
		return;
	free(s->wave);
	free(s->flux);
	free(s->ivar);
	free(s->and_mask);
	mtlz_spectrum_init(s);
}

double mtlz_spectrum_wave(const mtlz_spectrum *s, size_t i)
{
	switch (s->grid_kind) {
	case MTLZ_GRID_LOGLAM: return pow(10.0, s->start + (double)i * s->step);
	case MTLZ_GRID_LINEAR: return s->start + (double)i * s->step;
	default: return s->wave ? s->wave[i] : NAN;
	}
}
