// rotq CUDA kernels: an explicit rotation matrix applied to rows (compressed-tensors'
// `random-matrix` transforms, and any orthogonal matrix a plan carries), y = M x for every row of
// n values. Compiled by NVRTC after formats.cuh; the host defines N (the row length), IN_ELEM
// and OUT_ELEM (0 f32, 1 f16, 2 bf16: the rows read and written).
//
// `mt` is the matrix transposed, row-major (mt[j * N + i] = M[i][j]), so that the threads of a
// block, each computing outputs i, i + blockDim, ..., read consecutive floats for each j. One
// block takes one row at a time: it stages the row in shared memory as f32, synchronizes, then
// each thread sums its outputs over j in f32 (fused multiply-adds, in order of j) and writes
// them. With `x` null the rows are read from `y` (in place: every read is staged before any
// write of the row).

#if IN_ELEM == 0
typedef float in_t;
RQ_FN float in_to_f32(in_t v) { return v; }
#elif IN_ELEM == 1
typedef unsigned short in_t;
RQ_FN float in_to_f32(in_t v) { return rq_f16_to_f32(v); }
#else
typedef unsigned short in_t;
RQ_FN float in_to_f32(in_t v) { return rq_bf16_to_f32(v); }
#endif

#if OUT_ELEM == 0
typedef float out_t;
RQ_FN out_t f32_to_out(float v) { return v; }
RQ_FN float out_to_f32(out_t v) { return v; }
#elif OUT_ELEM == 1
typedef unsigned short out_t;
RQ_FN out_t f32_to_out(float v) { return rq_f32_to_f16(v); }
RQ_FN float out_to_f32(out_t v) { return rq_f16_to_f32(v); }
#else
typedef unsigned short out_t;
RQ_FN out_t f32_to_out(float v) { return rq_f32_to_bf16(v); }
RQ_FN float out_to_f32(out_t v) { return rq_bf16_to_f32(v); }
#endif

extern "C" __global__ void matrix_rows(const in_t* x, out_t* y, long long n_rows, const float* mt) {
    extern __shared__ float row[];  // [N]
    for (long long r = blockIdx.x; r < n_rows; r += gridDim.x) {
        for (int j = threadIdx.x; j < N; j += blockDim.x)
            row[j] = x ? in_to_f32(x[r * N + j]) : out_to_f32(y[r * N + j]);
        __syncthreads();
        for (int i = threadIdx.x; i < N; i += blockDim.x) {
            float acc = 0.0f;
            for (int j = 0; j < N; j++) acc = fmaf(mt[(long long)j * N + i], row[j], acc);
            y[r * N + i] = f32_to_out(acc);
        }
        __syncthreads();
    }
}
