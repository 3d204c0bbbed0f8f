/* sim_private.h — internals shared by the simulator's files (not installed).
 *
 * Random numbers: a sim_rng is one Philox4x32-10 stream identified by
 * (seed, domain, index); draws walk the 4th counter word. Streams of
 * different (domain, index) never overlap, so a source's or a pixel's numbers
 * do not depend on who drew before it — the basis of thread-count independence.
 */
#ifndef SP_SIM_PRIVATE_H
#define SP_SIM_PRIVATE_H

#include "surveyproc/sp_sim.h"

#include <math.h>
#include <stdint.h>

/* RNG domains (third counter word, high byte); the low 24 bits carry a sub-id
 * such as a frame or band number. */
enum {
    SIM_D_STAR = 1,
    SIM_D_GAL = 2,
    SIM_D_CLUSTER = 3,
    SIM_D_PSF = 4,
    SIM_D_FRAME = 5,
    SIM_D_BADCOL = 6,
    SIM_D_NANPIX = 7,
    SIM_D_NOISE = 8,
    SIM_D_CATALOG = 9,
    SIM_D_SED = 10,
    SIM_D_WCS = 11,
    SIM_D_REF = 12
};

typedef struct {
    uint32_t key[2];
    uint32_t ctr[4];
    uint32_t buf[4];
    int used;
} sim_rng;

static inline void sim_rng_init(sim_rng *r, uint64_t seed, uint32_t domain, uint32_t sub, uint64_t index)
{
    r->key[0] = (uint32_t)seed;
    r->key[1] = (uint32_t)(seed >> 32);
    r->ctr[0] = (uint32_t)index;
    r->ctr[1] = (uint32_t)(index >> 32);
    r->ctr[2] = (domain << 24) | (sub & 0xFFFFFFu);
    r->ctr[3] = 0;
    r->used = 4;
}

static inline uint32_t sim_rng_u32(sim_rng *r)
{
    if (r->used == 4) {
        sp_sim_philox(r->ctr, r->key, r->buf);
        r->ctr[3]++;
        r->used = 0;
    }
    return r->buf[r->used++];
}

/* Uniform in the open interval (0, 1) with 32-bit resolution. */
static inline double sim_rng_uniform(sim_rng *r) { return ((double)sim_rng_u32(r) + 0.5) * (1.0 / 4294967296.0); }

/* Standard normal (Box-Muller, one value per two uniforms). */
static inline double sim_rng_normal(sim_rng *r)
{
    double u1 = sim_rng_uniform(r), u2 = sim_rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

/* Standard normal by the ziggurat (sim_rng.c): the per-pixel noise's
 * generator. Call sim_zig_init() once (thread-safe) before using it. */
void sim_zig_init(void);
double sim_rng_gauss(sim_rng *r);

/* Poisson deviate with mean lam >= 0 (inversion below 10, Hormann's PTRS above). */
double sim_poisson(double lam, sim_rng *r);

/* Fixed-point quantum of the light accumulators (scaled flux units). */
#define SIM_FIX_SCALE 16777216.0 /* 2^24 */

/* sim_render.c: the stamp of source i in band b (image pixels), unit flux
 * scaled by nothing; centred on pixel (ix, iy) = nearest pixel; half-size h. */
long sim_source_halfsize(const sp_sim *s, const sp_sim_source *src);
int sim_render_source(const sp_sim *s, const sp_sim_source *src, int band, long *ix, long *iy, long *h,
                      double *stamp, sp_sim_ws *ws);

/* Moffat alpha for a FWHM: FWHM = 2 alpha sqrt(2^(1/beta) - 1). */
double sim_moffat_alpha(double fwhm, double beta);

/* Galaxy rendering with the PSF split into a fine-grid inner part and a
 * pixel-resolution outer part (allow_split 1, what sp_sim_render_galaxy does)
 * or all on the fine grid (0, the reference the split is tested against). */
int sim_render_galaxy_split(const sp_sim_psf *p, sp_sim_type type, double re, double q, double theta, double dx,
                            double dy, int size, int os, double *out, sp_sim_ws *ws, int allow_split);
#ifndef SIM_SPLIT_MIN
#define SIM_SPLIT_MIN 6.0   /* pixels: the split starts at max(this, SIM_SPLIT_FWHM x FWHM) */
#define SIM_SPLIT_FWHM 2.0
#define SIM_SPLIT_WIDTH 3.0 /* pixels over which the inner part fades to 0 */
#endif

/* sim_model.c */
double sim_sky_rel(const sp_sim_frame *f, double u, double v);   /* sky(x,y) / sky_adu */
double sim_resid(const sp_sim_frame *f, double u, double v);     /* residual background (ADU) */
void sim_uv(const sp_sim *s, double x, double y, double *u, double *v); /* tile coords in [-1, 1] */

/* sim_config.c: a malloc'd "dir/name" path. */
char *sim_join(const char *dir, const char *name);

#endif
