/*
 * train_nlc.c - see train_nlc.h.
 *
 * Geometry of block b (p = padding, k = kernel):
 *   input   len[b] rows, stored in S1 = len[b] + 2p rows (xin[b])
 *   conv1   l1 = S1 - k + 1 rows, stored in S2 = l1 + 2p rows (r1[b])
 *   conv2   l2 = S2 - k + 1 rows (per-thread scratch, pooled at once)
 *   pool    len[b+1] = l2 / pool rows -> xin[b+1]; argmax offsets in idx[b]
 * A convolution's output gradient ("dy layout") sits behind k-1 zero rows
 * and is followed by S - lout = k-1 zero rows, S its input's stride: row g
 * of dy lines up with row g of the input for the weight gradient, and the
 * zero rows around it are the transposed convolution's padding.
 */
#include "train_nlc.h"
#include "common.h"
#include "kernels_cpu.h"

#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct nlc_conv {
	int cin, cout;          /* real channels */
	int ciw, cow;           /* stored channels: 1 for the spectrum, else rounded to 16 */
	int dxw;                /* channels of the transposed convolution's output */
	size_t ow, ob;          /* offsets in the packed parameters */
	float *wp, *bp;         /* forward weights in panels, bias */
	float *wt, *bt;         /* transposed-convolution weights in panels, its bias */
	float *bz;              /* [cin] zeros: the transposed convolution has no bias */
	float *wflip;           /* [cin][cout][k] scratch for packing wt */
};

struct nlc_thread {
	float *y2, *dpool, *dy1, *dy2, *dxs;
	float *gw[2 * MTLZ_MAX_BLOCKS], *gb[2 * MTLZ_MAX_BLOCKS];
};

struct mtlz_nlc {
	mtlz_arch a;
	int isa, T, nb, k, p, pool;
	int len[MTLZ_MAX_BLOCKS + 1], l1[MTLZ_MAX_BLOCKS], l2[MTLZ_MAX_BLOCKS];
	int cw[MTLZ_MAX_BLOCKS + 1];   /* stored channels of block b's input */
	struct nlc_conv cv[2 * MTLZ_MAX_BLOCKS];
	float *xin[MTLZ_MAX_BLOCKS + 1];   /* [B][len + 2p][cw] */
	float *r1[MTLZ_MAX_BLOCKS];        /* [B][l1 + 2p][cw] */
	uint8_t *idx[MTLZ_MAX_BLOCKS];     /* [B][len[b+1]][cw] argmax offset in the window */
	struct nlc_thread *th;
	char desc[64];
};

static float *falloc(size_t n)
{
	/* 64-byte aligned: the micro-kernels load weight panels aligned */
	const size_t bytes = (n ? n : 1) * sizeof(float);
	float *v = aligned_alloc(64, (bytes + 63) / 64 * 64);

	if (v)
		memset(v, 0, bytes);
	return v;
}

void mtlz_nlc_free(mtlz_nlc *n)
{
	if (!n)
		return;
	for (int i = 0; i < 2 * n->nb; i++) {
		free(n->cv[i].wp);
		free(n->cv[i].bp);
		free(n->cv[i].wt);
		free(n->cv[i].bt);
		free(n->cv[i].bz);
		free(n->cv[i].wflip);
	}
	for (int b = 0; b <= n->nb; b++)
		free(n->xin[b]);
	for (int b = 0; b < n->nb; b++) {
		free(n->r1[b]);
		free(n->idx[b]);
	}
	for (int t = 0; n->th && t < n->T; t++) {
		struct nlc_thread *th = &n->th[t];

		free(th->y2);
		free(th->dpool);
		free(th->dy1);
		free(th->dy2);
		free(th->dxs);
		for (int i = 0; i < 2 * n->nb; i++) {
			free(th->gw[i]);
			free(th->gb[i]);
		}
	}
	free(n->th);
	free(n);
}

mtlz_nlc *mtlz_nlc_new(const mtlz_arch *a, const size_t *ow, const size_t *ob, int max_batch,
		       int n_threads)
{
	mtlz_nlc *n = calloc(1, sizeof(*n));
	const int B = max_batch;
	size_t s_y2 = 0, s_dpool = 0, s_dy = 0;
	int fail = 0;

	if (!n)
		return NULL;
	n->a = *a;
	n->isa = mtlz_isa_detect();
	n->T = n_threads > 0 ? n_threads : 1;
	n->nb = a->n_blocks;
	n->k = a->kernel;
	n->p = a->padding;
	n->pool = a->pool;
	n->len[0] = a->input_length;
	n->cw[0] = 1;
	for (int b = 0; b < n->nb; b++) {
		const int k = n->k, p = n->p, cw = mtlz_round_up(a->channels[b], MTLZ_NR);
		const int s1 = n->len[b] + 2 * p;

		n->l1[b] = s1 - k + 1;
		n->l2[b] = n->l1[b] + 2 * p - k + 1;
		n->len[b + 1] = n->l2[b] / n->pool;
		n->cw[b + 1] = cw;
		for (int h = 0; h < 2; h++) {
			struct nlc_conv *c = &n->cv[2 * b + h];

			c->cin = h == 0 ? (b == 0 ? 1 : a->channels[b - 1]) : a->channels[b];
			c->cout = a->channels[b];
			c->ciw = h == 0 ? n->cw[b] : cw;
			c->cow = cw;
			c->dxw = mtlz_round_up(c->cin, MTLZ_NR);
			c->ow = ow[2 * b + h];
			c->ob = ob[2 * b + h];
			c->wp = falloc((size_t)k * c->ciw * c->cow);
			c->bp = falloc((size_t)c->cow);
			c->wt = falloc((size_t)k * c->cow * c->dxw);
			c->bt = falloc((size_t)c->dxw);
			c->bz = falloc((size_t)c->cin);
			c->wflip = falloc((size_t)k * c->cin * c->cout);
			fail |= !c->wp || !c->bp || !c->wt || !c->bt || !c->bz || !c->wflip;
		}
		n->xin[b] = falloc((size_t)B * s1 * n->cw[b]);
		n->r1[b] = falloc((size_t)B * (n->l1[b] + 2 * p) * cw);
		n->idx[b] = calloc((size_t)B * n->len[b + 1] * cw + 1, 1);
		fail |= !n->xin[b] || !n->r1[b] || !n->idx[b];
		s_y2 = MTLZ_MAX(s_y2, (size_t)n->l2[b] * cw);
		s_dpool = MTLZ_MAX(s_dpool, (size_t)n->len[b + 1] * cw);
		s_dpool = MTLZ_MAX(s_dpool, (size_t)n->len[b] * n->cw[b]);
		s_dy = MTLZ_MAX(s_dy, (size_t)(k - 1 + s1) * cw);
		s_dy = MTLZ_MAX(s_dy, (size_t)(k - 1 + n->l1[b] + 2 * p) * cw);
	}
	n->xin[n->nb] = falloc((size_t)B * (n->len[n->nb] + 2 * n->p) * n->cw[n->nb]);
	fail |= !n->xin[n->nb];
	n->th = calloc((size_t)n->T, sizeof(*n->th));
	fail |= !n->th;
	for (int t = 0; !fail && t < n->T; t++) {
		struct nlc_thread *th = &n->th[t];

		th->y2 = falloc(s_y2);
		th->dpool = falloc(s_dpool);
		th->dy1 = falloc(s_dy);
		th->dy2 = falloc(s_dy);
		th->dxs = falloc((size_t)n->len[0] * MTLZ_NR);
		fail |= !th->y2 || !th->dpool || !th->dy1 || !th->dy2 || !th->dxs;
		for (int i = 0; i < 2 * n->nb; i++) {
			th->gw[i] = falloc((size_t)n->k * n->cv[i].ciw * n->cv[i].cow);
			th->gb[i] = falloc((size_t)n->cv[i].cow);
			fail |= !th->gw[i] || !th->gb[i];
		}
	}
	if (fail) {
		mtlz_nlc_free(n);
		return NULL;
	}
	snprintf(n->desc, sizeof(n->desc), "cpu (channels-last, %s)", mtlz_isa_name(n->isa));
	return n;
}

const char *mtlz_nlc_describe(const mtlz_nlc *n)
{
	return n->desc;
}

/* The weights of this step in panels: for the forward pass, or flipped
 * and transposed for the input gradient (w'[ci][co][j] = w[co][ci][k-1-j]). */
static void pack_weights(mtlz_nlc *n, const float *p, int transposed)
{
	const int k = n->k;

	for (int i = 0; i < 2 * n->nb; i++) {
		struct nlc_conv *c = &n->cv[i];
		const float *w = p + c->ow;

		if (!transposed) {
			mtlz_pack_conv(w, p + c->ob, c->cout, c->cin, k, c->ciw, c->wp, c->bp);
			continue;
		}
		for (int co = 0; co < c->cout; co++)
			for (int ci = 0; ci < c->cin; ci++)
				for (int j = 0; j < k; j++)
					c->wflip[((size_t)ci * c->cout + co) * k + j] =
						w[((size_t)co * c->cin + ci) * k + k - 1 - j];
		mtlz_pack_conv(c->wflip, c->bz, c->cin, c->cout, k, c->cow, c->wt, c->bt);
	}
}

static void forward_sample(mtlz_nlc *n, const float *x, int s, float *y2, float *gap)
{
	const int k = n->k, p = n->p, pool = n->pool, nb = n->nb;

	{
		float *xi = n->xin[0] + (size_t)s * (n->len[0] + 2 * p);

		memcpy(xi + p, x, (size_t)n->len[0] * sizeof(float));
	}
	for (int b = 0; b < nb; b++) {
		const struct nlc_conv *c1 = &n->cv[2 * b], *c2 = &n->cv[2 * b + 1];
		const int cw = c1->cow, l1 = n->l1[b], l2 = n->l2[b], lp = n->len[b + 1];
		const float *xi = n->xin[b] + (size_t)s * (n->len[b] + 2 * p) * c1->ciw;
		float *r1 = n->r1[b] + (size_t)s * (l1 + 2 * p) * cw;
		float *xo = n->xin[b + 1] + ((size_t)s * (lp + 2 * p) + p) * cw;
		uint8_t *ix = n->idx[b] + (size_t)s * lp * cw;

		mtlz_conv_nlc(n->isa, xi, c1->ciw, k, 0, l1, c1->wp, c1->bp, cw,
			      r1 + (size_t)p * cw, cw, 1);
		mtlz_conv_nlc(n->isa, r1, cw, k, 0, l2, c2->wp, c2->bp, cw, y2, cw, 1);
		for (int j = 0; j < lp; j++) {
			const float *win = y2 + (size_t)j * pool * cw;
			float *o = xo + (size_t)j * cw;
			uint8_t *io = ix + (size_t)j * cw;

			memcpy(o, win, (size_t)cw * sizeof(float));
			memset(io, 0, (size_t)cw);
			for (int q = 1; q < pool; q++)
				for (int ch = 0; ch < cw; ch++)
					if (win[(size_t)q * cw + ch] > o[ch]) {
						o[ch] = win[(size_t)q * cw + ch];
						io[ch] = (uint8_t)q;
					}
		}
	}
	{
		const int C = n->a.channels[nb - 1], cw = n->cw[nb], Lf = n->len[nb];
		const float *f = n->xin[nb] + ((size_t)s * (Lf + 2 * p) + p) * cw;
		double acc[MTLZ_NR];

		for (int c0 = 0; c0 < C; c0 += MTLZ_NR) {
			const int cn = MTLZ_MIN(MTLZ_NR, C - c0);

			for (int c = 0; c < cn; c++)
				acc[c] = 0;
			for (int l = 0; l < Lf; l++)
				for (int c = 0; c < cn; c++)
					acc[c] += f[(size_t)l * cw + c0 + c];
			for (int c = 0; c < cn; c++)
				gap[c0 + c] = (float)(acc[c] / Lf);
		}
	}
}

void mtlz_nlc_forward(mtlz_nlc *n, const float *p, const float *x, int B, float *gap)
{
	const int L = n->len[0], C = n->a.channels[n->nb - 1];

	pack_weights(n, p, 0);
#pragma omp parallel num_threads(n->T)
	{
		struct nlc_thread *th = &n->th[omp_get_thread_num()];

#pragma omp for schedule(static)
		for (int s = 0; s < B; s++)
			forward_sample(n, x + (size_t)s * L, s, th->y2, gap + (size_t)s * C);
	}
}

/* db[o] += sum of the n rows of dy (stride ld) */
static void bias_grad(const float *dy, int rows, int ld, float *db)
{
	for (int r = 0; r < rows; r++)
		for (int o = 0; o < ld; o++)
			db[o] += dy[(size_t)r * ld + o];
}

static void backward_sample(mtlz_nlc *n, const float *dg, int s, struct nlc_thread *th,
			    float *dx)
{
	const int k = n->k, p = n->p, pool = n->pool, nb = n->nb;

	{   /* global average pool: every row of the final map gets dg / Lf */
		const int C = n->a.channels[nb - 1], cw = n->cw[nb], Lf = n->len[nb];

		for (int l = 0; l < Lf; l++) {
			float *d = th->dpool + (size_t)l * cw;

			for (int c = 0; c < C; c++)
				d[c] = dg[c] / Lf;
			for (int c = C; c < cw; c++)
				d[c] = 0;
		}
	}
	for (int b = nb - 1; b >= 0; b--) {
		const struct nlc_conv *c1 = &n->cv[2 * b], *c2 = &n->cv[2 * b + 1];
		const int cw = c1->cow, ciw = c1->ciw, lin = n->len[b];
		const int l1 = n->l1[b], l2 = n->l2[b], lp = n->len[b + 1];
		const int s1 = lin + 2 * p, s2 = l1 + 2 * p;
		const float *xi = n->xin[b] + (size_t)s * s1 * ciw;
		const float *r1 = n->r1[b] + (size_t)s * s2 * cw;
		const float *xo = n->xin[b + 1] + ((size_t)s * (lp + 2 * p) + p) * cw;
		const uint8_t *ix = n->idx[b] + (size_t)s * lp * cw;
		float *dy2 = th->dy2 + (size_t)(k - 1) * cw, *dy1 = th->dy1 + (size_t)(k - 1) * cw;

		/* max-pool and the second ReLU: to the argmax, where positive */
		memset(th->dy2, 0, (size_t)(k - 1 + s2) * cw * sizeof(float));
		for (int j = 0; j < lp; j++) {
			const float *d = th->dpool + (size_t)j * cw, *v = xo + (size_t)j * cw;
			const uint8_t *io = ix + (size_t)j * cw;

			for (int ch = 0; ch < cw; ch++)
				if (v[ch] > 0)
					dy2[((size_t)j * pool + io[ch]) * cw + ch] = d[ch];
		}
		/* conv2: weight gradient, then its input gradient into dy1 */
		mtlz_conv_dw_nlc(n->isa, r1, cw, k, l2, dy2, cw, cw, th->gw[2 * b + 1]);
		bias_grad(dy2, l2, cw, th->gb[2 * b + 1]);
		memset(th->dy1, 0, (size_t)(k - 1) * cw * sizeof(float));
		memset(dy1 + (size_t)l1 * cw, 0, (size_t)(s1 - l1) * cw * sizeof(float));
		mtlz_conv_nlc(n->isa, th->dy2 + (size_t)p * cw, cw, k, 0, l1, c2->wt, c2->bt, cw,
			      dy1, cw, 0);
		/* the first ReLU */
		for (size_t q = 0; q < (size_t)l1 * cw; q++)
			if (!(r1[(size_t)p * cw + q] > 0))
				dy1[q] = 0;
		/* conv1 */
		mtlz_conv_dw_nlc(n->isa, xi, ciw, k, l1, dy1, cw, cw, th->gw[2 * b]);
		bias_grad(dy1, l1, cw, th->gb[2 * b]);
		if (b > 0) {
			mtlz_conv_nlc(n->isa, th->dy1 + (size_t)p * cw, cw, k, 0, lin, c1->wt,
				      c1->bt, c1->dxw, th->dpool, ciw, 0);
		} else if (dx) {
			mtlz_conv_nlc(n->isa, th->dy1 + (size_t)p * cw, cw, k, 0, lin, c1->wt,
				      c1->bt, c1->dxw, th->dxs, c1->dxw, 0);
			for (int l = 0; l < lin; l++)
				dx[l] = th->dxs[(size_t)l * c1->dxw];
		}
	}
}

void mtlz_nlc_backward(mtlz_nlc *n, const float *p, const float *dg, int B, float *grad,
		       float *dx)
{
	const int L = n->len[0], C = n->a.channels[n->nb - 1], k = n->k;

	pack_weights(n, p, 1);
	/* every thread's partial, also of a thread the runtime did not start */
	for (int t = 0; t < n->T; t++)
		for (int i = 0; i < 2 * n->nb; i++) {
			memset(n->th[t].gw[i], 0,
			       (size_t)k * n->cv[i].ciw * n->cv[i].cow * sizeof(float));
			memset(n->th[t].gb[i], 0, (size_t)n->cv[i].cow * sizeof(float));
		}
#pragma omp parallel num_threads(n->T)
	{
		struct nlc_thread *th = &n->th[omp_get_thread_num()];

#pragma omp for schedule(static)
		for (int s = 0; s < B; s++)
			backward_sample(n, dg + (size_t)s * C, s, th, dx ? dx + (size_t)s * L : NULL);
	}
	/* the threads' partial gradients, in thread order: [tap*ciw + ci][co]
	 * -> PyTorch's [co][ci][tap] */
	for (int i = 0; i < 2 * n->nb; i++) {
		const struct nlc_conv *c = &n->cv[i];
		float *gw = grad + c->ow, *gb = grad + c->ob;

		for (int t = 0; t < n->T; t++) {
			const float *pw = n->th[t].gw[i], *pb = n->th[t].gb[i];

			for (int co = 0; co < c->cout; co++) {
				gb[co] += pb[co];
				for (int ci = 0; ci < c->cin; ci++)
					for (int j = 0; j < k; j++)
						gw[((size_t)co * c->cin + ci) * k + j] +=
							pw[((size_t)j * c->ciw + ci) * c->cow + co];
			}
		}
	}
}
