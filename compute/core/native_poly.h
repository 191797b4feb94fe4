/* The float32 polynomial-path building blocks shared by the compiled kernels of attention
 * (compute/attention/native/attention_poly.c) and tensor attention
 * (compute/tensor_attention/native/tensor_poly.c); included by both, never compiled alone
 * (compute/core/native.py hashes it into every library that includes it).
 *
 *   lane_features  features x^alpha of VL items per vector, degree m from degree m-1 by one
 *                  float32 multiplication (the graded steps of compute/core/monomials.py);
 *   moments        A[c][alpha] = float64 sum over segments of float32 dot products of depth
 *                  <= chunk over the keys: sum_j x_j^alpha * ve[j][c] (one partial sum per
 *                  vector lane, at most chunk - 5 keys each, then a lane tree of depth 4);
 *                  the top degree is formed in registers right where it is consumed;
 *   readout        o[c][i] = float64 sum over chunks of fchunk features of float32 dot
 *                  products sum_alpha me[c][alpha] * q_i^alpha; out[i][c] = o[c][i] / o[e-1][i].
 *
 * The rounding arguments are in the files that include this one (their docs say which bound
 * covers them). Written with GCC vector extensions (16 floats). Compile WITHOUT -ffast-math.
 */
#ifndef COMPUTE_NATIVE_POLY_H
#define COMPUTE_NATIVE_POLY_H
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
    B_SCALE, B_INV, B_EXTRA0, B_EXTRA1, B_EXTRA2, B_EXTRA3, NBUF
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


/* Inputs read straight from row-major tensors, prepared while they are loaded (attention's
 * fused route): x' = fl(...fl(fl(x - shift) * fac_0) ... * fac_{nfac-1}) per coordinate,
 * the same float32 operations, in the same order, as the PyTorch preparation (centring,
 * balancing by powers of two; for the keys' values centring and normalisation), so the
 * loaded numbers are bit for bit those of the PyTorch route. */
typedef struct {
    const float *x;      /* [rows][d], row j at x + j * d */
    const float *shift;  /* [d] subtracted first, or NULL */
    const float *fac;    /* factor f of coordinate l at fac[f * fstep + l] */
    int nfac;
    long fstep;
    const float *v;      /* keys only: values [rows][dv] (the ones column is added) */
    int dv;
    const float *vshift; /* [dv] */
    const float *vfac;   /* factor f of column c at vfac[f * vfstep + c] */
    int nvfac;
    long vfstep;
} Fused;

/* X[l * S + t] = prepared coordinate l of row j0 + t, t < cnt; zero for cnt <= t < len.
 * First the transposing copy, then the preparation row by row of X, each step one float32
 * operation per entry broadcast along the row (vectorised): per entry the same operations in
 * the same order as the PyTorch preparation, fl(...fl(fl(x - shift) fac_0)... fac_last). */
static void fused_rows(const Fused *f, int d, long j0, int cnt, int len, int S, float *X) {
    const float *src = f->x + j0 * d;
    for (int t = 0; t < cnt; t++)
        for (int l = 0; l < d; l++) X[l * S + t] = src[(long)t * d + l];
    for (int l = 0; l < d; l++) {
        float *xl = X + (long)l * S;
        if (f->shift) {
            const float sh = f->shift[l];
            for (int t = 0; t < cnt; t++) xl[t] = xl[t] - sh;
        }
        for (int k = 0; k < f->nfac; k++) {
            const float fa = f->fac[k * f->fstep + l];
            for (int t = 0; t < cnt; t++) xl[t] = xl[t] * fa;
        }
        for (int t = cnt; t < len; t++) xl[t] = 0.0f;
    }
}

/* V[c * S + t] = prepared value c of row j0 + t (c < dv), V[dv * S + t] = 1; zero past cnt.
 * As fused_rows: the transposing copy, then fl(...fl(fl(v - vshift) vfac_0)...) row by row. */
static void fused_values(const Fused *f, long j0, int cnt, int len, int S, float *V) {
    const int dv = f->dv;
    const float *src = f->v + j0 * dv;
    for (int t = 0; t < cnt; t++)
        for (int c = 0; c < dv; c++) V[c * S + t] = src[(long)t * dv + c];
    for (int c = 0; c < dv; c++) {
        float *vc = V + (long)c * S;
        const float sh = f->vshift[c];
        for (int t = 0; t < cnt; t++) vc[t] = vc[t] - sh;
        for (int k = 0; k < f->nvfac; k++) {
            const float fa = f->vfac[k * f->vfstep + c];
            for (int t = 0; t < cnt; t++) vc[t] = vc[t] * fa;
        }
        for (int t = cnt; t < len; t++) vc[t] = 0.0f;
    }
    float *one = V + (long)dv * S;
    for (int t = 0; t < cnt; t++) one[t] = 1.0f;
    for (int t = cnt; t < len; t++) one[t] = 0.0f;
}

typedef struct {
    const float *xt; /* d rows, row l at xt + l * xs */
    long xs;
    int d, e, r, top;
    int chunk;  /* key moments: float32 dot products of depth <= chunk (>= 6) */
    int fchunk; /* readout: float32 dot products over at most fchunk features (>= 1) */
    const int *steps; /* nsteps x (dst, end, src, var), graded order */
    int nlow;         /* the first nlow steps build rows < top; the rest build the top degree */
    int nsteps;
    const int *src_of, *var_of; /* per top-degree row alpha >= top: its source row, variable */
    const Fused *fz; /* non-NULL: inputs (and values) from fz's rows, not xt / ve */
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
            if (p->fz) {
                fused_rows(p->fz, d, col0 + s, L, len, S, X);
                fused_values(p->fz, col0 + s, L, len, S, V); /* padded keys add +-0 */
            } else {
                for (int l = 0; l < d; l++) {
                    const float *src = p->xt + (long)l * p->xs + col0 + s;
                    for (int t = 0; t < L; t++) X[l * S + t] = src[t];
                    for (int t = L; t < len; t++) X[l * S + t] = 0.0f;
                }
                for (int c = 0; c < e; c++) {
                    for (int t = 0; t < L; t++) V[c * S + t] = ve[(long)(s + t) * e + c];
                    for (int t = L; t < len; t++) V[c * S + t] = 0.0f; /* padded keys add +-0 */
                }
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
    const int r = p->r, top = p->top, chunk = p->fchunk;
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
        if (p->fz) {
            fused_rows(p->fz, d, b0, nb, QB, QB, w->X);
        } else {
            for (int l = 0; l < d; l++) {
                const float *src = p->xt + (long)l * p->xs + b0;
                for (int t = 0; t < nb; t++) w->X[l * QB + t] = src[t];
                for (int t = nb; t < QB; t++) w->X[l * QB + t] = 0.0f;
            }
        }
        lane_features(p, w->X, QB, QB, w->G);
        memset(w->o, 0, sizeof(double) * (size_t)e * QB);
        for (int c0 = 0; c0 < e; c0 += 9) {
            const int nc = e - c0 < 9 ? e - c0 : 9;
            readout_block(nc, p, w->X, w->G, me + (long)c0 * p->r, w->o + (long)c0 * QB);
        }
        /* the divisions along the rows of o (vectorised), then the transposing copy */
        const double *den = w->o + (long)(e - 1) * QB;
        for (int c = 0; c < e - 1; c++) {
            double *oc = w->o + (long)c * QB;
            for (int t = 0; t < nb; t++) oc[t] = oc[t] / den[t];
        }
        for (int t = 0; t < nb; t++)
            for (int c = 0; c < e - 1; c++)
                out[(long)(b0 + t) * (e - 1) + c] = w->o[c * QB + t];
    }
}

#endif /* COMPUTE_NATIVE_POLY_H */
