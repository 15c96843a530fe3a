/* Row-dot kernels of the output head: f16 rows against fp32 hidden vectors, or int8 rows (one
 * scale per row) against the hidden vectors quantised to int8 per token, an exact integer dot.
 * On the 2B4T shape the head is 128256 x 2560, more than half of the bytes streamed per decoded
 * token, so the SIMD versions keep several rows in flight, prefetch ahead of the loads, and load
 * each weight vector once for several tokens; with many tokens (prefill, scoring) a block of rows
 * stays in cache while all of them pass. The int8 path is integer so that it stays
 * memory-bound: converting int8 to float costs more instructions than the bytes take to arrive. */
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

/* int8 rows: the exact integer dot, rescaled by one float expression shared by every ISA */
static inline float i8_logit(const bn_head_job *j, int t, int r, int32_t acc) {
    return (float)acc / j->hscale[t] * j->wscale[r];
}

static void head_rows_scalar(const bn_head_job *j, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < j->m; t++) {
            float *y = j->y + (size_t)t * j->y_stride + r;
            if (j->type == BN_EMB_F16) {
                const uint16_t *w = (const uint16_t *)j->w + (size_t)r * j->k;
                const float *h = j->h + (size_t)t * j->k;
                float s = 0.0f;
                for (int k = 0; k < j->k; k++) s += bn_f16_to_f32(w[k]) * h[k];
                *y = s;
            } else {
                const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k, *h = j->hq + (size_t)t * j->k;
                int32_t acc = 0;
                for (int k = 0; k < j->k; k++) acc += w[k] * h[k];
                *y = i8_logit(j, t, r, acc);
            }
        }
}

#if BN_X86
#define PREFETCH_BYTES 1024 /* how far ahead of the loads a row is prefetched */

AVX2_TARGET static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* f16 rows: RT rows x TT tokens, RT*TT independent FMA chains; each weight vector is converted
 * once for TT tokens */
AVX2_TARGET static inline __attribute__((always_inline)) void f16_tile_avx2(const bn_head_job *j, int r, int t,
                                                                          const int RT, const int TT) {
    const uint16_t *w = (const uint16_t *)j->w + (size_t)r * j->k;
    __m256 acc[4][4];
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < TT; b++) acc[a][b] = _mm256_setzero_ps();
    const int k8 = j->k & ~7;
    for (int k = 0; k < k8; k += 8) {
        __m256 wv[4];
        for (int a = 0; a < RT; a++) {
            if (!(k & 31)) _mm_prefetch((const char *)(w + (size_t)a * j->k + k) + PREFETCH_BYTES, _MM_HINT_T0);
            wv[a] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + (size_t)a * j->k + k)));
        }
        for (int b = 0; b < TT; b++) {
            __m256 h = _mm256_loadu_ps(j->h + (size_t)(t + b) * j->k + k);
            for (int a = 0; a < RT; a++) acc[a][b] = _mm256_fmadd_ps(wv[a], h, acc[a][b]);
        }
    }
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < TT; b++) {
            const float *h = j->h + (size_t)(t + b) * j->k;
            float s = hsum_ps(acc[a][b]);
            for (int k = k8; k < j->k; k++) s += bn_f16_to_f32(w[(size_t)a * j->k + k]) * h[k];
            j->y[(size_t)(t + b) * j->y_stride + r + a] = s;
        }
}

/* int8 rows x int8 hidden: vpmaddubsw takes |w| as the unsigned operand and h with w's sign
 * moved onto it (vpsignb), so |w| * (sign(w) h) = w h; a pair sum is at most 2 * 128 * 127,
 * inside int16, and widens to int32 at once (vpmaddwd by ones). */
AVX2_TARGET static inline __attribute__((always_inline)) void i8_tile_avx2(const bn_head_job *j, int r, int t,
                                                                         const int RT, const int TT) {
    const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4][4];
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < TT; b++) acc[a][b] = _mm256_setzero_si256();
    const int k32 = j->k & ~31;
    for (int k = 0; k < k32; k += 32) {
        __m256i wv[4], wabs[4];
        for (int a = 0; a < RT; a++) {
            _mm_prefetch((const char *)(w + (size_t)a * j->k + k) + PREFETCH_BYTES, _MM_HINT_T0);
            wv[a] = _mm256_loadu_si256((const __m256i *)(w + (size_t)a * j->k + k));
            wabs[a] = _mm256_abs_epi8(wv[a]);
        }
        for (int b = 0; b < TT; b++) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(j->hq + (size_t)(t + b) * j->k + k));
            for (int a = 0; a < RT; a++) {
                __m256i p = _mm256_maddubs_epi16(wabs[a], _mm256_sign_epi8(h, wv[a]));
                acc[a][b] = _mm256_add_epi32(acc[a][b], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < TT; b++) {
            const int8_t *h = j->hq + (size_t)(t + b) * j->k, *wr = w + (size_t)a * j->k;
            int32_t s = bn_hsum_epi32_avx2(acc[a][b]);
            for (int k = k32; k < j->k; k++) s += wr[k] * h[k];
            j->y[(size_t)(t + b) * j->y_stride + r + a] = i8_logit(j, t + b, r + a, s);
        }
}

/* One row against one token, the decode case: rows go one after another, so the head streams as
 * one sequential read (measured faster than several rows in flight, which split it into strided
 * streams); four accumulators over k hide the FMA latency. */
AVX2_TARGET static inline float f16_row_avx2(const bn_head_job *j, int r, int t) {
    const uint16_t *w = (const uint16_t *)j->w + (size_t)r * j->k;
    const float *h = j->h + (size_t)t * j->k;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int k32 = j->k & ~31;
    int k = 0;
    for (; k < k32; k += 32) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
        for (int u = 0; u < 4; u++)
            acc[u] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 8 * u))),
                                     _mm256_loadu_ps(h + k + 8 * u), acc[u]);
    }
    for (; k + 8 <= j->k; k += 8)
        acc[0] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k))), _mm256_loadu_ps(h + k),
                                 acc[0]);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; k < j->k; k++) s += bn_f16_to_f32(w[k]) * h[k];
    return s;
}

AVX2_TARGET static inline int32_t i8_row_avx2(const bn_head_job *j, int r, int t) {
    const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k, *h = j->hq + (size_t)t * j->k;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    const int k32 = j->k & ~31;
    int k = 0;
    for (; k < k32; k += 32) {
        if (!(k & 63)) _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
        __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv),
                                         _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(h + k)), wv));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    int32_t s = bn_hsum_epi32_avx2(acc);
    for (; k < j->k; k++) s += w[k] * h[k];
    return s;
}

/* Tiles of RT rows x TT tokens over blocks of rows small enough to stay in L2 while every tile of
 * tokens passes over them: the head streams from memory once per call, not once per TT tokens.
 * The remaining tokens go one row at a time. */
#define HEAD_BLOCK_BYTES (128 * 1024)
#define HEAD_ROWS_AVX2(NAME, TILE, RT, TT, ROW, STORE, ROW_BYTES)                                     \
    AVX2_TARGET static void NAME(const bn_head_job *j, int r0, int r1) {                               \
        const int mt = j->m / (TT) * (TT), block = HEAD_BLOCK_BYTES / (ROW_BYTES) / (RT) * (RT) + (RT); \
        for (int b0 = r0; b0 < r1; b0 += block) {                                                     \
            const int b1 = r1 - b0 < block ? r1 : b0 + block;                                          \
            for (int t = 0; t < mt; t += (TT)) {                                                      \
                int r = b0;                                                                           \
                for (; r + (RT) <= b1; r += (RT)) TILE(j, r, t, RT, TT);                              \
                for (; r < b1; r++) TILE(j, r, t, 1, TT);                                             \
            }                                                                                         \
        }                                                                                             \
        for (int t = mt; t < j->m; t++)                                                               \
            for (int r = r0; r < r1; r++) j->y[(size_t)t * j->y_stride + r] = STORE(ROW(j, r, t));    \
    }

#define AS_IS(v) (v)
#define I8_LOGIT(v) i8_logit(j, t, r, v)
/* measured best on Zen 3: f16 rows pay a conversion per row, int8 rows one vpsignb per token */
HEAD_ROWS_AVX2(head_rows_f16_avx2, f16_tile_avx2, 4, 2, f16_row_avx2, AS_IS, 2 * j->k)
HEAD_ROWS_AVX2(head_rows_i8_avx2, i8_tile_avx2, 2, 4, i8_row_avx2, I8_LOGIT, j->k)

AVX2_TARGET static void head_rows_avx2(const bn_head_job *j, int r0, int r1) {
    if (j->type == BN_EMB_I8)
        head_rows_i8_avx2(j, r0, r1);
    else
        head_rows_f16_avx2(j, r0, r1);
}
#endif

#if BN_ARM64
static void head_rows_neon(const bn_head_job *j, int r0, int r1) {
    for (int t = 0; t < j->m; t++)
        for (int r = r0; r < r1; r++) {
            float *y = j->y + (size_t)t * j->y_stride + r;
            if (j->type == BN_EMB_F16) {
                const uint16_t *w = (const uint16_t *)j->w + (size_t)r * j->k;
                const float *h = j->h + (size_t)t * j->k;
                const int k4 = j->k & ~3;
                float32x4_t acc = vdupq_n_f32(0.0f);
                for (int k = 0; k < k4; k += 4)
                    acc = vfmaq_f32(acc, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w + k))), vld1q_f32(h + k));
                float s = vaddvq_f32(acc);
                for (int k = k4; k < j->k; k++) s += bn_f16_to_f32(w[k]) * h[k];
                *y = s;
            } else {
                const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k, *h = j->hq + (size_t)t * j->k;
                const int k16 = j->k & ~15;
                int32x4_t acc = vdupq_n_s32(0);
                for (int k = 0; k < k16; k += 16) {
                    int8x16_t wv = vld1q_s8(w + k), hv = vld1q_s8(h + k);
                    acc = vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(wv), vget_low_s8(hv)), wv, hv));
                }
                int32_t s = vaddvq_s32(acc);
                for (int k = k16; k < j->k; k++) s += w[k] * h[k];
                *y = i8_logit(j, t, r, s);
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
