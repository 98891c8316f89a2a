/*
 * log.c - see log.h.
 */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int mtlz_log_level = MTLZ_LOG_INFO;
int mtlz_log_timestamps;

static const char *const level_names[] = { "debug", "info", "warn", "error" };

int mtlz_log_level_parse(const char *s)
{
	for (int i = 0; i < 4; i++)
		if (strcmp(s, level_names[i]) == 0)
			return i;
	return -1;
}

void mtlz_log_raw(int level, const char *fmt, ...)
{
	char line[1024];
	int n;
	va_list ap;

	if (level < 0 || level > 3)
		level = MTLZ_LOG_ERROR;
	n = 0;
	if (mtlz_log_timestamps) {
		struct timespec ts;
		struct tm tm;

		clock_gettime(CLOCK_REALTIME, &ts);
		gmtime_r(&ts.tv_sec, &tm);
		n = (int)strftime(line, sizeof(line), "ts=%Y-%m-%dT%H:%M:%S", &tm);
		n += snprintf(line + n, sizeof(line) - (size_t)n, ".%03ldZ ", ts.tv_nsec / 1000000);
	}
	n += snprintf(line + n, sizeof(line) - (size_t)n, "level=%s ", level_names[level]);
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	strcat(line, "\n");
	fputs(line, stderr);
}
