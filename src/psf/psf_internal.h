/* psf_internal.h — shared by the ePSF builder (epsf.c) and the band-wide Moffat
 * (moffat_field.c), internal to src/psf: a small dense SPD solver, and the
 * elliptical Moffat integrated over a pixel (3x3 midpoint rule) with its
 * derivatives, the cell fallback fit's model. */
#ifndef SP_PSF_INTERNAL_H
#define SP_PSF_INTERNAL_H

#include <math.h>

/* Small dense SPD solve (Cholesky), n <= 128. Returns 0 on failure. */
static inline int chol_solve(double *A, double *b, int n)
{
    for (int j = 0; j < n; j++) {
        double s = A[j * n + j];
        for (int k = 0; k < j; k++) s -= A[j * n + k] * A[j * n + k];
        if (!(s > 0)) return 0;
        double l = sqrt(s);
        A[j * n + j] = l;
        for (int i = j + 1; i < n; i++) {
            double t = A[i * n + j];
            for (int k = 0; k < j; k++) t -= A[i * n + k] * A[j * n + k];
            A[i * n + j] = t / l;
        }
    }
    for (int i = 0; i < n; i++) {
        double t = b[i];
        for (int k = 0; k < i; k++) t -= A[i * n + k] * b[k];
        b[i] = t / A[i * n + i];
    }
    for (int i = n - 1; i >= 0; i--) {
        double t = b[i];
        for (int k = i + 1; k < n; k++) t -= A[k * n + i] * b[k];
        b[i] = t / A[i * n + i];
    }
    return 1;
}

/* Moffat (unit total flux) integrated over a pixel by 3x3 midpoint sampling. */
static inline double moffat_pix(double dx, double dy, double alpha, double beta, double q, double ct, double st)
{
    static const double o[3] = {-1.0 / 3.0, 0.0, 1.0 / 3.0};
    double ia2 = 1.0 / (alpha * alpha), s = 0;
    /* Where the profile varies slowly across a pixel, the 3x3 mean is its
     * second-order Taylor expansion about the pixel centre, f + (D / 2) lap f
     * with D = 2/27 the variance of the sub-sample offsets: one pow instead of
     * nine. Slowly: beta |grad Q| / 3 and beta lap Q / 9 (the changes of ln f
     * over a third of a pixel) both below 0.2 (1 + Q), Q = (u^2 + w^2) / alpha^2;
     * then the expansion is within 6.4e-4 of the 3x3 mean (checked over beta
     * 1.5-6, alpha 0.7-8, q 0.5-1), far below the 3x3 rule's own error against
     * the true pixel integral. lap Q = 2 (1 + 1/q^2) / alpha^2,
     * |grad Q|^2 = 4 (u^2 + w^2 / q^2) / alpha^4. In the fit box (2.5 FWHM)
     * about half the pixels qualify: the Moffat fallback fit ~2x cheaper. */
    {
        const double u = ct * dx + st * dy, w = (-st * dx + ct * dy) / q, Q = (u * u + w * w) * ia2;
        const double iq2 = 1.0 / (q * q), lapQ = 2.0 * (1.0 + iq2) * ia2,
                     g2 = 4.0 * (u * u + w * w * iq2) * ia2 * ia2, lim = 0.2 * (1.0 + Q);
        if (beta * beta * g2 < 9.0 * lim * lim && beta * lapQ < 9.0 * lim) {
            const double t = 1.0 / (1.0 + Q), f = pow(1.0 + Q, -beta);
            const double lap = f * (-beta * t * lapQ + beta * (beta + 1.0) * t * t * g2);
            return (f + (1.0 / 27.0) * lap) * (beta - 1.0) / (M_PI * alpha * alpha * q);
        }
    }
    for (int b = 0; b < 3; b++)
        for (int a = 0; a < 3; a++) {
            double x = dx + o[a], y = dy + o[b];
            double u = ct * x + st * y, w = (-st * x + ct * y) / q;
            s += pow(1.0 + (u * u + w * w) * ia2, -beta);
        }
    return s / 9.0 * (beta - 1.0) / (M_PI * alpha * alpha * q);
}

/* The pixel value and its derivatives for the fit's Jacobian, from the 3x3 samples of
 * moffat_pix (always: the Jacobian of its Taylor form would need the derivatives of the
 * Laplacian term; these match forward differences of moffat_resid to ~0.2% of each
 * column's largest entry, the Taylor form's own difference from the 3x3 mean):
 * g[0..5] = dV/d(dx), dV/d(dy), dV/d(alpha) (beta held), dV/d(beta) (alpha held),
 * dV/dq, dV/dtheta. One pow and one log per sample. */
static inline double moffat_pix_grad(double dx, double dy, double alpha, double beta, double q, double ct, double st,
                              double *g)
{
    static const double o[3] = {-1.0 / 3.0, 0.0, 1.0 / 3.0};
    const double ia2 = 1.0 / (alpha * alpha), N = (beta - 1.0) / (M_PI * alpha * alpha * q), iq = 1.0 / q;
    double sf = 0, sx = 0, sy = 0, sa = 0, sb = 0, sq = 0, sth = 0;
    for (int b = 0; b < 3; b++)
        for (int a = 0; a < 3; a++) {
            const double x = dx + o[a], y = dy + o[b];
            const double u = ct * x + st * y, w = (-st * x + ct * y) * iq, Q = (u * u + w * w) * ia2;
            const double f = pow(1.0 + Q, -beta), fq = -beta * f / (1.0 + Q) * ia2; /* df/dQ / alpha^2 */
            sf += f;
            sx += fq * 2.0 * (u * ct - w * st * iq);
            sy += fq * 2.0 * (u * st + w * ct * iq);
            sa += fq * (u * u + w * w);
            sb -= f * log1p(Q);
            sq += fq * w * w;
            sth += fq * u * w;
        }
    const double in = N / 9.0, mf = sf / 9.0;
    g[0] = sx * in;
    g[1] = sy * in;
    g[2] = -2.0 / alpha * (sa * in + mf * N);      /* dQ/dalpha = -2 Q / alpha; N ~ 1/alpha^2 */
    g[3] = sb * in + mf * N / (beta - 1.0);         /* N ~ (beta - 1) */
    g[4] = -2.0 * iq * sq * in - mf * N * iq;       /* dQ/dq = -2 w^2 / (q alpha^2); N ~ 1/q */
    g[5] = 2.0 * (q - iq) * sth * in;               /* dQ/dtheta = 2 u w (q - 1/q) / alpha^2 */
    return mf * N;
}

#endif
