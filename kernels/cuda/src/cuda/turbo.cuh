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
//
// The other row formats get the same three functions from their own macro:
//   RQ_QJL_DEFINE(F)        tq2_qjl .. tq4_qjl: RQ_TQ_BITS_F is the MSE part's bits, the levels
//                           and midpoints are f64 (RQ_TQ_LEVELS64_F, RQ_TQ_MIDS_F), the sketch
//                           S is the module global RQ_QJL_SKETCH_F (d x d f64, filled by the host
//                           when the module loads: turbo.rs), RQ_QJL_ROOT the f64 sqrt(pi / 2)
//   RQ_VLLM_FP8_DEFINE(F)   vllm_fp8: E4M3 bytes
//   RQ_VLLM_KEY_DEFINE(F)   vllm_k3, vllm_k4: vLLM's codebook (RQ_VK_LEVELS_F, RQ_VK_MIDS_F, f32)
//                           after vLLM's Hadamard, done in f64 as the oracle does it
//   RQ_VLLM_VALUE_DEFINE(F) vllm_v3, vllm_v4: min-max codes, f16 scale and minimum
// The QJL and vLLM-key values for attention take O(d) work per value (a column of S, a row of
// the Hadamard matrix): correct, and slow; rows encode and decode one thread per row.

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

// The oracle's order of an eight-lane sum: ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)).
RQ_FN double rq_tq_lanes(const double* p) {
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

// |y| of a row's d floats (padded indices): the squares summed in f64 in eight lanes.
RQ_FN double rq_tq_norm(const float* x, int d) {
    double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < d; i++) {
        const double v = (double)x[RQ_TQ_PAD(i)];
        p[i & 7] = p[i & 7] + v * v;
    }
    return sqrt(rq_tq_lanes(p));
}

// The f32 thresholds of a row of norm n: th[k] is the smallest f32 at or above mids[k] * n, so
// that the code of y_i, the number of thresholds it reaches (rq_tq_level), is the oracle's.
RQ_FN void rq_tq_thresholds(const double* mids, double n, int bits, float* th) {
    for (int k = 0; k < (1 << bits) - 1; k++) th[k] = rq_tq_ceil_f32(mids[k] * n);
}

RQ_FN int rq_tq_level(float v, const float* th, int bits) {
    int c = 0;
    for (int k = 0; k < (1 << bits) - 1; k++) c += v >= th[k] ? 1 : 0;
    return c;
}

// Sets code i (of `bits` bits) in an LSB-first stream whose bytes were zeroed.
RQ_FN void rq_tq_put_code(unsigned char* out, int i, int bits, int c) {
    const int at = i * bits;
    const unsigned int w = (unsigned int)c << (at & 7);
    out[at >> 3] |= (unsigned char)w;
    if ((w >> 8) != 0) out[(at >> 3) + 1] |= (unsigned char)(w >> 8);
}

// One row: `x` the row's d floats at padded indices, `out` its bytes.
RQ_FN void rq_tq_quantize(const float* x, unsigned char* out, int d, int bits, const double* mids,
                          const float* squares) {
    const double n = rq_tq_norm(x, d);
    float th[15];
    rq_tq_thresholds(mids, n, bits, th);
    float e[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int code_bytes = d * bits / 8;
    for (int i = 0; i < code_bytes; i++) out[i] = 0;
    for (int i = 0; i < d; i++) {
        const int c = rq_tq_level(x[RQ_TQ_PAD(i)], th, bits);
        e[i & 7] = e[i & 7] + squares[c];
        rq_tq_put_code(out, i, bits, c);
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

// ---------------------------------------------------------------------------------------------
// Helpers of the formats below.

// Whether the row's d floats (padded indices) are all finite: vLLM's parts poison other rows.
RQ_FN bool rq_tq_row_finite(const float* x, int d) {
    bool ok = true;
    for (int i = 0; i < d; i++) ok = ok && rq_is_finite(x[RQ_TQ_PAD(i)]);
    return ok;
}

// ---------------------------------------------------------------------------------------------
// TurboQuant-prod (tq*_qjl): the MSE codes of `bits` bits (no norm correction), f16 |y|, the d
// signs of S r, f16 |r| (formats.rs, "prod"). No local arrays: r_i is recomputed from the row and
// its codes wherever it is needed.

RQ_FN void rq_qjl_quantize(const float* x, unsigned char* out, int d, int bits, const double* mids,
                           const double* levels, const double* sketch) {
    const double n = rq_tq_norm(x, d);
    float th[15];
    rq_tq_thresholds(mids, n, bits, th);
    const int code_bytes = (d * bits + 7) / 8;
    const int total = code_bytes + 2 + d / 8 + 2;
    for (int i = 0; i < total; i++) out[i] = 0;
    for (int i = 0; i < d; i++)
        rq_tq_put_code(out, i, bits, rq_tq_level(x[RQ_TQ_PAD(i)], th, bits));
    const unsigned short n16 = rq_tq_f64_to_f16(n);
    out[code_bytes] = (unsigned char)(n16 & 0xFF);
    out[code_bytes + 1] = (unsigned char)(n16 >> 8);
    const double ns = (double)rq_f16_to_f32(n16);
    unsigned char* signs = out + code_bytes + 2;
    for (int j = 0; j < d; j++) {
        double acc = 0.0;
        for (int i = 0; i < d; i++) {
            const double r = (double)x[RQ_TQ_PAD(i)] - levels[rq_tq_code(out, i, bits)] * ns;
            acc = acc + sketch[(long long)j * d + i] * r;
        }
        if (acc >= 0.0) signs[j >> 3] |= (unsigned char)(1u << (j & 7));
    }
    double q[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < d; i++) {
        const double r = (double)x[RQ_TQ_PAD(i)] - levels[rq_tq_code(out, i, bits)] * ns;
        q[i & 7] = q[i & 7] + r * r;
    }
    const unsigned short r16 = rq_tq_f64_to_f16(sqrt(rq_tq_lanes(q)));
    out[code_bytes + 2 + d / 8] = (unsigned char)(r16 & 0xFF);
    out[code_bytes + 2 + d / 8 + 1] = (unsigned char)(r16 >> 8);
}

// Value i of a row: c_i |y|16, then (+-k) S_ji added for j = 0, 1, ... in f64, rounded to f32.
RQ_FN float rq_qjl_value(const unsigned char* row, int i, int d, int bits, const double* levels,
                         const double* sketch, double root) {
    const int code_bytes = (d * bits + 7) / 8;
    const double scale = (double)rq_tq_f16_to_f32(row + code_bytes);
    double y = levels[rq_tq_code(row, i, bits)] * scale;
    const unsigned char* signs = row + code_bytes + 2;
    const double k = ((double)rq_tq_f16_to_f32(signs + d / 8) * root) / (double)d;
    for (int j = 0; j < d; j++) {
        const double z = (signs[j >> 3] >> (j & 7)) & 1 ? k : -k;
        y = y + z * sketch[(long long)j * d + i];
    }
    return __double2float_rn(y);
}

#define RQ_QJL_DEFINE(F)                                                                        \
    RQ_FN void rq_quantize_##F(const float* x, unsigned char* out) {                            \
        rq_qjl_quantize(x, out, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F, RQ_TQ_MIDS_##F,              \
                        RQ_TQ_LEVELS64_##F, RQ_QJL_SKETCH_##F);                                 \
    }                                                                                           \
    RQ_FN void rq_dequantize_##F(const unsigned char* in, float* y) {                           \
        for (int i = 0; i < RQ_BLOCK_SIZE_##F; i++)                                             \
            y[RQ_TQ_PAD(i)] = rq_qjl_value(in, i, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F,            \
                                           RQ_TQ_LEVELS64_##F, RQ_QJL_SKETCH_##F, RQ_QJL_ROOT); \
    }                                                                                           \
    RQ_FN void rq_tq_values_##F(const unsigned char* row, int first, int n, float* out) {       \
        for (int e = 0; e < n; e++)                                                             \
            out[e] = rq_qjl_value(row, first + e, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F,            \
                                  RQ_TQ_LEVELS64_##F, RQ_QJL_SKETCH_##F, RQ_QJL_ROOT);          \
    }

// ---------------------------------------------------------------------------------------------
// vLLM's slot parts (rotq_reference::turboquant::vllm). A row holding a NaN or an infinity is
// poisoned (decodes to NaN), as the registry's rule says.

// vllm_fp8: byte i = e4m3(k_i), no scale.
#define RQ_VLLM_FP8_DEFINE(F)                                                                \
    RQ_FN void rq_quantize_##F(const float* x, unsigned char* out) {                         \
        const bool ok = rq_tq_row_finite(x, RQ_BLOCK_SIZE_##F);                              \
        for (int i = 0; i < RQ_BLOCK_SIZE_##F; i++)                                          \
            out[i] = ok ? rq_e4m3_encode(x[RQ_TQ_PAD(i)]) : (unsigned char)0x7F;             \
    }                                                                                        \
    RQ_FN void rq_dequantize_##F(const unsigned char* in, float* y) {                        \
        for (int i = 0; i < RQ_BLOCK_SIZE_##F; i++) y[RQ_TQ_PAD(i)] = rq_e4m3_decode(in[i]); \
    }                                                                                        \
    RQ_FN void rq_tq_values_##F(const unsigned char* row, int first, int n, float* out) {    \
        for (int e = 0; e < n; e++) out[e] = rq_e4m3_decode(row[first + e]);                 \
    }

// vllm_v3, vllm_v4: m = min v, s = max((max v - m) / (2^b - 1), 1e-8), code
// min(trunc((v - m) / s + 0.5), 2^b - 1), in f32; then f16 s and f16 m; decoded fma(code, s, m).
RQ_FN void rq_vllm_value_quantize(const float* x, unsigned char* out, int d, int bits) {
    const int code_bytes = (d * bits + 7) / 8;
    for (int i = 0; i < code_bytes + 4; i++) out[i] = 0;
    if (!rq_tq_row_finite(x, d)) {
        rq_write_u16(out + code_bytes, (unsigned short)RQ_F16_NAN);
        rq_write_u16(out + code_bytes + 2, (unsigned short)RQ_F16_NAN);
        return;
    }
    const int top = (1 << bits) - 1;
    float lo = x[RQ_TQ_PAD(0)], hi = lo;
    for (int i = 1; i < d; i++) {
        const float v = x[RQ_TQ_PAD(i)];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    float s = (hi - lo) / (float)top;
    s = s > 1e-8f ? s : 1e-8f;
    for (int i = 0; i < d; i++) {
        int c = (int)((x[RQ_TQ_PAD(i)] - lo) / s + 0.5f);
        c = c < 0 ? 0 : (c > top ? top : c);
        rq_tq_put_code(out, i, bits, c);
    }
    rq_write_u16(out + code_bytes, rq_f32_to_f16(s));
    rq_write_u16(out + code_bytes + 2, rq_f32_to_f16(lo));
}

RQ_FN float rq_vllm_value(const unsigned char* row, int i, int d, int bits) {
    const int code_bytes = (d * bits + 7) / 8;
    const float s = rq_tq_f16_to_f32(row + code_bytes);
    const float m = rq_tq_f16_to_f32(row + code_bytes + 2);
    return fmaf((float)rq_tq_code(row, i, bits), s, m);
}

#define RQ_VLLM_VALUE_DEFINE(F)                                                           \
    RQ_FN void rq_quantize_##F(const float* x, unsigned char* out) {                      \
        rq_vllm_value_quantize(x, out, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F);                \
    }                                                                                     \
    RQ_FN void rq_dequantize_##F(const unsigned char* in, float* y) {                     \
        for (int i = 0; i < RQ_BLOCK_SIZE_##F; i++)                                       \
            y[RQ_TQ_PAD(i)] = rq_vllm_value(in, i, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F);    \
    }                                                                                     \
    RQ_FN void rq_tq_values_##F(const unsigned char* row, int first, int n, float* out) { \
        for (int e = 0; e < n; e++)                                                       \
            out[e] = rq_vllm_value(row, first + e, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F);    \
    }

// The oracle's normalized Sylvester transform of d (a power of two) f64 values in place: the
// butterflies at distance d/2 first, then d/4, ..., 1 (its recursion's order), then * 1/sqrt(d).
RQ_FN void rq_tq_hadamard_f64(double* y, int d) {
    for (int h = d / 2; h >= 1; h /= 2)
        for (int i = 0; i < d; i++)
            if (!(i & h)) {
                const double a = y[i], b = y[i + h];
                y[i] = a + b;
                y[i + h] = a - b;
            }
    const double scale = 1.0 / sqrt((double)d);
    for (int i = 0; i < d; i++) y[i] = y[i] * scale;
}

// vllm_k3, vllm_k4: |k| in f32 (in index order), y = H (k / (|k| + 1e-8)) in f64, code = the
// number of f32 midpoints <= f32(y_i); the codes, then f16 |k|. `y` is the caller's d doubles.
RQ_FN void rq_vllm_key_quantize(const float* x, unsigned char* out, int d, int bits,
                                const float* mids, double* y) {
    const int code_bytes = (d * bits + 7) / 8;
    for (int i = 0; i < code_bytes + 2; i++) out[i] = 0;
    if (!rq_tq_row_finite(x, d)) {
        rq_write_u16(out + code_bytes, (unsigned short)RQ_F16_NAN);
        return;
    }
    float n32 = 0.0f;
    for (int i = 0; i < d; i++) {
        const float v = x[RQ_TQ_PAD(i)];
        n32 = n32 + v * v;
    }
    n32 = sqrtf(n32);
    const double n = (double)n32 + 1e-8;
    for (int i = 0; i < d; i++) y[i] = (double)x[RQ_TQ_PAD(i)] / n;
    rq_tq_hadamard_f64(y, d);
    // vLLM's f32 midpoints are the thresholds themselves.
    for (int i = 0; i < d; i++)
        rq_tq_put_code(out, i, bits, rq_tq_level(__double2float_rn(y[i]), mids, bits));
    rq_write_u16(out + code_bytes, rq_f32_to_f16(n32));
}

// The exact decode: c_i |k|16 / sqrt(sum c^2 + 1e-16) in f64, the transform, f32.
RQ_FN void rq_vllm_key_dequantize(const unsigned char* in, float* out, int d, int bits,
                                  const float* levels, double* y) {
    const int code_bytes = (d * bits + 7) / 8;
    const double norm = (double)rq_tq_f16_to_f32(in + code_bytes);
    double e = 0.0;
    for (int i = 0; i < d; i++) {
        const double c = (double)levels[rq_tq_code(in, i, bits)];
        y[i] = c;
        e = e + c * c;
    }
    const double unit = sqrt(e + 1e-16);
    for (int i = 0; i < d; i++) y[i] = norm * y[i] / unit;
    rq_tq_hadamard_f64(y, d);
    for (int i = 0; i < d; i++) out[RQ_TQ_PAD(i)] = __double2float_rn(y[i]);
}

// Values [first, first + n) for attention, in f32: value i = sum_j H_ij w_j, w = c |k| / |c|
// (a row whose norm is not finite: NaN).
RQ_FN void rq_vllm_key_values(const unsigned char* row, int first, int n, float* out, int d,
                              int bits, const float* levels) {
    const int code_bytes = (d * bits + 7) / 8;
    float e = 0.0f;
    for (int j = 0; j < d; j++) {
        const float c = levels[rq_tq_code(row, j, bits)];
        e = fmaf(c, c, e);
    }
    const float norm = rq_tq_f16_to_f32(row + code_bytes);
    // An infinite norm mixes +inf and -inf in the oracle's transform: NaN, as a NaN norm.
    const float a = rq_is_finite(norm) ? norm / (sqrtf(e + 1e-16f) * sqrtf((float)d))
                                       : rq_from_bits(0x7FC00000u);
    for (int t = 0; t < n; t++) {
        const int i = first + t;
        float acc = 0.0f;
        for (int j = 0; j < d; j++) {
            const float c = levels[rq_tq_code(row, j, bits)];
            acc += (__popc(i & j) & 1) ? -c : c;
        }
        out[t] = acc * a;
    }
}

#define RQ_VLLM_KEY_DEFINE(F)                                                                    \
    RQ_FN void rq_quantize_##F(const float* x, unsigned char* out) {                             \
        double y[RQ_BLOCK_SIZE_##F];                                                             \
        rq_vllm_key_quantize(x, out, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F, RQ_VK_MIDS_##F, y);      \
    }                                                                                            \
    RQ_FN void rq_dequantize_##F(const unsigned char* in, float* out) {                          \
        double y[RQ_BLOCK_SIZE_##F];                                                             \
        rq_vllm_key_dequantize(in, out, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F, RQ_VK_LEVELS_##F, y); \
    }                                                                                            \
    RQ_FN void rq_tq_values_##F(const unsigned char* row, int first, int n, float* out) {        \
        rq_vllm_key_values(row, first, n, out, RQ_BLOCK_SIZE_##F, RQ_TQ_BITS_##F,                \
                           RQ_VK_LEVELS_##F);                                                    \
    }

#endif
