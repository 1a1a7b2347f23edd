// Jinja builtins, part 2 (common/jinja.h): the filters and tests of jinja2 that chat templates use,
// and the globals Hugging Face gives templates. Python's str and dict methods are in jinja_strings.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <ctime>
#include <map>

#include <utf8proc.h>

#include "common/jinja_runtime.h"

namespace moemesh::jinja {

namespace {

using SO = StatusOr<Value>;

// ---- filters ----

SO f_length(Runtime& rt, const Value& v, const CallArgs& a) {
    switch (v.kind) {
        case Value::kUndefined: return Value::integer(0);
        case Value::kString: return Value::integer(static_cast<int64_t>(utf8_length(v.s)));
        case Value::kList: return Value::integer(static_cast<int64_t>(v.list->size()));
        case Value::kDict: case Value::kNamespace: return Value::integer(static_cast<int64_t>(v.dict->size()));
        default: return rt.error(a.line, std::string("object of type '") + Runtime::type_name(v) + "' has no len()");
    }
}

// HF's tojson: json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys).
SO f_tojson(Runtime& rt, const Value& v, const CallArgs& a) {
    Runtime::JsonStyle style;
    const Value* ind = a.arg(0, "indent");
    if (ind && ind->kind == Value::kInt) {
        style.indent = static_cast<int>(std::clamp<int64_t>(ind->i, 0, 64));
        style.item_sep = ",";
    }
    style.sort_keys = bool_arg(a.kwarg("sort_keys"), false);
    if (const Value* sep = a.kwarg("separators"); sep && sep->kind == Value::kList) {
        if (sep->list->size() != 2 || (*sep->list)[0].kind != Value::kString || (*sep->list)[1].kind != Value::kString)
            return rt.error(a.line, "tojson: separators must be a pair of strings");
        style.item_sep = (*sep->list)[0].s;
        style.key_sep = (*sep->list)[1].s;
    }
    std::string out;
    MM_RETURN_IF_ERROR(rt.to_json(v, style, 0, &out, a.line));
    return Value::string(std::move(out));
}

SO f_string(Runtime&, const Value& v, const CallArgs&) { return Value::string(Runtime::to_string(v)); }

SO f_trim(Runtime&, const Value& v, const CallArgs& a) {
    return Value::string(strip(Runtime::to_string(v), a.arg(0, "chars"), true, true));
}

SO f_items(Runtime& rt, const Value& v, const CallArgs& a) {
    if (v.is_undefined()) return Value::of_list({});
    if (v.kind != Value::kDict && v.kind != Value::kNamespace)
        return rt.error(a.line, std::string("items: expected a mapping, got ") + Runtime::type_name(v));
    List out;
    for (const auto& [k, x] : *v.dict) out.push_back(Value::of_tuple({k, x}));
    return Value::of_list(std::move(out));
}

SO f_list(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    return Value::of_list(std::move(l));
}

SO f_first_last(Runtime& rt, const Value& v, const CallArgs& a, bool first) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    if (l.empty()) return Value::undefined();
    return first ? l.front() : l.back();
}
SO f_first(Runtime& rt, const Value& v, const CallArgs& a) { return f_first_last(rt, v, a, true); }
SO f_last(Runtime& rt, const Value& v, const CallArgs& a) { return f_first_last(rt, v, a, false); }

StatusOr<Value> attribute_of(Runtime& rt, const Value& item, const Value& attr, int line) {
    if (attr.kind == Value::kInt) return rt.get_item(item, attr, line);
    Value cur = item;
    const std::string path = Runtime::to_string(attr);
    size_t b = 0;
    while (true) {
        const size_t dot = path.find('.', b);
        const std::string key = path.substr(b, dot == std::string::npos ? std::string::npos : dot - b);
        const bool numeric = !key.empty() && std::all_of(key.begin(), key.end(), [](char c) { return c >= '0' && c <= '9'; });
        MM_ASSIGN_OR_RETURN(cur, numeric ? rt.get_item(cur, Value::integer(std::atoll(key.c_str())), line)
                                         : rt.get_item(cur, Value::string(key), line));
        if (dot == std::string::npos) return cur;
        if (cur.is_undefined()) return cur;
        b = dot + 1;
    }
}

SO f_join(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    const Value* sep = a.arg(0, "d");
    const Value* attr = a.arg(1, "attribute");
    std::string out;
    for (size_t k = 0; k < l.size(); ++k) {
        if (k && sep) out += Runtime::to_string(*sep);
        if (attr) {
            MM_ASSIGN_OR_RETURN(Value x, attribute_of(rt, l[k], *attr, a.line));
            out += Runtime::to_string(x);
        } else {
            out += Runtime::to_string(l[k]);
        }
        MM_RETURN_IF_ERROR(rt.check_size(out.size(), a.line));
    }
    return Value::string(std::move(out));
}

SO f_upper(Runtime&, const Value& v, const CallArgs&) { return Value::string(map_case(Runtime::to_string(v), 1)); }
SO f_lower(Runtime&, const Value& v, const CallArgs&) { return Value::string(map_case(Runtime::to_string(v), 0)); }
SO f_capitalize(Runtime& rt, const Value& v, const CallArgs& a) {
    return string_method(Runtime::to_string(v), "capitalize").func->operator()(rt, a);
}
SO f_title(Runtime& rt, const Value& v, const CallArgs& a) {
    return string_method(Runtime::to_string(v), "title").func->operator()(rt, a);
}

SO f_replace(Runtime& rt, const Value& v, const CallArgs& a) {
    if (a.pos.size() < 2) return rt.error(a.line, "replace needs (old, new)");
    std::string r = replace_all(Runtime::to_string(v), Runtime::to_string(a.pos[0]), Runtime::to_string(a.pos[1]),
                                int_arg(a.arg(2, "count"), -1));
    MM_RETURN_IF_ERROR(rt.check_size(r.size(), a.line));
    return Value::string(std::move(r));
}

SO f_default(Runtime&, const Value& v, const CallArgs& a) {
    const Value* d = a.arg(0, "default_value");
    const bool boolean = bool_arg(a.arg(1, "boolean"), false);
    if (v.is_undefined() || (boolean && !Runtime::truthy(v))) return d ? *d : Value::string("");
    return v;
}

SO f_safe(Runtime&, const Value& v, const CallArgs&) { return v; }

SO f_escape(Runtime&, const Value& v, const CallArgs&) {
    std::string out;
    for (char c : Runtime::to_string(v)) {
        switch (c) {
            case '&': out += "&amp;"; break;
            case '<': out += "&lt;"; break;
            case '>': out += "&gt;"; break;
            case '"': out += "&#34;"; break;
            case '\'': out += "&#39;"; break;
            default: out += c;
        }
    }
    return Value::string(std::move(out));
}

SO f_int(Runtime&, const Value& v, const CallArgs& a) {
    const int64_t dflt = int_arg(a.arg(0, "default"), 0);
    if (v.kind == Value::kInt) return v;
    if (v.kind == Value::kBool) return Value::integer(v.b);
    if (v.kind == Value::kFloat)
        return std::isfinite(v.f) && std::fabs(v.f) < 9.2e18 ? Value::integer(static_cast<int64_t>(v.f)) : Value::integer(dflt);
    if (v.kind == Value::kString) {
        const std::string t = strip(v.s, nullptr, true, true);
        char* end = nullptr;
        errno = 0;
        const long long r = std::strtoll(t.c_str(), &end, 10);
        if (!t.empty() && end && *end == '\0' && errno == 0) return Value::integer(r);
        const double d = std::strtod(t.c_str(), &end);
        if (!t.empty() && end && *end == '\0' && std::isfinite(d) && std::fabs(d) < 9.2e18)
            return Value::integer(static_cast<int64_t>(d));
    }
    return Value::integer(dflt);
}

SO f_float(Runtime&, const Value& v, const CallArgs& a) {
    const Value* d = a.arg(0, "default");
    const double dflt = d && d->is_number() ? d->as_double() : 0.0;
    if (v.is_number() || v.kind == Value::kBool) return Value::number(v.as_double());
    if (v.kind == Value::kString) {
        const std::string t = strip(v.s, nullptr, true, true);
        char* end = nullptr;
        const double r = std::strtod(t.c_str(), &end);
        if (!t.empty() && end && *end == '\0') return Value::number(r);
    }
    return Value::number(dflt);
}

SO f_abs(Runtime& rt, const Value& v, const CallArgs& a) {
    if (v.kind == Value::kInt) {
        if (v.i == INT64_MIN) return rt.error(a.line, "integer overflow in abs");
        return Value::integer(v.i < 0 ? -v.i : v.i);
    }
    if (v.kind == Value::kBool) return Value::integer(v.b);
    if (v.kind == Value::kFloat) return Value::number(std::fabs(v.f));
    return rt.error(a.line, std::string("abs: expected a number, got ") + Runtime::type_name(v));
}

SO f_round(Runtime& rt, const Value& v, const CallArgs& a) {
    if (!v.is_number() && v.kind != Value::kBool) return rt.error(a.line, "round: expected a number");
    const int64_t prec = std::clamp<int64_t>(int_arg(a.arg(0, "precision"), 0), -20, 20);
    const std::string method = a.arg(1, "method") ? Runtime::to_string(*a.arg(1, "method")) : "common";
    if (method != "common" && method != "ceil" && method != "floor")
        return rt.error(a.line, "round: method must be common, ceil or floor");
    if (method == "common") {
        // Python's round(): an int stays an int; a float rounds half to even on its exact value,
        // which printf's correctly rounded %.*f also does.
        if (v.kind != Value::kFloat) return Value::integer(v.kind == Value::kBool ? v.b : v.i);
        if (prec >= 0 && std::isfinite(v.f)) {
            char buf[512];
            std::snprintf(buf, sizeof buf, "%.*f", static_cast<int>(prec), v.f);
            return Value::number(std::strtod(buf, nullptr));
        }
    }
    const double scale = std::pow(10.0, static_cast<double>(prec));
    const double x = v.as_double() * scale;
    const double r = method == "ceil" ? std::ceil(x) : method == "floor" ? std::floor(x) : std::nearbyint(x);
    return Value::number(r / scale);
}

// map(attribute='x') or map('filter', args...)
SO f_map(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    List out;
    if (const Value* attr = a.kwarg("attribute")) {
        const Value* dflt = a.kwarg("default");
        for (const Value& x : l) {
            MM_ASSIGN_OR_RETURN(Value r, attribute_of(rt, x, *attr, a.line));
            out.push_back(r.is_undefined() && dflt ? *dflt : r);
        }
        return Value::of_list(std::move(out));
    }
    if (a.pos.empty() || a.pos[0].kind != Value::kString) return rt.error(a.line, "map needs a filter name or attribute=");
    CallArgs rest;
    rest.line = a.line;
    rest.pos.assign(a.pos.begin() + 1, a.pos.end());
    rest.kw = a.kw;
    for (const Value& x : l) {
        MM_RETURN_IF_ERROR(rt.charge(1, a.line));
        MM_ASSIGN_OR_RETURN(Value r, rt.apply_filter(a.pos[0].s, x, rest));
        out.push_back(std::move(r));
    }
    return Value::of_list(std::move(out));
}

// select / reject / selectattr / rejectattr
SO select_impl(Runtime& rt, const Value& v, const CallArgs& a, bool keep_if, bool by_attr) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    size_t next = 0;
    Value attr;
    if (by_attr) {
        if (a.pos.empty()) return rt.error(a.line, "selectattr/rejectattr need an attribute name");
        attr = a.pos[next++];
    }
    std::string test;
    if (next < a.pos.size()) test = Runtime::to_string(a.pos[next++]);
    CallArgs rest;
    rest.line = a.line;
    rest.pos.assign(a.pos.begin() + static_cast<std::ptrdiff_t>(next), a.pos.end());
    List out;
    for (const Value& x : l) {
        MM_RETURN_IF_ERROR(rt.charge(1, a.line));
        Value subject = x;
        if (by_attr) {
            MM_ASSIGN_OR_RETURN(subject, attribute_of(rt, x, attr, a.line));
        }
        bool r;
        if (test.empty()) {
            r = Runtime::truthy(subject);
        } else {
            MM_ASSIGN_OR_RETURN(r, rt.apply_test(test, subject, rest));
        }
        if (r == keep_if) out.push_back(x);
    }
    return Value::of_list(std::move(out));
}
SO f_select(Runtime& rt, const Value& v, const CallArgs& a) { return select_impl(rt, v, a, true, false); }
SO f_reject(Runtime& rt, const Value& v, const CallArgs& a) { return select_impl(rt, v, a, false, false); }
SO f_selectattr(Runtime& rt, const Value& v, const CallArgs& a) { return select_impl(rt, v, a, true, true); }
SO f_rejectattr(Runtime& rt, const Value& v, const CallArgs& a) { return select_impl(rt, v, a, false, true); }

SO sort_impl(Runtime& rt, List l, const CallArgs& a, const Value* attr, bool reverse, bool case_sensitive) {
    std::vector<std::pair<Value, Value>> keyed;
    for (Value& x : l) {
        Value k = x;
        if (attr) {
            MM_ASSIGN_OR_RETURN(k, attribute_of(rt, x, *attr, a.line));
        }
        if (!case_sensitive && k.kind == Value::kString) k = Value::string(map_case(k.s, 0));
        keyed.emplace_back(std::move(k), std::move(x));
    }
    MM_RETURN_IF_ERROR(rt.charge(keyed.size() * 8, a.line));
    Status failed;
    std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& p, const auto& q) {
        if (!failed.ok()) return false;
        StatusOr<bool> r = reverse ? rt.less(q.first, p.first, a.line) : rt.less(p.first, q.first, a.line);
        if (!r.ok()) {
            failed = r.status();
            return false;
        }
        return *r;
    });
    MM_RETURN_IF_ERROR(failed);
    List out;
    for (auto& p : keyed) out.push_back(std::move(p.second));
    return Value::of_list(std::move(out));
}

SO f_sort(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    return sort_impl(rt, std::move(l), a, a.kwarg("attribute") ? a.kwarg("attribute") : a.arg(2, "attribute"),
                     bool_arg(a.arg(0, "reverse"), false), bool_arg(a.arg(1, "case_sensitive"), false));
}

SO f_dictsort(Runtime& rt, const Value& v, const CallArgs& a) {
    if (v.kind != Value::kDict) return rt.error(a.line, "dictsort: expected a mapping");
    List pairs;
    for (const auto& [k, x] : *v.dict) pairs.push_back(Value::of_tuple({k, x}));
    const std::string by = a.arg(1, "by") ? Runtime::to_string(*a.arg(1, "by")) : "key";
    const Value index = Value::integer(by == "value" ? 1 : 0);
    return sort_impl(rt, std::move(pairs), a, &index, bool_arg(a.arg(2, "reverse"), false),
                     bool_arg(a.arg(0, "case_sensitive"), false));
}

SO f_unique(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    const Value* attr = a.arg(1, "attribute");
    const bool cs = bool_arg(a.arg(0, "case_sensitive"), false);
    List out, seen;
    for (const Value& x : l) {
        MM_RETURN_IF_ERROR(rt.charge(seen.size() + 1, a.line));
        Value k = x;
        if (attr) {
            MM_ASSIGN_OR_RETURN(k, attribute_of(rt, x, *attr, a.line));
        }
        if (!cs && k.kind == Value::kString) k = Value::string(map_case(k.s, 0));
        bool dup = false;
        for (const Value& s : seen) dup = dup || Runtime::equals(s, k);
        if (!dup) seen.push_back(k), out.push_back(x);
    }
    return Value::of_list(std::move(out));
}

SO f_reverse(Runtime& rt, const Value& v, const CallArgs& a) {
    if (v.kind == Value::kString) {
        std::vector<std::string> cs = utf8_chars(v.s);
        std::string out;
        for (auto it = cs.rbegin(); it != cs.rend(); ++it) out += *it;
        return Value::string(std::move(out));
    }
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    std::reverse(l.begin(), l.end());
    return Value::of_list(std::move(l));
}

SO f_indent(Runtime& rt, const Value& v, const CallArgs& a) {
    const Value* w = a.arg(0, "width");
    std::string pad = w && w->kind == Value::kString ? w->s : std::string(static_cast<size_t>(std::clamp<int64_t>(int_arg(w, 4), 0, 256)), ' ');
    const bool first = bool_arg(a.arg(1, "first"), false), blank = bool_arg(a.arg(2, "blank"), false);
    const std::string s = Runtime::to_string(v);
    std::string out;
    size_t b = 0;
    bool is_first = true;
    while (b <= s.size()) {
        size_t nl = s.find('\n', b);
        const std::string line = s.substr(b, nl == std::string::npos ? std::string::npos : nl - b);
        if ((!is_first || first) && (blank || !line.empty())) out += pad;
        out += line;
        if (nl == std::string::npos) break;
        out += '\n';
        b = nl + 1;
        is_first = false;
        MM_RETURN_IF_ERROR(rt.check_size(out.size(), a.line));
    }
    return Value::string(std::move(out));
}

SO min_max(Runtime& rt, const Value& v, const CallArgs& a, bool want_max) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    if (l.empty()) return Value::undefined();
    const Value* attr = a.arg(1, "attribute");
    Value best = l[0];
    for (size_t k = 1; k < l.size(); ++k) {
        Value x = l[k], bx = best;
        if (attr) {
            MM_ASSIGN_OR_RETURN(x, attribute_of(rt, l[k], *attr, a.line));
            MM_ASSIGN_OR_RETURN(bx, attribute_of(rt, best, *attr, a.line));
        }
        MM_ASSIGN_OR_RETURN(bool lt, want_max ? rt.less(bx, x, a.line) : rt.less(x, bx, a.line));
        if (lt) best = l[k];
    }
    return best;
}
SO f_min(Runtime& rt, const Value& v, const CallArgs& a) { return min_max(rt, v, a, false); }
SO f_max(Runtime& rt, const Value& v, const CallArgs& a) { return min_max(rt, v, a, true); }

SO f_sum(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    const Value* attr = a.arg(0, "attribute");
    const Value* start = a.arg(1, "start");
    int64_t si = 0;
    double sf = 0;
    bool is_float = start && start->kind == Value::kFloat;
    if (start) si = int_arg(start, 0), sf = start->as_double();
    for (const Value& x0 : l) {
        Value x = x0;
        if (attr) {
            MM_ASSIGN_OR_RETURN(x, attribute_of(rt, x0, *attr, a.line));
        }
        if (!x.is_number() && x.kind != Value::kBool) return rt.error(a.line, "sum: items must be numbers");
        if (x.kind == Value::kFloat) is_float = true;
        if (__builtin_add_overflow(si, x.kind == Value::kBool ? int64_t{x.b} : x.i, &si) && !is_float)
            return rt.error(a.line, "integer overflow in sum");
        sf += x.as_double();
    }
    return is_float ? Value::number(sf) : Value::integer(si);
}

SO f_wordcount(Runtime&, const Value& v, const CallArgs&) {
    return Value::integer(static_cast<int64_t>(split(Runtime::to_string(v), nullptr, -1, false).size()));
}

SO f_attr(Runtime& rt, const Value& v, const CallArgs& a) {
    if (a.pos.empty()) return rt.error(a.line, "attr needs a name");
    return rt.get_attr(v, Runtime::to_string(a.pos[0]), a.line);
}


// Python's printf-style formatting ('%s-%d' % (a, b), the format filter): %s %r %d %i %f %F %e %E
// %g %G %x %X %o %c %% with flags, width and precision; %(name)s with one mapping argument.
SO f_format(Runtime& rt, const Value& v, const CallArgs& a) {
    const std::string fmt = Runtime::to_string(v);
    const Value* mapping = a.pos.size() == 1 && a.pos[0].kind == Value::kDict ? &a.pos[0] : nullptr;
    std::string out;
    size_t next = 0;
    for (size_t k = 0; k < fmt.size(); ++k) {
        if (fmt[k] != '%') {
            out += fmt[k];
            continue;
        }
        if (++k >= fmt.size()) return rt.error(a.line, "format: incomplete format");
        const Value* arg = nullptr;
        if (fmt[k] == '(') {
            const size_t close = fmt.find(')', k);
            if (close == std::string::npos || !mapping) return rt.error(a.line, "format: %(name) needs a mapping argument");
            const std::string key = fmt.substr(k + 1, close - k - 1);
            for (const auto& [kk, vv] : *mapping->dict)
                if (kk.kind == Value::kString && kk.s == key) arg = &vv;
            if (!arg) return rt.error(a.line, "format: no key '" + key + "'");
            k = close + 1;
        }
        std::string spec = "%";
        while (k < fmt.size() && std::strchr("-+ 0#", fmt[k])) spec += fmt[k++];
        while (k < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[k]))) spec += fmt[k++];
        if (k < fmt.size() && fmt[k] == '.') {
            spec += fmt[k++];
            while (k < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[k]))) spec += fmt[k++];
        }
        if (k >= fmt.size()) return rt.error(a.line, "format: incomplete format");
        const char conv = fmt[k];
        if (conv == '%') {
            out += '%';
            continue;
        }
        if (!arg) {
            if (mapping || next >= a.pos.size()) return rt.error(a.line, "format: not enough arguments for format string");
            arg = &a.pos[next++];
        }
        if (spec.size() > 12) return rt.error(a.line, "format: width or precision too large");
        char buf[512];
        if (conv == 's' || conv == 'r') {
            const std::string text = conv == 's' ? Runtime::to_string(*arg) : Runtime::repr(*arg);
            const std::string& pad_spec = spec;  // padded by code points, as Python does
            int width = 0;
            bool left = pad_spec.find('-') != std::string::npos;
            size_t p = 1;
            while (p < pad_spec.size() && std::strchr("-+ 0#", pad_spec[p])) ++p;
            while (p < pad_spec.size() && std::isdigit(static_cast<unsigned char>(pad_spec[p]))) width = width * 10 + (pad_spec[p++] - '0');
            std::string t = text;
            if (p < pad_spec.size() && pad_spec[p] == '.') {
                const int prec = std::atoi(pad_spec.c_str() + p + 1);
                std::vector<std::string> cs = utf8_chars(t);
                if (static_cast<int>(cs.size()) > prec) {
                    t.clear();
                    for (int i = 0; i < prec; ++i) t += cs[static_cast<size_t>(i)];
                }
            }
            const int len = static_cast<int>(utf8_length(t));
            const std::string pad(static_cast<size_t>(std::max(0, width - len)), ' ');
            out += left ? t + pad : pad + t;
        } else if (std::strchr("dixXoc", conv)) {
            if (!arg->is_number() && arg->kind != Value::kBool)
                return rt.error(a.line, std::string("format: %") + conv + " needs a number, not " + Runtime::type_name(*arg));
            const long long iv = arg->kind == Value::kFloat ? static_cast<long long>(arg->f) : int_arg(arg, 0);
            const char c = conv == 'i' ? 'd' : conv;
            std::snprintf(buf, sizeof buf, (spec + "ll" + c).c_str(), iv);
            out += buf;
        } else if (std::strchr("fFeEgG", conv)) {
            if (!arg->is_number() && arg->kind != Value::kBool)
                return rt.error(a.line, std::string("format: %") + conv + " needs a number, not " + Runtime::type_name(*arg));
            std::snprintf(buf, sizeof buf, (spec + conv).c_str(), arg->as_double());
            out += buf;
        } else {
            return rt.error(a.line, std::string("format: unsupported conversion %") + conv);
        }
        MM_RETURN_IF_ERROR(rt.check_size(out.size(), a.line));
    }
    if (!mapping && next < a.pos.size()) return rt.error(a.line, "format: not all arguments converted during string formatting");
    return Value::string(std::move(out));
}

SO f_center(Runtime& rt, const Value& v, const CallArgs& a) {
    const std::string s = Runtime::to_string(v);
    const int64_t width = std::clamp<int64_t>(int_arg(a.arg(0, "width"), 80), 0, 1 << 20);
    const int64_t n = static_cast<int64_t>(utf8_length(s));
    if (width <= n) return Value::string(s);
    const int64_t marg = width - n;
    const int64_t left = marg / 2 + (marg & width & 1);  // CPython's str.center
    MM_RETURN_IF_ERROR(rt.check_size(s.size() + static_cast<size_t>(marg), a.line));
    return Value::string(std::string(static_cast<size_t>(left), ' ') + s + std::string(static_cast<size_t>(marg - left), ' '));
}

SO f_truncate(Runtime&, const Value& v, const CallArgs& a) {
    const std::vector<std::string> cs = utf8_chars(Runtime::to_string(v));
    const int64_t length = int_arg(a.arg(0, "length"), 255);
    const bool killwords = bool_arg(a.arg(1, "killwords"), false);
    const std::string end = a.arg(2, "end") ? Runtime::to_string(*a.arg(2, "end")) : "...";
    const int64_t leeway = int_arg(a.arg(3, "leeway"), 5);
    const int64_t n = static_cast<int64_t>(cs.size());
    if (n <= length + leeway) return Value::string(Runtime::to_string(v));
    const int64_t keep = std::clamp<int64_t>(length - static_cast<int64_t>(utf8_length(end)), 0, n);
    std::string head;
    for (int64_t k = 0; k < keep; ++k) head += cs[static_cast<size_t>(k)];
    if (!killwords) {
        const size_t sp = head.rfind(' ');
        if (sp != std::string::npos) head.resize(sp);
    }
    return Value::string(head + end);
}

SO f_batch(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    const int64_t size = int_arg(a.arg(0, "linecount"), 0);
    if (size <= 0) return rt.error(a.line, "batch: the count must be positive");
    const Value* fill = a.arg(1, "fill_with");
    List out, cur;
    for (const Value& x : l) {
        cur.push_back(x);
        if (static_cast<int64_t>(cur.size()) == size) out.push_back(Value::of_list(std::move(cur))), cur.clear();
    }
    if (!cur.empty()) {
        if (fill && fill->kind != Value::kNone)
            while (static_cast<int64_t>(cur.size()) < size) cur.push_back(*fill);
        out.push_back(Value::of_list(std::move(cur)));
    }
    return Value::of_list(std::move(out));
}

// jinja2's slice filter: `slices` columns, the first ones one longer.
SO f_slice(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List seq, rt.iterate(v, a.line));
    const int64_t slices = int_arg(a.arg(0, "slices"), 0);
    if (slices <= 0 || slices > (1 << 20)) return rt.error(a.line, "slice: the count must be positive");
    const Value* fill = a.arg(1, "fill_with");
    const int64_t length = static_cast<int64_t>(seq.size()), per = length / slices, extra = length % slices;
    int64_t offset = 0;
    List out;
    for (int64_t k = 0; k < slices; ++k) {
        const int64_t start = offset + k * per;
        if (k < extra) ++offset;
        const int64_t end = offset + (k + 1) * per;
        List part(seq.begin() + start, seq.begin() + end);
        if (fill && fill->kind != Value::kNone && k >= extra) part.push_back(*fill);
        out.push_back(Value::of_list(std::move(part)));
    }
    return Value::of_list(std::move(out));
}

SO f_groupby(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(v, a.line));
    const Value* attr = a.arg(0, "attribute");
    if (!attr) return rt.error(a.line, "groupby needs an attribute");
    const Value* dflt = a.arg(1, "default");
    const bool cs = bool_arg(a.arg(2, "case_sensitive"), false);
    std::vector<std::pair<Value, Value>> keyed;  // (sort key, item)
    for (const Value& x : l) {
        MM_ASSIGN_OR_RETURN(Value k, attribute_of(rt, x, *attr, a.line));
        if (k.is_undefined() && dflt) k = *dflt;
        if (!cs && k.kind == Value::kString) k = Value::string(map_case(k.s, 0));
        keyed.emplace_back(std::move(k), x);
    }
    Status failed;
    std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& p, const auto& q) {
        if (!failed.ok()) return false;
        StatusOr<bool> r = rt.less(p.first, q.first, a.line);
        if (!r.ok()) failed = r.status();
        return r.ok() && *r;
    });
    MM_RETURN_IF_ERROR(failed);
    List out;
    for (size_t k = 0; k < keyed.size();) {
        List group;
        size_t j = k;
        while (j < keyed.size() && Runtime::equals(keyed[j].first, keyed[k].first)) group.push_back(keyed[j++].second);
        MM_ASSIGN_OR_RETURN(Value grouper, attribute_of(rt, keyed[k].second, *attr, a.line));
        if (grouper.is_undefined() && dflt) grouper = *dflt;
        out.push_back(Value::of_tuple({grouper, Value::of_list(std::move(group))}));
        k = j;
    }
    return Value::of_list(std::move(out));
}

// ---- tests ----

using TR = StatusOr<bool>;
TR t_defined(Runtime&, const Value& v, const CallArgs&) { return !v.is_undefined(); }
TR t_undefined(Runtime&, const Value& v, const CallArgs&) { return v.is_undefined(); }
TR t_none(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kNone; }
TR t_boolean(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kBool; }
TR t_true(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kBool && v.b; }
TR t_false(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kBool && !v.b; }
TR t_integer(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kInt; }
TR t_float(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kFloat; }
TR t_number(Runtime&, const Value& v, const CallArgs&) { return v.is_number() || v.kind == Value::kBool; }
TR t_string(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kString; }
TR t_mapping(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kDict; }
TR t_iterable(Runtime&, const Value& v, const CallArgs&) {
    return v.kind == Value::kString || v.kind == Value::kList || v.kind == Value::kDict || v.is_undefined();
}
TR t_sequence(Runtime&, const Value& v, const CallArgs&) {
    return v.kind == Value::kString || v.kind == Value::kList || v.kind == Value::kDict;
}
TR t_callable(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kFunc; }
TR t_even(Runtime& rt, const Value& v, const CallArgs& a) {
    if (v.kind != Value::kInt) return rt.error(a.line, "even: expected an integer");
    return v.i % 2 == 0;
}
TR t_odd(Runtime& rt, const Value& v, const CallArgs& a) {
    if (v.kind != Value::kInt) return rt.error(a.line, "odd: expected an integer");
    return v.i % 2 != 0;
}
TR t_divisibleby(Runtime& rt, const Value& v, const CallArgs& a) {
    if (v.kind != Value::kInt || a.pos.empty() || a.pos[0].kind != Value::kInt || a.pos[0].i == 0)
        return rt.error(a.line, "divisibleby: expected integers and a non-zero divisor");
    return v.i % a.pos[0].i == 0;
}
const Value& test_arg(const CallArgs& a) {
    static const Value kUndef;
    return a.pos.empty() ? kUndef : a.pos[0];
}
TR t_eq(Runtime&, const Value& v, const CallArgs& a) { return Runtime::equals(v, test_arg(a)); }
TR t_ne(Runtime&, const Value& v, const CallArgs& a) { return !Runtime::equals(v, test_arg(a)); }
TR t_lt(Runtime& rt, const Value& v, const CallArgs& a) { return rt.less(v, test_arg(a), a.line); }
TR t_gt(Runtime& rt, const Value& v, const CallArgs& a) { return rt.less(test_arg(a), v, a.line); }
TR t_le(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(bool gt, rt.less(test_arg(a), v, a.line));
    return !gt;
}
TR t_ge(Runtime& rt, const Value& v, const CallArgs& a) {
    MM_ASSIGN_OR_RETURN(bool lt, rt.less(v, test_arg(a), a.line));
    return !lt;
}
TR t_in(Runtime& rt, const Value& v, const CallArgs& a) {
    const Value& c = test_arg(a);
    if (c.kind == Value::kString) return v.kind == Value::kString && c.s.find(v.s) != std::string::npos;
    MM_ASSIGN_OR_RETURN(List l, rt.iterate(c, a.line));
    for (const Value& x : l)
        if (Runtime::equals(x, v)) return true;
    return false;
}
TR t_sameas(Runtime&, const Value& v, const CallArgs& a) {
    const Value& o = test_arg(a);
    if (v.kind != o.kind) return false;
    switch (v.kind) {
        case Value::kNone: case Value::kUndefined: return true;
        case Value::kBool: return v.b == o.b;
        case Value::kList: return v.list == o.list;
        case Value::kDict: case Value::kNamespace: return v.dict == o.dict;
        default: return Runtime::equals(v, o);
    }
}
TR t_lower(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kString && map_case(v.s, 0) == v.s; }
TR t_upper(Runtime&, const Value& v, const CallArgs&) { return v.kind == Value::kString && map_case(v.s, 1) == v.s; }

// ---- globals ----

SO g_raise_exception(Runtime& rt, const CallArgs& a) {
    return rt.error(a.line, "the template raised an error: " + (a.pos.empty() ? std::string() : Runtime::to_string(a.pos[0])));
}

SO g_namespace(Runtime& rt, const CallArgs& a) {
    Value ns;
    ns.kind = Value::kNamespace;
    ns.dict = std::make_shared<Dict>();
    for (const Value& p : a.pos) {
        if (p.kind != Value::kDict) return rt.error(a.line, "namespace(): positional arguments must be mappings");
        for (const auto& kv : *p.dict) ns.dict->push_back(kv);
    }
    for (const auto& [k, v] : a.kw) ns.dict->emplace_back(Value::string(k), v);
    return ns;
}

SO g_dict(Runtime& rt, const CallArgs& a) {
    Dict d;
    for (const Value& p : a.pos) {
        if (p.kind != Value::kDict) return rt.error(a.line, "dict(): positional arguments must be mappings");
        for (const auto& kv : *p.dict) d.push_back(kv);
    }
    for (const auto& [k, v] : a.kw) d.emplace_back(Value::string(k), v);
    return Value::of_dict(std::move(d));
}

SO g_range(Runtime& rt, const CallArgs& a) {
    int64_t start = 0, stop = 0, step = 1;
    for (const Value& v : a.pos)
        if (v.kind != Value::kInt && v.kind != Value::kBool) return rt.error(a.line, "range() takes integers");
    if (a.pos.size() == 1) stop = int_arg(&a.pos[0], 0);
    else if (a.pos.size() == 2 || a.pos.size() == 3) {
        start = int_arg(&a.pos[0], 0), stop = int_arg(&a.pos[1], 0);
        if (a.pos.size() == 3) step = int_arg(&a.pos[2], 1);
    } else return rt.error(a.line, "range() takes 1 to 3 arguments");
    if (step == 0) return rt.error(a.line, "range() step must not be zero");
    List out;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
        MM_RETURN_IF_ERROR(rt.charge(1, a.line));
        out.push_back(Value::integer(k));
        if (__builtin_add_overflow(k, step, &k)) break;
        k -= step;
    }
    return Value::of_list(std::move(out));
}

SO g_strftime_now(Runtime& rt, const CallArgs& a) {
    if (a.pos.empty() || a.pos[0].kind != Value::kString) return rt.error(a.line, "strftime_now() needs a format string");
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    localtime_r(&now, &tm);
    char buf[512];
    const size_t n = std::strftime(buf, sizeof buf, a.pos[0].s.c_str(), &tm);
    return Value::string(std::string(buf, n));
}

struct FilterEntry { const char* name; FilterFn fn; };
constexpr FilterEntry kFilters[] = {
    {"length", f_length}, {"count", f_length}, {"tojson", f_tojson}, {"string", f_string}, {"trim", f_trim},
    {"items", f_items}, {"list", f_list}, {"first", f_first}, {"last", f_last}, {"join", f_join},
    {"upper", f_upper}, {"lower", f_lower}, {"capitalize", f_capitalize}, {"title", f_title},
    {"replace", f_replace}, {"default", f_default}, {"d", f_default}, {"safe", f_safe}, {"escape", f_escape},
    {"e", f_escape}, {"forceescape", f_escape}, {"int", f_int}, {"float", f_float}, {"abs", f_abs},
    {"round", f_round}, {"map", f_map}, {"select", f_select}, {"reject", f_reject}, {"selectattr", f_selectattr},
    {"rejectattr", f_rejectattr}, {"sort", f_sort}, {"dictsort", f_dictsort}, {"unique", f_unique},
    {"reverse", f_reverse}, {"indent", f_indent}, {"min", f_min}, {"max", f_max}, {"sum", f_sum},
    {"wordcount", f_wordcount}, {"attr", f_attr}, {"format", f_format}, {"center", f_center},
    {"truncate", f_truncate}, {"batch", f_batch}, {"slice", f_slice}, {"groupby", f_groupby},
};

struct TestEntry { const char* name; TestFn fn; };
constexpr TestEntry kTests[] = {
    {"defined", t_defined}, {"undefined", t_undefined}, {"none", t_none}, {"boolean", t_boolean},
    {"true", t_true}, {"false", t_false}, {"integer", t_integer}, {"float", t_float}, {"number", t_number},
    {"string", t_string}, {"mapping", t_mapping}, {"iterable", t_iterable}, {"sequence", t_sequence},
    {"callable", t_callable}, {"even", t_even}, {"odd", t_odd}, {"divisibleby", t_divisibleby},
    {"eq", t_eq}, {"equalto", t_eq}, {"==", t_eq}, {"ne", t_ne}, {"!=", t_ne}, {"lt", t_lt}, {"lessthan", t_lt},
    {"<", t_lt}, {"le", t_le}, {"<=", t_le}, {"gt", t_gt}, {"greaterthan", t_gt}, {">", t_gt}, {"ge", t_ge},
    {">=", t_ge}, {"in", t_in}, {"sameas", t_sameas}, {"lower", t_lower}, {"upper", t_upper},
};

}  // namespace

FilterFn find_filter(const std::string& name) {
    for (const FilterEntry& f : kFilters)
        if (name == f.name) return f.fn;
    return nullptr;
}

TestFn find_test(const std::string& name) {
    for (const TestEntry& t : kTests)
        if (name == t.name) return t.fn;
    return nullptr;
}

void add_globals(Frame* frame) {
    frame->vars["raise_exception"] = Value::function(g_raise_exception);
    frame->vars["namespace"] = Value::function(g_namespace);
    frame->vars["dict"] = Value::function(g_dict);
    frame->vars["range"] = Value::function(g_range);
    frame->vars["strftime_now"] = Value::function(g_strftime_now);
}

}  // namespace moemesh::jinja
