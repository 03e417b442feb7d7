// Row log-sum-exp over a strided (N, V) float32 matrix: out[n] = log sum_v exp(x[n, v]).
#pragma once
#include <cstdint>

namespace tcsm {

void row_lse(const float* x, int64_t rows, int64_t cols, int64_t row_stride, float* out);

}  // namespace tcsm
