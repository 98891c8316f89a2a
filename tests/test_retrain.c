/*
 * test_retrain.c - the training loop end to end (core/retrain.h) on a small
 * archive written by the test:
 *   - a short run learns: held-out accuracy clearly above chance and a
 *     metallicity error clearly below the labels' spread;
 *   - stop (as SIGINT does) mid-epoch, resume from the checkpoint: the final
 *     parameters are bit-identical to an uninterrupted run;
 *   - the manifest lands in the model's metadata (with the --init model's
 *     SHA-256, the trainer's provenance line, and null test metrics when the
 *     split leaves no test spectra); a plain model is refused as a
 *     checkpoint.
 */
#define _GNU_SOURCE
#include "archive.h"
#include "common.h"
#include "model.h"
#include "retrain.h"
#include "util.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char dir[64], archive[128], init[128];
static char err[1024];

/* the trainer's test data: strong lines, a little noise, tilted continua */
static void write_archive(int n)
{
	const struct tu_archive o = { archive, "t", n, 77, 1.5, 0.05, 1 };

	tu_write_archive(&o);
}

/* A small model (the paper's layout, fewer channels) to start from. */
static void write_init(void)
{
	mtlz_model *m = tu_small_model(5);

	cr_assert_eq(mtlz_model_save(m, init, err, sizeof(err)), 0, "%s", err);
	mtlz_model_free(m);
}

static void setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/mtlz-test-retrain-XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
	snprintf(archive, sizeof(archive), "%s/archive", dir);
	snprintf(init, sizeof(init), "%s/init.safetensors", dir);
}

static void teardown(void)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (!getenv("MTLZ_TEST_KEEP"))
		cr_assert_eq(system(cmd), 0);
}

TestSuite(retrain, .init = setup, .fini = teardown, .timeout = 600);

static void opts(mtlz_retrain_opts *o, char **data, const char *out, int epochs)
{
	mtlz_retrain_opts_default(o);
	o->data = data;
	o->n_data = 1;
	o->out = out;
	o->init = init;
	o->epochs = epochs;
	o->batch = 16;
	o->threads = 2;
	o->seed = 9;
	o->schema_dir = MTLZ_SOURCE_DIR "/schemas";
}

Test(retrain, a_short_run_learns)
{
	char out[160];
	char *data[1] = { archive };
	mtlz_retrain_opts o;
	mtlz_retrain_result *res = calloc(1, sizeof(*res));
	mtlz_model *m;
	const char *man;

	write_archive(240);
	write_init();
	snprintf(out, sizeof(out), "%s/model.safetensors", dir);
	opts(&o, data, out, 30);
	cr_assert_eq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(res->epochs_done, 30);
	cr_assert_eq(res->n_train + res->n_val + res->n_test, 240);
	cr_assert_eq(res->n_test, 48, "6:2:2 within each class: 8 + 24 + 8 + 8 in test");
	/* chance is 0.5 (always star-forming); the labels' spread is
	 * 0.6 / sqrt(12) = 0.173 dex */
	cr_assert_gt(res->test_accuracy, 0.8, "test accuracy %.3f", res->test_accuracy);
	cr_assert_lt(res->test_oh_sd, 0.09, "metallicity SD %.3f dex (half the spread)", res->test_oh_sd);
	cr_assert_lt(res->log[29].train_cls, res->log[0].train_cls, "the class loss falls");
	cr_assert_lt(res->log[29].train_metal, res->log[0].train_metal, "the metal loss falls");
	m = mtlz_model_load(out, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	man = mtlz_model_meta(m, "mtlz.training");
	cr_assert(man && strstr(man, "\"sha256\"") && strstr(man, "\"epochs_done\":30"),
		  "manifest: %s", man ? man : "(none)");
	cr_assert_null(mtlz_model_meta(m, "mtlz.checkpoint"));
	mtlz_model_free(m);
	/* mtlz eval on the whole archive: JSON with the contract's keys; the
	 * trained model is right on (nearly) all of it */
	{
		char cmd[1024], path[200];
		json_error_t je;
		json_t *j, *oh;

		snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz eval --model %s --data %s --mc 10 "
			 "--report %s/report > %s/eval.json 2>%s/eval.log", out, archive, dir, dir, dir);
		cr_assert_eq(system(cmd), 0, "mtlz eval (see %s/eval.log)", dir);
		snprintf(path, sizeof(path), "%s/eval.json", dir);
		j = json_load_file(path, 0, &je);
		cr_assert_not_null(j, "%s: %s", path, je.text);
		cr_assert_eq(json_integer_value(json_object_get(j, "n")), 240);
		cr_assert_gt(json_number_value(json_object_get(j, "accuracy")), 0.8);
		cr_assert(json_is_number(json_object_get(j, "f1_macro")));
		cr_assert_eq(json_array_size(json_object_get(j, "confusion")), 4);
		oh = json_object_get(j, "oh");
		cr_assert_eq(json_integer_value(json_object_get(oh, "n")), 120);
		cr_assert_lt(json_number_value(json_object_get(oh, "sd")), 0.09);
		cr_assert(json_is_number(json_object_get(oh, "bias")) &&
			  json_is_number(json_object_get(oh, "mae")));
		json_decref(j);
		snprintf(cmd, sizeof(cmd), "test -s %s/report/metrics.json && grep -q '^accuracy' "
			 "%s/report/report.md", dir, dir);
		cr_assert_eq(system(cmd), 0, "the report folder");
	}
	free(res);
}

/* --init and a split with no test part (0.75 / 0.25): the manifest names the
 * init model by its SHA-256, the provenance is the trainer's own line, and
 * the test metrics are null rather than a fake 0 */
Test(retrain, manifest_names_the_init_model_and_has_no_fake_test_metrics)
{
	char out[160], hex[65];
	char *data[1] = { archive };
	mtlz_retrain_opts o;
	mtlz_retrain_result *res = calloc(1, sizeof(*res));
	mtlz_model *m;
	const char *man, *prov;
	json_error_t je;
	json_t *j, *fin;

	write_archive(80);
	write_init();
	cr_assert_eq(mtlz_sha256_file(init, hex, err, sizeof(err)), 0, "%s", err);
	snprintf(out, sizeof(out), "%s/model.safetensors", dir);
	opts(&o, data, out, 1);
	o.frac_train = 0.75;
	o.frac_val = 0.25;
	cr_assert_eq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(res->n_test, 0);
	cr_assert_eq(res->n_train + res->n_val, 80);
	m = mtlz_model_load(out, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	man = mtlz_model_meta(m, "mtlz.training");
	cr_assert_not_null(man);
	j = json_loads(man, 0, &je);
	cr_assert_not_null(j, "manifest: %s", je.text);
	cr_assert_str_eq(json_string_value(json_object_get(j, "init")), init);
	cr_assert_str_eq(json_string_value(json_object_get(j, "init_sha256")), hex);
	fin = json_object_get(j, "final");
	cr_assert(json_is_object(fin), "manifest: %s", man);
	cr_assert(json_is_null(json_object_get(fin, "test_accuracy")), "manifest: %s", man);
	cr_assert(json_is_null(json_object_get(fin, "test_oh_sd")), "manifest: %s", man);
	cr_assert_eq(json_integer_value(json_object_get(fin, "test_n")), 0);
	json_decref(j);
	prov = mtlz_model_meta(m, "mtlz.provenance");
	cr_assert(prov && strncmp(prov, "trained by mtlz-retrain", 23) == 0 && strstr(prov, init),
		  "provenance: %s", prov ? prov : "(none)");
	mtlz_model_free(m);
	free(res);
}

static void stop_at(void *opaque, const mtlz_progress *p)
{
	volatile sig_atomic_t *stop = opaque;

	if (p->epoch == 2 && p->batch == 2 && !p->epoch_done)
		*stop = 1;
}

Test(retrain, stop_and_resume_gives_the_same_model)
{
	char a[160], b[160], ck[160];
	char *data[1] = { archive };
	mtlz_retrain_opts o;
	mtlz_retrain_result *res = calloc(1, sizeof(*res));
	volatile sig_atomic_t stop = 0;
	mtlz_model *ma, *mb;

	write_archive(80);
	write_init();
	snprintf(a, sizeof(a), "%s/a.safetensors", dir);
	snprintf(b, sizeof(b), "%s/b.safetensors", dir);
	snprintf(ck, sizeof(ck), "%s/b.ckpt", dir);
	opts(&o, data, a, 3);
	cr_assert_eq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0, "%s", err);
	/* the same run, stopped in epoch 2 after batch 2 (of 3), then resumed */
	opts(&o, data, b, 3);
	o.checkpoint = ck;
	o.stop = &stop;
	o.progress = stop_at;
	o.opaque = (void *)&stop;
	cr_assert_eq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(res->stopped, 1);
	cr_assert_eq(res->epochs_done, 1);
	stop = 0;
	opts(&o, data, b, 3);
	o.checkpoint = ck;
	o.resume = ck;
	cr_assert_eq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0, "%s", err);
	cr_assert_eq(res->epochs_done, 3);
	ma = mtlz_model_load(a, err, sizeof(err));
	mb = mtlz_model_load(b, err, sizeof(err));
	cr_assert(ma && mb, "%s", err);
	for (size_t i = 0; i < mtlz_model_n_tensors(ma); i++) {
		const mtlz_tensor *ta = mtlz_model_tensor(ma, i), *tb = mtlz_model_tensor(mb, i);

		cr_assert_eq(memcmp(ta->data, tb->data, ta->n * sizeof(float)), 0,
			     "%s differs after stop + resume", ta->name);
	}
	mtlz_model_free(ma);
	mtlz_model_free(mb);
	/* a model is not a checkpoint */
	opts(&o, data, b, 3);
	o.resume = a;
	cr_assert_neq(mtlz_retrain_run(&o, res, err, sizeof(err)), 0);
	cr_assert(strstr(err, "not a checkpoint"), "%s", err);
	free(res);
}

/* The command line: SIGINT writes a checkpoint and exits 0, --resume
 * finishes the run; a bad configuration key exits 2 naming file and line. */
Test(retrain, cli_sigint_checkpoints_and_resume_finishes)
{
	char cmd[1024], out[160], log[160], yaml[160];
	FILE *f;
	int st;
	pid_t pid;

	write_archive(120);
	write_init();
	snprintf(out, sizeof(out), "%s/cli.safetensors", dir);
	snprintf(log, sizeof(log), "%s/cli.log", dir);
	pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		freopen(log, "w", stderr);
		execl(MTLZ_BIN_DIR "/mtlz-retrain", "mtlz-retrain", "--data", archive, "-o", out,
		      "--init", init, "--epochs", "1000", "--batch", "8", "--threads", "1",
		      (char *)NULL);
		_exit(127);
	}
	sleep(3);
	kill(pid, SIGINT);
	cr_assert_eq(waitpid(pid, &st, 0), pid);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "SIGINT: a clean exit 0");
	snprintf(cmd, sizeof(cmd), "grep -q 'checkpoint %s.ckpt' %s", out, log);
	cr_assert_eq(system(cmd), 0, "the message names the checkpoint (see %s)", log);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz-retrain --data %s -o %s --init %s "
		 "--epochs 2 --batch 8 --threads 1 --resume %s.ckpt 2>>%s", archive, out, init, out,
		 log);
	/* the interrupted run was asked for 1000 epochs; resuming with 2 ends
	 * at once if at least 2 are done, else trains up to 2 */
	cr_assert_eq(WEXITSTATUS(system(cmd)), 0, "resume (see %s)", log);
	snprintf(cmd, sizeof(cmd), "test -s %s", out);
	cr_assert_eq(system(cmd), 0, "the model was written");
	snprintf(yaml, sizeof(yaml), "%s/bad.yaml", dir);
	f = fopen(yaml, "w");
	fprintf(f, "epochs: 3\nplateau:\n  patience: x\n");
	fclose(f);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz-retrain --config %s --data %s -o %s "
		 "2>%s/bad.log", yaml, archive, out, dir);
	cr_assert_eq(WEXITSTATUS(system(cmd)), 2);
	snprintf(cmd, sizeof(cmd), "grep -q 'bad.yaml:3:13: plateau.patience' %s/bad.log", dir);
	cr_assert_eq(system(cmd), 0, "names file, line, column and key");
}

/* --precision: tf32 is for the GPU trainer, so with the CPU one it is a
 * usage error that says why and writes nothing, as is a precision that
 * does not exist */
Test(retrain, cli_precision_tf32_needs_the_cuda_trainer)
{
	char cmd[1024], out[160];

	write_archive(40);
	snprintf(out, sizeof(out), "%s/p.safetensors", dir);
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz-retrain --data %s -o %s --epochs 1 "
		 "--engine cpu --precision tf32 2>%s/p.log", archive, out, dir);
	cr_assert_eq(WEXITSTATUS(system(cmd)), 2);
	snprintf(cmd, sizeof(cmd), "grep -q 'precision tf32 needs the cuda trainer' %s/p.log", dir);
	cr_assert_eq(system(cmd), 0, "the reason is said (see %s/p.log)", dir);
	snprintf(cmd, sizeof(cmd), "test -e %s", out);
	cr_assert_neq(system(cmd), 0, "no model was written");
	snprintf(cmd, sizeof(cmd), MTLZ_BIN_DIR "/mtlz-retrain --data %s -o %s --precision bf16 "
		 "2>%s/p2.log", archive, out, dir);
	cr_assert_eq(WEXITSTATUS(system(cmd)), 2);
}
