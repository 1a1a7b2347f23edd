// GGUF / ggml tensor element types: ids as stored in GGUF files, block geometry.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace moemesh {

enum class GgmlType : uint32_t {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
    kCount = 40,
};

struct GgmlTypeInfo {
    const char* name;    // nullptr: id unknown to us
    int64_t block_size;  // elements per block
    size_t type_size;    // bytes per block
    bool computable;     // we have dequantize + matmul kernels for it (a quantizer too, but for the i-quants)
};

// Geometry of every type ggml defines (so the reader can size tensors we cannot compute with).
const GgmlTypeInfo& ggml_type_info(GgmlType t);
bool ggml_type_known(uint32_t id);
const char* ggml_type_name(GgmlType t);
// Parses "f32", "q4_k", ... (case-insensitive). Returns false if unknown.
bool ggml_type_from_name(const std::string& name, GgmlType* out);
// Bytes of one row of n elements; n must be a multiple of the block size.
size_t ggml_row_bytes(GgmlType t, int64_t n);

constexpr int64_t kQK4_0 = 32;
constexpr int64_t kQK8_0 = 32;
constexpr int64_t kQK_K = 256;

}  // namespace moemesh
