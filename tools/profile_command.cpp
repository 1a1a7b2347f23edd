// `moemesh profile (--model F | cluster.yaml) --prompts FILE [--out profile.json]`: runs each prompt
// (one per line) plus a short greedy continuation and writes how often each expert of each layer
// was routed to, as the JSON that the static cache policy (and later the planner) reads
// (worker/expert_cache.h, ExpertProfile).
#include <chrono>
#include <cstdio>
#include <fstream>

#include "common/placement.h"
#include "common/tokenizer.h"
#include "coordinator/model.h"
#include "coordinator/remote_experts.h"
#include "coordinator/sampler.h"
#include "tools/commands.h"
#include "worker/expert_cache.h"
#include "worker/expert_executor.h"

namespace moemesh {

namespace {

struct ProfileOptions {
    std::string model, cluster, prompts, out = "profile.json";
    int n_predict = 16;
    int threads = 0;
};

// Counts every (token, expert) pair routed through it, then lets the real backend compute.
class CountingBackend final : public ExpertBackend {
public:
    CountingBackend(std::unique_ptr<ExpertBackend> inner, ExpertProfile* p) : inner_(std::move(inner)), p_(p) {}
    Status moe_forward(int layer, const float* x, int64_t n_rows, int64_t k, const int32_t* ids,
                       const float* weights, float* out) override {
        for (int64_t i = 0; i < n_rows * k; ++i)
            if (ids[i] >= 0 && ids[i] < p_->n_expert) p_->counts[layer][ids[i]]++;
        return inner_->moe_forward(layer, x, n_rows, k, ids, weights, out);
    }

private:
    std::unique_ptr<ExpertBackend> inner_;
    ExpertProfile* p_;
};

Status run_profile(const ProfileOptions& o) {
    std::optional<ClusterConfig> cluster;
    std::string model_path = o.model;
    if (!o.cluster.empty()) {
        MM_ASSIGN_OR_RETURN(cluster, load_cluster_config(o.cluster));
        if (model_path.empty()) model_path = cluster->model_path;
    }
    if (model_path.empty()) return MM_ERROR("give --model F.gguf or a cluster file with a 'model:' key");
    std::ifstream in(o.prompts);
    if (!in) return MM_ERROR("--prompts %s: cannot open", o.prompts.c_str());
    std::vector<std::string> prompts;
    for (std::string line; std::getline(in, line);)
        if (!line.empty()) prompts.push_back(line);
    if (prompts.empty()) return MM_ERROR("--prompts %s: no prompts (one per line)", o.prompts.c_str());

    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> gf, GgufFile::open(model_path));
    std::shared_ptr<GgufFile> file(std::move(gf));
    MM_ASSIGN_OR_RETURN(Tokenizer tok, Tokenizer::from_gguf(*file));
    MM_ASSIGN_OR_RETURN(ModelConfig mcfg, load_model_config(*file));
    ExpertProfile prof;
    prof.n_layer = static_cast<int>(mcfg.n_layer);
    prof.n_expert = static_cast<int>(mcfg.n_expert);
    prof.model = model_path;
    prof.counts.assign(static_cast<size_t>(prof.n_layer), std::vector<uint64_t>(static_cast<size_t>(prof.n_expert), 0));
    std::optional<OwnershipMap> map;
    if (cluster) {
        MM_ASSIGN_OR_RETURN(map, resolve_placement(*cluster, mcfg, file.get()));
    }
    ModelOptions mo;
    mo.n_threads = o.threads > 0 ? o.threads : default_threads();
    mo.experts = [&](const GgufFile& f, const ModelConfig& c, ThreadPool& pool) -> StatusOr<std::unique_ptr<ExpertBackend>> {
        std::unique_ptr<ExpertBackend> inner;
        if (cluster) {
            MM_ASSIGN_OR_RETURN(std::unique_ptr<DistributedExpertBackend> b,
                                DistributedExpertBackend::create(*cluster, *map, f, c, pool));
            MM_RETURN_IF_ERROR(b->connect_all(std::chrono::minutes(10), [](const std::string&, uint64_t, uint64_t) {}));
            inner = std::move(b);
        } else {
            MM_ASSIGN_OR_RETURN(inner, LocalExpertExecutor::create(f, c, pool));
        }
        return std::unique_ptr<ExpertBackend>(new CountingBackend(std::move(inner), &prof));
    };
    MM_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, load_model(file, mo));
    SamplerParams sp;
    sp.greedy = true;
    Sampler greedy(sp);
    const int64_t V = mcfg.n_vocab;
    std::vector<float> logits;
    for (size_t i = 0; i < prompts.size(); ++i) {
        std::vector<int32_t> input = tok.encode(prompts[i], /*parse_special=*/true);
        if (tok.add_bos() && tok.bos_id() >= 0) input.insert(input.begin(), tok.bos_id());
        if (input.empty()) continue;
        MM_ASSIGN_OR_RETURN(std::unique_ptr<SequenceState> seq,
                            model->new_sequence(static_cast<int64_t>(input.size()) + o.n_predict + 1));
        MM_RETURN_IF_ERROR(model->forward(*seq, input.data(), static_cast<int64_t>(input.size()), false, &logits));
        prof.tokens += input.size();
        for (int t = 0; t < o.n_predict; ++t) {
            int32_t next = greedy.sample(logits.data(), V);
            MM_RETURN_IF_ERROR(model->forward(*seq, &next, 1, false, &logits));
            prof.tokens++;
        }
        std::fprintf(stderr, "profile: prompt %zu/%zu (%zu tokens + %d generated)\n", i + 1, prompts.size(),
                     input.size(), o.n_predict);
    }
    std::ofstream out(o.out, std::ios::binary);
    out << expert_profile_json(prof);
    if (!out) return MM_ERROR("--out %s: cannot write", o.out.c_str());
    std::fprintf(stderr, "profile: %llu tokens, %d layers x %d experts -> %s\n",
                 static_cast<unsigned long long>(prof.tokens), prof.n_layer, prof.n_expert, o.out.c_str());
    return Status();
}

}  // namespace

void register_profile_command(CLI::App& app) {
    auto o = std::make_shared<ProfileOptions>();
    CLI::App* c = app.add_subcommand(
        "profile",
        "Run prompts and write per-layer expert activation counts (JSON) for the static cache policy\n"
        "  moemesh profile --model m.gguf --prompts prompts.txt --out profile.json\n"
        "  moemesh profile cluster.yaml --prompts prompts.txt");
    c->add_option("cluster", o->cluster, "Placement YAML (experts on its workers; they must be running)")
        ->check(CLI::ExistingFile);
    c->add_option("-m,--model", o->model, "GGUF model file (default: the cluster file's 'model:')")
        ->check(CLI::ExistingFile);
    c->add_option("--prompts", o->prompts, "Text file, one prompt per line")->required()->check(CLI::ExistingFile);
    c->add_option("-o,--out", o->out, "Where to write the profile")->capture_default_str();
    c->add_option("-n,--n-predict", o->n_predict, "Greedy tokens generated after each prompt")
        ->capture_default_str()
        ->check(CLI::Range(0, 1 << 16));
    c->add_option("-t,--threads", o->threads, "Threads (default: all cores)");
    c->callback([o]() {
        Status st = run_profile(*o);
        if (!st.ok()) {
            std::fprintf(stderr, "error: %s\n", st.message().c_str());
            std::exit(1);
        }
    });
}

}  // namespace moemesh
