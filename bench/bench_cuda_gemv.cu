// GEMV bandwidth per weight type on Qwen3-30B-A3B-like shapes (hidden 2048, expert ff 768,
// 128 experts top-8, 32/4 heads of 128, vocab 151936), against the device's measured copy bandwidth.
//
//   bench_cuda_gemv [reps] [prompt]   (MOEMESH_CUDA_GEMV=old|new|auto selects the GEMV kernels, see
//                                     matmul.cu; `prompt`: only the decode attention table and the
//                                     prompt tables, cuBLAS vs own kernels)
//
// GB/s counts the weight bytes each call reads (X and Y are < 0.1% of them). Each matrix is cycled
// through enough copies to exceed twice the L2 cache, so the numbers are DRAM numbers, and each
// call is timed alone with events (launch overhead included: that is what a decode step pays).
// "copy" is cudaMemcpy device-to-device of 1 GiB, counting bytes read + written; "H2D pinned" is
// cudaMemcpy host-to-device of 512 MiB from cudaMallocHost memory (what an expert cache's misses move).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/ops.h"

using namespace moemesh;

namespace {

int g_reps = 30;
double g_copy_gbs = 0.0;
size_t g_l2 = 0;

float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

double copy_bandwidth() {
    const size_t bytes = size_t{1} << 30;
    void *a, *b;
    CUDA_CHECK(cudaMalloc(&a, bytes));
    CUDA_CHECK(cudaMalloc(&b, bytes));
    CUDA_CHECK(cudaMemset(a, 1, bytes));
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int i = 0; i < 12; ++i) {
        CUDA_CHECK(cudaEventRecord(e0));
        CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
        CUDA_CHECK(cudaEventRecord(e1));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float t;
        CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
        if (i >= 2) ms.push_back(t);
    }
    CUDA_CHECK(cudaFree(a));
    CUDA_CHECK(cudaFree(b));
    CUDA_CHECK(cudaEventDestroy(e0));
    CUDA_CHECK(cudaEventDestroy(e1));
    return 2.0 * static_cast<double>(bytes) / (median(ms) * 1e-3) / 1e9;
}

double h2d_pinned_bandwidth() {
    const size_t bytes = size_t{512} << 20;
    void *h, *d;
    CUDA_CHECK(cudaMallocHost(&h, bytes));
    CUDA_CHECK(cudaMalloc(&d, bytes));
    std::memset(h, 1, bytes);
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int i = 0; i < 8; ++i) {
        CUDA_CHECK(cudaEventRecord(e0));
        CUDA_CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaEventRecord(e1));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float t;
        CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
        if (i >= 2) ms.push_back(t);
    }
    CUDA_CHECK(cudaFreeHost(h));
    CUDA_CHECK(cudaFree(d));
    CUDA_CHECK(cudaEventDestroy(e0));
    CUDA_CHECK(cudaEventDestroy(e1));
    return static_cast<double>(bytes) / (median(ms) * 1e-3) / 1e9;
}

// A device buffer of `n_mat` matrices [n_out, k] of type t, filled by repeating 64 quantized rows.
void* make_matrices(GgmlType t, int64_t n_out, int64_t k, int64_t n_mat, size_t* matrix_bytes) {
    const int64_t tmpl_rows = 64;
    const size_t rb = ggml_row_bytes(t, k);
    std::mt19937 rng(1);
    std::normal_distribution<float> dist(0.0f, 0.05f);
    std::vector<float> w(static_cast<size_t>(tmpl_rows * k));
    for (auto& x : w) x = dist(rng);
    std::vector<uint8_t> tmpl(rb * tmpl_rows);
    for (int64_t r = 0; r < tmpl_rows; ++r) quantize_row(t, &w[r * k], &tmpl[r * rb], k);
    *matrix_bytes = rb * n_out;
    const size_t total = *matrix_bytes * n_mat;
    uint8_t* d;
    CUDA_CHECK(cudaMalloc(&d, total));
    CUDA_CHECK(cudaMemcpy(d, tmpl.data(), std::min(total, tmpl.size()), cudaMemcpyHostToDevice));
    for (size_t have = tmpl.size(); have < total;) {  // doubling copies
        const size_t n = std::min(have, total - have);
        CUDA_CHECK(cudaMemcpy(d + have, d, n, cudaMemcpyDeviceToDevice));
        have += n;
    }
    return d;
}

// Median µs of call(i) for i = 3 .. g_reps + 2 (after 3 warm-ups), CUDA events around each call.
template <class F>
double median_us(F&& call) {
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int i = 0; i < g_reps + 3; ++i) {
        CUDA_CHECK(cudaEventRecord(e0));
        call(i);
        CUDA_CHECK(cudaEventRecord(e1));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float tm;
        CUDA_CHECK(cudaEventElapsedTime(&tm, e0, e1));
        if (i >= 3) ms.push_back(tm);
    }
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaEventDestroy(e0));
    CUDA_CHECK(cudaEventDestroy(e1));
    return median(ms) * 1e3;
}

// One table row: n_sel > 0 uses matmul_id over an [E=128] expert tensor with n_sel random ids.
void bench(const char* what, GgmlType t, int64_t n_out, int64_t k, int64_t m, int64_t n_sel = 0) {
    const size_t one = ggml_row_bytes(t, k) * n_out;
    const int64_t n_exp = 128;
    // Copies to cycle through so that consecutive calls miss L2.
    const int64_t n_mat = n_sel > 0 ? n_exp : std::max<int64_t>(2, static_cast<int64_t>(4 * g_l2 / one) + 1);
    size_t matrix_bytes = 0;
    auto* w = static_cast<uint8_t*>(make_matrices(t, n_out, k, n_mat, &matrix_bytes));
    const int64_t rows_x = std::max<int64_t>(m, n_sel);
    float *x, *y;
    int32_t* ids;
    CUDA_CHECK(cudaMalloc(&x, rows_x * k * sizeof(float)));
    CUDA_CHECK(cudaMemset(x, 0, rows_x * k * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&y, rows_x * n_out * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&ids, std::max<int64_t>(n_sel, 1) * n_exp * sizeof(int32_t)));
    // Per rep a different set of n_sel distinct experts.
    std::mt19937 rng(7);
    std::vector<int32_t> all_ids;
    const int64_t id_sets = 16;
    for (int64_t s = 0; s < id_sets && n_sel > 0; ++s) {
        std::vector<int32_t> perm(n_exp);
        for (int64_t i = 0; i < n_exp; ++i) perm[i] = static_cast<int32_t>(i);
        std::shuffle(perm.begin(), perm.end(), rng);
        all_ids.insert(all_ids.end(), perm.begin(), perm.begin() + n_sel);
    }
    if (n_sel > 0)
        CUDA_CHECK(cudaMemcpy(ids, all_ids.data(), all_ids.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    const double us = median_us([&](int i) {
        if (n_sel > 0)
            cuda::matmul_id(t, w, matrix_bytes, ids + (i % id_sets) * n_sel, n_sel, n_out, k, x, 0, y);
        else
            cuda::matmul(t, w + (i % n_mat) * matrix_bytes, n_out, k, x, m, y);
    });
    const double bytes = static_cast<double>(one) * static_cast<double>(std::max<int64_t>(n_sel, 1));
    const double gbs = bytes / (us * 1e-6) / 1e9;
    if (m > 8) {  // compute-bound: report TFLOP/s instead
        const double tflops = 2.0 * static_cast<double>(m) * n_out * k / (us * 1e-6) / 1e12;
        std::printf("| %-22s | %-4s | %6lld | %5lld | %3lld | %8.2f | %8.2f | %5.1f TFLOP/s | - |\n", what,
                    ggml_type_name(t), static_cast<long long>(n_out), static_cast<long long>(k),
                    static_cast<long long>(m), bytes / 1e6, us, tflops);
    } else {
        std::printf("| %-22s | %-4s | %6lld | %5lld | %3lld | %8.2f | %8.2f | %7.0f | %5.1f%% |\n", what,
                    ggml_type_name(t), static_cast<long long>(n_out), static_cast<long long>(k),
                    static_cast<long long>(n_sel > 0 ? n_sel : m), bytes / 1e6, us, gbs, 100.0 * gbs / g_copy_gbs);
    }
    std::fflush(stdout);
    CUDA_CHECK(cudaFree(w));
    CUDA_CHECK(cudaFree(x));
    CUDA_CHECK(cudaFree(y));
    CUDA_CHECK(cudaFree(ids));
}

// Median µs of matmul(t, n_out × k, m rows), cycling through copies of W that miss L2.
double time_matmul(GgmlType t, int64_t n_out, int64_t k, int64_t m) {
    const size_t one = ggml_row_bytes(t, k) * n_out;
    const int64_t n_mat = std::max<int64_t>(2, static_cast<int64_t>(4 * g_l2 / one) + 1);
    size_t matrix_bytes = 0;
    auto* w = static_cast<uint8_t*>(make_matrices(t, n_out, k, n_mat, &matrix_bytes));
    float *x, *y;
    CUDA_CHECK(cudaMalloc(&x, m * k * sizeof(float)));
    CUDA_CHECK(cudaMemset(x, 0, m * k * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&y, m * n_out * sizeof(float)));
    const double us = median_us([&](int i) { cuda::matmul(t, w + (i % n_mat) * matrix_bytes, n_out, k, x, m, y); });
    CUDA_CHECK(cudaFree(w));
    CUDA_CHECK(cudaFree(x));
    CUDA_CHECK(cudaFree(y));
    return us;
}

// One row of the prompt table: the product through cuBLAS (MOEMESH_CUDA_BLAS=1, its dequantization
// included; MOEMESH_CUDA_BLAS_MIN_ROWS=2, so GEMV sizes too) in both forms of quantized W (f16, the
// default, and MOEMESH_CUDA_BLAS_TYPE=tf32; F16 W is used as stored either way) and through the
// built-in kernels (=0: GEMV chunks up to 32 rows, then the tiled kernel), side by side.
void bench_prompt(const char* what, GgmlType t, int64_t n_out, int64_t k, int64_t m) {
    setenv("MOEMESH_CUDA_BLAS", "1", 1);
    setenv("MOEMESH_CUDA_BLAS_MIN_ROWS", "2", 1);
    const uint64_t g0 = cuda::blas_gemms();
    const double blas_us = time_matmul(t, n_out, k, m);
    const bool used = cuda::blas_gemms() > g0;
    setenv("MOEMESH_CUDA_BLAS_TYPE", "tf32", 1);
    const double tf32_us = time_matmul(t, n_out, k, m);
    unsetenv("MOEMESH_CUDA_BLAS_TYPE");
    unsetenv("MOEMESH_CUDA_BLAS_MIN_ROWS");
    setenv("MOEMESH_CUDA_BLAS", "0", 1);
    const double own_us = time_matmul(t, n_out, k, m);
    unsetenv("MOEMESH_CUDA_BLAS");
    const double flop = 2.0 * static_cast<double>(m) * n_out * k;
    std::printf("| %-20s | %-4s | %6lld | %5lld | %4lld | %9.1f%s | %6.1f | %9.1f | %9.1f | %6.1f | %5.2fx "
                "| %5.2fx |\n",
                what, ggml_type_name(t), static_cast<long long>(n_out), static_cast<long long>(k),
                static_cast<long long>(m), blas_us, used ? "" : " (not cuBLAS)", flop / (blas_us * 1e-6) / 1e12,
                tf32_us, own_us, flop / (own_us * 1e-6) / 1e12, own_us / blas_us, tf32_us / blas_us);
    std::fflush(stdout);
}

// One row of the prompt attention table: a T-token chunk after n_past keys on the Qwen3-30B-A3B
// shape (32 heads, 4 KV heads of 128, f16 cache) through cuBLAS (MOEMESH_CUDA_ATTN_BLAS_MIN_TOKENS=2)
// and through the split kernel (MOEMESH_CUDA_ATTN_BLAS=0).
void bench_prompt_attention(int64_t T, int64_t n_past) {
    const int64_t H = 32, G = 4, hd = 128, n_kv = n_past + T;
    float *q, *out;
    uint16_t *k, *v;
    CUDA_CHECK(cudaMalloc(&q, T * H * hd * sizeof(float)));
    CUDA_CHECK(cudaMemset(q, 0, T * H * hd * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&out, T * H * hd * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&k, n_kv * G * hd * 2));
    CUDA_CHECK(cudaMemset(k, 0, n_kv * G * hd * 2));
    CUDA_CHECK(cudaMalloc(&v, n_kv * G * hd * 2));
    CUDA_CHECK(cudaMemset(v, 0, n_kv * G * hd * 2));
    const cuda::AttentionArgs a{q, k, v, out, T, n_past, H, G, hd, true, 0.088f};
    void* ws = nullptr;
    CUDA_CHECK(cudaMalloc(&ws, cuda::attention_workspace_bytes(a)));
    setenv("MOEMESH_CUDA_ATTN_BLAS_MIN_TOKENS", "2", 1);
    const uint64_t c0 = cuda::attention_blas_calls();
    const double blas_us = median_us([&](int) { cuda::attention(a, ws); });
    const bool used = cuda::attention_blas_calls() > c0;
    unsetenv("MOEMESH_CUDA_ATTN_BLAS_MIN_TOKENS");
    setenv("MOEMESH_CUDA_ATTN_BLAS", "0", 1);
    const double own_us = median_us([&](int) { cuda::attention(a, ws); });
    unsetenv("MOEMESH_CUDA_ATTN_BLAS");
    // causal: query t sees n_past + t + 1 keys; QKᵀ and PV, 2 FLOP per multiply-add
    const double flop = 4.0 * H * hd * (static_cast<double>(T) * n_past + T * (T + 1) / 2.0);
    std::printf("| %5lld | %7lld | %9.1f%s | %6.1f | %9.1f | %6.1f | %6.2fx |\n", static_cast<long long>(T),
                static_cast<long long>(n_past), blas_us, used ? "" : " (not cuBLAS)",
                flop / (blas_us * 1e-6) / 1e12, own_us, flop / (own_us * 1e-6) / 1e12, own_us / blas_us);
    std::fflush(stdout);
    CUDA_CHECK(cudaFree(ws));
    CUDA_CHECK(cudaFree(q));
    CUDA_CHECK(cudaFree(out));
    CUDA_CHECK(cudaFree(k));
    CUDA_CHECK(cudaFree(v));
}

// One row of the decode attention table: one token after n_past keys on the Qwen3-30B-A3B shape
// (32 heads, 4 KV heads of 128, f16 cache), merged by the last block as the backend does, with the
// grouped-query kernel and with the per-head one (MOEMESH_CUDA_ATTN_GQA=0). GB/s: the K and V bytes
// of the context over the time (each timed launch alone; the cache stays in L2 while it fits).
void bench_decode_attention(int64_t n_past) {
    const int64_t H = 32, G = 4, hd = 128, n_kv = n_past + 1;
    float *q, *out;
    uint16_t *k, *v;
    unsigned* ctr;
    CUDA_CHECK(cudaMalloc(&q, H * hd * sizeof(float)));
    CUDA_CHECK(cudaMemset(q, 0, H * hd * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&out, H * hd * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&k, n_kv * G * hd * 2));
    CUDA_CHECK(cudaMemset(k, 0, n_kv * G * hd * 2));
    CUDA_CHECK(cudaMalloc(&v, n_kv * G * hd * 2));
    CUDA_CHECK(cudaMemset(v, 0, n_kv * G * hd * 2));
    CUDA_CHECK(cudaMalloc(&ctr, H * sizeof(unsigned)));
    CUDA_CHECK(cudaMemset(ctr, 0, H * sizeof(unsigned)));
    cuda::AttentionArgs a{q, k, v, out, 1, n_past, H, G, hd, true, 0.088f};
    a.merge_counters = ctr;
    void* ws = nullptr;
    CUDA_CHECK(cudaMalloc(&ws, cuda::attention_workspace_bytes(a)));
    const uint64_t c0 = cuda::attention_gqa_launches();
    const double gqa_us = median_us([&](int) { cuda::attention(a, ws); });
    const bool used = cuda::attention_gqa_launches() > c0;
    setenv("MOEMESH_CUDA_ATTN_GQA", "0", 1);
    const double head_us = median_us([&](int) { cuda::attention(a, ws); });
    unsetenv("MOEMESH_CUDA_ATTN_GQA");
    const double bytes = 2.0 * static_cast<double>(n_kv) * G * hd * 2;
    std::printf("| %7lld | %8.2f | %9.2f%s | %7.0f | %9.2f | %7.0f | %6.2fx |\n", static_cast<long long>(n_past),
                bytes / 1e6, gqa_us, used ? "" : " (not grouped)", bytes / (gqa_us * 1e-6) / 1e9, head_us,
                bytes / (head_us * 1e-6) / 1e9, head_us / gqa_us);
    std::fflush(stdout);
    CUDA_CHECK(cudaFree(ws));
    CUDA_CHECK(cudaFree(ctr));
    CUDA_CHECK(cudaFree(q));
    CUDA_CHECK(cudaFree(out));
    CUDA_CHECK(cudaFree(k));
    CUDA_CHECK(cudaFree(v));
}

void bench_decode_attention_table() {
    std::printf("\ndecode attention (1 token; 32 heads, 4 KV heads of 128, f16 cache; merged by the last block):\n");
    std::printf("| n_past  | K+V MB   | grouped us | GB/s    | per-head us | GB/s    | per-head/grouped |\n");
    std::printf("|---|---|---|---|---|---|---|\n");
    for (const int64_t n_past : {64, 512, 2048, 8192, 32768, 131072}) bench_decode_attention(n_past);
}

// Prompt products: cuBLAS (quantized W dequantized to f16, or to f32 for the TF32 tensor cores; F16 W
// as stored) vs the built-in tiled kernel / GEMV chunks; the grouped prompt MoE gives each used expert
// its share of rows.
int bench_prompt_table() {
    std::string blas;
    const bool blas_ok = cuda::blas_ready(&blas);
    std::printf("\nprompt products: cuBLAS %s (%s)\n", blas_ok ? "loaded" : "NOT loaded", blas.c_str());
    std::printf("| shape                | type | n_out  | k     | m    | cuBLAS f16 us | TFLOP/s | tf32 us | own us    "
                "| TFLOP/s | own/f16 | tf32/f16 |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const GgmlType t : {GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::F16}) {
        for (const int64_t m : {33, 64, 128, 512}) bench_prompt("attn q", t, 4096, 2048, m);
        for (const int64_t m : {16, 33, 64, 128}) bench_prompt("expert gate/up", t, 768, 2048, m);
        for (const int64_t m : {16, 33, 64, 128}) bench_prompt("expert down", t, 2048, 768, m);
    }
    std::printf("\nprompt attention (32 heads, 4 KV heads of 128, f16 cache; causal FLOP):\n");
    std::printf("| T     | n_past  | cuBLAS us | TFLOP/s | split us  | TFLOP/s | split/cuBLAS |\n");
    std::printf("|---|---|---|---|---|---|---|\n");
    for (const int64_t T : {64, 512})
        for (const int64_t n_past : {0, 512, 4096, 16384}) bench_prompt_attention(T, n_past);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1) g_reps = std::max(3, std::atoi(argv[1]));
    const bool prompt_only = argc > 2 && std::strcmp(argv[2], "prompt") == 0;
    const char* why = "";
    if (cuda::device_count(&why) == 0) {
        std::printf("no CUDA device: %s\n", why);
        return 0;
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    g_l2 = static_cast<size_t>(prop.l2CacheSize);
    g_copy_gbs = copy_bandwidth();
    const double h2d_gbs = h2d_pinned_bandwidth();
    std::printf("device: %s, %d SMs, L2 %zu MB; D2D copy %.0f GB/s (read+write, median); H2D pinned %.1f GB/s "
                "(median); reps %d\n",
                prop.name, prop.multiProcessorCount, g_l2 >> 20, g_copy_gbs, h2d_gbs, g_reps);
    const char* gemv_env = std::getenv("MOEMESH_CUDA_GEMV");
    const std::string mode = gemv_env != nullptr ? gemv_env : "";
    std::printf("GEMV kernel (MOEMESH_CUDA_GEMV=%s): %s\n", mode.c_str(),
                mode == "old"   ? "f32 X for every type"
                : mode == "new" ? "int8 X + dp4a for every quantized type at every size"
                                : "auto: int8 X + dp4a for quantized types when m >= 2 or >= 16384 rows, else f32 X");
    bench_decode_attention_table();
    if (prompt_only) return bench_prompt_table();
    std::printf("| shape                  | type | n_out  | k     | m  | MB       | us       | GB/s    | %%copy  |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|\n");
    const GgmlType types[] = {GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::Q4_0, GgmlType::Q5_K,
                              GgmlType::Q5_0, GgmlType::Q3_K, GgmlType::Q2_K, GgmlType::F16,  GgmlType::BF16,
                              GgmlType::F32};
    for (const GgmlType t : types) {
        bench("expert gate/up", t, 768, 2048, 1);
        bench("expert down", t, 2048, 768, 1);
        bench("8 experts gate (id)", t, 768, 2048, 1, 8);
        bench("8 experts down (id)", t, 2048, 768, 1, 8);
        bench("attn q", t, 4096, 2048, 1);
        bench("attn k/v", t, 512, 2048, 1);
        bench("attn o", t, 2048, 4096, 1);
        bench("lm_head", t, 151936, 2048, 1);
    }
    for (const GgmlType t : {GgmlType::Q4_K, GgmlType::Q8_0}) {
        for (const int64_t m : {2, 4, 8}) bench("lm_head batch", t, 151936, 2048, m);
    }
    for (const GgmlType t : {GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::Q5_K, GgmlType::Q3_K, GgmlType::Q2_K})
        bench("attn q prefill", t, 4096, 2048, 512);
    // Short prompts (the decode bench's 16 tokens): the tiled kernel's smallest cases.
    for (const int64_t m : {16, 64}) bench("attn q short prompt", GgmlType::Q4_K, 4096, 2048, m);
    // Qwen3-Next's linear-attention input projection (q, k: 16 heads of 128; v, z: 32 heads of 128;
    // 12288 rows over hidden 2048), Q5_K in Q4_K_M files: decode and a 512-token prompt.
    bench("next attn_qkv", GgmlType::Q5_K, 12288, 2048, 1);
    bench("next attn_qkv prefill", GgmlType::Q5_K, 12288, 2048, 512);
    return bench_prompt_table();
}
