// rotq CUDA: what the attention kernels share. Pasted by the host after formats.cuh and
// elem.cuh into each decode (decode.cu, decode_mma.cu) and flash (flash.cu) module, after the
// defines and the traits struct it emits for the module:
//
//   ELEM         0 f32, 1 f16, 2 bf16: the element type of Q and of the output (elem.cuh)
//   KFMT, VFMT   the formats of the K and V caches (names of formats.cuh)
//   RQ_K_CODES   how the tensor-core kernels turn K codes into f16/bf16 pairs: 1 q4_0's
//   RQ_V_CODES   nibbles, 2 q8_0's bytes (f16 only: a byte needs 8 mantissa bits), 0 the
//                format's accessors (rq_code_*); likewise for V
//   RQ_TENSOR_CORES  1: the module has a tensor-core kernel (f16/bf16 queries, K and V formats
//                whose values are a scale times a code)
//   RQ_MASK      defined: decode_attention takes an additive mask (the batch API's; the f32
//                kernel only, so never with RQ_TENSOR_CORES)
//
// Here: the formats' block constants and per-group accessors, rotations of rows in shared
// memory, the tensor-core wrappers (element pairs, code extraction, mma, movmatrix, ldmatrix),
// cp.async, fast exponentials, the online softmax's starting state and paged addressing.
//
// Cache rows: token t of sequence b, KV head h is row `(slot · n_heads + h)` of the cache,
// where slot = page · page_tokens + t % page_tokens and page = table[b · table_stride +
// t / page_tokens] (a paged cache), or page = b without a table (a contiguous cache of
// `page_tokens` tokens per sequence).

#define FULL_MASK 0xffffffffu
#define NEG_INF (-__int_as_float(0x7f800000))

#define RQ_CAT2(a, b) a##b
#define RQ_CAT(a, b) RQ_CAT2(a, b)

// The module's K and V formats: values and bytes per block, and bytes per group of 32 values
// (one block, or 32 blocks of one value). A TurboQuant row format (RQ_TQ_K, RQ_TQ_V; turbo.cuh)
// is one block of a whole row, read value by value (the f32 decode kernel only).
#ifndef RQ_TQ_K
#define RQ_TQ_K 0
#endif
#ifndef RQ_TQ_V
#define RQ_TQ_V 0
#endif
struct KFormat {
    enum : int { kBlockSize = RQ_CAT(RQ_BLOCK_SIZE_, KFMT) };
    enum : int { kBlockBytes = RQ_CAT(RQ_BLOCK_BYTES_, KFMT) };
    enum : int { kGroupBytes = kBlockSize == 32 ? kBlockBytes : 32 * kBlockBytes };
    static_assert(RQ_TQ_K || kBlockSize == 32 || kBlockSize == 1,
                  "blocks of 32 values, single values or rows");
};
struct VFormat {
    enum : int { kBlockSize = RQ_CAT(RQ_BLOCK_SIZE_, VFMT) };
    enum : int { kBlockBytes = RQ_CAT(RQ_BLOCK_BYTES_, VFMT) };
    enum : int { kGroupBytes = kBlockSize == 32 ? kBlockBytes : 32 * kBlockBytes };
    static_assert(RQ_TQ_V || kBlockSize == 32 || kBlockSize == 1,
                  "blocks of 32 values, single values or rows");
};

// The slot of token t of a sequence whose pages `table` lists (null: a contiguous cache, slot
// t).
RQ_FN long long paged_slot(const unsigned int* table, long long t, long long page_tokens) {
    return table ? (long long)table[t / page_tokens] * page_tokens + t % page_tokens : t;
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
            const bool upper = lane & lm;  // this lane holds the pairs' second halves
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

RQ_FN unsigned int smem_addr(const void* p) { return (unsigned int)__cvta_generic_to_shared(p); }

#if RQ_TENSOR_CORES
// ---------------------------------------------------------------------------------------------
// Tensor-core wrappers (f16/bf16 queries, formats of scale x code: RQ_TENSOR_CORES): a group's
// scale, pairs of elements in a 32-bit register, codes made
// f16/bf16 with the exponent-bias trick (a code c placed in the mantissa of 2^10 is 1024 + c, and
// one packed subtraction leaves c exactly), mma.sync m16n8k16, movmatrix and ldmatrix.

RQ_FN float k_scale(const unsigned char* grp) { return RQ_CAT(rq_scale_, KFMT)(grp); }
RQ_FN float v_scale(const unsigned char* grp) { return RQ_CAT(rq_scale_, VFMT)(grp); }

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
#define MAGIC4 0x64006400u  // 1024 in each half: a nibble n below it is 1024 + n
#define BIAS4 0x64086408u   // 1032: q4_0's code is n - 8
#define BIAS8 0x64806480u   // 1152: a byte b ^ 0x80 below 1024 is 1152 + b
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
#define MAGIC4 0x43004300u  // 128 in each half (bf16 has 7 mantissa bits: nibbles fit)
#define BIAS4 0x43084308u   // 136
// The q4_0 codes of the low and high nibbles of bytes 0 and 2 of x, as pairs (bf16's 7
// mantissa bits hold a nibble only at the bottom: the high one is shifted down).
RQ_FN void nibbles4(unsigned int x, unsigned int& lo, unsigned int& hi) {
    lo = unbias2((x & 0x000F000Fu) | MAGIC4, BIAS4);
    hi = unbias2(((x >> 4) & 0x000F000Fu) | MAGIC4, BIAS4);
}
#endif

// c += A B for one m16n8k16 tile (A row-major 16x16, B column-major 16x8, C 16x8 f32).
RQ_FN void mma_16816(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE
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
#endif

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
        asm volatile("cp.async.cg.shared.global" L2PF
                     " [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                     "l"(src), "r"(n));
    else
        asm volatile("cp.async.ca.shared.global" L2PF
                     " [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)),
                     "l"(src), "n"(N), "r"(n));
}
// The same, all N bytes read (no size operand, nothing to compute per copy).
template <int N, bool CG = (N == 16)>
RQ_FN void cp_async_all(unsigned char* dst, const unsigned char* src) {
    if constexpr (CG)
        asm volatile("cp.async.cg.shared.global" L2PF " [%0], [%1], 16;\n" ::"r"(smem_addr(dst)),
                     "l"(src));
    else
        asm volatile("cp.async.ca.shared.global" L2PF " [%0], [%1], %2;\n" ::"r"(smem_addr(dst)),
                     "l"(src), "n"(N));
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
