/* cmd_run.c — `surveyproc run` and `surveyproc plan`: thin wrappers over sp_pipeline_run. */
#include "commands.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_pipeline.h"
#include "surveyproc/sp_resources.h" /* [issue 6] */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage_run(FILE *f)
{
    fprintf(f, "usage: [mpirun -n N] surveyproc run CONFIG.yaml [--resume] [--set key=value ...]\n\n"
               "Runs the pipeline on the tile described by CONFIG: plan (frames, catalog, grid), then the cells\n"
               "distributed over the MPI ranks, writing one HDF5 store (outputs.store).\n\n"
               "  --resume         finish an interrupted store: only cells not yet done are processed; the\n"
               "                   science config and the inputs must be unchanged (checked)\n"
               "  --set key=value  override a config key (repeatable), e.g. --set patch_run.n_opt_iters=50\n");
}

static void usage_plan(FILE *f)
{
    fprintf(f, "usage: [mpirun -n N] surveyproc plan CONFIG.yaml [--cells] [--set key=value ...]\n\n"
               "Checks every input (frames, headers, WCS alignment, catalog) and prints the plan without\n"
               "running it: frame table, bands, catalog summary, the grid of cells and patches, costs and the\n"
               "memory a rank needs. Nothing is written.\n\n"
               "  --cells          list every cell with its region, sources, cost and memory\n"
               /* [issue 6] job scripts */
               "  --emit slurm|pbs write a job script for this tile to stdout (the report goes to stderr)\n"
               "     [--nodes N] [--ranks-per-node R] [--threads T] [--time HH:MM:SS] [--emit-out FILE]\n"
               "                   defaults: 1 node, min(active cells, 4) ranks, performance.threads_per_rank\n"
               "                   or 4 threads, memory from the plan's peak, time from the plan's cost\n\n"
               "Exit code 6 when the layout would be refused by `run` (cores or memory; the report says\n"
               "which setting to change).\n");
}

static int run_or_plan(int argc, char **argv, int plan_only)
{
    sp_run_opts o = {0};
    char **sets = calloc((size_t)argc, sizeof *sets);
    char cmdline[4096] = "surveyproc";
    if (!sets) return SP_FAIL(SP_ERR_NOMEM, "out of memory");
    for (int i = 0; i < argc; i++) {
        size_t l = strlen(cmdline);
        snprintf(cmdline + l, sizeof cmdline - l, " %s", argv[i]);
    }
    o.command_line = cmdline;
    o.plan_only = plan_only;
    o.sets = sets;
    sp_res_emit emit = {0}; /* [issue 6] plan --emit */
    o.emit = &emit;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int used = 0;
        if (plan_only) {
            int est = sp_resources_emit_arg(argc, argv, &i, &emit, &used);
            if (est != SP_OK) {
                free(sets);
                return est;
            }
            if (used) continue;
        }
        if (!strcmp(a, "--resume") && !plan_only) o.resume = 1;
        else if (!strcmp(a, "--cells") && plan_only) o.verbose_plan = 1;
        else if (!strcmp(a, "--set") && i + 1 < argc) o.sets[o.nsets++] = argv[++i];
        else if (!strncmp(a, "--set=", 6)) o.sets[o.nsets++] = (char *)a + 6;
        else if (a[0] == '-') {
            free(sets);
            return SP_FAIL(SP_ERR_CONFIG, "surveyproc %s: unknown option '%s' (see --help)",
                           argv[0], a);
        } else if (!o.config_path) o.config_path = a;
        else {
            free(sets);
            return SP_FAIL(SP_ERR_CONFIG, "surveyproc %s: one config file expected, got '%s' and '%s'", argv[0],
                           o.config_path, a);
        }
    }
    if (!o.config_path) {
        free(sets);
        return SP_FAIL(SP_ERR_CONFIG, "surveyproc %s: missing CONFIG.yaml (see --help)", argv[0]);
    }
    int agreed = 1;
    int status = sp_pipeline_run(&o, &agreed);
    free(sets);
    if (status != SP_OK && agreed) sp_cli_exit_agreed(status);
    return status; /* not agreed: main aborts the whole job with this rank's message */
}

int sp_cmd_run(int argc, char **argv)
{
    if (sp_cli_wants_help(argc, argv)) {
        usage_run(stdout);
        return SP_OK;
    }
    return run_or_plan(argc, argv, 0);
}

int sp_cmd_plan(int argc, char **argv)
{
    if (sp_cli_wants_help(argc, argv)) {
        usage_plan(stdout);
        return SP_OK;
    }
    return run_or_plan(argc, argv, 1);
}
