// Every argument check of the public entry points, in one place and one message
// style: "<argument>: expected <what>, got <actual>". All checks run before the
// first write to any output.
#pragma once

#include <flashcpu/flashcpu.hpp>

#include <array>
#include <cstdint>
#include <string>

namespace flashcpu::detail {

/// A broadcast view of a mask: strides of broadcast dims are 0.
template <class T>
struct MaskView {
  const T* data = nullptr;  // null: no mask
  std::array<std::int64_t, 4> strides{};
};

/// One attention call once its arguments are known to agree: sizes and resolved options.
struct AttentionShape {
  std::int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, value_dim;
  Score score;
  float scale;  // resolved (defaults by score)
  bool causal;
  int num_threads;  // 0: OpenMP's default
  MaskView<float> mask;
  MaskView<std::uint8_t> bool_mask;
  const std::int32_t* key_lengths;
  std::int64_t window_left, window_right;
  float softcap;
  const float* alibi_slopes;
  const float* sinks;  // null, or Hq values checked finite or -inf
  const float* additive_weights;
  bool allow_bf16_compute;  // fp32 / fp16 inputs may be rounded to bf16 for the products
  bool empty() const { return batch == 0 || q_heads == 0 || q_len == 0; }
  /// Query heads per KV head (validated to divide); 1 when there are no heads to group.
  std::int64_t group() const { return kv_heads > 0 && q_heads >= kv_heads ? q_heads / kv_heads : 1; }
};

/// Checks q, k, v, out, lse (may be null) and the options of an attention call; throws
/// Error naming the first inconsistency. Instantiated for the header's combinations of
/// element types (out is of q's type).
template <class Q, class KV>
AttentionShape validate_attention(const TensorView<const Q>& q, const TensorView<const KV>& k,
                                  const TensorView<const KV>& v, const TensorView<Q>& out,
                                  const TensorView<float>* lse, const AttentionOptions& options);

/// Checks the arguments of attention_backward: those of the forward call that produced
/// out and lse, then dout (as out), dq (as q), dk (as k), dv (as v), and that no gradient
/// shares memory with another view. Score::additive is refused (no backward).
template <class T>  // float, bf16, fp16
AttentionShape validate_backward(const TensorView<const T>& q, const TensorView<const T>& k,
                                 const TensorView<const T>& v, const TensorView<const T>& out,
                                 const TensorView<const float>& lse, const TensorView<const T>& dout,
                                 const TensorView<T>& dq, const TensorView<T>& dk, const TensorView<T>& dv,
                                 const AttentionOptions& options);

/// Checks the weights view of reference::attention_weights: [B, Hq, N, M], disjoint from
/// the inputs.
void validate_weights(const TensorView<const float>& q, const TensorView<const float>& k,
                      const TensorView<float>& weights, const AttentionOptions& options);

/// Checks the views of merge_into.
void validate_merge(const TensorView<float>& out, const TensorView<float>& lse, const TensorView<const float>& part_out,
                    const TensorView<const float>& part_lse);

/// Checks the views and options of nadaraya_watson.
void validate_kernel_regression(const TensorView<const float>& x_query, const TensorView<const float>& x_train,
                                const TensorView<const float>& y_train, const TensorView<float>& y_pred,
                                const KernelRegressionOptions& options);

[[noreturn]] void fail_message(const std::string& message);

}  // namespace flashcpu::detail
