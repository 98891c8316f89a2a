/*
 * offsets.h - at-least-once bookkeeping: which input offsets are in flight
 * per partition, and how far each partition may be committed.
 *
 * The consumer adds every offset it reads (in order per partition); the
 * delivery-report handler marks an offset done once its output (result or
 * dead-letter record) is acknowledged by the broker. Results of one
 * partition can be acknowledged out of order, so the commit position only
 * advances over the contiguous done prefix: after a crash, everything past
 * it is read again (duplicates are possible, loss is not).
 *
 * @locality any thread; every call takes the tracker's mutex.
 */
#ifndef MTLZ_OFFSETS_H
#define MTLZ_OFFSETS_H

#include <stddef.h>
#include <stdint.h>

typedef struct mtlz_offsets mtlz_offsets;

mtlz_offsets *mtlz_offsets_new(void);
void mtlz_offsets_free(mtlz_offsets *t);

/* Records an offset read from partition p; offsets must increase per
 * partition. Returns 0, or -1 (out of order or out of memory). */
int mtlz_offsets_add(mtlz_offsets *t, int32_t p, int64_t offset);

/* Marks (p, offset) done. Returns the new commit position (the next offset
 * to read: last contiguous done + 1) when it advanced, else -1. Unknown
 * offsets (e.g. of a revoked partition) are ignored. */
int64_t mtlz_offsets_done(mtlz_offsets *t, int32_t p, int64_t offset);

/* Offsets of p still in flight (p < 0: all partitions). */
size_t mtlz_offsets_pending(mtlz_offsets *t, int32_t p);

/* Forgets partition p (revoked or lost). */
void mtlz_offsets_drop(mtlz_offsets *t, int32_t p);

#endif
