// rotq CUDA kernels: decode attention on the tensor cores (decode_attention_mma).
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
// with zeros (scale 0: no NaN from stale bytes). With kPairs a block takes two KV heads 2x and 2x +
// 1, whose rows of a token are adjacent: warps 2s and 2s + 1 take the same tiles (stream s), one
// head each, and share each staged tile of both heads' rows, the even warp copying the K rows and
// the odd one the V rows, 16 bytes at a time (q4_0's 72-byte rows alone allow 8-byte copies, twice
// as many); a barrier of the two warps per tile replaces the warp's own. P and Q are rounded to the
// element type once, as in flash attention; the softmax, the K scales and all sums are f32. This
// file follows decode.cu in a module (it uses its traits and decode_combine).

// The tensor-core kernel's numbers that follow from the host's, and what it relies on.
struct DecodeMma : Decode {
    // Bytes of one staged row: the block's heads' rows of one token.
    enum : int { kStagedKBytes = kHeads * kKRowBytes };
    enum : int { kStagedVBytes = kHeads * kVRowBytes };
    // Columns of the mma: the group's query heads for each of the block's query rows, in
    // tiles of 8.
    enum : int { kColumns = G * kQueryRows };
    enum : int { kColumnTiles = (kColumns + 7) / 8 };

    static_assert(kTensorCores, "decode_mma.cu is in tensor-core modules only");
    static_assert(kHeads == (kPairs ? 2 : 1), "two KV heads per block with kPairs, else one");
    static_assert(kStreams * kHeads == kWarps, "streams");
    // (The host pairs only where this holds: the second head's rows then start 8-byte aligned,
    // as the code-word loads assume.)
    static_assert(!kPairs ||
                      (kWarps % 2 == 0 && kStagedKBytes % 16 == 0 && kStagedVBytes % 16 == 0),
                  "pairs need an even number of warps and pairs of rows of whole 16-byte units");
    // Staged rows: 16-byte aligned, an odd number of 16-byte units apart (fewer bank
    // conflicts); two stages of K rows and two of V rows, or with kSplitV one of V rows (the
    // loop alternates between two stages: cur ^ 1).
    static_assert(kKStageStride % 32 == 16 && kKStageStride >= kStagedKBytes, "K stage stride");
    static_assert(kVStageStride % 32 == 16 && kVStageStride >= kStagedVBytes, "V stage stride");
    static_assert(kTileBytes == 32 * (kKStageStride + kVStageStride), "a stage: 32 K and V rows");
    static_assert(kStreamBytes ==
                      (kSplitV ? 32 * (2 * kKStageStride + kVStageStride) : 2 * kTileBytes),
                  "a stream's stages");
    // The widest copy both row sizes allow (the cache buffers are whole allocations, 256-aligned).
    static_assert(kCopyBytes == ((kStagedKBytes % 16 == 0 && kStagedVBytes % 16 == 0) ? 16
                                 : (kStagedKBytes % 8 == 0 && kStagedVBytes % 8 == 0) ? 8
                                 : (kStagedKBytes % 4 == 0 && kStagedVBytes % 4 == 0) ? 4
                                                                                      : 2),
                  "the widest copy");
    // Blocks per multiprocessor to keep at least 16 warps resident (128 registers per thread),
    // where that needs no spills: one column tile and head dimensions up to 128.
    static_assert(kMinBlocks == ((kColumnTiles == 1 && D <= 128 && DV <= 128 && kWarps <= 16)
                                     ? 16 / kWarps
                                     : 1),
                  "the launch bounds' blocks");
    static_assert(kQueryBytes == 4 * kHeads * kColumns * D, "the queries");
    static_assert(kSmemBytes == kQueryBytes + kStreams * kStreamBytes,
                  "the shared memory: the queries, then each stream's stages");
};

// Starts copying one row per token of the tile (ROW bytes, DecodeMma::kCopyBytes at a time) into
// `dst`, rows SB bytes apart; rows of tokens from `cnt` on are zero-filled. Lane i holds in `row`
// the cache row of token i; when `linear` (warp-uniform), token i's row is `first + i * n_heads`,
// and no row needs to be passed between lanes. Pieces FROM.. of the rows: the lanes take P pieces
// (a power of two) of 32 / P rows per copy, so that each copy reads whole spans of rows; the
// remaining pieces follow the same way.
template <int ROW, int SB, int FROM>
RQ_FN void stage_rows(unsigned char* dst, const unsigned char* base, long long row, long long first,
                      long long n_heads, bool linear, int cnt, int lane) {
    constexpr int W = ROW / DecodeMma::kCopyBytes, LEFT = W - FROM;
    constexpr int P = LEFT >= 32   ? 32
                      : LEFT >= 16 ? 16
                      : LEFT >= 8  ? 8
                      : LEFT >= 4  ? 4
                      : LEFT >= 2  ? 2
                                   : 1;
    constexpr int R = 32 / P;
    const int r0 = lane / P, piece = FROM + lane % P;
    unsigned char* d = dst + r0 * SB + piece * DecodeMma::kCopyBytes;
    if (linear) {
        // (The source advances by a constant; a whole tile, the usual case, needs no sizes.)
        const long long step = (long long)R * n_heads * ROW;
        const unsigned char* src =
            base + (first + r0 * n_heads) * ROW + piece * DecodeMma::kCopyBytes;
        if (cnt >= 32) {
#pragma unroll
            for (int it = 0; it < P; it++, src += step)
                cp_async_all<DecodeMma::kCopyBytes, false>(d + it * R * SB, src);
        } else {
#pragma unroll
            for (int it = 0; it < P; it++, src += step)
                cp_async<DecodeMma::kCopyBytes, false>(
                    d + it * R * SB, src, it * R + r0 < cnt ? DecodeMma::kCopyBytes : 0);
        }
    } else {
        const unsigned long long mine =
            reinterpret_cast<unsigned long long>(base + (lane < cnt ? row : 0LL) * ROW);
#pragma unroll
        for (int it = 0; it < P; it++) {
            const unsigned long long src = __shfl_sync(FULL_MASK, mine, it * R + r0);
            cp_async<DecodeMma::kCopyBytes, false>(
                d + it * R * SB,
                reinterpret_cast<const unsigned char*>(src) + piece * DecodeMma::kCopyBytes,
                it * R + r0 < cnt ? DecodeMma::kCopyBytes : 0);
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

// Copies a tile's staged rows (row indices in units of DecodeMma::kStagedKBytes /
// DecodeMma::kStagedVBytes): its K rows to `kd` where `do_k`, its V rows to `vd` where `do_v`
// (warp-uniform).
RQ_FN void stage_tile_mma(unsigned char* kd, unsigned char* vd, const unsigned char* kc,
                          const unsigned char* vc, long long row, long long first,
                          long long n_heads, bool linear, int cnt, int lane, bool do_k, bool do_v) {
    if constexpr (DecodeMma::kCopyBytes >= 4) {
        if (do_k)
            stage_rows<DecodeMma::kStagedKBytes, DecodeMma::kKStageStride, 0>(
                kd, kc, row, first, n_heads, linear, cnt, lane);
        if (do_v)
            stage_rows<DecodeMma::kStagedVBytes, DecodeMma::kVStageStride, 0>(
                vd, vc, row, first, n_heads, linear, cnt, lane);
    } else {
        if (do_k)
            stage_rows_2<DecodeMma::kStagedKBytes, DecodeMma::kKStageStride>(
                kd, kc, row, first, n_heads, linear, cnt, lane);
        if (do_v)
            stage_rows_2<DecodeMma::kStagedVBytes, DecodeMma::kVStageStride>(
                vd, vc, row, first, n_heads, linear, cnt, lane);
    }
}

// Which of a K group's dimensions the `e`th value (0, 1) of this thread's code pair `pr` (0..3)
// is: the query fragments are gathered in the same order.
RQ_FN int k_dim(int tq, int pr, int e) {
#if RQ_K_CODES == 1
    return (pr >> 1) * 16 + 4 * tq + (pr & 1) + 2 * e;
#else
    return 8 * tq + 2 * pr + e;
#endif
}

// Which of a V group's dimensions row r (0..15) of its M-tile mt (0, 1) holds.
RQ_FN int v_dim(int mt, int r) {
#if RQ_V_CODES == 1
    return 16 * mt + 2 * (r & 7) + (r >> 3);
#else
    return 4 * (r & 7) + 2 * mt + (r >> 3);
#endif
}

// This thread's four code pairs of one token's K group (`aligned`: its code bytes start 4-byte
// aligned, a constant of the group index).
RQ_FN void k_pairs(const unsigned char* grp, int tq, bool aligned, unsigned int* out) {
#if RQ_K_CODES == 1
    const unsigned int x = ld_u32(grp + 2 + 4 * tq, aligned);
    nibbles4(x, out[0], out[2]);
    nibbles4(x >> 8, out[1], out[3]);
#elif RQ_K_CODES == 2
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
#if RQ_V_CODES == 1
    (void)aligned;
    const unsigned int y = __byte_perm(ld_u16(ga + 2 + 2 * gr), ld_u16(gb + 2 + 2 * gr), 0x5410);
    nibbles4(y, out[0], out[2]);
    nibbles4(y >> 8, out[1], out[3]);
#elif RQ_V_CODES == 2
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
#if RQ_V_CODES != 0 && ELEM == 1
    unsigned int r, s = __byte_perm(ld_u16(ga), ld_u16(gb), 0x5410);
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(p), "r"(s));
    return r;
#else
    float lo, hi;
    unpack2(p, lo, hi);
    return pack2(lo * v_scale(ga), hi * v_scale(gb));
#endif
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

extern "C" __global__ void __launch_bounds__(DecodeMma::kThreads, DecodeMma::kMinBlocks)
    decode_attention_mma(const elem_t* q, const unsigned char* kc, const unsigned char* vc,
                         const unsigned int* table, long long table_stride,
                         const long long* row_table, long long page_tokens, const long long* lens,
                         const long long* pos, long long n_heads, int causal, long long window,
                         float softcap, float score_scale, int q_log_p, int q_m,
                         const unsigned long long* q_base, const float* q_signs, float q_scale,
                         long long split_tokens, long long n_rows, float* part) {
    const Rot qrot = {q_log_p, q_m, q_base, q_signs, q_scale};
    extern __shared__ float4 smem4[];
    float* qs = reinterpret_cast<float*>(smem4);  // [DecodeMma::kHeads][DecodeMma::kColumns][D]
    // Rows seq .. seq + DecodeMma::kQueryRows - 1 (those below n_rows); with DecodeMma::kQueryRows
    // > 1 they share one cache (the host's shared mode), read through row seq's table.
    const int split = blockIdx.y, seq = blockIdx.z * DecodeMma::kQueryRows;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gr = lane >> 2, tq = lane & 3;  // mma group (row) and thread in the group
    // This warp's KV head (its place `hh` among the block's heads) and its stream of tiles.
    const int hh = DecodeMma::kPairs ? warp & 1 : 0, stream = DecodeMma::kPairs ? warp >> 1 : warp;
    const int head = blockIdx.x * DecodeMma::kHeads + hh;
    const int n_splits = gridDim.y;
    const long long h_q = n_heads * G;

    // Column c of head slot k is query head c % G of row seq + c / G, of KV head
    // x·DecodeMma::kHeads + k.
    for (int i = threadIdx.x; i < DecodeMma::kHeads * DecodeMma::kColumns * D;
         i += DecodeMma::kThreads) {
        const int k = i / (DecodeMma::kColumns * D), c = i / D % DecodeMma::kColumns,
                  r = seq + c / G;
        const long long qh = (long long)(blockIdx.x * DecodeMma::kHeads + k) * G + c % G;
        qs[i] = r < n_rows ? elem_to_f32(q[((long long)r * h_q + qh) * D + i % D]) : 0.0f;
    }
    __syncthreads();
    smem_rotate(qs, DecodeMma::kHeads * DecodeMma::kColumns, D, qrot, 0);
    for (int i = threadIdx.x; i < DecodeMma::kHeads * DecodeMma::kColumns * D;
         i += DecodeMma::kThreads)
        qs[i] *= score_scale;
    __syncthreads();

    // Q^T as B fragments: column gr is query head 8h + gr (zero past G); the rows are this
    // thread's code pairs' dimensions (k_dim) of each group.
    unsigned int qb[DecodeMma::kColumnTiles][DecodeMma::kKGroups][4];
#pragma unroll
    for (int h = 0; h < DecodeMma::kColumnTiles; h++) {
        const int hd = 8 * h + gr;
        const float* qr = qs + (hh * DecodeMma::kColumns + (hd < DecodeMma::kColumns ? hd : 0)) * D;
#pragma unroll
        for (int b = 0; b < DecodeMma::kKGroups; b++)
#pragma unroll
            for (int pr = 0; pr < 4; pr++)
                qb[h][b][pr] = hd < DecodeMma::kColumns ? pack2(qr[32 * b + k_dim(tq, pr, 0)],
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
    for (int r = 1; r < DecodeMma::kQueryRows; r++) {
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
    // This split's part of each of this thread's columns' ranges (empty past DecodeMma::kColumns or
    // n_rows).
    // (`c_live`: a real column; padding columns' results are never stored.)
    long long c_lo[DecodeMma::kColumnTiles][2], c_hi[DecodeMma::kColumnTiles][2];
    bool c_live[DecodeMma::kColumnTiles][2];
#pragma unroll
    for (int h = 0; h < DecodeMma::kColumnTiles; h++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int col = 8 * h + 2 * tq + e, r = seq + col / G;
            long long l2 = 0, h2 = 0;
            c_live[h][e] = col < DecodeMma::kColumns && r < n_rows;
            if (c_live[h][e]) visible(r, l2, h2);
            c_lo[h][e] = l2 > s_lo ? l2 : s_lo;
            c_hi[h][e] = h2 < s_hi ? h2 : s_hi;
        }

    // The stream's stages (shared by the warps of a pair).
    unsigned char* wbuf =
        reinterpret_cast<unsigned char*>(qs + DecodeMma::kHeads * DecodeMma::kColumns * D) +
        stream * DecodeMma::kStreamBytes;

    // Softmax state of this thread's query heads 8h + 2tq + e.
    float m[DecodeMma::kColumnTiles][2], l[DecodeMma::kColumnTiles][2];
    bool seen[DecodeMma::kColumnTiles][2];
    // O^T: M-tile mt (dimensions of group mt / 2, v_dim) x this thread's heads.
    float o[DecodeMma::kColumnTiles][2 * DecodeMma::kVGroups][4];
    softmax_start(m, l, seen, o);

    // The staged row of token t: the cache row of the block's first head, in units of the
    // staged rows (DecodeMma::kHeads rows of the cache; the host checked that a contiguous
    // sequence's tokens are below its capacity, and that token positions and pages fit 32 bits).
    // Row seq's table offset (or contiguous page), as in decode_attention.
    const long long s_heads = n_heads / DecodeMma::kHeads, s_head = blockIdx.x;
    const long long tbase = row_table ? row_table[seq] : (table ? seq * table_stride : seq);
    auto row_of = [&](long long t) -> long long {
        if (!table) return (tbase * page_tokens + t) * s_heads + s_head;
        const unsigned int tt = (unsigned int)t, pt = (unsigned int)page_tokens;
        const long long page = (long long)table[tbase + tt / pt];
        return (page * page_tokens + tt % pt) * s_heads + s_head;
    };
    // Starts copying tile t0's K rows to `kd` (where do_k) and V rows to `vd` (where do_v):
    // one commit group. With DecodeMma::kPairs the even warp copies K, the odd one V.
    auto stage = [&](unsigned char* kd, unsigned char* vd, long long t0, bool do_k, bool do_v) {
        if (t0 < s_hi) {
            const int cnt = (int)(s_hi - t0 < 32 ? s_hi - t0 : 32);
            // The tile's rows are evenly spaced unless it spans two pages.
            const bool linear =
                !table || (unsigned int)t0 % (unsigned int)page_tokens + cnt <= page_tokens;
            const long long first = row_of(t0);
            const long long row = !linear && lane < cnt ? row_of(t0 + lane) : first;
            stage_tile_mma(kd, vd, kc, vc, row, first, s_heads, linear, cnt, lane,
                           do_k && (!DecodeMma::kPairs || hh == 0),
                           do_v && (!DecodeMma::kPairs || hh == 1));
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    // The stream's other warp (DecodeMma::kPairs), or this warp's lanes.
    auto sync = [&]() {
        if constexpr (DecodeMma::kPairs)
            pair_sync<DecodeMma::kStreams>(stream);
        else
            __syncwarp();
    };
    // Stage s's K rows, and V rows (DecodeMma::kSplitV: the one V stage).
    auto k_stage = [&](int s) {
        return wbuf +
               s * (DecodeMma::kSplitV ? 32 * DecodeMma::kKStageStride : DecodeMma::kTileBytes);
    };
    auto v_stage = [&](int s) {
        return DecodeMma::kSplitV ? wbuf + 2 * 32 * DecodeMma::kKStageStride
                                  : k_stage(s) + 32 * DecodeMma::kKStageStride;
    };

    // Each iteration waits for its tile's copies and for the stream's other warp (its copies,
    // and its reads of the stages refilled next), then starts the next tile's copy
    // (DecodeMma::kSplitV: this tile's V rows and the next tile's K rows).
    const long long step = 32LL * DecodeMma::kStreams;
    const long long first = s_lo + 32LL * stream;
    stage(k_stage(0), v_stage(0), first, true, !DecodeMma::kSplitV);
    int cur = 0;
    for (long long t0 = first; t0 < s_hi; t0 += step) {
        asm volatile("cp.async.wait_group 0;\n" ::);
        sync();
        if (DecodeMma::kSplitV) stage(nullptr, v_stage(0), t0, false, true);
        stage(k_stage(cur ^ 1), v_stage(cur ^ 1), t0 + step, true, !DecodeMma::kSplitV);
        const int cnt = (int)(s_hi - t0 < 32 ? s_hi - t0 : 32);
        const unsigned char* ks = k_stage(cur) + hh * DecodeMma::kKRowBytes;
        const unsigned char* vs = v_stage(cur) + hh * DecodeMma::kVRowBytes;

        // Scores: st[h][c] holds tokens 16c + gr (0, 1) and 16c + gr + 8 (2, 3) for heads
        // 8h + 2tq (0, 2) and 8h + 2tq + 1 (1, 3).
        float st[DecodeMma::kColumnTiles][2][4];
#pragma unroll
        for (int h = 0; h < DecodeMma::kColumnTiles; h++)
#pragma unroll
            for (int c = 0; c < 2; c++)
#pragma unroll
                for (int e = 0; e < 4; e++) st[h][c][e] = 0.0f;
#pragma unroll
        for (int c = 0; c < 2; c++) {
            if (16 * c >= cnt) continue;  // warp-uniform
            const unsigned char* r0 = ks + (16 * c + gr) * DecodeMma::kKStageStride;
            const unsigned char* r1 = r0 + 8 * DecodeMma::kKStageStride;
#pragma unroll
            for (int b = 0; b < DecodeMma::kKGroups; b++) {
                const bool aligned = (b * KFormat::kGroupBytes + 2) % 4 == 0;
                unsigned int x0[4], x1[4];
                k_pairs(r0 + b * KFormat::kGroupBytes, tq, aligned, x0);
                k_pairs(r1 + b * KFormat::kGroupBytes, tq, aligned, x1);
                const float d0 = k_scale(r0 + b * KFormat::kGroupBytes),
                            d1 = k_scale(r1 + b * KFormat::kGroupBytes);
                const unsigned int a0[4] = {x0[0], x1[0], x0[1], x1[1]};
                const unsigned int a1[4] = {x0[2], x1[2], x0[3], x1[3]};
#pragma unroll
                for (int h = 0; h < DecodeMma::kColumnTiles; h++) {
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
            for (int h = 0; h < DecodeMma::kColumnTiles; h++)
#pragma unroll
                for (int c = 0; c < 2; c++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        st[h][c][e] = softcap * tanhf(st[h][c][e] / softcap);
        bool full = true;
#pragma unroll
        for (int h = 0; h < DecodeMma::kColumnTiles; h++)
#pragma unroll
            for (int e = 0; e < 2; e++)
                full = full && (!c_live[h][e] || (c_lo[h][e] <= t0 && t0 + 32 <= c_hi[h][e]));
        full = __all_sync(FULL_MASK, full);
        unsigned int pb[DecodeMma::kColumnTiles][2][2];
#pragma unroll
        for (int h = 0; h < DecodeMma::kColumnTiles; h++) {
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
                for (int i = 0; i < 2 * DecodeMma::kVGroups; i++) {
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

        if (DecodeMma::kSplitV) {
            // (This tile's V rows: all but the newest group, the next tile's K rows.)
            asm volatile("cp.async.wait_group 1;\n" ::);
            sync();
        }
        // O^T += V^T P^T, 16 tokens at a time: this thread's V codes are of tokens 16c + 2tq
        // (+1) and 16c + 2tq + 8 (+9).
#pragma unroll
        for (int c = 0; c < 2; c++) {
            if (16 * c >= cnt) continue;  // warp-uniform
            const unsigned char* va = vs + (16 * c + 2 * tq) * DecodeMma::kVStageStride;
            const unsigned char* vb = va + 8 * DecodeMma::kVStageStride;
#pragma unroll
            for (int b = 0; b < DecodeMma::kVGroups; b++) {
                const bool aligned = (b * VFormat::kGroupBytes + 2) % 4 == 0;
                const int off = b * VFormat::kGroupBytes;
                unsigned int ra[4], rb[4];
                v_pairs(va + off, va + DecodeMma::kVStageStride + off, gr, aligned, ra);
                v_pairs(vb + off, vb + DecodeMma::kVStageStride + off, gr, aligned, rb);
                const unsigned int a0[4] = {ra[0], ra[1], rb[0], rb[1]};
                const unsigned int a1[4] = {ra[2], ra[3], rb[2], rb[3]};
#pragma unroll
                for (int h = 0; h < DecodeMma::kColumnTiles; h++) {
                    const unsigned int b0 =
                        v_scaled(pb[h][c][0], va + off, va + DecodeMma::kVStageStride + off);
                    const unsigned int b1 =
                        v_scaled(pb[h][c][1], vb + off, vb + DecodeMma::kVStageStride + off);
                    mma_16816(o[h][2 * b], a0, b0, b1);
                    mma_16816(o[h][2 * b + 1], a1, b0, b1);
                }
            }
        }
        cur ^= 1;
    }
    asm volatile("cp.async.wait_group 0;\n" ::);

    float l_col[DecodeMma::kColumnTiles][2];
#pragma unroll
    for (int h = 0; h < DecodeMma::kColumnTiles; h++)
#pragma unroll
        for (int e = 0; e < 2; e++) l_col[h][e] = col_sum(l[h][e]);

    // This warp's partial of each of this thread's query heads, dimensions back in place.
    const long long n_part = (long long)n_splits * DecodeMma::kStreams;
    const long long slot = (long long)split * DecodeMma::kStreams + stream;
#pragma unroll
    for (int h = 0; h < DecodeMma::kColumnTiles; h++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int col = 8 * h + 2 * tq + e, r = seq + col / G;
            if (col >= DecodeMma::kColumns || r >= n_rows) continue;
            float* out =
                part + (((long long)r * h_q + (long long)head * G + col % G) * n_part + slot) *
                           DecodeMma::kPartFloats;
#pragma unroll
            for (int i = 0; i < 2 * DecodeMma::kVGroups; i++) {
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
