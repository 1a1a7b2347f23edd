// Device-side decoding helpers for the GGUF weight types (ggml block layouts: kernels/cpu/quants_internal.h),
// shared by the matrix kernels of matmul.cu and matmul_lowbit.cuh. Not part of the public entry points.
#pragma once
#include <cstdint>

#ifndef MM_CUDA_HOST_EMULATION  // tests/test_host_cuda_loaders.cpp: host stand-ins instead
#include "kernels/cuda/common.cuh"
#endif

namespace moemesh::cuda::detail {

constexpr int kGemvUnroll = 4;  // units in flight per lane in the f32-activation GEMV

// This lane's units u = lane, lane + 32, … < n_units, in that order (so the sums keep their bits),
// U at a time: the W loads of all of them (load(u) → Raw) are issued before the first is
// used (use(u, raw)). A plain `#pragma unroll 4` loop left the 2 units per lane of a 2048-wide row
// to its remainder loop, one DRAM round trip after the other (the GEMVs: U = 4 units for one W
// row, fewer for several rows, whose loads are all in Raw: the same registers).
template <typename Raw, int U, typename Load, typename Use>
__device__ __forceinline__ void for_units(int64_t n_units, int lane, Load&& load, Use&& use) {
    for (int64_t u0 = lane; u0 < n_units; u0 += static_cast<int64_t>(kWarp) * U) {
        Raw raw[U];
#pragma unroll
        for (int i = 0; i < U; ++i) {
            const int64_t u = u0 + static_cast<int64_t>(i) * kWarp;
            if (u < n_units) raw[i] = load(u);
        }
#pragma unroll
        for (int i = 0; i < U; ++i) {
            const int64_t u = u0 + static_cast<int64_t>(i) * kWarp;
            if (u < n_units) use(u, raw[i]);
        }
    }
}

template <typename T>
__device__ __forceinline__ T ld(const uint8_t* p) {
    return __ldg(reinterpret_cast<const T*>(p));
}
// Four bytes from a 2-byte aligned address, as one little-endian word.
__device__ __forceinline__ uint32_t ld_u32_a2(const uint8_t* p) {
    return static_cast<uint32_t>(ld<uint16_t>(p)) | (static_cast<uint32_t>(ld<uint16_t>(p + 2)) << 16);
}
__device__ __forceinline__ uint32_t byte_of(uint32_t w, int i) { return (w >> (8 * i)) & 0xffu; }

// Byte i (0..11) of a Q4_K scales array held in three words.
__device__ __forceinline__ uint32_t scale_byte(uint32_t s0, uint32_t s1, uint32_t s2, int i) {
    const uint32_t w = i < 4 ? s0 : (i < 8 ? s1 : s2);
    return byte_of(w, i & 3);
}
// Scale and min of sub-block j (0..7) of a Q4_K super-block: quants::get_scale_min_k4 on the device.
__device__ __forceinline__ void scale_min_k4(int j, uint32_t s0, uint32_t s1, uint32_t s2, float* sc, float* m) {
    if (j < 4) {
        *sc = static_cast<float>(scale_byte(s0, s1, s2, j) & 63);
        *m = static_cast<float>(scale_byte(s0, s1, s2, j + 4) & 63);
    } else {
        *sc = static_cast<float>((scale_byte(s0, s1, s2, j + 4) & 0xF) | ((scale_byte(s0, s1, s2, j - 4) >> 6) << 4));
        *m = static_cast<float>((scale_byte(s0, s1, s2, j + 4) >> 4) | ((scale_byte(s0, s1, s2, j) >> 6) << 4));
    }
}

// A Q4_K / Q5_K super-block's header (d, dmin, the 12 scale bytes: one uint4) decoded for lane unit
// g's sub-blocks 2g (sc1, m1) and 2g + 1 (sc2, m2).
struct KSubScales {
    float d, dmin, sc1, m1, sc2, m2;
};
__device__ __forceinline__ KSubScales k_sub_scales(const uint4& hdr, int g) {
    KSubScales s;
    s.d = h2f(static_cast<uint16_t>(hdr.x & 0xffff));
    s.dmin = h2f(static_cast<uint16_t>(hdr.x >> 16));
    scale_min_k4(2 * g, hdr.y, hdr.z, hdr.w, &s.sc1, &s.m1);
    scale_min_k4(2 * g + 1, hdr.y, hdr.z, hdr.w, &s.sc2, &s.m2);
    return s;
}
// A Q5_K lane unit's 5-bit quants as bytes 0..31: the low (sub-block 2g) and high (2g + 1) nibbles
// of the quant words qv with their 5th bits, bits 2g and 2g + 1 of the qh words hv.
__device__ __forceinline__ void q5k_quants(const uint4& qv, const uint4& hv, int g, uint32_t (&lo)[4],
                                           uint32_t (&hi)[4]) {
    const uint32_t qw[4] = {qv.x, qv.y, qv.z, qv.w}, hw[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        lo[i] = (qw[i] & 0x0F0F0F0Fu) | (((hw[i] >> (2 * g)) & 0x01010101u) << 4);
        hi[i] = ((qw[i] >> 4) & 0x0F0F0F0Fu) | (((hw[i] >> (2 * g + 1)) & 0x01010101u) << 4);
    }
}

// Quants to floats without I2F (a quarter-rate instruction on Hopper, and what bounded the first
// version of these kernels): byte i of w is placed under the exponent of 2^23, which gives the float
// 2^23 + byte exactly (one PRMT); the caller subtracts 2^23 plus the type's offset (one FADD).
constexpr float kMagic = 8388608.0f;  // 2^23
__device__ __forceinline__ void bytes_biased(uint32_t w, float (&f)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __int_as_float(static_cast<int>(__byte_perm(w, 0x4B000000u, 0x7540u | i)));
}
// Σ_i (f_i − off) · a_i for the four biased bytes of w.
__device__ __forceinline__ float dot4(uint32_t w, float off, const float4& a) {
    float f[4];
    bytes_biased(w, f);
    return (f[0] - off) * a.x + (f[1] - off) * a.y + (f[2] - off) * a.z + (f[3] - off) * a.w;
}
__device__ __forceinline__ float sum4(const float4& a) { return (a.x + a.y) + (a.z + a.w); }

// Shared-memory view of the X rows of the int8-activation GEMV (matmul.cu gemv_q_kernel): per 32
// elements a scale d and int8 quants q (x ≈ d·q), plus d·Σq over each 16 elements (the K-quant min terms).
struct QX {
    const int8_t* q;   // [M][k]
    const float* d;    // [M][k/32]
    const float* s16;  // [M][k/16]
};

// One Q4_K / Q5_K lane unit (super-block b, sub-blocks 2g, 2g + 1, half h) of one W row against the M
// quantized X rows: lo / hi its quants as bytes (sub-block 2g / 2g + 1, 0..15 or 0..31), acc[r] +=
// d·(sc1·x̂d·Σ lo·x̂q + sc2·x̂d·Σ hi·x̂q) − dmin·(m1·x̂s + m2·x̂s) (the min terms on X's 16-sums).
template <int M>
__device__ __forceinline__ void dotq_k_unit(const KSubScales& ks, const uint32_t (&lo)[4], const uint32_t (&hi)[4],
                                            const QX& x, int64_t k, int b, int g, int h, float (&acc)[M]) {
    const int nb = static_cast<int>(k / 256) * 8, n16 = static_cast<int>(k / 256) * 16;
    const int e = 256 * b + 64 * g + 16 * h;
#pragma unroll
    for (int r = 0; r < M; ++r) {
        const int4 xl = *reinterpret_cast<const int4*>(x.q + r * k + e);
        const int4 xh = *reinterpret_cast<const int4*>(x.q + r * k + e + 32);
        const int xlv[4] = {xl.x, xl.y, xl.z, xl.w}, xhv[4] = {xh.x, xh.y, xh.z, xh.w};
        int s_lo = 0, s_hi = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s_lo = __dp4a(static_cast<int>(lo[i]), xlv[i], s_lo);
            s_hi = __dp4a(static_cast<int>(hi[i]), xhv[i], s_hi);
        }
        const float* xd = x.d + r * nb + 8 * b + 2 * g;
        const float* xs = x.s16 + r * n16 + 16 * b + 4 * g + h;
        acc[r] += ks.d * (ks.sc1 * xd[0] * static_cast<float>(s_lo) + ks.sc2 * xd[1] * static_cast<float>(s_hi)) -
                  ks.dmin * (ks.m1 * xs[0] + ks.m2 * xs[2]);
    }
}

#ifndef MM_CUDA_HOST_EMULATION
// Groups g < n (n <= N) of 32 X elements (lane i holds element i of each group in v[g]) quantized for
// the int8-X GEMVs, llama.cpp Q8_1-style: d[g] = amax / 127, q = round(x / d) stored at
// q[g · q_stride + lane]; h[g] = d · Σq over the lane's half of 16 (every lane of a half holds it).
// The groups' shuffles are interleaved (one dependent chain of 9 shuffles in all, not 9 per group).
// The K-quant min terms use these sums of the same rounded X as the scale terms, so the product is
// exactly Σ w · x̂ and the rounding errors stay weighted by the centred weights. (Exact sums of x,
// as in the first version, weight the errors by d·sc·q instead: Q4_K m=2 reached 2.2e-2 relative
// vs the exact product on the device.) Groups g >= n are computed but not stored (v[g] set by the caller).
template <int N>
__device__ __forceinline__ void quant_groups32(const float (&v)[N], int n, int lane, int8_t* q, int64_t q_stride,
                                               float (&d)[N], float (&h)[N]) {
    float amax[N];
#pragma unroll
    for (int g = 0; g < N; ++g) amax[g] = fabsf(v[g]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < N; ++g) amax[g] = fmaxf(amax[g], __shfl_xor_sync(0xffffffffu, amax[g], o));
#pragma unroll
    for (int g = 0; g < N; ++g) {
        d[g] = amax[g] / 127.0f;
        const float id = d[g] != 0.0f ? 1.0f / d[g] : 0.0f;
        const float qv = roundf(v[g] * id);
        if (g < n) q[g * q_stride + lane] = static_cast<int8_t>(qv);
        h[g] = d[g] * qv;
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < N; ++g) h[g] += __shfl_xor_sync(0xffffffffu, h[g], o);
}

// One quantized X row of n elements in device memory, the layout of cuda_ops.h qx_bytes: int8
// quants [n], per 32 the scale d [n/32] and d rounded to f16 [n/32], d·Σq per 16 [n/16]. The writers
// (the norms, attention's merge) store a group through it; readers take view(): QX with the f16
// scales for the types the CPU pairs with Q8_0 activations.
struct QxRow {
    int8_t* q;
    float *d, *d16, *s16;
    __device__ __forceinline__ QxRow(uint8_t* base, int64_t n)
        : q(reinterpret_cast<int8_t*>(base)),
          d(reinterpret_cast<float*>(base + n)),
          d16(d + n / 32),
          s16(d16 + n / 32) {}
    // Group gi's scale and half sums (quant_groups32's d and h; lane 0 stores the scales, lanes 0
    // and 16 their half's sum).
    __device__ __forceinline__ void store(int64_t gi, int lane, float dg, float h) const {
        if (lane == 0) d[gi] = dg, d16[gi] = round_f16(dg);
        if ((lane & 15) == 0) s16[2 * gi + lane / 16] = h;
    }
    __device__ __forceinline__ QX view(bool f16_scales) const { return QX{q, f16_scales ? d16 : d, s16}; }
};
#endif

}  // namespace moemesh::cuda::detail
