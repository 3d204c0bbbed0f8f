/* sim_write.c — writing a simulation: frames streamed per band per block of
 * rows, catalogs, the true PSF, and the pipeline config.
 *
 * Streaming: sources are sorted by their nearest row. For block k (rows
 * [kH, kH+H)) every source centred in it is rendered whole, in parallel, into
 * a rolling accumulator covering rows [kH - L, kH + H + L), L = the largest
 * stamp half-size. Rows below kH + H - L can receive no more light, so they
 * get noise and go to disk; the accumulator then slides by H. Memory per band
 * is nx * (H + 2L) * 8 bytes plus one block of floats per frame.
 *
 * Determinism: light is added in 64-bit fixed point (2^-24 flux units) with
 * atomic adds — integer sums are exact in any order — and each pixel's noise
 * comes from its own Philox stream (frame, pixel index).
 */
#include "sim_private.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_wcs.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- small file helpers --------------------------------------------------- */

static int mkdir_p(const char *path)
{
    int status = SP_OK;
    char *p = strdup(path);
    SP_CHECK(p, SP_ERR_NOMEM, "out of memory");
    for (char *q = p + 1; *q; q++) {
        if (*q != '/') continue;
        *q = '\0';
        if (mkdir(p, 0777) != 0 && errno != EEXIST) {
            status = SP_FAIL(SP_ERR_IO, "%s: cannot create folder: %s", p, strerror(errno));
            goto cleanup;
        }
        *q = '/';
    }
    SP_CHECK(mkdir(p, 0777) == 0 || errno == EEXIST, SP_ERR_IO, "%s: cannot create folder: %s", p, strerror(errno));
    struct stat st;
    SP_CHECK(stat(p, &st) == 0 && S_ISDIR(st.st_mode), SP_ERR_IO, "%s: exists and is not a folder", p);
cleanup:
    free(p);
    return status;
}

/* Text outputs go to "path.tmp-PID" and are renamed into place when complete. */
typedef struct {
    FILE *f;
    char *path, *tmp;
} tfile;

static int tfile_open(tfile *t, const char *dir, const char *name)
{
    int status = SP_OK;
    memset(t, 0, sizeof *t);
    t->path = sim_join(dir, name);
    SP_CHECK(t->path, SP_ERR_NOMEM, "out of memory");
    size_t n = strlen(t->path) + 32;
    t->tmp = malloc(n);
    SP_CHECK(t->tmp, SP_ERR_NOMEM, "out of memory");
    snprintf(t->tmp, n, "%s.tmp-%ld", t->path, (long)getpid());
    t->f = fopen(t->tmp, "w");
    SP_CHECK(t->f, SP_ERR_IO, "%s: cannot create: %s", t->tmp, strerror(errno));
cleanup:
    return status;
}

static void tfile_abort(tfile *t)
{
    if (t->f) fclose(t->f);
    if (t->tmp) unlink(t->tmp);
    free(t->path);
    free(t->tmp);
    memset(t, 0, sizeof *t);
}

static int tfile_commit(tfile *t)
{
    int status = SP_OK;
    int bad = ferror(t->f);
    bad |= fclose(t->f) != 0;
    t->f = NULL;
    SP_CHECK(!bad, SP_ERR_IO, "%s: write failed (disk full?): %s", t->path, strerror(errno));
    SP_CHECK(rename(t->tmp, t->path) == 0, SP_ERR_IO, "%s: cannot move into place: %s", t->path, strerror(errno));
    free(t->tmp);
    t->tmp = NULL;
cleanup:
    tfile_abort(t);
    return status;
}

/* ---- frames ----------------------------------------------------------------- */

static int frame_headers(const sp_sim *s, const sp_sim_frame *f, sp_fits *fh)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    char obj[64];
    snprintf(obj, sizeof obj, "SIM-%s-%llu", c->preset, (unsigned long long)c->seed);
    SP_TRY(sp_fits_write_key_string(fh, "FILTER", s->band[f->band].name, "band"));
    SP_TRY(sp_fits_write_key_double(fh, "ZP_AUTO", f->zp_header, "AB zero point: mag = ZP_AUTO - 2.5 log10(ADU)"));
    SP_TRY(sp_fits_write_key_double(fh, "ZP_TRUE", f->zp, "true AB zero point of the simulation"));
    SP_TRY(sp_fits_write_key_double(fh, "SKYSIG", f->skysig, "sky noise sigma at the mean sky (ADU)"));
    SP_TRY(sp_fits_write_key_double(fh, "EGAIN", f->egain, "electrons per ADU"));
    SP_TRY(sp_fits_write_key_double(fh, "SATURATE", f->saturate, "pixels are clipped at this level (ADU)"));
    SP_TRY(sp_fits_write_key_double(fh, "EXPTIME", f->exptime, "exposure time (s)"));
    SP_TRY(sp_fits_write_key_string(fh, "BUNIT", "ADU", "pixel unit"));
    SP_TRY(sp_fits_write_key_string(fh, "TELESCOP", "7DT-SIM", "surveyproc simulate"));
    SP_TRY(sp_fits_write_key_string(fh, "OBJECT", obj, "simulated tile"));
    SP_TRY(sp_fits_write_key_long(fh, "SIMFRAME", f->index, "frame index within the band"));
    SP_TRY(sp_fits_write_key_double(fh, "RDNOISE", f->read_noise, "read noise (electrons)"));
    SP_TRY(sp_fits_write_key_double(fh, "SKYLEVEL", f->sky_adu, "mean true sky (ADU)"));
    SP_TRY(sp_fits_write_key_long(fh, "SKYSUB", c->sky_subtracted, "1: sky subtracted, a residual remains"));
    SP_TRY(sp_fits_write_cards(fh, s->wcs_cards, s->wcs_ncards));
cleanup:
    return status;
}

/* Lower bound of v in a[0..n). */
static long lower_bound(const long *a, long n, long v)
{
    long lo = 0, hi = n;
    while (lo < hi) {
        long mid = (lo + hi) / 2;
        if (a[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Noise, background, clipping and defects of rows [y0, y1) of frame f from
 * the accumulator rows starting at acc (tile row y0 is acc row 0). */
static void frame_rows(const sp_sim *s, const sp_sim_frame *f, const int64_t *acc, long y0, long y1, float *out)
{
    const sp_sim_config *c = &s->cfg;
    long nx = c->nx;
    double fscale = pow(10.0, 0.4 * (f->zp - SP_SIM_ZP_REF)) / SIM_FIX_SCALE;
    double g = f->egain, rn = f->read_noise;
    sim_zig_init();
#pragma omp parallel for schedule(static)
    for (long y = y0; y < y1; y++) {
        const int64_t *arow = acc + (size_t)(y - y0) * nx;
        float *orow = out + (size_t)(y - y0) * nx;
        double u, v;
        sim_uv(s, 0, (double)y, &u, &v);
        double du = 1.0 / (0.5 * nx);
        for (long x = 0; x < nx; x++) {
            double ux = u + x * du;
            double sig = (double)arow[x] * fscale;
            double sky = f->sky_adu * sim_sky_rel(f, ux, v);
            double val;
            if (c->noise) {
                sim_rng r;
                sim_rng_init(&r, c->seed, SIM_D_NOISE, (uint32_t)f->id, (uint64_t)y * (uint64_t)nx + (uint64_t)x);
                double z = sim_rng_gauss(&r);
                double lam = (sig + sky) * g;
                val = (sim_poisson(lam > 0 ? lam : 0, &r) + rn * z) / g;
            } else {
                val = sig + sky;
            }
            if (c->sky_subtracted) val += sim_resid(f, ux, v) - sky;
            if (val > f->saturate) val = f->saturate; /* clipped, no bleeding */
            orow[x] = (float)val;
        }
        for (int i = 0; i < f->n_badcol; i++)
            if (y >= f->badcol[3 * i + 1] && y <= f->badcol[3 * i + 2]) orow[f->badcol[3 * i]] = NAN;
        long k = lower_bound(f->nan_pix, f->n_nan, y * nx);
        for (; k < f->n_nan && f->nan_pix[k] < (y + 1) * nx; k++) orow[f->nan_pix[k] - y * nx] = NAN;
    }
}

typedef struct {
    int status;
    char msg[512];
} shared_err;

static int write_band(const sp_sim *s, const char *dir, int b, sp_sim_stats *st, sp_progress *prog, long *done)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    int fpb = c->frames_per_band, nb = s->nbands, nthr = omp_get_max_threads();
    long nx = c->nx, ny = c->ny, lag = s->lag;
    long H = c->block_rows > lag ? c->block_rows : lag;
    long nbuf = H + 2 * lag, smax = (2 * lag + 1) * (2 * lag + 1);
    int64_t *acc = NULL;
    float *out = NULL;
    sp_fits **fh = NULL;
    double **stamp = NULL;
    sp_sim_ws **ws = NULL;
    char *path = NULL;
    shared_err err = {SP_OK, ""};

    SP_ALLOC(acc, nbuf * nx);
    SP_ALLOC(out, H * nx);
    SP_ALLOC(fh, fpb);
    SP_ALLOC(stamp, nthr);
    SP_ALLOC(ws, nthr);
    for (int t = 0; t < nthr; t++) {
        SP_ALLOC(stamp[t], smax);
        SP_TRY(sp_sim_ws_create(&ws[t]));
    }
    for (int k = 0; k < fpb; k++) {
        const sp_sim_frame *f = &s->frame[b * fpb + k];
        free(path);
        path = sim_join(dir, f->file);
        SP_CHECK(path, SP_ERR_NOMEM, "out of memory");
        SP_TRY(sp_fits_create(path, nx, ny, &fh[k]));
        SP_TRY(frame_headers(s, f, fh[k]));
    }

    long nblk = (ny + H - 1) / H, next = 0;
    for (long k = 0; k <= nblk; k++) {
        long base = k * H - lag;
        double t0 = sp_wtime();
        if (k < nblk) {
            long i0 = next, i1 = next;
            while (i1 < s->nsrc && lround(s->src[s->order[i1]].y) < (k + 1) * H) i1++;
            next = i1;
#pragma omp parallel for schedule(dynamic, 2)
            for (long i = i0; i < i1; i++) {
                int t = omp_get_thread_num();
                int failed;
#pragma omp atomic read
                failed = err.status;
                if (failed) continue;
                long idx = s->order[i];
                const sp_sim_source *src = &s->src[idx];
                double flux = s->flux[idx * nb + b];
                if (!(flux > 0)) continue;
                long ix, iy, h;
                int rc = sim_render_source(s, src, b, &ix, &iy, &h, stamp[t], ws[t]);
                if (rc != SP_OK) {
#pragma omp critical(sp_sim_err)
                    if (!err.status) {
                        snprintf(err.msg, sizeof err.msg, "source %ld: %s", src->id, sp_err_msg());
#pragma omp atomic write
                        err.status = rc;
                    }
                    continue;
                }
                long w = 2 * h + 1;
                double scale = flux * SIM_FIX_SCALE;
                for (long sy = 0; sy < w; sy++) {
                    long ty = iy - h + sy;
                    if (ty < 0 || ty >= ny) continue;
                    int64_t *arow = acc + (size_t)(ty - base) * nx;
                    const double *srow = stamp[t] + sy * w;
                    for (long sx = 0; sx < w; sx++) {
                        long tx = ix - h + sx;
                        if (tx < 0 || tx >= nx) continue;
                        int64_t q = (int64_t)llrint(srow[sx] * scale);
                        if (q) {
#pragma omp atomic update
                            arow[tx] += q;
                        }
                    }
                }
            }
            if (err.status) {
                status = SP_FAIL(err.status, "simulating band %s: %s", s->band[b].name, err.msg);
                goto cleanup;
            }
        }
        double t1 = sp_wtime();
        st->render_seconds += t1 - t0;
        /* rows [kH - lag, kH + H - lag) are complete */
        long r0 = base > 0 ? base : 0, r1 = base + H < ny ? base + H : ny;
        if (r1 > r0) {
            for (int f = 0; f < fpb; f++) {
                double t2 = sp_wtime();
                frame_rows(s, &s->frame[b * fpb + f], acc + (size_t)(r0 - base) * nx, r0, r1, out);
                double t3 = sp_wtime();
                SP_TRY(sp_fits_write_rows(fh[f], r0, r1 - r0, out));
                st->noise_seconds += t3 - t2;
                st->io_seconds += sp_wtime() - t3;
            }
        }
        memmove(acc, acc + (size_t)H * nx, sizeof(int64_t) * (size_t)(2 * lag) * nx);
        memset(acc + (size_t)(2 * lag) * nx, 0, sizeof(int64_t) * (size_t)H * nx);
        if (prog) sp_progress_update(prog, ++*done);
    }
    for (int k = 0; k < fpb; k++) {
        double t0 = sp_wtime();
        SP_TRY(sp_fits_commit(&fh[k]));
        st->io_seconds += sp_wtime() - t0;
    }
    st->nframes += fpb;
    st->mpix += fpb * (double)nx * (double)ny / 1e6;
    st->mbytes += fpb * (double)nx * (double)ny * 4.0 / 1e6;
cleanup:
    for (int k = 0; fh && k < fpb; k++)
        if (fh[k]) sp_fits_abort(&fh[k]);
    for (int t = 0; t < nthr; t++) {
        if (stamp) free(stamp[t]);
        if (ws) sp_sim_ws_free(&ws[t]);
    }
    free(stamp);
    free(ws);
    free(fh);
    free(acc);
    free(out);
    free(path);
    return status;
}

/* ---- catalogs --------------------------------------------------------------- */

static const char *type_name(sp_sim_type t) { return t == SP_SIM_STAR ? "STAR" : t == SP_SIM_EXP ? "EXP" : "DEV"; }

/* SExtractor-style angle: degrees in (-90, 90]. */
static double theta_deg(double th)
{
    double d = fmod(th * 180.0 / M_PI, 180.0);
    if (d <= -90) d += 180;
    if (d > 90) d -= 180;
    return d;
}

static int write_truth(const sp_sim *s, const char *dir)
{
    int status = SP_OK;
    tfile t;
    SP_TRY(tfile_open(&t, dir, "truth.csv"));
    int nb = s->nbands;
    fprintf(t.f, "id,type,x,y,ra,dec");
    for (int b = 0; b < nb; b++) fprintf(t.f, ",flux_%s", s->band[b].name);
    fprintf(t.f, ",re,q,theta,flags,cluster\n");
    for (long i = 0; i < s->nsrc; i++) {
        const sp_sim_source *src = &s->src[i];
        fprintf(t.f, "%ld,%s,%.6f,%.6f,%.10f,%.10f", src->id, type_name(src->type), src->x, src->y, src->ra,
                src->dec);
        for (int b = 0; b < nb; b++) fprintf(t.f, ",%.10g", s->flux[i * nb + b]);
        fprintf(t.f, ",%.6f,%.6f,%.4f,%u,%d\n", src->re, src->q, theta_deg(src->theta), src->flags, src->cluster);
    }
    SP_TRY(tfile_commit(&t));
cleanup:
    tfile_abort(&t);
    return status;
}

static int write_input_catalog(const sp_sim *s, const char *dir)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    tfile t = {0};
    double *x = NULL, *y = NULL, *ra = NULL, *dec = NULL;
    long n = s->nsrc, nbad = 0;
    int nb = s->nbands;
    SP_ALLOC(x, n);
    SP_ALLOC(y, n);
    SP_ALLOC(ra, n);
    SP_ALLOC(dec, n);
    for (long i = 0; i < n; i++) {
        sim_rng r;
        sim_rng_init(&r, c->seed, SIM_D_CATALOG, 0, (uint64_t)i);
        x[i] = s->src[i].x + c->pos_perturb * sim_rng_normal(&r);
        y[i] = s->src[i].y + c->pos_perturb * sim_rng_normal(&r);
    }
    if (n > 0) SP_TRY(sp_wcs_pix2sky(s->wcs, n, x, y, ra, dec, &nbad));
    SP_TRY(tfile_open(&t, dir, "input_catalog.csv"));
    fprintf(t.f, "ID,RA,DEC,TYPE");
    for (int b = 0; b < nb; b++) fprintf(t.f, ",FLUX_%s", s->band[b].name);
    fprintf(t.f, ",ELL,THETA,Re\n");
    for (long i = 0; i < n; i++) {
        const sp_sim_source *src = &s->src[i];
        sim_rng r;
        sim_rng_init(&r, c->seed, SIM_D_CATALOG, 1, (uint64_t)i);
        const char *ty = sim_rng_uniform(&r) < c->type_blank_fraction ? "" : type_name(src->type);
        fprintf(t.f, "%ld,%.10f,%.10f,%s", src->id, ra[i], dec[i], ty);
        for (int b = 0; b < nb; b++)
            fprintf(t.f, ",%.6g", s->flux[i * nb + b] * exp(c->flux_perturb * sim_rng_normal(&r)));
        if (src->type == SP_SIM_STAR) {
            fprintf(t.f, ",,,\n");
        } else {
            double ell = fmin(fmax((1.0 - src->q) * exp(c->shape_perturb * sim_rng_normal(&r)), 0.0), 0.9);
            double th = theta_deg(src->theta + c->shape_perturb * (M_PI / 4) * sim_rng_normal(&r));
            double re = src->re * exp(c->shape_perturb * sim_rng_normal(&r));
            fprintf(t.f, ",%.4f,%.3f,%.4f\n", ell, th, re);
        }
    }
    SP_TRY(tfile_commit(&t));
cleanup:
    tfile_abort(&t);
    free(x);
    free(y);
    free(ra);
    free(dec);
    return status;
}

static int write_reference(const sp_sim *s, const char *dir)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    tfile t;
    int nb = s->nbands;
    int rb = 0;
    for (int b = 1; b < nb; b++)
        if (fabs(s->band[b].lambda_nm - 625) < fabs(s->band[rb].lambda_nm - 625)) rb = b;
    SP_TRY(tfile_open(&t, dir, "reference_catalog.csv"));
    fprintf(t.f, "RA,DEC");
    for (int b = 0; b < nb; b++) fprintf(t.f, ",mag_%s", s->band[b].name);
    fprintf(t.f, "\n");
    const unsigned veto = SP_SIM_F_SATURATED | SP_SIM_F_BAD_PIXELS | SP_SIM_F_EDGE | SP_SIM_F_CROWDED |
                          SP_SIM_F_FORCED_BRIGHT;
    for (long i = 0; i < s->nsrc; i++) {
        const sp_sim_source *src = &s->src[i];
        if (src->type != SP_SIM_STAR || (src->flags & veto)) continue;
        double mref = SP_SIM_ZP_REF - 2.5 * log10(s->flux[i * nb + rb]);
        if (mref > c->ref_mag_max) continue;
        int ok = 1;
        for (int b = 0; b < nb; b++) ok &= SP_SIM_ZP_REF - 2.5 * log10(s->flux[i * nb + b]) >= c->ref_mag_min;
        if (!ok) continue;
        sim_rng r;
        sim_rng_init(&r, c->seed, SIM_D_REF, 0, (uint64_t)i);
        fprintf(t.f, "%.10f,%.10f", src->ra, src->dec);
        for (int b = 0; b < nb; b++)
            fprintf(t.f, ",%.5f",
                    SP_SIM_ZP_REF - 2.5 * log10(s->flux[i * nb + b]) + c->ref_mag_noise * sim_rng_normal(&r));
        fprintf(t.f, "\n");
    }
    SP_TRY(tfile_commit(&t));
cleanup:
    tfile_abort(&t);
    return status;
}

/* ---- true PSF ------------------------------------------------------------- */

static double grid_pos(long n, int ng, int i) { return (i + 0.5) * (double)n / ng - 0.5; }

static int write_truth_psf(const sp_sim *s, const char *dir)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    int ng = c->truth_psf_ngrid;
    int os = c->truth_psf_oversamp > 0 ? c->truth_psf_oversamp : 1;
    long hs = (long)ceil(c->psf_radius), S = 2 * hs * os + 1; /* samples per side */
    double *stamp = NULL;
    float *mosaic = NULL;
    char *path = NULL, name[64];
    sp_fits *fh = NULL;
    tfile t = {0};
    SP_ALLOC(stamp, S * S);
    SP_ALLOC(mosaic, S * S * ng * ng);
    for (int b = 0; b < s->nbands; b++) {
        for (int gj = 0; gj < ng; gj++)
            for (int gi = 0; gi < ng; gi++) {
                sp_sim_psf p;
                sp_sim_psf_params(s, b, grid_pos(c->nx, ng, gi), grid_pos(c->ny, ng, gj), &p);
                if (os == 1)
                    SP_TRY(sp_sim_render_psf(&p, 0, 0, (int)S, 1, stamp));
                else /* the effective PSF at offsets of 1/os pixel (the sp_psf.h convention) */
                    SP_TRY(sp_sim_render_epsf(&p, (int)S, os, stamp));
                for (long j = 0; j < S; j++)
                    for (long i = 0; i < S; i++)
                        mosaic[(size_t)(gj * S + j) * (size_t)(ng * S) + (size_t)(gi * S + i)] =
                            (float)stamp[j * S + i];
            }
        snprintf(name, sizeof name, "truth_psf/%s.fits", s->band[b].name);
        free(path);
        path = sim_join(dir, name);
        SP_CHECK(path, SP_ERR_NOMEM, "out of memory");
        SP_TRY(sp_fits_create(path, ng * S, ng * S, &fh));
        SP_TRY(sp_fits_write_key_string(fh, "FILTER", s->band[b].name, "band"));
        SP_TRY(sp_fits_write_key_long(fh, "PSFNGRID", ng, "stamps per side; stamp (i,j) = PSF at grid node (i,j)"));
        SP_TRY(sp_fits_write_key_long(fh, "PSFSIZE", S, "stamp side (samples, PSF centred on the middle one)"));
        SP_TRY(sp_fits_write_key_long(fh, "PSFOVERS", os, "samples per image pixel (offset (i - c) / PSFOVERS)"));
        SP_TRY(sp_fits_write_key_long(fh, "TILENX", c->nx, "node x = (i + 0.5) * TILENX / PSFNGRID - 0.5"));
        SP_TRY(sp_fits_write_key_long(fh, "TILENY", c->ny, "node y = (j + 0.5) * TILENY / PSFNGRID - 0.5"));
        SP_TRY(sp_fits_write_key_double(fh, "PSFRAD", c->psf_radius, "profile tapered to 0 here (pixels)"));
        SP_TRY(sp_fits_write_rows(fh, 0, ng * S, mosaic));
        SP_TRY(sp_fits_commit(&fh));
    }
    /* the description: enough to re-render with sp_sim_load(DIR) or by hand */
    SP_TRY(tfile_open(&t, dir, "truth_psf.yaml"));
    FILE *f = t.f;
    fprintf(f, "# True PSF of this simulation. Exact re-rendering: sp_sim_load(\"DIR\") then\n"
               "# sp_sim_psf_params(sim, band, x, y) and sp_sim_render_psf / sp_sim_render_epsf (sp_sim.h).\n"
               "# Model (pixel offsets dx, dy from the source; u, v = tile coordinates in [-1, 1]):\n"
               "#   P = [(1 - wf) M(dx, dy; fwhm, beta, e, theta) + wf M(dx, dy; wing_fwhm, wing_beta, 0, 0)] * T(r)\n"
               "#   M = (beta - 1) / (pi a_maj a_min) (1 + (x'/a_maj)^2 + (y'/a_min)^2)^-beta, x' along theta,\n"
               "#   alpha = fwhm / (2 sqrt(2^(1/beta) - 1)), a_maj = alpha / sqrt(1 - e), a_min = alpha sqrt(1 - e)\n"
               "#   T = 1 for r < 0.7 R, (1 - t^2)^2 with t = (r - 0.7 R) / (0.3 R) up to R, 0 beyond\n"
               "#   integrated over each pixel, then normalised to unit sum over the whole profile.\n"
               "#   fwhm = fwhm0 (1 + fw0 u + fw1 v + fw2 (u^2 + v^2) + fw3 u v + fw4 (u^2 - v^2))\n"
               "#   beta = max(beta0 + bt0 u + bt1 v, 1.8)\n"
               "#   e1 = e1c0 + e1c1 u + e1c2 v + e1c3 (u^2 - v^2);  e2 = e2c0 + e2c1 u + e2c2 v + e2c3 2uv\n"
               "#   e = min(hypot(e1, e2), 0.5), theta = atan2(e2, e1) / 2 (radians from +x towards +y)\n"
               "#   u = (x - (nx - 1)/2) / (nx/2), v = (y - (ny - 1)/2) / (ny/2); wing_fwhm = wing_fwhm_factor fwhm\n"
               "# truth_psf/<band>.fits: PSFNGRID^2 stamps of PSFSIZE^2 samples (PSFOVERS per pixel) at the nodes\n"
               "# listed below; a grid `epsf.given_psf` of the pipeline reads.\n");
    fprintf(f, "radius: %.17g\ntile: {nx: %ld, ny: %ld}\nngrid: %d\nstamp_size: %ld\noversamp: %d\n", c->psf_radius,
            c->nx, c->ny, ng, S, os);
    fprintf(f, "bands:\n");
    for (int b = 0; b < s->nbands; b++) {
        const sp_sim_band *B = &s->band[b];
        fprintf(f, "  %s:\n    lambda_nm: %g\n    fwhm0: %.17g\n    fw: [%.17g, %.17g, %.17g, %.17g, %.17g]\n",
                B->name, B->lambda_nm, B->fwhm0, B->fw[0], B->fw[1], B->fw[2], B->fw[3], B->fw[4]);
        fprintf(f, "    beta0: %.17g\n    bt: [%.17g, %.17g]\n", B->beta0, B->bt[0], B->bt[1]);
        fprintf(f, "    e1c: [%.17g, %.17g, %.17g, %.17g]\n    e2c: [%.17g, %.17g, %.17g, %.17g]\n", B->e1c[0],
                B->e1c[1], B->e1c[2], B->e1c[3], B->e2c[0], B->e2c[1], B->e2c[2], B->e2c[3]);
        fprintf(f, "    wing_frac: %.17g\n    wing_fwhm_factor: %.17g\n    wing_beta: %.17g\n", B->wing_frac,
                B->wing_fwhm_factor, B->wing_beta);
        fprintf(f, "    nodes:\n");
        for (int gj = 0; gj < ng; gj++)
            for (int gi = 0; gi < ng; gi++) {
                sp_sim_psf p;
                double x = grid_pos(c->nx, ng, gi), y = grid_pos(c->ny, ng, gj);
                sp_sim_psf_params(s, b, x, y, &p);
                fprintf(f,
                        "      - {i: %d, j: %d, x: %.3f, y: %.3f, fwhm: %.6f, beta: %.6f, e: %.6f, theta_deg: %.4f, "
                        "wing_frac: %.6f, wing_fwhm: %.6f, wing_beta: %.6f}\n",
                        gi, gj, x, y, p.fwhm, p.beta, p.e, p.theta * 180 / M_PI, p.wing_frac, p.wing_fwhm,
                        p.wing_beta);
            }
    }
    SP_TRY(tfile_commit(&t));
cleanup:
    tfile_abort(&t);
    if (fh) sp_fits_abort(&fh);
    free(stamp);
    free(mosaic);
    free(path);
    return status;
}

/* ---- configs and lists ---------------------------------------------------- */

static int write_texts(const sp_sim *s, const char *dir)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    tfile t = {0};
    SP_TRY(tfile_open(&t, dir, "sim.yaml"));
    SP_TRY(sp_sim_config_write(t.f, c));
    SP_TRY(tfile_commit(&t));

    long margin = (c->nx < c->ny ? c->nx : c->ny) / 32;
    margin = margin < 8 ? 8 : margin > 100 ? 100 : margin;
    SP_TRY(tfile_open(&t, dir, "config.yaml"));
    fprintf(t.f,
            "# Pipeline configuration for this simulated tile (surveyproc simulate, preset %s, seed %llu).\n"
            "# Run: surveyproc run <this folder>/config.yaml — relative paths resolve against this folder,\n"
            "# outputs go under work/. Any key of `surveyproc config --dump` may be added.\n"
            "inputs:\n"
            "  tile_name: sim-%s-%llu\n"
            "  image_list_file: image_list.txt\n"
            "  input_catalog: input_catalog.csv\n"
            "  reference_catalog: reference_catalog.csv\n"
            "outputs:\n"
            "  work_dir: work\n"
            "image_scaling:\n"
            "  zp_ref: %.1f\n"
            "crop:\n"
            "  margin: %ld  # the whole tile is covered: a strip of 1/32 of it (8..100 pix)\n"
            "epsf:\n"
            "  epsf_ngrid: %d\n"
            "  ngrid: %d\n",
            c->preset, (unsigned long long)c->seed, c->preset, (unsigned long long)c->seed, SP_SIM_ZP_REF, margin,
            c->epsf_ngrid, c->ngrid);
    SP_TRY(tfile_commit(&t));

    SP_TRY(tfile_open(&t, dir, "image_list.txt"));
    fprintf(t.f, "# %d frames of %d bands; paths relative to this file's folder\n", s->nframes, s->nbands);
    for (int f = 0; f < s->nframes; f++) fprintf(t.f, "%s\n", s->frame[f].file);
    SP_TRY(tfile_commit(&t));
cleanup:
    tfile_abort(&t);
    return status;
}

int sp_sim_write(const sp_sim *s, const char *dir, int rank, int nranks, sp_sim_stats *st)
{
    int status = SP_OK;
    char *sub = NULL;
    sp_sim_stats local;
    if (!st) st = &local;
    memset(st, 0, sizeof *st);
    double t0 = sp_wtime();
    SP_CHECK(s && dir && nranks >= 1 && rank >= 0 && rank < nranks, SP_ERR_INTERNAL, "sp_sim_write: bad arguments");
    SP_TRY(mkdir_p(dir));
    sub = sim_join(dir, "images");
    SP_CHECK(sub, SP_ERR_NOMEM, "out of memory");
    SP_TRY(mkdir_p(sub));
    free(sub);
    sub = sim_join(dir, "truth_psf");
    SP_CHECK(sub, SP_ERR_NOMEM, "out of memory");
    SP_TRY(mkdir_p(sub));

    long nblk = (s->cfg.ny + (s->cfg.block_rows > s->lag ? s->cfg.block_rows : s->lag) - 1) /
                    (s->cfg.block_rows > s->lag ? s->cfg.block_rows : s->lag) + 1,
         mine = 0, done = 0;
    for (int b = rank; b < s->nbands; b += nranks) mine++;
    sp_progress prog;
    if (rank == 0) sp_progress_start(&prog, "simulate: row blocks", mine * nblk, 10.0);
    for (int b = rank; b < s->nbands; b += nranks) SP_TRY(write_band(s, dir, b, st, rank == 0 ? &prog : NULL, &done));
    if (rank == 0) sp_progress_finish(&prog);
    if (rank == 0) {
        double t1 = sp_wtime();
        SP_TRY(write_truth(s, dir));
        SP_TRY(write_input_catalog(s, dir));
        SP_TRY(write_reference(s, dir));
        SP_TRY(write_truth_psf(s, dir));
        SP_TRY(write_texts(s, dir));
        st->io_seconds += sp_wtime() - t1;
    }
cleanup:
    free(sub);
    st->seconds = sp_wtime() - t0;
    return status;
}
