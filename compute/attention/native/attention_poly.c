/* Compiled float32 CPU route of attention (compute/attention/): the statistics of one call in
 * one pass per tensor (at_stats); the non-causal polynomial path after planning, its
 * preparation (centring, balancing, value normalisation) fused into the loads (at_poly: every
 * slice in one call; at_moments_f / at_readout_f: one slice's halves), key and query chunks
 * shared with one helper thread; the causal path after the PyTorch preparation (at_causal).
 *
 * The polynomial steps are those of compute/attention/polynomial.py (docs/attention.md, "The
 * rounding model, step by step"), in the same arithmetic, with every block of features kept
 * in cache instead of a [r, B] feature block in memory (the building blocks are shared with
 * tensor attention: compute/core/native_poly.h):
 *
 *   loads    k' = fl(fl(k - kshift) kfac...), q' = fl(q qfac...), vn = fl(fl(v - vshift)
 *            vfac...): the PyTorch preparation's float32 operations in its order (bit for
 *            bit the same numbers; native_poly.h, Fused);
 *   moments  M[c][alpha] = float64 sum of float32 dot products of depth <= kchunk over the
 *            keys, sum_j k'_j^alpha * [vn_j, 1][c] (the PyTorch route: float32 products over
 *            key chunks of key_inner keys, float64 across chunks; here each vector lane adds
 *            at most kchunk - 5 keys and the 16 lanes a tree of depth 4: at most kchunk
 *            roundings per term, the count the bound uses, and at most ceil(m / kchunk)
 *            float64 additions, as many as the PyTorch route has chunks);
 *   weights  me = (float) (w[alpha] * M[alpha])   (float64, one rounding to float32: as
 *            Mw.to(float32) in the PyTorch route);
 *   readout  o[c][i] = float64 sum over chunks of fchunk features of float32 dot products
 *            sum_alpha me[c][alpha] q_i^alpha (the PyTorch route's feature chunks of
 *            feature_inner); out[i][c] = (float) ((o[c][i] / o[dv][i]) * p2[c] + cv[c]).
 *
 * Features: degree m from degree m - 1 by one float32 multiplication, the top degree formed in
 * registers where it is consumed: the same single rounding per multiplication as the PyTorch
 * feature builder. Gradual underflow: the same products and casts as the PyTorch route (the
 * model's H' and absolute terms). Compile WITHOUT -ffast-math; -ffp-contract=fast only fuses
 * multiply-adds (fewer roundings than the model counts).
 *
 * Returns 0 on success, -1 when memory could not be allocated, -2 for bad arguments.
 */
#define _POSIX_C_SOURCE 200112L
#include <pthread.h>

#include "native_poly.h" /* compute/core/: features, key moments, readout (shared) */

int at_vector_bytes(void) {
#if defined(__AVX512F__)
    return 64;
#elif defined(__AVX2__) || defined(__AVX__)
    return 32;
#else
    return 16;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* Statistics                                                                                 */
/* ---------------------------------------------------------------------------------------- */

/* The numbers of compute/attention/stats.py `statistics`, float32 inputs, one slice at a time:
 * q: [L][n][d], k: [L][m][d], v: [L][m][dv] contiguous. Writes host (float64), in the layout
 * statistics reads: [3] peaks (max|q|, max|k|, max|v|; NaN when the tensor has a NaN, inf when
 * an infinity) | [L][d] max|q| per column | [L][d] max|k - mid| | [L] largest row 2-norm of q
 * | [L] of k - mid | [L] largest Hoelder sum sum_l |q_il| max|k_l - mid_l| | [L][dv] max v |
 * [L][dv] min v; and mid [L][d] (float32): the midrange of every key column, hi/2 + lo/2 as
 * core.radius.midrange. Squares and products of float32 numbers are exact in float64; the
 * sums are in float64 (another order than torch's: a few ulps, within the radius' inflation).
 *
 * info [3 + L dv] (float64): what statistics derives from these on the host, in the same
 * float64 operations: the radius of core.radius.radius_from in its usual case (NaN where one
 * of its guards applies: Python computes it then), the value range max(hi - lo), max|v|, and
 * per column the normalisation exponent (frexp of range (1 + 2^-20) + sig; 0 for a constant
 * column). inflate: radius_from's inflation factor. */
/* Row reductions in float64 with four partial sums (a fixed order that vectorises; another
 * order than torch's, a few ulps apart, inside the radius' inflation). */
static inline double row_sq(const float *x, int d) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int l = 0;
    for (; l + 4 <= d; l += 4)
        for (int j = 0; j < 4; j++) s[j] += (double)x[l + j] * (double)x[l + j];
    for (int j = 0; l < d; l++, j++) s[j] += (double)x[l] * (double)x[l];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static inline double row_sq_centred(const float *x, const float *mid, int d) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int l = 0;
    for (; l + 4 <= d; l += 4)
        for (int j = 0; j < 4; j++) {
            const float t = x[l + j] - mid[l + j]; /* fl(k - mid), as the centred keys */
            s[j] += (double)t * (double)t;
        }
    for (int j = 0; l < d; l++, j++) {
        const float t = x[l] - mid[l];
        s[j] += (double)t * (double)t;
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static inline double row_holder(const float *x, const float *ka, int d) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int l = 0;
    for (; l + 4 <= d; l += 4)
        for (int j = 0; j < 4; j++) s[j] += (double)__builtin_fabsf(x[l + j]) * (double)ka[l + j];
    for (int j = 0; l < d; l++, j++) s[j] += (double)__builtin_fabsf(x[l]) * (double)ka[l];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* Column extremes of rows x [rows][d] into hi, lo (initialised by the caller); nan[l]
 * accumulates x * 0, which is NaN exactly when a NaN or an infinity passed (either makes the
 * call raise). The rows are read as one flat stream in periods of W = lcm(d, VL) floats (W / d
 * rows) into local accumulators (no aliasing with x: the loop vectorises), folded into the d
 * columns at the end; the rows past the last whole period one by one. Max and min are exact and
 * independent of the order, so hi and lo are those of a row-by-row scan; nan is NaN exactly
 * when some x * 0 is (otherwise a sum of signed zeros). */
#define EXT_WMAX 256
static void col_extremes(const float *x, long rows, int d, float *hi, float *lo, float *nan) {
    int W = d;
    while (W % VL) W += d; /* lcm(d, VL) */
    long j = 0;
    if (W <= EXT_WMAX && rows >= W / d) {
        float H[EXT_WMAX] __attribute__((aligned(64)));
        float Lo[EXT_WMAX] __attribute__((aligned(64)));
        float N[EXT_WMAX] __attribute__((aligned(64)));
        for (int t = 0; t < W; t++) {
            H[t] = hi[t % d];
            Lo[t] = lo[t % d];
            N[t] = 0.0f;
        }
        const long per = W / d, periods = rows / per;
        for (long b = 0; b < periods; b++) {
            const float *blk = x + b * W;
            for (int t = 0; t < W; t++) {
                const float y = blk[t];
                H[t] = y > H[t] ? y : H[t];
                Lo[t] = y < Lo[t] ? y : Lo[t];
                N[t] += y * 0.0f;
            }
        }
        for (int t = 0; t < W; t++) {
            const int l = t % d;
            hi[l] = H[t] > hi[l] ? H[t] : hi[l];
            lo[l] = Lo[t] < lo[l] ? Lo[t] : lo[l];
            nan[l] += N[t];
        }
        j = periods * per;
    }
    for (; j < rows; j++) {
        const float *r = x + j * d;
        for (int l = 0; l < d; l++) {
            const float t = r[l];
            hi[l] = t > hi[l] ? t : hi[l];
            lo[l] = t < lo[l] ? t : lo[l];
            nan[l] += t * 0.0f;
        }
    }
}

int at_stats(const float *q, const float *k, const float *v, int L, int n, int m, int d, int dv,
             double *host, float *mid, double scale, double sig, double inflate, double *info) {
    if (L < 1 || n < 1 || m < 1 || d < 1 || dv < 1) return -2;
    float *qh = scratch(B_EXTRA0, sizeof(float) * 3 * (size_t)d);
    float *kh = scratch(B_EXTRA1, sizeof(float) * 3 * (size_t)d);
    float *vh = scratch(B_EXTRA2, sizeof(float) * 3 * (size_t)dv);
    float *ka = scratch(B_EXTRA3, sizeof(float) * (size_t)d);
    if (!qh || !kh || !vh || !ka) return -1;
    float *ql = qh + d, *kl = kh + d, *vl = vh + dv;
    float *qnan = qh + 2 * d, *knan = kh + 2 * d, *vnan = vh + 2 * dv;
    const double nan = __builtin_nan("");
    double *peaks = host, *qa_o = host + 3, *ka_o = host + 3 + (long)L * d;
    double *qn_o = host + 3 + 2L * L * d, *kn_o = qn_o + L, *hs_o = kn_o + L;
    double *vh_o = hs_o + L, *vl_o = vh_o + (long)L * dv;
    int bad_q = 0, bad_k = 0, bad_v = 0;
    float pq = 0.0f, pk = 0.0f, pv = 0.0f;
    for (int b = 0; b < L; b++) {
        const float *qb = q + (long)b * n * d, *kb = k + (long)b * m * d, *vb = v + (long)b * m * dv;
        for (int l = 0; l < d; l++) {
            qh[l] = ql[l] = qb[l];
            kh[l] = kl[l] = kb[l];
            qnan[l] = knan[l] = 0.0f;
        }
        for (int c = 0; c < dv; c++) {
            vh[c] = vl[c] = vb[c];
            vnan[c] = 0.0f;
        }
        col_extremes(qb, n, d, qh, ql, qnan);
        col_extremes(kb, m, d, kh, kl, knan);
        col_extremes(vb, m, dv, vh, vl, vnan);
        for (int l = 0; l < d; l++) {
            bad_q |= qnan[l] != 0.0f;
            bad_k |= knan[l] != 0.0f;
        }
        for (int c = 0; c < dv; c++) bad_v |= vnan[c] != 0.0f;
        float *mb = mid + (long)b * d;
        for (int l = 0; l < d; l++) {
            /* hi * 0.5 + lo * 0.5 with both products rounded (never one fused multiply-add) */
            volatile float h2 = kh[l] * 0.5f, l2 = kl[l] * 0.5f;
            mb[l] = h2 + l2;
            const float a = __builtin_fabsf(kh[l] - mb[l]), c = __builtin_fabsf(kl[l] - mb[l]);
            ka[l] = a > c ? a : c;
            const float qa = __builtin_fabsf(qh[l]) > __builtin_fabsf(ql[l]) ? __builtin_fabsf(qh[l])
                                                                          : __builtin_fabsf(ql[l]);
            qa_o[(long)b * d + l] = qa;
            ka_o[(long)b * d + l] = ka[l];
            pq = qa > pq ? qa : pq;
            const float kk = __builtin_fabsf(kh[l]) > __builtin_fabsf(kl[l]) ? __builtin_fabsf(kh[l])
                                                                          : __builtin_fabsf(kl[l]);
            pk = kk > pk ? kk : pk;
        }
        for (int c = 0; c < dv; c++) {
            vh_o[(long)b * dv + c] = vh[c];
            vl_o[(long)b * dv + c] = vl[c];
            const float a = __builtin_fabsf(vh[c]) > __builtin_fabsf(vl[c]) ? __builtin_fabsf(vh[c])
                                                                         : __builtin_fabsf(vl[c]);
            pv = a > pv ? a : pv;
        }
        double qn = 0.0, kn = 0.0, hs = 0.0;
        if (!bad_q && !bad_k) {
            for (int i = 0; i < n; i++) {
                const float *x = qb + (long)i * d;
                const double sq = row_sq(x, d), h = row_holder(x, ka, d);
                qn = sq > qn ? sq : qn;
                hs = h > hs ? h : hs;
            }
            for (int j = 0; j < m; j++) {
                const double sq = row_sq_centred(kb + (long)j * d, mb, d);
                kn = sq > kn ? sq : kn;
            }
        }
        qn_o[b] = sqrt(qn);
        kn_o[b] = sqrt(kn);
        hs_o[b] = hs;
    }
    peaks[0] = bad_q ? nan : (double)pq;
    peaks[1] = bad_k ? nan : (double)pk;
    peaks[2] = bad_v ? nan : (double)pv;
    /* radius_from, usual case: min(qn kn, holder + d 2^-1074) |scale|, max over slices */
    double lo = INFINITY, hi = 0.0, radius = 0.0;
    const double as = fabs(scale), tiny = 4.9406564584124654e-324;
    for (int b = 0; b < L; b++) { /* per slice: the largest |q| and |kc| (their min over L) */
        double qt = 0.0, kt = 0.0;
        for (int l = 0; l < d; l++) {
            qt = qa_o[(long)b * d + l] > qt ? qa_o[(long)b * d + l] : qt;
            kt = ka_o[(long)b * d + l] > kt ? ka_o[(long)b * d + l] : kt;
        }
        lo = qt < lo ? qt : lo;
        lo = kt < lo ? kt : lo;
        const double hsb = hs_o[b] + d * tiny;
        hi = qn_o[b] > hi ? qn_o[b] : hi;
        hi = kn_o[b] > hi ? kn_o[b] : hi;
        hi = hsb > hi ? hsb : hi;
        const double cs = qn_o[b] * kn_o[b];
        const double rb = (cs < hsb ? cs : hsb) * as;
        radius = rb > radius ? rb : radius;
    }
    const int usual = lo > 0x1p-200 && hi < 0x1p200 && as > 0x1p-300 && as < 0x1p300;
    info[0] = usual && !bad_q && !bad_k ? radius * inflate : nan;
    double range = 0.0, absmax = 0.0;
    for (long i = 0; i < (long)L * dv; i++) {
        const double span = vh_o[i] - vl_o[i];
        range = span > range ? span : range;
        const double a = fabs(vh_o[i]) > fabs(vl_o[i]) ? fabs(vh_o[i]) : fabs(vl_o[i]);
        absmax = a > absmax ? a : absmax;
        int ex = 0;
        if (span > 0.0) frexp(span * (1.0 + 0x1p-20) + sig, &ex);
        info[3 + i] = (double)ex;
    }
    info[1] = bad_v ? nan : range;
    info[2] = bad_v ? nan : absmax;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Polynomial path (non-causal)                                                               */
/* ---------------------------------------------------------------------------------------- */

static int check_table(int d, int e, int r, int top, int nsteps, int nlow, const int *steps) {
    if (d < 1 || e < 2 || r < 1 || top < 1 || top > r || nlow < 0 || nlow > nsteps) return -2;
    for (int s = 0; s < nsteps; s++) {
        const int *st = steps + 4 * s;
        if (st[0] < 1 || st[1] > r || st[0] > st[1] || st[2] < 0 || st[3] < 0 || st[3] >= d ||
            st[2] + (st[1] - st[0]) > r || (s < nlow) != (st[0] < top))
            return -2;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Polynomial path (non-causal), fused: the preparation done while the inputs are loaded      */
/* ---------------------------------------------------------------------------------------- */

/* The same three steps as at_moments / at_readout, reading q, k, v as the caller holds them
 * (row-major [rows][d], [rows][dv]) and preparing each entry as it is loaded (Fused in
 * native_poly.h): keys fl(fl(k - kshift) * kfac...) (centring, then balancing), queries
 * fl(q * qfac...), values fl(fl(v - vshift) * vfac...) (centring, normalisation) and a column of
 * ones. These are the float32 operations of the PyTorch preparation in its order (the rounding
 * model's steps 1, 4 and 8), so every loaded number is bit for bit what that route loads: the
 * same rounding model and bound cover both. Factor f of coordinate l at fac[f * fstep + l]. */

/* The readout of the queries [i0, i1) of one slice (q: its [n][d] rows): out[i][c] (row i at
 * out + (i - i0) * dv) = (float) ((o[c][i] / o[dv][i]) * p2[c] + cv[c]), with me ([e][r]
 * float32) the weighted moments, fchunk features per float32 dot product. */
static int readout_fused(const float *q, const float *qfac, int nqfac, long fstep, int i0, int i1,
                         int d, const float *me, int e, const int *steps, int nsteps, int nlow,
                         int top, int r, int fchunk, const double *p2, const float *cv,
                         float *out) {
    const int dv = e - 1, cnt = i1 - i0;
    int *src_of = scratch(B_SRC, sizeof(int) * (size_t)(r - top + 1));
    int *var_of = scratch(B_VAR, sizeof(int) * (size_t)(r - top + 1));
    double *t64 = scratch(B_T64, sizeof(double) * (size_t)cnt * dv);
    Fused fz = {q + (long)i0 * d, NULL, qfac, nqfac, fstep, NULL, 0, NULL, NULL, 0, 0};
    QueryWork qw;
    Problem p = {NULL, 0, d, e, r, top, 6, fchunk, steps, nlow, nsteps, NULL, NULL, &fz};
    if (!src_of || !var_of || !t64 || query_work_alloc(&qw, &p)) return -1;
    for (int k = nlow; k < nsteps; k++) {
        const int *st = steps + 4 * k;
        for (int i = 0; i < st[1] - st[0]; i++) {
            src_of[st[0] + i - top] = st[2] + i;
            var_of[st[0] + i - top] = st[3];
        }
    }
    p.src_of = src_of;
    p.var_of = var_of;
    readout(&p, &qw, me, 0, cnt, t64);
    for (long i = 0; i < (long)cnt; i++)
        for (int c = 0; c < dv; c++) out[i * dv + c] = (float)(t64[i * dv + c] * p2[c] + (double)cv[c]);
    return 0;
}

/* One helper thread, started on first use and kept (its scratch buffers stay warm), shares
 * at_poly's work: the keys (or queries) are cut into chunks fixed in advance, and both threads
 * take the next chunk until none is left. Which thread computes a chunk changes nothing: every
 * chunk has its own result (key chunks: their own float64 moments, added afterwards in chunk
 * order), so the output is the same bit for bit whatever the scheduling. The caller never waits
 * for a helper that has not started: it takes the job back and does every chunk itself. One
 * caller at a time owns the helper (trylock); a concurrent caller does all its chunks itself.
 * After fork() the child has no helper: it starts its own. */
typedef struct {
    void (*fn)(void *, int);
    void *arg;
    int chunks;
    int next; /* the next chunk to take (atomic) */
} Job;
static pthread_mutex_t pool_owner = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static Job *pool_job = NULL;
static int pool_pending = 0, pool_finished = 0, pool_state = 0; /* 0 none, 1 live, -1 failed */
static int pool_atfork = 0; /* the fork handler is registered once per process image */

static void job_run(Job *job) {
    for (;;) {
        const int c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (c >= job->chunks) return;
        job->fn(job->arg, c);
    }
}

static void *pool_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        while (!pool_pending) pthread_cond_wait(&pool_go, &pool_mu);
        Job *job = pool_job;
        pool_pending = 0;
        pthread_mutex_unlock(&pool_mu);
        job_run(job);
        scratch_trim();
        pthread_mutex_lock(&pool_mu);
        pool_finished = 1;
        pthread_cond_signal(&pool_done);
    }
    return NULL;
}

static void pool_after_fork(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    pool_owner = m;
    pool_mu = m;
    pool_go = c;
    pool_done = c;
    pool_job = NULL;
    pool_pending = pool_finished = pool_state = 0;
}

/* Own the helper (starting it if needed): 1, or 0 when it is busy or cannot start. */
static int pool_acquire(void) {
    if (pthread_mutex_trylock(&pool_owner) != 0) return 0;
    if (pool_state == 0) {
        pthread_t t;
        pthread_attr_t at;
        pool_state = -1;
        if (pthread_attr_init(&at) == 0) {
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&t, &at, pool_main, NULL) == 0) {
                pool_state = 1;
                /* once: a forked child inherits the registration, and a handler registered
                 * again by each child's new helper would run several times per fork */
                if (!pool_atfork && pthread_atfork(NULL, NULL, pool_after_fork) == 0)
                    pool_atfork = 1;
            }
            pthread_attr_destroy(&at);
        }
    }
    if (pool_state != 1) {
        pthread_mutex_unlock(&pool_owner);
        return 0;
    }
    return 1;
}

/* Every chunk of job, shared with the helper when pooled. */
static void job_share(Job *job, int pooled) {
    job->next = 0;
    if (!pooled || job->chunks < 2) {
        job_run(job);
        return;
    }
    pthread_mutex_lock(&pool_mu);
    pool_job = job;
    pool_finished = 0;
    pool_pending = 1;
    pthread_cond_signal(&pool_go);
    pthread_mutex_unlock(&pool_mu);
    job_run(job);
    pthread_mutex_lock(&pool_mu);
    if (pool_pending) /* the helper never took it: nothing of it runs there */
        pool_pending = 0;
    else
        while (!pool_finished) pthread_cond_wait(&pool_done, &pool_mu);
    pthread_mutex_unlock(&pool_mu);
}

/* Chunk c of `chunks` equal parts of [0, total): [c * step, min(total, (c + 1) * step)),
 * step = ceil(total / chunks) (the Python wrapper's _spans). */
static void chunk_span(int total, int chunks, int c, int *a, int *b) {
    const int step = (total + chunks - 1) / chunks;
    *a = c * step < total ? c * step : total;
    *b = (c + 1) * step < total ? (c + 1) * step : total;
}

#define MAX_CHUNKS 16

typedef struct {
    const Problem *p;
    int m, chunks;
    double *M[MAX_CHUNKS];
    int rc[MAX_CHUNKS];
} MomentsJob;

static void moments_chunk(void *arg, int c) {
    MomentsJob *j = arg;
    int a, b;
    chunk_span(j->m, j->chunks, c, &a, &b);
    KeyWork kw;
    j->rc[c] = key_work_alloc(&kw, j->p) ? -1 : 0;
    if (!j->rc[c] && b > a) moments(j->p, &kw, a, b - a, NULL, j->M[c]);
    if (b <= a) memset(j->M[c], 0, sizeof(double) * (size_t)j->p->e * j->p->r);
}

typedef struct {
    const float *q, *qfac, *me, *cv;
    const int *steps;
    const double *p2;
    float *out;
    long fstep;
    int nqfac, n, chunks, d, e, nsteps, nlow, top, r, fchunk;
    int rc[MAX_CHUNKS];
} ReadoutJob;

static void readout_chunk(void *arg, int c) {
    ReadoutJob *j = arg;
    int a, b;
    chunk_span(j->n, j->chunks, c, &a, &b);
    j->rc[c] = b <= a ? 0
                      : readout_fused(j->q, j->qfac, j->nqfac, j->fstep, a, b, j->d, j->me, j->e,
                                      j->steps, j->nsteps, j->nlow, j->top, j->r, j->fchunk,
                                      j->p2, j->cv, j->out + (long)a * (j->e - 1));
}

/* The moments of keys [0, m) of p (M: kchunks x [e][r] float64; the sum lands in the first):
 * chunk c into its own M_c, then M = ((M_0 + M_1) + M_2) ... in chunk order. */
static int moments_shared(const Problem *p, int m, int kchunks, double *M, int pooled) {
    const long er = (long)p->e * p->r;
    MomentsJob mj;
    mj.p = p;
    mj.m = m;
    mj.chunks = kchunks;
    for (int c = 0; c < kchunks; c++) mj.M[c] = M + c * er;
    Job job = {moments_chunk, &mj, kchunks, 0};
    job_share(&job, pooled);
    for (int c = 0; c < kchunks; c++)
        if (mj.rc[c]) return mj.rc[c];
    for (int c = 1; c < kchunks; c++)
        for (long i = 0; i < er; i++) M[i] = M[i] + mj.M[c][i];
    return 0;
}

static int readout_shared(ReadoutJob *rj, int pooled) {
    Job job = {readout_chunk, rj, rj->chunks, 0};
    job_share(&job, pooled);
    for (int c = 0; c < rj->chunks; c++)
        if (rj->rc[c]) return rj->rc[c];
    return 0;
}

/* The whole non-causal path of L slices in one call (small problems: no Python in between):
 * per slice b, the moments of all m keys, the weights me = (float) (w[alpha] M[c][alpha])
 * (float64 product, one rounding), and the readout of all n queries. q [L][n][d],
 * k [L][m][d], v [L][m][dv]; kshift [L][d] or NULL; factors [nfac][L][d] (values
 * [nvfac][L][dv]); vshift [L][dv] (the values' centre, also added back); p2 [L][dv]; w [r];
 * out [L][n][dv]. kchunks / qchunks (1..16): the keys and the queries are cut into that many
 * equal contiguous chunks (the caller keeps every key chunk at least kchunk keys long) shared
 * with the helper thread; the key chunks' float64 moments are added in float64 in chunk order,
 * M = ((M_0 + M_1) + M_2) ... (the parts of the thread split: docs/attention.md), the query
 * chunks read out independently. */
int at_poly(const float *q, const float *k, const float *v, int L, int n, int m, int d, int dv,
            const float *kshift, const float *qfac, int nqfac, const float *kfac, int nkfac,
            const float *vshift, const float *vfac, int nvfac, const int *steps, int nsteps,
            int nlow, int top, int r, int kchunk, int fchunk, const double *w, const double *p2,
            float *out, int kchunks, int qchunks) {
    const int e = dv + 1;
    if (L < 1 || n < 1 || m < 1 || dv < 1 || kchunk < 6 || fchunk < 1 || nqfac < 1 ||
        nkfac < 1 || nvfac < 1 || kchunks < 1 || kchunks > MAX_CHUNKS || qchunks < 1 ||
        qchunks > MAX_CHUNKS)
        return -2;
    if (check_table(d, e, r, top, nsteps, nlow, steps)) return -2;
    double *Mall = scratch(B_A1, sizeof(double) * (size_t)e * r * kchunks);
    float *me = scratch(B_ME, sizeof(float) * (size_t)e * r);
    if (!Mall || !me) return -1;
    const int pooled = (kchunks > 1 || qchunks > 1) && pool_acquire();
    const long fs = (long)L * d, vfs = (long)L * dv;
    int rc = 0;
    for (int b = 0; b < L && !rc; b++) {
        Fused fz = {k + (long)b * m * d, kshift ? kshift + (long)b * d : NULL, kfac + (long)b * d,
                    nkfac, fs, v + (long)b * m * dv, dv, vshift + (long)b * dv,
                    vfac + (long)b * dv, nvfac, vfs};
        Problem p = {NULL, 0, d, e, r, top, kchunk, kchunk, steps, nlow, nsteps, NULL, NULL, &fz};
        rc = moments_shared(&p, m, kchunks, Mall, pooled);
        if (rc) break;
        for (int c = 0; c < e; c++)
            for (int a = 0; a < r; a++)
                me[(long)c * r + a] = (float)(Mall[(long)c * r + a] * w[a]);
        ReadoutJob rj = {q + (long)b * n * d, qfac + (long)b * d, me, vshift + (long)b * dv,
                         steps, p2 + (long)b * dv, out + (long)b * n * dv, fs, nqfac, n, qchunks,
                         d, e, nsteps, nlow, top, r, fchunk, {0}};
        rc = readout_shared(&rj, pooled);
    }
    if (pooled) pthread_mutex_unlock(&pool_owner);
    scratch_trim();
    return rc;
}

/* at_poly's two halves for one slice of a long problem (the caller reports progress and can
 * stop between calls), chunks shared with the helper thread as there.
 * at_moments_f: M ([e][r] float64; kchunks x [e][r] of room) for the m keys of one slice,
 * k [m][d], v [m][dv], kshift [d] or NULL, factor f at kfac[f * fstep] / vfac[f * vfstep]. */
int at_moments_f(const float *k, const float *kshift, const float *kfac, int nkfac, long fstep,
                 const float *v, const float *vshift, const float *vfac, int nvfac, long vfstep,
                 int m, int d, int dv, const int *steps, int nsteps, int nlow, int top, int r,
                 int kchunk, int kchunks, double *M) {
    const int e = dv + 1;
    if (m < 1 || kchunk < 6 || nkfac < 1 || nvfac < 1 || dv < 1 || kchunks < 1 ||
        kchunks > MAX_CHUNKS)
        return -2;
    if (check_table(d, e, r, top, nsteps, nlow, steps)) return -2;
    Fused fz = {k, kshift, kfac, nkfac, fstep, v, dv, vshift, vfac, nvfac, vfstep};
    Problem p = {NULL, 0, d, e, r, top, kchunk, kchunk, steps, nlow, nsteps, NULL, NULL, &fz};
    const int pooled = kchunks > 1 && pool_acquire();
    const int rc = moments_shared(&p, m, kchunks, M, pooled);
    if (pooled) pthread_mutex_unlock(&pool_owner);
    scratch_trim();
    return rc;
}

/* at_readout_f: the queries [i0, i1) of one slice (q [n][d]; out: row i at out + (i - i0) dv),
 * cut into qchunks chunks. */
int at_readout_f(const float *q, const float *qfac, int nqfac, long fstep, int i0, int i1, int d,
                 const float *me, int e, const int *steps, int nsteps, int nlow, int top, int r,
                 int fchunk, const double *p2, const float *cv, float *out, int qchunks) {
    if (i0 < 0 || i1 <= i0 || fchunk < 1 || nqfac < 1 || qchunks < 1 || qchunks > MAX_CHUNKS)
        return -2;
    if (check_table(d, e, r, top, nsteps, nlow, steps)) return -2;
    ReadoutJob rj = {q + (long)i0 * d, qfac, me, cv, steps, p2, out, fstep, nqfac, i1 - i0,
                     qchunks, d, e, nsteps, nlow, top, r, fchunk, {0}};
    const int pooled = qchunks > 1 && pool_acquire();
    const int rc = readout_shared(&rj, pooled);
    if (pooled) pthread_mutex_unlock(&pool_owner);
    scratch_trim();
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Polynomial path (causal)                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* All features of VL * nv items (one per lane), top degree included: G[alpha][S]. */
static void full_features(const Problem *p, const float *X, int S, float *G) {
    lane_features(p, X, S, S, G);
    for (int k = p->nlow; k < p->nsteps; k++) {
        const int *st = p->steps + 4 * k;
        const float *xv = X + (long)st[3] * S;
        for (int i = 0; i < st[1] - st[0]; i++) {
            const float *a = G + (long)(st[2] + i) * S;
            float *o = G + (long)(st[0] + i) * S;
            for (int t = 0; t < S; t += VL) store_a(o + t, load_a(a + t) * load_a(xv + t));
        }
    }
}

/* Causal attention of one slice, n queries and n keys (query i sees keys j <= i), in
 * sub-blocks of `sub` rows (16 or 32: the PyTorch route's causal unit), the PyTorch route's
 * arithmetic (polynomial.causal_blocks):
 *   key state  S[c][alpha] = float64 sum over the sub-blocks before this one of float32 dot
 *              products over their `sub` keys (one lane per key, a lane tree of depth 4: at
 *              most 1 + sub/16 + 4 <= sub roundings per term), rounded to float32 once per
 *              sub-block (as prefix.to(float32));
 *   weights    on the query side in float32: u1w = (float) w * u1 (as u1 *= wc);
 *   readout    off[c][i] = float64 sum over chunks of fchunk features of float32 dot products
 *              state[c] . u1w_i;
 *   diagonal   P[i][j] = float64 sum over the same chunks of float32 dot products u1w_i . u2_j
 *              for j <= i in the sub-block; diag[c][i] = sum_j P[i][j] ve[j][c] in float64;
 *   output     (float) (((off + diag)[c] / (off + diag)[dv]) * p2[c] + cv[c]).
 * qb, kb: d rows, row l at qb + l * xs (balanced, transposed); ve: [n][e] float32 (normalised
 * centred values and a column of ones); w: [r] float64; out: [n][dv] float32. */
int at_causal(const float *qb, const float *kb, long xs, int n, int d, const float *ve, int e,
              const int *steps, int nsteps, int nlow, int top, int r, int fchunk, int sub,
              const double *w, const double *p2, const float *cv, float *out) {
    if (n < 1 || xs < n || fchunk < 1 || (sub != 16 && sub != 32)) return -2;
    if (check_table(d, e, r, top, nsteps, nlow, steps)) return -2;
    const int dv = e - 1, nv = sub / VL;
    Problem p = {qb, xs, d, e, r, top, 6, fchunk, steps, nlow, nsteps, NULL, NULL};
    double *S = scratch(B_A1, sizeof(double) * (size_t)e * r);
    float *st32 = scratch(B_ME, sizeof(float) * (size_t)e * r);
    float *wc = scratch(B_INV, sizeof(float) * (size_t)r);
    float *X = scratch(B_QX, sizeof(float) * (size_t)d * sub);
    float *G1 = scratch(B_QG, sizeof(float) * (size_t)r * sub);
    float *G2 = scratch(B_KG, sizeof(float) * (size_t)r * sub);
    float *V = scratch(B_KV, sizeof(float) * (size_t)e * sub);
    double *o = scratch(B_QO, sizeof(double) * (size_t)e * sub);
    double *P = scratch(B_T64, sizeof(double) * (size_t)sub * sub);
    if (!S || !st32 || !wc || !X || !G1 || !G2 || !V || !o || !P) return -1;
    memset(S, 0, sizeof(double) * (size_t)e * r);
    for (int a = 0; a < r; a++) wc[a] = (float)w[a];
    for (int s0 = 0; s0 < n; s0 += sub) {
        const int cnt = n - s0 < sub ? n - s0 : sub;
        /* features of the keys and (weighted) of the queries of this sub-block */
        for (int side = 0; side < 2; side++) {
            const float *src0 = (side ? kb : qb) + s0;
            for (int l = 0; l < d; l++) {
                for (int t = 0; t < cnt; t++) X[l * sub + t] = src0[(long)l * xs + t];
                for (int t = cnt; t < sub; t++) X[l * sub + t] = 0.0f;
            }
            full_features(&p, X, sub, side ? G2 : G1);
        }
        for (int a = 0; a < r; a++) {
            const vf wa = bcast(wc[a]);
            for (int q = 0; q < nv; q++)
                store_a(G1 + (long)a * sub + q * VL, load_a(G1 + (long)a * sub + q * VL) * wa);
        }
        for (int c = 0; c < e; c++) {
            for (int t = 0; t < cnt; t++) V[c * sub + t] = ve[(long)(s0 + t) * e + c];
            for (int t = cnt; t < sub; t++) V[c * sub + t] = 0.0f;
        }
        /* readout against the key state before this sub-block */
        for (long i = 0; i < (long)e * r; i++) st32[i] = (float)S[i];
        memset(o, 0, sizeof(double) * (size_t)e * sub);
        for (int a0 = 0; a0 < r; a0 += fchunk) {
            const int a1 = r - a0 < fchunk ? r : a0 + fchunk;
            for (int c = 0; c < e; c++) {
                vf s[2] = {(vf){0}, (vf){0}};
                const float *sc = st32 + (long)c * r;
                for (int a = a0; a < a1; a++) {
                    const vf b = bcast(sc[a]);
                    for (int q = 0; q < nv; q++) s[q] += load_a(G1 + (long)a * sub + q * VL) * b;
                }
                for (int q = 0; q < nv; q++)
                    for (int t = 0; t < VL; t++) o[c * sub + q * VL + t] += (double)s[q][t];
            }
        }
        /* the diagonal sub-block, pairwise: P[j][i] = u1w_i . u2_j (float32 chunks) */
        memset(P, 0, sizeof(double) * (size_t)sub * sub);
        for (int a0 = 0; a0 < r; a0 += fchunk) {
            const int a1 = r - a0 < fchunk ? r : a0 + fchunk;
            for (int j0 = 0; j0 < cnt; j0 += 8) {
                const int nj = cnt - j0 < 8 ? cnt - j0 : 8;
                vf s[8][2];
                for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = (vf){0};
                for (int a = a0; a < a1; a++) {
                    vf g[2];
                    for (int q = 0; q < nv; q++) g[q] = load_a(G1 + (long)a * sub + q * VL);
                    const float *k2 = G2 + (long)a * sub + j0;
                    for (int j = 0; j < nj; j++) {
                        const vf b = bcast(k2[j]);
                        for (int q = 0; q < nv; q++) s[j][q] += g[q] * b;
                    }
                }
                for (int j = 0; j < nj; j++)
                    for (int q = 0; q < nv; q++)
                        for (int t = 0; t < VL; t++) P[(j0 + j) * sub + q * VL + t] += (double)s[j][q][t];
            }
        }
        for (int t = 0; t < cnt; t++) {
            double num[64], den = o[(long)dv * sub + t];
            for (int c0 = 0; c0 < dv; c0 += 64) {
                const int nc = dv - c0 < 64 ? dv - c0 : 64;
                for (int c = 0; c < nc; c++) num[c] = 0.0;
                double dd = 0.0;
                for (int j = 0; j <= t; j++) {
                    const double pj = P[j * sub + t];
                    const float *vj = ve + (long)(s0 + j) * e;
                    for (int c = 0; c < nc; c++) num[c] += pj * (double)vj[c0 + c];
                    if (c0 == 0) dd += pj * (double)vj[dv];
                }
                if (c0 == 0) den += dd;
                for (int c = 0; c < nc; c++) {
                    const int cc = c0 + c;
                    const double y = ((o[(long)cc * sub + t] + num[c]) / den) * p2[cc] + (double)cv[cc];
                    out[(long)(s0 + t) * dv + cc] = (float)y;
                }
            }
        }
        /* this sub-block's keys into the state: float32 dot products over its keys */
        for (int a = 0; a < r; a++) {
            for (int c = 0; c < e; c++) {
                vf acc = (vf){0};
                for (int q = 0; q < nv; q++)
                    acc += load_a(G2 + (long)a * sub + q * VL) * load_a(V + (long)c * sub + q * VL);
                S[(long)c * r + a] += (double)lane_sum(acc);
            }
        }
    }
    scratch_trim();
    return 0;
}
