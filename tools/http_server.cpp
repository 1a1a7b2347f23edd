#include "tools/http_server.h"

#include <httplib.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <deque>
#include <functional>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/chat_reply.h"
#include "common/tokenizer_unicode.h"

namespace moemesh {

using json = nlohmann::json;

namespace {

// A generated token's log-probabilities (request "logprobs") and where its text lies in the
// request's text: [start, end) bytes.
struct GenLogprob {
    TokenLogprobs lp;
    size_t start = 0, end = 0;
};

struct GenResult {
    std::string text;
    std::vector<GenLogprob> logprobs;  // one per generated token whose text is (partly) in `text`
    int64_t prompt_tokens = 0, completion_tokens = 0;
    int64_t cached_tokens = 0;  // prompt tokens whose state came from an earlier request (prompt cache)
    std::string finish = "length";  // "stop" | "length"
    double prompt_s = 0, decode_s = 0;
};

volatile sig_atomic_t g_stop_signal = 0;

// Generated text can hold bytes that are not UTF-8 (a byte-level token cut mid-character, or a
// model's odd output): JSON gets U+FFFD for them instead of an exception.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json error_json(const std::string& message, const char* type) {
    return {{"error", {{"message", message}, {"type", type}, {"code", nullptr}}}};
}

}  // namespace

struct HttpServer::Impl {
    Model& model;
    const Tokenizer& tok;
    HttpServerOptions opts;
    httplib::Server svr;
    // Every model call runs on one thread, the one in HttpServer::run() (the thread that loaded the
    // model, in serve_http): the CUDA backend keeps per-thread state and its device is per-thread, so
    // httplib's handler threads hand their requests over and wait (see "continuous batching" below).

    Impl(Model& m, const Tokenizer& t, HttpServerOptions o) : model(m), tok(t), opts(std::move(o)) {
        if (!opts.chat) {
            std::string warning;
            StatusOr<ChatFormatter> f = chat_formatter_for(tok, "", &warning);
            if (!warning.empty()) std::fprintf(stderr, "http: warning: %s\n", warning.c_str());
            if (f.ok()) opts.chat = std::make_shared<const ChatFormatter>(std::move(f).value());
        }
        opts.limits.chat = opts.chat.get();
        if (opts.log_requests && opts.chat)
            std::fprintf(stderr, "http: /v1/chat/completions formats conversations with %s\n", opts.chat->name().c_str());
    }

    // How a chat reply is read back into content / reasoning_content / tool_calls.
    static ReplyFormat reply_format(const GenRequest& rq, const std::string& id) {
        ReplyFormat f;
        f.starts_in_think = rq.reply_in_think;
        f.parse_tools = rq.parse_tools;
        f.tools = &rq.tools;
        f.id_prefix = "call_" + id.substr(id.find('-') + 1) + "_";
        return f;
    }
    static bool parse_reply(const GenRequest& rq) { return rq.parse_reasoning || rq.parse_tools; }

    static json tool_calls_json(const std::vector<ToolCall>& calls, bool with_index) {
        json out = json::array();
        for (size_t k = 0; k < calls.size(); ++k) {
            json c = {{"id", calls[k].id},
                      {"type", "function"},
                      {"function", {{"name", calls[k].name},
                                    {"arguments", calls[k].arguments.dump(-1, ' ', false,
                                                                          nlohmann::ordered_json::error_handler_t::replace)}}}};
            if (with_index) c["index"] = k;
            out.push_back(std::move(c));
        }
        return out;
    }

    // The request's prompt tokens and generation length, checked against the context: errors here
    // are the client's (400), found before any stream starts. Runs on the handler thread (the
    // tokenizer is thread-safe).
    struct Prepared {
        std::vector<int32_t> input;
        int64_t max_new = 0;
    };
    StatusOr<Prepared> prepare(const GenRequest& rq) const {
        Prepared p;
        p.input = rq.tokens;
        if (p.input.empty()) {
            p.input = tok.encode(rq.prompt, /*parse_special=*/true);
            if (tok.add_bos() && tok.bos_id() >= 0) p.input.insert(p.input.begin(), tok.bos_id());
        }
        if (p.input.empty()) return MM_ERROR("the prompt encodes to no tokens");
        const int64_t n_ctx = opts.limits.n_ctx, n_in = static_cast<int64_t>(p.input.size());
        if (n_in >= n_ctx)
            return MM_ERROR("the prompt has %lld tokens; the context holds %lld (the server's --ctx)",
                            static_cast<long long>(n_in), static_cast<long long>(n_ctx));
        p.max_new = rq.max_tokens < 0 ? n_ctx - n_in : rq.max_tokens;
        if (n_in + p.max_new > n_ctx)
            return MM_ERROR("the prompt (%lld tokens) + max_tokens %lld exceeds the context size %lld",
                            static_cast<long long>(n_in), static_cast<long long>(p.max_new),
                            static_cast<long long>(n_ctx));
        return p;
    }

    // ---- continuous batching ----
    // Every model call runs on one thread, the one in HttpServer::run(). Requests wait in `pending`
    // until a slot is free (opts.max_parallel). An admitted request's prompt runs in chunks of
    // opts.prompt_chunk tokens, or 64 inside each decode step while others decode, so that running
    // requests keep generating while a long prompt is read; then it joins the decode batch: one
    // Model::forward_batch step generates one token for every decoding request. Each request's
    // logits are those it would get alone (forward() cuts prompts at the same n_batch boundaries;
    // forward_batch gives each sequence its own logits), so its text does not depend on what else runs.
    struct Slot {
        const GenRequest* rq = nullptr;
        const Prepared* pr = nullptr;
        bool stream = false;  // text is handed to the request's handler thread as it becomes final
        GenResult* res = nullptr;
        // The model thread hands text and the end of the request to the handler thread here; the
        // handler thread writes to the client, so a client that reads slowly (its socket buffers
        // full) holds up only its own request, never the decode steps of the others.
        std::mutex out_mu;
        std::condition_variable out_cv;
        std::string out;       // text not yet taken by the handler
        std::vector<GenLogprob> out_lp;  // and the log-probabilities of its tokens
        bool over = false;     // finish() ran: `status` is final and the slot belongs to the handler
        Status status;
        std::atomic<bool> gone{false};  // the handler could not write: the client is gone
        std::unique_ptr<SequenceState> seq;
        std::unique_ptr<Sampler> sampler;
        std::unique_ptr<TokenConstraint> constraint;  // the request's grammar, if any
        size_t hold = 0;  // bytes a stop string could still complete: kept back from the stream
        size_t sent = 0;
        size_t lp_sent = 0;  // res->logprobs handed to the handler
        int64_t prefilled = 0;  // prompt tokens already run (or taken from the prompt cache)
        int32_t next = -1;      // the token the next decode step feeds
        std::vector<int32_t> fed;  // every token the sequence holds, for the prompt cache
        // Recurrent models: the state when the prompt ended (the prompt cache can continue from it).
        std::unique_ptr<SequenceState> snap;
        int64_t snap_at = 0;
        bool admitted = false;     // counted in `busy`
        std::chrono::steady_clock::time_point t_prompt, t_decode;
    };
    std::mutex jobs_mu;
    std::condition_variable jobs_cv;
    std::deque<Slot*> pending;
    bool stopping = false;
    std::atomic<bool> abort_generation{false};
    std::atomic<uint64_t> next_id{1};
    // For /health: requests decoding now, decode steps run, tokens they made, the largest batch.
    // Also prompt tokens that ran inside decode steps.
    std::atomic<int64_t> busy{0}, decode_steps{0}, decode_tokens{0}, max_batch{0}, mixed_prompt_tokens{0};

    // Hands text[sent, upto) and the log-probabilities of the tokens whose text ends there to the
    // handler thread (streams only); false when the client is gone.
    static bool flush(Slot& s, size_t upto) {
        if (!s.stream) return true;
        const std::vector<GenLogprob>& lps = s.res->logprobs;
        size_t lp_upto = s.lp_sent;
        while (lp_upto < lps.size() && lps[lp_upto].end <= upto) ++lp_upto;
        if (upto <= s.sent && lp_upto == s.lp_sent) return true;
        {
            std::lock_guard<std::mutex> lock(s.out_mu);
            if (upto > s.sent) s.out.append(s.res->text, s.sent, upto - s.sent);
            s.out_lp.insert(s.out_lp.end(), lps.begin() + static_cast<std::ptrdiff_t>(s.lp_sent),
                            lps.begin() + static_cast<std::ptrdiff_t>(lp_upto));
            s.out_cv.notify_one();
        }
        s.sent = std::max(s.sent, upto);
        s.lp_sent = lp_upto;
        return !s.gone.load();
    }

    // ---- prompt cache ----
    // Sequences of finished requests (model thread only), most recent last, at most max_parallel:
    // a request whose prompt starts with the same tokens (the next turn of a chat, an agent's next
    // step) continues from one instead of rereading its whole prompt. Attention-only models rewind
    // to the common prefix (the KV cache past it is overwritten); models with recurrent state
    // (DeltaNet) are reused only when the whole cached sequence is a prefix of the new prompt.
    // Logits are the same either way: prompt chunks and decode steps give each row what one
    // forward() of the whole prompt gives it.
    struct CachedSequence {
        std::unique_ptr<SequenceState> seq;
        std::vector<int32_t> tokens;
        // Recurrent models: the recurrent state after tokens[0, snap_at) (the request's prompt),
        // which a new prompt that shares only that much can continue from; the KV cache of the
        // attention layers still holds those positions.
        std::unique_ptr<SequenceState> snap;
        int64_t snap_at = 0;
    };
    std::vector<CachedSequence> seq_cache;
    std::shared_ptr<const GrammarVocab> grammar_vocab;  // built at the first constrained request

    // The cached sequence that saves the most prompt tokens for `input`, taken out of the cache,
    // rewound to where the prompt continues; null if none saves any.
    std::unique_ptr<SequenceState> take_cached(const std::vector<int32_t>& input, int64_t n_ctx, int64_t* reused) {
        *reused = 0;
        size_t best = seq_cache.size();
        bool from_snap = false;
        for (size_t i = 0; i < seq_cache.size(); ++i) {
            const CachedSequence& c = seq_cache[i];
            const int64_t p = reusable_prefix(*c.seq, c.tokens, input);
            if (p > *reused) *reused = p, best = i, from_snap = false;
            if (c.snap && c.snap_at > *reused && c.snap_at < static_cast<int64_t>(input.size()) &&
                std::equal(c.tokens.begin(), c.tokens.begin() + c.snap_at, input.begin()))
                *reused = c.snap_at, best = i, from_snap = true;
        }
        if (best == seq_cache.size()) return nullptr;
        std::unique_ptr<SequenceState> seq = std::move(seq_cache[best].seq);
        if (from_snap) model.copy_recurrent(*seq_cache[best].snap, *seq);
        seq_cache.erase(seq_cache.begin() + static_cast<std::ptrdiff_t>(best));
        seq->n_past = *reused;
        // A longer request than the one that left it; no room for that: start afresh instead.
        if (!model.grow_sequence(*seq, n_ctx).ok()) {
            *reused = 0;
            return nullptr;
        }
        return seq;
    }

    void keep_cached(Slot& s) {
        if (!s.seq || static_cast<int64_t>(s.fed.size()) != s.seq->n_past) return;  // state not as recorded
        if (static_cast<int>(seq_cache.size()) >= std::max(opts.max_parallel, 1)) seq_cache.erase(seq_cache.begin());
        seq_cache.push_back(CachedSequence{std::move(s.seq), std::move(s.fed), std::move(s.snap), s.snap_at});
    }

    // After a forward pass failed (its sequences end with the error): the prompt cache's sequences
    // give their memory back, since the pass may have run out of it (the next request has room).
    void forward_failed() { seq_cache.clear(); }

    // Ends a request: its last text, its timing, its status to the waiting handler.
    void finish(Slot& s, Status st) {
        if (st.ok() && !flush(s, s.res->text.size())) st = MM_ERROR("the client closed the connection");
        s.res->decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - s.t_decode).count();
        if (st.ok() && s.rq->cache_prompt && !abort_generation) keep_cached(s);
        s.seq.reset();  // freed here: backend memory belongs to the model thread
        s.snap.reset();
        if (s.admitted) --busy;  // before the handler can answer: /health never counts a finished request
        // Notified under the lock: once it is released the handler thread may free the slot.
        std::lock_guard<std::mutex> lock(s.out_mu);
        s.status = std::move(st);
        s.over = true;
        s.out_cv.notify_one();
    }

    // Samples the next token from `logits` (null: `chosen`, drawn from the model's argmax or top-k
    // candidates for an argmax_only() / top_k_only() request) and takes it; true when the request
    // is over (finish() called).
    bool accept(Slot& s, const float* logits, int32_t chosen = -1) {
        const int64_t V = model.config().n_vocab;
        const int32_t next = !logits         ? chosen
                             : s.constraint ? s.sampler->sample(logits, V, *s.constraint)
                                            : s.sampler->sample(logits, V);
        GenResult& res = *s.res;
        if (next < 0) {
            finish(s, MM_ERROR("no token of the vocabulary can continue the reply under the request's grammar "
                               "(after %lld tokens)",
                               static_cast<long long>(res.completion_tokens)));
            return true;
        }
        if (s.constraint) s.constraint->accept(next);
        // Under a grammar, end of generation is offered only where the reply is complete: it ends
        // the reply even with ignore_eos.
        if ((!s.rq->ignore_eos || s.constraint) && tok.is_eog(next)) {
            res.finish = "stop";
            finish(s, Status());
            return true;
        }
        ++res.completion_tokens;
        std::string& text = res.text;
        const size_t before = text.size();
        text += tok.token_to_piece(next);
        if (s.rq->logprobs >= 0)
            res.logprobs.push_back(GenLogprob{token_logprobs(logits, V, next, s.rq->logprobs), before, text.size()});
        bool stopped = false;
        for (const std::string& stop : s.rq->stop) {
            // A stop string ends in the new piece: search from where it could start.
            const size_t from = before >= stop.size() ? before - stop.size() + 1 : 0;
            const size_t at = text.find(stop, from);
            if (at != std::string::npos) {
                text.resize(at);
                stopped = true;
            }
        }
        if (stopped) {
            // Tokens whose text lies wholly in the cut-off stop string are not part of the reply
            // (none of them was streamed: the stream holds back what a stop string could start with,
            // except a token without text, which stays).
            while (res.logprobs.size() > s.lp_sent && res.logprobs.back().start >= text.size()) res.logprobs.pop_back();
            for (GenLogprob& g : res.logprobs) g.end = std::min(g.end, text.size());
            res.finish = "stop";
            finish(s, Status());
            return true;
        }
        const size_t safe = text.size() > s.hold ? text.size() - s.hold : 0;
        if (!flush(s, unicode::utf8_complete_prefix(std::string_view(text).substr(0, std::max(safe, s.sent))))) {
            finish(s, MM_ERROR("the client closed the connection"));
            return true;
        }
        if (res.completion_tokens >= s.pr->max_new) {
            finish(s, Status());  // finish stays "length"
            return true;
        }
        s.next = next;
        return false;
    }

    // A decoding request that needs only the argmax of its logits: greedy, no grammar, no logprobs.
    static bool argmax_only(const Slot& s) { return !s.constraint && s.sampler->greedy() && s.rq->logprobs < 0; }
    // k > 0: a decoding request that needs only its k largest logits (top-k sampling, k <=
    // kModelTopKMax, no grammar, no logprobs).
    int64_t top_k_only(const Slot& s) const {
        if (s.constraint || s.rq->logprobs >= 0) return 0;
        const int64_t k = s.sampler->candidates(model.config().n_vocab);
        return k <= kModelTopKMax ? k : 0;
    }

    // Admits a request: its sequence and sampler.
    // False (the request finished with the error) when the backend has no room for its sequence,
    // even after the prompt cache's sequences gave their memory back.
    bool admit(Slot& s) {
        s.admitted = true;
        ++busy;
        const int64_t n_in = static_cast<int64_t>(s.pr->input.size());
        s.res->prompt_tokens = n_in;
        s.t_prompt = s.t_decode = std::chrono::steady_clock::now();
        const int64_t n_ctx = std::max<int64_t>(n_in + s.pr->max_new, 1);
        int64_t reused = 0;
        if (s.rq->cache_prompt) s.seq = take_cached(s.pr->input, n_ctx, &reused);
        if (!s.seq) {
            StatusOr<std::unique_ptr<SequenceState>> seq = model.new_sequence(n_ctx);
            if (!seq.ok() && !seq_cache.empty()) {
                seq_cache.clear();
                seq = model.new_sequence(n_ctx);
            }
            if (!seq.ok()) {
                finish(s, seq.status());
                return false;
            }
            s.seq = std::move(seq).value();
        }
        s.prefilled = s.res->cached_tokens = reused;
        s.fed.assign(s.pr->input.begin(), s.pr->input.begin() + reused);
        s.sampler = std::make_unique<Sampler>(s.rq->sp);
        if (s.rq->grammar) {
            if (!grammar_vocab) grammar_vocab = std::make_shared<const GrammarVocab>(tok);  // model thread only
            s.constraint = std::make_unique<TokenConstraint>(s.rq->grammar, grammar_vocab);
        }
        for (const std::string& stop : s.rq->stop) s.hold = std::max(s.hold, stop.size() - 1);
        return true;
    }

    // Runs the next chunk of a request's prompt; after the last one, takes its first token. True
    // while the request goes on (prompt left, or decoding).
    // While other requests decode, a prompt advances at most kBusyPromptChunk tokens per step, in
    // the same forward pass as their tokens, so that they keep a steady pace during a long prompt; a
    // multiple of 64 keeps the DeltaNet's chunked prefill on the same 64-token grid as one forward()
    // of the prompt.
    static constexpr int64_t kBusyPromptChunk = 64;

    // After n more prompt tokens of s ran (`logits`: the last one's row): true while it goes on.
    bool prompt_ran(Slot& s, int64_t n, const float* logits) {
        const std::vector<int32_t>& input = s.pr->input;
        s.fed.insert(s.fed.end(), input.begin() + s.prefilled, input.begin() + s.prefilled + n);
        s.prefilled += n;
        if (s.prefilled < static_cast<int64_t>(input.size())) return true;
        bool recurrent = false;
        for (const Buffer& b : s.seq->ssm_state) recurrent = recurrent || static_cast<bool>(b);
        if (recurrent && s.rq->cache_prompt) {  // the prompt cache may continue from here later
            StatusOr<std::unique_ptr<SequenceState>> snap = model.new_sequence(1);
            if (snap.ok()) {  // (without room for it the prompt is just not cached)
                s.snap = std::move(snap).value();
                model.copy_recurrent(*s.seq, *s.snap);
                s.snap_at = s.prefilled;
            }
        }
        s.t_decode = std::chrono::steady_clock::now();
        s.res->prompt_s = std::chrono::duration<double>(s.t_decode - s.t_prompt).count();
        if (s.pr->max_new == 0) {
            finish(s, Status());
            return false;
        }
        return !accept(s, logits);
    }

    // Runs the next chunk of a request's prompt alone (nothing else to run, or no room beside the
    // decode step). True while the request goes on (prompt left, or decoding).
    bool prefill(Slot& s) {
        const std::vector<int32_t>& input = s.pr->input;
        const int64_t n = std::min<int64_t>(std::max<int64_t>(opts.prompt_chunk, 1),
                                            static_cast<int64_t>(input.size()) - s.prefilled);
        std::vector<float> logits;
        Status st = model.forward(*s.seq, input.data() + s.prefilled, n, false, &logits);
        if (!st.ok()) {
            forward_failed();
            finish(s, st);
            return false;
        }
        return prompt_ran(s, n, logits.data());
    }

    // The model thread: admits waiting requests into free slots and runs decode steps until
    // stop_jobs(); then every waiting and running request ends with "the server is stopping".
    void job_loop() {
        std::vector<Slot*> active;   // decoding
        std::deque<Slot*> reading;   // admitted, prompt not yet fully run
        std::vector<SequenceState*> seqs;
        std::vector<int64_t> counts;
        std::vector<int32_t> tokens;
        std::vector<float> logits;
        std::vector<int32_t> chosen;  // each request's token where the logits are not downloaded
        std::vector<int32_t> top_ids;  // forward_batch_top_k's candidates
        std::vector<float> top_vals;
        const int64_t V = model.config().n_vocab;
        for (;;) {
            std::vector<Slot*> admitted;
            {
                std::unique_lock<std::mutex> lock(jobs_mu);
                jobs_cv.wait(lock, [&] { return stopping || !pending.empty() || !active.empty() || !reading.empty(); });
                if (stopping) {
                    for (Slot* s : pending) finish(*s, MM_ERROR("the server is stopping"));
                    pending.clear();
                    for (Slot* s : reading) finish(*s, MM_ERROR("the server is stopping"));
                    for (Slot* s : active) finish(*s, MM_ERROR("the server is stopping"));
                    return;
                }
                while (!pending.empty() &&
                       static_cast<int>(active.size() + reading.size() + admitted.size()) < opts.max_parallel) {
                    admitted.push_back(pending.front());
                    pending.pop_front();
                }
            }
            for (Slot* s : admitted)
                if (admit(*s)) reading.push_back(s);
            // The longest-waiting prompt advances by one chunk: alone when nothing decodes, else
            // inside the decode step when the step's tokens fit the model's batch.
            Slot* reader = reading.empty() ? nullptr : reading.front();
            int64_t mix = 0;  // the reader's prompt tokens in this decode step
            if (reader && !active.empty()) {
                const int64_t room = std::min<int64_t>(kBusyPromptChunk, opts.prompt_chunk - static_cast<int64_t>(active.size()));
                mix = std::min<int64_t>(room, static_cast<int64_t>(reader->pr->input.size()) - reader->prefilled);
            }
            if (reader && mix <= 0) {
                mix = 0;
                const int64_t n_in = static_cast<int64_t>(reader->pr->input.size());
                const bool going = prefill(*reader);
                if (!going || reader->prefilled == n_in) reading.pop_front();
                if (going && reader->prefilled == n_in) active.push_back(reader);
                reader = nullptr;
            }
            if (active.empty()) continue;
            ++decode_steps;
            decode_tokens += static_cast<int64_t>(active.size());
            max_batch = std::max<int64_t>(max_batch, static_cast<int64_t>(active.size()));
            seqs.clear();
            counts.assign(active.size(), 1);
            tokens.clear();
            for (Slot* s : active) {
                seqs.push_back(s->seq.get());
                tokens.push_back(s->next);
            }
            if (mix > 0) {
                mixed_prompt_tokens += mix;
                seqs.push_back(reader->seq.get());
                counts.push_back(mix);
                const int32_t* from = reader->pr->input.data() + reader->prefilled;
                tokens.insert(tokens.end(), from, from + mix);
            }
            // No prompt in the step and every request greedy or top-k sampling (no grammar or
            // logprobs): the argmaxes alone, or each request's candidates (the batch's largest k;
            // a request with a smaller k draws from their first k, a greedy one takes the first);
            // on a GPU a few numbers per request downloaded instead of n_vocab floats.
            int64_t top_k = mix == 0 ? 1 : 0;  // 0: the logits
            bool all_greedy = true;
            for (const Slot* s : active) {
                const bool g = argmax_only(*s);
                const int64_t k = g ? 1 : top_k_only(*s);
                all_greedy = all_greedy && g;
                top_k = k > 0 && top_k > 0 ? std::max(top_k, k) : 0;
            }
            const int64_t n_seqs = static_cast<int64_t>(seqs.size());
            chosen.resize(seqs.size());
            Status st;
            if (top_k > 0 && all_greedy) {
                st = model.forward_batch_argmax(seqs.data(), counts.data(), n_seqs, tokens.data(), chosen.data());
            } else if (top_k > 0) {
                top_ids.resize(static_cast<size_t>(n_seqs * top_k)), top_vals.resize(top_ids.size());
                st = model.forward_batch_top_k(seqs.data(), counts.data(), n_seqs, tokens.data(), top_k, top_ids.data(),
                                               top_vals.data());
                for (size_t i = 0; st.ok() && i < active.size(); ++i) {
                    const Slot& s = *active[i];
                    const size_t at = i * static_cast<size_t>(top_k);
                    chosen[i] = argmax_only(s) ? top_ids[at]
                                               : s.sampler->sample_candidates(&top_ids[at], &top_vals[at], top_k_only(s));
                }
            } else {
                st = model.forward_batch(seqs.data(), counts.data(), n_seqs, tokens.data(), &logits);
            }
            if (!st.ok()) forward_failed();
            const bool ids_only = top_k > 0;
            std::vector<Slot*> still;
            for (size_t i = 0; i < active.size(); ++i) {
                Slot& s = *active[i];
                if (!st.ok()) {
                    finish(s, st);
                    continue;
                }
                s.fed.push_back(s.next);
                if (abort_generation) {
                    finish(s, MM_ERROR("the server is stopping"));
                    continue;
                }
                if (!(ids_only ? accept(s, nullptr, chosen[i]) : accept(s, logits.data() + i * V))) still.push_back(&s);
            }
            if (mix > 0) {
                const int64_t n_in = static_cast<int64_t>(reader->pr->input.size());
                bool going = false;
                if (!st.ok()) {
                    finish(*reader, st);
                } else {
                    going = prompt_ran(*reader, mix, logits.data() + active.size() * V);
                }
                if (!going || reader->prefilled == n_in) reading.pop_front();
                if (going && reader->prefilled == n_in) still.push_back(reader);
            }
            active.swap(still);
        }
    }
    void stop_jobs() {
        {
            std::lock_guard<std::mutex> lock(jobs_mu);
            stopping = true;
        }
        abort_generation = true;
        jobs_cv.notify_all();
    }
    using OnText = std::function<bool(const std::string& text, const std::vector<GenLogprob>& logprobs)>;
    // Queues a prepared request for the model thread and waits until it is over; meanwhile (on this,
    // the request's handler thread) passes its text to `on_text` as it becomes final (null: not
    // streamed). on_text returning false (the client is gone) ends the generation.
    Status generate_on_model_thread(const GenRequest& rq, const Prepared& pr,
                                    const OnText& on_text, GenResult* res) {
        Slot slot;
        slot.rq = &rq;
        slot.pr = &pr;
        slot.stream = static_cast<bool>(on_text);
        slot.res = res;
        {
            std::lock_guard<std::mutex> lock(jobs_mu);
            if (stopping) return MM_ERROR("the server is stopping");
            pending.push_back(&slot);
        }
        jobs_cv.notify_one();
        for (;;) {
            std::string text;
            std::vector<GenLogprob> lps;
            bool over = false;
            {
                std::unique_lock<std::mutex> lock(slot.out_mu);
                slot.out_cv.wait(lock, [&] { return slot.over || !slot.out.empty() || !slot.out_lp.empty(); });
                text.swap(slot.out);
                lps.swap(slot.out_lp);
                over = slot.over;
            }
            if ((!text.empty() || !lps.empty()) && !slot.gone && !on_text(text, lps)) slot.gone = true;
            if (over) break;
        }
        // The model thread saw the client gone only if text came after; otherwise the request
        // ended normally and the last writes failed: the same error either way.
        if (slot.status.ok() && slot.gone) return MM_ERROR("the client closed the connection");
        return slot.status;
    }

    // Log-probabilities in the OpenAI form: chat {"content": [{token, logprob, bytes, top_logprobs:
    // [{token, logprob, bytes}]}]}; completions {tokens, token_logprobs, top_logprobs: [{token:
    // logprob}], text_offset} (offsets into the completion's text).
    json logprobs_json(const std::vector<GenLogprob>& lps, bool chat) const {
        auto bytes = [](const std::string& piece) {
            json b = json::array();
            for (unsigned char c : piece) b.push_back(static_cast<int>(c));
            return b;
        };
        if (chat) {
            json content = json::array();
            for (const GenLogprob& g : lps) {
                const std::string piece = tok.token_to_piece(g.lp.id);
                json top = json::array();
                for (const auto& [id, lp] : g.lp.top) {
                    const std::string p = tok.token_to_piece(id);
                    top.push_back({{"token", p}, {"logprob", lp}, {"bytes", bytes(p)}});
                }
                content.push_back({{"token", piece}, {"logprob", g.lp.logprob}, {"bytes", bytes(piece)},
                                   {"top_logprobs", std::move(top)}});
            }
            return {{"content", std::move(content)}};
        }
        json tokens = json::array(), token_lps = json::array(), tops = json::array(), offsets = json::array();
        for (const GenLogprob& g : lps) {
            tokens.push_back(tok.token_to_piece(g.lp.id));
            token_lps.push_back(g.lp.logprob);
            json top = json::object();
            for (const auto& [id, lp] : g.lp.top) top[tok.token_to_piece(id)] = lp;
            tops.push_back(std::move(top));
            offsets.push_back(g.start);
        }
        return {{"tokens", std::move(tokens)},
                {"token_logprobs", std::move(token_lps)},
                {"top_logprobs", std::move(tops)},
                {"text_offset", std::move(offsets)}};
    }

    json usage(const GenResult& g) const {
        return {{"prompt_tokens", g.prompt_tokens},
                {"completion_tokens", g.completion_tokens},
                {"total_tokens", g.prompt_tokens + g.completion_tokens},
                {"prompt_tokens_details", {{"cached_tokens", g.cached_tokens}}}};
    }

    void log(const httplib::Request& req, int status, const GenResult* g) const {
        if (!opts.log_requests) return;
        if (g && g->prompt_s > 0) {
            const double tps = g->completion_tokens > 1 && g->decode_s > 0 ? (g->completion_tokens - 1) / g->decode_s : 0;
            std::fprintf(stderr, "http: %s %s -> %d | prompt %lld tokens %.2f s | %lld tokens, %.2f tokens/s (%s)\n",
                         req.method.c_str(), req.path.c_str(), status, static_cast<long long>(g->prompt_tokens),
                         g->prompt_s, static_cast<long long>(g->completion_tokens), tps, g->finish.c_str());
        } else {
            std::fprintf(stderr, "http: %s %s -> %d\n", req.method.c_str(), req.path.c_str(), status);
        }
    }

    void send_error(const httplib::Request& req, httplib::Response& res, int status, const std::string& msg) {
        res.status = status;
        res.set_content(dump(error_json(msg, status >= 500 ? "server_error" : "invalid_request_error")),
                        "application/json");
        log(req, status, nullptr);
    }

    void completion(const httplib::Request& req, httplib::Response& res, bool chat) {
        StatusOr<GenRequest> parsed = parse_gen_request(req.body, chat, opts.limits);
        if (!parsed.ok()) return send_error(req, res, 400, parsed.status().message());
        const GenRequest rq = parsed.value();
        StatusOr<Prepared> prepared = prepare(rq);
        if (!prepared.ok()) return send_error(req, res, 400, prepared.status().message());
        const Prepared pr = std::move(prepared).value();
        const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id++);
        const long long created = static_cast<long long>(std::time(nullptr));
        const std::string object = chat ? "chat.completion" : "text_completion";
        if (!rq.stream) {
            GenResult g;
            Status st = generate_on_model_thread(rq, pr, nullptr, &g);
            if (!st.ok()) return send_error(req, res, 500, st.message());
            json choice = {{"index", 0}, {"finish_reason", g.finish}, {"logprobs", nullptr}};
            if (rq.logprobs >= 0) choice["logprobs"] = logprobs_json(g.logprobs, chat);
            if (chat && parse_reply(rq)) {
                const AssistantReply reply = parse_assistant_reply(g.text, reply_format(rq, id));
                json msg = {{"role", "assistant"}, {"content", reply.content}};
                if (!reply.reasoning.empty()) msg["reasoning_content"] = reply.reasoning;
                if (!reply.tool_calls.empty()) {
                    if (reply.content.empty()) msg["content"] = nullptr;
                    msg["tool_calls"] = tool_calls_json(reply.tool_calls, false);
                    if (g.finish == "stop") choice["finish_reason"] = "tool_calls";
                }
                choice["message"] = std::move(msg);
            } else if (chat) {
                choice["message"] = {{"role", "assistant"}, {"content", g.text}};
            } else {
                choice["text"] = g.text;
            }
            json out = {{"id", id},           {"object", object},          {"created", created},
                        {"model", opts.model_name}, {"choices", json::array({choice})}, {"usage", usage(g)}};
            res.set_content(dump(out), "application/json");
            log(req, 200, &g);
            return;
        }
        // Server-sent events: one "data: {chunk}" per piece of text, a final chunk with the finish
        // reason and usage, then "data: [DONE]". Errors after the stream started arrive as a
        // "data: {"error": ...}" event.
        res.set_header("Cache-Control", "no-cache");
        res.set_chunked_content_provider(
            "text/event-stream", [this, rq, pr, id, created, chat, req_method = req.method, req_path = req.path](
                                     size_t, httplib::DataSink& sink) {
              try {
                const std::string chunk_object = chat ? "chat.completion.chunk" : "text_completion";
                auto event = [&](const json& choice, const json* use) {
                    json c = {{"id", id},
                              {"object", chunk_object},
                              {"created", created},
                              {"model", opts.model_name},
                              {"choices", json::array({choice})}};
                    if (use) c["usage"] = *use;
                    const std::string s = "data: " + dump(c) + "\n\n";
                    return sink.write(s.data(), s.size());
                };
                auto piece = [&](const std::string& t, const json& finish) {
                    json choice = {{"index", 0}, {"finish_reason", finish}};
                    if (chat)
                        choice["delta"] = t.empty() && finish.is_null() ? json{{"role", "assistant"}, {"content", ""}}
                                          : finish.is_null()           ? json{{"content", t}}
                                                                       : json::object();
                    else
                        choice["text"] = t;
                    return choice;
                };
                // Chat replies go through the reply parser: content and reasoning_content deltas as
                // they are decided, tool calls in one delta at the end.
                std::optional<ReplyStream> reply;
                if (chat && parse_reply(rq)) reply.emplace(reply_format(rq, id));
                // A chunk's log-probabilities go with the text of its tokens (a delta of their own
                // when the reply parser holds that text back).
                auto send_delta = [&](const ReplyStream::Delta& d, const std::vector<GenLogprob>& lps) {
                    if (d.empty() && lps.empty()) return true;
                    json delta = json::object();
                    if (!d.reasoning.empty()) delta["reasoning_content"] = d.reasoning;
                    if (!d.content.empty()) delta["content"] = d.content;
                    json choice = {{"index", 0}, {"finish_reason", nullptr}, {"delta", std::move(delta)}};
                    if (!lps.empty()) choice["logprobs"] = logprobs_json(lps, true);
                    return event(choice, nullptr);
                };
                auto on_text = [&](const std::string& t, const std::vector<GenLogprob>& lps) {
                    if (reply) return send_delta(reply->feed(t), lps);
                    if (chat && t.empty()) return send_delta(ReplyStream::Delta{}, lps);
                    json choice = piece(t, nullptr);
                    if (!lps.empty()) choice["logprobs"] = logprobs_json(lps, chat);
                    return event(choice, nullptr);
                };
                GenResult g;
                bool ok = !chat || event(piece("", nullptr), nullptr);
                Status st = ok ? generate_on_model_thread(rq, pr, on_text, &g)
                               : MM_ERROR("the client closed the connection");
                if (st.ok() && reply) {
                    std::vector<ToolCall> calls;
                    send_delta(reply->finish(&calls), {});
                    if (!calls.empty()) {
                        event(json{{"index", 0},
                                   {"finish_reason", nullptr},
                                   {"delta", {{"tool_calls", tool_calls_json(calls, true)}}}},
                              nullptr);
                        if (g.finish == "stop") g.finish = "tool_calls";
                    }
                }
                httplib::Request r;
                r.method = req_method;
                r.path = req_path;
                if (st.ok()) {
                    const json use = usage(g);
                    event(piece("", g.finish), &use);
                    log(r, 200, &g);
                } else {
                    const std::string s = "data: " + dump(error_json(st.message(), "server_error")) + "\n\n";
                    sink.write(s.data(), s.size());
                    std::fprintf(stderr, "http: %s %s: stream ended early: %s\n", req_method.c_str(), req_path.c_str(),
                                 st.message().c_str());
                }
                const std::string done = "data: [DONE]\n\n";
                sink.write(done.data(), done.size());
                sink.done();
                return true;
              } catch (const std::exception& e) {  // never let an exception end the process
                std::fprintf(stderr, "http: %s %s: stream failed: %s\n", req_method.c_str(), req_path.c_str(), e.what());
                return false;
              }
            });
    }

    void routes() {
        svr.set_payload_max_length(opts.max_body_bytes);
        if (opts.socket_send_buffer > 0) {
            svr.set_socket_options([n = opts.socket_send_buffer](socket_t sock) {
                httplib::default_socket_options(sock);
                ::setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &n, sizeof(n));
            });
        }
        svr.set_read_timeout(60, 0);
        svr.Get("/health", [this](const httplib::Request& req, httplib::Response& res) {
            int64_t waiting;
            {
                std::lock_guard<std::mutex> lock(jobs_mu);
                waiting = static_cast<int64_t>(pending.size());
            }
            const json body = {{"status", "ok"},
                               {"slots", {{"total", opts.max_parallel}, {"busy", busy.load()}, {"waiting", waiting}}},
                               {"decode", {{"steps", decode_steps.load()},
                                           {"tokens", decode_tokens.load()},
                                           {"max_batch", max_batch.load()},
                                           {"prompt_tokens", mixed_prompt_tokens.load()}}}};
            res.set_content(dump(body), "application/json");
            log(req, 200, nullptr);
        });
        auto models = [this](const httplib::Request& req, httplib::Response& res) {
            json m = {{"id", opts.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "moemesh"}};
            res.set_content(dump(json{{"object", "list"}, {"data", json::array({m})}}), "application/json");
            log(req, 200, nullptr);
        };
        svr.Get("/v1/models", models);
        svr.Get("/models", models);
        for (const char* p : {"/v1/completions", "/completions"})
            svr.Post(p, [this](const httplib::Request& req, httplib::Response& res) { completion(req, res, false); });
        for (const char* p : {"/v1/chat/completions", "/chat/completions"})
            svr.Post(p, [this](const httplib::Request& req, httplib::Response& res) { completion(req, res, true); });
        // A known route with the wrong method: 405 with Allow, not 404.
        auto wrong_method = [this](const char* allow) {
            return [this, allow](const httplib::Request& req, httplib::Response& res) {
                res.set_header("Allow", allow);
                send_error(req, res, 405, req.method + " " + req.path + " is not allowed; use " + allow);
            };
        };
        for (const char* p : {"/v1/completions", "/completions", "/v1/chat/completions", "/chat/completions"}) {
            svr.Get(p, wrong_method("POST"));
            svr.Put(p, wrong_method("POST"));
            svr.Delete(p, wrong_method("POST"));
        }
        for (const char* p : {"/v1/models", "/models", "/health"}) {
            svr.Post(p, wrong_method("GET"));
            svr.Put(p, wrong_method("GET"));
            svr.Delete(p, wrong_method("GET"));
        }
        // Browser clients: CORS on every response, and preflight requests answered.
        svr.set_default_headers({{"Access-Control-Allow-Origin", "*"}});
        svr.Options(R"(.*)", [](const httplib::Request&, httplib::Response& res) {
            res.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
            res.set_header("Access-Control-Allow-Headers", "Content-Type, Authorization");
            res.status = 204;
        });
        // Errors httplib produces itself (unknown path, body too large, bad HTTP): a JSON body too.
        svr.set_error_handler(httplib::Server::HandlerWithResponse(
            [this](const httplib::Request& req, httplib::Response& res) -> httplib::Server::HandlerResponse {
            if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
            std::string msg;
            if (res.status == 404)
                msg = "no route " + req.method + " " + req.path +
                      " (routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health)";
            else if (res.status == 413)
                msg = "the request body is larger than " + std::to_string(opts.max_body_bytes) + " bytes";
            else
                msg = "bad HTTP request (status " + std::to_string(res.status) + ")";
            res.set_content(dump(error_json(msg, "invalid_request_error")), "application/json");
            log(req, res.status, nullptr);
            return httplib::Server::HandlerResponse::Handled;
        }));
        svr.set_exception_handler([this](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
            std::string what = "unknown exception";
            try {
                std::rethrow_exception(ep);
            } catch (const std::exception& e) {
                what = e.what();
            } catch (...) {
            }
            send_error(req, res, 500, "internal error: " + what);
        });
    }
};

HttpServer::HttpServer(Model& model, const Tokenizer& tok, HttpServerOptions o)
    : impl_(std::make_unique<Impl>(model, tok, std::move(o))) {
    impl_->routes();
}

HttpServer::~HttpServer() { stop(); }

StatusOr<int> HttpServer::bind(const std::string& host, int port) {
    if (port < 0 || port > 65535) return MM_ERROR("port %d is out of range (0-65535)", port);
    if (port == 0) {
        const int p = impl_->svr.bind_to_any_port(host);
        if (p <= 0) return MM_ERROR("cannot bind %s to a free port", host.c_str());
        return p;
    }
    if (!impl_->svr.bind_to_port(host, port))
        return MM_ERROR("cannot bind %s:%d (in use, or not an address of this host?)", host.c_str(), port);
    return port;
}

Status HttpServer::run() {
    bool ok = true;
    std::thread http([&] {
        ok = impl_->svr.listen_after_bind();
        impl_->stop_jobs();
    });
    impl_->job_loop();  // this thread runs the model until stop()
    impl_->svr.stop();
    http.join();
    if (!ok) return MM_ERROR("the HTTP server stopped with an error");
    return Status();
}

void HttpServer::stop() {
    if (!impl_) return;
    impl_->stop_jobs();
    impl_->svr.stop();
}

Status serve_http(Model& model, const Tokenizer& tok, const std::string& addr, HttpServerOptions o) {
    const size_t colon = addr.rfind(':');
    if (colon == std::string::npos || colon + 1 == addr.size())
        return MM_ERROR("--serve '%s': expected HOST:PORT, e.g. 127.0.0.1:8080", addr.c_str());
    std::string host = addr.substr(0, colon);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    char* end = nullptr;
    const long port = std::strtol(addr.c_str() + colon + 1, &end, 10);
    if (*end != '\0' || port < 0 || port > 65535)
        return MM_ERROR("--serve '%s': the port must be a number in 0-65535", addr.c_str());
    HttpServer server(model, tok, std::move(o));
    MM_ASSIGN_OR_RETURN(const int bound, server.bind(host.empty() ? "0.0.0.0" : host, static_cast<int>(port)));
    // SIGINT/SIGTERM stop the server cleanly: the handler only sets a flag, a watcher thread stops it.
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = [](int sig) { g_stop_signal = sig; };
    sigemptyset(&sa.sa_mask);
    struct sigaction old_int {}, old_term {};
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    std::atomic<bool> done{false};
    std::thread watcher([&]() {
        while (!done.load()) {
            if (g_stop_signal != 0) {
                std::fprintf(stderr, "http: signal %d, stopping\n", static_cast<int>(g_stop_signal));
                server.stop();
                return;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
    });
    std::fprintf(stderr,
                 "http: listening on http://%s:%d (POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
                 "GET /health); Ctrl-C stops\n",
                 host.empty() ? "0.0.0.0" : host.c_str(), bound);
    Status st = server.run();
    done = true;
    watcher.join();
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
    return st;
}

}  // namespace moemesh
