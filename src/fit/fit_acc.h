/* fit_acc.h — inner products of a group evaluation (fit_acc.c). Private to src/fit/. */
#ifndef SP_FIT_ACC_H
#define SP_FIT_ACC_H

#include <stddef.h>

#define FIT_ACC_MAXP 6 /* = P_MAX */

/* A model box in image px: origin, size, and the image row length. */
typedef struct {
    int bx0, by0, bw, bh, nx;
} fit_acc_box;

typedef struct {
    double D, y, c;
    double B[FIT_ACC_MAXP], z[FIT_ACC_MAXP], cz[FIT_ACC_MAXP];
    double A[FIT_ACC_MAXP][FIT_ACC_MAXP]; /* lower triangle, k <= j */
} fit_acc_self;

/* Self terms of one source's box over the image arrays w, dp (and mf, the
 * other sources' models, subtracted from dp when non-NULL): sums of w m m,
 * w m t, w m, and with its nf derivative planes (m + np (1 + j)) w d_j m,
 * w d_j t, w d_j, w d_j d_k (t = dp - mf). */
void fit_acc_self_terms(int nf, const fit_acc_box *bx, const double *w, const double *dp, const double *mf,
                        const double *m, size_t np, fit_acc_self *o);

typedef struct {
    const double *w; /* image weights, row length nx */
    int nx;
    int xa, xb, ya, yb;   /* overlap, image px */
    const double *m1, *m2; /* packed model + derivative planes of the two boxes */
    size_t np1, np2;
    int bx1, by1, bw1, bx2, by2, bw2;
} fit_acc_pair_in;

typedef struct {
    double D, B12[FIT_ACC_MAXP], B21[FIT_ACC_MAXP], A[FIT_ACC_MAXP][FIT_ACC_MAXP];
} fit_acc_pair;

/* Pair terms over the overlap: sum w m1 m2, w d1_j m2, w d2_k m1, w d1_j d2_k. */
void fit_acc_pair_terms(int nf1, int nf2, const fit_acc_pair_in *in, fit_acc_pair *o);

#endif
