// Scalar helpers shared by the loss kernels (tcsm_loss.cpp, shard_rows.cpp): an exact-rounding
// division by a row constant and the softcap's tanh with its slope.
#pragma once
#include <cmath>
#include <limits>

#include "fast_exp.h"

namespace tcsm {

// x / divisor as the division rounds it (but for rare ties), without a division in the
// column loops: one correction of x * (1 / divisor) by its exact fma residual. An infinite
// quotient (x = -inf: a banned token) is kept as is; its residual inf - inf would be NaN.
TCSM_INLINE float divide(float x, float divisor, float inverse) {
  const float quotient = x * inverse;
  const float corrected = std::fma(std::fma(-quotient, divisor, x), inverse, quotient);
  return std::fabs(quotient) <= std::numeric_limits<float>::max() ? corrected : quotient;
}

// tanh(y) and its derivative 1 - tanh^2(y), branch-free and accurate to a few float32 ulps:
// |y| < 1/2: the odd Taylor series to y^17 (the next term is below 2^-30 relative); else
// tanh|y| = (1 - t) / (1 + t) and 1 - tanh^2 = 4t / (1 + t)^2 with t = exp(-2|y|), neither
// of which cancels where tanh is near 1. y = +-inf gives +-1 and 0.
struct TanhAndSlope {
  float tanh, slope;
};

TCSM_INLINE TanhAndSlope tanh_and_slope(float y) {
  // tanh y / y = 1 - y^2/3 + 2y^4/15 - 17y^6/315 + ..., coefficients rounded from double
  constexpr float c1 = static_cast<float>(-1.0 / 3.0), c2 = static_cast<float>(2.0 / 15.0);
  constexpr float c3 = static_cast<float>(-17.0 / 315.0);
  constexpr float c4 = static_cast<float>(62.0 / 2835.0);
  constexpr float c5 = static_cast<float>(-1382.0 / 155925.0);
  constexpr float c6 = static_cast<float>(21844.0 / 6081075.0);
  constexpr float c7 = static_cast<float>(-929569.0 / 638512875.0);
  constexpr float c8 = static_cast<float>(6404582.0 / 10854718875.0);
  const float y2 = y * y;
  float series = std::fma(c8, y2, c7);
  series = std::fma(series, y2, c6);
  series = std::fma(series, y2, c5);
  series = std::fma(series, y2, c4);
  series = std::fma(series, y2, c3);
  series = std::fma(series, y2, c2);
  series = std::fma(series, y2, c1);
  series = std::fma(series, y2, 1.f);
  const float near_zero = y * series;
  const float t = fast_exp(-2.f * std::fabs(y));
  const float far = std::copysign((1.f - t) / (1.f + t), y);
  const bool small = std::fabs(y) < 0.5f;
  return {small ? near_zero : far,
          small ? 1.f - near_zero * near_zero : 4.f * t / ((1.f + t) * (1.f + t))};
}

}  // namespace tcsm
