// The naive oracle. Plain loops, the full N x M score matrix of a head, double sums:
// slow and memory-hungry on purpose, so it is easy to trust and to compare against.
#include <flashcpu/flashcpu.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <vector>

#include "validate.hpp"

namespace flashcpu::reference {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// 16-bit inputs widen exactly (to float, then to double); results are rounded once from
// double to the output's type (for 16-bit outputs by way of float, which can move a
// result that sits within 2^-29 of a 16-bit rounding boundary by one 16-bit ulp).
double widen(float x) { return x; }
double widen(bf16 x) { return to_float(x); }
double widen(fp16 x) { return to_float(x); }
void narrow(double x, float* out) { *out = float(x); }
void narrow(double x, bf16* out) { *out = to_bf16(float(x)); }
void narrow(double x, fp16* out) { *out = to_fp16(float(x)); }

template <class T>
double at(const TensorView<T>& view, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t c) {
  return widen(view.data[b * view.strides[0] + h * view.strides[1] + i * view.strides[2] + c * view.strides[3]]);
}

template <class T>
T mask_at(const detail::MaskView<T>& m, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
  return m.data[b * m.strides[0] + h * m.strides[1] + i * m.strides[2] + j * m.strides[3]];
}

// scale * f(q_i, k_j) of query i of head h: the score before soft-capping and the terms
// after it.
template <class Q, class KV>
double raw_score(const detail::AttentionShape& s, const TensorView<const Q>& q, const TensorView<const KV>& k,
                 std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
  const std::int64_t hk = h / (s.q_heads / s.kv_heads);
  double x = 0;
  for (std::int64_t c = 0; c < s.head_dim; ++c) {
    const double qc = at(q, b, h, i, c), kc = at(k, b, hk, j, c);
    switch (s.score) {
      case Score::dot_product: x += qc * kc; break;
      case Score::gaussian: x -= (qc - kc) * (qc - kc); break;
      case Score::additive: x += double(s.additive_weights[c]) * std::tanh(qc + kc); break;
    }
  }
  return x * double(s.scale);
}

// The score of query i of head h against key j, in the documented order; -inf when the
// key is excluded.
template <class Q, class KV>
double score(const detail::AttentionShape& s, const TensorView<const Q>& q, const TensorView<const KV>& k,
             std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
  const std::int64_t d = i + (s.kv_len - s.q_len);  // the causal diagonal of row i
  if (s.bool_mask.data && mask_at(s.bool_mask, b, h, i, j) == 0) return kNegInf;
  if (s.causal && j > d) return kNegInf;
  if (s.window_left >= 0 && j < d - s.window_left) return kNegInf;
  if (s.window_right >= 0 && j > d + s.window_right) return kNegInf;
  if (s.key_lengths && j >= s.key_lengths[b]) return kNegInf;

  double x = raw_score(s, q, k, b, h, i, j);
  if (s.softcap > 0) x = double(s.softcap) * std::tanh(x / double(s.softcap));
  if (s.alibi_slopes) x -= double(s.alibi_slopes[h]) * double(std::llabs(d - j));
  if (s.mask.data) {
    const double m = mask_at(s.mask, b, h, i, j);
    if (m == kNegInf) return kNegInf;  // excluded, whatever the score (NaN included)
    x += m;
  }
  return x;
}

int thread_count(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

// The team a parallel region of the oracle gets for `items` items: no more threads than
// items, and one inside a region that cannot nest.
int threads_for(int requested, std::int64_t items) {
  if (omp_get_active_level() >= omp_get_max_active_levels()) return 1;
  return int(std::max<std::int64_t>(1, std::min<std::int64_t>(thread_count(requested), items)));
}

// a * b elements of double, or std::bad_alloc when that overflows or no vector can hold it.
std::size_t doubles(std::int64_t a, std::int64_t b) {
  std::int64_t n = 0;
  if (__builtin_mul_overflow(a, b, &n) || n > std::int64_t(std::vector<double>().max_size())) throw std::bad_alloc();
  return std::size_t(n);
}

// The oracle's buffers are allocated per thread before its parallel regions: a failure
// (std::bad_alloc) then reaches the caller before anything is written, rather than ending
// the process inside OpenMP, and a huge stride-0 view (N x M past 2^63) cannot wrap a
// size around to a small buffer.
std::vector<std::vector<double>> thread_buffers(int threads, std::size_t count) {
  std::vector<std::vector<double>> buffers;
  buffers.reserve(std::size_t(threads));
  for (int t = 0; t < threads; ++t) buffers.emplace_back(count);
  return buffers;
}

// Shared by attention and attention_weights: per head, the full score matrix, then per
// row its softmax. `consume(b, h, i, row, sum, row_max)` gets the unnormalized weights.
template <class Q, class KV, class Consume>
void for_each_row(const detail::AttentionShape& s, const TensorView<const Q>& q, const TensorView<const KV>& k,
                  Consume consume) {
  const std::int64_t N = s.q_len, M = s.kv_len, heads = s.batch * s.q_heads;
  const int threads = threads_for(s.num_threads, heads);
  std::vector<std::vector<double>> buffers = thread_buffers(threads, doubles(N, M));
#pragma omp parallel num_threads(threads)
  {
    std::vector<double>& scores = buffers[std::size_t(omp_get_thread_num())];  // the N x M matrix of one head
#pragma omp for schedule(dynamic)
    for (std::int64_t bh = 0; bh < heads; ++bh) {
      const std::int64_t b = bh / s.q_heads, h = bh % s.q_heads;
      std::fill(scores.begin(), scores.end(), kNegInf);
      for (std::int64_t i = 0; i < N; ++i)
        for (std::int64_t j = 0; j < M; ++j) scores[std::size_t(i * M + j)] = score(s, q, k, b, h, i, j);
      for (std::int64_t i = 0; i < N; ++i) {
        double* row = scores.data() + i * M;  // no [] on an empty matrix (M = 0)
        // A sink joins the denominator as a score with no value.
        const double sink = s.sinks ? double(s.sinks[h]) : kNegInf;
        double row_max = sink;
        for (std::int64_t j = 0; j < M; ++j) row_max = std::max(row_max, row[j]);
        double sum = sink == kNegInf ? 0.0 : std::exp(sink - row_max);
        // A NaN score stays NaN (std::max skipped it), and so do the row's sum and output.
        for (std::int64_t j = 0; j < M; ++j)
          sum += (row[j] = std::isnan(row[j]) ? row[j] : row_max == kNegInf ? 0.0 : std::exp(row[j] - row_max));
        consume(b, h, i, row, sum, row_max);
      }
    }
  }
}

template <class Q, class KV>
void run(const detail::AttentionShape& s, const TensorView<const Q>& q, const TensorView<const KV>& k,
         const TensorView<const KV>& v, const TensorView<Q>& out, const TensorView<float>* lse) {
  // Nothing to write (Dv = 0, no lse): the rows are not walked, however many there are.
  if (s.empty() || (s.value_dim == 0 && !lse)) return;
  const std::int64_t M = s.kv_len, group = s.q_heads / s.kv_heads;
  for_each_row(s, q, k, [&](std::int64_t b, std::int64_t h, std::int64_t i, const double* row, double sum, double row_max) {
    for (std::int64_t c = 0; c < s.value_dim; ++c) {
      // A key with weight 0 (excluded) adds nothing, whatever its value row holds (0 * NaN
      // would be NaN); a visible NaN or inf propagates. sum is 0 exactly when the row
      // sees no key: zeros; a NaN sum (a NaN score) makes the row NaN.
      double acc = 0;
      for (std::int64_t j = 0; j < M; ++j)
        if (row[j] != 0) acc += row[j] * at(v, b, h / group, j, c);
      Q* o = out.data + b * out.strides[0] + h * out.strides[1] + i * out.strides[2] + c * out.strides[3];
      narrow(sum != 0 ? acc / sum : 0.0, o);
    }
    if (lse)
      lse->data[b * lse->strides[0] + h * lse->strides[1] + i * lse->strides[2]] =
          sum != 0 ? float(row_max + std::log(sum)) : -std::numeric_limits<float>::infinity();
  });
}

}  // namespace

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, const AttentionOptions& options) {
  run(detail::validate_attention(q, k, v, out, nullptr, options), q, k, v, out, nullptr);
}

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, TensorView<float> lse, const AttentionOptions& options) {
  run(detail::validate_attention(q, k, v, out, &lse, options), q, k, v, out, &lse);
}

#define FLASHCPU_REFERENCE_16BIT(Q, KV)                                                                        \
  void attention(TensorView<const Q> q, TensorView<const KV> k, TensorView<const KV> v, TensorView<Q> out,      \
                 const AttentionOptions& options) {                                                          \
    run(detail::validate_attention(q, k, v, out, nullptr, options), q, k, v, out, nullptr);                    \
  }                                                                                                          \
  void attention(TensorView<const Q> q, TensorView<const KV> k, TensorView<const KV> v, TensorView<Q> out,      \
                 TensorView<float> lse, const AttentionOptions& options) {                                   \
    run(detail::validate_attention(q, k, v, out, &lse, options), q, k, v, out, &lse);                         \
  }
FLASHCPU_REFERENCE_16BIT(bf16, bf16)
FLASHCPU_REFERENCE_16BIT(fp16, fp16)
FLASHCPU_REFERENCE_16BIT(float, bf16)
FLASHCPU_REFERENCE_16BIT(float, fp16)
#undef FLASHCPU_REFERENCE_16BIT

void attention_backward(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
                        TensorView<const float> out, TensorView<const float> lse, TensorView<const float> dout,
                        TensorView<float> dq, TensorView<float> dk, TensorView<float> dv,
                        const AttentionOptions& options) {
  const detail::AttentionShape s = detail::validate_backward(q, k, v, out, lse, dout, dq, dk, dv, options);
  const std::int64_t B = s.batch, Hkv = s.kv_heads, N = s.q_len, M = s.kv_len, D = s.head_dim, Dv = s.value_dim;
  const std::int64_t group = Hkv > 0 ? s.q_heads / Hkv : 1;
  auto put = [](const TensorView<float>& t, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t c, double x) {
    t.data[b * t.strides[0] + h * t.strides[1] + i * t.strides[2] + c * t.strides[3]] = float(x);
  };
  // Every element is written: queries of heads with no KV head (none exist when Hq > 0)
  // aside, each (b, KV head) item below owns its group's dq rows and its own dk, dv rows.
  const int threads = threads_for(s.num_threads, B * Hkv);
  std::vector<std::vector<double>> dk_accs = thread_buffers(threads, doubles(M, D));
  std::vector<std::vector<double>> dv_accs = thread_buffers(threads, doubles(M, Dv));
  std::vector<std::vector<double>> ps = thread_buffers(threads, doubles(M, 1));
  std::vector<std::vector<double>> dps = thread_buffers(threads, doubles(M, 1));
  std::vector<std::vector<double>> dq_rows = thread_buffers(threads, doubles(D, 1));
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (std::int64_t bk = 0; bk < B * Hkv; ++bk) {
    const std::int64_t b = bk / Hkv, hk = bk % Hkv;
    const std::size_t t = std::size_t(omp_get_thread_num());
    std::vector<double>&dk_acc = dk_accs[t], &dv_acc = dv_accs[t], &p = ps[t], &dp = dps[t], &dq_row = dq_rows[t];
    std::fill(dk_acc.begin(), dk_acc.end(), 0.0);
    std::fill(dv_acc.begin(), dv_acc.end(), 0.0);
    // Without query rows there is nothing to visit, however many heads a group has.
    for (std::int64_t g = 0; g < (N > 0 ? group : 0); ++g) {
      const std::int64_t h = hk * group + g;
      for (std::int64_t i = 0; i < N; ++i) {
        // The row's softmax in double (a sink counts in the denominator, with no value).
        const double sink = s.sinks ? double(s.sinks[h]) : kNegInf;
        double row_max = sink;
        for (std::int64_t j = 0; j < M; ++j) {
          p[std::size_t(j)] = score(s, q, k, b, h, i, j);
          row_max = std::max(row_max, p[std::size_t(j)]);
        }
        double sum = sink == kNegInf ? 0.0 : std::exp(sink - row_max);
        for (std::int64_t j = 0; j < M; ++j) {
          double& x = p[std::size_t(j)];
          x = x == kNegInf ? 0.0 : std::exp(x - row_max);
          sum += x;
        }
        for (std::int64_t c = 0; c < D; ++c) dq_row[std::size_t(c)] = 0;
        if (sum != 0) {  // a NaN sum (a NaN score) makes the row's gradients NaN, as its output
          // dP_ij = dO_i . v_j; D_i = sum_j P_ij dP_ij (= dO_i . out_i); dS = P (dP - D_i).
          double delta = 0;
          for (std::int64_t j = 0; j < M; ++j) {
            double& w = p[std::size_t(j)];
            // An excluded key keeps weight 0 when a NaN score makes the sum NaN: it gets no
            // gradient from the row, as the rule above says (0 / NaN would be NaN).
            if (w != 0) w /= sum;
            double x = 0;
            if (w != 0)
              for (std::int64_t c = 0; c < Dv; ++c) x += at(dout, b, h, i, c) * at(v, b, hk, j, c);
            dp[std::size_t(j)] = x;
            delta += w * x;
          }
          for (std::int64_t j = 0; j < M; ++j) {
            const double w = p[std::size_t(j)];
            if (w == 0) continue;  // excluded (or underflowed): no gradient, whatever k_j, v_j hold
            double ds = w * (dp[std::size_t(j)] - delta);
            if (s.softcap > 0) {  // through c tanh(r / c): times 1 - tanh^2(r / c)
              const double t = std::tanh(raw_score(s, q, k, b, h, i, j) / double(s.softcap));
              ds *= 1 - t * t;
            }
            for (std::int64_t c = 0; c < Dv; ++c) dv_acc[std::size_t(j * Dv + c)] += w * at(dout, b, h, i, c);
            for (std::int64_t c = 0; c < D; ++c) {
              const double qc = at(q, b, h, i, c), kc = at(k, b, hk, j, c);
              // d(scale q.k) = scale (k dq + q dk); d(-scale |q - k|^2) = -2 scale (q - k)(dq - dk).
              const double gq = s.score == Score::gaussian ? -2.0 * (qc - kc) : kc;
              const double gk = s.score == Score::gaussian ? 2.0 * (qc - kc) : qc;
              dq_row[std::size_t(c)] += ds * double(s.scale) * gq;
              dk_acc[std::size_t(j * D + c)] += ds * double(s.scale) * gk;
            }
          }
        }
        for (std::int64_t c = 0; c < D; ++c) put(dq, b, h, i, c, dq_row[std::size_t(c)]);
      }
    }
    for (std::int64_t j = 0; j < M; ++j) {
      for (std::int64_t c = 0; c < D; ++c) put(dk, b, hk, j, c, dk_acc[std::size_t(j * D + c)]);
      for (std::int64_t c = 0; c < Dv; ++c) put(dv, b, hk, j, c, dv_acc[std::size_t(j * Dv + c)]);
    }
  }
}

void attention_weights(TensorView<const float> q, TensorView<const float> k, TensorView<float> weights,
                       const AttentionOptions& options) {
  // Checked as attention without values (Dv = 0), plus the weights view itself.
  const TensorView<const float> no_values{k.data, {k.shape[0], k.shape[1], k.shape[2], 0}, k.strides};
  const TensorView<float> no_out{nullptr, {q.shape[0], q.shape[1], q.shape[2], 0}, {0, 0, 0, 0}};
  const detail::AttentionShape s = detail::validate_attention(q, k, no_values, no_out, nullptr, options);
  detail::validate_weights(q, k, weights, options);
  const std::int64_t M = s.kv_len;
  if (s.empty() || M == 0) return;  // no weight to write, however many rows
  for_each_row(s, q, k, [&](std::int64_t b, std::int64_t h, std::int64_t i, const double* row, double sum, double) {
    float* w = weights.data + b * weights.strides[0] + h * weights.strides[1] + i * weights.strides[2];
    for (std::int64_t j = 0; j < M; ++j) w[j * weights.strides[3]] = sum > 0 ? float(row[j] / sum) : 0.0f;
  });
}

void nadaraya_watson(TensorView<const float> x_query, TensorView<const float> x_train, TensorView<const float> y_train,
                     TensorView<float> y_pred, const KernelRegressionOptions& options) {
  detail::validate_kernel_regression(x_query, x_train, y_train, y_pred, options);
  const std::int64_t B = x_query.shape[0], H = x_query.shape[1], N = x_query.shape[2], M = x_train.shape[2];
  const std::int64_t D = x_query.shape[3], Dv = y_train.shape[3];
  // Nothing to write: the rows are not walked, however many a stride-0 x_query has.
  if (B == 0 || H == 0 || N == 0 || Dv == 0) return;
  const double h = options.bandwidth;
  // log K(u) for each kernel; weights are exp(log K - max log K) so that a Gaussian
  // whose every value underflows still picks its nearest points.
  auto log_kernel = [&](double u) {
    switch (options.kernel) {
      case Kernel::gaussian: return -0.5 * u * u;
      case Kernel::laplacian: return -u;
      case Kernel::boxcar: return u <= 1 ? 0.0 : kNegInf;
      case Kernel::epanechnikov: return u < 1 ? std::log(1 - u * u) : kNegInf;
    }
    return kNegInf;
  };
  const int threads = threads_for(options.num_threads, B * H * N);
  std::vector<std::vector<double>> logks = thread_buffers(threads, doubles(M, 1));
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads)
  for (std::int64_t bh = 0; bh < B * H; ++bh)
    for (std::int64_t i = 0; i < N; ++i) {
      const std::int64_t b = bh / H, hh = bh % H;
      std::vector<double>& logk = logks[std::size_t(omp_get_thread_num())];
      double best = kNegInf;
      for (std::int64_t j = 0; j < M; ++j) {
        double dist2 = 0;
        for (std::int64_t c = 0; c < D; ++c) {
          const double diff = at(x_query, b, hh, i, c) - at(x_train, b, hh, j, c);
          dist2 += diff * diff;
        }
        logk[std::size_t(j)] = log_kernel(std::sqrt(dist2) / h);
        best = std::max(best, logk[std::size_t(j)]);
      }
      for (std::int64_t c = 0; c < Dv; ++c) {
        double num = 0, den = 0;
        if (best != kNegInf)
          for (std::int64_t j = 0; j < M; ++j) {
            const double w = std::exp(logk[std::size_t(j)] - best);
            num += w * at(y_train, b, hh, j, c);
            den += w;
          }
        y_pred.data[b * y_pred.strides[0] + hh * y_pred.strides[1] + i * y_pred.strides[2] + c * y_pred.strides[3]] =
            den > 0 ? float(num / den) : std::numeric_limits<float>::quiet_NaN();  // no point in the support
      }
    }
}

}  // namespace flashcpu::reference
