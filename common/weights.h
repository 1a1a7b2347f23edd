// Views of weight tensors inside a mapped GGUF file, checked for shape and type at load time.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/status.h"

namespace moemesh {

// A weight as stored: ne in ggml order (ne[0] = row length). For a 3-D expert tensor {in, out, E},
// matrix(e) points at expert e's [out, in] matrix.
struct Weight {
    const GgufTensor* tensor = nullptr;
    GgmlType type = GgmlType::F32;
    const uint8_t* data = nullptr;
    int64_t ne[4] = {1, 1, 1, 1};
    size_t row_bytes = 0;
    size_t matrix_bytes = 0;  // row_bytes * ne[1]
    // Bytes from one matrix of a 3-D (expert) tensor to the next: matrix_bytes, or more when this
    // Weight is one part of a fused tensor (the gate or up half of ffn_gate_up_exps).
    size_t expert_stride = 0;
    const uint8_t* row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
    const uint8_t* matrix(int64_t e) const { return data + static_cast<size_t>(e) * expert_stride; }
    explicit operator bool() const { return tensor != nullptr; }
};

// Finds `name` and checks its shape (ggml order, trailing 1s may be omitted) and that we have
// kernels for its type. Errors name the file, tensor, and what differs.
StatusOr<Weight> get_weight(const GgufFile& f, const std::string& name, std::initializer_list<int64_t> shape);
// Same, but a missing tensor is not an error (returns an empty Weight).
StatusOr<Weight> get_optional_weight(const GgufFile& f, const std::string& name, std::initializer_list<int64_t> shape);

}  // namespace moemesh
