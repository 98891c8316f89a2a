/*
 * test_report.c - the evaluation report (report.h): every figure drawn from
 * a small known set of items and training history, read back with libpng
 * (a valid PNG of the requested size, not blank; the confusion matrix
 * coloured by its counts); figures without data left out with the reason
 * on the page; and `mtlz eval` end to end on the shipped SDSS atlas
 * archive (and `mtlz-retrain --eval` on a small synthetic one) with a
 * random model, whose report.md links only PNGs that exist.
 */
#include "common.h"
#include "labels.h"
#include "metrics.h"
#include "report.h"
#include "util.h"

#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MTLZ MTLZ_BIN_DIR "/mtlz"
#define ATLAS MTLZ_SOURCE_DIR "/data/sdss-atlas/archive"

enum { W = 640, H = 480 };

typedef struct image {
	int w, h;
	unsigned char *rgb; /* w * h * 3 */
} image;

/* Reads path as 8-bit RGB; asserts that it is a PNG. */
static image load_png(const char *path)
{
	png_image p;
	image im;

	memset(&p, 0, sizeof(p));
	p.version = PNG_IMAGE_VERSION;
	cr_assert(png_image_begin_read_from_file(&p, path), "%s: not a PNG (%s)", path, p.message);
	p.format = PNG_FORMAT_RGB;
	im.w = (int)p.width;
	im.h = (int)p.height;
	im.rgb = malloc(PNG_IMAGE_SIZE(p));
	cr_assert_not_null(im.rgb);
	cr_assert(png_image_finish_read(&p, NULL, im.rgb, 0, NULL), "%s: %s", path, p.message);
	return im;
}

static const unsigned char *px(const image *im, int x, int y)
{
	cr_assert(x >= 0 && x < im->w && y >= 0 && y < im->h, "pixel %d,%d outside", x, y);
	return im->rgb + ((size_t)y * (size_t)im->w + (size_t)x) * 3;
}

static double luminance(const unsigned char *c)
{
	return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
}

/* Distinct colours of the image and the fraction of non-white pixels. */
static long n_colours(const image *im, double *inked)
{
	unsigned char *seen = calloc(1 << 21, 1);
	long n = 0, ink = 0;

	cr_assert_not_null(seen);
	for (long i = 0; i < (long)im->w * im->h; i++) {
		const unsigned char *c = im->rgb + i * 3;
		const unsigned v = (unsigned)c[0] << 16 | (unsigned)c[1] << 8 | c[2];

		if (!(seen[v >> 3] & (1 << (v & 7)))) {
			seen[v >> 3] |= (unsigned char)(1 << (v & 7));
			n++;
		}
		ink += c[0] != 255 || c[1] != 255 || c[2] != 255;
	}
	free(seen);
	*inked = (double)ink / ((double)im->w * im->h);
	return n;
}

/* Asserts that dir/file is a valid, non-blank PNG of w x h. */
static void check_png(const char *dir, const char *file, int w, int h)
{
	char path[1024];
	image im;
	double inked;
	long n;

	snprintf(path, sizeof(path), "%s/%s", dir, file);
	im = load_png(path);
	cr_assert_eq(im.w, w, "%s: width %d, asked for %d", file, im.w, w);
	cr_assert_eq(im.h, h, "%s: height %d, asked for %d", file, im.h, h);
	n = n_colours(&im, &inked);
	/* anti-aliased text and lines alone give dozens of colours */
	cr_assert_geq(n, 20, "%s: only %ld colours", file, n);
	cr_assert_gt(inked, 0.01, "%s: %.4f of the pixels drawn", file, inked);
	cr_assert_lt(inked, 0.95, "%s: %.4f of the pixels drawn", file, inked);
	free(im.rgb);
}

static int exists(const char *dir, const char *file)
{
	char path[1024];
	struct stat st;

	snprintf(path, sizeof(path), "%s/%s", dir, file);
	return stat(path, &st) == 0;
}

static char *slurp(const char *path)
{
	FILE *f = fopen(path, "r");
	char *s;
	long n;

	cr_assert_not_null(f, "%s", path);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	rewind(f);
	s = calloc((size_t)n + 1, 1);
	cr_assert_eq(fread(s, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	return s;
}

static double gauss(mtlz_rng *r)
{
	double u = mtlz_rng_uniform(r), v = mtlz_rng_uniform(r);

	return sqrt(-2 * log(1 - u)) * cos(2 * M_PI * v);
}

/* n items: classes in turn, 85 % predicted right (confidence 0.4-1.0),
 * star-forming ones with a metallicity, its prediction (0.05 dex scatter)
 * and an MC sigma; redshift, S/N and (with masses) log M*. */
static mtlz_eval_item *make_items(size_t n, int masses)
{
	mtlz_eval_item *it = calloc(n, sizeof(*it));
	mtlz_rng r;

	cr_assert_not_null(it);
	mtlz_rng_seed(&r, 7);
	for (size_t i = 0; i < n; i++) {
		mtlz_eval_item *e = &it[i];
		const int t = (int)(i % MTLZ_N_CLASSES);
		const int p = mtlz_rng_uniform(&r) < 0.85 ? t : (t + 1) % MTLZ_N_CLASSES;
		const double conf = 0.4 + 0.6 * mtlz_rng_uniform(&r);

		e->true_cls = t;
		for (int k = 0; k < MTLZ_N_CLASSES; k++) {
			e->prob[k] = k == p ? (float)conf : (float)((1 - conf) / 3);
			e->logit[k] = logf(e->prob[k]);
		}
		e->oh_true = e->oh_pred = e->oh_sigma = NAN;
		e->z = 0.3 * mtlz_rng_uniform(&r);
		e->sn_r = 5 + 40 * mtlz_rng_uniform(&r);
		e->log_mass = masses ? 8.5 + 3 * mtlz_rng_uniform(&r) : NAN;
		if (t == MTLZ_CLASS_STAR_FORMING) {
			e->oh_true = masses ? mtlz_tremonti04_oh(e->log_mass) + 0.1 * gauss(&r) :
				     8.7 + 0.2 * gauss(&r);
			e->oh_pred = e->oh_true + 0.05 * gauss(&r);
			e->oh_sigma = 0.03 + 0.02 * mtlz_rng_uniform(&r);
		}
	}
	return it;
}

/* A training history of n epochs with the manifest's key names. */
static json_t *make_history(int n)
{
	json_t *h = json_array();

	for (int e = 1; e <= n; e++) {
		const double f = exp(-0.3 * e);

		json_array_append_new(h, json_pack("{s:i,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f}",
			"epoch", e, "train_class", 0.2 * f, "train_metal", 0.1 * f + 0.02,
			"train_total", 0.3 * f + 0.02, "val_class", 0.22 * f, "val_metal",
			0.11 * f + 0.03, "val_total", 0.33 * f + 0.03, "w_class",
			e <= 2 ? 1.0 : 1 + 0.1 * sin(e), "w_metal", e <= 2 ? 1.0 : 1 - 0.1 * sin(e),
			"lr", 1e-3, "seconds", 1.5));
	}
	return h;
}

Test(report, every_figure_from_known_data)
{
	char dir[256], err[512], *page;
	mtlz_eval_item *it = make_items(800, 1);
	json_t *m = mtlz_metrics_json(it, 800, err, sizeof(err)), *h = make_history(12);
	char *data[1] = { "synthetic" };
	mtlz_report_input in = { .metrics = m, .items = it, .n_items = 800, .history = h,
				 .model = "known.safetensors", .data = data, .n_data = 1,
				 .width = W, .height = H };

	cr_assert_not_null(m, "%s", err);
	tu_mkdtemp(dir, sizeof(dir), "report");
	cr_assert_eq(mtlz_report_write(dir, &in, err, sizeof(err)), MTLZ_OK, "%s", err);
	for (int f = 0; f < MTLZ_N_FIGS; f++)
		check_png(dir, mtlz_report_fig_file(f), W, H);
	cr_assert(exists(dir, "metrics.json"));
	snprintf(err, sizeof(err), "%s/report.md", dir);
	page = slurp(err);
	for (int f = 0; f < MTLZ_N_FIGS; f++) {
		char link[128];

		snprintf(link, sizeof(link), "](%s)", mtlz_report_fig_file(f));
		cr_assert(strstr(page, link), "report.md does not embed %s", link);
		cr_assert(strstr(page, mtlz_report_fig_caption(f)), "caption of %s missing",
			  mtlz_report_fig_file(f));
	}
	cr_assert_null(strstr(page, "not drawn"), "%s", page);
	/* the key numbers, as metrics.json has them */
	{
		char want[64];

		snprintf(want, sizeof(want), "| accuracy | %.4f |",
			 json_number_value(json_object_get(m, "accuracy")));
		cr_assert(strstr(page, want), "%s missing", want);
		snprintf(want, sizeof(want), "| ECE | %.4f |", json_number_value(json_object_get(
			 json_object_get(m, "calibration"), "ece")));
		cr_assert(strstr(page, want), "%s missing", want);
		cr_assert(strstr(page, "| F1 macro |") && strstr(page, "(oh_sd)") &&
			  strstr(page, "(oh_bias)") && strstr(page, "coverage within 1σ / 2σ"));
	}
	free(page);
	json_decref(m);
	json_decref(h);
	free(it);
	tu_rmtree(dir);
}

/* Items that give the confusion matrix counts[true][pred]. */
static mtlz_eval_item *confusion_items(const int counts[4][4], size_t *n)
{
	size_t k = 0, total = 0;
	mtlz_eval_item *it;

	for (int r = 0; r < 4; r++)
		for (int c = 0; c < 4; c++)
			total += (size_t)counts[r][c];
	it = calloc(total, sizeof(*it));
	cr_assert_not_null(it);
	for (int r = 0; r < 4; r++)
		for (int c = 0; c < 4; c++)
			for (int i = 0; i < counts[r][c]; i++, k++) {
				it[k].true_cls = r;
				for (int q = 0; q < 4; q++)
					it[k].prob[q] = q == c ? 0.7f : 0.1f;
				it[k].logit[0] = it[k].logit[1] = it[k].logit[2] = it[k].logit[3] = NAN;
				it[k].oh_true = it[k].oh_pred = it[k].oh_sigma = NAN;
				it[k].z = it[k].sn_r = it[k].log_mass = NAN;
			}
	*n = total;
	return it;
}

/* Colour of a cell of confusion.png, away from the number in its middle. */
static const unsigned char *cell(const image *im, int p, int r, int c)
{
	int x, y, x1, y1;

	mtlz_report_confusion_cell(im->w, im->h, p, r, c, &x, &y);
	mtlz_report_confusion_cell(im->w, im->h, p, r + 1, c + 1, &x1, &y1);
	/* a third of the way to the next cell's centre, up and left */
	return px(im, x - (x1 - x) / 3, y - (y1 - y) / 3);
}

Test(report, confusion_cells_coloured_by_counts)
{
	/* AGN never occurs: its normalised row is undefined */
	static const int counts[4][4] = {
		{ 120, 2, 0, 0 },
		{ 5, 40, 0, 0 },
		{ 0, 0, 10, 10 },
		{ 0, 0, 0, 0 },
	};
	char dir[256], err[512], path[600];
	size_t n;
	mtlz_eval_item *it = confusion_items(counts, &n);
	json_t *m = mtlz_metrics_json(it, n, err, sizeof(err));
	mtlz_report_input in = { .metrics = m, .width = W, .height = H };
	mtlz_report_result res;
	image im;

	cr_assert_not_null(m, "%s", err);
	tu_mkdtemp(dir, sizeof(dir), "report");
	cr_assert_eq(mtlz_report_plots(dir, &in, &res, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert(res.drawn[MTLZ_FIG_CONFUSION]);
	snprintf(path, sizeof(path), "%s/confusion.png", dir);
	im = load_png(path);
	/* counts: more spectra, a darker cell */
	cr_assert_lt(luminance(cell(&im, 0, 0, 0)), luminance(cell(&im, 0, 1, 1)), "120 vs 40");
	cr_assert_lt(luminance(cell(&im, 0, 1, 1)), luminance(cell(&im, 0, 2, 2)), "40 vs 10");
	cr_assert_lt(luminance(cell(&im, 0, 2, 2)), luminance(cell(&im, 0, 0, 2)) - 1, "10 vs 0");
	cr_assert_gt(luminance(cell(&im, 0, 0, 2)), 240, "an empty cell is (nearly) white");
	/* row-normalised: 120/122 darker than 40/45, 10/20 in between the
	 * extremes, the AGN row (no support) grey, not a map colour */
	cr_assert_lt(luminance(cell(&im, 1, 0, 0)), luminance(cell(&im, 1, 2, 2)));
	cr_assert_lt(luminance(cell(&im, 1, 2, 2)), luminance(cell(&im, 1, 0, 1)));
	{
		const unsigned char *g = cell(&im, 1, 3, 3);

		cr_assert(g[0] == g[1] && g[1] == g[2] && g[0] < 230 && g[0] > 150,
			  "undefined row: grey, got %d,%d,%d", g[0], g[1], g[2]);
	}
	free(im.rgb);
	json_decref(m);
	free(it);
	tu_rmtree(dir);
}

Test(report, figures_without_data_are_left_out_with_the_reason)
{
	char dir[256], err[512], path[600], *page;
	mtlz_eval_item *it = make_items(200, 0);
	json_t *m = mtlz_metrics_json(it, 200, err, sizeof(err));
	mtlz_report_input in = { .metrics = m, .items = it, .n_items = 200, .width = W,
				 .height = H };
	FILE *f;

	cr_assert_not_null(m, "%s", err);
	cr_assert(json_is_null(json_object_get(m, "mzr")));
	tu_mkdtemp(dir, sizeof(dir), "report");
	/* a figure of an earlier report must go */
	snprintf(path, sizeof(path), "%s/loss.png", dir);
	f = fopen(path, "w");
	cr_assert_not_null(f);
	fputs("stale", f);
	fclose(f);
	cr_assert_eq(mtlz_report_write(dir, &in, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_not(exists(dir, "loss.png"), "a stale loss.png survived");
	cr_assert_not(exists(dir, "dwa.png"));
	cr_assert_not(exists(dir, "mzr.png"));
	check_png(dir, "oh_pred_vs_true.png", W, H);
	check_png(dir, "confusion.png", W, H);
	snprintf(path, sizeof(path), "%s/report.md", dir);
	page = slurp(path);
	cr_assert(strstr(page, "loss.png not drawn: the model has no training history"), "%s",
		  page);
	cr_assert(strstr(page, "dwa.png not drawn: the model has no training history"));
	cr_assert(strstr(page, "mzr.png not drawn: no stellar masses"), "%s", page);
	cr_assert_null(strstr(page, "](loss.png)"));
	cr_assert_null(strstr(page, "](mzr.png)"));
	free(page);

	/* no per-spectrum items: no density figure; no sigmas: no Fig. 7 */
	for (size_t i = 0; i < 200; i++)
		it[i].oh_sigma = NAN;
	json_decref(m);
	m = mtlz_metrics_json(it, 200, err, sizeof(err));
	in.metrics = m;
	in.items = NULL;
	in.n_items = 0;
	cr_assert_eq(mtlz_report_write(dir, &in, err, sizeof(err)), MTLZ_OK, "%s", err);
	cr_assert_not(exists(dir, "oh_pred_vs_true.png"));
	cr_assert_not(exists(dir, "uncertainty.png"));
	page = slurp(path);
	cr_assert(strstr(page, "oh_pred_vs_true.png not drawn: no per-spectrum predictions"));
	cr_assert(strstr(page, "uncertainty.png not drawn: no MC-dropout uncertainties"));
	free(page);
	json_decref(m);
	free(it);
	tu_rmtree(dir);
}

Test(report, bad_input_is_refused)
{
	char err[256];
	mtlz_report_result res;
	json_t *m = json_object();
	mtlz_report_input in = { .metrics = NULL };

	cr_assert_eq(mtlz_report_plots("/tmp", &in, &res, err, sizeof(err)), MTLZ_ERR_INVALID);
	in.metrics = m;
	in.width = 10;
	in.height = 10;
	cr_assert_eq(mtlz_report_plots("/tmp", &in, &res, err, sizeof(err)), MTLZ_ERR_INVALID);
	cr_assert(strstr(err, "10x10"), "%s", err);
	json_decref(m);
}

/* Every "](X.png)" link of dir/report.md names a valid PNG in dir; returns
 * how many there are. */
static int check_links(const char *dir, int w, int h)
{
	char path[600], *page, *p;
	int n = 0;

	snprintf(path, sizeof(path), "%s/report.md", dir);
	page = slurp(path);
	for (p = strstr(page, "]("); p; p = strstr(p + 2, "](")) {
		char file[128];
		const char *e = strchr(p + 2, ')');

		cr_assert_not_null(e);
		cr_assert_lt((size_t)(e - p - 2), sizeof(file));
		memcpy(file, p + 2, (size_t)(e - p - 2));
		file[e - p - 2] = '\0';
		if (!strstr(file, ".png"))
			continue;
		cr_assert(exists(dir, file), "report.md links %s, which is not there", file);
		check_png(dir, file, w, h);
		n++;
	}
	cr_assert(strstr(page, "loss.png not drawn: the model has no training history"),
		  "a random model has no history: %s", page);
	free(page);
	return n;
}

Test(report, eval_cli_end_to_end_on_the_atlas)
{
	char dir[256], cmd[2048], path[600];
	json_error_t je;
	json_t *j;

	tu_mkdtemp(dir, sizeof(dir), "report");
	snprintf(cmd, sizeof(cmd), MTLZ " init -o %s/m.safetensors --seed 1 2>%s/init.log", dir,
		 dir);
	cr_assert_eq(system(cmd), 0, "mtlz init");
	snprintf(cmd, sizeof(cmd), MTLZ " eval --model %s/m.safetensors --data " ATLAS
		 " --mc 5 --threads 2 --plot-size 480x360 --report %s/rep > %s/eval.json "
		 "2>%s/eval.log", dir, dir, dir, dir);
	cr_assert_eq(system(cmd), 0, "mtlz eval (see %s/eval.log)", dir);
	snprintf(path, sizeof(path), "%s/eval.json", dir);
	j = json_load_file(path, 0, &je);
	cr_assert_not_null(j, "%s: %s", path, je.text);
	cr_assert_eq(json_integer_value(json_object_get(j, "n_items")), 766);
	json_decref(j);
	snprintf(path, sizeof(path), "%s/rep", dir);
	/* the atlas has redshifts and stellar masses: at least Figs. 6-10 */
	cr_assert_geq(check_links(path, 480, 360), 6);
	cr_assert(exists(path, "mzr.png") && exists(path, "confusion.png") &&
		  exists(path, "oh_pred_vs_true.png"));
	tu_rmtree(path);

	/* mtlz-retrain --eval: the same evaluation and report, on a small
	 * synthetic archive (an ASan build evaluates the atlas in 14 s) */
	snprintf(cmd, sizeof(cmd), MTLZ " synth -n 48 --seed 2 -o %s/synth 2>%s/synth.log && "
		 MTLZ_BIN_DIR "/mtlz-retrain --eval %s/m.safetensors %s/synth --threads 2 "
		 "--report %s/rep2 > %s/eval2.json 2>%s/eval2.log", dir, dir, dir, dir, dir, dir,
		 dir);
	cr_assert_eq(system(cmd), 0, "mtlz-retrain --eval (see %s/eval2.log)", dir);
	snprintf(path, sizeof(path), "%s/eval2.json", dir);
	j = json_load_file(path, 0, &je);
	cr_assert_not_null(j, "%s: %s", path, je.text);
	cr_assert_eq(json_integer_value(json_object_get(j, "n_items")) +
		     json_integer_value(json_object_get(j, "rejected_by_preprocessing")), 48);
	json_decref(j);
	snprintf(path, sizeof(path), "%s/rep2", dir);
	cr_assert_geq(check_links(path, MTLZ_REPORT_WIDTH, MTLZ_REPORT_HEIGHT), 5);
	tu_rmtree(path);
	snprintf(path, sizeof(path), "%s/synth", dir);
	tu_rmtree(path);
	tu_rmtree(dir);
}
