// What the two OpenMP drivers (prefill.cpp, decode.cpp) share: the call's plan, views of
// any element type, and the job fields that depend only on the call or on the head.
#pragma once

#include <flashcpu/flashcpu.hpp>

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/kernel_api.hpp"
#include "validate.hpp"

namespace flashcpu::detail {

inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

template <class T>
constexpr DType dtype_of() {
  using U = std::remove_const_t<T>;
  return std::is_same<U, bf16>::value ? DType::bf16 : std::is_same<U, fp16>::value ? DType::f16 : DType::f32;
}
inline std::int64_t element_bytes(DType type) { return type == DType::f32 ? 4 : 2; }

/// A TensorView with its element type as a value, so that one driver serves every type.
struct AnyView {
  void* data;  // const for inputs: never written through
  DType type;
  std::array<std::int64_t, 4> shape, strides;

  template <class T>
  static AnyView of(const TensorView<T>& view) {
    return {const_cast<std::remove_const_t<T>*>(view.data), dtype_of<T>(), view.shape, view.strides};
  }
  /// Address of row i of head h of batch b. Empty views may have null data: their rows
  /// are never read or written, and no offset is ever applied to a null pointer.
  void* row(std::int64_t b, std::int64_t h, std::int64_t i) const {
    return data ? static_cast<char*>(data) + element_bytes(type) * (b * strides[0] + h * strides[1] + i * strides[2])
                : nullptr;
  }
  /// Row i of head h of batch b as a source for the packers.
  SourceRows rows_from(std::int64_t b, std::int64_t h, std::int64_t i) const {
    return {row(b, h, i), type, strides[2], strides[3]};
  }
};

/// The views of one call: q, k, v, out (of q's type), lse (fp32, or null data).
struct CallViews {
  AnyView q, k, v, out;
  TensorView<float> lse;
  bool has_lse;

  /// lse of row i of head h of batch b, or null without lse.
  float* lse_at(std::int64_t b, std::int64_t h, std::int64_t i) const {
    return has_lse ? lse.data + b * lse.strides[0] + h * lse.strides[1] + i * lse.strides[2] : nullptr;
  }
};

// Everything one call needs to know, fixed before any thread starts.
struct Plan {
  const KernelTable* kernels;
  AttentionShape shape;
  std::int64_t group;  // query heads per KV head
  std::int64_t block_rows, block_keys;
  double min_flops_per_thread;    // from the same read of the tuning table as the tiles
  std::int64_t value_dim_padded;  // Dv rounded up to whole vectors
  bool v_in_place;                // V rows already whole vectors of contiguous elements (decode reads them so)
  // Prefill reads V in place only when, besides, every row starts on a 64-byte line: its
  // P.V loop loads each V row once per 6 query rows, and split loads slowed P64 with
  // 16-byte aligned buffers by 7% (118 -> 127 ms, 1 thread). Packing is one pass over V.
  bool v_in_place_prefill;
  // The score, prepared for the kernels (see JobScore).
  ScoreKind kind;
  bool natural_units;
  Transform transform;
  float q_factor;         // multiplies q when packing (dot: scale; Gaussian: 2 scale; in log2 units unless natural)
  float bias_scale;       // Gaussian: multiplies |q - c|^2 and |k - c|^2 into the row and key biases
  float distance_factor;  // exact-distance Gaussian: -scale (in log2 units unless natural)
  bool centered;          // Gaussian: subtract the head's first key from q and k (see load_center)
  std::vector<float> additive_weights;  // scale * w (in log2 units unless natural)
  float empty_value;
};

/// Decoding shapes: a handful of query rows per head (16 or fewer). The decode driver
/// stacks the query heads of a KV head as rows, reads K and V once per KV head and splits
/// the keys across threads.
bool decoding_shape(const AttentionShape& s);

/// Stacked rows (query heads per KV head x queries) up to which a call on the vector
/// kernels runs on the decode driver even when it is not a decoding shape: a short prompt
/// or a draft of speculative tokens against a cache. Prefill packs each KV head whole, in
/// working memory the call maps and the system zeroes, to share it among that head's rows;
/// with this few rows the decode driver's blocks, read in place or packed one at a time,
/// cost less. 2 threads, Zen 5 guest, medians of 40 calls, prefill / decode driver: 4 heads
/// N = 40 M = 2048 D = 64 0.83-0.91 / 0.41-0.43 ms; 8 heads N = 33 M = 1024 D = 128 causal
/// 1.00 / 0.72; 16/8 heads N = 24 M = 2048 D = 64 1.15-1.18 / 0.71-0.74; 8 heads N = 48
/// M = 4096 D = 128 4.39-4.47 / 4.42-4.49; past it, 64 rows: 8 heads N = 64 M = 4096 D = 128
/// 5.54-5.66 / 6.01-6.33, 32/8 heads N = 17 (68 rows) 5.17-5.37 / 5.40-5.88.
constexpr std::int64_t kDecodeMaxStackedRows = 48;

/// Whether a call planned on `kernels` runs on the decode driver: decoding shapes, and on
/// kernels without bf16 products (whose prefill those shapes keep, see bf16_products_take)
/// any call with kDecodeMaxStackedRows stacked rows or fewer.
bool use_decode_path(const AttentionShape& s, const KernelTable& kernels);

/// Whether V (its type and layout) can be read where it is by the vector P.V tiles of
/// `kernels`: the table's type, contiguous rows, value_dim a multiple of value_columns.
bool values_in_place(const KernelTable& kernels, const AttentionShape& s, const AnyView& v);

/// Whether a variant with bf16 products (kernels.bf16_products: AMX tiles, vdpbf16ps)
/// takes the call, with q and k of these types and this V; else the level below runs it.
bool bf16_products_take(const KernelTable& kernels, const AttentionShape& s, DType q, DType k, const AnyView& v,
                        Transform transform);

/// The variant that runs a call with q and k of these types and this V at the active
/// level: the level's table for k's type, the bf16 one under allow_bf16_compute when it
/// takes the call, and the levels below for what a bf16-product variant does not take.
/// The benchmarks and the tuner name and tune it.
const KernelTable& kernels_for_call(const AttentionShape& s, DType q, DType k, const AnyView& v, Transform transform);

Plan make_plan(const KernelTable& kernels, const AttentionShape& s, const AnyView& v, Transform transform,
               float empty_value, bool regression);

/// The Gaussian's expansion center for (batch b, KV head hkv): see plan.cpp.
void load_center(const Plan& plan, const AnyView& k, std::int64_t b, std::int64_t hkv, float* center);

/// Whether keys packed with this spread need the exact-difference Gaussian (plan.cpp).
bool needs_exact_distance(const Plan& plan, float spread);

/// Points the job at the Gaussian form chosen for the keys just packed.
void bind_distance_form(const Plan& plan, QueryBlockJob& job, bool exact, float* key_bias, float* row_bias);

/// Packs query rows [first_row, first_row + rows) of heads first_head .. + heads_per_row
/// (stacked) for a tile of mr rows, in the exact-distance form or the expanded one.
void pack_queries(const Plan& plan, const AnyView& q, std::int64_t b, std::int64_t first_head,
                  std::int64_t heads_per_row, std::int64_t first_row, std::int64_t rows, int mr, const float* center,
                  bool exact_distance, float* packed, float* row_bias);

/// Which keys each query of batch b sees: the causal and window bounds and key_lengths[b].
JobVisibility visibility(const AttentionShape& s, std::int64_t b);

/// The masks at (batch b, query head first_head), with their broadcast strides.
JobMasks masks_at(const AttentionShape& s, std::int64_t b, std::int64_t first_head);

/// The job fields that depend only on the call (shape, score, visibility rules, output
/// type) and on the thread's scratch (set by the caller).
QueryBlockJob base_job(const Plan& plan, const CallViews& views);

/// The job fields that depend on (batch, first head of the rows).
void bind_heads(const Plan& plan, QueryBlockJob& job, std::int64_t b, std::int64_t first_head);

/// Threads for a call of `flops` floating-point operations: num_threads when the caller
/// set it; else OpenMP's default, but no more than one thread per min_flops_per_thread
/// (the tuning table's entry for the kernels' ISA: Plan, tuning.hpp).
int thread_count(int requested, double flops, double min_flops_per_thread);
/// The FLOPs of a forward call's two products, 4 B Hq N M D (Dv = D), for thread_count.
double forward_flops(const AttentionShape& s);

/// The threads of one call's parallel work: thread `index` of `size`. The drivers split
/// their items with it (`first`, `past`, or a shared ItemQueue), never with OpenMP's
/// worksharing constructs or omp_get_thread_num(): a one-thread call runs its body on the
/// calling thread (run_parallel), and when that thread belongs to the caller's own
/// parallel region those would bind to the caller's team, splitting one call's items
/// among threads that are each making a call of their own.
struct Team {
  int index, size;
  /// Items [first(n), past(n)) of n: the thread's static contiguous share.
  std::int64_t first(std::int64_t n) const { return n / size * index + std::min<std::int64_t>(index, n % size); }
  std::int64_t past(std::int64_t n) const { return first(n) + n / size + (index < n % size ? 1 : 0); }
};

/// Items 0 .. n - 1 handed out one at a time to whichever thread of a call's team asks
/// next (a dynamic schedule of chunk 1). Shared by the team: declared before run_parallel.
class ItemQueue {
 public:
  explicit ItemQueue(std::int64_t n) : n_(n) {}
  /// The next item, or false when none is left.
  bool take(std::int64_t* item) {
    *item = next_.fetch_add(1, std::memory_order_relaxed);
    return *item < n_;
  }

 private:
  std::int64_t n_;
  std::atomic<std::int64_t> next_{0};
};

/// Items 0 .. n - 1 in the team's static contiguous shares (Team::first and past), each
/// thread taking its own from the front; a thread whose share is done takes items from the
/// back of the share with the most left, one at a time. So a thread on a slower core (a
/// busy SMT sibling or host, interrupts, an efficiency core) does not hold up the call,
/// while the consecutive items a share keeps together (one packed KV head) mostly stay on
/// one thread. Which thread runs an item never changes its result. Declared before
/// run_parallel, for a team of at most `threads` (a smaller team, as OpenMP may give,
/// takes the absent threads' shares so). Thieves leave a thread that has begun on its share
/// at least `keep` items of it, for itself (the prefill keeps 1: a thief would pack
/// another KV head for it, and that lost where the threads ran even); a best effort, since
/// a thief may not yet see that the owner has begun. When n / threads + 1 reaches
/// `packed_below` (2^32 at most: the shares are packed in one word), every share is taken
/// from the front alone, by owner and thieves, without kept items (tests lower the bound).
class StealingShares {
 public:
  StealingShares(std::int64_t n, int threads, std::int64_t keep = 0,
                 std::int64_t packed_below = std::int64_t(1) << 32);
  /// The thread's next item, or false when every share is empty.
  bool take(const Team& team, std::int64_t* item);
  /// The item the thread would take next from its own share, or -1: a hint (prefetching).
  std::int64_t peek(const Team& team) const;

 private:
  // A share's remaining items [lo, hi), relative to its first item, in one word: lo in
  // the low 32 bits, hi in the high ones; or, not packed, the next item in `next`.
  struct alignas(64) Share {
    std::atomic<std::uint64_t> range{0};
    std::atomic<std::int64_t> next{0};  // not packed: the next item
    std::atomic<bool> begun{false};      // its owner has asked for an item
    std::int64_t first = 0, past = 0;
  };
  std::uint64_t keep_;
  bool packed_;
  std::vector<Share> shares_;
};

/// Runs body(team) on `threads` threads, as the body of an OpenMP parallel region, or
/// called directly (team {0, 1}) when one thread does the work. libgomp's region wakes
/// the team through a futex even when the team is the caller alone: 1.2 us per region on
/// a 2-core KVM guest (Zen 5, empty regions, median of 20000), against 20-30 ns for the
/// call, a sixth of a 16-head N = 16 call on one thread. Inside a caller's parallel region
/// that cannot nest, OpenMP gives the region a team of one, and `team` says so.
template <class Body>
void run_parallel(int threads, Body&& body) {
  if (threads <= 1) {
    body(Team{0, 1});
    return;
  }
#pragma omp parallel num_threads(threads)
  body(Team{omp_get_thread_num(), omp_get_num_threads()});
}

/// The drivers.
void run_prefill(const Plan& plan, const CallViews& views);
void run_decode(const Plan& plan, const CallViews& views);

/// What the decode driver runs for a plan, K as `k` lays it out (its strides decide
/// whether K is read in place): e.g. "decode 4-row tiles, K in place, bc=256". The
/// benchmarks' labels name it, since the variant's name is that of its prefill tiles.
std::string describe_decode(const Plan& plan, const AnyView& k);

/// The fused backward's schedules (src/backward.cpp). All give bitwise the same gradients.
enum class BackwardSchedule {
  automatic,           // the one below that suits the call
  whole_heads,         // the one pass, a thread per (batch, KV head)
  key_blocks_in_turn,  // the one pass, threads per chunk of key blocks, taking turns at dQ
  two_passes,          // dK and dV per key block, then dQ per query block
};
/// attention_backward (fp32) on a given schedule and, for the one pass, chunks of a given
/// number of key blocks (0: the driver's choice), so that tests reach each one on small
/// shapes.
void attention_backward_scheduled(BackwardSchedule schedule, std::int64_t chunk_blocks, TensorView<const float> q,
                                  TensorView<const float> k,
                                  TensorView<const float> v, TensorView<const float> out,
                                  TensorView<const float> lse, TensorView<const float> dout, TensorView<float> dq,
                                  TensorView<float> dk, TensorView<float> dv, const AttentionOptions& options);
/// The kernels attention_backward runs on data of type `data` (q's: f32, bf16 or f16):
/// for the dot product on bf16 data, or on any data under allow_bf16_compute, the
/// vdpbf16ps variant (its products by bf16 pairs) where the level has it; else the fp32
/// variant.
const KernelTable& backward_kernels(DType data, Score score, bool allow_bf16_compute);
/// attention_backward (T: float, bf16 or fp16) on given kernels (a table with a backward:
/// an fp32 variant, or one with pair products for the dot product), schedule and chunks,
/// for tests.
template <class T>
void attention_backward_with(const KernelTable& kernels, BackwardSchedule schedule, std::int64_t chunk_blocks,
                             TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
                             TensorView<const T> out, TensorView<const float> lse, TensorView<const T> dout,
                             TensorView<T> dq, TensorView<T> dk, TensorView<T> dv, const AttentionOptions& options);

}  // namespace flashcpu::detail
