// Test helper: splits a GGUF file as llama.cpp's gguf-split --split-max-tensors does: files
// PREFIX-00001-of-0000N.gguf …, the first with every metadata key, each with split.no (u16),
// split.count (u16) and split.tensors.count (i32), the tensors in order, `per_file` per file.
#pragma once
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "common/gguf.h"

namespace moemesh::testing {

// Returns the path of the first file.
inline std::string write_gguf_split(const std::string& in, const std::string& prefix, size_t per_file) {
    auto f = GgufFile::open(in);
    EXPECT_TRUE(f.ok()) << f.status().message();
    if (!f.ok()) return "";
    const GgufFile& src = *f.value();
    const size_t n_tensors = src.tensors().size();
    const size_t n_files = (n_tensors + per_file - 1) / per_file;
    std::string first;
    for (size_t i = 0; i < n_files; ++i) {
        GgufWriter w;
        w.set_alignment(static_cast<uint32_t>(src.alignment()));
        if (i == 0)
            for (const auto& [key, value] : src.metadata())
                if (key != "general.alignment") w.set_value(key, value);
        w.set_u16("split.no", static_cast<uint16_t>(i));
        w.set_u16("split.count", static_cast<uint16_t>(n_files));
        w.set_i32("split.tensors.count", static_cast<int32_t>(n_tensors));
        for (size_t t = i * per_file; t < std::min(n_tensors, (i + 1) * per_file); ++t) {
            const GgufTensor& ten = src.tensors()[t];
            w.add_tensor(ten.name, ten.type, std::vector<int64_t>(ten.ne, ten.ne + ten.n_dims),
                         std::vector<uint8_t>(ten.data, ten.data + ten.nbytes));
        }
        char tail[64];
        std::snprintf(tail, sizeof(tail), "-%05zu-of-%05zu.gguf", i + 1, n_files);
        const std::string path = prefix + tail;
        const Status st = w.write(path);
        EXPECT_TRUE(st.ok()) << st.message();
        if (i == 0) first = path;
    }
    return first;
}

}  // namespace moemesh::testing
