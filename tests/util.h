/*
 * util.h - small helpers shared by the test binaries: a private temporary
 * directory per test, removed with everything in it.
 */
#ifndef MTLZ_TEST_UTIL_H
#define MTLZ_TEST_UTIL_H

#include <stddef.h>

/* Creates /tmp/mtlz_<tag>_XXXXXX into dir (asserts on failure). */
void tu_mkdtemp(char *dir, size_t size, const char *tag);
/* Removes dir and every file directly in it (test directories are flat). */
void tu_rmtree(const char *dir);

#endif
