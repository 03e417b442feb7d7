// Top-k concrete scores of a teacher (docs/math.md 6) over N rows of V logits, one pass per row:
// the k largest logits u_y (ties: lower index first) as column indices sorted best first, their
// log-ratios (u_y - u_a) / tau against the row's reference token a, and the row's
// LSE = logsumexp(u / tau).
#pragma once
#include <cstdint>

#include "storage.h"

namespace tcsm {


struct TopkScoresArgs {
  const void* logits;   // (rows, cols), element (n, v) at logits[n * row_stride + v]
  StorageDtype dtype;
  int64_t rows;
  int64_t cols;         // 1 <= cols < 2^31
  int64_t row_stride;
  const int64_t* target;  // (rows,) reference tokens; one outside [0, cols) gives NaN log-ratios
  int64_t k;            // 1 <= k <= cols
  double temperature;   // > 0
  int64_t* indices;     // (rows, k) outputs, contiguous
  float* log_ratios;    // (rows, k)
  float* lse;           // (rows,)
};

void topk_scores(const TopkScoresArgs& args);

}  // namespace tcsm
