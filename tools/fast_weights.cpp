#include "tools/fast_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "common/status.h"
#include "kernels/cpu/quants_iq.h"

namespace moemesh {

namespace {

// SplitMix64 as a stream: word i of row `key` is mix(key + (i+1)·γ). No state carried between
// words but the counter, so the loops below have no dependency chain.
struct Stream {
    uint64_t s;
    uint64_t next() {
        uint64_t x = (s += 0x9E3779B97F4A7C15ull);
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
        return x ^ (x >> 31);
    }
};

// ggml's block layouts (ggml-common.h), as kernels/cpu/quants_internal.h has them.
constexpr int kQ8Block = 32, kQ8Bytes = 34;      // fp16 d, int8 qs[32]
constexpr int kQ4KBlock = 256, kQ4KBytes = 144;  // fp16 d, fp16 dmin, scales[12], qs[128]
constexpr int kQ4KScale = 8, kQ4KMin = 60;       // 8·7.5: the min cancels the mean of q

void q8_0_row(Stream& st, float sigma, uint8_t* out, int64_t n) {
    const uint16_t d = fp32_to_fp16(static_cast<float>(sigma / kFastQ8Std));
    constexpr uint64_t kLo = 0x00FF00FF00FF00FFull;
    for (int64_t b = 0; b < n / kQ8Block; ++b, out += kQ8Bytes) {
        std::memcpy(out, &d, 2);
        int8_t* q = reinterpret_cast<int8_t*>(out + 2);
        for (int j = 0; j < kQ8Block; j += 4) {
            const uint64_t a = st.next(), c = st.next();
            // Four 16-bit lanes, each the sum of four random bytes (at most 1020).
            const uint64_t s = (a & kLo) + ((a >> 8) & kLo) + (c & kLo) + ((c >> 8) & kLo);
            for (int k = 0; k < 4; ++k) q[j + k] = static_cast<int8_t>((static_cast<int>((s >> (16 * k)) & 0xFFFF) - 510) / 4);
        }
    }
}

// The 12 bytes of 6-bit scales and mins, packed as ggml's get_scale_min_k4 reads them.
void pack_q4_k_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t out[12]) {
    for (int j = 0; j < 4; ++j) {
        out[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        out[j + 4] = static_cast<uint8_t>((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        out[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
    }
}

void q4_k_row(Stream& st, float sigma, uint8_t* out, int64_t n) {
    const uint16_t d = fp32_to_fp16(sigma / (kQ4KScale * 2.5f));
    uint8_t scales[12];
    {
        uint8_t sc[8], m[8];
        std::memset(sc, kQ4KScale, sizeof sc);
        std::memset(m, kQ4KMin, sizeof m);
        pack_q4_k_scales(sc, m, scales);
    }
    constexpr uint64_t k2 = 0x3333333333333333ull;  // the low 2 bits of every nibble
    for (int64_t b = 0; b < n / kQ4KBlock; ++b, out += kQ4KBytes) {
        std::memcpy(out, &d, 2);
        std::memcpy(out + 2, &d, 2);  // dmin = d
        std::memcpy(out + 4, scales, 12);
        uint8_t* qs = out + 16;
        // 5 words → 32 nibbles, each the sum of five 2-bit fields (at most 15: no carry between nibbles).
        // Which nibble is which element does not matter: all are independent and alike.
        for (int g = 0; g < 8; ++g, qs += 16) {
            uint64_t lo = 0, hi = 0;
            for (int k = 0; k < 5; ++k) {
                const uint64_t w = st.next();
                lo += w & k2;
                hi += (w >> 2) & k2;
            }
            std::memcpy(qs, &lo, 8);
            std::memcpy(qs + 8, &hi, 8);
        }
    }
}

// The i-quants: every block byte random (grid indices, signs, sub-block scales, IQ1 shifts: each
// uniform over its range), then d = σ / sqrt(the mean square of such a block's values at d = 1).
void iq_row(GgmlType t, Stream& st, float sigma, uint8_t* out, int64_t n) {
    const uint16_t d = fp32_to_fp16(static_cast<float>(sigma / std::sqrt(quants::iq_unit_mean_square(t))));
    const size_t bytes = ggml_type_info(t).type_size;
    for (int64_t b = 0; b < n / kQK_K; ++b, out += bytes) {
        for (size_t i = 0; i < bytes; i += 8) {
            const uint64_t w = st.next();
            std::memcpy(out + i, &w, std::min<size_t>(8, bytes - i));
        }
        quants::iq_set_block_scale(t, out, d);
    }
}

}  // namespace

bool fast_weights_direct(GgmlType t) {
    return t == GgmlType::Q8_0 || t == GgmlType::Q4_K || quants::is_iq_lowbit(t);
}

void fast_weights_row_direct(GgmlType t, uint64_t key, float sigma, uint8_t* out, int64_t n) {
    Stream st{key};
    switch (t) {
        case GgmlType::Q8_0:
            MM_CHECK(n % kQ8Block == 0);
            q8_0_row(st, sigma, out, n);
            break;
        case GgmlType::Q4_K:
            MM_CHECK(n % kQ4KBlock == 0);
            q4_k_row(st, sigma, out, n);
            break;
        default:
            MM_CHECK(quants::is_iq_lowbit(t) && n % kQK_K == 0);
            iq_row(t, st, sigma, out, n);
            break;
    }
}

void fast_weights_row_floats(uint64_t key, float sigma, float* row, int64_t n) {
    Stream st{key};
    // Sum of four uniform 16-bit integers: mean 2·65535, variance 4·(65536² - 1)/12.
    const float k = sigma / 37837.227237206f;
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t w = st.next();
        const int32_t s = static_cast<int32_t>((w & 0xFFFF) + ((w >> 16) & 0xFFFF) + ((w >> 32) & 0xFFFF) + (w >> 48));
        row[i] = k * static_cast<float>(s - 2 * 65535);
    }
}

}  // namespace moemesh
