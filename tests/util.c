/*
 * util.c - see util.h.
 */
#define _GNU_SOURCE
#include "util.h"
#include "model.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

void tu_mkdtemp(char *dir, size_t size, const char *tag)
{
	snprintf(dir, size, "/tmp/mtlz_%s_XXXXXX", tag);
	cr_assert_not_null(mkdtemp(dir), "mkdtemp %s", dir);
}

void tu_rmtree(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	char p[512];

	if (!d)
		return;
	while ((e = readdir(d))) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
		unlink(p);
	}
	closedir(d);
	rmdir(dir);
}

struct mtlz_model *tu_small_model(uint64_t seed)
{
	mtlz_arch a;
	mtlz_grid g;
	mtlz_model *m;
	char err[256];

	mtlz_arch_default(&a);
	mtlz_grid_default(&g);
	a.channels[0] = 4;
	a.channels[1] = 8;
	a.channels[2] = 8;
	a.channels[3] = 16;
	a.channels[4] = 16;
	a.attention_reduction = 4;
	a.hidden[0] = 16;
	a.hidden[1] = 8;
	a.dropout = 0.2f;
	m = mtlz_model_new_random(&a, &g, seed, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_init_he(m, seed);
	return m;
}

int tu_run(const char *dir, char **out, char **err, const char *fmt, ...)
{
	char cmd[8192], path[512];
	va_list ap;
	FILE *p;
	size_t n = 0, cap = 1 << 16;
	int st, len;

	va_start(ap, fmt);
	len = vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	snprintf(path, sizeof(path), "%s/stderr", dir);
	cr_assert(len > 0 && (size_t)len + strlen(path) + 3 < sizeof(cmd), "command too long");
	strcat(cmd, " 2>");
	strcat(cmd, path);
	free(*out);
	*out = malloc(cap);
	p = popen(cmd, "r");
	cr_assert_not_null(p);
	while (!feof(p)) {
		if (n + 4096 > cap)
			*out = realloc(*out, cap *= 2);
		n += fread(*out + n, 1, 4096, p);
	}
	(*out)[n] = '\0';
	st = pclose(p);
	free(*err);
	*err = calloc(1, 1 << 16);
	p = fopen(path, "r");
	if (p) {
		size_t r = fread(*err, 1, (1 << 16) - 1, p);

		(*err)[r] = '\0';
		fclose(p);
	}
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
