/* Fused float32 core of the polynomial tensor-attention path (compute/tensor_attention/).
 *
 * Computes the steps that `tensor_rounding_bound` certifies, in the arithmetic the PyTorch
 * route (`polynomial.poly_core`) uses, with every block of features kept in cache:
 *
 *   features  x^alpha: degree m built from degree m-1 by one float32 multiplication (the
 *             steps of compute/core/monomials.py: rows [dst, end) = rows [src, ...) * x_var);
 *             the top degree is formed in registers right where it is consumed;
 *   moments   A[col][alpha] = float64 sum over chunks of float32 dot products of depth
 *             <= chunk over the keys: sum_j x_j^alpha * ve[j][col];
 *   weights   Me = (float) (w[alpha] * (A1 * A2))   (float64, then one rounding to float32);
 *   readout   o[col][i] = float64 sum over chunks of `chunk` features of float32 dot products
 *             sum_alpha Me[col][alpha] * q_i^alpha;  out[i][col] = o[col][i] / o[dv][i].
 *
 * Rounding: a float32 dot product "of length c" in the model means every term is rounded at
 * most c times (its product and the additions after it, in any summation order); a fused
 * multiply-add rounds less than a multiply and an add. The key moments keep one partial sum
 * per vector lane, each lane adds at most chunk - 5 keys, and the 16 lanes are added by a tree
 * of depth 4: at most 1 + (chunk - 5) + 4 = chunk roundings per term even without fused
 * multiply-adds (adding the exact zeros of empty lanes rounds nothing, so fewer than 16 keys
 * stay within their own count), and no more float64 additions than ceil(m / chunk). So the
 * bound of the PyTorch route covers this code unchanged. Gradual underflow is outside the
 * relative count and covered by the bound's absolute terms, as for the PyTorch route: each
 * product or down-cast with a subnormal result (balancing, value normalisation, features,
 * the cast of Me) is in the model's underflow term H', and the final (float) of a float32
 * output, possibly subnormal, in its absolute term (half a float32 subnormal spacing). Compile WITHOUT -ffast-math (it would
 * flush subnormals to zero and reassociate sums); -ffp-contract=fast only creates FMAs (in
 * the dot products: no other expression here multiplies and adds).
 *
 * Written with GCC vector extensions (16 floats): AVX-512 with -march=native where the CPU
 * has it, narrower vectors otherwise. Single-threaded (on the 2-vCPU machines this was tuned
 * on, waking a second thread cost more than it saved). Returns 0 on success, -1 when memory
 * could not be allocated, -2 for bad arguments.
 */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VL 16
typedef float vf __attribute__((vector_size(64)));

static inline vf load_a(const float *p) { return *(const vf *)p; }
static inline void store_a(float *p, vf x) { *(vf *)p = x; }
static inline vf bcast(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

#define INLINE static inline __attribute__((always_inline))

/* Per-thread scratch buffers, one slot per purpose, grown on demand and kept between calls
 * (fresh large allocations are fresh pages: page faults on every call). Released after a call
 * when together they exceed KEEP_BYTES. */
enum {
    B_KX, B_KV, B_KG, B_ACC, B_QX, B_QG, B_QO, B_SRC, B_VAR, B_A1, B_A2, B_ME, B_VE, B_T64,
    B_SCALE, B_INV, NBUF
};
#define KEEP_BYTES ((size_t)64 << 20)
static __thread void *buf_ptr[NBUF];
static __thread size_t buf_cap[NBUF];

static void *scratch(int slot, size_t bytes) {
    if (bytes == 0) bytes = 64;
    if (buf_cap[slot] >= bytes) return buf_ptr[slot];
    free(buf_ptr[slot]);
    buf_ptr[slot] = NULL;
    buf_cap[slot] = 0;
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    buf_ptr[slot] = p;
    buf_cap[slot] = bytes;
    return p;
}

static void scratch_trim(void) {
    size_t total = 0;
    for (int i = 0; i < NBUF; i++) total += buf_cap[i];
    if (total <= KEEP_BYTES) return;
    for (int i = 0; i < NBUF; i++) {
        free(buf_ptr[i]);
        buf_ptr[i] = NULL;
        buf_cap[i] = 0;
    }
}

int ta_vector_bytes(void) {
#if defined(__AVX512F__)
    return 64;
#elif defined(__AVX2__) || defined(__AVX__)
    return 32;
#else
    return 16;
#endif
}

typedef struct {
    const float *xt; /* d rows, row l at xt + l * xs */
    long xs;
    int d, e, r, top, chunk;
    const int *steps; /* nsteps x (dst, end, src, var), graded order */
    int nlow;         /* the first nlow steps build rows < top; the rest build the top degree */
    int nsteps;
    const int *src_of, *var_of; /* per top-degree row alpha >= top: its source row, variable */
} Problem;

/* Features of the first len (a multiple of VL) of S items, one item per lane:
 * G[alpha][S] for alpha < top, from X[l][S]. Row 0 is 1; each step is one float32
 * multiplication per entry (degree 1 is a product with the constant 1, exact). */
static void lane_features(const Problem *p, const float *X, int S, int len, float *G) {
    const vf one = bcast(1.0f);
    for (int t = 0; t < len; t += VL) store_a(G + t, one);
    for (int s = 0; s < p->nlow; s++) {
        const int *st = p->steps + 4 * s;
        const float *xv = X + (long)st[3] * S;
        for (int i = 0; i < st[1] - st[0]; i++) {
            const float *a = G + (long)(st[2] + i) * S;
            float *o = G + (long)(st[0] + i) * S;
            for (int t = 0; t < len; t += VL) store_a(o + t, load_a(a + t) * load_a(xv + t));
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Key moments: one key per lane                                                              */
/* ---------------------------------------------------------------------------------------- */

/* acc[a * e + c] (one partial sum per key lane) += sum over the keys of feature a times
 * V[c][key], for NA features and NC columns. Feature a is G[a][key], or with LIFT
 * G[a][key] * xv[key] (a top-degree monomial from its source row). Requires len >= VL. */
INLINE void moment_kernel(const int LIFT, const int NA, const int NC, const float *G,
                          const float *xv, const float *V, int S, int len, int e, vf *acc) {
    vf s[3][9];
    for (int a = 0; a < NA; a++)
        for (int c = 0; c < NC; c++) s[a][c] = acc[a * e + c];
    int t = 0;
    do {
        vf g[3];
        if (LIFT) {
            const vf x = load_a(xv + t);
            for (int a = 0; a < NA; a++) g[a] = load_a(G + (long)a * S + t) * x;
        } else {
            for (int a = 0; a < NA; a++) g[a] = load_a(G + (long)a * S + t);
        }
        for (int c = 0; c < NC; c++) {
            const vf v = load_a(V + (long)c * S + t);
            for (int a = 0; a < NA; a++) s[a][c] += g[a] * v;
        }
        t += VL;
    } while (t < len);
    for (int a = 0; a < NA; a++)
        for (int c = 0; c < NC; c++) acc[a * e + c] = s[a][c];
}

#define MK_CASE(LIFT, NA, NC) \
    case (NA) * 16 + (NC): moment_kernel(LIFT, NA, NC, G, xv, V, S, len, e, acc); break;
#define MK_ROW(LIFT, NA) \
    MK_CASE(LIFT, NA, 1) MK_CASE(LIFT, NA, 2) MK_CASE(LIFT, NA, 3) MK_CASE(LIFT, NA, 4) \
    MK_CASE(LIFT, NA, 5) MK_CASE(LIFT, NA, 6) MK_CASE(LIFT, NA, 7) MK_CASE(LIFT, NA, 8) \
    MK_CASE(LIFT, NA, 9)

static void moment_block(int lift, int na, int nc, const float *G, const float *xv,
                         const float *V, int S, int len, int e, vf *acc) {
    if (lift) {
        switch (na * 16 + nc) {
            MK_ROW(1, 1)
            MK_ROW(1, 2)
            MK_ROW(1, 3)
            default: break;
        }
    } else {
        switch (na * 16 + nc) {
            MK_ROW(0, 1)
            MK_ROW(0, 2)
            MK_ROW(0, 3)
            default: break;
        }
    }
}

/* Sum of the 16 lanes by a float32 tree of depth 4. */
static inline float lane_sum(vf x) {
    x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    x += __builtin_shufflevector(x, x, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
    return x[0];
}

#define SUPER 256 /* keys whose features are built together (top x SUPER floats) */

typedef struct {
    float *X, *V, *G;
    vf *acc;
} KeyWork;

static int key_work_alloc(KeyWork *w, const Problem *p) {
    w->X = scratch(B_KX, sizeof(float) * (size_t)p->d * SUPER);
    w->V = scratch(B_KV, sizeof(float) * (size_t)p->e * SUPER);
    w->G = scratch(B_KG, sizeof(float) * (size_t)p->top * SUPER);
    w->acc = scratch(B_ACC, sizeof(vf) * (size_t)p->r * p->e);
    return w->X && w->V && w->G && w->acc ? 0 : -1;
}

/* A[c * r + alpha] (float64) for the m keys at columns col0.. of xt, values ve ([m][e]).
 * A segment (one float32 partial sum per lane, then the lane tree) holds at most
 * 16 (chunk - 5) keys, so every float32 dot product has depth <= chunk. */
static void moments(const Problem *p, KeyWork *w, long col0, int m, const float *ve, double *A) {
    const int d = p->d, e = p->e, r = p->r;
    const int per_lane = p->chunk - 5;
    const int S = SUPER < VL * per_lane ? SUPER : VL * per_lane;
    const int seg = (VL * per_lane / S) * S; /* keys per segment, a multiple of S */
    float *X = w->X, *V = w->V, *G = w->G;
    vf *acc = w->acc;
    memset(A, 0, sizeof(double) * (size_t)e * r);
    for (int s0 = 0; s0 < m; s0 += seg) {
        const int s1 = m - s0 < seg ? m : s0 + seg;
        memset(acc, 0, sizeof(vf) * (size_t)r * e);
        for (int s = s0; s < s1; s += S) {
            const int L = s1 - s < S ? s1 - s : S;
            const int len = (L + VL - 1) / VL * VL;
            for (int l = 0; l < d; l++) {
                const float *src = p->xt + (long)l * p->xs + col0 + s;
                for (int t = 0; t < L; t++) X[l * S + t] = src[t];
                for (int t = L; t < len; t++) X[l * S + t] = 0.0f;
            }
            for (int c = 0; c < e; c++) {
                for (int t = 0; t < L; t++) V[c * S + t] = ve[(long)(s + t) * e + c];
                for (int t = L; t < len; t++) V[c * S + t] = 0.0f; /* padded keys add +-0 */
            }
            lane_features(p, X, S, len, G);
            for (int a0 = 0; a0 < p->top; a0 += 3) {
                const int na = p->top - a0 < 3 ? p->top - a0 : 3;
                for (int c0 = 0; c0 < e; c0 += 9) {
                    const int nc = e - c0 < 9 ? e - c0 : 9;
                    moment_block(0, na, nc, G + (long)a0 * S, NULL, V + (long)c0 * S, S, len,
                                 e, acc + (long)a0 * e + c0);
                }
            }
            for (int k = p->nlow; k < p->nsteps; k++) {
                const int *st = p->steps + 4 * k;
                const float *xv = X + (long)st[3] * S;
                for (int i = 0; i < st[1] - st[0]; i += 3) {
                    const int na = st[1] - st[0] - i < 3 ? st[1] - st[0] - i : 3;
                    for (int c0 = 0; c0 < e; c0 += 9) {
                        const int nc = e - c0 < 9 ? e - c0 : 9;
                        moment_block(1, na, nc, G + (long)(st[2] + i) * S, xv,
                                     V + (long)c0 * S, S, len, e,
                                     acc + (long)(st[0] + i) * e + c0);
                    }
                }
            }
        }
        for (int a = 0; a < r; a++)
            for (int c = 0; c < e; c++) A[(long)c * r + a] += (double)lane_sum(acc[a * e + c]);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Readout: QB queries per block, one query per lane                                          */
/* ---------------------------------------------------------------------------------------- */

#define QV 2 /* vectors of queries per block */
#define QB (QV * VL)

typedef struct {
    float *X, *G;
    double *o;
} QueryWork;

static int query_work_alloc(QueryWork *w, const Problem *p) {
    w->X = scratch(B_QX, sizeof(float) * (size_t)p->d * QB);
    w->G = scratch(B_QG, sizeof(float) * (size_t)p->top * QB);
    w->o = scratch(B_QO, sizeof(double) * (size_t)p->e * QB);
    return w->X && w->G && w->o ? 0 : -1;
}

/* o[c][lane] += float64 sum over chunks of float32 sums over the chunk's features of
 * me[c][alpha] * feature_alpha[lane], NC columns. */
INLINE void readout_kernel(const int NC, const Problem *p, const float *X, const float *G,
                           const float *me, double *o) {
    const int r = p->r, top = p->top, chunk = p->chunk;
    for (int a0 = 0; a0 < r; a0 += chunk) {
        const int a1 = r - a0 < chunk ? r : a0 + chunk;
        vf s[QV][9];
        for (int c = 0; c < NC; c++)
            for (int q = 0; q < QV; q++) s[q][c] = (vf){0};
        for (int a = a0; a < (a1 < top ? a1 : top); a++) {
            vf g[QV];
            for (int q = 0; q < QV; q++) g[q] = load_a(G + (long)a * QB + q * VL);
            for (int c = 0; c < NC; c++) {
                const vf b = bcast(me[(long)c * r + a]);
                for (int q = 0; q < QV; q++) s[q][c] += g[q] * b;
            }
        }
        for (int a = a0 > top ? a0 : top; a < a1; a++) {
            const float *gs = G + (long)p->src_of[a - top] * QB;
            const float *xv = X + (long)p->var_of[a - top] * QB;
            vf g[QV];
            for (int q = 0; q < QV; q++) g[q] = load_a(gs + q * VL) * load_a(xv + q * VL);
            for (int c = 0; c < NC; c++) {
                const vf b = bcast(me[(long)c * r + a]);
                for (int q = 0; q < QV; q++) s[q][c] += g[q] * b;
            }
        }
        for (int c = 0; c < NC; c++)
            for (int q = 0; q < QV; q++)
                for (int t = 0; t < VL; t++) o[c * QB + q * VL + t] += (double)s[q][c][t];
    }
}

#define RK_CASE(NC) \
    case NC: readout_kernel(NC, p, X, G, me, o); break;

static void readout_block(int nc, const Problem *p, const float *X, const float *G,
                          const float *me, double *o) {
    switch (nc) {
        RK_CASE(1) RK_CASE(2) RK_CASE(3) RK_CASE(4) RK_CASE(5)
        RK_CASE(6) RK_CASE(7) RK_CASE(8) RK_CASE(9)
        default: break;
    }
}

/* out[i][c] for the queries i in [i0, i1) (columns 0.. of xt). */
static void readout(const Problem *p, QueryWork *w, const float *me, int i0, int i1,
                    double *out) {
    const int d = p->d, e = p->e;
    for (int b0 = i0; b0 < i1; b0 += QB) {
        const int nb = i1 - b0 < QB ? i1 - b0 : QB;
        for (int l = 0; l < d; l++) {
            const float *src = p->xt + (long)l * p->xs + b0;
            for (int t = 0; t < nb; t++) w->X[l * QB + t] = src[t];
            for (int t = nb; t < QB; t++) w->X[l * QB + t] = 0.0f;
        }
        lane_features(p, w->X, QB, QB, w->G);
        memset(w->o, 0, sizeof(double) * (size_t)e * QB);
        for (int c0 = 0; c0 < e; c0 += 9) {
            const int nc = e - c0 < 9 ? e - c0 : 9;
            readout_block(nc, p, w->X, w->G, me + (long)c0 * p->r, w->o + (long)c0 * QB);
        }
        const double *den = w->o + (long)(e - 1) * QB;
        for (int t = 0; t < nb; t++)
            for (int c = 0; c < e - 1; c++)
                out[(long)(b0 + t) * (e - 1) + c] = w->o[c * QB + t] / den[t];
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Entry points                                                                               */
/* ---------------------------------------------------------------------------------------- */

/* One slice. xt: d rows of N = n + n1 + n2 float32 columns (q | k1 | k2, balanced), row l at
 * xt + l * xs; ve: [n1 + n2][e] float32 ([v1; v2 | 1], normalised); steps: nsteps x (dst, end,
 * src, var) for every degree >= 1 (compute.core.monomials.monomial_table), of
 * which the first nlow build the rows below top (top: the first row of the highest degree,
 * 1 when there are no steps); w: [r] float64 weights; out: [n][e - 1] float64; chunk: the
 * float32 dot-product length (>= 6). */
static int poly_forward(const float *xt, long xs, int n, int n1, int n2, int d,
                        const float *ve, int e, const int *steps, int nsteps, int nlow, int top,
                        int r, const double *w, int chunk, double *out) {
    if (d < 1 || e < 2 || chunk < 6 || r < 1 || top < 1 || top > r || nlow < 0 ||
        nlow > nsteps || n < 1 || n1 < 1 || n2 < 1)
        return -2;
    Problem p = {xt, xs, d, e, r, top, chunk, steps, nlow, nsteps, NULL, NULL};
    int *src_of = scratch(B_SRC, sizeof(int) * (size_t)(r - top + 1));
    int *var_of = scratch(B_VAR, sizeof(int) * (size_t)(r - top + 1));
    double *A1 = scratch(B_A1, sizeof(double) * (size_t)e * r);
    double *A2 = scratch(B_A2, sizeof(double) * (size_t)e * r);
    float *me = scratch(B_ME, sizeof(float) * (size_t)e * r);
    KeyWork kw;
    QueryWork qw;
    if (!src_of || !var_of || !A1 || !A2 || !me || key_work_alloc(&kw, &p) ||
        query_work_alloc(&qw, &p))
        return -1;
    for (int k = nlow; k < nsteps; k++) {
        const int *st = steps + 4 * k;
        if (st[0] < top || st[1] > r) return -2;
        for (int i = 0; i < st[1] - st[0]; i++) {
            src_of[st[0] + i - top] = st[2] + i;
            var_of[st[0] + i - top] = st[3];
        }
    }
    p.src_of = src_of;
    p.var_of = var_of;
    moments(&p, &kw, n, n1, ve, A1);
    moments(&p, &kw, (long)n + n1, n2, ve + (long)n1 * e, A2);
    for (int c = 0; c < e; c++)
        for (int a = 0; a < r; a++) {
            const long k = (long)c * r + a;
            me[k] = (float)(w[a] * (A1[k] * A2[k]));
        }
    readout(&p, &qw, me, 0, n, out);
    return 0;
}

/* The whole polynomial path after planning, slices [b0, b1):
 * xt: [d][B][N] float32 (q | k1 | k2 transposed, as ta_stats writes it); when shifts is not
 * NULL the columns of q, k1, k2 are first multiplied in place by 2^shifts[0..2] (balancing;
 * exact but for underflow, like torch's multiplication by the same float32 power of two);
 * v1: [B][n1][dv], v2: [B][n2][dv] float32 are normalised per column, v * 2^-e rounded once
 * to float32 (e1, e2: [B][dv] int64); then poly_forward; the output is scaled back,
 * (o / den) * 2^(e1 + e2) in float64, into out32 (float32, rounded once) or out64 (float64),
 * [B][n][dv]. Other arguments as poly_forward. */
int ta_poly_run(float *xt, int B, int n, int n1, int n2, int d, const int *shifts,
                const float *v1, const float *v2, const int64_t *e1, const int64_t *e2, int dv,
                const int *steps, int nsteps, int nlow, int top, int r, const double *w,
                int chunk, float *out32, double *out64, int b0, int b1) {
    if (B < 1 || b0 < 0 || b1 > B || b0 > b1 || dv < 1 || (out32 == NULL) == (out64 == NULL))
        return -2;
    const long N = (long)n + n1 + n2;
    const int e = dv + 1;
    float *ve = scratch(B_VE, sizeof(float) * (size_t)(n1 + n2) * e);
    double *t64 = scratch(B_T64, sizeof(double) * (size_t)n * dv);
    double *scale = scratch(B_SCALE, sizeof(double) * (size_t)dv);
    double *inv = scratch(B_INV, sizeof(double) * (size_t)2 * dv);
    int rc = ve && t64 && scale && inv ? 0 : -1;
    for (int b = b0; b < b1 && rc == 0; b++) {
        if (shifts != NULL) {
            const long lo[3] = {0, n, (long)n + n1}, hi[3] = {n, (long)n + n1, N};
            for (int t = 0; t < 3; t++) {
                if (shifts[t] == 0) continue;
                const float f = (float)ldexp(1.0, shifts[t]);
                for (int l = 0; l < d; l++) {
                    float *row = xt + (long)l * B * N + (long)b * N;
                    for (long j = lo[t]; j < hi[t]; j++) row[j] *= f;
                }
            }
        }
        for (int c = 0; c < dv; c++) {
            inv[c] = ldexp(1.0, (int)-e1[(long)b * dv + c]);
            inv[dv + c] = ldexp(1.0, (int)-e2[(long)b * dv + c]);
            scale[c] = ldexp(1.0, (int)(e1[(long)b * dv + c] + e2[(long)b * dv + c]));
        }
        for (int j = 0; j < n1 + n2; j++) {
            const float *v = j < n1 ? v1 + ((long)b * n1 + j) * dv : v2 + ((long)b * n2 + j - n1) * dv;
            const double *f = j < n1 ? inv : inv + dv;
            float *o = ve + (long)j * e;
            for (int c = 0; c < dv; c++) o[c] = (float)((double)v[c] * f[c]);
            o[dv] = 1.0f;
        }
        rc = poly_forward(xt + (long)b * N, (long)B * N, n, n1, n2, d, ve, e, steps, nsteps, nlow,
                          top, r, w, chunk, t64);
        if (rc != 0) break;
        for (long i = 0; i < (long)n * dv; i++) {
            const double y = t64[i] * scale[i % dv];
            if (out32 != NULL)
                out32[(long)b * n * dv + i] = (float)y;
            else
                out64[(long)b * n * dv + i] = y;
        }
    }
    scratch_trim();
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Input statistics (one pass over the five inputs)                                           */
/* ---------------------------------------------------------------------------------------- */

/* q: [B][n][d], k1: [B][n1][d], k2: [B][n2][d], v1: [B][n1][dv], v2: [B][n2][dv], contiguous
 * float32. Writes xt: [d][B][N] (N = n + n1 + n2: q | k1 | k2 transposed), seg: [B][2][3]
 * float64 (per slice and tensor: the largest squared row 2-norm, summed in float64 where
 * squares of float32 entries are exact, and the largest |entry|), ext: [4][B][dv] float64
 * (per slice and column: max v1, min v1, max v2, min v2). A NaN anywhere in a tensor makes
 * its reductions NaN (as torch's amax/aminmax); an infinity shows as an infinite extreme. */
int ta_stats(const float *q, const float *k1, const float *k2, const float *v1, const float *v2,
             int B, int n, int n1, int n2, int d, int dv, float *xt, double *seg, double *ext) {
    if (B < 1 || n < 1 || n1 < 1 || n2 < 1 || d < 1 || dv < 1) return -2;
    const long N = (long)n + n1 + n2;
    const double nan = __builtin_nan("");
    for (int b = 0; b < B; b++) {
        const float *src[3] = {q + (long)b * n * d, k1 + (long)b * n1 * d, k2 + (long)b * n2 * d};
        const int rows[3] = {n, n1, n2};
        long off = 0;
        for (int t = 0; t < 3; t++) {
            double sq_max = 0.0, abs_max = 0.0;
            int bad = 0;
            for (int j = 0; j < rows[t]; j++) {
                const float *x = src[t] + (long)j * d;
                double sq = 0.0;
                float mx = 0.0f;
                for (int l = 0; l < d; l++) {
                    const float v = x[l];
                    const float a = __builtin_fabsf(v);
                    bad |= v != v;
                    sq += (double)v * (double)v;
                    mx = a > mx ? a : mx;
                    xt[(long)l * B * N + (long)b * N + off + j] = v;
                }
                sq_max = sq > sq_max ? sq : sq_max;
                abs_max = (double)mx > abs_max ? (double)mx : abs_max;
            }
            seg[b * 6 + t] = bad ? nan : sq_max;
            seg[b * 6 + 3 + t] = bad ? nan : abs_max;
            off += rows[t];
        }
        const float *vs[2] = {v1 + (long)b * n1 * dv, v2 + (long)b * n2 * dv};
        const int vrows[2] = {n1, n2};
        for (int t = 0; t < 2; t++) {
            double *hi = ext + ((long)(2 * t) * B + b) * dv;
            double *lo = ext + ((long)(2 * t + 1) * B + b) * dv;
            for (int c0 = 0; c0 < dv; c0 += 64) { /* columns in groups that fit on the stack */
                const int nc = dv - c0 < 64 ? dv - c0 : 64;
                float h[64], m[64];
                int bad[64];
                for (int c = 0; c < nc; c++) {
                    h[c] = m[c] = vs[t][c0 + c];
                    bad[c] = 0;
                }
                for (int j = 0; j < vrows[t]; j++) {
                    const float *x = vs[t] + (long)j * dv + c0;
                    for (int c = 0; c < nc; c++) {
                        const float v = x[c];
                        bad[c] |= v != v;
                        h[c] = v > h[c] ? v : h[c];
                        m[c] = v < m[c] ? v : m[c];
                    }
                }
                for (int c = 0; c < nc; c++) {
                    hi[c0 + c] = bad[c] ? nan : (double)h[c];
                    lo[c0 + c] = bad[c] ? nan : (double)m[c];
                }
            }
        }
    }
    return 0;
}
