// flashcpu: fused, cache-tiled attention for CPUs.
//
// The one public header. It holds strided views, options, the entry points and
// the error type; no SIMD types leak out of it.
//
//   #include <flashcpu/flashcpu.hpp>
//   std::vector<float> q(B*H*N*D), k(B*H*M*D), v(B*H*M*D), o(B*H*N*D);
//   flashcpu::attention(flashcpu::bhsd<const float>(q.data(), B, H, N, D),
//                       flashcpu::bhsd<const float>(k.data(), B, H, M, D),
//                       flashcpu::bhsd<const float>(v.data(), B, H, M, D),
//                       flashcpu::bhsd(o.data(), B, H, N, D),
//                       {.causal = true});   // C++20 designated init; C++17: set fields
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace flashcpu {

/// 16-bit floating-point data, stored as its bits. Plain aggregates: no arithmetic, only
/// the conversions below, so nothing computes in 16 bits by accident.
struct bf16 { std::uint16_t bits; };  // bfloat16: the top half of an IEEE binary32
struct fp16 { std::uint16_t bits; };  // IEEE 754 binary16

bf16 to_bf16(float x);   // round to nearest, ties to even; NaN stays NaN (quiet)
fp16 to_fp16(float x);   // round to nearest, ties to even; beyond the range gives +-inf
float to_float(bf16 x);  // exact
float to_float(fp16 x);  // exact

/// A non-owning strided view of a 4-D tensor laid out as [batch, heads, seq, dim].
/// Strides are in elements and may take any non-negative value, so BHSD, BSHD,
/// sliced and padded buffers are all used in place. An aggregate: no constructors.
template <class T>
struct TensorView {
  T* data;
  std::array<std::int64_t, 4> shape;    // [batch, heads, seq, dim]
  std::array<std::int64_t, 4> strides;  // in elements

  /// A mutable view converts to a read-only one.
  operator TensorView<const T>() const { return {data, shape, strides}; }
};

/// A contiguous [B, H, S, D] view (row-major, "BHSD").
template <class T>
TensorView<T> bhsd(T* data, std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) {
  return {data, {b, h, s, d}, {h * s * d, s * d, d, 1}};
}

/// A view of a contiguous [B, S, H, D] buffer ("BSHD", as most model code stores
/// activations), presented in the library's [B, H, S, D] order without a copy.
template <class T>
TensorView<T> bshd(T* data, std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) {
  return {data, {b, h, s, d}, {s * h * d, d, h * d, 1}};
}

/// The score function f(q, k) whose softmax weights the values.
enum class Score {
  dot_product,  // s = scale * q.k                                   (default scale 1/sqrt(D))
  gaussian,     // s = -scale * |q - k|^2: Gaussian kernel, sigma = 1/sqrt(2 scale)  (default 1/2)
  additive,     // s = scale * sum_d w_d tanh(q_d + k_d): Bahdanau, w = additive_weights (default 1)
};

struct AttentionOptions {
  std::optional<float> scale;  // default by score: 1/sqrt(D), 1/2, 1
  bool causal = false;         // query i sees key j only when j <= i + (M - N)
  int num_threads = 0;         // 0: OpenMP's default (fewer for small calls: min_flops_per_thread)

  // Masks broadcast to [B, Hq, N, M]: a size-1 dim or a 0 stride broadcasts.
  TensorView<const float> mask{};              // additive; -inf excludes
  TensorView<const std::uint8_t> bool_mask{};  // nonzero = may attend, zero = excluded
  const std::int32_t* key_lengths = nullptr;   // B values: keys j >= key_lengths[b] are excluded
  // Sliding window around the causal diagonal d = i + (M - N): key j is visible when
  // d - window_left <= j <= d + window_right; -1 = unbounded.
  std::int64_t window_left = -1;
  std::int64_t window_right = -1;
  float softcap = 0;                     // > 0: s = softcap * tanh(s / softcap), on the scaled score
  const float* alibi_slopes = nullptr;   // Hq values: s += -slope[h] * |d - j|
  // Attention sinks (gpt-oss): Hq values, in the units of the scores (after scale,
  // softcap, ALiBi and mask): every row of head h also counts exp(sinks[h]) in its
  // softmax denominator, with no value. -inf is the same as no sink.
  const float* sinks = nullptr;

  Score score = Score::dot_product;
  const float* additive_weights = nullptr;  // D values, required by Score::additive

  // Lets fp32 and fp16 q, k and v be rounded to bf16 (to nearest even) for the two
  // products, on a level with bf16 products (see active_isa: "amx", "avx512bf16"), for the
  // calls those take, all with the dot product:
  //  - prefill (more than 16 queries), where the weights are rounded to bf16 too;
  //  - on "amx", decoding with 16 or more stacked rows (query heads per KV head x
  //    queries), the weights rounded too;
  //  - on "avx512bf16", decoding with fp32 q from a bf16 KV cache whose V rows are
  //    contiguous and Dv a multiple of 16: q is rounded; the weights and V are not.
  // Other calls are computed exactly. For attention_backward with the dot product on
  // those levels, the option rounds q, k, v and dout for its five products (see there).
  // oneDNN's "fpmath mode bf16" and PyTorch's float32_matmul_precision("medium") allow
  // the same. Each rounding has a relative error of at most 2^-8, so a score moves by up
  // to about 2^-7 scale sum_d |q_d k_d|, and an output by up to 2^-8 max|v| more, twice
  // that where the weights are rounded as well. A value beyond bf16's largest finite
  // (about 3.39e38) becomes inf. out keeps q's type and lse stays fp32. false (the
  // default): exact fp32 and fp16 inputs.
  bool allow_bf16_compute = false;
};
// Order for one score: s = f(q, k) with its scale; soft-capping; ALiBi; plus the
// additive mask; then the exclusions (bool mask, a -inf mask entry, causal, window, key
// lengths), each of which removes the key. A row with no visible key gets zeros (and
// lse = -inf).
//
// An excluded key never influences the result, whatever its K and V rows hold (NaN,
// inf, stale KV-cache slots): its value row is kept out of the sum, not multiplied by a
// zero weight. A NaN or inf in a visible key's row, or in q, propagates as it does in
// the oracle (the row's output becomes NaN or inf). Large finite mask values do not
// exclude: a row masked entirely by -1e9 or -FLT_MAX still averages its keys by the
// softmax of its (in fp32, equal) scores. The lse of a row whose scores are all below
// -FLT_MAX * ln 2 (about -2.36e38) saturates near that value.
//
// With sinks, row i of head h with visible scores s_j gets
//   out_i = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sinks[h])),
//   lse_i = log(sum_j exp(s_j) + exp(sinks[h])),
// and a row with no visible key gets out = 0 and lse = sinks[h]. When a context is
// sharded across calls and merged with merge_into, pass the sinks to one shard only:
// each shard that has them counts them once more.

/// Every invalid argument raises this, naming the argument, the expected and the
/// actual value, before anything is written. Sizes are at most 2^48 per dimension, and
/// a view's extent must fit 64-bit byte addressing. A valid call whose working memory
/// cannot be allocated (a huge view of stride 0, say) raises std::bad_alloc, also before
/// anything is written.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// out = softmax(scale * q k^T) v, fused and tiled: the N x M score matrix is never
/// materialized.
///   q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv], out [B, Hq, N, Dv].
/// Hq must be a multiple of Hkv; query head h reads key/value head h / (Hq / Hkv)
/// (multi-head, grouped-query and multi-query attention). With `causal`, the
/// diagonal is aligned bottom-right (KV-cache decoding). A query row that sees no
/// key gets zeros. Results are bitwise identical for every num_threads.
/// `out` must not share memory with q, k or v (checked on address ranges).
void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, const AttentionOptions& options = {});

/// As above, and also writes lse [B, Hq, N, 1]: the natural log of the sum of exp over
/// each row's visible scores (-inf for a row with no visible key), so that partial
/// results over disjoint key sets can be combined with merge_into.
void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, TensorView<float> lse, const AttentionOptions& options = {});

/// 16-bit data: bf16 or fp16 q, k, v and out, or fp32 q and out over a bf16 or fp16 KV
/// cache. Only these four combinations exist (each also with lse): any other mix of
/// element types is a compile error, as no overload matches it. Same contract as the
/// fp32 call, every option, score and shape included. The arithmetic:
///  - 16-bit inputs are widened exactly to fp32, except bf16 q and k on the levels with
///    bf16 products ("amx", "avx512bf16"): there they meet in bf16 products, each exact,
///    added in pairs with fp32 roundings, subnormal inputs read as zero. fp32 q is never
///    rounded to 16 bits and fp16 never narrowed to bf16 (unless allow_bf16_compute);
///  - scores, the running max and sum and the output accumulator are fp32;
///  - the probabilities are fp32, except where P.V runs in bf16: all-bf16 prefill (more
///    than 16 queries) on "amx" and "avx512bf16", and all-bf16 decoding with 16 or more
///    stacked rows on "amx". Those round them to bf16 before P.V, as FlashAttention does,
///    which moves an output by up to 2^-8 max|v| more;
///  - the output is rounded once, to nearest even, at the end (lse stays fp32).
/// So a 16-bit output is within about one of its ulps (2^-8 relative for bf16, 2^-11 for
/// fp16) of the fp64 result on the same 16-bit inputs, plus the term above where the
/// weights are rounded.
void attention(TensorView<const bf16> q, TensorView<const bf16> k, TensorView<const bf16> v, TensorView<bf16> out,
               const AttentionOptions& options = {});
void attention(TensorView<const fp16> q, TensorView<const fp16> k, TensorView<const fp16> v, TensorView<fp16> out,
               const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const bf16> k, TensorView<const bf16> v, TensorView<float> out,
               const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const fp16> k, TensorView<const fp16> v, TensorView<float> out,
               const AttentionOptions& options = {});
void attention(TensorView<const bf16> q, TensorView<const bf16> k, TensorView<const bf16> v, TensorView<bf16> out,
               TensorView<float> lse, const AttentionOptions& options = {});
void attention(TensorView<const fp16> q, TensorView<const fp16> k, TensorView<const fp16> v, TensorView<fp16> out,
               TensorView<float> lse, const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const bf16> k, TensorView<const bf16> v, TensorView<float> out,
               TensorView<float> lse, const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const fp16> k, TensorView<const fp16> v, TensorView<float> out,
               TensorView<float> lse, const AttentionOptions& options = {});

/// Gradients of out = attention(q, k, v, options) given dout = dL/dout: the fused,
/// tiled FlashAttention-2 backward, with no N x M buffer.
///   out and lse come from the forward call with the same arguments (the lse overload);
///   dout is shaped like out; dq like q, dk like k, dv like v. With grouped-query
///   attention, dk and dv sum over the query heads that share each KV head.
/// Scores: Score::dot_product and Score::gaussian (Score::additive raises Error: it has no
/// backward yet). Every option of the forward applies; masks, ALiBi slopes, key lengths
/// and sinks are constants and get no gradient. A row with no visible key contributes
/// nothing, and a key no row sees gets dk = dv = 0.
/// dq, dk and dv are overwritten (not accumulated into); they must not share memory with
/// each other or with any input (checked, like every other argument, before anything is
/// written). fp32, computed in fp32; results are bitwise identical for every num_threads.
/// Under allow_bf16_compute, with the dot product, on the avx512bf16 and amx levels: q,
/// k, v and dout are rounded to bf16 (to nearest even; beyond bf16's largest finite, to
/// inf) and the call computes what the bf16 overload below computes on the rounded values
/// (out read as it is, lse and the gradients fp32). When out and lse are the forward's on
/// those rounded values (a forward call under the option on these levels rounds prefill
/// so, and on "amx" decoding with 16 or more stacked rows; it computes other fp32 calls
/// exactly), that is within the bf16 overload's bound, without its final rounding, of the
/// exact gradients at the rounded inputs; else P moves by the difference of the lse too.
/// Elsewhere the option changes nothing here.
void attention_backward(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
                        TensorView<const float> out, TensorView<const float> lse,
                        TensorView<const float> dout,
                        TensorView<float> dq, TensorView<float> dk, TensorView<float> dv,
                        const AttentionOptions& options = {});

/// The same for 16-bit training: bf16 (or fp16) q, k, v, out and dout, as the 16-bit
/// forward takes and writes them, its fp32 lse, and gradients of the same 16-bit type.
/// The inputs are widened exactly and everything above runs in fp32 on them, in the same
/// order (with grouped-query heads, dk and dv are summed in fp32); each gradient element
/// is then rounded once, to nearest even. So a 16-bit gradient is the fp32 backward's on
/// the widened inputs, rounded: within half an ulp of it (2^-8 relative for bf16, 2^-11
/// for fp16). Two exceptions. First, bf16 with the dot product, when dispatch runs the
/// avx512bf16 or amx level, takes its five products by vdpbf16ps, as the forward does on those
/// levels. S = q k^T and dP = dout v^T multiply the bf16 inputs exactly and add the
/// products in pairs with the roundings of FMAs; P and dS are rounded to bf16 (2^-8 of
/// each term at most) before dV = P^T dout, dK = dS^T q and dQ = dS k; vdpbf16ps reads
/// and writes subnormals as zero. Such a gradient is within the fp32 backward's error
/// bound plus 2^-8 of the sum of its terms' magnitudes, plus its final rounding, but not
/// bitwise the fp32 backward's. Zero weights still keep inf and NaN in rows and keys that
/// a row cannot see out of the result. Same checks, options, scores and determinism as
/// the fp32 call. Second, fp16 data under allow_bf16_compute, with the dot product, on
/// those levels: rounded to bf16 and computed as the fp32 call under the option computes
/// on the widened fp16 values, each gradient then rounded once to fp16.
void attention_backward(TensorView<const bf16> q, TensorView<const bf16> k, TensorView<const bf16> v,
                        TensorView<const bf16> out, TensorView<const float> lse, TensorView<const bf16> dout,
                        TensorView<bf16> dq, TensorView<bf16> dk, TensorView<bf16> dv,
                        const AttentionOptions& options = {});
void attention_backward(TensorView<const fp16> q, TensorView<const fp16> k, TensorView<const fp16> v,
                        TensorView<const fp16> out, TensorView<const float> lse, TensorView<const fp16> dout,
                        TensorView<fp16> dq, TensorView<fp16> dk, TensorView<fp16> dv,
                        const AttentionOptions& options = {});

/// Combines (out, lse), computed over one set of keys, with (part_out, part_lse), computed
/// over a disjoint set, in place, exactly as if attention had run over the union: the way
/// to shard a long context across calls, processes or machines. Merging with an empty
/// side (lse = -inf) leaves the other side unchanged.
void merge_into(TensorView<float> out, TensorView<float> lse, TensorView<const float> part_out,
                TensorView<const float> part_lse);

/// Nadaraya-Watson kernel regression.
enum class Kernel {
  gaussian,      // exp(-u^2 / 2)
  laplacian,     // exp(-u)
  boxcar,        // 1 if u <= 1
  epanechnikov,  // max(0, 1 - u^2)
};
struct KernelRegressionOptions {
  Kernel kernel = Kernel::gaussian;
  float bandwidth = 1.0f;  // h > 0
  int num_threads = 0;
};

/// y_pred_i = sum_j K(|x_i - x_j| / h) y_j / sum_j K(|x_i - x_j| / h), through the fused
/// attention kernels (the score is log K of the distance). x_query [B, H, N, D],
/// x_train [B, H, M, D], y_train [B, H, M, Dv], y_pred [B, H, N, Dv]. A query with no
/// training point inside the kernel's support gets NaN (the estimate is undefined there).
void nadaraya_watson(TensorView<const float> x_query, TensorView<const float> x_train,
                     TensorView<const float> y_train, TensorView<float> y_pred,
                     const KernelRegressionOptions& options = {});

namespace reference {
/// The naive oracle: materializes the full score matrix of each head, then a row
/// softmax and the weighted sum, all in double. Same contract as flashcpu::attention,
/// every option included.
void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, TensorView<float> lse, const AttentionOptions& options = {});
/// The 16-bit combinations: inputs widened exactly to double, the output rounded once
/// (by way of float) to its type.
void attention(TensorView<const bf16> q, TensorView<const bf16> k, TensorView<const bf16> v, TensorView<bf16> out,
               const AttentionOptions& options = {});
void attention(TensorView<const fp16> q, TensorView<const fp16> k, TensorView<const fp16> v, TensorView<fp16> out,
               const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const bf16> k, TensorView<const bf16> v, TensorView<float> out,
               const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const fp16> k, TensorView<const fp16> v, TensorView<float> out,
               const AttentionOptions& options = {});
void attention(TensorView<const bf16> q, TensorView<const bf16> k, TensorView<const bf16> v, TensorView<bf16> out,
               TensorView<float> lse, const AttentionOptions& options = {});
void attention(TensorView<const fp16> q, TensorView<const fp16> k, TensorView<const fp16> v, TensorView<fp16> out,
               TensorView<float> lse, const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const bf16> k, TensorView<const bf16> v, TensorView<float> out,
               TensorView<float> lse, const AttentionOptions& options = {});
void attention(TensorView<const float> q, TensorView<const fp16> k, TensorView<const fp16> v, TensorView<float> out,
               TensorView<float> lse, const AttentionOptions& options = {});

/// The materialized backward oracle: per head the full P, dP and dS matrices in double,
/// with P recomputed in double from q and k (out and lse are checked, not used), so it
/// gives the exact gradient of reference::attention at these inputs. Same contract as
/// flashcpu::attention_backward.
void attention_backward(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
                        TensorView<const float> out, TensorView<const float> lse,
                        TensorView<const float> dout,
                        TensorView<float> dq, TensorView<float> dk, TensorView<float> dv,
                        const AttentionOptions& options = {});

/// The N x M attention weights of any configuration, weights [B, Hq, N, M] (rows with no
/// visible key are zero): for looking at what attention does on small problems.
void attention_weights(TensorView<const float> q, TensorView<const float> k, TensorView<float> weights,
                       const AttentionOptions& options = {});

/// Nadaraya-Watson by a plain double loop over every (query, training point) pair.
void nadaraya_watson(TensorView<const float> x_query, TensorView<const float> x_train,
                     TensorView<const float> y_train, TensorView<float> y_pred,
                     const KernelRegressionOptions& options = {});
}  // namespace reference

/// The instruction set the kernels run with: "amx", "avx512bf16", "avx512", "avx2" or
/// "sse2". Chosen once from the CPU's features; the environment variable FLASHCPU_ISA
/// (one of those names) caps it at a lower level.
///
/// "avx512bf16" (AVX512-BF16's vdpbf16ps) runs wherever the CPU has it. "amx" (Intel AMX
/// tiles) runs where the CPU has AMX-TILE and AMX-BF16, the OS enables the tile state and
/// Linux grants it to the process (the library asks once); else the level below runs,
/// and this says which. The two take bf16 q, k, v and out with the
/// dot-product score, for prefill (more than 16 query rows), with every option: masks,
/// causal, windows, key lengths, softcap, ALiBi, sinks and lse. "amx" also takes
/// decoding (16 query rows or fewer) when the query heads per KV head times the query
/// rows make 16 or more (batched or speculative decoding); fewer such rows are bound by
/// memory and run the vector kernels. Q·Kᵀ multiplies q and k as given, in fp32 sums
/// (the scale multiplies the fp32 scores). P·V runs on the tiles ("amx") or by vdpbf16ps
/// ("avx512bf16") too, with the softmax weights rounded to bf16 (relative error 2^-8 per
/// weight; the row sums stay fp32; on the tiles the exponential before that rounding is
/// good to 3e-6 relative, not to an fp32 ulp). As the two instructions define them, both products
/// read a bf16 value below 2^-126 in size (a subnormal) as zero and flush a partial sum
/// below 2^-126 to zero. Every other call at those
/// levels (other types without allow_bf16_compute, the Gaussian and additive scores,
/// kernel regression, decoding fewer rows) runs the level below, and active_isa() still
/// names the level.
std::string active_isa();

/// Whether this CPU (and OS) can run the kernels of `isa` ("amx", "avx512bf16",
/// "avx512", "avx2", "sse2"). For "amx" that includes Linux granting the process the
/// tile state.
bool isa_supported(const std::string& isa);

/// Tile sizes the fused kernel uses for one head dimension on the active ISA.
struct TileConfig {
  int block_rows;  // queries per block (used rounded up to the micro-kernel's rows: 6 on AVX-512, 4 below)
  int block_keys;  // keys per block (used rounded up to the micro-kernel's key panel: 64 on AVX-512, 16 or 8 below)
};

/// The tile sizes attention() uses for head dimension `head_dim` on the active ISA, for
/// fp32 calls: from a loaded tuning file when it has an entry, else the built-in defaults.
/// (On "amx" and "avx512bf16", fp32 calls run the "avx512" kernels and their tiles; the
/// entries under those levels' own names drive their bf16 kernels.)
TileConfig tile_config(std::int64_t head_dim);

/// Loads a tuning file written by the flashcpu-tune tool (replacing any earlier
/// one). Raises Error if the file cannot be read or parsed. The environment
/// variable FLASHCPU_TUNING_FILE names a file loaded on first use, this call's included
/// (before its own file, which it therefore never replaces); while that file cannot be
/// read or parsed, this call raises its Error and loads nothing. Its lines are
/// "<isa> <head_dim> <block_rows> <block_keys>" (tiles) and
/// "<isa> min_flops_per_thread <flops>" (see min_flops_per_thread).
void load_tuning(const std::string& path);

/// The least work, in FLOPs (2 B Hq N M (D + Dv) for a forward, causal or not; 2.5 times
/// that for a backward), that a call on the kernels of `isa` gives each thread when its
/// num_threads is 0: such a call takes floor(FLOPs / this) threads, at least 1 and at most
/// OpenMP's default. From the tuning file's entry for `isa` (flashcpu-tune measures it),
/// else 2^20, measured on a Zen 5. (On "amx" and "avx512bf16", the calls their bf16
/// kernels do not take run the "avx512" kernels and take that level's entry: fp32 and fp16
/// calls, and bf16 decoding with fewer stacked rows than a tile, or with other scores.)
/// Raises Error for an unknown ISA name.
double min_flops_per_thread(const std::string& isa);

/// Sets (or, with nullopt, removes) the tile sizes for one ISA and head dimension
/// in the process's tuning table. Used by the tuner; raises Error on invalid sizes.
void set_tile_config(const std::string& isa, std::int64_t head_dim, std::optional<TileConfig> tiles);

// Threads: every function here may be called from any number of threads at once,
// including from inside an OpenMP parallel region (the inner team is then as nested
// parallelism allows), with any num_threads: a call that runs on one thread does all of
// its work on the calling thread, whatever team that thread belongs to. The tuning table is guarded by a reader-writer lock: load_tuning
// replaces it whole and set_tile_config one entry, each under the write lock, and an
// attention call reads it once (tiles and the least work per thread), under the read
// lock, when it plans. So a call sees the table from before a concurrent change or from
// after it, never a mix. Tile sizes change
// results in their last bits (the order of the online softmax's blocks); num_threads
// never does.

}  // namespace flashcpu
