/* sp_pipeline.h — the run as one plan plus an ordered stage table.
 *
 *   run:   config -> plan -> store (create or resume) -> cells (coordinator) -> finish
 *   cell:  io -> prep -> white -> sat -> aper -> write      (src/pipeline.c, cell_stages[])
 *
 * Stages that later issues add (background, detection, ePSF, fit, zero
 * points) slot into the tables in src/pipeline.c.
 */
#ifndef SP_PIPELINE_H
#define SP_PIPELINE_H

#include "surveyproc/sp_config.h"
#include "surveyproc/sp_resources.h" /* [issue 6] sp_res_emit */

typedef struct {
    const char *config_path;
    int resume;        /* --resume: finish an interrupted store */
    int plan_only;     /* `surveyproc plan`: stop after the plan and print it */
    int verbose_plan;  /* print every cell */
    const char *command_line;
    int nsets;
    char **sets;       /* --set key=value overrides */
    const struct sp_res_emit *emit; /* [issue 6] plan --emit slurm|pbs (NULL or kind 0: none) */
} sp_run_opts;

/* MPI-collective over MPI_COMM_WORLD. Runs the whole job (or only the plan).
 * Returns SP_OK, or a status whose message is in sp_err_msg(). Collective
 * phases return the same status on every rank (`agreed` = 1); a failure inside
 * the cell phase is local to one rank (`agreed` = 0) and the caller must abort
 * the job. */
int sp_pipeline_run(const sp_run_opts *opts, int *agreed);

/* Load the config on rank 0, broadcast, parse everywhere, apply --set
 * overrides, validate (collective, agreed). */
int sp_pipeline_load_config(const char *path, int nsets, char **sets, sp_config *cfg, char **yaml_text);

#endif
