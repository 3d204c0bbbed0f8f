/* test_zp.c — zero points without MPI: weighted median, sky index and one-to-one
 * matching against brute force (RA wrap, pole), the reference-catalog reader, the
 * estimator on synthetic matched sets with known ZP, realistic errors and outliers
 * (blends, variables, saturated stars) plus a Monte Carlo of its accuracy and error
 * calibration, too few stars, and the whole stage on a hand-made store (serial
 * HDF5 driver): selection counts, /zp, MAG/MAGERR of every row, re-run replaces. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_zp.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a small deterministic RNG ---------------------------------------------- */

typedef struct {
    uint64_t s;
} rng_t;

static double urand(rng_t *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return ((double)(z >> 11) + 0.5) / 9007199254740992.0;
}

static double nrand(rng_t *r)
{
    double u = urand(r), v = urand(r);
    return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

/* ---- weighted median -------------------------------------------------------- */

static void t_weighted_median(void **st)
{
    (void)st;
    double m;
    const double x[] = {5, 1, 3, 2, 4};
    const double w1[] = {1, 1, 1, 1, 1};
    assert_int_equal(sp_zp_weighted_median(x, w1, 5, NULL, &m), SP_OK);
    assert_float_equal(m, 3.0, 1e-12);
    assert_int_equal(sp_zp_weighted_median(x, w1, 4, NULL, &m), SP_OK); /* 5 1 3 2 -> 2.5 */
    assert_float_equal(m, 2.5, 1e-12);
    const double w2[] = {100, 1, 1, 1, 1};
    assert_int_equal(sp_zp_weighted_median(x, w2, 5, NULL, &m), SP_OK);
    assert_float_equal(m, 4.0 + (0.5 - 3.5 / 104) / (54.0 / 104 - 3.5 / 104), 1e-12); /* 4.96: interpolated */
    /* non-finite values and zero weights are ignored */
    const double x3[] = {NAN, 1, 2, 3, 100};
    const double w3[] = {1, 1, 1, 1, 0};
    double work[10];
    assert_int_equal(sp_zp_weighted_median(x3, w3, 5, work, &m), SP_OK);
    assert_float_equal(m, 2.0, 1e-12);
    assert_int_equal(sp_zp_weighted_median(x3, w3, 0, NULL, &m), SP_OK);
    assert_true(isnan(m));
    /* moving weight continuously moves the median continuously (interpolated) */
    const double x4[] = {0, 1};
    double w4[] = {1, 1};
    assert_int_equal(sp_zp_weighted_median(x4, w4, 2, NULL, &m), SP_OK);
    assert_float_equal(m, 0.5, 1e-12);
    w4[1] = 1.2;
    assert_int_equal(sp_zp_weighted_median(x4, w4, 2, NULL, &m), SP_OK);
    assert_true(m > 0.5 && m < 1.0);
}

/* ---- sky index and matching --------------------------------------------------- */

static long brute_nearest(const double *ra, const double *dec, long n, double r0, double d0, double rad, long excl)
{
    long best = -1;
    double bd = INFINITY;
    for (long i = 0; i < n; i++) {
        if (i == excl || !isfinite(ra[i])) continue;
        double s = sp_zp_sep_arcsec(r0, d0, ra[i], dec[i]);
        if (s <= rad && (s < bd || (s == bd && i < best))) {
            bd = s;
            best = i;
        }
    }
    return best;
}

static void match_case(double ra0, double dec0, double size_deg, unsigned seed)
{
    rng_t r = {seed};
    const long nc = 3000, nr = 600;
    const double rad = 1.5, iso = 4.0;
    double *cra = malloc(nc * sizeof *cra), *cdec = malloc(nc * sizeof *cdec);
    double *rra = malloc(nr * sizeof *rra), *rdec = malloc(nr * sizeof *rdec);
    double *sep = malloc(nr * sizeof *sep);
    long *m = malloc(nr * sizeof *m);
    for (long i = 0; i < nc; i++) {
        cdec[i] = dec0 + (urand(&r) - 0.5) * size_deg;
        if (cdec[i] > 90) cdec[i] = 180 - cdec[i];
        double c = cos(cdec[i] * M_PI / 180);
        cra[i] = fmod(ra0 + (urand(&r) - 0.5) * size_deg / (c > 0.01 ? c : 0.01) + 360.0, 360.0);
    }
    cra[7] = NAN; /* ignored */
    for (long j = 0; j < nr; j++) {
        if (j % 3 == 0) { /* random star, mostly unmatched */
            rdec[j] = dec0 + (urand(&r) - 0.5) * size_deg;
            if (rdec[j] > 90) rdec[j] = 180 - rdec[j];
            rra[j] = fmod(ra0 + (urand(&r) - 0.5) * size_deg + 360.0, 360.0);
        } else { /* near a catalog source, 0..1.2" away */
            long i = (long)(urand(&r) * nc);
            if (i == 7) i = 8;
            double d = urand(&r) * 1.2 / 3600, a = urand(&r) * 2 * M_PI;
            rdec[j] = cdec[i] + d * sin(a);
            if (rdec[j] > 90) rdec[j] = 180 - rdec[j];
            double c = cos(rdec[j] * M_PI / 180);
            rra[j] = fmod(cra[i] + d * cos(a) / (c > 1e-6 ? c : 1e-6) + 360.0, 360.0);
        }
    }
    sp_zp_index *ci = NULL, *ri = NULL;
    assert_int_equal(sp_zp_index_build(cra, cdec, nc, iso, &ci), SP_OK);
    assert_int_equal(sp_zp_index_build(rra, rdec, nr, rad, &ri), SP_OK);
    long nm = 0, nm_brute = 0;
    assert_int_equal(sp_zp_match(ci, cra, cdec, ri, rra, rdec, nr, rad, m, sep, &nm), SP_OK);
    for (long j = 0; j < nr; j++) {
        long i = brute_nearest(cra, cdec, nc, rra[j], rdec[j], rad, -1);
        if (i >= 0 && brute_nearest(rra, rdec, nr, cra[i], cdec[i], rad, -1) != j) i = -1;
        assert_int_equal(m[j], i);
        if (i >= 0) {
            nm_brute++;
            assert_float_equal(sep[j], sp_zp_sep_arcsec(rra[j], rdec[j], cra[i], cdec[i]), 1e-6);
        }
    }
    assert_int_equal(nm, nm_brute);
    assert_true(nm > nr / 3); /* the test exercises matches */
    /* one-to-one */
    for (long a = 0; a < nr; a++)
        for (long b = a + 1; b < nr; b++)
            if (m[a] >= 0) assert_true(m[a] != m[b]);
    /* isolation counts against brute force */
    long nonzero = 0;
    for (long i = 0; i < nc; i += 7) {
        if (!isfinite(cra[i])) continue;
        long cnt = 0;
        for (long k = 0; k < nc; k++)
            if (k != i && isfinite(cra[k]) && sp_zp_sep_arcsec(cra[i], cdec[i], cra[k], cdec[k]) <= iso) cnt++;
        assert_int_equal(sp_zp_index_count(ci, cra[i], cdec[i], iso, i), cnt);
        nonzero += cnt > 0;
        /* a radius much larger than the cell (many cells) still agrees */
        long big = 0;
        for (long k = 0; k < nc; k++)
            if (isfinite(cra[k]) && sp_zp_sep_arcsec(cra[i], cdec[i], cra[k], cdec[k]) <= 30) big++;
        if (i % 70 == 0) assert_int_equal(sp_zp_index_count(ci, cra[i], cdec[i], 30, -1), big);
    }
    (void)nonzero;
    sp_zp_index_free(&ci);
    sp_zp_index_free(&ri);
    assert_null(ci);
    free(cra);
    free(cdec);
    free(rra);
    free(rdec);
    free(sep);
    free(m);
}

static void t_match(void **st)
{
    (void)st;
    match_case(150.0, 2.2, 0.25, 1);   /* ordinary field */
    match_case(0.0, -30.0, 0.25, 2);   /* across RA = 0/360 */
    match_case(45.0, 89.95, 0.1, 3);   /* around the pole */
    /* separations: small and large angles */
    assert_float_equal(sp_zp_sep_arcsec(10, 0, 10, 1.0 / 3600), 1.0, 1e-9);
    assert_float_equal(sp_zp_sep_arcsec(359.9999, 0, 0.0001, 0), 0.72, 1e-6);
    assert_float_equal(sp_zp_sep_arcsec(0, 0, 180, 0), 180 * 3600.0, 1e-6);
    /* empty index */
    sp_zp_index *e = NULL;
    assert_int_equal(sp_zp_index_build(NULL, NULL, 0, 1.0, &e), SP_OK);
    assert_int_equal(sp_zp_index_nearest(e, 1, 1, 10, -1, NULL), -1);
    assert_int_equal(sp_zp_index_count(e, 1, 1, 10, -1), 0);
    sp_zp_index_free(&e);
}

/* Large catalog: matching must be far from O(N^2). */
static void t_match_speed(void **st)
{
    (void)st;
    rng_t r = {9};
    const long nc = 1000000, nr = 20000;
    double *cra = malloc(nc * sizeof *cra), *cdec = malloc(nc * sizeof *cdec);
    double *rra = malloc(nr * sizeof *rra), *rdec = malloc(nr * sizeof *rdec);
    long *m = malloc(nr * sizeof *m);
    for (long i = 0; i < nc; i++) {
        cra[i] = 150 + urand(&r) * 1.5;
        cdec[i] = 2 + urand(&r) * 1.5;
    }
    for (long j = 0; j < nr; j++) {
        long i = (long)(urand(&r) * nc);
        rra[j] = cra[i] + nrand(&r) * 0.2 / 3600;
        rdec[j] = cdec[i] + nrand(&r) * 0.2 / 3600;
    }
    double t0 = sp_wtime();
    sp_zp_index *ci = NULL, *ri = NULL;
    assert_int_equal(sp_zp_index_build(cra, cdec, nc, 3.0, &ci), SP_OK);
    assert_int_equal(sp_zp_index_build(rra, rdec, nr, 1.0, &ri), SP_OK);
    long nm = 0, niso = 0;
    assert_int_equal(sp_zp_match(ci, cra, cdec, ri, rra, rdec, nr, 1.0, m, NULL, &nm), SP_OK);
    for (long j = 0; j < nr; j++)
        if (m[j] >= 0) niso += sp_zp_index_count(ci, cra[m[j]], cdec[m[j]], 3.0, m[j]) == 0;
    double dt = sp_wtime() - t0;
    printf("match speed: %ld catalog x %ld reference stars: %ld matched, %ld isolated, %.3f s (index + match + "
           "isolation)\n",
           nc, nr, nm, niso, dt);
    assert_true(nm > nr * 0.9);
    assert_true(dt < 10.0);
    sp_zp_index_free(&ci);
    sp_zp_index_free(&ri);
    free(cra);
    free(cdec);
    free(rra);
    free(rdec);
    free(m);
}

/* ---- the estimator on synthetic matched sets ------------------------------------ */

enum { K_CLEAN = 0, K_BLEND = 1, K_VAR = 2, K_SAT = 3 };

typedef struct {
    long n;
    double mag[400], magerr[400], flux[400], fluxerr[400];
    double zp[400], err[400]; /* filled by the estimator */
    int kind[400];
    double offset[400]; /* offset of this star's zp_i from the truth (outliers and noise) */
} synth_t;

/* n stars, mag 13..mmax; flux error from sky + photon noise (deep: 0.002 mag at 13, ~0.05 at
 * 18; shallow: 0.1 at 18.5, like the simulator's tiny tiles), reference noise 0.01 mag (given
 * as its error); 8% blends (extra flux 10-60%), 4% variables (reference mag off by 0.1-0.5
 * mag), 4% saturated-but-unflagged stars (flux 40-85% of the truth with tiny formal errors). */
static void synth(rng_t *r, double zp0, long n, int shallow, synth_t *s)
{
    s->n = n;
    for (long i = 0; i < n; i++) {
        double m = 13 + (shallow ? 5.5 : 5.0) * urand(r);
        double f = pow(10, -0.4 * (m - zp0));
        double emag = shallow ? sqrt(0.003 * 0.003 + pow(0.1 * pow(10, 0.4 * (m - 18.5)), 2))
                              : sqrt(0.002 * 0.002 + pow(0.03 * pow(10, 0.4 * (m - 17.5)), 2));
        double sf = f * emag / 1.0857362047581294;
        double fobs = f + sf * nrand(r);
        double mref = m + 0.01 * nrand(r);
        double u = urand(r);
        int kind = u < 0.08 ? K_BLEND : u < 0.12 ? K_VAR : u < 0.16 ? K_SAT : K_CLEAN;
        if (kind == K_BLEND) fobs *= 1 + 0.1 + 0.5 * urand(r);
        if (kind == K_VAR) mref += (urand(r) < 0.5 ? -1 : 1) * (0.1 + 0.4 * urand(r));
        if (kind == K_SAT) {
            fobs = f * (0.4 + 0.45 * urand(r));
            sf = fobs * 0.001;
        }
        if (fobs <= 0) fobs = f * 0.01;
        s->mag[i] = mref;
        s->magerr[i] = 0.01;
        s->flux[i] = fobs;
        s->fluxerr[i] = sf;
        s->kind[i] = kind;
        s->offset[i] = mref + 2.5 * log10(fobs) - zp0;
    }
}

static int estimate(synth_t *s, int clip_iters, unsigned char *clip, sp_zp_estimate *e)
{
    return sp_zp_band_estimate(s->mag, s->magerr, s->flux, s->fluxerr, s->n, 3.0, clip_iters, 5, s->zp, s->err,
                               clip, e);
}

static void t_estimator_outliers(void **st)
{
    (void)st;
    rng_t r = {42};
    synth_t s;
    const double zp0 = 25.137;
    synth(&r, zp0, 150, 0, &s);
    unsigned char clip[400];
    sp_zp_estimate e;
    assert_int_equal(estimate(&s, 10, clip, &e), SP_OK);
    long nout = 0, nout_clip = 0, nclean = 0, nclean_clip = 0, nbig = 0, nbig_clip = 0;
    double mean = 0;
    for (long i = 0; i < s.n; i++) {
        mean += s.zp[i] / s.n;
        if (s.kind[i] == K_CLEAN) {
            nclean++;
            nclean_clip += clip[i];
        } else {
            nout++;
            nout_clip += clip[i];
            if (fabs(s.offset[i]) > 0.1) {
                nbig++;
                nbig_clip += clip[i];
            }
        }
    }
    printf("one set: ZP %.5f +- %.5f (truth %.5f, off %+.5f); plain mean off %+.4f; %ld/%ld outliers clipped "
           "(%ld/%ld of those > 0.1 mag), %ld/%ld clean clipped; scatter %.4f, sigma_int %.4f, n_eff %.1f\n",
           e.zp, e.zp_err, zp0, e.zp - zp0, mean - zp0, nout_clip, nout, nbig_clip, nbig, nclean_clip, nclean,
           e.scatter, e.sigma_int, e.n_eff);
    assert_int_equal(e.flag, 0);
    assert_true(fabs(e.zp - zp0) < 0.005);
    assert_int_equal(nbig_clip, nbig); /* every outlier beyond 0.1 mag is rejected */
    assert_true(nclean_clip <= nclean / 20);
    assert_int_equal(e.n_used + e.n_clipped, s.n);
    /* no clipping allowed: the median alone resists, but keeps the outliers */
    sp_zp_estimate e0;
    assert_int_equal(estimate(&s, 0, clip, &e0), SP_OK);
    assert_int_equal(e0.n_clipped, 0);
    assert_int_equal(e0.niter, 0);
    printf("same set without clipping: weighted median off %+.5f\n", e0.zp - zp0);
}

/* Monte Carlo: 500 sets -> accuracy and whether zp_err is calibrated; shallow data also
 * with single-pass errors (weights from the measured flux) to show that bias. */
static void monte_carlo(int shallow, unsigned seed)
{
    rng_t r = {seed};
    const int nset = 500;
    const double zp0 = 24.81;
    double maxdev = 0, s1 = 0, s2 = 0, sp = 0, sp2 = 0, serr = 0, maxpull = 0, bias1 = 0;
    int nwithin = 0;
    synth_t s;
    for (int k = 0; k < nset; k++) {
        synth(&r, zp0, 60 + (k % 5) * 30, shallow, &s);
        sp_zp_estimate e, e1;
        assert_int_equal(estimate(&s, 10, NULL, &e), SP_OK);
        /* single pass: errors from the measured fluxes */
        for (long i = 0; i < s.n; i++) {
            double ef = 1.0857362047581294 * s.fluxerr[i] / s.flux[i];
            s.err[i] = sqrt(ef * ef + s.magerr[i] * s.magerr[i]);
        }
        assert_int_equal(sp_zp_estimate_run(s.zp, s.err, s.n, 3.0, 10, 5, NULL, &e1), SP_OK);
        bias1 += (e1.zp - zp0) / nset;
        double d = e.zp - zp0;
        if (fabs(d) > maxdev) maxdev = fabs(d);
        if (fabs(d / e.zp_err) > maxpull) maxpull = fabs(d / e.zp_err);
        nwithin += fabs(d) < 0.005;
        s1 += d / nset;
        s2 += d * d;
        sp += d / e.zp_err;
        sp2 += (d / e.zp_err) * (d / e.zp_err);
        serr += e.zp_err;
    }
    double rms = sqrt(s2 / nset), pm = sp / nset, ps = sqrt(sp2 / nset - pm * pm);
    printf("Monte Carlo, %s data, %d sets of 60-180 stars with 16%% outliers: ZP - truth mean %+.5f rms %.4f max "
           "%.4f, %d/%d within 0.005; mean zp_err %.4f; pull mean %+.2f std %.2f max %.1f; single-pass weights: "
           "mean %+.5f\n",
           shallow ? "shallow" : "deep", nset, s1, rms, maxdev, nwithin, nset, serr / nset, pm, ps, maxpull, bias1);
    /* statistical bars: a single set can be a 4-sigma fluctuation */
    assert_true(fabs(s1) < 0.001);
    assert_true(rms < (shallow ? 0.003 : 0.0025));
    assert_true(nwithin >= (shallow ? 0.9 : 0.97) * nset);
    assert_true(maxpull < 5.0);
    assert_true(ps > 0.8 && ps < 1.25);
    assert_true(fabs(pm) < 0.25);
}

static void t_estimator_monte_carlo(void **st)
{
    (void)st;
    monte_carlo(0, 7);
    monte_carlo(1, 8);
}

static void t_estimator_edge(void **st)
{
    (void)st;
    sp_zp_estimate e;
    unsigned char clip[8];
    const double z[] = {25.0, 25.01, 24.99};
    const double er[] = {0.01, 0.01, 0.01};
    assert_int_equal(sp_zp_estimate_run(z, er, 3, 3.0, 10, 5, clip, &e), SP_OK);
    assert_int_equal(e.flag, SP_ZP_F_FEW_STARS);
    assert_true(isnan(e.zp) && isnan(e.zp_err));
    assert_int_equal(e.n_used, 3);
    assert_int_equal(sp_zp_estimate_run(z, er, 3, 3.0, 10, 3, clip, &e), SP_OK);
    assert_int_equal(e.flag, 0);
    assert_float_equal(e.zp, 25.0, 1e-12);
    assert_true(e.zp_err > 0);
    assert_int_equal(sp_zp_estimate_run(NULL, NULL, 0, 3.0, 10, 1, NULL, &e), SP_OK);
    assert_int_equal(e.flag, SP_ZP_F_FEW_STARS);
    /* identical values: zero scatter, error from the stars' errors; bad entries ignored */
    const double z2[] = {25, 25, 25, 25, NAN, 25, 30};
    const double e2[] = {0.02, 0.02, 0.02, 0.02, 0.02, -1, 0.02};
    assert_int_equal(sp_zp_estimate_run(z2, e2, 7, 3.0, 10, 3, clip, &e), SP_OK);
    assert_float_equal(e.zp, 25, 1e-12);
    assert_int_equal(e.n_in, 5);
    assert_int_equal(e.n_used, 4);
    assert_true(clip[4] && clip[5] && clip[6] && !clip[0]);
    assert_float_equal(e.zp_err, 0.01, 1e-9); /* 1/sqrt(sum 1/0.02^2) over 4 */
}

/* ---- reference catalog --------------------------------------------------------- */

static void t_refcat(void **st)
{
    (void)st;
    char path[1024];
    sp_test_write("ref.csv",
                  "# reference\n"
                  "ra,Dec,MAG_g,e_mag_g,mag_r,magerr_r\n"
                  "150.0,2.0,16.5,0.02,16.0,\n"
                  ",2.0,16.5,0.02,16.0,0.01\n"
                  "150.1,2.1,,0.02,17.0,0.03\n"
                  "150.2,2.2,18.0,-1,nan,0.01\n",
                  path, sizeof path);
    const char *bands[] = {"g", "r", "z"};
    sp_zp_refcat r;
    assert_int_equal(sp_zp_refcat_read(path, bands, 3, &r), SP_OK);
    assert_int_equal(r.n, 3);
    assert_int_equal(r.nskipped, 1);
    assert_int_equal(r.line[0], 3);
    assert_int_equal(r.line[1], 5);
    assert_true(r.has_band[0] && r.has_band[1] && !r.has_band[2]);
    assert_true(r.has_err[0] && r.has_err[1] && !r.has_err[2]);
    assert_float_equal(r.mag[0 * 3 + 0], 16.5, 0);
    assert_float_equal(r.magerr[0 * 3 + 0], 0.02, 0);
    assert_float_equal(r.magerr[0 * 3 + 1], 0.0, 0); /* blank error: none known */
    assert_true(isnan(r.mag[1 * 3 + 0]));            /* blank mag */
    assert_true(isnan(r.mag[2 * 3 + 0]));            /* negative error: unusable */
    assert_true(isnan(r.mag[2 * 3 + 1]));
    assert_true(isnan(r.mag[0 * 3 + 2]));
    sp_zp_refcat_free(&r);
    sp_test_write("ref_nora.csv", "DEC,mag_g\n2.0,16\n", path, sizeof path);
    assert_int_equal(sp_zp_refcat_read(path, bands, 3, &r), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "RA"));
    sp_test_write("ref_bad.csv", "RA,DEC,mag_g\n1,2,abc\n", path, sizeof path);
    assert_int_equal(sp_zp_refcat_read(path, bands, 3, &r), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "abc"));
    assert_int_equal(sp_zp_refcat_read("/nonexistent/ref.csv", bands, 3, &r), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "reference catalog"));
}

/* ---- injection ---------------------------------------------------------------- */

static void t_inject(void **st)
{
    (void)st;
    char path[1024];
    sp_test_write("ref_inj.csv",
                  "RA,DEC,mag_g,mag_r\n"
                  "150.0,2.0,16.0,15.5\n"          /* matched: a catalog source at 0.3" */
                  "150.01,2.01,16.0,\n"            /* unmatched, in range */
                  "150.02,2.02,25.0,24.0\n"        /* unmatched, too faint */
                  "150.03,2.03,,17.0\n",           /* unmatched, r in range */
                  path, sizeof path);
    const char *bands[] = {"g", "r"};
    sp_zp_refcat r;
    assert_int_equal(sp_zp_refcat_read(path, bands, 2, &r), SP_OK);
    double ra[] = {150.0, 151.0, NAN}, dec[] = {2.0 + 0.3 / 3600, 2.0, 2.0};
    sp_cfg_zp z = {.match_radius_arcsec = 1.0, .gaia_mag_min = 8, .gaia_mag_max = 18};
    sp_zp_inject inj;
    assert_int_equal(sp_zp_inject_sources(&r, ra, dec, 3, &z, 25.0, &inj), SP_OK);
    assert_int_equal(inj.n, 2);
    assert_float_equal(inj.ra[0], 150.01, 1e-12);
    assert_string_equal(inj.id[0], "REF3");
    assert_float_equal(inj.flux_init[0 * 2 + 0], pow(10, -0.4 * (16.0 - 25.0)), 1e-9);
    assert_true(isnan(inj.flux_init[0 * 2 + 1]));
    assert_int_equal(inj.ref_line[1], 5);
    sp_zp_inject_free(&inj);
    sp_zp_refcat_free(&r);
}

/* ---- the stage on a hand-made store ---------------------------------------------- */

typedef struct {
    char id[16];
    double ra, dec, ra_fit, dec_fit;
    int8_t converged;
    uint8_t excl;
    double f[3], fe[3], mag[3], magerr[3];
} cat_row;

static sp_h5_col CATCOLS[] = {
    {.name = "ID", .type = SP_H5_STR, .len = 16},
    {.name = "RA", .type = SP_H5_F64, .unit = "deg"},
    {.name = "DEC", .type = SP_H5_F64, .unit = "deg"},
    {.name = "RA_FIT", .type = SP_H5_F64, .unit = "deg"},
    {.name = "DEC_FIT", .type = SP_H5_F64, .unit = "deg"},
    {.name = "CONVERGED", .type = SP_H5_I8},
    {.name = "excluded_any", .type = SP_H5_U8},
    {.name = "FLUX_g_fit", .type = SP_H5_F64},
    {.name = "FLUX_r_fit", .type = SP_H5_F64},
    {.name = "FLUX_z_fit", .type = SP_H5_F64},
    {.name = "FLUXERR_g_fit", .type = SP_H5_F64},
    {.name = "FLUXERR_r_fit", .type = SP_H5_F64},
    {.name = "FLUXERR_z_fit", .type = SP_H5_F64},
    {.name = "MAG_g_fit", .type = SP_H5_F64},
    {.name = "MAG_r_fit", .type = SP_H5_F64},
    {.name = "MAG_z_fit", .type = SP_H5_F64},
    {.name = "MAGERR_g_fit", .type = SP_H5_F64},
    {.name = "MAGERR_r_fit", .type = SP_H5_F64},
    {.name = "MAGERR_z_fit", .type = SP_H5_F64},
};
#define NCATCOL (int)(sizeof CATCOLS / sizeof CATCOLS[0])

static void t_store_stage(void **st)
{
    (void)st;
    rng_t r = {2024};
    const long nc = 4000, nstar = 200;
    const double zpt[2] = {25.0 + 0.043, 25.0 - 0.118}; /* true ZP of g, r */
    cat_row *rows = calloc(nc, sizeof *rows);
    char store[1024], refp[1024];
    sp_test_path("zp_store.h5", store, sizeof store);
    sp_test_path("zp_ref.csv", refp, sizeof refp);
    FILE *rf = fopen(refp, "w");
    fprintf(rf, "RA,DEC,mag_g,magerr_g,mag_r\n");
    double *mref = calloc(nstar * 2, sizeof *mref);
    for (long i = 0; i < nc; i++) {
        cat_row *c = &rows[i];
        snprintf(c->id, sizeof c->id, "s%d", (int)(i % 100000));
        /* reference stars stay 3.5" clear of every other source, so the expected
         * matches and isolation rejects are exact */
        for (int ok = 0; !ok;) {
            c->ra = 150 + urand(&r) * 0.2;
            c->dec = 2 + urand(&r) * 0.2;
            ok = 1;
            for (long j = 0; j < (i < nstar ? i : nstar) && ok; j++)
                ok = sp_zp_sep_arcsec(c->ra, c->dec, rows[j].ra, rows[j].dec) > 3.5;
        }
        /* fitted position a little off; a few rows without one (fall back to RA/DEC) */
        c->ra_fit = i % 50 == 3 ? NAN : c->ra + nrand(&r) * 0.05 / 3600;
        c->dec_fit = i % 50 == 3 ? NAN : c->dec + nrand(&r) * 0.05 / 3600;
        c->converged = 1;
        c->excl = 0;
        for (int b = 0; b < 3; b++) {
            double m = 15 + 7 * urand(&r);
            double f = pow(10, -0.4 * (m - (b < 2 ? zpt[b] : 25.0)));
            c->fe[b] = f * 0.01 + 0.5;
            c->f[b] = f + c->fe[b] * nrand(&r);
            c->mag[b] = c->magerr[b] = 123.0; /* stale values: the stage must overwrite them */
        }
        if (i % 97 == 5) c->f[0] = -3.0; /* non-positive flux: MAG NaN, flux kept */
    }
    /* the first nstar sources are the reference stars (mag 14..18) */
    for (long j = 0; j < nstar; j++) {
        cat_row *c = &rows[j];
        double m[2];
        for (int b = 0; b < 2; b++) {
            m[b] = 14 + 4 * urand(&r);
            double f = pow(10, -0.4 * (m[b] - zpt[b]));
            double emag = sqrt(0.002 * 0.002 + pow(0.03 * pow(10, 0.4 * (m[b] - 17.5)), 2));
            c->fe[b] = f * emag / 1.0857362047581294;
            c->f[b] = f + c->fe[b] * nrand(&r);
            mref[2 * j + b] = m[b] + 0.01 * nrand(&r);
        }
        if (j % 20 == 1) c->converged = 0;
        if (j % 20 == 2) c->excl = 1;
        if (j % 20 == 3) c->f[1] = NAN;
        if (j % 20 == 4) c->f[0] *= 1.5; /* blend: must be clipped */
        if (j % 20 == 6) mref[2 * j] = 25.0; /* outside the magnitude range (g only) */
        fprintf(rf, "%.10f,%.10f,%.5f,0.01,%.5f\n", c->ra + 0.2 / 3600, c->dec, mref[2 * j], mref[2 * j + 1]);
    }
    fprintf(rf, "150.5,2.5,15,0.01,15\n"); /* no counterpart */
    fclose(rf);
    /* a close neighbour of star 7 makes it not isolated */
    rows[nc - 1].ra = rows[7].ra + 2.0 / 3600;
    rows[nc - 1].dec = rows[7].dec;
    rows[nc - 1].ra_fit = rows[nc - 1].dec_fit = NAN;

    sp_h5 *h = NULL;
    assert_int_equal(sp_h5_create(store, MPI_COMM_NULL, &h), SP_OK);
    assert_int_equal(sp_h5_table_create(h, "/catalog", CATCOLS, NCATCOL, nc), SP_OK);
    size_t off[NCATCOL], rs;
    assert_int_equal(sp_h5_table_layout(CATCOLS, NCATCOL, off, &rs), SP_OK);
    assert_int_equal(rs, sizeof(cat_row));
    assert_int_equal(sp_h5_table_write(h, "/catalog", CATCOLS, NCATCOL, 0, nc, rows), SP_OK);
    assert_int_equal(sp_h5_attr_set_str(h, "/", "bands", "g,r,z"), SP_OK);
    assert_int_equal(sp_h5_attr_set_double(h, "/", "zp_ref", 25.0), SP_OK);

    /* expected selection, by brute force */
    long exp_sel[2] = {0, 0}, exp_iso = 0;
    for (long j = 0; j < nstar; j++) {
        const cat_row *c = &rows[j];
        double rj = isfinite(c->ra_fit) ? c->ra_fit : c->ra, dj = isfinite(c->dec_fit) ? c->dec_fit : c->dec;
        int iso = 1;
        for (long k = 0; k < nc; k++) {
            if (k == j) continue;
            double rk = isfinite(rows[k].ra_fit) ? rows[k].ra_fit : rows[k].ra;
            double dk = isfinite(rows[k].dec_fit) ? rows[k].dec_fit : rows[k].dec;
            if (sp_zp_sep_arcsec(rj, dj, rk, dk) <= 3.0) iso = 0;
        }
        exp_iso += !iso;
        for (int b = 0; b < 2; b++) {
            double m = mref[2 * j + b];
            if (c->converged == 1 && !c->excl && iso && m >= 8 && m <= 18 && isfinite(c->f[b]) && c->f[b] > 0)
                exp_sel[b]++;
        }
    }

    sp_cfg_zp z = {.enabled = true, .match_radius_arcsec = 1.0, .isolation_radius_arcsec = 3.0,
                   .gaia_mag_min = 8, .gaia_mag_max = 18, .clip_sigma = 3.0, .clip_max_iters = 10, .min_stars = 5};
    sp_zp_result res;
    int stt = sp_zp_calibrate(h, &z, refp, &res);
    if (stt) fprintf(stderr, "%s\n", sp_err_msg());
    assert_int_equal(stt, SP_OK);
    sp_zp_result_print(stdout, &res);
    assert_int_equal(res.nbands, 3);
    assert_int_equal(res.nref, nstar + 1);
    assert_int_equal(res.nmatched, nstar);
    for (int b = 0; b < 2; b++) {
        printf("band %s: ZP %.5f truth %.5f (off %+.5f, err %.5f), %ld selected (expected %ld), %ld isolation "
               "rejects (expected %ld)\n",
               res.band[b].band, res.band[b].zp, zpt[b], res.band[b].zp - zpt[b], res.band[b].zp_err,
               res.band[b].nselected, exp_sel[b], res.band[b].nrej_isolation, exp_iso);
        assert_int_equal(res.band[b].flag, 0);
        assert_true(fabs(res.band[b].zp - zpt[b]) < 0.005);
        assert_int_equal(res.band[b].nselected, exp_sel[b]);
        assert_int_equal(res.band[b].nrej_converged, nstar / 20);
        assert_int_equal(res.band[b].nrej_excluded, nstar / 20);
        assert_int_equal(res.band[b].nrej_isolation, 1);
        assert_int_equal(exp_iso, 1);
        assert_int_equal(res.band[b].nused + res.band[b].nclipped, res.band[b].nselected);
    }
    assert_true(res.band[0].nclipped >= nstar / 20 - 2); /* the blends */
    assert_int_equal(res.band[2].flag, SP_ZP_F_NO_REF_BAND);
    assert_true(isnan(res.band[2].zp));

    /* /zp tables */
    long nb = 0, ns = 0;
    assert_int_equal(sp_h5_table_nrows(h, "/zp/bands", &nb), SP_OK);
    assert_int_equal(nb, 3);
    assert_int_equal(sp_h5_table_nrows(h, "/zp/stars", &ns), SP_OK);
    assert_int_equal(ns, res.band[0].nselected + res.band[1].nselected);
    double zpf[3];
    assert_int_equal(sp_h5_table_read_col_double(h, "/zp/bands", "zp", 0, 3, zpf), SP_OK);
    assert_float_equal(zpf[0], res.band[0].zp, 0);
    long cpl = 0;
    assert_int_equal(sp_h5_attr_get_long(h, "/zp", "complete", &cpl), SP_OK);
    assert_int_equal(cpl, 1);
    sp_zp_result back_res;
    assert_int_equal(sp_zp_read(h, &back_res), SP_OK);
    assert_int_equal(back_res.nbands, 3);
    assert_int_equal(back_res.nmatched, nstar);
    assert_int_equal(back_res.nstars, ns);
    for (int b = 0; b < 3; b++) {
        assert_string_equal(back_res.band[b].band, res.band[b].band);
        assert_true(back_res.band[b].zp == res.band[b].zp || (isnan(back_res.band[b].zp) && isnan(res.band[b].zp)));
        assert_int_equal(back_res.band[b].nused, res.band[b].nused);
        assert_int_equal(back_res.band[b].flag, res.band[b].flag);
    }
    sp_zp_result_free(&back_res);

    /* MAG / MAGERR of every row */
    cat_row *back = calloc(nc, sizeof *back);
    assert_int_equal(sp_h5_table_read(h, "/catalog", CATCOLS, NCATCOL, 0, nc, back), SP_OK);
    long nnan_neg = 0;
    for (long i = 0; i < nc; i++) {
        for (int b = 0; b < 3; b++) {
            double f = rows[i].f[b], fe = rows[i].fe[b];
            assert_true(back[i].f[b] == f || (isnan(f) && isnan(back[i].f[b]))); /* fluxes kept */
            if (b == 2 || !(f > 0)) {
                assert_true(isnan(back[i].mag[b]) && isnan(back[i].magerr[b]));
                nnan_neg += b == 0 && f <= 0;
                continue;
            }
            double zp = res.band[b].zp, ez = res.band[b].zp_err;
            assert_float_equal(back[i].mag[b], zp - 2.5 * log10(f), 1e-12);
            double em = 1.0857362047581294 * fe / f;
            assert_float_equal(back[i].magerr[b], sqrt(em * em + ez * ez), 1e-12);
        }
    }
    assert_true(nnan_neg > 30);

    sp_zp_result_free(&res);
    /* re-run with settings that leave no ZP: /zp is replaced, MAG goes back to NaN */
    z.min_stars = 100000;
    assert_int_equal(sp_zp_calibrate(h, &z, refp, NULL), SP_OK);
    assert_int_equal(sp_h5_table_read_col_double(h, "/zp/bands", "zp", 0, 3, zpf), SP_OK);
    assert_true(isnan(zpf[0]) && isnan(zpf[1]));
    long fl[3];
    assert_int_equal(sp_h5_table_read_col_long(h, "/zp/bands", "flag", 0, 3, fl), SP_OK);
    assert_int_equal(fl[0], SP_ZP_F_FEW_STARS);
    assert_int_equal(fl[2], SP_ZP_F_NO_REF_BAND);
    assert_int_equal(sp_h5_table_read(h, "/catalog", CATCOLS, NCATCOL, 0, nc, back), SP_OK);
    for (long i = 0; i < nc; i++)
        for (int b = 0; b < 3; b++) assert_true(isnan(back[i].mag[b]));
    long *clipped = calloc(ns, sizeof *clipped);
    assert_int_equal(sp_h5_table_read_col_long(h, "/zp/stars", "clipped", 0, ns, clipped), SP_OK);
    for (long k = 0; k < ns; k++) assert_int_equal(clipped[k], 1);

    /* errors: a read-only handle, a missing reference catalog */
    assert_int_equal(sp_h5_close(&h), SP_OK);
    assert_int_equal(sp_h5_open(store, 0, MPI_COMM_NULL, &h), SP_OK);
    assert_int_equal(sp_zp_calibrate(h, &z, refp, NULL), SP_ERR_STATE);
    assert_int_equal(sp_h5_close(&h), SP_OK);
    assert_int_equal(sp_h5_open(store, 1, MPI_COMM_NULL, &h), SP_OK);
    assert_int_equal(sp_zp_calibrate(h, &z, "/nonexistent.csv", NULL), SP_ERR_IO);
    assert_int_equal(sp_h5_close(&h), SP_OK);
    free(clipped);
    free(back);
    free(rows);
    free(mref);
}

/* ---- the aperture correction --------------------------------------------------- */

/* n candidates of a band whose model fluxes are low by 1/ftrue: A_i = ftrue F_i (1 + 1%
 * intrinsic) + aperture noise; the first is a bright source with a contaminated aperture. */
static void apcorr_set(rng_t *r, long n, double ftrue, double *A, double *Ae, double *F, double *Fe)
{
    for (long i = 0; i < n; i++) {
        double f = 2000 * pow(10, -0.4 * 4 * urand(r)); /* 2000 .. 50 in units of the aperture noise */
        Fe[i] = 0.3 + 0.002 * f;
        F[i] = f + Fe[i] * nrand(r);
        Ae[i] = 1.0 + 0.001 * f;
        A[i] = ftrue * f * (1 + 0.01 * nrand(r)) + Ae[i] * nrand(r);
    }
    A[0] = 0.955 * F[0];
    F[0] = 8000;
    Fe[0] = 2;
    Ae[0] = 9;
    A[0] = 0.955 * F[0];
}

static void t_apcorr_estimate(void **st)
{
    (void)st;
    rng_t r = {77};
    enum { N = 80 };
    double A[N], Ae[N], F[N], Fe[N], x[N], e[N];
    unsigned char clip[N];
    double worst = 0;
    for (int rep = 0; rep < 50; rep++) {
        apcorr_set(&r, N, 1.017, A, Ae, F, Fe);
        sp_apcorr_band b;
        assert_int_equal(sp_apcorr_estimate(A, Ae, F, Fe, N, 3.0, 10, 5, x, e, clip, &b), SP_OK);
        assert_int_equal(b.flag, 0);
        assert_true(b.factor_err > 0 && b.factor_err < 0.01);
        assert_true(b.sigma_extra > 0.003 && b.sigma_extra < 0.03); /* the 1% intrinsic scatter */
        double d = fabs(b.factor - 1.017) / b.factor_err;
        worst = d > worst ? d : worst;
        assert_true(fabs(b.factor - 1.017) < 0.006); /* the outlier (0.955, half the raw weight) does not carry it */
    }
    printf("apcorr: worst |factor - truth| / factor_err over 50 sets: %.2f\n", worst);
    assert_true(worst < 4.5);
    /* too few: factor 1, flagged */
    apcorr_set(&r, 4, 1.02, A, Ae, F, Fe);
    sp_apcorr_band b;
    assert_int_equal(sp_apcorr_estimate(A, Ae, F, Fe, 4, 3.0, 10, 5, x, e, clip, &b), SP_OK);
    assert_int_equal(b.flag, SP_APCORR_F_FEW_STARS);
    assert_true(b.factor == 1.0);
    /* unusable candidates are ignored */
    apcorr_set(&r, N, 1.0, A, Ae, F, Fe);
    F[3] = -1;
    Ae[4] = 0;
    A[5] = NAN;
    assert_int_equal(sp_apcorr_estimate(A, Ae, F, Fe, N, 3.0, 10, 5, x, e, clip, &b), SP_OK);
    assert_true(clip[3] && clip[4] && clip[5]);
    assert_true(b.nused + b.nclipped <= N);
    assert_true(fabs(b.factor - 1.0) < 0.006);
}

typedef struct {
    int8_t converged;
    uint8_t excl;
    double re;
    double f[2], fe[2], fc[2], ac[2], bl[2], a[2], ae[2];
    int32_t af[2];
} ac_cat;

static sp_h5_col ACCOLS[] = {
    {.name = "CONVERGED", .type = SP_H5_I8},       {.name = "excluded_any", .type = SP_H5_U8},
    {.name = "RE_FIT", .type = SP_H5_F64},         {.name = "FLUX_g_fit", .type = SP_H5_F64},
    {.name = "FLUX_r_fit", .type = SP_H5_F64},     {.name = "FLUXERR_g_fit", .type = SP_H5_F64},
    {.name = "FLUXERR_r_fit", .type = SP_H5_F64},  {.name = "FLUXERR_g_cond", .type = SP_H5_F64},
    {.name = "FLUXERR_r_cond", .type = SP_H5_F64}, {.name = "APCORR_g", .type = SP_H5_F64},
    {.name = "APCORR_r", .type = SP_H5_F64},       {.name = "BLEND_g", .type = SP_H5_F64},
    {.name = "BLEND_r", .type = SP_H5_F64},        {.name = "FLUX_g_APCAL", .type = SP_H5_F64},
    {.name = "FLUX_r_APCAL", .type = SP_H5_F64},   {.name = "FLUXERR_g_APCAL", .type = SP_H5_F64},
    {.name = "FLUXERR_r_APCAL", .type = SP_H5_F64}, {.name = "APCAL_FLAGS_g", .type = SP_H5_I32},
    {.name = "APCAL_FLAGS_r", .type = SP_H5_I32},
};
#define NACCOL (int)(sizeof ACCOLS / sizeof ACCOLS[0])

/* The stage on a hand-made store: galaxies, unconverged, excluded, blended, flagged and
 * faint rows are not used; every row's fluxes and errors are scaled; APCORR records the
 * factor; a re-run leaves the fluxes as they are; a store without the columns is left alone. */
static void t_apcorr_store(void **st)
{
    (void)st;
    rng_t r = {99};
    const long nc = 3000;
    const double ftrue[2] = {1.021, 0.994};
    ac_cat *rows = calloc(nc, sizeof *rows), *back = calloc(nc, sizeof *back), *back2 = calloc(nc, sizeof *back2);
    for (long i = 0; i < nc; i++) {
        ac_cat *c = &rows[i];
        c->converged = i % 31 == 1 ? 0 : 1;
        c->excl = i % 37 == 2;
        c->re = i % 5 == 0 ? 2.5 : NAN; /* a fifth are galaxies */
        for (int b = 0; b < 2; b++) {
            double f = 5 + 3000 * pow(urand(&r), 3);
            c->fe[b] = 2 + 0.003 * f;
            c->fc[b] = 0.9 * c->fe[b];
            c->f[b] = f + c->fe[b] * nrand(&r);
            c->ac[b] = NAN;
            c->bl[b] = i % 7 == 3 ? 0.2 : 0.003;
            c->ae[b] = 6;
            c->a[b] = ftrue[b] * f * (1 + 0.005 * nrand(&r)) + c->ae[b] * nrand(&r);
            c->af[b] = i % 41 == 4 ? 2 : 0;
            /* what would bias the factor if used: galaxies, blends, flagged apertures */
            if (c->re == 2.5 || c->bl[b] > 0.1 || c->af[b]) c->a[b] *= 1.3;
        }
    }
    char store[1024];
    sp_test_path("apcorr_store.h5", store, sizeof store);
    sp_h5 *h = NULL;
    assert_int_equal(sp_h5_create(store, MPI_COMM_NULL, &h), SP_OK);
    assert_int_equal(sp_h5_table_create(h, "/catalog", ACCOLS, NACCOL, nc), SP_OK);
    size_t off[NACCOL], rs;
    assert_int_equal(sp_h5_table_layout(ACCOLS, NACCOL, off, &rs), SP_OK);
    assert_int_equal(rs, sizeof(ac_cat));
    assert_int_equal(sp_h5_table_write(h, "/catalog", ACCOLS, NACCOL, 0, nc, rows), SP_OK);
    assert_int_equal(sp_h5_attr_set_str(h, "/", "bands", "g,r"), SP_OK);
    sp_cfg_zp z = {.clip_sigma = 3.0, .clip_max_iters = 10, .apcorr = true, .apcorr_snr_min = 50,
                   .apcorr_blend_max = 0.02, .apcorr_min_stars = 5};
    sp_apcorr_result res = {0};
    assert_int_equal(sp_apcorr_store(h, &z, &res), SP_OK);
    assert_int_equal(res.nbands, 2);
    assert_int_equal(sp_h5_table_read(h, "/catalog", ACCOLS, NACCOL, 0, nc, back), SP_OK);
    for (int b = 0; b < 2; b++) {
        const sp_apcorr_band *q = &res.band[b];
        printf("apcorr %s: %.5f +- %.5f (truth %.3f), %ld used of %ld\n", q->band, q->factor, q->factor_err, ftrue[b],
               q->nused, q->ncand);
        assert_int_equal(q->flag, 0);
        assert_true(fabs(q->factor - ftrue[b]) < 4 * q->factor_err + 1e-4);
        assert_true(q->ncand > 100);
        for (long i = 0; i < nc; i++) {
            assert_true(back[i].ac[b] == q->factor);
            assert_float_equal(back[i].f[b], rows[i].f[b] * q->factor, 1e-9 * fabs(rows[i].f[b]) + 1e-12);
            assert_float_equal(back[i].fe[b], rows[i].fe[b] * q->factor, 1e-9 * rows[i].fe[b]);
            assert_float_equal(back[i].fc[b], rows[i].fc[b] * q->factor, 1e-9 * rows[i].fc[b]);
        }
    }
    long cpl = 0, nb = 0;
    assert_int_equal(sp_h5_attr_get_long(h, "/apcorr", "complete", &cpl), SP_OK);
    assert_int_equal(cpl, 1);
    assert_int_equal(sp_h5_table_nrows(h, "/apcorr/bands", &nb), SP_OK);
    assert_int_equal(nb, 2);
    double fac[2];
    assert_int_equal(sp_h5_table_read_col_double(h, "/apcorr/bands", "factor", 0, 2, fac), SP_OK);
    assert_true(fac[0] == res.band[0].factor && fac[1] == res.band[1].factor);
    /* a re-run starts from the model fluxes: the same factor, the rows as they are */
    sp_apcorr_result res2 = {0};
    assert_int_equal(sp_apcorr_store(h, &z, &res2), SP_OK);
    assert_int_equal(sp_h5_table_read(h, "/catalog", ACCOLS, NACCOL, 0, nc, back2), SP_OK);
    for (int b = 0; b < 2; b++) {
        assert_float_equal(res2.band[b].factor, res.band[b].factor, 1e-12);
        for (long i = 0; i < nc; i++)
            assert_float_equal(back2[i].f[b], back[i].f[b], 1e-12 * fabs(back[i].f[b]) + 1e-15);
    }
    /* too few sources: not corrected, the rows go back to the model fluxes, APCORR NaN */
    z.apcorr_min_stars = 1000000;
    assert_int_equal(sp_apcorr_store(h, &z, NULL), SP_OK);
    assert_int_equal(sp_h5_table_read(h, "/catalog", ACCOLS, NACCOL, 0, nc, back2), SP_OK);
    for (long i = 0; i < nc; i++)
        for (int b = 0; b < 2; b++) {
            assert_true(isnan(back2[i].ac[b]));
            assert_float_equal(back2[i].f[b], rows[i].f[b], 1e-12 * fabs(rows[i].f[b]) + 1e-15);
        }
    assert_int_equal(sp_h5_close(&h), SP_OK);
    /* a store of the earlier layout (no APCAL/APCORR columns): left alone, flagged */
    assert_int_equal(sp_h5_create(store, MPI_COMM_NULL, &h), SP_OK);
    assert_int_equal(sp_h5_table_create(h, "/catalog", ACCOLS, 9, nc), SP_OK);
    assert_int_equal(sp_h5_attr_set_str(h, "/", "bands", "g,r"), SP_OK);
    sp_apcorr_result res3 = {0};
    assert_int_equal(sp_apcorr_store(h, &z, &res3), SP_OK);
    assert_int_equal(res3.band[0].flag, SP_APCORR_F_NO_COLUMN);
    assert_int_equal(sp_h5_close(&h), SP_OK);
    sp_apcorr_result_free(&res);
    sp_apcorr_result_free(&res2);
    sp_apcorr_result_free(&res3);
    free(rows);
    free(back);
    free(back2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_weighted_median),      cmocka_unit_test(t_match),
        cmocka_unit_test(t_match_speed),          cmocka_unit_test(t_estimator_outliers),
        cmocka_unit_test(t_estimator_monte_carlo), cmocka_unit_test(t_estimator_edge),
        cmocka_unit_test(t_refcat),               cmocka_unit_test(t_inject),
        cmocka_unit_test(t_store_stage),          cmocka_unit_test(t_apcorr_estimate),
        cmocka_unit_test(t_apcorr_store),
    };
    return cmocka_run_group_tests_name("zp", tests, NULL, NULL);
}
