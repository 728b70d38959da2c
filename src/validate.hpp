// Every argument check of the public entry points, in one place and one message
// style: "<argument>: expected <what>, got <actual>". All checks run before the
// first write to any output.
#pragma once

#include <flashcpu/flashcpu.hpp>

#include <cstdint>

namespace flashcpu::detail {

/// The sizes of one attention call once the views are known to agree.
struct AttentionShape {
  std::int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, value_dim;
  float scale;  // the resolved scale (default 1/sqrt(D))
  bool causal;
  int num_threads;  // 0: OpenMP's default
  bool empty() const { return batch == 0 || q_heads == 0 || q_len == 0 || value_dim == 0; }
};

/// Checks q, k, v, out and the options of an attention call; throws Error naming the
/// first inconsistency.
AttentionShape validate_attention(const TensorView<const float>& q, const TensorView<const float>& k,
                                  const TensorView<const float>& v, const TensorView<float>& out,
                                  const AttentionOptions& options);

}  // namespace flashcpu::detail
