// tcsm::empty_hugepage_cpu: an uninitialised CPU tensor backed by transparent huge pages, from
// a small cache of freed buffers.
// The fused loss writes its whole (N, V) gradient into a fresh buffer. With 4 KiB pages the
// first touch of 512 MiB costs ~130k page faults; 2 MiB pages need 512x fewer, but the OS still
// zeroes every page on first touch, a sizeable fraction of the kernel's own time
// (docs/performance_history.md). So, as CUDA's caching allocator does for GPU memory, a freed
// buffer is kept and the next request of the same size reuses it, already faulted in: a
// training loop allocates the same gradient every step. At most kCachedBuffers are held;
// tcsm::release_buffer_cache() frees them. Falls back to plain aligned memory when the kernel
// has no THP (madvise is only a hint).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kCachedBuffers = 2;

// Freed buffers, oldest first. Never destroyed: tensors freed during interpreter exit still
// return their buffers here.
class BufferCache {
 public:
  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->first == bytes) {
        void* data = it->second;
        free_.erase(it);
        return data;
      }
    }
    return nullptr;
  }

  void give_back(void* data, size_t bytes) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.emplace_back(bytes, data);
      if (free_.size() > kCachedBuffers) {
        evicted = free_.front().second;
        free_.pop_front();
      }
    }
    std::free(evicted);
  }

  void release() {
    std::deque<std::pair<size_t, void*>> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(free_);
    }
    for (const auto& block : released) std::free(block.second);
  }

 private:
  std::mutex mutex_;
  std::deque<std::pair<size_t, void*>> free_;
};

void* allocate_hugepage(size_t bytes) {
  void* data = BufferCache::instance().take(bytes);
  if (data != nullptr) return data;
  TORCH_CHECK(posix_memalign(&data, kHugePage, bytes) == 0,
              "empty_hugepage_cpu: out of memory allocating ", bytes, " bytes");
#if defined(MADV_HUGEPAGE)
  madvise(data, bytes, MADV_HUGEPAGE);
#endif
  return data;
}

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
  void* data = allocate_hugepage(rounded);
  return at::from_blob(
      data, size, [rounded](void* ptr) { BufferCache::instance().give_back(ptr, rounded); },
      options);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tcsm, m) {
  m.def("empty_hugepage_cpu(SymInt[] size, ScalarType dtype) -> Tensor");
  m.def("release_buffer_cache() -> ()", []() { BufferCache::instance().release(); });
}

TORCH_LIBRARY_IMPL(tcsm, CompositeExplicitAutograd, m) {
  m.impl("empty_hugepage_cpu", [](c10::SymIntArrayRef size, at::ScalarType dtype) {
    return empty_hugepage_cpu(C10_AS_INTARRAYREF_SLOW(size), dtype);
  });
}
