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

// The largest size of any dimension: 2^48, far past any real tensor (a stride-0 view can
// be larger than memory), and small enough that sizes padded to whole tiles and blocks
// cannot overflow 64-bit arithmetic. Products of sizes (working memory of a huge
// stride-0 view) are checked where they are formed (scratch.hpp).
constexpr std::int64_t kMaxSize = std::int64_t(1) << 48;

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
    if (view.shape[d] > kMaxSize)
      fail(name, ".shape[", d, "] (", kDimNames[d], "): expected a size <= 2^48 (", kMaxSize, "), got ",
           view.shape[d]);
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
template <class T>
void check_no_self_overlap(const TensorView<T>& out, const char* name) {
  for (int d = 0; d < 4; ++d)
    if (out.shape[d] == 0) return;  // an empty view writes nothing
  std::array<int, 4> order{0, 1, 2, 3};
  std::sort(order.begin(), order.end(), [&](int a, int b) { return out.strides[a] < out.strides[b]; });
  std::int64_t span = 1;  // elements spanned by the dims already visited
  for (int d : order) {
    if (out.shape[d] <= 1) continue;
    if (out.strides[d] < span)
      fail(name, ".strides[", d, "]: expected a stride >= ", span, " so that no two elements of ", name,
           " share memory, got ", out.strides[d], " (strides ", dims(out.strides),
           ", shape ", dims(out.shape), ")");
    span = out.strides[d] * (out.shape[d] - 1) + span;
  }
}

void check_disjoint(ByteRange output, ByteRange input, const char* output_name, const char* input_name) {
  if (output.empty() || input.empty()) return;
  if (output.first < input.last && input.first < output.last)
    fail(output_name, ": expected memory disjoint from ", input_name, ", got address ranges that overlap");
}

template <class T>
MaskView<T> check_mask(const TensorView<const T>& mask, const char* name, const std::array<std::int64_t, 4>& target,
                       ByteRange* range) {
  MaskView<T> view;
  if (mask.data == nullptr) return view;  // off
  *range = check_view(mask, name);
  static const char* const kTarget[4] = {"B", "Hq", "N", "M"};
  for (int d = 0; d < 4; ++d) {
    if (mask.shape[d] != 1 && mask.shape[d] != target[d] && mask.strides[d] != 0)
      fail(name, ".shape[", d, "]: expected 1 or ", kTarget[d], " = ", target[d],
           " to broadcast to [B, Hq, N, M] = ", dims(target), ", got ", mask.shape[d], " (shape ", dims(mask.shape), ")");
    if (mask.shape[d] == 0 && target[d] != 0)
      fail(name, ".shape[", d, "]: expected 1 or ", target[d], ", got 0");
    view.strides[d] = mask.shape[d] == 1 ? 0 : mask.strides[d];
  }
  view.data = mask.data;
  return view;
}

}  // namespace

void fail_message(const std::string& message) { fail(message); }

template <class Q, class KV>
AttentionShape validate_attention(const TensorView<const Q>& q, const TensorView<const KV>& k,
                                  const TensorView<const KV>& v, const TensorView<Q>& out,
                                  const TensorView<float>* lse, const AttentionOptions& options) {
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

  s.score = options.score;
  if (s.score != Score::dot_product && s.score != Score::gaussian && s.score != Score::additive)
    fail("options.score: expected dot_product, gaussian or additive, got ", int(s.score));
  if (options.scale && !std::isfinite(*options.scale))
    fail("options.scale: expected a finite value, got ", *options.scale);
  const float default_scale = s.score == Score::dot_product ? float(1.0 / std::sqrt(double(s.head_dim)))
                              : s.score == Score::gaussian  ? 0.5f
                                                            : 1.0f;
  s.scale = options.scale ? *options.scale : default_scale;
  s.causal = options.causal;
  if (options.num_threads < 0) fail("options.num_threads: expected >= 0 (0: OpenMP's default), got ", options.num_threads);
  s.num_threads = options.num_threads;
  if (s.score == Score::additive && options.additive_weights == nullptr && s.head_dim > 0)
    fail("options.additive_weights: expected ", s.head_dim, " weights (D) for Score::additive, got null");
  s.additive_weights = s.score == Score::additive ? options.additive_weights : nullptr;

  if (options.window_left < -1) fail("options.window_left: expected -1 (unbounded) or >= 0, got ", options.window_left);
  if (options.window_right < -1)
    fail("options.window_right: expected -1 (unbounded) or >= 0, got ", options.window_right);
  // A window that reaches past every key on its side excludes nothing there: it is the
  // unbounded -1, and stored so, which keeps the offsets i + (M - N) -+ window in range
  // (window_left = INT64_MAX would overflow them). Row i's window spans keys
  // [i + M - N - left, i + M - N + right]: left >= M reaches key 0 from every row, and
  // right >= N reaches key M - 1.
  s.window_left = options.window_left >= s.kv_len ? -1 : options.window_left;
  s.window_right = options.window_right >= s.q_len ? -1 : options.window_right;
  if (!std::isfinite(options.softcap) || options.softcap < 0)
    fail("options.softcap: expected a finite value >= 0 (0: off), got ", options.softcap);
  s.softcap = options.softcap;
  s.allow_bf16_compute = options.allow_bf16_compute;
  s.alibi_slopes = options.alibi_slopes;
  s.sinks = options.sinks;
  if (s.sinks)
    for (std::int64_t h = 0; h < s.q_heads; ++h)
      if (!std::isfinite(s.sinks[h]) && s.sinks[h] != -std::numeric_limits<float>::infinity())
        fail("options.sinks[", h, "]: expected a finite value or -inf (no sink), got ", s.sinks[h]);
  s.key_lengths = options.key_lengths;
  if (s.key_lengths)
    for (std::int64_t b = 0; b < s.batch; ++b)
      if (s.key_lengths[b] < 0 || s.key_lengths[b] > s.kv_len)
        fail("options.key_lengths[", b, "]: expected a value in [0, M = ", s.kv_len, "], got ", s.key_lengths[b]);

  const std::array<std::int64_t, 4> target{s.batch, s.q_heads, s.q_len, s.kv_len};
  ByteRange mask_range, bool_mask_range;
  s.mask = check_mask(options.mask, "options.mask", target, &mask_range);
  s.bool_mask = check_mask(options.bool_mask, "options.bool_mask", target, &bool_mask_range);

  check_no_self_overlap(out, "out");
  check_disjoint(out_range, q_range, "out", "q");
  check_disjoint(out_range, k_range, "out", "k");
  check_disjoint(out_range, v_range, "out", "v");
  check_disjoint(out_range, mask_range, "out", "options.mask");
  check_disjoint(out_range, bool_mask_range, "out", "options.bool_mask");
  if (lse) {
    const ByteRange lse_range = check_view(*lse, "lse");
    expect_equal(lse->shape[0], s.batch, "lse", 0, "batch, as q.shape[0]");
    expect_equal(lse->shape[1], s.q_heads, "lse", 1, "heads, as q.shape[1]");
    expect_equal(lse->shape[2], s.q_len, "lse", 2, "queries, as q.shape[2]");
    expect_equal(lse->shape[3], 1, "lse", 3, "one value per row");
    check_no_self_overlap(*lse, "lse");
    check_disjoint(lse_range, q_range, "lse", "q");
    check_disjoint(lse_range, k_range, "lse", "k");
    check_disjoint(lse_range, v_range, "lse", "v");
    check_disjoint(lse_range, out_range, "lse", "out");
    check_disjoint(lse_range, mask_range, "lse", "options.mask");
    check_disjoint(lse_range, bool_mask_range, "lse", "options.bool_mask");
  }
  return s;
}

// The combinations the public header offers.
#define FLASHCPU_VALIDATE(Q, KV)                                                                              \
  template AttentionShape validate_attention(const TensorView<const Q>&, const TensorView<const KV>&,          \
                                             const TensorView<const KV>&, const TensorView<Q>&,                \
                                             const TensorView<float>*, const AttentionOptions&);
FLASHCPU_VALIDATE(float, float)
FLASHCPU_VALIDATE(bf16, bf16)
FLASHCPU_VALIDATE(fp16, fp16)
FLASHCPU_VALIDATE(float, bf16)
FLASHCPU_VALIDATE(float, fp16)
#undef FLASHCPU_VALIDATE

template <class T>
AttentionShape validate_backward(const TensorView<const T>& q, const TensorView<const T>& k,
                                 const TensorView<const T>& v, const TensorView<const T>& out,
                                 const TensorView<const float>& lse, const TensorView<const T>& dout,
                                 const TensorView<T>& dq, const TensorView<T>& dk, const TensorView<T>& dv,
                                 const AttentionOptions& options) {
  if (options.score == Score::additive)
    fail("options.score: expected dot_product or gaussian (Score::additive has no backward yet), got additive");
  // out and lse are inputs here; the forward's checks of them (shapes, and memory disjoint
  // from q, k, v) hold for any pair a forward call wrote.
  const TensorView<T> out_view{const_cast<T*>(out.data), out.shape, out.strides};
  const TensorView<float> lse_view{const_cast<float*>(lse.data), lse.shape, lse.strides};
  const AttentionShape s = validate_attention(q, k, v, out_view, &lse_view, options);

  const ByteRange inputs[] = {check_view(q, "q"),    check_view(k, "k"),     check_view(v, "v"),
                              check_view(out, "out"), check_view(lse, "lse"), check_view(dout, "dout")};
  const char* const input_names[] = {"q", "k", "v", "out", "lse", "dout"};
  for (int d = 0; d < 4; ++d) expect_equal(dout.shape[d], out.shape[d], "dout", d, "as out");
  const ByteRange dq_range = check_view(dq, "dq"), dk_range = check_view(dk, "dk"), dv_range = check_view(dv, "dv");
  for (int d = 0; d < 4; ++d) expect_equal(dq.shape[d], q.shape[d], "dq", d, "as q");
  for (int d = 0; d < 4; ++d) expect_equal(dk.shape[d], k.shape[d], "dk", d, "as k");
  for (int d = 0; d < 4; ++d) expect_equal(dv.shape[d], v.shape[d], "dv", d, "as v");
  check_no_self_overlap(dq, "dq");
  check_no_self_overlap(dk, "dk");
  check_no_self_overlap(dv, "dv");
  ByteRange mask_range, bool_mask_range;
  if (options.mask.data) mask_range = check_view(options.mask, "options.mask");
  if (options.bool_mask.data) bool_mask_range = check_view(options.bool_mask, "options.bool_mask");
  const ByteRange grads[] = {dq_range, dk_range, dv_range};
  const char* const grad_names[] = {"dq", "dk", "dv"};
  for (int g = 0; g < 3; ++g) {
    for (int i = 0; i < 6; ++i) check_disjoint(grads[g], inputs[i], grad_names[g], input_names[i]);
    check_disjoint(grads[g], mask_range, grad_names[g], "options.mask");
    check_disjoint(grads[g], bool_mask_range, grad_names[g], "options.bool_mask");
    for (int h = 0; h < g; ++h) check_disjoint(grads[g], grads[h], grad_names[g], grad_names[h]);
  }
  return s;
}
template AttentionShape validate_backward(const TensorView<const float>&, const TensorView<const float>&,
                                          const TensorView<const float>&, const TensorView<const float>&,
                                          const TensorView<const float>&, const TensorView<const float>&,
                                          const TensorView<float>&, const TensorView<float>&,
                                          const TensorView<float>&, const AttentionOptions&);
template AttentionShape validate_backward(const TensorView<const bf16>&, const TensorView<const bf16>&,
                                          const TensorView<const bf16>&, const TensorView<const bf16>&,
                                          const TensorView<const float>&, const TensorView<const bf16>&,
                                          const TensorView<bf16>&, const TensorView<bf16>&, const TensorView<bf16>&,
                                          const AttentionOptions&);
template AttentionShape validate_backward(const TensorView<const fp16>&, const TensorView<const fp16>&,
                                          const TensorView<const fp16>&, const TensorView<const fp16>&,
                                          const TensorView<const float>&, const TensorView<const fp16>&,
                                          const TensorView<fp16>&, const TensorView<fp16>&, const TensorView<fp16>&,
                                          const AttentionOptions&);

void validate_weights(const TensorView<const float>& q, const TensorView<const float>& k,
                      const TensorView<float>& weights, const AttentionOptions& options) {
  const ByteRange w_range = check_view(weights, "weights");
  const std::array<std::int64_t, 4> expected{q.shape[0], q.shape[1], q.shape[2], k.shape[2]};
  for (int d = 0; d < 4; ++d) expect_equal(weights.shape[d], expected[d], "weights", d, "[B, Hq, N, M]");
  check_no_self_overlap(weights, "weights");
  check_disjoint(w_range, check_view(q, "q"), "weights", "q");
  check_disjoint(w_range, check_view(k, "k"), "weights", "k");
  if (options.mask.data) check_disjoint(w_range, check_view(options.mask, "options.mask"), "weights", "options.mask");
}

void validate_merge(const TensorView<float>& out, const TensorView<float>& lse, const TensorView<const float>& part_out,
                    const TensorView<const float>& part_lse) {
  const ByteRange out_range = check_view(out, "out");
  const ByteRange lse_range = check_view(lse, "lse");
  const ByteRange part_out_range = check_view(part_out, "part_out");
  const ByteRange part_lse_range = check_view(part_lse, "part_lse");
  for (int d = 0; d < 4; ++d) expect_equal(part_out.shape[d], out.shape[d], "part_out", d, "as out");
  for (int d = 0; d < 3; ++d) {
    expect_equal(lse.shape[d], out.shape[d], "lse", d, "as out");
    expect_equal(part_lse.shape[d], out.shape[d], "part_lse", d, "as out");
  }
  expect_equal(lse.shape[3], 1, "lse", 3, "one value per row");
  expect_equal(part_lse.shape[3], 1, "part_lse", 3, "one value per row");
  check_no_self_overlap(out, "out");
  check_no_self_overlap(lse, "lse");
  check_disjoint(out_range, lse_range, "out", "lse");
  check_disjoint(out_range, part_out_range, "out", "part_out");
  check_disjoint(out_range, part_lse_range, "out", "part_lse");
  check_disjoint(lse_range, part_out_range, "lse", "part_out");
  check_disjoint(lse_range, part_lse_range, "lse", "part_lse");
}

void validate_kernel_regression(const TensorView<const float>& x_query, const TensorView<const float>& x_train,
                                const TensorView<const float>& y_train, const TensorView<float>& y_pred,
                                const KernelRegressionOptions& options) {
  if (!std::isfinite(options.bandwidth) || options.bandwidth <= 0)
    fail("options.bandwidth: expected a finite value > 0, got ", options.bandwidth);
  if (options.kernel != Kernel::gaussian && options.kernel != Kernel::laplacian && options.kernel != Kernel::boxcar &&
      options.kernel != Kernel::epanechnikov)
    fail("options.kernel: expected gaussian, laplacian, boxcar or epanechnikov, got ", int(options.kernel));
  if (options.num_threads < 0) fail("options.num_threads: expected >= 0 (0: OpenMP's default), got ", options.num_threads);
  const ByteRange q_range = check_view(x_query, "x_query");
  const ByteRange t_range = check_view(x_train, "x_train");
  const ByteRange y_range = check_view(y_train, "y_train");
  const ByteRange p_range = check_view(y_pred, "y_pred");
  if (x_query.shape[3] < 1) fail("x_query.shape[3] (D): expected >= 1, got ", x_query.shape[3]);
  for (int d : {0, 1, 3}) expect_equal(x_train.shape[d], x_query.shape[d], "x_train", d, "as x_query");
  for (int d : {0, 1, 2}) expect_equal(y_train.shape[d], x_train.shape[d], "y_train", d, "as x_train");
  for (int d : {0, 1, 2}) expect_equal(y_pred.shape[d], x_query.shape[d], "y_pred", d, "as x_query");
  expect_equal(y_pred.shape[3], y_train.shape[3], "y_pred", 3, "as y_train.shape[3] (Dv)");
  check_no_self_overlap(y_pred, "y_pred");
  check_disjoint(p_range, q_range, "y_pred", "x_query");
  check_disjoint(p_range, t_range, "y_pred", "x_train");
  check_disjoint(p_range, y_range, "y_pred", "y_train");
}

}  // namespace flashcpu::detail
