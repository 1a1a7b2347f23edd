// Block layouts of the weight types we compute with, activation quantizers and row dot products.
// Internal to kernels/cpu (and its tests); the public entry points are in kernels/ops.h.
//
// Layouts are byte-for-byte those of ggml (ggml-common.h), so GGUF tensors can be used in place.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <string_view>

#include "common/ggml_types.h"

namespace moemesh::quants {

struct BlockQ8_0 {
    uint16_t d;     // fp16 scale
    int8_t qs[32];  // x ≈ d * qs
};
struct BlockQ4_0 {
    uint16_t d;      // fp16 scale
    uint8_t qs[16];  // element j in low nibble of qs[j], element j+16 in high nibble; x ≈ d * (q - 8)
};
struct BlockQ4_K {
    uint16_t d;          // fp16 super-block scale for the 6-bit sub-block scales
    uint16_t dmin;       // fp16 super-block scale for the 6-bit sub-block mins
    uint8_t scales[12];  // 8 scales + 8 mins, 6 bits each (packing: see get_scale_min_k4)
    uint8_t qs[128];     // 4-bit quants; 64-element groups: low nibbles = first 32, high nibbles = next 32
};
struct BlockQ6_K {
    uint8_t ql[128];    // low 4 bits
    uint8_t qh[64];     // high 2 bits
    int8_t scales[16];  // 8-bit scale per 16 elements
    uint16_t d;         // fp16 super-block scale
};
struct BlockQ5_0 {
    uint16_t d;      // fp16 scale
    uint8_t qh[4];   // bit j of the little-endian uint32: 5th bit of element j
    uint8_t qs[16];  // low 4 bits: element j in low nibble of qs[j], element j+16 in high nibble; x ≈ d * (q - 16)
};
struct BlockQ5_K {
    uint16_t d;          // fp16 super-block scale for the 6-bit sub-block scales
    uint16_t dmin;       // fp16 super-block scale for the 6-bit sub-block mins
    uint8_t scales[12];  // 8 scales + 8 mins, 6 bits each, packed as Q4_K's
    uint8_t qh[32];      // 5th bits: bit 2g of qh[l] for element 64g + l, bit 2g+1 for element 64g + 32 + l
    uint8_t qs[128];     // low 4 bits, laid out as Q4_K's qs
};
struct BlockQ3_K {
    uint8_t hmask[32];   // high bit: bit b of hmask[l] for element 32b + l (set: q in 0..3, clear: q - 4)
    uint8_t qs[64];      // low 2 bits: element 128c + 32s + l at bits 2s of qs[32c + l]
    uint8_t scales[12];  // 16 6-bit scales (offset 32); packing: see q3k_unpack_scales
    uint16_t d;          // fp16 super-block scale
};
struct BlockQ2_K {
    uint8_t scales[16];  // per 16 elements: low nibble scale, high nibble min
    uint8_t qs[64];      // 2-bit quants, laid out as Q3_K's qs
    uint16_t d;          // fp16 super-block scale for the scales
    uint16_t dmin;       // fp16 super-block scale for the mins
};
struct BlockQ8_K {
    float d;            // fp32 scale
    int8_t qs[256];     // quants
    int16_t bsums[16];  // sum of qs in groups of 16
};
struct BlockQ4_1 {
    uint16_t d;      // fp16 scale
    uint16_t m;      // fp16 min
    uint8_t qs[16];  // element j in low nibble of qs[j], element j+16 in high nibble; x ≈ d * q + m
};
struct BlockQ5_1 {
    uint16_t d;      // fp16 scale
    uint16_t m;      // fp16 min
    uint8_t qh[4];   // bit j of the little-endian uint32: 5th bit of element j
    uint8_t qs[16];  // low 4 bits, laid out as Q4_1's; x ≈ d * q + m
};
struct BlockQ8_1 {  // activations paired with Q4_1 / Q5_1
    uint16_t d;     // fp16 scale
    uint16_t s;     // fp16 of d * Σ qs (d before its fp16 rounding)
    int8_t qs[32];
};
struct BlockIQ4_NL {
    uint16_t d;      // fp16 scale
    uint8_t qs[16];  // 4-bit indices into kIQ4NLValues, laid out as Q4_0's; x ≈ d * kIQ4NLValues[q]
};
struct BlockIQ4_XS {
    uint16_t d;          // fp16 super-block scale
    uint16_t scales_h;   // top 2 bits of the 8 6-bit sub-block scales (sub-block j at bits 2j)
    uint8_t scales_l[4]; // low 4 bits of the scales (sub-block j in nibble j % 2 of byte j / 2)
    uint8_t qs[128];     // per 32-element sub-block, 16 bytes laid out as IQ4_NL's;
                         // x ≈ d * (scale_j - 32) * kIQ4NLValues[q]
};
struct BlockMXFP4 {  // OCP microscaling FP4: 32 E2M1 values sharing one power-of-two scale
    uint8_t e;       // E8M0 exponent: the scale is 2^(e - 127)
    uint8_t qs[16];  // 4-bit E2M1 codes, laid out as Q4_0's; x ≈ 2^(e - 128) * kMXFP4Values[q]
};
// E2M1's values times 2 (ggml's kvalues_mxfp4; the scale is halved to match).
inline constexpr int8_t kMXFP4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// 2^(e - 128) (ggml's GGML_E8M0_TO_FP32_HALF), e = 0 and 1 as float subnormals.
inline float e8m0_to_fp32_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
// The 16 levels of IQ4_NL / IQ4_XS (ggml's kvalues_iq4nl), ascending.
inline constexpr int8_t kIQ4NLValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockIQ4_NL) == 18);
static_assert(sizeof(BlockIQ4_XS) == 136);
static_assert(sizeof(BlockMXFP4) == 17);
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ3_K) == 110);
static_assert(sizeof(BlockQ2_K) == 84);

// Round to nearest, ties to even, as ggml's nearest_int (valid for |f| <= 4194303).
inline int nearest_int(float f) {
    float v = f + 12582912.f;
    int32_t i;
    std::memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

// The element of largest magnitude (the first one on ties), and that magnitude in *amax.
inline float signed_absmax(const float* x, int n, float* amax) {
    float max = 0.0f;
    *amax = 0.0f;
    for (int j = 0; j < n; ++j) {
        const float ax = std::fabs(x[j]);
        if (ax > *amax) {
            *amax = ax;
            max = x[j];
        }
    }
    return max;
}

// Scale and min of sub-block j (0..7) of a Q4_K super-block.
inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

// The 16 signed 6-bit scales of a Q3_K block (already minus 32), as ggml's dequantize_row_q3_K
// unpacks them: bytes 0-7 hold the low nibbles (scales 0-7 low, 8-15 high), bytes 8-11 the top two
// bits (scale j at bits 2·(j/4) of byte 8 + j%4).
inline void q3k_unpack_scales(const uint8_t* packed, int8_t* out) {
    constexpr uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    uint32_t aux[4];
    std::memcpy(aux, packed, 12);
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    uint8_t u[16];
    std::memcpy(u, aux, 16);
    for (int j = 0; j < 16; ++j) out[j] = static_cast<int8_t>(u[j] - 32);
}

// ---- activation quantizers (what llama.cpp's x86 CPU backend does to X before a dot product) ----
// Q8_0 as ggml-cpu's AVX quantize_row_q8_0: d = amax/127, q = round-half-even(x * 127/amax).
// (The _ref weight quantizer instead uses 1/d and rounds half away from zero.)
void quantize_act_q8_0_scalar(const float* x, BlockQ8_0* y, int64_t n);
// Q8_K as ggml's quantize_row_q8_K_ref.
void quantize_act_q8_K_scalar(const float* x, BlockQ8_K* y, int64_t n);
void quantize_act_f16_scalar(const float* x, uint16_t* y, int64_t n);
// Q8_1 as ggml-cpu's AVX quantize_row_q8_1: Q8_0's quants, and s = d · Σ qs.
void quantize_act_q8_1_scalar(const float* x, BlockQ8_1* y, int64_t n);
void quantize_act_bf16_scalar(const float* x, uint16_t* y, int64_t n);

// ---- row dot products: sum_i w[i] * a[i] over n elements ----
// w: one row in the weight type, a: one row in the paired activation type.
using VecDotFn = float (*)(int64_t n, const void* w, const void* a);
using QuantizeActFn = void (*)(const float* x, void* a, int64_t n);
// The same dot product of one w row with 4 activation rows (a, a + a_stride, ...) into out[0..4),
// sharing the decoding of w; each out[r] is bit-identical to vec_dot(n, w, a + r * a_stride).
using VecDotX4Fn = void (*)(int64_t n, const void* w, const void* a, size_t a_stride, float* out);
// Prompt path of types whose decoding is dear (the i-quants' grid lookups, Q4_K's nibble split and
// scale shuffles): a W row is decoded once per matmul tile into dec (DecodeRowFn), then dotted with
// groups of 4 activation rows (VecDotX4Fn on dec instead of w); results bit-identical to vec_dot
// on the encoded row.
using DecodeRowFn = void (*)(int64_t n, const void* w, void* dec);
// 8 W rows (w, w + w_stride, ...) against NA activation rows (1 or 4; a, a + a_stride, ...) into
// out[t · 8 + r]; each output bit-identical to the type's vec_dot on that row pair.
using VecDotR8Fn = void (*)(int64_t n, const void* w, size_t w_stride, const void* a, size_t a_stride, float* out);
// Prompt path of the 8-row types (and of Q4_K, IQ4_XS on 512-bit CPUs): tile_rows W rows (w,
// w + w_stride, ...; 16 on 512-bit CPUs, 8 on 256-bit ones) decoded once per matmul tile into a
// transposed tile (DecodeTileFn; tile_bytes_per_block per block of all its rows), one int32 lane
// per W row, then dotted with NA activation rows (VecDotTileFn: 1 or 4) into
// out[t · tile_rows + r]; each output bit-identical to the type's vec_dot on that row pair.
using DecodeTileFn = void (*)(int64_t n, const void* w, size_t w_stride, void* tile);
using VecDotTileFn = void (*)(int64_t n, const void* tile, const void* a, size_t a_stride, float* out);

// Plain scalar references: integer sums per block, then scaled, as ggml's generic vec_dot_*.
float vec_dot_f32_scalar(int64_t n, const void* w, const void* a);
float vec_dot_f16_scalar(int64_t n, const void* w, const void* a);
float vec_dot_bf16_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q8_0_q8_0_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q4_0_q8_0_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q4_K_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q6_K_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q5_0_q8_0_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q5_K_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q3_K_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q2_K_q8_K_scalar(int64_t n, const void* w, const void* a);
// quants_q1_iq4.cpp
float vec_dot_q4_1_q8_1_scalar(int64_t n, const void* w, const void* a);
float vec_dot_q5_1_q8_1_scalar(int64_t n, const void* w, const void* a);
float vec_dot_iq4_nl_q8_0_scalar(int64_t n, const void* w, const void* a);
float vec_dot_iq4_xs_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_mxfp4_q8_0_scalar(int64_t n, const void* w, const void* a);

// x86 SIMD versions (quants_avx2*.cpp), one namespace per variant (quants_avx2_target.h): avx2
// (AVX2 + FMA + F16C; call only when cpu_has_avx2()), avxvnni and avx512vnni (the same functions
// with VNNI instructions; call only when cpu_supports() says so). type_kernels() picks among them.
namespace avx2 {
#include "kernels/cpu/quants_avx2_decl.inc"
// Attention for one (token, head) pair (attention_avx2.cpp): q[d] against n_kv cached keys/values
// (rows kv_stride elements apart, f16 or f32), scores[n_kv] and qbuf[d] scratch, out[d].
void attend_one(const float* q, const void* k, const void* v, bool kv_f16, int64_t n_kv, int64_t kv_stride,
                int64_t d, float scale, float* scores, float* qbuf, float* out);
}  // namespace avx2
namespace avxvnni {
#include "kernels/cpu/quants_avx2_decl.inc"
}  // namespace avxvnni
namespace avx512vnni {
#include "kernels/cpu/quants_avx2_decl.inc"
}  // namespace avx512vnni

// ---- reference quantizers / dequantizers of Q4_1, Q5_1, IQ4_NL, IQ4_XS, MXFP4 (quants_q1_iq4.cpp) ----
// Bit-identical to ggml's quantize_row_q4_1_ref / _q5_1_ref and, for the IQ4 types, to what
// llama-quantize writes without an importance matrix (quantize_iq4_nl / quantize_iq4_xs: a search
// over 15 scales per 32 elements). iq4_nl_search = false gives quantize_row_iq4_nl_ref's one-shot
// scale instead (tests only).
void quantize_q4_1_ref(const float* x, BlockQ4_1* y, int64_t n);
void quantize_q5_1_ref(const float* x, BlockQ5_1* y, int64_t n);
void quantize_iq4_nl(const float* x, BlockIQ4_NL* y, int64_t n, bool search = true);
void quantize_iq4_xs(const float* x, BlockIQ4_XS* y, int64_t n);
void quantize_mxfp4_ref(const float* x, BlockMXFP4* y, int64_t n);
void dequantize_mxfp4(const BlockMXFP4* x, float* y, int64_t n);
void dequantize_q4_1(const BlockQ4_1* x, float* y, int64_t n);
void dequantize_q5_1(const BlockQ5_1* x, float* y, int64_t n);
void dequantize_iq4_nl(const BlockIQ4_NL* x, float* y, int64_t n);
void dequantize_iq4_xs(const BlockIQ4_XS* x, float* y, int64_t n);

// The kernel sets: portable scalar code, and the x86 SIMD variants of quants_avx2_target.h.
enum class SimdLevel { kScalar, kAvx2, kAvxVnni, kAvx512Vnni };
const char* simd_level_name(SimdLevel level);  // "scalar", "avx2", "avxvnni", "avx512vnni"
bool parse_simd_level(std::string_view name, SimdLevel* level);
// Whether this CPU (and OS) can run the level's kernels (kScalar: always).
bool cpu_supports(SimdLevel level);
// The level type_kernels() and the other CPU kernels use, fixed at first call: the best the CPU
// supports; MOEMESH_CPU_ISA=scalar|avx2|avxvnni|avx512vnni picks another (one the CPU lacks, or
// an unknown name, gives a warning on stderr and the best); MOEMESH_NO_SIMD=1 means scalar.
SimdLevel simd_level();
// simd_level() is not scalar: AVX2, FMA and F16C may be used.
bool cpu_has_avx2();

// Everything the matmul needs for one weight type.
struct TypeKernels {
    GgmlType weight_type;
    GgmlType act_type;           // activation type X is converted to
    int64_t block;               // k must be a multiple of this
    QuantizeActFn quantize_act;  // nullptr: F32, X used as is
    VecDotFn vec_dot;
    VecDotX4Fn vec_dot_x4 = nullptr;  // optional; used when several X rows share a W row
    // Optional decoded-row prompt path (see DecodeRowFn); all three set or none.
    DecodeRowFn decode_row = nullptr;
    size_t dec_bytes_per_block = 0;        // decoded bytes per `block` elements
    VecDotX4Fn vec_dot_dec_x4 = nullptr;  // reads a decoded row
    // Optional 8-row kernels (see VecDotR8Fn): 1 and 4 activation rows; both set or none.
    VecDotR8Fn vec_dot_r8 = nullptr;
    VecDotR8Fn vec_dot_r8x4 = nullptr;
    // Optional 16-row kernels (VecDotR8Fn's contract with 16 rows, out[t · 16 + r]); both set or none.
    VecDotR8Fn vec_dot_r16 = nullptr;
    VecDotR8Fn vec_dot_r16x4 = nullptr;
    // Optional transposed tiles (see DecodeTileFn); all five set or none.
    DecodeTileFn decode_tile = nullptr;
    int64_t tile_rows = 0;
    size_t tile_bytes_per_block = 0;
    VecDotTileFn vec_dot_tile = nullptr;
    VecDotTileFn vec_dot_tile_x4 = nullptr;
};

// Kernels for weight type t at simd_level() (simd=false: the scalar references); nullptr if t is
// not computable.
const TypeKernels* type_kernels(GgmlType t, bool simd = true);
// The same at a given level (tests; the caller checks cpu_supports(level) before calling them).
const TypeKernels* type_kernels(GgmlType t, SimdLevel level);

}  // namespace moemesh::quants
