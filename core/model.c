/*
 * model.c - architecture description, weight layout, PyTorch-compatible
 * initialisation and the safetensors model file (see model.h).
 */
#define _POSIX_C_SOURCE 200809L
#include "model.h"
#include "common.h"
#include "safetensors.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TENSORS (4 * MTLZ_MAX_BLOCKS + 4 + 4 * (MTLZ_MAX_HIDDEN + 1))
#define MAX_META 32

static const char *const default_classes[] = { "passive", "star_forming",
						"composite", "agn" };

struct mtlz_model {
	mtlz_arch arch;
	mtlz_grid grid;
	double target_offset, target_scale;
	char class_names[MTLZ_MAX_CLASSES][32];
	mtlz_tensor tensors[MAX_TENSORS];
	size_t n_tensors;
	float *arena;
	size_t n_params;
	char *meta_keys[MAX_META];
	char *meta_values[MAX_META];
	size_t n_meta;
};

void mtlz_arch_default(mtlz_arch *a)
{
	static const int ch[] = { 16, 32, 64, 128, 256 };

	memset(a, 0, sizeof(*a));
	a->input_length = 5161;
	a->n_blocks = 5;
	memcpy(a->channels, ch, sizeof(ch));
	a->kernel = 3;
	a->padding = 1;
	a->pool = 3;
	a->attention_reduction = 16;
	a->n_hidden = 2;
	a->hidden[0] = 128;
	a->hidden[1] = 64;
	a->n_classes = 4;
	a->dropout = 0.5f;
}

void mtlz_grid_default(mtlz_grid *g)
{
	g->wmin = 3840.0;
	g->wmax = 9000.0;
	g->dw = 1.0;
}

int mtlz_grid_length(const mtlz_grid *g)
{
	if (!(g->dw > 0) || !(g->wmax > g->wmin) ||
	    !((g->wmax - g->wmin) / g->dw < 1e7))
		return 0;
	return (int)floor((g->wmax - g->wmin) / g->dw + 1e-6) + 1;
}

int mtlz_arch_length_after(const mtlz_arch *a, int b)
{
	int len = a->input_length;

	for (int i = 0; i < b && i < a->n_blocks; i++) {
		len = len + 2 * a->padding - a->kernel + 1;
		len = len + 2 * a->padding - a->kernel + 1;
		len = len >= a->pool ? (len - a->pool) / a->pool + 1 : 0;
	}
	return len;
}

int mtlz_arch_validate(const mtlz_arch *a, char *errstr, size_t errstr_size)
{
	int c_last;

	if (a->input_length < 1 || a->input_length > 1 << 20)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"input_length %d out of range", a->input_length);
	if (a->n_blocks < 1 || a->n_blocks > MTLZ_MAX_BLOCKS)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"%d blocks (1..%d)", a->n_blocks, MTLZ_MAX_BLOCKS);
	for (int b = 0; b < a->n_blocks; b++)
		if (a->channels[b] < 1 || a->channels[b] > 4096)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"channels[%d] = %d out of range", b,
					a->channels[b]);
	if (a->kernel < 1 || a->kernel > 15)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"kernel %d out of range (1..15)", a->kernel);
	if (a->padding < 0 || a->padding >= a->kernel)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"padding %d must be in 0..kernel-1", a->padding);
	if (a->pool < 1 || a->pool > 16)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"pool %d out of range (1..16)", a->pool);
	for (int b = 1; b <= a->n_blocks; b++)
		if (mtlz_arch_length_after(a, b) < 1)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"input_length %d is too short: nothing is "
					"left after block %d", a->input_length, b);
	c_last = a->channels[a->n_blocks - 1];
	if (a->attention_reduction < 0 ||
	    (a->attention_reduction > 0 &&
	     (c_last % a->attention_reduction != 0)))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"attention_reduction %d must divide the last "
				"channel count %d (0 = no attention)",
				a->attention_reduction, c_last);
	if (a->n_hidden < 0 || a->n_hidden > MTLZ_MAX_HIDDEN)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"%d hidden head layers (0..%d)", a->n_hidden,
				MTLZ_MAX_HIDDEN);
	for (int i = 0; i < a->n_hidden; i++)
		if (a->hidden[i] < 1 || a->hidden[i] > 65536)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"hidden[%d] = %d out of range", i, a->hidden[i]);
	if (a->n_classes < 2 || a->n_classes > MTLZ_MAX_CLASSES)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"%d classes (2..%d)", a->n_classes, MTLZ_MAX_CLASSES);
	if (!(a->dropout >= 0.0f && a->dropout < 1.0f))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"dropout %g must be in [0, 1)", (double)a->dropout);
	return MTLZ_OK;
}

double mtlz_arch_flops(const mtlz_arch *a)
{
	double f = 0;
	int len = a->input_length, cin = 1;

	for (int b = 0; b < a->n_blocks; b++) {
		int cout = a->channels[b];

		for (int c = 0; c < 2; c++) {
			len = len + 2 * a->padding - a->kernel + 1;
			f += 2.0 * a->kernel * cin * cout * len;
			cin = cout;
		}
		len = (len - a->pool) / a->pool + 1;
	}
	if (a->attention_reduction)
		f += 4.0 * cin * (cin / a->attention_reduction);
	for (int h = 0; h < 2; h++) {
		int in = cin;

		for (int i = 0; i <= a->n_hidden; i++) {
			int out = i < a->n_hidden ? a->hidden[i] :
						    (h == 0 ? a->n_classes : 1);
			f += 2.0 * in * out;
			in = out;
		}
	}
	return f;
}

char *mtlz_arch_to_json(const mtlz_arch *a)
{
	json_t *o = json_object(), *ch = json_array(), *hid = json_array();
	char *s;

	for (int b = 0; b < a->n_blocks; b++)
		json_array_append_new(ch, json_integer(a->channels[b]));
	for (int i = 0; i < a->n_hidden; i++)
		json_array_append_new(hid, json_integer(a->hidden[i]));
	json_object_set_new(o, "input_length", json_integer(a->input_length));
	json_object_set_new(o, "channels", ch);
	json_object_set_new(o, "kernel", json_integer(a->kernel));
	json_object_set_new(o, "padding", json_integer(a->padding));
	json_object_set_new(o, "pool", json_integer(a->pool));
	json_object_set_new(o, "attention_reduction",
			    json_integer(a->attention_reduction));
	json_object_set_new(o, "head_hidden", hid);
	json_object_set_new(o, "n_classes", json_integer(a->n_classes));
	json_object_set_new(o, "dropout", json_real((double)a->dropout));
	s = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(9));
	json_decref(o);
	return s;
}

static int json_int_field(json_t *o, const char *k, int *out, char *errstr,
			  size_t errstr_size)
{
	json_t *v = json_object_get(o, k);

	if (!json_is_integer(v))
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"mtlz.arch: '%s' missing or not an integer", k);
	if (json_integer_value(v) < -1000000 || json_integer_value(v) > 1000000)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"mtlz.arch: '%s' out of range", k);
	*out = (int)json_integer_value(v);
	return MTLZ_OK;
}

static int json_int_array(json_t *o, const char *k, int *out, int max, int *n,
			  char *errstr, size_t errstr_size)
{
	json_t *v = json_object_get(o, k), *e;
	size_t i;

	if (!json_is_array(v) || json_array_size(v) > (size_t)max)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"mtlz.arch: '%s' missing, not an array or longer "
				"than %d", k, max);
	json_array_foreach(v, i, e) {
		if (!json_is_integer(e) || json_integer_value(e) < 0 ||
		    json_integer_value(e) > 1000000)
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					"mtlz.arch: '%s'[%zu] is not a valid size", k, i);
		out[i] = (int)json_integer_value(e);
	}
	*n = (int)json_array_size(v);
	return MTLZ_OK;
}

int mtlz_arch_from_json(mtlz_arch *a, const char *js, char *errstr,
			size_t errstr_size)
{
	json_error_t jerr;
	json_t *o = json_loads(js, JSON_REJECT_DUPLICATES, &jerr), *v;
	int rc;

	memset(a, 0, sizeof(*a));
	if (!o || !json_is_object(o)) {
		json_decref(o);
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				"mtlz.arch: not a JSON object (%s)",
				o ? "wrong type" : jerr.text);
	}
	if ((rc = json_int_field(o, "input_length", &a->input_length, errstr, errstr_size)) ||
	    (rc = json_int_array(o, "channels", a->channels, MTLZ_MAX_BLOCKS,
				 &a->n_blocks, errstr, errstr_size)) ||
	    (rc = json_int_field(o, "kernel", &a->kernel, errstr, errstr_size)) ||
	    (rc = json_int_field(o, "padding", &a->padding, errstr, errstr_size)) ||
	    (rc = json_int_field(o, "pool", &a->pool, errstr, errstr_size)) ||
	    (rc = json_int_field(o, "attention_reduction", &a->attention_reduction,
				 errstr, errstr_size)) ||
	    (rc = json_int_array(o, "head_hidden", a->hidden, MTLZ_MAX_HIDDEN,
				 &a->n_hidden, errstr, errstr_size)) ||
	    (rc = json_int_field(o, "n_classes", &a->n_classes, errstr, errstr_size)))
		goto out;
	v = json_object_get(o, "dropout");
	if (!json_is_number(v)) {
		rc = mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			      "mtlz.arch: 'dropout' missing or not a number");
		goto out;
	}
	a->dropout = (float)json_number_value(v);
	{
		char verr[256];

		/* prefixed like the format errors above, so a load names the key */
		rc = mtlz_arch_validate(a, verr, sizeof(verr));
		if (rc)
			mtlz_err(errstr, errstr_size, rc, "mtlz.arch: %s", verr);
	}
out:
	json_decref(o);
	return rc;
}

static void add_tensor(mtlz_model *m, const char *name, int ndim, int64_t d0,
		       int64_t d1, int64_t d2)
{
	mtlz_tensor *t = &m->tensors[m->n_tensors++];

	snprintf(t->name, sizeof(t->name), "%s", name);
	t->ndim = ndim;
	t->shape[0] = d0;
	t->shape[1] = d1;
	t->shape[2] = d2;
	t->n = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1) * (size_t)(ndim > 2 ? d2 : 1);
}

/* Names, shapes and arena offsets of every tensor, in canonical order. */
static int build_layout(mtlz_model *m)
{
	const mtlz_arch *a = &m->arch;
	char name[64];
	int cin = 1, c;
	size_t off = 0;

	m->n_tensors = 0;
	for (int b = 0; b < a->n_blocks; b++) {
		for (int k = 1; k <= 2; k++) {
			c = a->channels[b];
			add_tensor(m, mtlz_name_conv(name, sizeof(name), b, k - 1, 0), 3, c, cin,
				   a->kernel);
			add_tensor(m, mtlz_name_conv(name, sizeof(name), b, k - 1, 1), 1, c, 0, 0);
			cin = c;
		}
	}
	if (a->attention_reduction) {
		int h = cin / a->attention_reduction;

		add_tensor(m, "attention.squeeze.weight", 3, h, cin, 1);
		add_tensor(m, "attention.squeeze.bias", 1, h, 0, 0);
		add_tensor(m, "attention.excite.weight", 3, cin, h, 1);
		add_tensor(m, "attention.excite.bias", 1, cin, 0, 0);
	}
	for (int h = 0; h < 2; h++) {
		int in = cin;

		for (int i = 0; i <= a->n_hidden; i++) {
			int out = i < a->n_hidden ? a->hidden[i] :
						    (h == 0 ? a->n_classes : 1);

			add_tensor(m, mtlz_name_head(name, sizeof(name), h, i, 0), 2, out, in, 0);
			add_tensor(m, mtlz_name_head(name, sizeof(name), h, i, 1), 1, out, 0, 0);
			in = out;
		}
	}
	for (size_t i = 0; i < m->n_tensors; i++)
		off += (m->tensors[i].n + 15) & ~(size_t)15; /* 64-byte aligned */
	m->arena = mtlz_aligned_alloc(off * sizeof(float));
	if (!m->arena)
		return MTLZ_ERR_NOMEM;
	memset(m->arena, 0, off * sizeof(float));
	off = 0;
	m->n_params = 0;
	for (size_t i = 0; i < m->n_tensors; i++) {
		m->tensors[i].data = m->arena + off;
		off += (m->tensors[i].n + 15) & ~(size_t)15;
		m->n_params += m->tensors[i].n;
	}
	return MTLZ_OK;
}

static mtlz_model *model_alloc(const mtlz_arch *a, const mtlz_grid *g,
			       char *errstr, size_t errstr_size)
{
	mtlz_model *m;
	const uint32_t probe = 1;

	if (*(const uint8_t *)&probe != 1) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_UNSUPPORTED,
			 "big-endian hosts are not supported");
		return NULL;
	}
	if (mtlz_arch_validate(a, errstr, errstr_size) != MTLZ_OK)
		return NULL;
	if (mtlz_grid_length(g) != a->input_length) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
			 "grid %g..%g step %g has %d pixels but the architecture "
			 "expects %d", g->wmin, g->wmax, g->dw,
			 mtlz_grid_length(g), a->input_length);
		return NULL;
	}
	m = calloc(1, sizeof(*m));
	if (!m) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	m->arch = *a;
	m->grid = *g;
	m->target_offset = 0.0;
	m->target_scale = 1.0;
	for (int c = 0; c < a->n_classes; c++)
		snprintf(m->class_names[c], sizeof(m->class_names[c]), "%s",
			 c < 4 ? default_classes[c] : "class");
	if (a->n_classes != 4)
		for (int c = 0; c < a->n_classes; c++)
			snprintf(m->class_names[c], sizeof(m->class_names[c]),
				 "class%d", c);
	if (build_layout(m) != MTLZ_OK) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		free(m);
		return NULL;
	}
	return m;
}

mtlz_model *mtlz_model_new_random(const mtlz_arch *a, const mtlz_grid *g,
				  uint64_t seed, char *errstr, size_t errstr_size)
{
	mtlz_model *m = model_alloc(a, g, errstr, errstr_size);
	mtlz_rng rng;
	char sbuf[32];

	if (!m)
		return NULL;
	mtlz_rng_seed(&rng, seed);
	/* Weight and bias of a layer share fan_in = in_features * kernel. */
	for (size_t i = 0; i + 1 < m->n_tensors; i += 2) {
		mtlz_tensor *w = &m->tensors[i], *b = &m->tensors[i + 1];
		size_t fan_in = (size_t)w->shape[1] * (w->ndim == 3 ? (size_t)w->shape[2] : 1);
		double bound = 1.0 / sqrt((double)fan_in);

		for (size_t j = 0; j < w->n; j++)
			w->data[j] = (float)((2.0 * mtlz_rng_uniform(&rng) - 1.0) * bound);
		for (size_t j = 0; j < b->n; j++)
			b->data[j] = (float)((2.0 * mtlz_rng_uniform(&rng) - 1.0) * bound);
	}
	snprintf(sbuf, sizeof(sbuf), "%llu", (unsigned long long)seed);
	mtlz_model_set_meta(m, "mtlz.provenance", "random initialisation (mtlz init), untrained");
	mtlz_model_set_meta(m, "mtlz.seed", sbuf);
	return m;
}

void mtlz_model_init_he(mtlz_model *m, uint64_t seed)
{
	mtlz_rng rng;

	mtlz_rng_seed(&rng, seed);
	for (size_t i = 0; i + 1 < m->n_tensors; i += 2) {
		mtlz_tensor *w = &m->tensors[i], *b = &m->tensors[i + 1];
		const size_t fan_in = (size_t)w->shape[1] * (w->ndim == 3 ? (size_t)w->shape[2] : 1);
		/* no ReLU after: the heads' last layers and the attention's
		 * excitation (sigmoid) get variance 1 / fan_in */
		char last_c[64], last_m[64];
		int linear_out;
		double sd;

		snprintf(last_c, sizeof(last_c), "heads.class.fc%d.weight", m->arch.n_hidden + 1);
		snprintf(last_m, sizeof(last_m), "heads.metal.fc%d.weight", m->arch.n_hidden + 1);
		linear_out = !strcmp(w->name, "attention.excite.weight") ||
			     !strcmp(w->name, last_c) || !strcmp(w->name, last_m);
		sd = sqrt((linear_out ? 1.0 : 2.0) / (double)fan_in);

		for (size_t j = 0; j < w->n; j += 2) {   /* Box-Muller pairs */
			const double u1 = 1.0 - mtlz_rng_uniform(&rng), u2 = mtlz_rng_uniform(&rng);
			const double r = sqrt(-2.0 * log(u1));

			w->data[j] = (float)(sd * r * cos(6.283185307179586 * u2));
			if (j + 1 < w->n)
				w->data[j + 1] = (float)(sd * r * sin(6.283185307179586 * u2));
		}
		memset(b->data, 0, b->n * sizeof(float));
	}
	mtlz_model_set_meta(m, "mtlz.provenance", "He initialisation, untrained");
}

void mtlz_model_free(mtlz_model *m)
{
	if (!m)
		return;
	for (size_t i = 0; i < m->n_meta; i++) {
		free(m->meta_keys[i]);
		free(m->meta_values[i]);
	}
	free(m->arena);
	free(m);
}

const mtlz_arch *mtlz_model_arch(const mtlz_model *m) { return &m->arch; }
const mtlz_grid *mtlz_model_grid(const mtlz_model *m) { return &m->grid; }
size_t mtlz_model_n_params(const mtlz_model *m) { return m->n_params; }
size_t mtlz_model_n_tensors(const mtlz_model *m) { return m->n_tensors; }

void mtlz_model_target(const mtlz_model *m, double *offset, double *scale)
{
	*offset = m->target_offset;
	*scale = m->target_scale;
}

void mtlz_model_set_target(mtlz_model *m, double offset, double scale)
{
	m->target_offset = offset;
	m->target_scale = scale;
}

const char *mtlz_model_class_name(const mtlz_model *m, int c)
{
	return c >= 0 && c < m->arch.n_classes ? m->class_names[c] : "?";
}

const mtlz_tensor *mtlz_model_tensor(const mtlz_model *m, size_t i)
{
	return i < m->n_tensors ? &m->tensors[i] : NULL;
}

const mtlz_tensor *mtlz_model_find(const mtlz_model *m, const char *name)
{
	for (size_t i = 0; i < m->n_tensors; i++)
		if (strcmp(m->tensors[i].name, name) == 0)
			return &m->tensors[i];
	return NULL;
}

float *mtlz_model_data(mtlz_model *m, const char *name)
{
	const mtlz_tensor *t = mtlz_model_find(m, name);

	return t ? t->data : NULL;
}

int mtlz_model_set_meta(mtlz_model *m, const char *key, const char *value)
{
	for (size_t i = 0; i < m->n_meta; i++) {
		if (strcmp(m->meta_keys[i], key) == 0) {
			char *v;

			if (!value) {   /* remove the key */
				free(m->meta_keys[i]);
				free(m->meta_values[i]);
				m->n_meta--;
				m->meta_keys[i] = m->meta_keys[m->n_meta];
				m->meta_values[i] = m->meta_values[m->n_meta];
				return MTLZ_OK;
			}
			v = strdup(value);

			if (!v)
				return MTLZ_ERR_NOMEM;
			free(m->meta_values[i]);
			m->meta_values[i] = v;
			return MTLZ_OK;
		}
	}
	if (!value)
		return MTLZ_OK;
	if (m->n_meta == MAX_META)
		return MTLZ_ERR_INVALID;
	m->meta_keys[m->n_meta] = strdup(key);
	m->meta_values[m->n_meta] = strdup(value);
	if (!m->meta_keys[m->n_meta] || !m->meta_values[m->n_meta]) {
		free(m->meta_keys[m->n_meta]);
		free(m->meta_values[m->n_meta]);
		return MTLZ_ERR_NOMEM;
	}
	m->n_meta++;
	return MTLZ_OK;
}

const char *mtlz_model_meta(const mtlz_model *m, const char *key)
{
	for (size_t i = 0; i < m->n_meta; i++)
		if (strcmp(m->meta_keys[i], key) == 0)
			return m->meta_values[i];
	return NULL;
}

/* T of {"temperature": T, ...}; 0 when the JSON is not that or T is not
 * a finite number in (0, 100]. */
static double parse_temperature(const char *s)
{
	json_t *o = json_loads(s, 0, NULL);
	json_t *t = o ? json_object_get(o, "temperature") : NULL;
	double T = json_is_number(t) ? json_number_value(t) : 0.0;

	json_decref(o);
	return isfinite(T) && T > 0.0 && T <= 100.0 ? T : 0.0;
}

double mtlz_model_temperature(const mtlz_model *m)
{
	const char *s = mtlz_model_meta(m, "mtlz.calibration");
	double T = s ? parse_temperature(s) : 0.0;

	return T > 0.0 ? T : 1.0;
}

size_t mtlz_model_meta_count(const mtlz_model *m) { return m->n_meta; }

void mtlz_model_meta_at(const mtlz_model *m, size_t i, const char **key,
			const char **value)
{
	*key = i < m->n_meta ? m->meta_keys[i] : NULL;
	*value = i < m->n_meta ? m->meta_values[i] : NULL;
}

/* Keys written from the model's own fields; free-form keys must not clash. */
static int is_managed_key(const char *k)
{
	return strcmp(k, "mtlz.format_version") == 0 || strcmp(k, "mtlz.arch") == 0 ||
	       strcmp(k, "mtlz.grid") == 0 || strcmp(k, "mtlz.classes") == 0 ||
	       strcmp(k, "mtlz.target") == 0;
}

int mtlz_model_save(const mtlz_model *m, const char *path, char *errstr,
		    size_t errstr_size)
{
	return mtlz_model_save_ext(m, path, NULL, 0, errstr, errstr_size);
}

int mtlz_model_save_ext(const mtlz_model *m, const char *path, const mtlz_st_out *extra,
			size_t n_extra, char *errstr, size_t errstr_size)
{
	mtlz_st_out out[MAX_TENSORS + 8];
	const char *keys[MAX_META + 5], *vals[MAX_META + 5];
	char grid[96], classes[MTLZ_MAX_CLASSES * 33], target[128];
	char *arch = mtlz_arch_to_json(&m->arch);
	size_t n_meta = 0;
	int rc;

	if (!arch)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
	snprintf(grid, sizeof(grid), "%.17g,%.17g,%.17g", m->grid.wmin,
		 m->grid.wmax, m->grid.dw);
	classes[0] = '\0';
	for (int c = 0; c < m->arch.n_classes; c++) {
		if (c)
			strcat(classes, ",");
		strcat(classes, m->class_names[c]);
	}
	snprintf(target, sizeof(target), "{\"offset\":%.17g,\"scale\":%.17g}",
		 m->target_offset, m->target_scale);
	keys[n_meta] = "mtlz.format_version"; vals[n_meta++] = MTLZ_MODEL_FORMAT_VERSION;
	keys[n_meta] = "mtlz.arch"; vals[n_meta++] = arch;
	keys[n_meta] = "mtlz.grid"; vals[n_meta++] = grid;
	keys[n_meta] = "mtlz.classes"; vals[n_meta++] = classes;
	keys[n_meta] = "mtlz.target"; vals[n_meta++] = target;
	for (size_t i = 0; i < m->n_meta; i++) {
		if (is_managed_key(m->meta_keys[i]))
			continue;
		keys[n_meta] = m->meta_keys[i];
		vals[n_meta++] = m->meta_values[i];
	}
	for (size_t i = 0; i < m->n_tensors; i++) {
		out[i].name = m->tensors[i].name;
		out[i].ndim = m->tensors[i].ndim;
		for (int d = 0; d < 3; d++)
			out[i].shape[d] = m->tensors[i].shape[d];
		out[i].data = m->tensors[i].data;
	}
	for (size_t i = 0; i < n_extra && i < 8; i++) {
		if (strncmp(extra[i].name, "optim.", 6) != 0) {
			free(arch);
			return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
					"extra tensor '%s' must be named optim.*", extra[i].name);
		}
		out[m->n_tensors + i] = extra[i];
	}
	rc = mtlz_st_write(path, out, m->n_tensors + MTLZ_MIN(n_extra, (size_t)8), keys, vals,
			   n_meta, errstr, errstr_size);
	free(arch);
	return rc;
}

static int parse_grid(const char *s, mtlz_grid *g)
{
	char tail;

	return sscanf(s, "%lf,%lf,%lf%c", &g->wmin, &g->wmax, &g->dw, &tail) == 3 ?
		       MTLZ_OK : MTLZ_ERR_FORMAT;
}

static int parse_target(const char *s, double *offset, double *scale)
{
	json_t *o = json_loads(s, 0, NULL);
	json_t *a = o ? json_object_get(o, "offset") : NULL;
	json_t *b = o ? json_object_get(o, "scale") : NULL;
	int rc = MTLZ_ERR_FORMAT;

	if (json_is_number(a) && json_is_number(b) &&
	    isfinite(json_number_value(a)) && isfinite(json_number_value(b)) &&
	    json_number_value(b) != 0.0) {
		*offset = json_number_value(a);
		*scale = json_number_value(b);
		rc = MTLZ_OK;
	}
	json_decref(o);
	return rc;
}

mtlz_model *mtlz_model_load(const char *path, char *errstr, size_t errstr_size)
{
	return mtlz_model_load_ext(path, NULL, errstr, errstr_size);
}

mtlz_model *mtlz_model_load_ext(const char *path, mtlz_st **extra, char *errstr,
				size_t errstr_size)
{
	char err[512];
	mtlz_st *st = mtlz_st_read(path, errstr, errstr_size);
	mtlz_model *m = NULL;
	mtlz_arch arch;
	mtlz_grid grid;
	const char *s;

	if (!st)
		return NULL;
	s = mtlz_st_meta(st, "mtlz.format_version");
	if (!s) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			 "%s: not an mtlz model (no mtlz.format_version in "
			 "__metadata__)", path);
		goto out;
	}
	if (strcmp(s, MTLZ_MODEL_FORMAT_VERSION) != 0) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			 "%s: model format version %s, this build reads %s",
			 path, s, MTLZ_MODEL_FORMAT_VERSION);
		goto out;
	}
	s = mtlz_st_meta(st, "mtlz.arch");
	if (!s || mtlz_arch_from_json(&arch, s, err, sizeof(err)) != MTLZ_OK) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s: %s", path,
			 s ? err : "no mtlz.arch in __metadata__");
		goto out;
	}
	s = mtlz_st_meta(st, "mtlz.grid");
	if (!s || parse_grid(s, &grid) != MTLZ_OK) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			 "%s: mtlz.grid missing or not 'wmin,wmax,dw'", path);
		goto out;
	}
	m = model_alloc(&arch, &grid, err, sizeof(err));
	if (!m) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT, "%s: %s", path, err);
		goto out;
	}
	s = mtlz_st_meta(st, "mtlz.classes");
	if (s) {
		char buf[MTLZ_MAX_CLASSES * 33], *save = NULL, *tok;
		int c = 0;

		snprintf(buf, sizeof(buf), "%s", s);
		for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
			if (c < MTLZ_MAX_CLASSES)
				snprintf(m->class_names[c], sizeof(m->class_names[c]), "%s", tok);
			c++;
		}
		if (c != arch.n_classes) {
			mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				 "%s: mtlz.classes names %d classes, the "
				 "architecture has %d", path, c, arch.n_classes);
			goto out_free_model;
		}
	}
	s = mtlz_st_meta(st, "mtlz.target");
	if (s && parse_target(s, &m->target_offset, &m->target_scale) != MTLZ_OK) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			 "%s: mtlz.target must be {\"offset\":x,\"scale\":y} "
			 "with finite numbers and scale != 0", path);
		goto out_free_model;
	}
	s = mtlz_st_meta(st, "mtlz.calibration");
	if (s && parse_temperature(s) == 0.0) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
			 "%s: mtlz.calibration must be a JSON object with a "
			 "\"temperature\" in (0, 100]", path);
		goto out_free_model;
	}
	/* Every expected tensor present with the right dtype and shape ... */
	for (size_t i = 0; i < m->n_tensors; i++) {
		mtlz_tensor *t = &m->tensors[i];
		const mtlz_st_tensor *f = mtlz_st_find(st, t->name);

		if (!f) {
			mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				 "%s: tensor '%s' missing", path, t->name);
			goto out_free_model;
		}
		if (strcmp(f->dtype, "F32") != 0) {
			mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				 "%s: tensor '%s' has dtype %s, expected F32",
				 path, t->name, f->dtype);
			goto out_free_model;
		}
		if (f->ndim != t->ndim || f->shape[0] != t->shape[0] ||
		    (t->ndim > 1 && f->shape[1] != t->shape[1]) ||
		    (t->ndim > 2 && f->shape[2] != t->shape[2])) {
			char want[64], got[64];
			int n = 0;

			n = snprintf(got, sizeof(got), "[");
			for (int d = 0; d < f->ndim && n < 50; d++)
				n += snprintf(got + n, sizeof(got) - (size_t)n, "%s%lld",
					      d ? "," : "", (long long)f->shape[d]);
			snprintf(got + n, sizeof(got) - (size_t)n, "]");
			n = snprintf(want, sizeof(want), "[");
			for (int d = 0; d < t->ndim; d++)
				n += snprintf(want + n, sizeof(want) - (size_t)n, "%s%lld",
					      d ? "," : "", (long long)t->shape[d]);
			snprintf(want + n, sizeof(want) - (size_t)n, "]");
			mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
				 "%s: tensor '%s' has shape %s, the architecture "
				 "expects %s", path, t->name, got, want);
			goto out_free_model;
		}
		memcpy(t->data, f->data, t->n * sizeof(float));
		for (size_t j = 0; j < t->n; j++) {
			if (!isfinite(t->data[j])) {
				mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					 "%s: tensor '%s' element %zu is not finite",
					 path, t->name, j);
				goto out_free_model;
			}
		}
	}
	/* ... and nothing else. */
	if (mtlz_st_count(st) != m->n_tensors) {
		for (size_t i = 0; i < mtlz_st_count(st); i++) {
			if (extra && strncmp(mtlz_st_get(st, i)->name, "optim.", 6) == 0)
				continue;
			if (!mtlz_model_find(m, mtlz_st_get(st, i)->name)) {
				mtlz_err(errstr, errstr_size, MTLZ_ERR_FORMAT,
					 "%s: unexpected tensor '%s'", path,
					 mtlz_st_get(st, i)->name);
				goto out_free_model;
			}
		}
	}
	for (size_t i = 0; i < mtlz_st_meta_count(st); i++) {
		const char *k, *v;

		mtlz_st_meta_at(st, i, &k, &v);
		if (!is_managed_key(k))
			mtlz_model_set_meta(m, k, v);
	}
	if (extra) {   /* the caller reads the optim.* tensors */
		*extra = st;
		return m;
	}
	goto out;
out_free_model:
	mtlz_model_free(m);
	m = NULL;
out:
	mtlz_st_free(st);
	return m;
}

const char *mtlz_name_conv(char *buf, size_t n, int b, int conv, int bias)
{
	snprintf(buf, n, "backbone.blocks.%d.conv%d.%s", b, conv + 1, bias ? "bias" : "weight");
	return buf;
}

const char *mtlz_name_head(char *buf, size_t n, int h, int i, int bias)
{
	snprintf(buf, n, "heads.%s.fc%d.%s", h ? "metal" : "class", i + 1,
		 bias ? "bias" : "weight");
	return buf;
}
