/*
 * train_nlc.h - the float trainer's convolutional trunk (every block's two
 * convolutions, ReLUs and max-pool, then the global average pool) on
 * channels-last activations, with the inference engine's AVX2 micro-kernels
 * (core/kernels_cpu.h) for the forward pass, the input gradient and the
 * weight gradient.
 *
 * Layout: each sample's map is rows of C floats (C rounded up to 16, the
 * padded channels held at exactly zero by zero weights), with `padding`
 * zero rows before and after, so a k-tap convolution reads its im2col row
 * straight from the activation. The input gradient of a convolution is the
 * transposed convolution: the output gradient, behind k-1 zero rows, run
 * through the same kernel with the weights flipped along the taps and
 * transposed in channels. The weight gradient of every tap comes from the
 * same rows (mtlz_conv_dw_nlc), so nothing is copied into im2col columns.
 *
 * Work is split by sample: each thread runs whole samples through the trunk
 * (forward, then backward), so a sample's maps stay in that core's cache,
 * and accumulates its weight gradient privately; the partial gradients are
 * summed in thread order, so a step is deterministic for a given thread
 * count.
 *
 * @locality one trainer step at a time per handle.
 */
#ifndef MTLZ_TRAIN_NLC_H
#define MTLZ_TRAIN_NLC_H

#include "model.h"

#include <stddef.h>

typedef struct mtlz_nlc mtlz_nlc;

/* A trunk for architecture a, batches of up to max_batch; ow[i], ob[i] are
 * the offsets of convolution i's weight [cout][cin][k] and bias in the
 * packed parameters (i = 2 * block + 0|1). NULL when out of memory. */
mtlz_nlc *mtlz_nlc_new(const mtlz_arch *a, const size_t *ow, const size_t *ob, int max_batch,
		       int n_threads);
void mtlz_nlc_free(mtlz_nlc *n);
const char *mtlz_nlc_describe(const mtlz_nlc *n);

/* Forward through the trunk: x[B][input_length] -> gap[B][C_last]. Keeps
 * what the backward pass needs. */
void mtlz_nlc_forward(mtlz_nlc *n, const float *p, const float *x, int B, float *gap);

/* Backward from dg[B][C_last] (d loss / d gap) of the last forward, with
 * the same parameters p:
 * adds the convolutions' gradients into grad (packed like p) and, when dx
 * is not NULL, writes d loss / d x into dx[B][input_length]. */
void mtlz_nlc_backward(mtlz_nlc *n, const float *p, const float *dg, int B, float *grad,
		       float *dx);

#endif
