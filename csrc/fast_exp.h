// exp for float32 that the compiler vectorises (no calls, no branches; 17 vector instructions
// per 8 floats with AVX2/FMA): exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in
// [-ln2/2, ln2/2].
// - n: x log2(e) + 1.5 * 2^23 rounds to an integer in the float's low mantissa bits (round to
//   nearest, |x log2 e| < 2^22); subtracting 1.5 * 2^23 again gives n as a float, and the low
//   9 bits of the sum's bit pattern are n mod 2^9, so (bits << 23) is n << 23 in two's complement.
// - exp(r): 1 + r (c1 + r (c2 + ... + r c6)), a degree-6 minimax fit of the relative error on
//   [-ln2/2, ln2/2] in float64 with each coefficient rounded to float32 before the next ones
//   were refitted: 3.2e-9 relative (0.05 ulp). With rounding, at most 1 ulp against double exp
//   over every float in [-87.3, 88.7] (tests/fast_exp_check.cpp at stride 1 checks them all);
//   the tests enforce the 2-ulp contract on every 257th float (tests/test_fast_exp.py).
// - 2^n exp(r): n << 23 added to the bits of exp(r) (in [0.70, 1.42], exponent field 126 or
//   127). For x in [kLow, kMaxFinite] the field stays in [1, 254]: n = -126 only for
//   x >= kLow > -126 ln 2, where r >= 0 and exp(r) >= 1 (field 127); n = 128 only for
//   x <= kMaxFinite < 128 ln 2, where r < -7e-6 and exp(r) < 1 (field 126), so results up to
//   FLT_MAX stay finite.
// - Outside that range the integer sum is meaningless and two selects replace it: x < kLow
//   gives 0 (results below FLT_MIN flush to 0), and x > kMaxFinite or NaN gives x + inf (+inf,
//   or the NaN itself). IEEE safe without -ffast-math.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace tcsm {

#if defined(__GNUC__)
#define TCSM_INLINE inline __attribute__((always_inline))
#else
#define TCSM_INLINE inline
#endif

TCSM_INLINE float bits_to_float(int32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

TCSM_INLINE int32_t float_to_int_bits(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

TCSM_INLINE uint32_t float_to_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// The shared core: x log2(e) + 1.5 * 2^23, whose bit pattern carries n, and exp(r).
struct ExpParts {
  float shifted;
  float poly;
};

TCSM_INLINE ExpParts exp_parts(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 0x1.8p23f;            // 1.5 * 2^23
  constexpr float kLn2Hi = 0x1.62e4p-1f;         // 0.693145751953125: n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723e-6f;
  const float shifted = std::fma(x, kLog2e, kRound);
  const float n = shifted - kRound;
  const float r = std::fma(-n, kLn2Lo, std::fma(-n, kLn2Hi, x));
  float p = 0x1.6a3ce4p-10f;
  p = std::fma(p, r, 0x1.123856p-7f);
  p = std::fma(p, r, 0x1.5558bep-5f);
  p = std::fma(p, r, 0x1.555494p-3f);
  p = std::fma(p, r, 0x1.fffffcp-2f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  return {shifted, p};
}

TCSM_INLINE float fast_exp(float x) {
  constexpr float kLow = -0x1.5d589ep+6f;        // -87.33654: least float >= -126 ln 2
  constexpr float kMaxFinite = 0x1.62e42ep+6f;   // 88.72283: greatest float with exp <= FLT_MAX
  const ExpParts parts = exp_parts(x);
  const int32_t scale =
      static_cast<int32_t>(static_cast<uint32_t>(float_to_int_bits(parts.shifted)) << 23);
  const float result = bits_to_float(static_cast<int32_t>(
      static_cast<uint32_t>(float_to_int_bits(parts.poly)) + static_cast<uint32_t>(scale)));
  const float low = x < kLow ? 0.f : result;
  return x <= kMaxFinite ? low : x + std::numeric_limits<float>::infinity();
}

// Below this fast_exp_nonpositive's argument is raised to it: exp(-104) is 0 in float32.
constexpr float kExpFloor = -104.f;

// exp(x) for x <= 0, -inf or NaN, in 4 vector instructions fewer than fast_exp (the scale
// 2^n is a float multiply, which also carries NaN through, instead of an integer add guarded
// by two selects). x is first raised to kExpFloor (NaN stays NaN: the comparison is false),
// so n = round(x / ln 2) is in [-150, 0] and the exponent field n + 127 of 2^n, clamped at 0,
// gives +0 for n < -126. Equal to fast_exp for x >= -126 ln 2; below, where fast_exp flushes
// to 0, the result is +0 but for a subnormal p 2^-126 where n still rounds to -126.
TCSM_INLINE float fast_exp_nonpositive(float x) {
  constexpr uint32_t kRoundBits = 0x4B400000u;  // bit pattern of 1.5 * 2^23 (n = 0)
  x = x < kExpFloor ? kExpFloor : x;
  const ExpParts parts = exp_parts(x);
  const uint32_t shifted_bits = static_cast<uint32_t>(float_to_int_bits(parts.shifted));
  const int32_t field = static_cast<int32_t>(shifted_bits - kRoundBits + 127u);  // n + 127
  const int32_t clamped = field < 0 ? 0 : field;
  return parts.poly * bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(clamped) << 23));
}

}  // namespace tcsm
