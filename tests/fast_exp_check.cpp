// Accuracy and special values of tcsm::fast_exp (csrc/fast_exp.h), built and run by
// tests/test_fast_exp.py. Values go through a loop the compiler vectorises, as in the kernels.
// Prints "max_ulp <u> at <x>" (against double exp, in units of the float spacing at the exact
// value) and one "fail <what>" line per violated special case.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <vector>

#include "fast_exp.h"

namespace {

template <class Exp>
void apply_all(Exp exp, const std::vector<float>& x, std::vector<float>& y) {
  const float* in = x.data();
  float* out = y.data();
  const size_t n = x.size();
#pragma omp simd
  for (size_t i = 0; i < n; ++i) out[i] = exp(in[i]);
}

void exp_all(const std::vector<float>& x, std::vector<float>& y) {
  apply_all([](float v) { return tcsm::fast_exp(v); }, x, y);
}

void exp_nonpositive_all(const std::vector<float>& x, std::vector<float>& y) {
  apply_all([](float v) { return tcsm::fast_exp_nonpositive(v); }, x, y);
}

float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

uint32_t to_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// Every stride-th float in [lo, hi] (both of one sign walk their bit patterns).
void add_floats(float lo, float hi, uint32_t stride, std::vector<float>& xs) {
  for (float x = lo; x <= hi;) {
    xs.push_back(x);
    const uint32_t b = to_bits(x);
    const uint32_t next = x < 0.f ? (b - 0x80000000u <= stride ? 0u : b - stride) : b + stride;
    const float nx = from_bits(next);
    if (!(nx > x)) break;
    x = nx;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const uint32_t stride = argc > 1 ? static_cast<uint32_t>(std::atoi(argv[1])) : 1;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> xs;
  add_floats(-87.3f, -0.f, stride, xs);
  add_floats(0.f, 88.7f, stride, xs);
  std::vector<float> ys(xs.size());
  exp_all(xs, ys);
  double max_ulp = 0.0;
  float worst = 0.f;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double exact = std::exp(static_cast<double>(xs[i]));
    int e;
    std::frexp(exact, &e);  // exact in [2^(e-1), 2^e): float spacing 2^(e-24)
    const double ulp = std::ldexp(1.0, e - 24);
    const double err = std::fabs(static_cast<double>(ys[i]) - exact) / ulp;
    if (!(err <= max_ulp)) {
      max_ulp = err;
      worst = xs[i];
    }
  }
  std::printf("max_ulp %.4f at %.9g (%zu points)\n", max_ulp, worst, xs.size());

  // Every float from -126 ln 2 up to -87.3 and from 127.5 ln 2 (n = 128) up to ln(FLT_MAX):
  // normal, finite results within 2 ulp.
  std::vector<float> edge;
  add_floats(-87.33654f, -87.3f, 1, edge);
  add_floats(88.376f, 88.72283f, 1, edge);
  std::vector<float> edge_y(edge.size());
  exp_all(edge, edge_y);
  for (size_t i = 0; i < edge.size(); ++i) {
    const double exact = std::exp(static_cast<double>(edge[i]));
    const float y = edge_y[i];
    int e;
    std::frexp(exact, &e);
    const double err = std::fabs(y - exact) / std::ldexp(1.0, e - 24);
    if (!(y >= FLT_MIN && y <= FLT_MAX && err <= 2.0)) {
      std::printf("fail edge exp(%.9g) = %.9g, exact %.9g\n", edge[i], y, exact);
    }
  }

  struct Case {
    float x;
    const char* expect;  // "nan", "inf", "zero"
  };
  const Case cases[] = {
      {std::numeric_limits<float>::quiet_NaN(), "nan"},
      {-std::numeric_limits<float>::quiet_NaN(), "nan"},
      {from_bits(0x7fc001ffu), "nan"},  // payload in the low bits
      {from_bits(0x7f800001u), "nan"},  // signalling NaN
      {inf, "inf"},
      {88.72284f, "inf"},
      {88.8f, "inf"},
      {1e30f, "inf"},
      {FLT_MAX, "inf"},
      {-inf, "zero"},
      {-87.33655f, "zero"},
      {-87.4f, "zero"},
      {-104.f, "zero"},
      {-1e30f, "zero"},
      {-FLT_MAX, "zero"},
  };
  std::vector<float> cx, cy;
  for (const Case& c : cases) cx.push_back(c.x);
  cy.resize(cx.size());
  exp_all(cx, cy);
  for (size_t i = 0; i < cx.size(); ++i) {
    const float y = cy[i];
    const char* expect = cases[i].expect;
    const bool ok = std::strcmp(expect, "nan") == 0   ? std::isnan(y)
                    : std::strcmp(expect, "inf") == 0 ? y == inf
                                                      : y == 0.f && !std::signbit(y);
    if (!ok) std::printf("fail special exp(%.9g) = %.9g, expected %s\n", cx[i], y, expect);
  }
  const float one[] = {0.f, -0.f};
  for (float z : one) {
    std::vector<float> zx{z}, zy(1);
    exp_all(zx, zy);
    if (zy[0] != 1.f) std::printf("fail exp(%g) = %.9g\n", z, zy[0]);
  }

  // fast_exp_nonpositive: bit for bit fast_exp on [-126 ln 2, 0]; below, +0 or a subnormal
  // (never above FLT_MIN), exactly +0 from -104 down (-inf included); NaN -> NaN.
  std::vector<float> nx;
  add_floats(-87.33654f, -0.f, stride, nx);
  std::vector<float> ny(nx.size()), fy(nx.size());
  exp_nonpositive_all(nx, ny);
  exp_all(nx, fy);
  for (size_t i = 0; i < nx.size(); ++i) {
    if (to_bits(ny[i]) != to_bits(fy[i])) {
      std::printf("fail nonpositive exp(%.9g) = %.9g, fast_exp %.9g\n", nx[i], ny[i], fy[i]);
    }
  }
  std::vector<float> low;
  add_floats(-104.f, -87.33654f, 1, low);
  std::vector<float> low_y(low.size());
  exp_nonpositive_all(low, low_y);
  for (size_t i = 0; i < low.size(); ++i) {
    if (low[i] >= -87.33654f) continue;  // -126 ln 2 itself: normal, checked above
    const float y = low_y[i];
    if (!(y >= 0.f && y <= FLT_MIN) || std::signbit(y)) {
      std::printf("fail nonpositive low exp(%.9g) = %.9g\n", low[i], y);
    }
  }
  const float nonpositive_special[] = {-inf, -104.f, -1e30f, -FLT_MAX,
                                       std::numeric_limits<float>::quiet_NaN(),
                                       -std::numeric_limits<float>::quiet_NaN()};
  std::vector<float> sx(std::begin(nonpositive_special), std::end(nonpositive_special));
  std::vector<float> sy(sx.size());
  exp_nonpositive_all(sx, sy);
  for (size_t i = 0; i < sx.size(); ++i) {
    const bool ok = std::isnan(sx[i]) ? std::isnan(sy[i]) : sy[i] == 0.f && !std::signbit(sy[i]);
    if (!ok) std::printf("fail nonpositive special exp(%.9g) = %.9g\n", sx[i], sy[i]);
  }
  return 0;
}
