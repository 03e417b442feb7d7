// Fused TCSM loss and gradient over the rows of a logits matrix (docs/math.md 4-5), plain C++
// over raw pointers. Per row i: loss[i] = weight_i * row_loss_i and grad[i, :] = weight_i *
// d row_loss_i / d logits[i, :], both 0 for ignored rows and weight-0 rows.
#pragma once
#include <cstdint>

#include "storage.h"

namespace tcsm {

enum class Divergence { kKL, kIS, kGKL };
enum class Objective { kDistrib, kScore };
enum class Tail { kZero, kIgnore, kRenormalize };

struct LossProblem {
  StorageDtype storage;  // of logits, teacher_logits and grad; all arithmetic is float32
  int64_t rows;
  int64_t cols;
  const void* logits;  // (rows, cols), unit column stride
  int64_t logits_row_stride;
  const int64_t* target;  // (rows,)
  const float* weight;    // (rows,) or null (all 1)
  // At most one teacher. Dense: (rows, cols) logits, unit column stride, or null.
  const void* teacher_logits;
  int64_t teacher_row_stride;
  // Sparse: (rows, topk) contiguous column ids and values, or null: log-ratios
  // log(q_y / q_a) for the score objective, log-probabilities log q_y for distrib.
  const int64_t* topk_indices;
  const float* topk_values;
  int64_t topk;
  void* grad;  // (rows, cols) output, unit column stride; may be the logits themselves
  int64_t grad_row_stride;
  float* loss;  // (rows,) output
  Divergence divergence;
  Objective objective;  // dense and sparse teachers (the data target has one objective)
  Tail tail;            // sparse teacher only: zero/ignore (score), zero/renormalize (distrib)
  int64_t mask_id;      // excluded column, or -1
  float temperature;    // divides the dense teacher logits
  int64_t ignore_index;
  float max_log_ratio;  // clamp of the exponents that can overflow (math.md 4.6)
  int threads;          // OpenMP threads over rows; 0: the OpenMP default
  // Options, all off at zero / null (tcsm_kernels.loss_options.LossOptions).
  float softcap;           // > 0: the loss sees softcap * tanh(logits / softcap)
  float lse_square_scale;  // z-loss: + scale * LSE^2 per row, times the row weight
  float label_smoothing;   // data target, kl: (1 - eps) CE + eps mean_y(-log p_y)
  const float* class_weight;  // data target: (cols,) weights of F.cross_entropy, or null
  float* lse;  // (rows,) output, or null: the student's row LSE (0 on rows not computed)
};

// Rows whose (non-ignored) target is outside [0, cols) or equal to mask_id, or whose top-K ids
// leave [0, cols), get a NaN loss and a zero gradient; nothing out of bounds is read.
// The caller passes only combinations of tcsm_kernels.loss_options.LOSS_CASES (kl has no score
// objective, renormalize is distrib kl only; the z-loss and lse only where the loss forms the
// LSE, smoothing and class weights only for the data target); the op binding rejects the
// others.
void tcsm_loss(const LossProblem& problem);

}  // namespace tcsm
