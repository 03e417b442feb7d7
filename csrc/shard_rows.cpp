// Row passes of the vocabulary-parallel loss (shard_rows.h). OpenMP over rows; per row one max
// pass and one sum pass for the statistics, one pass for the gradient. A bfloat16/float16 or
// softcapped row is first widened (and capped) into a float32 row of the thread's own, so the
// column loops below see float32 only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "shard_rows.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "fast_exp.h"
#include "softcap.h"
#include "storage.h"

namespace tcsm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Columns per block of the sum pass: float32 block sums, double row totals.
constexpr int64_t kBlock = 1024;

TCSM_INLINE float exp_shift(float max) { return max == -kInf ? 0.f : max; }

// The shard's participating columns as at most two ranges (mask_col left out).
template <class Fn>
TCSM_INLINE void for_each_range(const ShardRows& p, Fn&& fn) {
  if (p.mask_col < 0) {
    fn(int64_t{0}, p.cols);
    return;
  }
  fn(int64_t{0}, p.mask_col);
  fn(p.mask_col + 1, p.cols);
}

// Per-thread rows.
struct Scratch {
  std::vector<float> z, u, slope, ones, in_rest;
  explicit Scratch(int64_t cols)
      : z(cols), u(cols), slope(cols), ones(cols, 1.f), in_rest(cols, 1.f) {}
};

// The row as float32 z (capped with softcap, slope = dz/dx), in scratch unless it already is.
template <class Format>
const float* student_row(const ShardRows& p, int64_t n, Scratch& s, bool want_slope) {
  const auto* x = static_cast<const typename Format::Storage*>(p.logits) + n * p.logits_row_stride;
  if constexpr (std::is_same_v<Format, Float32>) {
    if (p.softcap == 0.f) return x;
  }
  float* z = s.z.data();
  float* slope = s.slope.data();
  if (p.softcap == 0.f) {
#pragma omp simd
    for (int64_t k = 0; k < p.cols; ++k) z[k] = Format::widen(x[k]);
    return z;
  }
  const float c = p.softcap, inv_c = 1.f / p.softcap;
  for (int64_t k = 0; k < p.cols; ++k) {
    const TanhAndSlope t = tanh_and_slope(divide(Format::widen(x[k]), c, inv_c));
    z[k] = c * t.tanh;
    if (want_slope) slope[k] = t.slope;
  }
  return z;
}

// u = teacher / temperature as float32, in scratch.
template <class Format>
const float* teacher_row(const ShardRows& p, int64_t n, Scratch& s) {
  const auto* t = static_cast<const typename Format::Storage*>(p.teacher) + n * p.teacher_row_stride;
  const float tau = p.temperature, inv_tau = 1.f / p.temperature;
  float* u = s.u.data();
#pragma omp simd
  for (int64_t k = 0; k < p.cols; ++k) u[k] = divide(Format::widen(t[k]), tau, inv_tau);
  return u;
}

TCSM_INLINE float range_max(const float* x, int64_t begin, int64_t end, float running) {
#pragma omp simd reduction(max : running)
  for (int64_t k = begin; k < end; ++k) running = x[k] > running ? x[k] : running;
  return running;
}

// Student statistics: [m, sum exp(z - s), sum c (z - s), m_rest, sum_rest exp(z - s_rest)],
// the rest's sum shifted by its own max (a rest far below the row max does not underflow);
// without exclusions (kRest false) the rest is the whole row.
template <bool kRest, bool kWeighted>
void student_stats(const ShardRows& p, const float* z, const float* c, const float* in_rest,
                   float* out) {
  float m = -kInf, m_rest = -kInf;
  for_each_range(p, [&](int64_t begin, int64_t end) {
    m = range_max(z, begin, end, m);
    if constexpr (kRest) {
#pragma omp simd reduction(max : m_rest)
      for (int64_t k = begin; k < end; ++k) {
        const float r = in_rest[k] > 0.f ? z[k] : -kInf;
        m_rest = r > m_rest ? r : m_rest;
      }
    }
  });
  const float shift = exp_shift(m), shift_rest = exp_shift(m_rest);
  double sum = 0.0, linear = 0.0, rest = 0.0;
  for_each_range(p, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t e = b + kBlock < end ? b + kBlock : end;
      float bs = 0.f, bl = 0.f, br = 0.f;
#pragma omp simd reduction(+ : bs, bl, br)
      for (int64_t k = b; k < e; ++k) {
        bs += fast_exp(z[k] - shift);
        bl += kWeighted ? c[k] * (z[k] - shift) : z[k] - shift;
        if constexpr (kRest) br += in_rest[k] * fast_exp(z[k] - shift_rest);
      }
      sum += bs;
      linear += bl;
      rest += br;
    }
  });
  out[0] = m;
  out[1] = static_cast<float>(sum);
  out[2] = static_cast<float>(linear);
  out[3] = kRest ? m_rest : m;
  out[4] = static_cast<float>(kRest ? rest : sum);
  out[5] = 0.f;
}

// With a dense teacher: [m, sum exp(z - s), m_u, sum exp(u - s_u), sum exp(u - s_u) (u - z),
// sum (u - z)].
void teacher_stats(const ShardRows& p, const float* z, const float* u, float* out) {
  float m = -kInf, m_u = -kInf;
  for_each_range(p, [&](int64_t begin, int64_t end) {
    m = range_max(z, begin, end, m);
    m_u = range_max(u, begin, end, m_u);
  });
  const float shift = exp_shift(m), shift_u = exp_shift(m_u);
  double sum = 0.0, sum_u = 0.0, cross = 0.0, gap = 0.0;
  for_each_range(p, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t e = b + kBlock < end ? b + kBlock : end;
      float bs = 0.f, bu = 0.f, bc = 0.f, bg = 0.f;
#pragma omp simd reduction(+ : bs, bu, bc, bg)
      for (int64_t k = b; k < e; ++k) {
        bs += fast_exp(z[k] - shift);
        const float eu = fast_exp(u[k] - shift_u);
        bu += eu;
        bc += eu > 0.f ? eu * (u[k] - z[k]) : 0.f;  // 0 log 0 = 0 where q_k = 0
        bg += u[k] - z[k];
      }
      sum += bs;
      sum_u += bu;
      cross += bc;
      gap += bg;
    }
  });
  out[0] = m;
  out[1] = static_cast<float>(sum);
  out[2] = m_u;
  out[3] = static_cast<float>(sum_u);
  out[4] = static_cast<float>(cross);
  out[5] = static_cast<float>(gap);
}

// sum_k exp(min(u_k - z_k - delta, M)), float32 blocks, double total.
float ratio_sum(const ShardRows& p, const float* z, const float* u, float delta) {
  const float limit = p.max_log_ratio;
  double total = 0.0;
  for_each_range(p, [&, z, u](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t e = b + kBlock < end ? b + kBlock : end;
      float block = 0.f;
#pragma omp simd reduction(+ : block)
      for (int64_t k = b; k < e; ++k) {
        const float r = (u[k] - z[k]) - delta;
        block += fast_exp(r < limit ? r : limit);
      }
      total += block;
    }
  });
  return static_cast<float>(total);
}

// The row's excluded columns (local ids in [0, cols)) marked 0 in in_rest (all 1 between rows).
TCSM_INLINE void mark_excluded(const ShardRows& p, int64_t n, float* in_rest, float value) {
  if (p.excluded == nullptr) return;
  const int64_t* excluded = p.excluded + n * p.topk;
  for (int64_t j = 0; j < p.topk; ++j) {
    if (excluded[j] >= 0 && excluded[j] < p.cols) in_rest[excluded[j]] = value;
  }
}

template <class Format>
void stats_rows(const ShardRows& p, float* out) {
#pragma omp parallel num_threads(p.threads > 0 ? p.threads : omp_get_max_threads())
  {
    Scratch scratch(p.cols);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.rows; ++n) {
      const float* z = student_row<Format>(p, n, scratch, false);
      float* row_out = out + n * kShardStats;
      if (p.teacher != nullptr) {
        teacher_stats(p, z, teacher_row<Format>(p, n, scratch), row_out);
        continue;
      }
      float* in_rest = scratch.in_rest.data();
      const float* c = p.column_weight;
      if (p.excluded != nullptr) {
        mark_excluded(p, n, in_rest, 0.f);
        if (c != nullptr) {
          student_stats<true, true>(p, z, c, in_rest, row_out);
        } else {
          student_stats<true, false>(p, z, c, in_rest, row_out);
        }
        mark_excluded(p, n, in_rest, 1.f);
      } else if (c != nullptr) {
        student_stats<false, true>(p, z, c, in_rest, row_out);
      } else {
        student_stats<false, false>(p, z, c, in_rest, row_out);
      }
    }
  }
}

template <class Format>
void ratio_rows(const ShardRows& p, const float* delta, float* out) {
#pragma omp parallel num_threads(p.threads > 0 ? p.threads : omp_get_max_threads())
  {
    Scratch scratch(p.cols);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.rows; ++n) {
      const float* z = student_row<Format>(p, n, scratch, false);
      out[n] = ratio_sum(p, z, teacher_row<Format>(p, n, scratch), delta[n]);
    }
  }
}

enum GradTerms { kPlain, kWithTeacher, kWithTeacherRatio, kWithRest };

// One row's gradient: (alpha p + beta c (+ gamma [rest] exp(z - LSE_R))
// (+ eta exp(min(u - z - delta, M)))) times slope (dz/dx, null: 1), c = exp(u - LSE_u) with
// the teacher row u (kWithTeacher*), else the column weights. Everything the loop reads is a
// parameter or local: GCC does not vectorise loads through the problem struct.
struct RowTerms {
  float lse, alpha, beta, teacher_lse, gamma, rest_lse, eta, delta, kappa, limit;
};

template <class Format, GradTerms kTerms, bool kCapped>
void write_grad(const float* z, const float* c, const float* slope, const float* in_rest,
                typename Format::Storage* grad, int64_t cols, const RowTerms t) {
  constexpr bool kTeacher = kTerms == kWithTeacher || kTerms == kWithTeacherRatio;
#pragma omp simd
  for (int64_t k = 0; k < cols; ++k) {
    const float ck = kTeacher ? fast_exp(c[k] - t.teacher_lse) : c[k];
    float g = t.alpha * fast_exp(z[k] - t.lse) + t.beta * ck;
    if constexpr (kTerms == kWithRest) g += t.gamma * in_rest[k] * fast_exp(z[k] - t.rest_lse);
    if constexpr (kTerms == kWithTeacherRatio) {
      const float r = (c[k] - z[k]) - t.delta;
      g += t.eta * fast_exp(r < t.limit ? r : t.limit) + t.kappa;
    }
    grad[k] = Format::narrow(kCapped ? g * slope[k] : g);
  }
}

// write_grad with the softcap's slope, or without it (slope null).
template <class Format, GradTerms kTerms>
void write_row_grad(const float* z, const float* c, const float* slope, const float* in_rest,
                    typename Format::Storage* grad, int64_t cols, const RowTerms& t) {
  if (slope != nullptr) {
    write_grad<Format, kTerms, true>(z, c, slope, in_rest, grad, cols, t);
  } else {
    write_grad<Format, kTerms, false>(z, c, slope, in_rest, grad, cols, t);
  }
}

template <class Format>
void grad_rows(const ShardRows& p, const RowCoefficients& coef, void* grad_out,
               int64_t grad_row_stride) {
#pragma omp parallel num_threads(p.threads > 0 ? p.threads : omp_get_max_threads())
  {
    Scratch scratch(p.cols);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.rows; ++n) {
      auto* grad = static_cast<typename Format::Storage*>(grad_out) + n * grad_row_stride;
      const float a = coef.alpha[n], b = coef.beta[n];
      RowTerms t{coef.lse[n], a, b, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, p.max_log_ratio};
      if (coef.gamma != nullptr) t.gamma = coef.gamma[n], t.rest_lse = coef.rest_lse[n];
      if (coef.eta != nullptr) t.eta = coef.eta[n], t.delta = coef.delta[n], t.kappa = coef.kappa[n];
      if (p.teacher != nullptr) t.teacher_lse = coef.teacher_lse[n];
      if (a == 0.f && b == 0.f && t.gamma == 0.f && t.eta == 0.f && t.kappa == 0.f) {
        // a row without loss: +0 is all zero bits
        std::memset(grad, 0, sizeof(*grad) * static_cast<size_t>(p.cols));
        continue;
      }
      const float* z = student_row<Format>(p, n, scratch, true);
      const float* slope = p.softcap != 0.f ? scratch.slope.data() : nullptr;
      if (p.teacher != nullptr) {
        const float* u = teacher_row<Format>(p, n, scratch);
        if (t.eta != 0.f || t.kappa != 0.f) {
          write_row_grad<Format, kWithTeacherRatio>(z, u, slope, nullptr, grad, p.cols, t);
        } else {
          write_row_grad<Format, kWithTeacher>(z, u, slope, nullptr, grad, p.cols, t);
        }
      } else {
        const float* c = p.column_weight != nullptr ? p.column_weight : scratch.ones.data();
        if (t.gamma != 0.f) {
          float* in_rest = scratch.in_rest.data();
          mark_excluded(p, n, in_rest, 0.f);
          write_row_grad<Format, kWithRest>(z, c, slope, in_rest, grad, p.cols, t);
          mark_excluded(p, n, in_rest, 1.f);
        } else {
          write_row_grad<Format, kPlain>(z, c, slope, nullptr, grad, p.cols, t);
        }
      }
      if (p.mask_col >= 0) grad[p.mask_col] = Format::narrow(0.f);
    }
  }
}

}  // namespace

void shard_row_stats(const ShardRows& rows, float* out) {
  with_storage(rows.storage, [&]<class Format>() { stats_rows<Format>(rows, out); });
}

void shard_ratio_sums(const ShardRows& rows, const float* delta, float* out) {
  with_storage(rows.storage, [&]<class Format>() { ratio_rows<Format>(rows, delta, out); });
}

void shard_row_grad(const ShardRows& rows, const RowCoefficients& coefficients, void* grad,
                    int64_t grad_row_stride) {
  with_storage(rows.storage, [&]<class Format>() {
    grad_rows<Format>(rows, coefficients, grad, grad_row_stride);
  });
}

}  // namespace tcsm
