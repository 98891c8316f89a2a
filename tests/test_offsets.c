/*
 * test_offsets.c - the commit position only advances over the contiguous
 * prefix of acknowledged offsets, per partition, whatever order the
 * acknowledgements come in (checked against a naive model).
 */
#include "common.h"
#include "offsets.h"

#include <criterion/criterion.h>
#include <stdlib.h>

Test(offsets, commit_waits_for_the_gap)
{
	mtlz_offsets *t = mtlz_offsets_new();

	for (int64_t o = 10; o < 15; o++)
		cr_assert_eq(mtlz_offsets_add(t, 0, o), 0);
	cr_assert_eq(mtlz_offsets_done(t, 0, 12), -1);
	cr_assert_eq(mtlz_offsets_done(t, 0, 11), -1);
	cr_assert_eq(mtlz_offsets_done(t, 0, 10), 13, "10, 11, 12 done: commit 13");
	cr_assert_eq(mtlz_offsets_pending(t, 0), 2);
	cr_assert_eq(mtlz_offsets_done(t, 0, 14), -1);
	cr_assert_eq(mtlz_offsets_done(t, 0, 13), 15);
	cr_assert_eq(mtlz_offsets_pending(t, -1), 0);
	mtlz_offsets_free(t);
}

Test(offsets, partitions_are_independent_and_unknown_ignored)
{
	mtlz_offsets *t = mtlz_offsets_new();

	mtlz_offsets_add(t, 0, 5);
	mtlz_offsets_add(t, 3, 5);
	cr_assert_eq(mtlz_offsets_done(t, 3, 5), 6);
	cr_assert_eq(mtlz_offsets_pending(t, 0), 1);
	cr_assert_eq(mtlz_offsets_done(t, 7, 5), -1, "unknown partition");
	cr_assert_eq(mtlz_offsets_done(t, 0, 6), -1, "unknown offset");
	cr_assert_eq(mtlz_offsets_add(t, 0, 5), -1, "not increasing");
	mtlz_offsets_drop(t, 0);
	cr_assert_eq(mtlz_offsets_pending(t, -1), 0);
	cr_assert_eq(mtlz_offsets_done(t, 0, 5), -1, "dropped partition");
	mtlz_offsets_free(t);
}

Test(offsets, random_acknowledgement_order_matches_naive_model)
{
	enum { N = 5000, P = 3 };
	mtlz_offsets *t = mtlz_offsets_new();
	static int done[P][N];
	int perm[P * N];
	int64_t commit[P] = { 0, 0, 0 };
	mtlz_rng r;

	mtlz_rng_seed(&r, 1);
	for (int p = 0; p < P; p++)
		for (int o = 0; o < N; o++)
			cr_assert_eq(mtlz_offsets_add(t, p, o * 2), 0); /* gaps in offsets, as compaction leaves */
	for (int i = 0; i < P * N; i++)
		perm[i] = i;
	for (int i = P * N - 1; i > 0; i--) {
		int j = (int)(mtlz_rng_next(&r) % (uint64_t)(i + 1)), tmp = perm[i];

		perm[i] = perm[j];
		perm[j] = tmp;
	}
	for (int i = 0; i < P * N; i++) {
		const int p = perm[i] / N, o = perm[i] % N;
		int64_t got = mtlz_offsets_done(t, p, o * 2), want, pos;
		int k = 0;

		done[p][o] = 1;
		while (k < N && done[p][k])
			k++;
		/* naive: commit just past the last offset of the done prefix */
		pos = k ? 2 * (int64_t)(k - 1) + 1 : 0;
		want = pos > commit[p] ? pos : -1;
		cr_assert_eq(got, want, "ack %d/%d: got %lld want %lld", p, o * 2,
			     (long long)got, (long long)want);
		if (want >= 0)
			commit[p] = want;
	}
	cr_assert_eq(mtlz_offsets_pending(t, -1), 0);
	mtlz_offsets_free(t);
}
