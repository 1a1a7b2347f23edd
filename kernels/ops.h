// Every CPU kernel entry point, with shapes. Row-major; "[m, k]" means m rows of k contiguous floats.
// Weight matrices are stored as in GGUF: W[n_out, k] with each row of k elements in the weight type
// (row stride ggml_row_bytes(type, k)); y = x · Wᵀ.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "common/ggml_types.h"

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

// ---- weight types (kernels/cpu/quants.cpp) ----
// Reference quantizer (as ggml's quantize_row_*_ref): n floats → row of type t. n % block == 0.
// Returns bytes written (= ggml_row_bytes(t, n)). Supports F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K.
size_t quantize_row(GgmlType t, const float* src, void* dst, int64_t n);
// Row of type t → n floats.
void dequantize_row(GgmlType t, const void* src, float* dst, int64_t n);

// ---- matrix products (kernels/cpu/matmul.cpp) ----
// Y[m, n_out] = X[m, k] · W[n_out, k]ᵀ, threads over n_out (and m when large).
// X is first converted to the activation type llama.cpp's CPU backend pairs with the weight type
// (F32→F32, F16→F16, BF16→BF16, Q8_0/Q4_0→Q8_0, Q4_K/Q6_K→Q8_K), so results track llama.cpp.
void matmul(ThreadPool& pool, GgmlType wt, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m,
            float* y);

// ---- elementwise / normalisation (kernels/cpu/norm.cpp, activations.cpp) ----
// y[t, :] = x[t, :] / sqrt(mean(x²) + eps) * w, for rows t < rows of width n. y may alias x.
void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps);
// y = silu(g) * u over n elements. y may alias g.
void swiglu(const float* g, const float* u, float* y, int64_t n);
// In-place softmax over n elements.
void softmax_inplace(float* x, int64_t n);

// ---- RoPE (kernels/cpu/rope.cpp) ----
// NEOX rotation of the first rot_dim dims of each head: x[t, h, 0..head_dim), pos[t].
void rope_neox(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t rot_dim, const int32_t* pos,
               float theta);

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

}  // namespace moemesh
