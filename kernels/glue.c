/* The float steps between the matrix products: the residual add, the relu^2 gate, RMSNorm and
 * the per-token int8 quantisation of activations.
 *
 * Each loop is written once in plain C and compiled twice: for the baseline ISA, and on x86 as
 * an AVX2 clone picked at run time (the bodies are always_inline, so each wrapper below gets its
 * own vectorised copy). Both copies give the same bits: the only float sum, RMSNorm's sum of
 * squares, runs over a fixed set of lanes combined in a fixed tree; the clone's target has no
 * FMA and the build passes -ffp-contract=off, so every product is rounded before it is added;
 * everything else is elementwise or an exact max / integer sum.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

#define BODY static inline __attribute__((always_inline))

/* ---- the loops, once --------------------------------------------------------------------- */

/* A float's bits as an int32 and back. Without their sign bit, non-negative floats order like
 * their bits, and an int32 max vectorises where a float one cannot (a float compare-and-select
 * must keep NaN and signed-zero behaviour, which gcc only drops under -ffast-math). */
BODY int32_t float_bits(float v) {
    union { float f; int32_t i; } u = {v};
    return u.i;
}
BODY float bits_float(int32_t i) {
    union { int32_t i; float f; } u = {i};
    return u.f;
}

/* round half to even for |v| < 2^22 in plain float arithmetic (adding 1.5 * 2^23 leaves no
 * fraction bits), so the loop vectorises without SSE4.1 or a libm call per element */
BODY float round_even(float v) {
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

/* transformers' ActQuant in fp32: s = 127 / max(max|x|, 1e-5), q = clamp(round(x * s)) */
BODY void quantize_row(const float *x, int k, int kp, int8_t *q, float *scale, int32_t *xsum) {
    int32_t amax_bits = 0; /* max |x|, exact in any order (a NaN wins) */
    for (int i = 0; i < k; i++) {
        int32_t a = float_bits(x[i]) & 0x7fffffff;
        amax_bits = a > amax_bits ? a : amax_bits;
    }
    float amax = bits_float(amax_bits);
    float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    int32_t sum = 0;
    for (int i = 0; i < k; i++) {
        float v = round_even(x[i] * s); /* like torch.round; |x * s| <= 127 */
        int32_t qi = (int32_t)(v < -128.0f ? -128.0f : v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)qi;
        sum += qi;
    }
    memset(q + k, 0, (size_t)(kp - k));
    *scale = s;
    *xsum = sum;
}

BODY void quantize_rows(const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum) {
    for (int t = 0; t < m; t++) quantize_row(x + (size_t)t * k, k, kp, xq + (size_t)t * kp, scale + t, xsum + t);
}

/* torch: x * rsqrt(mean(x^2) + eps) * weight in fp32; the sum of squares is taken in double over
 * 16 lanes, folded in halves (lane l += lane l + w for w = 8, 4, 2, 1), then the tail */
BODY void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    double lane[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += (double)x[i + l] * x[i + l];
    for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; l++) lane[l] += lane[l + width];
    double ss = lane[0];
    for (; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

BODY void glue_rows(const bn_glue_job *j, int t0, int t1) {
    const int n = j->n;
    for (int t = t0; t < t1; t++) {
        float *x = j->x + (size_t)t * n, *h = j->h + (size_t)t * n;
        if (j->add) {
            const float *a = j->add + (size_t)t * n;
            for (int i = 0; i < n; i++) x[i] += a[i];
        }
        if (j->up) {
            const float *u = j->up + (size_t)t * n;
            for (int i = 0; i < n; i++) {
                int32_t b = float_bits(x[i]); /* relu: a set sign bit makes the word negative -> +0 */
                float v = bits_float(b > 0 ? b : 0);
                x[i] = v * v * u[i];
            }
        }
        rmsnorm(x, j->w, n, j->eps, h);
        if (j->xq) quantize_row(h, n, j->kp, j->xq + (size_t)t * j->kp, j->xscale + t, j->xsum + t);
    }
}

/* ---- the copies ----------------------------------------------------------------------------- */

static void quantize_rows_base(const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum) {
    quantize_rows(x, m, k, kp, xq, scale, xsum);
}
static void glue_rows_base(const bn_glue_job *j, int t0, int t1) { glue_rows(j, t0, t1); }

#if BN_X86
AVX2_NOFMA_TARGET static void quantize_rows_avx2(const float *x, int m, int k, int kp, int8_t *xq, float *scale,
                                                 int32_t *xsum) {
    quantize_rows(x, m, k, kp, xq, scale, xsum);
}
AVX2_NOFMA_TARGET static void glue_rows_avx2(const bn_glue_job *j, int t0, int t1) { glue_rows(j, t0, t1); }
#endif

bn_glue_fn bn_glue_kernel(int isa) {
    if (!bn_isa_available(isa)) return NULL;
#if BN_X86
    if (isa != BN_ISA_SCALAR) return glue_rows_avx2; /* every x86 SIMD path includes AVX2 */
#endif
    return glue_rows_base;
}

bn_quantize_fn bn_quantize_kernel(int isa) {
    if (!bn_isa_available(isa)) return NULL;
#if BN_X86
    if (isa != BN_ISA_SCALAR) return quantize_rows_avx2;
#endif
    return quantize_rows_base;
}

void bn_quantize_rows(const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum) {
    bn_quantize_kernel(bn_isa_best())(x, m, k, kp, xq, scale, xsum);
}
