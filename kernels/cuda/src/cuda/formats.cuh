// rotq KV-cache formats as device code: one block quantizer and dequantizer per format, plus the
// f16/bf16 conversions. Mirrors rotq-reference's `format` module (reference/src/format/) byte for
// byte: the same f32 operations in the same order (no fused multiply-add), ggml's x86-64
// `(int8_t)` truncations, the same poisoning of blocks that hold NaN/Inf.
//
// Must compile both with NVRTC (pasted into kernel sources; --fmad=false, -default-device, no
// headers: nothing is #included) and as plain host C++14 (g++/clang, for its test harness,
// which compiles it with -ffp-contract=off and no fast-math). Keep it free of library calls.
//
// Per format F (f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 iq4_nl q6_0 int4 fp8_e4m3):
//   RQ_BLOCK_SIZE_F, RQ_BLOCK_BYTES_F      values and bytes per block
//   rq_quantize_F(const float* x, unsigned char* out)    one block, byte-exact
//   rq_dequantize_F(const unsigned char* in, float* y)  one block, bit-exact
// Multi-byte fields are read and written byte by byte (little-endian): blocks may be unaligned.
//
// NaN payloads: the quantizers store exactly the oracle's bytes on any device. Where a finite
// block's arithmetic makes a NaN that gets stored (iq4_nl, q6_0 scales), x86's default NaN
// (0xFFC00000) is substituted, since that is what the oracle computes on x86-64. Dequantized
// NaNs carry the payloads of the machine they run on (GPUs make 0x7FFFFFFF): compare them as NaN.

#ifndef RQ_FORMATS_CUH
#define RQ_FORMATS_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define RQ_ON_DEVICE 1
#else
#define RQ_ON_DEVICE 0
#endif

#ifndef RQ_FN
#if RQ_ON_DEVICE
#define RQ_FN __device__ __forceinline__
#else
#define RQ_FN static inline
#endif
#endif

#define RQ_BLOCK_SIZE_f32 1
#define RQ_BLOCK_BYTES_f32 4
#define RQ_BLOCK_SIZE_f16 1
#define RQ_BLOCK_BYTES_f16 2
#define RQ_BLOCK_SIZE_bf16 1
#define RQ_BLOCK_BYTES_bf16 2
#define RQ_BLOCK_SIZE_q8_0 32
#define RQ_BLOCK_BYTES_q8_0 34
#define RQ_BLOCK_SIZE_q4_0 32
#define RQ_BLOCK_BYTES_q4_0 18
#define RQ_BLOCK_SIZE_q4_1 32
#define RQ_BLOCK_BYTES_q4_1 20
#define RQ_BLOCK_SIZE_q5_0 32
#define RQ_BLOCK_BYTES_q5_0 22
#define RQ_BLOCK_SIZE_q5_1 32
#define RQ_BLOCK_BYTES_q5_1 24
#define RQ_BLOCK_SIZE_iq4_nl 32
#define RQ_BLOCK_BYTES_iq4_nl 18
#define RQ_BLOCK_SIZE_q6_0 32
#define RQ_BLOCK_BYTES_q6_0 26
#define RQ_BLOCK_SIZE_int4 32
#define RQ_BLOCK_BYTES_int4 18
#define RQ_BLOCK_SIZE_fp8_e4m3 32
#define RQ_BLOCK_BYTES_fp8_e4m3 36

// ---------------------------------------------------------------------------------------------
// Bits, rounding, little-endian fields

RQ_FN unsigned int rq_as_bits(float x) {
#if RQ_ON_DEVICE
    return __float_as_uint(x);
#else
    unsigned int u;
    __builtin_memcpy(&u, &x, sizeof u);
    return u;
#endif
}

RQ_FN float rq_from_bits(unsigned int u) {
#if RQ_ON_DEVICE
    return __uint_as_float(u);
#else
    float x;
    __builtin_memcpy(&x, &u, sizeof x);
    return x;
#endif
}

RQ_FN bool rq_is_nan(float x) { return (rq_as_bits(x) & 0x7FFFFFFFu) > 0x7F800000u; }

RQ_FN bool rq_is_finite(float x) { return (rq_as_bits(x) & 0x7F800000u) != 0x7F800000u; }

// x86's default NaN, what an invalid operation (inf - inf, 0 * inf, inf / inf) makes there.
RQ_FN float rq_x86_nan_canon(float x) { return rq_is_nan(x) ? rq_from_bits(0xFFC00000u) : x; }

// Toward zero (C truncf).
RQ_FN float rq_truncf(float x) {
#if RQ_ON_DEVICE
    return truncf(x);
#else
    return __builtin_truncf(x);
#endif
}

// Half to even (Rust round_ties_even, rintf in the default rounding mode).
RQ_FN float rq_rintf(float x) {
#if RQ_ON_DEVICE
    return rintf(x);
#else
    return __builtin_rintf(x);
#endif
}

// Half away from zero (Rust f32::round, C roundf). x - trunc(x) is exact, so is t ± 1 wherever
// x has a fractional part (|x| < 2^23).
RQ_FN float rq_round_away(float x) {
    float t = rq_truncf(x);
    float f = x - t;
    if (f >= 0.5f) return t + 1.0f;
    if (f <= -0.5f) return t - 1.0f;
    return t;
}

// C's (int8_t)f as ggml's x86-64 builds compute it: cvttss2si to int32 (INT32_MIN, low byte 0,
// for NaN and out-of-range values), keep the low byte. Returned sign-extended in an int.
RQ_FN int rq_trunc_i8(float f) {
    if (rq_is_nan(f) || !(f >= -2147483648.0f && f < 2147483648.0f)) return 0;
    int b = ((int)f) & 0xFF;
    return b >= 128 ? b - 256 : b;
}

RQ_FN unsigned short rq_read_u16(const unsigned char* p) {
    return (unsigned short)(p[0] | (p[1] << 8));
}

RQ_FN void rq_write_u16(unsigned char* p, unsigned short v) {
    p[0] = (unsigned char)(v & 0xFF);
    p[1] = (unsigned char)(v >> 8);
}

RQ_FN unsigned int rq_read_u32(const unsigned char* p) {
    return (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16) |
           ((unsigned int)p[3] << 24);
}

RQ_FN void rq_write_u32(unsigned char* p, unsigned int v) {
    p[0] = (unsigned char)(v & 0xFF);
    p[1] = (unsigned char)((v >> 8) & 0xFF);
    p[2] = (unsigned char)((v >> 16) & 0xFF);
    p[3] = (unsigned char)(v >> 24);
}

// ---------------------------------------------------------------------------------------------
// f16 / bf16 conversions (the `half` crate 2.7's, whose software and F16C paths agree)

// f32 -> f16 bits, round to nearest even; overflow -> ±Inf; NaN -> quiet NaN keeping the top
// payload bits (sign | 0x7E00 | man >> 13); f32 subnormals -> ±0.
RQ_FN unsigned short rq_f32_to_f16(float value) {
    unsigned int x = rq_as_bits(value);
    unsigned int sign = x & 0x80000000u;
    unsigned int exp = x & 0x7F800000u;
    unsigned int man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        unsigned int nan_bit = man == 0 ? 0u : 0x0200u;
        return (unsigned short)((sign >> 16) | 0x7C00u | nan_bit | (man >> 13));
    }
    unsigned int half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) return (unsigned short)(half_sign | 0x7C00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (unsigned short)half_sign;
        unsigned int m = man | 0x00800000u;
        unsigned int half_man = m >> (14 - half_exp);
        unsigned int round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) half_man += 1;
        return (unsigned short)(half_sign | half_man);
    }
    unsigned int h = half_sign | ((unsigned int)half_exp << 10) | (man >> 13);
    unsigned int round_bit = 0x1000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) h += 1;
    return (unsigned short)h;
}

// f16 bits -> f32 (exact; NaN -> quiet NaN with the payload shifted up).
RQ_FN float rq_f16_to_f32(unsigned short h) {
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    unsigned int exp = (unsigned int)h & 0x7C00u;
    unsigned int man = (unsigned int)h & 0x03FFu;
    if (exp == 0x7C00u) {
        if (man == 0) return rq_from_bits(sign | 0x7F800000u);
        return rq_from_bits(sign | 0x7FC00000u | (man << 13));
    }
    if (exp == 0) {
        // ±0 or a subnormal: man * 2^-24, exact (a normal f32).
        float m = (float)man * 5.9604644775390625e-8f;
        return rq_from_bits(sign | rq_as_bits(m));
    }
    return rq_from_bits(sign | (((exp >> 10) + 112u) << 23) | (man << 13));
}

// f32 -> bf16 bits, round to nearest even; NaN -> (bits >> 16) | 0x0040.
RQ_FN unsigned short rq_f32_to_bf16(float value) {
    unsigned int x = rq_as_bits(value);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((x >> 16) | 0x0040u);
    unsigned int round_bit = 0x8000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0)
        return (unsigned short)((x >> 16) + 1u);
    return (unsigned short)(x >> 16);
}

// bf16 bits -> f32 (NaN gets its quiet bit set, as the `half` crate does).
RQ_FN float rq_bf16_to_f32(unsigned short b) {
    unsigned int i = b;
    if ((i & 0x7FFFu) > 0x7F80u) i |= 0x0040u;
    return rq_from_bits(i << 16);
}

// ---------------------------------------------------------------------------------------------
// Block helpers (ggml's scans; see reference/src/format/ggml.rs and scalar.rs)

#define RQ_QK 32
#define RQ_F16_NAN 0x7E00u

RQ_FN bool rq_block_finite(const float* x, int n) {
    bool ok = true;
    for (int i = 0; i < n; ++i) ok = ok && rq_is_finite(x[i]);
    return ok;
}

// A poisoned block: all bytes 0, then `scales` leading f16 NaN scales.
RQ_FN void rq_poison(unsigned char* out, int bytes, int scales) {
    for (int i = 0; i < bytes; ++i) out[i] = 0;
    for (int s = 0; s < scales; ++s) rq_write_u16(out + 2 * s, (unsigned short)RQ_F16_NAN);
}

// Largest |x| (0 for an all-zero block).
RQ_FN float rq_abs_max(const float* x, int n) {
    float m = 0.0f;
    for (int i = 0; i < n; ++i) {
        float a = rq_from_bits(rq_as_bits(x[i]) & 0x7FFFFFFFu);
        m = a > m ? a : m;
    }
    return m;
}

// The first element of largest |x|, with its sign.
RQ_FN float rq_signed_abs_max(const float* x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; ++i) {
        float a = rq_from_bits(rq_as_bits(x[i]) & 0x7FFFFFFFu);
        if (amax < a) {
            amax = a;
            max = x[i];
        }
    }
    return max;
}

// ggml's min/max scan starting from ±FLT_MAX.
RQ_FN void rq_min_max(const float* x, int n, float* mn, float* mx) {
    float lo = 3.40282346638528859812e+38f, hi = -3.40282346638528859812e+38f;
    for (int i = 0; i < n; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
    }
    *mn = lo;
    *mx = hi;
}

// d ? 1.0f/d : 0.0f
RQ_FN float rq_inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

// ---------------------------------------------------------------------------------------------
// f32, f16, bf16 (one value per block)

RQ_FN void rq_quantize_f32(const float* x, unsigned char* out) {
    rq_write_u32(out, rq_as_bits(x[0]));
}

RQ_FN void rq_dequantize_f32(const unsigned char* in, float* y) {
    y[0] = rq_from_bits(rq_read_u32(in));
}

RQ_FN void rq_quantize_f16(const float* x, unsigned char* out) {
    rq_write_u16(out, rq_f32_to_f16(x[0]));
}

RQ_FN void rq_dequantize_f16(const unsigned char* in, float* y) {
    y[0] = rq_f16_to_f32(rq_read_u16(in));
}

RQ_FN void rq_quantize_bf16(const float* x, unsigned char* out) {
    rq_write_u16(out, rq_f32_to_bf16(x[0]));
}

RQ_FN void rq_dequantize_bf16(const unsigned char* in, float* y) {
    y[0] = rq_bf16_to_f32(rq_read_u16(in));
}

// ---------------------------------------------------------------------------------------------
// q8_0: d f16, qs i8[32]; value qs[j] * d

RQ_FN void rq_quantize_q8_0(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        rq_poison(out, RQ_BLOCK_BYTES_q8_0, 1);
        return;
    }
    float amax = 0.0f;
    for (int j = 0; j < RQ_QK; ++j) {
        float a = rq_from_bits(rq_as_bits(x[j]) & 0x7FFFFFFFu);
        amax = amax > a ? amax : a;
    }
    float d = amax / 127.0f;
    float id = rq_inverse(d);
    rq_write_u16(out, rq_f32_to_f16(d));
    for (int j = 0; j < RQ_QK; ++j)
        out[2 + j] = (unsigned char)(rq_trunc_i8(rq_round_away(x[j] * id)) & 0xFF);
}

RQ_FN void rq_dequantize_q8_0(const unsigned char* in, float* y) {
    float d = rq_f16_to_f32(rq_read_u16(in));
    for (int j = 0; j < RQ_QK; ++j) {
        int q = in[2 + j];
        if (q >= 128) q -= 256;
        y[j] = (float)q * d;
    }
}

// ---------------------------------------------------------------------------------------------
// q4_0: d f16, qs u8[16] (value j low nibble of qs[j], value j+16 high nibble); (q - 8) * d

RQ_FN void rq_quantize_q4_0(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        rq_poison(out, RQ_BLOCK_BYTES_q4_0, 1);
        return;
    }
    float d = rq_signed_abs_max(x, RQ_QK) / -8.0f;
    float id = rq_inverse(d);
    rq_write_u16(out, rq_f32_to_f16(d));
    for (int j = 0; j < RQ_QK / 2; ++j) {
        int lo = rq_trunc_i8(x[j] * id + 8.5f);
        int hi = rq_trunc_i8(x[j + RQ_QK / 2] * id + 8.5f);
        lo = lo < 15 ? lo : 15;
        hi = hi < 15 ? hi : 15;
        out[2 + j] = (unsigned char)(((lo & 0xFF) | ((hi & 0xFF) << 4)) & 0xFF);
    }
}

RQ_FN void rq_dequantize_q4_0(const unsigned char* in, float* y) {
    float d = rq_f16_to_f32(rq_read_u16(in));
    for (int j = 0; j < RQ_QK / 2; ++j) {
        int q = in[2 + j];
        y[j] = (float)((q & 0x0F) - 8) * d;
        y[j + RQ_QK / 2] = (float)((q >> 4) - 8) * d;
    }
}

// ---------------------------------------------------------------------------------------------
// q4_1: d f16, m f16, qs u8[16] as q4_0; q * d + m

RQ_FN void rq_quantize_q4_1(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        rq_poison(out, RQ_BLOCK_BYTES_q4_1, 2);
        return;
    }
    float mn, mx;
    rq_min_max(x, RQ_QK, &mn, &mx);
    float d = (mx - mn) / 15.0f;
    float id = rq_inverse(d);
    rq_write_u16(out, rq_f32_to_f16(d));
    rq_write_u16(out + 2, rq_f32_to_f16(mn));
    for (int j = 0; j < RQ_QK / 2; ++j) {
        int lo = rq_trunc_i8((x[j] - mn) * id + 0.5f);
        int hi = rq_trunc_i8((x[j + RQ_QK / 2] - mn) * id + 0.5f);
        lo = lo < 15 ? lo : 15;
        hi = hi < 15 ? hi : 15;
        out[4 + j] = (unsigned char)(((lo & 0xFF) | ((hi & 0xFF) << 4)) & 0xFF);
    }
}

RQ_FN void rq_dequantize_q4_1(const unsigned char* in, float* y) {
    float d = rq_f16_to_f32(rq_read_u16(in));
    float m = rq_f16_to_f32(rq_read_u16(in + 2));
    for (int j = 0; j < RQ_QK / 2; ++j) {
        int q = in[4 + j];
        y[j] = (float)(q & 0x0F) * d + m;
        y[j + RQ_QK / 2] = (float)(q >> 4) * d + m;
    }
}

// ---------------------------------------------------------------------------------------------
// q5_0 / q5_1: 5-bit codes, low nibbles as q4_0 in qs[16], 5th bits in qh (u32, bit j = value j)

// codes[] hold the low byte of each code (the oracle's u8).
RQ_FN void rq_pack5(const unsigned char* codes, unsigned char* qh_qs) {
    unsigned int qh = 0;
    for (int j = 0; j < RQ_QK / 2; ++j) {
        unsigned int c0 = codes[j], c1 = codes[j + RQ_QK / 2];
        qh_qs[4 + j] = (unsigned char)(((c0 & 0x0F) | ((c1 & 0x0F) << 4)) & 0xFF);
        qh |= ((c0 & 0x10) >> 4) << j;
        qh |= ((c1 & 0x10) >> 4) << (j + RQ_QK / 2);
    }
    rq_write_u32(qh_qs, qh);
}

// Code of value j (0..31) from a qh + qs pair.
RQ_FN int rq_code5(const unsigned char* qh_qs, unsigned int qh, int j) {
    int q = qh_qs[4 + (j & 15)];
    int lo = j < 16 ? (q & 0x0F) : (q >> 4);
    return lo | (int)(((qh >> j) & 1u) << 4);
}

RQ_FN void rq_quantize_q5_0(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        rq_poison(out, RQ_BLOCK_BYTES_q5_0, 1);
        return;
    }
    float d = rq_signed_abs_max(x, RQ_QK) / -16.0f;
    float id = rq_inverse(d);
    rq_write_u16(out, rq_f32_to_f16(d));
    unsigned char codes[RQ_QK];
    for (int j = 0; j < RQ_QK; ++j) {
        int c = rq_trunc_i8(x[j] * id + 16.5f);
        c = c < 31 ? c : 31;
        codes[j] = (unsigned char)(c & 0xFF);
    }
    rq_pack5(codes, out + 2);
}

RQ_FN void rq_dequantize_q5_0(const unsigned char* in, float* y) {
    float d = rq_f16_to_f32(rq_read_u16(in));
    unsigned int qh = rq_read_u32(in + 2);
    for (int j = 0; j < RQ_QK; ++j) y[j] = (float)(rq_code5(in + 2, qh, j) - 16) * d;
}

RQ_FN void rq_quantize_q5_1(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        rq_poison(out, RQ_BLOCK_BYTES_q5_1, 2);
        return;
    }
    float mn, mx;
    rq_min_max(x, RQ_QK, &mn, &mx);
    float d = (mx - mn) / 31.0f;
    float id = rq_inverse(d);
    rq_write_u16(out, rq_f32_to_f16(d));
    rq_write_u16(out + 2, rq_f32_to_f16(mn));
    unsigned char codes[RQ_QK];
    // (uint8_t)(x0 + 0.5f): no clamp, as in ggml.
    for (int j = 0; j < RQ_QK; ++j)
        codes[j] = (unsigned char)(rq_trunc_i8((x[j] - mn) * id + 0.5f) & 0xFF);
    rq_pack5(codes, out + 4);
}

RQ_FN void rq_dequantize_q5_1(const unsigned char* in, float* y) {
    float d = rq_f16_to_f32(rq_read_u16(in));
    float m = rq_f16_to_f32(rq_read_u16(in + 2));
    unsigned int qh = rq_read_u32(in + 4);
    for (int j = 0; j < RQ_QK; ++j) y[j] = (float)rq_code5(in + 4, qh, j) * d + m;
}

// ---------------------------------------------------------------------------------------------
// iq4_nl: d f16, qs u8[16] as q4_0; value d * KVALUES[q] (ggml quantize_iq4_nl, no imatrix)

// kvalues_iq4nl = {-127,-104,-83,-65,-49,-35,-22,-10, 1,13,25,38,53,69,89,113}, as bytes packed
// little-endian into two 64-bit words (register-only lookup).
RQ_FN float rq_iq4nl_value(int i) {
    const unsigned long long lo = 0xF6EADDCFBFAD9881ull;
    const unsigned long long hi = 0x7159453526190D01ull;
    unsigned int b = (unsigned int)(((i < 8 ? lo : hi) >> (8 * (i & 7))) & 0xFFu);
    return (float)((int)(b ^ 0x80u) - 128);
}

// Index of the codebook value nearest x (ties up), as ggml's best_index_int8.
RQ_FN int rq_iq4nl_best_index(float x) {
    if (x <= -127.0f) return 0;
    if (x >= 113.0f) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (x < rq_iq4nl_value(mid))
            hi = mid;
        else
            lo = mid;
    }
    return x - rq_iq4nl_value(hi - 1) < rq_iq4nl_value(hi) - x ? hi - 1 : hi;
}

RQ_FN void rq_iq4nl_sums(const float* x, float id, float* sqx, float* sq2) {
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < RQ_QK; ++j) {
        float v = x[j];
        float q = rq_iq4nl_value(rq_iq4nl_best_index(id * v));
        float w = v * v;
        sumqx += w * q * v;
        sumq2 += w * q * q;
    }
    *sqx = sumqx;
    *sq2 = sumq2;
}

RQ_FN float rq_iq4nl_block_scale(const float* x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < RQ_QK; ++j) {
        float a = rq_from_bits(rq_as_bits(x[j]) & 0x7FFFFFFFu);
        if (a > amax) {
            amax = a;
            max = x[j];
        }
    }
    if (amax < 1e-15f) return 0.0f;
    const float v0 = -127.0f;
    float d = -max / v0;
    float sumqx, sumq2;
    rq_iq4nl_sums(x, 1.0f / d, &sumqx, &sumq2);
    d = sumq2 > 0.0f ? sumqx / sumq2 : 0.0f;
    float best = d * sumqx;
    for (int itry = -7; itry <= 7; ++itry) {
        float id = ((float)itry + v0) / max;
        rq_iq4nl_sums(x, id, &sumqx, &sumq2);
        if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

RQ_FN void rq_quantize_iq4_nl(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        rq_poison(out, RQ_BLOCK_BYTES_iq4_nl, 1);
        return;
    }
    float d = rq_x86_nan_canon(rq_iq4nl_block_scale(x));
    rq_write_u16(out, rq_f32_to_f16(d));
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < RQ_QK / 2; ++j) {
        int lo = rq_iq4nl_best_index(id * x[j]);
        int hi = rq_iq4nl_best_index(id * x[j + RQ_QK / 2]);
        out[2 + j] = (unsigned char)(lo | (hi << 4));
    }
}

RQ_FN void rq_dequantize_iq4_nl(const unsigned char* in, float* y) {
    float d = rq_f16_to_f32(rq_read_u16(in));
    for (int j = 0; j < RQ_QK / 2; ++j) {
        int q = in[2 + j];
        y[j] = d * rq_iq4nl_value(q & 0x0F);
        y[j + RQ_QK / 2] = d * rq_iq4nl_value(q >> 4);
    }
}

// ---------------------------------------------------------------------------------------------
// q6_0 (ik_llama.cpp): d f16, qh u8[8], qs u8[16]; (q - 32) * d. Low nibbles as q4_0 in qs;
// h = (q_j >> 4) | ((q_{j+16} >> 4) << 2) in qh[j % 8] at bit 4 * (j / 8). Stored scale refined
// to sum(w x q') / sum(w q'^2), w = (x/d)^2 (plain d when the denominator is not > 0).

RQ_FN void rq_quantize_q6_0(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        rq_poison(out, RQ_BLOCK_BYTES_q6_0, 1);
        return;
    }
    float d = rq_signed_abs_max(x, RQ_QK) / -32.0f;
    float id = rq_inverse(d);
    unsigned char* qh = out + 2;
    unsigned char* qs = out + 2 + RQ_QK / 4;
    for (int j = 0; j < RQ_QK / 4; ++j) qh[j] = 0;
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < RQ_QK / 2; ++j) {
        float x0 = x[j] * id, x1 = x[j + RQ_QK / 2] * id;
        float w0 = x0 * x0, w1 = x1 * x1;
        int t0 = rq_trunc_i8(x0 + 32.5f), t1 = rq_trunc_i8(x1 + 32.5f);
        unsigned int c0 = (unsigned int)((t0 < 63 ? t0 : 63) & 0xFF);
        unsigned int c1 = (unsigned int)((t1 < 63 ? t1 : 63) & 0xFF);
        qs[j] = (unsigned char)(((c0 & 0x0F) | ((c1 & 0x0F) << 4)) & 0xFF);
        unsigned int h = ((c0 >> 4) | ((c1 >> 4) << 2)) & 0xFF;
        qh[j % (RQ_QK / 4)] =
            (unsigned char)((qh[j % (RQ_QK / 4)] | (h << (4 * (j / (RQ_QK / 4))))) & 0xFF);
        float q0 = (float)c0 - 32.0f, q1 = (float)c1 - 32.0f;
        sumqx += w0 * x[j] * q0 + w1 * x[j + RQ_QK / 2] * q1;
        sumq2 += w0 * q0 * q0 + w1 * q1 * q1;
    }
    float stored = sumq2 > 0.0f ? sumqx / sumq2 : d;
    rq_write_u16(out, rq_f32_to_f16(rq_x86_nan_canon(stored)));
}

RQ_FN void rq_dequantize_q6_0(const unsigned char* in, float* y) {
    float d = rq_f16_to_f32(rq_read_u16(in));
    const unsigned char* qh = in + 2;
    const unsigned char* qs = in + 2 + RQ_QK / 4;
    for (int j = 0; j < RQ_QK / 2; ++j) {
        unsigned int h = ((unsigned int)qh[j % (RQ_QK / 4)] >> (4 * (j / (RQ_QK / 4)))) & 0xFF;
        unsigned int c0 = (qs[j] & 0x0Fu) | ((h << 4) & 0x30u);
        unsigned int c1 = (qs[j] >> 4) | ((h << 2) & 0x30u);
        y[j] = (float)((int)c0 - 32) * d;
        y[j + RQ_QK / 2] = (float)((int)c1 - 32) * d;
    }
}

// ---------------------------------------------------------------------------------------------
// int4 (rotq): s = amax/7 stored f16; codes round_half_even(x * (1/s)) clamped to [-7, 7],
// stored q + 8; byte 2 + i holds value 2i (low nibble) and 2i + 1 (high); (nibble - 8) * s

// Rust's `(r.round_ties_even().clamp(-7.0, 7.0) as i8 + 8) as u8`: NaN casts to 0.
RQ_FN unsigned int rq_int4_code(float r) {
    float c = rq_rintf(r);
    if (rq_is_nan(c)) return 8u;
    c = c < -7.0f ? -7.0f : (c > 7.0f ? 7.0f : c);
    return (unsigned int)((int)c + 8);
}

RQ_FN void rq_quantize_int4(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        rq_poison(out, RQ_BLOCK_BYTES_int4, 1);
        return;
    }
    float s = rq_abs_max(x, RQ_QK) / 7.0f;
    float id = rq_inverse(s);
    rq_write_u16(out, rq_f32_to_f16(s));
    for (int i = 0; i < RQ_QK / 2; ++i)
        out[2 + i] =
            (unsigned char)(rq_int4_code(x[2 * i] * id) | (rq_int4_code(x[2 * i + 1] * id) << 4));
}

RQ_FN void rq_dequantize_int4(const unsigned char* in, float* y) {
    float s = rq_f16_to_f32(rq_read_u16(in));
    for (int i = 0; i < RQ_QK / 2; ++i) {
        int q = in[2 + i];
        y[2 * i] = (float)((q & 0x0F) - 8) * s;
        y[2 * i + 1] = (float)((q >> 4) - 8) * s;
    }
}

// ---------------------------------------------------------------------------------------------
// fp8_e4m3 (rotq): s = amax/448 stored as f32 (4 bytes LE); code j = E4M3 nearest x/s (ties to
// even code, saturating at ±448, sign of x/s; 0 when s = 0); value e4m3(code) * s

// The E4M3 (e4m3fn) code nearest v. The oracle's f64 distances are exact, so this is plain
// round-to-nearest-even on the E4M3 grid: subnormals are multiples of 2^-9 below 2^-6, then 3
// mantissa bits per binade up to 448 (0x7E); larger magnitudes saturate, NaN -> 0x7F.
RQ_FN unsigned char rq_e4m3_encode(float v) {
    unsigned int bits = rq_as_bits(v);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7F;
    unsigned int sign = (bits >> 24) & 0x80u;
    unsigned int abits = bits & 0x7FFFFFFFu;
    float a = rq_from_bits(abits);
    unsigned int code;
    if (a >= 448.0f) {
        code = 0x7E;
    } else if (a < 0.015625f) {
        code = (unsigned int)(int)rq_rintf(a * 512.0f);  // 0..8, exact scaling
    } else {
        int e = (int)(abits >> 23) - 127;                           // -6..8
        float p = rq_from_bits((unsigned int)(3 - e + 127) << 23);  // 2^(3-e)
        int r = (int)rq_rintf(a * p);                               // 8..16, exact scaling
        code = (unsigned int)(((e + 7) << 3) + (r - 8));
    }
    return (unsigned char)(sign | code);
}

// The value of an E4M3 code (0x7F/0xFF: NaN, positive as the oracle's f32::NAN).
RQ_FN float rq_e4m3_decode(unsigned int c) {
    unsigned int a = c & 0x7Fu;
    if (a == 0x7Fu) return rq_from_bits(0x7FC00000u);
    unsigned int e = (a >> 3) & 0x0Fu, m = a & 0x07u;
    float mag = e == 0 ? (float)m * 0.001953125f : rq_from_bits(((e + 120u) << 23) | (m << 20));
    return (c & 0x80u) ? -mag : mag;
}

RQ_FN void rq_quantize_fp8_e4m3(const float* x, unsigned char* out) {
    if (!rq_block_finite(x, RQ_QK)) {
        for (int i = 0; i < RQ_BLOCK_BYTES_fp8_e4m3; ++i) out[i] = 0;
        rq_write_u32(out, 0x7FC00000u);
        return;
    }
    float s = rq_abs_max(x, RQ_QK) / 448.0f;
    rq_write_u32(out, rq_as_bits(s));
    for (int j = 0; j < RQ_QK; ++j) out[4 + j] = rq_e4m3_encode(s == 0.0f ? 0.0f : x[j] / s);
}

RQ_FN void rq_dequantize_fp8_e4m3(const unsigned char* in, float* y) {
    float s = rq_from_bits(rq_read_u32(in));
    for (int j = 0; j < RQ_QK; ++j) y[j] = rq_e4m3_decode(in[4 + j]) * s;
}

// ---------------------------------------------------------------------------------------------
// A block's f16 scale for the attention kernels: an aligned 2-byte read (block sizes are even)
// and, on the GPU, the hardware conversion (equal to rq_f16_to_f32 except for NaN payloads).

RQ_FN float rq_scale16(const unsigned char* p) {
    unsigned short h = *(const unsigned short*)p;
#ifdef __CUDACC__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return rq_f16_to_f32(h);
#endif
}

// ---------------------------------------------------------------------------------------------
// Symmetric formats as (scale, code): value j of a block equals scale * code (the same f32
// product the dequantizers above compute), with codes small enough to be exact in f16 and
// bf16 (integers up to 127 in magnitude, E4M3 values). Tensor-core kernels multiply codes
// and apply the scale afterwards (K) or fold it into the other operand (V).

// Nibble of value i (0..31) of a q4_0-style qs[16].
RQ_FN int rq_nibble(const unsigned char* qs, int i) {
    int q = qs[i & 15];
    return i < 16 ? (q & 0x0F) : (q >> 4);
}

RQ_FN float rq_scale_q8_0(const unsigned char* in) { return rq_scale16(in); }
RQ_FN float rq_code_q8_0(const unsigned char* in, int j) {
    int q = in[2 + j];
    return (float)(q >= 128 ? q - 256 : q);
}
RQ_FN float rq_scale_q4_0(const unsigned char* in) { return rq_scale16(in); }
RQ_FN float rq_code_q4_0(const unsigned char* in, int j) {
    return (float)(rq_nibble(in + 2, j) - 8);
}
RQ_FN float rq_scale_q5_0(const unsigned char* in) { return rq_scale16(in); }
RQ_FN float rq_code_q5_0(const unsigned char* in, int j) {
    return (float)(rq_code5(in + 2, rq_read_u32(in + 2), j) - 16);
}
RQ_FN float rq_scale_iq4_nl(const unsigned char* in) { return rq_scale16(in); }
RQ_FN float rq_code_iq4_nl(const unsigned char* in, int j) {
    return rq_iq4nl_value(rq_nibble(in + 2, j));
}
RQ_FN float rq_scale_q6_0(const unsigned char* in) { return rq_scale16(in); }
RQ_FN float rq_code_q6_0(const unsigned char* in, int j) {
    const unsigned char* qh = in + 2;
    const unsigned char* qs = in + 2 + RQ_QK / 4;
    int k = j & 15;
    unsigned int h = ((unsigned int)qh[k % (RQ_QK / 4)] >> (4 * (k / (RQ_QK / 4)))) & 0xFF;
    unsigned int c =
        j < 16 ? ((qs[k] & 0x0Fu) | ((h << 4) & 0x30u)) : ((qs[k] >> 4) | ((h << 2) & 0x30u));
    return (float)((int)c - 32);
}
RQ_FN float rq_scale_int4(const unsigned char* in) { return rq_scale16(in); }
RQ_FN float rq_code_int4(const unsigned char* in, int j) {
    int q = in[2 + j / 2];
    return (float)(((j & 1) ? (q >> 4) : (q & 0x0F)) - 8);
}
RQ_FN float rq_scale_fp8_e4m3(const unsigned char* in) {
    return rq_from_bits(*(const unsigned int*)in);
}
RQ_FN float rq_code_fp8_e4m3(const unsigned char* in, int j) { return rq_e4m3_decode(in[4 + j]); }
// f16 rows: `in` is a group of 32 values (blocks of one value), scale 1.
RQ_FN float rq_scale_f16(const unsigned char* in) {
    (void)in;
    return 1.0f;
}
RQ_FN float rq_code_f16(const unsigned char* in, int j) { return rq_scale16(in + 2 * j); }

// ---------------------------------------------------------------------------------------------
// Four values j .. j + 3 of a 32-value block (j a multiple of 4), each computed exactly as the
// whole-block dequantizers above compute it: for kernels whose threads each need a few values
// of a block (attention's weighted sum). Symmetric formats are code times scale; q4_1 and
// q5_1 add their minimum.

#define RQ_DEQUANTIZE4_SYMMETRIC(FMT)                                           \
    RQ_FN void rq_dequantize4_##FMT(const unsigned char* in, int j, float* y) { \
        float d = rq_scale_##FMT(in);                                           \
        for (int e = 0; e < 4; ++e) y[e] = rq_code_##FMT(in, j + e) * d;        \
    }

RQ_DEQUANTIZE4_SYMMETRIC(q8_0)
RQ_DEQUANTIZE4_SYMMETRIC(q4_0)
RQ_DEQUANTIZE4_SYMMETRIC(q5_0)
RQ_DEQUANTIZE4_SYMMETRIC(iq4_nl)
RQ_DEQUANTIZE4_SYMMETRIC(q6_0)
RQ_DEQUANTIZE4_SYMMETRIC(int4)
RQ_DEQUANTIZE4_SYMMETRIC(fp8_e4m3)

RQ_FN void rq_dequantize4_q4_1(const unsigned char* in, int j, float* y) {
    float d = rq_scale16(in);
    float m = rq_scale16(in + 2);
    for (int e = 0; e < 4; ++e) y[e] = (float)rq_nibble(in + 4, j + e) * d + m;
}

RQ_FN void rq_dequantize4_q5_1(const unsigned char* in, int j, float* y) {
    float d = rq_scale16(in);
    float m = rq_scale16(in + 2);
    unsigned int qh = rq_read_u32(in + 4);
    for (int e = 0; e < 4; ++e) y[e] = (float)rq_code5(in + 4, qh, j + e) * d + m;
}

#endif  // RQ_FORMATS_CUH
