// Matmul throughput per weight type and the gated delta rule (Google Benchmark; not built by default).
// Build by hand, e.g.:
//   g++ -O2 -std=c++20 -I. bench/bench_kernels.cpp build-kernels/libmoemesh_kernels.a \
//       build-kernels/libmoemesh_common.a -lbenchmark -lpthread -ldl -o /tmp/bench_kernels
// With MOEMESH_GGML_CPU_LIB=<path to libggml-cpu-*.so> it also times ggml's own vec_dot over the
// same rows on one thread (BM_ggml_rows) next to ours (BM_rows), for a like-for-like comparison.
#include <benchmark/benchmark.h>
#include <dlfcn.h>

#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/cpu/quants_internal.h"
#include "kernels/ops.h"

namespace moemesh {
namespace {

const GgmlType kTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4_0,
                           GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K};

struct Problem {
    std::vector<uint8_t> w;
    std::vector<float> x, y;
};

Problem make_problem(GgmlType t, int64_t n_out, int64_t k, int64_t m) {
    Problem p;
    std::mt19937 rng(1);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> row(k);
    const size_t stride = ggml_row_bytes(t, k);
    p.w.resize(stride * n_out);
    for (int64_t r = 0; r < n_out; ++r) {
        for (auto& f : row) f = dist(rng) * 0.05f;
        quantize_row(t, row.data(), p.w.data() + r * stride, k);
    }
    p.x.resize(m * k);
    for (auto& f : p.x) f = dist(rng);
    p.y.resize(m * n_out);
    return p;
}

ThreadPool& pool() {
    static ThreadPool p(0);
    return p;
}

void BM_matmul(benchmark::State& state) {
    const auto t = static_cast<GgmlType>(state.range(0));
    const int64_t m = state.range(1), n_out = state.range(2), k = state.range(3);
    Problem p = make_problem(t, n_out, k, m);
    for (auto _ : state) {
        matmul(pool(), t, p.w.data(), n_out, k, p.x.data(), m, p.y.data());
        benchmark::DoNotOptimize(p.y.data());
    }
    state.SetLabel(ggml_type_name(t));
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * p.w.size()));
    state.counters["GFLOP/s"] =
        benchmark::Counter(2.0 * m * n_out * k * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

void matmul_args(benchmark::internal::Benchmark* b) {
    for (GgmlType t : kTypes) {
        for (int64_t m : {1, 64}) b->Args({static_cast<int64_t>(t), m, 2048, 2048});
    }
    for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_K}) b->Args({static_cast<int64_t>(t), 256, 2048, 2048});
    // Decode on weights larger than the last-level cache: memory bandwidth bound.
    for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K}) {
        b->Args({static_cast<int64_t>(t), 1, 32768, 2048});
    }
}
BENCHMARK(BM_matmul)->Apply(matmul_args)->UseRealTime()->Unit(benchmark::kMicrosecond);

// One thread, plain row loop: our vec_dot vs ggml's, over the same quantized rows.
void* ggml_cpu() {
    static void* h = [] {
        const char* path = std::getenv("MOEMESH_GGML_CPU_LIB");
        void* handle = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : nullptr;
        if (handle) {
            if (auto init = reinterpret_cast<void (*)()>(dlsym(handle, "ggml_cpu_init"))) init();
        }
        return handle;
    }();
    return h;
}

const char* ggml_dot_name(GgmlType t) {
    switch (t) {
        case GgmlType::F16:
            return "ggml_vec_dot_f16";
        case GgmlType::BF16:
            return "ggml_vec_dot_bf16";
        case GgmlType::Q8_0:
            return "ggml_vec_dot_q8_0_q8_0";
        case GgmlType::Q4_0:
            return "ggml_vec_dot_q4_0_q8_0";
        case GgmlType::Q4_K:
            return "ggml_vec_dot_q4_K_q8_K";
        case GgmlType::Q6_K:
            return "ggml_vec_dot_q6_K_q8_K";
        case GgmlType::Q5_0:
            return "ggml_vec_dot_q5_0_q8_0";
        case GgmlType::Q5_K:
            return "ggml_vec_dot_q5_K_q8_K";
        case GgmlType::Q3_K:
            return "ggml_vec_dot_q3_K_q8_K";
        case GgmlType::Q2_K:
            return "ggml_vec_dot_q2_K_q8_K";
        default:
            return nullptr;
    }
}

void rows_bench(benchmark::State& state, bool use_ggml) {
    const auto t = static_cast<GgmlType>(state.range(0));
    const int64_t n_out = 2048, k = 2048;
    using DotFn = void (*)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
    DotFn gdot = nullptr;
    if (use_ggml) {
        if (!ggml_cpu() || !ggml_dot_name(t)) {
            state.SkipWithError("no ggml library (set MOEMESH_GGML_CPU_LIB)");
            return;
        }
        gdot = reinterpret_cast<DotFn>(dlsym(ggml_cpu(), ggml_dot_name(t)));
    }
    Problem p = make_problem(t, n_out, k, 1);
    const quants::TypeKernels* kt = quants::type_kernels(t);
    std::vector<uint8_t> a(ggml_row_bytes(kt->act_type, k));
    kt->quantize_act(p.x.data(), a.data(), k);
    const size_t stride = ggml_row_bytes(t, k);
    for (auto _ : state) {
        for (int64_t r = 0; r < n_out; ++r) {
            if (gdot) {
                gdot(static_cast<int>(k), &p.y[r], 0, p.w.data() + r * stride, 0, a.data(), 0, 1);
            } else {
                p.y[r] = kt->vec_dot(k, p.w.data() + r * stride, a.data());
            }
        }
        benchmark::DoNotOptimize(p.y.data());
    }
    state.SetLabel(ggml_type_name(t));
    state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * p.w.size()));
}
void BM_rows(benchmark::State& state) { rows_bench(state, false); }
void BM_ggml_rows(benchmark::State& state) { rows_bench(state, true); }
void rows_args(benchmark::internal::Benchmark* b) {
    for (GgmlType t : kTypes) {
        if (ggml_dot_name(t)) b->Arg(static_cast<int64_t>(t));
    }
}
BENCHMARK(BM_rows)->Apply(rows_args)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ggml_rows)->Apply(rows_args)->Unit(benchmark::kMicrosecond);

// Gated delta rule at Qwen3-Next size (Hk 16, Hv 32, Dk = Dv = 128): args {tokens, chunked}.
// {1, 0} is the decode step; {512, 1} and {512, 0} compare the two prefill forms.
void BM_delta_net(benchmark::State& state) {
    const int64_t T = state.range(0), Hk = 16, Hv = 32, D = 128;
    std::mt19937 rng(1);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> q(T * Hk * D), k(T * Hk * D), v(T * Hv * D), g(T * Hv, -0.5f), beta(T * Hv, 0.5f);
    std::vector<float> s(Hv * D * D, 0.0f), out(T * Hv * D);
    for (auto* x : {&q, &k, &v}) {
        for (auto& f : *x) f = dist(rng);
    }
    l2norm_rows(q.data(), T * Hk, D, 1e-6f);
    l2norm_rows(k.data(), T * Hk, D, 1e-6f);
    DeltaNetArgs a;
    a.q = q.data(), a.k = k.data(), a.v = v.data(), a.g = g.data(), a.beta = beta.data();
    a.state = s.data(), a.out = out.data();
    a.n_tokens = T, a.n_k_heads = Hk, a.n_v_heads = Hv, a.k_dim = D, a.v_dim = D, a.scale = 0.088f;
    for (auto _ : state) {
        if (state.range(1)) {
            gated_delta_rule_chunked(pool(), a);
        } else {
            gated_delta_rule_recurrent(pool(), a);
        }
    }
    state.SetItemsProcessed(state.iterations() * T);
}
BENCHMARK(BM_delta_net)->Args({1, 0})->Args({512, 1})->Args({512, 0})->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace moemesh

BENCHMARK_MAIN();
