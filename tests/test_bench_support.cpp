// The benchmark baselines and their bookkeeping (bench/): the figures the README
// quotes are only as honest as these. Built when bench/ or tools/ are (not in the
// sanitizer build, which leaves them out).
#include "common.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace fb = flashcpu::bench;

TEST_CASE("best OpenBLAS core follows the CPU's flags", "[bench][openblas]") {
  const std::set<std::string> avx512 = {"sse2", "avx", "avx2", "fma", "avx512f",
                                        "avx512dq", "avx512bw", "avx512vl"};
  std::set<std::string> bf16 = avx512;
  bf16.insert("avx512_bf16");
  CHECK(fb::best_openblas_core(bf16) == "Cooperlake");
  CHECK(fb::best_openblas_core(avx512) == "SkylakeX");
  CHECK(fb::best_openblas_core({"sse2", "avx", "avx2", "fma"}) == "Haswell");
  CHECK(fb::best_openblas_core({"sse2", "avx", "avx2"}) == "");  // no FMA: leave it be
  CHECK(fb::best_openblas_core({"sse2"}) == "");
  // AVX-512F alone (no BW/VL, as on Knights Landing) is not what SkylakeX needs.
  CHECK(fb::best_openblas_core({"sse2", "avx2", "fma", "avx512f"}) == "Haswell");
}

TEST_CASE("OpenBLAS core ranks order the fallbacks below the best cores", "[bench][openblas]") {
  CHECK(fb::openblas_core_rank("Prescott") < fb::openblas_core_rank("Haswell"));
  CHECK(fb::openblas_core_rank("Zen") == fb::openblas_core_rank("Haswell"));
  CHECK(fb::openblas_core_rank("Haswell") < fb::openblas_core_rank("SkylakeX"));
  CHECK(fb::openblas_core_rank("SkylakeX") < fb::openblas_core_rank("Cooperlake"));
  CHECK(fb::openblas_core_rank("cooperlake") == fb::openblas_core_rank("Cooperlake"));
  CHECK(fb::openblas_core_rank("Sandybridge") < fb::openblas_core_rank("Haswell"));
  CHECK(fb::openblas_core_rank("something new") == 1);
}

TEST_CASE("the cross-check tolerance is relative to the output's scale, and can fail",
          "[bench][check]") {
  // Outputs of about 0.01, as random inputs give at M = 2048.
  std::vector<float> expected(1000), actual;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    expected[i] = 0.01f * std::sin(float(i));
  }
  double scale = 0;
  for (float x : expected) scale = std::max(scale, double(std::fabs(x)));
  actual = expected;
  CHECK(fb::compare_to_scale(actual.data(), expected.data(), expected.size()).max_excess == 0);
  // fp32 rounding differences (1e-6 of the scale) pass.
  actual[17] = float(expected[17] + 1e-6 * scale);
  CHECK(fb::compare_to_scale(actual.data(), expected.data(), expected.size()).max_excess < 1);
  // An error of 1e-3 of the scale fails: the old 2e-4 absolute bound let 2% through.
  actual[17] = float(expected[17] + 1e-3 * scale);
  const fb::Diff d = fb::compare_to_scale(actual.data(), expected.data(), expected.size());
  CHECK(d.max_excess > 1);
  CHECK(d.worst == 17);
  actual[17] = NAN;
  CHECK(fb::compare_to_scale(actual.data(), expected.data(), expected.size()).max_excess > 1);
  // An all-zero expectation (rows that see no key) tolerates nothing but zeros.
  std::vector<float> zeros(8, 0.0f), tiny(8, 0.0f);
  CHECK_FALSE(fb::compare_to_scale(zeros.data(), zeros.data(), zeros.size()).max_excess > 1);
  tiny[3] = 1e-30f;
  CHECK(fb::compare_to_scale(tiny.data(), zeros.data(), zeros.size()).max_excess > 1);
}

TEST_CASE("reduced shapes keep the family and cap the size", "[bench][check]") {
  const fb::Shape dec = fb::gqa(1, 32, 8, 1, 8192, 128);
  const fb::Shape r = fb::reduced(dec);
  CHECK(r.q_heads / r.kv_heads == 4);
  CHECK(r.kv_heads == 2);
  CHECK(r.d == 128);
  CHECK(r.n == 1);
  CHECK(r.m == 97);  // M - N kept up to 96
  const fb::Shape c = fb::reduced(fb::mha(1, 8, 4096, 4096, 128, true));
  CHECK(c.causal);
  CHECK(c.n == c.m);
  CHECK(c.n == 160);
  fb::Shape over = fb::mha(2, 3, 40, 17, 48, true);  // N > M: early rows see no key
  over.dv = 24;
  const fb::Shape o = fb::reduced(over);
  CHECK(o.n == 40);
  CHECK(o.m == 17);
  CHECK(o.batch == 1);
  CHECK(o.dv == 24);
}

TEST_CASE("every baseline agrees with the fp64 oracle on awkward shapes", "[bench][check]") {
  // Aborts the process, with the worst element, on a mismatch.
  fb::self_check(/*verbose=*/false);
  SUCCEED("fused, naive, openblas and openblas_full within 1e-4 of the oracle's scale");
}

TEST_CASE("the causal materialized baseline computes about half the square",
          "[bench][openblas]") {
  if (!fb::have_openblas()) {
    WARN("OpenBLAS not built: not run");
    return;
  }
  const fb::Shape s = fb::mha(1, 2, 1024, 1024, 64, true);
  // One score buffer of 256 rows per thread instead of a whole head's N x M.
  CHECK(fb::analytic_mib(fb::Impl::openblas, s, 2) <
        fb::analytic_mib(fb::Impl::openblas_full, s, 2) / 2);
  // The workspace is reused: a second call allocates nothing new.
  fb::Problem p(s);
  fb::MaterializedWorkspace ws;
  fb::run(fb::Impl::openblas, p, 2, &ws);
  const float* first = ws.buffers.at(0).get();
  fb::run(fb::Impl::openblas, p, 2, &ws);
  CHECK(ws.buffers.at(0).get() == first);
}

// ---------------------------------------------------------------------------------
// 16-bit data: fp32 q over 16-bit K/V, or every tensor 16-bit (common.hpp, DType)
// ---------------------------------------------------------------------------------

namespace {

fb::Shape typed(fb::Shape s, fb::DType t) {
  s.dtype = t;
  return s;
}

std::uint32_t float_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

float bits_float(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

constexpr fb::DType k16BitTypes[] = {fb::DType::bf16, fb::DType::fp16, fb::DType::bf16kv,
                                     fb::DType::fp16kv};

}  // namespace

TEST_CASE("data types have one spelling, and describe() names them", "[bench][dtype]") {
  for (fb::DType t : fb::kDTypes) {
    fb::DType back = fb::DType::fp32;
    REQUIRE(fb::parse_dtype(fb::dtype_name(t), &back));
    CHECK(back == t);
  }
  fb::DType t = fb::DType::bf16;
  CHECK_FALSE(fb::parse_dtype("f32", &t));
  CHECK_FALSE(fb::parse_dtype("BF16", &t));
  CHECK(std::string(fb::dtype_name(fb::DType::bf16kv)) == "bf16kv");  // DEC_bf16kv
  CHECK(std::string(fb::dtype_name(fb::DType::fp16kv)) == "fp16kv");  // P64_fp16kv

  const fb::Shape dec = fb::gqa(1, 32, 8, 1, 8192, 128);
  CHECK(fb::describe(dec) == "B=1 Hq=32 Hkv=8 N=1 M=8192 D=128");
  CHECK(fb::describe(typed(dec, fb::DType::bf16kv)) == "B=1 Hq=32 Hkv=8 N=1 M=8192 D=128 bf16 K/V");
  CHECK(fb::describe(typed(dec, fb::DType::fp16kv)) == "B=1 Hq=32 Hkv=8 N=1 M=8192 D=128 fp16 K/V");
  CHECK(fb::describe(typed(fb::mha(1, 16, 2048, 2048, 64), fb::DType::bf16)) ==
        "B=1 Hq=16 Hkv=16 N=2048 M=2048 D=64 bf16");
  CHECK(fb::describe(typed(fb::mha(1, 2, 8, 8, 64, true), fb::DType::fp16)) ==
        "B=1 Hq=2 Hkv=2 N=8 M=8 D=64 causal fp16");
  // The problem cache keys on describe(): each type of one shape is its own problem.
  CHECK(fb::describe(typed(dec, fb::DType::bf16kv)) != fb::describe(typed(dec, fb::DType::fp16kv)));
}

TEST_CASE("byte counts use the stored element sizes", "[bench][dtype]") {
  constexpr double kMiB = 1 << 20;
  const fb::Shape dec = fb::gqa(1, 32, 8, 1, 8192, 128);
  // K and V of 8 heads x 8192 keys x (128 + 128): 64 MiB in fp32, 32 MiB in 16 bits.
  CHECK(fb::kv_bytes(dec) == 64 * kMiB);
  CHECK(fb::kv_bytes(typed(dec, fb::DType::bf16kv)) == 32 * kMiB);
  CHECK(fb::kv_bytes(typed(dec, fb::DType::fp16kv)) == 32 * kMiB);
  const double dec_q_out = 32.0 * 128 * 2 * 4;  // fp32 q and out of one query per head
  CHECK(fb::input_bytes(dec) == 64 * kMiB + dec_q_out);
  CHECK(fb::input_bytes(typed(dec, fb::DType::fp16kv)) == 32 * kMiB + dec_q_out);

  // P64: q, k, v and out of 16 x 2048 x 64 elements each, 8 MiB apiece in fp32.
  const fb::Shape p64 = fb::mha(1, 16, 2048, 2048, 64);
  CHECK(fb::input_bytes(p64) == 32 * kMiB);
  CHECK(fb::input_bytes(typed(p64, fb::DType::bf16)) == 16 * kMiB);
  CHECK(fb::input_bytes(typed(p64, fb::DType::fp16)) == 16 * kMiB);
  CHECK(fb::input_bytes(typed(p64, fb::DType::fp16kv)) == 24 * kMiB);
  CHECK(fb::kv_bytes(typed(p64, fb::DType::bf16)) == 8 * kMiB);
  // A Problem holds the fp32 tensors and the 16-bit ones.
  CHECK(fb::resident_bytes(p64) == 32 * kMiB);
  CHECK(fb::resident_bytes(typed(p64, fb::DType::bf16)) == 48 * kMiB);
  CHECK(fb::resident_bytes(typed(p64, fb::DType::fp16kv)) == 40 * kMiB);

  // The baselines' design adds the fp32 copies they widen the 16-bit data into.
  CHECK(fb::analytic_mib(fb::Impl::naive, typed(dec, fb::DType::bf16kv), 2) ==
        Approx(fb::analytic_mib(fb::Impl::naive, dec, 2) + 64));
  CHECK(fb::analytic_mib(fb::Impl::openblas, typed(p64, fb::DType::bf16), 2) ==
        Approx(fb::analytic_mib(fb::Impl::openblas, p64, 2) + 32));
  CHECK(fb::analytic_mib(fb::Impl::fused, typed(p64, fb::DType::bf16), 2) < 0);
}

TEST_CASE("the baselines' conversions are the library's, bit for bit", "[bench][dtype]") {
  // Widening: every 16-bit pattern (NaN payloads included).
  std::vector<flashcpu::bf16> b(65536);
  std::vector<flashcpu::fp16> h(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) {
    b[i].bits = std::uint16_t(i);
    h[i].bits = std::uint16_t(i);
  }
  std::vector<float> wide(65536);
  fb::widen(b.data(), fb::Elem::bf16, wide.data(), wide.size());
  std::size_t bad = 0;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    bad += float_bits(wide[i]) != float_bits(flashcpu::to_float(b[i]));
  }
  CHECK(bad == 0);
  fb::widen(h.data(), fb::Elem::fp16, wide.data(), wide.size());
  for (std::uint32_t i = 0; i < 65536; ++i) {
    bad += float_bits(wide[i]) != float_bits(flashcpu::to_float(h[i]));
  }
  CHECK(bad == 0);

  // Rounding: a sample of every float pattern (NaN, inf, subnormals included), and for
  // each 16-bit value the exact tie above it and the floats either side of the tie.
  std::vector<float> x;
  for (std::uint64_t u = 0; u <= 0xffffffffu; u += 997) x.push_back(bits_float(std::uint32_t(u)));
  auto add_ties = [&x](auto next_of) {
    for (std::uint32_t i = 0; i < 0x7fff; ++i) {
      float lo = 0, hi = 0;
      if (!next_of(i, &lo, &hi)) continue;
      const float tie = lo + (hi - lo) / 2;  // exact: 16-bit values have at most 11 bits
      for (float t : {tie, std::nextafter(tie, 0.0f), std::nextafter(tie, INFINITY)}) {
        x.push_back(t);
        x.push_back(-t);
      }
    }
  };
  add_ties([](std::uint32_t i, float* lo, float* hi) {
    if (i >= 0x7f7f) return false;  // the largest finite bf16 has no finite float tie
    *lo = flashcpu::to_float(flashcpu::bf16{std::uint16_t(i)});
    *hi = flashcpu::to_float(flashcpu::bf16{std::uint16_t(i + 1)});
    return true;
  });
  add_ties([](std::uint32_t i, float* lo, float* hi) {
    if (i >= 0x7c00) return false;
    *lo = flashcpu::to_float(flashcpu::fp16{std::uint16_t(i)});
    // Above the largest finite value (65504) the tie is with 65536, where inf begins.
    *hi = i + 1 == 0x7c00 ? 65536.0f : flashcpu::to_float(flashcpu::fp16{std::uint16_t(i + 1)});
    return true;
  });
  std::vector<flashcpu::bf16> xb(x.size());
  std::vector<flashcpu::fp16> xh(x.size());
  fb::narrow(x.data(), fb::Elem::bf16, xb.data(), x.size());
  fb::narrow(x.data(), fb::Elem::fp16, xh.data(), x.size());
  std::size_t bad_b = 0, bad_h = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    bad_b += xb[i].bits != flashcpu::to_bf16(x[i]).bits;
    bad_h += xh[i].bits != flashcpu::to_fp16(x[i]).bits;
  }
  CHECK(bad_b == 0);
  CHECK(bad_h == 0);
}

TEST_CASE("a 16-bit problem holds its inputs in both forms, with the same values",
          "[bench][dtype]") {
  for (fb::DType t : k16BitTypes) {
    INFO(fb::dtype_name(t));
    const fb::Problem p(typed(fb::gqa(1, 4, 2, 9, 20, 16), t));
    const bool act16 = fb::act_elem(t) != fb::Elem::f32;
    CHECK(p.k16 != nullptr);
    CHECK(p.v16 != nullptr);
    CHECK((p.q16 != nullptr) == act16);
    CHECK((p.out16 != nullptr) == act16);
    // The fp32 buffers hold the 16-bit values: widening them back gives the same bits.
    auto same = [](const fb::Buffer& values, const fb::RawBuffer& bits, fb::Elem e, std::size_t n) {
      std::vector<float> wide(n);
      fb::widen(bits.get(), e, wide.data(), n);
      return std::memcmp(wide.data(), values.get(), n * sizeof(float)) == 0;
    };
    CHECK(same(p.k, p.k16, fb::kv_elem(t), p.k_size()));
    CHECK(same(p.v, p.v16, fb::kv_elem(t), p.v_size()));
    if (act16) CHECK(same(p.q, p.q16, fb::act_elem(t), p.q_size()));
  }
}

TEST_CASE("the widening baselines agree with the fused kernel on every 16-bit type",
          "[bench][dtype][check]") {
  for (fb::DType t : k16BitTypes) {
    for (const fb::Shape& s : {typed(fb::gqa(1, 4, 2, 50, 90, 64, true), t),   // causal, N < M
                               typed(fb::gqa(1, 8, 2, 1, 333, 128), t)}) {  // decode
      INFO(fb::describe(s));
      fb::Problem p(s);
      fb::run(fb::Impl::fused, p, 2);
      const fb::Buffer fused = fb::output_floats(p);
      for (fb::Impl impl : {fb::Impl::naive, fb::Impl::openblas, fb::Impl::openblas_full}) {
        if (impl != fb::Impl::naive && !fb::have_openblas()) continue;
        INFO(fb::impl_label(impl, s));
        fb::MaterializedWorkspace ws;
        fb::run(impl, p, 2, &ws);
        // Within one output rounding's worth (rtol 2^-11 for fp16) the causal fp16
        // problem fails against OpenBLAS (1.18 times it, measured): two roundings of
        // agreeing fp32 values can land one ulp apart, hence output_rounding_rtol.
        CHECK(fb::compare_output(p, fused.get()).max_excess <= 1.0);
      }
      // The tolerance still catches an error: 4 units in the last place of the
      // largest output (or 1e-3 of it for an fp32 output), beyond twice the allowance
      // for rounded bf16 weights where the type has one.
      const fb::Buffer out = fb::output_floats(p);
      std::size_t big = 0;
      for (std::size_t i = 0; i < p.out_size(); ++i)
        if (std::fabs(out[i]) > std::fabs(out[big])) big = i;
      if (p.out16) {
        auto* bits = static_cast<std::uint16_t*>(p.out16.get());
        if (const double weights = fb::weight_rounding_atol(p); weights > 0)
          bits[big] = flashcpu::to_bf16(out[big] + float(std::copysign(2 * weights, double(out[big])))).bits;
        bits[big] += 4;
      } else {
        p.out[big] += 1e-3f * std::fabs(p.out[big]);
      }
      CHECK(fb::compare_output(p, fused.get()).max_excess > 1.0);
    }
  }
}

TEST_CASE("a baseline on 16-bit data is the fp32 baseline on the same values", "[bench][dtype]") {
  // Widening is exact, so naive on a 16-bit problem must give the bits naive gives on an
  // fp32 problem holding the rounded values (and, for a 16-bit output, those rounded).
  for (fb::DType t : k16BitTypes) {
    INFO(fb::dtype_name(t));
    const fb::Shape s = typed(fb::gqa(1, 4, 2, 21, 40, 32, true), t);
    fb::Problem p16(s);
    fb::Shape s32 = s;
    s32.dtype = fb::DType::fp32;
    fb::Problem p32(s32);
    std::memcpy(p32.q.get(), p16.q.get(), p16.q_size() * sizeof(float));
    std::memcpy(p32.k.get(), p16.k.get(), p16.k_size() * sizeof(float));
    std::memcpy(p32.v.get(), p16.v.get(), p16.v_size() * sizeof(float));
    fb::run(fb::Impl::naive, p16, 2);
    fb::run(fb::Impl::naive, p32, 2);
    std::vector<float> want(p32.out.get(), p32.out.get() + p32.out_size());
    if (p16.out16) {
      const fb::RawBuffer rounded = fb::allocate_elems(fb::act_elem(t), want.size());
      fb::narrow(want.data(), fb::act_elem(t), rounded.get(), want.size());
      fb::widen(rounded.get(), fb::act_elem(t), want.data(), want.size());
    }
    const fb::Buffer got = fb::output_floats(p16);
    CHECK(std::memcmp(got.get(), want.data(), want.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("under allow_bf16_compute the fused call is checked against the oracle on its rounded inputs",
          "[bench][check]") {
  const std::string isa = flashcpu::active_isa();
  const bool bf16_level = isa == "avx512bf16" || isa == "amx";
  struct Case {
    fb::Shape s;
    bool rounds;  // what the header says: fp32 and fp16 prefill and fp32 q over a bf16
                  // cache round on the bf16-product levels; decoding from fp32 K never
  };
  const Case cases[] = {{fb::mha(1, 2, 160, 160, 64), bf16_level},
                        {typed(fb::mha(1, 2, 67, 67, 64), fb::DType::fp16), bf16_level},
                        {fb::gqa(1, 8, 2, 1, 300, 128), false},
                        {typed(fb::gqa(1, 8, 2, 1, 300, 128), fb::DType::bf16kv), bf16_level}};
  for (Case c : cases) {
    const fb::Shape exact_shape = c.s;
    c.s.bf16_compute = true;
    const std::string label = fb::impl_label(fb::Impl::fused, c.s);
    INFO(isa << ": " << fb::describe(c.s) << ": " << label);
    CHECK(fb::fused_rounds_to_bf16(c.s) == c.rounds);
    CHECK(label.size() > 20);
    CHECK(label.compare(label.size() - 20, 20, ", allow_bf16_compute") == 0);
    // The check the benchmark makes on its first call passes.
    fb::Problem tested(c.s);
    fb::run(fb::Impl::fused, tested, 2);
    const fb::Buffer expected = fb::reference_output(fb::Impl::fused, tested, 2);
    CHECK(fb::compare_output(tested, expected.get()).max_excess <= 1.0);
    if (!c.rounds) {  // then the call is the exact one, bit for bit, and keeps its tolerance
      fb::Problem exact(exact_shape);
      fb::run(fb::Impl::fused, exact, 2);
      const fb::Buffer a = fb::output_floats(tested), b = fb::output_floats(exact);
      CHECK(std::memcmp(a.get(), b.get(), tested.out_size() * sizeof(float)) == 0);
      CHECK(fb::weight_rounding_atol(tested) == fb::weight_rounding_atol(exact));
    }
  }
}

TEST_CASE("the oracle of a call under allow_bf16_compute takes its rounded inputs", "[bench][check]") {
  fb::Shape s = fb::mha(1, 2, 160, 160, 64);
  s.bf16_compute = true;
  fb::Problem tested(s);
  // The copy holds bf16 values, those of tested rounded; q and k flushed below 2^-126.
  tested.q[0] = 1.0f + 0x1p-8f + 0x1p-12f;  // rounds up to 1 + 2^-7
  tested.k[0] = 0x1p-127f;                  // a subnormal once rounded: read as zero
  tested.v[0] = 0x1p-127f;                  // V keeps it
  const fb::Problem copy = fb::bf16_rounded_copy(tested);
  CHECK(copy.q[0] == 1.0f + 0x1p-7f);
  CHECK(copy.k[0] == 0.0f);
  CHECK(copy.v[0] == 0x1p-127f);
  CHECK(copy.shape.dtype == fb::DType::fp32);
  CHECK_FALSE(copy.shape.bf16_compute);
  std::size_t not_bf16 = 0;
  for (std::size_t i = 0; i < copy.q_size(); ++i)
    not_bf16 += flashcpu::to_float(flashcpu::to_bf16(copy.q[i])) != copy.q[i];
  CHECK(not_bf16 == 0);
  if (!fb::fused_rounds_to_bf16(s)) {
    WARN("not run at " << flashcpu::active_isa() << ": the option computes exactly on this level");
    return;
  }
  // With q and k 8 times larger the scores' rounding leaves the weights' allowance: the
  // oracle on the exact inputs fails the call, the one on the rounded inputs passes it.
  for (std::size_t i = 0; i < tested.q_size(); ++i) tested.q[i] *= 8.0f;
  for (std::size_t i = 0; i < tested.k_size(); ++i) tested.k[i] *= 8.0f;
  fb::run(fb::Impl::fused, tested, 2);
  const fb::Buffer rounded = fb::reference_output(fb::Impl::fused, tested, 2);
  const fb::Buffer exact = fb::reference_output(fb::Impl::naive, tested, 2);  // the same inputs
  const fb::Diff on_rounded = fb::compare_output(tested, rounded.get());
  const fb::Diff on_exact = fb::compare_output(tested, exact.get());
  INFO("error / tolerance: " << on_rounded.max_excess << " against the rounded inputs, " << on_exact.max_excess
                             << " against the exact ones");
  CHECK(on_rounded.max_excess <= 1.0);
  CHECK(on_exact.max_excess > 1.0);
}

TEST_CASE("labels say what each implementation does with 16-bit data", "[bench][dtype]") {
  const fb::Shape dec = typed(fb::gqa(1, 32, 8, 1, 8192, 128), fb::DType::bf16kv);
  const fb::Shape p64 = typed(fb::mha(1, 16, 2048, 2048, 64), fb::DType::fp16);
  auto ends_with = [](const std::string& text, const std::string& tail) {
    return text.size() >= tail.size() &&
           text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
  };
  CHECK(ends_with(fb::impl_label(fb::Impl::naive, dec), ", K/V widened from bf16"));
  CHECK(ends_with(fb::impl_label(fb::Impl::openblas, dec), ", K/V widened from bf16"));
  CHECK(ends_with(fb::impl_label(fb::Impl::fused, dec), ", bf16 K/V"));
  CHECK(ends_with(fb::impl_label(fb::Impl::naive, p64),
                  ", q/K/V widened from fp16, out rounded to fp16"));
  CHECK(ends_with(fb::impl_label(fb::Impl::reference, p64), "(fp64), fp16"));
  CHECK(fb::impl_label(fb::Impl::naive, fb::mha(1, 16, 2048, 2048, 64)) ==
        "naive fp32 -O3 -march=native");
}

TEST_CASE("the fused label names the driver and the kernel that run the call", "[bench]") {
  const std::string prefill = fb::fused_label(fb::mha(1, 16, 2048, 2048, 64));
  // DEC: 4 stacked rows per KV head, fp32 K read in place (4-row tiles; SSE2's 4-lane
  // vectors take them as lanes at this many keys).
  const std::string dec = fb::fused_label(fb::gqa(1, 32, 8, 1, 8192, 128));
  // 16 stacked rows: vector lanes on every level.
  const std::string dec4 = fb::fused_label(fb::gqa(1, 32, 8, 4, 8192, 128));
  // A head dim that is no whole number of vectors on any level: K packed block by block.
  const std::string odd = fb::fused_label(fb::gqa(1, 32, 8, 1, 8192, 99));
  INFO(prefill << "\n" << dec << "\n" << dec4 << "\n" << odd);
  CHECK(prefill.find(" br=") != std::string::npos);
  CHECK(prefill.find("decode") == std::string::npos);
  const bool sse2 = flashcpu::active_isa() == "sse2";
  CHECK(dec.find(sse2 ? " decode lanes (4 rows per vector), K in place, bc=" : " decode 4-row tiles, K in place, bc=") !=
        std::string::npos);
  CHECK(dec4.find(" decode lanes (") != std::string::npos);
  CHECK(odd.find(" decode ") != std::string::npos);
  CHECK(odd.find(", K packed per block, bc=") != std::string::npos);
}

TEST_CASE("the AMX probe measures only where AMX runs, and never stands in for the FMA peak", "[bench][probe]") {
  // The FMA peak (peak_frac) stays a vector-unit figure on every CPU: no level's FMA probe
  // is the AMX one.
  CHECK_FALSE(fb::has_fma_probe("amx"));
  CHECK(fb::measure_fma_gflops("amx", 1, 0.01) == 0.0);
  if (!flashcpu::isa_supported("amx")) {
    CHECK(fb::measure_amx_gflops(1, 0.01) == 0.0);
    WARN("AMX probe not run: this CPU (or OS) cannot run AMX");
    return;
  }
  // One core's TDPBF16PS rate is 16,384 FLOP per 16 cycles: far above any FMA probe.
  const double amx = fb::measure_amx_gflops(1, 0.05);
  CHECK(amx > 2.0 * fb::measure_fma_gflops(fb::fma_peak_isa(1), 1, 0.05));
}
