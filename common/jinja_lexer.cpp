// Jinja lexer (common/jinja_lexer.h).
//
// Whitespace follows jinja2 with trim_blocks and lstrip_blocks, as Hugging Face renders chat
// templates: a block or comment tag alone on its line takes its indentation and the newline after
// it with it; `-` strips all whitespace on its side, `+` turns lstrip/trim off for that tag; one
// trailing newline of the template is dropped (keep_trailing_newline=False).
#include "common/jinja_lexer.h"

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/tokenizer_unicode.h"

namespace moemesh::jinja {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

class Lexer {
public:
    // jinja2 reads \r\n and \r as \n, then drops one trailing newline (keep_trailing_newline=False).
    Lexer(std::string_view src, const std::string& name) : name_(name) {
        owned_.reserve(src.size());
        for (size_t k = 0; k < src.size(); ++k) {
            if (src[k] == '\r') {
                owned_ += '\n';
                if (k + 1 < src.size() && src[k + 1] == '\n') ++k;
            } else {
                owned_ += src[k];
            }
        }
        src_ = owned_;
        if (!src_.empty() && src_.back() == '\n') src_.remove_suffix(1);
    }

    StatusOr<std::vector<Tok>> run() {
        size_t text_start = 0;
        while (pos_ < src_.size()) {
            const size_t open = find_open(pos_);
            if (open == std::string_view::npos) break;
            add_text(text_start, open);
            pos_ = open;
            const char kind = src_[open + 1];
            MM_RETURN_IF_ERROR(lex_tag(kind));
            text_start = pos_;
        }
        add_text(text_start, src_.size());
        Tok eof;
        eof.line = line_at(src_.size());
        toks_.push_back(eof);
        return std::move(toks_);
    }

private:
    size_t find_open(size_t from) const {
        for (size_t p = src_.find('{', from); p != std::string_view::npos; p = src_.find('{', p + 1))
            if (p + 1 < src_.size() && (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) return p;
        return std::string_view::npos;
    }

    int line_at(size_t p) {
        for (; line_pos_ < p && line_pos_ < src_.size(); ++line_pos_)
            if (src_[line_pos_] == '\n') ++line_;
        return line_;
    }

    Status err(size_t p, const std::string& what) {
        return MM_ERROR("%s line %d: %s", name_.c_str(), line_at(p), what.c_str());
    }

    void add_text(size_t b, size_t e) {
        std::string t(src_.substr(b, e - b));
        text_at_line_start_ = b == 0 || src_[b - 1] == '\n';
        if (strip_next_) {
            size_t k = 0;
            while (k < t.size() && is_space(t[k])) ++k;
            t.erase(0, k);
        } else if (trim_next_ && !t.empty() && t[0] == '\n') {
            t.erase(0, 1);
            text_at_line_start_ = true;
        }
        strip_next_ = trim_next_ = false;
        Tok tok;
        tok.t = Tok::kText;
        tok.s = std::move(t);
        tok.line = line_at(b);
        toks_.push_back(std::move(tok));
    }

    // Whitespace control on the text before a tag: `-` strips all of it; lstrip_blocks strips the
    // indentation of a block or comment tag that starts its line.
    void control_before(char kind, char mod) {
        if (toks_.empty() || toks_.back().t != Tok::kText) return;
        std::string& t = toks_.back().s;
        if (mod == '-') {
            while (!t.empty() && is_space(t.back())) t.pop_back();
        } else if (mod != '+' && kind != '{') {
            const size_t nl = t.rfind('\n');
            const size_t from = nl == std::string::npos ? 0 : nl + 1;
            if (nl == std::string::npos && !text_at_line_start_) return;
            for (size_t k = from; k < t.size(); ++k)
                if (t[k] != ' ' && t[k] != '\t') return;
            t.resize(from);
        }
    }

    Status lex_tag(char kind) {
        const size_t open = pos_;
        pos_ += 2;
        char mod = 0;
        if (pos_ < src_.size() && (src_[pos_] == '-' || src_[pos_] == '+')) mod = src_[pos_++];
        control_before(kind, mod);
        if (kind == '#') {
            const size_t close = src_.find("#}", pos_);
            if (close == std::string_view::npos) return err(open, "unclosed comment '{#'");
            set_after(close > pos_ ? src_[close - 1] : 0, '#');
            pos_ = close + 2;
            return Status();
        }
        if (kind == '%' && starts_raw()) return lex_raw(open);
        Tok begin;
        begin.t = kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin;
        begin.line = line_at(open);
        toks_.push_back(begin);
        const char closer = kind == '{' ? '}' : '%';
        int depth = 0;  // brackets: `}}` inside a dict literal is not the tag's end
        while (true) {
            while (pos_ < src_.size() && is_space(src_[pos_])) ++pos_;
            if (pos_ >= src_.size())
                return err(open, kind == '{' ? "unclosed '{{' (no '}}')" : "unclosed '{%' (no '%}')");
            const char c = src_[pos_];
            const auto at = [&](size_t p, char ch) { return p < src_.size() && src_[p] == ch; };
            if (depth == 0) {
                size_t q = pos_;
                char end_mod = 0;
                if ((c == '-' || c == '+') && at(q + 1, closer) && at(q + 2, '}')) end_mod = c, ++q;
                if (at(q, closer) && at(q + 1, '}')) {
                    Tok end;
                    end.t = kind == '{' ? Tok::kVarEnd : Tok::kBlockEnd;
                    end.line = line_at(pos_);
                    toks_.push_back(end);
                    pos_ = q + 2;
                    if (end_mod == '-') strip_next_ = true;
                    else if (end_mod != '+' && kind == '%') trim_next_ = true;
                    return Status();
                }
            }
            Tok t;
            t.line = line_at(pos_);
            if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
                size_t e = pos_;
                while (e < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
                t.t = Tok::kName;
                t.s = std::string(src_.substr(pos_, e - pos_));
                pos_ = e;
            } else if (std::isdigit(static_cast<unsigned char>(c))) {
                MM_RETURN_IF_ERROR(lex_number(&t));
            } else if (c == '\'' || c == '"') {
                MM_RETURN_IF_ERROR(lex_string(&t));
            } else {
                static const char* const kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~",
                                                   "<",  ">",  "=",  "(",  ")",  "[",  "]", "{", "}", ",", ".", ":",
                                                   "|"};
                const char* op = nullptr;
                for (const char* o : kOps)
                    if (src_.substr(pos_, std::strlen(o)) == o) {
                        op = o;
                        break;
                    }
                if (!op) return err(pos_, std::string("unexpected character '") + c + "' in a tag");
                t.t = Tok::kOp;
                t.s = op;
                pos_ += t.s.size();
                if (t.s == "(" || t.s == "[" || t.s == "{") ++depth;
                if ((t.s == ")" || t.s == "]" || t.s == "}") && depth > 0) --depth;
            }
            toks_.push_back(std::move(t));
        }
    }

    void set_after(char before_close, char kind) {
        if (before_close == '-') strip_next_ = true;
        else if (before_close != '+' && kind != '{') trim_next_ = true;
    }

    Status lex_number(Tok* t) {
        size_t e = pos_;
        const bool after_dot = !toks_.empty() && toks_.back().t == Tok::kOp && toks_.back().s == ".";
        auto digits = [&] {
            while (e < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        };
        digits();
        bool is_float = false;
        if (!after_dot && e + 1 < src_.size() && src_[e] == '.' && std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
            is_float = true;
            ++e;
            digits();
        }
        if (!after_dot && e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
            size_t k = e + 1;
            if (k < src_.size() && (src_[k] == '+' || src_[k] == '-')) ++k;
            if (k < src_.size() && std::isdigit(static_cast<unsigned char>(src_[k]))) {
                is_float = true;
                e = k;
                digits();
            }
        }
        std::string text;
        for (size_t k = pos_; k < e; ++k)
            if (src_[k] != '_') text += src_[k];
        errno = 0;
        if (is_float) {
            t->t = Tok::kFloat;
            t->f = std::strtod(text.c_str(), nullptr);
        } else {
            t->t = Tok::kInt;
            t->i = std::strtoll(text.c_str(), nullptr, 10);
            if (errno == ERANGE) return err(pos_, "integer literal " + text + " is too large");
        }
        pos_ = e;
        return Status();
    }

    // A Python string literal's escapes; an unknown escape keeps its backslash, as Python does.
    Status lex_string(Tok* t) {
        const char q = src_[pos_];
        const size_t start = pos_++;
        t->t = Tok::kString;
        while (true) {
            if (pos_ >= src_.size()) return err(start, "unterminated string literal");
            const char c = src_[pos_++];
            if (c == q) return Status();
            if (c != '\\') {
                t->s += c;
                continue;
            }
            if (pos_ >= src_.size()) return err(start, "unterminated string literal");
            const char e = src_[pos_++];
            switch (e) {
                case 'n': t->s += '\n'; break;
                case 't': t->s += '\t'; break;
                case 'r': t->s += '\r'; break;
                case 'b': t->s += '\b'; break;
                case 'f': t->s += '\f'; break;
                case 'v': t->s += '\v'; break;
                case 'a': t->s += '\a'; break;
                case '0': t->s += '\0'; break;
                case '\\': case '\'': case '"': t->s += e; break;
                case '\n': break;
                case 'x': case 'u': case 'U': {
                    const size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                    uint32_t cp = 0;
                    for (size_t k = 0; k < n; ++k) {
                        if (pos_ + k >= src_.size() || !std::isxdigit(static_cast<unsigned char>(src_[pos_ + k])))
                            return err(start, std::string("bad \\") + e + " escape in a string literal");
                        const char h = src_[pos_ + k];
                        cp = cp * 16 + static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(h)) ? h - '0'
                                                                                                          : (h | 0x20) - 'a' + 10);
                    }
                    if (cp > 0x10FFFF) return err(start, "\\U escape beyond U+10FFFF");
                    pos_ += n;
                    unicode::append_utf8(t->s, cp);
                    break;
                }
                default: t->s += '\\'; t->s += e;
            }
        }
    }

    // `{% raw %}` (after `{%` and its modifier)?
    bool starts_raw() const {
        size_t p = pos_;
        while (p < src_.size() && is_space(src_[p])) ++p;
        if (src_.substr(p, 3) != "raw") return false;
        p += 3;
        while (p < src_.size() && is_space(src_[p])) ++p;
        if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) ++p;
        return src_.substr(p, 2) == "%}";
    }

    Status lex_raw(size_t open) {
        size_t p = src_.find("%}", pos_);
        set_after(src_[p - 1], '%');
        p += 2;
        for (size_t q = src_.find("{%", p); q != std::string_view::npos; q = src_.find("{%", q + 2)) {
            size_t k = q + 2;
            char mod = 0;
            if (k < src_.size() && (src_[k] == '-' || src_[k] == '+')) mod = src_[k++];
            while (k < src_.size() && is_space(src_[k])) ++k;
            if (src_.substr(k, 6) != "endraw") continue;
            k += 6;
            while (k < src_.size() && is_space(src_[k])) ++k;
            char end_mod = 0;
            if (k < src_.size() && (src_[k] == '-' || src_[k] == '+')) end_mod = src_[k++];
            if (src_.substr(k, 2) != "%}") continue;
            add_text(p, q);
            control_before('%', mod);
            pos_ = k + 2;
            if (end_mod == '-') strip_next_ = true;
            else if (end_mod != '+') trim_next_ = true;
            return Status();
        }
        return err(open, "'{% raw %}' without '{% endraw %}'");
    }

    std::string owned_;
    std::string_view src_;
    const std::string& name_;
    size_t pos_ = 0;
    std::vector<Tok> toks_;
    bool strip_next_ = false, trim_next_ = false, text_at_line_start_ = true;
    size_t line_pos_ = 0;
    int line_ = 1;
};

}  // namespace

StatusOr<std::vector<Tok>> lex(std::string_view src, const std::string& name) {
    Lexer lexer(src, name);
    return lexer.run();
}

}  // namespace moemesh::jinja
