/*
 * test_optim.c - Adam, ReduceLROnPlateau, DWA and the stratified split
 * (core/optim.h) on scripted sequences with hand-computed expectations.
 */
#include "optim.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>

Test(optim, adam_first_two_steps_by_hand)
{
	mtlz_adam a;
	float p = 1.0f, g;

	cr_assert_eq(mtlz_adam_init(&a, 1, 1e-3), 0);
	/* step 1, g = 1: m = 0.1, v = 0.001, mhat = 1, vhat = 1: p -= 1e-3 */
	g = 1.0f;
	mtlz_adam_step(&a, &p, &g);
	cr_assert_float_eq(p, 1.0 - 1e-3 / (1 + 1e-8), 1e-7);
	/* step 2, g = -0.5: m = 0.09 - 0.05 = 0.04, v = 0.000999 + 0.00025 =
	 * 0.001249; mhat = 0.04 / 0.19 = 0.210526, vhat = 0.001249 / 0.001999 =
	 * 0.624812, sqrt = 0.790451: p -= 1e-3 * 0.266337 */
	g = -0.5f;
	mtlz_adam_step(&a, &p, &g);
	cr_assert_float_eq(p, 1.0 - 1e-3 - 1e-3 * 0.266337, 1e-7);
	mtlz_adam_free(&a);
}

Test(optim, adam_minimises_a_quadratic)
{
	mtlz_adam a;
	float p[3] = { 3, -2, 0.5f }, g[3];
	static const float c[3] = { 1, 2, -1 };

	cr_assert_eq(mtlz_adam_init(&a, 3, 0.05), 0);
	for (int t = 0; t < 2000; t++) {
		for (int i = 0; i < 3; i++)
			g[i] = 2 * (i + 1) * (p[i] - c[i]);   /* f = sum (i+1)(p - c)^2 */
		mtlz_adam_step(&a, p, g);
	}
	for (int i = 0; i < 3; i++)
		cr_assert_float_eq(p[i], c[i], 1e-2, "p[%d] = %g", i, p[i]);
	mtlz_adam_free(&a);
}

Test(optim, plateau_reduces_after_patience_epochs_without_improvement)
{
	/* patience 2: the 3rd epoch in a row without a relative improvement of
	 * 1e-4 reduces lr tenfold and restarts the count */
	static const double metric[] = { 1.0, 0.8, 0.8, 0.79995, 0.8, 0.7, 0.7, 0.7, 0.7,
					 0.7, 0.7, 0.7 };
	static const double want[] = { 1e-3, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4,
				       1e-5, 1e-5, 1e-5, 1e-6 };
	mtlz_plateau s;
	double lr = 1e-3;

	mtlz_plateau_init(&s, 0.1, 2);
	for (size_t e = 0; e < sizeof(metric) / sizeof(metric[0]); e++) {
		lr = mtlz_plateau_step(&s, metric[e], lr);
		cr_assert_float_eq(lr, want[e], 1e-15, "epoch %zu: lr %g, want %g", e, lr, want[e]);
	}
	cr_assert_eq(s.reductions, 3);
}

Test(optim, dwa_weights_by_hand)
{
	const double p1[2] = { 0.5, 0.8 }, p2[2] = { 1.0, 1.0 };
	double l[2];

	mtlz_dwa(1, p1, p2, 1.0, l);
	cr_assert(l[0] == 1.0 && l[1] == 1.0, "epoch 1: w = 1");
	mtlz_dwa(2, p1, p2, 1.0, l);
	cr_assert(l[0] == 1.0 && l[1] == 1.0, "epoch 2: w = 1");
	/* epoch 3: w = (0.5, 0.8); lambda1 = 2 e^0.5 / (e^0.5 + e^0.8) = 2 / (1 + e^0.3) */
	mtlz_dwa(3, p1, p2, 1.0, l);
	cr_assert_float_eq(l[0], 0.8511150, 1e-6);   /* e^0.3 = 1.3498588 */
	cr_assert_float_eq(l[1], 1.1488850, 1e-6);
	/* the slower-descending task gets the larger weight; T -> large: equal */
	mtlz_dwa(3, p1, p2, 1e6, l);
	cr_assert_float_eq(l[0], 1.0, 1e-6);
}

Test(optim, stratified_split_keeps_class_proportions)
{
	enum { N = 1003 };
	int cls[N];
	uint8_t a[N], b[N], c[N];
	int count[5][3] = { { 0 } }, m[5] = { 0 }, diff = 0;

	for (int i = 0; i < N; i++)
		cls[i] = i % 7 == 0 ? -1 : i % 4;
	mtlz_split_stratified(cls, N, 4, 0.6, 0.2, 42, a);
	mtlz_split_stratified(cls, N, 4, 0.6, 0.2, 42, b);
	mtlz_split_stratified(cls, N, 4, 0.6, 0.2, 43, c);
	for (int i = 0; i < N; i++) {
		const int k = cls[i] < 0 ? 4 : cls[i];

		cr_assert_lt(a[i], 3);
		cr_assert_eq(a[i], b[i], "same seed, same split");
		diff += a[i] != c[i];
		count[k][a[i]]++;
		m[k]++;
	}
	cr_assert_gt(diff, 100, "another seed, another split");
	for (int k = 0; k < 5; k++) {
		cr_assert_eq(count[k][0], (int)llround(0.6 * m[k]), "class %d train", k);
		cr_assert_eq(count[k][1], (int)llround(0.2 * m[k]), "class %d validation", k);
		cr_assert_eq(count[k][0] + count[k][1] + count[k][2], m[k]);
	}
}
