/*
 * ref_nn.c - see ref_nn.h. Clarity over speed: plain loops, doubles.
 */
#include "ref_nn.h"

/* tensor names are built from formats assembled at run time */
#pragma GCC diagnostic ignored "-Wformat-nonliteral"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ref_conv1d(const float *x, int cin, int len, const float *w,
		const float *b, int cout, int k, int pad, float *y, int *len_out)
{
	const int lo = len + 2 * pad - k + 1;

	for (int o = 0; o < cout; o++)
		for (int l = 0; l < lo; l++) {
			double acc = b[o];

			for (int i = 0; i < cin; i++)
				for (int t = 0; t < k; t++) {
					const int p = l + t - pad;

					if (p >= 0 && p < len)
						acc += (double)w[(o * cin + i) * k + t] *
						       x[i * len + p];
				}
			y[o * lo + l] = (float)acc;
		}
	*len_out = lo;
}

void ref_relu(float *x, int n)
{
	for (int i = 0; i < n; i++)
		if (x[i] < 0)
			x[i] = 0;
}

void ref_maxpool(const float *x, int C, int len, int pool, float *y, int *len_out)
{
	const int lo = (len - pool) / pool + 1;

	for (int c = 0; c < C; c++)
		for (int l = 0; l < lo; l++) {
			float m = x[c * len + l * pool];

			for (int t = 1; t < pool; t++)
				if (x[c * len + l * pool + t] > m)
					m = x[c * len + l * pool + t];
			y[c * lo + l] = m;
		}
	*len_out = lo;
}

void ref_linear(const float *x, int in, const float *w, const float *b, int out, float *y)
{
	for (int o = 0; o < out; o++) {
		double acc = b[o];

		for (int i = 0; i < in; i++)
			acc += (double)w[o * in + i] * x[i];
		y[o] = (float)acc;
	}
}

static const float *
T(const mtlz_model *m, const char *fmt, int a, int b)
{
	char name[64];
	const mtlz_tensor *t;

	snprintf(name, sizeof(name), fmt, a, b);
	t = mtlz_model_find(m, name);
	if (!t) {
		fprintf(stderr, "ref_nn: missing tensor %s\n", name);
		abort();
	}
	return t->data;
}

static void head(const mtlz_model *m, const char *which, const float *feat,
		 int C, float *out)
{
	const mtlz_arch *a = mtlz_model_arch(m);
	float h[2][4096];
	const float *in = feat;
	int n_in = C;
	char wn[64], bn[64];

	for (int i = 0; i <= a->n_hidden; i++) {
		const int n_out = i < a->n_hidden ? a->hidden[i] :
				  (strcmp(which, "class") == 0 ? a->n_classes : 1);
		float *dst = i == a->n_hidden ? out : h[i & 1];

		snprintf(wn, sizeof(wn), "heads.%s.fc%%d.weight", which);
		snprintf(bn, sizeof(bn), "heads.%s.fc%%d.bias", which);
		ref_linear(in, n_in, T(m, wn, i + 1, 0), T(m, bn, i + 1, 0), n_out, dst);
		if (i < a->n_hidden)
			ref_relu(dst, n_out);
		in = dst;
		n_in = n_out;
	}
}

void ref_forward(const mtlz_model *m, const float *x, float *probs,
		 float *metal_raw, float *feat)
{
	const mtlz_arch *a = mtlz_model_arch(m);
	size_t cap = (size_t)a->input_length * 4096;
	float *cur = malloc(cap * sizeof(float)), *nxt = malloc(cap * sizeof(float)), *t;
	int len = a->input_length, C = 1, lo;

	memcpy(cur, x, (size_t)len * sizeof(float));
	for (int b = 0; b < a->n_blocks; b++) {
		const int co = a->channels[b];

		ref_conv1d(cur, C, len, T(m, "backbone.blocks.%d.conv%d.weight", b, 1),
			   T(m, "backbone.blocks.%d.conv%d.bias", b, 1), co,
			   a->kernel, a->padding, nxt, &lo);
		ref_relu(nxt, co * lo);
		ref_conv1d(nxt, co, lo, T(m, "backbone.blocks.%d.conv%d.weight", b, 2),
			   T(m, "backbone.blocks.%d.conv%d.bias", b, 2), co,
			   a->kernel, a->padding, cur, &lo);
		ref_relu(cur, co * lo);
		ref_maxpool(cur, co, lo, a->pool, nxt, &len);
		t = cur; cur = nxt; nxt = t;
		C = co;
	}
	if (a->attention_reduction) {
		const int h = C / a->attention_reduction;
		float g[4096], s1[4096], s2[4096];

		for (int c = 0; c < C; c++) {
			double acc = 0;

			for (int l = 0; l < len; l++)
				acc += cur[c * len + l];
			g[c] = (float)(acc / len);
		}
		ref_linear(g, C, T(m, "attention.squeeze.weight", 0, 0),
			   T(m, "attention.squeeze.bias", 0, 0), h, s1);
		ref_relu(s1, h);
		ref_linear(s1, h, T(m, "attention.excite.weight", 0, 0),
			   T(m, "attention.excite.bias", 0, 0), C, s2);
		for (int c = 0; c < C; c++) {
			const float s = (float)(1.0 / (1.0 + exp(-(double)s2[c])));

			for (int l = 0; l < len; l++)
				cur[c * len + l] *= s;
		}
	}
	for (int c = 0; c < C; c++) {
		double acc = 0;

		for (int l = 0; l < len; l++)
			acc += cur[c * len + l];
		feat[c] = (float)(acc / len);
	}
	{
		float logits[MTLZ_MAX_CLASSES];
		double mx = -1e300, s = 0;

		head(m, "class", feat, C, logits);
		for (int k = 0; k < a->n_classes; k++)
			mx = logits[k] > mx ? logits[k] : mx;
		for (int k = 0; k < a->n_classes; k++)
			s += exp(logits[k] - mx);
		for (int k = 0; k < a->n_classes; k++)
			probs[k] = (float)(exp(logits[k] - mx) / s);
		head(m, "metal", feat, C, metal_raw);
	}
	free(cur);
	free(nxt);
}
