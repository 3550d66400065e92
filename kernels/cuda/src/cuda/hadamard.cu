// rotq CUDA kernels: Hadamard transforms over rows, fused rotate-quantize into a KV cache, and
// dequantize (+ inverse rotation). Compiled at run time by NVRTC; the host emits the module's
// sizes and layout as RowTraits (kernel.rs; see Rows below) and defines what the preprocessor
// chooses by:
//
//   ELEM     0 f32, 1 f16, 2 bf16: the element type of the rows read (rotate, rotate-quantize)
//            or written (dequantize) (elem.cuh's elem_t)
//   M        base of the transform unit: 1 (Sylvester) or 12, 20, 28, 40 (then HAD_ROWS holds
//            the base matrix, and the code that mixes a unit's segments by it is compiled)
//   ROTATE   0: no transform (dequantize only), 1: transform (the codec kernels), 2: an
//            explicit matrix instead of the transform (codec modules only; see matrix_values)
//   FMT      a format name of formats.cuh (rotate-quantize and dequantize modules only): its
//            functions are named after it, and the codec kernels exist only with it
//
// A row is kUnits transform units of M segments of kSegmentValues (a power of two) values; each
// thread holds kValuesPerThread consecutive values of one segment in registers. Butterflies run
// in registers (the low bits of the index), then across the kLanes lanes of a warp with
// shuffles, then across a segment's kSegmentWarps warps through shared memory, where each thread
// takes values that differ in the warp bits. The M x M base matrix mixes the segments of a unit
// through shared memory. All arithmetic is f32. The direction (`inverse`: x = s . (H^T y)
// instead of y = H (s . x)) and the signs s (randomized Hadamard; null for none) are kernel
// arguments, so both directions share one compiled module.

#define FULL_MASK 0xffffffffu
// Shared-memory rows put 4 floats of padding after every 32 values, so that the threads of a
// warp storing or loading their consecutive values as float4s hit different banks.
#define PAD(i) ((i) + 4 * ((i) >> 5))

#ifdef FMT
#define RQ_CAT2(a, b) a##b
#define RQ_CAT(a, b) RQ_CAT2(a, b)
// The module's format: values and bytes per block.
// A TurboQuant row format (RQ_TQ_ROW, turbo.cuh) is one block of a whole row, encoded from the
// padded row in shared memory, never from a thread's registers.
#ifndef RQ_TQ_ROW
#define RQ_TQ_ROW 0
#endif
struct Format {
    enum : int { kBlockSize = RQ_CAT(RQ_BLOCK_SIZE_, FMT) };
    enum : int { kBlockBytes = RQ_CAT(RQ_BLOCK_BYTES_, FMT) };
    enum : bool { kFromRegisters = !RQ_TQ_ROW };
};
#endif

// The host's sizes and layout (RowTraits), and what the kernels rely on. Launch bounds let at
// least 1024 threads (32 warps) share an SM: enough loads in flight to keep the memory system
// busy. Rows in shared memory are kRowStride floats apart, each followed (rotate-quantize,
// dequantize, shift) by the encoded rows kOutStride bytes apart.
struct Rows : RowTraits {
    static_assert((kSegmentValues & (kSegmentValues - 1)) == 0, "segments of a power of two");
    static_assert(kUnitValues == M * kSegmentValues && kRowValues == kUnits * kUnitValues,
                  "a row of units of M segments");
    static_assert((kValuesPerThread & (kValuesPerThread - 1)) == 0 &&
                      kSegmentValues % kValuesPerThread == 0,
                  "a thread's values: a power of two dividing the segment");
    static_assert(kSegmentThreads == kSegmentValues / kValuesPerThread &&
                      kRowThreads == kUnits * M * kSegmentThreads,
                  "threads per segment and per row");
    static_assert(kLanes == (kSegmentThreads < 32 ? kSegmentThreads : 32) &&
                      kSegmentWarps == kSegmentThreads / kLanes,
                  "a segment's lanes, then warps");
    static_assert(kSegmentWarps <= kValuesPerThread, "a group of values per warp and thread");
    static_assert(kThreads == kBlockRows * kRowThreads && kThreads % 32 == 0 && kThreads <= 1024,
                  "the block's rows, in whole warps (full-mask shuffles)");
    static_assert(kVectorized == ((kValuesPerThread * sizeof(elem_t)) % 16 == 0 &&
                                  (kRowValues * sizeof(elem_t)) % 16 == 0),
                  "16-byte loads and stores when a thread's values and rows are 16-byte aligned");
    static_assert(kPackWords == (kValuesPerThread * sizeof(elem_t) + 15) / 16,
                  "a thread's values in 16-byte words");
    static_assert(kRowStride == (PAD(kRowValues) + 3) / 4 * 4, "a padded row, in whole float4s");
#ifdef FMT
    static_assert(kRowValues % Format::kBlockSize == 0 &&
                      kRowBytes == kRowValues / Format::kBlockSize * Format::kBlockBytes,
                  "an encoded row");
    static_assert(kWordCopies == (kRowBytes % 4 == 0), "encoded rows copied in words if whole");
#else
    static_assert(kRowBytes == 0, "no encoded rows without a format");
#endif
    static_assert(kOutStride == (kRowBytes + 15) / 16 * 16, "encoded rows, in whole 16-byte units");
    static_assert(kMinBlocks == (1024 / kThreads > 0 ? 1024 / kThreads : 1),
                  "blocks for 1024 threads per SM");
};

struct Lane {
    int row_in_block;  // which row of the block
    int seg;           // segment of the row (unit * M + segment in the unit)
    int ts;            // thread in the segment
    int first;         // index in the row of the thread's first value
};

RQ_FN Lane lane_of(int tid) {
    Lane l;
    l.row_in_block = tid / Rows::kRowThreads;
    int t = tid % Rows::kRowThreads;
    l.seg = t / Rows::kSegmentThreads;
    l.ts = t % Rows::kSegmentThreads;
    l.first = l.seg * Rows::kSegmentValues + l.ts * Rows::kValuesPerThread;
    return l;
}

// A thread's values as stored, viewable as 16-byte words.
union Pack {
    uint4 q[Rows::kPackWords];
    elem_t e[Rows::kValuesPerThread];
};

RQ_FN void load_values(const elem_t* row, float* v) {
    if (Rows::kVectorized) {
        Pack p;
#pragma unroll
        for (int i = 0; i < Rows::kPackWords; i++) p.q[i] = reinterpret_cast<const uint4*>(row)[i];
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] = elem_to_f32(p.e[e]);
    } else {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] = elem_to_f32(row[e]);
    }
}

RQ_FN void store_values(elem_t* row, const float* v) {
    if (Rows::kVectorized) {
        Pack p;
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) p.e[e] = f32_to_elem(v[e]);
#pragma unroll
        for (int i = 0; i < Rows::kPackWords; i++) reinterpret_cast<uint4*>(row)[i] = p.q[i];
    } else {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) row[e] = f32_to_elem(v[e]);
    }
}

// A thread's values to and from its shared-memory row.
RQ_FN void smem_put(float* row, int first, const float* v) {
    if (Rows::kValuesPerThread % 4 == 0) {
#pragma unroll
        for (int j = 0; j < Rows::kValuesPerThread / 4; j++)
            *reinterpret_cast<float4*>(row + PAD(first + 4 * j)) =
                make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    } else {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) row[PAD(first + e)] = v[e];
    }
}

RQ_FN void smem_get(const float* row, int first, float* v) {
    if (Rows::kValuesPerThread % 4 == 0) {
#pragma unroll
        for (int j = 0; j < Rows::kValuesPerThread / 4; j++) {
            float4 q = *reinterpret_cast<const float4*>(row + PAD(first + 4 * j));
            v[4 * j] = q.x;
            v[4 * j + 1] = q.y;
            v[4 * j + 2] = q.z;
            v[4 * j + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] = row[PAD(first + e)];
    }
}

#if M > 1
// Sign of base-matrix entry (a, b): bit b of HAD_ROWS[a] set means -1.
RQ_FN float base_sign(int a, int b) { return ((HAD_ROWS[a] >> b) & 1ull) ? -1.0f : 1.0f; }
#endif

// The unnormalized transform of every segment and unit of the block's rows, in place on the
// threads' registers `v`. `buf` is the block's shared memory (kBlockRows rows kRowStride floats
// apart) when a segment spans several warps or M > 1; every thread of the block must call this
// (it synchronizes).
RQ_FN void transform(float* v, const Lane& l, float* buf, int inverse) {
    // Bits of the index inside a thread.
#pragma unroll
    for (int h = 1; h < Rows::kValuesPerThread; h <<= 1) {
#pragma unroll
        for (int i = 0; i < Rows::kValuesPerThread; i++) {
            if ((i & h) == 0) {
                float a = v[i], b = v[i + h];
                v[i] = a + b;
                v[i + h] = a - b;
            }
        }
    }
    // Bits of the lane: partners are `h` lanes apart in the same warp.
    int lane = l.ts % Rows::kLanes;
#pragma unroll
    for (int h = 1; h < Rows::kLanes; h <<= 1) {
#pragma unroll
        for (int i = 0; i < Rows::kValuesPerThread; i++) {
            float o = __shfl_xor_sync(FULL_MASK, v[i], h);
            v[i] = (lane & h) ? (o - v[i]) : (v[i] + o);
        }
    }
    if constexpr (Rows::kSegmentWarps > 1 || M > 1) {
        float* row = buf + l.row_in_block * Rows::kRowStride;
        smem_put(row, l.first, v);
        __syncthreads();
        if constexpr (Rows::kSegmentWarps > 1) {
            // Bits of the warp: each thread takes kValuesPerThread / kSegmentWarps groups of
            // kSegmentWarps values that differ only in the warp bits of their index.
            const int G = Rows::kValuesPerThread / Rows::kSegmentWarps;
            int seg = l.seg * Rows::kSegmentValues;
#pragma unroll
            for (int j = 0; j < G; j++) {
                int g = l.ts * G + j;
                float u[Rows::kSegmentWarps];
#pragma unroll
                for (int w = 0; w < Rows::kSegmentWarps; w++)
                    u[w] = row[PAD(seg + w * (Rows::kLanes * Rows::kValuesPerThread) + g)];
#pragma unroll
                for (int h = 1; h < Rows::kSegmentWarps; h <<= 1) {
#pragma unroll
                    for (int i = 0; i < Rows::kSegmentWarps; i++) {
                        if ((i & h) == 0) {
                            float a = u[i], b = u[i + h];
                            u[i] = a + b;
                            u[i + h] = a - b;
                        }
                    }
                }
#pragma unroll
                for (int w = 0; w < Rows::kSegmentWarps; w++)
                    row[PAD(seg + w * (Rows::kLanes * Rows::kValuesPerThread) + g)] = u[w];
            }
            __syncthreads();
        }
#if M > 1
        {
            // Y[a][q] = sum_b B[a][b] X[b][q] over the M segments of each unit (B^T if inverse).
            int t = l.seg * Rows::kSegmentThreads + l.ts;
            for (int q = t; q < Rows::kUnits * Rows::kSegmentValues; q += Rows::kRowThreads) {
                int unit =
                    (q / Rows::kSegmentValues) * Rows::kUnitValues + (q % Rows::kSegmentValues);
                float x[M];
#pragma unroll
                for (int b = 0; b < M; b++) x[b] = row[PAD(unit + b * Rows::kSegmentValues)];
#pragma unroll
                for (int a = 0; a < M; a++) {
                    float y = 0.0f;
#pragma unroll
                    for (int b = 0; b < M; b++) {
                        float s = inverse ? base_sign(b, a) : base_sign(a, b);
                        y += s * x[b];
                    }
                    row[PAD(unit + a * Rows::kSegmentValues)] = y;
                }
            }
        }
        __syncthreads();
#endif
        smem_get(row, l.first, v);
    }
}

// Signs before the transform (forward) or after it (inverse), then the 1/sqrt(unit) scale.
RQ_FN void rotate_values(float* v, const Lane& l, float* buf, const float* signs, float scale,
                         int inverse) {
    if (signs && !inverse) {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] *= signs[l.first + e];
    }
    transform(v, l, buf, inverse);
#pragma unroll
    for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] *= scale;
    if (signs && inverse) {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] *= signs[l.first + e];
    }
}

// Rotates `n_rows` rows of kRowValues values in place.
extern "C" __global__ void __launch_bounds__(Rows::kThreads, Rows::kMinBlocks)
    rotate_rows(elem_t* data, long long n_rows, const float* signs, float scale, int inverse) {
    extern __shared__ float4 smem[];
    float* buf = reinterpret_cast<float*>(smem);
    Lane l = lane_of(threadIdx.x);
    long long r = (long long)blockIdx.x * Rows::kBlockRows + l.row_in_block;
    bool valid = r < n_rows;
    elem_t* row = data + (valid ? r : 0) * Rows::kRowValues + l.first;
    float v[Rows::kValuesPerThread];
    if (valid) {
        load_values(row, v);
    } else {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] = 0.0f;
    }
    rotate_values(v, l, buf, signs, scale, inverse);
    if (valid) store_values(row, v);
}

#ifdef FMT
// Encoded rows are staged in shared memory, after the float rows, so that global memory is
// read and written by consecutive threads in 4-byte words (or bytes), not block by block.

// Waits for the threads of this row: a warp barrier when the row's threads are one aligned
// group of a warp, else the block's.
RQ_FN void sync_row() {
    if (32 % Rows::kRowThreads == 0) {
        __syncwarp();
    } else {
        __syncthreads();
    }
}

#if ROTATE == 2
// An explicit rotation R instead of the transform: v <- R v, or R^T v when `inverse`, over the
// whole row, through the row's shared memory. `mt` (passed as the signs) is R^T row-major,
// matrix.cu's layout (mt[j * N + i] = R[i][j]); each output sums over j in order in f32 fused
// multiply-adds, as matrix.cu does, so that a codec kernel under a matrix writes the bytes of a
// matrix pass followed by the unrotated codec kernel, with no buffer between them. The
// inverse reads mt transposed (strided, but the matrix stays in cache).
RQ_FN void matrix_values(float* v, const Lane& l, float* buf, const float* mt, int inverse) {
    float* row = buf + l.row_in_block * Rows::kRowStride;
    sync_row();  // earlier readers of `row` are done
    smem_put(row, l.first, v);
    sync_row();
#pragma unroll
    for (int e = 0; e < Rows::kValuesPerThread; e++) {
        const long long i = l.first + e;
        float acc = 0.0f;
        for (int j = 0; j < Rows::kRowValues; j++) {
            const float m = inverse ? mt[i * Rows::kRowValues + j] : mt[j * Rows::kRowValues + i];
            acc = fmaf(m, row[PAD(j)], acc);
        }
        v[e] = acc;
    }
    sync_row();  // before `row` is written again
}
#endif

// Copies one encoded row (`t`: this thread's index among its row's kRowThreads threads).
RQ_FN void copy_row(unsigned char* dst, const unsigned char* src, int t) {
    if (Rows::kWordCopies) {
        for (int i = t; i < Rows::kRowBytes / 4; i += Rows::kRowThreads)
            reinterpret_cast<unsigned int*>(dst)[i] = reinterpret_cast<const unsigned int*>(src)[i];
    } else {
        for (int i = t; i < Rows::kRowBytes; i += Rows::kRowThreads) dst[i] = src[i];
    }
}

// Rotates and quantizes this thread's row of `input` (r = the block's row for this thread; rows
// past n_rows encode zeros) into its encoded row staged in shared memory, then, for a row that
// exists, calls write(r, staged, t) with t this thread's index among the row's threads: the two
// kernels below differ only in where the row goes.
template <class Write>
RQ_FN void rotate_quantize_rows(const elem_t* input, long long n_rows, const float* signs,
                                float scale, Write write) {
    extern __shared__ float4 smem[];
    float* buf = reinterpret_cast<float*>(smem);
    Lane l = lane_of(threadIdx.x);
    long long r = (long long)blockIdx.x * Rows::kBlockRows + l.row_in_block;
    bool valid = r < n_rows;
    float v[Rows::kValuesPerThread];
    if (valid) {
        load_values(input + r * Rows::kRowValues + l.first, v);
    } else {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] = 0.0f;
    }
#if ROTATE == 2
    matrix_values(v, l, buf, signs, 0);
#elif ROTATE
    rotate_values(v, l, buf, signs, scale, 0);
#endif
    float* row = buf + l.row_in_block * Rows::kRowStride;
    unsigned char* staged =
        reinterpret_cast<unsigned char*>(buf + Rows::kBlockRows * Rows::kRowStride) +
        l.row_in_block * Rows::kOutStride;
    int t = l.seg * Rows::kSegmentThreads + l.ts;
    if constexpr (Format::kFromRegisters && Rows::kValuesPerThread % Format::kBlockSize == 0) {
        // Each thread holds whole blocks: it encodes them from its registers.
#pragma unroll
        for (int k = 0; k < Rows::kValuesPerThread / Format::kBlockSize; k++) {
            RQ_CAT(rq_quantize_, FMT)(
                v + k * Format::kBlockSize,
                staged + (l.first / Format::kBlockSize + k) * Format::kBlockBytes);
        }
    } else {
        sync_row();  // the transform may still read `row`
        smem_put(row, l.first, v);
        sync_row();
        for (int b = t; b < Rows::kRowValues / Format::kBlockSize; b += Rows::kRowThreads) {
            // A block (at most 32 values, 32-aligned) is contiguous in the padded row.
            RQ_CAT(rq_quantize_, FMT)(row + PAD(b * Format::kBlockSize),
                                      staged + b * Format::kBlockBytes);
        }
    }
    sync_row();
    if (!valid) return;
    write(r, staged, t);
}

// Rotates `n_rows` input rows ((token, head) rows of new tokens, token-major) and quantizes
// them into the cache. Row (token i, head h) goes to cache position pos = start_pos + i: with a
// block table, to page table[pos / page_tokens], slot pos % page_tokens; without one, to row
// pos. Cache rows are (position, head) rows of kRowBytes.
extern "C" __global__ void __launch_bounds__(Rows::kThreads, Rows::kMinBlocks)
    rotate_quantize(const elem_t* input, long long n_rows, long long n_heads, long long start_pos,
                    const unsigned int* table, long long page_tokens, unsigned char* cache,
                    const float* signs, float scale) {
    rotate_quantize_rows(
        input, n_rows, signs, scale, [&](long long r, const unsigned char* staged, int t) {
            long long pos = start_pos + r / n_heads;
            long long head = r % n_heads;
            long long slot =
                table ? (long long)table[pos / page_tokens] * page_tokens + pos % page_tokens : pos;
            copy_row(cache + (slot * n_heads + head) * Rows::kRowBytes, staged, t);
        });
}

// The batch append (vLLM's reshape_and_cache): token i's rows go to slot slots[i] of a pool of
// n_slots slots (cache rows (slot, head)), -1 skipping the token. A slot outside the pool (or
// below -1) is the caller's error: its rows are not written, and bit 0 of *status is set when
// `status` is not null (the host reads it when it wants to know).
extern "C" __global__ void __launch_bounds__(Rows::kThreads, Rows::kMinBlocks)
    rotate_quantize_slots(const elem_t* input, long long n_rows, long long n_heads,
                          const long long* slots, long long n_slots, unsigned char* cache,
                          const float* signs, float scale, unsigned int* status) {
    rotate_quantize_rows(
        input, n_rows, signs, scale, [&](long long r, const unsigned char* staged, int t) {
            const long long slot = slots[r / n_heads];
            if (slot == -1) return;
            if (slot < -1 || slot >= n_slots) {
                if (status && t == 0) atomicOr(status, 1u);
                return;
            }
            copy_row(cache + (slot * n_heads + r % n_heads) * Rows::kRowBytes, staged, t);
        });
}

// Dequantizes `n_rows` cache rows into rows of elem_t, rotated back when ROTATE (by the
// transform, or the matrix's transpose).
extern "C" __global__ void __launch_bounds__(Rows::kThreads, Rows::kMinBlocks)
    dequantize_rows(const unsigned char* cache, long long n_rows, elem_t* output,
                    const float* signs, float scale) {
    extern __shared__ float4 smem[];
    float* buf = reinterpret_cast<float*>(smem);
    Lane l = lane_of(threadIdx.x);
    long long r = (long long)blockIdx.x * Rows::kBlockRows + l.row_in_block;
    bool valid = r < n_rows;
    float* row = buf + l.row_in_block * Rows::kRowStride;
    unsigned char* staged =
        reinterpret_cast<unsigned char*>(buf + Rows::kBlockRows * Rows::kRowStride) +
        l.row_in_block * Rows::kOutStride;
    int t = l.seg * Rows::kSegmentThreads + l.ts;
    if (valid) copy_row(staged, cache + r * Rows::kRowBytes, t);
    sync_row();
    if (valid) {
        for (int b = t; b < Rows::kRowValues / Format::kBlockSize; b += Rows::kRowThreads) {
            RQ_CAT(rq_dequantize_, FMT)(staged + b * Format::kBlockBytes,
                                        row + PAD(b * Format::kBlockSize));
        }
    }
    sync_row();
    float v[Rows::kValuesPerThread];
    smem_get(row, l.first, v);
    if (!valid) {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++)
            v[e] = 0.0f;  // that row's shared memory was not written
    }
#if ROTATE == 2
    matrix_values(v, l, buf, signs, 1);
#elif ROTATE
    sync_row();  // the transform writes `row`
    rotate_values(v, l, buf, signs, scale, 1);
#endif
    if (valid) store_values(output + r * Rows::kRowValues + l.first, v);
}
// Context shift of cache rows in place: the `n_rows` (position, head) rows from position
// `start_pos` on (located as rotate_quantize writes them) are dequantized, rotated back
// (ROTATE), turned by RoPE, rotated again and re-quantized. RoPE turns pair i of the first
// `rot_dims` values, (2i, 2i + 1), or (i, i + rot_dims / 2) when `neox`, by the angle whose
// cosine and sine are cs[2i] and cs[2i + 1].
extern "C" __global__ void __launch_bounds__(Rows::kThreads, Rows::kMinBlocks)
    shift_rows(unsigned char* cache, long long n_rows, long long n_heads, long long start_pos,
               const unsigned int* table, long long page_tokens, const float* signs, float scale,
               const float* cs, int rot_dims, int neox) {
    extern __shared__ float4 smem[];
    float* buf = reinterpret_cast<float*>(smem);
    Lane l = lane_of(threadIdx.x);
    long long r = (long long)blockIdx.x * Rows::kBlockRows + l.row_in_block;
    bool valid = r < n_rows;
    float* row = buf + l.row_in_block * Rows::kRowStride;
    unsigned char* staged =
        reinterpret_cast<unsigned char*>(buf + Rows::kBlockRows * Rows::kRowStride) +
        l.row_in_block * Rows::kOutStride;
    int t = l.seg * Rows::kSegmentThreads + l.ts;
    unsigned char* at = cache;
    if (valid) {
        long long pos = start_pos + r / n_heads;
        long long head = r % n_heads;
        long long slot =
            table ? (long long)table[pos / page_tokens] * page_tokens + pos % page_tokens : pos;
        at = cache + (slot * n_heads + head) * Rows::kRowBytes;
        copy_row(staged, at, t);
    }
    sync_row();
    if (valid) {
        for (int b = t; b < Rows::kRowValues / Format::kBlockSize; b += Rows::kRowThreads) {
            RQ_CAT(rq_dequantize_, FMT)(staged + b * Format::kBlockBytes,
                                        row + PAD(b * Format::kBlockSize));
        }
    }
    sync_row();
    float v[Rows::kValuesPerThread];
    smem_get(row, l.first, v);
    if (!valid) {
#pragma unroll
        for (int e = 0; e < Rows::kValuesPerThread; e++) v[e] = 0.0f;
    }
#if ROTATE == 2
    matrix_values(v, l, buf, signs, 1);
#elif ROTATE
    sync_row();
    rotate_values(v, l, buf, signs, scale, 1);
#endif
    // The pairs can lie in different threads' values: turn them in shared memory.
    sync_row();
    smem_put(row, l.first, v);
    sync_row();
    for (int i = t; i < rot_dims / 2; i += Rows::kRowThreads) {
        const int a = neox ? i : 2 * i, b = neox ? i + rot_dims / 2 : 2 * i + 1;
        const float x = row[PAD(a)], y = row[PAD(b)], c = cs[2 * i], s = cs[2 * i + 1];
        row[PAD(a)] = x * c - y * s;
        row[PAD(b)] = x * s + y * c;
    }
    sync_row();
    smem_get(row, l.first, v);
#if ROTATE == 2
    matrix_values(v, l, buf, signs, 0);
#elif ROTATE
    sync_row();
    rotate_values(v, l, buf, signs, scale, 0);
#endif
    if constexpr (Format::kFromRegisters && Rows::kValuesPerThread % Format::kBlockSize == 0) {
#pragma unroll
        for (int k = 0; k < Rows::kValuesPerThread / Format::kBlockSize; k++) {
            RQ_CAT(rq_quantize_, FMT)(
                v + k * Format::kBlockSize,
                staged + (l.first / Format::kBlockSize + k) * Format::kBlockBytes);
        }
    } else {
        sync_row();
        smem_put(row, l.first, v);
        sync_row();
        for (int b = t; b < Rows::kRowValues / Format::kBlockSize; b += Rows::kRowThreads) {
            RQ_CAT(rq_quantize_, FMT)(row + PAD(b * Format::kBlockSize),
                                      staged + b * Format::kBlockBytes);
        }
    }
    sync_row();
    if (valid) copy_row(at, staged, t);
}
#endif
