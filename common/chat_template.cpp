#include "common/chat_template.h"

#include <fstream>
#include <sstream>

namespace moemesh {

const char* const kChatMlTemplate =
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}";

StatusOr<ChatFormatter> ChatFormatter::create(const std::string& source, std::string bos_token, std::string eos_token,
                                              std::string name) {
    const bool builtin = source.empty();
    if (builtin) name = "built-in ChatML template";
    MM_ASSIGN_OR_RETURN(jinja::Template t, jinja::Template::parse(builtin ? kChatMlTemplate : source, name));
    ChatFormatter f(std::move(t), std::move(bos_token), std::move(eos_token), std::move(name), builtin);
    f.thinks_ = source.find("<think>") != std::string::npos;
    f.xml_tool_calls_ = source.find("<function=") != std::string::npos;
    return f;
}

StatusOr<std::string> ChatFormatter::apply(const Input& in) const {
    nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
    if (in.kwargs.is_object())
        for (auto it = in.kwargs.begin(); it != in.kwargs.end(); ++it) ctx[it.key()] = it.value();
    // As transformers' apply_chat_template: tools is None when the request has none.
    ctx["messages"] = in.messages;
    ctx["tools"] = in.tools.is_array() && !in.tools.empty() ? in.tools : nlohmann::ordered_json();
    ctx["add_generation_prompt"] = in.add_generation_prompt;
    ctx["bos_token"] = bos_;
    ctx["eos_token"] = eos_;
    return tmpl_.render(ctx);
}

StatusOr<ChatFormatter> chat_formatter_for(const Tokenizer& tok, const std::string& template_file,
                                           std::string* warning) {
    auto special = [&](int32_t id) { return id >= 0 && id < tok.vocab_size() ? tok.token_to_piece(id) : std::string(); };
    const std::string bos = special(tok.bos_id()), eos = special(tok.eos_id());
    if (!template_file.empty()) {
        std::ifstream f(template_file, std::ios::binary);
        if (!f) return MM_ERROR("--chat-template-file %s: cannot be read", template_file.c_str());
        std::stringstream ss;
        ss << f.rdbuf();
        if (ss.str().empty()) return MM_ERROR("--chat-template-file %s: the file is empty", template_file.c_str());
        return ChatFormatter::create(ss.str(), bos, eos, template_file);
    }
    if (!tok.chat_template().empty()) {
        StatusOr<ChatFormatter> own = ChatFormatter::create(tok.chat_template(), bos, eos, "the model's chat template");
        if (own.ok()) return own;
        if (warning)
            *warning = own.status().message() + "; using the built-in ChatML template instead (or give "
                                                "--chat-template-file)";
    }
    return ChatFormatter::create("", bos, eos);
}

bool prompt_opens_think_block(const std::string& prompt) {
    size_t end = prompt.size();
    while (end > 0 && (prompt[end - 1] == '\n' || prompt[end - 1] == ' ')) --end;
    static const std::string kOpen = "<think>";
    return end >= kOpen.size() && prompt.compare(end - kOpen.size(), kOpen.size(), kOpen) == 0;
}

}  // namespace moemesh
