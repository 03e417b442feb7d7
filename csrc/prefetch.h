// Software prefetch of the block a streaming pass will read next-but-one. The passes read a
// block twice (max, then exps, from L1) and the hardware prefetcher alone leaves the first
// read waiting on memory; asking for the lines two blocks ahead overlaps that wait with the
// exps of the current block. Its gain on the CTMC step: docs/performance_history.md.
#pragma once
#include <cstdint>

namespace tcsm {

// Prefetches the cache lines of [ahead, ahead + bytes) that lie before end (never past the
// row: a hint, but the kernels never touch memory outside their inputs).
inline void prefetch_lines(const void* ahead, const void* end, int64_t bytes) {
  const auto* first = static_cast<const char*>(ahead);
  const auto* last = static_cast<const char*>(end);
  for (int64_t line = 0; line < bytes && first + line < last; line += 64) {
    __builtin_prefetch(first + line);
  }
}

}  // namespace tcsm
