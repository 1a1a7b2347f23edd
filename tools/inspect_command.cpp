// `moemesh inspect FILE.gguf`: architecture, hyper-parameters, metadata, tensor table, and how the
// bytes split between routed experts and everything else.
#include <cstdio>
#include <map>
#include <string>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "tools/commands.h"

namespace moemesh {

namespace {

std::string value_summary(const GgufValue& v) {
    switch (v.type) {
        case GgufType::STRING: {
            std::string s = v.str.size() > 80 ? v.str.substr(0, 77) + "..." : v.str;
            for (char& c : s) if (c == '\n') c = ' ';
            return "\"" + s + "\"";
        }
        case GgufType::BOOL: return v.b ? "true" : "false";
        case GgufType::FLOAT32: case GgufType::FLOAT64: return str_printf("%g", v.f);
        case GgufType::ARRAY: {
            std::string s = str_printf("[%s × %llu]", gguf_type_name(v.arr_type), static_cast<unsigned long long>(v.arr_count));
            size_t shown = std::min<size_t>(v.arr_count, 4);
            std::string items;
            for (size_t i = 0; i < shown; ++i) {
                if (i) items += ", ";
                if (v.arr_type == GgufType::STRING) items += "\"" + v.arr_str[i] + "\"";
                else if (!v.arr_f.empty()) items += str_printf("%g", v.arr_f[i]);
                else items += std::to_string(v.arr_i[i]);
            }
            return s + " " + items + (v.arr_count > shown ? ", ..." : "");
        }
        default: return std::to_string(v.i);
    }
}

bool is_expert_tensor(const std::string& name) { return name.find("_exps.") != std::string::npos; }

Status inspect(const std::string& path, bool all_metadata) {
    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, GgufFile::open(path));
    std::printf("file: %s (%s, GGUF v%u, alignment %zu)\n", path.c_str(), format_bytes(f->file_size()).c_str(),
                f->version(), f->alignment());
    if (f->split_count() > 1)
        std::printf("split: %u files, %s in all (the tensors of the others: %s … %s)\n", f->split_count(),
                    format_bytes(f->total_size()).c_str(), f->split_path(1).c_str(),
                    f->split_path(f->split_count() - 1).c_str());
    std::printf("architecture: %s\n", f->get_string_or("general.architecture", "(missing)").c_str());
    auto cfg = load_model_config(*f);
    if (cfg.ok()) {
        const ModelConfig& c = cfg.value();
        std::printf("hyper-parameters: vocab %lld, hidden %lld, layers %lld, heads %lld/%lld kv, head dim %lld, "
                    "experts %lld top-%lld (renormalised: %s), expert ff %lld, rope dims %lld theta %g, "
                    "rms eps %g, train ctx %lld, tied embeddings: %s\n",
                    (long long)c.n_vocab, (long long)c.n_embd, (long long)c.n_layer, (long long)c.n_head,
                    (long long)c.n_head_kv, (long long)c.head_dim, (long long)c.n_expert, (long long)c.n_expert_used,
                    c.norm_topk ? "yes" : "no", (long long)c.n_ff_exp, (long long)c.rope_dim, c.rope_theta, c.rms_eps,
                    (long long)c.n_ctx_train, c.tied_embeddings ? "yes" : "no");
        if (c.rope_scaled())
            std::printf("rope scaling: %s, factor %g, original context %lld%s\n", c.rope_scaling.c_str(),
                        c.rope_scaling_factor, (long long)c.rope_scaling_orig_ctx,
                        c.rope.ext_factor != 0.0f ? (" (YaRN ramp over rotary pairs " + std::to_string((int)c.rope.corr_low) +
                                                    ".." + std::to_string((int)c.rope.corr_high) + ")").c_str()
                                                 : "");
        if (!c.recurrent.empty()) {
            std::string schedule;
            for (int64_t il = 0; il < c.n_layer; ++il) schedule += c.is_recurrent(static_cast<int>(il)) ? 'D' : 'A';
            std::printf("hybrid layers (D gated DeltaNet, A gated attention): %s\n"
                        "gated DeltaNet: %lld k heads, %lld v heads, head dim %lld, conv kernel %lld; shared expert ff "
                        "%lld\n",
                        schedule.c_str(), (long long)c.ssm_k_heads, (long long)c.ssm_v_heads,
                        (long long)c.ssm_head_dim, (long long)c.ssm_conv_kernel, (long long)c.n_ff_shexp);
        }
    } else {
        std::printf("hyper-parameters: cannot run this file: %s\n", cfg.status().message().c_str());
    }
    // Weight types: llama-quantize's mixes (Q4_K_M's Q6_K ffn_down, the small-row fallbacks) at a glance.
    std::map<std::string, std::pair<int, size_t>> by_type;
    for (const GgufTensor& t : f->tensors()) {
        auto& e = by_type[ggml_type_name(t.type)];
        ++e.first;
        e.second += t.nbytes;
    }
    std::string types;
    for (const auto& [name, e] : by_type)
        types += (types.empty() ? "" : ", ") + name + " ×" + std::to_string(e.first) + " (" + format_bytes(e.second) + ")";
    std::printf("weight types: %s\n", types.c_str());
    std::printf("\nmetadata (%zu keys):\n", f->metadata().size());
    for (const auto& [k, v] : f->metadata()) {
        if (!all_metadata && v.type == GgufType::ARRAY && v.arr_count > 64 && k.rfind("tokenizer.", 0) == 0) {
            std::printf("  %-48s [%s × %llu]\n", k.c_str(), gguf_type_name(v.arr_type),
                        static_cast<unsigned long long>(v.arr_count));
            continue;
        }
        std::printf("  %-48s %s\n", k.c_str(), value_summary(v).c_str());
    }
    size_t expert_bytes = 0, other_bytes = 0;
    int64_t expert_params = 0, other_params = 0;
    std::printf("\ntensors (%zu):\n  %-36s %-6s %-24s %12s\n", f->tensors().size(), "name", "type", "shape", "bytes");
    for (const auto& t : f->tensors()) {
        std::printf("  %-36s %-6s %-24s %12zu\n", t.name.c_str(), ggml_type_name(t.type), t.shape_str().c_str(), t.nbytes);
        if (is_expert_tensor(t.name)) {
            expert_bytes += t.nbytes;
            expert_params += t.nelements();
        } else {
            other_bytes += t.nbytes;
            other_params += t.nelements();
        }
    }
    const double total = static_cast<double>(expert_bytes + other_bytes);
    std::printf("\nrouted-expert weights: %s (%lld params, %.1f%%)\nnon-expert weights:    %s (%lld params, %.1f%%)\n",
                format_bytes(expert_bytes).c_str(), (long long)expert_params, total > 0 ? 100.0 * expert_bytes / total : 0.0,
                format_bytes(other_bytes).c_str(), (long long)other_params, total > 0 ? 100.0 * other_bytes / total : 0.0);
    return Status();
}

}  // namespace

void register_inspect_command(CLI::App& app) {
    auto path = std::make_shared<std::string>();
    auto all = std::make_shared<bool>(false);
    CLI::App* c = app.add_subcommand("inspect", "Print a GGUF file's architecture, hyper-parameters, metadata and tensors");
    c->add_option("file", *path, "GGUF model file")->required()->check(CLI::ExistingFile);
    c->add_flag("--all-metadata", *all, "Also print the start of long tokenizer arrays");
    c->callback([path, all]() {
        Status st = inspect(*path, *all);
        if (!st.ok()) {
            std::fprintf(stderr, "error: %s\n", st.message().c_str());
            std::exit(1);
        }
    });
}

}  // namespace moemesh
