// The score functions and kernel regression against their oracles: dot-product, Gaussian
// and additive (Bahdanau) scores over randomized shapes (D = 1 and D not a multiple of
// any vector width, prefill and decode, with causal, a mask and lse); the Gaussian where
// every weight but the nearest underflows and on data far from the origin; the additive
// score's weights; reference::attention_weights; Nadaraya-Watson with each kernel, empty
// neighbourhoods, huge distances, a hand-checked case and bad bandwidths.
//
// The attention helpers (Problem, row_scores, expect, compare) are the ones of
// test_options.cpp, repeated here (a shared header would be a file outside this change);
// their tolerance is documented below.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "util.hpp"

namespace {

using flashcpu::AttentionOptions;
using flashcpu::Score;
using flashcpu::TensorView;
using ftest::Layout;
using ftest::Shape;
using ftest::Tensor;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kSentinel = -31415.5f;   // what out and lse hold before a call
constexpr double kU = 1.0 / 16777216.0;  // 2^-24, fp32 unit roundoff

// ---------------------------------------------------------------------------------
// Tolerance of the fused kernel against reference::attention (double, rounded once).
//
// The fused kernel computes in fp32 (u = 2^-24): the raw score (a length-D dot product,
// a Gaussian distance from exact differences or expanded around a center, or D tanh
// terms), then soft-capping, ALiBi and the mask in natural units, a multiply by log2(e),
// the running-max subtraction and a polynomial exp2 good to ~1 ulp, with online rescaling
// over key blocks and, on the decode path, a log-sum-exp merge of split-KV chunks. Per
// visible key j of a row, the absolute error of the score (natural units) is bounded by
//
//   Δ_j = u · ((D + 10)·a_j + 8·(|alibi_j| + |mask_j| + |s_j| + |m|) + 16)
//
// where a_j bounds the magnitude of the raw score's terms (dot: |scale|·Σ_d|q_d k_jd|;
// Gaussian: 4·scale·diam², diam the diagonal of the bounding box of the head's keys and
// the query, which holds for exact differences and for an expansion centered anywhere
// inside the data, but not for |q|² − 2q·k + |k|² about a far-away origin; additive:
// |scale|·Σ_d|w_d|, the +8 in D + 10 covering tanh's few ulp), s_j is the final score and
// m the row max: γ_D for the sum, a few roundings for each later term, exp2's own error.
// A score error δs_j moves the weights by δw_j = w_j (δs_j − Σ_k w_k δs_k), so
//
//   |out_c − ref_c| <= kAtol·Σ_j w_j|v_jc| + kRtol·|ref_c| + Σ_j coef_j |v_jc − ref_c|
//
// with coef_j = w_j (Δ_j + Δ̄) to first order (Δ̄ = Σ w_j Δ_j; weight_perturbation below
// has the exact form, valid for large Δ too). kAtol = 1e-5 (168 u) covers the fp32
// accumulation of Σ p_j v_jc with its α rescales over <= 5000 keys (sums of mixed-sign
// terms err like √M·u, 4e-6 at M = 5000); kRtol = 2e-5 covers the relative error of the
// fp32 row sum l (about M/W + M/Bk sequential adds of positive terms, plus exp2's ~1 ulp
// per term) and the final division. So out's error is ~1e-5·max|v| for well-conditioned
// rows, grows with the score magnitude through Δ_j, and stays tight for nearly one-hot
// rows (w_j ≈ 0 or v_jc ≈ ref_c). For lse,
//
//   |lse − ref_lse| <= max(Δ̄, log Σ_j w_j e^{Δ_j}) + kLseAtol + 4u·|ref_lse|
//
// (d lse = Σ_j w_j δs_j to first order, i.e. Δ̄; kLseAtol the relative error of l, which
// is absolute in its log; then the rounding of lse itself). A row with no visible key must
// be exactly 0 and -inf. The scores s_j and weights w_j are the test's own (row_scores
// below, in double, from the documented semantics), which also checks the reference: its
// out and lse must agree with them to a few float ulp. Observed errors on the tests below
// stay under ~5% of this bound on every ISA.
// ---------------------------------------------------------------------------------
constexpr double kAtol = 1e-5;
constexpr double kRtol = 2e-5;
constexpr double kLseAtol = 2e-5;

struct Dims {
  std::int64_t B, Hq, Hkv, N, M, D, Dv;
};

std::string str(const Dims& d) {
  std::ostringstream os;
  os << "B=" << d.B << " Hq=" << d.Hq << " Hkv=" << d.Hkv << " N=" << d.N << " M=" << d.M << " D=" << d.D
     << " Dv=" << d.Dv;
  return os.str();
}

// Element (b, h, i, j) of a mask view broadcast to [B, Hq, N, M] (a size-1 dim reads index 0).
template <class T>
T mask_at(const TensorView<const T>& m, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
  const std::int64_t idx[4] = {b, h, i, j};
  std::int64_t offset = 0;
  for (int d = 0; d < 4; ++d) offset += (m.shape[d] == 1 ? 0 : idx[d]) * m.strides[d];
  return m.data[offset];
}

float elem(const TensorView<const float>& t, std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) {
  return t.data[b * t.strides[0] + h * t.strides[1] + s * t.strides[2] + d * t.strides[3]];
}

// A view with the given shape and strides into `buf`, which is resized to hold it (plus
// `offset` leading and some trailing elements, all `pad`); every element of the view is
// set to gen(b, h, i, j) (with 0 strides, the last write of a shared slot wins: fused and
// reference read the same memory).
template <class T, class Gen>
TensorView<const T> make_view(std::vector<T>& buf, Shape shape, Shape strides, std::int64_t offset, T pad, Gen gen) {
  std::int64_t extent = 1;
  for (int d = 0; d < 4; ++d)
    if (shape[d] > 0) extent += (shape[d] - 1) * strides[d];
  buf.assign(static_cast<std::size_t>(offset + extent + 9), pad);
  for (std::int64_t b = 0; b < shape[0]; ++b)
    for (std::int64_t h = 0; h < shape[1]; ++h)
      for (std::int64_t i = 0; i < shape[2]; ++i)
        for (std::int64_t j = 0; j < shape[3]; ++j)
          buf[static_cast<std::size_t>(offset + b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3])] =
              gen(b, h, i, j);
  return {buf.data() + offset, shape, strides};
}

Shape contiguous(Shape s) { return {s[1] * s[2] * s[3], s[2] * s[3], s[3], 1}; }

// q, k, v (padding NaN), out and lse (padding kSentinel), the options and the storage
// they point to.
struct Problem {
  Dims d;
  std::uint32_t seed;
  Layout layout;
  Tensor q, k, v, out, lse;
  AttentionOptions opt;
  std::vector<float> mask_buf, slopes, add_w;
  std::vector<std::uint8_t> bool_buf;
  std::vector<std::int32_t> lengths;
  std::string what;  // the options, for the report
  std::mt19937 rng;

  Problem(const Dims& dims, std::uint32_t seed_, Layout in = Layout::padded, Layout outs = Layout::padded,
          float qk_lo = -1.0f, float qk_hi = 1.0f)
      : d(dims),
        seed(seed_),
        layout(in),
        q({d.B, d.Hq, d.N, d.D}, in, kNaN),
        k({d.B, d.Hkv, d.M, d.D}, in, kNaN),
        v({d.B, d.Hkv, d.M, d.Dv}, in, kNaN),
        out({d.B, d.Hq, d.N, d.Dv}, outs, kSentinel),
        lse({d.B, d.Hq, d.N, 1}, outs, kSentinel),
        rng(seed_) {
    q.fill_uniform(rng, qk_lo, qk_hi);
    k.fill_uniform(rng, qk_lo, qk_hi);
    v.fill_uniform(rng, -1.0f, 1.0f);
  }
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;

  void note(const std::string& s) { what += (what.empty() ? "" : ", ") + s; }

  // Additive mask [B, Hq, N, M], values in [lo, hi], -inf with probability p_inf.
  void full_mask(double p_inf, float lo = -3.0f, float hi = 3.0f) {
    std::uniform_real_distribution<float> val(lo, hi);
    std::uniform_real_distribution<double> coin(0, 1);
    const Shape shape{d.B, d.Hq, d.N, d.M};
    opt.mask = make_view<float>(mask_buf, shape, contiguous(shape), 0, kNaN,
                                [&](auto, auto, auto, auto) { return coin(rng) < p_inf ? -kInf : val(rng); });
    note("mask [B,Hq,N,M] in [" + std::to_string(lo) + ", " + std::to_string(hi) +
         "], p(-inf)=" + std::to_string(p_inf));
  }
  // Boolean mask [B, Hq, N, M], zero (excluded) with probability p_zero.
  void full_bool(double p_zero) {
    std::uniform_real_distribution<double> coin(0, 1);
    const Shape shape{d.B, d.Hq, d.N, d.M};
    opt.bool_mask = make_view<std::uint8_t>(bool_buf, shape, contiguous(shape), 0, 0, [&](auto, auto, auto, auto) {
      return std::uint8_t(coin(rng) < p_zero ? 0 : 1 + rng() % 255);
    });
    note("bool_mask [B,Hq,N,M] p(0)=" + std::to_string(p_zero));
  }
  void key_lengths(std::vector<std::int32_t> l) {
    lengths = std::move(l);
    opt.key_lengths = lengths.data();
    std::string s = "key_lengths {";
    for (auto x : lengths) s += std::to_string(x) + " ";
    note(s + "}");
  }
  // ALiBi slopes 2^(-8 (h + 1) / Hq), as in the paper.
  void alibi() {
    slopes.resize(static_cast<std::size_t>(d.Hq));
    for (std::int64_t h = 0; h < d.Hq; ++h) slopes[std::size_t(h)] = std::exp2(-8.0f * float(h + 1) / float(d.Hq));
    opt.alibi_slopes = slopes.data();
    note("alibi");
  }
  void causal() { opt.causal = true, note("causal"); }
  void window(std::int64_t left, std::int64_t right) {
    opt.window_left = left, opt.window_right = right;
    note("window [" + std::to_string(left) + ", " + std::to_string(right) + "]");
  }
  void softcap(float c) { opt.softcap = c, note("softcap " + std::to_string(c)); }
  void scale(float s) { opt.scale = s, note("scale " + std::to_string(s)); }
  void gaussian() { opt.score = Score::gaussian, note("score gaussian"); }
  // Score::additive with D weights in [-1, 1].
  void additive() {
    std::uniform_real_distribution<float> val(-1.0f, 1.0f);
    add_w.resize(std::size_t(d.D));
    for (auto& x : add_w) x = val(rng);
    opt.score = Score::additive;
    opt.additive_weights = add_w.data();
    note("score additive");
  }

  std::string describe() const {
    std::ostringstream os;
    os << str(d) << " layout=" << ftest::layout_name(layout) << " seed=" << seed << " isa=" << flashcpu::active_isa()
       << " options: " << (what.empty() ? "none" : what);
    return os.str();
  }
};

// The worst element of one comparison.
struct Worst {
  double ratio = -1, got = 0, want = 0, tol = 0;
  std::int64_t b = 0, h = 0, i = 0, c = 0, bad = 0, count = 0;
  void record(double got_, double want_, double tol_, std::int64_t b_, std::int64_t h_, std::int64_t i_,
              std::int64_t c_) {
    ++count;
    double r;
    if (std::isinf(want_) || std::isnan(want_))  // -inf lse (or NaN): only itself matches
      r = (got_ == want_ || (std::isnan(got_) && std::isnan(want_))) ? 0 : std::numeric_limits<double>::infinity();
    else if (std::isnan(got_))
      r = std::numeric_limits<double>::infinity();
    else {
      const double err = std::fabs(got_ - want_);
      r = tol_ > 0 ? err / tol_ : (err == 0 ? 0 : std::numeric_limits<double>::infinity());
    }
    if (r > 1) ++bad;
    if (r > ratio) ratio = r, got = got_, want = want_, tol = tol_, b = b_, h = h_, i = i_, c = c_;
  }
  std::string text(const char* name, const char* got_name = "fused", const char* want_name = "reference") const {
    std::ostringstream os;
    os.precision(9);
    os << name << ": " << count << " elements, " << bad << " out of tolerance; worst at (b, h, i, c) = (" << b << ", "
       << h << ", " << i << ", " << c << "): " << got_name << " = " << got << ", " << want_name << " = " << want
       << ", |diff| = " << std::fabs(got - want) << ", tol = " << tol << ", |diff|/tol = " << ratio;
    return os.str();
  }
};

// The scores of row (b, h, i) against every key, in double, by the documented order:
// f(q, k)·scale; soft-capping; ALiBi; + mask; then the exclusions (-inf). Used for the
// tolerance (independently of the oracle under test) and to check the oracle itself.
// Also a_dot[j] = |scale|·Σ_d |q_d k_jd| for the dot product (the magnitude of its terms).
void row_scores(const TensorView<const float>& q, const TensorView<const float>& k, const AttentionOptions& opt,
                const Dims& d, double scale, std::int64_t b, std::int64_t h, std::int64_t i, std::vector<double>& s,
                std::vector<double>& a_dot) {
  const std::int64_t g = h / (d.Hq / d.Hkv), diag = i + d.M - d.N;
  const float* qr = q.data + b * q.strides[0] + h * q.strides[1] + i * q.strides[2];
  const std::int64_t qs = q.strides[3];
  for (std::int64_t j = 0; j < d.M; ++j) {
    const bool excluded = (opt.bool_mask.data && mask_at(opt.bool_mask, b, h, i, j) == 0) || (opt.causal && j > diag) ||
                          (opt.window_left >= 0 && j < diag - opt.window_left) ||
                          (opt.window_right >= 0 && j > diag + opt.window_right) ||
                          (opt.key_lengths && j >= opt.key_lengths[b]);
    if (excluded) {
      s[std::size_t(j)] = -std::numeric_limits<double>::infinity();
      continue;
    }
    double x = 0, a = 0;
    const float* kr = k.data + b * k.strides[0] + g * k.strides[1] + j * k.strides[2];
    const std::int64_t ks = k.strides[3];
    switch (opt.score) {
      case Score::dot_product:
        for (std::int64_t c = 0; c < d.D; ++c) {
          const double p = double(qr[c * qs]) * double(kr[c * ks]);
          x += p, a += std::fabs(p);
        }
        break;
      case Score::gaussian:
        for (std::int64_t c = 0; c < d.D; ++c) {
          const double t = double(qr[c * qs]) - double(kr[c * ks]);
          x -= t * t;
        }
        break;
      case Score::additive:
        for (std::int64_t c = 0; c < d.D; ++c)
          x += double(opt.additive_weights[c]) * std::tanh(double(qr[c * qs]) + double(kr[c * ks]));
        break;
    }
    a_dot[std::size_t(j)] = std::fabs(scale) * a;
    x *= scale;
    if (opt.softcap > 0) x = double(opt.softcap) * std::tanh(x / double(opt.softcap));
    if (opt.alibi_slopes) x -= double(opt.alibi_slopes[h]) * double(std::llabs(diag - j));
    if (opt.mask.data) x += double(mask_at(opt.mask, b, h, i, j));
    s[std::size_t(j)] = x;
  }
}

// How far the weights can move when each visible key's score (log weight) may be off by
// up to Δ_j: with w̃_j = w_j e^{δ_j} / S, S = Σ_k w_k e^{δ_k} in [e^{-Δ̄}, E] (Jensen; E =
// Σ_k w_k e^{Δ_k}), |w̃_j − w_j| <= w_j · max(e^{Δ_j + Δ̄} − 1, 1 − e^{−Δ_j} / E) =: coef_j,
// and |lse error| <= max(Δ̄, log E). To first order coef_j = w_j (Δ_j + Δ̄) and the lse bound
// is Δ̄; the exact form keeps the bound valid when Δ is not small (huge scores), where a key
// whose exact weight underflows can still take over. Inputs: log weights lw_j (−inf for
// excluded keys) and Δ_j; computed in the log domain so that nothing overflows to NaN.
double weight_perturbation(const std::vector<double>& lw, const std::vector<double>& delta, std::int64_t M,
                           std::vector<double>& coef) {
  const double inf = std::numeric_limits<double>::infinity();
  double delta_bar = 0, log_e = -inf;
  for (std::int64_t j = 0; j < M; ++j) {
    const double l = lw[std::size_t(j)];
    if (l == -inf) continue;
    delta_bar += std::exp(l) * delta[std::size_t(j)];
    const double t = l + delta[std::size_t(j)];
    log_e = std::max(log_e, t) + std::log1p(std::exp(-std::fabs(log_e - t)));  // log(e^log_e + e^t)
  }
  for (std::int64_t j = 0; j < M; ++j) {
    const double l = lw[std::size_t(j)];
    if (l == -inf) {
      coef[std::size_t(j)] = 0;
      continue;
    }
    const double up = delta[std::size_t(j)] + delta_bar;  // log(e^up - 1) = up + log(-expm1(-up))
    const double log_up = up > 0 ? up + std::log(-std::expm1(-up)) : -inf;
    const double down = -std::expm1(-delta[std::size_t(j)] - log_e);
    const double log_f = std::max(log_up, down > 0 ? std::log(down) : -inf);
    coef[std::size_t(j)] = std::exp(l + log_f);
  }
  return std::max(delta_bar, log_e);
}

// The reference result of one call and the per-element tolerance of the fused one.
struct Expected {
  Dims d;
  std::vector<float> out, lse;  // reference::attention, contiguous [B, Hq, N, Dv] and [B, Hq, N]
  std::vector<double> out_tol, lse_tol;
  std::int64_t empty_rows = 0;
  std::string error;       // the reference threw
  std::string ref_report;  // the reference disagrees with row_scores' softmax (empty: agrees)
};

Expected expect(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
                const AttentionOptions& opt) {
  Expected e;
  const Dims d{q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]};
  e.d = d;
  const std::int64_t rows = d.B * d.Hq * d.N;
  e.out.assign(std::size_t(std::max<std::int64_t>(rows * d.Dv, 1)), kNaN);
  e.lse.assign(std::size_t(std::max<std::int64_t>(rows, 1)), kNaN);
  e.out_tol.assign(e.out.size(), 0.0);
  e.lse_tol.assign(e.lse.size(), 0.0);
  try {
    flashcpu::reference::attention(q, k, v, flashcpu::bhsd(e.out.data(), d.B, d.Hq, d.N, d.Dv),
                                   flashcpu::bhsd(e.lse.data(), d.B, d.Hq, d.N, 1), opt);
  } catch (const std::exception& ex) {
    e.error = ex.what();
    return e;
  }
  // The scale as the library resolves it (a float; 1/sqrt(D) rounded to float).
  const double scale = opt.scale                         ? double(*opt.scale)
                       : opt.score == Score::dot_product ? double(float(1.0 / std::sqrt(double(d.D))))
                       : opt.score == Score::gaussian    ? 0.5
                                                         : 1.0;
  double add_sum = 0;
  if (opt.score == Score::additive && opt.additive_weights)
    for (std::int64_t c = 0; c < d.D; ++c) add_sum += std::fabs(double(opt.additive_weights[c]));
  const std::int64_t group = d.Hq / d.Hkv;
  const std::size_t Ms = std::size_t(std::max<std::int64_t>(d.M, 1));
  const std::size_t Dvs = std::size_t(std::max<std::int64_t>(d.Dv, 1));
  std::vector<double> lo(std::size_t(d.D)), hi(std::size_t(d.D)), s(Ms), w(Ms), delta(Ms), a_dot(Ms), lw(Ms), coef(Ms);
  std::vector<double> mine(Dvs), mag(Dvs), dev(Dvs), dev_ref(Dvs);
  Worst ref_out, ref_lse;
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h) {
      const std::int64_t g = h / group;
      if (opt.score == Score::gaussian) {  // the bounding box of the head's keys
        std::fill(lo.begin(), lo.end(), std::numeric_limits<double>::infinity());
        std::fill(hi.begin(), hi.end(), -std::numeric_limits<double>::infinity());
        for (std::int64_t j = 0; j < d.M; ++j)
          for (std::int64_t c = 0; c < d.D; ++c) {
            lo[std::size_t(c)] = std::min(lo[std::size_t(c)], double(elem(k, b, g, j, c)));
            hi[std::size_t(c)] = std::max(hi[std::size_t(c)], double(elem(k, b, g, j, c)));
          }
      }
      for (std::int64_t i = 0; i < d.N; ++i) {
        const std::int64_t row = (b * d.Hq + h) * d.N + i;
        row_scores(q, k, opt, d, scale, b, h, i, s, a_dot);
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < d.M; ++j) m = std::max(m, s[std::size_t(j)]);
        if (m == -std::numeric_limits<double>::infinity()) {  // no visible key: exact zeros and -inf
          ++e.empty_rows;
          for (std::int64_t c = 0; c < d.Dv; ++c)
            ref_out.record(e.out[std::size_t(row * d.Dv + c)], 0.0, 0.0, b, h, i, c);
          ref_lse.record(e.lse[std::size_t(row)], -std::numeric_limits<double>::infinity(), 0.0, b, h, i, 0);
          continue;
        }
        double sum = 0;
        for (std::int64_t j = 0; j < d.M; ++j) sum += (w[std::size_t(j)] = std::exp(s[std::size_t(j)] - m));
        const double L = m + std::log(sum);
        double a_gauss = 0;
        if (opt.score == Score::gaussian) {
          double diam2 = 0;
          for (std::int64_t c = 0; c < d.D; ++c) {
            const double x = elem(q, b, h, i, c);
            const double ext = std::max(hi[std::size_t(c)], x) - std::min(lo[std::size_t(c)], x);
            diam2 += ext * ext;
          }
          a_gauss = 4 * std::fabs(scale) * diam2;
        }
        const std::int64_t diag = i + d.M - d.N;
        double s_bar = 0;
        for (std::int64_t j = 0; j < d.M; ++j) {
          const double sj = s[std::size_t(j)];
          w[std::size_t(j)] /= sum;
          lw[std::size_t(j)] = sj - L;
          if (sj == -std::numeric_limits<double>::infinity()) continue;
          double a = 0;
          switch (opt.score) {
            case Score::dot_product: a = a_dot[std::size_t(j)]; break;
            case Score::gaussian: a = a_gauss; break;
            case Score::additive: a = std::fabs(scale) * add_sum; break;
          }
          double t = 0;
          if (opt.alibi_slopes) t += std::fabs(double(opt.alibi_slopes[h]) * double(std::llabs(diag - j)));
          if (opt.mask.data) t += std::fabs(double(mask_at(opt.mask, b, h, i, j)));
          delta[std::size_t(j)] = kU * (double(d.D + 10) * a + 8 * (t + std::fabs(sj) + std::fabs(m)) + 16);
          s_bar += w[std::size_t(j)] * (std::fabs(sj) + std::fabs(m) + 1);
        }
        const double lse_bound = weight_perturbation(lw, delta, d.M, coef);
        e.lse_tol[std::size_t(row)] = lse_bound + kLseAtol + 4 * kU * std::fabs(L);
        ref_lse.record(e.lse[std::size_t(row)], L, 4 * kU * std::fabs(L) + 1e-12 * s_bar, b, h, i, 0);
        std::fill(mine.begin(), mine.end(), 0.0), std::fill(mag.begin(), mag.end(), 0.0);
        std::fill(dev.begin(), dev.end(), 0.0), std::fill(dev_ref.begin(), dev_ref.end(), 0.0);
        const float* r = &e.out[std::size_t(row * d.Dv)];
        for (std::int64_t j = 0; j < d.M; ++j) {
          const double wj = w[std::size_t(j)], cj = coef[std::size_t(j)];
          if (!(wj > 0) && !(cj > 0)) continue;
          const double rj = wj * (std::fabs(s[std::size_t(j)]) + std::fabs(m) + 1);
          const float* vj = v.data + b * v.strides[0] + g * v.strides[1] + j * v.strides[2];
          for (std::int64_t c = 0; c < d.Dv; ++c) {
            const double x = vj[c * v.strides[3]], spread = std::fabs(x - double(r[c]));
            mine[std::size_t(c)] += wj * x;
            mag[std::size_t(c)] += wj * std::fabs(x);
            if (spread > 0) dev[std::size_t(c)] += cj * spread;  // cj may be inf
            dev_ref[std::size_t(c)] += rj * spread;
          }
        }
        for (std::int64_t c = 0; c < d.Dv; ++c) {
          const std::size_t cs = std::size_t(c);
          e.out_tol[std::size_t(row * d.Dv + c)] = kAtol * mag[cs] + kRtol * std::fabs(double(r[c])) + dev[cs];
          // Both in double, rounded once: the reference must agree to a few float ulp.
          ref_out.record(r[c], mine[cs], 4 * kU * std::fabs(mine[cs]) + 1e-9 * mag[cs] + 1e-12 * dev_ref[cs], b, h, i,
                         c);
        }
      }
    }
  if (ref_out.bad || ref_lse.bad)
    e.ref_report = "REFERENCE DISAGREES with the test's own double softmax of the documented scores:\n  " +
                   ref_out.text("out", "reference", "test") + "\n  " + ref_lse.text("lse", "reference", "test");
  return e;
}

struct Outcome {
  bool ok = true;
  std::string report;
  double out_ratio = 0, lse_ratio = 0;
};

// Compares a fused out (and lse, when given) with the expectation.
Outcome compare(const Expected& e, TensorView<const float> out, const TensorView<const float>* lse) {
  Outcome o;
  if (!e.error.empty()) return {false, "reference threw: " + e.error};
  if (!e.ref_report.empty()) return {false, e.ref_report};
  Worst wo, wl;
  const Dims& d = e.d;
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < d.N; ++i) {
        const std::int64_t row = (b * d.Hq + h) * d.N + i;
        for (std::int64_t c = 0; c < d.Dv; ++c) {
          const std::size_t at = std::size_t(row * d.Dv + c);
          wo.record(elem(out, b, h, i, c), e.out[at], e.out_tol[at], b, h, i, c);
        }
        if (lse) wl.record(elem(*lse, b, h, i, 0), e.lse[std::size_t(row)], e.lse_tol[std::size_t(row)], b, h, i, 0);
      }
  o.ok = wo.bad == 0 && wl.bad == 0;
  o.out_ratio = wo.ratio, o.lse_ratio = wl.ratio;
  o.report = wo.text("out") + "\n" + (lse ? wl.text("lse") : std::string("lse: not compared")) +
             "\nrows with no visible key (reference): " + std::to_string(e.empty_rows);
  return o;
}

// Runs the fused kernel on the problem (both overloads: the one without lse must give the
// same out bitwise) and compares with the reference. `empty_rows` receives the reference's
// count of rows with no visible key.
Outcome run_check(Problem& p, std::int64_t* empty_rows = nullptr) {
  std::mt19937 unused;
  p.out.fill_uniform(unused, kSentinel, kSentinel);
  p.lse.fill_uniform(unused, kSentinel, kSentinel);
  Tensor out2(p.out.shape(), Layout::bhsd, kSentinel);
  try {
    flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
    flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), out2.view(), p.opt);
  } catch (const std::exception& ex) {
    return {false, std::string("flashcpu::attention threw: ") + ex.what()};
  }
  const Expected e = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
  if (empty_rows) *empty_rows = e.empty_rows;
  const TensorView<const float> lse = p.lse.cview();
  Outcome o = compare(e, p.out.cview(), &lse);
  bool same = true;
  for (std::int64_t b = 0; b < p.d.B && same; ++b)
    for (std::int64_t h = 0; h < p.d.Hq && same; ++h)
      for (std::int64_t i = 0; i < p.d.N && same; ++i)
        for (std::int64_t c = 0; c < p.d.Dv && same; ++c) {
          const float x = p.out.at(b, h, i, c), y = out2.at(b, h, i, c);
          same = std::memcmp(&x, &y, sizeof(float)) == 0;
        }
  if (!same) o.ok = false, o.report += "\nattention without lse gave a different out (not bitwise equal)";
  if (!p.out.padding_intact()) o.ok = false, o.report += "\nattention wrote outside out's view";
  if (!p.lse.padding_intact()) o.ok = false, o.report += "\nattention wrote outside lse's view";
  return o;
}

#define CHECK_PROBLEM(p)                   \
  do {                                     \
    const Outcome outcome_ = run_check(p); \
    INFO((p).describe());                  \
    INFO(outcome_.report);                 \
    CHECK(outcome_.ok);                    \
  } while (false)

const Score kScores[] = {Score::dot_product, Score::gaussian, Score::additive};

const char* score_name(Score s) {
  switch (s) {
    case Score::dot_product: return "dot_product";
    case Score::gaussian: return "gaussian";
    case Score::additive: return "additive";
  }
  return "?";
}

void set_score(Problem& p, Score s) {
  if (s == Score::gaussian) p.gaussian();
  if (s == Score::additive) p.additive();
}

template <class T, std::size_t K>
T pick(std::mt19937& rng, const T (&options)[K]) {
  return options[rng() % K];
}

}  // namespace

TEST_CASE("each score matches the reference over randomized shapes", "[scores]") {
  // D = 1 and D not a multiple of 16, 8 or 4 (the vector widths), plus 8 and 32; prefill
  // (N >= 17) and decode (N <= 16, up to 1500 keys: several split-KV chunks); causal and a
  // mask on about half the cases each; lse always compared.
  std::mt19937 rng(8080);
  const std::int64_t dims[] = {1, 3, 8, 17, 32, 33};
  const std::int64_t value_dims[] = {1, 5, 16, 23};
  const std::pair<std::int64_t, std::int64_t> heads[] = {{1, 1}, {4, 2}, {8, 2}, {3, 1}};
  const std::int64_t prefill_n[] = {17, 29, 64, 100}, prefill_m[] = {5, 64, 257, 400};
  const std::int64_t decode_n[] = {1, 2, 7, 16}, decode_m[] = {1, 300, 700, 1500};
  const float scales[] = {0.0f, 0.0f, 0.3f, 1.7f};  // 0: the score's default
  const Layout layouts[] = {Layout::padded, Layout::bshd, Layout::sliced, Layout::bhsd};
  std::uint32_t seed = 8000;
  int cases = 0;
  for (const Score score : kScores)
    for (const std::int64_t D : dims)
      for (const bool decode : {false, true}) {
        Dims d{};
        d.D = D;
        do {
          d.Dv = pick(rng, value_dims);
          std::tie(d.Hq, d.Hkv) = pick(rng, heads);
          d.B = 1 + std::int64_t(rng() % 2);
          d.N = decode ? pick(rng, decode_n) : pick(rng, prefill_n);
          d.M = decode ? pick(rng, decode_m) : pick(rng, prefill_m);
        } while (d.B * d.Hq * d.N * d.M * (d.D + d.Dv) > 3'000'000);
        ++seed;
        Problem p(d, seed, layouts[seed % 4]);
        set_score(p, score);
        if (rng() % 2) p.causal();
        if (rng() % 2) p.full_mask(0.05);
        if (const float s = pick(rng, scales); s != 0.0f) p.scale(s);
        INFO("score " << score_name(score) << (decode ? " (decode path)" : " (prefill path)"));
        CHECK_PROBLEM(p);
        ++cases;
      }
  CHECK(cases == 36);
}

TEST_CASE("gaussian: when every weight but the nearest underflows, out is the nearest key's value row",
          "[scores][gaussian]") {
  // Keys on a line 40 apart: k_j = (40 j + U(-1, 1), 0, U(-1, 1), ...), sigma = 1 (scale
  // 1/2). Each query sits within 0.5 of some key along the line, its other coordinates
  // U(-1, 1), with the second either U(-1, 1) or 1000 + U(-1, 1) ("far": every
  // exp(-|q - k|^2 / 2) is below e^-500000, zero even in double). The second-nearest key is
  // >= 38.5^2 - 1.5^2 - 4 (D - 2) > 1200 further in squared distance, so its weight relative
  // to the nearest is < e^-600: out must be the nearest
  // key's v row. Tolerance: 1e-6·max(1, |v|) (the kernel's weight for it is exactly 1 and
  // the others underflow to 0; a few ulp for the final division), no NaN or inf. lse and out
  // are also compared with the reference under the general bound. D = 2 and D = 40 (the
  // library computes the Gaussian from exact differences below D = 32 and by the expanded,
  // centered dot product above).
  // Keys spanning 40·M sigma: M = 300 and 1500, and M = 3000 (120000 sigma) for prefill
  // and decode.
  for (const std::int64_t D : {2, 40})
    for (const Dims& d : {Dims{1, 2, 1, 40, 300, D, 5}, Dims{2, 4, 2, 3, 1500, D, 5}, Dims{1, 2, 1, 64, 3000, D, 5},
                          Dims{1, 4, 2, 4, 3000, D, 5}})
      for (const bool far : {false, true}) {
        Problem p(d, 8200 + std::uint32_t(d.N + d.M + D) + far, Layout::bhsd);
        p.gaussian();
        p.note(far ? "queries 1000 away from the keys' line" : "queries next to a key");
        std::uniform_real_distribution<float> jitter(-1.0f, 1.0f), half(-0.5f, 0.5f);
        for (std::int64_t b = 0; b < d.B; ++b)
          for (std::int64_t g = 0; g < d.Hkv; ++g)
            for (std::int64_t j = 0; j < d.M; ++j) {
              p.k.at(b, g, j, 0) = 40.0f * float(j) + jitter(p.rng);
              p.k.at(b, g, j, 1) = 0.0f;  // so that the far offset adds the same 1000^2 to every key
              for (std::int64_t c = 2; c < D; ++c) p.k.at(b, g, j, c) = jitter(p.rng);
            }
        for (std::int64_t b = 0; b < d.B; ++b)
          for (std::int64_t h = 0; h < d.Hq; ++h)
            for (std::int64_t i = 0; i < d.N; ++i) {
              const std::int64_t n = std::int64_t(p.rng() % std::uint32_t(d.M));
              p.q.at(b, h, i, 0) = 40.0f * float(n) + half(p.rng);
              p.q.at(b, h, i, 1) = far ? 1000.0f + jitter(p.rng) : jitter(p.rng);
              for (std::int64_t c = 2; c < D; ++c) p.q.at(b, h, i, c) = jitter(p.rng);
            }
        CHECK_PROBLEM(p);
        Worst worst, lse_worst;
        bool finite = true;
        const std::int64_t group = d.Hq / d.Hkv;
        for (std::int64_t b = 0; b < d.B; ++b)
          for (std::int64_t h = 0; h < d.Hq; ++h)
            for (std::int64_t i = 0; i < d.N; ++i) {
              std::int64_t nearest = 0;
              double best = std::numeric_limits<double>::infinity();
              for (std::int64_t j = 0; j < d.M; ++j) {
                double dist2 = 0;
                for (std::int64_t c = 0; c < d.D; ++c) {
                  const double x = double(p.q.at(b, h, i, c)) - double(p.k.at(b, h / group, j, c));
                  dist2 += x * x;
                }
                if (dist2 < best) best = dist2, nearest = j;
              }
              for (std::int64_t c = 0; c < d.Dv; ++c) {
                const float got = p.out.at(b, h, i, c), want = p.v.at(b, h / group, nearest, c);
                finite = finite && std::isfinite(got) && std::isfinite(p.lse.at(b, h, i, 0));
                worst.record(got, want, 1e-6 * std::max(1.0, std::fabs(double(want))), b, h, i, nearest);
              }
              // lse = the nearest key's score -|q - k|^2 / 2 (the others add < e^-600); for
              // the report only: how far off the fused scores are.
              lse_worst.record(p.lse.at(b, h, i, 0), -0.5 * best, 1e-3 * (1 + 0.5 * best), b, h, i, nearest);
            }
        INFO(p.describe());
        INFO(worst.text("out vs the nearest key's v row (c = the nearest key's index)", "fused", "nearest v"));
        INFO(lse_worst.text("lse vs the nearest key's exact score (c = the nearest key's index)", "fused lse",
                            "-|q - k_nearest|^2 / 2"));
        CHECK(finite);
        CHECK(worst.bad == 0);
      }
}

TEST_CASE("gaussian: data far from the origin (1000 +- 1) still matches the reference", "[scores][gaussian]") {
  // |q - k|^2 expanded as |q|^2 - 2 q.k + |k|^2 would cancel ~D·1e6 down to ~D: an error
  // of u·D·1e6 ~ 0.5 in the score for D = 8, weights off by tens of percent. The bound
  // used here (see the top of the file) charges the score 4·scale·diam²·(D + 10)·u with
  // diam the extent of the head's points (~2·sqrt(D)), i.e. ~1e-5 for D = 8: it passes only
  // when the kernel works relative to the data (the library centers it), not to the origin.
  std::uint32_t seed = 8300;
  // D = 3, 8, 17 go through exact differences, D = 33 and 48 through the centered
  // expansion (the library switches at D = 32).
  for (const std::int64_t D : {3, 8, 17, 33, 48})
    for (const Dims& d : {Dims{2, 4, 2, 33, 200, D, 7}, Dims{2, 8, 2, 4, 1200, D, 7}})
      for (const float scale : {0.5f, 2.0f}) {
        Problem p(d, ++seed, Layout::padded, Layout::padded, 999.0f, 1001.0f);
        p.note("q, k in [999, 1001]");
        p.gaussian();
        p.scale(scale);
        if (seed % 2) p.causal();
        CHECK_PROBLEM(p);
      }
}

TEST_CASE("additive score with D not a multiple of the vector width", "[scores][additive]") {
  std::uint32_t seed = 8400;
  for (const std::int64_t D : {1, 3, 5, 7, 9, 15, 17, 31, 33, 65}) {
    const bool decode = D % 4 == 1;
    const Dims d = decode ? Dims{1, 8, 2, 2, 900, D, 9} : Dims{1, 4, 2, 20, 150, D, 9};
    Problem p(d, ++seed, D % 3 ? Layout::padded : Layout::bshd, Layout::padded, -2.0f, 2.0f);
    p.additive();
    if (D % 2) p.causal();
    if (D > 10) p.scale(0.5f);
    INFO((decode ? "decode path" : "prefill path"));
    CHECK_PROBLEM(p);
  }
}

TEST_CASE("Score::additive without additive_weights is rejected before anything is written",
          "[scores][additive][errors]") {
  for (const Dims& d : {Dims{2, 4, 2, 20, 30, 7, 3}, Dims{2, 4, 2, 1, 700, 7, 3}}) {
    for (int overload = 0; overload < 4; ++overload) {
      Problem p(d, 8500, Layout::bhsd, Layout::bhsd);
      p.opt.score = Score::additive;  // additive_weights left null
      const std::vector<float> out_before = p.out.buffer(), lse_before = p.lse.buffer();
      auto call = [&] {
        switch (overload) {
          case 0: flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.opt); break;
          case 1: flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt); break;
          case 2: flashcpu::reference::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.opt); break;
          default:
            flashcpu::reference::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
        }
      };
      INFO(str(d) << " overload " << overload << " (0, 1: attention without / with lse; 2, 3: reference)");
      CHECK_THROWS_AS(call(), flashcpu::Error);
      CHECK_THROWS_WITH(call(), Catch::Contains("additive_weights"));
      CHECK(std::memcmp(p.out.buffer().data(), out_before.data(), out_before.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(p.lse.buffer().data(), lse_before.data(), lse_before.size() * sizeof(float)) == 0);
    }
  }
}

// ---------------------------------------------------------------------------------
// reference::attention_weights
// ---------------------------------------------------------------------------------
namespace {

// Weights [B, Hq, N, M] of the problem, from reference::attention_weights (NaN-initialized).
std::vector<float> weights_of(Problem& p, std::string* error) {
  const Dims& d = p.d;
  std::vector<float> w(std::size_t(std::max<std::int64_t>(d.B * d.Hq * d.N * d.M, 1)), kNaN);
  try {
    flashcpu::reference::attention_weights(p.q.cview(), p.k.cview(), flashcpu::bhsd(w.data(), d.B, d.Hq, d.N, d.M),
                                           p.opt);
  } catch (const std::exception& e) {
    *error = e.what();
  }
  return w;
}

}  // namespace

TEST_CASE("attention_weights: rows sum to 1, or are all zero when no key is visible", "[scores][weights]") {
  // Each weight is a double rounded to float (relative error <= u/2), so a row sums to 1
  // within u·1 plus the double sum's error: 1e-6 leaves a wide margin. Each weight must
  // also match the test's own double softmax of row_scores to 2u relative, and the keys
  // the options exclude must be exactly 0.
  for (const Score score : kScores) {
    const Dims d{2, 4, 2, 9, 40, 5, 3};
    Problem p(d, 8600 + std::uint32_t(score));
    set_score(p, score);
    p.causal();
    p.full_mask(0.1);
    for (std::int64_t j = 0; j < d.M; ++j) p.mask_buf[std::size_t(((0 * d.Hq + 1) * d.N + 2) * d.M + j)] = -kInf;
    p.key_lengths({std::int32_t(d.M - 3), 0});  // batch 1: no key
    p.alibi();
    p.softcap(4.0f);
    INFO(p.describe());
    std::string error;
    const std::vector<float> w = weights_of(p, &error);
    INFO("reference::attention_weights threw: " << error);
    REQUIRE(error.empty());

    const double scale = score == Score::dot_product ? double(float(1.0 / std::sqrt(double(d.D))))
                         : score == Score::gaussian  ? 0.5
                                                     : 1.0;
    std::vector<double> s(std::size_t(d.M)), a(std::size_t(d.M));
    Worst sums, elems;
    std::int64_t empty = 0;
    for (std::int64_t b = 0; b < d.B; ++b)
      for (std::int64_t h = 0; h < d.Hq; ++h)
        for (std::int64_t i = 0; i < d.N; ++i) {
          row_scores(p.q.cview(), p.k.cview(), p.opt, d, scale, b, h, i, s, a);
          const double m = *std::max_element(s.begin(), s.end());
          const float* row = &w[std::size_t(((b * d.Hq + h) * d.N + i) * d.M)];
          double sum = 0, total = 0;
          for (std::int64_t j = 0; j < d.M; ++j) sum += row[j];
          if (m == -kInf) {
            ++empty;
            sums.record(sum, 0.0, 0.0, b, h, i, 0);
            for (std::int64_t j = 0; j < d.M; ++j) elems.record(row[j], 0.0, 0.0, b, h, i, j);
            continue;
          }
          sums.record(sum, 1.0, 1e-6, b, h, i, 0);
          for (std::int64_t j = 0; j < d.M; ++j) total += std::exp(s[std::size_t(j)] - m);
          for (std::int64_t j = 0; j < d.M; ++j) {
            const double want = std::exp(s[std::size_t(j)] - m) / total;
            elems.record(row[j], want, 2 * kU * want, b, h, i, j);
          }
        }
    INFO(sums.text("row sums", "sum", "expected"));
    INFO(elems.text("weights (c = key)", "reference", "test"));
    CHECK(sums.bad == 0);
    CHECK(elems.bad == 0);
    CHECK(empty >= d.Hq * d.N + 1);  // batch 1, and (b0, h1, i2)
  }
}

TEST_CASE("attention_weights: a hand-computed case", "[scores][weights]") {
  // N = 2, M = 3, D = 2, scale 1, causal (row 0 sees keys 0, 1; row 1 sees all three) and
  // the mask [[0, -1, 5], [0.5, 0, -inf]]:
  //   q0 = (1, 0):    q0.k = (1, -1, 2)     + mask -> (1, -2, excluded by causal)
  //   q1 = (0.5, -1): q1.k = (-0.5, -1, 1)  + mask -> (0, -1, -inf)
  // so w0 = (e, e^-2, 0) / (e + e^-2) and w1 = (1, e^-1, 0) / (1 + e^-1).
  // Tolerance: each weight is a double rounded to float, relative 1e-6 (~17 u) is generous.
  std::vector<float> q{1, 0, 0.5f, -1}, k{1, 1, -1, 0.5f, 2, 0}, mask{0, -1, 5, 0.5f, 0, -kInf};
  std::vector<float> w(6, kNaN);
  AttentionOptions opt;
  opt.scale = 1.0f;
  opt.causal = true;
  opt.mask = flashcpu::bhsd<const float>(mask.data(), 1, 1, 2, 3);
  std::string error;
  try {
    flashcpu::reference::attention_weights(flashcpu::bhsd<const float>(q.data(), 1, 1, 2, 2),
                                           flashcpu::bhsd<const float>(k.data(), 1, 1, 3, 2),
                                           flashcpu::bhsd(w.data(), 1, 1, 2, 3), opt);
  } catch (const std::exception& e) {
    error = e.what();
  }
  INFO("reference::attention_weights threw: " << error);
  REQUIRE(error.empty());
  const double e = std::exp(1.0), r0 = e + std::exp(-2.0), r1 = 1 + std::exp(-1.0);
  const double want[6] = {e / r0, std::exp(-2.0) / r0, 0, 1 / r1, std::exp(-1.0) / r1, 0};
  for (int x = 0; x < 6; ++x) {
    INFO("weight (" << x / 3 << ", " << x % 3 << ")");
    CHECK(w[std::size_t(x)] == Approx(want[x]).epsilon(1e-6).margin(0));
  }
}

TEST_CASE("attention_weights times V equals reference::attention", "[scores][weights]") {
  // Σ_j w_j v_jc in double from the float weights: each weight carries a relative
  // rounding error <= u/2 and out one more rounding, so |Σ w v - out| <= u·Σ|w v| + u|out|;
  // 4u of each is the tolerance.
  std::uint32_t seed = 8700;
  for (const Score score : kScores)
    for (const Dims& d : {Dims{2, 8, 2, 19, 70, 6, 5}, Dims{1, 4, 2, 3, 600, 9, 4}}) {
      Problem p(d, ++seed);
      set_score(p, score);
      p.causal();
      p.full_mask(0.1);
      p.full_bool(0.1);
      p.alibi();
      p.softcap(3.0f);
      INFO(p.describe());
      std::string error;
      const std::vector<float> w = weights_of(p, &error);
      INFO("reference::attention_weights threw: " << error);
      REQUIRE(error.empty());
      std::vector<float> out(std::size_t(d.B * d.Hq * d.N * d.Dv), kNaN);
      flashcpu::reference::attention(p.q.cview(), p.k.cview(), p.v.cview(),
                                     flashcpu::bhsd(out.data(), d.B, d.Hq, d.N, d.Dv), p.opt);
      Worst worst;
      const std::int64_t group = d.Hq / d.Hkv;
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h)
          for (std::int64_t i = 0; i < d.N; ++i)
            for (std::int64_t c = 0; c < d.Dv; ++c) {
              double acc = 0, mag = 0;
              for (std::int64_t j = 0; j < d.M; ++j) {
                const double x =
                    double(w[std::size_t(((b * d.Hq + h) * d.N + i) * d.M + j)]) * double(p.v.at(b, h / group, j, c));
                acc += x, mag += std::fabs(x);
              }
              const double got = out[std::size_t(((b * d.Hq + h) * d.N + i) * d.Dv + c)];
              worst.record(acc, got, 4 * kU * (mag + std::fabs(got)), b, h, i, c);
            }
      INFO(worst.text("weights . V vs reference out", "weights.V", "reference out"));
      CHECK(worst.bad == 0);
    }
}

// ---------------------------------------------------------------------------------
// Nadaraya-Watson kernel regression.
//
// Tolerance of flashcpu::nadaraya_watson against reference::nadaraya_watson. The fused
// path computes the raw score -x = -|x_q - x_j|^2 / h^2 (the Gaussian score with scale
// 1/h^2, or 1/(2 h^2) for the Gaussian kernel) in fp32 with an error in x of
//   ε_j = u · ((D + 10)·4·diam²/h² + 8x + 16)
// (as for the Gaussian score above: diam the extent of the head's points), then maps it to
// log K: Gaussian -x/2 (error ε/2), Laplacian -sqrt(x) (error <= ε/(sqrt(x) + sqrt(ε)),
// which is sqrt(ε) at x = 0), boxcar 0 inside (no error), Epanechnikov log(1 - x) (error
// ε/(1 - x)); plus 8u(|s| + |m| + 2) for the later roundings. As for attention, with Δ_j
// that error in log K_j, w_j the exact weights and coef_j from weight_perturbation
// (w_j (Δ_j + Δ̄) to first order),
//   |y - ref| <= kAtol·Σ w_j|y_j| + kRtol·|ref| + Σ coef_j |y_j - ref|.
// Boxcar and Epanechnikov are discontinuous at u = 1: the data keep every |x - 1| > 2ε
// (coordinates on a 1/8 grid and h^2 = (k + 1/2)/64, so |x - 1| >= 1/(2k + 1)), checked.
// A query with no training point in the support must be NaN in both.
// ---------------------------------------------------------------------------------
namespace {

using flashcpu::Kernel;
using flashcpu::KernelRegressionOptions;

const Kernel kKernels[] = {Kernel::gaussian, Kernel::laplacian, Kernel::boxcar, Kernel::epanechnikov};

const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::gaussian: return "gaussian";
    case Kernel::laplacian: return "laplacian";
    case Kernel::boxcar: return "boxcar";
    case Kernel::epanechnikov: return "epanechnikov";
  }
  return "?";
}

struct NwDims {
  std::int64_t B, H, N, M, D, Dv;
};

struct Nw {
  NwDims d;
  Tensor xq, xt, yt, yp;
  KernelRegressionOptions opt;
  std::mt19937 rng;
  std::string what;
  Nw(const NwDims& dims, std::uint32_t seed, Layout layout = Layout::padded)
      : d(dims),
        xq({d.B, d.H, d.N, d.D}, layout, kNaN),
        xt({d.B, d.H, d.M, d.D}, layout, kNaN),
        yt({d.B, d.H, d.M, d.Dv}, layout, kNaN),
        yp({d.B, d.H, d.N, d.Dv}, Layout::padded, kSentinel),
        rng(seed) {
    yt.fill_uniform(rng, -2.0f, 2.0f);
  }
  // x values uniform in [-1, 1], or on the 1/8 grid of [-1, 1].
  void fill_x(bool grid) {
    for (Tensor* t : {&xq, &xt}) {
      const Shape& s = t->shape();
      for (std::int64_t b = 0; b < s[0]; ++b)
        for (std::int64_t h = 0; h < s[1]; ++h)
          for (std::int64_t i = 0; i < s[2]; ++i)
            for (std::int64_t c = 0; c < s[3]; ++c)
              t->at(b, h, i, c) =
                  grid ? float(int(rng() % 17) - 8) / 8.0f : std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);
    }
  }
  std::string describe() const {
    std::ostringstream os;
    os << "B=" << d.B << " H=" << d.H << " N=" << d.N << " M=" << d.M << " D=" << d.D << " Dv=" << d.Dv
       << " kernel=" << kernel_name(opt.kernel) << " bandwidth=" << opt.bandwidth << " isa=" << flashcpu::active_isa()
       << (what.empty() ? "" : " " + what);
    return os.str();
  }
};

struct NwOutcome {
  bool ok = true;
  std::string report;
  std::int64_t empty_rows = 0, ambiguous = 0;
};

// Runs flashcpu::nadaraya_watson and compares with the reference under the bound above;
// also checks the reference against the test's own double computation.
NwOutcome run_nw(Nw& p) {
  NwOutcome o;
  const NwDims& d = p.d;
  std::mt19937 unused;
  p.yp.fill_uniform(unused, kSentinel, kSentinel);
  std::vector<float> ref(std::size_t(d.B * d.H * d.N * d.Dv), kSentinel);
  try {
    flashcpu::nadaraya_watson(p.xq.cview(), p.xt.cview(), p.yt.cview(), p.yp.view(), p.opt);
    flashcpu::reference::nadaraya_watson(p.xq.cview(), p.xt.cview(), p.yt.cview(),
                                         flashcpu::bhsd(ref.data(), d.B, d.H, d.N, d.Dv), p.opt);
  } catch (const std::exception& e) {
    return {false, std::string("threw: ") + e.what()};
  }
  const double h2 = double(p.opt.bandwidth) * double(p.opt.bandwidth);
  const double inf = std::numeric_limits<double>::infinity();
  const Kernel kernel = p.opt.kernel;
  Worst fused, oracle;
  const std::size_t Ms = std::size_t(d.M);
  std::vector<double> x(Ms), s(Ms), w(Ms), delta(Ms), lw(Ms), coef(Ms);
  std::vector<double> lo(std::size_t(d.D)), hi(std::size_t(d.D));
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.H; ++h) {
      std::fill(lo.begin(), lo.end(), inf), std::fill(hi.begin(), hi.end(), -inf);
      for (std::int64_t j = 0; j < d.M; ++j)
        for (std::int64_t c = 0; c < d.D; ++c) {
          lo[std::size_t(c)] = std::min(lo[std::size_t(c)], double(p.xt.at(b, h, j, c)));
          hi[std::size_t(c)] = std::max(hi[std::size_t(c)], double(p.xt.at(b, h, j, c)));
        }
      for (std::int64_t i = 0; i < d.N; ++i) {
        double diam2 = 0;
        for (std::int64_t c = 0; c < d.D; ++c) {
          const double xq = p.xq.at(b, h, i, c);
          const double ext = std::max(hi[std::size_t(c)], xq) - std::min(lo[std::size_t(c)], xq);
          diam2 += ext * ext;
        }
        double m = -inf;
        for (std::int64_t j = 0; j < d.M; ++j) {
          double dist2 = 0;
          for (std::int64_t c = 0; c < d.D; ++c) {
            const double t = double(p.xq.at(b, h, i, c)) - double(p.xt.at(b, h, j, c));
            dist2 += t * t;
          }
          const double xj = x[std::size_t(j)] = dist2 / h2;
          double& sj = s[std::size_t(j)];
          switch (kernel) {
            case Kernel::gaussian: sj = -0.5 * xj; break;
            case Kernel::laplacian: sj = -std::sqrt(xj); break;
            case Kernel::boxcar: sj = xj <= 1 ? 0.0 : -inf; break;
            case Kernel::epanechnikov: sj = xj < 1 ? std::log1p(-xj) : -inf; break;
          }
          m = std::max(m, sj);
        }
        const std::int64_t row = (b * d.H + h) * d.N + i;
        if (m == -inf) {  // no training point in the support: NaN
          ++o.empty_rows;
          for (std::int64_t c = 0; c < d.Dv; ++c) {
            fused.record(p.yp.at(b, h, i, c), kNaN, 0, b, h, i, c);
            oracle.record(ref[std::size_t(row * d.Dv + c)], kNaN, 0, b, h, i, c);
          }
          continue;
        }
        double sum = 0;
        for (std::int64_t j = 0; j < d.M; ++j) sum += (w[std::size_t(j)] = std::exp(s[std::size_t(j)] - m));
        const double log_sum = std::log(sum);
        for (std::int64_t j = 0; j < d.M; ++j) {
          const double xj = x[std::size_t(j)], sj = s[std::size_t(j)];
          const double eps = kU * (double(d.D + 10) * 4 * diam2 / h2 + 8 * xj + 16);
          if ((kernel == Kernel::boxcar || kernel == Kernel::epanechnikov) && std::fabs(xj - 1) <= 2 * eps)
            ++o.ambiguous;
          w[std::size_t(j)] /= sum;
          lw[std::size_t(j)] = sj - m - log_sum;
          if (sj == -inf) continue;
          const double later = 8 * kU * (std::fabs(sj) + std::fabs(m) + 2);
          double& dj = delta[std::size_t(j)];
          switch (kernel) {
            case Kernel::gaussian: dj = eps / 2 + later; break;
            case Kernel::laplacian: dj = eps / (std::sqrt(xj) + std::sqrt(eps)) + later; break;
            case Kernel::boxcar: dj = later; break;
            case Kernel::epanechnikov: dj = eps / (1 - xj) + later; break;
          }
        }
        weight_perturbation(lw, delta, d.M, coef);
        for (std::int64_t c = 0; c < d.Dv; ++c) {
          const double r = ref[std::size_t(row * d.Dv + c)];
          double mine = 0, mag = 0, dev = 0;
          for (std::int64_t j = 0; j < d.M; ++j) {
            const double wj = w[std::size_t(j)], cj = coef[std::size_t(j)];
            if (!(wj > 0) && !(cj > 0)) continue;
            const double y = p.yt.at(b, h, j, c);
            mine += wj * y, mag += wj * std::fabs(y);
            if (y != r) dev += cj * std::fabs(y - r);  // cj may be inf
          }
          fused.record(p.yp.at(b, h, i, c), r, kAtol * mag + kRtol * std::fabs(r) + dev, b, h, i, c);
          oracle.record(r, mine, 4 * kU * std::fabs(mine) + 1e-9 * mag, b, h, i, c);
        }
      }
    }
  o.ok = fused.bad == 0 && oracle.bad == 0 && p.yp.padding_intact();
  o.report = fused.text("y_pred") + "\n" + oracle.text("reference vs test's double loop", "reference", "test") +
             "\nqueries with no training point in the support: " + std::to_string(o.empty_rows) +
             (p.yp.padding_intact() ? "" : "\nnadaraya_watson wrote outside y_pred's view");
  return o;
}

}  // namespace

TEST_CASE("nadaraya_watson: each kernel matches the reference over randomized shapes", "[scores][nw]") {
  // Gaussian and Laplacian on continuous data in [-1, 1]^D, bandwidths 0.15 .. 2.5; boxcar
  // and Epanechnikov on the 1/8 grid with h^2 = (k + 1/2)/64 chosen for supports of about
  // 0.15, 0.5 and 1.2 times D (some queries empty at small h). Prefill (N = 40) and decode
  // (N = 5, M = 1200: split-KV) shapes, B·H = 6.
  std::uint32_t seed = 9000;
  const float smooth_h[] = {0.15f, 0.6f, 2.5f};
  const double grid_c[] = {0.15, 0.5, 1.2};
  int cases = 0;
  for (const Kernel kernel : kKernels)
    for (const std::int64_t D : {1, 3, 8})
      for (const bool decode : {false, true}) {
        const NwDims d = decode ? NwDims{2, 3, 5, 1200, D, 2} : NwDims{2, 3, 40, 300, D, 3};
        ++seed;
        Nw p(d, seed, seed % 2 ? Layout::padded : Layout::bshd);
        const bool grid = kernel == Kernel::boxcar || kernel == Kernel::epanechnikov;
        p.fill_x(grid);
        p.opt.kernel = kernel;
        if (grid) {
          const double k = std::round(64.0 * double(D) * grid_c[seed % 3]);
          p.opt.bandwidth = float(std::sqrt((k + 0.5) / 64.0));
        } else {
          p.opt.bandwidth = smooth_h[seed % 3] * float(std::sqrt(double(D)));
        }
        const NwOutcome o = run_nw(p);
        INFO(p.describe() << (decode ? " (decode path)" : " (prefill path)"));
        INFO(o.report);
        CHECK(o.ok);
        CHECK(o.ambiguous == 0);  // the data keep clear of the support's edge (see above)
        ++cases;
      }
  CHECK(cases == 24);
}

TEST_CASE("nadaraya_watson: queries with no training point in the support give NaN", "[scores][nw]") {
  // Boxcar and Epanechnikov, h = 1 (h^2 = 64.5/64): even queries on the grid of the training
  // points (M = 200 of them in [-1, 1]^2: all have neighbours), odd queries moved 100 away:
  // exactly the odd rows are NaN, the even rows finite and matching the reference.
  for (const Kernel kernel : {Kernel::boxcar, Kernel::epanechnikov})
    for (const NwDims& d : {NwDims{2, 2, 30, 200, 2, 3}, NwDims{1, 3, 6, 1500, 2, 3}}) {
      Nw p(d, 9100 + std::uint32_t(d.N));
      p.fill_x(true);
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.H; ++h)
          for (std::int64_t i = 1; i < d.N; i += 2) p.xq.at(b, h, i, 0) += 100.0f;
      p.opt.kernel = kernel;
      p.opt.bandwidth = float(std::sqrt(64.5 / 64.0));
      p.what = "odd queries 100 away";
      const NwOutcome o = run_nw(p);
      INFO(p.describe());
      INFO(o.report);
      CHECK(o.ok);
      CHECK(o.ambiguous == 0);
      CHECK(o.empty_rows == d.B * d.H * (d.N / 2));
      bool pattern = true;
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.H; ++h)
          for (std::int64_t i = 0; i < d.N; ++i)
            for (std::int64_t c = 0; c < d.Dv; ++c)
              pattern = pattern && (i % 2 ? std::isnan(p.yp.at(b, h, i, c)) : std::isfinite(p.yp.at(b, h, i, c)));
      CHECK(pattern);
    }
}

TEST_CASE("nadaraya_watson: with huge distances the nearest training point's y is returned", "[scores][nw]") {
  // 1-D training points 50 bandwidths apart (x_j = 50 h j + U(-0.1 h, 0.1 h)); queries within
  // 0.5 h of some x_n, or 1000 h left of x_0 (every kernel value underflows, even in double).
  // The next point is >= 49 h further: relative weight < e^-49 (Laplacian), < e^-1200
  // (Gaussian), so y_pred must be y of the nearest point within 1e-6·max(1, |y|), finite.
  for (const Kernel kernel : {Kernel::gaussian, Kernel::laplacian})
    for (const NwDims& d : {NwDims{1, 2, 40, 200, 1, 3}, NwDims{2, 1, 4, 1300, 1, 2}})
      for (const bool far : {false, true}) {
        Nw p(d, 9200 + std::uint32_t(d.N) + far);
        p.opt.kernel = kernel;
        p.opt.bandwidth = 0.25f;
        const float h = p.opt.bandwidth;
        std::uniform_real_distribution<float> jitter(-0.1f, 0.1f), half(-0.5f, 0.5f);
        std::vector<std::int64_t> nearest;
        for (std::int64_t b = 0; b < d.B; ++b)
          for (std::int64_t hh = 0; hh < d.H; ++hh) {
            for (std::int64_t j = 0; j < d.M; ++j) p.xt.at(b, hh, j, 0) = h * (50.0f * float(j) + jitter(p.rng));
            for (std::int64_t i = 0; i < d.N; ++i) {
              const std::int64_t n = far ? 0 : std::int64_t(p.rng() % std::uint32_t(d.M));
              p.xq.at(b, hh, i, 0) = far ? h * (-1000.0f + half(p.rng)) : p.xt.at(b, hh, n, 0) + h * half(p.rng);
              nearest.push_back(n);
            }
          }
        p.what = far ? "queries 1000 h away" : "queries next to a point";
        const NwOutcome o = run_nw(p);
        INFO(p.describe());
        INFO(o.report);
        CHECK(o.ok);
        Worst worst;
        bool finite = true;
        std::size_t next = 0;
        for (std::int64_t b = 0; b < d.B; ++b)
          for (std::int64_t hh = 0; hh < d.H; ++hh)
            for (std::int64_t i = 0; i < d.N; ++i, ++next)
              for (std::int64_t c = 0; c < d.Dv; ++c) {
                const double want = p.yt.at(b, hh, nearest[next], c), got = p.yp.at(b, hh, i, c);
                finite = finite && std::isfinite(got);
                worst.record(got, want, 1e-6 * std::max(1.0, std::fabs(want)), b, hh, i, c);
              }
        INFO(worst.text("y_pred vs y of the nearest point", "fused", "nearest y"));
        CHECK(finite);
        CHECK(worst.bad == 0);
      }
}

TEST_CASE("nadaraya_watson: a hand-checked 1-D case", "[scores][nw]") {
  // Training points x = 0 and x = 1 with y = 10 and 20; queries at 0.25 and at 5.
  // h = 1: u = 0.25 and 0.75 for the first query, so
  //   gaussian     K = e^-0.03125, e^-0.28125
  //   laplacian    K = e^-0.25,    e^-0.75
  //   boxcar       K = 1, 1                 -> 15
  //   epanechnikov K = 0.9375, 0.4375       -> (9.375 + 8.75) / 1.375
  // and at x = 5 (u = 5, 4) boxcar and Epanechnikov have no support: NaN; the Gaussian
  // weighs x = 0 and x = 1 by e^-12.5 and e^-8, the Laplacian by e^-5 and e^-4.
  // h = 0.5: u = 0.5 and 1.5: boxcar and Epanechnikov see only x = 0 -> 10.
  // Tolerance: relative 1e-5, the fused kernel's fp32 (see the bound above; these rows
  // have |y| <= 20 and two keys).
  const std::vector<float> xt{0.0f, 1.0f}, yt{10.0f, 20.0f}, xq{0.25f, 5.0f};
  auto nw = [](double k0, double k1) { return (10 * k0 + 20 * k1) / (k0 + k1); };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Expect {
    Kernel kernel;
    float h;
    double at_quarter, at_five;
  };
  const Expect expects[] = {
      {Kernel::gaussian, 1.0f, nw(std::exp(-0.03125), std::exp(-0.28125)), nw(std::exp(-12.5), std::exp(-8.0))},
      {Kernel::laplacian, 1.0f, nw(std::exp(-0.25), std::exp(-0.75)), nw(std::exp(-5.0), std::exp(-4.0))},
      {Kernel::boxcar, 1.0f, 15.0, nan},
      {Kernel::epanechnikov, 1.0f, nw(0.9375, 0.4375), nan},
      {Kernel::boxcar, 0.5f, 10.0, nan},
      {Kernel::epanechnikov, 0.5f, 10.0, nan},
      {Kernel::gaussian, 0.5f, nw(std::exp(-0.125), std::exp(-1.125)), nw(std::exp(-50.0), std::exp(-32.0))},
  };
  for (const Expect& e : expects) {
    KernelRegressionOptions opt;
    opt.kernel = e.kernel;
    opt.bandwidth = e.h;
    for (const bool reference : {false, true}) {
      std::vector<float> out(2, kSentinel);
      const auto q = flashcpu::bhsd<const float>(xq.data(), 1, 1, 2, 1);
      const auto t = flashcpu::bhsd<const float>(xt.data(), 1, 1, 2, 1);
      const auto y = flashcpu::bhsd<const float>(yt.data(), 1, 1, 2, 1);
      if (reference)
        flashcpu::reference::nadaraya_watson(q, t, y, flashcpu::bhsd(out.data(), 1, 1, 2, 1), opt);
      else
        flashcpu::nadaraya_watson(q, t, y, flashcpu::bhsd(out.data(), 1, 1, 2, 1), opt);
      INFO((reference ? "reference" : "fused") << " kernel=" << kernel_name(e.kernel) << " h=" << e.h);
      CHECK(out[0] == Approx(e.at_quarter).epsilon(1e-5));
      if (std::isnan(e.at_five))
        CHECK(std::isnan(out[1]));
      else
        CHECK(out[1] == Approx(e.at_five).epsilon(1e-5));
    }
  }
}

TEST_CASE("nadaraya_watson: bad bandwidths are rejected, naming the bandwidth", "[scores][nw][errors]") {
  const NwDims d{2, 2, 5, 9, 3, 2};
  for (const float h : {0.0f, -0.0f, -1.0f, -1e-30f, kNaN, kInf, -kInf}) {
    for (const Kernel kernel : kKernels) {
      for (const bool reference : {false, true}) {
        Nw p(d, 9300, Layout::bhsd);
        p.fill_x(false);
        p.opt.kernel = kernel;
        p.opt.bandwidth = h;
        const std::vector<float> before = p.yp.buffer();
        auto call = [&] {
          if (reference)
            flashcpu::reference::nadaraya_watson(p.xq.cview(), p.xt.cview(), p.yt.cview(), p.yp.view(), p.opt);
          else
            flashcpu::nadaraya_watson(p.xq.cview(), p.xt.cview(), p.yt.cview(), p.yp.view(), p.opt);
        };
        INFO((reference ? "reference" : "fused") << " kernel=" << kernel_name(kernel) << " bandwidth=" << h);
        CHECK_THROWS_AS(call(), flashcpu::Error);
        CHECK_THROWS_WITH(call(), Catch::Contains("bandwidth"));
        CHECK(std::memcmp(p.yp.buffer().data(), before.data(), before.size() * sizeof(float)) == 0);
      }
    }
  }
}
