// A Jinja2 interpreter for the chat templates that model files carry (GGUF key
// tokenizer.chat_template, HF tokenizer_config.json's chat_template). It implements the language
// as Hugging Face's apply_chat_template runs it: jinja2's ImmutableSandboxedEnvironment with
// trim_blocks and lstrip_blocks, the tojson filter with ensure_ascii=False, raise_exception(), and
// Python's str / dict / list methods that templates call (startswith, split, items, get, ...).
//
// A template comes from an untrusted file, so parsing and rendering never crash or hang: errors
// name the line, and rendering is bounded (output size, call depth, work steps).
//
// Supported: {{ }}, {% %}, {# #} with - and + whitespace control; if/elif/else, for (else, loop
// filter, tuple targets, loop.*), set (with namespace attributes and block set), macro (defaults,
// keyword arguments, caller-less), filter blocks, raw; literals, lists, dicts, tuples, slices,
// attribute and item access, calls, filters, tests, `x if c else y`, and/or/not/in/is, arithmetic,
// comparisons and ~. Not supported (an error naming it): include/import/extends/block and call blocks.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace moemesh::jinja {

struct Limits {
    size_t max_output = 32u << 20;   // bytes of rendered text
    int max_depth = 200;             // nested macro calls plus nested expression evaluation
    uint64_t max_steps = 20'000'000; // statements, expressions and loop iterations run
};

class Template {
public:
    // Parses `source`; errors say "<name> line L: ..." (e.g. "chat template line 3: unclosed 'for'").
    static StatusOr<Template> parse(std::string_view source, std::string name = "chat template");

    // Renders with `context`'s keys as global variables (an object; null means none). Strings,
    // numbers, booleans, null, arrays and objects map to Jinja's str, int/float, bool, none, list
    // and dict; object key order is kept (tojson writes keys in the order they arrived).
    StatusOr<std::string> render(const nlohmann::ordered_json& context, const Limits& limits = {}) const;

    struct Impl;

private:
    explicit Template(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
    std::shared_ptr<const Impl> impl_;
};

}  // namespace moemesh::jinja
