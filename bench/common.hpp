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
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace flashcpu::bench {

// ---------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------

/// How one tensor is stored.
enum class Elem { f32, bf16, fp16 };
/// 4 or 2.
std::size_t elem_bytes(Elem e);
/// "fp32", "bf16", "fp16".
const char* elem_name(Elem e);

/// The data types of a problem: the five combinations flashcpu::attention takes. q and
/// out always share a type, and so do k and v.
enum class DType {
  fp32,    // everything fp32
  bf16,    // q, k, v and out bf16
  fp16,    // q, k, v and out fp16
  bf16kv,  // fp32 q and out over bf16 K/V: a 16-bit KV cache under fp32 activations
  fp16kv,  // likewise over fp16 K/V
};
/// Every DType, fp32 first.
inline constexpr DType kDTypes[] = {DType::fp32, DType::bf16, DType::fp16, DType::bf16kv,
                                    DType::fp16kv};
/// "fp32", "bf16", "fp16", "bf16kv", "fp16kv": the one spelling of the benchmark names
/// (P64_bf16, DEC_fp16kv), the sweep's --dtype and its CSV.
const char* dtype_name(DType t);
/// The inverse of dtype_name; false for anything else.
bool parse_dtype(const std::string& name, DType* out);
/// The storage of q and out.
Elem act_elem(DType t);
/// The storage of k and v.
Elem kv_elem(DType t);

/// One attention problem: q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv],
/// out [B, Hq, N, Dv], all contiguous BHSD, stored as `dtype` says.
struct Shape {
  std::int64_t batch = 1;
  std::int64_t q_heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t n = 1;  // queries
  std::int64_t m = 1;  // keys
  std::int64_t d = 64;
  std::int64_t dv = 64;
  bool causal = false;
  DType dtype = DType::fp32;
  bool bf16_compute = false;  // AttentionOptions::allow_bf16_compute, on the fused calls
};

/// A multi-head (Hq == Hkv) problem with Dv = D.
Shape mha(std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t m, std::int64_t d,
          bool causal = false);
/// A grouped-query problem with Dv = D.
Shape gqa(std::int64_t b, std::int64_t hq, std::int64_t hkv, std::int64_t n, std::int64_t m,
          std::int64_t d, bool causal = false);

/// "B=1 Hq=16 Hkv=16 N=2048 M=2048 D=64 causal"; a 16-bit problem ends in its type:
/// "... D=64 bf16" (q, k, v and out), "... D=128 fp16 K/V" (fp32 q and out).
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
/// number of query heads sharing it): B * Hkv * M * (D + Dv) * (4, or 2 for 16-bit K/V).
/// The decode counter.
double kv_bytes(const Shape& s);

/// Bytes of q, k, v and out of one problem, each at its stored element size.
double input_bytes(const Shape& s);

/// Bytes a Problem of this shape holds: its fp32 tensors plus the 16-bit ones.
double resident_bytes(const Shape& s);

/// A 64-byte aligned buffer, freed with std::free.
struct FreeDeleter {
  void operator()(void* p) const noexcept;
};
using Buffer = std::unique_ptr<float[], FreeDeleter>;
/// Untyped storage: 16-bit tensors, bf16 or fp16 by the problem's dtype.
using RawBuffer = std::unique_ptr<void, FreeDeleter>;
/// Allocates `count` floats (64-byte aligned). Not initialized.
Buffer allocate_floats(std::size_t count);
/// Fills with values uniform in [-1, 1), a pure function of (seed, index): the same for
/// every thread count.
void fill_uniform(float* p, std::size_t count, std::uint64_t seed);
void fill_zero(float* p, std::size_t count);

// exp(x) for x <= 0 in a form the compiler vectorizes (no libm call): 2^t with
// t = x*log2(e) split into round(t) + f, |f| <= 1/2, 2^f = e^(f ln 2) by a degree-6
// Taylor polynomial (relative error < 2e-7 for |f ln 2| <= 0.347), and round(t)
// added to the exponent bits. Clamped at -87 so the exponent stays normal.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float r = (t + 12582912.0f) - 12582912.0f;  // round to nearest, |t| < 2^22
  const float g = (t - r) * 0.693147180559945309f;
  float p = 1.0f / 720;
  p = p * g + 1.0f / 120;
  p = p * g + 1.0f / 24;
  p = p * g + 1.0f / 6;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  p = p * g + 1.0f;
  std::uint32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<std::uint32_t>(static_cast<std::int32_t>(r)) << 23;
  std::memcpy(&p, &bits, sizeof p);
  return p;
}


/// Allocates `count` elements of `e` (64-byte aligned). Not initialized.
RawBuffer allocate_elems(Elem e, std::size_t count);

/// Widens `count` 16-bit values of type `e` (bf16 or fp16) to fp32, exactly, with an
/// OpenMP team of `threads` (0: the default). What a user of an fp32-only
/// implementation must do with 16-bit data: vectorized code on the bit patterns (x86-64
/// v4, v3 and baseline clones), equal to flashcpu::to_float bit for bit.
void widen(const void* src, Elem e, float* dst, std::size_t count, int threads = 0);
/// Rounds `count` floats to `e` (bf16 or fp16), to nearest even: the same bits as
/// flashcpu::to_bf16 / to_fp16, vectorized likewise.
void narrow(const float* src, Elem e, void* dst, std::size_t count, int threads = 0);

/// Owns the tensors of one problem. Inputs are uniform in [-1, 1] from a fixed seed (a
/// counter-based hash, so the values do not depend on the thread count); out is
/// zero-filled. A tensor the dtype stores in 16 bits is also held in 16 bits (the *16
/// buffers), and its fp32 buffer holds the same values, rounded to that type: every
/// implementation and cross-check sees the same numbers. Every page is touched, so it
/// is resident before any timing or memory measurement.
struct Problem {
  Shape shape;
  Buffer q, k, v, out;
  RawBuffer q16, k16, v16, out16;  // null where the dtype stores the tensor in fp32

  explicit Problem(const Shape& s, std::uint64_t seed = 42);

  /// The fp32 buffers. For a 16-bit output, outv() is not where attention writes.
  TensorView<const float> qv() const;
  TensorView<const float> kv() const;
  TensorView<const float> vv() const;
  TensorView<float> outv() const;
  std::size_t q_size() const;
  std::size_t k_size() const;
  std::size_t v_size() const;
  std::size_t out_size() const;
  /// Total bytes of q, k, v and out, each at its stored element size.
  double input_bytes() const;

  /// Calls f(q, k, v, out) with views of the tensors as the dtype stores them (each
  /// const T except out): the arguments of the matching flashcpu::attention overload.
  template <class F>
  void visit(F&& f) const;

 private:
  template <class T>
  TensorView<T> view16(void* data, std::int64_t heads, std::int64_t seq,
                       std::int64_t dim) const {
    return bhsd<T>(static_cast<T*>(data), shape.batch, heads, seq, dim);
  }
};

template <class F>
void Problem::visit(F&& f) const {
  const Shape& s = shape;
  // The 16-bit half of a combination, by its element type.
  auto with16 = [&](auto tag) {
    using T = decltype(tag);
    const TensorView<const T> k16v = view16<const T>(k16.get(), s.kv_heads, s.m, s.d);
    const TensorView<const T> v16v = view16<const T>(v16.get(), s.kv_heads, s.m, s.dv);
    if (act_elem(s.dtype) == Elem::f32) {
      f(qv(), k16v, v16v, outv());
    } else {
      f(view16<const T>(q16.get(), s.q_heads, s.n, s.d), k16v, v16v,
        view16<T>(out16.get(), s.q_heads, s.n, s.dv));
    }
  };
  switch (kv_elem(s.dtype)) {
    case Elem::f32:
      f(qv(), kv(), vv(), outv());
      return;
    case Elem::bf16:
      with16(bf16{});
      return;
    case Elem::fp16:
      with16(fp16{});
      return;
  }
}

// ---------------------------------------------------------------------------------
// Implementations
// ---------------------------------------------------------------------------------

enum class Impl {
  fused,          // flashcpu::attention
  naive,          // textbook fp32: plain loops, one score row, std::exp (bench/naive.cpp)
  openblas,       // materialized: sgemm, row softmax, sgemm; causal skips masked key blocks
  openblas_full,  // the same over the full N x M square, masked (what most frameworks do)
  reference,      // flashcpu::reference::attention, the fp64 oracle
};
/// "fused", "naive", "openblas", "openblas_full", "reference": the benchmark names.
const char* impl_name(Impl impl);

/// The textbook implementation a user would write first, in fp32: per query row, the
/// scores q.k * scale in plain loops into one materialized row, std::exp of each minus
/// the row maximum, their sum, and the weighted sum of the value rows. OpenMP over
/// (batch, head, row); compiled -O3 -march=native (bench/naive.cpp). Dot-product
/// score, `causal` and `scale` only; every view's last stride must be 1. A row with no
/// visible key gets zeros.
void naive_attention(TensorView<const float> q, TensorView<const float> k,
                     TensorView<const float> v, TensorView<float> out,
                     const AttentionOptions& options);

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

/// A float buffer that grows to the largest size asked of it and is otherwise kept.
struct GrowingBuffer {
  Buffer data;
  std::size_t floats = 0;
  /// At least `count` floats (not initialized).
  float* reserve(std::size_t count);
};

/// The buffers the baselines keep between calls, so that no timed call maps and faults
/// in fresh pages: the score buffers of the materialized baseline (up to 1 GiB at
/// N = 16384; one per thread), and, on a 16-bit problem, the fp32 copies the baselines
/// widen the 16-bit inputs into and their fp32 output before it is rounded. Grows to
/// the largest call made with it.
struct MaterializedWorkspace {
  std::vector<Buffer> buffers;
  std::size_t floats_each = 0;
  GrowingBuffer q, k, v, out;
  /// At least `count` score buffers of at least `floats` floats each.
  void reserve(std::size_t count, std::size_t floats);
};

/// Query rows per work item when the causal baseline skips masked key blocks: the
/// rows of one item see keys [0, last row's diagonal], so the item's sgemms stop there.
constexpr std::int64_t kCausalSkipRows = 256;

/// The materialized baseline. Per (b, h), with kv head h / (Hq / Hkv), per block of
/// query rows [r0, r1):
///   S = scale * Q K^T                 cblas_sgemm, fp32, over keys [0, cols)
///   causal: S[i][j] = -inf for j > i + (M - N)
///   P = row softmax(S)                max-subtracted, vectorized exp; a row with no
///                                     visible key is all zeros
///   O = P V                           cblas_sgemm over keys [0, cols)
/// With `full_square` false (Impl::openblas), a causal call works in blocks of
/// kCausalSkipRows rows and cols stops at the last key the block's bottom row sees,
/// as a careful user would write it: about half the work. With `full_square` true
/// (Impl::openblas_full), or without causal, cols = M and a block is a whole head (a
/// head's rows are split only when there are fewer heads than threads).
/// `workspace` (may be null: a temporary one) holds the score buffers.
/// The last stride of every view must be 1 (BHSD, BSHD, padded rows all work).
/// Raises flashcpu::Error when OpenBLAS is not compiled in or on a bad view.
void openblas_attention(TensorView<const float> q, TensorView<const float> k,
                        TensorView<const float> v, TensorView<float> out,
                        const AttentionOptions& options, bool full_square = false,
                        BlasThreading threading = default_blas_threading(),
                        MaterializedWorkspace* workspace = nullptr);

/// Runs one implementation on a problem with `threads` threads (0: OpenMP default),
/// writing p.out, or p.out16 when the output is 16-bit.
///   fused, reference: the flashcpu::attention (reference::attention) overload of the
///     problem's types.
///   naive, openblas, openblas_full on a 16-bit problem (the "materialized baseline in
///     16 bits"): inside the call, as a user of an fp32 implementation would have to,
///     the 16-bit inputs are widened (OpenMP-parallel) into fp32 copies kept in
///     `workspace`; the fp32 baseline runs on them; a 16-bit output is rounded from an
///     fp32 one, also kept there. The rounded fp32 copies the Problem holds are not used.
/// The baselines keep their buffers in `workspace` (null: a temporary one per call);
/// the OpenBLAS ones thread as `blas` says.
void run(Impl impl, Problem& p, int threads, MaterializedWorkspace* workspace = nullptr,
         BlasThreading blas = default_blas_threading());

/// The working memory an implementation's design implies, in MiB, or a negative
/// value for the fused kernel (whose figure is measured, not designed):
///   naive: one M-float score row per thread;
///   reference: one N x M double score matrix per concurrently processed head;
///   openblas / openblas_full: the float score buffers openblas_attention allocates;
///   naive and openblas on a 16-bit problem also: the fp32 copies of the 16-bit inputs
///   and, for a 16-bit output, the fp32 output.
double analytic_mib(Impl impl, const Shape& s, int threads,
                    BlasThreading t = default_blas_threading());

/// The active ISA level, the kernel variant flashcpu::attention runs for this shape and
/// its tiles, e.g. "amx bf16_attn_fwd_16x32__amx br=256 bc=512" or
/// "avx2 f32_attn_fwd_4x16__avx2 br=144 bc=256"; on the decode driver, the kernel it runs
/// there instead of the block rows: "avx512 f32_attn_fwd_6x64__avx512 decode 4-row tiles,
/// K in place, bc=256".
std::string fused_label(const Shape& s);
/// Whether that variant is the AMX tile kernel (its figures are then also quoted against
/// the AMX probe).
bool fused_runs_on_tiles(const Shape& s);
/// Whether the fused call rounds q, k and v to bf16 for its products: the shape asks for
/// allow_bf16_compute and the variant the library picks for it takes bf16 products (on a
/// level without them, or for calls the option does not reach, it computes exactly).
bool fused_rounds_to_bf16(const Shape& s);
/// The backward variant attention_backward runs for this shape's data, e.g.
/// "f32_attn_bwd_6x64__avx512" (16-bit data widened) or "bf16_attn_bwd_6x64__avx512bf16"
/// (bf16 data, the products by vdpbf16ps).
std::string fused_backward_label(const Shape& s);
/// Whether that backward takes its products by bf16 pairs (then its gradients are not the
/// fp32 backward's bitwise).
bool backward_pair_products(const Shape& s);
/// What ran, for a benchmark's label: the fused ISA and tiles, "naive fp32 -O3
/// -march=native", "openblas <core> heads-parallel causal-skip", "reference (fp64)",
/// and on a 16-bit problem its types: "avx2 br=144 bc=256, bf16 K/V", "openblas Haswell
/// heads-parallel, K/V widened from bf16", "naive fp32 -O3 -march=native, q/K/V widened
/// from fp16, out rounded to fp16".
std::string impl_label(Impl impl, const Shape& s);

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

/// The tolerance of every cross-check, relative to the expected output's own scale:
/// |a - b| <= kRelToScale * max|expected| (a NaN always fails). Random inputs in
/// [-1, 1] give outputs near 0.01 at M = 2048, so a bound absolute in the outputs'
/// units would let a 2% error through; fp32 implementations agree to about 1e-6 of
/// the scale, and an error of 1e-3 of it fails.
constexpr double kRelToScale = 1e-4;
/// compare() with atol = kRelToScale * max|expected| + extra_atol and the given rtol.
Diff compare_to_scale(const float* actual, const float* expected, std::size_t count,
                      double rtol = 0.0, double extra_atol = 0.0);

/// The per-element relative tolerance a 16-bit output adds to kRelToScale: 2^-7 for
/// bf16, 2^-10 for fp16, 0 for an fp32 output. Rounding an output to 16 bits moves it
/// by up to half an ulp, 2^-8 (bf16) or 2^-11 (fp16) of its value; both sides of a
/// comparison are rounded, so two outputs whose fp32 values agree to the last bit but
/// straddle a rounding boundary land one ulp, up to twice that, apart.
double output_rounding_rtol(DType t);

/// p's output in fp32: a copy of p.out, or p.out16 widened.
Buffer output_floats(const Problem& p);

/// The absolute tolerance the rounding of the softmax weights adds: all-bf16 prefill on
/// the bf16-product levels ("amx", "avx512bf16") rounds each weight to bf16 before P.V,
/// which moves an output by up to 2^-8 max|v| (|sum_j (p~_j - p_j) v_j| / l, the header's
/// bound), and so does prefill under allow_bf16_compute there. Allowed on every all-bf16
/// problem, whichever kernel the level and shape pick, and wherever fused_rounds_to_bf16
/// (decoding from a bf16 cache under the option rounds q only: loose there, not wrong;
/// the suite runs only the fused call on such shapes); 0 for the other problems,
/// whose weights stay fp32.
double weight_rounding_atol(const Problem& p);

/// p's output (output_floats) against `expected`, within the cross-check tolerance of
/// p's types: kRelToScale of the scale plus weight_rounding_atol, and
/// output_rounding_rtol per element.
Diff compare_output(const Problem& p, const float* expected);

/// Runs `impl` and the fused kernel on p and aborts the process with a loud message
/// when the outputs differ beyond the tolerance above. Leaves p's output holding
/// impl's result. Used once per benchmark so a baseline number is never quoted for a
/// wrong answer.
void check_against_fused(Impl impl, Problem& p, int threads,
                         MaterializedWorkspace* workspace = nullptr);

/// Aborts the process with a loud message when p's output (computed by `name`)
/// differs from `expected` (computed by `expected_name`, in fp32 or widened from 16
/// bits) beyond the tolerance of compare_output.
void check_output(const char* name, const Problem& p, const char* expected_name,
                  const float* expected);

/// A smaller problem of the same family: batch 1, at most 2 KV heads with the same
/// query-to-KV ratio, the same D, Dv, dtype and causal offset M - N, and N, M capped near
/// 160 (keeping M - N up to 96), so the fp64 oracle checks it in milliseconds.
Shape reduced(const Shape& s);

/// An fp32 problem holding p's q, k and v (from its fp32 buffers, which hold 16-bit values
/// too) rounded to bf16 to nearest even, q and k that round to subnormals read as zero, as
/// the bf16 products read them: what a fused call that rounds (fused_rounds_to_bf16)
/// computes on, by the header's promise.
Problem bf16_rounded_copy(const Problem& p);

/// The fp64 oracle's output on `tested`'s inputs, which `impl` has run: on
/// bf16_rounded_copy(tested) where the fused call rounds them, else on the same inputs in
/// the same types. (The rounding moves scores by up to 2^-7 of scale sum_d |q_d k_d|, which
/// can pass the tolerance; on the suite's inputs in [-1, 1] it stays inside the bf16
/// weights' allowance.)
Buffer reference_output(Impl impl, const Problem& tested, int threads);

/// Runs `impl` on reduced(s) and aborts loudly when it differs from reference_output
/// beyond the tolerance above: one size per family, checked against the oracle rather
/// than against another fp32 implementation.
void check_against_reference(Impl impl, const Shape& s, int threads);

/// Checks fused, naive, both OpenBLAS variants and the oracle against each other on
/// small problems covering MHA, GQA, causal with N == M, N < M and N > M, decode,
/// Dv != D and fully masked rows, and a prefill and a decode problem of each 16-bit
/// dtype. Aborts on a mismatch; prints one line per problem when verbose.
void self_check(bool verbose);

// ---------------------------------------------------------------------------------
// The backward (bench/backward.cpp)
// ---------------------------------------------------------------------------------

/// Useful FLOP of one backward call: its five products S = QK^T, dP = dO V^T, dV = P^T dO,
/// dQ = dS K and dK = dS^T Q over the visible pairs, 2 * B * Hq * pairs * (3 D + 2 Dv)
/// (10 * B * Hq * N * M * D with Dv = D and no mask). Products an implementation
/// repeats (flashcpu recomputes S and dP in a second pass) are not counted.
double backward_flops(const Shape& s);

/// One fp32 backward problem: the forward's inputs, its out and lse from
/// flashcpu::attention, dout uniform in [-1, 1], and the three gradients (zeroed).
/// A backward problem: the forward's inputs, its out and lse (from the fused fp32 forward on
/// the same values), dout, and the gradients. An all-16-bit dtype (bf16, fp16) also keeps
/// out, dout and the gradients in that type (the fp32 buffers hold the same values), for
/// attention_backward's 16-bit overload; fp32 q and out over a 16-bit cache has no backward.
struct BackwardProblem {
  Problem fwd;
  Buffer lse, dout, dq, dk, dv;
  RawBuffer dout16, dq16, dk16, dv16;  // null unless the dtype is bf16 or fp16
  explicit BackwardProblem(const Shape& s, std::uint64_t seed = 42);
  TensorView<const float> lsev() const;
  TensorView<const float> doutv() const;
  TensorView<float> dqv() const;
  TensorView<float> dkv() const;
  TensorView<float> dvv() const;
};

enum class BackwardImpl {
  fused,     // flashcpu::attention_backward
  openblas,  // materialized: S, P, dP and dS as full matrices between five sgemms
};
const char* backward_impl_name(BackwardImpl impl);  // "fused", "openblas"

/// The materialized backward a user would build from OpenBLAS. Per (b, KV head), one
/// work item (OpenMP over items, OpenBLAS single-threaded inside, so that dK and dV of a
/// KV head sum over its query heads without a reduction); per query head of the group
/// and per block of query rows (all N rows, or kCausalSkipRows with causal, whose keys
/// end at the block's last diagonal):
///   S = scale Q K^T, P = exp(S - lse) (0 past the diagonal), dP = dO V^T  (two sgemms)
///   dS = P (dP - D), D_i = dO_i . O_i                                      (elementwise)
///   dV += P^T dO, dQ = scale dS K, dK += scale dS^T Q                     (three sgemms)
/// Working memory: two rows x M fp32 matrices (S/P and dP/dS) per thread. Dot-product
/// score, `causal` and the default scale only.
void openblas_attention_backward(BackwardProblem& p, int threads, MaterializedWorkspace* workspace);

/// Runs one backward implementation on the problem's own buffers.
void run_backward(BackwardImpl impl, BackwardProblem& p, int threads, MaterializedWorkspace* workspace);

/// Runs `impl` and flashcpu::attention_backward on the problem and returns the largest
/// |difference| over the three gradients relative to the largest |gradient|; throws
/// Error above 1e-3 (fp32 sums of thousands of terms agree to ~1e-5 here). The
/// benchmarks' first-run cross-check.
double check_backward_against_fused(BackwardImpl impl, BackwardProblem& p, int threads,
                                    MaterializedWorkspace* workspace);

/// For a 16-bit problem, or fp32 under allow_bf16_compute (Shape::bf16_compute): its
/// gradients from the last run_backward must be bitwise the exact fp32 backward's on the
/// same values, rounded to their type, as the header promises, or, where the products
/// take bf16 pairs (backward_pair_products), within 2^-4 of the largest gradient of the
/// same kind (a check against gross errors: dQ's terms cancel, so its error bound is
/// relative to their magnitudes, not to dQ); throws Error naming the first gradient that
/// is not. Overwrites the fp32 gradient buffers.
void check_backward_against_fp32(BackwardProblem& p, int threads);

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
// The machine, and which OpenBLAS core ran (bench/machine.cpp)
// ---------------------------------------------------------------------------------

/// /proc/cpuinfo's "model name" with its family and model, e.g. "AMD EPYC (family 25, model 17)".
std::string cpu_model();
/// /proc/cpuinfo's flags. Linux lists a feature only when the OS also saves its state.
std::set<std::string> cpu_flags();
/// The flags that decide which kernels can run, space-separated ("sse2 avx2 fma ...").
std::string cpu_flags_summary(const std::set<std::string>& flags);

/// OpenBLAS 0.3.21 core names ranked by their widest kernels: 1 SSE (Prescott,
/// Nehalem, unknown...), 2 AVX, 3 AVX2 (Haswell, Zen), 4 SkylakeX, 5 Cooperlake,
/// 6 SapphireRapids. Case-insensitive.
int openblas_core_rank(const std::string& core);
/// The best OpenBLAS core a CPU with these flags runs: "Cooperlake" with AVX-512 and
/// AVX512-BF16, "SkylakeX" with AVX-512 (F, DQ, BW, VL), "Haswell" with AVX2 and FMA,
/// else "".
std::string best_openblas_core(const std::set<std::string>& flags);

/// Call first thing in main() of a program that runs the OpenBLAS baseline. Debian's
/// OpenBLAS 0.3.21 does not know CPUs newer than it and falls back to its SSE3
/// "Prescott" kernels (6x slower sgemm on a Xeon with AVX-512). When the core it
/// picked ranks below best_openblas_core() and the caller has not set
/// OPENBLAS_CORETYPE, this re-executes the program once with OPENBLAS_CORETYPE set
/// (OpenBLAS reads it only when it loads) and says so on stderr. The library never
/// does this, and nothing else sets the variable.
void choose_openblas_core(char** argv);

struct OpenblasInfo {
  std::string core;          // openblas_get_corename(), or "not built"
  std::string config;        // openblas_get_config()
  std::string note;          // how the core was chosen, one sentence
  std::string coretype_env;  // OPENBLAS_CORETYPE, or "unset"
};
OpenblasInfo openblas_info();

// ---------------------------------------------------------------------------------
// Machine probes
// ---------------------------------------------------------------------------------

/// fp32 FMA throughput in GFLOP/s on `threads` threads, for one vector width:
/// "avx512" (zmm), "avx2" (ymm, with FMA3) or "sse2" (xmm, mul + add, no FMA). Each
/// thread runs 16 (zmm) or 12 (ymm/xmm) independent accumulator chains for about
/// `seconds`. Returns 0 if the CPU lacks the ISA.
double measure_fma_gflops(const std::string& isa, int threads, double seconds = 0.1);

/// Whether measure_fma_gflops has a probe for this ISA level: the probes are per vector
/// width, and a level that adds instructions but no width (a future one) has none.
bool has_fma_probe(const std::string& isa);

/// AMX throughput in GFLOP/s (bf16 products, fp32 sums) on `threads` threads:
/// back-to-back TDPBF16PS into four independent accumulator tiles for about `seconds`.
/// Returns 0 unless the CPU and OS can run AMX (flashcpu::isa_supported("amx")).
double measure_amx_gflops(int threads, double seconds = 0.1);

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
/// Cached per process and thread count: measure_amx_gflops, best of four 50 ms windows
/// (0 without AMX).
double amx_peak_gflops(int threads);

/// A short FMA probe at the width fma_peak_isa(threads) chose (best of three 20 ms
/// windows), for a benchmark to take right before each repetition it normalizes.
double fma_probe_now(int threads);
/// A short AMX probe (best of three 20 ms windows), likewise, for the AMX kernels' figures.
double amx_probe_now(int threads);
/// A short read-bandwidth probe (one pass over a 512 MiB buffer kept for the process,
/// best of two), likewise.
double read_probe_now(int threads);

/// Reads every tensor of p once, untimed. On the KVM guests here the first read of
/// freshly written memory can run at a fraction of the memory's rate (64 MiB at 2
/// threads: 11.8-13.9 ms on a first pass against 1.2-1.6 ms on later ones, Zen 5), so a
/// cold problem's copies are read once before any call is timed on them.
void read_through(const Problem& p, int threads);

/// Resolves 0 to OpenMP's default thread count.
int resolve_threads(int threads);

/// Median of a non-empty sample.
double median(std::vector<double> xs);

/// Wall-clock seconds since an arbitrary origin (steady clock).
double now_seconds();

}  // namespace flashcpu::bench
