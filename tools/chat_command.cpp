#include "tools/chat_command.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "common/chat_reply.h"
#include "common/tokenizer_unicode.h"
#include "coordinator/sampler.h"

namespace moemesh {

namespace {

// One user turn from stdin: a line, or several when lines end in '\'. False at end of input.
bool read_turn(bool tty, std::string* turn) {
    turn->clear();
    std::string line;
    if (tty) std::fputs("> ", stderr);
    while (std::getline(std::cin, line)) {
        if (!line.empty() && line.back() == '\\') {
            line.pop_back();
            *turn += line + "\n";
            if (tty) std::fputs(". ", stderr);
            continue;
        }
        *turn += line;
        return true;
    }
    return !turn->empty();
}

}  // namespace

Status chat_loop(const RunOptions& o, Model& model, const Tokenizer& tok, const ChatFormatter& chat) {
    const bool tty = isatty(STDIN_FILENO) != 0;
    const int64_t V = model.config().n_vocab;
    nlohmann::ordered_json base = nlohmann::ordered_json::array();
    if (!o.system.empty()) base.push_back({{"role", "system"}, {"content", o.system}});
    ChatFormatter::Input in;
    in.messages = base;
    if (o.no_think) in.kwargs = {{"enable_thinking", false}};
    MM_ASSIGN_OR_RETURN(std::unique_ptr<SequenceState> seq, model.new_sequence(o.ctx));
    std::vector<int32_t> held;  // the tokens the sequence holds
    // Recurrent models (DeltaNet) cannot rewind: the state when the last prompt ended is kept, so a
    // conversation whose template re-renders the reply differently (reasoning dropped) continues
    // from the previous prompt instead of starting over.
    std::unique_ptr<SequenceState> snap;
    int64_t snap_at = 0;
    bool recurrent = false;
    for (const Buffer& b : seq->ssm_state) recurrent = recurrent || static_cast<bool>(b);
    Sampler sampler(o.sp);
    if (tty)
        std::fprintf(stderr, "chat: %s; a line is a turn ('\\' at the end continues it), /reset starts over, /exit or "
                             "Ctrl-D quits\n",
                     chat.name().c_str());
    std::string turn;
    while (read_turn(tty, &turn)) {
        if (turn == "/exit" || turn == "/quit") break;
        if (turn == "/reset") {
            in.messages = base;
            held.clear();
            snap_at = 0;
            seq.reset();  // (its memory back first)
            MM_ASSIGN_OR_RETURN(seq, model.new_sequence(o.ctx));
            std::fprintf(stderr, "(new conversation)\n");
            continue;
        }
        if (turn.empty()) continue;
        in.messages.push_back({{"role", "user"}, {"content", turn}});
        StatusOr<std::string> prompt = chat.apply(in);
        if (!prompt.ok()) {
            in.messages.erase(in.messages.end() - 1);
            std::fprintf(stderr, "error: %s\n", prompt.status().message().c_str());
            continue;
        }
        if (o.verbose_prompt) std::fprintf(stderr, "--- prompt ---\n%s\n--- end of prompt ---\n", prompt.value().c_str());
        std::vector<int32_t> input = tok.encode(prompt.value(), /*parse_special=*/true);
        if (tok.add_bos() && tok.bos_id() >= 0) input.insert(input.begin(), tok.bos_id());
        const int64_t n_in = static_cast<int64_t>(input.size());
        if (n_in >= o.ctx) {
            in.messages.erase(in.messages.end() - 1);
            std::fprintf(stderr, "error: the conversation is %lld tokens; --ctx holds %lld: /reset starts a new one\n",
                         static_cast<long long>(n_in), static_cast<long long>(o.ctx));
            continue;
        }
        // Continue from what the sequence already holds (the conversation so far), else start over.
        int64_t kept = reusable_prefix(*seq, held, input);
        if (snap_at > kept && snap_at < n_in && std::equal(held.begin(), held.begin() + snap_at, input.begin())) {
            model.copy_recurrent(*snap, *seq);
            kept = snap_at;
        }
        if (kept == 0 && seq->n_past > 0) {
            seq.reset();
            MM_ASSIGN_OR_RETURN(seq, model.new_sequence(o.ctx));
        }
        seq->n_past = kept;
        held.assign(input.begin(), input.begin() + kept);
        std::vector<float> logits;
        const auto t0 = std::chrono::steady_clock::now();
        MM_RETURN_IF_ERROR(model.forward(*seq, input.data() + kept, n_in - kept, false, &logits));
        held.insert(held.end(), input.begin() + kept, input.end());
        if (recurrent) {
            if (!snap) {
                MM_ASSIGN_OR_RETURN(snap, model.new_sequence(1));
            }
            model.copy_recurrent(*seq, *snap);
            snap_at = n_in;
        }
        const auto t1 = std::chrono::steady_clock::now();
        std::string reply, pending;
        std::vector<int32_t> top_ids;
        std::vector<float> top_vals;
        int64_t generated = 0;
        const int64_t max_new = std::min<int64_t>(o.n_predict, o.ctx - n_in);
        int32_t next = sampler.sample(logits.data(), V);
        while (generated < max_new && (o.ignore_eos || !tok.is_eog(next))) {
            ++generated;
            const std::string piece = tok.token_to_piece(next);
            reply += piece;
            pending += piece;
            const size_t n = unicode::utf8_complete_prefix(pending);
            std::fwrite(pending.data(), 1, n, stdout);
            std::fflush(stdout);
            pending.erase(0, n);
            if (generated == max_new) break;
            held.push_back(next);
            if (sampler.greedy()) {  // the argmax alone (on a GPU: one id downloaded, not the logits)
                MM_RETURN_IF_ERROR(model.forward_argmax(*seq, &held.back(), 1, &next));
                continue;
            }
            if (const int64_t k = sampler.candidates(V); k > 0 && k <= kModelTopKMax) {  // top-k: its candidates alone
                top_ids.resize(static_cast<size_t>(k)), top_vals.resize(static_cast<size_t>(k));
                MM_RETURN_IF_ERROR(model.forward_top_k(*seq, &held.back(), 1, k, top_ids.data(), top_vals.data()));
                next = sampler.sample_candidates(top_ids.data(), top_vals.data(), k);
                continue;
            }
            MM_RETURN_IF_ERROR(model.forward(*seq, &next, 1, false, &logits));
            next = sampler.sample(logits.data(), V);
        }
        std::fwrite(pending.data(), 1, pending.size(), stdout);
        std::fputs("\n", stdout);
        std::fflush(stdout);
        const double prompt_s = std::chrono::duration<double>(t1 - t0).count();
        const double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
        std::fprintf(stderr, "[prompt: %lld new of %lld tokens in %.2f s | reply: %lld tokens, %.2f tokens/s%s]\n",
                     static_cast<long long>(n_in - kept), static_cast<long long>(n_in), prompt_s,
                     static_cast<long long>(generated), generated > 1 ? (generated - 1) / decode_s : 0.0,
                     generated == max_new ? "; cut at -n" : "");
        // The reply goes back as the template expects it: reasoning apart from the content.
        ReplyFormat rf;
        rf.starts_in_think = prompt_opens_think_block(prompt.value());
        const AssistantReply parsed = parse_assistant_reply(reply, rf);
        nlohmann::ordered_json msg = {{"role", "assistant"}, {"content", parsed.content}};
        if (!parsed.reasoning.empty()) msg["reasoning_content"] = parsed.reasoning;
        in.messages.push_back(std::move(msg));
    }
    return Status();
}

}  // namespace moemesh
