/* bitnet-cli inference kernels: ternary x int8 matrix products and the BitNet b1.58 decoder.
 *
 * Everything here is plain C99 + pthreads. The same declarations (minus the preprocessor lines)
 * are handed to cffi by kernels/build_cffi.py, so keep this header free of macros in prototypes.
 *
 * Ternary weights use the `i2_k128` layout of docs/FORMAT.md: a row of K inputs is padded to
 * Kp = ceil(K/128)*128 and stored as Kp/128 blocks of 32 bytes; in a block, byte j holds the 2-bit
 * codes q = T + 1 of inputs j, 32+j, 64+j, 96+j in bits 1:0, 3:2, 5:4, 7:6. So
 * `(byte >> 2*i) & 3` over the 32 bytes gives 32 consecutive inputs, one AVX2 register's worth.
 *
 * The `tq1_k640` layout (bn_tq1 below) stores five trits a byte instead, 1.6 bits per weight.
 *
 * Every integer kernel returns acc = sum_k T_k * x_k exactly (int32), whatever the ISA and layout.
 */
#ifndef BITNET_H
#define BITNET_H

#include <stddef.h>
#include <stdint.h>

/* Layout constants, one definition for C and (through cffi) Python: an i2_k128 block holds
 * BN_BLOCK_K inputs in BN_BLOCK_BYTES bytes (four 2-bit codes a byte); a q4 block (bn_q4_block)
 * BN_Q4_BLOCK_K inputs; a q6 block (bn_q6_block) BN_Q6_BLOCK_K. */
enum { BN_BLOCK_K = 128, BN_BLOCK_BYTES = 32, BN_Q4_BLOCK_K = 64, BN_Q6_BLOCK_K = 256 };
_Static_assert(BN_BLOCK_BYTES * 4 == BN_BLOCK_K, "i2_k128 stores four 2-bit codes per byte");

/* Ternary weight layouts: every projection of a model uses one (bn_model_desc.layout). */
enum {
    BN_LAYOUT_I2 = 0,  /* i2_k128: four 2-bit codes a byte, 2 bits per weight */
    BN_LAYOUT_TQ1 = 1, /* tq1_k640: five trits a byte, 1.6 bits per weight (plus i2_k128 blocks at the end) */
    BN_LAYOUT_COUNT = 2
};

/* tq1_k640. A row of kp inputs (kp a multiple of BN_BLOCK_K, as for i2_k128, so both layouts take
 * the same int8 activations) is kp / 640 blocks of BN_TQ1_BLOCK_BYTES bytes, then the remaining
 * (kp % 640) / 128 inputs as i2_k128 blocks of 32 bytes. In a 640-input block, byte j (0..127)
 * holds the codes q = T + 1 of inputs j, 128+j, 256+j, 384+j, 512+j as the base-3 number
 * v = 81 q0 + 27 q1 + 9 q2 + 3 q3 + q4 (0..242), stored as the fixed-point fraction
 * b = ceil(v * 256 / 243). Code i comes back as the top of ((b * 3^i) mod 256) * 3, i.e.
 * q_i = (3 * (uint8_t)(b * 3^i)) >> 8, which byte-wise SIMD computes with adds and compares; and
 * bytes 32c..32c+31 give 32 consecutive inputs 128i + 32c + 0..31 of each code i. */
enum { BN_TQ1_BLOCK_K = 640, BN_TQ1_BLOCK_BYTES = 128 };
_Static_assert(BN_TQ1_BLOCK_BYTES * 5 == BN_TQ1_BLOCK_K, "tq1_k640 stores five trits per byte");

/* Bytes of one row of kp inputs (a multiple of BN_BLOCK_K) in a layout; 0 for an unknown layout
 * or kp. */
size_t bn_ternary_row_bytes(int layout, int kp);

/* Instruction-set paths. A path is usable when bn_isa_available() says so on this CPU;
 * kernels/dispatch.c says which kernel each one runs. */
enum {
    BN_ISA_SCALAR = 0,
    BN_ISA_AVX2 = 1,       /* AVX2 + FMA + F16C: vpmaddubsw on u8 codes x s8 activations */
    BN_ISA_AVX512 = 2,     /* AVX-512 BW/VL, no VNNI: vpmaddubsw on 512-bit vectors */
    BN_ISA_AVX512VNNI = 3, /* AVX-512 VNNI: vpdpbusd */
    BN_ISA_NEON = 4,       /* ARMv8 NEON: widening multiplies */
    BN_ISA_NEONDOT = 5,    /* ARMv8.2 dotprod: sdot on codes (0..2 fit s8) x s8 activations */
    BN_ISA_AMX = 6,        /* AVX-512 VNNI + AMX-INT8 (Linux): tdpbusd on tiles of u8 codes x s8 activations */
    BN_ISA_AVXVNNI = 7,    /* AVX2 + AVX-VNNI (Intel client cores from Alder Lake, no AVX-512): vpdpbusd on 256 bits */
    BN_ISA_COUNT = 8
};

int bn_isa_available(int isa);
int bn_isa_best(void);

/* The tuned path, for where the rule of bn_isa_best() and a measurement disagree: for weights in a
 * layout, products of one token (decode's GEMV) run on the kernel of the ISA bn_isa_tune() named for
 * m = 1 and products of several tokens (prefill's GEMM) on the one it named for m > 1; both start
 * as bn_isa_best(), and every other kernel (head, glue, attention) stays bn_isa_best()'s. It is no
 * instruction set of its own, so it lies outside BN_ISA_COUNT. Every ISA computes the same bits,
 * so a model built on it may keep running while a choice changes. bitnet_cli/kernels.py sets it
 * from its autotune. */
enum { BN_ISA_TUNED = 16 };

/* Returns 0, or -1 for an unknown layout or an ISA this CPU lacks. */
int bn_isa_tune(int layout, int gemv_isa, int gemm_isa);

/* Integer multiply-accumulates per second one thread sustains with isa's 8-bit multiply-add
 * (kernels/peak.c says which instructions), over `iters` passes of its loop: the peak `bitnet bench`
 * reports the ternary kernels' G MAC/s against. Returns -1 for an unavailable isa or iters < 1. */
double bn_mac_peak(int isa, long iters);

/* ---- persistent thread pool ------------------------------------------------------------ */
typedef struct bn_pool bn_pool;
bn_pool *bn_pool_new(int n_threads);
void bn_pool_free(bn_pool *pool);
int bn_pool_size(const bn_pool *pool);

/* ---- kernels (the building blocks, exposed for tests and `bitnet bench`) ------------------ */

/* Per-row absmax int8 quantisation, exactly as transformers' ActQuant in fp32:
 * s = 127 / max(max|x|, 1e-5); q = clamp(round_half_even(x * s), -128, 127).
 * x is [m][k]; xq is [m][kp] with columns k..kp-1 zeroed; scale[m] = s; xsum[m] = sum of q.
 * Every isa gives the same bits. Returns 0, or -1 for an unavailable isa. */
int bn_quantize_rows(int isa, const float *x, int m, int k, int kp, int8_t *xq, float *scale, int32_t *xsum);

/* acc[t][r] = sum_k T[r][k] * xq[t][k] for r < n rows of w (in `layout`, BN_LAYOUT_*, kp inputs)
 * and t < m tokens. xsum[t] must be the row sums of xq (from bn_quantize_rows). Work is split by
 * rows over the pool (pool may be NULL: the calling thread does it all). Returns 0, or -1 for an
 * unavailable isa or unknown layout. */
int bn_gemm_ternary(bn_pool *pool, int isa, int layout, const uint8_t *w, int n, int kp, const int8_t *xq,
                    const int32_t *xsum, int m, int32_t *acc);

/* Sum of every 64-bit word of buf (nbytes, a multiple of 64), read by all pool threads:
 * the streaming memory-read bandwidth probe of `bitnet bench`. */
uint64_t bn_stream_read(bn_pool *pool, const void *buf, size_t nbytes);

/* ---- embedding / output-head rows ------------------------------------------------------ */
/* Storage types of embedding and head rows; each has one entry in head.c's traits table (and
 * bitnet_cli/pack/embeddings.py's EMBEDDING_TYPES on the Python side). */
enum {
    BN_EMB_F16 = 0, /* f16 rows; the head is a float dot with the final hidden state */
    BN_EMB_I8 = 1,  /* int8 rows, one fp32 scale per row */
    BN_EMB_Q4 = 2,  /* 4-bit rows in bn_q4_block, one fp32 scale per row: 4.25 bits per weight */
    BN_EMB_Q6 = 3,  /* 6-bit rows in bn_q6_block (GGUF Q6_K's precision): 6.5625 bits per weight */
    BN_EMB_COUNT = 4
};

/* A q4 row of k inputs is padded to kp = ceil(k/64)*64 and stored as kp/64 of these blocks.
 * nib[j] holds the 4-bit codes u = q + 8 of inputs j (bits 3:0) and 32+j (bits 7:4); sub[0] and
 * sub[1] scale inputs 0..31 and 32..63. Weight = row_scale * sub * q, with q in [-8, 7].
 * The int8 and q4 heads dot these rows with the final hidden state quantised per token to int8
 * (like a BitLinear input), exactly in int32 (for q4: sum over halves of sub * sum q*x, which
 * fits int32 for kp <= 8192), then rescale once: logit = acc / x_scale * row_scale. */
typedef struct {
    uint8_t sub[2];
    uint8_t nib[32];
} bn_q4_block;
_Static_assert(sizeof(bn_q4_block) == 2 + BN_Q4_BLOCK_K / 2, "bn_q4_block: two sub-scales, then 64 nibbles");

/* A q6 row of k inputs is padded to kp = ceil(k/256)*256 and stored as kp/256 of these blocks.
 * Input i (0..255) of a block has the 6-bit code u = q + 32 (q in [-32, 31]) split in two:
 *   bits 3:0 in lo[32*(i/64) + i%32], bits 3:0 when i%64 < 32, else bits 7:4 (q4's nibble order);
 *   bits 5:4 in hi[32*(i/128) + i%32], bits 2f+1:2f with f = (i%128)/32 (i2_k128's order),
 * so one 32-byte load of lo or hi and a shift give the codes of 32 consecutive inputs.
 * Weight = (d * sc[i/16]) * q, d an IEEE half. The fields are those of GGUF's Q6_K (f16 d,
 * int8 scale per 16, 6-bit q), so a Q6_K row converts to q6 and back without loss.
 * The head dots a row with the final hidden state quantised per token to int8: per block the
 * exact integer acc_b = sum_j sc[j] * sum_{i in j} q_i * x_i (|acc_b| <= 16*128*16*32*128 < 2^31),
 * then, in block order on every ISA, s += d_b * (float)acc_b, and logit = s / x_scale. */
typedef struct {
    uint8_t lo[128];
    uint8_t hi[64];
    int8_t sc[16];
    uint16_t d;
} bn_q6_block;
_Static_assert(sizeof(bn_q6_block) == 210, "bn_q6_block: 256 6-bit codes, 16 int8 scales, an f16 d");

/* y[t][r] = logit of row r of w for hidden vector h[t] (float [m][k]), the model's output head
 * as a standalone product (for `bitnet bench`); wscale is the per-row scale of int8/q4 rows.
 * Returns 0, or -1 for an unavailable isa / bad type / out of memory. */
int bn_head_logits(bn_pool *pool, int isa, int type, const void *w, const float *wscale, int n, int k,
                   const float *h, int m, float *y);

/* ---- the model ------------------------------------------------------------------------- */

/* The FFN gate: act(gate) * up. BitNet b1.58 squares a ReLU; the Llama family uses SiLU. */
enum {
    BN_ACT_RELU2 = 0, /* relu(x)^2 */
    BN_ACT_SILU = 1   /* x / (1 + exp(-x)) */
};

/* Element types of the KV cache (bn_model_desc.kv_type). f16 halves its bytes: keys and values are
 * rounded to f16 (nearest, ties to even: bn_f32_to_f16) as they are written and widened back to
 * f32 (exactly) as attention reads them, which then runs the f32 cache's arithmetic. */
enum {
    BN_KV_F32 = 0,
    BN_KV_F16 = 1,
    BN_KV_COUNT = 2
};

/* f32 -> IEEE binary16 bits, rounded to nearest, ties to even (overflow -> inf, NaN stays NaN):
 * the one conversion every KV cache write uses; bn_f16_to_f32 is its exact inverse on f16 values. */
uint16_t bn_f32_to_f16(float x);
float bn_f16_to_f32(uint16_t h);

typedef struct {
    /* F32; attn_sub_norm and ffn_sub_norm are NULL in models without them (the Llama family):
     * the attention output / gated FFN activation then goes to int8 as it is */
    const float *attn_norm, *post_norm, *attn_sub_norm, *ffn_sub_norm;
    const uint8_t *wq, *wk, *wv, *wo, *wg, *wu, *wd;                    /* in bn_model_desc.layout */
    float gq, gk, gv, go, gg, gu, gd;                                   /* weight scales gamma */
    /* F32 biases of q, k, v (the Qwen2 family), added to the rescaled product; NULL: none */
    const float *bq, *bk, *bv;
    /* F32 [K] RMSNorm weights of each projection's own input norm (quantization_config use_rms_norm,
     * eps bitlinear_norm_eps), applied after the layer's own norm and before the int8 quantisation:
     * all seven or none (NULL) */
    const float *nq, *nk, *nv, *no, *ng, *nu, *nd;
} bn_layer_desc;

typedef struct {
    int n_layers, hidden, ffn, n_heads, n_kv_heads, head_dim, vocab, ctx;
    float rms_eps;
    int emb_type;              /* BN_EMB_F16, BN_EMB_I8, BN_EMB_Q4 or BN_EMB_Q6 */
    const void *embed;         /* [vocab] rows of hidden inputs */
    const float *embed_scale;  /* [vocab] for BN_EMB_I8 / BN_EMB_Q4 (q6 rows carry their scales) */
    int head_type;             /* the output head; equal to embed/emb_type when tied */
    const void *head;
    const float *head_scale;
    const float *final_norm;
    const float *rope_cos;     /* [ctx][head_dim/2], from the caller for torch-identical RoPE
                                * (the caller applies any frequency scaling, e.g. Llama 3's) */
    const float *rope_sin;
    const bn_layer_desc *layers;
    int ffn_act;               /* BN_ACT_RELU2 (0, BitNet b1.58) or BN_ACT_SILU */
    float bitlinear_norm_eps;  /* eps of the projections' own input norms (bn_layer_desc nq..nd) */
    int layout;                /* of every projection: BN_LAYOUT_I2 (0) or BN_LAYOUT_TQ1 */
    int kv_type;               /* the KV cache's element: BN_KV_F32 (0) or BN_KV_F16 */
} bn_model_desc;

typedef struct bn_model bn_model;

/* Returns NULL and a message in err on failure. The descriptor's arrays must outlive the model. */
bn_model *bn_model_new(const bn_model_desc *desc, int n_threads, int isa, char *err, int err_len);
void bn_model_free(bn_model *model);

/* Runs tokens[0..n) at positions n_past.. (the KV cache beyond n_past is overwritten), in
 * prefill chunks. logits is [n][vocab] when all_logits, else [1][vocab] for the last token.
 * Returns 0, or -1 on bad arguments (n_past + n > ctx, token id out of range). */
int bn_forward(bn_model *model, const int32_t *tokens, int n, int n_past, float *logits, int all_logits);

/* Several continuations of the cached context [0, n_past) in one pass, e.g. the endings of a
 * multiple-choice question: token i belongs to branch[i], is written to cache slot n_past + i,
 * sits at position n_past + (its index within its branch) and attends to the context plus the
 * earlier tokens of its own branch. logits is [n][vocab]. Afterwards the cache beyond n_past
 * holds no one sequence: continue from n_past or less. Returns 0, or -1 as bn_forward. */
int bn_forward_branches(bn_model *model, const int32_t *tokens, int n, int n_past, const int32_t *branch,
                        float *logits);

/* ---- several sequences at once (continuous batching) ------------------------------------
 * A model holds one KV cache per sequence: 1 after bn_model_new (the one bn_forward and
 * bn_forward_branches use, sequence 0). Each cache costs 2 * n_layers * n_kv_heads * head_dim * ctx
 * elements of kv_type (4 bytes for f32, 2 for f16), committed only as positions are written. */

/* Caches for n_seq sequences (0 .. n_seq-1); every cached position is dropped. Returns 0, or -1
 * when out of memory (the old caches are kept then). */
int bn_model_set_seqs(bn_model *model, int n_seq);

/* Copies positions [0, n) of sequence src's cache into sequence dst's: a shared prefix (a system
 * prompt, a chat history) is then computed once. Returns 0, or -1 on bad arguments. */
int bn_copy_prefix(bn_model *model, int src, int dst, int n);

/* One pass for tokens of several sequences: token i belongs to sequence seq[i], sits at position
 * pos[i] (its cache slot) and attends to positions 0..pos[i] of its own sequence, which must be
 * cached already or come earlier in this call (a sequence's tokens in order at consecutive
 * positions). Every matrix is streamed once per 64 tokens for all sequences together; each
 * token's results are those bn_forward gives it alone (every step is per token, in the same float
 * order). logits gets one [vocab] row per token with want[i] != 0, in order.
 * Returns 0, or -1 on bad arguments (sequence, position or token id out of range, or out of order). */
int bn_forward_batch(bn_model *model, const int32_t *tokens, int n, const int32_t *seq, const int32_t *pos,
                     const int8_t *want, float *logits);

#endif
