/* Ternary x int8 matrix kernels over the i2_k128 and tq1_k640 layouts (bitnet.h), one per ISA and
 * layout (dispatch.c picks one).
 *
 * Each SIMD kernel computes exactly what bn_i2_rows_scalar computes: sum_k q_k * x_k in int32 with
 * q = T + 1 in {0, 1, 2}, minus sum_k x_k. Codes are unsigned and activations signed, which is
 * the operand order of x86's u8 x s8 multiply-adds (vpmaddubsw, vpdpbusd); ARM's sdot takes the
 * codes as s8 since 0..2 fit.
 *
 * Overflow bounds: a vpmaddubsw lane adds two products |q*x| <= 2*128, so <= 512; four of them
 * per block sum to <= 2048, and eight blocks to <= 16384, inside int16; then they widen to int32.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if BN_X86
#include <immintrin.h>
#endif
#if BN_ARM64
#include <arm_neon.h>
#endif

#define BLOCK BN_BLOCK_K
#define BLOCK_BYTES BN_BLOCK_BYTES
#define TQ1_BLOCK BN_TQ1_BLOCK_K
#define TQ1_BLOCK_BYTES BN_TQ1_BLOCK_BYTES

/* ---- scalar reference ------------------------------------------------------------------ */

/* sum q*x over nb i2_k128 blocks */
static int32_t i2_blocks_dot_scalar(const uint8_t *w, const int8_t *x, int nb) {
    int32_t sum = 0;
    for (int b = 0; b < nb; b++)
        for (int i = 0; i < 4; i++)
            for (int jj = 0; jj < BLOCK_BYTES; jj++)
                sum += ((w[b * BLOCK_BYTES + jj] >> (2 * i)) & 3) * x[b * BLOCK + 32 * i + jj];
    return sum;
}

void bn_i2_rows_scalar(const bn_i2_job *j, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < j->m; t++)
            bn_i2_store(j, t, r, i2_blocks_dot_scalar(j->w + (size_t)r * (j->kp / 4), j->xq + (size_t)t * j->kp,
                                                      j->kp / BLOCK));
}

/* tq1_k640: the code i (0..4) of a byte, by bitnet.h's definition */
static inline int tq1_code(uint8_t b, int i) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    return (3 * (uint8_t)(b * pow3[i])) >> 8;
}

/* A layout's row: kp / big_k blocks of big_bytes, then i2_k128 blocks for the rest of kp. */
static const struct {
    int big_k, big_bytes;
} LAYOUTS[BN_LAYOUT_COUNT] = {
    [BN_LAYOUT_I2] = {BLOCK, BLOCK_BYTES},
    [BN_LAYOUT_TQ1] = {TQ1_BLOCK, TQ1_BLOCK_BYTES},
};

size_t bn_ternary_row_bytes(int layout, int kp) {
    if (layout < 0 || layout >= BN_LAYOUT_COUNT || kp < 0 || kp % BLOCK) return 0;
    const int big = LAYOUTS[layout].big_k;
    return (size_t)(kp / big) * LAYOUTS[layout].big_bytes + (size_t)(kp % big / BLOCK) * BLOCK_BYTES;
}

void bn_tq1_rows_scalar(const bn_i2_job *j, int r0, int r1) {
    const int nb = j->kp / TQ1_BLOCK;
    const size_t row = bn_ternary_row_bytes(BN_LAYOUT_TQ1, j->kp);
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = j->w + (size_t)r * row;
        for (int t = 0; t < j->m; t++) {
            const int8_t *x = j->xq + (size_t)t * j->kp;
            int32_t sum = 0;
            for (int b = 0; b < nb; b++)
                for (int i = 0; i < 5; i++)
                    for (int jj = 0; jj < TQ1_BLOCK_BYTES; jj++)
                        sum += tq1_code(wr[b * TQ1_BLOCK_BYTES + jj], i) * x[b * TQ1_BLOCK + 128 * i + jj];
            sum += i2_blocks_dot_scalar(wr + (size_t)nb * TQ1_BLOCK_BYTES, x + (size_t)nb * TQ1_BLOCK,
                                        j->kp % TQ1_BLOCK / BLOCK);
            bn_i2_store(j, t, r, sum);
        }
    }
}

/* ---- x86: AVX2 ------------------------------------------------------------------------- */
#if BN_X86

/* One row against TN tokens over blocks [b0, b1), added to the int32 sums of the TN tokens: the four code
 * vectors of a block are unpacked once and reused. Block sums (|s| <= 2048) add up in int16 for up to 16 blocks
 * (each lane's pair sums lie in [-512, 508], so 16 blocks stay in [-32768, 32512]), then widen to int32.
 * Measured on a Zen 3 EPYC (AVX2, 1 thread, 64 tokens, 2B4T shapes): about 107 G MAC/s, 57% of
 * what vpmaddubsw alone issues there (188 G MAC/s) and about 75% of a loop of vpmaddubsw + vpaddw
 * pairs, the least any exact u8 x s8 dot needs on AVX2. Tried there and slower (0.8-0.95x, gcc
 * and clang alike): codes unpacked once per row tile into an L1 scratch, then register tiles of
 * 1x8, 2x4, 3x3, 3x4 and 4x2 rows x tokens; the decode GEMV's shift-saving mask. 8 tokens a row
 * was slower too until each token's int16 sum was pinned to a register (the empty asm): gcc had
 * reassociated the adds across tokens and blocks and spilled. Pinned, 8 tokens a row decode each
 * block once for 8 (session 9, 1 thread, 6912x2560, medians of 6 interleaved runs against 4
 * tokens a row: 16 tokens 2.44 -> 2.37 ms, 8 tokens 1.24 -> 1.23 ms; 64 tokens alike). */
/* an i2_k128 block's 128 codes as four vectors: c[i] holds inputs 32i..32i+31 (bits 2i, 2i+1 of each byte) */
AVX2_TARGET static inline __attribute__((always_inline)) void i2_codes_avx2(const uint8_t *block, __m256i c[4]) {
    const __m256i mask = _mm256_set1_epi8(3), w = _mm256_loadu_si256((const __m256i *)block);
    c[0] = _mm256_and_si256(w, mask);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(w, 2), mask);
    c[2] = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
    c[3] = _mm256_and_si256(_mm256_srli_epi16(w, 6), mask);
}

AVX2_TARGET static inline __attribute__((always_inline)) void i2_span_avx2(const bn_i2_job *j, int r, int t0,
                                                                         const int TN, int b0, int b1,
                                                                         __m256i *sums) {
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *wr = j->w + (size_t)r * (j->kp / 4);
    const int8_t *x = j->xq + (size_t)t0 * j->kp;
    __m256i acc16[8];
    for (int t = 0; t < TN; t++) acc16[t] = _mm256_setzero_si256();
    for (int b = b0; b < b1; b++) {
        __m256i c[4];
        i2_codes_avx2(wr + b * BLOCK_BYTES, c);
        for (int t = 0; t < TN; t++) {
            const int8_t *xb = x + (size_t)t * j->kp + b * BLOCK;
            __m256i s = _mm256_maddubs_epi16(c[0], _mm256_loadu_si256((const __m256i *)xb));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c[1], _mm256_loadu_si256((const __m256i *)(xb + 32))));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c[2], _mm256_loadu_si256((const __m256i *)(xb + 64))));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c[3], _mm256_loadu_si256((const __m256i *)(xb + 96))));
            acc16[t] = _mm256_add_epi16(acc16[t], s);
            __asm__("" : "+x"(acc16[t])); /* one register per token's sum (see the note above) */
        }
    }
    for (int t = 0; t < TN; t++) sums[t] = _mm256_add_epi32(sums[t], _mm256_madd_epi16(acc16[t], ones));
}

/* One whole row against TN tokens, in spans of 8 blocks, the sums in registers; SPAN is a span kernel with
 * i2_span_avx2's signature (the AVX2 and AVX-VNNI GEMMs share this row loop and the tilings below). */
#define I2_ROW_256(NAME, TARGET, SPAN)                                                                            \
    TARGET static inline __attribute__((always_inline)) void NAME(const bn_i2_job *j, int r, int t0, const int TN) { \
        const int nb = j->kp / BLOCK;                                                                             \
        __m256i acc[8];                                                                                           \
        for (int t = 0; t < TN; t++) acc[t] = _mm256_setzero_si256();                                            \
        for (int b0 = 0; b0 < nb; b0 += 8) SPAN(j, r, t0, TN, b0, b0 + 8 < nb ? b0 + 8 : nb, acc);                \
        for (int t = 0; t < TN; t++) bn_i2_store(j, t0 + t, r, bn_hsum_epi32_avx2(acc[t]));                     \
    }
I2_ROW_256(i2_row_avx2, AVX2_TARGET, i2_span_avx2)

/* Rows are taken in tiles of about 16 KB of weights; each tile meets every group of tokens while
 * it sits in L1, so the activations stream from L2 once per tile, not once per row. */
static inline int row_tile(const bn_i2_job *j) {
    int rows = 16384 / (j->kp / 4);
    return j->m == 1 ? 1 << 30 : rows < 1 ? 1 : rows;
}

#define I2_ROWS_TOKENS(NAME, TARGET, ROW)                                         \
    TARGET static void NAME(const bn_i2_job *j, int r0, int r1) {                  \
        const int tile = row_tile(j);                                              \
        for (int ta = r0; ta < r1; ta += tile) {                                   \
            int tb = r1 - ta < tile ? r1 : ta + tile;                              \
            int t = 0;                                                             \
            for (; t + 4 <= j->m; t += 4)                                          \
                for (int r = ta; r < tb; r++) ROW(j, r, t, 4);                     \
            for (int r = ta; r < tb; r++) switch (j->m - t) {                      \
                case 3: ROW(j, r, t, 3); break;                                    \
                case 2: ROW(j, r, t, 2); break;                                    \
                case 1: ROW(j, r, t, 1); break;                                    \
                }                                                                  \
        }                                                                          \
    }

/* Long rows (kp > SPAN_MIN_KP) go in spans of SPAN_BLOCKS blocks: eight tokens' whole rows of
 * activations no longer fit in L1 beside the weights (the 2B4T down projection's 6912 inputs make
 * 55 KB), so the whole-row loop streamed them from L2 for every weight row. A tile of SPAN_ROWS rows
 * instead meets eight tokens one span at a time (16 KB of activations, 8 KB of weights, their int32
 * sums in 4 KB of stack), and the first group of tokens reads the next tile's weights ahead: a span
 * of each row is a short strided read the hardware prefetchers miss. Measured on a Zen 4 EPYC (AVX2,
 * 1 thread, 2560 x 6912, weights in L3, medians of 3): 16 tokens 3.73 -> 2.41 ms, 64 tokens 14.2 ->
 * 9.7 (120 G MAC/s, the short rows' rate); without the read-ahead 3.0 ms. At 4096 inputs (32 KB of
 * activations) and fewer, whole rows stay faster (4-10%: a span's setup and its sums in memory). */
#define SPAN_MIN_KP 4096
#define SPAN_BLOCKS 16 /* the int16 bound of i2_span_avx2 */
#define SPAN_ROWS 16
#define I2_ROWS_SPANS(NAME, TARGET, SPAN)                                                                         \
    TARGET static void NAME(const bn_i2_job *j, int r0, int r1) {                                                  \
        const int nb = j->kp / BLOCK;                                                                             \
        const size_t row = j->kp / 4;                                                                             \
        for (int ta = r0; ta < r1; ta += SPAN_ROWS) {                                                             \
            const int tb = r1 - ta < SPAN_ROWS ? r1 : ta + SPAN_ROWS;                                             \
            for (int t0 = 0; t0 < j->m; t0 += 8) {                                                                \
                const int tn = j->m - t0 < 8 ? j->m - t0 : 8;                                                     \
                __m256i sums[SPAN_ROWS][8];                                                                       \
                for (int r = 0; r < tb - ta; r++)                                                                 \
                    for (int t = 0; t < tn; t++) sums[r][t] = _mm256_setzero_si256();                             \
                for (int b0 = 0; b0 < nb; b0 += SPAN_BLOCKS) {                                                    \
                    const int b1 = nb - b0 < SPAN_BLOCKS ? nb : b0 + SPAN_BLOCKS;                                 \
                    for (int r = ta; r < tb; r++) {                                                               \
                        if (t0 == 0 && r + SPAN_ROWS < r1)                                                        \
                            for (int at = b0 * BLOCK_BYTES; at < b1 * BLOCK_BYTES; at += 64)                      \
                                _mm_prefetch((const char *)j->w + (r + SPAN_ROWS) * row + at, _MM_HINT_T0);       \
                        switch (tn) { /* constant widths: registers */                                            \
                        case 8: SPAN(j, r, t0, 8, b0, b1, sums[r - ta]); break;                                   \
                        case 7: SPAN(j, r, t0, 7, b0, b1, sums[r - ta]); break;                                   \
                        case 6: SPAN(j, r, t0, 6, b0, b1, sums[r - ta]); break;                                   \
                        case 5: SPAN(j, r, t0, 5, b0, b1, sums[r - ta]); break;                                   \
                        case 4: SPAN(j, r, t0, 4, b0, b1, sums[r - ta]); break;                                   \
                        case 3: SPAN(j, r, t0, 3, b0, b1, sums[r - ta]); break;                                   \
                        case 2: SPAN(j, r, t0, 2, b0, b1, sums[r - ta]); break;                                   \
                        case 1: SPAN(j, r, t0, 1, b0, b1, sums[r - ta]); break;                                   \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
                for (int r = ta; r < tb; r++)                                                                     \
                    for (int t = 0; t < tn; t++) bn_i2_store(j, t0 + t, r, bn_hsum_epi32_avx2(sums[r - ta][t])); \
            }                                                                                                     \
        }                                                                                                         \
    }
I2_ROWS_SPANS(i2_rows_avx2_spans, AVX2_TARGET, i2_span_avx2)

/* Rows in tiles of about 16 KB of weights (row_tile), each tile meeting every group of eight
 * tokens while it sits in L1; the last tokens go in one narrower group; long rows go in spans (SPANS). */
#define I2_ROWS_TOKENS8(NAME, TARGET, ROW, SPANS)                                                                  \
    TARGET static void NAME(const bn_i2_job *j, int r0, int r1) {                                                  \
        if (j->kp > SPAN_MIN_KP) {                                                                                \
            SPANS(j, r0, r1);                                                                                     \
            return;                                                                                               \
        }                                                                                                         \
        const int tile = row_tile(j);                                                                             \
        for (int ta = r0; ta < r1; ta += tile) {                                                                  \
            int tb = r1 - ta < tile ? r1 : ta + tile;                                                             \
            int t = 0;                                                                                            \
            for (; t + 8 <= j->m; t += 8)                                                                         \
                for (int r = ta; r < tb; r++) ROW(j, r, t, 8);                                                    \
            for (int r = ta; r < tb; r++) switch (j->m - t) { /* constant widths: registers */                   \
                case 7: ROW(j, r, t, 7); break;                                                                   \
                case 6: ROW(j, r, t, 6); break;                                                                   \
                case 5: ROW(j, r, t, 5); break;                                                                   \
                case 4: ROW(j, r, t, 4); break;                                                                   \
                case 3: ROW(j, r, t, 3); break;                                                                   \
                case 2: ROW(j, r, t, 2); break;                                                                   \
                case 1: ROW(j, r, t, 1); break;                                                                   \
                }                                                                                                 \
        }                                                                                                         \
    }
I2_ROWS_TOKENS8(i2_rows_avx2_tokens, AVX2_TARGET, i2_row_avx2, i2_rows_avx2_spans)

/* Decode (one token), one row at a time: the weights stream as one sequential read (measured
 * faster here than several rows in flight, which splits the read into strided streams). Fewer
 * shifts than the token path: codes 0 and 2 of a byte are masked in place (w & 3, (w >> 4) & 3),
 * codes 1 and 3 are masked without shifting them down (w & 12, (w >> 4) & 12), so they come out
 * times 4 and go to a second accumulator, and the int32 total is 4 * the dot product (divided
 * back exactly at the end). Bounds over 8 blocks: the plain accumulator |sum| <= 8 * 2 * 2 *
 * (2 * 128) = 8192; the times-4 one lies in [-8 * 2 * 2 * 8 * 128, 8 * 2 * 2 * 8 * 127] =
 * [-32768, 32512], inside int16 (and every vpmaddubsw pair sum within +-2048, unsaturated). */
AVX2_TARGET static inline __attribute__((always_inline)) void gemv_block_avx2(const uint8_t *wb, const int8_t *xb,
                                                                            __m256i *lo, __m256i *hi) {
    const __m256i mask = _mm256_set1_epi8(3), mask4 = _mm256_set1_epi8(12);
    __m256i w = _mm256_loadu_si256((const __m256i *)wb), w4 = _mm256_srli_epi16(w, 4);
    *lo = _mm256_add_epi16(*lo, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w, mask),
                                                                      _mm256_loadu_si256((const __m256i *)xb)),
                                                 _mm256_maddubs_epi16(_mm256_and_si256(w4, mask),
                                                                      _mm256_loadu_si256((const __m256i *)(xb + 64)))));
    *hi = _mm256_add_epi16(*hi, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w, mask4),
                                                                      _mm256_loadu_si256((const __m256i *)(xb + 32))),
                                                 _mm256_maddubs_epi16(_mm256_and_si256(w4, mask4),
                                                                      _mm256_loadu_si256((const __m256i *)(xb + 96)))));
}

/* Blocks go in pairs with one prefetch per 64-byte line: a branch and a prefetch per block made
 * the loop long enough to bound it by instruction issue (measured +10% from L2 in pairs). The
 * prefetch runs a page ahead: the hardware prefetchers stop at 4 KB page boundaries, which is
 * where memory-mapped weights (BITNET_HUGEPAGES=0) end their pages (measured ~10% faster from DRAM
 * here in 4 KB pages, and no slower in huge pages). */
#define GEMV_PREFETCH 4096
AVX2_TARGET static inline int32_t i2_gemv_row_avx2(const bn_i2_job *j, int r) {
    const __m256i ones = _mm256_set1_epi16(1), fours = _mm256_set1_epi16(4);
    const int nb = j->kp / BLOCK;
    const uint8_t *w = j->w + (size_t)r * (j->kp / 4);
    const int8_t *x = j->xq;
    __m256i acc = _mm256_setzero_si256();
    for (int b0 = 0; b0 < nb; b0 += 8) {
        const int n = nb - b0 < 8 ? nb - b0 : 8;
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256(); /* codes 0,2 and 4 * codes 1,3 */
        int b = 0;
        for (; b + 2 <= n; b += 2, w += 2 * BLOCK_BYTES, x += 2 * BLOCK) {
            _mm_prefetch((const char *)w + GEMV_PREFETCH, _MM_HINT_T0);
            gemv_block_avx2(w, x, &lo, &hi);
            gemv_block_avx2(w + BLOCK_BYTES, x + BLOCK, &lo, &hi);
        }
        if (b < n) {
            gemv_block_avx2(w, x, &lo, &hi);
            w += BLOCK_BYTES, x += BLOCK;
        }
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(lo, fours), _mm256_madd_epi16(hi, ones)));
    }
    return bn_hsum_epi32_avx2(acc) / 4;
}

AVX2_TARGET void bn_i2_rows_avx2(const bn_i2_job *j, int r0, int r1) {
    if (j->m != 1) {
        i2_rows_avx2_tokens(j, r0, r1);
        return;
    }
    for (int r = r0; r < r1; r++) bn_i2_store(j, 0, r, i2_gemv_row_avx2(j, r));
}

/* ---- i2_k128 on AVX-VNNI --------------------------------------------------------------------
 * The AVX2 GEMM with vpdpbusd: each code vector times a token's activations goes straight into int32 sums, one
 * instruction where AVX2 needs vpmaddubsw and a vpaddw (and a widening every 16 blocks). A block's four products
 * go into two fresh sums (two chains of two) added to the token's total once, so that no chain of vpdpbusd
 * latencies runs through the whole row. Same tiling as AVX2 (I2_ROW_256, I2_ROWS_SPANS, I2_ROWS_TOKENS8); decode
 * is AVX2's GEMV with vpdpbusd (below). The autotune races both, GEMV and GEMM, against AVX2's on first use and keeps
 * the faster of each. Measured natively on a Xeon with AVX-VNNI (session 27, 1 thread, 6912 x 2560, `build/bench 1 7
 * kernel` against `1 1`, best of 5): 16, 32 and 64 tokens 2.37, 4.48 and 8.65 ms against AVX2's 2.81, 5.42 and 10.67
 * (1.19-1.23x); the GEMV alike (0.459 against 0.473 ms: it waits on memory). */
#if BN_HAVE_AVXVNNI
AVXVNNI_TARGET static inline __attribute__((always_inline)) void i2_span_avxvnni(const bn_i2_job *j, int r, int t0,
                                                                               const int TN, int b0, int b1,
                                                                               __m256i *sums) {
    const __m256i zero = _mm256_setzero_si256();
    const uint8_t *wr = j->w + (size_t)r * (j->kp / 4);
    const int8_t *x = j->xq + (size_t)t0 * j->kp;
    for (int b = b0; b < b1; b++) {
        __m256i c[4];
        i2_codes_avx2(wr + b * BLOCK_BYTES, c);
        for (int t = 0; t < TN; t++) {
            const int8_t *xb = x + (size_t)t * j->kp + b * BLOCK;
            __m256i p = bn_dpbusd_avxvnni(zero, c[0], _mm256_loadu_si256((const __m256i *)xb));
            __m256i q = bn_dpbusd_avxvnni(zero, c[2], _mm256_loadu_si256((const __m256i *)(xb + 64)));
            p = bn_dpbusd_avxvnni(p, c[1], _mm256_loadu_si256((const __m256i *)(xb + 32)));
            q = bn_dpbusd_avxvnni(q, c[3], _mm256_loadu_si256((const __m256i *)(xb + 96)));
            sums[t] = _mm256_add_epi32(sums[t], _mm256_add_epi32(p, q));
        }
    }
}
I2_ROW_256(i2_row_avxvnni, AVXVNNI_TARGET, i2_span_avxvnni)
I2_ROWS_SPANS(i2_rows_avxvnni_spans, AVXVNNI_TARGET, i2_span_avxvnni)
I2_ROWS_TOKENS8(i2_rows_avxvnni_tokens, AVXVNNI_TARGET, i2_row_avxvnni, i2_rows_avxvnni_spans)

/* Decode: AVX2's GEMV (gemv_block_avx2: codes 1 and 3 masked in place, so times 4, in a sum of their own) with
 * vpdpbusd. Each block's two products of a kind go into a fresh sum added to the running one, so the only chain
 * through the row is vpaddd's; no int16 bound, so no widening every 8 blocks. */
AVXVNNI_TARGET static inline __attribute__((always_inline)) void gemv_block_avxvnni(const uint8_t *wb, const int8_t *xb,
                                                                                  __m256i *lo, __m256i *hi) {
    const __m256i mask = _mm256_set1_epi8(3), mask4 = _mm256_set1_epi8(12), zero = _mm256_setzero_si256();
    __m256i w = _mm256_loadu_si256((const __m256i *)wb), w4 = _mm256_srli_epi16(w, 4);
    __m256i p = bn_dpbusd_avxvnni(zero, _mm256_and_si256(w, mask), _mm256_loadu_si256((const __m256i *)xb));
    __m256i q = bn_dpbusd_avxvnni(zero, _mm256_and_si256(w, mask4), _mm256_loadu_si256((const __m256i *)(xb + 32)));
    p = bn_dpbusd_avxvnni(p, _mm256_and_si256(w4, mask), _mm256_loadu_si256((const __m256i *)(xb + 64)));
    q = bn_dpbusd_avxvnni(q, _mm256_and_si256(w4, mask4), _mm256_loadu_si256((const __m256i *)(xb + 96)));
    *lo = _mm256_add_epi32(*lo, p);
    *hi = _mm256_add_epi32(*hi, q);
}

/* blocks in pairs with one prefetch per 64-byte line a page ahead, as i2_gemv_row_avx2 */
AVXVNNI_TARGET static inline int32_t i2_gemv_row_avxvnni(const bn_i2_job *j, int r) {
    const int nb = j->kp / BLOCK;
    const uint8_t *w = j->w + (size_t)r * (j->kp / 4);
    const int8_t *x = j->xq;
    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256(); /* codes 0,2 and 4 * codes 1,3 */
    int b = 0;
    for (; b + 2 <= nb; b += 2, w += 2 * BLOCK_BYTES, x += 2 * BLOCK) {
        _mm_prefetch((const char *)w + GEMV_PREFETCH, _MM_HINT_T0);
        gemv_block_avxvnni(w, x, &lo, &hi);
        gemv_block_avxvnni(w + BLOCK_BYTES, x + BLOCK, &lo, &hi);
    }
    if (b < nb) gemv_block_avxvnni(w, x, &lo, &hi);
    return bn_hsum_epi32_avx2(_mm256_add_epi32(_mm256_slli_epi32(lo, 2), hi)) / 4;
}

void bn_i2_rows_avxvnni(const bn_i2_job *j, int r0, int r1) {
    if (j->m != 1) {
        i2_rows_avxvnni_tokens(j, r0, r1);
        return;
    }
    for (int r = r0; r < r1; r++) bn_i2_store(j, 0, r, i2_gemv_row_avxvnni(j, r));
}
#endif

/* ---- tq1_k640 on AVX2 ---------------------------------------------------------------------
 * 32 bytes give five vectors of 32 codes (inputs 128i + 32c + 0..31 for code i). Code i is the top
 * of 3 * m_i with m_i = (b * 3^i) mod 256: q = [m_i >= 86] + [m_i >= 171]. AVX2 has no unsigned
 * byte compare, so the bytes are taken as s_i = m_i ^ 0x80 (signed: m_i - 128) and compared with
 * -43 and 42; s_{i+1} = 3 s_i (mod 256) since 3 is odd and 3 * 128 = 128 (mod 256): two byte
 * adds per code, no multiply. The compares give -1 masks, and q = -(mask1 + mask2).
 * Bounds: a vpmaddubsw pair sum is at most 2 * 2 * 128 = 512; a block's twenty add up to 10240,
 * inside int16, then widen to int32. */
AVX2_TARGET static inline __attribute__((always_inline)) void tq1_codes_avx2(__m256i w, __m256i q[5]) {
    const __m256i low = _mm256_set1_epi8(-43), high = _mm256_set1_epi8(42), zero = _mm256_setzero_si256();
    __m256i s = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
    for (int i = 0; i < 5; i++) {
        if (i) s = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
        q[i] = _mm256_sub_epi8(zero, _mm256_add_epi8(_mm256_cmpgt_epi8(s, low), _mm256_cmpgt_epi8(s, high)));
    }
}

/* sum q*x over nb i2_k128 blocks for one token: the end of a tq1_k640 row */
AVX2_TARGET static int32_t i2_blocks_dot_avx2(const uint8_t *w, const int8_t *x, int nb) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    for (int b = 0; b < nb; b++, w += BLOCK_BYTES, x += BLOCK) {
        __m256i v = _mm256_loadu_si256((const __m256i *)w), s = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++)
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2 * i), mask),
                                                         _mm256_loadu_si256((const __m256i *)(x + 32 * i))));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(s, ones));
    }
    return bn_hsum_epi32_avx2(acc);
}

/* One row against TN tokens: each 32 bytes are decoded once for the TN tokens. */
AVX2_TARGET static inline __attribute__((always_inline)) void tq1_row_avx2(const bn_i2_job *j, int r, int t0,
                                                                         const int TN) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int nb = j->kp / TQ1_BLOCK;
    const uint8_t *wr = j->w + (size_t)r * bn_ternary_row_bytes(BN_LAYOUT_TQ1, j->kp);
    const int8_t *x = j->xq + (size_t)t0 * j->kp;
    __m256i acc[4];
    for (int t = 0; t < TN; t++) acc[t] = _mm256_setzero_si256();
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = wr + (size_t)b * TQ1_BLOCK_BYTES;
        _mm_prefetch((const char *)wb + GEMV_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)wb + GEMV_PREFETCH + 64, _MM_HINT_T0);
        __m256i acc16[4];
        for (int t = 0; t < TN; t++) acc16[t] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i q[5];
            tq1_codes_avx2(_mm256_loadu_si256((const __m256i *)(wb + 32 * c)), q);
            for (int t = 0; t < TN; t++) {
                const int8_t *xb = x + (size_t)t * j->kp + (size_t)b * TQ1_BLOCK + 32 * c;
                __m256i s = _mm256_maddubs_epi16(q[0], _mm256_loadu_si256((const __m256i *)xb));
                for (int i = 1; i < 5; i++)
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q[i], _mm256_loadu_si256((const __m256i *)(xb + 128 * i))));
                acc16[t] = _mm256_add_epi16(acc16[t], s);
            }
        }
        for (int t = 0; t < TN; t++) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(acc16[t], ones));
    }
    for (int t = 0; t < TN; t++)
        bn_i2_store(j, t0 + t, r,
                    bn_hsum_epi32_avx2(acc[t]) + i2_blocks_dot_avx2(wr + (size_t)nb * TQ1_BLOCK_BYTES,
                                                                    x + (size_t)t * j->kp + (size_t)nb * TQ1_BLOCK,
                                                                    j->kp % TQ1_BLOCK / BLOCK));
}

I2_ROWS_TOKENS(tq1_rows_avx2_tokens, AVX2_TARGET, tq1_row_avx2)

/* decode: one row after another, one sequential stream, as the i2_k128 GEMV */
AVX2_TARGET void bn_tq1_rows_avx2(const bn_i2_job *j, int r0, int r1) {
    if (j->m != 1) {
        tq1_rows_avx2_tokens(j, r0, r1);
        return;
    }
    for (int r = r0; r < r1; r++) tq1_row_avx2(j, r, 0, 1);
}

/* ---- x86: AVX-512 ---------------------------------------------------------------------- */
/* A block's 32 bytes are broadcast to both halves of a zmm; per-word shifts of 0/2 (then 4/6)
 * give the codes of 64 consecutive inputs, matching one contiguous 64-byte activation load. */

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

#define I2_ROW_AVX512(NAME, TARGET, DOT)                                                                 \
    TARGET static inline __attribute__((always_inline)) void NAME(const bn_i2_job *j, int r, int t0,  \
                                                                  const int TN) {                     \
        const __m512i mask = _mm512_set1_epi8(3);                                                     \
        const __m512i sh01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);    \
        const __m512i sh23 = _mm512_add_epi16(sh01, _mm512_set1_epi16(4));                            \
        const int nb = j->kp / BLOCK;                                                                  \
        const uint8_t *wr = j->w + (size_t)r * (j->kp / 4);                                            \
        const int8_t *x = j->xq + (size_t)t0 * j->kp;                                                  \
        __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),     \
                          _mm512_setzero_si512()};                                                    \
        for (int b = 0; b < nb; b++) {                                                                 \
            __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(wr + b * BLOCK_BYTES))); \
            __m512i c01 = _mm512_and_si512(_mm512_srlv_epi16(w, sh01), mask);                         \
            __m512i c23 = _mm512_and_si512(_mm512_srlv_epi16(w, sh23), mask);                         \
            for (int t = 0; t < TN; t++) {                                                             \
                const int8_t *xb = x + (size_t)t * j->kp + b * BLOCK;                                  \
                acc[t] = DOT(acc[t], c01, _mm512_loadu_si512(xb));                                     \
                acc[t] = DOT(acc[t], c23, _mm512_loadu_si512(xb + 64));                                \
            }                                                                                          \
        }                                                                                              \
        for (int t = 0; t < TN; t++) bn_i2_store(j, t0 + t, r, _mm512_reduce_add_epi32(acc[t]));      \
    }

AVX512_TARGET static inline __m512i dot_maddubs512(__m512i acc, __m512i c, __m512i x) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(c, x), _mm512_set1_epi16(1)));
}
AVX512VNNI_TARGET static inline __m512i dot_vnni512(__m512i acc, __m512i c, __m512i x) {
    return _mm512_dpbusd_epi32(acc, c, x);
}

I2_ROW_AVX512(i2_row_avx512, AVX512_TARGET, dot_maddubs512)
I2_ROWS_TOKENS(i2_rows_avx512_tokens, AVX512_TARGET, i2_row_avx512)

/* out[i] = the sum of v[i]'s 16 int32 lanes for 8 vectors at once: 15 shuffles and 8 adds, against
 * 8 separate reductions' 32 and 32. Each step halves the lanes per vector and packs two vectors
 * into one register: 256-bit halves, then 128-bit quarters, then within 128-bit lanes. */
AVX512_TARGET static inline __attribute__((always_inline)) void bn_hsum8_epi32_avx512(const __m512i v[8],
                                                                                    int32_t out[8]) {
    __m512i s[4]; /* s[p]: quarters (q0 + q2, q1 + q3) of v[2p], then of v[2p + 1] */
    for (int p = 0; p < 4; p++)
        s[p] = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2 * p], v[2 * p + 1], 0x44),
                                _mm512_shuffle_i32x4(v[2 * p], v[2 * p + 1], 0xee));
    /* u[h]: quarter q holds 4 lanes whose sum is v[4h + q]'s */
    const __m512i u0 = _mm512_add_epi32(_mm512_shuffle_i32x4(s[0], s[1], 0x88), _mm512_shuffle_i32x4(s[0], s[1], 0xdd));
    const __m512i u1 = _mm512_add_epi32(_mm512_shuffle_i32x4(s[2], s[3], 0x88), _mm512_shuffle_i32x4(s[2], s[3], 0xdd));
    /* per quarter q: (u0[0] + u0[2], u1[0] + u1[2], u0[1] + u0[3], u1[1] + u1[3]), then the 64-bit
     * halves swapped and added: lane 0 is v[q]'s sum, lane 1 v[4 + q]'s */
    __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(u0, u1), _mm512_unpackhi_epi32(u0, u1));
    a = _mm512_add_epi32(a, _mm512_shuffle_epi32(a, (_MM_PERM_ENUM)0x4e));
    int32_t lanes[16];
    _mm512_storeu_si512(lanes, a);
    for (int q = 0; q < 4; q++) out[q] = lanes[4 * q], out[4 + q] = lanes[4 * q + 1];
}

/* The VNNI GEMM tile: RN rows (up to 2) x TN tokens (up to 4), two accumulators per pair, so the
 * full tile keeps 16 independent vpdpbusd chains (the 5-cycle latency needs 5 at one a cycle).
 * Codes without shifts: the block's 32 bytes sit in both halves of a zmm; w & (0x03 | 0x0c)
 * gives code 0 (inputs 0..31) in the low half and 4 * code 1 (inputs 32..63) in the high one,
 * w & (0x30 | 0xc0) gives 16 * code 2 and 64 * code 3 (inputs 64..127); vpdpbusd takes them
 * unsigned, so each int32 lane sums products of one scale, and an exact arithmetic shift per
 * lane (0/2 and 4/6) divides it back at the end. Bounds: a lane adds 4 products of <= 128 * 128
 * per block, so <= 65536 * kp / 128 (3.5 M at kp = 6912, 2^31 at kp = 4.2 M). One load and two
 * vpandd per row and block feed 2 * TN vpdpbusd; no shift competes for vpdpbusd's port. */
#define VNNI_AHEAD 4096
AVX512VNNI_TARGET static inline __attribute__((always_inline)) void i2_tile_vnni(const bn_i2_job *j, int r, int t0,
                                                                                const int RN, const int TN) {
    const __m512i mask01 = _mm512_inserti64x4(_mm512_set1_epi8(0x03), _mm256_set1_epi8(0x0c), 1);
    const __m512i mask23 = _mm512_inserti64x4(_mm512_set1_epi8(0x30), _mm256_set1_epi8((char)0xc0), 1);
    const int nb = j->kp / BLOCK;
    const size_t row = (size_t)j->kp / 4;
    const uint8_t *wr = j->w + (size_t)r * row;
    const int8_t *x = j->xq + (size_t)t0 * j->kp;
    __m512i acc01[2][4], acc23[2][4];
    for (int i = 0; i < RN; i++)
        for (int t = 0; t < TN; t++) acc01[i][t] = acc23[i][t] = _mm512_setzero_si512();
    /* the first group of tokens reads ahead, VNNI_AHEAD bytes past these rows, as fast as it
     * consumes (RN * 32 bytes a block): rows in pairs are two interleaved streams, which the
     * hardware prefetchers followed too late (Zen 4, 1 thread, 6912 x 2560, weights from DRAM
     * against L3: 4 tokens 0.93 against 0.62 ms, 8 tokens 1.19 against 0.86; read ahead 0.65 and
     * 0.92) */
    const char *ahead = (const char *)wr + RN * row + VNNI_AHEAD;
    const int read_ahead = t0 == 0; /* past the last row too: a prefetch never faults */
    for (int b = 0; b < nb; b++) {
        __m512i c01[2], c23[2];
        if (read_ahead) _mm_prefetch(ahead + (size_t)RN * b * BLOCK_BYTES, _MM_HINT_T0);
        for (int i = 0; i < RN; i++) {
            __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(wr + i * row + b * BLOCK_BYTES)));
            c01[i] = _mm512_and_si512(w, mask01);
            c23[i] = _mm512_and_si512(w, mask23);
        }
        for (int t = 0; t < TN; t++) {
            const int8_t *xb = x + (size_t)t * j->kp + b * BLOCK;
            const __m512i x01 = _mm512_loadu_si512(xb), x23 = _mm512_loadu_si512(xb + 64);
            for (int i = 0; i < RN; i++) {
                acc01[i][t] = _mm512_dpbusd_epi32(acc01[i][t], c01[i], x01);
                acc23[i][t] = _mm512_dpbusd_epi32(acc23[i][t], c23[i], x23);
            }
        }
    }
    /* The accumulators leave through memory: with the reduction below reading them straight from
     * registers, gcc 12 copied all 16 from register to register (and one to the stack) inside
     * the block loop, 17 extra moves per 16 vpdpbusd; the stores here keep the loop clean. */
    __m512i kept01[8], kept23[8];
    for (int i = 0; i < RN; i++)
        for (int t = 0; t < TN; t++) {
            _mm512_storeu_si512(&kept01[i * 4 + t], acc01[i][t]);
            _mm512_storeu_si512(&kept23[i * 4 + t], acc23[i][t]);
        }
    __asm__ volatile("" : : "r"(kept01), "r"(kept23) : "memory");
    const __m512i shift01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(2), 1);
    const __m512i shift23 = _mm512_add_epi32(shift01, _mm512_set1_epi32(4));
    __m512i sums[8];
    for (int i = 0; i < RN; i++)
        for (int t = 0; t < TN; t++)
            sums[i * 4 + t] = _mm512_add_epi32(_mm512_srav_epi32(_mm512_loadu_si512(&kept01[i * 4 + t]), shift01),
                                               _mm512_srav_epi32(_mm512_loadu_si512(&kept23[i * 4 + t]), shift23));
    if (RN == 2 && TN == 4) { /* the full tile: its 8 sums reduced together */
        int32_t total[8];
        bn_hsum8_epi32_avx512(sums, total);
        for (int i = 0; i < 2; i++)
            for (int t = 0; t < 4; t++) bn_i2_store(j, t0 + t, r + i, total[i * 4 + t]);
    } else {
        for (int i = 0; i < RN; i++)
            for (int t = 0; t < TN; t++) bn_i2_store(j, t0 + t, r + i, _mm512_reduce_add_epi32(sums[i * 4 + t]));
    }
}

/* Row pairs of one row tile meet each group of 4 tokens (then the last 1-3) while the tile's
 * weights and the group's activations sit in L1; an odd last row takes the one-row tile. */
#define I2_TILE_ROWS_VNNI(NAME, TN)                                                                   \
    AVX512VNNI_TARGET static __attribute__((noinline)) void NAME(const bn_i2_job *j, int ta, int tb, int t) { \
        int r = ta;                                                                                   \
        for (; r + 2 <= tb; r += 2) i2_tile_vnni(j, r, t, 2, TN);                                      \
        if (r < tb) i2_tile_vnni(j, r, t, 1, TN);                                                      \
    }
I2_TILE_ROWS_VNNI(i2_tile_rows_vnni4, 4)
I2_TILE_ROWS_VNNI(i2_tile_rows_vnni3, 3)
I2_TILE_ROWS_VNNI(i2_tile_rows_vnni2, 2)
I2_TILE_ROWS_VNNI(i2_tile_rows_vnni1, 1)

AVX512VNNI_TARGET static void i2_rows_avx512vnni_tokens(const bn_i2_job *j, int r0, int r1) {
    const int tile = (row_tile(j) + 1) & ~1; /* whole row pairs */
    for (int ta = r0; ta < r1; ta += tile) {
        const int tb = r1 - ta < tile ? r1 : ta + tile;
        int t = 0;
        for (; t + 4 <= j->m; t += 4) i2_tile_rows_vnni4(j, ta, tb, t);
        switch (j->m - t) {
        case 3: i2_tile_rows_vnni3(j, ta, tb, t); break;
        case 2: i2_tile_rows_vnni2(j, ta, tb, t); break;
        case 1: i2_tile_rows_vnni1(j, ta, tb, t); break;
        }
    }
}

/* ---- x86: AMX-INT8 ------------------------------------------------------------------------
 * tdpbusd multiplies a tile A of 16 rows x 64 unsigned bytes by a tile B of 16 rows x 64 signed
 * bytes, B holding 16 columns of 4 consecutive inputs per row, into C's 16 x 16 int32:
 * C[r][n] += sum_k A[r][k] * B[k / 4][4n + k % 4], exact. Here A = the codes of 16 weight rows over
 * 64 inputs (unpacked into a buffer, natural input order), B = 16 tokens' activations over the
 * same 64 inputs (reordered once per product into scratch->xa), C = rows x tokens. A 2 x 2 block of
 * C tiles (32 rows x 32 tokens) takes tiles 0-3, A 4-5, B 6-7; rows and tokens past the end are
 * padded with zero codes or activations, and their sums never stored. */

/* xa (bn_amx_tokens_to_tiles, internal.h): token tile T (16 tokens, the last one zero-padded),
 * then input chunk c (64 inputs), a 1 KB B tile each: row g, column n holds x[16T + n][64c + 4g ..
 * 64c + 4g + 3], one masked gather of 16 dwords (one per token) a row. The GEMM's one thread does
 * it while the others wait (a product's m * kp bytes: measured against the product's own time in
 * benchmarks/xeon16/README.md); the int8 head (head.c) reorders its hidden vectors the same way. */
AMX_TARGET void bn_amx_tokens_to_tiles(const int8_t *x, int m, int k, int8_t *xa) {
    const int nc = k / 64, tiles = (m + 15) / 16;
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(k)); /* token n's offset */
    for (int T = 0; T < tiles; T++) {
        const int valid = m - 16 * T;
        const __mmask16 tokens = valid >= 16 ? 0xffff : (__mmask16)((1u << valid) - 1);
        const int8_t *xt = x + (size_t)16 * T * k;
        for (int c = 0; c < nc; c++) {
            int8_t *tile = xa + ((size_t)T * nc + c) * 1024;
            for (int g = 0; g < 16; g++)
                _mm512_store_si512(tile + 64 * g, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), tokens, rows,
                                                                              xt + 64 * c + 4 * g, 1));
        }
    }
}

/* C tile (strip s, token tile u) of the block at rows ra, tokens t0, from out[16][16] (rows x
 * tokens): its columns (bn_amx_tile_columns), so that each token's 16 rows leave as one vector, minus its xsum, and (float output) rescaled as bn_i2_store does it: IEEE cvt, div and
 * mul, no FMA, so the same bits; one divide per 16 outputs, not per output. */
AMX_TARGET static void amx_store(const bn_i2_job *j, int ra, int rows, int t0, int s, int u, const int32_t *out) {
    const int r = ra + 16 * s, t = t0 + 16 * u;
    const int nr = rows - 16 * s < 16 ? rows - 16 * s : 16, nt = j->m - t < 16 ? j->m - t : 16;
    const __mmask16 rmask = nr == 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
    __m512i v[16];
    bn_amx_tile_columns(out, v);
    for (int n = 0; n < nt; n++) {
        const __m512i acc = _mm512_sub_epi32(v[n], _mm512_set1_epi32(j->xsum[t + n]));
        if (j->acc)
            _mm512_mask_storeu_epi32(j->acc + (size_t)(t + n) * j->acc_stride + r, rmask, acc);
        else
            _mm512_mask_storeu_ps(j->y + (size_t)(t + n) * j->y_stride + r, rmask,
                                  _mm512_mul_ps(_mm512_div_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(j->xscale[t + n])),
                                                _mm512_set1_ps(j->gamma)));
    }
}

/* Codes are unpacked two blocks at a time (four tile chunks of 64 inputs) for a group of 32 rows
 * (two strips of 16) into buf, 8 KB that stay in L1, and multiplied at once: the tile loads read
 * back what the vector stores just wrote. buf: chunk cc (0..3), strip s, one 1 KB A tile each at
 * buf + (2 cc + s) * 1024. Up to 32 tokens (a batched decode step) a group is 32 rows x the one or
 * two token tiles; more tokens (prefill), 16 rows x up to four token tiles (64 tokens) a pass,
 * the A tile loaded once for the four.
 *
 * This replaced (session 13) an unpacking of all kp inputs of 32 rows into an aligned_alloc'd
 * buffer per call (80-220 KB, past L1, so every A tile came back from L2) before the tiles ran;
 * at 16 tokens or fewer each A tile is used once, so those stores and reloads cost more than the
 * tdpbusd. Measured on the 2-core AMX Xeon (6912x2560, `BN_BENCH_TOKENS=... kernels/build/bench 2
 * 6 kernel`, two interleaved runs, ms, before -> after), 2 threads: 4 tokens 0.33-0.34 (VNNI's
 * tile then) -> 0.20, 8: 0.51-0.52 (VNNI) -> 0.21, 16: 0.51-0.53 -> 0.245, 32: 0.61 -> 0.32, 64:
 * 0.99-1.02 -> 0.62-0.68; 1 thread: 4 tokens 0.73 -> 0.41, 8: 1.17 -> 0.41, 16: 1.08 -> 0.47,
 * 64: 1.96 -> 1.20. VNNI's tile at 2 tokens takes 0.23-0.29 against AMX's 0.20, so AMX runs from 2
 * tokens (BN_AMX_MIN_TOKENS). Of the 16-token 0.245 ms (2 threads), the unpacking alone with the
 * weights' read takes 0.21 and the tiles alone 0.07; the AVX2 GEMV streams the same weights in
 * 0.14-0.20. Tried and no faster: 4 blocks a step; the next step's unpacking interleaved by hand
 * between the chunks' tdpbusd into a second buffer (0.23 against 0.21 at 4 tokens: the
 * out-of-order core overlaps them already). The linear prefetch below made the most of it: 0.34
 * -> 0.245 at 16 tokens (a prefetch 512 bytes ahead in each row instead: 0.33; 2 KB: 0.26). */
#define AMX_GROUP_BYTES 8192
#define AMX_L2_AHEAD_TOKENS 16

/* rows [0, rows) of the group at wr, blocks [b, b + nbk) (nbk <= 2), into buf; with pf, one line
 * of the next group per row: a step reads 64 bytes a row, so the next group's bytes arrive, in
 * order, as this group's are consumed (the hardware prefetchers lose track of 32 interleaved row
 * streams) */
AMX_TARGET static inline __attribute__((always_inline)) void amx_unpack_rows(const uint8_t *wr, size_t row, int rows,
                                                                           int b, int nbk, uint8_t *buf,
                                                                           const uint8_t *pf, const uint8_t *pf2) {
    /* gf2p8affineqb: output bit i of each byte is the parity of (matrix byte 7 - i) AND the input
     * byte, so a matrix with bit c in byte 7 and bit c + 1 in byte 6 moves code bits (c, c + 1)
     * to bits (0, 1) and clears the rest: one instruction for the shift and the mask. The matrix
     * is per 64-bit lane: the low 32 bytes (inputs 0-31 of the chunk) take code 0 (code 2), the
     * high 32 bytes code 1 (code 3), as the broadcast block's two halves. */
#define AMX_CODE_MATRIX(c) (long long)((1ull << (c)) << 56 | (1ull << ((c) + 1)) << 48)
    const __m512i code01 = _mm512_set_epi64(AMX_CODE_MATRIX(2), AMX_CODE_MATRIX(2), AMX_CODE_MATRIX(2),
                                            AMX_CODE_MATRIX(2), AMX_CODE_MATRIX(0), AMX_CODE_MATRIX(0),
                                            AMX_CODE_MATRIX(0), AMX_CODE_MATRIX(0));
    const __m512i code23 = _mm512_set_epi64(AMX_CODE_MATRIX(6), AMX_CODE_MATRIX(6), AMX_CODE_MATRIX(6),
                                            AMX_CODE_MATRIX(6), AMX_CODE_MATRIX(4), AMX_CODE_MATRIX(4),
                                            AMX_CODE_MATRIX(4), AMX_CODE_MATRIX(4));
#undef AMX_CODE_MATRIX
    for (int i = 0; i < rows; i++) {
        const uint8_t *src = wr + (size_t)i * row + (size_t)b * BLOCK_BYTES;
        if (pf) _mm_prefetch((const char *)pf + 64 * i, _MM_HINT_T0);
        if (pf2) _mm_prefetch((const char *)pf2 + 64 * i, _MM_HINT_T1);
        uint8_t *dst = buf + (i >> 4) * 1024 + (i & 15) * 64;
        for (int bb = 0; bb < nbk; bb++) {
            __m512i w = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(src + bb * BLOCK_BYTES)));
            _mm512_store_si512(dst + (4 * bb) * 1024, _mm512_gf2p8affine_epi64_epi8(w, code01, 0));
            _mm512_store_si512(dst + (4 * bb + 2) * 1024, _mm512_gf2p8affine_epi64_epi8(w, code23, 0));
        }
    }
}

/* One pass of a row group (STRIPS x 16 rows, `rows` of them real) over TILES token tiles from b0
 * (their chunks tile_stride apart). Tiles: C 0-3; two strips: A 4-5, B 6-7; one strip: A 4, B
 * 5-7, then 5 again for a fourth token tile. */
#define AMX_PASS(NAME, STRIPS, TILES)                                                                      \
    AMX_TARGET static __attribute__((noinline)) void NAME(const bn_i2_job *j, int ra, int rows,             \
                                                          const int8_t *b0, uint8_t *buf, const uint8_t *pf,   \
                                                          const uint8_t *pf2) {                                \
        const int nb = j->kp / BLOCK;                                                                      \
        const size_t row = (size_t)j->kp / 4, tile_stride = (size_t)(j->kp / 64) * 1024;                  \
        const uint8_t *wr = j->w + (size_t)ra * row;                                                       \
        _tile_zero(0);                                                                                     \
        _tile_zero(1);                                                                                     \
        _tile_zero(2);                                                                                     \
        _tile_zero(3);                                                                                     \
        for (int b = 0; b < nb; b += 2) {                                                                  \
            const int nbk = nb - b < 2 ? nb - b : 2;                                                       \
            amx_unpack_rows(wr, row, rows, b, nbk, buf, pf ? pf + (size_t)b * 32 * rows : NULL,            \
                            pf2 ? pf2 + (size_t)b * 32 * rows : NULL);                                     \
            for (int cc = 0; cc < 2 * nbk; cc++) {                                                         \
                const int8_t *bt = b0 + ((size_t)2 * b + cc) * 1024;                                       \
                const uint8_t *a = buf + (2 * cc) * 1024;                                                  \
                if (STRIPS == 2) {                                                                         \
                    _tile_loadd(4, a, 64);                                                                 \
                    _tile_loadd(5, a + 1024, 64);                                                          \
                    _tile_loadd(6, bt, 64);                                                                \
                    if (TILES == 2) _tile_loadd(7, bt + tile_stride, 64);                                  \
                    _tile_dpbusd(0, 4, 6);                                                                 \
                    if (TILES == 2) _tile_dpbusd(1, 4, 7);                                                 \
                    _tile_dpbusd(2, 5, 6);                                                                 \
                    if (TILES == 2) _tile_dpbusd(3, 5, 7);                                                 \
                } else {                                                                                   \
                    _tile_loadd(4, a, 64);                                                                 \
                    _tile_loadd(5, bt, 64);                                                                \
                    _tile_dpbusd(0, 4, 5);                                                                 \
                    if (TILES >= 2) _tile_loadd(6, bt + tile_stride, 64);                                  \
                    if (TILES >= 2) _tile_dpbusd(1, 4, 6);                                                 \
                    if (TILES >= 3) _tile_loadd(7, bt + 2 * tile_stride, 64);                              \
                    if (TILES >= 3) _tile_dpbusd(2, 4, 7);                                                 \
                    if (TILES >= 4) _tile_loadd(5, bt + 3 * tile_stride, 64);                              \
                    if (TILES >= 4) _tile_dpbusd(3, 4, 5);                                                 \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }
AMX_PASS(amx_pass_2x2, 2, 2)
AMX_PASS(amx_pass_2x1, 2, 1)
AMX_PASS(amx_pass_1x1, 1, 1)
AMX_PASS(amx_pass_1x2, 1, 2)
AMX_PASS(amx_pass_1x3, 1, 3)
AMX_PASS(amx_pass_1x4, 1, 4)

AMX_TARGET void bn_i2_rows_amx(const bn_i2_job *j, int r0, int r1) {
    bn_amx_scratch *scratch = j->amx;
    if (j->m < BN_AMX_MIN_TOKENS || !scratch) { /* one token, or no scratch: the VNNI kernels */
        bn_i2_rows_avx512vnni(j, r0, r1);
        return;
    }
    int idle = 0;
    if (__atomic_compare_exchange_n(&scratch->state, &idle, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        bn_amx_tokens_to_tiles(j->xq, j->m, j->kp, scratch->xa);
        __atomic_store_n(&scratch->state, 2, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&scratch->state, __ATOMIC_ACQUIRE) != 2) _mm_pause();
    }
    uint8_t buf[AMX_GROUP_BYTES] __attribute__((aligned(64)));
    int32_t out[256] __attribute__((aligned(64)));
    const int nc = j->kp / 64, group = j->m <= 32 ? 32 : 16, per_pass = j->m <= 32 ? 32 : 64;
    bn_amx_configure();
    for (int ra = r0; ra < r1; ra += group) {
        const int rows = r1 - ra < group ? r1 - ra : group, strips = rows > 16 ? 2 : 1;
        for (int i = rows; i < 16 * strips; i++) /* padding rows: zero codes */
            for (int cc = 0; cc < 4; cc++)
                _mm512_store_si512(buf + (2 * cc + (i >> 4)) * 1024 + (i & 15) * 64, _mm512_setzero_si512());
        for (int t0 = 0; t0 < j->m; t0 += per_pass) {
            const int8_t *b0 = scratch->xa + (size_t)(t0 / 16) * nc * 1024;
            const int left = (j->m - t0 + 15) / 16, tiles = left < per_pass / 16 ? left : per_pass / 16;
            /* the next group's weights are read ahead during the last pass over this one */
            const uint8_t *pf =
                t0 + per_pass >= j->m && ra + group < r1 ? j->w + (size_t)(ra + group) * (j->kp / 4) : NULL;
            /* decode-sized steps (up to AMX_L2_AHEAD_TOKENS tokens) run through a group faster than
             * memory delivers it: the group after the next is read ahead into L2 as well */
            const uint8_t *pf2 = pf && j->m <= AMX_L2_AHEAD_TOKENS && ra + 2 * group < r1
                                     ? j->w + (size_t)(ra + 2 * group) * (j->kp / 4)
                                     : NULL;
            if (strips == 2)
                (tiles == 2 ? amx_pass_2x2 : amx_pass_2x1)(j, ra, rows, b0, buf, pf, pf2);
            else
                (tiles == 4 ? amx_pass_1x4 : tiles == 3 ? amx_pass_1x3 : tiles == 2 ? amx_pass_1x2 : amx_pass_1x1)(
                    j, ra, rows, b0, buf, pf, pf2);
            /* tile numbers are immediates: C tile (strip s, token tile u) is 2s + u with two
             * strips, u with one; so strip 0's is u either way */
            for (int u = 0; u < tiles; u++) {
                switch (u) {
                case 0: _tile_stored(0, out, 64); break;
                case 1: _tile_stored(1, out, 64); break;
                case 2: _tile_stored(2, out, 64); break;
                default: _tile_stored(3, out, 64); break;
                }
                amx_store(j, ra, rows, t0, 0, u, out);
                if (strips == 2) {
                    if (u == 0) _tile_stored(2, out, 64);
                    else _tile_stored(3, out, 64);
                    amx_store(j, ra, rows, t0, 1, u, out);
                }
            }
        }
    }
    _tile_release();
}

/* Decode on AVX-512 machines takes the AVX2 GEMV: it streams the weights faster (on a Xeon with
 * AVX-512 VNNI, 2 threads, the FFN shape: 13.0 GB/s against 10.7 for the AVX-512 GEMV and 10.4
 * for VNNI), since decode is bound by the read, not the multiply-adds. Prefill keeps 512 bits. */
void bn_i2_rows_avx512(const bn_i2_job *j, int r0, int r1) {
    (j->m == 1 ? bn_i2_rows_avx2 : i2_rows_avx512_tokens)(j, r0, r1);
}
void bn_i2_rows_avx512vnni(const bn_i2_job *j, int r0, int r1) {
    (j->m == 1 ? bn_i2_rows_avx2 : i2_rows_avx512vnni_tokens)(j, r0, r1);
}

/* tq1_k640 on AVX-512: 64 bytes (inputs 128i + 64c + 0..63 of code i) a step, the codes by the
 * same byte arithmetic as AVX2 with the compares into mask registers; vpdpbusd (VNNI) or
 * vpmaddubsw + vpmaddwd accumulate them. The row's i2_k128 end goes through the AVX2 helper. */
#define TQ1_ROW_AVX512(NAME, TARGET, DOT)                                                                  \
    TARGET static inline __attribute__((always_inline)) void NAME(const bn_i2_job *j, int r, int t0,      \
                                                                  const int TN) {                         \
        const __m512i low = _mm512_set1_epi8(-43), high = _mm512_set1_epi8(42), one = _mm512_set1_epi8(1); \
        const int nb = j->kp / TQ1_BLOCK;                                                                 \
        const uint8_t *wr = j->w + (size_t)r * bn_ternary_row_bytes(BN_LAYOUT_TQ1, j->kp);               \
        const int8_t *x = j->xq + (size_t)t0 * j->kp;                                                     \
        __m512i acc[4];                                                                                   \
        for (int t = 0; t < TN; t++) acc[t] = _mm512_setzero_si512();                                     \
        for (int b = 0; b < nb; b++) {                                                                    \
            const uint8_t *wb = wr + (size_t)b * TQ1_BLOCK_BYTES;                                         \
            _mm_prefetch((const char *)wb + GEMV_PREFETCH, _MM_HINT_T0);                                  \
            _mm_prefetch((const char *)wb + GEMV_PREFETCH + 64, _MM_HINT_T0);                             \
            for (int c = 0; c < 2; c++) {                                                                 \
                __m512i s = _mm512_xor_si512(_mm512_loadu_si512(wb + 64 * c), _mm512_set1_epi8((char)0x80)); \
                for (int i = 0; i < 5; i++) {                                                             \
                    if (i) s = _mm512_add_epi8(s, _mm512_add_epi8(s, s));                                 \
                    __m512i q = _mm512_maskz_mov_epi8(_mm512_cmpgt_epi8_mask(s, low), one);               \
                    q = _mm512_mask_add_epi8(q, _mm512_cmpgt_epi8_mask(s, high), q, one);                 \
                    for (int t = 0; t < TN; t++)                                                          \
                        acc[t] = DOT(acc[t], q,                                                           \
                                     _mm512_loadu_si512(x + (size_t)t * j->kp + (size_t)b * TQ1_BLOCK +    \
                                                        128 * i + 64 * c));                               \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int t = 0; t < TN; t++)                                                                      \
            bn_i2_store(j, t0 + t, r,                                                                     \
                        _mm512_reduce_add_epi32(acc[t]) +                                                 \
                            i2_blocks_dot_avx2(wr + (size_t)nb * TQ1_BLOCK_BYTES,                         \
                                               x + (size_t)t * j->kp + (size_t)nb * TQ1_BLOCK,            \
                                               j->kp % TQ1_BLOCK / BLOCK));                              \
    }

TQ1_ROW_AVX512(tq1_row_avx512, AVX512_TARGET, dot_maddubs512)
TQ1_ROW_AVX512(tq1_row_avx512vnni, AVX512VNNI_TARGET, dot_vnni512)
I2_ROWS_TOKENS(tq1_rows_avx512_tokens, AVX512_TARGET, tq1_row_avx512)
I2_ROWS_TOKENS(tq1_rows_avx512vnni_tokens, AVX512VNNI_TARGET, tq1_row_avx512vnni)

/* Unlike i2_k128's, the tq1_k640 decode is bound by instructions, not by the read: it keeps 512
 * bits for one token too (row by row, one sequential stream) */
AVX512_TARGET void bn_tq1_rows_avx512(const bn_i2_job *j, int r0, int r1) {
    if (j->m != 1) {
        tq1_rows_avx512_tokens(j, r0, r1);
        return;
    }
    for (int r = r0; r < r1; r++) tq1_row_avx512(j, r, 0, 1);
}
AVX512VNNI_TARGET void bn_tq1_rows_avx512vnni(const bn_i2_job *j, int r0, int r1) {
    if (j->m != 1) {
        tq1_rows_avx512vnni_tokens(j, r0, r1);
        return;
    }
    for (int r = r0; r < r1; r++) tq1_row_avx512vnni(j, r, 0, 1);
}

#endif /* BN_X86 */

/* the AMX scratch size (internal.h), defined on every architecture: model.c sizes its buffer by it
 * wherever bn_isa_available(BN_ISA_AMX) could hold */
size_t bn_amx_xa_bytes(int m, int kp) { return (size_t)((m + 31) / 32 * 32) * kp; }

/* ---- ARM: NEON and dotprod ------------------------------------------------------------- */
#if BN_ARM64

/* A block is two 16-byte halves: codes of inputs 32i+0..15 and 32i+16..31. */
static inline __attribute__((always_inline)) void neon_codes(const uint8_t *p, int8x16_t c[8]) {
    const uint8x16_t mask = vdupq_n_u8(3);
    uint8x16_t lo = vld1q_u8(p), hi = vld1q_u8(p + 16);
    c[0] = vreinterpretq_s8_u8(vandq_u8(lo, mask));
    c[1] = vreinterpretq_s8_u8(vandq_u8(hi, mask));
    c[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(lo, 2), mask));
    c[3] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(hi, 2), mask));
    c[4] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(lo, 4), mask));
    c[5] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(hi, 4), mask));
    c[6] = vreinterpretq_s8_u8(vshrq_n_u8(lo, 6));
    c[7] = vreinterpretq_s8_u8(vshrq_n_u8(hi, 6));
}

void bn_i2_rows_neon(const bn_i2_job *j, int r0, int r1) {
    const int nb = j->kp / BLOCK;
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = j->w + (size_t)r * (j->kp / 4);
        for (int t = 0; t < j->m; t++) {
            const int8_t *x = j->xq + (size_t)t * j->kp;
            int32x4_t acc = vdupq_n_s32(0);
            for (int b = 0; b < nb; b++) {
                int8x16_t c[8];
                neon_codes(wr + b * BLOCK_BYTES, c);
                const int8_t *xb = x + b * BLOCK;
                for (int i = 0; i < 8; i++) { /* c[i] pairs with inputs 16*i .. 16*i+15 of the block */
                    int8x16_t xv = vld1q_s8(xb + 16 * i);
                    int16x8_t p = vmull_s8(vget_low_s8(c[i]), vget_low_s8(xv));
                    p = vmlal_high_s8(p, c[i], xv);
                    acc = vpadalq_s16(acc, p);
                }
            }
            bn_i2_store(j, t, r, vaddvq_s32(acc));
        }
    }
}

/* tq1_k640 on NEON: 16 bytes give the codes of inputs 128i + 16c + 0..15; NEON multiplies bytes
 * (mod 256) and compares them unsigned, so q = [m >= 86] + [m >= 171] for m = b * 3^i directly. */
static inline __attribute__((always_inline)) int8x16_t tq1_code_neon(uint8x16_t m) {
    uint8x16_t a = vcgeq_u8(m, vdupq_n_u8(86)), b = vcgeq_u8(m, vdupq_n_u8(171)); /* 0xff masks */
    return vreinterpretq_s8_u8(vsubq_u8(vdupq_n_u8(0), vaddq_u8(a, b)));
}

/* sum q*x over nb i2_k128 blocks: the end of a tq1_k640 row */
static int32_t i2_blocks_dot_neon(const uint8_t *w, const int8_t *x, int nb) {
    int32x4_t acc = vdupq_n_s32(0);
    for (int b = 0; b < nb; b++) {
        int8x16_t c[8];
        neon_codes(w + b * BLOCK_BYTES, c);
        for (int i = 0; i < 8; i++) {
            int8x16_t xv = vld1q_s8(x + b * BLOCK + 16 * i);
            acc = vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(c[i]), vget_low_s8(xv)), c[i], xv));
        }
    }
    return vaddvq_s32(acc);
}

#define TQ1_ROWS_NEON(NAME, DOT)                                                                          \
    void NAME(const bn_i2_job *j, int r0, int r1) {                                                       \
        const int nb = j->kp / TQ1_BLOCK;                                                                 \
        const size_t row = bn_ternary_row_bytes(BN_LAYOUT_TQ1, j->kp);                                    \
        const uint8x16_t three = vdupq_n_u8(3);                                                           \
        for (int r = r0; r < r1; r++) {                                                                   \
            const uint8_t *wr = j->w + (size_t)r * row;                                                   \
            for (int t = 0; t < j->m; t++) {                                                              \
                const int8_t *x = j->xq + (size_t)t * j->kp;                                              \
                int32x4_t acc = vdupq_n_s32(0);                                                           \
                for (int b = 0; b < nb; b++)                                                              \
                    for (int c = 0; c < 8; c++) {                                                         \
                        uint8x16_t m = vld1q_u8(wr + (size_t)b * TQ1_BLOCK_BYTES + 16 * c);               \
                        for (int i = 0; i < 5; i++, m = vmulq_u8(m, three))                               \
                            acc = DOT(acc, tq1_code_neon(m), vld1q_s8(x + (size_t)b * TQ1_BLOCK + 128 * i + 16 * c)); \
                    }                                                                                     \
                bn_i2_store(j, t, r,                                                                      \
                            vaddvq_s32(acc) + i2_blocks_dot_neon(wr + (size_t)nb * TQ1_BLOCK_BYTES,       \
                                                                 x + (size_t)nb * TQ1_BLOCK,              \
                                                                 j->kp % TQ1_BLOCK / BLOCK));             \
            }                                                                                             \
        }                                                                                                 \
    }

static inline int32x4_t tq1_dot_neon(int32x4_t acc, int8x16_t q, int8x16_t x) {
    return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(q), vget_low_s8(x)), q, x));
}
TQ1_ROWS_NEON(bn_tq1_rows_neon, tq1_dot_neon)

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
void bn_i2_rows_neondot(const bn_i2_job *j, int r0, int r1) {
    const int nb = j->kp / BLOCK;
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = j->w + (size_t)r * (j->kp / 4);
        for (int t = 0; t < j->m; t++) {
            const int8_t *x = j->xq + (size_t)t * j->kp;
            int32x4_t acc0 = vdupq_n_s32(0), acc1 = vdupq_n_s32(0);
            for (int b = 0; b < nb; b++) {
                int8x16_t c[8];
                neon_codes(wr + b * BLOCK_BYTES, c);
                const int8_t *xb = x + b * BLOCK;
                for (int i = 0; i < 8; i += 2) {
                    acc0 = vdotq_s32(acc0, c[i], vld1q_s8(xb + 16 * i));
                    acc1 = vdotq_s32(acc1, c[i + 1], vld1q_s8(xb + 16 * i + 16));
                }
            }
            bn_i2_store(j, t, r, vaddvq_s32(vaddq_s32(acc0, acc1)));
        }
    }
}

static inline int32x4_t tq1_dot_neondot(int32x4_t acc, int8x16_t q, int8x16_t x) { return vdotq_s32(acc, q, x); }
TQ1_ROWS_NEON(bn_tq1_rows_neondot, tq1_dot_neondot)
#pragma GCC pop_options

#endif /* BN_ARM64 */

typedef struct {
    bn_i2_rows_fn fn;
    const bn_i2_job *job;
    int n;
} gemm_task;

static void gemm_worker(void *ctx, int chunk, int n_chunks, int ith) {
    (void)ith;
    const gemm_task *g = ctx;
    int r0, r1;
    bn_split(g->n, chunk, n_chunks, 4, &r0, &r1);
    if (r0 < r1) g->fn(g->job, r0, r1);
}

int bn_gemm_ternary(bn_pool *pool, int isa, int layout, const uint8_t *w, int n, int kp, const int8_t *xq,
                    const int32_t *xsum, int m, int32_t *acc) {
    const bn_kernels *kern = bn_kernels_for(isa);
    bn_i2_rows_fn fn = kern && layout >= 0 && layout < BN_LAYOUT_COUNT ? kern->ternary[layout] : NULL;
    if (!fn || kp % BLOCK != 0 || n < 0 || m < 0) return -1;
    bn_i2_job job = {.w = w, .kp = kp, .xq = xq, .xsum = xsum, .m = m, .acc = acc, .acc_stride = n};
    /* the AMX GEMM's reordered activations (only where it may run: its own ISA, or the tuned one) */
    bn_amx_scratch amx = {NULL, 0};
    if (layout == BN_LAYOUT_I2 && m >= BN_AMX_MIN_TOKENS && (isa == BN_ISA_AMX || isa == BN_ISA_TUNED) &&
        bn_isa_available(BN_ISA_AMX)) {
        amx.xa = aligned_alloc(64, bn_amx_xa_bytes(m, kp));
        if (amx.xa) job.amx = &amx;
    }
    gemm_task g = {fn, &job, n};
    bn_pool_run(pool, gemm_worker, &g, bn_pool_chunks(pool, n, m == 1 ? 64 : 16));
    free(amx.xa);
    return 0;
}

/* ---- memory-read bandwidth probe ------------------------------------------------------- */

typedef struct {
    const uint64_t *p;
    size_t words;
    int avx2;
    uint64_t partial[256];
} stream_task;

/* the sum of the 64-bit words of lines [l0, l1): eight independent sums, so the loads, not an
 * add chain, set the pace */
static uint64_t stream_lines_scalar(const uint64_t *p, size_t l0, size_t l1) {
    uint64_t a[8] = {0};
    for (size_t l = l0; l < l1; l++)
        for (int i = 0; i < 8; i++) a[i] += p[l * 8 + i];
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

#if BN_X86
/* The same sum with two 32-byte loads a line: the kernels read with 32-byte loads, and a probe
 * of 8-byte loads measured 20-30% less bandwidth here, which put decode above its "ceiling". */
AVX2_TARGET static uint64_t stream_lines_avx2(const uint64_t *p, size_t l0, size_t l1) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (size_t l = l0; l < l1; l++) {
        a = _mm256_add_epi64(a, _mm256_loadu_si256((const __m256i *)(p + l * 8)));
        b = _mm256_add_epi64(b, _mm256_loadu_si256((const __m256i *)(p + l * 8 + 4)));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(a, b));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
#endif

static void stream_worker(void *ctx, int chunk, int n_chunks, int ith) {
    (void)ith;
    stream_task *s = ctx;
    size_t lines = s->words / 8, l0 = lines * chunk / n_chunks, l1 = lines * (chunk + 1) / n_chunks;
#if BN_X86
    if (s->avx2) {
        s->partial[chunk] = stream_lines_avx2(s->p, l0, l1);
        return;
    }
#endif
    s->partial[chunk] = stream_lines_scalar(s->p, l0, l1);
}

uint64_t bn_stream_read(bn_pool *pool, const void *buf, size_t nbytes) {
    stream_task s = {.p = buf, .words = nbytes / 8, .avx2 = bn_isa_available(BN_ISA_AVX2)};
    memset(s.partial, 0, sizeof s.partial);
    /* one chunk per thread: each streams one contiguous range, like a plain parallel read */
    bn_pool_run(pool, stream_worker, &s, bn_pool_size(pool));
    uint64_t total = 0;
    for (int i = 0; i < 256; i++) total += s.partial[i];
    return total;
}
