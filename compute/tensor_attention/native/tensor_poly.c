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
#include "native_poly.h" /* compute/core/: features, key moments, readout (shared) */

int ta_vector_bytes(void) {
#if defined(__AVX512F__)
    return 64;
#elif defined(__AVX2__) || defined(__AVX__)
    return 32;
#else
    return 16;
#endif
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
    Problem p = {xt, xs, d, e, r, top, chunk, chunk, steps, nlow, nsteps, NULL, NULL};
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
