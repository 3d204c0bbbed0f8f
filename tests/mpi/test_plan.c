/* test_plan.c — the plan at 1/2/4 ranks: frame table in file order, bands, checks with clear
 * messages, catalog projection and exclusions, grid, halo sources, identical plan on every rank. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_plan.h"

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char dir[512];
static int rank, nranks;

/* A TAN frame centred at (150, 2), 1"/pix, with the given header keys. */
static void make_frame(const char *name, long nx, long ny, const char *filter, double zp, double crpix_shift,
                       int with_skysig)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    sp_fits *f = NULL;
    assert_int_equal(sp_fits_create(path, nx, ny, &f), SP_OK);
    sp_fits_write_key_string(f, "CTYPE1", "RA---TAN", NULL);
    sp_fits_write_key_string(f, "CTYPE2", "DEC--TAN", NULL);
    sp_fits_write_key_double(f, "CRPIX1", nx / 2.0 + 0.5 + crpix_shift, NULL);
    sp_fits_write_key_double(f, "CRPIX2", ny / 2.0 + 0.5, NULL);
    sp_fits_write_key_double(f, "CRVAL1", 150.0, NULL);
    sp_fits_write_key_double(f, "CRVAL2", 2.0, NULL);
    sp_fits_write_key_double(f, "CD1_1", -1.0 / 3600, NULL);
    sp_fits_write_key_double(f, "CD1_2", 0.0, NULL);
    sp_fits_write_key_double(f, "CD2_1", 0.0, NULL);
    sp_fits_write_key_double(f, "CD2_2", 1.0 / 3600, NULL);
    if (filter) sp_fits_write_key_string(f, "FILTER", filter, NULL);
    sp_fits_write_key_double(f, "ZP_AUTO", zp, NULL);
    if (with_skysig) sp_fits_write_key_double(f, "SKYSIG", 5.0, NULL);
    sp_fits_write_key_double(f, "EGAIN", 1.5, NULL);
    float *row = malloc((size_t)nx * sizeof *row);
    for (long y = 0; y < ny; y++) {
        for (long x = 0; x < nx; x++) row[x] = (float)(100.0 + (x + y) % 7);
        sp_fits_write_rows(f, y, 1, row);
    }
    free(row);
    assert_int_equal(sp_fits_commit(&f), SP_OK);
}

static void write_text(const char *name, const char *text)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static int setup(void **s)
{
    (void)s;
    if (rank == 0) {
        snprintf(dir, sizeof dir, "%s", sp_test_tmpdir());
        make_frame("a_g.fits", 128, 96, "g", 27.0, 0, 1);
        make_frame("b_r.fits", 128, 96, "r", 26.0, 0, 1);
        make_frame("c_g.fits", 128, 96, "g", 27.5, 0, 1);
        make_frame("bad_shape.fits", 100, 96, "g", 27.0, 0, 1);
        make_frame("bad_wcs.fits", 128, 96, "g", 27.0, 3.0, 1);
        make_frame("no_skysig.fits", 128, 96, "g", 27.0, 0, 0);
        write_text("list.txt", "# frames\na_g.fits\n\nb_r.fits  # the r band\nc_g.fits\n");
        write_text("list_shape.txt", "a_g.fits\nbad_shape.fits\n");
        write_text("list_wcs.txt", "a_g.fits\nbad_wcs.fits\n");
        write_text("list_key.txt", "a_g.fits\nb_r.fits\nno_skysig.fits\n");
        write_text("list_missing.txt", "a_g.fits\nnope.fits\n");
        write_text("list_empty.txt", "# nothing\n\n");
        /* pixel (x, y) <-> RA = 150 - (x - 63.5)/3600/cos(2 deg), Dec = 2 + (y - 47.5)/3600 */
        char cat[4096] = "ID,RA,DEC,TYPE,FLUX_g,FLUX_r\n";
        const double xs[] = {10, 63.5, 120, 1, 64, 30};
        const double ys[] = {10, 47.5, 90, 1, 48, 60};
        const char *types[] = {"STAR", "EXP", "", "DEV", "gal", "star"};
        for (int i = 0; i < 6; i++) {
            double ra = 150.0 - (xs[i] - 63.5) / 3600.0 / cos(2.0 * M_PI / 180);
            double dec = 2.0 + (ys[i] - 47.5) / 3600.0;
            snprintf(cat + strlen(cat), sizeof cat - strlen(cat), "s%03d,%.10f,%.10f,%s,%g,\n", i, ra, dec, types[i],
                     100.0 * (i + 1));
        }
        strcat(cat, "sfar,151.0,2.0,STAR,1,1\n");
        write_text("cat.csv", cat);
        write_text("cat_band.csv", "RA,DEC,FLUX_z\n150.0,2.0,1\n");
        write_text("cat_dup.csv", "ID,RA,DEC\nx1,150.0,2.0\nx2,150.0,2.0\nx1,150.0,2.0\n");
        write_text("cat_empty.csv", "RA,DEC\n");
        write_text("cat_nora.csv", "ID,DEC\n1,2.0\n");
        write_text("cat_out.csv", "RA,DEC\n10.0,-30.0\n11.0,-30.0\n");
        write_text("cat_nan.csv", "ID,RA,DEC\nx1,150.0,2.0\nsnan,,2.0\nx3,nan,2.0\n");
        write_text("list_twice.txt", "a_g.fits\nb_r.fits\n./a_g.fits\n");
    }
    MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);
    return 0;
}

static sp_plan_opts opts(const char *list, const char *cat)
{
    sp_plan_opts o;
    memset(&o, 0, sizeof o);
    snprintf(o.image_list, sizeof o.image_list, "%s/%s", dir, list);
    snprintf(o.input_catalog, sizeof o.input_catalog, "%s/%s", dir, cat);
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
    return o;
}

static void t_plan_good(void **s)
{
    (void)s;
    sp_plan p;
    sp_plan_opts o = opts("list.txt", "cat.csv");
    int st = sp_plan_build(&o, MPI_COMM_WORLD, &p);
    if (st) fprintf(stderr, "%s\n", sp_err_msg());
    assert_true(sp_test_all_ranks(st == SP_OK));
    assert_int_equal(p.nframes, 3);
    assert_non_null(strstr(p.frames[0].path, "a_g.fits"));
    assert_non_null(strstr(p.frames[1].path, "b_r.fits"));
    assert_non_null(strstr(p.frames[2].path, "c_g.fits"));
    assert_int_equal(p.nbands, 2);
    assert_string_equal(p.bands[0], "g");
    assert_string_equal(p.bands[1], "r");
    assert_int_equal(p.band_nframes[0], 2);
    assert_int_equal(p.frames[2].band_index, 0);
    assert_float_equal(p.frames[0].scale, pow(10, -0.4 * 2.0), 1e-12);
    assert_float_equal(p.frames[1].median, 103.0, 1.01);
    assert_float_equal(p.pixscale, 1.0, 1e-6);
    const sp_catalog *c = &p.cat;
    assert_int_equal(c->n, 7);
    assert_float_equal(c->x[1], 63.5, 1e-6);
    assert_float_equal(c->y[1], 47.5, 1e-6);
    assert_int_equal(c->type[0], SP_SRC_STAR);
    assert_int_equal(c->type[2], SP_SRC_EXP); /* blank -> gal_model */
    assert_int_equal(c->type_given[2], 0);
    assert_int_equal(c->type[3], SP_SRC_DEV);
    assert_int_equal(c->type[5], SP_SRC_STAR);
    assert_float_equal(c->flux_init[0 * 2 + 0], 100.0, 0);
    assert_true(isnan(c->flux_init[0 * 2 + 1]));
    assert_int_equal(c->excl[0], 0);
    assert_int_equal(c->excl[3], SP_EXCL_CROP);
    assert_int_equal(c->excl[6], SP_EXCL_OUTSIDE);
    assert_string_equal(c->id[6], "sfar");
    assert_int_equal(c->line[6], 8);
    assert_int_equal(p.frames[1].list_line, 4); /* after a comment and a blank line */
    /* grid: 2x2 cells of 2x2 patches of 32x24 pixels */
    assert_int_equal(p.ncells, 4);
    assert_int_equal(p.npatches, 16);
    assert_int_equal(p.halo, 8);
    long nassigned = 0;
    for (int k = 0; k < p.npatches; k++) {
        const sp_patch *pt = &p.patches[k];
        for (long j = 0; j < pt->nsrc; j++) {
            long i = p.patch_src[pt->src0 + j];
            assert_true(lround(c->x[i]) >= pt->bx0 && lround(c->x[i]) < pt->bx1);
            assert_true(lround(c->y[i]) >= pt->by0 && lround(c->y[i]) < pt->by1);
            assert_int_equal(c->patch[i], k);
            nassigned++;
        }
    }
    assert_int_equal(nassigned, 5);
    assert_int_equal(p.nsrc_active, 5);
    /* source 1 at (63.5, 47.5) rounds to (64, 48): patch ix 2, iy 2 -> cell 3; source 4 (64, 48) too */
    assert_int_equal(c->cell[1], 3);
    /* halo: the patch of (30, 60) sees no neighbour, the patch of (64,48) holds both 1 and 4 */
    long idx[16];
    long n = sp_plan_patch_sources(&p, c->patch[1], idx, 16);
    assert_int_equal(n, 2);
    /* patch (1,2): base x [32,64) y [48,72), ROI x [24,72) y [40,80): no base source, but (64,48) x2 and
     * (30,60) from its neighbours are halo sources */
    int left = -1;
    for (int k = 0; k < p.npatches; k++)
        if (p.patches[k].ix == 1 && p.patches[k].iy == 2) left = k;
    n = sp_plan_patch_sources(&p, left, idx, 16);
    assert_int_equal(p.patches[left].nsrc, 0);
    assert_int_equal(n, 3);
    /* sources whose light reaches a ROI are modelled: patch (1,1) (ROI x [24,72) y [16,56),
     * grown by outer = 6 px) also sees (30, 60), 4 px beyond its ROI; the patch of (10, 10)
     * also models the crop-excluded source at (1, 1) in its base region, after its base source */
    assert_int_equal(p.outer, 6);
    int p11 = -1;
    for (int k = 0; k < p.npatches; k++)
        if (p.patches[k].ix == 1 && p.patches[k].iy == 1) p11 = k;
    n = sp_plan_patch_sources(&p, p11, idx, 16);
    assert_int_equal(n, 3);
    int seen5 = 0;
    for (long k = 0; k < n; k++) seen5 |= idx[k] == 5;
    assert_true(seen5);
    n = sp_plan_patch_sources(&p, c->patch[0], idx, 16);
    assert_int_equal(p.patches[c->patch[0]].nsrc, 1);
    assert_int_equal(p.patches[c->patch[0]].nxsrc, 1);
    assert_int_equal(n, 2);
    assert_int_equal(idx[0], 0);
    assert_int_equal(idx[1], 3);
    assert_int_equal(c->patch[3], -1); /* still excluded: no /catalog fit, no patch of its own */
    /* every rank built the same plan */
    uint64_t h = p.inputs_hash, h0 = h;
    MPI_Bcast(&h0, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    assert_true(sp_test_all_ranks(h == h0));
    assert_true(p.max_cell_mem > 0);
    /* memory model: every thread holds a workspace reserved for the largest patch */
    const sp_fit_reserve *z = &p.fit_reserve;
    assert_int_equal(z->nbands, p.nbands);
    size_t maxroi = 0;
    long maxbase = 0;
    for (int k = 0; k < p.npatches; k++) {
        const sp_patch *pt = &p.patches[k];
        if (!pt->active || pt->nsrc == 0) continue;
        size_t roi = (size_t)(pt->rx1 - pt->rx0) * (size_t)(pt->ry1 - pt->ry0) * p.nbands;
        if (roi > maxroi) maxroi = roi;
        if (pt->nsrc > maxbase) maxbase = pt->nsrc;
    }
    assert_int_equal(z->pixels, maxroi);
    assert_true(z->nsrc >= maxbase && z->box_pixels > 0 && z->model_pixels >= 3 * z->box_pixels);
    assert_true(z->group_n >= 1 && z->comp_n >= z->group_n);
    assert_true(p.fit_thread_mem >= (double)sp_fit_reserve_bytes(z));
    const sp_cell *c0 = NULL;
    for (int k = 0; k < p.ncells; k++)
        if (p.cells[k].active) c0 = &p.cells[k];
    assert_non_null(c0);
    assert_float_equal(sp_plan_cell_memory(&p, c0, 3) - sp_plan_cell_memory(&p, c0, 1), 2 * p.fit_thread_mem, 1.0);
    sp_plan_free(&p);
}

static void expect_fail(const char *list, const char *cat, int code, const char *needle1, const char *needle2)
{
    sp_plan p;
    sp_plan_opts o = opts(list, cat);
    int st = sp_plan_build(&o, MPI_COMM_WORLD, &p);
    if (st != code || !strstr(sp_err_msg(), needle1) || (needle2 && !strstr(sp_err_msg(), needle2)))
        fprintf(stderr, "rank %d: got status %d: %s\n", rank, st, sp_err_msg());
    assert_true(sp_test_all_ranks(st == code));
    assert_true(sp_test_all_ranks(strstr(sp_err_msg(), needle1) != NULL));
    if (needle2) assert_true(sp_test_all_ranks(strstr(sp_err_msg(), needle2) != NULL));
    sp_plan_free(&p);
}

static void t_plan_bad_inputs(void **s)
{
    (void)s;
    expect_fail("list_shape.txt", "cat.csv", SP_ERR_INPUT, "bad_shape.fits", "shape");
    expect_fail("list_wcs.txt", "cat.csv", SP_ERR_INPUT, "bad_wcs.fits", "wcs_tolerance");
    expect_fail("list_key.txt", "cat.csv", SP_ERR_INPUT, "no_skysig.fits", "SKYSIG");
    expect_fail("list_missing.txt", "cat.csv", SP_ERR_IO, "nope.fits", NULL);
    expect_fail("list_empty.txt", "cat.csv", SP_ERR_INPUT, "list_empty.txt", "no image paths");
    expect_fail("no_such_list.txt", "cat.csv", SP_ERR_IO, "no_such_list.txt", NULL);
    expect_fail("list.txt", "cat_band.csv", SP_ERR_INPUT, "FLUX_z", "band 'z'");
    expect_fail("list.txt", "cat_dup.csv", SP_ERR_INPUT, "cat_dup.csv:4", "duplicate ID 'x1'");
    expect_fail("list.txt", "cat_empty.csv", SP_ERR_INPUT, "cat_empty.csv", "no rows");
    expect_fail("list.txt", "cat_nora.csv", SP_ERR_INPUT, "cat_nora.csv", "RA and DEC");
    expect_fail("list.txt", "cat_out.csv", SP_ERR_INPUT, "cat_out.csv", "none of the 2 sources");
    /* DESIGN §8: a source without a position is refused, naming the first bad line and the rest */
    expect_fail("list.txt", "cat_nan.csv", SP_ERR_INPUT, "cat_nan.csv:3: source 'snan'", "lines 3, 4");
    expect_fail("list_twice.txt", "cat.csv", SP_ERR_INPUT, "list_twice.txt:3:", "same file as line 1");
    expect_fail("list_key.txt", "cat.csv", SP_ERR_INPUT, "list_key.txt:3:", "every frame needs SKYSIG");
}

int main(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    sp_test_quiet_nonroot();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_plan_good),
        cmocka_unit_test(t_plan_bad_inputs),
    };
    int rc = cmocka_run_group_tests_name("plan", tests, setup, NULL);
    MPI_Finalize();
    return rc;
}
