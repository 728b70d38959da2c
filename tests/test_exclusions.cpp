// What a call excludes never reaches its result, whatever the excluded keys' K and V
// rows hold; and rows masked entirely by large finite values are still softmaxes.
//
// An inference engine hands over a KV cache with stale or uninitialized slots past
// each sequence's length, and masks from frameworks that pad with -FLT_MAX. Here:
//  - Poisoning: for one query row i* (of one head, batch and KV head), every key that
//    row cannot see gets NaN, +inf, -inf or 1e38 in its K and V rows. Every output row
//    that sees none of those keys, i* and the other rows of its tile included, must be
//    bitwise what the clean run gave (out and lse); every row that sees one, with NaN
//    poison, must be NaN throughout (a visible NaN propagates, as in the oracle).
//    Visibility comes from reference::attention_weights: a weight of exactly 0 means
//    excluded (the scores here are far from underflow).
//  - Every exclusion: causal (N = M, N < M, N > M), the window on either side,
//    key_lengths, bool_mask and -inf entries of the additive mask; on every path:
//    prefill, decode (split-KV chunks, K packed and K read in place) and the lanes
//    kernel. The test binary runs once per ISA (FLASHCPU_ISA), so every kernel is seen.
//  - Finite masks: a row masked by -FLT_MAX (torch.finfo(float32).min) or -1e9 in every
//    entry sees all its keys; in fp32 those scores are all equal, so the result is the
//    uniform average of the value rows: neither zeros nor NaN.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention_oracle.hpp"
#include "util.hpp"

namespace {

using namespace oracle;

// Prefill (square, N < M, N > M), decode (split-KV over several chunks; D = 32 reads K
// in place), and the lanes kernel's shape: 16 query heads on one KV head, dot product.
const Dims kSquare{1, 4, 2, 70, 70, 19, 13};
const Dims kWide{2, 4, 2, 37, 300, 24, 17};
const Dims kTall{1, 2, 1, 90, 61, 16, 8};
const Dims kDecode{2, 4, 2, 3, 1500, 17, 9};
const Dims kDecodeInPlace{1, 8, 2, 2, 1300, 32, 16};
const Dims kLanes{1, 16, 1, 1, 1100, 32, 16};
const Dims kLanes2{1, 16, 1, 2, 700, 64, 24};

struct Exclusion {
  const char* name;
  std::function<void(Problem&)> apply;
  bool lanes_ok;            // no mask: the lanes kernel can take it
  bool finite_poison = true;  // also poison with 1e38 (see the Gaussian entry)
  bool bitwise = true;        // unaffected rows bitwise equal (else within 1e-5, see below)
};

std::vector<std::int32_t> lengths_of(const Dims& d) {
  std::vector<std::int32_t> l;
  for (std::int64_t b = 0; b < d.B; ++b) l.push_back(std::int32_t(b == 0 ? d.M - 29 : d.M / 2 + 3));
  return l;
}

const std::vector<Exclusion>& exclusions() {
  static const std::vector<Exclusion> list = {
      {"causal", [](Problem& p) { p.causal(); }, true},
      {"window left", [](Problem& p) { p.window(p.d.M / 4 + 1, -1); }, true},
      {"window right", [](Problem& p) { p.window(-1, 3); }, true},
      {"causal + window", [](Problem& p) { p.causal(), p.window(p.d.M / 3, 0); }, true},
      {"key_lengths", [](Problem& p) { p.key_lengths(lengths_of(p.d)); }, true},
      {"bool_mask", [](Problem& p) { p.full_bool(0.3); }, false},
      {"-inf mask", [](Problem& p) { p.full_mask(0.3); }, false},
      {"everything",
       [](Problem& p) {
         p.causal();
         p.window(p.d.M / 2, 1);
         p.key_lengths(lengths_of(p.d));
         p.full_bool(0.1);
         p.full_mask(0.1);
       },
       false},
      // The Gaussian score (D >= 32: expanded around key 0, which this window excludes
      // for later rows). A NaN or inf in key 0 moves the expansion's center to the
      // origin, so unaffected rows change in their last bits (within 1e-5, not bitwise);
      // a finite 1e38 in key 0 would still become the center and cost the visible keys
      // their precision (not handled yet), so that poison is left out here.
      {"gaussian + window left", [](Problem& p) { p.gaussian(), p.window(p.d.M / 4 + 1, -1); }, false, false, false},
  };
  return list;
}

struct Outputs {
  std::vector<float> out, lse;
};

Outputs run_fused(Problem& p) {
  flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
  return {p.out.values(), p.lse.values()};
}

bool same_bits(const float* a, const float* b, std::int64_t n) {
  return std::memcmp(a, b, std::size_t(n) * sizeof(float)) == 0;
}

// Poisons, for a query row i* of head h* in batch b* that cannot see some key, every
// key that row cannot see, and checks the rule above. Returns the number of rows checked
// bitwise, or -1 when no row of the problem has an excluded key (nothing to poison).
bool close(const float* a, const float* b, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c)
    if (!(std::fabs(double(a[c]) - double(b[c])) <= 1e-5 + 1e-4 * std::fabs(double(b[c])))) return false;
  return true;
}

std::int64_t check_poisoned(const Dims& d, const Exclusion& ex, std::uint32_t seed, float poison) {
  Problem p(d, seed);
  ex.apply(p);
  const Outputs clean = run_fused(p);

  std::vector<float> w(std::size_t(d.B * d.Hq * d.N * d.M));
  const TensorView<float> wv = flashcpu::bhsd(w.data(), d.B, d.Hq, d.N, d.M);
  flashcpu::reference::attention_weights(p.q.cview(), p.k.cview(), wv, p.opt);
  auto weight = [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
    return w[std::size_t(((b * d.Hq + h) * d.N + i) * d.M + j)];
  };
  auto excludes_some = [&](std::int64_t b, std::int64_t h, std::int64_t i) {
    for (std::int64_t j = 0; j < d.M; ++j)
      if (weight(b, h, i, j) == 0.0f) return true;
    return false;
  };

  // The first row from a random start that excludes a key: (b*, h*, i*).
  std::mt19937 rng(seed);
  const std::int64_t rows = d.B * d.Hq * d.N, start = std::int64_t(rng() % std::uint32_t(rows));
  std::int64_t star = -1;
  for (std::int64_t t = 0; t < rows && star < 0; ++t) {
    const std::int64_t r = (start + t) % rows;
    if (excludes_some(r / (d.Hq * d.N), r / d.N % d.Hq, r % d.N)) star = r;
  }
  if (star < 0) return -1;
  const std::int64_t b_star = star / (d.Hq * d.N), h_star = star / d.N % d.Hq, i_star = star % d.N;
  const std::int64_t kv_star = h_star / (d.Hq / d.Hkv);
  std::vector<bool> poisoned(std::size_t(d.M), false);
  std::int64_t count = 0;
  for (std::int64_t j = 0; j < d.M; ++j) {
    if (weight(b_star, h_star, i_star, j) != 0.0f) continue;
    poisoned[std::size_t(j)] = true;
    ++count;
    for (std::int64_t c = 0; c < d.D; ++c) p.k.at(b_star, kv_star, j, c) = poison;
    for (std::int64_t c = 0; c < d.Dv; ++c) p.v.at(b_star, kv_star, j, c) = poison;
  }
  INFO("poison " << poison << " in " << count << " keys excluded for row " << i_star << " of head " << h_star
                 << ", batch " << b_star);
  const Outputs dirty = run_fused(p);

  std::int64_t checked = 0;
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < d.N; ++i) {
        bool sees_poison = false;
        if (b == b_star && h / (d.Hq / d.Hkv) == kv_star)
          for (std::int64_t j = 0; j < d.M && !sees_poison; ++j)
            sees_poison = poisoned[std::size_t(j)] && weight(b, h, i, j) != 0.0f;
        const std::int64_t row = (b * d.Hq + h) * d.N + i;
        const float* got = dirty.out.data() + row * d.Dv;
        const float* want = clean.out.data() + row * d.Dv;
        INFO("row (b=" << b << ", h=" << h << ", i=" << i << ")" << (sees_poison ? " sees poison" : ""));
        if (!sees_poison) {
          if (ex.bitwise) {
            CHECK(same_bits(got, want, d.Dv));
            CHECK(same_bits(dirty.lse.data() + row, clean.lse.data() + row, 1));
          } else {
            CHECK(close(got, want, d.Dv));
            CHECK(close(dirty.lse.data() + row, clean.lse.data() + row, 1));
          }
          ++checked;
        } else if (std::isnan(poison)) {
          bool all_nan = true;
          for (std::int64_t c = 0; c < d.Dv; ++c) all_nan = all_nan && std::isnan(got[c]);
          CHECK(all_nan);
        }
      }
  return checked;
}

}  // namespace

TEST_CASE("excluded keys never reach the result, whatever their K and V rows hold", "[exclusions]") {
  const float poisons[] = {std::numeric_limits<float>::quiet_NaN(), kInf, -kInf, 1e38f};
  const Dims shapes[] = {kSquare, kWide, kTall, kDecode, kDecodeInPlace, kLanes, kLanes2};
  std::uint32_t seed = 7000;
  for (const Dims& d : shapes) {
    const bool lanes_shape = d.Hq / d.Hkv * d.N >= 16;
    int tested = 0;
    for (const Exclusion& ex : exclusions()) {
      // The lanes shapes exist for the lanes kernel; with a mask they take the tile path,
      // which the other decode shapes cover.
      if (lanes_shape && !ex.lanes_ok) continue;
      for (float poison : poisons) {
        if (!ex.finite_poison && std::isfinite(poison)) continue;
        ++seed;
        INFO(str(d) << " isa=" << flashcpu::active_isa() << " exclusion: " << ex.name << " seed=" << seed);
        const std::int64_t checked = check_poisoned(d, ex, seed, poison);
        if (checked < 0) continue;  // e.g. causal decode with N = 1: every key visible
        CHECK(checked > 0);
        ++tested;
      }
    }
    INFO(str(d));
    CHECK(tested >= 12);  // at least three exclusions with every poison
  }
}

TEST_CASE("rows masked entirely by large finite values average their keys", "[exclusions][mask]") {
  const float fills[] = {std::numeric_limits<float>::lowest(), -1e9f};
  const Dims shapes[] = {kSquare, kDecode, kDecodeInPlace};
  for (const Dims& d : shapes)
    for (float fill : fills) {
      Problem p(d, 7500);
      p.full_mask(0.0);
      // Every entry of row 1 (all heads, all batches) holds `fill`.
      float* m = p.mask_buf.data();
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h)
          for (std::int64_t j = 0; j < d.M; ++j) m[std::size_t(((b * d.Hq + h) * d.N + 1) * d.M + j)] = fill;
      const Outputs got = run_fused(p);
      INFO(str(d) << " fill " << fill << " isa=" << flashcpu::active_isa());
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h) {
          const std::int64_t kv = h / (d.Hq / d.Hkv), row = (b * d.Hq + h) * d.N + 1;
          for (std::int64_t c = 0; c < d.Dv; ++c) {
            double mean = 0, magnitude = 0;
            for (std::int64_t j = 0; j < d.M; ++j) {
              mean += p.v.at(b, kv, j, c);
              magnitude += std::fabs(p.v.at(b, kv, j, c));
            }
            mean /= double(d.M);
            const float x = got.out[std::size_t(row * d.Dv + c)];
            INFO("b=" << b << " h=" << h << " c=" << c << ": got " << x << ", uniform mean " << mean);
            // fp32 accumulation of M equal weights: the bound of the oracle tests (kAtol of
            // the magnitude summed, kRtol of the result).
            CHECK(std::fabs(x - mean) <= kAtol * magnitude / double(d.M) + kRtol * std::fabs(mean));
          }
          // lse = fill + log M, to fp32 rounding of fill; only for -1e9: -FLT_MAX in log2
          // units is below the float range, and its lse saturates (documented).
          if (fill == -1e9f) {
            const double want = double(fill) + std::log(double(d.M));
            CHECK(std::fabs(got.lse[std::size_t(row)] - want) <= 1e-6 * std::fabs(want));
          } else {
            CHECK(std::isfinite(got.lse[std::size_t(row)]));
          }
        }
    }
}
