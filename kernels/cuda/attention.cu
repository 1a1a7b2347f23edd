// Decode attention against the KV cache in VRAM, split over the key length (flash-decoding).
//
// Pass 1, grid (splits, n_head, T), one block of kAttnThreads per chunk of one (token, head)'s keys:
// scores into shared memory (one warp per key, lanes across head_dim), the chunk's max m and sum l
// of exp(s - m), and o = Σ exp(s - m)·v with threads across head_dim (coalesced V rows). A token's
// n_kv keys are cut into attn_splits(n_kv) chunks of attn_chunk(n_kv) keys: at most kAttnSplit, and
// at least min_splits chunks (of kAttnMinChunk keys or more) so that a short context still spreads
// over several blocks (AttentionArgs::min_splits; 1: 256-key chunks, as before session 17).
// Pass 2, grid (n_head, T): out = Σ_s e^{m_s − M} o_s / Σ_s e^{m_s − M} l_s; or, with
// AttentionArgs::merge_counters, the same by the last of each (token, head)'s pass-1 blocks to finish.
// Workspace per (token, head, split): head_dim floats of o, then m and l.
//
// With an f16 cache q is rounded to f16 before the dot products, as the CPU kernel does; the CPU
// also rounds the final softmax weights to f16, which a split softmax cannot reproduce, so the two
// differ by about 2^-11 relative.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/status.h"
#include "kernels/cuda/blas.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/quant_dev.cuh"

namespace moemesh::cuda {

namespace {

using namespace detail;

constexpr int kAttnThreads = 128;
constexpr int kAttnMaxHeadDim = 256;

template <bool kF16>
__device__ __forceinline__ float kv_at(const void* base, int64_t idx) {
    if constexpr (kF16) return h2f(static_cast<const uint16_t*>(base)[idx]);
    else return static_cast<const float*>(base)[idx];
}

constexpr int64_t kAttnMinChunk = 16;

// Keys per chunk of a (token, head) with n_kv keys, and how many chunks.
__host__ __device__ __forceinline__ int64_t attn_chunk(int64_t n_kv, int64_t min_splits) {
    int64_t c = (n_kv + min_splits - 1) / min_splits;
    if (c < kAttnMinChunk) c = kAttnMinChunk;
    return c > kAttnSplit ? kAttnSplit : c;
}
__host__ __device__ __forceinline__ int64_t attn_splits(int64_t n_kv, int64_t min_splits) {
    const int64_t c = attn_chunk(n_kv, min_splits);
    return (n_kv + c - 1) / c;
}
// At least attn_splits(n, min_splits) for every n <= n_max: the grid's and the workspace's splits.
// (n <= 16·s: chunks of 16, ceil(n / 16) <= s of them; up to 256·s: at most s; beyond: ceil(n / 256).)
int64_t attn_max_splits(int64_t n_max, int64_t min_splits) {
    return std::max(std::min(min_splits, (n_max + kAttnMinChunk - 1) / kAttnMinChunk),
                    (n_max + kAttnSplit - 1) / kAttnSplit);
}

int64_t num_splits(const AttentionArgs& a) { return attn_max_splits(a.n_past + a.n_tokens, a.min_splits); }

// n_past from device memory (graph replay) when n_past_dev is set.
__device__ __forceinline__ int64_t eff_n_past(int64_t n_past, const int32_t* n_past_dev) {
    return n_past_dev ? static_cast<int64_t>(*n_past_dev) : n_past;
}

// kVWarps: the V pass with the chunk's keys split over the warps (warp w takes keys j0 + w, j0 + w +
// nw, ..., lane l the dims l, l + 32, ...), then the warps' partial sums added in warp order; else
// (default) one thread per dim over all the chunk's keys — a dependent chain of up to kAttnSplit
// loads per thread (MOEMESH_CUDA_ATTN_V=warps selects the other; not yet measured on a GPU).
template <bool kF16, bool kVWarps>
__device__ __forceinline__ void attn_split_chunk(const float* __restrict__ q, const void* __restrict__ k,
                                                 const void* __restrict__ v, float* __restrict__ ws, int64_t n_past,
                                                 int64_t n_head, int64_t n_head_kv, int64_t head_dim, float scale,
                                                 int64_t min_splits) {
    __shared__ float qs[kAttnMaxHeadDim];
    __shared__ float sc[kAttnSplit];
    __shared__ float red[kWarp];
    // gridDim.x (the workspace stride) may exceed the chunks this token's keys need (a graph launched
    // for the context size; a prompt's earlier tokens): those blocks exit without writing, the merge
    // reads only the token's chunks.
    const int64_t sp = blockIdx.x, h = blockIdx.y, t = blockIdx.z, n_splits = gridDim.x;
    const int64_t n_kv = n_past + t + 1, chunk = attn_chunk(n_kv, min_splits);
    if (sp * chunk >= n_kv) return;
    const int64_t j0 = sp * chunk, j1 = min(j0 + chunk, n_kv);
    float* wsp = ws + ((t * n_head + h) * n_splits + sp) * (head_dim + 2);
    const int64_t kvh = h / (n_head / n_head_kv), kv_stride = n_head_kv * head_dim;
    const float* qr = q + (t * n_head + h) * head_dim;
    for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = kF16 ? round_f16(qr[d]) : qr[d];
    __syncthreads();

    const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
    for (int64_t j = j0 + wid; j < j1; j += nw) {
        const int64_t base = j * kv_stride + kvh * head_dim;
        float s = 0.0f;
        for (int64_t d = lane; d < head_dim; d += kWarp) s += qs[d] * kv_at<kF16>(k, base + d);
        s = warp_sum(s);
        if (lane == 0) sc[j - j0] = s * scale;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < j1 - j0; j += blockDim.x) mx = fmaxf(mx, sc[j]);
    mx = block_max(mx, red);
    float l = 0.0f;
    for (int64_t j = threadIdx.x; j < j1 - j0; j += blockDim.x) {
        const float e = expf(sc[j] - mx);
        sc[j] = e;
        l += e;
    }
    l = block_sum(l, red);  // its barriers also publish sc
    if constexpr (kVWarps) {
        constexpr int kDims = kAttnMaxHeadDim / kWarp;  // dims per lane
        __shared__ float part[kAttnThreads / kWarp][kAttnMaxHeadDim];
        float acc[kDims];
#pragma unroll
        for (int i = 0; i < kDims; ++i) acc[i] = 0.0f;
        for (int64_t j = j0 + wid; j < j1; j += nw) {
            const float w = sc[j - j0];
            const int64_t base = j * kv_stride + kvh * head_dim;
#pragma unroll
            for (int i = 0; i < kDims; ++i)
                if (lane + kWarp * i < head_dim) acc[i] += w * kv_at<kF16>(v, base + lane + kWarp * i);
        }
#pragma unroll
        for (int i = 0; i < kDims; ++i)
            if (lane + kWarp * i < head_dim) part[wid][lane + kWarp * i] = acc[i];
        __syncthreads();
        for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o = 0.0f;
            for (int w = 0; w < nw; ++w) o += part[w][d];
            wsp[d] = o;
        }
    } else {
        for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o = 0.0f;
            for (int64_t j = j0; j < j1; ++j) o += sc[j - j0] * kv_at<kF16>(v, j * kv_stride + kvh * head_dim + d);
            wsp[d] = o;
        }
    }
    if (threadIdx.x == 0) wsp[head_dim] = mx, wsp[head_dim + 1] = l;
}

// Head h of token t: out = Σ_s e^{m_s − M} o_s / Σ_s e^{m_s − M} l_s over the first n_splits
// chunks of its ws_splits in the workspace. qx: out also quantized (AttentionArgs::out_qx;
// head_dim % 32 == 0, so each warp's 32 outputs of an iteration are one group of 32 of the row).
// kL2: the chunks were written by other blocks of this kernel: read through L2 (__ldcg).
// Threads d0, d0 + dstep, ... of the block take the dims (the whole block: threadIdx.x, blockDim.x;
// one warp: its lane, kWarp — the same arithmetic per dim either way).
template <bool kL2>
__device__ __forceinline__ void attn_merge_head(const float* ws, float* __restrict__ out, int64_t h, int64_t t,
                                                int64_t n_head, int64_t head_dim, int64_t ws_splits,
                                                int64_t n_splits, uint8_t* __restrict__ qx, int64_t d0,
                                                int64_t dstep) {
    auto ld = [](const float* p) { return kL2 ? __ldcg(p) : *p; };
    const float* w0 = ws + (t * n_head + h) * ws_splits * (head_dim + 2);
    float M = -INFINITY;
    for (int64_t s = 0; s < n_splits; ++s) M = fmaxf(M, ld(w0 + s * (head_dim + 2) + head_dim));
    float L = 0.0f;
    for (int64_t s = 0; s < n_splits; ++s) {
        const float* ws_s = w0 + s * (head_dim + 2);
        L += ld(ws_s + head_dim + 1) * expf(ld(ws_s + head_dim) - M);  // empty chunks: l = 0, exp(-inf) = 0
    }
    const float inv = 1.0f / L;
    for (int64_t d = d0; d < head_dim; d += dstep) {
        float o = 0.0f;
        for (int64_t s = 0; s < n_splits; ++s) {
            const float* ws_s = w0 + s * (head_dim + 2);
            o += ld(ws_s + d) * expf(ld(ws_s + head_dim) - M);
        }
        const float v = o * inv;
        out[(t * n_head + h) * head_dim + d] = v;
        if (qx) {  // warp-uniform
            const int64_t n = n_head * head_dim, e = h * head_dim + d;
            const int lane = threadIdx.x % kWarp;
            const QxRow row(qx + t * qx_bytes(n), n);
            const float vv[1] = {v};
            float gd[1], gh[1];
            quant_groups32<1>(vv, 1, lane, row.q + (e - lane), 0, gd, gh);
            row.store(e / 32, lane, gd[0], gh[0]);
        }
    }
}

// grid (ws splits, n_head, T). counters (AttentionArgs::merge_counters) set: the block of each
// (token, head) that finishes last merges its chunks (no second launch): every block's chunk
// written and fenced, one count per block, the count's last block reads the chunks through L2 and
// leaves the counter at 0 for the next launch.
template <bool kF16, bool kVWarps>
__global__ void __launch_bounds__(kAttnThreads)
    attn_split_kernel(const float* __restrict__ q, const void* __restrict__ k, const void* __restrict__ v,
                      float* __restrict__ ws, int64_t n_past, const int32_t* __restrict__ n_past_dev, int64_t n_head,
                      int64_t n_head_kv, int64_t head_dim, float scale, int64_t min_splits,
                      unsigned* __restrict__ counters, float* __restrict__ out, uint8_t* __restrict__ qx) {
    grid_dep_wait();
    n_past = eff_n_past(n_past, n_past_dev);
    attn_split_chunk<kF16, kVWarps>(q, k, v, ws, n_past, n_head, n_head_kv, head_dim, scale, min_splits);
    const int64_t h = blockIdx.y, t = blockIdx.z;
    if (!counters || !last_block_done(&counters[t * n_head + h], gridDim.x)) return;
    attn_merge_head<true>(ws, out, h, t, n_head, head_dim, gridDim.x, attn_splits(n_past + t + 1, min_splits), qx,
                          threadIdx.x, blockDim.x);
    if (threadIdx.x == 0) counters[t * n_head + h] = 0;
}

// ---- grouped-query form (MOEMESH_CUDA_ATTN_GQA, default on) ----
// attn_split_kernel gives each (chunk, head, token) a block, so the n_head / n_head_kv query heads
// that share a KV head each read the chunk's K and V rows: on Qwen3-30B-A3B (32 / 4 heads) every
// K/V byte is loaded 8 times (from L2 if lucky; at 8k keys ~134 MB of loads per layer for 17 MB of
// cache). attn_split_gqa_kernel gives each (chunk, KV head, token) a block that loads each K/V row
// once and works all kG ≤ kMaxG heads of the group with it, with the per-head kernel's arithmetic in
// the same order (each score, each head's block max and sum, each dim's V sum), so the two give the
// same bits: scores by one warp per key (lanes across head_dim, the next key's row loaded while
// this one's kG dot products are summed), each head's max and sum reduced as block_max /
// block_sum do it, the V pass one thread per dim over the chunk's keys with kG sums. The workspace is
// the per-head kernel's; the last block of a (token, KV head) merges the group's heads, one warp per
// head (attn_merge_head), with the counter of the group's first head. q in shared memory: kG ·
// head_dim <= kAttnGqaMaxQ floats. The V pass over the warps (MOEMESH_CUDA_ATTN_V=warps) has no
// grouped form.
constexpr int kAttnGqaMaxQ = 2048;
constexpr int kAttnGqaMaxGroup = 16;

// The second half of block_max (kMax) / block_sum for each of gs heads at once: lane 0 of every warp
// has put its warp's result for head hh at red[hh][wid]; res[hh] ← those combined in warp order, as
// block_max / block_sum combine them. Barriers before and after.
template <bool kMax, int kMaxG>
__device__ __forceinline__ void finish_head_reductions(const float (&red)[kMaxG][kWarp], float* res, int64_t gs) {
    const int lane = threadIdx.x % kWarp, nw = blockDim.x / kWarp;
    __syncthreads();
    if (threadIdx.x < kWarp)
        for (int64_t hh = 0; hh < gs; ++hh) {
            const float r = kMax ? warp_max(lane < nw ? red[hh][lane] : -INFINITY)
                                 : warp_sum(lane < nw ? red[hh][lane] : 0.0f);
            if (lane == 0) res[hh] = r;
        }
    __syncthreads();
}

template <bool kF16, int kMaxG>
__global__ void __launch_bounds__(kAttnThreads)
    attn_split_gqa_kernel(const float* __restrict__ q, const void* __restrict__ k, const void* __restrict__ v,
                          float* __restrict__ ws, int64_t n_past, const int32_t* __restrict__ n_past_dev,
                          int64_t n_head, int64_t n_head_kv, int64_t head_dim, float scale, int64_t min_splits,
                          unsigned* __restrict__ counters, float* __restrict__ out, uint8_t* __restrict__ qx) {
    __shared__ float qs[kAttnGqaMaxQ];
    __shared__ float sc[kMaxG][kAttnSplit];
    __shared__ float red[kMaxG][kWarp];
    __shared__ float hm[kMaxG], hl[kMaxG];
    constexpr int kDims = kAttnMaxHeadDim / kWarp;  // head dims per lane in the score pass
    grid_dep_wait();
    n_past = eff_n_past(n_past, n_past_dev);
    const int64_t sp = blockIdx.x, g = blockIdx.y, t = blockIdx.z, n_splits = gridDim.x;
    const int64_t gs = n_head / n_head_kv, h0 = g * gs, kv_stride = n_head_kv * head_dim;
    const int64_t n_kv = n_past + t + 1, chunk = attn_chunk(n_kv, min_splits);
    const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
    if (sp * chunk < n_kv) {  // (else: a chunk past this token's keys; it only counts)
        const int64_t j0 = sp * chunk, j1 = min(j0 + chunk, n_kv), nj = j1 - j0;
        const float* qr = q + (t * n_head + h0) * head_dim;  // the group's heads are consecutive
        for (int64_t i = threadIdx.x; i < gs * head_dim; i += blockDim.x) qs[i] = kF16 ? round_f16(qr[i]) : qr[i];
        __syncthreads();
        // Scores: warp wid takes keys j0 + wid, j0 + wid + nw, ...; lane l the dims l, l + 32, ...
        float kn[kDims];
        auto load_k = [&](int64_t j, float (&r)[kDims]) {
            const int64_t base = j * kv_stride + g * head_dim;
#pragma unroll
            for (int i = 0; i < kDims; ++i) {
                const int64_t d = lane + kWarp * i;
                r[i] = d < head_dim ? kv_at<kF16>(k, base + d) : 0.0f;
            }
        };
        if (j0 + wid < j1) load_k(j0 + wid, kn);
        for (int64_t j = j0 + wid; j < j1; j += nw) {
            float kr[kDims];
#pragma unroll
            for (int i = 0; i < kDims; ++i) kr[i] = kn[i];
            if (j + nw < j1) load_k(j + nw, kn);
#pragma unroll
            for (int hh = 0; hh < kMaxG; ++hh) {
                if (hh >= gs) continue;
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < kDims; ++i)
                    if (lane + kWarp * i < head_dim) s += qs[hh * head_dim + lane + kWarp * i] * kr[i];
                s = warp_sum(s);
                if (lane == 0) sc[hh][j - j0] = s * scale;
            }
        }
        __syncthreads();
        // Each head's max, then its exp(s - max) and their sum, as block_max / block_sum reduce.
        for (int64_t hh = 0; hh < gs; ++hh) {
            float mx = -INFINITY;
            for (int64_t j = threadIdx.x; j < nj; j += blockDim.x) mx = fmaxf(mx, sc[hh][j]);
            mx = warp_max(mx);
            if (lane == 0) red[hh][wid] = mx;
        }
        finish_head_reductions<true>(red, hm, gs);
        for (int64_t hh = 0; hh < gs; ++hh) {
            const float mx = hm[hh];
            float l = 0.0f;
            for (int64_t j = threadIdx.x; j < nj; j += blockDim.x) {
                const float e = expf(sc[hh][j] - mx);
                sc[hh][j] = e;
                l += e;
            }
            l = warp_sum(l);
            if (lane == 0) red[hh][wid] = l;
        }
        finish_head_reductions<false>(red, hl, gs);  // (its barriers also publish sc)
        // V: thread d sums each head's weighted V[j][d] over the chunk's keys.
        auto wsp = [&](int64_t hh) { return ws + ((t * n_head + h0 + hh) * n_splits + sp) * (head_dim + 2); };
        for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o[kMaxG];
#pragma unroll
            for (int hh = 0; hh < kMaxG; ++hh) o[hh] = 0.0f;
#pragma unroll(kMaxG <= 8 ? 4 : 2)  // (V loads of several keys in flight; each head's sum still in key order)
            for (int64_t j = j0; j < j1; ++j) {
                const float vv = kv_at<kF16>(v, j * kv_stride + g * head_dim + d);
#pragma unroll
                for (int hh = 0; hh < kMaxG; ++hh)
                    if (hh < gs) o[hh] += sc[hh][j - j0] * vv;
            }
#pragma unroll
            for (int hh = 0; hh < kMaxG; ++hh)
                if (hh < gs) wsp(hh)[d] = o[hh];
        }
        if (threadIdx.x == 0)
            for (int64_t hh = 0; hh < gs; ++hh) wsp(hh)[head_dim] = hm[hh], wsp(hh)[head_dim + 1] = hl[hh];
    }
    if (!counters || !last_block_done(&counters[t * n_head + h0], gridDim.x)) return;
    const int64_t used = attn_splits(n_kv, min_splits);
    for (int64_t hh = wid; hh < gs; hh += nw)
        attn_merge_head<true>(ws, out, h0 + hh, t, n_head, head_dim, gridDim.x, used, qx, lane, kWarp);
    if (threadIdx.x == 0) counters[t * n_head + h0] = 0;
}

// MOEMESH_CUDA_ATTN_V=warps: attn_split_kernel's V pass over the warps (read at every launch, so
// that an A/B or a test can switch it).
bool attn_v_warps() {
    const char* e = std::getenv("MOEMESH_CUDA_ATTN_V");
    return e != nullptr && std::strcmp(e, "warps") == 0;
}

// MOEMESH_CUDA_ATTN_GQA=0: the per-head split kernel even where the grouped one applies (read at
// every launch, like MOEMESH_CUDA_ATTN_V).
bool attn_gqa_on() {
    const char* e = std::getenv("MOEMESH_CUDA_ATTN_GQA");
    return !(e != nullptr && std::strcmp(e, "0") == 0);
}
std::atomic<uint64_t> g_attn_gqa_launches{0};

// grid (n_head, T): the merge as a second launch (AttentionArgs::merge_counters null).
__global__ void attn_merge_kernel(const float* __restrict__ ws, float* __restrict__ out, int64_t n_head,
                                  int64_t head_dim, int64_t ws_splits, int64_t n_past,
                                  const int32_t* __restrict__ n_past_dev, int64_t min_splits,
                                  uint8_t* __restrict__ qx) {
    grid_dep_wait();
    const int64_t t = blockIdx.y;
    attn_merge_head<false>(ws, out, blockIdx.x, t, n_head, head_dim, ws_splits,
                           attn_splits(eff_n_past(n_past, n_past_dev) + t + 1, min_splits), qx, threadIdx.x,
                           blockDim.x);
}

}  // namespace

size_t attention_workspace_bytes(const AttentionArgs& a) {
    return static_cast<size_t>(a.n_tokens * a.n_head * num_splits(a) * (a.head_dim + 2)) * sizeof(float);
}

size_t attention_workspace_bytes(const AttentionArgs& a, int64_t n_ctx) {
    return static_cast<size_t>(a.n_tokens * a.n_head * attn_max_splits(n_ctx, a.min_splits) * (a.head_dim + 2)) *
           sizeof(float);
}

namespace {

void attention_launch(const AttentionArgs& a, const int32_t* n_past_dev, int64_t n_splits, void* workspace,
                      cudaStream_t stream) {
    MM_CHECK(a.min_splits >= 1 && a.min_splits <= 64);
    MM_CHECK(a.head_dim > 0 && a.head_dim <= kAttnMaxHeadDim);
    MM_CHECK(a.n_head_kv > 0 && a.n_head % a.n_head_kv == 0);
    MM_CHECK(a.n_tokens < 65536 && a.n_head < 65536);
    MM_CHECK(a.out_qx == nullptr || (a.head_dim % 32 == 0 && a.n_head * a.head_dim % 256 == 0));
    if (a.n_tokens <= 0) return;
    auto* ws = static_cast<float*>(workspace);
    const bool vw = attn_v_warps();
    const int64_t gs = a.n_head / a.n_head_kv;
    if (!vw && gs >= 2 && gs <= kAttnGqaMaxGroup && gs * a.head_dim <= kAttnGqaMaxQ && attn_gqa_on()) {
        const dim3 grid(static_cast<unsigned>(n_splits), static_cast<unsigned>(a.n_head_kv),
                        static_cast<unsigned>(a.n_tokens));
#define MM_ATTN_LAUNCH(...)                                                                                    \
    MM_LAUNCH_PDL(grid, kAttnThreads, 0, stream, __VA_ARGS__)(a.q, a.k, a.v, ws, a.n_past, n_past_dev, a.n_head, \
                                                              a.n_head_kv, a.head_dim, a.scale, a.min_splits,   \
                                                              a.merge_counters, a.out, a.out_qx)
        if (gs <= 4 && a.kv_f16) MM_ATTN_LAUNCH(attn_split_gqa_kernel<true, 4>);
        else if (gs <= 4) MM_ATTN_LAUNCH(attn_split_gqa_kernel<false, 4>);
        else if (gs <= 8 && a.kv_f16) MM_ATTN_LAUNCH(attn_split_gqa_kernel<true, 8>);
        else if (gs <= 8) MM_ATTN_LAUNCH(attn_split_gqa_kernel<false, 8>);
        else if (a.kv_f16) MM_ATTN_LAUNCH(attn_split_gqa_kernel<true, kAttnGqaMaxGroup>);
        else MM_ATTN_LAUNCH(attn_split_gqa_kernel<false, kAttnGqaMaxGroup>);
        g_attn_gqa_launches.fetch_add(1);
    } else {
        const dim3 grid(static_cast<unsigned>(n_splits), static_cast<unsigned>(a.n_head),
                        static_cast<unsigned>(a.n_tokens));
        if (a.kv_f16 && vw) MM_ATTN_LAUNCH(attn_split_kernel<true, true>);
        else if (a.kv_f16) MM_ATTN_LAUNCH(attn_split_kernel<true, false>);
        else if (vw) MM_ATTN_LAUNCH(attn_split_kernel<false, true>);
        else MM_ATTN_LAUNCH(attn_split_kernel<false, false>);
    }
#undef MM_ATTN_LAUNCH
    CUDA_CHECK_LAUNCH();
    if (a.merge_counters) return;  // merged by each head's (or group's) last block
    const dim3 mgrid(static_cast<unsigned>(a.n_head), static_cast<unsigned>(a.n_tokens));
    MM_LAUNCH_PDL(mgrid, kAttnThreads, 0, stream, attn_merge_kernel)(ws, a.out, a.n_head, a.head_dim, n_splits, a.n_past,
                                                                    n_past_dev, a.min_splits, a.out_qx);
    CUDA_CHECK_LAUNCH();
}

// ---- prompt attention through cuBLAS (session 20) ----
// The split kernel reads every key of the cache once per (token, head): a 512-token chunk over 8k
// keys re-reads K and V 512 · n_head times from L2. For prompts of at least
// MOEMESH_CUDA_ATTN_BLAS_MIN_TOKENS (64) tokens the products go to cuBLAS instead, per KV head g
// and pass (query rows × the group's heads within the scratch cap, MOEMESH_CUDA_BLAS_CHUNK_MIB):
//   S = scale · Q_h · K_gᵀ    (one strided-batched GEMM over the pass's heads; K's stride 0)
//   P = softmax of each row of S over its n_past + t + 1 keys (attn_softmax_rows_kernel)
//   O_h = P · V_g             (a second strided-batched GEMM, into out)
// With an f16 cache q and the softmax weights are rounded to f16 (as the CPU does both; the split
// kernel keeps f32 weights) and the GEMMs take f16 operands with f32 sums; with an f32 cache both
// products are f32 (CUBLAS_COMPUTE_32F). MOEMESH_CUDA_ATTN_BLAS=0: always the split kernel.
std::atomic<uint64_t> g_attn_blas_calls{0};

__global__ void round_f16_kernel(const float* __restrict__ x, int64_t n, uint16_t* __restrict__ y) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __half_as_ushort(__float2half_rn(x[i]));
}

// Block (t, h) of a pass of `rows` query rows from r0: row h · rows + t of s ([heads][rows][ld], n_kv
// used) becomes the softmax of its first n_past + r0 + t + 1 entries, 0 after them up to n_kv, in p
// (same layout; f16 with kF16, else f32; p may be s).
template <bool kF16>
__global__ void __launch_bounds__(kAttnThreads)
    attn_softmax_rows_kernel(const float* s, void* p, int64_t n_kv, int64_t ld, int64_t rows, int64_t r0,
                             int64_t n_past) {
    __shared__ float red[32];
    const int64_t row = static_cast<int64_t>(blockIdx.y) * rows + blockIdx.x;
    const float* sr = s + row * ld;
    const int64_t lim = n_past + r0 + blockIdx.x + 1;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < lim; j += blockDim.x) mx = fmaxf(mx, sr[j]);
    mx = block_max(mx, red);
    float l = 0.0f;
    for (int64_t j = threadIdx.x; j < lim; j += blockDim.x) l += expf(sr[j] - mx);
    l = block_sum(l, red);
    const float inv = 1.0f / l;
    for (int64_t j = threadIdx.x; j < n_kv; j += blockDim.x) {
        const float w = j < lim ? expf(sr[j] - mx) * inv : 0.0f;
        if constexpr (kF16) static_cast<uint16_t*>(p)[row * ld + j] = __half_as_ushort(__float2half_rn(w));
        else static_cast<float*>(p)[row * ld + j] = w;
    }
}

// attention() through cuBLAS (above); false where it does not apply or cuBLAS is not there (or
// refused a product: the caller's split kernel then writes all of out).
bool attention_blas(const AttentionArgs& a, cudaStream_t stream) {
    const BlasSettings set = blas_settings();
    const int64_t T = a.n_tokens, n_kv = a.n_past + T, hd = a.head_dim, H = a.n_head, G = a.n_head_kv, gs = H / G;
    if (!set.on || T < set.attn_min_tokens || a.out_qx != nullptr || n_kv > INT32_MAX / 2 || H * hd > INT32_MAX / 2)
        return false;
    // S's and P's rows n_kv wide, ld apart: a multiple of 8 elements keeps every row 16-byte aligned
    // for cuBLAS (f16 P rows n_kv apart would be 2-byte aligned at odd n_kv: slower kernels).
    const int64_t ld = (n_kv + 7) / 8 * 8;
    const size_t el = a.kv_f16 ? 2 : 4, s_row = static_cast<size_t>(ld) * sizeof(float);
    const int64_t rp = std::clamp<int64_t>(static_cast<int64_t>(set.chunk_bytes / s_row), 1, T);  // rows per pass
    const int64_t hp = std::clamp<int64_t>(static_cast<int64_t>(set.chunk_bytes / (s_row * rp)), 1, gs);  // heads
    const size_t s_bytes = s_row * static_cast<size_t>(rp * hp);
    const size_t q_bytes = a.kv_f16 ? (static_cast<size_t>(T * H * hd) * 2 + 255) / 256 * 256 : 0;  // P after it
    const size_t p_bytes = a.kv_f16 ? s_bytes / 2 : 0;
    BlasStream* b = blas_stream(stream, s_bytes, q_bytes + p_bytes);
    if (b == nullptr) return false;
    auto* sc = static_cast<float*>(blas_w(b));
    auto* xs = static_cast<uint8_t*>(blas_x(b));
    const void* q = a.q;
    if (a.kv_f16) {
        const int64_t n = T * H * hd;
        MM_LAUNCH(grid_1d(n, 256), 256, 0, stream, round_f16_kernel)(a.q, n, reinterpret_cast<uint16_t*>(xs));
        CUDA_CHECK_LAUNCH();
        q = xs;
    }
    void* pm = a.kv_f16 ? static_cast<void*>(xs + q_bytes) : static_cast<void*>(sc);
    const BlasElem e = a.kv_f16 ? BlasElem::F16 : BlasElem::F32;
    const int64_t ldq = H * hd, ldkv = G * hd;
    for (int64_t g = 0; g < G; ++g) {
        const auto* kg = static_cast<const uint8_t*>(a.k) + static_cast<size_t>(g * hd) * el;
        const auto* vg = static_cast<const uint8_t*>(a.v) + static_cast<size_t>(g * hd) * el;
        for (int64_t h0 = g * gs; h0 < (g + 1) * gs; h0 += hp) {
            const int64_t hc = std::min(hp, (g + 1) * gs - h0);
            for (int64_t r0 = 0; r0 < T; r0 += rp) {
                const int64_t rc = std::min(rp, T - r0);
                const size_t at = static_cast<size_t>((r0 * H + h0) * hd);
                const uint8_t* qh = static_cast<const uint8_t*>(q) + at * el;
                if (!blas_gemm_strided(b, true, n_kv, rc, hd, a.scale, kg, ldkv, 0, qh, ldq, hd, sc, ld, rc * ld,
                                       static_cast<int>(hc), e))
                    return false;
                const dim3 grid(static_cast<unsigned>(rc), static_cast<unsigned>(hc));
                if (a.kv_f16)
                    MM_LAUNCH(grid, kAttnThreads, 0, stream, attn_softmax_rows_kernel<true>)(sc, pm, n_kv, ld, rc,
                                                                                            r0, a.n_past);
                else
                    MM_LAUNCH(grid, kAttnThreads, 0, stream, attn_softmax_rows_kernel<false>)(sc, pm, n_kv, ld, rc,
                                                                                             r0, a.n_past);
                CUDA_CHECK_LAUNCH();
                if (!blas_gemm_strided(b, false, hd, rc, n_kv, 1.0f, vg, ldkv, 0, pm, ld, rc * ld, a.out + at, ldq,
                                       hd, static_cast<int>(hc), e))
                    return false;
            }
        }
    }
    g_attn_blas_calls.fetch_add(1);
    return true;
}

}  // namespace

void attention(const AttentionArgs& a, void* workspace, cudaStream_t stream) {
    if (a.n_tokens > 1 && attention_blas(a, stream)) return;
    attention_launch(a, nullptr, num_splits(a), workspace, stream);
}

uint64_t attention_blas_calls() { return g_attn_blas_calls.load(); }
uint64_t attention_gqa_launches() { return g_attn_gqa_launches.load(); }

void attention_dev(const AttentionArgs& a, const int32_t* n_past_dev, int64_t n_ctx, void* workspace,
                   cudaStream_t stream) {
    attention_launch(a, n_past_dev, attn_max_splits(n_ctx, a.min_splits), workspace, stream);
}

}  // namespace moemesh::cuda
