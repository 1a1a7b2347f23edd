// Device code of the matrix kernels (kernels/cuda/matmul.cu) for Q5_0, Q5_K, Q3_K and Q2_K: the
// f32-activation GEMV row dots (dot_*), the int8-activation __dp4a row dots (dotq_*) and the
// 8-element dequantizers of the tiled kernel and dequantize_rows (load8_*). Same lane-unit scheme as
// the other types in matmul.cu; block layouts as kernels/cpu/quants_internal.h, element order and
// arithmetic as the CPU dequantizers in kernels/cpu/quants.cpp (load8_* bit for bit).
//
// Block alignment decides the loads: Q5_K (176 B) rows are 16-byte aligned (uint4 loads, like
// Q4_K), Q2_K (84 B) 4-byte aligned, Q5_0 (22 B) and Q3_K (110 B) only 2-byte aligned (ld_u32_a2).
#pragma once
#include <cstdint>

#include "kernels/cpu/quants_internal.h"
#include "kernels/cuda/quant_dev.cuh"

namespace moemesh::cuda::detail {

// Bits 0..3 of h moved to bit 4 of bytes 0..3 (the 5th bit of four Q5_0 quants).
__device__ __forceinline__ uint32_t q5_high_bits(uint32_t h) {
    return ((h & 1u) << 4) | ((h & 2u) << 11) | ((h & 4u) << 18) | ((h & 8u) << 25);
}

// Scale j (0..15) of a Q3_K block, minus 32 (quants::q3k_unpack_scales on the device); s0..s2 are
// the 12 packed bytes as three little-endian words: low 4 bits in byte j (j < 8, low nibble) or
// j − 8 (high nibble), top 2 bits at bits 2·(j/4) of byte 8 + j%4.
__device__ __forceinline__ int q3k_scale(uint32_t s0, uint32_t s1, uint32_t s2, int j) {
    const uint32_t lo = j < 4 ? byte_of(s0, j) & 0xF
                        : j < 8 ? byte_of(s1, j - 4) & 0xF
                        : j < 12 ? byte_of(s0, j - 8) >> 4
                                 : byte_of(s1, j - 12) >> 4;
    const uint32_t hi = (byte_of(s2, j & 3) >> (2 * (j >> 2))) & 3;
    return static_cast<int>(lo | (hi << 4)) - 32;
}

// ---------------------------------------------------------------------------------------------
// f32-activation GEMV: add lane-partial sums of row · X[r] (r < M) into acc[r]; X rows k apart.

// Q5_0: 4 lanes per 22-byte block; lane j holds quant bytes 4j..4j+3 = elements 4j..4j+3 (low
// nibbles, 5th bits qh bits 4j..4j+3) and 16+4j..16+4j+3 (high nibbles, qh bits 16+4j..).
template <int M>
__device__ __forceinline__ void dot_q5_0(const uint8_t* row, int64_t k, const float* x, int lane, float (&acc)[M]) {
    constexpr float kOff = kMagic + 16.0f;
    struct Raw {
        uint16_t d;
        uint32_t qh, q;
    };
    for_units<Raw, kGemvUnroll>(
        (k / 32) * 4, lane,
        [&](int64_t u) {
            const uint8_t* blk = row + (u >> 2) * sizeof(quants::BlockQ5_0);
            return Raw{ld<uint16_t>(blk), ld_u32_a2(blk + 2), ld_u32_a2(blk + 6 + 4 * static_cast<int>(u & 3))};
        },
        [&](int64_t u, const Raw& raw) {
            const int64_t b = u >> 2;
            const int j = static_cast<int>(u & 3);
            const float d = h2f(raw.d);
            const uint32_t lo = (raw.q & 0x0F0F0F0Fu) | q5_high_bits(raw.qh >> (4 * j));
            const uint32_t hi = ((raw.q >> 4) & 0x0F0F0F0Fu) | q5_high_bits(raw.qh >> (16 + 4 * j));
            const int64_t e = b * 32 + 4 * j;
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float4 a = *reinterpret_cast<const float4*>(x + r * k + e);
                const float4 c = *reinterpret_cast<const float4*>(x + r * k + e + 16);
                acc[r] += d * (dot4(lo, kOff, a) + dot4(hi, kOff, c));
            }
        });
}

// Q5_K: as Q4_K, 8 lanes per 176-byte super-block, lane j = 2g + h: quant bytes qs[32g + 16h, +16)
// (elements 64g + 16h + t low nibbles, 64g + 32 + 16h + t high nibbles) and qh[16h, +16), whose
// bits 2g and 2g+1 are the 5th bits of those elements.
template <int M>
__device__ __forceinline__ void dot_q5_K(const uint8_t* row, int64_t k, const float* x, int lane, float (&acc)[M]) {
    struct Raw {
        uint4 hdr, hv, qv;
    };
    for_units<Raw, kGemvUnroll>(
        (k / 256) * 8, lane,
        [&](int64_t u) {
            const int j = static_cast<int>(u & 7), g = j >> 1, h = j & 1;
            const uint8_t* blk = row + (u >> 3) * sizeof(quants::BlockQ5_K);
            return Raw{ld<uint4>(blk), ld<uint4>(blk + 16 + 16 * h), ld<uint4>(blk + 48 + 32 * g + 16 * h)};
        },
        [&](int64_t u, const Raw& raw) {
            const int64_t b = u >> 3;
            const int j = static_cast<int>(u & 7), g = j >> 1, h = j & 1;
            const KSubScales ks = k_sub_scales(raw.hdr, g);
            uint32_t lo[4], hi[4];
            q5k_quants(raw.qv, raw.hv, g, lo, hi);
            const int64_t e = b * 256 + 64 * g + 16 * h;
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float* xr = x + r * k + e;
                float s_lo = 0.0f, s_hi = 0.0f, x_lo = 0.0f, x_hi = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float4 a = *reinterpret_cast<const float4*>(xr + 4 * i);
                    const float4 c = *reinterpret_cast<const float4*>(xr + 32 + 4 * i);
                    s_lo += dot4(lo[i], kMagic, a);
                    s_hi += dot4(hi[i], kMagic, c);
                    x_lo += sum4(a);
                    x_hi += sum4(c);
                }
                acc[r] += ks.d * (ks.sc1 * s_lo + ks.sc2 * s_hi) - ks.dmin * (ks.m1 * x_lo + ks.m2 * x_hi);
            }
        });
}

// Q3_K: 16 lanes per 110-byte super-block; lane (c, i) covers l = 4i..4i+3 of half c, i.e. the
// elements 128c + 32s + l for s = 0..3: 2 low bits at bits 2s of qs[32c + l], the high bit at bit
// 4c + s of hmask[l] (set: q, clear: q − 4), scale 8c + 2s + l/16.
template <int M>
__device__ __forceinline__ void dot_q3_K(const uint8_t* row, int64_t k, const float* x, int lane, float (&acc)[M]) {
    constexpr float kOff = kMagic + 4.0f;
    struct Raw {
        uint32_t hm, qs, s0, s1, s2;
        uint16_t d;
    };
    for_units<Raw, kGemvUnroll>(
        (k / 256) * 16, lane,
        [&](int64_t u) {
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7);
            const uint8_t* blk = row + (u >> 4) * sizeof(quants::BlockQ3_K);
            return Raw{ld_u32_a2(blk + l0),       ld_u32_a2(blk + 32 + 32 * c + l0), ld_u32_a2(blk + 96),
                       ld_u32_a2(blk + 100),      ld_u32_a2(blk + 104),              ld<uint16_t>(blk + 108)};
        },
        [&](int64_t u, const Raw& raw) {
            const int64_t b = u >> 4;
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7), half = l0 / 16;
            const float d = h2f(raw.d);
            uint32_t q[4];
            float sc[4];
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                q[s] = ((raw.qs >> (2 * s)) & 0x03030303u) | (((raw.hm >> (4 * c + s)) & 0x01010101u) << 2);
                sc[s] = static_cast<float>(q3k_scale(raw.s0, raw.s1, raw.s2, 8 * c + 2 * s + half));
            }
            const int64_t e = b * 256 + 128 * c + l0;
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float* xr = x + r * k + e;
                float sum = 0.0f;
#pragma unroll
                for (int s = 0; s < 4; ++s)
                    sum += sc[s] * dot4(q[s], kOff, *reinterpret_cast<const float4*>(xr + 32 * s));
                acc[r] += d * sum;
            }
        });
}

// Q2_K: 16 lanes per 84-byte super-block, lanes as Q3_K's: elements 128c + 32s + l at bits 2s of
// qs[32c + l]; scale byte 8c + 2s + l/16 (low nibble scale, high nibble min).
template <int M>
__device__ __forceinline__ void dot_q2_K(const uint8_t* row, int64_t k, const float* x, int lane, float (&acc)[M]) {
    struct Raw {
        uint32_t qs, sw0, sw1, dd;
    };
    for_units<Raw, kGemvUnroll>(
        (k / 256) * 16, lane,
        [&](int64_t u) {
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7);
            const uint8_t* blk = row + (u >> 4) * sizeof(quants::BlockQ2_K);
            return Raw{ld<uint32_t>(blk + 16 + 32 * c + l0), ld<uint32_t>(blk + 8 * c), ld<uint32_t>(blk + 8 * c + 4),
                       ld<uint32_t>(blk + 80)};
        },
        [&](int64_t u, const Raw& raw) {
            const int64_t b = u >> 4;
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7), half = l0 / 16;
            const float d = h2f(static_cast<uint16_t>(raw.dd & 0xffff));
            const float dmin = h2f(static_cast<uint16_t>(raw.dd >> 16));
            float sc[4], mn[4];
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int bi = 2 * s + half;
                const uint32_t sb = byte_of(bi < 4 ? raw.sw0 : raw.sw1, bi & 3);
                sc[s] = static_cast<float>(sb & 0xF);
                mn[s] = static_cast<float>(sb >> 4);
            }
            const int64_t e = b * 256 + 128 * c + l0;
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float* xr = x + r * k + e;
                float s_q = 0.0f, s_m = 0.0f;
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const float4 a = *reinterpret_cast<const float4*>(xr + 32 * s);
                    s_q += sc[s] * dot4((raw.qs >> (2 * s)) & 0x03030303u, kMagic, a);
                    s_m += mn[s] * sum4(a);
                }
                acc[r] += d * s_q - dmin * s_m;
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Int8-activation GEMV (see gemv_q_kernel in matmul.cu): R weight rows at once, accs[ri][r].

// Q5_0: lanes as dot_q5_0; quants − 16 as signed bytes. X scales rounded to f16 by the caller
// (the CPU pairs Q5_0 with Q8_0 activations).
template <int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_q5_0(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&accs)[R][M]) {
    const int nb = static_cast<int>(k / 32), n_units = nb * 4;
    struct Raw {
        uint16_t d[R];
        uint32_t qh[R], q[R];
    };
    for_units<Raw, U>(
        n_units, lane,
        [&](int64_t u) {
            const int b = static_cast<int>(u >> 2), j = static_cast<int>(u & 3);
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + static_cast<size_t>(b) * sizeof(quants::BlockQ5_0);
                raw.d[ri] = ld<uint16_t>(blk);
                raw.qh[ri] = ld_u32_a2(blk + 2);
                raw.q[ri] = ld_u32_a2(blk + 6 + 4 * j);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int b = static_cast<int>(u >> 2), j = static_cast<int>(u & 3);
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const float d = h2f(raw.d[ri]);
                const uint32_t qh = raw.qh[ri], q = raw.q[ri];
                const int lo = static_cast<int>(__vsub4((q & 0x0F0F0F0Fu) | q5_high_bits(qh >> (4 * j)), 0x10101010u));
                const int hi = static_cast<int>(
                    __vsub4(((q >> 4) & 0x0F0F0F0Fu) | q5_high_bits(qh >> (16 + 4 * j)), 0x10101010u));
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    const int8_t* xq = x.q + r * k + 32 * b + 4 * j;
                    const int x0 = *reinterpret_cast<const int*>(xq), x1 = *reinterpret_cast<const int*>(xq + 16);
                    accs[ri][r] += d * x.d[r * nb + b] * static_cast<float>(__dp4a(lo, x0, __dp4a(hi, x1, 0)));
                }
            }
        });
}

// Q5_K: lanes as dot_q5_K (and dotq_q4_K); 5-bit quants 0..31 as bytes.
template <int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_q5_K(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&accs)[R][M]) {
    const int n_units = static_cast<int>(k / 256) * 8;
    struct Raw {
        uint4 hdr[R], hv[R], qv[R];
    };
    for_units<Raw, U>(
        n_units, lane,
        [&](int64_t u) {
            const int b = static_cast<int>(u >> 3), j = static_cast<int>(u & 7), g = j >> 1, h = j & 1;
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + static_cast<size_t>(b) * sizeof(quants::BlockQ5_K);
                raw.hdr[ri] = ld<uint4>(blk);
                raw.hv[ri] = ld<uint4>(blk + 16 + 16 * h);
                raw.qv[ri] = ld<uint4>(blk + 48 + 32 * g + 16 * h);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int b = static_cast<int>(u >> 3), j = static_cast<int>(u & 7), g = j >> 1, h = j & 1;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                uint32_t lo[4], hi[4];
                q5k_quants(raw.qv[ri], raw.hv[ri], g, lo, hi);
                dotq_k_unit<M>(k_sub_scales(raw.hdr[ri], g), lo, hi, x, k, b, g, h, accs[ri]);
            }
        });
}

// Q3_K: lanes as dot_q3_K; quants − 4 as signed bytes, one X scale per 32 elements (s).
template <int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_q3_K(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&accs)[R][M]) {
    const int nsb = static_cast<int>(k / 256), n_units = nsb * 16, nb = nsb * 8;
    struct Raw {
        uint32_t hm[R], qs[R], s0[R], s1[R], s2[R];
        uint16_t d[R];
    };
    for_units<Raw, U>(
        n_units, lane,
        [&](int64_t u) {
            const int b = static_cast<int>(u >> 4);
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7);
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + static_cast<size_t>(b) * sizeof(quants::BlockQ3_K);
                raw.hm[ri] = ld_u32_a2(blk + l0);
                raw.qs[ri] = ld_u32_a2(blk + 32 + 32 * c + l0);
                raw.s0[ri] = ld_u32_a2(blk + 96), raw.s1[ri] = ld_u32_a2(blk + 100), raw.s2[ri] = ld_u32_a2(blk + 104);
                raw.d[ri] = ld<uint16_t>(blk + 108);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int b = static_cast<int>(u >> 4);
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7), half = l0 / 16;
            const int e = 256 * b + 128 * c + l0;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint32_t hm = raw.hm[ri], qs = raw.qs[ri];
                const float d = h2f(raw.d[ri]);
                int q[4];
                float sc[4];
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    q[s] = static_cast<int>(__vsub4(((qs >> (2 * s)) & 0x03030303u) |
                                                        (((hm >> (4 * c + s)) & 0x01010101u) << 2),
                                                    0x04040404u));
                    sc[s] = static_cast<float>(q3k_scale(raw.s0[ri], raw.s1[ri], raw.s2[ri], 8 * c + 2 * s + half));
                }
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    const int8_t* xq = x.q + r * k + e;
                    const float* xd = x.d + r * nb + 8 * b + 4 * c;
                    float sum = 0.0f;
#pragma unroll
                    for (int s = 0; s < 4; ++s)
                        sum += sc[s] * xd[s] *
                               static_cast<float>(__dp4a(q[s], *reinterpret_cast<const int*>(xq + 32 * s), 0));
                    accs[ri][r] += d * sum;
                }
            }
        });
}

// Q2_K: 4 lanes per super-block, lane (c, half) reads the 16 quant bytes qs[32c + 16·half, +16):
// for each s = 0..3 the 16 elements 128c + 32s + 16·half + t, one scale/min byte (8c + 2s + half),
// so the min term is one X 16-sum (x.s16) per s.
template <int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_q2_K(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&accs)[R][M]) {
    const int nsb = static_cast<int>(k / 256), n_units = nsb * 4, nb = nsb * 8, n16 = nsb * 16;
    struct Raw {
        uint32_t qw[R][4], sw0[R], sw1[R], dd[R];
    };
    for_units<Raw, U>(
        n_units, lane,
        [&](int64_t u) {
            const int b = static_cast<int>(u >> 2), c = static_cast<int>((u >> 1) & 1), half = static_cast<int>(u & 1);
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + static_cast<size_t>(b) * sizeof(quants::BlockQ2_K);
                const uint8_t* qp = blk + 16 + 32 * c + 16 * half;
#pragma unroll
                for (int i = 0; i < 4; ++i) raw.qw[ri][i] = ld<uint32_t>(qp + 4 * i);
                raw.sw0[ri] = ld<uint32_t>(blk + 8 * c), raw.sw1[ri] = ld<uint32_t>(blk + 8 * c + 4);
                raw.dd[ri] = ld<uint32_t>(blk + 80);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int b = static_cast<int>(u >> 2), c = static_cast<int>((u >> 1) & 1), half = static_cast<int>(u & 1);
            const int e = 256 * b + 128 * c + 16 * half;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint32_t* qw = raw.qw[ri];
                const uint32_t sw0 = raw.sw0[ri], sw1 = raw.sw1[ri], dd = raw.dd[ri];
                const float d = h2f(static_cast<uint16_t>(dd & 0xffff)), dmin = h2f(static_cast<uint16_t>(dd >> 16));
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    const float* xd = x.d + r * nb + 8 * b + 4 * c;
                    const float* xs = x.s16 + r * n16 + 16 * b + 8 * c + half;
                    float s_q = 0.0f, s_m = 0.0f;
#pragma unroll
                    for (int s = 0; s < 4; ++s) {
                        const int4 xv = *reinterpret_cast<const int4*>(x.q + r * k + e + 32 * s);
                        int isum = __dp4a(static_cast<int>((qw[0] >> (2 * s)) & 0x03030303u), xv.x, 0);
                        isum = __dp4a(static_cast<int>((qw[1] >> (2 * s)) & 0x03030303u), xv.y, isum);
                        isum = __dp4a(static_cast<int>((qw[2] >> (2 * s)) & 0x03030303u), xv.z, isum);
                        isum = __dp4a(static_cast<int>((qw[3] >> (2 * s)) & 0x03030303u), xv.w, isum);
                        const int bi = 2 * s + half;
                        const uint32_t sb = byte_of(bi < 4 ? sw0 : sw1, bi & 3);
                        s_q += static_cast<float>(sb & 0xF) * xd[s] * static_cast<float>(isum);
                        s_m += static_cast<float>(sb >> 4) * xs[2 * s];
                    }
                    accs[ri][r] += d * s_q - dmin * s_m;
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Elements e..e+7 (e % 8 == 0) of a row, dequantized with the CPU dequantizer's operations in its
// order, rounded one at a time (__fmul_rn / __fsub_rn: no FMA contraction), so bit-identical to
// dequantize_row (kernels/cpu/quants.cpp, itself bit-exact with ggml).

__device__ __forceinline__ void load8_q5_0(const uint8_t* row, int64_t e, float (&v)[8]) {
    const uint8_t* blk = row + (e / 32) * sizeof(quants::BlockQ5_0);
    const int j = static_cast<int>(e % 32), shift = j < 16 ? 0 : 4;
    const float d = h2f(ld<uint16_t>(blk));
    const uint32_t qh = ld_u32_a2(blk + 2);
    const uint32_t w0 = ld_u32_a2(blk + 6 + (j % 16)), w1 = ld_u32_a2(blk + 6 + (j % 16) + 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q0 = static_cast<int>(((byte_of(w0, i) >> shift) & 0xF) | (((qh >> (j + i)) & 1u) << 4));
        const int q1 = static_cast<int>(((byte_of(w1, i) >> shift) & 0xF) | (((qh >> (j + 4 + i)) & 1u) << 4));
        v[i] = __fmul_rn(static_cast<float>(q0 - 16), d);
        v[i + 4] = __fmul_rn(static_cast<float>(q1 - 16), d);
    }
}

__device__ __forceinline__ void load8_q5_K(const uint8_t* row, int64_t e, float (&v)[8]) {
    const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockQ5_K);
    const int wi = static_cast<int>(e % 256), g = wi / 64, r = wi % 64, l = r % 32;
    const int sub = 2 * g + (r >= 32 ? 1 : 0), shift = r >= 32 ? 4 : 0;
    const uint4 hdr = ld<uint4>(blk);
    const uint2 q = ld<uint2>(blk + 48 + 32 * g + l);
    const uint2 h = ld<uint2>(blk + 16 + l);
    float sc, m;
    scale_min_k4(sub, hdr.y, hdr.z, hdr.w, &sc, &m);
    const float d = __fmul_rn(h2f(static_cast<uint16_t>(hdr.x & 0xffff)), sc);
    const float mn = __fmul_rn(h2f(static_cast<uint16_t>(hdr.x >> 16)), m);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t q0 = ((byte_of(q.x, i) >> shift) & 0xF) + (((byte_of(h.x, i) >> sub) & 1u) << 4);
        const uint32_t q1 = ((byte_of(q.y, i) >> shift) & 0xF) + (((byte_of(h.y, i) >> sub) & 1u) << 4);
        v[i] = __fsub_rn(__fmul_rn(d, static_cast<float>(q0)), mn);
        v[i + 4] = __fsub_rn(__fmul_rn(d, static_cast<float>(q1)), mn);
    }
}

__device__ __forceinline__ void load8_q3_K(const uint8_t* row, int64_t e, float (&v)[8]) {
    const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockQ3_K);
    const int wi = static_cast<int>(e % 256), c = wi / 128, s = (wi % 128) / 32, l = wi % 32;
    const uint32_t h0 = ld_u32_a2(blk + l), h1 = ld_u32_a2(blk + l + 4);
    const uint32_t q0 = ld_u32_a2(blk + 32 + 32 * c + l), q1 = ld_u32_a2(blk + 32 + 32 * c + l + 4);
    const uint32_t s0 = ld_u32_a2(blk + 96), s1 = ld_u32_a2(blk + 100), s2 = ld_u32_a2(blk + 104);
    const float dl = __fmul_rn(h2f(ld<uint16_t>(blk + 108)),
                               static_cast<float>(q3k_scale(s0, s1, s2, 8 * c + 2 * s + l / 16)));
    const int hb = 4 * c + s;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int a = static_cast<int>((byte_of(q0, i) >> (2 * s)) & 3) - (((byte_of(h0, i) >> hb) & 1u) ? 0 : 4);
        const int b = static_cast<int>((byte_of(q1, i) >> (2 * s)) & 3) - (((byte_of(h1, i) >> hb) & 1u) ? 0 : 4);
        v[i] = __fmul_rn(dl, static_cast<float>(a));
        v[i + 4] = __fmul_rn(dl, static_cast<float>(b));
    }
}

__device__ __forceinline__ void load8_q2_K(const uint8_t* row, int64_t e, float (&v)[8]) {
    const uint8_t* blk = row + (e / 256) * sizeof(quants::BlockQ2_K);
    const int wi = static_cast<int>(e % 256), c = wi / 128, s = (wi % 128) / 32, l = wi % 32;
    const uint32_t q0 = ld<uint32_t>(blk + 16 + 32 * c + l), q1 = ld<uint32_t>(blk + 16 + 32 * c + l + 4);
    const uint32_t sb = __ldg(blk + 8 * c + 2 * s + l / 16);
    const uint32_t dd = ld<uint32_t>(blk + 80);
    const float dl = __fmul_rn(h2f(static_cast<uint16_t>(dd & 0xffff)), static_cast<float>(sb & 0xF));
    const float ml = __fmul_rn(h2f(static_cast<uint16_t>(dd >> 16)), static_cast<float>(sb >> 4));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[i] = __fsub_rn(__fmul_rn(dl, static_cast<float>((byte_of(q0, i) >> (2 * s)) & 3)), ml);
        v[i + 4] = __fsub_rn(__fmul_rn(dl, static_cast<float>((byte_of(q1, i) >> (2 * s)) & 3)), ml);
    }
}

}  // namespace moemesh::cuda::detail
