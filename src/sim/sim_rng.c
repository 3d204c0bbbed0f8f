/* sim_rng.c — counter-based random numbers for the simulator.
 *
 * Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers:
 * as easy as 1, 2, 3") maps a 128-bit counter and a 64-bit key to 128 random
 * bits. Keying by the seed and counting by (domain, id, draw) gives every
 * source, frame and pixel its own stream, so results never depend on the order
 * in which threads or ranks consume numbers. Checked against the Random123
 * known-answer vectors in tests/unit/test_sim.c. */
#include "sim_private.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>

void sp_sim_philox(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1, n3 = (uint32_t)p0;
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
        k0 += 0x9E3779B9u; /* Weyl key schedule */
        k1 += 0xBB67AE85u;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* Poisson deviates. Below a mean of 10, inversion by sequential search (a few
 * steps); above, the transformed rejection with squeeze of Hormann (1993,
 * "The transformed rejection method for generating Poisson random variables"),
 * exact and O(1): about 1.1 pairs of uniforms per deviate. lgamma_r, not
 * lgamma, because lgamma writes the global signgam (a data race in threads). */
double sim_poisson(double lam, sim_rng *r)
{
    if (!(lam > 0)) return 0.0;
    if (lam < 10.0) {
        double u = sim_rng_uniform(r), p = exp(-lam), F = p;
        long k = 0;
        while (u > F && k < 200) {
            k++;
            p *= lam / (double)k;
            F += p;
        }
        return (double)k;
    }
    double slam = sqrt(lam), loglam = 0.0; /* log(lam) only on the rare slow path */
    double b = 0.931 + 2.53 * slam, a = -0.059 + 0.02483 * b;
    double invalpha = 1.1239 + 1.1328 / (b - 3.4), vr = 0.9277 - 3.6224 / (b - 2.0);
    for (;;) {
        double U = sim_rng_uniform(r) - 0.5, V = sim_rng_uniform(r);
        double us = 0.5 - fabs(U);
        double k = floor((2.0 * a / us + b) * U + lam + 0.43);
        if (us >= 0.07 && V <= vr) return k;
        if (k < 0 || (us < 0.013 && V > us)) continue;
        int sg;
        if (loglam == 0.0) loglam = log(lam);
        if (log(V) + log(invalpha) - log(a / (us * us) + b) <= -lam + k * loglam - lgamma_r(k + 1.0, &sg)) return k;
    }
}

/* Normal deviates by the ziggurat of Marsaglia & Tsang (2000, J. Stat. Softw.
 * 5(8)), 128 layers: one table look-up and multiply for 98.8% of draws,
 * against a logarithm, a square root and a cosine for Box-Muller — the
 * per-pixel read noise of a 2-gigapixel tile is worth it. The layer index
 * comes from its own word, not the low bits of the value (the correlation
 * Doornik 2005 pointed out in the original). */
static double zig_w[128], zig_f[128];
static uint32_t zig_k[128];
static pthread_once_t zig_once = PTHREAD_ONCE_INIT;
#define ZIG_R 3.442619855899

static void zig_init(void)
{
    const double m1 = 2147483648.0, vn = 9.91256303526217e-3;
    double dn = ZIG_R, tn = dn, q = vn / exp(-0.5 * dn * dn);
    zig_k[0] = (uint32_t)((dn / q) * m1);
    zig_k[1] = 0;
    zig_w[0] = q / m1;
    zig_w[127] = dn / m1;
    zig_f[0] = 1.0;
    zig_f[127] = exp(-0.5 * dn * dn);
    for (int i = 126; i >= 1; i--) {
        dn = sqrt(-2.0 * log(vn / dn + exp(-0.5 * dn * dn)));
        zig_k[i + 1] = (uint32_t)((dn / tn) * m1);
        tn = dn;
        zig_f[i] = exp(-0.5 * dn * dn);
        zig_w[i] = dn / m1;
    }
}

void sim_zig_init(void) { pthread_once(&zig_once, zig_init); }

double sim_rng_gauss(sim_rng *r)
{
    for (;;) {
        int iz = (int)(sim_rng_u32(r) & 127u);
        int32_t hz = (int32_t)sim_rng_u32(r);
        uint32_t ahz = hz < 0 ? (uint32_t)(-(int64_t)hz) : (uint32_t)hz;
        double x = hz * zig_w[iz];
        if (ahz < zig_k[iz]) return x;
        if (iz == 0) { /* the tail beyond R, by Marsaglia's exponential method */
            double xx, yy;
            do {
                xx = -log(sim_rng_uniform(r)) / ZIG_R;
                yy = -log(sim_rng_uniform(r));
            } while (yy + yy < xx * xx);
            return hz > 0 ? ZIG_R + xx : -ZIG_R - xx;
        }
        if (zig_f[iz] + sim_rng_uniform(r) * (zig_f[iz - 1] - zig_f[iz]) < exp(-0.5 * x * x)) return x;
    }
}
