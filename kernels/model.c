/* The BitNet b1.58 decoder (transformers' BitNetForCausalLM) on the kernels of ternary.c/head.c,
 * and the Llama-architecture 1.58-bit family (LlamaForCausalLM with BitLinear projections).
 *
 * Per layer, for a chunk of M tokens (M = 1 when decoding):
 *   h = rmsnorm(x) -> int8 -> q,k,v (one parallel section) -> RoPE -> KV cache
 *   attention over the cache (parallel over token x KV head) -> attn_sub_norm -> int8 -> o_proj; x += .
 *   h = rmsnorm(x) -> int8 -> gate,up (one section) -> relu(gate)^2 * up -> ffn_sub_norm -> int8
 *   -> down; x += .
 * The Llama family gates with silu(gate) * up and has no sub-norms (their steps quantise as is).
 * then the final norm and the output head for the tokens whose logits are wanted.
 * Float steps follow torch's fp32 arithmetic (same formulas, same operation order where it
 * changes the result), so the int8 activations match transformers' ActQuant.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

#define CHUNK 64 /* prompt tokens per prefill pass: weights are streamed once per chunk */

struct bn_model {
    bn_model_desc d;
    bn_layer_desc *layers;
    bn_pool *pool;
    bn_i2_rows_fn i2;
    bn_head_rows_fn head;
    bn_attn_fn attend;
    bn_glue_fn glue;
    int q_dim, kv_dim, kp_h, kp_f, kp_q;
    float attn_scale;
    int n_seq;              /* independent sequences, each with its own cache (bn_model_set_seqs) */
    float *kcache, *vcache; /* [seq][layer][kv_head][ctx][head_dim] */
    /* chunk scratch */
    float *x, *h, *q, *k, *v, *att, *gate, *up, *tmp;
    int8_t *xq;
    float *xscale;
    int32_t *xsum;
    float *scores; /* [thread][group][ctx]: a group is the query heads of one KV head */
    int *keys;     /* [thread][ctx]: the cache slots a token attends to */
};

/* Zeroed memory starting on a cache line. glibc serves large callocs 16 bytes into a page, which
 * splits every other 32-byte load of the kernels across two cache lines: measured here, the
 * prefill GEMM ran 20-60% slower on such activations. calloc underneath keeps big buffers (the
 * KV cache) committed page by page as they are written. */
static void *zalloc(size_t n) {
    char *raw = calloc(1, n + 64 + sizeof(void *));
    if (!raw) return NULL;
    char *p = (char *)(((uintptr_t)raw + sizeof(void *) + 63) & ~(uintptr_t)63);
    ((void **)p)[-1] = raw;
    return p;
}

static void zfree(void *p) {
    if (p) free(((void **)p)[-1]);
}

bn_model *bn_model_new(const bn_model_desc *d, int n_threads, int isa, char *err, int err_len) {
#define FAIL(...)                                   \
    do {                                            \
        if (err) snprintf(err, err_len, __VA_ARGS__); \
        bn_model_free(m);                           \
        return NULL;                                \
    } while (0)
    bn_model *m = zalloc(sizeof *m);
    if (!m) FAIL("out of memory");
    m->d = *d;
    if (d->n_layers < 1 || d->hidden < 1 || d->ffn < 1 || d->n_heads < 1 || d->n_kv_heads < 1 ||
        d->head_dim < 2 || d->head_dim % 2 || d->vocab < 1 || d->ctx < 1)
        FAIL("invalid model dimensions");
    if (d->n_heads % d->n_kv_heads) FAIL("num_attention_heads %d is not a multiple of num_key_value_heads %d",
                                         d->n_heads, d->n_kv_heads);
    if (d->ffn_act != BN_ACT_RELU2 && d->ffn_act != BN_ACT_SILU) FAIL("unknown FFN activation %d", d->ffn_act);
    for (int i = 0; i < 2; i++) {
        int type = i ? d->head_type : d->emb_type;
        if (type != BN_EMB_F16 && type != BN_EMB_I8 && type != BN_EMB_Q4) FAIL("unknown embedding type %d", type);
    }
    if (d->head_type == BN_EMB_Q4 && bn_head_k(BN_EMB_Q4, d->hidden) > 8192)
        FAIL("a q4 head needs hidden_size <= 8192 (its int32 sums), got %d", d->hidden);
    m->i2 = bn_i2_kernel(isa);
    m->head = bn_head_kernel(isa);
    m->attend = bn_attn_kernel(isa);
    m->glue = bn_glue_kernel(isa);
    if (!m->i2 || !m->head || !m->attend || !m->glue) FAIL("instruction set %d is not available on this CPU", isa);
    m->pool = bn_pool_new(n_threads);
    if (!m->pool) FAIL("cannot start %d threads", n_threads);
    m->layers = zalloc(sizeof(bn_layer_desc) * d->n_layers);
    if (!m->layers) FAIL("out of memory");
    memcpy(m->layers, d->layers, sizeof(bn_layer_desc) * d->n_layers);
    m->d.layers = m->layers;

    m->q_dim = d->n_heads * d->head_dim;
    m->kv_dim = d->n_kv_heads * d->head_dim;
    m->kp_h = (d->hidden + 127) / 128 * 128;
    m->kp_f = (d->ffn + 127) / 128 * 128;
    m->kp_q = (m->q_dim + 127) / 128 * 128; /* o_proj's inputs: heads * head_dim, not always hidden */
    m->attn_scale = (float)(1.0 / sqrt((double)d->head_dim));
    /* calloc'd: pages are only committed as positions are written */
    size_t cache = (size_t)d->n_layers * m->kv_dim * d->ctx;
    m->n_seq = 1;
    m->kcache = zalloc(cache * sizeof(float));
    m->vcache = zalloc(cache * sizeof(float));
    int widest = d->ffn > d->hidden ? d->ffn : d->hidden;
    widest = widest > m->q_dim ? widest : m->q_dim;
    size_t wide = (size_t)CHUNK * widest;
    m->x = zalloc(sizeof(float) * CHUNK * d->hidden);
    m->h = zalloc(sizeof(float) * wide);
    m->q = zalloc(sizeof(float) * CHUNK * m->q_dim);
    m->k = zalloc(sizeof(float) * CHUNK * m->kv_dim);
    m->v = zalloc(sizeof(float) * CHUNK * m->kv_dim);
    m->att = zalloc(sizeof(float) * CHUNK * m->q_dim);
    m->gate = zalloc(sizeof(float) * wide);
    m->up = zalloc(sizeof(float) * wide);
    m->tmp = zalloc(sizeof(float) * CHUNK * d->hidden);
    int kp_max = m->kp_f > m->kp_h ? m->kp_f : m->kp_h;
    m->xq = zalloc((size_t)CHUNK * (kp_max > m->kp_q ? kp_max : m->kp_q));
    m->xscale = zalloc(sizeof(float) * CHUNK);
    m->xsum = zalloc(sizeof(int32_t) * CHUNK);
    m->scores = zalloc(sizeof(float) * (size_t)n_threads * (d->n_heads / d->n_kv_heads) * d->ctx);
    m->keys = zalloc(sizeof(int) * (size_t)n_threads * d->ctx);
    if (!m->kcache || !m->vcache || !m->x || !m->h || !m->q || !m->k || !m->v || !m->att || !m->gate || !m->up ||
        !m->tmp || !m->xq || !m->xscale || !m->xsum || !m->scores || !m->keys)
        FAIL("out of memory for a context of %d tokens", d->ctx);
    return m;
#undef FAIL
}

void bn_model_free(bn_model *m) {
    if (!m) return;
    bn_pool_free(m->pool);
    void *bufs[] = {m->layers, m->kcache, m->vcache, m->x, m->h, m->q, m->k, m->v, m->att, m->gate, m->up,
                    m->tmp, m->xq, m->xscale, m->xsum, m->scores, m->keys};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) zfree(bufs[i]);
    zfree(m);
}

/* ---- float steps ----------------------------------------------------------------------- */

/* HF rotate_half convention: pairs (i, i + d/2) rotate by angle pos * inv_freq[i]. */
static void rope(float *v, int n_heads, int hd, const float *cs, const float *sn) {
    int half = hd / 2;
    for (int h = 0; h < n_heads; h++, v += hd)
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = b * cs[i] + a * sn[i];
        }
}

/* ---- attention kernels ------------------------------------------------------------------ */

/* The order of every float operation is fixed by the scalar code: a dot product sums lane l of
 * eight partial sums over elements l, l+8, ..., then ((0+1)+(2+3))+((4+5)+(6+7)), then the tail;
 * products are rounded before they are added (no FMA); values are summed over keys in order. */
static inline float dot(const float *a, const float *b, int n) {
    float lane[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] += a[i + l] * b[i + l];
    float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* sc[0..n) -> softmax weights; scalar on every ISA (expf) */
static void softmax(float *sc, int n) {
    float mx = -INFINITY, sum = 0.0f;
    for (int j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    for (int j = 0; j < n; j++) {
        sc[j] = expf(sc[j] - mx);
        sum += sc[j];
    }
    for (int j = 0; j < n; j++) sc[j] /= sum;
}

/* Key-major: each K row is dotted with every head's query, each V row added into every head's
 * output, so a row is read once per group; per head the operations run in the order above. */
static void attend_scalar(const bn_attn_job *a) {
    const int hd = a->hd, n = a->n;
    for (int j = 0; j < n; j++) {
        const float *k = a->kc + (size_t)a->keys[j] * hd;
        for (int h = 0; h < a->heads; h++) a->sc[(size_t)h * n + j] = dot(a->q + (size_t)h * hd, k, hd) * a->scale;
    }
    for (int h = 0; h < a->heads; h++) softmax(a->sc + (size_t)h * n, n);
    memset(a->out, 0, sizeof(float) * hd * a->heads);
    for (int j = 0; j < n; j++) {
        const float *v = a->vc + (size_t)a->keys[j] * hd;
        for (int h = 0; h < a->heads; h++) {
            float p = a->sc[(size_t)h * n + j], *o = a->out + (size_t)h * hd;
            for (int e = 0; e < hd; e++) o[e] += p * v[e];
        }
    }
}

#if BN_X86
/* the scalar lane tree: hadd twice gives (0+1)+(2+3) in the low half, (4+5)+(6+7) in the high */
AVX2_NOFMA_TARGET static inline float lane_tree(__m256 v) {
    v = _mm256_hadd_ps(v, v);
    v = _mm256_hadd_ps(v, v);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

/* Outputs [e, e + 8 NV) of heads [h0, h0 + NH), accumulated over keys [j0, j1) onto what keys
 * [0, j0) left in out: one pass over those values with NH x NV accumulators, each value vector
 * loaded once for the NH heads. The pass at e = 0 also prefetches the next block's rows. */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void values_avx2(const bn_attn_job *a, int h0, int e,
                                                                              int j0, int j1, const int NH,
                                                                              const int NV) {
    const int hd = a->hd, n = a->n;
    __m256 o[4][2];
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < NV; u++)
            o[h][u] = j0 ? _mm256_loadu_ps(a->out + (size_t)(h0 + h) * hd + e + 8 * u) : _mm256_setzero_ps();
    for (int j = j0; j < j1; j++) {
        const float *v = a->vc + (size_t)a->keys[j] * hd + e;
        if (e == 0 && j + (j1 - j0) < n)
            for (int b = 0; b < hd; b += 16)
                _mm_prefetch((const char *)(a->vc + (size_t)a->keys[j + (j1 - j0)] * hd + b), _MM_HINT_T0);
        __m256 vv[2];
        for (int u = 0; u < NV; u++) vv[u] = _mm256_loadu_ps(v + 8 * u);
        for (int h = 0; h < NH; h++) {
            __m256 p = _mm256_broadcast_ss(a->sc + (size_t)(h0 + h) * n + j);
            for (int u = 0; u < NV; u++) o[h][u] = _mm256_add_ps(o[h][u], _mm256_mul_ps(p, vv[u]));
        }
    }
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < NV; u++) _mm256_storeu_ps(a->out + (size_t)(h0 + h) * hd + e + 8 * u, o[h][u]);
}

/* The values go by blocks of keys whose rows fit in L1 (16 KB), every output column passing over
 * a block before the next: the rows are fetched once, not once per 16 columns. */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void head_values_avx2(const bn_attn_job *a, int h0,
                                                                                   const int NH) {
    const int hd = a->hd, n = a->n, block = hd < 512 ? 4096 / hd : 8;
    for (int j0 = 0; j0 < n; j0 += block) {
        const int j1 = j0 + block < n ? j0 + block : n;
        int e = 0;
        for (; e + 16 <= hd; e += 16) values_avx2(a, h0, e, j0, j1, NH, 2);
        for (; e + 8 <= hd; e += 8) values_avx2(a, h0, e, j0, j1, NH, 1);
        for (; e < hd; e++)
            for (int h = h0; h < h0 + NH; h++) {
                float o = j0 ? a->out[(size_t)h * hd + e] : 0.0f;
                for (int j = j0; j < j1; j++) o += a->sc[(size_t)h * n + j] * a->vc[(size_t)a->keys[j] * hd + e];
                a->out[(size_t)h * hd + e] = o;
            }
    }
}

/* Scores of keys j, j + 1 for heads [h0, h0 + NH): NH x 2 independent add chains, each K vector
 * loaded once for the NH heads. */
AVX2_NOFMA_TARGET static inline __attribute__((always_inline)) void scores_avx2(const bn_attn_job *a, int j, int h0,
                                                                              const int NH) {
    const int hd = a->hd, h8 = hd & ~7, n = a->n;
    const float *k[2] = {a->kc + (size_t)a->keys[j] * hd, a->kc + (size_t)a->keys[j + 1] * hd};
    __m256 s[4][2];
    for (int h = 0; h < NH; h++) s[h][0] = s[h][1] = _mm256_setzero_ps();
    for (int i = 0; i < h8; i += 8) {
        __m256 k0 = _mm256_loadu_ps(k[0] + i), k1 = _mm256_loadu_ps(k[1] + i);
        for (int h = 0; h < NH; h++) {
            __m256 qv = _mm256_loadu_ps(a->q + (size_t)(h0 + h) * hd + i);
            s[h][0] = _mm256_add_ps(s[h][0], _mm256_mul_ps(qv, k0));
            s[h][1] = _mm256_add_ps(s[h][1], _mm256_mul_ps(qv, k1));
        }
    }
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < 2; u++) {
            const float *q = a->q + (size_t)(h0 + h) * hd;
            float d = lane_tree(s[h][u]);
            for (int i = h8; i < hd; i++) d += q[i] * k[u][i];
            a->sc[(size_t)(h0 + h) * n + j + u] = d * a->scale;
        }
}

/* Up to four heads at a time (the register tiles above), for the scores and the values */
AVX2_NOFMA_TARGET static void attend_avx2(const bn_attn_job *a) {
    const int hd = a->hd, n = a->n;
    int j = 0;
    for (; j + 2 <= n; j += 2)
        for (int h0 = 0; h0 < a->heads; h0 += 4) switch (a->heads - h0) {
            case 1: scores_avx2(a, j, h0, 1); break;
            case 2: scores_avx2(a, j, h0, 2); break;
            case 3: scores_avx2(a, j, h0, 3); break;
            default: scores_avx2(a, j, h0, 4); break;
            }
    for (; j < n; j++)
        for (int h = 0; h < a->heads; h++)
            a->sc[(size_t)h * n + j] = dot(a->q + (size_t)h * hd, a->kc + (size_t)a->keys[j] * hd, hd) * a->scale;
    for (int h = 0; h < a->heads; h++) softmax(a->sc + (size_t)h * n, n);
    for (int h0 = 0; h0 < a->heads; h0 += 4) switch (a->heads - h0) {
        case 1: head_values_avx2(a, h0, 1); break;
        case 2: head_values_avx2(a, h0, 2); break;
        case 3: head_values_avx2(a, h0, 3); break;
        default: head_values_avx2(a, h0, 4); break;
        }
}
#endif

bn_attn_fn bn_attn_kernel(int isa) {
    if (!bn_isa_available(isa)) return NULL;
#if BN_X86
    if (isa == BN_ISA_AVX2 || isa == BN_ISA_AVX512 || isa == BN_ISA_AVX512VNNI) return attend_avx2;
#endif
    return attend_scalar;
}

/* ---- parallel sections ----------------------------------------------------------------- */

/* Up to three ternary matrices sharing one quantised input, their rows concatenated and split
 * across threads as one range (q,k,v or gate,up in a single section). */
typedef struct {
    bn_i2_rows_fn fn;
    bn_i2_job jobs[3];
    int rows[3];
    int count;
} matmul_task;

static int matmul_rows(const matmul_task *mt) {
    int total = 0;
    for (int i = 0; i < mt->count; i++) total += mt->rows[i];
    return total;
}

static void matmul_worker(void *ctx, int chunk, int n_chunks, int ith) {
    (void)ith;
    const matmul_task *mt = ctx;
    int r0, r1;
    bn_split(matmul_rows(mt), chunk, n_chunks, 4, &r0, &r1);
    int base = 0;
    for (int i = 0; i < mt->count; base += mt->rows[i], i++) {
        int a = r0 > base ? r0 - base : 0, b = r1 - base < mt->rows[i] ? r1 - base : mt->rows[i];
        if (a < b) mt->fn(&mt->jobs[i], a, b);
    }
}

static void run_matmul(bn_model *m, matmul_task *mt) {
    /* decode: >= 64 rows per chunk to keep each stream long; prefill chunks carry M tokens each */
    int min_rows = mt->jobs[0].m == 1 ? 64 : 16;
    bn_pool_run(m->pool, matmul_worker, mt, bn_pool_chunks(m->pool, matmul_rows(mt), min_rows));
}

static bn_i2_job i2_job(bn_model *m, const uint8_t *w, float gamma, int kp, int M, float *y, int y_stride) {
    return (bn_i2_job){.w = w, .kp = kp, .xq = m->xq, .xsum = m->xsum, .m = M, .y = y, .y_stride = y_stride,
                       .xscale = m->xscale, .gamma = gamma};
}

/* Which cache slots a chunk's tokens sit in and see. Token t of the chunk is written to slot
 * slot0 + t at RoPE position pos[t] (slot0 + t when pos is NULL). It attends to every slot up to
 * its own, except that with branches, a slot s >= n_past is seen only when branch[s - n_past]
 * equals the token's own branch: independent continuations of one shared context.
 * With seq set (a batch of sequences, bn_forward_batch), token t belongs to sequence seq[t]: it is
 * written to slot pos[t] of that sequence's cache and sees its slots up to pos[t]. */
typedef struct {
    int M, slot0, n_past;
    const int32_t *pos;
    const int32_t *branch;
    const int32_t *seq;
} chunk_view;

static int cache_slot(const chunk_view *c, int t) { return c->seq ? c->pos[t] : c->slot0 + t; }

/* offset of token t's sequence cache in m->kcache / m->vcache */
static size_t seq_base(const bn_model *m, const chunk_view *c, int t) {
    return c->seq ? (size_t)c->seq[t] * m->d.n_layers * m->kv_dim * m->d.ctx : 0;
}

static int visible_keys(const chunk_view *c, int t, int *keys) {
    const int last = cache_slot(c, t);
    int n = 0;
    if (!c->branch) {
        for (int s = 0; s <= last; s++) keys[n++] = s;
        return n;
    }
    for (int s = 0; s < c->n_past; s++) keys[n++] = s;
    for (int s = c->n_past; s <= last; s++)
        if (c->branch[s - c->n_past] == c->branch[last - c->n_past]) keys[n++] = s;
    return n;
}

/* Jobs of `heads` query heads (all of a KV head's group, or an equal slice of it) for one token */
typedef struct {
    bn_model *m;
    int layer, heads;
    const chunk_view *c;
} attn_task;

static void attn_worker(void *ctx, int chunk, int n_chunks, int ith) {
    const attn_task *a = ctx;
    bn_model *m = a->m;
    const int hd = m->d.head_dim, group = m->d.n_heads / m->d.n_kv_heads, ctx_len = m->d.ctx;
    const int jobs_per_token = m->d.n_heads / a->heads;
    float *sc = m->scores + (size_t)ith * group * ctx_len;
    int *keys = m->keys + (size_t)ith * ctx_len;
    int i0, i1, t_keys = -1, n_keys = 0;
    bn_split(a->c->M * jobs_per_token, chunk, n_chunks, 1, &i0, &i1);
    for (int i = i0; i < i1; i++) {
        int t = i / jobs_per_token, h = i % jobs_per_token * a->heads, kvh = h / group;
        if (t != t_keys) n_keys = visible_keys(a->c, t_keys = t, keys);
        size_t base = seq_base(m, a->c, t) + ((size_t)a->layer * m->d.n_kv_heads + kvh) * ctx_len * hd,
               row = (size_t)t * m->q_dim + h * hd;
        bn_attn_job job = {m->q + row, m->kcache + base, m->vcache + base, keys, n_keys, hd, a->heads, m->attn_scale,
                           sc, m->att + row};
        m->attend(&job);
    }
}

/* One job per (token, KV head) reads each cache row once for the group. Only when that leaves
 * threads idle (a decode step on more threads than KV heads) are groups halved, each slice
 * reading the rows again: with 5 KV heads on 2 threads, the uneven 3:2 share of whole groups
 * measured faster than 10 half groups (less cache traffic). */
static void attention(bn_model *m, int l, const chunk_view *c) {
    int heads = m->d.n_heads / m->d.n_kv_heads;
    while (heads % 2 == 0 && c->M * (m->d.n_heads / heads) < bn_pool_size(m->pool)) heads /= 2;
    attn_task at = {m, l, heads, c};
    bn_pool_run(m->pool, attn_worker, &at, bn_pool_chunks(m->pool, c->M * (m->d.n_heads / heads), 1));
}

/* ---- the forward pass ------------------------------------------------------------------ */

static void embed(const bn_model *m, int token, float *out) {
    const int H = m->d.hidden;
    if (m->d.emb_type == BN_EMB_F16) {
        const uint16_t *row = (const uint16_t *)m->d.embed + (size_t)token * H;
        for (int i = 0; i < H; i++) out[i] = bn_f16_to_f32(row[i]);
    } else if (m->d.emb_type == BN_EMB_I8) {
        const int8_t *row = (const int8_t *)m->d.embed + (size_t)token * H;
        float s = m->d.embed_scale[token];
        for (int i = 0; i < H; i++) out[i] = (float)row[i] * s;
    } else {
        const bn_q4_block *row = (const bn_q4_block *)m->d.embed + (size_t)token * (bn_head_k(BN_EMB_Q4, H) / 64);
        float s = m->d.embed_scale[token];
        for (int i = 0; i < H; i++) {
            const bn_q4_block *b = row + i / 64;
            int half = i % 64 / 32, q = ((b->nib[i % 32] >> 4 * half) & 15) - 8;
            out[i] = (float)(b->sub[half] * q) * s;
        }
    }
}

/* The float glue between two matrix products (bn_glue_job) into m->h and the int8 rows of m->xq.
 * For a prefill chunk the tokens are split over the pool; a decode step runs it inline. */
typedef struct {
    bn_glue_fn fn;
    bn_glue_job job;
    int M;
} glue_task;

static void glue_worker(void *ctx, int chunk, int n_chunks, int ith) {
    (void)ith;
    const glue_task *g = ctx;
    int t0, t1;
    bn_split(g->M, chunk, n_chunks, 1, &t0, &t1);
    g->fn(&g->job, t0, t1);
}

static void glue(bn_model *m, int M, float *x, const float *add, const float *up, const float *w, int n, int kp) {
    glue_task g = {m->glue,
                   {.n = n, .kp = kp, .act = m->d.ffn_act, .eps = m->d.rms_eps, .w = w, .x = x, .add = add, .up = up,
                    .h = m->h,
                    .xq = m->xq, .xscale = m->xscale, .xsum = m->xsum},
                   M};
    if (M == 1)
        glue_worker(&g, 0, 1, 0);
    else
        bn_pool_run(m->pool, glue_worker, &g, bn_pool_chunks(m->pool, M, 1));
}

static void layer_forward(bn_model *m, int l, const chunk_view *c) {
    const bn_layer_desc *L = &m->layers[l];
    const int M = c->M;
    const int H = m->d.hidden, F = m->d.ffn, hd = m->d.head_dim, half = hd / 2;

    /* m->tmp holds the previous layer's FFN output, still to be added to the residual */
    glue(m, M, m->x, l > 0 ? m->tmp : NULL, NULL, L->attn_norm, H, m->kp_h);
    matmul_task qkv = {m->i2,
                       {i2_job(m, L->wq, L->gq, m->kp_h, M, m->q, m->q_dim),
                        i2_job(m, L->wk, L->gk, m->kp_h, M, m->k, m->kv_dim),
                        i2_job(m, L->wv, L->gv, m->kp_h, M, m->v, m->kv_dim)},
                       {m->q_dim, m->kv_dim, m->kv_dim},
                       3};
    run_matmul(m, &qkv);

    for (int t = 0; t < M; t++) {
        int pos = c->pos ? c->pos[t] : c->slot0 + t, slot = cache_slot(c, t);
        const float *cs = m->d.rope_cos + (size_t)pos * half, *sn = m->d.rope_sin + (size_t)pos * half;
        rope(m->q + (size_t)t * m->q_dim, m->d.n_heads, hd, cs, sn);
        rope(m->k + (size_t)t * m->kv_dim, m->d.n_kv_heads, hd, cs, sn);
        for (int h = 0; h < m->d.n_kv_heads; h++) {
            size_t off = seq_base(m, c, t) + (((size_t)l * m->d.n_kv_heads + h) * m->d.ctx + slot) * hd;
            memcpy(m->kcache + off, m->k + (size_t)t * m->kv_dim + h * hd, sizeof(float) * hd);
            memcpy(m->vcache + off, m->v + (size_t)t * m->kv_dim + h * hd, sizeof(float) * hd);
        }
    }
    attention(m, l, c);

    glue(m, M, m->att, NULL, NULL, L->attn_sub_norm, m->q_dim, m->kp_q);
    matmul_task o = {m->i2, {i2_job(m, L->wo, L->go, m->kp_q, M, m->tmp, H)}, {H}, 1};
    run_matmul(m, &o);

    glue(m, M, m->x, m->tmp, NULL, L->post_norm, H, m->kp_h);
    matmul_task gu = {m->i2,
                      {i2_job(m, L->wg, L->gg, m->kp_h, M, m->gate, F), i2_job(m, L->wu, L->gu, m->kp_h, M, m->up, F)},
                      {F, F},
                      2};
    run_matmul(m, &gu);

    glue(m, M, m->gate, NULL, m->up, L->ffn_sub_norm, F, m->kp_f);
    matmul_task down = {m->i2, {i2_job(m, L->wd, L->gd, m->kp_f, M, m->tmp, H)}, {H}, 1};
    run_matmul(m, &down);
}

/* final norm + head for chunk tokens [t0, M) into logits rows */
static void output(bn_model *m, int t0, int M, float *logits) {
    const int H = m->d.hidden, type = m->d.head_type, k = bn_head_k(type, H);
    /* integer heads take int8 hidden vectors of k inputs (m->xq is free now) */
    bn_glue_job norm = {.n = H, .kp = k, .eps = m->d.rms_eps, .w = m->d.final_norm, .x = m->x + (size_t)t0 * H,
                        .h = m->h, .xq = type != BN_EMB_F16 ? m->xq : NULL, .xscale = m->xscale, .xsum = m->xsum};
    m->glue(&norm, 0, M - t0);
    bn_head_job job = {.type = type, .w = m->d.head, .wscale = m->d.head_scale, .k = k, .h = m->h, .hq = m->xq,
                       .hscale = m->xscale, .m = M - t0, .y = logits, .y_stride = m->d.vocab};
    bn_head_run(m->pool, m->head, &job, m->d.vocab);
}

/* tokens [0, n) into cache slots n_past.., in prefill chunks; pos and branch (either may be
 * NULL) as in chunk_view, indexed from token 0 */
static void forward_tokens(bn_model *m, const int32_t *tokens, int n, int n_past, const int32_t *pos,
                           const int32_t *branch, float *logits, int all_logits) {
    for (int c0 = 0; c0 < n; c0 += CHUNK) {
        int M = n - c0 < CHUNK ? n - c0 : CHUNK;
        chunk_view c = {M, n_past + c0, n_past, pos ? pos + c0 : NULL, branch, NULL};
        for (int t = 0; t < M; t++) embed(m, tokens[c0 + t], m->x + (size_t)t * m->d.hidden);
        for (int l = 0; l < m->d.n_layers; l++) layer_forward(m, l, &c);
        for (size_t i = 0; i < (size_t)M * m->d.hidden; i++) m->x[i] += m->tmp[i]; /* the last FFN output */
        if (all_logits)
            output(m, 0, M, logits + (size_t)c0 * m->d.vocab);
        else if (c0 + M == n)
            output(m, M - 1, M, logits);
    }
}

static int valid_tokens(const bn_model *m, const int32_t *tokens, int n, int n_past) {
    if (!m || n < 1 || n_past < 0 || n_past > m->d.ctx - n) return 0;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->d.vocab) return 0;
    return 1;
}

int bn_forward(bn_model *m, const int32_t *tokens, int n, int n_past, float *logits, int all_logits) {
    if (!valid_tokens(m, tokens, n, n_past)) return -1;
    forward_tokens(m, tokens, n, n_past, NULL, NULL, logits, all_logits);
    return 0;
}

int bn_forward_branches(bn_model *m, const int32_t *tokens, int n, int n_past, const int32_t *branch,
                        float *logits) {
    if (!valid_tokens(m, tokens, n, n_past)) return -1;
    int32_t *pos = malloc(sizeof(int32_t) * n);
    if (!pos) return -1;
    for (int i = 0; i < n; i++) { /* n_past + the count of earlier tokens of the same branch */
        pos[i] = n_past;
        for (int j = 0; j < i; j++) pos[i] += branch[j] == branch[i];
    }
    forward_tokens(m, tokens, n, n_past, pos, branch, logits, 1);
    free(pos);
    return 0;
}

/* ---- several sequences at once (continuous batching) ---------------------------------- */

int bn_model_set_seqs(bn_model *m, int n_seq) {
    if (!m || n_seq < 1) return -1;
    size_t cache = (size_t)n_seq * m->d.n_layers * m->kv_dim * m->d.ctx;
    float *k = zalloc(cache * sizeof(float)), *v = zalloc(cache * sizeof(float));
    if (!k || !v) {
        zfree(k), zfree(v);
        return -1;
    }
    zfree(m->kcache), zfree(m->vcache);
    m->kcache = k, m->vcache = v, m->n_seq = n_seq;
    return 0;
}

int bn_copy_prefix(bn_model *m, int src, int dst, int n) {
    if (!m || src < 0 || dst < 0 || src >= m->n_seq || dst >= m->n_seq || n < 0 || n > m->d.ctx) return -1;
    if (src == dst || n == 0) return 0;
    const size_t rows = (size_t)m->d.n_layers * m->d.n_kv_heads, per_seq = rows * m->d.ctx * m->d.head_dim;
    for (size_t r = 0; r < rows; r++) {
        size_t from = src * per_seq + r * m->d.ctx * m->d.head_dim, to = dst * per_seq + r * m->d.ctx * m->d.head_dim;
        memcpy(m->kcache + to, m->kcache + from, sizeof(float) * n * m->d.head_dim);
        memcpy(m->vcache + to, m->vcache + from, sizeof(float) * n * m->d.head_dim);
    }
    return 0;
}

/* Token i of sequence seq[i] at position pos[i]; a sequence's tokens must come in order at
 * consecutive positions, so that every token's earlier positions are cached before it attends. */
static int valid_batch(const bn_model *m, const int32_t *tokens, int n, const int32_t *seq, const int32_t *pos) {
    if (!m || n < 1) return 0;
    int *next = malloc(sizeof(int) * m->n_seq), ok = next != NULL;
    for (int s = 0; ok && s < m->n_seq; s++) next[s] = -1;
    for (int i = 0; ok && i < n; i++) {
        ok = tokens[i] >= 0 && tokens[i] < m->d.vocab && seq[i] >= 0 && seq[i] < m->n_seq && pos[i] >= 0 &&
             pos[i] < m->d.ctx && (next[seq[i]] < 0 || next[seq[i]] == pos[i]);
        if (ok) next[seq[i]] = pos[i] + 1;
    }
    free(next);
    return ok;
}

int bn_forward_batch(bn_model *m, const int32_t *tokens, int n, const int32_t *seq, const int32_t *pos,
                     const int8_t *want, float *logits) {
    if (!valid_batch(m, tokens, n, seq, pos)) return -1;
    const int H = m->d.hidden;
    for (int c0 = 0; c0 < n; c0 += CHUNK) {
        int M = n - c0 < CHUNK ? n - c0 : CHUNK, rows = 0;
        chunk_view c = {M, 0, 0, pos + c0, NULL, seq + c0};
        for (int t = 0; t < M; t++) embed(m, tokens[c0 + t], m->x + (size_t)t * H);
        for (int l = 0; l < m->d.n_layers; l++) layer_forward(m, l, &c);
        for (size_t i = 0; i < (size_t)M * H; i++) m->x[i] += m->tmp[i];
        /* the wanted tokens' hidden states moved together (the chunk is done with the rest), then
         * one head pass for all of them: the head streams once per step, not once per sequence */
        for (int t = 0; t < M; t++)
            if (want[c0 + t]) {
                if (rows != t) memcpy(m->x + (size_t)rows * H, m->x + (size_t)t * H, sizeof(float) * H);
                rows++;
            }
        if (rows) {
            output(m, 0, rows, logits);
            logits += (size_t)rows * m->d.vocab;
        }
    }
    return 0;
}
