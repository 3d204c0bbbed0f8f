/* cmd_inspect.c — `surveyproc inspect STORE`: what a store holds, without Python:
 * provenance, cell status, catalog progress, zero points and timing per rank. */
#include "commands.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_store.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void print_attr(sp_h5 *h, const char *obj, const char *name, const char *label)
{
    char *v = NULL;
    if (sp_h5_attr_get_str(h, obj, name, &v) == SP_OK) {
        printf("  %-16s %s\n", label, v);
        free(v);
    } else {
        sp_err_clear();
    }
}

int sp_cmd_inspect(int argc, char **argv)
{
    int status = SP_OK, show_config = 0;
    const char *path = NULL;
    sp_h5 *h = NULL;
    long *st = NULL, *proc = NULL;
    double *dv = NULL;
    if (sp_cli_wants_help(argc, argv)) {
        printf("usage: surveyproc inspect STORE.h5 [--config]\n\n"
               "Summarises a store: provenance (version, command, MPI size, hashes), cells done/todo/skipped,\n"
               "catalog rows processed, timing per rank and load imbalance. --config prints the stored config.\n");
        return SP_OK;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config")) show_config = 1;
        else if (argv[i][0] == '-') return SP_FAIL(SP_ERR_CONFIG, "inspect: unknown option '%s'", argv[i]);
        else path = argv[i];
    }
    SP_CHECK(path, SP_ERR_CONFIG, "inspect: missing STORE.h5 (see --help)");
    SP_TRY(sp_h5_open(path, 0, MPI_COMM_SELF, &h));
    if (show_config) {
        char *cfg = NULL;
        SP_TRY(sp_h5_attr_get_str(h, "/provenance", "config", &cfg));
        fputs(cfg, stdout);
        free(cfg);
        goto cleanup;
    }
    printf("Store %s\n", path);
    print_attr(h, "/provenance", "version", "version");
    print_attr(h, "/provenance", "git_hash", "git");
    print_attr(h, "/provenance", "created_utc", "created (UTC)");
    print_attr(h, "/provenance", "command", "command");
    print_attr(h, "/provenance", "science_hash", "science hash");
    print_attr(h, "/provenance", "inputs_hash", "inputs hash");
    print_attr(h, "/", "bands", "bands");
    long mpi = 0, thr = 0;
    if (sp_h5_attr_get_long(h, "/provenance", "mpi_size", &mpi) == SP_OK &&
        sp_h5_attr_get_long(h, "/provenance", "threads_per_rank", &thr) == SP_OK)
        printf("  %-16s %ld rank(s) x %ld thread(s)\n", "layout", mpi, thr);
    sp_err_clear();

    long nc = 0, nrow = 0;
    SP_TRY(sp_h5_table_nrows(h, "/cells", &nc));
    SP_ALLOC(st, nc);
    SP_TRY(sp_h5_table_read_col_long(h, "/cells", "status", 0, nc, st));
    long cnt[4] = {0, 0, 0, 0};
    for (long k = 0; k < nc; k++)
        if (st[k] >= 0 && st[k] < 4) cnt[st[k]]++;
    printf("Cells: %ld total: %ld done, %ld to do, %ld failed, %ld skipped (empty)%s\n", nc, cnt[SP_CELL_DONE],
           cnt[SP_CELL_TODO], cnt[SP_CELL_FAILED], cnt[SP_CELL_SKIPPED],
           cnt[SP_CELL_TODO] ? "  -> finish with `surveyproc run CONFIG --resume`" : "");
    SP_TRY(sp_h5_table_nrows(h, "/catalog", &nrow));
    SP_ALLOC(proc, nrow);
    SP_TRY(sp_h5_table_read_col_long(h, "/catalog", "PROCESSED", 0, nrow, proc));
    long np = 0, nex = 0;
    for (long i = 0; i < nrow; i++) np += proc[i] == 1;
    SP_TRY(sp_h5_table_read_col_long(h, "/catalog", "excluded_any", 0, nrow, proc));
    for (long i = 0; i < nrow; i++) nex += proc[i] == 1;
    printf("Catalog: %ld rows, %ld processed, %ld excluded\n", nrow, np, nex);

    int ex = 0;
    SP_TRY(sp_h5_exists(h, "/timing/ranks", &ex));
    if (ex) {
        long nr = 0;
        SP_TRY(sp_h5_table_nrows(h, "/timing/ranks", &nr));
        SP_ALLOC(dv, 8 * nr);
        const char *cols[] = {"busy", "idle", "cells", "peak_rss", "bytes_read", "overhead"};
        for (int c = 0; c < 6; c++) SP_TRY(sp_h5_table_read_col_double(h, "/timing/ranks", cols[c], 0, nr, dv + c * nr));
        printf("Timing per rank:\n  %-5s %9s %9s %6s %11s %11s\n", "rank", "busy s", "idle s", "cells", "peak RSS MB",
               "read MB");
        for (long r = 0; r < nr; r++)
            printf("  %-5ld %9.3f %9.3f %6.0f %11.1f %11.1f\n", r, dv[r], dv[nr + r], dv[2 * nr + r],
                   dv[3 * nr + r] / 1e6, dv[4 * nr + r] / 1e6);
        double imb = NAN;
        if (sp_h5_attr_get_double(h, "/timing", "load_imbalance", &imb) == SP_OK)
            printf("  load imbalance (max/mean busy) %.3f; coordinator overhead %.3f s\n", imb, dv[5 * nr]);
        sp_err_clear();
    } else {
        printf("Timing: none yet (written when a run finishes)\n");
    }
cleanup:
    sp_h5_close(&h);
    free(st);
    free(proc);
    free(dv);
    return status;
}
