// Top-k concrete scores on the CPU (docs/math.md 6): one streaming pass over each row, no sort
// of the row and no (N, V) intermediate.
//
// Order. Each column gets a rank, an unsigned 64-bit integer whose order is the output order:
// the high half is an order-preserving integer image of the logit (the "key"), the low half
// 2^32 - 1 - column, so equal logits rank the lower column first (math.md 6 ties). -0 is folded
// into +0 (they tie, as in torch.sort) and every NaN into one NaN ranked above +inf (torch.sort
// puts NaN first), so ranks are a strict total order even for unchecked inputs.
//
// Running top-k. Candidates collect in a buffer that is cut back to its k best whenever it
// holds 2k (RunningTopK); the k-th best's key is the threshold. The row streams in chunks of
// kChunk columns: one vectorised max of the chunk's keys is compared with the threshold, and
// only a chunk that beats it is scanned column by column. A later column with a key equal to
// the k-th best's ranks below it (higher column), so "key > threshold" is exactly "can still
// enter the top k". Until the first cut every column is a candidate.
//
// LSE. Online over chunks: with running max M and mass S = sum_v exp((u_v - M) / tau), a chunk
// with larger max M' rescales S by exp((M - M') / tau); LSE = M / tau + log S.
//
// Vectorisation: under GCC's default -ftrapping-math the selects below count as possibly
// trapping and keep the column loops scalar; floating-point exception flags are never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "topk_scores.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "fast_exp.h"
#include "storage.h"

namespace tcsm {
namespace {

constexpr int64_t kChunk = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int32_t kCanonicalNanBits = 0x7fc00000;
constexpr int32_t kMagnitudeBits = 0x7fffffff;
constexpr uint32_t kLastColumn = 0xffffffffu;

// Order-preserving integer image of a logit: non-negative floats keep their bits, negative
// ones get their magnitude bits flipped so that larger magnitudes come out smaller. -0 and +0
// share a key; all NaNs share the largest key.
TCSM_INLINE int32_t order_key(float value) {
  const float folded = value + 0.f;  // -0 + 0 = +0
  const int32_t bits = folded != folded ? kCanonicalNanBits : float_to_int_bits(folded);
  return bits ^ ((bits >> 31) & kMagnitudeBits);
}

// The inverse of order_key (on its image): the same flip undoes itself.
TCSM_INLINE float key_value(int32_t key) {
  return bits_to_float(key ^ ((key >> 31) & kMagnitudeBits));
}

TCSM_INLINE uint64_t column_rank(int32_t key, int64_t column) {
  const uint64_t high = static_cast<uint32_t>(key) ^ 0x80000000u;  // signed -> unsigned order
  return (high << 32) | (kLastColumn - static_cast<uint32_t>(column));
}

TCSM_INLINE int32_t rank_key(uint64_t rank) {
  return static_cast<int32_t>(static_cast<uint32_t>(rank >> 32) ^ 0x80000000u);
}

TCSM_INLINE int64_t rank_column(uint64_t rank) {
  return static_cast<int64_t>(kLastColumn - static_cast<uint32_t>(rank));
}

// Candidates for the k best ranks. Columns whose key exceeds `threshold` are appended to a
// buffer; when it holds more than 2k, a selection keeps its k best and the threshold becomes
// the k-th best's key (below every key until then). Each compaction drops at least k entries,
// so a column costs O(1) amortised, and no column that can still enter the top k is dropped.
class RunningTopK {
 public:
  explicit RunningTopK(int64_t k) : k_(k), buffer_(2 * k + kChunk) {}

  void reset() {
    size_ = 0;
    threshold_ = std::numeric_limits<int64_t>::min();
  }

  int64_t threshold() const { return threshold_; }

  // Branch-free append of every column of a chunk that beats the threshold.
  void offer_chunk(const float* values, int64_t len, int64_t first_column) {
    const int64_t threshold = threshold_;
    uint64_t* out = buffer_.data();
    int64_t size = size_;
    for (int64_t i = 0; i < len; ++i) {
      const int32_t key = order_key(values[i]);
      out[size] = column_rank(key, first_column + i);
      size += key > threshold;
    }
    size_ = size;
    if (size_ > 2 * k_) keep_best();
  }

  // The k ranks best first.
  const uint64_t* sorted_best_first() {
    if (size_ > k_) keep_best();
    std::sort(buffer_.begin(), buffer_.begin() + size_, std::greater<uint64_t>());
    return buffer_.data();
  }

 private:
  void keep_best() {
    std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.begin() + size_,
                     std::greater<uint64_t>());
    size_ = k_;
    threshold_ = rank_key(buffer_[k_ - 1]);
  }

  int64_t k_;
  std::vector<uint64_t> buffer_;  // room for 2k entries plus one chunk
  int64_t size_ = 0;
  int64_t threshold_ = std::numeric_limits<int64_t>::min();
};

// The chunk's logits as float32: float32 rows are read in place, others widened into `buffer`.
template <class Elem>
TCSM_INLINE const float* chunk_values(const typename Elem::Storage* src, int64_t len,
                                      float* buffer) {
  if constexpr (std::is_same_v<Elem, Float32>) {
    return src;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) buffer[i] = Elem::widen(src[i]);
    return buffer;
  }
}

template <class Elem>
void topk_row(const TopkScoresArgs& args, int64_t n, RunningTopK& best, float* buffer) {
  const auto* row = static_cast<const typename Elem::Storage*>(args.logits) + n * args.row_stride;
  const int64_t cols = args.cols;
  const float inv_t = static_cast<float>(1.0 / args.temperature);
  best.reset();
  float running_max = kNegInf;
  double mass = 0.0;  // S = sum_v exp((u_v - running_max) / tau) over the columns seen

  for (int64_t start = 0; start < cols; start += kChunk) {
    const int64_t len = std::min(kChunk, cols - start);
    const float* values = chunk_values<Elem>(row + start, len, buffer);
    float chunk_max = kNegInf;
    int32_t chunk_key_max = std::numeric_limits<int32_t>::min();
#pragma omp simd reduction(max : chunk_max, chunk_key_max)
    for (int64_t i = 0; i < len; ++i) {
      chunk_max = values[i] > chunk_max ? values[i] : chunk_max;
      const int32_t key = order_key(values[i]);
      chunk_key_max = key > chunk_key_max ? key : chunk_key_max;
    }

    // Online LSE: rescale S when the max rises; nothing to add while every logit is -inf.
    if (chunk_max > running_max) {
      if (running_max > kNegInf) mass *= std::exp(double(running_max - chunk_max) * inv_t);
      running_max = chunk_max;
    }
    if (running_max > kNegInf) {
      float chunk_mass = 0.f;
#pragma omp simd reduction(+ : chunk_mass)
      for (int64_t i = 0; i < len; ++i) chunk_mass += fast_exp((values[i] - running_max) * inv_t);
      mass += chunk_mass;
    }

    // Running top-k: most chunks stop at this one compare.
    if (chunk_key_max > best.threshold()) best.offer_chunk(values, len, start);
  }

  // Outputs (math.md 6): log-ratios (u_y - u_a) / tau; an unchecked target outside [0, V) has no
  // u_a and gives NaN.
  const int64_t target = args.target[n];
  const float target_value = target >= 0 && target < cols
                                 ? Elem::widen(row[target])
                                 : std::numeric_limits<float>::quiet_NaN();
  const float temperature = static_cast<float>(args.temperature);
  const uint64_t* ranks = best.sorted_best_first();
  int64_t* indices = args.indices + n * args.k;
  float* log_ratios = args.log_ratios + n * args.k;
  for (int64_t j = 0; j < args.k; ++j) {
    indices[j] = rank_column(ranks[j]);
    log_ratios[j] = (key_value(rank_key(ranks[j])) - target_value) / temperature;
  }
  args.lse[n] = static_cast<float>(double(running_max) / args.temperature + std::log(mass));
}

template <class Elem>
void topk_rows(const TopkScoresArgs& args) {
#pragma omp parallel
  {
    RunningTopK best(args.k);
    alignas(64) float buffer[kChunk];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < args.rows; ++n) topk_row<Elem>(args, n, best, buffer);
  }
}

}  // namespace

void topk_scores(const TopkScoresArgs& args) {
  with_storage(args.dtype, [&]<class Elem>() { topk_rows<Elem>(args); });
}

}  // namespace tcsm
