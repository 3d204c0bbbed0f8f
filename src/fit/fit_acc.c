/* fit_acc.c — the inner products of a group evaluation (the fitter's hottest
 * loops after the renders): self terms of one source's box and pair terms
 * over the overlap of two boxes, for the plane counts that occur (0: values
 * only; 2: a star's position; 5: a galaxy's position and shape).
 *
 * Four-lane partial sums (GCC vector extensions, AVX2/AVX-512 clones
 * dispatched at run time) over the columns of each row, the remainder in
 * lane 0, lanes summed in a fixed order at the end: the result depends only
 * on the inputs, not on the thread, rank or CPU (no FMA contraction in ISO C
 * mode), so the catalog stays bit-identical across ranks and threads.
 * Pixels with w = 0 contribute exactly 0 (their data and models are finite),
 * so there is no branch. */
#include "fit_acc.h"

#include <string.h>

/* v4 values never cross a non-inlined call boundary */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef double v4 __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v4 ld4(const double *p)
{
    v4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) double hsum(v4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

/* Self terms, NF planes (compile-time constant after inlining). */
static inline __attribute__((always_inline)) void self_nf(const int NF, const fit_acc_box *bx, const double *w,
                                                          const double *dp, const double *mf, const double *m,
                                                          size_t np, fit_acc_self *o)
{
    v4 D = {0}, Y = {0}, C = {0}, B[FIT_ACC_MAXP], Z[FIT_ACC_MAXP], CZ[FIT_ACC_MAXP];
    v4 A[FIT_ACC_MAXP][FIT_ACC_MAXP];
    for (int j = 0; j < NF; j++) {
        B[j] = Z[j] = CZ[j] = (v4){0};
        for (int k = 0; k <= j; k++) A[j][k] = (v4){0};
    }
    for (int r = 0; r < bx->bh; r++) {
        const size_t io = (size_t)(bx->by0 + r) * bx->nx + bx->bx0;
        const double *wr = w + io, *dr = dp + io, *fr = mf ? mf + io : NULL, *mr = m + (size_t)r * bx->bw;
        const double *pr[FIT_ACC_MAXP];
        for (int j = 0; j < NF; j++) pr[j] = m + np * (size_t)(1 + j) + (size_t)r * bx->bw;
        int c = 0;
        for (; c + 4 <= bx->bw; c += 4) {
            const v4 ww = ld4(wr + c), mm = ld4(mr + c);
            const v4 t = fr ? ld4(dr + c) - ld4(fr + c) : ld4(dr + c);
            const v4 wm = ww * mm;
            D += wm * mm;
            Y += wm * t;
            C += wm;
            v4 dj[FIT_ACC_MAXP];
            for (int j = 0; j < NF; j++) dj[j] = ld4(pr[j] + c);
            for (int j = 0; j < NF; j++) {
                const v4 wd = dj[j] * ww;
                B[j] += wd * mm;
                Z[j] += wd * t;
                CZ[j] += wd;
                for (int k = 0; k <= j; k++) A[j][k] += wd * dj[k];
            }
        }
        for (; c < bx->bw; c++) {
            const double ww = wr[c], mm = mr[c];
            const double t = fr ? dr[c] - fr[c] : dr[c];
            const double wm = ww * mm;
            D[0] += wm * mm;
            Y[0] += wm * t;
            C[0] += wm;
            for (int j = 0; j < NF; j++) {
                const double wd = pr[j][c] * ww;
                B[j][0] += wd * mm;
                Z[j][0] += wd * t;
                CZ[j][0] += wd;
                for (int k = 0; k <= j; k++) A[j][k][0] += wd * pr[k][c];
            }
        }
    }
    o->D = hsum(D);
    o->y = hsum(Y);
    o->c = hsum(C);
    for (int j = 0; j < NF; j++) {
        o->B[j] = hsum(B[j]);
        o->z[j] = hsum(Z[j]);
        o->cz[j] = hsum(CZ[j]);
        for (int k = 0; k <= j; k++) o->A[j][k] = hsum(A[j][k]);
    }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static void
self0(const fit_acc_box *bx, const double *w, const double *dp, const double *mf, const double *m, size_t np,
      fit_acc_self *o)
{
    self_nf(0, bx, w, dp, mf, m, np, o);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static void
self2(const fit_acc_box *bx, const double *w, const double *dp, const double *mf, const double *m, size_t np,
      fit_acc_self *o)
{
    self_nf(2, bx, w, dp, mf, m, np, o);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static void
self5(const fit_acc_box *bx, const double *w, const double *dp, const double *mf, const double *m, size_t np,
      fit_acc_self *o)
{
    self_nf(5, bx, w, dp, mf, m, np, o);
}

static void selfn(int nf, const fit_acc_box *bx, const double *w, const double *dp, const double *mf,
                  const double *m, size_t np, fit_acc_self *o)
{
    switch (nf) {
    case 1: self_nf(1, bx, w, dp, mf, m, np, o); break;
    case 3: self_nf(3, bx, w, dp, mf, m, np, o); break;
    case 4: self_nf(4, bx, w, dp, mf, m, np, o); break;
    default: self_nf(6, bx, w, dp, mf, m, np, o); break;
    }
}

void fit_acc_self_terms(int nf, const fit_acc_box *bx, const double *w, const double *dp, const double *mf,
                        const double *m, size_t np, fit_acc_self *o)
{
    switch (nf) {
    case 0: self0(bx, w, dp, mf, m, np, o); break;
    case 2: self2(bx, w, dp, mf, m, np, o); break;
    case 5: self5(bx, w, dp, mf, m, np, o); break;
    default: selfn(nf, bx, w, dp, mf, m, np, o); break;
    }
}

/* Pair terms over the overlap [xa, xb) x [ya, yb) (image px) of boxes 1 and 2:
 * sum w m1 m2, w d1_j m2, w d2_k m1, w d1_j d2_k. */
static inline __attribute__((always_inline)) void pair_nf(const int NF1, const int NF2, const fit_acc_pair_in *in,
                                                          fit_acc_pair *o)
{
    v4 sD = {0}, B12[FIT_ACC_MAXP], B21[FIT_ACC_MAXP], A[FIT_ACC_MAXP][FIT_ACC_MAXP];
    for (int j = 0; j < NF1; j++) B12[j] = (v4){0};
    for (int k = 0; k < NF2; k++) B21[k] = (v4){0};
    for (int j = 0; j < NF1; j++)
        for (int k = 0; k < NF2; k++) A[j][k] = (v4){0};
    const double *m1 = in->m1, *m2 = in->m2;
    const size_t np1 = in->np1, np2 = in->np2;
    const int n = in->xb - in->xa;
    for (int yy = in->ya; yy < in->yb; yy++) {
        const double *wr = in->w + (size_t)yy * in->nx + in->xa;
        const size_t r1 = (size_t)(yy - in->by1) * in->bw1 + (size_t)(in->xa - in->bx1);
        const size_t r2 = (size_t)(yy - in->by2) * in->bw2 + (size_t)(in->xa - in->bx2);
        const double *v1p = m1 + r1, *v2p = m2 + r2;
        int c = 0;
        for (; c + 4 <= n; c += 4) {
            const v4 ww = ld4(wr + c), v1 = ld4(v1p + c), v2 = ld4(v2p + c);
            const v4 wv1 = ww * v1, wv2 = ww * v2;
            sD += wv1 * v2;
            v4 d2[FIT_ACC_MAXP];
            for (int k = 0; k < NF2; k++) d2[k] = ld4(m2 + np2 * (size_t)(1 + k) + r2 + c);
            for (int k = 0; k < NF2; k++) B21[k] += d2[k] * wv1;
            for (int j = 0; j < NF1; j++) {
                const v4 d1 = ld4(m1 + np1 * (size_t)(1 + j) + r1 + c);
                B12[j] += d1 * wv2;
                const v4 wd1 = ww * d1;
                for (int k = 0; k < NF2; k++) A[j][k] += wd1 * d2[k];
            }
        }
        for (; c < n; c++) {
            const double ww = wr[c], v1 = v1p[c], v2 = v2p[c];
            const double wv1 = ww * v1, wv2 = ww * v2;
            sD[0] += wv1 * v2;
            for (int k = 0; k < NF2; k++) B21[k][0] += m2[np2 * (size_t)(1 + k) + r2 + c] * wv1;
            for (int j = 0; j < NF1; j++) {
                const double d1 = m1[np1 * (size_t)(1 + j) + r1 + c];
                B12[j][0] += d1 * wv2;
                const double wd1 = ww * d1;
                for (int k = 0; k < NF2; k++) A[j][k][0] += wd1 * m2[np2 * (size_t)(1 + k) + r2 + c];
            }
        }
    }
    o->D = hsum(sD);
    for (int j = 0; j < NF1; j++) o->B12[j] = hsum(B12[j]);
    for (int k = 0; k < NF2; k++) o->B21[k] = hsum(B21[k]);
    for (int j = 0; j < NF1; j++)
        for (int k = 0; k < NF2; k++) o->A[j][k] = hsum(A[j][k]);
}

#define PAIR_FN(a, b)                                                                                                  \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) static void pair##a##b(             \
        const fit_acc_pair_in *in, fit_acc_pair *o)                                                                    \
    {                                                                                                                  \
        pair_nf(a, b, in, o);                                                                                          \
    }
PAIR_FN(0, 0)
PAIR_FN(2, 2)
PAIR_FN(2, 0)
PAIR_FN(0, 2)
PAIR_FN(5, 5)
PAIR_FN(2, 5)
PAIR_FN(5, 2)

/* any other combination: runtime counts (rare: Sersic, partly held sources) */
static void pair_any(int nf1, int nf2, const fit_acc_pair_in *in, fit_acc_pair *o)
{
    double sD = 0, B12[FIT_ACC_MAXP] = {0}, B21[FIT_ACC_MAXP] = {0}, A[FIT_ACC_MAXP][FIT_ACC_MAXP] = {{0}};
    const double *m1 = in->m1, *m2 = in->m2;
    const size_t np1 = in->np1, np2 = in->np2;
    const int n = in->xb - in->xa;
    for (int yy = in->ya; yy < in->yb; yy++) {
        const double *wr = in->w + (size_t)yy * in->nx + in->xa;
        const size_t r1 = (size_t)(yy - in->by1) * in->bw1 + (size_t)(in->xa - in->bx1);
        const size_t r2 = (size_t)(yy - in->by2) * in->bw2 + (size_t)(in->xa - in->bx2);
        for (int c = 0; c < n; c++) {
            const double ww = wr[c], v1 = m1[r1 + c], v2 = m2[r2 + c];
            sD += ww * v1 * v2;
            for (int j = 0; j < nf1; j++) B12[j] += ww * m1[np1 * (1 + j) + r1 + c] * v2;
            for (int k = 0; k < nf2; k++) B21[k] += ww * m2[np2 * (1 + k) + r2 + c] * v1;
            for (int j = 0; j < nf1; j++) {
                const double dj = ww * m1[np1 * (1 + j) + r1 + c];
                for (int k = 0; k < nf2; k++) A[j][k] += dj * m2[np2 * (1 + k) + r2 + c];
            }
        }
    }
    o->D = sD;
    for (int j = 0; j < nf1; j++) o->B12[j] = B12[j];
    for (int k = 0; k < nf2; k++) o->B21[k] = B21[k];
    for (int j = 0; j < nf1; j++)
        for (int k = 0; k < nf2; k++) o->A[j][k] = A[j][k];
}

void fit_acc_pair_terms(int nf1, int nf2, const fit_acc_pair_in *in, fit_acc_pair *o)
{
    const int key = nf1 * 8 + nf2;
    switch (key) {
    case 0: pair00(in, o); break;
    case 2 * 8 + 2: pair22(in, o); break;
    case 2 * 8 + 0: pair20(in, o); break;
    case 0 * 8 + 2: pair02(in, o); break;
    case 5 * 8 + 5: pair55(in, o); break;
    case 2 * 8 + 5: pair25(in, o); break;
    case 5 * 8 + 2: pair52(in, o); break;
    default: pair_any(nf1, nf2, in, o); break;
    }
}
