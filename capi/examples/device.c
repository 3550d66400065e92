/* ABI 2.3's device calls from C: a server's step on the GPU, captured once in a CUDA graph and
 * replayed with other lengths, rows and queries, every replay checked against the host calls
 * on the same pool bytes; then a token per sequence appended on the device
 * (rotq_device_pool_append) and on the host, and the step replayed over both.
 *
 * The pools are filled on the host (rotq_pool_append, the CPU kernels: the bytes are the same
 * for both backends) and copied into cudaMalloc'd memory; queries, output, workspace, query
 * offsets, lengths and block table live on the device too. Needs the CUDA runtime:
 *
 *   cc -std=c11 -O2 capi/examples/device.c -I capi/include -I /usr/local/cuda/include \
 *      target/release/librotq_capi.a -L /usr/local/cuda/lib64 -lcudart -lpthread -ldl -lm \
 *      -o device && ./device
 *
 * Without a CUDA device it prints "skipped: no CUDA device" and exits 0. */
#include <cuda_runtime.h>
#include <math.h>
#include <rotq.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define H_KV 2
#define H_Q 8
#define D 128
#define PT 16
#define N_PAGES 32
#define N_SEQS 3
#define MAX_ROWS 4
#define MAX_LEN 128
#define MAX_BLOCKS (MAX_LEN / PT)

static int failed(const char *what, enum RotqStatus s) {
    if (s == ROTQ_STATUS_OK) return 0;
    fprintf(stderr, "%s: status %d: %s\n", what, (int)s, rotq_last_error());
    return 1;
}

static int cuda_failed(const char *what, cudaError_t e) {
    if (e == cudaSuccess) return 0;
    fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    return 1;
}

#define TRY(x)                        \
    do {                              \
        if (failed(#x, (x))) exit(1); \
    } while (0)
#define CUDA(x)                            \
    do {                                   \
        if (cuda_failed(#x, (x))) exit(1); \
    } while (0)

/* Deterministic test values in [-1, 1), never all zero. */
static float value(unsigned i, unsigned seed) {
    unsigned x = i * 2654435761u ^ seed * 40503u;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (float)(x % 20000u) / 10000.0f - 1.0f;
}

/* One step: each sequence's length and query rows; its pages are fixed (sequence b owns
 * pages b * MAX_BLOCKS ..). */
struct Step {
    unsigned lens[N_SEQS];
    unsigned rows[N_SEQS];
};

/* The host calls' output for the same step on the host pools (`loc`, `lens`, the block
 * table); returns its length in floats and the largest |gpu - host| and |host| in *err and
 * *scale. */
static size_t host_step(const struct RotqCodec *codec, const unsigned char *k_host, size_t kb,
                        const unsigned char *v_host, size_t vb, const unsigned *loc,
                        const unsigned *lens, const int *table, const float *q,
                        const float *gpu_out, float *want, double *err, double *scale) {
    struct RotqBatch hb = {.struct_size = sizeof hb,
                           .n_seqs = N_SEQS,
                           .query_start_loc = loc,
                           .h_q = H_Q,
                           .tables = ROTQ_TABLES_BLOCK,
                           .block_table = table,
                           .max_blocks = MAX_BLOCKS,
                           .seq_lens = lens,
                           .params = {.causal = true}};
    struct RotqPlan *hp = NULL;
    size_t ws_floats = 0, n_out = 0;
    TRY(rotq_plan_new(codec, &hb, k_host, kb, v_host, vb, &hp));
    TRY(rotq_plan_sizes(hp, &ws_floats, &n_out, NULL));
    float *ws = malloc((ws_floats ? ws_floats : 1) * sizeof(float));
    TRY(rotq_attention_run(codec, hp, &hb, k_host, kb, v_host, vb, q, ws, ws_floats, want, n_out,
                           NULL, 0));
    free(ws);
    rotq_plan_free(hp);
    *err = 0, *scale = 0;
    for (size_t i = 0; i < n_out; i++) {
        *err = fmax(*err, fabs((double)gpu_out[i] - want[i]));
        *scale = fmax(*scale, fabs((double)want[i]));
    }
    return n_out;
}

int main(void) {
    struct RotqBackend *gpu = NULL;
    if (rotq_backend_open("cuda:0", &gpu) != ROTQ_STATUS_OK) {
        printf("skipped: no CUDA device (%s)\n", rotq_last_error());
        return 0;
    }
    /* q8_0 keys and values rotated by the Hadamard transform; exact f32 queries on the host,
     * as the device's f32 kernel computes. */
    struct RotqRotation rot = {.struct_size = sizeof rot, .qk = ROTQ_QK_HADAMARD};
    struct RotqPoolSpec spec = {.struct_size = sizeof spec,
                                .k_format = "q8_0",
                                .v_format = "q8_0",
                                .rotation = &rot,
                                .n_kv_heads = H_KV,
                                .head_dim = D,
                                .v_dim = D,
                                .n_pages = N_PAGES,
                                .page_tokens = PT,
                                .query = "exact"};
    size_t kb = 0, vb = 0;
    struct RotqCodec *codec = NULL;
    TRY(rotq_pool_bytes(&spec, &kb, &vb));
    TRY(rotq_codec_new(&spec, &codec));

    /* Host pools: every sequence's MAX_LEN tokens appended through the slot mapping. */
    unsigned char *k_host = calloc(kb, 1), *v_host = calloc(vb, 1);
    size_t n_tok = N_SEQS * MAX_LEN, per_tok = H_KV * D;
    float *k_rows = malloc(n_tok * per_tok * sizeof(float));
    float *v_rows = malloc(n_tok * per_tok * sizeof(float));
    int64_t *slots = malloc(n_tok * sizeof(int64_t));
    for (size_t i = 0; i < n_tok * per_tok; i++) {
        k_rows[i] = value((unsigned)i, 1) * (i % 37 == 5 ? 20.0f : 1.0f);
        v_rows[i] = value((unsigned)i, 2);
    }
    for (size_t t = 0; t < n_tok; t++) slots[t] = (int64_t)t; /* page b*8 + t/16 */
    TRY(rotq_pool_append(codec, k_host, kb, v_host, vb, k_rows, v_rows, n_tok, slots));

    /* The same bytes on the device. */
    unsigned char *k_dev, *v_dev;
    CUDA(cudaMalloc((void **)&k_dev, kb));
    CUDA(cudaMalloc((void **)&v_dev, vb));
    CUDA(cudaMemcpy(k_dev, k_host, kb, cudaMemcpyHostToDevice));
    CUDA(cudaMemcpy(v_dev, v_host, vb, cudaMemcpyHostToDevice));

    /* The device plan: 3 sequences, up to 4 rows and 128 tokens, block tables, f32. */
    struct RotqDeviceShape shape = {.struct_size = sizeof shape,
                                    .n_seqs = N_SEQS,
                                    .max_rows = MAX_ROWS,
                                    .max_seq_len = MAX_LEN,
                                    .h_q = H_Q,
                                    .params = {.causal = true},
                                    .tables = ROTQ_TABLES_BLOCK,
                                    .max_blocks = MAX_BLOCKS,
                                    .checked = true,
                                    .elem = "f32"};
    struct RotqDevicePlan *plan = NULL;
    TRY(rotq_device_plan_new(gpu, codec, &shape, &plan));
    size_t ws_bytes = 0, q_elems = 0, out_elems = 0, lse_len = 0;
    TRY(rotq_device_plan_sizes(plan, &ws_bytes, &q_elems, &out_elems, &lse_len));

    float *q_dev, *out_dev, *lse_dev;
    void *ws_dev;
    unsigned *loc_dev, *lens_dev, *table_dev;
    CUDA(cudaMalloc((void **)&q_dev, q_elems * sizeof(float)));
    CUDA(cudaMalloc((void **)&out_dev, out_elems * sizeof(float)));
    CUDA(cudaMalloc((void **)&lse_dev, lse_len * sizeof(float)));
    CUDA(cudaMalloc(&ws_dev, ws_bytes));
    CUDA(cudaMalloc((void **)&loc_dev, (N_SEQS + 1) * sizeof(unsigned)));
    CUDA(cudaMalloc((void **)&lens_dev, N_SEQS * sizeof(unsigned)));
    CUDA(cudaMalloc((void **)&table_dev, N_SEQS * MAX_BLOCKS * sizeof(unsigned)));
    int table[N_SEQS * MAX_BLOCKS];
    for (int i = 0; i < N_SEQS * MAX_BLOCKS; i++) table[i] = i;
    CUDA(cudaMemcpy(table_dev, table, sizeof table, cudaMemcpyHostToDevice));
    struct RotqDeviceBatch batch = {.struct_size = sizeof batch,
                                    .query_start_loc = loc_dev,
                                    .seq_lens = lens_dev,
                                    .block_table = (const unsigned *)table_dev};

    cudaStream_t stream;
    CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    struct Step steps[3] = {
        {{100, 37, 128}, {1, 1, 1}}, /* decode */
        {{64, 9, 120}, {2, 1, 1}},   /* a chunk of 2 rows beside two decode rows */
        {{1, 50, 3}, {1, 0, 3}},     /* a sequence with no rows; 3 rows of a short one */
    };
    float *q = malloc(q_elems * sizeof(float));
    float *out = malloc(out_elems * sizeof(float));
    float *want = malloc(out_elems * sizeof(float));
    float *lse = malloc(lse_len * sizeof(float));
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    int bad = 0;
    for (int s = 0; s < 3; s++) {
        unsigned loc[N_SEQS + 1] = {0};
        for (int b = 0; b < N_SEQS; b++) loc[b + 1] = loc[b] + steps[s].rows[b];
        for (size_t i = 0; i < q_elems; i++) q[i] = value((unsigned)i, 10 + s);
        CUDA(cudaMemcpyAsync(loc_dev, loc, sizeof loc, cudaMemcpyHostToDevice, stream));
        CUDA(cudaMemcpyAsync(lens_dev, steps[s].lens, sizeof steps[s].lens,
                             cudaMemcpyHostToDevice, stream));
        CUDA(cudaMemcpyAsync(q_dev, q, q_elems * sizeof(float), cudaMemcpyHostToDevice, stream));
        if (s == 0) {
            /* Captured once: the run's three kernels and its memset. */
            CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            TRY(rotq_device_attention_run(plan, stream, q_dev, q_elems, k_dev, kb, v_dev, vb,
                                          &batch, ws_dev, ws_bytes, out_dev, out_elems, lse_dev,
                                          lse_len));
            CUDA(cudaStreamEndCapture(stream, &graph));
            CUDA(cudaGraphInstantiate(&exec, graph, 0));
        }
        CUDA(cudaGraphLaunch(exec, stream));
        CUDA(cudaMemcpyAsync(out, out_dev, out_elems * sizeof(float), cudaMemcpyDeviceToHost,
                             stream));
        CUDA(cudaMemcpyAsync(lse, lse_dev, lse_len * sizeof(float), cudaMemcpyDeviceToHost,
                             stream));
        TRY(rotq_device_plan_status(plan, stream, ws_dev, ws_bytes));

        /* The host calls on the host pools: the same step. */
        double err, scale;
        size_t n_out = host_step(codec, k_host, kb, v_host, vb, loc, steps[s].lens, table, q, out,
                                 want, &err, &scale);
        int padding_ok = 1;
        for (size_t i = n_out; i < out_elems; i++) padding_ok &= out[i] == 0.0f;
        for (size_t i = n_out / D; i < lse_len; i++) padding_ok &= isinf(lse[i]) && lse[i] < 0;
        int ok = err <= 1e-4 * scale && padding_ok;
        printf("replay %d: %u rows, max |gpu - host| = %.3g of max %.3g, padding %s: %s\n", s,
               loc[N_SEQS], err, scale, padding_ok ? "zeros" : "WRONG", ok ? "ok" : "FAILED");
        bad |= !ok;
    }

    /* Token 40 of every sequence rewritten on the device (rotq_device_pool_append, f32 rows,
     * one launch per pool) and on the host; the graph replayed over the new bytes. */
    struct RotqDeviceCodec *dcodec = NULL;
    TRY(rotq_device_codec_new(gpu, codec, &dcodec));
    size_t new_len = N_SEQS * per_tok;
    float *new_k = malloc(new_len * sizeof(float)), *new_v = malloc(new_len * sizeof(float));
    for (size_t i = 0; i < new_len; i++) {
        new_k[i] = value((unsigned)i, 77) * 3.0f;
        new_v[i] = value((unsigned)i, 78);
    }
    int64_t new_slots[N_SEQS];
    for (int b = 0; b < N_SEQS; b++) new_slots[b] = (int64_t)b * MAX_LEN + 40;
    float *k_new_dev, *v_new_dev;
    int64_t *slots_dev;
    unsigned *append_status;
    CUDA(cudaMalloc((void **)&k_new_dev, new_len * sizeof(float)));
    CUDA(cudaMalloc((void **)&v_new_dev, new_len * sizeof(float)));
    CUDA(cudaMalloc((void **)&slots_dev, sizeof new_slots));
    CUDA(cudaMalloc((void **)&append_status, sizeof(unsigned)));
    CUDA(cudaMemcpy(k_new_dev, new_k, new_len * sizeof(float), cudaMemcpyHostToDevice));
    CUDA(cudaMemcpy(v_new_dev, new_v, new_len * sizeof(float), cudaMemcpyHostToDevice));
    CUDA(cudaMemcpy(slots_dev, new_slots, sizeof new_slots, cudaMemcpyHostToDevice));
    CUDA(cudaMemset(append_status, 0, sizeof(unsigned)));
    TRY(rotq_device_pool_append(dcodec, stream, "f32", k_new_dev, v_new_dev, N_SEQS, slots_dev,
                                k_dev, kb, v_dev, vb, append_status));
    TRY(rotq_pool_append(codec, k_host, kb, v_host, vb, new_k, new_v, N_SEQS, new_slots));
    {
        unsigned loc[N_SEQS + 1] = {0, 1, 2, 3}, lens[N_SEQS] = {41, 41, 41}, st = 1;
        for (size_t i = 0; i < q_elems; i++) q[i] = value((unsigned)i, 99);
        CUDA(cudaMemcpyAsync(loc_dev, loc, sizeof loc, cudaMemcpyHostToDevice, stream));
        CUDA(cudaMemcpyAsync(lens_dev, lens, sizeof lens, cudaMemcpyHostToDevice, stream));
        CUDA(cudaMemcpyAsync(q_dev, q, q_elems * sizeof(float), cudaMemcpyHostToDevice, stream));
        CUDA(cudaGraphLaunch(exec, stream));
        CUDA(cudaMemcpyAsync(out, out_dev, out_elems * sizeof(float), cudaMemcpyDeviceToHost,
                             stream));
        CUDA(cudaMemcpyAsync(&st, append_status, sizeof st, cudaMemcpyDeviceToHost, stream));
        TRY(rotq_device_plan_status(plan, stream, ws_dev, ws_bytes));
        double err, scale;
        host_step(codec, k_host, kb, v_host, vb, loc, lens, table, q, out, want, &err, &scale);
        /* The two appends round the rotated rows separately (the GPU's FWHT and the CPU's):
         * a value may land one quantization step apart, hence 1e-2 here. */
        int ok = err <= 1e-2 * scale && st == 0;
        printf("device append: max |gpu - host| = %.3g of max %.3g, status %u: %s\n", err, scale,
               st, ok ? "ok" : "FAILED");
        bad |= !ok;
    }
    cudaFree(k_new_dev), cudaFree(v_new_dev), cudaFree(slots_dev), cudaFree(append_status);
    free(new_k), free(new_v);
    rotq_device_codec_free(dcodec);

    /* A table entry outside the pool: reported, nothing written out of place. */
    table[0] = N_PAGES;
    CUDA(cudaMemcpy(table_dev, table, sizeof table, cudaMemcpyHostToDevice));
    CUDA(cudaGraphLaunch(exec, stream));
    enum RotqStatus st = rotq_device_plan_status(plan, stream, ws_dev, ws_bytes);
    printf("a page outside the pool: status %d (%s)\n", (int)st, rotq_last_error());
    bad |= st != ROTQ_STATUS_ERROR || strstr(rotq_last_error(), "outside the pool") == NULL;

    CUDA(cudaGraphExecDestroy(exec));
    CUDA(cudaGraphDestroy(graph));
    CUDA(cudaStreamDestroy(stream));
    cudaFree(k_dev), cudaFree(v_dev), cudaFree(q_dev), cudaFree(out_dev), cudaFree(lse_dev);
    cudaFree(ws_dev), cudaFree(loc_dev), cudaFree(lens_dev), cudaFree(table_dev);
    rotq_device_plan_free(plan);
    rotq_codec_free(codec);
    rotq_backend_free(gpu);
    free(k_host), free(v_host), free(k_rows), free(v_rows), free(slots);
    free(q), free(out), free(want), free(lse);
    printf(bad ? "device example FAILED\n" : "device example ok\n");
    return bad;
}
