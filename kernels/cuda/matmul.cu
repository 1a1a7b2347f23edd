// Y = X · Wᵀ for GGUF weight types: a GEMV for decode and short prompts (m <= kMatmulGemvMaxM, in
// launches of up to kGemvMaxM rows) and a tiled kernel for longer prompts.
//
// GEMV, quantized types (Q8_0, Q4_0, Q5_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; by default for m >= 2 or
// >= 16384 rows, e.g. lm_head; all sizes with MOEMESH_CUDA_GEMV=new): X quantized to int8 per block,
// __dp4a dot products; see "Int8-activation GEMV" and gemv_mode() below. Otherwise the f32 GEMV.
// The device code of Q5_0, Q5_K, Q3_K and Q2_K is in matmul_lowbit.cuh, shared helpers in quant_dev.cuh.
// Q4_1, Q5_1, IQ4_NL, IQ4_XS and MXFP4 (matmul_more.cuh) have only the dequantizing loader so far:
// their GEMV is dot_by_load8 (8 dequantized elements per lane unit), their prompt path the tiled kernel.
// So have the i-quants IQ2_XXS … IQ1_M (matmul_iq.cuh).
//
// f32 GEMV: one warp per W row. The row is cut into "units" of a few contiguous bytes, and consecutive
// lanes take consecutive units, so each warp-wide load instruction reads one contiguous span of the
// row (the blocks of Q8_0, Q4_0, Q5_0, Q3_K and Q6_K are only 2-byte aligned, which rules out wide
// loads for them; Q4_K, Q5_K, F16, BF16 and F32 use 16-byte loads, Q2_K 4-byte loads). Each lane dequantizes its unit in registers and
// keeps one partial sum per X row; one warp reduction at the end. X (f32) is read from global memory
// and stays in L1/L2: it is tiny next to W.
//
// Tiled: 64 X rows × 64 W rows per block, k in steps of 32; each step dequantizes the 64×32 W tile
// into shared memory (8 elements per thread) and does 4×4 outer products per thread in f32.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/matmul_lowbit.cuh"
#include "kernels/cuda/matmul_iq.cuh"
#include "kernels/cuda/norm_dev.cuh"
#include "kernels/cuda/topk_dev.cuh"
#include "kernels/cuda/matmul_more.cuh"
#include "kernels/cuda/quant_dev.cuh"
#include "kernels/cuda/rope_dev.cuh"

namespace moemesh::cuda {

namespace {

using namespace detail;
using quants::BlockQ4_0;
using quants::BlockQ4_K;
using quants::BlockQ6_K;
using quants::BlockQ8_0;

constexpr int kGemvWarps = 4;   // W rows per block
constexpr int kGemvMaxM = 8;    // X rows per GEMV launch

// ---------------------------------------------------------------------------------------------
// GEMV row dot products. Each adds lane-partial sums of row · X[r] for r < M into acc[r].
// x: M rows of k floats, k apart.

// A hint: the 128-byte line at p into L2 (nothing to emulate).
__device__ __forceinline__ void prefetch_l2(const uint8_t* p) {
#ifndef MM_CUDA_EMULATION
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

template <int M>
__device__ __forceinline__ void dot_f32(const uint8_t* row, int64_t k, const float* x, int lane, float (&acc)[M]) {
    struct Raw {
        float4 w0, w1;
    };
    for_units<Raw, kGemvUnroll>(
        k / 8, lane, [&](int64_t u) { return Raw{ld<float4>(row + u * 32), ld<float4>(row + u * 32 + 16)}; },
        [&](int64_t u, const Raw& w) {
            const float4 w0 = w.w0, w1 = w.w1;
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float4 a = *reinterpret_cast<const float4*>(x + r * k + u * 8);
                const float4 b = *reinterpret_cast<const float4*>(x + r * k + u * 8 + 4);
                acc[r] += w0.x * a.x + w0.y * a.y + w0.z * a.z + w0.w * a.w + w1.x * b.x + w1.y * b.y + w1.z * b.z +
                          w1.w * b.w;
            }
        });
}

template <bool kBf16, int M>
__device__ __forceinline__ void dot_half(const uint8_t* row, int64_t k, const float* x, int lane, float (&acc)[M]) {
    for_units<uint4, kGemvUnroll>(
        k / 8, lane, [&](int64_t u) { return ld<uint4>(row + u * 16); },
        [&](int64_t u, const uint4& wv) {
            const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
            float w[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const auto lo = static_cast<uint16_t>(words[i] & 0xffffu), hi = static_cast<uint16_t>(words[i] >> 16);
                w[2 * i] = kBf16 ? bf2f(lo) : h2f(lo);
                w[2 * i + 1] = kBf16 ? bf2f(hi) : h2f(hi);
            }
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float4 a = *reinterpret_cast<const float4*>(x + r * k + u * 8);
                const float4 b = *reinterpret_cast<const float4*>(x + r * k + u * 8 + 4);
                acc[r] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z +
                          w[7] * b.w;
            }
        });
}

// Q8_0: 4 lanes per 34-byte block, 8 quants each (four 2-byte loads: the block is 2-byte aligned).
// Signed bytes are flipped to unsigned (x ^ 0x80 = x + 128) before the float trick.
template <int R, int M>
__device__ __forceinline__ void dot_q8_0(const uint8_t* const (&rows)[R], int64_t k, const float* x, int lane,
                                         float (&acc)[R][M]) {
    constexpr float kOff = kMagic + 128.0f;
    struct Raw {
        uint16_t d[R];
        uint32_t w0[R], w1[R];
    };
    for_units<Raw, kGemvUnroll / R>(
        (k / 32) * 4, lane,
        [&](int64_t u) {
            const size_t off = static_cast<size_t>(u >> 2) * sizeof(BlockQ8_0);
            const int j = static_cast<int>(u & 3);
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + off;
                raw.d[ri] = ld<uint16_t>(blk);
                raw.w0[ri] = ld_u32_a2(blk + 2 + 8 * j);
                raw.w1[ri] = ld_u32_a2(blk + 6 + 8 * j);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int64_t e = (u >> 2) * 32 + 8 * static_cast<int>(u & 3);
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float4 a = *reinterpret_cast<const float4*>(x + r * k + e);
                const float4 c = *reinterpret_cast<const float4*>(x + r * k + e + 4);
#pragma unroll
                for (int ri = 0; ri < R; ++ri) {
                    const float d = h2f(raw.d[ri]);
                    const uint32_t w0 = raw.w0[ri] ^ 0x80808080u, w1 = raw.w1[ri] ^ 0x80808080u;
                    acc[ri][r] += d * (dot4(w0, kOff, a) + dot4(w1, kOff, c));
                }
            }
        });
}

// Q4_0: 4 lanes per 18-byte block; lane j holds quant bytes 4j..4j+3 = elements 4j..4j+3 (low
// nibbles) and 16+4j..16+4j+3 (high nibbles).
template <int R, int M>
__device__ __forceinline__ void dot_q4_0(const uint8_t* const (&rows)[R], int64_t k, const float* x, int lane,
                                         float (&acc)[R][M]) {
    constexpr float kOff = kMagic + 8.0f;
    struct Raw {
        uint16_t d[R];
        uint32_t q[R];
    };
    for_units<Raw, kGemvUnroll / R>(
        (k / 32) * 4, lane,
        [&](int64_t u) {
            const size_t off = static_cast<size_t>(u >> 2) * sizeof(BlockQ4_0);
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                raw.d[ri] = ld<uint16_t>(rows[ri] + off);
                raw.q[ri] = ld_u32_a2(rows[ri] + off + 2 + 4 * static_cast<int>(u & 3));
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int64_t e = (u >> 2) * 32 + 4 * static_cast<int>(u & 3);
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float4 a = *reinterpret_cast<const float4*>(x + r * k + e);
                const float4 c = *reinterpret_cast<const float4*>(x + r * k + e + 16);
#pragma unroll
                for (int ri = 0; ri < R; ++ri) {
                    const float d = h2f(raw.d[ri]);
                    const uint32_t lo = raw.q[ri] & 0x0F0F0F0Fu, hi = (raw.q[ri] >> 4) & 0x0F0F0F0Fu;
                    acc[ri][r] += d * (dot4(lo, kOff, a) + dot4(hi, kOff, c));
                }
            }
        });
}

// Q4_K: 8 lanes per 144-byte super-block; lane j = 2g + h reads the 16 quant bytes
// qs[32g + 16h, +16): low nibbles are elements 64g + 16h + t (sub-block 2g), high nibbles
// 64g + 32 + 16h + t (sub-block 2g+1). The 16-byte header (d, dmin, scales) is one broadcast load.
template <int R, int M>
__device__ __forceinline__ void dot_q4_K(const uint8_t* const (&rows)[R], int64_t k, const float* x, int lane,
                                         float (&acc)[R][M]) {
    struct Raw {
        uint4 hdr[R], qv[R];
    };
    for_units<Raw, kGemvUnroll / R>(
        (k / 256) * 8, lane,
        [&](int64_t u) {
            const size_t off = static_cast<size_t>(u >> 3) * sizeof(BlockQ4_K);
            const int qo = 16 + 16 * static_cast<int>(u & 7);  // 32g + 16h
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                raw.hdr[ri] = ld<uint4>(rows[ri] + off);
                raw.qv[ri] = ld<uint4>(rows[ri] + off + qo);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int64_t b = u >> 3;
            const int j = static_cast<int>(u & 7), g = j >> 1, h = j & 1;
            const int64_t e = b * 256 + 64 * g + 16 * h;
            KSubScales ks[R];
#pragma unroll
            for (int ri = 0; ri < R; ++ri) ks[ri] = k_sub_scales(raw.hdr[ri], g);
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float* xr = x + r * k + e;
                float4 a[4], c[4];
                float x_lo = 0.0f, x_hi = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    a[i] = *reinterpret_cast<const float4*>(xr + 4 * i);
                    c[i] = *reinterpret_cast<const float4*>(xr + 32 + 4 * i);
                    x_lo += sum4(a[i]);
                    x_hi += sum4(c[i]);
                }
#pragma unroll
                for (int ri = 0; ri < R; ++ri) {
                    const uint4 qv = raw.qv[ri];
                    const uint32_t qw[4] = {qv.x, qv.y, qv.z, qv.w};
                    float s_lo = 0.0f, s_hi = 0.0f;
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        s_lo += dot4(qw[i] & 0x0F0F0F0Fu, kMagic, a[i]);
                        s_hi += dot4((qw[i] >> 4) & 0x0F0F0F0Fu, kMagic, c[i]);
                    }
                    const KSubScales& q = ks[ri];
                    acc[ri][r] += q.d * (q.sc1 * s_lo + q.sc2 * s_hi) - q.dmin * (q.m1 * x_lo + q.m2 * x_hi);
                }
            }
        });
}

// Q6_K: 16 lanes per 210-byte super-block; lane (c, i) covers l = 4i..4i+3 of half c, i.e. the
// elements 128c + l + {0, 32, 64, 96} (as dequantize_q6_K in kernels/cpu/quants.cpp). The 6-bit
// quants are assembled four at a time with word operations.
template <int R, int M>
__device__ __forceinline__ void dot_q6_K(const uint8_t* const (&rows)[R], int64_t k, const float* x, int lane,
                                         float (&acc)[R][M]) {
    constexpr float kOff = kMagic + 32.0f;
    struct Raw {
        uint32_t ql0[R], ql1[R], qh[R];
        uint16_t d[R];
        int8_t s[R][4];
    };
    for_units<Raw, kGemvUnroll / R>(
        (k / 256) * 16, lane,
        [&](int64_t u) {
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7), is = l0 / 16;
            const size_t off = static_cast<size_t>(u >> 4) * sizeof(BlockQ6_K);
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + off;
                const uint8_t* sc = blk + 192 + 8 * c + is;
                raw.ql0[ri] = ld_u32_a2(blk + 64 * c + l0);
                raw.ql1[ri] = ld_u32_a2(blk + 64 * c + 32 + l0);
                raw.qh[ri] = ld_u32_a2(blk + 128 + 32 * c + l0);
                raw.d[ri] = ld<uint16_t>(blk + 208);
#pragma unroll
                for (int i = 0; i < 4; ++i) raw.s[ri][i] = static_cast<int8_t>(__ldg(sc + 2 * i));
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int64_t b = u >> 4;
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7);
            const int64_t e = b * 256 + 128 * c + l0;
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float* xr = x + r * k + e;
                const float4 a0 = *reinterpret_cast<const float4*>(xr);
                const float4 a1 = *reinterpret_cast<const float4*>(xr + 32);
                const float4 a2 = *reinterpret_cast<const float4*>(xr + 64);
                const float4 a3 = *reinterpret_cast<const float4*>(xr + 96);
#pragma unroll
                for (int ri = 0; ri < R; ++ri) {
                    const uint32_t ql0 = raw.ql0[ri], ql1 = raw.ql1[ri], qh = raw.qh[ri];
                    const float s0 = static_cast<float>(raw.s[ri][0]), s1 = static_cast<float>(raw.s[ri][1]);
                    const float s2 = static_cast<float>(raw.s[ri][2]), s3 = static_cast<float>(raw.s[ri][3]);
                    const float d = h2f(raw.d[ri]);
                    const uint32_t q0 = (ql0 & 0x0F0F0F0Fu) | ((qh << 4) & 0x30303030u);
                    const uint32_t q1 = (ql1 & 0x0F0F0F0Fu) | ((qh << 2) & 0x30303030u);
                    const uint32_t q2 = ((ql0 >> 4) & 0x0F0F0F0Fu) | (qh & 0x30303030u);
                    const uint32_t q3 = ((ql1 >> 4) & 0x0F0F0F0Fu) | ((qh >> 2) & 0x30303030u);
                    acc[ri][r] += d * (s0 * dot4(q0, kOff, a0) + s1 * dot4(q1, kOff, a1) + s2 * dot4(q2, kOff, a2) +
                                       s3 * dot4(q3, kOff, a3));
                }
            }
        });
}

// The types with only a dequantizing loader (matmul_more.cuh, matmul_iq.cuh): lane unit u is
// elements 8u..8u+7.
template <GgmlType T, int M>
__device__ __forceinline__ void dot_by_load8(const uint8_t* row, int64_t k, const float* x, int lane, float (&acc)[M]) {
    struct Raw {
        float w[8];
    };
    for_units<Raw, kGemvUnroll>(
        k / 8, lane,
        [&](int64_t u) {  // (the loaders' loads and dequantization: the W values in flight together)
            Raw raw;
            if constexpr (kLoad8Iq<T>) load8_iq<T>(row, u * 8, raw.w);
            else load8_more<T>(row, u * 8, raw.w);
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const float* w = raw.w;
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float4 a = *reinterpret_cast<const float4*>(x + r * k + u * 8);
                const float4 b = *reinterpret_cast<const float4*>(x + r * k + u * 8 + 4);
                acc[r] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
                          w[6] * b.z + w[7] * b.w;
            }
        });
}

// The dot products of R W rows with the same M X rows: acc[ri][r] += rows[ri] · X[r]. Q8_0, Q4_0,
// Q4_K and Q6_K load each X element once for all R rows (what bounds this GEMV is L1 traffic of
// X: Q4_K reads 8 bytes of X per weight byte); the others take the rows one by one. Each row's
// sums have the same bits for every R (same per-lane order, same expressions).
template <GgmlType T, int R, int M>
__device__ __forceinline__ void dot_rows(const uint8_t* const (&rows)[R], int64_t k, const float* x, int lane,
                                         float (&acc)[R][M]) {
    if constexpr (T == GgmlType::Q8_0) dot_q8_0<R, M>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q4_0) dot_q4_0<R, M>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q4_K) dot_q4_K<R, M>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q6_K) dot_q6_K<R, M>(rows, k, x, lane, acc);
    else {
#pragma unroll
        for (int ri = 0; ri < R; ++ri) {
            const uint8_t* row = rows[ri];
            if constexpr (T == GgmlType::F32) dot_f32<M>(row, k, x, lane, acc[ri]);
            else if constexpr (T == GgmlType::F16) dot_half<false, M>(row, k, x, lane, acc[ri]);
            else if constexpr (T == GgmlType::BF16) dot_half<true, M>(row, k, x, lane, acc[ri]);
            else if constexpr (T == GgmlType::Q5_0) dot_q5_0<M>(row, k, x, lane, acc[ri]);
            else if constexpr (T == GgmlType::Q5_K) dot_q5_K<M>(row, k, x, lane, acc[ri]);
            else if constexpr (T == GgmlType::Q3_K) dot_q3_K<M>(row, k, x, lane, acc[ri]);
            else if constexpr (T == GgmlType::Q2_K) dot_q2_K<M>(row, k, x, lane, acc[ri]);
            else if constexpr (kLoad8More<T> || kLoad8Iq<T>) dot_by_load8<T, M>(row, k, x, lane, acc[ri]);
        }
    }
}

// W rows per warp of the f32-X GEMV: two for one X row where dot_rows loads each X element once for
// both (their W loads in flight together), one for several X rows (which reuse each W element
// already) and for the other types (two rows one after the other only halve the warps: the f32
// router went from 5.0 to 8.0 µs under ncu).
template <GgmlType T>
constexpr bool kRowsShareX = T == GgmlType::Q8_0 || T == GgmlType::Q4_0 || T == GgmlType::Q4_K || T == GgmlType::Q6_K;
template <GgmlType T, int M>
constexpr int kGemvRows = M == 1 && kRowsShareX<T> ? 2 : 1;

// Which matrix selection s multiplies: table[s] when there is a table (matrices anywhere, e.g. an
// expert cache's slices), else base + (ids ? ids[s] : s) · matrix_bytes.
struct MatSel {
    const uint8_t* base;
    size_t matrix_bytes;
    const int32_t* ids;
    const uint8_t* const* table;
    __device__ __forceinline__ const uint8_t* operator()(int64_t s) const {
        if (table) return table[s];
        return base + static_cast<size_t>(ids ? ids[s] : s) * matrix_bytes;
    }
    // Whether the matrices' addresses depend on no kernel's output (no ids, no table): then they may
    // be read before grid_dep_wait.
    __device__ __forceinline__ bool fixed() const { return ids == nullptr && table == nullptr; }
};

// The matrices the launch after a gate/up GEMV reads for the same selections (the experts' down
// projections): base == null, none. Once the selections' ids are visible (after grid_dep_wait) the
// gate/up blocks put them into L2 so that the down GEMV finds them there instead of starting its
// DRAM reads cold after its own wait; each selection's bytes split evenly over its blocks' warps,
// one bulk request each, issued when the warp's own rows are read (MOEMESH_CUDA_EXPERT_PREFETCH:
// 0 none, early: right after the wait).
// With a table, selection s's matrix is table[s] (an expert cache's slices), else base + ids[s] · matrix_bytes.
struct NextMats {
    const uint8_t* base = nullptr;
    size_t matrix_bytes = 0;
    const uint8_t* const* table = nullptr;
};
__device__ __forceinline__ void prefetch_next_share(const NextMats& nm, const int32_t* ids, int64_t s, bool early) {
    if ((nm.table == nullptr && (nm.base == nullptr || ids == nullptr)) || nm.matrix_bytes == 0 ||
        (switches() & kSwitchNoExpertPrefetch) ||
        early != ((switches() & kSwitchExpertPrefetchEarly) != 0))
        return;
    const int warps = static_cast<int>(blockDim.x) / kWarp;
    const size_t parts = static_cast<size_t>(gridDim.x) * warps;
    const size_t part = ((nm.matrix_bytes + parts - 1) / parts + 15) & ~size_t{15};
    const size_t b = (static_cast<size_t>(blockIdx.x) * warps + threadIdx.x / kWarp) * part;
    if (threadIdx.x % kWarp != 0 || b >= nm.matrix_bytes) return;
    const size_t n = part < nm.matrix_bytes - b ? part : nm.matrix_bytes - b;
    prefetch_l2_bulk((nm.table ? nm.table[s] : nm.base + static_cast<size_t>(ids[s]) * nm.matrix_bytes) + b, n);
}

// A warp's W rows row0 … row0 + rows − 1 of wmat (clipped at n_out) into L2, by its lane 0: called
// before grid_dep_wait where wmat is fixed, so that the rows' DRAM reads overlap the kernel before.
__device__ __forceinline__ void prefetch_warp_rows(const uint8_t* wmat, size_t row_bytes, int64_t row0, int64_t rows,
                                                   int64_t n_out) {
    if (threadIdx.x % kWarp != 0 || row0 >= n_out) return;
    const int64_t n = row0 + rows <= n_out ? rows : n_out - row0;
    prefetch_l2_bulk(wmat + static_cast<size_t>(row0) * row_bytes, static_cast<size_t>(n) * row_bytes);
}

// grid: (ceil(n_out / (kGemvWarps · kGemvRows<T, M>)), n_sel). Selection s uses matrix w(s), X rows
// from x + s * x_stride and writes y + s * n_out (only used with M == 1 when n_sel > 1).
template <GgmlType T, int M>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_kernel(MatSel w, size_t row_bytes, int64_t n_out, int64_t k, const float* __restrict__ x, int64_t x_stride,
                float* __restrict__ y) {
    constexpr int RW = kGemvRows<T, M>;
    const int lane = threadIdx.x % kWarp;
    const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp) * RW;
    const int64_t s = blockIdx.y;
    if (w.fixed()) prefetch_warp_rows(w(s), row_bytes, row0, RW, n_out);
    grid_dep_wait();
    if (row0 >= n_out) return;
    const uint8_t* wmat = w(s);
    const uint8_t* rows[RW];
#pragma unroll
    for (int ri = 0; ri < RW; ++ri)  // a missing last row repeats the one before (not stored)
        rows[ri] = wmat + static_cast<size_t>(row0 + ri < n_out ? row0 + ri : n_out - 1) * row_bytes;
    float acc[RW][M];
#pragma unroll
    for (int ri = 0; ri < RW; ++ri)
#pragma unroll
        for (int r = 0; r < M; ++r) acc[ri][r] = 0.0f;
    dot_rows<T, RW, M>(rows, k, x + s * x_stride, lane, acc);
#pragma unroll
    for (int ri = 0; ri < RW; ++ri)
#pragma unroll
        for (int r = 0; r < M; ++r) {
            const float v = warp_sum(acc[ri][r]);
            if (lane == 0 && row0 + ri < n_out) y[(s + r) * n_out + row0 + ri] = v;
        }
}

// One decode token's router (matmul_route): logits[e] = W_e · x with gemv_kernel<T, 1>'s bits, then
// the block that finishes last (every block's logits fenced, one count per block; the counter left
// at 0) runs softmax_topk's warp over them: no second launch.
template <GgmlType T>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_route_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t E, int64_t k,
                      const float* __restrict__ x, float* probs, int K, bool norm_topk, int32_t* __restrict__ ids,
                      float* __restrict__ weights, unsigned* __restrict__ counter) {
    const int lane = threadIdx.x % kWarp;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
    prefetch_warp_rows(w, row_bytes, row, 1, E);
    grid_dep_wait();
    if (row < E) {  // warp-uniform
        const uint8_t* rows[1] = {w + static_cast<size_t>(row) * row_bytes};
        float acc[1][1] = {{0.0f}};
        dot_rows<T, 1, 1>(rows, k, x, lane, acc);
        const float v = warp_sum(acc[0][0]);
        if (lane == 0) probs[row] = v;
    }
    if (!last_block_done(counter)) return;
    if (threadIdx.x < kWarp) softmax_topk_any<true>(probs, E, K, norm_topk, ids, weights);
    if (threadIdx.x == 0) *counter = 0;
}

// Several matrices' single-row products in one launch: row r of the concatenated rows belongs to
// matrix j with end[j - 1] <= r < end[j]; the dot products and reductions of gemv_kernel<T, 1>
// (two rows per warp).
struct MultiGemv {
    const uint8_t* w[kMultiGemvMax];
    float* y[kMultiGemvMax];
    int64_t end[kMultiGemvMax];  // cumulative row counts
    int n;
};
// The warp's rows r0 … r0 + RW − 1 of the concatenation (a missing last row repeats the one before;
// its result is not stored): their W rows and outputs.
template <int RW>
__device__ __forceinline__ void multi_rows(const MultiGemv& mg, size_t row_bytes, int64_t r0, int64_t total,
                                           const uint8_t* (&rows)[RW], float* (&dst)[RW]) {
#pragma unroll
    for (int ri = 0; ri < RW; ++ri) {
        const int64_t r = r0 + ri < total ? r0 + ri : total - 1;
        int j = 0;
        while (r >= mg.end[j]) ++j;
        const int64_t row = r - (j ? mg.end[j - 1] : 0);
        rows[ri] = mg.w[j] + static_cast<size_t>(row) * row_bytes;
        dst[ri] = mg.y[j] + row;
    }
}
// multi_rows where the warp has rows (r0 < total), each of them prefetched into L2 by one lane (the
// rows may lie in two matrices); from the kernel's arguments only, so before grid_dep_wait.
template <int RW>
__device__ __forceinline__ void multi_rows_prefetched(const MultiGemv& mg, size_t row_bytes, int64_t r0, int64_t total,
                                                      int lane, const uint8_t* (&rows)[RW], float* (&dst)[RW]) {
    if (r0 >= total) return;
    multi_rows(mg, row_bytes, r0, total, rows, dst);
#pragma unroll
    for (int ri = 0; ri < RW; ++ri)
        if (lane == ri && r0 + ri < total) prefetch_l2_bulk(rows[ri], row_bytes);
}
template <int RW>
__device__ __forceinline__ void multi_store(float (&acc)[RW][1], float* const (&dst)[RW], int64_t r0, int64_t total,
                                            int lane) {
#pragma unroll
    for (int ri = 0; ri < RW; ++ri) {
        const float v = warp_sum(acc[ri][0]);
        if (lane == 0 && r0 + ri < total) *dst[ri] = v;
    }
}
// A decode token's q/k/v heads finished in the multi GEMV (matmul_multi_gemv's QkvRope): a counter
// per head of the concatenated rows (q heads, k heads, v heads; D rows each, whole blocks); the
// block of a head that finishes last does norm_rope_store_kv_kernel's work for it: a q or k head
// normed and rotated in place (k also stored at p0), a v head stored; the counter left at 0.
struct RopeTail {
    unsigned* counters = nullptr;  // null: no tail
    const float* qw = nullptr;
    const float* kw = nullptr;
    float eps = 0.0f;
    int64_t n_head = 0, n_head_kv = 0, D = 0, half = 0;
    float theta_scale = 0.0f;
    RopeParams p{};
    int32_t p0_val = 0;
    const int32_t* p0_dev = nullptr;
    void* kc = nullptr;
    void* vc = nullptr;
    bool f16 = false;
};
// Called by every thread of a block whose rows start at row0 (rows_per_block of them, in one head).
__device__ __forceinline__ void qkv_head_tail(const MultiGemv& mg, const RopeTail& rt, int64_t row0,
                                              int rows_per_block) {
    const int64_t hd = row0 / rt.D;
    if (!last_block_done(&rt.counters[hd], static_cast<unsigned>(rt.D / rows_per_block))) return;
    __shared__ float red[kWarp];
    __shared__ float hv[kNormRopeMaxHeadDim];
    const int32_t p0 = rt.p0_dev ? *rt.p0_dev : rt.p0_val;
    const int64_t e = threadIdx.x, kv_dim = rt.n_head_kv * rt.D;
    if (hd < rt.n_head) {
        norm_rope_head<true>(mg.y[0] + hd * rt.D, rt.qw, rt.D, rt.half, rt.eps, p0, rt.theta_scale, rt.p, red, hv);
    } else if (hd < rt.n_head + rt.n_head_kv) {
        const int64_t j = hd - rt.n_head;
        const float o =
            norm_rope_head<true>(mg.y[1] + j * rt.D, rt.kw, rt.D, rt.half, rt.eps, p0, rt.theta_scale, rt.p, red, hv);
        store_elem(rt.kc, static_cast<int64_t>(p0) * kv_dim + j * rt.D + e, o, rt.f16);
    } else {
        const int64_t j = hd - rt.n_head - rt.n_head_kv;
        store_elem(rt.vc, static_cast<int64_t>(p0) * kv_dim + j * rt.D + e, __ldcg(mg.y[2] + j * rt.D + e), rt.f16);
    }
    if (threadIdx.x == 0) rt.counters[hd] = 0;
}

template <GgmlType T>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_multi_kernel(MultiGemv mg, size_t row_bytes, int64_t k, const float* __restrict__ x, RopeTail rt) {
    constexpr int RW = kGemvRows<T, 1>;
    const int lane = threadIdx.x % kWarp;
    const int64_t total = mg.end[mg.n - 1];
    const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp) * RW;
    const uint8_t* rows[RW];
    float* dst[RW];
    multi_rows_prefetched(mg, row_bytes, r0, total, lane, rows, dst);
    grid_dep_wait();
    if (r0 >= total) return;
    float acc[RW][1];
#pragma unroll
    for (int ri = 0; ri < RW; ++ri) acc[ri][0] = 0.0f;
    dot_rows<T, RW, 1>(rows, k, x, lane, acc);
    multi_store(acc, dst, r0, total, lane);
    if (rt.counters) qkv_head_tail(mg, rt, static_cast<int64_t>(blockIdx.x) * kGemvWarps * RW, kGemvWarps * RW);
}

// gate and up of the same selection and row in one warp (as two rows of dot_rows: their loads in
// flight together, X loaded once), SwiGLU applied: the dot products and reductions of two
// gemv_kernel<T, 1> launches, then swiglu_kernel's silu(g) · u (same bits).
template <GgmlType T>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_swiglu_kernel(MatSel wg, MatSel wu, size_t row_bytes, int64_t n_out, int64_t k, const float* __restrict__ x,
                       int64_t x_stride, float* __restrict__ y, NextMats next) {
    const int lane = threadIdx.x % kWarp;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
    const int64_t s = blockIdx.y;
    if (wg.fixed() && wu.fixed()) {  // (a dense FFN or shared expert; experts' ids come from the router)
        prefetch_warp_rows(wg(s), row_bytes, row, 1, n_out);
        prefetch_warp_rows(wu(s), row_bytes, row, 1, n_out);
    }
    grid_dep_wait();
    prefetch_next_share(next, wg.ids, s, true);
    if (row < n_out) {  // warp-uniform
        const size_t off = static_cast<size_t>(row) * row_bytes;
        const uint8_t* const rows[2] = {wg(s) + off, wu(s) + off};
        float acc[2][1] = {{0.0f}, {0.0f}};
        dot_rows<T, 2, 1>(rows, k, x + s * x_stride, lane, acc);
        const float g = warp_sum(acc[0][0]), u = warp_sum(acc[1][0]);
        if (lane == 0) y[s * n_out + row] = silu(g) * u;
    }
    prefetch_next_share(next, wg.ids, s, false);
}

// A decode step's expert down products and their weighted sum: block h has one warp per selection
// (gemv_kernel<T, 1>'s dot product and reduction of row h of expert ids[j] with g[j]), then
// moe_combine_kernel's sum out[h] = Σ_j w[j] · y_j in j order.
constexpr int kDownCombineMaxSel = 16;
template <GgmlType T>
__global__ void __launch_bounds__(kDownCombineMaxSel* kWarp)
    gemv_down_combine_kernel(const uint8_t* __restrict__ wd, size_t matrix_bytes, size_t row_bytes,
                             const int32_t* __restrict__ ids, const float* __restrict__ wsel, int64_t n_out, int64_t k,
                             const float* __restrict__ g, float* __restrict__ out) {
    grid_dep_wait();
    __shared__ float part[kWarp];
    const int lane = threadIdx.x % kWarp, j = threadIdx.x / kWarp, n_sel = blockDim.x / kWarp;
    const int64_t row = blockIdx.x;
    const uint8_t* const rows[1] = {wd + static_cast<size_t>(ids[j]) * matrix_bytes + static_cast<size_t>(row) * row_bytes};
    float acc[1][1] = {{0.0f}};
    dot_rows<T, 1, 1>(rows, k, g + j * k, lane, acc);
    const float v = warp_sum(acc[0][0]);
    if (lane == 0) part[j] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float o = 0.0f;
        for (int i = 0; i < n_sel; ++i) o += wsel[i] * part[i];
        out[row] = o;
    }
}

// ---------------------------------------------------------------------------------------------
// Int8-activation GEMV for the quantized types (when it runs: gemv_mode() below; the f32 kernel
// above otherwise). Each block of kGemvQWarps warps first quantizes its X rows into shared memory,
// llama.cpp Q8_1-style: per 32 elements d = amax / 127 and q = round(x / d) (for Q8_0 / Q4_0 / Q5_0
// weights d is then rounded to f16, exactly as the CPU's Q8_0 activations, so the result equals the
// CPU matmul's up to summation order), plus d · Σq over every 16 elements (the K-quant min terms,
// on the same rounded X as the scale terms). The dot products use
// __dp4a (4 int8 MACs per instruction) on the same lane units as the f32 kernel: X costs 1 byte
// of shared memory per element instead of 4 bytes of L1 per element, and no float conversion of
// the quants. While X is quantized each warp prefetches its first W rows into L2, so the DRAM
// latency overlaps the quantization. Each warp owns rows_per_warp consecutive rows, chosen so
// that one wave of resident blocks covers all rows (lm_head: ~18 rows per warp, then 2 rows at a
// time with their loads in flight together; small matrices: 1 row per warp).

constexpr int kGemvQWarps = 8;
// Lane units in flight per row pair in gemv_q_kernel (one for R = 2): its 256-thread blocks hold a
// row's X in shared memory and walk many rows per warp, so registers (resident blocks, hence rows per
// warp) matter more than a second unit's loads (the down GEMV's rows have one unit per lane).
constexpr int kQGemvUnits = 2;

template <int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_q8_0(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&accs)[R][M]) {
    const int nb = static_cast<int>(k / 32), n_units = nb * 4;
    struct Raw {
        uint16_t d[R];
        uint32_t w0[R], w1[R];
    };
    for_units<Raw, U>(
        n_units, lane,
        [&](int64_t u) {
            const int b = static_cast<int>(u >> 2), j = static_cast<int>(u & 3);
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + static_cast<size_t>(b) * sizeof(BlockQ8_0);
                raw.d[ri] = ld<uint16_t>(blk);
                raw.w0[ri] = ld_u32_a2(blk + 2 + 8 * j);
                raw.w1[ri] = ld_u32_a2(blk + 6 + 8 * j);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int b = static_cast<int>(u >> 2), j = static_cast<int>(u & 3);
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const float d = h2f(raw.d[ri]);
                const int w0 = static_cast<int>(raw.w0[ri]), w1 = static_cast<int>(raw.w1[ri]);
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    const int2 xi = *reinterpret_cast<const int2*>(x.q + r * k + 32 * b + 8 * j);
                    accs[ri][r] += d * x.d[r * nb + b] * static_cast<float>(__dp4a(w0, xi.x, __dp4a(w1, xi.y, 0)));
                }
            }
        });
}

template <int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_q4_0(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&accs)[R][M]) {
    const int nb = static_cast<int>(k / 32), n_units = nb * 4;
    struct Raw {
        uint16_t d[R];
        uint32_t q[R];
    };
    for_units<Raw, U>(
        n_units, lane,
        [&](int64_t u) {
            const int b = static_cast<int>(u >> 2), j = static_cast<int>(u & 3);
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + static_cast<size_t>(b) * sizeof(BlockQ4_0);
                raw.d[ri] = ld<uint16_t>(blk);
                raw.q[ri] = ld_u32_a2(blk + 2 + 4 * j);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int b = static_cast<int>(u >> 2), j = static_cast<int>(u & 3);
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const float d = h2f(raw.d[ri]);
                const uint32_t q = raw.q[ri];
                const int lo = static_cast<int>(__vsub4(q & 0x0F0F0F0Fu, 0x08080808u));
                const int hi = static_cast<int>(__vsub4((q >> 4) & 0x0F0F0F0Fu, 0x08080808u));
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    const int8_t* xq = x.q + r * k + 32 * b + 4 * j;
                    const int x0 = *reinterpret_cast<const int*>(xq), x1 = *reinterpret_cast<const int*>(xq + 16);
                    accs[ri][r] += d * x.d[r * nb + b] * static_cast<float>(__dp4a(lo, x0, __dp4a(hi, x1, 0)));
                }
            }
        });
}

template <int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_q4_K(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&accs)[R][M]) {
    const int n_units = static_cast<int>(k / 256) * 8;
    struct Raw {
        uint4 hdr[R], qv[R];
    };
    for_units<Raw, U>(
        n_units, lane,
        [&](int64_t u) {
            const int b = static_cast<int>(u >> 3), j = static_cast<int>(u & 7), g = j >> 1, h = j & 1;
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + static_cast<size_t>(b) * sizeof(BlockQ4_K);
                raw.hdr[ri] = ld<uint4>(blk);
                raw.qv[ri] = ld<uint4>(blk + 16 + 32 * g + 16 * h);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int b = static_cast<int>(u >> 3), j = static_cast<int>(u & 7), g = j >> 1, h = j & 1;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint4 qv = raw.qv[ri];
                const uint32_t qw[4] = {qv.x, qv.y, qv.z, qv.w};
                uint32_t lo[4], hi[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) lo[i] = qw[i] & 0x0F0F0F0Fu, hi[i] = (qw[i] >> 4) & 0x0F0F0F0Fu;
                dotq_k_unit<M>(k_sub_scales(raw.hdr[ri], g), lo, hi, x, k, b, g, h, accs[ri]);
            }
        });
}

template <int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_q6_K(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&accs)[R][M]) {
    const int nsb = static_cast<int>(k / 256), n_units = nsb * 16, nb = nsb * 8;
    struct Raw {
        uint32_t ql0[R], ql1[R], qh[R];
        uint8_t sc[R][4];
        uint16_t d[R];
    };
    for_units<Raw, U>(
        n_units, lane,
        [&](int64_t u) {
            const int b = static_cast<int>(u >> 4);
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7), is = l0 / 16;
            Raw raw;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint8_t* blk = rows[ri] + static_cast<size_t>(b) * sizeof(BlockQ6_K);
                raw.ql0[ri] = ld_u32_a2(blk + 64 * c + l0);
                raw.ql1[ri] = ld_u32_a2(blk + 64 * c + 32 + l0);
                raw.qh[ri] = ld_u32_a2(blk + 128 + 32 * c + l0);
                const uint8_t* sc = blk + 192 + 8 * c + is;
#pragma unroll
                for (int i = 0; i < 4; ++i) raw.sc[ri][i] = __ldg(sc + 2 * i);
                raw.d[ri] = ld<uint16_t>(blk + 208);
            }
            return raw;
        },
        [&](int64_t u, const Raw& raw) {
            const int b = static_cast<int>(u >> 4);
            const int li = static_cast<int>(u & 15), c = li >> 3, l0 = 4 * (li & 7);
            const int e = 256 * b + 128 * c + l0;
#pragma unroll
            for (int ri = 0; ri < R; ++ri) {
                const uint32_t ql0 = raw.ql0[ri], ql1 = raw.ql1[ri], qh = raw.qh[ri];
                const float s0 = static_cast<float>(static_cast<int8_t>(raw.sc[ri][0]));
                const float s1 = static_cast<float>(static_cast<int8_t>(raw.sc[ri][1]));
                const float s2 = static_cast<float>(static_cast<int8_t>(raw.sc[ri][2]));
                const float s3 = static_cast<float>(static_cast<int8_t>(raw.sc[ri][3]));
                const float d = h2f(raw.d[ri]);
                // 6-bit quants 0..63 minus 32, four per word (per-byte subtraction: signed int8 lanes).
                const int q0 = static_cast<int>(__vsub4((ql0 & 0x0F0F0F0Fu) | ((qh << 4) & 0x30303030u), 0x20202020u));
                const int q1 = static_cast<int>(__vsub4((ql1 & 0x0F0F0F0Fu) | ((qh << 2) & 0x30303030u), 0x20202020u));
                const int q2 =
                    static_cast<int>(__vsub4(((ql0 >> 4) & 0x0F0F0F0Fu) | (qh & 0x30303030u), 0x20202020u));
                const int q3 =
                    static_cast<int>(__vsub4(((ql1 >> 4) & 0x0F0F0F0Fu) | ((qh >> 2) & 0x30303030u), 0x20202020u));
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    const int8_t* xq = x.q + r * k + e;
                    const float* xd = x.d + r * nb + 8 * b + 4 * c;
                    const int x0 = *reinterpret_cast<const int*>(xq), x1 = *reinterpret_cast<const int*>(xq + 32);
                    const int x2 = *reinterpret_cast<const int*>(xq + 64), x3 = *reinterpret_cast<const int*>(xq + 96);
                    accs[ri][r] += d * (s0 * xd[0] * static_cast<float>(__dp4a(q0, x0, 0)) +
                                        s1 * xd[1] * static_cast<float>(__dp4a(q1, x1, 0)) +
                                        s2 * xd[2] * static_cast<float>(__dp4a(q2, x2, 0)) +
                                        s3 * xd[3] * static_cast<float>(__dp4a(q3, x3, 0)));
                }
            }
        });
}

template <GgmlType T>
constexpr bool kHasQGemv = T == GgmlType::Q8_0 || T == GgmlType::Q4_0 || T == GgmlType::Q4_K || T == GgmlType::Q6_K ||
                           T == GgmlType::Q5_0 || T == GgmlType::Q5_K || T == GgmlType::Q3_K || T == GgmlType::Q2_K;
// Types the CPU pairs with Q8_0 activations (f16 scale per 32): the int8 X scales are rounded to f16.
template <GgmlType T>
constexpr bool kQ8_0Act = T == GgmlType::Q8_0 || T == GgmlType::Q4_0 || T == GgmlType::Q5_0;

// acc[ri][r] += rows[ri] · X̂[r] for the int8-X types (X̂: X quantized per 32, QX); U lane units
// (each with the loads of all R rows) in flight at a time (for_units).
template <GgmlType T, int R, int M, int U = kGemvUnroll / R>
__device__ __forceinline__ void dotq_rows(const uint8_t* const (&rows)[R], int64_t k, const QX& x, int lane,
                                          float (&acc)[R][M]) {
    if constexpr (T == GgmlType::Q8_0) dotq_q8_0<R, M, U>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q4_0) dotq_q4_0<R, M, U>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q4_K) dotq_q4_K<R, M, U>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q6_K) dotq_q6_K<R, M, U>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q5_0) dotq_q5_0<R, M, U>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q5_K) dotq_q5_K<R, M, U>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q3_K) dotq_q3_K<R, M, U>(rows, k, x, lane, acc);
    else if constexpr (T == GgmlType::Q2_K) dotq_q2_K<R, M, U>(rows, k, x, lane, acc);
}

// Shared memory of the int8-X kernel for M rows of k: q (M·k bytes), d (M·k/32 floats), s16 (M·k/16 floats).
inline size_t qgemv_smem(int64_t m, int64_t k) {
    return static_cast<size_t>(m * k + m * (k / 32) * 4 + m * (k / 16) * 4);
}

// What gemv_q_kernel's last block does after the products (M == 1; counter null: nothing): the
// weighted sum of the selections' rows, cout[h] = Σ_s cw[s] · y[s, h] (moe_combine's bits), then,
// with nw, rx += cout, ry = rmsnorm(rx) · nw and ry quantized into qy when set (add_rmsnorm's bits:
// the next layer's input norm); the counter is left at 0.
struct QTail {
    const float* cw = nullptr;
    float* cout = nullptr;
    unsigned* counter = nullptr;
    float* rx = nullptr;
    const float* nw = nullptr;
    float* ry = nullptr;
    float eps = 0.0f;
    uint8_t* qy = nullptr;
};
static_assert(kGemvQWarps * kWarp == kRowThreads, "the tail's norm keeps a row of n <= kRowRegs · kRowThreads");

// grid: (ceil(n_out / (kGemvQWarps · rows_per_warp)), n_sel); selections as in gemv_kernel; tail: QTail.
template <GgmlType T, int M, int R>
__global__ void __launch_bounds__(kGemvQWarps* kWarp)
    gemv_q_kernel(const uint8_t* __restrict__ w, size_t matrix_bytes, size_t row_bytes,
                  const int32_t* __restrict__ ids, int64_t n_out, int64_t k, const float* __restrict__ x,
                  int64_t x_stride, float* __restrict__ y, int rows_per_warp, QTail tail) {
    MM_EXTERN_SHARED(uint8_t, smem);
    int8_t* xq = reinterpret_cast<int8_t*>(smem);
    float* xd = reinterpret_cast<float*>(smem + M * k);
    float* xs = xd + M * (k / 32);
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int64_t s = blockIdx.y;
    const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvQWarps + warp) * rows_per_warp;
    const int64_t row1 = row0 + rows_per_warp < n_out ? row0 + rows_per_warp : n_out;
    // Prefetch (into L2) up to 16 KB of this warp's rows while X is being quantized: before
    // grid_dep_wait where the matrix is fixed (no ids: lm_head), so that it overlaps the kernel before.
    const auto prefetch = [&](const uint8_t* wmat) {
        if (row0 >= row1) return;
        const size_t bytes = static_cast<size_t>(row1 - row0) * row_bytes;
        const uint8_t* p = wmat + static_cast<size_t>(row0) * row_bytes;
        for (size_t off = static_cast<size_t>(lane) * 128; off < bytes && off < 16384; off += kWarp * 128)
            prefetch_l2(p + off);
    };
    if (ids == nullptr) prefetch(w + static_cast<size_t>(s) * matrix_bytes);
    grid_dep_wait();  // ids and X come from the kernels before
    const uint8_t* wmat = w + static_cast<size_t>(ids ? ids[s] : s) * matrix_bytes;
    if (ids != nullptr) prefetch(wmat);
    // Quantize X: a warp per group of 32 elements (rows are k apart and k % 32 == 0, so group gi is
    // contiguous), kQBatch groups per warp with their loads in flight together.
    constexpr int kQBatch = 8;
    const float* xsrc = x + s * x_stride;
    const int64_t groups = M * (k / 32);
    for (int64_t g0 = warp; g0 < groups; g0 += kGemvQWarps * kQBatch) {
        float vb[kQBatch];
#pragma unroll
        for (int i = 0; i < kQBatch; ++i) {
            const int64_t gi = g0 + i * kGemvQWarps;
            vb[i] = gi < groups ? xsrc[gi * 32 + lane] : 0.0f;
        }
        const int64_t left = (groups - g0 + kGemvQWarps - 1) / kGemvQWarps;  // groups g0, g0 + kGemvQWarps, …
        const int n = left < kQBatch ? static_cast<int>(left) : kQBatch;
        float d[kQBatch], h[kQBatch];
        quant_groups32<kQBatch>(vb, n, lane, xq + g0 * 32, kGemvQWarps * 32, d, h);
#pragma unroll
        for (int i = 0; i < kQBatch; ++i) {
            const int64_t gi = g0 + i * kGemvQWarps;
            if (i >= n) break;  // warp-uniform
            if (lane == 0) xd[gi] = kQ8_0Act<T> ? round_f16(d[i]) : d[i];
            if ((lane & 15) == 0) xs[2 * gi + lane / 16] = h[i];
        }
    }
    __syncthreads();
    const QX qx{xq, xd, xs};
    // R rows at a time; a missing last row repeats the previous one (its result is not stored).
    // Rows past the first 16 KB (prefetched above) go into L2 ahead of their turn, R rows every
    // step, so that a warp with many rows (lm_head: ~70 pairs) keeps its next 16 KB in flight
    // instead of one DRAM round trip per row pair.
    const int64_t ahead = static_cast<int64_t>((16384 + row_bytes - 1) / row_bytes);
    for (int64_t row = row0; row < row1; row += R) {
        if (lane == 0 && row + ahead < row1) {
            const int64_t n = row + ahead + R <= row1 ? R : row1 - row - ahead;
            prefetch_l2_bulk(wmat + static_cast<size_t>(row + ahead) * row_bytes, static_cast<size_t>(n) * row_bytes);
        }
        const uint8_t* wrows[R];
#pragma unroll
        for (int ri = 0; ri < R; ++ri)
            wrows[ri] = wmat + static_cast<size_t>(row + ri < row1 ? row + ri : row1 - 1) * row_bytes;
        float acc[R][M];
#pragma unroll
        for (int ri = 0; ri < R; ++ri)
#pragma unroll
            for (int r = 0; r < M; ++r) acc[ri][r] = 0.0f;
        dotq_rows<T, R, M, kQGemvUnits / R>(wrows, k, qx, lane, acc);
#pragma unroll
        for (int ri = 0; ri < R; ++ri)
#pragma unroll
            for (int r = 0; r < M; ++r) {
                const float v = warp_sum(acc[ri][r]);
                if (lane == 0 && row + ri < row1) y[(s + r) * n_out + row + ri] = v;
            }
    }
    if (tail.counter == nullptr || !last_block_done(tail.counter)) return;  // (uniform over the grid)
    const int64_t n_sel = gridDim.y;
    for (int64_t h = threadIdx.x; h < n_out; h += blockDim.x) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n_sel; ++j) acc += tail.cw[j] * __ldcg(y + j * n_out + h);
        tail.cout[h] = acc;
    }
    if (tail.nw != nullptr) {
        __shared__ float red[kWarp];
        __syncthreads();  // cout written by the block's threads: read back in the norm's layout
        add_rmsnorm_regs<true>(tail.rx, tail.cout, tail.nw, tail.ry, n_out, tail.eps, tail.qy, red);
    }
    if (threadIdx.x == 0) *tail.counter = 0;
}

// ---------------------------------------------------------------------------------------------
// Decode GEMVs on an X row quantized once, by the norm that produced it (cuda_ops.h qx_bytes): the
// dot products of gemv_q_kernel (dotq_rows), without its per-block quantization, shared memory and
// barrier; W rows laid out as in the f32-X kernels (kGemvRows per warp, kGemvWarps per block).

template <GgmlType T>
__device__ __forceinline__ QX qx_view(const uint8_t* qx, int64_t k) {
    // Q8_0 / Q4_0 / Q5_0 pair with the f16-rounded scales (as gemv_q_kernel and the CPU's Q8_0 X).
    return QxRow(const_cast<uint8_t*>(qx), k).view(kQ8_0Act<T>);  // (read only through the view)
}

// The warp's kGemvRows W rows from row0 (of n_out) of matrix wmat against the quantized row qx:
// y[row] for each of them.
template <GgmlType T>
__device__ __forceinline__ void qx_warp_rows(const uint8_t* wmat, size_t row_bytes, int64_t row0, int64_t n_out,
                                             int64_t k, const uint8_t* qx, float* y) {
    constexpr int RW = kGemvRows<T, 1>;
    const int lane = threadIdx.x % kWarp;
    const uint8_t* rows[RW];
#pragma unroll
    for (int ri = 0; ri < RW; ++ri)
        rows[ri] = wmat + static_cast<size_t>(row0 + ri < n_out ? row0 + ri : n_out - 1) * row_bytes;
    float acc[RW][1];
#pragma unroll
    for (int ri = 0; ri < RW; ++ri) acc[ri][0] = 0.0f;
    dotq_rows<T, RW, 1>(rows, k, qx_view<T>(qx, k), lane, acc);
#pragma unroll
    for (int ri = 0; ri < RW; ++ri) {
        const float v = warp_sum(acc[ri][0]);
        if (lane == 0 && row0 + ri < n_out) y[row0 + ri] = v;
    }
}

// grid: (ceil(n_out / (kGemvWarps · kGemvRows)), n_sel); selection s: matrix w(s), y + s · n_out.
template <GgmlType T>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_qx_kernel(MatSel w, size_t row_bytes, int64_t n_out, int64_t k, const uint8_t* __restrict__ qx,
                   float* __restrict__ y) {
    const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp) * kGemvRows<T, 1>;
    const int64_t s = blockIdx.y;
    if (w.fixed()) prefetch_warp_rows(w(s), row_bytes, row0, kGemvRows<T, 1>, n_out);
    grid_dep_wait();
    if (row0 >= n_out) return;
    qx_warp_rows<T>(w(s), row_bytes, row0, n_out, k, qx, y + s * n_out);
}

// A decode token's o projection with the residual add + norm after it (matmul_qx_add_rmsnorm):
// t = W · x̂ with gemv_qx_kernel's bits (blocks of kRowThreads: 8 warps), then the block that
// finishes last (every block's rows fenced, one count per block; the counter left at 0): x += t,
// y = rmsnorm(x) · nw and y quantized into qy, with add_rmsnorm's bits. qy may be qx's buffer:
// the last block writes it after every block's reads of qx.
template <GgmlType T>
__global__ void __launch_bounds__(kRowThreads)
    gemv_qx_add_rmsnorm_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_out, int64_t k,
                               const uint8_t* qx, float* t, float* x, const float* __restrict__ nw, float* y, float eps,
                               uint8_t* qy, unsigned* __restrict__ counter) {
    const int64_t row0 =
        (static_cast<int64_t>(blockIdx.x) * (kRowThreads / kWarp) + threadIdx.x / kWarp) * kGemvRows<T, 1>;
    prefetch_warp_rows(w, row_bytes, row0, kGemvRows<T, 1>, n_out);
    grid_dep_wait();
    if (row0 < n_out) qx_warp_rows<T>(w, row_bytes, row0, n_out, k, qx, t);  // warp-uniform
    if (!last_block_done(counter)) return;
    __shared__ float red[kWarp];
    add_rmsnorm_regs<true>(x, t, nw, y, n_out, eps, qy, red);
    if (threadIdx.x == 0) *counter = 0;
}

// gemv_multi_kernel on the quantized X.
template <GgmlType T>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_multi_qx_kernel(MultiGemv mg, size_t row_bytes, int64_t k, const uint8_t* __restrict__ qx, RopeTail rt) {
    constexpr int RW = kGemvRows<T, 1>;
    const int lane = threadIdx.x % kWarp;
    const int64_t total = mg.end[mg.n - 1];
    const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp) * RW;
    const uint8_t* rows[RW];
    float* dst[RW];
    multi_rows_prefetched(mg, row_bytes, r0, total, lane, rows, dst);
    grid_dep_wait();
    if (r0 >= total) return;
    float acc[RW][1];
#pragma unroll
    for (int ri = 0; ri < RW; ++ri) acc[ri][0] = 0.0f;
    dotq_rows<T, RW, 1>(rows, k, qx_view<T>(qx, k), lane, acc);
    multi_store(acc, dst, r0, total, lane);
    if (rt.counters) qkv_head_tail(mg, rt, static_cast<int64_t>(blockIdx.x) * kGemvWarps * RW, kGemvWarps * RW);
}

// gemv_swiglu_kernel on the quantized X (every selection reads the same row).
template <GgmlType T>
__global__ void __launch_bounds__(kGemvWarps* kWarp)
    gemv_swiglu_qx_kernel(MatSel wg, MatSel wu, size_t row_bytes, int64_t n_out, int64_t k,
                          const uint8_t* __restrict__ qx, float* __restrict__ y, NextMats next) {
    const int lane = threadIdx.x % kWarp;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
    const int64_t s = blockIdx.y;
    if (wg.fixed() && wu.fixed()) {  // (a dense FFN or shared expert; experts' ids come from the router)
        prefetch_warp_rows(wg(s), row_bytes, row, 1, n_out);
        prefetch_warp_rows(wu(s), row_bytes, row, 1, n_out);
    }
    grid_dep_wait();
    prefetch_next_share(next, wg.ids, s, true);
    if (row < n_out) {  // warp-uniform
        const size_t off = static_cast<size_t>(row) * row_bytes;
        const uint8_t* const rows[2] = {wg(s) + off, wu(s) + off};
        float acc[2][1] = {{0.0f}, {0.0f}};
        dotq_rows<T, 2, 1>(rows, k, qx_view<T>(qx, k), lane, acc);
        const float g = warp_sum(acc[0][0]), u = warp_sum(acc[1][0]);
        if (lane == 0) y[s * n_out + row] = silu(g) * u;
    }
    prefetch_next_share(next, wg.ids, s, false);
}

// ---------------------------------------------------------------------------------------------
// Tiled kernel for prefill: 8 consecutive elements e..e+7 (e % 8 == 0) of a W row, dequantized
// bit-identically to the CPU's dequantize_row (each product and difference rounded on its own, as
// there; dequantize_rows below checks it).

template <GgmlType T>
__device__ __forceinline__ void load8(const uint8_t* row, int64_t e, float (&v)[8]) {
    if constexpr (T == GgmlType::F32) {
        const float4 a = ld<float4>(row + e * 4), b = ld<float4>(row + e * 4 + 16);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else if constexpr (T == GgmlType::F16 || T == GgmlType::BF16) {
        const uint4 wv = ld<uint4>(row + e * 2);
        const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const auto lo = static_cast<uint16_t>(words[i] & 0xffffu), hi = static_cast<uint16_t>(words[i] >> 16);
            v[2 * i] = T == GgmlType::BF16 ? bf2f(lo) : h2f(lo);
            v[2 * i + 1] = T == GgmlType::BF16 ? bf2f(hi) : h2f(hi);
        }
    } else if constexpr (T == GgmlType::Q8_0) {
        const uint8_t* blk = row + (e / 32) * sizeof(BlockQ8_0);
        const int j = static_cast<int>(e % 32);
        const float d = h2f(ld<uint16_t>(blk));
        const uint32_t w0 = ld_u32_a2(blk + 2 + j), w1 = ld_u32_a2(blk + 2 + j + 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = d * static_cast<float>(static_cast<int8_t>(byte_of(w0, i)));
            v[i + 4] = d * static_cast<float>(static_cast<int8_t>(byte_of(w1, i)));
        }
    } else if constexpr (T == GgmlType::Q4_0) {
        const uint8_t* blk = row + (e / 32) * sizeof(BlockQ4_0);
        const int j = static_cast<int>(e % 32), shift = j < 16 ? 0 : 4;
        const float d = h2f(ld<uint16_t>(blk));
        const uint32_t w0 = ld_u32_a2(blk + 2 + (j % 16)), w1 = ld_u32_a2(blk + 2 + (j % 16) + 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = d * static_cast<float>(static_cast<int>((byte_of(w0, i) >> shift) & 0xF) - 8);
            v[i + 4] = d * static_cast<float>(static_cast<int>((byte_of(w1, i) >> shift) & 0xF) - 8);
        }
    } else if constexpr (T == GgmlType::Q4_K) {
        const uint8_t* blk = row + (e / 256) * sizeof(BlockQ4_K);
        const int wi = static_cast<int>(e % 256), g = wi / 64, r = wi % 64, sub = 2 * g + (r >= 32 ? 1 : 0);
        const int shift = r >= 32 ? 4 : 0;
        const uint4 hdr = ld<uint4>(blk);
        const uint2 q = ld<uint2>(blk + 16 + 32 * g + (r % 32));
        float sc, m;
        scale_min_k4(sub, hdr.y, hdr.z, hdr.w, &sc, &m);
        const float d = __fmul_rn(h2f(static_cast<uint16_t>(hdr.x & 0xffff)), sc);
        const float mn = __fmul_rn(h2f(static_cast<uint16_t>(hdr.x >> 16)), m);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = __fsub_rn(__fmul_rn(d, static_cast<float>((byte_of(q.x, i) >> shift) & 0xF)), mn);
            v[i + 4] = __fsub_rn(__fmul_rn(d, static_cast<float>((byte_of(q.y, i) >> shift) & 0xF)), mn);
        }
    } else if constexpr (T == GgmlType::Q6_K) {
        const uint8_t* blk = row + (e / 256) * sizeof(BlockQ6_K);
        const int wi = static_cast<int>(e % 256), c = wi / 128, r = wi % 128, qq = r / 32, l = r % 32;
        const uint8_t* ql = blk + 64 * c + 32 * (qq & 1) + l;
        const uint8_t* qh = blk + 128 + 32 * c + l;
        const int lshift = 4 * (qq >> 1), hshift = 2 * qq;
        const uint32_t l0 = ld_u32_a2(ql), l1 = ld_u32_a2(ql + 4), h0 = ld_u32_a2(qh), h1 = ld_u32_a2(qh + 4);
        const float d = __fmul_rn(h2f(ld<uint16_t>(blk + 208)),
                                  static_cast<float>(static_cast<int8_t>(__ldg(blk + 192 + 8 * c + l / 16 + 2 * qq))));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int a = static_cast<int>(((byte_of(l0, i) >> lshift) & 0xF) | (((byte_of(h0, i) >> hshift) & 3) << 4));
            const int b = static_cast<int>(((byte_of(l1, i) >> lshift) & 0xF) | (((byte_of(h1, i) >> hshift) & 3) << 4));
            v[i] = __fmul_rn(d, static_cast<float>(a - 32));
            v[i + 4] = __fmul_rn(d, static_cast<float>(b - 32));
        }
    } else if constexpr (T == GgmlType::Q5_0) {
        load8_q5_0(row, e, v);
    } else if constexpr (T == GgmlType::Q5_K) {
        load8_q5_K(row, e, v);
    } else if constexpr (T == GgmlType::Q3_K) {
        load8_q3_K(row, e, v);
    } else if constexpr (T == GgmlType::Q2_K) {
        load8_q2_K(row, e, v);
    } else if constexpr (kLoad8More<T>) {
        load8_more<T>(row, e, v);
    } else if constexpr (kLoad8Iq<T>) {
        load8_iq<T>(row, e, v);
    }
}

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kTileThreads = 256;

// grid: (ceil(n_out / 64), ceil(m / 64)). Thread (ty, tx) of 16×16 computes X rows m0 + 4ty + i
// against W rows n0 + 4tx + j. Shared tiles are stored k-major so the inner loop reads float4s.
template <GgmlType T>
__global__ void __launch_bounds__(kTileThreads)
    tiled_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t n_out, int64_t k,
                 const float* __restrict__ x, int64_t m, float* __restrict__ y) {
    __shared__ __align__(16) float xs[kTileK][kTileM + 4];
    __shared__ __align__(16) float ws[kTileK][kTileN + 4];
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;
    const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN, m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
    const int lr = t / 4, seg = t % 4;  // loader: tile row lr, elements 8·seg..8·seg+7 of the k step
    const bool x_ok = m0 + lr < m, w_ok = n0 + lr < n_out;
    const float* xrow = x + (m0 + lr) * k;
    const uint8_t* wrow = w + static_cast<size_t>(n0 + lr) * row_bytes;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
        const int64_t e = k0 + 8 * seg;
        float xv[8] = {}, wv[8] = {};
        if (x_ok && e < k) {
            const float4 a = *reinterpret_cast<const float4*>(xrow + e);
            const float4 b = *reinterpret_cast<const float4*>(xrow + e + 4);
            xv[0] = a.x, xv[1] = a.y, xv[2] = a.z, xv[3] = a.w, xv[4] = b.x, xv[5] = b.y, xv[6] = b.z, xv[7] = b.w;
        }
        if (w_ok && e < k) load8<T>(wrow, e, wv);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            xs[8 * seg + i][lr] = xv[i];
            ws[8 * seg + i][lr] = wv[i];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk) {
            const float4 a = *reinterpret_cast<const float4*>(&xs[kk][4 * ty]);
            const float4 b = *reinterpret_cast<const float4*>(&ws[kk][4 * tx]);
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int64_t mr = m0 + 4 * ty + i;
        if (mr >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int64_t nc = n0 + 4 * tx + j;
            if (nc < n_out) y[mr * n_out + nc] = acc[i][j];
        }
    }
}

// Up to kDequantGroup matrices dequantized in one launch (a kernel parameter: no upload).
constexpr int kDequantGroup = kBlasMaxGroup;
struct MatList {
    const uint8_t* w[kDequantGroup];
};

struct alignas(16) Half8 {
    uint16_t h[8];
};

// The cuBLAS path's f16 form of quantized W (MOEMESH_CUDA_BLAS_TYPE=f16, the default): W·kHalfScale
// and X/kHalfScale in f16, so that the product is X·Wᵀ exactly as scaled (a power of 2) while f16's
// range, ±65504, covers |X| up to ~1M (activations, e.g. a SwiGLU output before the down projection,
// can exceed 65504) and |W| up to 4094; what is still beyond saturates at ±65504 rather than
// becoming inf. Values near 0 lose nothing that matters: f16's subnormals keep absolute steps of
// 2^-24 · 16, far below the rounding of the row's large values.
constexpr float kHalfScale = 16.0f;
__device__ __forceinline__ uint16_t f16_saturated(float v) {
    return __half_as_ushort(__float2half_rn(fminf(fmaxf(v, -65504.0f), 65504.0f)));
}

// grid (·, n matrices), one thread per 8 elements: y[j][r, e..e+7] = load8(row r of mats.w[j], e),
// y[j] = y + j · rows · k; kHalf: as f16 of the values times kHalfScale.
template <GgmlType T, bool kHalf>
__global__ void dequantize_kernel(MatList mats, size_t row_bytes, int64_t rows, int64_t k, void* __restrict__ y) {
    const int64_t per_row = k / 8;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= rows * per_row) return;
    const int64_t r = idx / per_row, e = (idx % per_row) * 8;
    float v[8];
    load8<T>(mats.w[blockIdx.y] + static_cast<size_t>(r) * row_bytes, e, v);
    const int64_t at = blockIdx.y * rows * k + r * k + e;
    if constexpr (kHalf) {
        Half8 o;
#pragma unroll
        for (int i = 0; i < 8; ++i) o.h[i] = f16_saturated(v[i] * kHalfScale);
        *reinterpret_cast<Half8*>(static_cast<uint16_t*>(y) + at) = o;
    } else {
        float4* out = reinterpret_cast<float4*>(static_cast<float*>(y) + at);
        out[0] = make_float4(v[0], v[1], v[2], v[3]);
        out[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

// y[j] = the rows × k matrix mats.w[j] dequantized, for j < n: f32, or (half) f16 times kHalfScale.
template <GgmlType T>
void dequantize_mats(const MatList& mats, int n, int64_t rows, int64_t k, void* y, bool half, cudaStream_t stream) {
    constexpr int kThreads = 256;
    const dim3 grid(grid_1d(rows * (k / 8), kThreads), static_cast<unsigned>(n));
    if (half)
        MM_LAUNCH(grid, kThreads, 0, stream, dequantize_kernel<T, true>)(mats, ggml_row_bytes(T, k), rows, k, y);
    else
        MM_LAUNCH(grid, kThreads, 0, stream, dequantize_kernel<T, false>)(mats, ggml_row_bytes(T, k), rows, k, y);
    CUDA_CHECK_LAUNCH();
}

template <GgmlType T>
void dequantize_typed(const void* w, int64_t rows, int64_t k, float* y, cudaStream_t stream) {
    MatList one{};
    one.w[0] = static_cast<const uint8_t*>(w);
    dequantize_mats<T>(one, 1, rows, k, y, false, stream);
}

// ---- matmul's cuBLAS path (prompts; kernels/cuda/blas.cpp) ----
// F32 W: used as stored, f32 X, exact f32 products (CUBLAS_COMPUTE_32F). F16 / BF16 W: as stored, X
// rounded to W's type first (as the CPU does). The quantized types: W dequantized in chunks, either
// (MOEMESH_CUDA_BLAS_TYPE=f16, the default since session 20) to f16 with X in f16, both scaled by
// kHalfScale against f16's range — the form of llama.cpp's cuBLAS path, half the scratch bytes of
// f32 and twice TF32's tensor-core rate —, or (=tf32) to f32 with f32 X on the TF32 tensor cores
// (CUBLAS_COMPUTE_32F_FAST_TF32). Both round operands to 10-bit mantissas and sum in f32. (bf16 X
// was measured too coarse against the CPU: a q8_0 Qwen3-Next test model's top-1 agreement fell
// from 97-98 to 89 of 100 prompt positions on the emulator.)
template <GgmlType T>
inline constexpr bool kBlasAsStored = T == GgmlType::F32 || T == GgmlType::F16 || T == GgmlType::BF16;

// How a call's operands reach cuBLAS for W type T under settings s.
struct BlasForm {
    BlasElem elem;  // the GEMM's operand type
    size_t w_elem;  // bytes per element of dequantized W in the scratch (0: W as stored)
    size_t x_elem;  // bytes per element of rounded X in the scratch (0: f32 X as is)
    bool x_scaled;  // X divided by kHalfScale with saturation (quantized W in f16)
};
template <GgmlType T>
BlasForm blas_form(const BlasSettings& s) {
    if constexpr (T == GgmlType::F32) return {BlasElem::F32, 0, 0, false};
    else if constexpr (T == GgmlType::F16) return {BlasElem::F16, 0, 2, false};
    else if constexpr (T == GgmlType::BF16) return {BlasElem::BF16, 0, 2, false};
    else return s.half ? BlasForm{BlasElem::F16, 2, 2, true} : BlasForm{BlasElem::TF32, 4, 0, false};
}

// y[i] = x[i] rounded to 16 bits, 8 per thread (n8 groups of 8): kMode 0 bf16, 1 f16 (as the CPU
// rounds X for F16 W), 2 f16 of x / kHalfScale, saturated (quantized W's f16 form).
template <int kMode>
__global__ void round_x_kernel(const float* __restrict__ x, int64_t n8, Half8* __restrict__ y) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= n8) return;
    Half8 o;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float v = x[idx * 8 + i];
        if constexpr (kMode == 0) o.h[i] = __bfloat16_as_ushort(__float2bfloat16(v));
        else if constexpr (kMode == 1) o.h[i] = __half_as_ushort(__float2half_rn(v));
        else o.h[i] = f16_saturated(v * (1.0f / kHalfScale));
    }
    y[idx] = o;
}

// blas_gemm_grouped's pointer array [A_j | B_j | C_j] (3n ≤ 3 · kBlasMaxGroup entries), written on the
// stream by one small launch (from a kernel parameter) rather than a host copy.
struct GemmPtrs {
    const void* p[3 * kBlasMaxGroup];
};
__global__ void gemm_ptrs_kernel(GemmPtrs src, int n, const void** dst) {
    if (static_cast<int>(threadIdx.x) < n) dst[threadIdx.x] = src.p[threadIdx.x];
}

// X [m, k] as the cuBLAS path of W type T reads it in form f: rounded into b's X scratch, or x.
template <GgmlType T>
const void* round_x(BlasStream* b, const float* x, int64_t m, int64_t k, const BlasForm& f, cudaStream_t stream) {
    if (f.x_elem == 0) return x;
    constexpr int kThreads = 256;
    const int64_t n8 = m * k / 8;
    auto* xh = static_cast<Half8*>(blas_x(b));
    const unsigned grid = grid_1d(n8, kThreads);
    if (f.x_scaled) MM_LAUNCH(grid, kThreads, 0, stream, round_x_kernel<2>)(x, n8, xh);
    else if (T == GgmlType::BF16) MM_LAUNCH(grid, kThreads, 0, stream, round_x_kernel<0>)(x, n8, xh);
    else MM_LAUNCH(grid, kThreads, 0, stream, round_x_kernel<1>)(x, n8, xh);
    CUDA_CHECK_LAUNCH();
    return xh;
}

// Y = X · Wᵀ through cuBLAS (the forms above), quantized W in chunks of rows of at most the chunk
// cap. False, launching nothing that writes Y, where the path is off or cuBLAS or its scratch is not
// there; false after a chunk where cuBLAS refused one (the caller's kernel then writes all of Y).
template <GgmlType T>
bool matmul_blas(const void* w, int64_t n_out, int64_t k, const float* x, int64_t m, float* y, cudaStream_t stream) {
    const BlasSettings set = blas_settings();
    if (!set.on || m < set.min_rows || m > INT32_MAX || n_out > INT32_MAX || k > INT32_MAX) return false;
    const BlasForm f = blas_form<T>(set);
    const size_t rb = ggml_row_bytes(T, k);
    int64_t chunk = n_out;
    if (f.w_elem != 0) {
        chunk = std::max<int64_t>(1, static_cast<int64_t>(set.chunk_bytes / (static_cast<size_t>(k) * f.w_elem)));
        if (chunk >= 256) chunk -= chunk % 256;
        chunk = std::min(chunk, n_out);
    }
    const size_t w_bytes = static_cast<size_t>(chunk) * k * f.w_elem;
    BlasStream* b = blas_stream(stream, w_bytes, static_cast<size_t>(m) * k * f.x_elem);
    if (b == nullptr) return false;
    const void* xb = round_x<T>(b, x, m, k, f, stream);
    for (int64_t r0 = 0; r0 < n_out; r0 += chunk) {
        const int64_t rows = std::min(chunk, n_out - r0);
        const void* a = static_cast<const uint8_t*>(w) + static_cast<size_t>(r0) * rb;
        if (f.w_elem != 0) {
            MatList one{};
            one.w[0] = static_cast<const uint8_t*>(a);
            dequantize_mats<T>(one, 1, rows, k, blas_w(b), f.w_elem == 2, stream);
            a = blas_w(b);
        }
        if (!blas_gemm(b, rows, m, k, a, xb, f.elem, y + r0, n_out)) return false;
    }
    return true;
}

// ---------------------------------------------------------------------------------------------

// Which GEMV runs for the int8-X types (kHasQGemv; MOEMESH_CUDA_GEMV, read once per process):
//   unset / "auto": the int8-X kernel when m >= 2 or the call has at least kQGemvMinRows rows (n_out · n_sel): lm_head, batched decode. Small single GEMVs (experts,
//     attention) stay on the f32 kernel, which measured 0–25% faster there (H200, bench_cuda_gemv:
//     both are at the ~9–12 µs floor of an event-timed launch; the int8 kernel adds the X
//     quantization before its first dot product). Q4_K's int8 path (min term from the quantized
//     x sums, as llama.cpp) passed on an H200: 5.4e-3 vs the exact product, test_cuda_model 11/11.
//     Q5_0, Q5_K, Q3_K and Q2_K follow the same rule (not yet run on a device).
//   "new": the int8-X kernel for those types at every size (smem permitting).
//   "old": the f32 kernel for every type.
enum class GemvMode { kAuto, kNew, kOld };
GemvMode gemv_mode() {
    static const GemvMode mode = [] {
        const char* e = std::getenv("MOEMESH_CUDA_GEMV");
        if (e != nullptr && std::strcmp(e, "old") == 0) return GemvMode::kOld;
        if (e != nullptr && std::strcmp(e, "new") == 0) return GemvMode::kNew;
        return GemvMode::kAuto;
    }();
    return mode;
}
constexpr int64_t kQGemvMinRows = 16384;
template <GgmlType T>
bool use_qgemv(int m, int64_t rows) {
    switch (gemv_mode()) {
        case GemvMode::kOld: return false;
        case GemvMode::kNew: return true;
        default: return m >= 2 || rows >= kQGemvMinRows;
    }
}

struct DeviceInfo {
    int sms = 0;
    size_t smem_per_sm = 0;
};
// SM count and shared memory per SM of the current device (cached per device id).
DeviceInfo device_info() {
    static DeviceInfo cached[64];
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    if (dev < 0 || dev >= 64) return {132, 228 * 1024};
    DeviceInfo& d = cached[dev];
    if (d.sms == 0) {
        int sms = 0, smem = 0;
        CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
        d.smem_per_sm = static_cast<size_t>(smem);
        d.sms = sms;
    }
    return d;
}

// Larger X (M · k > ~35k elements) falls back to the f32-activation kernel.
constexpr size_t kQGemvMaxSmem = 48 * 1024;

// Whether a GEMV of M X rows over `rows` W rows (n_out · n_sel) takes the int8-X kernel; the fused
// f32-X kernels (gemv_swiglu_kernel, gemv_multi_kernel) decline where it does, to keep its bits.
template <GgmlType T>
bool takes_qgemv(int m, int64_t k, int64_t rows) {
    if constexpr (kHasQGemv<T>) return qgemv_smem(m, k) <= kQGemvMaxSmem && use_qgemv<T>(m, rows);
    return false;
}

// The in-block int8-X GEMV (gemv_q_kernel; where takes_qgemv), with its last block's tail (QTail;
// M == 1) when tail.counter is set.
template <GgmlType T, int M>
void launch_gemv_q(const void* w, size_t matrix_bytes, const int32_t* ids, int64_t n_sel, int64_t n_out, int64_t k,
                   const float* x, int64_t x_stride, float* y, cudaStream_t stream, const QTail& tail = {}) {
    if constexpr (kHasQGemv<T>) {
        MM_CHECK(tail.counter == nullptr || M == 1);
        MM_CHECK(tail.nw == nullptr || n_out <= kRowRegs * kRowThreads);
        const size_t smem = qgemv_smem(M, k);
        // One wave: as many blocks as are resident at once (registers, threads, shared memory)
        // over all selections.
        static const int per_sm_regs = [] {
            int b1 = 0, b2 = 0;
            CUDA_CHECK(
                cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b1, gemv_q_kernel<T, M, 1>, kGemvQWarps * kWarp, 0));
            CUDA_CHECK(
                cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b2, gemv_q_kernel<T, M, 2>, kGemvQWarps * kWarp, 0));
            return std::max(1, std::min(b1, b2));
        }();
        const DeviceInfo dev = device_info();
        const int per_sm = std::max(1, std::min(per_sm_regs, static_cast<int>(dev.smem_per_sm / (smem + 1024))));
        const int64_t warps_wanted = static_cast<int64_t>(dev.sms) * per_sm * kGemvQWarps;
        const int64_t total_rows = n_out * n_sel;
        const int rpw = static_cast<int>(std::max<int64_t>(1, (total_rows + warps_wanted - 1) / warps_wanted));
        const dim3 grid(grid_1d(n_out, kGemvQWarps * rpw), static_cast<unsigned>(n_sel));
        const auto* wb = static_cast<const uint8_t*>(w);
        const size_t rb = ggml_row_bytes(T, k);
        if (rpw >= 2)
            MM_LAUNCH_PDL(grid, kGemvQWarps * kWarp, smem, stream, gemv_q_kernel<T, M, 2>)(
                wb, matrix_bytes, rb, ids, n_out, k, x, x_stride, y, rpw, tail);
        else
            MM_LAUNCH_PDL(grid, kGemvQWarps * kWarp, smem, stream, gemv_q_kernel<T, M, 1>)(
                wb, matrix_bytes, rb, ids, n_out, k, x, x_stride, y, rpw, tail);
        CUDA_CHECK_LAUNCH();
    }
}

template <GgmlType T, int M>
void launch_gemv(const void* w, size_t matrix_bytes, const int32_t* ids, int64_t n_sel, int64_t n_out, int64_t k,
                 const float* x, int64_t x_stride, float* y, cudaStream_t stream) {
    if constexpr (kHasQGemv<T>) {
        if (takes_qgemv<T>(M, k, n_out * n_sel)) {
            launch_gemv_q<T, M>(w, matrix_bytes, ids, n_sel, n_out, k, x, x_stride, y, stream);
            return;
        }
    }
    const dim3 grid(grid_1d(n_out, kGemvWarps * kGemvRows<T, M>), static_cast<unsigned>(n_sel));
    const MatSel sel{static_cast<const uint8_t*>(w), matrix_bytes, ids, nullptr};
    MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_kernel<T, M>)(sel, ggml_row_bytes(T, k), n_out, k, x,
                                                                        x_stride, y);
    CUDA_CHECK_LAUNCH();
}

template <GgmlType T>
void matmul_own(const void* w, int64_t n_out, int64_t k, const float* x, int64_t m, float* y, cudaStream_t stream);

template <GgmlType T>
void matmul_typed(const void* w, int64_t n_out, int64_t k, const float* x, int64_t m, float* y, cudaStream_t stream) {
    if (m > 1 && matmul_blas<T>(w, n_out, k, x, m, y, stream)) return;
    matmul_own<T>(w, n_out, k, x, m, y, stream);
}

// matmul_grouped for type T: X rounded once for all groups, the cuBLAS groups' W dequantized up to
// kDequantGroup matrices per launch (as many as the chunk cap holds), and those groups' products in
// one cublasGemmGroupedBatchedEx (where the library has it and MOEMESH_CUDA_BLAS_GROUPED is not 0;
// else one cublasGemmEx each); the others (fewer rows than MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS, 33 by
// default, a matrix over the chunk cap, cuBLAS not there) by matmul.
template <GgmlType T>
void matmul_grouped_typed(const void* const* w, const int64_t* count, const int64_t* offset, int64_t G,
                          int64_t n_out, int64_t k, const float* x, float* y, cudaStream_t stream) {
    const BlasSettings set = blas_settings();
    const BlasForm f = blas_form<T>(set);
    const size_t mat_bytes = static_cast<size_t>(n_out) * k * f.w_elem;
    std::vector<int64_t> big;  // groups for cuBLAS
    int64_t rows = 0;          // X rows to round: up to the last cuBLAS group's end
    const bool fits = mat_bytes <= set.chunk_bytes;  // one dequantized matrix (else matmul's row chunks)
    if (set.on && fits && n_out <= INT32_MAX && k <= INT32_MAX)
        for (int64_t g = 0; g < G; ++g)
            if (count[g] >= set.grouped_min_rows && count[g] <= INT32_MAX) {
                big.push_back(g);
                rows = std::max(rows, offset[g] + count[g]);
            }
    const int64_t fit = static_cast<int64_t>(set.chunk_bytes / std::max<size_t>(mat_bytes, 1));  // matrices per chunk
    const int64_t per = f.w_elem == 0 ? kDequantGroup : std::clamp<int64_t>(fit, 1, kDequantGroup);
    const size_t w_bytes = mat_bytes * static_cast<size_t>(std::min<int64_t>(per, static_cast<int64_t>(big.size())));
    BlasStream* b = big.empty() ? nullptr : blas_stream(stream, w_bytes, static_cast<size_t>(rows) * k * f.x_elem);
    std::vector<char> done(static_cast<size_t>(G), 0);
    if (b != nullptr) {
        const auto* xb = static_cast<const uint8_t*>(round_x<T>(b, x, rows, k, f, stream));
        const size_t x_row = static_cast<size_t>(k) * (f.x_elem == 0 ? sizeof(float) : f.x_elem);
        bool ok = true;
        for (size_t i0 = 0; i0 < big.size() && ok; i0 += static_cast<size_t>(per)) {
            const size_t n = std::min(big.size() - i0, static_cast<size_t>(per));
            if (f.w_elem != 0) {
                MatList mats{};
                for (size_t j = 0; j < n; ++j) mats.w[j] = static_cast<const uint8_t*>(w[big[i0 + j]]);
                dequantize_mats<T>(mats, static_cast<int>(n), n_out, k, blas_w(b), f.w_elem == 2, stream);
            }
            auto a_of = [&](size_t j) -> const void* {
                return f.w_elem == 0 ? w[big[i0 + j]] : static_cast<const uint8_t*>(blas_w(b)) + j * mat_bytes;
            };
            if (set.grouped && n > 1) {  // one cublasGemmGroupedBatchedEx for the batch
                GemmPtrs gp{};
                int rows_of[kBlasMaxGroup];
                for (size_t j = 0; j < n; ++j) {
                    const int64_t g = big[i0 + j];
                    gp.p[j] = a_of(j);
                    gp.p[n + j] = xb + offset[g] * x_row;
                    gp.p[2 * n + j] = y + offset[g] * n_out;
                    rows_of[j] = static_cast<int>(count[g]);
                }
                auto* dp = static_cast<const void**>(blas_ptrs(b));
                MM_LAUNCH(1, 3 * kBlasMaxGroup, 0, stream, gemm_ptrs_kernel)(gp, static_cast<int>(3 * n), dp);
                CUDA_CHECK_LAUNCH();
                if (blas_gemm_grouped(b, static_cast<int>(n), n_out, rows_of, k, dp, f.elem, n_out)) {
                    for (size_t j = 0; j < n; ++j) done[static_cast<size_t>(big[i0 + j])] = 1;
                    continue;
                }
            }
            for (size_t j = 0; j < n && ok; ++j) {  // one cublasGemmEx each
                const int64_t g = big[i0 + j];
                ok = blas_gemm(b, n_out, count[g], k, a_of(j), xb + offset[g] * x_row, f.elem,
                               y + offset[g] * n_out, n_out);
                done[static_cast<size_t>(g)] = ok;
            }
        }
    }
    // (Stream order keeps the GEMMs above reading their scratch before matmul's own cuBLAS path reuses it.)
    for (int64_t g = 0; g < G; ++g)
        if (count[g] > 0 && !done[static_cast<size_t>(g)])
            matmul_typed<T>(w[g], n_out, k, x + offset[g] * k, count[g], y + offset[g] * n_out, stream);
}

// f(std::integral_constant<GgmlType, T>{}) for every type matmul takes.
template <typename F>
void with_matmul_type(GgmlType wt, F&& f) {
#define MM_TYPE(T) \
    case T: return f(std::integral_constant<GgmlType, T>{})
    switch (wt) {
        MM_TYPE(GgmlType::F32); MM_TYPE(GgmlType::F16); MM_TYPE(GgmlType::BF16); MM_TYPE(GgmlType::Q8_0);
        MM_TYPE(GgmlType::Q4_0); MM_TYPE(GgmlType::Q4_K); MM_TYPE(GgmlType::Q6_K); MM_TYPE(GgmlType::Q5_0);
        MM_TYPE(GgmlType::Q5_K); MM_TYPE(GgmlType::Q3_K); MM_TYPE(GgmlType::Q2_K); MM_TYPE(GgmlType::Q4_1);
        MM_TYPE(GgmlType::Q5_1); MM_TYPE(GgmlType::IQ4_NL); MM_TYPE(GgmlType::IQ4_XS); MM_TYPE(GgmlType::MXFP4);
        MM_TYPE(GgmlType::IQ2_XXS); MM_TYPE(GgmlType::IQ2_XS); MM_TYPE(GgmlType::IQ2_S); MM_TYPE(GgmlType::IQ3_XXS);
        MM_TYPE(GgmlType::IQ3_S); MM_TYPE(GgmlType::IQ1_S); MM_TYPE(GgmlType::IQ1_M);
        default: MM_CHECK(false && "cuda: weight type not supported by matmul");
    }
#undef MM_TYPE
}

// The GEMV chunks (m <= kMatmulGemvMaxM) or the tiled kernel: matmul without cuBLAS.
template <GgmlType T>
void matmul_own(const void* w, int64_t n_out, int64_t k, const float* x, int64_t m, float* y, cudaStream_t stream) {
    if (m > kMatmulGemvMaxM) {
        const dim3 grid(grid_1d(n_out, kTileN), grid_1d(m, kTileM));
        MM_LAUNCH(grid, kTileThreads, 0, stream, tiled_kernel<T>)(static_cast<const uint8_t*>(w), ggml_row_bytes(T, k),
                                                           n_out, k, x, m, y);
        CUDA_CHECK_LAUNCH();
        return;
    }
    // Row chunks of 8, 4, 2, 1: W is read once per chunk.
    static_assert(kGemvMaxM == 8);
    for (int64_t r0 = 0; r0 < m;) {
        const int64_t left = m - r0;
        const float* xr = x + r0 * k;
        float* yr = y + r0 * n_out;
        if (left >= kGemvMaxM) {
            launch_gemv<T, kGemvMaxM>(w, 0, nullptr, 1, n_out, k, xr, 0, yr, stream);
            r0 += kGemvMaxM;
        } else if (left >= 4) {
            launch_gemv<T, 4>(w, 0, nullptr, 1, n_out, k, xr, 0, yr, stream);
            r0 += 4;
        } else if (left >= 2) {
            launch_gemv<T, 2>(w, 0, nullptr, 1, n_out, k, xr, 0, yr, stream);
            r0 += 2;
        } else {
            launch_gemv<T, 1>(w, 0, nullptr, 1, n_out, k, xr, 0, yr, stream);
            r0 += 1;
        }
    }
}

void check_shape(GgmlType wt, int64_t k) {
    MM_CHECK(matmul_supported(wt));
    const int64_t blk = ggml_type_info(wt).block_size;
    MM_CHECK(k > 0 && k % blk == 0 && k % 8 == 0);
}

// What this file's kernels read of the kernel switches (kernel_switches_seen).
__global__ void switches_probe_kernel(unsigned* out) { *out = switches(); }

}  // namespace

unsigned kernel_switches_seen() {
    unsigned* d = nullptr;
    CUDA_CHECK(cudaMalloc(&d, sizeof(unsigned)));
    MM_LAUNCH(1, 1, 0, nullptr, switches_probe_kernel)(d);
    CUDA_CHECK_LAUNCH();
    unsigned v = 0;
    CUDA_CHECK(cudaMemcpy(&v, d, sizeof v, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaFree(d));
    return v;
}

bool matmul_supported(GgmlType wt) {
    switch (wt) {
        case GgmlType::F32:
        case GgmlType::F16:
        case GgmlType::BF16:
        case GgmlType::Q8_0:
        case GgmlType::Q4_0:
        case GgmlType::Q4_K:
        case GgmlType::Q6_K:
        case GgmlType::Q5_0:
        case GgmlType::Q5_K:
        case GgmlType::Q3_K:
        case GgmlType::Q2_K:
        case GgmlType::Q4_1:
        case GgmlType::Q5_1:
        case GgmlType::IQ4_NL:
        case GgmlType::IQ4_XS:
        case GgmlType::MXFP4:
            return true;
        default:
            return quants::is_iq_lowbit(wt);
    }
}

bool matmul_route_takes(GgmlType wt, int64_t E, int64_t k, int64_t K) {
    return (wt == GgmlType::F32 || wt == GgmlType::F16 || wt == GgmlType::BF16) && k > 0 && k % 8 == 0 && E > 0 &&
           E <= kRouterMaxExperts && K > 0 && K <= kRouterMaxTopk && K <= E;
}

bool matmul_route(GgmlType wt, const void* w, int64_t E, int64_t k, const float* x, int64_t K, bool norm_topk,
                  float* probs, int32_t* ids, float* weights, unsigned* counter, cudaStream_t stream) {
    if (!matmul_route_takes(wt, E, k, K)) return false;
    const unsigned grid = grid_1d(E, kGemvWarps);
    const auto* wb = static_cast<const uint8_t*>(w);
    const size_t rb = ggml_row_bytes(wt, k);
    const int kk = static_cast<int>(K);
    if (wt == GgmlType::F32)
        MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_route_kernel<GgmlType::F32>)(
            wb, rb, E, k, x, probs, kk, norm_topk, ids, weights, counter);
    else if (wt == GgmlType::F16)
        MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_route_kernel<GgmlType::F16>)(
            wb, rb, E, k, x, probs, kk, norm_topk, ids, weights, counter);
    else
        MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_route_kernel<GgmlType::BF16>)(
            wb, rb, E, k, x, probs, kk, norm_topk, ids, weights, counter);
    CUDA_CHECK_LAUNCH();
    return true;
}

void matmul(GgmlType wt, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m, float* y,
            cudaStream_t stream) {
    check_shape(wt, k);
    if (m <= 0 || n_out <= 0) return;
    with_matmul_type(wt, [&](auto t) { matmul_typed<decltype(t)::value>(w, n_out, k, x, m, y, stream); });
}

void matmul_grouped(GgmlType wt, const void* const* w, const int64_t* count, const int64_t* offset, int64_t groups,
                    int64_t n_out, int64_t k, const float* x, float* y, cudaStream_t stream) {
    check_shape(wt, k);
    if (groups <= 0 || n_out <= 0) return;
    with_matmul_type(wt, [&](auto t) {
        matmul_grouped_typed<decltype(t)::value>(w, count, offset, groups, n_out, k, x, y, stream);
    });
}

void matmul_id(GgmlType wt, const void* w, size_t matrix_bytes, const int32_t* ids, int64_t n_sel, int64_t n_out,
               int64_t k, const float* x, int64_t x_stride, float* y, cudaStream_t stream) {
    check_shape(wt, k);
    MM_CHECK(ids != nullptr && n_sel < 65536);
    if (n_sel <= 0 || n_out <= 0) return;
#define MM_GEMV_ID(T) launch_gemv<T, 1>(w, matrix_bytes, ids, n_sel, n_out, k, x, x_stride, y, stream)
    switch (wt) {
        case GgmlType::F32: MM_GEMV_ID(GgmlType::F32); break;
        case GgmlType::F16: MM_GEMV_ID(GgmlType::F16); break;
        case GgmlType::BF16: MM_GEMV_ID(GgmlType::BF16); break;
        case GgmlType::Q8_0: MM_GEMV_ID(GgmlType::Q8_0); break;
        case GgmlType::Q4_0: MM_GEMV_ID(GgmlType::Q4_0); break;
        case GgmlType::Q4_K: MM_GEMV_ID(GgmlType::Q4_K); break;
        case GgmlType::Q6_K: MM_GEMV_ID(GgmlType::Q6_K); break;
        case GgmlType::Q5_0: MM_GEMV_ID(GgmlType::Q5_0); break;
        case GgmlType::Q5_K: MM_GEMV_ID(GgmlType::Q5_K); break;
        case GgmlType::Q3_K: MM_GEMV_ID(GgmlType::Q3_K); break;
        case GgmlType::Q2_K: MM_GEMV_ID(GgmlType::Q2_K); break;
        case GgmlType::Q4_1: MM_GEMV_ID(GgmlType::Q4_1); break;
        case GgmlType::Q5_1: MM_GEMV_ID(GgmlType::Q5_1); break;
        case GgmlType::IQ4_NL: MM_GEMV_ID(GgmlType::IQ4_NL); break;
        case GgmlType::IQ4_XS: MM_GEMV_ID(GgmlType::IQ4_XS); break;
        case GgmlType::MXFP4: MM_GEMV_ID(GgmlType::MXFP4); break;
        case GgmlType::IQ2_XXS: MM_GEMV_ID(GgmlType::IQ2_XXS); break;
        case GgmlType::IQ2_XS: MM_GEMV_ID(GgmlType::IQ2_XS); break;
        case GgmlType::IQ2_S: MM_GEMV_ID(GgmlType::IQ2_S); break;
        case GgmlType::IQ3_XXS: MM_GEMV_ID(GgmlType::IQ3_XXS); break;
        case GgmlType::IQ3_S: MM_GEMV_ID(GgmlType::IQ3_S); break;
        case GgmlType::IQ1_S: MM_GEMV_ID(GgmlType::IQ1_S); break;
        case GgmlType::IQ1_M: MM_GEMV_ID(GgmlType::IQ1_M); break;
        default: MM_CHECK(false && "cuda::matmul_id: weight type not supported");
    }
#undef MM_GEMV_ID
}

namespace {
// The quantized-X launches: false (nothing launched) where the type has no int8-X GEMV, k is not a
// multiple of 256 (qx_view's layout for every type) or the f32-X GEMV would not run (then the
// in-block int8-X kernel runs on f32 X, as without qx).
template <GgmlType T>
bool qx_ok(int64_t k, int64_t rows) {
    return kHasQGemv<T> && k % 256 == 0 && !takes_qgemv<T>(1, k, rows);
}
template <GgmlType T>
bool launch_qx(const void* w, int64_t n_out, int64_t k, const uint8_t* qx, float* y, cudaStream_t stream) {
    if constexpr (kHasQGemv<T>) {
        if (!qx_ok<T>(k, n_out)) return false;
        const dim3 grid(grid_1d(n_out, kGemvWarps * kGemvRows<T, 1>), 1);
        const MatSel sel{static_cast<const uint8_t*>(w), 0, nullptr, nullptr};
        MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_qx_kernel<T>)(sel, ggml_row_bytes(T, k), n_out, k, qx, y);
        CUDA_CHECK_LAUNCH();
        return true;
    }
    return false;
}

template <GgmlType T>
bool launch_qx_add_rmsnorm(const void* w, int64_t n_out, int64_t k, const uint8_t* qx, float* t, float* x,
                           const float* nw, float* y, float eps, uint8_t* qy, unsigned* counter, cudaStream_t stream) {
    if constexpr (kHasQGemv<T>) {
        if (!qx_ok<T>(k, n_out) || !qx_norm_ok(n_out)) return false;
        const unsigned grid = grid_1d(n_out, (kRowThreads / kWarp) * kGemvRows<T, 1>);
        MM_LAUNCH_PDL(grid, kRowThreads, 0, stream, gemv_qx_add_rmsnorm_kernel<T>)(
            static_cast<const uint8_t*>(w), ggml_row_bytes(T, k), n_out, k, qx, t, x, nw, y, eps, qy, counter);
        CUDA_CHECK_LAUNCH();
        return true;
    }
    return false;
}

template <GgmlType T>
bool launch_gemv_swiglu(const void* gate, const void* up, size_t matrix_bytes, const int32_t* ids, int64_t n_sel,
                        int64_t n_out, int64_t k, const float* x, int64_t x_stride, float* y, const uint8_t* qx,
                        cudaStream_t stream, NextMats next) {
    if (takes_qgemv<T>(1, k, n_out * n_sel)) return false;
    const dim3 grid(grid_1d(n_out, kGemvWarps), static_cast<unsigned>(n_sel));
    const MatSel g{static_cast<const uint8_t*>(gate), matrix_bytes, ids, nullptr};
    const MatSel u{static_cast<const uint8_t*>(up), matrix_bytes, ids, nullptr};
    if constexpr (kHasQGemv<T>) {
        if (qx && qx_ok<T>(k, n_out * n_sel)) {
            MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_swiglu_qx_kernel<T>)(g, u, ggml_row_bytes(T, k),
                                                                                       n_out, k, qx, y, next);
            CUDA_CHECK_LAUNCH();
            return true;
        }
    }
    MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_swiglu_kernel<T>)(g, u, ggml_row_bytes(T, k), n_out, k, x,
                                                                            x_stride, y, next);
    CUDA_CHECK_LAUNCH();
    return true;
}

template <GgmlType T>
bool launch_gemv_multi(int n, const void* const* w, const int64_t* n_out, int64_t k, const float* x, float* const* y,
                       const uint8_t* qx, cudaStream_t stream, const QkvRope* rope) {
    RopeTail rt;
    if (rope != nullptr) {  // (QkvRope's conditions; whole blocks per head)
        const int64_t D = rope->head_dim;
        if (n != 3 || D != kGemvWarps * kWarp || D % (kGemvWarps * kGemvRows<T, 1>) != 0 || rope->q_norm == nullptr ||
            rope->k_norm == nullptr || rope->counters == nullptr || rope->rot_dim <= 0 || rope->rot_dim % 2 != 0 ||
            rope->rot_dim > D || n_out[0] != rope->n_head * D || n_out[1] != rope->n_head_kv * D ||
            n_out[2] != rope->n_head_kv * D)
            return false;
        rt.counters = rope->counters, rt.qw = rope->q_norm, rt.kw = rope->k_norm, rt.eps = rope->eps;
        rt.n_head = rope->n_head, rt.n_head_kv = rope->n_head_kv, rt.D = D, rt.half = rope->rot_dim / 2;
        rt.theta_scale = rope_theta_scale(rope->rope, rope->rot_dim), rt.p = rope->rope;
        rt.p0_val = rope->p0, rt.p0_dev = rope->p0_dev, rt.kc = rope->k_cache, rt.vc = rope->v_cache;
        rt.f16 = rope->f16;
    }
    MultiGemv mg{};
    mg.n = n;
    int64_t rows = 0;
    for (int j = 0; j < n; ++j) {
        if (takes_qgemv<T>(1, k, n_out[j])) return false;
        mg.w[j] = static_cast<const uint8_t*>(w[j]);
        mg.y[j] = y[j];
        rows += n_out[j];
        mg.end[j] = rows;
    }
    if (rows <= 0) return true;
    const unsigned grid = grid_1d(rows, kGemvWarps * kGemvRows<T, 1>);
    bool quantized = false;
    if constexpr (kHasQGemv<T>) {
        quantized = qx != nullptr && k % 256 == 0;  // every product passed takes_qgemv above
        if (quantized)
            MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_multi_qx_kernel<T>)(mg, ggml_row_bytes(T, k), k, qx,
                                                                                      rt);
    }
    if (!quantized)
        MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_multi_kernel<T>)(mg, ggml_row_bytes(T, k), k, x, rt);
    CUDA_CHECK_LAUNCH();
    return true;
}

template <GgmlType T>
bool launch_down_combine(const void* down, size_t matrix_bytes, const int32_t* ids, const float* w, int64_t n_sel,
                         int64_t n_out, int64_t k, const float* g, float* out, cudaStream_t stream, float* y,
                         unsigned* counter, const AddNorm* norm) {
    if (takes_qgemv<T>(1, k, n_out * n_sel)) {
        if (y == nullptr || counter == nullptr || (norm != nullptr && !qx_norm_ok(n_out))) return false;
        QTail tail{w, out, counter};
        if (norm != nullptr) {
            tail.rx = norm->x, tail.nw = norm->w, tail.ry = norm->y;
            tail.eps = norm->eps, tail.qy = norm->qy;
        }
        launch_gemv_q<T, 1>(down, matrix_bytes, ids, n_sel, n_out, k, g, k, y, stream, tail);
        return true;
    }
    if (norm != nullptr) return false;
    MM_LAUNCH_PDL(static_cast<unsigned>(n_out), static_cast<unsigned>(n_sel * kWarp), 0, stream,
              gemv_down_combine_kernel<T>)(static_cast<const uint8_t*>(down), matrix_bytes, ggml_row_bytes(T, k), ids,
                                           w, n_out, k, g, out);
    CUDA_CHECK_LAUNCH();
    return true;
}

template <GgmlType T>
bool launch_gemv_ptr(const void* const* w, const void* const* wu, int64_t n_sel, int64_t n_out, int64_t k,
                     const float* x, int64_t x_stride, float* y, cudaStream_t stream, NextMats next = {}) {
    if (takes_qgemv<T>(1, k, n_out)) return false;  // one launch per selection would take the int8-X GEMV
    const size_t rb = ggml_row_bytes(T, k);
    const MatSel sw{nullptr, 0, nullptr, reinterpret_cast<const uint8_t* const*>(w)};
    if (wu != nullptr) {
        const MatSel su{nullptr, 0, nullptr, reinterpret_cast<const uint8_t* const*>(wu)};
        const dim3 grid(grid_1d(n_out, kGemvWarps), static_cast<unsigned>(n_sel));
        MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_swiglu_kernel<T>)(sw, su, rb, n_out, k, x, x_stride, y,
                                                                                next);
    } else {
        const dim3 grid(grid_1d(n_out, kGemvWarps * kGemvRows<T, 1>), static_cast<unsigned>(n_sel));
        MM_LAUNCH_PDL(grid, kGemvWarps * kWarp, 0, stream, gemv_kernel<T, 1>)(sw, rb, n_out, k, x, x_stride, y);
    }
    CUDA_CHECK_LAUNCH();
    return true;
}

// The types with a fused f32-X GEMV: f(std::integral_constant<GgmlType, T>{}) for wt, false for the
// rarer ones (their callers launch the unfused kernels).
template <typename F>
bool with_fused_gemv_type(GgmlType wt, F&& f) {
#define MM_FUSED(T) \
    case T: return f(std::integral_constant<GgmlType, T>{})
    switch (wt) {
        MM_FUSED(GgmlType::F32); MM_FUSED(GgmlType::F16); MM_FUSED(GgmlType::BF16); MM_FUSED(GgmlType::Q8_0);
        MM_FUSED(GgmlType::Q4_0); MM_FUSED(GgmlType::Q4_K); MM_FUSED(GgmlType::Q6_K); MM_FUSED(GgmlType::Q5_0);
        MM_FUSED(GgmlType::Q5_K); MM_FUSED(GgmlType::Q3_K); MM_FUSED(GgmlType::Q2_K); MM_FUSED(GgmlType::IQ4_NL);
        MM_FUSED(GgmlType::IQ4_XS); MM_FUSED(GgmlType::MXFP4);
        default: return false;
    }
#undef MM_FUSED
}
}  // namespace

bool matmul_multi_gemv(GgmlType wt, int n, const void* const* w, const int64_t* n_out, int64_t k, const float* x,
                       float* const* y, cudaStream_t stream, const uint8_t* qx, const QkvRope* rope) {
    check_shape(wt, k);
    if (n < 2 || n > kMultiGemvMax) return false;
    for (int j = 0; j < n; ++j)
        if (n_out[j] < 0) return false;
    return with_fused_gemv_type(
        wt, [&](auto t) { return launch_gemv_multi<decltype(t)::value>(n, w, n_out, k, x, y, qx, stream, rope); });
}

bool matmul_id_swiglu(GgmlType wt, const void* gate, const void* up, size_t matrix_bytes, const int32_t* ids,
                      int64_t n_sel, int64_t n_out, int64_t k, const float* x, int64_t x_stride, float* y,
                      cudaStream_t stream, const uint8_t* qx, const void* next, size_t next_matrix_bytes) {
    check_shape(wt, k);
    MM_CHECK(ids != nullptr && n_sel < 65536);
    if (n_sel <= 0 || n_out <= 0) return true;
    const NextMats nm{next_matrix_bytes ? static_cast<const uint8_t*>(next) : nullptr, next_matrix_bytes};
    return with_fused_gemv_type(wt, [&](auto t) {
        return launch_gemv_swiglu<decltype(t)::value>(gate, up, matrix_bytes, ids, n_sel, n_out, k, x, x_stride, y,
                                                      x_stride == 0 ? qx : nullptr, stream, nm);
    });
}

void dequantize_rows(GgmlType wt, const void* w, int64_t rows, int64_t k, float* y, cudaStream_t stream) {
    check_shape(wt, k);
    if (rows <= 0) return;
    with_matmul_type(wt, [&](auto t) { dequantize_typed<decltype(t)::value>(w, rows, k, y, stream); });
}

bool matmul_id_down_combine(GgmlType wt, const void* down, size_t matrix_bytes, const int32_t* ids, const float* w,
                            int64_t n_sel, int64_t n_out, int64_t k, const float* g, float* out, cudaStream_t stream,
                            float* y, unsigned* counter, const AddNorm* norm) {
    check_shape(wt, k);
    if (n_sel <= 0 || n_sel > kDownCombineMaxSel || n_out <= 0 || n_out > INT32_MAX) return false;
    return with_fused_gemv_type(wt, [&](auto t) {
        return launch_down_combine<decltype(t)::value>(down, matrix_bytes, ids, w, n_sel, n_out, k, g, out, stream, y,
                                                       counter, norm);
    });
}

bool qx_takes(GgmlType wt, int64_t k, int64_t rows) {
    return with_fused_gemv_type(wt, [&](auto t) { return qx_ok<decltype(t)::value>(k, rows); });
}

bool matmul_qx(GgmlType wt, const void* w, int64_t n_out, int64_t k, const uint8_t* qx, float* y,
               cudaStream_t stream) {
    check_shape(wt, k);
    if (n_out <= 0) return true;
    return with_fused_gemv_type(
        wt, [&](auto t) { return launch_qx<decltype(t)::value>(w, n_out, k, qx, y, stream); });
}

bool matmul_qx_add_rmsnorm(GgmlType wt, const void* w, int64_t n_out, int64_t k, const uint8_t* qx, float* t,
                           float* x, const float* nw, float* y, float eps, uint8_t* qy, unsigned* counter,
                           cudaStream_t stream) {
    check_shape(wt, k);
    if (n_out <= 0) return false;
    return with_fused_gemv_type(wt, [&](auto tt) {
        return launch_qx_add_rmsnorm<decltype(tt)::value>(w, n_out, k, qx, t, x, nw, y, eps, qy, counter, stream);
    });
}

bool matmul_ptr_takes(GgmlType wt, int64_t n_out, int64_t k) {
    return with_fused_gemv_type(wt, [&](auto t) { return !takes_qgemv<decltype(t)::value>(1, k, n_out); });
}

bool matmul_ptr(GgmlType wt, const void* const* w, int64_t n_sel, int64_t n_out, int64_t k, const float* x,
                int64_t x_stride, float* y, cudaStream_t stream) {
    check_shape(wt, k);
    if (n_sel <= 0 || n_out <= 0) return true;
    if (n_sel >= 65536) return false;
    return with_fused_gemv_type(wt, [&](auto t) {
        return launch_gemv_ptr<decltype(t)::value>(w, nullptr, n_sel, n_out, k, x, x_stride, y, stream);
    });
}

bool matmul_ptr_swiglu(GgmlType wt, const void* const* gate, const void* const* up, int64_t n_sel, int64_t n_out,
                       int64_t k, const float* x, int64_t x_stride, float* y, cudaStream_t stream,
                       const void* const* next, size_t next_matrix_bytes) {
    check_shape(wt, k);
    MM_CHECK(up != nullptr);
    if (n_sel <= 0 || n_out <= 0) return true;
    if (n_sel >= 65536) return false;
    const NextMats nm{nullptr, next ? next_matrix_bytes : 0, reinterpret_cast<const uint8_t* const*>(next)};
    return with_fused_gemv_type(wt, [&](auto t) {
        return launch_gemv_ptr<decltype(t)::value>(gate, up, n_sel, n_out, k, x, x_stride, y, stream, nm);
    });
}

}  // namespace moemesh::cuda
