#include "validate.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

namespace flashcpu::detail {
namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  message << "flashcpu: ";
  (message << ... << parts);
  throw Error(message.str());
}

std::string dims(const std::array<std::int64_t, 4>& a) {
  std::ostringstream s;
  s << '[' << a[0] << ", " << a[1] << ", " << a[2] << ", " << a[3] << ']';
  return s.str();
}

const char* const kDimNames[4] = {"batch", "heads", "seq", "dim"};

// The byte range [first, last) a view touches; empty views touch nothing.
struct ByteRange {
  std::uintptr_t first = 0, last = 0;
  bool empty() const { return first == last; }
};

// Checks sizes, strides, null data and 64-bit overflow of one view, and returns the
// byte range it spans.
template <class T>
ByteRange check_view(const TensorView<T>& view, const char* name) {
  bool empty = false;
  for (int d = 0; d < 4; ++d) {
    if (view.shape[d] < 0)
      fail(name, ".shape[", d, "] (", kDimNames[d], "): expected a size >= 0, got ", view.shape[d]);
    if (view.strides[d] < 0)
      fail(name, ".strides[", d, "]: expected a stride >= 0, got ", view.strides[d]);
    empty = empty || view.shape[d] == 0;
  }
  // Element count and the largest offset must fit 64-bit indexing, in bytes too.
  std::int64_t count = 1, last_offset = 0;
  for (int d = 0; d < 4; ++d) {
    std::int64_t step = 0;
    if (__builtin_mul_overflow(count, view.shape[d], &count) ||
        (view.shape[d] > 0 && (__builtin_mul_overflow(view.shape[d] - 1, view.strides[d], &step) ||
                               __builtin_add_overflow(last_offset, step, &last_offset))))
      fail(name, ": expected sizes and strides whose extent fits 64-bit indexing, got shape ", dims(view.shape),
           " strides ", dims(view.strides));
  }
  std::int64_t last_byte = 0;
  if (__builtin_add_overflow(last_offset, 1, &last_byte) ||
      __builtin_mul_overflow(last_byte, std::int64_t(sizeof(T)), &last_byte))
    fail(name, ": expected an extent that fits 64-bit byte addressing, got shape ", dims(view.shape), " strides ",
         dims(view.strides));
  if (empty) return {};
  if (view.data == nullptr) fail(name, ".data: expected a non-null pointer for shape ", dims(view.shape), ", got null");
  auto first = reinterpret_cast<std::uintptr_t>(view.data);
  if (first > std::numeric_limits<std::uintptr_t>::max() - std::uintptr_t(last_byte))
    fail(name, ": expected an extent inside the address space, got one that wraps around");
  return {first, first + std::uintptr_t(last_byte)};
}

void expect_equal(std::int64_t actual, std::int64_t expected, const char* name, int dim, const char* what) {
  if (actual != expected) fail(name, ".shape[", dim, "] (", what, "): expected ", expected, ", got ", actual);
}

// Writing through `out` must not touch one element twice: after sorting the non-trivial
// dimensions by stride, each stride must step past everything the smaller ones span.
void check_no_self_overlap(const TensorView<float>& out) {
  std::array<int, 4> order{0, 1, 2, 3};
  std::sort(order.begin(), order.end(), [&](int a, int b) { return out.strides[a] < out.strides[b]; });
  std::int64_t span = 1;  // elements spanned by the dims already visited
  for (int d : order) {
    if (out.shape[d] <= 1) continue;
    if (out.strides[d] < span)
      fail("out.strides[", d, "]: expected a stride >= ", span,
           " so that no two elements of out share memory, got ", out.strides[d], " (strides ", dims(out.strides),
           ", shape ", dims(out.shape), ")");
    span = out.strides[d] * (out.shape[d] - 1) + span;
  }
}

void check_disjoint(ByteRange out, ByteRange input, const char* name) {
  if (out.empty() || input.empty()) return;
  if (out.first < input.last && input.first < out.last)
    fail("out: expected memory disjoint from ", name, ", got address ranges that overlap");
}

}  // namespace

AttentionShape validate_attention(const TensorView<const float>& q, const TensorView<const float>& k,
                                  const TensorView<const float>& v, const TensorView<float>& out,
                                  const AttentionOptions& options) {
  const ByteRange q_range = check_view(q, "q");
  const ByteRange k_range = check_view(k, "k");
  const ByteRange v_range = check_view(v, "v");
  const ByteRange out_range = check_view(out, "out");

  AttentionShape s{};
  s.batch = q.shape[0];
  s.q_heads = q.shape[1];
  s.q_len = q.shape[2];
  s.head_dim = q.shape[3];
  s.kv_heads = k.shape[1];
  s.kv_len = k.shape[2];
  s.value_dim = v.shape[3];

  if (s.head_dim < 1) fail("q.shape[3] (head dim D): expected >= 1, got ", s.head_dim);
  expect_equal(k.shape[0], s.batch, "k", 0, "batch, as q.shape[0]");
  expect_equal(v.shape[0], s.batch, "v", 0, "batch, as q.shape[0]");
  expect_equal(out.shape[0], s.batch, "out", 0, "batch, as q.shape[0]");
  expect_equal(k.shape[3], s.head_dim, "k", 3, "head dim, as q.shape[3]");
  expect_equal(v.shape[1], s.kv_heads, "v", 1, "kv heads, as k.shape[1]");
  expect_equal(v.shape[2], s.kv_len, "v", 2, "keys, as k.shape[2]");
  expect_equal(out.shape[1], s.q_heads, "out", 1, "heads, as q.shape[1]");
  expect_equal(out.shape[2], s.q_len, "out", 2, "queries, as q.shape[2]");
  expect_equal(out.shape[3], s.value_dim, "out", 3, "value dim, as v.shape[3]");
  if (s.kv_heads == 0 && s.q_heads != 0)
    fail("k.shape[1] (kv heads): expected >= 1 for q with ", s.q_heads, " heads, got 0");
  if (s.kv_heads != 0 && s.q_heads % s.kv_heads != 0)
    fail("q.shape[1] (query heads): expected a multiple of k.shape[1] = ", s.kv_heads, ", got ", s.q_heads);

  if (options.scale && !std::isfinite(*options.scale))
    fail("options.scale: expected a finite value, got ", *options.scale);
  s.scale = options.scale ? *options.scale : float(1.0 / std::sqrt(double(s.head_dim)));
  s.causal = options.causal;
  if (options.num_threads < 0) fail("options.num_threads: expected >= 0 (0: OpenMP's default), got ", options.num_threads);
  s.num_threads = options.num_threads;

  check_no_self_overlap(out);
  check_disjoint(out_range, q_range, "q");
  check_disjoint(out_range, k_range, "k");
  check_disjoint(out_range, v_range, "v");
  return s;
}

}  // namespace flashcpu::detail
