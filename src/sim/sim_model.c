/* sim_model.c — everything about a simulation except its pixels: bands and
 * their PSF fields, frames (ZP, gain, sky, defects), the WCS, the sources with
 * their SEDs, and the truth flags. Deterministic: every draw comes from a
 * Philox stream named by what it is for (sim_private.h). */
#include "sim_private.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_wcs.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define LAMBDA_REF 625.0 /* nm: the band magnitudes are drawn at */

void sim_uv(const sp_sim *s, double x, double y, double *u, double *v)
{
    *u = (x - 0.5 * (s->cfg.nx - 1)) / (0.5 * s->cfg.nx);
    *v = (y - 0.5 * (s->cfg.ny - 1)) / (0.5 * s->cfg.ny);
}

double sim_sky_rel(const sp_sim_frame *f, double u, double v) { return 1.0 + f->sky_grad[0] * u + f->sky_grad[1] * v; }

double sim_resid(const sp_sim_frame *f, double u, double v) { return f->resid[0] + f->resid[1] * u + f->resid[2] * v; }

void sp_sim_psf_params(const sp_sim *s, int band, double x, double y, sp_sim_psf *p)
{
    const sp_sim_band *B = &s->band[band];
    double u, v;
    sim_uv(s, x, y, &u, &v);
    double fw = 1.0 + B->fw[0] * u + B->fw[1] * v + B->fw[2] * (u * u + v * v) + B->fw[3] * u * v +
                B->fw[4] * (u * u - v * v);
    p->fwhm = B->fwhm0 * fmax(fw, 0.5);
    p->beta = fmax(B->beta0 + B->bt[0] * u + B->bt[1] * v, 1.8);
    double e1 = B->e1c[0] + B->e1c[1] * u + B->e1c[2] * v + B->e1c[3] * (u * u - v * v);
    double e2 = B->e2c[0] + B->e2c[1] * u + B->e2c[2] * v + B->e2c[3] * 2.0 * u * v;
    p->e = fmin(sqrt(e1 * e1 + e2 * e2), 0.5);
    p->theta = 0.5 * atan2(e2, e1);
    p->wing_frac = B->wing_frac;
    p->wing_fwhm = B->wing_fwhm_factor * p->fwhm;
    p->wing_beta = B->wing_beta;
    p->radius = s->cfg.psf_radius;
}

/* ---- building ------------------------------------------------------------- */

static double urange(sim_rng *r, double a, double b) { return a + (b - a) * sim_rng_uniform(r); }

/* Magnitude from counts dN/dm ~ 10^(k m) on [m1, m2] (inverse CDF). */
static double powerlaw_mag(sim_rng *r, double m1, double m2, double k)
{
    double u = sim_rng_uniform(r);
    if (k < 1e-6) return m1 + (m2 - m1) * u;
    double a = pow(10.0, k * m1), b = pow(10.0, k * m2);
    return log10(a + u * (b - a)) / k;
}

/* Blackbody colour: m(lambda) - m(625 nm) in AB for temperature T. */
static double bb_color(double T, double lam)
{
    const double hck = 1.4387769e7; /* h c / k in nm K */
    double f = pow(LAMBDA_REF / lam, 3.0) * expm1(hck / (LAMBDA_REF * T)) / expm1(hck / (lam * T));
    return -2.5 * log10(f);
}

static double logistic(double z) { return 1.0 / (1.0 + exp(-z)); }

static void set_band_names(sp_sim_config *c)
{
    if (c->band_names[0][0]) return;
    int nb = c->nbands;
    for (int b = 0; b < nb; b++) {
        int lam;
        if (nb == 1) lam = 625;
        else if (nb <= 20) lam = 400 + 25 * (int)lround(b * 19.0 / (nb - 1)); /* 7DT's 25 nm grid */
        else lam = 400 + (int)lround(b * 475.0 / (nb - 1));
        snprintf(c->band_names[b], SP_SIM_NAME_LEN, "m%d", lam);
    }
}

/* One header card padded to 80 characters: "KEY     = value / comment".
 * Numbers are right-aligned to column 30, strings start at column 11 (the
 * fixed format, which every reader accepts). */
static void card(char *dst, const char *key, const char *val, const char *comment)
{
    char tmp[200];
    if (val[0] == '\'') snprintf(tmp, sizeof tmp, "%-8.8s= %-20s%s%s", key, val, comment[0] ? " / " : "", comment);
    else snprintf(tmp, sizeof tmp, "%-8.8s= %20s%s%s", key, val, comment[0] ? " / " : "", comment);
    size_t n = strlen(tmp);
    if (n > 80) n = 80;
    memset(dst, ' ', 80);
    memcpy(dst, tmp, n);
}

static int build_wcs(sp_sim *s)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    sim_rng r;
    sim_rng_init(&r, c->seed, SIM_D_WCS, 0, 0);
    int sip = c->sip_amp > 0;
    double scale = c->pixscale / 3600.0, rho = c->rotation * M_PI / 180.0;
    double half = 0.5 * (double)(c->nx > c->ny ? c->nx : c->ny);
    double coef[6];
    for (int k = 0; k < 6; k++) coef[k] = c->sip_amp * urange(&r, -1, 1) / (3.0 * half * half);
    enum { MAXC = 32 };
    SP_ALLOC(s->wcs_cards, MAXC * 80 + 1);
    char *p = s->wcs_cards, v[64];
    int n = 0;
#define CARD(key, comment, ...)                                                                                    \
    do {                                                                                                           \
        snprintf(v, sizeof v, __VA_ARGS__);                                                                        \
        card(p + 80 * n++, key, v, comment);                                                                       \
    } while (0)
    CARD("WCSAXES", "celestial axes", "%d", 2);
    CARD("CTYPE1", "gnomonic projection", "'%s'", sip ? "RA---TAN-SIP" : "RA---TAN");
    CARD("CTYPE2", "gnomonic projection", "'%s'", sip ? "DEC--TAN-SIP" : "DEC--TAN");
    CARD("CUNIT1", "", "'%s'", "deg     ");
    CARD("CUNIT2", "", "'%s'", "deg     ");
    CARD("CRPIX1", "reference pixel (tile centre)", "%.12E", 0.5 * (c->nx + 1));
    CARD("CRPIX2", "reference pixel (tile centre)", "%.12E", 0.5 * (c->ny + 1));
    CARD("CRVAL1", "RA at the reference pixel (deg)", "%.12E", c->ra0);
    CARD("CRVAL2", "Dec at the reference pixel (deg)", "%.12E", c->dec0);
    CARD("CD1_1", "", "%.12E", -scale * cos(rho));
    CARD("CD1_2", "", "%.12E", scale * sin(rho));
    CARD("CD2_1", "", "%.12E", scale * sin(rho));
    CARD("CD2_2", "", "%.12E", scale * cos(rho));
    CARD("RADESYS", "", "'%s'", "ICRS    ");
    CARD("EQUINOX", "", "%.1f", 2000.0);
    if (sip) {
        CARD("A_ORDER", "SIP distortion order", "%d", 2);
        CARD("A_2_0", "", "%.12E", coef[0]);
        CARD("A_1_1", "", "%.12E", coef[1]);
        CARD("A_0_2", "", "%.12E", coef[2]);
        CARD("B_ORDER", "SIP distortion order", "%d", 2);
        CARD("B_2_0", "", "%.12E", coef[3]);
        CARD("B_1_1", "", "%.12E", coef[4]);
        CARD("B_0_2", "", "%.12E", coef[5]);
    }
#undef CARD
    p[80 * n] = '\0';
    s->wcs_ncards = n;
    SP_TRY(sp_wcs_from_header(s->wcs_cards, n, "simulated tile WCS", &s->wcs));
cleanup:
    return status;
}

static void build_bands(sp_sim *s)
{
    const sp_sim_config *c = &s->cfg;
    sim_rng r;
    /* field terms shared by all bands (the optics), plus a slope with wavelength */
    double g[5], gl[5], b0[2], e1[4], e2[4], e1l[4], e2l[4];
    sim_rng_init(&r, c->seed, SIM_D_PSF, 0, 0);
    for (int k = 0; k < 5; k++) g[k] = urange(&r, -1, 1), gl[k] = urange(&r, -1, 1);
    for (int k = 0; k < 2; k++) b0[k] = urange(&r, -1, 1);
    for (int k = 0; k < 4; k++) e1[k] = urange(&r, -1, 1), e2[k] = urange(&r, -1, 1);
    for (int k = 0; k < 4; k++) e1l[k] = urange(&r, -1, 1), e2l[k] = urange(&r, -1, 1);
    g[2] = fabs(g[2]); /* images degrade towards the edges */
    static const double escale[4] = {0.5, 0.35, 0.35, 0.6};
    for (int b = 0; b < s->nbands; b++) {
        sp_sim_band *B = &s->band[b];
        memcpy(B->name, c->band_names[b], sizeof B->name);
        B->name[sizeof B->name - 1] = '\0';
        B->lambda_nm = atof(B->name + 1);
        double t = (B->lambda_nm - 637.5) / 237.5;
        sim_rng_init(&r, c->seed, SIM_D_PSF, 1 + (uint32_t)b, 0);
        /* each 7DT band is a different telescope: its own seeing, on top of lambda^-0.2 */
        B->fwhm0 = c->fwhm * pow(B->lambda_nm / LAMBDA_REF, -0.2) * (1.0 + 0.04 * urange(&r, -1, 1));
        for (int k = 0; k < 5; k++) B->fw[k] = 0.5 * c->fwhm_var * (g[k] + 0.3 * gl[k] * t);
        B->beta0 = c->beta + 0.3 * t + 0.15 * urange(&r, -1, 1);
        for (int k = 0; k < 2; k++) B->bt[k] = 0.3 * b0[k] + 0.1 * urange(&r, -1, 1);
        for (int k = 0; k < 4; k++) {
            B->e1c[k] = c->ell_max * escale[k] * (e1[k] + 0.3 * e1l[k] * t + 0.15 * urange(&r, -1, 1));
            B->e2c[k] = c->ell_max * escale[k] * (e2[k] + 0.3 * e2l[k] * t + 0.15 * urange(&r, -1, 1));
        }
        B->wing_frac = c->wing_frac * (1.0 + 0.2 * t);
        B->wing_fwhm_factor = c->wing_fwhm_factor;
        B->wing_beta = c->wing_beta;
        /* throughput peaks mid-range; sky brightens to the red */
        double z = (B->lambda_nm - 600.0) / 300.0;
        B->zp = c->zp - 0.9 * z * z + 0.05 * urange(&r, -1, 1);
        B->sky_mag = c->sky_mag - 1.5 * (B->lambda_nm - 400.0) / 475.0;
    }
}

static int cmp_long(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

static int build_frames(sp_sim *s)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    s->nframes = s->nbands * c->frames_per_band;
    SP_ALLOC(s->frame, s->nframes);
    double npix = (double)c->nx * (double)c->ny;
    for (int b = 0; b < s->nbands; b++) {
        for (int k = 0; k < c->frames_per_band; k++) {
            int id = b * c->frames_per_band + k;
            sp_sim_frame *f = &s->frame[id];
            sim_rng r;
            sim_rng_init(&r, c->seed, SIM_D_FRAME, (uint32_t)id, 0);
            f->band = b;
            f->index = k;
            f->id = id;
            snprintf(f->file, sizeof f->file, "images/%s_%d.fits", s->band[b].name, k);
            f->zp = s->band[b].zp + c->frame_zp_jitter * sim_rng_normal(&r);
            f->egain = c->egain * (1.0 + 0.05 * urange(&r, -1, 1));
            f->read_noise = c->read_noise;
            f->saturate = c->saturate;
            f->exptime = c->exptime;
            double mpix = s->band[b].sky_mag - 2.5 * log10(c->pixscale * c->pixscale);
            f->sky_adu = pow(10.0, -0.4 * (mpix - f->zp));
            f->skysig = sqrt(f->sky_adu * f->egain + f->read_noise * f->read_noise) / f->egain;
            double phi = urange(&r, 0, 2 * M_PI);
            f->sky_grad[0] = c->sky_gradient * cos(phi);
            f->sky_grad[1] = c->sky_gradient * sin(phi);
            if (c->sky_subtracted) {
                double a = c->bg_residual * f->skysig;
                f->resid[0] = 0.5 * a * urange(&r, -1, 1);
                f->resid[1] = a * urange(&r, -1, 1);
                f->resid[2] = a * urange(&r, -1, 1);
            }
            /* a wrong header zero point, for testing calibration against the reference catalog */
            f->zp_header = f->zp + (c->zp_header_error > 0 ? c->zp_header_error * sim_rng_normal(&r) : 0.0);
            /* bad columns: half of them whole, half partial segments */
            f->n_badcol = c->n_bad_columns;
            SP_ALLOC(f->badcol, 3 * (f->n_badcol > 0 ? f->n_badcol : 1));
            sim_rng_init(&r, c->seed, SIM_D_BADCOL, (uint32_t)id, 0);
            for (int i = 0; i < f->n_badcol; i++) {
                long x = (long)(sim_rng_uniform(&r) * c->nx), y0 = 0, y1 = c->ny - 1;
                if (sim_rng_uniform(&r) < 0.5) {
                    y0 = (long)(sim_rng_uniform(&r) * c->ny);
                    y1 = y0 + (long)(sim_rng_uniform(&r) * 0.5 * c->ny);
                    if (y1 > c->ny - 1) y1 = c->ny - 1;
                }
                f->badcol[3 * i] = x < c->nx ? x : c->nx - 1;
                f->badcol[3 * i + 1] = y0;
                f->badcol[3 * i + 2] = y1;
            }
            /* scattered NaN pixels (masked cosmic rays, hot pixels) */
            long nn = (long)llround(c->nan_fraction * npix);
            SP_ALLOC(f->nan_pix, nn > 0 ? nn : 1);
            sim_rng_init(&r, c->seed, SIM_D_NANPIX, (uint32_t)id, 0);
            for (long i = 0; i < nn; i++) {
                double u = ((double)sim_rng_u32(&r) * 4294967296.0 + (double)sim_rng_u32(&r)) / 18446744073709551616.0;
                long idx = (long)(u * npix);
                f->nan_pix[i] = idx < (long)npix ? idx : (long)npix - 1;
            }
            qsort(f->nan_pix, (size_t)nn, sizeof(long), cmp_long);
            long m = 0;
            for (long i = 0; i < nn; i++)
                if (m == 0 || f->nan_pix[i] != f->nan_pix[m - 1]) f->nan_pix[m++] = f->nan_pix[i];
            f->n_nan = m;
        }
    }
cleanup:
    return status;
}

/* Uniform position inside the tile (pixel centres 0..n-1, edges at -0.5, n-0.5). */
static void uniform_pos(sim_rng *r, const sp_sim_config *c, double margin, double *x, double *y)
{
    *x = -0.5 + margin + sim_rng_uniform(r) * (c->nx - 2 * margin);
    *y = -0.5 + margin + sim_rng_uniform(r) * (c->ny - 2 * margin);
}

static int build_sources(sp_sim *s)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    double *cx = NULL, *cy = NULL, *mag = NULL;
    long ns = c->n_stars, nbr = c->n_bright, ng = c->n_galaxies;
    s->nsrc = ns + nbr + ng;
    int nb = s->nbands;
    SP_ALLOC(s->src, s->nsrc > 0 ? s->nsrc : 1);
    SP_ALLOC(s->flux, (s->nsrc > 0 ? s->nsrc : 1) * nb);
    SP_ALLOC(mag, nb);
    SP_ALLOC(cx, c->n_clusters > 0 ? c->n_clusters : 1);
    SP_ALLOC(cy, c->n_clusters > 0 ? c->n_clusters : 1);
    sim_rng r;
    for (int k = 0; k < c->n_clusters; k++) {
        sim_rng_init(&r, c->seed, SIM_D_CLUSTER, 0, (uint64_t)k);
        cx[k] = (0.15 + 0.7 * sim_rng_uniform(&r)) * c->nx;
        cy[k] = (0.15 + 0.7 * sim_rng_uniform(&r)) * c->ny;
    }
    for (long i = 0; i < s->nsrc; i++) {
        sp_sim_source *src = &s->src[i];
        src->id = i + 1;
        src->cluster = -1;
        src->q = 1.0;
        double m_ref;
        if (i < ns + nbr) {
            int bright = i >= ns;
            sim_rng_init(&r, c->seed, SIM_D_STAR, (uint32_t)bright, (uint64_t)(bright ? i - ns : i));
            src->type = SP_SIM_STAR;
            if (bright) {
                uniform_pos(&r, c, fmin(c->psf_radius, 0.25 * c->nx), &src->x, &src->y);
                m_ref = c->star_bright_mag + 1.5 * sim_rng_uniform(&r);
                src->flags |= SP_SIM_F_FORCED_BRIGHT;
            } else {
                double uc = sim_rng_uniform(&r);
                if (c->n_clusters > 0 && uc < c->cluster_fraction) {
                    int k = (int)(sim_rng_uniform(&r) * c->n_clusters);
                    if (k >= c->n_clusters) k = c->n_clusters - 1;
                    int ok = 0;
                    for (int tries = 0; tries < 100 && !ok; tries++) {
                        /* Plummer sphere projected: surface density ~ (1 + r^2/a^2)^-2 */
                        double u = sim_rng_uniform(&r), ph = 2 * M_PI * sim_rng_uniform(&r);
                        double rr = c->cluster_radius * sqrt(u / (1.0 - u));
                        if (rr > 8 * c->cluster_radius) continue;
                        src->x = cx[k] + rr * cos(ph);
                        src->y = cy[k] + rr * sin(ph);
                        ok = src->x > -0.5 && src->x < c->nx - 0.5 && src->y > -0.5 && src->y < c->ny - 0.5;
                    }
                    if (ok) {
                        src->cluster = k;
                        src->flags |= SP_SIM_F_CLUSTER;
                    } else {
                        uniform_pos(&r, c, 0, &src->x, &src->y);
                    }
                } else {
                    uniform_pos(&r, c, 0, &src->x, &src->y);
                }
                m_ref = powerlaw_mag(&r, c->star_mag_min, c->star_mag_max, c->star_slope);
            }
            /* cool stars are the common ones */
            double u = sim_rng_uniform(&r);
            double T = 3500.0 * pow(12000.0 / 3500.0, u * u);
            for (int b = 0; b < nb; b++) mag[b] = m_ref + bb_color(T, s->band[b].lambda_nm);
        } else {
            long j = i - ns - nbr;
            sim_rng_init(&r, c->seed, SIM_D_GAL, 0, (uint64_t)j);
            uniform_pos(&r, c, 0, &src->x, &src->y);
            m_ref = powerlaw_mag(&r, c->gal_mag_min, c->gal_mag_max, c->gal_slope);
            src->type = sim_rng_uniform(&r) < c->dev_fraction ? SP_SIM_DEV : SP_SIM_EXP;
            double re = c->re_median * pow(10.0, -0.12 * (m_ref - 18.0) + 0.15 * sim_rng_normal(&r));
            src->re = fmin(fmax(re, 0.5), c->re_max);
            src->q = src->type == SP_SIM_DEV ? urange(&r, 0.4, 1.0) : urange(&r, 0.25, 1.0);
            src->theta = urange(&r, -0.5 * M_PI, 0.5 * M_PI);
            /* power law in f_nu with a soft (4000 A-like) break */
            double gam = urange(&r, -1.0, 2.5), brk = urange(&r, 0.0, 0.8), lb = urange(&r, 420.0, 600.0);
            for (int b = 0; b < nb; b++) {
                double lam = s->band[b].lambda_nm;
                mag[b] = m_ref - 2.5 * gam * log10(lam / LAMBDA_REF) +
                         brk * (logistic((lb - lam) / 40.0) - logistic((lb - LAMBDA_REF) / 40.0));
            }
        }
        for (int b = 0; b < nb; b++) s->flux[i * nb + b] = pow(10.0, -0.4 * (mag[b] - SP_SIM_ZP_REF));
    }
    if (s->nsrc > 0) {
        double *x = NULL, *y = NULL, *ra = NULL, *dec = NULL;
        x = malloc(sizeof(double) * (size_t)s->nsrc);
        y = malloc(sizeof(double) * (size_t)s->nsrc);
        ra = malloc(sizeof(double) * (size_t)s->nsrc);
        dec = malloc(sizeof(double) * (size_t)s->nsrc);
        if (!x || !y || !ra || !dec) {
            free(x), free(y), free(ra), free(dec);
            SP_CHECK(0, SP_ERR_NOMEM, "out of memory for %ld source positions", s->nsrc);
        }
        for (long i = 0; i < s->nsrc; i++) x[i] = s->src[i].x, y[i] = s->src[i].y;
        long nbad = 0;
        status = sp_wcs_pix2sky(s->wcs, s->nsrc, x, y, ra, dec, &nbad);
        for (long i = 0; i < s->nsrc && !status; i++) s->src[i].ra = ra[i], s->src[i].dec = dec[i];
        free(x), free(y), free(ra), free(dec);
        if (status) goto cleanup;
        SP_CHECK(nbad == 0, SP_ERR_WCS, "simulated WCS: %ld source positions do not map to the sky", nbad);
    }
cleanup:
    free(cx);
    free(cy);
    free(mag);
    return status;
}

/* Band closest to 625 nm: used for crowding (a neighbour's relative flux). */
static int ref_band(const sp_sim *s)
{
    int best = 0;
    for (int b = 1; b < s->nbands; b++)
        if (fabs(s->band[b].lambda_nm - LAMBDA_REF) < fabs(s->band[best].lambda_nm - LAMBDA_REF)) best = b;
    return best;
}

static int build_flags(sp_sim *s)
{
    int status = SP_OK;
    const sp_sim_config *c = &s->cfg;
    uint64_t *bad = NULL;
    long *head = NULL, *next = NULL;
    double *stamp = NULL;
    long nx = c->nx, ny = c->ny, nb = s->nbands;
    size_t nwords = ((size_t)nx * (size_t)ny + 63) / 64;
    SP_ALLOC(bad, nwords);
#define SETBAD(idx) (bad[(size_t)(idx) >> 6] |= (uint64_t)1 << ((size_t)(idx) & 63))
#define ISBAD(idx) ((bad[(size_t)(idx) >> 6] >> ((size_t)(idx) & 63)) & 1)
    for (int f = 0; f < s->nframes; f++) {
        const sp_sim_frame *fr = &s->frame[f];
        for (int i = 0; i < fr->n_badcol; i++)
            for (long y = fr->badcol[3 * i + 1]; y <= fr->badcol[3 * i + 2]; y++) SETBAD(y * nx + fr->badcol[3 * i]);
        for (long i = 0; i < fr->n_nan; i++) SETBAD(fr->nan_pix[i]);
    }
    long hs = (long)ceil(c->psf_radius) + 1;
    SP_ALLOC(stamp, (2 * hs + 1) * (2 * hs + 1));
    /* crowding: a grid of cells of 2 FWHM */
    double fw = c->fwhm, cell = ceil(2 * fw);
    long gx = (long)ceil(nx / cell) + 1, gy = (long)ceil(ny / cell) + 1;
    SP_ALLOC(head, gx * gy);
    SP_ALLOC(next, s->nsrc > 0 ? s->nsrc : 1);
    for (long k = 0; k < gx * gy; k++) head[k] = -1;
    for (long i = 0; i < s->nsrc; i++) {
        long k = (long)((s->src[i].y + 0.5) / cell) * gx + (long)((s->src[i].x + 0.5) / cell);
        next[i] = head[k];
        head[k] = i;
    }
    int rb = ref_band(s);
    for (long i = 0; i < s->nsrc; i++) {
        sp_sim_source *src = &s->src[i];
        /* bad pixels near the source in any frame */
        double rbad = fmax(2.0, fw);
        long x0 = (long)floor(src->x - rbad), x1 = (long)ceil(src->x + rbad);
        long y0 = (long)floor(src->y - rbad), y1 = (long)ceil(src->y + rbad);
        for (long y = y0 < 0 ? 0 : y0; y <= y1 && y < ny && !(src->flags & SP_SIM_F_BAD_PIXELS); y++)
            for (long x = x0 < 0 ? 0 : x0; x <= x1 && x < nx; x++) {
                double d2 = (x - src->x) * (x - src->x) + (y - src->y) * (y - src->y);
                if (d2 <= rbad * rbad && ISBAD(y * nx + x)) {
                    src->flags |= SP_SIM_F_BAD_PIXELS;
                    break;
                }
            }
        double edge = fmin(fmin(src->x + 0.5, nx - 0.5 - src->x), fmin(src->y + 0.5, ny - 0.5 - src->y));
        if (edge < 3 * fw) src->flags |= SP_SIM_F_EDGE;
        /* neighbours */
        long ci = (long)((src->x + 0.5) / cell), cj = (long)((src->y + 0.5) / cell);
        for (long jj = cj - 1; jj <= cj + 1; jj++)
            for (long ii = ci - 1; ii <= ci + 1; ii++) {
                if (ii < 0 || jj < 0 || ii >= gx || jj >= gy) continue;
                for (long k = head[jj * gx + ii]; k >= 0; k = next[k]) {
                    if (k == i) continue;
                    double d = hypot(s->src[k].x - src->x, s->src[k].y - src->y);
                    if (d < fw || (d < 2 * fw && s->flux[k * nb + rb] >= 0.1 * s->flux[i * nb + rb]))
                        src->flags |= SP_SIM_F_CROWDED;
                }
            }
        /* saturation: a cheap bound on the peak pixel first, the exact stamp
         * only for stars that might reach SATURATE */
        for (int f = 0; f < s->nframes && !(src->flags & SP_SIM_F_SATURATED); f++) {
            const sp_sim_frame *fr = &s->frame[f];
            sp_sim_psf p;
            sp_sim_psf_params(s, fr->band, src->x, src->y, &p);
            double al = sim_moffat_alpha(p.fwhm, p.beta), aw = sim_moffat_alpha(p.wing_fwhm, p.wing_beta);
            double peak = (1 - p.wing_frac) * (p.beta - 1) / (M_PI * al * al) +
                          (p.wing_frac > 0 ? p.wing_frac * (p.wing_beta - 1) / (M_PI * aw * aw) : 0.0);
            double raw = s->flux[i * nb + fr->band] * pow(10.0, 0.4 * (fr->zp - SP_SIM_ZP_REF));
            double rmax = fabs(fr->resid[0]) + fabs(fr->resid[1]) + fabs(fr->resid[2]);
            double margin = fr->saturate - rmax - (c->sky_subtracted ? 0.0 : fr->sky_adu * (1 + c->sky_gradient));
            if (1.1 * peak * raw + 5 * fr->skysig < margin) continue;
            if (src->type != SP_SIM_STAR) {
                src->flags |= SP_SIM_F_SATURATED; /* conservative for galaxies */
                continue;
            }
            long ix, iy, h;
            SP_TRY(sim_render_source(s, src, fr->band, &ix, &iy, &h, stamp, NULL));
            double mx = 0;
            for (long k = 0; k < (2 * h + 1) * (2 * h + 1); k++) mx = fmax(mx, stamp[k]);
            double pk = mx * raw;
            if (pk + 3 * sqrt(fr->skysig * fr->skysig + pk / fr->egain) >= margin) src->flags |= SP_SIM_F_SATURATED;
        }
    }
#undef SETBAD
#undef ISBAD
cleanup:
    free(bad);
    free(head);
    free(next);
    free(stamp);
    return status;
}

typedef struct {
    long iy, idx;
} row_key;

static int cmp_row_key(const void *a, const void *b)
{
    const row_key *x = a, *y = b;
    if (x->iy != y->iy) return (x->iy > y->iy) - (x->iy < y->iy);
    return (x->idx > y->idx) - (x->idx < y->idx);
}

int sp_sim_create(const sp_sim_config *cfg, sp_sim **out)
{
    int status = SP_OK;
    sp_sim *s = NULL;
    row_key *keys = NULL;
    SP_CHECK(cfg && out, SP_ERR_INTERNAL, "sp_sim_create: NULL argument");
    *out = NULL;
    SP_TRY(sp_sim_config_validate(cfg));
    SP_ALLOC(s, 1);
    s->cfg = *cfg;
    set_band_names(&s->cfg);
    if (s->cfg.truth_psf_ngrid == 0) s->cfg.truth_psf_ngrid = s->cfg.epsf_ngrid;
    if (s->cfg.truth_psf_oversamp == 0) s->cfg.truth_psf_oversamp = 1;
    s->nbands = s->cfg.nbands;
    build_bands(s);
    SP_TRY(build_wcs(s));
    SP_TRY(build_frames(s));
    SP_TRY(build_sources(s));
    SP_TRY(build_flags(s));
    s->lag = 0;
    for (long i = 0; i < s->nsrc; i++) {
        long h = sim_source_halfsize(s, &s->src[i]);
        if (h > s->lag) s->lag = h;
    }
    SP_ALLOC(s->order, s->nsrc > 0 ? s->nsrc : 1);
    SP_ALLOC(keys, s->nsrc > 0 ? s->nsrc : 1);
    for (long i = 0; i < s->nsrc; i++) keys[i].iy = lround(s->src[i].y), keys[i].idx = i;
    qsort(keys, (size_t)s->nsrc, sizeof *keys, cmp_row_key);
    for (long i = 0; i < s->nsrc; i++) s->order[i] = keys[i].idx;
    *out = s;
    s = NULL;
cleanup:
    free(keys);
    sp_sim_free(&s);
    return status;
}

void sp_sim_free(sp_sim **sp)
{
    if (!sp || !*sp) return;
    sp_sim *s = *sp;
    for (int f = 0; s->frame && f < s->nframes; f++) {
        free(s->frame[f].badcol);
        free(s->frame[f].nan_pix);
    }
    free(s->frame);
    free(s->src);
    free(s->flux);
    free(s->wcs_cards);
    free(s->order);
    sp_wcs_free(&s->wcs);
    free(s);
    *sp = NULL;
}

int sp_sim_load(const char *dir_or_yaml, sp_sim **s)
{
    int status = SP_OK;
    char *path = NULL;
    struct stat st;
    SP_CHECK(dir_or_yaml && s, SP_ERR_INTERNAL, "sp_sim_load: NULL argument");
    if (stat(dir_or_yaml, &st) == 0 && S_ISDIR(st.st_mode)) {
        path = sim_join(dir_or_yaml, "sim.yaml");
        SP_CHECK(path, SP_ERR_NOMEM, "out of memory");
    }
    sp_sim_config c;
    SP_TRY(sp_sim_config_load(path ? path : dir_or_yaml, NULL, &c));
    SP_TRY(sp_sim_create(&c, s));
cleanup:
    free(path);
    return status;
}
