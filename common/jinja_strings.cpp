// Jinja builtins, part 1 (common/jinja.h): Python's str and dict methods that chat templates call
// (startswith, split, strip, items, get, ...), and the string helpers the filters share. Strings
// index, slice, measure and case-map by code point, as Python's str does.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include <utf8proc.h>

#include "common/jinja_runtime.h"

namespace moemesh::jinja {

std::vector<std::string> utf8_chars(const std::string& s) {
    std::vector<std::string> out;
    for (size_t k = 0; k < s.size();) {
        const unsigned char c = static_cast<unsigned char>(s[k]);
        size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
        if (k + n > s.size()) n = 1;
        for (size_t j = 1; j < n; ++j)
            if ((static_cast<unsigned char>(s[k + j]) & 0xC0) != 0x80) n = 1;
        out.push_back(s.substr(k, n));
        k += n;
    }
    return out;
}

size_t utf8_length(const std::string& s) {
    size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
}

using SO = StatusOr<Value>;

bool py_space(uint32_t c) { return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 ||
                                   c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
                                   c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000; }

uint32_t code_point(const std::string& ch) {
    utf8proc_int32_t cp = 0;
    if (utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(ch.data()), static_cast<utf8proc_ssize_t>(ch.size()),
                         &cp) <= 0)
        return static_cast<unsigned char>(ch[0]);
    return static_cast<uint32_t>(cp);
}

std::string map_case(const std::string& s, int mode /* 0 lower, 1 upper */) {
    std::string out;
    const std::vector<std::string> chars = utf8_chars(s);
    auto cased = [&](size_t k) {
        const auto c = utf8proc_category(static_cast<utf8proc_int32_t>(code_point(chars[k])));
        return c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT;
    };
    for (size_t k = 0; k < chars.size(); ++k) {
        const std::string& ch = chars[k];
        // Python's final sigma: Σ at the end of a word lowers to ς.
        if (!mode && code_point(ch) == 0x3A3 && k > 0 && cased(k - 1) && (k + 1 == chars.size() || !cased(k + 1))) {
            out += "\xCF\x82";
            continue;
        }
        utf8proc_int32_t cp = 0;
        if (utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(ch.data()), static_cast<utf8proc_ssize_t>(ch.size()),
                             &cp) <= 0) {
            out += ch;
            continue;
        }
        if (mode && cp == 0xDF) {  // Python's full case mapping: ß → SS
            out += "SS";
            continue;
        }
        cp = mode ? utf8proc_toupper(cp) : utf8proc_tolower(cp);
        utf8proc_uint8_t buf[4];
        out.append(reinterpret_cast<char*>(buf), static_cast<size_t>(utf8proc_encode_char(cp, buf)));
    }
    return out;
}

// str.strip / lstrip / rstrip: `chars` none means whitespace.
std::string strip(const std::string& s, const Value* chars, bool left, bool right) {
    std::vector<std::string> cs = utf8_chars(s);
    std::vector<uint32_t> set;
    const bool ws = !chars || chars->kind == Value::kNone || chars->is_undefined();
    if (!ws)
        for (const std::string& c : utf8_chars(chars->s)) set.push_back(code_point(c));
    auto strip_it = [&](const std::string& c) {
        const uint32_t cp = code_point(c);
        return ws ? py_space(cp) : std::find(set.begin(), set.end(), cp) != set.end();
    };
    size_t b = 0, e = cs.size();
    if (left)
        while (b < e && strip_it(cs[b])) ++b;
    if (right)
        while (e > b && strip_it(cs[e - 1])) --e;
    std::string out;
    for (size_t k = b; k < e; ++k) out += cs[k];
    return out;
}

// str.split / rsplit; sep none splits on whitespace runs.
List split(const std::string& s, const Value* sep, int64_t maxsplit, bool from_right) {
    List out;
    if (!sep || sep->kind == Value::kNone) {
        // Python: runs of whitespace separate; with maxsplit, the unsplit rest keeps its inner
        // whitespace (leading whitespace of the rest is dropped, trailing kept, mirrored for rsplit).
        std::vector<std::string> cs = utf8_chars(s);
        if (from_right) std::reverse(cs.begin(), cs.end());
        std::vector<std::string> words;
        size_t k = 0;
        const size_t n = cs.size();
        auto ws = [&](size_t i) { return py_space(code_point(cs[i])); };
        while (true) {
            while (k < n && ws(k)) ++k;
            if (k == n) break;
            if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
                std::string rest;
                for (size_t i = k; i < n; ++i) rest += cs[i];
                words.push_back(rest);
                break;
            }
            std::string w;
            while (k < n && !ws(k)) w += cs[k++];
            words.push_back(w);
        }
        if (from_right) {
            std::reverse(words.begin(), words.end());
            for (std::string& w : words) {  // each word was built from reversed characters
                std::vector<std::string> wc = utf8_chars(w);
                std::reverse(wc.begin(), wc.end());
                w.clear();
                for (const std::string& c : wc) w += c;
            }
        }
        for (std::string& x : words) out.push_back(Value::string(std::move(x)));
        return out;
    }
    const std::string& d = sep->s;
    std::vector<std::string> parts;
    if (!from_right) {
        size_t pos = 0;
        int64_t n = 0;
        while (maxsplit < 0 || n < maxsplit) {
            const size_t hit = s.find(d, pos);
            if (hit == std::string::npos) break;
            parts.push_back(s.substr(pos, hit - pos));
            pos = hit + d.size();
            ++n;
        }
        parts.push_back(s.substr(pos));
    } else {
        size_t end = s.size();
        int64_t n = 0;
        std::vector<std::string> rev;
        while (maxsplit < 0 || n < maxsplit) {
            if (end < d.size()) break;
            const size_t hit = s.rfind(d, end - d.size());
            if (hit == std::string::npos) break;
            rev.push_back(s.substr(hit + d.size(), end - hit - d.size()));
            end = hit;
            ++n;
        }
        rev.push_back(s.substr(0, end));
        parts.assign(rev.rbegin(), rev.rend());
    }
    for (std::string& x : parts) out.push_back(Value::string(std::move(x)));
    return out;
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
    std::string out;
    if (from.empty()) {  // Python inserts `to` around every character
        std::vector<std::string> cs = utf8_chars(s);
        int64_t n = 0;
        for (const std::string& c : cs) {
            if (count < 0 || n < count) out += to, ++n;
            out += c;
        }
        if (count < 0 || n < count) out += to;
        return out;
    }
    size_t pos = 0;
    int64_t n = 0;
    while (count < 0 || n < count) {
        const size_t hit = s.find(from, pos);
        if (hit == std::string::npos) break;
        out.append(s, pos, hit - pos);
        out += to;
        pos = hit + from.size();
        ++n;
    }
    out.append(s, pos, std::string::npos);
    return out;
}

static Status need_string(Runtime& rt, const CallArgs& a, size_t idx, const char* what, std::string* out) {
    if (idx >= a.pos.size() || a.pos[idx].kind != Value::kString)
        return rt.error(a.line, std::string(what) + " needs a string argument");
    *out = a.pos[idx].s;
    return Status();
}

int64_t int_arg(const Value* v, int64_t dflt) {
    if (!v || v->kind == Value::kNone || v->is_undefined()) return dflt;
    if (v->kind == Value::kBool) return v->b;
    if (v->kind == Value::kInt) return v->i;
    if (v->kind == Value::kFloat) return static_cast<int64_t>(v->f);
    return dflt;
}

bool bool_arg(const Value* v, bool dflt) { return v ? Runtime::truthy(*v) : dflt; }

// s[start:end] by code point with Python's slice rules (the optional start/end arguments of
// startswith, endswith, find, count); *offset is the code point index where it begins.
static std::string cp_range(const std::string& s, const Value* start, const Value* end, int64_t* offset) {
    const std::vector<std::string> cs = utf8_chars(s);
    const int64_t n = static_cast<int64_t>(cs.size());
    auto norm = [&](const Value* v, int64_t dflt) {
        if (!v || v->kind == Value::kNone || v->is_undefined()) return dflt;
        int64_t x = int_arg(v, dflt);
        if (x < 0) x += n;
        return std::clamp<int64_t>(x, 0, n);
    };
    const int64_t b = norm(start, 0), e = norm(end, n);
    std::string out;
    for (int64_t k = b; k < e; ++k) out += cs[static_cast<size_t>(k)];
    if (offset) *offset = b;
    return out;
}

// startswith / endswith with a string or a tuple of strings.
static StatusOr<Value> affix(Runtime& rt, const std::string& whole, const CallArgs& a, bool start) {
    const std::string s = a.pos.size() > 1 ? cp_range(whole, &a.pos[1], a.pos.size() > 2 ? &a.pos[2] : nullptr, nullptr)
                                           : whole;
    if (a.pos.empty()) return rt.error(a.line, std::string(start ? "startswith" : "endswith") + "() needs an argument");
    std::vector<std::string> options;
    if (a.pos[0].kind == Value::kString) options.push_back(a.pos[0].s);
    else if (a.pos[0].kind == Value::kList)
        for (const Value& v : *a.pos[0].list) {
            if (v.kind != Value::kString) return rt.error(a.line, "startswith/endswith: tuple items must be strings");
            options.push_back(v.s);
        }
    else return rt.error(a.line, "startswith/endswith: the argument must be a string or a tuple of strings");
    for (const std::string& o : options) {
        if (start && s.compare(0, o.size(), o) == 0 && s.size() >= o.size()) return Value::boolean(true);
        if (!start && s.size() >= o.size() && s.compare(s.size() - o.size(), o.size(), o) == 0) return Value::boolean(true);
    }
    return Value::boolean(false);
}

Value string_method(const std::string& s, const std::string& name) {
    using Fn = std::function<SO(Runtime&, const std::string&, const CallArgs&)>;
    static const std::map<std::string, Fn> kMethods = {
        {"startswith", [](Runtime& rt, const std::string& s, const CallArgs& a) { return affix(rt, s, a, true); }},
        {"endswith", [](Runtime& rt, const std::string& s, const CallArgs& a) { return affix(rt, s, a, false); }},
        {"strip", [](Runtime&, const std::string& s, const CallArgs& a) -> SO { return Value::string(strip(s, a.arg(0, "chars"), true, true)); }},
        {"lstrip", [](Runtime&, const std::string& s, const CallArgs& a) -> SO { return Value::string(strip(s, a.arg(0, "chars"), true, false)); }},
        {"rstrip", [](Runtime&, const std::string& s, const CallArgs& a) -> SO { return Value::string(strip(s, a.arg(0, "chars"), false, true)); }},
        {"split", [](Runtime& rt, const std::string& s, const CallArgs& a) -> SO {
             const Value* sep = a.arg(0, "sep");
             if (sep && sep->kind == Value::kString && sep->s.empty()) return rt.error(a.line, "split(): empty separator");
             if (sep && sep->kind != Value::kString && sep->kind != Value::kNone) return rt.error(a.line, "split(): the separator must be a string");
             return Value::of_list(split(s, sep, int_arg(a.arg(1, "maxsplit"), -1), false));
         }},
        {"rsplit", [](Runtime& rt, const std::string& s, const CallArgs& a) -> SO {
             const Value* sep = a.arg(0, "sep");
             if (sep && sep->kind == Value::kString && sep->s.empty()) return rt.error(a.line, "rsplit(): empty separator");
             if (sep && sep->kind != Value::kString && sep->kind != Value::kNone) return rt.error(a.line, "rsplit(): the separator must be a string");
             return Value::of_list(split(s, sep, int_arg(a.arg(1, "maxsplit"), -1), true));
         }},
        {"splitlines", [](Runtime&, const std::string& s, const CallArgs&) -> SO {
             List out;
             size_t b = 0;
             for (size_t k = 0; k < s.size(); ++k)
                 if (s[k] == '\n' || s[k] == '\r') {
                     out.push_back(Value::string(s.substr(b, k - b)));
                     if (s[k] == '\r' && k + 1 < s.size() && s[k + 1] == '\n') ++k;
                     b = k + 1;
                 }
             if (b < s.size()) out.push_back(Value::string(s.substr(b)));
             return Value::of_list(std::move(out));
         }},
        {"upper", [](Runtime&, const std::string& s, const CallArgs&) -> SO { return Value::string(map_case(s, 1)); }},
        {"lower", [](Runtime&, const std::string& s, const CallArgs&) -> SO { return Value::string(map_case(s, 0)); }},
        {"title", [](Runtime&, const std::string& s, const CallArgs&) -> SO {
             std::string out;
             bool start = true;
             for (const std::string& c : utf8_chars(s)) {
                 const uint32_t cp = code_point(c);
                 const bool letter = utf8proc_category(static_cast<utf8proc_int32_t>(cp)) <= UTF8PROC_CATEGORY_LO &&
                                     utf8proc_category(static_cast<utf8proc_int32_t>(cp)) >= UTF8PROC_CATEGORY_LU;
                 out += letter ? map_case(c, start ? 1 : 0) : c;
                 start = !letter;
             }
             return Value::string(std::move(out));
         }},
        {"capitalize", [](Runtime&, const std::string& s, const CallArgs&) -> SO {
             std::vector<std::string> cs = utf8_chars(s);
             std::string out;
             for (size_t k = 0; k < cs.size(); ++k) out += map_case(cs[k], k == 0 ? 1 : 0);
             return Value::string(std::move(out));
         }},
        {"replace", [](Runtime& rt, const std::string& s, const CallArgs& a) -> SO {
             if (a.pos.size() < 2 || a.pos[0].kind != Value::kString || a.pos[1].kind != Value::kString)
                 return rt.error(a.line, "replace() needs two strings");
             std::string r = replace_all(s, a.pos[0].s, a.pos[1].s, int_arg(a.arg(2, "count"), -1));
             MM_RETURN_IF_ERROR(rt.check_size(r.size(), a.line));
             return Value::string(std::move(r));
         }},
        {"find", [](Runtime& rt, const std::string& s, const CallArgs& a) -> SO {
             std::string sub;
             MM_RETURN_IF_ERROR(need_string(rt, a, 0, "find()", &sub));
             int64_t off = 0;
             const std::string r = cp_range(s, a.arg(1, "start"), a.arg(2, "end"), &off);
             const size_t hit = r.find(sub);
             return Value::integer(hit == std::string::npos ? -1 : off + static_cast<int64_t>(utf8_length(r.substr(0, hit))));
         }},
        {"rfind", [](Runtime& rt, const std::string& s, const CallArgs& a) -> SO {
             std::string sub;
             MM_RETURN_IF_ERROR(need_string(rt, a, 0, "rfind()", &sub));
             int64_t off = 0;
             const std::string r = cp_range(s, a.arg(1, "start"), a.arg(2, "end"), &off);
             const size_t hit = r.rfind(sub);
             return Value::integer(hit == std::string::npos ? -1 : off + static_cast<int64_t>(utf8_length(r.substr(0, hit))));
         }},
        {"count", [](Runtime& rt, const std::string& s, const CallArgs& a) -> SO {
             std::string sub;
             MM_RETURN_IF_ERROR(need_string(rt, a, 0, "count()", &sub));
             if (sub.empty()) return Value::integer(static_cast<int64_t>(utf8_length(s)) + 1);
             int64_t n = 0;
             for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
             return Value::integer(n);
         }},
        {"join", [](Runtime& rt, const std::string& s, const CallArgs& a) -> SO {
             if (a.pos.empty()) return rt.error(a.line, "join() needs an iterable");
             MM_ASSIGN_OR_RETURN(List items, rt.iterate(a.pos[0], a.line));
             std::string out;
             for (size_t k = 0; k < items.size(); ++k) {
                 if (items[k].kind != Value::kString) return rt.error(a.line, "join(): sequence items must be strings");
                 if (k) out += s;
                 out += items[k].s;
                 MM_RETURN_IF_ERROR(rt.check_size(out.size(), a.line));
             }
             return Value::string(std::move(out));
         }},
        // str.format with {}, {0} and {name} fields ({{ and }} for braces); no format specs.
        {"format", [](Runtime& rt, const std::string& s, const CallArgs& a) -> SO {
             std::string out;
             size_t auto_index = 0;
             for (size_t k = 0; k < s.size(); ++k) {
                 if (s[k] == '{' && k + 1 < s.size() && s[k + 1] == '{') { out += '{'; ++k; continue; }
                 if (s[k] == '}' && k + 1 < s.size() && s[k + 1] == '}') { out += '}'; ++k; continue; }
                 if (s[k] != '{') { out += s[k]; continue; }
                 const size_t close = s.find('}', k);
                 if (close == std::string::npos) return rt.error(a.line, "format(): single '{' in the format string");
                 const std::string field = s.substr(k + 1, close - k - 1);
                 if (field.find_first_of(":!") != std::string::npos)
                     return rt.error(a.line, "format(): format specs and conversions are not supported");
                 const Value* v = nullptr;
                 if (field.empty()) {
                     if (auto_index < a.pos.size()) v = &a.pos[auto_index++];
                 } else if (std::all_of(field.begin(), field.end(), [](char c) { return c >= '0' && c <= '9'; })) {
                     const size_t idx = static_cast<size_t>(std::atoll(field.c_str()));
                     if (idx < a.pos.size()) v = &a.pos[idx];
                 } else {
                     v = a.kwarg(field);
                 }
                 if (!v) return rt.error(a.line, "format(): no argument for {" + field + "}");
                 out += Runtime::to_string(*v);
                 MM_RETURN_IF_ERROR(rt.check_size(out.size(), a.line));
                 k = close;
             }
             return Value::string(std::move(out));
         }},
        {"isdigit", [](Runtime&, const std::string& s, const CallArgs&) -> SO {
             return Value::boolean(!s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }));
         }},
        {"isspace", [](Runtime&, const std::string& s, const CallArgs&) -> SO {
             std::vector<std::string> cs = utf8_chars(s);
             return Value::boolean(!cs.empty() && std::all_of(cs.begin(), cs.end(), [](const std::string& c) { return py_space(code_point(c)); }));
         }},
    };
    auto it = kMethods.find(name);
    if (it == kMethods.end()) return Value::undefined(name);
    const Fn* fn = &it->second;
    return Value::function([fn, s](Runtime& rt, const CallArgs& a) { return (*fn)(rt, s, a); });
}

static Value dict_method(const Value& d, const std::string& name) {
    if (name == "items" || name == "keys" || name == "values") {
        return Value::function([d, name](Runtime&, const CallArgs&) -> SO {
            List out;
            for (const auto& [k, v] : *d.dict) {
                if (name == "items") out.push_back(Value::of_tuple({k, v}));
                else out.push_back(name == "keys" ? k : v);
            }
            return Value::of_list(std::move(out));
        });
    }
    if (name == "get") {
        return Value::function([d](Runtime& rt, const CallArgs& a) -> SO {
            if (a.pos.empty()) return rt.error(a.line, "get() needs a key");
            for (const auto& [k, v] : *d.dict)
                if (Runtime::equals(k, a.pos[0])) return v;
            const Value* dflt = a.arg(1, "default");
            return dflt ? *dflt : Value::none();
        });
    }
    return Value::undefined(name);
}

Value find_method(const Value& obj, const std::string& name) {
    if (obj.kind == Value::kString) return string_method(obj.s, name);
    if (obj.kind == Value::kDict) return dict_method(obj, name);
    return Value::undefined(name);
}

}  // namespace moemesh::jinja
