/*
 * cmd_preprocess.c - `mtlz preprocess -o OUT.fits FILE...`: writes exactly
 * what the network sees. Primary HDU: float32 image N x L (NAXIS1 = L model
 * pixels, NAXIS2 = N spectra; a linear WCS on axis 1 gives the wavelength);
 * HDU 2 "SPECTRA": one table row per image row with the spectrum's id,
 * source, redshift, S/N, quality flags and reject reason. Rejected spectra
 * keep their row (all zeros) so that row i always matches table row i.
 */
#include "cli.h"
#include "common.h"

#include <fitsio.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
	"usage: mtlz preprocess -o OUT.fits [--mask-bits BITS] FILE...\n"
	"Writes the model-grid spectra (3840-9000 A at 1 A, divided by their mean\n"
	"flux) as a FITS image N x 5161 (float32) plus a binary table SPECTRA of\n"
	"spec ids, sources, flags and reject reasons, one row per image row.\n";

#define ROW_CHUNK 256

struct prep {
	fitsfile *f;
	int L;
	long n, cap;
	struct row {
		char spec_id[64], survey[16], source[256], flags[160], reject[24];
		double z, sn, coverage, bad_frac, mean_flux;
		int zwarning;
		long flagbits;
	} *rows;
	int status;
};

static int on_item(void *opaque, const cli_item *it)
{
	struct prep *p = opaque;
	struct row *r;

	if (p->n == p->cap) {
		long naxes[2] = { p->L, p->cap + ROW_CHUNK };
		struct row *nr = realloc(p->rows, (size_t)naxes[1] * sizeof(*nr));

		if (!nr)
			return -1;
		p->rows = nr;
		p->cap = naxes[1];
		if (fits_resize_img(p->f, FLOAT_IMG, 2, naxes, &p->status))
			return -1;
	}
	{
		long fpixel[2] = { 1, p->n + 1 };

		if (fits_write_pix(p->f, TFLOAT, fpixel, p->L, (void *)it->x, &p->status))
			return -1;
	}
	r = &p->rows[p->n++];
	memset(r, 0, sizeof(*r));
	snprintf(r->spec_id, sizeof(r->spec_id), "%s", it->s->spec_id);
	snprintf(r->survey, sizeof(r->survey), "%s", it->s->survey);
	snprintf(r->source, sizeof(r->source), "%s", it->s->source);
	mtlz_flags_str(it->info.flags, r->flags, sizeof(r->flags));
	snprintf(r->reject, sizeof(r->reject), "%s",
		 it->info.reject ? mtlz_reject_str(it->info.reject) : "");
	r->z = it->s->z;
	r->sn = it->s->sn;
	r->zwarning = it->s->zwarning;
	r->flagbits = (long)it->info.flags;
	r->coverage = it->info.coverage;
	r->bad_frac = it->info.bad_frac;
	r->mean_flux = it->info.mean_flux;
	return 0;
}

static void write_table(struct prep *p)
{
	char *ttype[] = { "SPEC_ID", "SURVEY", "SOURCE", "Z", "SN", "ZWARNING",
			  "FLAGS", "FLAG_NAMES", "REJECT", "COVERAGE", "BAD_FRAC",
			  "MEAN_FLUX" };
	char *tform[] = { "64A", "16A", "256A", "1D", "1D", "1J", "1J", "160A",
			  "24A", "1D", "1D", "1D" };
	int *st = &p->status;

	fits_create_tbl(p->f, BINARY_TBL, p->n, 12, ttype, tform, NULL, "SPECTRA", st);
	for (long i = 0; i < p->n && !*st; i++) {
		struct row *r = &p->rows[i];
		char *s;

		s = r->spec_id; fits_write_col(p->f, TSTRING, 1, i + 1, 1, 1, &s, st);
		s = r->survey; fits_write_col(p->f, TSTRING, 2, i + 1, 1, 1, &s, st);
		s = r->source; fits_write_col(p->f, TSTRING, 3, i + 1, 1, 1, &s, st);
		fits_write_col(p->f, TDOUBLE, 4, i + 1, 1, 1, &r->z, st);
		fits_write_col(p->f, TDOUBLE, 5, i + 1, 1, 1, &r->sn, st);
		fits_write_col(p->f, TINT, 6, i + 1, 1, 1, &r->zwarning, st);
		fits_write_col(p->f, TLONG, 7, i + 1, 1, 1, &r->flagbits, st);
		s = r->flags; fits_write_col(p->f, TSTRING, 8, i + 1, 1, 1, &s, st);
		s = r->reject; fits_write_col(p->f, TSTRING, 9, i + 1, 1, 1, &s, st);
		fits_write_col(p->f, TDOUBLE, 10, i + 1, 1, 1, &r->coverage, st);
		fits_write_col(p->f, TDOUBLE, 11, i + 1, 1, 1, &r->bad_frac, st);
		fits_write_col(p->f, TDOUBLE, 12, i + 1, 1, 1, &r->mean_flux, st);
	}
}

int cmd_preprocess(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "output", required_argument, 0, 'o' },
		{ "mask-bits", required_argument, 0, 'k' },
		{ "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	struct prep p = { 0 };
	const char *out = NULL;
	char path[4200], err[512], fitserr[FLEN_STATUS];
	mtlz_prep_opts po;
	long naxes[2];
	int opt, n_failed, rc = EXIT_RUNTIME;

	mtlz_prep_opts_default(&po);
	optind = 1;
	while ((opt = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
		switch (opt) {
		case 'o': out = optarg; break;
		case 'k':
			if (mtlz_mask_bits_parse(optarg, &po.and_mask_bits, err, sizeof(err))) {
				cli_error("preprocess: --mask-bits: %s", err);
				return EXIT_USAGE;
			}
			break;
		case 'h': fputs(usage, stdout); return EXIT_OK;
		default: fputs(usage, stderr); return EXIT_USAGE;
		}
	}
	if (!out || optind >= argc) {
		cli_error("preprocess: %s", !out ? "-o OUT.fits is required" : "no input files");
		fputs(usage, stderr);
		return EXIT_USAGE;
	}
	p.L = mtlz_grid_length(&po.grid);
	naxes[0] = p.L;
	naxes[1] = 0;
	snprintf(path, sizeof(path), "!%s", out); /* '!' = overwrite */
	if (fits_create_file(&p.f, path, &p.status) ||
	    fits_create_img(p.f, FLOAT_IMG, 2, naxes, &p.status))
		goto out_fits;
	n_failed = cli_for_each_spectrum(argv + optind, argc - optind, &po, on_item, &p);
	if (n_failed < 0 && !p.status) {
		cli_error("preprocess: out of memory");
		goto out_close;
	}
	naxes[1] = p.n;
	fits_resize_img(p.f, FLOAT_IMG, 2, naxes, &p.status);
	fits_write_key(p.f, TDOUBLE, "CRVAL1", &po.grid.wmin, "wavelength of pixel 1 [Angstrom]", &p.status);
	fits_write_key(p.f, TDOUBLE, "CDELT1", &po.grid.dw, "pixel step [Angstrom]", &p.status);
	{
		double one = 1.0;

		fits_write_key(p.f, TDOUBLE, "CRPIX1", &one, "reference pixel", &p.status);
	}
	fits_write_key(p.f, TSTRING, "CTYPE1", "WAVE", "vacuum wavelength, observed frame", &p.status);
	fits_write_key(p.f, TSTRING, "CUNIT1", "Angstrom", NULL, &p.status);
	fits_write_key(p.f, TSTRING, "BUNIT", "", "flux / mean flux (dimensionless)", &p.status);
	fits_write_comment(p.f, "mtlz preprocess: row i = spectrum i of HDU SPECTRA; "
			   "rejected spectra are all zeros", &p.status);
	write_table(&p);
	if (p.status)
		goto out_fits;
	fprintf(stderr, "mtlz: wrote %s (%ld spectra, %d unreadable file%s)\n", out,
		p.n, n_failed, n_failed == 1 ? "" : "s");
	rc = n_failed ? EXIT_RUNTIME : EXIT_OK;
	goto out_close;
out_fits:
	fits_get_errstatus(p.status, fitserr);
	cli_error("preprocess: %s: %s", out, fitserr);
out_close:
	if (p.f) {
		int st = 0;

		fits_close_file(p.f, &st);
	}
	free(p.rows);
	return rc;
}
