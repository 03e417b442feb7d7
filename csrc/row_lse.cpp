#include "row_lse.h"

#include <cmath>
#include <limits>

namespace tcsm {

// One pass per row with an online max: m' = max(m, x), s' = s exp(m - m') + exp(x - m'); a -inf
// x adds nothing (while m is -inf too, x - m' would be NaN).
void row_lse(const float* x, int64_t rows, int64_t cols, int64_t row_stride, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < rows; ++n) {
    const float* row = x + n * row_stride;
    float m = -std::numeric_limits<float>::infinity();
    float s = 0.f;
    for (int64_t v = 0; v < cols; ++v) {
      const float value = row[v];
      if (value > m) {
        s = s * std::exp(m - value) + 1.f;
        m = value;
      } else if (value > -std::numeric_limits<float>::infinity()) {  // exp(-inf) adds 0
        s += std::exp(value - m);
      }
    }
    out[n] = cols == 0 ? -std::numeric_limits<float>::infinity() : m + std::log(s);
  }
}

}  // namespace tcsm
