// The attention oracle shared by test_options.cpp and test_scores.cpp: a Problem (q, k,
// v, out, lse and the options with their storage), the test's own double-precision
// scores of every row from the documented semantics (row_scores), the reference result
// with a per-element tolerance for the fused kernel (expect), and the comparison of a
// fused result with it (compare, run_check, CHECK_PROBLEM). util.hpp's
// compare_with_reference re-derives the scores itself for plain dot-product attention
// only, so it cannot judge options or other score functions; these helpers can.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "util.hpp"

namespace oracle {

using flashcpu::AttentionOptions;
using flashcpu::Score;
using flashcpu::TensorView;
using ftest::Layout;
using ftest::Shape;
using ftest::Tensor;

inline constexpr float kInf = std::numeric_limits<float>::infinity();
inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
inline constexpr float kSentinel = -31415.5f;   // what out and lse hold before a call
inline constexpr double kU = 1.0 / 16777216.0;  // 2^-24, fp32 unit roundoff

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
// Gaussian: 2·scale·(|q − c|² + |k_j − c|²) with c = key 0, the center the kernel expands
// |q − k|² around: the expansion's three terms sum to at most that (2|a·b| <= |a|² + |b|²),
// and exact differences give |q − k_j|², which is smaller; each key its own distance, so
// spread-out keys do not inflate every key's bound; additive:
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
inline constexpr double kAtol = 1e-5;
inline constexpr double kRtol = 2e-5;
inline constexpr double kLseAtol = 2e-5;

struct Dims {
  std::int64_t B, Hq, Hkv, N, M, D, Dv;
};

std::string str(const Dims& d);

// Whether the library runs these dims on the decode driver with kernels that have no bf16
// products (use_decode_path): N <= 16, or at most kDecodeMaxStackedRows (48) stacked rows
// (query heads per KV head x N). bf16 products keep the prefill driver for N > 16.
inline bool on_decode_driver(const Dims& d) { return d.N <= 16 || d.N * (d.Hq / d.Hkv) <= 48; }

// Element (b, h, i, j) of a mask view broadcast to [B, Hq, N, M] (a size-1 dim reads index 0).
template <class T>
T mask_at(const TensorView<const T>& m, std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
  const std::int64_t idx[4] = {b, h, i, j};
  std::int64_t offset = 0;
  for (int d = 0; d < 4; ++d) offset += (m.shape[d] == 1 ? 0 : idx[d]) * m.strides[d];
  return m.data[offset];
}

float elem(const TensorView<const float>& t, std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d);

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

Shape contiguous(Shape s);

// q, k, v (padding NaN), out and lse (padding kSentinel), the options and the storage
// they point to.
struct Problem {
  Dims d;
  std::uint32_t seed;
  Layout layout;
  Tensor q, k, v, out, lse;
  AttentionOptions opt;
  std::vector<float> mask_buf, slopes, add_w, sink_values;
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
  // Key lengths that are not block or chunk boundaries; the second batch stops early, so
  // its later decode chunks see nothing.
  void partial_key_lengths() {
    std::vector<std::int32_t> l;
    for (std::int64_t b = 0; b < d.B; ++b) l.push_back(std::int32_t(b == 0 ? d.M - 37 : d.M / 3 + 5));
    key_lengths(std::move(l));
  }
  // Every option at once.
  void everything() {
    causal();
    full_mask(0.05);
    full_bool(0.2);
    partial_key_lengths();
    window(d.M / 2 + 3, 2);
    scale(0.4f);
    softcap(3.0f);
    alibi();
  }
  // Attention sinks, one per query head, uniform in [lo, hi] (every third -inf when
  // some_off: no sink for that head).
  void sinks(float lo, float hi, bool some_off = false) {
    std::uniform_real_distribution<float> val(lo, hi);
    sink_values.resize(static_cast<std::size_t>(d.Hq));
    for (std::size_t h = 0; h < sink_values.size(); ++h) sink_values[h] = some_off && h % 3 == 1 ? -kInf : val(rng);
    opt.sinks = sink_values.data();
    note("sinks in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]" + (some_off ? " some -inf" : ""));
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
                std::vector<double>& a_dot);

// How far the weights can move when each visible key's score (log weight) may be off by
// up to Δ_j: with w̃_j = w_j e^{δ_j} / S, S = Σ_k w_k e^{δ_k} in [e^{-Δ̄}, E] (Jensen; E =
// Σ_k w_k e^{Δ_k}), |w̃_j − w_j| <= w_j · max(e^{Δ_j + Δ̄} − 1, 1 − e^{−Δ_j} / E) =: coef_j,
// and |lse error| <= max(Δ̄, log E). To first order coef_j = w_j (Δ_j + Δ̄) and the lse bound
// is Δ̄; the exact form keeps the bound valid when Δ is not small (huge scores), where a key
// whose exact weight underflows can still take over. Inputs: log weights lw_j (−inf for
// excluded keys) and Δ_j; computed in the log domain so that nothing overflows to NaN.
double weight_perturbation(const std::vector<double>& lw, const std::vector<double>& delta, std::int64_t M,
                           std::vector<double>& coef);

// The reference result of one call and the per-element tolerance of the fused one.
struct Expected {
  Dims d;
  std::vector<float> out, lse;  // reference::attention, contiguous [B, Hq, N, Dv] and [B, Hq, N]
  std::vector<double> out_tol, lse_tol;
  std::int64_t empty_rows = 0;
  std::string error;       // the reference threw
  std::string ref_report;  // the reference disagrees with row_scores' softmax (empty: agrees)
};

// The reference result and tolerances for these inputs (see the derivation above).
Expected expect(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
                const AttentionOptions& opt);

struct Outcome {
  bool ok = true;
  std::string report;
  double out_ratio = 0, lse_ratio = 0;
};

// Compares a fused out (and lse, when given) with the expectation.
Outcome compare(const Expected& e, TensorView<const float> out, const TensorView<const float>* lse);

// Runs the fused kernel on the problem (both overloads: the one without lse must give the
// same out bitwise) and compares with the reference. `empty_rows` receives the reference's
// count of rows with no visible key.
Outcome run_check(Problem& p, std::int64_t* empty_rows = nullptr);

}  // namespace oracle

#define CHECK_PROBLEM(p)                                   \
  do {                                                     \
    const oracle::Outcome outcome_ = oracle::run_check(p); \
    INFO((p).describe());                                  \
    INFO(outcome_.report);                                 \
    CHECK(outcome_.ok);                                    \
    ::ftest::record_margin(std::max(outcome_.out_ratio, outcome_.lse_ratio)); \
    CHECK(outcome_.out_ratio <= ::ftest::kOptionsMarginFraction); \
    CHECK(outcome_.lse_ratio <= ::ftest::kOptionsMarginFraction); \
  } while (false)
