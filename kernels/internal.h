/* Declarations shared by the kernel sources; not part of the cffi interface. */
#ifndef BITNET_INTERNAL_H
#define BITNET_INTERNAL_H

#include "bitnet.h"

#if defined(__x86_64__) || defined(__i386__)
#define BN_X86 1
#endif
#if defined(__aarch64__)
#define BN_ARM64 1
#endif

#if BN_X86
#include <immintrin.h>

/* The x86 SIMD kernels are compiled for their ISA function by function (no -march), so one build
 * runs everywhere and dispatch picks the path at run time. */
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
/* for float code that must round like the scalar path: no fused multiply-adds (f16c: the exact
 * f16 -> f32 widening of an f16 KV cache) */
#define AVX2_NOFMA_TARGET __attribute__((target("avx2,f16c")))

/* AVX-VNNI: vpdpbusd on 256-bit vectors (VEX), on Intel's client cores from Alder Lake, which have no AVX-512.
 * BN_HAVE_AVXVNNI where its kernels are built: compilers from GCC 11 and clang 12 know the instruction. A build with
 * -DBN_EMULATE_AVXVNNI (`make -C kernels test-avxvnni`) runs them on AVX2 alone, the instruction computed exactly by
 * bn_dpbusd_avxvnni below, so that a machine without it tests the kernels' logic against the scalar reference (qemu
 * 7.2 does not implement it). */
#if defined(BN_EMULATE_AVXVNNI)
#define BN_HAVE_AVXVNNI 1
#define AVXVNNI_TARGET AVX2_TARGET
/* acc + the sums of four u8 x s8 products per int32 lane, as vpdpbusd: each byte widened to int16 (u8 zero-extended,
 * s8 sign-extended), vpmaddwd's pairs, then hadd's pairs of pairs (within each 128-bit lane, in lane order) */
AVX2_TARGET static inline __m256i bn_dpbusd_avxvnni(__m256i acc, __m256i u, __m256i s) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i lo = _mm256_madd_epi16(_mm256_unpacklo_epi8(u, zero), _mm256_srai_epi16(_mm256_unpacklo_epi8(s, s), 8));
    __m256i hi = _mm256_madd_epi16(_mm256_unpackhi_epi8(u, zero), _mm256_srai_epi16(_mm256_unpackhi_epi8(s, s), 8));
    return _mm256_add_epi32(acc, _mm256_hadd_epi32(lo, hi));
}
#elif (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define BN_HAVE_AVXVNNI 1
#define AVXVNNI_TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
AVXVNNI_TARGET static inline __m256i bn_dpbusd_avxvnni(__m256i acc, __m256i u, __m256i s) {
    return _mm256_dpbusd_avx_epi32(acc, u, s);
}
#endif

/* AMX-INT8 (ternary.c's GEMM, peak.c): its kernels configure all eight tiles as 16 rows of 64
 * bytes (palette 1) and release them when done */
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,gfni,amx-tile,amx-int8")))
AMX_TARGET static inline void bn_amx_configure(void) {
    /* a constant, not a stack struct filled by a loop: GCC drops those stores as dead when this
     * function is not inlined (ldtilecfg's read of them is not modelled), leaving tiles of 0 bytes */
    static const struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((aligned(64))) cfg = {.palette = 1,
                                          .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
                                          .rows = {16, 16, 16, 16, 16, 16, 16, 16}};
    _tile_loadconfig(&cfg);
}

/* A stored C tile out[16][16] (rows x tokens) as its 16 columns: col[n] = token n's 16 rows, so
 * that each token's outputs leave as one vector (the outputs are token-major). Pairs, then quads,
 * then 128-bit lanes twice: 64 shuffles. */
AMX_TARGET static inline void bn_amx_tile_columns(const int32_t *out, __m512i col[16]) {
    __m512i v[16], w[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_load_si512(out + 16 * i);
    for (int i = 0; i < 16; i += 2) {
        w[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        w[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        v[i] = _mm512_unpacklo_epi64(w[i], w[i + 2]);
        v[i + 1] = _mm512_unpackhi_epi64(w[i], w[i + 2]);
        v[i + 2] = _mm512_unpacklo_epi64(w[i + 1], w[i + 3]);
        v[i + 3] = _mm512_unpackhi_epi64(w[i + 1], w[i + 3]);
    }
    /* v[4q + p] now holds, in 128-bit lane L, rows 4q..4q+3 of token 4L + p */
    for (int p = 0; p < 4; p++) {
        w[p] = _mm512_shuffle_i32x4(v[p], v[4 + p], 0x88);     /* lanes 0, 2 of rows 0-3 | 4-7 */
        w[4 + p] = _mm512_shuffle_i32x4(v[p], v[4 + p], 0xdd); /* lanes 1, 3 */
        w[8 + p] = _mm512_shuffle_i32x4(v[8 + p], v[12 + p], 0x88);
        w[12 + p] = _mm512_shuffle_i32x4(v[8 + p], v[12 + p], 0xdd);
    }
    for (int p = 0; p < 4; p++) {
        col[p] = _mm512_shuffle_i32x4(w[p], w[8 + p], 0x88);
        col[8 + p] = _mm512_shuffle_i32x4(w[p], w[8 + p], 0xdd);
        col[4 + p] = _mm512_shuffle_i32x4(w[4 + p], w[12 + p], 0x88);
        col[12 + p] = _mm512_shuffle_i32x4(w[4 + p], w[12 + p], 0xdd);
    }
}

AVX2_TARGET static inline int32_t bn_hsum_epi32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
#endif

/* ---- float helpers in plain operations (glue.c's SiLU, attention.c's softmax) --------------
 * Inlined into every ISA's copy of a loop, where gcc may vectorise them: without -ffast-math it
 * never reassociates or fuses, so each copy rounds as the scalar one does. */

/* A float's bits as an int32 and back. Without their sign bit, non-negative floats order like
 * their bits, and an int32 max vectorises where a float one cannot (a float compare-and-select
 * must keep NaN and signed-zero behaviour, which gcc only drops under -ffast-math). */
static inline __attribute__((always_inline)) int32_t float_bits(float v) {
    union { float f; int32_t i; } u = {v};
    return u.i;
}
static inline __attribute__((always_inline)) float bits_float(int32_t i) {
    union { int32_t i; float f; } u = {i};
    return u.f;
}

/* round half to even for |v| < 2^22 in plain float arithmetic (adding 1.5 * 2^23 leaves no
 * fraction bits), so the loop vectorises without SSE4.1 or a libm call per element */
static inline __attribute__((always_inline)) float round_even(float v) {
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

/* e^x to about 2 ulp for x in [-87.3, 88] (clamped there, a NaN to one of the ends): Cody-Waite
 * reduction x = n ln2 + r with |r| <= ln2/2, Cephes' degree-6 polynomial for e^r, and 2^n
 * assembled in the exponent bits. Only +, *, a float-to-int conversion of an integral value
 * and integer operations, so the baseline and AVX2 copies round identically. The clamp works
 * on the bits (magnitude vs the limit of the sign's side), as a float select would not vectorise. */
static inline __attribute__((always_inline)) float exp_poly(float x) {
    int32_t b = float_bits(x), sign = b & (int32_t)0x80000000, mag = b & 0x7fffffff;
    int32_t limit = sign ? float_bits(87.3f) : float_bits(88.0f);
    x = bits_float((mag < limit ? mag : limit) | sign);
    float n = round_even(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f; /* ln2 split in two: the high part is exact in n * hi */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    return p * bits_float(((int32_t)n + 127) << 23); /* n in [-126, 127]: a normal power of two */
}

/* The float steps between two matrix products (glue.c), for tokens [t0, t1) of rows of n:
 * x += add (a residual) when add is set; x = act(x) * up (the gated FFN, act = BN_ACT_RELU2:
 * relu(x)^2 or BN_ACT_SILU: x / (1 + exp(-x))) when up is set; then h = rmsnorm(x) * w, or
 * h = x when w is NULL (no norm), which goes either to int8 rows of kp in xq (as
 * bn_quantize_rows would quantise it) when xq is set, or else to the float rows of h. */
typedef struct {
    int n, kp;
    int act;
    float eps;
    const float *w;
    float *x;
    const float *add, *up;
    float *h;
    int8_t *xq;
    float *xscale;
    int32_t *xsum;
} bn_glue_job;

typedef void (*bn_glue_fn)(const bn_glue_job *job, int t0, int t1);
typedef void (*bn_quantize_fn)(const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum);

/* One ternary matrix product: rows of w (in the kernel's layout) against m quantised tokens. The kernel writes either
 * integers (acc != NULL) or the rescaled floats y = acc / xscale[t] * gamma. */
/* The AMX GEMM (ternary.c) multiplies tiles of 16 tokens' activations in an order of its own,
 * which one row chunk writes into xa for every chunk of the product (bn_amx_xa_bytes(m, kp)
 * bytes, 64-aligned; state 0 = not yet, 1 = being written, 2 = ready). Whoever runs a product on
 * several chunks (model.c, bn_gemm_ternary) sets state to 0 before it; the other ISAs ignore it. */
#define BN_AMX_MIN_TOKENS 2 /* from 2 tokens on (ternary.c: measured against the VNNI tile) */
typedef struct {
    int8_t *xa;
    int state;
} bn_amx_scratch;
size_t bn_amx_xa_bytes(int m, int kp);
#if BN_X86
/* m tokens' k int8 inputs (k / 64 whole chunks) as tdpbusd/tdpbssd B tiles, in xa's order (ternary.c) */
void bn_amx_tokens_to_tiles(const int8_t *x, int m, int k, int8_t *xa);
#endif

typedef struct {
    const uint8_t *w;
    int kp;
    const int8_t *xq;
    const int32_t *xsum;
    int m;
    int32_t *acc;
    int acc_stride;
    float *y;
    int y_stride;
    const float *xscale;
    float gamma;
    bn_amx_scratch *amx; /* NULL, or where the AMX GEMM (m >= BN_AMX_MIN_TOKENS) reorders xq once */
} bn_i2_job;

typedef void (*bn_i2_rows_fn)(const bn_i2_job *job, int r0, int r1);

static inline void bn_i2_store(const bn_i2_job *j, int t, int r, int32_t sum_qx) {
    /* codes are T+1, so sum q*x = sum T*x + sum x */
    int32_t acc = sum_qx - j->xsum[t];
    if (j->acc)
        j->acc[(size_t)t * j->acc_stride + r] = acc;
    else
        j->y[(size_t)t * j->y_stride + r] = (float)acc / j->xscale[t] * j->gamma;
}

/* The output head: y[t][r] = dot(row r, h[t]) for r in [r0, r1) and m hidden vectors, by a row
 * kernel of the rows' type (bn_kernels.head[type]).
 * f16 rows: a float dot with h. int8 and q4 rows (bitnet.h): an exact integer dot with h quantised
 * per token like a BitLinear input (hq, hscale from bn_quantize_rows with kp = k), then
 * y = acc / hscale[t] * wscale[r]. */
typedef struct {
    const void *w;
    const float *wscale;
    int k;               /* inputs per row; for q4 and q6 the padded count, bn_head_k() */
    const float *h;      /* [m][k], f16 rows */
    const int8_t *hq;    /* [m][k], int8, q4 and q6 rows */
    const float *hscale; /* [m], int8, q4 and q6 rows */
    int m;
    float *y;
    int y_stride;
} bn_head_job;

typedef void (*bn_head_rows_fn)(const bn_head_job *job, int r0, int r1);

/* What the engine needs to know of a row storage type (BN_EMB_*), one entry per type in head.c;
 * its row kernels per ISA are in dispatch.c's table. */
typedef struct {
    const char *name;
    int block;     /* inputs per storage block: rows are padded to a multiple (bn_head_k) */
    int max_k;     /* the longest padded row whose integer sums fit int32; 0: no limit */
    int quantized; /* the head dots rows with the hidden state quantised to int8 (hq), not floats */
    /* out[0..hidden) = row `row` of rows (with its scale, for scaled types) as floats: the
     * embedding lookup, equal to bitnet_cli.pack.embeddings' decode */
    void (*row_to_f32)(const void *rows, const float *scale, int row, int hidden, float *out);
} bn_head_traits;

/* The traits of a type, or NULL for an unknown one. */
const bn_head_traits *bn_head_type(int type);

/* The row length the head kernels see: rows padded to whole storage blocks (q4: 64 inputs). */
int bn_head_k(int type, int hidden);

/* All `rows` rows of a head job, split over the pool. */
void bn_head_run(bn_pool *pool, bn_head_rows_fn fn, const bn_head_job *job, int rows);

/* Attention of `heads` query heads sharing one KV head, over its cache rows keys[0..n) (rows of
 * hd elements of kv_type, BN_KV_*: f16 elements are widened to f32 as they are read):
 * out[h] = softmax(scale * q[h].k) . v for q and out [heads][hd], with sc[heads][n] as scratch.
 * Each cache row is read once for all the heads. Float arithmetic in one fixed order per head,
 * whatever `heads` or kv_type is, so the SIMD versions give the scalar result bit for bit. */
typedef struct {
    const float *q;
    const void *kc, *vc;
    int kv_type;
    const int *keys;
    int n, hd, heads;
    float scale;
    float *sc, *out;
    const void *next_k; /* the first K row of the job this thread runs next (the SIMD kernels prefetch
                         * its first rows as they finish this one), or NULL */
} bn_attn_job;

typedef void (*bn_attn_fn)(const bn_attn_job *job);

/* The f16 KV cache's write: dst[i] = bn_f32_to_f16(src[i]) for i < n, every ISA bit for bit. */
typedef void (*bn_to_f16_fn)(uint16_t *dst, const float *src, int n);

/* ---- dispatch (dispatch.c) ------------------------------------------------------------ */

/* The kernels one ISA runs. */
typedef struct {
    bn_i2_rows_fn ternary[BN_LAYOUT_COUNT]; /* by weight layout, BN_LAYOUT_* */
    bn_quantize_fn quantize;
    bn_glue_fn glue;
    bn_attn_fn attend;
    bn_head_rows_fn head[BN_EMB_COUNT]; /* by row type, BN_EMB_* */
    bn_to_f16_fn to_f16;
} bn_kernels;

/* The kernels of an isa, or NULL when this build/CPU lacks it. */
const bn_kernels *bn_kernels_for(int isa);

/* Every kernel, per ISA, as dispatch.c gathers them (each SIMD one equals its scalar reference
 * bit for bit: kernels/test_kernels.c). */
void bn_i2_rows_scalar(const bn_i2_job *j, int r0, int r1);
void bn_tq1_rows_scalar(const bn_i2_job *j, int r0, int r1);
void bn_quantize_rows_scalar(const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum);
void bn_glue_rows_scalar(const bn_glue_job *j, int t0, int t1);
void bn_attend_scalar(const bn_attn_job *a);
void bn_to_f16_scalar(uint16_t *dst, const float *src, int n);
void bn_head_rows_f16_scalar(const bn_head_job *j, int r0, int r1);
void bn_head_rows_i8_scalar(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q4_scalar(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q6_scalar(const bn_head_job *j, int r0, int r1);
#if BN_X86
void bn_i2_rows_avx2(const bn_i2_job *j, int r0, int r1);
void bn_i2_rows_avx512(const bn_i2_job *j, int r0, int r1);
void bn_i2_rows_avx512vnni(const bn_i2_job *j, int r0, int r1);
#if BN_HAVE_AVXVNNI
void bn_i2_rows_avxvnni(const bn_i2_job *j, int r0, int r1);
void bn_head_rows_i8_avxvnni(const bn_head_job *j, int r0, int r1);
#endif
void bn_tq1_rows_avx2(const bn_i2_job *j, int r0, int r1);
void bn_tq1_rows_avx512(const bn_i2_job *j, int r0, int r1);
void bn_tq1_rows_avx512vnni(const bn_i2_job *j, int r0, int r1);
void bn_i2_rows_amx(const bn_i2_job *j, int r0, int r1);
int bn_amx_permitted(void);
void bn_quantize_rows_avx2(const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum);
void bn_glue_rows_avx2(const bn_glue_job *j, int t0, int t1);
void bn_attend_avx2(const bn_attn_job *a);
void bn_attend_avx512(const bn_attn_job *a);
void bn_to_f16_avx2(uint16_t *dst, const float *src, int n);
void bn_head_rows_f16_avx2(const bn_head_job *j, int r0, int r1);
void bn_head_rows_i8_avx2(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q4_avx2(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q6_avx2(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q6_avx512(const bn_head_job *j, int r0, int r1);
void bn_head_rows_i8_avx512vnni(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q6_avx512vnni(const bn_head_job *j, int r0, int r1);
void bn_head_rows_i8_amx(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q6_amx(const bn_head_job *j, int r0, int r1);
#endif
#if BN_ARM64
void bn_i2_rows_neon(const bn_i2_job *j, int r0, int r1);
void bn_i2_rows_neondot(const bn_i2_job *j, int r0, int r1);
void bn_tq1_rows_neon(const bn_i2_job *j, int r0, int r1);
void bn_tq1_rows_neondot(const bn_i2_job *j, int r0, int r1);
void bn_head_rows_f16_neon(const bn_head_job *j, int r0, int r1);
void bn_head_rows_i8_neon(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q4_neon(const bn_head_job *j, int r0, int r1);
void bn_head_rows_q6_neon(const bn_head_job *j, int r0, int r1);
void bn_to_f16_neon(uint16_t *dst, const float *src, int n);
#endif

/* Run fn(ctx, chunk, n_chunks, ith) for every chunk in [0, n_chunks), on whichever pool threads
 * claim them (ith: the running thread, 0 is the caller, for per-thread scratch); returns when all
 * are done. pool may be NULL (the caller runs every chunk). */
typedef void (*bn_task_fn)(void *ctx, int chunk, int n_chunks, int ith);
void bn_pool_run(bn_pool *pool, bn_task_fn fn, void *ctx, int n_chunks);

/* How many chunks to cut `items` into: a few per thread, each at least min_items. */
int bn_pool_chunks(const bn_pool *pool, int items, int min_items);

/* Chunk ith's share [*r0, *r1) of n rows, boundaries rounded to multiples of align. */
static inline void bn_split(int n, int ith, int nth, int align, int *r0, int *r1) {
    int chunks = (n + align - 1) / align;
    int c0 = (int)((long long)chunks * ith / nth), c1 = (int)((long long)chunks * (ith + 1) / nth);
    *r0 = c0 * align < n ? c0 * align : n;
    *r1 = c1 * align < n ? c1 * align : n;
}

#endif
