/* cmd_qa.c — `surveyproc qa STORE [--out DIR] [--dpi N] [--max-pages N]`: the QA report.
 *
 * The drawing is scripts/qa.py (Debian's python3 with python3-h5py, python3-numpy,
 * python3-matplotlib; docs/qa.md). This command finds the script, checks the store and the
 * interpreter, and runs /usr/bin/python3 on it as a child process (posix_spawn, then waitpid:
 * MPI was initialised by main, so the process is not replaced; main finalises as usual).
 *
 * The script is looked for, in order: $SURVEYPROC_QA_SCRIPT; <bindir>/../share/surveyproc/qa.py
 * (make install); the build's SP_DATADIR/qa.py; <bindir>/../scripts/qa.py and
 * <bindir>/../../scripts/qa.py (a source tree: bin/surveyproc, build/san/surveyproc).
 * $SURVEYPROC_PYTHON replaces /usr/bin/python3 (tests only). Only rank 0 draws. */
#include "commands.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_log.h"

#include <errno.h>
#include <limits.h>
#include <mpi.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SP_DATADIR
#define SP_DATADIR "/usr/local/share/surveyproc"
#endif

extern char **environ;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: surveyproc qa STORE.h5 [--out DIR] [--dpi N] [--max-pages N]\n\n"
            "Draws the QA report of a store: PNG figures tied together by DIR/index.html (white stack\n"
            "with the sources by type and exclusion, ePSF grid per band, growth curves, star residuals,\n"
            "background maps, patch and source data/model/residual, ZP vs magnitude, fitted vs aperture\n"
            "fluxes and pulls, timing per stage and rank, a summary). A figure whose datasets the store\n"
            "does not hold is skipped with a note on the page. Plot toggles of the run's config\n"
            "(overlay.*, crop.plot_*, epsf.save_*, patch_run.no_cutouts, ...) are honoured. docs/qa.md.\n\n"
            "  --out DIR        output folder (default: the run's outputs.qa_dir)\n"
            "  --dpi N          figure resolution (default: the run's plotting.dpi)\n"
            "  --max-pages N    at most N pages of patch overviews and of source cutouts\n\n"
            "Needs /usr/bin/python3 with the Debian packages python3-h5py, python3-numpy and\n"
            "python3-matplotlib (python3-astropy to draw the white stack from the frames).\n");
}

static int is_file(const char *p)
{
    struct stat st;
    return p && p[0] && stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* The folder of the running binary (realpath of /proc/self/exe), or "" */
static void exe_dir(char *buf, size_t n)
{
    char tmp[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", tmp, sizeof tmp - 1);
    buf[0] = 0;
    if (len <= 0) return;
    tmp[len] = 0;
    char *slash = strrchr(tmp, '/');
    if (!slash) return;
    *slash = 0;
    snprintf(buf, n, "%s", tmp);
}

/* Finds qa.py; returns 1 and the path, or 0 with the places looked at in `tried`. */
static int find_script(char *out, size_t n, char *tried, size_t tn)
{
    char dir[PATH_MAX];
    exe_dir(dir, sizeof dir);
    char cand[5][PATH_MAX + 64];
    int nc = 0;
    const char *env = getenv("SURVEYPROC_QA_SCRIPT");
    tried[0] = 0;
    if (env && env[0]) {
        /* an explicit choice is not second-guessed */
        snprintf(tried, tn, "%s (SURVEYPROC_QA_SCRIPT)", env);
        if (!is_file(env)) return 0;
        snprintf(out, n, "%s", env);
        return 1;
    }
    if (dir[0]) snprintf(cand[nc++], sizeof cand[0], "%s/../share/surveyproc/qa.py", dir);
    snprintf(cand[nc++], sizeof cand[0], "%s/qa.py", SP_DATADIR);
    if (dir[0]) {
        snprintf(cand[nc++], sizeof cand[0], "%s/../scripts/qa.py", dir);
        snprintf(cand[nc++], sizeof cand[0], "%s/../../scripts/qa.py", dir);
    }
    for (int i = 0; i < nc; i++) {
        char real[PATH_MAX];
        if (is_file(cand[i])) {
            const char *src = realpath(cand[i], real) ? real : cand[i];
            size_t len = strlen(src);
            if (len >= n) continue;
            memcpy(out, src, len + 1);
            return 1;
        }
        size_t l = strlen(tried);
        snprintf(tried + l, tn - l, "%s%s", l ? ", " : "", cand[i]);
    }
    return 0;
}

static int run_qa(int argc, char **argv)
{
    const char *store = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if ((!strcmp(a, "--out") || !strcmp(a, "--dpi") || !strcmp(a, "--max-pages"))) {
            if (i + 1 >= argc) return SP_FAIL(SP_ERR_INPUT, "qa: %s needs a value (see surveyproc qa --help)", a);
            i++;
        } else if (!strncmp(a, "--out=", 6) || !strncmp(a, "--dpi=", 6) || !strncmp(a, "--max-pages=", 12)) {
        } else if (a[0] == '-') {
            return SP_FAIL(SP_ERR_INPUT, "qa: unknown option '%s' (see surveyproc qa --help)", a);
        } else if (store) {
            return SP_FAIL(SP_ERR_INPUT, "qa: one store only ('%s' and '%s')", store, a);
        } else {
            store = a;
        }
    }
    if (!store) return SP_FAIL(SP_ERR_INPUT, "qa: no store given (usage: surveyproc qa STORE.h5 --out DIR)");
    if (!is_file(store)) return SP_FAIL(SP_ERR_IO, "qa: store '%s' not found", store);

    char script[PATH_MAX + 64], tried[6 * (PATH_MAX + 64)];
    if (!find_script(script, sizeof script, tried, sizeof tried))
        return SP_FAIL(SP_ERR_IO,
                       "qa: the QA script qa.py was not found (looked at %s); reinstall with `make install` "
                       "(it puts it in PREFIX/share/surveyproc/) or run bin/surveyproc from the source tree",
                       tried);
    const char *py = getenv("SURVEYPROC_PYTHON");
    if (!py || !py[0]) py = "/usr/bin/python3";
    if (access(py, X_OK) != 0)
        return SP_FAIL(SP_ERR_IO, "qa: %s not found; install the Debian packages python3 python3-h5py "
                                  "python3-numpy python3-matplotlib (apt-get install ...)", py);

    /* argv for python3: PY SCRIPT [the subcommand's arguments] */
    char **av = calloc((size_t)argc + 3, sizeof *av);
    if (!av) return SP_FAIL(SP_ERR_NOMEM, "qa: out of memory");
    av[0] = (char *)py;
    av[1] = script;
    for (int i = 1; i < argc; i++) av[i + 1] = argv[i];
    sp_log(SP_LOG_DEBUG, "qa: running %s %s", py, script);
    fflush(stdout);
    fflush(stderr);
    pid_t pid;
    int rc = posix_spawn(&pid, py, NULL, NULL, av, environ);
    free(av);
    if (rc != 0) return SP_FAIL(SP_ERR_IO, "qa: cannot run %s: %s", py, strerror(rc));
    int wst = 0;
    while (waitpid(pid, &wst, 0) < 0) {
        if (errno != EINTR) return SP_FAIL(SP_ERR_IO, "qa: waiting for %s: %s", py, strerror(errno));
    }
    if (WIFSIGNALED(wst))
        return SP_FAIL(SP_ERR_INTERNAL, "qa: %s %s was killed by signal %d", py, script, WTERMSIG(wst));
    int code = WEXITSTATUS(wst);
    switch (code) {
    case 0: return SP_OK;
    case 2: return SP_FAIL(SP_ERR_INPUT, "qa: bad arguments (message above; see surveyproc qa --help)");
    case 3: return SP_FAIL(SP_ERR_INPUT, "qa: the store cannot be read (message above)");
    case 4: return SP_FAIL(SP_ERR_IO, "qa: the report cannot be written (message above)");
    case 5:
        return SP_FAIL(SP_ERR_INTERNAL, "qa: %s failed: a Python package is missing or a figure could not be "
                                        "drawn (message above)", script);
    default:
        return SP_FAIL(SP_ERR_INTERNAL, "qa: %s exited with code %d (message above)", script, code);
    }
}

int sp_cmd_qa(int argc, char **argv)
{
    if (sp_cli_wants_help(argc, argv)) {
        usage(stdout);
        return SP_OK;
    }
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int status = SP_OK;
    if (rank == 0) status = run_qa(argc, argv);
    if (size > 1) {
        /* every rank exits with rank 0's result; the message is printed once, by rank 0 */
        MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
        if (status != SP_OK) sp_cli_exit_agreed(status);
    }
    return status;
}
