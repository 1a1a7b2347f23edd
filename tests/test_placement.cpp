// Placement YAML: sizes, ranges, addresses; every rejection with its file:line:col and message;
// ownership maps for uneven shards and replicas; shard bytes from a real GGUF; the documented
// examples; and random / mutated documents that must never crash the loader.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "common/gguf.h"
#include "common/model_config.h"
#include "common/placement.h"
#include "tests/test_util.h"
#include "tools/make_model.h"

namespace moemesh {
namespace {

ModelConfig dims(int layers, int experts) {
    ModelConfig m;
    m.n_layer = layers;
    m.n_expert = experts;
    return m;
}

StatusOr<ClusterConfig> parse(const std::string& yaml) { return parse_cluster_config(yaml, "cluster.yaml", "/base"); }

// The parse error, or "" if it parsed.
std::string parse_error(const std::string& yaml) {
    auto r = parse(yaml);
    return r.ok() ? "" : r.status().message();
}

// The parse + resolve error against a layers x experts model, or "".
std::string resolve_error(const std::string& yaml, int layers, int experts) {
    auto r = parse(yaml);
    if (!r.ok()) return "parse: " + r.status().message();
    auto m = resolve_placement(r.value(), dims(layers, experts), nullptr);
    return m.ok() ? "" : m.status().message();
}

// ---------------------------------------------------------------- small parsers

TEST(PlacementSize, Units) {
    EXPECT_EQ(parse_size("4096").value(), 4096u);
    EXPECT_EQ(parse_size("0").value(), 0u);
    EXPECT_EQ(parse_size("12GiB").value(), 12ull << 30);
    EXPECT_EQ(parse_size("12 GiB").value(), 12ull << 30);
    EXPECT_EQ(parse_size("12gib").value(), 12ull << 30);
    EXPECT_EQ(parse_size("1.5GiB").value(), 3ull << 29);
    EXPECT_EQ(parse_size("1.5 GB").value(), 1500000000u);
    EXPECT_EQ(parse_size("2KiB").value(), 2048u);
    EXPECT_EQ(parse_size("2KB").value(), 2000u);
    EXPECT_EQ(parse_size("2K").value(), 2000u);
    EXPECT_EQ(parse_size("3M").value(), 3000000u);
    EXPECT_EQ(parse_size("7MiB").value(), 7u << 20);
    EXPECT_EQ(parse_size("1TiB").value(), 1ull << 40);
    EXPECT_EQ(parse_size("1TB").value(), 1000000000000ull);
    EXPECT_EQ(parse_size("10B").value(), 10u);
}

TEST(PlacementSize, Rejects) {
    EXPECT_EQ(parse_size("12GB x").status().message(),
              "bad size \"12GB x\": unknown unit \"GB x\" (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)");
    EXPECT_EQ(parse_size("").status().message(),
              "bad size \"\" (expected bytes or a number with a unit, e.g. 12GiB)");
    EXPECT_FALSE(parse_size("GiB").ok());
    EXPECT_FALSE(parse_size("-1").ok());
    EXPECT_FALSE(parse_size("1..5GiB").ok());
    EXPECT_FALSE(parse_size("1 2").ok());
    EXPECT_EQ(parse_size("1.5").status().message(), "bad size \"1.5\": a byte count must be a whole number");
    EXPECT_EQ(parse_size("99999999TiB").status().message(), "bad size \"99999999TiB\": too large");
}

TEST(PlacementRanges, Parse) {
    IdRanges want = {{0, 31}, {40, 40}, {50, 55}};
    EXPECT_EQ(parse_ranges("0-31,40,50-55").value(), want);
    IdRanges sorted = {{1, 2}, {3, 3}};
    EXPECT_EQ(parse_ranges(" 3 , 1-2 ").value(), sorted);
    IdRanges spaced = {{4, 9}};
    EXPECT_EQ(parse_ranges("4 - 9").value(), spaced);
    EXPECT_EQ(parse_ranges("0-63", 64).value().size(), 1u);
}

TEST(PlacementRanges, Rejects) {
    EXPECT_EQ(parse_ranges("").status().message(), "empty id list");
    EXPECT_EQ(parse_ranges("1,,2").status().message(), "empty item in id list \"1,,2\"");
    EXPECT_EQ(parse_ranges("1,").status().message(), "empty item in id list \"1,\"");
    EXPECT_EQ(parse_ranges("a-b").status().message(), "bad id range \"a-b\" (expected N or N-M, e.g. \"0-31,40\")");
    EXPECT_EQ(parse_ranges("5-3").status().message(), "range \"5-3\" is reversed (write 3-5)");
    EXPECT_EQ(parse_ranges("0-10,5-8").status().message(), "ranges \"0-10\" and \"5-8\" overlap");
    EXPECT_EQ(parse_ranges("1-").status().message(), "bad id range \"1-\" (expected N or N-M, e.g. \"0-31,40\")");
    EXPECT_EQ(parse_ranges("-1").status().message(), "bad id range \"-1\" (expected N or N-M, e.g. \"0-31,40\")");
    EXPECT_FALSE(parse_ranges("99999999999").ok());
    EXPECT_EQ(parse_ranges("0-64", 64).status().message(), "id 64 in \"0-64\" is out of range (0-63)");
}

TEST(PlacementRanges, Format) {
    EXPECT_EQ(format_ranges({0, 1, 2, 5, 7, 8}), "0-2,5,7-8");
    EXPECT_EQ(format_ranges({}), "");
    EXPECT_EQ(format_ranges({3}), "3");
}

TEST(PlacementAddress, Parse) {
    auto u = parse_address("unix:/tmp/x.sock").value();
    EXPECT_EQ(u.kind, Address::Kind::kUnix);
    EXPECT_EQ(u.path, "/tmp/x.sock");
    auto t = parse_address("Host-1.lan:7100").value();
    EXPECT_EQ(t.kind, Address::Kind::kTcp);
    EXPECT_EQ(t.host, "host-1.lan");
    EXPECT_EQ(t.port, 7100);
    auto v6 = parse_address("[::1]:80").value();
    EXPECT_EQ(v6.host, "::1");
    EXPECT_EQ(v6.port, 80);
    EXPECT_EQ(v6.str(), "[::1]:80");
    EXPECT_EQ(parse_address("10.0.0.2:65535").value().str(), "10.0.0.2:65535");
}

TEST(PlacementAddress, Rejects) {
    EXPECT_EQ(parse_address("host:0").status().message(), "bad address \"host:0\": port 0 is out of range (1-65535)");
    EXPECT_EQ(parse_address("host:65536").status().message(),
              "bad address \"host:65536\": port 65536 is out of range (1-65535)");
    EXPECT_EQ(parse_address(":80").status().message(), "bad address \":80\": empty host");
    EXPECT_EQ(parse_address("[]:80").status().message(), "bad address \"[]:80\": empty host");
    EXPECT_EQ(parse_address("::1:80").status().message(),
              "bad address \"::1:80\": write IPv6 addresses in brackets, e.g. [::1]:7100");
    EXPECT_EQ(parse_address("host").status().message(),
              "bad address \"host\": expected unix:/path, host:port or [v6]:port");
    EXPECT_EQ(parse_address("[::1]").status().message(), "bad address \"[::1]\": expected [v6]:port");
    EXPECT_EQ(parse_address("unix:").status().message(), "bad address \"unix:\": empty socket path");
    EXPECT_EQ(parse_address("host:8x").status().message(), "bad address \"host:8x\": port \"8x\" is not a number");
    EXPECT_EQ(parse_address("ho st:80").status().message(),
              "bad address \"ho st:80\": invalid character in host \"ho st\"");
    EXPECT_FALSE(parse_address("unix:/" + std::string(200, 'a')).ok());
}

TEST(PlacementDevice, Parse) {
    EXPECT_EQ(parse_device("cpu").value().kind, Device::Kind::kCpu);
    auto d = parse_device("cuda:3").value();
    EXPECT_EQ(d.kind, Device::Kind::kCuda);
    EXPECT_EQ(d.index, 3);
    EXPECT_EQ(parse_device("cuda").status().message(),
              "invalid device \"cuda\" (did you mean 'cuda:0'?) (expected cpu or cuda:N)");
    EXPECT_FALSE(parse_device("cuda:").ok());
    EXPECT_FALSE(parse_device("cuda:-1").ok());
    EXPECT_FALSE(parse_device("CPU").ok());
}

// ---------------------------------------------------------------- rejections with their place

TEST(PlacementReject, UnknownKeySuggests) {
    EXPECT_EQ(parse_error(R"(model: m.gguf
workers:
  - name: a
    address: unix:/tmp/a.sock
    expert: "0-15"
)"),
              "cluster.yaml:5:5: worker 'a': unknown key 'expert' (did you mean 'experts'?) (allowed: name, address, "
              "device, transport, threads, cache, experts, layers, replicas, tls)");
    EXPECT_EQ(parse_error("modle: m.gguf\nworkers: []\n"),
              "cluster.yaml:1:1: unknown key 'modle' (did you mean 'model'?) (allowed: model, activations, "
              "coordinator, workers)");
    EXPECT_EQ(parse_error("coordinator: {timeout: 5}\nworkers: []\n"),
              "cluster.yaml:1:15: coordinator: unknown key 'timeout' (allowed: device, http, control, threads, "
              "timeout_ms, data_plane_rows)");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    experts: "0"
    cache: {devise: 1GiB}
)"),
              "cluster.yaml:5:13: worker 'a': cache: unknown key 'devise' (did you mean 'device'?) (allowed: device, "
              "host, policy, prefetch, profile, storage)");
}

TEST(PlacementCache, StorageMode) {
    auto parse = [](const std::string& cache) {
        return parse_cluster_config("workers:\n  - name: a\n    address: unix:/a\n    experts: \"0\"\n    cache: " +
                                        cache + "\n",
                                    "cluster.yaml", "/tmp");
    };
    auto def = parse("{device: 1GiB}");
    ASSERT_TRUE(def.ok()) << def.status().message();
    EXPECT_EQ(def.value().workers[0].cache_storage, "auto");
    auto ur = parse("{device: 1GiB, storage: io_uring}");
    ASSERT_TRUE(ur.ok()) << ur.status().message();
    EXPECT_EQ(ur.value().workers[0].cache_storage, "io_uring");
    auto bad = parse("{device: 1GiB, storage: iouring}");
    ASSERT_FALSE(bad.ok());
    EXPECT_EQ(bad.status().message(),
              "cluster.yaml:5:36: worker 'a': cache: unknown storage \"iouring\" (did you mean 'io_uring'?) (expected "
              "one of auto, pread, io_uring)");
}

TEST(PlacementReject, UnknownKeyFromFile) {
    std::string path = testing::source_dir() + "/tests/data/placement/unknown_key.yaml";
    auto r = load_cluster_config(path);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().message(),
              path + ":5:5: worker 'a': unknown key 'expert' (did you mean 'experts'?) (allowed: name, address, "
                     "device, transport, threads, cache, experts, layers, replicas, tls)");
    EXPECT_EQ(load_cluster_config("/nonexistent/cluster.yaml").status().message(),
              "/nonexistent/cluster.yaml: cannot open: No such file or directory");
}

TEST(PlacementReject, DuplicateKey) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    experts: "0"
    experts: "1"
)"),
              "cluster.yaml:5:5: worker 'a': duplicate key 'experts'");
}

TEST(PlacementReject, DuplicateWorkerName) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: gpu0
    address: unix:/a
    experts: "0-7"
  - name: gpu0
    address: unix:/b
    experts: "8-15"
)"),
              "cluster.yaml:5:11: worker name 'gpu0' is used twice (first at line 2)");
}

TEST(PlacementReject, DuplicateAddress) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: 10.0.0.2:7100
    experts: "0-7"
  - name: b
    address: 10.0.0.2:7100
    experts: "8-15"
)"),
              "cluster.yaml:6:14: worker 'b': address 10.0.0.2:7100 is already used by worker 'a' (line 3)");
    // Host names compare without case; the coordinator's own addresses count too.
    EXPECT_EQ(parse_error(R"(coordinator: {control: "LOCALHOST:7000"}
workers:
  - name: a
    address: localhost:7000
    experts: "0-7"
)"),
              "cluster.yaml:4:14: worker 'a': address localhost:7000 is the coordinator's control address");
}

TEST(PlacementReject, BadAddress) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: 10.0.0.2:70000
    experts: "0-7"
)"),
              "cluster.yaml:3:14: worker 'a': 'address': bad address \"10.0.0.2:70000\": port 70000 is out of range "
              "(1-65535)");
    EXPECT_EQ(parse_error("workers:\n  - {name: a, address: \":7100\", experts: \"0\"}\n"),
              "cluster.yaml:2:24: worker 'a': 'address': bad address \":7100\": empty host");
    EXPECT_EQ(parse_error("coordinator:\n  http: localhost\nworkers: []\n"),
              "cluster.yaml:2:9: coordinator: 'http': bad address \"localhost\": expected unix:/path, host:port or "
              "[v6]:port");
    EXPECT_EQ(parse_error("workers:\n  - {name: a, experts: \"0\"}\n"),
              "cluster.yaml:2:5: worker 'a': missing 'address' (unix:/path, host:port or [v6]:port)");
}

TEST(PlacementReject, BadSize) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    cache: {device: 12GB x, host: 1GiB}
    experts: "0"
)"),
              "cluster.yaml:4:21: worker 'a': cache: 'device': bad size \"12GB x\": unknown unit \"GB x\" (use B, KB, "
              "MB, GB, TB, KiB, MiB, GiB or TiB)");
}

TEST(PlacementReject, WrongTypes) {
    EXPECT_EQ(parse_error("workers: 5\n"), "cluster.yaml:1:10: 'workers' must be a list of workers, got a scalar");
    EXPECT_EQ(parse_error("workers: []\n"), "cluster.yaml:1:10: 'workers' is empty");
    EXPECT_EQ(parse_error("model: m.gguf\n"), "cluster.yaml:1:1: missing 'workers' (the list of worker processes)");
    EXPECT_EQ(parse_error(""), "cluster.yaml: the file is empty (expected a map with 'model' and 'workers')");
    EXPECT_EQ(parse_error("- a\n- b\n"), "cluster.yaml:1:1: the file must be a map with 'model' and 'workers', got a list");
    EXPECT_EQ(parse_error("model: [a, b]\nworkers: []\n"), "cluster.yaml:1:8: 'model' must be a path, got a list");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    threads: four
    experts: "0"
)"),
              "cluster.yaml:4:14: worker 'a': 'threads' must be an integer, got \"four\"");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    threads: -2
    experts: "0"
)"),
              "cluster.yaml:4:14: worker 'a': 'threads' = -2 is out of range (0-4096)");
    EXPECT_EQ(parse_error("workers:\n  - just-a-name\n"),
              "cluster.yaml:2:5: worker #1: a worker must be a map with 'name', 'address', ...; got a scalar");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    experts: [0, 1]
)"),
              "cluster.yaml:4:14: worker 'a': expert ids must be a range list such as \"0-31,40\", got a list");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    experts: "0"
    cache: 6GiB
)"),
              "cluster.yaml:5:12: worker 'a': 'cache' must be a map such as {device: 6GiB, host: 24GiB}, got a scalar");
    EXPECT_EQ(parse_error("activations: fp16\nworkers: []\n"),
              "cluster.yaml:1:14: 'activations' must be f32 or bf16, got \"fp16\"");
    EXPECT_EQ(parse_error("coordinator: {timeout_ms: 0}\nworkers: []\n"),
              "cluster.yaml:1:27: coordinator: 'timeout_ms' = 0 is out of range (1-3600000)");
}

TEST(PlacementReject, ExpertsAndLayers) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    experts: "0-7"
    layers: {"0-1": "0-7"}
)"),
              "cluster.yaml:5:5: worker 'a': give either 'experts' (the same experts in every layer) or 'layers' (per "
              "layer range), not both");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
)"),
              "cluster.yaml:2:5: worker 'a': missing 'experts' or 'layers': which experts does it serve?");
    EXPECT_EQ(parse_error("workers:\n  - name: a\n    address: unix:/a\n    experts:\n"),
              "cluster.yaml:4:5: worker 'a': 'experts' is empty");
}

TEST(PlacementReject, OverlappingLayerRanges) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    layers: {"0-23": "0-31", "20-47": "32-63"}
)"),
              "cluster.yaml:4:31: worker 'a': in 'layers', layers \"20-47\" overlap layers \"0-23\" (line 4)");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    layers:
      "0-3,9": "0-31"
      "5,8-10": "0"
)"),
              "cluster.yaml:6:10: worker 'a': in 'layers', layers \"5,8-10\" overlap layers \"0-3,9\" (line 5)");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    layers: {"0-3": "0-10,5"}
)"),
              "cluster.yaml:4:21: worker 'a': expert ids: ranges \"0-10\" and \"5\" overlap");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    layers: {"0-3": }
)"),
              "cluster.yaml:4:14: worker 'a': layers \"0-3\" have no expert ids");
}

TEST(PlacementReject, DeviceAndTransport) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    device: gpu1
    experts: "0"
)"),
              "cluster.yaml:4:13: worker 'a': invalid device \"gpu1\" (expected cpu or cuda:N)");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    transport: grpc
    experts: "0"
)"),
              "cluster.yaml:4:16: worker 'a': unknown transport \"grpc\" (expected one of auto, inproc, unix, tcp, "
              "nccl, cuda-ipc, shm)");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    transport: cuda_ipc
    experts: "0"
)"),
              "cluster.yaml:4:16: worker 'a': unknown transport \"cuda_ipc\" (did you mean 'cuda-ipc'?) (expected "
              "one of auto, inproc, unix, tcp, nccl, cuda-ipc, shm)");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    transport: tcp
    experts: "0"
)"),
              "cluster.yaml:3:14: worker 'a': transport tcp needs a host:port address, got unix:/a");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    transport: nccl
    experts: "0"
)"),
              "cluster.yaml:4:16: worker 'a': transport nccl needs a cuda:N device, not cpu");
    EXPECT_EQ(parse_error("workers:\n  - {name: 'a b', address: unix:/a, experts: '0'}\n"),
              "cluster.yaml:2:12: worker 'a b': 'name' may only use letters, digits, '.', '_' and '-'");
}

// shm, cuda-ipc and nccl are data planes of one host; cuda-ipc and nccl move device memory.
TEST(PlacementReject, OutOfBandTransports) {
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: 10.0.0.2:7001
    transport: shm
    experts: "0"
)"),
              "cluster.yaml:4:16: worker 'a': transport shm works between processes of one host, but 10.0.0.2:7001 is "
              "not an address of this host (use unix:/path or 127.0.0.1:port, or transport tcp across hosts)");
    EXPECT_EQ(parse_error(R"(coordinator: {device: cuda:0}
workers:
  - name: a
    address: gpu-box:7001
    device: cuda:1
    transport: nccl
    experts: "0"
)"),
              "cluster.yaml:6:16: worker 'a': transport nccl works between processes of one host, but gpu-box:7001 is "
              "not an address of this host (use unix:/path or 127.0.0.1:port, or transport tcp across hosts)");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: unix:/a
    device: cuda:0
    transport: cuda-ipc
    experts: "0"
)"),
              "cluster.yaml:5:16: worker 'a': transport cuda-ipc needs the coordinator on a cuda:N device too "
              "(coordinator: device is cpu); use shm or auto for a CPU coordinator");
    EXPECT_EQ(parse_error(R"(workers:
  - name: a
    address: 127.0.0.1:7001
    transport: shm
    tls: {ca: ca.pem}
    experts: "0"
)"),
              "cluster.yaml:4:16: worker 'a': transport shm is for one host and does not take 'tls' (the data bypasses "
              "gRPC)");
    EXPECT_EQ(parse_error("coordinator: {data_plane_rows: 0}\nworkers:\n  - {name: a, address: unix:/a, experts: '0'}\n"),
              "cluster.yaml:1:32: coordinator: 'data_plane_rows' = 0 is out of range (1-65536)");
    auto ok = parse("coordinator: {device: cuda:0, data_plane_rows: 64}\nworkers:\n"
                    "  - {name: a, address: unix:/a, device: cuda:0, transport: cuda-ipc, experts: '0'}\n"
                    "  - {name: b, address: '[::1]:7002', device: cuda:1, transport: nccl, experts: '1'}\n"
                    "  - {name: c, address: 'localhost:7003', transport: shm, experts: '2'}\n");
    ASSERT_TRUE(ok.ok()) << ok.status().message();
    EXPECT_EQ(ok.value().coordinator.data_plane_rows, 64);
    EXPECT_EQ(ok.value().workers[2].transport, Transport::kShm);
}

// `transport: auto` by locality: another host → gRPC; this host → shm with a CPU on either side,
// cuda-ipc on the coordinator's own GPU, nccl on another GPU; no address → inproc.
TEST(PlacementAuto, PicksByLocality) {
    auto c = parse(R"(coordinator: {device: cuda:0}
workers:
  - {name: remote, address: 10.1.2.3:7001, device: cuda:0, experts: "0"}
  - {name: remote6, address: "[2001:db8::1]:7001", experts: "1"}
  - {name: cpu, address: unix:/tmp/a.sock, experts: "2"}
  - {name: same, address: unix:/tmp/b.sock, device: cuda:0, experts: "3"}
  - {name: other, address: 127.0.0.1:7005, device: cuda:1, experts: "4"}
  - {name: here, experts: "5", transport: inproc}
  - {name: fixed, address: unix:/tmp/c.sock, transport: unix, device: cuda:0, experts: "6-7"}
)");
    ASSERT_TRUE(c.ok()) << c.status().message();
    const ClusterConfig& cfg = c.value();
    std::string why;
    EXPECT_EQ(resolve_transport(cfg, cfg.workers[0], &why), Transport::kTcp);
    EXPECT_EQ(why, "another host: gRPC with the activations in the messages");
    EXPECT_EQ(resolve_transport(cfg, cfg.workers[1]), Transport::kTcp);
    EXPECT_EQ(resolve_transport(cfg, cfg.workers[2], &why), Transport::kShm);
    EXPECT_EQ(why, "this host, a CPU side: shared memory");
    EXPECT_EQ(resolve_transport(cfg, cfg.workers[3], &why), Transport::kCudaIpc);
    EXPECT_EQ(why, "this host, the coordinator's GPU cuda:0: CUDA IPC");
    EXPECT_EQ(resolve_transport(cfg, cfg.workers[4], &why), Transport::kNccl);
    EXPECT_EQ(why, "this host, GPUs cuda:0 and cuda:1: NCCL");
    EXPECT_EQ(resolve_transport(cfg, cfg.workers[5]), Transport::kInproc);
    EXPECT_EQ(resolve_transport(cfg, cfg.workers[6], &why), Transport::kUnix);
    EXPECT_EQ(why, "as configured");
    // A CPU coordinator: every local worker gets shm, whatever its device.
    ClusterConfig cpu = cfg;
    cpu.coordinator.device = Device{};
    EXPECT_EQ(resolve_transport(cpu, cpu.workers[3]), Transport::kShm);
    EXPECT_EQ(resolve_transport(cpu, cpu.workers[4]), Transport::kShm);
    EXPECT_TRUE(is_out_of_band(Transport::kShm) && is_out_of_band(Transport::kNccl) &&
                is_out_of_band(Transport::kCudaIpc));
    EXPECT_FALSE(is_out_of_band(Transport::kTcp) || is_out_of_band(Transport::kAuto));
    // The summary shows what auto became.
    auto m = resolve_placement(cfg, dims(1, 8), nullptr);
    ASSERT_TRUE(m.ok()) << m.status().message();
    const std::string s = placement_summary(cfg, m.value());
    EXPECT_NE(s.find("worker 'same': unix:/tmp/b.sock, device cuda:0, transport auto (cuda-ipc)"), std::string::npos)
        << s;
    EXPECT_NE(s.find("worker 'fixed': unix:/tmp/c.sock, device cuda:0, transport unix\n"), std::string::npos) << s;
}

TEST(PlacementAuto, LocalAddresses) {
    auto addr = [](const char* t) { return parse_address(t).value(); };
    EXPECT_TRUE(is_local_address(addr("unix:/tmp/x.sock")));
    EXPECT_TRUE(is_local_address(addr("127.0.0.1:1")));
    EXPECT_TRUE(is_local_address(addr("127.8.9.10:1")));
    EXPECT_TRUE(is_local_address(addr("LocalHost:1")));
    EXPECT_TRUE(is_local_address(addr("[::1]:1")));
    EXPECT_FALSE(is_local_address(addr("128.0.0.1:1")));
    EXPECT_FALSE(is_local_address(addr("10.0.0.1:1")));
    EXPECT_FALSE(is_local_address(addr("[::2]:1")));
    EXPECT_FALSE(is_local_address(addr("localhost.example.com:1")));
}

TEST(PlacementReject, IdsOutsideTheModel) {
    const char* yaml = R"(workers:
  - name: gpu0
    address: unix:/a
    experts: "0-59"
  - name: gpu1
    address: unix:/b
    experts: "0,60-70"
)";
    EXPECT_EQ(resolve_error(yaml, 4, 64),
              "cluster.yaml:7:17: worker 'gpu1': expert range \"60-70\" exceeds the model's 64 experts (0-63)");
    EXPECT_EQ(resolve_error(R"(workers:
  - name: a
    address: unix:/a
    experts: "0-63, 64"
)",
                            4, 64),
              "cluster.yaml:4:21: worker 'a': expert \"64\" exceeds the model's 64 experts (0-63)");
    EXPECT_EQ(resolve_error(R"(workers:
  - name: a
    address: unix:/a
    layers: {"0-3": "0-63", '4-5': "0-63"}
)",
                            4, 64),
              "cluster.yaml:4:30: worker 'a': layer range \"4-5\" exceeds the model's 4 layers (0-3)");
    EXPECT_EQ(resolve_error(R"(workers:
  - name: a
    address: unix:/a
    experts: "0-63"
    replicas: {7: "0"}
)",
                            4, 64),
              "cluster.yaml:5:16: worker 'a': replica layer \"7\" exceeds the model's 4 layers (0-3)");
}

TEST(PlacementReject, ReplicaOfOwnExpert) {
    EXPECT_EQ(resolve_error(R"(workers:
  - name: a
    address: unix:/a
    experts: "0-63"
    replicas: {"0-3": "5"}
)",
                            4, 64),
              "cluster.yaml:5:23: worker 'a': replica of layer 0 expert 5, which this worker already owns");
}

TEST(PlacementReject, ExpertsWithoutOwner) {
    EXPECT_EQ(resolve_error(R"(workers:
  - name: a
    address: unix:/a
    layers: {"0-23": "0-31", "24-47": "0-59"}
  - name: b
    address: unix:/b
    layers: {"0-9": "32-63", "11-40": "32-63"}
    replicas: {"10": "32-63"}
)",
                            48, 64),
              "cluster.yaml:1:1: no worker owns layer 10 experts 32-63; layers 41-47 experts 60-63 (replicas do not "
              "count as owners)");
    // Long lists are cut after 8 groups.
    std::string many = "workers:\n  - name: a\n    address: unix:/a\n    experts: \"0,2,4\"\n";
    auto err = resolve_error(many, 2, 6);
    EXPECT_EQ(err, "cluster.yaml:1:1: no worker owns layers 0-1 experts 1,3,5 (replicas do not count as owners)");
    std::string striped = "workers:\n  - name: a\n    address: unix:/a\n    layers: {\"0,2,4,6,8,10,12,14,16,18\": \"0\"}\n";
    EXPECT_EQ(resolve_error(striped, 20, 1),
              "cluster.yaml:1:1: no worker owns layer 1 experts 0; layer 3 experts 0; layer 5 experts 0; layer 7 "
              "experts 0; layer 9 experts 0; layer 11 experts 0; layer 13 experts 0; layer 15 experts 0; and 2 more "
              "(replicas do not count as owners)");
}

TEST(PlacementReject, YamlSyntax) {
    EXPECT_EQ(parse_error("workers:\n  - name: a\n    address: [unix:/a\n"),
              "cluster.yaml:4:1: end of sequence flow not found");
    auto e = parse_error("model: \"unterminated\nworkers: []\n");
    EXPECT_EQ(e.rfind("cluster.yaml:", 0), 0u) << e;
    EXPECT_EQ(parse_error(std::string(100, '[')), "cluster.yaml:1:65: nesting deeper than 64 levels");
}

// ---------------------------------------------------------------- ownership maps

TEST(PlacementMap, ThreeWorkersFromFile) {
    std::string dir = testing::source_dir() + "/tests/data/placement";
    auto cfg = load_cluster_config(dir + "/three_workers.yaml");
    ASSERT_TRUE(cfg.ok()) << cfg.status().message();
    const ClusterConfig& c = cfg.value();
    EXPECT_EQ(c.model_path, dir + "/tiny.gguf");
    EXPECT_EQ(c.activations, ActivationFormat::kBf16);
    EXPECT_EQ(c.coordinator.http->str(), "127.0.0.1:18080");
    EXPECT_EQ(c.coordinator.control->port, 17000);
    EXPECT_EQ(c.coordinator.threads, 2);
    EXPECT_EQ(c.coordinator.timeout_ms, 5000);
    ASSERT_EQ(c.workers.size(), 3u);
    EXPECT_EQ(c.workers[0].name, "a");
    EXPECT_EQ(c.workers[0].transport, Transport::kUnix);
    EXPECT_EQ(c.workers[0].address->path, "/tmp/moemesh-test-a.sock");
    EXPECT_EQ(c.workers[0].cache_device_bytes, 0u);
    EXPECT_EQ(c.workers[0].cache_host_bytes, 64u << 20);
    EXPECT_EQ(c.workers[0].threads, 1);
    EXPECT_EQ(c.workers[1].transport, Transport::kTcp);
    EXPECT_EQ(c.workers[1].tls.ca, dir + "/certs/ca.pem");
    EXPECT_EQ(c.workers[1].tls.key, dir + "/certs/b.key");
    EXPECT_EQ(c.workers[2].address->host, "::1");
    EXPECT_EQ(c.workers[2].transport, Transport::kAuto);
    EXPECT_EQ(c.workers[2].device.kind, Device::Kind::kCpu);

    auto m = resolve_placement(c, dims(4, 16), nullptr);
    ASSERT_TRUE(m.ok()) << m.status().message();
    const OwnershipMap& map = m.value();
    // a: experts 0-7 in 4 layers; b: 8-15 in layers 0-1, 8-11 in layer 2, replicas 0-1 in every layer;
    // c: 12-15 in layer 2, 8-15 in layer 3.
    EXPECT_EQ(map.workers[0].primary.size(), 32u);
    EXPECT_EQ(map.workers[1].primary.size(), 20u);
    EXPECT_EQ(map.workers[1].replicas.size(), 8u);
    EXPECT_EQ(map.workers[2].primary.size(), 12u);
    EXPECT_EQ(map.serving(0, 0), (std::vector<int>{0, 1}));
    EXPECT_EQ(map.num_primary[0], 1);
    EXPECT_EQ(map.serving(2, 9), (std::vector<int>{1}));
    EXPECT_EQ(map.serving(2, 13), (std::vector<int>{2}));
    EXPECT_EQ(map.serving(3, 8), (std::vector<int>{2}));
    EXPECT_EQ(map.serving(3, 1), (std::vector<int>{0, 1}));
    EXPECT_TRUE(map.serves(1, 3, 1));
    EXPECT_FALSE(map.serves(1, 3, 8));
    EXPECT_FALSE(map.serves(0, 4, 0));
    for (int l = 0; l < 4; ++l)
        for (int e = 0; e < 16; ++e) EXPECT_GE(map.serving(l, e).size(), 1u) << l << "," << e;
    std::string s = placement_summary(c, map);
    EXPECT_NE(s.find("worker 'a': unix:/tmp/moemesh-test-a.sock, device cpu, transport unix, 1 threads"), std::string::npos) << s;
    EXPECT_NE(s.find("owns 32 pairs (50.0% of all experts), layers 0-3"), std::string::npos) << s;
    EXPECT_NE(s.find("owns 12 pairs (18.8% of all experts), layers 2-3"), std::string::npos) << s;
    EXPECT_NE(s.find("replicas: 8 pairs"), std::string::npos) << s;
    EXPECT_NE(s.find("served by more than one worker: 8 of 64 pairs"), std::string::npos) << s;
}

TEST(PlacementMap, TwoPrimaryOwnersBothServe) {
    auto c = parse(R"(workers:
  - {name: a, address: unix:/a, experts: "0-3"}
  - {name: b, address: unix:/b, experts: "2-5", replicas: {"1": "0"}}
  - {name: c, address: unix:/c, layers: {"0": "6-7", "1": "6-7"}}
)");
    ASSERT_TRUE(c.ok()) << c.status().message();
    auto m = resolve_placement(c.value(), dims(2, 8), nullptr);
    ASSERT_TRUE(m.ok()) << m.status().message();
    EXPECT_EQ(m->serving(0, 2), (std::vector<int>{0, 1}));
    EXPECT_EQ(m->num_primary[2], 2);
    EXPECT_EQ(m->serving(1, 0), (std::vector<int>{0, 1}));  // primary first, then the replica
    EXPECT_EQ(m->num_primary[8], 1);
    EXPECT_EQ(m->workers[2].primary, (std::vector<std::pair<int, int>>{{0, 6}, {0, 7}, {1, 6}, {1, 7}}));
    EXPECT_FALSE(m->bytes_known);
}

TEST(PlacementMap, InprocWorkerNeedsNoAddress) {
    auto c = parse("workers:\n  - {name: local, transport: inproc, experts: \"0-7\"}\n");
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_FALSE(c->workers[0].address.has_value());
    EXPECT_TRUE(resolve_placement(c.value(), dims(2, 8), nullptr).ok());
}

// ---------------------------------------------------------------- shard bytes from a GGUF

class PlacementGguf : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        dir_ = testing::temp_dir("placement");
        MakeModelOptions o;
        o.out = dir_ + "/tiny.gguf";
        o.layers = 2;
        o.hidden = 64;
        o.heads = 2;
        o.kv_heads = 1;
        o.head_dim = 32;
        o.experts = 4;
        o.top_k = 2;
        o.expert_ff = 32;
        o.type = "f32";
        std::ostringstream log;
        Status st = make_model(o, log);
        ASSERT_TRUE(st.ok()) << st.message();
    }
    static std::string dir_;
};
std::string PlacementGguf::dir_;

TEST_F(PlacementGguf, ShardBytesAndBudgets) {
    auto f = GgufFile::open(dir_ + "/tiny.gguf");
    ASSERT_TRUE(f.ok()) << f.status().message();
    auto mc = load_model_config(*f.value());
    ASSERT_TRUE(mc.ok()) << mc.status().message();
    // One expert: gate {64, 32} + up {64, 32} + down {32, 64}, f32 = 3 * 8 KiB.
    const uint64_t kExpert = 3 * 64 * 32 * 4;
    auto cfg = parse(R"(workers:
  - name: a
    address: unix:/a
    cache: {device: 32KiB, host: 32KiB}
    experts: "0-2"
  - name: b
    address: unix:/b
    cache: {host: 64KiB}
    experts: "3"
)");
    ASSERT_TRUE(cfg.ok()) << cfg.status().message();
    auto m = resolve_placement(cfg.value(), mc.value(), f.value().get());
    ASSERT_TRUE(m.ok()) << m.status().message();
    EXPECT_TRUE(m->bytes_known);
    EXPECT_EQ(m->expert_bytes, (std::vector<uint64_t>{kExpert, kExpert}));
    EXPECT_EQ(m->workers[0].bytes, 6 * kExpert);
    EXPECT_EQ(m->workers[0].max_expert_bytes, kExpert);
    EXPECT_TRUE(m->workers[0].streams);   // 64 KiB of budget for a 144 KiB shard: it streams
    EXPECT_FALSE(m->workers[1].streams);  // device budget unlimited
    std::string s = placement_summary(cfg.value(), m.value());
    EXPECT_NE(s.find("shard bytes: 144.00 KiB"), std::string::npos) << s;
    EXPECT_NE(s.find("smaller than the shard: experts stream"), std::string::npos) << s;
    EXPECT_NE(s.find("routed-expert bytes: 192.00 KiB"), std::string::npos) << s;

    auto small = parse(R"(workers:
  - name: a
    address: unix:/a
    cache: {device: 10KiB, host: 10KiB}
    experts: "0-3"
)");
    ASSERT_TRUE(small.ok());
    auto bad = resolve_placement(small.value(), mc.value(), f.value().get());
    ASSERT_FALSE(bad.ok());
    EXPECT_EQ(bad.status().message(),
              "cluster.yaml:4:5: worker 'a': cache budgets (device 10.00 KiB + host 10.00 KiB = 20.00 KiB) cannot hold "
              "one expert of its shard (24.00 KiB, layer 0)");
    // Without the GGUF the budget cannot be judged: accepted.
    EXPECT_TRUE(resolve_placement(small.value(), mc.value(), nullptr).ok());
}

TEST_F(PlacementGguf, CheckCommand) {
    std::string out;
    if (testing::run_capture(testing::moemesh_bin() + " placement --help", &out, "/dev/null") != 0)
        GTEST_SKIP() << "this moemesh binary has no 'placement' subcommand yet";
    std::string yaml = dir_ + "/cluster.yaml";
    {
        std::ofstream(yaml) << "model: tiny.gguf\nworkers:\n  - {name: a, address: unix:/tmp/a.sock, experts: \"0-1\"}\n"
                               "  - {name: b, address: 127.0.0.1:7100, experts: \"2-3\"}\n";
    }
    EXPECT_EQ(testing::run_capture(testing::moemesh_bin() + " placement check " + yaml, &out), 0);
    EXPECT_NE(out.find("owns 4 pairs (50.0% of all experts)"), std::string::npos) << out;
    EXPECT_NE(out.find("\nOK\n"), std::string::npos) << out;
    {
        std::ofstream(yaml) << "model: tiny.gguf\nworkers:\n  - {name: a, address: unix:/tmp/a.sock, experts: \"0-1\"}\n";
    }
    std::string err_file = dir_ + "/err.txt";
    EXPECT_EQ(testing::run_capture(testing::moemesh_bin() + " placement check " + yaml, &out, err_file), 1);
    EXPECT_EQ(testing::read_file(err_file),
              yaml + ":2:1: no worker owns layers 0-1 experts 2-3 (replicas do not count as owners)\n");
    // --model overrides the file's model.
    {
        std::ofstream(yaml) << "model: missing.gguf\nworkers:\n  - {name: a, address: unix:/tmp/a.sock, experts: \"0-3\"}\n";
    }
    EXPECT_EQ(testing::run_capture(testing::moemesh_bin() + " placement check " + yaml + " --model " + dir_ + "/tiny.gguf",
                                   &out),
              0);
}

// ---------------------------------------------------------------- documented examples

TEST(PlacementExamples, AllParseAndValidate) {
    std::string dir = testing::source_dir() + "/deploy/examples";
    int n = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
        if (e.path().extension() != ".yaml") continue;
        ++n;
        SCOPED_TRACE(e.path().string());
        auto cfg = load_cluster_config(e.path().string());
        ASSERT_TRUE(cfg.ok()) << cfg.status().message();
        // Each example names the model's dimensions in a comment: "# dims: layers=48 experts=128".
        std::string text = testing::read_file(e.path().string());
        int layers = 0, experts = 0;
        size_t p = text.find("# dims: ");
        ASSERT_NE(p, std::string::npos);
        ASSERT_EQ(std::sscanf(text.c_str() + p, "# dims: layers=%d experts=%d", &layers, &experts), 2);
        auto m = resolve_placement(cfg.value(), dims(layers, experts), nullptr);
        ASSERT_TRUE(m.ok()) << m.status().message();
        EXPECT_FALSE(placement_summary(cfg.value(), m.value()).empty());
    }
    EXPECT_GE(n, 3);
}

// ---------------------------------------------------------------- never crash

TEST(PlacementRobustness, MutatedAndRandomDocuments) {
    std::vector<std::string> seeds;
    for (const char* d : {"/deploy/examples", "/tests/data/placement"})
        for (const auto& e : std::filesystem::directory_iterator(testing::source_dir() + d))
            if (e.path().extension() == ".yaml") seeds.push_back(testing::read_file(e.path().string()));
    ASSERT_FALSE(seeds.empty());
    const std::string alphabet = " \n\t:-,[]{}\"'#&*!|>?%@`0123456789abcxyz\\";
    std::mt19937_64 rng(1234);
    int parsed = 0;
    for (int it = 0; it < 3000; ++it) {
        std::string doc = seeds[rng() % seeds.size()];
        int edits = 1 + static_cast<int>(rng() % 8);
        for (int k = 0; k < edits && !doc.empty(); ++k) {
            size_t pos = rng() % doc.size();
            switch (rng() % 5) {
                case 0: doc[pos] = alphabet[rng() % alphabet.size()]; break;
                case 1: doc.erase(pos, 1 + rng() % 16); break;
                case 2: doc.insert(pos, 1, alphabet[rng() % alphabet.size()]); break;
                case 3: {  // duplicate a chunk (repeats keys, workers, ...)
                    size_t len = std::min<size_t>(doc.size() - pos, 1 + rng() % 80);
                    std::string chunk = doc.substr(pos, len);
                    doc.insert(rng() % doc.size(), chunk);
                    break;
                }
                default: doc[pos] = static_cast<char>(rng() & 0xff); break;
            }
        }
        auto c = parse_cluster_config(doc, "fuzz.yaml", "/base");
        if (!c.ok()) {
            EXPECT_EQ(c.status().message().rfind("fuzz.yaml", 0), 0u) << c.status().message();
            continue;
        }
        ++parsed;
        for (auto [l, e] : {std::pair{48, 128}, std::pair{2, 8}, std::pair{1, 1}}) {
            auto m = resolve_placement(c.value(), dims(l, e), nullptr);
            if (m.ok()) (void)placement_summary(c.value(), m.value());
        }
    }
    EXPECT_GT(parsed, 0);
    for (int it = 0; it < 2000; ++it) {
        std::string doc(rng() % 200, ' ');
        for (char& ch : doc) ch = alphabet[rng() % alphabet.size()];
        (void)parse_cluster_config(doc, "random.yaml", "");
    }
    // Pathological shapes: deep nesting in flow and block style, huge ids, long lines.
    for (const std::string& doc :
         {std::string(100000, '['), std::string(100000, '{'), std::string(5000, '-') + " x",
          "workers:\n" + std::string(3000, ' ') + "- a", std::string("workers: [") + std::string(64, '[') + "]",
          std::string("workers:\n  - {name: a, address: unix:/a, experts: \"0-2147483647\"}\n"),
          std::string("workers:\n  - {name: a, address: unix:/a, layers: {\"0-99999\": \"0-99999\"}}\n"),
          std::string("a: &x [1]\nb: *x\nworkers: *x\n"), std::string("workers:\n  - *undefined\n")}) {
        auto c = parse_cluster_config(doc, "edge.yaml", "");
        if (c.ok()) (void)resolve_placement(c.value(), dims(48, 128), nullptr);
    }
}

}  // namespace
}  // namespace moemesh
