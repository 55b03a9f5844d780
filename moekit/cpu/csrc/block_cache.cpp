#include "moekit_cpu.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/CPUAllocator.h>

#include <map>
#include <mutex>

namespace moekit {
namespace {

// Large step buffers (h, the weight gradients) come from a cache of freed blocks. NOTE: glibc maps
// every allocation above 32 MiB (its highest mmap threshold) fresh from the kernel and unmaps it on
// free, and the first write to each 4 KiB page then faults: a 46 MB fp32 buffer (E64's h, E64's and
// E128's grad_w_in) took ~17 ms single-threaded to fault in against ~1 ms to write, on every step.
// Smaller buffers come from glibc's heap, reused without faults, while a cached block holds memory
// the heap could lend to others (caching E128's 23 MB h put its step's peak 3% higher). So a block of
// min_bytes (32 MiB) or more, freed by its tensor, returns here and serves the next request it fits
// with at most 1/8 to spare; a request that finds no block frees the smaller ones it could not use.
// h, whose rows change a little with the routing, thus settles on a block of the largest size seen
// (a miss only at a new largest), and an h of an earlier, smaller batch does not linger. The bytes
// kept are bounded (2048 MiB unless set_limit changes it: moekit.cpu.build applies MOEKIT_BLOCK_CACHE_MB
// at load; 0 turns the cache off), the oldest block going first; release() hands them all back. The
// storages of its tensors are not resizable.
class BlockCache {
 public:
  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    size_t bytes = options.dtype().itemsize();
    for (int64_t s : sizes) {
      TORCH_CHECK(s >= 0, "moekit loop_experts: negative size ", s);
      bytes *= static_cast<size_t>(s);
    }
    if (bytes < min_bytes()) return at::empty(sizes, options);
    size_t cap = bytes;
    void* p = take(bytes, cap);
    if (p == nullptr) p = allocator()->raw_allocate(cap);
    try {
      return at::from_blob(
          p, sizes, [this, cap](void* q) { give(q, cap); }, options);
    } catch (...) {
      give(p, cap);
      throw;
    }
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t freed = bytes_;
    for (auto& [cap, block] : free_) allocator()->raw_deallocate(block.p);
    free_.clear();
    bytes_ = 0;
    return freed;
  }

  size_t bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

  size_t limit() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_;
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes;
    shrink(0);
  }

  size_t min_bytes() const { return min_bytes_.load(std::memory_order_relaxed); }  // (read every request)

  void set_min_bytes(size_t bytes) { min_bytes_.store(bytes, std::memory_order_relaxed); }

 private:
  struct Block {
    void* p;
    uint64_t age;
  };

  static c10::Allocator* allocator() { return c10::GetCPUAllocator(); }

  void* take(size_t bytes, size_t& cap) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(bytes);  // the smallest block that fits
    if (it == free_.end() || it->first > bytes + bytes / 8) {
      // the blocks smaller than asked for, down to half of it: most likely an earlier, smaller h
      for (auto j = free_.lower_bound(bytes / 2); j != free_.end() && j->first < bytes;) {
        allocator()->raw_deallocate(j->second.p);
        bytes_ -= j->first;
        j = free_.erase(j);
      }
      return nullptr;
    }
    cap = it->first;
    void* p = it->second.p;
    bytes_ -= cap;
    free_.erase(it);
    return p;
  }

  void shrink(size_t room) {  // (locked) the oldest blocks go until `room` more bytes fit
    while (!free_.empty() && bytes_ + room > limit_) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second.age < oldest->second.age) oldest = it;
      allocator()->raw_deallocate(oldest->second.p);
      bytes_ -= oldest->first;
      free_.erase(oldest);
    }
  }

  void give(void* p, size_t cap) {
    std::lock_guard<std::mutex> lock(mu_);
    if (cap > limit_) {
      allocator()->raw_deallocate(p);
      return;
    }
    shrink(cap);
    free_.emplace(cap, Block{p, clock_++});
    bytes_ += cap;
  }

  std::mutex mu_;
  std::multimap<size_t, Block> free_;  // by capacity
  size_t bytes_ = 0;
  size_t limit_ = size_t{2048} << 20;
  std::atomic<size_t> min_bytes_{size_t{32} << 20};
  uint64_t clock_ = 0;
};

// Never destroyed: tensors holding its blocks may outlive the library's static destructors.
BlockCache& the_cache() {
  static auto* cache = new BlockCache();
  return *cache;
}

}  // namespace

namespace block_cache {
Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return the_cache().empty(sizes, options); }
size_t release() { return the_cache().release(); }
size_t bytes() { return the_cache().bytes(); }
size_t limit() { return the_cache().limit(); }
void set_limit(size_t bytes) { the_cache().set_limit(bytes); }
size_t min_bytes() { return the_cache().min_bytes(); }
void set_min_bytes(size_t bytes) { the_cache().set_min_bytes(bytes); }
}  // namespace block_cache

}  // namespace moekit
