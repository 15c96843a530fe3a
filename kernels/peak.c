/* The integer multiply-accumulate peak of one thread per ISA: the yardstick `bitnet bench` holds
 * the ternary kernels against ("% of peak"), measured rather than derived from a clock, since
 * turbo, AVX-512 licences and SMT siblings make any assumed clock wrong.
 *
 * Each ISA runs its cheapest 8-bit multiply-accumulate sequence (the one its ternary kernels are
 * built from, bitnet.h's BN_ISA_* comments) in enough independent chains to hide its latency:
 *   scalar      imul + add on general registers (1 MAC each)
 *   avx2        vpmaddubsw + vpaddw, 256-bit (32 MACs a pair; the least an exact u8 x s8 dot needs)
 *   avx512      vpmaddubsw + vpaddw, 512-bit (64)
 *   avx512vnni  vpdpbusd (64 MACs in one instruction)
 *   amx         tdpbusd on 16 x 64-byte tiles (16 * 16 * 64 = 16384 MACs), four C tiles in turn
 *   neon        smlal / smlal2 into int16 (8 each)
 *   neondot     sdot (16)
 * The products are never used for anything but a sink, so an operand passes through an empty asm
 * statement before every multiply: the compiler must then assume it changed, and can neither hoist
 * the multiplies out of the loop nor merge the chains (which compute the same values) into one. The asm emits
 * no instruction, so the hardware sees only the multiplies and adds.
 */
#include <string.h>
#include <time.h>

#include "internal.h"

#if BN_X86
#include <immintrin.h>
#endif
#if BN_ARM64
#include <arm_neon.h>
#endif

static volatile int64_t sink; /* every chain ends here, so none is dead code */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}


/* Named accumulators, not an array: gcc keeps an array of vectors partly on the stack, and a store
 * a pass would be timed too. EIGHT(S) runs S(0) .. S(7). */
#define EIGHT(S) S(0) S(1) S(2) S(3) S(4) S(5) S(6) S(7)

/* imul's throughput is one a cycle, its latency 3; the adds are the loop-carried chain. The
 * operand passes through a general register, so the loop is not vectorised either. */
static int64_t peak_scalar(long iters) {
    int32_t a = 3, b = 5;
#define DECL(k) int32_t a##k = 0;
#define STEP(k) __asm__ volatile("" : "+r"(a), "+r"(b)); a##k += a * b;
#define SUM(k) s += a##k;
    EIGHT(DECL)
    for (long i = 0; i < iters; i++) { EIGHT(STEP) }
    int64_t s = 0;
    EIGHT(SUM)
    sink = s;
    return 8;
#undef DECL
#undef STEP
#undef SUM
}

#if BN_X86
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* The multiplies depend only on their operands, so the only loop-carried chain is vpaddw's
 * (latency 1): 8 chains keep two multiply ports busy and leave registers for the operands. */
AVX2_TARGET static int64_t peak_avx2(long iters) {
    __m256i c = _mm256_set1_epi8(2), x = _mm256_set1_epi8(-3);
#define DECL(k) __m256i a##k = _mm256_setzero_si256();
#define STEP(k) __asm__ volatile("" : "+x"(x)); a##k = _mm256_add_epi16(a##k, _mm256_maddubs_epi16(c, x));
#define SUM(k) s = _mm256_add_epi16(s, a##k);
    EIGHT(DECL)
    for (long i = 0; i < iters; i++) { EIGHT(STEP) }
    __m256i s = _mm256_setzero_si256();
    EIGHT(SUM)
    sink = _mm256_extract_epi16(s, 0);
    return 8 * 32;
#undef DECL
#undef STEP
#undef SUM
}

AVX512_TARGET static int64_t peak_avx512(long iters) {
    __m512i c = _mm512_set1_epi8(2), x = _mm512_set1_epi8(-3);
#define DECL(k) __m512i a##k = _mm512_setzero_si512();
#define STEP(k) __asm__ volatile("" : "+v"(x)); a##k = _mm512_add_epi16(a##k, _mm512_maddubs_epi16(c, x));
#define SUM(k) s = _mm512_add_epi16(s, a##k);
    EIGHT(DECL)
    for (long i = 0; i < iters; i++) { EIGHT(STEP) }
    __m512i s = _mm512_setzero_si512();
    EIGHT(SUM)
    sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(s)); /* one lane: a reduce would overflow int (UB) */
    return 8 * 64;
#undef DECL
#undef STEP
#undef SUM
}

#if BN_HAVE_AVXVNNI
/* vpdpbusd on 256 bits (AVX-VNNI): as peak_avx512vnni below, 16 chains */
AVXVNNI_TARGET static int64_t peak_avxvnni(long iters) {
    __m256i c = _mm256_set1_epi8(2), x = _mm256_set1_epi8(-3);
#define DECL(k) __m256i a##k = _mm256_setzero_si256(), b##k = _mm256_setzero_si256();
#define STEP(k)                                                                                   \
    __asm__ volatile("" : "+x"(x));                                                               \
    a##k = bn_dpbusd_avxvnni(a##k, c, x);                                                         \
    __asm__ volatile("" : "+x"(x));                                                               \
    b##k = bn_dpbusd_avxvnni(b##k, c, x);
#define SUM(k) s = _mm256_add_epi32(s, _mm256_add_epi32(a##k, b##k));
    EIGHT(DECL)
    for (long i = 0; i < iters; i++) { EIGHT(STEP) }
    __m256i s = _mm256_setzero_si256();
    EIGHT(SUM)
    sink = _mm256_extract_epi32(s, 0);
    return 16 * 32;
#undef DECL
#undef STEP
#undef SUM
}
#endif

/* vpdpbusd accumulates in place, so its latency (4-5 cycles) is the chain: 16 chains cover two
 * a cycle */
AVX512VNNI_TARGET static int64_t peak_avx512vnni(long iters) {
    __m512i c = _mm512_set1_epi8(2), x = _mm512_set1_epi8(-3);
#define DECL(k) __m512i a##k = _mm512_setzero_si512(), b##k = _mm512_setzero_si512();
#define STEP(k)                                                                                   \
    __asm__ volatile("" : "+v"(x));                                                               \
    a##k = _mm512_dpbusd_epi32(a##k, c, x);                                                       \
    __asm__ volatile("" : "+v"(x));                                                               \
    b##k = _mm512_dpbusd_epi32(b##k, c, x);
#define SUM(k) s = _mm512_add_epi32(s, _mm512_add_epi32(a##k, b##k));
    EIGHT(DECL)
    for (long i = 0; i < iters; i++) { EIGHT(STEP) }
    __m512i s = _mm512_setzero_si512();
    EIGHT(SUM)
    sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(s)); /* one lane: a reduce would overflow int (UB) */
    return 16 * 64;
#undef DECL
#undef STEP
#undef SUM
}
#endif

#if BN_X86
/* tdpbusd into four C tiles from two A and two B tiles (what the GEMM's 2 x 2 block issues, without
 * its loads): the tiles are registers the asm cannot name, so the chains need no sink but C's */
AMX_TARGET static int64_t peak_amx(long iters) {
    static int8_t ones[1024] __attribute__((aligned(64)));
    int32_t out[256] __attribute__((aligned(64)));
    memset(ones, 1, sizeof ones);
    bn_amx_configure();
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long i = 0; i < iters; i++) {
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    int64_t s = 0;
    _tile_stored(0, out, 64);
    s += out[0];
    _tile_stored(3, out, 64);
    s += out[255];
    _tile_release();
    sink = s;
    return 4 * 16 * 16 * 64;
}
#endif

#if BN_ARM64
/* smlal and sdot accumulate in place (latency 3-4 cycles, two pipes): 8 chains of smlal (two per
 * 16-byte operand, one for each half) and 16 of sdot */
static int64_t peak_neon(long iters) {
    const int8x16_t c = vdupq_n_s8(2);
    int8x16_t x = vdupq_n_s8(-3);
#define DECL(k) int16x8_t a##k = vdupq_n_s16(0);
#define STEP(k) __asm__ volatile("" : "+w"(x)); \
    a##k = (k) % 2 ? vmlal_high_s8(a##k, c, x) : vmlal_s8(a##k, vget_low_s8(c), vget_low_s8(x));
#define SUM(k) s = vaddq_s16(s, a##k);
    EIGHT(DECL)
    for (long i = 0; i < iters; i++) { EIGHT(STEP) }
    int16x8_t s = vdupq_n_s16(0);
    EIGHT(SUM)
    sink = vaddlvq_s16(s);
    return 8 * 8;
#undef DECL
#undef STEP
#undef SUM
}

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
static int64_t peak_neondot(long iters) {
    const int8x16_t c = vdupq_n_s8(2);
    int8x16_t x = vdupq_n_s8(-3);
#define DECL(k) int32x4_t a##k = vdupq_n_s32(0), b##k = vdupq_n_s32(0);
#define STEP(k)                                                                                   \
    __asm__ volatile("" : "+w"(x));                                                               \
    a##k = vdotq_s32(a##k, c, x);                                                                 \
    __asm__ volatile("" : "+w"(x));                                                               \
    b##k = vdotq_s32(b##k, c, x);
#define SUM(k) s = vaddq_s32(s, vaddq_s32(a##k, b##k));
    EIGHT(DECL)
    for (long i = 0; i < iters; i++) { EIGHT(STEP) }
    int32x4_t s = vdupq_n_s32(0);
    EIGHT(SUM)
    sink = vaddvq_s32(s);
    return 16 * 16;
#undef DECL
#undef STEP
#undef SUM
}
#pragma GCC pop_options
#endif

double bn_mac_peak(int isa, long iters) {
    if (iters < 1 || !bn_isa_available(isa)) return -1;
    int64_t (*fn)(long) = NULL;
    switch (isa) {
    case BN_ISA_SCALAR: fn = peak_scalar; break;
#if BN_X86
    case BN_ISA_AVX2: fn = peak_avx2; break;
    case BN_ISA_AVX512: fn = peak_avx512; break;
    case BN_ISA_AVX512VNNI: fn = peak_avx512vnni; break;
    case BN_ISA_AMX: fn = peak_amx; break;
#if BN_HAVE_AVXVNNI
    case BN_ISA_AVXVNNI: fn = peak_avxvnni; break;
#endif
#endif
#if BN_ARM64
    case BN_ISA_NEON: fn = peak_neon; break;
    case BN_ISA_NEONDOT: fn = peak_neondot; break;
#endif
    default: return -1;
    }
    double t0 = now();
    int64_t macs_per_iter = fn(iters);
    double dt = now() - t0;
    return dt > 0 ? (double)macs_per_iter * iters / dt : -1;
}
