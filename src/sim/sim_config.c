/* sim_config.c — the simulator's own settings: presets, a flat YAML file of
 * overrides (libyaml), validation, and the resolved file (sim.yaml) that lets
 * sp_sim_load rebuild a simulation exactly.
 *
 * One table (keys[]) names every key, its type, range and meaning; parsing,
 * writing and --help all read it, so they cannot drift apart. */
#include "sim_private.h"
#include "surveyproc/sp_error.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

typedef enum { K_STR, K_U64, K_LONG, K_INT, K_DBL, K_BOOL, K_BANDS } ktype;

typedef struct {
    const char *name;
    ktype type;
    size_t off;
    double min, max; /* inclusive; ignored when min == max */
    const char *doc;
} skey;

#define O(f) offsetof(sp_sim_config, f)
static const skey keys[] = {
    {"preset", K_STR, O(preset), 0, 0, "defaults to start from: tiny | demo | bench | big"},
    {"seed", K_U64, O(seed), 0, 0, "random seed; same seed -> same bytes for any thread/rank count"},
    {"nx", K_LONG, O(nx), 32, 65536, "tile width (pixels)"},
    {"ny", K_LONG, O(ny), 32, 65536, "tile height (pixels)"},
    {"bands", K_BANDS, O(nbands), 1, SP_SIM_MAX_BANDS, "number of bands, or a list of names [m400, m525, ...]"},
    {"frames_per_band", K_INT, O(frames_per_band), 1, 16, "frames per band, each with its own noise"},
    {"n_stars", K_LONG, O(n_stars), 0, 1e8, "stars (including cluster members, excluding n_bright)"},
    {"n_galaxies", K_LONG, O(n_galaxies), 0, 1e8, "galaxies (EXP and DEV)"},
    {"n_bright", K_INT, O(n_bright), 0, 10000, "extra very bright stars that saturate"},
    {"star_mag_min", K_DBL, O(star_mag_min), 5, 30, "brightest ordinary star (AB at 625 nm)"},
    {"star_mag_max", K_DBL, O(star_mag_max), 5, 30, "faintest star"},
    {"star_slope", K_DBL, O(star_slope), 0, 1, "star counts dN/dm ~ 10^(slope m)"},
    {"star_bright_mag", K_DBL, O(star_bright_mag), 0, 30, "n_bright stars are drawn in [this, this + 1.5]"},
    {"gal_mag_min", K_DBL, O(gal_mag_min), 5, 30, "brightest galaxy"},
    {"gal_mag_max", K_DBL, O(gal_mag_max), 5, 30, "faintest galaxy"},
    {"gal_slope", K_DBL, O(gal_slope), 0, 1, "galaxy counts slope"},
    {"dev_fraction", K_DBL, O(dev_fraction), 0, 1, "share of DEV galaxies (rest are EXP)"},
    {"re_median", K_DBL, O(re_median), 0.3, 30, "median half-light radius at mag 18 (pixels)"},
    {"re_max", K_DBL, O(re_max), 0.3, 30, "largest half-light radius (pixels)"},
    {"n_clusters", K_INT, O(n_clusters), 0, 1000, "dense star clusters"},
    {"cluster_fraction", K_DBL, O(cluster_fraction), 0, 1, "share of stars in clusters"},
    {"cluster_radius", K_DBL, O(cluster_radius), 1, 1000, "Plummer scale radius (pixels)"},
    {"pixscale", K_DBL, O(pixscale), 0.01, 10, "arcsec per pixel"},
    {"ra0", K_DBL, O(ra0), 0, 360, "tile centre RA (deg)"},
    {"dec0", K_DBL, O(dec0), -89, 89, "tile centre Dec (deg)"},
    {"rotation", K_DBL, O(rotation), -180, 180, "rotation of the pixel grid (deg)"},
    {"sip_amp", K_DBL, O(sip_amp), 0, 20, "SIP distortion at the corners (pixels); 0: plain TAN"},
    {"fwhm", K_DBL, O(fwhm), 1, 30, "PSF core FWHM at 625 nm, tile centre (pixels)"},
    {"fwhm_var", K_DBL, O(fwhm_var), 0, 0.3, "relative FWHM variation over the field"},
    {"beta", K_DBL, O(beta), 1.5, 10, "Moffat beta at the tile centre"},
    {"ell_max", K_DBL, O(ell_max), 0, 0.4, "PSF ellipticity scale (1 - b/a)"},
    {"wing_frac", K_DBL, O(wing_frac), 0, 0.3, "share of PSF flux in a wide circular wing (0: none)"},
    {"wing_fwhm_factor", K_DBL, O(wing_fwhm_factor), 1, 10, "wing FWHM / core FWHM"},
    {"wing_beta", K_DBL, O(wing_beta), 1.2, 10, "wing Moffat beta"},
    {"psf_radius", K_DBL, O(psf_radius), 3, 200, "PSF tapered to 0 at this radius (pixels)"},
    {"oversample", K_INT, O(oversample), 5, 15, "galaxy convolution oversampling (odd)"},
    {"zp", K_DBL, O(zp), 15, 35, "ZP_AUTO of the most sensitive band"},
    {"sky_mag", K_DBL, O(sky_mag), 15, 30, "sky AB mag/arcsec^2 at 400 nm (1.5 mag brighter at 875 nm)"},
    {"sky_gradient", K_DBL, O(sky_gradient), 0, 0.5, "relative sky change centre -> edge"},
    {"sky_subtracted", K_BOOL, O(sky_subtracted), 0, 0, "frames sky-subtracted (a residual remains)"},
    {"bg_residual", K_DBL, O(bg_residual), 0, 100, "residual background amplitude (units of SKYSIG)"},
    {"egain", K_DBL, O(egain), 0.01, 1000, "electrons per ADU (frames scatter by +-5%)"},
    {"read_noise", K_DBL, O(read_noise), 0, 1000, "read noise (electrons)"},
    {"saturate", K_DBL, O(saturate), 1, 1e12, "SATURATE (ADU): pixels are clipped there"},
    {"exptime", K_DBL, O(exptime), 0.001, 1e7, "EXPTIME (s)"},
    {"frame_zp_jitter", K_DBL, O(frame_zp_jitter), 0, 1, "ZP scatter between frames (mag)"},
    {"zp_header_error", K_DBL, O(zp_header_error), 0, 1, "ZP_AUTO = true ZP + N(0, this) (ZP_TRUE has the truth)"},
    {"noise", K_BOOL, O(noise), 0, 0, "add Poisson and read noise (false: noise-free frames)"},
    {"n_bad_columns", K_INT, O(n_bad_columns), 0, 10000, "bad (NaN) column segments per frame"},
    {"nan_fraction", K_DBL, O(nan_fraction), 0, 0.1, "share of scattered NaN pixels per frame"},
    {"flux_perturb", K_DBL, O(flux_perturb), 0, 3, "input catalog FLUX_b = true * exp(N(0, this))"},
    {"pos_perturb", K_DBL, O(pos_perturb), 0, 10, "input catalog position noise (pixels per axis)"},
    {"shape_perturb", K_DBL, O(shape_perturb), 0, 1, "input catalog relative noise on Re, ELL, THETA"},
    {"type_blank_fraction", K_DBL, O(type_blank_fraction), 0, 1, "share of blank TYPE in the input catalog"},
    {"ref_mag_min", K_DBL, O(ref_mag_min), 0, 30, "reference catalog: brightest (AB, every band)"},
    {"ref_mag_max", K_DBL, O(ref_mag_max), 0, 30, "reference catalog: faintest (AB, at 625 nm)"},
    {"ref_mag_noise", K_DBL, O(ref_mag_noise), 0, 1, "reference catalog magnitude noise (mag)"},
    {"epsf_ngrid", K_INT, O(epsf_ngrid), 1, 64, "pipeline config: ePSF cells per side"},
    {"ngrid", K_INT, O(ngrid), 1, 64, "pipeline config: patches per cell side"},
    {"truth_psf_ngrid", K_INT, O(truth_psf_ngrid), 0, 64, "true PSF stamps per side (0: epsf_ngrid)"},
    {"truth_psf_oversamp", K_INT, O(truth_psf_oversamp), 0, 4,
     "samples per pixel of the true PSF stamps (0: 1); > 1 gives a grid epsf.given_psf can use"},
    {"block_rows", K_INT, O(block_rows), 16, 4096, "rows rendered per block"},
};
#undef O
#define NKEYS (int)(sizeof keys / sizeof keys[0])

char *sim_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int sp_sim_config_preset(const char *preset, sp_sim_config *c)
{
    static const char *names[] = {"tiny", "demo", "bench", "big"};
    int k = -1;
    for (int i = 0; i < 4; i++)
        if (preset && !strcmp(preset, names[i])) k = i;
    if (k < 0)
        return SP_FAIL(SP_ERR_CONFIG, "unknown simulator preset '%s' (allowed: tiny, demo, bench, big)",
                       preset ? preset : "(null)");
    memset(c, 0, sizeof *c);
    snprintf(c->preset, sizeof c->preset, "%s", names[k]);
    /* shared: a 7DT-like medium-band tile (0.505"/pix, ~1.8" seeing, 5-sigma depth ~20.3 mag) */
    c->seed = 1;
    c->frames_per_band = 1;
    c->star_mag_min = 14.0;
    c->star_mag_max = 21.5;
    c->star_slope = 0.30;
    c->star_bright_mag = 9.5;
    c->gal_mag_min = 16.5;
    c->gal_mag_max = 21.5;
    c->gal_slope = 0.45;
    c->dev_fraction = 0.3;
    c->re_median = 2.5;
    c->re_max = 8.0;
    c->cluster_fraction = 0.25;
    c->pixscale = 0.505;
    c->ra0 = 150.0;
    c->dec0 = 2.2;
    c->rotation = 0.3;
    c->sip_amp = 0.3;
    c->fwhm = 3.6;
    c->fwhm_var = 0.08;
    c->beta = 3.0;
    c->ell_max = 0.06;
    c->wing_frac = 0.03;
    c->wing_fwhm_factor = 3.0;
    c->wing_beta = 2.0;
    c->psf_radius = 20.0;
    c->oversample = 5;
    c->zp = 25.8;
    c->sky_mag = 22.0;
    c->sky_gradient = 0.05;
    c->sky_subtracted = 1;
    c->bg_residual = 0.5;
    c->egain = 1.0;
    c->read_noise = 4.0;
    c->saturate = 60000.0;
    c->exptime = 540.0;
    c->frame_zp_jitter = 0.03;
    c->noise = 1;
    c->nan_fraction = 2e-4;
    c->flux_perturb = 0.2;
    c->pos_perturb = 0.05;
    c->shape_perturb = 0.1;
    c->type_blank_fraction = 0.1;
    c->ref_mag_min = 13.5;
    c->ref_mag_max = 18.5;
    c->ref_mag_noise = 0.01;
    c->block_rows = 128;
    switch (k) {
    case 0: /* tiny: seconds, for tests */
        c->nx = c->ny = 256;
        c->nbands = 3;
        c->n_stars = 120;
        c->n_galaxies = 40;
        c->n_bright = 1;
        c->re_max = 5.0;
        c->n_clusters = 1;
        c->cluster_radius = 12;
        c->psf_radius = 15;
        c->n_bad_columns = 1;
        c->epsf_ngrid = 2;
        c->ngrid = 2;
        break;
    case 1: /* demo */
        c->nx = c->ny = 1024;
        c->nbands = 4;
        c->frames_per_band = 2;
        c->n_stars = 1200;
        c->n_galaxies = 300;
        c->n_bright = 2;
        c->n_clusters = 2;
        c->cluster_radius = 25;
        c->n_bad_columns = 2;
        c->epsf_ngrid = 2;
        c->ngrid = 4;
        break;
    case 2: /* bench: the seed pipeline's test size */
        c->nx = c->ny = 2048;
        c->nbands = 6;
        c->n_stars = 4400;
        c->n_galaxies = 1100;
        c->n_bright = 4;
        c->n_clusters = 3;
        c->cluster_radius = 30;
        c->n_bad_columns = 3;
        c->epsf_ngrid = 4;
        c->ngrid = 3;
        break;
    default: /* big: 32 x 8192^2 float32 = 8.6 GB of frames */
        c->nx = c->ny = 8192;
        c->nbands = 32;
        c->n_stars = 30000; /* a third of bench's density: big is about volume */
        c->n_galaxies = 2500;
        c->n_bright = 16;
        c->re_max = 6.0;
        c->n_clusters = 12;
        c->cluster_radius = 30;
        c->psf_radius = 15;
        c->n_bad_columns = 6;
        c->epsf_ngrid = 8;
        c->ngrid = 4;
        c->block_rows = 256;
        break;
    }
    return SP_OK;
}

/* "m<nm>" with a wavelength in 300..1200 nm. */
static int band_lambda(const char *name, double *lambda)
{
    if (!name || name[0] != 'm' || !isdigit((unsigned char)name[1])) return 0;
    char *end = NULL;
    long v = strtol(name + 1, &end, 10);
    if (*end || v < 300 || v > 1200) return 0;
    if (lambda) *lambda = (double)v;
    return 1;
}

int sp_sim_config_validate(const sp_sim_config *c)
{
    int status = SP_OK;
    for (int i = 0; i < NKEYS; i++) {
        const skey *k = &keys[i];
        if (k->min == k->max) continue;
        const char *p = (const char *)c + k->off;
        double v;
        switch (k->type) {
        case K_LONG: v = (double)*(const long *)p; break;
        case K_INT: case K_BANDS: v = (double)*(const int *)p; break;
        case K_DBL: v = *(const double *)p; break;
        default: continue;
        }
        SP_CHECK(isfinite(v) && v >= k->min && v <= k->max, SP_ERR_CONFIG,
                 "simulator config: %s = %g is out of range [%g, %g]", k->name, v, k->min, k->max);
    }
    SP_CHECK(c->oversample % 2 == 1, SP_ERR_CONFIG, "simulator config: oversample = %d must be odd", c->oversample);
    SP_CHECK(c->star_mag_min < c->star_mag_max, SP_ERR_CONFIG,
             "simulator config: star_mag_min (%g) must be below star_mag_max (%g)", c->star_mag_min, c->star_mag_max);
    SP_CHECK(c->gal_mag_min < c->gal_mag_max, SP_ERR_CONFIG,
             "simulator config: gal_mag_min (%g) must be below gal_mag_max (%g)", c->gal_mag_min, c->gal_mag_max);
    SP_CHECK(c->ref_mag_min < c->ref_mag_max, SP_ERR_CONFIG,
             "simulator config: ref_mag_min (%g) must be below ref_mag_max (%g)", c->ref_mag_min, c->ref_mag_max);
    SP_CHECK(c->psf_radius >= 2.0 * c->fwhm, SP_ERR_CONFIG,
             "simulator config: psf_radius (%g) must be at least 2 x fwhm (%g)", c->psf_radius, c->fwhm);
    SP_CHECK(c->re_median <= c->re_max, SP_ERR_CONFIG, "simulator config: re_median (%g) above re_max (%g)",
             c->re_median, c->re_max);
    int named = 0;
    for (int b = 0; b < c->nbands; b++) named += c->band_names[b][0] != '\0';
    SP_CHECK(named == 0 || named == c->nbands, SP_ERR_CONFIG,
             "simulator config: bands: either every band is named or none");
    for (int b = 0; named && b < c->nbands; b++) {
        SP_CHECK(band_lambda(c->band_names[b], NULL), SP_ERR_CONFIG,
                 "simulator config: bands: '%s' is not a band name like m400 (m + wavelength 300..1200 nm)",
                 c->band_names[b]);
        for (int a = 0; a < b; a++)
            SP_CHECK(strcmp(c->band_names[a], c->band_names[b]) != 0, SP_ERR_CONFIG,
                     "simulator config: bands: '%s' is listed twice", c->band_names[b]);
    }
cleanup:
    return status;
}

/* ---- YAML ------------------------------------------------------------------ */

static const skey *find_key(const char *name)
{
    for (int i = 0; i < NKEYS; i++)
        if (!strcmp(keys[i].name, name)) return &keys[i];
    return NULL;
}

static int parse_bool(const char *t, int *v)
{
    static const char *yes[] = {"true", "yes", "on", "1"}, *no[] = {"false", "no", "off", "0"};
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(t, yes[i])) { *v = 1; return 1; }
        if (!strcasecmp(t, no[i])) { *v = 0; return 1; }
    }
    return 0;
}

static int set_value(const char *path, yaml_document_t *doc, yaml_node_t *kn, yaml_node_t *vn, const skey *k,
                     sp_sim_config *c)
{
    int status = SP_OK;
    char *p = (char *)c + k->off;
    unsigned long line = (unsigned long)vn->start_mark.line + 1;
    if (k->type == K_BANDS && vn->type == YAML_SEQUENCE_NODE) {
        int n = 0;
        for (yaml_node_item_t *it = vn->data.sequence.items.start; it < vn->data.sequence.items.top; it++) {
            yaml_node_t *e = yaml_document_get_node(doc, *it);
            SP_CHECK(e && e->type == YAML_SCALAR_NODE, SP_ERR_CONFIG, "%s:%lu: bands: list items must be names",
                     path, line);
            SP_CHECK(n < SP_SIM_MAX_BANDS, SP_ERR_CONFIG, "%s:%lu: bands: more than %d bands", path, line,
                     SP_SIM_MAX_BANDS);
            const char *t = (const char *)e->data.scalar.value;
            SP_CHECK(band_lambda(t, NULL), SP_ERR_CONFIG,
                     "%s:%lu: bands: '%s' is not a band name like m400 (m + wavelength 300..1200 nm)", path, line, t);
            snprintf(c->band_names[n++], SP_SIM_NAME_LEN, "%s", t);
        }
        SP_CHECK(n > 0, SP_ERR_CONFIG, "%s:%lu: bands: empty list", path, line);
        c->nbands = n;
        goto cleanup;
    }
    SP_CHECK(vn->type == YAML_SCALAR_NODE, SP_ERR_CONFIG, "%s:%lu: %s: expected a single value", path, line,
             (const char *)kn->data.scalar.value);
    const char *t = (const char *)vn->data.scalar.value;
    char *end = NULL;
    errno = 0;
    switch (k->type) {
    case K_STR:
        snprintf(p, SP_SIM_NAME_LEN, "%s", t);
        break;
    case K_U64: {
        unsigned long long v = strtoull(t, &end, 10);
        SP_CHECK(*t && !*end && !errno && t[0] != '-', SP_ERR_CONFIG,
                 "%s:%lu: %s: '%s' is not a non-negative integer", path, line, k->name, t);
        *(uint64_t *)p = (uint64_t)v;
        break;
    }
    case K_LONG:
    case K_INT:
    case K_BANDS: {
        long v = strtol(t, &end, 10);
        SP_CHECK(*t && !*end && !errno, SP_ERR_CONFIG, "%s:%lu: %s: '%s' is not an integer", path, line, k->name, t);
        SP_CHECK(k->min == k->max || (v >= k->min && v <= k->max), SP_ERR_CONFIG,
                 "%s:%lu: %s: %ld is out of range [%g, %g]", path, line, k->name, v, k->min, k->max);
        if (k->type == K_LONG) *(long *)p = v;
        else *(int *)p = (int)v;
        if (k->type == K_BANDS)
            for (int b = 0; b < SP_SIM_MAX_BANDS; b++) c->band_names[b][0] = '\0';
        break;
    }
    case K_DBL: {
        double v = strtod(t, &end);
        SP_CHECK(*t && !*end && !errno && isfinite(v), SP_ERR_CONFIG, "%s:%lu: %s: '%s' is not a number", path, line,
                 k->name, t);
        SP_CHECK(k->min == k->max || (v >= k->min && v <= k->max), SP_ERR_CONFIG,
                 "%s:%lu: %s: %g is out of range [%g, %g]", path, line, k->name, v, k->min, k->max);
        *(double *)p = v;
        break;
    }
    case K_BOOL: {
        int v;
        SP_CHECK(parse_bool(t, &v), SP_ERR_CONFIG, "%s:%lu: %s: '%s' is not true/false", path, line, k->name, t);
        *(int *)p = v;
        break;
    }
    }
cleanup:
    return status;
}

int sp_sim_config_load(const char *path, const char *preset_override, sp_sim_config *c)
{
    int status = SP_OK, parser_ok = 0, doc_ok = 0;
    FILE *fp = NULL;
    yaml_parser_t parser;
    yaml_document_t doc;
    SP_CHECK(path && c, SP_ERR_INTERNAL, "sp_sim_config_load: NULL argument");
    fp = fopen(path, "rb");
    SP_CHECK(fp, SP_ERR_IO, "%s: cannot open the simulator config: %s", path, strerror(errno));
    SP_CHECK(yaml_parser_initialize(&parser), SP_ERR_NOMEM, "cannot initialise the YAML parser");
    parser_ok = 1;
    yaml_parser_set_input_file(&parser, fp);
    if (!yaml_parser_load(&parser, &doc)) {
        status = SP_FAIL(SP_ERR_CONFIG, "%s:%lu:%lu: malformed YAML: %s", path,
                         (unsigned long)parser.problem_mark.line + 1, (unsigned long)parser.problem_mark.column + 1,
                         parser.problem ? parser.problem : "syntax error");
        goto cleanup;
    }
    doc_ok = 1;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    /* the preset decides the defaults, so find it before any other key */
    const char *preset = preset_override;
    if (root) {
        SP_CHECK(root->type == YAML_MAPPING_NODE, SP_ERR_CONFIG,
                 "%s:%lu: the simulator config must be a mapping of key: value", path,
                 (unsigned long)root->start_mark.line + 1);
        for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top; pr++) {
            yaml_node_t *kn = yaml_document_get_node(&doc, pr->key), *vn = yaml_document_get_node(&doc, pr->value);
            if (kn->type == YAML_SCALAR_NODE && !strcmp((const char *)kn->data.scalar.value, "preset") && !preset) {
                SP_CHECK(vn->type == YAML_SCALAR_NODE, SP_ERR_CONFIG, "%s:%lu: preset: expected a name", path,
                         (unsigned long)vn->start_mark.line + 1);
                preset = (const char *)vn->data.scalar.value;
            }
        }
    }
    status = sp_sim_config_preset(preset ? preset : "tiny", c);
    if (status) {
        sp_err_context("%s", path);
        goto cleanup;
    }
    if (root) {
        for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top; pr++) {
            yaml_node_t *kn = yaml_document_get_node(&doc, pr->key), *vn = yaml_document_get_node(&doc, pr->value);
            unsigned long line = (unsigned long)kn->start_mark.line + 1;
            SP_CHECK(kn->type == YAML_SCALAR_NODE, SP_ERR_CONFIG, "%s:%lu: keys must be plain names", path, line);
            const char *name = (const char *)kn->data.scalar.value;
            if (!strcmp(name, "preset")) continue;
            const skey *k = find_key(name);
            SP_CHECK(k, SP_ERR_CONFIG, "%s:%lu: unknown key '%s' (surveyproc simulate --help lists the keys)", path,
                     line, name);
            SP_TRY(set_value(path, &doc, kn, vn, k, c));
        }
    }
    status = sp_sim_config_validate(c);
    if (status) sp_err_context("%s", path);
cleanup:
    if (doc_ok) yaml_document_delete(&doc);
    if (parser_ok) yaml_parser_delete(&parser);
    if (fp) fclose(fp);
    return status;
}

int sp_sim_config_write(FILE *f, const sp_sim_config *c)
{
    fprintf(f, "# surveyproc simulator configuration (resolved: every key; `surveyproc simulate THIS --out DIR`\n"
               "# reproduces the same files byte for byte)\n");
    for (int i = 0; i < NKEYS; i++) {
        const skey *k = &keys[i];
        const char *p = (const char *)c + k->off;
        char val[1200];
        switch (k->type) {
        case K_STR: snprintf(val, sizeof val, "%s", p); break;
        case K_U64: snprintf(val, sizeof val, "%llu", (unsigned long long)*(const uint64_t *)p); break;
        case K_LONG: snprintf(val, sizeof val, "%ld", *(const long *)p); break;
        case K_INT: snprintf(val, sizeof val, "%d", *(const int *)p); break;
        case K_DBL: snprintf(val, sizeof val, "%.17g", *(const double *)p); break;
        case K_BOOL: snprintf(val, sizeof val, "%s", *(const int *)p ? "true" : "false"); break;
        case K_BANDS:
            if (c->band_names[0][0]) {
                size_t n = (size_t)snprintf(val, sizeof val, "[");
                for (int b = 0; b < c->nbands && n < sizeof val; b++)
                    n += (size_t)snprintf(val + n, sizeof val - n, "%s%s", b ? ", " : "", c->band_names[b]);
                if (n < sizeof val) snprintf(val + n, sizeof val - n, "]");
            } else {
                snprintf(val, sizeof val, "%d", c->nbands);
            }
            break;
        }
        fprintf(f, "%s: %s  # %s\n", k->name, val, k->doc);
    }
    return ferror(f) ? SP_FAIL(SP_ERR_IO, "cannot write the simulator config") : SP_OK;
}

void sp_sim_config_help(FILE *f)
{
    sp_sim_config d;
    fprintf(f, "simulator config keys (a flat YAML mapping; tiny-preset defaults shown):\n");
    if (sp_sim_config_preset("tiny", &d) != SP_OK) return;
    for (int i = 0; i < NKEYS; i++) {
        const skey *k = &keys[i];
        const char *p = (const char *)&d + k->off;
        char val[64];
        switch (k->type) {
        case K_STR: snprintf(val, sizeof val, "%s", p); break;
        case K_U64: snprintf(val, sizeof val, "%llu", (unsigned long long)*(const uint64_t *)p); break;
        case K_LONG: snprintf(val, sizeof val, "%ld", *(const long *)p); break;
        case K_INT: case K_BANDS: snprintf(val, sizeof val, "%d", *(const int *)p); break;
        case K_DBL: snprintf(val, sizeof val, "%g", *(const double *)p); break;
        case K_BOOL: snprintf(val, sizeof val, "%s", *(const int *)p ? "true" : "false"); break;
        }
        fprintf(f, "  %-20s %-8s %s\n", k->name, val, k->doc);
    }
}
