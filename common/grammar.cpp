#include "common/grammar.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <unordered_map>

#include "common/tokenizer.h"

namespace moemesh {

// ---- building ----

uint32_t Grammar::Builder::declare(const std::string& name) {
    auto [it, added] = ids_.emplace(name, static_cast<uint32_t>(names_.size()));
    if (added) {
        names_.push_back(name);
        alts_.emplace_back();
    }
    return it->second;
}

uint32_t Grammar::Builder::fresh(const std::string& base) {
    for (size_t k = names_.size();; ++k) {
        const std::string name = base + "_" + std::to_string(k);
        if (!ids_.count(name)) return declare(name);
    }
}

void Grammar::Builder::add_alternative(uint32_t rule, Alternative alt) { alts_[rule].push_back(std::move(alt)); }

StatusOr<std::shared_ptr<const Grammar>> Grammar::Builder::build(const std::string& root) && {
    const size_t n = names_.size();
    const auto found = ids_.find(root);
    const uint32_t root_id = found == ids_.end() ? static_cast<uint32_t>(n) : found->second;
    if (root_id == n) return MM_ERROR("the grammar has no rule '%s' (its start rule)", root.c_str());
    for (size_t i = 0; i < n; ++i)
        if (alts_[i].empty()) return MM_ERROR("rule '%s' is used but not defined", names_[i].c_str());
    // Left recursion: a rule that can reach itself without consuming a character (through rules
    // that can match nothing) would make the matcher expand forever.
    std::vector<uint8_t> nullable(n, 0);
    for (bool changed = true; changed;) {
        changed = false;
        for (size_t r = 0; r < n; ++r) {
            if (nullable[r]) continue;
            for (const Alternative& alt : alts_[r]) {
                bool all = true;
                for (const Item& it : alt) all = all && it.is_ref && nullable[it.rule];
                if (all) {
                    nullable[r] = changed = true;
                    break;
                }
            }
        }
    }
    std::vector<std::vector<uint32_t>> first(n);  // rules an alternative may start with
    for (size_t r = 0; r < n; ++r)
        for (const Alternative& alt : alts_[r])
            for (const Item& it : alt) {
                if (!it.is_ref) break;
                first[r].push_back(it.rule);
                if (!nullable[it.rule]) break;
            }
    std::vector<uint8_t> color(n, 0);  // 0 unseen, 1 on the path, 2 done
    std::vector<std::pair<uint32_t, size_t>> path;
    for (uint32_t start = 0; start < n; ++start) {
        if (color[start]) continue;
        path.assign(1, {start, 0});
        color[start] = 1;
        while (!path.empty()) {
            auto& [r, next] = path.back();
            if (next == first[r].size()) {
                color[r] = 2;
                path.pop_back();
                continue;
            }
            const uint32_t to = first[r][next++];
            if (color[to] == 1)
                return MM_ERROR("rule '%s' is left-recursive (it can reach itself before matching a character, "
                                "e.g. through an empty repetition); rewrite it right-recursively",
                                names_[to].c_str());
            if (color[to] == 0) {
                color[to] = 1;
                path.push_back({to, 0});
            }
        }
    }
    auto g = std::make_shared<Grammar>();
    g->names_ = std::move(names_);
    g->root_ = root_id;
    g->alts_.resize(n);
    for (size_t r = 0; r < n; ++r) {
        for (const Alternative& alt : alts_[r]) {
            g->alts_[r].push_back(static_cast<uint32_t>(g->elems_.size()));
            for (const Item& it : alt) {
                Elem e;
                if (it.is_ref) {
                    e.kind = Elem::kRef;
                    e.rule = it.rule;
                } else {
                    e.kind = Elem::kChars;
                    e.negated = it.negated;
                    e.r0 = static_cast<uint32_t>(g->ranges_.size());
                    g->ranges_.insert(g->ranges_.end(), it.ranges.begin(), it.ranges.end());
                    e.r1 = static_cast<uint32_t>(g->ranges_.size());
                }
                g->elems_.push_back(e);
            }
            g->elems_.push_back(Elem{});  // kEnd
        }
    }
    return std::shared_ptr<const Grammar>(std::move(g));
}

bool Grammar::holds(const Elem& e, uint32_t cp) const {
    bool in = false;
    for (uint32_t i = e.r0; i < e.r1 && !in; ++i) in = ranges_[i].first <= cp && cp <= ranges_[i].second;
    return in != e.negated;
}

bool Grammar::may_hold(const Elem& e, uint32_t lo, uint32_t hi) const {
    if (!e.negated) {
        for (uint32_t i = e.r0; i < e.r1; ++i)
            if (ranges_[i].first <= hi && lo <= ranges_[i].second) return true;
        return false;
    }
    // Negated: some code point of [lo, hi] lies outside every range. Walk up from lo past ranges
    // that cover it (few ranges: quadratic is fine).
    uint64_t cp = lo;
    for (bool moved = true; moved && cp <= hi;) {
        moved = false;
        for (uint32_t i = e.r0; i < e.r1; ++i)
            if (ranges_[i].first <= cp && cp <= ranges_[i].second) {
                cp = static_cast<uint64_t>(ranges_[i].second) + 1;
                moved = true;
            }
    }
    return cp <= hi;
}

// ---- matching ----

GrammarMatcher::GrammarMatcher(std::shared_ptr<const Grammar> g) : g_(std::move(g)) {
    size_t steps = 0;
    for (uint32_t alt : g_->alternatives(g_->root()))
        if (!expand(Stack{alt}, &state_.stacks, &steps)) state_.stacks.clear();
    std::sort(state_.stacks.begin(), state_.stacks.end());
    state_.stacks.erase(std::unique(state_.stacks.begin(), state_.stacks.end()), state_.stacks.end());
}

// Moves the stack's top to the next character class it must match, producing one stack per way
// (alternatives of the rules on the way); an empty stack means the sentence may end. Iterative
// (a chain of rules as deep as a hostile grammar likes cannot overflow the thread's stack), and
// bounded: false when the expansion passes kMaxStacks stacks or kMaxExpandSteps steps (a grammar
// ambiguous enough for that is refused at this byte rather than stalling the process).
bool GrammarMatcher::expand(Stack s, std::vector<Stack>* out, size_t* steps) const {
    const std::vector<Grammar::Elem>& elems = g_->elems();
    std::vector<Stack> work;
    work.push_back(std::move(s));
    while (!work.empty()) {
        Stack cur = std::move(work.back());
        work.pop_back();
        for (;;) {
            if (out->size() > kMaxStacks || ++*steps > kMaxExpandSteps) return false;
            if (cur.empty() || elems[cur.back()].kind == Grammar::Elem::kChars) {
                out->push_back(std::move(cur));
                break;
            }
            const uint32_t pos = cur.back();
            cur.pop_back();
            if (elems[pos].kind == Grammar::Elem::kEnd) continue;  // back to the caller's next element
            if (elems[pos + 1].kind != Grammar::Elem::kEnd) cur.push_back(pos + 1);  // else a tail call
            const std::vector<uint32_t>& alts = g_->alternatives(elems[pos].rule);
            for (size_t i = 0; i + 1 < alts.size(); ++i) {
                Stack c = cur;
                c.push_back(alts[i]);
                work.push_back(std::move(c));
            }
            cur.push_back(alts.back());
        }
    }
    return true;
}

bool GrammarMatcher::advance(const State& in, uint32_t cp, State* out) const {
    out->stacks.clear();
    out->partial = 0;
    out->partial_left = 0;
    out->partial_len = 0;
    size_t steps = 0;
    for (const Stack& s : in.stacks) {
        if (s.empty() || !g_->holds(g_->elems()[s.back()], cp)) continue;
        Stack next = s;
        ++next.back();
        if (!expand(std::move(next), &out->stacks, &steps)) {
            out->stacks.clear();
            return false;
        }
    }
    std::sort(out->stacks.begin(), out->stacks.end());
    out->stacks.erase(std::unique(out->stacks.begin(), out->stacks.end()), out->stacks.end());
    return !out->stacks.empty();
}

bool GrammarMatcher::step(const State& in, uint8_t b, State* out) const {
    uint32_t value = 0;
    int left = 0, len = in.partial_len;
    if (in.partial_left == 0) {
        if (b < 0x80) return advance(in, b, out);
        if ((b & 0xE0) == 0xC0) {
            value = b & 0x1Fu, left = 1;
        } else if ((b & 0xF0) == 0xE0) {
            value = b & 0x0Fu, left = 2;
        } else if ((b & 0xF8) == 0xF0) {
            value = b & 0x07u, left = 3;
        } else {
            return false;  // a continuation byte with nothing to continue, or not UTF-8 at all
        }
        len = left + 1;
    } else {
        if ((b & 0xC0) != 0x80) return false;
        value = (in.partial << 6) | (b & 0x3Fu);
        left = in.partial_left - 1;
    }
    // The code points this sequence can still become: [lo, hi], without overlong forms (a 2-byte
    // "a" would slip past a class that refuses it), surrogates or values beyond Unicode.
    static constexpr uint32_t kMinForLength[5] = {0, 0, 0x80, 0x800, 0x10000};
    const int bits = 6 * left;
    const uint32_t lo = std::max(value << bits, kMinForLength[len]);
    const uint32_t hi = std::min((value << bits) | ((1u << bits) - 1), 0x10FFFFu);
    if (lo > hi) return false;
    if (left == 0) return (lo < 0xD800 || lo > 0xDFFF) && advance(in, value, out);
    bool possible = false;
    for (const Stack& s : in.stacks)
        possible = possible || (!s.empty() && g_->may_hold(g_->elems()[s.back()], lo, hi));
    if (!possible) return false;
    out->stacks = in.stacks;
    out->partial = value;
    out->partial_left = left;
    out->partial_len = len;
    return true;
}

bool GrammarMatcher::accept(std::string_view bytes) {
    State cur = state_, next;
    for (char c : bytes) {
        if (!step(cur, static_cast<uint8_t>(c), &next)) return false;
        std::swap(cur, next);
    }
    state_ = std::move(cur);
    return true;
}

bool GrammarMatcher::can_end() const {
    if (state_.partial_left != 0) return false;
    for (const Stack& s : state_.stacks)
        if (s.empty()) return true;
    return false;
}

bool grammar_matches(const std::shared_ptr<const Grammar>& g, std::string_view text) {
    GrammarMatcher m(g);
    return m.accept(text) && m.can_end();
}

// ---- tokens ----

GrammarVocab::GrammarVocab(const Tokenizer& tok) {
    const int32_t n = tok.vocab_size();
    pieces.resize(static_cast<size_t>(n));
    kinds.resize(static_cast<size_t>(n));
    for (int32_t id = 0; id < n; ++id) {
        pieces[id] = tok.token_to_piece(id);
        kinds[id] = tok.is_eog(id) ? kEnd : (tok.is_control(id) || pieces[id].empty()) ? kNever : kText;
        if (kinds[id] == kText) sorted.push_back(id);
    }
    std::sort(sorted.begin(), sorted.end(), [&](int32_t a, int32_t b) { return pieces[a] < pieces[b]; });
    shared.assign(sorted.size(), 0);
    for (size_t i = 1; i < sorted.size(); ++i) {
        const std::string &a = pieces[sorted[i - 1]], &b = pieces[sorted[i]];
        const size_t m = std::min(a.size(), b.size());
        size_t k = 0;
        while (k < m && a[k] == b[k]) ++k;
        shared[i] = static_cast<uint32_t>(k);
    }
}

TokenConstraint::TokenConstraint(std::shared_ptr<const Grammar> g, std::shared_ptr<const GrammarVocab> vocab)
    : m_(std::move(g)), vocab_(std::move(vocab)) {}

bool TokenConstraint::allows(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= vocab_->pieces.size()) return false;
    if (vocab_->kinds[id] == GrammarVocab::kEnd) return m_.can_end();
    if (vocab_->kinds[id] == GrammarVocab::kNever) return false;
    GrammarMatcher::State cur = m_.state(), next;
    for (char c : vocab_->pieces[id]) {
        if (!m_.step(cur, static_cast<uint8_t>(c), &next)) return false;
        std::swap(cur, next);
    }
    return true;
}

bool TokenConstraint::accept(int32_t id) {
    if (!allows(id)) return false;
    if (vocab_->kinds[id] == GrammarVocab::kText) return m_.accept(vocab_->pieces[id]);
    return true;  // the end: nothing follows
}

namespace {

// The matcher states one mask() walk meets, each stored once, and the steps between them
// remembered: grammars revisit a handful of states (inside a string, every letter leads back to
// the same one), so most of the walk's steps become one hash lookup instead of a matcher step.
class StateCache {
public:
    explicit StateCache(const GrammarMatcher& m) : m_(m) {}
    int intern(GrammarMatcher::State s) {
        std::string key;
        key.reserve(16);
        auto put = [&key](uint32_t x) { key.append(reinterpret_cast<const char*>(&x), sizeof(x)); };
        put(s.partial), put(static_cast<uint32_t>(s.partial_left)), put(static_cast<uint32_t>(s.partial_len));
        for (const GrammarMatcher::Stack& st : s.stacks) {
            put(static_cast<uint32_t>(st.size()));
            for (uint32_t x : st) put(x);
        }
        auto [it, added] = ids_.emplace(std::move(key), static_cast<int>(pool_.size()));
        if (added) pool_.push_back(std::move(s));
        return it->second;
    }
    // The state after one more byte; -1 if the byte cannot continue.
    int step(int from, uint8_t b) {
        const uint64_t t = (static_cast<uint64_t>(from) << 8) | b;
        if (auto it = steps_.find(t); it != steps_.end()) return it->second;
        GrammarMatcher::State out;
        const int to = m_.step(pool_[static_cast<size_t>(from)], b, &out) ? intern(std::move(out)) : -1;
        steps_.emplace(t, to);
        return to;
    }

private:
    const GrammarMatcher& m_;
    std::vector<GrammarMatcher::State> pool_;
    std::unordered_map<std::string, int> ids_;
    std::unordered_map<uint64_t, int> steps_;
};

}  // namespace

int64_t TokenConstraint::mask(float* logits, int64_t n_vocab) const {
    const GrammarVocab& v = *vocab_;
    const float kOff = -std::numeric_limits<float>::infinity();
    std::vector<uint8_t> ok(static_cast<size_t>(n_vocab), 0);
    // Sorted pieces share prefixes with their neighbours: at[d] is the state after the first d
    // bytes of the current piece, valid for d <= valid; a prefix of length `dead` matches nothing,
    // so every following piece that shares it is refused without a step.
    StateCache cache(m_);
    std::vector<int> at(1, cache.intern(m_.state()));
    size_t valid = 0, dead = SIZE_MAX;
    for (size_t i = 0; i < v.sorted.size(); ++i) {
        const int32_t id = v.sorted[i];
        const std::string& p = v.pieces[id];
        valid = std::min<size_t>(valid, v.shared[i]);
        if (dead <= v.shared[i]) continue;
        dead = SIZE_MAX;
        bool alive = true;
        for (size_t d = valid; d < p.size(); ++d) {
            if (at.size() < d + 2) at.resize(d + 2);
            at[d + 1] = cache.step(at[d], static_cast<uint8_t>(p[d]));
            if (at[d + 1] < 0) {
                dead = d + 1;
                alive = false;
                break;
            }
            valid = d + 1;
        }
        if (alive && id < n_vocab) ok[id] = 1;
    }
    const bool end = m_.can_end();
    int64_t kept = 0;
    for (int64_t id = 0; id < n_vocab; ++id) {
        const bool allowed = static_cast<size_t>(id) < v.kinds.size() &&
                             (v.kinds[id] == GrammarVocab::kEnd ? end : ok[id] != 0);
        if (allowed) {
            ++kept;
        } else {
            logits[id] = kOff;
        }
    }
    return kept;
}

}  // namespace moemesh
