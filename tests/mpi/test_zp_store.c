/* test_zp_store.c — the zp stage and the end-of-run exports the way the pipeline's
 * finish phase calls them: a plan from small FITS frames (collective), the store from
 * sp_store_create (collective), catalog rows written by every rank (independent), the
 * store closed by all, then rank 0 alone runs sp_zp_calibrate_file() and
 * sp_export_run_outputs() on the file with the serial driver. Checks the ZPs against
 * the truth, /zp, MAG of every row, and that the exports exist and hold every row. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_config.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_export.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_plan.h"
#include "surveyproc/sp_store.h"
#include "surveyproc/sp_zp.h"

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[512];
static int rank, nranks;

#define NSRC 300
#define NSTAR 60
static const double ZPT[2] = {25.071, 24.962}; /* true zero points of g and r */

static double urand(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return ((double)(z >> 11) + 0.5) / 9007199254740992.0;
}

static double nrand(uint64_t *s)
{
    double u = urand(s), v = urand(s);
    return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

/* 1"/pix TAN frame centred at (150, 2), 128 x 96 pixels */
static void make_frame(const char *name, const char *filter)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    sp_fits *f = NULL;
    const long nx = 128, ny = 96;
    assert_int_equal(sp_fits_create(path, nx, ny, &f), SP_OK);
    sp_fits_write_key_string(f, "CTYPE1", "RA---TAN", NULL);
    sp_fits_write_key_string(f, "CTYPE2", "DEC--TAN", NULL);
    sp_fits_write_key_double(f, "CRPIX1", nx / 2.0 + 0.5, NULL);
    sp_fits_write_key_double(f, "CRPIX2", ny / 2.0 + 0.5, NULL);
    sp_fits_write_key_double(f, "CRVAL1", 150.0, NULL);
    sp_fits_write_key_double(f, "CRVAL2", 2.0, NULL);
    sp_fits_write_key_double(f, "CD1_1", -1.0 / 3600, NULL);
    sp_fits_write_key_double(f, "CD1_2", 0.0, NULL);
    sp_fits_write_key_double(f, "CD2_1", 0.0, NULL);
    sp_fits_write_key_double(f, "CD2_2", 1.0 / 3600, NULL);
    sp_fits_write_key_string(f, "FILTER", filter, NULL);
    sp_fits_write_key_double(f, "ZP_AUTO", 25.0, NULL);
    sp_fits_write_key_double(f, "SKYSIG", 5.0, NULL);
    sp_fits_write_key_double(f, "EGAIN", 1.5, NULL);
    float *row = calloc((size_t)nx, sizeof *row);
    for (long y = 0; y < ny; y++) sp_fits_write_rows(f, y, 1, row);
    free(row);
    assert_int_equal(sp_fits_commit(&f), SP_OK);
}

static double xs[NSRC], ys[NSRC], mref[NSTAR][2];

static int setup(void **s)
{
    (void)s;
    if (rank == 0) {
        snprintf(dir, sizeof dir, "%s", sp_test_tmpdir());
        make_frame("g.fits", "g");
        make_frame("r.fits", "r");
        char path[1024];
        snprintf(path, sizeof path, "%s/list.txt", dir);
        FILE *f = fopen(path, "w");
        fputs("g.fits\nr.fits\n", f);
        fclose(f);
        /* sources inside the crop margin; the first NSTAR at least 4" from every other source */
        uint64_t rs = 77;
        for (int i = 0; i < NSRC; i++) {
            for (int ok = 0; !ok;) {
                xs[i] = 8 + urand(&rs) * 110;
                ys[i] = 8 + urand(&rs) * 78;
                ok = 1;
                for (int j = 0; j < (i < NSTAR ? i : NSTAR) && ok; j++)
                    ok = hypot(xs[i] - xs[j], ys[i] - ys[j]) > 4.0;
            }
        }
        snprintf(path, sizeof path, "%s/cat.csv", dir);
        f = fopen(path, "w");
        fputs("ID,RA,DEC,TYPE,FLUX_g,FLUX_r\n", f);
        char rp[1024];
        snprintf(rp, sizeof rp, "%s/ref.csv", dir);
        FILE *rf = fopen(rp, "w");
        fputs("RA,DEC,mag_g,mag_r\n", rf);
        for (int i = 0; i < NSRC; i++) {
            double ra = 150.0 - (xs[i] - 63.5) / 3600.0 / cos(2.0 * M_PI / 180);
            double dec = 2.0 + (ys[i] - 47.5) / 3600.0;
            fprintf(f, "s%03d,%.10f,%.10f,STAR,100,100\n", i, ra, dec);
            if (i < NSTAR) {
                for (int b = 0; b < 2; b++) mref[i][b] = 14 + 4 * urand(&rs);
                fprintf(rf, "%.10f,%.10f,%.4f,%.4f\n", ra + 0.1 / 3600, dec, mref[i][0], mref[i][1]);
            }
        }
        fclose(f);
        fclose(rf);
    }
    MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);
    MPI_Bcast(xs, NSRC, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    MPI_Bcast(ys, NSRC, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    MPI_Bcast(mref, 2 * NSTAR, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    return 0;
}

static void t_finish_phase(void **st)
{
    (void)st;
    sp_plan_opts o;
    memset(&o, 0, sizeof o);
    snprintf(o.image_list, sizeof o.image_list, "%s/list.txt", dir);
    snprintf(o.input_catalog, sizeof o.input_catalog, "%s/cat.csv", dir);
    o.zp_ref = 25.0;
    o.crop_margin = 5;
    o.wcs_tolerance = 0.01;
    o.epsf_ngrid = 2;
    o.ngrid = 2;
    o.psf_size = 11;
    o.halo_pix_min = 8;
    o.skip_empty_cells = 1;
    o.skip_empty_patches = 1;
    o.gal_model = SP_SRC_EXP;
    o.threads = 1;
    sp_plan p;
    int stt = sp_plan_build(&o, MPI_COMM_WORLD, &p);
    if (stt) fprintf(stderr, "%s\n", sp_err_msg());
    assert_true(sp_test_all_ranks(stt == SP_OK));
    assert_int_equal(p.cat.n, NSRC);
    assert_int_equal(p.nbands, 2);

    char store[1024];
    snprintf(store, sizeof store, "%s/store.h5", dir);
    sp_store_meta meta = {.config_yaml = "", .command = "test_zp_store", .mpi_size = nranks, .threads = 1,
                          .epsf_size = 11};
    sp_store s;
    stt = sp_store_create(store, &p, &meta, MPI_COMM_WORLD, &s);
    assert_true(sp_test_all_ranks(stt == SP_OK));

    /* every rank writes its share of rows, as cells would */
    const sp_store_catalog *c = &s.cat;
    long mine = 0;
    long *idx = calloc(NSRC, sizeof *idx);
    void *rows = calloc(NSRC, c->rowsize);
    uint64_t rs = 1000 + (uint64_t)rank;
    for (long i = rank; i < NSRC; i += nranks) {
        long r = mine;
        idx[mine++] = i;
        sp_store_fill_rows(c, (char *)rows + (size_t)r * c->rowsize, 1);
        sp_store_input_row(c, &p, i, rows, r);
        sp_store_set_u8(c, rows, r, c->done, 1);
        sp_store_set_i32(c, rows, r, c->converged, 1);
        sp_store_set_f64(c, rows, r, c->ra_fit, p.cat.ra[i] + nrand(&rs) * 0.03 / 3600);
        sp_store_set_f64(c, rows, r, c->dec_fit, p.cat.dec[i] + nrand(&rs) * 0.03 / 3600);
        for (int b = 0; b < 2; b++) {
            double m = i < NSTAR ? mref[i][b] : 19 + 3 * urand(&rs);
            double f = pow(10, -0.4 * (m - ZPT[b]));
            double fe = 0.005 * f + 2;
            double fo = i % 41 == 40 ? -5.0 : f + fe * nrand(&rs);
            sp_store_set_f64(c, rows, r, c->band[b].flux_fit, fo);
            sp_store_set_f64(c, rows, r, c->band[b].fluxerr_fit, fe);
        }
    }
    stt = sp_store_write_catalog_rows(&s, idx, mine, rows);
    assert_true(sp_test_all_ranks(stt == SP_OK));
    stt = sp_store_close(&s);
    assert_true(sp_test_all_ranks(stt == SP_OK));

    /* the finish phase: rank 0 alone, serial driver */
    int ok = 1;
    if (rank == 0) {
        sp_config cfg;
        char val[1200];
        ok &= sp_config_defaults(&cfg) == SP_OK;
        snprintf(val, sizeof val, "%s/ref.csv", dir);
        ok &= sp_config_set(&cfg, "inputs.reference_catalog", val) == SP_OK;
        snprintf(val, sizeof val, "%s/export", dir);
        ok &= sp_config_set(&cfg, "outputs.export_basename", val) == SP_OK;
        ok &= sp_config_set(&cfg, "outputs.export_formats", "[fits, csv]") == SP_OK;
        sp_zp_result res;
        stt = sp_zp_calibrate_file(store, &cfg, &res);
        if (stt) fprintf(stderr, "zp: %s\n", sp_err_msg());
        ok &= stt == SP_OK;
        if (stt == SP_OK) {
            sp_zp_result_print(stdout, &res);
            ok &= res.nmatched == NSTAR;
            for (int b = 0; b < 2; b++) {
                printf("band %s: ZP %.5f truth %.5f (off %+.5f)\n", res.band[b].band, res.band[b].zp, ZPT[b],
                       res.band[b].zp - ZPT[b]);
                ok &= res.band[b].flag == 0 && fabs(res.band[b].zp - ZPT[b]) < 0.005;
                ok &= res.band[b].nselected == NSTAR - 1; /* star 40 has a negative flux */
            }
        }
        stt = sp_export_run_outputs(&cfg, store);
        if (stt) fprintf(stderr, "export: %s\n", sp_err_msg());
        ok &= stt == SP_OK;
        snprintf(val, sizeof val, "%s/export.fits", dir);
        ok &= access(val, R_OK) == 0;
        snprintf(val, sizeof val, "%s/export.csv", dir);
        FILE *f = fopen(val, "r");
        long lines = 0;
        for (int ch; f && (ch = fgetc(f)) != EOF;) lines += ch == '\n';
        if (f) fclose(f);
        ok &= lines == NSRC + 1;

        /* MAG of every row from the file */
        sp_h5 *h = NULL;
        double fl[NSRC], mg[NSRC], zp[2];
        ok &= sp_h5_open(store, 0, MPI_COMM_SELF, &h) == SP_OK;
        ok &= sp_h5_table_read_col_double(h, "/zp/bands", "zp", 0, 2, zp) == SP_OK;
        const char *fn[2] = {"FLUX_g_fit", "FLUX_r_fit"}, *mn[2] = {"MAG_g_fit", "MAG_r_fit"};
        for (int b = 0; b < 2 && ok; b++) {
            ok &= sp_h5_table_read_col_double(h, "/catalog", fn[b], 0, NSRC, fl) == SP_OK;
            ok &= sp_h5_table_read_col_double(h, "/catalog", mn[b], 0, NSRC, mg) == SP_OK;
            for (int i = 0; i < NSRC; i++)
                ok &= fl[i] > 0 ? fabs(mg[i] - (zp[b] - 2.5 * log10(fl[i]))) < 1e-12 : isnan(mg[i]);
        }
        sp_h5_close(&h);
        sp_zp_result_free(&res);
        sp_config_free(&cfg);
    }
    assert_true(sp_test_all_ranks(ok));
    free(idx);
    free(rows);
    sp_plan_free(&p);
}

int main(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    sp_test_quiet_nonroot();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_finish_phase),
    };
    int rc = cmocka_run_group_tests_name("zp_store", tests, setup, NULL);
    MPI_Finalize();
    return rc;
}
