/* test_coord.c — the dynamic cell queue: every cell exactly once, most expensive first, any rank
 * count; with the watch (heartbeats) on, the same, with no message left over; a worker silent
 * beyond its cell's limit is found by rank 0 (named, its cell reported lost), and a silence within
 * max(timeout, 10x the cell's estimate) is not. */
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
#include <stdio.h>
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

static void run_queue_n(int dedicated, int ncell)
{
    int order[NCELL];
    for (int i = 0; i < ncell; i++) order[i] = ncell - 1 - i;
    state_t s;
    memset(&s, 0, sizeof s);
    s.fail_cell = -1;
    ndone_seen = 0;
    sp_coord_stats st;
    int status = sp_coord_run(order, ncell, dedicated, MPI_COMM_WORLD, work, &s, done, NULL, &st);
    assert_true(sp_test_all_ranks(status == SP_OK));
    int total[NCELL];
    MPI_Allreduce(s.count, total, NCELL, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < NCELL; i++) assert_int_equal(total[i], i < ncell ? 1 : 0);
    /* each rank receives cells in queue order (most expensive = first in `order`) */
    int ok = 1;
    for (int k = 1; k < s.nseq; k++) ok &= s.seq[k] < s.seq[k - 1];
    assert_true(sp_test_all_ranks(ok));
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (rank == 0) assert_int_equal(ndone_seen, ncell);
    if (rank == 0 && dedicated && size > 1) assert_int_equal(st.cells, 0);
    long cells = st.cells, sum = 0;
    MPI_Allreduce(&cells, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    assert_int_equal(sum, ncell);
}

static void run_queue(int dedicated) { run_queue_n(dedicated, NCELL); }
static void t_queue_shared(void **s) { (void)s; run_queue(0); }
static void t_queue_dedicated(void **s) { (void)s; run_queue(1); }
/* fewer cells than ranks, and about as many: one-ahead requests are deferred (the queue's last
 * cells go to whichever rank is free); every cell still runs once and is reported once */
static void t_queue_few(void **s)
{
    (void)s;
    for (int n = 1; n <= 5; n++) {
        run_queue_n(0, n);
        run_queue_n(1, n);
    }
}

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

/* ---- the watch --------------------------------------------------------------------------- */

static double est_small(int cell, void *arg) { (void)cell; (void)arg; return 0.001; }
static double est_big(int cell, void *arg) { (void)cell; (void)arg; return 0.3; } /* x10 = 3 s */

static int lost_cell = -1, lost_rank = -1;
static void on_lost(int cell, int rank, char *desc, size_t n, void *arg)
{
    (void)arg;
    lost_cell = cell;
    lost_rank = rank;
    snprintf(desc, n, "(test)");
}

/* rank 1's first cell of a run sleeps 1.5 s without calling sp_coord_poll (a stopped rank) */
static int silent_pending;
static int work_silent(int cell, void *arg)
{
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 1 && silent_pending) {
        silent_pending = 0;
        usleep(1500000);
        return SP_OK;
    }
    return work(cell, arg);
}

/* no message of the queue left unreceived on this rank (heartbeats included) */
static int nothing_pending(void)
{
    int flag = 0;
    MPI_Barrier(MPI_COMM_WORLD);
    usleep(20000);
    MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
    return !flag;
}

/* 25 ms per cell, polling: the workers send heartbeats (every timeout/8 = 10 ms) */
static int work_long(int cell, void *arg)
{
    state_t *s = arg;
    s->count[cell]++;
    double t0 = sp_wtime();
    while (sp_wtime() - t0 < 0.025) sp_coord_poll();
    return SP_OK;
}
/* limit max(0.08, 10 x 0.1) = 1 s: a worker descheduled for a while on a loaded machine is no alarm */
static double est_100ms(int cell, void *arg) { (void)cell; (void)arg; return 0.1; }

static void t_queue_watched(void **st)
{
    (void)st;
    int size, rank;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    /* the plain queue with the watch on: the same */
    sp_coord_watch w = {.timeout_s = 0.08, .estimate = est_100ms, .lost = on_lost, .pass = "test pass"};
    sp_coord_set_watch(&w);
    run_queue(0);
    run_queue(1);
    /* long cells: heartbeats are sent and received, every one (none left unreceived) */
    int order[NCELL];
    for (int i = 0; i < NCELL; i++) order[i] = i;
    state_t s;
    memset(&s, 0, sizeof s);
    sp_coord_stats cs;
    int status = sp_coord_run(order, NCELL, 0, MPI_COMM_WORLD, work_long, &s, NULL, NULL, &cs);
    sp_coord_set_watch(NULL);
    assert_true(sp_test_all_ranks(status == SP_OK));
    int total[NCELL];
    MPI_Allreduce(s.count, total, NCELL, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < NCELL; i++) assert_int_equal(total[i], 1);
    long sent = rank > 0 ? cs.heartbeats : 0, got = rank == 0 ? cs.heartbeats : 0, nsent = 0, ngot = 0;
    MPI_Allreduce(&sent, &nsent, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&got, &ngot, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    if (size > 1) assert_true(nsent > 0);
    assert_int_equal(nsent, ngot);
    assert_int_equal(lost_cell, -1);
    assert_true(sp_test_all_ranks(nothing_pending()));
}

static int run_silent(double est_s(int, void *), sp_coord_stats *cs)
{
    int order[NCELL];
    for (int i = 0; i < NCELL; i++) order[i] = i;
    state_t s;
    memset(&s, 0, sizeof s);
    s.fail_cell = -1;
    silent_pending = 1;
    lost_cell = lost_rank = -1;
    sp_coord_watch w = {.timeout_s = 0.5, .estimate = est_s, .lost = on_lost, .pass = "test pass"};
    sp_coord_set_watch(&w);
    sp_err_clear();
    /* dedicated: rank 0 only serves, so it watches the whole time */
    int status = sp_coord_run(order, NCELL, 1, MPI_COMM_WORLD, work_silent, &s, NULL, NULL, cs);
    sp_coord_set_watch(NULL);
    return status;
}

static void t_watch_scaled_no_alarm(void **st)
{
    (void)st;
    int size;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size < 2) skip();
    sp_coord_stats cs;
    /* 1.5 s of silence is within max(0.5 s, 10 x 0.3 s) = 3 s: no alarm */
    int status = run_silent(est_big, &cs);
    assert_true(sp_test_all_ranks(status == SP_OK));
    assert_int_equal(lost_cell, -1);
    assert_true(sp_test_all_ranks(nothing_pending()));
}

/* last: after the alarm the queue is abandoned (in a real run the job ends there) */
static void t_watch_silent_worker(void **st)
{
    (void)st;
    int size, rank;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (size < 2) skip();
    sp_coord_stats cs;
    double t0 = sp_wtime();
    int status = run_silent(est_small, &cs);
    double took = sp_wtime() - t0;
    /* ranks other than 0 and 1 may have had every other cell done and been stopped before the alarm */
    int ok = status == SP_ERR_MPI || (rank > 1 && status == SP_OK);
    if (rank == 0) {
        /* found within the limit + a few checks, long before rank 1 wakes up */
        ok &= lost_rank == 1 && lost_cell >= 0 && took < 1.4;
        ok &= strstr(sp_err_msg(), "rank 1 (host ") != NULL && strstr(sp_err_msg(), "has sent nothing for") &&
              strstr(sp_err_msg(), "(test) of the test pass") && strstr(sp_err_msg(), "performance.rank_timeout_s");
        if (!ok) fprintf(stderr, "status %d lost %d/%d took %.2f: %s\n", status, lost_rank, lost_cell, took, sp_err_msg());
        /* take the workers' late "ready" messages, so that nothing is left for MPI_Finalize */
        double t1 = sp_wtime();
        while (sp_wtime() - t1 < 2.0) {
            int flag = 0;
            MPI_Status stt;
            MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, &stt);
            if (flag) {
                double msg[3];
                MPI_Recv(msg, 3, MPI_DOUBLE, stt.MPI_SOURCE, stt.MPI_TAG, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else {
                usleep(1000);
            }
        }
    } else {
        /* the workers are not answered any more: each gives up after its limit, naming rank 0 */
        if (status != SP_OK) ok &= strstr(sp_err_msg(), "rank 0 (the coordinator, host ") != NULL;
        if (!ok) fprintf(stderr, "rank %d: status %d: %s\n", rank, status, sp_err_msg());
    }
    assert_true(sp_test_all_ranks(ok));
}

int main(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    sp_test_quiet_nonroot();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(t_queue_shared),
        cmocka_unit_test(t_queue_dedicated),
        cmocka_unit_test(t_queue_few),
        cmocka_unit_test(t_queue_empty),
        cmocka_unit_test(t_queue_watched),
        cmocka_unit_test(t_watch_scaled_no_alarm),
        cmocka_unit_test(t_watch_silent_worker), /* last: it abandons a queue */
    };
    int rc = cmocka_run_group_tests_name("coordinator", tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
