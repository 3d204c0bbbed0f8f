/* cmd_zp.c — `surveyproc zp CONFIG.yaml [--store PATH]`: re-run only the
 * zero-point calibration on an existing store (serial; mpirun not needed). */
#include "commands.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_mpi.h"
#include "surveyproc/sp_pipeline.h"
#include "surveyproc/sp_zp.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: surveyproc zp CONFIG.yaml [--store PATH] [--reference CSV] [--set key=value ...]\n\n"
            "Re-runs only the zero-point calibration on an existing store: matches the catalog to the\n"
            "reference catalog (inputs.reference_catalog), computes a sigma-clipped weighted-median ZP per\n"
            "band with the zp.* settings, replaces /zp and rewrites MAG_<band>_fit and MAGERR_<band>_fit\n"
            "of every row. Serial: no mpirun needed (under mpirun only rank 0 works).\n\n"
            "  --store PATH       the store to calibrate (default: outputs.store of the config)\n"
            "  --reference CSV    the reference catalog (default: inputs.reference_catalog)\n"
            "  --set key=value    override a config key, e.g. --set zp.clip_sigma=2.5 (repeatable)\n\n"
            "Prints one line per band (ZP, error, scatter, stars used / clipped / selected, flag); a band\n"
            "with fewer than zp.min_stars stars gets no ZP (flagged, warned) and its MAG columns stay NaN.\n");
}

int sp_cmd_zp(int argc, char **argv)
{
    int status = SP_OK, have_cfg = 0;
    const char *cfg_path = NULL, *store = NULL, *refcat = NULL;
    char **sets = NULL;
    int nsets = 0;
    sp_config cfg;
    sp_zp_result res = {0};
    if (sp_cli_wants_help(argc, argv)) {
        usage(stdout);
        return SP_OK;
    }
    SP_ALLOC(sets, argc);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--store") && i + 1 < argc) store = argv[++i];
        else if (!strncmp(a, "--store=", 8)) store = a + 8;
        else if (!strcmp(a, "--reference") && i + 1 < argc) refcat = argv[++i];
        else if (!strncmp(a, "--reference=", 12)) refcat = a + 12;
        else if (!strcmp(a, "--set") && i + 1 < argc) sets[nsets++] = argv[++i];
        else if (!strncmp(a, "--set=", 6)) sets[nsets++] = argv[i] + 6;
        else if (a[0] == '-') SP_CHECK(0, SP_ERR_CONFIG, "surveyproc zp: unknown option '%s' (see --help)", a);
        else if (!cfg_path) cfg_path = a;
        else SP_CHECK(0, SP_ERR_CONFIG, "surveyproc zp: one config file expected, got '%s' and '%s'", cfg_path, a);
    }
    SP_CHECK(cfg_path, SP_ERR_CONFIG, "surveyproc zp: missing CONFIG.yaml (see --help)");
    SP_TRY(sp_pipeline_load_config(cfg_path, nsets, sets, &cfg, NULL));
    have_cfg = 1;
    if (sp_mpi_rank() == 0) {
        if (refcat) {
            free(cfg.inputs.reference_catalog);
            cfg.inputs.reference_catalog = strdup(refcat);
            if (!cfg.inputs.reference_catalog) status = SP_FAIL(SP_ERR_NOMEM, "out of memory");
        }
        if (!store) store = cfg.outputs.store;
        if (!cfg.zp.enabled) SP_WARN("zp.enabled is false in %s; calibrating anyway as asked", cfg_path);
        cfg.zp.enabled = true;
        if (status == SP_OK && !cfg.inputs.reference_catalog)
            status = SP_FAIL(SP_ERR_CONFIG,
                             "%s: inputs.reference_catalog is not set: give the reference catalog (CSV with RA, DEC, "
                             "mag_<band>) there or with --reference",
                             cfg_path);
        if (status == SP_OK) status = sp_zp_calibrate_file(store, &cfg, &res);
        if (status == SP_OK) {
            printf("Store %s\n", store);
            sp_zp_result_print(stdout, &res);
            fflush(stdout);
        }
    }
    /* other ranks (if started under mpirun) only learn the outcome */
    SP_TRY(sp_mpi_agree(status, MPI_COMM_WORLD));
cleanup:
    if (have_cfg) sp_config_free(&cfg);
    sp_zp_result_free(&res);
    free(sets);
    return status;
}
