// Jinja values as Python sees them (common/jinja_runtime.h): str() and repr(), truthiness,
// equality and ordering, and HF's tojson (json.dumps with ensure_ascii=False).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/jinja_runtime.h"

namespace moemesh::jinja {
namespace {

// Python's repr(float): the shortest digits that round-trip, fixed notation for exponents in
// [-4, 16), scientific otherwise.
std::string float_repr(double x) {
    if (std::isnan(x)) return "nan";
    if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
    char buf[64];
    int prec = 1;
    for (; prec <= 17; ++prec) {
        std::snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
        if (std::strtod(buf, nullptr) == x) break;
    }
    // buf: [-]d.ddde[+-]XX
    std::string s(buf);
    const size_t epos = s.find('e');
    const int exp = std::atoi(s.c_str() + epos + 1);
    std::string mant = s.substr(0, epos);
    const bool neg = mant[0] == '-';
    if (neg) mant.erase(0, 1);
    std::string digits;
    for (char c : mant)
        if (c != '.') digits += c;
    while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
    std::string out;
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
        } else if (static_cast<size_t>(exp) + 1 >= digits.size()) {
            out = digits + std::string(static_cast<size_t>(exp) + 1 - digits.size(), '0') + ".0";
        } else {
            out = digits.substr(0, static_cast<size_t>(exp) + 1) + "." + digits.substr(static_cast<size_t>(exp) + 1);
        }
    } else {
        out = digits.substr(0, 1);
        if (digits.size() > 1) out += "." + digits.substr(1);
        char e[16];
        std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
        out += e;
    }
    return neg ? "-" + out : out;
}

std::string string_repr(const std::string& s) {
    const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
    const char q = dq ? '"' : '\'';
    std::string out(1, q);
    for (unsigned char c : s) {
        if (c == '\\') out += "\\\\";
        else if (c == static_cast<unsigned char>(q)) out += std::string("\\") + q;
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20 || c == 0x7f) {
            char b[8];
            std::snprintf(b, sizeof b, "\\x%02x", c);
            out += b;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + q;
}

void json_string(const std::string& s, std::string* out) {
    *out += '"';
    for (unsigned char c : s) {
        switch (c) {
            case '"': *out += "\\\""; break;
            case '\\': *out += "\\\\"; break;
            case '\n': *out += "\\n"; break;
            case '\r': *out += "\\r"; break;
            case '\t': *out += "\\t"; break;
            case '\b': *out += "\\b"; break;
            case '\f': *out += "\\f"; break;
            default:
                if (c < 0x20) {
                    char b[8];
                    std::snprintf(b, sizeof b, "\\u%04x", c);
                    *out += b;
                } else {
                    *out += static_cast<char>(c);
                }
        }
    }
    *out += '"';
}

}  // namespace

const char* Runtime::type_name(const Value& v) {
    switch (v.kind) {
        case Value::kUndefined: return "undefined";
        case Value::kNone: return "NoneType";
        case Value::kBool: return "bool";
        case Value::kInt: return "int";
        case Value::kFloat: return "float";
        case Value::kString: return "str";
        case Value::kList: return "list";
        case Value::kDict: return "dict";
        case Value::kFunc: return "function";
        case Value::kNamespace: return "Namespace";
    }
    return "?";
}

std::string Runtime::to_string(const Value& v) {
    switch (v.kind) {
        case Value::kUndefined: return "";
        case Value::kString: return v.s;
        default: return repr(v);
    }
}

std::string Runtime::repr(const Value& v) {
    switch (v.kind) {
        case Value::kUndefined: return "";
        case Value::kNone: return "None";
        case Value::kBool: return v.b ? "True" : "False";
        case Value::kInt: return std::to_string(v.i);
        case Value::kFloat: return float_repr(v.f);
        case Value::kString: return string_repr(v.s);
        case Value::kList: {
            std::string s = v.tuple ? "(" : "[";
            for (size_t k = 0; k < v.list->size(); ++k) s += (k ? ", " : "") + repr((*v.list)[k]);
            if (v.tuple) return s + (v.list->size() == 1 ? ",)" : ")");
            return s + "]";
        }
        case Value::kDict: {
            std::string s = "{";
            for (size_t k = 0; k < v.dict->size(); ++k)
                s += (k ? ", " : "") + repr((*v.dict)[k].first) + ": " + repr((*v.dict)[k].second);
            return s + "}";
        }
        case Value::kFunc: return "<function>";
        case Value::kNamespace: return "<Namespace>";
    }
    return "";
}

Status Runtime::to_json(const Value& v, const JsonStyle& style, int level, std::string* out, int line) {
    const int indent = style.indent;
    const bool sort_keys = style.sort_keys;
    MM_RETURN_IF_ERROR(charge(1, line));
    MM_RETURN_IF_ERROR(check_size(out->size(), line));
    if (level > kMaxNesting) return error(line, "tojson: value nested too deeply");
    auto newline = [&](int lv) {
        if (indent < 0) return;
        *out += '\n';
        out->append(static_cast<size_t>(indent) * static_cast<size_t>(lv), ' ');
    };
    const std::string& item_sep = style.item_sep;
    switch (v.kind) {
        case Value::kUndefined: return error(line, "tojson: an undefined value is not JSON serializable");
        case Value::kNone: *out += "null"; return Status();
        case Value::kBool: *out += v.b ? "true" : "false"; return Status();
        case Value::kInt: *out += std::to_string(v.i); return Status();
        case Value::kFloat:
            *out += std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity") : float_repr(v.f);
            return Status();
        case Value::kString: json_string(v.s, out); return Status();
        case Value::kList: {
            if (v.list->empty()) {
                *out += "[]";
                return Status();
            }
            *out += '[';
            for (size_t k = 0; k < v.list->size(); ++k) {
                if (k) *out += item_sep;
                newline(level + 1);
                MM_RETURN_IF_ERROR(to_json((*v.list)[k], style, level + 1, out, line));
            }
            newline(level);
            *out += ']';
            return Status();
        }
        case Value::kDict:
        case Value::kNamespace: {
            if (v.dict->empty()) {
                *out += "{}";
                return Status();
            }
            std::vector<const std::pair<Value, Value>*> items;
            for (const auto& kv : *v.dict) items.push_back(&kv);
            if (sort_keys)
                std::stable_sort(items.begin(), items.end(),
                                 [](auto* a, auto* b) { return to_string(a->first) < to_string(b->first); });
            *out += '{';
            for (size_t k = 0; k < items.size(); ++k) {
                if (k) *out += item_sep;
                newline(level + 1);
                const Value& key = items[k]->first;
                if (key.kind == Value::kString) json_string(key.s, out);
                else if (key.kind == Value::kNone) *out += "\"null\"";
                else if (key.kind == Value::kBool) *out += key.b ? "\"true\"" : "\"false\"";
                else if (key.is_number()) json_string(to_string(key), out);
                else return error(line, std::string("tojson: keys must be str, int, float, bool or None, not ") +
                                            type_name(key));
                *out += style.key_sep;
                MM_RETURN_IF_ERROR(to_json(items[k]->second, style, level + 1, out, line));
            }
            newline(level);
            *out += '}';
            return Status();
        }
        case Value::kFunc: return error(line, "tojson: a function is not JSON serializable");
    }
    return Status();
}

bool Runtime::truthy(const Value& v) {
    switch (v.kind) {
        case Value::kUndefined: case Value::kNone: return false;
        case Value::kBool: return v.b;
        case Value::kInt: return v.i != 0;
        case Value::kFloat: return v.f != 0;
        case Value::kString: return !v.s.empty();
        case Value::kList: return !v.list->empty();
        case Value::kDict: return !v.dict->empty();
        default: return true;
    }
}

bool Runtime::equals(const Value& a, const Value& b) {
    const bool an = a.is_number() || a.kind == Value::kBool, bn = b.is_number() || b.kind == Value::kBool;
    if (an && bn) {
        if (a.kind != Value::kFloat && b.kind != Value::kFloat) return a.as_double() == b.as_double() &&
                                                                      (a.kind == Value::kBool ? a.b : a.i) ==
                                                                          (b.kind == Value::kBool ? b.b : b.i);
        return a.as_double() == b.as_double();
    }
    if (a.kind != b.kind) return false;
    switch (a.kind) {
        case Value::kUndefined: case Value::kNone: return true;
        case Value::kString: return a.s == b.s;
        case Value::kList:
            if (a.list->size() != b.list->size()) return false;
            for (size_t k = 0; k < a.list->size(); ++k)
                if (!equals((*a.list)[k], (*b.list)[k])) return false;
            return true;
        case Value::kDict:
            if (a.dict->size() != b.dict->size()) return false;
            for (const auto& [k, v] : *a.dict) {
                bool found = false;
                for (const auto& [k2, v2] : *b.dict)
                    if (equals(k, k2)) {
                        if (!equals(v, v2)) return false;
                        found = true;
                        break;
                    }
                if (!found) return false;
            }
            return true;
        default: return a.func == b.func && a.dict == b.dict;
    }
}

StatusOr<bool> Runtime::less(const Value& a, const Value& b, int line) {
    const bool an = a.is_number() || a.kind == Value::kBool, bn = b.is_number() || b.kind == Value::kBool;
    if (an && bn) {
        if (a.kind != Value::kFloat && b.kind != Value::kFloat)
            return (a.kind == Value::kBool ? int64_t{a.b} : a.i) < (b.kind == Value::kBool ? int64_t{b.b} : b.i);
        return a.as_double() < b.as_double();
    }
    if (a.kind == Value::kString && b.kind == Value::kString) return a.s < b.s;  // UTF-8 keeps code point order
    if (a.kind == Value::kList && b.kind == Value::kList) {
        for (size_t k = 0; k < a.list->size() && k < b.list->size(); ++k) {
            if (equals((*a.list)[k], (*b.list)[k])) continue;
            return less((*a.list)[k], (*b.list)[k], line);
        }
        return a.list->size() < b.list->size();
    }
    return error(line, std::string("'<' is not supported between ") + type_name(a) + " and " + type_name(b));
}

}  // namespace moemesh::jinja
