/*
 * archive.c - training archives: directories of labelled-spectrum Avro
 * container files (archive.h).
 */
#define _POSIX_C_SOURCE 200809L
#include "archive.h"
#include "common.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

struct mtlz_archive_writer {
	mtlz_avro *a;
	char *dir, *prefix, *codec;
	size_t per_file;
	int file_no;
	mtlz_avro_writer *cur;
	uint64_t count;
};

static int ends_with(const char *s, const char *suffix)
{
	const size_t n = strlen(s), m = strlen(suffix);

	return n >= m && strcmp(s + n - m, suffix) == 0;
}

mtlz_archive_writer *mtlz_archive_writer_open(mtlz_avro *a, const char *dir,
					      const char *prefix, size_t per_file,
					      const char *codec, char *errstr,
					      size_t errstr_size)
{
	mtlz_archive_writer *w;
	struct dirent *de;
	DIR *d;

	if (mkdir(dir, 0777) && errno != EEXIST) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", dir, strerror(errno));
		return NULL;
	}
	d = opendir(dir);
	if (!d) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", dir, strerror(errno));
		return NULL;
	}
	while ((de = readdir(d))) {
		if (strncmp(de->d_name, prefix, strlen(prefix)) == 0 &&
		    de->d_name[strlen(prefix)] == '-' && ends_with(de->d_name, ".avro")) {
			mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				 "%s already holds an archive (%s): choose another directory "
				 "or remove it", dir, de->d_name);
			closedir(d);
			return NULL;
		}
	}
	closedir(d);
	w = calloc(1, sizeof(*w));
	if (w) {
		w->dir = strdup(dir);
		w->prefix = strdup(prefix);
		w->codec = strdup(codec ? codec : "deflate");
	}
	if (!w || !w->dir || !w->prefix || !w->codec) {
		mtlz_archive_writer_abort(w);
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	w->a = a;
	w->per_file = per_file;
	return w;
}

int mtlz_archive_writer_add(mtlz_archive_writer *w, const mtlz_spectrum *s,
			    const mtlz_labels *labels, char *errstr, size_t errstr_size)
{
	int rc;

	if (w->cur && w->per_file && mtlz_avro_writer_records(w->cur) >= w->per_file) {
		rc = mtlz_avro_writer_close(w->cur, errstr, errstr_size);
		w->cur = NULL;
		if (rc)
			return rc;
	}
	if (!w->cur) {
		char path[4096];

		snprintf(path, sizeof(path), "%s/%s-%05d.avro", w->dir, w->prefix, w->file_no++);
		w->cur = mtlz_avro_writer_open(w->a, path, w->codec, 1, errstr, errstr_size);
		if (!w->cur)
			return MTLZ_ERR_IO;
	}
	rc = mtlz_avro_writer_append(w->cur, s, labels, errstr, errstr_size);
	if (!rc)
		w->count++;
	return rc;
}

uint64_t mtlz_archive_writer_count(const mtlz_archive_writer *w)
{
	return w->count;
}

int mtlz_archive_writer_close(mtlz_archive_writer *w, char *errstr, size_t errstr_size)
{
	int rc = MTLZ_OK;

	if (w->cur)
		rc = mtlz_avro_writer_close(w->cur, errstr, errstr_size);
	w->cur = NULL;
	mtlz_archive_writer_abort(w);
	return rc;
}

void mtlz_archive_writer_abort(mtlz_archive_writer *w)
{
	if (!w)
		return;
	mtlz_avro_writer_abort(w->cur);
	free(w->dir);
	free(w->prefix);
	free(w->codec);
	free(w);
}

static int cmp_str(const void *x, const void *y)
{
	return strcmp(*(char *const *)x, *(char *const *)y);
}

void mtlz_archive_files_free(char **files, int n)
{
	for (int i = 0; i < n; i++)
		free(files[i]);
	free(files);
}

int mtlz_archive_files(const char *path, char ***files, int *n, char *errstr,
		       size_t errstr_size)
{
	struct stat st;
	struct dirent *de;
	char **v = NULL;
	int cnt = 0, cap = 0;
	DIR *d;

	*files = NULL;
	*n = 0;
	if (stat(path, &st))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path, strerror(errno));
	if (!S_ISDIR(st.st_mode)) {
		v = malloc(sizeof(*v));
		if (!v || !(v[0] = strdup(path))) {
			free(v);
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		}
		*files = v;
		*n = 1;
		return MTLZ_OK;
	}
	d = opendir(path);
	if (!d)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO, "%s: %s", path, strerror(errno));
	while ((de = readdir(d))) {
		char *p;

		if (de->d_name[0] == '.' || !ends_with(de->d_name, ".avro"))
			continue;
		if (cnt == cap) {
			char **nv = realloc(v, (size_t)(cap = cap ? 2 * cap : 16) * sizeof(*v));

			if (!nv)
				goto out_nomem;
			v = nv;
		}
		p = malloc(strlen(path) + strlen(de->d_name) + 2);
		if (!p)
			goto out_nomem;
		sprintf(p, "%s/%s", path, de->d_name);
		v[cnt++] = p;
	}
	closedir(d);
	if (cnt)
		qsort(v, (size_t)cnt, sizeof(*v), cmp_str);
	*files = v;
	*n = cnt;
	return MTLZ_OK;

out_nomem:
	closedir(d);
	mtlz_archive_files_free(v, cnt);
	return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
}

int mtlz_archive_read(mtlz_avro *a, char *const *paths, int n_paths, mtlz_archive_fn fn,
		      void *opaque, char *errstr, size_t errstr_size)
{
	for (int i = 0; i < n_paths; i++) {
		char **files;
		int n, rc;

		rc = mtlz_archive_files(paths[i], &files, &n, errstr, errstr_size);
		if (rc)
			return rc;
		if (n == 0) {
			mtlz_archive_files_free(files, n);
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_IO,
					"%s: no .avro files in this directory", paths[i]);
		}
		for (int k = 0; k < n && !rc; k++)
			rc = mtlz_avro_read_archive_file(a, files[k], fn, opaque, errstr,
							 errstr_size);
		mtlz_archive_files_free(files, n);
		if (rc)
			return rc;
	}
	return MTLZ_OK;
}
