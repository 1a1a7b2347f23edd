// Internals of the Jinja interpreter: the lexer (common/jinja_lexer.cpp) that common/jinja.cpp's
// parser reads. Template text becomes text tokens and tag tokens, whitespace control applied.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace moemesh::jinja {

struct Tok {
    enum T { kText, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };
    T t = kEof;
    std::string s;  // text, name, string value, operator
    int64_t i = 0;
    double f = 0;
    int line = 1;
};

// The tokens of `src`; errors say "<name> line L: ...".
StatusOr<std::vector<Tok>> lex(std::string_view src, const std::string& name);

}  // namespace moemesh::jinja
