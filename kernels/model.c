/* The BitNet b1.58 decoder (transformers' BitNetForCausalLM) on the kernels of ternary.c, glue.c,
 * attention.c and head.c, as dispatch.c picks them for the model's ISA; and the Llama-architecture
 * 1.58-bit family (LlamaForCausalLM with BitLinear projections).
 *
 * Per layer, for a chunk of M tokens (M = 1 when decoding):
 *   h = rmsnorm(x) -> int8 -> q,k,v (one parallel section) -> RoPE -> KV cache
 *   attention over the cache (parallel over token x KV head) -> attn_sub_norm -> int8 -> o_proj; x += .
 *   h = rmsnorm(x) -> int8 -> gate,up (one section) -> relu(gate)^2 * up -> ffn_sub_norm -> int8
 *   -> down; x += .
 * The Llama family gates with silu(gate) * up and has no sub-norms (their steps quantise as is);
 * the Qwen2 family is Llama with float biases on q, k and v, added after the rescaled product.
 * With use_rms_norm (bn_layer_desc nq..nd set) every projection norms its input with its own weight
 * before quantising it: the layer's float step is then kept in m->h, and q,k,v (gate,up) each
 * quantise it through their own norm and run as their own section instead of sharing one input.
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
    const bn_kernels *kern; /* this model's ISA's kernels (dispatch.c) */
    bn_i2_rows_fn ternary;  /* its ternary product for the model's weight layout */
    const bn_head_traits *emb_type, *head_type;
    int q_dim, kv_dim, kp_h, kp_f, kp_q;
    float attn_scale;
    int n_seq;              /* independent sequences, each with its own cache (bn_model_set_seqs) */
    size_t kv_size;         /* bytes of a cache element: 4 (BN_KV_F32) or 2 (BN_KV_F16) */
    char *kcache, *vcache;  /* [seq][layer][kv_head][ctx][head_dim] elements of d.kv_type */
    /* chunk scratch */
    float *x, *h, *q, *k, *v, *att, *gate, *up, *tmp;
    int8_t *xq;
    float *xscale;
    int32_t *xsum;
    bn_amx_scratch amx; /* xa set where the CPU runs AMX (its GEMM reorders xq there) */
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
    if (d->kv_type < 0 || d->kv_type >= BN_KV_COUNT) FAIL("unknown KV cache type %d", d->kv_type);
    for (int l = 0; l < d->n_layers; l++) {
        const bn_layer_desc *L = &d->layers[l];
        int norms = !!L->nq + !!L->nk + !!L->nv + !!L->no + !!L->ng + !!L->nu + !!L->nd;
        if (norms != 0 && norms != 7) FAIL("layer %d: %d of its 7 projection input norms given (all or none)", l, norms);
        if (norms && !(d->bitlinear_norm_eps > 0.0f && isfinite(d->bitlinear_norm_eps)))
            FAIL("projection input norms need a positive bitlinear_norm_eps, got %g", (double)d->bitlinear_norm_eps);
    }
    m->emb_type = bn_head_type(d->emb_type);
    m->head_type = bn_head_type(d->head_type);
    if (!m->emb_type) FAIL("unknown embedding type %d", d->emb_type);
    if (!m->head_type) FAIL("unknown embedding type %d", d->head_type);
    if (m->head_type->max_k && bn_head_k(d->head_type, d->hidden) > m->head_type->max_k)
        FAIL("a %s head needs hidden_size <= %d (its int32 sums), got %d", m->head_type->name, m->head_type->max_k,
             d->hidden);
    m->kern = bn_kernels_for(isa);
    if (!m->kern) FAIL("instruction set %d is not available on this CPU", isa);
    if (d->layout < 0 || d->layout >= BN_LAYOUT_COUNT) FAIL("unknown ternary weight layout %d", d->layout);
    m->ternary = m->kern->ternary[d->layout];
    m->pool = bn_pool_new(n_threads);
    if (!m->pool) FAIL("cannot start %d threads", n_threads);
    m->layers = zalloc(sizeof(bn_layer_desc) * d->n_layers);
    if (!m->layers) FAIL("out of memory");
    memcpy(m->layers, d->layers, sizeof(bn_layer_desc) * d->n_layers);
    m->d.layers = m->layers;

    m->q_dim = d->n_heads * d->head_dim;
    m->kv_dim = d->n_kv_heads * d->head_dim;
    m->kp_h = (d->hidden + BN_BLOCK_K - 1) / BN_BLOCK_K * BN_BLOCK_K;
    m->kp_f = (d->ffn + BN_BLOCK_K - 1) / BN_BLOCK_K * BN_BLOCK_K;
    m->kp_q = (m->q_dim + BN_BLOCK_K - 1) / BN_BLOCK_K * BN_BLOCK_K; /* o_proj's inputs: heads * head_dim */
    m->attn_scale = (float)(1.0 / sqrt((double)d->head_dim));
    /* calloc'd: pages are only committed as positions are written */
    size_t cache = (size_t)d->n_layers * m->kv_dim * d->ctx;
    m->n_seq = 1;
    m->kv_size = d->kv_type == BN_KV_F16 ? sizeof(uint16_t) : sizeof(float);
    m->kcache = zalloc(cache * m->kv_size);
    m->vcache = zalloc(cache * m->kv_size);
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
    kp_max = kp_max > m->kp_q ? kp_max : m->kp_q; /* the widest quantised input of any product */
    m->xq = zalloc((size_t)CHUNK * kp_max);
    m->xscale = zalloc(sizeof(float) * CHUNK);
    m->xsum = zalloc(sizeof(int32_t) * CHUNK);
    if (bn_isa_available(BN_ISA_AMX) && !(m->amx.xa = zalloc(bn_amx_xa_bytes(CHUNK, kp_max))))
        FAIL("out of memory for a context of %d tokens", d->ctx);
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
                    m->tmp, m->xq, m->xscale, m->xsum, m->amx.xa, m->scores, m->keys};
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
    /* the jobs share one input: the AMX GEMM reorders it once for all of them */
    if (m->amx.xa && mt->jobs[0].m >= BN_AMX_MIN_TOKENS) {
        m->amx.state = 0;
        for (int i = 0; i < mt->count; i++) mt->jobs[i].amx = &m->amx;
    }
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

/* offset of token t's sequence cache in m->kcache / m->vcache, in elements */
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

/* offset of job i's cache rows (its token's, its KV head's, this layer's) in m->kcache / m->vcache,
 * in elements */
static size_t attn_job_base(const bn_model *m, const attn_task *a, int i) {
    const int jobs_per_token = m->d.n_heads / a->heads, group = m->d.n_heads / m->d.n_kv_heads;
    const int t = i / jobs_per_token, kvh = i % jobs_per_token * a->heads / group;
    return seq_base(m, a->c, t) + ((size_t)a->layer * m->d.n_kv_heads + kvh) * m->d.ctx * m->d.head_dim;
}

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
        int t = i / jobs_per_token, h = i % jobs_per_token * a->heads;
        if (t != t_keys) n_keys = visible_keys(a->c, t_keys = t, keys);
        size_t base = attn_job_base(m, a, i), row = (size_t)t * m->q_dim + h * hd;
        /* next_k: the next job's cache from its first row, where its keys start (visible_keys; a
         * prefetch hint, so a branch that starts further on only makes it less useful) */
        bn_attn_job job = {.q = m->q + row, .kc = m->kcache + base * m->kv_size, .vc = m->vcache + base * m->kv_size,
                           .kv_type = m->d.kv_type, .keys = keys, .n = n_keys, .hd = hd, .heads = a->heads,
                           .scale = m->attn_scale, .sc = sc, .out = m->att + row,
                           .next_k = i + 1 < i1 ? m->kcache + attn_job_base(m, a, i + 1) * m->kv_size : NULL};
        m->kern->attend(&job);
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

/* the input embedding of a token: its row as floats, by the row type's traits (head.c) */
static void embed(const bn_model *m, int token, float *out) {
    m->emb_type->row_to_f32(m->d.embed, m->d.embed_scale, token, m->d.hidden, out);
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

/* quantise: into m->xq (the next product's input), else the floats into m->h */
static void glue_eps(bn_model *m, int M, float *x, const float *add, const float *up, const float *w, float eps, int n,
                     int kp, int quantise) {
    glue_task g = {m->kern->glue,
                   {.n = n, .kp = kp, .act = m->d.ffn_act, .eps = eps, .w = w, .x = x, .add = add, .up = up,
                    .h = m->h,
                    .xq = quantise ? m->xq : NULL, .xscale = m->xscale, .xsum = m->xsum},
                   M};
    if (M == 1)
        glue_worker(&g, 0, 1, 0);
    else
        bn_pool_run(m->pool, glue_worker, &g, bn_pool_chunks(m->pool, M, 1));
}

static void glue(bn_model *m, int M, float *x, const float *add, const float *up, const float *w, int n, int kp) {
    glue_eps(m, M, x, add, up, w, m->d.rms_eps, n, kp, 1);
}

/* The int8 input of one projection: the float step before it (add, gate, the layer's norm w) and,
 * with a projection input norm wp (use_rms_norm), that norm after it, the step's result kept in m->h
 * in between (skipped when there is no step). */
static void project_input(bn_model *m, int M, float *x, const float *add, const float *up, const float *w,
                          const float *wp, int n, int kp) {
    if (!wp) {
        glue(m, M, x, add, up, w, n, kp);
        return;
    }
    if (add || up || w) {
        glue_eps(m, M, x, add, up, w, m->d.rms_eps, n, kp, 0);
        x = m->h;
    }
    glue_eps(m, M, x, NULL, NULL, wp, m->d.bitlinear_norm_eps, n, kp, 1);
}

/* Matrices that read one input, each through its own input norm (use_rms_norm): the input (in m->h)
 * is quantised once per matrix and each product is its own section. */
static void matmul_each(bn_model *m, const matmul_task *shared, const float *const *norms, int n, int kp) {
    for (int i = 0; i < shared->count; i++) {
        glue_eps(m, shared->jobs[i].m, m->h, NULL, NULL, norms[i], m->d.bitlinear_norm_eps, n, kp, 1);
        matmul_task one = {shared->fn, {shared->jobs[i]}, {shared->rows[i]}, 1};
        run_matmul(m, &one);
    }
}

/* y[t][i] += b[i] for M rows of n: a projection's bias, after its rescaled product (transformers'
 * BitLinear adds it to the dequantised output) */
static void add_bias(float *y, const float *b, int M, int n) {
    for (int t = 0; t < M; t++, y += n)
        for (int i = 0; i < n; i++) y[i] += b[i];
}

/* n keys or values into the cache at dst, in its element type (f16: rounded as bn_f32_to_f16 does) */
static void store_kv(const bn_model *m, char *dst, const float *src, int n) {
    if (m->d.kv_type == BN_KV_F16)
        m->kern->to_f16((uint16_t *)dst, src, n);
    else
        memcpy(dst, src, sizeof(float) * n);
}

static void layer_forward(bn_model *m, int l, const chunk_view *c) {
    const bn_layer_desc *L = &m->layers[l];
    const int M = c->M;
    const int H = m->d.hidden, F = m->d.ffn, hd = m->d.head_dim, half = hd / 2;

    /* m->tmp holds the previous layer's FFN output, still to be added to the residual */
    matmul_task qkv = {m->ternary,
                       {i2_job(m, L->wq, L->gq, m->kp_h, M, m->q, m->q_dim),
                        i2_job(m, L->wk, L->gk, m->kp_h, M, m->k, m->kv_dim),
                        i2_job(m, L->wv, L->gv, m->kp_h, M, m->v, m->kv_dim)},
                       {m->q_dim, m->kv_dim, m->kv_dim},
                       3};
    if (!L->nq) {
        glue(m, M, m->x, l > 0 ? m->tmp : NULL, NULL, L->attn_norm, H, m->kp_h);
        run_matmul(m, &qkv);
    } else {
        glue_eps(m, M, m->x, l > 0 ? m->tmp : NULL, NULL, L->attn_norm, m->d.rms_eps, H, m->kp_h, 0);
        matmul_each(m, &qkv, (const float *const[]){L->nq, L->nk, L->nv}, H, m->kp_h);
    }
    if (L->bq) add_bias(m->q, L->bq, M, m->q_dim);
    if (L->bk) add_bias(m->k, L->bk, M, m->kv_dim);
    if (L->bv) add_bias(m->v, L->bv, M, m->kv_dim);

    for (int t = 0; t < M; t++) {
        int pos = c->pos ? c->pos[t] : c->slot0 + t, slot = cache_slot(c, t);
        const float *cs = m->d.rope_cos + (size_t)pos * half, *sn = m->d.rope_sin + (size_t)pos * half;
        rope(m->q + (size_t)t * m->q_dim, m->d.n_heads, hd, cs, sn);
        rope(m->k + (size_t)t * m->kv_dim, m->d.n_kv_heads, hd, cs, sn);
        for (int h = 0; h < m->d.n_kv_heads; h++) {
            size_t off = seq_base(m, c, t) + (((size_t)l * m->d.n_kv_heads + h) * m->d.ctx + slot) * hd;
            store_kv(m, m->kcache + off * m->kv_size, m->k + (size_t)t * m->kv_dim + h * hd, hd);
            store_kv(m, m->vcache + off * m->kv_size, m->v + (size_t)t * m->kv_dim + h * hd, hd);
        }
    }
    attention(m, l, c);

    project_input(m, M, m->att, NULL, NULL, L->attn_sub_norm, L->no, m->q_dim, m->kp_q);
    matmul_task o = {m->ternary, {i2_job(m, L->wo, L->go, m->kp_q, M, m->tmp, H)}, {H}, 1};
    run_matmul(m, &o);

    matmul_task gu = {m->ternary,
                      {i2_job(m, L->wg, L->gg, m->kp_h, M, m->gate, F), i2_job(m, L->wu, L->gu, m->kp_h, M, m->up, F)},
                      {F, F},
                      2};
    if (!L->ng) {
        glue(m, M, m->x, m->tmp, NULL, L->post_norm, H, m->kp_h);
        run_matmul(m, &gu);
    } else {
        glue_eps(m, M, m->x, m->tmp, NULL, L->post_norm, m->d.rms_eps, H, m->kp_h, 0);
        matmul_each(m, &gu, (const float *const[]){L->ng, L->nu}, H, m->kp_h);
    }

    project_input(m, M, m->gate, NULL, m->up, L->ffn_sub_norm, L->nd, F, m->kp_f);
    matmul_task down = {m->ternary, {i2_job(m, L->wd, L->gd, m->kp_f, M, m->tmp, H)}, {H}, 1};
    run_matmul(m, &down);
}

/* final norm + head for chunk tokens [t0, M) into logits rows */
static void output(bn_model *m, int t0, int M, float *logits) {
    const int H = m->d.hidden, type = m->d.head_type, k = bn_head_k(type, H);
    /* integer heads take int8 hidden vectors of k inputs (m->xq is free now) */
    bn_glue_job norm = {.n = H, .kp = k, .eps = m->d.rms_eps, .w = m->d.final_norm, .x = m->x + (size_t)t0 * H,
                        .h = m->h, .xq = m->head_type->quantized ? m->xq : NULL, .xscale = m->xscale, .xsum = m->xsum};
    m->kern->glue(&norm, 0, M - t0);
    bn_head_job job = {.w = m->d.head, .wscale = m->d.head_scale, .k = k, .h = m->h, .hq = m->xq,
                       .hscale = m->xscale, .m = M - t0, .y = logits, .y_stride = m->d.vocab};
    bn_head_run(m->pool, m->kern->head[type], &job, m->d.vocab);
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
    char *k = zalloc(cache * m->kv_size), *v = zalloc(cache * m->kv_size);
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
    const size_t rows = (size_t)m->d.n_layers * m->d.n_kv_heads, row_bytes = (size_t)m->d.ctx * m->d.head_dim * m->kv_size;
    for (size_t r = 0; r < rows; r++) {
        size_t from = (src * rows + r) * row_bytes, to = (dst * rows + r) * row_bytes;
        memcpy(m->kcache + to, m->kcache + from, (size_t)n * m->d.head_dim * m->kv_size);
        memcpy(m->vcache + to, m->vcache + from, (size_t)n * m->d.head_dim * m->kv_size);
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
