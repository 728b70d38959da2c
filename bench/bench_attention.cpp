// flashcpu_bench: Google Benchmark suite for flashcpu::attention.
//
// Every workload runs its implementations as separate benchmarks in one run:
//   <family>/fused/...          flashcpu::attention (fused, tiled, online softmax)
//   <family>/naive/...          textbook fp32, -O3 -march=native (bench/naive.cpp)
//   <family>/openblas/...       materialized: sgemm + row softmax + sgemm; causal skips
//                               the key blocks a query block cannot see (common.hpp)
//   <family>/openblas_full/...  causal only: the same over the full masked square
//   <family>/reference/...      the fp64 oracle, only with --with-reference
// pair/<family>_<dtype> times the fused fp32 workload against its 16-bit form in turn
// (bm_pair; counter ratio = fp32 time / 16-bit time); pair/P64_bf16compute the same against
// the fp32 call under allow_bf16_compute.
// Families: prefill sweep, the named workloads (P64, P128, C128, S16K, short, DEC, DEC64,
// DRAFT, thread scaling), their backward (P64_bwd, C128_bwd, S16K_bwd: fused and materialized
// OpenBLAS backward, FLOP = the backward's five products; P64_bf16_bwd: fused, all bf16;
// P64_bf16compute_bwd: fused, fp32 under allow_bf16_compute),
// their 16-bit forms (<family>_<dtype>: P64_bf16, P128_bf16,
// C128_bf16, P64_fp16kv, DEC_bf16kv, DEC_fp16kv, DEC64_bf16kv), P64 on fp32 data under
// allow_bf16_compute (P64_bf16compute: fused only), a decode sweep, head shapes of real models, the
// two OpenBLAS threading modes, and the machine probes (BM_FmaPeak, BM_ReadBandwidth).
// On a 16-bit workload the baselines widen the inputs to fp32 inside the timed call
// (common.hpp, run()).
//
// Counters (per repetition; medians with --benchmark_repetitions):
//   FLOP            useful FLOP per second, 2*B*Hq*pairs*(D+Dv) (common.hpp)
//   probe_gflops    an FMA probe taken right before this repetition
//   peak_frac       this repetition's GFLOP/s / probe_gflops: its median is the median
//                   of per-pair ratios (probe, kernel, probe, kernel...)
//   probe_amx_gflops, amx_frac   fused calls that run the AMX tile kernel: the same against
//                   an AMX probe (back-to-back TDPBF16PS) taken right before
//   kv_bytes_per_s  decode only: K+V bytes (each KV head once, as stored) per second
//   probe_read_gbps decode only: a read-bandwidth probe right before this repetition
//   bw_frac         decode only: kv_bytes_per_s / probe_read_gbps
//   peak_extra_MiB  peak RSS growth of one call beyond the resident inputs
//   analytic_MiB    baselines only: the working memory their design implies
//
// Usage:
//   flashcpu_bench [--threads=N] [--naive-max=N] [--with-reference] [--no-self-check]
//                  [--no-probes] [--blas-threading=heads|blas] [google benchmark flags]
//   flashcpu_bench --benchmark_filter='^(P64|DEC)/' --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true
//       --benchmark_out=bench.json --benchmark_out_format=json
// See bench/README.md.
#include "common.hpp"

#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "kernels/variant_list.hpp"

namespace fb = flashcpu::bench;
using fb::Impl;
using fb::Shape;

namespace {

struct Settings {
  int threads = 0;                 // --threads; 0 resolves to OpenMP's default
  std::int64_t naive_max = 16384;  // naive runs only when N*M <= naive_max^2 (time only)
  bool with_reference = false;     // register the fp64 oracle too (N*M <= 4096^2)
  bool self_check = true;
  bool probes = true;
} g;

// The fp64 oracle holds an N x M double matrix per thread: 2 GiB at 16384.
constexpr std::int64_t kReferenceMax = 4096;

// Problems are built once and shared by every benchmark of the same shape: the
// implementations of a workload and all their repetitions use one set of inputs.
// Repetitions are interleaved (--benchmark_enable_random_interleaving), so the
// problems of a run stay resident together, up to a budget; past it the others go.
//
// A cold problem has several copies whose K and V together exceed the last-level
// cache (>= 1 GiB; the Xeons here have 300 MiB of L3), and successive calls cycle
// through them, so a decode step reads its KV cache from memory as it would in a
// model with many layers. With one copy, DEC's 64 MiB of K/V stay in cache between
// calls and the "bandwidth" exceeds the memory's (DEC_hot shows that case).
struct CachedProblem {
  std::vector<fb::Problem> copies;
  // One per implementation, so each one's first call allocates (and so measures) its
  // own score buffers; later calls reuse them untimed.
  std::map<Impl, fb::MaterializedWorkspace> workspaces;
  double bytes = 0;
};

CachedProblem& problems_for(const Shape& s, bool cold) {
  static std::map<std::string, CachedProblem> cache;
  constexpr double kBudget = 6.0 * double(std::size_t(1) << 30);
  std::size_t copies = 1;
  if (cold) {
    const double target = double(std::size_t(1) << 30);
    copies = std::size_t(std::clamp(std::ceil(target / fb::kv_bytes(s)), 1.0, 256.0));
  }
  const std::string key = fb::describe(s) + " x" + std::to_string(copies);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  double total = 0;
  for (const auto& kv : cache) total += kv.second.bytes;
  const double bytes = double(copies) * fb::resident_bytes(s);
  if (total + bytes > kBudget) cache.clear();  // free first: large sets need not coexist
  CachedProblem& entry = cache[key];
  for (std::size_t i = 0; i < copies; ++i) entry.copies.emplace_back(s);
  if (cold)  // also a single copy, of a shape whose K and V alone pass 1 GiB
    for (const fb::Problem& p : entry.copies) fb::read_through(p, 0);
  entry.bytes = bytes;
  return entry;
}

// Memory and correctness are measured once per (implementation, shape, threads),
// on the first repetition; later repetitions report the cached figure.
struct FirstRun {
  double extra_mib;
};
std::map<std::string, FirstRun>& first_runs() {
  static std::map<std::string, FirstRun> m;
  return m;
}

using Runner = std::function<void(fb::Problem&, int threads, fb::MaterializedWorkspace*)>;

// One repetition: a probe, then the timed calls. With --benchmark_repetitions each
// repetition is a separate call of this function (interleaved with other benchmarks'
// under --benchmark_enable_random_interleaving), so every repetition's figure is
// divided by a probe taken right before it: probe, kernel, probe, kernel.
void bm_attention(benchmark::State& st, const std::string& name, Impl impl, const Runner& runner,
                  const Shape& s, int threads, bool decode, bool cold, const std::string& label,
                  fb::BlasThreading blas_mode) {
  if ((impl == Impl::openblas || impl == Impl::openblas_full) && !fb::have_openblas()) {
    st.SkipWithError("OpenBLAS was not found at configure time");
    return;
  }
  threads = fb::resolve_threads(threads);
  CachedProblem& cached = problems_for(s, cold);
  std::vector<fb::Problem>& copies = cached.copies;
  fb::MaterializedWorkspace* ws = &cached.workspaces[impl];
  fb::Problem& p = copies.front();

  const std::string key = name + "|" + std::to_string(threads);
  auto it = first_runs().find(key);
  if (it == first_runs().end()) {
    // The first call: peak memory, with inputs resident (and this implementation's
    // workspace not yet allocated). Then the cross-checks, which abort on a mismatch:
    // against the fused output at this size, and against the fp64 oracle at a reduced
    // size of the same family.
    const double extra = fb::measure_peak_extra_mib([&] { runner(p, threads, ws); });
    fb::check_against_fused(impl, p, threads, ws);
    fb::check_against_reference(impl, s, threads);
    it = first_runs().emplace(key, FirstRun{extra}).first;
  } else {
    runner(p, threads, ws);  // warm-up
  }
  const double probe_flops = fb::fma_probe_now(threads);
  const double probe_read = decode ? fb::read_probe_now(threads) : 0.0;
  // The AMX kernel's figures are also quoted against the AMX probe: fused calls that run
  // the tile kernel (bf16 prefill on the amx level, and decoding with 16 stacked rows or more).
  const bool on_amx = impl == Impl::fused && fb::fused_runs_on_tiles(s);
  const double probe_amx = on_amx ? fb::amx_probe_now(threads) : 0.0;

  std::size_t next = 0;
  const double t0 = fb::now_seconds();
  for (auto _ : st) {
    runner(copies[next], threads, ws);
    next = next + 1 == copies.size() ? 0 : next + 1;
    benchmark::ClobberMemory();
  }
  const double per_iter = (fb::now_seconds() - t0) / double(st.iterations());

  const double flop = fb::attention_flops(s);
  st.counters["FLOP"] = benchmark::Counter(flop, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["probe_gflops"] = probe_flops;
  st.counters["peak_frac"] = flop / per_iter * 1e-9 / probe_flops;
  if (probe_amx > 0) {
    st.counters["probe_amx_gflops"] = probe_amx;
    st.counters["amx_frac"] = flop / per_iter * 1e-9 / probe_amx;
  }
  if (decode) {
    const double bytes = fb::kv_bytes(s);
    st.counters["kv_bytes_per_s"] =
        benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
    st.counters["probe_read_gbps"] = probe_read;
    st.counters["bw_frac"] = bytes / per_iter * 1e-9 / probe_read;
  }
  if (it->second.extra_mib >= 0) st.counters["peak_extra_MiB"] = it->second.extra_mib;
  const double analytic = fb::analytic_mib(impl, s, threads, blas_mode);
  if (analytic >= 0) st.counters["analytic_MiB"] = analytic;
  st.SetLabel(copies.size() > 1 ? label + " cold x" + std::to_string(copies.size()) : label);
}

void add_one(const std::string& name, Impl impl, const Runner& runner, const Shape& s, int threads,
             bool decode, bool cold, const std::string& label,
             fb::BlasThreading blas_mode = fb::default_blas_threading()) {
  benchmark::RegisterBenchmark(name.c_str(),
                               [=](benchmark::State& st) {
                                 bm_attention(st, name, impl, runner, s, threads, decode, cold,
                                              label, blas_mode);
                               })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

// Registers <prefix>/<impl><suffix> for each implementation. The naive baseline is
// left out above g.naive_max^2 score pairs (for time: it needs one score row per
// thread), the full-square OpenBLAS variant on non-causal workloads (where it is the
// same computation), and the fp64 oracle unless --with-reference, or above 4096^2
// (its N x M double matrix per thread would need 2 GiB at 16384).
// Decode workloads (decode = true) report bandwidth and run cold unless told.
void add_workload(const std::string& prefix, const std::string& suffix, const Shape& s,
                  int threads = 0, bool decode = false, bool cold = true) {
  for (Impl impl :
       {Impl::fused, Impl::naive, Impl::openblas, Impl::openblas_full, Impl::reference}) {
    // Under allow_bf16_compute only the fused call: the others compute exactly (the same
    // as without the option), and the shape widens the cross-check's tolerance for
    // rounded weights (weight_rounding_atol), which they do not have.
    if (impl != Impl::fused && s.bf16_compute) continue;
    if (impl == Impl::naive && s.n * s.m > g.naive_max * g.naive_max) continue;
    if ((impl == Impl::openblas || impl == Impl::openblas_full) && !fb::have_openblas()) continue;
    if (impl == Impl::openblas_full && !s.causal) continue;
    if (impl == Impl::reference &&
        (!g.with_reference || s.n * s.m > kReferenceMax * kReferenceMax)) {
      continue;
    }
    const Runner runner = [impl](fb::Problem& p, int t, fb::MaterializedWorkspace* ws) {
      fb::run(impl, p, t, ws);
    };
    add_one(prefix + "/" + fb::impl_name(impl) + suffix, impl, runner, s, threads, decode,
            decode && cold, fb::impl_label(impl, s));
  }
}

// pair/<typed>: the fused fp32 workload and its 16-bit form `typed`, call by call in
// turn (the order flips every iteration), each call timed on its own. ratio = the fp32
// calls' time over the 16-bit calls', per repetition; its median (and min, max) over
// repetitions is a median of ratios taken seconds apart. On a shared machine whose speed
// drifts over minutes, that is steadier than the ratio of two medians whose repetitions
// ran minutes apart (tools/bench_report quotes both). Correctness and memory are the
// single workloads' business (bm_attention); this only times.
void bm_pair(benchmark::State& st, const Shape& base, const Shape& typed, bool cold) {
  const int threads = fb::resolve_threads(g.threads);
  // Both problems resident at once: fetching the second may evict the first (the cache's
  // budget), so the first is fetched again, which then finds room beside the second.
  CachedProblem* a = &problems_for(base, cold);
  CachedProblem* b = &problems_for(typed, cold);
  a = &problems_for(base, cold);
  CachedProblem* sides[2] = {a, b};
  std::size_t next[2] = {0, 0};
  double seconds[2] = {0, 0};
  auto call = [&](int side, bool timed) {
    std::vector<fb::Problem>& copies = sides[side]->copies;
    const double t0 = fb::now_seconds();
    fb::run(Impl::fused, copies[next[side]], threads);
    if (timed) seconds[side] += fb::now_seconds() - t0;
    next[side] = next[side] + 1 == copies.size() ? 0 : next[side] + 1;
  };
  call(0, false);  // warm-up
  call(1, false);
  int first = 0;
  for (auto _ : st) {
    call(first, true);
    call(1 - first, true);
    first = 1 - first;
    benchmark::ClobberMemory();
  }
  const double iterations = double(st.iterations());
  st.counters["ratio"] = seconds[0] / seconds[1];
  st.counters["base_ms"] = seconds[0] / iterations * 1e3;
  st.counters["typed_ms"] = seconds[1] / iterations * 1e3;
  st.SetLabel(fb::impl_label(Impl::fused, base) + " vs " + fb::impl_label(Impl::fused, typed));
}

double min_of(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }
double max_of(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

void add_pair(const std::string& typed_name, const Shape& base, const Shape& typed, bool decode) {
  const bool cold = decode;
  const std::string name = "pair/" + typed_name;
  benchmark::RegisterBenchmark(name.c_str(),
                               [=](benchmark::State& st) { bm_pair(st, base, typed, cold); })
      ->UseRealTime()
      ->ComputeStatistics("min", min_of)
      ->ComputeStatistics("max", max_of)
      ->Unit(benchmark::kMillisecond);
}

// The backward: <family>_bwd/<impl>. Same method as bm_attention (peak memory and a
// cross-check on the first call, a probe before each repetition); the FLOP counter is
// backward_flops, its five products.
void bm_backward(benchmark::State& st, const std::string& name, fb::BackwardImpl impl, const Shape& s) {
  if (impl == fb::BackwardImpl::openblas && !fb::have_openblas()) {
    st.SkipWithError("OpenBLAS was not found at configure time");
    return;
  }
  const int threads = fb::resolve_threads(g.threads);
  // One backward problem at a time (the implementations of a family share it), rebuilt
  // untimed when the family changes.
  static std::string current;
  static std::unique_ptr<fb::BackwardProblem> problem;
  static std::map<std::string, fb::MaterializedWorkspace> workspaces;
  if (current != fb::describe(s)) {
    problem.reset();  // free first
    problem = std::make_unique<fb::BackwardProblem>(s);
    current = fb::describe(s);
  }
  fb::BackwardProblem& p = *problem;
  fb::MaterializedWorkspace* ws = &workspaces[name];
  const std::string key = name + "|" + std::to_string(threads);
  auto it = first_runs().find(key);
  if (it == first_runs().end()) {
    const double extra = fb::measure_peak_extra_mib([&] { fb::run_backward(impl, p, threads, ws); });
    if (impl != fb::BackwardImpl::fused) fb::check_backward_against_fused(impl, p, threads, ws);
    if (fb::act_elem(s.dtype) != fb::Elem::f32 || s.bf16_compute) fb::check_backward_against_fp32(p, threads);
    it = first_runs().emplace(key, FirstRun{extra}).first;
  } else {
    fb::run_backward(impl, p, threads, ws);  // warm-up
  }
  const double probe_flops = fb::fma_probe_now(threads);
  const double t0 = fb::now_seconds();
  for (auto _ : st) {
    fb::run_backward(impl, p, threads, ws);
    benchmark::ClobberMemory();
  }
  const double per_iter = (fb::now_seconds() - t0) / double(st.iterations());
  const double flop = fb::backward_flops(s);
  st.counters["FLOP"] = benchmark::Counter(flop, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["probe_gflops"] = probe_flops;
  st.counters["peak_frac"] = flop / per_iter * 1e-9 / probe_flops;
  if (it->second.extra_mib >= 0) st.counters["peak_extra_MiB"] = it->second.extra_mib;
  st.SetLabel(impl == fb::BackwardImpl::fused ? std::string("flashcpu backward (") + flashcpu::active_isa() + ", " +
                                                    fb::dtype_name(s.dtype) + (s.bf16_compute ? " allow_bf16_compute" : "") +
                                                    ", " + fb::fused_backward_label(s) + ")"
                                              : std::string("materialized backward (OpenBLAS sgemm)"));
}

void add_backward_workload(const std::string& family, const Shape& s, bool with_openblas) {
  for (fb::BackwardImpl impl : {fb::BackwardImpl::fused, fb::BackwardImpl::openblas}) {
    if (impl == fb::BackwardImpl::openblas && (!with_openblas || !fb::have_openblas())) continue;
    const std::string name = family + "_bwd/" + fb::backward_impl_name(impl);
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) { bm_backward(st, name, impl, s); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

// 1, 2, 4, ... up to the number of cores, and the number of cores itself.
std::vector<int> thread_counts() {
  const int procs = omp_get_num_procs();
  std::vector<int> counts;
  for (int t = 1; t < procs; t *= 2) counts.push_back(t);
  counts.push_back(procs);
  return counts;
}

void register_attention_benchmarks() {
  // Named workloads: the ones the README's tables quote.
  const Shape p64 = fb::mha(1, 16, 2048, 2048, 64), p128 = fb::mha(1, 16, 2048, 2048, 128);
  const Shape dec = fb::gqa(1, 32, 8, 1, 8192, 128);
  add_workload("P64", "", p64);
  add_workload("P128", "", p128);
  const Shape c128 = fb::mha(1, 8, 4096, 4096, 128, true);
  add_workload("C128", "", c128);
  add_workload("S16K", "", fb::mha(1, 1, 16384, 16384, 64));
  for (std::int64_t n : {16, 64, 256}) {
    add_workload("short", "/N:" + std::to_string(n), fb::mha(1, 16, n, n, 64));
  }
  // The same in bf16, prefill only (N > 16): the AMX kernel against the vdpbf16ps one on
  // short sequences, in two runs (FLASHCPU_ISA=amx, then avx512bf16). Not in
  // tools/bench_report's default filter.
  for (std::int64_t n : {64, 256}) {
    Shape s = fb::mha(1, 16, n, n, 64);
    s.dtype = fb::DType::bf16;
    add_workload("short_bf16", "/N:" + std::to_string(n), s);
  }
  add_workload("DEC", "", dec, 0, /*decode=*/true);
  add_workload("DEC_hot", "", dec, 0, /*decode=*/true, /*cold=*/false);
  // DEC at D = 64 over twice the keys (the same bytes): a value row is 4 AVX-512 vectors,
  // narrower than the 8-vector P.V tiles of the 16-bit decoding kernels.
  const Shape dec64 = fb::gqa(1, 32, 8, 1, 16384, 64);
  add_workload("DEC64", "", dec64, 0, /*decode=*/true);
  // A short prompt chunk or a 32-token draft against a long cache: one query head per KV
  // head, so 32 stacked rows, which the decode driver takes (kDecodeMaxStackedRows).
  add_workload("DRAFT", "", fb::mha(1, 16, 32, 8192, 128, true), 0, /*decode=*/true);
  // Speculative (or batched) decoding: 4 queries per head, so each KV head stacks 16 rows,
  // a whole AMX tile (bf16 on the amx level runs the tile kernel; fewer rows stay on the
  // vector kernels). Not in tools/bench_report's default filter.
  const Shape dec4 = fb::gqa(1, 32, 8, 4, 8192, 128);
  add_workload("DEC4", "", dec4, 0, /*decode=*/true);

  // 16-bit forms of the named workloads, <family>_<dtype>: the project's 16-bit targets
  // are ratios to the fp32 ones. DEC's are cold like DEC, their bandwidth counted on the
  // 16-bit bytes.
  struct Typed {
    const char* family;
    Shape s;
    fb::DType dtype;
    bool decode;
  };
  const Typed typed[] = {{"P64", p64, fb::DType::bf16, false},
                         {"P64", p64, fb::DType::fp16kv, false},
                         {"P128", p128, fb::DType::bf16, false},
                         {"C128", c128, fb::DType::bf16, false},
                         {"DEC", dec, fb::DType::bf16kv, true},
                         {"DEC", dec, fb::DType::fp16kv, true},
                         {"DEC64", dec64, fb::DType::bf16kv, true},
                         {"DEC4", dec4, fb::DType::bf16, true}};
  for (Typed w : typed) {
    const Shape base = w.s;
    w.s.dtype = w.dtype;
    const std::string name = std::string(w.family) + "_" + fb::dtype_name(w.dtype);
    add_workload(name, "", w.s, 0, w.decode);
    add_pair(name, base, w.s, w.decode);
  }
  // P64 on fp32 data under allow_bf16_compute: what an fp32 model gains by letting the
  // products run in bf16 where the level has them (computed exactly elsewhere). Only the
  // fused call runs (add_workload); its oracle check uses the rounded inputs
  // (reference_output).
  fb::Shape p64_bf16_compute = p64;
  p64_bf16_compute.bf16_compute = true;
  add_workload("P64_bf16compute", "", p64_bf16_compute);
  add_pair("P64_bf16compute", p64, p64_bf16_compute, false);

  // The backward of three named workloads. S16K's materialized backward would need two
  // 1 GiB matrices per thread: only the fused one runs there (its memory is the point).
  add_backward_workload("P64", p64, true);
  add_backward_workload("C128", fb::mha(1, 8, 4096, 4096, 128, true), true);
  add_backward_workload("S16K", fb::mha(1, 1, 16384, 16384, 64), false);
  // P64's backward on bf16 q, k, v, out, dout and gradients (the 16-bit overload).
  fb::Shape p64_bf16 = p64;
  p64_bf16.dtype = fb::DType::bf16;
  add_backward_workload("P64_bf16", p64_bf16, false);
  // P64's backward on fp32 data under allow_bf16_compute (rounded to bf16 for the products
  // where the level has vdpbf16ps), the forward that made out and lse likewise.
  add_backward_workload("P64_bf16compute", p64_bf16_compute, false);

  for (int t : thread_counts()) {
    add_workload("scaling_P64", "/threads:" + std::to_string(t), p64, t);
  }

  // Prefill sweep: N = M from 128 to 16384. Heads shrink at large N to keep one call
  // between ~0.1 and ~1 s: 16 up to 2048, then 4, 2, 1.
  for (bool causal : {false, true}) {
    for (std::int64_t d : {64, 128}) {
      for (std::int64_t n = 128; n <= 16384; n *= 2) {
        const std::int64_t h = n <= 2048 ? 16 : n == 4096 ? 4 : n == 8192 ? 2 : 1;
        const std::string suffix = "/D:" + std::to_string(d) + "/N:" + std::to_string(n) +
                                   "/H:" + std::to_string(h) + (causal ? "/causal" : "");
        add_workload("prefill", suffix, fb::mha(1, h, n, n, d, causal));
      }
    }
  }

  // Decode sweep: one query, Hq = 32 sharing Hkv = 8, D = 128, M from 512 to 131072.
  for (std::int64_t m = 512; m <= 131072; m *= 2) {
    add_workload("decode", "/M:" + std::to_string(m), fb::gqa(1, 32, 8, 1, m, 128), 0, true);
  }

  // Head shapes of real models: causal prefill of 1024 tokens, and one decode step
  // against a 4096-token cache.
  struct Model {
    const char* name;
    std::int64_t hq, hkv, d;
  };
  const Model models[] = {
      {"llama2-7b", 32, 32, 128},  // MHA
      {"llama3-8b", 32, 8, 128},   // GQA 4:1 (Mistral-7B has the same attention shape)
      {"qwen2-7b", 28, 4, 128},    // GQA 7:1
      {"phi3-mini", 32, 32, 96},   // MHA, D = 96: not a multiple of 64
      {"gemma-2b", 8, 1, 256},     // MQA, D = 256
      {"gpt2-small", 12, 12, 64},  // small MHA
  };
  for (const Model& m : models) {
    const std::string prefix = std::string("model/") + m.name;
    add_workload(prefix + "/prefill", "", fb::gqa(1, m.hq, m.hkv, 1024, 1024, m.d, true));
    add_workload(prefix + "/decode", "", fb::gqa(1, m.hq, m.hkv, 1, 4096, m.d, true), 0, true);
  }

  // The two OpenBLAS threading modes side by side (the default is heads-parallel).
  if (fb::have_openblas()) {
    struct Named {
      const char* name;
      Shape s;
      bool decode;
    };
    const Named named[] = {{"P64", p64, false},
                           {"P128", p128, false},
                           {"C128", fb::mha(1, 8, 4096, 4096, 128, true), false},
                           {"S16K", fb::mha(1, 1, 16384, 16384, 64), false},
                           {"DEC", dec, true}};
    for (const Named& w : named) {
      for (auto mode : {fb::BlasThreading::heads_parallel, fb::BlasThreading::blas_threaded}) {
        const Runner runner = [mode](fb::Problem& p, int t, fb::MaterializedWorkspace* ws) {
          fb::run(Impl::openblas, p, t, ws, mode);
        };
        add_one(std::string("blas_mode/") + w.name + "/" + fb::blas_threading_name(mode),
                Impl::openblas, runner, w.s, 0, w.decode, w.decode,
                std::string("openblas ") + fb::blas_threading_name(mode), mode);
      }
    }
  }
}

void register_probe_benchmarks() {
  const std::vector<int> counts = thread_counts();
  for (const char* isa : flashcpu::variant_list::kLevels) {
    if (!flashcpu::isa_supported(isa) || !fb::has_fma_probe(isa)) continue;
    for (int t : counts) {
      const std::string name = std::string("BM_FmaPeak/") + isa + "/threads:" + std::to_string(t);
      benchmark::RegisterBenchmark(name.c_str(),
                                   [isa, t](benchmark::State& st) {
                                     double sum = 0;
                                     for (auto _ : st) sum += fb::measure_fma_gflops(isa, t, 0.1);
                                     st.counters["GFLOPs"] = sum / double(st.iterations());
                                   })
          ->UseRealTime()
          ->Iterations(3)
          ->Unit(benchmark::kMillisecond);
    }
  }
  if (flashcpu::isa_supported("amx"))
    for (int t : counts) {
      const std::string name = "BM_AmxPeak/threads:" + std::to_string(t);
      benchmark::RegisterBenchmark(name.c_str(),
                                   [t](benchmark::State& st) {
                                     double sum = 0;
                                     for (auto _ : st) sum += fb::measure_amx_gflops(t, 0.1);
                                     st.counters["GFLOPs"] = sum / double(st.iterations());
                                   })
          ->UseRealTime()
          ->Iterations(3)
          ->Unit(benchmark::kMillisecond);
    }
  for (int t : counts) {
    const std::string name = "BM_ReadBandwidth/threads:" + std::to_string(t);
    benchmark::RegisterBenchmark(name.c_str(),
                                 [t](benchmark::State& st) {
                                   double sum = 0;
                                   for (auto _ : st) sum += fb::measure_read_gbps(t);
                                   st.counters["GBps"] = sum / double(st.iterations());
                                 })
        ->UseRealTime()
        ->Iterations(1)
        ->Unit(benchmark::kMillisecond);
  }
}

bool take_flag(const char* arg, const char* name, const char** value) {
  const std::size_t len = std::strlen(name);
  if (std::strncmp(arg, name, len) != 0) return false;
  if (arg[len] == '\0') {
    *value = nullptr;
    return true;
  }
  if (arg[len] != '=') return false;
  *value = arg + len + 1;
  return true;
}

void print_usage() {
  std::printf(
      "flashcpu_bench: fused vs naive vs OpenBLAS attention, with machine probes.\n"
      "If OpenBLAS picked kernels below what this CPU runs, the program re-runs itself\n"
      "once with OPENBLAS_CORETYPE set (unless the caller set it). FLASHCPU_BENCH_COMMIT\n"
      "is recorded in the JSON context (tools/bench_report sets it).\n"
      "  --threads=N              threads for every benchmark except scaling_P64 (default:\n"
      "                           OpenMP's, i.e. OMP_NUM_THREADS or all cores)\n"
      "  --naive-max=N            run the textbook naive only when N*M <= N^2 (default 16384;\n"
      "                           it needs one score row per thread, so this is for time)\n"
      "  --with-reference         also run the fp64 oracle, labelled reference (fp64), where\n"
      "                           N*M <= 4096^2\n"
      "  --blas-threading=MODE    heads (OpenMP over heads or row blocks, 1-thread OpenBLAS;\n"
      "                           default) or blas (heads in turn, threaded OpenBLAS: set\n"
      "                           OMP_WAIT_POLICY=PASSIVE with it)\n"
      "  --no-self-check          skip the start-up check of every implementation against\n"
      "                           the fp64 oracle on small problems\n"
      "  --no-probes              do not measure FMA peak and bandwidth at start-up (they are\n"
      "                           then measured when first needed)\n"
      "Families (use --benchmark_filter): P64 P128 C128 S16K short short_bf16 DEC DEC_hot DEC64 DRAFT DEC4\n"
      "  DEC4_bf16 scaling_P64\n"
      "  P64_bf16 P128_bf16 C128_bf16 P64_fp16kv DEC_bf16kv DEC_fp16kv DEC64_bf16kv P64_bwd C128_bwd S16K_bwd\n"
      "  P64_bf16_bwd P64_bf16compute P64_bf16compute_bwd prefill\n"
      "  decode model blas_mode\n"
      "  pair/<16-bit family>, pair/P64_bf16compute: the fused fp32 workload and its 16-bit\n"
      "  form (or the fp32 call under allow_bf16_compute), call by call in turn; counter\n"
      "  ratio = fp32 time / the other's time, per repetition\n"
      "  BM_FmaPeak BM_AmxPeak BM_ReadBandwidth. Example:\n"
      "  flashcpu_bench --benchmark_filter='^(P64|DEC)/'\n"
      "      --benchmark_repetitions=5 --benchmark_report_aggregates_only=true\n"
      "      --benchmark_out=bench.json --benchmark_out_format=json\n"
      "Google Benchmark's own flags follow.\n\n");
}

}  // namespace

int main(int argc, char** argv) {
  fb::choose_openblas_core(argv);  // may re-execute this program once; before anything else
  // Our flags first; the rest goes to Google Benchmark.
  std::vector<char*> rest = {argv[0]};
  for (int i = 1; i < argc; ++i) {
    const char* v = nullptr;
    if (take_flag(argv[i], "--threads", &v) && v) {
      g.threads = std::atoi(v);
    } else if (take_flag(argv[i], "--naive-max", &v) && v) {
      g.naive_max = std::atoll(v);
    } else if (take_flag(argv[i], "--blas-threading", &v) && v) {
      setenv("FLASHCPU_BENCH_BLAS_THREADING", std::strcmp(v, "blas") == 0 ? "blas" : "heads", 1);
    } else if (take_flag(argv[i], "--with-reference", &v)) {
      g.with_reference = true;
    } else if (take_flag(argv[i], "--no-self-check", &v)) {
      g.self_check = false;
    } else if (take_flag(argv[i], "--no-probes", &v)) {
      g.probes = false;
    } else {
      if (std::strcmp(argv[i], "--help") == 0) print_usage();
      rest.push_back(argv[i]);
    }
  }
  if (g.threads > 0) omp_set_num_threads(g.threads);
  const int threads = fb::resolve_threads(g.threads);
  int rest_argc = int(rest.size());
  rest.push_back(nullptr);
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;

#ifndef NDEBUG
  std::fprintf(stderr,
               "warning: flashcpu_bench built without NDEBUG: numbers are not meaningful\n");
#endif
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  const char* omp_threads = std::getenv("OMP_NUM_THREADS");
  const char* commit = std::getenv("FLASHCPU_BENCH_COMMIT");
  const fb::OpenblasInfo blas = fb::openblas_info();
  const std::string blas_threading =
      fb::have_openblas() ? fb::blas_threading_name(fb::default_blas_threading()) : "not built";
  const std::string cpu = fb::cpu_model();
  std::fprintf(stderr, "flashcpu_bench: %s; isa %s, %d threads, OMP_WAIT_POLICY=%s\n",
               cpu.c_str(), flashcpu::active_isa().c_str(), threads, wait ? wait : "(unset)");
  std::fprintf(stderr, "OpenBLAS core %s (%s), %s; %s\n", blas.core.c_str(), blas.note.c_str(),
               blas_threading.c_str(), blas.config.c_str());
  if (fb::have_openblas() && fb::default_blas_threading() == fb::BlasThreading::blas_threaded &&
      (wait == nullptr || std::strcmp(wait, "PASSIVE") != 0)) {
    std::fprintf(stderr,
                 "warning: blas-threaded OpenBLAS without OMP_WAIT_POLICY=PASSIVE: idle OpenMP "
                 "threads spin against OpenBLAS's (about 2x slower here)\n");
  }
  benchmark::AddCustomContext("cpu_model", cpu);
  benchmark::AddCustomContext("cpu_flags", fb::cpu_flags_summary(fb::cpu_flags()));
  benchmark::AddCustomContext("flashcpu_isa", flashcpu::active_isa());
  benchmark::AddCustomContext("flashcpu_threads", std::to_string(threads));
  benchmark::AddCustomContext("openblas_core", blas.core);
  benchmark::AddCustomContext("openblas_config", blas.config);
  benchmark::AddCustomContext("openblas_core_note", blas.note);
  benchmark::AddCustomContext("openblas_coretype", blas.coretype_env);
  benchmark::AddCustomContext("openblas_threading", blas_threading);
  benchmark::AddCustomContext("omp_num_threads", omp_threads ? omp_threads : "unset");
  benchmark::AddCustomContext("omp_wait_policy", wait ? wait : "unset");
  benchmark::AddCustomContext("commit", commit ? commit : "unknown");

  if (g.self_check) fb::self_check(/*verbose=*/false);

  if (g.probes) {
    std::vector<int> counts = {threads};
    if (threads != 1) counts.push_back(1);
    for (int t : counts) {
      const double fma = fb::fma_peak_gflops(t), bw = fb::read_bandwidth_gbps(t);
      std::fprintf(stderr, "probe: %d thread%s: FMA peak %.1f GFLOP/s (%s), read %.1f GB/s\n", t,
                   t == 1 ? "" : "s", fma, fb::fma_peak_isa(t).c_str(), bw);
      const std::string sfx = "_" + std::to_string(t) + "t";
      benchmark::AddCustomContext("fma_peak_gflops" + sfx, std::to_string(fma));
      benchmark::AddCustomContext("fma_peak_isa" + sfx, fb::fma_peak_isa(t));
      benchmark::AddCustomContext("read_gbps" + sfx, std::to_string(bw));
      if (flashcpu::isa_supported("amx")) {
        const double amx = fb::amx_peak_gflops(t);
        std::fprintf(stderr, "probe: %d thread%s: AMX peak %.1f GFLOP/s (TDPBF16PS)\n", t, t == 1 ? "" : "s", amx);
        benchmark::AddCustomContext("amx_peak_gflops" + sfx, std::to_string(amx));
      }
    }
  }

  register_probe_benchmarks();
  register_attention_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
