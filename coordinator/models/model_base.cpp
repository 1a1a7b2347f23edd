#include "coordinator/models/model_base.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/half.h"
#include "common/placement.h"

namespace moemesh {

namespace {

// A 1-D tensor (norm weights, biases) of n elements as f32.
StatusOr<std::vector<float>> load_vector(const GgufFile& f, const std::string& name, int64_t n) {
    MM_ASSIGN_OR_RETURN(Weight w, get_weight(f, name, {n}));
    std::vector<float> out(static_cast<size_t>(n));
    dequantize_row(w.type, w.data, out.data(), n);
    return out;
}

}  // namespace

namespace {

// The error of a KV cache that did not fit: the backend's (what was asked, what is free) and the
// whole cache's size.
Status kv_cache_error(const Status& st, const ModelConfig& c, int64_t n_ctx, size_t per_layer,
                      const std::vector<uint8_t>& has_kv) {
    const auto layers = static_cast<double>(std::count(has_kv.begin(), has_kv.end(), uint8_t{1}));
    return MM_ERROR("%s (the KV cache for %lld positions takes %s: %.0f layers x K and V of %lld heads of %lld; a "
                    "smaller context, e.g. --ctx, needs less)",
                    st.message().c_str(), static_cast<long long>(n_ctx),
                    format_bytes(static_cast<uint64_t>(2.0 * layers * static_cast<double>(per_layer))).c_str(), layers,
                    static_cast<long long>(c.n_head_kv), static_cast<long long>(c.head_dim));
}

}  // namespace

Status alloc_kv_cache(Backend& be, SequenceState& s, const ModelConfig& c, int64_t n_ctx, bool kv_f16,
                      const std::vector<uint8_t>& has_kv) {
    s.n_ctx = n_ctx;
    s.kv_f16 = kv_f16;
    const size_t per_layer = static_cast<size_t>(n_ctx * c.n_head_kv * c.head_dim) * (kv_f16 ? 2 : 4);
    const auto L = static_cast<size_t>(c.n_layer);
    s.k.clear();
    s.v.clear();
    s.k.resize(L);
    s.v.resize(L);
    for (size_t il = 0; il < L; ++il) {
        if (!has_kv[il]) continue;
        for (std::vector<Buffer>* kv : {&s.k, &s.v}) {
            StatusOr<Buffer> b = be.try_alloc(per_layer, true, "the KV cache");
            if (!b.ok()) {
                s.k.clear(), s.v.clear();  // what was allocated goes back now
                return kv_cache_error(b.status(), c, n_ctx, per_layer, has_kv);
            }
            (*kv)[il] = std::move(b).value();
        }
    }
    return Status();
}

int64_t reusable_prefix(const SequenceState& seq, const std::vector<int32_t>& held, const std::vector<int32_t>& input) {
    const size_t n = std::min(held.size(), input.size());
    auto p = static_cast<int64_t>(std::mismatch(held.begin(), held.begin() + static_cast<std::ptrdiff_t>(n),
                                                input.begin())
                                      .first -
                                  held.begin());
    p = std::min<int64_t>(p, static_cast<int64_t>(input.size()) - 1);
    bool recurrent = false;
    for (const std::vector<Buffer>* state : {&seq.ssm_state, &seq.conv_state})
        for (const Buffer& b : *state) recurrent = recurrent || b.bytes() > 0;
    if (recurrent && p != static_cast<int64_t>(held.size())) return 0;
    return std::max<int64_t>(p, 0);
}

Status ModelBase::grow_sequence(SequenceState& seq, int64_t n_ctx) const {
    if (n_ctx <= seq.n_ctx) return Status();
    const size_t per_token = static_cast<size_t>(cfg_.n_head_kv * cfg_.head_dim) * (seq.kv_f16 ? 2 : 4);
    // Every larger cache first, so that a failure leaves the sequence as it was.
    std::vector<Buffer> grown_all;
    std::vector<uint8_t> has_kv;
    for (const Buffer& b : seq.k) has_kv.push_back(b ? 1 : 0);
    for (const std::vector<Buffer>* caches : {&seq.k, &seq.v}) {
        for (const Buffer& old : *caches) {
            if (!old) continue;  // a layer without KV cache (DeltaNet)
            StatusOr<Buffer> b = be_->try_alloc(per_token * static_cast<size_t>(n_ctx), true, "the KV cache");
            if (!b.ok()) return kv_cache_error(b.status(), cfg_, n_ctx, per_token * static_cast<size_t>(n_ctx), has_kv);
            grown_all.push_back(std::move(b).value());
        }
    }
    size_t next = 0;
    for (std::vector<Buffer>* caches : {&seq.k, &seq.v}) {
        for (Buffer& old : *caches) {
            if (!old) continue;
            Buffer grown = std::move(grown_all[next++]);
            const size_t bytes = per_token * static_cast<size_t>(seq.n_past);
            if (bytes % sizeof(float) == 0) {
                const auto n = static_cast<int64_t>(bytes / sizeof(float));
                be_->copy_rows(grown.as<float>(), n, old.as<float>(), n, 1, n);  // one row of n floats
            } else {  // an odd f16 row width: through the host
                std::vector<uint8_t> host(bytes);
                be_->to_host(host.data(), old.data(), bytes);
                be_->to_device(grown.data(), host.data(), bytes);
            }
            old = std::move(grown);
        }
    }
    seq.n_ctx = n_ctx;
    return Status();
}

void ModelBase::copy_recurrent(const SequenceState& from, SequenceState& to) const {
    for (auto [src, dst] : {std::pair{&from.conv_state, &to.conv_state}, std::pair{&from.ssm_state, &to.ssm_state}}) {
        for (size_t il = 0; il < src->size() && il < dst->size(); ++il) {
            const Buffer& a = (*src)[il];
            Buffer& b = (*dst)[il];
            if (!a || !b || a.bytes() != b.bytes()) continue;
            const auto n = static_cast<int64_t>(a.bytes() / sizeof(float));  // fp32 state
            be_->copy_rows(b.as<float>(), n, a.as<float>(), n, 1, n);
        }
    }
}

Status ModelBase::forward(SequenceState& seq, const int32_t* tokens, int64_t n, bool all_logits,
                          std::vector<float>* logits) {
    MM_RETURN_IF_ERROR(check_input(seq, tokens, n));
    logits->assign(static_cast<size_t>((all_logits ? n : 1) * cfg_.n_vocab), 0.0f);
    ChunkOut out;
    out.logits = logits->data();
    return forward_rows(seq, tokens, n, all_logits, out);
}

Status ModelBase::forward_argmax(SequenceState& seq, const int32_t* tokens, int64_t n, int32_t* next) {
    MM_RETURN_IF_ERROR(check_input(seq, tokens, n));
    ChunkOut out;
    out.argmax = next;
    return forward_rows(seq, tokens, n, false, out);
}

Status ModelBase::check_top_k(int64_t k) const {
    if (k < 1 || k > kModelTopKMax || k > cfg_.n_vocab)
        return MM_ERROR("top-k %lld: the model gives the top 1 to %lld logits", static_cast<long long>(k),
                        static_cast<long long>(std::min<int64_t>(kModelTopKMax, cfg_.n_vocab)));
    return Status();
}

Status ModelBase::check_top_ids(const int32_t* ids, int64_t n) const {
    for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= cfg_.n_vocab)
            return MM_ERROR("the model's logits hold NaN: no %lld largest to sample from (output row %lld)",
                            static_cast<long long>(n), static_cast<long long>(i));
    return Status();
}

Status ModelBase::forward_top_k(SequenceState& seq, const int32_t* tokens, int64_t n, int64_t k, int32_t* ids,
                                float* vals) {
    MM_RETURN_IF_ERROR(check_top_k(k));
    MM_RETURN_IF_ERROR(check_input(seq, tokens, n));
    ChunkOut out;
    out.top_k = k, out.top_ids = ids, out.top_vals = vals;
    MM_RETURN_IF_ERROR(forward_rows(seq, tokens, n, false, out));
    return check_top_ids(ids, k);
}

Status ModelBase::check_input(const SequenceState& seq, const int32_t* tokens, int64_t n) const {
    if (n <= 0) return MM_ERROR("forward: no tokens to process");
    if (seq.n_past + n > seq.n_ctx)
        return MM_ERROR("context full: %lld tokens already in the sequence + %lld new > context size %lld",
                        static_cast<long long>(seq.n_past), static_cast<long long>(n),
                        static_cast<long long>(seq.n_ctx));
    for (int64_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= cfg_.n_vocab)
            return MM_ERROR("token id %d at input position %lld is out of range [0, %lld)", tokens[i],
                            static_cast<long long>(i), static_cast<long long>(cfg_.n_vocab));
    }
    return Status();
}

Status ModelBase::forward_rows(SequenceState& seq, const int32_t* tokens, int64_t n, bool all_logits,
                               const ChunkOut& out) {
    const int64_t V = cfg_.n_vocab;
    for (int64_t done = 0; done < n;) {
        const int64_t T = std::min<int64_t>(opts_.n_batch, n - done);
        // Every chunk's rows (all_logits), else the last chunk's last row only.
        ChunkOut o;
        if (all_logits) {
            o.logits = out.logits + done * V;
        } else if (done + T == n) {
            o = out;
        }
        const Segment seg{&seq, 0, T};
        MM_RETURN_IF_ERROR(run_chunk(&seg, 1, tokens + done, T, all_logits, o));
        done += T;
    }
    return Status();
}

Status ModelBase::batch_segments(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                 const int32_t* tokens, std::vector<Segment>* segs, int64_t* T_out) const {
    if (n_seqs <= 0) return MM_ERROR("forward_batch: no sequences");
    segs->assign(static_cast<size_t>(n_seqs), Segment{});
    int64_t T = 0;
    for (int64_t i = 0; i < n_seqs; ++i) {
        SequenceState* s = seqs[i];
        const int64_t n = n_tokens[i];
        if (n <= 0) return MM_ERROR("forward_batch: sequence %lld has no tokens", static_cast<long long>(i));
        if (s->n_past + n > s->n_ctx)
            return MM_ERROR("context full: sequence %lld has %lld tokens + %lld new > context size %lld",
                            static_cast<long long>(i), static_cast<long long>(s->n_past), static_cast<long long>(n),
                            static_cast<long long>(s->n_ctx));
        for (int64_t j = 0; j < i; ++j)
            if (seqs[j] == s) return MM_ERROR("forward_batch: a sequence appears twice in one batch");
        (*segs)[static_cast<size_t>(i)] = Segment{s, T, n};
        T += n;
    }
    if (T > opts_.n_batch)
        return MM_ERROR("forward_batch: %lld tokens exceed the batch size %lld", static_cast<long long>(T),
                        static_cast<long long>(opts_.n_batch));
    for (int64_t i = 0; i < T; ++i) {
        if (tokens[i] < 0 || tokens[i] >= cfg_.n_vocab)
            return MM_ERROR("token id %d at batch row %lld is out of range [0, %lld)", tokens[i],
                            static_cast<long long>(i), static_cast<long long>(cfg_.n_vocab));
    }
    *T_out = T;
    return Status();
}

Status ModelBase::forward_batch(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                const int32_t* tokens, std::vector<float>* logits) {
    return forward_batch_rows(seqs, n_tokens, n_seqs, tokens, ChunkOut{}, logits);
}

Status ModelBase::forward_batch_argmax(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                       const int32_t* tokens, int32_t* next) {
    ChunkOut out;
    out.argmax = next;
    return forward_batch_rows(seqs, n_tokens, n_seqs, tokens, out, nullptr);
}

Status ModelBase::forward_batch_top_k(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                      const int32_t* tokens, int64_t k, int32_t* ids, float* vals) {
    MM_RETURN_IF_ERROR(check_top_k(k));
    ChunkOut out;
    out.top_k = k, out.top_ids = ids, out.top_vals = vals;
    MM_RETURN_IF_ERROR(forward_batch_rows(seqs, n_tokens, n_seqs, tokens, out, nullptr));
    return check_top_ids(ids, n_seqs * k);
}

Status ModelBase::forward_batch_rows(SequenceState* const* seqs, const int64_t* n_tokens, int64_t n_seqs,
                                     const int32_t* tokens, ChunkOut out, std::vector<float>* logits) {
    std::vector<Segment> segs;
    int64_t T = 0;
    MM_RETURN_IF_ERROR(batch_segments(seqs, n_tokens, n_seqs, tokens, &segs, &T));
    if (logits) {
        logits->assign(static_cast<size_t>(n_seqs * cfg_.n_vocab), 0.0f);
        out.logits = logits->data();
    }
    return run_chunk(segs.data(), n_seqs, tokens, T, false, out);
}

Status ModelBase::run_chunk(const Segment* segs, int64_t n_segs, const int32_t* tokens, int64_t T, bool all_rows,
                            const ChunkOut& out) {
    try {
        return forward_chunk(segs, n_segs, tokens, T, all_rows, out);
    } catch (const BackendOutOfMemory& e) {
        return MM_ERROR("%s, in the forward pass of %lld token(s) (prompts run in chunks of --batch %lld tokens: "
                        "a smaller one needs less)",
                        e.status.message().c_str(), static_cast<long long>(T),
                        static_cast<long long>(opts_.n_batch));
    }
}

void ModelBase::cb(const char* name, int layer, const float* data, int64_t rows, int64_t cols) {
    if (!debug_) return;
    if (be_->host_memory()) return debug_(name, layer, data, rows, cols);
    debug_host_.resize(static_cast<size_t>(rows * cols));
    be_->to_host(debug_host_.data(), data, sizeof(float) * rows * cols);
    debug_(name, layer, debug_host_.data(), rows, cols);
}

void ModelBase::layer_input_norm(float* x, const float* pending, const float* w, float* xn, int64_t T) {
    const int64_t H = cfg_.n_embd;
    if (pending) be_->add_rmsnorm(x, pending, w, xn, T, H, cfg_.rms_eps);
    else be_->rmsnorm(x, w, xn, T, H, cfg_.rms_eps);
}

const float* ModelBase::end_layer(int il, float* x, const float* out, int64_t T) {
    if (!debug_ && il + 1 < cfg_.n_layer) return out;
    be_->add(x, out, T * cfg_.n_embd);
    cb("l_out", il, x, T, cfg_.n_embd);
    return nullptr;
}

Status ModelBase::init_backend() {
    MM_ASSIGN_OR_RETURN(be_, make_backend(opts_.device, pool_));
    return be_->check_fits(*file_, cfg_, static_cast<bool>(opts_.experts));
}

StatusOr<BackendWeight> ModelBase::weight(const std::string& name, std::initializer_list<int64_t> shape) {
    MM_ASSIGN_OR_RETURN(Weight w, get_weight(*file_, name, shape));
    return be_->upload(w);
}

StatusOr<BackendWeight> ModelBase::optional_weight(const std::string& name, std::initializer_list<int64_t> shape) {
    MM_ASSIGN_OR_RETURN(Weight w, get_optional_weight(*file_, name, shape));
    if (!w) return BackendWeight{};
    return be_->upload(w);
}

StatusOr<const float*> ModelBase::vec(const std::string& name, int64_t n) {
    MM_ASSIGN_OR_RETURN(std::vector<float> v, load_vector(*file_, name, n));
    return be_->upload(v);
}

Status ModelBase::load_common() {
    const GgufFile& f = *file_;
    const int64_t H = cfg_.n_embd, V = cfg_.n_vocab;
    MM_ASSIGN_OR_RETURN(tok_embd_, get_weight(f, tensor_name(Tensor::kTokenEmbd), {H, V}));
    MM_ASSIGN_OR_RETURN(output_norm_, vec(tensor_name(Tensor::kOutputNorm), H));
    MM_ASSIGN_OR_RETURN(Weight out, get_optional_weight(f, tensor_name(Tensor::kOutput), {H, V}));
    output_ = be_->upload(out ? out : tok_embd_);  // tied embeddings: token_embd
    return be_->load_experts(f, cfg_, opts_.experts, pool_);
}

void ModelBase::embed(const int32_t* tokens, int64_t T, float* x) {
    const int64_t H = cfg_.n_embd;
    float* dst = x;
    if (!be_->host_memory()) {
        embd_host_.resize(static_cast<size_t>(T * H));
        dst = embd_host_.data();
    }
    for (int64_t t = 0; t < T; ++t) dequantize_row(tok_embd_.type, tok_embd_.row(tokens[t]), &dst[t * H], H);
    if (dst != x) be_->to_device(x, dst, sizeof(float) * T * H);
    cb("inp_embd", -1, x, T, H);
}

bool ModelBase::qkv_and_rope(const Segment* segs, int64_t n_segs, int il, int64_t T, const MatmulCall* qkv,
                             const float* q_norm, const float* k_norm) {
    if (n_segs != 1 || debug_) {
        be_->matmul_many(qkv, 3);
        return false;
    }
    SequenceState& seq = *segs->seq;
    be_->matmul_qkv_rope_store_kv(qkv, q_norm, k_norm, cfg_.rms_eps, T, cfg_.n_head, cfg_.n_head_kv, cfg_.head_dim,
                                  cfg_.rope_dim, seq.n_past, cfg_.rope, seq.k[il].data(), seq.v[il].data(),
                                  seq.kv_f16);
    return true;
}

void ModelBase::rope_and_attend(const Segment* segs, int64_t n_segs, int il, int64_t T, float* q, float* k,
                                const float* v, float* out, const float* q_norm, const float* k_norm, bool stored) {
    const int64_t D = cfg_.head_dim, Nh = cfg_.n_head, Nkv = cfg_.n_head_kv;
    const int64_t q_dim = Nh * D, kv_dim = Nkv * D;
    for (const Segment* sg = segs; !stored && sg != segs + n_segs; ++sg) {  // norms, rope q and k, store k, v
        SequenceState& seq = *sg->seq;
        const int64_t r = sg->row0, p0 = seq.n_past;
        be_->rope_store_kv(q + r * q_dim, k + r * kv_dim, v + r * kv_dim, q_norm, k_norm, cfg_.rms_eps, sg->n, Nh,
                           Nkv, D, cfg_.rope_dim, p0, cfg_.rope, seq.k[il].data(), seq.v[il].data(), seq.kv_f16);
    }
    cb("Qcur", il, q, T, q_dim);
    cb("Kcur", il, k, T, kv_dim);
    for (const Segment* sg = segs; sg != segs + n_segs; ++sg) {
        SequenceState& seq = *sg->seq;
        const int64_t r = sg->row0, p0 = seq.n_past;
        AttentionArgs aa{};
        aa.q = q + r * q_dim;
        aa.k = seq.k[il].data();
        aa.v = seq.v[il].data();
        aa.out = out + r * q_dim;
        aa.n_tokens = sg->n;
        aa.n_past = p0;
        aa.n_head = Nh;
        aa.n_head_kv = Nkv;
        aa.head_dim = D;
        aa.kv_f16 = seq.kv_f16;
        aa.scale = 1.0f / std::sqrt(static_cast<float>(D));
        be_->attention(aa);
    }
}

Status ModelBase::routed_moe(int il, const BackendWeight& router, const float* xn, int64_t T, float* out,
                             const NextNorm* next) {
    const int64_t E = cfg_.n_expert, K = cfg_.n_expert_used;
    float* probs = scratch(probs_, T * E);                   // [T, E]
    int32_t* sel_ids = scratch<int32_t>(sel_ids_, T * K);    // [T, K]
    float* sel_w = scratch(sel_w_, T * K);                   // [T, K]
    be_->matmul_route(router, xn, T, K, cfg_.norm_topk, probs, sel_ids, sel_w);
    if (next) {
        MM_RETURN_IF_ERROR(be_->moe_add_rmsnorm(il, xn, T, K, sel_ids, sel_w, out, next->x, next->w, next->y,
                                                cfg_.n_embd, cfg_.rms_eps));
    } else {
        MM_RETURN_IF_ERROR(be_->moe(il, xn, T, K, sel_ids, sel_w, out));
    }
    cb("ffn_moe_out", il, out, T, cfg_.n_embd);
    return Status();
}

// MOEMESH_HOST_LOGITS=1 (read once): output_logits picks the argmax / top-k on the host.
static bool host_logits() {
    static const bool on = [] {
        const char* e = std::getenv("MOEMESH_HOST_LOGITS");
        return e && std::strcmp(e, "1") == 0;
    }();
    return on;
}

void ModelBase::output_logits(const float* x, int64_t T, bool all_rows, const Segment* segs, int64_t n_segs,
                              const ChunkOut& out) {
    const int64_t H = cfg_.n_embd, V = cfg_.n_vocab;
    const int64_t rows = all_rows ? T : n_segs;
    const float* rows_in = x;  // [rows, H]
    if (!all_rows && n_segs == 1) {
        rows_in = &x[(T - 1) * H];
    } else if (!all_rows) {
        float* last = scratch(last_rows_, n_segs * H);  // each segment's last row
        for (int64_t i = 0; i < n_segs; ++i)
            be_->copy_rows(&last[i * H], H, &x[(segs[i].row0 + segs[i].n - 1) * H], H, 1, H);
        rows_in = last;
    }
    float* xn = scratch(final_norm_buf_, rows * H);
    be_->rmsnorm(rows_in, output_norm_, xn, rows, H, cfg_.rms_eps);
    cb("result_norm", -1, xn, rows, H);
    float* logits = be_->host_memory() && out.logits ? out.logits : scratch(logits_buf_, rows * V);
    be_->matmul(output_, xn, rows, logits);  // [rows, V]
    cb("result_output", -1, logits, rows, V);
    if ((out.argmax || out.top_ids) && !be_->host_memory() && host_logits()) {
        // MOEMESH_HOST_LOGITS=1: the logits downloaded and picked from here, as before the device
        // picks existed (an A/B switch for benchmarks; the same results).
        host_logits_.resize(static_cast<size_t>(rows * V));
        be_->to_host(host_logits_.data(), logits, sizeof(float) * rows * V);
        if (out.argmax) argmax_rows_host(host_logits_.data(), rows, V, out.argmax);
        else top_k_rows_host(host_logits_.data(), rows, V, out.top_k, out.top_ids, out.top_vals);
    } else if (out.argmax) {  // the greedy choices only: [rows] ids instead of [rows, V] logits
        int32_t* ids = be_->host_memory() ? out.argmax : scratch<int32_t>(argmax_buf_, rows);
        be_->argmax_rows(logits, rows, V, ids);
        if (ids != out.argmax) be_->to_host(out.argmax, ids, sizeof(int32_t) * rows);
    } else if (out.top_ids) {  // sampling's candidates only: [rows, k] ids and logits
        const int64_t k = out.top_k;
        if (be_->host_memory()) {
            be_->top_k_rows(logits, rows, V, k, out.top_ids, out.top_vals);
        } else {  // ids then values in one buffer: one download
            int32_t* ids = scratch<int32_t>(top_buf_, 2 * rows * k);
            be_->top_k_rows(logits, rows, V, k, ids, reinterpret_cast<float*>(ids + rows * k));
            top_host_.resize(static_cast<size_t>(2 * rows * k));
            be_->to_host(top_host_.data(), ids, sizeof(int32_t) * 2 * rows * k);
            std::memcpy(out.top_ids, top_host_.data(), sizeof(int32_t) * rows * k);
            std::memcpy(out.top_vals, top_host_.data() + rows * k, sizeof(float) * rows * k);
        }
    } else if (logits != out.logits) {
        be_->to_host(out.logits, logits, sizeof(float) * rows * V);
    }
}

StatusOr<std::unique_ptr<Model>> load_model(std::shared_ptr<GgufFile> file, const ModelOptions& opts) {
    MM_ASSIGN_OR_RETURN(ModelConfig cfg, load_model_config(*file));
    const std::string path = file->path();
    try {  // (Backend::check_fits refuses weights that do not fit before this could happen)
        switch (cfg.arch) {
            case Arch::kQwen3Moe: return load_qwen3moe(std::move(file), cfg, opts);
            case Arch::kQwen3Next:
            case Arch::kQwen35Moe: return load_qwen3next(std::move(file), cfg, opts);
            default: break;
        }
    } catch (const BackendOutOfMemory& e) {
        return MM_ERROR("%s: loading it: %s", path.c_str(), e.status.message().c_str());
    }
    return MM_ERROR("%s: no forward pass for architecture '%s'", path.c_str(), cfg.arch_name.c_str());
}

}  // namespace moemesh
