/*
 * retrain.h - training the model from archives as the paper does it
 * (Section 3.3): stratified 6:2:2 split, batches of 128, focal loss +
 * masked MAE weighted by DWA, Adam at 1e-3 with ReduceLROnPlateau on the
 * validation loss (factor 0.1, patience 10), 100 epochs; single-task
 * baselines and the attention ablation; fine-tuning from a model;
 * checkpoints every epoch and on a stop request, resumable and
 * deterministic for a given seed and thread count; at the end, temperature
 * scaling of the class probabilities fitted on the validation split
 * (calib.h).
 */
#ifndef MTLZ_RETRAIN_H
#define MTLZ_RETRAIN_H

#include "calib.h"
#include "model.h"
#include "train.h"

#include <signal.h>
#include <stdint.h>

#define MTLZ_RETRAIN_MAX_EPOCHS 10000

struct mtlz_progress;

typedef struct mtlz_retrain_opts {
	char *const *data;          /* archive files or directories */
	int n_data;
	const char *out;            /* model file to write */
	const char *init;           /* start from this model (fine-tuning); NULL: random */
	const char *resume;         /* continue from this checkpoint; NULL: start */
	const char *checkpoint;     /* checkpoint path; NULL: "<out>.ckpt" */
	const char *schema_dir;     /* schemas/ (labelled_spectrum.avsc ...) */
	int epochs;                 /* 100 */
	int batch;                  /* 128 */
	double lr;                  /* 1e-3 */
	double plateau_factor;      /* 0.1 */
	int plateau_patience;       /* 10 */
	double focal_alpha;         /* 0.25 */
	double focal_gamma;         /* 2.0 */
	double dwa_T;               /* 1.0 */
	double frac_train, frac_val;/* 0.6, 0.2 */
	uint64_t seed;              /* 1: split, initialisation, shuffling, dropout */
	int threads;                /* 0: all cores */
	const char *engine;         /* "cpu" (default when NULL) or "cuda": who runs the passes */
	const char *precision;      /* "fp32" (default when NULL) or "tf32" (cuda only) */
	int task;                   /* enum mtlz_task */
	int no_attention;
	double dropout;             /* < 0: the architecture's default (0.5) */
	long max_batches;           /* > 0: stop each epoch after this many (measurements) */
	int no_calibrate;           /* 1: no temperature scaling at the end */
	volatile sig_atomic_t *stop;/* set by SIGINT/SIGTERM: checkpoint and return */
	/* progress: called after every batch and at the end of every epoch */
	void (*progress)(void *opaque, const struct mtlz_progress *p);
	void *opaque;
} mtlz_retrain_opts;

typedef struct mtlz_progress {
	int epoch, epochs;          /* 1-based */
	long batch, n_batches;      /* batches done in this epoch, of */
	double loss_cls, loss_metal;/* running means over this epoch */
	double lambda[2], lr;
	double elapsed_s, epoch_s;  /* since start / this epoch */
	int epoch_done;             /* 1: the epoch line (validation filled) */
	double val_cls, val_metal, val_total;
} mtlz_progress;

typedef struct mtlz_epoch_log {
	double train_cls, train_metal, train_total;
	double val_cls, val_metal, val_total;
	double lambda[2], lr, seconds;
} mtlz_epoch_log;

typedef struct mtlz_retrain_result {
	int epochs_done;            /* complete epochs */
	int stopped;                /* 1: stopped on request, checkpoint written */
	mtlz_epoch_log log[MTLZ_RETRAIN_MAX_EPOCHS];
	long n_train, n_val, n_test;
	long n_rejected;
	double test_accuracy;       /* of the written model on the test split */
	double test_oh_sd, test_oh_bias;
	long test_oh_n;
	long test_n;                /* labelled spectra in the test split (0: no test metrics) */
	/* temperature scaling: calibrated = 1 when mtlz.calibration was
	 * written (calib_val: the fit on the validation split; calib_test: the
	 * same T scored on the test split, n 0 when empty); else calib_skipped
	 * says why */
	int calibrated;
	mtlz_calib calib_val, calib_test;
	char calib_skipped[160];
} mtlz_retrain_result;

void mtlz_retrain_opts_default(mtlz_retrain_opts *o);
/* The split mtlz-retrain makes of a data set (cls[n], as loaded by
 * mtlz_dataset_load from the same archives in the same order): stratified
 * by class, frac_train : frac_val : rest, from `seed` (the run's --seed).
 * part[i] = 0 train, 1 validation, 2 test. `mtlz calibrate` re-derives a
 * trained model's validation split with it. */
void mtlz_retrain_split(const int *cls, size_t n, double frac_train, double frac_val,
			uint64_t seed, uint8_t *part);
/* Runs the training; writes o->out (atomically) at the end, checkpoints
 * to o->checkpoint every epoch. res may be large: allocate it. */
int mtlz_retrain_run(const mtlz_retrain_opts *o, mtlz_retrain_result *res, char *errstr,
		     size_t errstr_size);

#endif
