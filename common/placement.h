// Placement: the cluster YAML (model, coordinator, workers and the experts each one serves), parsed
// once into ClusterConfig with defaults, validated against the model's dimensions, and resolved into
// an OwnershipMap that the coordinator (dispatch) and each worker (shard loading) trust afterwards.
//
// A cluster file (deploy/examples/*.yaml are documented, tested examples):
//
//   model: qwen3-30b-a3b-q4_k_m.gguf     # relative paths are relative to the YAML file's directory
//   activations: f32                     # wire format of activations: f32 | bf16
//   coordinator: {device: cpu, http: 127.0.0.1:8080, control: 127.0.0.1:7000, threads: 8, timeout_ms: 10000,
//                 data_plane_rows: 512}      # rows per call the out-of-band (shm, cuda-ipc, nccl) buffers hold
//   workers:
//     - name: gpu0
//       address: unix:/tmp/moemesh-gpu0.sock   # unix:/path | host:port | [v6]:port
//       device: cuda:0                         # cpu | cuda:N
//       transport: auto                        # auto | inproc | unix | tcp | nccl | cuda-ipc | shm
//       threads: 4
//       cache: {device: 6GiB, host: 24GiB,     # budgets (see docs/cache.md); device 0/absent: unlimited,
//               policy: lru, prefetch: none,   #   host 0/absent: no host tier; policy lru | lfu | static,
//               profile: profile.json,         #   prefetch none | next-layer, profile (static): moemesh profile,
//               storage: auto}                 #   storage auto | pread | io_uring (how the file is read)
//       experts: "0-63"                        # these experts in every layer, or:
//       layers: {"0-23": "64-127", "24-47": "0-127"}   # layer ranges -> expert ranges
//       replicas: {"0-47": "0-3"}              # extra copies of hot experts (same form as layers)
//       tls: {ca: ca.pem, cert: worker.pem, key: worker.key}
//
// Errors a user can cause come back as Status, prefixed "file:line:col: " (1-based, from yaml-cpp's
// marks) and naming the worker, e.g.
//   cluster.yaml:12:14: worker 'gpu1': expert range "60-70" exceeds the model's 64 experts (0-63)
//
// What is checked where:
//   parse_cluster_config / load_cluster_config (syntax and schema, no model needed): YAML syntax,
//     unknown keys (with a did-you-mean), duplicate keys, value types, sizes, id ranges' syntax,
//     overlapping layer ranges, `experts` xor `layers`, devices, transports, activations, addresses
//     (port 1-65535, non-empty host, IPv6 in brackets, unix path length), worker names unique,
//     addresses unique (also against the coordinator's), transport vs address/device (shm, cuda-ipc
//     and nccl need a worker on this host: a unix: or loopback address; cuda-ipc and nccl need the
//     coordinator and the worker on cuda:N devices).
//   validate (needs ModelConfig): layer and expert ids inside the model, a replica of an expert the
//     worker already owns, and every (layer, expert) having at least one primary owner (replicas
//     alone do not count).
//   resolve_placement (optional GgufFile for byte sizes): builds the map, computes each expert's
//     bytes from the expert tensors, and rejects a worker whose cache.device + cache.host (both set)
//     cannot hold one expert of its shard. A shard larger than the budget is allowed: it streams.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/status.h"

namespace moemesh {

// A place in the YAML file, 1-based; line 0 means unknown.
struct SourceLoc {
    int line = 0;
    int col = 0;
};

// Inclusive id ranges, e.g. "0-31,40,50-55" -> {{0,31},{40,40},{50,55}}.
using IdRanges = std::vector<std::pair<int, int>>;

struct Address {
    enum class Kind { kTcp, kUnix };
    Kind kind = Kind::kTcp;
    std::string host;  // tcp: hostname, IPv4, or IPv6 without brackets
    int port = 0;      // tcp: 1-65535
    std::string path;  // unix: socket path
    std::string str() const;  // canonical text: "unix:/p", "host:port", "[::1]:port"
    bool operator==(const Address& o) const;
};

struct Device {
    enum class Kind { kCpu, kCuda };
    Kind kind = Kind::kCpu;
    int index = 0;  // cuda:N
    std::string str() const;
};

// How activations and partial sums travel between the coordinator and one worker. unix and tcp carry
// them inside the gRPC messages; shm, cuda-ipc and nccl are out-of-band data planes negotiated at
// the handshake (docs/cuda.md, "Transports"), with gRPC carrying only metadata.
enum class Transport { kAuto, kInproc, kUnix, kTcp, kNccl, kCudaIpc, kShm };
const char* transport_name(Transport t);  // "auto", "cuda-ipc", ...

enum class ActivationFormat { kF32, kBf16 };
const char* activation_format_name(ActivationFormat f);

// One entry of `experts:` (layers = every layer) or of a `layers:`/`replicas:` map.
struct OwnershipRule {
    bool all_layers = false;  // from `experts:`; `layers` is then empty
    IdRanges layers;
    IdRanges experts;
    std::string layers_text, experts_text;  // as written, for messages
    SourceLoc layers_loc, experts_loc;
    std::vector<SourceLoc> layer_range_locs, expert_range_locs;  // one per range (column of that range)
};

struct TlsConfig {
    std::string ca, cert, key;  // resolved against the YAML's directory; empty: not given
    bool enabled() const { return !ca.empty() || !cert.empty(); }
};

struct WorkerConfig {
    std::string name;
    std::optional<Address> address;  // absent only for transport inproc
    Device device;
    Transport transport = Transport::kAuto;
    int threads = 0;                 // 0: the worker's default (all cores)
    uint64_t cache_device_bytes = 0; // 0: unlimited
    uint64_t cache_host_bytes = 0;   // 0: no host tier (unlimited for the budget check)
    // A `cache:` entry makes the worker serve its shard from a budgeted cache over the model file
    // instead of reading the whole shard at handshake.
    bool cache_enabled = false;
    std::string cache_policy = "lru";     // lru | lfu | static
    std::string cache_prefetch = "none";  // none | next-layer
    std::string cache_storage = "auto";   // how the file is read: auto | pread | io_uring
    std::string cache_profile;            // resolved against the YAML's directory; required by static
    TlsConfig tls;
    std::vector<OwnershipRule> owns;      // primary ownership
    std::vector<OwnershipRule> replicas;  // extra copies
    SourceLoc loc, name_loc, address_loc, cache_loc, transport_loc;
};

struct CoordinatorConfig {
    Device device;
    std::optional<Address> http;     // absent: the coordinator's default (kDefaultHttp)
    std::optional<Address> control;  // absent: the coordinator's default
    int threads = 0;                 // 0: all cores
    int timeout_ms = 10000;          // deadline of one layer call to a worker
    int data_plane_rows = 512;       // rows per call in out-of-band buffers; larger batches go in chunks
};
inline constexpr const char* kDefaultHttp = "127.0.0.1:8080";

struct ClusterConfig {
    std::string source;      // file name used in messages
    std::string model_path;  // resolved against the YAML's directory; empty if not given
    ActivationFormat activations = ActivationFormat::kF32;
    CoordinatorConfig coordinator;
    std::vector<WorkerConfig> workers;
    SourceLoc workers_loc;
    // "source:line:col: " (or "source: " when loc is unknown).
    std::string where(SourceLoc loc) const;
};

// An address of this host: unix:, localhost, 127.0.0.0/8 or ::1.
bool is_local_address(const Address& a);

// What `transport: auto` means for worker w, by locality: no address → inproc; another host →
// unix/tcp (gRPC, host staging); this host → shm when the coordinator or the worker is on the
// CPU, cuda-ipc when both are on the same GPU, nccl when on different GPUs. Other values are
// returned as they are. *why (optional) gets the reason in words, for logs and summaries.
Transport resolve_transport(const ClusterConfig& cfg, const WorkerConfig& w, std::string* why = nullptr);
// shm, cuda-ipc, nccl: activations outside the gRPC messages.
bool is_out_of_band(Transport t);

// Syntax and schema. yaml_path's directory is the base for relative paths.
StatusOr<ClusterConfig> load_cluster_config(const std::string& yaml_path);
StatusOr<ClusterConfig> parse_cluster_config(const std::string& yaml_text, const std::string& name_for_errors,
                                             const std::string& base_dir);

// Ids against the model's dimensions, and coverage (every expert of every layer has a primary owner).
Status validate(const ClusterConfig& cfg, const ModelConfig& model);

struct WorkerShard {
    std::vector<std::pair<int, int>> primary;   // (layer, expert), sorted
    std::vector<std::pair<int, int>> replicas;  // (layer, expert), sorted, disjoint from primary
    uint64_t bytes = 0;                         // primary + replicas; 0 when no GGUF was given
    uint64_t max_expert_bytes = 0;
    bool streams = false;  // budgets (both set) are smaller than the shard
};

struct OwnershipMap {
    int n_layer = 0;
    int n_expert = 0;
    bool bytes_known = false;
    std::vector<uint64_t> expert_bytes;     // [layer]: bytes of one expert (gate + up + down slices)
    std::vector<std::vector<int>> servers;  // [layer * n_expert + expert]: worker indices, primary owners first
    std::vector<uint8_t> num_primary;       // [layer * n_expert + expert]: how many of `servers` are primary
    std::vector<WorkerShard> workers;       // [worker index]

    const std::vector<int>& serving(int layer, int expert) const { return servers[size_t(layer) * n_expert + expert]; }
    bool serves(int worker, int layer, int expert) const;
};

// validate() + the map. `file` (nullable) gives byte sizes and enables the budget check.
StatusOr<OwnershipMap> resolve_placement(const ClusterConfig& cfg, const ModelConfig& model, const GgufFile* file);

// Human-readable table: per worker the address, device, (layer, expert) pairs, % of all experts,
// bytes, replicas, budgets and whether the shard streams.
std::string placement_summary(const ClusterConfig& cfg, const OwnershipMap& map);

// "12GiB", "1.5 GB", "4096" -> bytes. Units B KB MB GB TB (1000^n), KiB MiB GiB TiB (1024^n), K M G T
// (1000^n); case-insensitive.
StatusOr<uint64_t> parse_size(const std::string& text);
// "0-31,40,50-55" -> sorted, non-overlapping inclusive ranges. limit >= 0: ids must be < limit.
StatusOr<IdRanges> parse_ranges(const std::string& text, int limit = -1);
// Compact text of a sorted id list: {0,1,2,5} -> "0-2,5".
std::string format_ranges(const std::vector<int>& ids);
StatusOr<Address> parse_address(const std::string& text);
StatusOr<Device> parse_device(const std::string& text);
// "1.50 GiB"
std::string format_bytes(uint64_t bytes);

}  // namespace moemesh
