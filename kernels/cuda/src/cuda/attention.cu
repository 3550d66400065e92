// rotq CUDA kernels: decode attention (one query row per sequence, batched sequences of
// different lengths) straight from a quantized K/V cache, split over the cache
// (flash-decoding) and merged by a second kernel. Compiled at run time by NVRTC after
// formats.cuh and elem.cuh; the host defines, per module:
//
//   ELEM     0 f32, 1 f16, 2 bf16: the element type of Q and of the output
//   KFMT     format of the K cache (a name of formats.cuh); VFMT likewise for V
//   D, DV    head dimensions of K and V (multiples of 32)
//   G        query heads per KV head (GQA group; 1 is MHA)
//   WARPS    warps per thread block
//   MMA      1: also the tensor-core kernel (ELEM 1 or 2); KFAST, VFAST 1/2: K, V is q4_0/q8_0
//   QR       query rows per thread block of the tensor-core kernel (1 for decode; prefill rows
//            over one shared cache go QR at a time, so each K/V tile serves all of them)
//
// Cache rows: token t of sequence b, KV head h is row `(slot · n_heads + h)` of the cache,
// where slot = page · page_tokens + t % page_tokens and page = table[b · table_stride +
// t / page_tokens] (a paged cache), or page = b without a table (a contiguous cache of
// `page_tokens` tokens per sequence).
//
// A thread block serves one (sequence, KV head, split of the cache) and all G query heads of
// the group, so each K and V row is read once for the group. Each warp streams its own tiles of
// 32 tokens: it copies their raw rows into shared memory with cp.async (the next tile's copy in
// flight while it computes on the current one), then
//   - scores: lane u dequantizes K row u, 32 values at a time, in registers and dots them with
//     the G rotated, scaled queries held in shared memory (all lanes read the same query values:
//     a broadcast);
//   - an online softmax per head over the warp's tokens (running max m, sum l);
//   - the weighted sum: each lane dequantizes its 4-value chunks of each V row in registers,
//     once for all G heads, and accumulates p · v for every head (when the row has fewer
//     chunks than the warp has lanes, sets of lanes split the tile's tokens).
// Each warp leaves a partial (unnormalized output, m, l, seen) per query head; `decode_combine`
// merges the partials of a head, divides by l and rotates the output back (V rotation).
// Arithmetic is f32 (the products with explicit fused multiply-adds).

#define THREADS (WARPS * 32)
#define FULL_MASK 0xffffffffu
#define NEG_INF (-__int_as_float(0x7f800000))

#define RQ_CAT2(a, b) a##b
#define RQ_CAT(a, b) RQ_CAT2(a, b)
#define K_BS RQ_CAT(RQ_BLOCK_SIZE_, KFMT)
#define K_BB RQ_CAT(RQ_BLOCK_BYTES_, KFMT)
#define V_BS RQ_CAT(RQ_BLOCK_SIZE_, VFMT)
#define V_BB RQ_CAT(RQ_BLOCK_BYTES_, VFMT)
#define K_ROW ((D / K_BS) * K_BB)
#define V_ROW ((DV / V_BS) * V_BB)
// Rows in shared memory: an odd number of 4-byte words apart, so that 32 lanes reading the
// same offset of 32 rows hit 32 different banks.
#define K_STRIDE_W (((K_ROW + 3) / 4) | 1)
#define V_STRIDE_W (((V_ROW + 3) / 4) | 1)
#define STAGE_W (32 * (K_STRIDE_W + V_STRIDE_W))
// Rows a whole number of words long move with 4-byte cp.async; others with 2-byte copies.
#define COPY4 (K_ROW % 4 == 0 && V_ROW % 4 == 0)
// The weighted sum: lanes own 4-value chunks of the V row (NC4 of them, C4 per lane); with
// fewer chunks than lanes, SETS sets of lanes split the tile's tokens.
#define NC4 (DV / 4)
#define C4 ((NC4 + 31) / 32)
#define SETS (NC4 >= 32 ? 1 : 32 / NC4)
// Per warp in shared memory: two stages of raw K and V rows, and the tile's weights.
#define WARP_W (2 * STAGE_W + 32 * G)
// A partial: DV outputs, then m, l, seen.
#define PART (DV + 3)

// Values [32c, 32c + 32) of a row, dequantized.
RQ_FN void k_chunk(const unsigned char* row, int c, float* out) {
#if K_BS == 32
#pragma unroll
    for (int e = 0; e < 8; e++) RQ_CAT(rq_dequantize4_, KFMT)(row + c * K_BB, 4 * e, out + 4 * e);
#else
#pragma unroll
    for (int e = 0; e < 32; e++) RQ_CAT(rq_dequantize_, KFMT)(row + (c * 32 + e) * K_BB, out + e);
#endif
}

// Values [i, i + 4) of a row (i a multiple of 4), dequantized.
RQ_FN void v_four(const unsigned char* row, int i, float* out) {
#if V_BS == 32
    RQ_CAT(rq_dequantize4_, VFMT)(row + (i / 32) * V_BB, i % 32, out);
#else
#pragma unroll
    for (int e = 0; e < 4; e++) RQ_CAT(rq_dequantize_, VFMT)(row + (i + e) * V_BB, out + e);
#endif
}

RQ_FN float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}

RQ_FN float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}

// A rotation applied to rows held in shared memory (the queries, the merged outputs): UNITS
// units of M segments of P = 2^log_p values each, `base` the M x M matrix's rows as sign bits
// (bit b of base[a] set: entry (a, b) is -1), optional signs, then the 1/sqrt(unit) scale.
// m = 0 means no rotation.
struct Rot {
    int log_p;
    int m;
    const unsigned long long* base;
    const float* signs;
    float scale;
};

// Rotates `rows` rows of `n` values at `x` (consecutive) in place: forward y = H (s . x), or
// inverse x = s . (H^T y). Every thread of the block calls it (it synchronizes).
RQ_FN void smem_rotate(float* x, int rows, int n, Rot r, int inverse) {
    if (r.m == 0) return;
    int p = 1 << r.log_p;
    int unit = r.m * p;
    int total = rows * n;
    if (r.signs && !inverse) {
        for (int i = threadIdx.x; i < total; i += blockDim.x) x[i] *= r.signs[i % n];
        __syncthreads();
    }
    // Butterflies by shifts and masks (p and h are powers of two).
    for (int log_h = 0; log_h < r.log_p; log_h++) {
        const unsigned int h = 1u << log_h;
        for (unsigned int k = threadIdx.x; k < (unsigned int)total / 2; k += blockDim.x) {
            const unsigned int seg = k >> (r.log_p - 1), j = k & ((unsigned int)p / 2 - 1);
            const unsigned int i = (seg << r.log_p) + ((j >> log_h) << (log_h + 1)) + (j & (h - 1));
            float a = x[i], b = x[i + h];
            x[i] = a + b;
            x[i + h] = a - b;
        }
        __syncthreads();
    }
    if (r.m > 1) {
        for (int k = threadIdx.x; k < total / r.m; k += blockDim.x) {
            float* u = x + (k / p) * unit + (k % p);
            float in[40];
            for (int b = 0; b < r.m; b++) in[b] = u[b * p];
            for (int a = 0; a < r.m; a++) {
                float y = 0.0f;
                for (int b = 0; b < r.m; b++) {
                    unsigned long long bits = inverse ? (r.base[b] >> a) : (r.base[a] >> b);
                    y = (bits & 1ull) ? y - in[b] : y + in[b];
                }
                u[a * p] = y;
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        float v = x[i] * r.scale;
        if (r.signs && inverse) v *= r.signs[i % n];
        x[i] = v;
    }
    __syncthreads();
}

// smem_rotate for rows of N values (a multiple of 32), each warp taking whole rows: a lane
// holds N / 32 consecutive values, the butterflies within them are in registers and the rest
// go across lanes with shuffles, so there is no block-wide barrier per stage (and the same sums
// in the same order as smem_rotate). Power-of-two transforms (m = 1) of rows whose share per
// lane is a power of two, so that segments start on lane boundaries; others go to smem_rotate.
// Every thread of the block calls it (it synchronizes).
template <int N>
RQ_FN void warp_rotate(float* x, int rows, Rot r, int inverse) {
    constexpr int V = N / 32;
    if (r.m != 1 || (V & (V - 1)) != 0) {
        smem_rotate(x, rows, N, r, inverse);
        return;
    }
    const int lane = threadIdx.x % 32, p = 1 << r.log_p;
    for (int row = threadIdx.x / 32; row < rows; row += blockDim.x / 32) {
        float* xr = x + row * N + lane * V;
        float v[V];
#pragma unroll
        for (int i = 0; i < V; i++) v[i] = xr[i];
        if (r.signs && !inverse)
#pragma unroll
            for (int i = 0; i < V; i++) v[i] *= r.signs[lane * V + i];
#pragma unroll
        for (int h = 1; h < V; h <<= 1) {
            if (h >= p) break;
#pragma unroll
            for (int i = 0; i < V; i++)
                if (!(i & h)) {
                    const float a = v[i], b = v[i + h];
                    v[i] = a + b;
                    v[i + h] = a - b;
                }
        }
        for (int lm = 1; lm < 32 && lm * V < p; lm <<= 1) {
            const bool upper = lane & lm; // this lane holds the pairs' second halves
#pragma unroll
            for (int i = 0; i < V; i++) {
                const float o = __shfl_xor_sync(FULL_MASK, v[i], lm);
                v[i] = upper ? o - v[i] : v[i] + o;
            }
        }
#pragma unroll
        for (int i = 0; i < V; i++) {
            float y = v[i] * r.scale;
            if (r.signs && inverse) y *= r.signs[lane * V + i];
            xr[i] = y;
        }
    }
    __syncthreads();
}

RQ_FN unsigned int smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

// Starts copying the rows of tokens [t0, t0 + n) of this warp's KV head into `stage`; lane i
// holds in `row` the cache row index of token t0 + i. Every lane of the warp calls it.
RQ_FN void stage_tile(unsigned int* stage, const unsigned char* kc, const unsigned char* vc,
                      long long row, int n, int lane) {
    unsigned int* vs = stage + 32 * K_STRIDE_W;
#if COPY4
    const int KW = K_ROW / 4, VW = V_ROW / 4;
    for (int first = 0; first < n * KW; first += 32) {
        int item = first + lane;
        bool active = item < n * KW;
        int i = active ? item / KW : 0, j = item % KW;
        long long r = __shfl_sync(FULL_MASK, row, i);
        if (active)
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                             smem_addr(stage + i * K_STRIDE_W + j)),
                         "l"(kc + r * K_ROW + 4 * j));
    }
    for (int first = 0; first < n * VW; first += 32) {
        int item = first + lane;
        bool active = item < n * VW;
        int i = active ? item / VW : 0, j = item % VW;
        long long r = __shfl_sync(FULL_MASK, row, i);
        if (active)
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                             smem_addr(vs + i * V_STRIDE_W + j)),
                         "l"(vc + r * V_ROW + 4 * j));
    }
#else
    const int KH = K_ROW / 2, VH = V_ROW / 2;
    for (int first = 0; first < n * KH; first += 32) {
        int item = first + lane;
        bool active = item < n * KH;
        int i = active ? item / KH : 0, j = item % KH;
        long long r = __shfl_sync(FULL_MASK, row, i);
        if (active)
            reinterpret_cast<unsigned short*>(stage + i * K_STRIDE_W)[j] =
                reinterpret_cast<const unsigned short*>(kc + r * K_ROW)[j];
    }
    for (int first = 0; first < n * VH; first += 32) {
        int item = first + lane;
        bool active = item < n * VH;
        int i = active ? item / VH : 0, j = item % VH;
        long long r = __shfl_sync(FULL_MASK, row, i);
        if (active)
            reinterpret_cast<unsigned short*>(vs + i * V_STRIDE_W)[j] =
                reinterpret_cast<const unsigned short*>(vc + r * V_ROW)[j];
    }
#endif
    asm volatile("cp.async.commit_group;\n" ::);
}

// Decode attention. Grid: (KV heads, splits, sequences); `q` is [sequences, G * n_heads, D],
// `lens[b]` the tokens in sequence b's cache and `pos[b]` its query's position. Split s covers
// tokens [s * split_tokens, (s + 1) * split_tokens) of the visible ones. Writes the partials
// `part` [sequences, G * n_heads, splits * WARPS, PART].
extern "C" __global__ void __launch_bounds__(THREADS) decode_attention(
    const elem_t* q, const unsigned char* kc, const unsigned char* vc, const unsigned int* table,
    long long table_stride, long long page_tokens, const long long* lens, const long long* pos,
    long long n_heads, int causal, long long window, float softcap, float score_scale,
    int q_log_p, int q_m, const unsigned long long* q_base, const float* q_signs, float q_scale,
    long long split_tokens, long long n_rows, float* part) {
    (void)n_rows; // one row per block here
    const Rot qrot = {q_log_p, q_m, q_base, q_signs, q_scale};
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4); // [G][D]
    const int head = blockIdx.x, split = blockIdx.y, seq = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_splits = gridDim.y;
    const long long h_q = n_heads * G;

    // The group's queries: rotated, then scaled.
    const elem_t* qg = q + ((long long)seq * h_q + (long long)head * G) * D;
    for (int i = threadIdx.x; i < G * D; i += THREADS) qs[i] = elem_to_f32(qg[i]);
    __syncthreads();
    smem_rotate(qs, G, D, qrot, 0);
    for (int i = threadIdx.x; i < G * D; i += THREADS) qs[i] *= score_scale;
    __syncthreads();

    // Visible tokens of this split.
    long long n = lens[seq], p = pos[seq];
    long long hi = causal ? (n < p + 1 ? n : p + 1) : n;
    long long lo = window > 0 ? (p + 1 - window > 0 ? p + 1 - window : 0) : 0;
    if (lo > hi) lo = hi;
    long long s_lo = lo + split * split_tokens, s_hi = s_lo + split_tokens;
    if (s_lo > hi) s_lo = hi;
    if (s_hi > hi) s_hi = hi;

    unsigned int* wbuf = reinterpret_cast<unsigned int*>(qs + G * D) + warp * WARP_W;
    float* ps = reinterpret_cast<float*>(wbuf + 2 * STAGE_W); // [32][G]

    float m[G], l[G];
    bool seen[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
        seen[g] = false;
    }
    float acc[G][4 * C4];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int e = 0; e < 4 * C4; e++) acc[g][e] = 0.0f;

    // This lane's set and first chunk of the weighted sum.
    const int set = NC4 >= 32 ? 0 : lane / NC4;
    const int chunk0 = NC4 >= 32 ? lane : lane % NC4;
    const bool sum_lane = set < SETS;

    // The cache row of token t (of this sequence and head).
    auto row_of = [&](long long t) -> long long {
        long long page = table ? (long long)table[seq * table_stride + t / page_tokens] : seq;
        return (page * page_tokens + t % page_tokens) * n_heads + head;
    };

    // Tiles of 32 tokens, dealt to warps in turn; two stages per warp.
    long long t0 = s_lo + 32LL * warp;
    int stage = 0;
    if (t0 < s_hi) {
        long long t = t0 + lane;
        int cnt = (int)(s_hi - t0 < 32 ? s_hi - t0 : 32);
        stage_tile(wbuf, kc, vc, t < s_hi ? row_of(t) : 0, cnt, lane);
    }
    for (; t0 < s_hi; t0 += 32LL * WARPS) {
        const int cnt = (int)(s_hi - t0 < 32 ? s_hi - t0 : 32);
        long long next = t0 + 32LL * WARPS;
        if (next < s_hi) {
            long long t = next + lane;
            int ncnt = (int)(s_hi - next < 32 ? s_hi - next : 32);
            stage_tile(wbuf + (stage ^ 1) * STAGE_W, kc, vc, t < s_hi ? row_of(t) : 0, ncnt, lane);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncwarp();
        const unsigned int* ks = wbuf + stage * STAGE_W;
        const unsigned int* vs = ks + 32 * K_STRIDE_W;

        // Scores of this lane's token.
        const bool valid = lane < cnt;
        float s[G];
#pragma unroll
        for (int g = 0; g < G; g++) s[g] = 0.0f;
        if (valid) {
            const unsigned char* krow = reinterpret_cast<const unsigned char*>(ks + lane * K_STRIDE_W);
            for (int c = 0; c < D / 32; c++) {
                float kv[32];
                k_chunk(krow, c, kv);
#pragma unroll
                for (int g = 0; g < G; g++) {
                    const float4* q4 = reinterpret_cast<const float4*>(qs + g * D + c * 32);
                    float a = s[g];
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        float4 qv = q4[e];
                        a = fmaf(qv.x, kv[4 * e], a);
                        a = fmaf(qv.y, kv[4 * e + 1], a);
                        a = fmaf(qv.z, kv[4 * e + 2], a);
                        a = fmaf(qv.w, kv[4 * e + 3], a);
                    }
                    s[g] = a;
                }
            }
            if (softcap > 0.0f) {
#pragma unroll
                for (int g = 0; g < G; g++) s[g] = softcap * tanhf(s[g] / softcap);
            }
        }

        // Online softmax per head over the tile.
        float corr[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            float tile_max = warp_max(valid ? s[g] : NEG_INF);
            bool any_nan = __any_sync(FULL_MASK, valid && isnan(s[g]));
            float m_new = fmaxf(m[g], tile_max);
            float pr;
            if (m_new == NEG_INF && !any_nan) {
                // Every visible score so far is -Inf: weight 0 (0 / 0 if it stays so).
                seen[g] = true;
                pr = 0.0f;
                corr[g] = 1.0f;
            } else {
                corr[g] = expf(m[g] - m_new);
                pr = valid ? expf(s[g] - m_new) : 0.0f;
                l[g] = l[g] * corr[g] + warp_sum(pr);
                m[g] = m_new;
            }
            ps[lane * G + g] = pr;
        }
        __syncwarp();

        // Weighted sum of V rows.
        if (sum_lane) {
#pragma unroll
            for (int g = 0; g < G; g++)
#pragma unroll
                for (int e = 0; e < 4 * C4; e++) acc[g][e] *= corr[g];
            for (int u = set; u < cnt; u += SETS) {
                const unsigned char* vrow =
                    reinterpret_cast<const unsigned char*>(vs + u * V_STRIDE_W);
                float w[G];
#pragma unroll
                for (int g = 0; g < G; g++) w[g] = ps[u * G + g];
#pragma unroll
                for (int k = 0; k < C4; k++) {
                    int ch = chunk0 + 32 * k;
                    if (ch < NC4) {
                        float v4[4];
                        v_four(vrow, 4 * ch, v4);
#pragma unroll
                        for (int g = 0; g < G; g++)
#pragma unroll
                            for (int e = 0; e < 4; e++)
                                acc[g][4 * k + e] = fmaf(w[g], v4[e], acc[g][4 * k + e]);
                    }
                }
            }
        }
        __syncwarp(); // the stage and the weights are rewritten next
        stage ^= 1;
    }

    // The sets' sums, into set 0.
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int e = 0; e < 4 * C4; e++) {
            float total = acc[g][e];
            for (int o = 1; o < SETS; o++)
                total += __shfl_sync(FULL_MASK, acc[g][e], (lane + o * NC4) & 31);
            acc[g][e] = total;
        }

    // This warp's partial of each query head of the group.
    const long long n_part = (long long)n_splits * WARPS;
    const long long slot = (long long)split * WARPS + warp;
    float* base = part + ((long long)seq * h_q + (long long)head * G) * n_part * PART;
    if (set == 0) {
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int k = 0; k < C4; k++) {
                int ch = chunk0 + 32 * k;
                if (ch < NC4) {
                    float* out = base + ((long long)g * n_part + slot) * PART + 4 * ch;
#pragma unroll
                    for (int e = 0; e < 4; e++) out[e] = acc[g][4 * k + e];
                }
            }
    }
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float* out = base + ((long long)g * n_part + slot) * PART + DV;
            out[0] = m[g];
            out[1] = l[g];
            out[2] = seen[g] ? 1.0f : 0.0f;
        }
    }
}

// Merges the `n_part` partials of each (sequence, query head): grid (query heads, sequences).
// A partial that saw no visible key adds nothing; with none at all the output is zeros; when
// the visible scores were all -Inf the output is NaN (the oracle's 0 / 0). The merged row is
// divided by l, rotated back by the V rotation and stored as elem_t.
extern "C" __global__ void decode_combine(const float* part, long long n_part, int v_log_p,
                                          int v_m, const unsigned long long* v_base,
                                          const float* v_signs, float v_scale, elem_t* out) {
    const Rot vrot = {v_log_p, v_m, v_base, v_signs, v_scale};
    extern __shared__ float4 smem4[];
    float* o = reinterpret_cast<float*>(smem4); // [DV]
    const long long row = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    const float* base = part + row * n_part * PART;
    float mx = NEG_INF;
    bool any = false;
    for (long long i = 0; i < n_part; i++) {
        const float* st = base + i * PART + DV;
        bool live = st[0] != NEG_INF || isnan(st[1]) || st[2] != 0.0f;
        if (live) {
            any = true;
            mx = fmaxf(mx, st[0]);
        }
    }
    for (int d = threadIdx.x; d < DV; d += blockDim.x) {
        float l = 0.0f, a = 0.0f;
        if (any) {
            for (long long i = 0; i < n_part; i++) {
                const float* pi = base + i * PART;
                bool live = pi[DV] != NEG_INF || isnan(pi[DV + 1]) || pi[DV + 2] != 0.0f;
                if (!live) continue;
                float w = expf(pi[DV] - mx);
                l += pi[DV + 1] * w;
                a += pi[d] * w;
            }
            a /= l;
        }
        o[d] = a;
    }
    __syncthreads();
    smem_rotate(o, 1, DV, vrot, 1);
    for (int d = threadIdx.x; d < DV; d += blockDim.x) out[row * DV + d] = f32_to_elem(o[d]);
}

#if MMA
// ---------------------------------------------------------------------------------------------
// The same decode attention on the tensor cores (mma.sync m16n8k16), for f16/bf16 queries and
// outputs and K/V formats whose values are scale x code (formats.cuh's rq_scale_* / rq_code_*).
// Per warp and tile of 32 tokens (two chunks of 16), with the group's query heads as the 8
// columns of the mma (two column tiles for groups of 9 to 16):
//   S^T = K Q^T: A = 16 tokens' K codes (exact in f16/bf16), B = the rotated, scaled queries
//     (held in registers for the whole cache); each 32-value group's f32 product is multiplied
//     by its token's scale. Tokens are the rows, so a thread's scores are of the tokens whose
//     codes it read and their scales are its own.
//   O^T += V^T P^T: A = 16 dimensions x 16 tokens of V codes, B = the weights times each
//     token's V scale (rounded to f16/bf16); the weights go from the score layout to the B
//     layout with movmatrix (an 8x8 transpose in registers).
// The dot products do not care in which order a group's dimensions are summed, so each format
// reads its codes in the order its bytes hold them (q4_0: the low and high nibbles of a word at
// once) and the queries are gathered to match; V's dimensions come out permuted the same way and
// are put back in place when the partial is stored. q4_0 and q8_0 codes become f16 (q4_0 also
// bf16) with the exponent-bias trick: a code c placed in the mantissa of 2^10 is 1024 + c, and
// one packed subtraction leaves c exactly.
// Raw K and V rows are staged per warp (per pair of warps with PAIR, below) with cp.async in
// the widest copies the row sizes allow; the rows of tokens past a sequence's end are filled
// with zeros (scale 0: no NaN from stale bytes). With PAIR (host-defined, 0 in the flash
// modules) a block takes two KV heads 2x and 2x + 1, whose rows of a token are adjacent: warps
// 2s and 2s + 1 take the same tiles (stream s), one head each, and share each staged tile of
// both heads' rows, the even warp copying the K rows and the odd one the V rows, 16 bytes at a
// time (q4_0's 72-byte rows alone allow 8-byte copies, twice as many); a barrier of the two
// warps per tile replaces the warp's own.
// P and Q are rounded to the element type once, as in flash attention; the softmax, the K
// scales and all sums are f32.

#if ELEM == 1
#define MMA_TYPE "f16.f16"
RQ_FN unsigned int pack2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
RQ_FN void unpack2(unsigned int x, float& lo, float& hi) {
    unsigned short a = (unsigned short)(x & 0xFFFFu), b = (unsigned short)(x >> 16);
    asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"(a));
    asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"(b));
}
// Codes minus the bias, exactly: x - b per half.
RQ_FN unsigned int unbias2(unsigned int x, unsigned int b) {
    unsigned int r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(b));
    return r;
}
#define MAGIC4 0x64006400u // 1024 in each half: a nibble n below it is 1024 + n
#define BIAS4 0x64086408u  // 1032: q4_0's code is n - 8
#define BIAS8 0x64806480u  // 1152: a byte b ^ 0x80 below 1024 is 1152 + b
// (x & mask) | MAGIC4 in one instruction (the compiler otherwise splits it in two).
template <unsigned int MASK>
RQ_FN unsigned int with_magic(unsigned int x) {
    unsigned int r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "n"(MASK), "r"(MAGIC4));
    return r;
}
// The q4_0 codes (n - 8) of the low and high nibbles of bytes 0 and 2 of x, as pairs: a high
// nibble kept in place is 1024 + 16n, and (1024 + 16n) / 16 - 72 = n - 8 exactly (one fma).
RQ_FN void nibbles4(unsigned int x, unsigned int& lo, unsigned int& hi) {
    lo = unbias2(with_magic<0x000F000Fu>(x), BIAS4);
    asm("fma.rn.f16x2 %0, %1, %2, %3;"
        : "=r"(hi)
        : "r"(with_magic<0x00F000F0u>(x)), "r"(0x2C002C00u), "r"(0xD480D480u));
}
// The q8_0 codes (signed bytes) of bytes 0, 1 and of bytes 2, 3 of w, as pairs: a byte b with
// its top bit flipped, in the mantissa of 1024, is 1152 + b.
RQ_FN void bytes4(unsigned int w, unsigned int& lo, unsigned int& hi) {
    w ^= 0x80808080u;
    lo = unbias2(__byte_perm(w, MAGIC4, 0x7170), BIAS8);
    hi = unbias2(__byte_perm(w, MAGIC4, 0x7372), BIAS8);
}
#else
#define MMA_TYPE "bf16.bf16"
RQ_FN unsigned int pack2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
RQ_FN void unpack2(unsigned int x, float& lo, float& hi) {
    lo = __uint_as_float(x << 16);
    hi = __uint_as_float(x & 0xFFFF0000u);
}
RQ_FN unsigned int unbias2(unsigned int x, unsigned int b) {
    unsigned int r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(0x3F803F80u), "r"(b ^ 0x80008000u));
    return r;
}
#define MAGIC4 0x43004300u // 128 in each half (bf16 has 7 mantissa bits: nibbles fit)
#define BIAS4 0x43084308u  // 136
// The q4_0 codes of the low and high nibbles of bytes 0 and 2 of x, as pairs (bf16's 7
// mantissa bits hold a nibble only at the bottom: the high one is shifted down).
RQ_FN void nibbles4(unsigned int x, unsigned int& lo, unsigned int& hi) {
    lo = unbias2((x & 0x000F000Fu) | MAGIC4, BIAS4);
    hi = unbias2(((x >> 4) & 0x000F000Fu) | MAGIC4, BIAS4);
}
#endif

// Extraction modes: 1 q4_0, 2 q8_0 (f16 only: a byte needs 8 mantissa bits), 0 the accessors.
#define KX (KFAST == 1 ? 1 : (KFAST == 2 && ELEM == 1) ? 2 : 0)
#define VX (VFAST == 1 ? 1 : (VFAST == 2 && ELEM == 1) ? 2 : 0)

// c += A B for one m16n8k16 tile (A row-major 16x16, B column-major 16x8, C 16x8 f32).
RQ_FN void mma_16816(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE
        ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The 8x8 16-bit matrix whose row gr, columns 2tq and 2tq + 1 this thread holds, transposed.
RQ_FN unsigned int transpose8(unsigned int x) {
    unsigned int r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}

#ifndef PAIR
#define PAIR 0
#endif
// KV heads per block, and streams of tiles per head (a pair's two warps share a stream).
#define HEADS (PAIR ? 2 : 1)
#define STREAMS (WARPS / HEADS)
// A staged row: the block's heads' rows of one token.
#define PK_ROW (HEADS * K_ROW)
#define PV_ROW (HEADS * V_ROW)
// (The host pairs only where this holds: the second head's rows then start 8-byte aligned, as
// the code-word loads assume.)
#if PAIR && (WARPS % 2 != 0 || PK_ROW % 16 != 0 || PV_ROW % 16 != 0)
#error "PAIR needs an even number of warps and pairs of rows that are whole 16-byte units"
#endif
// Bytes of one group of 32 values (one block, or 32 blocks of one value).
#define K_GB (K_BS == 32 ? K_BB : 32 * K_BB)
#define V_GB (V_BS == 32 ? V_BB : 32 * V_BB)
#define KB (D / 32)
#define VB (DV / 32)
// Columns of the mma: the group's query heads for each of the block's QR query rows.
#define NCOL (G * QR)
#define NH ((NCOL + 7) / 8)
// Staged rows: 16-byte aligned, an odd number of 16-byte units apart (fewer bank conflicts).
#define K_SB (16 * (((PK_ROW + 15) / 16) | 1))
#define V_SB (16 * (((PV_ROW + 15) / 16) | 1))
#define M_STAGES 2 // (the loop alternates between them: cur ^ 1)
static_assert(M_STAGES == 2, "the decode loop alternates between two stages");
// Blocks per multiprocessor to keep at least 16 warps resident (128 registers per thread),
// where that needs no spills: one column tile and head dimensions up to 128.
#define MINB ((NH == 1 && D <= 128 && DV <= 128 && WARPS <= 16) ? 16 / WARPS : 1)
#define M_STAGE (32 * (K_SB + V_SB))
// SPLITV (host-defined): a stream stages two tiles of K rows but one of V rows (three quarters
// of the staging memory where K and V rows are the same size, so more warps fit where the rows
// are long): the V rows of a tile are copied when the tile starts, after the last tile's
// weighted sum, and waited for before its own (one more barrier per tile).
#ifndef SPLITV
#define SPLITV 0
#endif
#define STREAM_BYTES (SPLITV ? 32 * (2 * K_SB + V_SB) : M_STAGES * M_STAGE)
// The widest copy both row sizes allow (the cache buffers are whole allocations, 256-aligned).
#define CW ((PK_ROW % 16 == 0 && PV_ROW % 16 == 0)   ? 16 \
            : (PK_ROW % 8 == 0 && PV_ROW % 8 == 0) ? 8  \
            : (PK_ROW % 4 == 0 && PV_ROW % 4 == 0) ? 4  \
                                                   : 2)

// One cp.async of N bytes; n < N bytes read, the rest zero-filled. With CG (16 bytes only) it
// bypasses L1: the flash kernel's tiles. The decode kernel's copies go through L1 (.ca) at
// every size. Measured with paired heads on q4_0 (4 warps, 8 splits): through L1 1,980-2,037
// GB/s against single heads' 1,662-1,726 in the same run; bypassing it 1,664-1,667 against
// 1,690-1,746. (Likely because its rows are not multiples of 32 bytes: the pieces of a row
// share sectors, and the one a later copy needs is then in L1 already.)
// The L2::128B hint has L2 fetch whole 128-byte lines: a warp's rows are short spans of
// a token's heads, and the neighbouring heads' blocks read the rest of the line (measured:
// 8-10% faster decode on q4_0).
#define L2PF ".L2::128B"
template <int N, bool CG = (N == 16)>
RQ_FN void cp_async(unsigned char* dst, const unsigned char* src, unsigned int n) {
    if constexpr (CG)
        asm volatile("cp.async.cg.shared.global" L2PF " [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                     "l"(src), "r"(n));
    else
        asm volatile("cp.async.ca.shared.global" L2PF " [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)),
                     "l"(src), "n"(N), "r"(n));
}
// The same, all N bytes read (no size operand, nothing to compute per copy).
template <int N, bool CG = (N == 16)>
RQ_FN void cp_async_all(unsigned char* dst, const unsigned char* src) {
    if constexpr (CG)
        asm volatile("cp.async.cg.shared.global" L2PF " [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
    else
        asm volatile("cp.async.ca.shared.global" L2PF " [%0], [%1], %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                     "n"(N));
}

// Starts copying one row per token of the tile (ROW bytes, CW at a time) into `dst`, rows SB
// bytes apart; rows of tokens from `cnt` on are zero-filled. Lane i holds in `row` the cache
// row of token i; when `linear` (warp-uniform), token i's row is `first + i * n_heads`, and no
// row needs to be passed between lanes. Pieces FROM.. of the rows: the lanes take P pieces (a
// power of two) of 32 / P rows per copy, so that each copy reads whole spans of rows; the
// remaining pieces follow the same way.
template <int ROW, int SB, int FROM>
RQ_FN void stage_rows(unsigned char* dst, const unsigned char* base, long long row,
                      long long first, long long n_heads, bool linear, int cnt, int lane) {
    constexpr int W = ROW / CW, LEFT = W - FROM;
    constexpr int P = LEFT >= 32 ? 32 : LEFT >= 16 ? 16 : LEFT >= 8 ? 8 : LEFT >= 4 ? 4 : LEFT >= 2 ? 2 : 1;
    constexpr int R = 32 / P;
    const int r0 = lane / P, piece = FROM + lane % P;
    unsigned char* d = dst + r0 * SB + piece * CW;
    if (linear) {
        // (The source advances by a constant; a whole tile, the usual case, needs no sizes.)
        const long long step = (long long)R * n_heads * ROW;
        const unsigned char* src = base + (first + r0 * n_heads) * ROW + piece * CW;
        if (cnt >= 32) {
#pragma unroll
            for (int it = 0; it < P; it++, src += step) cp_async_all<CW, false>(d + it * R * SB, src);
        } else {
#pragma unroll
            for (int it = 0; it < P; it++, src += step)
                cp_async<CW, false>(d + it * R * SB, src, it * R + r0 < cnt ? CW : 0);
        }
    } else {
        const unsigned long long mine =
            reinterpret_cast<unsigned long long>(base + (lane < cnt ? row : 0LL) * ROW);
#pragma unroll
        for (int it = 0; it < P; it++) {
            const unsigned long long src = __shfl_sync(FULL_MASK, mine, it * R + r0);
            cp_async<CW, false>(d + it * R * SB,
                                reinterpret_cast<const unsigned char*>(src) + piece * CW,
                                it * R + r0 < cnt ? CW : 0);
        }
    }
    if constexpr (FROM + P < W)
        stage_rows<ROW, SB, FROM + P>(dst, base, row, first, n_heads, linear, cnt, lane);
}

// Rows whose size is not a multiple of 4 bytes: 2-byte copies by the lanes (synchronous).
template <int ROW, int SB>
RQ_FN void stage_rows_2(unsigned char* dst, const unsigned char* base, long long row,
                        long long first, long long n_heads, bool linear, int cnt, int lane) {
    constexpr int W = ROW / 2;
    const long long mine_row = linear ? first + lane * n_heads : row;
    const unsigned long long mine =
        reinterpret_cast<unsigned long long>(base + (lane < cnt ? mine_row : 0LL) * ROW);
    for (int item = lane; item < 32 * W; item += 32) {
        const int i = item / W, j = item % W;
        const unsigned short* src =
            reinterpret_cast<const unsigned short*>(__shfl_sync(FULL_MASK, mine, i));
        reinterpret_cast<unsigned short*>(dst + i * SB)[j] = i < cnt ? src[j] : (unsigned short)0;
    }
}

// Copies a tile's staged rows (row indices in units of PK_ROW / PV_ROW): its K rows to `kd`
// where `do_k`, its V rows to `vd` where `do_v` (warp-uniform).
RQ_FN void stage_tile_mma(unsigned char* kd, unsigned char* vd, const unsigned char* kc,
                          const unsigned char* vc, long long row, long long first,
                          long long n_heads, bool linear, int cnt, int lane, bool do_k, bool do_v) {
#if CW >= 4
    if (do_k) stage_rows<PK_ROW, K_SB, 0>(kd, kc, row, first, n_heads, linear, cnt, lane);
    if (do_v) stage_rows<PV_ROW, V_SB, 0>(vd, vc, row, first, n_heads, linear, cnt, lane);
#else
    if (do_k) stage_rows_2<PK_ROW, K_SB>(kd, kc, row, first, n_heads, linear, cnt, lane);
    if (do_v) stage_rows_2<PV_ROW, V_SB>(vd, vc, row, first, n_heads, linear, cnt, lane);
#endif
}

// A 32-bit word at a 2-byte aligned address (`aligned`: known 4-byte aligned, a constant).
RQ_FN unsigned int ld_u32(const unsigned char* p, bool aligned) {
    if (aligned) return *reinterpret_cast<const unsigned int*>(p);
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    return __byte_perm(h[0], h[1], 0x5410);
}
RQ_FN unsigned int ld_u16(const unsigned char* p) {
    return *reinterpret_cast<const unsigned short*>(p);
}

// Which of a K group's dimensions the `e`th value (0, 1) of this thread's code pair `pr` (0..3)
// is: the query fragments are gathered in the same order.
RQ_FN int k_dim(int tq, int pr, int e) {
#if KX == 1
    return (pr >> 1) * 16 + 4 * tq + (pr & 1) + 2 * e;
#else
    return 8 * tq + 2 * pr + e;
#endif
}

// Which of a V group's dimensions row r (0..15) of its M-tile mt (0, 1) holds.
RQ_FN int v_dim(int mt, int r) {
#if VX == 1
    return 16 * mt + 2 * (r & 7) + (r >> 3);
#else
    return 4 * (r & 7) + 2 * mt + (r >> 3);
#endif
}

RQ_FN float k_scale(const unsigned char* grp) { return RQ_CAT(rq_scale_, KFMT)(grp); }
RQ_FN float v_scale(const unsigned char* grp) { return RQ_CAT(rq_scale_, VFMT)(grp); }

// This thread's four code pairs of one token's K group (`aligned`: its code bytes start 4-byte
// aligned, a constant of the group index).
RQ_FN void k_pairs(const unsigned char* grp, int tq, bool aligned, unsigned int* out) {
#if KX == 1
    const unsigned int x = ld_u32(grp + 2 + 4 * tq, aligned);
    nibbles4(x, out[0], out[2]);
    nibbles4(x >> 8, out[1], out[3]);
#elif KX == 2
    bytes4(ld_u32(grp + 2 + 8 * tq, aligned), out[0], out[1]);
    bytes4(ld_u32(grp + 6 + 8 * tq, aligned), out[2], out[3]);
#else
    (void)aligned;
#pragma unroll
    for (int pr = 0; pr < 4; pr++)
        out[pr] = pack2(RQ_CAT(rq_code_, KFMT)(grp, k_dim(tq, pr, 0)),
                        RQ_CAT(rq_code_, KFMT)(grp, k_dim(tq, pr, 1)));
#endif
}

// Two tokens' V codes (token a in the low halves) for this thread's rows: out = (M-tile 0,
// row gr), (0, gr + 8), (1, gr), (1, gr + 8).
RQ_FN void v_pairs(const unsigned char* ga, const unsigned char* gb, int gr, bool aligned,
                   unsigned int* out) {
#if VX == 1
    (void)aligned;
    const unsigned int y = __byte_perm(ld_u16(ga + 2 + 2 * gr), ld_u16(gb + 2 + 2 * gr), 0x5410);
    nibbles4(y, out[0], out[2]);
    nibbles4(y >> 8, out[1], out[3]);
#elif VX == 2
    // Interleave the two tokens' bytes: (a0, b0, a1, b1) and (a2, b2, a3, b3).
    const unsigned int wa = ld_u32(ga + 2 + 4 * gr, aligned), wb = ld_u32(gb + 2 + 4 * gr, aligned);
    bytes4(__byte_perm(wa, wb, 0x5140), out[0], out[1]);
    bytes4(__byte_perm(wa, wb, 0x7362), out[2], out[3]);
#else
    (void)aligned;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int j = v_dim(e >> 1, gr + 8 * (e & 1));
        out[e] = pack2(RQ_CAT(rq_code_, VFMT)(ga, j), RQ_CAT(rq_code_, VFMT)(gb, j));
    }
#endif
}

// Weights of two tokens (a low, b high) times their V scales.
RQ_FN unsigned int v_scaled(unsigned int p, const unsigned char* ga, const unsigned char* gb) {
#if VX != 0 && ELEM == 1
    unsigned int r, s = __byte_perm(ld_u16(ga), ld_u16(gb), 0x5410);
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(p), "r"(s));
    return r;
#else
    float lo, hi;
    unpack2(p, lo, hi);
    return pack2(lo * v_scale(ga), hi * v_scale(gb));
#endif
}

// e^x with the hardware's approximate exp2 (the tensor-core kernel rounds the weights to
// f16/bf16 anyway); e^-inf = 0.
RQ_FN float fast_exp(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
}

// 2^x with the hardware's approximate exp2; 2^-inf = 0.
RQ_FN float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Reductions over the eight threads that hold one query head's scores (lane bits 2 to 4).
RQ_FN float col_max(float x) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}
RQ_FN float col_sum(float x) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}

// The online softmax's starting state for R row (or column) tiles of a thread, two values
// each: max -Inf, sum 0, nothing seen, and N output fragments of four zeros per tile (the
// decode and the flash kernel).
template <int R, int N>
RQ_FN void softmax_start(float (&m)[R][2], float (&l)[R][2], bool (&seen)[R][2],
                         float (&o)[R][N][4]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            m[r][e] = NEG_INF;
            l[r][e] = 0.0f;
            seen[r][e] = false;
        }
#pragma unroll
        for (int n = 0; n < N; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[r][n][e] = 0.0f;
    }
}

// The barrier of the two warps of stream s (barrier s + 1; immediate ids, so that the kernel
// declares only the barriers it uses).
template <int N>
RQ_FN void pair_sync(int s) {
    if constexpr (N > 0) {
        if (s == N - 1)
            asm volatile("bar.sync %0, 64;\n" ::"n"(N));
        else
            pair_sync<N - 1>(s);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MINB) decode_attention_mma(
    const elem_t* q, const unsigned char* kc, const unsigned char* vc, const unsigned int* table,
    long long table_stride, long long page_tokens, const long long* lens, const long long* pos,
    long long n_heads, int causal, long long window, float softcap, float score_scale,
    int q_log_p, int q_m, const unsigned long long* q_base, const float* q_signs, float q_scale,
    long long split_tokens, long long n_rows, float* part) {
    const Rot qrot = {q_log_p, q_m, q_base, q_signs, q_scale};
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4); // [HEADS][NCOL][D]
    // Rows seq .. seq + QR - 1 (those below n_rows); with QR > 1 they share one cache (the
    // host's shared mode), read through row seq's table.
    const int split = blockIdx.y, seq = blockIdx.z * QR;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gr = lane >> 2, tq = lane & 3; // mma group (row) and thread in the group
    // This warp's KV head (its place `hh` among the block's heads) and its stream of tiles.
    const int hh = PAIR ? warp & 1 : 0, stream = PAIR ? warp >> 1 : warp;
    const int head = blockIdx.x * HEADS + hh;
    const int n_splits = gridDim.y;
    const long long h_q = n_heads * G;

    // Column c of head slot k is query head c % G of row seq + c / G, of KV head x·HEADS + k.
    for (int i = threadIdx.x; i < HEADS * NCOL * D; i += THREADS) {
        const int k = i / (NCOL * D), c = i / D % NCOL, r = seq + c / G;
        const long long qh = (long long)(blockIdx.x * HEADS + k) * G + c % G;
        qs[i] = r < n_rows ? elem_to_f32(q[((long long)r * h_q + qh) * D + i % D]) : 0.0f;
    }
    __syncthreads();
    smem_rotate(qs, HEADS * NCOL, D, qrot, 0);
    for (int i = threadIdx.x; i < HEADS * NCOL * D; i += THREADS) qs[i] *= score_scale;
    __syncthreads();

    // Q^T as B fragments: column gr is query head 8h + gr (zero past G); the rows are this
    // thread's code pairs' dimensions (k_dim) of each group.
    unsigned int qb[NH][KB][4];
#pragma unroll
    for (int h = 0; h < NH; h++) {
        const int hd = 8 * h + gr;
        const float* qr = qs + (hh * NCOL + (hd < NCOL ? hd : 0)) * D;
#pragma unroll
        for (int b = 0; b < KB; b++)
#pragma unroll
            for (int pr = 0; pr < 4; pr++)
                qb[h][b][pr] = hd < NCOL ? pack2(qr[32 * b + k_dim(tq, pr, 0)],
                                              qr[32 * b + k_dim(tq, pr, 1)])
                                      : 0u;
    }

    // Visible tokens [lo, hi) of a row; the block covers the union of its rows' ranges.
    auto visible = [&](int r, long long& lo, long long& hi) {
        const long long n = lens[r], p = pos[r];
        hi = causal ? (n < p + 1 ? n : p + 1) : n;
        lo = window > 0 ? (p + 1 - window > 0 ? p + 1 - window : 0) : 0;
        if (lo > hi) lo = hi;
    };
    long long lo, hi;
    visible(seq, lo, hi);
#pragma unroll
    for (int r = 1; r < QR; r++) {
        if (seq + r >= n_rows) break;
        long long l2, h2;
        visible(seq + r, l2, h2);
        if (h2 > l2) {
            lo = hi > lo ? (l2 < lo ? l2 : lo) : l2;
            hi = h2 > hi ? h2 : hi;
        }
    }
    long long s_lo = lo + split * split_tokens, s_hi = s_lo + split_tokens;
    if (s_lo > hi) s_lo = hi;
    if (s_hi > hi) s_hi = hi;
    // This split's part of each of this thread's columns' ranges (empty past NCOL or n_rows).
    // (`c_live`: a real column; padding columns' results are never stored.)
    long long c_lo[NH][2], c_hi[NH][2];
    bool c_live[NH][2];
#pragma unroll
    for (int h = 0; h < NH; h++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int col = 8 * h + 2 * tq + e, r = seq + col / G;
            long long l2 = 0, h2 = 0;
            c_live[h][e] = col < NCOL && r < n_rows;
            if (c_live[h][e]) visible(r, l2, h2);
            c_lo[h][e] = l2 > s_lo ? l2 : s_lo;
            c_hi[h][e] = h2 < s_hi ? h2 : s_hi;
        }

    // The stream's stages (shared by the warps of a pair).
    unsigned char* wbuf =
        reinterpret_cast<unsigned char*>(qs + HEADS * NCOL * D) + stream * STREAM_BYTES;

    // Softmax state of this thread's query heads 8h + 2tq + e.
    float m[NH][2], l[NH][2];
    bool seen[NH][2];
    // O^T: M-tile mt (dimensions of group mt / 2, v_dim) x this thread's heads.
    float o[NH][2 * VB][4];
    softmax_start(m, l, seen, o);

    // The staged row of token t: the cache row of the block's first head, in units of the
    // staged rows (HEADS rows of the cache; the host checked that a contiguous sequence's tokens
    // are below its capacity, and that token positions and pages fit 32 bits).
    const long long s_heads = n_heads / HEADS, s_head = blockIdx.x;
    auto row_of = [&](long long t) -> long long {
        if (!table) return ((long long)seq * page_tokens + t) * s_heads + s_head;
        const unsigned int tt = (unsigned int)t, pt = (unsigned int)page_tokens;
        const long long page = (long long)table[seq * table_stride + tt / pt];
        return (page * page_tokens + tt % pt) * s_heads + s_head;
    };
    // Starts copying tile t0's K rows to `kd` (where do_k) and V rows to `vd` (where do_v):
    // one commit group. With PAIR the even warp copies K, the odd one V.
    auto stage = [&](unsigned char* kd, unsigned char* vd, long long t0, bool do_k, bool do_v) {
        if (t0 < s_hi) {
            const int cnt = (int)(s_hi - t0 < 32 ? s_hi - t0 : 32);
            // The tile's rows are evenly spaced unless it spans two pages.
            const bool linear =
                !table || (unsigned int)t0 % (unsigned int)page_tokens + cnt <= page_tokens;
            const long long first = row_of(t0);
            const long long row = !linear && lane < cnt ? row_of(t0 + lane) : first;
            stage_tile_mma(kd, vd, kc, vc, row, first, s_heads, linear, cnt, lane,
                           do_k && (!PAIR || hh == 0), do_v && (!PAIR || hh == 1));
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    // The stream's other warp (PAIR), or this warp's lanes.
    auto sync = [&]() {
        if constexpr (PAIR)
            pair_sync<STREAMS>(stream);
        else
            __syncwarp();
    };
    // Stage s's K rows, and V rows (SPLITV: the one V stage).
    auto k_stage = [&](int s) { return wbuf + s * (SPLITV ? 32 * K_SB : M_STAGE); };
    auto v_stage = [&](int s) { return SPLITV ? wbuf + 2 * 32 * K_SB : k_stage(s) + 32 * K_SB; };

    // Each iteration waits for its tile's copies and for the stream's other warp (its copies,
    // and its reads of the stages refilled next), then starts the next tile's copy (SPLITV:
    // this tile's V rows and the next tile's K rows).
    const long long step = 32LL * STREAMS;
    const long long first = s_lo + 32LL * stream;
    stage(k_stage(0), v_stage(0), first, true, !SPLITV);
    int cur = 0;
    for (long long t0 = first; t0 < s_hi; t0 += step) {
        asm volatile("cp.async.wait_group 0;\n" ::);
        sync();
        if (SPLITV) stage(nullptr, v_stage(0), t0, false, true);
        stage(k_stage(cur ^ 1), v_stage(cur ^ 1), t0 + step, true, !SPLITV);
        const int cnt = (int)(s_hi - t0 < 32 ? s_hi - t0 : 32);
        const unsigned char* ks = k_stage(cur) + hh * K_ROW;
        const unsigned char* vs = v_stage(cur) + hh * V_ROW;

        // Scores: st[h][c] holds tokens 16c + gr (0, 1) and 16c + gr + 8 (2, 3) for heads
        // 8h + 2tq (0, 2) and 8h + 2tq + 1 (1, 3).
        float st[NH][2][4];
#pragma unroll
        for (int h = 0; h < NH; h++)
#pragma unroll
            for (int c = 0; c < 2; c++)
#pragma unroll
                for (int e = 0; e < 4; e++) st[h][c][e] = 0.0f;
#pragma unroll
        for (int c = 0; c < 2; c++) {
            if (16 * c >= cnt) continue; // warp-uniform
            const unsigned char* r0 = ks + (16 * c + gr) * K_SB;
            const unsigned char* r1 = r0 + 8 * K_SB;
#pragma unroll
            for (int b = 0; b < KB; b++) {
                const bool aligned = (b * K_GB + 2) % 4 == 0;
                unsigned int x0[4], x1[4];
                k_pairs(r0 + b * K_GB, tq, aligned, x0);
                k_pairs(r1 + b * K_GB, tq, aligned, x1);
                const float d0 = k_scale(r0 + b * K_GB), d1 = k_scale(r1 + b * K_GB);
                const unsigned int a0[4] = {x0[0], x1[0], x0[1], x1[1]};
                const unsigned int a1[4] = {x0[2], x1[2], x0[3], x1[3]};
#pragma unroll
                for (int h = 0; h < NH; h++) {
                    float cb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    mma_16816(cb, a0, qb[h][b][0], qb[h][b][1]);
                    mma_16816(cb, a1, qb[h][b][2], qb[h][b][3]);
                    st[h][c][0] = fmaf(d0, cb[0], st[h][c][0]);
                    st[h][c][1] = fmaf(d0, cb[1], st[h][c][1]);
                    st[h][c][2] = fmaf(d1, cb[2], st[h][c][2]);
                    st[h][c][3] = fmaf(d1, cb[3], st[h][c][3]);
                }
            }
        }

        // Online softmax per head; the eight threads of a column hold its 32 scores. A tile
        // inside every live column's range (most of them) needs no masks. (The soft-cap is
        // one loop of its own: per score, its test would be a branch.)
        if (softcap > 0.0f)
#pragma unroll
            for (int h = 0; h < NH; h++)
#pragma unroll
                for (int c = 0; c < 2; c++)
#pragma unroll
                    for (int e = 0; e < 4; e++) st[h][c][e] = softcap * tanhf(st[h][c][e] / softcap);
        bool full = true;
#pragma unroll
        for (int h = 0; h < NH; h++)
#pragma unroll
            for (int e = 0; e < 2; e++)
                full = full && (!c_live[h][e] || (c_lo[h][e] <= t0 && t0 + 32 <= c_hi[h][e]));
        full = __all_sync(FULL_MASK, full);
        unsigned int pb[NH][2][2];
#pragma unroll
        for (int h = 0; h < NH; h++) {
            float corr[2];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                // The column's range in tile offsets (0..32), so the masks compare 32-bit ints.
                int lo_t = 0, hi_t = 32;
                if (!full) {
                    const long long rl = c_lo[h][e] - t0, rh = c_hi[h][e] - t0;
                    lo_t = (int)(rl < 0 ? 0 : rl > 32 ? 32 : rl);
                    hi_t = (int)(rh < 0 ? 0 : rh > 32 ? 32 : rh);
                }
                float tmax = NEG_INF;
                if (full) {
#pragma unroll
                    for (int c = 0; c < 2; c++)
#pragma unroll
                        for (int u = 0; u < 2; u++) {
                            tmax = fmaxf(tmax, st[h][c][2 * u + e]);
                        }
                } else {
#pragma unroll
                    for (int c = 0; c < 2; c++)
#pragma unroll
                        for (int u = 0; u < 2; u++) {
                            const int t = 16 * c + gr + 8 * u;
                            const float x = t >= lo_t && t < hi_t ? st[h][c][2 * u + e] : NEG_INF;
                            st[h][c][2 * u + e] = x;
                            tmax = fmaxf(tmax, x);
                        }
                }
                tmax = col_max(tmax);
                const float m_new = fmaxf(m[h][e], tmax);
                // Every score so far -Inf (or none visible in this tile), or a NaN among them?
                // Rare: only then are the column's threads asked. `all_inf`: the tile adds
                // nothing; it counts as seen when the column had visible keys in it.
                bool all_inf = false;
                if (__any_sync(FULL_MASK, m_new == NEG_INF)) {
                    float nan = 0.0f, any = 0.0f;
#pragma unroll
                    for (int c = 0; c < 2; c++)
#pragma unroll
                        for (int u = 0; u < 2; u++) {
                            const int t = 16 * c + gr + 8 * u;
                            nan = isnan(st[h][c][2 * u + e]) ? 1.0f : nan;
                            any = t >= lo_t && t < hi_t ? 1.0f : any;
                        }
                    const bool none_nan = col_max(nan) == 0.0f;
                    const bool any_visible = col_max(any) > 0.0f;
                    all_inf = m_new == NEG_INF && none_nan;
                    if (all_inf && any_visible) seen[h][e] = true;
                }
                corr[e] = all_inf ? 1.0f : fast_exp(m[h][e] - m_new);
                // One loop for full and masked tiles: masked scores are -Inf by now, so their
                // weights are e^-Inf = 0; with every score -Inf (all_inf) each weight is
                // e^(-Inf - 0) = 0, with no test per score.
                float sum = 0.0f;
                const float m_use = all_inf ? 0.0f : m_new;
#pragma unroll
                for (int c = 0; c < 2; c++)
#pragma unroll
                    for (int u = 0; u < 2; u++) {
                        const float pr = fast_exp(st[h][c][2 * u + e] - m_use);
                        st[h][c][2 * u + e] = pr;
                        sum += pr;
                    }
                // l is this thread's share of the column's sum (summed over the column at
                // the end): every thread of a column applies the same corrections.
                if (!all_inf) {
                    l[h][e] = l[h][e] * corr[e] + sum;
                    m[h][e] = m_new;
                }
            }
            // (most tiles leave the maxima as they were: then nothing to rescale)
            if (__any_sync(FULL_MASK, corr[0] != 1.0f || corr[1] != 1.0f))
#pragma unroll
            for (int i = 0; i < 2 * VB; i++) {
                o[h][i][0] *= corr[0];
                o[h][i][1] *= corr[1];
                o[h][i][2] *= corr[0];
                o[h][i][3] *= corr[1];
            }
            // P^T as B fragments: column gr is head 8h + gr, rows tokens 2tq (+1, +8, +9).
#pragma unroll
            for (int c = 0; c < 2; c++) {
                pb[h][c][0] = transpose8(pack2(st[h][c][0], st[h][c][1]));
                pb[h][c][1] = transpose8(pack2(st[h][c][2], st[h][c][3]));
            }
        }

        if (SPLITV) {
            // (This tile's V rows: all but the newest group, the next tile's K rows.)
            asm volatile("cp.async.wait_group 1;\n" ::);
            sync();
        }
        // O^T += V^T P^T, 16 tokens at a time: this thread's V codes are of tokens 16c + 2tq
        // (+1) and 16c + 2tq + 8 (+9).
#pragma unroll
        for (int c = 0; c < 2; c++) {
            if (16 * c >= cnt) continue; // warp-uniform
            const unsigned char* va = vs + (16 * c + 2 * tq) * V_SB;
            const unsigned char* vb = va + 8 * V_SB;
#pragma unroll
            for (int b = 0; b < VB; b++) {
                const bool aligned = (b * V_GB + 2) % 4 == 0;
                const int off = b * V_GB;
                unsigned int ra[4], rb[4];
                v_pairs(va + off, va + V_SB + off, gr, aligned, ra);
                v_pairs(vb + off, vb + V_SB + off, gr, aligned, rb);
                const unsigned int a0[4] = {ra[0], ra[1], rb[0], rb[1]};
                const unsigned int a1[4] = {ra[2], ra[3], rb[2], rb[3]};
#pragma unroll
                for (int h = 0; h < NH; h++) {
                    const unsigned int b0 = v_scaled(pb[h][c][0], va + off, va + V_SB + off);
                    const unsigned int b1 = v_scaled(pb[h][c][1], vb + off, vb + V_SB + off);
                    mma_16816(o[h][2 * b], a0, b0, b1);
                    mma_16816(o[h][2 * b + 1], a1, b0, b1);
                }
            }
        }
        cur ^= 1;
    }
    asm volatile("cp.async.wait_group 0;\n" ::);

    float l_col[NH][2];
#pragma unroll
    for (int h = 0; h < NH; h++)
#pragma unroll
        for (int e = 0; e < 2; e++) l_col[h][e] = col_sum(l[h][e]);

    // This warp's partial of each of this thread's query heads, dimensions back in place.
    const long long n_part = (long long)n_splits * STREAMS;
    const long long slot = (long long)split * STREAMS + stream;
#pragma unroll
    for (int h = 0; h < NH; h++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int col = 8 * h + 2 * tq + e, r = seq + col / G;
            if (col >= NCOL || r >= n_rows) continue;
            float* out = part + (((long long)r * h_q + (long long)head * G + col % G) * n_part + slot) * PART;
#pragma unroll
            for (int i = 0; i < 2 * VB; i++) {
                out[32 * (i >> 1) + v_dim(i & 1, gr)] = o[h][i][e];
                out[32 * (i >> 1) + v_dim(i & 1, gr + 8)] = o[h][i][2 + e];
            }
            if (gr == 0) {
                out[DV] = m[h][e];
                out[DV + 1] = l_col[h][e];
                out[DV + 2] = seen[h][e] ? 1.0f : 0.0f;
            }
        }
}
#ifndef FLASH
#define FLASH 0
#endif
#if FLASH
// ---------------------------------------------------------------------------------------------
// Prefill flash attention on the tensor cores: many query rows of one sequence against its
// cache (contiguous, or paged through `table`). A thread block takes BM = 16 · WARPS rows of one
// KV head, a row being one (query position, query head of the group) pair, so the group's heads
// share every K/V load; each warp owns 16 of the rows. The block walks the visible tokens in
// tiles of BN:
//   - the block's threads copy the tile's raw K and V rows into shared memory with cp.async
//     (the next tile's copy in flight while the block works on this one);
//   - they turn the raw rows into codes (f16/bf16, exact) and scales, once for the whole block:
//     K codes [BN][D], V codes [BN][DV], K scales (f32) and V scales;
//   - each warp computes S = Q K^T for its rows (A: the rotated, scaled queries, held in
//     registers; B: K codes read with ldmatrix), multiplying each 32-dimension group's f32
//     product by its token's K scale, then an online softmax per row, then O += P V with the V
//     scale of each 32-dimension group folded into P (B: V codes read with ldmatrix.trans).
// With WS (below), the copies and the conversion are a producer warpgroup's, into two code
// buffers taken in turn, while the other warps only compute.
// The output rows are divided by l, rotated back (V rotation) in shared memory and stored.
// The numerics are the decode tensor-core kernel's: Q and P rounded to the element type once,
// codes exact, scales and sums in f32. A non-finite V value (an Inf scale, an f16 row's Inf or
// NaN) would poison, through 0 · Inf in the mma, rows for which its token is masked: such tokens'
// codes are zeroed for the mma and their values added to the rows that see them in f32.

#ifndef MT
#define MT 1
#endif
// WS 1: warp-specialized blocks (sm_90a): WARPS consumer warps compute, and a producer
// warpgroup of P_THREADS threads copies and converts the tiles into two code buffers, the
// roles meeting at named barriers; `setmaxnreg` moves registers from the producers (which
// need few) to the consumers (two m-tiles of scores and outputs each).
#ifndef WS
#define WS 0
#endif
#if WS
#define P_THREADS 128
#else
#define P_THREADS 0
#endif
#define ALL_THREADS (THREADS + P_THREADS)
// Rows per warp: MT m-tiles of 16, so that each K/V fragment read from shared memory feeds MT
// products (and a block's tile conversion serves 16 · MT · WARPS rows).
#define WR (16 * MT)
#define BM (WR * WARPS)
// Raw rows: an odd number of 8-byte units apart (16-byte units for 16-byte copies), so that
// lanes reading the same word of consecutive rows meet at most two to a bank.
#define F_KSB (CW >= 16 ? K_SB : 8 * (((K_ROW + 7) / 8) | 1))
#define F_VSB (CW >= 16 ? V_SB : 8 * (((V_ROW + 7) / 8) | 1))
#define F_STAGE (BN * (F_KSB + F_VSB))
// Code rows: D + 8 values apart, an odd number of 16-byte units (conflict-free ldmatrix).
#define KCS (D + 8)
#define VCS (DV + 8)
// Buffers of codes (and their scales and flags): one, or two with a producer warpgroup (WS)
// filling one while the other is read.
#define F_NCB (WS ? 2 : 1)
#define F_CBUF (2 * BN * (KCS + VCS))
#define F_CODES (2 * F_STAGE)
#define F_KSC (F_CODES + F_NCB * F_CBUF)
#define F_KSCB (4 * BN * KB)
#define F_VSC (F_KSC + F_NCB * F_KSCB)
#if ELEM == 1
#define VSC_BYTES 2
#else
#define VSC_BYTES 4
#endif
#define F_VSCB (VSC_BYTES * BN * VB)
// Per buffer, a word of bad-V token bits per converting warp (and with WS, the wild flag).
#define F_BAD (F_VSC + F_NCB * F_VSCB)
#define F_NBW (WS ? P_THREADS / 32 : WARPS)
#define F_TILES (F_BAD + F_NCB * 8 * F_NBW + (WS ? 8 : 0))
// The queries (before the loop) and the outputs (after it) reuse the tiles' space.
#define F_ROWS (4 * BM * (D > DV ? D : DV))
// Blocks of 8 warps (and blocks of two m-tiles per warp) keep the queries in shared memory as
// the element type (rows of D + 8, read with ldmatrix at each tile), after the tiles, and take
// 128 registers per thread, for two blocks (16 warps) per multiprocessor; blocks of 4 warps and
// one m-tile hold them in registers. Measured on an H100, 8k tokens causal, q8_0: 8 warps x
// tiles of 64 this way 188-191 TFLOP/s; 4 warps 149-157; two m-tiles 154-158; 8 warps with
// 255 registers and one block per multiprocessor 148. Warp-specialized blocks (one per
// multiprocessor, 232 registers per computing thread) keep them in shared memory too.
#define F_QSMEM (WARPS >= 8 || MT >= 2 || WS)
// (16-byte aligned: the queries are stored and read 16 bytes at a time.)
#define F_QS (((F_TILES > F_ROWS ? F_TILES : F_ROWS) + 15) / 16 * 16)
#define F_SMEM (F_QS + (F_QSMEM ? 2 * BM * KCS : 0))
// Enough blocks per multiprocessor for 12 or 16 warps where the registers allow it; two
// m-tiles per warp hold twice the scores and outputs (up to 255 registers). Warp-specialized
// blocks: one of 12 warps, 168 registers each at the launch (see REGS_ALL).
#define F_MINB (WS || D > 128 || DV > 128 ? 1 : MT >= 2 ? (WARPS >= 8 ? 1 : 2) : WARPS == 4 ? 3 : WARPS >= 8 ? 2 : 1)

// ldmatrix x4 (and transposed) at a shared-memory address.
RQ_FN void ldsm_x4(unsigned int* r, unsigned int a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
RQ_FN void ldsm_x4_t(unsigned int* r, unsigned int a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// Copies the raw rows of tokens [t0, t0 + BN) (ROW bytes each, rows SB apart) into `dst`, all
// threads taking CW-byte pieces; rows of tokens from `hi` on are zero-filled.
template <int ROW, int SB, int NT>
RQ_FN void flash_stage_rows(unsigned char* dst, const unsigned char* base, const unsigned int* table,
                            long long page_tokens, long long n_heads, int head, long long t0,
                            long long hi, unsigned int tid) {
    constexpr unsigned int W = ROW / CW;
    const unsigned int cnt = hi - t0 < BN ? (unsigned int)(hi - t0) : BN;
#if CW >= 4
    if constexpr (W <= NT) {
        // Each thread keeps one piece of a row and steps R rows at a time: the addresses
        // advance by constants (no division or page lookup per piece without a table).
        constexpr unsigned int R = NT / W;
        if (tid >= R * W) return; // (a few threads idle)
        const unsigned int tok0 = tid / W, piece = tid - tok0 * W;
        unsigned char* d = dst + tok0 * SB + piece * CW;
        if (!table) {
            // The tile's first row, then 32-bit offsets (the host checked that BN rows of all
            // heads span less than 4 GiB); a whole tile (the usual case) needs no sizes.
            const unsigned char* tile = base + (t0 * n_heads + head) * ROW;
            const unsigned int stride = (unsigned int)n_heads * ROW;
            unsigned int so = tok0 * stride + piece * CW;
            if (cnt == BN) {
#pragma unroll
                for (unsigned int i = 0; i < (BN + R - 1) / R; i++, so += R * stride, d += R * SB)
                    if (tok0 + i * R < BN) cp_async_all<CW>(d, tile + so);
            } else {
#pragma unroll
                for (unsigned int i = 0; i < (BN + R - 1) / R; i++, so += R * stride, d += R * SB) {
                    const unsigned int tok = tok0 + i * R;
                    if (tok < BN) cp_async<CW>(d, tile + (tok < cnt ? so : 0u), tok < cnt ? CW : 0);
                }
            }
        } else {
#pragma unroll 2
            for (unsigned int tok = tok0; tok < BN; tok += R, d += R * SB) {
                const long long t = tok < cnt ? t0 + tok : t0;
                const long long slot = (long long)table[t / page_tokens] * page_tokens + t % page_tokens;
                cp_async<CW>(d, base + (slot * n_heads + head) * ROW + piece * CW, tok < cnt ? CW : 0);
            }
        }
    } else
#endif
    for (unsigned int p = tid; p < BN * W; p += NT) {
        const unsigned int tok = p / W, piece = p - tok * W;
        const bool live = tok < cnt;
        const long long t = live ? t0 + tok : t0;
        const long long slot =
            table ? (long long)table[t / page_tokens] * page_tokens + t % page_tokens : t;
        const unsigned char* src = base + (slot * n_heads + head) * ROW;
        unsigned char* d = dst + tok * SB + piece * CW;
#if CW >= 4
        cp_async<CW>(d, src + piece * CW, live ? CW : 0);
#else
        *reinterpret_cast<unsigned short*>(d) =
            live ? reinterpret_cast<const unsigned short*>(src)[piece] : (unsigned short)0;
#endif
    }
}

// Word w (0, 1, ...) of the code bytes that start 2 bytes into `grp` (2-byte aligned): aligned
// loads only, each word put together from two by a byte permutation whose selector says
// whether the codes are 4-byte aligned (the same instructions either way; the word after the
// codes is read too, and ignored when they are aligned).
struct CodeWords {
    const unsigned int* base;
    unsigned int sel, prev;
    RQ_FN CodeWords(const unsigned char* g, bool codes_aligned)
        : base(reinterpret_cast<const unsigned int*>(codes_aligned ? g + 2 : g)),
          sel(codes_aligned ? 0x3210u : 0x5432u), prev(base[0]) {}
    RQ_FN unsigned int next(int w) {
        const unsigned int nx = base[w + 1];
        const unsigned int r = __byte_perm(prev, nx, sel);
        prev = nx;
        return r;
    }
};

// The 32 codes of one group as 16 pairs, in order (pair i = values 2i, 2i + 1); `bad` is set
// when a code is not finite (only the f16 format's can be).
template <int X, int FMT_K>
RQ_FN void group_codes(const unsigned char* grp, bool aligned, unsigned int* pairs, bool& bad) {
    if constexpr (X == 1) {
        // q4_0: byte j holds values j (low nibble) and j + 16 (high).
        CodeWords cw(grp, aligned);
#pragma unroll
        for (int w = 0; w < 4; w++) {
            const unsigned int x = __byte_perm(cw.next(w), 0, 0x3120);
            nibbles4(x, pairs[2 * w], pairs[8 + 2 * w]);
            nibbles4(x >> 8, pairs[2 * w + 1], pairs[8 + 2 * w + 1]);
        }
    } else if constexpr (X == 2) {
#if ELEM == 1
        CodeWords cw(grp, aligned);
#pragma unroll
        for (int w = 0; w < 8; w++) bytes4(cw.next(w), pairs[2 * w], pairs[2 * w + 1]);
#endif
    } else {
        (void)aligned;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            float a, b;
            if constexpr (FMT_K) {
                a = RQ_CAT(rq_code_, KFMT)(grp, 2 * i);
                b = RQ_CAT(rq_code_, KFMT)(grp, 2 * i + 1);
            } else {
                a = RQ_CAT(rq_code_, VFMT)(grp, 2 * i);
                b = RQ_CAT(rq_code_, VFMT)(grp, 2 * i + 1);
            }
            bad = bad || !rq_is_finite(a) || !rq_is_finite(b);
            pairs[i] = pack2(a, b);
        }
    }
}

// Whether a value's rounding to the element type loses more than that rounding's relative
// error: outside f16's normal range (or not finite) for f16, not finite for bf16.
RQ_FN bool off_range(float v) {
#if ELEM == 1
    const float a = fabsf(v);
    return !(a <= 65504.0f) || (a != 0.0f && a < 6.103515625e-05f);
#else
    return !rq_is_finite(v);
#endif
}

// One group's 32 values as 16 element pairs: codes (exact) when !VALUES, else scale · code
// rounded once. `bad`: a code is not finite; `wild`: a finite value (K: any value) that the
// element type does not hold to its precision (`off_range`), so the tile takes codes instead.
template <int X, int IS_K, bool VALUES>
RQ_FN void group_pairs(const unsigned char* grp, bool aligned, float d, unsigned int* pairs, bool& bad,
                       bool& wild) {
    group_codes<X, IS_K>(grp, aligned, pairs, bad);
    if constexpr (VALUES) {
#if ELEM == 1
        if constexpr (X != 0) {
            // Codes of at most 8 (q4_0) or 128 (q8_0) in magnitude, an f16 scale.
            const float a = fabsf(d);
            const bool in = d == 0.0f || (a >= 6.103515625e-05f && a <= (X == 1 ? 8188.0f : 511.0f));
            wild = wild || ((IS_K || rq_is_finite(d)) && !in);
            const unsigned int d2 = pack2(d, d);
#pragma unroll
            for (int i = 0; i < 16; i++) asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(pairs[i]) : "r"(pairs[i]), "r"(d2));
        } else
#endif
        {
#pragma unroll
            for (int i = 0; i < 16; i++) {
                float a, b;
                unpack2(pairs[i], a, b);
                const float va = a * d, vb = b * d;
                const bool inputs = IS_K || (rq_is_finite(d) && rq_is_finite(a) && rq_is_finite(b));
                wild = wild || (inputs && (off_range(va) || off_range(vb)));
                pairs[i] = pack2(va, vb);
            }
        }
    }
}

// The tile's raw rows (`raw`) as K and V values (VALUES) or codes and scales, a (token,
// 32-value group) per step, the lanes of a warp on one group of consecutive tokens (so the
// group's alignment, and the code path, is the same for the whole warp); V groups that are not finite are zeroed and their tokens' bits set
// in `mine`.
template <bool VALUES, int NT>
RQ_FN void flash_extract(const unsigned char* raw, unsigned char* sm, int buf, unsigned long long& mine,
                         bool& wild, int tid) {
    elem_t* kcodes = reinterpret_cast<elem_t*>(sm + F_CODES + buf * F_CBUF);
    elem_t* vcodes = kcodes + BN * KCS;
    for (int u = tid; u < BN * KB; u += NT) {
        const int tok = u % BN, b = u / BN; // a warp's lanes: one group of 32 tokens
        const unsigned char* grp = raw + tok * F_KSB + b * K_GB;
        const float d = k_scale(grp);
        unsigned int pr[16];
        bool bad = false;
        group_pairs<KX, 1, VALUES>(grp, (b * K_GB + 2) % 4 == 0, d, pr, bad, wild);
        uint4* dst = reinterpret_cast<uint4*>(kcodes + tok * KCS + 32 * b);
#pragma unroll
        for (int i = 0; i < 4; i++) dst[i] = make_uint4(pr[4 * i], pr[4 * i + 1], pr[4 * i + 2], pr[4 * i + 3]);
        if (!VALUES) reinterpret_cast<float*>(sm + F_KSC + buf * F_KSCB)[b * BN + tok] = d;
    }
    for (int u = tid; u < BN * VB; u += NT) {
        const int tok = u % BN, b = u / BN;
        const unsigned char* grp = raw + BN * F_KSB + tok * F_VSB + b * V_GB;
        const float d = v_scale(grp);
        unsigned int pr[16];
        bool bad = false;
        group_pairs<VX, 0, VALUES>(grp, (b * V_GB + 2) % 4 == 0, d, pr, bad, wild);
        if (bad || !rq_is_finite(d)) {
            mine |= 1ull << tok;
#pragma unroll
            for (int i = 0; i < 16; i++) pr[i] = 0u;
        }
        uint4* dst = reinterpret_cast<uint4*>(vcodes + tok * VCS + 32 * b);
#pragma unroll
        for (int i = 0; i < 4; i++) dst[i] = make_uint4(pr[4 * i], pr[4 * i + 1], pr[4 * i + 2], pr[4 * i + 3]);
        if (!VALUES) {
            const float ds = rq_is_finite(d) ? d : 0.0f;
#if ELEM == 1
            reinterpret_cast<elem_t*>(sm + F_VSC + buf * F_VSCB)[b * BN + tok] = f32_to_elem(ds);
#else
            reinterpret_cast<float*>(sm + F_VSC + buf * F_VSCB)[b * BN + tok] = ds;
#endif
        }
    }
}

// Turns a tile's raw rows (`raw`) into code buffer `buf`, the NT converting threads (this one
// `tid` of them) sharing the work: values, or for a tile whose values the element type does
// not hold (`wild`, rare) codes and scales. Each converting warp leaves its tokens' bad-V bits
// in badw[buf · F_NBW + its index]; `any` ORs a flag over the converting threads (at a barrier
// of theirs). Returns whether the tile is wild.
template <int NT, class Any>
RQ_FN bool flash_convert(const unsigned char* raw, unsigned char* sm, unsigned long long* badw, int buf,
                         int tid, Any any) {
    unsigned long long mine = 0;
    bool wild = false;
    flash_extract<true, NT>(raw, sm, buf, mine, wild, tid);
    const unsigned int lo_w = __reduce_or_sync(FULL_MASK, (unsigned int)mine);
    const unsigned int hi_w = __reduce_or_sync(FULL_MASK, (unsigned int)(mine >> 32));
    if (tid % 32 == 0) badw[buf * F_NBW + tid / 32] = ((unsigned long long)hi_w << 32) | lo_w;
    wild = any(wild);
    if (wild) {
        bool unused = false;
        flash_extract<false, NT>(raw, sm, buf, mine, unused, tid);
    }
    return wild;
}

// Eight values (f32, 16-byte aligned) times `scale`, as eight elements in 16 bytes.
RQ_FN uint4 pack8(const float* x, float scale) {
    const float4 a = reinterpret_cast<const float4*>(x)[0], b = reinterpret_cast<const float4*>(x)[1];
    return make_uint4(pack2(a.x * scale, a.y * scale), pack2(a.z * scale, a.w * scale), pack2(b.x * scale, b.y * scale),
                      pack2(b.z * scale, b.w * scale));
}

// qa0, qa1: this warp's query A fragments of K group b (dimensions 32b .. 32b + 31).
#if F_QSMEM
#define QFRAGS(b)                                                   \
    unsigned int qa0[MT][4], qa1[MT][4];                            \
    _Pragma("unroll") for (int mt = 0; mt < MT; mt++) {             \
        ldsm_x4(qa0[mt], q_lane + 2 * (16 * mt * KCS + 32 * (b)));      \
        ldsm_x4(qa1[mt], q_lane + 2 * (16 * mt * KCS + 32 * (b) + 16)); \
    }
#else
#define QFRAGS(b)                                \
    const unsigned int(*qa0)[4] = &qa[2 * (b)];     \
    const unsigned int(*qa1)[4] = &qa[2 * (b) + 1]
#endif

#if WS
// Named barriers (0 is __syncthreads): the producers among themselves, the consumers among
// themselves, and per code buffer b, FULL + b (the producers filled it) and EMPTY + b (the
// consumers are done with it).
#define BAR_P 1
#define BAR_C 2
#define BAR_FULL 3
#define BAR_EMPTY 5
#define BAR_DONE 7
// Registers per thread of each role after `setmaxnreg` (multiples of 8). The block starts and
// ends with REGS_ALL each (the launch bound's share): the pool the roles divide holds
// ALL_THREADS · REGS_ALL only when the kernel uses all of them, which the host checks (with
// fewer, the consumers' request could never be met).
#define REGS_ALL (65536 / ALL_THREADS / 8 * 8)
#define REGS_P 40
#define REGS_C ((REGS_ALL * ALL_THREADS - P_THREADS * REGS_P) / THREADS / 8 * 8)
static_assert(WARPS == 8, "warp-specialized blocks have two consumer warpgroups");
static_assert(REGS_P <= REGS_ALL && REGS_ALL <= REGS_C && REGS_C <= 256, "setmaxnreg's bounds");
RQ_FN void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
RQ_FN void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
// Whether `v` holds for any of the n threads meeting at barrier id.
RQ_FN bool bar_or(int id, int n, bool v) {
    unsigned int r;
    asm volatile("{\n .reg .pred p, q;\n setp.ne.u32 q, %1, 0;\n bar.red.or.pred p, %2, %3, q;\n"
                 " selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(r)
                 : "r"((unsigned int)v), "r"(id), "r"(n)
                 : "memory");
    return r != 0;
}
#endif

extern "C" __global__ void __launch_bounds__(ALL_THREADS, F_MINB) prefill_attention_flash(
    const elem_t* q, const unsigned char* kc, const unsigned char* vc, const unsigned int* table,
    long long page_tokens, long long n_tokens, long long pos_offset, long long n_q,
    long long n_heads, int causal, long long window, float softcap, float score_scale,
    int q_log_p, int q_m, const unsigned long long* q_base, const float* q_signs, float q_scale,
    int v_log_p, int v_m, const unsigned long long* v_base, const float* v_signs, float v_scale_r,
    elem_t* out) {
    extern __shared__ float4 smem4[];
    unsigned char* sm = reinterpret_cast<unsigned char*>(smem4);
    float* rows_f = reinterpret_cast<float*>(sm);
    elem_t* kcodes = reinterpret_cast<elem_t*>(sm + F_CODES);
    elem_t* vcodes = kcodes + BN * KCS;
    float* ksc = reinterpret_cast<float*>(sm + F_KSC);
    unsigned long long* badw = reinterpret_cast<unsigned long long*>(sm + F_BAD);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gr = lane >> 2, tq = lane & 3;
    const int head = blockIdx.y;
    // Long (late) row blocks first: under a causal mask they have the most tokens.
    const long long rb = (long long)gridDim.x - 1 - blockIdx.x;
    const long long h_q = n_heads * G;
    const long long n_rows = n_q * G;

    // Visible tokens [lo, hi) of query i (both grow with i).
    auto visible = [&](long long i, long long& lo, long long& hi) {
        const long long p = pos_offset + i;
        hi = causal ? (n_tokens < p + 1 ? n_tokens : p + 1) : n_tokens;
        lo = window > 0 ? (p + 1 - window > 0 ? p + 1 - window : 0) : 0;
        if (lo > hi) lo = hi;
        if (i >= n_q) lo = hi = 0;
    };

    // The block's queries, rotated and scaled, then this warp's as A fragments.
    {
        const Rot qrot = {q_log_p, q_m, q_base, q_signs, q_scale};
        // Eight values (16 bytes) at a time: a query row is D values, a multiple of 32.
#pragma unroll 4
        for (int x = threadIdx.x; x < BM * D / 8; x += ALL_THREADS) {
            const int row = x / (D / 8), c = 8 * (x % (D / 8));
            const long long r = rb * BM + row;
            uint4 raw = make_uint4(0u, 0u, 0u, 0u);
            if (r < n_rows)
                raw = *reinterpret_cast<const uint4*>(q + ((r / G) * h_q + (long long)head * G + r % G) * D + c);
            const elem_t* v = reinterpret_cast<const elem_t*>(&raw);
            float4* dst = reinterpret_cast<float4*>(rows_f + row * D + c);
            dst[0] = make_float4(elem_to_f32(v[0]), elem_to_f32(v[1]), elem_to_f32(v[2]), elem_to_f32(v[3]));
            dst[1] = make_float4(elem_to_f32(v[4]), elem_to_f32(v[5]), elem_to_f32(v[6]), elem_to_f32(v[7]));
        }
        __syncthreads();
        warp_rotate<D>(rows_f, BM, qrot, 0);
    }
    // Scores in units of log2: the queries carry log2(e), and so does the soft-cap.
    const float qscale = score_scale * 1.4426950408889634f, cap = softcap * 1.4426950408889634f;
#if F_QSMEM
    // This warp's rows as A fragments come from shared memory, with ldmatrix, at each tile.
    elem_t* qsm = reinterpret_cast<elem_t*>(sm + F_QS);
    for (int x = threadIdx.x; x < BM * D / 8; x += ALL_THREADS) {
        const int row = x / (D / 8), c = 8 * (x % (D / 8));
        *reinterpret_cast<uint4*>(qsm + row * KCS + c) = pack8(rows_f + row * D + c, qscale);
    }
    const unsigned int q_lane =
        smem_addr(qsm) + 2 * ((WR * warp + (lane & 7) + 8 * ((lane >> 3) & 1)) * KCS + 8 * (lane >> 4));
#else
    unsigned int qa[D / 16][4];
    {
        const float* r0 = rows_f + (16 * warp + gr) * D;
        const float* r1 = r0 + 8 * D;
#pragma unroll
        for (int k = 0; k < D / 16; k++) {
            const int c = 16 * k + 2 * tq;
            qa[k][0] = pack2(r0[c] * qscale, r0[c + 1] * qscale);
            qa[k][1] = pack2(r1[c] * qscale, r1[c + 1] * qscale);
            qa[k][2] = pack2(r0[c + 8] * qscale, r0[c + 9] * qscale);
            qa[k][3] = pack2(r1[c + 8] * qscale, r1[c + 9] * qscale);
        }
    }
#endif
    __syncthreads(); // the tiles reuse the queries' space

    // The block's range of tokens. Clamped to hi, lo still grows with the query: the first
    // row's lo is the smallest.
    long long b_lo, b_hi, last_lo, first_hi;
    {
        const long long first = rb * BM / G;
        long long last = (rb * BM + BM - 1) / G;
        if (last >= n_q) last = n_q - 1;
        visible(first, b_lo, first_hi);
        visible(last, last_lo, b_hi);
        if (b_hi < b_lo) b_hi = b_lo;
    }
    // Token offsets from b_lo fit 32 bits (the host sends longer caches to the decode kernel):
    // the per-tile range tests are 32-bit.
    auto rel = [&](long long t) -> int { return (int)(t < b_lo ? 0 : t > b_hi ? b_hi - b_lo : t - b_lo); };
    const int span = (int)(b_hi - b_lo);

    // Copies the raw rows of the tile at t0 into stage s (the threads that convert: all, or the
    // producers).
    auto stage = [&](int s, long long t0) {
        constexpr int NT = WS ? P_THREADS : THREADS;
        const unsigned int tid = WS ? threadIdx.x - THREADS : threadIdx.x;
        if (t0 < b_hi) {
            unsigned char* dst = sm + s * F_STAGE;
            flash_stage_rows<K_ROW, F_KSB, NT>(dst, kc, table, page_tokens, n_heads, head, t0, b_hi, tid);
            flash_stage_rows<V_ROW, F_VSB, NT>(dst + BN * F_KSB, vc, table, page_tokens, n_heads, head, t0,
                                                b_hi, tid);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

#if WS
    // The producers: for each tile, wait for its rows (copied a tile ahead) and for the
    // consumers to be done with its code buffer (the tile two before), convert it there, and
    // tell the consumers.
    int* wflag = reinterpret_cast<int*>(sm + F_BAD + F_NCB * 8 * F_NBW);
    if (warp >= WARPS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS_P));
        const int ptid = threadIdx.x - THREADS;
        stage(0, b_lo);
        for (int off = 0; off < span; off += BN) {
            const int cur = (off / BN) & 1;
            asm volatile("cp.async.wait_group 0;\n" ::);
            bar_sync(BAR_P, P_THREADS); // this tile's rows landed; the last tile's are converted
            stage(cur ^ 1, b_lo + off + BN);
            if (off >= 2 * BN) bar_sync(BAR_EMPTY + cur, ALL_THREADS);
            const bool wild = flash_convert<P_THREADS>(sm + cur * F_STAGE, sm, badw, cur, ptid,
                                                       [](bool w) { return bar_or(BAR_P, P_THREADS, w); });
            if (ptid == 0) wflag[cur] = wild;
            bar_arrive(BAR_FULL + cur, ALL_THREADS);
        }
        asm volatile("cp.async.wait_group 0;\n" ::);
        // The consumers give their extra registers back before the end (waiting at a barrier
        // takes no issue slots; a `setmaxnreg.inc` that cannot be met yet retries).
        bar_sync(BAR_DONE, ALL_THREADS);
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS_ALL));
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS_C));
#endif
    // This thread's rows (WR · warp + 16 · mt + gr + 8u) and their visible ranges.
    long long r_lo[MT][2], r_hi[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int u = 0; u < 2; u++)
            visible((rb * BM + WR * warp + 16 * mt + gr + 8 * u) / G, r_lo[mt][u], r_hi[mt][u]);
    float m[MT][2], l[MT][2];
    bool seen[MT][2];
    float o[MT][DV / 8][4];
    softmax_start(m, l, seen, o);

    // This lane's ldmatrix row addresses in the (first) code tiles: K rows are tokens (8 per
    // matrix, matrices 8 dimensions apart); V rows are tokens too, read transposed.
    const unsigned int k_lane0 = smem_addr(kcodes) + 2 * ((lane & 7) * KCS + 8 * (lane >> 3));
    const unsigned int v_lane0 =
        smem_addr(vcodes) + 2 * (((lane & 7) + 8 * ((lane >> 3) & 1)) * VCS + 8 * (lane >> 4));
#if !WS
    stage(0, b_lo);
#endif
    const int full_lo = rel(last_lo), full_hi = rel(first_hi);
    int row_lo[MT][2], row_hi[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            row_lo[mt][u] = rel(r_lo[mt][u]);
            row_hi[mt][u] = rel(r_hi[mt][u]);
        }
    for (int off = 0; off < span; off += BN) {
        const long long t0 = b_lo + off;
        const int cur = (off / BN) & 1; // this tile's stage (a counter would take a register)
#if WS
        // The producers converted this tile into code buffer `cur`.
        bar_sync(BAR_FULL + cur, ALL_THREADS);
        const bool wild = wflag[cur] != 0;
        const int buf = cur;
#else
        stage(cur ^ 1, t0 + BN);
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads(); // this tile's rows landed; every warp is done with the last codes

        // Raw rows to values (or, for a tile with values the element type does not hold, to
        // codes and scales: `wild`, rare).
        const bool wild = flash_convert<THREADS>(sm + cur * F_STAGE, sm, badw, 0, threadIdx.x,
                                                 [](bool w) { return __syncthreads_or(w) != 0; });
        if (wild) __syncthreads();
        const int buf = 0;
#endif
        const unsigned int k_lane = k_lane0 + buf * F_CBUF, v_lane = v_lane0 + buf * F_CBUF;

        // S = Q K^T: s[mt][j] holds tokens 8j + 2tq (+1) of m-tile mt's rows gr (0, 1) and
        // gr + 8 (2, 3). Each K fragment feeds the MT m-tiles.
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < BN / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[mt][j][e] = 0.0f;
        if (!wild) {
#pragma unroll
            for (int b = 0; b < KB; b++) {
                QFRAGS(b);
#pragma unroll
                for (int j = 0; j < BN / 8; j++) {
                    unsigned int kb[4];
                    ldsm_x4(kb, k_lane + 2 * (8 * j * KCS + 32 * b));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma_16816(s[mt][j], qa0[mt], kb[0], kb[1]);
                        mma_16816(s[mt][j], qa1[mt], kb[2], kb[3]);
                    }
                }
            }
        } else {
#pragma unroll
            for (int b = 0; b < KB; b++) {
                QFRAGS(b);
#pragma unroll
                for (int j = 0; j < BN / 8; j++) {
                    unsigned int kb[4];
                    ldsm_x4(kb, k_lane + 2 * (8 * j * KCS + 32 * b));
                    const float2 d = *reinterpret_cast<const float2*>(ksc + buf * (F_KSCB / 4) + b * BN + 8 * j + 2 * tq);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        mma_16816(c, qa0[mt], kb[0], kb[1]);
                        mma_16816(c, qa1[mt], kb[2], kb[3]);
                        s[mt][j][0] = fmaf(d.x, c[0], s[mt][j][0]);
                        s[mt][j][1] = fmaf(d.y, c[1], s[mt][j][1]);
                        s[mt][j][2] = fmaf(d.x, c[2], s[mt][j][2]);
                        s[mt][j][3] = fmaf(d.y, c[3], s[mt][j][3]);
                    }
                }
            }
        }

        // Online softmax per row; the four threads of a row (a quad) hold its BN scores, in
        // units of log2 (the queries carry log2(e)): p = 2^(s - m). Tiles inside every row's
        // range (most of them) skip the masks; a key masked out scores -Inf, so its p is 0.
        const bool full = off >= full_lo && off + BN <= full_hi;
        // (The soft-cap is one loop of its own: per score, its test would be a branch.)
        if (cap > 0.0f)
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < BN / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[mt][j][e] = cap * tanhf(s[mt][j][e] / cap);
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            // The row's range in tile offsets (0..BN), wanted only at the ranges' edges.
            int lo_t = 0, hi_t = BN;
            if (!full) {
                lo_t = min(max(row_lo[mt][u] - off, 0), BN);
                hi_t = min(max(row_hi[mt][u] - off, 0), BN);
#pragma unroll
                for (int j = 0; j < BN / 8; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int t = 8 * j + 2 * tq + e;
                        if (t < lo_t || t >= hi_t) s[mt][j][2 * u + e] = NEG_INF;
                    }
            }
            // (Four running maxima: shorter chains of dependent instructions.)
            float mx[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF};
#pragma unroll
            for (int j = 0; j < BN / 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) mx[(2 * j + e) % 4] = fmaxf(mx[(2 * j + e) % 4], s[mt][j][2 * u + e]);
            float tmax = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
            tmax = fmaxf(tmax, __shfl_xor_sync(FULL_MASK, tmax, 1));
            tmax = fmaxf(tmax, __shfl_xor_sync(FULL_MASK, tmax, 2));
            const float m_new = fmaxf(m[mt][u], tmax);
            // Every score so far -Inf (or none visible), or a NaN among them? Rare: only then
            // are the row's threads asked. `all_inf`: the tile adds nothing; it counts as seen
            // when the row had visible keys in it.
            bool all_inf = false;
            if (__any_sync(FULL_MASK, m_new == NEG_INF)) {
                float nan = 0.0f, any = 0.0f;
#pragma unroll
                for (int j = 0; j < BN / 8; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int t = 8 * j + 2 * tq + e;
                        nan = isnan(s[mt][j][2 * u + e]) ? 1.0f : nan;
                        any = full || (t >= lo_t && t < hi_t) ? 1.0f : any;
                    }
                nan = fmaxf(nan, __shfl_xor_sync(FULL_MASK, nan, 1));
                nan = fmaxf(nan, __shfl_xor_sync(FULL_MASK, nan, 2));
                any = fmaxf(any, __shfl_xor_sync(FULL_MASK, any, 1));
                any = fmaxf(any, __shfl_xor_sync(FULL_MASK, any, 2));
                all_inf = m_new == NEG_INF && nan == 0.0f;
                if (all_inf && any > 0.0f) seen[mt][u] = true;
            }
            // The running maximum stays unless this tile's exceeds it by more than 8 (in log2
            // units): weights then reach at most 2^8, well inside f16, and most tiles rescale
            // nothing. (A first finite maximum always replaces -Inf. A `wild` tile multiplies
            // the weights by V scales in f16, so there they stay at most 1.)
            const float m_keep = m_new - m[mt][u] <= (wild ? 0.0f : 8.0f) ? m[mt][u] : m_new;
            const float corr = all_inf ? 1.0f : fast_exp2(m[mt][u] - m_keep);
            // (All -Inf: every weight 2^(-Inf - 0) = 0, with no test per score.)
            const float m_use = all_inf ? 0.0f : m_keep;
            float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int j = 0; j < BN / 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float pr = fast_exp2(s[mt][j][2 * u + e] - m_use);
                    s[mt][j][2 * u + e] = pr;
                    sums[(2 * j + e) % 4] += pr;
                }
            const float sum = (sums[0] + sums[1]) + (sums[2] + sums[3]);
            if (!all_inf) {
                l[mt][u] = l[mt][u] * corr + sum;
                m[mt][u] = m_keep;
            }
            if (__any_sync(FULL_MASK, corr != 1.0f))
#pragma unroll
                for (int n = 0; n < DV / 8; n++) {
                    o[mt][n][2 * u] *= corr;
                    o[mt][n][2 * u + 1] *= corr;
                }
        }

        // O += P V, 16 tokens at a time (for codes, with each V group's scales folded into P);
        // each V fragment feeds the MT m-tiles.
        if (!wild) {
#pragma unroll
            for (int k = 0; k < BN / 16; k++) {
                unsigned int pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    pa[mt][0] = pack2(s[mt][2 * k][0], s[mt][2 * k][1]);
                    pa[mt][1] = pack2(s[mt][2 * k][2], s[mt][2 * k][3]);
                    pa[mt][2] = pack2(s[mt][2 * k + 1][0], s[mt][2 * k + 1][1]);
                    pa[mt][3] = pack2(s[mt][2 * k + 1][2], s[mt][2 * k + 1][3]);
                }
#pragma unroll
                for (int nn = 0; nn < DV / 16; nn++) {
                    unsigned int vb[4];
                    ldsm_x4_t(vb, v_lane + 2 * (16 * k * VCS + 16 * nn));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma_16816(o[mt][2 * nn], pa[mt], vb[0], vb[1]);
                        mma_16816(o[mt][2 * nn + 1], pa[mt], vb[2], vb[3]);
                    }
                }
            }
        } else
#pragma unroll
        for (int k = 0; k < BN / 16; k++) {
#pragma unroll
            for (int b = 0; b < VB; b++) {
                unsigned int a[MT][4];
#if ELEM == 1
                const elem_t* vsc = reinterpret_cast<const elem_t*>(sm + F_VSC + buf * F_VSCB) + b * BN + 16 * k + 2 * tq;
                const unsigned int d01 = *reinterpret_cast<const unsigned int*>(vsc);
                const unsigned int d89 = *reinterpret_cast<const unsigned int*>(vsc + 8);
#else
                const float* vsc = reinterpret_cast<const float*>(sm + F_VSC + buf * F_VSCB) + b * BN + 16 * k + 2 * tq;
                const float2 d01 = *reinterpret_cast<const float2*>(vsc);
                const float2 d89 = *reinterpret_cast<const float2*>(vsc + 8);
#endif
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const float* p0 = s[mt][2 * k];
                    const float* p1 = s[mt][2 * k + 1];
#if ELEM == 1
                    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(a[mt][0]) : "r"(pack2(p0[0], p0[1])), "r"(d01));
                    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(a[mt][1]) : "r"(pack2(p0[2], p0[3])), "r"(d01));
                    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(a[mt][2]) : "r"(pack2(p1[0], p1[1])), "r"(d89));
                    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(a[mt][3]) : "r"(pack2(p1[2], p1[3])), "r"(d89));
#else
                    a[mt][0] = pack2(p0[0] * d01.x, p0[1] * d01.y);
                    a[mt][1] = pack2(p0[2] * d01.x, p0[3] * d01.y);
                    a[mt][2] = pack2(p1[0] * d89.x, p1[1] * d89.y);
                    a[mt][3] = pack2(p1[2] * d89.x, p1[3] * d89.y);
#endif
                }
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    unsigned int vb[4];
                    ldsm_x4_t(vb, v_lane + 2 * (16 * k * VCS + 32 * b + 16 * np));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma_16816(o[mt][4 * b + 2 * np], a[mt], vb[0], vb[1]);
                        mma_16816(o[mt][4 * b + 2 * np + 1], a[mt], vb[2], vb[3]);
                    }
                }
            }
        }

        // Tokens whose V is not finite (rare): their values, in f32, to the rows that see them.
        unsigned long long bad = 0;
#pragma unroll
        for (int w = 0; w < F_NBW; w++) bad |= badw[buf * F_NBW + w];
        while (bad) {
            const int tt = __ffsll((long long)bad) - 1;
            bad &= bad - 1;
            const long long t = t0 + tt;
            const long long slot =
                table ? (long long)table[t / page_tokens] * page_tokens + t % page_tokens : t;
            const unsigned char* vrow = vc + (slot * n_heads + head) * V_ROW;
            // The weights of token tt: held by the quad's thread (tt % 8) / 2; each thread
            // offers its own by selects (no indexing, which would put s in local memory).
            float p[MT][2];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    float mine = 0.0f;
#pragma unroll
                    for (int j = 0; j < BN / 8; j++)
#pragma unroll
                        for (int e = 0; e < 2; e++) mine = 8 * j + 2 * tq + e == tt ? s[mt][j][2 * u + e] : mine;
                    p[mt][u] = __shfl_sync(FULL_MASK, mine, (lane & ~3) | ((tt & 7) >> 1));
                }
            // Only the groups that were zeroed (a scale or a code not finite) are added here.
#pragma unroll
            for (int b = 0; b < VB; b++) {
                const unsigned char* g = vrow + b * V_GB;
                const float d = v_scale(g);
                bool zeroed = !rq_is_finite(d);
                for (int j = 0; j < 32; j++) zeroed = zeroed || !rq_is_finite(RQ_CAT(rq_code_, VFMT)(g, j));
                if (!zeroed) continue;
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int u = 0; u < 2; u++) {
                        if (tt + off < row_lo[mt][u] || tt + off >= row_hi[mt][u]) continue;
#pragma unroll
                        for (int n = 4 * b; n < 4 * b + 4; n++)
#pragma unroll
                            for (int e = 0; e < 2; e++) {
                                const int j = 8 * (n % 4) + 2 * tq + e;
                                o[mt][n][2 * u + e] += p[mt][u] * (RQ_CAT(rq_code_, VFMT)(g, j) * d);
                            }
                    }
            }
        }
#if WS
        // Code buffer `cur` is free for the tile two on (when there is one).
        if (off + 2 * BN < span) bar_arrive(BAR_EMPTY + cur, ALL_THREADS);
#endif
    }
#if WS
    bar_sync(BAR_C, THREADS); // the outputs reuse the tiles' space (the producers are done)
#else
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads(); // the outputs reuse the tiles' space
#endif

    // Rows divided by l (0 for a row that saw no key), rotated back, stored.
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
            float lr = l[mt][u];
            lr += __shfl_xor_sync(FULL_MASK, lr, 1);
            lr += __shfl_xor_sync(FULL_MASK, lr, 2);
            const bool live = m[mt][u] != NEG_INF || isnan(lr) || seen[mt][u];
            float* dst = rows_f + (WR * warp + 16 * mt + gr + 8 * u) * DV;
#pragma unroll
            for (int n = 0; n < DV / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) dst[8 * n + 2 * tq + e] = live ? o[mt][n][2 * u + e] / lr : 0.0f;
        }
#if WS
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS_ALL));
        bar_arrive(BAR_DONE, ALL_THREADS);
    }
#endif
    __syncthreads();
    const Rot vrot = {v_log_p, v_m, v_base, v_signs, v_scale_r};
    warp_rotate<DV>(rows_f, BM, vrot, 1);
    for (int x = threadIdx.x; x < BM * DV / 8; x += ALL_THREADS) {
        const int row = x / (DV / 8), c = 8 * (x % (DV / 8));
        const long long r = rb * BM + row;
        if (r < n_rows)
            *reinterpret_cast<uint4*>(out + ((r / G) * h_q + (long long)head * G + r % G) * DV + c) =
                pack8(rows_f + row * DV + c, 1.0f);
    }
}
#endif

#endif
