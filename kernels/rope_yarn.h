// RoPE parameters and the per-pair angle as ggml_rope_ext computes them (ggml-cpu ops.cpp
// rope_yarn / rope_yarn_ramp, ggml.c ggml_rope_yarn_corr_dims), including the linear and YaRN
// scaling llama.cpp derives from a file's rope.scaling.* keys (llama-context.cpp). Header-only and
// free of dependencies so the CPU kernel (kernels/cpu/rope.cpp) and the CUDA kernel
// (kernels/cuda/rope.cu) share the very same arithmetic.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MM_ROPE_HD __host__ __device__
#else
#define MM_ROPE_HD
#endif

namespace moemesh {

// Defaults are plain RoPE (no scaling): cos/sin of pos · base^(-2i/rot_dim), unscaled.
struct RopeParams {
    float theta = 10000.0f;    // rope.freq_base
    float freq_scale = 1.0f;   // 1 / rope.scaling.factor for linear and yarn, else 1
    float ext_factor = 0.0f;   // YaRN extrapolation mix: 1 for yarn, 0 otherwise
    float attn_factor = 1.0f;  // magnitude on cos/sin (llama.cpp's yarn_attn_factor)
    float corr_low = 0.0f;     // YaRN correction range, in rotary pair indices
    float corr_high = 0.0f;
};

// cos/sin (times the magnitude) for rotary pair i whose unscaled angle is theta_extrap:
// ggml's rope_yarn with ramp index i0 = 2i, operation by operation in float.
MM_ROPE_HD inline void rope_yarn_cos_sin(float theta_extrap, int64_t i, const RopeParams& p, float* c, float* s) {
    const float theta_interp = p.freq_scale * theta_extrap;
    float theta = theta_interp;
    float mscale = p.attn_factor;
    if (p.ext_factor != 0.0f) {
        const float y = (static_cast<float>(static_cast<int>(i)) - p.corr_low) / fmaxf(0.001f, p.corr_high - p.corr_low);
        const float ramp_mix = (1.0f - fminf(1.0f, fmaxf(0.0f, y))) * p.ext_factor;
        // No fused multiply-add here: nvcc contracts a·b + c·d into an fma by default, the CPU build
        // does not, and at positions in the thousands one rounding of the angle is ~5e-4 in cos/sin
        // (seen on an H200: rel 2e-5 against the CPU). __fmul_rn / __fadd_rn are never contracted.
#if defined(__CUDA_ARCH__)
        theta = __fadd_rn(__fmul_rn(theta_interp, 1.0f - ramp_mix), __fmul_rn(theta_extrap, ramp_mix));
        mscale *= __fadd_rn(1.0f, __fmul_rn(0.1f, logf(1.0f / p.freq_scale)));
#else
        theta = theta_interp * (1.0f - ramp_mix) + theta_extrap * ramp_mix;
        mscale *= 1.0f + 0.1f * logf(1.0f / p.freq_scale);
#endif
    }
    *c = cosf(theta) * mscale;
    *s = sinf(theta) * mscale;
}

// The scaling of a model file as llama.cpp applies it by default (no user overrides):
//   scaling "none" | "linear" | "yarn"; factor 0 = absent (no scaling); attn_factor =
//   rope.scaling.attn_factor (1 when absent); n_ctx_orig = rope.scaling.original_context_length
//   (else the training context); beta_fast/slow are llama.cpp's defaults 32 and 1.
inline RopeParams make_rope_params(int64_t rot_dim, float theta, const char* scaling, float factor,
                                   float attn_factor, int64_t n_ctx_orig) {
    RopeParams p;
    p.theta = theta;
    const bool none = std::strcmp(scaling, "none") == 0, yarn = std::strcmp(scaling, "yarn") == 0;
    p.freq_scale = (none || factor == 0.0f) ? 1.0f : 1.0f / factor;
    p.ext_factor = yarn ? 1.0f : 0.0f;
    float af = 1.0f;
    if (p.ext_factor != 0.0f) {
        const float f = 1.0f / p.freq_scale;
        // get_mscale(f, 1), then cancel the factor ggml's rope multiplies in again (llama.cpp #17945)
        af = f <= 1.0f ? 1.0f : (0.1f * 1.0f * logf(f) + 1.0f);
        af *= 1.0f / (1.0f + 0.1f * logf(f));
    }
    p.attn_factor = af * attn_factor;
    // ggml_rope_yarn_corr_dims(n_dims = rot_dim, n_ctx_orig, base, beta_fast 32, beta_slow 1)
    const int n_dims = static_cast<int>(rot_dim);
    const int ctx = static_cast<int>(n_ctx_orig);
    auto corr_dim = [&](float n_rot) {
        return n_dims * logf(ctx / (n_rot * 2 * static_cast<float>(M_PI))) / (2 * logf(theta));
    };
    const float start = floorf(corr_dim(32.0f)), end = ceilf(corr_dim(1.0f));
    p.corr_low = start > 0 ? start : 0;
    p.corr_high = end < n_dims - 1 ? end : static_cast<float>(n_dims - 1);
    return p;
}

}  // namespace moemesh
