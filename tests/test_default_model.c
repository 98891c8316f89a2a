/*
 * test_default_model.c - the default model (core/conf.h mtlz_default_model):
 * `mtlz classify` without --model and mtlzd with an empty model.path take
 * $MTLZ_MODEL, else the installed, else the source tree's
 * models/default.safetensors, and say which; a bogus $MTLZ_MODEL is an error
 * naming the path, never a silent fallback. Also checks the shipped default
 * model itself: it loads, carries its training manifest and classifies a
 * real spectrum.
 */
#include "common.h"
#include "conf.h"
#include "model.h"
#include "util.h"

#include <criterion/criterion.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define MTLZ MTLZ_BIN_DIR "/mtlz"
#define MTLZD MTLZ_BIN_DIR "/../daemon/mtlzd"
#define SHIPPED MTLZ_SOURCE_DIR "/models/default.safetensors"
#define SPEC MTLZ_TEST_DATA "/spec-0266-51602-0001.fits"

static char tmpdir[256], model[300], conf_path[300];
static char *out_buf, *err_buf;

/* a shell command; stdout in out_buf, stderr in err_buf; the exit code */
#define run(...) tu_run(tmpdir, &out_buf, &err_buf, __VA_ARGS__)

static void setup(void)
{
	FILE *f;

	snprintf(tmpdir, sizeof(tmpdir), "/tmp/mtlz-test-default-XXXXXX");
	cr_assert_not_null(mkdtemp(tmpdir));
	snprintf(model, sizeof(model), "%s/m.safetensors", tmpdir);
	cr_assert_eq(run(MTLZ " init -o %s --seed 3", model), 0, "%s", err_buf);
	/* a daemon configuration without a model key */
	snprintf(conf_path, sizeof(conf_path), "%s/mtlzd.yaml", tmpdir);
	f = fopen(conf_path, "w");
	cr_assert_not_null(f);
	fputs("kafka:\n  brokers: \"localhost:9\"\nbatch:\n  max_size: 8\n", f);
	fclose(f);
	unsetenv("MTLZ_MODEL");
}

static void teardown(void)
{
	tu_run_cleanup(tmpdir, &out_buf, &err_buf);
	unsetenv("MTLZ_MODEL");
}

TestSuite(default_model, .init = setup, .fini = teardown, .timeout = 300);

static int count_lines(const char *s)
{
	int n = 0;

	for (; *s; s++)
		n += *s == '\n';
	return n;
}

/* ---- the lookup itself ---------------------------------------------------- */

Test(default_model, lookup_prefers_env_then_installed_then_source)
{
	char path[4096], err[1024];
	const char *from = NULL;

	setenv("MTLZ_MODEL", model, 1);
	cr_assert_eq(mtlz_default_model(path, sizeof(path), &from, err, sizeof(err)),
		     MTLZ_OK, "%s", err);
	cr_assert_str_eq(path, model);
	cr_assert_str_eq(from, "$MTLZ_MODEL");

	/* empty = not set */
	setenv("MTLZ_MODEL", "", 1);
	cr_assert_eq(mtlz_default_model(path, sizeof(path), &from, err, sizeof(err)),
		     MTLZ_OK, "%s", err);
	cr_assert(strcmp(from, "installed") == 0 || strcmp(from, "source tree") == 0, "%s", from);
	cr_assert_not_null(strstr(path, "default.safetensors"), "%s", path);
	if (strcmp(from, "source tree") == 0)
		cr_assert_str_eq(path, SHIPPED);

	setenv("MTLZ_MODEL", "/nonexistent/dir/bogus.safetensors", 1);
	cr_assert_eq(mtlz_default_model(path, sizeof(path), &from, err, sizeof(err)),
		     MTLZ_ERR_IO);
	cr_assert_not_null(strstr(err, "MTLZ_MODEL=/nonexistent/dir/bogus.safetensors"), "%s", err);

	setenv("MTLZ_MODEL", tmpdir, 1);   /* a directory */
	cr_assert_eq(mtlz_default_model(path, sizeof(path), &from, err, sizeof(err)),
		     MTLZ_ERR_IO);
	cr_assert_not_null(strstr(err, tmpdir), "%s", err);
}

Test(default_model, conf_resolve_keeps_an_explicit_path)
{
	mtlz_conf c;
	char err[1024];
	const char *from = NULL;

	mtlz_conf_init(&c);
	setenv("MTLZ_MODEL", model, 1);
	cr_assert_eq(mtlz_conf_resolve_model(&c, &from, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_str_eq(c.model_path, model);
	cr_assert_str_eq(from, "$MTLZ_MODEL");
	cr_assert_eq(mtlz_conf_set(&c, "model.path=/m/explicit.safetensors", err, sizeof(err)),
		     MTLZ_OK, "%s", err);
	setenv("MTLZ_MODEL", "/nonexistent/bogus.safetensors", 1);
	cr_assert_eq(mtlz_conf_resolve_model(&c, &from, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_str_eq(c.model_path, "/m/explicit.safetensors");
	cr_assert_str_eq(from, "model.path");
	mtlz_conf_free(&c);
}

/* ---- mtlz classify ---------------------------------------------------------- */

Test(default_model, classify_without_model_uses_env_and_says_so)
{
	cr_assert_eq(run("MTLZ_MODEL=%s " MTLZ " classify --mc 0 " SPEC, model), 0, "%s", err_buf);
	cr_assert_eq(count_lines(out_buf), 2, "%s", out_buf);
	cr_assert_not_null(strstr(err_buf, "default model"), "%s", err_buf);
	cr_assert_not_null(strstr(err_buf, model), "%s", err_buf);
	cr_assert_not_null(strstr(err_buf, "$MTLZ_MODEL"), "%s", err_buf);
}

Test(default_model, classify_without_model_or_env_uses_shipped_model)
{
	cr_assert_eq(run("env -u MTLZ_MODEL " MTLZ " classify --mc 10 --format jsonl " SPEC),
		     0, "%s", err_buf);
	cr_assert_eq(count_lines(out_buf), 1, "%s", out_buf);
	cr_assert_not_null(strstr(err_buf, "default model"), "%s", err_buf);
	cr_assert_not_null(strstr(err_buf, "models/default.safetensors"), "%s", err_buf);
	cr_assert(strstr(err_buf, "(from installed)") || strstr(err_buf, "(from source tree)"),
		  "%s", err_buf);
	cr_assert_not_null(strstr(out_buf, "\"class\":\""), "%s", out_buf);
}

Test(default_model, classify_bogus_env_is_an_error_naming_the_path)
{
	cr_assert_eq(run("MTLZ_MODEL=/nonexistent/dir/bogus.safetensors " MTLZ
			 " classify --mc 0 " SPEC), 1);
	cr_assert_not_null(strstr(err_buf, "MTLZ_MODEL=/nonexistent/dir/bogus.safetensors"),
			   "%s", err_buf);
	cr_assert_eq(out_buf[0], '\0', "%s", out_buf);
	/* an explicit --model wins over the environment */
	cr_assert_eq(run("MTLZ_MODEL=/nonexistent/dir/bogus.safetensors " MTLZ
			 " classify --mc 0 --model %s " SPEC, model), 0, "%s", err_buf);
	cr_assert_null(strstr(err_buf, "default model"), "%s", err_buf);
}

/* ---- mtlzd ---------------------------------------------------------------- */

Test(default_model, daemon_config_without_model_key_picks_default)
{
	char want[600];

	cr_assert_eq(run("MTLZ_MODEL=%s " MTLZD " --config %s --check-config", model, conf_path),
		     0, "%s", err_buf);
	snprintf(want, sizeof(want), "path: \"%s\"", model);
	cr_assert(strstr(out_buf, want) || strstr(out_buf, model), "%s", out_buf);
	cr_assert_not_null(strstr(err_buf, "default model"), "%s", err_buf);
	cr_assert_not_null(strstr(err_buf, "$MTLZ_MODEL"), "%s", err_buf);

	cr_assert_eq(run("env -u MTLZ_MODEL " MTLZD " --config %s --check-config", conf_path),
		     0, "%s", err_buf);
	cr_assert_not_null(strstr(out_buf, "models/default.safetensors"), "%s", out_buf);
	cr_assert(strstr(err_buf, "(from installed)") || strstr(err_buf, "(from source tree)"),
		  "%s", err_buf);

	/* model.path set: kept, nothing said about a default */
	cr_assert_eq(run("MTLZ_MODEL=/nonexistent/bogus.safetensors " MTLZD
			 " --config %s --set model.path=%s --check-config", conf_path, model),
		     0, "%s", err_buf);
	cr_assert_null(strstr(err_buf, "default model"), "%s", err_buf);

	/* the reference configuration has no model either */
	cr_assert_eq(run("MTLZ_MODEL=%s " MTLZD " --config " MTLZ_SOURCE_DIR
			 "/etc/mtlzd.yaml --check-config", model), 0, "%s", err_buf);
	cr_assert_not_null(strstr(out_buf, model), "%s", out_buf);
}

Test(default_model, daemon_bogus_env_is_an_error_naming_the_path)
{
	cr_assert_eq(run("MTLZ_MODEL=/nonexistent/dir/bogus.safetensors " MTLZD
			 " --config %s --check-config", conf_path), 2);
	cr_assert_not_null(strstr(err_buf, "MTLZ_MODEL=/nonexistent/dir/bogus.safetensors"),
			   "%s", err_buf);
}

Test(default_model, daemon_logs_the_default_model_it_loads)
{
	/* start with no broker reachable: the model loads (and is logged)
	 * before Kafka is contacted; stop it right after */
	cr_assert_eq(run("(MTLZ_MODEL=%s timeout -s TERM 3 " MTLZD " --config %s "
			 "--set log.level=info; true)", model, conf_path), 0);
	cr_assert_not_null(strstr(err_buf, "event=default_model"), "%s", err_buf);
	cr_assert_not_null(strstr(err_buf, model), "%s", err_buf);
}

/* ---- the shipped model ------------------------------------------------------ */

Test(default_model, shipped_model_is_trained_and_small)
{
	struct stat st;
	char err[1024];
	mtlz_model *m;

	cr_assert_eq(stat(SHIPPED, &st), 0, SHIPPED " is missing");
	cr_assert_lt(st.st_size, 4 << 20, "%lld bytes", (long long)st.st_size);
	m = mtlz_model_load(SHIPPED, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	cr_assert_not_null(mtlz_model_meta(m, "mtlz.training"),
			   "the default model carries its training manifest");
	mtlz_model_free(m);
}
