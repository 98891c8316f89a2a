/*
 * cmd_archive.c - `mtlz archive -o DIR [options] SPECFILE|DIR...`: the
 * paper's Section 2.1 selection from SDSS spec files, labelled by the
 * MPA-JHU and Portsmouth catalogues (Table 1) or, without catalogues, by
 * the spec files' own emission-line fits (docs/labels.md). Prints how many
 * spectra each cut removed.
 */
#define _GNU_SOURCE
#include "archive.h"
#include "bpt.h"
#include "cli.h"
#include "common.h"
#include "fits_io.h"
#include "sdss_labels.h"

#include <dirent.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char usage[] =
	"usage: mtlz archive -o DIR [options] SPECFILE|DIR...\n"
	"Selects and labels SDSS spec files as the paper's Section 2.1 does and writes\n"
	"them into a training archive (docs/labels.md):\n"
	"  0.002 < z < 0.3, ZWARNING = 0, S/N_r >= 5, both catalogues' classes agree\n"
	"  under Table 1, OH_P50 present for star-forming galaxies.\n"
	"  -o, --output DIR       archive directory (created; must not hold an archive)\n"
	"      --mpajhu FILE      MPA-JHU galSpecExtra FITS table (BPTCLASS, OH_P16/50/84,\n"
	"                         LGM_TOT_P50, LGM_FIB_P50; SPECOBJID or PLATEID/MJD/FIBERID)\n"
	"      --portsmouth FILE  Portsmouth emissionLinesPort FITS table (BPT; SPECOBJID\n"
	"                         or PLATE/MJD/FIBERID)\n"
	"                         without both catalogues, labels come from each file's\n"
	"                         SPZLINE emission-line fits (BPT + Pettini & Pagel 2004)\n"
	"      --z-min Z          (default 0.002)   --z-max Z (default 0.3)\n"
	"      --sn-min S         minimum S/N_r (default 5)\n"
	"      --balance          the same number of spectra per class (the smallest\n"
	"                         class's), drawn at random with --seed\n"
	"      --per-class N      at most N spectra per class, drawn with --seed\n"
	"      --seed S           (default 1)\n"
	"      --per-file N       records per archive file (default 10000)\n"
	"      --codec C          deflate (default) or null\n";

enum cut {
	CUT_UNREADABLE, CUT_NOT_SDSS, CUT_REDSHIFT, CUT_ZWARNING, CUT_SN, CUT_NO_MPA,
	CUT_NO_PORT, CUT_CLASS, CUT_NO_OH, CUT_BALANCE, N_CUTS
};

static const char *const cut_names[N_CUTS] = {
	"unreadable file", "not an SDSS spec file (no SPECOBJ/SPALL)",
	"redshift outside the range", "ZWARNING != 0", "S/N_r below the minimum",
	"not in the MPA-JHU catalogue", "not in the Portsmouth catalogue",
	"no agreed class (Table 1)", "star-forming without a metallicity",
	"balanced subsampling",
};

struct sel {
	double z_min, z_max, sn_min;
	mtlz_catalog *mpa, *port;
	long cuts[N_CUTS], n_read, by_class[MTLZ_N_CLASSES];
};

/* Labels of spectrum s read from path, or the cut that removes it. */
static int select_one(struct sel *sel, const char *path, const mtlz_spectrum *s,
		      mtlz_labels *lb)
{
	mtlz_sdss_info in;
	char err[512];
	const char *why;

	if (mtlz_sdss_info_read(path, &in, err, sizeof(err)))
		return CUT_NOT_SDSS;
	mtlz_labels_init(lb);
	lb->z = s->z;
	lb->sn_r = in.sn_r;
	mtlz_labels_kv_add(lb->params, &lb->n_params, "file", "%s", strrchr(path, '/') ?
			   strrchr(path, '/') + 1 : path);
	if (!(s->z > sel->z_min && s->z < sel->z_max))
		return CUT_REDSHIFT;
	if (s->zwarning != 0)
		return CUT_ZWARNING;
	if (!(in.sn_r >= sel->sn_min))
		return CUT_SN;
	if (sel->mpa) {
		const mtlz_catalog_row *m = mtlz_catalog_find(sel->mpa, in.specobjid, in.plate,
							      in.mjd, in.fiber);
		const mtlz_catalog_row *p = mtlz_catalog_find(sel->port, in.specobjid, in.plate,
							      in.mjd, in.fiber);
		int cm, cp;

		if (!m)
			return CUT_NO_MPA;
		if (!p)
			return CUT_NO_PORT;
		cm = mtlz_class_from_bptclass(m->bptclass);
		cp = mtlz_class_from_portsmouth(p->bpt);
		mtlz_labels_kv_add(lb->survey, &lb->n_survey, "BPTCLASS", "%d", m->bptclass);
		mtlz_labels_kv_add(lb->survey, &lb->n_survey, "BPT", "%s", p->bpt);
		if (isfinite(m->oh_p50))
			mtlz_labels_kv_add(lb->survey, &lb->n_survey, "OH_P50", "%.4f", m->oh_p50);
		if (isfinite(m->lgm_fib_p50))
			mtlz_labels_kv_add(lb->survey, &lb->n_survey, "LGM_FIB_P50", "%.4f",
					   m->lgm_fib_p50);
		if (cm == MTLZ_CLASS_NONE || cm != cp)
			return CUT_CLASS;
		lb->cls = cm;
		lb->log_mass = isfinite(m->lgm_tot_p50) ? m->lgm_tot_p50 : NAN;
		if (cm == MTLZ_CLASS_STAR_FORMING) {
			if (!isfinite(m->oh_p50))
				return CUT_NO_OH;
			lb->oh = m->oh_p50;
			if (isfinite(m->oh_p16) && isfinite(m->oh_p84))
				lb->oh_err = 0.5 * ((double)m->oh_p84 - m->oh_p16);
		}
		snprintf(lb->source_name, sizeof(lb->source_name),
			 "MPA-JHU galSpecExtra + Portsmouth emissionLinesPort");
		snprintf(lb->source_method, sizeof(lb->source_method),
			 "paper Table 1, both catalogues agree; metallicity OH_P50");
		return -1;
	}
	snprintf(lb->source_name, sizeof(lb->source_name), "SDSS SPZLINE");
	if (mtlz_labels_from_lines(&in, lb, &why) == MTLZ_CLASS_NONE)
		return CUT_CLASS;
	if (lb->cls == MTLZ_CLASS_STAR_FORMING && !isfinite(lb->oh))
		return CUT_NO_OH;
	return -1;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int is_fits_name(const char *n)
{
	const size_t l = strlen(n);

	return (l > 5 && !strcmp(n + l - 5, ".fits")) || (l > 8 && !strcmp(n + l - 8, ".fits.gz")) ||
	       (l > 4 && !strcmp(n + l - 4, ".fit"));
}

/* The spec files of the arguments (directories expanded, sorted). */
static char **list_files(char **args, int n_args, int *n)
{
	char **v = NULL;
	int cnt = 0, cap = 0;

	for (int i = 0; i < n_args; i++) {
		struct stat st;
		char **add = NULL;
		int n_add = 0;

		if (stat(args[i], &st) == 0 && S_ISDIR(st.st_mode)) {
			DIR *d = opendir(args[i]);
			struct dirent *de;

			while (d && (de = readdir(d)))
				if (is_fits_name(de->d_name)) {
					char **na = realloc(add, (size_t)(n_add + 1) * sizeof(*add));

					if (!na)
						break;
					add = na;
					if (asprintf(&add[n_add], "%s/%s", args[i], de->d_name) >= 0)
						n_add++;
				}
			if (d)
				closedir(d);
			if (n_add)
				qsort(add, (size_t)n_add, sizeof(*add), cmp_str);
		} else {
			add = malloc(sizeof(*add));
			if (add && (add[0] = strdup(args[i])))
				n_add = 1;
		}
		for (int k = 0; k < n_add; k++) {
			if (cnt == cap) {
				char **nv = realloc(v, (size_t)(cap = cap ? 2 * cap : 64) * sizeof(*v));

				if (!nv)
					break;
				v = nv;
			}
			v[cnt++] = add[k];
		}
		free(add);
	}
	*n = cnt;
	return v;
}

struct kept {
	int file, cls;
};

int cmd_archive(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "output", required_argument, 0, 'o' },
		{ "mpajhu", required_argument, 0, 'm' },
		{ "portsmouth", required_argument, 0, 'p' },
		{ "z-min", required_argument, 0, 'a' },
		{ "z-max", required_argument, 0, 'b' },
		{ "sn-min", required_argument, 0, 's' },
		{ "balance", no_argument, 0, 'B' },
		{ "per-class", required_argument, 0, 'k' },
		{ "seed", required_argument, 0, 'S' },
		{ "per-file", required_argument, 0, 'n' },
		{ "codec", required_argument, 0, 'c' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	struct sel sel = { .z_min = 0.002, .z_max = 0.3, .sn_min = 5.0 };
	const char *out = NULL, *mpa_path = NULL, *port_path = NULL, *codec = "deflate";
	const char *schemas = getenv("MTLZ_SCHEMA_DIR");
	int opt, balance = 0, per_class = 0, per_file = 10000, n_files = 0, rc = EXIT_OK;
	long long seed = 1;
	char err[512], **files = NULL, *end;
	struct kept *kept = NULL;
	int n_kept = 0, take[MTLZ_N_CLASSES] = { 0 };
	mtlz_archive_writer *w = NULL;
	mtlz_avro *avro = NULL;

	optind = 1;
	while ((opt = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
		double *dst = NULL;

		switch (opt) {
		case 'o': out = optarg; break;
		case 'm': mpa_path = optarg; break;
		case 'p': port_path = optarg; break;
		case 'a': dst = &sel.z_min; break;
		case 'b': dst = &sel.z_max; break;
		case 's': dst = &sel.sn_min; break;
		case 'B': balance = 1; break;
		case 'k':
			if (mtlz_parse_int(optarg, 1, 1 << 30, &per_class) < 0) {
				cli_error("archive: --per-class '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'S':
			seed = strtoll(optarg, &end, 10);
			if (*end || end == optarg || seed < 0) {
				cli_error("archive: --seed '%s': a non-negative integer", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'n':
			if (mtlz_parse_int(optarg, 1, 1 << 30, &per_file) < 0) {
				cli_error("archive: --per-file '%s' invalid", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'c': codec = optarg; break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
		if (dst) {
			*dst = strtod(optarg, &end);
			if (*end || end == optarg || !isfinite(*dst)) {
				cli_error("archive: %s '%s': a number", argv[optind - 2], optarg);
				return EXIT_USAGE;
			}
		}
	}
	if (!out || optind == argc) {
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	if (!mpa_path != !port_path) {
		cli_error("archive: the paper's selection needs both catalogues (--mpajhu and "
			  "--portsmouth); give neither to label from SPZLINE");
		return EXIT_USAGE;
	}
	if (strcmp(codec, "deflate") && strcmp(codec, "null")) {
		cli_error("archive: --codec '%s': deflate or null", codec);
		return EXIT_USAGE;
	}
	if (mpa_path) {
		sel.mpa = mtlz_catalog_load(mpa_path, MTLZ_CAT_MPAJHU, err, sizeof(err));
		sel.port = sel.mpa ? mtlz_catalog_load(port_path, MTLZ_CAT_PORTSMOUTH, err,
						       sizeof(err)) : NULL;
		if (!sel.port) {
			cli_error("archive: %s", err);
			rc = EXIT_RUNTIME;
			goto out;
		}
		fprintf(stderr, "archive: catalogues: MPA-JHU %zu rows, Portsmouth %zu rows\n",
			mtlz_catalog_rows(sel.mpa), mtlz_catalog_rows(sel.port));
	} else {
		fprintf(stderr, "archive: no catalogues: labels from the SPZLINE line fits\n");
	}
	avro = mtlz_avro_new(schemas ? schemas : MTLZ_SCHEMA_DIR, NULL, err, sizeof(err));
	if (avro)
		w = mtlz_archive_writer_open(avro, out, "part", (size_t)per_file, codec, err,
					     sizeof(err));
	if (!w) {
		cli_error("archive: %s", err);
		rc = EXIT_RUNTIME;
		goto out;
	}
	files = list_files(argv + optind, argc - optind, &n_files);
	kept = calloc((size_t)n_files + 1, sizeof(*kept));
	if (!kept) {
		cli_error("archive: out of memory");
		rc = EXIT_RUNTIME;
		goto out;
	}
	/* pass 1: select (and write when there is no subsampling) */
	for (int pass = 0; pass < 2; pass++) {
		for (int i = 0; i < n_files; i++) {
			mtlz_spectra sp = { 0 };
			mtlz_labels lb;
			int cut;

			if (pass == 1 && (kept[i].cls < 0 || !take[kept[i].cls]))
				continue;   /* cut, or not drawn */
			if (mtlz_fits_read(files[i], &sp, err, sizeof(err))) {
				if (pass == 0) {
					cli_error("archive: %s", err);
					sel.cuts[CUT_UNREADABLE]++;
				}
				kept[i].cls = -1;
				continue;
			}
			for (size_t k = 0; k < sp.n; k++) {   /* SDSS: one per file */
				if (pass == 0)
					sel.n_read++;
				cut = select_one(&sel, files[i], &sp.v[k], &lb);
				if (cut >= 0) {
					if (pass == 0)
						sel.cuts[cut]++;
					kept[i].cls = -1;
					continue;
				}
				if (pass == 0) {
					kept[i].cls = lb.cls;
					sel.by_class[lb.cls]++;
					n_kept++;
				} else {
					take[lb.cls]--;
				}
				if ((pass == 0 && !balance && !per_class) || pass == 1)
					if (mtlz_archive_writer_add(w, &sp.v[k], &lb, err, sizeof(err))) {
						cli_error("archive: %s", err);
						rc = EXIT_RUNTIME;
					}
				break;
			}
			mtlz_spectra_free(&sp);
			if (rc)
				goto out;
		}
		if (pass == 1 || (!balance && !per_class))
			break;
		/* subsample: how many per class, and which (random, seeded) */
		{
			long lim = per_class ? per_class : LONG_MAX;
			mtlz_rng r;

			for (int c = 0; c < MTLZ_N_CLASSES && balance; c++)
				lim = MTLZ_MIN(lim, sel.by_class[c]);
			mtlz_rng_seed(&r, (uint64_t)seed);
			for (int c = 0; c < MTLZ_N_CLASSES; c++) {
				long have = sel.by_class[c], keep = MTLZ_MIN(have, lim);
				int *idx = malloc((size_t)(have + 1) * sizeof(int));
				long m = 0;

				for (int i = 0; idx && i < n_files; i++)
					if (kept[i].cls == c)
						idx[m++] = i;
				/* partial Fisher-Yates: the first `keep` are the draw */
				for (long j = 0; idx && j < keep; j++) {
					long t = j + (long)(mtlz_rng_uniform(&r) * (double)(have - j));
					int x;

					t = MTLZ_MIN(t, have - 1);
					x = idx[j], idx[j] = idx[t], idx[t] = x;
				}
				for (long j = keep; idx && j < have; j++)
					kept[idx[j]].cls = -1;   /* not drawn */
				free(idx);
				sel.cuts[CUT_BALANCE] += have - keep;
				sel.by_class[c] = keep;
				take[c] = (int)keep;
			}
		}
	}
	if (mtlz_archive_writer_close(w, err, sizeof(err))) {
		cli_error("archive: %s", err);
		rc = EXIT_RUNTIME;
	}
	w = NULL;
	fprintf(stderr, "archive: %ld spectra read from %d files\n", sel.n_read, n_files);
	for (int c = 0; c < N_CUTS; c++)
		if (sel.cuts[c] || c < CUT_BALANCE)
			fprintf(stderr, "archive: removed %8ld  %s\n", sel.cuts[c], cut_names[c]);
	fprintf(stderr, "archive: kept %ld: passive %ld, star_forming %ld, composite %ld, "
		"agn %ld -> %s\n", sel.by_class[0] + sel.by_class[1] + sel.by_class[2] +
		sel.by_class[3], sel.by_class[0], sel.by_class[1], sel.by_class[2],
		sel.by_class[3], out);
	if (sel.cuts[CUT_UNREADABLE] && rc == EXIT_OK)
		rc = EXIT_RUNTIME;   /* said above which; the rest is written */
out:
	mtlz_archive_writer_abort(w);
	mtlz_avro_free(avro);
	mtlz_catalog_free(sel.mpa);
	mtlz_catalog_free(sel.port);
	for (int i = 0; i < n_files; i++)
		free(files[i]);
	free(files);
	free(kept);
	return rc;
}
