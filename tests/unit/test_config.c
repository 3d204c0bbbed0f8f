/* test_config.c — the config module: schema consistency, defaults, loading,
 * every kind of bad input with its message, paths, template and print round
 * trips, the science hash, load_string == load, and docs/config.md coverage. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_config.h"
#include "surveyproc/sp_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Load `text` as file `name` in the tmp dir; returns the status. */
static int load_text(const char *name, const char *text, sp_config *cfg)
{
    char path[1024];
    sp_test_write(name, text, path, sizeof path);
    sp_err_clear();
    return sp_config_load(path, cfg);
}

/* The load fails with SP_ERR_CONFIG and the message contains every needle. */
static void expect_error(const char *name, const char *text, const char *needle1, const char *needle2)
{
    sp_config cfg;
    int st = load_text(name, text, &cfg);
    if (st != SP_ERR_CONFIG || !strstr(sp_err_msg(), needle1) || (needle2 && !strstr(sp_err_msg(), needle2)))
        fail_msg("status %d, message:\n%s\nexpected to contain: '%s' and '%s'", st, sp_err_msg(), needle1,
                 needle2 ? needle2 : "");
    /* a failed load leaves a zeroed config that is safe to free */
    assert_null(cfg.outputs.work_dir);
    sp_config_free(&cfg);
}

static void t_schema_consistent(void **s)
{
    (void)s;
    int n = sp_config_nkeys();
    assert_true(n > 100);
    for (int i = 0; i < n; i++) {
        const sp_config_key *k = sp_config_key_at(i);
        assert_non_null(strchr(k->name, '.'));
        assert_true(k->doc && strlen(k->doc) > 10);
        assert_non_null(k->def);
        assert_ptr_equal(sp_config_find_key(k->name), k);
        assert_true(k->size <= 16);
        size_t want = 0;
        switch (k->type) {
        case SP_CFG_T_BOOL: want = sizeof(bool); break;
        case SP_CFG_T_INT:
        case SP_CFG_T_AUTO_INT:
        case SP_CFG_T_ENUM: want = sizeof(int); break;
        case SP_CFG_T_DOUBLE: want = sizeof(double); break;
        case SP_CFG_T_STRING:
        case SP_CFG_T_PATH: want = sizeof(char *); break;
        case SP_CFG_T_STRLIST: want = sizeof(sp_cfg_strlist); break;
        case SP_CFG_T_INT_VEC: want = k->size - k->size % sizeof(int); break;
        case SP_CFG_T_DOUBLE_VEC: want = k->size - k->size % sizeof(double); break;
        }
        if (k->size != want) fail_msg("%s: field size %zu does not fit type %s", k->name, k->size, sp_config_type_name(k->type));
        if (k->type == SP_CFG_T_ENUM) assert_non_null(k->values);
        /* every group of the key has a doc, and keys of a group are contiguous */
        char group[256];
        snprintf(group, sizeof group, "%s", k->name);
        for (char *dot = strrchr(group, '.'); dot; dot = strrchr(group, '.')) {
            *dot = '\0';
            if (!sp_config_section_doc(group)) fail_msg("%s: section %s has no doc", k->name, group);
            size_t gl = strlen(group);
            for (int j = i + 1; j < n; j++) {
                const char *o = sp_config_key_at(j)->name;
                int in = !strncmp(o, group, gl) && o[gl] == '.';
                const char *prev = sp_config_key_at(j - 1)->name;
                int prev_in = !strncmp(prev, group, gl) && prev[gl] == '.';
                if (in && !prev_in) fail_msg("keys of %s are not contiguous (%s)", group, o);
            }
        }
        /* performance, outputs, logging and QA keys never change science results */
        const char *nonsci[] = {"inputs.", "outputs.", "performance.", "logging.", "plotting.", "overlay.", "checks.", NULL};
        for (int j = 0; nonsci[j]; j++)
            if (!strncmp(k->name, nonsci[j], strlen(nonsci[j])) && (k->flags & SP_CFG_F_SCIENCE))
                fail_msg("%s is marked science", k->name);
        if (strstr(k->name, "threads") || strstr(k->name, "workers")) assert_false(k->flags & SP_CFG_F_SCIENCE);
    }
    assert_null(sp_config_key_at(n));
    assert_null(sp_config_find_key("epsf.nope"));
    /* the names the issues and other modules rely on */
    const char *required[] = {"inputs.image_list_file", "inputs.input_catalog", "inputs.reference_catalog",
                              "outputs.work_dir", "outputs.store", "outputs.log_file", "outputs.save_white",
                              "image_scaling.zp_ref", "crop.margin", "checks.wcs_tolerance.crval",
                              "checks.require_same_shape", "source_saturation_cut.radius_pix",
                              "performance.frame_prep_workers", "performance.white_stack_workers",
                              "epsf.skip_empty_epsf_patches", "epsf.epsf_ngrid", "epsf.ngrid", "epsf.oversamp",
                              "epsf.final_psf_size", "epsf.psfstar_mode", "epsf.q_range", "epsf.background_boxsize",
                              "patches.halo_pix_min", "patch_inputs.skip_empty_patch", "patch_run.enable_staged_fit",
                              "patch_run.n_opt_iters", "patch_run.dlnp_stop", "patch_run.threads_per_process",
                              "patch_run.gal_model", "patch_run.fit_sky", "patch_run.min_epsf_nstars_for_use",
                              "patch_run.cutout_max_sources", "patch_run.no_cutouts", "zp.match_radius_arcsec",
                              "zp.clip_sigma", "zp.inject_gaia_sources", NULL};
    for (int j = 0; required[j]; j++)
        if (!sp_config_find_key(required[j])) fail_msg("missing key %s", required[j]);
}

static void t_defaults_valid(void **s)
{
    (void)s;
    sp_config c;
    assert_int_equal(sp_config_defaults(&c), SP_OK);
    assert_int_equal(sp_config_validate(&c), SP_OK);
    assert_true(c.image_scaling.zp_ref == 25.0);
    assert_int_equal(c.patch_run.n_opt_iters, 20);
    assert_true(c.patch_run.enable_staged_fit);
    assert_true(c.epsf.skip_empty_epsf_patches);
    assert_int_equal(c.performance.frame_prep_workers, SP_CONFIG_AUTO);
    assert_int_equal(c.patch_run.gal_model, SP_CFG_GAL_EXP);
    assert_int_equal(c.epsf.psfstar_mode, SP_CFG_PSFSTAR_DETECT_REFERENCE);
    assert_int_equal(c.logging.level, SP_LOG_INFO);
    assert_int_equal(c.outputs.export_formats.n, 1);
    assert_string_equal(c.outputs.export_formats.v[0], "fits");
    assert_string_equal(c.outputs.work_dir, "work");
    assert_null(c.inputs.image_list_file);
    assert_true(c.epsf.q_range[0] == 0.7 && c.epsf.q_range[1] == 1.3);
    assert_true(c.checks.wcs_tolerance.cd == 1e-9);
    assert_int_equal(c.epsf.final_psf_size % 2, 1);
    /* run/plan need the inputs */
    assert_int_equal(sp_config_check_inputs(&c), SP_ERR_CONFIG);
    assert_non_null(strstr(sp_err_msg(), "inputs.image_list_file: not set"));
    assert_non_null(strstr(sp_err_msg(), "inputs.input_catalog: not set"));
    sp_config_free(&c);
    sp_config_free(&c); /* idempotent */
}

static void t_full_example(void **s)
{
    (void)s;
    char path[1024];
    snprintf(path, sizeof path, "%s/config/example.yaml", sp_test_srcdir());
    sp_config c;
    int st = sp_config_load(path, &c);
    if (st) fail_msg("%s", sp_err_msg());
    assert_int_equal(sp_config_validate(&c), SP_OK);
    assert_int_equal(sp_config_check_inputs(&c), SP_OK);
    assert_non_null(c.inputs.image_list_file);
    assert_true(c.inputs.image_list_file[0] == '/');
    assert_non_null(strstr(c.outputs.store, c.outputs.work_dir));
    /* it changes something from the defaults, or it would not be an example */
    sp_config d;
    assert_int_equal(sp_config_defaults(&d), SP_OK);
    assert_true(sp_config_diff(&c, &d, 1, NULL, 0) > 0);
    sp_config_free(&d);
    sp_config_free(&c);
}

static void t_malformed_yaml(void **s)
{
    (void)s;
    /* a mapping value where a list item is expected, on line 3 */
    expect_error("bad1.yaml", "epsf:\n  epsf_ngrid: 4\n - oops\n", "bad1.yaml:3:", "malformed YAML");
    /* unclosed flow sequence */
    expect_error("bad2.yaml", "epsf:\n  q_range: [0.7, 1.3\npatches:\n  halo_pix_min: 3\n", "bad2.yaml:", "malformed YAML");
    /* tab indentation */
    expect_error("bad3.yaml", "crop:\n\tmargin: 3\n", "bad3.yaml:2:", "malformed YAML");
    /* a second document */
    expect_error("bad4.yaml", "crop:\n  margin: 3\n---\ncrop:\n  margin: 4\n", "bad4.yaml:4:", "second YAML document");
    /* not a mapping */
    expect_error("bad5.yaml", "- inputs\n- outputs\n", "bad5.yaml:1:", "must be a mapping of sections");
    /* a section given a value */
    expect_error("bad6.yaml", "crop: 100\n", "bad6.yaml:1: crop: a section", "'100'");
}

static void t_unknown_key(void **s)
{
    (void)s;
    expect_error("u1.yaml", "epsf:\n  epsf_ngrid: 4\n  thresh_sigm: 5\n",
                 "u1.yaml:3: epsf.thresh_sigm: unknown key (did you mean epsf.thresh_sigma?)", NULL);
    /* a key in the wrong section */
    expect_error("u2.yaml", "epsf:\n  n_opt_iters: 5\n", "u2.yaml:2: epsf.n_opt_iters: unknown key",
                 "did you mean patch_run.n_opt_iters?");
    /* a misspelt section */
    expect_error("u3.yaml", "\n\nepfs:\n  epsf_ngrid: 4\n", "u3.yaml:3: epfs: unknown section (did you mean epsf?)", NULL);
    /* nothing close: the sections are listed */
    expect_error("u4.yaml", "zzzzzzzzzz:\n  a: 1\n", "u4.yaml:1: zzzzzzzzzz: unknown section (sections: inputs,", NULL);
    /* a nested group */
    expect_error("u5.yaml", "checks:\n  wcs_tolerance:\n    crvl: 1.0e-6\n", "u5.yaml:3: checks.wcs_tolerance.crvl",
                 "did you mean checks.wcs_tolerance.crval?");
    /* a duplicate key */
    expect_error("u6.yaml", "crop:\n  margin: 3\n  margin: 4\n", "u6.yaml:3: crop.margin: duplicate key (first given at line 2)",
                 NULL);
}

static void t_seed_keys(void **s)
{
    (void)s;
    expect_error("s1.yaml", "epsf:\n  gaia_snr_min: 10.0\n", "s1.yaml:2: epsf.gaia_snr_min: a tract7dt key; surveyproc calls it epsf.snr_min",
                 "Coming from tract7dt");
    expect_error("s2.yaml", "patch_run:\n  python_exe: python\n", "s2.yaml:2: patch_run.python_exe: a tract7dt key with no surveyproc equivalent",
                 "remove it");
    expect_error("s3.yaml", "moffat_psf:\n  beta: 3.5\n", "moffat_psf.beta: a tract7dt key; surveyproc calls it epsf.fallback_moffat_beta",
                 NULL);
    expect_error("s4.yaml", "merge:\n  pattern: '*.csv'\n", "s4.yaml:1: merge: a tract7dt section with no surveyproc equivalent", NULL);
    expect_error("s4b.yaml", "moffat_psf:\n", "s4b.yaml:1: moffat_psf: a tract7dt section that surveyproc does not have", NULL);
    /* tract7dt's value spellings are accepted where the concept is the same */
    sp_config c;
    assert_int_equal(load_text("s5.yaml", "epsf:\n  psfstar_mode: \"sep+gaia\"\nlogging:\n  level: \"INFO\"\n"
                                          "patch_run:\n  cutout_max_sources: null\n  psf_model: gaussian_mixture_from_stamp\n",
                               &c),
                     SP_OK);
    assert_int_equal(c.epsf.psfstar_mode, SP_CFG_PSFSTAR_DETECT_REFERENCE);
    assert_int_equal(c.logging.level, SP_LOG_INFO);
    assert_int_equal(c.patch_run.cutout_max_sources, SP_CONFIG_NULL_INT);
    assert_int_equal(c.patch_run.psf_model, SP_CFG_PSF_GAUSSIAN_MIXTURE);
    sp_config_free(&c);
}

static void t_wrong_type(void **s)
{
    (void)s;
    expect_error("w1.yaml", "patch_run:\n  n_opt_iters: many\n",
                 "w1.yaml:2: patch_run.n_opt_iters: expected an integer, got 'many' (allowed: an integer in [1, 10000])", NULL);
    expect_error("w2.yaml", "patch_run:\n  n_opt_iters: 5.5\n", "patch_run.n_opt_iters: expected an integer, got '5.5'", NULL);
    expect_error("w3.yaml", "crop:\n  enabled: maybe\n", "w3.yaml:2: crop.enabled: expected true or false, got 'maybe'", NULL);
    expect_error("w4.yaml", "crop:\n  enabled: \"true\"\n", "crop.enabled: expected true or false, got the quoted string \"true\"",
                 NULL);
    expect_error("w5.yaml", "image_scaling:\n  zp_ref: twenty-five\n", "w5.yaml:2: image_scaling.zp_ref: expected a number", NULL);
    expect_error("w6.yaml", "image_scaling:\n  zp_ref: [25]\n", "image_scaling.zp_ref: expected a single value, got a list", NULL);
    expect_error("w7.yaml", "outputs:\n  export_formats: fits\n", "outputs.export_formats: expected a list like [fits]", NULL);
    expect_error("w8.yaml", "performance:\n  frame_prep_workers: lots\n",
                 "performance.frame_prep_workers: expected auto or an integer, got 'lots'", NULL);
    expect_error("w9.yaml", "epsf:\n  q_range: [0.7, high]\n", "epsf.q_range: list element 2: expected a number, got 'high'", NULL);
    expect_error("w10.yaml", "outputs:\n  work_dir: null\n", "w10.yaml:2: outputs.work_dir: no value given", NULL);
    expect_error("w11.yaml", "outputs:\n  store: \"\"\n", "outputs.store: the path is empty", NULL);
    expect_error("w12.yaml", "patch_run:\n  n_opt_iters: 99999999999\n", "patch_run.n_opt_iters: '99999999999' is out of range",
                 NULL);
}

static void t_out_of_range(void **s)
{
    (void)s;
    expect_error("r1.yaml", "patch_run:\n  n_opt_iters: 0\n",
                 "r1.yaml:2: patch_run.n_opt_iters: 0 is out of range (allowed: an integer in [1, 10000])", NULL);
    expect_error("r2.yaml", "epsf:\n  final_psf_size: 40\n", "epsf.final_psf_size: 40 is even", "odd integer in [5, 1001]");
    expect_error("r3.yaml", "image_scaling:\n  saturation_fraction: 0\n",
                 "image_scaling.saturation_fraction: 0.0 is out of range (allowed: a number in (0, 2])", NULL);
    expect_error("r4.yaml", "epsf:\n  q_range: [1.3, 0.7]\n", "epsf.q_range: [1.3, 0.7] is not ascending", NULL);
    expect_error("r5.yaml", "overlay:\n  zoom_box: [0, 10, 0]\n", "overlay.zoom_box: expected a list of 4 integers, got 3 elements",
                 NULL);
    expect_error("r6.yaml", "performance:\n  threads_per_rank: 0\n",
                 "performance.threads_per_rank: 0 is out of range (allowed: auto or an integer in [1, 4096])", NULL);
    expect_error("r7.yaml", "image_scaling:\n  zp_ref: .nan\n", "image_scaling.zp_ref: expected a number", NULL);
    expect_error("r8.yaml", "image_scaling:\n  zp_ref: 1e999\n", "image_scaling.zp_ref: .inf is not a finite number", NULL);
    /* relations between keys: reported at the line of the later key */
    expect_error("r9.yaml", "epsf:\n  star_local_bkg_annulus_rout_pix: 30\n  star_local_bkg_annulus_rin_pix: 35\n",
                 "r9.yaml:3: epsf.star_local_bkg_annulus_rin_pix: 35.0 must be smaller than epsf.star_local_bkg_annulus_rout_pix (30.0)",
                 NULL);
    expect_error("r10.yaml", "epsf:\n  cutout_size: 31\n", "r10.yaml:2: epsf.cutout_size: 31 must be at least epsf.final_psf_size (41)",
                 NULL);
}

static void t_bad_enum(void **s)
{
    (void)s;
    expect_error("e1.yaml", "patch_run:\n  gal_model: expo\n",
                 "e1.yaml:2: patch_run.gal_model: 'expo' is not allowed (allowed: one of: exp, dev, sersic, star)", NULL);
    expect_error("e2.yaml", "outputs:\n  export_formats: [fits, hdf]\n",
                 "outputs.export_formats: 'hdf' is not allowed (allowed: a list of: fits, csv)", NULL);
    expect_error("e3.yaml", "outputs:\n  export_formats: [csv, csv]\n", "outputs.export_formats: 'csv' is listed twice", NULL);
    sp_config c;
    assert_int_equal(load_text("e4.yaml", "patch_run:\n  gal_model: DEV\noutputs:\n  export_formats: []\n", &c), SP_OK);
    assert_int_equal(c.patch_run.gal_model, SP_CFG_GAL_DEV);
    assert_int_equal(c.outputs.export_formats.n, 0);
    sp_config_free(&c);
}

static void t_many_errors_at_once(void **s)
{
    (void)s;
    sp_config c;
    int st = load_text("m.yaml", "crop:\n  margin: -1\n  enabled: nope\nepsf:\n  oversamp: 99\n", &c);
    assert_int_equal(st, SP_ERR_CONFIG);
    assert_non_null(strstr(sp_err_msg(), "m.yaml:2: crop.margin"));
    assert_non_null(strstr(sp_err_msg(), "m.yaml:3: crop.enabled"));
    assert_non_null(strstr(sp_err_msg(), "m.yaml:5: epsf.oversamp: 99 is out of range (allowed: an integer in [1, 8])"));
    /* many errors: capped, counted */
    char text[8192] = "crop:\n";
    for (int i = 0; i < 30; i++) snprintf(text + strlen(text), sizeof text - strlen(text), "  bad_key_%02d: 1\n", i);
    st = load_text("m2.yaml", text, &c);
    assert_int_equal(st, SP_ERR_CONFIG);
    assert_non_null(strstr(sp_err_msg(), "more errors not shown"));
}

static void t_missing_file(void **s)
{
    (void)s;
    sp_config c;
    sp_err_clear();
    assert_int_equal(sp_config_load("/nonexistent/dir/survey.yaml", &c), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "/nonexistent/dir/survey.yaml: cannot open config file"));
    assert_int_equal(sp_config_load(sp_test_tmpdir(), &c), SP_ERR_IO);
    assert_non_null(strstr(sp_err_msg(), "not a regular file"));
    sp_config_free(&c);
}

static void t_empty_and_null(void **s)
{
    (void)s;
    sp_config c, d;
    assert_int_equal(sp_config_defaults(&d), SP_OK);
    assert_int_equal(sp_config_resolve_paths(&d, sp_test_tmpdir()), SP_OK);
    const char *texts[] = {"", "# only a comment\n", "~\n", "epsf:\npatch_run:\n", "epsf: {}\n", NULL};
    for (int i = 0; texts[i]; i++) {
        int st = load_text("n.yaml", texts[i], &c);
        if (st) fail_msg("'%s': %s", texts[i], sp_err_msg());
        char diff[2048];
        if (sp_config_diff(&c, &d, 0, diff, sizeof diff)) fail_msg("'%s' differs from defaults:\n%s", texts[i], diff);
        sp_config_free(&c);
    }
    sp_config_free(&d);
}

static void t_relative_paths(void **s)
{
    (void)s;
    char dir[1024], path[1024];
    snprintf(dir, sizeof dir, "%s/sub", sp_test_tmpdir());
    mkdir(dir, 0755);
    sp_test_write("sub/c.yaml",
                  "inputs:\n  image_list_file: images.txt\n  input_catalog: ../cat.csv\n  reference_catalog: ./ref/gaia.csv\n"
                  "outputs:\n  work_dir: out\n  store: s.h5\n  log_file: /var/tmp/x.log\n  qa_dir: ~/qa\n"
                  "performance:\n  fftw_wisdom_file: wisdom.dat\n",
                  path, sizeof path);
    sp_config c;
    int st = sp_config_load(path, &c);
    if (st) fail_msg("%s", sp_err_msg());
    char want[2048];
    /* the tmp dir may sit behind a symlink; the loader uses the real folder */
    char *real = realpath(dir, NULL);
    assert_non_null(real);
    assert_string_equal(c.config_dir, real);
    snprintf(want, sizeof want, "%s/images.txt", real);
    assert_string_equal(c.inputs.image_list_file, want);
    snprintf(want, sizeof want, "%s/../cat.csv", real);
    assert_string_equal(c.inputs.input_catalog, want);
    snprintf(want, sizeof want, "%s/ref/gaia.csv", real);
    assert_string_equal(c.inputs.reference_catalog, want);
    snprintf(want, sizeof want, "%s/out", real);
    assert_string_equal(c.outputs.work_dir, want);
    snprintf(want, sizeof want, "%s/out/s.h5", real);
    assert_string_equal(c.outputs.store, want);
    snprintf(want, sizeof want, "%s/out/wisdom.dat", real);
    assert_string_equal(c.performance.fftw_wisdom_file, want);
    assert_string_equal(c.outputs.log_file, "/var/tmp/x.log");
    const char *home = getenv("HOME");
    if (home && home[0]) {
        snprintf(want, sizeof want, "%s/qa", home);
        assert_string_equal(c.outputs.qa_dir, want);
    }
    /* --set resolves like the file */
    assert_int_equal(sp_config_set(&c, "inputs.input_catalog", "cat2.csv"), SP_OK);
    snprintf(want, sizeof want, "%s/cat2.csv", real);
    assert_string_equal(c.inputs.input_catalog, want);
    /* --set outputs.work_dir moves the outputs that were under the old one, not the others */
    assert_int_equal(sp_config_set(&c, "outputs.work_dir", "out2"), SP_OK);
    snprintf(want, sizeof want, "%s/out2/s.h5", real);
    assert_string_equal(c.outputs.store, want);
    snprintf(want, sizeof want, "%s/out2/wisdom.dat", real);
    assert_string_equal(c.performance.fftw_wisdom_file, want);
    assert_string_equal(c.outputs.log_file, "/var/tmp/x.log");
    /* resolving twice changes nothing */
    sp_config c2;
    assert_int_equal(sp_config_copy(&c2, &c), SP_OK);
    assert_int_equal(sp_config_resolve_paths(&c2, "/elsewhere"), SP_OK);
    assert_int_equal(sp_config_diff(&c, &c2, 0, NULL, 0), 0);
    sp_config_free(&c2);
    free(real);
    sp_config_free(&c);
}

static void t_template_reloads_to_defaults(void **s)
{
    (void)s;
    char path[1024];
    sp_test_path("template.yaml", path, sizeof path);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(sp_config_dump_template(f), SP_OK);
    fclose(f);
    sp_config t, d;
    int st = sp_config_load(path, &t);
    if (st) fail_msg("%s", sp_err_msg());
    assert_int_equal(sp_config_defaults(&d), SP_OK);
    assert_int_equal(sp_config_resolve_paths(&d, t.config_dir), SP_OK);
    char diff[4096];
    if (sp_config_diff(&t, &d, 0, diff, sizeof diff)) fail_msg("template differs from defaults:\n%s", diff);
    /* every key is in the template */
    char *text = NULL, *dir = NULL;
    assert_int_equal(sp_config_read_file(path, &text, &dir), SP_OK);
    for (int i = 0; i < sp_config_nkeys(); i++) {
        const char *leaf = strrchr(sp_config_key_at(i)->name, '.') + 1;
        char needle[200];
        snprintf(needle, sizeof needle, " %s: ", leaf);
        if (!strstr(text, needle)) fail_msg("template lacks %s", sp_config_key_at(i)->name);
    }
    free(text);
    free(dir);
    sp_config_free(&t);
    sp_config_free(&d);
}

static void t_print_round_trip(void **s)
{
    (void)s;
    sp_config c, back;
    int st = load_text("rt.yaml",
                       "inputs:\n  tile_name: 'odd \"name\" with: colon # and hash'\n  image_list_file: list.txt\n"
                       "outputs:\n  export_formats: [csv, fits]\n"
                       "epsf:\n  q_range: [0.8, 1.25]\n  psfstar_mode: reference\n  thresh_sigma: 7.25\n"
                       "performance:\n  dedicated_coordinator: never\n  threads_per_rank: 3\n"
                       "patch_run:\n  dlnp_stop: 1.0e-7\n  cutout_max_sources: null\n",
                       &c);
    if (st) fail_msg("%s", sp_err_msg());
    char *yaml = NULL;
    assert_int_equal(sp_config_to_yaml_string(&c, &yaml), SP_OK);
    assert_non_null(strstr(yaml, "thresh_sigma: 7.25  # default: 10.0"));
    assert_non_null(strstr(yaml, "dlnp_stop: 1.0e-07"));
    st = sp_config_load_string(yaml, "provenance", "/nowhere", &back);
    if (st) fail_msg("%s\n%s", sp_err_msg(), yaml);
    char diff[4096];
    if (sp_config_diff(&c, &back, 0, diff, sizeof diff)) fail_msg("print does not round-trip:\n%s", diff);
    assert_string_equal(back.inputs.tile_name, "odd \"name\" with: colon # and hash");
    assert_string_equal(back.config_path, "provenance");
    free(yaml);
    sp_config_free(&back);
    sp_config_free(&c);
}

static void t_science_hash(void **s)
{
    (void)s;
    sp_config c;
    uint64_t h0, h1, h2;
    assert_int_equal(sp_config_defaults(&c), SP_OK);
    assert_int_equal(sp_config_science_hash(&c, &h0), SP_OK);
    /* a science key changes the hash */
    assert_int_equal(sp_config_set(&c, "patch_run.n_opt_iters", "30"), SP_OK);
    sp_config_science_hash(&c, &h1);
    assert_true(h1 != h0);
    assert_int_equal(sp_config_set(&c, "patch_run.n_opt_iters", "20"), SP_OK);
    sp_config_science_hash(&c, &h1);
    assert_true(h1 == h0);
    assert_int_equal(sp_config_set(&c, "epsf.q_range", "[0.7, 1.31]"), SP_OK);
    sp_config_science_hash(&c, &h1);
    assert_true(h1 != h0);
    assert_int_equal(sp_config_set(&c, "epsf.q_range", "[0.7, 1.3]"), SP_OK);
    /* performance, output and logging keys do not */
    assert_int_equal(sp_config_set(&c, "performance.threads_per_rank", "4"), SP_OK);
    assert_int_equal(sp_config_set(&c, "patch_run.threads_per_process", "2"), SP_OK);
    assert_int_equal(sp_config_set(&c, "outputs.store", "/other/place.h5"), SP_OK);
    assert_int_equal(sp_config_set(&c, "logging.level", "debug"), SP_OK);
    assert_int_equal(sp_config_set(&c, "inputs.input_catalog", "/moved/cat.csv"), SP_OK);
    sp_config_science_hash(&c, &h2);
    assert_true(h2 == h0);
    /* the diff says what differs */
    sp_config d;
    assert_int_equal(sp_config_defaults(&d), SP_OK);
    assert_int_equal(sp_config_set(&d, "zp.clip_sigma", "2.5"), SP_OK);
    char buf[1024];
    assert_int_equal(sp_config_diff(&d, &c, 1, buf, sizeof buf), 1);
    assert_string_equal(buf, "zp.clip_sigma: 2.5 -> 3.0\n");
    assert_int_equal(sp_config_diff(&d, &c, 0, NULL, 0), 6);
    sp_config_free(&d);
    sp_config_free(&c);
}

static void t_load_string_equals_load(void **s)
{
    (void)s;
    char path[1024];
    snprintf(path, sizeof path, "%s/config/example.yaml", sp_test_srcdir());
    char *text = NULL, *dir = NULL;
    assert_int_equal(sp_config_read_file(path, &text, &dir), SP_OK);
    sp_config a, b;
    assert_int_equal(sp_config_load(path, &a), SP_OK);
    assert_int_equal(sp_config_load_string(text, path, dir, &b), SP_OK);
    char diff[4096];
    if (sp_config_diff(&a, &b, 0, diff, sizeof diff)) fail_msg("load_string differs:\n%s", diff);
    uint64_t ha, hb;
    sp_config_science_hash(&a, &ha);
    sp_config_science_hash(&b, &hb);
    assert_true(ha == hb);
    char *ya = NULL, *yb = NULL;
    assert_int_equal(sp_config_to_yaml_string(&a, &ya), SP_OK);
    assert_int_equal(sp_config_to_yaml_string(&b, &yb), SP_OK);
    assert_string_equal(ya, yb);
    /* errors from load_string carry the given name */
    sp_config c;
    assert_int_equal(sp_config_load_string("crop:\n  margn: 3\n", "rank0:cfg.yaml", NULL, &c), SP_ERR_CONFIG);
    assert_non_null(strstr(sp_err_msg(), "rank0:cfg.yaml:2: crop.margn: unknown key (did you mean crop.margin?)"));
    free(ya);
    free(yb);
    free(text);
    free(dir);
    sp_config_free(&a);
    sp_config_free(&b);
}

static void t_set_and_copy(void **s)
{
    (void)s;
    sp_config c, d;
    assert_int_equal(sp_config_defaults(&c), SP_OK);
    assert_int_equal(sp_config_set(&c, "patch_run.n_opt_itrs", "3"), SP_ERR_CONFIG);
    assert_non_null(strstr(sp_err_msg(), "--set: patch_run.n_opt_itrs: unknown key (did you mean patch_run.n_opt_iters?)"));
    assert_int_equal(sp_config_set(&c, "patch_run.n_opt_iters", "0"), SP_ERR_CONFIG);
    assert_non_null(strstr(sp_err_msg(), "--set: patch_run.n_opt_iters: 0 is out of range"));
    assert_int_equal(c.patch_run.n_opt_iters, 20); /* unchanged on error */
    assert_int_equal(sp_config_set(&c, "outputs.export_formats", "[csv"), SP_ERR_CONFIG);
    assert_int_equal(sp_config_set(&c, "outputs.export_formats", "[csv, fits]"), SP_OK);
    assert_int_equal(sp_config_set(&c, "performance.frame_prep_workers", "6"), SP_OK);
    assert_int_equal(sp_config_set(&c, "performance.frame_prep_workers", "auto"), SP_OK);
    assert_int_equal(c.performance.frame_prep_workers, SP_CONFIG_AUTO);
    assert_int_equal(sp_config_set(&c, "inputs.tile_name", "T0042"), SP_OK);
    assert_int_equal(sp_config_copy(&d, &c), SP_OK);
    assert_int_equal(sp_config_diff(&c, &d, 0, NULL, 0), 0);
    assert_true(d.inputs.tile_name != c.inputs.tile_name);
    assert_true(d.outputs.export_formats.v != c.outputs.export_formats.v);
    sp_config_free(&c); /* d owns its own copies */
    assert_string_equal(d.outputs.export_formats.v[1], "fits");
    /* a code-built config is checked by validate */
    d.epsf.oversamp = 0;
    d.patch_run.gal_model = (sp_cfg_gal_model)9;
    assert_int_equal(sp_config_validate(&d), SP_ERR_CONFIG);
    assert_non_null(strstr(sp_err_msg(), "epsf.oversamp: 0 is out of range"));
    assert_non_null(strstr(sp_err_msg(), "patch_run.gal_model: 9 is not a valid value"));
    sp_config_free(&d);
}

static void t_docs_cover_every_key(void **s)
{
    (void)s;
    char path[1024];
    snprintf(path, sizeof path, "%s/docs/config.md", sp_test_srcdir());
    char *text = NULL, *dir = NULL;
    if (sp_config_read_file(path, &text, &dir) != SP_OK) fail_msg("cannot read %s: %s", path, sp_err_msg());
    for (int i = 0; i < sp_config_nkeys(); i++) {
        char needle[200];
        snprintf(needle, sizeof needle, "| `%s` |", sp_config_key_at(i)->name);
        if (!strstr(text, needle))
            fail_msg("docs/config.md lacks key %s (regenerate: surveyproc config --markdown --out docs/config.md)",
                     sp_config_key_at(i)->name);
    }
    assert_non_null(strstr(text, "Coming from tract7dt"));
    free(text);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_schema_consistent),      cmocka_unit_test(t_defaults_valid),
        cmocka_unit_test(t_full_example),           cmocka_unit_test(t_malformed_yaml),
        cmocka_unit_test(t_unknown_key),            cmocka_unit_test(t_seed_keys),
        cmocka_unit_test(t_wrong_type),             cmocka_unit_test(t_out_of_range),
        cmocka_unit_test(t_bad_enum),               cmocka_unit_test(t_many_errors_at_once),
        cmocka_unit_test(t_missing_file),           cmocka_unit_test(t_empty_and_null),
        cmocka_unit_test(t_relative_paths),         cmocka_unit_test(t_template_reloads_to_defaults),
        cmocka_unit_test(t_print_round_trip),       cmocka_unit_test(t_science_hash),
        cmocka_unit_test(t_load_string_equals_load), cmocka_unit_test(t_set_and_copy),
        cmocka_unit_test(t_docs_cover_every_key),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
