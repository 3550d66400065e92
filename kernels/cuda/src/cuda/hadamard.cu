// rotq CUDA kernels: Hadamard transforms over rows, fused rotate-quantize into a KV cache, and
// dequantize (+ inverse rotation). Compiled at run time by NVRTC; the host defines, per module
// (and emits the layout it computed as RowTraits, see below):
//
//   ELEM     0 f32, 1 f16, 2 bf16: the element type of the rows read (rotate, rotate-quantize)
//            or written (dequantize)
//   LOG_P    log2 of the power-of-two factor P of one transform unit (M * P values)
//   M        base of the unit: 1 (Sylvester) or 12, 20, 28, 40 (then HAD_ROWS is defined)
//   UNITS    transform units per row (block-diagonal rotations; 1 otherwise)
//   EPT      values per thread (a power of two dividing P)
//   ROWS     rows per thread block
//   ROTATE   0: no transform (dequantize only), 1: transform
//   FMT      a format name of formats.cuh (rotate-quantize and dequantize modules only)
//
// A row is UNITS * M segments of P values; each thread holds EPT consecutive values of one
// segment in registers. Butterflies run in registers (the low log2 EPT bits), then across the
// lanes of a warp with shuffles, then across warps through shared memory, where each thread
// takes values that differ in the warp bits. The M x M base matrix mixes the segments of a unit
// through shared memory. All arithmetic is f32. The direction (`inverse`: x = s . (H^T y)
// instead of y = H (s . x)) and the signs s (randomized Hadamard; null for none) are kernel
// arguments, so both directions share one compiled module.

#define P (1 << LOG_P)
#define UNIT (M * P)
#define N (UNITS * UNIT)
#define TS (P / EPT)
#define TPR (UNITS * M * TS)
#define LANES (TS < 32 ? TS : 32)
#define WARPS (TS / LANES)
#define FULL_MASK 0xffffffffu
// Shared-memory rows put 4 floats of padding after every 32 values, so that the threads of a
// warp storing or loading their EPT consecutive values as float4s hit different banks.
#define PAD(i) ((i) + 4 * ((i) >> 5))
// The host's layout (RowTraits, from kernel.rs): a block's kThreads threads, its rows in shared
// memory kRowStride floats apart, each followed (rotate-quantize, dequantize, shift) by the
// encoded rows kOutStride bytes apart, and launch bounds that let at least 1024 threads (32
// warps) share an SM: enough loads in flight to keep the memory system busy.
static_assert(RowTraits::kThreads == ROWS * TPR, "the rows' threads");
static_assert(RowTraits::kRowStride == (PAD(N) + 3) / 4 * 4, "a padded row, in whole float4s");
#ifndef FMT
static_assert(RowTraits::kOutStride == 0, "no encoded rows without a format");
#endif
static_assert(RowTraits::kMinBlocks == (1024 / RowTraits::kThreads > 0 ? 1024 / RowTraits::kThreads : 1),
              "blocks for 1024 threads per SM");

// 16-byte loads and stores when a thread's values and every row start are 16-byte aligned.
#define VEC ((EPT * sizeof(elem_t)) % 16 == 0 && (N * sizeof(elem_t)) % 16 == 0)

struct Lane {
    int row_in_block; // which row of the block
    int seg;          // segment of the row (unit * M + segment in the unit)
    int ts;           // thread in the segment
    int first;        // index in the row of the thread's first value
};

RQ_FN Lane lane_of(int tid) {
    Lane l;
    l.row_in_block = tid / TPR;
    int t = tid % TPR;
    l.seg = t / TS;
    l.ts = t % TS;
    l.first = l.seg * P + l.ts * EPT;
    return l;
}

// A thread's values as stored, viewable as 16-byte words.
#define PACK_WORDS ((EPT * (int)sizeof(elem_t) + 15) / 16)
union Pack {
    uint4 q[PACK_WORDS];
    elem_t e[EPT];
};

RQ_FN void load_values(const elem_t* row, float* v) {
    if (VEC) {
        Pack p;
#pragma unroll
        for (int i = 0; i < PACK_WORDS; i++) p.q[i] = reinterpret_cast<const uint4*>(row)[i];
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] = elem_to_f32(p.e[e]);
    } else {
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] = elem_to_f32(row[e]);
    }
}

RQ_FN void store_values(elem_t* row, const float* v) {
    if (VEC) {
        Pack p;
#pragma unroll
        for (int e = 0; e < EPT; e++) p.e[e] = f32_to_elem(v[e]);
#pragma unroll
        for (int i = 0; i < PACK_WORDS; i++) reinterpret_cast<uint4*>(row)[i] = p.q[i];
    } else {
#pragma unroll
        for (int e = 0; e < EPT; e++) row[e] = f32_to_elem(v[e]);
    }
}

// A thread's EPT values to and from its shared-memory row.
RQ_FN void smem_put(float* row, int first, const float* v) {
    if (EPT % 4 == 0) {
#pragma unroll
        for (int j = 0; j < EPT / 4; j++)
            *reinterpret_cast<float4*>(row + PAD(first + 4 * j)) =
                make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    } else {
#pragma unroll
        for (int e = 0; e < EPT; e++) row[PAD(first + e)] = v[e];
    }
}

RQ_FN void smem_get(const float* row, int first, float* v) {
    if (EPT % 4 == 0) {
#pragma unroll
        for (int j = 0; j < EPT / 4; j++) {
            float4 q = *reinterpret_cast<const float4*>(row + PAD(first + 4 * j));
            v[4 * j] = q.x;
            v[4 * j + 1] = q.y;
            v[4 * j + 2] = q.z;
            v[4 * j + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] = row[PAD(first + e)];
    }
}

#if M > 1
// Sign of base-matrix entry (a, b): bit b of HAD_ROWS[a] set means -1.
RQ_FN float base_sign(int a, int b) {
    return ((HAD_ROWS[a] >> b) & 1ull) ? -1.0f : 1.0f;
}
#endif

// The unnormalized transform of every segment and unit of the block's rows, in place on the
// threads' registers `v`. `buf` is the block's shared memory (ROWS * RowTraits::kRowStride floats) when WARPS > 1
// or M > 1; every thread of the block must call this (it synchronizes).
RQ_FN void transform(float* v, const Lane& l, float* buf, int inverse) {
    // Bits of the index inside a thread.
#pragma unroll
    for (int h = 1; h < EPT; h <<= 1) {
#pragma unroll
        for (int i = 0; i < EPT; i++) {
            if ((i & h) == 0) {
                float a = v[i], b = v[i + h];
                v[i] = a + b;
                v[i + h] = a - b;
            }
        }
    }
    // Bits of the lane: partners are `h` lanes apart in the same warp.
    int lane = l.ts % LANES;
#pragma unroll
    for (int h = 1; h < LANES; h <<= 1) {
#pragma unroll
        for (int i = 0; i < EPT; i++) {
            float o = __shfl_xor_sync(FULL_MASK, v[i], h);
            v[i] = (lane & h) ? (o - v[i]) : (v[i] + o);
        }
    }
#if WARPS > 1 || M > 1
    float* row = buf + l.row_in_block * RowTraits::kRowStride;
    smem_put(row, l.first, v);
    __syncthreads();
#if WARPS > 1
    {
        // Bits of the warp: each thread takes EPT / WARPS groups of WARPS values that differ
        // only in the warp bits of their index.
        const int G = EPT / WARPS;
        int seg = l.seg * P;
#pragma unroll
        for (int j = 0; j < G; j++) {
            int g = l.ts * G + j;
            float u[WARPS];
#pragma unroll
            for (int w = 0; w < WARPS; w++) u[w] = row[PAD(seg + w * (LANES * EPT) + g)];
#pragma unroll
            for (int h = 1; h < WARPS; h <<= 1) {
#pragma unroll
                for (int i = 0; i < WARPS; i++) {
                    if ((i & h) == 0) {
                        float a = u[i], b = u[i + h];
                        u[i] = a + b;
                        u[i + h] = a - b;
                    }
                }
            }
#pragma unroll
            for (int w = 0; w < WARPS; w++) row[PAD(seg + w * (LANES * EPT) + g)] = u[w];
        }
    }
    __syncthreads();
#endif
#if M > 1
    {
        // Y[a][q] = sum_b B[a][b] X[b][q] over the M segments of each unit (B^T if inverse).
        int t = l.seg * TS + l.ts;
        for (int q = t; q < UNITS * P; q += TPR) {
            int unit = (q / P) * UNIT + (q % P);
            float x[M];
#pragma unroll
            for (int b = 0; b < M; b++) x[b] = row[PAD(unit + b * P)];
#pragma unroll
            for (int a = 0; a < M; a++) {
                float y = 0.0f;
#pragma unroll
                for (int b = 0; b < M; b++) {
                    float s = inverse ? base_sign(b, a) : base_sign(a, b);
                    y += s * x[b];
                }
                row[PAD(unit + a * P)] = y;
            }
        }
    }
    __syncthreads();
#endif
    smem_get(row, l.first, v);
#endif
}

// Signs before the transform (forward) or after it (inverse), then the 1/sqrt(unit) scale.
RQ_FN void rotate_values(float* v, const Lane& l, float* buf, const float* signs, float scale,
                         int inverse) {
    if (signs && !inverse) {
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] *= signs[l.first + e];
    }
    transform(v, l, buf, inverse);
#pragma unroll
    for (int e = 0; e < EPT; e++) v[e] *= scale;
    if (signs && inverse) {
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] *= signs[l.first + e];
    }
}

// Rotates `n_rows` rows of N values in place.
extern "C" __global__ void __launch_bounds__(RowTraits::kThreads, RowTraits::kMinBlocks) rotate_rows(elem_t* data, long long n_rows, const float* signs,
                                       float scale, int inverse) {
    extern __shared__ float4 smem[];
    float* buf = reinterpret_cast<float*>(smem);
    Lane l = lane_of(threadIdx.x);
    long long r = (long long)blockIdx.x * ROWS + l.row_in_block;
    bool valid = r < n_rows;
    elem_t* row = data + (valid ? r : 0) * N + l.first;
    float v[EPT];
    if (valid) {
        load_values(row, v);
    } else {
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] = 0.0f;
    }
    rotate_values(v, l, buf, signs, scale, inverse);
    if (valid) store_values(row, v);
}

#ifdef FMT
#define RQ_CAT2(a, b) a##b
#define RQ_CAT(a, b) RQ_CAT2(a, b)
#define BLOCK_SIZE RQ_CAT(RQ_BLOCK_SIZE_, FMT)
#define BLOCK_BYTES RQ_CAT(RQ_BLOCK_BYTES_, FMT)
#define ROW_BYTES ((N / BLOCK_SIZE) * BLOCK_BYTES)
// Encoded rows are staged in shared memory, after the float rows, so that global memory is
// read and written by consecutive threads in 4-byte words (or bytes), not block by block.
static_assert(RowTraits::kOutStride == (ROW_BYTES + 15) / 16 * 16,
              "encoded rows, in whole 16-byte units");
#define WORDS (ROW_BYTES % 4 == 0)

// Waits for the threads of this row: a warp barrier when the row's threads are one aligned
// group of a warp, else the block's.
RQ_FN void sync_row() {
    if (32 % TPR == 0) {
        __syncwarp();
    } else {
        __syncthreads();
    }
}

// Copies one encoded row (`t`: this thread's index among its row's TPR threads).
RQ_FN void copy_row(unsigned char* dst, const unsigned char* src, int t) {
    if (WORDS) {
        for (int i = t; i < ROW_BYTES / 4; i += TPR)
            reinterpret_cast<unsigned int*>(dst)[i] = reinterpret_cast<const unsigned int*>(src)[i];
    } else {
        for (int i = t; i < ROW_BYTES; i += TPR) dst[i] = src[i];
    }
}

// Rotates `n_rows` input rows ((token, head) rows of new tokens, token-major) and quantizes
// them into the cache. Row (token i, head h) goes to cache position pos = start_pos + i: with a
// block table, to page table[pos / page_tokens], slot pos % page_tokens; without one, to row
// pos. Cache rows are (position, head) rows of ROW_BYTES.
extern "C" __global__ void __launch_bounds__(RowTraits::kThreads, RowTraits::kMinBlocks) rotate_quantize(const elem_t* input, long long n_rows, long long n_heads,
                                           long long start_pos, const unsigned int* table,
                                           long long page_tokens, unsigned char* cache,
                                           const float* signs, float scale) {
    extern __shared__ float4 smem[];
    float* buf = reinterpret_cast<float*>(smem);
    Lane l = lane_of(threadIdx.x);
    long long r = (long long)blockIdx.x * ROWS + l.row_in_block;
    bool valid = r < n_rows;
    float v[EPT];
    if (valid) {
        load_values(input + r * N + l.first, v);
    } else {
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] = 0.0f;
    }
#if ROTATE
    rotate_values(v, l, buf, signs, scale, 0);
#endif
    float* row = buf + l.row_in_block * RowTraits::kRowStride;
    unsigned char* staged = reinterpret_cast<unsigned char*>(buf + ROWS * RowTraits::kRowStride) +
                            l.row_in_block * RowTraits::kOutStride;
    int t = l.seg * TS + l.ts;
#if EPT % BLOCK_SIZE == 0
    // Each thread holds whole blocks: it encodes them from its registers.
#pragma unroll
    for (int k = 0; k < EPT / BLOCK_SIZE; k++) {
        RQ_CAT(rq_quantize_, FMT)(v + k * BLOCK_SIZE,
                                  staged + (l.first / BLOCK_SIZE + k) * BLOCK_BYTES);
    }
#else
    sync_row(); // the transform may still read `row`
    smem_put(row, l.first, v);
    sync_row();
    for (int b = t; b < N / BLOCK_SIZE; b += TPR) {
        // A block (at most 32 values, 32-aligned) is contiguous in the padded row.
        RQ_CAT(rq_quantize_, FMT)(row + PAD(b * BLOCK_SIZE), staged + b * BLOCK_BYTES);
    }
#endif
    sync_row();
    if (!valid) return;
    long long pos = start_pos + r / n_heads;
    long long head = r % n_heads;
    long long slot = table ? (long long)table[pos / page_tokens] * page_tokens + pos % page_tokens
                           : pos;
    copy_row(cache + (slot * n_heads + head) * ROW_BYTES, staged, t);
}

// Dequantizes `n_rows` cache rows into rows of elem_t, rotated back when ROTATE.
extern "C" __global__ void __launch_bounds__(RowTraits::kThreads, RowTraits::kMinBlocks) dequantize_rows(const unsigned char* cache, long long n_rows,
                                           elem_t* output, const float* signs, float scale) {
    extern __shared__ float4 smem[];
    float* buf = reinterpret_cast<float*>(smem);
    Lane l = lane_of(threadIdx.x);
    long long r = (long long)blockIdx.x * ROWS + l.row_in_block;
    bool valid = r < n_rows;
    float* row = buf + l.row_in_block * RowTraits::kRowStride;
    unsigned char* staged = reinterpret_cast<unsigned char*>(buf + ROWS * RowTraits::kRowStride) +
                            l.row_in_block * RowTraits::kOutStride;
    int t = l.seg * TS + l.ts;
    if (valid) copy_row(staged, cache + r * ROW_BYTES, t);
    sync_row();
    if (valid) {
        for (int b = t; b < N / BLOCK_SIZE; b += TPR) {
            RQ_CAT(rq_dequantize_, FMT)(staged + b * BLOCK_BYTES, row + PAD(b * BLOCK_SIZE));
        }
    }
    sync_row();
    float v[EPT];
    smem_get(row, l.first, v);
    if (!valid) {
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] = 0.0f; // that row's shared memory was not written
    }
#if ROTATE
    sync_row(); // the transform writes `row`
    rotate_values(v, l, buf, signs, scale, 1);
#endif
    if (valid) store_values(output + r * N + l.first, v);
}
// Context shift of cache rows in place: the `n_rows` (position, head) rows from position
// `start_pos` on (located as rotate_quantize writes them) are dequantized, rotated back
// (ROTATE), turned by RoPE, rotated again and re-quantized. RoPE turns pair i of the first
// `rot_dims` values, (2i, 2i + 1), or (i, i + rot_dims / 2) when `neox`, by the angle whose
// cosine and sine are cs[2i] and cs[2i + 1].
extern "C" __global__ void __launch_bounds__(RowTraits::kThreads, RowTraits::kMinBlocks) shift_rows(
    unsigned char* cache, long long n_rows, long long n_heads, long long start_pos,
    const unsigned int* table, long long page_tokens, const float* signs, float scale,
    const float* cs, int rot_dims, int neox) {
    extern __shared__ float4 smem[];
    float* buf = reinterpret_cast<float*>(smem);
    Lane l = lane_of(threadIdx.x);
    long long r = (long long)blockIdx.x * ROWS + l.row_in_block;
    bool valid = r < n_rows;
    float* row = buf + l.row_in_block * RowTraits::kRowStride;
    unsigned char* staged = reinterpret_cast<unsigned char*>(buf + ROWS * RowTraits::kRowStride) +
                            l.row_in_block * RowTraits::kOutStride;
    int t = l.seg * TS + l.ts;
    unsigned char* at = cache;
    if (valid) {
        long long pos = start_pos + r / n_heads;
        long long head = r % n_heads;
        long long slot =
            table ? (long long)table[pos / page_tokens] * page_tokens + pos % page_tokens : pos;
        at = cache + (slot * n_heads + head) * ROW_BYTES;
        copy_row(staged, at, t);
    }
    sync_row();
    if (valid) {
        for (int b = t; b < N / BLOCK_SIZE; b += TPR) {
            RQ_CAT(rq_dequantize_, FMT)(staged + b * BLOCK_BYTES, row + PAD(b * BLOCK_SIZE));
        }
    }
    sync_row();
    float v[EPT];
    smem_get(row, l.first, v);
    if (!valid) {
#pragma unroll
        for (int e = 0; e < EPT; e++) v[e] = 0.0f;
    }
#if ROTATE
    sync_row();
    rotate_values(v, l, buf, signs, scale, 1);
#endif
    // The pairs can lie in different threads' values: turn them in shared memory.
    sync_row();
    smem_put(row, l.first, v);
    sync_row();
    for (int i = t; i < rot_dims / 2; i += TPR) {
        const int a = neox ? i : 2 * i, b = neox ? i + rot_dims / 2 : 2 * i + 1;
        const float x = row[PAD(a)], y = row[PAD(b)], c = cs[2 * i], s = cs[2 * i + 1];
        row[PAD(a)] = x * c - y * s;
        row[PAD(b)] = x * s + y * c;
    }
    sync_row();
    smem_get(row, l.first, v);
#if ROTATE
    sync_row();
    rotate_values(v, l, buf, signs, scale, 0);
#endif
#if EPT % BLOCK_SIZE == 0
#pragma unroll
    for (int k = 0; k < EPT / BLOCK_SIZE; k++) {
        RQ_CAT(rq_quantize_, FMT)(v + k * BLOCK_SIZE,
                                  staged + (l.first / BLOCK_SIZE + k) * BLOCK_BYTES);
    }
#else
    sync_row();
    smem_put(row, l.first, v);
    sync_row();
    for (int b = t; b < N / BLOCK_SIZE; b += TPR) {
        RQ_CAT(rq_quantize_, FMT)(row + PAD(b * BLOCK_SIZE), staged + b * BLOCK_BYTES);
    }
#endif
    sync_row();
    if (valid) copy_row(at, staged, t);
}
#endif
