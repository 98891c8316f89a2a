/*
 * test_batcher.c - the micro-batcher's timing (daemon/batcher.h): a batch
 * closes on batch.max_size positions or once its first is
 * batch.max_delay_ms old, whichever comes first, and the consume loop's
 * poll timeouts never let it close early or more than a millisecond late.
 *
 * The loop below is mtlzd_run's, driven by a simulated clock and a
 * simulated poll (the next arrival if it comes within the timeout, else
 * the clock moves on by the timeout); what it closes is checked against
 * hand-worked cases and, on random bursty arrivals, against the rules
 * themselves.
 */
#include "batcher.h"
#include "common.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>

#define SLACK 0.001 + 1e-9  /* the poll timeout is rounded up to the next ms */

struct batch {
	int first, n;      /* arrivals [first, first + n) */
	double closed_at;
	int full;          /* closed on size */
};

struct sim {
	const double *arr;
	int n_arr, next;
	double now;
	long polls;
};

/* One rd_kafka_consumer_poll(timeout_ms): 1 with the next message. */
static int sim_poll(struct sim *s, int timeout_ms)
{
	cr_assert_geq(timeout_ms, 0);
	s->polls++;
	if (s->next < s->n_arr && s->arr[s->next] <= s->now + timeout_ms / 1000.0) {
		if (s->arr[s->next] > s->now)
			s->now = s->arr[s->next];
		s->next++;
		return 1;
	}
	s->now += timeout_ms / 1000.0;
	return 0;
}

/* mtlzd_run's batching, on the simulated clock; returns the batches. */
static int run(const double *arr, int n_arr, int max_size, double delay, struct batch *out)
{
	struct sim s = { arr, n_arr, 0, 0.0, 0 };
	double opened_at = 0;
	int n = 0, nb = 0, first = 0;

	while (s.next < n_arr || n > 0) {
		const int t = mtlzd_batch_poll_ms(n, opened_at, delay, s.now, 100);

		cr_assert_leq(t, 100);
		if (sim_poll(&s, t)) {
			if (n == 0) {
				opened_at = s.now;
				first = s.next - 1;
			}
			n++;
			if (mtlzd_batch_full(n, max_size)) {
				out[nb++] = (struct batch){ first, n, s.now, 1 };
				n = 0;
			}
		}
		if (mtlzd_batch_due(n, opened_at, delay, s.now)) {
			out[nb++] = (struct batch){ first, n, s.now, 0 };
			n = 0;
		}
		cr_assert_lt(s.polls, 10L * n_arr + 100000, "the loop spins: now %.9f, %d taken, %d open", s.now, s.next, n);
	}
	return nb;
}

Test(batcher, hand_worked_cases)
{
	/* max 4, 20 ms: three spectra then a pause (closes on the delay,
	 * 20 ms after the first); four in a burst (closes on size, at the
	 * fourth); one alone (20 ms after it); five at once (4, then 1) */
	const double arr[] = { 0.000, 0.005, 0.010, 0.100, 0.101, 0.102, 0.103,
			       0.200, 0.300, 0.300, 0.300, 0.300, 0.300 };
	struct batch b[16];
	const int nb = run(arr, 13, 4, 0.020, b);

	cr_assert_eq(nb, 5);
	cr_assert(b[0].first == 0 && b[0].n == 3 && !b[0].full);
	cr_assert(b[0].closed_at >= 0.020 && b[0].closed_at <= 0.020 + SLACK, "%.6f",
		  b[0].closed_at);
	cr_assert(b[1].first == 3 && b[1].n == 4 && b[1].full);
	cr_assert_float_eq(b[1].closed_at, 0.103, 1e-12, "on size: at the 4th arrival");
	cr_assert(b[2].first == 7 && b[2].n == 1 && !b[2].full);
	cr_assert(b[2].closed_at >= 0.220 && b[2].closed_at <= 0.220 + SLACK);
	cr_assert(b[3].first == 8 && b[3].n == 4 && b[3].full);
	cr_assert_float_eq(b[3].closed_at, 0.300, 1e-12);
	cr_assert(b[4].first == 12 && b[4].n == 1 && !b[4].full);
	cr_assert(b[4].closed_at >= 0.320 && b[4].closed_at <= 0.320 + SLACK);
}

Test(batcher, max_size_one_and_zero_delay)
{
	const double arr[] = { 0.0, 0.0, 0.5 };
	struct batch b[4];

	/* one position: every spectrum is its own batch, closed at once */
	cr_assert_eq(run(arr, 3, 1, 0.020, b), 3);
	for (int i = 0; i < 3; i++)
		cr_assert(b[i].n == 1 && b[i].full && b[i].closed_at == arr[i]);
	/* no delay: each poll's spectrum closes at once, never waited for */
	cr_assert_eq(run(arr, 3, 8, 0.0, b), 3);
	for (int i = 0; i < 3; i++)
		cr_assert(b[i].n == 1 && !b[i].full && b[i].closed_at == arr[i]);
}

Test(batcher, poll_timeout_rounds_up_and_caps)
{
	/* nothing open: the idle timeout */
	cr_assert_eq(mtlzd_batch_poll_ms(0, 0, 0.020, 5.0, 100), 100);
	/* 12.3 ms left: wait 13, just past the deadline */
	cr_assert_eq(mtlzd_batch_poll_ms(3, 1.0, 0.020, 1.0077, 100), 13);
	/* a long delay: never more than the idle timeout */
	cr_assert_eq(mtlzd_batch_poll_ms(3, 1.0, 5.0, 1.0, 100), 100);
	/* due or overdue: do not wait */
	cr_assert_eq(mtlzd_batch_poll_ms(3, 1.0, 0.020, 1.020, 100), 0);
	cr_assert_eq(mtlzd_batch_poll_ms(3, 1.0, 0.020, 2.0, 100), 0);
	cr_assert(!mtlzd_batch_due(0, 1.0, 0.020, 9.0), "an empty batch is never due");
	cr_assert(mtlzd_batch_due(1, 1.0, 0.020, 1.020));
	cr_assert(!mtlzd_batch_due(1, 1.0, 0.020, 1.0199));
}

/* Bursty arrivals: rates from 5/s to 20,000/s in runs, some gaps. */
static void bursty(double *arr, int n, mtlz_rng *r)
{
	double t = 0, rate = 100;

	for (int i = 0; i < n; i++) {
		if (i % 50 == 0)
			rate = pow(10.0, 0.7 + 3.6 * mtlz_rng_uniform(r));
		t += -log(1.0 - mtlz_rng_uniform(r)) / rate;
		arr[i] = t;
	}
}

Test(batcher, random_bursts_follow_the_rules)
{
	enum { N = 20000 };
	static double arr[N];
	static struct batch b[N];
	const int sizes[] = { 1, 8, 64 };
	const double delays[] = { 0.002, 0.020, 0.250 };
	mtlz_rng r;

	mtlz_rng_seed(&r, 42);
	bursty(arr, N, &r);
	for (int si = 0; si < 3; si++)
		for (int di = 0; di < 3; di++) {
			const int max = sizes[si];
			const double delay = delays[di];
			const int nb = run(arr, N, max, delay, b);
			int next = 0, n_full = 0, n_due = 0;

			for (int k = 0; k < nb; k++) {
				const double t0 = arr[b[k].first];
				const double last = arr[b[k].first + b[k].n - 1];

				/* every arrival in one batch, in order */
				cr_assert_eq(b[k].first, next);
				next += b[k].n;
				cr_assert(b[k].n >= 1 && b[k].n <= max);
				/* nothing joins after its deadline (+ rounding) */
				cr_assert_leq(last, t0 + delay + SLACK);
				if (b[k].full) {
					n_full++;
					cr_assert_eq(b[k].n, max);
					cr_assert_eq(b[k].closed_at, last, "full: closed on arrival");
				} else {
					n_due++;
					/* closed on the delay: not early, at most 1 ms late */
					cr_assert(b[k].closed_at >= t0 + delay &&
						  b[k].closed_at <= t0 + delay + SLACK,
						  "max %d delay %g: batch %d opened %.6f closed %.6f",
						  max, delay, k, t0, b[k].closed_at);
					/* and nothing that came before the deadline was left out */
					if (b[k].first + b[k].n < N)
						cr_assert_geq(arr[b[k].first + b[k].n], t0 + delay);
				}
			}
			cr_assert_eq(next, N);
			/* these arrivals exercise both ways of closing */
			if (max == 8)
				cr_assert(n_full > 0 && n_due > 0, "max %d delay %g: %d full, %d due",
					  max, delay, n_full, n_due);
		}
}
