// Every CUDA kernel entry point, with shapes. Same conventions as kernels/ops.h: row-major, "[m, k]"
// means m rows of k contiguous elements; weights as stored in GGUF, W[n_out, k] with each row of k
// elements in the weight type (ggml block layouts, kernels/cpu/quants_internal.h), y = x · Wᵀ.
//
// Every pointer is a device pointer (cudaMalloc), every launcher is asynchronous on `stream`, and
// none allocates: where scratch is needed the caller passes it, sized by the matching *_bytes()
// (one exception: matmul's cuBLAS path for prompts keeps a scratch per stream, see matmul).
// Activations are f32 everywhere; the weight is dequantized in registers (X is quantized to int8 by
// the decode GEMVs that say so, and rounded by matmul's cuBLAS path; llama.cpp's CPU path quantizes
// X to Q8_0/Q8_K, so results differ from kernels/ops.h by that).
//
// Built only with -DMOEMESH_CUDA=ON/AUTO (library moemesh_cuda); nothing else links it unless asked.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <cuda_runtime.h>

#include "common/ggml_types.h"
#include "kernels/rope_yarn.h"

// Broken invariant in a CUDA call: print file:line and the CUDA error, then abort.
#define CUDA_CHECK(expr)                                                                                \
    do {                                                                                                \
        const cudaError_t cuda_check_err_ = (expr);                                                     \
        if (cuda_check_err_ != cudaSuccess) {                                                           \
            std::fprintf(stderr, "%s:%d: CUDA error %s (%s) in %s\n", __FILE__, __LINE__,               \
                         cudaGetErrorName(cuda_check_err_), cudaGetErrorString(cuda_check_err_), #expr); \
            std::abort();                                                                               \
        }                                                                                               \
    } while (0)

namespace moemesh::cuda {

// Number of usable CUDA devices; 0 (and the reason in *why, if given) when there is no driver, no
// device, or the runtime cannot talk to it. Never aborts: callers use it to skip GPU work.
int device_count(const char** why = nullptr);
// Why device `index` (< device_count()) cannot run this build's kernels, or "" when it can: a GPU of
// a compute capability that the build has no code for (the default build, 90;120, on an sm_89 RTX
// 4090 or sm_86 RTX 3090), found by asking the runtime for one of our kernels there. The message
// names the GPU, its capability, the build's architectures and the CMake flag that adds it.
std::string kernels_unavailable(int index);

// Kernel switches for A/B runs (kernels/cuda/common.cuh; 0, the default: the next kernel is signalled
// right after a kernel's dependency wait, and GEMVs prefetch their weight rows into L2, before that
// wait where the rows depend on no other kernel; the gate/up GEMV prefetches the down GEMV's expert
// matrices once its warps have read their rows). kernel_switches_from_env: MOEMESH_CUDA_PDL_TRIGGER=exit,
// MOEMESH_CUDA_PREFETCH=0 and MOEMESH_CUDA_EXPERT_PREFETCH=0|early as bits. set_kernel_switches sets
// them for every kernel file on the current device (a synchronous copy: not while a stream is being
// captured); use_env_kernel_switches does that with the environment's once per device (nothing when
// it sets none). kernel_switch_copies: how many files registered their copy (one per kernel file);
// kernel_switches_seen: the value matmul.cu's kernels read on the current device (a launch and a
// synchronous copy), as a check.
inline constexpr unsigned kSwitchTriggerAtExit = 1u;        // MOEMESH_CUDA_PDL_TRIGGER=exit
inline constexpr unsigned kSwitchNoPrefetch = 2u;           // MOEMESH_CUDA_PREFETCH=0 (every L2 prefetch)
inline constexpr unsigned kSwitchNoExpertPrefetch = 4u;     // MOEMESH_CUDA_EXPERT_PREFETCH=0
inline constexpr unsigned kSwitchExpertPrefetchEarly = 8u;  // MOEMESH_CUDA_EXPERT_PREFETCH=early
unsigned kernel_switches_from_env();
cudaError_t set_kernel_switches(unsigned switches);
cudaError_t use_env_kernel_switches();
int kernel_switch_copies();
unsigned kernel_switches_seen();

// Our kernels loaded onto the current device now. CUDA loads a kernel at its first launch (lazy
// loading, the default since CUDA 12.2), which puts tens of ms into a process's first prompt; the
// all-or-nothing CUDA_MODULE_LOADING=EAGER would also load every kernel of cuBLAS and NCCL (hundreds
// of MB of VRAM and seconds). So the libraries stay lazy and this loads every function of each of
// our modules (one per kernel file, found through common.cuh's anchor kernel) with the driver's
// cuFuncLoad (CUDA 12.4+ drivers; entry points through the runtime, no libcuda link). Once per
// device, the report cached; MOEMESH_CUDA_LOAD_KERNELS=0 skips it (error then says so). Failure
// is not fatal: the kernels still load at their first launch. The emulator has no modules (0, no
// error).
struct KernelLoad {
    int modules = 0;     // our modules found
    int functions = 0;   // their functions
    int loaded_now = 0;  // of those, not loaded before this call
    double ms = 0;
    std::string error;   // "" when every function of every module is loaded
};
KernelLoad load_own_kernels();
// How many functions of our modules the driver reports not loaded on the current device (-1 with
// `why` where it cannot tell: emulator, old driver). For tests.
int own_kernels_not_loaded(std::string* why = nullptr);

// ---- matrix products (kernels/cuda/matmul.cu) ----
// Y[m, n_out] = X[m, k] · W[n_out, k]ᵀ for W of type wt ∈ {F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q2_K,
// Q3_K, Q4_K, Q5_K, Q6_K, Q4_1, Q5_1, IQ4_NL, IQ4_XS, MXFP4, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
// IQ1_S, IQ1_M} (matmul_supported). k % block_size(wt) == 0 and k % 8 == 0; W 16-byte aligned.
// (Q4_1 … IQ1_M: a dequantizing f32-activation GEMV only.)
// m <= kMatmulGemvMaxM (32): the decode GEMV, in launches of up to 8 X rows (weight bytes read once
// per launch; a short prompt's 16 rows cost two GEMVs, ~4x less than one 64-row tile pass on an
// H200: 105 µs for q4_k 4096×2048 at m = 16 in the tiled kernel). For the quantized types with
// m >= 2 or >= 16384 rows (lm_head) it quantizes X to int8 per 32 elements first (as llama.cpp's
// mmvq and the CPU matmul do; relative error vs the exact f32 product ~5e-3) and uses __dp4a;
// otherwise an f32-activation GEMV (exact up to summation order). MOEMESH_CUDA_GEMV=old: f32 GEMV
// always; =new: the int8 GEMV for every quantized type at every size.
// larger m: cuBLAS where it can be loaded (kernels/cuda/blas.cpp): quantized W dequantized in chunks
// of up to 64 MiB, to f16 with X in f16, both scaled against f16's range (MOEMESH_CUDA_BLAS_TYPE=f16,
// the default), or to f32 with f32 X on the TF32 tensor cores (=tf32); either ~3e-4 relative error vs
// the exact product (the int8 X's is ~5e-3); F16 / BF16 W as stored with X rounded to W's type
// (as the CPU does); F32 W exact (f32 products). The one exception to "none allocates": a scratch
// per (device, stream), kept until exit. Otherwise (cuBLAS absent, MOEMESH_CUDA_BLAS=0, the stream being captured, no
// memory for the scratch) a tiled kernel that dequantizes 64×32 W tiles into shared memory (f32 X).
// MOEMESH_CUDA_BLAS_MIN_ROWS=N: cuBLAS from N rows (default 33), GEMV sizes included;
// MOEMESH_CUDA_BLAS_CHUNK_MIB=N: the W chunk's cap.
inline constexpr int64_t kMatmulGemvMaxM = 32;
// Whether cuBLAS is on and loads in this process (*why: the library and the form of quantized W
// (MOEMESH_CUDA_BLAS_TYPE), or why not; with
// MOEMESH_CUDA_BLAS=0 it is not loaded); blas_gemms: how many products matmul has given it so far
// (tests and benchmarks check the path taken).
bool blas_ready(std::string* why = nullptr);
uint64_t blas_gemms();
// blas_grouped_calls: matmul_grouped's cublasGemmGroupedBatchedEx calls (their products count in blas_gemms).
uint64_t blas_grouped_calls();
// blas_half_gemms: of blas_gemms, those on f16 operands (F16 W, and quantized W under
// MOEMESH_CUDA_BLAS_TYPE=f16, the default; =tf32: f32 W and X on the TF32 tensor cores).
uint64_t blas_half_gemms();
bool matmul_supported(GgmlType wt);
void matmul(GgmlType wt, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m, float* y,
            cudaStream_t stream = nullptr);

// A prompt's MoE grouped by expert (ggml's mul_mat_id with the rows sorted by expert): for each group
// g < groups with count[g] > 0, Y[offset[g] + i, n_out] = X[offset[g] + i, k] · W_gᵀ for i < count[g],
// W_g = w[g] (n_out × k of type wt). w, count and offset are host arrays (w's entries device
// pointers; unused where count is 0). Groups of MOEMESH_CUDA_BLAS_GROUPED_MIN_ROWS rows or more (33 by
// default, as matmul) through cuBLAS — X rounded once, W dequantized up to 32 matrices at a time, one
// grouped GEMM per batch —, the others by matmul (the GEMV chunks). With that minimum at
// MOEMESH_CUDA_BLAS_MIN_ROWS (both default) the results are those of matmul per group.
void matmul_grouped(GgmlType wt, const void* const* w, const int64_t* count, const int64_t* offset, int64_t groups,
                    int64_t n_out, int64_t k, const float* x, float* y, cudaStream_t stream = nullptr);

// Expert-indexed GEMV (ggml's mul_mat_id for one token): n_sel products in one launch,
//   Y[s, n_out] = X[s, k] · W_{ids[s]}ᵀ   for s < n_sel,
// where W_e = w + e * matrix_bytes (an [E, n_out, k] GGUF expert tensor: matrix_bytes =
// n_out * ggml_row_bytes(wt, k)), ids: [n_sel] int32 on the device, X rows x_stride floats apart
// (0: all selections read the same row). Same GEMV kernels as matmul with m = 1.
void matmul_id(GgmlType wt, const void* w, size_t matrix_bytes, const int32_t* ids, int64_t n_sel, int64_t n_out,
               int64_t k, const float* x, int64_t x_stride, float* y, cudaStream_t stream = nullptr);

// Up to kMultiGemvMax single-row products sharing x and the weight type in one launch (a decode
// step's q/k/v): y_j[n_out_j] = x[k] · W_jᵀ, bit-identical to matmul(W_j, x, m = 1) one by one (one
// warp per row of the concatenated rows, the same dot product). Returns false, launching nothing,
// where one of them would not take the f32-activation GEMV (the int8-X GEMV by size or
// MOEMESH_CUDA_GEMV=new), or for n outside 2..kMultiGemvMax.
inline constexpr int kMultiGemvMax = 4;
// qx: x quantized (qx_bytes below); where qx_takes, the products read it instead of x.
// rope: a decode token's q, k, v (n == 3, y = {q, k, v}) finished per head in the GEMV's last block
// of that head's rows: norm_rope_store_kv's work (T = 1) with its bits; taken where head_dim is
// 128 (one 4-warp block's threads), both norms are set and rot_dim is even and <= head_dim, else
// false, launching nothing (the caller then runs the GEMV and norm_rope_store_kv).
struct QkvRope {
    const float* q_norm;
    const float* k_norm;
    float eps;
    int64_t n_head, n_head_kv, head_dim, rot_dim;
    int32_t p0;
    const int32_t* p0_dev;  // p0 from the device when set
    RopeParams rope;
    void* k_cache;
    void* v_cache;
    bool f16;
    unsigned* counters;  // n_head + 2 · n_head_kv unsigned of device memory, zero, left zero
};
bool matmul_multi_gemv(GgmlType wt, int n, const void* const* w, const int64_t* n_out, int64_t k, const float* x,
                       float* const* y, cudaStream_t stream = nullptr, const uint8_t* qx = nullptr,
                       const QkvRope* rope = nullptr);

// A decode step's expert gate and up products and SwiGLU in one launch:
//   Y[s, n_out] = silu(X[s] · G_{ids[s]}ᵀ) ⊙ (X[s] · U_{ids[s]}ᵀ)   for s < n_sel,
// bit-identical to matmul_id(gate), matmul_id(up), swiglu (the same dot products and reductions,
// one warp per row computing both). Returns false, launching nothing, where that path would not be
// the f32-activation GEMV (the int8-X GEMV by size or MOEMESH_CUDA_GEMV=new) or gate and up
// differ in type or layout: the caller then runs the three launches.
// qx (with x_stride 0): x quantized, read instead of x where qx_takes.
// next (with next_matrix_bytes > 0): the matrices the launch after this one reads for the same
// selections (a decode step's down projections): each selection's next + ids[s] · next_matrix_bytes,
// next_matrix_bytes long, is prefetched into L2 by this launch's blocks (a hint: results are the same;
// kSwitchNoExpertPrefetch / kSwitchExpertPrefetchEarly). For a few selections (a decode step), not a
// prompt's hundreds.
bool matmul_id_swiglu(GgmlType wt, const void* gate, const void* up, size_t matrix_bytes, const int32_t* ids,
                      int64_t n_sel, int64_t n_out, int64_t k, const float* x, int64_t x_stride, float* y,
                      cudaStream_t stream = nullptr, const uint8_t* qx = nullptr, const void* next = nullptr,
                      size_t next_matrix_bytes = 0);

// ---- X quantized once for the decode GEMVs ("qx") ----
// One X row of k floats as the int8-X GEMVs read it, llama.cpp Q8_1-style: int8 quants [k], then per
// 32 elements the scale d = amax / 127 [k/32] and d rounded to f16 [k/32] (for Q8_0 / Q4_0 / Q5_0
// weights, as the CPU's Q8_0 activations), then d · Σq per 16 elements [k/16] (the K-quant min
// terms). rmsnorm / add_rmsnorm (qx_norm_ok) and attention (AttentionArgs::out_qx) write it next to
// their output; matmul_qx, matmul_multi_gemv and matmul_id_swiglu read it instead of x: the dot products of the in-block int8-X kernel (the same
// quantization, so the same sums) without quantizing X again in every block. Not bit-identical to
// the f32-X GEMV (X is rounded to 8 bits: relative error ~5e-3, as the CPU's quantized X).
#ifdef __CUDACC__
__host__ __device__
#endif
inline size_t qx_bytes(int64_t k) { return static_cast<size_t>(k + 8 * (k / 32) + 4 * (k / 16)); }
// Whether the norms can write the quantized row of n elements (n % 256 == 0, n <= 4096).
bool qx_norm_ok(int64_t n);
// Whether a single-row product of type wt over k (rows = n_out · selections) reads qx when given it:
// the int8-X types, k % 256 == 0, and where the f32-X GEMV would run otherwise.
bool qx_takes(GgmlType wt, int64_t k, int64_t rows);
// y[n_out] = x̂ · Wᵀ from the quantized row qx; false (nothing launched) where !qx_takes.
bool matmul_qx(GgmlType wt, const void* w, int64_t n_out, int64_t k, const uint8_t* qx, float* y,
               cudaStream_t stream = nullptr);
// matmul_qx of one row, then add_rmsnorm(x, t, nw, y, 1, n_out, eps) with y's quantized twin into
// qy, in one launch (the GEMV's last block to finish adds and norms; same bits as the two calls).
// qy may be qx's buffer. counter: one unsigned of device memory, zero (left zero). false, nothing
// launched, where matmul_qx would decline or the norm cannot write a twin (qx_norm_ok(n_out)).
bool matmul_qx_add_rmsnorm(GgmlType wt, const void* w, int64_t n_out, int64_t k, const uint8_t* qx, float* t,
                           float* x, const float* nw, float* y, float eps, uint8_t* qy, unsigned* counter,
                           cudaStream_t stream = nullptr);
// Single-row products of n_sel matrices that lie anywhere (expert-cache slices), in one launch:
//   Y[s, n_out] = X[s] · W_sᵀ  with W_s at w[s] (w: a device array of n_sel pointers), X[s] at x + s · x_stride;
// matmul_ptr_swiglu: Y[s] = silu(X[s] · G_sᵀ) ⊙ (X[s] · U_sᵀ). Bit-identical to matmul (m = 1) per
// selection (then swiglu). Return false, launching nothing, where that matmul would take the int8-X
// GEMV (n_out >= 16384, MOEMESH_CUDA_GEMV=new) or for the rarer types: the caller then launches per
// selection. next (matmul_ptr_swiglu): a device array of n_sel matrices of next_matrix_bytes each that
// the launch after reads (the down projections), prefetched into L2 as matmul_id_swiglu's next.
// Whether matmul_ptr / matmul_ptr_swiglu take this type and shape (n_out rows of k).
bool matmul_ptr_takes(GgmlType wt, int64_t n_out, int64_t k);
bool matmul_ptr(GgmlType wt, const void* const* w, int64_t n_sel, int64_t n_out, int64_t k, const float* x,
                int64_t x_stride, float* y, cudaStream_t stream = nullptr);
bool matmul_ptr_swiglu(GgmlType wt, const void* const* gate, const void* const* up, int64_t n_sel, int64_t n_out,
                       int64_t k, const float* x, int64_t x_stride, float* y, cudaStream_t stream = nullptr,
                       const void* const* next = nullptr, size_t next_matrix_bytes = 0);

// A decode step's expert down products and the router-weighted sum in one launch:
//   out[n_out] = Σ_j w[j] · (g[j] · D_{ids[j]}ᵀ)   for j < n_sel (<= 16), g: [n_sel, k],
// bit-identical to matmul_id then moe_combine. Where matmul_id would take the int8-X GEMV (from
// 16384 rows on: on an H200 that GEMV and the combine were 5% faster per decode step than this
// kernel with f32 X) it runs that GEMV into y [n_sel, n_out] with the sum in its last block when
// given y and counter (one unsigned of device memory, zero, left zero), else returns false,
// launching nothing; also false for the rarer types and n_sel > 16: the caller then runs the two
// launches. With norm (the int8-X GEMV's last block only, n_out % 256 == 0 and <= 4096; else false,
// launching nothing) that block then also runs add_rmsnorm(norm->x, out, norm->w, norm->y, 1, n_out,
// norm->eps, stream, norm->qy) with its bits: the residual add + the next layer's input norm.
struct AddNorm {
    float* x;         // [n_out] residual, += out
    const float* w;   // [n_out] norm weight
    float* y;         // [n_out] rmsnorm(x) · w
    float eps;
    uint8_t* qy;      // y quantized (qx_bytes(n_out)), or null
};
bool matmul_id_down_combine(GgmlType wt, const void* down, size_t matrix_bytes, const int32_t* ids, const float* w,
                            int64_t n_sel, int64_t n_out, int64_t k, const float* g, float* out,
                            cudaStream_t stream = nullptr, float* y = nullptr, unsigned* counter = nullptr,
                            const AddNorm* norm = nullptr);

// Y[rows, k] = W[rows, k] dequantized to f32, bit-identical to the CPU's dequantize_row (the tiled
// matmul's dequantizer, kernels/cuda/matmul.cu load8). Same types and shape rules as matmul.
void dequantize_rows(GgmlType wt, const void* w, int64_t rows, int64_t k, float* y, cudaStream_t stream = nullptr);

// ---- elementwise / normalisation (kernels/cuda/norm.cu) ----
// y[r, :] = x[r, :] / sqrt(mean(x²) + eps) * w (w may be null: no weight). y may alias x.
// qx (qx_norm_ok(n)): also row r of y quantized at qx + r · qx_bytes(n).
void rmsnorm(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps,
             cudaStream_t stream = nullptr, uint8_t* qx = nullptr);
// x[rows, n] += t, then y = rmsnorm(x) · w, in one launch with the bits of add_inplace then rmsnorm
// (the residual add before a layer's second norm). y must not alias x or t.
void add_rmsnorm(float* x, const float* t, const float* w, float* y, int64_t rows, int64_t n, float eps,
                 cudaStream_t stream = nullptr, uint8_t* qx = nullptr);
// y[r, :] = rmsnorm(x[r, :]) * w * silu(z[r, :]). y may alias x.
void rmsnorm_gated(const float* x, const float* w, const float* z, float* y, int64_t rows, int64_t n, float eps,
                   cudaStream_t stream = nullptr);
// In place: x[r, :] /= max(||x[r, :]||₂, eps).
void l2norm_rows(float* x, int64_t rows, int64_t n, float eps, cudaStream_t stream = nullptr);
// y = silu(g) * u over n elements. y may alias g.
void swiglu(const float* g, const float* u, float* y, int64_t n, cudaStream_t stream = nullptr);
// y += x over n elements (residual add).
void add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream = nullptr);
// In place softmax of each row of x[rows, n].
void softmax_rows(float* x, int64_t rows, int64_t n, cudaStream_t stream = nullptr);

// ---- RoPE (kernels/cuda/rope.cu) ----
// In place NEOX rotation of the first rot_dim dims of each head of x[tokens, heads, head_dim];
// pos: [tokens] int32 on the device. Angles and scaling built as kernels/cpu/rope.cpp builds them.
void rope_neox(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t rot_dim, const int32_t* pos,
               const RopeParams& p, cudaStream_t stream = nullptr);
// rope_neox of q [T, n_head, head_dim] and k [T, n_head_kv, head_dim] (both in place) at positions
// p0 .. p0 + T - 1, then k and v [T, n_head_kv · head_dim] stored at row p0 of the caches (f16 rounded
// as f32_to_f16, or f32), all in one launch: the same bits as rope_neox twice, f32_to_f16 /
// a copy twice. p0_dev: read p0 from the device instead (a graph replayed at the next position).
void rope_store_kv(float* q, float* k, const float* v, int64_t T, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                   int64_t rot_dim, int32_t p0, const int32_t* p0_dev, const RopeParams& p, void* k_cache,
                   void* v_cache, bool f16, cudaStream_t stream = nullptr);
// rmsnorm of every head of q by q_norm and of k by k_norm [head_dim] (in place), then rope_store_kv,
// in one launch with the bits of those three calls. false (nothing done) unless head_dim % 32 == 0
// and head_dim <= 256.
bool norm_rope_store_kv(float* q, float* k, const float* v, const float* q_norm, const float* k_norm, float eps,
                        int64_t T, int64_t n_head, int64_t n_head_kv, int64_t head_dim, int64_t rot_dim, int32_t p0,
                        const int32_t* p0_dev, const RopeParams& p, void* k_cache, void* v_cache, bool f16,
                        cudaStream_t stream = nullptr);

// ---- router (kernels/cuda/topk.cu) ----
// For each token t: softmax over logits[t, 0..E), the K largest (ties: lower expert id first, as
// coordinator/models/qwen3moe.cpp route()), ids[t, K] in descending probability, weights[t, K]
// the probabilities, renormalised to sum 1 when norm_topk. logits is overwritten with the softmax.
// E <= 1024, K <= 32.
void softmax_topk(float* logits, int64_t tokens, int64_t E, int64_t K, bool norm_topk, int32_t* ids, float* weights,
                  cudaStream_t stream = nullptr);

// ids[r] = the index of the largest of x[r, 0..n) (lowest index on ties; a NaN never wins, except at
// index 0, which nothing then beats): sampler.h argmax() per row, for greedy decoding without
// downloading the logits (two launches). workspace: argmax_workspace_bytes(rows, n) bytes of device
// memory. n <= 4M, rows <= 65535.
size_t argmax_workspace_bytes(int64_t rows, int64_t n);
void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* ids, void* workspace, cudaStream_t stream = nullptr);

// One decode token's router in one launch (kernels/cuda/matmul.cu): logits = W · x (matmul's bits),
// then softmax_topk of them: probs[E] the softmax, ids/weights[K]. W [E, k] F32, F16 or BF16 (the
// router's types), k % 8 == 0; E <= 1024, K <= 32. counter: one unsigned of device memory, zero
// (and left zero). false, nothing launched, where !matmul_route_takes (other weight types, sizes).
bool matmul_route_takes(GgmlType wt, int64_t E, int64_t k, int64_t K);
bool matmul_route(GgmlType wt, const void* w, int64_t E, int64_t k, const float* x, int64_t K, bool norm_topk,
                  float* probs, int32_t* ids, float* weights, unsigned* counter, cudaStream_t stream = nullptr);

// ids[r, 0..k) / vals[r, 0..k) = the k largest of x[r, 0..n) by decreasing value, the lower index
// first on equal values (sampler.h top_k_ids' order), and their values: sampling's candidates
// without downloading the logits (two launches). NaNs are never taken; where fewer than k values
// can be, the rest are -1 / -inf. k <= kTopKMax, k <= n, ceil(n / 4096) · k <= 4096 (k = 64:
// n <= 262144). workspace: top_k_workspace_bytes(rows, n, k) bytes of device memory.
constexpr int64_t kTopKMax = 64;
size_t top_k_workspace_bytes(int64_t rows, int64_t n, int64_t k);
void top_k_rows(const float* x, int64_t rows, int64_t n, int64_t k, int32_t* ids, float* vals, void* workspace,
                cudaStream_t stream = nullptr);

// ---- attention (kernels/cuda/attention.cu) ----
// Causal GQA attention against a KV cache in VRAM, split over the key length (flash-decoding):
// each (token, head) reads its keys in chunks of at most kAttnSplit, one block per chunk (at least
// AttentionArgs::min_splits chunks of 16 keys or more: a short context still spreads over several
// blocks; 1: 256-key chunks, before session 17), then one pass merges the chunks. Layouts as
// AttentionArgs in kernels/ops.h:
//   q:   [T, n_head, head_dim] f32;  k, v: [n_ctx, n_head_kv, head_dim] f16 (kv_f16) or f32
//   out: [T, n_head, head_dim] f32;  token t sees keys 0..n_past+t.
// head_dim <= 256. workspace: attention_workspace_bytes() bytes of device memory.
constexpr int64_t kAttnSplit = 256;
inline constexpr int64_t kAttnMinSplits = 8;  // AttentionArgs::min_splits' default
struct AttentionArgs {
    const float* q;
    const void* k;
    const void* v;
    float* out;
    int64_t n_tokens, n_past, n_head, n_head_kv, head_dim;
    bool kv_f16;
    float scale;
    // Optional: out also quantized for the int8-X GEMVs, row t at out_qx + t · qx_bytes(n_head · head_dim)
    // (see "X quantized once"; head_dim % 32 == 0 and n_head · head_dim % 256 == 0).
    uint8_t* out_qx = nullptr;
    // Optional: n_tokens · n_head counters in device memory, zero (and left zero): each (token,
    // head)'s chunks are merged by its block that finishes last instead of by a second launch.
    unsigned* merge_counters = nullptr;
    // At least this many chunks per (token, head) (1..64; see above; MOEMESH_CUDA_ATTN_MIN_SPLITS
    // for the backend).
    int64_t min_splits = kAttnMinSplits;
};
size_t attention_workspace_bytes(const AttentionArgs& a);
// Prompts of MOEMESH_CUDA_ATTN_BLAS_MIN_TOKENS (64) tokens or more, without out_qx, go through cuBLAS
// where it loads (attention.cu: S = scale·QKᵀ per KV head, a masked softmax, O = PV; with an f16
// cache q and the softmax weights rounded to f16, as the CPU does); MOEMESH_CUDA_ATTN_BLAS=0 keeps
// the split kernel. attention_blas_calls: how many attention() calls took cuBLAS.
void attention(const AttentionArgs& a, void* workspace, cudaStream_t stream = nullptr);
uint64_t attention_blas_calls();
// The split kernel's grouped-query form (attention.cu): a block per (chunk, KV head, token) works
// the 2–16 query heads sharing that KV head, loading each K/V row once; the same bits as the
// per-head form. Taken where n_head / n_head_kv is 2..16 and that many heads' q fit (group ·
// head_dim <= 2048), unless MOEMESH_CUDA_ATTN_GQA=0 or MOEMESH_CUDA_ATTN_V=warps; counted here.
uint64_t attention_gqa_launches();
// The same attention with n_past read from device memory (*n_past_dev; a.n_past is ignored), for a
// launch recorded once in a CUDA graph and replayed at every position: the grid covers the splits of
// n_ctx keys (blocks past n_past + T exit at once), the merge reads only the splits in use, so the
// result is bitwise that of attention() at the same n_past. n_past + T <= n_ctx. workspace:
// attention_workspace_bytes(a, n_ctx).
size_t attention_workspace_bytes(const AttentionArgs& a, int64_t n_ctx);
void attention_dev(const AttentionArgs& a, const int32_t* n_past_dev, int64_t n_ctx, void* workspace,
                   cudaStream_t stream = nullptr);

// ---- gated DeltaNet (kernels/cuda/delta_net.cu), the contract of kernels/ops.h ----
// y[T, C] = silu(causal depthwise conv of [state; x] with w[C, K]); state[K-1, C] is updated to the
// last K-1 inputs. y must not alias x. K <= 8.
void conv1d_silu_causal(const float* x, const float* w, float* state, float* y, int64_t T, int64_t C, int64_t K,
                        cudaStream_t stream = nullptr);
// The delta-rule recurrence token by token (exact decode form; also runs T > 1):
//   S ← exp(g)·S;  u = Sᵀk;  δ = β(v − u);  S ← S + k⊗δ;  o = Sᵀ(scale·q)
//   q, k: [T, Hk, Dk] (l2-normalised); v: [T, Hv, Dv]; g, beta: [T, Hv];
//   state: [Hv, Dk, Dv] updated in place; out: [T, Hv, Dv]. V-head j reads k-head j / (Hv / Hk).
// Dk <= 256; Dv % 32 == 0.
struct DeltaNetArgs {
    const float* q = nullptr;
    const float* k = nullptr;
    const float* v = nullptr;
    const float* g = nullptr;
    const float* beta = nullptr;
    float* state = nullptr;
    float* out = nullptr;
    int64_t n_tokens = 0, n_k_heads = 0, n_v_heads = 0, k_dim = 0, v_dim = 0;
    float scale = 1.0f;
};
void gated_delta_rule_recurrent(const DeltaNetArgs& a, cudaStream_t stream = nullptr);
// The chunked (WY) form for prompts, the algebra of kernels/cpu/delta_net.cpp regrouped per 32 state
// columns (one block per 32 columns of a v-head, state in shared memory, chunks walked in order):
// the recurrence's result up to f32 rounding, final state included. chunk: tokens per chunk, 1..64;
// 0 picks delta_rule_chunk_len(k_dim). Same shape rules as the recurrence.
void gated_delta_rule_chunked(const DeltaNetArgs& a, int64_t chunk = 0, cudaStream_t stream = nullptr);
// The longest chunk (64, 32, 16 or 8 tokens) whose shared memory, 4·(2L(Dk+1) + 2L(L+1) + 32·Dk + 99L)
// bytes, the current device allows per block (H100/H200: 64 for Dk <= 256; 99 KB parts: 32 for
// Dk = 128); 0 if none.
int64_t delta_rule_chunk_len(int64_t k_dim);

// ---- around the main ops (kernels/cuda/model_ops.cu), for the GPU-resident forward pass ----
// x[i] *= sigmoid(gate[i]) over n elements.
void mul_sigmoid(float* x, const float* gate, int64_t n, cudaStream_t stream = nullptr);
// y[r, :] += x[r, :] · sigmoid(gate[r]) for r < rows of width n.
void add_gated_rows(float* y, const float* x, const float* gate, int64_t rows, int64_t n,
                    cudaStream_t stream = nullptr);
// Gated DeltaNet gates from ba [T, Hk, 2r] grouped per k-head as [b r | a r]: for v-head j = grp·r + i,
// beta[t, j] = sigmoid(b), g[t, j] = softplus(a + dt_bias[j]) · a_neg[j]. beta, g: [T, Hk·r].
void delta_gates(const float* ba, const float* dt_bias, const float* a_neg, float* beta, float* g, int64_t T,
                 int64_t Hk, int64_t r, cudaStream_t stream = nullptr);
// dst[i] = f16 bits of src[i] (round to nearest even), n elements (f16 KV-cache store).
void f32_to_f16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream = nullptr);
// dst[i] = start + i for i < n.
void iota_i32(int32_t* dst, int64_t n, int32_t start, cudaStream_t stream = nullptr);
// dst[i] = *start + i for i < n (start in device memory: CUDA-graph replays).
void iota_i32_dev(int32_t* dst, int64_t n, const int32_t* start, cudaStream_t stream = nullptr);
// KV-cache store at a position in device memory: cache[*pos · n + i] = src[i] for i < n, as f16 bits
// (rounded as f32_to_f16) when f16, else f32.
void store_row_dev(const float* src, void* cache, int64_t n, const int32_t* pos, bool f16,
                   cudaStream_t stream = nullptr);
// dst[s, :] = src[s / K, :] for s < T·K rows of `cols` floats (each row K times).
void repeat_rows(const float* src, float* dst, int64_t T, int64_t K, int64_t cols, cudaStream_t stream = nullptr);
// dst[i, :] = src[idx[i], :] for i < n rows of `cols` floats.
void gather_rows(const float* src, const int32_t* idx, float* dst, int64_t n, int64_t cols,
                 cudaStream_t stream = nullptr);
// MoE combine: out[t, :] = Σ_{j<K} w[t, j] · y[slot[t, j], :] (slot null: slot[t, j] = t·K + j),
// summed in j order. y: [n_slots, H]; w, slot: [T, K]; out: [T, H] (overwritten).
void moe_combine(const float* y, const int32_t* slot, const float* w, float* out, int64_t T, int64_t K, int64_t H,
                 cudaStream_t stream = nullptr);

}  // namespace moemesh::cuda
