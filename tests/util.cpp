#include "util.hpp"

#include "kernels/variant_list.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iomanip>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

namespace ftest {

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::bhsd: return "bhsd";
    case Layout::bshd: return "bshd";
    case Layout::padded: return "padded";
    case Layout::sliced: return "sliced";
    case Layout::broadcast: return "broadcast";
  }
  return "?";
}

Tensor::Tensor(Shape shape, Layout layout, float pad) : shape_(shape), pad_(pad) {
  const std::int64_t B = shape[0], H = shape[1], S = shape[2], D = shape[3];
  std::int64_t size = 0;
  switch (layout) {
    case Layout::bhsd:
      strides_ = {H * S * D, S * D, D, 1};
      size = B * H * S * D;
      break;
    case Layout::bshd: {
      // Through the public helper, so the helper is exercised by every bshd case.
      const auto view = flashcpu::bshd<float>(nullptr, B, S, H, D);
      strides_ = view.strides;
      size = B * S * H * D;
      break;
    }
    case Layout::padded: {
      const std::int64_t row = D + 3, head = S * row + 5, batch = H * head + 7;
      strides_ = {batch, head, row, 1};
      size = B * batch;
      break;
    }
    case Layout::sliced: {
      const std::int64_t head = D + 7, seq = (H + 2) * head, batch = (S + 5) * seq;
      strides_ = {batch, head, seq, 1};
      offset_ = 2 * seq + 1 * head + 3;
      size = (B + 1) * batch;
      break;
    }
    case Layout::broadcast:
      strides_ = {0, S * D, D, 1};
      size = H * S * D;
      break;
  }
  // Never empty, so even an empty view has a non-null pointer. The layout starts on a
  // 64-byte boundary, as a user's aligned buffer would: with row strides that are whole
  // cache lines the library reads V in place, otherwise it packs it, and both must be tested.
  constexpr std::int64_t kLineFloats = 16;
  buf_.assign(static_cast<std::size_t>(std::max<std::int64_t>(size, 1) + kLineFloats), pad);
  const auto address = reinterpret_cast<std::uintptr_t>(buf_.data());
  offset_ += std::int64_t((64 - address % 64) % 64 / sizeof(float));
}

std::vector<float> Tensor::values() const {
  std::vector<float> all;
  for (std::int64_t b = 0; b < shape_[0]; ++b)
    for (std::int64_t h = 0; h < shape_[1]; ++h)
      for (std::int64_t s = 0; s < shape_[2]; ++s)
        for (std::int64_t d = 0; d < shape_[3]; ++d) all.push_back(at(b, h, s, d));
  return all;
}

void Tensor::fill_uniform(std::mt19937& rng, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  for (std::int64_t b = 0; b < shape_[0]; ++b)
    for (std::int64_t h = 0; h < shape_[1]; ++h)
      for (std::int64_t s = 0; s < shape_[2]; ++s)
        for (std::int64_t d = 0; d < shape_[3]; ++d) at(b, h, s, d) = lo == hi ? lo : dist(rng);
}

bool Tensor::padding_intact() const {
  std::vector<char> in_view(buf_.size(), 0);
  for (std::int64_t b = 0; b < shape_[0]; ++b)
    for (std::int64_t h = 0; h < shape_[1]; ++h)
      for (std::int64_t s = 0; s < shape_[2]; ++s)
        for (std::int64_t d = 0; d < shape_[3]; ++d) in_view[static_cast<std::size_t>(index(b, h, s, d))] = 1;
  for (std::size_t i = 0; i < buf_.size(); ++i)
    if (!in_view[i] && std::memcmp(&buf_[i], &pad_, sizeof(float)) != 0) return false;
  return true;
}

std::string describe(const flashcpu::TensorView<const float>& view) {
  std::ostringstream os;
  os << "shape {" << view.shape[0] << ", " << view.shape[1] << ", " << view.shape[2] << ", " << view.shape[3]
     << "} strides {" << view.strides[0] << ", " << view.strides[1] << ", " << view.strides[2] << ", "
     << view.strides[3] << "}";
  return os.str();
}

// ---------------------------------------------------------------------------------
// Tolerance.
//
// The fused kernel works in fp32 (unit roundoff u = 2^-24) with a vectorized exp2
// and online rescaling; the reference sums in double and rounds once. The bound is
// per element and first-order, computed from the exact (double) softmax weights w_j
// of the row:
//
//   |fused - ref| <= atol * V + rtol * |ref| + sum_j w_j (Δ_j + Δ̄) |v_jc - out_c|
//
// * Score error Δ_j (absolute, in the exponent): the fp32 dot product of length D
//   errs by at most γ_D · Σ_d |scale q_d k_jd| ≈ D·u·a_j (any summation order, FMA or
//   not; +2 for folding scale·log2(e) into q); subtracting the row max and forming
//   the exp2 argument add ≤ 4u(|s_j| + |m|); exp2 itself is good to a few ulp (8u).
//   Δ_j = u · ((D + 2)·a_j + 4(|s_j| + |m|) + 8).
// * Propagation: w_j = e^{s_j} / Σ_k e^{s_k}, so δw_j = w_j (δs_j − Σ_k w_k δs_k) and
//   δout_c = Σ_j δw_j v_jc = Σ_j w_j (δs_j − δs̄)(v_jc − out_c). Bounding |δs_j| by Δ_j
//   gives the last term. It is what makes scores of 1e4..1e5 testable: a nearly
//   one-hot row has w_j ≈ 0 or v_jc ≈ out_c for every j, so its bound stays tight, and a
//   row whose top scores are close gets the slack its conditioning demands.
// * atol = 1e-5 relative to V = Σ_j w_j |v_jc| (the size of what out_c sums, ≤ max|v|):
//   the fp32 sums Σ p_j v_jc, the running sum l and the α rescales of the online
//   softmax. Their worst case is γ_M; in practice blocked sums of mixed-sign terms err
//   like √M·u (Higham, ch. 4), and 1e-5 = 168u covers that with a wide margin for
//   every M tested here (≤ ~1600).
// * rtol = 1e-4 on |ref|: the final division by l and the fp32 rounding of the output
//   (1-2 u), with margin for the relative error of l (≤ M·u worst case).
// A row that sees no key must be exactly zero in both (tolerance 0).
//
// The reference is itself checked against the naive double computation done here,
// to 4u|out| + 1e-9·V plus 2u(|s_j| + |m|) per key for a float-vs-double default
// scale: both compute in double, so anything larger is a bug in the oracle.
// ---------------------------------------------------------------------------------
namespace {

constexpr double kU = 1.0 / 16777216.0;  // 2^-24, fp32 unit roundoff
constexpr double kAtol = 1e-5;
constexpr double kRtol = 1e-4;

inline float elem(const flashcpu::TensorView<const float>& t, std::int64_t b, std::int64_t h, std::int64_t s,
                  std::int64_t d) {
  return t.data[b * t.strides[0] + h * t.strides[1] + s * t.strides[2] + d * t.strides[3]];
}

struct Worst {
  double ratio = -1;
  std::int64_t b = 0, h = 0, i = 0, c = 0;
  double got = 0, want = 0, tol = 0;
  std::int64_t violations = 0;

  void record(double got_, double want_, double tol_, std::int64_t b_, std::int64_t h_, std::int64_t i_,
              std::int64_t c_) {
    const double err = std::fabs(got_ - want_);
    const bool bad = !(err <= tol_);  // NaN counts as bad
    double r = tol_ > 0 ? err / tol_ : (err == 0 ? 0 : std::numeric_limits<double>::infinity());
    if (std::isnan(r) || std::isnan(got_)) r = std::numeric_limits<double>::infinity();
    if (bad) ++violations;
    if (r > ratio) {
      ratio = r, got = got_, want = want_, tol = tol_;
      b = b_, h = h_, i = i_, c = c_;
    }
  }
  std::string text(const char* got_name, const char* want_name) const {
    std::ostringstream os;
    os << std::setprecision(9) << "worst at (b, h, i, c) = (" << b << ", " << h << ", " << i << ", " << c
       << "): " << got_name << " = " << got << ", " << want_name << " = " << want
       << ", |diff| = " << std::fabs(got - want) << ", tol = " << tol << " (|diff|/tol = " << ratio << ")";
    return os.str();
  }
};

}  // namespace

Result compare_with_reference(flashcpu::TensorView<const float> q, flashcpu::TensorView<const float> k,
                              flashcpu::TensorView<const float> v, const flashcpu::AttentionOptions& options,
                              flashcpu::TensorView<const float> out) {
  const std::int64_t B = q.shape[0], Hq = q.shape[1], N = q.shape[2], D = q.shape[3];
  const std::int64_t Hkv = k.shape[1], M = k.shape[2], Dv = v.shape[3];
  Result result;

  Tensor ref({B, Hq, N, Dv}, Layout::bhsd, std::numeric_limits<float>::quiet_NaN());
  try {
    flashcpu::reference::attention(q, k, v, ref.view(), options);
  } catch (const std::exception& e) {
    result.ok = false;
    result.report = std::string("reference::attention threw: ") + e.what();
    return result;
  }
  const auto rv = ref.cview();

  const double scale = options.scale ? double(*options.scale) : 1.0 / std::sqrt(double(D));
  const std::int64_t group = Hkv > 0 ? Hq / Hkv : 1;
  Worst fused_worst, ref_worst;
  std::vector<double> s(static_cast<std::size_t>(M)), a(s.size()), w(s.size()), delta(s.size()),
      eref(s.size());

  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t g = h / group;
      for (std::int64_t i = 0; i < N; ++i) {
        // Keys this row sees: j <= i + (M - N) when causal (bottom-right aligned).
        const std::int64_t visible = options.causal ? std::clamp<std::int64_t>(i + (M - N) + 1, 0, M) : M;
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < visible; ++j) {
          double dot = 0, dot_abs = 0;
          for (std::int64_t d = 0; d < D; ++d) {
            const double p = double(elem(q, b, h, i, d)) * double(elem(k, b, g, j, d));
            dot += p;
            dot_abs += std::fabs(p);
          }
          s[j] = scale * dot;
          a[j] = std::fabs(scale) * dot_abs;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (std::int64_t j = 0; j < visible; ++j) sum += (w[j] = std::exp(s[j] - m));
        double delta_bar = 0, eref_bar = 0;
        for (std::int64_t j = 0; j < visible; ++j) {
          w[j] /= sum;
          delta[j] = kU * (double(D + 2) * a[j] + 4 * (std::fabs(s[j]) + std::fabs(m)) + 8);
          eref[j] = 2 * kU * (std::fabs(s[j]) + std::fabs(m));
          delta_bar += w[j] * delta[j];
          eref_bar += w[j] * eref[j];
        }
        for (std::int64_t c = 0; c < Dv; ++c) {
          double o = 0, mag = 0;
          for (std::int64_t j = 0; j < visible; ++j) {
            const double x = elem(v, b, g, j, c);
            o += w[j] * x;
            mag += w[j] * std::fabs(x);
          }
          double dev = 0, dev_ref = 0;
          for (std::int64_t j = 0; j < visible; ++j) {
            const double spread = w[j] * std::fabs(double(elem(v, b, g, j, c)) - o);
            dev += spread * (delta[j] + delta_bar);
            dev_ref += spread * (eref[j] + eref_bar);
          }
          const double r = elem(rv, b, h, i, c);
          const double f = elem(out, b, h, i, c);
          ref_worst.record(r, o, 4 * kU * std::fabs(o) + 1e-9 * mag + dev_ref, b, h, i, c);
          fused_worst.record(f, r, kAtol * mag + kRtol * std::fabs(r) + dev, b, h, i, c);
        }
      }
    }

  std::ostringstream os;
  os << "elements " << B * Hq * N * Dv;
  if (fused_worst.violations > 0) {
    result.ok = false;
    os << "\nFUSED MISMATCH: " << fused_worst.violations << " element(s) out of tolerance; "
       << fused_worst.text("fused", "reference");
  } else if (fused_worst.ratio >= 0) {
    os << ", max |fused - ref| / tol = " << fused_worst.ratio;
  }
  if (ref_worst.violations > 0) {
    result.ok = false;
    os << "\nREFERENCE DISAGREES with the test's naive double computation: " << ref_worst.violations
       << " element(s); " << ref_worst.text("reference", "naive");
  }
  result.worst_ratio = fused_worst.ratio;
  result.report = os.str();
  return result;
}

std::string Case::describe() const {
  std::ostringstream os;
  os << "case: B=" << B << " Hq=" << Hq << " Hkv=" << Hkv << " N=" << N << " M=" << M << " D=" << D
     << " Dv=" << Dv << " causal=" << causal << " scale=";
  if (scale)
    os << *scale;
  else
    os << "default";
  os << " threads=" << threads << " layouts q/k/v/out=" << layout_name(lq) << "/" << layout_name(lk) << "/"
     << layout_name(lv) << "/" << layout_name(lo) << " q,k in [" << qk_lo << ", " << qk_hi << "] v in [" << v_lo
     << ", " << v_hi << "] seed=" << seed << " isa=" << flashcpu::active_isa();
  return os.str();
}

namespace {

constexpr float kOutSentinel = -12345.5f;

struct Built {
  Tensor q, k, v, out;
  flashcpu::AttentionOptions options;
};

Built build(const Case& c) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Built t{Tensor({c.B, c.Hq, c.N, c.D}, c.lq, nan), Tensor({c.B, c.Hkv, c.M, c.D}, c.lk, nan),
          Tensor({c.B, c.Hkv, c.M, c.Dv}, c.lv, nan), Tensor({c.B, c.Hq, c.N, c.Dv}, c.lo, kOutSentinel), {}};
  std::mt19937 rng(c.seed);
  t.q.fill_uniform(rng, c.qk_lo, c.qk_hi);
  t.k.fill_uniform(rng, c.qk_lo, c.qk_hi);
  t.v.fill_uniform(rng, c.v_lo, c.v_hi);
  t.options.scale = c.scale;
  t.options.causal = c.causal;
  t.options.num_threads = c.threads;
  return t;
}

}  // namespace

Result run_case(const Case& c) {
  Built t = build(c);
  try {
    flashcpu::attention(t.q.cview(), t.k.cview(), t.v.cview(), t.out.view(), t.options);
  } catch (const std::exception& e) {
    return {false, std::string("flashcpu::attention threw: ") + e.what(), 0};
  }
  Result r = compare_with_reference(t.q.cview(), t.k.cview(), t.v.cview(), t.options, t.out.cview());
  if (!t.out.padding_intact()) {
    r.ok = false;
    r.report += "\nflashcpu::attention wrote outside out's view (padding changed)";
  }
  // FTEST_VERBOSE=1: one line per case, to see how close to the bound the kernel runs.
  static const bool verbose = std::getenv("FTEST_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "%s | %s\n", c.describe().c_str(), r.report.c_str());
  return r;
}

std::vector<float> run_fused_buffer(const Case& c) {
  Built t = build(c);
  flashcpu::attention(t.q.cview(), t.k.cview(), t.v.cview(), t.out.view(), t.options);
  return t.out.values();
}

// The fp32 variant of the level, or of the highest level below it that has one (the AMX
// level is bf16 only), as dispatch picks it (kernels/variants.inc).
static const flashcpu::variant_list::Variant& f32_variant(const std::string& isa) {
  using flashcpu::variant_list::kLevels;
  int level = flashcpu::variant_list::kLevelCount - 1;
  while (level >= 0 && isa != kLevels[level]) --level;
  for (; level >= 0; --level)
    for (const auto& v : flashcpu::variant_list::kVariants)
      if (std::string(kLevels[level]) == v.isa && std::string(v.kv) == "f32") return v;
  throw std::runtime_error("no f32 variant for ISA " + isa);
}
int micro_rows(const std::string& isa) { return f32_variant(isa).mr; }
int key_panel(const std::string& isa) { return f32_variant(isa).nr; }
std::string f32_tile_isa(const std::string& isa) { return f32_variant(isa).isa; }

TileOverride::TileOverride(std::int64_t head_dim, flashcpu::TileConfig tiles)
    : isa_(f32_tile_isa(flashcpu::active_isa())), head_dim_(head_dim) {
  flashcpu::set_tile_config(isa_, head_dim_, tiles);
}
TileOverride::~TileOverride() { flashcpu::set_tile_config(isa_, head_dim_, std::nullopt); }

std::vector<std::int64_t> edge_lengths(std::int64_t tile) {
  std::vector<std::int64_t> lengths{1, tile - 1, tile, tile + 1, 3 * tile + 5};
  lengths.erase(std::remove_if(lengths.begin(), lengths.end(), [](std::int64_t n) { return n < 1; }),
                lengths.end());
  std::sort(lengths.begin(), lengths.end());
  lengths.erase(std::unique(lengths.begin(), lengths.end()), lengths.end());
  return lengths;
}

namespace {
std::mutex g_margin_mutex;
std::map<std::string, double> g_margins;  // test case -> largest fraction of its bound
}  // namespace

void record_margin(double ratio) {
  const std::string name = Catch::getResultCapture().getCurrentTestName();
  std::lock_guard<std::mutex> lock(g_margin_mutex);
  double& worst = g_margins[name];
  worst = std::max(worst, ratio);
}

std::string margin_summary() {
  std::lock_guard<std::mutex> lock(g_margin_mutex);
  std::ostringstream os;
  for (const auto& [name, worst] : g_margins) os << "  " << worst << "  " << name << "\n";
  return os.str();
}

}  // namespace ftest
