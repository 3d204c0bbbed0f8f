/* coordinator.c — dynamic cell queue on rank 0 (see sp_coord.h). */
#include "surveyproc/sp_coord.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_prof.h"

#include <omp.h>
#include <string.h>
#include <time.h>

#define TAG_READY 7101
#define TAG_ASSIGN 7102

/* rank-0 state while a run is in progress (only the main thread touches it) */
static struct {
    int active;
    MPI_Comm comm;
    const int *order;
    int n, next;
    int stopped;          /* workers told to stop */
    int nworkers;
    double overhead;
    sp_coord_done_fn done;
    void *done_arg;
} q;

/* Waiting without spinning. Open MPI's blocking calls busy-poll, so a rank that waits for an
 * assignment (or rank 0 waiting for the last workers) burns a core; with more ranks than cores
 * (oversubscribed, or a dedicated coordinator sharing a node) that steals the CPU of the ranks
 * that work. These poll for ~0.2 ms, then sleep 50 us between tests: a ready message waits at
 * most ~50 us more, a cell takes seconds. */
/* The coordinator's overhead is counted in CPU time of the main thread: with more ranks than
 * cores, wall time inside MPI calls mostly measures the other ranks running (Open MPI yields the
 * core while it polls), not work rank 0 does for the queue. */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void nap(void)
{
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
}

static void wait_request(MPI_Request *req)
{
    int flag = 0;
    for (int k = 0; !flag; k++) {
        MPI_Test(req, &flag, MPI_STATUS_IGNORE);
        if (!flag && k > 200) nap();
    }
}

static void probe_any(int tag, MPI_Comm comm, MPI_Status *st)
{
    int flag = 0;
    for (int k = 0; !flag; k++) {
        MPI_Iprobe(MPI_ANY_SOURCE, tag, comm, &flag, st);
        if (!flag && k > 200) {
            nap();
            if (k % 1024 == 0) sp_progress_heartbeat();
        }
    }
}

/* msg = {finished cell or -1, its seconds, want}: want 1 asks for the next cell (answered with
 * a cell or -1), want 0 is a worker's last message (it holds no cell and stops). */
static void serve_one(int src, const double msg[3])
{
    int finished = (int)msg[0];
    if (finished >= 0 && q.done) q.done(finished, src, msg[1], q.done_arg);
    if (msg[2] == 0) {
        q.stopped++;
        return;
    }
    int cell = q.next < q.n ? q.order[q.next++] : -1;
    MPI_Send(&cell, 1, MPI_INT, src, TAG_ASSIGN, q.comm);
}

void sp_coord_poll(void)
{
    sp_progress_heartbeat(); /* rank 0 shows the run alive while a long cell runs */
    if (!q.active || (omp_in_parallel() && omp_get_thread_num() != 0)) return;
    double t0 = cpu_now();
    for (;;) {
        int flag = 0;
        MPI_Status stt;
        MPI_Iprobe(MPI_ANY_SOURCE, TAG_READY, q.comm, &flag, &stt);
        if (!flag) break;
        double msg[3];
        MPI_Recv(msg, 3, MPI_DOUBLE, stt.MPI_SOURCE, TAG_READY, q.comm, MPI_STATUS_IGNORE);
        serve_one(stt.MPI_SOURCE, msg);
    }
    q.overhead += cpu_now() - t0;
}

int sp_coord_run(const int *order, int n, int dedicated, MPI_Comm comm, sp_coord_cell_fn fn, void *arg,
                 sp_coord_done_fn done, void *done_arg, sp_coord_stats *st)
{
    int status = SP_OK, rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    memset(st, 0, sizeof *st);
    double t_start = sp_wtime();
    if (size == 1) dedicated = 0;

    if (rank == 0) {
        memset(&q, 0, sizeof q);
        q.active = 1;
        q.comm = comm;
        q.order = order;
        q.n = n;
        q.nworkers = size - 1;
        q.done = done;
        q.done_arg = done_arg;
        /* work while there is work (unless dedicated), answering between cells and inside them */
        while (!dedicated && status == SP_OK) {
            sp_coord_poll();
            if (q.next >= q.n) break;
            int cell = q.order[q.next++];
            double t0 = sp_wtime();
            status = fn(cell, arg);
            double dt = sp_wtime() - t0;
            st->busy += dt;
            st->cells++;
            if (status == SP_OK && done) done(cell, 0, dt, done_arg);
        }
        if (status != SP_OK) {
            q.active = 0;
            return status; /* the driver aborts the job */
        }
        /* hand out the rest and stop every worker */
        while (q.stopped < q.nworkers) {
            double msg[3];
            MPI_Status stt;
            double t0 = sp_wtime();
            probe_any(TAG_READY, comm, &stt);
            st->idle += sp_wtime() - t0;
            t0 = cpu_now();
            MPI_Recv(msg, 3, MPI_DOUBLE, stt.MPI_SOURCE, TAG_READY, comm, MPI_STATUS_IGNORE);
            serve_one(stt.MPI_SOURCE, msg);
            q.overhead += cpu_now() - t0;
        }
        st->overhead = q.overhead;
        q.active = 0;
    } else {
        /* One cell ahead: the request for the next cell goes out when this one starts, so its
         * answer is there when this one ends — rank 0 answers only at its poll points (between
         * stages and patches), which may be a long patch away. */
        double msg[3] = {-1, 0, 1};
        int next = -1;
        MPI_Request rq;
        double t0 = sp_wtime();
        MPI_Irecv(&next, 1, MPI_INT, 0, TAG_ASSIGN, comm, &rq);
        MPI_Send(msg, 3, MPI_DOUBLE, 0, TAG_READY, comm);
        wait_request(&rq);
        st->idle += sp_wtime() - t0;
        while (next >= 0) {
            int cell = next;
            next = -1;
            MPI_Irecv(&next, 1, MPI_INT, 0, TAG_ASSIGN, comm, &rq);
            MPI_Send(msg, 3, MPI_DOUBLE, 0, TAG_READY, comm);
            t0 = sp_wtime();
            status = fn(cell, arg);
            double dt = sp_wtime() - t0;
            st->busy += dt;
            st->cells++;
            if (status != SP_OK) return status; /* the driver aborts the job (the request is moot) */
            msg[0] = cell;
            msg[1] = dt;
            t0 = sp_wtime();
            wait_request(&rq);
            st->idle += sp_wtime() - t0;
        }
        msg[2] = 0; /* last message: the cell just finished, and stop */
        MPI_Send(msg, 3, MPI_DOUBLE, 0, TAG_READY, comm);
    }
    st->wall = sp_wtime() - t_start;
    return status;
}
