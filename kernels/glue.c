/* The float steps between the matrix products: the residual add, the relu^2 or SiLU gate,
 * RMSNorm and the per-token int8 quantisation of activations.
 *
 * Each loop is written once in plain C and compiled twice: for the baseline ISA, and on x86 as
 * an AVX2 clone picked at run time (the bodies are always_inline, so each wrapper below gets its
 * own vectorised copy). Both copies give the same bits: the only float sum, RMSNorm's sum of
 * squares, runs over a fixed set of lanes combined in a fixed tree; the clone's target has no
 * FMA and the build passes -ffp-contract=off, so every product is rounded before it is added;
 * everything else is elementwise or an exact max / integer sum. SiLU's exponential is our own
 * polynomial in the same plain float operations (a libm call would neither vectorise nor be
 * guaranteed to match a vector libm bit for bit).
 */
#include <math.h>
#include <string.h>

#include "internal.h"

#define BODY static inline __attribute__((always_inline))

/* ---- the loops, once --------------------------------------------------------------------- */

/* torch's F.silu in fp32, x / (1 + exp(-x)), with exp_poly for the exponential */
BODY float silu(float x) { return x / (1.0f + exp_poly(-x)); }

/* Element i of the row being quantised: x itself, or the normed w[i] * (x[i] * r) recomputed
 * where it is needed (the same float operations, so the same value as when it is stored). */
BODY float row_value(const float *x, const float *w, float r, int i) { return w ? w[i] * (x[i] * r) : x[i]; }

/* transformers' ActQuant in fp32 on the row v[i] = row_value(x, w, r, i):
 * s = 127 / max(max|v|, 1e-5), q = clamp(round(v * s)) */
BODY void quantize_row(const float *x, const float *w, float r, int k, int kp, int8_t *q, float *scale,
                       int32_t *xsum) {
    int32_t amax_bits = 0; /* max |v|, exact in any order (a NaN wins) */
    for (int i = 0; i < k; i++) {
        int32_t a = float_bits(row_value(x, w, r, i)) & 0x7fffffff;
        amax_bits = a > amax_bits ? a : amax_bits;
    }
    float amax = bits_float(amax_bits);
    float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    int32_t sum = 0;
    for (int i = 0; i < k; i++) {
        float v = round_even(row_value(x, w, r, i) * s); /* like torch.round; |v * s| <= 127 */
        int32_t qi = (int32_t)(v < -128.0f ? -128.0f : v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)qi;
        sum += qi;
    }
    memset(q + k, 0, (size_t)(kp - k));
    *scale = s;
    *xsum = sum;
}

BODY void quantize_rows(const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum) {
    for (int t = 0; t < m; t++)
        quantize_row(x + (size_t)t * k, NULL, 0.0f, k, kp, xq + (size_t)t * kp, scale + t, xsum + t);
}

/* torch's RMSNorm factor in fp32, 1 / sqrt(mean(x^2) + eps). The sum of squares is taken in
 * double over 16 lanes, folded in halves (lane l += lane l + w for w = 8, 4, 2, 1), then the
 * tail is added. */
BODY float inv_rms(const float *x, int n, float eps) {
    double lane[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) lane[l] += (double)x[i + l] * x[i + l];
    for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; l++) lane[l] += lane[l + width];
    double ss = lane[0];
    for (; i < n; i++) ss += (double)x[i] * x[i];
    return 1.0f / sqrtf((float)(ss / n) + eps);
}

/* The normed row h = w * (x * r) goes to h, or is quantised straight from x (computed twice,
 * for the absmax and the rounding, and never stored: the write and reread cost more). */
BODY void glue_rows(const bn_glue_job *j, int t0, int t1) {
    const int n = j->n;
    for (int t = t0; t < t1; t++) {
        float *x = j->x + (size_t)t * n;
        const size_t off = (size_t)t * n;
        if (j->add)
            for (int i = 0; i < n; i++) x[i] += j->add[off + i];
        if (j->up && j->act == BN_ACT_SILU)
            for (int i = 0; i < n; i++) x[i] = silu(x[i]) * j->up[off + i];
        else if (j->up)
            for (int i = 0; i < n; i++) {
                int32_t b = float_bits(x[i]); /* relu: a set sign bit makes the word negative -> +0 */
                float v = bits_float(b > 0 ? b : 0);
                x[i] = v * v * j->up[off + i];
            }
        float r = j->w ? inv_rms(x, n, j->eps) : 1.0f; /* no norm weights: no norm (row_value) */
        if (j->xq)
            quantize_row(x, j->w, r, n, j->kp, j->xq + (size_t)t * j->kp, j->xscale + t, j->xsum + t);
        else
            for (int i = 0; i < n; i++) j->h[off + i] = row_value(x, j->w, r, i);
    }
}

/* ---- the copies ----------------------------------------------------------------------------- */

void bn_quantize_rows_scalar(const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum) {
    quantize_rows(x, m, k, kp, xq, scale, xsum);
}
void bn_glue_rows_scalar(const bn_glue_job *j, int t0, int t1) { glue_rows(j, t0, t1); }

#if BN_X86
AVX2_NOFMA_TARGET void bn_quantize_rows_avx2(const float *x, int m, int k, int kp, int8_t *xq, float *scale,
                                             int32_t *xsum) {
    quantize_rows(x, m, k, kp, xq, scale, xsum);
}
AVX2_NOFMA_TARGET void bn_glue_rows_avx2(const bn_glue_job *j, int t0, int t1) { glue_rows(j, t0, t1); }
#endif

int bn_quantize_rows(int isa, const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum) {
    const bn_kernels *kern = bn_kernels_for(isa);
    if (!kern) return -1;
    kern->quantize(x, m, k, kp, xq, scale, xsum);
    return 0;
}
