/* coordinator.c — dynamic cell queue on rank 0 (see sp_coord.h). */
#include "surveyproc/sp_coord.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"
#include "surveyproc/sp_prof.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TAG_READY 7101
#define TAG_ASSIGN 7102
#define DEFERRED (-2) /* answer to a one-ahead request: none yet, ask again when free */
#define MSG_HEARTBEAT (-2) /* msg[0] of a heartbeat: the worker is alive, no answer wanted */
#define EST_FACTOR 10.0    /* a cell may run this many times its estimate without a word */
#define CHECK_EVERY 0.25   /* seconds between rank 0's scans of the workers' silence */
#define HOSTLEN 64

/* the watch for the next runs (every rank) */
static sp_coord_watch watch;
static int watch_on;

/* rank-0 state while a run is in progress (only the main thread touches it) */
static struct {
    int active;
    MPI_Comm comm;
    const int *order;
    int n, next;
    int stopped;          /* workers told to stop */
    int nworkers;
    int ncompute;         /* ranks that process cells: the workers, and rank 0 unless dedicated */
    double overhead;
    sp_coord_done_fn done;
    void *done_arg;
    /* watch: per rank, the cell it works on (-1 none yet, -2 stopped), since when, its last
     * message; and the cell last assigned to it (one ahead: it starts that one next) */
    int *held, *ahead;
    double *since, *heard, last_check;
    char *hosts;          /* HOSTLEN per rank */
    int lost;             /* a silent worker was found: the run ends */
    long heartbeats;      /* received */
} q;

/* worker state inside a cell (heartbeats) */
static struct {
    int active;
    MPI_Comm comm;
    double every, last;
    MPI_Request rq;
    int pending;
    double buf[3];
    long sent;
} hb;

/* Waiting without spinning. Open MPI's blocking calls busy-poll, so a rank that waits for an
 * assignment (or rank 0 waiting for the last workers) burns a core; with more ranks than cores
 * (oversubscribed, or a dedicated coordinator sharing a node) that steals the CPU of the ranks
 * that work. These poll for ~0.2 ms, then sleep 50 us between tests: a ready message waits at
 * most ~50 us more, a cell takes seconds. */
/* The coordinator's overhead is counted in CPU time of the main thread (sp_thread_cputime): with
 * more ranks than cores, wall time inside MPI calls mostly measures the other ranks running (Open
 * MPI yields the core while it polls), not work rank 0 does for the queue. */

static void nap(void)
{
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
}

static double cell_limit(int cell)
{
    double lim = watch.timeout_s;
    if (cell >= 0 && watch.estimate) {
        double e = EST_FACTOR * watch.estimate(cell, watch.arg);
        if (e > lim) lim = e;
    }
    return lim;
}

/* Wait for req; with limit > 0, give up after limit seconds (returns 1, *waited set). */
static int wait_request(MPI_Request *req, double limit, double *waited)
{
    int flag = 0;
    double t0 = limit > 0 ? sp_wtime() : 0, next = t0 + CHECK_EVERY;
    for (int k = 0; !flag; k++) {
        MPI_Test(req, &flag, MPI_STATUS_IGNORE);
        if (flag) break;
        if (k > 200) nap();
        if (limit > 0 && (k & 63) == 0) {
            double now = sp_wtime();
            if (now >= next) {
                next = now + CHECK_EVERY;
                if (now - t0 > limit) {
                    *waited = now - t0;
                    return 1;
                }
            }
        }
    }
    return 0;
}

static const char *host_of(int r) { return q.hosts ? q.hosts + (size_t)r * HOSTLEN : "?"; }

/* rank 0: a worker that has been silent beyond its cell's limit ends the run (returns 1) */
static int check_silence(void)
{
    if (!watch_on || q.lost) return q.lost;
    double now = sp_wtime();
    if (now - q.last_check < CHECK_EVERY) return 0;
    q.last_check = now;
    for (int r = 1; r <= q.nworkers; r++) {
        if (q.held[r] == -2) continue; /* stopped */
        double lim = cell_limit(q.held[r]), silent = now - q.heard[r];
        if (silent <= lim) continue;
        char desc[256] = "";
        int cell = q.held[r];
        if (cell >= 0 && watch.lost) watch.lost(cell, r, desc, sizeof desc, watch.arg);
        char what[512];
        if (cell >= 0)
            snprintf(what, sizeof what, "while it holds cell %d %s of the %s (started %.1f s ago)", cell, desc,
                     watch.pass ? watch.pass : "run", now - q.since[r]);
        else
            snprintf(what, sizeof what, "since the %s started, without asking for a cell",
                     watch.pass ? watch.pass : "run");
        double est = cell >= 0 && watch.estimate ? watch.estimate(cell, watch.arg) : 0;
        sp_err_set(SP_ERR_MPI, __FILE__, __LINE__,
                   "rank %d (host %s) has sent nothing for %.1f s %s; the limit is %.0f s (the larger of "
                   "performance.rank_timeout_s = %.0f s and %.0fx the plan's estimate of %.3g s for the cell): the "
                   "rank is stuck, stopped, or its node is lost. Ending the job; the cell stays unfinished and "
                   "`surveyproc run --resume` redoes it",
                   r, host_of(r), silent, what, lim, watch.timeout_s, EST_FACTOR, est);
        q.lost = 1;
        return 1;
    }
    return 0;
}

static void probe_any(int tag, MPI_Comm comm, MPI_Status *st)
{
    int flag = 0;
    for (int k = 0; !flag; k++) {
        MPI_Iprobe(MPI_ANY_SOURCE, tag, comm, &flag, st);
        if (flag) break;
        if (k > 200) {
            nap();
            if (k % 1024 == 0) sp_progress_heartbeat();
        }
        if ((k & 63) == 0 && check_silence()) return;
    }
}

/* msg = {finished cell or -1, its seconds, want}: want 1 asks for the next cell (answered with
 * a cell or -1), want 0 is a worker's last message (it holds no cell and stops). A heartbeat is
 * {MSG_HEARTBEAT, 0, 0}: no answer. */
static void serve_one(int src, const double msg[3])
{
    int finished = (int)msg[0];
    if (q.heard) q.heard[src] = sp_wtime();
    if (finished == MSG_HEARTBEAT) {
        q.heartbeats++;
        return;
    }
    if (finished >= 0 && q.done) q.done(finished, src, msg[1], q.done_arg);
    if (msg[2] == 0) {
        q.stopped++;
        if (q.held) q.held[src] = -2;
        return;
    }
    /* A request one cell ahead (want 2) is deferred when fewer cells are left than ranks that
     * compute: the last cells go to whichever rank is free first, not to one that is still busy
     * (with few cells per rank, one-ahead assignment would otherwise unbalance the end). */
    int cell;
    if (msg[2] == 2 && q.n - q.next < q.ncompute) cell = DEFERRED;
    else cell = q.next < q.n ? q.order[q.next++] : -1;
    if (q.held) {
        /* a request goes out when the worker starts the cell assigned before (one ahead) */
        q.held[src] = q.ahead[src];
        q.ahead[src] = cell == DEFERRED ? -1 : cell;
        q.since[src] = q.heard[src];
    }
    MPI_Send(&cell, 1, MPI_INT, src, TAG_ASSIGN, q.comm);
}

void sp_coord_set_watch(const sp_coord_watch *w)
{
    watch_on = w && w->timeout_s > 0;
    if (watch_on) watch = *w;
    else memset(&watch, 0, sizeof watch);
}

/* worker, inside a cell: a heartbeat when one is due and the last one has left */
static void heartbeat(void)
{
    double now = sp_wtime();
    if (now - hb.last < hb.every) return;
    if (hb.pending) {
        int flag = 0;
        MPI_Test(&hb.rq, &flag, MPI_STATUS_IGNORE);
        if (!flag) return;
        hb.pending = 0;
    }
    hb.buf[0] = MSG_HEARTBEAT;
    hb.buf[1] = hb.buf[2] = 0;
    MPI_Isend(hb.buf, 3, MPI_DOUBLE, 0, TAG_READY, hb.comm, &hb.rq);
    hb.pending = 1;
    hb.last = now;
    hb.sent++;
}

void sp_coord_poll(void)
{
    sp_progress_heartbeat(); /* rank 0 shows the run alive while a long cell runs */
    if (!q.active && !hb.active) return;
    if (omp_in_parallel() && omp_get_thread_num() != 0) return;
    if (hb.active) {
        heartbeat();
        return;
    }
    double t0 = sp_thread_cputime();
    for (;;) {
        int flag = 0;
        MPI_Status stt;
        MPI_Iprobe(MPI_ANY_SOURCE, TAG_READY, q.comm, &flag, &stt);
        if (!flag) break;
        double msg[3];
        MPI_Recv(msg, 3, MPI_DOUBLE, stt.MPI_SOURCE, TAG_READY, q.comm, MPI_STATUS_IGNORE);
        serve_one(stt.MPI_SOURCE, msg);
    }
    q.overhead += sp_thread_cputime() - t0;
    /* rank 0 is inside its own cell: no status can be returned from here */
    if (check_silence() && watch.fatal) watch.fatal(SP_ERR_MPI);
}

static void watch_free(void)
{
    free(q.held);
    free(q.ahead);
    free(q.since);
    free(q.heard);
    free(q.hosts);
    q.held = q.ahead = NULL;
    q.since = q.heard = NULL;
    q.hosts = NULL;
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
    int watching = watch_on && size > 1;
    char *hosts = NULL;
    if (watching) {
        /* host names for the messages (once per pass: one small collective) */
        char me[HOSTLEN] = "";
        char name[MPI_MAX_PROCESSOR_NAME] = "";
        int len = 0;
        MPI_Get_processor_name(name, &len);
        memcpy(me, name, HOSTLEN - 1); /* truncated to HOSTLEN - 1 characters, NUL-terminated by me[] = "" */
        hosts = calloc((size_t)size, HOSTLEN);
        if (!hosts) return SP_FAIL(SP_ERR_NOMEM, "out of memory for %d host names", size);
        MPI_Allgather(me, HOSTLEN, MPI_CHAR, hosts, HOSTLEN, MPI_CHAR, comm);
    }

    if (rank == 0) {
        memset(&q, 0, sizeof q);
        q.active = 1;
        q.comm = comm;
        q.order = order;
        q.n = n;
        q.nworkers = size - 1;
        q.ncompute = size - 1 + (dedicated ? 0 : 1);
        q.done = done;
        q.done_arg = done_arg;
        if (watching) {
            q.hosts = hosts;
            hosts = NULL;
            q.held = malloc(sizeof *q.held * (size_t)size);
            q.ahead = malloc(sizeof *q.ahead * (size_t)size);
            q.since = malloc(sizeof *q.since * (size_t)size);
            q.heard = malloc(sizeof *q.heard * (size_t)size);
            if (!q.held || !q.ahead || !q.since || !q.heard) {
                watch_free();
                q.active = 0;
                return SP_FAIL(SP_ERR_NOMEM, "out of memory for the watch of %d ranks", size);
            }
            for (int r = 0; r < size; r++) {
                q.held[r] = q.ahead[r] = -1;
                q.since[r] = q.heard[r] = t_start;
            }
        }
        /* work while there is work (unless dedicated), answering between cells and inside them */
        while (!dedicated && status == SP_OK) {
            sp_coord_poll();
            if (q.lost) break;
            if (q.next >= q.n) break;
            int cell = q.order[q.next++];
            double t0 = sp_wtime();
            status = fn(cell, arg);
            double dt = sp_wtime() - t0;
            st->busy += dt;
            st->cells++;
            if (status == SP_OK && done) done(cell, 0, dt, done_arg);
        }
        if (status != SP_OK || q.lost) {
            if (status == SP_OK) status = SP_ERR_MPI; /* the message is the lost worker's */
            watch_free();
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
            if (q.lost) {
                watch_free();
                q.active = 0;
                return SP_ERR_MPI; /* the driver aborts the job */
            }
            t0 = sp_thread_cputime();
            MPI_Recv(msg, 3, MPI_DOUBLE, stt.MPI_SOURCE, TAG_READY, comm, MPI_STATUS_IGNORE);
            serve_one(stt.MPI_SOURCE, msg);
            q.overhead += sp_thread_cputime() - t0;
        }
        st->overhead = q.overhead;
        st->heartbeats = q.heartbeats;
        watch_free();
        q.active = 0;
    } else {
        /* One cell ahead: the request for the next cell goes out when this one starts, so its
         * answer is there when this one ends — rank 0 answers only at its poll points (between
         * stages and patches), which may be a long patch away. */
        double msg[3] = {-1, 0, 1};
        int next = -1;
        MPI_Request rq;
        const double want_ahead = 2, want_now = 1;
        /* how long rank 0 may take to answer: it answers between the stages of its own cell */
        double wait_lim = 0, waited = 0;
        if (watching) {
            double emax = 0;
            for (int k = 0; k < n && watch.estimate; k++) {
                double e = watch.estimate(order[k], watch.arg);
                if (e > emax) emax = e;
            }
            wait_lim = watch.timeout_s > EST_FACTOR * emax ? watch.timeout_s : EST_FACTOR * emax;
            memset(&hb, 0, sizeof hb);
            hb.comm = comm;
            hb.every = watch.timeout_s / 8 < 30 ? watch.timeout_s / 8 : 30;
        }
        double t0 = sp_wtime();
        MPI_Irecv(&next, 1, MPI_INT, 0, TAG_ASSIGN, comm, &rq);
        MPI_Send(msg, 3, MPI_DOUBLE, 0, TAG_READY, comm);
        if (wait_request(&rq, wait_lim, &waited)) goto lost0;
        st->idle += sp_wtime() - t0;
        while (next >= 0) {
            int cell = next;
            next = -1;
            /* the last heartbeat must have left before the request (they share a tag: order) */
            if (hb.pending) {
                if (wait_request(&hb.rq, wait_lim, &waited)) goto lost0;
                hb.pending = 0;
            }
            MPI_Irecv(&next, 1, MPI_INT, 0, TAG_ASSIGN, comm, &rq);
            msg[2] = want_ahead;
            MPI_Send(msg, 3, MPI_DOUBLE, 0, TAG_READY, comm);
            t0 = sp_wtime();
            hb.active = watching;
            hb.last = t0;
            status = fn(cell, arg);
            hb.active = 0;
            double dt = sp_wtime() - t0;
            st->busy += dt;
            st->cells++;
            if (status != SP_OK) {
                free(hosts);
                return status; /* the driver aborts the job (the request is moot) */
            }
            msg[0] = cell;
            msg[1] = dt;
            t0 = sp_wtime();
            if (wait_request(&rq, wait_lim, &waited)) goto lost0;
            if (next == DEFERRED) {
                /* deferred (the queue's last cells): ask again now that this rank is free; the
                 * request reports the cell just finished */
                if (hb.pending) {
                    if (wait_request(&hb.rq, wait_lim, &waited)) goto lost0;
                    hb.pending = 0;
                }
                next = -1;
                MPI_Irecv(&next, 1, MPI_INT, 0, TAG_ASSIGN, comm, &rq);
                msg[2] = want_now;
                MPI_Send(msg, 3, MPI_DOUBLE, 0, TAG_READY, comm);
                msg[0] = -1;
                msg[1] = 0;
                if (wait_request(&rq, wait_lim, &waited)) goto lost0;
            }
            st->idle += sp_wtime() - t0;
        }
        if (hb.pending) {
            if (wait_request(&hb.rq, wait_lim, &waited)) goto lost0;
            hb.pending = 0;
        }
        msg[2] = 0; /* last message: the cell just finished, and stop */
        MPI_Send(msg, 3, MPI_DOUBLE, 0, TAG_READY, comm);
        free(hosts);
        hosts = NULL;
        st->heartbeats = hb.sent;
        goto done;
    lost0:
        /* no answer may land in this frame after it returns (MPI_Cancel of a completed or
         * heartbeat-less request is harmless: the assignment receive is cancelled here) */
        {
            int flag = 0;
            MPI_Test(&rq, &flag, MPI_STATUS_IGNORE);
            if (!flag) {
                MPI_Cancel(&rq);
                MPI_Wait(&rq, MPI_STATUS_IGNORE);
            }
        }
        status = SP_FAIL(SP_ERR_MPI,
                         "rank 0 (the coordinator, host %s) has not answered the request of rank %d for a "
                         "cell of the %s for %.1f s; the limit is %.0f s (the larger of performance.rank_timeout_s "
                         "= %.0f s and %.0fx the plan's largest cell estimate): rank 0 is stuck, stopped, or its "
                         "node is lost. Ending the job; `surveyproc run --resume` redoes the unfinished cells",
                         hosts ? hosts : "?", rank, watch.pass ? watch.pass : "run", waited, wait_lim,
                         watch.timeout_s, EST_FACTOR);
        free(hosts);
        return status;
    }
done:
    free(hosts);
    st->wall = sp_wtime() - t_start;
    return status;
}
