// Fused CTMC reverse step on the CPU (docs/math.md 7, "inverse CDF over blocks").
//
// Per row, over participating columns (the mask column has weight 0), with M = max_v z_v and
// w_v = exp((z_v - M) / T):
//   Pass 1 reads the row once, block by block (kBlock columns, which stay in L1): the block max
//   m_b, the mass S_b = sum_{v in b} exp((z_v - m_b) / T) and
//   A_b = sum_{v in b} exp((z_v - m_b) / T) (z_v - m_b) / T, exp in float32. Rescaling by
//   exp((m_b - M) / T) turns them into the block masses of the CDF, the total Z = sum_v w_v and
//   sum_v w_v (z_v - M) / T.
//   The draw: target = u Z with the row's Philox uniform u; the first block whose cumulative
//   mass exceeds the target, then a scan of that block alone for the first column whose
//   cumulative mass does. A row depends only on (seed, offset, row) and its logits: kBlock is
//   fixed and no sum spans rows, so the thread count changes nothing.
// Outputs from the same sums: p(x1) = w_x1 / Z, p_top1 = 1 / Z, p_top2 = w_top2 / Z, and the
// entropy H = -sum_v (w_v / Z) log(w_v / Z) = log Z - sum_v w_v (z_v - M) / T / Z.
//
// Vectorisation: under GCC's default -ftrapping-math the selects in fast_exp and in the sums
// below count as possibly trapping and keep every column loop scalar (several times slower).
// Floating-point exception flags are never inspected, so dropping the assumption changes no
// value.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "ctmc_step.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fast_exp.h"
#include "philox.h"
#include "prefetch.h"
#include "storage.h"

namespace tcsm {
namespace {

constexpr int64_t kBlock = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One block of columns after pass 1.
struct BlockStats {
  float max;       // m_b over participating columns; -inf when there are none
  double mass;     // S_b, then (after rescaling) exp((m_b - M) / T) S_b
  double shifted;  // A_b
  float scale;     // exp((m_b - M) / T)
};

// The block's logits as float32 with the mask column at -inf (weight exp(-inf) = 0). float32
// logits are used in place unless the block holds the mask column.
template <class Elem>
TCSM_INLINE const float* block_values(const typename Elem::Storage* src, int64_t len,
                                      int64_t mask_in_block, float* buffer) {
  if constexpr (std::is_same_v<Elem, Float32>) {
    if (mask_in_block < 0) return src;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) buffer[i] = Elem::widen(src[i]);
  if (mask_in_block >= 0) buffer[mask_in_block] = kNegInf;
  return buffer;
}

TCSM_INLINE float block_max(const float* values, int64_t len) {
  float best = kNegInf;
#pragma omp simd reduction(max : best)
  for (int64_t i = 0; i < len; ++i) best = values[i] > best ? values[i] : best;
  return best;
}

// (z - m) / T, the difference first: exact for z near m, so that the weights keep their
// precision when |z| / T is large (one fma z / T - m / T with m / T rounded would lose about
// |m| / T * 2^-24, 0.4% at m / T = 6e4); exactly z - m at T = 1. Pass 1, the in-block scan and
// the rescale all use it, so they agree on every weight.
TCSM_INLINE float scaled_exponent(float z, float m, float inv_t) { return (z - m) * inv_t; }

// Weights are fast_exp_nonpositive of exponents raised to kExpFloor, where the weight is
// exactly 0: the floor makes weight * exponent 0 for the mask column and -inf logits (0 * -inf
// would be NaN) without a select. NaN stays NaN (the comparison is false), so it reaches Z.
TCSM_INLINE float floored(float exponent) {
  return exponent < kExpFloor ? kExpFloor : exponent;
}

// S_b and A_b for a block with finite max m_b, summed in float32 (kBlock terms in [0, 1], the
// largest 1); the row totals are double. The in-block scan sums the same terms in double, so
// its boundaries can differ from S_b by rounding: the draw below allows for it.
TCSM_INLINE void block_sums(const float* values, int64_t len, float block_max_value, float inv_t,
                            BlockStats& stats) {
  float mass = 0.f;
  float shifted = 0.f;
#pragma omp simd reduction(+ : mass, shifted)
  for (int64_t i = 0; i < len; ++i) {
    const float exponent = floored(scaled_exponent(values[i], block_max_value, inv_t));
    const float weight = fast_exp_nonpositive(exponent);
    mass += weight;
    shifted += weight * exponent;
  }
  stats.mass = mass;
  stats.shifted = shifted;
}

template <class Elem>
void step_row(const CtmcStepArgs& args, int64_t n, float inv_t, BlockStats* stats, float* buffer) {
  const auto* row = static_cast<const typename Elem::Storage*>(args.logits) + n * args.row_stride;
  const int64_t cols = args.cols;
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  const auto mask_in = [&](int64_t start, int64_t len) {
    return args.mask_id >= start && args.mask_id < start + len ? args.mask_id - start : -1;
  };

  // Pass 1: the only full read of the row.
  float row_max = kNegInf;
  int64_t max_block = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, cols - start);
    prefetch_lines(row + start + 2 * kBlock, row + cols, kBlock * int64_t{sizeof(*row)});
    const float* values = block_values<Elem>(row + start, len, mask_in(start, len), buffer);
    const float m_b = block_max(values, len);
    stats[b] = {m_b, 0.0, 0.0, 0.f};
    if (m_b > kNegInf) block_sums(values, len, m_b, inv_t, stats[b]);
    if (m_b > row_max) {
      row_max = m_b;
      max_block = b;
    }
  }

  // Rescale to the row max: mass_b = exp((m_b - M) / T) S_b, and
  // sum_{v in b} exp((z_v - M) / T) (z_v - M) / T = exp((m_b - M) / T) (A_b + (m_b - M) / T S_b).
  double total = 0.0;
  double shifted_total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    BlockStats& block = stats[b];
    if (!(block.max > kNegInf)) continue;
    const float gap = scaled_exponent(block.max, row_max, inv_t);
    block.scale = fast_exp(gap);
    shifted_total += block.scale * (block.shifted + gap * block.mass);
    block.mass *= block.scale;
    total += block.mass;
  }

  // The draw. u < 1 - 2^-33, so u Z < Z: for finite Z > 0 some block's cumulative mass (summed
  // in the same order as Z) exceeds the target. Blocks and columns of zero mass are never taken.
  const PhiloxWords words = philox_row_words(args.seed, args.offset, static_cast<uint64_t>(n));
  const double target = philox_uniform(words[kDrawWord]) * total;
  double below = 0.0;
  int64_t chosen_block = -1;
  for (int64_t b = 0; b < blocks; ++b) {
    if (stats[b].mass > 0.0 && below + stats[b].mass > target) {
      chosen_block = b;
      break;
    }
    below += stats[b].mass;
  }

  // Only non-finite logits leave no block (Z = 0 or NaN): the first participating column.
  int64_t x1 = args.mask_id == 0 ? 1 : 0;
  double x1_mass = 0.0;
  if (chosen_block >= 0) {
    const BlockStats& block = stats[chosen_block];
    const int64_t start = chosen_block * kBlock;
    const int64_t len = std::min(kBlock, cols - start);
    const float* values = block_values<Elem>(row + start, len, mask_in(start, len), buffer);
    // Rounding can leave the in-block running sum a hair below the target: then the block's last
    // column of positive weight (the block max has weight 1, so there is one).
    double cumulative = below;
    int64_t pick = -1;
    for (int64_t i = 0; i < len; ++i) {
      const double mass = static_cast<double>(block.scale) *
                          fast_exp_nonpositive(scaled_exponent(values[i], block.max, inv_t));
      if (mass > 0.0) {
        pick = i;
        x1_mass = mass;
        cumulative += mass;
        if (cumulative > target) break;
      }
    }
    x1 = start + pick;
  }

  // Second-largest participating logit: the largest other block max, or the largest other
  // column of the block holding the row max (only its first occurrence of the max is left out).
  float second = kNegInf;
  for (int64_t b = 0; b < blocks; ++b) {
    if (b != max_block && stats[b].max > second) second = stats[b].max;
  }
  {
    const int64_t start = max_block * kBlock;
    const int64_t len = std::min(kBlock, cols - start);
    const float* values = block_values<Elem>(row + start, len, mask_in(start, len), buffer);
    int64_t first_max = 0;
    while (first_max < len - 1 && !(values[first_max] == row_max)) ++first_max;
#pragma omp simd reduction(max : second)
    for (int64_t i = 0; i < len; ++i) {
      const float other = i == first_max ? kNegInf : values[i];
      second = other > second ? other : second;
    }
  }

  args.x1[n] = x1;
  args.prob[n] = static_cast<float>(x1_mass / total);
  const float second_weight = fast_exp(scaled_exponent(second, row_max, inv_t));
  args.margin[n] = static_cast<float>((1.0 - second_weight) / total);
  args.entropy[n] = static_cast<float>(std::log(total) - shifted_total / total);

  // Jump (math.md 7 step 2, own Philox word): masked path moves only rows at mask_id, uniform path
  // any row, never a frozen row. An out-of-range x (possible only unchecked) is left as it is.
  const int64_t current = args.x[n];
  const bool valid = current >= 0 && current < cols;
  const bool may_change = valid && (args.mask_id < 0 || current == args.mask_id) &&
                          !(args.frozen != nullptr && args.frozen[n]);
  const bool jumps = philox_uniform(words[kJumpWord]) < args.jump[n];
  args.x_next[n] = may_change && jumps ? x1 : current;
}

template <class Elem>
void step_rows(const CtmcStepArgs& args) {
  const int64_t blocks = (args.cols + kBlock - 1) / kBlock;
  const float inv_t = static_cast<float>(1.0 / args.temperature);
#pragma omp parallel
  {
    std::vector<BlockStats> stats(blocks);
    alignas(64) float buffer[kBlock];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < args.rows; ++n) step_row<Elem>(args, n, inv_t, stats.data(), buffer);
  }
}

}  // namespace

void ctmc_step(const CtmcStepArgs& args) {
  with_storage(args.dtype, [&]<class Elem>() { step_rows<Elem>(args); });
}

}  // namespace tcsm
