/* The rotq C API from C: a paged cache (pages of 16 tokens) of Hadamard-rotated q4_0 keys and
 * q8_0 values, a prompt at its positions, one decode step checked against exact attention
 * computed here in double precision, a context shift, a removal, and an error message.
 *
 *   bash scripts/c-example.sh        (builds librotq_capi.a, compiles this file, runs it) */
#include "rotq.h"

#include <math.h>
#include <stdio.h>

#define H_KV 2
#define GROUP 4
#define H_Q (H_KV * GROUP)
#define D 64
#define N 10

static int check(enum RotqStatus status, const char *what) {
    if (status != ROTQ_STATUS_OK) {
        fprintf(stderr, "%s failed (%d): %s\n", what, (int)status, rotq_last_error());
        return 1;
    }
    return 0;
}

int main(void) {
    /* K, V formats, Hadamard on Q/K, no V rotation, seed, heads, head_dim, v_dim, capacity,
     * tokens per page (0: a contiguous cache). */
    struct RotqCacheSpec spec = {"q4_0", "q8_0", 1, 0, 0, H_KV, D, D, 64, 16};
    struct RotqCache *cache = NULL;
    if (check(rotq_cache_new(&spec, &cache), "rotq_cache_new")) return 1;

    static float k[N * H_KV * D], v[N * H_KV * D], q[H_Q * D], out[H_Q * D];
    for (int i = 0; i < N * H_KV * D; i++) {
        k[i] = sinf(0.37f * (float)i) + (i % D == 5 ? 6.0f : 0.0f); /* an outlier channel */
        v[i] = cosf(0.11f * (float)i);
    }
    for (int i = 0; i < H_Q * D; i++) q[i] = 0.3f * sinf(0.05f * (float)i + 1.0f);
    size_t positions[N];
    for (size_t t = 0; t < N; t++) positions[t] = t;
    if (check(rotq_cache_append_at(cache, k, v, N, positions), "rotq_cache_append_at")) return 1;

    /* Decode: the query at position N - 1 sees every token. */
    struct RotqAttentionParams params = {true, N - 1, 0, 0.0, 0.0};
    if (check(rotq_cache_attention(cache, q, 1, H_Q, &params, out, H_Q * D), "rotq_cache_attention"))
        return 1;

    /* Exact attention over the unquantized keys and values. */
    double err = 0.0, norm = 0.0;
    for (int h = 0; h < H_Q; h++) {
        int kv = h / GROUP;
        double s[N], mx = -1e300, sum = 0.0;
        for (int t = 0; t < N; t++) {
            double dot = 0.0;
            for (int j = 0; j < D; j++) dot += (double)q[h * D + j] * k[(t * H_KV + kv) * D + j];
            s[t] = dot / sqrt((double)D);
            if (s[t] > mx) mx = s[t];
        }
        for (int t = 0; t < N; t++) sum += (s[t] = exp(s[t] - mx));
        for (int j = 0; j < D; j++) {
            double o = 0.0;
            for (int t = 0; t < N; t++) o += s[t] / sum * v[(t * H_KV + kv) * D + j];
            err += (out[h * D + j] - o) * (out[h * D + j] - o);
            norm += o * o;
        }
    }
    double rel = sqrt(err / norm);
    printf("decode over %zu tokens: relative L2 error %.3e against exact attention\n",
           rotq_cache_len(cache), rel);
    /* q4_0 keys cost a few percent on this small problem (q8_0 keys: under 1%). */
    if (!(rel < 0.1)) {
        fprintf(stderr, "the error is too large\n");
        return 1;
    }

    /* Context shift: drop the two oldest tokens, move the rest down by two positions. */
    struct RotqRope rope = {1, 0, 0.0, 0.0};
    if (check(rotq_cache_remove(cache, 0, 2), "rotq_cache_remove")) return 1;
    if (check(rotq_cache_shift(cache, 0, rotq_cache_len(cache), -2, &rope), "rotq_cache_shift"))
        return 1;
    printf("after the context shift: %zu tokens\n", rotq_cache_len(cache));

    /* Errors come back as a status and a message. */
    struct RotqCacheSpec bad = spec;
    bad.k_format = "q3_k";
    struct RotqCache *other = NULL;
    enum RotqStatus status = rotq_cache_new(&bad, &other);
    printf("an unknown format: status %d, \"%s\"\n", (int)status, rotq_last_error());
    rotq_cache_free(cache);
    return status == ROTQ_STATUS_ERROR && other == NULL ? 0 : 1;
}
