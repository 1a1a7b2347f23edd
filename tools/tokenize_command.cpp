// `moemesh tokenize`: token ids (and pieces) of a text, exactly as llama.cpp tokenizes it.
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "common/gguf.h"
#include "common/tokenizer.h"
#include "tools/commands.h"

namespace moemesh {

namespace {

struct TokenizeOptions {
    std::string model, text;
    bool special = false, json = false;
    int threads = 0;  // accepted for uniformity; tokenization is single-threaded
};

Status tokenize(const TokenizeOptions& o) {
    MM_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, GgufFile::open(o.model));
    MM_ASSIGN_OR_RETURN(Tokenizer tok, Tokenizer::from_gguf(*f));
    std::vector<int32_t> ids = tok.encode(o.text, o.special);
    if (tok.add_bos() && tok.bos_id() >= 0) ids.insert(ids.begin(), tok.bos_id());
    if (o.json) {
        nlohmann::json j;
        j["ids"] = ids;
        auto& pieces = j["pieces"] = nlohmann::json::array();
        for (int32_t id : ids) pieces.push_back(tok.token_to_piece(id));
        // A piece may be part of a multi-byte character: invalid UTF-8 is printed as U+FFFD.
        std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
    } else {
        for (int32_t id : ids) {
            std::string piece = tok.token_to_piece(id);
            std::printf("%6d  '%s'\n", id, piece.c_str());
        }
    }
    return Status();
}

}  // namespace

void register_tokenize_command(CLI::App& app) {
    auto o = std::make_shared<TokenizeOptions>();
    CLI::App* c = app.add_subcommand("tokenize", "Print the token ids of a text (as llama.cpp tokenizes it)");
    c->add_option("-m,--model", o->model, "GGUF model file (its tokenizer is used)")->required()->check(CLI::ExistingFile);
    c->add_option("--text", o->text, "Text to tokenize")->required();
    c->add_flag("--special", o->special, "Parse special tokens such as <|im_start|> in the text");
    c->add_flag("--json", o->json, "Print {\"ids\": [...], \"pieces\": [...]}");
    c->add_option("-t,--threads", o->threads, "Threads (tokenization uses one)");
    c->callback([o]() {
        Status st = tokenize(*o);
        if (!st.ok()) {
            std::fprintf(stderr, "error: %s\n", st.message().c_str());
            std::exit(1);
        }
    });
}

}  // namespace moemesh
