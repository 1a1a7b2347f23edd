// Every CPU kernel entry point, with shapes. Row-major; "[m, k]" means m rows of k contiguous floats.
// Weight matrices are stored as in GGUF: W[n_out, k] with each row of k elements in the weight type
// (row stride ggml_row_bytes(type, k)); y = x · Wᵀ.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "common/ggml_types.h"
#include "kernels/rope_yarn.h"

namespace moemesh {

// ---- threads (kernels/cpu/thread_pool.cpp) ----
class ThreadPool {
public:
    explicit ThreadPool(int n_threads);  // n_threads <= 0: all hardware threads
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;
    int size() const;
    // Splits [0, n) into contiguous chunks and calls fn(begin, end) on the pool, the calling thread
    // included; returns when every chunk is done. Not reentrant.
    void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// The instruction set the CPU kernels run with: "avx512vnni", "avxvnni", "avx2" or "scalar" (the
// best this CPU has; MOEMESH_CPU_ISA picks another, see quants::simd_level()).
const char* cpu_kernel_isa();

// ---- weight types (kernels/cpu/quants.cpp) ----
// Reference quantizer (as ggml's quantize_row_*_ref): n floats → row of type t. n % block == 0.
// Returns bytes written (= ggml_row_bytes(t, n)). Supports F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q2_K, Q3_K,
// Q4_K, Q5_K, Q6_K (not the computable i-quants IQ1_S...IQ3_S: no quantizer).
size_t quantize_row(GgmlType t, const float* src, void* dst, int64_t n);
// Row of type t → n floats.
void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n);

// ---- matrix products (kernels/cpu/matmul.cpp) ----
// Y[m, n_out] = X[m, k] · W[n_out, k]ᵀ, threads over n_out (and m when large).
// X is first converted to the activation type llama.cpp's CPU backend pairs with the weight type
// (F32→F32, F16→F16, BF16→BF16, Q8_0/Q5_0/Q4_0→Q8_0, Q2_K/Q3_K/Q4_K/Q5_K/Q6_K and the i-quants→Q8_K), so results track llama.cpp.
void matmul(ThreadPool& pool, GgmlType wt, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m,
            float* y);
// Several products in one parallel region (no thread hand-off between them): the experts of a MoE
// layer. Job j: jobs[j].y[m, n_out] = jobs[j].x[m, k] · W_jᵀ. Consecutive jobs with the same x, k and
// m (an expert's gate and up) convert x once. Each y is the same bits matmul gives.
struct MatmulJob {
    GgmlType wt;
    const void* w;
    int64_t n_out, k;
    const float* x;
    int64_t m;
    float* y;
};
void matmul_many(ThreadPool& pool, const MatmulJob* jobs, int64_t n_jobs);

// ---- elementwise / normalisation (kernels/cpu/norm.cpp, activations.cpp) ----
// y[t, :] = x[t, :] / sqrt(mean(x²) + eps) * w, for rows t < rows of width n. y may alias x.
void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps);
// y = silu(g) * u over n elements. y may alias g.
void swiglu(const float* g, const float* u, float* y, int64_t n);
// In-place softmax over n elements.
void softmax_inplace(float* x, int64_t n);

// ---- RoPE (kernels/cpu/rope.cpp) ----
// NEOX rotation of the first rot_dim dims of each head: x[t, h, 0..head_dim), pos[t], with the
// frequency base and linear / YaRN scaling of p (kernels/rope_yarn.h; RopeParams{} is plain RoPE).
void rope_neox(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t rot_dim, const int32_t* pos,
               const RopeParams& p);

// ---- attention (kernels/cpu/attention.cpp) ----
// Causal GQA attention for T new queries at positions n_past..n_past+T-1 against a cache holding
// keys/values for positions 0..n_past+T-1.
//   q:   [T, n_head, head_dim] f32
//   k,v: cache [n_ctx, n_head_kv, head_dim], f16 (kv_f16) or f32
//   out: [T, n_head, head_dim] f32;  q head h reads kv head h / (n_head / n_head_kv).
// With kv_f16, q and the softmax weights are rounded to f16 before their products, as llama.cpp's
// CPU backend does with an f16 KV cache, so results track the reference.
struct AttentionArgs {
    const float* q;
    const void* k;
    const void* v;
    float* out;
    int64_t n_tokens, n_past, n_head, n_head_kv, head_dim;
    bool kv_f16;
    float scale;
};
void attention(ThreadPool& pool, const AttentionArgs& a);

// ---- gated DeltaNet (kernels/cpu/delta_net.cpp): Qwen3-Next linear-attention layers, MODEL_SPEC §2.5 ----
// All math in fp32 with the formulas llama.cpp's graph uses (ggml_ssm_conv, ggml_l2_norm, the
// delta-rule recurrence / chunked form of llm_build_delta_net_base), so results track the reference.
// Causal depthwise conv1d over T tokens with carried state, followed by SiLU.
//   x:     [T, C] pre-conv inputs (the concatenated q|k|v channels)
//   w:     [C, K] taps per channel (GGUF ssm_conv1d has ne {K, C}, so row c holds its K taps);
//          w[c*K + j] multiplies the input at time t-(K-1)+j, i.e. w[c*K + K-1] the current token
//   state: [K-1, C] the K-1 inputs before x[0] (oldest first; zeros for a new sequence);
//          on return holds the last K-1 inputs of [state; x] (the cache for the next call)
//   y:     [T, C] = silu(conv); must not alias x
void conv1d_silu_causal(ThreadPool& pool, const float* x, const float* w, float* state, float* y, int64_t T,
                        int64_t C, int64_t K);

// In place: x[r, :] *= 1 / max(||x[r, :]||₂, eps) for rows r < rows of width n (ggml_l2_norm).
void l2norm_rows(float* x, int64_t rows, int64_t n, float eps);

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) * w * silu(z[r, :]) (plain RMSNorm weight w[n];
// the norm comes before the gate). y may alias x.
void rmsnorm_gated(const float* x, const float* w, const float* z, float* y, int64_t rows, int64_t n, float eps);

// One call of the gated delta rule over T tokens of one sequence.
// V-head j reads k-head j / (n_v_heads / n_k_heads) (contiguous repeat per k-head).
struct DeltaNetArgs {
    const float* q = nullptr;     // [T, Hk, Dk] l2-normalised; `scale` is applied inside
    const float* k = nullptr;     // [T, Hk, Dk] l2-normalised
    const float* v = nullptr;     // [T, Hv, Dv]
    const float* g = nullptr;     // [T, Hv] log-decay (≤ 0): S ← exp(g)·S before each token's update
    const float* beta = nullptr;  // [T, Hv] in (0, 1)
    float* state = nullptr;       // [Hv, Dk, Dv] S[j][i][c], fp32; read and updated in place
    float* out = nullptr;         // [T, Hv, Dv]
    int64_t n_tokens = 0, n_k_heads = 0, n_v_heads = 0, k_dim = 0, v_dim = 0;
    float scale = 1.0f;           // multiplies q (llama.cpp: 1/sqrt(Dk))
};

// Exact recurrence, token by token (the decode step):
//   S ← exp(g)·S;  u = Sᵀk;  δ = β(v − u);  S ← S + k⊗δ;  o = Sᵀ(scale·q)
void gated_delta_rule_recurrent(ThreadPool& pool, const DeltaNetArgs& a);
// Chunked (WY) form for prompt processing, chunk length `chunk` (64 as llama.cpp); same result as
// the recurrence up to fp32 rounding, including the final state and a non-zero initial state.
void gated_delta_rule_chunked(ThreadPool& pool, const DeltaNetArgs& a, int64_t chunk = 64);
// Picks the recurrence for T == 1 and the chunked form otherwise (as llama.cpp does).
void gated_delta_rule(ThreadPool& pool, const DeltaNetArgs& a);


}  // namespace moemesh
