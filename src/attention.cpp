// The public entry points: validate, plan, and hand the call to the prefill or the
// decode driver; kernel regression on top of attention.
#include <flashcpu/flashcpu.hpp>

#include <cmath>
#include <limits>

#include "plan.hpp"
#include "validate.hpp"

namespace flashcpu {
namespace {

using detail::AnyView;
using detail::AttentionShape;
using detail::CallViews;

// M = 0 (no keys at all): every row sees no key, and its lse is its head's sink (-inf
// without one).
void write_empty_rows(const AttentionShape& s, const CallViews& views, float empty_value) {
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.q_heads; ++h)
      for (std::int64_t i = 0; i < s.q_len; ++i) {
        for (std::int64_t c = 0; c < s.value_dim; ++c)
          detail::store_values(&empty_value, 1, views.out.type, views.out.row(b, h, i), c * views.out.strides[3], 0);
        if (float* lse = views.lse_at(b, h, i)) *lse = s.sinks ? s.sinks[h] : -std::numeric_limits<float>::infinity();
      }
}

void run(const AttentionShape& s, const CallViews& views, detail::Transform transform = detail::Transform::none,
         float empty_value = 0.0f, bool regression = false) {
  const detail::KernelTable& kernels = detail::kernels_for_call(s, views.q.type, views.k.type, views.v, transform);
  if (s.empty()) return;
  // Nothing to write (Dv = 0, no lse): the rows are not walked, however many there are.
  if (s.value_dim == 0 && !views.has_lse) return;
  if (s.kv_len == 0) return write_empty_rows(s, views, empty_value);
  const detail::Plan plan = detail::make_plan(kernels, s, views.v, transform, empty_value, regression);  // may throw
  if (detail::use_decode_path(s, kernels))
    detail::run_decode(plan, views);
  else
    detail::run_prefill(plan, views);
}

template <class Q, class KV>
void attention_any(TensorView<const Q> q, TensorView<const KV> k, TensorView<const KV> v, TensorView<Q> out,
                   TensorView<float>* lse, const AttentionOptions& options) {
  const AttentionShape s = detail::validate_attention(q, k, v, out, lse, options);
  const CallViews views{AnyView::of(q), AnyView::of(k), AnyView::of(v), AnyView::of(out),
                        lse ? *lse : TensorView<float>{}, lse != nullptr};
  run(s, views);
}

}  // namespace

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v, TensorView<float> out,
               const AttentionOptions& options) {
  attention_any(q, k, v, out, nullptr, options);
}

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v, TensorView<float> out,
               TensorView<float> lse, const AttentionOptions& options) {
  attention_any(q, k, v, out, &lse, options);
}

#define FLASHCPU_ATTENTION_16BIT(Q, KV)                                                                        \
  void attention(TensorView<const Q> q, TensorView<const KV> k, TensorView<const KV> v, TensorView<Q> out,      \
                 const AttentionOptions& options) {                                                          \
    attention_any(q, k, v, out, nullptr, options);                                                           \
  }                                                                                                          \
  void attention(TensorView<const Q> q, TensorView<const KV> k, TensorView<const KV> v, TensorView<Q> out,      \
                 TensorView<float> lse, const AttentionOptions& options) {                                   \
    attention_any(q, k, v, out, &lse, options);                                                              \
  }
FLASHCPU_ATTENTION_16BIT(bf16, bf16)
FLASHCPU_ATTENTION_16BIT(fp16, fp16)
FLASHCPU_ATTENTION_16BIT(float, bf16)
FLASHCPU_ATTENTION_16BIT(float, fp16)
#undef FLASHCPU_ATTENTION_16BIT

void nadaraya_watson(TensorView<const float> x_query, TensorView<const float> x_train, TensorView<const float> y_train,
                     TensorView<float> y_pred, const KernelRegressionOptions& options) {
  detail::validate_kernel_regression(x_query, x_train, y_train, y_pred, options);
  // The weights K(u), u = |x - x_j| / h, as softmax of log K: with the Gaussian score
  // s = -scale |x - x_j|^2, the Gaussian kernel is scale = 1 / (2 h^2); the others take
  // scale = 1 / h^2 (s = -u^2) and map s to log K(u) in the kernel's transform.
  AttentionOptions attention_options;
  attention_options.score = Score::gaussian;
  attention_options.num_threads = options.num_threads;
  const double h2 = double(options.bandwidth) * options.bandwidth;
  attention_options.scale = float(options.kernel == Kernel::gaussian ? 0.5 / h2 : 1.0 / h2);
  if (!std::isfinite(*attention_options.scale) || *attention_options.scale <= 0)
    detail::fail_message("options.bandwidth: expected a value whose 1/h^2 is a finite float, got " +
                         std::to_string(options.bandwidth));
  const detail::Transform transform = options.kernel == Kernel::laplacian      ? detail::Transform::nw_laplacian
                                      : options.kernel == Kernel::boxcar       ? detail::Transform::nw_boxcar
                                      : options.kernel == Kernel::epanechnikov ? detail::Transform::nw_epanechnikov
                                                                               : detail::Transform::none;
  const AttentionShape s = detail::validate_attention(x_query, x_train, y_train, y_pred, nullptr, attention_options);
  const CallViews views{AnyView::of(x_query), AnyView::of(x_train), AnyView::of(y_train), AnyView::of(y_pred),
                        TensorView<float>{}, false};
  // No training point in the kernel's support: NaN, the statistical convention.
  run(s, views, transform, std::numeric_limits<float>::quiet_NaN(), true);
}

}  // namespace flashcpu
