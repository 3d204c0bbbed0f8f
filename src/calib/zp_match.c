/* zp_match.c — sky index (3-D grid of unit vectors) and one-to-one matching.
 *
 * Why a grid on the unit sphere rather than (RA, Dec) boxes: no special cases
 * at RA = 0/360 or near the poles, and the chord between unit vectors is a
 * monotonic function of the angle, so "within r" is one comparison. Points
 * are sorted by their cell (kx, ky, kz); cells with the same (kx, ky) and
 * consecutive kz are contiguous, so a query does (2s+1)^2 binary searches and
 * scans short runs (s = 1 when the radius is at most the cell size). */
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_zp.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ARCSEC_RAD (M_PI / 180.0 / 3600.0)

typedef struct {
    double v[3];
    long i;
    int32_t k[3];
} entry;

struct sp_zp_index {
    long n;      /* points given (indices run 0 .. n-1) */
    long m;      /* points indexed (finite positions) */
    double h;    /* cell size (chord units) */
    entry *e;    /* m, sorted by (k[0], k[1], k[2], i) */
};

static void unitvec(double ra, double dec, double v[3])
{
    double a = ra * (M_PI / 180), d = dec * (M_PI / 180);
    double cd = cos(d);
    v[0] = cd * cos(a);
    v[1] = cd * sin(a);
    v[2] = sin(d);
}

static double chord_of(double arcsec)
{
    double t = arcsec * ARCSEC_RAD;
    if (t >= M_PI) return 2.0;
    return 2.0 * sin(t / 2);
}

static int32_t cell_of(double x, double h) { return (int32_t)floor(x / h); }

static int cmp_entry(const void *a, const void *b)
{
    const entry *x = a, *y = b;
    for (int d = 0; d < 3; d++)
        if (x->k[d] != y->k[d]) return x->k[d] < y->k[d] ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

int sp_zp_index_build(const double *ra, const double *dec, long n, double cell_arcsec, sp_zp_index **out)
{
    int status = SP_OK;
    sp_zp_index *x = NULL;
    SP_CHECK(out && n >= 0 && (n == 0 || (ra && dec)) && cell_arcsec > 0 && isfinite(cell_arcsec),
             SP_ERR_INTERNAL, "sp_zp_index_build: bad arguments (n %ld, cell %g arcsec)", n, cell_arcsec);
    *out = NULL;
    SP_ALLOC(x, 1);
    /* keep cell indices well inside int32: cells no smaller than 1 mas */
    if (cell_arcsec < 1e-3) cell_arcsec = 1e-3;
    x->h = chord_of(cell_arcsec);
    x->n = n;
    SP_ALLOC(x->e, n > 0 ? n : 1);
    for (long i = 0; i < n; i++) {
        if (!isfinite(ra[i]) || !isfinite(dec[i]) || fabs(dec[i]) > 90) continue;
        entry *e = &x->e[x->m++];
        unitvec(ra[i], dec[i], e->v);
        e->i = i;
        for (int d = 0; d < 3; d++) e->k[d] = cell_of(e->v[d], x->h);
    }
    qsort(x->e, (size_t)x->m, sizeof *x->e, cmp_entry);
    *out = x;
    x = NULL;
cleanup:
    sp_zp_index_free(&x);
    return status;
}

void sp_zp_index_free(sp_zp_index **idx)
{
    if (!idx || !*idx) return;
    free((*idx)->e);
    free(*idx);
    *idx = NULL;
}

/* First entry with key >= (a, b, c) (binary search). */
static long lower_bound(const sp_zp_index *x, int32_t a, int32_t b, int32_t c)
{
    long lo = 0, hi = x->m;
    while (lo < hi) {
        long mid = lo + (hi - lo) / 2;
        const int32_t *k = x->e[mid].k;
        int less = k[0] != a ? k[0] < a : k[1] != b ? k[1] < b : k[2] < c;
        if (less) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Visit every indexed point within chord rc of v (excluding `exclude`):
 * mode 0 nearest (returns index, *best_d2), mode 1 count. */
static long query(const sp_zp_index *x, const double v[3], double rc, long exclude, int mode, double *best_d2)
{
    double r2 = rc * rc;
    long best = -1, count = 0;
    double bd2 = INFINITY;
    if (!x || x->m == 0) goto done;
    long span = (long)ceil(rc / x->h);
    int32_t k0[3];
    for (int d = 0; d < 3; d++) k0[d] = cell_of(v[d], x->h);
    double ncells = (2.0 * span + 1) * (2.0 * span + 1);
    if (ncells > (double)x->m) {
        /* huge radius for this grid: a plain scan is cheaper */
        for (long e = 0; e < x->m; e++) {
            const entry *p = &x->e[e];
            if (p->i == exclude) continue;
            double dx = p->v[0] - v[0], dy = p->v[1] - v[1], dz = p->v[2] - v[2];
            double d2 = dx * dx + dy * dy + dz * dz;
            if (d2 > r2) continue;
            count++;
            if (d2 < bd2 || (d2 == bd2 && p->i < best)) { bd2 = d2; best = p->i; }
        }
        goto done;
    }
    for (long a = k0[0] - span; a <= k0[0] + span; a++)
        for (long b = k0[1] - span; b <= k0[1] + span; b++) {
            long e = lower_bound(x, (int32_t)a, (int32_t)b, (int32_t)(k0[2] - span));
            for (; e < x->m; e++) {
                const entry *p = &x->e[e];
                if (p->k[0] != a || p->k[1] != b || p->k[2] > k0[2] + span) break;
                if (p->i == exclude) continue;
                double dx = p->v[0] - v[0], dy = p->v[1] - v[1], dz = p->v[2] - v[2];
                double d2 = dx * dx + dy * dy + dz * dz;
                if (d2 > r2) continue;
                count++;
                if (d2 < bd2 || (d2 == bd2 && p->i < best)) { bd2 = d2; best = p->i; }
            }
        }
done:
    if (best_d2) *best_d2 = bd2;
    return mode == 0 ? best : count;
}

static double arcsec_of_chord2(double d2)
{
    double c = sqrt(d2);
    if (c > 2) c = 2;
    return 2.0 * asin(c / 2) / ARCSEC_RAD;
}

long sp_zp_index_nearest(const sp_zp_index *idx, double ra, double dec, double radius_arcsec, long exclude,
                         double *sep_arcsec)
{
    if (sep_arcsec) *sep_arcsec = NAN;
    if (!idx || !isfinite(ra) || !isfinite(dec) || !(radius_arcsec >= 0)) return -1;
    double v[3], d2;
    unitvec(ra, dec, v);
    long i = query(idx, v, chord_of(radius_arcsec), exclude, 0, &d2);
    if (i >= 0 && sep_arcsec) *sep_arcsec = arcsec_of_chord2(d2);
    return i;
}

long sp_zp_index_count(const sp_zp_index *idx, double ra, double dec, double radius_arcsec, long exclude)
{
    if (!idx || !isfinite(ra) || !isfinite(dec) || !(radius_arcsec >= 0)) return 0;
    double v[3];
    unitvec(ra, dec, v);
    return query(idx, v, chord_of(radius_arcsec), exclude, 1, NULL);
}

double sp_zp_sep_arcsec(double ra1, double dec1, double ra2, double dec2)
{
    double d1 = dec1 * (M_PI / 180), d2 = dec2 * (M_PI / 180);
    double sdd = sin((d2 - d1) / 2), sda = sin((ra2 - ra1) * (M_PI / 180) / 2);
    double a = sdd * sdd + cos(d1) * cos(d2) * sda * sda;
    if (a > 1) a = 1;
    return 2.0 * asin(sqrt(a)) / ARCSEC_RAD;
}

int sp_zp_match(const sp_zp_index *cat, const double *cat_ra, const double *cat_dec, const sp_zp_index *ref,
                const double *ref_ra, const double *ref_dec, long nref, double radius_arcsec, long *cat_of_ref,
                double *sep_arcsec, long *nmatch)
{
    int status = SP_OK;
    SP_CHECK(cat && ref && cat_of_ref && nmatch && (nref == 0 || (ref_ra && ref_dec)) && cat_ra && cat_dec,
             SP_ERR_INTERNAL, "sp_zp_match: NULL argument");
    *nmatch = 0;
    for (long j = 0; j < nref; j++) {
        double sep = NAN;
        long i = sp_zp_index_nearest(cat, ref_ra[j], ref_dec[j], radius_arcsec, -1, &sep);
        /* mutual: j must also be the nearest reference star of source i */
        if (i >= 0 && sp_zp_index_nearest(ref, cat_ra[i], cat_dec[i], radius_arcsec, -1, NULL) != j) i = -1;
        cat_of_ref[j] = i;
        if (sep_arcsec) sep_arcsec[j] = i >= 0 ? sep : NAN;
        if (i >= 0) (*nmatch)++;
    }
cleanup:
    return status;
}
