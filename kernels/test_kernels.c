/* Standalone kernel tests (no Python): every available ISA against the scalar reference on many
 * shapes, the thread pool, and a small random decoder run end to end. Built plain by `make test`
 * and with AddressSanitizer + UBSan by `make sanitize`; also cross-compiles for aarch64. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static uint64_t rng_state = 88172645463325252ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float rndf(void) { return (float)(rnd() % 20001) / 10000.0f - 1.0f; }

static int failures = 0;
#define CHECK(cond, ...)                  \
    do {                                  \
        if (!(cond)) {                    \
            failures++;                   \
            fprintf(stderr, __VA_ARGS__); \
            fprintf(stderr, "\n");        \
        }                                 \
    } while (0)

static uint8_t *random_weights(int n, int k, int kp) {
    uint8_t *w = calloc((size_t)n * kp / 4, 1);
    for (int r = 0; r < n; r++)
        for (int i = 0; i < kp; i++) {
            int code = i < k ? (int)(rnd() % 3) : 1; /* padding is code 1 (T = 0) */
            int b = i / 128, f = (i % 128) / 32, j = i % 32;
            w[(size_t)r * kp / 4 + b * 32 + j] |= (uint8_t)(code << (2 * f));
        }
    return w;
}

/* The same rows in tq1_k640 (bitnet.h): five codes a byte as ceil(v * 256 / 243), then the rest of
 * kp as the i2_k128 blocks they already are. */
static uint8_t *tq1_from_i2(const uint8_t *w, int n, int kp) {
    const size_t row = bn_ternary_row_bytes(BN_LAYOUT_TQ1, kp);
    const int nb = kp / BN_TQ1_BLOCK_K;
    uint8_t *out = malloc(n * row + 1);
    for (int r = 0; r < n; r++) {
        const uint8_t *src = w + (size_t)r * kp / 4;
        uint8_t *dst = out + r * row;
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < BN_TQ1_BLOCK_BYTES; j++) {
                int v = 0;
                for (int i = 0; i < 5; i++) {
                    int k = BN_TQ1_BLOCK_K * b + 128 * i + j; /* its i2_k128 code: block k/128, field k%128/32 */
                    v = 3 * v + ((src[k / 128 * 32 + k % 32] >> (2 * (k % 128 / 32))) & 3);
                }
                dst[b * BN_TQ1_BLOCK_BYTES + j] = (uint8_t)((v * 256 + 242) / 243);
            }
        memcpy(dst + (size_t)nb * BN_TQ1_BLOCK_BYTES, src + (size_t)nb * BN_TQ1_BLOCK_K / 4,
               (size_t)(kp % BN_TQ1_BLOCK_K) / 4);
    }
    return out;
}

/* Every byte a tq1_k640 packer writes (ceil(v * 256 / 243) for v = 0..242) decodes to its five
 * codes on every ISA: over 243 rows, each of the 128 byte positions of a block takes every value. */
static void test_tq1_every_byte(void) {
    const int n = 243, kp = BN_TQ1_BLOCK_K;
    uint8_t *w = malloc((size_t)n * BN_TQ1_BLOCK_BYTES);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < BN_TQ1_BLOCK_BYTES; j++)
            w[r * BN_TQ1_BLOCK_BYTES + j] = (uint8_t)(((r + j) % 243 * 256 + 242) / 243);
    int8_t *xq = malloc(kp);
    int32_t xsum = 0, want[243], got[243];
    for (int i = 0; i < kp; i++) xsum += xq[i] = (int8_t)(rnd() % 256 - 128);
    for (int r = 0; r < n; r++) {
        want[r] = -xsum;
        for (int j = 0; j < BN_TQ1_BLOCK_BYTES; j++)
            for (int i = 0, v = (r + j) % 243, p = 81; i < 5; i++, p /= 3) want[r] += (v / p % 3) * xq[128 * i + j];
    }
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        if (!bn_isa_available(isa)) continue;
        bn_gemm_ternary(NULL, isa, BN_LAYOUT_TQ1, w, n, kp, xq, &xsum, 1, got);
        CHECK(!memcmp(want, got, sizeof want), "tq1 isa %d: a byte decodes to other codes", isa);
    }
    CHECK(bn_ternary_row_bytes(BN_LAYOUT_TQ1, 6912) == 10 * 128 + 4 * 32 &&
              bn_ternary_row_bytes(BN_LAYOUT_I2, 6912) == 1728 && bn_ternary_row_bytes(BN_LAYOUT_COUNT, 128) == 0 &&
              bn_ternary_row_bytes(BN_LAYOUT_TQ1, 100) == 0,
          "bn_ternary_row_bytes");
    CHECK(bn_gemm_ternary(NULL, BN_ISA_SCALAR, BN_LAYOUT_COUNT, w, 1, kp, xq, &xsum, 1, got) == -1,
          "an unknown layout must be refused");
    free(w), free(xq);
}

#if BN_HAVE_AVXVNNI
/* bn_dpbusd_avxvnni is vpdpbusd: acc + four u8 x s8 products per int32 lane, over every byte value (the
 * instruction itself where the CPU has it, the emulation of -DBN_EMULATE_AVXVNNI builds otherwise) */
AVXVNNI_TARGET static void dpbusd_lanes(const uint8_t *u, const int8_t *x, const int32_t *acc, int32_t *out) {
    __m256i r = bn_dpbusd_avxvnni(_mm256_loadu_si256((const __m256i *)acc), _mm256_loadu_si256((const __m256i *)u),
                                  _mm256_loadu_si256((const __m256i *)x));
    _mm256_storeu_si256((__m256i *)out, r);
}

static void test_dpbusd_avxvnni(void) {
    if (!bn_isa_available(BN_ISA_AVXVNNI)) return;
    for (int trial = 0; trial < 4096; trial++) {
        uint8_t u[32];
        int8_t x[32];
        int32_t acc[8], got[8];
        for (int i = 0; i < 32; i++) /* the first 256 trials: every u8 value against s8's extremes */
            u[i] = (uint8_t)(trial < 256 ? (uint32_t)trial : rnd()),
            x[i] = (int8_t)(trial < 256 ? (i % 2 ? 127 : -128) : (int)(rnd() % 256) - 128);
        for (int l = 0; l < 8; l++) acc[l] = (int32_t)rnd() / 2;
        dpbusd_lanes(u, x, acc, got);
        for (int l = 0; l < 8; l++) {
            int32_t want = acc[l];
            for (int i = 0; i < 4; i++) want += u[4 * l + i] * x[4 * l + i];
            CHECK(got[l] == want, "dpbusd lane %d: %d, want %d", l, got[l], want);
        }
    }
}
#endif

static void test_gemm_shapes(void) {
    static const int shapes[][3] = {{1, 1, 1},   {1, 7, 100},  {3, 5, 128},  {4, 33, 129}, {5, 64, 255},
                                    {8, 13, 384}, {9, 40, 1000}, {2, 31, 2560}, {17, 6, 200},
                                    {1, 9, 2560},  {1, 5, 6912}, {1, 3, 384}, {1, 11, 1100}, {6, 7, 6912},
                                    {7, 10, 384}, {16, 12, 1000}}; /* AVX2 groups of 8 tokens and every narrower tail */
    bn_pool *pool = bn_pool_new(3);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2], kp = (k + 127) / 128 * 128;
        uint8_t *w = random_weights(n, k, kp);
        float *x = malloc(sizeof(float) * m * k);
        for (int i = 0; i < m * k; i++) x[i] = rndf() * (i % 97 == 0 ? 50.0f : 1.0f);
        int8_t *xq = malloc((size_t)m * kp);
        float *scale = malloc(sizeof(float) * m);
        int32_t *xsum = malloc(sizeof(int32_t) * m);
        bn_quantize_rows(BN_ISA_SCALAR, x, m, k, kp, xq, scale, xsum);
        int32_t *ref = malloc(sizeof(int32_t) * m * n), *got = malloc(sizeof(int32_t) * m * n);
        bn_gemm_ternary(NULL, BN_ISA_SCALAR, BN_LAYOUT_I2, w, n, kp, xq, xsum, m, ref);
        uint8_t *w5 = tq1_from_i2(w, n, kp);
        for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
            if (!bn_isa_available(isa)) continue;
            memset(got, 0x55, sizeof(int32_t) * m * n);
            CHECK(bn_gemm_ternary(pool, isa, BN_LAYOUT_I2, w, n, kp, xq, xsum, m, got) == 0, "isa %d refused", isa);
            CHECK(!memcmp(ref, got, sizeof(int32_t) * m * n), "isa %d differs from scalar at m=%d n=%d k=%d", isa,
                  m, n, k);
            /* the same trits in tq1_k640 give the same integer sums */
            memset(got, 0x55, sizeof(int32_t) * m * n);
            CHECK(bn_gemm_ternary(pool, isa, BN_LAYOUT_TQ1, w5, n, kp, xq, xsum, m, got) == 0, "isa %d refused", isa);
            CHECK(!memcmp(ref, got, sizeof(int32_t) * m * n), "tq1 isa %d differs from i2 at m=%d n=%d k=%d", isa, m,
                  n, k);
        }
        free(w5), free(w), free(x), free(xq), free(scale), free(xsum), free(ref), free(got);
    }
    bn_pool_free(pool);
}

/* The multi-token (GEMM) tiles: 2 rows x 4 tokens on AVX-512 VNNI, with 1-3 token and 1 row
 * tails, and AMX from 2 tokens on (groups of 32 rows x 1-2 token tiles up to 32 tokens, 16 rows x
 * 1-4 token tiles beyond; kp = 384 ends rows on one block of a two-block step; AVX2 takes rows of
 * more than 4096 inputs in spans of 16 blocks over tiles of 16 rows), integer and float
 * outputs, against the scalar reference for token counts around those sizes and row ranges of every parity (row kernels called directly on
 * [r0, r1), so tiles start on odd rows too; and through bn_gemm_ternary on a pool of 3 threads). */
static void test_gemm_tiles(void) {
    static const int ms[] = {2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 20, 24, 25,
                             31, 32, 33, 36, 40, 47, 48, 49, 63, 64, 65, 80};
    static const int ranges[][2] = {{0, 1}, {0, 2}, {1, 4}, {3, 10}, {2, 51}, {7, 55}, {0, 53}, {5, 58}, {1, 60}};
    static const int kps[] = {256, 384, 2560, 4224}; /* 4224: AVX2's spans of 16 blocks, and one */
    const int n = 61;
    bn_pool *pool = bn_pool_new(3);
    for (size_t a = 0; a < sizeof kps / sizeof kps[0]; a++) {
        const int kp = kps[a];
        uint8_t *w = random_weights(n, kp, kp);
        for (size_t b = 0; b < sizeof ms / sizeof ms[0]; b++) {
            const int m = ms[b];
            int8_t *xq = malloc((size_t)m * kp);
            int32_t *xsum = malloc(sizeof(int32_t) * m);
            for (int t = 0; t < m; t++) {
                xsum[t] = 0;
                for (int i = 0; i < kp; i++) xsum[t] += xq[(size_t)t * kp + i] = (int8_t)(rnd() % 256 - 128);
            }
            int32_t *ref = malloc(sizeof(int32_t) * m * n), *got = malloc(sizeof(int32_t) * m * n);
            int8_t *xa = aligned_alloc(64, bn_amx_xa_bytes(m, kp));
            bn_gemm_ternary(NULL, BN_ISA_SCALAR, BN_LAYOUT_I2, w, n, kp, xq, xsum, m, ref);
            for (int isa = 1; isa < BN_ISA_COUNT; isa++) {
                if (!bn_isa_available(isa)) continue;
                memset(got, 0x55, sizeof(int32_t) * m * n);
                bn_gemm_ternary(pool, isa, BN_LAYOUT_I2, w, n, kp, xq, xsum, m, got);
                CHECK(!memcmp(ref, got, sizeof(int32_t) * m * n), "isa %d tile differs from scalar at m=%d n=%d kp=%d",
                      isa, m, n, kp);
                for (size_t c = 0; c < sizeof ranges / sizeof ranges[0]; c++) {
                    const int r0 = ranges[c][0], r1 = ranges[c][1];
                    memset(got, 0x55, sizeof(int32_t) * m * n);
                    bn_amx_scratch amx = {xa, 0};
                    bn_i2_job job = {.w = w, .kp = kp, .xq = xq, .xsum = xsum, .m = m, .acc = got, .acc_stride = n,
                                     .amx = &amx};
                    bn_kernels_for(isa)->ternary[BN_LAYOUT_I2](&job, r0, r1);
                    int same = 1;
                    for (int t = 0; t < m; t++)
                        for (int r = 0; r < n; r++) {
                            int32_t want = r0 <= r && r < r1 ? ref[(size_t)t * n + r] : 0x55555555;
                            same &= got[(size_t)t * n + r] == want;
                        }
                    CHECK(same, "isa %d tile differs from scalar at m=%d kp=%d rows [%d, %d)", isa, m, kp, r0, r1);
                }
                /* the float output (y = acc / xscale * gamma, as the engine takes it), on ragged
                 * rows: the same bits as the scalar kernel's */
                float *yref = malloc(sizeof(float) * m * n), *ygot = malloc(sizeof(float) * m * n);
                float *xscale = malloc(sizeof(float) * m);
                for (int t = 0; t < m; t++) xscale[t] = 0.37f + 0.11f * (float)t;
                for (int c = 0; c < 2; c++) {
                    const int r0 = c ? 5 : 0, r1 = c ? 58 : n;
                    bn_amx_scratch amx = {xa, 0};
                    bn_i2_job job = {.w = w, .kp = kp, .xq = xq, .xsum = xsum, .m = m, .y = yref, .y_stride = n,
                                     .xscale = xscale, .gamma = 0.0123f, .amx = &amx};
                    memset(yref, 0, sizeof(float) * m * n);
                    memset(ygot, 0, sizeof(float) * m * n);
                    bn_kernels_for(BN_ISA_SCALAR)->ternary[BN_LAYOUT_I2](&job, r0, r1);
                    job.y = ygot;
                    bn_kernels_for(isa)->ternary[BN_LAYOUT_I2](&job, r0, r1);
                    CHECK(!memcmp(yref, ygot, sizeof(float) * m * n),
                          "isa %d float output differs from scalar at m=%d kp=%d rows [%d, %d)", isa, m, kp, r0, r1);
                }
                free(yref), free(ygot), free(xscale);
            }
            free(xq), free(xsum), free(ref), free(got), free(xa);
        }
        free(w);
    }
    bn_pool_free(pool);
}

/* The int16 bounds of the kernels at their extremes: every code 2 (or 0) against activations all
 * -128 (or 127), over rows long enough for many 8-block runs (and AVX2's 16-block spans, whose int16
 * sums reach -32768 exactly); m = 5 takes the VNNI GEMM tile,
 * whose lanes sum 64 * code 3 products, at the FFN's kp. */
static void test_gemm_extremes(void) {
    enum { n = 3, kp = 6912, M = 5 };
    uint8_t *w = malloc((size_t)n * kp / 4);
    int8_t *xq = malloc((size_t)M * kp);
    int32_t xsum[M], ref[M * n], got[M * n];
    for (int codes = 0; codes < 2; codes++)
        for (int xv = 0; xv < 2; xv++) {
            memset(w, codes ? 0xaa : 0x00, (size_t)n * kp / 4); /* all codes 2, or all 0 */
            memset(xq, xv ? 127 : -128, (size_t)M * kp);
            for (int t = 0; t < M; t++) xsum[t] = (xv ? 127 : -128) * kp;
            for (int m = 1; m <= M; m += 2) {
                bn_gemm_ternary(NULL, BN_ISA_SCALAR, BN_LAYOUT_I2, w, n, kp, xq, xsum, m, ref);
                for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
                    if (!bn_isa_available(isa)) continue;
                    bn_gemm_ternary(NULL, isa, BN_LAYOUT_I2, w, n, kp, xq, xsum, m, got);
                    CHECK(!memcmp(ref, got, sizeof(int32_t) * m * n), "isa %d extreme codes %d x %d m=%d", isa, codes,
                          xv, m);
                    uint8_t *w5 = tq1_from_i2(w, n, kp);
                    bn_gemm_ternary(NULL, isa, BN_LAYOUT_TQ1, w5, n, kp, xq, xsum, m, got);
                    CHECK(!memcmp(ref, got, sizeof(int32_t) * m * n), "tq1 isa %d extreme codes %d x %d m=%d", isa,
                          codes, xv, m);
                    free(w5);
                }
            }
        }
    free(w), free(xq);
}

static void test_stream_read(void) {
    size_t words = 1 << 15;
    uint64_t *buf = malloc(words * 8), want = 0;
    for (size_t i = 0; i < words; i++) want += buf[i] = i * 2654435761u;
    bn_pool *pool = bn_pool_new(4);
    CHECK(bn_stream_read(pool, buf, words * 8) == want, "stream_read checksum");
    bn_pool_free(pool);
    free(buf);
}

static float *random_floats(size_t n, float scale, float offset) {
    float *v = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) v[i] = offset + scale * rndf();
    return v;
}

static bn_q4_block *random_q4_rows(int n, int k) {
    int nb = bn_head_k(BN_EMB_Q4, k) / 64;
    bn_q4_block *w = malloc(sizeof(bn_q4_block) * n * nb);
    for (int i = 0; i < n * nb; i++) {
        w[i].sub[0] = (uint8_t)(i % 7 == 0 ? 255 : rnd() % 256);
        w[i].sub[1] = (uint8_t)(rnd() % 256);
        for (int b = 0; b < 32; b++) w[i].nib[b] = (uint8_t)rnd();
    }
    return w;
}

/* random q6 blocks: every code, scale and sign; d a random normal half (exponent 9..24) */
static bn_q6_block *random_q6_rows(int n, int k) {
    int nb = bn_head_k(BN_EMB_Q6, k) / 256;
    bn_q6_block *w = malloc(sizeof(bn_q6_block) * n * nb);
    for (int i = 0; i < n * nb; i++) {
        for (int b = 0; b < 128; b++) w[i].lo[b] = (uint8_t)rnd();
        for (int b = 0; b < 64; b++) w[i].hi[b] = (uint8_t)rnd();
        for (int g = 0; g < 16; g++) w[i].sc[g] = (int8_t)(g == i % 16 ? -128 : (int)(rnd() % 256) - 128);
        w[i].d = (uint16_t)(((9 + rnd() % 16) << 10) | (rnd() & 0x3ff) | (rnd() & 1 ? 0x8000 : 0));
    }
    return w;
}

/* a q6 row's logit numerator straight from the layout's definition in bitnet.h: per block the
 * integer sum of sc * q * x, then d * sum added in block order */
static float q6_sum_by_definition(const bn_q6_block *row, const int8_t *x, int kq) {
    float s = 0.0f;
    for (int b = 0; b < kq / 256; b++) {
        int32_t acc = 0;
        for (int i = 0; i < 256; i++) {
            int lo = (row[b].lo[32 * (i / 64) + i % 32] >> (4 * (i % 64 / 32))) & 15;
            int hi = (row[b].hi[32 * (i / 128) + i % 32] >> (2 * (i % 128 / 32))) & 3;
            acc += row[b].sc[i / 16] * ((lo | hi << 4) - 32) * x[256 * b + i];
        }
        s += bn_f16_to_f32(row[b].d) * (float)acc;
    }
    return s;
}

/* sum of sub * q * x over a q4 row, straight from the layout's definition in bitnet.h */
static int32_t q4_dot_by_definition(const bn_q4_block *row, const int8_t *x, int kq) {
    int32_t acc = 0;
    for (int i = 0; i < kq; i++) {
        const bn_q4_block *b = row + i / 64;
        int half = i % 64 / 32, u = (b->nib[i % 32] >> (4 * half)) & 15;
        acc += b->sub[half] * (u - 8) * x[i];
    }
    return acc;
}

/* The output head on ragged shapes and 1..17, 32, 33, 40 and 64 tokens (tiles of up to 8 tokens on AVX2 and 16
 * on AVX-512 VNNI and AMX, and every narrower tail; the shapes of 301 rows span several blocks of rows, the
 * last one ragged, and 17 tokens two tiles that each pass every block; AVX2's q6 prepares 16 tokens at
 * a time, once a call up to 16 and once per block beyond: 20 tokens on 1200 rows, whose chunks of 300
 * rows span two blocks of its 630-byte rows; AMX passes take two row strips
 * and two token tiles, k % 64 inputs and k < 64 beside them; the AMX q6 head, from 7 tokens, 16-row
 * strips with the ragged rows on the VNNI path, one to four token tiles, k padded to 256): int8, q4 and q6 rows
 * are an exact integer dot, so every ISA matches the scalar path bit for bit (and the integer sum
 * computed here); f16 rows agree up to float summation order. */
static void test_head(void) {
    static const int shapes[][3] = {{1, 1, 1},   {3, 9, 31},   {5, 37, 100},
                                    {4, 64, 2560}, {2, 7, 33}, {1, 3, 8192}, {11, 301, 700}, {1, 5, 100}, {1, 4, 40},
                                    {16, 67, 2560}, {17, 301, 700}, {6, 21, 300}, {7, 21, 520}, {8, 21, 300},
                                    {9, 21, 520}, {10, 13, 300}, {12, 13, 520}, {13, 13, 300}, {14, 13, 520},
                                    {15, 13, 300}, {2, 48, 2560}, {33, 70, 640}, {40, 301, 700}, {32, 64, 128},
                                    {64, 35, 300}, {9, 16, 256}, {20, 1200, 700}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        uint16_t *w16 = malloc(sizeof(uint16_t) * n * k);
        int8_t *w8 = malloc((size_t)n * k);
        bn_q4_block *w4 = random_q4_rows(n, k);
        bn_q6_block *w6 = random_q6_rows(n, k);
        for (int i = 0; i < n * k; i++) {
            w16[i] = (uint16_t)(0x2000 + rnd() % 0x1000) | (rnd() & 1 ? 0x8000 : 0);
            w8[i] = (int8_t)(i % 11 == 0 ? -128 : (int)(rnd() % 256) - 128); /* -128 included */
        }
        float *wscale = random_floats(n, 0.01f, 0.02f), *h = random_floats((size_t)m * k, 1.0f, 0.0f), hscale[64];
        float *ref = malloc(sizeof(float) * m * n), *got = malloc(sizeof(float) * m * n);
        for (int type = 0; type < BN_EMB_COUNT; type++) {
            const void *w = type == BN_EMB_Q6   ? (const void *)w6
                            : type == BN_EMB_Q4 ? (const void *)w4
                            : type == BN_EMB_I8 ? (const void *)w8
                                                : w16;
            int kq = bn_head_k(type, k);
            int8_t *hq = malloc((size_t)m * kq);
            int32_t hsum[64];
            bn_quantize_rows(BN_ISA_SCALAR, h, m, k, kq, hq, hscale, hsum);
            bn_head_job j = {.w = w, .wscale = wscale, .k = kq, .h = h, .hq = hq, .hscale = hscale,
                             .m = m, .y = ref, .y_stride = n};
            bn_kernels_for(BN_ISA_SCALAR)->head[type](&j, 0, n);
            for (int t = 0; type == BN_EMB_Q6 && t < m; t++)
                for (int r = 0; r < n; r++)
                    CHECK(ref[t * n + r] == q6_sum_by_definition(w6 + (size_t)r * (kq / 256), hq + (size_t)t * kq, kq) /
                                                hscale[t],
                          "head type q6 scalar at k=%d", k);
            for (int t = 0; (type == BN_EMB_I8 || type == BN_EMB_Q4) && t < m; t++)
                for (int r = 0; r < n; r++) {
                    int32_t acc = 0;
                    if (type == BN_EMB_Q4)
                        acc = q4_dot_by_definition(w4 + (size_t)r * (kq / 64), hq + (size_t)t * kq, kq);
                    else
                        for (int i = 0; i < k; i++) acc += w8[(size_t)r * k + i] * hq[(size_t)t * k + i];
                    CHECK(ref[t * n + r] == (float)acc / hscale[t] * wscale[r], "head type %d scalar at k=%d", type,
                          k);
                }
            for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
                if (!bn_isa_available(isa)) continue;
                /* through the public entry point too, which quantises h itself */
                CHECK(bn_head_logits(NULL, isa, type, w, wscale, n, k, h, m, got) == 0, "bn_head_logits refused");
                for (int i = 0; i < m * n; i++)
                    CHECK(type != BN_EMB_F16 ? got[i] == ref[i] : fabsf(got[i] - ref[i]) < 1e-4f * (1 + fabsf(ref[i])),
                          "head type %d isa %d differs from scalar at m=%d n=%d k=%d", type, isa, m, n, k);
            }
            free(hq);
        }
        free(w16), free(w8), free(w4), free(w6), free(wscale), free(h), free(ref), free(got);
    }
}

/* Groups of 1..6 query heads against ragged head sizes (256: the smaller value blocks) and a
 * sparse list of cache rows: every ISA's grouped kernel gives, bit for bit, what the scalar kernel
 * gives for each head alone (the float operations of a head run in one fixed order). For an f16
 * cache, the reference is the scalar kernel on an f32 cache of the same (widened) values: reading
 * f16 changes nothing but the element type. */
static void test_attention(void) {
    static const int head_dims[] = {2, 7, 18, 64, 100, 128, 256};
    enum { ROWS = 101, MAX_HEADS = 6 };
    for (size_t s = 0; s < sizeof head_dims / sizeof head_dims[0]; s++) {
        int hd = head_dims[s], keys[ROWS], n = 0;
        for (int r = 0; r < ROWS; r++)
            if (r < 5 || rnd() % 3) keys[n++] = r; /* a shared prefix, then a sparse branch */
        float *q = random_floats((size_t)MAX_HEADS * hd, 2.0f, -1.0f), *kc = random_floats((size_t)ROWS * hd, 2.0f, -1.0f),
              *vc = random_floats((size_t)ROWS * hd, 2.0f, -1.0f), sc[MAX_HEADS * ROWS], ref[MAX_HEADS * 256],
              got[MAX_HEADS * 256];
        uint16_t *kh = malloc(sizeof(uint16_t) * ROWS * hd), *vh = malloc(sizeof(uint16_t) * ROWS * hd);
        float *kw = malloc(sizeof(float) * ROWS * hd), *vw = malloc(sizeof(float) * ROWS * hd);
        for (int i = 0; i < ROWS * hd; i++) {
            kh[i] = bn_f32_to_f16(kc[i]), vh[i] = bn_f32_to_f16(vc[i]);
            kw[i] = bn_f16_to_f32(kh[i]), vw[i] = bn_f16_to_f32(vh[i]);
        }
        for (int kv_type = 0; kv_type < BN_KV_COUNT; kv_type++) {
            const int f16 = kv_type == BN_KV_F16;
            const void *kcache = f16 ? (const void *)kh : kc, *vcache = f16 ? (const void *)vh : vc;
            for (int len = 1; len <= n; len += len < 9 ? 1 : 7) {
                for (int h = 0; h < MAX_HEADS; h++) { /* the f32 reference, on the widened values for f16 */
                    bn_attn_job one = {.q = q + h * hd, .kc = f16 ? kw : kc, .vc = f16 ? vw : vc, .kv_type = BN_KV_F32,
                                       .keys = keys, .n = len, .hd = hd, .heads = 1, .scale = 0.125f, .sc = sc,
                                       .out = ref + h * hd};
                    bn_kernels_for(BN_ISA_SCALAR)->attend(&one);
                }
                for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
                    if (!bn_isa_available(isa)) continue;
                    for (int heads = 1; heads <= MAX_HEADS; heads++) {
                        memset(got, 0x55, sizeof got);
                        bn_attn_job j = {.q = q, .kc = kcache, .vc = vcache, .kv_type = kv_type, .keys = keys, .n = len,
                                         .hd = hd, .heads = heads, .scale = 0.125f, .sc = sc, .out = got,
                                         .next_k = kcache}; /* a prefetch hint: changes no bit */
                        bn_kernels_for(isa)->attend(&j);
                        CHECK(!memcmp(got, ref, sizeof(float) * heads * hd),
                              "attention isa %d kv_type %d differs at hd=%d keys=%d heads=%d", isa, kv_type, hd, len,
                              heads);
                    }
                }
            }
        }
        free(q), free(kc), free(vc), free(kh), free(vh), free(kw), free(vw);
    }
}

/* The attention's softmax (exp_poly, the eight-lane sums) against the same attention in double,
 * on every ISA: scores scaled from a few units to thousands (exponents far below exp_poly's
 * clamp, where a weight is negligible against the top one's 1) and key counts around the lanes'
 * multiples. Each output lies within a few float ulps of the sum of |p v|. */
static void test_attention_accuracy(void) {
    enum { HD = 40, ROWS = 67 };
    static const float scales[] = {0.05f, 1.0f, 30.0f, 1000.0f};
    float *q = random_floats(HD, 2.0f, -1.0f), *kc = random_floats((size_t)ROWS * HD, 2.0f, -1.0f),
          *vc = random_floats((size_t)ROWS * HD, 2.0f, -1.0f), sc[ROWS], got[HD];
    int keys[ROWS];
    for (int j = 0; j < ROWS; j++) keys[j] = j;
    for (size_t s = 0; s < sizeof scales / sizeof scales[0]; s++)
        for (int n = 1; n <= ROWS; n += n < 17 ? 1 : 25) {
            double p[ROWS], mx = -INFINITY, sum = 0.0;
            for (int j = 0; j < n; j++) {
                double d = 0.0;
                for (int e = 0; e < HD; e++) d += (double)q[e] * kc[j * HD + e];
                p[j] = (double)(float)((float)d * scales[s]); /* the score the kernels round to */
                mx = p[j] > mx ? p[j] : mx;
            }
            for (int j = 0; j < n; j++) sum += p[j] = exp(p[j] - mx);
            for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
                if (!bn_isa_available(isa)) continue;
                bn_attn_job a = {.q = q, .kc = kc, .vc = vc, .kv_type = BN_KV_F32, .keys = keys, .n = n, .hd = HD,
                                 .heads = 1, .scale = scales[s], .sc = sc, .out = got};
                bn_kernels_for(isa)->attend(&a);
                for (int e = 0; e < HD; e++) {
                    double want = 0.0, size = 0.0;
                    for (int j = 0; j < n; j++) want += p[j] / sum * vc[j * HD + e], size += fabs(p[j] / sum * vc[j * HD + e]);
                    CHECK(fabs(got[e] - want) <= 1e-5 * size + 1e-30, "attention isa %d scale %g keys %d: %g against %g",
                          isa, scales[s], n, got[e], want);
                }
            }
        }
    free(q), free(kc), free(vc);
}

#if BN_X86
__attribute__((target("f16c"))) static uint16_t f16c_convert(float x) {
    return (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(x), _MM_FROUND_TO_NEAREST_INT), 0);
}
#endif

/* bn_f32_to_f16, the KV cache's rounding: the exact inverse of bn_f16_to_f32 on every f16 value
 * (NaNs stay NaN); round to nearest even at the ties and edges of every range (largest finite,
 * overflow, subnormals, underflow); and, where the CPU has F16C, equal to its conversion on every
 * exponent and sign with the mantissa's low bits around each rounding boundary. */
static void test_f32_to_f16(void) {
    for (uint32_t h = 0; h < 0x10000; h++) {
        uint16_t back = bn_f32_to_f16(bn_f16_to_f32((uint16_t)h));
        int nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        CHECK(nan ? (back & 0x7c00) == 0x7c00 && (back & 0x3ff) && (back & 0x8000) == (h & 0x8000) : back == h,
              "f16 0x%04x comes back as 0x%04x", h, back);
    }
    static const struct {
        float x;
        uint16_t h;
    } cases[] = {
        {1.0f, 0x3c00}, {-2.0f, 0xc000}, {65504.0f, 0x7bff}, {65519.99f, 0x7bff}, {65520.0f, 0x7c00},
        {1e10f, 0x7c00}, {-1e10f, 0xfc00}, {1.0f + 0x1p-11f, 0x3c00} /* a tie: to even */,
        {1.0f + 0x1p-10f + 0x1p-11f, 0x3c02} /* a tie: to even, up */, {1.0f + 0x1p-11f + 0x1p-20f, 0x3c01},
        {0x1p-14f, 0x0400}, {0x1p-24f, 0x0001}, {0x1p-25f, 0x0000} /* a tie: to even, zero */,
        {0x1p-25f + 0x1p-40f, 0x0001}, {0x3p-25f, 0x0002} /* 1.5 units: to even */, {0x1p-14f - 0x1p-26f, 0x0400},
        {-0.0f, 0x8000}, {1e-30f, 0x0000}, {0x1p-130f, 0x0000},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK(bn_f32_to_f16(cases[i].x) == cases[i].h, "f32 %a -> f16 0x%04x, not 0x%04x", (double)cases[i].x,
              bn_f32_to_f16(cases[i].x), cases[i].h);
#if BN_X86
    if (bn_isa_available(BN_ISA_AVX2)) {
        static const uint32_t low[] = {0, 1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x3000, 0x7fffff};
        for (uint32_t top = 0; top < (1u << 19); top++) /* sign, exponent, the mantissa's top 10 bits */
            for (size_t i = 0; i < sizeof low / sizeof low[0]; i++) {
                union {
                    uint32_t u;
                    float f;
                } v = {top << 13 | (low[i] & 0x1fff) | (low[i] > 0x1fff ? (rnd() & 0x1fff) : 0)};
                uint16_t want = f16c_convert(v.f), got = bn_f32_to_f16(v.f);
                CHECK(got == want, "f32 0x%08x -> f16 0x%04x, F16C gives 0x%04x", v.u, got, want);
            }
    }
#endif
    /* every ISA's cache write (bn_kernels.to_f16) gives bn_f32_to_f16's bits: on every sign,
     * exponent and top mantissa bits with low bits around the rounding boundaries, at lengths
     * around its lane counts (the tails go through the scalar loop) */
    enum { CHUNK = 4096 };
    static float src[CHUNK];
    static uint16_t want[CHUNK], got[CHUNK];
    static const uint32_t low[] = {0, 0xfff, 0x1000, 0x1001, 0x1fff};
    for (uint32_t top = 0, filled = 0; top < (1u << 19); top++)
        for (size_t i = 0; i < sizeof low / sizeof low[0]; i++) {
            union {
                uint32_t u;
                float f;
            } v = {top << 13 | low[i]};
            src[filled++] = v.f;
            if (filled < CHUNK && !(top == (1u << 19) - 1 && i == sizeof low / sizeof low[0] - 1)) continue;
            for (uint32_t e = 0; e < filled; e++) want[e] = bn_f32_to_f16(src[e]);
            for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
                const bn_kernels *k = bn_kernels_for(isa);
                if (!k) continue;
                const int n = (int)filled - (int)(top % 13); /* lengths below the chunk too */
                memset(got, 0xa5, sizeof got);
                k->to_f16(got, src, n);
                for (int e = 0; e < n; e++)
                    CHECK(got[e] == want[e], "isa %d: f32 %a -> f16 0x%04x, not 0x%04x", isa, (double)src[e], got[e],
                          want[e]);
                CHECK(n == CHUNK || got[n] == 0xa5a5, "isa %d wrote past %d elements", isa, n);
            }
            filled = 0;
        }
}

/* The float glue (residual add, relu^2 or SiLU gate, RMSNorm or none, int8 quantisation) on row
 * lengths around the lane counts: every ISA's copy gives the scalar bits; quantising inside the
 * glue gives what quantising its float output gives; and the scalar copy follows the definitions
 * (quantisation exactly, RMSNorm to float rounding, SiLU to a few ulp of libm's expf). */
static void test_glue(void) {
    static const int lengths[] = {1, 7, 8, 15, 16, 17, 33, 100, 255, 2560};
    enum { M = 3 };
    for (size_t s = 0; s < sizeof lengths / sizeof lengths[0]; s++) {
        int n = lengths[s], kp = (n + 127) / 128 * 128;
        float *x0 = random_floats((size_t)M * n, 3.0f, 0.0f), *add = random_floats((size_t)M * n, 1.0f, 0.0f),
              *up = random_floats((size_t)M * n, 1.0f, 0.0f), *w = random_floats(n, 0.2f, 1.0f);
        x0[0] = -0.0f, x0[n - 1] = 0.0f; /* signed zeros through relu and the absmax */
        if (n > 5) x0[5] = -x0[5] * 40.0f; /* a large value at some rows' absmax */
        float *x[2], *h[2], scale[2][M], qscale[M];
        int8_t *xq[2], *hq = malloc((size_t)M * kp);
        int32_t xsum[2][M], qsum[M];
        /* plain, residual add, relu^2 gate, SiLU gate, SiLU gate without a norm */
        for (int variant = 0; variant < 5; variant++) {
            const int gated = variant >= 2, silu = variant >= 3, normed = variant != 4;
            for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
                if (!bn_isa_available(isa)) continue;
                int c = isa != 0;
                x[c] = malloc(sizeof(float) * M * n), h[c] = malloc(sizeof(float) * M * n), xq[c] = malloc((size_t)M * kp);
                memset(xq[c], 0x55, (size_t)M * kp);
                bn_glue_job j = {.n = n, .kp = kp, .act = silu ? BN_ACT_SILU : BN_ACT_RELU2, .eps = 1e-5f,
                                 .w = normed ? w : NULL, .x = x[c], .add = variant == 1 ? add : NULL,
                                 .up = gated ? up : NULL, .h = h[c], .xscale = scale[c], .xsum = xsum[c]};
                memcpy(x[c], x0, sizeof(float) * M * n);
                bn_kernels_for(isa)->glue(&j, 0, M); /* float rows into h */
                memcpy(x[c], x0, sizeof(float) * M * n);
                j.xq = xq[c];
                bn_kernels_for(isa)->glue(&j, 0, M); /* int8 rows into xq */
                bn_kernels_for(isa)->quantize(h[c], M, n, kp, hq, qscale, qsum);
                CHECK(!memcmp(hq, xq[c], (size_t)M * kp) && !memcmp(qscale, scale[c], sizeof qscale) &&
                          !memcmp(qsum, xsum[c], sizeof qsum),
                      "glue isa %d quantises other than its float rows at n=%d variant %d", isa, n, variant);
                if (c) {
                    CHECK(!memcmp(x[0], x[1], sizeof(float) * M * n) && !memcmp(h[0], h[1], sizeof(float) * M * n) &&
                              !memcmp(xq[0], xq[1], (size_t)M * kp) && !memcmp(scale[0], scale[1], sizeof scale[0]) &&
                              !memcmp(xsum[0], xsum[1], sizeof xsum[0]),
                          "glue isa %d differs from scalar at n=%d variant %d", isa, n, variant);
                    bn_quantize_rows(isa, h[0], M, n, kp, hq, qscale, qsum); /* the public entry point */
                    CHECK(!memcmp(xq[0], hq, (size_t)M * kp), "bn_quantize_rows differs at n=%d", n);
                    free(x[1]), free(h[1]), free(xq[1]);
                }
            }
            for (int t = 0; t < M; t++) {
                const float *xr = x[0] + (size_t)t * n, *hr = h[0] + (size_t)t * n, *x0r = x0 + (size_t)t * n;
                double ss = 0;
                float amax = 0;
                int32_t sum = 0;
                for (int i = 0; i < n; i++) {
                    float v = x0r[i] + (variant == 1 ? add[(size_t)t * n + i] : 0.0f);
                    if (variant == 2) v = (x0r[i] > 0 ? x0r[i] * x0r[i] : 0.0f) * up[(size_t)t * n + i];
                    if (silu) {
                        v = x0r[i] / (1.0f + expf(-x0r[i])) * up[(size_t)t * n + i];
                        CHECK(fabsf(xr[i] - v) <= 4e-7f * fabsf(v) + 1e-30f, "glue SiLU gate at n=%d i=%d: %g vs %g", n,
                              i, xr[i], v);
                        v = xr[i];
                    }
                    CHECK(xr[i] == v, "glue residual/gate at n=%d variant %d", n, variant);
                    ss += (double)v * v;
                    amax = fabsf(hr[i]) > amax ? fabsf(hr[i]) : amax;
                }
                float r = (float)(1.0 / sqrt(ss / n + 1e-5));
                for (int i = 0; i < n; i++)
                    CHECK(normed ? fabsf(hr[i] - w[i] * xr[i] * r) <= 1e-6f * (1 + fabsf(hr[i])) : hr[i] == xr[i],
                          "rmsnorm at n=%d variant %d", n, variant);
                float sc = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
                for (int i = 0; i < kp; i++) {
                    float q = i < n ? nearbyintf(hr[i] * sc) : 0.0f;
                    q = q < -128 ? -128 : q > 127 ? 127 : q;
                    CHECK(xq[0][(size_t)t * kp + i] == (int8_t)q, "quantize at n=%d i=%d", n, i);
                    sum += (int32_t)q;
                }
                CHECK(scale[0][t] == sc && xsum[0][t] == sum, "quantize scale/sum at n=%d", n);
            }
            free(x[0]), free(h[0]), free(xq[0]);
        }
        free(x0), free(add), free(up), free(w), free(hq);
    }
}

/* SiLU over its whole range (exp_poly's clamps, signed zeros, infinities) on every ISA: the
 * scalar bits everywhere, within a few ulp of libm where the result is a normal float. */
static void test_glue_silu_range(void) {
    enum { N = 4007 };
    float *x0 = malloc(sizeof(float) * N), *up = malloc(sizeof(float) * N), *ref = malloc(sizeof(float) * N),
          *x = malloc(sizeof(float) * N), *h = malloc(sizeof(float) * N);
    for (int i = 0; i < N - 4; i++) x0[i] = -100.0f + 200.0f * i / (N - 5), up[i] = 1.0f;
    x0[N - 4] = -0.0f, x0[N - 3] = 0.0f, x0[N - 2] = INFINITY, x0[N - 1] = -INFINITY;
    for (int i = N - 4; i < N; i++) up[i] = 1.0f;
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        if (!bn_isa_available(isa)) continue;
        memcpy(x, x0, sizeof(float) * N);
        bn_glue_job j = {.n = N, .kp = N, .act = BN_ACT_SILU, .x = x, .up = up, .h = h};
        bn_kernels_for(isa)->glue(&j, 0, 1);
        if (isa == 0) {
            memcpy(ref, x, sizeof(float) * N);
            for (int i = 0; i < N - 2; i++) { /* the infinities apart: inf - inf */
                float want = x0[i] / (1.0f + expf(-x0[i]));
                if (fabsf(want) > 1e-30f)
                    CHECK(fabsf(x[i] - want) <= 3e-7f * fabsf(want), "SiLU(%g) = %g, libm %g", x0[i], x[i], want);
                else
                    CHECK(fabsf(x[i]) < 1e-30f, "SiLU(%g) = %g, libm %g", x0[i], x[i], want);
            }
            CHECK(x[N - 2] == INFINITY, "SiLU(inf) = %g", x[N - 2]);
        } else {
            CHECK(!memcmp(x, ref, sizeof(float) * N), "SiLU isa %d differs from scalar", isa);
        }
    }
    free(x0), free(up), free(ref), free(x), free(h);
}

/* q4 at its int32 bound: every code 0 (q = -8) and sub 255 against x = +-127 over 8192 inputs */
static void test_head_q4_extremes(void) {
    const int n = 2, k = 8192, nb = k / 64;
    bn_q4_block *w = malloc(sizeof(bn_q4_block) * n * nb);
    memset(w, 0, sizeof(bn_q4_block) * n * nb);
    for (int i = 0; i < n * nb; i++) w[i].sub[0] = w[i].sub[1] = 255;
    float *h = malloc(sizeof(float) * k), wscale[2] = {1.0f, 1.0f}, ref[2], got[2];
    for (int sign = -1; sign <= 1; sign += 2) {
        for (int i = 0; i < k; i++) h[i] = (float)sign;
        bn_head_logits(NULL, BN_ISA_SCALAR, BN_EMB_Q4, w, wscale, n, k, h, 1, ref);
        /* acc = 255 * -8 * (127 sign) * 8192, over x_scale = 127 */
        CHECK(ref[0] == (float)(255.0 * -8 * 127 * sign * 8192) / 127.0f, "q4 scalar at the int32 bound: %g", ref[0]);
        for (int isa = 1; isa < BN_ISA_COUNT; isa++) {
            if (!bn_isa_available(isa)) continue;
            bn_head_logits(NULL, isa, BN_EMB_Q4, w, wscale, n, k, h, 1, got);
            CHECK(got[0] == ref[0] && got[1] == ref[1], "q4 isa %d at the int32 bound", isa);
        }
    }
    free(w), free(h);
}

/* q6 at its bounds: every code 0 (q = -32) or 63 (q = 31), every scale -128 or 127, against x =
 * +-127, over 8192 inputs, for one token (the row kernels) and nine (a tile of eight and one of
 * one; on AMX a strip of 16 rows and the VNNI path for the last two): the int16 pair sums (two of
 * them added in int16 by the tiles), the AMX head's split weights and the int32 block sums at
 * their largest */
static void test_head_q6_extremes(void) {
    enum { N = 18, K = 8192, NB = K / 256, M = 9 };
    bn_q6_block *w = malloc(sizeof(bn_q6_block) * N * NB);
    float *h = malloc(sizeof(float) * K * M), ref[N * M], got[N * M];
    for (int code = 0; code < 2; code++)
        for (int scale = 0; scale < 2; scale++)
            for (int sign = -1; sign <= 1; sign += 2) {
                memset(w, code ? 0xff : 0, sizeof(bn_q6_block) * N * NB);
                for (int i = 0; i < N * NB; i++) {
                    memset(w[i].sc, scale ? 127 : 0x80, 16);
                    w[i].d = 0x3c00; /* 1.0 */
                }
                for (int i = 0; i < K * M; i++) h[i] = (float)sign;
                const double block = (scale ? 127.0 : -128.0) * (code ? 31 : -32) * 127 * sign * 256;
                for (int m = 1; m <= M; m += M - 1) {
                    bn_head_logits(NULL, BN_ISA_SCALAR, BN_EMB_Q6, w, NULL, N, K, h, m, ref);
                    for (int i = 0; i < N * m; i++)
                        CHECK(ref[i] == (float)(block * NB) / 127.0f, "q6 scalar at its bounds: %g", ref[i]);
                    for (int isa = 1; isa < BN_ISA_COUNT; isa++) {
                        if (!bn_isa_available(isa)) continue;
                        bn_head_logits(NULL, isa, BN_EMB_Q6, w, NULL, N, K, h, m, got);
                        for (int i = 0; i < N * m; i++)
                            CHECK(got[i] == ref[i], "q6 isa %d at its bounds, %d tokens", isa, m);
                    }
                }
            }
    free(w), free(h);
}

/* A random 2-layer model (odd sizes) through bn_forward, once per ISA and thread count: the integer
 * kernels are exact, so logits agree across ISAs up to the head's float summation order. As BitNet
 * b1.58, and as the Llama family: SiLU gate, no sub-norms, heads * head_dim (96) != hidden (72).
 * With extras: q/k/v biases (Qwen2) and every projection's own input norm (use_rms_norm). */
static void test_decoder(int llama, int extras, int kv_type) {
    enum { L = 2, H = 72, F = 136, NH = 4, NKV = 1, V = 61, CTX = 40 };
    const int HD = llama ? 24 : 18, QD = NH * HD;
    int kph = 128, kpf = 256, kpq = (QD + 127) / 128 * 128;
    uint16_t *emb = malloc(sizeof(uint16_t) * V * H);
    for (int i = 0; i < V * H; i++) emb[i] = (uint16_t)(0x2000 + rnd() % 0x1000) | (rnd() & 1 ? 0x8000 : 0);
    float *cs = malloc(sizeof(float) * CTX * HD / 2), *sn = malloc(sizeof(float) * CTX * HD / 2);
    for (int p = 0; p < CTX; p++)
        for (int i = 0; i < HD / 2; i++) {
            double a = p * pow(10000.0, -2.0 * i / HD);
            cs[p * HD / 2 + i] = (float)cos(a), sn[p * HD / 2 + i] = (float)sin(a);
        }
    bn_layer_desc layers[L];
    for (int l = 0; l < L; l++)
        layers[l] = (bn_layer_desc){random_floats(H, 0.2f, 1), random_floats(H, 0.2f, 1),
                                    llama ? NULL : random_floats(QD, 0.2f, 1), llama ? NULL : random_floats(F, 0.2f, 1),
                                    random_weights(QD, H, kph), random_weights(NKV * HD, H, kph),
                                    random_weights(NKV * HD, H, kph), random_weights(H, QD, kpq),
                                    random_weights(F, H, kph), random_weights(F, H, kph), random_weights(H, F, kpf),
                                    0.05f, 0.05f, 0.05f, 0.05f, 0.05f, 0.05f, 0.05f,
                                    extras ? random_floats(QD, 0.5f, 0) : NULL,
                                    extras ? random_floats(NKV * HD, 0.5f, 0) : NULL,
                                    extras ? random_floats(NKV * HD, 0.5f, 0) : NULL,
                                    extras ? random_floats(H, 0.2f, 1) : NULL, extras ? random_floats(H, 0.2f, 1) : NULL,
                                    extras ? random_floats(H, 0.2f, 1) : NULL, extras ? random_floats(QD, 0.2f, 1) : NULL,
                                    extras ? random_floats(H, 0.2f, 1) : NULL, extras ? random_floats(H, 0.2f, 1) : NULL,
                                    extras ? random_floats(F, 0.2f, 1) : NULL};
    float *final_norm = random_floats(H, 0.2f, 1);
    bn_model_desc d = {L, H, F, NH, NKV, HD, V, CTX, 1e-5f, BN_EMB_F16, emb, NULL, BN_EMB_F16, emb, NULL,
                       final_norm, cs, sn, layers, llama ? BN_ACT_SILU : BN_ACT_RELU2, 1e-6f, BN_LAYOUT_I2, kv_type};
    if (extras) { /* the projection norms come all or none */
        const float *kept = layers[1].nu;
        layers[1].nu = NULL;
        char err[128];
        CHECK(bn_model_new(&d, 1, BN_ISA_SCALAR, err, sizeof err) == NULL && strstr(err, "6 of its 7"),
              "a layer with some projection norms must be refused: %s", err);
        layers[1].nu = kept;
    }
    /* the same weights in tq1_k640: the same logits, bit for bit */
    bn_layer_desc layers5[L];
    for (int l = 0; l < L; l++) {
        layers5[l] = layers[l];
        layers5[l].wq = tq1_from_i2(layers[l].wq, QD, kph), layers5[l].wk = tq1_from_i2(layers[l].wk, NKV * HD, kph);
        layers5[l].wv = tq1_from_i2(layers[l].wv, NKV * HD, kph), layers5[l].wo = tq1_from_i2(layers[l].wo, H, kpq);
        layers5[l].wg = tq1_from_i2(layers[l].wg, F, kph), layers5[l].wu = tq1_from_i2(layers[l].wu, F, kph);
        layers5[l].wd = tq1_from_i2(layers[l].wd, H, kpf);
    }
    bn_model_desc d5 = d;
    d5.layers = layers5, d5.layout = BN_LAYOUT_TQ1;
    int32_t tokens[CTX];
    for (int i = 0; i < CTX; i++) tokens[i] = (int32_t)(rnd() % V);
    float *ref = NULL;
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        if (!bn_isa_available(isa)) continue;
        for (int threads = 1; threads <= 3; threads += 2) {
            char err[128];
            bn_model *m = bn_model_new(&d, threads, isa, err, sizeof err);
            CHECK(m != NULL, "model: %s", err);
            if (!m) continue;
            float *all = malloc(sizeof(float) * CTX * V), *last = malloc(sizeof(float) * V);
            CHECK(bn_forward(m, tokens, 30, 0, all, 1) == 0, "prefill");
            /* decode the rest one token at a time, then re-run from position 20 (cache rewind) */
            for (int p = 30; p < CTX; p++) CHECK(bn_forward(m, tokens + p, 1, p, all + (size_t)p * V, 1) == 0, "decode");
            CHECK(bn_forward(m, tokens + 20, 20, 20, last, 0) == 0, "rewind");
            for (int i = 0; i < V; i++)
                CHECK(fabsf(last[i] - all[(size_t)(CTX - 1) * V + i]) < 1e-4f, "rewind changes logits");
            bn_model *m5 = bn_model_new(&d5, threads, isa, err, sizeof err);
            CHECK(m5 != NULL, "tq1 model: %s", err);
            if (m5) {
                float *all5 = malloc(sizeof(float) * CTX * V);
                CHECK(bn_forward(m5, tokens, 30, 0, all5, 1) == 0, "tq1 prefill");
                for (int p = 30; p < CTX; p++) bn_forward(m5, tokens + p, 1, p, all5 + (size_t)p * V, 1);
                CHECK(!memcmp(all, all5, sizeof(float) * CTX * V), "isa %d: tq1 logits differ from i2 (llama %d, kv %d)",
                      isa, llama, kv_type);
                free(all5);
                bn_model_free(m5);
            }
            CHECK(bn_forward(m, tokens, 1, CTX, last, 0) == -1, "past the context must be refused");
            int32_t bad = V;
            CHECK(bn_forward(m, &bad, 1, 0, last, 0) == -1, "token out of range must be refused");
            if (!ref) {
                ref = all;
            } else {
                for (int i = 0; i < CTX * V; i++)
                    CHECK(fabsf(ref[i] - all[i]) < 1e-3f * (1 + fabsf(ref[i])),
                          "isa %d logits differ (llama %d, extras %d, kv %d)", isa, llama, extras, kv_type);
                free(all);
            }
            free(last);
            bn_model_free(m);
        }
    }
    free(ref), free(emb), free(cs), free(sn), free(final_norm);
    for (int l = 0; l < L; l++) {
        const void *p[] = {layers[l].attn_norm, layers[l].post_norm, layers[l].attn_sub_norm, layers[l].ffn_sub_norm,
                           layers[l].wq, layers[l].wk, layers[l].wv, layers[l].wo, layers[l].wg, layers[l].wu,
                           layers[l].wd, layers[l].bq, layers[l].bk, layers[l].bv, layers[l].nq, layers[l].nk,
                           layers[l].nv, layers[l].no, layers[l].ng, layers[l].nu, layers[l].nd};
        for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free((void *)p[i]);
        const void *p5[] = {layers5[l].wq, layers5[l].wk, layers5[l].wv, layers5[l].wo, layers5[l].wg, layers5[l].wu,
                            layers5[l].wd};
        for (size_t i = 0; i < sizeof p5 / sizeof p5[0]; i++) free((void *)p5[i]);
    }
}

/* The dispatch table: every available ISA has every kernel; an ISA without its own version of a
 * kernel runs its fallback's (AVX-512 runs AVX2's head); unavailable ISAs and unknown types get
 * NULL / -1, and the public quantiser honours its isa argument. */
static void test_dispatch(void) {
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        const bn_kernels *k = bn_kernels_for(isa);
        CHECK(!k == !bn_isa_available(isa), "isa %d: table and availability disagree", isa);
        if (!k) {
            float x = 1.0f, s;
            int8_t q[BN_BLOCK_K];
            int32_t sum;
            CHECK(bn_quantize_rows(isa, &x, 1, 1, BN_BLOCK_K, q, &s, &sum) == -1, "isa %d: quantised anyway", isa);
            continue;
        }
        CHECK(k->ternary[BN_LAYOUT_I2] && k->ternary[BN_LAYOUT_TQ1] && k->quantize && k->glue && k->attend,
              "isa %d: empty slot", isa);
        for (int t = 0; t < BN_EMB_COUNT; t++) CHECK(k->head[t] && bn_head_type(t), "isa %d type %d: no head", isa, t);
    }
#if BN_X86
    if (bn_isa_available(BN_ISA_AVX512))
        CHECK(bn_kernels_for(BN_ISA_AVX512)->head[BN_EMB_F16] == bn_kernels_for(BN_ISA_AVX2)->head[BN_EMB_F16],
              "AVX-512 should run the AVX2 head");
#endif
    CHECK(!bn_kernels_for(-1) && !bn_kernels_for(BN_ISA_COUNT) && !bn_head_type(BN_EMB_COUNT) && !bn_head_type(-1),
          "out-of-range ids must give NULL");
}

/* The tuned path (BN_ISA_TUNED) with every pair of ISAs for GEMV and GEMM gives the scalar sums,
 * in both layouts; and every available ISA has a MAC peak probe that runs. */
static void test_tuned_and_peak(void) {
    const int n = 21, k = 1100, kp = (k + 127) / 128 * 128, m = 5;
    uint8_t *w = random_weights(n, k, kp), *w5 = tq1_from_i2(w, n, kp);
    int8_t *xq = malloc((size_t)m * kp);
    float *x = malloc(sizeof(float) * m * k), scale[5];
    int32_t xsum[5], ref[5 * 21], got[5 * 21];
    for (int i = 0; i < m * k; i++) x[i] = rndf();
    bn_quantize_rows(BN_ISA_SCALAR, x, m, k, kp, xq, scale, xsum);
    bn_gemm_ternary(NULL, BN_ISA_SCALAR, BN_LAYOUT_I2, w, n, kp, xq, xsum, m, ref);
    for (int gemv = 0; gemv < BN_ISA_COUNT; gemv++)
        for (int gemm = 0; gemm < BN_ISA_COUNT; gemm++) {
            int ok = bn_isa_available(gemv) && bn_isa_available(gemm);
            CHECK((bn_isa_tune(BN_LAYOUT_I2, gemv, gemm) == 0) == ok, "tune %d/%d: wrong answer", gemv, gemm);
            CHECK((bn_isa_tune(BN_LAYOUT_TQ1, gemv, gemm) == 0) == ok, "tune %d/%d: wrong answer", gemv, gemm);
            if (!ok) continue;
            for (int mm = 1; mm <= m; mm += m - 1) { /* the GEMV (1 token), then the GEMM */
                memset(got, 0x55, sizeof got);
                bn_gemm_ternary(NULL, BN_ISA_TUNED, BN_LAYOUT_I2, w, n, kp, xq, xsum, mm, got);
                CHECK(!memcmp(ref, got, sizeof(int32_t) * mm * n), "tuned %d/%d i2 m=%d differs", gemv, gemm, mm);
                memset(got, 0x55, sizeof got);
                bn_gemm_ternary(NULL, BN_ISA_TUNED, BN_LAYOUT_TQ1, w5, n, kp, xq, xsum, mm, got);
                CHECK(!memcmp(ref, got, sizeof(int32_t) * mm * n), "tuned %d/%d tq1 m=%d differs", gemv, gemm, mm);
            }
        }
    CHECK(bn_isa_tune(BN_LAYOUT_COUNT, 0, 0) == -1, "unknown layout tuned");
    bn_isa_tune(BN_LAYOUT_I2, bn_isa_best(), bn_isa_best());
    bn_isa_tune(BN_LAYOUT_TQ1, bn_isa_best(), bn_isa_best());
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        double peak = bn_mac_peak(isa, 1000);
        CHECK(bn_isa_available(isa) ? peak > 0 : peak == -1, "isa %d: MAC peak %g", isa, peak);
    }
    free(w), free(w5), free(xq), free(x);
}

int main(void) {
    printf("isas:");
    for (int isa = 0; isa < BN_ISA_COUNT; isa++)
        if (bn_isa_available(isa)) printf(" %d", isa);
    printf("\n");
    test_dispatch();
    test_tuned_and_peak();
#if BN_HAVE_AVXVNNI
    test_dpbusd_avxvnni();
#endif
    test_gemm_shapes();
    test_gemm_tiles();
    test_gemm_extremes();
    test_tq1_every_byte();
    test_stream_read();
    test_head();
    test_attention();
    test_attention_accuracy();
    test_glue();
    test_head_q4_extremes();
    test_head_q6_extremes();
    test_glue_silu_range();
    test_f32_to_f16();
    for (int kv_type = 0; kv_type < BN_KV_COUNT; kv_type++) {
        test_decoder(0, 0, kv_type);
        test_decoder(1, 0, kv_type);
        test_decoder(1, 1, kv_type);
        test_decoder(0, 1, kv_type);
    }
    if (failures) {
        printf("%d kernel test failures\n", failures);
        return 1;
    }
    printf("all kernel tests passed\n");
    return 0;
}
