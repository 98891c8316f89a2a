/*
 * offsets.c - see offsets.h. Per partition, a ring of (offset, done) in
 * read order; done() finds its entry by binary search and pops the done
 * prefix.
 */
#include "offsets.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct entry {
	int64_t offset;
	int done;
};

struct part {
	int32_t p;
	struct entry *ring;
	size_t cap, head, n;  /* entries ring[(head + i) % cap], i < n */
	int64_t last_added;
};

struct mtlz_offsets {
	pthread_mutex_t lock;
	struct part *parts;
	size_t n_parts, cap_parts;
};

mtlz_offsets *mtlz_offsets_new(void)
{
	mtlz_offsets *t = calloc(1, sizeof(*t));

	if (t)
		pthread_mutex_init(&t->lock, NULL);
	return t;
}

void mtlz_offsets_free(mtlz_offsets *t)
{
	if (!t)
		return;
	for (size_t i = 0; i < t->n_parts; i++)
		free(t->parts[i].ring);
	free(t->parts);
	pthread_mutex_destroy(&t->lock);
	free(t);
}

static struct part *find(mtlz_offsets *t, int32_t p, int create)
{
	struct part *np;

	for (size_t i = 0; i < t->n_parts; i++)
		if (t->parts[i].p == p)
			return &t->parts[i];
	if (!create)
		return NULL;
	if (t->n_parts == t->cap_parts) {
		size_t cap = t->cap_parts ? 2 * t->cap_parts : 8;

		np = realloc(t->parts, cap * sizeof(*np));
		if (!np)
			return NULL;
		t->parts = np;
		t->cap_parts = cap;
	}
	np = &t->parts[t->n_parts++];
	memset(np, 0, sizeof(*np));
	np->p = p;
	np->last_added = -1;
	return np;
}

static int grow(struct part *s)
{
	size_t cap = s->cap ? 2 * s->cap : 256;
	struct entry *r = malloc(cap * sizeof(*r));

	if (!r)
		return -1;
	for (size_t i = 0; i < s->n; i++)
		r[i] = s->ring[(s->head + i) % s->cap];
	free(s->ring);
	s->ring = r;
	s->cap = cap;
	s->head = 0;
	return 0;
}

int mtlz_offsets_add(mtlz_offsets *t, int32_t p, int64_t offset)
{
	struct part *s;
	int rc = -1;

	pthread_mutex_lock(&t->lock);
	s = find(t, p, 1);
	if (!s || offset <= s->last_added)
		goto out;
	if (s->n == s->cap && grow(s) < 0)
		goto out;
	s->ring[(s->head + s->n) % s->cap] = (struct entry){ offset, 0 };
	s->n++;
	s->last_added = offset;
	rc = 0;
out:
	pthread_mutex_unlock(&t->lock);
	return rc;
}

int64_t mtlz_offsets_done(mtlz_offsets *t, int32_t p, int64_t offset)
{
	struct part *s;
	int64_t commit = -1;
	size_t lo = 0, hi;

	pthread_mutex_lock(&t->lock);
	s = find(t, p, 0);
	if (!s || !s->n)
		goto out;
	hi = s->n;
	while (lo < hi) { /* first entry with offset >= the one asked */
		const size_t mid = (lo + hi) / 2;

		if (s->ring[(s->head + mid) % s->cap].offset < offset)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == s->n || s->ring[(s->head + lo) % s->cap].offset != offset)
		goto out;
	s->ring[(s->head + lo) % s->cap].done = 1;
	while (s->n && s->ring[s->head].done) {
		commit = s->ring[s->head].offset + 1;
		s->head = (s->head + 1) % s->cap;
		s->n--;
	}
out:
	pthread_mutex_unlock(&t->lock);
	return commit;
}

size_t mtlz_offsets_pending(mtlz_offsets *t, int32_t p)
{
	size_t n = 0;

	pthread_mutex_lock(&t->lock);
	for (size_t i = 0; i < t->n_parts; i++)
		if (p < 0 || t->parts[i].p == p)
			n += t->parts[i].n;
	pthread_mutex_unlock(&t->lock);
	return n;
}

void mtlz_offsets_drop(mtlz_offsets *t, int32_t p)
{
	pthread_mutex_lock(&t->lock);
	for (size_t i = 0; i < t->n_parts; i++) {
		if (t->parts[i].p != p)
			continue;
		free(t->parts[i].ring);
		t->parts[i] = t->parts[--t->n_parts];
		break;
	}
	pthread_mutex_unlock(&t->lock);
}
