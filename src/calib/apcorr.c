/* apcorr.c — the aperture correction on a store (zp stage, before the zero points;
 * see sp_zp.h and docs/zeropoints.md).
 *
 * A PSF model that lacks part of the PSF's light (a wide wing a fallback Moffat
 * cannot hold, an ePSF cropped or built on backgrounds that absorbed its wing)
 * gives model fluxes that are low by that fraction for every source of the band.
 * The cells measure, for bright isolated point sources, FLUX_<b>_APCAL = the model
 * flux plus the residual light (data - model of every source, local annulus level
 * subtracted) within the calibration aperture (cell_fit.c). Per band the clipped
 * weighted median of APCAL / model flux is the correction; every row's
 * FLUX/FLUXERR_<b>_fit and FLUXERR_<b>_cond are scaled by it (DAOPHOT's aperture
 * correction on a neighbour-subtracted image; LSST's apCorr). The factor applied is
 * kept per row (APCORR_<b>), so a re-run starts again from the model fluxes. */
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_zp.h"
#include "zp_internal.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define AC_CHUNK 65536

/* per band: FLUX_fit, FLUXERR_fit, FLUXERR_cond, APCORR (rewritten), then BLEND, FLUX_APCAL,
 * FLUXERR_APCAL, APCAL_FLAGS (read) */
enum { K_F, K_FE, K_FC, K_AC, K_BL, K_A, K_AE, K_AF, NK };
static const char *const kfmt[NK] = {"FLUX_%s_fit", "FLUXERR_%s_fit", "FLUXERR_%s_cond", "APCORR_%s",
                                     "BLEND_%s",    "FLUX_%s_APCAL",  "FLUXERR_%s_APCAL", "APCAL_FLAGS_%s"};

typedef struct {
    char band[SP_ZP_BAND_MAX];
    double factor, factor_err, scatter, sigma_extra;
    int64_t ncand, nused, nclipped;
    int32_t flag;
} ac_row;

#define C(n, t, u, d) {n, t, 0, u, d, 0, 0}
static const sp_h5_col ac_cols[] = {
    {"band", SP_H5_STR, SP_ZP_BAND_MAX, "", "band (FILTER)", 0, 0},
    C("factor", SP_H5_F64, "", "aperture correction applied: FLUX_<band>_fit = model flux x factor (1: none)"),
    C("factor_err", SP_H5_F64, "", "1-sigma error of the factor (a scale common to the band's fluxes)"),
    C("scatter", SP_H5_F64, "", "1.4826 x MAD of the used sources' APCAL / model flux"),
    C("sigma_extra", SP_H5_F64, "", "scatter of the ratios beyond their errors (chi2 = dof), added to every error"),
    C("ncand", SP_H5_I64, "", "point sources passing the cuts (converged, unexcluded, SNR, BLEND, APCAL flags)"),
    C("nused", SP_H5_I64, "", "candidates kept by the clipping"),
    C("nclipped", SP_H5_I64, "", "candidates removed by the clipping"),
    C("flag", SP_H5_I32, "", "0 ok; 1 too few sources (not corrected), 2 no calibration-aperture column, 4 zp.apcorr false"),
};
#undef C

void sp_apcorr_result_free(sp_apcorr_result *r)
{
    if (!r) return;
    free(r->band);
    memset(r, 0, sizeof *r);
}

int sp_apcorr_estimate(const double *apflux, const double *apfluxerr, const double *flux, const double *fluxerr,
                       long n, double clip_sigma, int clip_max_iters, int min_stars, double *x, double *e,
                       unsigned char *clipped, sp_apcorr_band *out)
{
    int status = SP_OK;
    sp_zp_estimate est;
    out->factor = 1.0;
    out->factor_err = out->scatter = NAN;
    out->sigma_extra = 0;
    out->ncand = n;
    out->nused = out->nclipped = 0;
    out->flag = 0;
    for (long i = 0; i < n; i++) {
        /* linear in the aperture flux (a log of a noisy flux is biased and needs it > 0);
         * the model flux in both denominators: the less noisy of the two */
        int ok = flux[i] > 0 && isfinite(apflux[i]) && apfluxerr[i] > 0 && fluxerr[i] >= 0;
        x[i] = ok ? apflux[i] / flux[i] : NAN;
        e[i] = ok ? hypot(apfluxerr[i], fluxerr[i]) / flux[i] : NAN;
    }
    SP_TRY(sp_zp_estimate_run(x, e, n, clip_sigma, clip_max_iters, min_stars, clipped, &est));
    /* The sources' ratios scatter beyond their errors (neighbours in the aperture or the
     * annulus, the PSF's variation over the tile): that scatter s, from chi2 = dof of the
     * survivors about their weighted mean, is added to every error, then the estimate is
     * redone. Without it one bright source with a small error and a contaminated aperture
     * carries the weighted median (seen: one star of 57 at 0.954 giving the band 0.955). */
    if (!(est.flag & SP_ZP_F_FEW_STARS) && est.n_used > 1) {
        double lo = 0, hi = 0;
        for (long i = 0; i < n; i++)
            if (!clipped[i]) hi = fmax(hi, fabs(x[i] - est.zp));
        for (int it = 0; it < 60 && hi > 0; it++) {
            double s2 = 0.25 * (lo + hi) * (lo + hi), sw = 0, swx = 0, chi2 = 0;
            for (long i = 0; i < n; i++)
                if (!clipped[i]) {
                    double w = 1.0 / (e[i] * e[i] + s2);
                    sw += w;
                    swx += w * x[i];
                }
            double mu = swx / sw;
            for (long i = 0; i < n; i++)
                if (!clipped[i]) chi2 += (x[i] - mu) * (x[i] - mu) / (e[i] * e[i] + s2);
            if (chi2 > (double)(est.n_used - 1)) lo = 0.5 * (lo + hi);
            else hi = 0.5 * (lo + hi);
        }
        double s2 = 0.25 * (lo + hi) * (lo + hi);
        out->sigma_extra = sqrt(s2);
        for (long i = 0; i < n; i++)
            if (isfinite(e[i])) e[i] = sqrt(e[i] * e[i] + s2);
        SP_TRY(sp_zp_estimate_run(x, e, n, clip_sigma, clip_max_iters, min_stars, clipped, &est));
    }
    out->nused = est.n_used;
    out->nclipped = est.n_clipped;
    out->scatter = est.scatter;
    if ((est.flag & SP_ZP_F_FEW_STARS) || !(est.zp > 0)) {
        out->flag = SP_APCORR_F_FEW_STARS;
        goto cleanup;
    }
    out->factor = est.zp;
    out->factor_err = est.zp_err;
cleanup:
    return status;
}

int sp_apcorr_store(sp_h5 *h, const sp_cfg_zp *z, sp_apcorr_result *res_out)
{
    int status = SP_OK;
    char *bandstr = NULL;
    char (*bands)[SP_ZP_BAND_MAX] = NULL;
    char (*names)[SP_ZP_BAND_MAX + 24] = NULL;
    sp_h5_table_info info = {0};
    sp_h5_col *spec = NULL;
    double *buf = NULL, *cand = NULL, *x = NULL, *e = NULL;
    long *ncand = NULL;
    unsigned char *clip = NULL;
    ac_row *rows = NULL;
    sp_apcorr_result res = {0};
    const char *store = sp_h5_path(h);
    int nb = 0;

    SP_CHECK(h && z, SP_ERR_INTERNAL, "sp_apcorr_store: NULL argument");
    SP_CHECK(sp_h5_writable(h), SP_ERR_STATE, "%s: the store must be opened writable for the aperture correction",
             store);
    status = sp_h5_attr_get_str(h, "/", "bands", &bandstr);
    if (status != SP_OK) {
        sp_err_context("%s: not a surveyproc store (no root attribute 'bands')", store);
        goto cleanup;
    }
    SP_TRY(sp_zp_split_bands(bandstr, &bands, &nb));
    SP_TRY(sp_h5_table_describe(h, "/catalog", &info));
    long ncat = info.nrows;
    SP_ALLOC(names, (size_t)NK * (nb > 0 ? nb : 1));
    SP_ALLOC(res.band, nb > 0 ? nb : 1);
    res.nbands = nb;
    int have = 1;
    for (int b = 0; b < nb; b++)
        for (int k = 0; k < NK; k++) {
            snprintf(names[b * NK + k], sizeof names[0], kfmt[k], bands[b]);
            if (!sp_zp_has_col(&info, names[b * NK + k])) {
                SP_CHECK(k >= K_AC, SP_ERR_INPUT, "%s: /catalog has no column %s although the store lists band %s",
                         store, names[b * NK + k], bands[b]);
                have = 0;
            }
        }
    const char *fixed[] = {"CONVERGED", "excluded_any", "RE_FIT"};
    for (int k = 0; k < 3; k++)
        SP_CHECK(sp_zp_has_col(&info, fixed[k]), SP_ERR_INPUT, "%s: /catalog has no column %s (not a surveyproc store?)",
                 store, fixed[k]);
    for (int b = 0; b < nb; b++) {
        snprintf(res.band[b].band, sizeof res.band[b].band, "%s", bands[b]);
        res.band[b].factor = 1.0;
        res.band[b].factor_err = res.band[b].scatter = NAN;
        res.band[b].flag = have ? 0 : SP_APCORR_F_NO_COLUMN;
    }
    int w = 3 + NK * nb;
    SP_ALLOC(spec, w);
    SP_ALLOC(buf, (size_t)AC_CHUNK * w);
    if (have && !z->apcorr) {
        /* zp.apcorr: false — the rows go back to the model fluxes */
        for (int b = 0; b < nb; b++) res.band[b].flag = SP_APCORR_F_OFF;
        SP_INFO("zp.apcorr is false: FLUX_<band>_fit are the model fluxes (not aperture-corrected)");
        goto done;
    }
    if (!have) {
        SP_WARN("zp.apcorr: %s has no calibration-aperture columns (FLUX_<band>_APCAL, APCORR_<band>: a store of an "
                "earlier version): fluxes not aperture-corrected",
                store);
        goto done;
    }

    /* pass 1: the candidates of every band (raw model fluxes: the stored ones over APCORR) */
    for (int k = 0; k < 3; k++) sp_zp_f64_col(&spec[k], fixed[k]);
    for (int b = 0; b < nb; b++)
        for (int k = 0; k < NK; k++) sp_zp_f64_col(&spec[3 + b * NK + k], names[b * NK + k]);
    SP_ALLOC(ncand, nb > 0 ? nb : 1);
    long cap = 1024;
    SP_ALLOC(cand, (size_t)4 * cap * (nb > 0 ? nb : 1));
    for (long i0 = 0; i0 < ncat; i0 += AC_CHUNK) {
        long m = ncat - i0 < AC_CHUNK ? ncat - i0 : AC_CHUNK;
        SP_TRY(sp_h5_table_read(h, "/catalog", spec, w, i0, m, buf));
        for (long r = 0; r < m; r++) {
            const double *v = buf + r * w;
            if (v[0] != 1 || v[1] != 0 || (isfinite(v[2]) && v[2] != 0)) continue; /* converged point sources */
            for (int b = 0; b < nb; b++) {
                const double *q = v + 3 + b * NK;
                double ac = isfinite(q[K_AC]) && q[K_AC] > 0 ? q[K_AC] : 1.0;
                double f = q[K_F] / ac, fe = q[K_FE] / ac;
                if (!(f > 0 && fe > 0 && f >= z->apcorr_snr_min * fe)) continue;
                if (!(q[K_BL] <= z->apcorr_blend_max) || q[K_AF] != 0) continue;
                if (!(isfinite(q[K_A]) && q[K_AE] > 0)) continue;
                if (ncand[b] == cap) {
                    double *nc = NULL;
                    SP_ALLOC(nc, (size_t)4 * 2 * cap * nb);
                    for (int c = 0; c < nb; c++) memcpy(nc + 8 * cap * c, cand + 4 * cap * c, 4 * cap * sizeof *nc);
                    free(cand);
                    cand = nc;
                    cap *= 2;
                }
                double *d = cand + 4 * cap * b + 4 * ncand[b]++;
                d[0] = q[K_A];
                d[1] = q[K_AE];
                d[2] = f;
                d[3] = fe;
            }
        }
    }
    long nmax = 1;
    for (int b = 0; b < nb; b++) nmax = ncand[b] > nmax ? ncand[b] : nmax;
    SP_ALLOC(x, 5 * nmax);
    SP_ALLOC(e, nmax);
    SP_ALLOC(clip, nmax);
    for (int b = 0; b < nb; b++) {
        long n = ncand[b];
        double *a = x + nmax, *ae = x + 2 * nmax, *f = x + 3 * nmax, *fe = x + 4 * nmax;
        for (long i = 0; i < n; i++) {
            const double *d = cand + 4 * cap * b + 4 * i;
            a[i] = d[0];
            ae[i] = d[1];
            f[i] = d[2];
            fe[i] = d[3];
        }
        sp_apcorr_band *br = &res.band[b];
        SP_TRY(sp_apcorr_estimate(a, ae, f, fe, n, z->clip_sigma, z->clip_max_iters, z->apcorr_min_stars, x, e,
                                  clip, br));
        if (br->flag & SP_APCORR_F_FEW_STARS)
            SP_WARN("zp.apcorr %s: %ld usable point source(s) after clipping (zp.apcorr_min_stars = %d; %ld passed "
                    "SNR >= %g, BLEND <= %g): fluxes not aperture-corrected",
                    bands[b], br->nused, z->apcorr_min_stars, n, z->apcorr_snr_min, z->apcorr_blend_max);
        else {
            SP_INFO("zp.apcorr %s: factor %.4f +- %.4f (%+.4f mag) from %ld point source(s) (%ld clipped; scatter "
                    "%.4f)",
                    bands[b], br->factor, br->factor_err, -2.5 * log10(br->factor), br->nused, br->nclipped,
                    br->scatter);
            if (fabs(br->factor - 1.0) > 0.05)
                SP_WARN("zp.apcorr %s: the aperture correction is %.3f, more than 5%% from 1: the PSF model misses "
                        "(or adds) that much light; check the ePSF (docs/psf.md) and the calibration aperture "
                        "(zp.apcorr_radius_*)",
                        bands[b], br->factor);
        }
    }

done:
    /* /apcorr first (incomplete), then the rows, then complete */
    SP_TRY(sp_h5_delete(h, "/apcorr"));
    SP_TRY(sp_h5_group_create(h, "/apcorr"));
    SP_ALLOC(rows, nb > 0 ? nb : 1);
    for (int b = 0; b < nb; b++) {
        const sp_apcorr_band *br = &res.band[b];
        snprintf(rows[b].band, sizeof rows[b].band, "%s", bands[b]);
        rows[b].factor = br->factor;
        rows[b].factor_err = br->factor_err;
        rows[b].scatter = br->scatter;
        rows[b].sigma_extra = br->sigma_extra;
        rows[b].ncand = br->ncand;
        rows[b].nused = br->nused;
        rows[b].nclipped = br->nclipped;
        rows[b].flag = br->flag;
    }
    int nac = (int)(sizeof ac_cols / sizeof ac_cols[0]);
    SP_TRY(sp_h5_table_create(h, "/apcorr/bands", ac_cols, nac, nb));
    SP_TRY(sp_h5_table_write(h, "/apcorr/bands", ac_cols, nac, 0, nb, rows));
    SP_TRY(sp_h5_attr_set_str(h, "/apcorr", "method",
                              "per band: converged, unexcluded point sources with FLUX_fit/FLUXERR_fit >= snr_min, "
                              "BLEND <= blend_max, APCAL_FLAGS 0; x_i = FLUX_APCAL / model flux, err_i = "
                              "hypot(FLUXERR_APCAL, FLUXERR_fit) / model flux; factor = clipped weighted median as /zp"));
    SP_TRY(sp_h5_attr_set_double(h, "/apcorr", "radius_fwhm", z->apcorr_radius_fwhm));
    SP_TRY(sp_h5_attr_set_double(h, "/apcorr", "radius_pix", z->apcorr_radius_pix));
    SP_TRY(sp_h5_attr_set_double(h, "/apcorr", "snr_min", z->apcorr_snr_min));
    SP_TRY(sp_h5_attr_set_double(h, "/apcorr", "blend_max", z->apcorr_blend_max));
    SP_TRY(sp_h5_attr_set_long(h, "/apcorr", "min_stars", z->apcorr_min_stars));
    SP_TRY(sp_h5_attr_set_long(h, "/apcorr", "complete", 0));
    if (have && nb > 0) {
        /* pass 2: every row's model flux (stored / APCORR) x the band's factor */
        int w2 = 4 * nb;
        for (int b = 0; b < nb; b++)
            for (int k = 0; k < 4; k++) sp_zp_f64_col(&spec[b * 4 + k], names[b * NK + k]);
        for (long i0 = 0; i0 < ncat; i0 += AC_CHUNK) {
            long m = ncat - i0 < AC_CHUNK ? ncat - i0 : AC_CHUNK;
            SP_TRY(sp_h5_table_read(h, "/catalog", spec, w2, i0, m, buf));
            for (long r = 0; r < m; r++)
                for (int b = 0; b < nb; b++) {
                    double *q = buf + r * w2 + 4 * b;
                    double old = isfinite(q[K_AC]) && q[K_AC] > 0 ? q[K_AC] : 1.0;
                    const sp_apcorr_band *br = &res.band[b];
                    int corr = !(br->flag & (SP_APCORR_F_FEW_STARS | SP_APCORR_F_NO_COLUMN | SP_APCORR_F_OFF));
                    double s = corr ? br->factor : 1.0;
                    if (s != old)
                        for (int k = K_F; k <= K_FC; k++) q[k] = q[k] / old * s;
                    q[K_AC] = corr ? s : NAN;
                }
            SP_TRY(sp_h5_table_write(h, "/catalog", spec, w2, i0, m, buf));
        }
    }
    SP_TRY(sp_h5_attr_set_long(h, "/apcorr", "complete", 1));
    SP_TRY(sp_h5_flush(h));
    if (res_out) {
        *res_out = res;
        memset(&res, 0, sizeof res);
    }
cleanup:
    sp_apcorr_result_free(&res);
    free(bandstr);
    free(bands);
    free(names);
    sp_h5_table_info_free(&info);
    free(spec);
    free(buf);
    free(cand);
    free(x);
    free(e);
    free(ncand);
    free(clip);
    free(rows);
    return status;
}
