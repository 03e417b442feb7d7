// Row passes of the vocabulary-parallel loss (tcsm_kernels/distributed/fused.py): each rank
// holds columns [start, start + W) of every row. shard_row_stats reduces its shard of a row to
// a few partial statistics that the ranks merge with one collective (shard_ratio_sums, for the
// dense teacher's ratio divergences, a second one after a second collective); shard_row_grad
// then writes the shard's gradient from the merged row scalars.
#pragma once
#include <cstdint>

#include "storage.h"

namespace tcsm {

// Number of statistics per row.
constexpr int64_t kShardStats = 6;

struct ShardRows {
  StorageDtype storage;  // of logits, teacher_logits and grad; arithmetic is float32
  int64_t rows;
  int64_t cols;           // W, the shard's width
  const void* logits;     // (rows, cols), unit column stride
  int64_t logits_row_stride;
  const void* teacher;    // dense teacher logits like logits, or null
  int64_t teacher_row_stride;
  const float* column_weight;  // (cols,) c of the linear statistic (no teacher), or null: c = 1
  const int64_t* excluded;     // (rows, topk) local column ids out of the "rest", -1: none
  int64_t topk;
  int64_t mask_col;       // the shard's column that is the mask column, or -1
  float temperature;      // divides the teacher logits
  float softcap;          // > 0: the statistics see z = softcap tanh(x / softcap)
  float max_log_ratio;    // M of the ratio terms' exp(min(r, M)) (docs/math.md 4.6)
  int threads;            // OpenMP threads over rows; 0: the OpenMP default
};

// out (rows, kShardStats) float32, over the shard's participating columns (mask_col left out),
// with m = max z and the shift s = m (0 where m = -inf):
//   no teacher: [m, sum exp(z - s), sum c (z - s), m_rest, sum_rest exp(z - s_rest), 0],
//               "rest" the columns not in the row's excluded ids, s_rest = m_rest (0 at -inf);
//   teacher u = teacher / temperature, m_u, s_u likewise:
//               [m, sum exp(z - s), m_u, sum exp(u - s_u), sum exp(u - s_u) (u - z),
//                sum (u - z)], a term with exp(u - s_u) = 0 counting 0 in the fifth.
void shard_row_stats(const ShardRows& rows, float* out);

// out (rows,) float32 = sum_k exp(min(u_k - z_k - delta_n, M)) over the participating
// columns: the sum of the dense teacher's clamped ratios once the row's shift delta is known.
void shard_ratio_sums(const ShardRows& rows, const float* delta, float* out);

// Per-row coefficients of the gradient, each (rows,) float32.
struct RowCoefficients {
  const float* lse;          // the row's merged LSE: p_k = exp(z_k - lse)
  const float* alpha;
  const float* beta;
  const float* teacher_lse;  // with a teacher: q_k = exp(u_k - teacher_lse), else null
  const float* gamma;        // null, or the coefficient of exp(z_k - rest_lse) off the
  const float* rest_lse;     //   excluded ids (the top-K rest's LSE), 0 where gamma is 0
  const float* eta;          // with a teacher, null or the coefficient of exp(min(u_k - z_k -
  const float* delta;        //   delta, M)), the ratio term, with kappa a constant term
  const float* kappa;
};

// grad[n, k] = (alpha p_k + beta c_k + gamma [k in rest] exp(z_k - rest_lse)
//               + eta exp(min(u_k - z_k - delta, M)) + kappa) dz_k / dx_k, with c_k the column weight
// (1 without) or, with a teacher, q_k; 0 at mask_col and on rows whose coefficients are all 0.
// grad may be the logits themselves (each column is read before it is written).
void shard_row_grad(const ShardRows& rows, const RowCoefficients& coefficients, void* grad,
                    int64_t grad_row_stride);

}  // namespace tcsm
