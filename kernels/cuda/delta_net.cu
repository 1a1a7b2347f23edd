// Gated DeltaNet ops (Qwen3-Next linear attention), the contract of kernels/ops.h: causal conv +
// SiLU, the delta-rule recurrence (decode) and its chunked WY form (prompts).
#include <cuda_runtime.h>

#include <mutex>

#include "common/status.h"
#include "kernels/cuda/common.cuh"

namespace moemesh::cuda {

namespace {

using namespace detail;

constexpr int kConvMaxK = 8;

// Input i of the sequence [state; x]: i < 0 reads the carried state row K-1+i.
__device__ __forceinline__ float conv_in(const float* x, const float* state, int64_t i, int64_t c, int64_t C,
                                         int64_t K) {
    return i < 0 ? state[(K - 1 + i) * C + c] : x[i * C + c];
}

// One thread per (t, c).
__global__ void conv1d_silu_kernel(const float* x, const float* w, const float* state, float* y, int64_t T, int64_t C,
                                   int64_t K) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= T * C) return;
    const int64_t t = idx / C, c = idx % C;
    float s = 0.0f;
    for (int64_t j = 0; j < K; ++j) s += w[c * K + j] * conv_in(x, state, t - (K - 1) + j, c, C, K);
    y[idx] = silu(s);
}

// One thread per channel: the new state is the last K-1 inputs of [state; x]. Each thread reads
// its whole column before writing it, and no other thread touches that column.
__global__ void conv_state_kernel(const float* x, float* state, int64_t T, int64_t C, int64_t K) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float keep[kConvMaxK - 1];
#pragma unroll
    for (int r = 0; r < kConvMaxK - 1; ++r)
        if (r < K - 1) keep[r] = conv_in(x, state, T - (K - 1) + r, c, C, K);
#pragma unroll
    for (int r = 0; r < kConvMaxK - 1; ++r)
        if (r < K - 1) state[r * C + c] = keep[r];
}

// The recurrence. Block (column tile ct, v-head j) of 8 warps: lane l owns column c = 32·ct + l of
// S_j, warp w its rows i = w + 8r (r < kRows), so each state load/store is 32 consecutive floats.
// Sums over i (u = Sᵀk and o = Sᵀq) go through shared memory across the 8 warps.
constexpr int kDnWarps = 8;

template <int kRows>
__global__ void __launch_bounds__(kDnWarps* kWarp)
    delta_rule_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                      const float* __restrict__ g, const float* __restrict__ beta, float* __restrict__ state,
                      float* __restrict__ out, int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv,
                      float scale) {
    __shared__ float red_u[kDnWarps][kWarp];
    __shared__ float red_o[kDnWarps][kWarp];
    const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp;
    const int64_t j = blockIdx.y, c = static_cast<int64_t>(blockIdx.x) * kWarp + lane;
    const int64_t kh = j / (Hv / Hk);
    float* sj = state + j * Dk * Dv;
    float S[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int64_t i = wid + kDnWarps * r;
        S[r] = i < Dk ? sj[i * Dv + c] : 0.0f;
    }
    for (int64_t t = 0; t < T; ++t) {
        const float* kt = k + (t * Hk + kh) * Dk;
        const float* qt = q + (t * Hk + kh) * Dk;
        const float decay = expf(g[t * Hv + j]), b = beta[t * Hv + j];
        float kr[kRows];
        float pu = 0.0f;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            const int64_t i = wid + kDnWarps * r;
            kr[r] = i < Dk ? kt[i] : 0.0f;
            S[r] *= decay;
            pu += S[r] * kr[r];
        }
        red_u[wid][lane] = pu;
        __syncthreads();
        float u = 0.0f;
#pragma unroll
        for (int w = 0; w < kDnWarps; ++w) u += red_u[w][lane];
        const float delta = b * (v[(t * Hv + j) * Dv + c] - u);
        float po = 0.0f;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            const int64_t i = wid + kDnWarps * r;
            S[r] += kr[r] * delta;
            po += S[r] * (i < Dk ? qt[i] * scale : 0.0f);
        }
        red_o[wid][lane] = po;
        __syncthreads();
        if (wid == 0) {
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < kDnWarps; ++w) o += red_o[w][lane];
            out[(t * Hv + j) * Dv + c] = o;
        }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int64_t i = wid + kDnWarps * r;
        if (i < Dk) sj[i * Dv + c] = S[r];
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked (WY) form for prompts, the algebra of kernels/cpu/delta_net.cpp chunk_head (HF
// torch_chunk_gated_delta_rule) regrouped so that the state multiplies only [L, dk] × [dk, 32]
// tiles. Per chunk of L tokens (G = cumulative log-decay within the chunk, rows i, m < L):
//   P[i, m] = scale·(q_i·k_m)·e^{G_i−G_m}  (m ≤ i)       A[i, m] = −β_i (k_i·k_m) e^{G_i−G_m}  (m < i)
//   T = (I − A)⁻¹ (forward substitution)
//   R = β ⊙ (V − e^G ⊙ (K·S))              [= β⊙V − β⊙e^G⊙(K·S), the CPU's U − W·S before T]
//   V_new = T·R;  O = scale·e^G ⊙ (Q·S) + P·V_new;  S ← e^{G_last}·S + (K ⊙ e^{G_last−G})ᵀ·V_new
// The columns of S are independent given P and T, so block (column tile ct, v-head j) owns 32
// columns of S_j (in shared memory for the whole call) and walks the chunks in order; P and T are
// recomputed by each column tile of a head (L² · dk work, small next to the state products).
// A short last chunk is processed as is (as the CPU does).
constexpr int kChunkCols = 32;
constexpr int kChunkWarps = 8;
constexpr int kChunkThreads = kChunkWarps * kWarp;
constexpr int kChunkMax = 64;

// Shared memory (floats) for chunks of L tokens and key dim dk; row strides dk + 1 and L + 1 keep
// the column walks of K, Q, T and P free of bank conflicts.
size_t chunk_smem_bytes(int64_t L, int64_t dk) {
    const int64_t floats = 2 * L * (dk + 1)         // Ks, Qs [L][dk+1]
                           + 2 * L * (L + 1)        // Tm, Pm [L][L+1]
                           + dk * kChunkCols        // Ss [dk][32]
                           + 3 * L * kChunkCols     // Os, Vs (K·S, then V_new), Rs [L][32]
                           + 3 * L;                 // gc, bt, wl
    return static_cast<size_t>(floats) * sizeof(float);
}

// grid: (Dv / 32, Hv), kChunkThreads threads, chunk_smem_bytes(L, Dk) of dynamic shared memory.
__global__ void __launch_bounds__(kChunkThreads)
    delta_rule_chunked_kernel(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                              const float* __restrict__ g, const float* __restrict__ beta, float* __restrict__ state,
                              float* __restrict__ out, int64_t T, int64_t Hk, int64_t Hv, int dk, int64_t Dv,
                              float scale, int L) {
    MM_EXTERN_SHARED(float, smem);
    const int ldk = dk + 1, ldl = L + 1;
    float* Ks = smem;
    float* Qs = Ks + L * ldk;
    float* Tm = Qs + L * ldk;
    float* Pm = Tm + L * ldl;
    float* Ss = Pm + L * ldl;
    float* Os = Ss + dk * kChunkCols;
    float* Vs = Os + L * kChunkCols;
    float* Rs = Vs + L * kChunkCols;
    float* gc = Rs + L * kChunkCols;
    float* bt = gc + L;
    float* wl = bt + L;  // e^{G_last − G_i}

    const int tid = threadIdx.x, lane = tid % kWarp, wid = tid / kWarp;
    const int64_t j = blockIdx.y, c0 = static_cast<int64_t>(blockIdx.x) * kChunkCols;
    const int64_t kh = j / (Hv / Hk);
    float* sj = state + j * dk * Dv + c0;
    for (int d = wid; d < dk; d += kChunkWarps) Ss[d * kChunkCols + lane] = sj[d * Dv + lane];

    for (int64_t t0 = 0; t0 < T; t0 += L) {
        const int n = static_cast<int>(T - t0 < L ? T - t0 : L);  // tokens in this chunk
        // Load K and Q rows of the chunk, β, and the cumulative log-decay (summed in token order).
        for (int idx = tid; idx < n * dk; idx += kChunkThreads) {
            const int i = idx / dk, d = idx % dk;
            const int64_t src = ((t0 + i) * Hk + kh) * dk + d;
            Ks[i * ldk + d] = k[src];
            Qs[i * ldk + d] = q[src];
        }
        if (tid < n) bt[tid] = beta[(t0 + tid) * Hv + j];
        if (tid == 0) {
            float gs = 0.0f;
            for (int i = 0; i < n; ++i) {
                gs += g[(t0 + i) * Hv + j];
                gc[i] = gs;
            }
        }
        __syncthreads();

        // P and A: thread (ty, tx) of 16×16 owns rows ty + 16a and columns tx + 16b (a, b < 4).
        {
            const int ty = tid / 16, tx = tid % 16;
            float ap[4][4] = {}, aa[4][4] = {};
            for (int d = 0; d < dk; ++d) {
                float qa[4], ka[4], kb[4];
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    const int i = ty + 16 * a, m = tx + 16 * a;
                    qa[a] = i < n ? Qs[i * ldk + d] : 0.0f;
                    ka[a] = i < n ? Ks[i * ldk + d] : 0.0f;
                    kb[a] = m < n ? Ks[m * ldk + d] : 0.0f;
                }
#pragma unroll
                for (int a = 0; a < 4; ++a)
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        ap[a][b] += qa[a] * kb[b];
                        aa[a][b] += ka[a] * kb[b];
                    }
            }
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const int i = ty + 16 * a, m = tx + 16 * b;
                    if (i >= n || m >= n) continue;
                    const float dec = m < i ? expf(gc[i] - gc[m]) : 1.0f;
                    Pm[i * ldl + m] = m <= i ? ap[a][b] * (scale * dec) : 0.0f;
                    Tm[i * ldl + m] = m < i ? aa[a][b] * (-bt[i] * dec) : 0.0f;
                }
        }
        // Q·S and K·S with the state at the chunk start: warp w owns rows w + 8a, lane its column.
        {
            float qs[kChunkMax / kChunkWarps] = {}, ks[kChunkMax / kChunkWarps] = {};
            for (int d = 0; d < dk; ++d) {
                const float sd = Ss[d * kChunkCols + lane];
#pragma unroll
                for (int a = 0; a < kChunkMax / kChunkWarps; ++a) {
                    const int i = wid + kChunkWarps * a;
                    if (i < n) {
                        qs[a] += Qs[i * ldk + d] * sd;
                        ks[a] += Ks[i * ldk + d] * sd;
                    }
                }
            }
#pragma unroll
            for (int a = 0; a < kChunkMax / kChunkWarps; ++a) {
                const int i = wid + kChunkWarps * a;
                if (i < n) {
                    Os[i * kChunkCols + lane] = qs[a];
                    Vs[i * kChunkCols + lane] = ks[a];
                }
            }
        }
        __syncthreads();

        if (wid == 0) {
            // T = (I − A)⁻¹ row by row: T[i, m] = A[i, m] + Σ_{m<l<i} A[i, l]·T[l, m] (rows above i are
            // final; lane owns m = lane and lane + 32). Row i is read whole before any of it is written.
            for (int i = 2; i < n; ++i) {
                float tv[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = lane + kWarp * h;
                    float s = 0.0f;
                    if (m < i) {
                        s = Tm[i * ldl + m];
                        for (int l = m + 1; l < i; ++l) s += Tm[i * ldl + l] * Tm[l * ldl + m];
                    }
                    tv[h] = s;
                }
                __syncwarp();
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = lane + kWarp * h;
                    if (m < i) Tm[i * ldl + m] = tv[h];
                }
                __syncwarp();
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int i = lane + kWarp * h;
                if (i < n) Tm[i * ldl + i] = 1.0f;
            }
        } else {
            // Meanwhile warps 1..7: R = β ⊙ (V − e^G ⊙ K·S), the first term of O, the key weights
            // of the state update.
            for (int i = wid - 1; i < n; i += kChunkWarps - 1) {
                const float eg = expf(gc[i]);
                if (lane == 0) wl[i] = expf(gc[n - 1] - gc[i]);
                const float vi = v[((t0 + i) * Hv + j) * Dv + c0 + lane];
                Rs[i * kChunkCols + lane] = bt[i] * (vi - eg * Vs[i * kChunkCols + lane]);
                Os[i * kChunkCols + lane] *= scale * eg;
            }
        }
        __syncthreads();

        // V_new = T·R (T lower triangular, unit diagonal).
        for (int i = wid; i < n; i += kChunkWarps) {
            float s = 0.0f;
            for (int m = 0; m <= i; ++m) s += Tm[i * ldl + m] * Rs[m * kChunkCols + lane];
            Vs[i * kChunkCols + lane] = s;
        }
        __syncthreads();

        // O = scale·e^G ⊙ (Q·S) + P·V_new, to global; S ← e^{G_last}·S + (K ⊙ e^{G_last−G})ᵀ·V_new.
        for (int i = wid; i < n; i += kChunkWarps) {
            float o = Os[i * kChunkCols + lane];
            for (int m = 0; m <= i; ++m) o += Pm[i * ldl + m] * Vs[m * kChunkCols + lane];
            out[((t0 + i) * Hv + j) * Dv + c0 + lane] = o;
        }
        const float eglast = expf(gc[n - 1]);
        for (int d0 = wid; d0 < dk; d0 += 4 * kChunkWarps) {
            float s[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int d = d0 + kChunkWarps * r;
                s[r] = d < dk ? eglast * Ss[d * kChunkCols + lane] : 0.0f;
            }
            for (int i = 0; i < n; ++i) {
                const float wi = wl[i];
                const float vn = Vs[i * kChunkCols + lane];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int d = d0 + kChunkWarps * r;
                    if (d < dk) s[r] += (Ks[i * ldk + d] * wi) * vn;
                }
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int d = d0 + kChunkWarps * r;
                if (d < dk) Ss[d * kChunkCols + lane] = s[r];
            }
        }
        __syncthreads();  // the next chunk overwrites Ks, Qs, gc, bt
    }
    for (int d = wid; d < dk; d += kChunkWarps) sj[d * Dv + lane] = Ss[d * kChunkCols + lane];
}

// Raises the kernel's dynamic shared memory limit to the device's opt-in maximum, once per device;
// returns that maximum.
size_t chunk_smem_limit() {
    static std::mutex mu;
    static int limit[64] = {};
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lock(mu);
    if (dev < 0 || dev >= 64) return 48 * 1024;
    if (limit[dev] == 0) {
        int optin = 0;
        CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        CUDA_CHECK(cudaFuncSetAttribute(delta_rule_chunked_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        limit[dev] = optin;
    }
    return static_cast<size_t>(limit[dev]);
}

}  // namespace

int64_t delta_rule_chunk_len(int64_t k_dim) {
    const size_t limit = chunk_smem_limit();
    for (int64_t L = kChunkMax; L >= 8; L /= 2)
        if (chunk_smem_bytes(L, k_dim) <= limit) return L;
    return 0;
}

void gated_delta_rule_chunked(const DeltaNetArgs& a, int64_t chunk, cudaStream_t stream) {
    MM_CHECK(a.k_dim > 0 && a.k_dim <= 256 && a.v_dim > 0 && a.v_dim % kChunkCols == 0);
    MM_CHECK(a.n_k_heads > 0 && a.n_v_heads % a.n_k_heads == 0 && a.n_v_heads < 65536);
    if (a.n_tokens <= 0) return;
    const size_t limit = chunk_smem_limit();
    if (chunk <= 0) chunk = delta_rule_chunk_len(a.k_dim);
    MM_CHECK(chunk >= 1 && chunk <= kChunkMax && chunk_smem_bytes(chunk, a.k_dim) <= limit);
    const dim3 grid(static_cast<unsigned>(a.v_dim / kChunkCols), static_cast<unsigned>(a.n_v_heads));
    MM_LAUNCH(grid, kChunkThreads, chunk_smem_bytes(chunk, a.k_dim), stream, delta_rule_chunked_kernel)(
        a.q, a.k, a.v, a.g, a.beta, a.state, a.out, a.n_tokens, a.n_k_heads, a.n_v_heads, static_cast<int>(a.k_dim),
        a.v_dim, a.scale, static_cast<int>(chunk));
    CUDA_CHECK_LAUNCH();
}

void conv1d_silu_causal(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C, int64_t K,
                        cudaStream_t stream) {
    MM_CHECK(K >= 1 && K <= kConvMaxK);
    if (T <= 0 || C <= 0) return;
    MM_LAUNCH(grid_1d(T * C, 256), 256, 0, stream, conv1d_silu_kernel)(x, w, state, y, T, C, K);
    CUDA_CHECK_LAUNCH();
    if (K > 1) {
        MM_LAUNCH(grid_1d(C, 256), 256, 0, stream, conv_state_kernel)(x, state, T, C, K);
        CUDA_CHECK_LAUNCH();
    }
}

void gated_delta_rule_recurrent(const DeltaNetArgs& a, cudaStream_t stream) {
    MM_CHECK(a.k_dim > 0 && a.k_dim <= 256 && a.v_dim > 0 && a.v_dim % kWarp == 0);
    MM_CHECK(a.n_k_heads > 0 && a.n_v_heads % a.n_k_heads == 0 && a.n_v_heads < 65536);
    if (a.n_tokens <= 0) return;
    const dim3 grid(static_cast<unsigned>(a.v_dim / kWarp), static_cast<unsigned>(a.n_v_heads));
    if (a.k_dim <= 8 * kDnWarps)
        MM_LAUNCH(grid, kDnWarps * kWarp, 0, stream, delta_rule_kernel<8>)(a.q, a.k, a.v, a.g, a.beta, a.state, a.out,
                                                                    a.n_tokens, a.n_k_heads, a.n_v_heads, a.k_dim,
                                                                    a.v_dim, a.scale);
    else if (a.k_dim <= 16 * kDnWarps)
        MM_LAUNCH(grid, kDnWarps * kWarp, 0, stream, delta_rule_kernel<16>)(a.q, a.k, a.v, a.g, a.beta, a.state, a.out,
                                                                     a.n_tokens, a.n_k_heads, a.n_v_heads, a.k_dim,
                                                                     a.v_dim, a.scale);
    else
        MM_LAUNCH(grid, kDnWarps * kWarp, 0, stream, delta_rule_kernel<32>)(a.q, a.k, a.v, a.g, a.beta, a.state, a.out,
                                                                     a.n_tokens, a.n_k_heads, a.n_v_heads, a.k_dim,
                                                                     a.v_dim, a.scale);
    CUDA_CHECK_LAUNCH();
}

}  // namespace moemesh::cuda
