/* The rotq C ABI v2 from C: stateless calls on paged pools in this program's memory, every
 * result checked here, mostly against exact attention computed in double precision on the
 * unquantized rows.
 *
 * 1. A vLLM-style step on two layers: four sequences of different lengths in scattered pages
 *    (one prefilling a chunk of 4 rows after 7 tokens, one decoding, one prefilling from
 *    nothing, one with no rows this step); their history and this step's tokens written
 *    through slot mappings with padding (-1); the batch planned once (block table, and again
 *    as CSR) and run on both layers, with and without the log-sum-exp, plain causal and with
 *    a window, a soft-cap, a scale, query positions and an additive mask (ALiBi slopes and
 *    hidden keys). f32 pools: tight bounds; f16 and q8_0: looser ones.
 * 2. Every rotation choice (rotq's default, none, Hadamard, Hadamard blocks, randomized
 *    Hadamard, an explicit f64 or f32 matrix; for V none, blocks, full): the bytes in the f32
 *    pool are the rotated rows, computed here, and attention is exact. rotq's default follows
 *    ROTQ_DISABLE_ROTATION (set here with setenv before the codec is made); an explicit
 *    choice does not.
 * 3. The context shift of some slots against RoPE computed here; malformed calls (a slot
 *    named twice, a RoPE that does not fit, a short struct, a mask too short) are a status and
 *    a message, the pool bytes unchanged.
 * 4. Codecs from compressed-tensors checkpoints (config.json written here; a random-matrix
 *    R3 read from a safetensors file written here; a random Hadamard without its weights is
 *    an error that says so).
 *
 *   bash scripts/c-example.sh        (builds librotq_capi.a, compiles this file through
 *                                     pkg-config rotq, runs it) */
#define _POSIX_C_SOURCE 200809L
#include "rotq.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define H_KV 2
#define GROUP 2
#define H_Q (H_KV * GROUP)
#define D 64  /* head_dim */
#define DV 32 /* v_dim */
#define PT 4  /* tokens per page */
#define NP 24 /* pages per pool */
#define NSEQ 4
#define MAXB 3 /* block table columns */
#define MAXLEN (MAXB * PT)
#define LAYERS 2
#define ROWS 8 /* query rows this step: 4 + 1 + 3 + 0 */

static int failures = 0;

#define CHECK(cond, ...)                                              \
    do {                                                              \
        if (!(cond)) {                                                \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);      \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, "\n");                                    \
            failures++;                                               \
        }                                                             \
    } while (0)

/* A call that must succeed (what follows depends on it). */
static void must(enum RotqStatus status, const char *what) {
    if (status != ROTQ_STATUS_OK) {
        fprintf(stderr, "FAIL %s (status %d): %s\n", what, (int)status, rotq_last_error());
        exit(1);
    }
}

/* A call that must fail with `want`, saying something that contains `says`. */
static void refused(enum RotqStatus status, enum RotqStatus want, const char *says,
                    const char *what) {
    CHECK(status == want, "%s: status %d, expected %d (%s)", what, (int)status, (int)want,
          rotq_last_error());
    CHECK(strstr(rotq_last_error(), says) != NULL, "%s: message \"%s\" lacks \"%s\"", what,
          rotq_last_error(), says);
}

/* ---- The rotations, computed here ---------------------------------------------------- */

enum Kind { IDENT, HADAMARD, BLOCK, RANDOMIZED, MATRIX };

struct Expect {
    enum Kind kind;
    size_t block;     /* BLOCK */
    uint64_t seed;    /* RANDOMIZED */
    const double *m;  /* MATRIX: row-major n x n, y = M x */
    int transposed;   /* MATRIX: y = M^T x instead */
};

/* The normalized Walsh-Hadamard transform (Sylvester's order) of n values, in place. */
static void fwht(double *x, size_t n) {
    for (size_t h = 1; h < n; h *= 2)
        for (size_t i = 0; i < n; i += 2 * h)
            for (size_t j = i; j < i + h; j++) {
                double a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    double s = 1.0 / sqrt((double)n);
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* y = R x for rows of n values. */
static void rotate(const struct Expect *e, size_t n, const float *x, double *y) {
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    switch (e->kind) {
    case IDENT:
        break;
    case HADAMARD:
        fwht(y, n);
        break;
    case BLOCK:
        for (size_t b = 0; b < n; b += e->block) fwht(y + b, e->block);
        break;
    case RANDOMIZED: {
        uint64_t state = e->seed;
        for (size_t i = 0; i < n; i++)
            if (splitmix64(&state) >> 63) y[i] = -y[i];
        fwht(y, n);
        break;
    }
    case MATRIX:
        for (size_t i = 0; i < n; i++) {
            double acc = 0.0;
            for (size_t j = 0; j < n; j++)
                acc += (e->transposed ? e->m[j * n + i] : e->m[i * n + j]) * (double)x[j];
            y[i] = acc;
        }
        break;
    }
}

/* An orthogonal n x n matrix that is no Hadamard: the identity turned by Givens rotations. */
static void givens_orthogonal(double *m, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n * n; i++) m[i] = (i % (n + 1) == 0) ? 1.0 : 0.0;
    uint64_t state = seed;
    for (int r = 0; r < 6 * (int)n; r++) {
        size_t a = splitmix64(&state) % n, b = splitmix64(&state) % n;
        if (a == b) continue;
        double t = (double)(splitmix64(&state) >> 11) * (1.0 / 9007199254740992.0) * 6.283185307;
        double c = cos(t), s = sin(t);
        for (size_t col = 0; col < n; col++) {
            double x = m[a * n + col], y = m[b * n + col];
            m[a * n + col] = c * x - s * y;
            m[b * n + col] = s * x + c * y;
        }
    }
}

/* ---- Test data ------------------------------------------------------------------------- */

static uint64_t rng_state = 12345;
static float frand(void) { /* uniform in [-1, 1) */
    return (float)((double)(splitmix64(&rng_state) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

/* Each layer's rows of each sequence, and this step's queries. */
static float seq_k[LAYERS][NSEQ][MAXLEN][H_KV][D];
static float seq_v[LAYERS][NSEQ][MAXLEN][H_KV][DV];
static float queries[ROWS][H_Q][D];

static const int hist[NSEQ] = {7, 9, 0, 5};  /* tokens before this step */
static const int fresh[NSEQ] = {4, 1, 3, 0}; /* this step's tokens (its query rows) */
static const int32_t pages[NSEQ][MAXB] = {{5, 17, 2}, {0, 11, 6}, {20, -1, -1}, {9, 14, -1}};

static int len_of(int b) { return hist[b] + fresh[b]; }
static int64_t slot_of(int b, int t) { return (int64_t)pages[b][t / PT] * PT + t % PT; }

static void make_data(void) {
    for (int l = 0; l < LAYERS; l++)
        for (int b = 0; b < NSEQ; b++)
            for (int t = 0; t < MAXLEN; t++)
                for (int h = 0; h < H_KV; h++) {
                    for (int c = 0; c < D; c++)
                        seq_k[l][b][t][h][c] = frand() + (c == 5 ? 4.0f : 0.0f); /* outlier */
                    for (int c = 0; c < DV; c++) seq_v[l][b][t][h][c] = frand();
                }
    for (int r = 0; r < ROWS; r++)
        for (int h = 0; h < H_Q; h++)
            for (int c = 0; c < D; c++) queries[r][h][c] = 0.5f * frand();
}

/* ---- Exact attention ------------------------------------------------------------------- */

/* Sequence b's rows loc[b]..loc[b+1], its first at qpos[b], over keys 0..lens[b] of K and V
 * ([NSEQ][MAXLEN][H_KV][D or DV]); out [rows][H_Q][DV], lse [rows][H_Q]. */
static void exact(int n_seqs, const uint32_t *loc, const int *lens, const int *qpos,
                  const float *K, const float *V, const struct RotqAttentionParams *p,
                  const float *mask, size_t stride, const float *q, double *out, double *lse) {
    double scale = p->scale != 0.0 ? p->scale : 1.0 / sqrt((double)D);
    for (int b = 0; b < n_seqs; b++)
        for (uint32_t i = 0; i < loc[b + 1] - loc[b]; i++) {
            uint32_t r = loc[b] + i;
            int pos = qpos[b] + (int)i;
            for (int h = 0; h < H_Q; h++) {
                int kvh = h / GROUP;
                double s[MAXLEN], mx = -INFINITY;
                int visible[MAXLEN];
                for (int j = 0; j < lens[b]; j++) {
                    visible[j] = (!p->causal || j <= pos) &&
                                 (p->window == 0 || j > pos || (size_t)(pos - j) < p->window);
                    if (!visible[j]) continue;
                    const float *qv = q + ((size_t)r * H_Q + h) * D;
                    const float *kv = K + (((size_t)b * MAXLEN + j) * H_KV + kvh) * D;
                    double dot = 0.0;
                    for (int c = 0; c < D; c++) dot += (double)qv[c] * (double)kv[c];
                    double x = scale * dot;
                    if (p->softcap != 0.0) x = p->softcap * tanh(x / p->softcap);
                    if (mask) x += mask[(size_t)r * stride + j];
                    s[j] = x;
                    if (x > mx) mx = x;
                }
                double *o = out + ((size_t)r * H_Q + h) * DV;
                for (int c = 0; c < DV; c++) o[c] = 0.0;
                if (mx == -INFINITY) {
                    lse[(size_t)r * H_Q + h] = -INFINITY;
                    continue;
                }
                double total = 0.0;
                for (int j = 0; j < lens[b]; j++)
                    if (visible[j]) total += exp(s[j] - mx);
                lse[(size_t)r * H_Q + h] = mx + log(total);
                for (int j = 0; j < lens[b]; j++) {
                    if (!visible[j]) continue;
                    double w = exp(s[j] - mx) / total;
                    const float *vv = V + (((size_t)b * MAXLEN + j) * H_KV + kvh) * DV;
                    for (int c = 0; c < DV; c++) o[c] += w * (double)vv[c];
                }
            }
        }
}

static double max_err(const float *got, const double *want, size_t n) {
    double e = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (isinf(want[i]) && got[i] == (float)want[i]) continue;
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= e)) e = d; /* NaN counts */
    }
    return e;
}

/* ---- Pools, specs ---------------------------------------------------------------------- */

struct Pools {
    uint8_t *k, *v;
    size_t k_len, v_len;
};

static struct RotqPoolSpec spec_of(const char *k_format, const char *v_format,
                                   const struct RotqRotation *rotation) {
    struct RotqPoolSpec s = {.struct_size = sizeof(struct RotqPoolSpec)};
    s.k_format = k_format;
    s.v_format = v_format;
    s.rotation = rotation;
    s.n_kv_heads = H_KV;
    s.head_dim = D;
    s.v_dim = DV;
    s.n_pages = NP;
    s.page_tokens = PT;
    return s;
}

static struct Pools pools_of(const struct RotqPoolSpec *spec) {
    struct Pools p;
    must(rotq_pool_bytes(spec, &p.k_len, &p.v_len), "rotq_pool_bytes");
    p.k = calloc(p.k_len, 1);
    p.v = calloc(p.v_len, 1);
    if (!p.k || !p.v) exit(1);
    return p;
}

static void pools_free(struct Pools *p) {
    free(p->k);
    free(p->v);
}

/* Slot mappings of the step: the history (interleaved across sequences, with padding), then
 * this step's tokens in batch order (padded at the end, as vLLM pads to a graph size). Fills
 * the rows of layer `l`; returns the token count. */
static size_t gather(int l, int history, float *k, float *v, int64_t *slots) {
    size_t n = 0;
    if (history) {
        for (int t = 0; t < MAXLEN; t++)
            for (int b = 0; b < NSEQ; b++) {
                if (t == 3 && b == 1) { /* a padded token mid-way */
                    for (int i = 0; i < H_KV * D; i++) k[n * H_KV * D + i] = 1e30f;
                    for (int i = 0; i < H_KV * DV; i++) v[n * H_KV * DV + i] = 1e30f;
                    slots[n++] = -1;
                }
                if (t >= hist[b]) continue;
                memcpy(k + n * H_KV * D, seq_k[l][b][t], sizeof seq_k[l][b][t]);
                memcpy(v + n * H_KV * DV, seq_v[l][b][t], sizeof seq_v[l][b][t]);
                slots[n++] = slot_of(b, t);
            }
    } else {
        for (int b = 0; b < NSEQ; b++)
            for (int t = hist[b]; t < len_of(b); t++) {
                memcpy(k + n * H_KV * D, seq_k[l][b][t], sizeof seq_k[l][b][t]);
                memcpy(v + n * H_KV * DV, seq_v[l][b][t], sizeof seq_v[l][b][t]);
                slots[n++] = slot_of(b, t);
            }
        for (int pad = 0; pad < 2; pad++) {
            for (int i = 0; i < H_KV * D; i++) k[n * H_KV * D + i] = NAN;
            for (int i = 0; i < H_KV * DV; i++) v[n * H_KV * DV + i] = NAN;
            slots[n++] = -1;
        }
    }
    return n;
}

#define MAX_TOKENS (NSEQ * MAXLEN + 4)
static float in_k[MAX_TOKENS * H_KV * D], in_v[MAX_TOKENS * H_KV * DV];
static int64_t in_slots[MAX_TOKENS];

/* ---- 1. A step ------------------------------------------------------------------------- */

static void step(const char *k_format, const char *v_format, const struct RotqRotation *rot,
                 double tol, double lse_tol) {
    struct RotqPoolSpec spec = spec_of(k_format, v_format, rot);
    struct RotqCodec *codec = NULL;
    must(rotq_codec_new(&spec, &codec), "rotq_codec_new");
    struct Pools layer[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        layer[l] = pools_of(&spec);
        for (int history = 1; history >= 0; history--) {
            size_t n = gather(l, history, in_k, in_v, in_slots);
            must(rotq_pool_append(codec, layer[l].k, layer[l].k_len, layer[l].v, layer[l].v_len,
                                  in_k, in_v, n, in_slots),
                 "rotq_pool_append");
        }
    }

    /* The batch, as a block table and as CSR. */
    uint32_t loc[NSEQ + 1] = {0};
    uint32_t seq_lens[NSEQ], indptr[NSEQ + 1] = {0}, indices[NSEQ * MAXB], last[NSEQ];
    int lens[NSEQ], default_pos[NSEQ];
    size_t n_indices = 0;
    for (int b = 0; b < NSEQ; b++) {
        loc[b + 1] = loc[b] + (uint32_t)fresh[b];
        lens[b] = len_of(b);
        seq_lens[b] = (uint32_t)lens[b];
        default_pos[b] = lens[b] - fresh[b];
        int used = (lens[b] + PT - 1) / PT;
        for (int i = 0; i < used; i++) indices[n_indices++] = (uint32_t)pages[b][i];
        indptr[b + 1] = (uint32_t)n_indices;
        last[b] = (uint32_t)(lens[b] - (used - 1) * PT);
    }
    CHECK(loc[NSEQ] == ROWS, "rows");
    struct RotqBatch block = {.struct_size = sizeof(struct RotqBatch)};
    block.n_seqs = NSEQ;
    block.query_start_loc = loc;
    block.h_q = H_Q;
    block.tables = ROTQ_TABLES_BLOCK;
    block.block_table = &pages[0][0];
    block.max_blocks = MAXB;
    block.seq_lens = seq_lens;
    block.params.causal = true;
    struct RotqBatch csr = block;
    csr.tables = ROTQ_TABLES_CSR;
    csr.block_table = NULL;
    csr.seq_lens = NULL;
    csr.indptr = indptr;
    csr.indices = indices;
    csr.n_indices = n_indices;
    csr.last_page_len = last;

    /* The second configuration: window, soft-cap, scale, query positions, a mask. */
    static const uint32_t qpos[NSEQ] = {7, 6, 0, 5};
    int qpos_int[NSEQ];
    for (int b = 0; b < NSEQ; b++) qpos_int[b] = (int)qpos[b];
    enum { STRIDE = MAXLEN + 1 };
    static float mask[ROWS * STRIDE];
    for (int b = 0; b < NSEQ; b++)
        for (uint32_t r = loc[b]; r < loc[b + 1]; r++)
            for (int j = 0; j < STRIDE; j++) {
                int pos = (int)qpos[b] + (int)(r - loc[b]);
                mask[r * STRIDE + j] = -0.125f * (float)abs(pos - j); /* an ALiBi slope */
            }
    mask[0 * STRIDE + 6] = -INFINITY; /* row 0 (at position 7) does not see key 6 */
    mask[4 * STRIDE + 2] = -INFINITY;

    for (int config = 0; config < 2; config++) {
        struct RotqBatch *batches[2] = {&block, &csr};
        for (int form = 0; form < 2; form++) {
            struct RotqBatch *bt = batches[form];
            if (config == 1) {
                bt->params.window = 5;
                bt->params.softcap = 20.0;
                bt->params.scale = 0.15;
                bt->q_positions = qpos;
                bt->mask = mask;
                bt->mask_row_stride = STRIDE;
                bt->mask_len = ROWS * STRIDE;
            }
            /* Planned once (on layer 0's pools), run on every layer. */
            struct RotqPlan *plan = NULL;
            must(rotq_plan_new(codec, bt, layer[0].k, layer[0].k_len, layer[0].v,
                               layer[0].v_len, &plan),
                 "rotq_plan_new");
            size_t ws_len = 0, out_len = 0, lse_len = 0;
            must(rotq_plan_sizes(plan, &ws_len, &out_len, &lse_len), "rotq_plan_sizes");
            CHECK(out_len == ROWS * H_Q * DV && lse_len == ROWS * H_Q, "plan sizes %zu %zu",
                  out_len, lse_len);
            float *ws = malloc((ws_len ? ws_len : 1) * sizeof(float));
            static float out[ROWS * H_Q * DV], out2[ROWS * H_Q * DV], lse[ROWS * H_Q];
            static double want[ROWS * H_Q * DV], want_lse[ROWS * H_Q];
            for (int l = 0; l < LAYERS; l++) {
                must(rotq_attention_run(codec, plan, bt, layer[l].k, layer[l].k_len, layer[l].v,
                                        layer[l].v_len, &queries[0][0][0], ws, ws_len, out,
                                        out_len, lse, lse_len),
                     "rotq_attention_run");
                exact(NSEQ, loc, lens, config ? qpos_int : default_pos, &seq_k[l][0][0][0][0],
                      &seq_v[l][0][0][0][0], &bt->params, bt->mask, bt->mask_row_stride,
                      &queries[0][0][0], want, want_lse);
                double e = max_err(out, want, out_len), el = max_err(lse, want_lse, lse_len);
                printf("  %-5s %-5s config %d %-5s layer %d: max |out - exact| = %.2e, "
                       "max |lse - exact| = %.2e\n",
                       k_format, v_format, config, form ? "csr" : "block", l, e, el);
                CHECK(e <= tol, "out error %.3e above %.1e", e, tol);
                CHECK(el <= lse_tol, "lse error %.3e above %.1e", el, lse_tol);
                /* Without the log-sum-exp: the same output. */
                must(rotq_attention_run(codec, plan, bt, layer[l].k, layer[l].k_len, layer[l].v,
                                        layer[l].v_len, &queries[0][0][0], ws, ws_len, out2,
                                        out_len, NULL, 0),
                     "rotq_attention_run without lse");
                CHECK(memcmp(out, out2, sizeof out) == 0, "output differs without lse");
            }
            free(ws);
            rotq_plan_free(plan);
        }
    }
    for (int l = 0; l < LAYERS; l++) pools_free(&layer[l]);
    rotq_codec_free(codec);
}

/* ---- 2. Rotation choices ------------------------------------------------------------------ */

static double qk_matrix[D * D];
static float qk_matrix_f32[D * D];

/* Writes 3 tokens into an f32 pool with `rot` (NULL: the default) and checks the stored rows
 * against `qk` and `v` computed here, then a decode row's attention against exact. */
static void rotation_case(const char *label, const struct RotqRotation *rot,
                          struct Expect qk, struct Expect v) {
    struct RotqPoolSpec spec = spec_of("f32", "f32", rot);
    struct RotqCodec *codec = NULL;
    must(rotq_codec_new(&spec, &codec), label);
    struct Pools p = pools_of(&spec);
    /* Sequence 0's first 3 tokens into page 9 (slots 36, 37, 38). */
    int64_t slots[3] = {36, 37, 38};
    must(rotq_pool_append(codec, p.k, p.k_len, p.v, p.v_len, &seq_k[0][0][0][0][0],
                          &seq_v[0][0][0][0][0], 3, slots),
         label);
    double ek = 0.0, ev = 0.0, want[D];
    for (int t = 0; t < 3; t++)
        for (int h = 0; h < H_KV; h++) {
            float row[D];
            memcpy(row, p.k + ((size_t)slots[t] * H_KV + h) * D * sizeof(float), D * sizeof(float));
            rotate(&qk, D, seq_k[0][0][t][h], want);
            for (int c = 0; c < D; c++) ek = fmax(ek, fabs(row[c] - want[c]));
            memcpy(row, p.v + ((size_t)slots[t] * H_KV + h) * DV * sizeof(float),
                   DV * sizeof(float));
            rotate(&v, DV, seq_v[0][0][t][h], want);
            for (int c = 0; c < DV; c++) ev = fmax(ev, fabs(row[c] - want[c]));
        }
    /* One decode row at position 2 over the 3 tokens. */
    uint32_t loc[2] = {0, 1}, lens_u[1] = {3};
    int32_t table[1] = {9};
    int lens[1] = {3}, qpos[1] = {2};
    struct RotqBatch batch = {.struct_size = sizeof(struct RotqBatch)};
    batch.n_seqs = 1;
    batch.query_start_loc = loc;
    batch.h_q = H_Q;
    batch.tables = ROTQ_TABLES_BLOCK;
    batch.block_table = table;
    batch.max_blocks = 1;
    batch.seq_lens = lens_u;
    batch.params.causal = true;
    struct RotqPlan *plan = NULL;
    must(rotq_plan_new(codec, &batch, p.k, p.k_len, p.v, p.v_len, &plan), label);
    size_t ws_len;
    must(rotq_plan_sizes(plan, &ws_len, NULL, NULL), label);
    float *ws = malloc((ws_len ? ws_len : 1) * sizeof(float));
    float out[H_Q * DV], lse[H_Q];
    double want_out[H_Q * DV], want_lse[H_Q];
    must(rotq_attention_run(codec, plan, &batch, p.k, p.k_len, p.v, p.v_len, &queries[0][0][0],
                            ws, ws_len, out, H_Q * DV, lse, H_Q),
         label);
    exact(1, loc, lens, qpos, &seq_k[0][0][0][0][0], &seq_v[0][0][0][0][0], &batch.params, NULL,
          0, &queries[0][0][0], want_out, want_lse);
    double eo = max_err(out, want_out, H_Q * DV), el = max_err(lse, want_lse, H_Q);
    printf("  %-40s K rows %.1e, V rows %.1e, out %.1e, lse %.1e\n", label, ek, ev, eo, el);
    CHECK(ek <= 5e-6 && ev <= 5e-6, "%s: stored rows differ from the rotation (%.2e, %.2e)",
          label, ek, ev);
    CHECK(eo <= 1e-5 && el <= 1e-5, "%s: attention differs from exact (%.2e, %.2e)", label, eo,
          el);
    free(ws);
    rotq_plan_free(plan);
    pools_free(&p);
    rotq_codec_free(codec);
}

static struct RotqRotation rotation(uint32_t qk, uint32_t v) {
    struct RotqRotation r = {.struct_size = sizeof(struct RotqRotation)};
    r.qk = qk;
    r.v = v;
    return r;
}

static void rotations(void) {
    const struct Expect ident = {.kind = IDENT}, had = {.kind = HADAMARD};
    givens_orthogonal(qk_matrix, D, 99);
    for (int i = 0; i < D * D; i++) qk_matrix_f32[i] = (float)qk_matrix[i];

    unsetenv("ROTQ_DISABLE_ROTATION");
    struct RotqRotation r = rotation(ROTQ_QK_DEFAULT, ROTQ_V_DEFAULT);
    rotation_case("default (null rotation)", NULL, had, ident);
    rotation_case("default / default", &r, had, ident);
    r = rotation(ROTQ_QK_NONE, ROTQ_V_NONE);
    rotation_case("none / none", &r, ident, ident);
    r = rotation(ROTQ_QK_HADAMARD, ROTQ_V_HADAMARD);
    rotation_case("hadamard / hadamard", &r, had, had);
    r = rotation(ROTQ_QK_BLOCK_HADAMARD, ROTQ_V_BLOCK_HADAMARD);
    r.qk_block = 16;
    r.v_block = 8;
    rotation_case("blocks of 16 / blocks of 8", &r, (struct Expect){.kind = BLOCK, .block = 16},
                  (struct Expect){.kind = BLOCK, .block = 8});
    r = rotation(ROTQ_QK_RANDOMIZED, ROTQ_V_NONE);
    r.seed = 42;
    rotation_case("randomized (seed 42) / none", &r, (struct Expect){.kind = RANDOMIZED, .seed = 42}, ident);
    r = rotation(ROTQ_QK_MATRIX, ROTQ_V_BLOCK_HADAMARD);
    r.matrix_f64 = qk_matrix;
    r.v_block = 16;
    rotation_case("matrix f64 / blocks of 16", &r, (struct Expect){.kind = MATRIX, .m = qk_matrix},
                  (struct Expect){.kind = BLOCK, .block = 16});
    r = rotation(ROTQ_QK_MATRIX, ROTQ_V_HADAMARD);
    r.matrix_f32 = qk_matrix_f32;
    rotation_case("matrix f32 / hadamard", &r, (struct Expect){.kind = MATRIX, .m = qk_matrix}, had);

    /* The switch turns rotq's default off, and only the default. */
    setenv("ROTQ_DISABLE_ROTATION", "1", 1);
    rotation_case("default, ROTQ_DISABLE_ROTATION=1", NULL, ident, ident);
    r = rotation(ROTQ_QK_HADAMARD, ROTQ_V_DEFAULT);
    rotation_case("hadamard, ROTQ_DISABLE_ROTATION=1", &r, had, ident);
    setenv("ROTQ_DISABLE_ROTATION", "0", 1);
    rotation_case("default, ROTQ_DISABLE_ROTATION=0", NULL, had, ident);
    unsetenv("ROTQ_DISABLE_ROTATION");

    /* Not a rotation: refused when the codec is made. */
    struct RotqCodec *codec = (struct RotqCodec *)&r; /* must be reset to NULL */
    r = rotation(ROTQ_QK_MATRIX, ROTQ_V_NONE);
    double bad[D * D];
    for (int i = 0; i < D * D; i++) bad[i] = 2.0 * qk_matrix[i];
    r.matrix_f64 = bad;
    struct RotqPoolSpec spec = spec_of("f32", "f32", &r);
    refused(rotq_codec_new(&spec, &codec), ROTQ_STATUS_ERROR, "orthogonal", "a scaled matrix");
    CHECK(codec == NULL, "a failed rotq_codec_new leaves *out NULL");
    r.matrix_f32 = qk_matrix_f32;
    refused(rotq_codec_new(&spec, &codec), ROTQ_STATUS_INVALID_ARGUMENT, "exactly one",
            "two matrices");
    r = rotation(ROTQ_QK_BLOCK_HADAMARD, ROTQ_V_NONE);
    r.qk_block = 48;
    refused(rotq_codec_new(&spec, &codec), ROTQ_STATUS_ERROR, "48", "blocks of 48");
}

/* ---- 3. Shift and malformed calls ------------------------------------------------------------ */

static void shift_and_errors(void) {
    struct RotqRotation r = rotation(ROTQ_QK_RANDOMIZED, ROTQ_V_NONE);
    r.seed = 7;
    struct RotqPoolSpec spec = spec_of("f32", "f32", &r);
    struct RotqCodec *codec = NULL;
    must(rotq_codec_new(&spec, &codec), "rotq_codec_new");
    struct Pools p = pools_of(&spec);
    size_t kb, vb;
    must(rotq_pool_bytes(&spec, &kb, &vb), "rotq_pool_bytes");
    CHECK(kb == (size_t)NP * PT * H_KV * D * 4 && vb == (size_t)NP * PT * H_KV * DV * 4,
          "pool bytes %zu %zu", kb, vb);
    int64_t slots[4] = {12, 13, 14, 40};
    must(rotq_pool_append(codec, p.k, p.k_len, p.v, p.v_len, &seq_k[0][1][0][0][0],
                          &seq_v[0][1][0][0][0], 4, slots),
         "rotq_pool_append");
    uint8_t *before_k = malloc(p.k_len), *before_v = malloc(p.v_len);
    memcpy(before_k, p.k, p.k_len);
    memcpy(before_v, p.v, p.v_len);

    /* Slots 12 and 40 move back by 3 positions (NeoX pairs, base 10000); 13 and 14 stay. */
    struct RotqRope rope = {1, 0, 0.0, 0.0};
    int64_t moved[3] = {40, -1, 12};
    must(rotq_pool_shift(codec, p.k, p.k_len, moved, 3, -3, &rope), "rotq_pool_shift");
    const struct Expect rnd = {.kind = RANDOMIZED, .seed = 7};
    double err = 0.0;
    for (int t = 0; t < 4; t++)
        for (int h = 0; h < H_KV; h++) {
            float k[D], row[D];
            memcpy(k, seq_k[0][1][t][h], sizeof k);
            if (slots[t] == 12 || slots[t] == 40)
                for (int i = 0; i < D / 2; i++) {
                    double theta = -3.0 * pow(10000.0, -2.0 * i / D);
                    double x = k[i], y = k[i + D / 2];
                    k[i] = (float)(x * cos(theta) - y * sin(theta));
                    k[i + D / 2] = (float)(x * sin(theta) + y * cos(theta));
                }
            double want[D];
            rotate(&rnd, D, k, want);
            memcpy(row, p.k + ((size_t)slots[t] * H_KV + h) * D * sizeof(float), sizeof row);
            for (int c = 0; c < D; c++) err = fmax(err, fabs(row[c] - want[c]));
        }
    printf("  shift of 2 of 4 slots by -3: max |K row - R rope(k)| = %.1e\n", err);
    CHECK(err <= 5e-6, "shifted rows differ by %.2e", err);
    CHECK(memcmp(p.v, before_v, p.v_len) == 0, "a shift changed V");

    /* Malformed calls: a status, a message, the pools unchanged. */
    memcpy(before_k, p.k, p.k_len);
    int64_t twice[2] = {13, 13};
    refused(rotq_pool_shift(codec, p.k, p.k_len, twice, 2, 1, &rope), ROTQ_STATUS_ERROR,
            "twice", "a shift naming a slot twice");
    struct RotqRope odd = {0, 63, 0.0, 0.0};
    int64_t one[1] = {13};
    refused(rotq_pool_shift(codec, p.k, p.k_len, one, 1, 1, &odd), ROTQ_STATUS_ERROR, "63",
            "a RoPE of 63 dims");
    int64_t outside[2] = {3, NP * PT};
    refused(rotq_pool_append(codec, p.k, p.k_len, p.v, p.v_len, &seq_k[0][2][0][0][0],
                             &seq_v[0][2][0][0][0], 2, outside),
            ROTQ_STATUS_ERROR, "outside", "an append to a slot outside the pool");
    refused(rotq_pool_append(codec, p.k, p.k_len - 1, p.v, p.v_len, &seq_k[0][2][0][0][0],
                             &seq_v[0][2][0][0][0], 1, outside),
            ROTQ_STATUS_INVALID_ARGUMENT, "k_len", "a short K pool");
    CHECK(memcmp(p.k, before_k, p.k_len) == 0 && memcmp(p.v, before_v, p.v_len) == 0,
          "a failed call changed the pools");

    struct RotqPoolSpec old = spec;
    old.struct_size = sizeof(size_t);
    struct RotqCodec *none = NULL;
    refused(rotq_codec_new(&old, &none), ROTQ_STATUS_INVALID_ARGUMENT, "struct_size",
            "a short RotqPoolSpec");

    uint32_t loc[2] = {0, 2}, lens[1] = {2};
    int32_t table[1] = {3};
    float mask[3] = {0};
    struct RotqBatch batch = {.struct_size = sizeof(struct RotqBatch)};
    batch.n_seqs = 1;
    batch.query_start_loc = loc;
    batch.h_q = H_Q;
    batch.tables = ROTQ_TABLES_BLOCK;
    batch.block_table = table;
    batch.max_blocks = 1;
    batch.seq_lens = lens;
    batch.params.causal = true;
    batch.mask = mask;
    batch.mask_row_stride = 2;
    batch.mask_len = 3; /* 2 rows x 2 */
    struct RotqPlan *plan = NULL;
    refused(rotq_plan_new(codec, &batch, p.k, p.k_len, p.v, p.v_len, &plan), ROTQ_STATUS_ERROR,
            "mask", "a mask too short");
    CHECK(plan == NULL, "a failed rotq_plan_new leaves *plan NULL");
    batch.mask_len = 4;
    table[0] = NP;
    refused(rotq_plan_new(codec, &batch, p.k, p.k_len, p.v, p.v_len, &plan), ROTQ_STATUS_ERROR,
            "outside", "a page outside the pool");
    free(before_k);
    free(before_v);
    pools_free(&p);
    rotq_codec_free(codec);
}

/* ---- 4. Checkpoints ------------------------------------------------------------------------ */

static char dir[256];

static void write_file(const char *name, const void *data, size_t len) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
        fprintf(stderr, "FAIL writing %s\n", path);
        exit(1);
    }
}

static const char *path_of(const char *name) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}

/* Checks that each of the `n` codecs stores K rows rotated as `qk`. */
static void check_codecs(struct RotqCodec **codecs, int n, const struct RotqPoolSpec *spec,
                         struct Expect qk, const char *label) {
    for (int l = 0; l < n; l++) {
        struct Pools p = pools_of(spec);
        int64_t slot[1] = {5};
        must(rotq_pool_append(codecs[l], p.k, p.k_len, p.v, p.v_len, &seq_k[1][3][0][0][0],
                              &seq_v[1][3][0][0][0], 1, slot),
             label);
        double err = 0.0, want[D];
        for (int h = 0; h < H_KV; h++) {
            float row[D];
            memcpy(row, p.k + ((size_t)5 * H_KV + h) * D * sizeof(float), sizeof row);
            rotate(&qk, D, seq_k[1][3][0][h], want);
            for (int c = 0; c < D; c++) err = fmax(err, fabs(row[c] - want[c]));
        }
        CHECK(err <= 5e-6, "%s: layer %d's K rows differ by %.2e", label, l, err);
        pools_free(&p);
        rotq_codec_free(codecs[l]);
    }
    printf("  %s: %d layers\n", label, n);
}

static void checkpoints(void) {
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/rotq-batch-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        exit(1);
    }
    struct RotqRotation none = rotation(ROTQ_QK_NONE, ROTQ_V_NONE);
    struct RotqPoolSpec spec = spec_of("f32", "f32", &none);
    struct RotqCodec *codecs[3];
    bool from = true;

    /* SpinQuant's R3, a Hadamard: built here, no weights needed. */
    const char *r3 = "{\"quantization_config\": {\"transform_config\": {\"config_groups\": "
                     "{\"R3\": {\"type\": \"hadamard\", \"head_dim\": 64, \"apply\": ["
                     "{\"targets\": [\"re:.*self_attn$\"], \"location\": \"q_attn\"},"
                     "{\"targets\": [\"re:.*self_attn$\"], \"location\": \"k_cache\"}]}}}}}";
    write_file("hadamard.json", r3, strlen(r3));
    must(rotq_checkpoint_codecs(path_of("hadamard.json"), NULL, &spec, 3, codecs, &from),
         "rotq_checkpoint_codecs (hadamard)");
    CHECK(from, "the Hadamard checkpoint sets Q/K");
    check_codecs(codecs, 3, &spec, (struct Expect){.kind = HADAMARD}, "checkpoint R3 hadamard");

    /* No transform config: the spec's rotation (none here). */
    const char *plain = "{\"head_dim\": 64, \"num_hidden_layers\": 2}";
    write_file("plain.json", plain, strlen(plain));
    must(rotq_checkpoint_codecs(path_of("plain.json"), NULL, &spec, 2, codecs, &from),
         "rotq_checkpoint_codecs (plain)");
    CHECK(!from, "a config without transforms does not set Q/K");
    check_codecs(codecs, 2, &spec, (struct Expect){.kind = IDENT}, "checkpoint without transforms");

    /* A random matrix, stored for layer 0 only (shared by the others): R = W^T. */
    const char *rm = "{\"architectures\": [\"LlamaForCausalLM\"], \"quantization_config\": "
                     "{\"transform_config\": {\"config_groups\": "
                     "{\"R3\": {\"type\": \"random-matrix\", \"head_dim\": 64, \"apply\": ["
                     "{\"targets\": \"LlamaAttention\", \"location\": \"q_attn\"},"
                     "{\"targets\": \"LlamaAttention\", \"location\": \"k_cache\"}]}}}}}";
    write_file("matrix.json", rm, strlen(rm));
    char header[256];
    int hl = snprintf(header, sizeof header,
                      "{\"model.layers.0.self_attn.R3_q_attn.weight\":{\"dtype\":\"F64\","
                      "\"shape\":[%d,%d],\"data_offsets\":[0,%d]}}",
                      D, D, D * D * 8);
    static unsigned char st[8 + 256 + D * D * 8];
    uint64_t n = (uint64_t)hl;
    for (int i = 0; i < 8; i++) st[i] = (unsigned char)(n >> (8 * i));
    memcpy(st + 8, header, (size_t)hl);
    for (int i = 0; i < D * D; i++) { /* little-endian doubles */
        uint64_t bits;
        memcpy(&bits, &qk_matrix[i], 8);
        for (int j = 0; j < 8; j++) st[8 + hl + 8 * i + j] = (unsigned char)(bits >> (8 * j));
    }
    write_file("model.safetensors", st, 8 + (size_t)hl + D * D * 8);
    must(rotq_checkpoint_codecs(path_of("matrix.json"), dir, &spec, 3, codecs, &from),
         "rotq_checkpoint_codecs (random matrix)");
    CHECK(from, "the random-matrix checkpoint sets Q/K");
    check_codecs(codecs, 3, &spec, (struct Expect){.kind = MATRIX, .m = qk_matrix, .transposed = 1},
                 "checkpoint R3 random-matrix");

    /* A random Hadamard needs its weights: without them, an error that says so, no codec. */
    const char *rh = "{\"quantization_config\": {\"transform_config\": {\"config_groups\": "
                     "{\"R3\": {\"type\": \"random-hadamard\", \"head_dim\": 64, \"apply\": ["
                     "{\"targets\": \"re:.*self_attn$\", \"location\": \"q_attn\"},"
                     "{\"targets\": \"re:.*self_attn$\", \"location\": \"k_cache\"}]}}}}}";
    write_file("random.json", rh, strlen(rh));
    codecs[0] = codecs[1] = (struct RotqCodec *)&spec;
    refused(rotq_checkpoint_codecs(path_of("random.json"), NULL, &spec, 2, codecs, NULL),
            ROTQ_STATUS_ERROR, "needs the tensor", "a random Hadamard without weights");
    CHECK(codecs[0] == NULL && codecs[1] == NULL, "a failed call leaves no codec");
    refused(rotq_checkpoint_codecs(path_of("missing.json"), NULL, &spec, 2, codecs, NULL),
            ROTQ_STATUS_ERROR, "missing.json", "a config that is not there");

    const char *names[] = {"hadamard.json", "plain.json", "matrix.json", "model.safetensors",
                           "random.json"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) unlink(path_of(names[i]));
    rmdir(dir);
}

int main(void) {
    uint32_t version = rotq_abi_version();
    printf("rotq ABI %u.%u (header %u.%u)\n", version >> 16, version & 0xffff,
           ROTQ_ABI_VERSION_MAJOR, ROTQ_ABI_VERSION_MINOR);
    /* Same major version, and at least the header's minor one. */
    if (version >> 16 != ROTQ_ABI_VERSION_MAJOR || version < ROTQ_ABI_VERSION) {
        fprintf(stderr, "FAIL: library ABI %#x, header %#x\n", version, ROTQ_ABI_VERSION);
        return 1;
    }
    make_data();
    unsetenv("ROTQ_DISABLE_ROTATION");

    printf("1. a step of 4 sequences (block table and CSR), 2 layers, one plan:\n");
    struct RotqRotation v_blocks = rotation(ROTQ_QK_HADAMARD, ROTQ_V_BLOCK_HADAMARD);
    v_blocks.v_block = 16;
    step("f32", "f32", NULL, 1e-5, 1e-5);
    step("f16", "f16", &v_blocks, 2e-3, 1e-3);
    step("q8_0", "q8_0", NULL, 2e-2, 2e-2);
    printf("2. rotation choices (f32 pools: stored rows, then attention):\n");
    rotations();
    printf("3. shift and malformed calls:\n");
    shift_and_errors();
    printf("4. checkpoints:\n");
    checkpoints();

    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("batch.c: all checks passed\n");
    return 0;
}
