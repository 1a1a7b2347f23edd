// Device code of the CUDA matmul (kernels/cuda/matmul.cu) for Q4_1, Q5_1, IQ4_NL, IQ4_XS and MXFP4:
// load8_more<T>, elements e..e+7 (e % 8 == 0) of a W row dequantized with the CPU dequantizer's
// operations in its order, each rounded on its own (__fmul_rn / __fadd_rn: no FMA contraction), so
// bit-identical to dequantize_row (kernels/cpu/quants_q1_iq4.cpp, itself bit-exact with ggml).
// These types have no int8-X GEMV yet: their decode GEMV (dot_by_load8 in matmul.cu) and the tiled
// prompt kernel both dequantize through load8_more. Not yet run on a GPU.
//
// Alignment: Q4_1 (20 B) and Q5_1 (24 B) blocks are 4-byte aligned, IQ4_NL (18 B) 2-byte aligned,
// IQ4_XS (136 B) 8-byte aligned; MXFP4 (17 B) is not aligned at all and is read byte by byte.
#pragma once
#include <cstdint>

#include "common/ggml_types.h"
#include "kernels/cpu/quants_internal.h"
// MM_CUDA_HOST_EMULATION: tests/test_host_cuda_loaders.cpp compiles the loaders below for the host
// with its own definitions of the few device helpers they use, to check them on machines without a GPU.
#ifndef MM_CUDA_HOST_EMULATION
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#endif
#include "kernels/cuda/quant_dev.cuh"

namespace moemesh::cuda::detail {

// Level l of IQ4_NL / IQ4_XS (quants::kIQ4NLValues) and of MXFP4 (quants::kMXFP4Values, doubled E2M1).
__device__ __forceinline__ float iq4_level(uint32_t l) {
    constexpr int8_t kLevels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    return static_cast<float>(kLevels[l & 15]);
}
__device__ __forceinline__ float mxfp4_level(uint32_t l) {
    constexpr int8_t kLevels[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    return static_cast<float>(kLevels[l & 15]);
}
// 2^(e - 128): quants::e8m0_to_fp32_half.
__device__ __forceinline__ float e8m0_half(uint32_t e) {
    return __uint_as_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
}

template <GgmlType T>
constexpr bool kLoad8More = T == GgmlType::Q4_1 || T == GgmlType::Q5_1 || T == GgmlType::IQ4_NL ||
                            T == GgmlType::IQ4_XS || T == GgmlType::MXFP4;

template <GgmlType T>
__device__ __forceinline__ void load8_more(const uint8_t* row, int64_t e, float (&v)[8]) {
    if constexpr (T == GgmlType::Q4_1) {
        // d, m, qs[16]: element j < 16 in the low nibble of qs[j], j >= 16 in the high one; x = q·d + m.
        const uint8_t* blk = row + (e / 32) * sizeof(quants::BlockQ4_1);
        const int j = static_cast<int>(e % 32), shift = j < 16 ? 0 : 4;
        const float d = h2f(ld<uint16_t>(blk)), m = h2f(ld<uint16_t>(blk + 2));
        const uint32_t w0 = ld_u32_a2(blk + 4 + (j % 16)), w1 = ld_u32_a2(blk + 4 + (j % 16) + 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = __fadd_rn(__fmul_rn(static_cast<float>((byte_of(w0, i) >> shift) & 0xF), d), m);
            v[i + 4] = __fadd_rn(__fmul_rn(static_cast<float>((byte_of(w1, i) >> shift) & 0xF), d), m);
        }
    } else if constexpr (T == GgmlType::Q5_1) {
        // d, m, qh (bit j: 5th bit of element j), qs as Q4_1's; x = q·d + m.
        const uint8_t* blk = row + (e / 32) * sizeof(quants::BlockQ5_1);
        const int j = static_cast<int>(e % 32), shift = j < 16 ? 0 : 4;
        const float d = h2f(ld<uint16_t>(blk)), m = h2f(ld<uint16_t>(blk + 2));
        const uint32_t qh = ld_u32_a2(blk + 4);
        const uint32_t w0 = ld_u32_a2(blk + 8 + (j % 16)), w1 = ld_u32_a2(blk + 8 + (j % 16) + 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t q0 = ((byte_of(w0, i) >> shift) & 0xF) | (((qh >> (j + i)) & 1u) << 4);
            const uint32_t q1 = ((byte_of(w1, i) >> shift) & 0xF) | (((qh >> (j + 4 + i)) & 1u) << 4);
            v[i] = __fadd_rn(__fmul_rn(static_cast<float>(q0), d), m);
            v[i + 4] = __fadd_rn(__fmul_rn(static_cast<float>(q1), d), m);
        }
    } else if constexpr (T == GgmlType::IQ4_NL) {
        // d, qs as Q4_0's; x = d·level[q].
        const uint8_t* blk = row + (e / 32) * sizeof(quants::BlockIQ4_NL);
        const int j = static_cast<int>(e % 32), shift = j < 16 ? 0 : 4;
        const float d = h2f(ld<uint16_t>(blk));
        const uint32_t w0 = ld_u32_a2(blk + 2 + (j % 16)), w1 = ld_u32_a2(blk + 2 + (j % 16) + 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = __fmul_rn(d, iq4_level(byte_of(w0, i) >> shift));
            v[i + 4] = __fmul_rn(d, iq4_level(byte_of(w1, i) >> shift));
        }
    } else if constexpr (T == GgmlType::IQ4_XS) {
        // d, scales_h (2 bits per sub-block), scales_l (a nibble per sub-block), 16 qs bytes per
        // 32-element sub-block as IQ4_NL's; x = (d·(scale - 32))·level[q].
        const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockIQ4_XS);
        const int wi = static_cast<int>(e % 256), s = wi / 32, l = wi % 32, shift = l < 16 ? 0 : 4;
        const uint32_t hdr0 = ld_u32_a2(blk), hdr1 = ld_u32_a2(blk + 4);  // d | scales_h, scales_l[4]
        const uint32_t scale = ((byte_of(hdr1, s / 2) >> (4 * (s % 2))) & 0xF) | (((hdr0 >> (16 + 2 * s)) & 3u) << 4);
        const float dl = __fmul_rn(h2f(static_cast<uint16_t>(hdr0 & 0xffffu)), static_cast<float>(static_cast<int>(scale) - 32));
        const uint2 q = ld<uint2>(blk + 8 + 16 * s + (l % 16));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = __fmul_rn(dl, iq4_level(byte_of(q.x, i) >> shift));
            v[i + 4] = __fmul_rn(dl, iq4_level(byte_of(q.y, i) >> shift));
        }
    } else if constexpr (T == GgmlType::MXFP4) {
        // e (E8M0), qs as Q4_0's holding E2M1 codes; x = level[q]·2^(e - 128) (levels doubled).
        const uint8_t* blk = row + (e / 32) * sizeof(quants::BlockMXFP4);
        const int j = static_cast<int>(e % 32), shift = j < 16 ? 0 : 4;
        const float d = e8m0_half(__ldg(blk));
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(mxfp4_level(__ldg(blk + 1 + (j % 16) + i) >> shift), d);
    }
}

}  // namespace moemesh::cuda::detail
