// A loaded model as the coordinator sees it: per-sequence state in, logits out.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/status.h"
#include "coordinator/backend.h"
#include "coordinator/expert_backend.h"
#include "kernels/ops.h"

namespace moemesh {

struct ModelOptions {
    int n_threads = 0;      // 0: all hardware threads
    int64_t n_batch = 512;  // prompt tokens per forward chunk
    bool kv_f16 = true;     // f16 KV cache (llama.cpp's default); false: f32
    ExpertBackendFactory experts;  // empty: every expert in this process (LocalExpertExecutor / VRAM)
    std::string device = "cpu";    // "cpu" | "cuda" | "cuda:N": where the forward pass and its state live
};

// Named debug points (llama.cpp's cb(cur, name, il)): called with [rows, cols] activations.
using DebugHook = std::function<void(const char* name, int layer, const float* data, int64_t rows, int64_t cols)>;

// Everything one sequence owns: its KV cache, its recurrent state, and how far it has got.
struct SequenceState {
    int64_t n_ctx = 0;
    int64_t n_past = 0;
    bool kv_f16 = true;
    // All in the model's backend memory (device memory with --device cuda:N), per layer:
    // attention layers' KV cache [n_ctx, n_head_kv, head_dim] as f16 bits or f32 (empty for others);
    std::vector<Buffer> k, v;
    // gated-DeltaNet layers (qwen3next; empty for others): the last K-1 pre-conv inputs
    // [K-1, conv channels] and the delta-rule state [Hv, dk, dv], fp32, zero for a new sequence.
    std::vector<Buffer> conv_state, ssm_state;
};

// The most candidates forward_top_k / forward_batch_top_k give (k).
inline constexpr int64_t kModelTopKMax = 64;

class Model {
public:
    virtual ~Model() = default;
    virtual const ModelConfig& config() const = 0;
    // A sequence with room for n_ctx tokens (its KV cache and recurrent state in the backend's
    // memory); fails when the backend has no room for them (the message says how much was asked).
    virtual StatusOr<std::unique_ptr<SequenceState>> new_sequence(int64_t n_ctx) const = 0;
    // Appends n tokens to the sequence. logits ← [rows, n_vocab] with rows = n when all_logits,
    // else 1 (the last token). Fails (state unchanged) if the sequence would exceed n_ctx. A failure
    // inside the pass (a worker lost, the device out of memory for its scratch) leaves the sequence
    // part-way through the tokens: it cannot go on (start a new one).
    virtual Status forward(SequenceState& seq, const int32_t* tokens, int64_t n, bool all_logits,
                           std::vector<float>* logits) = 0;
    // One step of several sequences at once (continuous batching): seqs[i] takes n_tokens[i] >= 1
    // tokens, laid out one sequence after the other in `tokens`; all of them together at most the
    // batch size (ModelOptions::n_batch). logits ← [n_seqs, n_vocab], each sequence's last token.
    // Each sequence's logits are those forward() would give it alone: every op is either per row
    // or per sequence. Fails (no state changed) if a sequence would exceed its n_ctx or appears twice.
    virtual Status forward_batch(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                 const int32_t* tokens, std::vector<float>* logits) = 0;
    // forward() for greedy decoding: *next ← the argmax of the last token's logits (sampler.h
    // argmax(): the lowest id on ties), picked where the logits are (a GPU backend downloads one id
    // instead of n_vocab floats). Same checks and state change as forward(..., false, ...).
    virtual Status forward_argmax(SequenceState& seq, const int32_t* tokens, int64_t n, int32_t* next) = 0;
    // forward_batch() likewise: next[i] ← the argmax of sequence i's logits, i < n_seqs.
    virtual Status forward_batch_argmax(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                        const int32_t* tokens, int32_t* next) = 0;
    // forward() for top-k sampling: ids[0..k) / vals[0..k) ← the k largest of the last token's logits
    // by decreasing logit (the lower id first on equal logits: sampler.h top_k_ids' order) and
    // their logits, found where the logits are (a GPU backend downloads 2k numbers instead of
    // n_vocab). 1 <= k <= kModelTopKMax and k <= n_vocab. Same checks and state change as forward(..., false, ...).
    virtual Status forward_top_k(SequenceState& seq, const int32_t* tokens, int64_t n, int64_t k, int32_t* ids,
                                 float* vals) = 0;
    // forward_batch() likewise: ids/vals [n_seqs, k], row i sequence i's.
    virtual Status forward_batch_top_k(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                       const int32_t* tokens, int64_t k, int32_t* ids, float* vals) = 0;
    // Gives the sequence room for n_ctx tokens (its KV cache reallocated, the positions it holds
    // kept); never shrinks. For reusing a finished sequence with a longer request. Fails (the
    // sequence unchanged) when the backend has no room for the larger cache.
    virtual Status grow_sequence(SequenceState& seq, int64_t n_ctx) const = 0;
    // Copies the recurrent state (DeltaNet conv and delta-rule state; nothing for attention-only
    // models) of `from` into `to`, a sequence of the same model. A copy taken when a prompt ends lets
    // a later request that shares only that prompt continue from it (the server's prompt cache).
    virtual void copy_recurrent(const SequenceState& from, SequenceState& to) const = 0;
    virtual void set_debug_hook(DebugHook hook) = 0;
};

// How many of `input`'s first tokens a sequence that holds `held` can keep for it (the next turn
// of a chat, an agent's next step): their common prefix, which the sequence can be rewound to when
// it has only KV caches (positions past it are overwritten); with recurrent state (DeltaNet) all
// of `held` or nothing. At most input.size() - 1: the last prompt token must run to give logits.
int64_t reusable_prefix(const SequenceState& seq, const std::vector<int32_t>& held, const std::vector<int32_t>& input);

// Loads the model in `file` (kept alive by the model). Errors name the file and tensor/key.
StatusOr<std::unique_ptr<Model>> load_model(std::shared_ptr<GgufFile> file, const ModelOptions& opts);

}  // namespace moemesh
