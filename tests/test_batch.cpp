// Model::forward_batch (continuous batching): several sequences in one step must give each the
// logits, bit for bit, that it gets alone from forward(): every op is per row or per sequence
// (attention, RoPE positions, the DeltaNet conv and recurrent state). Checked for the three
// architectures, f32 and q8_0, with sequences at different positions, mixed prompt + decode rows,
// and sequences joining and leaving the batch.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "coordinator/backend.h"
#include "coordinator/model.h"
#include "coordinator/sampler.h"
#include "tests/test_util.h"
#include "tools/make_model.h"

namespace moemesh {
namespace {

struct Case {
    const char* arch;
    const char* type;
    int threads;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.arch << "/" << c.type << "/t" << c.threads; }

class ForwardBatch : public ::testing::TestWithParam<Case> {};

std::unique_ptr<Model> make(const Case& c, const std::string& dir) {
    MakeModelOptions o;
    o.arch = c.arch;
    o.out = dir + "/m.gguf";
    o.layers = 4;
    o.hidden = 128;
    o.heads = 4;
    o.kv_heads = 2;
    o.head_dim = 32;
    o.experts = 8;
    o.top_k = 2;
    o.expert_ff = 64;
    o.vocab = 300;
    o.type = c.type;
    o.seed = 7;
    o.full_attention_interval = 2;
    o.ssm_k_heads = 2;
    o.ssm_v_heads = 4;
    o.ssm_head_dim = 32;
    std::ostringstream log;
    Status st = make_model(o, log);
    EXPECT_TRUE(st.ok()) << st.message();
    auto f = GgufFile::open(o.out);
    EXPECT_TRUE(f.ok()) << f.status().message();
    ModelOptions mo;
    mo.n_threads = c.threads;
    mo.n_batch = 64;
    auto m = load_model(std::shared_ptr<GgufFile>(std::move(f).value()), mo);
    EXPECT_TRUE(m.ok()) << m.status().message();
    return m.ok() ? std::move(m).value() : nullptr;
}

std::vector<float> row(const std::vector<float>& logits, int64_t i, int64_t V) {
    return std::vector<float>(logits.begin() + i * V, logits.begin() + (i + 1) * V);
}

int32_t argmax(const std::vector<float>& v) {
    return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

TEST_P(ForwardBatch, EachSequenceGetsItsOwnLogitsBitForBit) {
    const Case c = GetParam();
    const std::string dir = testing::temp_dir(std::string("batch_") + c.arch + "_" + c.type);
    std::unique_ptr<Model> model = make(c, dir);
    ASSERT_TRUE(model);
    const int64_t V = model->config().n_vocab;
    const std::vector<std::vector<int32_t>> prompts = {{5, 17, 42, 99, 3}, {250, 7}, {1, 2, 3, 4, 5, 6, 7, 8, 9}};
    const int kSteps = 6;
    const size_t S = prompts.size();

    // Reference: each sequence alone; its prompt, then greedy steps of one token.
    std::vector<std::vector<std::vector<float>>> want(S);  // [seq][step] logits
    for (size_t s = 0; s < S; ++s) {
        auto seq = model->new_sequence(64).value();
        std::vector<float> logits;
        ASSERT_TRUE(model->forward(*seq, prompts[s].data(), static_cast<int64_t>(prompts[s].size()), false, &logits).ok());
        want[s].push_back(logits);
        for (int k = 0; k < kSteps; ++k) {
            const int32_t next = argmax(logits);
            ASSERT_TRUE(model->forward(*seq, &next, 1, false, &logits).ok());
            want[s].push_back(logits);
        }
    }

    // Batched: sequence 0's prompt alone, then every step in one forward_batch. Sequence 1 joins at
    // step 1 with its whole prompt as a multi-token segment beside the others' single tokens;
    // sequence 2 joins at step 2; sequence 0 leaves after its last step.
    std::vector<std::unique_ptr<SequenceState>> seqs;
    for (size_t s = 0; s < S; ++s) seqs.push_back(model->new_sequence(64).value());
    std::vector<std::vector<std::vector<float>>> got(S);
    std::vector<float> logits;
    ASSERT_TRUE(model->forward(*seqs[0], prompts[0].data(), static_cast<int64_t>(prompts[0].size()), false, &logits).ok());
    got[0].push_back(logits);
    for (int step = 1; got[1].size() < want[1].size() || got[2].size() < want[2].size() || got[0].size() < want[0].size();
         ++step) {
        std::vector<SequenceState*> ptrs;
        std::vector<int64_t> counts;
        std::vector<int32_t> tokens;
        std::vector<size_t> which;
        for (size_t s = 0; s < S; ++s) {
            if (got[s].size() >= want[s].size()) continue;                      // finished
            if (got[s].empty() && static_cast<int>(s) > step) continue;         // not joined yet
            if (got[s].empty()) {                                               // joins with its prompt
                tokens.insert(tokens.end(), prompts[s].begin(), prompts[s].end());
                counts.push_back(static_cast<int64_t>(prompts[s].size()));
            } else {
                tokens.push_back(argmax(got[s].back()));
                counts.push_back(1);
            }
            ptrs.push_back(seqs[s].get());
            which.push_back(s);
        }
        ASSERT_FALSE(ptrs.empty());
        Status st = model->forward_batch(ptrs.data(), counts.data(), static_cast<int64_t>(ptrs.size()), tokens.data(), &logits);
        ASSERT_TRUE(st.ok()) << st.message();
        ASSERT_EQ(logits.size(), ptrs.size() * static_cast<size_t>(V));
        for (size_t i = 0; i < which.size(); ++i) got[which[i]].push_back(row(logits, static_cast<int64_t>(i), V));
    }
    for (size_t s = 0; s < S; ++s) {
        ASSERT_EQ(got[s].size(), want[s].size());
        for (size_t k = 0; k < want[s].size(); ++k)
            ASSERT_EQ(got[s][k], want[s][k]) << c.arch << " " << c.type << ": sequence " << s << ", step " << k;
    }
}

// forward_argmax / forward_batch_argmax (greedy decoding without the logits) pick what the logits'
// argmax picks, with the same state change: a prompt longer than the batch (chunks), then greedy
// steps alone and in batches with sequences at different positions.
TEST_P(ForwardBatch, ArgmaxFormsPickTheLogitsArgmax) {
    const Case c = GetParam();
    const std::string dir = testing::temp_dir(std::string("batch_argmax_") + c.arch + "_" + c.type);
    std::unique_ptr<Model> model = make(c, dir);
    ASSERT_TRUE(model);
    std::vector<int32_t> long_prompt(70);  // > n_batch (64): two chunks
    for (size_t i = 0; i < long_prompt.size(); ++i) long_prompt[i] = static_cast<int32_t>((i * 37 + 11) % 300);
    const std::vector<std::vector<int32_t>> prompts = {long_prompt, {250, 7}, {1, 2, 3, 4, 5, 6, 7, 8, 9}};
    const int kSteps = 5;
    const size_t S = prompts.size();
    std::vector<std::vector<int32_t>> want(S);  // each sequence alone, from its logits
    for (size_t s = 0; s < S; ++s) {
        auto seq = model->new_sequence(128).value();
        std::vector<float> logits;
        ASSERT_TRUE(
            model->forward(*seq, prompts[s].data(), static_cast<int64_t>(prompts[s].size()), false, &logits).ok());
        for (int k = 0; k <= kSteps; ++k) {
            want[s].push_back(argmax(logits));
            if (k < kSteps) {
                ASSERT_TRUE(model->forward(*seq, &want[s].back(), 1, false, &logits).ok());
            }
        }
    }
    // forward_argmax alone.
    for (size_t s = 0; s < S; ++s) {
        auto seq = model->new_sequence(128).value();
        std::vector<int32_t> got(1, -1);
        ASSERT_TRUE(
            model->forward_argmax(*seq, prompts[s].data(), static_cast<int64_t>(prompts[s].size()), &got[0]).ok());
        for (int k = 0; k < kSteps; ++k) {
            int32_t next = -1;
            ASSERT_TRUE(model->forward_argmax(*seq, &got.back(), 1, &next).ok());
            got.push_back(next);
        }
        EXPECT_EQ(got, want[s]) << c.arch << " " << c.type << ": sequence " << s << " alone";
        EXPECT_EQ(seq->n_past, static_cast<int64_t>(prompts[s].size()) + kSteps);
        // Bad input: refused, nothing changed.
        const int32_t bad = 300;
        int32_t untouched = -7;
        EXPECT_FALSE(model->forward_argmax(*seq, &bad, 1, &untouched).ok());
        EXPECT_EQ(untouched, -7);
        EXPECT_EQ(seq->n_past, static_cast<int64_t>(prompts[s].size()) + kSteps);
    }
    // forward_batch_argmax: every sequence's prompt alone, then all of them step by step together.
    std::vector<std::unique_ptr<SequenceState>> seqs;
    std::vector<std::vector<int32_t>> got(S);
    for (size_t s = 0; s < S; ++s) {
        seqs.push_back(model->new_sequence(128).value());
        int32_t first = -1;
        ASSERT_TRUE(
            model->forward_argmax(*seqs[s], prompts[s].data(), static_cast<int64_t>(prompts[s].size()), &first).ok());
        got[s].push_back(first);
    }
    for (int k = 0; k < kSteps; ++k) {
        std::vector<SequenceState*> ptrs;
        std::vector<int32_t> tokens;
        for (size_t s = 0; s < S; ++s) ptrs.push_back(seqs[s].get()), tokens.push_back(got[s].back());
        const std::vector<int64_t> counts(S, 1);
        std::vector<int32_t> next(S, -1);
        Status st = model->forward_batch_argmax(ptrs.data(), counts.data(), static_cast<int64_t>(S), tokens.data(),
                                                next.data());
        ASSERT_TRUE(st.ok()) << st.message();
        for (size_t s = 0; s < S; ++s) got[s].push_back(next[s]);
    }
    for (size_t s = 0; s < S; ++s)
        EXPECT_EQ(got[s], want[s]) << c.arch << " " << c.type << ": sequence " << s << " batched";
}

// forward_top_k / forward_batch_top_k (sampling's candidates without the logits): the k largest of
// the logits forward() gives, by top_k_ids' order, with their values, alone and batched; bad k
// refused without a state change.
TEST_P(ForwardBatch, TopKFormsGiveTheLogitsLargest) {
    const Case c = GetParam();
    const std::string dir = testing::temp_dir(std::string("batch_topk_") + c.arch + "_" + c.type);
    std::unique_ptr<Model> model = make(c, dir);
    ASSERT_TRUE(model);
    const int64_t V = model->config().n_vocab;
    const std::vector<std::vector<int32_t>> prompts = {{5, 17, 42, 99, 3}, {250, 7}, {1, 2, 3, 4, 5, 6, 7, 8, 9}};
    const size_t S = prompts.size();
    const int64_t k = 40;
    std::vector<std::unique_ptr<SequenceState>> ref, seqs;
    std::vector<std::vector<float>> want(S);  // each sequence's logits after its prompt + token 11
    for (size_t s = 0; s < S; ++s) {
        ref.push_back(model->new_sequence(64).value());
        seqs.push_back(model->new_sequence(64).value());
        std::vector<float> logits;
        ASSERT_TRUE(model->forward(*ref[s], prompts[s].data(), static_cast<int64_t>(prompts[s].size()), false,
                                   &logits).ok());
        std::vector<int32_t> ids(k);
        std::vector<float> vals(k);
        ASSERT_TRUE(model->forward_top_k(*seqs[s], prompts[s].data(), static_cast<int64_t>(prompts[s].size()), k,
                                         ids.data(), vals.data()).ok());
        std::vector<int32_t> want_ids;
        top_k_ids(logits.data(), V, k, want_ids);
        EXPECT_EQ(ids, want_ids) << c.arch << " " << c.type << ": sequence " << s;
        for (int64_t j = 0; j < k; ++j) EXPECT_EQ(vals[j], logits[want_ids[j]]) << "sequence " << s << ", rank " << j;
        const int32_t next = 11;
        ASSERT_TRUE(model->forward(*ref[s], &next, 1, false, &want[s]).ok());
    }
    std::vector<SequenceState*> ptrs;
    for (auto& q : seqs) ptrs.push_back(q.get());
    const std::vector<int64_t> counts(S, 1);
    const std::vector<int32_t> tokens(S, 11);
    std::vector<int32_t> ids(S * k);
    std::vector<float> vals(S * k);
    ASSERT_TRUE(model->forward_batch_top_k(ptrs.data(), counts.data(), static_cast<int64_t>(S), tokens.data(), k,
                                           ids.data(), vals.data()).ok());
    for (size_t s = 0; s < S; ++s) {
        std::vector<int32_t> want_ids;
        top_k_ids(want[s].data(), V, k, want_ids);
        EXPECT_EQ(std::vector<int32_t>(ids.begin() + s * k, ids.begin() + (s + 1) * k), want_ids) << "batched " << s;
        EXPECT_EQ(vals[s * k], want[s][want_ids[0]]) << "batched " << s;
    }
    const int64_t past = seqs[0]->n_past;
    EXPECT_FALSE(model->forward_top_k(*seqs[0], tokens.data(), 1, 65, ids.data(), vals.data()).ok());
    EXPECT_FALSE(model->forward_top_k(*seqs[0], tokens.data(), 1, 0, ids.data(), vals.data()).ok());
    EXPECT_EQ(seqs[0]->n_past, past);
}

// A sequence given more room mid-way (the HTTP server's prompt cache does this) continues exactly
// as one that had the room from the start.
TEST(GrowSequence, ContinuesAsIfAllocatedLarge) {
    for (const char* arch : {"qwen3moe", "qwen3next"}) {
        SCOPED_TRACE(arch);
        const Case c{arch, "q8_0", 1};
        std::unique_ptr<Model> model = make(c, testing::temp_dir(std::string("grow_") + arch));
        ASSERT_TRUE(model);
        const std::vector<int32_t> prompt = {9, 8, 7, 6, 5, 4, 3};
        auto big = model->new_sequence(40).value(), small = model->new_sequence(8).value();
        std::vector<float> want, got;
        ASSERT_TRUE(model->forward(*big, prompt.data(), 7, false, &want).ok());
        ASSERT_TRUE(model->forward(*small, prompt.data(), 7, false, &got).ok());
        const int32_t two[2] = {11, 12};
        EXPECT_FALSE(model->forward(*small, two, 2, false, &got).ok());  // 9 > 8
        ASSERT_TRUE(model->grow_sequence(*small, 40).ok());
        EXPECT_EQ(small->n_ctx, 40);
        for (int step = 0; step < 10; ++step) {
            const int32_t t = static_cast<int32_t>(20 + step);
            ASSERT_TRUE(model->forward(*big, &t, 1, false, &want).ok());
            ASSERT_TRUE(model->forward(*small, &t, 1, false, &got).ok());
            ASSERT_EQ(got, want) << "step " << step;
        }
    }
}

TEST(ForwardBatchErrors, BadBatchesAreRefusedWithoutChangingState) {
    for (const char* arch : {"qwen3moe", "qwen3next", "qwen35moe"}) {
        SCOPED_TRACE(arch);
        const Case c{arch, "f32", 1};
        const std::string dir = testing::temp_dir(std::string("batchbad_") + c.arch);
        std::unique_ptr<Model> model = make(c, dir);
        ASSERT_TRUE(model);
        auto a = model->new_sequence(4).value(), b = model->new_sequence(64).value();
        std::vector<float> logits;
        const int32_t toks[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        SequenceState* twice[2] = {a.get(), a.get()};
        const int64_t ones[2] = {1, 1};
        Status st = model->forward_batch(twice, ones, 2, toks, &logits);
        EXPECT_FALSE(st.ok());
        EXPECT_NE(st.message().find("twice"), std::string::npos) << st.message();
        SequenceState* ab[2] = {a.get(), b.get()};
        const int64_t too_long[2] = {5, 1};  // a holds 4
        st = model->forward_batch(ab, too_long, 2, toks, &logits);
        EXPECT_FALSE(st.ok());
        EXPECT_NE(st.message().find("context full"), std::string::npos) << st.message();
        const int64_t zero[2] = {1, 0};
        EXPECT_FALSE(model->forward_batch(ab, zero, 2, toks, &logits).ok());
        const int32_t bad[2] = {1, 100000};
        st = model->forward_batch(ab, ones, 2, bad, &logits);
        EXPECT_FALSE(st.ok());
        EXPECT_NE(st.message().find("out of range"), std::string::npos) << st.message();
        EXPECT_EQ(a->n_past, 0);
        EXPECT_EQ(b->n_past, 0);
    }
}

INSTANTIATE_TEST_SUITE_P(Archs, ForwardBatch,
                         ::testing::Values(Case{"qwen3moe", "f32", 1}, Case{"qwen3moe", "q8_0", 2},
                                           Case{"qwen3next", "f32", 1}, Case{"qwen3next", "q8_0", 2},
                                           Case{"qwen35moe", "f32", 1}, Case{"qwen35moe", "q4_k", 2}),
                         [](const auto& info) {
                             return std::string(info.param.arch) + "_" + info.param.type + "_t" +
                                    std::to_string(info.param.threads);
                         });

// Scratch the backend cannot allocate: BackendOutOfMemory naming the size (the model turns it into
// its forward call's error), not an abort.
TEST(Backend, CpuScratchThatCannotBeHadThrowsBackendOutOfMemory) {
#if defined(__SANITIZE_ADDRESS__)
    GTEST_SKIP() << "AddressSanitizer aborts on an allocation this large instead of returning null";
#endif
    ThreadPool pool(1);
    auto be = make_backend("cpu", pool);
    ASSERT_TRUE(be.ok()) << be.status().message();
    try {
        Buffer b = (*be)->alloc(size_t{1} << 60, false);
        FAIL() << "an allocation of 1 EiB succeeded";
    } catch (const BackendOutOfMemory& e) {
        EXPECT_EQ(e.status.message(), "cpu: out of memory for a buffer of 1.00 EiB") << e.status.message();
    }
    EXPECT_TRUE(static_cast<bool>((*be)->alloc(1024, true)));
}

}  // namespace
}  // namespace moemesh
