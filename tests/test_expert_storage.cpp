// Storage tier of the expert cache (worker/expert_storage.h): pread and io_uring read the same
// bytes as the memory-mapped file for every expert, one by one and in batches; a truncated file
// gives the same clear error through both; the read-mode parser names what was wrong.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "common/gguf.h"
#include "common/model_config.h"
#include "tests/test_util.h"
#include "worker/expert_cache.h"
#include "worker/expert_executor.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using namespace moemesh::testing;

std::string dir() {
    static const std::string d = temp_dir("expert_storage");
    return d;
}

// 3 layers, 16 experts top-4, Q8_0 experts of width 96 (matrices of uneven sizes: 96 x 64 and 64 x 96).
std::string model_path() {
    static const std::string p = [] {
        const std::string path = dir() + "/m.gguf";
        std::string out;
        const std::string cmd = moemesh_bin() + " make-model --out " + path +
                                " --layers 3 --hidden 64 --heads 4 --kv-heads 2 --head-dim 16 --experts 16 --top-k 4"
                                " --expert-ff 96 --vocab 600 --type q8_0 --seed 5";
        EXPECT_EQ(run_capture(cmd, &out, dir() + "/make.err"), 0) << read_file(dir() + "/make.err");
        return path;
    }();
    return p;
}

struct Opened {
    std::unique_ptr<GgufFile> file;
    ModelConfig cfg;
};
Opened open_model(const std::string& path) {
    Opened o;
    auto f = GgufFile::open(path);
    EXPECT_TRUE(f.ok()) << f.status().message();
    if (!f.ok()) return o;
    o.file = std::move(f.value());
    auto c = load_model_config(*o.file);
    EXPECT_TRUE(c.ok()) << c.status().message();
    if (c.ok()) o.cfg = c.value();
    return o;
}

// The expert's bytes as the mapped file holds them, laid out as the cache entry.
std::vector<uint8_t> mapped_expert(const GgufFile& f, const ModelConfig& c, const ExpertLayout& lay, int layer,
                                   int expert) {
    std::vector<uint8_t> out(lay.size, 0);
    auto w = layer_expert_weights(f, c, layer);
    EXPECT_TRUE(w.ok());
    const uint64_t off[3] = {0, lay.up_off, lay.down_off};
    const Weight* m[3] = {&w.value().gate, &w.value().up, &w.value().down};
    for (int i = 0; i < 3; ++i) std::memcpy(out.data() + off[i], m[i]->matrix(expert), m[i]->matrix_bytes);
    return out;
}

bool same_data(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, const ExpertLayout& lay) {
    return std::memcmp(a.data(), b.data(), lay.gate_bytes) == 0 &&
           std::memcmp(a.data() + lay.up_off, b.data() + lay.up_off, lay.up_bytes) == 0 &&
           std::memcmp(a.data() + lay.down_off, b.data() + lay.down_off, lay.down_bytes) == 0;
}

TEST(StorageMode, ParsesTheThreeModesAndNamesWhatIsWrong) {
    for (StorageMode m : {StorageMode::kAuto, StorageMode::kPread, StorageMode::kIoUring}) {
        auto r = parse_storage_mode(storage_mode_name(m));
        ASSERT_TRUE(r.ok()) << storage_mode_name(m);
        EXPECT_EQ(r.value(), m);
    }
    for (const char* bad : {"", "uring", "io-uring", "PREAD", "mmap"}) {
        auto r = parse_storage_mode(bad);
        ASSERT_FALSE(r.ok()) << bad;
        EXPECT_NE(r.status().message().find(std::string("'") + bad + "'"), std::string::npos) << r.status().message();
        EXPECT_NE(r.status().message().find("auto, pread or io_uring"), std::string::npos) << r.status().message();
    }
    EXPECT_EQ(CacheOptions().storage, StorageMode::kAuto);
}

TEST(FileExpertReader, PreadReadsWhatTheMappedFileHolds) {
    Opened m = open_model(model_path());
    ASSERT_TRUE(m.file);
    auto r = FileExpertReader::open(*m.file, m.cfg, StorageMode::kPread);
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_EQ(r.value()->mode(), StorageMode::kPread);
    for (int l = 0; l < m.cfg.n_layer; ++l)
        for (int e = 0; e < m.cfg.n_expert; ++e) {
            const ExpertLayout& lay = r.value()->layouts()[l];
            std::vector<uint8_t> got(lay.size, 0xee);
            ASSERT_TRUE(r.value()->read_expert(l, e, got.data()).ok());
            EXPECT_TRUE(same_data(got, mapped_expert(*m.file, m.cfg, lay, l, e), lay)) << l << " " << e;
        }
    EXPECT_EQ(r.value()->reads(), static_cast<uint64_t>(m.cfg.n_layer * m.cfg.n_expert));
}

TEST(FileExpertReader, IoUringReadsTheSameBytesAsPreadOneByOneAndInBatches) {
    std::string why;
    if (!io_uring_usable(&why)) GTEST_SKIP() << "no io_uring: " << why;
    Opened m = open_model(model_path());
    ASSERT_TRUE(m.file);
    auto pr = FileExpertReader::open(*m.file, m.cfg, StorageMode::kPread);
    auto ur = FileExpertReader::open(*m.file, m.cfg, StorageMode::kIoUring);
    auto au = FileExpertReader::open(*m.file, m.cfg, StorageMode::kAuto);
    ASSERT_TRUE(pr.ok() && ur.ok() && au.ok());
    EXPECT_EQ(ur.value()->mode(), StorageMode::kIoUring);
    EXPECT_EQ(au.value()->mode(), StorageMode::kIoUring);  // auto takes io_uring where it works
    // One by one.
    const int L = static_cast<int>(m.cfg.n_layer), E = static_cast<int>(m.cfg.n_expert);
    for (int l = 0; l < L; ++l)
        for (int e = 0; e < E; ++e) {
            const ExpertLayout& lay = pr.value()->layouts()[l];
            std::vector<uint8_t> a(lay.size, 0), b(lay.size, 0);
            ASSERT_TRUE(pr.value()->read_expert(l, e, a.data()).ok());
            ASSERT_TRUE(ur.value()->read_expert(l, e, b.data()).ok());
            EXPECT_TRUE(same_data(a, b, lay)) << l << " " << e;
        }
    // Every expert of the model in one batch: 3 * 48 = 144 matrices, more than one ring's depth (64).
    std::vector<std::vector<uint8_t>> bufs;
    std::vector<ExpertRead> reads;
    for (int l = 0; l < L; ++l)
        for (int e = 0; e < E; ++e) bufs.emplace_back(ur.value()->layouts()[l].size, 0);
    for (int l = 0, i = 0; l < L; ++l)
        for (int e = 0; e < E; ++e, ++i)
            reads.push_back({l, e, bufs[static_cast<size_t>(i)].data(), ur.value()->layouts()[l].size});
    // Each read is reported once, as soon as it is over: its bytes are all there by then (the cache
    // hands an expert to the compute while the rest of the batch is read).
    for (FileExpertReader* r : {ur.value().get(), pr.value().get()}) {
        for (auto& b : bufs) std::fill(b.begin(), b.end(), 0);
        std::vector<Status> out;
        std::vector<int> told(reads.size(), 0);
        int bad_when_told = 0;
        r->read_experts(reads, &out, [&](size_t i) {
            told[i]++;
            const ExpertLayout& lay = r->layouts()[reads[i].layer];
            if (!out[i].ok() ||
                !same_data(bufs[i], mapped_expert(*m.file, m.cfg, lay, reads[i].layer, reads[i].expert), lay))
                bad_when_told++;
        });
        ASSERT_EQ(out.size(), reads.size());
        EXPECT_EQ(told, std::vector<int>(reads.size(), 1)) << storage_mode_name(r->mode());
        EXPECT_EQ(bad_when_told, 0) << storage_mode_name(r->mode());
        for (size_t i = 0; i < reads.size(); ++i) {
            ASSERT_TRUE(out[i].ok()) << out[i].message();
            const ExpertLayout& lay = r->layouts()[reads[i].layer];
            EXPECT_TRUE(same_data(bufs[i], mapped_expert(*m.file, m.cfg, lay, reads[i].layer, reads[i].expert), lay))
                << i;
        }
    }
    EXPECT_EQ(ur.value()->reads(), 2u * static_cast<uint64_t>(L * E));
    EXPECT_EQ(ur.value()->errors(), 0u);
}

// The expert whose matrix ends last in the file, and that end.
struct Last {
    int layer = 0, expert = 0;
    uint64_t end = 0;
};
Last last_expert(const Opened& m) {
    Last r;
    for (int l = 0; l < m.cfg.n_layer; ++l) {
        auto w = layer_expert_weights(*m.file, m.cfg, l);
        EXPECT_TRUE(w.ok());
        for (int e = 0; e < m.cfg.n_expert; ++e)
            for (const Weight* x : {&w.value().gate, &w.value().up, &w.value().down}) {
                const uint64_t end = static_cast<uint64_t>(x->matrix(e) - m.file->base()) + x->matrix_bytes;
                if (end > r.end) r = {l, e, end};
            }
    }
    return r;
}

TEST(FileExpertReader, TruncatedFileGivesTheSameClearErrorThroughIoUring) {
    std::string why;
    if (!io_uring_usable(&why)) GTEST_SKIP() << "no io_uring: " << why;
    const std::string full = model_path();
    Opened m = open_model(full);  // opened (and mapped) before the cut, as a running worker would be
    ASSERT_TRUE(m.file);
    const std::string copy = dir() + "/cut.gguf";
    fs::copy_file(full, copy, fs::copy_options::overwrite_existing);
    Opened mc = open_model(copy);
    auto pr = FileExpertReader::open(*mc.file, mc.cfg, StorageMode::kPread);
    auto ur = FileExpertReader::open(*mc.file, mc.cfg, StorageMode::kIoUring);
    ASSERT_TRUE(pr.ok() && ur.ok());
    const Last cut = last_expert(mc);
    ASSERT_EQ(truncate(copy.c_str(), static_cast<off_t>(cut.end - 10)), 0);  // after the readers opened it
    const ExpertLayout& lay = pr.value()->layouts()[cut.layer];
    std::vector<uint8_t> buf(lay.size);
    Status a = pr.value()->read_expert(cut.layer, cut.expert, buf.data());
    Status b = ur.value()->read_expert(cut.layer, cut.expert, buf.data());
    ASSERT_FALSE(a.ok());
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(a.message(), b.message());
    EXPECT_NE(b.message().find(copy), std::string::npos) << b.message();
    EXPECT_NE(b.message().find("tensor 'blk."), std::string::npos) << b.message();
    EXPECT_NE(b.message().find("bytes ["), std::string::npos) << b.message();
    EXPECT_NE(b.message().find("truncated"), std::string::npos) << b.message();
    // In a batch, the cut expert fails and the others are read intact.
    const int other = cut.expert == 0 ? 1 : 0;
    std::vector<uint8_t> ok_buf(lay.size, 0), bad_buf(lay.size, 0);
    std::vector<ExpertRead> reads = {{cut.layer, other, ok_buf.data(), lay.size},
                                     {cut.layer, cut.expert, bad_buf.data(), lay.size}};
    std::vector<Status> out;
    std::vector<int> told(2, 0);
    std::vector<std::string> when_told(2);
    ur.value()->read_experts(reads, &out, [&](size_t i) {
        told[i]++;
        when_told[i] = out[i].ok() ? "ok" : out[i].message();
    });
    EXPECT_EQ(told, (std::vector<int>{1, 1}));
    EXPECT_EQ(when_told[0], "ok");
    EXPECT_EQ(when_told[1], a.message());  // a failed read is reported with its error already set
    ASSERT_EQ(out.size(), 2u);
    EXPECT_TRUE(out[0].ok()) << out[0].message();
    EXPECT_TRUE(same_data(ok_buf, mapped_expert(*m.file, m.cfg, lay, cut.layer, other), lay));
    ASSERT_FALSE(out[1].ok());
    EXPECT_EQ(out[1].message(), a.message());
    EXPECT_EQ(ur.value()->errors(), 2u);
}

TEST(ExpertCacheStorage, StatsLineNamesTheReadModeAndBothModesComputeTheSame) {
    Opened m = open_model(model_path());
    ASSERT_TRUE(m.file);
    std::string why;
    const bool uring = io_uring_usable(&why);
    for (StorageMode mode : {StorageMode::kPread, StorageMode::kIoUring, StorageMode::kAuto}) {
        CacheOptions o;
        o.device_bytes = 1 << 20;
        o.storage = mode;
        auto c = ExpertCache::create(*m.file, m.cfg, {}, o);
        if (mode == StorageMode::kIoUring && !uring) {
            // Asked for explicitly and not available: refused at start, saying why.
            ASSERT_FALSE(c.ok());
            EXPECT_NE(c.status().message().find("io_uring"), std::string::npos) << c.status().message();
            continue;
        }
        ASSERT_TRUE(c.ok()) << c.status().message();
        ExpertSlice s;
        void* t = nullptr;
        ASSERT_TRUE(c.value()->acquire(1, 3, &s, &t).ok());
        auto w = layer_expert_weights(*m.file, m.cfg, 1);
        ASSERT_TRUE(w.ok());
        EXPECT_EQ(std::memcmp(s.down, w.value().down.matrix(3), w.value().down.matrix_bytes), 0);
        c.value()->release(t);
        const std::string want = mode == StorageMode::kPread || !uring ? "storage (pread)" : "storage (io_uring)";
        EXPECT_NE(c.value()->stats_line().find(want), std::string::npos) << c.value()->stats_line();
    }
}

TEST(ExpertCacheStorage, BandwidthProbeGivesTheStallBound) {
    Opened m = open_model(model_path());
    ASSERT_TRUE(m.file);
    CacheOptions o;
    o.device_bytes = 1 << 20;
    o.storage = StorageMode::kPread;
    auto c = ExpertCache::create(*m.file, m.cfg, {}, o);
    ASSERT_TRUE(c.ok()) << c.status().message();
    const double bw = c.value()->storage_bandwidth();
    EXPECT_GT(bw, 0.0);
    // The probe's reads are not the cache's.
    EXPECT_EQ(c.value()->tier_stats().back().fills, 0u);
    EXPECT_EQ(c.value()->tier_stats().back().bytes_in, 0u);
    for (int e = 0; e < 5; ++e) {
        ExpertSlice s;
        void* t = nullptr;
        ASSERT_TRUE(c.value()->acquire(2, e, &s, &t).ok());
        c.value()->release(t);
    }
    const uint64_t want = c.value()->device().stats().bytes_in;  // 5 misses, nothing evicted
    EXPECT_EQ(c.value()->device().stats().misses, 5u);
    auto st = c.value()->tier_stats();
    EXPECT_EQ(st[0].miss_bytes, want);
    EXPECT_EQ(st.back().bytes_in, want);  // every miss went to the file
    EXPECT_DOUBLE_EQ(st[0].bound_seconds, static_cast<double>(want) / bw);
    const std::string line = c.value()->stats_line();
    EXPECT_NE(line.find(" (bound "), std::string::npos) << line;
    EXPECT_NE(line.find("×)"), std::string::npos) << line;
    EXPECT_NE(line.find("(reference "), std::string::npos) << line;
    // No probe: no bound.
    o.bandwidth_probe_bytes = 0;
    auto d = ExpertCache::create(*m.file, m.cfg, {}, o);
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(d.value()->storage_bandwidth(), 0.0);
    EXPECT_EQ(d.value()->stats_line().find("bound"), std::string::npos);
    // Given: used as is.
    o.storage_bandwidth = 1e9;
    auto g = ExpertCache::create(*m.file, m.cfg, {}, o);
    ASSERT_TRUE(g.ok());
    EXPECT_EQ(g.value()->storage_bandwidth(), 1e9);
}

}  // namespace
}  // namespace moemesh
