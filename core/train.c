/*
 * train.c - the trainer's passes (train_impl.h) instantiated for float and
 * double, and the public API of train.h.
 */
#include "train.h"
#include "common.h"
#include "log.h"
#include "train_nlc.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void openblas_set_num_threads(int n);

void mtlz_loss_opts_default(mtlz_loss_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->focal_alpha = 0.25;
	o->focal_gamma = 2.0;
	o->w_class = 1.0;
	o->w_metal = 1.0;
	o->task = MTLZ_TASK_BOTH;
}

#define REAL float
#define GEMM cblas_sgemm
#define GEMV cblas_sgemv
#define TR mtlz_trainer
#define FN(x) trf_##x
#define TRUNK_NLC 1
#include "train_impl.h"
#undef TRUNK_NLC
#undef REAL
#undef GEMM
#undef GEMV
#undef TR
#undef FN

#define REAL double
#define GEMM cblas_dgemm
#define GEMV cblas_dgemv
#define TR mtlz_trainer_d
#define FN(x) trd_##x
#include "train_impl.h"
#undef REAL
#undef GEMM
#undef GEMV
#undef TR
#undef FN

/* ---- the float trainer's API ---- */

mtlz_trainer *mtlz_trainer_new(const mtlz_model *m, int max_batch, int n_threads,
			       char *errstr, size_t errstr_size)
{
	return trf_new(m, max_batch, n_threads, errstr, errstr_size);
}

mtlz_trainer *mtlz_trainer_new_kind(const mtlz_model *m, int max_batch, int n_threads,
				    const char *kind, char *errstr, size_t errstr_size)
{
	mtlz_trainer *t;

	if (!kind || strcmp(kind, "cpu") == 0)
		return trf_new(m, max_batch, n_threads, errstr, errstr_size);
	if (strcmp(kind, "cuda") != 0) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "trainer engine '%s' (cpu or cuda)",
			 kind);
		return NULL;
	}
#ifdef MTLZ_WITH_CUDA
	/* the host side keeps only the parameters: batch buffers of 1 */
	t = trf_new(m, 1, 1, errstr, errstr_size);
	if (!t)
		return NULL;
	t->cuda = mtlz_cuda_trainer_new(m, max_batch, errstr, errstr_size);
	if (!t->cuda) {
		trf_free_all(t);
		return NULL;
	}
	return t;
#else
	(void)t;
	mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
		 "trainer engine 'cuda': this build has no CUDA engine (MTLZ_CUDA)");
	return NULL;
#endif
}

const char *mtlz_trainer_describe(const mtlz_trainer *t)
{
#ifdef MTLZ_WITH_CUDA
	if (t->cuda)
		return mtlz_cuda_trainer_describe(t->cuda);
#endif
	if (t->nlc)
		return mtlz_nlc_describe(t->nlc);
	return "cpu (im2col + OpenBLAS)";
}

void mtlz_train_dropout_masks(float *mask, int B, int C, int head, float p_drop, uint64_t seed)
{
	for (int b = 0; b < B; b++) {
		if (p_drop > 0)
			trf_make_mask(mask + (size_t)b * C, C, p_drop, seed, b, head);
		else
			for (int c = 0; c < C; c++)
				mask[(size_t)b * C + c] = 1;
	}
}

void mtlz_train_losses(const float *logits, const float *metal, const mtlz_batch *b, int K,
		       double tgt_scale, const mtlz_loss_opts *o, float *dlog, float *dmet,
		       mtlz_losses *loss)
{
	trf_losses(logits, metal, b, K, tgt_scale, o, dlog, dmet, loss);
}

void mtlz_trainer_free(mtlz_trainer *t)
{
#ifdef MTLZ_WITH_CUDA
	if (t && t->cuda)
		mtlz_cuda_trainer_free(t->cuda);
#endif
	trf_free_all(t);
}

size_t mtlz_trainer_n_params(const mtlz_trainer *t)
{
	return t->n_p;
}

int mtlz_trainer_n_classes(const mtlz_trainer *t)
{
	return t->a.n_classes;
}

int mtlz_trainer_sync(mtlz_trainer *t, char *errstr, size_t errstr_size)
{
#ifdef MTLZ_WITH_CUDA
	if (t->cuda && t->host_stale) {
		const int rc = mtlz_cuda_trainer_download(t->cuda, t->p, t->adam->m, t->adam->v,
							  errstr, errstr_size);

		if (rc)
			return rc;
		t->host_stale = 0;
	}
#else
	(void)errstr;
	(void)errstr_size;
#endif
	return MTLZ_OK;
}

/* for the accessors without an error channel: a failed download leaves the
 * host parameters stale and is said on stderr; the next step fails too */
static void sync_or_say(const mtlz_trainer *t)
{
	char err[256];

	if (mtlz_trainer_sync((mtlz_trainer *)t, err, sizeof(err)))
		mtlz_log(MTLZ_LOG_ERROR, "event=trainer_sync_error error=\"%s\"", err);
}

float *mtlz_trainer_params(mtlz_trainer *t)
{
	sync_or_say(t);
	if (!t->host_stale)
		t->dev_current = 0;   /* the caller may write: upload before the next step */
	return t->p;
}

int mtlz_trainer_train_step(mtlz_trainer *t, const mtlz_batch *b, const mtlz_loss_opts *o,
			    mtlz_adam *a, mtlz_losses *loss, char *errstr, size_t errstr_size)
{
	int rc;

	if (a->n != t->n_p)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"train step: Adam state for %zu parameters, the model has %zu",
				a->n, t->n_p);
#ifdef MTLZ_WITH_CUDA
	if (t->cuda) {
		if (t->adam && t->adam != a && (rc = mtlz_trainer_sync(t, errstr, errstr_size)))
			return rc;
		if (t->adam != a)
			t->dev_current = 0;
		t->adam = a;
		rc = mtlz_cuda_trainer_adam_step(t->cuda, t->dev_current ? NULL : t->p, a, b, o,
						 loss, errstr, errstr_size);
		if (rc == MTLZ_OK)
			t->host_stale = t->dev_current = 1;
		return rc;
	}
#endif
	if (!t->grad_own && !(t->grad_own = malloc(t->n_p * sizeof(float))))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	rc = trf_step(t, b->x, NULL, b, o, loss, t->grad_own, NULL, NULL, NULL, errstr,
		      errstr_size);
	if (rc == MTLZ_OK)
		mtlz_adam_step(a, t->p, t->grad_own);
	return rc;
}

int mtlz_trainer_set_precision(mtlz_trainer *t, const char *precision, char *errstr,
			       size_t errstr_size)
{
	if (!precision || !strcmp(precision, "fp32")) {
#ifdef MTLZ_WITH_CUDA
		if (t->cuda)
			return mtlz_cuda_trainer_set_tf32(t->cuda, 0, errstr, errstr_size);
#endif
		return MTLZ_OK;
	}
	if (strcmp(precision, "tf32") != 0)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"precision '%s' (fp32 or tf32)", precision);
#ifdef MTLZ_WITH_CUDA
	if (t->cuda)
		return mtlz_cuda_trainer_set_tf32(t->cuda, 1, errstr, errstr_size);
#endif
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
			"precision tf32 needs the cuda trainer (the CPU trains in fp32)");
}

float *mtlz_trainer_input_buffer(mtlz_trainer *t)
{
#ifdef MTLZ_WITH_CUDA
	if (t->cuda)
		return mtlz_cuda_trainer_input_buffer(t->cuda);
#else
	(void)t;
#endif
	return NULL;
}

long mtlz_trainer_param_offset(const mtlz_trainer *t, const char *name, size_t *n)
{
	for (size_t i = 0; i < t->n_tens; i++)
		if (strcmp(t->tens[i].name, name) == 0) {
			if (n)
				*n = t->tens[i].n;
			return (long)t->tens[i].off;
		}
	return -1;
}

int mtlz_trainer_load(mtlz_trainer *t, const mtlz_model *m)
{
	int rc;

	sync_or_say(t);   /* a->m, a->v current on the host before they are re-sent */
	if (t->host_stale)
		return MTLZ_ERR_IO;
	t->dev_current = 0;   /* the host's parameters are the new ones */
	rc = trf_load(t, m);
#ifdef MTLZ_WITH_CUDA
	if (rc == MTLZ_OK && t->cuda)
		mtlz_cuda_trainer_set_target(t->cuda, t->tgt_off, t->tgt_scale);
#endif
	return rc;
}

int mtlz_trainer_store(const mtlz_trainer *t, mtlz_model *m)
{
	size_t off = 0;

	if (mtlz_model_n_params(m) != t->n_p)
		return MTLZ_ERR_INVALID;
	sync_or_say(t);
	if (t->host_stale)
		return MTLZ_ERR_IO;
	for (size_t i = 0; i < mtlz_model_n_tensors(m); i++) {
		const mtlz_tensor *tt = mtlz_model_tensor(m, i);
		float *d = mtlz_model_data(m, tt->name);

		memcpy(d, t->p + off, tt->n * sizeof(float));
		off += tt->n;
	}
	return MTLZ_OK;
}

int mtlz_trainer_step(mtlz_trainer *t, const mtlz_batch *b, const mtlz_loss_opts *o,
		      mtlz_losses *loss, float *grad, float *dx, float *logits, float *metal,
		      char *errstr, size_t errstr_size)
{
#ifdef MTLZ_WITH_CUDA
	if (t->cuda) {
		int rc;

		if (dx)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
					"cuda trainer: no input gradient (dx)");
		if ((rc = mtlz_trainer_sync(t, errstr, errstr_size)))
			return rc;
		/* the device has these parameters already after train_step and a sync */
		return mtlz_cuda_trainer_step(t->cuda, t->dev_current ? NULL : t->p, b, o, loss,
					      grad, logits, metal, errstr, errstr_size);
	}
#endif
	return trf_step(t, b->x, NULL, b, o, loss, grad, dx, logits, metal, errstr, errstr_size);
}

mtlz_trainer_d *mtlz_trainer_d_new(const mtlz_model *m, int max_batch, int n_threads,
				   char *errstr, size_t errstr_size)
{
	return trd_new(m, max_batch, n_threads, errstr, errstr_size);
}

void mtlz_trainer_d_free(mtlz_trainer_d *t)
{
	trd_free_all(t);
}

size_t mtlz_trainer_d_n_params(const mtlz_trainer_d *t)
{
	return t->n_p;
}

double *mtlz_trainer_d_params(mtlz_trainer_d *t)
{
	return t->p;
}

int mtlz_trainer_d_step(mtlz_trainer_d *t, const mtlz_batch *b, const mtlz_loss_opts *o,
			mtlz_losses *loss, double *grad, double *dx, double *logits,
			double *metal, char *errstr, size_t errstr_size)
{
	return trd_step(t, b->x, NULL, b, o, loss, grad, dx, logits, metal, errstr, errstr_size);
}

int mtlz_trainer_d_step_x(mtlz_trainer_d *t, const double *xd, const mtlz_batch *b,
			  const mtlz_loss_opts *o, mtlz_losses *loss, double *grad,
			  double *dx, char *errstr, size_t errstr_size)
{
	return trd_step(t, NULL, xd, b, o, loss, grad, dx, NULL, NULL, errstr, errstr_size);
}
