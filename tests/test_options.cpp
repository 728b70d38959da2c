// The attention options through the fused kernel, against the reference oracle:
// additive and boolean masks (with every broadcast and odd view), key lengths, sliding
// windows, soft-capping, ALiBi, each alone and in combination, on prefill shapes and on
// shapes of the decode driver (N <= 16, or few stacked rows: a short prompt) that take the
// split-KV path with several chunks; rows and whole
// key blocks / chunks with no visible key; the lse output and merge_into; bitwise
// determinism of decoding over thread counts; and every invalid option, rejected before
// anything is written.
//
// The helpers (Problem, expect, compare, CHECK_PROBLEM) are in attention_oracle.hpp,
// shared with test_scores.cpp: util.hpp's compare_with_reference re-derives the scores
// itself for plain dot-product attention only, so it cannot judge options.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "attention_oracle.hpp"
#include "plan.hpp"
#include "util.hpp"

namespace {

// Problem, expect, compare, the constants and tolerances, and the flashcpu / ftest names
// they use (AttentionOptions, Score, TensorView, Layout, Shape, Tensor).
using namespace oracle;

// Shapes: prefill (N >= 17, causal N < M and N > M, the N = 17 boundary) and decode
// (N = 1, 3, 16: split-KV, M large enough for 3-4 chunks of >= 512 keys). GQA 8/2, D and
// Dv not multiples of any vector width. Short prompts with at most kDecodeMaxStackedRows
// stacked rows also take the decode driver: N = 29 over 1100 keys (one query head per KV
// head, K read in place), N = 40 over 39 keys (causal N > M) and GQA 6/3 at N = 24.
const Dims kPrefill{2, 8, 2, 24, 160, 19, 23};
const Dims kPrefillTall{1, 8, 2, 90, 60, 33, 7};  // N > M
const Dims kPrefill17{1, 8, 2, 17, 300, 17, 9};
const Dims kDecode1{2, 8, 2, 1, 1800, 17, 9};
const Dims kDecode3{2, 8, 2, 3, 1300, 17, 9};
const Dims kDecode16{1, 8, 2, 16, 1100, 32, 16};  // K and V read in place (whole vectors)
const Dims kShort29{1, 4, 4, 29, 1100, 32, 32};
const Dims kShortTall{2, 2, 2, 40, 39, 17, 9};
const Dims kShortGqa{1, 6, 3, 24, 300, 17, 9};
const Dims kShapes[] = {kPrefill, kPrefillTall, kPrefill17, kDecode1,  kDecode3,
                        kDecode16, kShort29,     kShortTall, kShortGqa};

static_assert(flashcpu::detail::kDecodeMaxStackedRows == 48, "on_decode_driver (attention_oracle.hpp) follows it");

struct OptionSet {
  const char* name;
  std::function<void(Problem&)> apply;
};

// Each option alone; values chosen to matter on every shape above.
const std::vector<OptionSet>& single_options() {
  static const std::vector<OptionSet> sets = {
      {"none", [](Problem&) {}},
      {"causal", [](Problem& p) { p.causal(); }},
      {"mask", [](Problem& p) { p.full_mask(0.1); }},
      {"bool_mask", [](Problem& p) { p.full_bool(0.25); }},
      {"key_lengths", [](Problem& p) { p.partial_key_lengths(); }},
      {"window_left", [](Problem& p) { p.window(p.d.M / 3 + 1, -1); }},
      {"window_right", [](Problem& p) { p.window(-1, 5); }},
      {"window both", [](Problem& p) { p.window(p.d.M / 5, 3); }},
      {"softcap", [](Problem& p) { p.softcap(0.8f); }},
      {"alibi", [](Problem& p) { p.alibi(); }},
      {"scale", [](Problem& p) { p.scale(-0.7f); }},
  };
  return sets;
}

const std::vector<OptionSet>& combined_options() {
  static const std::vector<OptionSet> sets = {
      {"causal + mask + key_lengths",
       [](Problem& p) {
         p.causal();
         p.full_mask(0.05);
         p.partial_key_lengths();
       }},
      {"causal + window_left + alibi + softcap",
       [](Problem& p) {
         p.causal();
         p.window(p.d.M / 4, -1);
         p.alibi();
         p.scale(1.0f);
         p.softcap(5.0f);
       }},
      {"bool_mask + mask + window both",
       [](Problem& p) {
         p.full_bool(0.3);
         p.full_mask(0.05, -1.0f, 1.0f);
         p.window(p.d.M / 2, 40);
       }},
      {"causal + window_right 0 + softcap + mask",
       [](Problem& p) {
         p.causal();
         p.window(-1, 0);
         p.softcap(2.0f);
         p.full_mask(0.0, -8.0f, 8.0f);
       }},
      {"everything", [](Problem& p) { p.everything(); }},
  };
  return sets;
}

}  // namespace

TEST_CASE("each option alone matches the reference, prefill and decode", "[options]") {
  std::uint32_t seed = 1000;
  for (const auto& set : single_options())
    for (const Dims& d : kShapes) {
      ++seed;
      Problem p(d, seed, seed % 2 ? Layout::padded : Layout::bshd);
      set.apply(p);
      INFO("option set: " << set.name << (on_decode_driver(d) ? " (decode path)" : " (prefill path)"));
      CHECK_PROBLEM(p);
    }
}

TEST_CASE("options in combination match the reference, prefill and decode", "[options]") {
  std::uint32_t seed = 2000;
  for (const auto& set : combined_options())
    for (const Dims& d : kShapes) {
      ++seed;
      Problem p(d, seed, seed % 2 ? Layout::padded : Layout::sliced);
      set.apply(p);
      INFO("option set: " << set.name << (on_decode_driver(d) ? " (decode path)" : " (prefill path)"));
      CHECK_PROBLEM(p);
    }
}

TEST_CASE("rows with no visible key give zeros and lse = -inf", "[options][empty]") {
  const Dims shapes[] = {kPrefill, kPrefillTall, kDecode3, kDecode16};
  std::int64_t empty = 0;
  for (const Dims& d : shapes) {
    INFO(str(d));
    {
      Problem p(d, 3001);  // additive mask rows all -inf: rows 0 and N/2, every row of head 3 in batch 0
      p.full_mask(0.02);
      float* m = p.mask_buf.data();
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h)
          for (std::int64_t i = 0; i < d.N; ++i)
            if (i == 0 || i == d.N / 2 || (b == 0 && h == 3))
              for (std::int64_t j = 0; j < d.M; ++j) m[((b * d.Hq + h) * d.N + i) * d.M + j] = -kInf;
      p.note("rows 0, N/2 and head 3 of batch 0 all -inf");
      const Outcome o = run_check(p, &empty);
      INFO(p.describe() << "\n" << o.report);
      CHECK(o.ok);
      CHECK(empty >= d.B * d.Hq + d.N - 1);
    }
    {
      Problem p(d, 3002);  // boolean mask rows all zero: row N-1 of every head, head 1 of the last batch
      p.full_bool(0.1);
      std::uint8_t* m = p.bool_buf.data();
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h)
          for (std::int64_t i = 0; i < d.N; ++i)
            if (i == d.N - 1 || (b == d.B - 1 && h == 1))
              for (std::int64_t j = 0; j < d.M; ++j) m[((b * d.Hq + h) * d.N + i) * d.M + j] = 0;
      p.note("row N-1 and head 1 of the last batch all zero");
      const Outcome o = run_check(p, &empty);
      INFO(p.describe() << "\n" << o.report);
      CHECK(o.ok);
      CHECK(empty >= d.B * d.Hq + d.N - 1);
    }
    {
      Problem p(d, 3003);  // key_lengths[0] = 0
      std::vector<std::int32_t> l(std::size_t(d.B), std::int32_t(d.M / 2 + 1));
      l[0] = 0;
      p.key_lengths(l);
      p.causal();
      const Outcome o = run_check(p, &empty);
      INFO(p.describe() << "\n" << o.report);
      CHECK(o.ok);
      CHECK(empty >= d.Hq * d.N);
    }
    {
      // A window that excludes everything for the early rows: window_right = 0 without
      // causal lets row i see keys up to its diagonal d = i + M - N only, window_left = 2
      // from d - 2; rows with d < 0 see nothing (N > M). For N <= M, key_lengths = 2 as
      // well: rows with d - 2 >= 2 see nothing, rows with d <= 3 see keys.
      Problem p(d, 3004);
      p.window(2, 0);
      if (d.N <= d.M) p.key_lengths(std::vector<std::int32_t>(std::size_t(d.B), 2));
      const Outcome o = run_check(p, &empty);
      INFO(p.describe() << "\n" << o.report);
      CHECK(o.ok);
      CHECK(empty > 0);
    }
  }
}

TEST_CASE("key blocks and split-KV chunks with no visible key are skipped correctly", "[options][empty]") {
  SECTION("prefill: a whole key block -inf in the mask, another zero in the bool mask") {
    const Dims d{1, 4, 2, 40, 1000, 24, 17};
    const std::int64_t bk = flashcpu::tile_config(d.D).block_keys;
    INFO("block_keys = " << bk);
    REQUIRE(4 * bk > d.M);
    for (const bool causal : {false, true}) {
      Problem p(d, 3100 + causal);
      p.full_mask(0.0);
      p.full_bool(0.0);
      for (std::int64_t r = 0; r < d.B * d.Hq * d.N; ++r)
        for (std::int64_t j = 0; j < d.M; ++j) {
          if (j >= bk && j < 2 * bk) p.mask_buf[std::size_t(r * d.M + j)] = -kInf;            // aligned block
          if (j >= 2 * bk - 12 && j < 3 * bk + 22) p.bool_buf[std::size_t(r * d.M + j)] = 0;  // spans a block
        }
      p.note("mask -inf on [bk, 2bk), bool 0 on [2bk-12, 3bk+22)");
      if (causal) p.causal();
      CHECK_PROBLEM(p);
    }
  }
  SECTION("decode: whole chunks excluded by the mask, the bool mask and the key lengths") {
    for (const std::int64_t N : {1, 5}) {
      const Dims d{2, 8, 2, N, 2600, 20, 13};
      Problem p(d, 3200 + std::uint32_t(N));
      p.full_mask(0.0);
      p.full_bool(0.0);
      for (std::int64_t r = 0; r < d.B * d.Hq * d.N; ++r)
        for (std::int64_t j = 0; j < d.M; ++j) {
          if (j >= 500 && j < 1100) p.mask_buf[std::size_t(r * d.M + j)] = -kInf;  // covers [512, 1024)
          if (j >= 1530 && j < 2100) p.bool_buf[std::size_t(r * d.M + j)] = 0;     // covers [1536, 2048)
        }
      // Batch 1 keeps keys [0, 400) only: all its later chunks see nothing. In batch 0
      // row 0 of head 5 sees only the last chunk's keys.
      for (std::int64_t j = 0; j < 2560; ++j) p.mask_buf[std::size_t((5 * d.N) * d.M + j)] = -kInf;
      p.note("mask -inf on [500, 1100) and on [0, 2560) for (b0, h5, i0); bool 0 on [1530, 2100)");
      p.key_lengths({std::int32_t(d.M), 400});
      CHECK_PROBLEM(p);
    }
  }
}

namespace {

// A mask view's shape and strides (and offset into its buffer) for target [B, Hq, N, M].
struct MaskLayout {
  std::string name;
  Shape shape, strides;
  std::int64_t offset;
};

std::vector<MaskLayout> mask_layouts(const Dims& d) {
  const Shape full{d.B, d.Hq, d.N, d.M};
  const std::int64_t row = d.M + 7, head = d.N * row + 3, batch = d.Hq * head + 5;
  return {
      {"[1, 1, N, M]", {1, 1, d.N, d.M}, contiguous({1, 1, d.N, d.M}), 0},
      {"[B, 1, N, M]", {d.B, 1, d.N, d.M}, contiguous({d.B, 1, d.N, d.M}), 0},
      {"[1, Hq, N, M]", {1, d.Hq, d.N, d.M}, contiguous({1, d.Hq, d.N, d.M}), 0},
      {"[B, Hq, 1, M] (one row per head)", {d.B, d.Hq, 1, d.M}, contiguous({d.B, d.Hq, 1, d.M}), 0},
      {"[1, 1, 1, M] (key padding style)", {1, 1, 1, d.M}, contiguous({1, 1, 1, d.M}), 0},
      {"[B, Hq, N, M] with 0 batch and head strides", full, {0, 0, d.M, 1}, 0},
      {"[B, Hq, N, M] with 0 head stride, batch stride N*M", full, {d.N * d.M, 0, d.M, 1}, 0},
      {"transposed: [1, 1, N, M] over an [M, N] buffer (column stride N)", {1, 1, d.N, d.M}, {0, 0, 1, d.N}, 0},
      {"transposed per head: [B, Hq, N, M] with strides {Hq*M*N, M*N, 1, N}",
       full,
       {d.Hq * d.M * d.N, d.M * d.N, 1, d.N},
       0},
      {"padded: [B, Hq, N, M] inside a larger buffer (row M+7, head +3, batch +5, offset 11)",
       full,
       {batch, head, row, 1},
       11},
      {"column stride 2 (every other element), offset 1", full, {d.Hq * d.N * 2 * d.M, d.N * 2 * d.M, 2 * d.M, 2}, 1},
  };
}

}  // namespace

TEST_CASE("masks broadcast over batch and heads, and strided or padded mask views", "[options][mask]") {
  // Prefill; decode with 2 chunks; a short prompt on the decode driver.
  const Dims shapes[] = {{2, 8, 2, 23, 150, 17, 9}, {2, 8, 2, 4, 700, 17, 9}, {2, 3, 3, 21, 300, 17, 9}};
  std::uint32_t seed = 4000;
  for (const Dims& d : shapes)
    for (const MaskLayout& var : mask_layouts(d)) {
      const Shape shape = var.shape, strides = var.strides;
      for (const bool boolean : {false, true}) {
        Problem p(d, ++seed);
        if (!boolean) {
          std::uniform_real_distribution<float> val(-3, 3);
          p.opt.mask = make_view<float>(p.mask_buf, shape, strides, var.offset, kNaN,
                                        [&](auto, auto, auto, auto) { return p.rng() % 8 == 0 ? -kInf : val(p.rng); });
          p.note("mask " + var.name);
        } else {
          p.opt.bool_mask =
              make_view<std::uint8_t>(p.bool_buf, shape, strides, var.offset, std::uint8_t(0),
                                      [&](auto, auto, auto, auto) { return std::uint8_t(p.rng() % 4 != 0); });
          p.note("bool_mask " + var.name);
        }
        p.causal();
        // run_check also checks the reference against the test's own reading of the mask
        // (mask_at: the documented broadcast rule), so the oracle's broadcasting is tested too.
        INFO(var.name << (boolean ? " (bool_mask)" : " (mask)"));
        CHECK_PROBLEM(p);
      }
    }
}

namespace {

// k or v restricted to keys [first, first + count): a pointer offset and a shape.
TensorView<const float> key_slice(TensorView<const float> t, std::int64_t first, std::int64_t count) {
  t.data += first * t.strides[2];
  t.shape[2] = count;
  return t;
}

// Options for keys [first, first + count) of a call over all M keys, for options that do
// not depend on where the keys sit (no causal, window or ALiBi): the masks are sliced the
// same way and the key lengths clipped.
AttentionOptions slice_options(const AttentionOptions& opt, std::int64_t first, std::int64_t count,
                               std::vector<std::int32_t>& lengths_storage, std::int64_t B) {
  AttentionOptions o = opt;
  if (o.mask.data && o.mask.shape[3] != 1) {
    o.mask.data += first * o.mask.strides[3];
    o.mask.shape[3] = count;
  }
  if (o.bool_mask.data && o.bool_mask.shape[3] != 1) {
    o.bool_mask.data += first * o.bool_mask.strides[3];
    o.bool_mask.shape[3] = count;
  }
  if (opt.key_lengths) {
    lengths_storage.assign(std::size_t(B), 0);
    for (std::int64_t b = 0; b < B; ++b)
      lengths_storage[std::size_t(b)] = std::int32_t(std::clamp<std::int64_t>(opt.key_lengths[b] - first, 0, count));
    o.key_lengths = lengths_storage.data();
  }
  return o;
}

std::vector<float> view_values(const Tensor& t) {
  std::vector<float> x;
  const Shape& s = t.shape();
  for (std::int64_t b = 0; b < s[0]; ++b)
    for (std::int64_t h = 0; h < s[1]; ++h)
      for (std::int64_t i = 0; i < s[2]; ++i)
        for (std::int64_t c = 0; c < s[3]; ++c) x.push_back(t.at(b, h, i, c));
  return x;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("merge_into of two key halves equals attention over all keys", "[options][merge]") {
  // Tolerance of the merge: it forms λ·o_a + (1 − λ)·o_b with λ = 1 / (1 + e^(l_b − l_a)).
  // Each part is within its own bound (expect() above), and dλ = λ(1 − λ)·d(l_a − l_b) <=
  // ¼·(tol(l_a) + tol(l_b) + the merge's own roundings of the exponent, 8u(|l_a| + |l_b| + 2)),
  // which moves the result by dλ·|o_a − o_b|; the references of the parts and of the whole
  // each round once to float (8u(|o_a| + |o_b|)). The merged lse: max of the parts' lse
  // tolerances plus 8u(|lse| + 1). A part that saw no key contributes exactly nothing.
  // Decode halves of 800 keys: two split-KV chunks each.
  const std::vector<Dims> shapes = {{2, 8, 2, 30, 300, 19, 11}, {2, 8, 2, 1, 1600, 17, 9}, {1, 8, 2, 4, 1600, 32, 16}};
  struct Set {
    const char* name;
    bool mask, boolean, lengths, scale;
  };
  const Set sets[] = {{"none", false, false, false, false},
                      {"mask", true, false, false, false},
                      {"bool_mask + key_lengths", false, true, true, false},
                      {"mask + bool_mask + key_lengths + scale", true, true, true, true}};
  std::uint32_t seed = 5000;
  for (const Dims& d : shapes)
    for (const Set& set : sets) {
      Problem p(d, ++seed);
      if (set.mask) p.full_mask(0.05);
      if (set.boolean) p.full_bool(0.2);
      // Batch 0 keeps only keys of the first half: its second part sees nothing.
      if (set.lengths)
        p.key_lengths(d.B == 2 ? std::vector<std::int32_t>{std::int32_t(d.M / 2 - 9), std::int32_t(d.M - 3)}
                               : std::vector<std::int32_t>{std::int32_t(d.M - 3)});
      if (set.scale) p.scale(1.3f);
      INFO(p.describe());
      const std::int64_t half = d.M / 2;
      std::vector<std::int32_t> la, lb;
      const AttentionOptions oa = slice_options(p.opt, 0, half, la, d.B);
      const AttentionOptions ob = slice_options(p.opt, half, d.M - half, lb, d.B);
      const auto ka = key_slice(p.k.cview(), 0, half), va = key_slice(p.v.cview(), 0, half);
      const auto kb = key_slice(p.k.cview(), half, d.M - half), vb = key_slice(p.v.cview(), half, d.M - half);
      Tensor out_a({d.B, d.Hq, d.N, d.Dv}, Layout::bshd, kSentinel),
          lse_a({d.B, d.Hq, d.N, 1}, Layout::padded, kSentinel);
      Tensor out_b({d.B, d.Hq, d.N, d.Dv}, Layout::padded, kSentinel),
          lse_b({d.B, d.Hq, d.N, 1}, Layout::bhsd, kSentinel);
      flashcpu::attention(p.q.cview(), ka, va, out_a.view(), lse_a.view(), oa);
      flashcpu::attention(p.q.cview(), kb, vb, out_b.view(), lse_b.view(), ob);
      const std::vector<float> before_a = view_values(out_a), before_lse_a = view_values(lse_a);
      flashcpu::merge_into(out_a.view(), lse_a.view(), out_b.cview(), lse_b.cview());
      CHECK(out_a.padding_intact());
      CHECK(lse_a.padding_intact());

      const Expected ea = expect(p.q.cview(), ka, va, oa), eb = expect(p.q.cview(), kb, vb, ob);
      Expected ef = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
      REQUIRE(ea.error.empty());
      REQUIRE(eb.error.empty());
      REQUIRE(ef.error.empty());
      std::int64_t part_empty_rows = 0;
      bool part_empty_rows_unchanged = true;
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h)
          for (std::int64_t i = 0; i < d.N; ++i) {
            const std::size_t row = std::size_t((b * d.Hq + h) * d.N + i);
            const double lsa = ea.lse[row], lsb = eb.lse[row];
            const bool a_empty = std::isinf(lsa), b_empty = std::isinf(lsb);
            for (std::int64_t c = 0; c < d.Dv; ++c) {
              const std::size_t at = row * std::size_t(d.Dv) + std::size_t(c);
              double tol;
              if (a_empty || b_empty) {
                tol = a_empty ? eb.out_tol[at] : ea.out_tol[at];
              } else {
                tol = std::max(ea.out_tol[at], eb.out_tol[at]) +
                      0.25 * (ea.lse_tol[row] + eb.lse_tol[row] + 8 * kU * (std::fabs(lsa) + std::fabs(lsb) + 2)) *
                          std::fabs(double(ea.out[at]) - double(eb.out[at])) +
                      8 * kU * (std::fabs(ea.out[at]) + std::fabs(eb.out[at]));
              }
              ef.out_tol[at] = tol;
            }
            ef.lse_tol[row] = a_empty ? eb.lse_tol[row]
                              : b_empty
                                  ? ea.lse_tol[row]
                                  : std::max(ea.lse_tol[row], eb.lse_tol[row]) + 8 * kU * (std::fabs(ef.lse[row]) + 1);
            if (b_empty) {  // merging an empty part must leave the row exactly as it was
              ++part_empty_rows;
              for (std::int64_t c = 0; c < d.Dv; ++c) {
                const float x = out_a.at(b, h, i, c), y = before_a[row * std::size_t(d.Dv) + std::size_t(c)];
                part_empty_rows_unchanged = part_empty_rows_unchanged && std::memcmp(&x, &y, sizeof x) == 0;
              }
              const float x = lse_a.at(b, h, i, 0), y = before_lse_a[row];
              part_empty_rows_unchanged = part_empty_rows_unchanged && std::memcmp(&x, &y, sizeof x) == 0;
            }
          }
      const TensorView<const float> merged_lse = lse_a.cview();
      const Outcome o = compare(ef, out_a.cview(), &merged_lse);
      INFO(o.report);
      CHECK(o.ok);
      if (set.lengths && d.B == 2) CHECK(part_empty_rows == d.Hq * d.N);
      CHECK(part_empty_rows_unchanged);
    }
}

TEST_CASE("merge_into with an empty side leaves the other side unchanged", "[options][merge]") {
  for (const Dims& d : {Dims{2, 4, 2, 30, 90, 19, 11}, Dims{2, 4, 2, 3, 700, 16, 8}}) {
    for (const int direction : {0, 1, 2}) {
      Problem p(d, 5100 + std::uint32_t(d.N));
      INFO(p.describe());
      flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
      const std::vector<float> full = view_values(p.out), full_lse = view_values(p.lse);

      // Empty parts: attention over no keys at all (M = 0), and over keys all excluded by
      // key_lengths = 0.
      Tensor e0({d.B, d.Hq, d.N, d.Dv}, Layout::bhsd, kSentinel), l0({d.B, d.Hq, d.N, 1}, Layout::bhsd, kSentinel);
      Tensor e1({d.B, d.Hq, d.N, d.Dv}, Layout::padded, kSentinel), l1({d.B, d.Hq, d.N, 1}, Layout::padded, kSentinel);
      flashcpu::attention(p.q.cview(), key_slice(p.k.cview(), 0, 0), key_slice(p.v.cview(), 0, 0), e0.view(),
                          l0.view());
      std::vector<std::int32_t> zeros(std::size_t(d.B), 0);
      AttentionOptions none_visible;
      none_visible.key_lengths = zeros.data();
      flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), e1.view(), l1.view(), none_visible);
      for (const Tensor* t : {&e0, &e1})
        for (float x : view_values(*t)) REQUIRE(x == 0.0f);
      for (const Tensor* t : {&l0, &l1})
        for (float x : view_values(*t)) REQUIRE(x == -kInf);
      const std::vector<float> empty_out = view_values(e0), empty_lse = view_values(l0);

      if (direction == 0) {
        INFO("full += empty (M = 0, then all keys excluded): unchanged bitwise");
        flashcpu::merge_into(p.out.view(), p.lse.view(), e0.cview(), l0.cview());
        flashcpu::merge_into(p.out.view(), p.lse.view(), e1.cview(), l1.cview());
        CHECK(bitwise_equal(view_values(p.out), full));
        CHECK(bitwise_equal(view_values(p.lse), full_lse));
        CHECK(p.out.padding_intact());
        CHECK(p.lse.padding_intact());
      } else if (direction == 1) {
        INFO("empty += full: becomes the full result bitwise");
        flashcpu::merge_into(e0.view(), l0.view(), p.out.cview(), p.lse.cview());
        CHECK(bitwise_equal(view_values(e0), full));
        CHECK(bitwise_equal(view_values(l0), full_lse));
        CHECK(e0.padding_intact());
      } else {
        INFO("empty += empty: stays empty");
        flashcpu::merge_into(e0.view(), l0.view(), e1.cview(), l1.cview());
        CHECK(bitwise_equal(view_values(e0), empty_out));
        CHECK(bitwise_equal(view_values(l0), empty_lse));
      }
    }
  }
}

TEST_CASE("decode results are bitwise identical for every num_threads", "[options][threads]") {
  // M = 5000 with B * Hkv = 2 KV heads: 10 split-KV chunks of 512 keys; and a short
  // prompt (N = 33, one query head per KV head) in 7 chunks of 512.
  for (const Dims& d : {Dims{1, 8, 2, 1, 5000, 64, 64}, Dims{1, 8, 2, 4, 5000, 64, 64}, Dims{1, 8, 2, 4, 5000, 19, 13},
                        Dims{1, 2, 2, 33, 3400, 32, 32}}) {
    for (const char* set : {"none", "causal", "key_lengths", "mask", "causal + key_lengths + mask + alibi"}) {
      Problem p(d, 6000 + std::uint32_t(d.N + d.D), d.D == 64 ? Layout::bhsd : Layout::padded);
      const std::string s = set;
      if (s.find("causal") != std::string::npos) p.causal();
      if (s.find("key_lengths") != std::string::npos) p.key_lengths({3333});
      if (s.find("mask") != std::string::npos) p.full_mask(0.1);
      if (s.find("alibi") != std::string::npos) p.alibi();
      std::vector<float> first_out, first_lse;
      for (const int threads : {1, 2, 3, 5}) {
        p.opt.num_threads = threads;
        std::mt19937 unused;
        p.out.fill_uniform(unused, kSentinel, kSentinel);
        p.lse.fill_uniform(unused, kSentinel, kSentinel);
        flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
        if (threads == 1) {
          first_out = p.out.buffer(), first_lse = p.lse.buffer();
          continue;
        }
        INFO(p.describe() << ": num_threads=" << threads << " vs num_threads=1");
        CHECK(std::memcmp(p.out.buffer().data(), first_out.data(), first_out.size() * sizeof(float)) == 0);
        CHECK(std::memcmp(p.lse.buffer().data(), first_lse.data(), first_lse.size() * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("options with null data or default values are off", "[options]") {
  for (const Dims& d : {Dims{2, 4, 2, 31, 77, 9, 5}, Dims{2, 4, 2, 2, 600, 9, 5}}) {
    Problem p(d, 6500);
    flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
    const std::vector<float> plain = p.out.buffer(), plain_lse = p.lse.buffer();
    AttentionOptions off;
    off.mask = {nullptr, {7, 7, 7, 7}, {1, 2, 3, 4}};  // null data: off, whatever the shape
    off.bool_mask = {nullptr, {5, 0, 3, 9}, {0, 0, 0, 0}};
    off.key_lengths = nullptr;
    off.window_left = -1;
    off.window_right = -1;
    off.softcap = 0.0f;
    off.alibi_slopes = nullptr;
    off.additive_weights = nullptr;  // ignored by the dot product
    std::mt19937 unused;
    p.out.fill_uniform(unused, kSentinel, kSentinel);
    p.lse.fill_uniform(unused, kSentinel, kSentinel);
    flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), off);
    INFO(str(d));
    CHECK(std::memcmp(p.out.buffer().data(), plain.data(), plain.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(p.lse.buffer().data(), plain_lse.data(), plain_lse.size() * sizeof(float)) == 0);
  }
}

// ---------------------------------------------------------------------------------
// Invalid input.
// ---------------------------------------------------------------------------------
namespace {

bool is_word_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// Matches a message naming `word` as a whole word: "mask" is in "options.mask.shape[3]",
// not in "options.bool_mask".
class NamesWord : public Catch::MatcherBase<std::string> {
 public:
  explicit NamesWord(std::string word) : word_(std::move(word)) {}
  bool match(const std::string& text) const override {
    for (auto pos = text.find(word_); pos != std::string::npos; pos = text.find(word_, pos + 1)) {
      const bool left = pos == 0 || !is_word_char(text[pos - 1]);
      const bool right = pos + word_.size() == text.size() || !is_word_char(text[pos + word_.size()]);
      if (left && right) return true;
    }
    return false;
  }
  std::string describe() const override { return "names '" + word_ + "'"; }

 private:
  std::string word_;
};

// A small valid problem whose outputs hold a sentinel; `arena` snapshots every buffer.
struct Small : Problem {
  static constexpr Dims kDims{2, 4, 2, 5, 7, 3, 2};
  Small() : Problem(kDims, 7000, Layout::bhsd, Layout::bhsd) {}
  std::vector<float> snapshot() const {
    std::vector<float> all;
    for (const Tensor* t : {&q, &k, &v, &out, &lse}) all.insert(all.end(), t->buffer().begin(), t->buffer().end());
    all.insert(all.end(), mask_buf.begin(), mask_buf.end());
    return all;
  }
};

struct BadOption {
  const char* what;
  std::function<void(Small&, TensorView<float>& lse)> mutate;
  const char* name;  // the message must name this
};

void check_rejected(const BadOption& bad) {
  for (const bool with_lse : {true, false}) {
    for (const bool reference : {false, true}) {
      Small p;
      TensorView<float> lse = p.lse.view();
      bad.mutate(p, lse);
      const std::vector<float> before = p.snapshot();
      INFO(bad.what << (reference ? " (reference::attention" : " (attention") << (with_lse ? ", with lse)" : ")"));
      auto call = [&] {
        if (reference && with_lse)
          flashcpu::reference::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), lse, p.opt);
        else if (reference)
          flashcpu::reference::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.opt);
        else if (with_lse)
          flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), lse, p.opt);
        else
          flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.opt);
      };
      const bool about_lse = std::string(bad.name) == "lse";
      if (about_lse && !with_lse) continue;  // only the overload with lse can get lse wrong
      CHECK_THROWS_AS(call(), flashcpu::Error);
      CHECK_THROWS_WITH(call(), NamesWord(bad.name));
      const std::vector<float> after = p.snapshot();
      CHECK(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)) == 0);
    }
  }
}

}  // namespace

TEST_CASE("invalid options are rejected, naming the option, before anything is written", "[options][errors]") {
  using P = Small;
  using L = TensorView<float>;
  const Dims d = Small::kDims;
  auto mask_of = [](Shape shape) {
    return [shape](P& p, L&) {
      p.opt.mask = make_view<float>(p.mask_buf, shape, contiguous(shape), 0, 0.0f, [](auto...) { return 0.5f; });
    };
  };
  auto bool_of = [](Shape shape) {
    return [shape](P& p, L&) {
      p.opt.bool_mask = make_view<std::uint8_t>(p.bool_buf, shape, contiguous(shape), 0, std::uint8_t(1),
                                                [](auto...) { return std::uint8_t(1); });
    };
  };
  const BadOption cases[] = {
      {"mask M+1 keys", mask_of({d.B, d.Hq, d.N, d.M + 1}), "mask"},
      {"mask M-1 keys", mask_of({1, 1, d.N, d.M - 1}), "mask"},
      {"mask N+1 rows", mask_of({d.B, d.Hq, d.N + 1, d.M}), "mask"},
      {"mask 3 heads for Hq=4", mask_of({d.B, 3, d.N, d.M}), "mask"},
      {"mask 3 batches for B=2", mask_of({3, 1, d.N, d.M}), "mask"},
      {"mask Hkv=2 heads (not Hq)", mask_of({1, d.Hkv, d.N, d.M}), "mask"},
      {"mask 0 rows", mask_of({d.B, d.Hq, 0, d.M}), "mask"},
      {"bool_mask M+2 keys", bool_of({d.B, d.Hq, d.N, d.M + 2}), "bool_mask"},
      {"bool_mask 3 heads", bool_of({1, 3, 1, d.M}), "bool_mask"},
      {"bool_mask N-1 rows", bool_of({1, 1, d.N - 1, d.M}), "bool_mask"},
      {"key_lengths[1] = -1",
       [](P& p, L&) {
         p.key_lengths({3, -1});
       },
       "key_lengths"},
      {"key_lengths[0] = M+1",
       [](P& p, L&) {
         p.key_lengths({std::int32_t(p.d.M + 1), 2});
       },
       "key_lengths"},
      {"key_lengths[1] = INT32_MIN",
       [](P& p, L&) {
         p.key_lengths({1, std::numeric_limits<std::int32_t>::min()});
       },
       "key_lengths"},
      {"window_left -2", [](P& p, L&) { p.opt.window_left = -2; }, "window_left"},
      {"window_left INT64_MIN", [](P& p, L&) { p.opt.window_left = std::numeric_limits<std::int64_t>::min(); },
       "window_left"},
      {"window_right -2", [](P& p, L&) { p.opt.window_right = -2; }, "window_right"},
      {"window_right -100, causal", [](P& p, L&) { p.opt.window_right = -100, p.opt.causal = true; }, "window_right"},
      {"softcap NaN", [](P& p, L&) { p.opt.softcap = kNaN; }, "softcap"},
      {"softcap +inf", [](P& p, L&) { p.opt.softcap = kInf; }, "softcap"},
      {"softcap -inf", [](P& p, L&) { p.opt.softcap = -kInf; }, "softcap"},
      {"softcap -1", [](P& p, L&) { p.opt.softcap = -1.0f; }, "softcap"},
      {"softcap -1e-30", [](P& p, L&) { p.opt.softcap = -1e-30f; }, "softcap"},
      {"lse [B, Hq, N, 2]", [](P&, L& l) { l.shape[3] = 2; }, "lse"},
      {"lse [B, Hq, N+1, 1]", [](P&, L& l) { l.shape[2] += 1; }, "lse"},
      {"lse [B, Hq-1, N, 1]", [](P&, L& l) { l.shape[1] = 3; }, "lse"},
      {"lse [B-1, Hq, N, 1]", [](P&, L& l) { l.shape[0] = 1; }, "lse"},
      {"lse [B, Hq, N, 0]", [](P&, L& l) { l.shape[3] = 0; }, "lse"},
      {"lse on q's buffer", [](P& p, L& l) { l.data = p.q.view().data; }, "lse"},
      {"lse inside k", [](P& p, L& l) { l.data = p.k.view().data + 3; }, "lse"},
      {"lse inside v", [](P& p, L& l) { l.data = p.v.view().data + 1; }, "lse"},
      {"lse overlapping out", [](P& p, L& l) { l.data = p.out.view().data + 5; }, "lse"},
      {"lse overlapping the mask",
       [](P& p, L& l) {
         const Shape s{p.d.B, p.d.Hq, p.d.N, p.d.M};
         p.opt.mask = make_view<float>(p.mask_buf, s, contiguous(s), 0, 0.0f, [](auto...) { return 0.0f; });
         l.data = p.mask_buf.data() + 10;
       },
       "lse"},
      {"lse rows aliasing (row stride 0)", [](P&, L& l) { l.strides[2] = 0; }, "lse"},
  };
  for (const auto& bad : cases) check_rejected(bad);
}

TEST_CASE("merge_into rejects views that disagree, before writing", "[options][errors][merge]") {
  const Dims d{2, 3, 3, 4, 9, 5, 6};
  Problem p(d, 7100, Layout::bhsd, Layout::bhsd);
  flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view());
  // Parts in buffers larger than any view below, so a missed check cannot read out of bounds.
  std::vector<float> part(std::size_t(4 * d.B * d.Hq * d.N * (d.Dv + 2)), 0.25f);
  std::vector<float> part_lse(std::size_t(4 * d.B * d.Hq * (d.N + 2) * 2), 0.5f);
  struct Bad {
    const char* what;
    std::function<void(TensorView<float>&, TensorView<float>&, TensorView<const float>&, TensorView<const float>&)>
        mutate;
    std::vector<std::string> names;  // the message names one of these
  };
  const Bad cases[] = {
      {"part_out Dv+1", [](auto&, auto&, auto& po, auto&) { po.shape[3] += 1; }, {"part_out"}},
      {"part_out N-1", [](auto&, auto&, auto& po, auto&) { po.shape[2] -= 1; }, {"part_out"}},
      {"part_out 2 heads", [](auto&, auto&, auto& po, auto&) { po.shape[1] = 2; }, {"part_out"}},
      {"part_out 1 batch", [](auto&, auto&, auto& po, auto&) { po.shape[0] = 1; }, {"part_out"}},
      {"out 1 batch", [](auto& o, auto&, auto&, auto&) { o.shape[0] = 1; }, {"out", "part_out", "lse", "part_lse"}},
      {"part_lse N+1", [](auto&, auto&, auto&, auto& pl) { pl.shape[2] += 1; }, {"part_lse"}},
      {"part_lse [.., 2]", [](auto&, auto&, auto&, auto& pl) { pl.shape[3] = 2; }, {"part_lse"}},
      {"lse 2 heads", [](auto&, auto& l, auto&, auto&) { l.shape[1] = 2; }, {"lse"}},
      {"lse [.., 0]", [](auto&, auto& l, auto&, auto&) { l.shape[3] = 0; }, {"lse"}},
      {"lse overlapping out", [](auto& o, auto& l, auto&, auto&) { l.data = o.data + 2; }, {"lse", "out"}},
  };
  for (const Bad& bad : cases) {
    INFO(bad.what);
    TensorView<float> out = p.out.view(), lse = p.lse.view();
    TensorView<const float> po = flashcpu::bhsd<const float>(part.data(), d.B, d.Hq, d.N, d.Dv);
    TensorView<const float> pl = flashcpu::bhsd<const float>(part_lse.data(), d.B, d.Hq, d.N, 1);
    bad.mutate(out, lse, po, pl);
    const std::vector<float> before_out = p.out.buffer(), before_lse = p.lse.buffer();
    CHECK_THROWS_AS(flashcpu::merge_into(out, lse, po, pl), flashcpu::Error);
    try {
      flashcpu::merge_into(out, lse, po, pl);
    } catch (const flashcpu::Error& e) {
      bool named = false;
      for (const auto& n : bad.names) named = named || NamesWord(n).match(e.what());
      INFO("message: " << e.what());
      CHECK(named);
    } catch (...) {
    }
    CHECK(p.out.buffer() == before_out);
    CHECK(p.lse.buffer() == before_lse);
  }
}
