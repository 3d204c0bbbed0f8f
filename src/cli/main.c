/* main.c — bin/surveyproc: global options, MPI start-up, subcommand dispatch.
 * main only wires; the work is in the library (config -> plan -> run -> report). */
#include "commands.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_resources.h" /* [issue 6] */
#include "surveyproc/sp_watchdog.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

sp_global_opts sp_gopts;

typedef struct {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
} command_t;

static const command_t commands[] = {
    {"run", sp_cmd_run, "run the pipeline on a tile: plan, cells, fit, zero points, store"},
    {"plan", sp_cmd_plan, "check inputs and show the plan and resource layout without running (dry run)"},
    {"simulate", sp_cmd_simulate, "write a synthetic multi-band tile with known truth"},
    {"config", sp_cmd_config, "validate and print a config, or --dump a commented template"},
    {"export", sp_cmd_export, "export the catalog of a store as FITS or CSV"},
    {"zp", sp_cmd_zp, "re-run zero-point calibration on an existing store"},
    {"inspect", sp_cmd_inspect, "summarise a store: cells, status, timing, provenance"},
    {"score", sp_cmd_score, "score a store against a simulator's truth (accuracy report)"},
    {"qa", sp_cmd_qa, "draw the QA report (HTML + PNG) from a store"},
};
#define NCOMMANDS (int)(sizeof commands / sizeof commands[0])

int sp_cli_wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return 1;
    return 0;
}

void sp_cli_exit_agreed(int status)
{
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 0) {
        const char *where = sp_err_where();
        sp_log(SP_LOG_ERROR, "FATAL%s%s%s %s: %s", where[0] ? " [" : "", where, where[0] ? "]" : "",
               sp_status_name(status), sp_err_msg());
    }
    fflush(stdout);
    fflush(stderr);
    sp_log_close_file();
    MPI_Finalize();
    exit(sp_status_exit_code(status) ? sp_status_exit_code(status) : 5);
}

static void usage(FILE *f)
{
    fprintf(f,
            "surveyproc %s — distributed forced multi-band model photometry of survey tiles\n\n"
            "usage: [mpirun -n N] surveyproc [--quiet|--verbose] [--profile] COMMAND [ARGS]\n\n"
            "commands:\n",
            SP_VERSION);
    for (int i = 0; i < NCOMMANDS; i++) fprintf(f, "  %-9s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nglobal options:\n"
               "  -q, --quiet     only warnings and errors on stderr\n"
               "  -v, --verbose   debug messages\n"
               "  --profile       record fine-grained timing regions\n"
               "  --version       print version and git hash\n"
               "  -h, --help      this help; `surveyproc COMMAND --help` for a command\n\n"
               "Exit codes: 0 ok, 2 usage / not built, 3 bad input or config, 4 I/O, 5 other, 6 resources.\n");
}

int main(int argc, char **argv)
{
    /* [issue 6] before anything else (OpenBLAS reads OPENBLAS_CORETYPE only at load time):
     * may re-execute this binary once with the right OpenBLAS kernels */
    sp_resources_blas_reexec(argc, argv);
    int ai = 1;
    for (; ai < argc && argv[ai][0] == '-'; ai++) {
        const char *a = argv[ai];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--version")) {
            printf("surveyproc %s (git %s)\n", SP_VERSION, SP_GIT_HASH);
            return 0;
        }
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) sp_gopts.quiet = 1;
        else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) sp_gopts.verbose = 1;
        else if (!strcmp(a, "--profile")) sp_gopts.profile = 1;
        else {
            fprintf(stderr, "surveyproc: unknown option '%s' (see surveyproc --help)\n", a);
            return 2;
        }
    }
    if (ai >= argc) { usage(stderr); return 2; }
    const command_t *cmd = NULL;
    for (int i = 0; i < NCOMMANDS; i++)
        if (!strcmp(argv[ai], commands[i].name)) cmd = &commands[i];
    if (!cmd) {
        fprintf(stderr, "surveyproc: unknown command '%s' (commands: run plan simulate config export zp inspect score qa)\n",
                argv[ai]);
        return 2;
    }

    int provided = 0, rank = 0, size = 1;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    sp_log_init(rank, size, sp_gopts.quiet ? SP_LOG_WARN : sp_gopts.verbose ? SP_LOG_DEBUG : SP_LOG_INFO);
    sp_prof_init(sp_gopts.profile);

    int status = cmd->fn(argc - ai, argv + ai);
    if (status != SP_OK) sp_fatal(status); /* prints, aborts all ranks, exits */
    /* MPI_Finalize waits for every rank (Open MPI: a PMIx fence). A rank stopped or lost after the
     * command's last collective (e.g. in its cleanup) would leave the others in it forever: the
     * watchdog bounds that wait too (a no-op when no command started it, i.e. one rank or
     * performance.rank_timeout_s 0). The command is complete here; the message says so. */
    sp_watchdog_arm_ending("finalizing MPI after the command finished", 0,
                           "the command had finished on this rank (its results, e.g. the closed store, are "
                           "complete): check the other ranks' log lines and the store (`surveyproc inspect`)");
    MPI_Finalize();
    sp_watchdog_disarm();
    return 0;
}
