/* bench_ioprep.c — the read+prep path of a cell on its own, against read(2) of
 * the same files, for docs/performance.md: `make build/rel/bench/bench_ioprep
 * && build/rel/bench/bench_ioprep TILE_DIR [NCELL=4] [HALO=22] [REPS=5]`.
 * TILE_DIR holds image_list.txt. The frames are cut into NCELL x NCELL cells
 * with HALO pixels of halo (as the planner's grid), and for every cell and
 * frame the bench does what stage_io_prep does: open, sp_fits_read_subset,
 * sp_prep_frame, sp_prep_ivar (one thread). It prints CPU seconds
 * (CLOCK_PROCESS_CPUTIME_ID, best of REPS) and Mpix per CPU second of open+read
 * ("io") and prep, and of read(2) of the whole files into a 1 MiB buffer (the
 * `cat` baseline, page cache warm) measured in the same process. Pixels = ROI
 * pixels x frames, as the /timing "io" bytes / 4. */
#include "surveyproc/sp_error.h"
#include "surveyproc/sp_fits.h"
#include "surveyproc/sp_prep.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double cpu(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double wall(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s TILE_DIR [NCELL=4] [HALO=22] [REPS=5]\n",
            argv[0]);
    return 2;
  }
  int ncell = argc > 2 ? atoi(argv[2]) : 4,
      halo = argc > 3 ? atoi(argv[3]) : 22, reps = argc > 4 ? atoi(argv[4]) : 5;
  char path[4096], line[4096];
  snprintf(path, sizeof path, "%s/image_list.txt", argv[1]);
  FILE *fl = fopen(path, "r");
  if (!fl) {
    perror(path);
    return 1;
  }
  char *files[256];
  int nf = 0;
  while (nf < 256 && fgets(line, sizeof line, fl)) {
    char *h = strchr(line, '#');
    if (h)
      *h = '\0';
    char *s = line;
    while (*s == ' ' || *s == '\t')
      s++;
    size_t n = strcspn(s, " \t\r\n");
    if (!n)
      continue;
    s[n] = '\0';
    files[nf] = malloc(strlen(argv[1]) + n + 2);
    sprintf(files[nf], "%s/%s", argv[1], s);
    nf++;
  }
  fclose(fl);
  sp_fits *f = NULL;
  long nx = 0, ny = 0;
  if (sp_fits_open(files[0], &f)) {
    fprintf(stderr, "%s\n", sp_err_msg());
    return 1;
  }
  sp_fits_shape(f, &nx, &ny);
  sp_fits_close(&f);
  long cw = (nx + ncell - 1) / ncell, ch = (ny + ncell - 1) / ncell;
  size_t maxpix = (size_t)(cw + 2 * halo) * (size_t)(ch + 2 * halo);
  float *raw = malloc(maxpix * 4), *data = malloc(maxpix * 4),
        *ivar = malloc(maxpix * 4);
  uint8_t *mask = malloc(maxpix);
  char *buf = malloc(1 << 20);
  double best_open = 1e30, best_io = 1e30, best_prep = 1e30, best_cat = 1e30,
         best_cat_wall = 1e30, pix = 0, bytes = 0;
  volatile double sink = 0;
  for (int rep = 0; rep < reps; rep++) {
    double t_io = 0, t_prep = 0, t_open = 0;
    pix = 0;
    for (int cy = 0; cy < ncell; cy++)
      for (int cx = 0; cx < ncell; cx++)
        for (int k = 0; k < nf; k++) {
          long x0 = cx * cw - halo, y0 = cy * ch - halo;
          long x1 = (cx + 1) * cw + halo, y1 = (cy + 1) * ch + halo;
          if (x0 < 0)
            x0 = 0;
          if (y0 < 0)
            y0 = 0;
          if (x1 > nx)
            x1 = nx;
          if (y1 > ny)
            y1 = ny;
          size_t npix = (size_t)(x1 - x0) * (size_t)(y1 - y0);
          double t0 = cpu();
          int st = sp_fits_open(files[k], &f);
          t_open += cpu() - t0;
          if (!st)
            st = sp_fits_read_subset(f, x0, y0, x1 - x0, y1 - y0, raw);
          sp_fits_close(&f);
          if (st) {
            fprintf(stderr, "%s\n", sp_err_msg());
            return 1;
          }
          double t1 = cpu();
          sp_prep_params pp = {.scale = 1.1,
                               .skysig = 10,
                               .egain = 2,
                               .saturate = 60000,
                               .sat_level_frac = 0.9};
          double sky = 0;
          sp_prep_frame(raw, npix, &pp, data, mask, &sky, 1);
          sp_prep_ivar(data, mask, npix, &pp, sky, NULL, ivar, 1);
          double t2 = cpu();
          sink += ivar[npix / 2];
          t_io += t1 - t0;
          t_prep += t2 - t1;
          pix += (double)npix;
        }
    if (t_io < best_io)
      best_io = t_io;
    if (t_open < best_open)
      best_open = t_open;
    if (t_prep < best_prep)
      best_prep = t_prep;
    double w0 = wall(), c0 = cpu();
    bytes = 0;
    for (int k = 0; k < nf; k++) {
      int fd = open(files[k], O_RDONLY);
      ssize_t r;
      while ((r = read(fd, buf, 1 << 20)) > 0)
        bytes += (double)r;
      close(fd);
    }
    double c1 = cpu(), w1 = wall();
    if (c1 - c0 < best_cat)
      best_cat = c1 - c0;
    if (w1 - w0 < best_cat_wall)
      best_cat_wall = w1 - w0;
  }
  printf("%d frames %ld x %ld, %d x %d cells, halo %d: %.2f Mpix of ROIs per "
         "pass (best of %d)\n",
         nf, nx, ny, ncell, ncell, halo, pix / 1e6, reps);
  printf("io (open+read_subset)   %.4f cpu-s  %7.1f Mpix/cpu-s\n", best_io,
         pix / 1e6 / best_io);
  printf("  of which open         %.4f cpu-s (%d opens per pass)\n", best_open,
         ncell * ncell * nf);
  printf("prep (frame+ivar)       %.4f cpu-s  %7.1f Mpix/cpu-s\n", best_prep,
         pix / 1e6 / best_prep);
  printf("read+prep               %.4f cpu-s  %7.1f Mpix/cpu-s\n",
         best_io + best_prep, pix / 1e6 / (best_io + best_prep));
  printf("read(2) of the files    %.4f cpu-s  %7.1f Mpix/cpu-s (%.1f "
         "Mpix/wall-s)\n",
         best_cat, bytes / 4e6 / best_cat, bytes / 4e6 / best_cat_wall);
  printf("read+prep / read(2): %.3f\n",
         (pix / (best_io + best_prep)) / (bytes / 4 / best_cat));
  return sink == 12345.678 ? 1 : 0;
}
