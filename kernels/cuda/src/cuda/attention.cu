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
    for (int h = 1; h < p; h <<= 1) {
        for (int k = threadIdx.x; k < total / 2; k += blockDim.x) {
            int seg = k / (p / 2), j = k % (p / 2);
            int i = seg * p + (j / h) * 2 * h + (j % h);
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
    long long split_tokens, float* part) {
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
// The same decode attention on the tensor cores, for f16/bf16 queries and outputs and K/V
// formats whose values are scale x code (formats.cuh's rq_scale_* / rq_code_*). Per warp and
// tile of 32 tokens, with the G query heads as the 16 rows of the mma (rows beyond G are zero):
//   S = Q K^T: A = the rotated, scaled queries (f16/bf16, held in registers for the whole
//     cache), B = K codes (exact in f16/bf16); the f32 product of each 32-value group is
//     multiplied by its token's scale and summed.
//   O += P V: A = P times the V scale of the token and group (rounded to f16/bf16),
//     B = V codes; the rows of S's accumulators are P's A fragments (no shuffles).
// P and Q are rounded to the element type once, as in flash attention; the softmax, the
// scales and all sums are f32.

#if ELEM == 1
#define MMA_TYPE "f16.f16"
RQ_FN unsigned int pack2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#else
#define MMA_TYPE "bf16.bf16"
RQ_FN unsigned int pack2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif

// c += A B for one m16n8k16 tile (A row-major 16x16, B column-major 16x8, C 16x8 f32).
RQ_FN void mma_16816(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE
        ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Bytes of one group of 32 values (one block, or 32 blocks of one value).
#define K_GB (K_BS == 32 ? K_BB : 32 * K_BB)
#define V_GB (V_BS == 32 ? V_BB : 32 * V_BB)
#define KSTEPS (D / 16)
#define NT (DV / 8)

RQ_FN float k_scale(const unsigned char* grp) { return RQ_CAT(rq_scale_, KFMT)(grp); }
RQ_FN float k_code(const unsigned char* grp, int j) { return RQ_CAT(rq_code_, KFMT)(grp, j); }

// Codes j and j + 1 of a K group (j even), packed for the mma: two bytes at once for q4_0
// (KFAST 1) and q8_0 (KFAST 2), the format's accessor otherwise.
RQ_FN unsigned int k_pair(const unsigned char* grp, int j) {
#if KFAST == 1
    unsigned int w = *reinterpret_cast<const unsigned short*>(grp + 2 + (j & 15));
    if (j >= 16) w >>= 4;
    return pack2((float)((int)(w & 15u) - 8), (float)((int)((w >> 8) & 15u) - 8));
#elif KFAST == 2
    unsigned int w = *reinterpret_cast<const unsigned short*>(grp + 2 + j);
    return pack2((float)(signed char)(w & 0xFFu), (float)(signed char)(w >> 8));
#else
    return pack2(k_code(grp, j), k_code(grp, j + 1));
#endif
}
RQ_FN float v_scale(const unsigned char* grp) { return RQ_CAT(rq_scale_, VFMT)(grp); }
RQ_FN float v_code(const unsigned char* grp, int j) { return RQ_CAT(rq_code_, VFMT)(grp, j); }

// Codes j of two V rows' groups (tokens of the same mma column pair), packed for the mma; a
// token past the tile's end (`ok` false) is code 0. Bytes at once for q4_0 (VFAST 1) and q8_0
// (VFAST 2).
RQ_FN unsigned int v_pair(const unsigned char* ga, const unsigned char* gb, bool oka, bool okb,
                          int j) {
#if VFAST == 1
    unsigned int w = (oka ? ga[2 + (j & 15)] : 0x88u) | ((okb ? gb[2 + (j & 15)] : 0x88u) << 8);
    if (j >= 16) w >>= 4;
    return pack2((float)((int)(w & 15u) - 8), (float)((int)((w >> 8) & 15u) - 8));
#elif VFAST == 2
    int a = oka ? (int)(signed char)ga[2 + j] : 0, b = okb ? (int)(signed char)gb[2 + j] : 0;
    return pack2((float)a, (float)b);
#else
    return pack2(oka ? v_code(ga, j) : 0.0f, okb ? v_code(gb, j) : 0.0f);
#endif
}

// e^x with the hardware's approximate exp2 (the tensor-core kernel rounds the weights to
// f16/bf16 anyway); e^-inf = 0.
RQ_FN float fast_exp(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
}

RQ_FN float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 1));
    return fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 2));
}

RQ_FN float quad_sum(float x) {
    x += __shfl_xor_sync(FULL_MASK, x, 1);
    return x + __shfl_xor_sync(FULL_MASK, x, 2);
}

extern "C" __global__ void __launch_bounds__(THREADS) decode_attention_mma(
    const elem_t* q, const unsigned char* kc, const unsigned char* vc, const unsigned int* table,
    long long table_stride, long long page_tokens, const long long* lens, const long long* pos,
    long long n_heads, int causal, long long window, float softcap, float score_scale,
    int q_log_p, int q_m, const unsigned long long* q_base, const float* q_signs, float q_scale,
    long long split_tokens, float* part) {
    const Rot qrot = {q_log_p, q_m, q_base, q_signs, q_scale};
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4); // [G][D]
    const int head = blockIdx.x, split = blockIdx.y, seq = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gr = lane >> 2, tq = lane & 3; // mma group (row) and thread in the group
    const int n_splits = gridDim.y;
    const long long h_q = n_heads * G;

    const elem_t* qg = q + ((long long)seq * h_q + (long long)head * G) * D;
    for (int i = threadIdx.x; i < G * D; i += THREADS) qs[i] = elem_to_f32(qg[i]);
    __syncthreads();
    smem_rotate(qs, G, D, qrot, 0);
    for (int i = threadIdx.x; i < G * D; i += THREADS) qs[i] *= score_scale;
    __syncthreads();

    // Q as A fragments: rows gr and gr + 8 (query heads; zero past G), columns 16s + 2tq (+1,
    // +8, +9).
    unsigned int qa[KSTEPS][4];
    {
        const float* r0 = qs + gr * D;
        const float* r1 = qs + (gr + 8) * D;
        const bool h0 = gr < G, h1 = gr + 8 < G;
#pragma unroll
        for (int s = 0; s < KSTEPS; s++) {
            int c = 16 * s + 2 * tq;
            qa[s][0] = pack2(h0 ? r0[c] : 0.0f, h0 ? r0[c + 1] : 0.0f);
            qa[s][1] = pack2(h1 ? r1[c] : 0.0f, h1 ? r1[c + 1] : 0.0f);
            qa[s][2] = pack2(h0 ? r0[c + 8] : 0.0f, h0 ? r0[c + 9] : 0.0f);
            qa[s][3] = pack2(h1 ? r1[c + 8] : 0.0f, h1 ? r1[c + 9] : 0.0f);
        }
    }

    long long n = lens[seq], p = pos[seq];
    long long hi = causal ? (n < p + 1 ? n : p + 1) : n;
    long long lo = window > 0 ? (p + 1 - window > 0 ? p + 1 - window : 0) : 0;
    if (lo > hi) lo = hi;
    long long s_lo = lo + split * split_tokens, s_hi = s_lo + split_tokens;
    if (s_lo > hi) s_lo = hi;
    if (s_hi > hi) s_hi = hi;

    unsigned int* wbuf = reinterpret_cast<unsigned int*>(qs + G * D) + warp * WARP_W;

    // Softmax state of this thread's rows gr and gr + 8.
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    bool seen[2] = {false, false};
    float o[NT][4];
#pragma unroll
    for (int i = 0; i < NT; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[i][e] = 0.0f;

    auto row_of = [&](long long t) -> long long {
        long long page = table ? (long long)table[seq * table_stride + t / page_tokens] : seq;
        return (page * page_tokens + t % page_tokens) * n_heads + head;
    };

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
        const unsigned char* ks = reinterpret_cast<const unsigned char*>(wbuf + stage * STAGE_W);
        const unsigned char* vs = ks + 4 * 32 * K_STRIDE_W;
#define K_ROW_AT(u) (ks + (u) * 4 * K_STRIDE_W)
#define V_ROW_AT(u) (vs + (u) * 4 * V_STRIDE_W)

        // Scores of 4 n-tiles of 8 tokens: sc[j] holds rows gr (0, 1) and gr + 8 (2, 3) at
        // tokens 8j + 2tq and 8j + 2tq + 1.
        float sc[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) sc[j][e] = 0.0f;
            if (8 * j >= cnt) continue; // warp-uniform
            const unsigned char* krow = K_ROW_AT(8 * j + gr);
            const unsigned char* s0row = K_ROW_AT(8 * j + 2 * tq);
            const unsigned char* s1row = K_ROW_AT(8 * j + 2 * tq + 1);
            for (int b = 0; b < D / 32; b++) {
                const unsigned char* grp = krow + b * K_GB;
                unsigned int b00 = k_pair(grp, 2 * tq);
                unsigned int b01 = k_pair(grp, 2 * tq + 8);
                unsigned int b10 = k_pair(grp, 16 + 2 * tq);
                unsigned int b11 = k_pair(grp, 24 + 2 * tq);
                float cb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma_16816(cb, qa[2 * b], b00, b01);
                mma_16816(cb, qa[2 * b + 1], b10, b11);
                float d0 = k_scale(s0row + b * K_GB), d1 = k_scale(s1row + b * K_GB);
                sc[j][0] = fmaf(d0, cb[0], sc[j][0]);
                sc[j][1] = fmaf(d1, cb[1], sc[j][1]);
                sc[j][2] = fmaf(d0, cb[2], sc[j][2]);
                sc[j][3] = fmaf(d1, cb[3], sc[j][3]);
            }
        }

        // Online softmax of rows gr (r = 0) and gr + 8 (r = 1); the four threads of a group hold
        // a row's 32 scores between them.
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float tmax = NEG_INF;
            bool nan = false;
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float x = sc[j][2 * r + e];
                    if (softcap > 0.0f) x = softcap * tanhf(x / softcap);
                    bool valid = 8 * j + 2 * tq + e < cnt;
                    x = valid ? x : NEG_INF;
                    sc[j][2 * r + e] = x;
                    tmax = fmaxf(tmax, x);
                    nan = nan || isnan(x);
                }
            tmax = quad_max(tmax);
            bool any_nan = quad_sum(nan ? 1.0f : 0.0f) > 0.0f;
            float m_new = fmaxf(m[r], tmax);
            bool all_inf = m_new == NEG_INF && !any_nan;
            corr[r] = all_inf ? 1.0f : fast_exp(m[r] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    bool valid = 8 * j + 2 * tq + e < cnt;
                    float pr = (valid && !all_inf) ? fast_exp(sc[j][2 * r + e] - m_new) : 0.0f;
                    sc[j][2 * r + e] = pr;
                    sum += pr;
                }
            sum = quad_sum(sum);
            if (all_inf) {
                seen[r] = true;
            } else {
                l[r] = l[r] * corr[r] + sum;
                m[r] = m_new;
            }
        }
#pragma unroll
        for (int i = 0; i < NT; i++) {
            o[i][0] *= corr[0];
            o[i][1] *= corr[0];
            o[i][2] *= corr[1];
            o[i][3] *= corr[1];
        }

        // O += P V, 16 tokens at a time: this thread's A entries are tokens 16k + 2tq (+1)
        // from n-tile 2k and 16k + 8 + 2tq (+1) from n-tile 2k + 1.
#pragma unroll
        for (int k = 0; k < 2; k++) {
            if (16 * k >= cnt) continue; // warp-uniform
            const int ta = 16 * k + 2 * tq;
            const int tok[4] = {ta, ta + 1, ta + 8, ta + 9};
            bool ok[4];
#pragma unroll
            for (int e = 0; e < 4; e++) ok[e] = tok[e] < cnt;
            for (int vb = 0; vb < DV / 32; vb++) {
                float dv[4];
#pragma unroll
                for (int e = 0; e < 4; e++) dv[e] = ok[e] ? v_scale(V_ROW_AT(tok[e]) + vb * V_GB) : 0.0f;
                unsigned int a[4];
                a[0] = pack2(sc[2 * k][0] * dv[0], sc[2 * k][1] * dv[1]);
                a[1] = pack2(sc[2 * k][2] * dv[0], sc[2 * k][3] * dv[1]);
                a[2] = pack2(sc[2 * k + 1][0] * dv[2], sc[2 * k + 1][1] * dv[3]);
                a[3] = pack2(sc[2 * k + 1][2] * dv[2], sc[2 * k + 1][3] * dv[3]);
#pragma unroll
                for (int nn = 0; nn < 4; nn++) {
                    const int j = 8 * nn + gr; // dimension in the group
                    const unsigned char* g0 = V_ROW_AT(tok[0]) + vb * V_GB;
                    const unsigned char* g1 = V_ROW_AT(tok[1]) + vb * V_GB;
                    const unsigned char* g2 = V_ROW_AT(tok[2]) + vb * V_GB;
                    const unsigned char* g3 = V_ROW_AT(tok[3]) + vb * V_GB;
                    mma_16816(o[4 * vb + nn], a, v_pair(g0, g1, ok[0], ok[1], j),
                              v_pair(g2, g3, ok[2], ok[3], j));
                }
            }
        }
#undef K_ROW_AT
#undef V_ROW_AT
        __syncwarp();
        stage ^= 1;
    }

    // This warp's partial of each query head of the group: rows gr, gr + 8.
    const long long n_part = (long long)n_splits * WARPS;
    const long long slot = (long long)split * WARPS + warp;
    float* base = part + ((long long)seq * h_q + (long long)head * G) * n_part * PART;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = gr + 8 * r;
        if (row >= G) continue;
        float* out = base + ((long long)row * n_part + slot) * PART;
#pragma unroll
        for (int i = 0; i < NT; i++) {
            out[8 * i + 2 * tq] = o[i][2 * r];
            out[8 * i + 2 * tq + 1] = o[i][2 * r + 1];
        }
        if (tq == 0) {
            out[DV] = m[r];
            out[DV + 1] = l[r];
            out[DV + 2] = seen[r] ? 1.0f : 0.0f;
        }
    }
}
#endif
