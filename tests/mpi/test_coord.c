/* test_coord.c — the dynamic cell queue: every cell exactly once, most expensive first, any rank count. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_coord.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_prof.h"

#include <mpi.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NCELL 37

typedef struct {
    int count[NCELL];
    int seq[NCELL];
    int nseq;
    int fail_cell;
} state_t;

static int work(int cell, void *arg)
{
    state_t *s = arg;
    if (cell == s->fail_cell) return SP_FAIL(SP_ERR_INPUT, "cell %d failed on purpose", cell);
    s->count[cell]++;
    s->seq[s->nseq++] = cell;
    /* uneven work; rank 0 answers requests in the middle of it */
    double t0 = sp_wtime();
    while (sp_wtime() - t0 < 0.001 * (1 + cell % 5)) sp_coord_poll();
    return SP_OK;
}

static int ndone_seen;
static void done(int cell, int rank, double sec, void *arg)
{
    (void)cell; (void)rank; (void)sec; (void)arg;
    ndone_seen++;
}

static void run_queue(int dedicated)
{
    int order[NCELL];
    for (int i = 0; i < NCELL; i++) order[i] = NCELL - 1 - i;
    state_t s;
    memset(&s, 0, sizeof s);
    s.fail_cell = -1;
    ndone_seen = 0;
    sp_coord_stats st;
    int status = sp_coord_run(order, NCELL, dedicated, MPI_COMM_WORLD, work, &s, done, NULL, &st);
    assert_true(sp_test_all_ranks(status == SP_OK));
    int total[NCELL];
    MPI_Allreduce(s.count, total, NCELL, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < NCELL; i++) assert_int_equal(total[i], 1);
    /* each rank receives cells in queue order (most expensive = first in `order`) */
    int ok = 1;
    for (int k = 1; k < s.nseq; k++) ok &= s.seq[k] < s.seq[k - 1];
    assert_true(sp_test_all_ranks(ok));
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (rank == 0) assert_int_equal(ndone_seen, NCELL);
    if (rank == 0 && dedicated && size > 1) assert_int_equal(st.cells, 0);
    long cells = st.cells, sum = 0;
    MPI_Allreduce(&cells, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    assert_int_equal(sum, NCELL);
}

static void t_queue_shared(void **s) { (void)s; run_queue(0); }
static void t_queue_dedicated(void **s) { (void)s; run_queue(1); }

static void t_queue_empty(void **st)
{
    (void)st;
    state_t s;
    memset(&s, 0, sizeof s);
    s.fail_cell = -1;
    sp_coord_stats cs;
    assert_true(sp_test_all_ranks(sp_coord_run(NULL, 0, 0, MPI_COMM_WORLD, work, &s, NULL, NULL, &cs) == SP_OK));
    assert_int_equal(cs.cells, 0);
}

int main(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    sp_test_quiet_nonroot();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_queue_shared),
        cmocka_unit_test(t_queue_dedicated),
        cmocka_unit_test(t_queue_empty),
    };
    int rc = cmocka_run_group_tests_name("coordinator", tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
