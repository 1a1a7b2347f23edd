// make-model --fast-weights: the N(0, σ²) matrices drawn from a cheap generator instead of
// Box-Muller, and Q8_0 / Q4_K rows written as blocks directly instead of through the reference
// quantizer (which for Q4_K costs ~80% of the default path). Per thread ~200x faster for Q4_K
// (1.6 G params/s), ~12x for Q8_0 (0.43 G/s), so a 48-layer Qwen3-30B-A3B-shaped file takes ~1 s of
// CPU on 16 cores and the write dominates; the values are other than the default
// path's (same seed, other bytes) but deterministic in the seed and of the same scale:
//   stream   SplitMix64 per row (key = the row's seed), one 64-bit word after another
//   floats   Irwin-Hall: the sum of a word's four 16-bit halves, centred and scaled to unit variance
//            (a bell on ±3.46σ; for the types other than Q8_0 and Q4_K, then encoded as usual)
//   Q8_0     q = trunc((b0+b1+b2+b3 - 510) / 4) of four random bytes: in [-127, 127], mean 0,
//            std 36.65; d = σ / 36.65 (fp16), so d·q has std σ
//   Q4_K     q = the sum of five random 2-bit fields: in [0, 15], mean 7.5, std 2.5; every sub-block
//            scale 8 and min 60 with dmin = d = σ / 20 (fp16): x = 8d·q - 60d = 8d·(q - 7.5), mean 0, std σ
//   IQ*      (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M: no quantizer in moemesh, so only
//            this way) every block byte random: grid indices, signs and sub-block scales uniform; the
//            fp16 d = σ / rms, rms that of such blocks at d = 1 (from the grid tables), so std ≈ σ
#pragma once
#include <cstdint>

#include "common/ggml_types.h"

namespace moemesh {

constexpr double kFastQ8Std = 36.648743991468790;  // std of trunc((S - 510) / 4), S a sum of 4 uniform bytes

// Types whose rows fast_weights_row_direct writes (the rest: fast_weights_row_floats + the usual encoding).
bool fast_weights_direct(GgmlType t);

// One row of n values of std sigma from the stream `key`, encoded as type t into out
// (ggml_row_bytes(t, n) bytes). t: fast_weights_direct; n a multiple of t's block.
void fast_weights_row_direct(GgmlType t, uint64_t key, float sigma, uint8_t* out, int64_t n);

// One row of n floats ~ N(0, sigma²) (approximately) from the stream `key`.
void fast_weights_row_floats(uint64_t key, float sigma, float* row, int64_t n);

}  // namespace moemesh
