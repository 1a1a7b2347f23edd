// Device code of the CUDA matmul (kernels/cuda/matmul.cu) for the i-quants IQ2_XXS, IQ2_XS, IQ2_S,
// IQ3_XXS, IQ3_S, IQ1_S and IQ1_M: load8_iq<T>, elements e..e+7 (e % 8 == 0: one group of 8, which
// shares one grid entry or two, one set of signs and one 16-element scale) of a W row, dequantized
// with the operations of the CPU's dequantize_row_iq (kernels/cpu/quants_iq.cpp) in its order, each
// rounded on its own, so bit-identical to it (and to ggml). Like matmul_more.cuh's types, they have
// no int8-X GEMV yet (dot_by_load8 and the tiled kernel). Not yet run on a GPU.
//
// The grids are device copies of the host tables (the same iq_grids.inc), in global memory: a warp's
// lanes look up different entries, which constant memory would serialize. Only matmul.cu includes
// this header, so the __device__ tables are defined once.
#pragma once
#include <cstdint>

#include "common/ggml_types.h"
#include "kernels/cpu/quants_iq.h"
#ifndef MM_CUDA_HOST_EMULATION  // see matmul_more.cuh
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#endif
#include "kernels/cuda/quant_dev.cuh"

namespace moemesh::cuda::detail {

#define MM_IQ_QUAL __device__ const
#define MM_IQ_NAME(name) name##Dev
#include "kernels/cpu/iq_grids.inc"
#undef MM_IQ_NAME
#undef MM_IQ_QUAL

template <GgmlType T>
constexpr bool kLoad8Iq = T == GgmlType::IQ2_XXS || T == GgmlType::IQ2_XS || T == GgmlType::IQ2_S ||
                          T == GgmlType::IQ3_XXS || T == GgmlType::IQ3_S || T == GgmlType::IQ1_S ||
                          T == GgmlType::IQ1_M;

__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) { return static_cast<uint32_t>(ld<uint16_t>(p)); }

// Sub-block scale of IQ2_* (d·(0.5 + s)·0.25), IQ3_XXS (·0.5) and IQ3_S / IQ1_* (d·(2s + 1)).
__device__ __forceinline__ float iq2_scale(float d, uint32_t s) {
    return __fmul_rn(__fmul_rn(d, __fadd_rn(0.5f, static_cast<float>(s))), 0.25f);
}
__device__ __forceinline__ float iq3xxs_scale(float d, uint32_t s) {
    return __fmul_rn(__fmul_rn(d, __fadd_rn(0.5f, static_cast<float>(s))), 0.5f);
}
__device__ __forceinline__ float odd_scale(float d, uint32_t s) { return __fmul_rn(d, static_cast<float>(2 * s + 1)); }

// 8 grid magnitudes (bytes of lo, then hi) under 8 sign bits, times dl.
__device__ __forceinline__ void signed8(uint32_t lo, uint32_t hi, uint32_t signs, float dl, float (&v)[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float mag = static_cast<float>(byte_of(j < 4 ? lo : hi, j & 3));
        v[j] = __fmul_rn(dl, (signs >> j) & 1u ? -mag : mag);
    }
}
__device__ __forceinline__ void signed8(uint64_t g, uint32_t signs, float dl, float (&v)[8]) {
    signed8(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), signs, dl, v);
}

template <GgmlType T>
__device__ __forceinline__ void load8_iq(const uint8_t* row, int64_t e, float (&v)[8]) {
    const int wi = static_cast<int>(e % 256), ib = wi / 32, l = (wi % 32) / 8;  // sub-block, group
    if constexpr (T == GgmlType::IQ2_XXS) {
        // d, then per 32 elements two words: four grid indices; four 7-bit sign indices and the scale.
        const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockIQ2_XXS);
        const uint32_t a0 = ld_u32_a2(blk + 2 + 8 * ib), a1 = ld_u32_a2(blk + 6 + 8 * ib);
        const float dl = iq2_scale(h2f(ld<uint16_t>(blk)), a1 >> 28);
        signed8(__ldg(&kIq2xxsGridDev[(a0 >> (8 * l)) & 255]), __ldg(&kIqSignsDev[(a1 >> (7 * l)) & 127]), dl, v);
    } else if constexpr (T == GgmlType::IQ2_XS) {
        // d, qs[32] (9-bit grid index | 7-bit sign index << 9 per 8 elements), scales[8] (nibbles per 16).
        const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockIQ2_XS);
        const uint32_t w = ld_u16(blk + 2 + 2 * (4 * ib + l));
        const uint32_t sc = __ldg(blk + 66 + ib);
        const float dl = iq2_scale(h2f(ld<uint16_t>(blk)), l < 2 ? sc & 15 : sc >> 4);
        signed8(__ldg(&kIq2xsGridDev[w & 511]), __ldg(&kIqSignsDev[w >> 9]), dl, v);
    } else if constexpr (T == GgmlType::IQ2_S) {
        // d, qs[64] (32 low index bytes, then 32 sign bytes), qh[8] (index bits 8-9), scales[8].
        const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockIQ2_S);
        const uint32_t idx = __ldg(blk + 2 + 4 * ib + l) | ((static_cast<uint32_t>(__ldg(blk + 66 + ib)) << (8 - 2 * l)) & 0x300u);
        const uint32_t sc = __ldg(blk + 74 + ib);
        const float dl = iq2_scale(h2f(ld<uint16_t>(blk)), l < 2 ? sc & 15 : sc >> 4);
        signed8(__ldg(&kIq2sGridDev[idx]), __ldg(blk + 2 + 32 + 4 * ib + l), dl, v);
    } else if constexpr (T == GgmlType::IQ3_XXS) {
        // d, qs[96]: a grid index (4 elements) per byte for 64 bytes, then per 32 elements a word of
        // four 7-bit sign indices and the scale.
        const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockIQ3_XXS);
        const uint32_t aux = ld_u32_a2(blk + 2 + 64 + 4 * ib);
        const float dl = iq3xxs_scale(h2f(ld<uint16_t>(blk)), aux >> 28);
        const uint32_t g0 = __ldg(&kIq3xxsGridDev[__ldg(blk + 2 + 8 * ib + 2 * l)]);
        const uint32_t g1 = __ldg(&kIq3xxsGridDev[__ldg(blk + 2 + 8 * ib + 2 * l + 1)]);
        signed8(g0, g1, __ldg(&kIqSignsDev[(aux >> (7 * l)) & 127]), dl, v);
    } else if constexpr (T == GgmlType::IQ3_S) {
        // d, qs[64] (low 8 index bits per 4 elements), qh[8] (bit 8), signs[32], scales[4] (nibbles per 32).
        const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockIQ3_S);
        const uint32_t qh = __ldg(blk + 66 + ib);
        const uint32_t i0 = __ldg(blk + 2 + 8 * ib + 2 * l) | ((qh << (8 - 2 * l)) & 256u);
        const uint32_t i1 = __ldg(blk + 2 + 8 * ib + 2 * l + 1) | ((qh << (7 - 2 * l)) & 256u);
        const uint32_t sc = __ldg(blk + 106 + ib / 2);
        const float dl = odd_scale(h2f(ld<uint16_t>(blk)), ib % 2 ? sc >> 4 : sc & 15);
        signed8(__ldg(&kIq3sGridDev[i0]), __ldg(&kIq3sGridDev[i1]), __ldg(blk + 74 + 4 * ib + l), dl, v);
    } else if constexpr (T == GgmlType::IQ1_S || T == GgmlType::IQ1_M) {
        // Signed grid values in {-1, 0, 1} plus a ±1/8 shift per group: x = dl·(q ± 1/8).
        float dl;
        uint32_t idx;
        bool minus;
        if constexpr (T == GgmlType::IQ1_S) {
            // d, qs[32] (low 8 index bits), qh[8] as uint16: index bits 8-10 per group, scale in bits
            // 12-14, shift sign in bit 15.
            const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockIQ1_S);
            const uint32_t h = ld_u16(blk + 34 + 2 * ib);
            idx = __ldg(blk + 2 + 4 * ib + l) | (((h >> (3 * l)) & 7u) << 8);
            minus = (h & 0x8000u) != 0;
            dl = odd_scale(h2f(ld<uint16_t>(blk)), (h >> 12) & 7u);
        } else {
            // qs[32], qh[16] (a nibble per group: index bits 8-10, shift sign), scales as 4 uint16:
            // 3-bit scales per 16 elements in bits 0-11, the fp16 d's nibble k in bits 12-15 of word k.
            const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockIQ1_M);
            const uint32_t s0 = ld_u16(blk + 48), s1 = ld_u16(blk + 50), s2 = ld_u16(blk + 52), s3 = ld_u16(blk + 54);
            const auto d16 = static_cast<uint16_t>((s0 >> 12) | ((s1 >> 8) & 0x00f0u) | ((s2 >> 4) & 0x0f00u) | (s3 & 0xf000u));
            const uint32_t nib = static_cast<uint32_t>(__ldg(blk + 32 + 2 * ib + l / 2)) >> (4 * (l % 2));
            idx = __ldg(blk + 4 * ib + l) | ((nib & 7u) << 8);
            minus = (nib & 8u) != 0;
            const uint32_t sw = ib / 2 == 0 ? s0 : ib / 2 == 1 ? s1 : ib / 2 == 2 ? s2 : s3;
            const uint32_t word = sw >> (6 * (ib % 2));
            dl = odd_scale(h2f(d16), l < 2 ? word & 7u : (word >> 3) & 7u);
        }
        const uint64_t g = __ldg(&kIq1sGridDev[idx]);
        const float delta = minus ? -quants::kIq1Delta : quants::kIq1Delta;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const auto q = static_cast<int8_t>((g >> (8 * j)) & 0xffu);
            v[j] = __fmul_rn(dl, __fadd_rn(static_cast<float>(q), delta));
        }
    }
}

}  // namespace moemesh::cuda::detail
