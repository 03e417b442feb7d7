// Fused CTMC reverse step (docs/math.md 7) over N rows of V logits, one pass over each row.
// Per row n: x1 ~ softmax(z / T) without the mask column, drawn by inverse CDF over blocks of
// columns with the row's Philox uniform (key seed, counter (n, offset)); x_next = x1 when the
// row may change and its jump uniform is below jump[n], else x; plus the confidence outputs
// p(x1), top-1 minus top-2 probability and the entropy of softmax(z / T).
#pragma once
#include <cstdint>

#include "storage.h"

namespace tcsm {

struct CtmcStepArgs {
  const void* logits;        // (rows, cols), element (n, v) at logits[n * row_stride + v]
  StorageDtype dtype;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  const int64_t* x;          // (rows,) current tokens
  const double* jump;        // (rows,) jump probabilities
  const bool* frozen;        // (rows,) or nullptr: frozen rows never change
  int64_t mask_id;           // excluded column and masked-path state; -1: uniform path
  double temperature;        // > 0
  uint64_t seed;
  uint64_t offset;
  int64_t* x_next;           // (rows,) outputs
  int64_t* x1;
  float* prob;
  float* margin;
  float* entropy;
};

void ctmc_step(const CtmcStepArgs& args);

}  // namespace tcsm
