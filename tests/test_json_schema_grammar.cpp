// JSON Schema → GBNF (common/json_schema_grammar.h), run through the grammar engine
// (common/grammar.h). For each schema: texts it accepts match (compact and pretty-printed), texts it
// refuses do not, and whatever the grammar accepts is JSON the schema accepts: random walks through
// the grammar, mutations of valid texts, checked by nlohmann's parser and by a small validator
// written here from the JSON Schema specification (not from the converter), so the two can disagree.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/grammar.h"
#include "common/json_schema_grammar.h"

namespace moemesh {
namespace {

using ordered_json = nlohmann::ordered_json;

std::shared_ptr<const Grammar> compile(const ordered_json& schema, const std::string& prefix = "root") {
    StatusOr<std::string> text = json_schema_to_gbnf(schema, prefix);
    EXPECT_TRUE(text.ok()) << text.status().message() << "\nschema: " << schema.dump();
    if (!text.ok()) return nullptr;
    auto g = Grammar::parse(*text, prefix);
    EXPECT_TRUE(g.ok()) << g.status().message() << "\n" << *text;
    return g.ok() ? *g : nullptr;
}

bool matches(const std::shared_ptr<const Grammar>& g, std::string_view text) {
    GrammarMatcher m(g);
    return m.accept(text) && m.can_end();
}

const ordered_json* find(const ordered_json& s, const char* key) {
    auto it = s.find(key);
    return it == s.end() ? nullptr : &*it;
}

size_t code_points(const std::string& s) {
    return static_cast<size_t>(std::count_if(s.begin(), s.end(), [](char c) { return (c & 0xC0) != 0x80; }));
}

// JSON Schema (2020-12, plus OpenAPI's nullable) for the keywords these tests use.
class Validator {
public:
    explicit Validator(const ordered_json& root) : root_(root) {}
    bool valid(const ordered_json& v) const { return check(root_, v, 0); }

private:
    const ordered_json& root_;

    bool has_type(const ordered_json& v, const std::string& t) const {
        if (t == "integer")
            return v.is_number_integer() || (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>());
        if (t == "number") return v.is_number();
        if (t == "string") return v.is_string();
        if (t == "boolean") return v.is_boolean();
        if (t == "null") return v.is_null();
        if (t == "object") return v.is_object();
        return t == "array" && v.is_array();
    }

    bool check(const ordered_json& s, const ordered_json& v, int depth) const {
        if (depth > 100) return false;
        if (s.is_boolean()) return s.get<bool>();
        if (const ordered_json* n = find(s, "nullable"); n && *n == true && v.is_null()) return true;
        if (const ordered_json* r = find(s, "$ref")) {
            const std::string ref = r->get<std::string>();
            const ordered_json& target = ref == "#" ? root_ : root_.at(ordered_json::json_pointer(ref.substr(1)));
            if (!check(target, v, depth + 1)) return false;
        }
        if (const ordered_json* t = find(s, "type")) {
            std::vector<std::string> types;
            if (t->is_array()) types = t->get<std::vector<std::string>>();
            else types.push_back(t->get<std::string>());
            auto of_type = [&](const std::string& x) { return has_type(v, x); };
            if (std::none_of(types.begin(), types.end(), of_type)) return false;
        }
        if (const ordered_json* e = find(s, "enum"); e && std::find(e->begin(), e->end(), v) == e->end()) return false;
        if (const ordered_json* c = find(s, "const"); c && *c != v) return false;
        if (const ordered_json* all = find(s, "allOf"))
            for (const ordered_json& sub : *all)
                if (!check(sub, v, depth + 1)) return false;
        auto holds = [&](const ordered_json& sub) { return check(sub, v, depth + 1); };
        if (const ordered_json* any = find(s, "anyOf"); any && std::none_of(any->begin(), any->end(), holds))
            return false;
        if (const ordered_json* one = find(s, "oneOf"); one && std::count_if(one->begin(), one->end(), holds) != 1)
            return false;
        if (v.is_object()) {
            const ordered_json* props = find(s, "properties");
            for (auto it = v.begin(); it != v.end(); ++it) {
                if (props && props->contains(it.key())) {
                    if (!check((*props)[it.key()], *it, depth + 1)) return false;
                } else if (const ordered_json* ap = find(s, "additionalProperties")) {
                    if (!check(*ap, *it, depth + 1)) return false;
                }
            }
            if (const ordered_json* req = find(s, "required"))
                for (const ordered_json& k : *req)
                    if (!v.contains(k.get<std::string>())) return false;
        }
        if (v.is_array()) {
            const ordered_json* prefix = find(s, "prefixItems");
            const ordered_json* items = find(s, "items");
            for (size_t i = 0; i < v.size(); ++i) {
                if (prefix && i < prefix->size()) {
                    if (!check((*prefix)[i], v[i], depth + 1)) return false;
                } else if (items && !check(*items, v[i], depth + 1)) {
                    return false;
                }
            }
            if (const ordered_json* m = find(s, "minItems"); m && v.size() < m->get<size_t>()) return false;
            if (const ordered_json* m = find(s, "maxItems"); m && v.size() > m->get<size_t>()) return false;
        }
        if (v.is_string()) {
            const size_t n = code_points(v.get<std::string>());
            if (const ordered_json* m = find(s, "minLength"); m && n < m->get<size_t>()) return false;
            if (const ordered_json* m = find(s, "maxLength"); m && n > m->get<size_t>()) return false;
        }
        if (v.is_number())
            if (const ordered_json* m = find(s, "minimum"); m && v.get<double>() < m->get<double>()) return false;
        return true;
    }
};

// Random values a schema accepts, for the keywords the generated cases use (no keywords beside
// anyOf / $ref, which would need the schemas joined).
class Generator {
public:
    Generator(const ordered_json& root, uint32_t seed) : root_(root), rng_(seed) {}

    ordered_json value(const ordered_json& s, int depth) {
        if (s.is_boolean() || s.empty()) return any(depth);
        if (const ordered_json* n = find(s, "nullable"); n && *n == true && coin(0.2)) return nullptr;
        if (const ordered_json* r = find(s, "$ref")) {
            const std::string ref = r->get<std::string>();
            return value(ref == "#" ? root_ : root_.at(ordered_json::json_pointer(ref.substr(1))), depth);
        }
        if (const ordered_json* all = find(s, "allOf")) return value((*all)[0], depth);
        for (const char* key : {"anyOf", "oneOf"})
            if (const ordered_json* alts = find(s, key)) return value((*alts)[pick(alts->size())], depth);
        if (const ordered_json* c = find(s, "const")) return *c;
        std::vector<std::string> types;
        if (const ordered_json* t = find(s, "type")) {
            if (t->is_array()) types = t->get<std::vector<std::string>>();
            else types.push_back(t->get<std::string>());
        }
        if (const ordered_json* e = find(s, "enum")) {
            std::vector<ordered_json> ok;
            for (const ordered_json& v : *e)
                if (Validator(ordered_json{{"type", types}}).valid(v) || types.empty()) ok.push_back(v);
            return ok[pick(ok.size())];
        }
        const std::string type = types.empty() ? "object" : types[pick(types.size())];
        const bool deep = depth > 8;
        if (type == "object") {
            ordered_json out = ordered_json::object();
            const ordered_json* props = find(s, "properties");
            const ordered_json* req = find(s, "required");
            if (props)
                for (auto it = props->begin(); it != props->end(); ++it) {
                    const bool required = req && std::find(req->begin(), req->end(), it.key()) != req->end();
                    if (required || (!deep && coin(0.5))) out[it.key()] = value(*it, depth + 1);
                }
            const ordered_json* ap = find(s, "additionalProperties");
            const bool extra = ap ? *ap != false : props == nullptr;
            if (extra && !deep)
                for (size_t i = pick(3); i > 0; --i)
                    out["x" + str(0, 4)] = ap && ap->is_object() ? value(*ap, depth + 1) : any(depth + 1);
            return out;
        }
        if (type == "array") {
            ordered_json out = ordered_json::array();
            const ordered_json* prefix = find(s, "prefixItems");
            const ordered_json* items = find(s, "items");
            const size_t lo = s.value("minItems", size_t{0});
            size_t hi = std::min(s.value("maxItems", size_t{1000}), lo + (deep ? 0 : 4));
            if (items && *items == false) hi = std::min(hi, prefix ? prefix->size() : 0);
            for (size_t i = 0, n = lo + pick(hi - lo + 1); i < n; ++i)
                out.push_back(prefix && i < prefix->size() ? value((*prefix)[i], depth + 1)
                              : items                       ? value(*items, depth + 1)
                                                            : any(depth + 1));
            return out;
        }
        if (type == "string") {
            const size_t lo = s.value("minLength", size_t{0});
            return str(lo, std::min(s.value("maxLength", size_t{1000}), lo + 8));
        }
        if (type == "integer" || type == "number") {
            const bool u = s.value("minimum", -1.0) >= 0;
            if (type == "number" && coin(0.6)) {
                const double mag[] = {1e-7, 0.5, 1e3, 1e21, 1e250};
                const double d = std::uniform_real_distribution<>(0, mag[pick(5)])(rng_);
                return u || coin(0.5) ? d : -d;
            }
            const int64_t lim = coin(0.2) ? 999999999999999 : 1000;
            return std::uniform_int_distribution<int64_t>(u ? 0 : -lim, lim)(rng_);
        }
        if (type == "boolean") return coin(0.5);
        return nullptr;
    }

    ordered_json any(int depth) {
        switch (pick(depth > 4 ? 4 : 6)) {
            case 0: return nullptr;
            case 1: return coin(0.5);
            case 2:
                if (coin(0.5)) return pick(100000);
                return std::uniform_real_distribution<>(-1e6, 1e6)(rng_);
            case 3: return str(0, 6);
            case 4: {
                ordered_json a = ordered_json::array();
                for (size_t i = pick(4); i > 0; --i) a.push_back(any(depth + 1));
                return a;
            }
            default: {
                ordered_json o = ordered_json::object();
                for (size_t i = pick(4); i > 0; --i) o[str(0, 4)] = any(depth + 1);
                return o;
            }
        }
    }

private:
    const ordered_json& root_;
    std::mt19937 rng_;

    bool coin(double p) { return std::uniform_real_distribution<>(0, 1)(rng_) < p; }
    size_t pick(size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng_); }
    std::string str(size_t lo, size_t hi) {
        static const char* kPool[] = {"a", "Z", "0", " ", "\"", "\\", "/", "\n",
                                      "\t", "\x01", "\x7f", "é", "日", "😀", "{", "#"};
        std::string out;
        for (size_t i = 0, n = lo + pick(hi - lo + 1); i < n; ++i) out += kPool[pick(std::size(kPool))];
        return out;
    }
};

int nesting(const ordered_json& v) {
    int d = 0;
    if (v.is_structured())
        for (const ordered_json& e : v) d = std::max(d, nesting(e));
    return v.is_structured() ? d + 1 : 0;
}

// The same value written as our tests and models write it: compact, and pretty-printed while the
// indentation stays within the grammar's 20 spaces.
std::vector<std::string> spellings(const ordered_json& v) {
    std::vector<std::string> out = {v.dump()};
    if (nesting(v) <= 10) out.push_back(v.dump(2));
    if (nesting(v) <= 20) out.push_back(v.dump(1, '\t'));
    return out;
}

// The characters a random walk may try: JSON's punctuation, the letters of its literals and
// escapes, digits, and every character of the schema (its keys and enum strings).
std::vector<std::string> alphabet(const ordered_json& schema) {
    std::vector<std::string> out;
    for (char c : std::string("{}[],:\" \n\t\\/0123456789-+.eEtrufalsnbxABCDFdc#")) out.push_back(std::string(1, c));
    const std::string text = schema.dump();
    for (size_t i = 0; i < text.size();) {
        size_t n = 1;
        while (i + n < text.size() && (text[i + n] & 0xC0) == 0x80) ++n;
        const std::string cp = text.substr(i, n);
        if (std::find(out.begin(), out.end(), cp) == out.end()) out.push_back(cp);
        i += n;
    }
    return out;
}

// Whatever the grammar accepted as a complete text must be JSON the schema accepts.
void expect_valid(const Validator& v, const std::string& text, const std::string& why) {
    ordered_json parsed = ordered_json::parse(text, nullptr, false);
    ASSERT_FALSE(parsed.is_discarded()) << why << ": the grammar accepted text that is not JSON:\n" << text;
    EXPECT_TRUE(v.valid(parsed)) << why << ": the grammar accepted JSON the schema refuses:\n" << text;
}

// Walks through the grammar choosing random characters it allows; returns the complete texts.
std::vector<std::string> random_walks(const std::shared_ptr<const Grammar>& g, const ordered_json& schema, int n,
                                      uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<std::string> chars = alphabet(schema);
    std::vector<std::string> done;
    for (int w = 0; w < n; ++w) {
        GrammarMatcher m(g);
        std::string text;
        for (int step = 0; step < 600; ++step) {
            if (m.can_end() && (text.size() > 200 || std::uniform_int_distribution<>(0, 9)(rng) == 0)) {
                done.push_back(text);
                break;
            }
            std::shuffle(chars.begin(), chars.end(), rng);
            if (text.size() > 120)  // steer towards an end: close strings and brackets first
                std::stable_partition(chars.begin(), chars.end(),
                                      [](const std::string& c) { return c == "\"" || c == "]" || c == "}"; });
            auto it = std::find_if(chars.begin(), chars.end(), [&](const std::string& c) { return m.accept(c); });
            if (it == chars.end()) {  // complete, or the grammar wants a character outside the alphabet
                if (m.can_end()) done.push_back(text);
                break;
            }
            text += *it;
        }
    }
    return done;
}

struct Case {
    const char* name;
    const char* schema;
    std::vector<std::string> good;
    std::vector<std::string> bad;
    bool generate = true;  // the Generator understands it
};

const std::vector<Case>& cases() {
    static const std::vector<Case> k = {
        {"EveryType",
         R"({"type": "object", "properties": {
               "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "score": {"type": "number"},
               "active": {"type": "boolean"}, "nothing": {"type": "null"},
               "tags": {"type": "array", "items": {"type": "string"}},
               "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                           "required": ["street"], "additionalProperties": false}},
             "required": ["name", "age", "address"], "additionalProperties": false})",
         {R"({"name":"Ann","age":30,"address":{"street":"Main"}})",
          R"({"name": "a\"b\\c\u00e9\ud83d\ude00\n\/", "age": 0, "score": -1.5e+10, "active": true, "nothing": null,
              "tags": ["x", "", "日本 😀"], "address": {"street": "s", "zip": "1"}})",
          R"({"name":"","age":12,"score":0,"address":{"street":""}})",
          R"({"name":"","age":1,"score":0.25,"active":false,"address":{"street":"x"}})",
          R"({"name":"","age":1,"score":1E5,"address":{"street":"x"}})"},
         {R"({"age":30,"address":{"street":"Main"}})",                        // missing required
          R"({"name":"A","age":30,"address":{"street":"Main"},"x":1})",       // extra key
          R"({"name":"A","age":30,"address":{"street":"Main","x":1}})",       // extra nested key
          R"({"name":"A","age":-1,"address":{"street":"M"}})",                // minimum 0
          R"({"name":"A","age":1.5,"address":{"street":"M"}})",               // not an integer
          R"({"name":"A","age":"30","address":{"street":"M"}})",              // wrong type
          R"({"name":5,"age":30,"address":{"street":"M"}})",                  //
          R"({"name":"A","age":30,"address":{"street":"M"},})",               // trailing comma
          R"({name:"A","age":30,"address":{"street":"M"}})",                  // unquoted key
          R"({"name":"A","age":01,"address":{"street":"M"}})",                // leading zero
          "{\"name\":\"A\nB\",\"age\":1,\"address\":{\"street\":\"M\"}}",     // raw newline in a string
          R"({"name":"A","age":1,"address":{"street":"M"})",                  // unterminated
          R"({"name":"\ud800","age":1,"address":{"street":"M"}})",            // lone surrogate
          R"({"name":'A',"age":1,"address":{"street":"M"}})",
          R"({"name":"A","age":1,"score":.5,"address":{"street":"M"}})",
          R"({"name":"A","age":1,"tags":[1],"address":{"street":"M"}})"}},
        {"EnumConst",
         R"({"type": "object", "properties": {"color": {"enum": ["red", "green", null, 1.5, {"a": [1]}]},
               "kind": {"const": "fixed"}, "level": {"type": "string", "enum": ["low", "high", 3]}},
             "required": ["color", "kind"], "additionalProperties": false})",
         {R"({"color":"red","kind":"fixed"})", R"({"color":null,"kind":"fixed","level":"low"})",
          R"({"color":1.5,"kind":"fixed","level":"high"})", R"({"color":{"a":[1]},"kind":"fixed"})"},
         {R"({"color":"blue","kind":"fixed"})", R"({"color":"red","kind":"other"})",
          R"({"color":"Red","kind":"fixed"})", R"({"color":"red","kind":"fixed","level":3})", R"({"color":"red"})"}},
        {"AnyOfNullableTypeArrays",
         R"({"type": "object", "properties": {
               "id": {"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1}]},
               "note": {"type": "string", "nullable": true}, "val": {"type": ["number", "boolean", "null"]},
               "kind": {"oneOf": [{"const": "a"},
                                  {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}},
             "required": ["id", "note"]})",
         {R"({"id":5,"note":null})", R"({"id":"x","note":"n","val":true})", R"({"id":-3,"note":"","val":2.5})",
          R"({"id":0,"note":"","val":null,"kind":"a"})", R"({"id":0,"note":"","kind":{"b":2}})"},
         {R"({"id":"","note":null})", R"({"id":true,"note":null})", R"({"id":1,"note":5})",
          R"({"id":1,"note":null,"val":"s"})", R"({"id":1,"note":null,"val":[]})", R"({"id":1})",
          R"({"id":1,"note":null,"kind":"b"})", R"({"id":1,"note":null,"kind":{}})"}},
        {"RecursiveTree",
         R"({"$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
               "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["value"]}},
             "$ref": "#/$defs/node"})",
         {R"({"value":1})",
          R"({"value":1,"children":[{"value":2,"children":[]},{"value":3,"children":[{"value":4}]}]})"},
         {R"({"value":1,"children":[{"children":[]}]})", R"({"value":1,"children":[1]})",
          R"({"value":1,"children":{}})"}},
        {"RecursionThroughRoot",
         R"({"type": "object", "properties": {"name": {"type": "string"}, "sub": {"$ref": "#"},
               "list": {"type": "array", "items": {"$ref": "#/definitions/leaf"}}}, "required": ["name"],
             "definitions": {"leaf": {"type": "integer"}}})",
         {R"({"name":"a","sub":{"name":"b","sub":{"name":"c"}}})", R"({"name":"a","list":[1,2]})"},
         {R"({"name":"a","sub":{}})", R"({"name":"a","list":["x"]})"}},
        {"ArrayBounds",
         R"({"type": "object", "properties": {
               "pair": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
               "few": {"type": "array", "maxItems": 3},
               "some": {"type": "array", "items": {"type": "string"}, "minItems": 1},
               "none": {"type": "array", "maxItems": 0},
               "one": {"type": "array", "items": {"type": "boolean"}, "maxItems": 1}},
             "additionalProperties": false})",
         {R"({})", R"({"pair":[1,2]})", R"({"few":[]})", R"({"few":[1,"a",null]})", R"({"some":["a"]})",
          R"({"none":[]})", R"({"one":[]})", R"({"one":[true]})", R"({"pair":[1,2],"some":["a","b","c"],"none":[]})"},
         {R"({"pair":[1]})", R"({"pair":[1,2,3]})", R"({"few":[1,2,3,4]})", R"({"some":[]})", R"({"none":[1]})",
          R"({"pair":[1,2,]})", R"({"one":[true,false]})", R"({"pair":[1 2]})", R"({"pair":[,1,2]})"}},
        {"StringLengths",
         R"({"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 4},
               "empty": {"type": "string", "maxLength": 0},
               "fmt": {"type": "string", "format": "date-time", "pattern": "^x"}}})",
         {R"({"code":"ab"})", R"({"code":"abcd"})", R"({"code":"é日"})", R"({"code":"\n\u0041"})",
          R"({"code":"😀😀"})", R"({"code":"\ud83d\ude00a"})", R"({"empty":""})", R"({"fmt":"anything"})"},
         {R"({"code":"a"})", R"({"code":"abcde"})", R"({"empty":"x"})", R"({"code":"😀"})",
          R"({"code":"\ud83d\ude00"})"}},
        {"AdditionalTrue",
         R"({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": true})",
         {R"({"a":1,"x":[1,{"y":null}]})", R"({"x":1})", R"({})", R"({"a":1,"b":"c","d":{}})"},
         {R"({"a":1,})", R"({1:2})", R"({"a":1 "b":2})", R"({"x":1,"a":"s"})"}},
        {"AdditionalSchema",
         R"({"type": "object", "additionalProperties": {"type": "integer"}})",
         {R"({"a":1,"b":2})", R"({})", R"({"":-5})"},
         {R"({"a":"x"})", R"({"a":1.5})", R"({"a":1,"b":null})"}},
        {"DeclaredAndAdditionalSchema",
         R"({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
             "additionalProperties": {"type": "boolean"}})",
         {R"({"name":"x","flag":true})", R"({"name":"x"})", R"({"name":"x","a":true,"b":false})"},
         {R"({"name":"x","flag":1})", R"({"flag":true})", R"({})", R"({"name":"x","name":true})"}},
        {"AdditionalFalse",
         R"({"type": "object", "additionalProperties": false})", {R"({})", "{ }", "{\n}"}, {R"({"a":1})", R"([])"}},
        {"EmptySchema",
         R"({})",
         {"1", R"("s")", "null", R"([1,{"a":[]}])", R"({"a":{"b":[true,false]}})", "-0.5e-3", "0", "true", R"("")",
          "[]"},
         {"01", "[1,]", R"({"a"})", "'x'", "nul", "\"unterminated", "NaN", "+1", ".5", "1.", "1e", "[1] [2]", "",
          "--1", "1e400"}},
        {"TupleClosed",
         R"({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": false})",
         {"[]", R"(["a"])", R"(["a",1])", R"([ "a", 1 ])"},
         {R"(["a",1,2])", "[1]", R"(["a","b"])", R"(["a",])"}},
        {"TupleOpen",
         R"({"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"type": "null"},
             "minItems": 2, "maxItems": 4})",
         {"[true,null]", "[false,null,null]", "[false,null,null,null]"},
         {"[true]", "[true,true]", "[]", "[null,null]", "[true,null,null,null,null]"}},
        {"SpecialKeys",
         R"({"type": "object", "properties": {"we\"ird\\key": {"type": "integer"}, "#hash": {"type": "integer"},
               "日本": {"type": "integer"}, "": {"type": "integer"}, "tab\there": {"type": "integer"}},
             "required": ["we\"ird\\key"]})",
         {R"({"we\"ird\\key":1,"#hash":2,"日本":3,"":4,"tab\there":5})", R"({"we\"ird\\key":1})"},
         {R"({"weird":1})", R"({"we\"ird\\key":1,"日本":"x"})"}},
        {"PydanticStyle",
         R"({"$defs": {"Pet": {"type": "object", "title": "Pet", "required": ["kind"],
               "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer"}}}},
             "type": "object", "properties": {"pet": {"allOf": [{"$ref": "#/$defs/Pet"}], "description": "the pet"},
               "owner": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
               "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}}}, "required": ["pet"], "title": "Model"})",
         {R"({"pet":{"kind":"cat"}})", R"({"pet":{"kind":"dog","age":3},"owner":null,"pets":[{"kind":"cat"}]})"},
         {R"({"pet":{"kind":"cow"}})", R"({"pet":{}})", R"({"pet":{"kind":"cat"},"owner":1})"}},
        {"KeywordsBesideAnyOf",
         R"({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
             "anyOf": [{"required": ["a"]}, {"required": ["b"]}], "additionalProperties": false})",
         {R"({"a":"x"})", R"({"b":"y"})", R"({"a":"x","b":"y"})"},
         {"{}", R"({"a":1})", R"({"c":"x"})"},
         false},
        {"AdditionalFalseBesideAnyOf",
         R"({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": false,
             "anyOf": [{"properties": {"b": {"type": "integer"}}}, {"required": ["a"]}]})",
         {R"({"a":1})", "{}"},
         {R"({"b":1})", R"({"a":1,"b":1})", R"({"a":"x"})"},
         false},
        {"RefWithSiblings",
         R"({"$defs": {"s": {"type": "string"}}, "type": "object",
             "properties": {"x": {"$ref": "#/$defs/s", "maxLength": 2},
                            "n": {"type": "integer", "minimum": 0, "nullable": true}}})",
         {R"({"x":"ab"})", R"({"n":null})", R"({"n":3})"},
         {R"({"x":"abc"})", R"({"x":1})", R"({"n":-3})"},
         false},
        {"RootTypes",
         R"({"type": ["string", "null", "integer"]})", {R"("x")", "null", "-4"}, {"1.5", "[]", "true"}},
        {"ImplicitObject",
         R"({"properties": {"a": {"type": "integer"}}, "required": ["a"]})",
         {R"({"a":1})"},
         {"{}", R"({"a":"x"})"},
         false},
        {"ManyOptional",
         R"({"type": "object", "required": ["p4"], "properties": {"p0": {"type": "integer"},
               "p1": {"type": "integer"}, "p2": {"type": "integer"}, "p3": {"type": "integer"},
               "p4": {"type": "integer"}, "p5": {"type": "integer"}}})",
         {R"({"p4":1})", R"({"p0":0,"p4":1})", R"({"p1":0,"p3":0,"p4":1,"p5":2})",
          R"({"p0":0,"p1":1,"p2":2,"p3":3,"p4":4,"p5":5})"},
         {"{}", R"({"p5":1})", R"({"p0":0,,"p4":1})", R"({,"p4":1})", R"({"p4":1,})"}},
    };
    return k;
}

TEST(JsonSchemaGrammar, CasesMatchAndRefuse) {
    for (const Case& c : cases()) {
        SCOPED_TRACE(c.name);
        const ordered_json schema = ordered_json::parse(c.schema);
        std::shared_ptr<const Grammar> g = compile(schema);
        ASSERT_TRUE(g);
        const Validator v(schema);
        for (const std::string& text : c.good) {
            const ordered_json value = ordered_json::parse(text);
            ASSERT_TRUE(v.valid(value)) << "test case: not valid for the schema: " << text;
            EXPECT_TRUE(matches(g, text)) << text;
            for (const std::string& s : spellings(value)) EXPECT_TRUE(matches(g, s)) << s;
        }
        for (const std::string& text : c.bad) {
            const ordered_json value = ordered_json::parse(text, nullptr, false);
            ASSERT_TRUE(value.is_discarded() || !v.valid(value)) << "test case: valid for the schema: " << text;
            EXPECT_FALSE(matches(g, text)) << text;
        }
    }
}

TEST(JsonSchemaGrammar, GeneratedValuesMatch) {
    for (const Case& c : cases()) {
        if (!c.generate) continue;
        SCOPED_TRACE(c.name);
        const ordered_json schema = ordered_json::parse(c.schema);
        std::shared_ptr<const Grammar> g = compile(schema);
        ASSERT_TRUE(g);
        const Validator v(schema);
        Generator gen(schema, 1234);
        for (int i = 0; i < 150; ++i) {
            const ordered_json value = gen.value(schema, 0);
            ASSERT_TRUE(v.valid(value)) << "generator: " << value.dump();
            for (const std::string& s : spellings(value)) EXPECT_TRUE(matches(g, s)) << s;
        }
    }
}

TEST(JsonSchemaGrammar, RandomWalksGiveValidJson) {
    for (const Case& c : cases()) {
        SCOPED_TRACE(c.name);
        const ordered_json schema = ordered_json::parse(c.schema);
        std::shared_ptr<const Grammar> g = compile(schema);
        ASSERT_TRUE(g);
        const Validator v(schema);
        const std::vector<std::string> texts = random_walks(g, schema, 200, 99);
        EXPECT_GE(texts.size(), 20u) << "few walks reached an end: the test checks little";
        for (const std::string& t : texts) expect_valid(v, t, "random walk");
    }
}

TEST(JsonSchemaGrammar, MutationsNeverGiveInvalidJson) {
    std::mt19937 rng(7);
    for (const Case& c : cases()) {
        SCOPED_TRACE(c.name);
        const ordered_json schema = ordered_json::parse(c.schema);
        std::shared_ptr<const Grammar> g = compile(schema);
        ASSERT_TRUE(g);
        const Validator v(schema);
        const std::vector<std::string> chars = alphabet(schema);
        std::vector<std::string> texts;
        for (const std::string& t : c.good)
            for (const std::string& s : spellings(ordered_json::parse(t))) texts.push_back(s);
        int accepted = 0;
        for (const std::string& t : texts) {
            for (int i = 0; i < 60; ++i) {
                std::string m = t;
                const size_t pos = std::uniform_int_distribution<size_t>(0, m.size() - 1)(rng);
                switch (i % 3) {
                    case 0: m.erase(pos, 1); break;
                    case 1: m.insert(pos, chars[rng() % chars.size()]); break;
                    default: m.replace(pos, 1, chars[rng() % chars.size()]); break;
                }
                if (!matches(g, m)) continue;
                ++accepted;
                expect_valid(v, m, "mutation of " + t);
            }
        }
        (void)accepted;  // some mutations stay valid (a digit for a digit); most must not match
    }
}

TEST(JsonSchemaGrammar, AnyJson) {
    auto value = Grammar::parse(json_any_gbnf("root", false));
    auto object = Grammar::parse(json_any_gbnf("json", true), "json");
    ASSERT_TRUE(value.ok()) << value.status().message();
    ASSERT_TRUE(object.ok()) << object.status().message();
    for (const char* t : {"1", "[]", R"({"a":[1,2,{"b":null}]})", R"("x")", "-1.5E-3", "{\n  \"a\": 1\n}"})
        EXPECT_TRUE(matches(*value, t)) << t;
    for (const char* t : {"", "01", "[1,]", "{a:1}", "tru", "1 "}) EXPECT_FALSE(matches(*value, t)) << t;
    EXPECT_TRUE(matches(*object, R"({"a":[1]})"));
    EXPECT_TRUE(matches(*object, "{}"));
    for (const char* t : {"[]", "1", R"("x")", "null"}) EXPECT_FALSE(matches(*object, t)) << t;
    const ordered_json empty = ordered_json::object();
    const std::vector<std::string> walks = random_walks(*value, empty, 300, 5);
    EXPECT_GE(walks.size(), 50u);
    for (const std::string& t : walks) expect_valid(Validator(empty), t, "random walk");
}

TEST(JsonSchemaGrammar, WhitespaceIsBounded) {
    std::shared_ptr<const Grammar> g = compile(ordered_json::parse(R"({"type":"array","items":{"type":"integer"}})"));
    ASSERT_TRUE(g);
    EXPECT_TRUE(matches(g, "[\n" + std::string(20, ' ') + "1\n]"));
    EXPECT_TRUE(matches(g, "[\n\t\t1 , 2\n]"));
    EXPECT_FALSE(matches(g, "[\n" + std::string(21, ' ') + "1\n]"));
    EXPECT_FALSE(matches(g, "[  1]"));
    EXPECT_FALSE(matches(g, "[\n\n1]"));
}

// Helper rules carry the prefix, so two schemas share one grammar text.
TEST(JsonSchemaGrammar, PrefixesKeepSchemasApart) {
    std::string text;
    for (const Case& c : cases()) {
        StatusOr<std::string> t = json_schema_to_gbnf(ordered_json::parse(c.schema), "tool-3-args");
        ASSERT_TRUE(t.ok()) << t.status().message();
        for (size_t pos = 0; pos < t->size();) {
            const size_t eol = t->find('\n', pos);
            const std::string name = t->substr(pos, t->find(" ::= ", pos) - pos);
            EXPECT_TRUE(name == "tool-3-args" || name.starts_with("tool-3-args-")) << name;
            EXPECT_EQ(name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"),
                      std::string::npos) << name;
            pos = eol + 1;
        }
    }
    const char* object = R"({"type":"object","properties":{"x":{"type":"integer"}},"required":["x"]})";
    StatusOr<std::string> a = json_schema_to_gbnf(ordered_json::parse(object), "t0");
    StatusOr<std::string> b = json_schema_to_gbnf(ordered_json::parse(R"({"type":"array","items":{}})"), "t1");
    ASSERT_TRUE(a.ok() && b.ok());
    auto g = Grammar::parse("root ::= t0 | t1\n" + *a + *b);
    ASSERT_TRUE(g.ok()) << g.status().message();
    EXPECT_TRUE(matches(*g, R"({"x":1})"));
    EXPECT_TRUE(matches(*g, R"(["a", 1])"));
    EXPECT_FALSE(matches(*g, R"({"x":"a"})"));
    EXPECT_FALSE(json_schema_to_gbnf(ordered_json::object(), "bad prefix").ok());
}

// Objects with many optional properties: 2n rules, and the matcher's stacks stay few.
TEST(JsonSchemaGrammar, ManyOptionalProperties) {
    ordered_json schema = {{"type", "object"}, {"properties", ordered_json::object()}};
    for (int i = 0; i < 400; ++i) schema["properties"]["p" + std::to_string(i)] = {{"type", "integer"}};
    schema["required"] = {"p399"};
    std::shared_ptr<const Grammar> g = compile(schema);
    ASSERT_TRUE(g);
    EXPECT_TRUE(matches(g, R"({"p399":1})"));
    EXPECT_TRUE(matches(g, R"({"p0":1, "p7": 2, "p398": 3, "p399": 4})"));
    EXPECT_FALSE(matches(g, R"({"p7":1})"));
    EXPECT_FALSE(matches(g, R"({"p7":1,"p0":2,"p399":1})"));
}

TEST(JsonSchemaGrammar, LargeBounds) {
    // Above the engine's largest repetition, a maximum is dropped; a minimum is refused.
    std::shared_ptr<const Grammar> g = compile(ordered_json::parse(R"({"type":"string","maxLength":10000})"));
    ASSERT_TRUE(g);
    EXPECT_TRUE(matches(g, "\"" + std::string(5000, 'a') + "\""));
    StatusOr<std::string> r = json_schema_to_gbnf(ordered_json::parse(R"({"type":"string","minLength":5000})"), "root");
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("schema.minLength"), std::string::npos) << r.status().message();
    g = compile(ordered_json::parse(R"({"type":"array","minItems":3,"maxItems":4000,"items":{"type":"integer"}})"));
    ASSERT_TRUE(g);
    EXPECT_TRUE(matches(g, "[1,2,3]"));
    EXPECT_FALSE(matches(g, "[1,2]"));
}

TEST(JsonSchemaGrammar, ErrorsNameThePlace) {
    struct Bad {
        std::string schema;
        const char* message;
    };
    std::string deep = R"({"type":"integer"})";
    for (int i = 0; i < 70; ++i) deep = R"({"type":"array","items":)" + deep + "}";
    ordered_json huge = {{"type", "object"}, {"properties", ordered_json::object()}};
    for (int i = 0; i < 6000; ++i) huge["properties"]["p" + std::to_string(i)] = {{"type", "integer"}};
    const std::vector<Bad> bad = {
        {R"({"type":"object","properties":{"city":{"type":"text"}}})",
         "schema.properties.city.type: unknown type 'text'"},
        {R"({"properties":5})", "schema.properties: must be an object"},
        {"false", "schema: schema false accepts nothing"},
        {R"({"type":"object","properties":{"a":false},"required":["a"]})",
         "schema.properties.a: schema false accepts nothing"},
        {R"({"allOf":[{"type":"string"},{"minLength":1}]})", "schema.allOf: allOf with 2 schemas is not supported"},
        {R"({"$ref":"#/$defs/missing"})", "schema.$ref: unknown reference '#/$defs/missing'"},
        {R"({"properties":{"x":{"$ref":"http://example.com/s.json"}}})",
         "schema.properties.x.$ref: external reference"},
        {R"({"properties":{"x":{"$ref":"#anchor"}}})",
         "schema.properties.x.$ref: reference '#anchor' is not supported"},
        {R"({"type":"array","minItems":3,"maxItems":2})", "schema.maxItems: 2 is below minItems 3"},
        {R"({"type":"array","items":5})", "schema.items: must be a schema"},
        {R"({"type":"array","prefixItems":[true],"items":false,"minItems":2})", "schema.minItems"},
        {R"({"required":"a"})", "schema.required: must be an array of strings"},
        {R"({"type":5})", "schema.type: a type must be a string"},
        {R"({"type":[]})", "schema.type"},
        {R"({"enum":[]})", "accepts nothing"},
        {R"({"properties":{"e":{"type":"string","enum":[1,2]}}})", "schema.properties.e: no value of enum"},
        {R"({"anyOf":[]})", "schema.anyOf: must be a non-empty array"},
        {R"({"anyOf":[false]})", "schema.anyOf: every alternative accepts nothing"},
        {R"({"minItems":-1})", "schema.minItems: must be a non-negative integer"},
        {R"({"type":"string","maxLength":"3"})", "schema.maxLength: must be a non-negative integer"},
        {R"({"additionalProperties":[]})", "schema.additionalProperties: must be a boolean or a schema"},
        {R"({"properties":{"a":{"items":{"properties":{"b":[]}}}}})",
         "schema.properties.a.items.properties.b: a schema must be"},
        {R"({"$defs":{"a":{"anyOf":[{"$ref":"#/$defs/a"},{"type":"null"}]}},"$ref":"#/$defs/a"})", "left recursion"},
        {R"({"anyOf":[{"$ref":"#"},{"type":"null"}]})", "schema.anyOf[0].$ref: '#' refers back to itself"},
        {R"({"type":"object","properties":{"a":{"type":"string"}},"anyOf":[{"properties":{"a":{"type":"integer"}}}]})",
         "schema.anyOf[0].properties.a: given differently"},
        {R"({"type":"string","anyOf":[{"type":"integer"}]})", "schema.anyOf[0].type: no type is allowed by both"},
        {R"({"additionalProperties":{"type":"integer"},"anyOf":[{"properties":{"b":{"type":"string"}}}]})",
         "schema.anyOf[0].properties.b: additionalProperties of the other schema"},
        {R"({"type":"object","required":["z"],"properties":{},"additionalProperties":false})", "schema.required: 'z'"},
        {deep, "nests deeper than 64"},
        {huge.dump(), "more than 10000 rules"},
    };
    for (const Bad& b : bad) {
        StatusOr<std::string> r = json_schema_to_gbnf(ordered_json::parse(b.schema), "root");
        ASSERT_FALSE(r.ok()) << b.schema << "\n" << *r;
        EXPECT_NE(r.status().message().find(b.message), std::string::npos)
            << "schema " << b.schema.substr(0, 200) << "\n got: " << r.status().message() << "\n want: " << b.message;
    }
}

}  // namespace
}  // namespace moemesh
