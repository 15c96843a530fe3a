/* Attention of a group of query heads over their KV head's cache rows (bn_attn_job,
 * internal.h): the scalar reference, the AVX2 and the AVX-512 versions, equal bit for bit;
 * dispatch.c picks one, model.c splits the work over threads. Also the f16 cache's write (bn_to_f16_fn).
 *
 * The order of every float operation is fixed by the scalar code: a dot product sums lane l of
 * eight partial sums over elements l, l+8, ..., then ((0+1)+(2+3))+((4+5)+(6+7)), then the tail;
 * products are rounded before they are added (no FMA); values are summed over keys in order; the
 * softmax is one plain-C function inlined into every kernel (softmax below).
 * An f16 cache (BN_KV_F16) is widened to f32 as it is read (exactly), then takes the same
 * operations: its kernels are those of the f32 cache, instantiated for the other element type. */
#include <math.h>
#include <string.h>

#include "internal.h"

#if BN_ARM64
#include <arm_neon.h>
#endif

/* element i of a cache row, for an element type known at compile time */
static inline __attribute__((always_inline)) float elem_of(const void *row, int i, const int F16) {
    return F16 ? bn_f16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* bytes of a cache row of hd elements, likewise */
static inline __attribute__((always_inline)) int row_bytes(int hd, const int F16) { return hd * (F16 ? 2 : 4); }

/* the cache row of key `key`, likewise (row_bytes's product, in size_t from the start) */
static inline __attribute__((always_inline)) const void *row_of(const void *cache, int key, int hd, const int F16) {
    return (const char *)cache + (size_t)key * hd * (F16 ? 2 : 4);
}

/* a . row, row a cache row */
static inline __attribute__((always_inline)) float dot(const float *a, const void *row, int n, const int F16) {
    float lane[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] += a[i + l] * elem_of(row, i + l, F16);
    float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; i < n; i++) s += a[i] * elem_of(row, i, F16);
    return s;
}

/* sc[0..n) -> softmax weights, in plain float operations inlined into every ISA's kernel and
 * vectorised there, each copy rounding alike (internal.h): the max and the sum of the e^(s - max)
 * in eight lanes (lane l over l, l + 8, ...) combined in dot's tree, then the tail; exp_poly for
 * the exponential (libm's expf, a call per score, took a quarter of a 16-row step's attention). */
static inline __attribute__((always_inline)) void softmax(float *sc, int n) {
    float lane[8];
    for (int l = 0; l < 8; l++) lane[l] = -INFINITY;
    int j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) lane[l] = sc[j + l] > lane[l] ? sc[j + l] : lane[l];
    float mx = lane[0];
    for (int l = 1; l < 8; l++) mx = lane[l] > mx ? lane[l] : mx;
    for (; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    for (j = 0; j < n; j++) sc[j] = exp_poly(sc[j] - mx);
    for (int l = 0; l < 8; l++) lane[l] = 0.0f;
    for (j = 0; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) lane[l] += sc[j + l];
    float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; j < n; j++) sum += sc[j];
    for (j = 0; j < n; j++) sc[j] /= sum;
}

/* an f16 cache row widened to f32 (exact): on ARM by fcvtl four at a time, which the NEON build
 * runs as its attention (bn_f16_to_f32 costs a dozen integer operations an element) */
static void widen_row(float *wide, const uint16_t *row, int n) {
    int i = 0;
#if BN_ARM64
    for (; i + 4 <= n; i += 4) vst1q_f32(wide + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(row + i))));
#endif
    for (; i < n; i++) wide[i] = bn_f16_to_f32(row[i]);
}

/* Key-major: each K row is dotted with every head's query, each V row added into every head's
 * output, so a row is read once per group; per head the operations run in the order above. An
 * f16 row is widened once into `wide` for all the heads. */
static inline __attribute__((always_inline)) void attend_scalar(const bn_attn_job *a, const int F16) {
    const int hd = a->hd, n = a->n;
    float wide[hd];
    for (int j = 0; j < n; j++) {
        const void *k = row_of(a->kc, a->keys[j], hd, F16);
        if (F16) widen_row(wide, k, hd);
        for (int h = 0; h < a->heads; h++)
            a->sc[(size_t)h * n + j] = dot(a->q + (size_t)h * hd, F16 ? wide : k, hd, 0) * a->scale;
    }
    for (int h = 0; h < a->heads; h++) softmax(a->sc + (size_t)h * n, n);
    memset(a->out, 0, sizeof(float) * hd * a->heads);
    for (int j = 0; j < n; j++) {
        const float *v = row_of(a->vc, a->keys[j], hd, F16);
        if (F16) {
            widen_row(wide, (const uint16_t *)v, hd);
            v = wide;
        }
        for (int h = 0; h < a->heads; h++) {
            float p = a->sc[(size_t)h * n + j], *o = a->out + (size_t)h * hd;
            for (int e = 0; e < hd; e++) o[e] += p * v[e];
        }
    }
}

void bn_attend_scalar(const bn_attn_job *a) {
    if (a->kv_type == BN_KV_F16)
        attend_scalar(a, 1);
    else
        attend_scalar(a, 0);
}

void bn_to_f16_scalar(uint16_t *dst, const float *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = bn_f32_to_f16(src[i]);
}

#if BN_X86
/* the scalar lane tree: hadd twice gives (0+1)+(2+3) in the low half, (4+5)+(6+7) in the high */
AVX2_NOFMA_TARGET static inline float lane_tree(__m256 v) {
    v = _mm256_hadd_ps(v, v);
    v = _mm256_hadd_ps(v, v);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

/* lane_tree of eight vectors at once, that of v_i in lane i: hadd pairs the lanes as the tree does
 * (a float add is commutative, so (1+0) is (0+1)); a quarter of the shuffles of eight lane_trees */
AVX2_NOFMA_TARGET static inline __m256 lane_tree8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5,
                                                  __m256 v6, __m256 v7) {
    /* lanes 0..3: the low-half trees ((0+1)+(2+3)) of v0..v3, lanes 4..7 their high-half trees */
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* Elements [i, i + 8) of a cache row as f32: F16 is a compile-time constant in every caller (the
 * kernels below are instantiated once per element type) */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) __m256 load8(const void *row, int i, const int F16) {
    return F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
               : _mm256_loadu_ps((const float *)row + i);
}

/* always inlined: a call inside the value loops would spill their accumulators (every ymm register
 * is caller-saved) */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void prefetch_row(const void *row, int bytes) {
    for (int b = 0; b < bytes; b += 64) _mm_prefetch((const char *)row + b, _MM_HINT_T0);
}

/* element i of a cache row, as elem_of but inlined (F16C's scalar conversion, also exact) */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) float elem_avx2(const void *row, int i, const int F16) {
    return F16 ? _cvtsh_ss(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* Bytes of rows the scores pass prefetches ahead of the key it reads: its K rows, then (past the
 * last key) the V rows of the first value blocks; the values pass prefetches as far into the next
 * job's K rows (block_rows). The cache's rows lie in 4 KB pages the hardware
 * prefetcher does not cross; 8 KB ahead (16 f32 rows of 128) measured fastest over 32 to 900 cached
 * positions. The distance is in bytes, not rows: f16 rows at 16 rows ahead (4 KB) left a 16-row
 * step's attention 13-20% slower (kernels/build/bench 2 6 attention 128). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif

/* The value rows of keys [j0, j0 + nb) into rows, prefetching those of the block after the next
 * and, past the last key, the next job's first K rows (PREFETCH_BYTES of them), which the scores
 * pass would otherwise start on cold. */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void block_rows(const bn_attn_job *a, const void **rows,
                                                                             int j0, int nb, const int F16) {
    const int hd = a->hd, n = a->n;
    for (int j = 0; j < nb; j++) {
        rows[j] = row_of(a->vc, a->keys[j0 + j], hd, F16);
        const int ahead = j0 + j + 2 * nb;
        if (ahead < n)
            prefetch_row(row_of(a->vc, a->keys[ahead], hd, F16), row_bytes(hd, F16));
        else if (a->next_k && (ahead - n) * row_bytes(hd, F16) < PREFETCH_BYTES)
            prefetch_row(row_of(a->next_k, ahead - n, hd, F16), row_bytes(hd, F16));
    }
}

/* Outputs [e, e + 8 NV) of heads [h0, h0 + NH), accumulated over the nb rows `rows` (keys
 * [j0, j0 + nb)) onto what keys [0, j0) left in out: one pass over those values with NH x NV
 * accumulators, each value vector loaded once for the NH heads; p[h] points at head h0 + h's
 * weight of key j0. The rows' addresses come from head_values_avx2, so that the loop does the
 * products and little else. */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void values_avx2(const bn_attn_job *a, const void *const *rows,
                                                                              const float *const *p, int h0, int e,
                                                                              int j0, int nb, const int NH, const int NV,
                                                                              const int F16) {
    const int hd = a->hd;
    __m256 o[4][2];
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < NV; u++)
            o[h][u] = j0 ? _mm256_loadu_ps(a->out + (size_t)(h0 + h) * hd + e + 8 * u) : _mm256_setzero_ps();
    for (int j = 0; j < nb; j++) {
        __m256 vv[2];
        for (int u = 0; u < NV; u++) vv[u] = load8(rows[j], e + 8 * u, F16);
        for (int h = 0; h < NH; h++) {
            __m256 w = _mm256_broadcast_ss(p[h] + j);
            for (int u = 0; u < NV; u++) o[h][u] = _mm256_add_ps(o[h][u], _mm256_mul_ps(w, vv[u]));
        }
    }
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < NV; u++) _mm256_storeu_ps(a->out + (size_t)(h0 + h) * hd + e + 8 * u, o[h][u]);
}

/* The values go by blocks of keys of 1024 elements (8 rows of 128; at least 4 rows), every output
 * column passing over a block before the next: the rows are fetched once, not once per 16 columns.
 * A block and the two after it, prefetched as the block starts, stay in L1 beside the scores. The
 * size is in rows, not bytes: blocks of 4 KB (16 f16 rows of 128) measured 11% slower than 8 rows
 * of f16 at 288 cached positions (`kernels/build/bench 2 1 attention 288`, 27.4-28.0 ms against
 * 24.3-24.6), and 4 f32 rows 3% slower than 8; 16 KB blocks 20% slower still (a block and its
 * successor filled L1); a block ahead measured 3-4% slower on f16 rows (session 10). */
#define VALUE_BLOCK(hd) (1024 / (hd) > 4 ? 1024 / (hd) : 4)
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void head_values_avx2(const bn_attn_job *a, int h0,
                                                                                   const int NH, const int F16) {
    const int hd = a->hd, n = a->n, block = VALUE_BLOCK(hd);
    const void *rows[block];
    for (int j0 = 0; j0 < n; j0 += block) {
        const int nb = j0 + block < n ? block : n - j0;
        block_rows(a, rows, j0, nb, F16);
        const float *p[4];
        for (int h = 0; h < NH; h++) p[h] = a->sc + (size_t)(h0 + h) * n + j0;
        int e = 0;
        for (; e + 16 <= hd; e += 16) values_avx2(a, rows, p, h0, e, j0, nb, NH, 2, F16);
        for (; e + 8 <= hd; e += 8) values_avx2(a, rows, p, h0, e, j0, nb, NH, 1, F16);
        for (; e < hd; e++)
            for (int h = 0; h < NH; h++) {
                float o = j0 ? a->out[(size_t)(h0 + h) * hd + e] : 0.0f;
                for (int j = 0; j < nb; j++) o += p[h][j] * elem_avx2(rows[j], e, F16);
                a->out[(size_t)(h0 + h) * hd + e] = o;
            }
    }
}

/* Scores of keys j, j + 1 for heads [h0, h0 + NH): NH x 2 independent add chains, each K vector
 * loaded once for the NH heads. */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void scores_avx2(const bn_attn_job *a, int j, int h0,
                                                                              const int NH, const int F16) {
    const int hd = a->hd, h8 = hd & ~7, n = a->n;
    const void *k[2] = {row_of(a->kc, a->keys[j], hd, F16), row_of(a->kc, a->keys[j + 1], hd, F16)};
    __m256 s[4][2];
    for (int h = 0; h < NH; h++) s[h][0] = s[h][1] = _mm256_setzero_ps();
    for (int i = 0; i < h8; i += 8) {
        __m256 k0 = load8(k[0], i, F16), k1 = load8(k[1], i, F16);
        for (int h = 0; h < NH; h++) {
            __m256 qv = _mm256_loadu_ps(a->q + (size_t)(h0 + h) * hd + i);
            s[h][0] = _mm256_add_ps(s[h][0], _mm256_mul_ps(qv, k0));
            s[h][1] = _mm256_add_ps(s[h][1], _mm256_mul_ps(qv, k1));
        }
    }
    for (int h = NH; h < 4; h++) s[h][0] = s[h][1] = _mm256_setzero_ps();
    const __m256 tree = lane_tree8(s[0][0], s[0][1], s[1][0], s[1][1], s[2][0], s[2][1], s[3][0], s[3][1]);
    if (h8 == hd) { /* no tail: the eight scores scaled at once (each product rounded as the scalar one) */
        const __m256 scaled = _mm256_mul_ps(tree, _mm256_set1_ps(a->scale));
        const __m128 lo = _mm256_castps256_ps128(scaled), hi = _mm256_extractf128_ps(scaled, 1);
        float *sc = a->sc + (size_t)h0 * n + j; /* lanes 2h, 2h + 1: keys j, j + 1 of head h0 + h */
        _mm_storel_pi((__m64 *)sc, lo);
        if (NH > 1) _mm_storeh_pi((__m64 *)(sc + n), lo);
        if (NH > 2) _mm_storel_pi((__m64 *)(sc + 2 * n), hi);
        if (NH > 3) _mm_storeh_pi((__m64 *)(sc + 3 * n), hi);
        return;
    }
    float d[8];
    _mm256_storeu_ps(d, tree);
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < 2; u++) {
            const float *q = a->q + (size_t)(h0 + h) * hd;
            float dot = d[2 * h + u];
            for (int i = h8; i < hd; i++) dot += q[i] * elem_avx2(k[u], i, F16);
            a->sc[(size_t)(h0 + h) * n + j + u] = dot * a->scale;
        }
}

/* Up to four heads at a time (the register tiles above), for the scores and the values */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void attend_avx2(const bn_attn_job *a, const int F16) {
    const int hd = a->hd, n = a->n, ahead = PREFETCH_BYTES / row_bytes(hd, F16) > 2 ? PREFETCH_BYTES / row_bytes(hd, F16) : 2;
    int j = 0;
    for (; j + 2 <= n; j += 2) {
        for (int u = j + ahead; u < j + ahead + 2 && u < 2 * n; u++)
            prefetch_row(u < n ? row_of(a->kc, a->keys[u], hd, F16) : row_of(a->vc, a->keys[u - n], hd, F16), row_bytes(hd, F16));
        for (int h0 = 0; h0 < a->heads; h0 += 4) switch (a->heads - h0) {
            case 1: scores_avx2(a, j, h0, 1, F16); break;
            case 2: scores_avx2(a, j, h0, 2, F16); break;
            case 3: scores_avx2(a, j, h0, 3, F16); break;
            default: scores_avx2(a, j, h0, 4, F16); break;
            }
    }
    for (; j < n; j++)
        for (int h = 0; h < a->heads; h++)
            a->sc[(size_t)h * n + j] = dot(a->q + (size_t)h * hd, row_of(a->kc, a->keys[j], hd, F16), hd, F16) * a->scale;
    for (int h = 0; h < a->heads; h++) softmax(a->sc + (size_t)h * n, n);
    for (int h0 = 0; h0 < a->heads; h0 += 4) switch (a->heads - h0) {
        case 1: head_values_avx2(a, h0, 1, F16); break;
        case 2: head_values_avx2(a, h0, 2, F16); break;
        case 3: head_values_avx2(a, h0, 3, F16); break;
        default: head_values_avx2(a, h0, 4, F16); break;
        }
}

AVX2_NOFMA_TARGET void bn_attend_avx2(const bn_attn_job *a) {
    if (a->kv_type == BN_KV_F16)
        attend_avx2(a, 1);
    else
        attend_avx2(a, 0);
}

/* ---- AVX-512: the AVX2 kernel's order at twice the width ---------------------------------
 * The scores keep two keys in one zmm (key j in the low eight lanes, j + 1 in the high eight,
 * against the query's eight elements broadcast to both halves): lane l of each half is the scalar
 * partial sum l of its key, and each half ends in the scalar lane tree. The values are sums over
 * keys per output element, so 16 elements a zmm take the scalar order as they are. No FMA (the
 * target has it, -ffp-contract=off and the separate intrinsics keep products rounded). */
#define AVX512_ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))

/* elements [i, i + 16) of a cache row as f32 */
AVX512_ATTN_TARGET static inline __attribute__((always_inline)) __m512 load16(const void *row, int i, const int F16) {
    return F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i)))
               : _mm512_loadu_ps((const float *)row + i);
}

/* elements [i, i + 8) of rows r0 (low half) and r1 (high half) as f32 */
AVX512_ATTN_TARGET static inline __attribute__((always_inline)) __m512 load8x2(const void *r0, const void *r1, int i,
                                                                             const int F16) {
    if (F16)
        return _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)((const uint16_t *)r0 + i))),
            _mm_loadu_si128((const __m128i *)((const uint16_t *)r1 + i)), 1));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_loadu_pd((const double *)((const float *)r0 + i))),
                                               _mm256_loadu_pd((const double *)((const float *)r1 + i)), 1));
}

/* Outputs [e, e + 16 NV) of heads [h0, h0 + NH) over the nb rows `rows`, as values_avx2 */
AVX512_ATTN_TARGET static inline __attribute__((always_inline)) void values_avx512(const bn_attn_job *a, const void *const *rows,
                                                                                 const float *const *p, int h0, int e,
                                                                                 int j0, int nb, const int NH,
                                                                                 const int NV, const int F16) {
    const int hd = a->hd;
    __m512 o[4][4];
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < NV; u++)
            o[h][u] = j0 ? _mm512_loadu_ps(a->out + (size_t)(h0 + h) * hd + e + 16 * u) : _mm512_setzero_ps();
    for (int j = 0; j < nb; j++) {
        __m512 vv[4];
        for (int u = 0; u < NV; u++) vv[u] = load16(rows[j], e + 16 * u, F16);
        for (int h = 0; h < NH; h++) {
            __m512 w = _mm512_set1_ps(p[h][j]);
            for (int u = 0; u < NV; u++) o[h][u] = _mm512_add_ps(o[h][u], _mm512_mul_ps(w, vv[u]));
        }
    }
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < NV; u++) _mm512_storeu_ps(a->out + (size_t)(h0 + h) * hd + e + 16 * u, o[h][u]);
}

/* head_values_avx2's blocks of keys, 64 output columns a pass */
AVX512_ATTN_TARGET static inline __attribute__((always_inline)) void head_values_avx512(const bn_attn_job *a, int h0,
                                                                                      const int NH, const int F16) {
    const int hd = a->hd, n = a->n, block = VALUE_BLOCK(hd);
    const void *rows[block];
    for (int j0 = 0; j0 < n; j0 += block) {
        const int nb = j0 + block < n ? block : n - j0;
        block_rows(a, rows, j0, nb, F16);
        const float *p[4];
        for (int h = 0; h < NH; h++) p[h] = a->sc + (size_t)(h0 + h) * n + j0;
        int e = 0;
        for (; e + 64 <= hd; e += 64) values_avx512(a, rows, p, h0, e, j0, nb, NH, 4, F16);
        for (; e + 16 <= hd; e += 16) values_avx512(a, rows, p, h0, e, j0, nb, NH, 1, F16);
        for (; e < hd; e++)
            for (int h = 0; h < NH; h++) {
                float o = j0 ? a->out[(size_t)(h0 + h) * hd + e] : 0.0f;
                for (int j = 0; j < nb; j++) o += p[h][j] * elem_avx2(rows[j], e, F16);
                a->out[(size_t)(h0 + h) * hd + e] = o;
            }
    }
}

/* Scores of keys j .. j + 2 KP - 1 for heads [h0, h0 + NH): two keys a zmm, NH x KP add chains */
AVX512_ATTN_TARGET static inline __attribute__((always_inline)) void scores_avx512(const bn_attn_job *a, int j, int h0,
                                                                                 const int NH, const int KP,
                                                                                 const int F16) {
    const int hd = a->hd, h8 = hd & ~7, n = a->n;
    const void *k[4];
    for (int u = 0; u < 2 * KP; u++) k[u] = row_of(a->kc, a->keys[j + u], hd, F16);
    __m512 s[4][2];
    for (int h = 0; h < NH; h++)
        for (int p = 0; p < KP; p++) s[h][p] = _mm512_setzero_ps();
    for (int i = 0; i < h8; i += 8) {
        __m512 kk[2];
        for (int p = 0; p < KP; p++) kk[p] = load8x2(k[2 * p], k[2 * p + 1], i, F16);
        for (int h = 0; h < NH; h++) {
            __m512 qv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *)(a->q + (size_t)(h0 + h) * hd + i))));
            for (int p = 0; p < KP; p++) s[h][p] = _mm512_add_ps(s[h][p], _mm512_mul_ps(qv, kk[p]));
        }
    }
    for (int h = 0; h < NH; h++)
        for (int p = 0; p < KP; p++)
            for (int u = 0; u < 2; u++) {
                const float *q = a->q + (size_t)(h0 + h) * hd;
                const __m256 half = u ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s[h][p]), 1)) : _mm512_castps512_ps256(s[h][p]);
                float d = lane_tree(half);
                for (int i = h8; i < hd; i++) d += q[i] * elem_avx2(k[2 * p + u], i, F16);
                a->sc[(size_t)(h0 + h) * n + j + 2 * p + u] = d * a->scale;
            }
}

#define SCORES_AVX512(KP)                                                                  \
    for (int h0 = 0; h0 < a->heads; h0 += 4) switch (a->heads - h0) {                      \
        case 1: scores_avx512(a, j, h0, 1, KP, F16); break;                                \
        case 2: scores_avx512(a, j, h0, 2, KP, F16); break;                                \
        case 3: scores_avx512(a, j, h0, 3, KP, F16); break;                                \
        default: scores_avx512(a, j, h0, 4, KP, F16); break;                               \
        }

AVX512_ATTN_TARGET static inline __attribute__((always_inline)) void attend_avx512(const bn_attn_job *a, const int F16) {
    const int hd = a->hd, n = a->n, ahead = PREFETCH_BYTES / row_bytes(hd, F16) > 4 ? PREFETCH_BYTES / row_bytes(hd, F16) : 4;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        for (int u = j + ahead; u < j + ahead + 4 && u < 2 * n; u++)
            prefetch_row(u < n ? row_of(a->kc, a->keys[u], hd, F16) : row_of(a->vc, a->keys[u - n], hd, F16), row_bytes(hd, F16));
        SCORES_AVX512(2)
    }
    for (; j + 2 <= n; j += 2) SCORES_AVX512(1)
    for (; j < n; j++)
        for (int h = 0; h < a->heads; h++)
            a->sc[(size_t)h * n + j] = dot(a->q + (size_t)h * hd, row_of(a->kc, a->keys[j], hd, F16), hd, F16) * a->scale;
    for (int h = 0; h < a->heads; h++) softmax(a->sc + (size_t)h * n, n);
    for (int h0 = 0; h0 < a->heads; h0 += 4) switch (a->heads - h0) {
        case 1: head_values_avx512(a, h0, 1, F16); break;
        case 2: head_values_avx512(a, h0, 2, F16); break;
        case 3: head_values_avx512(a, h0, 3, F16); break;
        default: head_values_avx512(a, h0, 4, F16); break;
        }
}
#undef SCORES_AVX512

AVX512_ATTN_TARGET void bn_attend_avx512(const bn_attn_job *a) {
    if (a->kv_type == BN_KV_F16)
        attend_avx512(a, 1);
    else
        attend_avx512(a, 0);
}

/* F16C rounds to nearest even and quiets NaNs as bn_f32_to_f16 does (kernels/test_kernels.c
 * checks both on every exponent and sign); 8 at a time instead of ~5 ns apiece */
AVX2_NOFMA_TARGET void bn_to_f16_avx2(uint16_t *dst, const float *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    bn_to_f16_scalar(dst + i, src + i, n - i);
}
#endif

#if BN_ARM64
/* FCVTN rounds by FPCR, nearest even by default, and quiets NaNs keeping their top bits, as
 * bn_f32_to_f16 does */
void bn_to_f16_neon(uint16_t *dst, const float *src, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
    bn_to_f16_scalar(dst + i, src + i, n - i);
}
#endif
