// Parity with llama.cpp on files that llama.cpp's own quantizer wrote: make-model writes an f32
// model, llama_model_quantize (libllama of the node-llama-cpp reference install, called through
// dlopen) turns it into each of llama-quantize's file types with its real per-tensor choices
// (Q4_K_M's Q6_K attn_v / ffn_down, Q3_K_M's mix, the small-row fallbacks, …), and moemesh must
// then agree with llama.cpp on the next-token distributions of that file. This is the test of
// "files written by other tools": nothing in these files comes from our writer or our quantizers.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "tests/parity_util.h"

namespace moemesh {
namespace {

using namespace moemesh::testing;

// The head of llama.h's llama_model_quantize_params (nthread, ftype), padded well past the real
// struct's size: llama_model_quantize_default_params returns it through memory either way.
struct QuantizeParams {
    int32_t nthread;
    int32_t ftype;  // llama_ftype
    unsigned char rest[1024];
};

class LlamaQuantizer {
public:
    static LlamaQuantizer& get() {
        static LlamaQuantizer q;
        return q;
    }
    const std::string& unavailable() const { return why_; }

    // Quantizes `in` into `out` as llama_ftype `ftype`; false (with *err) when llama.cpp refuses.
    bool quantize(const std::string& in, const std::string& out, int ftype, std::string* err) {
        QuantizeParams p = default_params_();
        p.ftype = ftype;
        p.nthread = 2;
        const uint32_t rc = quantize_(in.c_str(), out.c_str(), &p);
        if (rc != 0) *err = "llama_model_quantize returned " + std::to_string(rc);
        return rc == 0;
    }

private:
    LlamaQuantizer() {
        const std::string dir = ref_dir() + "/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/";
        void* ggml = dlopen((dir + "libggml.v0.5.0.so").c_str(), RTLD_NOW | RTLD_LOCAL);
        void* llama = dlopen((dir + "libllama.v0.5.0.so").c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!ggml || !llama) {
            why_ = std::string("cannot load libllama from ") + dir + ": " + dlerror();
            return;
        }
        auto load_all = reinterpret_cast<void (*)(const char*)>(dlsym(ggml, "ggml_backend_load_all_from_path"));
        auto init = reinterpret_cast<void (*)()>(dlsym(llama, "llama_backend_init"));
        auto log_set = reinterpret_cast<void (*)(void (*)(int, const char*, void*), void*)>(dlsym(llama, "llama_log_set"));
        default_params_ = reinterpret_cast<QuantizeParams (*)()>(dlsym(llama, "llama_model_quantize_default_params"));
        quantize_ = reinterpret_cast<uint32_t (*)(const char*, const char*, const QuantizeParams*)>(
            dlsym(llama, "llama_model_quantize"));
        if (!load_all || !init || !log_set || !default_params_ || !quantize_) {
            why_ = "libllama lacks the quantize entry points";
            return;
        }
        log_set([](int, const char*, void*) {}, nullptr);  // its per-tensor log would flood the test output
        load_all(dir.c_str());
        init();
        // Check the struct head we rely on: llama.cpp's defaults are 0 threads and Q8_0 (older: Q5_1).
        const QuantizeParams d = default_params_();
        if (d.nthread != 0 || (d.ftype != 7 && d.ftype != 9)) {
            why_ = "llama_model_quantize_params does not start with {nthread = 0, ftype = 7 or 9} (got " +
                   std::to_string(d.nthread) + ", " + std::to_string(d.ftype) + "): another llama.h";
        }
    }
    std::string why_;
    QuantizeParams (*default_params_)() = nullptr;
    uint32_t (*quantize_)(const char*, const char*, const QuantizeParams*) = nullptr;
};

struct FileType {
    const char* name;  // llama-quantize's name
    int ftype;         // llama.h's llama_ftype
};
// Every file type llama-quantize writes without an importance matrix whose weight types moemesh
// computes. (IQ2_*, IQ1_*, IQ3_XS and IQ3_XXS need an imatrix; TQ*_0 we cannot compute.)
constexpr FileType kFileTypes[] = {{"F16", 1},      {"BF16", 32},   {"Q4_0", 2},    {"Q4_1", 3},    {"Q8_0", 7},   {"Q5_0", 8},    {"Q5_1", 9},
                                   {"Q2_K", 10},   {"Q3_K_S", 11}, {"Q3_K_M", 12}, {"Q3_K_L", 13}, {"Q4_K_S", 14},
                                   {"Q4_K_M", 15}, {"Q5_K_S", 16}, {"Q5_K_M", 17}, {"Q6_K", 18},   {"IQ4_NL", 25},
                                   {"IQ4_XS", 30}, {"MXFP4_MOE", 38}, {"IQ3_S", 26},  {"IQ3_M", 27}};

class LlamaQuantParity : public Parity {
protected:
    void SetUp() override {
        Parity::SetUp();
        if (IsSkipped()) return;
        const std::string& why = LlamaQuantizer::get().unavailable();
        if (!why.empty()) GTEST_SKIP() << "llama.cpp's quantizer unavailable: " << why;
    }

    std::string make_f32(const std::string& name, const std::string& options) {
        const std::string path = dir_ + "/" + name + "_f32.gguf";
        std::string out;
        const std::string cmd = moemesh_bin() + " make-model --out " + path + " --type f32 " + options;
        EXPECT_EQ(run_capture(cmd, &out, dir_ + "/make.err"), 0) << cmd << "\n" << read_file(dir_ + "/make.err");
        return path;
    }

    // Quantizes f32 to every file type and compares moemesh with llama.cpp on each. One layer: both
    // sides quantize the activations the same way, so only a rare flipped rounding (a 1-ulp
    // difference in a sum landing on a rounding boundary; see test_parity.cpp) separates them, and
    // with one layer it cannot spread to later positions. deep: two layers, where one flip early in
    // the prompt reaches every later position through the second layer's keys and values (seen:
    // median 6e-4 on one file of 16, 1e-16 with other tokens), so the bounds are those of a flip.
    void check_all(const std::string& f32, const std::string& name, int vocab, bool deep = false) {
        for (const FileType& ft : kFileTypes) {
            const std::string q = dir_ + "/" + name + "_" + ft.name + ".gguf";
            std::string err;
            ASSERT_TRUE(LlamaQuantizer::get().quantize(f32, q, ft.ftype, &err)) << ft.name << ": " << err;
            Comparison c = run_pair(q, vocab, "f32", "", dir_, 16);
            // A misread type or mix shows as |dp| of 0.1 and more.
            EXPECT_LE(c.median_dp, deep ? 5e-3 : 1e-5) << name << " " << ft.name;
            EXPECT_LE(c.max_dp, deep ? 2e-2 : 3e-3) << name << " " << ft.name;
            EXPECT_EQ(c.top1_agree, 16) << name << " " << ft.name;
            // Two layers: a flip during generation can swap a near tie of the greedy choice.
            EXPECT_GE(c.greedy_prefix, deep ? 8 : 32) << name << " " << ft.name;
        }
    }
};

// Qwen3-30B-A3B's layout, rows multiples of 256 (the K-quant mixes apply as on the real model).
TEST_F(LlamaQuantParity, Qwen3MoeEveryFileType) {
    const std::string f32 = make_f32("moe", "--arch qwen3moe --layers 1 --hidden 256 --heads 4 --kv-heads 2 "
                                            "--head-dim 64 --experts 16 --top-k 4 --expert-ff 256 --vocab 1024 --seed 3");
    check_all(f32, "moe", 1024);
}

// Rows of 128 and 96 (hidden, expert ff): llama-quantize's fallbacks pick the 32-element types.
TEST_F(LlamaQuantParity, Qwen3MoeNarrowRowsEveryFileType) {
    const std::string f32 = make_f32("narrow", "--arch qwen3moe --layers 1 --hidden 128 --heads 4 --kv-heads 2 "
                                               "--head-dim 32 --experts 8 --top-k 2 --expert-ff 96 --vocab 512 --seed 4");
    check_all(f32, "narrow", 512);
}

// Qwen3-Next's layout: one gated DeltaNet layer and one gated attention layer, a shared expert.
TEST_F(LlamaQuantParity, Qwen3NextEveryFileType) {
    const std::string f32 = make_f32("next", "--arch qwen3next --layers 2 --full-attention-interval 2 --hidden 256 "
                                             "--heads 4 --kv-heads 2 --head-dim 64 --experts 16 --top-k 4 "
                                             "--expert-ff 256 --shared-ff 256 --ssm-k-heads 2 --ssm-v-heads 4 "
                                             "--ssm-head-dim 64 --vocab 1024 --seed 5");
    check_all(f32, "next", 1024, /*deep=*/true);
}

}  // namespace
}  // namespace moemesh
