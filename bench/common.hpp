// Shared by the Google Benchmark suite (bench/) and the tools (tools/): problem
// setup, the FLOP and byte formulas, the materialized OpenBLAS baseline, peak-memory
// measurement and the machine probes (FMA peak, read bandwidth).
//
// No Google Benchmark types here: the tools link this without it. The code lives in
// bench/support.cpp and bench/fma_probe.cpp, built as the static library
// `flashcpu_bench_support` (bench/support.cmake).
#pragma once

#include <flashcpu/flashcpu.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace flashcpu::bench {

// ---------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------

/// One attention problem: q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv],
/// out [B, Hq, N, Dv], all contiguous BHSD.
struct Shape {
  std::int64_t batch = 1;
  std::int64_t q_heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t n = 1;  // queries
  std::int64_t m = 1;  // keys
  std::int64_t d = 64;
  std::int64_t dv = 64;
  bool causal = false;
};

/// A multi-head (Hq == Hkv) problem with Dv = D.
Shape mha(std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t m, std::int64_t d,
          bool causal = false);
/// A grouped-query problem with Dv = D.
Shape gqa(std::int64_t b, std::int64_t hq, std::int64_t hkv, std::int64_t n, std::int64_t m,
          std::int64_t d, bool causal = false);

/// "B=1 Hq=16 Hkv=16 N=2048 M=2048 D=64 causal"
std::string describe(const Shape& s);

/// Number of (query, key) pairs a query row actually attends to, summed over rows.
/// Causal is aligned bottom-right: row i sees keys j <= i + (M - N), so
///   pairs = sum_{i=0}^{N-1} clamp(i + (M - N) + 1, 0, M);
/// non-causal: N * M.
double visible_pairs(std::int64_t n, std::int64_t m, bool causal);

/// Useful floating-point work of one attention call (the FLOP counter):
///   FLOP = 2 * B * Hq * pairs * (D + Dv)
/// i.e. 2*D for the score q.k and 2*Dv for the weighted sum p*v per visible pair;
/// with Dv = D and no mask this is 4 * B * Hq * N * M * D. The softmax (one exp, a
/// max, a sum per score) is not counted, and masked pairs a kernel may compute
/// anyway are not counted either: causal figures are comparable across methods.
double attention_flops(const Shape& s);

/// Bytes of K and V one call must read at least (each KV head read once, whatever the
/// number of query heads sharing it): B * Hkv * M * (D + Dv) * 4. The decode counter.
double kv_bytes(const Shape& s);

/// A 64-byte aligned float buffer, freed with std::free.
struct FreeDeleter {
  void operator()(float* p) const noexcept;
};
using Buffer = std::unique_ptr<float[], FreeDeleter>;
/// Allocates `count` floats (64-byte aligned). Not initialized.
Buffer allocate_floats(std::size_t count);

/// Owns the four tensors of one problem. Inputs are uniform in [-1, 1] from a fixed
/// seed (a counter-based hash, so the values do not depend on the thread count);
/// out is zero-filled. Every page is touched, so it is resident before any timing or
/// memory measurement.
struct Problem {
  Shape shape;
  Buffer q, k, v, out;

  explicit Problem(const Shape& s, std::uint64_t seed = 42);

  TensorView<const float> qv() const;
  TensorView<const float> kv() const;
  TensorView<const float> vv() const;
  TensorView<float> outv() const;
  std::size_t out_size() const;
  /// Total bytes of q, k, v and out.
  double input_bytes() const;
};

// ---------------------------------------------------------------------------------
// Implementations
// ---------------------------------------------------------------------------------

enum class Impl {
  fused,     // flashcpu::attention
  naive,     // flashcpu::reference::attention (double, full score matrix)
  openblas,  // materialized: sgemm, row softmax, sgemm (bench/support.cpp)
};
const char* impl_name(Impl impl);  // "fused", "naive", "openblas"

/// Whether this build has the OpenBLAS baseline (FLASHCPU_BENCH_HAVE_OPENBLAS).
bool have_openblas();

/// How the OpenBLAS baseline spends its threads.
enum class BlasThreading {
  /// OpenMP over (head, row block) work items, OpenBLAS told to use 1 thread inside.
  /// Heads are split into row blocks only when there are fewer heads than threads.
  /// One score buffer (rows of the block x M) per thread.
  heads_parallel,
  /// Heads one after another, OpenBLAS threaded inside each sgemm, the softmax
  /// rows spread over an OpenMP team. One N x M score buffer in all. Needs
  /// OMP_WAIT_POLICY=PASSIVE: spinning idle OpenMP threads slow OpenBLAS's 2x.
  blas_threaded,
};
const char* blas_threading_name(BlasThreading t);
/// The default: heads_parallel, faster than blas_threaded on every workload measured
/// here and indifferent to OMP_WAIT_POLICY (bench/README.md has the numbers).
/// FLASHCPU_BENCH_BLAS_THREADING=blas selects blas_threaded.
BlasThreading default_blas_threading();

/// The materialized baseline. Per (b, h), with kv head h / (Hq / Hkv):
///   S = scale * Q K^T                 cblas_sgemm, N x M, fp32
///   causal: S[i][j] = -inf for j > i + (M - N)
///   P = row softmax(S)                max-subtracted, vectorized exp; a row with no
///                                     visible key is all zeros
///   O = P V                           cblas_sgemm
/// The last stride of every view must be 1 (BHSD, BSHD, padded rows all work).
/// Raises flashcpu::Error when OpenBLAS is not compiled in or on a bad view.
void openblas_attention(TensorView<const float> q, TensorView<const float> k,
                        TensorView<const float> v, TensorView<float> out,
                        const AttentionOptions& options,
                        BlasThreading threading = default_blas_threading());

/// Runs one implementation on a problem with `threads` threads (0: OpenMP default).
void run(Impl impl, Problem& p, int threads);

/// For the naive reference, the working memory its design implies: one N x M double
/// score matrix per concurrently processed head, min(threads, B*Hq) of them.
double naive_analytic_mib(const Shape& s, int threads);
/// For the OpenBLAS baseline: the float score buffers openblas_attention allocates.
double openblas_analytic_mib(const Shape& s, int threads, BlasThreading t);

/// The ISA and tiles of the fused kernel for head dim d, e.g. "avx512 br=64 bc=256".
std::string fused_label(std::int64_t d);

// ---------------------------------------------------------------------------------
// Correctness cross-check
// ---------------------------------------------------------------------------------

struct Diff {
  double max_abs = 0;     // max |a - b|
  double max_excess = 0;  // max |a - b| / (atol + rtol * |b|): <= 1 passes
  std::size_t worst = 0;  // index of the worst element
  float a = 0, b = 0;     // values there
};
Diff compare(const float* a, const float* b, std::size_t count, double atol, double rtol);

/// Runs `impl` and the fused kernel on p and aborts the process with a loud message
/// when the outputs differ beyond atol = 2e-4, rtol = 2e-3. Leaves p.out holding
/// impl's result. Used once per benchmark so a baseline number is never quoted for a
/// wrong answer.
void check_against_fused(Impl impl, Problem& p, int threads);

/// Aborts the process with a loud message when p.out (computed by `name`) differs
/// from `expected` (computed by `expected_name`) beyond atol = 2e-4, rtol = 2e-3.
void check_output(const char* name, const Problem& p, const char* expected_name,
                  const float* expected);

/// Checks fused, naive and OpenBLAS against each other on small problems covering
/// MHA, GQA, causal with N == M and N < M, decode and fully masked rows. Aborts on a
/// mismatch; prints one line per problem when verbose.
void self_check(bool verbose);

// ---------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------

/// A field of /proc/self/status in MiB ("VmRSS", "VmHWM"); negative if unreadable.
double proc_status_mib(const char* field);

/// Working memory of one call beyond what is resident before it: returns
/// peak RSS during fn() - RSS before, in MiB, or a negative value when the kernel
/// does not let us reset the peak. Method: malloc_trim(0) (so freed heap pages from
/// earlier calls are not silently reused), read VmRSS, write "5" to
/// /proc/self/clear_refs (Linux >= 4.0: resets VmHWM to the current RSS), call fn,
/// read VmHWM. Inputs must already be touched.
template <class F>
double measure_peak_extra_mib(F&& fn);

namespace detail {
/// Prepares a measurement; returns RSS in MiB, or negative if the reset failed.
double begin_peak_measure();
double end_peak_measure(double rss_before);
}  // namespace detail

template <class F>
double measure_peak_extra_mib(F&& fn) {
  const double before = detail::begin_peak_measure();
  fn();
  return detail::end_peak_measure(before);
}

// ---------------------------------------------------------------------------------
// Machine probes
// ---------------------------------------------------------------------------------

/// fp32 FMA throughput in GFLOP/s on `threads` threads, for one vector width:
/// "avx512" (zmm), "avx2" (ymm, with FMA3) or "sse2" (xmm, mul + add, no FMA). Each
/// thread runs 16 (zmm) or 12 (ymm/xmm) independent accumulator chains for about
/// `seconds`. Returns 0 if the CPU lacks the ISA.
double measure_fma_gflops(const std::string& isa, int threads, double seconds = 0.1);

/// Read bandwidth in GB/s (1e9 B/s): every thread sums its share of a `bytes` buffer
/// (first-touched by the same thread); best of `passes` passes.
double measure_read_gbps(int threads, std::size_t bytes = std::size_t(512) << 20, int passes = 3);

/// Cached per process and thread count: the best FMA figure over the vector widths
/// this CPU has (zmm and ymm give the same peak on Zen 4; not on every Intel part).
double fma_peak_gflops(int threads);
/// The width that gave fma_peak_gflops(threads).
std::string fma_peak_isa(int threads);
/// Cached per process and thread count.
double read_bandwidth_gbps(int threads);

/// Resolves 0 to OpenMP's default thread count.
int resolve_threads(int threads);

/// Median of a non-empty sample.
double median(std::vector<double> xs);

/// Wall-clock seconds since an arbitrary origin (steady clock).
double now_seconds();

}  // namespace flashcpu::bench
