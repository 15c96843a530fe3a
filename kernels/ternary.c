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

/* One row against TN tokens: the four code vectors of a block are unpacked once and reused.
 * Block sums (|s| <= 2048) add up in int16 for 8 blocks (<= 16384), then widen to int32.
 * Measured on a Zen 3 EPYC (AVX2, 1 thread, 64 tokens, 2B4T shapes): about 107 G MAC/s, 57% of
 * what vpmaddubsw alone issues there (188 G MAC/s) and about 75% of a loop of vpmaddubsw + vpaddw
 * pairs, the least any exact u8 x s8 dot needs on AVX2. Tried there and slower (0.8-0.95x, gcc
 * and clang alike): codes unpacked once per row tile into an L1 scratch, then register tiles of
 * 1x8, 2x4, 3x3, 3x4 and 4x2 rows x tokens; the decode GEMV's shift-saving mask. 8 tokens a row
 * was slower too until each token's int16 sum was pinned to a register (the empty asm): gcc had
 * reassociated the adds across tokens and blocks and spilled. Pinned, 8 tokens a row decode each
 * block once for 8 (session 9, 1 thread, 6912x2560, medians of 6 interleaved runs against 4
 * tokens a row: 16 tokens 2.44 -> 2.37 ms, 8 tokens 1.24 -> 1.23 ms; 64 tokens alike). */
AVX2_TARGET static inline __attribute__((always_inline)) void i2_row_avx2(const bn_i2_job *j, int r, int t0,
                                                                        const int TN) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    const int nb = j->kp / BLOCK;
    const uint8_t *wr = j->w + (size_t)r * (j->kp / 4);
    const int8_t *x = j->xq + (size_t)t0 * j->kp;
    __m256i acc[8];
    for (int t = 0; t < TN; t++) acc[t] = _mm256_setzero_si256();
    for (int b0 = 0; b0 < nb; b0 += 8) {
        const int b1 = b0 + 8 < nb ? b0 + 8 : nb;
        __m256i acc16[8];
        for (int t = 0; t < TN; t++) acc16[t] = _mm256_setzero_si256();
        for (int b = b0; b < b1; b++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(wr + b * BLOCK_BYTES));
            __m256i c0 = _mm256_and_si256(w, mask);
            __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(w, 2), mask);
            __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
            __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(w, 6), mask);
            for (int t = 0; t < TN; t++) {
                const int8_t *xb = x + (size_t)t * j->kp + b * BLOCK;
                __m256i s = _mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)xb));
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(xb + 32))));
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i *)(xb + 64))));
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i *)(xb + 96))));
                acc16[t] = _mm256_add_epi16(acc16[t], s);
                __asm__("" : "+x"(acc16[t])); /* one register per token's sum (see the note above) */
            }
        }
        for (int t = 0; t < TN; t++) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(acc16[t], ones));
    }
    for (int t = 0; t < TN; t++) bn_i2_store(j, t0 + t, r, bn_hsum_epi32_avx2(acc[t]));
}

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

/* Rows in tiles of about 16 KB of weights (row_tile), each tile meeting every group of eight
 * tokens while it sits in L1; the last tokens go in one narrower group. */
AVX2_TARGET static void i2_rows_avx2_tokens(const bn_i2_job *j, int r0, int r1) {
    const int tile = row_tile(j);
    for (int ta = r0; ta < r1; ta += tile) {
        int tb = r1 - ta < tile ? r1 : ta + tile;
        int t = 0;
        for (; t + 8 <= j->m; t += 8)
            for (int r = ta; r < tb; r++) i2_row_avx2(j, r, t, 8);
        for (int r = ta; r < tb; r++) switch (j->m - t) { /* constant widths: registers */
            case 7: i2_row_avx2(j, r, t, 7); break;
            case 6: i2_row_avx2(j, r, t, 6); break;
            case 5: i2_row_avx2(j, r, t, 5); break;
            case 4: i2_row_avx2(j, r, t, 4); break;
            case 3: i2_row_avx2(j, r, t, 3); break;
            case 2: i2_row_avx2(j, r, t, 2); break;
            case 1: i2_row_avx2(j, r, t, 1); break;
            }
    }
}

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
I2_ROW_AVX512(i2_row_avx512vnni, AVX512VNNI_TARGET, dot_vnni512)

I2_ROWS_TOKENS(i2_rows_avx512_tokens, AVX512_TARGET, i2_row_avx512)
I2_ROWS_TOKENS(i2_rows_avx512vnni_tokens, AVX512VNNI_TARGET, i2_row_avx512vnni)

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
    gemm_task g = {fn, &job, n};
    bn_pool_run(pool, gemm_worker, &g, bn_pool_chunks(pool, n, m == 1 ? 64 : 16));
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
