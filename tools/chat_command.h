// `moemesh chat` / `run --chat --interactive`: a conversation on the terminal with a loaded model.
#pragma once
#include "common/chat_template.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/model.h"
#include "tools/run_command.h"

namespace moemesh {

// Reads user turns from stdin until /exit or end of input: each line is a turn (a line ending in
// '\' continues on the next), /reset starts a new conversation. Every turn renders the whole
// conversation with `chat` and continues the sequence from the longest prefix it still holds;
// the reply streams to stdout and its reasoning / content go back into the history as the
// template expects them. -n bounds each reply, --ctx the conversation.
Status chat_loop(const RunOptions& o, Model& model, const Tokenizer& tok, const ChatFormatter& chat);

}  // namespace moemesh
