// Working memory of one call: 64-byte aligned, allocated before any parallel region so
// that a failure is reported to the caller (std::bad_alloc) rather than inside OpenMP,
// and returned to the system when the call ends.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flashcpu::detail {

/// Sizes of working memory, in floats. A valid view of stride 0 can be far larger than
/// memory, and so can the scratch of a call on it: such sizes saturate at INT64_MAX,
/// which AlignedBuffer refuses (std::bad_alloc) before anything is written, instead of
/// wrapping around to a small buffer.
constexpr std::int64_t kSaturated = INT64_MAX;
/// a * b, or kSaturated when that overflows or either is saturated.
inline std::int64_t saturated_product(std::int64_t a, std::int64_t b) {
  std::int64_t r = 0;
  return a == kSaturated || b == kSaturated || __builtin_mul_overflow(a, b, &r) ? kSaturated : r;
}
/// a + b, likewise.
inline std::int64_t saturated_sum(std::int64_t a, std::int64_t b) {
  std::int64_t r = 0;
  return a == kSaturated || b == kSaturated || __builtin_add_overflow(a, b, &r) ? kSaturated : r;
}
/// floats rounded up to a multiple of 16 (64 bytes: each part of a scratch starts on a
/// cache line), likewise.
inline std::int64_t saturated_lines(std::int64_t floats) {
  return floats > kSaturated - 15 ? kSaturated : (floats + 15) / 16 * 16;
}
/// Throws std::bad_alloc when `count` (keys or rows) by `dim` floats, both padded to
/// whole tiles, is more than any machine maps (AlignedBuffer's limit, 2^58 floats), let
/// alone when it overflows: the kernels' size functions (key_panel_floats and the like)
/// multiply such pairs unchecked. Sizes are at most 2^48 (validate.cpp), so the padding
/// itself cannot overflow.
void require_scratch_product(std::int64_t count, std::int64_t dim);

/// Scratch of kMapBytes or more is mapped for the call and unmapped after it. Through
/// malloc, glibc's adaptive mmap threshold (raised to the size of each large block freed,
/// up to 32 MiB) serves the next call's scratch from the heap instead, and the heap keeps
/// its pages: measured, 20 calls at N = M = 16384, D = 64, 2 threads left the process
/// 113 MiB above its inputs (0.3 MiB with the threshold pinned, as mapping does here).
/// The price is faulting the pages in on every call. The mapping is 2 MiB aligned and
/// advised as huge pages (MADV_HUGEPAGE, which transparent huge pages in "always" or
/// "madvise" mode honour), so that takes one fault per 2 MiB: faulting 4 MiB in took
/// 10 ms in 4 KiB pages and 0.15 ms in huge pages on a 2-core KVM guest (Zen 5), where a
/// 4 KiB fault costs about 10 us; about 0.25 us on the Xeon measured before. Where huge pages are
/// off, the advice is ignored and 4 KiB pages serve. Smaller scratch stays with malloc,
/// whose reuse of small blocks is free and bounded.
class AlignedBuffer {
 public:
  static constexpr std::size_t kMapBytes = std::size_t(1) << 20;

  explicit AlignedBuffer(std::int64_t floats);
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* get() const { return memory_; }

 private:
  std::size_t bytes_;
  bool mapped_;
  float* memory_ = nullptr;
  void* mapping_ = nullptr;  // the whole mapping (memory_ is its first 2 MiB boundary)
  std::size_t mapping_bytes_ = 0;
};

/// Per-thread scratch: the sizes of its parts (in floats; 0 for a part a path does not
/// use), carved out of one allocation made before the parallel region.
struct ThreadScratch {
  std::int64_t key_panels, key_bias, value_rows, q_packed, row_bias, center, scores, acc, row_stats;

  struct Parts {
    float *key_panels, *key_bias, *value_rows, *q_packed, *row_bias, *center, *scores, *acc, *row_max, *row_sum;
  };

  /// Floats per thread, parts rounded up to 16; kSaturated when that overflows.
  std::int64_t total() const;
  /// The parts of thread `thread` in `memory` (total() floats per thread, 64-byte aligned).
  Parts carve(float* memory, int thread) const;
};

}  // namespace flashcpu::detail
