// Worker: shard store (reads only owned bytes), the ExpertWorker service over a real Unix socket
// (handshake, refusals, health, expert stream results against ExpertCompute on the mapped file,
// malformed calls, stats, drain/shutdown), and the moemesh-worker binary as a process (RSS grows
// with the shard, signals, Shutdown).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "common/half.h"
#include "common/weights.h"
#include "proto/moemesh.grpc.pb.h"
#include "tests/gguf_split_util.h"
#include "tests/test_util.h"
#include "worker/expert_executor.h"
#include "worker/shard_store.h"
#include "worker/worker_service.h"

extern char** environ;

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using moemesh::testing::run_capture;

// The small model every case uses: 2 layers, H = 64, 8 experts of width 32, q8_0 weights.
constexpr int kLayers = 2, kHidden = 64, kExperts = 8, kExpertFf = 32;

std::string make_model(const std::string& dir, const std::string& name, const std::string& extra) {
    const std::string path = dir + "/" + name;
    if (fs::exists(path)) return path;
    std::string out;
    const std::string cmd = moemesh::testing::moemesh_bin() + " make-model --out " + path + " " + extra;
    EXPECT_EQ(run_capture(cmd, &out, dir + "/make_model.log"), 0) << cmd;
    return path;
}

std::string test_dir() {
    static const std::string d = [] {
        std::string p = "/tmp/moemesh_test_worker_" + std::to_string(getpid());
        fs::create_directories(p);
        return p;
    }();
    return d;
}

// Removes the temp dir when every case passed (kept for inspection otherwise).
class TempDirCleanup : public ::testing::Environment {
public:
    void TearDown() override {
        if (!::testing::UnitTest::GetInstance()->Failed()) fs::remove_all(test_dir());
    }
};
const auto* const kCleanup = ::testing::AddGlobalTestEnvironment(new TempDirCleanup);

std::string small_model() {
    return make_model(test_dir(), "small.gguf",
                      str_printf("--layers %d --hidden %d --heads 4 --kv-heads 2 --head-dim 16 --experts %d --top-k 2 "
                                 "--expert-ff %d --vocab 600 --type q8_0",
                                 kLayers, kHidden, kExperts, kExpertFf));
}

// The shard the service tests use: layer 0 owns 0-3 and 5, layer 1 owns 2, 4, 6, 7.
const ShardSpec kShard = {{0, 1, 2, 3, 5}, {2, 4, 6, 7}};

struct Model {
    std::unique_ptr<GgufFile> file;
    ModelConfig cfg;
};
Model open_model(const std::string& path) {
    Model m;
    auto f = GgufFile::open(path);
    EXPECT_TRUE(f.ok()) << f.status().message();
    m.file = std::move(f).value();
    auto c = load_model_config(*m.file);
    EXPECT_TRUE(c.ok()) << c.status().message();
    m.cfg = c.value();
    return m;
}

v1::HandshakeRequest handshake_request(const std::string& fingerprint, const std::string& name,
                                       const ShardSpec& shard) {
    v1::HandshakeRequest r;
    r.set_protocol_version(v1::PROTOCOL_VERSION_CURRENT);
    r.set_model_fingerprint(fingerprint);
    r.set_worker_name(name);
    r.set_activation_dtype(v1::DTYPE_F32);
    for (size_t l = 0; l < shard.size(); ++l) {
        v1::LayerShard* ls = r.add_shard();
        ls->set_layer(static_cast<uint32_t>(l));
        for (int e : shard[l]) ls->add_experts(static_cast<uint32_t>(e));
    }
    return r;
}

std::unique_ptr<v1::ExpertWorker::Stub> connect(const std::string& address) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    auto ch = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
    return v1::ExpertWorker::NewStub(ch);
}

void set_deadline(grpc::ClientContext* ctx, int seconds = 10) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
}

v1::HandshakeResponse handshake(v1::ExpertWorker::Stub& stub, const v1::HandshakeRequest& req) {
    grpc::ClientContext ctx;
    set_deadline(&ctx);
    v1::HandshakeResponse resp;
    grpc::Status st = stub.Handshake(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp;
}

v1::HealthResponse health(v1::ExpertWorker::Stub& stub) {
    grpc::ClientContext ctx;
    set_deadline(&ctx);
    v1::HealthResponse resp;
    grpc::Status st = stub.Health(&ctx, v1::HealthRequest(), &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp;
}

v1::StatsResponse stats(v1::ExpertWorker::Stub& stub) {
    grpc::ClientContext ctx;
    set_deadline(&ctx);
    v1::StatsResponse resp;
    grpc::Status st = stub.Stats(&ctx, v1::StatsRequest(), &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp;
}

bool wait_ready(v1::ExpertWorker::Stub& stub, int timeout_ms = 10000) {
    for (int waited = 0; waited < timeout_ms; waited += 10) {
        if (health(stub).ready()) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
}

// One call's inputs, and the call as sent.
struct Work {
    int layer = 0;
    int64_t n_rows = 0;
    std::vector<float> x;  // [n_rows, H]
    std::vector<int32_t> rows, experts;
    std::vector<float> weights;
};

Work random_work(int layer, int64_t n_rows, const std::vector<int>& held, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_real_distribution<float> ud(0.05f, 1.f);
    Work w;
    w.layer = layer;
    w.n_rows = n_rows;
    w.x.resize(static_cast<size_t>(n_rows * kHidden));
    for (float& v : w.x) v = nd(rng);
    // Each row picks two different held experts, pairs interleaved across rows as a coordinator
    // would send them (slot order).
    for (int64_t r = 0; r < n_rows; ++r) {
        const size_t a = rng() % held.size();
        size_t b = rng() % held.size();
        if (b == a) b = (a + 1) % held.size();
        for (size_t k : {a, b}) {
            w.rows.push_back(static_cast<int32_t>(r));
            w.experts.push_back(held[k]);
            w.weights.push_back(ud(rng));
        }
    }
    return w;
}

template <class T>
std::string bytes_of(const std::vector<T>& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

v1::ExpertCall make_call(uint64_t id, const Work& w, v1::DType dtype = v1::DTYPE_F32) {
    v1::ExpertCall c;
    c.set_request_id(id);
    c.set_step(7);
    c.set_layer(static_cast<uint32_t>(w.layer));
    c.set_n_rows(static_cast<uint32_t>(w.n_rows));
    c.set_hidden(kHidden);
    c.set_dtype(dtype);
    if (dtype == v1::DTYPE_BF16) {
        std::vector<uint16_t> h(w.x.size());
        for (size_t i = 0; i < h.size(); ++i) h[i] = fp32_to_bf16(w.x[i]);
        c.set_activations(bytes_of(h));
    } else {
        c.set_activations(bytes_of(w.x));
    }
    c.set_pair_rows(bytes_of(w.rows));
    c.set_pair_experts(bytes_of(w.experts));
    c.set_pair_weights(bytes_of(w.weights));
    return c;
}

// ExpertCompute on every expert, read straight from the mapped file: what the worker must match.
std::vector<float> reference(const Model& m, const Work& w, const std::vector<float>& x) {
    static ThreadPool pool(2);
    auto tables = map_expert_tables(*m.file, m.cfg);
    EXPECT_TRUE(tables.ok()) << tables.status().message();
    ExpertCompute ec(m.cfg, pool, std::move(tables).value());
    std::vector<float> out(static_cast<size_t>(w.n_rows * kHidden));
    Status st = ec.compute(w.layer, x.data(), w.n_rows, w.rows.data(), w.experts.data(), w.weights.data(),
                           static_cast<int64_t>(w.rows.size()), out.data());
    EXPECT_TRUE(st.ok()) << st.message();
    return out;
}

// A worker server in this process, on a fresh Unix socket.
struct InProcessWorker {
    std::unique_ptr<WorkerServer> server;
    std::unique_ptr<v1::ExpertWorker::Stub> stub;
    std::string fingerprint;

    explicit InProcessWorker(const std::string& tag, const std::string& name = "w1") {
        WorkerOptions o;
        o.model_path = small_model();
        o.listen = "unix:" + test_dir() + "/" + tag + ".sock";
        o.name = name;
        o.threads = 2;
        auto s = WorkerServer::start(o);
        EXPECT_TRUE(s.ok()) << s.status().message();
        if (!s.ok()) return;
        server = std::move(s).value();
        fingerprint = server->service().fingerprint();
        stub = connect(server->address());
    }
};

// ---------------------------------------------------------------------------------------------
// ShardStore

TEST(ShardStore, ReadsExactlyTheOwnedSlices) {
    Model m = open_model(small_model());
    auto planned = ShardStore::plan(*m.file, m.cfg, kShard);
    ASSERT_TRUE(planned.ok()) << planned.status().message();
    ShardStore& s = *planned.value();
    uint64_t want = 0;
    for (int l = 0; l < kLayers; ++l) {
        for (Tensor t : {Tensor::kFfnGateExps, Tensor::kFfnUpExps, Tensor::kFfnDownExps}) {
            const GgufTensor* gt = m.file->tensor(tensor_name(t, l));
            ASSERT_NE(gt, nullptr);
            want += kShard[l].size() * (gt->nbytes / static_cast<size_t>(kExperts));
        }
    }
    EXPECT_EQ(s.total_bytes(), want);
    EXPECT_EQ(s.loaded_bytes(), 0u);
    ASSERT_TRUE(s.load().ok());
    EXPECT_EQ(s.loaded_bytes(), want);
    EXPECT_TRUE(s.loaded());

    auto mapped = map_expert_tables(*m.file, m.cfg);
    ASSERT_TRUE(mapped.ok());
    const auto& tables = s.tables();
    ASSERT_EQ(tables.size(), static_cast<size_t>(kLayers));
    for (int l = 0; l < kLayers; ++l) {
        auto gate = get_weight(*m.file, tensor_name(Tensor::kFfnGateExps, l), {kHidden, kExpertFf, kExperts});
        auto down = get_weight(*m.file, tensor_name(Tensor::kFfnDownExps, l), {kExpertFf, kHidden, kExperts});
        ASSERT_TRUE(gate.ok() && down.ok());
        EXPECT_EQ(tables[l].gate_type, mapped.value()[l].gate_type);
        for (int e = 0; e < kExperts; ++e) {
            const bool owned = std::count(kShard[l].begin(), kShard[l].end(), e) > 0;
            const ExpertSlice& got = tables[l].experts[e];
            const ExpertSlice& ref = mapped.value()[l].experts[e];
            if (!owned) {
                EXPECT_EQ(got.gate, nullptr) << "layer " << l << " expert " << e;
                continue;
            }
            ASSERT_NE(got.gate, nullptr);
            EXPECT_EQ(reinterpret_cast<uintptr_t>(got.gate) % 64, 0u);
            EXPECT_EQ(std::memcmp(got.gate, ref.gate, gate.value().matrix_bytes), 0);
            EXPECT_EQ(std::memcmp(got.up, ref.up, gate.value().matrix_bytes), 0);
            EXPECT_EQ(std::memcmp(got.down, ref.down, down.value().matrix_bytes), 0);
        }
    }
}

// A split model (llama.cpp's gguf-split layout): the owned slices come from the files that hold them.
TEST(ShardStore, ReadsASplitModel) {
    const std::string first = testing::write_gguf_split(small_model(), test_dir() + "/shard_split", 5);
    Model whole = open_model(small_model());
    Model split = open_model(first);
    ASSERT_GT(split.file->split_count(), 2u);
    auto planned = ShardStore::plan(*split.file, split.cfg, kShard);
    ASSERT_TRUE(planned.ok()) << planned.status().message();
    ASSERT_TRUE(planned.value()->load().ok());
    auto mapped = map_expert_tables(*whole.file, whole.cfg);
    ASSERT_TRUE(mapped.ok());
    for (int l = 0; l < kLayers; ++l) {
        auto gate = get_weight(*whole.file, tensor_name(Tensor::kFfnGateExps, l), {kHidden, kExpertFf, kExperts});
        auto down = get_weight(*whole.file, tensor_name(Tensor::kFfnDownExps, l), {kExpertFf, kHidden, kExperts});
        ASSERT_TRUE(gate.ok() && down.ok());
        for (int e : kShard[l]) {
            const ExpertSlice& got = planned.value()->tables()[l].experts[e];
            const ExpertSlice& ref = mapped.value()[l].experts[e];
            ASSERT_NE(got.gate, nullptr);
            EXPECT_EQ(std::memcmp(got.gate, ref.gate, gate.value().matrix_bytes), 0) << l << " " << e;
            EXPECT_EQ(std::memcmp(got.up, ref.up, gate.value().matrix_bytes), 0) << l << " " << e;
            EXPECT_EQ(std::memcmp(got.down, ref.down, down.value().matrix_bytes), 0) << l << " " << e;
        }
    }
}

TEST(ShardStore, RejectsOutOfRangeShard) {
    Model m = open_model(small_model());
    auto bad_expert = ShardStore::plan(*m.file, m.cfg, {{0, kExperts}});
    ASSERT_FALSE(bad_expert.ok());
    EXPECT_NE(bad_expert.status().message().find("expert 8 in layer 0"), std::string::npos)
        << bad_expert.status().message();
    auto bad_layer = ShardStore::plan(*m.file, m.cfg, {{}, {}, {1}});
    ASSERT_FALSE(bad_layer.ok());
    EXPECT_NE(bad_layer.status().message().find("layer 2"), std::string::npos) << bad_layer.status().message();
}

TEST(ShardStore, TruncatedFileNamesTensorAndRange) {
    const std::string copy = test_dir() + "/truncated.gguf";
    fs::copy_file(small_model(), copy, fs::copy_options::overwrite_existing);
    Model m = open_model(copy);
    auto planned = ShardStore::plan(*m.file, m.cfg, {{}, {kExperts - 1}});
    ASSERT_TRUE(planned.ok()) << planned.status().message();
    // The last expert of the last layer's down tensor lies at the end of the data: cut into it.
    const GgufTensor* down = m.file->tensor(tensor_name(Tensor::kFfnDownExps, 1));
    ASSERT_NE(down, nullptr);
    const uint64_t end = m.file->data_offset() + down->offset + down->nbytes;
    ASSERT_EQ(truncate(copy.c_str(), static_cast<off_t>(end - 100)), 0);
    Status st = planned.value()->load();
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find(copy), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("bytes ["), std::string::npos) << st.message();
    EXPECT_FALSE(planned.value()->loaded());
}

// ---------------------------------------------------------------------------------------------
// Service over a Unix socket

TEST(WorkerService, HandshakeRefusals) {
    InProcessWorker w("refusals");
    ASSERT_TRUE(w.stub);
    auto req = handshake_request(w.fingerprint, "w1", kShard);

    auto v = req;
    v.set_protocol_version(2);
    auto r = handshake(*w.stub, v);
    EXPECT_FALSE(r.accepted());
    EXPECT_EQ(r.reason(), "protocol version 2 != worker's 1");
    EXPECT_EQ(r.protocol_version(), 1u);

    auto f = req;
    f.set_model_fingerprint("0123456789abcdef");
    r = handshake(*w.stub, f);
    EXPECT_FALSE(r.accepted());
    EXPECT_EQ(r.reason(), "model fingerprint mismatch: coordinator has 0123456789abcdef, worker has " +
                              w.fingerprint + " (file " + small_model() + ")");
    EXPECT_EQ(r.model_fingerprint(), w.fingerprint);

    auto n = req;
    n.set_worker_name("w2");
    r = handshake(*w.stub, n);
    EXPECT_FALSE(r.accepted());
    EXPECT_EQ(r.reason(), "worker name mismatch: coordinator expects 'w2', this worker is 'w1'");

    r = handshake(*w.stub, handshake_request(w.fingerprint, "w1", {{0, 8}}));
    EXPECT_FALSE(r.accepted());
    EXPECT_EQ(r.reason(), "shard names expert 8 in layer 0, the model has 8 experts per layer (0-7)");

    r = handshake(*w.stub, handshake_request(w.fingerprint, "w1", {{}, {}, {0}}));
    EXPECT_FALSE(r.accepted());
    EXPECT_EQ(r.reason(), "shard names layer 2, the model has 2 layers (0-1)");

    // Refusals leave the worker without a shard.
    auto h = health(*w.stub);
    EXPECT_FALSE(h.ready());
    EXPECT_EQ(h.shard_bytes(), 0u);

    r = handshake(*w.stub, req);
    EXPECT_TRUE(r.accepted()) << r.reason();
    EXPECT_GT(r.shard_bytes(), 0u);
    EXPECT_TRUE(wait_ready(*w.stub));
}

TEST(WorkerService, ExpertsMatchComputeOnMappedFile) {
    InProcessWorker w("experts");
    ASSERT_TRUE(w.stub);
    auto hs = handshake(*w.stub, handshake_request(w.fingerprint, "w1", kShard));
    ASSERT_TRUE(hs.accepted()) << hs.reason();
    ASSERT_TRUE(wait_ready(*w.stub));
    auto h = health(*w.stub);
    EXPECT_EQ(h.loaded_bytes(), h.shard_bytes());
    EXPECT_EQ(h.shard_bytes(), hs.shard_bytes());
    EXPECT_EQ(h.worker_name(), "w1");

    Model m = open_model(small_model());
    grpc::ClientContext ctx;
    set_deadline(&ctx, 30);
    auto stream = w.stub->Experts(&ctx);
    uint64_t id = 100;
    int64_t total_rows = 0, total_pairs = 0;
    for (int layer = 0; layer < kLayers; ++layer) {
        for (int64_t n_rows : {1, 5, 17}) {
            Work wk = random_work(layer, n_rows, kShard[layer], static_cast<uint32_t>(id));
            ASSERT_TRUE(stream->Write(make_call(id, wk)));
            v1::ExpertResult res;
            ASSERT_TRUE(stream->Read(&res));
            EXPECT_EQ(res.error(), "");
            EXPECT_EQ(res.request_id(), id);
            EXPECT_EQ(res.layer(), static_cast<uint32_t>(layer));
            EXPECT_EQ(res.n_rows(), static_cast<uint32_t>(n_rows));
            std::vector<float> want = reference(m, wk, wk.x);
            ASSERT_EQ(res.partial().size(), want.size() * 4);
            EXPECT_EQ(std::memcmp(res.partial().data(), want.data(), want.size() * 4), 0)
                << "layer " << layer << " rows " << n_rows << ": not bitwise equal to ExpertCompute";
            ++id;
            total_rows += n_rows;
            total_pairs += static_cast<int64_t>(wk.rows.size());
        }
    }
    // bf16 in and out: the worker widens the activations exactly and rounds the partial sums.
    Work wk = random_work(1, 9, kShard[1], 5);
    ASSERT_TRUE(stream->Write(make_call(id, wk, v1::DTYPE_BF16)));
    v1::ExpertResult res;
    ASSERT_TRUE(stream->Read(&res));
    ASSERT_EQ(res.error(), "");
    EXPECT_EQ(res.dtype(), v1::DTYPE_BF16);
    ASSERT_EQ(res.partial().size(), wk.x.size() * 2);
    std::vector<float> xr(wk.x.size());
    for (size_t i = 0; i < xr.size(); ++i) xr[i] = bf16_to_fp32(fp32_to_bf16(wk.x[i]));
    std::vector<float> exact = reference(m, wk, wk.x), rounded_in = reference(m, wk, xr);
    double max_rel = 0, scale = 0;
    for (float v : exact) scale = std::max(scale, static_cast<double>(std::fabs(v)));
    for (size_t i = 0; i < exact.size(); ++i) {
        uint16_t hbits;
        std::memcpy(&hbits, res.partial().data() + 2 * i, 2);
        EXPECT_EQ(hbits, fp32_to_bf16(rounded_in[i])) << i;
        max_rel = std::max(max_rel, std::fabs(bf16_to_fp32(hbits) - exact[i]) / scale);
    }
    EXPECT_LT(max_rel, 0.03);
    total_rows += wk.n_rows;
    total_pairs += static_cast<int64_t>(wk.rows.size());
    ++id;
    stream->WritesDone();
    EXPECT_FALSE(stream->Read(&res));
    EXPECT_TRUE(stream->Finish().ok());

    auto s = stats(*w.stub);
    EXPECT_EQ(s.worker_name(), "w1");
    EXPECT_EQ(s.calls(), id - 100);
    EXPECT_EQ(s.rows(), static_cast<uint64_t>(total_rows));
    EXPECT_EQ(s.pairs(), static_cast<uint64_t>(total_pairs));
    EXPECT_EQ(s.errors(), 0u);
    EXPECT_GT(s.busy_seconds(), 0.0);
    EXPECT_GT(s.rss_bytes(), 0u);
    EXPECT_EQ(s.shard_bytes(), hs.shard_bytes());
    EXPECT_GT(s.bytes_in(), static_cast<uint64_t>(total_rows * kHidden * 2));
    EXPECT_GT(s.bytes_out(), static_cast<uint64_t>(total_rows * kHidden * 2));
}

TEST(WorkerService, MalformedCallsGetErrorsAndTheStreamGoesOn) {
    InProcessWorker w("malformed");
    ASSERT_TRUE(w.stub);
    Model m = open_model(small_model());
    grpc::ClientContext ctx;
    set_deadline(&ctx, 30);
    auto stream = w.stub->Experts(&ctx);
    Work good = random_work(0, 3, kShard[0], 1);
    auto expect_error = [&](const v1::ExpertCall& c, const std::string& what) {
        ASSERT_TRUE(stream->Write(c));
        v1::ExpertResult res;
        ASSERT_TRUE(stream->Read(&res));
        EXPECT_EQ(res.request_id(), c.request_id());
        EXPECT_NE(res.error().find(what), std::string::npos) << "got: '" << res.error() << "', want: " << what;
        EXPECT_TRUE(res.partial().empty());
    };
    auto expect_ok = [&](const v1::ExpertCall& c, const Work& wk) {
        ASSERT_TRUE(stream->Write(c));
        v1::ExpertResult res;
        ASSERT_TRUE(stream->Read(&res));
        EXPECT_EQ(res.request_id(), c.request_id());
        EXPECT_EQ(res.error(), "");
        std::vector<float> want = reference(m, wk, wk.x);
        ASSERT_EQ(res.partial().size(), want.size() * 4);
        EXPECT_EQ(std::memcmp(res.partial().data(), want.data(), want.size() * 4), 0);
    };
    // Before any handshake.
    expect_error(make_call(1, good), "no accepted handshake");

    auto hs = handshake(*w.stub, handshake_request(w.fingerprint, "w1", kShard));
    ASSERT_TRUE(hs.accepted()) << hs.reason();
    // The same stream now works (waits for the shard if it is still loading).
    expect_ok(make_call(2, good), good);

    auto c = make_call(3, good);
    c.set_activations(c.activations().substr(4));
    expect_error(c, "activations are 764 bytes, expected n_rows 3 × hidden 64 × 4 = 768");

    Work bad_row = good;
    bad_row.rows[1] = 3;
    expect_error(make_call(4, bad_row), "pair 1: row 3 out of range [0, 3)");

    Work not_owned = good;
    not_owned.experts[2] = 4;
    expect_error(make_call(5, not_owned), "pair 2: expert 4 of layer 0 is not in this worker's shard");

    Work bad_expert = good;
    bad_expert.experts[0] = 99;
    expect_error(make_call(6, bad_expert), "pair 0: expert 99 out of range [0, 8)");

    c = make_call(7, good);
    c.set_layer(2);
    expect_error(c, "layer 2 out of range");

    c = make_call(8, good);
    c.set_hidden(32);
    expect_error(c, "hidden 32 != the model's 64");

    c = make_call(9, good);
    c.set_pair_weights(c.pair_weights().substr(4));
    expect_error(c, "pair arrays are 24/24/20 bytes");

    c = make_call(10, good);
    c.set_pair_rows(c.pair_rows() + "xy");
    c.set_pair_experts(c.pair_experts() + "xy");
    c.set_pair_weights(c.pair_weights() + "xy");
    expect_error(c, "multiple of 4");

    c = make_call(11, good);
    c.set_dtype(static_cast<v1::DType>(7));
    expect_error(c, "unknown dtype 7");

    Work good2 = random_work(1, 4, kShard[1], 2);
    expect_ok(make_call(12, good2), good2);

    // Reconnect with the same shard: kept, not reloaded; a different shard replaces it.
    const uint64_t loaded = health(*w.stub).loaded_bytes();
    auto again = handshake(*w.stub, handshake_request(w.fingerprint, "w1", kShard));
    ASSERT_TRUE(again.accepted());
    auto h = health(*w.stub);
    EXPECT_TRUE(h.ready());
    EXPECT_EQ(h.loaded_bytes(), loaded);
    auto other = handshake(*w.stub, handshake_request(w.fingerprint, "w1", {{4}, {}}));
    ASSERT_TRUE(other.accepted());
    EXPECT_LT(other.shard_bytes(), hs.shard_bytes());
    Work four = good;
    four.experts.assign(good.experts.size(), 4);
    expect_ok(make_call(13, four), four);
    expect_error(make_call(14, good), "is not in this worker's shard");

    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
    auto s = stats(*w.stub);
    EXPECT_EQ(s.calls(), 3u);
    EXPECT_EQ(s.errors(), 11u);
}

TEST(WorkerService, DrainThenShutdown) {
    InProcessWorker w("drain");
    ASSERT_TRUE(w.stub);
    ASSERT_TRUE(handshake(*w.stub, handshake_request(w.fingerprint, "w1", kShard)).accepted());
    ASSERT_TRUE(wait_ready(*w.stub));
    {
        grpc::ClientContext ctx;
        set_deadline(&ctx);
        v1::DrainResponse resp;
        ASSERT_TRUE(w.stub->Drain(&ctx, v1::DrainRequest(), &resp).ok());
    }
    auto h = health(*w.stub);
    EXPECT_TRUE(h.draining());
    EXPECT_FALSE(h.ready());
    {
        grpc::ClientContext ctx;
        set_deadline(&ctx);
        auto stream = w.stub->Experts(&ctx);
        ASSERT_TRUE(stream->Write(make_call(1, random_work(0, 2, kShard[0], 3))));
        v1::ExpertResult res;
        ASSERT_TRUE(stream->Read(&res));
        EXPECT_NE(res.error().find("draining"), std::string::npos) << res.error();
        stream->WritesDone();
        EXPECT_TRUE(stream->Finish().ok());
    }
    // Shutdown: wait() returns even with a stream still open.
    grpc::ClientContext sctx;
    set_deadline(&sctx);
    auto open_stream = w.stub->Experts(&sctx);
    {
        grpc::ClientContext ctx;
        set_deadline(&ctx);
        v1::ShutdownResponse resp;
        ASSERT_TRUE(w.stub->Shutdown(&ctx, v1::ShutdownRequest(), &resp).ok());
    }
    const auto t0 = std::chrono::steady_clock::now();
    w.server->wait();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

TEST(WorkerServer, BadOptionsAndFiles) {
    WorkerOptions o;
    o.model_path = small_model();
    o.name = "w1";
    o.listen = "nonsense";
    auto s = WorkerServer::start(o);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.status().message().find("expected unix:/path/to/socket or host:port"), std::string::npos);
    o.listen = "127.0.0.1:99999";
    s = WorkerServer::start(o);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.status().message().find("port '99999'"), std::string::npos) << s.status().message();

    const std::string junk = test_dir() + "/junk.gguf";
    std::ofstream(junk) << "this is not a gguf file at all, not even close";
    o.model_path = junk;
    o.listen = "unix:" + test_dir() + "/junk.sock";
    s = WorkerServer::start(o);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.status().message().find(junk), std::string::npos) << s.status().message();

    // TCP on an ephemeral loopback port.
    o.model_path = small_model();
    o.listen = ":0";
    s = WorkerServer::start(o);
    ASSERT_TRUE(s.ok()) << s.status().message();
    EXPECT_EQ(s.value()->address().rfind("127.0.0.1:", 0), 0u) << s.value()->address();
    auto stub = connect(s.value()->address());
    EXPECT_EQ(health(*stub).worker_name(), "w1");
}

// TLS with a shared CA, as across hosts: the worker requires a client certificate signed by the CA.
// The certificates are generated here with openssl.
TEST(WorkerServer, TlsWithClientCertificates) {
    std::string out;
    if (run_capture("command -v openssl", &out) != 0) GTEST_SKIP() << "openssl is not on PATH";
    const std::string d = test_dir() + "/tls";
    fs::create_directories(d);
    const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const std::string script =
        "cd " + d + " && set -e\n" +
        "openssl req -x509 " + key + " -keyout ca.key -out ca.pem -days 2 -subj /CN=moemesh-test-ca\n" +
        "openssl req " + key + " -keyout worker.key -out worker.csr -subj /CN=worker\n" +
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext\n" +
        "openssl x509 -req -in worker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out worker.pem -days 2 "
        "-extfile san.ext\n" +
        "openssl req " + key + " -keyout coord.key -out coord.csr -subj /CN=coordinator\n" +
        "openssl x509 -req -in coord.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out coord.pem -days 2\n";
    ASSERT_EQ(run_capture("bash -c \"" + script + "\"", &out, d + "/openssl.log"), 0)
        << moemesh::testing::read_file(d + "/openssl.log");

    WorkerOptions o;
    o.model_path = small_model();
    o.name = "tls1";
    o.listen = "127.0.0.1:0";
    o.tls_cert = d + "/worker.pem";
    o.tls_key = d + "/worker.key";
    o.tls_ca = d + "/ca.pem";
    auto s = WorkerServer::start(o);
    ASSERT_TRUE(s.ok()) << s.status().message();
    const std::string addr = s.value()->address();

    auto health_status = [&](std::shared_ptr<grpc::ChannelCredentials> creds) {
        auto stub = v1::ExpertWorker::NewStub(grpc::CreateChannel(addr, creds));
        grpc::ClientContext ctx;
        set_deadline(&ctx, 3);
        v1::HealthResponse resp;
        grpc::Status st = stub->Health(&ctx, v1::HealthRequest(), &resp);
        return st.ok() ? resp.worker_name() : "error: " + st.error_message();
    };
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = moemesh::testing::read_file(d + "/ca.pem");
    ssl.pem_private_key = moemesh::testing::read_file(d + "/coord.key");
    ssl.pem_cert_chain = moemesh::testing::read_file(d + "/coord.pem");
    EXPECT_EQ(health_status(grpc::SslCredentials(ssl)), "tls1");
    // No client certificate, or no TLS at all: refused by the worker.
    grpc::SslCredentialsOptions anon;
    anon.pem_root_certs = ssl.pem_root_certs;
    EXPECT_EQ(health_status(grpc::SslCredentials(anon)).rfind("error", 0), 0u);
    EXPECT_EQ(health_status(grpc::InsecureChannelCredentials()).rfind("error", 0), 0u);

    o.tls_key.clear();
    auto half = WorkerServer::start(o);
    ASSERT_FALSE(half.ok());
    EXPECT_EQ(half.status().message(), "--tls-cert and --tls-key go together");
}

// ---------------------------------------------------------------------------------------------
// The moemesh-worker binary

struct WorkerProcess {
    pid_t pid = -1;
    std::string log;

    static std::string binary() { return std::string(MOEMESH_BINARY_DIR) + "/moemesh-worker"; }
    WorkerProcess(const std::vector<std::string>& args, const std::string& log_path) : log(log_path) {
        std::vector<std::string> argv = {binary()};
        argv.insert(argv.end(), args.begin(), args.end());
        std::vector<char*> cargv;
        for (auto& a : argv) cargv.push_back(a.data());
        cargv.push_back(nullptr);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 2, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        EXPECT_EQ(posix_spawn(&pid, cargv[0], &fa, nullptr, cargv.data(), environ), 0);
        posix_spawn_file_actions_destroy(&fa);
    }
    // Waits for the "listening on" line; false if the process exited or it took too long.
    bool wait_listening() {
        for (int i = 0; i < 1000; ++i) {
            if (moemesh::testing::read_file(log).find("listening on") != std::string::npos) return true;
            int st;
            if (waitpid(pid, &st, WNOHANG) == pid) {
                pid = -1;
                return false;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        return false;
    }
    // Exit status, or -1 if it did not exit within the timeout (then it is killed).
    int wait_exit(int timeout_ms = 5000) {
        for (int waited = 0; waited < timeout_ms; waited += 10) {
            int st;
            if (waitpid(pid, &st, WNOHANG) == pid) {
                pid = -1;
                return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        return -1;
    }
    uint64_t rss_bytes() const {
        std::ifstream in("/proc/" + std::to_string(pid) + "/status");
        std::string line;
        while (std::getline(in, line))
            if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
        return 0;
    }
    ~WorkerProcess() {
        if (pid > 0) {
            kill(pid, SIGKILL);
            waitpid(pid, nullptr, 0);
        }
    }
};

TEST(WorkerBinary, RssGrowsWithTheShardAndSignalsStopIt) {
    ASSERT_TRUE(fs::exists(WorkerProcess::binary())) << "build the moemesh-worker target first";
    // 2 layers × 16 experts × 1.5 MiB (f32, H 256, I 512): 48 MiB of experts.
    const std::string model = make_model(test_dir(), "rss.gguf",
                                         "--layers 2 --hidden 256 --heads 4 --kv-heads 2 --head-dim 64 --experts 16 "
                                         "--top-k 2 --expert-ff 512 --vocab 600 --type f32");
    auto m = open_model(model);
    const std::string sock = test_dir() + "/bin_rss.sock";
    WorkerProcess p({"--model", model, "--listen", "unix:" + sock, "--name", "cpu0", "--threads", "1"},
                    test_dir() + "/bin_rss.log");
    ASSERT_TRUE(p.wait_listening()) << moemesh::testing::read_file(p.log);
    EXPECT_NE(moemesh::testing::read_file(p.log).find("moemesh-worker cpu0 listening on unix:" + sock + " (model " +
                                                      m.file->fingerprint() + ")"),
              std::string::npos)
        << moemesh::testing::read_file(p.log);
    auto stub = connect("unix:" + sock);
    const uint64_t base = p.rss_bytes();
    ShardSpec half(2), all(2);
    for (int l = 0; l < 2; ++l)
        for (int e = 0; e < 16; ++e) {
            all[l].push_back(e);
            if (e % 2 == 0) half[l].push_back(e);
        }
    auto hs = handshake(*stub, handshake_request(m.file->fingerprint(), "cpu0", half));
    ASSERT_TRUE(hs.accepted()) << hs.reason();
    ASSERT_TRUE(wait_ready(*stub));
    const uint64_t rss_half = p.rss_bytes();
    hs = handshake(*stub, handshake_request(m.file->fingerprint(), "cpu0", all));
    ASSERT_TRUE(hs.accepted()) << hs.reason();
    ASSERT_TRUE(wait_ready(*stub));
    const uint64_t rss_all = p.rss_bytes();
    const double mib = 1 << 20;
    std::printf("worker RSS: started %.1f MiB, half the experts (24 MiB) %.1f MiB, all (48 MiB) %.1f MiB\n",
                base / mib, rss_half / mib, rss_all / mib);
    EXPECT_EQ(hs.shard_bytes(), 48ull << 20);
    EXPECT_LT(rss_half, base + 30 * (1 << 20));
    EXPECT_GT(rss_all - rss_half, 20ull << 20);
    EXPECT_LT(rss_all - rss_half, 30ull << 20);

    kill(p.pid, SIGTERM);
    EXPECT_EQ(p.wait_exit(), 0) << moemesh::testing::read_file(p.log);
    EXPECT_NE(moemesh::testing::read_file(p.log).find("SIGTERM"), std::string::npos);
}

TEST(WorkerBinary, ShutdownCallEndsTheProcessAndBadFilesExit1) {
    ASSERT_TRUE(fs::exists(WorkerProcess::binary())) << "build the moemesh-worker target first";
    const std::string sock = test_dir() + "/bin_sd.sock";
    WorkerProcess p({"--model", small_model(), "--listen", "unix:" + sock, "--name", "w1"},
                    test_dir() + "/bin_sd.log");
    ASSERT_TRUE(p.wait_listening()) << moemesh::testing::read_file(p.log);
    auto stub = connect("unix:" + sock);
    {
        grpc::ClientContext ctx;
        set_deadline(&ctx);
        v1::ShutdownResponse resp;
        ASSERT_TRUE(stub->Shutdown(&ctx, v1::ShutdownRequest(), &resp).ok());
    }
    EXPECT_EQ(p.wait_exit(), 0) << moemesh::testing::read_file(p.log);

    // A worker killed with SIGKILL leaves its socket file behind; the next one on it starts anyway.
    WorkerProcess k({"--model", small_model(), "--listen", "unix:" + sock, "--name", "w1"},
                    test_dir() + "/bin_k1.log");
    ASSERT_TRUE(k.wait_listening());
    kill(k.pid, SIGKILL);
    EXPECT_EQ(k.wait_exit(), 128 + SIGKILL);
    ASSERT_TRUE(fs::exists(sock));
    WorkerProcess k2({"--model", small_model(), "--listen", "unix:" + sock, "--name", "w1"},
                     test_dir() + "/bin_k2.log");
    ASSERT_TRUE(k2.wait_listening()) << moemesh::testing::read_file(k2.log);
    kill(k2.pid, SIGINT);
    EXPECT_EQ(k2.wait_exit(), 0);

    const std::string junk = test_dir() + "/junk2.gguf";
    std::ofstream(junk) << "GGUF but then nothing useful";
    WorkerProcess bad({"--model", junk, "--listen", "unix:" + test_dir() + "/bad.sock", "--name", "w1"},
                      test_dir() + "/bin_bad.log");
    EXPECT_EQ(bad.wait_exit(), 1);
    const std::string err = moemesh::testing::read_file(test_dir() + "/bin_bad.log");
    EXPECT_NE(err.find("moemesh-worker: error: " + junk), std::string::npos) << err;
}

}  // namespace
}  // namespace moemesh
