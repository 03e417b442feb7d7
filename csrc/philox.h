// Philox-4x32-10 (Salmon et al., SC'11), the counter-based generator every backend shares
// (math.md 7; Python definition: tcsm_kernels/philox.py, Triton: tcsm_kernels/triton/philox.py).
// Key (seed_lo, seed_hi), counter (row_lo, row_hi, offset_lo, offset_hi). Word 0 drives the
// draw of x1, word 1 the jump decision; a word w becomes the uniform (w + 0.5) * 2^-32, exact
// in double and strictly inside (0, 1).
#pragma once
#include <array>
#include <cstdint>

namespace tcsm {

using PhiloxWords = std::array<uint32_t, 4>;

inline constexpr uint32_t kPhiloxMult0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxMult1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxWeyl1 = 0xBB67AE85u;
inline constexpr int kPhiloxRounds = 10;
inline constexpr int kDrawWord = 0;
inline constexpr int kJumpWord = 1;

inline PhiloxWords philox4x32_10(PhiloxWords counter, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key);
  uint32_t k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod0 = static_cast<uint64_t>(kPhiloxMult0) * counter[0];
    const uint64_t prod1 = static_cast<uint64_t>(kPhiloxMult1) * counter[2];
    counter = {static_cast<uint32_t>(prod1 >> 32) ^ counter[1] ^ k0,
               static_cast<uint32_t>(prod1),
               static_cast<uint32_t>(prod0 >> 32) ^ counter[3] ^ k1,
               static_cast<uint32_t>(prod0)};
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
  return counter;
}

// The four words for one row of one step: counter = (row, offset) as two 64-bit halves.
inline PhiloxWords philox_row_words(uint64_t seed, uint64_t offset, uint64_t row) {
  return philox4x32_10({static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32),
                        static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
                       seed);
}

inline double philox_uniform(uint32_t word) {
  return (static_cast<double>(word) + 0.5) * 0x1p-32;
}

}  // namespace tcsm
