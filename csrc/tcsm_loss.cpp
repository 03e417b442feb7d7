// Fused TCSM loss + gradient, CPU (docs/math.md 4-5). OpenMP over rows; per row at most two
// streaming passes over the columns (a third only where the exponent clamp is active, dense
// is/gkl).
// Vectorisation: every column loop (block max, exp sums, gradient stores) compiles to vector
// code (tests/test_vectorised.py checks the compiler's report); the sparse entry loops (gathers)
// stay scalar. Two choices keep it so:
// - the pragma below: under GCC's default -ftrapping-math, fast_exp's selected overflow value
//   (x + inf) counts as possibly trapping, which blocks if-conversion of every loop that stores
//   an exp. FP exception flags are never read here, so dropping the assumption changes no value.
// - each kernel copies its pointers into locals (see Row): a loop that reads them from a struct
//   can be reported as vectorised while its vector body is never entered.
// How these were found: docs/performance_history.md.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "tcsm_loss.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "fast_exp.h"
#include "prefetch.h"
#include "softcap.h"
#include "storage.h"

namespace tcsm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Columns per block of the online max: one horizontal max per block, whose data the exp loop
// then re-reads from L1; block partial sums are float32, row totals double. Passes over the
// logits and a dense teacher take half as many columns, so that a block (and the prefetch of
// the block after next) spans 32 lines as in a pass over the logits alone. The data-target
// passes read only the logits and keep 512. The A/B timings behind both sizes:
// docs/performance_history.md.
constexpr int64_t kBlock = 512;
constexpr int64_t kTeacherBlock = kBlock / 2;
// Elements (rows x columns) below which a call stays on one thread.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

// exp(min(x, limit)) (math.md 4.6). The reference's autograd differentiates it as its own clamped
// value, so the gradients below use the same clamped value in the analytic formulas.
TCSM_INLINE float clamped_exp(float x, float limit) { return fast_exp(limit < x ? limit : x); }


// The participating columns, [0, V) without the mask column (math.md 1: the mask column acts as a
// -inf logit in student and teacher), as one or two contiguous ranges.
struct ColumnRanges {
  int64_t begin[2];
  int64_t end[2];
  int count;
};

ColumnRanges participating_columns(int64_t cols, int64_t mask_id) {
  if (mask_id < 0) return {{0, 0}, {cols, 0}, 1};
  return {{0, mask_id + 1}, {mask_id, cols}, 2};
}

// The row's offset, in elements, past the last 64-byte boundary. The torch allocator aligns
// tensors to 64 bytes, so for the same shape, strides and storage offset this does not depend
// on where a tensor happens to be allocated: results stay reproducible bit for bit.
template <class Storage>
TCSM_INLINE int64_t line_phase(const Storage* row) {
  constexpr int64_t kLine = 64 / sizeof(Storage);
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) / sizeof(Storage)) % kLine;
}

// Calls block(begin, end) on consecutive blocks of at most kColumns participating columns of
// row. A range's first block is shortened so that every later one starts 64-byte aligned, also
// when V is not a multiple of 16: in an unaligned row every vector load straddles two cache
// lines (docs/performance_history.md has the cost). All passes over a row cut it alike.
template <int64_t kColumns, class Storage, class BlockFn>
TCSM_INLINE void for_each_block(const ColumnRanges& ranges, const Storage* row, BlockFn&& block) {
  constexpr int64_t kLine = 64 / sizeof(Storage);
  const int64_t phase = line_phase(row);
  for (int r = 0; r < ranges.count; ++r) {
    for (int64_t begin = ranges.begin[r]; begin < ranges.end[r];) {
      const int64_t end = std::min(begin + kColumns - (begin + phase) % kLine, ranges.end[r]);
      block(begin, end);
      begin = end;
    }
  }
}

// The first 64-byte line of a per-thread buffer (which holds 16 floats more than it is used for).
TCSM_INLINE float* line_aligned(std::vector<float>& buffer) {
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + ((64 - address % 64) % 64) / sizeof(float);
}

// A per-thread float row aligned like the logits row: column k of the returned pointer starts
// a 64-byte line where logits column k does (the vector must hold size + 32 floats).
template <class Storage>
TCSM_INLINE float* aligned_like(std::vector<float>& buffer, const Storage* row) {
  return line_aligned(buffer) + line_phase(row) % 16;
}

// Streaming passes read a block twice (max, then exps, from L1); asking for the lines two
// blocks ahead overlaps the first read's wait on memory with the current block's exps.
template <int64_t kColumns, class Storage>
TCSM_INLINE void prefetch_two_blocks_ahead(const Storage* row, int64_t begin, int64_t cols) {
  prefetch_lines(row + begin + 2 * kColumns, row + cols, kColumns * int64_t{sizeof(Storage)});
}

// Online log-sum-exp: per block, raise the running max to the block's max (one rescale of the
// running sum), then add the block's sum of exp(x - max). One exp per element.
struct OnlineLogSumExp {
  float max = -kInf;
  double sum = 0.0;

  float raise(float block_max) {
    if (block_max > max) {
      sum *= std::exp(static_cast<double>(max) - block_max);
      max = block_max;
    }
    return max;
  }
  // LSE = max + log_sum. The kernels form x - LSE as (x - max) - log_sum: exact-ish for the
  // largest entries, whose p near 1 is where p - q and p_a - 1 cancel.
  float log_sum() const { return static_cast<float>(std::log(sum)); }
};

// The shift a block's exps take: the running max, or 0 while that is still -inf. Then every
// entry so far, the block's too, is -inf (a banned token), whose exp is 0 against a finite
// shift, where -inf - -inf would be NaN. Passes keep the running max itself per block, so the
// rescale exp(max - LSE) of such a block is 0 as well.
TCSM_INLINE float exp_shift(float running_max) { return running_max == -kInf ? 0.f : running_max; }

// What every row shares.
struct Shape {
  int64_t cols;
  int64_t mask_id;
  int64_t topk;
  ColumnRanges ranges;
  float participating;  // V in the formulas: cols, or cols - 1 with a mask column
  float temperature;
  float max_log_ratio;
  float lse_square_scale;
  float label_smoothing;
  const float* class_weight;  // (cols,) or null
  float class_weight_sum;     // over the participating columns (V without class weights)
};

// What a row kernel returns: the row's loss before its weight, and the student's LSE (NaN
// from the kernels whose loss never forms it).
struct RowResult {
  float loss;
  float lse;
};

// z-loss (PaLM; Liger's lse_square_scale s): s LSE^2 per row, whose gradient is 2 s LSE p, so
// it adds to the coefficient of p that every LSE-forming kernel already has. Off (s = 0), it
// adds exact zeros, even where LSE is not finite.
struct ZLoss {
  float loss;   // s LSE^2
  float slope;  // weight 2 s LSE: the coefficient of p in the weighted gradient
};

TCSM_INLINE ZLoss z_loss(const Shape& shape, float lse, float weight) {
  const float s = shape.lse_square_scale;
  if (s == 0.f) return {0.f, 0.f};
  return {s * lse * lse, weight * 2.f * s * lse};
}

// One loss-carrying row with a valid target column a. The kernels copy the pointers into
// locals before their column loops: GCC 12 otherwise reloads them from the struct in the loop
// and the vectorised loop it reports is never entered.
template <class Format>
struct Row {
  using Storage = typename Format::Storage;
  const Storage* logits;
  const Storage* teacher;  // dense teacher logits, or null
  const int64_t* topk_index;
  const float* topk_value;  // log-ratios (score) or log-probabilities (distrib)
  Storage* grad;  // may alias logits: every z_k is read before g_k is written
  int64_t a;
  float weight;
};

// Per-thread buffers.
struct Scratch {
  std::vector<float> block_max;     // running max of each block (softmax passes)
  std::vector<float> column_coef;   // sparse: (cols,), all zero between rows
  std::vector<float> entry_logit;   // sparse: (topk,)
  std::vector<float> in_rest;       // sparse distrib: (cols,), 1 off the row's S (0 on it)
  std::vector<float> block_shift;   // dense distrib: second running max of each block
  std::vector<float> stash_student; // dense distrib: (cols,) exps of pass 1, cache-resident
  std::vector<float> stash_second;  //   between the passes (aligned_like the logits row)
  std::vector<float> out_block;     // dense distrib: (kTeacherBlock,) gradient block to stream out
  std::vector<float> capped;        // softcap: (cols,) capped logits, then their gradient
  std::vector<float> capped_slope;  //   and d capped / d logits (capped_row)
  std::vector<float> wide_teacher;  //   and a bfloat16/float16 dense teacher row in float32
};

// The gradient can skip the cache: a row written to its own buffer is not read again here,
// and non-temporal stores spare the read-for-ownership of every destination line (a quarter
// of the dense kernel's memory traffic). Where the gradient overwrites the logits, their lines
// are already cached and plain stores are better.
#if defined(__AVX__)
constexpr bool kCanStream = true;
#else
constexpr bool kCanStream = false;
#endif

// dst[0, len) = src[0, len) with non-temporal stores (plain stores without AVX); callers
// finish with stream_fence() before the row's gradient is read or patched.
TCSM_INLINE void stream_floats(float* dst, const float* src, int64_t len) {
#if defined(__AVX__)
  int64_t i = 0;
  for (; i < len && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= len; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < len; ++i) dst[i] = src[i];
#else
  std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(len));
#endif
}

TCSM_INLINE void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Writes the mask column's gradient (always 0).
template <class Format>
TCSM_INLINE void zero_mask_column(typename Format::Storage* grad, const Shape& shape) {
  if (shape.mask_id >= 0) grad[shape.mask_id] = Format::narrow(0.f);
}

// Float32 gradient rows hold exp(z - running max) between the two softmax passes, so that the
// second pass rescales instead of exponentiating again (one exp per element instead of two);
// bfloat16/float16 would round that intermediate, so they recompute it.
template <class Format>
constexpr bool kStashExp = std::is_same_v<Format, Float32>;

// Softmax pass 1 over the participating columns: online LSE and, when kShiftedSum,
// sum_y (z_y - z_ref), or with kColumnWeighted sum_y w_y (z_y - z_ref) for the column weights
// w. Reads each z_k before (with kStash) writing grad_k.
template <class Format, bool kShiftedSum, bool kStash = kStashExp<Format>,
          bool kColumnWeighted = false>
OnlineLogSumExp softmax_stats(const typename Format::Storage* logits,
                              typename Format::Storage* grad, const Shape& shape,
                              Scratch& scratch, float z_ref, double& shifted_sum,
                              const float* column_weight = nullptr) {
  OnlineLogSumExp stats;
  float* block_max = scratch.block_max.data();
  int64_t block = 0;
  for_each_block<kBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
    prefetch_two_blocks_ahead<kBlock>(logits, begin, shape.cols);
    float local_max = -kInf;
#pragma omp simd reduction(max : local_max)
    for (int64_t k = begin; k < end; ++k) {
      const float z = Format::widen(logits[k]);
      local_max = z > local_max ? z : local_max;
    }
    const float max = stats.raise(local_max);
    block_max[block++] = max;
    const float shift = exp_shift(max);
    float block_sum = 0.f;
    float block_shifted = 0.f;
#pragma omp simd reduction(+ : block_sum, block_shifted)
    for (int64_t k = begin; k < end; ++k) {
      const float z = Format::widen(logits[k]);
      const float e = fast_exp(z - shift);
      block_sum += e;
      if constexpr (kShiftedSum) {
        block_shifted += kColumnWeighted ? column_weight[k] * (z - z_ref) : z - z_ref;
      }
      if constexpr (kStash) grad[k] = e;
    }
    stats.sum += block_sum;
    shifted_sum += block_shifted;
  });
  return stats;
}

// Softmax pass 2: grad = offset + slope * exp((z - z_max) - z_log_sum) on every participating
// column (p itself for the row's own LSE), plus column_scale * w_k with kColumnWeighted;
// kFromStash rescales pass 1's stashed exps.
template <class Format, bool kFromStash = kStashExp<Format>, bool kColumnWeighted = false>
void write_affine_softmax(const typename Format::Storage* logits, typename Format::Storage* grad,
                          const Shape& shape, const Scratch& scratch, float z_max,
                          float z_log_sum, float offset, float slope,
                          const float* column_weight = nullptr, float column_scale = 0.f) {
  const float* block_max = scratch.block_max.data();
  int64_t block = 0;
  for_each_block<kBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
    if constexpr (kFromStash) {
      // p = exp(z - block max) * exp(block max - LSE)
      const float rescale = std::exp((block_max[block++] - z_max) - z_log_sum);
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) {
        const float base = kColumnWeighted ? offset + column_scale * column_weight[k] : offset;
        grad[k] = base + slope * (rescale * grad[k]);
      }
    } else {
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) {
        const float base = kColumnWeighted ? offset + column_scale * column_weight[k] : offset;
        const float p = fast_exp((Format::widen(logits[k]) - z_max) - z_log_sum);
        grad[k] = Format::narrow(base + slope * p);
      }
    }
  });
}

// How the data target's kl spreads its target over the columns (label_smoothing eps, class
// weights w, w = 1 without them): kNone e_a (times w_a); kUniform (1 - eps) e_a + eps / V;
// kClassWeighted F.cross_entropy(weight=w, label_smoothing=eps), whose target weighs column y
// by (1 - eps) w_a [y = a] + (eps / V) w_y.
enum class Smoothing { kNone, kUniform, kClassWeighted };

// docs/math.md 4.1, data target. Pass 1: LSE and, for is/gkl and smoothing, sum_y (z_y - z_a)
// (shifted by z_a so that sum z - V LSE = sum (z - z_a) - V (LSE - z_a) does not cancel at
// large |z|). Pass 2: grad = offset + slope * p (- (eps/V) w_k) on every column, then column a
// is overwritten (z_a was read first). A class weight w_a scales the divergence; the z-loss
// is not class-weighted (as Liger's).
template <class Format, Divergence kDivergence, Smoothing kSmoothing>
RowResult data_row(const Row<Format>& row, const Shape& shape, Scratch& scratch) {
  static_assert(kSmoothing == Smoothing::kNone || kDivergence == Divergence::kKL);
  constexpr bool kSmoothed = kSmoothing != Smoothing::kNone;
  constexpr bool kColumnWeighted = kSmoothing == Smoothing::kClassWeighted;
  const auto* const logits = row.logits;
  auto* const grad = row.grad;
  const float z_a = Format::widen(logits[row.a]);
  double shifted_sum = 0.0;  // sum_y (z_y - z_a), class-weighted for kClassWeighted
  const OnlineLogSumExp student_stats =
      softmax_stats<Format, kDivergence != Divergence::kKL || kSmoothed, kStashExp<Format>,
                    kColumnWeighted>(logits, grad, shape, scratch, z_a, shifted_sum,
                                     shape.class_weight);
  const float log_inv_pa = (student_stats.max - z_a) + student_stats.log_sum();  // -log p_a
  const float pa_minus_one = std::expm1(-log_inv_pa);  // p_a - 1 without cancellation
  const float lse = student_stats.max + student_stats.log_sum();
  const float v = shape.participating;
  const float class_a = shape.class_weight == nullptr ? 1.f : shape.class_weight[row.a];
  const float w = row.weight * class_a;  // the divergence's weight
  const float scale = w / v;
  // kl: loss LSE - z_a, grad p - e_a
  float offset = 0.f, slope = w, grad_a = w * pa_minus_one, loss = class_a * log_inv_pa;
  float column_scale = 0.f;
  if constexpr (kSmoothed) {
    // With c_a = (1 - eps) w_a, e = eps / V and W = sum_y w_y (V unweighted):
    // loss c_a (LSE - z_a) + e (W (LSE - z_a) - sum_y w_y (z_y - z_a)),
    // grad (c_a + e W) p - c_a e_a - e w (uniform: the constant e).
    const float c_a = (1.f - shape.label_smoothing) * class_a;
    const float e = shape.label_smoothing / v;
    const float total_weight = kColumnWeighted ? shape.class_weight_sum : v;
    slope = row.weight * (c_a + e * total_weight);
    grad_a = row.weight * (c_a * pa_minus_one + e * total_weight * std::exp(-log_inv_pa) -
                           e * class_a);
    (kColumnWeighted ? column_scale : offset) = -row.weight * e;
    loss = c_a * log_inv_pa +
           e * (total_weight * log_inv_pa - static_cast<float>(shifted_sum));
  }
  if constexpr (kDivergence != Divergence::kKL) {
    const float inv_pa = clamped_exp(log_inv_pa, shape.max_log_ratio);  // 1/p_a, clamped
    offset = scale;
    if constexpr (kDivergence == Divergence::kIS) {
      // is: loss (1/p_a + sum z - V LSE) / V; grad (1/p_a (p - e_a) + 1 - V p) / V,
      // i.e. (1 + p (1/p_a - V)) / V off a and (1 + 1/p_a (p_a - 1) - V p_a) / V at a.
      slope = scale * (inv_pa - v);
      grad_a = scale * (1.f + inv_pa * pa_minus_one - v * std::exp(-log_inv_pa));
      loss = class_a * (inv_pa + static_cast<float>(shifted_sum) - v * log_inv_pa) / v;
    } else {
      // gkl: loss mean(z) - z_a + 1/(V p_a); grad 1/V + p / (V p_a) - e_a (1 + 1/(V p_a)),
      // at a: (1 - V + (p_a - 1) / p_a) / V.
      slope = scale * inv_pa;
      grad_a = scale * (1.f - v + inv_pa * pa_minus_one);
      loss = class_a * (inv_pa + static_cast<float>(shifted_sum)) / v;
    }
  }
  const ZLoss z = z_loss(shape, lse, row.weight);
  write_affine_softmax<Format, kStashExp<Format>, kColumnWeighted>(
      logits, grad, shape, scratch, student_stats.max, student_stats.log_sum(), offset,
      slope + z.slope, shape.class_weight, column_scale);
  grad[row.a] = Format::narrow(grad_a + z.slope * std::exp(-log_inv_pa));
  zero_mask_column<Format>(grad, shape);
  return {loss + z.loss, lse};
}

// u / tau for a dense teacher logit, rounded as the division rounds it; at tau = 1 (kUnitTau)
// the logit itself, without the division's three vector ops per use.
template <class Format, bool kUnitTau>
TCSM_INLINE float teacher_over_tau(typename Format::Storage value, float tau, float inv_tau) {
  if constexpr (kUnitTau) {
    return Format::widen(value);
  } else {
    return divide(Format::widen(value), tau, inv_tau);
  }
}

// exp(u - s_u) = exp(z - s_z) exp(u - z - s_x) exp(s_z - s_u + s_x) with the block's running
// maxima s (s_z + s_x >= s_u, so the last factor is >= 1; s_z - s_u is formed first, so the
// exponent is exactly 0 when one column holds all three maxima). Pass 1 takes the teacher's term as
// that product, one exp fewer, when the last factor is at most e^40: then the two exps (each
// <= 1) cannot flush to 0 where the teacher's term is above e^-47, a relative e^-47 of the
// row's largest term, far below float32 rounding of the sum.
constexpr float kMaxJointShift = 40.f;

// How pass 1 of a dense distrib row forms its exps: kl needs exp(z - s_z) and exp(u - s_u);
// is/gkl exp(z - s_z) and exp(u - z - s_x), and the teacher's term as the product above
// (kShared) or as its own exp (kAll).
enum class DistribSums { kStudentTeacher, kShared, kAll };

struct DistribBlockSums {
  float z = 0.f, u = 0.f, x = 0.f;
  float teacher_weighted = 0.f;  // kl: sum_y exp(u_y - s_u) (d_y - c), 0 where the weight is 0
  float pivoted = 0.f;           // is: sum_y (d_y - c)
};

// Pass 1 sums of one block. Keeps exp(z - s_z) in stash_student and the second exp (teacher's
// for kl, ratio's for is/gkl) in stash_second for pass 2, which then needs no exp. Also sums
// d = u - z against the row's pivot c (see DistribDivergenceSums), so that pass 2 reads
// neither z nor u. kShared sums the teacher's terms without their block factor
// exp(s_z - s_u + s_x) and applies it to the block's sums.
template <class Format, Divergence kDivergence, bool kUnitTau, DistribSums kSums>
TCSM_INLINE DistribBlockSums distrib_block_sums(const typename Format::Storage* logits,
                                                const typename Format::Storage* teacher,
                                                float* stash_student, float* stash_second,
                                                int64_t begin, int64_t end, float tau,
                                                float inv_tau, float shift_z, float shift_u,
                                                float shift_x, float pivot) {
  constexpr bool kHasKL = kDivergence != Divergence::kIS;
  constexpr bool kHasIS = kDivergence != Divergence::kKL;
  constexpr float kLowest = std::numeric_limits<float>::lowest();
  float sum_z = 0.f, sum_u = 0.f, sum_x = 0.f, teacher_weighted = 0.f, pivoted = 0.f;
#pragma omp simd reduction(+ : sum_z, sum_u, sum_x, teacher_weighted, pivoted)
  for (int64_t k = begin; k < end; ++k) {
    const float z = Format::widen(logits[k]);
    const float u = teacher_over_tau<Format, kUnitTau>(teacher[k], tau, inv_tau);
    const float e_z = fast_exp_nonpositive(z - shift_z);
    sum_z += e_z;
    stash_student[k] = e_z;
    float e_u;
    if constexpr (kSums == DistribSums::kStudentTeacher) {
      e_u = fast_exp_nonpositive(u - shift_u);
      stash_second[k] = e_u;
    } else {
      const float e_x = fast_exp_nonpositive((u - z) - shift_x);
      sum_x += e_x;
      stash_second[k] = e_x;
      e_u = kSums == DistribSums::kShared ? e_z * e_x : fast_exp_nonpositive(u - shift_u);
    }
    sum_u += e_u;
    const float d = (u - z) - pivot;
    // 0 log 0 = 0: where the teacher's weight is 0 (u = -inf, so d = -inf, or NaN where z is
    // -inf too) its KL term is 0 * lowest (the comparison is false for NaN).
    if constexpr (kHasKL) teacher_weighted += e_u * (d > kLowest ? d : kLowest);
    if constexpr (kHasIS) pivoted += d;
  }
  if constexpr (kSums == DistribSums::kShared) {
    const float joint = fast_exp((shift_z - shift_u) + shift_x);
    sum_u *= joint;
    teacher_weighted *= joint;
  }
  return {sum_z, sum_u, sum_x, teacher_weighted, pivoted};
}

// The KL and IS sums of a dense distrib row, gathered in pass 1. With d_y = u_y/tau - z_y and
// r_y = d_y - gap: KL = sum_y q_y r_y = E_q[d - c] + (c - gap) and sum_y r_y =
// sum_y (d_y - c) + V (c - gap), for any pivot c. The pivot is the running max of d (0 while
// it is not finite), so d - c stays on the scale of r even when u and z share a large offset,
// and c - gap lies in [0, max_log_ratio] below the clamp. When the pivot or the teacher's
// running max rises, the sums gathered so far are rebased exactly.
struct DistribDivergenceSums {
  float pivot = 0.f;
  double teacher_weighted = 0.0;  // sum_y exp(u_y - s_u) (d_y - c), at the teacher's scale s_u
  double pivoted = 0.0;           // sum_y (d_y - c)
  double columns = 0.0;

  // Before a block: new pivot from the running max of d; the teacher's scale moved from
  // old_shift_u (where its sum was old_teacher_sum) to shift_u.
  void rebase(float max_x, float old_shift_u, double old_teacher_sum, float shift_u) {
    const float next = std::isfinite(max_x) ? max_x : 0.f;
    const double lowered = static_cast<double>(pivot) - next;
    if (old_teacher_sum > 0.0) {
      teacher_weighted = (teacher_weighted + lowered * old_teacher_sum) *
                         std::exp(static_cast<double>(old_shift_u) - shift_u);
    }
    pivoted += lowered * columns;
    pivot = next;
  }
  void add(const DistribBlockSums& sums, int64_t block_columns) {
    teacher_weighted += sums.teacher_weighted;
    pivoted += sums.pivoted;
    columns += static_cast<double>(block_columns);
  }
};

// x - gap with gap = LSE_u - LSE_z kept as its two parts, (u_max - z_max) + (u_log_sum -
// z_log_sum): when u and z share a large offset, x - (u_max - z_max) is exact for x near it,
// and nothing is lost to rounding gap itself (one float32 ulp of the offset, above the KL).
TCSM_INLINE float minus_gap(float x, float max_gap, float log_sum_gap) {
  return (x - max_gap) - log_sum_gap;
}

// Row constants of the dense distrib gradient pass (no pointers: see Row).
struct DistribGradient {
  float tau, inv_tau, limit;
  float z_max, z_log_sum, u_max, u_log_sum, max_gap, log_sum_gap;
  float inv_v, ratio_excess, weight;
  float lse_slope;  // the z-loss's coefficient of p (ZLoss::slope)
};

// Pass 2 of dense_distrib_row: the gradient, from pass 1's stashed exps e (stash_student) and
// f (stash_second) rescaled per block: p = a e with a = exp(s_z - LSE_z); kl: q = b f with
// b = exp(s_u - LSE_u); is/gkl with kStashedRatio (no r_y above the clamp): q/p = b f with
// b = exp(s_x - gap) and, for gkl, q = p (q/p). With w the row weight:
//   w grad = w (p - q) + (w/V)(1 - q/p + p (S - V))        (kl: first term; is: second)
//          = (alpha e + gamma) - f (beta e + delta)
// alpha = a w (1 + (S - V)/V) (kl: a w), beta = a b w (gkl only), gamma = w/V, delta = b w/V
// (kl: b w), so a column takes three fmas on two cache-resident stash reads; the z-loss adds
// its slope of p to alpha (times a). Above the clamp,
// q/p and q are exps of their own, from z and u. With kStream (float32 gradient in its own
// buffer) each block goes through out_block and is streamed to memory.
template <class Format, Divergence kDivergence, bool kUnitTau, bool kStashedRatio, bool kStream>
void dense_distrib_gradient(const typename Format::Storage* logits,
                            const typename Format::Storage* teacher,
                            typename Format::Storage* grad, const Shape& shape,
                            Scratch& scratch, const DistribGradient& coef) {
  constexpr bool kHasKL = kDivergence != Divergence::kIS;
  constexpr bool kHasIS = kDivergence != Divergence::kKL;
  // Locals, not struct fields, in the loop: grad's stores could alias the struct.
  const float tau = coef.tau, inv_tau = coef.inv_tau, limit = coef.limit;
  const float z_max = coef.z_max, z_log_sum = coef.z_log_sum;
  const float u_max = coef.u_max, u_log_sum = coef.u_log_sum;
  const float max_gap = coef.max_gap, log_sum_gap = coef.log_sum_gap;
  const float inv_v = coef.inv_v, ratio_excess = coef.ratio_excess, w = coef.weight;
  const float w_over_v = w * inv_v;
  // Above the clamp the gradient is w (... + p (S - V) / V): the z-loss's slope of p joins it
  // as lse_slope V / w in S - V.
  const float excess_with_z = ratio_excess + coef.lse_slope / w_over_v;
  const float* const stash_student = aligned_like(scratch.stash_student, logits);
  const float* const stash_second = aligned_like(scratch.stash_second, logits);
  float* const out_block = line_aligned(scratch.out_block);
  int64_t block = 0;
  for_each_block<kTeacherBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
    typename Format::Storage* const out = [&] {
      if constexpr (kStream) {
        return out_block;
      } else {
        return grad + begin;
      }
    }();
    const float rescale_p = std::exp((scratch.block_max[block] - z_max) - z_log_sum);
    const float second_shift = scratch.block_shift[block++];
    const float rescale_second = kHasIS ? std::exp(minus_gap(second_shift, max_gap, log_sum_gap))
                                        : std::exp((second_shift - u_max) - u_log_sum);
    if constexpr (kStashedRatio || !kHasIS) {
      const float kl_part = kHasKL ? w : 0.f;
      const float is_part = kHasIS ? w_over_v : 0.f;
      const float alpha = rescale_p * (kl_part + is_part * ratio_excess + coef.lse_slope);
      const float beta = kHasKL && kHasIS ? rescale_p * rescale_second * w : 0.f;
      const float gamma = is_part;
      const float delta = rescale_second * (kHasIS ? w_over_v : w);
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) {
        const float e = stash_student[k];
        const float f = stash_second[k];
        const float second_weight = kHasKL && kHasIS ? std::fma(e, beta, delta) : delta;
        out[k - begin] = Format::narrow(std::fma(-f, second_weight, std::fma(e, alpha, gamma)));
      }
    } else {
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) {
        const float p = rescale_p * stash_student[k];
        const float z = Format::widen(logits[k]);
        const float u = teacher_over_tau<Format, kUnitTau>(teacher[k], tau, inv_tau);
        const float ratio_k = clamped_exp(minus_gap(u - z, max_gap, log_sum_gap), limit);
        // is: grad (1/V)(1 - q/p + p (S - V)); gkl adds kl's p - q
        float grad_k = inv_v * ((1.f - ratio_k) + p * excess_with_z);
        if constexpr (kHasKL) grad_k += p - fast_exp_nonpositive((u - u_max) - u_log_sum);
        out[k - begin] = Format::narrow(w * grad_k);
      }
    }
    if constexpr (kStream) stream_floats(grad + begin, out_block, end - begin);
  });
  if constexpr (kStream) stream_fence();
}

// docs/math.md 4.2, dense teacher, distrib objective; q = softmax(u / tau), r = log(q / p).
// Pass 1: LSE of z and of u/tau, the KL and IS sums (DistribDivergenceSums) and, for is/gkl,
// the online LSE of u/tau - z, which gives sum_y q_y / p_y = exp(LSE(u/tau - z) - (LSE_u -
// LSE_z)) when no r_y reaches the clamp (otherwise one extra pass sums the clamped exp(r_y)).
// Pass 2: the gradient. Two exps per column in all (pass 1), unless some r_y reaches the
// clamp. The stashes are per-thread rows that stay in cache, so a gradient written over the
// logits equals one written to its own buffer, bit for bit.
template <class Format, Divergence kDivergence, bool kUnitTau>
RowResult dense_distrib_row(const Row<Format>& row, const Shape& shape, Scratch& scratch) {
  const auto* const logits = row.logits;
  const auto* const teacher = row.teacher;
  auto* const grad = row.grad;
  constexpr bool kHasKL = kDivergence != Divergence::kIS;
  constexpr bool kHasIS = kDivergence != Divergence::kKL;
  const float tau = shape.temperature, inv_tau = 1.f / tau;
  const float limit = shape.max_log_ratio;
  float* const stash_student = aligned_like(scratch.stash_student, logits);
  float* const stash_second = aligned_like(scratch.stash_second, logits);
  int64_t block = 0;
  OnlineLogSumExp student_stats, teacher_stats, ratio_stats;
  DistribDivergenceSums divergence_sums;
  for_each_block<kTeacherBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
    prefetch_two_blocks_ahead<kTeacherBlock>(logits, begin, shape.cols);
    prefetch_two_blocks_ahead<kTeacherBlock>(teacher, begin, shape.cols);
    float max_z = -kInf, max_u = -kInf, max_x = -kInf;
#pragma omp simd reduction(max : max_z, max_u, max_x)
    for (int64_t k = begin; k < end; ++k) {
      const float z = Format::widen(logits[k]);
      const float u = teacher_over_tau<Format, kUnitTau>(teacher[k], tau, inv_tau);
      max_z = z > max_z ? z : max_z;
      max_u = u > max_u ? u : max_u;
      max_x = u - z > max_x ? u - z : max_x;
    }
    const float shift_z = student_stats.raise(max_z);
    const float old_shift_u = teacher_stats.max;
    const double old_teacher_sum = teacher_stats.sum;
    const float shift_u = teacher_stats.raise(max_u);
    const float shift_x = ratio_stats.raise(max_x);
    divergence_sums.rebase(shift_x, old_shift_u, old_teacher_sum, shift_u);
    scratch.block_max[block] = shift_z;
    const float exp_shift_z = exp_shift(shift_z), exp_shift_u = exp_shift(shift_u);
    const float exp_shift_x = exp_shift(shift_x);
    scratch.block_shift[block++] = kHasIS ? shift_x : shift_u;
    DistribBlockSums sums;
    if constexpr (!kHasIS) {
      sums = distrib_block_sums<Format, kDivergence, kUnitTau, DistribSums::kStudentTeacher>(
          logits, teacher, stash_student, stash_second, begin, end, tau, inv_tau, exp_shift_z,
          exp_shift_u, exp_shift_x, divergence_sums.pivot);
    } else if ((shift_z - shift_u) + shift_x <= kMaxJointShift) {  // false for NaN
      sums = distrib_block_sums<Format, kDivergence, kUnitTau, DistribSums::kShared>(
          logits, teacher, stash_student, stash_second, begin, end, tau, inv_tau, exp_shift_z,
          exp_shift_u, exp_shift_x, divergence_sums.pivot);
    } else {
      sums = distrib_block_sums<Format, kDivergence, kUnitTau, DistribSums::kAll>(
          logits, teacher, stash_student, stash_second, begin, end, tau, inv_tau, exp_shift_z,
          exp_shift_u, exp_shift_x, divergence_sums.pivot);
    }
    student_stats.sum += sums.z;
    teacher_stats.sum += sums.u;
    ratio_stats.sum += sums.x;
    divergence_sums.add(sums, end - begin);
  });
  const float z_max = student_stats.max, z_log_sum = student_stats.log_sum();
  const float u_max = teacher_stats.max, u_log_sum = teacher_stats.log_sum();
  // r = (u/tau - z) - gap, gap = LSE_u - LSE_z in two parts (minus_gap)
  const float max_gap = u_max - z_max, log_sum_gap = u_log_sum - z_log_sum;
  const float v = shape.participating;
  // x - gap as minus_gap, but with the log sums' difference in double (no float32 rounding of
  // either log sum): for the loss's pivot term and for S
  const double log_sum_gap_exact = std::log(teacher_stats.sum) - std::log(student_stats.sum);
  const auto minus_gap_exact = [&](float x) {
    return static_cast<double>(x - max_gap) - log_sum_gap_exact;
  };
  // excess = S - V = sum_y (exp(r_y) - 1), clamped exponents (the IS gradient's p*S - V p)
  double excess = 0.0;
  const float max_ratio_exponent = minus_gap(ratio_stats.max, max_gap, log_sum_gap);  // max r
  const bool below_clamp = max_ratio_exponent <= limit;
  if constexpr (kHasIS) {
    if (below_clamp) {
      const double log_mean_ratio =
          minus_gap_exact(ratio_stats.max) + (std::log(ratio_stats.sum) - std::log(v));  // log(S/V)
      excess = v * std::expm1(log_mean_ratio);  // V (S/V - 1), no cancellation
    } else {
      for_each_block<kTeacherBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
        float block_excess = 0.f;
#pragma omp simd reduction(+ : block_excess)
        for (int64_t k = begin; k < end; ++k) {
          const float z = Format::widen(logits[k]);
          const float u = teacher_over_tau<Format, kUnitTau>(teacher[k], tau, inv_tau);
          block_excess += clamped_exp(minus_gap(u - z, max_gap, log_sum_gap), limit) - 1.f;
        }
        excess += block_excess;
      });
    }
  }
  const float ratio_excess = static_cast<float>(excess);
  const float lse = z_max + z_log_sum;
  const ZLoss z = z_loss(shape, lse, row.weight);
  const DistribGradient coef{tau,       inv_tau, limit,       z_max,   z_log_sum,
                             u_max,     u_log_sum, max_gap,   log_sum_gap, 1.f / v,
                             ratio_excess, row.weight, z.slope};
  // With no r_y above the clamp, q/p = exp(r) comes from the stash and gkl's q = p exp(r).
  // Where p flushes to 0 (below FLT_MIN), q = p exp(r) < e^limit FLT_MIN flushes with it.
  constexpr bool kStreamable = kCanStream && std::is_same_v<Format, Float32>;
  const bool stream =
      kStreamable && static_cast<const void*>(grad) != static_cast<const void*>(logits);
  if (below_clamp && stream) {
    dense_distrib_gradient<Format, kDivergence, kUnitTau, true, kStreamable>(
        logits, teacher, grad, shape, scratch, coef);
  } else if (below_clamp) {
    dense_distrib_gradient<Format, kDivergence, kUnitTau, true, false>(logits, teacher, grad,
                                                                       shape, scratch, coef);
  } else {
    dense_distrib_gradient<Format, kDivergence, kUnitTau, false, false>(logits, teacher, grad,
                                                                        shape, scratch, coef);
  }
  zero_mask_column<Format>(grad, shape);
  // KL = E_q[d - c] + (c - gap); IS = (1/V) sum_y [exp(r_y) - r_y - 1]
  //    = (1/V) [(S - V) - sum_y (d_y - c)] - (c - gap)
  const double pivot_gap = minus_gap_exact(divergence_sums.pivot);
  double loss = 0.0;
  if constexpr (kHasKL) {
    loss += divergence_sums.teacher_weighted / teacher_stats.sum + pivot_gap;
  }
  if constexpr (kHasIS) {
    loss += (excess - divergence_sums.pivoted) / v - pivot_gap;
  }
  return {static_cast<float>(loss) + z.loss, lse};
}

// docs/math.md 4.3, dense teacher, score objective, gkl: (1/V) GKL(q/q_a, p/p_a). With clamped
// 1/q_a = exp(LSE_u - u_a/tau) and 1/p_a = exp(LSE_z - z_a):
// loss (1/V)[(KL(q||p) - log q_a + log p_a)/q_a - 1/q_a + 1/p_a]; grad (1/V)[p/p_a - q/q_a]
// off a and (1/V)[(1 - q_a)/q_a - (1 - p_a)/p_a] at a. Pass 1: both LSEs; pass 2: grad, KL.
template <class Format>
RowResult dense_score_gkl_row(const Row<Format>& row, const Shape& shape, Scratch&) {
  const auto* const logits = row.logits;
  const auto* const teacher = row.teacher;
  auto* const grad = row.grad;
  const float tau = shape.temperature, inv_tau = 1.f / tau;
  const float z_a = Format::widen(logits[row.a]);
  const float u_a = divide(Format::widen(teacher[row.a]), tau, inv_tau);
  OnlineLogSumExp student_stats, teacher_stats;
  for_each_block<kTeacherBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
    prefetch_two_blocks_ahead<kTeacherBlock>(logits, begin, shape.cols);
    prefetch_two_blocks_ahead<kTeacherBlock>(teacher, begin, shape.cols);
    float max_z = -kInf, max_u = -kInf;
#pragma omp simd reduction(max : max_z, max_u)
    for (int64_t k = begin; k < end; ++k) {
      const float z = Format::widen(logits[k]);
      const float u = divide(Format::widen(teacher[k]), tau, inv_tau);
      max_z = z > max_z ? z : max_z;
      max_u = u > max_u ? u : max_u;
    }
    const float shift_z = exp_shift(student_stats.raise(max_z));
    const float shift_u = exp_shift(teacher_stats.raise(max_u));
    float sum_z = 0.f, sum_u = 0.f;
#pragma omp simd reduction(+ : sum_z, sum_u)
    for (int64_t k = begin; k < end; ++k) {
      sum_z += fast_exp(Format::widen(logits[k]) - shift_z);
      sum_u += fast_exp(divide(Format::widen(teacher[k]), tau, inv_tau) - shift_u);
    }
    student_stats.sum += sum_z;
    teacher_stats.sum += sum_u;
  });
  const float z_max = student_stats.max, z_log_sum = student_stats.log_sum();
  const float u_max = teacher_stats.max, u_log_sum = teacher_stats.log_sum();
  const float max_gap = u_max - z_max, log_sum_gap = u_log_sum - z_log_sum;
  const float log_inv_pa = (z_max - z_a) + z_log_sum;
  const float log_inv_qa = (u_max - u_a) + u_log_sum;
  const float inv_pa = clamped_exp(log_inv_pa, shape.max_log_ratio);
  const float inv_qa = clamped_exp(log_inv_qa, shape.max_log_ratio);
  const float v = shape.participating;
  const float scale = row.weight / v;
  const ZLoss z = z_loss(shape, z_max + z_log_sum, row.weight);
  const float p_coef = scale * inv_pa + z.slope, q_coef = scale * inv_qa;
  double kl_sum = 0.0;
  for_each_block<kTeacherBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
    float block_kl = 0.f;
#pragma omp simd reduction(+ : block_kl)
    for (int64_t k = begin; k < end; ++k) {
      const float z = Format::widen(logits[k]);
      const float u = divide(Format::widen(teacher[k]), tau, inv_tau);
      const float p = fast_exp((z - z_max) - z_log_sum);
      const float q = fast_exp((u - u_max) - u_log_sum);
      const float r = minus_gap(u - z, max_gap, log_sum_gap);
      block_kl += q > 0.f ? q * r : 0.f;  // 0 log 0 = 0 (u = -inf)
      grad[k] = Format::narrow(p * p_coef - q * q_coef);
    }
    kl_sum += block_kl;
  });
  const float one_minus_qa = -std::expm1(-log_inv_qa);
  const float one_minus_pa = -std::expm1(-log_inv_pa);
  grad[row.a] = Format::narrow(scale * (one_minus_qa * inv_qa - one_minus_pa * inv_pa) +
                               z.slope * std::exp(-log_inv_pa));
  zero_mask_column<Format>(grad, shape);
  const float kl = static_cast<float>(kl_sum);
  return {((kl + log_inv_qa - log_inv_pa) * inv_qa - inv_qa + inv_pa) / v + z.loss,
          z_max + z_log_sum};
}

// docs/math.md 4.3, dense teacher, score objective, is: (1/V) IS(q/q_a, p/p_a) with
// r_y = (u_y - u_a)/tau - (z_y - z_a): loss (1/V) sum_y [exp(r_y) - r_y - 1];
// grad_k = (1/V)[1 - exp(r_k) + [k = a] sum_y (exp(r_y) - 1)]. No row statistic is needed
// off a, so one pass writes the gradient and column a is overwritten after it.
template <class Format>
RowResult dense_score_is_row(const Row<Format>& row, const Shape& shape, Scratch&) {
  const auto* const logits = row.logits;
  const auto* const teacher = row.teacher;
  auto* const grad = row.grad;
  const float tau = shape.temperature, inv_tau = 1.f / tau;
  const float limit = shape.max_log_ratio;
  const float z_a = Format::widen(logits[row.a]);
  const float u_a = divide(Format::widen(teacher[row.a]), tau, inv_tau);
  const float v = shape.participating;
  const float scale = row.weight / v;
  double loss_sum = 0.0, excess_sum = 0.0;
  for_each_block<kTeacherBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
    float block_loss = 0.f, block_excess = 0.f;
#pragma omp simd reduction(+ : block_loss, block_excess)
    for (int64_t k = begin; k < end; ++k) {
      const float u = divide(Format::widen(teacher[k]), tau, inv_tau);
      const float r = (u - u_a) - (Format::widen(logits[k]) - z_a);
      const float ratio = clamped_exp(r, limit);
      block_loss += (ratio - r) - 1.f;
      block_excess += ratio - 1.f;
      grad[k] = Format::narrow(scale * (1.f - ratio));
    }
    loss_sum += block_loss;
    excess_sum += block_excess;
  });
  grad[row.a] = Format::narrow(scale * static_cast<float>(excess_sum));
  zero_mask_column<Format>(grad, shape);
  return {static_cast<float>(loss_sum) / v, kNaN};
}

// math.md 4.4, sparse (top-K) teacher, score objective. B_y = exp(z_y - z_a), A_y = exp(rho_y),
// both clamped; entries equal to a or to the mask column are skipped, duplicates each count.
// Every counted entry y contributes coef_y with grad_y -= coef_y / V and grad_a += coef_y / V:
//   is:          loss (1/V) sum_S [A/B - log(A/B) - 1],           coef = A/B - 1
//   gkl, ignore: loss (1/V) sum_S [A (rho - log B) - A + B],      coef = A - B
//   gkl, zero:   loss (1/V)[sum_S (A (rho - log B) - A) + 1/p_a - 1], coef = A, plus the
//                dense term of sum_{y != a} B_y = 1/p_a - 1: grad (1/V) p / p_a on every
//                column, -(1/V)(1 - p_a)/p_a at a.
// Coefficients are summed per column in float32 (column_coef) so that B_k - A_k and duplicate
// entries are formed before rounding; tails other than zero never pass over the columns except
// to zero the gradient row (and never form the LSE: is and the ignore tail are LSE-free).
template <class Format, Divergence kDivergence, Tail kTail>
RowResult sparse_row(const Row<Format>& row, const Shape& shape, Scratch& scratch) {
  const auto* const logits = row.logits;
  auto* const grad = row.grad;
  constexpr bool kDenseTail = kDivergence == Divergence::kGKL && kTail == Tail::kZero;
  const float limit = shape.max_log_ratio;
  const float z_a = Format::widen(logits[row.a]);
  // The entries first: their z_y are read before any gradient column is written.
  float* column_coef = scratch.column_coef.data();
  float* entry_logit = scratch.entry_logit.data();
  double loss_sum = 0.0;
  float coef_sum = 0.f;
  for (int64_t j = 0; j < shape.topk; ++j) {
    const int64_t y = row.topk_index[j];
    if (y == row.a || y == shape.mask_id) continue;
    const float z_y = Format::widen(logits[y]);
    entry_logit[j] = z_y;
    const float rho = row.topk_value[j];
    const float log_b = z_y - z_a;
    float coef;
    if constexpr (kDivergence == Divergence::kIS) {
      const float r = rho - log_b;  // log(A/B)
      const float ratio = clamped_exp(r, limit);
      loss_sum += (ratio - r) - 1.f;
      coef = ratio - 1.f;
    } else {
      const float big_a = clamped_exp(rho, limit);
      loss_sum += big_a * (rho - log_b) - big_a;
      coef = big_a;
      if constexpr (kTail == Tail::kIgnore) {
        const float big_b = clamped_exp(log_b, limit);
        loss_sum += big_b;
        coef = big_a - big_b;
      }
    }
    column_coef[y] += coef;
    coef_sum += coef;
  }
  const float v = shape.participating;
  const float scale = row.weight / v;
  float grad_a = scale * coef_sum;
  OnlineLogSumExp student_stats;
  float inv_pa = 0.f, lse = kNaN;
  ZLoss z{0.f, 0.f};
  if constexpr (kDenseTail) {
    double unused_sum = 0.0;
    student_stats = softmax_stats<Format, false>(logits, grad, shape, scratch, 0.f, unused_sum);
    const float log_inv_pa = (student_stats.max - z_a) + student_stats.log_sum();
    lse = student_stats.max + student_stats.log_sum();
    z = z_loss(shape, lse, row.weight);
    inv_pa = clamped_exp(log_inv_pa, limit);
    loss_sum += inv_pa - 1.f;
    write_affine_softmax<Format>(logits, grad, shape, scratch, student_stats.max,
                                 student_stats.log_sum(), 0.f, scale * inv_pa + z.slope);
    grad_a = scale * (coef_sum + inv_pa * std::expm1(-log_inv_pa)) +
             z.slope * std::exp(-log_inv_pa);
    zero_mask_column<Format>(grad, shape);
  } else {
    std::memset(grad, 0, sizeof(*grad) * static_cast<size_t>(shape.cols));
  }
  const float z_max = student_stats.max;
  const float z_log_sum = kDenseTail ? student_stats.log_sum() : 0.f;
  for (int64_t j = 0; j < shape.topk; ++j) {
    const int64_t y = row.topk_index[j];
    if (y == row.a || y == shape.mask_id) continue;
    float p_y = 0.f;  // from the z_y read above
    if constexpr (kDenseTail) p_y = fast_exp((entry_logit[j] - z_max) - z_log_sum);
    // (1/p_a) p_y is the dense tail's part
    grad[y] = Format::narrow(scale * (inv_pa * p_y - column_coef[y]) + z.slope * p_y);
  }
  for (int64_t j = 0; j < shape.topk; ++j) column_coef[row.topk_index[j]] = 0.f;
  grad[row.a] = Format::narrow(grad_a);
  return {static_cast<float>(loss_sum) / v + z.loss, lse};
}

// Below this student mass on S, 1 - P_S from the gathered p_y keeps all but a bit of its
// precision; above it, the rest's mass comes from its own pass (rest_log_sum_exp).
constexpr float kExactRestAbove = 0.5f;

// log sum_{k in R} exp(z_k) - z_max over the rest R (participating columns with in_rest 1):
// an online LSE of its own, so that a rest far below the row's max does not flush to 0.
template <class Format>
double rest_log_sum_exp(const typename Format::Storage* logits, const Shape& shape,
                        const float* in_rest, float z_max) {
  OnlineLogSumExp rest;
  for_each_block<kBlock>(shape.ranges, logits, [&](int64_t begin, int64_t end) {
    float local_max = -kInf;
#pragma omp simd reduction(max : local_max)
    for (int64_t k = begin; k < end; ++k) {
      const float z = in_rest[k] != 0.f ? Format::widen(logits[k]) : -kInf;
      local_max = z > local_max ? z : local_max;
    }
    const float shift = exp_shift(rest.raise(local_max));
    float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
    for (int64_t k = begin; k < end; ++k) {
      const float z = in_rest[k] != 0.f ? Format::widen(logits[k]) : -kInf;
      block_sum += fast_exp(z - shift);
    }
    rest.sum += block_sum;
  });
  return static_cast<double>(rest.max - z_max) + std::log(rest.sum);
}

// docs/math.md 4.5, top-K teacher, distrib objective: q_j = exp(values_j) on the K entries
// (columns y_j; entries at the mask column are dropped), log p_j = z_j - LSE.
//   renormalize (kl): q'_j = q_j / Q; loss sum_j q'_j log(q'_j / p_j); grad p - q' on S.
//   zero: cells S + {R}, R the rest, q_R = max(0, 1 - Q), p_R = 1 - P_S (R is a cell when
//   q_R > 0; a teacher with all its mass on S has only the K cells):
//     kl   sum_j q_j log(q_j / p_j) + q_R log(q_R / p_R)
//     is   (1/V) sum_cells [r - log r - 1], r = q / p clamped
//     grad off S: exp(z_k - LSE_R) (M p_R - q_R) for kl, M = sum of the cells' q;
//             exp(z_k - LSE_R) (1/V)((1 - r_R) - p_R E) for is, E = sum_cells (1 - r);
//     grad on S: M p_y - q_j (kl); (1/V)((1 - r_j) - p_y E) (is).
// Entry terms are summed per column (column_coef) so that a repeated column (refused in
// checked mode) still gets one deterministic value. Pass 1: LSE; pass 2: the gradient, plus a
// pass for the rest's mass when P_S > kExactRestAbove.
template <class Format, Divergence kDivergence, Tail kTail>
RowResult sparse_distrib_row(const Row<Format>& row, const Shape& shape, Scratch& scratch) {
  constexpr bool kHasKL = kDivergence != Divergence::kIS;
  constexpr bool kHasIS = kDivergence != Divergence::kKL;
  constexpr bool kRenormalize = kTail == Tail::kRenormalize;
  const auto* const logits = row.logits;
  auto* const grad = row.grad;
  const float limit = shape.max_log_ratio;
  float* const column_coef = scratch.column_coef.data();
  float* const entry_logit = scratch.entry_logit.data();
  float* const in_rest = scratch.in_rest.data();
  // The entries first: their z_y are read before any gradient column is written.
  int64_t distinct = 0;
  float max_value = -kInf;
  for (int64_t j = 0; j < shape.topk; ++j) {
    const int64_t y = row.topk_index[j];
    if (y == shape.mask_id) continue;
    entry_logit[j] = Format::widen(logits[y]);
    max_value = std::max(max_value, row.topk_value[j]);
    distinct += in_rest[y] != 0.f;
    in_rest[y] = 0.f;
  }
  double mass = 0.0;  // Q = sum_S q (renormalize: relative to exp(max_value))
  for (int64_t j = 0; j < shape.topk; ++j) {
    if (row.topk_index[j] == shape.mask_id) continue;
    mass += std::exp(static_cast<double>(row.topk_value[j]) - (kRenormalize ? max_value : 0.f));
  }
  double unused_sum = 0.0;
  const OnlineLogSumExp stats = softmax_stats<Format, false, kRenormalize && kStashExp<Format>>(
      logits, grad, shape, scratch, 0.f, unused_sum);
  const float z_max = stats.max;
  const float log_sum = stats.log_sum();
  const float v = shape.participating;
  const float w = row.weight, w_over_v = row.weight / v;
  const float lse = z_max + log_sum;
  const ZLoss z = z_loss(shape, lse, row.weight);

  // Rest cell (tail zero): its two masses, whether it exists, and its ratio.
  const bool rest_nonempty = static_cast<float>(distinct) < v;
  double log_p_rest = 0.0;
  float q_rest = 0.f, log_q_rest = -kInf;
  if constexpr (!kRenormalize) {
    double student_mass = 0.0;  // P_S over distinct columns
    for (int64_t j = 0; j < shape.topk; ++j) {
      const int64_t y = row.topk_index[j];
      if (y == shape.mask_id || in_rest[y] != 0.f) continue;
      in_rest[y] = 2.f;  // seen: later copies do not count again
      student_mass += std::exp(static_cast<double>((entry_logit[j] - z_max) - log_sum));
    }
    for (int64_t j = 0; j < shape.topk; ++j) {
      if (row.topk_index[j] != shape.mask_id) in_rest[row.topk_index[j]] = 0.f;
    }
    if (!rest_nonempty) {
      log_p_rest = -kInf;
    } else if (student_mass <= kExactRestAbove) {
      log_p_rest = std::log1p(-student_mass);
    } else {
      log_p_rest = rest_log_sum_exp<Format>(logits, shape, in_rest, z_max) - std::log(stats.sum);
    }
    q_rest = static_cast<float>(std::max(0.0, 1.0 - mass));
    log_q_rest = q_rest > 0.f ? std::log(q_rest) : -kInf;
  }
  // The rest is a cell where the teacher has mass off S (else only the K cells count).
  const bool rest_is_cell = !kRenormalize && rest_nonempty && q_rest > 0.f;
  const float log_mass = static_cast<float>(std::log(mass)) + (kRenormalize ? max_value : 0.f);

  // The entries' losses and per-column gradient terms.
  double kl = 0.0, is = 0.0, excess = 0.0, cell_mass = rest_is_cell ? q_rest : 0.0;
  for (int64_t j = 0; j < shape.topk; ++j) {
    const int64_t y = row.topk_index[j];
    if (y == shape.mask_id) continue;
    const float log_p = (entry_logit[j] - z_max) - log_sum;
    const float log_q = kRenormalize ? row.topk_value[j] - log_mass : row.topk_value[j];
    const float q = std::exp(log_q);
    cell_mass += q;
    float entry_term = 0.f;
    if constexpr (kHasKL) {
      if (q > 0.f) kl += q * (log_q - log_p);  // 0 log 0 = 0
      entry_term -= w * q;
    }
    if constexpr (kHasIS) {
      const float log_r = log_q - log_p;
      const float r = clamped_exp(log_r, limit);
      is += (r - log_r) - 1.f;
      excess += 1.f - r;
      entry_term += w_over_v * (1.f - r);
    }
    column_coef[y] += entry_term;
  }
  float r_rest = 0.f;
  if (rest_is_cell) kl += q_rest * (log_q_rest - log_p_rest);
  if constexpr (kHasIS) {
    if (rest_is_cell) {
      const float log_r = static_cast<float>(log_q_rest - log_p_rest);
      r_rest = clamped_exp(log_r, limit);
      is += (r_rest - log_r) - 1.f;
      excess += 1.f - r_rest;
    }
  }
  const float total_mass = static_cast<float>(cell_mass);
  const float cell_excess = static_cast<float>(excess);

  // Pass 2: every participating column as if off S (renormalize: p itself), then S. The
  // z-loss's z.slope p is, off S, z.slope p_R exp(z - LSE_R).
  if constexpr (kRenormalize) {
    write_affine_softmax<Format, kStashExp<Format>>(logits, grad, shape, scratch, z_max,
                                                    log_sum, 0.f, w * total_mass + z.slope);
  } else {
    const float p_rest = static_cast<float>(std::exp(log_p_rest));
    float rest_coef = z.slope * p_rest;
    if constexpr (kHasKL) rest_coef += w * (total_mass * p_rest - q_rest);
    if constexpr (kHasIS) {
      rest_coef += w_over_v * ((rest_is_cell ? 1.f - r_rest : 0.f) - p_rest * cell_excess);
    }
    if (log_p_rest > -kInf) {  // exp(z - LSE_R) = exp((z - z_max) - (log_sum + log p_R))
      const float rest_log_sum = static_cast<float>(std::log(stats.sum) + log_p_rest);
      write_affine_softmax<Format, false>(logits, grad, shape, scratch, z_max, rest_log_sum,
                                          0.f, rest_coef);
    } else {
      for (int r = 0; r < shape.ranges.count; ++r) {
        std::fill(grad + shape.ranges.begin[r], grad + shape.ranges.end[r], Format::narrow(0.f));
      }
    }
  }
  zero_mask_column<Format>(grad, shape);
  for (int64_t j = 0; j < shape.topk; ++j) {
    const int64_t y = row.topk_index[j];
    if (y == shape.mask_id) continue;
    const float p = fast_exp((entry_logit[j] - z_max) - log_sum);
    float column_term = z.slope * p;
    if constexpr (kHasKL) column_term += w * total_mass * p;
    if constexpr (kHasIS) column_term -= w_over_v * p * cell_excess;
    grad[y] = Format::narrow(column_term + column_coef[y]);
  }
  for (int64_t j = 0; j < shape.topk; ++j) {
    const int64_t y = row.topk_index[j];
    if (y == shape.mask_id) continue;
    column_coef[y] = 0.f;
    in_rest[y] = 1.f;
  }
  return {static_cast<float>((kHasKL ? kl : 0.0) + (kHasIS ? is / v : 0.0)) + z.loss, lse};
}

template <class Format>
using RowKernel = RowResult (*)(const Row<Format>&, const Shape&, Scratch&);

template <class Format>
RowKernel<Format> select_kernel(const LossProblem& problem) {
  const Divergence d = problem.divergence;
  if (problem.topk_indices != nullptr && problem.objective == Objective::kDistrib) {
    if (problem.tail == Tail::kRenormalize) {
      return &sparse_distrib_row<Format, Divergence::kKL, Tail::kRenormalize>;
    }
    if (d == Divergence::kKL) return &sparse_distrib_row<Format, Divergence::kKL, Tail::kZero>;
    if (d == Divergence::kIS) return &sparse_distrib_row<Format, Divergence::kIS, Tail::kZero>;
    return &sparse_distrib_row<Format, Divergence::kGKL, Tail::kZero>;
  }
  if (problem.topk_indices != nullptr) {
    if (d == Divergence::kIS) return &sparse_row<Format, Divergence::kIS, Tail::kIgnore>;
    if (problem.tail == Tail::kZero) return &sparse_row<Format, Divergence::kGKL, Tail::kZero>;
    return &sparse_row<Format, Divergence::kGKL, Tail::kIgnore>;
  }
  if (problem.teacher_logits != nullptr) {
    if (problem.objective == Objective::kScore) {
      return d == Divergence::kIS ? &dense_score_is_row<Format> : &dense_score_gkl_row<Format>;
    }
    if (problem.temperature == 1.f) {
      if (d == Divergence::kKL) return &dense_distrib_row<Format, Divergence::kKL, true>;
      if (d == Divergence::kIS) return &dense_distrib_row<Format, Divergence::kIS, true>;
      return &dense_distrib_row<Format, Divergence::kGKL, true>;
    }
    if (d == Divergence::kKL) return &dense_distrib_row<Format, Divergence::kKL, false>;
    if (d == Divergence::kIS) return &dense_distrib_row<Format, Divergence::kIS, false>;
    return &dense_distrib_row<Format, Divergence::kGKL, false>;
  }
  if (problem.label_smoothing > 0.f) {
    return problem.class_weight == nullptr
               ? &data_row<Format, Divergence::kKL, Smoothing::kUniform>
               : &data_row<Format, Divergence::kKL, Smoothing::kClassWeighted>;
  }
  if (d == Divergence::kKL) return &data_row<Format, Divergence::kKL, Smoothing::kNone>;
  if (d == Divergence::kIS) return &data_row<Format, Divergence::kIS, Smoothing::kNone>;
  return &data_row<Format, Divergence::kGKL, Smoothing::kNone>;
}


// softcap c (Gemma; Liger's and CCE's softcap): the loss sees z = c tanh(x / c) and
// d loss / dx = (1 - tanh^2(x / c)) d loss / dz. The row is capped into a float32 row of the
// thread's own, the float32 kernel runs on it in place, and the chain rule's slope turns its
// gradient into the row's: one tanh per element, the extra reads and writes in cache. A
// bfloat16/float16 dense teacher is widened into a float32 row alongside (exactly).
template <class Format>
RowResult capped_row(const Row<Format>& row, const Shape& shape, Scratch& scratch,
                     RowKernel<Float32> kernel, float softcap) {
  const auto* const logits = row.logits;
  auto* const grad = row.grad;
  float* const capped = line_aligned(scratch.capped);
  float* const slope = line_aligned(scratch.capped_slope);
  const float inv_softcap = 1.f / softcap;
#pragma omp simd
  for (int64_t k = 0; k < shape.cols; ++k) {
    const TanhAndSlope t = tanh_and_slope(divide(Format::widen(logits[k]), softcap, inv_softcap));
    capped[k] = softcap * t.tanh;
    slope[k] = t.slope;
  }
  const float* teacher = nullptr;
  if constexpr (std::is_same_v<Format, Float32>) {
    teacher = row.teacher;
  } else if (row.teacher != nullptr) {
    float* const wide = line_aligned(scratch.wide_teacher);
    const auto* const narrow_teacher = row.teacher;
#pragma omp simd
    for (int64_t k = 0; k < shape.cols; ++k) wide[k] = Format::widen(narrow_teacher[k]);
    teacher = wide;
  }
  const Row<Float32> staged{capped, teacher, row.topk_index, row.topk_value,
                            capped, row.a,   row.weight};
  const RowResult result = kernel(staged, shape, scratch);
#pragma omp simd
  for (int64_t k = 0; k < shape.cols; ++k) grad[k] = Format::narrow(slope[k] * capped[k]);
  return result;
}

// A loss-carrying row reads only ids in [0, cols): the target (never the mask column) and,
// for a sparse teacher, every top-K id.
bool row_ids_valid(const LossProblem& problem, int64_t n, int64_t a) {
  if (a < 0 || a >= problem.cols || a == problem.mask_id) return false;
  if (problem.topk_indices == nullptr) return true;
  const int64_t* ids = problem.topk_indices + n * problem.topk;
  for (int64_t j = 0; j < problem.topk; ++j) {
    if (ids[j] < 0 || ids[j] >= problem.cols) return false;
  }
  return true;
}

template <class Format>
void run(const LossProblem& problem) {
  using Storage = typename Format::Storage;
  const RowKernel<Format> kernel = select_kernel<Format>(problem);
  const bool softcap = problem.softcap > 0.f;
  const RowKernel<Float32> capped_kernel = select_kernel<Float32>(problem);  // see capped_row
  const float participating =
      static_cast<float>(problem.mask_id >= 0 ? problem.cols - 1 : problem.cols);
  double class_weight_sum = 0.0;
  if (problem.class_weight != nullptr) {
    for (int64_t k = 0; k < problem.cols; ++k) {
      if (k != problem.mask_id) class_weight_sum += problem.class_weight[k];
    }
  }
  const Shape shape{problem.cols,
                    problem.mask_id,
                    problem.topk_indices == nullptr ? 0 : problem.topk,
                    participating_columns(problem.cols, problem.mask_id),
                    participating,
                    problem.temperature,
                    problem.max_log_ratio,
                    problem.lse_square_scale,
                    problem.label_smoothing,
                    problem.class_weight,
                    static_cast<float>(class_weight_sum)};
  const auto* logits = static_cast<const Storage*>(problem.logits);
  const auto* teacher = static_cast<const Storage*>(problem.teacher_logits);
  auto* grad = static_cast<Storage*>(problem.grad);
  const bool sparse = problem.topk_indices != nullptr;
  const bool dense_distrib = !sparse && teacher != nullptr &&
                             problem.objective == Objective::kDistrib;
  // Small problems run on the calling thread: waking the team costs more than it saves.
  const bool parallel = problem.rows > 1 && problem.rows * problem.cols >= kMinParallelWork;
#pragma omp parallel if (parallel) \
    num_threads(problem.threads > 0 ? problem.threads : omp_get_max_threads())
  {
    Scratch scratch;
    scratch.block_max.resize(static_cast<size_t>(shape.cols / kTeacherBlock + 4));
    if (dense_distrib) {
      scratch.block_shift.resize(scratch.block_max.size());
      scratch.stash_student.resize(static_cast<size_t>(shape.cols + 32));
      scratch.stash_second.resize(static_cast<size_t>(shape.cols + 32));
      scratch.out_block.resize(static_cast<size_t>(kTeacherBlock + 16));
    }
    if (softcap) {
      scratch.capped.resize(static_cast<size_t>(shape.cols + 16));
      scratch.capped_slope.resize(static_cast<size_t>(shape.cols + 16));
      if (teacher != nullptr && !std::is_same_v<Format, Float32>) {
        scratch.wide_teacher.resize(static_cast<size_t>(shape.cols + 16));
      }
    }
    if (sparse) {
      scratch.column_coef.assign(static_cast<size_t>(shape.cols), 0.f);
      scratch.entry_logit.resize(static_cast<size_t>(shape.topk));
      if (problem.objective == Objective::kDistrib) {
        scratch.in_rest.assign(static_cast<size_t>(shape.cols), 1.f);
      }
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < problem.rows; ++n) {
      Storage* g = grad + n * problem.grad_row_stride;
      const int64_t a = problem.target[n];
      const float weight = problem.weight == nullptr ? 1.f : problem.weight[n];
      const bool carries_loss = a != problem.ignore_index && weight != 0.f;
      if (!carries_loss || !row_ids_valid(problem, n, a)) {
        std::memset(g, 0, sizeof(Storage) * static_cast<size_t>(shape.cols));
        problem.loss[n] = carries_loss ? kNaN : 0.f;
        if (problem.lse != nullptr) problem.lse[n] = 0.f;
        continue;
      }
      const Row<Format> row{logits + n * problem.logits_row_stride,
                            teacher == nullptr ? nullptr : teacher + n * problem.teacher_row_stride,
                            sparse ? problem.topk_indices + n * shape.topk : nullptr,
                            sparse ? problem.topk_values + n * shape.topk : nullptr,
                            g,
                            a,
                            weight};
      const RowResult result = softcap
                                   ? capped_row(row, shape, scratch, capped_kernel, problem.softcap)
                                   : kernel(row, shape, scratch);
      problem.loss[n] = weight * result.loss;
      if (problem.lse != nullptr) problem.lse[n] = result.lse;
    }
  }
}

}  // namespace

void tcsm_loss(const LossProblem& problem) {
  with_storage(problem.storage, [&]<class Format>() { run<Format>(problem); });
}

}  // namespace tcsm
