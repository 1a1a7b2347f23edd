#include "common/weights.h"

namespace moemesh {

namespace {
std::string shape_str(std::initializer_list<int64_t> shape) {
    std::string s = "{";
    bool first = true;
    for (int64_t n : shape) {
        if (!first) s += ", ";
        s += std::to_string(n);
        first = false;
    }
    return s + "}";
}
}  // namespace

StatusOr<Weight> get_optional_weight(const GgufFile& f, const std::string& name, std::initializer_list<int64_t> shape) {
    const GgufTensor* t = f.tensor(name);
    if (!t) return Weight{};
    int64_t want[4] = {1, 1, 1, 1};
    int d = 0;
    for (int64_t n : shape) want[d++] = n;
    for (int i = 0; i < 4; ++i) {
        if (t->ne[i] != want[i])
            return MM_ERROR("%s: tensor '%s' has shape %s, expected %s", f.path().c_str(), name.c_str(),
                            t->shape_str().c_str(), shape_str(shape).c_str());
    }
    if (!ggml_type_info(t->type).computable)
        return MM_ERROR("%s: tensor '%s' has type %s, which moemesh cannot compute yet (supported: f32, f16, bf16, "
                        "q8_0, q5_0, q5_1, q4_0, q4_1, iq4_nl, iq4_xs, mxfp4, q2_k, q3_k, q4_k, q5_k, q6_k, iq3_s, "
                        "iq3_xxs, iq2_xxs, iq2_xs, iq2_s, iq1_s, iq1_m)",
                        f.path().c_str(), name.c_str(), ggml_type_name(t->type));
    Weight w;
    w.tensor = t;
    w.type = t->type;
    w.data = t->data;
    for (int i = 0; i < 4; ++i) w.ne[i] = t->ne[i];
    w.row_bytes = ggml_row_bytes(t->type, t->ne[0]);
    w.matrix_bytes = w.row_bytes * static_cast<size_t>(t->ne[1]);
    w.expert_stride = w.matrix_bytes;
    return w;
}

StatusOr<Weight> get_weight(const GgufFile& f, const std::string& name, std::initializer_list<int64_t> shape) {
    if (!f.tensor(name)) return MM_ERROR("%s: missing required tensor '%s'", f.path().c_str(), name.c_str());
    return get_optional_weight(f, name, shape);
}

}  // namespace moemesh
