/* A persistent thread pool: threads are created once per model and reused for every parallel
 * section (a decode step runs ~5 sections per layer).
 *
 * A section is cut into chunks that threads claim one at a time, the caller included. A claim is
 * a compare-and-swap on one 64-bit ticket holding (generation, next chunk, chunk count), so a
 * worker that wakes late, or was descheduled on a busy machine, finds nothing left to claim and
 * never holds the section up, and a claim can never land in a section other than the one it read.
 * The caller returns once every chunk is done. Between sections workers spin briefly (the next
 * section usually follows within microseconds), then sleep on a condition variable. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

#if BN_X86
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif BN_ARM64
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define SPIN_ROUNDS 200000 /* a worker's wait for the next section before it sleeps (a few ms) */
#define JOIN_SPINS 10000   /* the caller's wait for chunks in flight before it yields its core */
#define MAX_THREADS 256

/* ticket bits: generation 63..40 | next chunk 39..20 | chunk count 19..0 */
#define TICKET_GEN(t) ((t) >> 40)
#define TICKET_NEXT(t) (((t) >> 20) & 0xfffff)
#define TICKET_TOTAL(t) ((t)&0xfffff)
#define GEN_MASK 0xffffffu

typedef struct {
    bn_pool *pool;
    int ith;
} worker_arg;

struct bn_pool {
    int n;
    pthread_t threads[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    _Atomic uint64_t ticket;
    atomic_int done;        /* chunks finished in the current section */
    atomic_uint generation; /* bumped once per section: wakes the workers */
    unsigned last_generation;
    atomic_int stop;
    bn_task_fn fn; /* stable while any chunk of the section is claimed */
    void *ctx;
    pthread_mutex_t mu;
    pthread_cond_t wake;
};

/* Claim and run chunks of section `gen` until none is left. */
static void work(bn_pool *pool, unsigned gen, int ith) {
    for (;;) {
        uint64_t t = atomic_load_explicit(&pool->ticket, memory_order_acquire);
        if (TICKET_GEN(t) != (gen & GEN_MASK) || TICKET_NEXT(t) >= TICKET_TOTAL(t)) return;
        if (!atomic_compare_exchange_weak_explicit(&pool->ticket, &t, t + (1u << 20), memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        /* the claim succeeded, so the caller is still waiting for this chunk: fn and ctx are its */
        pool->fn(pool->ctx, (int)TICKET_NEXT(t), (int)TICKET_TOTAL(t), ith);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
    }
}

static void *worker_main(void *p) {
    worker_arg *a = p;
    bn_pool *pool = a->pool;
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen &&
               spins++ < SPIN_ROUNDS && !atomic_load(&pool->stop))
            CPU_RELAX();
        if (g == seen) {
            pthread_mutex_lock(&pool->mu);
            while ((g = atomic_load(&pool->generation)) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->wake, &pool->mu);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop)) return NULL;
        seen = g;
        work(pool, g, a->ith);
    }
}

bn_pool *bn_pool_new(int n_threads) {
    if (n_threads < 1 || n_threads > MAX_THREADS) return NULL;
    bn_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    for (int i = 1; i < n_threads; i++) {
        pool->args[i] = (worker_arg){pool, i};
        if (pthread_create(&pool->threads[i], NULL, worker_main, &pool->args[i]) != 0) {
            pool->n = i; /* free only what started */
            bn_pool_free(pool);
            return NULL;
        }
    }
    return pool;
}

void bn_pool_free(bn_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    free(pool);
}

int bn_pool_size(const bn_pool *pool) { return pool ? pool->n : 1; }

int bn_pool_chunks(const bn_pool *pool, int items, int min_items) {
    int by_size = (items + min_items - 1) / (min_items > 0 ? min_items : 1);
    int by_threads = 4 * bn_pool_size(pool); /* a few per thread: late threads get less */
    int n = by_size < by_threads ? by_size : by_threads;
    return n < 1 ? 1 : n;
}

void bn_pool_run(bn_pool *pool, bn_task_fn fn, void *ctx, int n_chunks) {
    if (n_chunks < 1) return;
    if (n_chunks > 0xfffff) n_chunks = 0xfffff;
    if (!pool || pool->n == 1) {
        for (int c = 0; c < n_chunks; c++) fn(ctx, c, n_chunks, 0);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    unsigned gen = ++pool->last_generation;
    atomic_store_explicit(&pool->ticket, ((uint64_t)(gen & GEN_MASK) << 40) | (uint64_t)n_chunks,
                          memory_order_release);
    atomic_store_explicit(&pool->generation, gen, memory_order_release);
    /* sleeping workers check the generation under the mutex, so this wake-up cannot be lost */
    pthread_mutex_lock(&pool->mu);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    work(pool, gen, 0);
    int spins = 0;
    while (atomic_load_explicit(&pool->done, memory_order_acquire) < n_chunks) {
        if (++spins < JOIN_SPINS)
            CPU_RELAX();
        else
            sched_yield(); /* a worker holding a chunk may be waiting for this core */
    }
}
