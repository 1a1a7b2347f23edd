// Causal GQA attention over the KV cache (see AttentionArgs in kernels/ops.h for layouts).
#include <cmath>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/ops.h"

namespace moemesh {

namespace {

// One (token, head) pair: scores over keys 0..n_kv-1, softmax, weighted sum of values.
void attend_one(const AttentionArgs& a, int64_t t, int64_t h, std::vector<float>& scores, std::vector<float>& qbuf) {
    const int64_t group = a.n_head / a.n_head_kv;
    const int64_t kvh = h / group;
    const int64_t d = a.head_dim;
    const int64_t n_kv = a.n_past + t + 1;
    const int64_t kv_stride = a.n_head_kv * d;
    const float* q = a.q + (t * a.n_head + h) * d;
    float* out = a.out + (t * a.n_head + h) * d;
    scores.resize(static_cast<size_t>(n_kv));
#if defined(__x86_64__) || defined(__i386__)
    if (quants::cpu_has_avx2()) {
        qbuf.resize(static_cast<size_t>(d));
        const int64_t off = kvh * d;
        const void* k = a.kv_f16 ? static_cast<const void*>(static_cast<const uint16_t*>(a.k) + off)
                                 : static_cast<const void*>(static_cast<const float*>(a.k) + off);
        const void* v = a.kv_f16 ? static_cast<const void*>(static_cast<const uint16_t*>(a.v) + off)
                                 : static_cast<const void*>(static_cast<const float*>(a.v) + off);
        quants::avx2::attend_one(q, k, v, a.kv_f16, n_kv, kv_stride, d, a.scale, scores.data(), qbuf.data(), out);
        return;
    }
#endif
    if (a.kv_f16) {
        qbuf.resize(static_cast<size_t>(d));
        for (int64_t i = 0; i < d; ++i) qbuf[i] = fp16_to_fp32(fp32_to_fp16(q[i]));
        const auto* k = static_cast<const uint16_t*>(a.k) + kvh * d;
        for (int64_t j = 0; j < n_kv; ++j) {
            const uint16_t* kj = k + j * kv_stride;
            float s = 0.0f;
            for (int64_t i = 0; i < d; ++i) s += qbuf[i] * fp16_to_fp32(kj[i]);
            scores[j] = s * a.scale;
        }
    } else {
        const auto* k = static_cast<const float*>(a.k) + kvh * d;
        for (int64_t j = 0; j < n_kv; ++j) {
            const float* kj = k + j * kv_stride;
            float s = 0.0f;
            for (int64_t i = 0; i < d; ++i) s += q[i] * kj[i];
            scores[j] = s * a.scale;
        }
    }
    softmax_inplace(scores.data(), n_kv);
    for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
    if (a.kv_f16) {
        const auto* v = static_cast<const uint16_t*>(a.v) + kvh * d;
        for (int64_t j = 0; j < n_kv; ++j) {
            const float p = fp16_to_fp32(fp32_to_fp16(scores[j]));
            const uint16_t* vj = v + j * kv_stride;
            for (int64_t i = 0; i < d; ++i) out[i] += p * fp16_to_fp32(vj[i]);
        }
    } else {
        const auto* v = static_cast<const float*>(a.v) + kvh * d;
        for (int64_t j = 0; j < n_kv; ++j) {
            const float p = scores[j];
            const float* vj = v + j * kv_stride;
            for (int64_t i = 0; i < d; ++i) out[i] += p * vj[i];
        }
    }
}

}  // namespace

void attention(ThreadPool& pool, const AttentionArgs& a) {
    const int64_t n_items = a.n_tokens * a.n_head;
    pool.parallel_for(n_items, [&](int64_t begin, int64_t end) {
        std::vector<float> scores, qbuf;
        for (int64_t it = begin; it < end; ++it) attend_one(a, it / a.n_head, it % a.n_head, scores, qbuf);
    });
}

}  // namespace moemesh
