/*
 * report.h - the evaluation report of a model: runs the model over labelled
 * archives with the inference engine (as mtlzd would), turns the results
 * into the metrics of metrics.h and writes a report folder: metrics.json,
 * one PNG per figure of the paper (Sects. 3.3-4.5, Figs. 4-10) and
 * report.md, a page that embeds the figures with the key numbers
 * (docs/report.md). Used by `mtlz eval` and `mtlz-retrain --eval`; nothing
 * here is on the daemon's path.
 *
 * The figures are drawn with PLplot's pngcairo device (libplplot +
 * plplot-driver-cairo). PLplot keeps global state, so the drawing is
 * serialised on a process-wide lock; PLplot itself exits the process on
 * internal errors (plexit), which the code avoids by checking the device
 * and every range before drawing.
 *
 * @locality any thread; mtlz_report_plots / mtlz_report_write take the
 * drawing lock (one report is drawn at a time per process).
 */
#ifndef MTLZ_REPORT_H
#define MTLZ_REPORT_H

#include "metrics.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/* Default size of every PNG, in pixels. */
#define MTLZ_REPORT_WIDTH 960
#define MTLZ_REPORT_HEIGHT 720

/* The figures, in the order of the page. */
enum mtlz_report_fig {
	MTLZ_FIG_LOSS,          /* loss.png: loss per task, training and validation (Fig. 4) */
	MTLZ_FIG_DWA,           /* dwa.png: DWA task weights per epoch (Fig. 5) */
	MTLZ_FIG_OH,            /* oh_pred_vs_true.png: density + 1:1, residual histogram (Fig. 6) */
	MTLZ_FIG_UNCERTAINTY,   /* uncertainty.png: MC-dropout sigma per Z_pred bin (Fig. 7) */
	MTLZ_FIG_CONFUSION,     /* confusion.png: counts and row-normalised (Fig. 8) */
	MTLZ_FIG_RELIABILITY,   /* reliability.png: accuracy vs confidence, ECE */
	MTLZ_FIG_BY_Z,          /* by_z.png: accuracy, SD and bias per redshift bin (Fig. 9a) */
	MTLZ_FIG_BY_SN,         /* by_sn.png: the same per S/N_r bin (Fig. 9b) */
	MTLZ_FIG_MZR,           /* mzr.png: mass-metallicity relation vs Tremonti+04 (Fig. 10) */
	MTLZ_N_FIGS,
};

/* What the report is drawn from. Only metrics is required. */
typedef struct mtlz_report_input {
	const json_t *metrics;        /* mtlz_metrics_json of the items */
	const mtlz_eval_item *items;  /* per-spectrum results; NULL: Fig. 6 and the
				       * MZR scatter are left out */
	size_t n_items;
	const json_t *history;        /* the "history" array of the model's
				       * mtlz.training manifest (docs/retrain.md); NULL
				       * or empty: no loss and DWA figures */
	const char *model;            /* shown on the page; may be NULL */
	char *const *data;            /* the archives, shown on the page */
	int n_data;
	int width, height;            /* PNG size in pixels; 0: the defaults */
} mtlz_report_input;

/* What mtlz_report_plots did, per figure. */
typedef struct mtlz_report_result {
	int drawn[MTLZ_N_FIGS];            /* 1: DIR/<file> was written */
	char why_not[MTLZ_N_FIGS][200];    /* when not drawn: why (for the page) */
} mtlz_report_result;

/* File name (e.g. "confusion.png") and one-line caption of figure fig;
 * NULL for an unknown fig. */
const char *mtlz_report_fig_file(int fig);
const char *mtlz_report_fig_caption(int fig);

/* Draws every figure the input has data for into the existing directory
 * dir (DIR/<mtlz_report_fig_file>); a figure without data is not written
 * (an old file of that name is removed) and res->why_not says why.
 * Returns MTLZ_OK, MTLZ_ERR_UNSUPPORTED (PLplot has no pngcairo device:
 * plplot-driver-cairo is missing), MTLZ_ERR_INVALID (no metrics, bad size)
 * or MTLZ_ERR_IO (a PNG could not be written). */
int mtlz_report_plots(const char *dir, const mtlz_report_input *in, mtlz_report_result *res,
		      char *errstr, size_t errstr_size);

/* The whole report folder: creates dir if needed, writes dir/metrics.json,
 * the figures (mtlz_report_plots) and dir/report.md (key numbers: accuracy,
 * F1 macro, metallicity SD and bias, ECE, sigma coverage; the tables; every
 * figure embedded with its caption, or the reason it is missing). */
int mtlz_report_write(const char *dir, const mtlz_report_input *in, char *errstr,
		      size_t errstr_size);

/* Pixel centre of the cell (true row r, predicted column c) of panel p
 * (0: counts, 1: row-normalised) of confusion.png drawn at w x h: where
 * the tests look for the cell's colour. */
void mtlz_report_confusion_cell(int w, int h, int p, int r, int c, int *px, int *py);

/* An evaluation run: model + archives -> metrics (+ report). */
typedef struct mtlz_report_eval_opts {
	const char *model;            /* model file (safetensors) */
	char *const *data;            /* archive directories or .avro files */
	int n_data;
	const char *schema_dir;       /* Avro schemas; NULL: $MTLZ_SCHEMA_DIR */
	int mc;                       /* MC-dropout passes for the sigma (0: none) */
	int threads;                  /* engine threads; 0: all cores */
	int n_boot;                   /* bootstrap resamples for the CIs (0: none) */
	uint64_t seed;                /* bootstrap seed */
	const char *report_dir;       /* NULL: no report folder */
	int width, height;            /* PNG size; 0: the defaults */
} mtlz_report_eval_opts;

/* Runs the model over every spectrum of the archives (preprocessed onto
 * the model's grid as the daemon does; rejected spectra are counted, not
 * scored), computes the metrics (mtlz_metrics_json_opts, plus the keys
 * "model" and "rejected_by_preprocessing") and, with o->report_dir, writes
 * the report with the training history of the model's manifest. Returns
 * the metrics object (caller json_decref) or NULL with errstr. If items is
 * non-NULL it receives the per-spectrum items (caller free()s them) and
 * *n_items their count. */
json_t *mtlz_report_eval(const mtlz_report_eval_opts *o, mtlz_eval_item **items,
			 size_t *n_items, char *errstr, size_t errstr_size);

#endif
