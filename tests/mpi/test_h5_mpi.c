/* test_h5_mpi.c — the HDF5 store layer under MPI (run at 1, 2 and 4 ranks):
 * disjoint row writes by index lists in arbitrary order, interleaved tiny rows,
 * array hyperslabs, collective attributes and groups, one rank writing alone,
 * reopen and read on every rank, the same error on every rank.
 *
 * Extra modes (used by tests/scripts/test_h5_kill.sh), chosen by env vars:
 *   SP_H5_KILL_WRITER=file  create a store, flush, write "file.ready" (with the
 *                           ranks' pids), then keep writing rows slowly until killed
 *   SP_H5_KILL_CHECK=file   serial reader: every row / image row of the killed
 *                           store is either the fill value or exactly what was written
 *   SP_H5_DEMO=file         write a small complete store for h5py checks
 *   SP_H5_FILL=file         try to create a table of SP_H5_FILL_MB MiB (disk-full test)
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "support.h"
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_h5.h"

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int rank, size;
static char shared_dir[512];

/* A path in a directory every rank sees (rank 0's temp dir). */
static const char *shared_path(const char *name, char *buf, size_t n)
{
    snprintf(buf, n, "%s/%s", shared_dir, name);
    return buf;
}

/* Per-test failure note: the first failed check on this rank. */
static char fail_msg[512];
#define CHECK(cond, ...)                                                                                    \
    do {                                                                                                    \
        if (!(cond) && !fail_msg[0]) {                                                                      \
            int o_ = snprintf(fail_msg, sizeof fail_msg, "rank %d line %d: ", rank, __LINE__);              \
            snprintf(fail_msg + o_, sizeof fail_msg - (size_t)o_, __VA_ARGS__);                             \
        }                                                                                                   \
    } while (0)
#define CHECK_OK(call) CHECK((call) == SP_OK, "%s: %s", #call, sp_err_msg())

/* Collective: print every rank's first failure on rank 0 and assert none. */
static void all_ok(void)
{
    char all[16][512];
    int n = size < 16 ? size : 16;
    char mine[512];
    memcpy(mine, fail_msg, sizeof mine);
    if (rank < 16 && rank != 0) MPI_Send(mine, 512, MPI_CHAR, 0, 77, MPI_COMM_WORLD);
    if (rank == 0) {
        memcpy(all[0], mine, 512);
        for (int r = 1; r < n; r++) MPI_Recv(all[r], 512, MPI_CHAR, r, 77, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        for (int r = 0; r < n; r++)
            if (all[r][0]) fprintf(stderr, "  %s\n", all[r]);
    }
    int ok = fail_msg[0] == '\0';
    fail_msg[0] = '\0';
    assert_true(sp_test_all_ranks(ok));
}

/* deterministic shuffle (per-rank LCG) */
static void shuffle(long *v, long n, unsigned seed)
{
    unsigned long x = seed * 2654435761u + 12345;
    for (long i = n - 1; i > 0; i--) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        long j = (long)((x >> 33) % (unsigned long)(i + 1));
        long t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

typedef struct {
    char id[16];
    int64_t i;
    double val;
    int32_t rank;
    float f;
    uint8_t u;
} row_t;

static const sp_h5_col COLS[] = {
    {.name = "ID", .type = SP_H5_STR, .len = 16, .description = "source id"},
    {.name = "i", .type = SP_H5_I64},
    {.name = "val", .type = SP_H5_F64, .unit = "nJy"},
    {.name = "rank", .type = SP_H5_I32, .description = "writer"},
    {.name = "f", .type = SP_H5_F32, .unit = "mag"},
    {.name = "u", .type = SP_H5_U8, .has_fill = 1, .fill = 255},
};
#define NCOL (int)(sizeof COLS / sizeof COLS[0])

static void make_row(row_t *r, long i, int writer)
{
    memset(r, 0, sizeof *r);
    snprintf(r->id, sizeof r->id, "s%ld", i);
    r->i = i;
    r->val = 1000.0 + (double)i / 7.0;
    r->rank = writer;
    r->f = 20.0f + (float)(i % 100) * 0.01f;
    r->u = (uint8_t)(i % 200);
}

static long owner(long i) { return (i * 31 + 7) % size; }
static int unwritten(long i) { return i % 17 == 0; }

static int row_ok(const row_t *r, long i)
{
    if (unwritten(i))
        return r->id[0] == '\0' && r->i == -1 && isnan(r->val) && r->rank == -1 && isnan(r->f) && r->u == 255;
    row_t e;
    make_row(&e, i, (int)owner(i));
    return memcmp(r, &e, sizeof e) == 0;
}

static void t_disjoint_rows(void **s)
{
    (void)s;
    char path[600];
    shared_path("rows.h5", path, sizeof path);
    const long N = 1003;
    sp_h5 *h = NULL;
    row_t *rows = calloc(N, sizeof *rows), *back = calloc(N, sizeof *back);
    long *mine = calloc(N, sizeof *mine), nm = 0;
    CHECK_OK(sp_h5_create(path, MPI_COMM_WORLD, &h));
    CHECK(h && sp_h5_parallel(h) == (size > 1), "driver: parallel=%d with %d ranks", h ? sp_h5_parallel(h) : -1,
          size);
    CHECK_OK(sp_h5_table_create(h, "/catalog", COLS, NCOL, N));
    CHECK_OK(sp_h5_table_create(h, "/blocks", COLS, NCOL, N));
    CHECK_OK(sp_h5_flush(h));

    /* my rows, in a rank-specific random order, in batches of 1, 2, 3, ... */
    for (long i = 0; i < N; i++)
        if (owner(i) == rank && !unwritten(i)) mine[nm++] = i;
    shuffle(mine, nm, 17u + (unsigned)rank);
    for (long k = 0; k < nm; k++) make_row(&rows[k], mine[k], rank);
    for (long k = 0, b = 1; k < nm; k += b, b++) {
        long m = nm - k < b ? nm - k : b;
        CHECK_OK(sp_h5_table_write_rows(h, "/catalog", COLS, NCOL, mine + k, m, rows + k));
    }
    /* /blocks: each rank a contiguous range, written in two pieces, back first */
    long b0 = N * rank / size, b1 = N * (rank + 1) / size, mid = (b0 + b1) / 2;
    row_t *blk = calloc((size_t)(b1 - b0) + 1, sizeof *blk);
    for (long i = b0; i < b1; i++) make_row(&blk[i - b0], i, rank);
    CHECK_OK(sp_h5_table_write(h, "/blocks", COLS, NCOL, mid, b1 - mid, blk + (mid - b0)));
    CHECK_OK(sp_h5_table_write(h, "/blocks", COLS, NCOL, b0, mid - b0, blk));
    CHECK_OK(sp_h5_close(&h));

    /* reopen read-only on every rank; everyone checks everything */
    CHECK_OK(sp_h5_open(path, 0, MPI_COMM_WORLD, &h));
    CHECK_OK(sp_h5_table_read(h, "/catalog", COLS, NCOL, 0, N, back));
    long bad = 0;
    for (long i = 0; i < N; i++) bad += !row_ok(&back[i], i);
    CHECK(bad == 0, "%ld of %ld /catalog rows wrong", bad, N);
    CHECK_OK(sp_h5_table_read(h, "/blocks", COLS, NCOL, 0, N, back));
    bad = 0;
    for (long i = 0; i < N; i++) {
        row_t e;
        /* the writer of row i is the rank whose range holds it */
        int w = 0;
        for (int r = 0; r < size; r++)
            if (i >= N * r / size && i < N * (r + 1) / size) w = r;
        make_row(&e, i, w);
        bad += memcmp(&back[i], &e, sizeof e) != 0;
    }
    CHECK(bad == 0, "%ld of %ld /blocks rows wrong", bad, N);
    /* columns, as the export / score tools read them */
    double *val = calloc(N, sizeof *val);
    long *ri = calloc(N, sizeof *ri);
    char(*ids)[20] = calloc(N, 20);
    CHECK_OK(sp_h5_table_read_col_double(h, "/catalog", "val", 0, N, val));
    CHECK_OK(sp_h5_table_read_col_long(h, "/catalog", "rank", 0, N, ri));
    CHECK_OK(sp_h5_table_read_col_str(h, "/catalog", "ID", 0, N, &ids[0][0], 20));
    for (long i = 0; i < N; i++) {
        char e[24];
        snprintf(e, sizeof e, "s%ld", i);
        if (unwritten(i)) CHECK(isnan(val[i]) && ri[i] == -1 && ids[i][0] == '\0', "row %ld not fill", i);
        else CHECK(val[i] == 1000.0 + (double)i / 7.0 && ri[i] == owner(i) && !strcmp(ids[i], e),
                   "row %ld column values wrong", i);
    }
    /* a row list read by every rank, different per rank */
    long want[5] = {N - 1, 0, 500 + rank, 17, 3};
    row_t five[5];
    CHECK_OK(sp_h5_table_read_rows(h, "/catalog", COLS, NCOL, want, 5, five));
    for (int k = 0; k < 5; k++) CHECK(row_ok(&five[k], want[k]), "read_rows row %ld wrong", want[k]);
    CHECK_OK(sp_h5_close(&h));
    free(val);
    free(ri);
    free(ids);
    free(blk);
    free(rows);
    free(back);
    free(mine);
    all_ok();
}

/* Rows of 2 bytes interleaved between ranks, one row per call and in lists:
 * any read-modify-write of a neighbour's bytes would show. */
static void t_interleaved_tiny_rows(void **s)
{
    (void)s;
    char path[600];
    shared_path("tiny.h5", path, sizeof path);
    const long N = 6000;
    sp_h5_col tc[2] = {{.name = "a", .type = SP_H5_U8}, {.name = "b", .type = SP_H5_I8}};
    struct {
        uint8_t a;
        int8_t b;
    } *w = calloc(N, 2), *r = calloc(N, 2);
    long *idx = calloc(N, sizeof *idx), n = 0;
    sp_h5 *h = NULL;
    CHECK_OK(sp_h5_create(path, MPI_COMM_WORLD, &h));
    CHECK_OK(sp_h5_table_create(h, "/t", tc, 2, N));
    CHECK_OK(sp_h5_flush(h));
    for (long i = rank; i < N; i += size) idx[n++] = i;
    shuffle(idx, n, 99u + (unsigned)rank);
    for (long k = 0; k < n; k++) {
        w[k].a = (uint8_t)(1 + idx[k] % 250);
        w[k].b = (int8_t)(rank + 1);
    }
    long half = n / 2;
    for (long k = 0; k < half; k++) CHECK_OK(sp_h5_table_write_rows(h, "/t", tc, 2, idx + k, 1, w + k));
    CHECK_OK(sp_h5_table_write_rows(h, "/t", tc, 2, idx + half, n - half, w + half));
    CHECK_OK(sp_h5_close(&h));
    CHECK_OK(sp_h5_open(path, 0, MPI_COMM_WORLD, &h));
    CHECK_OK(sp_h5_table_read(h, "/t", tc, 2, 0, N, r));
    long bad = 0;
    for (long i = 0; i < N; i++) bad += !(r[i].a == 1 + i % 250 && r[i].b == (int8_t)(i % size + 1));
    CHECK(bad == 0, "%ld of %ld interleaved 2-byte rows wrong", bad, N);
    CHECK_OK(sp_h5_close(&h));
    free(w);
    free(r);
    free(idx);
    all_ok();
}

/* ePSF-like 4-D array by cells and an image by interleaved row stripes. */
static void t_array_hyperslabs(void **s)
{
    (void)s;
    char path[600];
    shared_path("arrays.h5", path, sizeof path);
    enum { NCY = 3, NCX = 5, P = 7, NY = 40, NX = 33 };
    sp_h5 *h = NULL;
    CHECK_OK(sp_h5_create(path, MPI_COMM_WORLD, &h));
    long dims[4] = {NCY, NCX, P, P}, chunk[4] = {1, 1, P, P};
    CHECK_OK(sp_h5_array_create(h, "/epsf/r", SP_H5_F32, 4, dims, chunk, NULL));
    long id[2] = {NY, NX};
    CHECK_OK(sp_h5_array_create(h, "/img", SP_H5_F64, 2, id, NULL, NULL));
    long cd[2] = {NCY, NCX};
    CHECK_OK(sp_h5_array_create(h, "/epsf/nstars", SP_H5_I32, 2, cd, NULL, NULL));
    CHECK_OK(sp_h5_flush(h));
    /* cells, in reverse order; cell (2,4) never written */
    for (int c = NCY * NCX - 1; c >= 0; c--) {
        int cy = c / NCX, cx = c % NCX;
        if ((c * 7) % size != rank || (cy == 2 && cx == 4)) continue;
        float psf[P * P];
        for (int k = 0; k < P * P; k++) psf[k] = (float)(c * 100 + k);
        long st[4] = {cy, cx, 0, 0}, ct[4] = {1, 1, P, P};
        CHECK_OK(sp_h5_array_write(h, "/epsf/r", SP_H5_F32, st, ct, psf));
        int ns = 10 + c;
        long s2[2] = {cy, cx}, c2[2] = {1, 1};
        CHECK_OK(sp_h5_array_write(h, "/epsf/nstars", SP_H5_I32, s2, c2, &ns));
    }
    for (int y = rank; y < NY; y += size) {
        double row[NX];
        for (int x = 0; x < NX; x++) row[x] = y * 1000.0 + x;
        long st[2] = {y, 0}, ct[2] = {1, NX};
        CHECK_OK(sp_h5_array_write(h, "/img", SP_H5_F64, st, ct, row));
    }
    CHECK_OK(sp_h5_close(&h));

    CHECK_OK(sp_h5_open(path, 0, MPI_COMM_WORLD, &h));
    static float all[NCY * NCX * P * P];
    static double img[NY * NX];
    int ns[NCY * NCX];
    CHECK_OK(sp_h5_array_read(h, "/epsf/r", SP_H5_F32, NULL, NULL, all));
    CHECK_OK(sp_h5_array_read(h, "/img", SP_H5_F64, NULL, NULL, img));
    CHECK_OK(sp_h5_array_read(h, "/epsf/nstars", SP_H5_I32, NULL, NULL, ns));
    long bad = 0;
    for (int c = 0; c < NCY * NCX; c++)
        for (int k = 0; k < P * P; k++) {
            float v = all[c * P * P + k];
            bad += (c == 2 * NCX + 4) ? !isnan(v) : v != (float)(c * 100 + k);
        }
    for (int c = 0; c < NCY * NCX; c++) bad += ns[c] != (c == 2 * NCX + 4 ? -1 : 10 + c);
    for (int y = 0; y < NY; y++)
        for (int x = 0; x < NX; x++) bad += img[y * NX + x] != y * 1000.0 + x;
    CHECK(bad == 0, "%ld array elements wrong", bad);
    /* a sub-block read on each rank */
    double sub[4];
    long st[2] = {rank % NY, 3}, ct[2] = {1, 4};
    CHECK_OK(sp_h5_array_read(h, "/img", SP_H5_F64, st, ct, sub));
    CHECK(sub[0] == (rank % NY) * 1000.0 + 3 && sub[3] == (rank % NY) * 1000.0 + 6, "sub-block wrong");
    CHECK_OK(sp_h5_close(&h));
    all_ok();
}

static void t_attrs_groups(void **s)
{
    (void)s;
    char path[600];
    shared_path("attrs.h5", path, sizeof path);
    sp_h5 *h = NULL;
    size_t n = 100000;
    char *text = malloc(n + 1);
    for (size_t i = 0; i < n; i++) text[i] = (char)('A' + i % 26);
    text[n] = '\0';
    CHECK_OK(sp_h5_create(path, MPI_COMM_WORLD, &h));
    CHECK_OK(sp_h5_group_create(h, "/provenance"));
    CHECK_OK(sp_h5_group_create(h, "/cells/meta"));
    CHECK_OK(sp_h5_attr_set_str(h, "/provenance", "config", text));
    CHECK_OK(sp_h5_attr_set_long(h, "/provenance", "mpi_size", size));
    CHECK_OK(sp_h5_attr_set_double(h, "/", "zp_ref", 25.0));
    double bb[4] = {0, 0, 2048, 2048};
    CHECK_OK(sp_h5_attr_set_doubles(h, "/cells/meta", "bbox", bb, 4));
    long one = 4;
    CHECK_OK(sp_h5_array_create(h, "/cells/seconds", SP_H5_F64, 1, &one, NULL, NULL));
    CHECK_OK(sp_h5_attr_set_str(h, "/cells/seconds", "unit", "s"));
    /* a symmetric error: every rank gets it, with the object named */
    int st = sp_h5_group_create(h, "/cells/seconds");
    CHECK(st == SP_ERR_INPUT && strstr(sp_err_msg(), "/cells/seconds exists and is not a group"),
          "group over dataset: %d %s", st, sp_err_msg());
    CHECK_OK(sp_h5_flush(h));
    /* independent reads right away, on every rank */
    char *v = NULL;
    CHECK_OK(sp_h5_attr_get_str(h, "/provenance", "config", &v));
    CHECK(v && !strcmp(v, text), "config text differs");
    free(v);
    CHECK_OK(sp_h5_close(&h));

    CHECK_OK(sp_h5_open(path, 0, MPI_COMM_WORLD, &h));
    long ms = 0;
    double z = 0, bbr[4];
    long nb = 0;
    int ex = 0;
    CHECK_OK(sp_h5_attr_get_long(h, "/provenance", "mpi_size", &ms));
    CHECK_OK(sp_h5_attr_get_double(h, "/", "zp_ref", &z));
    CHECK_OK(sp_h5_attr_get_doubles(h, "/cells/meta", "bbox", bbr, 4, &nb));
    CHECK_OK(sp_h5_exists(h, "/cells/meta", &ex));
    CHECK(ms == size && z == 25.0 && nb == 4 && bbr[2] == 2048 && ex, "attribute values wrong");
    CHECK_OK(sp_h5_attr_get_str(h, "/cells/seconds", "unit", &v));
    CHECK(v && !strcmp(v, "s"), "unit attribute wrong");
    free(v);
    CHECK_OK(sp_h5_close(&h));
    free(text);
    all_ok();
}

/* Independent means independent: only the last rank writes and reads while the
 * others do nothing with the file until the collective close. */
static void t_one_rank_alone(void **s)
{
    (void)s;
    char path[600];
    shared_path("alone.h5", path, sizeof path);
    enum { N = 100 };
    sp_h5 *h = NULL;
    CHECK_OK(sp_h5_create(path, MPI_COMM_WORLD, &h));
    CHECK_OK(sp_h5_table_create(h, "/t", COLS, NCOL, N));
    CHECK_OK(sp_h5_flush(h));
    if (rank == size - 1) {
        row_t r[N];
        for (long i = 0; i < N; i++) make_row(&r[i], i, rank);
        for (long i = N - 1; i >= 0; i -= 10) CHECK_OK(sp_h5_table_write(h, "/t", COLS, NCOL, i - 9, 10, &r[i - 9]));
        row_t back[N];
        CHECK_OK(sp_h5_table_read(h, "/t", COLS, NCOL, 0, N, back));
        CHECK(!memcmp(back, r, sizeof r), "lone writer reads back different rows");
        char *u = NULL;
        CHECK_OK(sp_h5_attr_get_str(h, "/t", "val_unit", &u));
        CHECK(u && !strcmp(u, "nJy"), "unit attribute");
        free(u);
    }
    CHECK_OK(sp_h5_close(&h));
    CHECK_OK(sp_h5_open(path, 0, MPI_COMM_WORLD, &h));
    row_t last;
    CHECK_OK(sp_h5_table_read(h, "/t", COLS, NCOL, N - 1, 1, &last));
    row_t e;
    make_row(&e, N - 1, size - 1);
    CHECK(!memcmp(&last, &e, sizeof e), "last row wrong after reopen");
    CHECK_OK(sp_h5_close(&h));
    all_ok();
}

/* The same missing-file error on every rank, and a serial handle per rank on
 * the same file (read-only) beside nothing else. */
static void t_errors_everywhere(void **s)
{
    (void)s;
    char path[600];
    sp_h5 *h = NULL;
    shared_path("missing.h5", path, sizeof path);
    int st = sp_h5_open(path, 0, MPI_COMM_WORLD, &h);
    CHECK(st == SP_ERR_IO && h == NULL && strstr(sp_err_msg(), "missing file"), "open missing: %d %s", st,
          sp_err_msg());
    shared_path("rows.h5", path, sizeof path); /* from t_disjoint_rows */
    CHECK_OK(sp_h5_open(path, 0, MPI_COMM_NULL, &h));
    CHECK(h && !sp_h5_parallel(h), "serial handle expected");
    long nr = 0;
    CHECK_OK(sp_h5_table_nrows(h, "/catalog", &nr));
    CHECK(nr == 1003, "nrows %ld", nr);
    CHECK_OK(sp_h5_close(&h));
    all_ok();
}

/* ---- modes for tests/scripts/test_h5_kill.sh ----------------------------- */

#define KN 400000L /* rows of the killed store */
#define KB 500L    /* rows per batch */
#define KNX 1000L  /* image row length */

static const sp_h5_col KCOLS[] = {
    {.name = "ID", .type = SP_H5_STR, .len = 16},
    {.name = "i", .type = SP_H5_I64},
    {.name = "ra", .type = SP_H5_F64, .unit = "deg"},
    {.name = "dec", .type = SP_H5_F64, .unit = "deg"},
    {.name = "flux_g", .type = SP_H5_F32, .unit = "nJy"},
    {.name = "flag", .type = SP_H5_U8},
};
typedef struct {
    char id[16];
    int64_t i;
    double ra, dec;
    float flux;
    uint8_t flag;
} krow_t;

static void kmake(krow_t *r, long i)
{
    memset(r, 0, sizeof *r);
    snprintf(r->id, sizeof r->id, "obj%07ld", i);
    r->i = i;
    r->ra = 150.0 + i * 1e-6;
    r->dec = 2.0 - i * 1e-6;
    r->flux = (float)(i % 1000);
    r->flag = 1;
}

static int die(const char *what)
{
    fprintf(stderr, "rank %d: %s: %s\n", rank, what, sp_err_msg());
    return 1;
}

static int kill_writer(const char *path)
{
    sp_h5 *h = NULL;
    long nb = KN / KB;
    if (sp_h5_create(path, MPI_COMM_WORLD, &h)) return die("create");
    if (sp_h5_table_create(h, "/catalog", KCOLS, 6, KN)) return die("table");
    long dims[2] = {nb, KNX};
    if (sp_h5_array_create(h, "/img", SP_H5_F64, 2, dims, NULL, NULL)) return die("array");
    if (sp_h5_attr_set_str(h, "/", "state", "writing")) return die("attr");
    if (sp_h5_flush(h)) return die("flush");
    int pid = (int)getpid(), *pids = calloc((size_t)size, sizeof *pids);
    MPI_Gather(&pid, 1, MPI_INT, pids, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        char rp[700], tp[720];
        snprintf(rp, sizeof rp, "%s.ready", path);
        snprintf(tp, sizeof tp, "%s.tmp", rp);
        FILE *f = fopen(tp, "w");
        for (int r = 0; r < size; r++) fprintf(f, "%d\n", pids[r]);
        fclose(f);
        rename(tp, rp);
    }
    free(pids);
    /* batches b = rank, rank+size, ... in a scattered order, each a list of
     * rows plus one image row, slowly, until killed (or done) */
    krow_t *rows = calloc(KB, sizeof *rows);
    long *idx = calloc(KB, sizeof *idx);
    double img[KNX];
    for (long b = rank; b < nb; b += size) {
        for (long k = 0; k < KB; k++) {
            idx[k] = (b * KB + k) * 7919 % KN; /* a permutation: scattered, batches disjoint */
            kmake(&rows[k], idx[k]);
        }
        if (sp_h5_table_write_rows(h, "/catalog", KCOLS, 6, idx, KB, rows)) return die("write rows");
        for (long x = 0; x < KNX; x++) img[x] = b + x * 1e-3;
        long st[2] = {b, 0}, ct[2] = {1, KNX};
        if (sp_h5_array_write(h, "/img", SP_H5_F64, st, ct, img)) return die("write image row");
        usleep(3000);
    }
    free(rows);
    free(idx);
    if (sp_h5_close(&h)) return die("close");
    return 0;
}

static int kill_check(const char *path)
{
    sp_h5 *h = NULL;
    if (sp_h5_open(path, 0, MPI_COMM_NULL, &h)) return die("open");
    long nr = 0, nb = KN / KB;
    if (sp_h5_table_nrows(h, "/catalog", &nr) || nr != KN) return die("nrows");
    krow_t *r = calloc(KN, sizeof *r);
    double *img = calloc((size_t)nb * KNX, sizeof *img);
    if (sp_h5_table_read(h, "/catalog", KCOLS, 6, 0, KN, r)) return die("read rows");
    if (sp_h5_array_read(h, "/img", SP_H5_F64, NULL, NULL, img)) return die("read image");
    char *state = NULL;
    if (sp_h5_attr_get_str(h, "/", "state", &state)) return die("attr");
    long written = 0, fill = 0, bad = 0, rows_done = 0, rows_fill = 0, rows_bad = 0;
    for (long i = 0; i < KN; i++) {
        krow_t e;
        kmake(&e, i);
        if (!memcmp(&r[i], &e, sizeof e)) written++;
        else if (r[i].id[0] == '\0' && r[i].i == -1 && isnan(r[i].ra) && isnan(r[i].dec) && isnan(r[i].flux) &&
                 r[i].flag == 0)
            fill++;
        else bad++;
    }
    for (long b = 0; b < nb; b++) {
        int nan = 0, good = 0;
        for (long x = 0; x < KNX; x++) {
            double v = img[b * KNX + x];
            nan += isnan(v);
            good += v == b + x * 1e-3;
        }
        if (good == KNX) rows_done++;
        else if (nan == KNX) rows_fill++;
        else rows_bad++;
    }
    printf("state=%s rows: %ld written, %ld fill, %ld bad; image rows: %ld written, %ld fill, %ld bad\n", state,
           written, fill, bad, rows_done, rows_fill, rows_bad);
    free(state);
    free(r);
    free(img);
    sp_h5_close(&h);
    /* A batch killed in the middle of its write leaves some of its rows
     * written and some not. Only the one write in flight per rank when the
     * kill came could be torn (the kernel may stop a write at a page
     * boundary), so at most `size` damaged rows / image rows. */
    return (bad <= size && rows_bad <= size && written > 0) ? 0 : 1;
}

static int write_demo(const char *path)
{
    static const sp_h5_col dc[] = {
        {.name = "ID", .type = SP_H5_STR, .len = 10, .description = "source identifier"},
        {.name = "RA", .type = SP_H5_F64, .unit = "deg", .description = "right ascension"},
        {.name = "x", .type = SP_H5_F32, .unit = "pix"},
        {.name = "i8", .type = SP_H5_I8},
        {.name = "u8", .type = SP_H5_U8},
        {.name = "n", .type = SP_H5_I32},
        {.name = "big", .type = SP_H5_I64},
    };
    struct {
        char id[10];
        double ra;
        float x;
        int8_t i8;
        uint8_t u8;
        int32_t n;
        int64_t big;
    } r[10];
    sp_h5 *h = NULL;
    if (sp_h5_create(path, MPI_COMM_WORLD, &h)) return die("create");
    if (sp_h5_table_create(h, "/catalog", dc, 7, 10)) return die("table");
    if (sp_h5_attr_set_str(h, "/", "version", "demo")) return die("attr");
    long dims[4] = {2, 2, 3, 3};
    if (sp_h5_array_create(h, "/epsf/g", SP_H5_F32, 4, dims, NULL, NULL)) return die("array");
    if (sp_h5_flush(h)) return die("flush");
    long idx[10], n = 0;
    for (long i = rank; i < 9; i += size) { /* row 9 stays fill */
        memset(&r[n], 0, sizeof r[n]);
        snprintf(r[n].id, 10, "id%d", (int)(i % 100));
        r[n].ra = 10.0 + i;
        r[n].x = 0.5f * i;
        r[n].i8 = (int8_t)-i;
        r[n].u8 = (uint8_t)(200 + i);
        r[n].n = (int32_t)(i * 3);
        r[n].big = 5000000000LL * i;
        idx[n++] = i;
    }
    if (sp_h5_table_write_rows(h, "/catalog", dc, 7, idx, n, r)) return die("write");
    if (rank == 0) {
        float psf[9] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
        long st[4] = {1, 0, 0, 0}, ct[4] = {1, 1, 3, 3};
        if (sp_h5_array_write(h, "/epsf/g", SP_H5_F32, st, ct, psf)) return die("write array");
    }
    if (sp_h5_close(&h)) return die("close");
    return 0;
}

static int fill_disk(const char *path)
{
    const char *mb = getenv("SP_H5_FILL_MB");
    long rows = (long)(atof(mb ? mb : "4") * 1048576.0 / 8.0);
    sp_h5_col c = {.name = "v", .type = SP_H5_F64};
    sp_h5 *h = NULL;
    int st = sp_h5_create(path, MPI_COMM_WORLD, &h);
    if (st == SP_OK) st = sp_h5_table_create(h, "/big", &c, 1, rows);
    if (st == SP_OK) st = sp_h5_close(&h);
    printf("rank %d status %d (%s): %s\n", rank, st, sp_status_name(st), sp_err_msg());
    fflush(stdout);
    /* as the driver does on an error: other ranks may be blocked in HDF5 */
    if (st != SP_OK && size > 1) MPI_Abort(MPI_COMM_WORLD, 3);
    if (st != SP_OK) sp_h5_close(&h);
    return st == SP_OK ? 0 : 3;
}

int main(int argc, char **argv)
{
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int rc;
    if (getenv("SP_H5_KILL_WRITER")) rc = kill_writer(getenv("SP_H5_KILL_WRITER"));
    else if (getenv("SP_H5_KILL_CHECK")) rc = kill_check(getenv("SP_H5_KILL_CHECK"));
    else if (getenv("SP_H5_DEMO")) rc = write_demo(getenv("SP_H5_DEMO"));
    else if (getenv("SP_H5_FILL")) rc = fill_disk(getenv("SP_H5_FILL"));
    else {
        sp_test_quiet_nonroot();
        if (rank == 0) snprintf(shared_dir, sizeof shared_dir, "%s", sp_test_tmpdir());
        MPI_Bcast(shared_dir, sizeof shared_dir, MPI_CHAR, 0, MPI_COMM_WORLD);
        const struct CMUnitTest tests[] = {
            cmocka_unit_test(t_disjoint_rows),   cmocka_unit_test(t_interleaved_tiny_rows),
            cmocka_unit_test(t_array_hyperslabs), cmocka_unit_test(t_attrs_groups),
            cmocka_unit_test(t_one_rank_alone),  cmocka_unit_test(t_errors_everywhere),
        };
        rc = cmocka_run_group_tests_name("h5_mpi", tests, NULL, NULL);
        MPI_Barrier(MPI_COMM_WORLD); /* rank 0 removes the shared dir at exit */
    }
    MPI_Finalize();
    return rc;
}
