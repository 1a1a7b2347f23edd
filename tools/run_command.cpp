// `moemesh run`: generate text from a prompt, or (--tokens ... --json) print next-token
// distributions at every position for parity checks against llama.cpp.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/tokenizer.h"
#include "common/tokenizer_unicode.h"
#include "coordinator/model.h"
#include "coordinator/sampler.h"
#include "common/placement.h"
#include "coordinator/remote_experts.h"
#include "worker/cuda_expert_compute.h"
#include "worker/expert_cache.h"
#include "worker/expert_executor.h"
#include "tools/commands.h"
#include "tools/http_server.h"
#include "tools/run_command.h"
#include "tools/chat_command.h"

#include "common/chat_template.h"
#include "common/grammar.h"
#include "common/reply_grammar.h"

namespace moemesh {

int default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
}

namespace {

// MemAvailable of /proc/meminfo in bytes; 0 when unknown.
uint64_t available_memory_bytes() {
    std::FILE* f = std::fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (std::fgets(line, sizeof(line), f))
        if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    std::fclose(f);
    return static_cast<uint64_t>(kb) * 1024;
}

}  // namespace

uint64_t auto_host_budget(const GgufFile& f, uint64_t available, std::string* note) {
    constexpr uint64_t kMinimum = uint64_t{256} << 20;  // less is not worth pinning
    uint64_t routed = 0;
    for (const GgufTensor& t : f.tensors())
        if (is_routed_expert_tensor(t.name)) routed += t.nbytes;
    if (available == 0) {
        *note = "MemAvailable unknown (no /proc/meminfo): no host tier";
        return 0;
    }
    const uint64_t half = available / 2;
    if (routed < kMinimum) {
        *note = "the routed experts are only " + format_bytes(routed) + ": no host tier";
        return 0;
    }
    if (half < kMinimum) {
        *note = "only " + format_bytes(half) + " to spare (half of MemAvailable " + format_bytes(available) +
                "): no host tier";
        return 0;
    }
    if (routed <= half) {
        *note = "pinned host tier of " + format_bytes(routed) + ": every routed expert";
        return routed;
    }
    *note = "pinned host tier of " + format_bytes(half) + ": half of MemAvailable " + format_bytes(available) +
            " (routed experts " + format_bytes(routed) + ")";
    return half;
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Status parse_token_list(const std::string& s, std::vector<int32_t>* out) {
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) {
        if (item.empty()) continue;
        char* end = nullptr;
        long v = std::strtol(item.c_str(), &end, 10);
        if (*end != '\0' || v < 0 || v > INT32_MAX)
            return MM_ERROR("--tokens: '%s' is not a non-negative token id", item.c_str());
        out->push_back(static_cast<int32_t>(v));
    }
    if (out->empty()) return MM_ERROR("--tokens: no token ids given");
    return Status();
}

// One request: a fresh sequence, prompt processing, then generation.
// --json runs greedy (the parity interface); else the sampling options.
Sampler& sampler_for_run(const RunOptions& o, Sampler& sampler, Sampler& greedy) { return o.json ? greedy : sampler; }

StatusOr<std::string> read_text_file(const std::string& path, const char* option) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return MM_ERROR("%s %s: cannot read the file", option, path.c_str());
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// --json-schema: inline JSON, or @FILE.
StatusOr<nlohmann::ordered_json> load_json_schema(const std::string& arg) {
    std::string text = arg;
    if (!arg.empty() && arg[0] == '@') {
        MM_ASSIGN_OR_RETURN(text, read_text_file(arg.substr(1), "--json-schema"));
    }
    nlohmann::ordered_json schema = nlohmann::ordered_json::parse(text, nullptr, false);
    if (schema.is_discarded() || !(schema.is_object() || schema.is_boolean()))
        return MM_ERROR("--json-schema: not a JSON schema object: %s", arg.substr(0, 200).c_str());
    return schema;
}

// --grammar-file / --json-schema, read and checked once (before the model loads) for every
// generation of the run.
struct RunGrammar {
    std::shared_ptr<const Grammar> file;  // --grammar-file
    nlohmann::ordered_json schema;        // --json-schema (its grammar depends on each prompt's thinking)
    std::shared_ptr<const GrammarVocab> vocab;
};

StatusOr<RunGrammar> load_run_grammar(const RunOptions& o) {
    RunGrammar rg;
    if (!o.grammar_file.empty()) {
        MM_ASSIGN_OR_RETURN(std::string gbnf, read_text_file(o.grammar_file, "--grammar-file"));
        StatusOr<std::shared_ptr<const Grammar>> g = Grammar::parse(gbnf);
        if (!g.ok()) return MM_ERROR("%s: %s", o.grammar_file.c_str(), g.status().message().c_str());
        rg.file = std::move(g).value();
    } else {
        MM_ASSIGN_OR_RETURN(rg.schema, load_json_schema(o.json_schema));
        StatusOr<std::string> text = json_reply_gbnf(&rg.schema, ReplyThinking::kNone);
        if (!text.ok()) return MM_ERROR("--json-schema: %s", text.status().message().c_str());
    }
    return rg;
}

Status generate_one(const RunOptions& o, const std::string& prompt, const std::string& tokens, Model& model,
                    const Tokenizer& tok, const ChatFormatter* chat, DistributedExpertBackend* dist,
                    const ExpertCache* cache, const RunGrammar* rg) {
    const ModelConfig& cfg = model.config();
    std::vector<int32_t> input;
    if (!tokens.empty()) {
        MM_RETURN_IF_ERROR(parse_token_list(tokens, &input));
    } else {
        std::string text = prompt;
        if (o.chat && chat) {
            ChatFormatter::Input in;
            if (!o.system.empty()) in.messages.push_back({{"role", "system"}, {"content", o.system}});
            in.messages.push_back({{"role", "user"}, {"content", prompt}});
            if (o.no_think) in.kwargs = {{"enable_thinking", false}};
            MM_ASSIGN_OR_RETURN(text, chat->apply(in));
        }
        input = tok.encode(text, /*parse_special=*/true);
        if (tok.add_bos() && tok.bos_id() >= 0) input.insert(input.begin(), tok.bos_id());
        if (input.empty()) return MM_ERROR("--prompt: the prompt encodes to no tokens");
    }
    const int64_t n_ctx = std::min<int64_t>(o.ctx, static_cast<int64_t>(input.size()) + o.n_predict);
    if (static_cast<int64_t>(input.size()) + o.n_predict > o.ctx)
        return MM_ERROR("prompt (%zu tokens) + -n %d exceeds the context size %lld (raise --ctx)", input.size(),
                        o.n_predict, static_cast<long long>(o.ctx));
    MM_ASSIGN_OR_RETURN(std::unique_ptr<SequenceState> seq, model.new_sequence(std::max<int64_t>(n_ctx, 1)));
    const int64_t V = cfg.n_vocab;
    std::vector<float> logits;

    auto t_prompt = std::chrono::steady_clock::now();
    const bool all_logits = o.json || o.top_n > 0;
    MM_RETURN_IF_ERROR(model.forward(*seq, input.data(), static_cast<int64_t>(input.size()), all_logits, &logits));
    const double prompt_s = seconds_since(t_prompt);

    nlohmann::json j;
    if (o.json) {
        const int top_n = o.top_n > 0 ? o.top_n : 20;
        auto& positions = j["positions"] = nlohmann::json::array();
        for (size_t p = 0; p < input.size(); ++p) {
            nlohmann::json top = nlohmann::json::array();
            for (auto& [id, prob] : top_probs(&logits[p * V], V, top_n)) top.push_back({id, prob});
            positions.push_back({{"pos", p}, {"top", std::move(top)}});
        }
    }
    const float* last = &logits[(all_logits ? input.size() - 1 : 0) * V];

    Sampler sampler(o.sp);
    SamplerParams greedy_params;
    greedy_params.greedy = true;
    Sampler greedy(greedy_params);

    // --grammar-file / --json-schema: the reply is held to a grammar (a chat reply of a thinking
    // template may reason first).
    std::unique_ptr<TokenConstraint> constraint;
    if (rg) {
        std::shared_ptr<const Grammar> g = rg->file;
        if (!g) {
            const ReplyThinking thinking = !(o.chat && chat)                       ? ReplyThinking::kNone
                                           : prompt_opens_think_block(tok.decode(input)) ? ReplyThinking::kOpen
                                           : chat->thinks()                            ? ReplyThinking::kOptional
                                                                                        : ReplyThinking::kNone;
            StatusOr<std::string> text = json_reply_gbnf(&rg->schema, thinking);
            if (!text.ok()) return MM_ERROR("--json-schema: %s", text.status().message().c_str());
            StatusOr<std::shared_ptr<const Grammar>> parsed = Grammar::parse(text.value());
            if (!parsed.ok()) return MM_ERROR("--json-schema: %s", parsed.status().message().c_str());
            g = std::move(parsed).value();
        }
        constraint = std::make_unique<TokenConstraint>(g, rg->vocab);
    }
    auto pick = [&](const float* l) -> StatusOr<int32_t> {
        if (!constraint) return sampler_for_run(o, sampler, greedy).sample(l, V);
        const int32_t id = sampler_for_run(o, sampler, greedy).sample(l, V, *constraint);
        if (id < 0) return MM_ERROR("no token of the vocabulary can continue the text under the grammar");
        constraint->accept(id);
        return id;
    };

    // Without a grammar, greedy: each step's choice is the logits' argmax; top-k sampling: a draw
    // from the k largest. The model finds them where the logits are (on a GPU: one id, or k ids and
    // logits, downloaded instead of n_vocab floats).
    const bool argmax_only = !constraint && sampler_for_run(o, sampler, greedy).greedy();
    const int64_t top_k = constraint || argmax_only ? 0 : sampler_for_run(o, sampler, greedy).candidates(V);
    std::vector<int32_t> top_ids(static_cast<size_t>(top_k));
    std::vector<float> top_vals(static_cast<size_t>(top_k));
    std::vector<int32_t> generated;
    std::string pending;
    auto t_decode = std::chrono::steady_clock::now();
    MM_ASSIGN_OR_RETURN(int32_t next, pick(last));
    for (int i = 0; i < o.n_predict; ++i) {
        // Under a grammar, end of generation comes only where the text is complete: it ends it.
        if ((!o.ignore_eos || constraint) && !o.json && tok.is_eog(next)) break;
        generated.push_back(next);
        if (!o.json) {
            pending += tok.token_to_piece(next);
            size_t n = unicode::utf8_complete_prefix(pending);
            std::fwrite(pending.data(), 1, n, stdout);
            std::fflush(stdout);
            pending.erase(0, n);
        }
        if (i + 1 == o.n_predict) break;
        if (argmax_only) {
            const int32_t fed = next;
            MM_RETURN_IF_ERROR(model.forward_argmax(*seq, &fed, 1, &next));
            continue;
        }
        if (top_k > 0 && top_k <= kModelTopKMax) {
            MM_RETURN_IF_ERROR(model.forward_top_k(*seq, &next, 1, top_k, top_ids.data(), top_vals.data()));
            next = sampler_for_run(o, sampler, greedy).sample_candidates(top_ids.data(), top_vals.data(), top_k);
            continue;
        }
        MM_RETURN_IF_ERROR(model.forward(*seq, &next, 1, false, &logits));
        MM_ASSIGN_OR_RETURN(next, pick(logits.data()));
    }
    const double decode_s = seconds_since(t_decode);
    if (o.json) {
        j["greedy"] = generated;
        std::cout << j.dump() << std::endl;
    } else {
        std::fwrite(pending.data(), 1, pending.size(), stdout);
        std::printf("\n");
        std::fflush(stdout);
    }
    const double decode_tps = generated.size() > 1 ? (generated.size() - 1) / decode_s : 0.0;
    std::fprintf(stderr, "prompt: %zu tokens in %.3f s (%.2f tokens/s) | decode: %zu tokens in %.3f s (%.2f tokens/s)\n",
                 input.size(), prompt_s, input.size() / prompt_s, generated.size(), decode_s, decode_tps);
    if (dist) std::fprintf(stderr, "workers: %s\n", dist->stats_line().c_str());
    if (cache) std::fprintf(stderr, "%s\n", cache->stats_line().c_str());
    return Status();
}

}  // namespace

Status run_generation(const RunOptions& o) {
    if (!o.serve.empty()) {
        if (!o.prompt.empty() || !o.tokens.empty() || o.stdin_requests || o.json || o.chat)
            return MM_ERROR("--serve takes requests over HTTP: drop --prompt, --tokens, --stdin, --json and --chat");
    } else if (o.interactive) {
        if (!o.prompt.empty() || !o.tokens.empty() || o.stdin_requests || o.json)
            return MM_ERROR("--interactive reads the conversation from stdin: drop --prompt, --tokens, --stdin and --json");
    } else if (o.stdin_requests ? !(o.prompt.empty() && o.tokens.empty()) : o.prompt.empty() == o.tokens.empty()) {
        return MM_ERROR("give exactly one of --prompt, --tokens, --stdin, --serve or --chat --interactive");
    }
    if (o.kv_type != "f16" && o.kv_type != "f32") return MM_ERROR("--kv-type must be f16 or f32, got '%s'", o.kv_type.c_str());
    auto t_load = std::chrono::steady_clock::now();
    // Cluster mode: the experts live in the workers the placement file names.
    std::optional<ClusterConfig> cluster;
    std::string model_path = o.model;
    if (!o.cluster.empty()) {
        MM_ASSIGN_OR_RETURN(cluster, load_cluster_config(o.cluster));
        if (model_path.empty()) model_path = cluster->model_path;
        if (model_path.empty()) return MM_ERROR("%s: no 'model:' given (or pass --model)", o.cluster.c_str());
    }
    if (model_path.empty()) return MM_ERROR("--model is required (or --cluster with a 'model:' key)");
    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> gf, GgufFile::open(model_path));
    std::shared_ptr<GgufFile> file(std::move(gf));
    MM_ASSIGN_OR_RETURN(Tokenizer tok, Tokenizer::from_gguf(*file));
    // The chat template, checked before the (long) model load.
    std::shared_ptr<const ChatFormatter> chat;
    if (o.chat || !o.serve.empty()) {
        std::string warning;
        MM_ASSIGN_OR_RETURN(ChatFormatter f, chat_formatter_for(tok, o.chat_template_file, &warning));
        if (!warning.empty()) std::fprintf(stderr, "warning: %s\n", warning.c_str());
        chat = std::make_shared<const ChatFormatter>(std::move(f));
    } else if (!o.chat_template_file.empty() || !o.system.empty() || o.no_think) {
        return MM_ERROR("--chat-template-file, --system and --no-think apply to --chat and --serve only");
    }
    if ((o.interactive || o.verbose_prompt) && !o.chat) return MM_ERROR("--interactive and --verbose-prompt need --chat");
    std::optional<RunGrammar> run_grammar;
    if (!o.grammar_file.empty() || !o.json_schema.empty()) {
        if (!o.grammar_file.empty() && !o.json_schema.empty())
            return MM_ERROR("give one of --grammar-file and --json-schema");
        if (o.json || !o.serve.empty() || o.interactive)
            return MM_ERROR("--grammar-file and --json-schema apply to --prompt / --tokens / --stdin generation "
                            "(with --serve, requests carry \"grammar\", \"json_schema\" or \"response_format\")");
        // Checked before the (long) model load.
        MM_ASSIGN_OR_RETURN(RunGrammar loaded, load_run_grammar(o));
        loaded.vocab = std::make_shared<const GrammarVocab>(tok);
        run_grammar = std::move(loaded);
    }
    if (!o.serve.empty() && o.parallel > o.batch)
        return MM_ERROR("--parallel %d exceeds --batch %lld: one decode step runs a token of every request in one "
                        "batch (raise --batch or lower --parallel)",
                        o.parallel, static_cast<long long>(o.batch));
    ModelOptions mo;
    mo.n_threads = o.threads > 0 ? o.threads : (cluster && cluster->coordinator.threads > 0 ? cluster->coordinator.threads
                                                                                           : default_threads());
    mo.n_batch = o.batch;
    mo.kv_f16 = o.kv_type == "f16";
    mo.device = o.device;
    DistributedExpertBackend* dist = nullptr;
    if (cluster) {
        MM_ASSIGN_OR_RETURN(ModelConfig mcfg, load_model_config(*file));
        MM_ASSIGN_OR_RETURN(OwnershipMap map, resolve_placement(*cluster, mcfg, file.get()));
        if (o.timeout_ms > 0) cluster->coordinator.timeout_ms = o.timeout_ms;
        const ClusterConfig& cc = *cluster;
        mo.experts = [&cc, map, &dist](const GgufFile& f, const ModelConfig& c,
                                       ThreadPool& pool) -> StatusOr<std::unique_ptr<ExpertBackend>> {
            MM_ASSIGN_OR_RETURN(std::unique_ptr<DistributedExpertBackend> b,
                                DistributedExpertBackend::create(cc, map, f, c, pool));
            std::fprintf(stderr, "coordinator: connecting to %zu workers\n", cc.workers.size());
            MM_RETURN_IF_ERROR(b->connect_all(std::chrono::minutes(10), [](const std::string& w, uint64_t a, uint64_t t) {
                if (t > 0 && a < t) std::fprintf(stderr, "coordinator: worker '%s' loading %.0f%%\n", w.c_str(), 100.0 * a / t);
            }));
            std::fprintf(stderr, "coordinator: all workers ready\n");
            dist = b.get();
            return std::unique_ptr<ExpertBackend>(std::move(b));
        };
    }
    // Offload mode: every expert through a budgeted cache (device tier: a bounded RAM pool on CPU, VRAM
    // of the same GPU with --device cuda:N).
    std::shared_ptr<ExpertCache> cache;
    const ExpertCache* cache_view = nullptr;  // for the stats line (the GPU's cache is owned by its backend)
    if (o.device_budget.empty()) {
        if (!o.host_budget.empty() || o.cache_policy != "lru" || o.prefetch != "none" || !o.profile.empty() ||
            o.storage != "auto")
            return MM_ERROR("--host-budget, --cache-policy, --prefetch, --profile and --storage need --device-budget");
    } else {
        if (cluster)
            return MM_ERROR("--device-budget is for a single process; with --cluster give each worker a cache: entry "
                            "in the YAML");
        CacheOptions co;
        const std::string dev = o.device == "cuda" ? "cuda:0" : o.device.empty() ? "cpu" : o.device;
        MM_ASSIGN_OR_RETURN(const int gpu, parse_compute_device(dev, "--device"));
        const bool device_auto = o.device_budget == "auto";
        if (device_auto && gpu < 0)
            return MM_ERROR("--device-budget auto is for --device cuda:N (the VRAM that the rest of the model and its "
                            "KV cache leave); on the CPU give a size");
        if (!device_auto) {
            MM_ASSIGN_OR_RETURN(co.device_bytes, parse_cache_budget(o.device_budget, "--device-budget"));
        }
        const bool host_auto = o.host_budget == "auto";
        if (!o.host_budget.empty() && !host_auto) {
            MM_ASSIGN_OR_RETURN(co.host_bytes, parse_cache_budget(o.host_budget, "--host-budget"));
        }
        MM_ASSIGN_OR_RETURN(co.policy, parse_cache_policy(o.cache_policy));
        MM_ASSIGN_OR_RETURN(co.prefetch, parse_prefetch_mode(o.prefetch));
        {
            StatusOr<StorageMode> sm = parse_storage_mode(o.storage);
            if (!sm.ok()) return MM_ERROR("--storage: %s", sm.status().message().c_str());
            co.storage = sm.value();
        }
        co.profile_path = o.profile;
        if (host_auto && gpu < 0)
            return MM_ERROR("--host-budget auto is for --device cuda:N (a pinned RAM tier below VRAM); on the CPU the "
                            "device tier is RAM already: give a size, or leave it out");
        if (gpu >= 0) {
            // Coordinator and experts on one GPU: a CudaExpertCompute cache the CudaBackend calls with
            // device pointers (coordinator/cuda_backend.cpp moe_device_cache).
            const int64_t sequences = o.serve.empty() ? 1 : std::max(o.parallel, 1);
            const size_t kv_elem = o.kv_type == "f32" ? 4 : 2;
            mo.experts = [co, gpu, host_auto, device_auto, sequences, kv_elem, ctx = o.ctx, &cache_view](
                             const GgufFile& f, const ModelConfig& c,
                             ThreadPool&) -> StatusOr<std::unique_ptr<ExpertBackend>> {
                CacheOptions opts = co;
                if (device_auto) {
                    // What the cache leaves free: every sequence's KV cache at --ctx, and scratch.
                    int64_t kv_layers = 0;
                    for (int il = 0; il < c.n_layer; ++il) kv_layers += c.is_recurrent(il) ? 0 : 1;
                    const uint64_t kv = static_cast<uint64_t>(kv_layers * 2 * ctx * c.n_head_kv * c.head_dim) *
                                        kv_elem * static_cast<uint64_t>(sequences);
                    opts.device_keep_free = kv + kAutoDeviceScratch;
                    std::fprintf(stderr, "offload: --device-budget auto: the free VRAM less %s (%lld KV cache(s) of "
                                 "%lld positions) and %s of scratch\n", format_bytes(kv).c_str(),
                                 static_cast<long long>(sequences), static_cast<long long>(ctx),
                                 format_bytes(kAutoDeviceScratch).c_str());
                }
                std::string host_note;
                if (host_auto) {
                    opts.host_bytes = auto_host_budget(f, available_memory_bytes(), &host_note);
                    std::fprintf(stderr, "offload: --host-budget auto: %s\n", host_note.c_str());
                }
                MM_ASSIGN_OR_RETURN(std::unique_ptr<CudaExpertCompute> cc,
                                    CudaExpertCompute::create(f, c, {}, gpu, &opts));
                ExpertCache* ch = cc->cache();
                std::fprintf(stderr,
                             "offload: %s of routed experts; cuda:%d device budget %s (%.0f%%) in VRAM%s, policy %s, "
                             "prefetch %s%s\n",
                             format_bytes(cc->shard_bytes()).c_str(), gpu, format_bytes(cc->device_budget()).c_str(),
                             cc->shard_bytes() ? 100.0 * static_cast<double>(cc->device_budget()) / cc->shard_bytes()
                                               : 0.0,
                             opts.host_bytes ? (", pinned host budget " + format_bytes(opts.host_bytes)).c_str() : "",
                             cache_policy_name(co.policy), prefetch_mode_name(co.prefetch),
                             ch->hot_set_bytes() ? (", hot set " + format_bytes(ch->hot_set_bytes()) + " pinned").c_str()
                                                 : "");
                ch->reset_counters();
                cache_view = ch;
                return std::unique_ptr<ExpertBackend>(std::make_unique<CudaExpertBackend>(std::move(cc)));
            };
        } else {
            mo.experts = [co, &cache](const GgufFile& f, const ModelConfig& c,
                                      ThreadPool& pool) -> StatusOr<std::unique_ptr<ExpertBackend>> {
                MM_ASSIGN_OR_RETURN(std::shared_ptr<ExpertCache> ch, ExpertCache::create(f, c, {}, co));
                MM_RETURN_IF_ERROR(ch->warm_up());
                std::fprintf(stderr,
                             "offload: %s of routed experts; device budget %s (%.0f%%)%s, policy %s, prefetch %s%s\n",
                             format_bytes(ch->shard_bytes()).c_str(), format_bytes(co.device_bytes).c_str(),
                             ch->shard_bytes() ? 100.0 * static_cast<double>(co.device_bytes) / ch->shard_bytes() : 0.0,
                             co.host_bytes ? (", host budget " + format_bytes(co.host_bytes)).c_str() : "",
                             cache_policy_name(co.policy), prefetch_mode_name(co.prefetch),
                             ch->hot_set_bytes() ? (", hot set " + format_bytes(ch->hot_set_bytes()) + " pinned").c_str()
                                                 : "");
                ch->reset_counters();
                cache = ch;
                return std::unique_ptr<ExpertBackend>(LocalExpertExecutor::create(c, pool, ch));
            };
        }
    }
    MM_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, load_model(file, mo));
    if (cache) cache_view = cache.get();
    // The CPU engine reads its weights from the mapped file: map every page now (llama.cpp does the
    // same with MAP_POPULATE) unless the file is larger than the memory available, so that the
    // first request does not pay the page faults (or, for a cold file, the disk reads).
    if (!o.no_prefault && !cluster && o.device_budget.empty() && (o.device.empty() || o.device == "cpu")) {
        const uint64_t total = file->total_size(), avail = available_memory_bytes();
        if (avail == 0 || total <= avail) {
            auto t_last = std::chrono::steady_clock::now();
            bool reported = false;
            MM_RETURN_IF_ERROR(file->populate([&](uint64_t done, uint64_t all) {
                if (seconds_since(t_last) < 2.0 && !(reported && done == all)) return;
                t_last = std::chrono::steady_clock::now();
                reported = true;
                std::fprintf(stderr, "loading: %s of %s of the model file read in\n", format_bytes(done).c_str(),
                             format_bytes(all).c_str());
            }));
        } else {
            std::fprintf(stderr, "note: the model file (%s) is larger than the memory available (%s): its pages are "
                                 "read as the requests need them\n",
                         format_bytes(total).c_str(), format_bytes(avail).c_str());
        }
    }
    const ModelConfig& cfg = model->config();
    std::fprintf(stderr, "loaded %s (%s, %lld layers, %lld experts top-%lld) in %.2f s, %d threads (%s)%s\n",
                 model_path.c_str(), cfg.arch_name.c_str(), static_cast<long long>(cfg.n_layer),
                 static_cast<long long>(cfg.n_expert), static_cast<long long>(cfg.n_expert_used),
                 seconds_since(t_load), mo.n_threads, cpu_kernel_isa(),
                 cluster ? ", experts on the cluster's workers" : "");

    if (!o.serve.empty()) {
        HttpServerOptions ho;
        ho.model_name = cfg.name.empty() ? model_path.substr(model_path.rfind('/') + 1) : cfg.name;
        ho.limits.n_ctx = o.ctx;
        ho.limits.n_vocab = cfg.n_vocab;
        ho.limits.defaults = o.sp;
        ho.limits.ignore_eos = o.ignore_eos;
        ho.chat = chat;
        ho.max_parallel = o.parallel;
        ho.prompt_chunk = o.batch;
        return serve_http(*model, tok, o.serve, ho);
    }
    if (o.interactive) return chat_loop(o, *model, tok, *chat);
    const RunGrammar* rg = run_grammar ? &*run_grammar : nullptr;
    if (!o.stdin_requests) return generate_one(o, o.prompt, o.tokens, *model, tok, chat.get(), dist, cache_view, rg);
    // One request per stdin line (token ids with --json, else prompt text); a failed request is
    // reported and the next one is served.
    std::string line;
    int failed = 0;
    while (std::getline(std::cin, line)) {
        if (line.empty()) continue;
        Status st = o.json ? generate_one(o, "", line, *model, tok, chat.get(), dist, cache_view, rg)
                           : generate_one(o, line, "", *model, tok, chat.get(), dist, cache_view, rg);
        if (!st.ok()) {
            ++failed;
            std::fprintf(stderr, "error: request failed: %s\n", st.message().c_str());
            if (o.json) std::cout << nlohmann::json({{"error", st.message()}}).dump() << std::endl;
        }
    }
    if (failed) return MM_ERROR("%d request(s) failed", failed);
    return Status();
}

void add_run_options(CLI::App* c, const std::shared_ptr<RunOptions>& o, bool cluster_required) {
    c->add_option("-m,--model", o->model, cluster_required ? "GGUF model file (default: the cluster file's 'model:')"
                                                           : "GGUF model file")
        ->check(CLI::ExistingFile);
    auto* cl = c->add_option("--cluster", o->cluster,
                             "Placement YAML: run the routed experts on the workers it names (see deploy/examples)")
                   ->check(CLI::ExistingFile);
    if (cluster_required) cl->required();
    c->add_option("--timeout-ms", o->timeout_ms, "With --cluster: deadline of one layer call to a worker (default: the "
                                                 "cluster file's coordinator.timeout_ms)");
    c->add_option("-p,--prompt", o->prompt, "Prompt text (special tokens like <|im_start|> are parsed)");
    c->add_option("--tokens", o->tokens, "Comma-separated token ids to feed instead of a prompt");
    c->add_flag("--stdin", o->stdin_requests,
                "Serve one request per line of stdin (token ids with --json, else prompt text) until EOF");
    c->add_flag("--chat", o->chat,
                "Format the prompt as a user message with the model's chat template (the GGUF's "
                "tokenizer.chat_template; the built-in ChatML one if the file has none)");
    c->add_option("--system", o->system, "With --chat: a system message before the prompt");
    c->add_flag("-i,--interactive", o->interactive,
                "With --chat: a conversation on the terminal; each stdin line is a user turn ('\\' at the end "
                "continues it), /reset starts over, /exit or end of input quits; -n bounds each reply, --ctx "
                "the conversation (`moemesh chat` is this with -n 2048)");
    c->add_flag("--verbose-prompt", o->verbose_prompt, "With --chat: print each rendered prompt on stderr");
    c->add_flag("--no-think", o->no_think,
                "With --chat: enable_thinking=false for the template (Qwen3: no reasoning block)");
    c->add_option("--chat-template-file", o->chat_template_file,
                  "Jinja chat template for --chat and --serve instead of the model's own")
        ->check(CLI::ExistingFile);
    c->add_option("--serve", o->serve,
                  "HOST:PORT: serve an OpenAI-compatible HTTP API instead of one prompt (POST /v1/completions, "
                  "/v1/chat/completions, streaming with \"stream\": true; GET /v1/models, /health). Sampling "
                  "options become the defaults of requests; --ctx bounds prompt + max_tokens");
    c->add_option("--parallel", o->parallel,
                  "With --serve: requests generated together, one decode step for all of them (continuous "
                  "batching; each keeps its own KV cache, sized to its prompt + max_tokens); more wait for a slot")
        ->capture_default_str()
        ->check(CLI::Range(1, 256));
    c->add_option("-n,--n-predict", o->n_predict, "Tokens to generate")->capture_default_str()->check(CLI::Range(0, 1 << 20));
    c->add_option("--top", o->top_n, "With --json: top-N next-token probabilities per position (default 20)");
    c->add_flag("--json", o->json,
                "Print one JSON object {positions:[{pos,top:[[id,prob]...]}...], greedy:[ids]} on stdout "
                "(full softmax at temperature 1; greedy continuation of -n tokens)");
    c->add_option("-t,--threads", o->threads, "Threads (default: all cores)");
    c->add_option("-c,--ctx", o->ctx, "Context size (tokens)")->capture_default_str()->check(CLI::Range(1, 1 << 24));
    c->add_option("-b,--batch", o->batch, "Prompt tokens per forward chunk")->capture_default_str()->check(CLI::Range(1, 1 << 16));
    c->add_option("--kv-type", o->kv_type, "KV cache element type: f16 (as llama.cpp) or f32")->capture_default_str();
    c->add_option("--device", o->device,
                  "Where the forward pass, its weights and the sequence state live: cpu, or cuda:N (experts resident "
                  "in VRAM; needs a CUDA build)")
        ->capture_default_str();
    c->add_option("--temp", o->sp.temperature, "Temperature (0 = greedy)")->capture_default_str();
    c->add_option("--top-k", o->sp.top_k, "Top-k cut (0 = off)")->capture_default_str();
    c->add_option("--top-p", o->sp.top_p, "Top-p (nucleus) cut (1 = off)")->capture_default_str();
    c->add_option("--min-p", o->sp.min_p, "Min-p cut relative to the best token (0 = off)")->capture_default_str();
    c->add_option("--seed", o->sp.seed, "Sampling seed")->capture_default_str();
    c->add_flag("--greedy", o->sp.greedy, "Always pick the most likely token");
    c->add_flag("--ignore-eos", o->ignore_eos, "Keep generating past end-of-generation tokens");
    c->add_flag("--no-prefault", o->no_prefault,
                "Do not read the model file in at load (by default, on CPU and when the file fits in the memory "
                "available, every page is mapped before the first request, as llama.cpp does)");
    c->add_option("--grammar-file", o->grammar_file,
                  "Constrain the generated text to a GBNF grammar (llama.cpp's format; the start rule is 'root')")
        ->check(CLI::ExistingFile);
    c->add_option("--json-schema", o->json_schema,
                  "Constrain the reply to JSON matching this JSON schema (inline, or @FILE); with --chat a "
                  "thinking model may reason first");
    c->add_option("--device-budget", o->device_budget,
                  "Offload mode: serve the routed experts from a cache of at most this many bytes (e.g. 8GiB; on CPU a "
                  "bounded RAM pool, with --device cuda:N VRAM of that GPU), reading missing experts from the model "
                  "file (see docs/cache.md, docs/cuda.md). 'auto' (with --device cuda:N): the VRAM that the rest of "
                  "the model, the KV cache at --ctx (per --parallel request with --serve) and 512 MiB of scratch "
                  "leave, at most every routed expert");
    c->add_option("--host-budget", o->host_budget,
                  "Offload mode: a host RAM tier of this size below the device tier (pinned with --device cuda:N). "
                  "'auto' (with --device cuda:N): every routed expert, or half of MemAvailable if less; missed "
                  "experts then reach VRAM by DMA from pinned RAM instead of file reads once they were read once");
    c->add_option("--cache-policy", o->cache_policy, "Offload mode: lru, lfu or static (hot set from --profile)")
        ->capture_default_str();
    c->add_option("--prefetch", o->prefetch,
                  "Offload mode: none, or next-layer (layer l+1's router on layer l's activations)")
        ->capture_default_str();
    c->add_option("--profile", o->profile, "Expert profile (moemesh profile) for --cache-policy static")
        ->check(CLI::ExistingFile);
    c->add_option("--storage", o->storage,
                  "Offload mode: how missing experts are read from the model file: auto (io_uring when this build "
                  "and kernel allow it, else pread), pread or io_uring")
        ->capture_default_str();
}

namespace {

// A subcommand whose options are those of `run`, preset by `preset`.
void add_run_like(CLI::App& app, const char* name, const char* help, void (*preset)(RunOptions&)) {
    auto o = std::make_shared<RunOptions>();
    preset(*o);  // before add_run_options, so that --help shows these defaults
    CLI::App* c = app.add_subcommand(name, help);
    add_run_options(c, o, false);
    c->footer(
        "CPU kernels: the best instruction set this CPU has (avx512vnni, avxvnni, avx2, else scalar), shown on the "
        "'loaded' line; the environment variable MOEMESH_CPU_ISA=avx2|avxvnni|avx512vnni|scalar picks another (all "
        "SIMD ones give the same bits).");
    c->callback([o]() {
        Status st = run_generation(*o);
        if (!st.ok()) {
            std::fprintf(stderr, "error: %s\n", st.message().c_str());
            std::exit(1);
        }
    });
}

}  // namespace

void register_run_command(CLI::App& app) {
    add_run_like(app, "run", "Generate text from a prompt (or score token ids with --json)", [](RunOptions&) {});
    // `moemesh chat`: `run --chat --interactive` with replies of up to 2048 tokens.
    add_run_like(app, "chat",
                 "Chat with a model on the terminal (its own chat template; each line a turn, /reset, /exit); the "
                 "options of `run` apply",
                 [](RunOptions& o) {
                     o.chat = o.interactive = true;
                     o.n_predict = 2048;
                 });
    // `moemesh serve`: `run --serve` with a default address.
    add_run_like(app, "serve",
                 "Serve an OpenAI-compatible HTTP API (POST /v1/chat/completions, /v1/completions; GET /v1/models, "
                 "/health) on --serve HOST:PORT (default 127.0.0.1:8080); the options of `run` apply",
                 [](RunOptions& o) { o.serve = "127.0.0.1:8080"; });
}

}  // namespace moemesh
