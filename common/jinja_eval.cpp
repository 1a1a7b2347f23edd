// Jinja runtime (common/jinja.h): statements and expressions. Value semantics: common/jinja_value.cpp.
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstring>

#include "common/jinja_runtime.h"

namespace moemesh::jinja {
namespace {

StatusOr<Value> from_json(const nlohmann::ordered_json& j, int depth) {
    if (depth > kMaxNesting) return MM_ERROR("template context nested deeper than %d levels", kMaxNesting);
    switch (j.type()) {
        case nlohmann::ordered_json::value_t::null: return Value::none();
        case nlohmann::ordered_json::value_t::boolean: return Value::boolean(j.get<bool>());
        case nlohmann::ordered_json::value_t::number_integer: return Value::integer(j.get<int64_t>());
        case nlohmann::ordered_json::value_t::number_unsigned: {
            const uint64_t u = j.get<uint64_t>();
            if (u <= static_cast<uint64_t>(INT64_MAX)) return Value::integer(static_cast<int64_t>(u));
            return Value::number(static_cast<double>(u));
        }
        case nlohmann::ordered_json::value_t::number_float: return Value::number(j.get<double>());
        case nlohmann::ordered_json::value_t::string: return Value::string(j.get<std::string>());
        case nlohmann::ordered_json::value_t::array: {
            List l;
            l.reserve(j.size());
            for (const auto& x : j) {
                MM_ASSIGN_OR_RETURN(Value v, from_json(x, depth + 1));
                l.push_back(std::move(v));
            }
            return Value::of_list(std::move(l));
        }
        case nlohmann::ordered_json::value_t::object: {
            Dict d;
            d.reserve(j.size());
            for (auto it = j.begin(); it != j.end(); ++it) {
                MM_ASSIGN_OR_RETURN(Value v, from_json(it.value(), depth + 1));
                d.emplace_back(Value::string(it.key()), std::move(v));
            }
            return Value::of_dict(std::move(d));
        }
        default: return Value::none();  // binary / discarded: not produced by JSON text
    }
}

bool checked_int(const char* op, int64_t a, int64_t b, int64_t* r) {
    if (!std::strcmp(op, "+")) return !__builtin_add_overflow(a, b, r);
    if (!std::strcmp(op, "-")) return !__builtin_sub_overflow(a, b, r);
    if (!std::strcmp(op, "*")) return !__builtin_mul_overflow(a, b, r);
    return false;
}

// Python's floor division and modulo on integers.
int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
    return q;
}

struct DepthScope {
    int* d;
    ~DepthScope() { --*d; }
};

}  // namespace

Status Runtime::error(int line, const std::string& what) const {
    return MM_ERROR("%s line %d: %s", tmpl_.name.c_str(), line, what.c_str());
}

Status Runtime::charge(uint64_t units, int line) {
    steps_ += units;
    if (steps_ > limits_.max_steps)
        return error(line, "rendering takes too long (more than " + std::to_string(limits_.max_steps) +
                               " steps): a loop that does not end, or input too large for the template");
    return Status();
}

Status Runtime::check_size(size_t bytes, int line) const {
    if (bytes > limits_.max_output)
        return error(line, "a value or the output grows past " + std::to_string(limits_.max_output) + " bytes");
    return Status();
}

StatusOr<List> Runtime::iterate(const Value& v, int line) {
    switch (v.kind) {
        case Value::kUndefined: return List{};
        case Value::kList: return *v.list;
        case Value::kDict: {
            List keys;
            for (const auto& kv : *v.dict) keys.push_back(kv.first);
            return keys;
        }
        case Value::kString: {
            List chars;
            for (std::string& c : utf8_chars(v.s)) chars.push_back(Value::string(std::move(c)));
            return chars;
        }
        default: return error(line, std::string("'") + type_name(v) + "' object is not iterable");
    }
}

StatusOr<Value> Runtime::get_attr(const Value& obj, const std::string& name, int line) {
    if (obj.is_undefined())
        return error(line, "'" + (obj.s.empty() ? std::string("value") : obj.s) + "' is undefined (reading ." +
                               name + ")");
    if (obj.kind == Value::kNamespace) {
        for (const auto& [k, v] : *obj.dict)
            if (k.s == name) return v;
        return Value::undefined(name);
    }
    Value m = find_method(obj, name);
    if (!m.is_undefined()) return m;
    if (obj.kind == Value::kDict)
        for (const auto& [k, v] : *obj.dict)
            if (k.kind == Value::kString && k.s == name) return v;
    return Value::undefined(name);
}

StatusOr<Value> Runtime::get_item(const Value& obj, const Value& key, int line) {
    if (obj.is_undefined())
        return error(line, "'" + (obj.s.empty() ? std::string("value") : obj.s) + "' is undefined (reading [" +
                               repr(key) + "])");
    if (obj.kind == Value::kDict) {
        for (const auto& [k, v] : *obj.dict)
            if (equals(k, key)) return v;
    } else if ((obj.kind == Value::kList || obj.kind == Value::kString) &&
               (key.kind == Value::kInt || key.kind == Value::kBool)) {
        const int64_t idx = key.kind == Value::kBool ? key.b : key.i;
        if (obj.kind == Value::kList) {
            const int64_t n = static_cast<int64_t>(obj.list->size());
            const int64_t k = idx < 0 ? idx + n : idx;
            if (k >= 0 && k < n) return (*obj.list)[static_cast<size_t>(k)];
        } else {
            std::vector<std::string> chars = utf8_chars(obj.s);
            const int64_t n = static_cast<int64_t>(chars.size());
            const int64_t k = idx < 0 ? idx + n : idx;
            if (k >= 0 && k < n) return Value::string(chars[static_cast<size_t>(k)]);
        }
        return Value::undefined();
    }
    if (key.kind == Value::kString) return get_attr(obj, key.s, line);
    return Value::undefined();
}

StatusOr<Value> Runtime::call(const Value& fn, const CallArgs& args) {
    if (fn.kind == Value::kFunc) {
        if (++depth_ > limits_.max_depth) {
            --depth_;
            return error(args.line, "calls nested too deeply (more than " + std::to_string(limits_.max_depth) + ")");
        }
        DepthScope g{&depth_};
        return (*fn.func)(*this, args);
    }
    if (fn.is_undefined())
        return error(args.line, "'" + (fn.s.empty() ? std::string("value") : fn.s) + "' is undefined (called)");
    return error(args.line, std::string("'") + type_name(fn) + "' object is not callable");
}

StatusOr<Value> Runtime::apply_filter(const std::string& name, const Value& input, const CallArgs& args) {
    FilterFn f = find_filter(name);
    if (!f) return error(args.line, "unknown filter '" + name + "'");
    return f(*this, input, args);
}

StatusOr<bool> Runtime::apply_test(const std::string& name, const Value& input, const CallArgs& args) {
    TestFn t = find_test(name);
    if (!t) return error(args.line, "unknown test '" + name + "'");
    return t(*this, input, args);
}

Value Runtime::lookup(const std::shared_ptr<Frame>& frame, const std::string& name) {
    for (const Frame* f = frame.get(); f; f = f->parent.get()) {
        auto it = f->vars.find(name);
        if (it != f->vars.end()) return it->second;
    }
    return Value::undefined(name);
}

StatusOr<std::string> Runtime::render(const nlohmann::ordered_json& context) {
    auto globals = std::make_shared<Frame>();
    add_globals(globals.get());
    if (!context.is_null()) {
        if (!context.is_object()) return MM_ERROR("%s: the render context must be an object", tmpl_.name.c_str());
        for (auto it = context.begin(); it != context.end(); ++it) {
            MM_ASSIGN_OR_RETURN(Value v, from_json(it.value(), 0));
            globals->vars[it.key()] = std::move(v);
        }
    }
    auto top = std::make_shared<Frame>();
    top->parent = globals;
    std::string out;
    MM_ASSIGN_OR_RETURN(Flow f, exec_body(tmpl_.body, top, &out));
    (void)f;  // break/continue outside a loop end the template's statements early, as nothing else
    return out;
}

StatusOr<Runtime::Flow> Runtime::exec_body(const Body& body, const std::shared_ptr<Frame>& frame, std::string* out) {
    for (const StmtPtr& s : body) {
        MM_ASSIGN_OR_RETURN(Flow f, exec(*s, frame, out));
        if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
}

StatusOr<Runtime::Flow> Runtime::exec(const Stmt& s, const std::shared_ptr<Frame>& frame, std::string* out) {
    MM_RETURN_IF_ERROR(charge(1, s.line));
    if (++depth_ > limits_.max_depth) {
        --depth_;
        return error(s.line, "blocks and calls nested too deeply (more than " + std::to_string(limits_.max_depth) + ")");
    }
    DepthScope g{&depth_};
    switch (s.kind) {
        case Stmt::kText:
            *out += s.text;
            MM_RETURN_IF_ERROR(check_size(out->size(), s.line));
            return Flow::kNormal;
        case Stmt::kOutput: {
            MM_ASSIGN_OR_RETURN(Value v, eval(*s.expr, frame));
            *out += to_string(v);
            MM_RETURN_IF_ERROR(check_size(out->size(), s.line));
            return Flow::kNormal;
        }
        case Stmt::kIf:
            for (const auto& [cond, body] : s.branches) {
                bool take = true;
                if (cond) {
                    MM_ASSIGN_OR_RETURN(Value c, eval(*cond, frame));
                    take = truthy(c);
                }
                if (take) return exec_body(body, frame, out);
            }
            return Flow::kNormal;
        case Stmt::kFor: MM_RETURN_IF_ERROR(exec_for(s, frame, out)); return Flow::kNormal;
        case Stmt::kSet: {
            MM_ASSIGN_OR_RETURN(Value v, eval(*s.expr, frame));
            MM_RETURN_IF_ERROR(assign(s, frame, std::move(v)));
            return Flow::kNormal;
        }
        case Stmt::kSetBlock:
        case Stmt::kFilterBlock: {
            std::string inner;
            MM_ASSIGN_OR_RETURN(Flow f, exec_body(s.body, frame, &inner));
            (void)f;
            Value v = Value::string(std::move(inner));
            if (s.expr) {
                auto scope = std::make_shared<Frame>();
                scope->parent = frame;
                scope->vars[kFilterBlockInput] = std::move(v);
                MM_ASSIGN_OR_RETURN(v, eval(*s.expr, scope));
            }
            if (s.kind == Stmt::kFilterBlock) {
                *out += to_string(v);
                MM_RETURN_IF_ERROR(check_size(out->size(), s.line));
                return Flow::kNormal;
            }
            MM_RETURN_IF_ERROR(assign(s, frame, std::move(v)));
            return Flow::kNormal;
        }
        case Stmt::kMacro: frame->vars[s.name] = make_macro(s, frame); return Flow::kNormal;
        case Stmt::kBreak: return Flow::kBreak;
        case Stmt::kContinue: return Flow::kContinue;
    }
    return Flow::kNormal;
}

Status Runtime::assign(const Stmt& s, const std::shared_ptr<Frame>& frame, Value v) {
    if (!s.attr.empty()) {
        Value ns = lookup(frame, s.targets[0]);
        if (ns.kind != Value::kNamespace)
            return error(s.line, "cannot set '" + s.targets[0] + "." + s.attr + "': '" + s.targets[0] +
                                     "' is not a namespace()");
        for (auto& [k, old] : *ns.dict)
            if (k.s == s.attr) {
                old = std::move(v);
                return Status();
            }
        ns.dict->emplace_back(Value::string(s.attr), std::move(v));
        return Status();
    }
    if (s.targets.size() == 1) {
        frame->vars[s.targets[0]] = std::move(v);
        return Status();
    }
    MM_ASSIGN_OR_RETURN(List items, iterate(v, s.line));
    if (items.size() != s.targets.size())
        return error(s.line, "cannot unpack " + std::to_string(items.size()) + " values into " +
                                 std::to_string(s.targets.size()) + " names");
    for (size_t k = 0; k < items.size(); ++k) frame->vars[s.targets[k]] = std::move(items[k]);
    return Status();
}

Status Runtime::exec_for(const Stmt& s, const std::shared_ptr<Frame>& frame, std::string* out) {
    MM_ASSIGN_OR_RETURN(Value seq, eval(*s.expr, frame));
    MM_ASSIGN_OR_RETURN(List all, iterate(seq, s.line));
    // Each iteration gets a fresh scope over the enclosing one, as jinja2's: a {% set %} in the body
    // neither leaks out of the loop nor carries into the next iteration.
    std::shared_ptr<Frame> scope;
    auto fresh_scope = [&] {
        scope = std::make_shared<Frame>();
        scope->parent = frame;
    };
    fresh_scope();
    auto bind = [&](const Value& item) -> Status {
        if (s.targets.size() == 1) {
            scope->vars[s.targets[0]] = item;
            return Status();
        }
        MM_ASSIGN_OR_RETURN(List parts, iterate(item, s.line));
        if (parts.size() != s.targets.size())
            return error(s.line, "cannot unpack " + std::to_string(parts.size()) + " values into " +
                                     std::to_string(s.targets.size()) + " loop variables");
        for (size_t k = 0; k < parts.size(); ++k) scope->vars[s.targets[k]] = std::move(parts[k]);
        return Status();
    };
    List items;
    if (s.filter) {  // the loop's `if` runs before loop.* is counted, as jinja2 does
        for (const Value& item : all) {
            MM_RETURN_IF_ERROR(charge(1, s.line));
            fresh_scope();
            MM_RETURN_IF_ERROR(bind(item));
            MM_ASSIGN_OR_RETURN(Value keep, eval(*s.filter, scope));
            if (truthy(keep)) items.push_back(item);
        }
    } else {
        items = std::move(all);
    }
    if (items.empty()) {
        MM_ASSIGN_OR_RETURN(Flow f, exec_body(s.else_body, frame, out));
        (void)f;
        return Status();
    }
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
        MM_RETURN_IF_ERROR(charge(1, s.line));
        const Value& item = items[static_cast<size_t>(k)];
        fresh_scope();
        MM_RETURN_IF_ERROR(bind(item));
        Dict loop;
        loop.emplace_back(Value::string("index"), Value::integer(k + 1));
        loop.emplace_back(Value::string("index0"), Value::integer(k));
        loop.emplace_back(Value::string("revindex"), Value::integer(n - k));
        loop.emplace_back(Value::string("revindex0"), Value::integer(n - k - 1));
        loop.emplace_back(Value::string("first"), Value::boolean(k == 0));
        loop.emplace_back(Value::string("last"), Value::boolean(k == n - 1));
        loop.emplace_back(Value::string("length"), Value::integer(n));
        loop.emplace_back(Value::string("depth"), Value::integer(1));
        loop.emplace_back(Value::string("depth0"), Value::integer(0));
        if (k > 0) loop.emplace_back(Value::string("previtem"), items[static_cast<size_t>(k - 1)]);
        if (k + 1 < n) loop.emplace_back(Value::string("nextitem"), items[static_cast<size_t>(k + 1)]);
        loop.emplace_back(Value::string("cycle"), Value::function([k](Runtime& rt, const CallArgs& a) -> StatusOr<Value> {
                              if (a.pos.empty()) return rt.error(a.line, "loop.cycle() needs at least one value");
                              return a.pos[static_cast<size_t>(k) % a.pos.size()];
                          }));
        scope->vars["loop"] = Value::of_dict(std::move(loop));
        MM_ASSIGN_OR_RETURN(Flow f, exec_body(s.body, scope, out));
        if (f == Flow::kBreak) break;
    }
    return Status();
}

Value Runtime::make_macro(const Stmt& s, const std::shared_ptr<Frame>& frame) {
    const Stmt* macro = &s;
    std::weak_ptr<Frame> weak = frame;  // the frame holds the macro: a strong pointer would be a cycle
    return Value::function([this, macro, weak](Runtime& rt, const CallArgs& a) -> StatusOr<Value> {
        std::shared_ptr<Frame> closure = weak.lock();
        auto scope = std::make_shared<Frame>();
        scope->parent = closure;
        const auto& params = macro->params;
        // Extra arguments land in varargs / kwargs, allowed (as in jinja2) when the body reads them.
        if (a.pos.size() > params.size() && !macro->catch_varargs)
            return rt.error(a.line, "macro '" + macro->name + "' takes not more than " + std::to_string(params.size()) +
                                        " arguments, got " + std::to_string(a.pos.size()));
        List extra_pos;
        for (size_t k = params.size(); k < a.pos.size(); ++k) extra_pos.push_back(a.pos[k]);
        scope->vars["varargs"] = Value::of_tuple(std::move(extra_pos));
        for (size_t k = 0; k < params.size(); ++k) {
            const Value* given = a.arg(k, params[k].first);
            if (given) {
                scope->vars[params[k].first] = *given;
            } else if (params[k].second) {
                MM_ASSIGN_OR_RETURN(Value d, eval(*params[k].second, scope));
                scope->vars[params[k].first] = std::move(d);
            } else {
                scope->vars[params[k].first] = Value::undefined(params[k].first);
            }
        }
        Dict extra_kw;
        for (const auto& [name, v] : a.kw) {
            bool known = false;
            for (const auto& p : params) known |= p.first == name;
            if (!known && !macro->catch_kwargs)
                return rt.error(a.line, "macro '" + macro->name + "' has no parameter '" + name + "'");
            if (!known) extra_kw.emplace_back(Value::string(name), v);
        }
        scope->vars["kwargs"] = Value::of_dict(std::move(extra_kw));
        std::string out;
        MM_ASSIGN_OR_RETURN(Flow f, exec_body(macro->body, scope, &out));
        (void)f;
        return Value::string(std::move(out));
    });
}

StatusOr<CallArgs> Runtime::eval_args(const Expr& e, size_t first, const std::shared_ptr<Frame>& frame) {
    CallArgs args;
    args.line = e.line;
    const size_t n_kw = e.kw_names.size();
    const size_t n_pos = e.items.size() - n_kw;
    for (size_t k = first; k < e.items.size(); ++k) {
        MM_ASSIGN_OR_RETURN(Value v, eval(*e.items[k], frame));
        if (k < n_pos) args.pos.push_back(std::move(v));
        else args.kw.emplace_back(e.kw_names[k - n_pos], std::move(v));
    }
    return args;
}

StatusOr<Value> Runtime::eval(const Expr& e, const std::shared_ptr<Frame>& frame) {
    MM_RETURN_IF_ERROR(charge(1, e.line));
    if (++depth_ > limits_.max_depth) {
        --depth_;
        return error(e.line, "expressions and calls nested too deeply (more than " +
                                 std::to_string(limits_.max_depth) + ")");
    }
    DepthScope g{&depth_};
    switch (e.kind) {
        case Expr::kLiteral: return e.literal;
        case Expr::kName: return lookup(frame, e.name);
        case Expr::kAttr: {
            MM_ASSIGN_OR_RETURN(Value obj, eval(*e.a, frame));
            return get_attr(obj, e.name, e.line);
        }
        case Expr::kItem: {
            MM_ASSIGN_OR_RETURN(Value obj, eval(*e.a, frame));
            MM_ASSIGN_OR_RETURN(Value key, eval(*e.b, frame));
            return get_item(obj, key, e.line);
        }
        case Expr::kSlice: {
            MM_ASSIGN_OR_RETURN(Value obj, eval(*e.a, frame));
            int64_t parts[3] = {0, 0, 1};
            bool given[3] = {false, false, false};
            const Expr* exprs[3] = {e.b.get(), e.c.get(), e.d.get()};
            for (int k = 0; k < 3; ++k) {
                if (!exprs[k]) continue;
                MM_ASSIGN_OR_RETURN(Value v, eval(*exprs[k], frame));
                if (v.kind == Value::kNone) continue;
                if (v.kind != Value::kInt) return error(e.line, "slice indices must be integers or None");
                parts[k] = v.i;
                given[k] = true;
            }
            const int64_t step = parts[2];
            if (step == 0) return error(e.line, "slice step cannot be zero");
            std::vector<std::string> chars;
            const bool is_str = obj.kind == Value::kString;
            if (is_str) chars = utf8_chars(obj.s);
            else if (obj.kind != Value::kList) return error(e.line, std::string("cannot slice a ") + type_name(obj));
            const int64_t n = static_cast<int64_t>(is_str ? chars.size() : obj.list->size());
            auto clamp = [&](int64_t v, bool lower) {
                if (v < 0) v += n;
                if (step > 0) return std::clamp<int64_t>(v, 0, n);
                return std::clamp<int64_t>(v, -1, n - 1) + (lower ? 0 : 0);
            };
            int64_t start = given[0] ? clamp(parts[0], true) : (step > 0 ? 0 : n - 1);
            int64_t stop = given[1] ? clamp(parts[1], false) : (step > 0 ? n : -1);
            std::string s;
            List l;
            for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
                MM_RETURN_IF_ERROR(charge(1, e.line));
                if (is_str) s += chars[static_cast<size_t>(k)];
                else l.push_back((*obj.list)[static_cast<size_t>(k)]);
            }
            if (is_str) return Value::string(std::move(s));
            return obj.tuple ? Value::of_tuple(std::move(l)) : Value::of_list(std::move(l));
        }
        case Expr::kCall: {
            MM_ASSIGN_OR_RETURN(Value fn, eval(*e.a, frame));
            MM_ASSIGN_OR_RETURN(CallArgs args, eval_args(e, 0, frame));
            if (fn.is_undefined() && e.a->kind == Expr::kAttr)
                return error(e.line, "'" + e.a->name + "' is not a method or function that exists here");
            return call(fn, args);
        }
        case Expr::kFilter: {
            MM_ASSIGN_OR_RETURN(Value in, eval(*e.a, frame));
            MM_ASSIGN_OR_RETURN(CallArgs args, eval_args(e, 0, frame));
            return apply_filter(e.name, in, args);
        }
        case Expr::kTest: {
            MM_ASSIGN_OR_RETURN(Value in, eval(*e.a, frame));
            MM_ASSIGN_OR_RETURN(CallArgs args, eval_args(e, 0, frame));
            MM_ASSIGN_OR_RETURN(bool r, apply_test(e.name, in, args));
            return Value::boolean(r != e.negated);
        }
        case Expr::kNeg:
        case Expr::kPos: {
            MM_ASSIGN_OR_RETURN(Value v, eval(*e.a, frame));
            if (v.kind == Value::kBool) v = Value::integer(v.b);
            if (v.kind == Value::kInt) {
                if (e.kind == Expr::kNeg && v.i == INT64_MIN) return error(e.line, "integer overflow");
                return Value::integer(e.kind == Expr::kNeg ? -v.i : v.i);
            }
            if (v.kind == Value::kFloat) return Value::number(e.kind == Expr::kNeg ? -v.f : v.f);
            return error(e.line, std::string("bad operand type for unary ") + (e.kind == Expr::kNeg ? "-" : "+") +
                                     ": " + type_name(v));
        }
        case Expr::kNot: {
            MM_ASSIGN_OR_RETURN(Value v, eval(*e.a, frame));
            return Value::boolean(!truthy(v));
        }
        case Expr::kAnd:
        case Expr::kOr: {
            MM_ASSIGN_OR_RETURN(Value a, eval(*e.a, frame));
            if (truthy(a) == (e.kind == Expr::kOr)) return a;
            return eval(*e.b, frame);
        }
        case Expr::kCond: {
            MM_ASSIGN_OR_RETURN(Value c, eval(*e.a, frame));
            if (truthy(c)) return eval(*e.b, frame);
            if (e.c) return eval(*e.c, frame);
            return Value::undefined();
        }
        case Expr::kList:
        case Expr::kTuple: {
            List l;
            for (const ExprPtr& x : e.items) {
                MM_ASSIGN_OR_RETURN(Value v, eval(*x, frame));
                l.push_back(std::move(v));
            }
            return e.kind == Expr::kTuple ? Value::of_tuple(std::move(l)) : Value::of_list(std::move(l));
        }
        case Expr::kDict: {
            Dict d;
            for (size_t k = 0; k + 1 < e.items.size(); k += 2) {
                MM_ASSIGN_OR_RETURN(Value key, eval(*e.items[k], frame));
                MM_ASSIGN_OR_RETURN(Value v, eval(*e.items[k + 1], frame));
                bool replaced = false;
                for (auto& [k2, v2] : d)
                    if (equals(k2, key)) {
                        v2 = v;
                        replaced = true;
                    }
                if (!replaced) d.emplace_back(std::move(key), std::move(v));
            }
            return Value::of_dict(std::move(d));
        }
        case Expr::kBinary: {
            MM_ASSIGN_OR_RETURN(Value a, eval(*e.a, frame));
            MM_ASSIGN_OR_RETURN(Value b, eval(*e.b, frame));
            return eval_binary(e, a, b);
        }
    }
    return error(e.line, "internal: unknown expression");
}

StatusOr<Value> Runtime::eval_binary(const Expr& e, const Value& a, const Value& b) {
    const std::string& op = e.name;
    if (op == "==") return Value::boolean(equals(a, b));
    if (op == "!=") return Value::boolean(!equals(a, b));
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
        const bool swap = op == ">" || op == "<=";
        MM_ASSIGN_OR_RETURN(bool lt, swap ? less(b, a, e.line) : less(a, b, e.line));
        return Value::boolean(op == "<" || op == ">" ? lt : !lt);
    }
    if (op == "in" || op == "not in") {
        bool found = false;
        if (b.kind == Value::kString) {
            if (a.kind != Value::kString)
                return error(e.line, std::string("'in <string>' requires a string on the left, not ") + type_name(a));
            found = b.s.find(a.s) != std::string::npos;
        } else if (b.kind == Value::kList) {
            for (const Value& x : *b.list) found = found || equals(x, a);
        } else if (b.kind == Value::kDict || b.kind == Value::kNamespace) {
            for (const auto& kv : *b.dict) found = found || equals(kv.first, a);
        } else if (b.is_undefined()) {
            found = false;  // jinja2's Undefined iterates as empty
        } else {
            return error(e.line, std::string("argument of type '") + type_name(b) + "' is not iterable");
        }
        return Value::boolean(found == (op == "in"));
    }
    if (op == "~") {
        std::string s = to_string(a) + to_string(b);
        MM_RETURN_IF_ERROR(charge(s.size() / 64, e.line));
        MM_RETURN_IF_ERROR(check_size(s.size(), e.line));
        return Value::string(std::move(s));
    }
    auto type_error = [&]() {
        return error(e.line, "unsupported operand types for " + op + ": " + type_name(a) + " and " + type_name(b));
    };
    if (a.is_undefined() || b.is_undefined()) {
        const Value& u = a.is_undefined() ? a : b;
        return error(e.line, "'" + (u.s.empty() ? std::string("value") : u.s) + "' is undefined (operand of " + op +
                                 ")");
    }
    const bool an = a.is_number() || a.kind == Value::kBool, bn = b.is_number() || b.kind == Value::kBool;
    if (an && bn) {
        const bool ints = a.kind != Value::kFloat && b.kind != Value::kFloat;
        const int64_t ai = a.kind == Value::kBool ? a.b : a.i, bi = b.kind == Value::kBool ? b.b : b.i;
        const double af = a.as_double(), bf = b.as_double();
        if (op == "+" || op == "-" || op == "*") {
            if (ints) {
                int64_t r;
                if (!checked_int(op.c_str(), ai, bi, &r)) return error(e.line, "integer overflow in " + op);
                return Value::integer(r);
            }
            return Value::number(op == "+" ? af + bf : op == "-" ? af - bf : af * bf);
        }
        if (op == "/") {
            if (bf == 0) return error(e.line, "division by zero");
            return Value::number(af / bf);
        }
        if (op == "//" || op == "%") {
            if (ints ? bi == 0 : bf == 0) return error(e.line, "integer division or modulo by zero");
            if (ints) {
                if (ai == INT64_MIN && bi == -1) return error(e.line, "integer overflow in " + op);
                const int64_t q = floor_div(ai, bi);
                return Value::integer(op == "//" ? q : ai - q * bi);
            }
            const double q = std::floor(af / bf);
            return Value::number(op == "//" ? q : af - q * bf);
        }
        if (op == "**") {
            if (ints && bi >= 0) {
                int64_t r = 1;
                for (int64_t k = 0; k < bi; ++k) {
                    if (__builtin_mul_overflow(r, ai, &r)) return error(e.line, "integer overflow in **");
                    if (r == 0 || r == 1) break;
                }
                if (r == 1 && ai == -1 && bi % 2 == 1) r = -1;
                return Value::integer(r);
            }
            return Value::number(std::pow(af, bf));
        }
        return type_error();
    }
    if (op == "+") {
        if (a.kind == Value::kString && b.kind == Value::kString) {
            MM_RETURN_IF_ERROR(charge((a.s.size() + b.s.size()) / 64, e.line));
            MM_RETURN_IF_ERROR(check_size(a.s.size() + b.s.size(), e.line));
            return Value::string(a.s + b.s);
        }
        if (a.kind == Value::kList && b.kind == Value::kList) {
            MM_RETURN_IF_ERROR(charge(a.list->size() + b.list->size(), e.line));
            List l = *a.list;
            l.insert(l.end(), b.list->begin(), b.list->end());
            return Value::of_list(std::move(l));
        }
        return type_error();
    }
    if (op == "*") {
        const Value& seq = a.kind == Value::kInt ? b : a;
        const Value& cnt = a.kind == Value::kInt ? a : b;
        if (cnt.kind != Value::kInt || (seq.kind != Value::kString && seq.kind != Value::kList)) return type_error();
        const int64_t n = std::max<int64_t>(cnt.i, 0);
        const size_t unit = seq.kind == Value::kString ? seq.s.size() : seq.list->size() * 16;
        if (unit && static_cast<uint64_t>(n) > limits_.max_output / unit) MM_RETURN_IF_ERROR(check_size(SIZE_MAX, e.line));
        MM_RETURN_IF_ERROR(charge(static_cast<uint64_t>(n) * (unit / 64 + 1), e.line));
        if (seq.kind == Value::kString) {
            std::string s;
            for (int64_t k = 0; k < n; ++k) s += seq.s;
            return Value::string(std::move(s));
        }
        List l;
        for (int64_t k = 0; k < n; ++k) l.insert(l.end(), seq.list->begin(), seq.list->end());
        return Value::of_list(std::move(l));
    }
    if (op == "%" && a.kind == Value::kString) {
        CallArgs args;
        args.line = e.line;
        if (b.kind == Value::kList && b.tuple) args.pos = *b.list;
        else args.pos.push_back(b);
        return apply_filter("format", a, args);
    }
    return type_error();
}

StatusOr<std::string> Template::render(const nlohmann::ordered_json& context, const Limits& limits) const {
    Runtime rt(*impl_, limits);
    return rt.render(context);
}

}  // namespace moemesh::jinja
