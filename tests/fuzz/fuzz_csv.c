/* fuzz_csv.c — libFuzzer harness: bytes -> sp_csv_read (quotes, CRLF, BOM, comments, short
 * and long rows) -> column lookups and numeric conversion of every column. sp_csv_read
 * takes a path, so each input is written to a private file in /dev/shm (or TMPDIR). */
#include "surveyproc/sp_csv.h"
#include "surveyproc/sp_error.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char path[256];

static void drop_file(void) { unlink(path); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!path[0]) {
        const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
        snprintf(path, sizeof path, "%s/sp_fuzz_csv.%d.csv", dir, (int)getpid());
        atexit(drop_file);
    }
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    if (size) fwrite(data, 1, size, f);
    fclose(f);
    sp_csv *t = NULL;
    if (sp_csv_read(path, &t) == SP_OK) {
        double *v = malloc(((size_t)t->nrow + 1) * sizeof *v);
        for (int c = 0; c < t->ncol && v; c++) {
            if (sp_csv_col(t, t->colnames[c]) < 0) abort(); /* a header name must be found */
            (void)sp_csv_col_double(t, c, v);
            sp_err_clear();
        }
        for (long r = 0; r < t->nrow; r++)
            for (int c = 0; c < t->ncol; c++)
                if (!sp_csv_cell(t, r, c)) abort(); /* cells are never NULL */
        (void)sp_csv_col(t, "RA");
        free(v);
        sp_csv_free(&t);
    } else if (!sp_err_msg()[0]) {
        abort();
    }
    sp_err_clear();
    return 0;
}
