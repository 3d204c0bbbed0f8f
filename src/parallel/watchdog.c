/* watchdog.c — deadline for blocking waits, checked by a helper thread (see sp_watchdog.h). */
#include "surveyproc/sp_watchdog.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"

#include <mpi.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WD_DEPTH 8

typedef struct {
    double start, deadline; /* CLOCK_MONOTONIC seconds; deadline 0: not armed */
    char what[192], where[128], ending[256];
} wd_level;

#define WD_DEFAULT_ENDING "`surveyproc run --resume` redoes the unfinished cells"

/* The main thread writes, the helper reads: the mutex keeps a level's fields consistent. */
static struct {
    pthread_mutex_t lock;
    int started, depth;
    double timeout;
    char host[MPI_MAX_PROCESSOR_NAME];
    wd_level lv[WD_DEPTH];
} wd = {.lock = PTHREAD_MUTEX_INITIALIZER};

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *wd_main(void *arg)
{
    (void)arg;
    struct timespec nap = {0, 250000000};
    double last = mono();
    for (;;) {
        nanosleep(&nap, NULL);
        pthread_mutex_lock(&wd.lock);
        double now = mono();
        /* A wake-up much later than the nap: this process itself did not run (SIGSTOP then
         * SIGCONT, e.g. from the launcher tearing the job down, or a frozen VM). That time is not
         * a wait for the other ranks: the deadlines move by it, so the stopped rank does not blame
         * the others when it runs again. */
        double gap = now - last - 0.25;
        if (gap > 1.0)
            for (int k = 0; k < wd.depth && k < WD_DEPTH; k++) {
                wd.lv[k].start += gap;
                wd.lv[k].deadline += gap;
            }
        last = now;
        const wd_level *l = wd.depth > 0 ? &wd.lv[wd.depth > WD_DEPTH ? WD_DEPTH - 1 : wd.depth - 1] : NULL;
        if (l && l->deadline > 0 && now > l->deadline) {
            /* one line, in the log's format, then leave: the launcher ends the other ranks */
            sp_log(SP_LOG_ERROR,
                   "FATAL [%s] MPI error: rank %d (host %s) has waited %.1f s for the other ranks while %s (limit "
                   "%.0f s, performance.rank_timeout_s): another rank is stuck, stopped, or its node is lost. "
                   "Ending the job; %s",
                   l->where, sp_log_rank(), wd.host, now - l->start, l->what, l->deadline - l->start, l->ending);
            fflush(stdout);
            fflush(stderr);
            _exit(5); /* exit code of SP_ERR_MPI (sp_status_exit_code) */
        }
        pthread_mutex_unlock(&wd.lock);
    }
    return NULL;
}

int sp_watchdog_start(double timeout_s)
{
    pthread_mutex_lock(&wd.lock);
    wd.timeout = timeout_s > 0 ? timeout_s : 0;
    int need = wd.timeout > 0 && !wd.started;
    pthread_mutex_unlock(&wd.lock);
    if (!need) return SP_OK;
    int len = 0, inited = 0;
    MPI_Initialized(&inited);
    if (inited) MPI_Get_processor_name(wd.host, &len);
    if (len <= 0) gethostname(wd.host, sizeof wd.host - 1);
    pthread_t th;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&th, &at, wd_main, NULL);
    pthread_attr_destroy(&at);
    if (rc != 0) return SP_FAIL(SP_ERR_INTERNAL, "cannot start the watchdog thread: %s", strerror(rc));
    pthread_mutex_lock(&wd.lock);
    wd.started = 1;
    pthread_mutex_unlock(&wd.lock);
    return SP_OK;
}

double sp_watchdog_timeout(void) { return wd.timeout; }

void sp_watchdog_arm_at(const char *what, double seconds, const char *file, int line)
{
    sp_watchdog_arm_end_at(what, seconds, NULL, file, line);
}

void sp_watchdog_arm_end_at(const char *what, double seconds, const char *ending, const char *file, int line)
{
    pthread_mutex_lock(&wd.lock);
    if (wd.started && wd.timeout > 0) {
        if (wd.depth < WD_DEPTH) {
            wd_level *l = &wd.lv[wd.depth];
            const char *base = strrchr(file, '/');
            l->start = mono();
            l->deadline = l->start + (seconds > 0 ? seconds : wd.timeout);
            snprintf(l->what, sizeof l->what, "%s", what);
            snprintf(l->where, sizeof l->where, "%s:%d", base ? base + 1 : file, line);
            snprintf(l->ending, sizeof l->ending, "%s", ending ? ending : WD_DEFAULT_ENDING);
        }
        wd.depth++; /* deeper than WD_DEPTH: the innermost stored level stays in force */
    }
    pthread_mutex_unlock(&wd.lock);
}

void sp_watchdog_disarm(void)
{
    pthread_mutex_lock(&wd.lock);
    if (wd.depth > 0) wd.depth--;
    pthread_mutex_unlock(&wd.lock);
}
