// Internals of the Jinja interpreter: the runtime that common/jinja_eval.cpp implements and the
// builtins (filters, tests, methods, globals) of common/jinja_builtins.cpp call back into.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "common/jinja_ast.h"

namespace moemesh::jinja {

// Deepest nesting of JSON context values and of tojson output.
inline constexpr int kMaxNesting = 256;

struct Frame {
    std::unordered_map<std::string, Value> vars;
    std::shared_ptr<Frame> parent;
};

class Runtime {
public:
    Runtime(const Template::Impl& t, const Limits& limits) : tmpl_(t), limits_(limits) {}

    StatusOr<std::string> render(const nlohmann::ordered_json& context);

    // Python's str() and repr() of a value, and json.dumps(ensure_ascii=False) as HF's tojson.
    static std::string to_string(const Value& v);
    static std::string repr(const Value& v);
    struct JsonStyle {
        int indent = -1;  // < 0: one line
        bool sort_keys = false;
        std::string item_sep = ", ", key_sep = ": ";  // json.dumps' defaults (item "," with an indent)
    };
    Status to_json(const Value& v, const JsonStyle& style, int level, std::string* out, int line);
    static bool truthy(const Value& v);
    static bool equals(const Value& a, const Value& b);
    // a < b as Python orders them (numbers, strings, lists); error when incomparable.
    StatusOr<bool> less(const Value& a, const Value& b, int line);
    static const char* type_name(const Value& v);

    StatusOr<Value> call(const Value& fn, const CallArgs& args);
    StatusOr<Value> get_attr(const Value& obj, const std::string& name, int line);
    StatusOr<Value> get_item(const Value& obj, const Value& key, int line);
    StatusOr<Value> apply_filter(const std::string& name, const Value& input, const CallArgs& args);
    StatusOr<bool> apply_test(const std::string& name, const Value& input, const CallArgs& args);
    // Items of an iterable (list, tuple, dict keys, string characters); undefined iterates as empty.
    StatusOr<List> iterate(const Value& v, int line);

    Status error(int line, const std::string& what) const;
    // Counts work (`units` steps, bytes/64 for string building); errors past the limit.
    Status charge(uint64_t units, int line);
    Status check_size(size_t bytes, int line) const;

    const Limits& limits() const { return limits_; }
    const std::string& name() const { return tmpl_.name; }

private:
    enum class Flow { kNormal, kBreak, kContinue };
    StatusOr<Flow> exec_body(const Body& body, const std::shared_ptr<Frame>& frame, std::string* out);
    StatusOr<Flow> exec(const Stmt& s, const std::shared_ptr<Frame>& frame, std::string* out);
    Status exec_for(const Stmt& s, const std::shared_ptr<Frame>& frame, std::string* out);
    Status assign(const Stmt& s, const std::shared_ptr<Frame>& frame, Value v);
    StatusOr<Value> eval(const Expr& e, const std::shared_ptr<Frame>& frame);
    StatusOr<Value> eval_binary(const Expr& e, const Value& a, const Value& b);
    StatusOr<CallArgs> eval_args(const Expr& e, size_t first, const std::shared_ptr<Frame>& frame);
    Value make_macro(const Stmt& s, const std::shared_ptr<Frame>& frame);
    static Value lookup(const std::shared_ptr<Frame>& frame, const std::string& name);

    const Template::Impl& tmpl_;
    const Limits& limits_;
    uint64_t steps_ = 0;
    int depth_ = 0;
};

// Builtins (common/jinja_builtins.cpp, common/jinja_strings.cpp).
using FilterFn = StatusOr<Value> (*)(Runtime&, const Value&, const CallArgs&);
using TestFn = StatusOr<bool> (*)(Runtime&, const Value&, const CallArgs&);
FilterFn find_filter(const std::string& name);
TestFn find_test(const std::string& name);
// A bound method of a string or dict (`s.startswith`, `d.items`), or undefined.
Value find_method(const Value& obj, const std::string& name);
// The globals every template sees: raise_exception, namespace, range, dict, strftime_now.
void add_globals(Frame* frame);

// String helpers (common/jinja_strings.cpp), shared by the methods and the filters. Strings index,
// slice and measure by code point, as Python's str does.
std::vector<std::string> utf8_chars(const std::string& s);
size_t utf8_length(const std::string& s);
uint32_t code_point(const std::string& ch);  // of one character from utf8_chars
bool py_space(uint32_t c);                    // Python's str.isspace() of one code point
std::string map_case(const std::string& s, int mode /* 0 lower, 1 upper */);
// str.strip / lstrip / rstrip; `chars` null or none: whitespace.
std::string strip(const std::string& s, const Value* chars, bool left, bool right);
// str.split / rsplit; `sep` null or none: runs of whitespace.
List split(const std::string& s, const Value* sep, int64_t maxsplit, bool from_right);
// str.replace; count < 0: all.
std::string replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count);
// A string's bound method (`s.startswith`), or undefined.
Value string_method(const std::string& s, const std::string& name);
// An optional integer / truthy argument, `dflt` when absent or none.
int64_t int_arg(const Value* v, int64_t dflt);
bool bool_arg(const Value* v, bool dflt);

}  // namespace moemesh::jinja
