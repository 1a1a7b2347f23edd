// JSON Schema → GBNF; what is enforced and what is not is listed in json_schema_grammar.h.
//
// Each schema node becomes a GBNF expression; a node used in more than one place gets a rule of its
// own, named from its place in the schema (root-address-city), so the grammar reads like the schema.
// Whitespace only appears around punctuation, never twice in a row, so a text has one parse and the
// matcher's stacks do not multiply.
#include "common/json_schema_grammar.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace moemesh {

namespace {

using ordered_json = nlohmann::ordered_json;

constexpr int kMaxDepth = 64;
constexpr size_t kMaxRules = 10000;
constexpr size_t kMaxGrammarBytes = 1u << 20;  // what common/gbnf.cpp accepts
constexpr uint64_t kMaxRepeat = 4096;           // the largest m and n of {m,n} common/gbnf.cpp accepts
constexpr size_t kMaxHintLen = 48;
constexpr const char* kQuote = R"("\"")";  // the GBNF literal for one double quote

// The shared rules, named prefix + "-" + the first; "@x" in a body stands for the shared rule x.
constexpr std::pair<const char*, const char*> kHelpers[] = {
    {"ws", R"(| " " | "\n" [ \t]{0,20})"},
    // A \u escape of a UTF-16 surrogate only as a high-low pair: strict parsers (nlohmann::json) refuse
    // a lone one.
    {"char", R"([^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" ( [0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | )"
             R"([dD] [0-7] [0-9a-fA-F]{2} | [dD] [89abAB] [0-9a-fA-F]{2} "\\u" [dD] [c-fC-F] [0-9a-fA-F]{2} ) ))"},
    {"string", R"("\"" @char* "\"")"},
    {"uinteger", R"("0" | [1-9] [0-9]{0,15})"},
    {"integer", R"("-"? @uinteger)"},
    // Exponents up to 292: with at most 16 integer digits no number overflows a double, which
    // nlohmann::json and other parsers refuse (1e400).
    {"unumber", R"(@uinteger ( "." [0-9]+ )? ( [eE] ( "-" [0-9]{1,3} | "+"? ( [0-9]{1,2} | [01] [0-9]{2} | )"
                R"("2" [0-8] [0-9] | "29" [0-2] ) ) )?)"},
    {"number", R"("-"? @unumber)"},
    {"value", R"(@object | @array | @string | @number | "true" | "false" | "null")"},
    {"member", R"(@string @ws ":" @ws @value)"},
    {"object", R"("{" @ws ( @member ( @ws "," @ws @member )* @ws )? "}")"},
    {"array", R"("[" @ws ( @value ( @ws "," @ws @value )* @ws )? "]")"},
};

constexpr const char* kTypes[] = {"object", "array", "string", "number", "integer", "boolean", "null"};

// The keywords this converter acts on. Other keys annotate (title, description) or are not enforced,
// so keys beside $ref or anyOf that are all outside this list change nothing.
const std::unordered_set<std::string_view>& keywords() {
    static const std::unordered_set<std::string_view> k = {
        "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems",
        "additionalItems", "minItems", "maxItems", "minLength", "maxLength", "minimum", "exclusiveMinimum",
        "anyOf", "oneOf", "allOf", "$ref", "nullable"};
    return k;
}

bool constrains(const ordered_json& s) {
    for (auto it = s.begin(); it != s.end(); ++it)
        if (keywords().contains(it.key())) return true;
    return false;
}

const ordered_json& anything() {
    static const ordered_json kTrue = true;
    return kTrue;
}

const ordered_json* find(const ordered_json& s, const char* key) {
    auto it = s.find(key);
    return it == s.end() ? nullptr : &*it;
}

bool has(const std::vector<std::string>& v, std::string_view s) { return std::find(v.begin(), v.end(), s) != v.end(); }

bool is_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

bool valid_rule_name(std::string_view s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return is_alnum(c) || c == '-'; });
}

// A fragment of a rule name made from a property or definition name.
std::string sanitize(std::string_view s) {
    std::string out;
    for (size_t i = 0; i < s.size() && out.size() < 24; ++i) out += is_alnum(s[i]) ? s[i] : '-';
    return out.empty() ? "key" : out;
}

// A GBNF literal matching exactly `bytes` (UTF-8 passes through; the engine decodes it).
std::string gbnf_literal(std::string_view bytes) {
    std::string out = "\"";
    for (char ch : bytes) {
        const auto c = static_cast<unsigned char>(ch);
        if (c == '"' || c == '\\') out += std::string("\\") + ch;
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20 || c == 0x7F) out += str_printf("\\x%02X", c);
        else out += ch;
    }
    return out + "\"";
}

// Compact JSON text of `v`; none for strings that are not UTF-8 (nlohmann's dump throws on them).
std::optional<std::string> compact_json(const ordered_json& v) {
    try {
        return v.dump();
    } catch (const ordered_json::exception&) {
        return std::nullopt;
    }
}

std::vector<std::string> utf8_chars(const std::string& s) {
    std::vector<std::string> out;
    for (char c : s) {
        if ((c & 0xC0) != 0x80 || out.empty()) out.emplace_back();
        out.back() += c;
    }
    return out;
}

uint32_t decode_utf8(std::string_view c) {
    uint32_t cp = c.size() == 1 ? static_cast<unsigned char>(c[0]) : c[0] & (0xFFu >> (c.size() + 1));
    for (size_t k = 1; k < c.size(); ++k) cp = cp << 6 | (static_cast<unsigned char>(c[k]) & 0x3Fu);
    return cp;
}

StatusOr<std::vector<std::string>> parse_types(const ordered_json& t, const std::string& path) {
    std::vector<std::string> out;
    for (const ordered_json& v : t.is_array() ? t : ordered_json::array({t})) {
        if (!v.is_string()) return MM_ERROR("%s: a type must be a string, not %s", path.c_str(), v.type_name());
        const std::string& name = v.get_ref<const std::string&>();
        if (std::find(std::begin(kTypes), std::end(kTypes), name) == std::end(kTypes))
            return MM_ERROR("%s: unknown type '%s'", path.c_str(), name.c_str());
        if (!has(out, name)) out.push_back(name);
    }
    return out;
}

bool value_has_type(const ordered_json& v, std::string_view t) {
    if (t == "integer")
        return v.is_number_integer() || (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>());
    if (t == "number") return v.is_number();
    if (t == "string") return v.is_string();
    if (t == "boolean") return v.is_boolean();
    if (t == "null") return v.is_null();
    return t == "object" ? v.is_object() : v.is_array();
}

// Both schemas at once, as one schema: the keywords beside anyOf / oneOf / allOf / $ref joined with
// each alternative or target. Exact where they use different keywords; a keyword both use is joined
// where the conjunction is easy (types intersect, required and properties unite, bounds tighten) and
// refused otherwise, since keeping either one alone would loosen the grammar.
StatusOr<ordered_json> combine(const ordered_json& a, const ordered_json& b, const std::string& path) {
    if (a.is_boolean() || b.is_boolean()) {
        if (!(a.is_boolean() ? a : b).get<bool>()) return MM_ERROR("%s: schema false accepts nothing", path.c_str());
        return a.is_boolean() ? b : a;
    }
    for (const ordered_json* s : {&a, &b})
        if (!s->is_object())
            return MM_ERROR("%s: a schema must be an object or a boolean, not %s", path.c_str(), s->type_name());
    ordered_json out = a;
    for (auto it = b.begin(); it != b.end(); ++it) {
        const std::string& k = it.key();
        auto have = out.find(k);
        if (have == out.end()) {
            out[k] = *it;
            continue;
        }
        if (*have == *it || !keywords().contains(k)) continue;
        const bool numbers = have->is_number() && it->is_number();
        if (k == "type") {
            MM_ASSIGN_OR_RETURN(std::vector<std::string> ta, parse_types(*have, path + ".type"));
            MM_ASSIGN_OR_RETURN(std::vector<std::string> tb, parse_types(*it, path + ".type"));
            ordered_json both = ordered_json::array();
            for (const std::string& t : ta) {
                const bool integer = (t == "number" && has(tb, "integer")) || (t == "integer" && has(tb, "number"));
                if (has(tb, t) || integer) both.push_back(integer ? "integer" : t);
            }
            if (both.empty())
                return MM_ERROR("%s.type: no type is allowed by both schemas (accepts nothing)", path.c_str());
            *have = both;
        } else if (k == "required" && have->is_array() && it->is_array()) {
            for (const ordered_json& v : *it)
                if (std::find(have->begin(), have->end(), v) == have->end()) have->push_back(v);
        } else if (k == "properties" && have->is_object() && it->is_object()) {
            for (auto p = it->begin(); p != it->end(); ++p) {
                auto q = have->find(p.key());
                if (q == have->end()) (*have)[p.key()] = *p;
                else if (*q != *p)
                    return MM_ERROR("%s.properties.%s: given differently in both schemas; combining them is not "
                                    "supported", path.c_str(), p.key().c_str());
            }
        } else if (numbers && (k.starts_with("min") || k == "exclusiveMinimum")) {
            if (*it > *have) *have = *it;
        } else if (numbers && k.starts_with("max")) {
            if (*it < *have) *have = *it;
        } else if (k == "nullable") {
            *have = *have == true && *it == true;
        } else {
            return MM_ERROR("%s: '%s' is given differently in both schemas; combining them is not supported",
                            path.c_str(), k.c_str());
        }
    }
    // One side's additionalProperties also governs the properties only the other side declares.
    for (const auto& [x, y] : {std::pair{&a, &b}, std::pair{&b, &a}}) {
        const ordered_json *ap = find(*x, "additionalProperties"), *xp = find(*x, "properties");
        const ordered_json* yp = find(*y, "properties");
        if (!ap || *ap == true || !yp || !yp->is_object()) continue;
        for (auto p = yp->begin(); p != yp->end(); ++p) {
            if (xp && xp->is_object() && xp->contains(p.key())) continue;
            if (*ap != false)
                return MM_ERROR("%s.properties.%s: additionalProperties of the other schema applies too; combining "
                                "them is not supported", path.c_str(), p.key().c_str());
            out["properties"][p.key()] = false;
        }
    }
    return out;
}

std::string alternatives(const std::vector<std::string>& exprs) {
    if (exprs.size() == 1) return exprs[0];
    std::string out = "(";
    for (size_t i = 0; i < exprs.size(); ++i) out += (i ? " | " : " ") + exprs[i];
    return out + " )";
}

constexpr uint64_t kUnbounded = UINT64_MAX;

// `x` (one item: a name, a literal or a group) repeated lo..hi times; hi > 0.
std::string repeat(const std::string& x, uint64_t lo, uint64_t hi) {
    const std::string l = std::to_string(lo);
    if (hi == kUnbounded) return lo == 0 ? x + "*" : lo == 1 ? x + "+" : x + "{" + l + ",}";
    if (lo == hi) return lo == 1 ? x : x + "{" + l + "}";
    if (lo == 0 && hi == 1) return x + "?";
    return x + "{" + l + "," + std::to_string(hi) + "}";
}

struct Bounds {
    uint64_t lo = 0, hi = kUnbounded;
};

unsigned long long ull(uint64_t v) { return static_cast<unsigned long long>(v); }

// minItems / maxItems or minLength / maxLength. A maximum above what the engine repeats is dropped:
// reaching it takes a model thousands of items or characters, and refusing the schema would refuse
// common ones ("maxLength": 10000).
StatusOr<Bounds> bounds(const ordered_json& s, const char* min_key, const char* max_key, const std::string& path) {
    Bounds b;
    for (const char* key : {min_key, max_key}) {
        const ordered_json* v = find(s, key);
        if (v == nullptr) continue;
        const double d = v->is_number() ? v->get<double>() : -1;  // 2.0 is an integer to JSON Schema
        if (d < 0 || std::floor(d) != d) return MM_ERROR("%s.%s: must be a non-negative integer", path.c_str(), key);
        (key == min_key ? b.lo : b.hi) = static_cast<uint64_t>(std::min(d, 1e15));
    }
    if (b.lo > kMaxRepeat)
        return MM_ERROR("%s.%s: %llu is above the %llu this grammar supports", path.c_str(), min_key, ull(b.lo),
                        ull(kMaxRepeat));
    if (b.hi < b.lo)
        return MM_ERROR("%s.%s: %llu is below %s %llu (accepts nothing)", path.c_str(), max_key, ull(b.hi), min_key,
                        ull(b.lo));
    if (b.hi > kMaxRepeat) b.hi = kUnbounded;
    return b;
}

// The only part of numeric bounds enforced: minimum or exclusiveMinimum >= 0 rules out a minus sign.
bool non_negative(const ordered_json& s) {
    for (const char* key : {"minimum", "exclusiveMinimum"})
        if (const ordered_json* v = find(s, key); v && v->is_number() && *v >= 0) return true;
    return false;
}

class Converter {
public:
    Converter(const ordered_json& root, std::string prefix) : root_(root), prefix_(std::move(prefix)) {
        used_.insert(prefix_);
        for (const auto& [h, body] : kHelpers) used_.insert(prefix_ + "-" + h);
        rules_.emplace_back(prefix_, std::string());  // the start rule comes first; its body is set last
    }

    StatusOr<std::string> convert() {
        // The root is a definition too ("$ref": "#"), and its rule is the start rule.
        ref_rules_["#"] = prefix_;
        unguarded_refs_ = {"#"};
        MM_ASSIGN_OR_RETURN(rules_[0].second, visit(root_, "schema", prefix_, 0));
        MM_RETURN_IF_ERROR(check_size("schema"));
        return render();
    }

    std::string any(bool object_only) {
        rules_[0].second = helper(object_only ? "object" : "value");
        return render();
    }

private:
    const ordered_json& root_;
    const std::string prefix_;
    std::vector<std::pair<std::string, std::string>> rules_;  // name, body; in the order of the text
    size_t bytes_ = 0;
    std::unordered_set<std::string> used_, helpers_;
    std::unordered_map<std::string, int> suffixes_;           // hint → the last number added to make it unique
    std::unordered_map<std::string, std::string> ref_rules_;  // $ref → its rule
    // The $refs being expanded since the last "{" or "[": a reference back to one of them would be
    // left recursion (a rule reaching itself before reading anything), which the engine refuses.
    std::vector<std::string> unguarded_refs_;

    std::string render() const {
        std::string out;
        for (const auto& [name, body] : rules_) out += name + " ::= " + body + "\n";
        return out;
    }

    Status check_size(const std::string& path) const {
        if (rules_.size() > kMaxRules)
            return MM_ERROR("%s: the grammar would need more than %zu rules", path.c_str(), kMaxRules);
        if (bytes_ > kMaxGrammarBytes)
            return MM_ERROR("%s: the grammar would be larger than %zu bytes", path.c_str(), kMaxGrammarBytes);
        return Status();
    }

    std::string reserve(std::string hint) {
        hint.resize(std::min(hint.size(), std::max(kMaxHintLen, prefix_.size() + 16)));
        std::string name = hint;
        for (int& k = suffixes_[hint]; !used_.insert(name).second;) name = hint + "-" + std::to_string(++k);
        return name;
    }
    void define(const std::string& name, std::string body) {
        bytes_ += name.size() + body.size() + 6;
        rules_.emplace_back(name, std::move(body));
    }
    std::string add_rule(const std::string& hint, std::string body) {
        std::string name = reserve(hint);
        define(name, std::move(body));
        return name;
    }
    // `expr` as one item that can be repeated or used twice without copying it: itself if it is a
    // single token, else a rule.
    std::string as_ref(std::string expr, const std::string& hint) {
        return expr.find(' ') == std::string::npos ? expr : add_rule(hint, std::move(expr));
    }

    // A shared rule, defined (with the ones it uses) on first use.
    std::string helper(std::string_view what) {
        const std::string name = prefix_ + "-" + std::string(what);
        if (!helpers_.insert(name).second) return name;
        std::string body;
        for (const auto& [h, text] : kHelpers) {
            if (what != h) continue;
            for (const char* p = text; *p;) {
                if (*p != '@') {
                    body += *p++;
                    continue;
                }
                const char* end = ++p;
                while (*end >= 'a' && *end <= 'z') ++end;
                body += helper(std::string_view(p, static_cast<size_t>(end - p)));
                p = end;
            }
        }
        define(name, std::move(body));
        return name;
    }

    // The GBNF expression for the values `s` accepts. `name` is the base for the rules it creates.
    StatusOr<std::string> visit(const ordered_json& s, const std::string& path, const std::string& name, int depth) {
        if (depth > kMaxDepth) return MM_ERROR("%s: the schema nests deeper than %d levels", path.c_str(), kMaxDepth);
        MM_RETURN_IF_ERROR(check_size(path));
        if (s.is_boolean()) {
            if (s.get<bool>()) return helper("value");
            return MM_ERROR("%s: schema false accepts nothing", path.c_str());
        }
        if (!s.is_object())
            return MM_ERROR("%s: a schema must be an object or a boolean, not %s", path.c_str(), s.type_name());
        if (const ordered_json* n = find(s, "nullable"); n && *n == true) {
            ordered_json rest = s;
            rest.erase("nullable");
            MM_ASSIGN_OR_RETURN(std::string inner, visit(rest, path, name, depth + 1));
            return "( " + inner + R"( | "null" ))";
        }
        if (s.contains("$ref")) return visit_ref(s, path, name, depth);
        if (const ordered_json* all = find(s, "allOf")) {
            if (!all->is_array()) return MM_ERROR("%s.allOf: must be an array", path.c_str());
            if (all->size() != 1)
                return MM_ERROR("%s.allOf: allOf with %zu schemas is not supported", path.c_str(), all->size());
            ordered_json rest = s;
            rest.erase("allOf");
            const std::string p = path + ".allOf[0]";
            MM_ASSIGN_OR_RETURN(ordered_json merged, combine(rest, (*all)[0], p));
            return visit(merged, p, name, depth + 1);
        }
        if (s.contains("anyOf") || s.contains("oneOf")) return visit_any_of(s, path, name, depth);
        if (s.contains("enum") || s.contains("const")) return visit_enum(s, path);
        return visit_types(s, path, name, depth);
    }

    // "#", "#/$defs/NAME", "#/definitions/NAME" or any other JSON pointer into the root schema.
    StatusOr<const ordered_json*> resolve(const std::string& ref, const std::string& path) {
        if (ref.empty() || ref[0] != '#')
            return MM_ERROR("%s: external reference '%s' is not supported (only '#/...' within the schema)",
                            path.c_str(), ref.c_str());
        if (ref == "#") return &root_;
        try {
            const ordered_json::json_pointer pointer(ref.substr(1));
            if (root_.contains(pointer)) return &root_.at(pointer);
        } catch (const ordered_json::exception&) {  // not a JSON pointer: "#anchor"
            return MM_ERROR("%s: reference '%s' is not supported (only '#' and '#/...' JSON pointers)", path.c_str(),
                            ref.c_str());
        }
        return MM_ERROR("%s: unknown reference '%s'", path.c_str(), ref.c_str());
    }

    StatusOr<std::string> visit_ref(const ordered_json& s, const std::string& path, const std::string& name,
                                    int depth) {
        const std::string ref_path = path + ".$ref";
        const ordered_json& r = *find(s, "$ref");
        if (!r.is_string()) return MM_ERROR("%s: must be a string", ref_path.c_str());
        const std::string& ref = r.get_ref<const std::string&>();
        MM_ASSIGN_OR_RETURN(const ordered_json* target, resolve(ref, ref_path));
        std::string target_path = "schema" + ref.substr(1);
        std::replace(target_path.begin(), target_path.end(), '/', '.');
        ordered_json rest = s;
        rest.erase("$ref");
        if (constrains(rest)) {
            // Draft 2019 and later apply keywords beside $ref too: the target, inlined, joined with them.
            MM_ASSIGN_OR_RETURN(ordered_json merged, combine(*target, rest, ref_path));
            return visit(merged, target_path, name, depth + 1);
        }
        if (auto it = ref_rules_.find(ref); it != ref_rules_.end()) {
            if (has(unguarded_refs_, ref))
                return MM_ERROR("%s: '%s' refers back to itself before any JSON is written (left recursion)",
                                ref_path.c_str(), ref.c_str());
            return it->second;
        }
        const std::string rule = reserve(prefix_ + "-" + sanitize(ref.substr(ref.rfind('/') + 1)));
        ref_rules_[ref] = rule;
        unguarded_refs_.push_back(ref);
        MM_ASSIGN_OR_RETURN(std::string body, visit(*target, target_path, rule, depth + 1));
        unguarded_refs_.pop_back();
        define(rule, std::move(body));
        return rule;
    }

    // oneOf as anyOf: its "exactly one" is not enforced (overlapping alternatives are rare in practice).
    StatusOr<std::string> visit_any_of(const ordered_json& s, const std::string& path, const std::string& name,
                                       int depth) {
        if (s.contains("anyOf") && s.contains("oneOf"))
            return MM_ERROR("%s: anyOf and oneOf together are not supported", path.c_str());
        const char* key = s.contains("anyOf") ? "anyOf" : "oneOf";
        const ordered_json& alts = *find(s, key);
        if (!alts.is_array() || alts.empty()) return MM_ERROR("%s.%s: must be a non-empty array", path.c_str(), key);
        ordered_json rest = s;
        rest.erase(key);
        const bool alone = !constrains(rest);
        std::vector<std::string> exprs;
        for (size_t i = 0; i < alts.size(); ++i) {
            if (alts[i] == false) continue;  // accepts nothing: no alternative
            const std::string p = path + "." + key + "[" + std::to_string(i) + "]";
            ordered_json merged;
            if (!alone) {
                MM_ASSIGN_OR_RETURN(merged, combine(rest, alts[i], p));
            }
            const std::string hint = name + "-" + std::to_string(i);
            MM_ASSIGN_OR_RETURN(std::string expr, visit(alone ? alts[i] : merged, p, hint, depth + 1));
            if (!has(exprs, expr)) exprs.push_back(std::move(expr));
        }
        if (exprs.empty()) return MM_ERROR("%s.%s: every alternative accepts nothing", path.c_str(), key);
        return alternatives(exprs);
    }

    // Exactly the JSON value `v`, with whitespace where a pretty-printer puts it in arrays and objects.
    std::optional<std::string> value_expr(const ordered_json& v) {
        if (!v.is_structured()) {
            std::optional<std::string> text = compact_json(v);
            return text ? std::optional<std::string>(gbnf_literal(*text)) : std::nullopt;
        }
        const std::string ws = helper("ws");
        std::string out = (v.is_object() ? R"("{" )" : R"("[" )") + ws;
        for (auto it = v.begin(); it != v.end(); ++it) {
            out += it == v.begin() ? " " : " " + ws + R"( "," )" + ws + " ";
            if (v.is_object()) {
                std::optional<std::string> key = compact_json(it.key());
                if (!key) return std::nullopt;
                out += gbnf_literal(*key) + " " + ws + R"( ":" )" + ws + " ";
            }
            std::optional<std::string> e = value_expr(*it);
            if (!e) return std::nullopt;
            out += *e;
        }
        return out + (v.empty() ? "" : " " + ws) + (v.is_object() ? R"( "}")" : R"( "]")");
    }

    // enum / const: the values that `type` (if given) allows. Other keywords beside them are not
    // checked against the values.
    StatusOr<std::string> visit_enum(const ordered_json& s, const std::string& path) {
        const ordered_json* e = find(s, "enum");
        if (e && !e->is_array()) return MM_ERROR("%s.enum: must be an array", path.c_str());
        std::vector<const ordered_json*> values;
        if (const ordered_json* c = find(s, "const")) {
            if (!e || std::find(e->begin(), e->end(), *c) != e->end()) values.push_back(c);
        } else {
            for (const ordered_json& v : *e) values.push_back(&v);
        }
        if (const ordered_json* t = find(s, "type")) {
            MM_ASSIGN_OR_RETURN(std::vector<std::string> types, parse_types(*t, path + ".type"));
            std::erase_if(values, [&](const ordered_json* v) {
                auto of_type = [&](const std::string& x) { return value_has_type(*v, x); };
                return std::none_of(types.begin(), types.end(), of_type);
            });
        }
        if (values.empty()) return MM_ERROR("%s: no value of enum / const is allowed (accepts nothing)", path.c_str());
        std::vector<std::string> exprs;
        for (const ordered_json* v : values) {
            std::optional<std::string> expr = value_expr(*v);
            if (!expr) return MM_ERROR("%s: an enum / const string is not valid UTF-8", path.c_str());
            if (!has(exprs, *expr)) exprs.push_back(std::move(*expr));
        }
        return alternatives(exprs);
    }

    StatusOr<std::string> visit_types(const ordered_json& s, const std::string& path, const std::string& name,
                                      int depth) {
        std::vector<std::string> types;
        if (const ordered_json* t = find(s, "type")) {
            MM_ASSIGN_OR_RETURN(types, parse_types(*t, path + ".type"));
            if (types.empty()) return MM_ERROR("%s.type: an empty list of types accepts nothing", path.c_str());
        } else {
            // No type: the keywords present say what was meant ("properties" without a type is an object
            // in every real schema). Narrowing only makes the grammar stricter.
            auto any = [&](std::initializer_list<const char*> keys) {
                return std::any_of(keys.begin(), keys.end(), [&](const char* k) { return s.contains(k); });
            };
            if (any({"properties", "required", "additionalProperties"})) types.push_back("object");
            if (any({"items", "prefixItems", "additionalItems", "minItems", "maxItems"})) types.push_back("array");
            if (any({"minLength", "maxLength"})) types.push_back("string");
            if (any({"minimum", "exclusiveMinimum"})) types.push_back("number");
            if (types.empty()) return helper("value");
        }
        if (has(types, "number")) std::erase(types, "integer");  // a subset: two parses of "1"
        std::vector<std::string> exprs;
        for (const std::string& t : types) {
            const std::string hint = types.size() == 1 ? name : name + "-" + t;
            std::string expr;
            if (t == "object") {
                MM_ASSIGN_OR_RETURN(expr, visit_object(s, path, hint, depth));
            } else if (t == "array") {
                MM_ASSIGN_OR_RETURN(expr, visit_array(s, path, hint, depth));
            } else if (t == "string") {
                MM_ASSIGN_OR_RETURN(Bounds b, bounds(s, "minLength", "maxLength", path));
                if (b.hi == 0) expr = gbnf_literal("\"\"");
                else if (b.lo == 0 && b.hi == kUnbounded) expr = helper("string");
                else expr = std::string(kQuote) + " " + repeat(helper("char"), b.lo, b.hi) + " " + kQuote;
            } else if (t == "integer" || t == "number") {
                const bool u = non_negative(s);
                expr = helper(t == "integer" ? (u ? "uinteger" : "integer") : (u ? "unumber" : "number"));
            } else {
                expr = t == "boolean" ? R"(( "true" | "false" ))" : R"("null")";
            }
            exprs.push_back(std::move(expr));
        }
        return alternatives(exprs);
    }

    StatusOr<std::string> visit_object(const ordered_json& s, const std::string& path, const std::string& name,
                                       int depth) {
        const ordered_json* props = find(s, "properties");
        if (props && !props->is_object())
            return MM_ERROR("%s.properties: must be an object, not %s", path.c_str(), props->type_name());
        std::vector<std::string> required;
        if (const ordered_json* r = find(s, "required")) {
            if (!r->is_array()) return MM_ERROR("%s.required: must be an array of strings", path.c_str());
            for (const ordered_json& v : *r) {
                if (!v.is_string()) return MM_ERROR("%s.required: must be an array of strings", path.c_str());
                if (!has(required, v.get_ref<const std::string&>())) required.push_back(v.get<std::string>());
            }
        }
        // Keys beyond the declared ones: allowed when nothing is declared or additionalProperties says so.
        const ordered_json* ap = find(s, "additionalProperties");
        if (ap && !ap->is_boolean() && !ap->is_object())
            return MM_ERROR("%s.additionalProperties: must be a boolean or a schema", path.c_str());
        const bool extra = ap ? *ap != false : props == nullptr;
        struct Prop {
            std::string key;
            const ordered_json* schema;
            bool required;
            std::string path;
        };
        std::vector<Prop> list;
        std::vector<std::vector<std::string>> declared;  // keys an extra key must not be
        if (props) {
            for (auto it = props->begin(); it != props->end(); ++it) {
                declared.push_back(utf8_chars(it.key()));
                const bool req = has(required, it.key());
                if (req || *it != false)  // an optional property that is false must be absent
                    list.push_back({it.key(), &*it, req, path + ".properties." + it.key()});
            }
        }
        for (const std::string& key : required) {
            if (props && props->contains(key)) continue;
            // Required but not declared: it must still be written, with a value as extra keys take.
            if (ap && *ap == false)
                return MM_ERROR("%s.required: '%s' is not in properties and additionalProperties is false (accepts "
                                "nothing)", path.c_str(), key.c_str());
            declared.push_back(utf8_chars(key));
            list.push_back({key, ap ? ap : &anything(), true, path + ".additionalProperties"});
        }
        for (const std::vector<std::string>& k : declared)
            if (!std::all_of(k.begin(), k.end(), [](const std::string& c) { return compact_json(c).has_value(); }))
                return MM_ERROR("%s.properties: a name is not valid UTF-8", path.c_str());

        const std::string ws = helper("ws");
        const std::string colon = " " + ws + R"( ":" )" + ws + " ";
        std::vector<std::string> saved = std::exchange(unguarded_refs_, {});  // inside "{": input consumed
        std::vector<std::string> kvs;
        for (const Prop& p : list) {
            const std::string hint = name + "-" + sanitize(p.key);
            MM_ASSIGN_OR_RETURN(std::string value, visit(*p.schema, p.path, hint, depth + 1));
            kvs.push_back(gbnf_literal(*compact_json(p.key)) + colon + as_ref(std::move(value), hint));
        }
        std::string extra_kv;
        if (extra) {
            MM_ASSIGN_OR_RETURN(std::string value, visit(ap ? *ap : anything(), path + ".additionalProperties",
                                                         name + "-extra", depth + 1));
            const std::string key = declared.empty() ? helper("string") : kQuote + (" " + other_key(declared, 0, name));
            extra_kv = key + colon + as_ref(std::move(value), name + "-extra");
        }
        unguarded_refs_ = std::move(saved);

        const size_t n = list.size();
        if (n == 0 && !extra) return R"("{" )" + ws + R"( "}")";
        if (n == 0 && declared.empty() && (!ap || *ap == true)) return helper("object");
        // Two rules per property, so that optional ones can be left out in any combination with the
        // commas still right (2n rules; spelling out the subsets would take 2^n alternatives):
        // from<i>, the next member: property i, or a later one up to the first required, or past the
        // properties an extra key; rest<i>, after a member: "," and from<i>, or "}" once no required
        // property is left. The comma and whitespace come before the choice, so the matcher holds one
        // stack per possible key, not one per key and whitespace.
        std::vector<bool> required_from(n + 1, false);
        for (size_t i = n; i-- > 0;) required_from[i] = required_from[i + 1] || list[i].required;
        const size_t last = extra ? n : n - 1;
        const size_t first_rest = n == 0 ? 0 : 1;  // rest<0> only follows the extra keys of no properties
        std::vector<std::string> from(last + 1), rest(n + 1);
        for (size_t i = 0; i <= last; ++i) from[i] = reserve(name + "-from" + std::to_string(i));
        for (size_t i = first_rest; i <= n; ++i) rest[i] = reserve(name + "-rest" + std::to_string(i));
        for (size_t i = first_rest; i <= n; ++i) {
            std::vector<std::string> alts;
            if (i <= last) alts.push_back(R"("," )" + ws + " " + from[i]);
            if (!required_from[i]) alts.push_back(R"("}")");
            define(rest[i], ws + " " + alternatives(alts));
        }
        for (size_t i = 0; i <= last; ++i) {
            std::string body = i == n ? extra_kv + " " + rest[n] : kvs[i] + " " + rest[i + 1];
            if (i < n && !list[i].required && i + 1 <= last) body += " | " + from[i + 1];
            define(from[i], std::move(body));
        }
        return R"("{" )" + ws + " " + (required_from[0] ? from[0] : "( " + from[0] + R"( | "}" ))");
    }

    // The rest of a JSON string (after its opening quote) that is none of `keys` (each split into UTF-8
    // characters), for extra keys, whose values would otherwise decide declared keys: a trie over the
    // keys, a rule per node. A character that leaves the trie may be written raw or as a short escape
    // but not as \uXXXX (which could spell one that stays in it); one that stays in it is written as
    // nlohmann::json writes it. Some spellings of extra keys are refused, never a declared key.
    std::string other_key(const std::vector<std::vector<std::string>>& keys, size_t depth, const std::string& name) {
        std::map<std::string, std::vector<std::vector<std::string>>> next;  // by the character at `depth`
        bool is_key = false;
        for (const std::vector<std::string>& k : keys) {
            if (k.size() == depth) is_key = true;
            else next[k[depth]].push_back(k);
        }
        std::vector<std::string> alts;
        if (!is_key) alts.push_back(kQuote);
        std::string raw = R"([^"\\\x00-\x1F)", escapes;
        for (const auto& [c, sub] : next) {
            raw += str_printf("\\U%08X", decode_utf8(c));
            const std::string lit = compact_json(c).value();  // checked by the caller
            alts.push_back(gbnf_literal(lit.substr(1, lit.size() - 2)) + " " + other_key(sub, depth + 1, name));
        }
        for (const auto& [letter, c] : {std::pair<char, const char*>{'"', "\""}, {'\\', "\\"}, {'/', "/"}, {'b', "\b"},
                                        {'f', "\f"}, {'n', "\n"}, {'r', "\r"}, {'t', "\t"}})
            if (!next.contains(c)) escapes += letter == '\\' ? std::string("\\\\") : std::string(1, letter);
        const std::string tail = helper("char") + "* " + kQuote;
        alts.push_back(raw + "] " + tail);
        if (!escapes.empty()) alts.push_back(R"("\\" [)" + escapes + "] " + tail);
        std::string body;
        for (const std::string& a : alts) body += (body.empty() ? "" : " | ") + a;
        return add_rule(name + "-key" + std::to_string(depth), std::move(body));
    }

    StatusOr<std::string> visit_array(const ordered_json& s, const std::string& path, const std::string& name,
                                      int depth) {
        // A tuple (prefixItems, or a draft-4 items array) and the schema of the items after it.
        const ordered_json* items = find(s, "items");
        const bool draft4 = !s.contains("prefixItems") && items && items->is_array();
        const std::string tuple_key = draft4 ? "items" : "prefixItems", rest_key = draft4 ? "additionalItems" : "items";
        const ordered_json* tuple = find(s, tuple_key.c_str());
        if (tuple && !tuple->is_array()) return MM_ERROR("%s.%s: must be an array", path.c_str(), tuple_key.c_str());
        const ordered_json* rest = find(s, rest_key.c_str());
        if (rest && !rest->is_boolean() && !rest->is_object())
            return MM_ERROR("%s.%s: must be a schema (an object or a boolean)", path.c_str(), rest_key.c_str());
        const bool more = !rest || *rest != false;
        size_t k = tuple ? tuple->size() : 0;
        MM_ASSIGN_OR_RETURN(Bounds b, bounds(s, "minItems", "maxItems", path));
        if (!more) {
            if (b.lo > k)
                return MM_ERROR("%s.minItems: %llu is more than the %zu items allowed (accepts nothing)", path.c_str(),
                                ull(b.lo), k);
            b.hi = std::min<uint64_t>(b.hi, k);
        }
        k = std::min<uint64_t>(k, b.hi);  // later tuple positions can never be written

        std::vector<std::string> saved = std::exchange(unguarded_refs_, {});  // inside "[": input consumed
        std::vector<std::string> elems;  // what the first items must be: the tuple, or one item
        for (size_t i = 0; i < k; ++i) {
            const std::string p = path + "." + tuple_key + "[" + std::to_string(i) + "]";
            MM_ASSIGN_OR_RETURN(std::string e, visit((*tuple)[i], p, name + "-" + std::to_string(i), depth + 1));
            elems.push_back(std::move(e));
        }
        std::string item;  // empty: no items after the tuple
        if (more && b.hi > k) {
            const std::string p = path + "." + rest_key;
            MM_ASSIGN_OR_RETURN(item, visit(rest ? *rest : anything(), p, name + "-item", depth + 1));
            item = as_ref(std::move(item), name + "-item");
        }
        unguarded_refs_ = std::move(saved);

        const std::string ws = helper("ws");
        const std::string open = R"("[" )" + ws + " ", close = ws + R"( "]")";
        if (k == 0 && item.empty()) return open + R"("]")";
        if (k == 0) elems.push_back(item), k = 1;  // no tuple: the first item is its first position
        // after: the rest of the array once j items are written, "]" included; from j = k down to 1.
        std::string after = close;
        if (!item.empty() && b.hi > k) {
            const uint64_t hi = b.hi == kUnbounded ? kUnbounded : b.hi - k;
            after = repeat("( " + ws + R"( "," )" + ws + " " + item + " )", b.lo > k ? b.lo - k : 0, hi) + " " + close;
        }
        for (size_t j = k; j-- > 1;) {
            std::string body = ws + R"( "," )" + ws + " " + elems[j] + " " + after;
            if (j >= b.lo) body += " | " + close;
            after = add_rule(name + "-after" + std::to_string(j), std::move(body));
        }
        if (b.lo == 0) return open + "( " + elems[0] + " " + after + R"( | "]" ))";
        return open + elems[0] + " " + after;
    }
};

}  // namespace

StatusOr<std::string> json_schema_to_gbnf(const nlohmann::ordered_json& schema, const std::string& prefix) {
    if (!valid_rule_name(prefix))
        return MM_ERROR("grammar rule prefix '%s': use only letters, digits and '-'", prefix.c_str());
    return Converter(schema, prefix).convert();
}

std::string json_any_gbnf(const std::string& prefix, bool object_only) {
    MM_CHECK(valid_rule_name(prefix));
    static const ordered_json kNoSchema;
    return Converter(kNoSchema, prefix).any(object_only);
}

}  // namespace moemesh
