// The score functions and kernel regression against their oracles: dot-product, Gaussian
// and additive (Bahdanau) scores over randomized shapes (D = 1 and D not a multiple of
// any vector width, prefill and decode, with causal, a mask and lse); the Gaussian where
// every weight but the nearest underflows and on data far from the origin; the additive
// score's weights; reference::attention_weights; Nadaraya-Watson with each kernel, empty
// neighbourhoods, huge distances, a hand-checked case and bad bandwidths.
//
// The attention helpers (Problem, row_scores, expect, compare) are in
// attention_oracle.hpp, shared with test_options.cpp; their tolerance is documented there.
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

#include "attention_oracle.hpp"
#include "util.hpp"

namespace {

// Problem, expect, compare, the constants and tolerances, and the flashcpu / ftest names
// they use (AttentionOptions, Score, TensorView, Layout, Shape, Tensor).
using namespace oracle;

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
  // (N > 48), decode (N <= 16, up to 1500 keys: several split-KV chunks) and short prompts
  // on the decode driver (N = 17 to 41, at most 48 stacked rows); causal and a mask on
  // about half the cases each; lse always compared.
  std::mt19937 rng(8080);
  const std::int64_t dims[] = {1, 3, 8, 17, 32, 33};
  const std::int64_t value_dims[] = {1, 5, 16, 23};
  const std::pair<std::int64_t, std::int64_t> heads[] = {{1, 1}, {4, 2}, {8, 2}, {3, 1}};
  const std::int64_t prefill_n[] = {49, 61, 64, 100}, prefill_m[] = {5, 64, 257, 400};
  const std::int64_t decode_n[] = {1, 2, 7, 16}, decode_m[] = {1, 300, 700, 1500};
  const std::int64_t short_n[] = {17, 24, 29, 41};
  const char* const path_names[] = {" (prefill driver)", " (decode driver)", " (short prompt, decode driver)"};
  const float scales[] = {0.0f, 0.0f, 0.3f, 1.7f};  // 0: the score's default
  const Layout layouts[] = {Layout::padded, Layout::bshd, Layout::sliced, Layout::bhsd};
  std::uint32_t seed = 8000;
  int causal = 0, masked = 0;  // what the random choices covered, of 54 cases
  for (const Score score : kScores)
    for (const std::int64_t D : dims)
      for (const int path : {0, 1, 2}) {
        const bool decode = path != 0;
        Dims d{};
        d.D = D;
        do {
          d.Dv = pick(rng, value_dims);
          std::tie(d.Hq, d.Hkv) = pick(rng, heads);
          d.B = 1 + std::int64_t(rng() % 2);
          d.N = path == 0 ? pick(rng, prefill_n) : path == 1 ? pick(rng, decode_n) : pick(rng, short_n);
          d.M = decode ? pick(rng, decode_m) : pick(rng, prefill_m);
        } while (d.B * d.Hq * d.N * d.M * (d.D + d.Dv) > 3'000'000 || on_decode_driver(d) != decode);
        ++seed;
        Problem p(d, seed, layouts[seed % 4]);
        set_score(p, score);
        if (rng() % 2) p.causal(), ++causal;
        if (rng() % 2) p.full_mask(0.05), ++masked;
        if (const float s = pick(rng, scales); s != 0.0f) p.scale(s);
        INFO("score " << score_name(score) << path_names[path]);
        CHECK_PROBLEM(p);
      }
  INFO(causal << " causal and " << masked << " masked cases of 54");
  CHECK(causal >= 9);
  CHECK(causal <= 45);
  CHECK(masked >= 9);
  CHECK(masked <= 45);
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
              // lse = the nearest key's score -|q - k|^2 / 2 (the others add < e^-600), to
              // 1e-3 of its size: the distances here are about 40^2, computed in fp32.
              lse_worst.record(p.lse.at(b, h, i, 0), -0.5 * best, 1e-3 * (1 + 0.5 * best), b, h, i, nearest);
            }
        INFO(p.describe());
        INFO(worst.text("out vs the nearest key's v row (c = the nearest key's index)", "fused", "nearest v"));
        INFO(lse_worst.text("lse vs the nearest key's exact score (c = the nearest key's index)", "fused lse",
                            "-|q - k_nearest|^2 / 2"));
        CHECK(finite);
        CHECK(worst.bad == 0);
        CHECK(lse_worst.bad == 0);
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
    const Dims d = decode ? Dims{1, 8, 2, 2, 900, D, 9} : Dims{1, 4, 2, 30, 150, D, 9};
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
  for (const Dims& d : {Dims{2, 4, 2, 30, 30, 7, 3}, Dims{2, 4, 2, 1, 700, 7, 3}}) {
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
//   ε_j = u · ((D + 10)·2·(|x_q − c|² + |x_j − c|²)/h² + 8x + 16)
// (as for the Gaussian score, attention_oracle.hpp: c = training point 0, each point its
// own distance), then maps it to
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
  std::vector<double> train_r2(Ms);  // each training point's squared distance to point 0
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.H; ++h) {
      for (std::int64_t j = 0; j < d.M; ++j) {
        double r2 = 0;
        for (std::int64_t c = 0; c < d.D; ++c) {
          const double t = double(p.xt.at(b, h, j, c)) - double(p.xt.at(b, h, 0, c));
          r2 += t * t;
        }
        train_r2[std::size_t(j)] = r2;
      }
      for (std::int64_t i = 0; i < d.N; ++i) {
        double query_r2 = 0;
        for (std::int64_t c = 0; c < d.D && d.M > 0; ++c) {
          const double t = double(p.xq.at(b, h, i, c)) - double(p.xt.at(b, h, 0, c));
          query_r2 += t * t;
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
          const double eps = kU * (double(d.D + 10) * 2 * (query_r2 + train_r2[std::size_t(j)]) / h2 + 8 * xj + 16);
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
  std::int64_t empty_queries = 0;  // the small supports must leave some queries empty
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
        empty_queries += o.empty_rows;
      }
  INFO(empty_queries << " queries with no training point in the support");
  CHECK(empty_queries > 0);
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
