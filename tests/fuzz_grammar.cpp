// libFuzzer target: the grammar engine (common/gbnf.cpp, common/grammar.cpp) and the JSON schema
// converter (common/json_schema_grammar.cpp) on arbitrary input, as requests bring them ("grammar",
// "json_schema"). Built with -DMOEMESH_FUZZ=ON (clang). Seeds: tests/data/grammar.
// The first byte picks the mode:
//   'S': the rest is a JSON schema. If the converter accepts it, its grammar must compile (the
//        converter never emits a grammar the engine refuses) and match without crashing.
//   else: the input is GBNF. It parses or fails with a message; a grammar that parses is run on
//        its own text and on a few fixed strings, byte by byte.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "common/grammar.h"
#include "common/json_schema_grammar.h"

namespace {

void exercise(const std::shared_ptr<const moemesh::Grammar>& g, const std::string& text) {
    for (const char* s : {"", "{\"a\": 1}", "[1, \"x\", null]", "yes", "\xC3\xA9\xE4\xB8\xAD", "0"})
        (void)moemesh::grammar_matches(g, s);
    moemesh::GrammarMatcher m(g);
    for (size_t i = 0; i < text.size() && i < 512; ++i) {
        if (!m.accept(text.substr(i, 1))) break;
        (void)m.can_end();
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string in(reinterpret_cast<const char*>(data), size);
    if (!in.empty() && in[0] == 'S') {
        const nlohmann::ordered_json schema = nlohmann::ordered_json::parse(in.substr(1), nullptr, false);
        if (schema.is_discarded()) return 0;
        auto gbnf = moemesh::json_schema_to_gbnf(schema, "root");
        if (!gbnf.ok()) {
            if (gbnf.status().message().empty()) std::abort();
            return 0;
        }
        auto g = moemesh::Grammar::parse(gbnf.value());
        if (!g.ok()) std::abort();  // the converter wrote a grammar the engine refuses
        exercise(g.value(), in.substr(1));
        return 0;
    }
    auto g = moemesh::Grammar::parse(in);
    if (!g.ok()) {
        if (g.status().message().empty()) std::abort();
        return 0;
    }
    exercise(g.value(), in);
    return 0;
}
