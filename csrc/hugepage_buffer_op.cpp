// tcsm::empty_hugepage_cpu: an uninitialised CPU tensor backed by transparent huge pages.
// The fused loss writes its whole (N, V) gradient into a fresh buffer; with 4 KiB pages the
// first touch of 512 MiB costs ~130k page faults, several times the kernel itself on this
// machine, while 2 MiB pages need 512x fewer. Falls back to plain aligned memory when the
// kernel has no THP (madvise is only a hint).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr size_t kHugePage = size_t(2) << 20;

at::Tensor empty_hugepage_cpu(at::IntArrayRef size, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t extent : size) {
    TORCH_CHECK(extent >= 0, "empty_hugepage_cpu: negative size");
    numel *= extent;
  }
  const size_t bytes = static_cast<size_t>(numel) * at::elementSize(dtype);
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  if (bytes < kHugePage) {
    return at::empty(size, options);
  }
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* data = nullptr;
  TORCH_CHECK(posix_memalign(&data, kHugePage, rounded) == 0,
              "empty_hugepage_cpu: out of memory allocating ", rounded, " bytes");
#if defined(MADV_HUGEPAGE)
  madvise(data, rounded, MADV_HUGEPAGE);
#endif
  return at::from_blob(data, size, [](void* ptr) { std::free(ptr); }, options);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tcsm, m) { m.def("empty_hugepage_cpu(SymInt[] size, ScalarType dtype) -> Tensor"); }

TORCH_LIBRARY_IMPL(tcsm, CompositeExplicitAutograd, m) {
  m.impl("empty_hugepage_cpu", [](c10::SymIntArrayRef size, at::ScalarType dtype) {
    return empty_hugepage_cpu(C10_AS_INTARRAYREF_SLOW(size), dtype);
  });
}
