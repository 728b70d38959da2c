#include "merge.hpp"

#include <flashcpu/flashcpu.hpp>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

#include "plan.hpp"
#include "validate.hpp"

namespace flashcpu::detail {

float merge_partials(const Partial* parts, std::int64_t count, std::int64_t columns, float empty_value, float* merged,
                     std::int64_t merged_stride) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  // Relative to the largest scale, so no weight overflows.
  float top = neg_inf;
  for (std::int64_t c = 0; c < count; ++c) top = std::max(top, parts[c].log_scale);
  assert(count <= kMaxMergeParts);
  float weight[kMaxMergeParts];
  float total = 0.0f;
  for (std::int64_t c = 0; c < count; ++c) {
    weight[c] = parts[c].log_scale == neg_inf ? 0.0f : std::exp(parts[c].log_scale - top);
    total += weight[c] * parts[c].sum;
  }
  // total is 0 exactly when no part saw a key; a NaN (from a NaN in a visible key or in
  // q) goes through to the row, as in the oracle.
  const bool empty = total == 0.0f;
  const float inv = empty ? 0.0f : 1.0f / total;
  for (std::int64_t col = 0; col < columns; ++col) {
    float value = 0.0f;
    for (std::int64_t c = 0; c < count; ++c)
      if (weight[c] != 0.0f && parts[c].values) value += weight[c] * parts[c].values[col * parts[c].stride];
    merged[col * merged_stride] = empty ? empty_value : value * inv;
  }
  return empty ? neg_inf : top + std::log(total);
}

}  // namespace flashcpu::detail

namespace flashcpu {

void merge_into(TensorView<float> out, TensorView<float> lse, TensorView<const float> part_out,
                TensorView<const float> part_lse) {
  detail::validate_merge(out, lse, part_out, part_lse);
  const std::int64_t B = out.shape[0], H = out.shape[1], N = out.shape[2], Dv = out.shape[3];
  if (B == 0 || H == 0 || N == 0) return;  // no rows (and no 2^40 empty loops over a batch of them)
  const auto at = [](const auto& view, std::int64_t b, std::int64_t h, std::int64_t i) {
    // Empty views (Dv = 0) may have null data, never offset.
    return view.data ? view.data + b * view.strides[0] + h * view.strides[1] + i * view.strides[2] : view.data;
  };
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < N; ++i) {
        float* l = at(lse, b, h, i);
        const float pl = *at(part_lse, b, h, i);
        if (pl == -std::numeric_limits<float>::infinity()) continue;  // the part saw no key: nothing to add
        float* o = at(out, b, h, i);
        const detail::Partial parts[2] = {{o, out.strides[3], *l, 1.0f},
                                          {at(part_out, b, h, i), part_out.strides[3], pl, 1.0f}};
        *l = detail::merge_partials(parts, 2, Dv, 0.0f, o, out.strides[3]);
      }
}

}  // namespace flashcpu
