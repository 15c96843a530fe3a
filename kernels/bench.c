/* Standalone timing of the engine on a random model held in memory (no Python, no file):
 *   build/bench [threads] [isa] [shape: 2b4t|small] [head: f16|i8|q4|q6] [layout: i2|tq1] [kv: f32|f16]
 *                                        ->  decode tok/s, pp128 tok/s, GB/s
 *   build/bench [threads] [isa] kernel   the ternary GEMV/GEMM alone on the FFN shape, both layouts
 *                                        (1, 4, 8, 16, 32, 64 tokens; BN_BENCH_TOKENS="2,12,..." for others;
 *                                        BN_BENCH_COPIES=N copies of the matrix cycled, default 16, 128
 *                                        to read from memory past a 480 MB L3; BN_BENCH_STEPS=N timings,
 *                                        best kept, default 3; BN_BENCH_MATRIX=down for the
 *                                        down projection, 2560x6912)
 *   build/bench [threads] [isa] head [m ...]   the output head alone (f16, int8, q4 and q6 rows) against
 *                                        m tokens (default 1): ms per call and per extra token
 *                                        (BN_BENCH_HEAD="q6,i8" for some row types only)
 *   build/bench [threads] [isa] attention [positions ...]   the attention of a 16-row decode step
 *                                        alone (2B4T: 30 layers x 5 KV heads x 16 sequences), f32
 *                                        against f16 KV caches, interleaved: ms per step
 *   build/bench 1 [isa] attention-job [positions ...]   one attention job (a KV head's f16 cache, 4
 *                                        query heads of 128) back to back on the calling thread: ns per
 *                                        key and group, the cache in L2 (one job over and over) and from
 *                                        memory (the jobs of caches filling 64 MB in turn)
 * `bitnet bench` is the user-facing tool; this is for machines without the Python stack. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* 64-byte aligned, as the engine's buffers are (model.c's zalloc): with malloc's 16-byte
 * alignment every other 32-byte activation load splits a cache line, which understated the token
 * path (6912x2560, 64 tokens: 19.4 ms against 16.9 here, medians of 3 interleaved runs) */
static void *filled(size_t n, unsigned seed) {
    uint8_t *p = aligned_alloc(64, (n + 63) / 64 * 64);
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (uint8_t)(seed >> 16);
    }
    return p;
}

/* random rows of a layout: for tq1_k640 any byte decodes to codes 0..2, so random bytes will do;
 * i2_k128 codes 3 are cleared */
static uint8_t *ternary(int n, int k, unsigned seed, int layout) {
    size_t bytes = (size_t)n * bn_ternary_row_bytes(layout, (k + BN_BLOCK_K - 1) / BN_BLOCK_K * BN_BLOCK_K);
    uint8_t *w = filled(bytes, seed);
    if (layout != BN_LAYOUT_I2) return w;
    for (size_t i = 0; i < bytes; i++) /* codes 0..2 only */
        for (int f = 0; f < 4; f++)
            if (((w[i] >> 2 * f) & 3) == 3) w[i] &= (uint8_t)~(1 << 2 * f);
    return w;
}

/* a value in [-1, 1) of a multiplicative hash of i (its low 32 bits: wider, the product grew
 * with i, which filled the attention bench's caches with values past f16's range, infinities
 * that sent every score through libm's overflow path) */
static float hashed_unit(size_t i) { return (float)((int)((uint32_t)(i * 2654435761u) >> 24) - 128) / 128.0f; }

static float *ones(int n) {
    float *v = malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) v[i] = 1.0f;
    return v;
}

/* a positive integer from the environment, or `otherwise` when unset or not one */
static int env_count(const char *name, int otherwise) {
    const char *v = getenv(name);
    const int n = v ? atoi(v) : 0;
    return n >= 1 ? n : otherwise;
}

/* the ternary kernel alone on an FFN matrix (gate/up, 6912 x 2560, or with BN_BENCH_MATRIX=down
 * the down projection, 2560 x 6912), per layout, cycling through `copies` of the matrix
 * (BN_BENCH_COPIES, default 16: 70 MB of i2, past most L3s but not the 480 MB of the AMX VM,
 * which needs 128 for a product to read its weights from memory); the best of BN_BENCH_STEPS
 * (default 3) timings of one pass over the copies */
static void bench_kernel(int threads, int isa, int layout) {
    const char *matrix = getenv("BN_BENCH_MATRIX");
    const int down = matrix && !strcmp(matrix, "down"), n = down ? 2560 : 6912, k = down ? 6912 : 2560;
    const int copies = env_count("BN_BENCH_COPIES", 16), timings = env_count("BN_BENCH_STEPS", 3);
    const char *names[] = {"i2_k128", "tq1_k640"};
    uint8_t **w = malloc(sizeof *w * copies);
    for (int c = 0; c < copies; c++) w[c] = ternary(n, k, 100 + c, layout);
    bn_pool *pool = bn_pool_new(threads);
    /* the yardstick: one thread's integer MAC peak on this ISA (peak.c), best of 3 runs of 2^22
     * loop passes (a few ms each), times the threads */
    double peak = 0;
    for (int rep = 0; rep < 3; rep++) {
        double p = bn_mac_peak(isa, 1L << 22);
        if (p > peak) peak = p;
    }
    /* decode, batched decode steps, a prefill chunk; BN_BENCH_TOKENS="m,m,..." for others */
    int token_counts[64] = {1, 4, 8, 16, 32, 64}, counts = 6;
    const char *env = getenv("BN_BENCH_TOKENS");
    if (env && *env)
        for (counts = 0; counts < 64 && *env;) {
            token_counts[counts++] = atoi(env);
            while (*env && *env != ',') env++;
            if (*env) env++;
        }
    for (int mi = 0; mi < counts; mi++) {
        const int m = token_counts[mi];
        int8_t *xq = filled((size_t)m * k, 5);
        int32_t *xsum = calloc(m, sizeof(int32_t)), *acc = malloc(sizeof(int32_t) * m * n);
        double best = 1e9;
        for (int rep = 0; rep < timings; rep++) {
            double t0 = now();
            for (int c = 0; c < copies; c++) bn_gemm_ternary(pool, isa, layout, w[c], n, k, xq, xsum, m, acc);
            double dt = (now() - t0) / copies;
            if (dt < best) best = dt;
        }
        double macs = (double)n * k * m / best;
        printf("kernel %s %dx%d m=%d: %.3f ms, %.1f GB/s of weights, %.1f G MAC/s, %.0f%% of the MAC peak "
               "(%.1f G MAC/s x %d threads)\n", names[layout], n, k, m, best * 1e3,
               (double)n * bn_ternary_row_bytes(layout, k) / best / 1e9, macs / 1e9, 100 * macs / (peak * threads),
               peak / 1e9, threads);
        free(xq), free(xsum), free(acc);
    }
    bn_pool_free(pool);
    for (int c = 0; c < copies; c++) free(w[c]);
    free(w);
}

/* CPU seconds of the whole process: on a shared machine, what a run cost however the scheduler
 * sliced it (the wall clock also counts the time other processes held the cores) */
static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* bytes of one output-head row of `hidden` inputs, values and per-row scale, per BN_EMB_* type */
static double head_row_bytes(int type, int hidden) {
    const double bytes[] = {2.0 * hidden, hidden + 4.0,
                            (hidden + BN_Q4_BLOCK_K - 1) / BN_Q4_BLOCK_K * sizeof(bn_q4_block) + 4.0,
                            (hidden + BN_Q6_BLOCK_K - 1) / BN_Q6_BLOCK_K * (double)sizeof(bn_q6_block)};
    return bytes[type];
}

/* the output head alone on the 2B4T shape (128256 x 2560) against m tokens (decoded rows of a
 * batch step), per row type: ms per call, and per token beyond the first (what an extra stream costs) */
static void bench_head(int threads, int isa, const int *ms, int n_ms) {
    const int V = 128256, H = 2560;
    const char *names[] = {"f16", "i8", "q4", "q6"};
    int m_max = 1;
    for (int i = 0; i < n_ms; i++) m_max = ms[i] > m_max ? ms[i] : m_max;
    uint16_t *w16 = malloc(sizeof(uint16_t) * (size_t)V * H);
    for (size_t i = 0; i < (size_t)V * H; i++) w16[i] = (uint16_t)(0x2000 + (i * 2654435761u >> 20) % 0x1000);
    void *rows[] = {w16, filled((size_t)V * H, 9), filled((size_t)V * (H / 64) * sizeof(bn_q4_block), 10),
                    filled((size_t)V * (H / 256) * sizeof(bn_q6_block), 12)};
    /* q6: finite block scales d (random bytes would hold infinities and NaNs) */
    for (size_t i = 0; i < (size_t)V * (H / 256); i++) ((bn_q6_block *)rows[3])[i].d = 0x1c00;
    float *scale = ones(V), *h = malloc(sizeof(float) * (size_t)m_max * H), *y = malloc(sizeof(float) * (size_t)m_max * V);
    for (size_t i = 0; i < (size_t)m_max * H; i++) h[i] = hashed_unit(i);
    bn_pool *pool = bn_pool_new(threads);
    const char *only = getenv("BN_BENCH_HEAD");
    for (int type = 0; type < 4; type++) {
        if (only && !strstr(only, names[type])) continue;
        double t1 = 0, cpu1 = 0;
        for (int i = 0; i < n_ms; i++) {
            const int m = ms[i], reps = m > 4 ? 5 : 9;
            double t[9], cpu[9];
            for (int rep = 0; rep < reps; rep++) {
                double t0 = now(), c0 = cpu_now();
                bn_head_logits(pool, isa, type, rows[type], scale, V, H, h, m, y);
                t[rep] = now() - t0, cpu[rep] = cpu_now() - c0;
            }
            qsort(t, reps, sizeof t[0], cmp_double);
            qsort(cpu, reps, sizeof cpu[0], cmp_double);
            const double med = t[reps / 2], cpu_med = cpu[reps / 2];
            if (m == 1) t1 = med, cpu1 = cpu_med;
            printf("head %s %dx%d m=%d: %.2f ms median (CPU %.2f ms), %.1f GB/s", names[type], V, H, m, med * 1e3,
                   cpu_med * 1e3, V * head_row_bytes(type, H) / med / 1e9);
            if (m > 1 && t1 > 0)
                printf(", per token beyond the first %.2f ms (CPU %.2f ms)", (med - t1) / (m - 1) * 1e3,
                       (cpu_med - cpu1) / (m - 1) * 1e3);
            printf("\n");
        }
    }
    bn_pool_free(pool);
    for (int type = 0; type < 4; type++) free(rows[type]);
    free(scale), free(h), free(y);
}

/* One decode step's attention on the 2B4T shape: per layer, 16 sequences x 5 KV heads (groups of 4
 * query heads), each over `positions` cached rows, split over the pool as model.c splits it */
typedef struct {
    const bn_kernels *kern;
    const void *cache; /* [seq][layer][kv_head] k rows then v rows of positions x 128 */
    int kv_type, layer, positions;
    const float *q;
    float *out, *scores;
    const int *keys;
} attn_bench;

enum { ATT_SEQS = 16, ATT_LAYERS = 30, ATT_KV = 5, ATT_GROUP = 4, ATT_HD = 128 };

/* job i's K rows (its V rows follow them), as model.c's job i: sequence i / ATT_KV, KV head i % ATT_KV */
static const char *attn_bench_rows(const attn_bench *b, int i) {
    const size_t esize = b->kv_type == BN_KV_F16 ? 2 : 4, rows = (size_t)b->positions * ATT_HD * esize;
    return (const char *)b->cache + (((size_t)i / ATT_KV * ATT_LAYERS + b->layer) * ATT_KV + i % ATT_KV) * 2 * rows;
}

static void attn_bench_worker(void *ctx, int chunk, int n_chunks, int ith) {
    const attn_bench *b = ctx;
    const size_t esize = b->kv_type == BN_KV_F16 ? 2 : 4, rows = (size_t)b->positions * ATT_HD * esize;
    int i0, i1;
    bn_split(ATT_SEQS * ATT_KV, chunk, n_chunks, 1, &i0, &i1);
    for (int i = i0; i < i1; i++) {
        const char *k = attn_bench_rows(b, i);
        bn_attn_job job = {.q = b->q + (size_t)i * ATT_GROUP * ATT_HD, .kc = k, .vc = k + rows, .kv_type = b->kv_type,
                           .keys = b->keys, .n = b->positions, .hd = ATT_HD, .heads = ATT_GROUP, .scale = 0.088f,
                           .sc = b->scores + (size_t)ith * ATT_GROUP * b->positions,
                           .out = b->out + (size_t)i * ATT_GROUP * ATT_HD,
                           .next_k = i + 1 < i1 ? attn_bench_rows(b, i + 1) : NULL};
        b->kern->attend(&job);
    }
}

static void bench_attention(int threads, int isa, const int *positions, int n_positions) {
    bn_pool *pool = bn_pool_new(threads);
    float *q = malloc(sizeof(float) * ATT_SEQS * ATT_KV * ATT_GROUP * ATT_HD), *out = malloc(sizeof(float) * ATT_SEQS * ATT_KV * ATT_GROUP * ATT_HD);
    for (int i = 0; i < ATT_SEQS * ATT_KV * ATT_GROUP * ATT_HD; i++) q[i] = (float)((i * 37) % 101 - 50) / 50.0f;
    for (int p = 0; p < n_positions; p++) {
        const int n = positions[p];
        int *keys = malloc(sizeof(int) * n);
        for (int j = 0; j < n; j++) keys[j] = j;
        float *scores = malloc(sizeof(float) * threads * ATT_GROUP * n);
        const size_t elems = (size_t)ATT_SEQS * ATT_LAYERS * ATT_KV * 2 * n * ATT_HD;
        float *c32 = aligned_alloc(64, (elems * 4 + 63) / 64 * 64);
        uint16_t *c16 = aligned_alloc(64, (elems * 2 + 63) / 64 * 64);
        for (size_t i = 0; i < elems; i++) c32[i] = hashed_unit(i), c16[i] = bn_f32_to_f16(c32[i]);
        const void *caches[2] = {c32, c16};
        double t[2][7];
        for (int rep = 0; rep < 7; rep++)
            for (int type = 0; type < 2; type++) {
                double t0 = now();
                for (int l = 0; l < ATT_LAYERS; l++) {
                    attn_bench b = {bn_kernels_for(isa), caches[type], type, l, n, q, out, scores, keys};
                    bn_pool_run(pool, attn_bench_worker, &b, bn_pool_chunks(pool, ATT_SEQS * ATT_KV, 1));
                }
                t[type][rep] = now() - t0;
            }
        for (int type = 0; type < 2; type++) {
            qsort(t[type], 7, sizeof(double), cmp_double);
            const double bytes = (double)elems * (type ? 2 : 4);
            printf("attention of a 16-row step, %d positions, %s cache: %.2f ms median of 7 (%.2f-%.2f), %.1f GB/s\n", n,
                   type ? "f16" : "f32", t[type][3] * 1e3, t[type][0] * 1e3, t[type][6] * 1e3, bytes / t[type][3] / 1e9);
        }
        free(keys), free(scores), free(c32), free(c16);
    }
    bn_pool_free(pool);
    free(q), free(out);
}

/* What bounds a job without the step around it (session 20, benchmarks/SERVE_PERF.md): its cost per
 * key and group of ATT_GROUP heads from L2 against from memory, best of 5 timings. Each job
 * prefetches the next one's rows, as model.c's jobs do. */
static void bench_attention_job(int isa, const int *positions, int n_positions) {
    const bn_kernels *kern = bn_kernels_for(isa);
    float *q = malloc(sizeof(float) * ATT_GROUP * ATT_HD), *out = malloc(sizeof(float) * ATT_GROUP * ATT_HD);
    for (int i = 0; i < ATT_GROUP * ATT_HD; i++) q[i] = (float)((i * 37) % 101 - 50) / 50.0f;
    for (int p = 0; p < n_positions; p++) {
        const int n = positions[p];
        const size_t rows = (size_t)n * ATT_HD, job_bytes = 2 * rows * sizeof(uint16_t);
        const int jobs = (int)((64u << 20) / job_bytes) + 1;
        int *keys = malloc(sizeof(int) * n);
        for (int j = 0; j < n; j++) keys[j] = j;
        float *scores = malloc(sizeof(float) * ATT_GROUP * n);
        uint16_t *cache = aligned_alloc(64, (jobs * job_bytes + 63) / 64 * 64);
        for (size_t i = 0; i < jobs * 2 * rows; i++) cache[i] = bn_f32_to_f16(hashed_unit(i));
        for (int from_memory = 0; from_memory < 2; from_memory++) {
            const int cycle = from_memory ? jobs : 1, calls = (from_memory ? 4 : 16) * jobs;
            double best = 1e30;
            for (int rep = 0; rep < 5; rep++) {
                double t0 = now();
                for (int c = 0; c < calls; c++) {
                    const uint16_t *k = cache + (size_t)(c % cycle) * 2 * rows;
                    bn_attn_job job = {.q = q, .kc = k, .vc = k + rows, .kv_type = BN_KV_F16, .keys = keys, .n = n,
                                       .hd = ATT_HD, .heads = ATT_GROUP, .scale = 0.088f, .sc = scores, .out = out,
                                       .next_k = cache + (size_t)((c + 1) % cycle) * 2 * rows};
                    kern->attend(&job);
                }
                const double t = now() - t0;
                best = t < best ? t : best;
            }
            printf("attention job, %d positions, f16 cache %s: %.1f ns per key and group of %d heads\n", n,
                   from_memory ? "from memory" : "in L2", best / calls / n * 1e9, ATT_GROUP);
        }
        free(keys), free(scores), free(cache);
    }
    free(q), free(out);
}

/* the positive integers among argv[4..] (at most 16), or just `otherwise` when there are none */
static int positive_args(int argc, char **argv, int out[16], int otherwise) {
    int n = 0;
    for (int i = 4; i < argc && n < 16; i++)
        if ((out[n] = atoi(argv[i])) >= 1) n++;
    if (!n) out[n++] = otherwise;
    return n;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    int isa = argc > 2 ? atoi(argv[2]) : bn_isa_best();
    if (argc > 3 && !strcmp(argv[3], "kernel")) {
        bench_kernel(threads, isa, BN_LAYOUT_I2);
        bench_kernel(threads, isa, BN_LAYOUT_TQ1);
        return 0;
    }
    if (argc > 3 && !strcmp(argv[3], "head")) {
        int ms[16], n_ms = positive_args(argc, argv, ms, 1);
        bench_head(threads, isa, ms, n_ms);
        return 0;
    }
    if (argc > 3 && !strcmp(argv[3], "attention-job")) {
        int ps[16], n_ps = positive_args(argc, argv, ps, 288);
        bench_attention_job(isa, ps, n_ps);
        return 0;
    }
    if (argc > 3 && !strcmp(argv[3], "attention")) {
        int ps[16], n_ps = positive_args(argc, argv, ps, 288);
        bench_attention(threads, isa, ps, n_ps);
        return 0;
    }
    const char *head = argc > 4 ? argv[4] : "f16";
    int head_type = !strcmp(head, "q6")   ? BN_EMB_Q6
                    : !strcmp(head, "q4") ? BN_EMB_Q4
                    : !strcmp(head, "i8") ? BN_EMB_I8
                                          : BN_EMB_F16;
    const int layout = argc > 5 && !strcmp(argv[5], "tq1") ? BN_LAYOUT_TQ1 : BN_LAYOUT_I2;
    const int kv_type = argc > 6 && !strcmp(argv[6], "f16") ? BN_KV_F16 : BN_KV_F32;
    int big = !(argc > 3 && !strcmp(argv[3], "small"));
    int L = big ? 30 : 4, H = 2560, F = 6912, NH = 20, NKV = 5, HD = 128, V = 128256, CTX = 512;
    bn_layer_desc *layers = calloc(L, sizeof *layers);
    for (int l = 0; l < L; l++)
        layers[l] = (bn_layer_desc){ones(H), ones(H), ones(H), ones(F), ternary(H, H, l * 7 + 1, layout),
                                    ternary(NKV * HD, H, l * 7 + 2, layout), ternary(NKV * HD, H, l * 7 + 3, layout),
                                    ternary(H, H, l * 7 + 4, layout), ternary(F, H, l * 7 + 5, layout),
                                    ternary(F, H, l * 7 + 6, layout), ternary(H, F, l * 7 + 7, layout),
                                    0.05f, 0.05f, 0.05f, 0.05f, 0.05f, 0.05f, 0.05f,
                                    .bq = NULL, .nq = NULL}; /* BitNet b1.58: no biases, no projection norms */
    uint16_t *emb = malloc(sizeof(uint16_t) * (size_t)V * H);
    for (size_t i = 0; i < (size_t)V * H; i++) emb[i] = (uint16_t)(0x2000 + (i * 2654435761u >> 20) % 0x1000);
    float *cs = ones(CTX * HD / 2), *sn = calloc(CTX * HD / 2, sizeof(float));
    void *head_rows = head_type == BN_EMB_F16 ? (void *)emb : filled((size_t)(V * head_row_bytes(head_type, H)), 11);
    float *head_scale = ones(V);
    for (int i = 0; i < V; i++) head_scale[i] = 1e-3f;
    bn_model_desc d = {L, H, F, NH, NKV, HD, V, CTX, 1e-5f, BN_EMB_F16, emb, NULL, head_type, head_rows,
                       head_scale, ones(H), cs, sn, layers, BN_ACT_RELU2, 0.0f, layout, kv_type};
    char err[128];
    bn_model *m = bn_model_new(&d, threads, isa, err, sizeof err);
    if (!m) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    float *logits = malloc(sizeof(float) * V);
    int32_t tokens[128];
    for (int i = 0; i < 128; i++) tokens[i] = (i * 7919) % V;
    double bytes = (double)L * ((double)(H + 2 * NKV * HD + H + 2 * F) * bn_ternary_row_bytes(layout, H) +
                                (double)H * bn_ternary_row_bytes(layout, F)) +
                   V * head_row_bytes(head_type, H);

    bn_forward(m, tokens, 8, 0, logits, 0); /* warm up */
    double pp_s[3];
    for (int i = 0; i < 3; i++) {
        double t0 = now();
        bn_forward(m, tokens, 128, 0, logits, 0);
        pp_s[i] = now() - t0;
    }
    qsort(pp_s, 3, sizeof pp_s[0], cmp_double);
    double pp = 128 / pp_s[1];
    enum { n = 32 };
    double dt[n];
    for (int i = 0; i < n; i++) {
        double t1 = now();
        bn_forward(m, tokens + (i % 128), 1, 128 + i, logits, 0);
        dt[i] = now() - t1;
    }
    qsort(dt, n, sizeof dt[0], cmp_double);
    double med = (dt[n / 2 - 1] + dt[n / 2]) / 2;
    printf("threads %d isa %d layers %d head %s layout %d kv %s: pp128 %.1f tok/s median of 3 | decode %.2f tok/s median, %.2f best | %.1f GB/s "
           "streamed (%.0f MB/token)\n",
           threads, isa, L, head, layout, kv_type == BN_KV_F16 ? "f16" : "f32", pp, 1 / med, 1 / dt[0], bytes / med / 1e9, bytes / 1e6);
    bn_model_free(m);
    return 0;
}
