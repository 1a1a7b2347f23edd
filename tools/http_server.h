// An OpenAI-compatible HTTP front end for one loaded model (DESIGN.md "Processes": the coordinator
// serves HTTP): POST /v1/completions and /v1/chat/completions (JSON or server-sent-event streams),
// GET /v1/models and /health. Up to max_parallel requests are generated together (continuous
// batching: one decode step for all of them), each with its own sequence state and exactly the
// text it would get alone; more wait for a slot. Every bad request gets a 4xx JSON error that
// names the field.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/chat_template.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "coordinator/model.h"
#include "coordinator/sampler.h"
#include "tools/http_request.h"

namespace moemesh {

struct HttpServerOptions {
    std::string model_name;          // the "model" field of responses and /v1/models
    RequestLimits limits;
    size_t max_body_bytes = 8u << 20;  // larger bodies: 413
    bool log_requests = true;        // one stderr line per request
    // Requests generated together (continuous batching); more wait. At most the model's n_batch:
    // a decode step holds a token of each (`run --serve` checks it).
    int max_parallel = 4;
    int64_t prompt_chunk = 512;      // prompt tokens run between two decode steps (the model's n_batch)
    // Formats /v1/chat/completions conversations; null: chat_formatter_for(tok) (the model's own
    // template, or the built-in ChatML one).
    std::shared_ptr<const ChatFormatter> chat;
    // SO_SNDBUF of the listening socket, inherited by connections; 0: the system's (autotuned).
    // Tests set a small one to fill it with a client that does not read.
    int socket_send_buffer = 0;
};

class HttpServer {
public:
    HttpServer(Model& model, const Tokenizer& tok, HttpServerOptions o);
    ~HttpServer();
    HttpServer(const HttpServer&) = delete;
    HttpServer& operator=(const HttpServer&) = delete;

    // Binds host:port (port 0: any free port); returns the port.
    StatusOr<int> bind(const std::string& host, int port);
    // Serves until stop() (from another thread or a signal handler's thread).
    Status run();
    void stop();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// `moemesh run/serve --serve HOST:PORT`: binds, prints the address, serves until SIGINT/SIGTERM.
Status serve_http(Model& model, const Tokenizer& tok, const std::string& addr, HttpServerOptions o);

}  // namespace moemesh
