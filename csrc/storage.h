// Storage types of the kernels' logits (and of tcsm_loss's teacher logits and gradient). All
// arithmetic is float32: loads widen to it exactly, gradient stores narrow from it with round to
// nearest even. Both are branch-free so that the column loops vectorise.
#pragma once
#include <cstdint>

#include "fast_exp.h"

namespace tcsm {

enum class StorageDtype { kFloat32, kBFloat16, kFloat16 };

struct Float32 {
  using Storage = float;
  static TCSM_INLINE float widen(float value) { return value; }
  static TCSM_INLINE float narrow(float value) { return value; }
};

// bfloat16 is the upper half of a float32.
struct BFloat16 {
  using Storage = uint16_t;
  static TCSM_INLINE float widen(uint16_t bits) {
    return bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(bits) << 16));
  }
  static TCSM_INLINE uint16_t narrow(float value) {
    const uint32_t bits = float_to_bits(value);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
};

// IEEE binary16 (sign, 5 exponent bits of bias 15, 10 mantissa bits), converted in integer
// arithmetic: portable, and the build does not enable F16C.
struct Float16 {
  using Storage = uint16_t;
  static TCSM_INLINE float widen(uint16_t bits) {
    const uint32_t sign = (static_cast<uint32_t>(bits) & 0x8000u) << 16;
    const uint32_t magnitude = static_cast<uint32_t>(bits) & 0x7fffu;
    // Exponent and mantissa moved to the float32 fields read as 2^-112 times the half value,
    // for normal and subnormal halves alike; one exact multiply by 2^112 restores it.
    const float finite = bits_to_float(static_cast<int32_t>(magnitude << 13)) * 0x1p112f;
    // Infinity and NaN (exponent all ones) keep their mantissa under an all-ones exponent.
    const uint32_t value_bits =
        magnitude >= 0x7c00u ? (magnitude << 13) | 0x7f800000u : float_to_bits(finite);
    return bits_to_float(static_cast<int32_t>(value_bits | sign));
  }
  static TCSM_INLINE uint16_t narrow(float value) {
    const uint32_t bits = float_to_bits(value);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t magnitude = bits & 0x7fffffffu;
    // |x| >= 2^-14: rebias the exponent, round the 13 dropped bits to nearest even (a carry
    // may reach the exponent; 65520 and up round to inf).
    const uint32_t normal = (magnitude - (112u << 23) + 0xfffu + ((magnitude >> 13) & 1u)) >> 13;
    // |x| < 2^-14: adding 0.5 leaves the half's subnormal step 2^-24 as the float ulp, so the
    // float adder rounds, and the bits above those of 0.5 are the half mantissa.
    const uint32_t subnormal =
        float_to_bits(bits_to_float(static_cast<int32_t>(magnitude)) + 0.5f) - 0x3f000000u;
    const uint32_t finite = magnitude < 0x38800000u ? subnormal : normal;
    const uint32_t overflowed = magnitude >= 0x47800000u ? 0x7c00u : finite;
    return static_cast<uint16_t>(sign | (magnitude > 0x7f800000u ? 0x7e00u : overflowed));
  }
};

// fn.template operator()<Elem>() with Elem the storage struct of `dtype`: the kernels'
// switch from the runtime dtype to their templates, e.g.
//   with_storage(dtype, [&]<class Elem>() { rows<Elem>(args); });
template <class Fn>
TCSM_INLINE void with_storage(StorageDtype dtype, Fn&& fn) {
  switch (dtype) {
    case StorageDtype::kFloat32:
      return fn.template operator()<Float32>();
    case StorageDtype::kBFloat16:
      return fn.template operator()<BFloat16>();
    case StorageDtype::kFloat16:
      return fn.template operator()<Float16>();
  }
}

}  // namespace tcsm
