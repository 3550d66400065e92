// rotq's TurboQuant-MSE row formats (tq2, tq3, tq4) as device code: a whole row is one
// "block". Mirrors rotq_reference::turboquant::formats operation for operation (its
// "Arithmetic" paragraph): the sum of squares in f64 in eight lanes, codes by comparing y_i with
// the smallest f32 at or above m * |y| (f64 midpoints m), the levels' squares summed in f32 in
// eight lanes, the scale |y| / sqrt(that) rounded once from f64 to f16, values f32(level) * s.
// Compiled by NVRTC after formats.cuh (--fmad=false: no contractions), device code only.
//
// The host emits, per format F used by the module (kernel.rs / decode_module.rs,
// `turbo_defines`), for the module's row length:
//   RQ_BLOCK_SIZE_F, RQ_BLOCK_BYTES_F   the row's values and bytes (a row is one block)
//   RQ_TQ_BITS_F                        bits per code
//   RQ_TQ_LEVELS_F[16], RQ_TQ_SQUARES_F[16], RQ_TQ_MIDS_F[15]   the codebook of that length
// and then RQ_TQ_DEFINE(F) makes rq_quantize_F and rq_dequantize_F, which read and write the
// row's floats in the codec's padded shared-memory layout (4 floats after every 32), and
// rq_tq_values_F, which decodes n values from value `first` on (the attention kernels).

#ifndef RQ_TURBO_CUH
#define RQ_TURBO_CUH

// The codec's padded row index (hadamard.cu's PAD).
#define RQ_TQ_PAD(i) ((i) + 4 * ((i) >> 5))

// The smallest f32 at or above v (NaN stays NaN): for an f32 y, y >= v exactly when y >= it.
RQ_FN float rq_tq_ceil_f32(double v) {
    float f = __double2float_rn(v);
    if ((double)f < v) {
        unsigned int u = __float_as_uint(f);
        // f < v, so f is not +inf and not NaN; -0 and +0 step to the smallest subnormal.
        if (f == 0.0f)
            u = 1u;
        else if (u >> 31)
            u -= 1u;
        else
            u += 1u;
        f = __uint_as_float(u);
    }
    return f;
}

// f64 -> f16 bits, round to nearest even, overflow to +-inf, every NaN to 0x7E00: the oracle's
// `stored_f16`.
RQ_FN unsigned short rq_tq_f64_to_f16(double x) {
    unsigned long long b = __double_as_longlong(x);
    unsigned int sign = (unsigned int)(b >> 48) & 0x8000u;
    unsigned long long mag = b & 0x7FFFFFFFFFFFFFFFull;
    int exp = (int)(mag >> 52);
    unsigned long long man = mag & 0xFFFFFFFFFFFFFull;
    if (exp == 0x7FF) return man ? (unsigned short)0x7E00u : (unsigned short)(sign | 0x7C00u);
    // Unbiased exponent; f16 normals need -14 <= e <= 15.
    int e = exp - 1023;
    if (e > 15) return (unsigned short)(sign | 0x7C00u);
    if (exp == 0) return (unsigned short)sign;  // f64 subnormals are far below f16's
    unsigned long long m = man | (1ull << 52);  // 53-bit significand
    int shift;                                  // bits dropped from m
    unsigned int base;
    if (e >= -14) {
        shift = 42;  // keep 11 bits (implicit + 10)
        base = (unsigned int)(e + 15) << 10;
        m &= ~(1ull << 52);
    } else {
        shift = 42 + (-14 - e);  // subnormal: fewer bits
        if (shift > 63) return (unsigned short)sign;
        base = 0;
    }
    unsigned long long q = m >> shift;
    unsigned long long rem = m & ((1ull << shift) - 1);
    unsigned long long half = 1ull << (shift - 1);
    unsigned int r = base + (unsigned int)q;
    if (rem > half || (rem == half && (q & 1))) r += 1;  // a carry moves into the exponent
    return (unsigned short)(sign | r);
}

RQ_FN float rq_tq_f16_to_f32(const unsigned char* p) {
    return rq_f16_to_f32((unsigned short)(p[0] | (p[1] << 8)));
}

// One row: `x` the row's d floats at padded indices, `out` its bytes.
RQ_FN void rq_tq_quantize(const float* x, unsigned char* out, int d, int bits, const double* mids,
                          const float* squares) {
    double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < d; i++) {
        const double v = (double)x[RQ_TQ_PAD(i)];
        p[i & 7] = p[i & 7] + v * v;
    }
    const double n = sqrt(((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7])));
    const int levels = 1 << bits;
    float th[15];
    for (int k = 0; k < levels - 1; k++) th[k] = rq_tq_ceil_f32(mids[k] * n);
    float e[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int code_bytes = d * bits / 8;
    for (int i = 0; i < code_bytes; i++) out[i] = 0;
    for (int i = 0; i < d; i++) {
        const float v = x[RQ_TQ_PAD(i)];
        int c = 0;
        for (int k = 0; k < levels - 1; k++) c += v >= th[k] ? 1 : 0;
        e[i & 7] = e[i & 7] + squares[c];
        const int at = i * bits;
        const unsigned int w = (unsigned int)c << (at & 7);
        out[at >> 3] |= (unsigned char)w;
        if ((w >> 8) != 0) out[(at >> 3) + 1] |= (unsigned char)(w >> 8);
    }
    const float csq = ((e[0] + e[4]) + (e[2] + e[6])) + ((e[1] + e[5]) + (e[3] + e[7]));
    const unsigned short s = rq_tq_f64_to_f16(n / sqrt((double)csq));
    out[code_bytes] = (unsigned char)(s & 0xFF);
    out[code_bytes + 1] = (unsigned char)(s >> 8);
}

// Code i of a row of `bits`-bit codes (an LSB-first bit stream; reads at most the byte after
// the code's last one, which the row holds: its scale follows the codes).
RQ_FN int rq_tq_code(const unsigned char* row, int i, int bits) {
    const int at = i * bits;
    const unsigned int w = row[at >> 3] | ((unsigned int)row[(at >> 3) + 1] << 8);
    return (int)((w >> (at & 7)) & ((1u << bits) - 1));
}

#define RQ_TQ_DEFINE(F)                                                                   \
    RQ_FN void rq_quantize_##F(const float* x, unsigned char* out) {                      \
        rq_tq_quantize(x, out, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F, RQ_TQ_MIDS_##F,         \
                       RQ_TQ_SQUARES_##F);                                                \
    }                                                                                     \
    RQ_FN void rq_dequantize_##F(const unsigned char* in, float* y) {                     \
        const float s = rq_tq_f16_to_f32(in + RQ_BLOCK_SIZE_##F * RQ_TQ_BITS_##F / 8);    \
        for (int i = 0; i < RQ_BLOCK_SIZE_##F; i++)                                       \
            y[RQ_TQ_PAD(i)] = RQ_TQ_LEVELS_##F[rq_tq_code(in, i, RQ_TQ_BITS_##F)] * s;    \
    }                                                                                     \
    RQ_FN void rq_tq_values_##F(const unsigned char* row, int first, int n, float* out) { \
        const float s = rq_tq_f16_to_f32(row + RQ_BLOCK_SIZE_##F * RQ_TQ_BITS_##F / 8);   \
        for (int e = 0; e < n; e++)                                                       \
            out[e] = RQ_TQ_LEVELS_##F[rq_tq_code(row, first + e, RQ_TQ_BITS_##F)] * s;    \
    }

#endif
