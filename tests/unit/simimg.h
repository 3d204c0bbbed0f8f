/* simimg.h — synthetic cell images for the background / detection / ePSF tests
 * and tests/bench/bench_epsf.c: a seeded RNG, sky with a gradient, Gaussian
 * noise (sky + source Poisson term), and stars rendered from an oversampled
 * truth PSF with sp_psf_render. Header-only (static functions). */
#ifndef SP_TEST_SIMIMG_H
#define SP_TEST_SIMIMG_H

#include "surveyproc/sp_psf.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    uint64_t s;
    int have;
    double spare;
} sim_rng;

static inline void sim_seed(sim_rng *r, uint64_t seed)
{
    r->s = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    r->have = 0;
}

/* splitmix64 */
static inline uint64_t sim_next(sim_rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) */
static inline double sim_unif(sim_rng *r)
{
    return (double)(sim_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

static inline double sim_gauss(sim_rng *r)
{
    if (r->have) {
        r->have = 0;
        return r->spare;
    }
    double u, v, s;
    do {
        u = 2.0 * sim_unif(r) - 1.0;
        v = 2.0 * sim_unif(r) - 1.0;
        s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    double f = sqrt(-2.0 * log(s) / s);
    r->spare = v * f;
    r->have = 1;
    return u * f;
}

/* Sky B(x, y) = b0 + gx (x - nx/2) + gy (y - ny/2) + cxx ((x - nx/2)/nx)^2 (a bowl). */
typedef struct {
    double b0, gx, gy, cxx;
} sim_sky;

static inline double sim_sky_at(const sim_sky *s, int nx, int ny, double x, double y)
{
    double u = x - 0.5 * nx, v = y - 0.5 * ny, w = u / nx;
    return s->b0 + s->gx * u + s->gy * v + s->cxx * w * w;
}

/* Add a star of total flux `flux` at (x, y) rendered from `psf` into the noiseless
 * image (the truth stamp's full extent). scratch >= (size/os + 2)^2 doubles. */
static inline void sim_add_star(float *img, int nx, int ny, const sp_psf *psf, double x, double y, double flux,
                                double *scratch)
{
    int half = (psf->size - 1) / (2 * psf->oversamp) + 1;
    int x0 = (int)floor(x) - half, y0 = (int)floor(y) - half, w = 2 * half + 2;
    sp_psf_render(psf, x - x0, y - y0, w, w, scratch, NULL, NULL);
    for (int j = 0; j < w; j++) {
        int yy = y0 + j;
        if (yy < 0 || yy >= ny) continue;
        for (int i = 0; i < w; i++) {
            int xx = x0 + i;
            if (xx < 0 || xx >= nx) continue;
            img[(size_t)yy * nx + xx] += (float)(flux * scratch[j * w + i]);
        }
    }
}

/* Add the sky and Gaussian noise: var = sigma^2 + max(signal, 0) / gain (gain <= 0:
 * sky noise only). `img` holds the noiseless source image on entry. If ivar != NULL
 * it receives the inverse variance of the noise model. */
static inline void sim_finish(float *img, float *ivar, int nx, int ny, const sim_sky *sky, double sigma,
                              double gain, sim_rng *r)
{
    for (int y = 0; y < ny; y++)
        for (int x = 0; x < nx; x++) {
            size_t k = (size_t)y * nx + x;
            double s = img[k];
            double var = sigma * sigma + (gain > 0 && s > 0 ? s / gain : 0.0);
            img[k] = (float)(s + sim_sky_at(sky, nx, ny, x, y) + sqrt(var) * sim_gauss(r));
            if (ivar) ivar[k] = (float)(1.0 / var);
        }
}

#endif
