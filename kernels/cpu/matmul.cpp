// Y[m, n_out] = X[m, k] · W[n_out, k]ᵀ for every computable weight type.
//
// 1. X is converted once per call to the activation type llama.cpp pairs with the weight type
//    (quants::type_kernels), into a per-thread scratch buffer: A[m, a_stride bytes].
// 2. The output is cut into tiles of (up to) kTileRows W rows × tile_m X rows; threads take tiles.
//    Within a tile the W rows are reused for every X row while they sit in L1/L2, which is what
//    keeps prompt processing (large m) from re-streaming the weights from memory per token.
// 3. Types with a decoded-row path (the i-quants, whose grid lookups cost more than the dot itself)
//    decode the tile's W rows once into a per-thread buffer when the tile has kDecodeMinM or more X
//    rows, and run the 4-row dot on that; the results are the same bits either way.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/quants_internal.h"
#include "kernels/ops.h"

namespace moemesh {
namespace {

// Conversion of X into the activation type, reused between calls on the calling thread.
std::vector<uint8_t>& act_scratch() {
    thread_local std::vector<uint8_t> buf;
    return buf;
}

constexpr int64_t kMinRowsPerTile = 4;
constexpr int64_t kMaxRowsPerTile = 64;
constexpr int64_t kTileRowsLargeM = 16;  // W rows per tile when m is large
constexpr int64_t kTileM = 64;           // X rows per tile when m is large
constexpr int64_t kDecodeMinM = 8;       // X rows in a tile from which W rows are decoded first

std::vector<uint8_t>& dec_scratch() {
    thread_local std::vector<uint8_t> buf;
    return buf;
}

}  // namespace

void matmul(ThreadPool& pool, GgmlType wt, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m,
            float* y) {
    const quants::TypeKernels* kt = quants::type_kernels(wt);
    MM_CHECK(kt != nullptr);
    MM_CHECK(k > 0 && k % kt->block == 0);
    MM_CHECK(n_out >= 0 && m >= 0);
    if (m == 0 || n_out == 0) return;

    const size_t w_stride = ggml_row_bytes(wt, k);
    const auto* wb = static_cast<const uint8_t*>(w);

    // ---- 1. activations ----
    const uint8_t* act;
    size_t a_stride;
    if (kt->quantize_act == nullptr) {
        act = reinterpret_cast<const uint8_t*>(x);
        a_stride = static_cast<size_t>(k) * sizeof(float);
    } else {
        a_stride = ggml_row_bytes(kt->act_type, k);
        std::vector<uint8_t>& buf = act_scratch();
        if (buf.size() < a_stride * static_cast<size_t>(m)) buf.resize(a_stride * static_cast<size_t>(m));
        uint8_t* a = buf.data();
        const auto quantize_rows = [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) kt->quantize_act(x + r * k, a + static_cast<size_t>(r) * a_stride, k);
        };
        if (m * k >= (1 << 16)) {
            pool.parallel_for(m, quantize_rows);
        } else {
            quantize_rows(0, m);
        }
        act = a;
    }

    // ---- 2. tiles ----
    const int64_t n_threads = pool.size();
    int64_t tile_rows, tile_m;
    if (m < 4) {
        // Decode: W is streamed once; tiles just need to be fine enough to balance the threads.
        tile_rows = std::clamp<int64_t>(n_out / (8 * n_threads), kMinRowsPerTile, kMaxRowsPerTile);
        tile_m = m;
    } else {
        tile_rows = kTileRowsLargeM;
        tile_m = std::min<int64_t>(m, kTileM);
    }
    const int64_t n_row_tiles = (n_out + tile_rows - 1) / tile_rows;
    const int64_t n_m_tiles = (m + tile_m - 1) / tile_m;
    const quants::VecDotFn dot = kt->vec_dot;
    const quants::VecDotX4Fn dot_x4 = kt->vec_dot_x4;
    const quants::VecDotX4Fn dec_x4 = kt->vec_dot_dec_x4;
    const size_t dec_stride = dec_x4 ? static_cast<size_t>(k / kt->block) * kt->dec_bytes_per_block : 0;

    // Tile t covers W rows of row tile (t % n_row_tiles) and X rows of m tile (t / n_row_tiles), so a
    // thread's contiguous range of tiles walks along W for the same block of X rows.
    pool.parallel_for(n_row_tiles * n_m_tiles, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t r0 = (t % n_row_tiles) * tile_rows;
            const int64_t r1 = std::min(n_out, r0 + tile_rows);
            const int64_t i0 = (t / n_row_tiles) * tile_m;
            const int64_t i1 = std::min(m, i0 + tile_m);
            int64_t i = i0;
            if (dec_x4 != nullptr && i1 - i0 >= kDecodeMinM) {
                std::vector<uint8_t>& dec = dec_scratch();
                if (dec.size() < dec_stride * static_cast<size_t>(r1 - r0)) dec.resize(dec_stride * static_cast<size_t>(r1 - r0));
                for (int64_t r = r0; r < r1; ++r)
                    kt->decode_row(k, wb + static_cast<size_t>(r) * w_stride, dec.data() + static_cast<size_t>(r - r0) * dec_stride);
                for (; i + 4 <= i1; i += 4) {
                    const uint8_t* a = act + static_cast<size_t>(i) * a_stride;
                    float out[4];
                    for (int64_t r = r0; r < r1; ++r) {
                        dec_x4(k, dec.data() + static_cast<size_t>(r - r0) * dec_stride, a, a_stride, out);
                        for (int q = 0; q < 4; ++q) y[(i + q) * n_out + r] = out[q];
                    }
                }
            }
            // Four X rows per W row read where the type has a 4-row kernel (same results as one by one).
            for (; dot_x4 && i + 4 <= i1; i += 4) {
                const uint8_t* a = act + static_cast<size_t>(i) * a_stride;
                float out[4];
                for (int64_t r = r0; r < r1; ++r) {
                    dot_x4(k, wb + static_cast<size_t>(r) * w_stride, a, a_stride, out);
                    for (int q = 0; q < 4; ++q) y[(i + q) * n_out + r] = out[q];
                }
            }
            for (; i < i1; ++i) {
                const uint8_t* a = act + static_cast<size_t>(i) * a_stride;
                float* yr = y + i * n_out;
                for (int64_t r = r0; r < r1; ++r) yr[r] = dot(k, wb + static_cast<size_t>(r) * w_stride, a);
            }
        }
    });
}

}  // namespace moemesh
