// Grammar-constrained generation: a context-free grammar in llama.cpp's GBNF text format
// (common/gbnf.cpp parses it), an incremental matcher over UTF-8 bytes, and the token-level
// constraint the sampler applies (which vocabulary entries may come next).
//
// The matcher is the pushdown design llama.cpp's llama-grammar uses: the state is a set of stacks
// of grammar positions; a code point advances every stack whose top is a character class that
// holds it; rule references expand into one stack per alternative. A reference in the last place
// of an alternative replaces its caller's frame (a tail call), so right recursion (`x ::= "a" x |`,
// every `*` and `+`) runs in constant stack depth. Left recursion would never stop expanding and
// is refused when the grammar is built, with the rule named.
//
// Tokens carry bytes, not code points: a token may end inside a UTF-8 sequence (byte-level BPE does
// that), so the matcher keeps the pending bytes and accepts such a token only when some character
// class still admits a code point that starts with them.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/status.h"

namespace moemesh {

class Tokenizer;

class Grammar {
public:
    // Parses GBNF text (llama.cpp's: `name ::= alternatives`, "literals", [classes], [^negated],
    // `.`, groups, `* + ? {m} {m,} {m,n}`, # comments); `root` names the start rule. Errors name the
    // line and what is wrong; undefined and left-recursive rules are errors too.
    static StatusOr<std::shared_ptr<const Grammar>> parse(std::string_view gbnf, const std::string& root = "root");

    // The compiled form. Each alternative of each rule is a run of elements in `elems` ended by a
    // kEnd element; a matcher position is an index into `elems`.
    struct Elem {
        enum Kind : uint8_t { kEnd, kRef, kChars } kind = kEnd;
        bool negated = false;      // kChars: any code point outside the ranges
        uint32_t rule = 0;         // kRef: the rule referred to
        uint32_t r0 = 0, r1 = 0;   // kChars: ranges[r0, r1), inclusive code point bounds
    };
    const std::vector<Elem>& elems() const { return elems_; }
    const std::vector<uint32_t>& alternatives(uint32_t rule) const { return alts_[rule]; }
    uint32_t root() const { return root_; }
    size_t num_rules() const { return alts_.size(); }
    const std::string& rule_name(uint32_t rule) const { return names_[rule]; }
    bool holds(const Elem& e, uint32_t cp) const;  // a kChars element admits code point cp
    // Some code point in [lo, hi] is admitted (a partial UTF-8 sequence's possible completions).
    bool may_hold(const Elem& e, uint32_t lo, uint32_t hi) const;

    // Building (used by the GBNF parser): rules are declared by name, then given alternatives; an
    // alternative is a list of items, each a character class or a rule reference.
    struct Item {
        bool is_ref = false;
        bool negated = false;
        uint32_t rule = 0;
        std::vector<std::pair<uint32_t, uint32_t>> ranges;
    };
    using Alternative = std::vector<Item>;
    class Builder {
    public:
        uint32_t declare(const std::string& name);  // the rule's id (existing or new)
        uint32_t fresh(const std::string& base);    // a new rule with an unused name derived from base
        void add_alternative(uint32_t rule, Alternative alt);
        bool defined(uint32_t rule) const { return !alts_[rule].empty(); }
        size_t num_rules() const { return names_.size(); }
        // Checks (every referenced rule defined, the root exists, no left recursion) and compiles.
        StatusOr<std::shared_ptr<const Grammar>> build(const std::string& root) &&;

    private:
        std::vector<std::string> names_;
        std::unordered_map<std::string, uint32_t> ids_;
        std::vector<std::vector<Alternative>> alts_;
    };

private:
    std::vector<Elem> elems_;
    std::vector<std::pair<uint32_t, uint32_t>> ranges_;
    std::vector<std::vector<uint32_t>> alts_;  // rule → first element of each alternative
    std::vector<std::string> names_;
    uint32_t root_ = 0;
};

// Incremental matching of bytes against a grammar.
class GrammarMatcher {
public:
    explicit GrammarMatcher(std::shared_ptr<const Grammar> g);
    // Advances over `bytes`; false (and the state unchanged) if they cannot continue a sentence.
    bool accept(std::string_view bytes);
    bool can_end() const;  // the bytes so far are a complete sentence
    bool dead() const { return state_.stacks.empty(); }

    // The matcher state, exposed for TokenConstraint's vocabulary walk.
    using Stack = std::vector<uint32_t>;
    struct State {
        std::vector<Stack> stacks;  // an empty stack: the sentence may end here
        uint32_t partial = 0;       // bits of a UTF-8 sequence begun but not finished
        int partial_left = 0;       // its continuation bytes still to come
        int partial_len = 0;        // its length in bytes (overlong encodings are refused)
    };
    // One byte; false if it cannot continue (`out` is then unspecified). Expansion is bounded
    // (kMaxStacks stacks, kMaxExpandSteps steps): past that the byte is refused rather than the
    // process stalled by a pathologically ambiguous grammar.
    bool step(const State& in, uint8_t byte, State* out) const;
    const State& state() const { return state_; }
    void set_state(State s) { state_ = std::move(s); }
    static constexpr size_t kMaxStacks = 4096;
    static constexpr size_t kMaxExpandSteps = 1u << 20;  // per code point

private:
    bool expand(Stack s, std::vector<Stack>* out, size_t* steps) const;
    bool advance(const State& in, uint32_t cp, State* out) const;
    std::shared_ptr<const Grammar> g_;
    State state_;
};

// Whole-text check: `text` is a complete sentence of `g`.
bool grammar_matches(const std::shared_ptr<const Grammar>& g, std::string_view text);

// The vocabulary as the constraint sees it, built once per tokenizer: each token's bytes, whether
// it ends generation, and the text tokens sorted by bytes (with the prefix each shares with the
// previous one) so a walk over them matches each shared prefix once.
struct GrammarVocab {
    explicit GrammarVocab(const Tokenizer& tok);
    enum Kind : uint8_t { kText, kEnd, kNever };  // kEnd: end of generation; kNever: control / empty
    std::vector<std::string> pieces;
    std::vector<uint8_t> kinds;
    std::vector<int32_t> sorted;   // kText ids by piece bytes
    std::vector<uint32_t> shared;  // shared[i]: common prefix of sorted[i]'s and sorted[i-1]'s pieces
};

// Which tokens may come next under a grammar, for one generation. End-of-generation tokens are
// allowed only where the grammar's sentence may end; control tokens and tokens without text never.
class TokenConstraint {
public:
    TokenConstraint(std::shared_ptr<const Grammar> g, std::shared_ptr<const GrammarVocab> vocab);
    bool allows(int32_t id) const;
    // Takes a generated token; false (state unchanged) if the grammar does not allow it.
    bool accept(int32_t id);
    // Sets the logit of every token the grammar does not allow to -infinity; returns how many stay.
    int64_t mask(float* logits, int64_t n_vocab) const;
    bool can_end() const { return m_.can_end(); }

private:
    GrammarMatcher m_;
    std::shared_ptr<const GrammarVocab> vocab_;
};

}  // namespace moemesh
