/*
 * archive.h - a training archive: a directory of Avro object-container
 * files (*.avro) of mtlz.LabelledSpectrum records
 * (schemas/labelled_spectrum.avsc), written by `mtlz archive`, `mtlz import`
 * and `mtlz synth`, read by the trainer and by mtlz-replay. Readers stream
 * record by record, file by file in name order; nothing holds a whole
 * archive in memory. Any Avro reader (Python avro, fastavro) reads the files.
 */
#ifndef MTLZ_ARCHIVE_H
#define MTLZ_ARCHIVE_H

#include "avro_io.h"
#include "labels.h"
#include "spectrum.h"

#include <stddef.h>
#include <stdint.h>

typedef struct mtlz_archive_writer mtlz_archive_writer;

/* Creates dir if needed and writes <dir>/<prefix>-00000.avro, -00001, ...
 * with at most per_file records each (0: one file), codec "deflate" or
 * "null". Refuses a dir that already holds <prefix>-*.avro files. Each file
 * appears under its name only once complete. */
mtlz_archive_writer *mtlz_archive_writer_open(mtlz_avro *a, const char *dir,
					      const char *prefix, size_t per_file,
					      const char *codec, char *errstr,
					      size_t errstr_size);
int mtlz_archive_writer_add(mtlz_archive_writer *w, const mtlz_spectrum *s,
			    const mtlz_labels *labels, char *errstr, size_t errstr_size);
uint64_t mtlz_archive_writer_count(const mtlz_archive_writer *w);
/* Completes the last file; frees w in every case. */
int mtlz_archive_writer_close(mtlz_archive_writer *w, char *errstr, size_t errstr_size);
/* Removes the incomplete file (complete ones stay); frees w. */
void mtlz_archive_writer_abort(mtlz_archive_writer *w);

typedef int (*mtlz_archive_fn)(void *opaque, const mtlz_spectrum *s,
			       const mtlz_labels *labels);

/* Streams every record of every path: an .avro file, or a directory whose
 * *.avro files are read in name order (not recursive). Plain spectrum
 * files give labels = NULL. Stops at the first error (naming the file and
 * record) or when fn returns non-zero (returned). */
int mtlz_archive_read(mtlz_avro *a, char *const *paths, int n_paths, mtlz_archive_fn fn,
		      void *opaque, char *errstr, size_t errstr_size);

/* The .avro files of path (itself, or a directory's, sorted); *n files. */
int mtlz_archive_files(const char *path, char ***files, int *n, char *errstr,
		       size_t errstr_size);
void mtlz_archive_files_free(char **files, int n);

#endif
