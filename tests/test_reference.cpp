// The oracle checked on its own: hand-computed softmaxes, uniform attention, the
// causal alignment, the grouped-query head mapping and stride invariance. Each
// hand case also runs through the fused kernel. Plus the bhsd/bshd view helpers.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "util.hpp"

namespace {

using flashcpu::TensorView;

// Runs `fn` (flashcpu::attention or flashcpu::reference::attention) on contiguous
// BHSD buffers and returns out.
template <class Fn>
std::vector<float> run_bhsd(Fn fn, const std::vector<float>& q, const std::vector<float>& k,
                            const std::vector<float>& v, ftest::Shape qs, ftest::Shape ks, std::int64_t dv,
                            const flashcpu::AttentionOptions& options) {
  std::vector<float> out(static_cast<std::size_t>(qs[0] * qs[1] * qs[2] * dv), -777.0f);
  fn(flashcpu::bhsd<const float>(q.data(), qs[0], qs[1], qs[2], qs[3]),
     flashcpu::bhsd<const float>(k.data(), ks[0], ks[1], ks[2], ks[3]),
     flashcpu::bhsd<const float>(v.data(), ks[0], ks[1], ks[2], dv), flashcpu::bhsd(out.data(), qs[0], qs[1], qs[2], dv),
     options);
  return out;
}

void fused(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v, TensorView<float> o,
           const flashcpu::AttentionOptions& opt) {
  flashcpu::attention(q, k, v, o, opt);
}
void oracle(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v, TensorView<float> o,
            const flashcpu::AttentionOptions& opt) {
  flashcpu::reference::attention(q, k, v, o, opt);
}

// The oracle must be right to double precision rounded once (relative 1e-6 is ~17 u of
// fp32). The fused kernel: relative 1e-5, or absolute 1e-5 (the atol of util.cpp with
// |v| <= ~8) for outputs that cancel, e.g. (3 - e)/(1 + e) = 0.076 below, where a few
// ulp of error in each weight is 1e-6 absolute but 1e-5 relative.
constexpr double kOracleEps = 1e-6;
constexpr double kFusedEps = 1e-5;
constexpr double kFusedMargin = 1e-5;

}  // namespace

TEST_CASE("reference: hand-computed two-key softmax", "[reference]") {
  // N=1, M=2, D=1, scale=1: scores 2*0.5 = 1 and 2*1.5 = 3, so
  // w0 = 1/(1+e^2), w1 = e^2/(1+e^2), out = w0*v0 + w1*v1.
  const std::vector<float> q{2.0f}, k{0.5f, 1.5f}, v{1.0f, -2.0f, 4.0f, 8.0f};
  flashcpu::AttentionOptions opt;
  opt.scale = 1.0f;
  const double e2 = std::exp(2.0), w0 = 1 / (1 + e2), w1 = e2 / (1 + e2);
  const double want[2] = {w0 * 1 + w1 * 4, w0 * -2 + w1 * 8};
  const auto r = run_bhsd(oracle, q, k, v, {1, 1, 1, 1}, {1, 1, 2, 1}, 2, opt);
  const auto f = run_bhsd(fused, q, k, v, {1, 1, 1, 1}, {1, 1, 2, 1}, 2, opt);
  for (int c = 0; c < 2; ++c) {
    CHECK(r[c] == Approx(want[c]).epsilon(kOracleEps));
    CHECK(f[c] == Approx(want[c]).epsilon(kFusedEps).margin(kFusedMargin));
  }
}

TEST_CASE("reference: the default scale is 1/sqrt(D)", "[reference]") {
  // D=4: q.k0 = 0, q.k1 = 2, scale 1/2, so scores 0 and 1: out = (3 - e)/(1 + e).
  const std::vector<float> q{1, 1, 1, 1}, k{0, 0, 0, 0, 0.5f, 0.5f, 0.5f, 0.5f}, v{3, -1};
  const double e = std::exp(1.0), want = (3 - e) / (1 + e);
  const auto r = run_bhsd(oracle, q, k, v, {1, 1, 1, 4}, {1, 1, 2, 4}, 1, {});
  const auto f = run_bhsd(fused, q, k, v, {1, 1, 1, 4}, {1, 1, 2, 4}, 1, {});
  CHECK(r[0] == Approx(want).epsilon(kOracleEps));
  CHECK(f[0] == Approx(want).epsilon(kFusedEps).margin(kFusedMargin));
}

TEST_CASE("reference: causal mask is aligned bottom-right", "[reference][causal]") {
  flashcpu::AttentionOptions opt;
  opt.causal = true;
  opt.scale = 1.0f;
  SECTION("N > M: the first N - M rows see no key and are zero") {
    // N=3, M=2: row 0 sees j <= -1 (none), row 1 sees key 0, row 2 sees both with
    // scores 2 and -2.
    const std::vector<float> q{0.5f, 1.0f, 2.0f}, k{1.0f, -1.0f}, v{10.0f, 20.0f};
    const double e = std::exp(-4.0), row2 = (10 + 20 * e) / (1 + e);
    for (auto fn : {oracle, fused}) {
      const auto o = run_bhsd(fn, q, k, v, {1, 1, 3, 1}, {1, 1, 2, 1}, 1, opt);
      CHECK(o[0] == 0.0f);
      CHECK(o[1] == Approx(10.0).epsilon(kOracleEps));
      CHECK(o[2] == Approx(row2).epsilon(kFusedEps).margin(kFusedMargin));
    }
  }
  SECTION("N < M: row i sees keys 0..i + M - N") {
    // All scores 0: each row averages the v rows it sees. N=2, M=3.
    const std::vector<float> q{0.0f, 0.0f}, k{1.0f, 2.0f, 3.0f}, v{3.0f, 6.0f, 30.0f};
    for (auto fn : {oracle, fused}) {
      const auto o = run_bhsd(fn, q, k, v, {1, 1, 2, 1}, {1, 1, 3, 1}, 1, opt);
      CHECK(o[0] == Approx(4.5).epsilon(kFusedEps).margin(kFusedMargin));
      CHECK(o[1] == Approx(13.0).epsilon(kFusedEps).margin(kFusedMargin));
    }
  }
  SECTION("N == M: lower triangle") {
    const std::vector<float> q{0.0f, 0.0f, 0.0f}, k{1.0f, 2.0f, 3.0f}, v{3.0f, 6.0f, 30.0f};
    for (auto fn : {oracle, fused}) {
      const auto o = run_bhsd(fn, q, k, v, {1, 1, 3, 1}, {1, 1, 3, 1}, 1, opt);
      CHECK(o[0] == Approx(3.0).epsilon(kFusedEps).margin(kFusedMargin));
      CHECK(o[1] == Approx(4.5).epsilon(kFusedEps).margin(kFusedMargin));
      CHECK(o[2] == Approx(13.0).epsilon(kFusedEps).margin(kFusedMargin));
    }
  }
}

TEST_CASE("reference: equal scores give the mean of the v rows", "[reference]") {
  const std::int64_t B = 2, H = 3, N = 5, M = 37, D = 17, Dv = 9;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1, 1);
  std::vector<float> q(B * H * N * D), k(B * H * M * D), v(B * H * M * Dv);
  for (auto& x : k) x = dist(rng);
  for (auto& x : v) x = dist(rng);
  for (auto& x : q) x = dist(rng);

  // Either q = 0 or scale = 0 makes every score 0.
  std::vector<float> zero_q(q.size(), 0.0f);
  flashcpu::AttentionOptions zero_scale;
  zero_scale.scale = 0.0f;
  struct Variant {
    const char* name;
    const std::vector<float>* q;
    flashcpu::AttentionOptions opt;
  };
  for (const Variant& var : {Variant{"q = 0", &zero_q, {}}, Variant{"scale = 0", &q, zero_scale}}) {
    const auto r = run_bhsd(oracle, *var.q, k, v, {B, H, N, D}, {B, H, M, D}, Dv, var.opt);
    const auto f = run_bhsd(fused, *var.q, k, v, {B, H, N, D}, {B, H, M, D}, Dv, var.opt);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t c = 0; c < Dv; ++c) {
          double mean = 0;
          for (std::int64_t j = 0; j < M; ++j) mean += v[((b * H + h) * M + j) * Dv + c];
          mean /= double(M);
          for (std::int64_t i = 0; i < N; ++i) {
            const std::size_t at = static_cast<std::size_t>(((b * H + h) * N + i) * Dv + c);
            INFO(var.name << " at (b, h, i, c) = (" << b << ", " << h << ", " << i << ", " << c << ")");
            // |v| <= 1: absolute margins. Fused: M-term fp32 sum, ~M u = 2e-6.
            CHECK(r[at] == Approx(mean).margin(1e-6));
            CHECK(f[at] == Approx(mean).margin(1e-5));
          }
        }
  }
}

TEST_CASE("reference: query head h reads KV head h / (Hq / Hkv)", "[reference][gqa]") {
  // v of KV head g is the constant 10 (g + 1) + c in column c, whatever the key, so
  // out(h, i, c) = 10 (h / group + 1) + c for any attention weights.
  const std::int64_t B = 2, N = 3, M = 5, D = 3, Dv = 2;
  for (const auto& [Hq, Hkv] : {std::pair<std::int64_t, std::int64_t>{4, 2}, {8, 2}, {3, 1}, {4, 4}}) {
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> dist(-1, 1);
    std::vector<float> q(B * Hq * N * D), k(B * Hkv * M * D), v(B * Hkv * M * Dv);
    for (auto& x : q) x = dist(rng);
    for (auto& x : k) x = dist(rng);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t g = 0; g < Hkv; ++g)
        for (std::int64_t j = 0; j < M; ++j)
          for (std::int64_t c = 0; c < Dv; ++c) v[((b * Hkv + g) * M + j) * Dv + c] = float(10 * (g + 1) + c);
    for (auto fn : {oracle, fused}) {
      const auto o = run_bhsd(fn, q, k, v, {B, Hq, N, D}, {B, Hkv, M, D}, Dv, {});
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < Hq; ++h)
          for (std::int64_t i = 0; i < N; ++i)
            for (std::int64_t c = 0; c < Dv; ++c) {
              INFO("Hq=" << Hq << " Hkv=" << Hkv << " (b, h, i, c) = (" << b << ", " << h << ", " << i << ", " << c
                         << ")");
              CHECK(o[((b * Hq + h) * N + i) * Dv + c] == Approx(10 * (h / (Hq / Hkv) + 1) + c).epsilon(kFusedEps).margin(kFusedMargin));
            }
    }
  }
}

TEST_CASE("reference: same values through any strides give bitwise the same out", "[reference][strides]") {
  const std::int64_t B = 2, Hq = 4, Hkv = 2, N = 9, M = 13, D = 5, Dv = 7;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  ftest::Tensor q0({B, Hq, N, D}, ftest::Layout::bhsd, nan), k0({B, Hkv, M, D}, ftest::Layout::bhsd, nan),
      v0({B, Hkv, M, Dv}, ftest::Layout::bhsd, nan), o0({B, Hq, N, Dv}, ftest::Layout::bhsd, 0.0f);
  std::mt19937 rng(3);
  q0.fill_uniform(rng, -1, 1);
  k0.fill_uniform(rng, -1, 1);
  v0.fill_uniform(rng, -1, 1);
  flashcpu::AttentionOptions opt;
  opt.causal = true;
  flashcpu::reference::attention(q0.cview(), k0.cview(), v0.cview(), o0.view(), opt);

  auto copy = [&](const ftest::Tensor& from, ftest::Layout layout) {
    ftest::Tensor to(from.shape(), layout, nan);
    const auto& s = from.shape();
    for (std::int64_t b = 0; b < s[0]; ++b)
      for (std::int64_t h = 0; h < s[1]; ++h)
        for (std::int64_t i = 0; i < s[2]; ++i)
          for (std::int64_t d = 0; d < s[3]; ++d) to.at(b, h, i, d) = from.at(b, h, i, d);
    return to;
  };
  for (const auto layout : {ftest::Layout::bshd, ftest::Layout::padded, ftest::Layout::sliced}) {
    INFO("layout " << ftest::layout_name(layout));
    const auto q = copy(q0, layout), k = copy(k0, layout), v = copy(v0, layout);
    ftest::Tensor o({B, Hq, N, Dv}, layout, -5.0f);
    flashcpu::reference::attention(q.cview(), k.cview(), v.cview(), o.view(), opt);
    CHECK(o.padding_intact());
    bool same = true;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < Hq; ++h)
        for (std::int64_t i = 0; i < N; ++i)
          for (std::int64_t c = 0; c < Dv; ++c) {
            const float x = o.at(b, h, i, c), y = o0.at(b, h, i, c);
            same = same && std::memcmp(&x, &y, sizeof x) == 0;
          }
    CHECK(same);
  }
}

TEST_CASE("reference agrees with the test's independent naive computation", "[reference]") {
  // compare_with_reference checks the oracle against its own double computation in
  // every forward test; these cases only make that explicit for GQA, causal and strides.
  ftest::Case c;
  c.B = 2, c.Hq = 6, c.Hkv = 3, c.N = 11, c.M = 19, c.D = 7, c.Dv = 5;
  for (const bool causal : {false, true}) {
    c.causal = causal;
    c.lq = ftest::Layout::sliced, c.lk = ftest::Layout::bshd, c.lv = ftest::Layout::padded;
    FTEST_CHECK_CASE(c);
    c.N = 23;  // N > M
    FTEST_CHECK_CASE(c);
  }
}

TEST_CASE("bhsd and bshd produce the documented strides", "[views]") {
  float buf[1] = {0};
  const auto a = flashcpu::bhsd(buf, 2, 3, 5, 7);
  CHECK(a.data == buf);
  CHECK(a.shape == ftest::Shape{2, 3, 5, 7});
  CHECK(a.strides == ftest::Shape{105, 35, 7, 1});

  // bshd takes (b, s, h, d) and presents [b, h, s, d].
  const auto b = flashcpu::bshd(buf, 2, 5, 3, 7);
  CHECK(b.shape == ftest::Shape{2, 3, 5, 7});
  CHECK(b.strides == ftest::Shape{105, 7, 21, 1});

  // Element (batch, seq, head, dim) of a BSHD buffer is at ((batch*S + seq)*H + head)*D + dim.
  const std::int64_t S = 5, H = 3, D = 7;
  for (std::int64_t bb = 0; bb < 2; ++bb)
    for (std::int64_t s = 0; s < S; ++s)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d)
          CHECK(bb * b.strides[0] + h * b.strides[1] + s * b.strides[2] + d * b.strides[3] ==
                ((bb * S + s) * H + h) * D + d);

  // A mutable view converts to a read-only one with the same fields.
  const flashcpu::TensorView<const float> c = a;
  CHECK(c.data == buf);
  CHECK(c.shape == a.shape);
  CHECK(c.strides == a.strides);
}
