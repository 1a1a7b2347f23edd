// The i-quant low-bit weight types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M):
// block layouts, dequantization and scalar row dot products against Q8_K activations.
// Internal to kernels/cpu (and its tests), as quants_internal.h.
//
// Every 256-element super-block stores, per group of 8 (IQ3: 4) elements, an index into a fixed
// lattice of magnitudes (kernels/cpu/iq_grids.h) plus 8 sign bits, and per 16 or 32 elements a small
// odd integer scale 2s+1 under one fp16 scale d. IQ1_* grids are signed {-1, 0, 1} with a ±1/8 shift
// per group instead of signs. Layouts are byte-for-byte ggml's (ggml-common.h); there is no
// quantizer for these types in moemesh (quantize_row refuses them).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/ggml_types.h"
#include "kernels/cpu/iq_grids.h"

namespace moemesh::quants {

struct BlockIQ2_XXS {
    uint16_t d;       // fp16 scale
    uint16_t qs[32];  // per 32 elements 4 words: bytes 0-3 grid indices (8 elements each); bits 0-27 of
                      // the second uint32 four 7-bit sign indices, bits 28-31 the scale s
};
struct BlockIQ2_XS {
    uint16_t d;         // fp16 scale
    uint16_t qs[32];    // per 8 elements: 9-bit grid index | 7-bit sign index << 9
    uint8_t scales[8];  // per 32 elements: low nibble s of the first 16, high nibble of the next 16
};
struct BlockIQ2_S {
    uint16_t d;         // fp16 scale
    uint8_t qs[64];     // bytes 0-31: low 8 bits of the 10-bit grid index per 8 elements; 32-63: 8 sign bits
    uint8_t qh[8];      // per 32 elements: bits 2l, 2l+1 are index bits 8-9 of its group l
    uint8_t scales[8];  // as IQ2_XS
};
struct BlockIQ3_XXS {
    uint16_t d;      // fp16 scale
    uint8_t qs[96];  // bytes 0-63: grid index per 4 elements; 64-95: per 32 elements an uint32 as
                     // IQ2_XXS's second word (four 7-bit sign indices, scale in bits 28-31)
};
struct BlockIQ3_S {
    uint16_t d;          // fp16 scale
    uint8_t qs[64];      // low 8 bits of the 9-bit grid index per 4 elements
    uint8_t qh[8];       // per 32 elements: bit k is index bit 8 of its group k
    uint8_t signs[32];   // one sign bit per element
    uint8_t scales[4];   // per 64 elements: low nibble s of the first 32, high nibble of the next 32
};
struct BlockIQ1_S {
    uint16_t d;       // fp16 scale
    uint8_t qs[32];   // low 8 bits of the 11-bit grid index per 8 elements
    uint16_t qh[8];   // per 32 elements: bits 3l..3l+2 index bits 8-10 of group l, 12-14 the scale s,
                      // bit 15 the sign of the shift (set: -1/8)
};
struct BlockIQ1_M {
    uint8_t qs[32];     // low 8 bits of the 11-bit grid index per 8 elements
    uint8_t qh[16];     // per 16 elements a byte: per group of 8 a nibble, bits 0-2 index bits 8-10,
                        // bit 3 the sign of the shift
    uint8_t scales[8];  // 4 little-endian uint16: 3-bit scales s per 16 elements in bits 0-11, the fp16
                        // super-block scale in bits 12-15 (its nibble k in word k)
};
static_assert(sizeof(BlockIQ2_XXS) == 66);
static_assert(sizeof(BlockIQ2_XS) == 74);
static_assert(sizeof(BlockIQ2_S) == 82);
static_assert(sizeof(BlockIQ3_XXS) == 98);
static_assert(sizeof(BlockIQ3_S) == 110);
static_assert(sizeof(BlockIQ1_S) == 50);
static_assert(sizeof(BlockIQ1_M) == 56);

// The IQ1 grids' shift: x = d·(2s+1)·(grid ± 1/8).
constexpr float kIq1Delta = 0.125f;

// True for the seven types above.
bool is_iq_lowbit(GgmlType t);

// Row of n elements (n % 256 == 0) of type t (is_iq_lowbit) → n floats, bit-identical to ggml's
// dequantize_row_<t>.
void dequantize_row_iq(GgmlType t, const void* src, float* dst, int64_t n);

// Stores the fp16 super-block scale d of one block of type t (IQ1_M: its 4 nibbles at the top of the
// 4 scale words, the others: the first 2 bytes).
void iq_set_block_scale(GgmlType t, void* block, uint16_t d);

// Mean of the squared element value over uniformly random block bytes with d = 1 (what the grid,
// sign and scale tables give): make-model --fast-weights picks d = σ / sqrt of it.
double iq_unit_mean_square(GgmlType t);

// sum_i w[i] * a[i], w a row of the weight type, a the same length in Q8_K (BlockQ8_K): integer
// sums per block, then scaled, in the order of ggml's ggml_vec_dot_<t>_q8_K_generic.
float vec_dot_iq2_xxs_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_iq2_xs_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_iq2_s_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_iq3_xxs_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_iq3_s_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_iq1_s_q8_K_scalar(int64_t n, const void* w, const void* a);
float vec_dot_iq1_m_q8_K_scalar(int64_t n, const void* w, const void* a);

}  // namespace moemesh::quants
