// rotq CUDA kernels: prefill flash attention (prefill_attention_flash).
// Prefill flash attention on the tensor cores: many query rows of one sequence against its
// cache (contiguous, or paged through `table`). A thread block takes kBlockRows = 16 · kRowTiles ·
// kWarps rows of one KV head, a row being one (query position, query head of the group) pair, so
// the group's heads share every K/V load; each warp owns 16 · kRowTiles of the rows. The block
// walks the visible tokens in tiles of kBlockN:
//   - the block's threads copy the tile's raw K and V rows into shared memory with cp.async
//     (the next tile's copy in flight while the block works on this one);
//   - they turn the raw rows into codes (f16/bf16, exact) and scales, once for the whole block:
//     K codes [kBlockN][D], V codes [kBlockN][DV], K scales (f32) and V scales;
//   - each warp computes S = Q K^T for its rows (A: the rotated, scaled queries, held in
//     registers; B: K codes read with ldmatrix), multiplying each 32-dimension group's f32
//     product by its token's K scale, then an online softmax per row, then O += P V with the V
//     scale of each 32-dimension group folded into P (B: V codes read with ldmatrix.trans).
// With RQ_WARP_SPECIALIZED (below), the copies and the conversion are a producer warpgroup's, into
// two code buffers taken in turn, while the other warps only compute. The output rows are divided
// by l, rotated back (V rotation) in shared memory and stored. The numerics are the decode
// tensor-core kernel's: Q and P rounded to the element type once, codes exact, scales and sums in
// f32. A non-finite V value (an Inf scale, an f16 row's Inf or NaN) would poison, through 0 · Inf
// in the mma, rows for which its token is masked: such tokens' codes are zeroed for the mma and
// their values added to the rows that see them in f32. Compiled at run time by NVRTC after
// formats.cuh, elem.cuh and common.cuh; the host emits the module's shape, shared-memory layout,
// launch bounds and registers as `FlashTraits` (see flash_module.rs), and defines
// RQ_WARP_SPECIALIZED and RQ_QUERIES_IN_SMEM (what the preprocessor needs of them).
//
// With RQ_WARP_SPECIALIZED (sm_90a), the kWarps consumer warps compute and a producer warpgroup
// of kProducerThreads threads copies and converts the tiles into two code buffers, the roles
// meeting at named barriers; `setmaxnreg` moves registers from the producers (which need few)
// to the consumers (two row tiles of scores and outputs each).
// The tiles' space (two stages of raw rows, the code buffers with their scales and bad-V words)
// is reused by the f32 query rows before the loop and the output rows after it. Blocks of 8
// warps (and blocks of two row tiles per warp) keep the queries in shared memory as the element
// type (rows of D + 8, read with ldmatrix at each tile), after the tiles (RQ_QUERIES_IN_SMEM),
// and take 128 registers per thread, for two blocks (16 warps) per multiprocessor; blocks of 4
// warps and one row tile hold them in registers (flash_module.rs has the measurements).

// The head dimensions of K and V and the group (query heads per KV head), by their usual names.
enum : int { D = FlashTraits::kHeadDim };
enum : int { DV = FlashTraits::kHeadDimV };
enum : int { G = FlashTraits::kGroup };

// The flash kernel's numbers that follow from the host's, and what it relies on.
struct Flash : FlashTraits {
    enum : int { kThreads = kWarps * 32 };                     // computing threads
    enum : int { kAllThreads = kThreads + kProducerThreads };  // and the producers
    // Rows per warp: kRowTiles tiles of 16, so that each K/V fragment read from shared memory
    // feeds kRowTiles products (and a block's tile conversion serves all its rows).
    enum : int { kRowsPerWarp = 16 * kRowTiles };
    enum : int { kBlockRows = kRowsPerWarp * kWarps };
    enum : int { kKGroups = D / 32 };
    enum : int { kVGroups = DV / 32 };

    static_assert(D % 32 == 0 && DV % 32 == 0, "head dimensions are multiples of 32");
    static_assert(kKRowBytes == D / KFormat::kBlockSize * KFormat::kBlockBytes, "K row size");
    static_assert(kVRowBytes == DV / VFormat::kBlockSize * VFormat::kBlockBytes, "V row size");
    static_assert(kWarpSpecialized == (RQ_WARP_SPECIALIZED != 0), "the host's two words agree");
    static_assert(kQueriesInSmem == (RQ_QUERIES_IN_SMEM != 0), "the host's two words agree");
    // Blocks of 8 warps, of two row tiles per warp or warp-specialized keep their queries in
    // shared memory; the others hold them in registers.
    static_assert(kQueriesInSmem == (kWarps >= 8 || kRowTiles >= 2 || kWarpSpecialized),
                  "queries in shared memory");
    static_assert(!kWarpSpecialized || (kWarps == 8 && kProducerThreads == 128),
                  "warp-specialized blocks: two consumer warpgroups and one producer warpgroup");
    static_assert(kWarpSpecialized || kProducerThreads == 0, "producers only when specialized");
    // The widest copy both row sizes allow; raw rows an odd number of 8-byte units apart
    // (16-byte units for 16-byte copies), so that lanes reading the same word of consecutive
    // rows meet at most two to a bank.
    static_assert(kCopyBytes == ((kKRowBytes % 16 == 0 && kVRowBytes % 16 == 0) ? 16
                                 : (kKRowBytes % 8 == 0 && kVRowBytes % 8 == 0) ? 8
                                 : (kKRowBytes % 4 == 0 && kVRowBytes % 4 == 0) ? 4
                                                                                : 2),
                  "the widest copy");
    enum : int { kRawUnit = kCopyBytes >= 16 ? 16 : 8 };
    static_assert(kKRawStride % (2 * kRawUnit) == kRawUnit && kKRawStride >= kKRowBytes,
                  "K raw stride");
    static_assert(kVRawStride % (2 * kRawUnit) == kRawUnit && kVRawStride >= kVRowBytes,
                  "V raw stride");
    static_assert(kStageBytes == kBlockN * (kKRawStride + kVRawStride), "a stage of raw rows");
    // Code rows D + 8 values apart: an odd number of 16-byte units (conflict-free ldmatrix).
    static_assert(kKCodeStride == D + 8 && kVCodeStride == DV + 8, "code strides");
    static_assert(kCodeBuffers == (kWarpSpecialized ? 2 : 1), "code buffers");
    static_assert(kCodeBufferBytes == 2 * kBlockN * (kKCodeStride + kVCodeStride),
                  "a buffer's codes");
    static_assert(kKScalesBytes == 4 * kBlockN * kKGroups, "f32 K scales");
    static_assert(kVScalesBytes == (ELEM == 1 ? 2 : 4) * kBlockN * kVGroups,
                  "V scales: f16 or f32");
    static_assert(kBadWords == (kWarpSpecialized ? kProducerThreads / 32 : kWarps),
                  "a word per converting warp");
    static_assert(kCodesAt == 2 * kStageBytes, "the codes after two stages");
    static_assert(kKScalesAt == kCodesAt + kCodeBuffers * kCodeBufferBytes,
                  "the K scales after the codes");
    static_assert(kVScalesAt == kKScalesAt + kCodeBuffers * kKScalesBytes,
                  "the V scales after the K scales");
    static_assert(kBadAt == kVScalesAt + kCodeBuffers * kVScalesBytes,
                  "the bad-V words after the V scales");
    static_assert(kFlagsAt == kBadAt + kCodeBuffers * 8 * kBadWords,
                  "the flags after the bad-V words");
    static_assert(kTilesBytes == kFlagsAt + (kWarpSpecialized ? 8 : 0), "the tiles' space");
    static_assert(kRowsBytes == 4 * kBlockRows * (D > DV ? D : DV), "f32 query and output rows");
    static_assert(kQueriesAt % 16 == 0 && kQueriesAt >= kTilesBytes && kQueriesAt >= kRowsBytes,
                  "the queries 16-byte aligned, after the tiles and rows");
    static_assert(kSmemBytes == kQueriesAt + (kQueriesInSmem ? 2 * kBlockRows * kKCodeStride : 0),
                  "the shared memory");
    // Registers per thread of each role after `setmaxnreg` (multiples of 8): the block starts
    // and ends with kRegisters each (the launch bound's share); the pool the roles divide holds
    // kAllThreads · kRegisters only when the kernel uses all of them, which the host checks.
    static_assert(!kWarpSpecialized || kRegisters == 65536 / kAllThreads / 8 * 8,
                  "the launch share");
    static_assert(!kWarpSpecialized ||
                      kConsumerRegisters ==
                          (kRegisters * kAllThreads - kProducerThreads * kProducerRegisters) /
                              kThreads / 8 * 8,
                  "the consumers' share");
    static_assert(!kWarpSpecialized ||
                      (kProducerRegisters % 8 == 0 && kProducerRegisters <= kRegisters &&
                       kRegisters <= kConsumerRegisters && kConsumerRegisters <= 256),
                  "setmaxnreg's bounds");
    // Blocks per multiprocessor: 12 or 16 warps where the registers allow it (head dimensions
    // up to 128), two row tiles per warp holding twice the scores and outputs; one
    // warp-specialized block of 12 warps.
    static_assert(kMinBlocks == ((kWarpSpecialized || D > 128 || DV > 128) ? 1
                                 : kRowTiles >= 2                          ? (kWarps >= 8 ? 1 : 2)
                                 : kWarps == 4                             ? 3
                                 : kWarps >= 8                             ? 2
                                                                           : 1),
                  "the launch bounds' blocks");
};

// Copies the raw rows of tokens [t0, t0 + Flash::kBlockN) (ROW bytes each, rows SB apart) into
// `dst`, all threads taking Flash::kCopyBytes-byte pieces; rows of tokens from `hi` on are
// zero-filled.
template <int ROW, int SB, int NT>
RQ_FN void flash_stage_rows(unsigned char* dst, const unsigned char* base,
                            const unsigned int* table, long long page_tokens, long long n_heads,
                            int head, long long t0, long long hi, unsigned int tid) {
    constexpr unsigned int W = ROW / Flash::kCopyBytes;
    const unsigned int cnt = hi - t0 < Flash::kBlockN ? (unsigned int)(hi - t0) : Flash::kBlockN;
    if constexpr (Flash::kCopyBytes >= 4 && W <= NT) {
        // Each thread keeps one piece of a row and steps R rows at a time: the addresses
        // advance by constants (no division or page lookup per piece without a table).
        constexpr unsigned int R = NT / W;
        if (tid >= R * W) return;  // (a few threads idle)
        const unsigned int tok0 = tid / W, piece = tid - tok0 * W;
        unsigned char* d = dst + tok0 * SB + piece * Flash::kCopyBytes;
        if (!table) {
            // The tile's first row, then 32-bit offsets (the host checked that Flash::kBlockN rows
            // of all heads span less than 4 GiB); a whole tile (the usual case) needs no sizes.
            const unsigned char* tile = base + (t0 * n_heads + head) * ROW;
            const unsigned int stride = (unsigned int)n_heads * ROW;
            unsigned int so = tok0 * stride + piece * Flash::kCopyBytes;
            if (cnt == Flash::kBlockN) {
#pragma unroll
                for (unsigned int i = 0; i < (Flash::kBlockN + R - 1) / R;
                     i++, so += R * stride, d += R * SB)
                    if (tok0 + i * R < Flash::kBlockN)
                        cp_async_all<Flash::kCopyBytes>(d, tile + so);
            } else {
#pragma unroll
                for (unsigned int i = 0; i < (Flash::kBlockN + R - 1) / R;
                     i++, so += R * stride, d += R * SB) {
                    const unsigned int tok = tok0 + i * R;
                    if (tok < Flash::kBlockN)
                        cp_async<Flash::kCopyBytes>(d, tile + (tok < cnt ? so : 0u),
                                                    tok < cnt ? Flash::kCopyBytes : 0);
                }
            }
        } else {
#pragma unroll 2
            for (unsigned int tok = tok0; tok < Flash::kBlockN; tok += R, d += R * SB) {
                const long long t = tok < cnt ? t0 + tok : t0;
                const long long slot =
                    (long long)table[t / page_tokens] * page_tokens + t % page_tokens;
                cp_async<Flash::kCopyBytes>(
                    d, base + (slot * n_heads + head) * ROW + piece * Flash::kCopyBytes,
                    tok < cnt ? Flash::kCopyBytes : 0);
            }
        }
    } else
        for (unsigned int p = tid; p < Flash::kBlockN * W; p += NT) {
            const unsigned int tok = p / W, piece = p - tok * W;
            const bool live = tok < cnt;
            const long long t = live ? t0 + tok : t0;
            const long long slot = paged_slot(table, t, page_tokens);
            const unsigned char* src = base + (slot * n_heads + head) * ROW;
            unsigned char* d = dst + tok * SB + piece * Flash::kCopyBytes;
            if constexpr (Flash::kCopyBytes >= 4)
                cp_async<Flash::kCopyBytes>(d, src + piece * Flash::kCopyBytes,
                                            live ? Flash::kCopyBytes : 0);
            else
                *reinterpret_cast<unsigned short*>(d) =
                    live ? reinterpret_cast<const unsigned short*>(src)[piece] : (unsigned short)0;
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
          sel(codes_aligned ? 0x3210u : 0x5432u),
          prev(base[0]) {}
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
RQ_FN void group_pairs(const unsigned char* grp, bool aligned, float d, unsigned int* pairs,
                       bool& bad, bool& wild) {
    group_codes<X, IS_K>(grp, aligned, pairs, bad);
    if constexpr (VALUES) {
#if ELEM == 1
        if constexpr (X != 0) {
            // Codes of at most 8 (q4_0) or 128 (q8_0) in magnitude, an f16 scale.
            const float a = fabsf(d);
            const bool in =
                d == 0.0f || (a >= 6.103515625e-05f && a <= (X == 1 ? 8188.0f : 511.0f));
            wild = wild || ((IS_K || rq_is_finite(d)) && !in);
            const unsigned int d2 = pack2(d, d);
#pragma unroll
            for (int i = 0; i < 16; i++)
                asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(pairs[i]) : "r"(pairs[i]), "r"(d2));
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
// group's alignment, and the code path, is the same for the whole warp); V groups that are not
// finite are zeroed and their tokens' bits set in `mine`.
template <bool VALUES, int NT>
RQ_FN void flash_extract(const unsigned char* raw, unsigned char* sm, int buf,
                         unsigned long long& mine, bool& wild, int tid) {
    elem_t* kcodes =
        reinterpret_cast<elem_t*>(sm + Flash::kCodesAt + buf * Flash::kCodeBufferBytes);
    elem_t* vcodes = kcodes + Flash::kBlockN * Flash::kKCodeStride;
    for (int u = tid; u < Flash::kBlockN * Flash::kKGroups; u += NT) {
        const int tok = u % Flash::kBlockN,
                  b = u / Flash::kBlockN;  // a warp's lanes: one group of 32 tokens
        const unsigned char* grp = raw + tok * Flash::kKRawStride + b * KFormat::kGroupBytes;
        const float d = k_scale(grp);
        unsigned int pr[16];
        bool bad = false;
        group_pairs<RQ_K_CODES, 1, VALUES>(grp, (b * KFormat::kGroupBytes + 2) % 4 == 0, d, pr, bad,
                                           wild);
        uint4* dst = reinterpret_cast<uint4*>(kcodes + tok * Flash::kKCodeStride + 32 * b);
#pragma unroll
        for (int i = 0; i < 4; i++)
            dst[i] = make_uint4(pr[4 * i], pr[4 * i + 1], pr[4 * i + 2], pr[4 * i + 3]);
        if (!VALUES)
            reinterpret_cast<float*>(sm + Flash::kKScalesAt +
                                     buf * Flash::kKScalesBytes)[b * Flash::kBlockN + tok] = d;
    }
    for (int u = tid; u < Flash::kBlockN * Flash::kVGroups; u += NT) {
        const int tok = u % Flash::kBlockN, b = u / Flash::kBlockN;
        const unsigned char* grp = raw + Flash::kBlockN * Flash::kKRawStride +
                                   tok * Flash::kVRawStride + b * VFormat::kGroupBytes;
        const float d = v_scale(grp);
        unsigned int pr[16];
        bool bad = false;
        group_pairs<RQ_V_CODES, 0, VALUES>(grp, (b * VFormat::kGroupBytes + 2) % 4 == 0, d, pr, bad,
                                           wild);
        if (bad || !rq_is_finite(d)) {
            mine |= 1ull << tok;
#pragma unroll
            for (int i = 0; i < 16; i++) pr[i] = 0u;
        }
        uint4* dst = reinterpret_cast<uint4*>(vcodes + tok * Flash::kVCodeStride + 32 * b);
#pragma unroll
        for (int i = 0; i < 4; i++)
            dst[i] = make_uint4(pr[4 * i], pr[4 * i + 1], pr[4 * i + 2], pr[4 * i + 3]);
        if (!VALUES) {
            const float ds = rq_is_finite(d) ? d : 0.0f;
#if ELEM == 1
            reinterpret_cast<elem_t*>(sm + Flash::kVScalesAt +
                                      buf * Flash::kVScalesBytes)[b * Flash::kBlockN + tok] =
                f32_to_elem(ds);
#else
            reinterpret_cast<float*>(sm + Flash::kVScalesAt +
                                     buf * Flash::kVScalesBytes)[b * Flash::kBlockN + tok] = ds;
#endif
        }
    }
}

// Turns a tile's raw rows (`raw`) into code buffer `buf`, the NT converting threads (this one
// `tid` of them) sharing the work: values, or for a tile whose values the element type does
// not hold (`wild`, rare) codes and scales. Each converting warp leaves its tokens' bad-V bits
// in badw[buf · Flash::kBadWords + its index]; `any` ORs a flag over the converting threads (at a
// barrier of theirs). Returns whether the tile is wild.
template <int NT, class Any>
RQ_FN bool flash_convert(const unsigned char* raw, unsigned char* sm, unsigned long long* badw,
                         int buf, int tid, Any any) {
    unsigned long long mine = 0;
    bool wild = false;
    flash_extract<true, NT>(raw, sm, buf, mine, wild, tid);
    const unsigned int lo_w = __reduce_or_sync(FULL_MASK, (unsigned int)mine);
    const unsigned int hi_w = __reduce_or_sync(FULL_MASK, (unsigned int)(mine >> 32));
    if (tid % 32 == 0)
        badw[buf * Flash::kBadWords + tid / 32] = ((unsigned long long)hi_w << 32) | lo_w;
    wild = any(wild);
    if (wild) {
        bool unused = false;
        flash_extract<false, NT>(raw, sm, buf, mine, unused, tid);
    }
    return wild;
}

// Eight values (f32, 16-byte aligned) times `scale`, as eight elements in 16 bytes.
RQ_FN uint4 pack8(const float* x, float scale) {
    const float4 a = reinterpret_cast<const float4*>(x)[0],
                 b = reinterpret_cast<const float4*>(x)[1];
    return make_uint4(pack2(a.x * scale, a.y * scale), pack2(a.z * scale, a.w * scale),
                      pack2(b.x * scale, b.y * scale), pack2(b.z * scale, b.w * scale));
}

// qa0, qa1: this warp's query A fragments of K group b (dimensions 32b .. 32b + 31).
#if RQ_QUERIES_IN_SMEM
#define QUERY_FRAGMENTS(b)                                                              \
    unsigned int qa0[Flash::kRowTiles][4], qa1[Flash::kRowTiles][4];                    \
    _Pragma("unroll") for (int mt = 0; mt < Flash::kRowTiles; mt++) {                   \
        ldsm_x4(qa0[mt], q_lane + 2 * (16 * mt * Flash::kKCodeStride + 32 * (b)));      \
        ldsm_x4(qa1[mt], q_lane + 2 * (16 * mt * Flash::kKCodeStride + 32 * (b) + 16)); \
    }
#else
#define QUERY_FRAGMENTS(b)                       \
    const unsigned int (*qa0)[4] = &qa[2 * (b)]; \
    const unsigned int (*qa1)[4] = &qa[2 * (b) + 1]
#endif

#if RQ_WARP_SPECIALIZED
// Named barriers (0 is __syncthreads): the producers among themselves, the consumers among
// themselves, and per code buffer b, FULL + b (the producers filled it) and EMPTY + b (the
// consumers are done with it).
enum : int { kBarProducers = 1, kBarConsumers = 2, kBarFull = 3, kBarEmpty = 5, kBarDone = 7 };
RQ_FN void bar_sync(int id, int n) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
RQ_FN void bar_arrive(int id, int n) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
// Whether `v` holds for any of the n threads meeting at barrier id.
RQ_FN bool bar_or(int id, int n, bool v) {
    unsigned int r;
    asm volatile(
        "{\n .reg .pred p, q;\n setp.ne.u32 q, %1, 0;\n bar.red.or.pred p, %2, %3, q;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(r)
        : "r"((unsigned int)v), "r"(id), "r"(n)
        : "memory");
    return r != 0;
}
#endif

extern "C" __global__ void __launch_bounds__(Flash::kAllThreads, Flash::kMinBlocks)
    prefill_attention_flash(const elem_t* q, const unsigned char* kc, const unsigned char* vc,
                            const unsigned int* table, long long page_tokens, long long n_tokens,
                            long long pos_offset, long long n_q, long long n_heads, int causal,
                            long long window, float softcap, float score_scale, int q_log_p,
                            int q_m, const unsigned long long* q_base, const float* q_signs,
                            float q_scale, int v_log_p, int v_m, const unsigned long long* v_base,
                            const float* v_signs, float v_scale_r, elem_t* out) {
    extern __shared__ float4 smem4[];
    unsigned char* sm = reinterpret_cast<unsigned char*>(smem4);
    float* rows_f = reinterpret_cast<float*>(sm);
    elem_t* kcodes = reinterpret_cast<elem_t*>(sm + Flash::kCodesAt);
    elem_t* vcodes = kcodes + Flash::kBlockN * Flash::kKCodeStride;
    float* ksc = reinterpret_cast<float*>(sm + Flash::kKScalesAt);
    unsigned long long* badw = reinterpret_cast<unsigned long long*>(sm + Flash::kBadAt);
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
        for (int x = threadIdx.x; x < Flash::kBlockRows * D / 8; x += Flash::kAllThreads) {
            const int row = x / (D / 8), c = 8 * (x % (D / 8));
            const long long r = rb * Flash::kBlockRows + row;
            uint4 raw = make_uint4(0u, 0u, 0u, 0u);
            if (r < n_rows)
                raw = *reinterpret_cast<const uint4*>(
                    q + ((r / G) * h_q + (long long)head * G + r % G) * D + c);
            const elem_t* v = reinterpret_cast<const elem_t*>(&raw);
            float4* dst = reinterpret_cast<float4*>(rows_f + row * D + c);
            dst[0] = make_float4(elem_to_f32(v[0]), elem_to_f32(v[1]), elem_to_f32(v[2]),
                                 elem_to_f32(v[3]));
            dst[1] = make_float4(elem_to_f32(v[4]), elem_to_f32(v[5]), elem_to_f32(v[6]),
                                 elem_to_f32(v[7]));
        }
        __syncthreads();
        warp_rotate<D>(rows_f, Flash::kBlockRows, qrot, 0);
    }
    // Scores in units of log2: the queries carry log2(e), and so does the soft-cap.
    const float qscale = score_scale * 1.4426950408889634f, cap = softcap * 1.4426950408889634f;
#if RQ_QUERIES_IN_SMEM
    // This warp's rows as A fragments come from shared memory, with ldmatrix, at each tile.
    elem_t* qsm = reinterpret_cast<elem_t*>(sm + Flash::kQueriesAt);
    for (int x = threadIdx.x; x < Flash::kBlockRows * D / 8; x += Flash::kAllThreads) {
        const int row = x / (D / 8), c = 8 * (x % (D / 8));
        *reinterpret_cast<uint4*>(qsm + row * Flash::kKCodeStride + c) =
            pack8(rows_f + row * D + c, qscale);
    }
    const unsigned int q_lane =
        smem_addr(qsm) + 2 * ((Flash::kRowsPerWarp * warp + (lane & 7) + 8 * ((lane >> 3) & 1)) *
                                  Flash::kKCodeStride +
                              8 * (lane >> 4));
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
    __syncthreads();  // the tiles reuse the queries' space

    // The block's range of tokens. Clamped to hi, lo still grows with the query: the first
    // row's lo is the smallest.
    long long b_lo, b_hi, last_lo, first_hi;
    {
        const long long first = rb * Flash::kBlockRows / G;
        long long last = (rb * Flash::kBlockRows + Flash::kBlockRows - 1) / G;
        if (last >= n_q) last = n_q - 1;
        visible(first, b_lo, first_hi);
        visible(last, last_lo, b_hi);
        if (b_hi < b_lo) b_hi = b_lo;
    }
    // Token offsets from b_lo fit 32 bits (the host sends longer caches to the decode kernel):
    // the per-tile range tests are 32-bit.
    auto rel = [&](long long t) -> int {
        return (int)(t < b_lo ? 0 : t > b_hi ? b_hi - b_lo : t - b_lo);
    };
    const int span = (int)(b_hi - b_lo);

    // Copies the raw rows of the tile at t0 into stage s (the threads that convert: all, or the
    // producers).
    auto stage = [&](int s, long long t0) {
        constexpr int NT = Flash::kWarpSpecialized ? Flash::kProducerThreads : Flash::kThreads;
        const unsigned int tid =
            Flash::kWarpSpecialized ? threadIdx.x - Flash::kThreads : threadIdx.x;
        if (t0 < b_hi) {
            unsigned char* dst = sm + s * Flash::kStageBytes;
            flash_stage_rows<Flash::kKRowBytes, Flash::kKRawStride, NT>(
                dst, kc, table, page_tokens, n_heads, head, t0, b_hi, tid);
            flash_stage_rows<Flash::kVRowBytes, Flash::kVRawStride, NT>(
                dst + Flash::kBlockN * Flash::kKRawStride, vc, table, page_tokens, n_heads, head,
                t0, b_hi, tid);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

#if RQ_WARP_SPECIALIZED
    // The producers: for each tile, wait for its rows (copied a tile ahead) and for the
    // consumers to be done with its code buffer (the tile two before), convert it there, and
    // tell the consumers.
    int* wflag = reinterpret_cast<int*>(sm + Flash::kFlagsAt);
    if (warp >= Flash::kWarps) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(int(Flash::kProducerRegisters)));
        const int ptid = threadIdx.x - Flash::kThreads;
        stage(0, b_lo);
        for (int off = 0; off < span; off += Flash::kBlockN) {
            const int cur = (off / Flash::kBlockN) & 1;
            asm volatile("cp.async.wait_group 0;\n" ::);
            bar_sync(
                kBarProducers,
                Flash::kProducerThreads);  // this tile's rows landed; the last tile's are converted
            stage(cur ^ 1, b_lo + off + Flash::kBlockN);
            if (off >= 2 * Flash::kBlockN) bar_sync(kBarEmpty + cur, Flash::kAllThreads);
            const bool wild = flash_convert<Flash::kProducerThreads>(
                sm + cur * Flash::kStageBytes, sm, badw, cur, ptid,
                [](bool w) { return bar_or(kBarProducers, Flash::kProducerThreads, w); });
            if (ptid == 0) wflag[cur] = wild;
            bar_arrive(kBarFull + cur, Flash::kAllThreads);
        }
        asm volatile("cp.async.wait_group 0;\n" ::);
        // The consumers give their extra registers back before the end (waiting at a barrier
        // takes no issue slots; a `setmaxnreg.inc` that cannot be met yet retries).
        bar_sync(kBarDone, Flash::kAllThreads);
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(int(Flash::kRegisters)));
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(int(Flash::kConsumerRegisters)));
#endif
        // This thread's rows (Flash::kRowsPerWarp · warp + 16 · mt + gr + 8u) and their visible
        // ranges.
        long long r_lo[Flash::kRowTiles][2], r_hi[Flash::kRowTiles][2];
#pragma unroll
        for (int mt = 0; mt < Flash::kRowTiles; mt++)
#pragma unroll
            for (int u = 0; u < 2; u++)
                visible(
                    (rb * Flash::kBlockRows + Flash::kRowsPerWarp * warp + 16 * mt + gr + 8 * u) /
                        G,
                    r_lo[mt][u], r_hi[mt][u]);
        float m[Flash::kRowTiles][2], l[Flash::kRowTiles][2];
        bool seen[Flash::kRowTiles][2];
        float o[Flash::kRowTiles][DV / 8][4];
        softmax_start(m, l, seen, o);

        // This lane's ldmatrix row addresses in the (first) code tiles: K rows are tokens (8 per
        // matrix, matrices 8 dimensions apart); V rows are tokens too, read transposed.
        const unsigned int k_lane0 =
            smem_addr(kcodes) + 2 * ((lane & 7) * Flash::kKCodeStride + 8 * (lane >> 3));
        const unsigned int v_lane0 =
            smem_addr(vcodes) +
            2 * (((lane & 7) + 8 * ((lane >> 3) & 1)) * Flash::kVCodeStride + 8 * (lane >> 4));
#if !RQ_WARP_SPECIALIZED
        stage(0, b_lo);
#endif
        const int full_lo = rel(last_lo), full_hi = rel(first_hi);
        int row_lo[Flash::kRowTiles][2], row_hi[Flash::kRowTiles][2];
#pragma unroll
        for (int mt = 0; mt < Flash::kRowTiles; mt++)
#pragma unroll
            for (int u = 0; u < 2; u++) {
                row_lo[mt][u] = rel(r_lo[mt][u]);
                row_hi[mt][u] = rel(r_hi[mt][u]);
            }
        for (int off = 0; off < span; off += Flash::kBlockN) {
            const long long t0 = b_lo + off;
            const int cur =
                (off / Flash::kBlockN) & 1;  // this tile's stage (a counter would take a register)
#if RQ_WARP_SPECIALIZED
            // The producers converted this tile into code buffer `cur`.
            bar_sync(kBarFull + cur, Flash::kAllThreads);
            const bool wild = wflag[cur] != 0;
            const int buf = cur;
#else
        stage(cur ^ 1, t0 + Flash::kBlockN);
        asm volatile("cp.async.wait_group 1;\n" ::);
        __syncthreads();  // this tile's rows landed; every warp is done with the last codes

        // Raw rows to values (or, for a tile with values the element type does not hold, to
        // codes and scales: `wild`, rare).
        const bool wild =
            flash_convert<Flash::kThreads>(sm + cur * Flash::kStageBytes, sm, badw, 0, threadIdx.x,
                                           [](bool w) { return __syncthreads_or(w) != 0; });
        if (wild) __syncthreads();
        const int buf = 0;
#endif
            const unsigned int k_lane = k_lane0 + buf * Flash::kCodeBufferBytes,
                               v_lane = v_lane0 + buf * Flash::kCodeBufferBytes;

            // S = Q K^T: s[mt][j] holds tokens 8j + 2tq (+1) of m-tile mt's rows gr (0, 1) and
            // gr + 8 (2, 3). Each K fragment feeds the Flash::kRowTiles m-tiles.
            float s[Flash::kRowTiles][Flash::kBlockN / 8][4];
#pragma unroll
            for (int mt = 0; mt < Flash::kRowTiles; mt++)
#pragma unroll
                for (int j = 0; j < Flash::kBlockN / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[mt][j][e] = 0.0f;
            if (!wild) {
#pragma unroll
                for (int b = 0; b < Flash::kKGroups; b++) {
                    QUERY_FRAGMENTS(b);
#pragma unroll
                    for (int j = 0; j < Flash::kBlockN / 8; j++) {
                        unsigned int kb[4];
                        ldsm_x4(kb, k_lane + 2 * (8 * j * Flash::kKCodeStride + 32 * b));
#pragma unroll
                        for (int mt = 0; mt < Flash::kRowTiles; mt++) {
                            mma_16816(s[mt][j], qa0[mt], kb[0], kb[1]);
                            mma_16816(s[mt][j], qa1[mt], kb[2], kb[3]);
                        }
                    }
                }
            } else {
#pragma unroll
                for (int b = 0; b < Flash::kKGroups; b++) {
                    QUERY_FRAGMENTS(b);
#pragma unroll
                    for (int j = 0; j < Flash::kBlockN / 8; j++) {
                        unsigned int kb[4];
                        ldsm_x4(kb, k_lane + 2 * (8 * j * Flash::kKCodeStride + 32 * b));
                        const float2 d = *reinterpret_cast<const float2*>(
                            ksc + buf * (Flash::kKScalesBytes / 4) + b * Flash::kBlockN + 8 * j +
                            2 * tq);
#pragma unroll
                        for (int mt = 0; mt < Flash::kRowTiles; mt++) {
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

            // Online softmax per row; the four threads of a row (a quad) hold its Flash::kBlockN
            // scores, in units of log2 (the queries carry log2(e)): p = 2^(s - m). Tiles inside
            // every row's range (most of them) skip the masks; a key masked out scores -Inf, so its
            // p is 0.
            const bool full = off >= full_lo && off + Flash::kBlockN <= full_hi;
            // (The soft-cap is one loop of its own: per score, its test would be a branch.)
            if (cap > 0.0f)
#pragma unroll
                for (int mt = 0; mt < Flash::kRowTiles; mt++)
#pragma unroll
                    for (int j = 0; j < Flash::kBlockN / 8; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++) s[mt][j][e] = cap * tanhf(s[mt][j][e] / cap);
#pragma unroll
            for (int mt = 0; mt < Flash::kRowTiles; mt++)
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    // The row's range in tile offsets (0..Flash::kBlockN), wanted only at the
                    // ranges' edges.
                    int lo_t = 0, hi_t = Flash::kBlockN;
                    if (!full) {
                        lo_t = min(max(row_lo[mt][u] - off, 0), Flash::kBlockN);
                        hi_t = min(max(row_hi[mt][u] - off, 0), Flash::kBlockN);
#pragma unroll
                        for (int j = 0; j < Flash::kBlockN / 8; j++)
#pragma unroll
                            for (int e = 0; e < 2; e++) {
                                const int t = 8 * j + 2 * tq + e;
                                if (t < lo_t || t >= hi_t) s[mt][j][2 * u + e] = NEG_INF;
                            }
                    }
                    // (Four running maxima: shorter chains of dependent instructions.)
                    float mx[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF};
#pragma unroll
                    for (int j = 0; j < Flash::kBlockN / 8; j++)
#pragma unroll
                        for (int e = 0; e < 2; e++)
                            mx[(2 * j + e) % 4] = fmaxf(mx[(2 * j + e) % 4], s[mt][j][2 * u + e]);
                    float tmax = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
                    tmax = fmaxf(tmax, __shfl_xor_sync(FULL_MASK, tmax, 1));
                    tmax = fmaxf(tmax, __shfl_xor_sync(FULL_MASK, tmax, 2));
                    const float m_new = fmaxf(m[mt][u], tmax);
                    // Every score so far -Inf (or none visible), or a NaN among them? Rare: only
                    // then are the row's threads asked. `all_inf`: the tile adds nothing; it counts
                    // as seen when the row had visible keys in it.
                    bool all_inf = false;
                    if (__any_sync(FULL_MASK, m_new == NEG_INF)) {
                        float nan = 0.0f, any = 0.0f;
#pragma unroll
                        for (int j = 0; j < Flash::kBlockN / 8; j++)
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
                    // The running maximum stays unless this tile's exceeds it by more than 8 (in
                    // log2 units): weights then reach at most 2^8, well inside f16, and most tiles
                    // rescale nothing. (A first finite maximum always replaces -Inf. A `wild` tile
                    // multiplies the weights by V scales in f16, so there they stay at most 1.)
                    const float m_keep =
                        m_new - m[mt][u] <= (wild ? 0.0f : 8.0f) ? m[mt][u] : m_new;
                    const float corr = all_inf ? 1.0f : fast_exp2(m[mt][u] - m_keep);
                    // (All -Inf: every weight 2^(-Inf - 0) = 0, with no test per score.)
                    const float m_use = all_inf ? 0.0f : m_keep;
                    float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                    for (int j = 0; j < Flash::kBlockN / 8; j++)
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
            // each V fragment feeds the Flash::kRowTiles m-tiles.
            if (!wild) {
#pragma unroll
                for (int k = 0; k < Flash::kBlockN / 16; k++) {
                    unsigned int pa[Flash::kRowTiles][4];
#pragma unroll
                    for (int mt = 0; mt < Flash::kRowTiles; mt++) {
                        pa[mt][0] = pack2(s[mt][2 * k][0], s[mt][2 * k][1]);
                        pa[mt][1] = pack2(s[mt][2 * k][2], s[mt][2 * k][3]);
                        pa[mt][2] = pack2(s[mt][2 * k + 1][0], s[mt][2 * k + 1][1]);
                        pa[mt][3] = pack2(s[mt][2 * k + 1][2], s[mt][2 * k + 1][3]);
                    }
#pragma unroll
                    for (int nn = 0; nn < DV / 16; nn++) {
                        unsigned int vb[4];
                        ldsm_x4_t(vb, v_lane + 2 * (16 * k * Flash::kVCodeStride + 16 * nn));
#pragma unroll
                        for (int mt = 0; mt < Flash::kRowTiles; mt++) {
                            mma_16816(o[mt][2 * nn], pa[mt], vb[0], vb[1]);
                            mma_16816(o[mt][2 * nn + 1], pa[mt], vb[2], vb[3]);
                        }
                    }
                }
            } else
#pragma unroll
                for (int k = 0; k < Flash::kBlockN / 16; k++) {
#pragma unroll
                    for (int b = 0; b < Flash::kVGroups; b++) {
                        unsigned int a[Flash::kRowTiles][4];
#if ELEM == 1
                        const elem_t* vsc =
                            reinterpret_cast<const elem_t*>(sm + Flash::kVScalesAt +
                                                            buf * Flash::kVScalesBytes) +
                            b * Flash::kBlockN + 16 * k + 2 * tq;
                        const unsigned int d01 = *reinterpret_cast<const unsigned int*>(vsc);
                        const unsigned int d89 = *reinterpret_cast<const unsigned int*>(vsc + 8);
#else
                    const float* vsc = reinterpret_cast<const float*>(sm + Flash::kVScalesAt +
                                                                      buf * Flash::kVScalesBytes) +
                                       b * Flash::kBlockN + 16 * k + 2 * tq;
                    const float2 d01 = *reinterpret_cast<const float2*>(vsc);
                    const float2 d89 = *reinterpret_cast<const float2*>(vsc + 8);
#endif
#pragma unroll
                        for (int mt = 0; mt < Flash::kRowTiles; mt++) {
                            const float* p0 = s[mt][2 * k];
                            const float* p1 = s[mt][2 * k + 1];
#if ELEM == 1
                            asm("mul.rn.f16x2 %0, %1, %2;"
                                : "=r"(a[mt][0])
                                : "r"(pack2(p0[0], p0[1])), "r"(d01));
                            asm("mul.rn.f16x2 %0, %1, %2;"
                                : "=r"(a[mt][1])
                                : "r"(pack2(p0[2], p0[3])), "r"(d01));
                            asm("mul.rn.f16x2 %0, %1, %2;"
                                : "=r"(a[mt][2])
                                : "r"(pack2(p1[0], p1[1])), "r"(d89));
                            asm("mul.rn.f16x2 %0, %1, %2;"
                                : "=r"(a[mt][3])
                                : "r"(pack2(p1[2], p1[3])), "r"(d89));
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
                            ldsm_x4_t(
                                vb, v_lane + 2 * (16 * k * Flash::kVCodeStride + 32 * b + 16 * np));
#pragma unroll
                            for (int mt = 0; mt < Flash::kRowTiles; mt++) {
                                mma_16816(o[mt][4 * b + 2 * np], a[mt], vb[0], vb[1]);
                                mma_16816(o[mt][4 * b + 2 * np + 1], a[mt], vb[2], vb[3]);
                            }
                        }
                    }
                }

            // Tokens whose V is not finite (rare): their values, in f32, to the rows that see them.
            unsigned long long bad = 0;
#pragma unroll
            for (int w = 0; w < Flash::kBadWords; w++) bad |= badw[buf * Flash::kBadWords + w];
            while (bad) {
                const int tt = __ffsll((long long)bad) - 1;
                bad &= bad - 1;
                const long long t = t0 + tt;
                const long long slot = paged_slot(table, t, page_tokens);
                const unsigned char* vrow = vc + (slot * n_heads + head) * Flash::kVRowBytes;
                // The weights of token tt: held by the quad's thread (tt % 8) / 2; each thread
                // offers its own by selects (no indexing, which would put s in local memory).
                float p[Flash::kRowTiles][2];
#pragma unroll
                for (int mt = 0; mt < Flash::kRowTiles; mt++)
#pragma unroll
                    for (int u = 0; u < 2; u++) {
                        float mine = 0.0f;
#pragma unroll
                        for (int j = 0; j < Flash::kBlockN / 8; j++)
#pragma unroll
                            for (int e = 0; e < 2; e++)
                                mine = 8 * j + 2 * tq + e == tt ? s[mt][j][2 * u + e] : mine;
                        p[mt][u] = __shfl_sync(FULL_MASK, mine, (lane & ~3) | ((tt & 7) >> 1));
                    }
                // Only the groups that were zeroed (a scale or a code not finite) are added here.
#pragma unroll
                for (int b = 0; b < Flash::kVGroups; b++) {
                    const unsigned char* g = vrow + b * VFormat::kGroupBytes;
                    const float d = v_scale(g);
                    bool zeroed = !rq_is_finite(d);
                    for (int j = 0; j < 32; j++)
                        zeroed = zeroed || !rq_is_finite(RQ_CAT(rq_code_, VFMT)(g, j));
                    if (!zeroed) continue;
#pragma unroll
                    for (int mt = 0; mt < Flash::kRowTiles; mt++)
#pragma unroll
                        for (int u = 0; u < 2; u++) {
                            if (tt + off < row_lo[mt][u] || tt + off >= row_hi[mt][u]) continue;
#pragma unroll
                            for (int n = 4 * b; n < 4 * b + 4; n++)
#pragma unroll
                                for (int e = 0; e < 2; e++) {
                                    const int j = 8 * (n % 4) + 2 * tq + e;
                                    o[mt][n][2 * u + e] +=
                                        p[mt][u] * (RQ_CAT(rq_code_, VFMT)(g, j) * d);
                                }
                        }
                }
            }
#if RQ_WARP_SPECIALIZED
            // Code buffer `cur` is free for the tile two on (when there is one).
            if (off + 2 * Flash::kBlockN < span) bar_arrive(kBarEmpty + cur, Flash::kAllThreads);
#endif
        }
#if RQ_WARP_SPECIALIZED
        bar_sync(kBarConsumers,
                 Flash::kThreads);  // the outputs reuse the tiles' space (the producers are done)
#else
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();  // the outputs reuse the tiles' space
#endif

        // Rows divided by l (0 for a row that saw no key), rotated back, stored.
#pragma unroll
        for (int mt = 0; mt < Flash::kRowTiles; mt++)
#pragma unroll
            for (int u = 0; u < 2; u++) {
                float lr = l[mt][u];
                lr += __shfl_xor_sync(FULL_MASK, lr, 1);
                lr += __shfl_xor_sync(FULL_MASK, lr, 2);
                const bool live = m[mt][u] != NEG_INF || isnan(lr) || seen[mt][u];
                float* dst = rows_f + (Flash::kRowsPerWarp * warp + 16 * mt + gr + 8 * u) * DV;
#pragma unroll
                for (int n = 0; n < DV / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++)
                        dst[8 * n + 2 * tq + e] = live ? o[mt][n][2 * u + e] / lr : 0.0f;
            }
#if RQ_WARP_SPECIALIZED
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(int(Flash::kRegisters)));
        bar_arrive(kBarDone, Flash::kAllThreads);
    }
#endif
    __syncthreads();
    const Rot vrot = {v_log_p, v_m, v_base, v_signs, v_scale_r};
    warp_rotate<DV>(rows_f, Flash::kBlockRows, vrot, 1);
    for (int x = threadIdx.x; x < Flash::kBlockRows * DV / 8; x += Flash::kAllThreads) {
        const int row = x / (DV / 8), c = 8 * (x % (DV / 8));
        const long long r = rb * Flash::kBlockRows + row;
        if (r < n_rows)
            *reinterpret_cast<uint4*>(out + ((r / G) * h_q + (long long)head * G + r % G) * DV +
                                      c) = pack8(rows_f + row * DV + c, 1.0f);
    }
}
