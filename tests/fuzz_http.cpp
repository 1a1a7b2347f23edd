// libFuzzer target: the OpenAI request parser (tools/http_request.cpp) on arbitrary bodies, as
// completions and as chat completions. Built with -DMOEMESH_FUZZ=ON (clang). Seeds:
// tests/data/http/*.json. A parsed request must respect the limits it was checked against.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "tools/http_request.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string body(reinterpret_cast<const char*>(data), size);
    moemesh::RequestLimits lim;
    lim.n_ctx = 256;
    lim.n_vocab = 1000;
    for (bool chat : {false, true}) {
        auto r = moemesh::parse_gen_request(body, chat, lim);
        if (!r.ok()) continue;
        const moemesh::GenRequest& g = r.value();
        if (g.max_tokens < -1 || g.max_tokens > lim.n_ctx) std::abort();
        for (int32_t t : g.tokens)
            if (t < 0 || t >= lim.n_vocab) std::abort();
        if (g.tokens.empty() && g.prompt.empty()) std::abort();
        if (!(g.sp.temperature >= 0) || !(g.sp.top_p >= 0 && g.sp.top_p <= 1)) std::abort();
        for (const std::string& s : g.stop)
            if (s.empty()) std::abort();
    }
    return 0;
}
