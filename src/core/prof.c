/* prof.c — nested timing regions and their merge across ranks (see sp_prof.h). */
#include "surveyproc/sp_prof.h"
#include "surveyproc/sp_error.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#define MAX_NODES 1024
#define MAX_DEPTH 32

typedef struct {
    const char *name;
    int parent, first_child, next_sibling;
    long calls;
    double wall, cpu, bytes;
} node_t;

static node_t nodes[MAX_NODES];
static int nnodes = 1;             /* node 0 is the root */
static int stack[MAX_DEPTH];
static double t_start[MAX_DEPTH], c_start[MAX_DEPTH];
static int depth = 0;              /* stack[0] = root */
static int overflow = 0;           /* pushes not recorded (too deep / too many) */
static int fine_on = 0;
static int fine_skip = 0;          /* nested fine pushes skipped while disabled */

double sp_wtime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double sp_cputime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double sp_thread_cputime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void sp_prof_init(int fine_enabled)
{
    memset(nodes, 0, sizeof nodes);
    nodes[0].name = "total";
    nodes[0].parent = -1;
    nodes[0].first_child = nodes[0].next_sibling = -1;
    nnodes = 1;
    depth = 0;
    stack[0] = 0;
    overflow = 0;
    fine_on = fine_enabled;
    fine_skip = 0;
}

int sp_prof_fine_enabled(void) { return fine_on; }

static int main_thread(void) { return !omp_in_parallel(); }

void sp_prof_push(const char *name)
{
    if (!main_thread()) return;
    if (!nodes[0].name) sp_prof_init(0); /* usable without an explicit init (library users, tests) */
    if (overflow || depth + 1 >= MAX_DEPTH) { overflow++; return; }
    int parent = stack[depth], c;
    for (c = nodes[parent].first_child; c >= 0; c = nodes[c].next_sibling)
        if (nodes[c].name == name || strcmp(nodes[c].name, name) == 0) break;
    if (c < 0) {
        if (nnodes >= MAX_NODES) { overflow++; return; }
        c = nnodes++;
        nodes[c].name = name;
        nodes[c].parent = parent;
        nodes[c].first_child = -1;
        /* append so the table keeps first-call order */
        nodes[c].next_sibling = -1;
        int *link = &nodes[parent].first_child;
        while (*link >= 0) link = &nodes[*link].next_sibling;
        *link = c;
    }
    depth++;
    stack[depth] = c;
    t_start[depth] = sp_wtime();
    c_start[depth] = sp_cputime();
}

void sp_prof_pop(void)
{
    if (!main_thread()) return;
    if (overflow) { overflow--; return; }
    if (depth == 0) return; /* unbalanced pop: ignore rather than corrupt */
    node_t *n = &nodes[stack[depth]];
    n->calls++;
    n->wall += sp_wtime() - t_start[depth];
    n->cpu += sp_cputime() - c_start[depth];
    depth--;
}

void sp_prof_push_fine(const char *name)
{
    if (fine_on) sp_prof_push(name);
}

void sp_prof_pop_fine(void)
{
    if (fine_on) sp_prof_pop();
}

void sp_prof_bytes(double nbytes)
{
    if (!main_thread()) {
        /* bytes from threads still count: add atomically to the current node */
        #pragma omp atomic
        nodes[stack[depth]].bytes += nbytes;
        return;
    }
    nodes[stack[depth]].bytes += nbytes;
}

double sp_prof_peak_rss(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss * 1024.0;
}

static void node_path(int i, char *buf, size_t n)
{
    int chain[MAX_DEPTH], k = 0;
    for (int j = i; j > 0 && k < MAX_DEPTH; j = nodes[j].parent) chain[k++] = j;
    buf[0] = '\0';
    size_t used = 0;
    for (int m = k - 1; m >= 0; m--) {
        int w = snprintf(buf + used, n - used, "%s%s", m == k - 1 ? "" : "/", nodes[chain[m]].name);
        if (w < 0 || (size_t)w >= n - used) break;
        used += (size_t)w;
    }
}

static void flatten(int i, int d, sp_prof_row *rows, int *k)
{
    for (int c = nodes[i].first_child; c >= 0; c = nodes[c].next_sibling) {
        sp_prof_row *r = &rows[(*k)++];
        memset(r, 0, sizeof *r);
        node_path(c, r->path, sizeof r->path);
        r->depth = d;
        r->calls = nodes[c].calls;
        r->wall = nodes[c].wall;
        r->cpu = nodes[c].cpu;
        r->bytes = nodes[c].bytes;
        double kids = 0;
        for (int g = nodes[c].first_child; g >= 0; g = nodes[g].next_sibling) kids += nodes[g].wall;
        r->own = r->wall - kids > 0 ? r->wall - kids : 0;
        flatten(c, d + 1, rows, k);
    }
}

int sp_prof_rows(sp_prof_row **rows, int *nrows)
{
    int status = SP_OK;
    sp_prof_row *r = NULL;
    SP_ALLOC(r, nnodes);
    int k = 0;
    flatten(0, 0, r, &k);
    *rows = r;
    *nrows = k;
cleanup:
    return status;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int sp_prof_merge(MPI_Comm comm, sp_prof_merged **out, int *nout)
{
    int status = SP_OK, rank, size;
    sp_prof_row *mine = NULL, *all = NULL;
    sp_prof_merged *m = NULL;
    int *counts = NULL, *displs = NULL;
    double *vals = NULL, *owns = NULL;
    int nmine = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    SP_TRY(sp_prof_rows(&mine, &nmine));
    SP_ALLOC(counts, size);
    SP_ALLOC(displs, size);
    int nb = nmine * (int)sizeof(sp_prof_row);
    MPI_Allgather(&nb, 1, MPI_INT, counts, 1, MPI_INT, comm);
    long total = 0;
    for (int r = 0; r < size; r++) { displs[r] = (int)total; total += counts[r]; }
    int nall = (int)(total / (long)sizeof(sp_prof_row));
    SP_ALLOC(all, nall);
    MPI_Allgatherv(mine, nb, MPI_BYTE, all, counts, displs, MPI_BYTE, comm);
    SP_ALLOC(m, nall);
    SP_ALLOC(vals, size);
    SP_ALLOC(owns, size);
    int nm = 0;
    /* unique paths in order of first appearance (rank 0's order first) */
    for (int i = 0; i < nall; i++) {
        int seen = 0;
        for (int j = 0; j < nm && !seen; j++) seen = strcmp(m[j].path, all[i].path) == 0;
        if (seen) continue;
        sp_prof_merged *g = &m[nm++];
        memset(g, 0, sizeof *g);
        memcpy(g->path, all[i].path, sizeof g->path);
        g->depth = all[i].depth;
        int nv = 0;
        for (int k = i; k < nall; k++) {
            if (strcmp(all[k].path, g->path) != 0) continue;
            vals[nv] = all[k].wall;
            owns[nv] = all[k].own;
            nv++;
            g->calls += all[k].calls;
            g->cpu_sum += all[k].cpu;
            g->bytes_sum += all[k].bytes;
        }
        qsort(vals, (size_t)nv, sizeof *vals, cmp_double);
        qsort(owns, (size_t)nv, sizeof *owns, cmp_double);
        double sum = 0;
        for (int k = 0; k < nv; k++) sum += vals[k];
        g->nranks = nv;
        g->wall_min = vals[0];
        g->wall_max = vals[nv - 1];
        g->wall_med = nv % 2 ? vals[nv / 2] : 0.5 * (vals[nv / 2 - 1] + vals[nv / 2]);
        g->own_med = nv % 2 ? owns[nv / 2] : 0.5 * (owns[nv / 2 - 1] + owns[nv / 2]);
        g->wall_mean = sum / nv;
        g->imbalance = g->wall_mean > 0 ? g->wall_max / g->wall_mean : 1.0;
    }
    *out = m;
    *nout = nm;
    m = NULL;
cleanup:
    free(mine);
    free(all);
    free(m);
    free(counts);
    free(displs);
    free(vals);
    free(owns);
    return status;
}

void sp_prof_print(FILE *f, const sp_prof_merged *m, int n, int nranks)
{
    fprintf(f, "Timing (seconds; %d rank%s; min/median/max over the ranks that ran a region)\n", nranks,
            nranks == 1 ? "" : "s");
    fprintf(f, "%-34s %8s %9s %9s %9s %9s %9s %6s %10s\n", "region", "calls", "min", "median", "max",
            "own(med)", "cpu(sum)", "imbal", "MB");
    for (int i = 0; i < n; i++) {
        const char *leaf = strrchr(m[i].path, '/');
        leaf = leaf ? leaf + 1 : m[i].path;
        char label[64];
        snprintf(label, sizeof label, "%*s%.50s", 2 * (m[i].depth % 8), "", leaf);
        fprintf(f, "%-34s %8ld %9.3f %9.3f %9.3f %9.3f %9.3f %6.2f %10.1f\n", label, m[i].calls, m[i].wall_min,
                m[i].wall_med, m[i].wall_max, m[i].own_med, m[i].cpu_sum, m[i].imbalance, m[i].bytes_sum / 1e6);
    }
}
