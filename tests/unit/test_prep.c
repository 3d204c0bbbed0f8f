/* test_prep.c — frame prep (scaling, masks, noise model), coadd, white stack, aperture photometry. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_aperture.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prep.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* splitmix64 + Box-Muller: a small deterministic normal generator for tests */
static uint64_t rng_state = 12345;
static double urand(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return ((z >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static double nrand(void) { return sqrt(-2 * log(urand())) * cos(2 * M_PI * urand()); }

static void t_prep_scaling_and_masks(void **s)
{
    (void)s;
    float raw[6] = {100.0f, NAN, 5000.0f, 70000.0f, -3.0f, 0.0f};
    float data[6], ivar[6];
    uint8_t mask[6];
    sp_prep_params p = {.scale = pow(10, -0.4 * (27.0 - 25.0)), .skysig = 10, .egain = 2, .saturate = 60000,
                        .sat_level_frac = 1.0};
    double sky = 0;
    assert_int_equal(sp_prep_frame(raw, 6, &p, data, mask, &sky, 2), SP_OK);
    assert_int_equal(mask[0], 0);
    assert_int_equal(mask[1], SP_PIX_BAD);
    assert_int_equal(mask[3], SP_PIX_SAT);
    assert_float_equal(data[0], 100.0 * p.scale, 1e-5);
    assert_float_equal(data[1], 0.0, 0);
    /* explicit zero sky: var = (skysig^2 + raw/egain) * scale^2 */
    assert_int_equal(sp_prep_ivar(data, mask, 6, &p, 0.0, NULL, ivar, 1), SP_OK);
    double v0 = (100.0 + 100.0 / 2.0) * p.scale * p.scale;
    assert_float_equal(ivar[0], 1.0 / v0, 1e-6 / v0);
    double v4 = 100.0 * p.scale * p.scale; /* negative raw: no Poisson term */
    assert_float_equal(ivar[4], 1.0 / v4, 1e-6 / v4);
    assert_float_equal(ivar[1], 0.0, 0);
    assert_float_equal(ivar[3], 0.0, 0);
    sp_prep_params bad = p;
    bad.skysig = 0;
    assert_int_equal(sp_prep_ivar(data, mask, 6, &bad, 0.0, NULL, ivar, 1), SP_ERR_INPUT);
}

static void t_prep_sky_estimate(void **s)
{
    (void)s;
    size_t n = 200 * 200;
    float *raw = malloc(n * sizeof *raw), *data = malloc(n * sizeof *data);
    uint8_t *mask = malloc(n);
    for (size_t i = 0; i < n; i++) raw[i] = (float)(250.0 + 8.0 * nrand());
    for (size_t i = 0; i < n; i += 97) raw[i] += 5000.0f; /* sources: must not drag the sky */
    sp_prep_params p = {.scale = 1, .skysig = 8, .egain = 1, .saturate = NAN, .sat_level_frac = 1};
    double sky;
    assert_int_equal(sp_prep_frame(raw, n, &p, data, mask, &sky, 1), SP_OK);
    assert_true(fabs(sky - 250.0) < 0.5);
    free(raw);
    free(data);
    free(mask);
}

static void t_coadd_and_white_threads(void **s)
{
    (void)s;
    size_t nx = 64, ny = 48, n = nx * ny;
    float *d[3], *iv[3];
    uint8_t *m[3];
    double w[3] = {1.0, 4.0, 0.25};
    for (int k = 0; k < 3; k++) {
        d[k] = malloc(n * sizeof(float));
        iv[k] = malloc(n * sizeof(float));
        m[k] = calloc(n, 1);
        for (size_t i = 0; i < n; i++) {
            d[k][i] = (float)(10.0 + nrand());
            iv[k][i] = (float)(w[k] * (0.8 + 0.4 * urand()));
        }
    }
    /* pixel 5 bad in all frames; pixel 6 bad in frame 1 only */
    for (int k = 0; k < 3; k++) { iv[k][5] = 0; m[k][5] = SP_PIX_BAD; }
    iv[1][6] = 0;
    m[1][6] = SP_PIX_SAT;
    float *cd1 = malloc(n * sizeof(float)), *ci1 = malloc(n * sizeof(float));
    float *cd2 = malloc(n * sizeof(float)), *ci2 = malloc(n * sizeof(float));
    uint8_t *cm1 = malloc(n), *cm2 = malloc(n);
    assert_int_equal(sp_prep_coadd(3, (const float *const *)d, (const float *const *)iv,
                                   (const uint8_t *const *)m, w, n, cd1, ci1, cm1, 1), SP_OK);
    assert_int_equal(sp_prep_coadd(3, (const float *const *)d, (const float *const *)iv,
                                   (const uint8_t *const *)m, w, n, cd2, ci2, cm2, 2), SP_OK);
    assert_memory_equal(cd1, cd2, n * sizeof(float));
    assert_memory_equal(ci1, ci2, n * sizeof(float));
    assert_float_equal(ci1[5], 0, 0);
    assert_int_equal(cm1[5], SP_PIX_BAD);
    assert_int_equal(cm1[6], SP_PIX_SAT); /* saturation remembered though other frames are good */
    /* pixel 0 by hand */
    double sw = 0, swd = 0, sw2v = 0;
    for (int k = 0; k < 3; k++) { sw += w[k]; swd += w[k] * d[k][0]; sw2v += w[k] * w[k] / iv[k][0]; }
    assert_float_equal(cd1[0], swd / sw, 1e-5);
    assert_float_equal(ci1[0], sw * sw / sw2v, 1e-4 * sw * sw / sw2v);

    float *wh1 = malloc(n * sizeof(float)), *wi1 = malloc(n * sizeof(float));
    float *wh2 = malloc(n * sizeof(float)), *wi2 = malloc(n * sizeof(float));
    assert_int_equal(sp_prep_white(3, (const float *const *)d, (const float *const *)iv, nx, ny, wh1, wi1, 1), SP_OK);
    assert_int_equal(sp_prep_white(3, (const float *const *)d, (const float *const *)iv, nx, ny, wh2, wi2, 2), SP_OK);
    assert_memory_equal(wh1, wh2, n * sizeof(float));
    double a = 0, b = 0;
    for (int k = 0; k < 3; k++) { a += iv[k][7] * d[k][7]; b += iv[k][7]; }
    assert_float_equal(wh1[7], a / b, 1e-5);
    assert_float_equal(wi1[7], b, 1e-4);
    assert_float_equal(wi1[5], 0, 0);
    for (int k = 0; k < 3; k++) { free(d[k]); free(iv[k]); free(m[k]); }
    free(cd1); free(ci1); free(cd2); free(ci2); free(cm1); free(cm2);
    free(wh1); free(wi1); free(wh2); free(wi2);
}

/* background 3.0 + a round Gaussian (flux F, sigma sg) at (xc, yc); ivar 4 everywhere */
static void gauss_image(float *d, float *iv, long nx, long ny, double F, double sg, double xc, double yc)
{
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            double r2 = (x - xc) * (x - xc) + (y - yc) * (y - yc);
            d[y * nx + x] = (float)(3.0 + F / (2 * M_PI * sg * sg) * exp(-0.5 * r2 / (sg * sg)));
            iv[y * nx + x] = 4.0f;
        }
}

static void t_aperture(void **s)
{
    (void)s;
    long nx = 61, ny = 61;
    float *d = malloc((size_t)(nx * ny) * sizeof(float)), *iv = malloc((size_t)(nx * ny) * sizeof(float));
    /* flat background 3.0 + a Gaussian of flux 1000 at (30.3, 29.6), sigma 1.5 */
    double F = 1000, sg = 1.5, xc = 30.3, yc = 29.6;
    gauss_image(d, iv, nx, ny, F, sg, xc, yc);
    float *scratch = malloc(sp_aper_scratch_size(15) * sizeof(float));
    sp_aper_result r;
    sp_aper_measure(d, iv, nx, ny, xc, yc, 8.0, 10.0, 15.0, scratch, &r);
    assert_float_equal(r.bkg, 3.0, 1e-3);
    assert_float_equal(r.area, M_PI * 64, 1e-9);
    assert_float_equal(r.flux, F, 2.0); /* all but exp(-8^2/(2*1.5^2)) of the light */
    /* error = pixel noise sum(w^2)/ivar + the annulus median's error (pi/2 var/n) * area^2 */
    long n_ann = 0;
    double w2 = 0;
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            double d2 = (x - xc) * (x - xc) + (y - yc) * (y - yc);
            n_ann += d2 >= 100.0 && d2 < 225.0;
            if (d2 <= 7.0 * 7.0) w2 += 1.0; /* fully inside pixels */
        }
    double lo = sqrt(w2 / 4.0 + r.area * r.area * (M_PI / 2) * 0.25 / n_ann);
    double hi = sqrt(r.area / 4.0 + r.area * r.area * (M_PI / 2) * 0.25 / n_ann);
    assert_true(r.fluxerr >= lo && r.fluxerr <= hi);
    assert_int_equal(r.flags, 0);
    /* a masked pixel near the core: flagged, flux drops by about that pixel's light */
    iv[30 * nx + 31] = 0;
    sp_aper_measure(d, iv, nx, ny, xc, yc, 8.0, 10.0, 15.0, scratch, &r);
    assert_true(r.flags & SP_APER_MASKED);
    assert_true(r.masked_frac > 0 && r.masked_frac < 0.01);
    /* off the edge */
    sp_aper_measure(d, iv, nx, ny, 1.0, 1.0, 4.0, 6.0, 9.0, scratch, &r);
    assert_true(r.flags & SP_APER_EDGE);
    /* everything masked */
    for (long i = 0; i < nx * ny; i++) iv[i] = 0;
    sp_aper_measure(d, iv, nx, ny, xc, yc, 4.0, 6.0, 9.0, scratch, &r);
    assert_true(r.flags & SP_APER_ALLMASKED);
    assert_true(r.flags & SP_APER_NOBKG);
    assert_true(isnan(r.flux));
    free(d);
    free(iv);
    free(scratch);
}

/* sp_aper_measure_fill: a round profile with part of it masked is summed as if it
 * were whole (each ring takes its unmasked pixels' mean); unmasked, it is the plain
 * aperture sum. */
static void t_aperture_fill(void **s)
{
    (void)s;
    long nx = 61, ny = 61;
    float *d = malloc((size_t)(nx * ny) * sizeof(float)), *iv = malloc((size_t)(nx * ny) * sizeof(float));
    /* background 3.0 + a wide round Gaussian (sigma 3) of flux 1000 at (30.3, 29.6): its light
     * reaches out across the aperture (radius 12), so masking loses a real share of it */
    double F = 1000, sg = 3.0, xc = 30.3, yc = 29.6;
    gauss_image(d, iv, nx, ny, F, sg, xc, yc);
    float *scratch = malloc(sp_aper_scratch_size(20) * sizeof(float));
    sp_aper_result a, f;
    sp_aper_measure(d, iv, nx, ny, xc, yc, 12.0, 14.0, 20.0, scratch, &a);
    sp_aper_measure_fill(d, iv, nx, ny, xc, yc, 12.0, 14.0, 20.0, 0.25, scratch, &f);
    assert_float_equal(f.flux, a.flux, 1e-9 * F);
    assert_float_equal(f.fluxerr, a.fluxerr, 1e-9 * a.fluxerr);
    assert_float_equal(f.bkg, a.bkg, 0);
    assert_int_equal(f.flags, 0);
    assert_float_equal(f.masked_frac, 0, 1e-12);
    /* a neighbour's footprint masked: every pixel with x > xc + 2 (40% of the aperture) */
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++)
            if (x > xc + 2) iv[y * nx + x] = 0;
    sp_aper_measure(d, iv, nx, ny, xc, yc, 12.0, 14.0, 20.0, scratch, &a);
    sp_aper_measure_fill(d, iv, nx, ny, xc, yc, 12.0, 14.0, 20.0, 0.25, scratch, &f);
    assert_true(a.flux < 0.8 * F);                    /* the plain sum loses the masked light */
    assert_float_equal(f.flux, F, 0.01 * F);          /* the fill recovers it (pixel sampling of rings) */
    assert_true(f.masked_frac > 0.3 && f.masked_frac < 0.5);
    assert_int_equal(f.flags & SP_APER_MASKED, 0);    /* every ring keeps >= 25% of its area */
    assert_true(f.fluxerr > a.fluxerr);               /* fewer pixels stand for the rings */
    /* a ring masked nearly whole: flagged */
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            double r = hypot(x - xc, y - yc);
            if (r >= 8 && r < 9 && x > xc - 7.5) iv[y * nx + x] = 0;
        }
    sp_aper_measure_fill(d, iv, nx, ny, xc, yc, 12.0, 14.0, 20.0, 0.25, scratch, &f);
    assert_true(f.flags & SP_APER_MASKED);
    /* everything masked */
    for (long i = 0; i < nx * ny; i++) iv[i] = 0;
    sp_aper_measure_fill(d, iv, nx, ny, xc, yc, 12.0, 14.0, 20.0, 0.25, scratch, &f);
    assert_true(f.flags & SP_APER_ALLMASKED);
    assert_true(isnan(f.flux));
    free(d);
    free(iv);
    free(scratch);
}

static int cmpf(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* The annulus background is a 3-sigma clipped median (IQR sigma, 3 rounds),
 * found by selection: it must equal the sort-based definition exactly, for odd
 * and even pixel counts, ties and outliers. */
static void t_aperture_clipped_median(void **s)
{
    (void)s;
    long nx = 41, ny = 41;
    float *d = malloc((size_t)(nx * ny) * sizeof(float)), *iv = malloc((size_t)(nx * ny) * sizeof(float));
    float *ref = malloc((size_t)(nx * ny) * sizeof(float)), *scratch = malloc(sp_aper_scratch_size(12) * sizeof(float));
    unsigned seed = 12345;
    for (int trial = 0; trial < 40; trial++) {
        double xc = 20.0 + 0.37 * (trial % 7), yc = 20.0 - 0.29 * (trial % 5), rin = 6 + trial % 3, rout = 9 + trial % 4;
        for (long i = 0; i < nx * ny; i++) {
            seed = seed * 1103515245u + 12345u;
            double u = (seed >> 8) / 16777216.0;
            /* a skewed sky with ties (rounded values) and a few bright outliers */
            d[i] = (float)(trial % 2 ? floor(u * 20) : u * u * 10 + (u > 0.97 ? 500 : 0));
            iv[i] = (seed & 15) == 0 ? 0.0f : 1.0f;
        }
        size_t n = 0;
        for (long y = 0; y < ny; y++)
            for (long x = 0; x < nx; x++) {
                double d2 = (x - xc) * (x - xc) + (y - yc) * (y - yc);
                if (d2 >= rin * rin && d2 < rout * rout && iv[y * nx + x] > 0) ref[n++] = d[y * nx + x];
            }
        double med = 0;
        for (int it = 0; it < 3; it++) {
            qsort(ref, n, sizeof *ref, cmpf);
            med = n % 2 ? ref[n / 2] : 0.5 * (ref[n / 2 - 1] + ref[n / 2]);
            double sig = (ref[(3 * n) / 4] - ref[n / 4]) / 1.349;
            if (!(sig > 0)) break;
            size_t m = 0;
            for (size_t k = 0; k < n; k++)
                if (fabs(ref[k] - med) <= 3.0 * sig) ref[m++] = ref[k];
            if (m == n || m < 5) break;
            n = m;
        }
        sp_aper_result r;
        sp_aper_measure(d, iv, nx, ny, xc, yc, 3.0, rin, rout, scratch, &r);
        assert_true(r.bkg == med);
    }
    free(d);
    free(iv);
    free(ref);
    free(scratch);
}

/* The sky estimate's definition (as it was first written): sigma-clipped median of a
 * strided subsample of good pixels, each round by selection (sorting here). sp_prep_frame
 * computes it from one sorted copy; the values must be the same bit for bit. */
static double ref_sky(const float *raw, size_t npix, double sat)
{
    size_t stride = npix / 20000 + 1, n = 0;
    float *s = malloc((npix / stride + 1) * sizeof *s), *d = malloc((npix / stride + 1) * sizeof *d);
    double med = NAN;
    for (size_t i = 0; i < npix; i += stride)
        if (isfinite(raw[i]) && !((double)raw[i] >= sat)) s[n++] = raw[i];
    for (int it = 0; it < 5 && n > 0; it++) {
        memcpy(d, s, n * sizeof *d);
        qsort(d, n, sizeof *d, cmpf);
        med = d[n / 2];
        for (size_t k = 0; k < n; k++) d[k] = fabsf(s[k] - (float)med);
        qsort(d, n, sizeof *d, cmpf);
        double sig = 1.4826 * d[n / 2];
        if (!(sig > 0)) break;
        size_t m = 0;
        for (size_t k = 0; k < n; k++)
            if (fabs(s[k] - med) <= 3.0 * sig) s[m++] = s[k];
        if (m == n) break;
        n = m;
    }
    free(s);
    free(d);
    return med;
}

static void t_prep_sky_matches_definition(void **s)
{
    (void)s;
    const size_t sizes[] = {1, 2, 3, 5, 17, 100, 1001, 20000, 20001, 65536, 310000};
    unsigned seed = 99;
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
        for (int trial = 0; trial < 6; trial++) {
            size_t n = sizes[si];
            float *raw = malloc(n * sizeof *raw), *data = malloc(n * sizeof *data);
            uint8_t *mask = malloc(n);
            for (size_t i = 0; i < n; i++) {
                seed = seed * 1103515245u + 12345u;
                double u = (seed >> 8) / 16777216.0;
                double g = (u - 0.5) * (u - 0.5) * (u < 0.5 ? -40 : 40);
                switch (trial) {
                case 0: raw[i] = (float)(250 + g); break;                      /* smooth, skewed tails */
                case 1: raw[i] = (float)floor(100 + 8 * (u - 0.5)); break;     /* integers: many ties */
                case 2: raw[i] = (float)(u > 0.9 ? 3e4 * u : -5 + u); break;   /* bright sources, negative sky */
                case 3: raw[i] = 7.0f; break;                                  /* constant: MAD = 0 */
                case 4: raw[i] = u < 0.2 ? NAN : u > 0.97 ? 65000.0f : (float)(1e-3 * g); break; /* masks */
                default: raw[i] = (float)(u < 0.5 ? -0.0 : 0.0) + (float)(u > 0.99 ? 1 : 0); break; /* signed zeros */
                }
            }
            sp_prep_params p = {.scale = 1.3, .skysig = 8, .egain = 1, .saturate = 60000, .sat_level_frac = 0.95};
            double sky = 0;
            assert_int_equal(sp_prep_frame(raw, n, &p, data, mask, &sky, 1), SP_OK);
            double ref = ref_sky(raw, n, 60000 * 0.95);
            if (!(sky == ref || (isnan(sky) && isnan(ref))))
                fail_msg("npix %zu trial %d: sky %.9g, definition %.9g", n, trial, sky, ref);
            free(raw);
            free(data);
            free(mask);
        }
}

/* The coadd's definition per pixel (frames in order, skipping frames not good at the
 * pixel); sp_prep_coadd runs frames outer / pixels inner and must give the same bytes. */
static void t_coadd_matches_definition(void **s)
{
    (void)s;
    unsigned seed = 4242;
    for (int nf = 1; nf <= 5; nf++) {
        size_t n = 1024 * 3 + 77 + (size_t)nf;
        float *d[5], *iv[5];
        uint8_t *m[5];
        double w[5];
        for (int k = 0; k < nf; k++) {
            w[k] = 1.0 / ((3.0 + k) * (3.0 + k) * (0.7 + 0.1 * k));
            d[k] = malloc(n * sizeof(float));
            iv[k] = malloc(n * sizeof(float));
            m[k] = malloc(n);
            for (size_t i = 0; i < n; i++) {
                seed = seed * 1103515245u + 12345u;
                double u = (seed >> 8) / 16777216.0;
                int bad = u < 0.15, sat = u > 0.93;
                m[k][i] = (uint8_t)(bad ? SP_PIX_BAD : sat ? SP_PIX_SAT : 0);
                d[k][i] = bad || sat ? 0.0f : (float)(1e3 * (u - 0.4) * (u - 0.2));
                iv[k][i] = bad || sat ? 0.0f : (float)(w[k] / (1.0 + 5 * u));
                if (i % 97 == 3) d[k][i] = -0.0f;
                if (i % 211 == 5 + (size_t)k) iv[k][i] = NAN; /* not "<= 0": enters the sums */
                if (i % 331 == 7) iv[k][i] = -1.0f;
            }
        }
        float *od = malloc(n * sizeof(float)), *oi = malloc(n * sizeof(float));
        uint8_t *om = malloc(n);
        assert_int_equal(sp_prep_coadd(nf, (const float *const *)d, (const float *const *)iv,
                                       (const uint8_t *const *)m, w, n, od, oi, om, 1), SP_OK);
        for (size_t i = 0; i < n; i++) {
            double sw = 0, swd = 0, sw2v = 0;
            uint8_t sat = 0, allbad = SP_PIX_BAD;
            for (int k = 0; k < nf; k++) {
                sat |= m[k][i] & SP_PIX_SAT;
                if (iv[k][i] <= 0) continue;
                allbad = 0;
                sw += w[k];
                swd += w[k] * d[k][i];
                sw2v += w[k] * w[k] / iv[k][i];
            }
            float rd = sw > 0 ? (float)(swd / sw) : 0.0f, ri = sw > 0 ? (float)(sw * sw / sw2v) : 0.0f;
            uint8_t rm = sw > 0 ? sat : (uint8_t)(allbad | sat);
            if (memcmp(&rd, &od[i], 4) || memcmp(&ri, &oi[i], 4) || rm != om[i])
                fail_msg("nf %d pixel %zu: (%a %a %d) vs definition (%a %a %d)", nf, i, (double)od[i], (double)oi[i],
                         om[i], (double)rd, (double)ri, rm);
        }
        for (int k = 0; k < nf; k++) {
            free(d[k]);
            free(iv[k]);
            free(m[k]);
        }
        free(od);
        free(oi);
        free(om);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_prep_scaling_and_masks),
        cmocka_unit_test(t_prep_sky_estimate),
        cmocka_unit_test(t_prep_sky_matches_definition),
        cmocka_unit_test(t_coadd_and_white_threads),
        cmocka_unit_test(t_coadd_matches_definition),
        cmocka_unit_test(t_aperture),
        cmocka_unit_test(t_aperture_fill),
        cmocka_unit_test(t_aperture_clipped_median),
    };
    return cmocka_run_group_tests_name("prep", tests, NULL, NULL);
}
