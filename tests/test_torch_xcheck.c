/*
 * test_torch_xcheck.c - the model file and the CPU engine against PyTorch:
 * a model saved by mtlz is loaded by bench/mtlz_torch.py with
 * load_state_dict(strict=True) and run in float64 by Debian's python3-torch
 * on the preprocessed real fixtures; the engine must agree. This is the
 * independent check that the tensor names, layouts and every layer mean
 * what PyTorch means. Skipped (with the reason) when torch is missing.
 */
#include "common.h"
#include "fits_io.h"
#include "model.h"
#include "mtlz_engine.h"
#include "preprocess.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PY "/usr/bin/python3"

static int have_torch(void)
{
	return system(PY " -c 'import torch, numpy' >/dev/null 2>&1") == 0;
}

Test(torch_xcheck, engine_matches_pytorch_on_real_spectra, .timeout = 600)
{
	static const char *files[] = {
		"spec-0266-51602-0001.fits", "spec-0266-51630-0174.fits",
		"spec-0266-51602-0573.fits", "spec-3586-55181-0003.fits",
		"coadd-4-80613.fits",
	};
	char dir[] = "/tmp/mtlz-xcheck-XXXXXX", path[512], cmd[2048], err[512];
	const int L = 5161, N = 5;
	float *x = malloc((size_t)N * L * 4);
	mtlz_output out[5];
	mtlz_prep_opts po;
	mtlz_prep_ws *ws = mtlz_prep_ws_new();
	mtlz_engine_opts eo;
	mtlz_engine *e;
	mtlz_model *m;
	mtlz_arch a;
	mtlz_grid g;
	json_t *ref, *probs, *metal;
	json_error_t je;
	FILE *f;

	if (!have_torch())
		cr_skip_test("python3-torch not installed (tools/install-deps.sh installs it)");
	cr_assert_not_null(mkdtemp(dir));
	mtlz_prep_opts_default(&po);
	for (int i = 0; i < N; i++) {
		mtlz_spectra sp = { 0 };
		mtlz_prep_info info;

		snprintf(path, sizeof(path), "%s/%s", MTLZ_TEST_DATA, files[i]);
		cr_assert_eq(mtlz_fits_read(path, &sp, err, sizeof(err)), MTLZ_OK, "%s", err);
		cr_assert_eq(mtlz_preprocess(&sp.v[0], &po, ws, x + (size_t)i * L, &info,
					     err, sizeof(err)), MTLZ_OK, "%s", err);
		mtlz_spectra_free(&sp);
	}
	snprintf(path, sizeof(path), "%s/x.f32", dir);
	f = fopen(path, "wb");
	cr_assert_eq(fwrite(x, 4, (size_t)N * L, f), (size_t)N * L);
	fclose(f);

	mtlz_arch_default(&a);
	mtlz_grid_default(&g);
	m = mtlz_model_new_random(&a, &g, 2024, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_set_target(m, 8.6, 0.25);
	snprintf(path, sizeof(path), "%s/m.safetensors", dir);
	cr_assert_eq(mtlz_model_save(m, path, err, sizeof(err)), MTLZ_OK, "%s", err);

	snprintf(cmd, sizeof(cmd), PY " %s/bench/torch_reference.py --model %s/m.safetensors "
		 "--input %s/x.f32 --n %d --output %s/ref.json", MTLZ_SOURCE_DIR, dir, dir, N, dir);
	cr_assert_eq(system(cmd), 0, "%s failed", cmd);
	snprintf(path, sizeof(path), "%s/ref.json", dir);
	ref = json_load_file(path, 0, &je);
	cr_assert_not_null(ref, "%s: %s", path, je.text);
	probs = json_object_get(ref, "probs");
	metal = json_object_get(ref, "metal");
	cr_assert_eq(json_array_size(probs), (size_t)N);

	mtlz_engine_opts_default(&eo);
	eo.max_batch = N;
	e = mtlz_engine_new(&eo, err, sizeof(err));
	cr_assert_eq(mtlz_engine_set_model(e, m, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_eq(mtlz_engine_run(e, x, N, 0, out, err, sizeof(err)), MTLZ_OK, "%s", err);
	for (int i = 0; i < N; i++) {
		const double mt = json_real_value(json_array_get(metal, i));

		for (int k = 0; k < 4; k++) {
			const double p = json_real_value(json_array_get(json_array_get(probs, i), k));

			cr_assert_float_eq(out[i].prob[k], p, 1e-5, "%s p[%d]: %g vs torch %g",
					   files[i], k, (double)out[i].prob[k], p);
		}
		cr_assert_float_eq(out[i].metal, mt, 1e-5 * fabs(mt), "%s metal: %g vs torch %g",
				   files[i], (double)out[i].metal, mt);
	}
	json_decref(ref);
	mtlz_engine_free(e);
	mtlz_model_free(m);
	mtlz_prep_ws_free(ws);
	free(x);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	cr_assert_eq(system(cmd), 0);
}
