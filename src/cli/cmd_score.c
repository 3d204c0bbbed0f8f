/* cmd_score.c — `surveyproc score STORE [TRUTH_DIR | --truth truth.csv] [options]`: the
 * accuracy report of a store against the simulator's truth (serial; library in src/qa). */
#include "commands.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_mpi.h"
#include "surveyproc/sp_score.h"

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: surveyproc score STORE.h5 [TRUTH_DIR] [--truth DIR/truth.csv] [--psf DIR] [--flux fit|aper]\n"
            "                        [--json FILE] [--mag-bins LO:HI:STEP] [--snr LO:HI] [--quiet-table]\n"
            "                        [--require-... BAR ...]\n\n"
            "Scores the photometry of a store against the truth of `surveyproc simulate --out DIR`:\n"
            "sources are matched by ID (the simulator's integer id), then per band, per true type (STAR, EXP,\n"
            "DEV, GAL = EXP+DEV, ALL) and per bin of true magnitude it reports counts (truth, matched, measured,\n"
            "flagged, used), the median flux bias f/f_true - 1, the robust scatter of (f - f_true)/f_true, the\n"
            "median and robust std of the pulls (f - f_true)/sigma_f and the rms position error; for isolated\n"
            "stars (truth flags 0) with a true SNR in range, the flux scatter over the Cramér–Rao bound from the\n"
            "true PSF (DIR/sim.yaml) and the frames' noise (SKYSIG, EGAIN, ZP_AUTO of the images), with the\n"
            "position known and free, and the position scatter over its bound; the zero-point error per band\n"
            "(/zp against ZP_TRUE) and the ePSF residual (/epsf against the true PSF). docs/scoring.md has the\n"
            "definitions. Robust std = 1.4826 x MAD.\n\n"
            "  TRUTH_DIR            the simulation folder (truth.csv, sim.yaml, image_list.txt, images/)\n"
            "  --truth FILE         the truth catalog (its folder is the simulation folder); default\n"
            "                       TRUTH_DIR/truth.csv, or the folder above the store's work/ folder\n"
            "  --psf DIR            folder (or sim.yaml) of the true PSF model (default: the truth's folder)\n"
            "  --flux fit|aper      score FLUX_<b>_fit (default) or the aperture columns FLUX_<b>_APER\n"
            "  --json FILE          also write the figures as JSON (alias --out); NaN figures are null\n"
            "  --mag-bins LO:HI:ST  bins of true AB magnitude (default 14:22:1)\n"
            "  --snr LO:HI          true-SNR range of the isolated-star sample (default 20:500)\n"
            "  --aper-correct R|auto|none  with --flux aper: divide aperture fluxes and errors by the true\n"
            "                       PSF's encircled energy within R pix at each source (a point-source aperture\n"
            "                       correction, so stars are compared with their total flux); auto (default):\n"
            "                       the run's patch_run.r_ap from /provenance\n"
            "  --gal-snr MIN        galaxy sample: f_true/sigma_f >= MIN (default 50)\n"
            "  --ids-from STORE     score only the truth sources STORE has a /catalog row for (compare\n"
            "                       two codes on the same sources, e.g. a peer that measured a subset)\n"
            "  --gal-re LO:HI       galaxy sample: true Re within [LO, HI] pix (default 1:6)\n"
            "  --crowd R:FRAC       crowded sample: the densest FRAC of the truth sources by their count of\n"
            "                       neighbours within R pix (default 10:0.1)\n"
            "  --quiet-table        print only the summary and the bars\n\n"
            "Bars (the command exits 5 with a FAIL line per missed bar; a bar on a figure that cannot be\n"
            "measured fails too):\n"
            "  --require-pull-std LO:HI      star_pull_std within [LO, HI]\n"
            "  --require-scatter-crlb MAX    star_flux_scatter_over_crlb <= MAX\n"
            "  --require-bias MAX            |star_flux_bias| <= MAX\n"
            "  --require-galaxy-bias MAX     |galaxy_flux_bias| <= MAX\n"
            "  --require-match-rate MIN      match_rate >= MIN\n"
            "  --require-pos-crlb MAX        star_pos_scatter_over_crlb <= MAX\n"
            "  --require-zp-error MAX        zp_error_mag_max <= MAX (mag)\n\n"
            "JSON top-level keys (medians over bands): match_rate, star_flux_scatter_over_crlb (isolated stars,\n"
            "SNR 20-500; bound with the position free for fit columns, known for aperture columns; both also as\n"
            "_free/_known), star_pull_std, star_flux_bias, star_pos_scatter_over_crlb, galaxy_flux_bias,\n"
            "galaxy_pull_std, crowd_star_flux_bias, crowd_star_pull_std, crowd_star_scatter_over_crlb,\n"
            "zp_error_mag_max, epsf_resid_rms, epsf_flux_err_max, n_crowded, crowd_min_neighbours, notes, per_band.\n\n"
            "Exit codes: 0 ok, 2 usage, 3 bad input (missing column, no matching ID), 4 I/O (missing file),\n"
            "5 a --require bar missed.\n"
            "Example: surveyproc score DIR/work/surveyproc.h5 DIR --flux aper --json score.json\n");
}

static int parse_range(const char *opt, const char *s, double *lo, double *hi)
{
    char *e = NULL;
    *lo = strtod(s, &e);
    if (e == s || *e != ':') return SP_FAIL(SP_ERR_CONFIG, "surveyproc score: %s %s: expected LO:HI", opt, s);
    const char *t = e + 1;
    *hi = strtod(t, &e);
    if (e == t || *e || !(*hi >= *lo))
        return SP_FAIL(SP_ERR_CONFIG, "surveyproc score: %s %s: expected LO:HI with LO <= HI", opt, s);
    return SP_OK;
}

static int parse_num(const char *opt, const char *s, double *v)
{
    char *e = NULL;
    *v = strtod(s, &e);
    if (e == s || *e || !isfinite(*v)) return SP_FAIL(SP_ERR_CONFIG, "surveyproc score: %s %s: not a number", opt, s);
    return SP_OK;
}

static int is_dir(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

int sp_cmd_score(int argc, char **argv)
{
    int status = SP_OK, quiet_table = 0;
    const char *store = NULL, *tdir = NULL, *truth = NULL, *json = NULL;
    char truthbuf[4200];
    sp_score_opts o;
    sp_score_require q;
    sp_score_result r = {0};
    sp_score_opts_default(&o);
    sp_score_require_none(&q);
    if (sp_cli_wants_help(argc, argv)) {
        usage(stdout);
        return SP_OK;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (!strcmp(a, name) && v && (i++, 1))
        if (OPT("--truth")) truth = v;
        else if (OPT("--psf")) o.psf_dir = v;
        else if (OPT("--ids-from")) o.ids_from = v;
        else if (OPT("--json") || OPT("--out")) json = v;
        else if (OPT("--flux")) {
            if (!strcmp(v, "fit")) o.flux = SP_SCORE_FLUX_FIT;
            else if (!strcmp(v, "aper")) o.flux = SP_SCORE_FLUX_APER;
            else SP_CHECK(0, SP_ERR_CONFIG, "surveyproc score: --flux %s: expected fit or aper", v);
        } else if (OPT("--mag-bins")) {
            int k = sscanf(v, "%lf:%lf:%lf", &o.mag_lo, &o.mag_hi, &o.mag_step);
            SP_CHECK(k == 3 && o.mag_step > 0 && o.mag_hi > o.mag_lo, SP_ERR_CONFIG,
                     "surveyproc score: --mag-bins %s: expected LO:HI:STEP with LO < HI, STEP > 0", v);
        } else if (OPT("--snr")) SP_TRY(parse_range(a, v, &o.snr_lo, &o.snr_hi));
        else if (OPT("--aper-correct")) {
            if (!strcmp(v, "auto")) o.aper_r = -1;
            else if (!strcmp(v, "none")) o.aper_r = 0;
            else {
                SP_TRY(parse_num(a, v, &o.aper_r));
                SP_CHECK(o.aper_r > 0, SP_ERR_CONFIG, "surveyproc score: --aper-correct %s: give a radius > 0 (pix), auto or none", v);
            }
        } else if (OPT("--gal-snr")) SP_TRY(parse_num(a, v, &o.gal_snr_min));
        else if (OPT("--gal-re")) SP_TRY(parse_range(a, v, &o.gal_re_lo, &o.gal_re_hi));
        else if (OPT("--crowd")) {
            SP_TRY(parse_range(a, v, &o.crowd_radius, &o.crowd_fraction));
            SP_CHECK(o.crowd_radius > 0 && o.crowd_fraction > 0 && o.crowd_fraction <= 1, SP_ERR_CONFIG,
                     "surveyproc score: --crowd %s: expected R:FRAC with R > 0 pix and FRAC in (0, 1]", v);
        }
        else if (OPT("--require-pull-std")) SP_TRY(parse_range(a, v, &q.pull_std_lo, &q.pull_std_hi));
        else if (OPT("--require-scatter-crlb")) SP_TRY(parse_num(a, v, &q.scatter_crlb_max));
        else if (OPT("--require-bias")) SP_TRY(parse_num(a, v, &q.bias_max));
        else if (OPT("--require-galaxy-bias")) SP_TRY(parse_num(a, v, &q.galaxy_bias_max));
        else if (OPT("--require-match-rate")) SP_TRY(parse_num(a, v, &q.match_rate_min));
        else if (OPT("--require-pos-crlb")) SP_TRY(parse_num(a, v, &q.pos_crlb_max));
        else if (OPT("--require-zp-error")) SP_TRY(parse_num(a, v, &q.zp_error_max));
        else if (!strcmp(a, "--quiet-table")) quiet_table = 1;
        else if (a[0] == '-') SP_CHECK(0, SP_ERR_CONFIG, "surveyproc score: unknown option '%s' or missing value (see --help)", a);
        else if (!store) store = a;
        else if (!tdir) tdir = a;
        else SP_CHECK(0, SP_ERR_CONFIG, "surveyproc score: unexpected argument '%s' (see --help)", a);
#undef OPT
    }
    SP_CHECK(store, SP_ERR_CONFIG, "surveyproc score: missing STORE.h5 (see --help)");
    if (!truth) {
        if (tdir) {
            SP_CHECK(is_dir(tdir), SP_ERR_IO, "surveyproc score: %s: not a folder (give the simulation folder, or "
                                              "--truth FILE)", tdir);
            snprintf(truthbuf, sizeof truthbuf, "%s/truth.csv", tdir);
        } else {
            /* DIR/work/surveyproc.h5 -> DIR/truth.csv, the layout `simulate` + `run` make */
            snprintf(truthbuf, sizeof truthbuf, "%s", store);
            char *s = strrchr(truthbuf, '/');
            if (s) *s = '\0';
            else snprintf(truthbuf, sizeof truthbuf, ".");
            size_t l = strlen(truthbuf);
            snprintf(truthbuf + l, sizeof truthbuf - l, "/../truth.csv");
        }
        truth = truthbuf;
    } else {
        SP_CHECK(!tdir, SP_ERR_CONFIG, "surveyproc score: give TRUTH_DIR or --truth, not both");
    }
    if (sp_mpi_rank() != 0) goto agree; /* serial: under mpirun only rank 0 works */
    status = sp_score_run(store, truth, &o, &r);
    if (status == SP_OK) {
        if (quiet_table) {
            printf("score: matched %ld of %ld; star_flux_bias %.4g, star_pull_std %.4g, "
                   "star_flux_scatter_over_crlb %.4g, galaxy_flux_bias %.4g\n",
                   r.n_matched, r.n_truth, r.star_flux_bias, r.star_pull_std, r.star_flux_scatter_over_crlb,
                   r.galaxy_flux_bias);
        } else {
            sp_score_print(stdout, &r);
        }
        if (json) {
            status = sp_score_write_json(json, &r);
            if (status == SP_OK) printf("wrote %s\n", json);
        }
    }
    if (status == SP_OK) {
        char msg[2048];
        int nfail = 0;
        sp_score_check(&r, &q, msg, sizeof msg, &nfail);
        if (msg[0]) printf("bars:\n%s", msg);
        fflush(stdout);
        if (nfail) status = SP_FAIL(SP_ERR_NUMERIC, "score: %d bar(s) missed (the FAIL lines above)", nfail);
    }
agree:
    SP_TRY(sp_mpi_agree(status, MPI_COMM_WORLD));
cleanup:
    sp_score_result_free(&r);
    return status;
}
