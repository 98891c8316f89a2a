/*
 * test_model.c - the model module (core/model.c): the paper's architecture,
 * its FLOP count, the PyTorch-compatible tensor layout and initialisation,
 * and the safetensors model file (round trip and every way loading must
 * refuse a file). Expected values are written out or computed here from the
 * layer shapes, never taken from the module under test.
 */
#define _GNU_SOURCE
#include "common.h"
#include "model.h"
#include "safetensors.h"
#include "util.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[64];

static void setup(void)
{
	tu_mkdtemp(tmpdir, sizeof(tmpdir), "model");
}

static void teardown(void)
{
	tu_rmtree(tmpdir);
}

TestSuite(model, .init = setup, .fini = teardown);

static void tmp_path(char *out, size_t n, const char *name)
{
	snprintf(out, n, "%s/%s", tmpdir, name);
}

static mtlz_model *paper_model(uint64_t seed)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[512] = "";
	mtlz_model *m;

	mtlz_arch_default(&a);
	mtlz_grid_default(&g);
	m = mtlz_model_new_random(&a, &g, seed, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	return m;
}

/* The 36 tensors of the PyTorch module, in state_dict order. */
static const struct {
	const char *name;
	int ndim;
	int64_t shape[3];
} expected[] = {
	{ "backbone.blocks.0.conv1.weight", 3, { 16, 1, 3 } },
	{ "backbone.blocks.0.conv1.bias", 1, { 16 } },
	{ "backbone.blocks.0.conv2.weight", 3, { 16, 16, 3 } },
	{ "backbone.blocks.0.conv2.bias", 1, { 16 } },
	{ "backbone.blocks.1.conv1.weight", 3, { 32, 16, 3 } },
	{ "backbone.blocks.1.conv1.bias", 1, { 32 } },
	{ "backbone.blocks.1.conv2.weight", 3, { 32, 32, 3 } },
	{ "backbone.blocks.1.conv2.bias", 1, { 32 } },
	{ "backbone.blocks.2.conv1.weight", 3, { 64, 32, 3 } },
	{ "backbone.blocks.2.conv1.bias", 1, { 64 } },
	{ "backbone.blocks.2.conv2.weight", 3, { 64, 64, 3 } },
	{ "backbone.blocks.2.conv2.bias", 1, { 64 } },
	{ "backbone.blocks.3.conv1.weight", 3, { 128, 64, 3 } },
	{ "backbone.blocks.3.conv1.bias", 1, { 128 } },
	{ "backbone.blocks.3.conv2.weight", 3, { 128, 128, 3 } },
	{ "backbone.blocks.3.conv2.bias", 1, { 128 } },
	{ "backbone.blocks.4.conv1.weight", 3, { 256, 128, 3 } },
	{ "backbone.blocks.4.conv1.bias", 1, { 256 } },
	{ "backbone.blocks.4.conv2.weight", 3, { 256, 256, 3 } },
	{ "backbone.blocks.4.conv2.bias", 1, { 256 } },
	{ "attention.squeeze.weight", 3, { 16, 256, 1 } },
	{ "attention.squeeze.bias", 1, { 16 } },
	{ "attention.excite.weight", 3, { 256, 16, 1 } },
	{ "attention.excite.bias", 1, { 256 } },
	{ "heads.class.fc1.weight", 2, { 128, 256 } },
	{ "heads.class.fc1.bias", 1, { 128 } },
	{ "heads.class.fc2.weight", 2, { 64, 128 } },
	{ "heads.class.fc2.bias", 1, { 64 } },
	{ "heads.class.fc3.weight", 2, { 4, 64 } },
	{ "heads.class.fc3.bias", 1, { 4 } },
	{ "heads.metal.fc1.weight", 2, { 128, 256 } },
	{ "heads.metal.fc1.bias", 1, { 128 } },
	{ "heads.metal.fc2.weight", 2, { 64, 128 } },
	{ "heads.metal.fc2.bias", 1, { 64 } },
	{ "heads.metal.fc3.weight", 2, { 1, 64 } },
	{ "heads.metal.fc3.bias", 1, { 1 } },
};

Test(model, default_arch_matches_paper)
{
	mtlz_arch a;
	mtlz_grid g;
	char err[256] = "";
	/* 5161 -> 1720 -> 573 -> 191 -> 63 -> 21 ('same' convs, pool 3, floor) */
	const int len_after[6] = { 5161, 1720, 573, 191, 63, 21 };
	const int ch[5] = { 16, 32, 64, 128, 256 };

	mtlz_arch_default(&a);
	cr_assert_eq(a.n_blocks, 5);
	for (int b = 0; b < 5; b++)
		cr_assert_eq(a.channels[b], ch[b], "channels[%d]", b);
	cr_assert_eq(a.kernel, 3);
	cr_assert_eq(a.padding, 1);
	cr_assert_eq(a.pool, 3);
	cr_assert_eq(a.attention_reduction, 16);
	cr_assert_eq(a.n_hidden, 2);
	cr_assert_eq(a.hidden[0], 128);
	cr_assert_eq(a.hidden[1], 64);
	cr_assert_eq(a.n_classes, 4);
	cr_assert_float_eq(a.dropout, 0.5f, 1e-9);
	cr_assert_eq(a.input_length, 5161);
	cr_assert_eq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK, "%s", err);

	mtlz_grid_default(&g);
	cr_assert_eq(g.wmin, 3840.0);
	cr_assert_eq(g.wmax, 9000.0);
	cr_assert_eq(g.dw, 1.0);
	cr_assert_eq(mtlz_grid_length(&g), 5161);

	for (int b = 0; b <= 5; b++)
		cr_assert_eq(mtlz_arch_length_after(&a, b), len_after[b],
			     "after block %d: %d, expected %d", b,
			     mtlz_arch_length_after(&a, b), len_after[b]);
}

Test(model, flops_match_layer_shapes)
{
	mtlz_arch a;
	double conv = 0, small = 0, f;
	int len = 5161, cin = 1;
	const int ch[5] = { 16, 32, 64, 128, 256 };

	for (int b = 0; b < 5; b++) {
		for (int c = 0; c < 2; c++) {
			conv += 2.0 * 3 * cin * ch[b] * len; /* 'same': length kept */
			cin = ch[b];
		}
		len /= 3;
	}
	/* squeeze-excite 256->16->256, then both heads */
	small = 2.0 * 256 * 16 * 2;
	small += 2.0 * (256 * 128 + 128 * 64 + 64 * 4);
	small += 2.0 * (256 * 128 + 128 * 64 + 64 * 1);
	cr_assert(fabs(conv - 110.7e6) / 110.7e6 < 1e-3, "conv FLOPs %.0f", conv);

	mtlz_arch_default(&a);
	f = mtlz_arch_flops(&a);
	cr_assert(fabs(f - (conv + small)) / (conv + small) < 1e-3,
		  "mtlz_arch_flops %.0f, expected %.0f", f, conv + small);
	cr_assert(fabs(f - 110.7e6) / 110.7e6 < 5e-3, "%.4g is not ~110.7 MFLOP", f);

	/* without attention the SE term disappears */
	a.attention_reduction = 0;
	cr_assert(fabs(mtlz_arch_flops(&a) - (f - 2.0 * 256 * 16 * 2)) < 1.0);
}

Test(model, tensors_have_pytorch_names_and_shapes)
{
	mtlz_model *m = paper_model(1);
	size_t n_params = 0;

	cr_assert_eq(MTLZ_ARRAY_SIZE(expected), 36);
	cr_assert_eq(mtlz_model_n_tensors(m), 36);
	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(expected); i++) {
		const mtlz_tensor *t = mtlz_model_tensor(m, i);
		size_t n = 1;

		cr_assert_not_null(t);
		cr_assert_str_eq(t->name, expected[i].name, "tensor %zu", i);
		cr_assert_eq(t->ndim, expected[i].ndim, "%s ndim", t->name);
		for (int d = 0; d < t->ndim; d++) {
			cr_assert_eq(t->shape[d], expected[i].shape[d], "%s dim %d: %lld",
				     t->name, d, (long long)t->shape[d]);
			n *= (size_t)expected[i].shape[d];
		}
		cr_assert_eq(t->n, n, "%s element count", t->name);
		cr_assert_not_null(t->data);
		cr_assert_eq(mtlz_model_find(m, expected[i].name), t);
		cr_assert_eq((const float *)mtlz_model_data(m, expected[i].name), t->data);
		n_params += n;
	}
	cr_assert_null(mtlz_model_tensor(m, 36));
	cr_assert_null(mtlz_model_find(m, "backbone.blocks.5.conv1.weight"));
	cr_assert_eq(mtlz_model_n_params(m), n_params, "%zu params, expected %zu",
		     mtlz_model_n_params(m), n_params);
	mtlz_model_free(m);
}

static size_t fan_in(const mtlz_tensor *w)
{
	return (size_t)w->shape[1] * (w->ndim == 3 ? (size_t)w->shape[2] : 1);
}

Test(model, random_init_follows_pytorch_default)
{
	mtlz_model *m = paper_model(7), *same = paper_model(7), *other = paper_model(8);
	const mtlz_tensor *big;
	double bound, mean = 0, var = 0;
	int differ = 0;

	for (size_t i = 0; i < mtlz_model_n_tensors(m); i += 2) {
		const mtlz_tensor *w = mtlz_model_tensor(m, i);
		const mtlz_tensor *b = mtlz_model_tensor(m, i + 1);
		size_t fi;
		int nonzero = 0;

		cr_assert_not_null(strstr(w->name, ".weight"), "%s", w->name);
		cr_assert_not_null(strstr(b->name, ".bias"), "%s", b->name);
		/* conv: Cin * k, linear: in */
		fi = w->ndim == 3 ? (size_t)expected[i].shape[1] * expected[i].shape[2] :
				    (size_t)expected[i].shape[1];
		bound = 1.0 / sqrt((double)fi);
		for (size_t j = 0; j < w->n; j++) {
			cr_assert(fabs(w->data[j]) <= bound, "%s[%zu] = %g outside +-%g",
				  w->name, j, w->data[j], bound);
			nonzero += w->data[j] != 0.0f;
		}
		for (size_t j = 0; j < b->n; j++) {
			cr_assert(fabs(b->data[j]) <= bound, "%s[%zu] = %g outside +-%g",
				  b->name, j, b->data[j], bound);
			nonzero += b->data[j] != 0.0f;
		}
		cr_assert_gt(nonzero, (int)(w->n + b->n) / 2, "%s mostly zero", w->name);
	}

	big = mtlz_model_find(m, "backbone.blocks.4.conv2.weight");
	cr_assert_eq(fan_in(big), 768);
	bound = 1.0 / sqrt(768.0);
	for (size_t j = 0; j < big->n; j++)
		mean += big->data[j];
	mean /= (double)big->n;
	for (size_t j = 0; j < big->n; j++)
		var += (big->data[j] - mean) * (big->data[j] - mean);
	var /= (double)big->n;
	cr_assert(fabs(mean) < 0.01 * bound, "mean %g", mean);
	cr_assert(fabs(var / (bound * bound / 3.0) - 1.0) < 0.05,
		  "variance %g, uniform gives %g", var, bound * bound / 3.0);

	for (size_t i = 0; i < mtlz_model_n_tensors(m); i++) {
		const mtlz_tensor *a = mtlz_model_tensor(m, i);
		const mtlz_tensor *b = mtlz_model_tensor(same, i);
		const mtlz_tensor *c = mtlz_model_tensor(other, i);

		cr_assert_eq(memcmp(a->data, b->data, a->n * sizeof(float)), 0,
			     "%s differs for the same seed", a->name);
		differ += memcmp(a->data, c->data, a->n * sizeof(float)) != 0;
	}
	cr_assert_eq(differ, (int)mtlz_model_n_tensors(m),
		     "only %d tensors change with the seed", differ);
	mtlz_model_free(m);
	mtlz_model_free(same);
	mtlz_model_free(other);
}

static void expect_same_model(const mtlz_model *a, const mtlz_model *b)
{
	double o1, s1, o2, s2;

	cr_assert_eq(memcmp(mtlz_model_arch(a), mtlz_model_arch(b), sizeof(mtlz_arch)), 0);
	cr_assert_eq(memcmp(mtlz_model_grid(a), mtlz_model_grid(b), sizeof(mtlz_grid)), 0);
	cr_assert_eq(mtlz_model_n_tensors(a), mtlz_model_n_tensors(b));
	for (size_t i = 0; i < mtlz_model_n_tensors(a); i++) {
		const mtlz_tensor *x = mtlz_model_tensor(a, i);
		const mtlz_tensor *y = mtlz_model_tensor(b, i);

		cr_assert_str_eq(x->name, y->name);
		cr_assert_eq(x->n, y->n);
		cr_assert_eq(memcmp(x->data, y->data, x->n * sizeof(float)), 0,
			     "%s not bit-exact", x->name);
	}
	mtlz_model_target(a, &o1, &s1);
	mtlz_model_target(b, &o2, &s2);
	cr_assert_eq(o1, o2);
	cr_assert_eq(s1, s2);
	for (int c = 0; c < mtlz_model_arch(a)->n_classes; c++)
		cr_assert_str_eq(mtlz_model_class_name(a, c), mtlz_model_class_name(b, c));
}

Test(model, save_load_round_trip_is_bit_exact)
{
	mtlz_model *m = paper_model(3), *l;
	char path[512], err[512] = "";
	double off, scale;
	static const char *const names[] = { "passive", "star_forming", "composite", "agn" };

	/* values with no short decimal form */
	mtlz_model_set_target(m, 8.6912345678901234, 0.1 / 3.0);
	cr_assert_eq(mtlz_model_set_meta(m, "trained_on", "DESI DR1, 2 epochs"), MTLZ_OK);
	cr_assert_eq(mtlz_model_set_meta(m, "note", "{\"json\": [1, 2]}"), MTLZ_OK);
	cr_assert_eq(mtlz_model_set_meta(m, "note", "replaced"), MTLZ_OK);
	tmp_path(path, sizeof(path), "m.safetensors");
	cr_assert_eq(mtlz_model_save(m, path, err, sizeof(err)), MTLZ_OK, "%s", err);

	l = mtlz_model_load(path, err, sizeof(err));
	cr_assert_not_null(l, "%s", err);
	expect_same_model(m, l);
	mtlz_model_target(l, &off, &scale);
	cr_assert_eq(off, 8.6912345678901234);
	cr_assert_eq(scale, 0.1 / 3.0);
	for (int c = 0; c < 4; c++)
		cr_assert_str_eq(mtlz_model_class_name(l, c), names[c]);
	cr_assert_str_eq(mtlz_model_class_name(l, 4), "?");
	cr_assert_str_eq(mtlz_model_meta(l, "trained_on"), "DESI DR1, 2 epochs");
	cr_assert_str_eq(mtlz_model_meta(l, "note"), "replaced");
	cr_assert_str_eq(mtlz_model_meta(l, "mtlz.seed"), "3");
	cr_assert_not_null(mtlz_model_meta(l, "mtlz.provenance"));
	/* managed keys are not duplicated as free-form metadata */
	cr_assert_null(mtlz_model_meta(l, "mtlz.arch"));
	cr_assert_eq(mtlz_model_n_params(l), mtlz_model_n_params(m));

	/* a second save of the loaded model loads back identically */
	{
		char path2[512];
		mtlz_model *l2;

		tmp_path(path2, sizeof(path2), "m2.safetensors");
		cr_assert_eq(mtlz_model_save(l, path2, err, sizeof(err)), MTLZ_OK, "%s", err);
		l2 = mtlz_model_load(path2, err, sizeof(err));
		cr_assert_not_null(l2, "%s", err);
		expect_same_model(m, l2);
		cr_assert_str_eq(mtlz_model_meta(l2, "trained_on"), "DESI DR1, 2 epochs");
		mtlz_model_free(l2);
	}
	mtlz_model_free(l);
	mtlz_model_free(m);
}

Test(model, save_to_unwritable_path_fails_with_message)
{
	mtlz_model *m = paper_model(1);
	char file[512], path[600], err[512] = "";

	/* a path under a regular file cannot be created, even as root */
	tmp_path(file, sizeof(file), "plain");
	fclose(fopen(file, "w"));
	snprintf(path, sizeof(path), "%s/model.safetensors", file);
	cr_assert_neq(mtlz_model_save(m, path, err, sizeof(err)), MTLZ_OK);
	cr_assert_not_null(strstr(err, path), "%s", err);
	cr_assert_eq(access(path, F_OK), -1);
	mtlz_model_free(m);
}

/* ---- variants of a saved model file, for the rejection tests ---- */

struct variant {
	const char *skip;      /* tensor left out */
	const char *extra;     /* additional tensor, 4 zeros */
	const char *swap_dims; /* tensor written with dims 1 and 2 swapped */
	const char *nan_in;    /* tensor with a NaN at element 5 */
	const char *key;       /* metadata key replaced by value ... */
	const char *value;     /* ... or removed when NULL */
};

/* Saves the paper model to `src`, then rewrites it with mtlz_st_write into
 * `dst` with the changes in `v` (metadata copied via mtlz_st_meta_at). */
static void write_variant(const char *dst, const struct variant *v)
{
	char src[512], err[512] = "";
	mtlz_model *m = paper_model(5);
	mtlz_st *st;
	mtlz_st_out out[64];
	const char *keys[64], *vals[64];
	size_t n = 0, n_meta = 0;
	float zeros[4] = { 0 }, *nanbuf = NULL;
	int key_done = 0;

	tmp_path(src, sizeof(src), "variant-src.safetensors");
	cr_assert_eq(mtlz_model_save(m, src, err, sizeof(err)), MTLZ_OK, "%s", err);
	mtlz_model_free(m);
	st = mtlz_st_read(src, err, sizeof(err));
	cr_assert_not_null(st, "%s", err);
	for (size_t i = 0; i < mtlz_st_count(st); i++) {
		const mtlz_st_tensor *t = mtlz_st_get(st, i);

		if (v->skip && strcmp(t->name, v->skip) == 0)
			continue;
		out[n].name = t->name;
		out[n].ndim = t->ndim;
		memcpy(out[n].shape, t->shape, sizeof(out[n].shape));
		out[n].data = t->data;
		if (v->swap_dims && strcmp(t->name, v->swap_dims) == 0) {
			cr_assert_eq(t->ndim, 3);
			out[n].shape[1] = t->shape[2];
			out[n].shape[2] = t->shape[1];
		}
		if (v->nan_in && strcmp(t->name, v->nan_in) == 0) {
			nanbuf = malloc(t->nbytes);
			memcpy(nanbuf, t->data, t->nbytes);
			nanbuf[5] = NAN;
			out[n].data = nanbuf;
		}
		n++;
	}
	cr_assert_eq(n, mtlz_st_count(st) - (v->skip ? 1 : 0), "no tensor %s", v->skip);
	if (v->extra)
		out[n++] = (mtlz_st_out){ v->extra, 1, { 4 }, zeros };
	for (size_t i = 0; i < mtlz_st_meta_count(st); i++) {
		mtlz_st_meta_at(st, i, &keys[n_meta], &vals[n_meta]);
		if (v->key && strcmp(keys[n_meta], v->key) == 0) {
			key_done = 1;
			if (!v->value)
				continue;
			vals[n_meta] = v->value;
		}
		n_meta++;
	}
	if (v->key && !key_done) {
		cr_assert_not_null(v->value);
		keys[n_meta] = v->key;
		vals[n_meta++] = v->value;
	}
	cr_assert_eq(mtlz_st_write(dst, out, n, keys, vals, n_meta, err, sizeof(err)),
		     MTLZ_OK, "%s", err);
	free(nanbuf);
	mtlz_st_free(st);
}

/* Loading `path` fails; the message names the file and contains `want`. */
static void expect_load_fails(const char *path, const char *want)
{
	char err[1024] = "";
	mtlz_model *m = mtlz_model_load(path, err, sizeof(err));

	cr_assert_null(m, "loaded a bad model (expected '%s')", want);
	cr_assert_not_null(strstr(err, path), "message lacks the path: %s", err);
	cr_assert_not_null(strstr(err, want), "message '%s' lacks '%s'", err, want);
}

static void expect_variant_fails(const struct variant *v, const char *want)
{
	char path[512];

	tmp_path(path, sizeof(path), "variant.safetensors");
	write_variant(path, v);
	expect_load_fails(path, want);
}

Test(model, unchanged_variant_loads)
{
	char path[512], err[512] = "";
	struct variant v = { 0 };
	mtlz_model *m;

	/* the variant writer itself produces a loadable file */
	tmp_path(path, sizeof(path), "variant.safetensors");
	write_variant(path, &v);
	m = mtlz_model_load(path, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	mtlz_model_free(m);
}

Test(model, load_rejects_missing_tensor)
{
	struct variant v = { .skip = "attention.excite.bias" };

	expect_variant_fails(&v, "tensor 'attention.excite.bias' missing");
}

Test(model, load_rejects_extra_tensor)
{
	struct variant v = { .extra = "heads.redshift.fc1.bias" };

	expect_variant_fails(&v, "unexpected tensor 'heads.redshift.fc1.bias'");
}

Test(model, load_rejects_wrong_shape)
{
	struct variant v = { .swap_dims = "backbone.blocks.2.conv1.weight" };

	expect_variant_fails(&v, "tensor 'backbone.blocks.2.conv1.weight' has shape "
				 "[64,3,32], the architecture expects [64,32,3]");
}

Test(model, load_rejects_nan_weight)
{
	struct variant v = { .nan_in = "heads.class.fc2.weight" };

	expect_variant_fails(&v, "tensor 'heads.class.fc2.weight' element 5 is not finite");
}

Test(model, load_rejects_missing_arch)
{
	struct variant v = { .key = "mtlz.arch" };

	expect_variant_fails(&v, "mtlz.arch");
}

Test(model, load_rejects_invalid_arch)
{
	char *js;
	mtlz_arch a;
	struct variant v = { .key = "mtlz.arch" };

	mtlz_arch_default(&a);
	a.attention_reduction = 15; /* does not divide 256 */
	js = mtlz_arch_to_json(&a);
	v.value = js;
	expect_variant_fails(&v, "attention_reduction");
	free(js);

	v.value = "{\"input_length\":5161,\"channels\":[],\"kernel\":3,\"padding\":1,"
		  "\"pool\":3,\"attention_reduction\":16,\"head_hidden\":[128,64],"
		  "\"n_classes\":4,\"dropout\":0.5}";
	expect_variant_fails(&v, "mtlz.arch");

	v.value = "{\"input_length\":5161}";
	expect_variant_fails(&v, "mtlz.arch: 'channels'");
	v.value = "not json";
	expect_variant_fails(&v, "mtlz.arch");
}

Test(model, load_rejects_unknown_format_version)
{
	struct variant v = { .key = "mtlz.format_version", .value = "999" };

	expect_variant_fails(&v, "format version 999");
	v.value = NULL;
	expect_variant_fails(&v, "mtlz.format_version");
}

Test(model, load_rejects_grid_inconsistent_with_input_length)
{
	struct variant v = { .key = "mtlz.grid", .value = "3840,9001,1" };

	expect_variant_fails(&v, "grid");
	v.value = "3840,9000";
	expect_variant_fails(&v, "mtlz.grid");
}

Test(model, load_rejects_target_with_zero_scale)
{
	struct variant v = { .key = "mtlz.target", .value = "{\"offset\":8.9,\"scale\":0}" };

	expect_variant_fails(&v, "mtlz.target");
	v.value = "{\"offset\":8.9}";
	expect_variant_fails(&v, "mtlz.target");
}

Test(model, load_rejects_class_count_mismatch)
{
	struct variant v = { .key = "mtlz.classes", .value = "a,b,c" };

	expect_variant_fails(&v, "mtlz.classes");
}

Test(model, load_reads_class_names)
{
	struct variant v = { .key = "mtlz.classes", .value = "quiet,sf,comp,seyfert" };
	char path[512], path2[512], err[512] = "";
	mtlz_model *m, *l;

	tmp_path(path, sizeof(path), "classes.safetensors");
	write_variant(path, &v);
	m = mtlz_model_load(path, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	cr_assert_str_eq(mtlz_model_class_name(m, 0), "quiet");
	cr_assert_str_eq(mtlz_model_class_name(m, 3), "seyfert");
	/* and a save/load round trip keeps them */
	tmp_path(path2, sizeof(path2), "classes2.safetensors");
	cr_assert_eq(mtlz_model_save(m, path2, err, sizeof(err)), MTLZ_OK, "%s", err);
	l = mtlz_model_load(path2, err, sizeof(err));
	cr_assert_not_null(l, "%s", err);
	expect_same_model(m, l);
	cr_assert_str_eq(mtlz_model_class_name(l, 1), "sf");
	cr_assert_str_eq(mtlz_model_class_name(l, 2), "comp");
	mtlz_model_free(l);
	mtlz_model_free(m);
}

/* Hand-made (mtlz_st_write only writes F32): every tensor copied, one of
 * them stored as F16 with half the bytes. */
Test(model, load_rejects_f16_tensor)
{
	char src[512], path[512], err[512] = "";
	const char *f16 = "heads.metal.fc3.weight";
	mtlz_model *m = paper_model(9);
	mtlz_st *st;
	json_t *hdr = json_object(), *meta = json_object();
	uint8_t *data, *file;
	size_t off = 0, total = 0, jl;
	char *js;
	FILE *f;

	tmp_path(src, sizeof(src), "f16-src.safetensors");
	cr_assert_eq(mtlz_model_save(m, src, err, sizeof(err)), MTLZ_OK, "%s", err);
	mtlz_model_free(m);
	st = mtlz_st_read(src, err, sizeof(err));
	cr_assert_not_null(st, "%s", err);
	for (size_t i = 0; i < mtlz_st_meta_count(st); i++) {
		const char *k, *val;

		mtlz_st_meta_at(st, i, &k, &val);
		json_object_set_new(meta, k, json_string(val));
	}
	json_object_set_new(hdr, "__metadata__", meta);
	for (size_t i = 0; i < mtlz_st_count(st); i++)
		total += mtlz_st_get(st, i)->nbytes;
	data = malloc(total);
	for (size_t i = 0; i < mtlz_st_count(st); i++) {
		const mtlz_st_tensor *t = mtlz_st_get(st, i);
		int half = strcmp(t->name, f16) == 0;
		size_t nb = half ? t->nbytes / 2 : t->nbytes;
		json_t *e = json_object(), *shape = json_array();

		for (int d = 0; d < t->ndim; d++)
			json_array_append_new(shape, json_integer(t->shape[d]));
		json_object_set_new(e, "dtype", json_string(half ? "F16" : "F32"));
		json_object_set_new(e, "shape", shape);
		json_object_set_new(e, "data_offsets", json_pack("[II]", (json_int_t)off,
								 (json_int_t)(off + nb)));
		json_object_set_new(hdr, t->name, e);
		memcpy(data + off, t->data, nb);
		off += nb;
	}
	js = json_dumps(hdr, JSON_COMPACT);
	jl = strlen(js);
	file = malloc(8 + jl + off);
	for (int i = 0; i < 8; i++)
		file[i] = (uint8_t)((uint64_t)jl >> (8 * i));
	memcpy(file + 8, js, jl);
	memcpy(file + 8 + jl, data, off);
	tmp_path(path, sizeof(path), "f16.safetensors");
	f = fopen(path, "wb");
	cr_assert_not_null(f);
	cr_assert_eq(fwrite(file, 1, 8 + jl + off, f), 8 + jl + off);
	fclose(f);
	free(file);
	free(js);
	free(data);
	json_decref(hdr);
	mtlz_st_free(st);

	expect_load_fails(path, "tensor 'heads.metal.fc3.weight' has dtype F16");
}

Test(model, load_rejects_missing_and_non_safetensors_files)
{
	char path[512];

	tmp_path(path, sizeof(path), "absent.safetensors");
	expect_load_fails(path, "No such file");
	tmp_path(path, sizeof(path), "text.safetensors");
	{
		FILE *f = fopen(path, "w");

		fputs("hello, this is not a model\n", f);
		fclose(f);
	}
	expect_load_fails(path, "header length");
}

static void small_arch(mtlz_arch *a)
{
	memset(a, 0, sizeof(*a));
	a->input_length = 700;
	a->n_blocks = 3;
	a->channels[0] = 8;
	a->channels[1] = 12;
	a->channels[2] = 24;
	a->kernel = 5;
	a->padding = 0;
	a->pool = 2;
	a->attention_reduction = 0;
	a->n_hidden = 1;
	a->hidden[0] = 32;
	a->n_classes = 3;
	a->dropout = 0.3f;
}

Test(model, arch_json_round_trip_for_non_default_arch)
{
	mtlz_arch a, b;
	char err[256] = "", *js;

	small_arch(&a);
	cr_assert_eq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK, "%s", err);
	js = mtlz_arch_to_json(&a);
	cr_assert_not_null(js);
	memset(&b, 0x5a, sizeof(b));
	cr_assert_eq(mtlz_arch_from_json(&b, js, err, sizeof(err)), MTLZ_OK, "%s: %s",
		     js, err);
	cr_assert_eq(memcmp(&a, &b, sizeof(a)), 0, "struct differs after %s", js);
	cr_assert_eq(b.dropout, 0.3f);
	free(js);

	/* 700 -> (696, 692, 346) -> (342, 338, 169) -> (165, 161, 80) */
	cr_assert_eq(mtlz_arch_length_after(&a, 1), 346);
	cr_assert_eq(mtlz_arch_length_after(&a, 2), 169);
	cr_assert_eq(mtlz_arch_length_after(&a, 3), 80);
}

Test(model, non_default_arch_model_has_no_attention_tensors)
{
	mtlz_arch a;
	mtlz_grid g = { 4000.0, 4699.0, 1.0 };
	char err[256] = "", path[512];
	mtlz_model *m, *l;

	small_arch(&a);
	m = mtlz_model_new_random(&a, &g, 11, err, sizeof(err));
	cr_assert_not_null(m, "%s", err);
	/* 3 blocks x 4 + 2 heads x 2 layers x 2 */
	cr_assert_eq(mtlz_model_n_tensors(m), 20);
	cr_assert_null(mtlz_model_find(m, "attention.squeeze.weight"));
	cr_assert_eq(mtlz_model_find(m, "backbone.blocks.2.conv2.weight")->shape[2], 5);
	cr_assert_eq(mtlz_model_find(m, "heads.class.fc2.weight")->shape[0], 3);
	cr_assert_eq(mtlz_model_find(m, "heads.metal.fc1.weight")->shape[1], 24);
	cr_assert_str_eq(mtlz_model_class_name(m, 2), "class2");
	tmp_path(path, sizeof(path), "small.safetensors");
	cr_assert_eq(mtlz_model_save(m, path, err, sizeof(err)), MTLZ_OK, "%s", err);
	l = mtlz_model_load(path, err, sizeof(err));
	cr_assert_not_null(l, "%s", err);
	expect_same_model(m, l);
	mtlz_model_free(l);
	mtlz_model_free(m);

	/* the grid must match the input length */
	g.wmax = 4700.0;
	cr_assert_null(mtlz_model_new_random(&a, &g, 11, err, sizeof(err)));
	cr_assert_not_null(strstr(err, "701"), "%s", err);
}

Test(model, arch_validate_rejects_bad_values)
{
	mtlz_arch a;
	char err[256];

	mtlz_arch_default(&a);
	a.padding = 3; /* = kernel */
	err[0] = '\0';
	cr_assert_neq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK);
	cr_assert_not_null(strstr(err, "padding"), "%s", err);

	mtlz_arch_default(&a);
	a.channels[2] = 0;
	err[0] = '\0';
	cr_assert_neq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK);
	cr_assert_not_null(strstr(err, "channels[2]"), "%s", err);

	/* 50 -> 16 -> 5 -> 1 -> 0 */
	mtlz_arch_default(&a);
	a.input_length = 50;
	err[0] = '\0';
	cr_assert_neq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK);
	cr_assert_not_null(strstr(err, "too short"), "%s", err);
	cr_assert_not_null(strstr(err, "block 4"), "%s", err);
	a.input_length = 243; /* 243 -> 81 -> 27 -> 9 -> 3 -> 1: just survives */
	cr_assert_eq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK, "%s", err);

	mtlz_arch_default(&a);
	a.dropout = 1.0f;
	err[0] = '\0';
	cr_assert_neq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK);
	cr_assert_not_null(strstr(err, "dropout"), "%s", err);
	a.dropout = NAN;
	cr_assert_neq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK);

	mtlz_arch_default(&a);
	a.n_blocks = 0;
	cr_assert_neq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK);
	mtlz_arch_default(&a);
	a.n_classes = 1;
	cr_assert_neq(mtlz_arch_validate(&a, err, sizeof(err)), MTLZ_OK);
}
