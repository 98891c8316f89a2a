/*
 * log.h - one-line, key=value logging to stderr.
 *
 * mtlz_log() checks the level before it formats anything (as Redis
 * serverLog does), so a disabled debug line costs one comparison.
 * @locality any thread; each line is written with one fputs (atomic for
 * stderr lines shorter than PIPE_BUF).
 */
#ifndef MTLZ_LOG_H
#define MTLZ_LOG_H

enum mtlz_log_level {
	MTLZ_LOG_DEBUG = 0,
	MTLZ_LOG_INFO = 1,
	MTLZ_LOG_WARN = 2,
	MTLZ_LOG_ERROR = 3,
};

extern int mtlz_log_level;
/* Nonzero: every line starts with ts=<UTC ISO 8601, milliseconds>. Off by
 * default (the tools' lines); mtlzd turns it on (log.timestamps). */
extern int mtlz_log_timestamps;

/* Parses "debug", "info", "warn" or "error"; returns -1 if unknown. */
int mtlz_log_level_parse(const char *s);

void mtlz_log_raw(int level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#define mtlz_log(level, ...)                                                   \
	do {                                                                   \
		if ((level) >= mtlz_log_level)                                 \
			mtlz_log_raw((level), __VA_ARGS__);                    \
	} while (0)

#endif
