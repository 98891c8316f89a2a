/*
 * train_impl.h - the trainer's forward and backward passes, written once
 * for a scalar type: train.c includes it with
 *   REAL  float | double
 *   GEMM  cblas_sgemm | cblas_dgemm
 *   TR    struct name, FN(x) the function-name prefix.
 * See train.h for the layout and the conventions. With TRUNK_NLC defined
 * (float), the convolutional trunk runs channels-last (train_nlc.h) unless
 * MTLZ_TRAIN_TRUNK=im2col asks for the [C][B][L] im2col + BLAS trunk below.
 */

struct TR {
	mtlz_arch a;
	int n_threads, max_batch, c_last, att_hidden;
	double tgt_off, tgt_scale;
	REAL *p;                       /* packed parameters */
	size_t n_p;
	struct {
		int cin, cout;
		size_t ow, ob;         /* offsets in p */
	} conv[2 * MTLZ_MAX_BLOCKS];
	size_t o_aw1, o_ab1, o_aw2, o_ab2;
	struct {
		int n_layers, in[MTLZ_MAX_HIDDEN + 1], out[MTLZ_MAX_HIDDEN + 1];
		size_t ow[MTLZ_MAX_HIDDEN + 1], ob[MTLZ_MAX_HIDDEN + 1];
		REAL *act[MTLZ_MAX_HIDDEN + 2];  /* [B][width]: act[0] = dropped input */
		REAL *mask;                      /* [B][C]: 0 or 1 / keep */
	} head[2];
	int len[MTLZ_MAX_BLOCKS + 1];  /* input length of block b (b = n_blocks: final) */
	int lconv[MTLZ_MAX_BLOCKS][2]; /* output lengths of the block's convolutions */
	REAL *in[MTLZ_MAX_BLOCKS + 1]; /* block inputs [Cin][B][len]; in[n_blocks] = final map */
	REAL *r1[MTLZ_MAX_BLOCKS];     /* first ReLU output [C][B][lconv0] */
	int32_t *idx[MTLZ_MAX_BLOCKS]; /* max-pool argmax in the conv2 output [C][B][len+1] */
	REAL *col, *tmp, *g0, *g1;     /* scratch: im2col, conv2 output, two gradient maps */
	REAL *gap, *ah, *as, *feat;    /* [B][C], [B][att_hidden], [B][C], [B][C] */
	REAL *dfeat, *dg, *dh;         /* [B][C], [B][C], [B][max width] */
	REAL *dlog, *dmet;             /* [B][K], [B] */
	REAL *logits, *metal;          /* [B][K], [B] */
	REAL *gscratch;                /* [n_p]: grad when only dx is wanted */
	REAL *ones;                    /* [map_n / min channels]: bias gradients as GEMV */
	struct { char name[64]; size_t off, n; } *tens;   /* the packed order */
	size_t n_tens;
	void *nlc;                     /* float only: the channels-last trunk (train_nlc.h) */
	void *cuda;                    /* float only: the CUDA trainer doing the steps */
	REAL *grad_own;                /* [n_p]: train_step's gradient (CPU) */
	/* cuda train_step: the device holds newer parameters and moments of
	 * *adam than the host (host_stale), or the same (dev_current) */
	int host_stale, dev_current;
	mtlz_adam *adam;
};

static void FN(free_all)(struct TR *t)
{
	if (!t)
		return;
	free(t->p);
	free(t->grad_own);
	for (int b = 0; b <= MTLZ_MAX_BLOCKS; b++)
		free(t->in[b]);
	for (int b = 0; b < MTLZ_MAX_BLOCKS; b++) {
		free(t->r1[b]);
		free(t->idx[b]);
	}
	for (int h = 0; h < 2; h++) {
		for (int i = 0; i < MTLZ_MAX_HIDDEN + 2; i++)
			free(t->head[h].act[i]);
		free(t->head[h].mask);
	}
	free(t->col);
	free(t->tmp);
	free(t->g0);
	free(t->g1);
	free(t->gap);
	free(t->ah);
	free(t->as);
	free(t->feat);
	free(t->dfeat);
	free(t->dg);
	free(t->dh);
	free(t->dlog);
	free(t->dmet);
	free(t->logits);
	free(t->metal);
	free(t->gscratch);
	free(t->ones);
	free(t->tens);
#ifdef TRUNK_NLC
	mtlz_nlc_free(t->nlc);
#endif
	free(t);
}

static REAL *FN(alloc)(size_t n, int *fail)
{
	REAL *v = calloc(n ? n : 1, sizeof(REAL));

	*fail |= v == NULL;
	return v;
}

/* Offset of tensor `name` in the packed order (the model's canonical
 * order, no gaps); -1 when absent. */
static long FN(offset_of)(const mtlz_model *m, const char *name, size_t *n)
{
	size_t off = 0;

	for (size_t i = 0; i < mtlz_model_n_tensors(m); i++) {
		const mtlz_tensor *t = mtlz_model_tensor(m, i);

		if (strcmp(t->name, name) == 0) {
			if (n)
				*n = t->n;
			return (long)off;
		}
		off += t->n;
	}
	return -1;
}

static int FN(load)(struct TR *t, const mtlz_model *m)
{
	size_t off = 0;

	if (mtlz_model_n_params(m) != t->n_p)
		return MTLZ_ERR_INVALID;
	for (size_t i = 0; i < mtlz_model_n_tensors(m); i++) {
		const mtlz_tensor *tt = mtlz_model_tensor(m, i);

		for (size_t k = 0; k < tt->n; k++)
			t->p[off + k] = (REAL)tt->data[k];
		off += tt->n;
	}
	mtlz_model_target(m, &t->tgt_off, &t->tgt_scale);
	return MTLZ_OK;
}

static struct TR *FN(new)(const mtlz_model *m, int max_batch, int n_threads, char *errstr,
			  size_t errstr_size)
{
	struct TR *t = calloc(1, sizeof(*t));
	const mtlz_arch *a = mtlz_model_arch(m);
	char name[64];
	int fail = 0, cin = 1, maxw, B = max_batch, nlc = 0;
	size_t col_n = 0, map_n = 0, tr;

	if (!t) {
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory");
		return NULL;
	}
	if (max_batch < 1) {
		free(t);
		mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID, "max_batch %d < 1", max_batch);
		return NULL;
	}
	t->a = *a;
	t->max_batch = B;
	t->n_threads = n_threads > 0 ? n_threads : 1;
	t->n_p = mtlz_model_n_params(m);
	t->p = FN(alloc)(t->n_p, &fail);
#ifdef TRUNK_NLC
	{
		const char *e = getenv("MTLZ_TRAIN_TRUNK");

		nlc = !e || strcmp(e, "im2col") != 0;
	}
#endif
	tr = !nlc;   /* 0: the im2col trunk's maps are not allocated */
	t->len[0] = a->input_length;
	for (int b = 0; b < a->n_blocks; b++) {
		const int c = a->channels[b];
		const int l1 = t->len[b] + 2 * a->padding - a->kernel + 1;
		const int l2 = l1 + 2 * a->padding - a->kernel + 1;

		t->lconv[b][0] = l1;
		t->lconv[b][1] = l2;
		t->len[b + 1] = (l2 - a->pool) / a->pool + 1;
		for (int k = 0; k < 2; k++) {
			const int ci = k == 0 ? cin : c;

			t->conv[2 * b + k].cin = ci;
			t->conv[2 * b + k].cout = c;
			t->conv[2 * b + k].ow = (size_t)FN(offset_of)(
				m, mtlz_name_conv(name, sizeof(name), b, k, 0), NULL);
			t->conv[2 * b + k].ob = (size_t)FN(offset_of)(
				m, mtlz_name_conv(name, sizeof(name), b, k, 1), NULL);
			col_n = MTLZ_MAX(col_n, (size_t)ci * a->kernel * B * (k ? l2 : l1));
			map_n = MTLZ_MAX(map_n, (size_t)c * B * (k ? l2 : l1));
		}
		map_n = MTLZ_MAX(map_n, (size_t)cin * B * t->len[b]);
		t->in[b] = FN(alloc)(tr * cin * B * t->len[b], &fail);
		t->r1[b] = FN(alloc)(tr * c * B * l1, &fail);
		t->idx[b] = calloc(tr * c * B * t->len[b + 1] + 1, sizeof(int32_t));
		fail |= !t->idx[b];
		cin = c;
	}
	t->c_last = cin;
	col_n *= tr;
	map_n *= tr;
	t->in[a->n_blocks] = FN(alloc)(tr * cin * B * t->len[a->n_blocks], &fail);
	t->col = FN(alloc)(col_n, &fail);
	t->tmp = FN(alloc)(map_n, &fail);
	t->g0 = FN(alloc)(map_n, &fail);
	t->g1 = FN(alloc)(map_n, &fail);
	t->att_hidden = a->attention_reduction ? cin / a->attention_reduction : 0;
	if (t->att_hidden) {
		t->o_aw1 = (size_t)FN(offset_of)(m, "attention.squeeze.weight", NULL);
		t->o_ab1 = (size_t)FN(offset_of)(m, "attention.squeeze.bias", NULL);
		t->o_aw2 = (size_t)FN(offset_of)(m, "attention.excite.weight", NULL);
		t->o_ab2 = (size_t)FN(offset_of)(m, "attention.excite.bias", NULL);
	}
	maxw = cin;
	for (int h = 0; h < 2; h++) {
		int in = cin;

		t->head[h].n_layers = a->n_hidden + 1;
		t->head[h].act[0] = FN(alloc)((size_t)B * cin, &fail);
		t->head[h].mask = FN(alloc)((size_t)B * cin, &fail);
		for (int i = 0; i <= a->n_hidden; i++) {
			const int out = i < a->n_hidden ? a->hidden[i] : (h == 0 ? a->n_classes : 1);

			t->head[h].in[i] = in;
			t->head[h].out[i] = out;
			t->head[h].ow[i] = (size_t)FN(offset_of)(
				m, mtlz_name_head(name, sizeof(name), h, i, 0), NULL);
			t->head[h].ob[i] = (size_t)FN(offset_of)(
				m, mtlz_name_head(name, sizeof(name), h, i, 1), NULL);
			t->head[h].act[i + 1] = FN(alloc)((size_t)B * out, &fail);
			maxw = MTLZ_MAX(maxw, out);
			in = out;
		}
	}
	t->gap = FN(alloc)((size_t)B * cin, &fail);
	t->ah = FN(alloc)((size_t)B * (t->att_hidden + 1), &fail);
	t->as = FN(alloc)((size_t)B * cin, &fail);
	t->feat = FN(alloc)((size_t)B * cin, &fail);
	t->dfeat = FN(alloc)((size_t)B * cin, &fail);
	t->dg = FN(alloc)((size_t)B * cin, &fail);
	t->dh = FN(alloc)((size_t)2 * B * (maxw + t->att_hidden + 1), &fail);
	t->dlog = FN(alloc)((size_t)B * a->n_classes, &fail);
	t->dmet = FN(alloc)((size_t)B, &fail);
	t->logits = FN(alloc)((size_t)B * a->n_classes, &fail);
	t->metal = FN(alloc)((size_t)B, &fail);
	t->gscratch = FN(alloc)(t->n_p, &fail);
	t->ones = FN(alloc)(map_n, &fail);
	for (size_t i = 0; !fail && i < map_n; i++)
		t->ones[i] = 1;
	t->n_tens = mtlz_model_n_tensors(m);
	t->tens = calloc(t->n_tens, sizeof(*t->tens));
	fail |= !t->tens;
	for (size_t i = 0, off = 0; !fail && i < t->n_tens; i++) {
		const mtlz_tensor *tt = mtlz_model_tensor(m, i);

		snprintf(t->tens[i].name, sizeof(t->tens[i].name), "%s", tt->name);
		t->tens[i].off = off;
		t->tens[i].n = tt->n;
		off += tt->n;
	}
#ifdef TRUNK_NLC
	if (!fail && nlc) {
		size_t ow[2 * MTLZ_MAX_BLOCKS], ob[2 * MTLZ_MAX_BLOCKS];

		for (int i = 0; i < 2 * a->n_blocks; i++) {
			ow[i] = t->conv[i].ow;
			ob[i] = t->conv[i].ob;
		}
		t->nlc = mtlz_nlc_new(a, ow, ob, B, t->n_threads);
		fail |= !t->nlc;
	}
#endif
	if (fail) {
		FN(free_all)(t);
		mtlz_err(errstr, errstr_size, MTLZ_ERR_NOMEM, "out of memory (trainer, batch %d)",
			 max_batch);
		return NULL;
	}
	FN(load)(t, m);
	return t;
}

/* col[(ci*k + j)][b*lout + l] = x[ci][b][l + j - pad] (0 outside). */
static void FN(im2col)(const REAL *x, int cin, int B, int lin, int k, int pad, int lout,
		       REAL *col)
{
	const size_t N = (size_t)B * lout;

#pragma omp parallel for collapse(2) schedule(static)
	for (int ci = 0; ci < cin; ci++)
		for (int j = 0; j < k; j++) {
			REAL *c = col + ((size_t)ci * k + j) * N;

			/* l + j - pad in [0, lin): one contiguous copy per sample */
			const int l0 = MTLZ_MAX(0, pad - j), l1 = MTLZ_MIN(lout, lin + pad - j);

			for (int b = 0; b < B; b++) {
				const REAL *xs = x + ((size_t)ci * B + b) * lin;
				REAL *cs = c + (size_t)b * lout;

				if (l1 <= l0) {
					memset(cs, 0, (size_t)lout * sizeof(REAL));
					continue;
				}
				memset(cs, 0, (size_t)l0 * sizeof(REAL));
				memcpy(cs + l0, xs + l0 + j - pad, (size_t)(l1 - l0) * sizeof(REAL));
				memset(cs + l1, 0, (size_t)(lout - l1) * sizeof(REAL));
			}
		}
}

/* dx[ci][b][l + j - pad] += dcol[(ci*k + j)][b*lout + l]; dx zeroed here. */
static void FN(col2im)(const REAL *dcol, int cin, int B, int lin, int k, int pad, int lout,
		       REAL *dx)
{
	const size_t N = (size_t)B * lout;

#pragma omp parallel for collapse(2) schedule(static)
	for (int ci = 0; ci < cin; ci++)
		for (int b = 0; b < B; b++) {
			REAL *xs = dx + ((size_t)ci * B + b) * lin;

			memset(xs, 0, (size_t)lin * sizeof(REAL));
			for (int j = 0; j < k; j++) {
				const REAL *cs = dcol + ((size_t)ci * k + j) * N + (size_t)b * lout;
				const int l0 = MTLZ_MAX(0, pad - j), l1 = MTLZ_MIN(lout, lin + pad - j);
				REAL *xo = xs + j - pad;

				for (int l = l0; l < l1; l++)
					xo[l] += cs[l];
			}
		}
}

/* y[cout][N] = W[cout][K] col[K][N] + bias, then ReLU. */
static void FN(conv_fwd)(const struct TR *t, int i, const REAL *col, int N, REAL *y)
{
	const int cout = t->conv[i].cout, K = t->conv[i].cin * t->a.kernel;
	const REAL *w = t->p + t->conv[i].ow, *bias = t->p + t->conv[i].ob;

	GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, cout, N, K, 1, w, K, col, N, 0, y, N);
#pragma omp parallel for schedule(static)
	for (int c = 0; c < cout; c++) {
		REAL *yc = y + (size_t)c * N;

		for (int l = 0; l < N; l++) {
			const REAL v = yc[l] + bias[c];

			yc[l] = v > 0 ? v : 0;
		}
	}
}

/* dW += dy col^T, db += rowsum(dy); dcol = W^T dy when dcol != NULL. */
static void FN(conv_bwd)(const struct TR *t, int i, const REAL *col, const REAL *dy, int N,
			 REAL *grad, REAL *dcol)
{
	const int cout = t->conv[i].cout, K = t->conv[i].cin * t->a.kernel;
	const REAL *w = t->p + t->conv[i].ow;
	REAL *dw = grad + t->conv[i].ow, *db = grad + t->conv[i].ob;

	GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, cout, K, N, 1, dy, N, col, N, 1, dw, K);
	GEMV(CblasRowMajor, CblasNoTrans, cout, N, 1, dy, N, t->ones, 1, 1, db, 1);
	if (dcol)
		GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, K, N, cout, 1, w, K, dy, N, 0, dcol, N);
}

static REAL FN(sigmoid)(REAL v)
{
	return 1 / (1 + exp(-v));
}

/* rows of x[B][in] -> y[B][out] (ReLU unless last). */
static void FN(linear_fwd)(const REAL *x, int B, int in, const REAL *w, const REAL *bias,
			   int out, REAL *y, int relu)
{
	GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, B, out, in, 1, x, in, w, in, 0, y, out);
	for (int r = 0; r < B; r++)
		for (int o = 0; o < out; o++) {
			REAL v = y[(size_t)r * out + o] + bias[o];

			y[(size_t)r * out + o] = relu && v < 0 ? 0 : v;
		}
}

/* Dropout masks of sample `row` (index in the batch) and head h. */
static void FN(make_mask)(REAL *mask, int C, double p_drop, uint64_t seed, int row, int h)
{
	const double keep = 1.0 - p_drop;
	mtlz_rng r;

	mtlz_rng_seed(&r, seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(2 * row + h + 1)));
	for (int c = 0; c < C; c++)
		mask[c] = mtlz_rng_uniform(&r) < keep ? (REAL)(1.0 / keep) : 0;
}

/*
 * The losses of a batch from its outputs (logits[B][K], metal[B] in dex) and
 * their gradients w.r.t. the raw outputs: dlog[B][K], dmet[B] (the
 * metallicity head's output before the target scale). Shared by the CPU
 * passes below and the CUDA trainer (through mtlz_train_losses).
 */
static void FN(losses)(const REAL *logits, const REAL *metal, const mtlz_batch *bt, int K,
		       double tgt_scale, const mtlz_loss_opts *o, REAL *dlog, REAL *dmet,
		       mtlz_losses *loss)
{
	const int B = bt->n;
	const int use_cls = o->task != MTLZ_TASK_METAL, use_met = o->task != MTLZ_TASK_CLASS;
	double lc = 0, lm = 0;
	int n_cls = 0, n_met = 0;

	memset(dlog, 0, (size_t)B * K * sizeof(REAL));
	memset(dmet, 0, (size_t)B * sizeof(REAL));
	for (int b = 0; b < B; b++) {
		if (bt->cls[b] >= 0 && bt->cls[b] < K)
			n_cls++;
		if (bt->cls[b] == 1 && isfinite(bt->oh[b]))
			n_met++;
	}
	for (int b = 0; b < B; b++) {
		const int y = bt->cls[b];
		const REAL *z = logits + (size_t)b * K;
		double mx = z[0], s = 0, p[MTLZ_MAX_CLASSES];

		if (y < 0 || y >= K)
			goto metal;
		for (int c = 1; c < K; c++)
			mx = z[c] > mx ? z[c] : mx;
		for (int c = 0; c < K; c++)
			s += (p[c] = exp(z[c] - mx));
		for (int c = 0; c < K; c++)
			p[c] /= s;
		{
			/* FL = -alpha (1 - pt)^gamma log pt; dFL/dz_c = g (delta_cy - p_c)
			 * with g = -alpha [(1 - pt)^gamma - gamma (1 - pt)^(gamma-1) pt log pt] */
			const double al = o->focal_alpha, ga = o->focal_gamma;
			const double pt = p[y], logpt = (z[y] - mx) - log(s), q = 1 - pt;
			const double fl = -al * pow(q, ga) * logpt;
			const double gq = ga > 0 && q > 0 ? ga * pow(q, ga - 1) : 0;
			const double g = -al * (pow(q, ga) - gq * pt * logpt);

			lc += fl;
			if (use_cls)
				for (int c = 0; c < K; c++)
					dlog[(size_t)b * K + c] = (REAL)(o->w_class / n_cls * g *
									 ((c == y) - p[c]));
		}
metal:
		if (y == 1 && isfinite(bt->oh[b])) {
			const double r = (double)metal[b] - bt->oh[b];

			lm += fabs(r);
			if (use_met)
				dmet[b] = (REAL)(o->w_metal / n_met * (r > 0 ? 1 : r < 0 ? -1 : 0) *
						 tgt_scale);
		}
	}
	loss->cls = n_cls ? lc / n_cls : 0;
	loss->metal = n_met ? lm / n_met : 0;
	loss->n_cls = n_cls;
	loss->n_metal = n_met;
	loss->total = (use_cls ? o->w_class * loss->cls : 0) + (use_met ? o->w_metal * loss->metal : 0);
}

/* The im2col trunk's forward: x -> every block -> t->gap[B][C]. */
static void FN(trunk_fwd)(struct TR *t, const float *xf, const double *xd, int B)
{
	const mtlz_arch *a = &t->a;
	const int C = t->c_last, nb = a->n_blocks;
	const int Lf = t->len[nb], k = a->kernel, pad = a->padding;

	for (int b = 0; b < B; b++)
		for (int l = 0; l < t->len[0]; l++) {
			const size_t i = (size_t)b * t->len[0] + l;

			t->in[0][i] = xf ? (REAL)xf[i] : (REAL)xd[i];
		}
	for (int blk = 0; blk < nb; blk++) {
		const int c = a->channels[blk], lin = t->len[blk];
		const int l1 = t->lconv[blk][0], l2 = t->lconv[blk][1], lp = t->len[blk + 1];
		const int cin = t->conv[2 * blk].cin;

		FN(im2col)(t->in[blk], cin, B, lin, k, pad, l1, t->col);
		FN(conv_fwd)(t, 2 * blk, t->col, B * l1, t->r1[blk]);
		FN(im2col)(t->r1[blk], c, B, l1, k, pad, l2, t->col);
		FN(conv_fwd)(t, 2 * blk + 1, t->col, B * l2, t->tmp);
#pragma omp parallel for collapse(2) schedule(static)
		for (int ch = 0; ch < c; ch++)
			for (int b = 0; b < B; b++) {
				const REAL *src = t->tmp + ((size_t)ch * B + b) * l2;
				REAL *dst = t->in[blk + 1] + ((size_t)ch * B + b) * lp;
				int32_t *ix = t->idx[blk] + ((size_t)ch * B + b) * lp;

				for (int j = 0; j < lp; j++) {
					int best = j * a->pool;

					for (int q = 1; q < a->pool; q++)
						if (src[j * a->pool + q] > src[best])
							best = j * a->pool + q;
					dst[j] = src[best];
					ix[j] = best;
				}
			}
	}
	/* global average pool */
	for (int b = 0; b < B; b++)
		for (int ch = 0; ch < C; ch++) {
			const REAL *f = t->in[nb] + ((size_t)ch * B + b) * Lf;
			REAL s = 0;

			for (int l = 0; l < Lf; l++)
				s += f[l];
			t->gap[(size_t)b * C + ch] = s / Lf;
		}
}

/* The im2col trunk's backward from t->dg: adds the convolutions' gradients
 * into grad, and d/dx into dx when not NULL. */
static void FN(trunk_bwd)(struct TR *t, int B, REAL *grad, REAL *dx)
{
	const mtlz_arch *a = &t->a;
	const int C = t->c_last, nb = a->n_blocks;
	const int Lf = t->len[nb], k = a->kernel, pad = a->padding;

	/* GAP: d map = dg / Lf, into g0 as [C][B][Lf] */
	for (int ch = 0; ch < C; ch++)
		for (int b = 0; b < B; b++)
			for (int l = 0; l < Lf; l++)
				t->g0[((size_t)ch * B + b) * Lf + l] = t->dg[(size_t)b * C + ch] / Lf;
	for (int blk = nb - 1; blk >= 0; blk--) {
		const int c = a->channels[blk], lin = t->len[blk], cin = t->conv[2 * blk].cin;
		const int l1 = t->lconv[blk][0], l2 = t->lconv[blk][1], lp = t->len[blk + 1];
		REAL *dpool = t->g0, *dy2 = t->g1, *dr1 = t->tmp;

		/* max-pool and the second ReLU: the gradient goes to the argmax,
		 * where the conv2 output equals the pooled value */
		memset(dy2, 0, (size_t)c * B * l2 * sizeof(REAL));
#pragma omp parallel for collapse(2) schedule(static)
		for (int ch = 0; ch < c; ch++)
			for (int b = 0; b < B; b++) {
				const size_t r = (size_t)ch * B + b;

				for (int j = 0; j < lp; j++)
					if (t->in[blk + 1][r * lp + j] > 0)
						dy2[r * l2 + t->idx[blk][r * lp + j]] += dpool[r * lp + j];
			}
		/* conv2: input r1 */
		FN(im2col)(t->r1[blk], c, B, l1, k, pad, l2, t->col);
		FN(conv_bwd)(t, 2 * blk + 1, t->col, dy2, B * l2, grad, t->col);
		FN(col2im)(t->col, c, B, l1, k, pad, l2, dr1);
		for (size_t q = 0; q < (size_t)c * B * l1; q++)
			if (t->r1[blk][q] <= 0)
				dr1[q] = 0;
		/* conv1: input in[blk]; its gradient is the previous block's dpool */
		FN(im2col)(t->in[blk], cin, B, lin, k, pad, l1, t->col);
		if (blk > 0 || dx) {
			FN(conv_bwd)(t, 2 * blk, t->col, dr1, B * l1, grad, t->col);
			FN(col2im)(t->col, cin, B, lin, k, pad, l1, t->g0);
		} else {
			FN(conv_bwd)(t, 2 * blk, t->col, dr1, B * l1, grad, NULL);
		}
	}
	if (dx)
		memcpy(dx, t->g0, (size_t)B * t->len[0] * sizeof(REAL));
}

static int FN(step)(struct TR *t, const float *xf, const double *xd, const mtlz_batch *bt,
		    const mtlz_loss_opts *o, mtlz_losses *loss, REAL *grad, REAL *dx,
		    REAL *logits_out, REAL *metal_out, char *errstr, size_t errstr_size)
{
	const mtlz_arch *a = &t->a;
	const int B = bt->n, K = a->n_classes, C = t->c_last;

	if (B < 1 || B > t->max_batch)
		return mtlz_err(errstr, errstr_size, MTLZ_ERR_INVALID,
				"batch of %d (1..%d)", B, t->max_batch);
	openblas_set_num_threads(t->n_threads);
	omp_set_num_threads(t->n_threads);
	/* ---- forward ---- */
#ifdef TRUNK_NLC
	if (t->nlc && xf)
		mtlz_nlc_forward(t->nlc, t->p, xf, B, t->gap);
	else
#endif
		FN(trunk_fwd)(t, xf, xd, B);
	/* attention, feature */
	if (t->att_hidden) {
		const int H = t->att_hidden;

		FN(linear_fwd)(t->gap, B, C, t->p + t->o_aw1, t->p + t->o_ab1, H, t->ah, 1);
		FN(linear_fwd)(t->ah, B, H, t->p + t->o_aw2, t->p + t->o_ab2, C, t->as, 0);
		for (size_t i = 0; i < (size_t)B * C; i++) {
			t->as[i] = FN(sigmoid)(t->as[i]);
			t->feat[i] = t->gap[i] * t->as[i];
		}
	} else {
		memcpy(t->feat, t->gap, (size_t)B * C * sizeof(REAL));
	}
	for (int h = 0; h < 2; h++) {
		__typeof__(t->head[0]) *H = &t->head[h];

		for (int b = 0; b < B; b++) {
			REAL *m = H->mask + (size_t)b * C, *d = H->act[0] + (size_t)b * C;

			if (o->train && a->dropout > 0)
				FN(make_mask)(m, C, a->dropout, o->seed, b, h);
			else
				for (int ch = 0; ch < C; ch++)
					m[ch] = 1;
			for (int ch = 0; ch < C; ch++)
				d[ch] = t->feat[(size_t)b * C + ch] * m[ch];
		}
		for (int i = 0; i < H->n_layers; i++)
			FN(linear_fwd)(H->act[i], B, H->in[i], t->p + H->ow[i], t->p + H->ob[i],
				       H->out[i], H->act[i + 1], i < H->n_layers - 1);
	}
	/* ---- losses and their gradients w.r.t. the outputs ---- */
	for (int b = 0; b < B; b++) {
		const REAL *z = t->head[0].act[t->head[0].n_layers] + (size_t)b * K;
		const REAL y = t->head[1].act[t->head[1].n_layers][b];

		t->metal[b] = (REAL)(y * t->tgt_scale + t->tgt_off);
		memcpy(t->logits + (size_t)b * K, z, (size_t)K * sizeof(REAL));
	}
	FN(losses)(t->logits, t->metal, bt, K, t->tgt_scale, o, t->dlog, t->dmet, loss);
	if (logits_out)
		memcpy(logits_out, t->logits, (size_t)B * K * sizeof(REAL));
	if (metal_out)
		memcpy(metal_out, t->metal, (size_t)B * sizeof(REAL));
	if (!grad && !dx)
		return MTLZ_OK;

	/* ---- backward ---- */
	if (!grad)
		grad = t->gscratch;
	memset(grad, 0, t->n_p * sizeof(REAL));
	memset(t->dfeat, 0, (size_t)B * C * sizeof(REAL));
	for (int h = 0; h < 2; h++) {
		__typeof__(t->head[0]) *H = &t->head[h];
		const int n = H->n_layers;
		REAL *dy = t->dh;
		size_t stride_max = 0;

		for (int i = 0; i < n; i++)
			stride_max = MTLZ_MAX(stride_max, (size_t)MTLZ_MAX(H->in[i], H->out[i]));
		/* dy: [B][out] of the last layer */
		for (int b = 0; b < B; b++)
			for (int c = 0; c < H->out[n - 1]; c++)
				dy[(size_t)b * H->out[n - 1] + c] = h == 0 ? t->dlog[(size_t)b * K + c] :
									   t->dmet[b];
		for (int i = n - 1; i >= 0; i--) {
			const int in = H->in[i], out = H->out[i];
			REAL *din = t->dh + (size_t)B * stride_max;   /* second half */
			const REAL *x = H->act[i], *w = t->p + H->ow[i];

			if (i < n - 1)   /* ReLU of this layer's output */
				for (size_t q = 0; q < (size_t)B * out; q++)
					if (H->act[i + 1][q] <= 0)
						dy[q] = 0;
			GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, B, 1, dy, out, x, in, 1,
			     grad + H->ow[i], in);
			for (int b = 0; b < B; b++)
				for (int c = 0; c < out; c++)
					grad[H->ob[i] + c] += dy[(size_t)b * out + c];
			GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, in, out, 1, dy, out, w, in,
			     0, din, in);
			memcpy(dy, din, (size_t)B * in * sizeof(REAL));
		}
		for (size_t q = 0; q < (size_t)B * C; q++)
			t->dfeat[q] += dy[q] * H->mask[q];
	}
	/* attention: feat = g * s, s = sigmoid(W2 relu(W1 g + b1) + b2) */
	if (t->att_hidden) {
		const int H = t->att_hidden;
		REAL *da2 = t->dh, *dh1 = t->dh + (size_t)B * C;

		for (size_t q = 0; q < (size_t)B * C; q++) {
			t->dg[q] = t->dfeat[q] * t->as[q];
			da2[q] = t->dfeat[q] * t->gap[q] * t->as[q] * (1 - t->as[q]);
		}
		GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, C, H, B, 1, da2, C, t->ah, H, 1,
		     grad + t->o_aw2, H);
		for (int b = 0; b < B; b++)
			for (int c = 0; c < C; c++)
				grad[t->o_ab2 + c] += da2[(size_t)b * C + c];
		GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, H, C, 1, da2, C, t->p + t->o_aw2,
		     H, 0, dh1, H);
		for (size_t q = 0; q < (size_t)B * H; q++)
			if (t->ah[q] <= 0)
				dh1[q] = 0;
		GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, H, C, B, 1, dh1, H, t->gap, C, 1,
		     grad + t->o_aw1, C);
		for (int b = 0; b < B; b++)
			for (int j = 0; j < H; j++)
				grad[t->o_ab1 + j] += dh1[(size_t)b * H + j];
		GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, C, H, 1, dh1, H, t->p + t->o_aw1,
		     C, 1, t->dg, C);
	} else {
		memcpy(t->dg, t->dfeat, (size_t)B * C * sizeof(REAL));
	}
#ifdef TRUNK_NLC
	if (t->nlc && xf)
		mtlz_nlc_backward(t->nlc, t->p, t->dg, B, grad, dx);
	else
#endif
		FN(trunk_bwd)(t, B, grad, dx);
	return MTLZ_OK;
}
