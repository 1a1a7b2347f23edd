// GBNF, llama.cpp's grammar text format, parsed into a Grammar (common/grammar.h):
//
//   root  ::= "{" ws pair ("," ws pair)* "}"     # a rule: name ::= alternatives
//   pair  ::= [a-z]+ ":" ws ( "yes" | "no" )
//   ws    ::= [ \t\n]{0,20}
//
// Literals in double quotes and classes in brackets take \n \r \t \\ \" \[ \] \- \^ \xHH \uHHHH
// \UHHHHHHHH; `.` is any code point. Postfix `*` `+` `?` `{m}` `{m,}` `{m,n}` apply to the item
// before them. A newline ends a rule except inside parentheses or after `|` / `::=`. Repetitions
// and groups become generated rules (right-recursive, so the matcher's stacks stay flat).
#include <cstdarg>
#include <cstdio>
#include <string>
#include <string_view>

#include "common/grammar.h"

namespace moemesh {

namespace {

constexpr size_t kMaxGrammarBytes = 1u << 20;
constexpr int kMaxRepeat = 4096;       // m and n of {m,n}
constexpr size_t kMaxRules = 100000;   // generated rules included
constexpr int kMaxNesting = 100;       // parentheses
constexpr size_t kMaxItems = 1u << 21;  // items of all rules after repetitions are expanded

using Item = Grammar::Item;
using Alternative = Grammar::Alternative;

class Parser {
public:
    Parser(std::string_view text, Grammar::Builder* b) : s_(text), b_(b) {}

    Status parse_all() {
        for (;;) {
            skip(true);
            if (pos_ == s_.size()) return Status();
            MM_RETURN_IF_ERROR(parse_rule());
        }
    }

private:
    std::string_view s_;
    size_t pos_ = 0;
    Grammar::Builder* b_;
    int depth_ = 0;
    size_t items_ = 0;

    int line() const {
        int l = 1;
        for (size_t i = 0; i < pos_ && i < s_.size(); ++i) l += s_[i] == '\n';
        return l;
    }
    __attribute__((format(printf, 2, 3))) Status fail(const char* fmt, ...) const {
        char msg[512];
        va_list args;
        va_start(args, fmt);
        std::vsnprintf(msg, sizeof(msg), fmt, args);
        va_end(args);
        return MM_ERROR("grammar line %d: %s", line(), msg);
    }
    bool at_end() const { return pos_ >= s_.size(); }
    char peek(size_t k = 0) const { return pos_ + k < s_.size() ? s_[pos_ + k] : '\0'; }
    static bool is_name_char(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    }

    // Spaces, tabs and comments; newlines too when `newlines`.
    void skip(bool newlines) {
        while (!at_end()) {
            const char c = peek();
            if (c == ' ' || c == '\t' || (newlines && (c == '\n' || c == '\r'))) {
                ++pos_;
            } else if (c == '#') {
                while (!at_end() && peek() != '\n') ++pos_;
            } else {
                break;
            }
        }
    }

    std::string name() {
        const size_t start = pos_;
        while (!at_end() && is_name_char(peek())) ++pos_;
        return std::string(s_.substr(start, pos_ - start));
    }

    Status parse_rule() {
        const std::string n = name();
        if (n.empty()) return fail("expected a rule name, got '%c'", peek());
        skip(false);
        if (s_.substr(pos_, 3) != "::=") return fail("expected '::=' after rule name '%s'", n.c_str());
        pos_ += 3;
        skip(true);
        const uint32_t rule = b_->declare(n);
        if (b_->defined(rule)) return fail("rule '%s' is defined twice", n.c_str());
        MM_RETURN_IF_ERROR(parse_alternatives(rule));
        if (!at_end() && peek() != '\n' && peek() != '\r')
            return fail("unexpected '%c' after the definition of '%s'", peek(), n.c_str());
        return Status();
    }

    Status parse_alternatives(uint32_t rule) {
        for (;;) {
            Alternative alt;
            MM_RETURN_IF_ERROR(parse_sequence(&alt));
            b_->add_alternative(rule, std::move(alt));
            if (peek() != '|') {  // a line that starts with '|' continues the rule
                const size_t save = pos_;
                skip(true);
                if (peek() != '|') {
                    pos_ = save;
                    return Status();
                }
            }
            ++pos_;
            skip(true);
        }
    }

    // One code point of a literal or class, escapes decoded.
    Status parse_char(uint32_t* cp) {
        if (at_end()) return fail("unexpected end of the grammar");
        const auto b = static_cast<unsigned char>(peek());
        if (b == '\\') {
            ++pos_;
            const char e = peek();
            ++pos_;
            switch (e) {
                case 'n': *cp = '\n'; return Status();
                case 'r': *cp = '\r'; return Status();
                case 't': *cp = '\t'; return Status();
                case '\\': case '"': case '[': case ']': case '-': case '^': case '/': case '\'':
                    *cp = static_cast<uint8_t>(e);
                    return Status();
                case 'x': return hex(2, cp);
                case 'u': return hex(4, cp);
                case 'U': return hex(8, cp);
                default: return fail("unknown escape '\\%c'", e);
            }
        }
        // UTF-8
        int n = b < 0x80 ? 0 : (b & 0xE0) == 0xC0 ? 1 : (b & 0xF0) == 0xE0 ? 2 : (b & 0xF8) == 0xF0 ? 3 : -1;
        if (n < 0) return fail("invalid UTF-8 byte 0x%02x", static_cast<unsigned>(b));
        uint32_t v = n == 0 ? b : n == 1 ? (b & 0x1Fu) : n == 2 ? (b & 0x0Fu) : (b & 0x07u);
        ++pos_;
        for (; n > 0; --n, ++pos_) {
            if (at_end() || (static_cast<unsigned char>(peek()) & 0xC0) != 0x80) return fail("invalid UTF-8 sequence");
            v = (v << 6) | (static_cast<unsigned char>(peek()) & 0x3Fu);
        }
        *cp = v;
        return Status();
    }
    Status hex(int digits, uint32_t* cp) {
        uint32_t v = 0;
        for (int i = 0; i < digits; ++i, ++pos_) {
            const char c = peek();
            const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0) return fail("expected %d hex digits in an escape", digits);
            v = v * 16 + static_cast<uint32_t>(d);
        }
        if (v > 0x10FFFF) return fail("code point 0x%x is beyond Unicode", v);
        *cp = v;
        return Status();
    }

    Status parse_int(int* out) {
        if (!(peek() >= '0' && peek() <= '9')) return fail("expected a number in {m,n}");
        long v = 0;
        while (peek() >= '0' && peek() <= '9') {
            v = v * 10 + (peek() - '0');
            ++pos_;
            if (v > kMaxRepeat) return fail("repetition counts above %d are not supported", kMaxRepeat);
        }
        *out = static_cast<int>(v);
        return Status();
    }

    static Item chars(std::vector<std::pair<uint32_t, uint32_t>> ranges, bool negated) {
        Item it;
        it.ranges = std::move(ranges);
        it.negated = negated;
        return it;
    }
    static Item ref(uint32_t rule) {
        Item it;
        it.is_ref = true;
        it.rule = rule;
        return it;
    }
    Status new_rule(const std::string& base, uint32_t* rule) {
        if (b_->num_rules() >= kMaxRules) return fail("the grammar needs more than %zu rules", kMaxRules);
        *rule = b_->fresh(base);
        return Status();
    }

    // The unit a postfix operator applies to, as one item (a group of several becomes a rule).
    Status as_unit(Alternative* seq, size_t start, Item* unit) {
        if (seq->size() - start == 1) {
            *unit = (*seq)[start];
        } else {
            uint32_t r = 0;
            MM_RETURN_IF_ERROR(new_rule("group", &r));
            b_->add_alternative(r, Alternative(seq->begin() + static_cast<std::ptrdiff_t>(start), seq->end()));
            *unit = ref(r);
        }
        seq->resize(start);
        return Status();
    }
    // x* as a rule: star ::= x star | (empty).
    Status star(const Item& unit, uint32_t* rule) {
        MM_RETURN_IF_ERROR(new_rule("star", rule));
        b_->add_alternative(*rule, {unit, ref(*rule)});
        b_->add_alternative(*rule, {});
        return Status();
    }

    Status apply_postfix(Alternative* seq, size_t start) {
        const char op = peek();
        int lo = 0, hi = -1;  // hi -1: unbounded
        if (op == '*' || op == '+' || op == '?') {
            ++pos_;
            lo = op == '+' ? 1 : 0;
            hi = op == '?' ? 1 : -1;
        } else {  // {m}, {m,}, {m,n}
            ++pos_;
            skip(false);
            MM_RETURN_IF_ERROR(parse_int(&lo));
            skip(false);
            hi = lo;
            if (peek() == ',') {
                ++pos_;
                skip(false);
                hi = -1;
                if (peek() != '}') MM_RETURN_IF_ERROR(parse_int(&hi));
                skip(false);
            }
            if (peek() != '}') return fail("expected '}' to close a repetition");
            ++pos_;
            if (hi >= 0 && hi < lo) return fail("repetition {%d,%d}: the maximum is below the minimum", lo, hi);
        }
        if (start == seq->size()) return fail("'%c' follows nothing", op);
        Item unit;
        MM_RETURN_IF_ERROR(as_unit(seq, start, &unit));
        items_ += static_cast<size_t>(lo) + static_cast<size_t>(hi > lo ? 2 * (hi - lo) : 2);
        if (items_ > kMaxItems) return fail("the grammar expands to more than %zu items (nested repetitions?)", kMaxItems);
        for (int i = 0; i < lo; ++i) seq->push_back(unit);
        if (hi < 0) {
            uint32_t r = 0;
            MM_RETURN_IF_ERROR(star(unit, &r));
            seq->push_back(ref(r));
        } else if (hi > lo) {
            // Up to (hi - lo) more: opt_k ::= x opt_{k-1} | (empty), opt_1 ::= x | (empty).
            uint32_t prev = 0;
            for (int k = 1; k <= hi - lo; ++k) {
                uint32_t r = 0;
                MM_RETURN_IF_ERROR(new_rule("opt", &r));
                b_->add_alternative(r, k == 1 ? Alternative{unit} : Alternative{unit, ref(prev)});
                b_->add_alternative(r, {});
                prev = r;
            }
            seq->push_back(ref(prev));
        }
        return Status();
    }

    Status parse_sequence(Alternative* seq) {
        for (;;) {
            const size_t start = seq->size();
            const char c = peek();
            if (c == '"') {
                ++pos_;
                while (!at_end() && peek() != '"') {
                    if (peek() == '\n') return fail("a string literal is not closed on its line");
                    uint32_t cp = 0;
                    MM_RETURN_IF_ERROR(parse_char(&cp));
                    seq->push_back(chars({{cp, cp}}, false));
                }
                if (at_end()) return fail("unterminated string literal");
                ++pos_;
                if (seq->size() == start) {  // "": matches the empty string; nothing to add
                    skip(depth_ > 0);
                    if (peek() == '*' || peek() == '+' || peek() == '?' || peek() == '{')
                        return fail("a repetition of the empty string");
                    continue;
                }
            } else if (c == '[') {
                ++pos_;
                bool negated = false;
                if (peek() == '^') {
                    negated = true;
                    ++pos_;
                }
                std::vector<std::pair<uint32_t, uint32_t>> ranges;
                while (!at_end() && peek() != ']') {
                    if (peek() == '\n') return fail("a character class is not closed on its line");
                    uint32_t a = 0, z = 0;
                    MM_RETURN_IF_ERROR(parse_char(&a));
                    z = a;
                    if (peek() == '-' && peek(1) != ']' && peek(1) != '\0') {
                        ++pos_;
                        MM_RETURN_IF_ERROR(parse_char(&z));
                        if (z < a) return fail("character range with its end (U+%04X) before its start (U+%04X)", z, a);
                    }
                    ranges.push_back({a, z});
                }
                if (at_end()) return fail("unterminated character class");
                ++pos_;
                if (ranges.empty() && !negated) return fail("an empty character class matches nothing");
                seq->push_back(chars(std::move(ranges), negated));
            } else if (c == '.') {
                ++pos_;
                seq->push_back(chars({}, true));
            } else if (c == '(') {
                ++pos_;
                if (++depth_ > kMaxNesting) return fail("parentheses nested deeper than %d", kMaxNesting);
                skip(true);
                uint32_t r = 0;
                MM_RETURN_IF_ERROR(new_rule("group", &r));
                MM_RETURN_IF_ERROR(parse_alternatives(r));
                skip(true);
                if (peek() != ')') return fail("expected ')'");
                ++pos_;
                --depth_;
                seq->push_back(ref(r));
            } else if (is_name_char(c)) {
                const size_t save = pos_;
                const std::string n = name();
                skip(false);
                if (s_.substr(pos_, 3) == "::=") {  // the next rule starts: this sequence ended
                    pos_ = save;
                    if (depth_ > 0) return fail("rule '%s' starts inside parentheses", n.c_str());
                    return Status();
                }
                pos_ = save + n.size();
                if (b_->num_rules() >= kMaxRules) return fail("the grammar needs more than %zu rules", kMaxRules);
                seq->push_back(ref(b_->declare(n)));
            } else {
                return Status();  // '|', ')', a newline, the end: the caller decides
            }
            skip(depth_ > 0);
            while (peek() == '*' || peek() == '+' || peek() == '?' || peek() == '{') {
                MM_RETURN_IF_ERROR(apply_postfix(seq, start));
                skip(depth_ > 0);
            }
        }
    }
};

}  // namespace

StatusOr<std::shared_ptr<const Grammar>> Grammar::parse(std::string_view gbnf, const std::string& root) {
    if (gbnf.size() > kMaxGrammarBytes)
        return MM_ERROR("the grammar has %zu bytes; at most %zu are accepted", gbnf.size(), kMaxGrammarBytes);
    Builder b;
    Parser p(gbnf, &b);
    MM_RETURN_IF_ERROR(p.parse_all());
    return std::move(b).build(root);
}

}  // namespace moemesh
