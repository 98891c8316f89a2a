/*
 * input.c - the CLI's input loop: FITS file -> spectra -> model grid.
 */
#include "cli.h"
#include "common.h"

#include <stdio.h>
#include <stdlib.h>

int cli_for_each_spectrum(char **files, int n_files, const mtlz_prep_opts *o,
			  cli_item_fn fn, void *opaque)
{
	const int L = mtlz_grid_length(&o->grid);
	mtlz_prep_ws *ws = mtlz_prep_ws_new();
	float *x = malloc((size_t)L * sizeof(float));
	int n_failed = 0, rc = 0;
	char err[512];

	if (!ws || !x) {
		cli_error("out of memory");
		rc = -1;
		goto out;
	}
	for (int f = 0; f < n_files && rc == 0; f++) {
		mtlz_spectra sp = { 0 };

		if (mtlz_fits_read(files[f], &sp, err, sizeof(err)) != MTLZ_OK) {
			cli_error("%s", err);
			n_failed++;
			continue;
		}
		for (size_t i = 0; i < sp.n && rc == 0; i++) {
			cli_item it = { .s = &sp.v[i], .x = x, .reject_msg = "" };

			err[0] = '\0';
			if (mtlz_preprocess(&sp.v[i], o, ws, x, &it.info, err,
					    sizeof(err)) == MTLZ_ERR_NOMEM) {
				cli_error("out of memory");
				rc = -1;
				break;
			}
			if (it.info.flags & MTLZ_FLAG_REJECTED) {
				it.reject_msg = err;
				cli_error("%s: rejected (%s)", err,
					  mtlz_reject_str(it.info.reject));
			}
			if (fn(opaque, &it) != 0)
				rc = -1;
		}
		mtlz_spectra_free(&sp);
	}
out:
	mtlz_prep_ws_free(ws);
	free(x);
	return rc < 0 ? rc : n_failed;
}
