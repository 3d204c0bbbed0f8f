/* score_report.c — the scorer's outputs: the readable table, the JSON report and the
 * pass/fail bars (sp_score.h). */
#include "surveyproc/sp_score.h"
#include "surveyproc/sp_error.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- table ----------------------------------------------------------------------- */

static const char *num(char *buf, size_t n, const char *fmt, double v)
{
    if (!isfinite(v)) snprintf(buf, n, "-");
    else snprintf(buf, n, fmt, v);
    return buf;
}

static void stats_row(FILE *f, const char *label, const char *bin, const sp_score_stats *st)
{
    char a[5][24];
    fprintf(f, "  %-5s %-9s %6ld %6ld %6ld %5ld %5ld %8s %8s %8s %8s %7s\n", label, bin, st->n_truth, st->n_matched,
            st->n_measured, st->n_flagged, st->n_used, num(a[0], 24, "%+.4f", st->bias),
            num(a[1], 24, "%.4f", st->scatter), num(a[2], 24, "%+.3f", st->pull_median),
            num(a[3], 24, "%.3f", st->pull_std), num(a[4], 24, "%.3f", st->pos_rms));
}

void sp_score_print(FILE *f, const sp_score_result *r)
{
    char a[8][24];
    const int fit = r->flux == SP_SCORE_FLUX_FIT;
    fprintf(f, "score: %s against %s\n", r->store, r->truth);
    fprintf(f, "flux columns: %s (units: flux with zp_ref %.2f)\n", fit ? "FLUX_<band>_fit, FLUXERR_<band>_fit"
                                                                        : "FLUX_<band>_APER, FLUXERR_<band>_APER",
            r->zp_ref);
    fprintf(f, "matched %ld of %ld truth sources (match_rate %.4f); %ld store rows, %ld without a truth source\n",
            r->n_matched, r->n_truth, r->match_rate, r->n_rows, r->n_rows_unmatched);
    if (r->opts.ids_from)
        fprintf(f, "restricted (--ids-from) to the %ld truth sources with a /catalog row in %s\n", r->n_truth,
                r->opts.ids_from);
    fprintf(f, "bias = median f/f_true - 1; scatter = robust sigma of (f - f_true)/f_true; pulls (f - f_true)/sigma_f;\n"
               "pos = rms |fit - true| (pix); used = measured and not flagged\n");
    for (int b = 0; b < r->nbands; b++) {
        const sp_score_band *B = &r->band[b];
        fprintf(f, "\nband %s: %d frame(s); ZP %s (truth %s, error %s mag); ePSF residual %s, flux error per cell "
                   "rms %s max %s%s\n",
                B->name, B->nframes, num(a[0], 24, "%.4f", B->zp), num(a[1], 24, "%.4f", B->zp_expected),
                num(a[2], 24, "%+.4f", B->zp_error), num(a[3], 24, "%.4f", B->epsf_resid),
                num(a[4], 24, "%.4f", B->epsf_flux_rms), num(a[5], 24, "%.4f", B->epsf_flux_max),
                B->flux_all_nan ? "  [flux column NaN on every row]" : "");
        if (isfinite(B->aper_corr))
            fprintf(f, "  aperture fluxes and errors divided by the true PSF's encircled energy within r = %g pix "
                       "(median %.4f)\n", r->opts.aper_r, B->aper_corr);
        fprintf(f, "  %-5s %-9s %6s %6s %6s %5s %5s %8s %8s %8s %8s %7s\n", "type", "mag", "truth", "match", "meas",
                "flag", "used", "bias", "scatter", "pull_med", "pull_std", "pos");
        for (int t = 0; t < SP_SCORE_NTYPE; t++) stats_row(f, sp_score_type_names[t], "all", &B->type[t]);
        const int show[2] = {SP_SCORE_STAR, SP_SCORE_GAL};
        for (int s = 0; s < 2; s++)
            for (int k = 0; k < B->nbins; k++) {
                const sp_score_stats *st = &B->bin[k * SP_SCORE_NTYPE + show[s]];
                if (st->n_truth == 0) continue;
                char bin[24];
                snprintf(bin, sizeof bin, "%.1f-%.1f", st->mag_lo, st->mag_hi);
                stats_row(f, sp_score_type_names[show[s]], bin, st);
            }
        const sp_score_stats *i = &B->iso;
        fprintf(f, "  isolated stars, SNR %g-%g: %ld used (%ld with a bound, median SNR %s): bias %s, pull std %s,\n"
                   "    scatter/CRLB %s (position known) %s (position free), position scatter/CRLB %s\n",
                r->opts.snr_lo, r->opts.snr_hi, i->n_used, i->n_crlb, num(a[0], 24, "%.0f", i->snr_median),
                num(a[1], 24, "%+.4f", i->bias), num(a[2], 24, "%.3f", i->pull_std),
                num(a[3], 24, "%.3f", i->scatter_over_crlb_known), num(a[4], 24, "%.3f", i->scatter_over_crlb_free),
                num(a[5], 24, "%.3f", i->pos_over_crlb));
        fprintf(f, "  isolated galaxies, Re %g-%g pix, f_true/sigma_f >= %g: %ld used: bias %s, scatter %s, pull std %s\n",
                r->opts.gal_re_lo, r->opts.gal_re_hi, r->opts.gal_snr_min, B->gal.n_used,
                num(a[0], 24, "%+.4f", B->gal.bias), num(a[1], 24, "%.4f", B->gal.scatter),
                num(a[2], 24, "%.3f", B->gal.pull_std));
        const sp_score_stats *c = &B->crowd;
        fprintf(f, "  crowded stars, SNR %g-%g: %ld used (%ld with a bound): bias %s, pull std %s,\n"
                   "    scatter/CRLB (isolated-star bound) %s (position known) %s (position free)\n",
                r->opts.snr_lo, r->opts.snr_hi, c->n_used, c->n_crlb, num(a[0], 24, "%+.4f", c->bias),
                num(a[1], 24, "%.3f", c->pull_std), num(a[2], 24, "%.3f", c->scatter_over_crlb_known),
                num(a[3], 24, "%.3f", c->scatter_over_crlb_free));
        for (int k = 0; k < B->nbins && B->crowd_bin; k++) {
            const sp_score_stats *st = &B->crowd_bin[k];
            if (st->n_truth == 0) continue;
            char bin[24];
            snprintf(bin, sizeof bin, "%.1f-%.1f", st->mag_lo, st->mag_hi);
            stats_row(f, "CRWD", bin, st);
        }
    }
    fprintf(f, "\ncrowded sample: the %ld truth sources (%.1f%%) with >= %ld neighbours within %g pix (densest %g); "
               "CRWD rows: its stars without a saturated / bad-pixel / edge / forced-bright flag\n",
            r->n_crowded, r->n_truth > 0 ? 100.0 * (double)r->n_crowded / (double)r->n_truth : 0.0,
            r->crowd_min_neighbours, r->opts.crowd_radius, r->opts.crowd_fraction);
    fprintf(f, "\nsummary (medians over bands): match_rate %.4f, star_flux_bias %s, star_pull_std %s,\n"
               "  star_flux_scatter_over_crlb %s (%s), star_pos_scatter_over_crlb %s,\n"
               "  galaxy_flux_bias %s, galaxy_pull_std %s, zp_error_mag_max %s, epsf_resid_rms %s (%.2f s)\n",
            r->match_rate, num(a[0], 24, "%+.4f", r->star_flux_bias), num(a[1], 24, "%.3f", r->star_pull_std),
            num(a[2], 24, "%.3f", r->star_flux_scatter_over_crlb), fit ? "position free" : "position known",
            num(a[3], 24, "%.3f", r->star_pos_scatter_over_crlb), num(a[4], 24, "%+.4f", r->galaxy_flux_bias),
            num(a[5], 24, "%.3f", r->galaxy_pull_std), num(a[6], 24, "%.4f", r->zp_error_mag_max),
            num(a[7], 24, "%.4f", r->epsf_resid_rms), r->seconds);
    fprintf(f, "  epsf_flux_err_max %s (the worst cell's ePSF flux error on a faint star)\n",
            num(a[0], 24, "%.4f", r->epsf_flux_err_max));
    fprintf(f, "  crowd_star_flux_bias %s, crowd_star_pull_std %s, crowd_star_scatter_over_crlb %s\n",
            num(a[0], 24, "%+.4f", r->crowd_star_flux_bias), num(a[1], 24, "%.3f", r->crowd_star_pull_std),
            num(a[2], 24, "%.3f", r->crowd_star_scatter_over_crlb));
    if (r->notes && r->notes[0]) {
        fprintf(f, "notes:\n");
        const char *p = r->notes;
        while (*p) {
            const char *e = strchr(p, '\n');
            size_t l = e ? (size_t)(e - p) : strlen(p);
            fprintf(f, "  - %.*s\n", (int)l, p);
            p += l + (e ? 1 : 0);
        }
    }
}

/* ---- JSON -------------------------------------------------------------------------- */

static void jnum(FILE *f, double v)
{
    if (isfinite(v)) fprintf(f, "%.10g", v);
    else fprintf(f, "null");
}

static void jstr(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fprintf(f, "\\n");
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void jstats(FILE *f, const sp_score_stats *st, int crlb)
{
    fprintf(f, "{\"n_truth\": %ld, \"n_matched\": %ld, \"n_measured\": %ld, \"n_flagged\": %ld, \"n_used\": %ld",
            st->n_truth, st->n_matched, st->n_measured, st->n_flagged, st->n_used);
    if (isfinite(st->mag_lo)) {
        fprintf(f, ", \"mag_lo\": ");
        jnum(f, st->mag_lo);
        fprintf(f, ", \"mag_hi\": ");
        jnum(f, st->mag_hi);
    }
    const struct {
        const char *k;
        double v;
    } kv[] = {{"bias", st->bias},         {"scatter", st->scatter}, {"pull_median", st->pull_median},
              {"pull_std", st->pull_std}, {"pos_rms", st->pos_rms}};
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++) {
        fprintf(f, ", \"%s\": ", kv[i].k);
        jnum(f, kv[i].v);
    }
    fprintf(f, ", \"n_pos\": %ld", st->n_pos);
    if (crlb) {
        fprintf(f, ", \"n_crlb\": %ld, \"snr_median\": ", st->n_crlb);
        jnum(f, st->snr_median);
        fprintf(f, ", \"scatter_over_crlb_known\": ");
        jnum(f, st->scatter_over_crlb_known);
        fprintf(f, ", \"scatter_over_crlb_free\": ");
        jnum(f, st->scatter_over_crlb_free);
        fprintf(f, ", \"pos_over_crlb\": ");
        jnum(f, st->pos_over_crlb);
    }
    fprintf(f, "}");
}

int sp_score_write_json(const char *path, const sp_score_result *r)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return SP_FAIL(SP_ERR_IO, "%s: cannot write the JSON report: %s", path, strerror(errno));
    fprintf(f, "{\n  \"store\": ");
    jstr(f, r->store);
    fprintf(f, ",\n  \"truth\": ");
    jstr(f, r->truth);
    fprintf(f, ",\n  \"flux\": \"%s\",\n  \"zp_ref\": ", r->flux == SP_SCORE_FLUX_FIT ? "fit" : "aper");
    jnum(f, r->zp_ref);
    fprintf(f, ",\n  \"n_truth\": %ld,\n  \"n_rows\": %ld,\n  \"n_matched\": %ld,\n  \"n_rows_unmatched\": %ld",
            r->n_truth, r->n_rows, r->n_matched, r->n_rows_unmatched);
    const struct {
        const char *k;
        double v;
    } top[] = {{"match_rate", r->match_rate},
               {"star_flux_scatter_over_crlb", r->star_flux_scatter_over_crlb},
               {"star_flux_scatter_over_crlb_known", r->star_flux_scatter_over_crlb_known},
               {"star_flux_scatter_over_crlb_free", r->star_flux_scatter_over_crlb_free},
               {"star_pull_std", r->star_pull_std},
               {"star_flux_bias", r->star_flux_bias},
               {"star_pos_scatter_over_crlb", r->star_pos_scatter_over_crlb},
               {"galaxy_flux_bias", r->galaxy_flux_bias},
               {"galaxy_pull_std", r->galaxy_pull_std},
               {"zp_error_mag_max", r->zp_error_mag_max},
               {"epsf_resid_rms", r->epsf_resid_rms},
               {"epsf_flux_err_max", r->epsf_flux_err_max},
               {"crowd_star_flux_bias", r->crowd_star_flux_bias},
               {"crowd_star_pull_std", r->crowd_star_pull_std},
               {"crowd_star_scatter_over_crlb", r->crowd_star_scatter_over_crlb},
               {"seconds", r->seconds}};
    for (size_t i = 0; i < sizeof top / sizeof top[0]; i++) {
        fprintf(f, ",\n  \"%s\": ", top[i].k);
        jnum(f, top[i].v);
    }
    fprintf(f, ",\n  \"options\": {\"mag_lo\": %g, \"mag_hi\": %g, \"mag_step\": %g, \"snr_lo\": %g, \"snr_hi\": %g, "
               "\"gal_snr_min\": %g, \"gal_re_lo\": %g, \"gal_re_hi\": %g, \"crowd_radius\": %g, "
               "\"crowd_fraction\": %g, \"aper_r\": %g}",
            r->opts.mag_lo, r->opts.mag_hi, r->opts.mag_step, r->opts.snr_lo, r->opts.snr_hi, r->opts.gal_snr_min,
            r->opts.gal_re_lo, r->opts.gal_re_hi, r->opts.crowd_radius, r->opts.crowd_fraction, r->opts.aper_r);
    fprintf(f, ",\n  \"ids_from\": ");
    if (r->opts.ids_from) jstr(f, r->opts.ids_from);
    else fprintf(f, "null");
    fprintf(f, ",\n  \"n_crowded\": %ld,\n  \"crowd_min_neighbours\": %ld", r->n_crowded, r->crowd_min_neighbours);
    fprintf(f, ",\n  \"notes\": [");
    int first = 1;
    for (const char *p = r->notes ? r->notes : ""; *p;) {
        const char *e = strchr(p, '\n');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        char *line = strndup(p, l);
        if (line) {
            fprintf(f, "%s", first ? "" : ", ");
            jstr(f, line);
            first = 0;
            free(line);
        }
        p += l + (e ? 1 : 0);
    }
    fprintf(f, "],\n  \"per_band\": {");
    for (int b = 0; b < r->nbands; b++) {
        const sp_score_band *B = &r->band[b];
        fprintf(f, "%s\n    ", b ? "," : "");
        jstr(f, B->name);
        fprintf(f, ": {\n      \"nframes\": %d, \"flux_all_nan\": %s, \"zp\": ", B->nframes,
                B->flux_all_nan ? "true" : "false");
        jnum(f, B->zp);
        fprintf(f, ", \"zp_expected\": ");
        jnum(f, B->zp_expected);
        fprintf(f, ", \"zp_error\": ");
        jnum(f, B->zp_error);
        fprintf(f, ", \"epsf_resid\": ");
        jnum(f, B->epsf_resid);
        fprintf(f, ", \"epsf_flux_rms\": ");
        jnum(f, B->epsf_flux_rms);
        fprintf(f, ", \"epsf_flux_max\": ");
        jnum(f, B->epsf_flux_max);
        fprintf(f, ", \"aper_corr\": ");
        jnum(f, B->aper_corr);
        fprintf(f, ",\n      \"isolated_stars\": ");
        jstats(f, &B->iso, 1);
        fprintf(f, ",\n      \"galaxies\": ");
        jstats(f, &B->gal, 0);
        fprintf(f, ",\n      \"crowded_stars\": ");
        jstats(f, &B->crowd, 1);
        fprintf(f, ",\n      \"crowded_star_bins\": [");
        for (int k = 0; k < B->nbins && B->crowd_bin; k++) {
            fprintf(f, "%s\n        ", k ? "," : "");
            jstats(f, &B->crowd_bin[k], 0);
        }
        fprintf(f, "]");
        fprintf(f, ",\n      \"types\": {");
        for (int t = 0; t < SP_SCORE_NTYPE; t++) {
            fprintf(f, "%s\n        \"%s\": ", t ? "," : "", sp_score_type_names[t]);
            jstats(f, &B->type[t], 0);
        }
        fprintf(f, "},\n      \"mag_bins\": {");
        for (int t = 0; t < SP_SCORE_NTYPE; t++) {
            fprintf(f, "%s\n        \"%s\": [", t ? "," : "", sp_score_type_names[t]);
            for (int k = 0; k < B->nbins; k++) {
                fprintf(f, "%s\n          ", k ? "," : "");
                jstats(f, &B->bin[k * SP_SCORE_NTYPE + t], 0);
            }
            fprintf(f, "]");
        }
        fprintf(f, "}\n    }");
    }
    fprintf(f, "\n  }\n}\n");
    int bad = ferror(f);
    if (fclose(f) != 0) bad = 1;
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return SP_FAIL(SP_ERR_IO, "%s: cannot write the JSON report: %s", path, strerror(e));
    }
    return SP_OK;
}

/* ---- bars -------------------------------------------------------------------------- */

void sp_score_check(const sp_score_result *r, const sp_score_require *q, char *msg, size_t n, int *nfail)
{
    size_t used = 0;
    *nfail = 0;
    if (n) msg[0] = '\0';
    struct {
        int set;
        const char *name;
        double v;
        int pass;
        char bar[64];
    } b[7];
    int nb = 0;
#define ADD(cond, nm, val, okexpr, ...)                                                                            \
    do {                                                                                                           \
        if (cond) {                                                                                                \
            b[nb].set = 1;                                                                                         \
            b[nb].name = nm;                                                                                       \
            b[nb].v = (val);                                                                                       \
            double v = b[nb].v;                                                                                    \
            b[nb].pass = isfinite(v) && (okexpr);                                                                  \
            snprintf(b[nb].bar, sizeof b[nb].bar, __VA_ARGS__);                                                    \
            nb++;                                                                                                  \
        }                                                                                                          \
    } while (0)
    ADD(isfinite(q->pull_std_lo) || isfinite(q->pull_std_hi), "star_pull_std", r->star_pull_std,
        (!isfinite(q->pull_std_lo) || v >= q->pull_std_lo) && (!isfinite(q->pull_std_hi) || v <= q->pull_std_hi),
        "in [%g, %g]", q->pull_std_lo, q->pull_std_hi);
    ADD(isfinite(q->scatter_crlb_max), "star_flux_scatter_over_crlb", r->star_flux_scatter_over_crlb,
        v <= q->scatter_crlb_max, "<= %g", q->scatter_crlb_max);
    ADD(isfinite(q->bias_max), "|star_flux_bias|", r->star_flux_bias, fabs(v) <= q->bias_max, "<= %g", q->bias_max);
    ADD(isfinite(q->galaxy_bias_max), "|galaxy_flux_bias|", r->galaxy_flux_bias, fabs(v) <= q->galaxy_bias_max,
        "<= %g", q->galaxy_bias_max);
    ADD(isfinite(q->match_rate_min), "match_rate", r->match_rate, v >= q->match_rate_min, ">= %g", q->match_rate_min);
    ADD(isfinite(q->pos_crlb_max), "star_pos_scatter_over_crlb", r->star_pos_scatter_over_crlb,
        v <= q->pos_crlb_max, "<= %g", q->pos_crlb_max);
    ADD(isfinite(q->zp_error_max), "zp_error_mag_max", r->zp_error_mag_max, v <= q->zp_error_max, "<= %g",
        q->zp_error_max);
#undef ADD
    for (int i = 0; i < nb; i++) {
        if (!b[i].pass) (*nfail)++;
        if (used >= n) continue;
        if (isfinite(b[i].v))
            used += (size_t)snprintf(msg + used, n - used, "%s %s = %.4g (required %s)\n", b[i].pass ? "PASS" : "FAIL",
                                     b[i].name, b[i].v, b[i].bar);
        else
            used += (size_t)snprintf(msg + used, n - used, "FAIL %s = null: not measurable in this store (required %s)\n",
                                     b[i].name, b[i].bar);
    }
}
