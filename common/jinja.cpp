// Jinja parser (common/jinja.h): tokens (common/jinja_lexer.cpp) to the syntax tree that
// common/jinja_eval.cpp runs.
#include "common/jinja.h"

#include <cctype>
#include <cstring>

#include "common/jinja_ast.h"
#include "common/jinja_lexer.h"

namespace moemesh::jinja {
namespace {

constexpr int kMaxParseDepth = 150;


class Parser {
public:
    Parser(std::vector<Tok> toks, const std::string& name) : toks_(std::move(toks)), name_(name) {}

    StatusOr<Body> parse_template() {
        Body body;
        std::string end;
        MM_RETURN_IF_ERROR(parse_body(&body, {}, &end));
        return body;
    }

private:
    const Tok& cur() const { return toks_[pos_]; }
    const Tok& peek(size_t k = 1) const { return toks_[std::min(pos_ + k, toks_.size() - 1)]; }
    bool is_op(const char* op) const { return cur().t == Tok::kOp && cur().s == op; }
    bool is_name(const char* n) const { return cur().t == Tok::kName && cur().s == n; }

    Status err(const std::string& what) const {
        return MM_ERROR("%s line %d: %s", name_.c_str(), cur().line, what.c_str());
    }
    std::string describe(const Tok& t) const {
        switch (t.t) {
            case Tok::kText: return "text";
            case Tok::kVarBegin: return "'{{'";
            case Tok::kVarEnd: return "'}}'";
            case Tok::kBlockBegin: return "'{%'";
            case Tok::kBlockEnd: return "'%}'";
            case Tok::kName: return "'" + t.s + "'";
            case Tok::kString: return "a string";
            case Tok::kInt: case Tok::kFloat: return "a number";
            case Tok::kOp: return "'" + t.s + "'";
            case Tok::kEof: return "the end of the template";
        }
        return "?";
    }
    Status expect_op(const char* op) {
        if (!is_op(op)) return err(std::string("expected '") + op + "', got " + describe(cur()));
        ++pos_;
        return Status();
    }
    Status expect_block_end() {
        if (cur().t != Tok::kBlockEnd) return err("expected '%}', got " + describe(cur()));
        ++pos_;
        return Status();
    }
    StatusOr<std::string> expect_name() {
        if (cur().t != Tok::kName) return err("expected a name, got " + describe(cur()));
        return toks_[pos_++].s;
    }

    // Statements until `{% <one of ends> %}`; *end is the word that ended it ("" at the end of input).
    // `opened_at`: the line of the statement whose body this is, for "never closed" errors.
    Status parse_body(Body* body, const std::vector<std::string>& ends, std::string* end, int opened_at = 0) {
        if (++depth_ > kMaxParseDepth) return err("blocks nested too deeply");
        while (true) {
            const Tok& t = cur();
            if (t.t == Tok::kEof) {
                if (!ends.empty())
                    return MM_ERROR("%s line %d: the block opened on line %d is never closed (missing '{%% %s %%}')",
                                    name_.c_str(), cur().line, opened_at, ends.back().c_str());
                *end = "";
                --depth_;
                return Status();
            }
            if (t.t == Tok::kText) {
                if (!t.s.empty()) {
                    auto s = std::make_unique<Stmt>(Stmt::kText, t.line);
                    s->text = t.s;
                    body->push_back(std::move(s));
                }
                ++pos_;
                continue;
            }
            if (t.t == Tok::kVarBegin) {
                ++pos_;
                auto s = std::make_unique<Stmt>(Stmt::kOutput, t.line);
                MM_ASSIGN_OR_RETURN(s->expr, parse_expression(true));
                if (cur().t != Tok::kVarEnd) return err("expected '}}', got " + describe(cur()));
                ++pos_;
                body->push_back(std::move(s));
                continue;
            }
            if (t.t != Tok::kBlockBegin) return err("unexpected " + describe(t));
            ++pos_;
            if (cur().t != Tok::kName) return err("expected a statement name after '{%', got " + describe(cur()));
            const std::string word = cur().s;
            for (const std::string& e : ends)
                if (word == e) {
                    ++pos_;
                    *end = word;
                    --depth_;
                    return Status();
                }
            MM_RETURN_IF_ERROR(parse_statement(word, body));
        }
    }

    Status parse_statement(const std::string& word, Body* body) {
        const int line = cur().line;
        ++pos_;
        if (word == "if") return parse_if(line, body);
        if (word == "for") return parse_for(line, body);
        if (word == "set") return parse_set(line, body);
        if (word == "macro") return parse_macro(line, body);
        if (word == "filter") return parse_filter_block(line, body);
        if (word == "break" || word == "continue") {
            if (loop_depth_ == 0) return MM_ERROR("%s line %d: '{%% %s %%}' outside a for loop", name_.c_str(), line, word.c_str());
            body->push_back(std::make_unique<Stmt>(word == "break" ? Stmt::kBreak : Stmt::kContinue, line));
            return expect_block_end();
        }
        if (word == "generation" || word == "endgeneration") return expect_block_end();  // HF's AssistantTracker
        if (word == "include" || word == "import" || word == "from" || word == "extends" || word == "block" ||
            word == "call")
            return MM_ERROR("%s line %d: '{%% %s %%}' is not supported in chat templates", name_.c_str(), line,
                            word.c_str());
        if (word.rfind("end", 0) == 0 || word == "elif" || word == "else")
            return MM_ERROR("%s line %d: '{%% %s %%}' without its opening statement", name_.c_str(), line,
                            word.c_str());
        return MM_ERROR("%s line %d: unknown statement '%s'", name_.c_str(), line, word.c_str());
    }

    Status parse_if(int line, Body* body) {
        auto s = std::make_unique<Stmt>(Stmt::kIf, line);
        MM_ASSIGN_OR_RETURN(ExprPtr cond, parse_expression(true));
        MM_RETURN_IF_ERROR(expect_block_end());
        while (true) {
            Body b;
            std::string end;
            MM_RETURN_IF_ERROR(parse_body(&b, {"elif", "else", "endif"}, &end, line));
            s->branches.emplace_back(std::move(cond), std::move(b));
            if (end == "endif") break;
            if (end == "elif") {
                MM_ASSIGN_OR_RETURN(cond, parse_expression(true));
                MM_RETURN_IF_ERROR(expect_block_end());
                continue;
            }
            MM_RETURN_IF_ERROR(expect_block_end());  // else
            Body eb;
            MM_RETURN_IF_ERROR(parse_body(&eb, {"endif"}, &end, line));
            s->branches.emplace_back(nullptr, std::move(eb));
            break;
        }
        body->push_back(std::move(s));
        return expect_block_end();
    }

    Status parse_targets(std::vector<std::string>* names) {
        const bool paren = is_op("(");
        if (paren) ++pos_;
        while (true) {
            MM_ASSIGN_OR_RETURN(std::string n, expect_name());
            names->push_back(std::move(n));
            if (!is_op(",")) break;
            ++pos_;
        }
        if (paren) MM_RETURN_IF_ERROR(expect_op(")"));
        return Status();
    }

    Status parse_for(int line, Body* body) {
        auto s = std::make_unique<Stmt>(Stmt::kFor, line);
        MM_RETURN_IF_ERROR(parse_targets(&s->targets));
        if (!is_name("in")) return err("expected 'in' in the for statement, got " + describe(cur()));
        ++pos_;
        MM_ASSIGN_OR_RETURN(s->expr, parse_expression(false));
        if (is_name("if")) {
            ++pos_;
            MM_ASSIGN_OR_RETURN(s->filter, parse_expression(true));
        }
        if (is_name("recursive")) return err("recursive for loops are not supported");
        MM_RETURN_IF_ERROR(expect_block_end());
        std::string end;
        ++loop_depth_;
        Status body_st = parse_body(&s->body, {"else", "endfor"}, &end, line);
        --loop_depth_;
        MM_RETURN_IF_ERROR(body_st);
        if (end == "else") {
            MM_RETURN_IF_ERROR(expect_block_end());
            MM_RETURN_IF_ERROR(parse_body(&s->else_body, {"endfor"}, &end, line));
        }
        body->push_back(std::move(s));
        return expect_block_end();
    }

    Status parse_set(int line, Body* body) {
        auto s = std::make_unique<Stmt>(Stmt::kSet, line);
        MM_ASSIGN_OR_RETURN(std::string first, expect_name());
        s->targets.push_back(first);
        if (is_op(".")) {
            ++pos_;
            MM_ASSIGN_OR_RETURN(s->attr, expect_name());
        } else {
            while (is_op(",")) {
                ++pos_;
                MM_ASSIGN_OR_RETURN(std::string n, expect_name());
                s->targets.push_back(std::move(n));
            }
        }
        if (is_op("=")) {
            ++pos_;
            MM_ASSIGN_OR_RETURN(s->expr, parse_expression(true));
            if (is_op(",")) {  // `set a, b = 1, 2`
                auto tup = std::make_unique<Expr>(Expr::kTuple, cur().line);
                tup->items.push_back(std::move(s->expr));
                while (is_op(",")) {
                    ++pos_;
                    MM_ASSIGN_OR_RETURN(ExprPtr e, parse_expression(true));
                    tup->items.push_back(std::move(e));
                }
                s->expr = std::move(tup);
            }
            body->push_back(std::move(s));
            return expect_block_end();
        }
        // {% set x %}...{% endset %}, optionally `{% set x | filter %}`
        s->kind = Stmt::kSetBlock;
        if (s->targets.size() != 1) return err("a block set takes one name");
        if (is_op("|")) {
            MM_ASSIGN_OR_RETURN(s->expr, parse_filter_chain_on_placeholder(line));
        }
        MM_RETURN_IF_ERROR(expect_block_end());
        std::string end;
        MM_RETURN_IF_ERROR(parse_body(&s->body, {"endset"}, &end, line));
        body->push_back(std::move(s));
        return expect_block_end();
    }

    StatusOr<ExprPtr> parse_filter_chain_on_placeholder(int line) {
        auto e = std::make_unique<Expr>(Expr::kName, line);
        e->name = kFilterBlockInput;
        ExprPtr node = std::move(e);
        while (is_op("|")) {
            MM_ASSIGN_OR_RETURN(node, parse_filter(std::move(node)));
        }
        return node;
    }

    Status parse_filter_block(int line, Body* body) {
        auto s = std::make_unique<Stmt>(Stmt::kFilterBlock, line);
        --pos_;  // the chain parser expects to sit on '|': pretend `filter` was one
        toks_[pos_].t = Tok::kOp;
        toks_[pos_].s = "|";
        MM_ASSIGN_OR_RETURN(s->expr, parse_filter_chain_on_placeholder(line));
        MM_RETURN_IF_ERROR(expect_block_end());
        std::string end;
        MM_RETURN_IF_ERROR(parse_body(&s->body, {"endfilter"}, &end, line));
        body->push_back(std::move(s));
        return expect_block_end();
    }

    Status parse_macro(int line, Body* body) {
        auto s = std::make_unique<Stmt>(Stmt::kMacro, line);
        MM_ASSIGN_OR_RETURN(s->name, expect_name());
        MM_RETURN_IF_ERROR(expect_op("("));
        while (!is_op(")")) {
            MM_ASSIGN_OR_RETURN(std::string p, expect_name());
            ExprPtr def;
            if (is_op("=")) {
                ++pos_;
                MM_ASSIGN_OR_RETURN(def, parse_expression(true));
            }
            s->params.emplace_back(std::move(p), std::move(def));
            if (!is_op(",")) break;
            ++pos_;
        }
        MM_RETURN_IF_ERROR(expect_op(")"));
        MM_RETURN_IF_ERROR(expect_block_end());
        std::string end;
        const int saved_loops = loop_depth_;
        loop_depth_ = 0;
        macro_reads_.emplace_back(false, false);
        Status body_st = parse_body(&s->body, {"endmacro"}, &end, line);
        loop_depth_ = saved_loops;
        s->catch_varargs = macro_reads_.back().first;
        s->catch_kwargs = macro_reads_.back().second;
        macro_reads_.pop_back();
        MM_RETURN_IF_ERROR(body_st);
        if (cur().t == Tok::kName && cur().s == s->name) ++pos_;  // {% endmacro name %}
        body->push_back(std::move(s));
        return expect_block_end();
    }

    // ---- expressions (jinja2's precedence: condexpr < or < and < not < compare < ~ < +- < */ < ** <
    // unary < filters/tests < postfix) ----

    struct DepthGuard {
        int* d;
        ~DepthGuard() { --*d; }
    };

    StatusOr<ExprPtr> parse_expression(bool with_cond) {
        if (++depth_ > kMaxParseDepth) return err("expression nested too deeply");
        DepthGuard g{&depth_};
        MM_ASSIGN_OR_RETURN(ExprPtr e, parse_or());
        while (with_cond && is_name("if")) {
            const int line = cur().line;
            ++pos_;
            auto c = std::make_unique<Expr>(Expr::kCond, line);
            c->b = std::move(e);
            MM_ASSIGN_OR_RETURN(c->a, parse_or());
            if (is_name("else")) {
                ++pos_;
                MM_ASSIGN_OR_RETURN(c->c, parse_expression(true));
            }
            e = std::move(c);
        }
        return e;
    }

    StatusOr<ExprPtr> parse_or() {
        MM_ASSIGN_OR_RETURN(ExprPtr l, parse_and());
        while (is_name("or")) {
            auto e = std::make_unique<Expr>(Expr::kOr, cur().line);
            ++pos_;
            e->a = std::move(l);
            MM_ASSIGN_OR_RETURN(e->b, parse_and());
            l = std::move(e);
        }
        return l;
    }

    StatusOr<ExprPtr> parse_and() {
        MM_ASSIGN_OR_RETURN(ExprPtr l, parse_not());
        while (is_name("and")) {
            auto e = std::make_unique<Expr>(Expr::kAnd, cur().line);
            ++pos_;
            e->a = std::move(l);
            MM_ASSIGN_OR_RETURN(e->b, parse_not());
            l = std::move(e);
        }
        return l;
    }

    StatusOr<ExprPtr> parse_not() {
        if (is_name("not")) {
            if (++depth_ > kMaxParseDepth) return err("expression nested too deeply");
            DepthGuard g{&depth_};
            auto e = std::make_unique<Expr>(Expr::kNot, cur().line);
            ++pos_;
            MM_ASSIGN_OR_RETURN(e->a, parse_not());
            return ExprPtr(std::move(e));
        }
        return parse_compare();
    }

    StatusOr<ExprPtr> parse_compare() {
        MM_ASSIGN_OR_RETURN(ExprPtr l, parse_add());
        while (true) {
            std::string op;
            if (cur().t == Tok::kOp && (cur().s == "==" || cur().s == "!=" || cur().s == "<" || cur().s == ">" ||
                                        cur().s == "<=" || cur().s == ">=")) {
                op = cur().s;
                ++pos_;
            } else if (is_name("in")) {
                op = "in";
                ++pos_;
            } else if (is_name("not") && peek().t == Tok::kName && peek().s == "in") {
                op = "not in";
                pos_ += 2;
            } else {
                break;
            }
            auto e = std::make_unique<Expr>(Expr::kBinary, cur().line);
            e->name = op;
            e->a = std::move(l);
            MM_ASSIGN_OR_RETURN(e->b, parse_add());
            l = std::move(e);
        }
        return l;
    }

    StatusOr<ExprPtr> binary_loop(StatusOr<ExprPtr> (Parser::*next)(), std::initializer_list<const char*> ops) {
        MM_ASSIGN_OR_RETURN(ExprPtr l, (this->*next)());
        while (cur().t == Tok::kOp) {
            const char* hit = nullptr;
            for (const char* o : ops)
                if (cur().s == o) hit = o;
            if (!hit) break;
            auto e = std::make_unique<Expr>(Expr::kBinary, cur().line);
            ++pos_;
            e->name = hit;
            e->a = std::move(l);
            MM_ASSIGN_OR_RETURN(e->b, (this->*next)());
            l = std::move(e);
        }
        return l;
    }
    // jinja2: + and - bind looser than ~, which binds looser than * and /.
    StatusOr<ExprPtr> parse_add() { return binary_loop(&Parser::parse_concat, {"+", "-"}); }
    StatusOr<ExprPtr> parse_concat() { return binary_loop(&Parser::parse_mul, {"~"}); }
    StatusOr<ExprPtr> parse_mul() { return binary_loop(&Parser::parse_pow, {"*", "/", "//", "%"}); }
    StatusOr<ExprPtr> parse_pow() { return binary_loop(&Parser::parse_unary_filtered, {"**"}); }
    StatusOr<ExprPtr> parse_unary_filtered() { return parse_unary(true); }

    // jinja2: `-x|abs` is abs(-x): the sign takes the bare operand, filters apply to the result.
    StatusOr<ExprPtr> parse_unary(bool with_filter) {
        if (++depth_ > kMaxParseDepth) return err("expression nested too deeply");
        DepthGuard g{&depth_};
        ExprPtr node;
        if (is_op("-") || is_op("+")) {
            auto e = std::make_unique<Expr>(is_op("-") ? Expr::kNeg : Expr::kPos, cur().line);
            ++pos_;
            MM_ASSIGN_OR_RETURN(e->a, parse_unary(false));
            node = std::move(e);
        } else {
            MM_ASSIGN_OR_RETURN(node, parse_primary());
            MM_ASSIGN_OR_RETURN(node, parse_postfix(std::move(node)));
        }
        // filters, tests and calls bind tighter than any binary operator
        while (with_filter) {
            if (is_op("|")) {
                MM_ASSIGN_OR_RETURN(node, parse_filter(std::move(node)));
            } else if (is_name("is")) {
                MM_ASSIGN_OR_RETURN(node, parse_test(std::move(node)));
            } else if (is_op("(")) {
                MM_ASSIGN_OR_RETURN(node, parse_call(std::move(node)));
            } else {
                break;
            }
        }
        return node;
    }

    StatusOr<ExprPtr> parse_primary() {
        const Tok& t = cur();
        auto lit = [&](Value v) {
            auto e = std::make_unique<Expr>(Expr::kLiteral, t.line);
            e->literal = std::move(v);
            return e;
        };
        switch (t.t) {
            case Tok::kName: {
                ++pos_;
                if (t.s == "true" || t.s == "True") return ExprPtr(lit(Value::boolean(true)));
                if (t.s == "false" || t.s == "False") return ExprPtr(lit(Value::boolean(false)));
                if (t.s == "none" || t.s == "None") return ExprPtr(lit(Value::none()));
                if (!macro_reads_.empty() && t.s == "varargs") macro_reads_.back().first = true;
                if (!macro_reads_.empty() && t.s == "kwargs") macro_reads_.back().second = true;
                auto e = std::make_unique<Expr>(Expr::kName, t.line);
                e->name = t.s;
                return ExprPtr(std::move(e));
            }
            case Tok::kString: {
                std::string s;
                const int line = t.line;
                while (cur().t == Tok::kString) s += toks_[pos_++].s;  // adjacent literals concatenate
                auto e = std::make_unique<Expr>(Expr::kLiteral, line);
                e->literal = Value::string(std::move(s));
                return ExprPtr(std::move(e));
            }
            case Tok::kInt: ++pos_; return ExprPtr(lit(Value::integer(t.i)));
            case Tok::kFloat: ++pos_; return ExprPtr(lit(Value::number(t.f)));
            case Tok::kOp:
                if (t.s == "(") {
                    ++pos_;
                    if (is_op(")")) {
                        ++pos_;
                        return ExprPtr(std::make_unique<Expr>(Expr::kTuple, t.line));
                    }
                    MM_ASSIGN_OR_RETURN(ExprPtr inner, parse_expression(true));
                    if (is_op(",")) {
                        auto tup = std::make_unique<Expr>(Expr::kTuple, t.line);
                        tup->items.push_back(std::move(inner));
                        while (is_op(",")) {
                            ++pos_;
                            if (is_op(")")) break;
                            MM_ASSIGN_OR_RETURN(ExprPtr x, parse_expression(true));
                            tup->items.push_back(std::move(x));
                        }
                        inner = std::move(tup);
                    }
                    MM_RETURN_IF_ERROR(expect_op(")"));
                    return inner;
                }
                if (t.s == "[") {
                    ++pos_;
                    auto e = std::make_unique<Expr>(Expr::kList, t.line);
                    while (!is_op("]")) {
                        MM_ASSIGN_OR_RETURN(ExprPtr x, parse_expression(true));
                        e->items.push_back(std::move(x));
                        if (!is_op(",")) break;
                        ++pos_;
                    }
                    MM_RETURN_IF_ERROR(expect_op("]"));
                    return ExprPtr(std::move(e));
                }
                if (t.s == "{") {
                    ++pos_;
                    auto e = std::make_unique<Expr>(Expr::kDict, t.line);
                    while (!is_op("}")) {
                        MM_ASSIGN_OR_RETURN(ExprPtr k, parse_expression(true));
                        MM_RETURN_IF_ERROR(expect_op(":"));
                        MM_ASSIGN_OR_RETURN(ExprPtr v, parse_expression(true));
                        e->items.push_back(std::move(k));
                        e->items.push_back(std::move(v));
                        if (!is_op(",")) break;
                        ++pos_;
                    }
                    MM_RETURN_IF_ERROR(expect_op("}"));
                    return ExprPtr(std::move(e));
                }
                break;
            default: break;
        }
        return err("expected an expression, got " + describe(t));
    }

    StatusOr<ExprPtr> parse_postfix(ExprPtr node) {
        while (true) {
            if (is_op(".")) {
                ++pos_;
                auto e = std::make_unique<Expr>(Expr::kAttr, cur().line);
                if (cur().t == Tok::kName) {
                    e->name = cur().s;
                } else if (cur().t == Tok::kInt) {  // foo.0 is foo[0]
                    e->kind = Expr::kItem;
                    e->b = std::make_unique<Expr>(Expr::kLiteral, cur().line);
                    e->b->literal = Value::integer(cur().i);
                } else {
                    return err("expected an attribute name after '.', got " + describe(cur()));
                }
                ++pos_;
                e->a = std::move(node);
                node = std::move(e);
            } else if (is_op("[")) {
                const int line = cur().line;
                ++pos_;
                ExprPtr parts[3];
                bool slice = false;
                for (int k = 0; k < 3; ++k) {
                    if (!is_op(":") && !is_op("]")) {
                        MM_ASSIGN_OR_RETURN(parts[k], parse_expression(true));
                    }
                    if (!is_op(":") || k == 2) break;
                    slice = true;
                    ++pos_;
                }
                MM_RETURN_IF_ERROR(expect_op("]"));
                auto e = std::make_unique<Expr>(slice ? Expr::kSlice : Expr::kItem, line);
                if (!slice && !parts[0]) return err("empty subscript '[]'");
                e->a = std::move(node);
                e->b = std::move(parts[0]);
                e->c = std::move(parts[1]);
                e->d = std::move(parts[2]);
                node = std::move(e);
            } else if (is_op("(")) {
                MM_ASSIGN_OR_RETURN(node, parse_call(std::move(node)));
            } else {
                return node;
            }
        }
    }

    // Arguments of a call, filter or test: `(a, b, key=c)`.
    Status parse_args(Expr* e) {
        MM_RETURN_IF_ERROR(expect_op("("));
        while (!is_op(")")) {
            if (cur().t == Tok::kName && peek().t == Tok::kOp && peek().s == "=") {
                e->kw_names.push_back(cur().s);
                pos_ += 2;
            } else if (!e->kw_names.empty()) {
                return err("a positional argument after a keyword argument");
            } else if (is_op("*") || is_op("**")) {
                return err("*args and **kwargs are not supported");
            }
            MM_ASSIGN_OR_RETURN(ExprPtr x, parse_expression(true));
            e->items.push_back(std::move(x));
            if (!is_op(",")) break;
            ++pos_;
        }
        return expect_op(")");
    }

    StatusOr<ExprPtr> parse_call(ExprPtr callee) {
        auto e = std::make_unique<Expr>(Expr::kCall, cur().line);
        e->a = std::move(callee);
        MM_RETURN_IF_ERROR(parse_args(e.get()));
        return ExprPtr(std::move(e));
    }

    StatusOr<ExprPtr> parse_filter(ExprPtr node) {
        ++pos_;  // '|'
        auto e = std::make_unique<Expr>(Expr::kFilter, cur().line);
        MM_ASSIGN_OR_RETURN(e->name, expect_name());
        while (is_op(".")) {  // dotted filter names
            ++pos_;
            MM_ASSIGN_OR_RETURN(std::string n, expect_name());
            e->name += "." + n;
        }
        e->a = std::move(node);
        if (is_op("(")) MM_RETURN_IF_ERROR(parse_args(e.get()));
        return ExprPtr(std::move(e));
    }

    StatusOr<ExprPtr> parse_test(ExprPtr node) {
        ++pos_;  // 'is'
        auto e = std::make_unique<Expr>(Expr::kTest, cur().line);
        if (is_name("not")) {
            e->negated = true;
            ++pos_;
        }
        MM_ASSIGN_OR_RETURN(e->name, expect_name());
        e->a = std::move(node);
        if (is_op("(")) {
            MM_RETURN_IF_ERROR(parse_args(e.get()));
        } else if ((cur().t == Tok::kName || cur().t == Tok::kString || cur().t == Tok::kInt ||
                    cur().t == Tok::kFloat || is_op("[") || is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and") && !is_name("if") && !is_name("in") &&
                   !is_name("not") && !is_name("is")) {
            // `x is divisibleby 3`, `x is sameas none`: one argument without parentheses
            MM_ASSIGN_OR_RETURN(ExprPtr arg, parse_primary());
            MM_ASSIGN_OR_RETURN(arg, parse_postfix(std::move(arg)));
            e->items.push_back(std::move(arg));
        }
        return ExprPtr(std::move(e));
    }

    std::vector<Tok> toks_;
    const std::string& name_;
    size_t pos_ = 0;
    int depth_ = 0;
    int loop_depth_ = 0;  // break/continue only inside a for body (a macro body resets it)
    std::vector<std::pair<bool, bool>> macro_reads_;  // per macro being parsed: reads varargs, kwargs
};

}  // namespace

StatusOr<Template> Template::parse(std::string_view source, std::string name) {
    MM_ASSIGN_OR_RETURN(std::vector<Tok> toks, lex(source, name));
    Parser parser(std::move(toks), name);
    MM_ASSIGN_OR_RETURN(Body body, parser.parse_template());
    auto impl = std::make_shared<Impl>();
    impl->name = std::move(name);
    impl->body = std::move(body);
    return Template(std::move(impl));
}

}  // namespace moemesh::jinja
