/* test_fit_memory.c — the fit engine's memory accounting, which the resource
 * planner builds on (docs/performance.md, "Memory: what the planner counts"):
 *   sp_fit_group_doubles against the accumulator layout written out by hand;
 *   sp_fit_workspace_reserve allocates what sp_fit_reserve_bytes says, and the
 *   pages are resident at once (a reservation that stayed virtual would not be
 *   what the planner counts);
 *   a patch that fits within its reservation does not grow the workspace, and
 *   one without a reservation grows it on demand. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fit.h"
#include "surveyproc/sp_psf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void t_group_doubles(void **s)
{
    (void)s;
    /* per band: D and L (n x n), y, c, f (n), B (nth x n), A (nth x nth), z and cz (nth) */
    assert_int_equal(sp_fit_group_doubles(3, 6, 2), 2 * (2 * 9 + 3 * 3 + 6 * 3 + 36 + 2 * 6));
    assert_int_equal(sp_fit_group_doubles(1, 0, 1), 2 + 3);
    assert_int_equal(sp_fit_group_doubles(0, 0, 4), 0);
    /* quadratic in the group: a 100-source group of galaxies over 32 bands is ~80 MiB */
    size_t big = sp_fit_group_doubles(100, 500, 32);
    assert_true(big * 8 > (size_t)70 << 20 && big * 8 < (size_t)90 << 20);
    assert_true(sp_fit_group_doubles(50, 100, 6) < sp_fit_group_doubles(100, 200, 6));
}

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &size, &res) != 2) res = -1;
    fclose(f);
    return res < 0 ? -1 : res * 4;
}

static void t_reserve_bytes_resident(void **s)
{
    (void)s;
    sp_fit_reserve r = {.pixels = 3 * 200 * 200, .nimg = 3, .nbands = 3, .nsrc = 150,
                        .box_pixels = 150 * 3 * 400, .model_pixels = 150 * 3 * 400 * 4,
                        .group_n = 60, .group_nth = 200, .comp_n = 120};
    size_t want = sp_fit_reserve_bytes(&r);
    assert_true(want > (size_t)20 << 20); /* the case is large enough to see in the RSS */
    sp_fit_workspace *ws = NULL;
    assert_int_equal(sp_fit_workspace_create(0, 0, 3, &ws), SP_OK);
    long before = rss_kib();
    assert_int_equal(sp_fit_workspace_reserve(ws, &r), SP_OK);
    long after = rss_kib();
    size_t held = sp_fit_workspace_bytes(ws);
    /* what the planner is told is what the workspace holds (within 1%) */
    assert_true(fabs((double)held - (double)want) < 0.01 * (double)want);
    /* and it is resident now, not when a patch first touches it */
    if (before > 0 && after > 0) {
        double grew = (after - before) * 1024.0;
        printf("reserve: %.2f MiB asked, RSS +%.2f MiB\n", want / 1048576.0, grew / 1048576.0);
        assert_true(grew > 0.9 * (double)want);
    } else {
        printf("reserve: /proc/self/statm unreadable, residency not checked\n");
    }
    /* a second reservation of the same sizes allocates nothing more */
    assert_int_equal(sp_fit_workspace_reserve(ws, &r), SP_OK);
    assert_int_equal(sp_fit_workspace_bytes(ws), held);
    sp_fit_workspace_free(&ws);
    assert_null(ws);
    assert_int_equal(sp_fit_workspace_bytes(NULL), 0);
    assert_int_equal(sp_fit_reserve_bytes(NULL), 0);
    assert_int_not_equal(sp_fit_workspace_reserve(NULL, &r), SP_OK);
}

/* A patch of stars and galaxies in two bands. */
enum { N = 64, NB = 2, NS = 12 };
static float g_data[NB][N * N], g_ivar[N * N];

static void patch_inputs(sp_psf *psf, sp_fit_image *im, sp_fit_source *src)
{
    uint64_t st = 12345;
    for (int k = 0; k < NS; k++) {
        memset(&src[k], 0, sizeof src[k]);
        st = st * 6364136223846793005ULL + 1442695040888963407ULL;
        src[k].type = k % 3 ? SP_SRC_STAR : SP_SRC_EXP;
        src[k].x = 8 + (double)(st >> 40) / (double)(1ULL << 24) * (N - 16);
        src[k].y = 8 + (double)((st >> 16) & 0xffffff) / (double)(1ULL << 24) * (N - 16);
        for (int b = 0; b < NB; b++) src[k].flux[b] = 500.0 * (1 + k);
        src[k].re = 2.0;
        src[k].q = 0.8;
        src[k].id = k;
    }
    for (int q = 0; q < N * N; q++) {
        for (int b = 0; b < NB; b++) g_data[b][q] = (float)(0.3 * ((q * 7919 + b * 104729) % 13 - 6));
        g_ivar[q] = 1.0f;
    }
    for (int b = 0; b < NB; b++) {
        sp_fit_image_aligned(&im[b], 0, 0, N, N);
        im[b].data = g_data[b];
        im[b].ivar = g_ivar;
        im[b].psf = psf;
        im[b].band = b;
    }
}

static void t_reserved_patch_does_not_grow(void **s)
{
    (void)s;
    sp_psf *psf = NULL;
    assert_int_equal(sp_psf_moffat(3.0, 3.0, 1.0, 0.0, 2 * 12 * 2 + 1, 2, &psf), SP_OK);
    sp_fit_image im[NB];
    static sp_fit_source src[NS];
    static sp_fit_result res[NS];
    patch_inputs(psf, im, src);
    sp_fit_options o;
    sp_fit_options_default(&o);
    /* generous sizes: every box at the cap (2 box_max_half + 1)^2, all sources one group */
    size_t box = (size_t)(2 * o.box_max_half + 1) * (2 * o.box_max_half + 1);
    if (box > (size_t)N * N) box = (size_t)N * N;
    sp_fit_reserve r = {.pixels = (size_t)NB * N * N, .nimg = NB, .nbands = NB, .nsrc = NS,
                        .box_pixels = box * NS * NB, .model_pixels = box * NS * NB * 7,
                        .group_n = NS, .group_nth = 6 * NS, .comp_n = NS};
    sp_fit_workspace *ws = NULL, *grown = NULL;
    assert_int_equal(sp_fit_workspace_create(0, 0, NB, &ws), SP_OK);
    assert_int_equal(sp_fit_workspace_reserve(ws, &r), SP_OK);
    size_t held = sp_fit_workspace_bytes(ws);
    assert_int_equal(sp_fit_patch(ws, &o, im, NB, NB, src, NS, res, NULL, NULL), SP_OK);
    /* the PSF cache (radial profile) and the mixture fit's scratch are not part of a
     * reservation (~0.2 MiB): allow them */
    size_t after = sp_fit_workspace_bytes(ws);
    printf("reserved %.3f MiB, after the patch %.3f MiB\n", held / 1048576.0, after / 1048576.0);
    assert_true(after >= held && after - held < 512 * 1024);
    /* without a reservation the same patch grows the workspace from nothing */
    assert_int_equal(sp_fit_workspace_create(0, 0, NB, &grown), SP_OK);
    size_t empty = sp_fit_workspace_bytes(grown);
    assert_int_equal(sp_fit_patch(grown, &o, im, NB, NB, src, NS, res, NULL, NULL), SP_OK);
    assert_true(sp_fit_workspace_bytes(grown) > empty + (size_t)NB * N * N * 5 * sizeof(double));
    sp_fit_workspace_free(&ws);
    sp_fit_workspace_free(&grown);
    sp_psf_free(&psf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_group_doubles),
        cmocka_unit_test(t_reserve_bytes_resident),
        cmocka_unit_test(t_reserved_patch_does_not_grow),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
