/* test_score.c — the scorer's numbers on synthetic inputs with known answers: median and robust
 * sigma, Cramér–Rao bounds of a pixel-integrated Gaussian star (sky-limited: sigma_F^2 = 4 pi s^2 V,
 * sigma_x^2 = 8 pi s^4 V / F^2; source-limited: sigma_F^2 = F scale / EGAIN), frames adding
 * information, and the pass/fail bars. The end-to-end scoring is tests/scripts/test_score.sh. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_score.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void close_rel(double got, double want, double rtol, const char *what)
{
    if (!(fabs(got - want) <= rtol * fabs(want)))
        fail_msg("%s: got %.9g, want %.9g (relative error %.3g > %.3g)", what, got, want, fabs(got / want - 1), rtol);
}

static void t_median_rsigma(void **state)
{
    (void)state;
    double a[] = {3, 1, NAN, 2};
    assert_true(sp_score_median(a, 4) == 2);
    double b[] = {4, 1, 3, 2};
    assert_true(sp_score_median(b, 4) == 2.5);
    double c[] = {1, 2, 3, 4, 100, NAN, INFINITY};
    /* median 3; |deviations| 2 1 0 1 97 -> 1 */
    close_rel(sp_score_rsigma(c, 7), 1.482602218505602, 1e-12, "rsigma of 1 2 3 4 100");
    double d[] = {NAN, NAN};
    assert_true(isnan(sp_score_median(d, 2)));
    double e[] = {5};
    assert_true(isnan(sp_score_rsigma(e, 1)));
    assert_true(isnan(sp_score_median(NULL, 0)));
    /* a normal sample: robust sigma -> sigma (Box-Muller on a fixed LCG) */
    long n = 200000;
    double *v = malloc(sizeof *v * (size_t)n);
    assert_non_null(v);
    uint64_t s = 12345;
    for (long i = 0; i < n; i += 2) {
        double u1, u2;
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        u1 = ((s >> 11) + 0.5) / 9007199254740992.0;
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        u2 = ((s >> 11) + 0.5) / 9007199254740992.0;
        double r = sqrt(-2 * log(u1));
        v[i] = 3 + 2.5 * r * cos(2 * M_PI * u2);
        v[i + 1] = 3 + 2.5 * r * sin(2 * M_PI * u2);
    }
    double rs = sp_score_rsigma(v, n);
    printf("# robust sigma of 200000 N(3, 2.5^2) draws: %.4f (MAD estimator's std error ~0.0085)\n", rs);
    close_rel(rs, 2.5, 0.015, "robust sigma of a normal sample");
    free(v);
}

/* A circular Gaussian of width s integrated over pixels, centred at (x0, y0) on an n x n stamp,
 * and its derivatives with respect to x0, y0 (exact, from erf). */
static void gauss_stamp(double s, double x0, double y0, int n, double *P, double *Px, double *Py)
{
    double *gx = malloc(sizeof(double) * 4 * (size_t)n), *gy = gx + n, *dx = gx + 2 * n, *dy = gx + 3 * n;
    assert_non_null(gx);
    const double k = 1 / (s * sqrt(2.0));
    for (int i = 0; i < n; i++) {
        double a = (i - 0.5 - x0), b = (i + 0.5 - x0);
        gx[i] = 0.5 * (erf(b * k) - erf(a * k));
        dx[i] = -(exp(-b * b / (2 * s * s)) - exp(-a * a / (2 * s * s))) / (s * sqrt(2 * M_PI));
        a = (i - 0.5 - y0), b = (i + 0.5 - y0);
        gy[i] = 0.5 * (erf(b * k) - erf(a * k));
        dy[i] = -(exp(-b * b / (2 * s * s)) - exp(-a * a / (2 * s * s))) / (s * sqrt(2 * M_PI));
    }
    for (int j = 0; j < n; j++)
        for (int i = 0; i < n; i++) {
            P[j * n + i] = gx[i] * gy[j];
            Px[j * n + i] = dx[i] * gy[j];
            Py[j * n + i] = gx[i] * dy[j];
        }
    free(gx);
}

static void t_crlb_gaussian(void **state)
{
    (void)state;
    const int n = 81;
    double *P = malloc(sizeof(double) * 3 * n * n), *Px = P + n * n, *Py = P + 2 * n * n;
    assert_non_null(P);
    /* sky-limited (EGAIN 0: no source term); scale 0.8 -> V = (SKYSIG scale)^2 */
    sp_score_noise fr = {.skysig = 5.0, .egain = 0, .scale = 0.8};
    double V = pow(5.0 * 0.8, 2), F = 1000;
    for (int k = 0; k < 3; k++) {
        double s = (double[]){2.0, 3.0, 5.0}[k];
        gauss_stamp(s, 40.3, 39.8, n, P, Px, Py);
        sp_score_crlb c;
        assert_int_equal(sp_score_crlb_pixels(P, Px, Py, (long)n * n, F, &fr, 1, &c), SP_OK);
        double sf = sqrt(4 * M_PI * s * s * V), sx = sqrt(8 * M_PI * pow(s, 4) * V) / F;
        /* pixel integration widens the Gaussian to s^2 + 1/12 per axis */
        double se2 = s * s + 1.0 / 12, sf_pix = sqrt(4 * M_PI * se2 * V), sx_pix = sqrt(8 * M_PI * se2 * se2 * V) / F;
        printf("# Gaussian s=%.0f sky-limited: sigma_F %.5f (4 pi s^2 V: %.5f, with s^2+1/12: %.5f), sigma_x %.6f "
               "(analytic %.6f, %.6f); free/known %.6f\n",
               s, c.sig_f_known, sf, sf_pix, c.sig_x, sx, sx_pix, c.sig_f_free / c.sig_f_known);
        close_rel(c.sig_f_known, sf, 0.012, "sigma_F vs sqrt(4 pi s^2 V)");
        close_rel(c.sig_f_known, sf_pix, 2e-4, "sigma_F vs sqrt(4 pi (s^2+1/12) V)");
        close_rel(c.sig_x, sx, 0.025, "sigma_x vs sqrt(8 pi s^4 V)/F");
        close_rel(c.sig_x, sx_pix, 5e-4, "sigma_x vs sqrt(8 pi (s^2+1/12)^2 V)/F");
        close_rel(c.sig_y, c.sig_x, 5e-3, "sigma_y = sigma_x");
        /* a symmetric PSF: flux and position decouple, the free bound equals the known one */
        close_rel(c.sig_f_free, c.sig_f_known, 1e-3, "sigma_F free = known for a Gaussian");
    }
    /* source-limited: SKYSIG 0, V_i = F P_i scale / EGAIN -> sigma_F^2 = F scale / EGAIN exactly */
    gauss_stamp(2.5, 40.0, 40.0, n, P, Px, Py);
    sp_score_noise src = {.skysig = 0, .egain = 2.0, .scale = 1.5};
    sp_score_crlb c;
    assert_int_equal(sp_score_crlb_pixels(P, Px, Py, (long)n * n, 4000, &src, 1, &c), SP_OK);
    double sum = 0;
    for (int i = 0; i < n * n; i++) sum += P[i];
    close_rel(c.sig_f_known, sqrt(4000 * 1.5 / 2.0 * sum), 1e-9, "source-limited sigma_F = sqrt(F scale / g)");
    /* position, source-limited: sigma_x^2 ~ (s^2 + 1/12) / N_photons, N = F / (scale / g) */
    close_rel(c.sig_x, sqrt((2.5 * 2.5 + 1.0 / 12) / (4000 / 1.5 * 2.0)), 0.01, "source-limited sigma_x");
    /* two identical frames: twice the information */
    sp_score_noise two[2] = {fr, fr};
    sp_score_crlb c1, c2;
    assert_int_equal(sp_score_crlb_pixels(P, Px, Py, (long)n * n, F, &fr, 1, &c1), SP_OK);
    assert_int_equal(sp_score_crlb_pixels(P, Px, Py, (long)n * n, F, two, 2, &c2), SP_OK);
    close_rel(c2.sig_f_known, c1.sig_f_known / sqrt(2), 1e-12, "two frames");
    close_rel(c2.sig_x, c1.sig_x / sqrt(2), 1e-9, "two frames, position");
    /* the star's own Poisson term increases the bound */
    sp_score_noise both = {.skysig = 5.0, .egain = 1.0, .scale = 0.8};
    assert_int_equal(sp_score_crlb_pixels(P, Px, Py, (long)n * n, 1e5, &both, 1, &c2), SP_OK);
    assert_int_equal(sp_score_crlb_pixels(P, Px, Py, (long)n * n, 1e5, &fr, 1, &c1), SP_OK);
    assert_true(c2.sig_f_known > 1.5 * c1.sig_f_known);
    /* without derivatives: only the position-known bound */
    assert_int_equal(sp_score_crlb_pixels(P, NULL, NULL, (long)n * n, F, &fr, 1, &c), SP_OK);
    assert_true(isfinite(c.sig_f_known) && isnan(c.sig_f_free) && isnan(c.sig_x));
    /* bad arguments */
    assert_int_equal(sp_score_crlb_pixels(P, Px, Py, 0, F, &fr, 1, &c), SP_ERR_INPUT);
    sp_score_noise badf = {.skysig = 1, .egain = 1, .scale = 0};
    assert_int_equal(sp_score_crlb_pixels(P, Px, Py, (long)n * n, F, &badf, 1, &c), SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "scale"));
    /* no information (all-zero PSF) */
    memset(P, 0, sizeof(double) * n * n);
    assert_int_equal(sp_score_crlb_pixels(P, Px, Py, (long)n * n, F, &fr, 1, &c), SP_ERR_NUMERIC);
    sp_err_clear();
    free(P);
}

static void t_bars(void **state)
{
    (void)state;
    sp_score_result r;
    memset(&r, 0, sizeof r);
    r.match_rate = 0.95;
    r.star_pull_std = 1.1;
    r.star_flux_scatter_over_crlb = 1.4;
    r.star_flux_bias = -0.03;
    r.galaxy_flux_bias = NAN;
    r.star_pos_scatter_over_crlb = NAN;
    r.zp_error_mag_max = NAN;
    sp_score_require q;
    sp_score_require_none(&q);
    char msg[2048];
    int nfail = -1;
    sp_score_check(&r, &q, msg, sizeof msg, &nfail);
    assert_int_equal(nfail, 0);
    assert_string_equal(msg, "");
    q.pull_std_lo = 0.8;
    q.pull_std_hi = 1.2;
    q.match_rate_min = 0.9;
    sp_score_check(&r, &q, msg, sizeof msg, &nfail);
    assert_int_equal(nfail, 0);
    assert_non_null(strstr(msg, "PASS star_pull_std"));
    q.scatter_crlb_max = 1.3; /* 1.4: missed */
    q.bias_max = 0.02;        /* |-0.03|: missed */
    q.galaxy_bias_max = 0.1;  /* null: missed (not measurable) */
    sp_score_check(&r, &q, msg, sizeof msg, &nfail);
    printf("# bars:\n%s", msg);
    assert_int_equal(nfail, 3);
    assert_non_null(strstr(msg, "FAIL star_flux_scatter_over_crlb = 1.4 (required <= 1.3)"));
    assert_non_null(strstr(msg, "FAIL |star_flux_bias| = -0.03"));
    assert_non_null(strstr(msg, "FAIL |galaxy_flux_bias| = null"));
    r.star_pull_std = 1.25;
    sp_score_require_none(&q);
    q.pull_std_lo = 0.8;
    q.pull_std_hi = 1.2;
    sp_score_check(&r, &q, msg, sizeof msg, &nfail);
    assert_int_equal(nfail, 1);
}

/* Errors name the file and what is missing. */
static void t_run_errors(void **state)
{
    (void)state;
    char store[600], truth[600];
    sp_test_path("nocat.h5", store, sizeof store);
    sp_test_write("truth.csv", "id,type,x,y,flags,flux_g\n1,STAR,1,2,0,10\n", truth, sizeof truth);
    sp_score_result r;
    /* missing store */
    int st = sp_score_run(store, truth, NULL, &r);
    assert_int_equal(st, SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "nocat.h5"));
    /* an HDF5 file without /catalog */
    sp_h5 *h = NULL;
    assert_int_equal(sp_h5_create(store, MPI_COMM_NULL, &h), SP_OK);
    assert_int_equal(sp_h5_group_create(h, "/cells"), SP_OK);
    assert_int_equal(sp_h5_close(&h), SP_OK);
    st = sp_score_run(store, truth, NULL, &r);
    assert_int_equal(st, SP_ERR_INPUT);
    assert_non_null(strstr(sp_err_msg(), "no /catalog"));
    assert_non_null(strstr(sp_err_msg(), "nocat.h5"));
    sp_err_clear();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_median_rsigma),
        cmocka_unit_test(t_crlb_gaussian),
        cmocka_unit_test(t_bars),
        cmocka_unit_test(t_run_errors),
    };
    return cmocka_run_group_tests_name("score", tests, NULL, NULL);
}
