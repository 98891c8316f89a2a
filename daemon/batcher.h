/*
 * batcher.h - when the open batch closes: on batch.max_size positions or
 * once its first is batch.max_delay_ms old, whichever comes first; and how
 * long the consume loop may wait in one poll without overshooting that
 * deadline. Pure functions of the clock (seconds, any origin), so that
 * tests/test_batcher.c drives them with a simulated one.
 */
#ifndef MTLZD_BATCHER_H
#define MTLZD_BATCHER_H

/* The batch of n positions is full. */
static inline int mtlzd_batch_full(int n, int max_size)
{
	return n >= max_size;
}

/* The batch of n positions, opened at opened_at, is due at now. Compared
 * as now >= opened_at + delay_s, the deadline mtlzd_batch_poll_ms waits
 * for: `now - opened_at >= delay_s` rounds differently, and the loop then
 * spun on zero timeouts with a batch that was due by one test and not by
 * the other (test_batcher found it). */
static inline int mtlzd_batch_due(int n, double opened_at, double delay_s, double now)
{
	return n > 0 && now >= opened_at + delay_s;
}

/* How long the next poll may wait (ms): idle_ms with nothing open, else at
 * most until just past the deadline (rounded up, so that the loop wakes
 * after it, not a fraction of a millisecond before), 0 once it is due. */
static inline int mtlzd_batch_poll_ms(int n, double opened_at, double delay_s, double now,
				      int idle_ms)
{
	double left_ms;

	if (n == 0)
		return idle_ms;
	left_ms = ((opened_at + delay_s) - now) * 1000.0;
	if (left_ms <= 0)
		return 0;
	return left_ms + 1 < idle_ms ? (int)left_ms + 1 : idle_ms;
}

#endif
