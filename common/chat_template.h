// Conversation → prompt text for chat: the model file's own chat template (GGUF key
// tokenizer.chat_template, from HF's tokenizer_config.json) run by common/jinja with the variables
// Hugging Face's apply_chat_template gives it, or a built-in ChatML template for files without one.
#pragma once
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "common/jinja.h"
#include "common/status.h"
#include "common/tokenizer.h"

namespace moemesh {

// The built-in template: Qwen's ChatML (system / user / assistant / tool turns), and Qwen3's empty
// think block after the generation prompt when enable_thinking is false. make-model writes it into
// files whose tokenizer has no template of its own.
extern const char* const kChatMlTemplate;

class ChatFormatter {
public:
    struct Input {
        nlohmann::ordered_json messages = nlohmann::ordered_json::array();  // OpenAI-style messages
        nlohmann::ordered_json tools;   // null, or the OpenAI tools array
        nlohmann::ordered_json kwargs;  // null, or extra template variables (chat_template_kwargs)
        bool add_generation_prompt = true;
    };

    // `source` empty: the built-in ChatML template. Fails when the template does not parse.
    static StatusOr<ChatFormatter> create(const std::string& source, std::string bos_token, std::string eos_token,
                                          std::string name = "chat template");

    // Renders the conversation. Errors name the template line, or carry the template's own
    // raise_exception message ("... the template raised an error: System message must be at the beginning.").
    StatusOr<std::string> apply(const Input& in) const;

    bool is_builtin() const { return builtin_; }
    const std::string& name() const { return name_; }
    // What the template writes, for constraining replies to its formats: think blocks (the reply
    // may open with reasoning), and tool calls as Qwen3-Coder / Qwen3.5's XML rather than JSON.
    bool thinks() const { return thinks_; }
    bool xml_tool_calls() const { return xml_tool_calls_; }

private:
    ChatFormatter(jinja::Template t, std::string bos, std::string eos, std::string name, bool builtin)
        : tmpl_(std::move(t)), bos_(std::move(bos)), eos_(std::move(eos)), name_(std::move(name)), builtin_(builtin) {}
    jinja::Template tmpl_;
    std::string bos_, eos_, name_;
    bool builtin_ = false;
    bool thinks_ = false, xml_tool_calls_ = false;
};

// The formatter for a loaded model: `template_file` when given (an error if it cannot be read or
// parsed), else the model file's own template, else the built-in ChatML one. A model template that
// does not parse falls back to the built-in one, with *warning saying why.
StatusOr<ChatFormatter> chat_formatter_for(const Tokenizer& tok, const std::string& template_file,
                                           std::string* warning);

// Where the reply of a prompt rendered by a template starts: inside a think block when the
// generation prompt ends with "<think>" (Qwen3.5 with thinking on), so the reply has no opening tag.
bool prompt_opens_think_block(const std::string& prompt);

}  // namespace moemesh
