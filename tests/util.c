/*
 * util.c - see util.h.
 */
#define _GNU_SOURCE
#include "util.h"
#include "archive.h"
#include "common.h"
#include "model.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <math.h>
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
	cr_assert_not_null(*out);
	p = popen(cmd, "r");
	cr_assert_not_null(p);
	while (!feof(p) && !ferror(p)) {
		if (n + 4096 > cap) {
			*out = realloc(*out, cap *= 2);
			cr_assert_not_null(*out);
		}
		n += fread(*out + n, 1, 4096, p);
	}
	(*out)[n] = '\0';
	st = pclose(p);
	free(*err);
	*err = calloc(1, 1 << 16);
	cr_assert_not_null(*err);
	p = fopen(path, "r");
	if (p) {
		size_t r = fread(*err, 1, (1 << 16) - 1, p);

		(*err)[r] = '\0';
		fclose(p);
	}
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

void tu_write_archive(const struct tu_archive *o)
{
	static const double line[4] = { 0, 6563, 5007, 6584 };
	static const int pattern[6] = { 0, 1, 2, 1, 3, 1 };   /* half star-forming */
	char err[512];
	mtlz_avro *a = mtlz_avro_new(MTLZ_SOURCE_DIR "/schemas", NULL, err, sizeof(err));
	mtlz_archive_writer *w;
	mtlz_rng r;

	cr_assert_not_null(a, "%s", err);
	w = mtlz_archive_writer_open(a, o->path, "part", 0, "deflate", err, sizeof(err));
	cr_assert_not_null(w, "%s", err);
	mtlz_rng_seed(&r, o->seed);
	for (int i = 0; i < o->n; i++) {
		const int c = pattern[i % 6];
		const double oh = 8.3 + 0.6 * mtlz_rng_uniform(&r);
		const double slope = o->tilt ? 0.5 * (mtlz_rng_uniform(&r) - 0.5) : 0;
		mtlz_spectrum s;
		mtlz_labels l;

		mtlz_spectrum_init(&s);
		cr_assert_eq(mtlz_spectrum_alloc(&s, 2700, 0, 0, 0), 0);
		s.grid_kind = MTLZ_GRID_LINEAR;
		s.start = 3800;
		s.step = 2;
		snprintf(s.spec_id, sizeof(s.spec_id), "%s%d", o->id_prefix, i);
		snprintf(s.survey, sizeof(s.survey), "test");
		for (size_t k = 0; k < s.n; k++) {
			const double wl = s.start + s.step * (double)k;
			double f = 1 + slope * (wl - 6400) / 2600 +
				   o->noise * (mtlz_rng_uniform(&r) - 0.5);

			if (c)
				f += o->line * exp(-0.5 * pow((wl - line[c]) / 4, 2));
			if (c == 1)   /* [N II]/Ha grows with O/H */
				f += 3.0 * (oh - 8.2) * exp(-0.5 * pow((wl - 4861) / 10, 2));
			s.flux[k] = (float)f;
		}
		mtlz_labels_init(&l);
		l.cls = c;
		if (c == 1)
			l.oh = oh;
		snprintf(l.source_name, sizeof(l.source_name), "test");
		cr_assert_eq(mtlz_archive_writer_add(w, &s, &l, err, sizeof(err)), 0, "%s", err);
		mtlz_spectrum_clear(&s);
	}
	cr_assert_eq(mtlz_archive_writer_close(w, err, sizeof(err)), 0, "%s", err);
	mtlz_avro_free(a);
}

void tu_run_cleanup(const char *dir, char **out, char **err)
{
	char cmd[300];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	cr_assert_eq(system(cmd), 0);
	free(*out);
	free(*err);
	*out = *err = NULL;
}
