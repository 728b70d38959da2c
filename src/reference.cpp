// The naive oracle. Plain loops, the full N x M score matrix of a head, double sums:
// slow and memory-hungry on purpose, so it is easy to trust and to compare against.
#include <flashcpu/flashcpu.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "validate.hpp"

namespace flashcpu::reference {

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, const AttentionOptions& options) {
  const detail::AttentionShape s = detail::validate_attention(q, k, v, out, options);
  if (s.empty()) return;
  const std::int64_t group = s.q_heads / s.kv_heads;
  const std::int64_t N = s.q_len, M = s.kv_len, D = s.head_dim, Dv = s.value_dim;
  const std::int64_t heads = s.batch * s.q_heads;
  const double neg_inf = -std::numeric_limits<double>::infinity();

#pragma omp parallel num_threads(s.num_threads > 0 ? s.num_threads : omp_get_max_threads()) if (heads > 1)
  {
    std::vector<double> scores;  // the materialized N x M matrix of one head
#pragma omp for schedule(dynamic)
    for (std::int64_t bh = 0; bh < heads; ++bh) {
      const std::int64_t b = bh / s.q_heads, h = bh % s.q_heads, hk = h / group;
      auto at = [](const auto& view, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t c) {
        return double(view.data[b * view.strides[0] + h * view.strides[1] + i * view.strides[2] + c * view.strides[3]]);
      };
      scores.assign(std::size_t(N * M), neg_inf);
      for (std::int64_t i = 0; i < N; ++i)
        for (std::int64_t j = 0; j < M; ++j) {
          if (s.causal && j > i + (M - N)) continue;  // bottom-right aligned diagonal
          double dot = 0;
          for (std::int64_t c = 0; c < D; ++c) dot += at(q, b, h, i, c) * at(k, b, hk, j, c);
          scores[std::size_t(i * M + j)] = double(s.scale) * dot;
        }
      for (std::int64_t i = 0; i < N; ++i) {
        double* row = &scores[std::size_t(i * M)];
        double row_max = neg_inf;
        for (std::int64_t j = 0; j < M; ++j) row_max = std::max(row_max, row[j]);
        double sum = 0;
        if (row_max != neg_inf)
          for (std::int64_t j = 0; j < M; ++j) sum += (row[j] = std::exp(row[j] - row_max));
        for (std::int64_t c = 0; c < Dv; ++c) {
          double acc = 0;
          if (sum > 0)
            for (std::int64_t j = 0; j < M; ++j) acc += row[j] * at(v, b, hk, j, c);
          float* o = out.data + b * out.strides[0] + h * out.strides[1] + i * out.strides[2] + c * out.strides[3];
          *o = sum > 0 ? float(acc / sum) : 0.0f;  // a row that sees no key gets zeros
        }
      }
    }
  }
}

}  // namespace flashcpu::reference
