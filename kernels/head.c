/* Row-dot kernels of the output head: f16 rows against fp32 hidden vectors, or int8 / q4 rows
 * (one scale per row; q4 adds a small integer scale per 32 inputs) against the hidden vectors
 * quantised to int8 per token, an exact integer dot. On the 2B4T shape the head is 128256 x 2560,
 * more than half of the bytes streamed per decoded token at f16, so the SIMD versions prefetch
 * ahead of the loads and load each weight vector once for several tokens; with many tokens
 * (prefill, scoring) a block of rows stays in cache while all of them pass. The integer paths
 * stay integer so that they stay memory-bound: converting weights to float costs more
 * instructions than their bytes take to arrive. */
#include <stdlib.h>
#include <string.h>

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

/* Round to nearest, ties to even, as F16C's _mm_cvtps_ph and numpy's float16 do; a NaN keeps its
 * sign and top mantissa bits and is made quiet (as F16C does). */
uint16_t bn_f32_to_f16(float x) {
    union {
        float f;
        uint32_t u;
    } v = {x};
    uint32_t sign = (v.u >> 16) & 0x8000, exp = (v.u >> 23) & 0xff, man = v.u & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 | (man >> 13) : 0));
    int e = (int)exp - 127 + 15; /* the f16 biased exponent */
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) { /* an f16 subnormal (or zero): units of 2^-24 */
        if (e < -10) return (uint16_t)sign; /* below half the smallest subnormal */
        uint32_t full = man | 0x800000, shift = (uint32_t)(14 - e), h = full >> shift;
        uint32_t rest = full & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1))) h++; /* 0x400 carries into the smallest normal */
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13), rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++; /* a carry may reach the exponent, or inf */
    return (uint16_t)(sign | h);
}

/* int8 rows: the exact integer dot, rescaled by one float expression shared by every ISA */
static inline float i8_logit(const bn_head_job *j, int t, int r, int32_t acc) {
    return (float)acc / j->hscale[t] * j->wscale[r];
}

/* sum over a q4 row of sub * q * x, the reference every SIMD path must equal */
static int32_t q4_dot_scalar(const bn_q4_block *b, const int8_t *x, int k) {
    int32_t acc = 0;
    for (int i = 0; i < k / 64; i++, b++, x += 64)
        for (int half = 0; half < 2; half++) {
            int32_t s = 0;
            for (int j = 0; j < 32; j++) s += (((b->nib[j] >> 4 * half) & 15) - 8) * x[32 * half + j];
            acc += b->sub[half] * s;
        }
    return acc;
}

/* the 6-bit code u = q + 32 of input i (0..255) of a q6 block, by bitnet.h's definition */
static inline int q6_code(const bn_q6_block *b, int i) {
    int lo = (b->lo[32 * (i / 64) + i % 32] >> (4 * (i % 64 / 32))) & 15;
    int hi = (b->hi[32 * (i / 128) + i % 32] >> (2 * (i % 128 / 32))) & 3;
    return lo | hi << 4;
}

/* a q6 block's exact integer dot with 256 int8 inputs: over the 16-input groups, sc * sum q*x */
static int32_t q6_block_dot_scalar(const bn_q6_block *b, const int8_t *x) {
    int32_t acc = 0;
    for (int g = 0; g < 16; g++) {
        int32_t s = 0;
        for (int i = 16 * g; i < 16 * g + 16; i++) s += (q6_code(b, i) - 32) * x[i];
        acc += b->sc[g] * s;
    }
    return acc;
}

/* q6 rows: the blocks' integer sums go into one float sum in block order, s += d * acc, on every
 * ISA alike (no fused multiply-add: -ffp-contract=off), and the logit is s / x_scale */
static inline float q6_step(float s, float d, int32_t acc) { return s + d * (float)acc; }
static inline float q6_logit(const bn_head_job *j, int t, float s) { return s / j->hscale[t]; }

/* ---- the scalar references, one per row type ------------------------------------------- */

void bn_head_rows_f16_scalar(const bn_head_job *j, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < j->m; t++) {
            const uint16_t *w = (const uint16_t *)j->w + (size_t)r * j->k;
            const float *h = j->h + (size_t)t * j->k;
            float s = 0.0f;
            for (int k = 0; k < j->k; k++) s += bn_f16_to_f32(w[k]) * h[k];
            j->y[(size_t)t * j->y_stride + r] = s;
        }
}

void bn_head_rows_i8_scalar(const bn_head_job *j, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < j->m; t++) {
            const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k, *h = j->hq + (size_t)t * j->k;
            int32_t acc = 0;
            for (int k = 0; k < j->k; k++) acc += w[k] * h[k];
            j->y[(size_t)t * j->y_stride + r] = i8_logit(j, t, r, acc);
        }
}

void bn_head_rows_q4_scalar(const bn_head_job *j, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < j->m; t++) {
            const bn_q4_block *w = (const bn_q4_block *)j->w + (size_t)r * (j->k / BN_Q4_BLOCK_K);
            j->y[(size_t)t * j->y_stride + r] = i8_logit(j, t, r, q4_dot_scalar(w, j->hq + (size_t)t * j->k, j->k));
        }
}

void bn_head_rows_q6_scalar(const bn_head_job *j, int r0, int r1) {
    const int nb = j->k / BN_Q6_BLOCK_K;
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < j->m; t++) {
            const bn_q6_block *w = (const bn_q6_block *)j->w + (size_t)r * nb;
            const int8_t *x = j->hq + (size_t)t * j->k;
            float s = 0.0f;
            for (int b = 0; b < nb; b++) s = q6_step(s, bn_f16_to_f32(w[b].d), q6_block_dot_scalar(w + b, x + 256 * b));
            j->y[(size_t)t * j->y_stride + r] = q6_logit(j, t, s);
        }
}

/* ---- rows as floats (the embedding lookup), one per row type ----------------------------- */

static void f16_row_to_f32(const void *rows, const float *scale, int row, int hidden, float *out) {
    (void)scale;
    const uint16_t *w = (const uint16_t *)rows + (size_t)row * hidden;
    for (int i = 0; i < hidden; i++) out[i] = bn_f16_to_f32(w[i]);
}

static void i8_row_to_f32(const void *rows, const float *scale, int row, int hidden, float *out) {
    const int8_t *w = (const int8_t *)rows + (size_t)row * hidden;
    for (int i = 0; i < hidden; i++) out[i] = (float)w[i] * scale[row];
}

static void q4_row_to_f32(const void *rows, const float *scale, int row, int hidden, float *out) {
    const int nb = (hidden + BN_Q4_BLOCK_K - 1) / BN_Q4_BLOCK_K;
    const bn_q4_block *w = (const bn_q4_block *)rows + (size_t)row * nb;
    for (int i = 0; i < hidden; i++) {
        const bn_q4_block *b = w + i / BN_Q4_BLOCK_K;
        int half = i % BN_Q4_BLOCK_K / 32, q = ((b->nib[i % 32] >> 4 * half) & 15) - 8;
        out[i] = (float)(b->sub[half] * q) * scale[row]; /* sub * q first: an integer, as numpy's decode */
    }
}

static void q6_row_to_f32(const void *rows, const float *scale, int row, int hidden, float *out) {
    (void)scale;
    const int nb = (hidden + BN_Q6_BLOCK_K - 1) / BN_Q6_BLOCK_K;
    const bn_q6_block *w = (const bn_q6_block *)rows + (size_t)row * nb;
    for (int i = 0; i < hidden; i++) {
        const bn_q6_block *b = w + i / BN_Q6_BLOCK_K;
        const int k = i % BN_Q6_BLOCK_K;
        /* (d * sc) * q in float, as numpy's decode and ggml's Q6_K dequantisation compute it */
        out[i] = (bn_f16_to_f32(b->d) * (float)b->sc[k / 16]) * (float)(q6_code(b, k) - 32);
    }
}

/* The row types. A new type is one entry here, its row kernels in dispatch.c's table, and its
 * Python traits (bitnet_cli/pack/embeddings.py). */
static const bn_head_traits TRAITS[BN_EMB_COUNT] = {
    [BN_EMB_F16] = {"f16", 1, 0, 0, f16_row_to_f32},
    [BN_EMB_I8] = {"int8", 1, 0, 1, i8_row_to_f32},
    /* kp * 255 * 8 * 128 < 2^31 for kp <= 8192 (bitnet.h) */
    [BN_EMB_Q4] = {"q4", BN_Q4_BLOCK_K, 8192, 1, q4_row_to_f32},
    /* int32 sums per block only (bitnet.h), so any row length */
    [BN_EMB_Q6] = {"q6", BN_Q6_BLOCK_K, 0, 1, q6_row_to_f32},
};

const bn_head_traits *bn_head_type(int type) { return type >= 0 && type < BN_EMB_COUNT ? &TRAITS[type] : NULL; }

int bn_head_k(int type, int hidden) {
    const int block = TRAITS[type].block;
    return (hidden + block - 1) / block * block;
}

#if BN_X86
#define PREFETCH_BYTES 1024 /* how far ahead of the loads a row is prefetched */

AVX2_TARGET static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The end of an f16 row dot, shared by the row and the tile so that both round alike: the 8-wide
 * remainder into acc[0], ((acc0 + acc1) + (acc2 + acc3)) across lanes, then the scalar tail. */
AVX2_TARGET static inline float f16_finish(__m256 acc[4], const uint16_t *w, const float *h, int k, int K) {
    for (; k + 8 <= K; k += 8)
        acc[0] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k))), _mm256_loadu_ps(h + k),
                                 acc[0]);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; k < K; k++) s += bn_f16_to_f32(w[k]) * h[k];
    return s;
}

/* f16 rows against several tokens: tiles of RT rows x TT tokens, one accumulator per (row,
 * token). The row dot sums k by 32 into four accumulators (acc[u] takes inputs 32c + 8u .. + 7);
 * those four sums do not depend on each other, so a tile takes them one after another, a pass
 * per u, each (row, token) still adding its inputs in the row's order: every logit equals
 * f16_row_avx2's bit for bit, and a token's logits do not depend on its neighbours in the batch.
 * One accumulator per (row, token) leaves the registers for a tile large enough that each
 * converted weight vector serves TT tokens and each hidden vector RT rows. The passes go over
 * slices of F16_KB inputs, every tile of a block of rows through one slice before the next, so
 * the slice of the TT hidden vectors stays in L1 while the block's rows pass (the whole hidden
 * vectors would come from L2 again for every tile). */
#define F16_KB 1024 /* measured at 16 tokens: 3% faster than 512; 2048 (all of L1 for h) 30% slower */
#define F16_TT 4
/* rows per tile: at least 8 accumulators (two FMA pipes x 4 cycles of latency on Zen 3) and at
 * most 16 registers with the RT converted weight vectors: 3 x 4 or 3 x 3, 4 x 2, 8 x 1 */
#define F16_RT(TT) ((TT) >= 3 ? 3 : (TT) == 2 ? 4 : 8)
#define F16_RT_MAX 8
#define F16_BLOCK_ROWS 48 /* at most, so that a block's sums (24 KB) stay in L1 */
AVX2_TARGET static inline __attribute__((always_inline)) void f16_slice_avx2(const bn_head_job *j, int r, int t,
                                                                           int k0, int k1, __m256 (*sum)[F16_TT][4],
                                                                           const int RT, const int TT) {
    /* one base pointer per row and token and one index: the loop's only integer work is i */
    const uint16_t *w[F16_RT_MAX];
    const float *h[F16_TT];
    for (int a = 0; a < RT; a++) w[a] = (const uint16_t *)j->w + (size_t)(r + a) * j->k + k0;
    for (int b = 0; b < TT; b++) h[b] = j->h + (size_t)(t + b) * j->k + k0;
    const ptrdiff_t n = k1 - k0;
    for (int u = 0; u < 4; u++) {
        __m256 acc[F16_RT_MAX][F16_TT];
        for (int a = 0; a < RT; a++)
            for (int b = 0; b < TT; b++) acc[a][b] = sum[a][b][u];
        for (ptrdiff_t i = 8 * u; i < n; i += 32) {
            __m256 wv[F16_RT_MAX];
            for (int a = 0; a < RT; a++) wv[a] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w[a] + i)));
            for (int b = 0; b < TT; b++) {
                const __m256 hv = _mm256_loadu_ps(h[b] + i);
                for (int a = 0; a < RT; a++) acc[a][b] = _mm256_fmadd_ps(wv[a], hv, acc[a][b]);
            }
        }
        for (int a = 0; a < RT; a++)
            for (int b = 0; b < TT; b++) sum[a][b][u] = acc[a][b];
    }
}

/* rows b0..b1 (at most F16_BLOCK_ROWS, in L2: f16_row_avx2 streamed them) against tokens
 * t..t+TT-1 */
AVX2_TARGET static inline __attribute__((always_inline)) void f16_block_avx2(const bn_head_job *j, int b0, int b1,
                                                                           int t, const int TT) {
    __m256 sum[F16_BLOCK_ROWS][F16_TT][4]; /* [row][token][u] */
    for (int r = 0; r < b1 - b0; r++)
        for (int b = 0; b < TT; b++)
            for (int u = 0; u < 4; u++) sum[r][b][u] = _mm256_setzero_ps();
    const int k32 = j->k & ~31;
    for (int k0 = 0; k0 < k32; k0 += F16_KB) {
        const int k1 = k32 - k0 < F16_KB ? k32 : k0 + F16_KB;
        int r = b0;
        for (; r + F16_RT(TT) <= b1; r += F16_RT(TT)) f16_slice_avx2(j, r, t, k0, k1, sum + (r - b0), F16_RT(TT), TT);
        for (; r < b1; r++) f16_slice_avx2(j, r, t, k0, k1, sum + (r - b0), 1, TT);
    }
    for (int r = b0; r < b1; r++)
        for (int b = 0; b < TT; b++)
            j->y[(size_t)(t + b) * j->y_stride + r] = f16_finish(sum[r - b0][b], (const uint16_t *)j->w + (size_t)r * j->k,
                                                                 j->h + (size_t)(t + b) * j->k, k32, j->k);
}

/* The int32 totals of eight accumulators, that of a[b] in lane b (integer adds: exact in any
 * order). Reducing the tokens of a tile together costs a ninth of a reduction per token. */
AVX2_TARGET static inline __m256i hsum8_epi32_avx2(__m256i a0, __m256i a1, __m256i a2, __m256i a3, __m256i a4,
                                                   __m256i a5, __m256i a6, __m256i a7) {
    const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a4, a5), _mm256_hadd_epi32(a6, a7));
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* Tiles of the integer heads with several tokens: one row against TT <= HEAD_TT tokens. A row's
 * weight vector (its sign and magnitude, or its decoded 6-bit codes) is made once for the TT
 * tokens, and the TT accumulators stay in registers and are reduced together (hsum8_epi32_avx2)
 * into one vector of the TT tokens' sums. Measured on Zen 3, one thread, 16 tokens
 * (`build/bench 1 1 head 16`) against the former tiles of two rows x four tokens: int8 96 -> 84 ms,
 * q6 254 -> 92 ms; then (session 9, medians of 3 interleaved runs) with each token's sum kept in
 * a register and q6's paired inputs: int8 86.2 -> 82.8 ms, q6 99.6 -> 82.5 ms. int8 is then at
 * 1.3 cycles per 32 inputs and token (at the 2.55 GHz the measured MAC peak implies) against the
 * 1.0 that its two multiplies (vpmaddubsw, vpmaddwd: an exact int8 x int8 dot cannot add two pair
 * sums in int16) on Zen 3's two multiply pipes allow, and its four vector operations per 32 inputs
 * (vpsignb too) on the four vector pipes: 50% of the vpmaddubsw peak is the ceiling of an exact
 * int8 dot here. q6 needs 1.5 multiplies per 32 inputs (its 6-bit codes leave room to add two
 * pair sums) and runs at 1.27 cycles, bound by all its vector operations together. */
#define HEAD_TT 8

/* int8 rows x int8 hidden: vpmaddubsw takes |w| as the unsigned operand and h with w's sign
 * moved onto it (vpsignb), so |w| * (sign(w) h) = w h; a pair sum is at most 2 * 128 * 127,
 * inside int16, and widens to int32 at once (vpmaddwd by ones). AVX-VNNI's vpdpbusd takes the same
 * operands and adds the products' quads into the int32 sums in one instruction (I8_DOT_*). */
#define I8_DOT_AVX2(acc, wabs, xs) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), _mm256_set1_epi16(1)))
#define I8_TILE_256(NAME, TARGET, DOT)                                                                            \
    TARGET static inline __attribute__((always_inline)) void NAME(const bn_head_job *j, int r, int t, const int TT) { \
        const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k, *h = j->hq + (size_t)t * j->k;               \
        __m256i acc[HEAD_TT];                                                                                     \
        for (int b = 0; b < HEAD_TT; b++) acc[b] = _mm256_setzero_si256();                                        \
        const int k32 = j->k & ~31;                                                                               \
        for (int k = 0; k < k32; k += 32) {                                                                       \
            _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);                                    \
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k)), wabs = _mm256_abs_epi8(wv);         \
            for (int b = 0; b < TT; b++) {                                                                        \
                const __m256i x = _mm256_loadu_si256((const __m256i *)(h + (size_t)b * j->k + k));               \
                acc[b] = DOT(acc[b], wabs, _mm256_sign_epi8(x, wv));                                             \
                __asm__("" : "+x"(acc[b])); /* each token's sum in a register (see q6_tile_avx2) */               \
            }                                                                                                     \
        }                                                                                                         \
        int32_t total[HEAD_TT];                                                                                   \
        _mm256_storeu_si256((__m256i *)total,                                                                     \
                            hsum8_epi32_avx2(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]));    \
        for (int b = 0; b < TT; b++) {                                                                            \
            const int8_t *x = h + (size_t)b * j->k;                                                               \
            for (int k = k32; k < j->k; k++) total[b] += w[k] * x[k];                                             \
            j->y[(size_t)(t + b) * j->y_stride + r] = i8_logit(j, t + b, r, total[b]);                            \
        }                                                                                                         \
    }
I8_TILE_256(i8_tile_avx2, AVX2_TARGET, I8_DOT_AVX2)

/* One row against the first TT tokens (TT = 1: decode; 2: the pass of bn_head_rows_f16_avx2 that
 * streams a block of rows for the tiles), four accumulators over k per token to hide the FMA
 * latency. Rows go one after another, so the head streams as one sequential read (measured faster
 * than several rows in flight, which split it into strided streams), each weight vector converted
 * once for the TT tokens. */
AVX2_TARGET static inline __attribute__((always_inline)) void f16_row_avx2(const bn_head_job *j, int r, const int TT) {
    const uint16_t *w = (const uint16_t *)j->w + (size_t)r * j->k;
    __m256 acc[2][4];
    for (int b = 0; b < TT; b++)
        for (int u = 0; u < 4; u++) acc[b][u] = _mm256_setzero_ps();
    const int k32 = j->k & ~31;
    for (int k = 0; k < k32; k += 32) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
        for (int u = 0; u < 4; u++) {
            const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k + 8 * u)));
            for (int b = 0; b < TT; b++)
                acc[b][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(j->h + (size_t)b * j->k + k + 8 * u), acc[b][u]);
        }
    }
    for (int b = 0; b < TT; b++)
        j->y[(size_t)b * j->y_stride + r] = f16_finish(acc[b], w, j->h + (size_t)b * j->k, k32, j->k);
}

AVX2_TARGET static inline __m256i i8_dot32_avx2(const int8_t *w, const int8_t *h) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    return _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)h), wv)),
        _mm256_set1_epi16(1));
}

/* 64 bytes a step, one prefetch per line (a branch to prefetch every other step cost issue slots) */
AVX2_TARGET static inline int32_t i8_row_avx2(const bn_head_job *j, int r, int t) {
    const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k, *h = j->hq + (size_t)t * j->k;
    __m256i acc = _mm256_setzero_si256();
    const int k64 = j->k & ~63;
    int k = 0;
    for (; k < k64; k += 64) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(i8_dot32_avx2(w + k, h + k), i8_dot32_avx2(w + k + 32, h + k + 32)));
    }
    if (k + 32 <= j->k) {
        acc = _mm256_add_epi32(acc, i8_dot32_avx2(w + k, h + k));
        k += 32;
    }
    int32_t s = bn_hsum_epi32_avx2(acc);
    for (; k < j->k; k++) s += w[k] * h[k];
    return s;
}

/* Several tokens: blocks of rows small enough to stay in L2 while every tile of at most MAX_TT
 * tokens passes over them (the last tokens in one narrower tile), so the head streams from memory
 * once per call, not once per tile. PREPARE(t, tt) runs before the tiles of tokens t..t+tt-1 pass
 * a block; with one tile (m <= MAX_TT: decode and batched decode) it runs once, before the first.
 * WIDTHS(TILE, j, r, t, tt) calls TILE with tt as a constant (HEAD_WIDTHS_*), so that each tile
 * width keeps its accumulators in registers. */
#define HEAD_BLOCK_BYTES (128 * 1024)
#define HEAD_TILES(j, r0, r1, ROW_BYTES, MAX_TT, WIDTHS, PREPARE, TILE)                   \
    do {                                                                                \
        const int block_ = HEAD_BLOCK_BYTES / (ROW_BYTES) + 1;                          \
        for (int b0_ = (r0); b0_ < (r1); b0_ += block_) {                               \
            const int b1_ = (r1) - b0_ < block_ ? (r1) : b0_ + block_;                   \
            for (int t_ = 0; t_ < (j)->m; t_ += (MAX_TT)) {                             \
                const int tt_ = (j)->m - t_ < (MAX_TT) ? (j)->m - t_ : (MAX_TT);         \
                if ((j)->m > (MAX_TT) || b0_ == (r0)) PREPARE(t_, tt_);                 \
                for (int r_ = b0_; r_ < b1_; r_++) WIDTHS(TILE, j, r_, t_, tt_);        \
            }                                                                           \
        }                                                                               \
    } while (0)

/* the cases of widths 1..7, shared by the tile families */
#define HEAD_CASES_1_7(TILE, j, r, t)        \
    case 1: TILE(j, r, t, 1); break;         \
    case 2: TILE(j, r, t, 2); break;         \
    case 3: TILE(j, r, t, 3); break;         \
    case 4: TILE(j, r, t, 4); break;         \
    case 5: TILE(j, r, t, 5); break;         \
    case 6: TILE(j, r, t, 6); break;         \
    case 7: TILE(j, r, t, 7); break;
#define HEAD_WIDTHS_8(TILE, j, r, t, tt) \
    switch (tt) {                        \
        HEAD_CASES_1_7(TILE, j, r, t)    \
    default: TILE(j, r, t, 8); break;    \
    }
#define HEAD_TILES_AVX2(j, r0, r1, ROW_BYTES, PREPARE, TILE) \
    HEAD_TILES(j, r0, r1, ROW_BYTES, HEAD_TT, HEAD_WIDTHS_8, PREPARE, TILE)

#define NOTHING_TO_PREPARE(t, tt) (void)0

/* int8 rows: one token (decode) streams the head row after row, several go in tiles */
AVX2_TARGET void bn_head_rows_i8_avx2(const bn_head_job *j, int r0, int r1) {
    if (j->m == 1) {
        for (int r = r0; r < r1; r++) j->y[r] = i8_logit(j, 0, r, i8_row_avx2(j, r, 0));
        return;
    }
    HEAD_TILES_AVX2(j, r0, r1, j->k, NOTHING_TO_PREPARE, i8_tile_avx2);
}

#if BN_HAVE_AVXVNNI
I8_TILE_256(i8_tile_avxvnni, AVXVNNI_TARGET, bn_dpbusd_avxvnni)

/* AVX-VNNI: decode streams rows as on AVX2 (bound by the read), several tokens go in vpdpbusd tiles */
AVXVNNI_TARGET void bn_head_rows_i8_avxvnni(const bn_head_job *j, int r0, int r1) {
    if (j->m == 1) {
        bn_head_rows_i8_avx2(j, r0, r1);
        return;
    }
    HEAD_TILES_AVX2(j, r0, r1, j->k, NOTHING_TO_PREPARE, i8_tile_avxvnni);
}
#endif

/* f16 rows: one token (decode) streams the head row after row; several go in tiles over blocks
 * of rows that stay in L2 while every tile of tokens passes (the last tokens in one narrower
 * tile), so the head streams from memory once per call whatever m is. */
AVX2_TARGET void bn_head_rows_f16_avx2(const bn_head_job *j, int r0, int r1) {
    if (j->m == 1) {
        for (int r = r0; r < r1; r++) f16_row_avx2(j, r, 1);
        return;
    }
    /* a multiple of every tile's rows (24), so that only the rows past the last block go one at a time */
    int block = HEAD_BLOCK_BYTES / (2 * j->k) / 24 * 24;
    block = block < 24 ? 24 : block > F16_BLOCK_ROWS ? F16_BLOCK_ROWS : block;
    for (int b0 = r0; b0 < r1; b0 += block) {
        const int b1 = r1 - b0 < block ? r1 : b0 + block;
        for (int r = b0; r < b1; r++) f16_row_avx2(j, r, 2);
        int t = 2;
        for (; t + F16_TT <= j->m; t += F16_TT) f16_block_avx2(j, b0, b1, t, F16_TT);
        switch (j->m - t) { /* constant tile widths, so that the accumulators stay in registers */
        case 1: f16_block_avx2(j, b0, b1, t, 1); break;
        case 2: f16_block_avx2(j, b0, b1, t, 2); break;
        case 3: f16_block_avx2(j, b0, b1, t, 3); break;
        }
    }
}

/* q4 rows: the codes u = q + 8 are unsigned, so vpmaddubsw takes them as they are (u x pair
 * sums up to 2 * 15 * 127, inside int16) and the offset comes off as vpmaddubsw(8, x); the
 * difference is sum q*x per pair, which vpmaddwd scales by the half-block's sub and widens. */
AVX2_TARGET static inline __attribute__((always_inline)) void q4_tile_avx2(const bn_head_job *j, int r, int t,
                                                                         const int RT, const int TT) {
    const int nb = j->k / 64;
    const bn_q4_block *w = (const bn_q4_block *)j->w + (size_t)r * nb;
    const __m256i nibble = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8), low_byte = _mm256_set1_epi16(0xff);
    __m256i acc[2][4];
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < TT; b++) acc[a][b] = _mm256_setzero_si256();
    for (int i = 0; i < nb; i++) {
        __m256i u0[2], u1[2], s0[2], s1[2];
        for (int a = 0; a < RT; a++) {
            const bn_q4_block *blk = w + (size_t)a * nb + i;
            _mm_prefetch((const char *)blk + PREFETCH_BYTES, _MM_HINT_T0);
            __m256i raw = _mm256_loadu_si256((const __m256i *)blk->nib);
            uint16_t subs;
            memcpy(&subs, blk->sub, 2);
            __m256i sv = _mm256_set1_epi16((short)subs);
            u0[a] = _mm256_and_si256(raw, nibble);
            u1[a] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
            s0[a] = _mm256_and_si256(sv, low_byte);
            s1[a] = _mm256_srli_epi16(sv, 8);
        }
        for (int b = 0; b < TT; b++) {
            const int8_t *x = j->hq + (size_t)(t + b) * j->k + 64 * i;
            __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 32));
            __m256i off0 = _mm256_maddubs_epi16(eight, x0), off1 = _mm256_maddubs_epi16(eight, x1);
            for (int a = 0; a < RT; a++) {
                __m256i p0 = _mm256_sub_epi16(_mm256_maddubs_epi16(u0[a], x0), off0);
                __m256i p1 = _mm256_sub_epi16(_mm256_maddubs_epi16(u1[a], x1), off1);
                acc[a][b] = _mm256_add_epi32(acc[a][b], _mm256_add_epi32(_mm256_madd_epi16(p0, s0[a]),
                                                                         _mm256_madd_epi16(p1, s1[a])));
            }
        }
    }
    for (int a = 0; a < RT; a++)
        for (int b = 0; b < TT; b++)
            j->y[(size_t)(t + b) * j->y_stride + r + a] = i8_logit(j, t + b, r + a, bn_hsum_epi32_avx2(acc[a][b]));
}

/* tiles of two rows x four tokens; for the remaining tokens one row after another (a single
 * sequential stream, as in the decode case of the other types) */
AVX2_TARGET void bn_head_rows_q4_avx2(const bn_head_job *j, int r0, int r1) {
    int t = 0;
    for (; t + 4 <= j->m; t += 4) {
        int r = r0;
        for (; r + 2 <= r1; r += 2) q4_tile_avx2(j, r, t, 2, 4);
        for (; r < r1; r++) q4_tile_avx2(j, r, t, 1, 4);
    }
    for (; t < j->m; t++)
        for (int r = r0; r < r1; r++) q4_tile_avx2(j, r, t, 1, 1);
}

/* q6 rows (bitnet.h's bn_q6_block), 32 inputs at a time: the code u = lo | hi << 4 (0..63) goes
 * into vpmaddubsw as it is (pair sums up to 2 * 63 * 128, inside int16) and the offset 32 comes
 * off as vpmaddubsw(32, x), which leaves sum q*x per pair (|.| <= 8192); vpmaddwd scales that by
 * its 16-input group's sc and widens it. A block's int32 total then goes into the float sum as
 * the scalar path adds it (q6_step), so every ISA gives the scalar logits bit for bit. */
AVX2_TARGET static inline __m256i q6_codes_avx2(const bn_q6_block *b, int c) {
    const __m256i nibble = _mm256_set1_epi8(15), top = _mm256_set1_epi8(0x30);
    __m256i lo = _mm256_loadu_si256((const __m256i *)(b->lo + 32 * (c / 2)));
    __m256i hi = _mm256_loadu_si256((const __m256i *)(b->hi + 32 * (c / 4)));
    lo = c % 2 ? _mm256_and_si256(_mm256_srli_epi16(lo, 4), nibble) : _mm256_and_si256(lo, nibble);
    const int f = c % 4; /* bits 2f+1:2f of hi become bits 5:4 of the code */
    hi = f == 3 ? _mm256_srli_epi16(hi, 2) : _mm256_slli_epi16(hi, 4 - 2 * f);
    return _mm256_or_si256(lo, _mm256_and_si256(hi, top));
}

/* the scales of inputs 32c..32c+31 as int16 for vpmaddwd: sc[2c] in the low 128 bits, sc[2c+1]
 * in the high; sc8 holds sc[0..7] (c < 4) or sc[8..15] as int16 in both halves */
AVX2_TARGET static inline __m256i q6_scales_avx2(__m256i sc8, int c) {
    const int lo = 4 * (c % 4), hi = lo + 2;
    return _mm256_shuffle_epi8(sc8, _mm256_setr_epi8(lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1, lo, lo + 1, lo,
                                                     lo + 1, lo, lo + 1, lo, lo + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1,
                                                     hi, hi + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1, hi, hi + 1));
}

AVX2_TARGET static inline __m256i q6_sc8_avx2(const bn_q6_block *b, int half) {
    return _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(b->sc + 8 * half))));
}

/* Tiles pair the 64 inputs 64m..64m+63 of a block so that two vpmaddubsw products add in int16
 * before one vpmaddwd applies the scales: P holds inputs 0..7 of each of the four 16-input groups
 * and Q inputs 8..15 (vpunpck{l,h}qdq of the two 32-input halves), so int16 lane l of P's and of
 * Q's pair sums belong to one group, and their sum |u x + u' x'| <= 2 * 2 * 63 * 128 = 32256
 * stays inside int16. Three multiplies per 64 inputs and token instead of four. The tokens'
 * inputs are paired the same way once per tile of tokens (q6_pair_inputs_avx2). */
AVX2_TARGET static inline void q6_pair_avx2(__m256i first, __m256i second, __m256i *p, __m256i *q) {
    *p = _mm256_unpacklo_epi64(first, second);
    *q = _mm256_unpackhi_epi64(first, second);
}

/* the scales of the int16 lanes of a pair (inputs 64m..64m+63): words 0..3 of the low 128 bits
 * group 4m, words 4..7 group 4m+2; of the high 128 bits 4m+1 and 4m+3. sc8 holds sc[8(m/2)..]. */
AVX2_TARGET static inline __m256i q6_pair_scales_avx2(__m256i sc8, int m) {
    const int a = 8 * (m % 2), b = a + 4, c = a + 2, d = a + 6; /* byte offsets of the four words */
    return _mm256_shuffle_epi8(sc8, _mm256_setr_epi8(a, a + 1, a, a + 1, a, a + 1, a, a + 1, b, b + 1, b, b + 1, b, b + 1,
                                                     b, b + 1, c, c + 1, c, c + 1, c, c + 1, c, c + 1, d, d + 1, d, d + 1,
                                                     d, d + 1, d, d + 1));
}

/* a token's int8 inputs, each 64 of them as the pair P, Q (32 bytes each) that q6_tile_avx2 loads */
AVX2_TARGET static void q6_pair_inputs_avx2(const int8_t *x, int k, int8_t *paired) {
    for (int i = 0; i < k; i += 64) {
        __m256i p, q;
        q6_pair_avx2(_mm256_loadu_si256((const __m256i *)(x + i)), _mm256_loadu_si256((const __m256i *)(x + i + 32)), &p, &q);
        _mm256_storeu_si256((__m256i *)(paired + i), p);
        _mm256_storeu_si256((__m256i *)(paired + i + 32), q);
    }
}

/* One row against TT tokens (inputs paired by q6_pair_inputs_avx2, group sums xs): each block's
 * codes are decoded and paired once for the TT tokens. The offset 32 of the codes comes off
 * through the tokens' 16-input group sums (as in q6_row_avx2): each token's accumulator starts
 * the block at -32 sum_g sc_g xs_g (one vpmaddwd: |32 sc| <= 4096 fits int16), then takes
 * sum sc * u * x. The empty asm after each add keeps every token's sum one chain in a register:
 * without it gcc reassociated the fully unrolled block into trees of 64 products, spilled to the
 * stack (1.5 cycles per 32 inputs and token, measured, against 1.0 for the multiplies alone).
 * The block totals of the TT tokens go into their float sums together, s + d * total lane by
 * lane, as q6_step adds them. */
AVX2_TARGET static inline __attribute__((always_inline)) void q6_tile_avx2(const bn_head_job *j, int r, int t,
                                                                         const int8_t *xp, const int16_t *xs,
                                                                         const int TT) {
    const int nb = j->k / BN_Q6_BLOCK_K, groups = j->k / 16;
    const bn_q6_block *w = (const bn_q6_block *)j->w + (size_t)r * nb;
    __m256 s = _mm256_setzero_ps();
    for (int i = 0; i < nb; i++) {
        const bn_q6_block *blk = w + i;
        for (int line = 0; line < 4; line++) _mm_prefetch((const char *)blk + PREFETCH_BYTES + 64 * line, _MM_HINT_T0);
        const __m256i sc_off = _mm256_sub_epi16(
            _mm256_setzero_si256(), _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)blk->sc)), 5));
        __m256i acc[HEAD_TT];
        for (int b = 0; b < HEAD_TT; b++)
            acc[b] = b < TT ? _mm256_madd_epi16(sc_off, _mm256_loadu_si256((const __m256i *)(xs + (size_t)b * groups + 16 * i)))
                            : _mm256_setzero_si256();
        __m256i sc8 = _mm256_setzero_si256();
#pragma GCC unroll 4 /* constant shuffles and shifts per m */
        for (int m = 0; m < 4; m++) {
            if (m % 2 == 0) sc8 = q6_sc8_avx2(blk, m / 2);
            __m256i p, q;
            q6_pair_avx2(q6_codes_avx2(blk, 2 * m), q6_codes_avx2(blk, 2 * m + 1), &p, &q);
            const __m256i sv = q6_pair_scales_avx2(sc8, m);
            for (int b = 0; b < TT; b++) {
                const int8_t *x = xp + (size_t)b * j->k + 256 * i + 64 * m;
                const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(p, _mm256_loadu_si256((const __m256i *)x)),
                                                       _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(x + 32))));
                acc[b] = _mm256_add_epi32(acc[b], _mm256_madd_epi16(pairs, sv));
                __asm__("" : "+x"(acc[b]));
            }
        }
        s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(blk->d)), _mm256_cvtepi32_ps(hsum8_epi32_avx2(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]))));
    }
    float sums[HEAD_TT];
    _mm256_storeu_ps(sums, s);
    for (int b = 0; b < TT; b++) j->y[(size_t)(t + b) * j->y_stride + r] = q6_logit(j, t + b, sums[b]);
}

/* the sums of a token's 16-input groups (|.| <= 2048): vpsadbw adds 8 bytes made unsigned (x + 128) */
AVX2_TARGET static void q6_group_sums_avx2(const int8_t *x, int k, int16_t *xs) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int i = 0; i < k; i += 32) {
        uint64_t eights[4];
        _mm256_storeu_si256((__m256i *)eights, _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(x + i)), flip),
                                                                _mm256_setzero_si256()));
        xs[i / 16] = (int16_t)((int)(eights[0] + eights[1]) - 16 * 128);
        xs[i / 16 + 1] = (int16_t)((int)(eights[2] + eights[3]) - 16 * 128);
    }
}

/* One row against one token (decode). The offset 32 * x is the same for every row, so its sum per
 * 16-input group (xs, |xs| <= 2048) is taken once per token and comes off per block as one
 * vpmaddwd with the scales: sum sc * (u - 32) * x = sum sc * u * x - 32 * sum_g sc_g * xs_g, two
 * instructions a block instead of two per 32 inputs. Bounds: a vpmaddubsw pair sum of u * x is
 * at most 2 * 63 * 128 = 16128, a block's sum of sc * u * x at most 256 * 63 * 128 * 128 < 2^31. */
AVX2_TARGET static inline float q6_row_avx2(const bn_head_job *j, int r, int t, const int16_t *xs) {
    const int nb = j->k / BN_Q6_BLOCK_K;
    const bn_q6_block *w = (const bn_q6_block *)j->w + (size_t)r * nb;
    const int8_t *x = j->hq + (size_t)t * j->k;
    float s = 0.0f;
    for (int i = 0; i < nb; i++) {
        const bn_q6_block *blk = w + i;
        for (int line = 0; line < 4; line++) _mm_prefetch((const char *)blk + PREFETCH_BYTES + 64 * line, _MM_HINT_T0);
        const __m256i sc8[2] = {q6_sc8_avx2(blk, 0), q6_sc8_avx2(blk, 1)};
        __m256i acc = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++)
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q6_codes_avx2(blk, c),
                                                                               _mm256_loadu_si256((const __m256i *)(x + 256 * i + 32 * c))),
                                                          q6_scales_avx2(sc8[c / 4], c)));
        __m256i off = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)blk->sc)),
                                        _mm256_loadu_si256((const __m256i *)(xs + 16 * i)));
        s = q6_step(s, _cvtsh_ss(blk->d), bn_hsum_epi32_avx2(_mm256_sub_epi32(acc, _mm256_slli_epi32(off, 5))));
    }
    return s;
}

/* One token (decode): its group sums, then one row after another (a single sequential stream).
 * Several: blocks of rows that stay in L2 (HEAD_BLOCK_BYTES) meet tiles of HEAD_TT tokens, as
 * HEAD_TILES does, but the tokens' paired inputs and group sums are prepared Q6_PREPARED at a time,
 * so up to that many tokens (a 16-stream decode step) prepare them once a call instead of once
 * per block and tile: measured on a Zen 4 EPYC (1 thread, `BN_BENCH_HEAD=q6 kernels/build/bench 1
 * 1 head 8 16`, 3 alternating rounds) 16 tokens 85.8 -> 78.6 ms, 8 tokens unchanged. */
#define Q6_PREPARED 16
AVX2_TARGET void bn_head_rows_q6_avx2(const bn_head_job *j, int r0, int r1) {
    const int groups = j->k / 16;
    if (j->m == 1) {
        int16_t xs[groups];
        q6_group_sums_avx2(j->hq, j->k, xs);
        for (int r = r0; r < r1; r++) j->y[r] = q6_logit(j, 0, q6_row_avx2(j, r, 0, xs));
        return;
    }
    int16_t xs[Q6_PREPARED * groups];
    int8_t xp[Q6_PREPARED * j->k] __attribute__((aligned(32))); /* the tokens' inputs, paired */
    const int block = HEAD_BLOCK_BYTES / ((j->k / BN_Q6_BLOCK_K) * (int)sizeof(bn_q6_block)) + 1;
    for (int b0 = r0; b0 < r1; b0 += block) {
        const int b1 = r1 - b0 < block ? r1 : b0 + block;
        for (int s0 = 0; s0 < j->m; s0 += Q6_PREPARED) {
            const int s1 = j->m - s0 < Q6_PREPARED ? j->m : s0 + Q6_PREPARED;
            if (j->m > Q6_PREPARED || b0 == r0)
                for (int t = s0; t < s1; t++) {
                    q6_group_sums_avx2(j->hq + (size_t)t * j->k, j->k, xs + (size_t)(t - s0) * groups);
                    q6_pair_inputs_avx2(j->hq + (size_t)t * j->k, j->k, xp + (size_t)(t - s0) * j->k);
                }
            for (int t = s0; t < s1; t += HEAD_TT) {
                const int tt = s1 - t < HEAD_TT ? s1 - t : HEAD_TT;
#define Q6_TILE(j, r, t, TT) q6_tile_avx2(j, r, t, xp + (size_t)((t) - s0) * j->k, xs + (size_t)((t) - s0) * groups, TT)
                for (int r = b0; r < b1; r++) HEAD_WIDTHS_8(Q6_TILE, j, r, t, tt);
#undef Q6_TILE
            }
        }
    }
}

/* q6 on AVX-512 (BW): 64 inputs a step. The 32 bytes of lo (or hi) that hold them are broadcast
 * to both halves of a zmm and shifted per half (vpsrlvw), as the i2 kernels do; vpermw spreads the
 * four 16-input scales of the step over its four 128-bit lanes. Same sums as the AVX2 path. */
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))

AVX512_TARGET static inline __m512i q6_codes_avx512(const bn_q6_block *b, int g) {
    const __m512i nibble = _mm512_set1_epi8(15), three = _mm512_set1_epi8(3);
    /* per 256-bit half: the low nibbles then the high ones; fields 2(g%2) then 2(g%2)+1 of hi */
    const __m512i lo_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    const __m512i hi_shift = _mm512_add_epi16(_mm512_srli_epi16(lo_shift, 1), _mm512_set1_epi16(4 * (g % 2)));
    __m512i lo = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->lo + 32 * g)));
    __m512i hi = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->hi + 32 * (g / 2))));
    lo = _mm512_and_si512(_mm512_srlv_epi16(lo, lo_shift), nibble);
    hi = _mm512_and_si512(_mm512_srlv_epi16(hi, hi_shift), three);
    return _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
}

/* one row against one token (decode): 64 inputs a step, the offset 32 taken off per step by
 * vpmaddubsw(32, x), and the scales applied by vpmaddwd */
AVX512_TARGET static float q6_row_avx512(const bn_head_job *j, int r, int t) {
    const int nb = j->k / BN_Q6_BLOCK_K;
    const bn_q6_block *w = (const bn_q6_block *)j->w + (size_t)r * nb;
    const int8_t *x = j->hq + (size_t)t * j->k;
    const __m512i thirty_two = _mm512_set1_epi8(32);
    /* int16 lane l of a step takes scale 4g + l / 8 */
    const __m512i lane_group = _mm512_srli_epi16(
        _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7,
                         6, 5, 4, 3, 2, 1, 0), 3);
    float s = 0.0f;
    for (int i = 0; i < nb; i++) {
        const bn_q6_block *blk = w + i;
        for (int line = 0; line < 4; line++) _mm_prefetch((const char *)blk + PREFETCH_BYTES + 64 * line, _MM_HINT_T0);
        const __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)blk->sc)));
        __m512i acc = _mm512_setzero_si512();
        for (int g = 0; g < 4; g++) {
            const __m512i sv = _mm512_permutexvar_epi16(_mm512_add_epi16(_mm512_set1_epi16((short)(4 * g)), lane_group), sc16);
            const __m512i xv = _mm512_loadu_si512(x + 256 * i + 64 * g);
            const __m512i q = _mm512_sub_epi16(_mm512_maddubs_epi16(q6_codes_avx512(blk, g), xv),
                                               _mm512_maddubs_epi16(thirty_two, xv));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(q, sv));
        }
        s = q6_step(s, _cvtsh_ss(blk->d), _mm512_reduce_add_epi32(acc));
    }
    return s;
}

/* One token (decode): one row after another (a single sequential stream). Several: the AVX2
 * tiles, which keep a block of rows in L2 while every tile of tokens passes and decode a row's
 * codes once for eight tokens; measured on the 16-core Xeon (`build/bench 8 2 head 1 8 16`, 8
 * threads) the former 512-bit tiles of two rows x four tokens took 46.4 ms at 16 tokens against
 * 20.1 for the AVX2 tiles. */
AVX512_TARGET void bn_head_rows_q6_avx512(const bn_head_job *j, int r0, int r1) {
    if (j->m > 1) {
        bn_head_rows_q6_avx2(j, r0, r1);
        return;
    }
    for (int r = r0; r < r1; r++) j->y[r] = q6_logit(j, 0, q6_row_avx512(j, r, 0));
}

/* ---- AVX-512 VNNI: vpdpbusd, four u8 x s8 products into an int32 lane, exact ---------------- */
#define AVX512VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define VNNI_TT 16 /* tokens per tile: one zmm accumulator each, 32 registers */

/* the tiles of a head call: HEAD_TILES with up to VNNI_TT tokens a tile */
#define HEAD_WIDTHS_16(TILE, j, r, t, tt)  \
    switch (tt) {                          \
        HEAD_CASES_1_7(TILE, j, r, t)      \
    case 8: TILE(j, r, t, 8); break;       \
    case 9: TILE(j, r, t, 9); break;       \
    case 10: TILE(j, r, t, 10); break;     \
    case 11: TILE(j, r, t, 11); break;     \
    case 12: TILE(j, r, t, 12); break;     \
    case 13: TILE(j, r, t, 13); break;     \
    case 14: TILE(j, r, t, 14); break;     \
    case 15: TILE(j, r, t, 15); break;     \
    default: TILE(j, r, t, 16); break;     \
    }
#define HEAD_TILES_VNNI(j, r0, r1, ROW_BYTES, PREPARE, TILE) \
    HEAD_TILES(j, r0, r1, ROW_BYTES, VNNI_TT, HEAD_WIDTHS_16, PREPARE, TILE)

/* The int32 totals of a tile's accumulators, token b's in lane b % 8 of totals[b / 8] (integer
 * adds: exact in any order); tokens past TT count zero. */
AVX512VNNI_TARGET static inline __attribute__((always_inline)) void vnni_totals(const __m512i *acc, const int TT,
                                                                              __m256i totals[2]) {
    __m256i half[VNNI_TT];
    for (int b = 0; b < VNNI_TT; b++)
        half[b] = b < TT ? _mm256_add_epi32(_mm512_castsi512_si256(acc[b]), _mm512_extracti64x4_epi64(acc[b], 1))
                         : _mm256_setzero_si256();
    totals[0] = hsum8_epi32_avx2(half[0], half[1], half[2], half[3], half[4], half[5], half[6], half[7]);
    totals[1] = TT > 8 ? hsum8_epi32_avx2(half[8], half[9], half[10], half[11], half[12], half[13], half[14], half[15])
                       : _mm256_setzero_si256();
}

/* int8 rows: vpdpbusd multiplies unsigned by signed bytes, so the tokens' inputs go in moved to
 * unsigned (x + 128, once per tile: xu) against the signed weights, and each row's sum of weights
 * (one vpdpbusd with ones per 64 inputs, shared by the tokens) takes the offset off:
 * sum (x + 128) w - 128 sum w = sum x w. |sum (x + 128) w| <= 255 * 128 * k < 2^31 for
 * k < 65794 (a head row is the hidden size: 2560 on 2B4T). One multiply per 64 inputs and
 * token, against two per 32 on AVX2. */
AVX512VNNI_TARGET static inline __attribute__((always_inline)) void i8_tile_vnni(const bn_head_job *j, int r, int t,
                                                                               const int8_t *xu, const int TT) {
    const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k;
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc[VNNI_TT], wsum = _mm512_setzero_si512();
    for (int b = 0; b < TT; b++) acc[b] = _mm512_setzero_si512();
    const int k64 = j->k & ~63;
    for (int k = 0; k < k64; k += 64) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512(w + k);
        wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
        for (int b = 0; b < TT; b++) {
            acc[b] = _mm512_dpbusd_epi32(acc[b], _mm512_loadu_si512(xu + (size_t)b * j->k + k), wv);
            __asm__("" : "+v"(acc[b])); /* each token's sum one chain in a register (see q6_tile_avx2) */
        }
    }
    __m256i totals[2];
    vnni_totals(acc, TT, totals);
    int32_t total[VNNI_TT];
    _mm256_storeu_si256((__m256i *)total, totals[0]);
    _mm256_storeu_si256((__m256i *)(total + 8), totals[1]);
    const int32_t offset = 128 * _mm512_reduce_add_epi32(wsum);
    for (int b = 0; b < TT; b++) {
        const int8_t *x = j->hq + (size_t)(t + b) * j->k;
        int32_t dot = total[b] - offset;
        for (int k = k64; k < j->k; k++) dot += w[k] * x[k];
        j->y[(size_t)(t + b) * j->y_stride + r] = i8_logit(j, t + b, r, dot);
    }
}

/* a tile's tokens as unsigned bytes, x + 128 (the sign bit flipped), the whole row of k */
AVX512VNNI_TARGET static void i8_unsigned_inputs_vnni(const int8_t *x, int k, uint8_t *xu) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int i = 0;
    for (; i + 64 <= k; i += 64) _mm512_storeu_si512(xu + i, _mm512_xor_si512(_mm512_loadu_si512(x + i), flip));
    for (; i < k; i++) xu[i] = (uint8_t)(x[i] ^ 0x80);
}

/* one token (decode) streams the head row after row (a tile of one token), several go in tiles */
AVX512VNNI_TARGET void bn_head_rows_i8_avx512vnni(const bn_head_job *j, int r0, int r1) {
    uint8_t xu[VNNI_TT * j->k] __attribute__((aligned(64)));
#define I8_PREPARE(t, tt)                                                                         \
    for (int b = 0; b < (tt); b++) i8_unsigned_inputs_vnni(j->hq + (size_t)((t) + b) * j->k, j->k, xu + (size_t)b * j->k);
#define I8_TILE(j, r, t, TT) i8_tile_vnni(j, r, t, (const int8_t *)xu, TT)
    HEAD_TILES_VNNI(j, r0, r1, j->k, I8_PREPARE, I8_TILE);
#undef I8_PREPARE
#undef I8_TILE
}

/* q6 rows: vpdpbusd takes the codes u = q + 32 (0..63) as its unsigned operand against a token's
 * 64 inputs of a step, and leaves in int32 lane l the sum of inputs 4l..4l+3 of the step
 * (|.| <= 4 * 63 * 128 = 32256: inside int16), so vpackssdw packs two steps' lanes into int16
 * words exactly: per 128-bit lane (one 16-input group of each step) four words of the first step
 * then four of the second. vpdpwssd then multiplies each word pair, which shares its group's scale,
 * by that scale and adds it to the token's int32 accumulator. The offset 32 comes off through the
 * tokens' 16-input group sums, as in q6_tile_avx2 (the accumulator starts the block at
 * -32 sum_g sc_g xs_g). Per 128 inputs and token two vpdpbusd and a vpdpwssd (all on port 0 of the
 * Xeon; the 2B4T head at 16 tokens, 8 threads: 13.8 ms, against 17.3 with a vpmaddwd and a vpaddd
 * per 64 inputs instead) and a vpackssdw (port 5); the codes are decoded once per block for the tile's
 * tokens. The block totals go into the float sums as q6_step adds them, s + d * total, eight
 * tokens to a vector. */
AVX512VNNI_TARGET static inline __attribute__((always_inline)) void q6_tile_vnni(const bn_head_job *j, int r, int t,
                                                                               const int16_t *xs, const int TT) {
    const int nb = j->k / BN_Q6_BLOCK_K, groups = j->k / 16;
    const bn_q6_block *w = (const bn_q6_block *)j->w + (size_t)r * nb;
    /* word p of a packed pair of steps (2h, 2h + 1) belongs to group 4 (2h + (p % 8) / 4) + p / 8 */
    const __m512i word = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
                                          12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i pair_group = _mm512_add_epi16(
        _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(word, 2), _mm512_set1_epi16(1)), 2), _mm512_srli_epi16(word, 3));
    __m256 s[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int i = 0; i < nb; i++) {
        const bn_q6_block *blk = w + i;
        for (int line = 0; line < 4; line++) _mm_prefetch((const char *)blk + PREFETCH_BYTES + 64 * line, _MM_HINT_T0);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)blk->sc));
        const __m256i sc_off = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc16, 5));
        __m512i acc[VNNI_TT];
        for (int b = 0; b < TT; b++)
            acc[b] = _mm512_zextsi256_si512(
                _mm256_madd_epi16(sc_off, _mm256_loadu_si256((const __m256i *)(xs + (size_t)b * groups + 16 * i))));
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m512i u0 = q6_codes_avx512(blk, 2 * h), u1 = q6_codes_avx512(blk, 2 * h + 1);
            const __m512i sv = _mm512_permutexvar_epi16(_mm512_add_epi16(pair_group, _mm512_set1_epi16((short)(8 * h))),
                                                        _mm512_castsi256_si512(sc16));
            for (int b = 0; b < TT; b++) {
                const int8_t *x = j->hq + (size_t)(t + b) * j->k + 256 * i + 128 * h;
                const __m512i packed = _mm512_packs_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, _mm512_loadu_si512(x)),
                                                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), u1, _mm512_loadu_si512(x + 64)));
                acc[b] = _mm512_dpwssd_epi32(acc[b], packed, sv);
                __asm__("" : "+v"(acc[b]));
            }
        }
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(blk->d));
        if (TT == 1) {
            s[0] = _mm256_set1_ps(q6_step(_mm256_cvtss_f32(s[0]), _cvtsh_ss(blk->d), _mm512_reduce_add_epi32(acc[0])));
        } else {
            __m256i totals[2];
            vnni_totals(acc, TT, totals);
            s[0] = _mm256_add_ps(s[0], _mm256_mul_ps(d, _mm256_cvtepi32_ps(totals[0])));
            if (TT > 8) s[1] = _mm256_add_ps(s[1], _mm256_mul_ps(d, _mm256_cvtepi32_ps(totals[1])));
        }
    }
    float sums[VNNI_TT];
    _mm256_storeu_ps(sums, s[0]);
    _mm256_storeu_ps(sums + 8, s[1]);
    for (int b = 0; b < TT; b++) j->y[(size_t)(t + b) * j->y_stride + r] = q6_logit(j, t + b, sums[b]);
}

/* one token (decode) streams the head row after row (a tile of one token), several go in tiles;
 * the group sums of a tile's tokens are taken once per tile (q6_group_sums_avx2) */
AVX512VNNI_TARGET void bn_head_rows_q6_avx512vnni(const bn_head_job *j, int r0, int r1) {
    const int groups = j->k / 16;
    int16_t xs[VNNI_TT * groups];
#define Q6_PREPARE(t, tt)                                                                                 \
    for (int b = 0; b < (tt); b++) q6_group_sums_avx2(j->hq + (size_t)((t) + b) * j->k, j->k, xs + (size_t)b * groups);
#define Q6_TILE(j, r, t, TT) q6_tile_vnni(j, r, t, xs, TT)
    HEAD_TILES_VNNI(j, r0, r1, (j->k / BN_Q6_BLOCK_K) * (int)sizeof(bn_q6_block), Q6_PREPARE, Q6_TILE);
#undef Q6_PREPARE
#undef Q6_TILE
}

/* ---- AMX-INT8: tdpbssd, tiles of 16 rows x 16 tokens, signed x signed bytes, exact ---------
 * An int8 head row needs no unpacking: A = 16 consecutive rows' bytes over 64 inputs is a tile
 * load straight from the weights (stride k); B = 16 tokens' same 64 inputs, 4 consecutive inputs
 * per token and tile row, reordered once per call (bn_amx_tokens_to_tiles); C = rows x tokens in
 * int32. Two row strips meet up to two token tiles per pass (C 0-3, A 4-5, B 6-7), so each A tile
 * feeds two tdpbssd from 17 tokens on; more tokens re-read a pass's 32 rows from L2. Inputs past
 * the last whole 64 (k % 64) are added in scalar and rows past the last whole 16 take the VNNI
 * path: the int32 sum is the same either way, and the logit one expression (i8_logit). One token
 * (decode) stays VNNI's: a memory-bound row stream that tiles cannot speed up. */
#define AMX_HEAD_MIN_TOKENS 2

/* the int8 head's product, AMX_TARGET's instructions plus the VNNI fallback's */
#define AMX_HEAD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8,avx2,fma,f16c")))

/* the logits of C tile (rows r.., tokens t..) from out[16][16], with the inputs past k64 added;
 * without such inputs, a token's 16 rows at once from the tile's columns (the same division and
 * product per logit as i8_logit: IEEE operations in either form, no fused multiply-add). Per
 * element in scalar, these divisions took 12 of the 34 ms of 64 tokens (2 threads). */
AMX_HEAD_TARGET static void i8_amx_store(const bn_head_job *j, int r, int t, int k64, const int32_t *out) {
    const int tokens = j->m - t < 16 ? j->m - t : 16;
    if (k64 == j->k) {
        __m512i col[16];
        bn_amx_tile_columns(out, col);
        const __m512 wscale = _mm512_loadu_ps(j->wscale + r);
        for (int n = 0; n < tokens; n++)
            _mm512_storeu_ps(j->y + (size_t)(t + n) * j->y_stride + r,
                             _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(col[n]), _mm512_set1_ps(j->hscale[t + n])),
                                           wscale));
        return;
    }
    for (int i = 0; i < 16; i++) {
        const int8_t *w = (const int8_t *)j->w + (size_t)(r + i) * j->k;
        for (int n = 0; n < tokens; n++) {
            const int8_t *x = j->hq + (size_t)(t + n) * j->k;
            int32_t dot = out[16 * i + n];
            for (int kk = k64; kk < j->k; kk++) dot += w[kk] * x[kk];
            j->y[(size_t)(t + n) * j->y_stride + r + i] = i8_logit(j, t + n, r + i, dot);
        }
    }
}

AMX_HEAD_TARGET void bn_head_rows_i8_amx(const bn_head_job *j, int r0, int r1) {
    const int nc = j->k / 64, tiles = (j->m + 15) / 16, strips_end = r0 + (r1 - r0) / 16 * 16;
    int8_t *xa = j->m >= AMX_HEAD_MIN_TOKENS && nc > 0 && strips_end > r0
                     ? aligned_alloc(64, (size_t)tiles * nc * 1024) : NULL;
    if (!xa) { /* one token, a row shorter than 64, fewer than 16 rows, or no memory */
        bn_head_rows_i8_avx512vnni(j, r0, r1);
        return;
    }
    bn_amx_tokens_to_tiles(j->hq, j->m, j->k, xa);
    const int8_t *w = j->w;
    const size_t k = (size_t)j->k;
    int32_t out[256] __attribute__((aligned(64)));
    bn_amx_configure();
    for (int ra = r0; ra < strips_end; ra += 32) {
        const int two_strips = strips_end - ra >= 32;
        const int8_t *a0 = w + (size_t)ra * k, *a1 = a0 + 16 * k;
        for (int T = 0; T < tiles; T += 2) {
            const int two_tiles = T + 1 < tiles;
            const int8_t *b0 = xa + (size_t)T * nc * 1024, *b1 = b0 + (size_t)nc * 1024;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            /* tile numbers must be immediates: the pass's shape is tested in the loop (the same
             * branch every time, beside a 16-cycle tdpbssd) */
            for (int c = 0; c < nc; c++) {
                _tile_loadd(4, a0 + 64 * c, k);
                _tile_loadd(6, b0 + (size_t)c * 1024, 64);
                _tile_dpbssd(0, 4, 6);
                if (two_tiles) {
                    _tile_loadd(7, b1 + (size_t)c * 1024, 64);
                    _tile_dpbssd(1, 4, 7);
                }
                if (two_strips) {
                    _tile_loadd(5, a1 + 64 * c, k);
                    _tile_dpbssd(2, 5, 6);
                    if (two_tiles) _tile_dpbssd(3, 5, 7);
                }
            }
            _tile_stored(0, out, 64);
            i8_amx_store(j, ra, 16 * T, 64 * nc, out);
            if (two_tiles) {
                _tile_stored(1, out, 64);
                i8_amx_store(j, ra, 16 * T + 16, 64 * nc, out);
            }
            if (two_strips) {
                _tile_stored(2, out, 64);
                i8_amx_store(j, ra + 16, 16 * T, 64 * nc, out);
                if (two_tiles) {
                    _tile_stored(3, out, 64);
                    i8_amx_store(j, ra + 16, 16 * T + 16, 64 * nc, out);
                }
            }
        }
    }
    _tile_release();
    free(xa);
    if (strips_end < r1) bn_head_rows_i8_avx512vnni(j, strips_end, r1);
}

/* ---- q6 rows on AMX-INT8 ---------------------------------------------------------------------
 * tdpbssd multiplies int8 by int8 only, and a q6 weight's integer part w = sc * q (int8 sc, q in
 * [-32, 31]) needs 13 bits; so each w is split into two int8 parts, w = 64 a + b with
 * a = floor(w / 64) in [-64, 63] and b = w & 63 in [0, 63], and a block's exact sum is
 * acc_b = 64 * sum a x + sum b x: two tdpbssd per 64 inputs into two C tiles, the same int32 as
 * q6_block_dot_scalar's (|64 sum a x| <= 64 * 256 * 64 * 128 = 2^27). A 16-row strip's block is
 * split into its A tiles (4 chunks of 64 inputs, a and b: 8 KB that stay in L1), then every token
 * tile of the call passes it (two at once: C 0-3, A 4-5, B 6-7), and after each block the C tiles
 * go into the float sums of the strip, s += d * (float)acc_b per row and token (q6_step's two IEEE
 * operations, no fused multiply-add), rows x tokens as the tiles hold them; at the end of the strip
 * s / x_scale (q6_logit) leaves token-major through the shared transpose. The same bits as
 * bn_head_rows_q6_scalar. One token, fewer than Q6_AMX_MIN_TOKENS, and rows past the last whole
 * 16 take the VNNI path. */
#define Q6_AMX_MIN_TOKENS 7
#define Q6_AMX_STACK_BYTES (130 * 1024)

/* The a and b parts of one row's block, chunk c (inputs 64c..64c+63) at ta / tb + 1024 c, one A
 * tile row each, in input order, here with w = 64 a + b, a = floor(w / 64) in [-64, 63] and b = w & 63.
 * Only the low 6 bits of each code byte are made exact: q mod 64 = u ^ 32 (bit 5 flipped in hi's
 * fields, 0xaa), lo's nibble in bits 3:0 and hi's field in bits 5:4 of a bit select; bits 7:6
 * are left as they fall. In int16 words (even inputs in the low bytes, odd in the high),
 * x = 1024 q is exact from those 6 bits (a shift that puts bit 5 in the sign), so
 * a = vpmulhw(1024 q, sc) = floor(q sc / 64), and b = (q sc) & 63 is the low 6 bits of vpmullw
 * (the even inputs' low byte of u6 * sc, the odd inputs' high byte of 256 u6 * sc: u6 = q mod
 * 64 gives the same product mod 64). */
AMX_HEAD_TARGET static inline __attribute__((always_inline)) void q6_amx_split_block(const bn_q6_block *blk,
                                                                                   int8_t *ta, int8_t *tb) {
    const __m512i lane = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18,
                                                            17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           3); /* the 128-bit lane of each word: 16 inputs, one scale */
    const __m512i half = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(1), 1); /* 0 | 1 per word */
    const __m512i lo_shift = _mm512_slli_epi16(half, 2);                                    /* 0 | 4 */
    /* hi's field f = 2 (c % 2) + half to bits 5:4: left 4 | 2 (c even), right 0 | 2 (c odd) */
    const __m512i hi_left = _mm512_sub_epi16(_mm512_set1_epi16(4), _mm512_add_epi16(half, half));
    const __m512i hi_right = _mm512_add_epi16(half, half);
    const __m512i sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)blk->sc)));
    const __m512i nibble = _mm512_set1_epi8(15), odd6 = _mm512_set1_epi16(0x3f00), even6 = _mm512_set1_epi16(0x3f);
    const __mmask64 odd = 0xaaaaaaaaaaaaaaaaull;
    for (int c = 0; c < 4; c++) {
        const __m512i hi = _mm512_xor_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->hi + 32 * (c / 2)))),
                                            _mm512_set1_epi8((char)0xaa));
        const __m512i lo = _mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->lo + 32 * c))),
                                             lo_shift);
        const __m512i q6 = _mm512_ternarylogic_epi32(lo, c % 2 ? _mm512_srlv_epi16(hi, hi_right) : _mm512_sllv_epi16(hi, hi_left),
                                                     nibble, 0xe4); /* bits 5:0: q mod 64 */
        const __m512i sv = _mm512_permutexvar_epi16(_mm512_add_epi16(lane, _mm512_set1_epi16((short)(4 * c))), sc);
        const __m512i uo = _mm512_and_si512(q6, odd6); /* 256 (q mod 64) of the odd inputs */
        const __m512i ae = _mm512_mulhi_epi16(_mm512_slli_epi16(q6, 10), sv), ao = _mm512_mulhi_epi16(_mm512_slli_epi16(uo, 2), sv);
        _mm512_store_si512(ta + 1024 * c, _mm512_mask_blend_epi8(odd, ae, _mm512_bslli_epi128(ao, 1)));
        _mm512_store_si512(tb + 1024 * c, _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_mullo_epi16(q6, sv), even6),
                                                                   _mm512_mullo_epi16(uo, sv), odd6, 0xf8));
    }
}

/* s[i][n] += d[i] * (float)(64 ca[i][n] + cb[i][n]): q6_step per row i and token n */
AMX_HEAD_TARGET static inline void q6_amx_accumulate(const int32_t *ca, const int32_t *cb, const float *d, float *s) {
    for (int i = 0; i < 16; i++) {
        const __m512i acc = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(ca + 16 * i), 6),
                                             _mm512_load_si512(cb + 16 * i));
        _mm512_store_ps(s + 16 * i, _mm512_add_ps(_mm512_load_ps(s + 16 * i),
                                                  _mm512_mul_ps(_mm512_set1_ps(d[i]), _mm512_cvtepi32_ps(acc))));
    }
}

/* the logits of rows r..r+15 and tokens t.. from their sums s[16][16] (rows x tokens): q6_logit's
 * division, then a token's 16 rows at once */
AMX_HEAD_TARGET static void q6_amx_store(const bn_head_job *j, int r, int t, const float *s) {
    const int tokens = j->m - t < 16 ? j->m - t : 16;
    const __m512 hs = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), (__mmask16)((1u << tokens) - 1), j->hscale + t);
    int32_t out[256] __attribute__((aligned(64)));
    for (int i = 0; i < 16; i++) _mm512_store_ps((float *)out + 16 * i, _mm512_div_ps(_mm512_load_ps(s + 16 * i), hs));
    __m512i col[16];
    bn_amx_tile_columns(out, col);
    for (int n = 0; n < tokens; n++) _mm512_storeu_ps(j->y + (size_t)(t + n) * j->y_stride + r, _mm512_castsi512_ps(col[n]));
}

/* rows ra..ra+15's block b split into buf (q6_amx_split_block) and their d into d; with next, as
 * many bytes of the next strip read ahead, in order (a strip is 16 * nb consecutive blocks), and
 * with next2 those of the strip after it into L2 (decode-sized steps split a strip faster than
 * memory delivers it) */
AMX_HEAD_TARGET static inline void q6_amx_split_strip(const bn_q6_block *w, int nb, int b, const char *next,
                                                      const char *next2, int8_t *buf, float *d) {
    for (int i = 0; i < 16; i++) {
        const bn_q6_block *blk = w + (size_t)i * nb + b;
        if (next)
            for (int line = 0; line < 4; line++)
                _mm_prefetch(next + ((size_t)b * 16 + i) * sizeof(bn_q6_block) + 64 * line, _MM_HINT_T0);
        if (next2)
            for (int line = 0; line < 4; line++)
                _mm_prefetch(next2 + ((size_t)b * 16 + i) * sizeof(bn_q6_block) + 64 * line, _MM_HINT_T1);
        d[i] = _cvtsh_ss(blk->d);
        q6_amx_split_block(blk, buf + 64 * i, buf + 4096 + 64 * i);
    }
}

#define Q6_AMX_L2_AHEAD_TOKENS 16
AMX_HEAD_TARGET void bn_head_rows_q6_amx(const bn_head_job *j, int r0, int r1) {
    const int nb = j->k / BN_Q6_BLOCK_K, nc = j->k / 64, tiles = (j->m + 15) / 16;
    const int strips_end = r0 + (r1 - r0) / 16 * 16;
    if (j->m < Q6_AMX_MIN_TOKENS || nb == 0 || strips_end == r0) { /* few tokens, fewer than 16 rows */
        bn_head_rows_q6_avx512vnni(j, r0, r1);
        return;
    }
    /* the tokens' B tiles (bn_amx_tokens_to_tiles), then the strip's float sums: a batched decode
     * step's (up to 32 tokens of up to 4096 inputs) on the stack, more from the heap */
    const size_t bytes = (size_t)tiles * nc * 1024 + (size_t)tiles * 1024;
    int8_t stack[bytes <= Q6_AMX_STACK_BYTES ? bytes : 64] __attribute__((aligned(64)));
    int8_t *xa = bytes <= Q6_AMX_STACK_BYTES ? stack : aligned_alloc(64, bytes);
    if (!xa) { /* no memory */
        bn_head_rows_q6_avx512vnni(j, r0, r1);
        return;
    }
    float *sums = (float *)(xa + (size_t)tiles * nc * 1024); /* [tiles][16 rows][16 tokens] */
    bn_amx_tokens_to_tiles(j->hq, j->m, j->k, xa);
    /* two blocks' splits, one multiplied while the next is split: chunk c's a tile at 1024 c, its
     * b tile at 4096 + 1024 c */
    int8_t split[2][8192] __attribute__((aligned(64)));
    int32_t ca[256] __attribute__((aligned(64))), cb[256] __attribute__((aligned(64)));
    float d[2][16];
    bn_amx_configure();
    const bn_q6_block *rows = (const bn_q6_block *)j->w;
    int cur = 0;
    q6_amx_split_strip(rows + (size_t)r0 * nb, nb, 0, NULL, NULL, split[0], d[0]);
    for (int ra = r0; ra < strips_end; ra += 16) {
        const bn_q6_block *w = rows + (size_t)ra * nb;
        const int more = ra + 16 < strips_end;
        const char *ahead2 = j->m <= Q6_AMX_L2_AHEAD_TOKENS && ra + 32 < strips_end ? (const char *)(w + 32 * nb) : NULL;
        memset(sums, 0, (size_t)tiles * 1024);
        for (int b = 0; b < nb; b++, cur ^= 1) {
            for (int T = 0; T < tiles; T += 2) {
                const int two_tiles = T + 1 < tiles;
                const int8_t *b0 = xa + ((size_t)T * nc + 4 * b) * 1024, *b1 = b0 + (size_t)nc * 1024;
                const int8_t *a = split[cur];
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int c = 0; c < 4; c++) {
                    _tile_loadd(4, a + 1024 * c, 64);
                    _tile_loadd(5, a + 4096 + 1024 * c, 64);
                    _tile_loadd(6, b0 + 1024 * c, 64);
                    _tile_dpbssd(0, 4, 6);
                    _tile_dpbssd(1, 5, 6);
                    if (two_tiles) {
                        _tile_loadd(7, b1 + 1024 * c, 64);
                        _tile_dpbssd(2, 4, 7);
                        _tile_dpbssd(3, 5, 7);
                    }
                }
                /* the tiles' products take longer than their issue: the next block (or the next
                 * strip's first) is split meanwhile, into the other buffer */
                if (T + 2 >= tiles) {
                    if (b + 1 < nb)
                        q6_amx_split_strip(w, nb, b + 1, more ? (const char *)(w + 16 * nb) : NULL, ahead2, split[cur ^ 1],
                                           d[cur ^ 1]);
                    else if (more)
                        q6_amx_split_strip(w + 16 * nb, nb, 0, NULL, NULL, split[cur ^ 1], d[cur ^ 1]);
                }
                _tile_stored(0, ca, 64);
                _tile_stored(1, cb, 64);
                q6_amx_accumulate(ca, cb, d[cur], sums + 256 * T);
                if (two_tiles) {
                    _tile_stored(2, ca, 64);
                    _tile_stored(3, cb, 64);
                    q6_amx_accumulate(ca, cb, d[cur], sums + 256 * (T + 1));
                }
            }
        }
        for (int T = 0; T < tiles; T++) q6_amx_store(j, ra, 16 * T, sums + 256 * T);
    }
    _tile_release();
    if (xa != stack) free(xa);
    if (strips_end < r1) bn_head_rows_q6_avx512vnni(j, strips_end, r1);
}
#endif

#if BN_ARM64
/* q4 rows on NEON: codes minus 8 are signed bytes, and widening multiplies give the half-block
 * sums (pairs of products up to 2 * 8 * 128 fit int16), scaled by sub in int32 */
static int32_t q4_dot_neon(const bn_q4_block *b, const int8_t *x, int k) {
    const uint8x16_t nibble = vdupq_n_u8(15);
    const int8x16_t eight = vdupq_n_s8(8);
    int32x4_t acc = vdupq_n_s32(0);
    for (int i = 0; i < k / 64; i++, b++, x += 64) {
        uint8x16_t raw[2] = {vld1q_u8(b->nib), vld1q_u8(b->nib + 16)};
        for (int half = 0; half < 2; half++) {
            int16x8_t p = vdupq_n_s16(0);
            for (int c = 0; c < 2; c++) {
                uint8x16_t u = half ? vshrq_n_u8(raw[c], 4) : vandq_u8(raw[c], nibble);
                int8x16_t q = vsubq_s8(vreinterpretq_s8_u8(u), eight), xv = vld1q_s8(x + 32 * half + 16 * c);
                p = vaddq_s16(p, vmlal_high_s8(vmull_s8(vget_low_s8(q), vget_low_s8(xv)), q, xv));
            }
            acc = vmlaq_n_s32(acc, vpaddlq_s16(p), b->sub[half]);
        }
    }
    return vaddvq_s32(acc);
}

void bn_head_rows_q4_neon(const bn_head_job *j, int r0, int r1) {
    for (int t = 0; t < j->m; t++)
        for (int r = r0; r < r1; r++) {
            const bn_q4_block *w = (const bn_q4_block *)j->w + (size_t)r * (j->k / BN_Q4_BLOCK_K);
            j->y[(size_t)t * j->y_stride + r] = i8_logit(j, t, r, q4_dot_neon(w, j->hq + (size_t)t * j->k, j->k));
        }
}

/* q6 rows on NEON, one 16-input group at a time: its codes minus 32 are signed bytes, widening
 * multiplies give pair sums (|.| <= 2 * 32 * 128, inside int16), and the group's sc scales them
 * in int32; block totals go into the float sum as the scalar path adds them */
static int32_t q6_block_dot_neon(const bn_q6_block *b, const int8_t *x) {
    const uint8x16_t nibble = vdupq_n_u8(15), three = vdupq_n_u8(3);
    const int8x16_t thirty_two = vdupq_n_s8(32);
    int32x4_t acc = vdupq_n_s32(0);
    for (int g = 0; g < 16; g++) {
        /* inputs 16g..16g+15: bytes 16(g%2).. of lo's 32-byte group g/4 (low nibbles for g%4 < 2)
         * and of hi's group g/8, field (g%8)/2 */
        uint8x16_t lo = vld1q_u8(b->lo + 32 * (g / 4) + 16 * (g % 2));
        uint8x16_t hi = vld1q_u8(b->hi + 32 * (g / 8) + 16 * (g % 2));
        lo = g % 4 < 2 ? vandq_u8(lo, nibble) : vshrq_n_u8(lo, 4);
        hi = vandq_u8(vshlq_u8(hi, vdupq_n_s8((int8_t)(-2 * (g % 8 / 2)))), three);
        int8x16_t q = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, vshlq_n_u8(hi, 4))), thirty_two);
        int8x16_t xv = vld1q_s8(x + 16 * g);
        int16x8_t p = vmlal_high_s8(vmull_s8(vget_low_s8(q), vget_low_s8(xv)), q, xv);
        acc = vmlaq_n_s32(acc, vpaddlq_s16(p), b->sc[g]);
    }
    return vaddvq_s32(acc);
}

void bn_head_rows_q6_neon(const bn_head_job *j, int r0, int r1) {
    const int nb = j->k / BN_Q6_BLOCK_K;
    for (int t = 0; t < j->m; t++)
        for (int r = r0; r < r1; r++) {
            const bn_q6_block *w = (const bn_q6_block *)j->w + (size_t)r * nb;
            const int8_t *x = j->hq + (size_t)t * j->k;
            float s = 0.0f;
            for (int b = 0; b < nb; b++)
                s = q6_step(s, vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(w[b].d))), 0),
                            q6_block_dot_neon(w + b, x + 256 * b));
            j->y[(size_t)t * j->y_stride + r] = q6_logit(j, t, s);
        }
}

void bn_head_rows_f16_neon(const bn_head_job *j, int r0, int r1) {
    for (int t = 0; t < j->m; t++)
        for (int r = r0; r < r1; r++) {
            const uint16_t *w = (const uint16_t *)j->w + (size_t)r * j->k;
            const float *h = j->h + (size_t)t * j->k;
            const int k4 = j->k & ~3;
            float32x4_t acc = vdupq_n_f32(0.0f);
            for (int k = 0; k < k4; k += 4)
                acc = vfmaq_f32(acc, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(w + k))), vld1q_f32(h + k));
            float s = vaddvq_f32(acc);
            for (int k = k4; k < j->k; k++) s += bn_f16_to_f32(w[k]) * h[k];
            j->y[(size_t)t * j->y_stride + r] = s;
        }
}

void bn_head_rows_i8_neon(const bn_head_job *j, int r0, int r1) {
    for (int t = 0; t < j->m; t++)
        for (int r = r0; r < r1; r++) {
            const int8_t *w = (const int8_t *)j->w + (size_t)r * j->k, *h = j->hq + (size_t)t * j->k;
            const int k16 = j->k & ~15;
            int32x4_t acc = vdupq_n_s32(0);
            for (int k = 0; k < k16; k += 16) {
                int8x16_t wv = vld1q_s8(w + k), hv = vld1q_s8(h + k);
                acc = vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(wv), vget_low_s8(hv)), wv, hv));
            }
            int32_t s = vaddvq_s32(acc);
            for (int k = k16; k < j->k; k++) s += w[k] * h[k];
            j->y[(size_t)t * j->y_stride + r] = i8_logit(j, t, r, s);
        }
}
#endif

typedef struct {
    bn_head_rows_fn fn;
    const bn_head_job *job;
    int rows;
} head_task;

static void head_worker(void *ctx, int chunk, int n_chunks, int ith) {
    (void)ith;
    const head_task *ht = ctx;
    int r0, r1;
    bn_split(ht->rows, chunk, n_chunks, 16, &r0, &r1);
    if (r0 < r1) ht->fn(ht->job, r0, r1);
}

void bn_head_run(bn_pool *pool, bn_head_rows_fn fn, const bn_head_job *job, int rows) {
    head_task ht = {fn, job, rows};
    bn_pool_run(pool, head_worker, &ht, bn_pool_chunks(pool, rows, 256));
}

int bn_head_logits(bn_pool *pool, int isa, int type, const void *w, const float *wscale, int n, int k,
                   const float *h, int m, float *y) {
    const bn_kernels *kern = bn_kernels_for(isa);
    const bn_head_traits *traits = bn_head_type(type);
    if (!kern || !traits || n < 1 || k < 1 || m < 1) return -1;
    const int kq = bn_head_k(type, k);
    int8_t *hq = NULL;
    float *hscale = NULL;
    int32_t *hsum = NULL;
    if (traits->quantized) {
        if (posix_memalign((void **)&hq, 64, (size_t)m * kq)) hq = NULL; /* aligned: see zalloc in model.c */
        hscale = malloc(sizeof(float) * m);
        hsum = malloc(sizeof(int32_t) * m);
        if (!hq || !hscale || !hsum) {
            free(hq), free(hscale), free(hsum);
            return -1;
        }
        kern->quantize(h, m, k, kq, hq, hscale, hsum);
    }
    bn_head_job job = {.w = w, .wscale = wscale, .k = kq, .h = h, .hq = hq, .hscale = hscale,
                       .m = m, .y = y, .y_stride = n};
    bn_head_run(pool, kern->head[type], &job, n);
    free(hq), free(hscale), free(hsum);
    return 0;
}
