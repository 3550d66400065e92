// rotq CUDA kernels: decode attention (one query row per sequence, batched sequences of
// different lengths) straight from a quantized K/V cache, split over the cache
// (flash-decoding) and merged by a second kernel (`decode_combine`, which the tensor-core
// kernel of decode_mma.cu uses too). Compiled at run time by NVRTC after formats.cuh, elem.cuh
// and common.cuh; the host emits the module's shape and layout as `DecodeTraits` (see
// decode_module.rs).
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

// The head dimensions of K and V and the group (query heads per KV head), by their usual names.
enum : int { D = DecodeTraits::kHeadDim };
enum : int { DV = DecodeTraits::kHeadDimV };
enum : int { G = DecodeTraits::kGroup };

// The decode kernels' numbers: the host's (DecodeTraits), those that follow from them, and
// what the kernels rely on.
struct Decode : DecodeTraits {
    enum : int { kThreads = kWarps * 32 };
    // Rows a whole number of words long move with 4-byte cp.async; others with 2-byte copies.
    enum : int { kWordCopies = kKRowBytes % 4 == 0 && kVRowBytes % 4 == 0 };
    // The weighted sum: lanes own 4-value chunks of the V row (kChunks of them,
    // kChunksPerLane per lane); with fewer chunks than lanes, kSets sets of lanes split the
    // tile's tokens.
    enum : int { kChunks = DV / 4 };
    enum : int { kChunksPerLane = (kChunks + 31) / 32 };
    enum : int { kSets = kChunks >= 32 ? 1 : 32 / kChunks };
    // 32-value groups of a K and a V row.
    enum : int { kKGroups = D / 32 };
    enum : int { kVGroups = DV / 32 };

    static_assert(D % 32 == 0 && DV % 32 == 0, "head dimensions are multiples of 32");
    static_assert(kKRowBytes == D / KFormat::kBlockSize * KFormat::kBlockBytes, "K row size");
    static_assert(kVRowBytes == DV / VFormat::kBlockSize * VFormat::kBlockBytes, "V row size");
    static_assert(kPartFloats == DV + 3, "a partial: DV outputs, then m, l, seen");
    static_assert(kCombineBytes == 4 * DV, "decode_combine merges one f32 row");
    // The f32 kernel: staged rows an odd number of words apart, so that 32 lanes reading the
    // same offset of 32 rows hit 32 different banks; per warp two stages and the weights.
    static_assert(kKStrideWords % 2 == 1 && 4 * kKStrideWords >= kKRowBytes, "K stride");
    static_assert(kVStrideWords % 2 == 1 && 4 * kVStrideWords >= kVRowBytes, "V stride");
    static_assert(kStageWords == 32 * (kKStrideWords + kVStrideWords), "a stage: 32 K, 32 V rows");
    static_assert(kWarpWords == 2 * kStageWords + 32 * G, "two stages and a tile's weights");
    static_assert(kTensorCores == (RQ_TENSOR_CORES != 0), "the host's two words agree");
#ifdef RQ_MASK
    static_assert(!kTensorCores, "the mask is the f32 kernel's");
#endif
    // The f32 kernel (launched when !kTensorCores) takes one query row and one KV head per
    // block, its warps each a stream of tiles with two stages of K and V rows.
    static_assert(kTensorCores ||
                      (kQueryRows == 1 && !kPairs && !kSplitV && kHeads == 1 && kStreams == kWarps),
                  "the f32 kernel: one row and one KV head per block, a stream per warp");
    static_assert(kTensorCores || kQueryBytes == 4 * G * D, "the f32 kernel's queries");
    static_assert(kTensorCores || kSmemBytes == kQueryBytes + kWarps * 4 * kWarpWords,
                  "the f32 kernel's shared memory: the queries, then each warp's share");
};

// Values [32c, 32c + 32) of a row, dequantized.
RQ_FN void k_chunk(const unsigned char* row, int c, float* out) {
#if RQ_TQ_K
    RQ_CAT(rq_tq_values_, KFMT)(row, 32 * c, 32, out);
#elif RQ_CAT(RQ_BLOCK_SIZE_, KFMT) == 32
#pragma unroll
    for (int e = 0; e < 8; e++)
        RQ_CAT(rq_dequantize4_, KFMT)(row + c * KFormat::kBlockBytes, 4 * e, out + 4 * e);
#else
#pragma unroll
    for (int e = 0; e < 32; e++)
        RQ_CAT(rq_dequantize_, KFMT)(row + (c * 32 + e) * KFormat::kBlockBytes, out + e);
#endif
}

// Values [i, i + 4) of a row (i a multiple of 4), dequantized.
RQ_FN void v_four(const unsigned char* row, int i, float* out) {
#if RQ_TQ_V
    RQ_CAT(rq_tq_values_, VFMT)(row, i, 4, out);
#elif RQ_CAT(RQ_BLOCK_SIZE_, VFMT) == 32
    RQ_CAT(rq_dequantize4_, VFMT)(row + (i / 32) * VFormat::kBlockBytes, i % 32, out);
#else
#pragma unroll
    for (int e = 0; e < 4; e++)
        RQ_CAT(rq_dequantize_, VFMT)(row + (i + e) * VFormat::kBlockBytes, out + e);
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

// Starts copying the rows of tokens [t0, t0 + n) of this warp's KV head into `stage`; lane i
// holds in `row` the cache row index of token t0 + i. Every lane of the warp calls it.
RQ_FN void stage_tile(unsigned int* stage, const unsigned char* kc, const unsigned char* vc,
                      long long row, int n, int lane) {
    unsigned int* vs = stage + 32 * Decode::kKStrideWords;
    if constexpr (Decode::kWordCopies) {
        const int KW = Decode::kKRowBytes / 4, VW = Decode::kVRowBytes / 4;
        for (int first = 0; first < n * KW; first += 32) {
            int item = first + lane;
            bool active = item < n * KW;
            int i = active ? item / KW : 0, j = item % KW;
            long long r = __shfl_sync(FULL_MASK, row, i);
            if (active)
                asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                                 smem_addr(stage + i * Decode::kKStrideWords + j)),
                             "l"(kc + r * Decode::kKRowBytes + 4 * j));
        }
        for (int first = 0; first < n * VW; first += 32) {
            int item = first + lane;
            bool active = item < n * VW;
            int i = active ? item / VW : 0, j = item % VW;
            long long r = __shfl_sync(FULL_MASK, row, i);
            if (active)
                asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                                 smem_addr(vs + i * Decode::kVStrideWords + j)),
                             "l"(vc + r * Decode::kVRowBytes + 4 * j));
        }
    } else {
        const int KH = Decode::kKRowBytes / 2, VH = Decode::kVRowBytes / 2;
        for (int first = 0; first < n * KH; first += 32) {
            int item = first + lane;
            bool active = item < n * KH;
            int i = active ? item / KH : 0, j = item % KH;
            long long r = __shfl_sync(FULL_MASK, row, i);
            if (active)
                reinterpret_cast<unsigned short*>(stage + i * Decode::kKStrideWords)[j] =
                    reinterpret_cast<const unsigned short*>(kc + r * Decode::kKRowBytes)[j];
        }
        for (int first = 0; first < n * VH; first += 32) {
            int item = first + lane;
            bool active = item < n * VH;
            int i = active ? item / VH : 0, j = item % VH;
            long long r = __shfl_sync(FULL_MASK, row, i);
            if (active)
                reinterpret_cast<unsigned short*>(vs + i * Decode::kVStrideWords)[j] =
                    reinterpret_cast<const unsigned short*>(vc + r * Decode::kVRowBytes)[j];
        }
    }
    asm volatile("cp.async.commit_group;\n" ::);
}

// Decode attention. Grid: (KV heads, splits, sequences); `q` is [sequences, G * n_heads, D],
// `lens[b]` the tokens in sequence b's cache and `pos[b]` its query's position. Row b's table is
// `table + row_table[b]` when `row_table` is given (the batch API: rows of one sequence share
// it), else `table + b * table_stride`; with no table, page `row_table[b]` (else b) holds the
// row's tokens contiguously. Split s covers
// tokens [s * split_tokens, (s + 1) * split_tokens) of the visible ones. Writes the partials
// `part` [sequences, G * n_heads, splits * Decode::kWarps, Decode::kPartFloats].
extern "C" __global__ void __launch_bounds__(Decode::kThreads)
    decode_attention(const elem_t* q, const unsigned char* kc, const unsigned char* vc,
                     const unsigned int* table, long long table_stride, const long long* row_table,
                     long long page_tokens, const long long* lens, const long long* pos,
                     long long n_heads, int causal, long long window, float softcap,
                     float score_scale, int q_log_p, int q_m, const unsigned long long* q_base,
                     const float* q_signs, float q_scale, long long split_tokens, long long n_rows,
                     float* part
#ifdef RQ_MASK
                     ,
                     const float* mask, long long mask_stride
#endif
    ) {
    (void)n_rows;  // one row per block here
    const Rot qrot = {q_log_p, q_m, q_base, q_signs, q_scale};
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4);  // [G][D]
    const int head = blockIdx.x, split = blockIdx.y, seq = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_splits = gridDim.y;
    const long long h_q = n_heads * G;

    // The group's queries: rotated, then scaled.
    const elem_t* qg = q + ((long long)seq * h_q + (long long)head * G) * D;
    for (int i = threadIdx.x; i < G * D; i += Decode::kThreads) qs[i] = elem_to_f32(qg[i]);
    __syncthreads();
    smem_rotate(qs, G, D, qrot, 0);
    for (int i = threadIdx.x; i < G * D; i += Decode::kThreads) qs[i] *= score_scale;
    __syncthreads();

    // Visible tokens of this split.
    long long n = lens[seq], p = pos[seq];
    long long hi = causal ? (n < p + 1 ? n : p + 1) : n;
    long long lo = window > 0 ? (p + 1 - window > 0 ? p + 1 - window : 0) : 0;
    if (lo > hi) lo = hi;
    long long s_lo = lo + split * split_tokens, s_hi = s_lo + split_tokens;
    if (s_lo > hi) s_lo = hi;
    if (s_hi > hi) s_hi = hi;

    unsigned int* wbuf = reinterpret_cast<unsigned int*>(qs + G * D) + warp * Decode::kWarpWords;
    float* ps = reinterpret_cast<float*>(wbuf + 2 * Decode::kStageWords);  // [32][G]

    float m[G], l[G];
    bool seen[G];
#ifdef RQ_MASK
    // Whether a key this warp saw was shown (not hidden by the mask): decode_combine gives a
    // row whose every key is hidden zeros, whatever its partials hold.
    bool any_shown = false;
#endif
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
        seen[g] = false;
    }
    float acc[G][4 * Decode::kChunksPerLane];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int e = 0; e < 4 * Decode::kChunksPerLane; e++) acc[g][e] = 0.0f;

    // This lane's set and first chunk of the weighted sum.
    const int set = Decode::kChunks >= 32 ? 0 : lane / Decode::kChunks;
    const int chunk0 = Decode::kChunks >= 32 ? lane : lane % Decode::kChunks;
    const bool sum_lane = set < Decode::kSets;

    // The cache row of token t (of this sequence and head): through the row's own table
    // offset (or, contiguous, its sequence) when the host gives one per row.
    const long long tbase = row_table ? row_table[seq] : (table ? seq * table_stride : seq);
    auto row_of = [&](long long t) -> long long {
        long long page = table ? (long long)table[tbase + t / page_tokens] : tbase;
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
    for (; t0 < s_hi; t0 += 32LL * Decode::kWarps) {
        const int cnt = (int)(s_hi - t0 < 32 ? s_hi - t0 : 32);
        long long next = t0 + 32LL * Decode::kWarps;
        if (next < s_hi) {
            long long t = next + lane;
            int ncnt = (int)(s_hi - next < 32 ? s_hi - next : 32);
            stage_tile(wbuf + (stage ^ 1) * Decode::kStageWords, kc, vc, t < s_hi ? row_of(t) : 0,
                       ncnt, lane);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncwarp();
        const unsigned int* ks = wbuf + stage * Decode::kStageWords;
        const unsigned int* vs = ks + 32 * Decode::kKStrideWords;

        // Scores of this lane's token.
        const bool valid = lane < cnt;
#ifdef RQ_MASK
        // The caller's additive mask (the batch API's: row `seq`, this sequence's key t), added
        // after the soft-cap; a −∞ entry hides its key.
        const float mv = valid ? mask[(long long)seq * mask_stride + t0 + lane] : 0.0f;
        any_shown = __any_sync(FULL_MASK, valid && mv != NEG_INF) || any_shown;  // every lane votes
#endif
        float s[G];
#pragma unroll
        for (int g = 0; g < G; g++) s[g] = 0.0f;
        if (valid) {
            const unsigned char* krow =
                reinterpret_cast<const unsigned char*>(ks + lane * Decode::kKStrideWords);
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
#ifdef RQ_MASK
#pragma unroll
            for (int g = 0; g < G; g++) s[g] += mv;
#endif
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
                for (int e = 0; e < 4 * Decode::kChunksPerLane; e++) acc[g][e] *= corr[g];
            for (int u = set; u < cnt; u += Decode::kSets) {
                const unsigned char* vrow =
                    reinterpret_cast<const unsigned char*>(vs + u * Decode::kVStrideWords);
                float w[G];
#pragma unroll
                for (int g = 0; g < G; g++) w[g] = ps[u * G + g];
#pragma unroll
                for (int k = 0; k < Decode::kChunksPerLane; k++) {
                    int ch = chunk0 + 32 * k;
                    if (ch < Decode::kChunks) {
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
        __syncwarp();  // the stage and the weights are rewritten next
        stage ^= 1;
    }

    // The sets' sums, into set 0.
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int e = 0; e < 4 * Decode::kChunksPerLane; e++) {
            float total = acc[g][e];
            for (int o = 1; o < Decode::kSets; o++)
                total += __shfl_sync(FULL_MASK, acc[g][e], (lane + o * Decode::kChunks) & 31);
            acc[g][e] = total;
        }

    // This warp's partial of each query head of the group.
    const long long n_part = (long long)n_splits * Decode::kWarps;
    const long long slot = (long long)split * Decode::kWarps + warp;
    float* base =
        part + ((long long)seq * h_q + (long long)head * G) * n_part * Decode::kPartFloats;
    if (set == 0) {
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int k = 0; k < Decode::kChunksPerLane; k++) {
                int ch = chunk0 + 32 * k;
                if (ch < Decode::kChunks) {
                    float* out =
                        base + ((long long)g * n_part + slot) * Decode::kPartFloats + 4 * ch;
#pragma unroll
                    for (int e = 0; e < 4; e++) out[e] = acc[g][4 * k + e];
                }
            }
    }
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float* out = base + ((long long)g * n_part + slot) * Decode::kPartFloats + DV;
            out[0] = m[g];
            out[1] = l[g];
            out[2] = seen[g] ? 1.0f : 0.0f;
#ifdef RQ_MASK
            out[2] += any_shown ? 2.0f : 0.0f;
#endif
        }
    }
}

// Whether a partial merges, from its state `st` (m, l, flags): it saw a visible key (a score
// above -Inf, a NaN sum, or the seen flag), and its row has a key the mask did not hide
// (`shown`; always, unmasked).
RQ_FN bool live_part(const float* st, bool shown) {
    return (st[0] != NEG_INF || isnan(st[1]) || st[2] != 0.0f) && shown;
}

// Merges the `n_part` partials of each (sequence, query head): grid (query heads, sequences).
// A partial that saw no visible key adds nothing; with none at all the output is zeros; when
// the visible scores were all -Inf the output is NaN (the oracle's 0 / 0). The merged row is
// divided by l, rotated back by the V rotation and stored as elem_t; `lse`, when given,
// receives each row's log-sum-exp of its scores, m + ln l (-Inf with no visible key).
extern "C" __global__ void decode_combine(const float* part, long long n_part, int v_log_p, int v_m,
                                          const unsigned long long* v_base, const float* v_signs,
                                          float v_scale, elem_t* out, float* lse) {
    const Rot vrot = {v_log_p, v_m, v_base, v_signs, v_scale};
    extern __shared__ float4 smem4[];
    float* o = reinterpret_cast<float*>(smem4);  // [DV]
    const long long row = (long long)blockIdx.y * gridDim.x + blockIdx.x;
    const float* base = part + row * n_part * Decode::kPartFloats;
    float mx = NEG_INF;
    bool any = false;
#ifdef RQ_MASK
    // A row whose every visible key the mask hid has no key: zeros and -Inf, whatever its
    // partials hold (NaN scores, or 0 x Inf in V); otherwise every partial that saw a key
    // merges, hidden ones with weight 0, so NaN and Inf there propagate as the oracle has it.
    bool shown = false;
    for (long long i = 0; i < n_part; i++)
        if (base[i * Decode::kPartFloats + DV + 2] >= 2.0f) shown = true;
#else
    const bool shown = true;
#endif
    for (long long i = 0; i < n_part; i++) {
        const float* st = base + i * Decode::kPartFloats + DV;
        if (live_part(st, shown)) {
            any = true;
            mx = fmaxf(mx, st[0]);
        }
    }
    for (int d = threadIdx.x; d < DV; d += blockDim.x) {
        float l = 0.0f, a = 0.0f;
        if (any) {
            for (long long i = 0; i < n_part; i++) {
                const float* pi = base + i * Decode::kPartFloats;
                if (!live_part(pi + DV, shown)) continue;
                float w = expf(pi[DV] - mx);
                l += pi[DV + 1] * w;
                a += pi[d] * w;
            }
            a /= l;
        }
        o[d] = a;
    }
    if (lse && threadIdx.x == 0) {
        float l = 0.0f;
        for (long long i = 0; any && i < n_part; i++) {
            const float* st = base + i * Decode::kPartFloats + DV;
            if (live_part(st, shown)) l += st[1] * expf(st[0] - mx);
        }
        lse[row] = any ? mx + logf(l) : NEG_INF;
    }
    __syncthreads();
    smem_rotate(o, 1, DV, vrot, 1);
    for (int d = threadIdx.x; d < DV; d += blockDim.x) out[row * DV + d] = f32_to_elem(o[d]);
}

// The OR of a value over the warp's lanes (every lane gets it).
RQ_FN unsigned int warp_or(unsigned int v) {
    for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The batch API's rows (one warp a row, rows r < max_rows): which sequence b a query row belongs
// to (query rows qsl[b] .. qsl[b + 1]), and from it the row's `lens`, `pos` and `row_table`
// for decode_attention. Tables: `kind` 0 contiguous (sequence b's tokens are page b), 1
// rectangular (`table` [n_seqs, max_blocks]), 2 CSR (`table` the indices, `indptr` [n_seqs + 1],
// `n_indices` of them). A row past qsl[n_seqs] sees no key. A sequence that breaks the caller's
// contract gives its rows no key and sets bits of `status`: 1 query_start_loc (not from 0,
// decreasing, or past max_rows) or indptr (decreasing, past n_indices); 2 a length beyond its
// table; 4 (`checked`) a page outside the pool; 8 more rows than tokens without q_positions;
// 16 a length beyond the plan's max_len (its splits would not cover it).
extern "C" __global__ void batch_rows(const unsigned int* qsl, const unsigned int* seq_lens,
                                      const unsigned int* q_positions, const unsigned int* table,
                                      const unsigned int* indptr, int kind, long long max_blocks,
                                      long long n_indices, long long page_tokens, long long n_pages,
                                      long long n_seqs, long long max_rows, long long max_len,
                                      int checked, long long* lens, long long* pos,
                                      long long* row_table, unsigned int* status) {
    const long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (r >= max_rows) return;
    unsigned int bad = 0;
    // The offsets themselves: every row reads them (a few hundred words, cached).
    if (qsl[0] != 0 || (long long)qsl[n_seqs] > max_rows) bad |= 1;
    for (long long b = lane; b < n_seqs; b += 32)
        if (qsl[b] > qsl[b + 1] || (kind == 2 && indptr[b] > indptr[b + 1])) bad |= 1;
    if (kind == 2 && (long long)indptr[n_seqs] > n_indices) bad |= 1;
    bad = warp_or(bad);
    // The last b with qsl[b] <= r.
    long long lo = 0, hi = n_seqs;
    while (hi - lo > 1) {
        const long long mid = (lo + hi) / 2;
        if ((long long)qsl[mid] <= r)
            lo = mid;
        else
            hi = mid;
    }
    const long long b = lo, start = qsl[b], end = qsl[b + 1];
    const bool mine = n_seqs > 0 && start <= r && r < end;
    long long n = 0, p = 0, off = 0;
    if (mine && !bad) {
        n = seq_lens[b];
        const long long n_q = end - start, i = r - start;
        if (q_positions)
            p = (long long)q_positions[b] + i;
        else if (n_q > n)
            bad |= 8;
        else
            p = n - n_q + i;
        long long cap;
        if (kind == 0) {
            off = b;
            cap = page_tokens;
            if (b >= n_pages) bad |= 4;
        } else if (kind == 1) {
            off = b * max_blocks;
            cap = max_blocks * page_tokens;
        } else {
            off = indptr[b];
            cap = ((long long)indptr[b + 1] - off) * page_tokens;
        }
        if (n > cap) bad |= 2;
        if (n > max_len) bad |= 16;
        if (checked && kind != 0 && !(bad & 2)) {
            const long long used = (n + page_tokens - 1) / page_tokens;
            for (long long j = lane; j < used; j += 32)
                if ((long long)table[off + j] >= n_pages) bad |= 4;
            bad = warp_or(bad);
        }
    }
    if (lane == 0) {
        const bool live = mine && !bad;
        lens[r] = live ? n : 0;
        pos[r] = live ? p : 0;
        row_table[r] = live ? off : 0;
        if (bad) atomicOr(status, bad);
    }
}
