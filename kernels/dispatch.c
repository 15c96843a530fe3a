/* Which kernel runs on which instruction set: CPU feature detection and one dispatch table.
 *
 * Every x86 (or ARM) build compiles every SIMD variant through target attributes, so the
 * distributed build needs no -march flags; the path is chosen here at run time. An ISA lists
 * only the kernels it has its own version of; every other slot is inherited from its fallback
 * ISA (FALLBACK below), which is how e.g. AVX-512 runs the AVX2 head, glue and attention.
 */
#include <pthread.h>

#include "internal.h"

#if BN_X86
#include <cpuid.h> /* AVX-VNNI's and AMX's feature bits, which __builtin_cpu_supports may not know */
#endif

#if BN_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

/* AMX-INT8: the CPU has the tiles (CPUID.7.0:EDX bits 24, 25) and GFNI (ECX bit 8: the GEMM
 * unpacks its codes with it; every AMX CPU has it, but the path checks what it uses), and Linux lets this process use
 * them: their 8 KB of state is off until the process asks (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA), and a refusal leaves the VNNI path. Asked once per process. */
static int amx_ok;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static void amx_request(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25)) || !(c & (1u << 8)))
        return;
    amx_ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
int bn_amx_permitted(void) {
    pthread_once(&amx_once, amx_request);
    return amx_ok;
}
#else
int bn_amx_permitted(void) { return 0; }
#endif

#if BN_ARM64
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

int bn_isa_available(int isa) {
    switch (isa) {
    case BN_ISA_SCALAR: return 1;
#if BN_X86
    case BN_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case BN_ISA_AVX512:
        __builtin_cpu_init();
        return bn_isa_available(BN_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    case BN_ISA_AVX512VNNI:
        __builtin_cpu_init();
        return bn_isa_available(BN_ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
    case BN_ISA_AMX: return bn_isa_available(BN_ISA_AVX512VNNI) && bn_amx_permitted();
#if defined(BN_EMULATE_AVXVNNI)
    case BN_ISA_AVXVNNI: return bn_isa_available(BN_ISA_AVX2); /* the instruction emulated (internal.h) */
#elif BN_HAVE_AVXVNNI
    case BN_ISA_AVXVNNI: { /* CPUID.(EAX=7, ECX=1):EAX bit 4 */
        unsigned a, b, c, d;
        return bn_isa_available(BN_ISA_AVX2) && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
    }
#endif
#endif
#if BN_ARM64
    case BN_ISA_NEON: return 1;
    case BN_ISA_NEONDOT: return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
    case BN_ISA_TUNED: return 1;
    default: return 0;
    }
}

int bn_isa_best(void) {
    static const int order[] = {BN_ISA_AMX,     BN_ISA_AVX512VNNI, BN_ISA_AVX512, BN_ISA_AVXVNNI,
                                BN_ISA_AVX2,    BN_ISA_NEONDOT,    BN_ISA_NEON};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (bn_isa_available(order[i])) return order[i];
    return BN_ISA_SCALAR;
}

/* The ISA whose kernels fill the slots an ISA leaves empty; each one is a subset of its own
 * instructions, so its kernels run wherever the ISA does. The scalar entry is complete. */
static const int FALLBACK[BN_ISA_COUNT] = {
    [BN_ISA_SCALAR] = BN_ISA_SCALAR, [BN_ISA_AVX2] = BN_ISA_SCALAR, [BN_ISA_AVX512] = BN_ISA_AVX2,
    [BN_ISA_AVX512VNNI] = BN_ISA_AVX512, [BN_ISA_AMX] = BN_ISA_AVX512VNNI, [BN_ISA_NEON] = BN_ISA_SCALAR, [BN_ISA_NEONDOT] = BN_ISA_NEON,
    [BN_ISA_AVXVNNI] = BN_ISA_AVX2,
};

static const bn_kernels OWN[BN_ISA_COUNT] = {
    [BN_ISA_SCALAR] = {{[BN_LAYOUT_I2] = bn_i2_rows_scalar, [BN_LAYOUT_TQ1] = bn_tq1_rows_scalar}, bn_quantize_rows_scalar, bn_glue_rows_scalar, bn_attend_scalar,
                       {[BN_EMB_F16] = bn_head_rows_f16_scalar, [BN_EMB_I8] = bn_head_rows_i8_scalar,
                        [BN_EMB_Q4] = bn_head_rows_q4_scalar, [BN_EMB_Q6] = bn_head_rows_q6_scalar}, bn_to_f16_scalar},
#if BN_X86
    [BN_ISA_AVX2] = {{[BN_LAYOUT_I2] = bn_i2_rows_avx2, [BN_LAYOUT_TQ1] = bn_tq1_rows_avx2}, bn_quantize_rows_avx2, bn_glue_rows_avx2, bn_attend_avx2,
                     {[BN_EMB_F16] = bn_head_rows_f16_avx2, [BN_EMB_I8] = bn_head_rows_i8_avx2,
                      [BN_EMB_Q4] = bn_head_rows_q4_avx2, [BN_EMB_Q6] = bn_head_rows_q6_avx2}, bn_to_f16_avx2},
    /* the glue is small: the AVX2 version already saturates it; so does the head for one token,
     * except q6, whose decoding costs more instructions per byte. Attention is bound by its
     * arithmetic as much as by its reads (a 16-row step: benchmarks/SERVE_PERF.md, session 15): 512 bits */
    [BN_ISA_AVX512] = {.ternary = {[BN_LAYOUT_I2] = bn_i2_rows_avx512, [BN_LAYOUT_TQ1] = bn_tq1_rows_avx512},
                       .attend = bn_attend_avx512, .head = {[BN_EMB_Q6] = bn_head_rows_q6_avx512}},
    /* with several tokens (batched decode) the int8 and q6 heads are bound by their multiplies,
     * which vpdpbusd does four to an int32 lane */
    [BN_ISA_AVX512VNNI] = {.ternary = {[BN_LAYOUT_I2] = bn_i2_rows_avx512vnni, [BN_LAYOUT_TQ1] = bn_tq1_rows_avx512vnni},
                           .head = {[BN_EMB_I8] = bn_head_rows_i8_avx512vnni, [BN_EMB_Q6] = bn_head_rows_q6_avx512vnni}},
    /* AMX runs the i2 GEMM (and VNNI's tile below BN_AMX_MIN_TOKENS tokens; tq1 stays VNNI's) and
     * the int8 head with several tokens, the q6 head from 7 (head.c: Q6_AMX_MIN_TOKENS) */
    [BN_ISA_AMX] = {.ternary = {[BN_LAYOUT_I2] = bn_i2_rows_amx}, .head = {[BN_EMB_I8] = bn_head_rows_i8_amx, [BN_EMB_Q6] = bn_head_rows_q6_amx}},
#if BN_HAVE_AVXVNNI
    /* the i2 GEMV and GEMM and the int8 head with several tokens; tq1 and the other heads are AVX2's */
    [BN_ISA_AVXVNNI] = {.ternary = {[BN_LAYOUT_I2] = bn_i2_rows_avxvnni}, .head = {[BN_EMB_I8] = bn_head_rows_i8_avxvnni}},
#endif
#endif
#if BN_ARM64
    [BN_ISA_NEON] = {.ternary = {[BN_LAYOUT_I2] = bn_i2_rows_neon, [BN_LAYOUT_TQ1] = bn_tq1_rows_neon},
                     .head = {[BN_EMB_F16] = bn_head_rows_f16_neon, [BN_EMB_I8] = bn_head_rows_i8_neon,
                              [BN_EMB_Q4] = bn_head_rows_q4_neon, [BN_EMB_Q6] = bn_head_rows_q6_neon},
                     .to_f16 = bn_to_f16_neon},
    [BN_ISA_NEONDOT] = {.ternary = {[BN_LAYOUT_I2] = bn_i2_rows_neondot, [BN_LAYOUT_TQ1] = bn_tq1_rows_neondot}},
#endif
};

static bn_kernels resolved[BN_ISA_COUNT];
static pthread_once_t resolved_once = PTHREAD_ONCE_INIT;

/* BN_ISA_TUNED (bitnet.h): its table is bn_isa_best()'s but for the ternary slots, which go
 * through these per-layout choices. They are read and written atomically, per call, since a
 * model's pool threads may be running while bn_isa_tune() changes one (any choice gives the same
 * bits). */
static bn_kernels tuned;
static bn_i2_rows_fn tuned_gemv[BN_LAYOUT_COUNT], tuned_gemm[BN_LAYOUT_COUNT];

static inline void tuned_rows(int layout, const bn_i2_job *j, int r0, int r1) {
    bn_i2_rows_fn fn = __atomic_load_n(j->m == 1 ? &tuned_gemv[layout] : &tuned_gemm[layout], __ATOMIC_RELAXED);
    fn(j, r0, r1);
}
static void tuned_i2(const bn_i2_job *j, int r0, int r1) { tuned_rows(BN_LAYOUT_I2, j, r0, r1); }
static void tuned_tq1(const bn_i2_job *j, int r0, int r1) { tuned_rows(BN_LAYOUT_TQ1, j, r0, r1); }
static const bn_i2_rows_fn TUNED_ROWS[BN_LAYOUT_COUNT] = {[BN_LAYOUT_I2] = tuned_i2, [BN_LAYOUT_TQ1] = tuned_tq1};

/* Each ISA's row of the table with every empty slot taken from its fallback chain; then the
 * tuned table, on the best ISA's kernels until bn_isa_tune() says otherwise. */
static void resolve(void) {
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        bn_kernels k = OWN[isa];
#define INHERIT(slot) for (int f = isa; !k.slot; f = FALLBACK[f]) k.slot = OWN[f].slot;
        for (int l = 0; l < BN_LAYOUT_COUNT; l++) INHERIT(ternary[l])
        INHERIT(quantize)
        INHERIT(glue)
        INHERIT(attend)
        INHERIT(to_f16)
        for (int t = 0; t < BN_EMB_COUNT; t++) INHERIT(head[t])
#undef INHERIT
        resolved[isa] = k;
    }
    const bn_kernels *best = &resolved[bn_isa_best()];
    tuned = *best;
    for (int l = 0; l < BN_LAYOUT_COUNT; l++) {
        tuned.ternary[l] = TUNED_ROWS[l];
        __atomic_store_n(&tuned_gemv[l], best->ternary[l], __ATOMIC_RELAXED);
        __atomic_store_n(&tuned_gemm[l], best->ternary[l], __ATOMIC_RELAXED);
    }
}

int bn_isa_tune(int layout, int gemv_isa, int gemm_isa) {
    if (layout < 0 || layout >= BN_LAYOUT_COUNT || gemv_isa < 0 || gemv_isa >= BN_ISA_COUNT || gemm_isa < 0 ||
        gemm_isa >= BN_ISA_COUNT || !bn_isa_available(gemv_isa) || !bn_isa_available(gemm_isa))
        return -1;
    pthread_once(&resolved_once, resolve);
    __atomic_store_n(&tuned_gemv[layout], resolved[gemv_isa].ternary[layout], __ATOMIC_RELAXED);
    __atomic_store_n(&tuned_gemm[layout], resolved[gemm_isa].ternary[layout], __ATOMIC_RELAXED);
    return 0;
}

const bn_kernels *bn_kernels_for(int isa) {
    if (isa == BN_ISA_TUNED) {
        pthread_once(&resolved_once, resolve);
        return &tuned;
    }
    if (isa < 0 || isa >= BN_ISA_COUNT || !bn_isa_available(isa)) return NULL;
    pthread_once(&resolved_once, resolve);
    return &resolved[isa];
}
