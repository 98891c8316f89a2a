/*
 * ref_nn.h - a naive, obviously-correct reference of every layer, in the
 * PyTorch layout (channels-first, NCL) with double accumulation. Written
 * independently of core/kernels_cpu.c (no packing, no tiling): the tests
 * compare the engine against it.
 */
#ifndef MTLZ_REF_NN_H
#define MTLZ_REF_NN_H

#include "model.h"

/* y[o][l] = b[o] + sum_{i,t} w[o][i][t] * x[i][l + t - pad] (zero outside) */
void ref_conv1d(const float *x, int cin, int len, const float *w,
		const float *b, int cout, int k, int pad, float *y, int *len_out);
void ref_relu(float *x, int n);
/* y[c][l] = max_{t<pool} x[c][l*pool + t], l < floor((len - pool)/pool) + 1 */
void ref_maxpool(const float *x, int C, int len, int pool, float *y, int *len_out);
/* y[o] = b[o] + sum_i w[o][i] x[i] */
void ref_linear(const float *x, int in, const float *w, const float *b, int out, float *y);

/* Whole model on one spectrum x[input_length]: class probabilities,
 * raw metallicity head output and the C pooled features after attention. */
void ref_forward(const mtlz_model *m, const float *x, float *probs,
		 float *metal_raw, float *feat);

#endif
