/* Float row-dot kernels for the output head (and embedding rows): f16 rows, or int8 rows with one
 * scale per row, against fp32 hidden vectors. On the 2B4T shape the head is 128256 x 2560, more
 * than half of the bytes streamed per decoded token, so the SIMD versions keep several rows in
 * flight (independent FMA chains) and convert each weight vector once for up to four tokens. */
#include "internal.h"

#if BN_X86
#include <immintrin.h>
#endif
#if BN_ARM64
#include <arm_neon.h>
#endif

float bn_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: renormalise */
        int e = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            e--;
        }
        bits = sign | ((uint32_t)e << 23) | ((man & 0x3ff) << 13);
    }
    union {
        uint32_t u;
        float f;
    } v = {bits};
    return v.f;
}

static inline float row_value(const bn_head_job *j, int r, int k) {
    if (j->type == BN_EMB_F16) return bn_f16_to_f32(((const uint16_t *)j->w)[(size_t)r * j->k + k]);
    return (float)((const int8_t *)j->w)[(size_t)r * j->k + k];
}

static inline float row_scale(const bn_head_job *j, int r) { return j->type == BN_EMB_I8 ? j->wscale[r] : 1.0f; }

static void head_rows_scalar(const bn_head_job *j, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < j->m; t++) {
            const float *h = j->h + (size_t)t * j->k;
            float s = 0.0f;
            for (int k = 0; k < j->k; k++) s += row_value(j, r, k) * h[k];
            j->y[(size_t)t * j->y_stride + r] = s * row_scale(j, r);
        }
}

#if BN_X86
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_TARGET static inline __attribute__((always_inline)) __m256 load8(const bn_head_job *j, int r, int k,
                                                                       const int I8) {
    if (!I8)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)j->w + (size_t)r * j->k + k)));
    __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)j->w + (size_t)r * j->k + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}

/* RT rows x TT tokens, RT*TT independent accumulators; I8 picks the row type at compile time */
AVX2_TARGET static inline __attribute__((always_inline)) void head_tile_avx2(const bn_head_job *j, int r, int t,
                                                                           const int RT, const int TT,
                                                                           const int I8) {
    __m256 acc[4][4];
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < TT; b++) acc[a][b] = _mm256_setzero_ps();
    const int k8 = j->k & ~7;
    for (int k = 0; k < k8; k += 8) {
        __m256 w[4];
        for (int a = 0; a < RT; a++) w[a] = load8(j, r + a, k, I8);
        for (int b = 0; b < TT; b++) {
            __m256 h = _mm256_loadu_ps(j->h + (size_t)(t + b) * j->k + k);
            for (int a = 0; a < RT; a++) acc[a][b] = _mm256_fmadd_ps(w[a], h, acc[a][b]);
        }
    }
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < TT; b++) {
            const float *h = j->h + (size_t)(t + b) * j->k;
            float s = hsum_ps(acc[a][b]);
            for (int k = k8; k < j->k; k++) s += row_value(j, r + a, k) * h[k];
            j->y[(size_t)(t + b) * j->y_stride + r + a] = s * row_scale(j, r + a);
        }
}

AVX2_TARGET static inline __attribute__((always_inline)) void head_rows_avx2_typed(const bn_head_job *j, int r0,
                                                                                 int r1, const int I8) {
    int t = 0;
    for (; t + 4 <= j->m; t += 4) {
        int r = r0;
        for (; r + 2 <= r1; r += 2) head_tile_avx2(j, r, t, 2, 4, I8);
        for (; r < r1; r++) head_tile_avx2(j, r, t, 1, 4, I8);
    }
    for (; t < j->m; t++) {
        int r = r0;
        for (; r + 4 <= r1; r += 4) head_tile_avx2(j, r, t, 4, 1, I8);
        for (; r < r1; r++) head_tile_avx2(j, r, t, 1, 1, I8);
    }
}

AVX2_TARGET static void head_rows_avx2(const bn_head_job *j, int r0, int r1) {
    if (j->type == BN_EMB_I8)
        head_rows_avx2_typed(j, r0, r1, 1);
    else
        head_rows_avx2_typed(j, r0, r1, 0);
}
#endif

#if BN_ARM64
static inline float32x4_t load4(const bn_head_job *j, int r, int k) {
    if (j->type == BN_EMB_F16)
        return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)j->w + (size_t)r * j->k + k)));
    const int8_t *p = (const int8_t *)j->w + (size_t)r * j->k + k;
    int8x8_t q = vcreate_s8((uint64_t)(uint8_t)p[0] | (uint64_t)(uint8_t)p[1] << 8 | (uint64_t)(uint8_t)p[2] << 16 |
                            (uint64_t)(uint8_t)p[3] << 24);
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(q))));
}

static void head_rows_neon(const bn_head_job *j, int r0, int r1) {
    const int k4 = j->k & ~3;
    for (int t = 0; t < j->m; t++) {
        const float *h = j->h + (size_t)t * j->k;
        for (int r = r0; r < r1; r++) {
            float32x4_t acc = vdupq_n_f32(0.0f);
            for (int k = 0; k < k4; k += 4) acc = vfmaq_f32(acc, load4(j, r, k), vld1q_f32(h + k));
            float s = vaddvq_f32(acc);
            for (int k = k4; k < j->k; k++) s += row_value(j, r, k) * h[k];
            j->y[(size_t)t * j->y_stride + r] = s * row_scale(j, r);
        }
    }
}
#endif

bn_head_rows_fn bn_head_kernel(int isa) {
    if (!bn_isa_available(isa)) return NULL;
    switch (isa) {
#if BN_X86
    case BN_ISA_AVX2:
    case BN_ISA_AVX512:
    case BN_ISA_AVX512VNNI: return head_rows_avx2; /* memory-bound: AVX2 already saturates it */
#endif
#if BN_ARM64
    case BN_ISA_NEON:
    case BN_ISA_NEONDOT: return head_rows_neon;
#endif
    default: return head_rows_scalar;
    }
}
