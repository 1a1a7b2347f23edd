// Internals of the Jinja interpreter (common/jinja.h): values and the syntax tree that
// common/jinja.cpp's parser builds and common/jinja_eval.cpp runs.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/jinja.h"

namespace moemesh::jinja {

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<Value, Value>>;  // insertion order, as Python's dict

struct CallArgs;
class Runtime;
using Builtin = std::function<StatusOr<Value>(Runtime&, const CallArgs&)>;

// A Jinja value. Lists and dicts are shared (Jinja's sandbox makes them immutable); a namespace is
// the one mutable object ({% set ns.x = ... %}).
struct Value {
    enum Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunc, kNamespace };
    Kind kind = kUndefined;
    bool b = false;
    int64_t i = 0;
    double f = 0;
    std::string s;                    // kString; kUndefined: the name that was looked up
    std::shared_ptr<List> list;       // kList
    std::shared_ptr<Dict> dict;       // kDict, kNamespace
    std::shared_ptr<Builtin> func;    // kFunc
    bool tuple = false;               // kList: a tuple (prints as (a, b)), e.g. from dict.items()

    static Value none() { Value v; v.kind = kNone; return v; }
    static Value undefined(std::string name = "") { Value v; v.s = std::move(name); return v; }
    static Value boolean(bool x) { Value v; v.kind = kBool; v.b = x; return v; }
    static Value integer(int64_t x) { Value v; v.kind = kInt; v.i = x; return v; }
    static Value number(double x) { Value v; v.kind = kFloat; v.f = x; return v; }
    static Value string(std::string x) { Value v; v.kind = kString; v.s = std::move(x); return v; }
    static Value of_list(List x) { Value v; v.kind = kList; v.list = std::make_shared<List>(std::move(x)); return v; }
    static Value of_tuple(List x) { Value v = of_list(std::move(x)); v.tuple = true; return v; }
    static Value of_dict(Dict x) { Value v; v.kind = kDict; v.dict = std::make_shared<Dict>(std::move(x)); return v; }
    static Value function(Builtin fn) { Value v; v.kind = kFunc; v.func = std::make_shared<Builtin>(std::move(fn)); return v; }

    bool is_undefined() const { return kind == kUndefined; }
    bool is_string() const { return kind == kString; }
    bool is_number() const { return kind == kInt || kind == kFloat; }
    double as_double() const { return kind == kInt ? static_cast<double>(i) : kind == kBool ? (b ? 1.0 : 0.0) : f; }
};

struct CallArgs {
    std::vector<Value> pos;
    std::vector<std::pair<std::string, Value>> kw;
    int line = 0;
    const Value* kwarg(const std::string& name) const {
        for (const auto& [k, v] : kw)
            if (k == name) return &v;
        return nullptr;
    }
    // The argument at `index` or named `name`, or nullptr.
    const Value* arg(size_t index, const std::string& name) const {
        if (index < pos.size()) return &pos[index];
        return kwarg(name);
    }
};

// ---- syntax tree ----

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
    enum Kind {
        kLiteral, kName, kAttr, kItem, kSlice, kCall, kFilter, kTest, kNeg, kPos, kNot, kBinary, kAnd, kOr,
        kCond, kList, kTuple, kDict
    };
    Kind kind;
    int line = 0;
    Value literal;                  // kLiteral
    std::string name;               // kName, kAttr (attribute), kFilter / kTest (filter or test name), kBinary (op)
    ExprPtr a, b, c;                // operands; kSlice: a[b:c:d] uses a, b, c, d; kCond: b if a else c
    ExprPtr d;
    bool negated = false;           // kTest: `is not`
    std::vector<ExprPtr> items;     // kList / kTuple / kDict (key, value pairs flattened); call arguments
    std::vector<std::string> kw_names;  // kCall / kFilter / kTest: names of the last kw_names.size() items
    explicit Expr(Kind k, int ln) : kind(k), line(ln) {}
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Stmt {
    enum Kind { kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kFilterBlock, kBreak, kContinue };
    Kind kind;
    int line = 0;
    std::string text;                        // kText
    ExprPtr expr;                            // kOutput, kSet value, kFor iterable, kFilterBlock: the filter
                                             // chain applied to a placeholder name
    std::vector<std::pair<ExprPtr, Body>> branches;  // kIf: (condition, body); a null condition is `else`
    std::vector<std::string> targets;        // kFor / kSet / kSetBlock: names (several: tuple unpacking)
    std::string attr;                        // kSet / kSetBlock: `ns.attr` target (targets[0] is ns)
    ExprPtr filter;                          // kFor: `for x in y if filter`
    Body body, else_body;                    // kFor, kMacro, kSetBlock, kFilterBlock
    std::string name;                        // kMacro
    std::vector<std::pair<std::string, ExprPtr>> params;  // kMacro: name, default (may be null)
    bool catch_varargs = false, catch_kwargs = false;     // kMacro: the body reads varargs / kwargs
    explicit Stmt(Kind k, int ln) : kind(k), line(ln) {}
};

struct Template::Impl {
    std::string name;
    Body body;
};

// The name of the placeholder variable that a {% filter %} block's chain is applied to.
inline constexpr const char* kFilterBlockInput = "\x01filter-block-input";

}  // namespace moemesh::jinja
