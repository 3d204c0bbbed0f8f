/* test_moffat_field.c — the band-wide Moffat (sp_moffat_field_fit): a field
 * whose PSF is an elliptical Moffat with FWHM, beta and ellipticity varying
 * over it (quadratic FWHM: worse towards the edges, as the simulator and real
 * optics have it), stars drawn with Gauss-Legendre pixel integration
 * (sp_psf_moffat_pixel, independent of the fit's 3x3 rule), sky noise. The
 * fitted model must follow the variation (FWHM within 1% everywhere, the PSF
 * fit flux a faint star would get with it within 0.5% of the truth's), beat a
 * single Moffat at the corners, lower its degree when the stars are few, and
 * drop a star whose neighbour was not masked. */
#include "surveyproc/sp_epsf.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_psf.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

enum { NX = 1024, NY = 1024, HALF = 20 };

static void truth_at(double x, double y, double *fw, double *be, double *q, double *th)
{
    double u = (x - 511.5) / 512.0, v = (y - 511.5) / 512.0;
    *fw = 4.0 * (1.0 + 0.04 * u + 0.03 * v + 0.06 * (u * u + v * v));
    *be = 3.0 + 0.2 * u;
    double e1 = 0.05 * u, e2 = 0.04 * v, e = hypot(e1, e2);
    *q = (1 - e) / (1 + e);
    *th = 0.5 * atan2(e2, e1);
}

static uint64_t rng = 987654321ULL;
static double unif(void)
{
    rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(rng >> 11) / 9007199254740992.0;
}
static double gauss(void)
{
    double g = 0;
    for (int a = 0; a < 12; a++) g += unif();
    return g - 6.0;
}

typedef struct {
    float *img, *ivar;
    sp_psfstar *st;
    int n;
} field;

/* n stars on a jittered grid; `contaminate` >= 0: that star gets an unmasked
 * neighbour of half its flux 4 pixels away. */
static void make_field(field *f, int side, double sky_sigma, int contaminate)
{
    f->img = calloc((size_t)NX * NY, sizeof *f->img);
    f->ivar = malloc(sizeof *f->ivar * (size_t)NX * NY);
    f->n = side * side;
    f->st = calloc((size_t)f->n, sizeof *f->st);
    assert_non_null(f->img);
    assert_non_null(f->ivar);
    double step = (NX - 100.0) / side;
    for (int k = 0; k < f->n; k++) {
        double x = 50 + step * (k % side + 0.5) + (unif() - 0.5) * 0.4 * step;
        double y = 50 + step * (k / side + 0.5) + (unif() - 0.5) * 0.4 * step;
        double F = 5e3 * pow(20.0, unif()), fw, be, q, th;
        truth_at(x, y, &fw, &be, &q, &th);
        for (int src = 0; src < (k == contaminate ? 2 : 1); src++) {
            double sx = x + (src ? 4.0 : 0.0), sy = y + (src ? 1.5 : 0.0), sF = src ? 0.5 * F : F;
            for (int j = (int)sy - HALF; j <= (int)sy + HALF; j++)
                for (int i = (int)sx - HALF; i <= (int)sx + HALF; i++) {
                    double v;
                    assert_int_equal(sp_psf_moffat_pixel(fw, be, q, th, i - sx, j - sy, &v), SP_OK);
                    f->img[(size_t)j * NX + i] += (float)(sF * v);
                }
        }
        sp_psfstar *s = &f->st[k];
        s->x = x + 0.1 * gauss();
        s->y = y + 0.1 * gauss();
        s->flux = 1.05 * F;
        s->snr = F / (sky_sigma * 2.0 * sqrt(M_PI) * fw / 2.3548);
        s->q = 1.0;
        s->bkg = 0.0;
        s->bkg_rms = sky_sigma;
    }
    for (size_t p = 0; p < (size_t)NX * NY; p++) {
        f->img[p] += (float)(sky_sigma * gauss());
        f->ivar[p] = (float)(1.0 / (sky_sigma * sky_sigma));
    }
}

static void free_field(field *f)
{
    free(f->img);
    free(f->ivar);
    free(f->st);
}

static void fit_field(const field *f, int degree, sp_moffat_field *m, int *ncut)
{
    sp_epsf_params ep;
    sp_epsf_params_default(&ep);
    ep.final_size = 2 * HALF + 1;
    sp_epsf_cutout *cuts = calloc((size_t)f->n, sizeof *cuts);
    int got = 0;
    assert_int_equal(sp_epsf_cutouts(f->img, f->ivar, NULL, NX, NY, 0, 0, f->st, f->n, &ep, cuts, &got), SP_OK);
    sp_moffat_field_params p;
    sp_moffat_field_params_default(&p);
    p.degree = degree;
    p.x_ref = p.y_ref = 511.5;
    p.scale = 512.0;
    p.fwhm0 = 4.0;
    p.beta0 = 3.5;
    int st = sp_moffat_field_fit(cuts, got, &p, m);
    if (st != SP_OK) printf("fit: %s\n", sp_err_msg());
    assert_int_equal(st, SP_OK);
    for (int i = 0; i < got; i++) sp_epsf_cutout_free(&cuts[i]);
    free(cuts);
    if (ncut) *ncut = got;
}

/* PSF-fit flux error of a faint (sky-limited) star of the true PSF measured
 * with the model: sum(m t) / sum(m^2) - 1 on a 41 x 41 pixel stamp. */
static double flux_err(const sp_moffat_field *m, double x, double y)
{
    sp_psf *mo = NULL, *tr = NULL;
    double fw, be, q, th;
    truth_at(x, y, &fw, &be, &q, &th);
    assert_int_equal(sp_psf_moffat(fw, be, q, th, 41, 1, &tr), SP_OK);
    assert_int_equal(sp_psf_alloc(41, 1, &mo), SP_OK);
    assert_int_equal(sp_moffat_field_render(m, x, y, mo), SP_OK);
    double smt = 0, smm = 0;
    for (int k = 0; k < 41 * 41; k++) {
        smt += (double)mo->data[k] * tr->data[k];
        smm += (double)mo->data[k] * mo->data[k];
    }
    sp_psf_free(&mo);
    sp_psf_free(&tr);
    return smt / smm - 1.0;
}

static void t_follows_variation(void **s)
{
    (void)s;
    field f;
    make_field(&f, 9, 5.0, -1);
    sp_moffat_field m2, m0;
    int ncut = 0;
    fit_field(&f, 2, &m2, &ncut);
    fit_field(&f, 0, &m0, NULL);
    assert_int_equal(m2.deg[0], 2);
    assert_int_equal(m2.deg[1], 1);
    assert_int_equal(m0.deg[0], 0);
    double fw_err = 0, e2max = 0, e0max = 0;
    for (int j = 0; j < 3; j++)
        for (int i = 0; i < 3; i++) {
            double x = 511.5 + 0.92 * 512 * (i - 1), y = 511.5 + 0.92 * 512 * (j - 1), fw, be, q, th, f2, b2, q2, t2;
            truth_at(x, y, &fw, &be, &q, &th);
            sp_moffat_field_at(&m2, x, y, &f2, &b2, &q2, &t2);
            fw_err = fmax(fw_err, fabs(f2 / fw - 1));
            e2max = fmax(e2max, fabs(flux_err(&m2, x, y)));
            e0max = fmax(e0max, fabs(flux_err(&m0, x, y)));
        }
    printf("band-wide Moffat, %d stars (%d used), chi2/dof %.3f: FWHM error max %.2f%% over 9 points to the "
           "corners; PSF-fit flux error max %.3f%% (degree 2) vs %.3f%% (one Moffat)\n",
           ncut, m2.nstars_used, m2.chi2dof, 100 * fw_err, 100 * e2max, 100 * e0max);
    assert_true(m2.nstars_used >= ncut - 2);
    assert_true(fw_err < 0.01);
    assert_true(e2max < 0.005);
    assert_true(e0max > 3 * e2max);
    assert_true(fabs(m2.chi2dof - 1.0) < 0.1);
    free_field(&f);
}

static void t_few_stars(void **s)
{
    (void)s;
    field f;
    make_field(&f, 3, 5.0, -1); /* 9 stars: below 12 * 3 / 3 for degree 1 */
    sp_moffat_field m;
    fit_field(&f, 2, &m, NULL);
    assert_int_equal(m.deg[0], 0);
    assert_int_equal(m.nt[0], 1);
    double fw, be, q, th, f0, b0, q0, t0;
    truth_at(511.5, 511.5, &fw, &be, &q, &th);
    sp_moffat_field_at(&m, 511.5, 511.5, &f0, &b0, &q0, &t0);
    assert_true(fabs(f0 / fw - 1) < 0.05);
    free_field(&f);
}

static void t_clip(void **s)
{
    (void)s;
    field f;
    make_field(&f, 8, 5.0, 27);
    sp_moffat_field m;
    int ncut = 0;
    fit_field(&f, 2, &m, &ncut);
    printf("one star with an unmasked neighbour: %d of %d stars kept\n", m.nstars_used, ncut);
    assert_true(m.nstars_used < ncut);
    assert_true(m.nstars_used >= ncut - 3);
    sp_moffat_field_params p;
    sp_moffat_field_params_default(&p);
    assert_int_equal(sp_moffat_field_fit(NULL, 0, &p, &m), SP_ERR_INPUT);
    sp_err_clear();
    free_field(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_follows_variation),
        cmocka_unit_test(t_few_stars),
        cmocka_unit_test(t_clip),
    };
    return cmocka_run_group_tests_name("moffat_field", tests, NULL, NULL);
}
