// The 16-bit combinations of flashcpu::attention (bf16 or fp16 q, k, v and out; fp32 q
// and out over a bf16 or fp16 KV cache), against the fp64 oracle, on whatever ISA level
// the run is forced to: every option and score, prefill and decode shapes (split-KV and
// the stacked-heads tiles, at every row count), GQA, strided and padded views, determinism
// over thread counts, and bad input rejected as in fp32.
//
// Tolerance. The kernels widen 16-bit inputs exactly and compute in fp32, so on inputs
// that are already 16-bit values the fp32 bound of attention_oracle.hpp holds unchanged:
// the test rounds q (when 16-bit), k and v to the 16-bit type first, in the fp32 tensors
// the oracle reads, and hands the kernel 16-bit copies of the same values. A 16-bit
// output then adds its one rounding: at most half an ulp of the fp32 result, u16 * |x|
// with u16 = 2^-8 (bf16) or 2^-11 (fp16), |x| <= |ref| + tol, plus 2^-25 absolute for
// fp16's subnormals. lse is fp32 in every combination and keeps the fp32 bound. The fp32
// margin check (errors well inside the bound) applies where out is fp32; a 16-bit
// output's rounding alone may use most of its added term. Under FLASHCPU_ISA=amx the
// all-bf16 prefill runs on the tiles, which round the weights to bf16: u16 max|v| more.
#include <catch2/catch.hpp>

#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr: the denormal flags

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_oracle.hpp"
#include "dispatch.hpp"
#include "util.hpp"

namespace {

using namespace oracle;
using flashcpu::bf16;
using flashcpu::fp16;

using ftest::Copy;
using ftest::narrow;
using ftest::round_view;
using ftest::same_bits;
using ftest::type_name;
using ftest::unit_roundoff;
using ftest::widen;

// Runs the 16-bit combination (Q for q and out, KV for k and v) on the problem, after
// rounding its inputs to those types, and compares with the oracle on the rounded inputs.
template <class Q, class KV>
Outcome run16(Problem& p, int num_threads = 0) {
  round_view<KV>(p.k);
  round_view<KV>(p.v);
  if constexpr (!std::is_same<Q, float>::value) round_view<Q>(p.q);
  std::mt19937 unused;
  p.out.fill_uniform(unused, kSentinel, kSentinel);
  p.lse.fill_uniform(unused, kSentinel, kSentinel);
  const Copy<Q> q(p.q);
  const Copy<KV> k(p.k), v(p.v);
  const Copy<Q> out_before(p.out);
  Copy<Q> out(p.out), out2(p.out);
  AttentionOptions opt = p.opt;
  opt.num_threads = num_threads;
  try {
    flashcpu::attention(q.cview(), k.cview(), v.cview(), out.view(), p.lse.view(), opt);
    flashcpu::attention(q.cview(), k.cview(), v.cview(), out2.view(), opt);
  } catch (const std::exception& ex) {
    return {false, std::string("flashcpu::attention threw: ") + ex.what()};
  }
  Expected e = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
  if constexpr (!std::is_same<Q, float>::value) {
    const double u16 = unit_roundoff<Q>(), tiny = std::is_same<Q, fp16>::value ? std::ldexp(1.0, -25) : 0.0;
    // The bf16-product levels' all-bf16 variants (AMX tiles, and vdpbf16ps pairs of keys
    // on avx512bf16) round each weight to bf16 before P.V:
    // |sum_j (p~_j - p_j) v_j| / l <= u16 max|v| (tests/test_bf16_products.cpp).
    double weights_term = 0;
    if (std::is_same<Q, bf16>::value && std::is_same<KV, bf16>::value &&
        flashcpu::detail::active_kernels(flashcpu::detail::DType::bf16).pair_values) {
      const TensorView<const float> vv = p.v.cview();
      for (std::int64_t b = 0; b < vv.shape[0]; ++b)
        for (std::int64_t h = 0; h < vv.shape[1]; ++h)
          for (std::int64_t j = 0; j < vv.shape[2]; ++j)
            for (std::int64_t c = 0; c < vv.shape[3]; ++c) {
              const double x = std::fabs(double(vv.data[b * vv.strides[0] + h * vv.strides[1] + j * vv.strides[2] + c * vv.strides[3]]));
              if (std::isfinite(x)) weights_term = std::max(weights_term, u16 * x);
            }
    }
    for (std::size_t i = 0; i < e.out.size(); ++i)
      e.out_tol[i] += u16 * (std::fabs(double(e.out[i])) + e.out_tol[i]) + tiny + weights_term;
  }
  // The output widened, contiguous, for the comparison.
  std::vector<float> widened(std::size_t(p.d.B * p.d.Hq * p.d.N * p.d.Dv));
  std::size_t n = 0;
  for (std::int64_t b = 0; b < p.d.B; ++b)
    for (std::int64_t h = 0; h < p.d.Hq; ++h)
      for (std::int64_t i = 0; i < p.d.N; ++i)
        for (std::int64_t c = 0; c < p.d.Dv; ++c) widened[n++] = widen(out.at(b, h, i, c));
  const TensorView<const float> lse = p.lse.cview();
  const TensorView<const float> got{widened.data(), {p.d.B, p.d.Hq, p.d.N, p.d.Dv}, contiguous({p.d.B, p.d.Hq, p.d.N, p.d.Dv})};
  Outcome o = compare(e, got, &lse);
  if (!same_bits(out, out2, true)) o.ok = false, o.report += "\nattention without lse gave a different out";
  if (!same_bits(out, out_before, false)) o.ok = false, o.report += "\nattention wrote outside out's view";
  if (!p.lse.padding_intact()) o.ok = false, o.report += "\nattention wrote outside lse's view";
  return o;
}

template <class Q, class KV>
void check16(Problem& p) {
  const Outcome o = run16<Q, KV>(p);
  INFO(p.describe() << " types: q/out " << type_name<Q>() << ", k/v " << type_name<KV>());
  INFO(o.report);
  CHECK(o.ok);
  if (std::is_same<Q, float>::value) {
    ::ftest::record_margin(std::max(o.out_ratio, o.lse_ratio));
    CHECK(o.out_ratio <= ::ftest::kOptionsMarginFraction);
  }
  CHECK(o.lse_ratio <= ::ftest::kOptionsMarginFraction);
}

// Every combination of the public header.
template <class Fn>
void for_each_combination(Fn fn) {
  fn(std::function<void(Problem&)>(check16<bf16, bf16>), "bf16/bf16");
  fn(std::function<void(Problem&)>(check16<fp16, fp16>), "fp16/fp16");
  fn(std::function<void(Problem&)>(check16<float, bf16>), "fp32 q over bf16 k/v");
  fn(std::function<void(Problem&)>(check16<float, fp16>), "fp32 q over fp16 k/v");
}

// Prefill (N > 16: with N < M, N > M, N = 17) and decode (N <= 16: split-KV with several
// chunks; N = 16 with D = 32 reads K and V in place, and its 4 x 16 stacked rows take
// the tiles: the lanes kernel is fp32's only). GQA 8/2; D and Dv odd except where the
// in-place paths need whole vectors.
const Dims kShapes[] = {
    {2, 8, 2, 24, 160, 19, 23}, {1, 8, 2, 90, 60, 33, 7},  {1, 8, 2, 17, 300, 17, 9},
    {2, 8, 2, 1, 1800, 17, 9},  {2, 8, 2, 3, 1300, 17, 9}, {1, 8, 2, 16, 1100, 32, 16},
    {1, 4, 4, 1, 1031, 64, 64},  // one query head per KV head, K/V in place, a prime M
    // Decoding's wide P.V tiles (8 vectors on AVX-512) with a one-vector tail, a prime M.
    {1, 8, 2, 1, 1283, 128, 136}, {1, 8, 2, 2, 700, 128, 128},
};

struct OptionSet {
  const char* name;
  std::function<void(Problem&)> apply;
};

const std::vector<OptionSet>& option_sets() {
  static const std::vector<OptionSet> sets = {
      {"none", [](Problem&) {}},
      {"causal", [](Problem& p) { p.causal(); }},
      {"mask", [](Problem& p) { p.full_mask(0.1); }},
      {"bool_mask", [](Problem& p) { p.full_bool(0.25); }},
      {"key_lengths", [](Problem& p) { p.partial_key_lengths(); }},
      {"window both", [](Problem& p) { p.window(p.d.M / 5, 3); }},
      {"softcap + alibi", [](Problem& p) { p.softcap(0.8f), p.alibi(); }},
      {"gaussian", [](Problem& p) { p.gaussian(); }},
      {"additive", [](Problem& p) { p.additive(); }},
      {"sinks", [](Problem& p) { p.sinks(-2.0f, 4.0f, true); }},
      {"everything", [](Problem& p) { p.everything(); }},
  };
  return sets;
}

}  // namespace

TEST_CASE("16-bit: every combination, option and score matches the oracle, prefill and decode", "[16bit]") {
  std::uint32_t seed = 16000;
  std::int64_t round = 0;
  for_each_combination([&](const std::function<void(Problem&)>& check, const char* combination) {
    // Each (combination, option set) on one prefill and one decode shape, rotating
    // through the shapes, so every shape meets every combination.
    for (const auto& set : option_sets()) {
      ++round;
      for (const Dims& d : kShapes) {
        ++seed;
        const std::int64_t index = &d - kShapes, prefill_shapes = 3;
        const std::int64_t decode_shapes = std::int64_t(std::size(kShapes)) - prefill_shapes;
        if (index != round % prefill_shapes && index != prefill_shapes + round % decode_shapes) continue;
        const Layout layout = seed % 3 == 0 ? Layout::bshd : seed % 3 == 1 ? Layout::padded : Layout::sliced;
        Problem p(d, seed, layout);
        set.apply(p);
        INFO(combination << ", option set: " << set.name << (on_decode_driver(d) ? " (decode driver)" : " (prefill driver)"));
        check(p);
      }
    }
  });
}

TEST_CASE("16-bit: the decoding tiles' row and width cases under every option set", "[16bit][decode]") {
  // The decode driver's 16-bit tiles by stacked rows and value width, K and V in place
  // (D a multiple of 16): 4 rows at D = 64, all on 4-vector P.V tiles (narrower than the
  // 8-vector ones); 2 rows at D = 128 and 1 row at D = 64, the live half of a 4-row tile;
  // 9 rows at D = 64, whose last 6-row tile (AVX2, AVX-512) has 3 live rows; 3 rows at
  // D = 128, a 4-row tile with one padding row. Other widths: D = 80 with Dv = 48 (on
  // AVX-512 a 2-vector P.V tile and a 1-vector one), D = 32 with Dv = 16 (one value
  // vector), D = 528 with Dv = 80 (33 and 5 vectors). Every option set on each, every
  // combination.
  const Dims shapes[] = {{1, 8, 2, 1, 777, 64, 64},   {1, 4, 2, 1, 613, 128, 128}, {2, 3, 3, 1, 520, 64, 64},
                         {1, 9, 1, 1, 555, 64, 64},   {1, 6, 2, 1, 301, 128, 128}, {1, 4, 1, 1, 333, 80, 48},
                         {1, 2, 2, 1, 129, 32, 16},   {1, 3, 1, 1, 97, 528, 80}};
  std::uint32_t seed = 17000;
  for_each_combination([&](const std::function<void(Problem&)>& check, const char* combination) {
    for (const auto& set : option_sets())
      for (const Dims& d : shapes) {
        REQUIRE(on_decode_driver(d));
        ++seed;
        Problem p(d, seed, seed % 2 == 0 ? Layout::bhsd : Layout::padded);
        set.apply(p);
        INFO(combination << ", option set: " << set.name);
        check(p);
      }
  });
}

TEST_CASE("16-bit: randomized shapes with awkward sizes and views", "[16bit]") {
  std::mt19937 rng(1616);
  const std::int64_t sizes[] = {1, 2, 3, 5, 7, 13, 17, 31, 37, 61, 64, 67, 128, 131};
  auto pick = [&](std::int64_t hi) {
    std::int64_t x;
    do x = sizes[rng() % (sizeof(sizes) / sizeof(sizes[0]))];
    while (x > hi);
    return x;
  };
  int decode = 0, prefill = 0;
  for_each_combination([&](const std::function<void(Problem&)>& check, const char* combination) {
    for (int t = 0; t < 12; ++t) {
      const std::int64_t hkv = 1 + rng() % 2, group = 1 + rng() % 4;
      const Dims d{1 + std::int64_t(rng() % 2), hkv * group, hkv, pick(131), pick(131) + std::int64_t(rng() % 300),
                   pick(131), pick(131)};
      (on_decode_driver(d) ? decode : prefill) += 1;
      Problem p(d, std::uint32_t(rng()), t % 2 ? Layout::sliced : Layout::bshd, t % 3 ? Layout::padded : Layout::bhsd);
      if (t % 4 == 1) p.causal();
      if (t % 5 == 2) p.full_bool(0.3);
      INFO(combination);
      check(p);
    }
  });
  CHECK(decode > 0);
  CHECK(prefill > 0);
}

// The kernel's output of a problem (its inputs rounded to Q and KV as in run16), widened.
template <class Q, class KV>
std::vector<float> output16(Problem& p) {
  round_view<KV>(p.k);
  round_view<KV>(p.v);
  if constexpr (!std::is_same<Q, float>::value) round_view<Q>(p.q);
  const Copy<Q> q(p.q);
  const Copy<KV> k(p.k), v(p.v);
  Copy<Q> out(p.out);
  flashcpu::attention(q.cview(), k.cview(), v.cview(), out.view(), p.opt);
  std::vector<float> widened;
  for (std::int64_t b = 0; b < p.d.B; ++b)
    for (std::int64_t h = 0; h < p.d.Hq; ++h)
      for (std::int64_t i = 0; i < p.d.N; ++i)
        for (std::int64_t c = 0; c < p.d.Dv; ++c) widened.push_back(widen(out.at(b, h, i, c)));
  return widened;
}

// A NaN in one q row and in one key's K row: the rows the oracle makes NaN are NaN
// throughout, every other row is bitwise what the same problem without the NaNs gave.
template <class Q, class KV>
void check_nan_rows(const Dims& d) {
  Problem clean(d, 77), poisoned(d, 77);
  clean.causal();
  poisoned.causal();
  poisoned.k.at(0, 0, 260, d.D / 2) = std::numeric_limits<float>::quiet_NaN();
  poisoned.q.at(d.B - 1, 1, std::min<std::int64_t>(5, d.N - 1), 0) = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> want_clean = output16<Q, KV>(clean), got = output16<Q, KV>(poisoned);
  std::vector<float> ref(got.size());
  flashcpu::reference::attention(poisoned.q.cview(), poisoned.k.cview(), poisoned.v.cview(),
                                 flashcpu::bhsd(ref.data(), d.B, d.Hq, d.N, d.Dv), poisoned.opt);
  std::int64_t nan_rows = 0, clean_rows = 0, bad = 0;
  for (std::size_t row = 0; row < got.size() / std::size_t(d.Dv); ++row) {
    const bool nan_row = std::isnan(ref[row * std::size_t(d.Dv)]);
    (nan_row ? nan_rows : clean_rows) += 1;
    for (std::size_t c = row * std::size_t(d.Dv); c < (row + 1) * std::size_t(d.Dv); ++c)
      if (nan_row ? !std::isnan(got[c]) : std::memcmp(&got[c], &want_clean[c], sizeof(float)) != 0) ++bad;
  }
  INFO(poisoned.describe() << " types: q/out " << type_name<Q>() << ", k/v " << type_name<KV>()
                           << "; rows NaN in the oracle: " << nan_rows << ", finite: " << clean_rows);
  CHECK(bad == 0);
  CHECK(nan_rows > 1);  // the q row, and the rows that see the key
  CHECK(clean_rows > 0);
}

TEST_CASE("16-bit: a NaN in q or in a visible key makes exactly the rows that see it NaN", "[16bit]") {
  // The vector kernels catch a NaN score by a probe beside the exponential; the AMX
  // tiles' bf16 softmax lets the exponential carry it (kernels/forward_tiles.hpp,
  // Bf16Weights). Causal, so that the rows before the NaN key stay finite; the key (260)
  // lies past the first block where blocks are 256 keys and inside it where they are 512
  // (the AMX kernel's); the q row is in another head of the same KV head.
  for (const Dims& d : {Dims{1, 4, 2, 70, 300, 64, 64}, Dims{2, 4, 2, 33, 290, 33, 19}, Dims{1, 8, 2, 4, 400, 32, 16}}) {
    check_nan_rows<bf16, bf16>(d);
    check_nan_rows<fp16, fp16>(d);
    check_nan_rows<float, bf16>(d);
    check_nan_rows<float, fp16>(d);
  }
}

TEST_CASE("16-bit: results are bitwise identical for every num_threads", "[16bit][threads]") {
  // Prefill, and decode with several split-KV chunks, for one 16-bit and one mixed type.
  for (const Dims& d : {Dims{1, 8, 2, 40, 700, 64, 64}, Dims{1, 8, 2, 2, 3000, 64, 64}}) {
    std::vector<std::vector<bf16>> bf_outs;
    std::vector<std::vector<float>> mixed_outs;
    for (int threads : {1, 2, 3, 5}) {
      Problem p(d, 77, Layout::bhsd, Layout::bhsd);
      p.causal();
      const Outcome o = run16<bf16, bf16>(p, threads);
      CHECK(o.ok);
      Copy<bf16> out(p.out);
      // run16 left its own output in a copy; run once more to keep this one.
      flashcpu::AttentionOptions opt = p.opt;
      opt.num_threads = threads;
      const Copy<bf16> q(p.q), k(p.k), v(p.v);
      flashcpu::attention(q.cview(), k.cview(), v.cview(), out.view(), opt);
      std::vector<bf16> values;  // in view order: buffers may sit at different offsets
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h)
          for (std::int64_t i = 0; i < d.N; ++i)
            for (std::int64_t c = 0; c < d.Dv; ++c) values.push_back(out.at(b, h, i, c));
      bf_outs.push_back(values);

      Problem m(d, 78, Layout::bhsd, Layout::bhsd);
      round_view<fp16>(m.k);
      round_view<fp16>(m.v);
      const Copy<fp16> k16(m.k), v16(m.v);
      flashcpu::attention(m.q.cview(), k16.cview(), v16.cview(), m.out.view(), opt);
      mixed_outs.push_back(m.out.values());
    }
    for (std::size_t t = 1; t < bf_outs.size(); ++t) {
      CHECK(std::memcmp(bf_outs[t].data(), bf_outs[0].data(), bf_outs[0].size() * sizeof(bf16)) == 0);
      CHECK(std::memcmp(mixed_outs[t].data(), mixed_outs[0].data(), mixed_outs[0].size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("16-bit: bad input is rejected as in fp32, before anything is written", "[16bit][errors]") {
  const std::int64_t B = 1, H = 2, N = 5, M = 9, D = 8;
  std::vector<float> qf(B * H * N * D, 0.5f), kf(B * H * M * D, 0.25f), of(B * H * N * D, -7.0f);
  std::vector<bf16> q(qf.size(), flashcpu::to_bf16(0.5f)), k(kf.size(), flashcpu::to_bf16(0.25f));
  std::vector<bf16> o(of.size(), flashcpu::to_bf16(-7.0f));
  // The fp32 message and the 16-bit one for the same mistake.
  auto message = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const flashcpu::Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  using flashcpu::bhsd;
  struct Case {
    const char* what;
    std::function<void(flashcpu::AttentionOptions&, Shape&, Shape&)> change;  // options, k (and v) shape, out shape
  };
  const Case cases[] = {
      {"head dim mismatch", [](auto&, Shape& ks, Shape&) { ks[3] = D - 1; }},
      {"query heads not a multiple of kv heads", [](auto&, Shape& ks, Shape&) { ks[1] = H + 1; }},
      {"out heads", [](auto&, Shape&, Shape& os) { os[1] = H + 1; }},
      {"negative softcap", [](flashcpu::AttentionOptions& opt, Shape&, Shape&) { opt.softcap = -1.0f; }},
      {"window", [](flashcpu::AttentionOptions& opt, Shape&, Shape&) { opt.window_left = -5; }},
  };
  for (const Case& c : cases) {
    flashcpu::AttentionOptions opt;
    Shape ks{B, H, M, D}, os{B, H, N, D};
    c.change(opt, ks, os);
    const TensorView<const float> kf_view{kf.data(), ks, contiguous(ks)};
    const TensorView<const bf16> k_view{k.data(), ks, contiguous(ks)};
    const std::string want = message([&] {
      flashcpu::attention(bhsd<const float>(qf.data(), B, H, N, D), kf_view, kf_view,
                          TensorView<float>{of.data(), os, contiguous(os)}, opt);
    });
    const std::string got = message([&] {
      flashcpu::attention(bhsd<const bf16>(q.data(), B, H, N, D), k_view, k_view,
                          TensorView<bf16>{o.data(), os, contiguous(os)}, opt);
    });
    const std::string mixed = message([&] {
      flashcpu::attention(bhsd<const float>(qf.data(), B, H, N, D), k_view, k_view,
                          TensorView<float>{of.data(), os, contiguous(os)}, opt);
    });
    INFO(c.what);
    CHECK(want != "(no error)");
    CHECK(got == want);
    CHECK(mixed == want);
    for (const bf16& x : o) CHECK(x.bits == flashcpu::to_bf16(-7.0f).bits);
    for (float x : of) CHECK(x == -7.0f);
  }
  // Overlap is judged on 16-bit addresses: out over k's bytes is caught, out right after
  // them is not.
  std::vector<bf16> shared(k.size() + o.size());
  const auto k_in = bhsd<const bf16>(shared.data(), B, H, M, D);
  const std::string overlap = message([&] {
    flashcpu::attention(bhsd<const bf16>(q.data(), B, H, N, D), k_in, k_in, bhsd(shared.data() + 8, B, H, N, D));
  });
  CHECK(overlap.find("out: expected memory disjoint from k") != std::string::npos);
  const std::string after = message([&] {
    flashcpu::attention(bhsd<const bf16>(q.data(), B, H, N, D), k_in, k_in, bhsd(shared.data() + k.size(), B, H, N, D));
  });
  CHECK(after == "(no error)");
}

TEST_CASE("16-bit: fp16 subnormals widen exactly with flush-to-zero and denormals-are-zero set", "[16bit]") {
  // Frameworks set FTZ and DAZ for speed; an fp16 subnormal must still widen to its
  // value (a normal float), not to 0, on every level (SSE2 widens by integer code).
  Problem p(Dims{1, 4, 2, 30, 300, 16, 16}, 7070, Layout::bhsd, Layout::bhsd);  // 60 stacked rows: prefill
  std::mt19937 rng(7071);
  std::uniform_real_distribution<float> tiny(-6e-5f, 6e-5f);  // mostly fp16 subnormals
  for (Tensor* t : {&p.k, &p.v})
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t j = 0; j < 300; ++j)
        for (std::int64_t c = 0; c < 16; ++c) t->at(0, h, j, c) = tiny(rng);
  round_view<fp16>(p.k);
  round_view<fp16>(p.v);
  const Expected e = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
  const Copy<fp16> k(p.k), v(p.v);
  for (bool decode : {false, true}) {
    flashcpu::AttentionOptions opt = p.opt;
    opt.num_threads = 1;  // the calling thread, whose MXCSR is set here
    TensorView<const float> q = p.q.cview();
    TensorView<float> out = p.out.view();
    if (decode) q.shape[2] = out.shape[2] = 1;  // query 0 only: the decode path
    const unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040);  // FTZ | DAZ
    flashcpu::attention(q, k.cview(), v.cview(), out, opt);
    _mm_setcsr(saved);
    Worst w;
    for (std::int64_t h = 0; h < 4; ++h)
      for (std::int64_t c = 0; c < 16; ++c) {
        const std::size_t at = std::size_t((h * 30) * 16 + c);  // query 0 of each head
        w.record(p.out.at(0, h, 0, c), e.out[at], e.out_tol[at], 0, h, 0, c);
      }
    INFO((decode ? "decode: " : "prefill: ") << w.text("out"));
    CHECK(w.bad == 0);
  }
}
