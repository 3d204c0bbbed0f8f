/* detect.c — matched-filter detection, 8-connected labelling, watershed
 * deblending and windowed measurements (sp_detect.h). */
#include "surveyproc/sp_detect.h"

#include "surveyproc/sp_background.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prep.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FWHM2SIG 0.42466090014400953 /* 1 / (2 sqrt(2 ln 2)) */
#define MAXKR 7                      /* largest PSF filter half-width (15 x 15) */

void sp_detect_params_default(sp_detect_params *p)
{
    p->thresh_sigma = 5.0;
    p->minarea = 5;
    p->fwhm = 3.0;
    p->deblend = 1;
    p->deblend_nsigma = 3.0;
    p->deblend_contrast = 0.1;
    p->deblend_fwhm_frac = 0.6;
    p->sat_bits = SP_PIX_SAT;
    p->max_sources = 0;
}

static inline int usable(const float *img, const uint8_t *mask, size_t k)
{
    return fabsf(img[k]) <= FLT_MAX && !(mask && mask[k]);
}

/* ------------------------------------------------------------------------ */
/* Matched filter                                                             */

/* Separable filter: out = k1 (x) k1 applied to in (zero outside). tmp: nx*ny. */
static void conv_sep(const float *in, float *tmp, float *out, int nx, int ny, const float *k1, int r)
{
    for (int y = 0; y < ny; y++) {
        const float *a = in + (size_t)y * nx;
        float *t = tmp + (size_t)y * nx;
        memset(t, 0, sizeof(float) * (size_t)nx);
        for (int d = -r; d <= r; d++) {
            const float kv = k1[d + r];
            int x0 = d < 0 ? -d : 0, x1 = d > 0 ? nx - d : nx;
#pragma omp simd
            for (int x = x0; x < x1; x++) t[x] += kv * a[x + d];
        }
    }
    for (int y = 0; y < ny; y++) {
        float *o = out + (size_t)y * nx;
        memset(o, 0, sizeof(float) * (size_t)nx);
        for (int d = -r; d <= r; d++) {
            int yy = y + d;
            if (yy < 0 || yy >= ny) continue;
            const float kv = k1[d + r];
            const float *t = tmp + (size_t)yy * nx;
#pragma omp simd
            for (int x = 0; x < nx; x++) o[x] += kv * t[x];
        }
    }
}

/* General (2r+1)^2 filter (zero outside). */
static void conv_2d(const float *in, float *out, int nx, int ny, const float *k2, int r)
{
    const int w = 2 * r + 1;
    for (int y = 0; y < ny; y++) {
        float *o = out + (size_t)y * nx;
        memset(o, 0, sizeof(float) * (size_t)nx);
        for (int dj = -r; dj <= r; dj++) {
            int yy = y + dj;
            if (yy < 0 || yy >= ny) continue;
            const float *a = in + (size_t)yy * nx;
            for (int di = -r; di <= r; di++) {
                const float kv = k2[(dj + r) * w + di + r];
                if (kv == 0.0f) continue;
                int x0 = di < 0 ? -di : 0, x1 = di > 0 ? nx - di : nx;
#pragma omp simd
                for (int x = x0; x < x1; x++) o[x] += kv * a[x + di];
            }
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Union-find                                                                 */

static int uf_find(int *par, int a)
{
    while (par[a] != a) {
        par[a] = par[par[a]];
        a = par[a];
    }
    return a;
}

/* ------------------------------------------------------------------------ */
/* Measurement helpers                                                        */

typedef struct {
    const float *img;  /* background-subtracted */
    const float *rms;  /* may be NULL -> noise */
    double noise;
    const uint8_t *mask;
    int nx, ny;
    uint8_t sat_bits;
} meas_ctx;

static inline double pix_rms(const meas_ctx *c, size_t k)
{
    return c->rms ? c->rms[k] : c->noise;
}

/* Windowed centroid from (x, y); returns 1 on convergence. */
static int win_centroid(const meas_ctx *c, double sig, double *px, double *py)
{
    double x = *px, y = *py, x0 = x, y0 = y;
    const double R = fmax(3.0, 4.0 * sig), is2 = 1.0 / (2.0 * sig * sig);
    for (int it = 0; it < 16; it++) {
        int i0 = (int)floor(x - R), i1 = (int)ceil(x + R), j0 = (int)floor(y - R), j1 = (int)ceil(y + R);
        if (i0 < 0) i0 = 0;
        if (j0 < 0) j0 = 0;
        if (i1 > c->nx - 1) i1 = c->nx - 1;
        if (j1 > c->ny - 1) j1 = c->ny - 1;
        double sw = 0, sx = 0, sy = 0;
        for (int j = j0; j <= j1; j++) {
            double dy = j - y;
            for (int i = i0; i <= i1; i++) {
                size_t k = (size_t)j * c->nx + i;
                if (!usable(c->img, c->mask, k)) continue;
                double dx = i - x, r2 = dx * dx + dy * dy;
                if (r2 > R * R) continue;
                double wv = exp(-r2 * is2) * c->img[k];
                sw += wv;
                sx += wv * dx;
                sy += wv * dy;
            }
        }
        if (!(sw > 0)) return 0;
        double ddx = 2.0 * sx / sw, ddy = 2.0 * sy / sw;
        /* damp steps larger than the window (noise, neighbours) */
        double st = sqrt(ddx * ddx + ddy * ddy);
        if (st > sig) {
            ddx *= sig / st;
            ddy *= sig / st;
        }
        x += ddx;
        y += ddy;
        if (hypot(x - x0, y - y0) > 2.0 * sig + 1.0) return 0;
        if (fabs(ddx) < 2e-4 && fabs(ddy) < 2e-4) {
            *px = x;
            *py = y;
            return 1;
        }
    }
    *px = x;
    *py = y;
    return 1; /* did not reach 2e-4 in 16 steps but stayed put: accept */
}

/* Window-weighted second moments at (x, y), corrected for the Gaussian
 * window: C = (M^-1 - W^-1)^-1. Returns 0 when undefined. Also the matched
 * flux sum w I, its noise sqrt(sum w^2 rms^2), sum w^2. */
static int win_moments(const meas_ctx *c, double x, double y, double sig, double *cxx, double *cyy, double *cxy,
                       double *swi, double *snoise, double *sw2)
{
    const double R = fmax(3.0, 4.0 * sig), is2 = 1.0 / (2.0 * sig * sig);
    int i0 = (int)floor(x - R), i1 = (int)ceil(x + R), j0 = (int)floor(y - R), j1 = (int)ceil(y + R);
    if (i0 < 0) i0 = 0;
    if (j0 < 0) j0 = 0;
    if (i1 > c->nx - 1) i1 = c->nx - 1;
    if (j1 > c->ny - 1) j1 = c->ny - 1;
    double sw = 0, mxx = 0, myy = 0, mxy = 0, n2 = 0, w2 = 0;
    for (int j = j0; j <= j1; j++) {
        double dy = j - y;
        for (int i = i0; i <= i1; i++) {
            size_t k = (size_t)j * c->nx + i;
            if (!usable(c->img, c->mask, k)) continue;
            double dx = i - x, r2 = dx * dx + dy * dy;
            if (r2 > R * R) continue;
            double w = exp(-r2 * is2), wv = w * c->img[k], rr = pix_rms(c, k);
            sw += wv;
            mxx += wv * dx * dx;
            myy += wv * dy * dy;
            mxy += wv * dx * dy;
            n2 += w * w * rr * rr;
            w2 += w * w;
        }
    }
    *swi = sw;
    *snoise = sqrt(n2);
    *sw2 = w2;
    if (!(sw > 0)) return 0;
    mxx /= sw;
    myy /= sw;
    mxy /= sw;
    double det = mxx * myy - mxy * mxy;
    if (!(det > 0)) return 0;
    /* M^-1 - W^-1 */
    double ixx = myy / det - 1.0 / (sig * sig), iyy = mxx / det - 1.0 / (sig * sig), ixy = -mxy / det;
    double d2 = ixx * iyy - ixy * ixy;
    if (!(ixx > 0 && d2 > 0)) return 0;
    *cxx = iyy / d2;
    *cyy = ixx / d2;
    *cxy = -ixy / d2;
    return 1;
}

static void shape_from_moments(double xx, double yy, double xy, double *a, double *b, double *theta)
{
    double t = 0.5 * (xx + yy), d = sqrt(0.25 * (xx - yy) * (xx - yy) + xy * xy);
    double l1 = t + d, l2 = t - d;
    *a = sqrt(l1 > 0 ? l1 : 0);
    *b = sqrt(l2 > 0 ? l2 : 0);
    *theta = 0.5 * atan2(2.0 * xy, xx - yy);
}

/* Flags for masked / saturated pixels in [i0,i1]x[j0,j1]. */
static int box_flags(const meas_ctx *c, int i0, int i1, int j0, int j1)
{
    int f = 0;
    if (i0 < 0 || j0 < 0 || i1 > c->nx - 1 || j1 > c->ny - 1) f |= SP_DET_EDGE;
    if (i0 < 0) i0 = 0;
    if (j0 < 0) j0 = 0;
    if (i1 > c->nx - 1) i1 = c->nx - 1;
    if (j1 > c->ny - 1) j1 = c->ny - 1;
    for (int j = j0; j <= j1; j++)
        for (int i = i0; i <= i1; i++) {
            size_t k = (size_t)j * c->nx + i;
            if (c->mask && (c->mask[k] & c->sat_bits)) f |= SP_DET_SAT;
            if (!usable(c->img, c->mask, k)) f |= SP_DET_MASKED;
        }
    return f;
}

/* Measure one object given its pixel list. */
static void measure_object(const meas_ctx *c, const int *pix, int n, const float *snr, double sig, sp_source *s)
{
    memset(s, 0, sizeof *s);
    int nx = c->nx;
    s->xmin = s->ymin = 1 << 30;
    s->xmax = s->ymax = -1;
    double f = 0, fe = 0, pk = -DBL_MAX, sp = -DBL_MAX, sw = 0, sx = 0, sy = 0;
    for (int m = 0; m < n; m++) {
        int k = pix[m], i = k % nx, j = k / nx;
        if (i < s->xmin) s->xmin = i;
        if (i > s->xmax) s->xmax = i;
        if (j < s->ymin) s->ymin = j;
        if (j > s->ymax) s->ymax = j;
        if (snr[k] > sp) {
            sp = snr[k];
            s->xpeak = i;
            s->ypeak = j;
        }
        if (!usable(c->img, c->mask, (size_t)k)) continue;
        double v = c->img[k], r = pix_rms(c, (size_t)k);
        f += v;
        fe += r * r;
        if (v > pk) pk = v;
        if (v > 0) {
            sw += v;
            sx += v * i;
            sy += v * j;
        }
    }
    s->npix = n;
    s->flux = f;
    s->flux_err = sqrt(fe);
    s->peak = pk > -DBL_MAX ? pk : 0.0;
    s->snr = sp;
    if (sw > 0) {
        s->xbar = sx / sw;
        s->ybar = sy / sw;
    } else {
        s->xbar = s->xpeak;
        s->ybar = s->ypeak;
    }
    /* isophotal moments */
    double mxx = 0, myy = 0, mxy = 0;
    if (sw > 0) {
        for (int m = 0; m < n; m++) {
            int k = pix[m];
            if (!usable(c->img, c->mask, (size_t)k)) continue;
            double v = c->img[k];
            if (v <= 0) continue;
            double dx = k % nx - s->xbar, dy = k / nx - s->ybar;
            mxx += v * dx * dx;
            myy += v * dy * dy;
            mxy += v * dx * dy;
        }
        mxx /= sw;
        myy /= sw;
        mxy /= sw;
    }
    /* SExtractor's fix for single-pixel-wide objects */
    if (mxx * myy - mxy * mxy < 1.0 / 144.0) {
        mxx += 1.0 / 12.0;
        myy += 1.0 / 12.0;
    }
    double x = s->xbar, y = s->ybar;
    if (win_centroid(c, sig, &x, &y)) {
        s->x = x;
        s->y = y;
    } else {
        s->x = s->xbar;
        s->y = s->ybar;
        s->flags |= SP_DET_WINFAIL;
    }
    double cxx, cyy, cxy, swi, sno, sw2;
    if (win_moments(c, s->x, s->y, sig, &cxx, &cyy, &cxy, &swi, &sno, &sw2)) {
        shape_from_moments(cxx, cyy, cxy, &s->a, &s->b, &s->theta);
    } else {
        shape_from_moments(mxx, myy, mxy, &s->a, &s->b, &s->theta);
        s->flags |= SP_DET_MOMFAIL;
    }
    s->q = s->a > 0 ? s->b / s->a : 0.0;
    int R = (int)ceil(2.0 * sig);
    s->flags |= box_flags(c, s->xmin - 1, s->xmax + 1, s->ymin - 1, s->ymax + 1);
    int cx = (int)lround(s->x), cy = (int)lround(s->y);
    s->flags |= box_flags(c, cx - R, cx + R, cy - R, cy + R) & (SP_DET_EDGE | SP_DET_MASKED | SP_DET_SAT);
}

static int cmp_src_flux(const void *a, const void *b)
{
    double fa = ((const sp_source *)a)->flux, fb = ((const sp_source *)b)->flux;
    return (fa < fb) - (fa > fb);
}

typedef struct {
    float v;
    int k;
} vk_t;

static int cmp_vk_desc(const void *a, const void *b)
{
    float x = ((const vk_t *)a)->v, y = ((const vk_t *)b)->v;
    if (x != y) return (x < y) - (x > y);
    return ((const vk_t *)a)->k - ((const vk_t *)b)->k;
}

/* ------------------------------------------------------------------------ */

int sp_detect(const float *img, const float *rms, const uint8_t *mask, int nx, int ny, const sp_psf *psf,
              const sp_detect_params *pin, sp_source **src_out, int *nsrc_out)
{
    int status = SP_OK;
    sp_detect_params p;
    float *work = NULL, *filt = NULL, *tmp = NULL, *k1 = NULL, *k2 = NULL, *samp = NULL, *dfilt = NULL;
    int *lab = NULL, *par = NULL, *cnt = NULL, *start = NULL, *pixlist = NULL, *wlab = NULL;
    int *bpar = NULL, *bcount = NULL, *objpix = NULL, *objstart = NULL, *ocur = NULL, *rootid = NULL;
    float *bpeak = NULL;
    vk_t *vk = NULL;
    sp_source *src = NULL;
    int nsrc = 0, capsrc = 0, npar = 0, cappar = 0;
    size_t npix = (size_t)nx * ny;

    SP_CHECK(src_out && nsrc_out && img, SP_ERR_INTERNAL, "sp_detect: NULL argument");
    *src_out = NULL;
    *nsrc_out = 0;
    if (pin)
        p = *pin;
    else
        sp_detect_params_default(&p);
    SP_CHECK(nx >= 1 && ny >= 1, SP_ERR_INPUT, "detect: image size %d x %d is empty", nx, ny);
    SP_CHECK(p.thresh_sigma > 0, SP_ERR_INPUT, "detect: thresh_sigma %g must be > 0", p.thresh_sigma);
    SP_CHECK(p.minarea >= 1, SP_ERR_INPUT, "detect: minarea %d must be >= 1", p.minarea);
    SP_CHECK(psf || p.fwhm >= 0, SP_ERR_INPUT, "detect: fwhm %g must be >= 0", p.fwhm);

    /* noise */
    double noise = 0.0;
    if (!rms) {
        size_t stride = npix / 200000 + 1, ns = 0;
        SP_ALLOC(samp, npix / stride + 1);
        for (size_t k = 0; k < npix; k += stride)
            if (usable(img, mask, k)) samp[ns++] = img[k];
        double sd = 0;
        if (ns > 0) sp_bkg_clipped_stats(samp, ns, 3.0, 5, NULL, NULL, &sd, NULL);
        noise = sd;
        if (!(noise > 0)) goto cleanup; /* nothing usable or constant image: no source */
    }

    /* work image: unusable -> 0 */
    SP_ALLOC(work, npix);
    for (size_t k = 0; k < npix; k++) work[k] = usable(img, mask, k) ? img[k] : 0.0f;

    /* filter */
    SP_ALLOC(filt, npix);
    double ksq = 1.0, fwhm_win = p.fwhm;
    if (psf) {
        double cxm, cym, fw = psf->fwhm;
        if (!(fw > 0)) sp_psf_moments(psf, &cxm, &cym, &fw);
        if (!(fw > 0)) fw = 3.0;
        if (!(fwhm_win > 0)) fwhm_win = fw;
        int os = psf->oversamp, c = (psf->size - 1) / 2;
        int r = (int)ceil(1.5 * fw);
        if (r < 1) r = 1;
        if (r > MAXKR) r = MAXKR;
        if (r > c / os) r = c / os;
        int w = 2 * r + 1;
        SP_ALLOC(k2, (size_t)w * w);
        double s = 0;
        for (int j = -r; j <= r; j++)
            for (int i = -r; i <= r; i++) {
                double v = psf->data[(size_t)(c + j * os) * psf->size + (c + i * os)];
                if (v < 0) v = 0;
                k2[(j + r) * w + i + r] = (float)v;
                s += v;
            }
        SP_CHECK(s > 0, SP_ERR_INPUT, "detect: PSF filter has no positive sample");
        ksq = 0;
        for (int m = 0; m < w * w; m++) {
            k2[m] = (float)(k2[m] / s);
            ksq += (double)k2[m] * k2[m];
        }
        conv_2d(work, filt, nx, ny, k2, r);
    } else if (p.fwhm > 0) {
        double sg = p.fwhm * FWHM2SIG;
        int r = (int)ceil(2.5 * sg);
        if (r < 1) r = 1;
        SP_ALLOC(k1, 2 * r + 1);
        SP_ALLOC(tmp, npix);
        double s = 0, s2 = 0;
        for (int d = -r; d <= r; d++) s += (k1[d + r] = (float)exp(-0.5 * d * d / (sg * sg)));
        for (int d = -r; d <= r; d++) {
            k1[d + r] = (float)(k1[d + r] / s);
            s2 += (double)k1[d + r] * k1[d + r];
        }
        ksq = s2 * s2;
        conv_sep(work, tmp, filt, nx, ny, k1, r);
    } else {
        memcpy(filt, work, sizeof(float) * npix);
        fwhm_win = 2.0;
    }
    /* filtered SNR map (in place) */
    const double iks = 1.0 / sqrt(ksq);
    for (size_t k = 0; k < npix; k++) {
        double rr = rms ? rms[k] : noise;
        filt[k] = (rr > 0 && isfinite(rr)) ? (float)(filt[k] * iks / rr) : 0.0f;
    }
    double sig_win = fwhm_win * FWHM2SIG;
    if (sig_win < 0.6) sig_win = 0.6;
    /* the deblender's image: a narrower Gaussian keeps close pairs as separate peaks */
    const float *dimg = filt;
    if (p.deblend && p.deblend_fwhm_frac > 0 && p.deblend_fwhm_frac < 1 && fwhm_win > 0) {
        double sg = p.deblend_fwhm_frac * (psf ? fwhm_win : p.fwhm) * FWHM2SIG;
        if (sg < 0.5) sg = 0.5;
        int r = (int)ceil(2.5 * sg);
        float *kd = NULL;
        SP_ALLOC(kd, 2 * r + 1);
        if (!tmp) {
            tmp = malloc(sizeof(float) * npix);
            if (!tmp) {
                free(kd);
                SP_CHECK(0, SP_ERR_NOMEM, "out of memory (deblending image)");
            }
        }
        dfilt = malloc(sizeof(float) * npix);
        if (!dfilt) {
            free(kd);
            SP_CHECK(0, SP_ERR_NOMEM, "out of memory (deblending image)");
        }
        double s = 0, s2 = 0;
        for (int d = -r; d <= r; d++) s += (kd[d + r] = (float)exp(-0.5 * d * d / (sg * sg)));
        for (int d = -r; d <= r; d++) {
            kd[d + r] = (float)(kd[d + r] / s);
            s2 += (double)kd[d + r] * kd[d + r];
        }
        conv_sep(work, tmp, dfilt, nx, ny, kd, r);
        free(kd);
        const double ik = 1.0 / s2; /* 1 / sqrt(ksq) with ksq = s2^2 */
        for (size_t k = 0; k < npix; k++) {
            double rr = rms ? rms[k] : noise;
            dfilt[k] = (rr > 0 && isfinite(rr)) ? (float)(dfilt[k] * ik / rr) : 0.0f;
        }
        dimg = dfilt;
    }

    /* label above-threshold pixels (8-connected, union-find over provisional labels) */
    SP_ALLOC(lab, npix);
    const float thr = (float)p.thresh_sigma;
    cappar = 1024;
    SP_ALLOC(par, cappar);
    for (int y = 0; y < ny; y++)
        for (int x = 0; x < nx; x++) {
            size_t k = (size_t)y * nx + x;
            lab[k] = -1;
            if (!(filt[k] > thr)) continue;
            int nb[4], nn = 0;
            if (x > 0 && lab[k - 1] >= 0) nb[nn++] = lab[k - 1];
            if (y > 0) {
                size_t u = k - nx;
                if (x > 0 && lab[u - 1] >= 0) nb[nn++] = lab[u - 1];
                if (lab[u] >= 0) nb[nn++] = lab[u];
                if (x + 1 < nx && lab[u + 1] >= 0) nb[nn++] = lab[u + 1];
            }
            if (nn == 0) {
                if (npar == cappar) {
                    int *np2 = realloc(par, sizeof(int) * (size_t)cappar * 2);
                    SP_CHECK(np2, SP_ERR_NOMEM, "out of memory (detection labels)");
                    par = np2;
                    cappar *= 2;
                }
                par[npar] = npar;
                lab[k] = npar++;
            } else {
                int r0 = uf_find(par, nb[0]);
                for (int q = 1; q < nn; q++) {
                    int rq = uf_find(par, nb[q]);
                    if (rq != r0) {
                        if (rq < r0) {
                            par[r0] = rq;
                            r0 = rq;
                        } else
                            par[rq] = r0;
                    }
                }
                lab[k] = r0;
            }
        }
    if (npar == 0) goto cleanup;
    /* compact roots, count pixels, bucket pixel lists */
    SP_ALLOC(rootid, npar);
    int ncomp = 0;
    for (int a = 0; a < npar; a++) rootid[a] = (uf_find(par, a) == a) ? ncomp++ : -1;
    SP_ALLOC(cnt, ncomp + 1);
    SP_ALLOC(start, ncomp + 1);
    size_t nabove = 0;
    for (size_t k = 0; k < npix; k++)
        if (lab[k] >= 0) {
            lab[k] = rootid[uf_find(par, lab[k])];
            cnt[lab[k]]++;
            nabove++;
        }
    for (int cc = 0; cc < ncomp; cc++) start[cc + 1] = start[cc] + cnt[cc];
    SP_ALLOC(pixlist, nabove);
    memset(cnt, 0, sizeof(int) * (size_t)(ncomp + 1));
    for (size_t k = 0; k < npix; k++)
        if (lab[k] >= 0) pixlist[start[lab[k]] + cnt[lab[k]]++] = (int)k;

    meas_ctx mc = {img, rms, noise, mask, nx, ny, p.sat_bits};
    int maxc = 0;
    for (int cc = 0; cc < ncomp; cc++)
        if (cnt[cc] > maxc) maxc = cnt[cc];
    SP_ALLOC(vk, maxc);
    SP_ALLOC(bpar, maxc);
    SP_ALLOC(bcount, maxc);
    SP_ALLOC(bpeak, maxc);
    SP_ALLOC(objpix, maxc);
    SP_ALLOC(objstart, maxc + 1);
    SP_ALLOC(ocur, maxc + 1);
    SP_ALLOC(wlab, npix); /* basin of a component pixel (valid only while flooding it) */

    for (int cc = 0; cc < ncomp; cc++) {
        int n = cnt[cc];
        if (n < p.minarea) continue;
        const int *pl = pixlist + start[cc];
        int nobj = 1;
        const int *opix = pl;
        int ostart_one[2] = {0, n};
        const int *ostart = ostart_one;
        if (p.deblend && n >= 2 * p.minarea) {
            /* watershed flooding from the top */
            for (int m = 0; m < n; m++) {
                vk[m].v = dimg[pl[m]];
                vk[m].k = pl[m];
            }
            qsort(vk, (size_t)n, sizeof(vk_t), cmp_vk_desc);
            for (int m = 0; m < n; m++) wlab[vk[m].k] = -1;
            int nb = 0;
            for (int m = 0; m < n; m++) {
                int k = vk[m].k, x = k % nx, y = k / nx;
                int roots[8], nr = 0;
                for (int dy = -1; dy <= 1; dy++)
                    for (int dx = -1; dx <= 1; dx++) {
                        if (!dx && !dy) continue;
                        int xx = x + dx, yy = y + dy;
                        if (xx < 0 || yy < 0 || xx >= nx || yy >= ny) continue;
                        int q = yy * nx + xx;
                        if (lab[q] != cc || wlab[q] < 0) continue;
                        int r = uf_find(bpar, wlab[q]), dup = 0;
                        for (int t = 0; t < nr; t++) dup |= roots[t] == r;
                        if (!dup) roots[nr++] = r;
                    }
                if (nr == 0) {
                    bpar[nb] = nb;
                    bcount[nb] = 1;
                    bpeak[nb] = vk[m].v;
                    wlab[k] = nb++;
                    continue;
                }
                /* the highest basin among the neighbours takes the pixel */
                int top = roots[0];
                for (int t = 1; t < nr; t++)
                    if (bpeak[roots[t]] > bpeak[top]) top = roots[t];
                float level = vk[m].v;
                for (int t = 0; t < nr; t++) {
                    int r = roots[t];
                    if (r == top) continue;
                    double hb = bpeak[r] - level, ht = bpeak[top] - level;
                    int sig_b = hb >= p.deblend_nsigma && hb >= p.deblend_contrast * bpeak[r] &&
                                bcount[r] >= p.minarea;
                    int sig_t = ht >= p.deblend_nsigma && ht >= p.deblend_contrast * bpeak[top] &&
                                bcount[top] >= p.minarea;
                    if (!(sig_b && sig_t)) {
                        bpar[r] = top;
                        bcount[top] += bcount[r];
                    }
                }
                wlab[k] = top;
                bcount[top]++;
            }
            /* objects = surviving basins */
            int nroot = 0;
            for (int bb = 0; bb < nb; bb++)
                if (uf_find(bpar, bb) == bb) bcount[bb] = -(++nroot); /* id as -(index+1) */
            if (nroot > 1) {
                /* bucket pixels per object: counts, prefix starts, fill */
                memset(objstart, 0, sizeof(int) * (size_t)(nroot + 1));
                for (int m = 0; m < n; m++) objstart[-bcount[uf_find(bpar, wlab[pl[m]])]]++;
                for (int o = 0; o < nroot; o++) objstart[o + 1] += objstart[o];
                /* objstart[o + 1] = end of object o; fill backwards from the ends */
                memcpy(ocur, objstart, sizeof(int) * (size_t)(nroot + 1));
                for (int m = 0; m < n; m++) {
                    int o = -bcount[uf_find(bpar, wlab[pl[m]])] - 1;
                    objpix[--ocur[o + 1]] = pl[m];
                }
                nobj = nroot;
                opix = objpix;
                ostart = objstart;
            }
        }
        for (int o = 0; o < nobj; o++) {
            int on = ostart[o + 1] - ostart[o];
            if (on <= 0) continue;
            if (nsrc == capsrc) {
                int nc = capsrc ? 2 * capsrc : 256;
                sp_source *ns = realloc(src, sizeof(sp_source) * (size_t)nc);
                SP_CHECK(ns, SP_ERR_NOMEM, "out of memory (sources)");
                src = ns;
                capsrc = nc;
            }
            measure_object(&mc, opix + ostart[o], on, filt, sig_win, &src[nsrc]);
            if (nobj > 1) src[nsrc].flags |= SP_DET_BLENDED;
            nsrc++;
        }
    }
    if (nsrc > 1) qsort(src, (size_t)nsrc, sizeof(sp_source), cmp_src_flux);
    if (p.max_sources > 0 && nsrc > p.max_sources) nsrc = p.max_sources;
    *src_out = src;
    *nsrc_out = nsrc;
    src = NULL;
cleanup:
    free(src);
    free(work);
    free(filt);
    free(dfilt);
    free(tmp);
    free(k1);
    free(k2);
    free(samp);
    free(lab);
    free(par);
    free(cnt);
    free(start);
    free(pixlist);
    free(wlab);
    free(bpar);
    free(bcount);
    free(bpeak);
    free(objpix);
    free(objstart);
    free(ocur);
    free(rootid);
    free(vk);
    return status;
}

int sp_detect_measure(const float *img, const float *rms, double noise, const uint8_t *mask, int nx, int ny,
                      double x, double y, double fwhm, uint8_t sat_bits, sp_source *out)
{
    int status = SP_OK;
    SP_CHECK(out && img, SP_ERR_INTERNAL, "sp_detect_measure: NULL argument");
    memset(out, 0, sizeof *out);
    SP_CHECK(fwhm > 0 && isfinite(fwhm), SP_ERR_INPUT, "measure: fwhm %g must be > 0", fwhm);
    SP_CHECK(isfinite(x) && isfinite(y) && x > -0.5 && y > -0.5 && x < nx - 0.5 && y < ny - 0.5, SP_ERR_INPUT,
             "measure: position (%g, %g) outside the %d x %d image", x, y, nx, ny);
    meas_ctx c = {img, rms, noise, mask, nx, ny, sat_bits};
    double sig = fwhm * FWHM2SIG;
    if (sig < 0.6) sig = 0.6;
    double xw = x, yw = y;
    if (win_centroid(&c, sig, &xw, &yw)) {
        out->x = xw;
        out->y = yw;
    } else {
        out->x = x;
        out->y = y;
        out->flags |= SP_DET_WINFAIL;
    }
    out->xbar = x;
    out->ybar = y;
    double cxx, cyy, cxy, swi, sno, sw2;
    int ok = win_moments(&c, out->x, out->y, sig, &cxx, &cyy, &cxy, &swi, &sno, &sw2);
    if (ok)
        shape_from_moments(cxx, cyy, cxy, &out->a, &out->b, &out->theta);
    else
        out->flags |= SP_DET_MOMFAIL;
    out->q = out->a > 0 ? out->b / out->a : 0.0;
    out->snr = sno > 0 ? swi / sno : 0.0;
    out->flux = 2.0 * swi; /* total for a Gaussian of the window's sigma */
    out->flux_err = 2.0 * sno;
    int R = (int)ceil(2.0 * sig), cx = (int)lround(out->x), cy = (int)lround(out->y);
    out->xpeak = cx;
    out->ypeak = cy;
    out->xmin = cx - R;
    out->xmax = cx + R;
    out->ymin = cy - R;
    out->ymax = cy + R;
    double pk = -DBL_MAX, rp = fmax(1.5, sig);
    int np = 0;
    for (int j = cy - R; j <= cy + R; j++)
        for (int i = cx - R; i <= cx + R; i++) {
            if (i < 0 || j < 0 || i >= nx || j >= ny) continue;
            size_t k = (size_t)j * nx + i;
            double d2 = (i - out->x) * (i - out->x) + (j - out->y) * (j - out->y);
            if (d2 > 4.0 * sig * sig) continue;
            np++;
            if (!usable(img, mask, k)) continue;
            if (d2 <= rp * rp && img[k] > pk) {
                pk = img[k];
                out->xpeak = i;
                out->ypeak = j;
            }
        }
    out->npix = np;
    out->peak = pk > -DBL_MAX ? pk : 0.0;
    out->flags |= box_flags(&c, cx - R, cx + R, cy - R, cy + R);
cleanup:
    return status;
}
