// The benchmark baselines and their bookkeeping (bench/): the figures the README
// quotes are only as honest as these. Built when bench/ or tools/ are (not in the
// sanitizer build, which leaves them out).
#include "common.hpp"

#include <catch2/catch.hpp>

#include <cmath>
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
