/*
 * train.h - forward and backward passes of the MTLforGalSpecZ model for
 * training on the CPU (paper Sections 3.2-3.3): every layer's gradient
 * (convolutions, ReLU, max-pool, squeeze-and-excitation attention, global
 * average pool, dropout, linear heads), the focal loss of the class head and
 * the masked MAE of the metallicity head, for a whole batch at once.
 *
 * The trainer keeps its own copy of the parameters (the model's tensors in
 * canonical order, packed in one array) that the optimiser updates; the
 * model is written back with mtlz_trainer_store().
 *
 * The float trainer (mtlz_trainer) runs its convolutional trunk
 * channels-last on the inference engine's micro-kernels, whole samples per
 * thread (train_nlc.h). The double trainer (mtlz_trainer_d, the reference of
 * the finite-difference gradient checks in tests/test_train.c) keeps the
 * activations as [channels][batch][length], so that each convolution of a
 * batch is one GEMM over im2col columns (OpenBLAS) and each gradient two;
 * MTLZ_TRAIN_TRUNK=im2col gives the float trainer that trunk too. The rest
 * of the passes is one source compiled for both types (train_impl.h).
 */
#ifndef MTLZ_TRAIN_H
#define MTLZ_TRAIN_H

#include "model.h"
#include "optim.h"

#include <stddef.h>
#include <stdint.h>

enum mtlz_task { MTLZ_TASK_BOTH = 0, MTLZ_TASK_CLASS = 1, MTLZ_TASK_METAL = 2 };

/* One batch: x[n][L] (preprocessed, on the model grid); cls[n] the true
 * class or -1; oh[n] the true 12 + log(O/H) or NaN. The metallicity loss
 * counts only samples whose true class is star-forming (class 1) and whose
 * oh is finite (paper Eq. 7). */
typedef struct mtlz_batch {
	const float *x;
	const int *cls;
	const float *oh;
	int n;
} mtlz_batch;

typedef struct mtlz_loss_opts {
	double focal_alpha;   /* 0.25 (Lin et al. 2017) */
	double focal_gamma;   /* 2.0 */
	double w_class;       /* lambda_1 (DWA) */
	double w_metal;       /* lambda_2 */
	int task;             /* enum mtlz_task: single-task baselines */
	int train;            /* 1: dropout active (masks from seed, sample) */
	uint64_t seed;        /* dropout: masks depend on (seed, index in batch) */
} mtlz_loss_opts;

typedef struct mtlz_losses {
	double cls;           /* mean focal loss over labelled samples (0 if none) */
	double metal;         /* mean |pred - true| over star-forming samples, dex (0 if none) */
	double total;         /* w_class * cls + w_metal * metal (per task) */
	int n_cls, n_metal;
} mtlz_losses;

void mtlz_loss_opts_default(mtlz_loss_opts *o);

typedef struct mtlz_trainer mtlz_trainer;

/* A trainer for model m's architecture, batches of at most max_batch. */
mtlz_trainer *mtlz_trainer_new(const mtlz_model *m, int max_batch, int n_threads,
			       char *errstr, size_t errstr_size);
void mtlz_trainer_free(mtlz_trainer *t);
size_t mtlz_trainer_n_params(const mtlz_trainer *t);
int mtlz_trainer_n_classes(const mtlz_trainer *t);
/* The packed parameters (read/write: the optimiser updates them). */
float *mtlz_trainer_params(mtlz_trainer *t);
/* Offset and size of the model tensor `name` in the packed array; -1 if none. */
long mtlz_trainer_param_offset(const mtlz_trainer *t, const char *name, size_t *n);
/* Copies the parameters into / from m (same architecture). */
int mtlz_trainer_store(const mtlz_trainer *t, mtlz_model *m);
int mtlz_trainer_load(mtlz_trainer *t, const mtlz_model *m);

/* Forward pass and, when grad != NULL, backward: grad[n_params] receives
 * d total / d params (overwritten), dx[n][L] (if not NULL) d total / d x.
 * logits[n][n_classes] and metal[n] (if not NULL) receive the outputs
 * (metal in dex, i.e. after the model's target scale and offset). */
int mtlz_trainer_step(mtlz_trainer *t, const mtlz_batch *b, const mtlz_loss_opts *o,
		      mtlz_losses *loss, float *grad, float *dx, float *logits, float *metal,
		      char *errstr, size_t errstr_size);

/* A trainer of the given kind: "cpu" (the above; NULL means cpu) or "cuda"
 * (gpu/train_cuda.cu: the passes on the GPU with cuBLAS; with
 * mtlz_trainer_train_step the Adam update too, else the caller's optimiser
 * on the host as for the CPU trainer; dx is not available). "cuda" fails
 * with the reason when the build has no CUDA engine or no device answers. */
mtlz_trainer *mtlz_trainer_new_kind(const mtlz_model *m, int max_batch, int n_threads,
				    const char *kind, char *errstr, size_t errstr_size);
const char *mtlz_trainer_describe(const mtlz_trainer *t);

/* One training step with its Adam update: forward, backward, then
 * mtlz_adam_step(a, params, grad) -- on the host for the CPU trainer, on
 * the device for "cuda", where the parameters and a's moments then stay
 * until the host reads them: mtlz_trainer_params(), _store(), _step(),
 * _load() and _sync() bring them back (into a->m, a->v too), so a caller
 * sees the same state either way. Between train steps `a` belongs to the
 * trainer: keep passing the same one, and change its moments or step count
 * only after a sync and before the next params() call hands the state back
 * to the host (params() marks the host copy as the one to upload); a
 * pointer from mtlz_trainer_params() is valid until the next train step. */
int mtlz_trainer_train_step(mtlz_trainer *t, const mtlz_batch *b, const mtlz_loss_opts *o,
			    mtlz_adam *a, mtlz_losses *loss, char *errstr, size_t errstr_size);
/* Brings the parameters and the Adam moments of train_step back to the
 * host (a no-op for the CPU trainer or when they are there). */
int mtlz_trainer_sync(mtlz_trainer *t, char *errstr, size_t errstr_size);
/* "fp32" (default) or "tf32" (tensor-core GEMMs; the cuda trainer only). */
int mtlz_trainer_set_precision(mtlz_trainer *t, const char *precision, char *errstr,
			       size_t errstr_size);
/* A batch buffer [max_batch][L] in pinned memory for the cuda trainer
 * (gather batches into it: the upload is then asynchronous); NULL for cpu. */
float *mtlz_trainer_input_buffer(mtlz_trainer *t);

/* The losses and their gradients w.r.t. the raw head outputs, from the
 * outputs of a forward pass: logits[n][K], metal[n] in dex; dlog[n][K],
 * dmet[n] (before the target scale). What every trainer's step computes. */
void mtlz_train_losses(const float *logits, const float *metal, const mtlz_batch *b, int K,
		       double tgt_scale, const mtlz_loss_opts *o, float *dlog, float *dmet,
		       mtlz_losses *loss);

/* The training dropout masks of head `head` for a batch: mask[B][C], 0 or
 * 1 / (1 - p_drop), keyed by (seed, sample index, head); all 1 when
 * p_drop is 0. The CPU passes draw exactly these. */
void mtlz_train_dropout_masks(float *mask, int B, int C, int head, float p_drop, uint64_t seed);

/* The CUDA trainer (gpu/train_cuda.cu, CUDA builds only): step() uploads
 * the packed parameters params[] (host, canonical order; NULL: the device's
 * are current), writes grad[] (host). */
struct mtlz_cuda_trainer;
struct mtlz_cuda_trainer *mtlz_cuda_trainer_new(const mtlz_model *m, int max_batch,
						char *errstr, size_t errstr_size);
int mtlz_cuda_trainer_step(struct mtlz_cuda_trainer *t, const float *params,
			   const mtlz_batch *b, const mtlz_loss_opts *o, mtlz_losses *loss,
			   float *grad, float *logits, float *metal, char *errstr,
			   size_t errstr_size);
/* The step with Adam on the device: params (host) and a->m, a->v are
 * uploaded first when params is not NULL, else the device's are current;
 * a->t is advanced, a->lr and the betas read. Returns when the losses are
 * known; the backward and the update run on (the next call or download
 * reports their errors). */
int mtlz_cuda_trainer_adam_step(struct mtlz_cuda_trainer *t, const float *params, mtlz_adam *a,
				const mtlz_batch *b, const mtlz_loss_opts *o, mtlz_losses *loss,
				char *errstr, size_t errstr_size);
/* The device's parameters and Adam moments (m, v may be NULL) to the host. */
int mtlz_cuda_trainer_download(struct mtlz_cuda_trainer *t, float *params, float *m, float *v,
			       char *errstr, size_t errstr_size);
/* Pinned [max_batch][L]: a batch built here is copied without staging. */
float *mtlz_cuda_trainer_input_buffer(struct mtlz_cuda_trainer *t);
int mtlz_cuda_trainer_set_tf32(struct mtlz_cuda_trainer *t, int on, char *errstr,
			       size_t errstr_size);
const char *mtlz_cuda_trainer_describe(const struct mtlz_cuda_trainer *t);
/* The metallicity target's standardisation (after mtlz_trainer_load). */
void mtlz_cuda_trainer_set_target(struct mtlz_cuda_trainer *t, double off, double scale);
void mtlz_cuda_trainer_free(struct mtlz_cuda_trainer *t);

/* The double-precision twin, for gradient checks. */
typedef struct mtlz_trainer_d mtlz_trainer_d;

mtlz_trainer_d *mtlz_trainer_d_new(const mtlz_model *m, int max_batch, int n_threads,
				   char *errstr, size_t errstr_size);
void mtlz_trainer_d_free(mtlz_trainer_d *t);
size_t mtlz_trainer_d_n_params(const mtlz_trainer_d *t);
double *mtlz_trainer_d_params(mtlz_trainer_d *t);
int mtlz_trainer_d_step(mtlz_trainer_d *t, const mtlz_batch *b, const mtlz_loss_opts *o,
			mtlz_losses *loss, double *grad, double *dx, double *logits,
			double *metal, char *errstr, size_t errstr_size);
/* The input as doubles (for d loss / d x checks): xd[n][L] replaces b->x. */
int mtlz_trainer_d_step_x(mtlz_trainer_d *t, const double *xd, const mtlz_batch *b,
			  const mtlz_loss_opts *o, mtlz_losses *loss, double *grad,
			  double *dx, char *errstr, size_t errstr_size);

#endif
