/* bench_framestats.c — the planner's per-frame statistics (src/parallel/plan.c:
 * 32 sampled rows, median and 1.4826 MAD) on an NX-wide frame, for
 * docs/performance.md: `make build/rel/bench/bench_framestats &&
 * build/rel/bench/bench_framestats 8192 [DIR=/tmp]`. Writes an NX x 64 float
 * frame to DIR (the cost depends on the width only: 32 rows are read whatever
 * the height) and times open + 32 row reads + the two order statistics by qsort
 * (the planner before) and by selection (now), best of 5, CPU seconds. Both
 * must print the same median and sigma. */
#include "surveyproc/sp_fits.h"
#include <fitsio.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double cpu(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
static int cmpd(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}
static double select_kth(double *a, size_t n, size_t k) {
  size_t lo = 0, hi = n - 1;
  while (hi > lo) {
    size_t mid = lo + (hi - lo) / 2;
    if (a[mid] < a[lo]) {
      double t = a[mid];
      a[mid] = a[lo];
      a[lo] = t;
    }
    if (a[hi] < a[lo]) {
      double t = a[hi];
      a[hi] = a[lo];
      a[lo] = t;
    }
    if (a[hi] < a[mid]) {
      double t = a[hi];
      a[hi] = a[mid];
      a[mid] = t;
    }
    double piv = a[mid];
    size_t i = lo, j = hi;
    for (;;) {
      while (a[i] < piv)
        i++;
      while (piv < a[j])
        j--;
      if (i >= j)
        break;
      double t = a[i];
      a[i] = a[j];
      a[j] = t;
      i++;
      j--;
    }
    if (k <= j)
      hi = j;
    else
      lo = j + 1;
  }
  return a[k];
}
int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s NX [DIR]\n", argv[0]);
    return 2;
  }
  long nx = atol(argv[1]), ny = 64;
  char path[4096];
  snprintf(path, sizeof path, "%s/bench_framestats.fits",
           argc > 2 ? argv[2] : "/tmp");
  int st = 0;
  fitsfile *fp;
  long na[2] = {nx, ny};
  remove(path);
  fits_create_diskfile(&fp, path, &st);
  fits_create_img(fp, FLOAT_IMG, 2, na, &st);
  float *img = malloc(nx * ny * 4);
  unsigned s = 1;
  for (long i = 0; i < nx * ny; i++) {
    s = s * 1103515245u + 12345u;
    img[i] = 100 + (float)((s >> 8) / 16777216.0 - 0.5) * 20;
  }
  fits_write_img(fp, TFLOAT, 1, nx * ny, img, &st);
  fits_close_file(fp, &st);
  double *vals = malloc(sizeof(double) * nx * 32);
  float *row = malloc(nx * 4);
  for (int mode = 0; mode < 2; mode++) {
    double best = 1e9, med = 0, sig = 0;
    for (int rep = 0; rep < 5; rep++) {
      double t0 = cpu();
      sp_fits *f;
      sp_fits_open(path, &f);
      long nv = 0;
      for (int k = 0; k < 32; k++) {
        sp_fits_read_subset(f, 0, (long)((k + 0.5) * ny / 32), nx, 1, row);
        for (long x = 0; x < nx; x++)
          if (isfinite(row[x]))
            vals[nv++] = row[x];
      }
      sp_fits_close(&f);
      if (mode == 0) {
        qsort(vals, nv, 8, cmpd);
        med = vals[nv / 2];
        for (long i = 0; i < nv; i++)
          vals[i] = fabs(vals[i] - med);
        qsort(vals, nv, 8, cmpd);
        sig = 1.4826 * vals[nv / 2];
      } else {
        med = select_kth(vals, nv, nv / 2);
        for (long i = 0; i < nv; i++)
          vals[i] = fabs(vals[i] - med);
        sig = 1.4826 * select_kth(vals, nv, nv / 2);
      }
      double t = cpu() - t0;
      if (t < best)
        best = t;
    }
    printf(
        "%ld-wide frame, %s: %.2f ms CPU per frame (median %.6f sigma %.6f)\n",
        nx, mode ? "select" : "qsort", best * 1e3, med, sig);
  }
  remove(path);
  return 0;
}
