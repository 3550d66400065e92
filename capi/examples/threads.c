/* The rotq C API from 8 threads at once (POSIX threads), each result checked against exact
 * attention computed here in double precision. Keys and values are stored as f32 (lossless)
 * and Q and K are Hadamard-rotated (attention is invariant to it), so the cache's attention is
 * exact up to f32 rounding.
 *
 * 1. One cache handle shared by the 8 threads: each appends its own tokens, 2 at a time, and
 *    after each append runs attention of its own query. Which tokens the cache holds at that
 *    moment depends on the other threads, but the output is a weighted mean of the values
 *    held, so each output value must lie within that V column's range over every token
 *    appended. Once all threads have appended (a barrier), the cache holds every token, in the
 *    order the appends took turns; attention without a mask does not depend on the order of
 *    the keys, so each thread's attention, run at the same time as the others', must equal
 *    exact attention over all the tokens.
 * 2. Separate handles made at once on one backend handle: each thread appends its tokens to
 *    its own cache and checks every attention exactly against the tokens it appended.
 *
 *   bash scripts/c-example.sh        (builds librotq_capi.a, compiles this file, runs it) */
#define _POSIX_C_SOURCE 200809L
#include "rotq.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define THREADS 8
#define ROUNDS 100
#define CHUNK 2                      /* tokens per append */
#define PER_THREAD (ROUNDS * CHUNK)  /* tokens each thread appends */
#define H_KV 2
#define GROUP 2
#define H_Q (H_KV * GROUP)
#define D 64
#define TOKEN (H_KV * D)             /* floats per token */

/* Tolerances of f32 attention against the exact one (the oracle's, for values in [-1, 1)). */
#define MAX_ABS 1e-4
#define REL_L2 1e-5

static float k_rows[THREADS][PER_THREAD * TOKEN], v_rows[THREADS][PER_THREAD * TOKEN];
static float queries[THREADS][H_Q * D];
static float v_lo[H_KV][D], v_hi[H_KV][D]; /* each V column's range over every token */

static struct RotqCache *shared_cache;
static struct RotqBackend *backend;
static pthread_barrier_t appended;

/* Values in [-1, 1) from a seed (splitmix64). */
static void fill(float *x, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) {
        uint64_t z = (seed += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        x[i] = (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
}

/* Exact attention of query `q` over the first `n` tokens of each of `n_sets` sets of rows,
 * compared with `out`: 0 if within the tolerances, else 1 and a message. */
static int check_exact(const char *what, int thread, const float *q, const float *out,
                       int n_sets, const float (*k)[PER_THREAD * TOKEN],
                       const float (*v)[PER_THREAD * TOKEN], int n) {
    double s[THREADS * PER_THREAD];
    double err = 0.0, norm = 0.0, max_abs = 0.0;
    for (int h = 0; h < H_Q; h++) {
        int kv = h / GROUP;
        double mx = -INFINITY, sum = 0.0;
        for (int set = 0; set < n_sets; set++)
            for (int t = 0; t < n; t++) {
                double dot = 0.0;
                for (int j = 0; j < D; j++)
                    dot += (double)q[h * D + j] * k[set][(t * H_KV + kv) * D + j];
                double score = dot / sqrt((double)D);
                s[set * n + t] = score;
                if (score > mx) mx = score;
            }
        for (int i = 0; i < n_sets * n; i++) sum += (s[i] = exp(s[i] - mx));
        for (int j = 0; j < D; j++) {
            double o = 0.0;
            for (int set = 0; set < n_sets; set++)
                for (int t = 0; t < n; t++) o += s[set * n + t] * v[set][(t * H_KV + kv) * D + j];
            o /= sum;
            double e = fabs(out[h * D + j] - o);
            if (e > max_abs) max_abs = e;
            err += e * e;
            norm += o * o;
        }
    }
    double rel = sqrt(err / norm);
    if (!(max_abs <= MAX_ABS && rel <= REL_L2)) {
        fprintf(stderr, "%s, thread %d: max abs error %.3e, relative L2 %.3e\n", what, thread,
                max_abs, rel);
        return 1;
    }
    return 0;
}

static int attend(struct RotqCache *cache, int thread, float *out) {
    struct RotqAttentionParams params = {false, 0, 0, 0.0, 0.0};
    enum RotqStatus status =
        rotq_cache_attention(cache, queries[thread], 1, H_Q, &params, out, H_Q * D);
    if (status != ROTQ_STATUS_OK) {
        fprintf(stderr, "thread %d: attention failed (%d): %s\n", thread, (int)status,
                rotq_last_error());
        return 1;
    }
    return 0;
}

static int append(struct RotqCache *cache, int thread, int round) {
    const float *k = k_rows[thread] + round * CHUNK * TOKEN;
    const float *v = v_rows[thread] + round * CHUNK * TOKEN;
    enum RotqStatus status = rotq_cache_append(cache, k, v, CHUNK);
    if (status != ROTQ_STATUS_OK) {
        fprintf(stderr, "thread %d: append failed (%d): %s\n", thread, (int)status,
                rotq_last_error());
        return 1;
    }
    return 0;
}

/* Part 1: one shared handle. Returns the number of failed checks. */
static void *on_one_handle(void *arg) {
    int thread = (int)(intptr_t)arg, failed = 0;
    float out[H_Q * D];
    size_t seen = 0;
    for (int round = 0; round < ROUNDS && !failed; round++) {
        failed += append(shared_cache, thread, round);
        size_t len = rotq_cache_len(shared_cache);
        if (len <= seen || len % CHUNK != 0 || len > THREADS * PER_THREAD) {
            fprintf(stderr, "thread %d: %zu tokens after %zu\n", thread, len, seen);
            failed++;
        }
        seen = len;
        failed += attend(shared_cache, thread, out);
        for (int i = 0; i < H_Q * D && !failed; i++) {
            int kv = i / D / GROUP, j = i % D;
            if (!(out[i] >= v_lo[kv][j] - 1e-5f && out[i] <= v_hi[kv][j] + 1e-5f)) {
                fprintf(stderr, "thread %d: output %d = %g outside [%g, %g]\n", thread, i,
                        out[i], v_lo[kv][j], v_hi[kv][j]);
                failed++;
            }
        }
    }
    pthread_barrier_wait(&appended); /* every thread gets here, failed or not */
    if (rotq_cache_len(shared_cache) != THREADS * PER_THREAD) {
        fprintf(stderr, "thread %d: %zu tokens held\n", thread, rotq_cache_len(shared_cache));
        failed++;
    }
    if (!attend(shared_cache, thread, out))
        failed += check_exact("one handle", thread, queries[thread], out, THREADS,
                              (const float(*)[PER_THREAD * TOKEN])k_rows,
                              (const float(*)[PER_THREAD * TOKEN])v_rows, PER_THREAD);
    else
        failed++;
    return (void *)(intptr_t)failed;
}

static struct RotqCacheSpec spec(size_t capacity, size_t page_tokens) {
    /* f32 keys and values, Hadamard on Q and K, no V rotation. */
    struct RotqCacheSpec s = {"f32", "f32", 1, 0, 0, H_KV, D, D, capacity, page_tokens};
    return s;
}

/* Part 2: a handle per thread, made on the shared backend handle. */
static void *on_own_handle(void *arg) {
    int thread = (int)(intptr_t)arg, failed = 0;
    struct RotqCacheSpec s = spec(PER_THREAD, thread % 2 ? 16 : 0);
    struct RotqCache *cache = NULL;
    if (rotq_cache_new_on(&s, backend, &cache) != ROTQ_STATUS_OK) {
        fprintf(stderr, "thread %d: rotq_cache_new_on: %s\n", thread, rotq_last_error());
        return (void *)(intptr_t)1;
    }
    float out[H_Q * D];
    for (int round = 0; round < ROUNDS && !failed; round++) {
        failed += append(cache, thread, round);
        failed += attend(cache, thread, out);
        if (!failed)
            failed += check_exact("own handle", thread, queries[thread], out, 1,
                                  (const float(*)[PER_THREAD * TOKEN]) & k_rows[thread],
                                  (const float(*)[PER_THREAD * TOKEN]) & v_rows[thread],
                                  (round + 1) * CHUNK);
    }
    rotq_cache_free(cache);
    return (void *)(intptr_t)failed;
}

static int run(void *(*body)(void *), const char *what) {
    pthread_t threads[THREADS];
    int failed = 0;
    for (int t = 0; t < THREADS; t++)
        if (pthread_create(&threads[t], NULL, body, (void *)(intptr_t)t) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(1);
        }
    for (int t = 0; t < THREADS; t++) {
        void *result;
        pthread_join(threads[t], &result);
        failed += (int)(intptr_t)result;
    }
    printf("%s: %d threads, %d failed checks\n", what, THREADS, failed);
    return failed;
}

int main(void) {
    for (int t = 0; t < THREADS; t++) {
        fill(k_rows[t], PER_THREAD * TOKEN, 1000 + 2 * (uint64_t)t);
        fill(v_rows[t], PER_THREAD * TOKEN, 1001 + 2 * (uint64_t)t);
        fill(queries[t], H_Q * D, 5000 + (uint64_t)t);
    }
    for (int kv = 0; kv < H_KV; kv++)
        for (int j = 0; j < D; j++) {
            v_lo[kv][j] = INFINITY;
            v_hi[kv][j] = -INFINITY;
            for (int t = 0; t < THREADS; t++)
                for (int i = 0; i < PER_THREAD; i++) {
                    float x = v_rows[t][(i * H_KV + kv) * D + j];
                    if (x < v_lo[kv][j]) v_lo[kv][j] = x;
                    if (x > v_hi[kv][j]) v_hi[kv][j] = x;
                }
        }

    struct RotqCacheSpec s = spec(THREADS * PER_THREAD, 16);
    if (rotq_cache_new(&s, &shared_cache) != ROTQ_STATUS_OK) {
        fprintf(stderr, "rotq_cache_new: %s\n", rotq_last_error());
        return 1;
    }
    pthread_barrier_init(&appended, NULL, THREADS);
    int failed = run(on_one_handle, "one cache handle");
    pthread_barrier_destroy(&appended);
    rotq_cache_free(shared_cache);

    if (rotq_backend_open("cpu", &backend) != ROTQ_STATUS_OK) {
        fprintf(stderr, "rotq_backend_open: %s\n", rotq_last_error());
        return 1;
    }
    failed += run(on_own_handle, "a cache handle per thread, one backend handle");
    rotq_backend_free(backend);
    return failed ? 1 : 0;
}
