/* A persistent thread pool: threads are created once per model and reused for every parallel
 * section (a decode step runs ~5 sections per layer). Between sections workers spin briefly on a
 * generation counter, since the next section usually follows within microseconds, then sleep on
 * a condition variable so an idle model costs no CPU. */
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
#define JOIN_SPINS 10000   /* the caller's wait for the workers before it yields its core */
#define MAX_THREADS 256

typedef struct {
    bn_pool *pool;
    int ith;
} worker_arg;

struct bn_pool {
    int n;
    pthread_t threads[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    atomic_uint generation; /* bumped once per parallel section */
    atomic_int pending;     /* workers (not counting the caller) still running the section */
    atomic_int stop;
    bn_task_fn fn;
    void *ctx;
    pthread_mutex_t mu;
    pthread_cond_t wake;
};

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
        pool->fn(pool->ctx, a->ith, pool->n);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
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

void bn_pool_run(bn_pool *pool, bn_task_fn fn, void *ctx) {
    if (!pool || pool->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    /* sleeping workers check the generation under the mutex, so this wake-up cannot be lost */
    pthread_mutex_lock(&pool->mu);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    fn(ctx, 0, pool->n);
    int spins = 0;
    while (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) {
        if (++spins < JOIN_SPINS)
            CPU_RELAX();
        else
            sched_yield(); /* a worker may be waiting for this core (more threads than free cores) */
    }
}
