// Y[m, n_out] = X[m, k] · W[n_out, k]ᵀ for every computable weight type, one product (matmul) or
// several in one parallel region (matmul_many: the experts of a MoE layer).
//
// 1. X is converted once per call to the activation type llama.cpp pairs with the weight type
//    (quants::type_kernels), into a per-thread scratch buffer: A[m, a_stride bytes]. In matmul_many,
//    consecutive jobs on the same X with the same activation type (an expert's gate and up) share it.
// 2. The output is cut into tiles of (up to) kTileRows W rows × tile_m X rows; threads take tiles
//    (of all jobs at once in matmul_many). Within a tile the W rows are reused for every X row while
//    they sit in L1/L2, which keeps prompt processing (large m) from re-streaming the weights from
//    memory per token.
// 3. Types with a decoded-row path (the i-quants, whose grid lookups cost more than the dot itself,
//    and Q4_K: nibbles split and scales shuffled once instead of per 4 X rows) decode the tile's
//    W rows once into a per-thread buffer when the tile has kDecodeMinM or more X rows, and run
//    the 4-row dot on that.
// 4. Types with 8-row kernels (Q4_0, IQ4_NL, MXFP4, Q8_0: llama.cpp's repacked arithmetic) take W rows
//    8 at a time, against 4 X rows or 1; on 512-bit CPUs 16 at a time (vec_dot_r16: one lane per
//    W row). With kDecodeMinM or more X rows, these types (and Q4_K, IQ4_XS on 512-bit CPUs)
//    transpose tile_rows W rows (16 or 8: one per int32 lane) into memory once (decode_tile) and
//    dot them 4 X rows at a time.
// 5. A remainder of 2 or 3 X rows also goes through the 4-row kernel, reading padding rows (zeros)
//    or the next rows of A, whose results are dropped.
// Every output element is the same bits whichever path computed it (the 4-row and decoded kernels
// are bit-identical to the one-row dot), so results do not depend on m, tiling or threads.
#include <algorithm>
#include <cstdint>
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

std::vector<uint8_t>& dec_scratch() {
    thread_local std::vector<uint8_t> buf;
    return buf;
}

constexpr int64_t kMinRowsPerTile = 4;
constexpr int64_t kMaxRowsPerTile = 64;
constexpr int64_t kTileRowsLargeM = 16;  // W rows per tile when m is large
constexpr int64_t kTileM = 64;           // X rows per tile when m is large
constexpr int64_t kDecodeMinM = 8;       // X rows in a tile from which W rows are decoded first
constexpr int64_t kPadRows = 3;          // zero rows after each converted A, for the 4-row remainder

// One product, ready for tiles.
struct Prepared {
    const quants::TypeKernels* kt;
    const uint8_t* w;
    size_t w_stride;
    int64_t n_out, k, m;
    const uint8_t* act;
    size_t a_stride;
    bool padded;  // kPadRows readable rows follow act's m rows
    float* y;
    int64_t tile_rows, tile_m, n_row_tiles;
    int64_t first_tile;  // index of this job's first tile among all jobs'
};

struct Bookkeeping {
    std::vector<Prepared> prep;
    std::vector<size_t> act_off;
    std::vector<int64_t> to_convert;
};

Bookkeeping& bookkeeping() {
    thread_local Bookkeeping b;
    return b;
}

void run_tile(const Prepared& p, int64_t t) {
    const quants::TypeKernels* kt = p.kt;
    int64_t r0 = (t % p.n_row_tiles) * p.tile_rows;  // advanced past the rows of transposed tiles
    const int64_t r1 = std::min(p.n_out, r0 + p.tile_rows);
    const int64_t i0 = (t / p.n_row_tiles) * p.tile_m;
    const int64_t i1 = std::min(p.m, i0 + p.tile_m);
    const int64_t k = p.k, n_out = p.n_out;
    const uint8_t* wb = p.w;
    const uint8_t* act = p.act;
    const size_t a_stride = p.a_stride, w_stride = p.w_stride;
    float* y = p.y;
    const quants::VecDotX4Fn dot_x4 = kt->vec_dot_x4;
    // X rows i .. i+3 may be read when i + 4 <= i1, or, with 2 or 3 rows left, when rows up to
    // i + 3 exist in A (further rows of X, or the zero padding).
    const auto x4_ok = [&](int64_t i) { return i + 4 <= i1 || (i + 2 <= i1 && (p.padded || i + 4 <= p.m)); };
    const auto store4 = [&](int64_t i, int64_t r, const float* out) {
        const int n = static_cast<int>(std::min<int64_t>(4, i1 - i));
        for (int q = 0; q < n; ++q) y[(i + q) * n_out + r] = out[q];
    };
    // g W rows from r against the tile's X rows: four(a, out) for 4 X rows from a (out[q · g + row]),
    // where x4_ok allows it, then one(a, out) for each remaining X row.
    const auto x_rows = [&](int64_t r, int64_t g, const auto& four, const auto& one) {
        int64_t i = i0;
        float out[64];
        for (; x4_ok(i); i += 4) {
            four(act + static_cast<size_t>(i) * a_stride, out);
            const int nt = static_cast<int>(std::min<int64_t>(4, i1 - i));
            for (int q = 0; q < nt; ++q) std::memcpy(y + (i + q) * n_out + r, out + g * q, g * sizeof(float));
        }
        for (; i < i1; ++i) {
            one(act + static_cast<size_t>(i) * a_stride, out);
            std::memcpy(y + i * n_out + r, out, g * sizeof(float));
        }
    };
    if (kt->decode_tile != nullptr && i1 - i0 >= kDecodeMinM) {
        // tile_rows W rows transposed once, then 4 X rows at a time (1 for the rest); leftover W
        // rows (fewer than tile_rows) below.
        const int64_t tr = kt->tile_rows;
        const size_t tile_bytes = static_cast<size_t>(k / kt->block) * kt->tile_bytes_per_block;
        std::vector<uint8_t>& dec = dec_scratch();
        if (dec.size() < tile_bytes) dec.resize(tile_bytes);
        for (; r0 + tr <= r1; r0 += tr) {
            kt->decode_tile(k, wb + static_cast<size_t>(r0) * w_stride, w_stride, dec.data());
            x_rows(
                r0, tr, [&](const uint8_t* a, float* out) { kt->vec_dot_tile_x4(k, dec.data(), a, a_stride, out); },
                [&](const uint8_t* a, float* out) { kt->vec_dot_tile(k, dec.data(), a, a_stride, out); });
        }
        if (r0 == r1) return;
    }
    if (kt->vec_dot_r8 != nullptr) {
        // 16 W rows at a time where the type can (512-bit CPUs), then 8, against 4 X rows or 1;
        // leftover W rows one by one (the same bits).
        int64_t r = r0;
        const auto row_groups = [&](int64_t g, quants::VecDotR8Fn one, quants::VecDotR8Fn four) {
            for (; r + g <= r1; r += g) {
                const uint8_t* wg = wb + static_cast<size_t>(r) * w_stride;
                x_rows(
                    r, g, [&](const uint8_t* a, float* out) { four(k, wg, w_stride, a, a_stride, out); },
                    [&](const uint8_t* a, float* out) { one(k, wg, w_stride, a, a_stride, out); });
            }
        };
        // (The 16-row kernels gather the rows' scales with int32 byte offsets.)
        if (kt->vec_dot_r16 != nullptr && 16 * w_stride < INT32_MAX) row_groups(16, kt->vec_dot_r16, kt->vec_dot_r16x4);
        row_groups(8, kt->vec_dot_r8, kt->vec_dot_r8x4);
        for (; r < r1; ++r)
            for (int64_t i = i0; i < i1; ++i)
                y[i * n_out + r] = kt->vec_dot(k, wb + static_cast<size_t>(r) * w_stride, act + static_cast<size_t>(i) * a_stride);
        return;
    }
    int64_t i = i0;
    if (kt->vec_dot_dec_x4 != nullptr && i1 - i0 >= kDecodeMinM) {
        const size_t dec_stride = static_cast<size_t>(k / kt->block) * kt->dec_bytes_per_block;
        std::vector<uint8_t>& dec = dec_scratch();
        if (dec.size() < dec_stride * static_cast<size_t>(r1 - r0)) dec.resize(dec_stride * static_cast<size_t>(r1 - r0));
        for (int64_t r = r0; r < r1; ++r)
            kt->decode_row(k, wb + static_cast<size_t>(r) * w_stride, dec.data() + static_cast<size_t>(r - r0) * dec_stride);
        for (; x4_ok(i); i += 4) {
            const uint8_t* a = act + static_cast<size_t>(i) * a_stride;
            float out[4];
            for (int64_t r = r0; r < r1; ++r) {
                kt->vec_dot_dec_x4(k, dec.data() + static_cast<size_t>(r - r0) * dec_stride, a, a_stride, out);
                store4(i, r, out);
            }
        }
    }
    // Four X rows per W row read where the type has a 4-row kernel.
    for (; dot_x4 && x4_ok(i); i += 4) {
        const uint8_t* a = act + static_cast<size_t>(i) * a_stride;
        float out[4];
        for (int64_t r = r0; r < r1; ++r) {
            dot_x4(k, wb + static_cast<size_t>(r) * w_stride, a, a_stride, out);
            store4(i, r, out);
        }
    }
    for (; i < i1; ++i) {
        const uint8_t* a = act + static_cast<size_t>(i) * a_stride;
        float* yr = y + i * n_out;
        for (int64_t r = r0; r < r1; ++r) yr[r] = kt->vec_dot(k, wb + static_cast<size_t>(r) * w_stride, a);
    }
}

}  // namespace

void matmul_many(ThreadPool& pool, const MatmulJob* jobs, int64_t n_jobs) {
    // Per-call bookkeeping, reused on the calling thread (decode makes ~100 calls per token). Plain
    // references: the lambdas below run on the pool's threads too, where a thread_local named
    // directly would be that thread's (empty) copy.
    Bookkeeping& bk = bookkeeping();
    std::vector<Prepared>& prep = bk.prep;
    std::vector<size_t>& act_off = bk.act_off;        // per job; SIZE_MAX: X used as is
    std::vector<int64_t>& to_convert = bk.to_convert;  // jobs whose X is converted
    prep.clear();
    act_off.assign(static_cast<size_t>(n_jobs), SIZE_MAX);
    to_convert.clear();
    // ---- 1. activations: where each job's A goes in the scratch buffer ----
    size_t act_bytes = 0;
    for (int64_t j = 0; j < n_jobs; ++j) {
        const MatmulJob& jb = jobs[j];
        const quants::TypeKernels* kt = quants::type_kernels(jb.wt);
        MM_CHECK(kt != nullptr);
        MM_CHECK(jb.k > 0 && jb.k % kt->block == 0);
        MM_CHECK(jb.n_out >= 0 && jb.m >= 0);
        Prepared p{};
        p.kt = kt;
        p.w = static_cast<const uint8_t*>(jb.w);
        p.w_stride = ggml_row_bytes(jb.wt, jb.k);
        p.n_out = jb.n_out;
        p.k = jb.k;
        p.m = jb.m;
        p.y = jb.y;
        if (kt->quantize_act != nullptr && jb.m > 0 && jb.n_out > 0) {
            p.a_stride = ggml_row_bytes(kt->act_type, jb.k);
            if (j > 0 && act_off[j - 1] != SIZE_MAX && jobs[j - 1].x == jb.x && jobs[j - 1].k == jb.k &&
                jobs[j - 1].m == jb.m && prep[j - 1].kt->act_type == kt->act_type) {
                act_off[j] = act_off[j - 1];  // the same X, already converted for the previous job
            } else {
                act_off[j] = act_bytes;
                act_bytes += p.a_stride * static_cast<size_t>(jb.m + kPadRows);
                to_convert.push_back(j);
            }
            p.padded = true;
        } else {
            p.a_stride = static_cast<size_t>(jb.k) * sizeof(float);
            p.act = reinterpret_cast<const uint8_t*>(jb.x);
            p.padded = false;
        }
        prep.push_back(p);
    }
    std::vector<uint8_t>& buf = act_scratch();
    if (buf.size() < act_bytes) buf.resize(act_bytes);
    for (int64_t j = 0; j < n_jobs; ++j)
        if (act_off[j] != SIZE_MAX) prep[j].act = buf.data() + act_off[j];
    if (!to_convert.empty()) {
        const auto quantize_rows = [&](int64_t j, int64_t r0, int64_t r1) {
            const Prepared& p = prep[j];
            for (int64_t r = r0; r < r1; ++r)
                p.kt->quantize_act(jobs[j].x + r * p.k, buf.data() + act_off[j] + static_cast<size_t>(r) * p.a_stride, p.k);
        };
        const auto pad = [&](int64_t j) {
            const Prepared& p = prep[j];
            std::memset(buf.data() + act_off[j] + static_cast<size_t>(p.m) * p.a_stride, 0, kPadRows * p.a_stride);
        };
        const auto convert_jobs = [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c) {
                quantize_rows(to_convert[c], 0, prep[to_convert[c]].m);
                pad(to_convert[c]);
            }
        };
        int64_t work = 0;
        for (const int64_t j : to_convert) work += jobs[j].m * jobs[j].k;
        const int64_t n_convert = static_cast<int64_t>(to_convert.size());
        if (work < (1 << 16)) {
            convert_jobs(0, n_convert);
        } else if (n_convert == 1) {  // one big X: threads over its rows
            const int64_t j = to_convert[0];
            pool.parallel_for(prep[j].m, [&](int64_t r0, int64_t r1) { quantize_rows(j, r0, r1); });
            pad(j);
        } else {
            pool.parallel_for(n_convert, convert_jobs);
        }
    }

    // ---- 2. tiles ----
    const int64_t n_threads = pool.size();
    int64_t n_tiles = 0;
    for (Prepared& p : prep) {
        p.first_tile = n_tiles;
        if (p.m == 0 || p.n_out == 0) {
            p.n_row_tiles = 1;
            continue;
        }
        if (p.m < 4) {
            // Decode: W is streamed once; tiles just need to be fine enough to balance the threads.
            p.tile_rows = std::clamp<int64_t>(p.n_out / (8 * n_threads), kMinRowsPerTile, kMaxRowsPerTile);
            if (p.kt->vec_dot_r8 != nullptr) {  // whole groups for the 16- or 8-row kernels
                const int64_t g = p.kt->vec_dot_r16 != nullptr ? 16 : 8;
                p.tile_rows = std::max<int64_t>(g, p.tile_rows / g * g);
            }
            p.tile_m = p.m;
        } else {
            p.tile_rows = kTileRowsLargeM;
            p.tile_m = std::min<int64_t>(p.m, kTileM);
        }
        p.n_row_tiles = (p.n_out + p.tile_rows - 1) / p.tile_rows;
        n_tiles += p.n_row_tiles * ((p.m + p.tile_m - 1) / p.tile_m);
    }
    if (n_tiles == 0) return;
    // Tile t of a job covers W rows of row tile (t % n_row_tiles) and X rows of m tile
    // (t / n_row_tiles), so a thread's contiguous range of tiles walks along W for the same X rows.
    pool.parallel_for(n_tiles, [&](int64_t t0, int64_t t1) {
        // The job holding tile t0: the last one whose first tile is <= t0.
        size_t j = static_cast<size_t>(
            std::upper_bound(prep.begin(), prep.end(), t0, [](int64_t t, const Prepared& p) { return t < p.first_tile; }) -
            prep.begin() - 1);
        for (int64_t t = t0; t < t1; ++t) {
            while (j + 1 < prep.size() && prep[j + 1].first_tile <= t) ++j;
            run_tile(prep[j], t - prep[j].first_tile);
        }
    });
}

void matmul(ThreadPool& pool, GgmlType wt, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m,
            float* y) {
    const MatmulJob job{wt, w, n_out, k, x, m, y};
    matmul_many(pool, &job, 1);
}

}  // namespace moemesh
