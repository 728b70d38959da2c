// flashcpu_bench_scores: the score family and kernel regression.
//
//   Scores/<score>/P64      dot_product vs gaussian vs additive on P64 (B=1, H=16,
//                           N=M=2048, D=64): the Gaussian should run within 15% of the
//                           dot product (it is one dot product plus two bias adds).
//                           Additive does D tanh per score and is reported for scale.
//   Options/<option>/P64    the cost of each option in the fused kernel.
//   Options/<none|sinks>/DEC  attention sinks on decode (B=1, Hq=32, Hkv=8, N=1,
//                           M=8192, D=128): one term per row, so within noise of none.
//   NW/<impl>/N=M=16384/D   Nadaraya-Watson, fused vs the plain double loop
//                           (reference::nadaraya_watson), D = 1 and 8, Gaussian kernel.
//
// Counters: FLOP (kIsRate: GFLOP/s with the attention formula 4*B*H*N*M*D, so scores
// compare by time), pairs (kIsRate: (query, key) pairs per second).
//   flashcpu_bench_scores --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <flashcpu/flashcpu.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using flashcpu::bhsd;

struct Tensors {
  std::int64_t B, H, N, M, D, Dv;
  std::vector<float> q, k, v, out, mask;
  std::vector<std::uint8_t> bool_mask;
  std::vector<float> weights, slopes;
  Tensors(std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t m, std::int64_t d,
          std::int64_t dv)
      : B(b),
        H(h),
        N(n),
        M(m),
        D(d),
        Dv(dv),
        q(b * h * n * d),
        k(b * h * m * d),
        v(b * h * m * dv),
        out(b * h * n * dv) {
    std::mt19937 gen(42);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (auto* t : {&q, &k, &v})
      for (float& x : *t) x = uniform(gen);
    weights.resize(std::size_t(d));
    for (float& w : weights) w = uniform(gen);
    slopes.resize(std::size_t(h));
    for (std::int64_t i = 0; i < h; ++i)
      slopes[std::size_t(i)] = std::exp2(-8.0f * float(i + 1) / float(h));
  }
  void run(const flashcpu::AttentionOptions& options) {
    flashcpu::attention(
        bhsd<const float>(q.data(), B, H, N, D), bhsd<const float>(k.data(), B, H, M, D),
        bhsd<const float>(v.data(), B, H, M, Dv), bhsd(out.data(), B, H, N, Dv), options);
  }
};

void set_counters(benchmark::State& state, double pairs, double d) {
  state.counters["FLOP"] =
      benchmark::Counter(4.0 * pairs * d, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pairs"] =
      benchmark::Counter(pairs, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(flashcpu::active_isa());
}

void BM_Score(benchmark::State& state, flashcpu::Score score) {
  Tensors t(1, 16, 2048, 2048, 64, 64);
  flashcpu::AttentionOptions options;
  options.score = score;
  options.additive_weights = t.weights.data();
  for (auto _ : state) t.run(options);
  set_counters(state, 16.0 * 2048 * 2048, 64);
}

enum class Option {
  none, mask, bool_mask, softcap, alibi, window, causal_window, padding_mask, causal_bool_mask, sinks
};

// Per-head sinks near the scores' range, so that they change every row's weights.
std::vector<float> some_sinks(std::int64_t heads) {
  std::vector<float> sinks(static_cast<std::size_t>(heads), 0.0f);
  for (std::int64_t h = 0; h < heads; ++h) sinks[std::size_t(h)] = 0.25f * float(h % 5) - 0.5f;
  return sinks;
}

void BM_Option(benchmark::State& state, Option option) {
  Tensors t(1, 16, 2048, 2048, 64, 64);
  flashcpu::AttentionOptions options;
  const std::vector<float> sinks = some_sinks(16);
  t.mask.assign(std::size_t(2048 * 2048), 0.0f);
  t.bool_mask.assign(std::size_t(2048 * 2048), 1);
  double pairs = 16.0 * 2048 * 2048;
  switch (option) {
    case Option::none:
      break;
    case Option::mask:
      options.mask = {t.mask.data(), {1, 1, 2048, 2048}, {0, 0, 2048, 1}};
      break;
    case Option::bool_mask:
      options.bool_mask = {t.bool_mask.data(), {1, 1, 2048, 2048}, {0, 0, 2048, 1}};
      break;
    case Option::softcap:
      options.softcap = 30.0f;
      break;
    case Option::alibi:
      options.alibi_slopes = t.slopes.data();
      break;
    case Option::sinks:
      options.sinks = sinks.data();
      break;
    case Option::window:  // 256 keys either side of the diagonal: the visible pairs only are
                          // counted
      options.window_left = options.window_right = 256;
      pairs = 0;
      for (int i = 0; i < 2048; ++i)
        pairs += 16.0 * (std::min(2047, i + 256) - std::max(0, i - 256) + 1);
      break;
    case Option::causal_window:
      options.causal = true;
      options.window_left = 512;
      pairs = 0;
      for (int i = 0; i < 2048; ++i) pairs += 16.0 * (i - std::max(0, i - 512) + 1);
      break;
    case Option::padding_mask:  // -inf for the last quarter of the keys (a padded KV cache),
                                // one row broadcast to all: tiles there keep V rows out
      for (int j = 1536; j < 2048; ++j) t.mask[std::size_t(j)] = -std::numeric_limits<float>::infinity();
      options.mask = {t.mask.data(), {1, 1, 1, 2048}, {0, 0, 0, 1}};
      pairs = 16.0 * 2048 * 1536;
      break;
    case Option::causal_bool_mask:  // causal given as a bool mask: every tile on or above
                                    // the diagonal sees a zero
      for (int i = 0; i < 2048; ++i)
        for (int j = i + 1; j < 2048; ++j) t.bool_mask[std::size_t(i) * 2048 + std::size_t(j)] = 0;
      options.bool_mask = {t.bool_mask.data(), {1, 1, 2048, 2048}, {0, 0, 2048, 1}};
      pairs = 16.0 * 2048 * 2049 / 2;
      break;
  }
  for (auto _ : state) t.run(options);
  set_counters(state, pairs, 64);
}

// Decoding with and without sinks (split-KV: the sinks join the chunks' merge).
void BM_DecodeSinks(benchmark::State& state, bool with_sinks) {
  const std::int64_t Hq = 32, Hkv = 8, M = 8192, D = 128;
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> q(std::size_t(Hq * D)), k(std::size_t(Hkv * M * D)), v(k.size()), out(q.size());
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = uniform(gen);
  const std::vector<float> sinks = some_sinks(Hq);
  flashcpu::AttentionOptions options;
  if (with_sinks) options.sinks = sinks.data();
  for (auto _ : state)
    flashcpu::attention(bhsd<const float>(q.data(), 1, Hq, 1, D), bhsd<const float>(k.data(), 1, Hkv, M, D),
                        bhsd<const float>(v.data(), 1, Hkv, M, D), bhsd(out.data(), 1, Hq, 1, D), options);
  set_counters(state, double(Hq) * M, double(D));
}

// Nadaraya-Watson at N = M = 16384: the fused path against the plain double loop.
void BM_KernelRegression(benchmark::State& state, bool fused) {
  const std::int64_t n = 16384, d = state.range(0);
  Tensors t(1, 1, n, n, d, 1);
  flashcpu::KernelRegressionOptions options;
  options.bandwidth = 0.5f;
  for (auto _ : state) {
    if (fused)
      flashcpu::nadaraya_watson(
          bhsd<const float>(t.q.data(), 1, 1, n, d), bhsd<const float>(t.k.data(), 1, 1, n, d),
          bhsd<const float>(t.v.data(), 1, 1, n, 1), bhsd(t.out.data(), 1, 1, n, 1), options);
    else
      flashcpu::reference::nadaraya_watson(
          bhsd<const float>(t.q.data(), 1, 1, n, d), bhsd<const float>(t.k.data(), 1, 1, n, d),
          bhsd<const float>(t.v.data(), 1, 1, n, 1), bhsd(t.out.data(), 1, 1, n, 1), options);
  }
  set_counters(state, double(n) * n, double(d));
}

}  // namespace

BENCHMARK_CAPTURE(BM_Score, dot_product, flashcpu::Score::dot_product)
    ->Name("Scores/dot_product/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Score, gaussian, flashcpu::Score::gaussian)
    ->Name("Scores/gaussian/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Score, additive, flashcpu::Score::additive)
    ->Name("Scores/additive/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, none, Option::none)
    ->Name("Options/none/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, mask, Option::mask)
    ->Name("Options/mask/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, bool_mask, Option::bool_mask)
    ->Name("Options/bool_mask/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, padding_mask, Option::padding_mask)
    ->Name("Options/padding_mask/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, causal_bool_mask, Option::causal_bool_mask)
    ->Name("Options/causal_bool_mask/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, softcap, Option::softcap)
    ->Name("Options/softcap/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, alibi, Option::alibi)
    ->Name("Options/alibi/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, window, Option::window)
    ->Name("Options/window256/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, causal_window, Option::causal_window)
    ->Name("Options/causal_window512/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Option, sinks, Option::sinks)
    ->Name("Options/sinks/P64")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_DecodeSinks, none, false)
    ->Name("Options/none/DEC")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_DecodeSinks, sinks, true)
    ->Name("Options/sinks/DEC")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_KernelRegression, fused, true)
    ->Name("NW/fused/N=M=16384")
    ->Arg(1)
    ->Arg(8)
    ->ArgName("D")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_KernelRegression, double_loop, false)
    ->Name("NW/double_loop/N=M=16384")
    ->Arg(1)
    ->Arg(8)
    ->ArgName("D")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(1);

BENCHMARK_MAIN();
