#include "scratch.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <new>

#include "plan.hpp"

namespace flashcpu::detail {

namespace {
constexpr std::size_t kHugePage = std::size_t(2) << 20;
// More than any machine can map (2^58 floats, 1 EiB), and small enough that rounding it
// up to whole huge pages cannot overflow. Callers pass INT64_MAX for a size that
// overflowed; it must be refused here, not wrapped to a small buffer.
constexpr std::int64_t kMaxFloats = std::int64_t(1) << 58;

std::size_t checked_bytes(std::int64_t floats) {
  if (floats > kMaxFloats) throw std::bad_alloc();
  return std::size_t(round_up(std::max<std::int64_t>(floats, 1), 16)) * sizeof(float);
}
}  // namespace

AlignedBuffer::AlignedBuffer(std::int64_t floats) : bytes_(checked_bytes(floats)), mapped_(bytes_ >= kMapBytes) {
  if (!mapped_) {
    memory_ = static_cast<float*>(std::aligned_alloc(64, bytes_));
    if (memory_ == nullptr) throw std::bad_alloc();
    return;
  }
  // Whole huge pages from a 2 MiB boundary on; the slack before it is address space only.
  const std::size_t huge_bytes = (bytes_ + kHugePage - 1) / kHugePage * kHugePage;
  mapping_bytes_ = huge_bytes + kHugePage;
  mapping_ = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping_ == MAP_FAILED) throw std::bad_alloc();
  const std::uintptr_t start = (reinterpret_cast<std::uintptr_t>(mapping_) + kHugePage - 1) & ~(kHugePage - 1);
  memory_ = reinterpret_cast<float*>(start);
  madvise(memory_, huge_bytes, MADV_HUGEPAGE);  // advice: where it fails, 4 KiB pages serve
}

AlignedBuffer::~AlignedBuffer() {
  if (mapped_)
    munmap(mapping_, mapping_bytes_);
  else
    std::free(memory_);
}

void require_scratch_product(std::int64_t count, std::int64_t dim) {
  constexpr std::int64_t kPadding = 256;  // more than any tile, panel or vector pads a size by
  if (saturated_product(count + kPadding, dim + kPadding) > kMaxFloats) throw std::bad_alloc();
}

std::int64_t ThreadScratch::total() const {
  std::int64_t t = 0;
  for (std::int64_t part : {key_panels, key_bias, value_rows, q_packed, row_bias, center, scores, acc, row_stats,
                            row_stats})
    t = saturated_sum(t, saturated_lines(part));
  return t;
}

ThreadScratch::Parts ThreadScratch::carve(float* memory, int thread) const {
  float* next = memory + total() * thread;
  auto take = [&next](std::int64_t floats) {
    float* p = next;
    next += round_up(floats, 16);
    return p;
  };
  Parts parts{};
  parts.key_panels = take(key_panels);
  parts.key_bias = take(key_bias);
  parts.value_rows = take(value_rows);
  parts.q_packed = take(q_packed);
  parts.row_bias = take(row_bias);
  parts.center = take(center);
  parts.scores = take(scores);
  parts.acc = take(acc);
  parts.row_max = take(row_stats);
  parts.row_sum = take(row_stats);
  return parts;
}

}  // namespace flashcpu::detail
