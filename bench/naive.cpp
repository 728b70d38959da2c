// The "naive" baseline: attention as a textbook writes it, in fp32.
//
// Per query row: one row of scores (q.k times the scale, a plain loop per key), its
// maximum, std::exp of each score minus the maximum, their sum, then the weighted sum
// of the value rows, divided by that sum. OpenMP spreads (batch, head, row) over the
// threads; each thread owns one score row of M floats.
//
// This file alone is compiled -O3 -march=native (bench/support.cmake): the baseline
// gets every instruction of the machine it is built on, as a user compiling this
// loop would. The compiler vectorizes the value loop; the score loop is a float
// reduction, which it keeps in order without -ffast-math, as the textbook code is
// written. The benchmarks and tools run where they are built, so the native code
// never meets another CPU (the library itself is never compiled this way).
#include "common.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace flashcpu::bench {
namespace {

struct Dims {
  std::int64_t batch, q_heads, kv_heads, n, m, d, dv;
};

void naive_row(const float* q, const float* k, std::int64_t k_row_stride, const float* v,
               std::int64_t v_row_stride, float* out, std::int64_t visible, std::int64_t d,
               std::int64_t dv, float scale, float* s) {
  for (std::int64_t e = 0; e < dv; ++e) out[e] = 0.0f;
  if (visible <= 0) return;  // no visible key: zeros, as flashcpu::attention
  float mx = -INFINITY;
  for (std::int64_t j = 0; j < visible; ++j) {
    const float* kj = k + j * k_row_stride;
    float dot = 0.0f;
    for (std::int64_t c = 0; c < d; ++c) dot += q[c] * kj[c];
    s[j] = dot * scale;
    mx = std::max(mx, s[j]);
  }
  float sum = 0.0f;
  for (std::int64_t j = 0; j < visible; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  for (std::int64_t j = 0; j < visible; ++j) {
    const float* vj = v + j * v_row_stride;
    const float p = s[j];
    for (std::int64_t e = 0; e < dv; ++e) out[e] += p * vj[e];
  }
  const float inv = 1.0f / sum;
  for (std::int64_t e = 0; e < dv; ++e) out[e] *= inv;
}

}  // namespace

void naive_attention(TensorView<const float> q, TensorView<const float> k,
                     TensorView<const float> v, TensorView<float> out,
                     const AttentionOptions& options) {
  const Dims s{q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]};
  if (k.shape[0] != s.batch || v.shape[0] != s.batch || out.shape[0] != s.batch ||
      s.kv_heads <= 0 || s.q_heads % s.kv_heads != 0 || v.shape[1] != s.kv_heads ||
      out.shape[1] != s.q_heads || k.shape[3] != s.d || v.shape[2] != s.m ||
      out.shape[2] != s.n || out.shape[3] != s.dv) {
    throw Error("naive_attention: shapes do not match");
  }
  if (q.strides[3] != 1 || k.strides[3] != 1 || v.strides[3] != 1 || out.strides[3] != 1) {
    throw Error("naive_attention: the last stride of every view must be 1");
  }
  if (options.score != Score::dot_product) throw Error("naive_attention: dot product only");
  const float scale = options.scale ? *options.scale : 1.0f / std::sqrt(float(s.d));
  const std::int64_t group = s.q_heads / s.kv_heads, shift = s.m - s.n;
  const std::int64_t rows = s.batch * s.q_heads * s.n;
  const int threads = resolve_threads(options.num_threads);

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores(std::size_t(std::max<std::int64_t>(s.m, 1)));
    // Causal rows differ in length: hand them out in small dynamic chunks.
#pragma omp for schedule(dynamic, 16)
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t i = r % s.n, bh = r / s.n, b = bh / s.q_heads, h = bh % s.q_heads;
      const std::int64_t hk = h / group;
      const std::int64_t visible =
          options.causal ? std::clamp<std::int64_t>(i + shift + 1, 0, s.m) : s.m;
      naive_row(q.data + b * q.strides[0] + h * q.strides[1] + i * q.strides[2],
                k.data + b * k.strides[0] + hk * k.strides[1], k.strides[2],
                v.data + b * v.strides[0] + hk * v.strides[1], v.strides[2],
                out.data + b * out.strides[0] + h * out.strides[1] + i * out.strides[2], visible,
                s.d, s.dv, scale, scores.data());
    }
  }
}

}  // namespace flashcpu::bench
