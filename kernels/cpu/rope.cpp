// NEOX-style rotary embedding: dimension i pairs with i + rot_dim/2 (HF rotate_half), with the
// linear / YaRN scaling of kernels/rope_yarn.h.
#include <cmath>
#include <vector>

#include "kernels/ops.h"

namespace moemesh {

void rope_neox(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t rot_dim, const int32_t* pos,
               const RopeParams& p) {
    const int64_t half = rot_dim / 2;
    // The angle is built by repeated multiplication in float, as ggml does, not by pow() per dim.
    const float theta_scale = std::pow(p.theta, -2.0f / static_cast<float>(rot_dim));
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t t = 0; t < tokens; ++t) {
        float th = static_cast<float>(pos[t]);
        for (int64_t i = 0; i < half; ++i) {
            rope_yarn_cos_sin(th, i, p, &cs[i], &sn[i]);
            th *= theta_scale;
        }
        for (int64_t h = 0; h < heads; ++h) {
            float* v = x + (t * heads + h) * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float x0 = v[i];
                const float x1 = v[i + half];
                v[i] = x0 * cs[i] - x1 * sn[i];
                v[i + half] = x0 * sn[i] + x1 * cs[i];
            }
        }
    }
}

}  // namespace moemesh
