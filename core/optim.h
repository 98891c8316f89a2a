/*
 * optim.h - the paper's training schedule (Section 3.3): Adam, PyTorch's
 * ReduceLROnPlateau, Dynamic Weight Average of the two task losses (Liu et
 * al. 2019; paper Eqs. 8-9), and the stratified 6:2:2 split.
 */
#ifndef MTLZ_OPTIM_H
#define MTLZ_OPTIM_H

#include <stddef.h>
#include <stdint.h>

/* Adam (Kingma & Ba 2015) as torch.optim.Adam: beta1 0.9, beta2 0.999,
 * eps 1e-8, no weight decay. */
typedef struct mtlz_adam {
	double lr, beta1, beta2, eps;
	long t;                 /* steps taken */
	size_t n;
	float *m, *v;           /* first and second moments */
} mtlz_adam;

int mtlz_adam_init(mtlz_adam *a, size_t n, double lr);
void mtlz_adam_free(mtlz_adam *a);
/* p -= lr * mhat / (sqrt(vhat) + eps) for the gradient g. */
void mtlz_adam_step(mtlz_adam *a, float *p, const float *g);

/* torch.optim.lr_scheduler.ReduceLROnPlateau, mode "min", threshold_mode
 * "rel": an epoch improves when metric < best * (1 - threshold); after more
 * than `patience` epochs without improvement lr *= factor (not below
 * min_lr) and the count restarts. */
typedef struct mtlz_plateau {
	double factor, threshold, min_lr;
	int patience, bad;
	double best;
	int reductions;
} mtlz_plateau;

void mtlz_plateau_init(mtlz_plateau *s, double factor, int patience);
/* Returns the (possibly reduced) learning rate for the next epoch. */
double mtlz_plateau_step(mtlz_plateau *s, double metric, double lr);

/* DWA with K = 2 tasks: lambda_k(t) = K exp(w_k / T) / sum_i exp(w_i / T),
 * w_k = L_k(t-1) / L_k(t-2), w = 1 for the first two epochs. prev1/prev2
 * are the tasks' mean losses one and two epochs back (epoch is 1-based). */
void mtlz_dwa(int epoch, const double prev1[2], const double prev2[2], double T,
	      double lambda[2]);

/* Stratified split: for each class (cls[i] in 0..n_classes-1, others
 * as one more stratum) the items are shuffled with the seed and cut
 * frac_train : frac_val : rest. part[i] = 0 train, 1 validation, 2 test. */
void mtlz_split_stratified(const int *cls, size_t n, int n_classes, double frac_train,
			   double frac_val, uint64_t seed, uint8_t *part);

#endif
