// libFuzzer target: the GGUF parser and the hyper-parameter reader on arbitrary bytes.
// Built with -DMOEMESH_FUZZ=ON (clang); scripts/test.sh runs it for a bounded time.
#include <cstddef>
#include <cstdint>

#include "common/gguf.h"
#include "common/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    auto f = moemesh::GgufFile::from_memory(data, size, "fuzz");
    if (!f.ok()) return 0;
    const moemesh::GgufFile& g = *f.value();
    // Touch every tensor's bytes: the parser promised they are inside the buffer.
    uint64_t acc = 0;
    for (const auto& t : g.tensors()) {
        if (t.nbytes) acc += t.data[0] + t.data[t.nbytes - 1];
    }
    (void)moemesh::load_model_config(g);
    return static_cast<int>(acc & 0);
}
