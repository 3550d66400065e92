// rotq CUDA: the element type `elem_t` of rows read or written by a kernel, chosen by the
// define ELEM (0 f32, 1 f16, 2 bf16), and its conversions to and from f32. Included after
// formats.cuh.

#if ELEM == 0
typedef float elem_t;
RQ_FN float elem_to_f32(elem_t v) { return v; }
RQ_FN elem_t f32_to_elem(float v) { return v; }
#elif ELEM == 1
// Rows use the hardware conversions (round to nearest even; only NaN payloads can differ from
// formats.cuh's bit-exact ones, which the f16 cache format keeps using).
typedef unsigned short elem_t;
RQ_FN float elem_to_f32(elem_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
RQ_FN elem_t f32_to_elem(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#else
typedef unsigned short elem_t;
RQ_FN float elem_to_f32(elem_t v) { return rq_bf16_to_f32(v); }
RQ_FN elem_t f32_to_elem(float v) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#endif
