// The public entry points: validate, plan the tiles and the thread split, pack, and run
// the dispatched kernel on each work item; merge split-KV partials; kernel regression.
#include <flashcpu/flashcpu.hpp>

#include <emmintrin.h>  // SSE2, part of every x86-64: the 4 x 4 transposes of the K packing
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "dispatch.hpp"
#include "tuning.hpp"
#include "validate.hpp"

namespace flashcpu {
namespace {

using detail::AttentionShape;
using detail::KernelTable;
using detail::QueryBlockJob;

constexpr double kLog2e = 1.4426950408889634;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned scratch, allocated before any parallel region so that a failure is
// reported to the caller (std::bad_alloc) rather than inside OpenMP, and returned to the
// system when the call ends.
//
// Scratch of kMapBytes or more is mapped for the call and unmapped after it. Through
// malloc, glibc's adaptive mmap threshold (raised to the size of each large block freed,
// up to 32 MiB) serves the next call's scratch from the heap instead, and the heap keeps
// its pages: measured, 20 calls at N = M = 16384, D = 64, 2 threads left the process
// 113 MiB above its inputs (0.3 MiB with the threshold pinned, as mapping does here).
// The price is faulting the pages in on every call, about 0.25 us per 4 KiB page: 0.2%
// of a P64 call (docs/performance-notes.md). Smaller scratch stays with malloc, whose
// reuse of small blocks is free and bounded.
constexpr std::size_t kMapBytes = std::size_t(1) << 20;

class AlignedBuffer {
 public:
  explicit AlignedBuffer(std::int64_t floats)
      : bytes_(std::size_t(round_up(std::max<std::int64_t>(floats, 1), 16)) * sizeof(float)), mapped_(bytes_ >= kMapBytes) {
    void* p = nullptr;
    if (mapped_) {
      p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);  // page aligned
      if (p == MAP_FAILED) p = nullptr;
    } else {
      p = std::aligned_alloc(64, bytes_);
    }
    if (p == nullptr) throw std::bad_alloc();
    memory_ = static_cast<float*>(p);
  }
  ~AlignedBuffer() {
    if (mapped_)
      munmap(memory_, bytes_);
    else
      std::free(memory_);
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* get() const { return memory_; }

 private:
  std::size_t bytes_;
  bool mapped_;
  float* memory_ = nullptr;
};

// Address of row i of head h of batch b. Empty views may have null data: their rows are
// never read or written, and no offset is ever applied to a null pointer.
template <class T>
T* element(const TensorView<T>& view, std::int64_t b, std::int64_t h, std::int64_t i) {
  return view.data ? view.data + b * view.strides[0] + h * view.strides[1] + i * view.strides[2] : nullptr;
}

// M = 0 (no keys at all): every row sees no key.
void write_empty_rows(const AttentionShape& s, const TensorView<float>& out, const TensorView<float>* lse,
                      float empty_value) {
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.q_heads; ++h)
      for (std::int64_t i = 0; i < s.q_len; ++i) {
        float* row = element(out, b, h, i);
        for (std::int64_t c = 0; c < s.value_dim; ++c) row[c * out.strides[3]] = empty_value;
        if (lse) *element(*lse, b, h, i) = kNegInf;
      }
}

int thread_count(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

// Everything one call needs to know, fixed before any thread starts.
struct Plan {
  const KernelTable* kernels;
  AttentionShape shape;
  std::int64_t group;             // query heads per KV head
  std::int64_t block_rows, block_keys;
  std::int64_t value_dim_padded;  // Dv rounded up to whole vectors
  bool v_in_place;                // V rows already whole vectors of contiguous floats (decode reads them so)
  // Prefill reads V in place only when, besides, every row starts on a 64-byte line: its
  // P.V loop loads each V row once per 6 query rows, and split loads slowed P64 with
  // 16-byte aligned buffers by 7% (118 -> 127 ms, 1 thread). Packing is one pass over V.
  bool v_in_place_prefill;
  // The score, prepared for the kernels (see QueryBlockJob).
  detail::ScoreKind kind;
  bool natural_units;
  detail::Transform transform;
  float q_factor;    // multiplies q when packing (dot: scale; Gaussian: 2 scale; in log2 units unless natural)
  float bias_scale;  // Gaussian: multiplies |q - c|^2 and |k - c|^2 into the row and key biases
  float distance_factor;  // exact-distance Gaussian: -scale (in log2 units unless natural)
  bool centered;     // Gaussian: subtract the head's first key from q and k (see pack_* below)
  std::vector<float> additive_weights;  // scale * w (in log2 units unless natural)
  float empty_value;
};

Plan make_plan(const KernelTable& kernels, const AttentionShape& s, const TensorView<const float>& v,
               detail::Transform transform, float empty_value, bool regression) {
  Plan plan{};
  plan.kernels = &kernels;
  plan.shape = s;
  plan.group = s.kv_heads > 0 ? s.q_heads / s.kv_heads : 1;
  const TileConfig tiles = detail::tiles_for(kernels, s.head_dim);
  // Short sequences get blocks no larger than they need, so that small problems still
  // split into enough work items and no time goes to padding.
  plan.block_rows = round_up(std::min<std::int64_t>(tiles.block_rows, std::max<std::int64_t>(s.q_len, 1)), kernels.tile_rows);
  plan.block_keys = std::min(round_up(tiles.block_keys, kernels.panel_keys),
                             round_up(std::max<std::int64_t>(s.kv_len, 1), kernels.panel_keys));
  plan.value_dim_padded = round_up(s.value_dim, kernels.vector_floats);
  plan.v_in_place = v.strides[3] == 1 && s.value_dim == plan.value_dim_padded;
  const auto on_lines = [](std::int64_t floats) { return floats * std::int64_t(sizeof(float)) % 64 == 0; };
  plan.v_in_place_prefill = plan.v_in_place && reinterpret_cast<std::uintptr_t>(v.data) % 64 == 0 &&
                            on_lines(v.strides[0]) && on_lines(v.strides[1]) && on_lines(v.strides[2]);

  plan.transform = s.softcap > 0 ? detail::Transform::softcap : transform;
  // Nonlinear terms need the natural-log score; otherwise log2(e) is folded in up front.
  plan.natural_units = plan.transform != detail::Transform::none || s.alibi_slopes || s.mask.data || s.bool_mask.data;
  const double unit = plan.natural_units ? 1.0 : kLog2e;
  // Gaussian: -scale |q - k|^2. From exact differences where small distances must be
  // accurate (kernel regression, whose transforms take square roots and logs of them) or
  // where D is small enough that the extra subtraction costs little next to the exp.
  // Otherwise expanded as 2 scale q.k - scale |q|^2 - scale |k|^2: a dot product plus a
  // row bias and a key bias, as fast as the dot product (after centering, see load_center).
  const bool exact_distance =
      s.score == Score::gaussian && (regression || s.head_dim < 32);
  plan.kind = s.score == Score::additive ? detail::ScoreKind::additive
              : exact_distance           ? detail::ScoreKind::squared_distance
                                         : detail::ScoreKind::dot;
  plan.centered = s.score == Score::gaussian && !exact_distance;
  // q enters tanh(q + k) (additive) and q - k (exact distance) as it is.
  plan.q_factor = s.score == Score::additive || exact_distance
                      ? 1.0f
                      : float((s.score == Score::gaussian ? 2.0 : 1.0) * s.scale * unit);
  plan.bias_scale = float(-double(s.scale) * unit);
  plan.distance_factor = float(-double(s.scale) * unit);
  if (s.score == Score::additive)
    for (std::int64_t d = 0; d < s.head_dim; ++d)
      plan.additive_weights.push_back(float(double(s.scale) * unit * s.additive_weights[d]));
  plan.empty_value = empty_value;
  return plan;
}

// Gaussian scores expand |q - k|^2 into q.k and norms, which cancels badly when the points
// sit far from the origin (|k|^2 ~ 1e6 against distances ~ 1). Distances do not change
// under translation, so both sides are shifted by the head's first key first: the norms
// are then of the size of the distances themselves.
void load_center(const Plan& plan, const TensorView<const float>& k, std::int64_t b, std::int64_t hkv, float* center) {
  const std::int64_t D = plan.shape.head_dim;
  bool finite = true;
  for (std::int64_t d = 0; d < D; ++d) {
    center[d] = plan.centered && plan.shape.kv_len > 0 ? element(k, b, hkv, 0)[d * k.strides[3]] : 0.0f;
    finite = finite && std::isfinite(center[d]);
  }
  // Key 0 may be an excluded slot holding NaN or inf (a stale KV cache): it must not
  // become every score's reference point. The origin then serves, with the exact
  // distances if the keys' spread calls for them.
  if (!finite)
    for (std::int64_t d = 0; d < D; ++d) center[d] = 0.0f;
}

// K of keys [0, keys) as panels of `nr` keys: panel p is head_dim rows of nr floats (keys
// contiguous), zero past the last key, so the S micro-kernel loads whole vectors. With a
// center (Gaussian), packs k - center, writes key_bias[j] = bias_scale * |k_j - center|^2
// and returns the largest |k_j - center|^2 (else 0).
float pack_key_panels(const float* k, std::int64_t row_stride, std::int64_t col_stride, std::int64_t keys,
                     std::int64_t head_dim, int nr, const Plan& plan, const float* center, float* panels,
                     float* key_bias) {
  const std::int64_t num_panels = (keys + nr - 1) / nr;
  if (!plan.centered && col_stride == 1) {
    // The common case, a plain transpose of contiguous rows, in 4 x 4 blocks held in SSE
    // registers: short N=256 (H=16, D=64) spent 6% of its time here with scalar copies.
    for (std::int64_t p = 0; p < num_panels; ++p) {
      float* panel = panels + p * head_dim * nr;
      const float* first = k + p * nr * row_stride;
      const std::int64_t valid = std::min<std::int64_t>(nr, keys - p * nr);
      const std::int64_t whole = valid / 4 * 4, d_whole = head_dim / 4 * 4;
      for (std::int64_t c = 0; c < whole; c += 4) {
        const float* src = first + c * row_stride;
        std::int64_t d = 0;
        for (; d < d_whole; d += 4) {
          __m128 r0 = _mm_loadu_ps(src + d), r1 = _mm_loadu_ps(src + row_stride + d);
          __m128 r2 = _mm_loadu_ps(src + 2 * row_stride + d), r3 = _mm_loadu_ps(src + 3 * row_stride + d);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          _mm_storeu_ps(panel + d * nr + c, r0);
          _mm_storeu_ps(panel + (d + 1) * nr + c, r1);
          _mm_storeu_ps(panel + (d + 2) * nr + c, r2);
          _mm_storeu_ps(panel + (d + 3) * nr + c, r3);
        }
        for (; d < head_dim; ++d)
          for (int t = 0; t < 4; ++t) panel[d * nr + c + t] = src[t * row_stride + d];
      }
      for (std::int64_t d = 0; d < head_dim; ++d) {
        for (std::int64_t c = whole; c < valid; ++c) panel[d * nr + c] = first[c * row_stride + d];
        for (std::int64_t c = valid; c < nr; ++c) panel[d * nr + c] = 0.0f;
      }
    }
    return 0.0f;
  }
  if (!plan.centered) {
    // A plain transpose from strided columns: written out separately because the norms
    // below form a serial chain of dependent additions that would cost 4 cycles per element.
    for (std::int64_t p = 0; p < num_panels; ++p) {
      float* panel = panels + p * head_dim * nr;
      const std::int64_t valid = std::min<std::int64_t>(nr, keys - p * nr);
      for (std::int64_t d = 0; d < head_dim; ++d) {
        float* dst = panel + d * nr;
        const float* src = k + p * nr * row_stride + d * col_stride;
        for (std::int64_t c = 0; c < valid; ++c) dst[c] = src[c * row_stride];
        for (std::int64_t c = valid; c < nr; ++c) dst[c] = 0.0f;
      }
    }
    return 0.0f;
  }
  float spread = 0.0f;
  for (std::int64_t p = 0; p < num_panels; ++p) {
    float* panel = panels + p * head_dim * nr;
    for (int c = 0; c < nr; ++c) {
      const std::int64_t j = p * nr + c;
      if (j < keys) {
        const float* key = k + j * row_stride;
        float norm = 0.0f;
        for (std::int64_t d = 0; d < head_dim; ++d) {
          const float x = key[d * col_stride] - center[d];
          panel[d * nr + c] = x;
          norm += x * x;
        }
        key_bias[j] = plan.bias_scale * norm;
        spread = std::max(spread, norm);
      } else {
        for (std::int64_t d = 0; d < head_dim; ++d) panel[d * nr + c] = 0.0f;
        key_bias[j] = 0.0f;
      }
    }
  }
  return spread;
}

// The expanded Gaussian loses about 2^-24 * scale * |k - c|^2 of each score to
// cancellation (c the center). Keys whose spread makes that exceed ~1e-5 (scale * |k - c|^2
// > 256; normalized attention data sits near 64) are scored from exact differences
// instead, for this head (prefill) or key block (decoding): accuracy over speed.
bool needs_exact_distance(const Plan& plan, float spread) {
  return plan.centered && double(plan.shape.scale) * spread > 256.0;
}

// Points the job at the Gaussian form chosen for the keys just packed.
void bind_distance_form(const Plan& plan, QueryBlockJob& job, bool exact, float* key_bias, float* row_bias) {
  if (!plan.centered) return;
  job.kind = exact ? detail::ScoreKind::squared_distance : detail::ScoreKind::dot;
  job.key_bias = exact ? nullptr : key_bias;
  job.row_bias = exact ? nullptr : row_bias;
}

// V of keys [0, keys) as rows of value_dim_padded floats, zero past value_dim.
void pack_value_rows(const float* v, std::int64_t row_stride, std::int64_t col_stride, std::int64_t keys,
                     std::int64_t value_dim, std::int64_t value_dim_padded, float* rows) {
  for (std::int64_t j = 0; j < keys; ++j) {
    float* row = rows + j * value_dim_padded;
    for (std::int64_t c = 0; c < value_dim; ++c) row[c] = v[j * row_stride + c * col_stride];
    for (std::int64_t c = value_dim; c < value_dim_padded; ++c) row[c] = 0.0f;
  }
}

// Query rows in the kernel's layout: packed row r is query first_row + r / heads_per_row
// of head first_head + r % heads_per_row, times q_factor (minus the center, Gaussian, whose
// row bias goes to row_bias); rows from `rows` up to a multiple of mr are zero.
void pack_query_rows(const Plan& plan, const TensorView<const float>& q, std::int64_t b, std::int64_t first_head,
                     std::int64_t heads_per_row, std::int64_t first_row, std::int64_t rows, int mr, const float* center,
                     bool exact_distance, float* packed, float* row_bias) {
  const std::int64_t D = q.shape[3];
  const float factor = exact_distance ? 1.0f : plan.q_factor;
  // (Query i, head g) of row r, stepped rather than divided out per row.
  std::int64_t i = first_row, g = 0;
  for (std::int64_t r = 0; r < round_up(rows, mr); ++r) {
    float* dst = packed + r * D;
    if (r >= rows) {
      for (std::int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
      if (plan.centered) row_bias[r] = 0.0f;
      continue;
    }
    const float* src = element(q, b, first_head + g, i);
    if (++g == heads_per_row) {
      g = 0;
      ++i;
    }
    if (!plan.centered) {  // no norm: its chain of dependent additions would set the pace
      const std::int64_t stride = q.strides[3];
      if (stride == 1)
        for (std::int64_t d = 0; d < D; ++d) dst[d] = factor * src[d];
      else
        for (std::int64_t d = 0; d < D; ++d) dst[d] = factor * src[d * stride];
      continue;
    }
    float norm = 0.0f;
    for (std::int64_t d = 0; d < D; ++d) {
      const float x = src[d * q.strides[3]] - center[d];
      dst[d] = factor * x;
      norm += x * x;
    }
    if (plan.centered) row_bias[r] = plan.bias_scale * norm;
  }
}

// Per-thread scratch: the sizes of its parts (in floats; 0 for a part a path does not
// use), carved out of one allocation made before the parallel region.
struct ThreadScratch {
  std::int64_t key_panels, key_bias, value_rows, q_packed, row_bias, center, scores, acc, row_stats;

  struct Parts {
    float *key_panels, *key_bias, *value_rows, *q_packed, *row_bias, *center, *scores, *acc, *row_max, *row_sum;
  };

  std::int64_t total() const {
    return round_up(key_panels, 16) + round_up(key_bias, 16) + round_up(value_rows, 16) + round_up(q_packed, 16) +
           round_up(row_bias, 16) + round_up(center, 16) + round_up(scores, 16) + round_up(acc, 16) +
           2 * round_up(row_stats, 16);
  }

  // The parts of thread `thread` in `memory` (total() floats per thread, 64-byte aligned).
  Parts carve(float* memory, int thread) const {
    float* next = memory + total() * thread;
    auto take = [&next](std::int64_t floats) {
      float* p = next;
      next += round_up(floats, 16);
      return p;
    };
    Parts parts{};
    parts.key_panels = take(key_panels);
    parts.key_bias = take(key_bias);
    parts.value_rows = take(value_rows);
    parts.q_packed = take(q_packed);
    parts.row_bias = take(row_bias);
    parts.center = take(center);
    parts.scores = take(scores);
    parts.acc = take(acc);
    parts.row_max = take(row_stats);
    parts.row_sum = take(row_stats);
    return parts;
  }
};

// The job fields that depend only on the call (shape, score, visibility rules) and on the
// thread (its scratch).
QueryBlockJob base_job(const Plan& plan, const ThreadScratch::Parts& mine) {
  const AttentionShape& s = plan.shape;
  QueryBlockJob job{};
  job.scores = mine.scores;
  job.q_packed = mine.q_packed;
  job.k_panels = mine.key_panels;
  job.key_bias = plan.centered ? mine.key_bias : nullptr;
  job.row_bias = plan.centered ? mine.row_bias : nullptr;
  job.q_len = s.q_len;
  job.kv_len = s.kv_len;
  job.head_dim = s.head_dim;
  job.value_dim = s.value_dim;
  job.value_dim_padded = plan.value_dim_padded;
  job.block_keys = plan.block_keys;
  job.heads_per_row = 1;
  job.kind = plan.kind;
  job.natural_units = plan.natural_units;
  job.additive_weights = plan.additive_weights.empty() ? nullptr : plan.additive_weights.data();
  job.distance_factor = plan.distance_factor;
  job.transform = plan.transform;
  job.softcap = s.softcap;
  job.empty_value = plan.empty_value;
  // Visibility: window and causal bounds around the diagonal d = i + (M - N).
  const std::int64_t diag = s.kv_len - s.q_len;
  job.has_lo = s.window_left >= 0;
  job.lo_offset = diag - s.window_left;
  job.has_hi = s.causal || s.window_right >= 0;
  job.hi_offset = diag + (s.causal ? std::min<std::int64_t>(s.window_right >= 0 ? s.window_right : 0, 0) : s.window_right);
  job.mask_head_stride = s.mask.strides[1];
  job.mask_row_stride = s.mask.strides[2];
  job.mask_col_stride = s.mask.strides[3];
  job.bool_head_stride = s.bool_mask.strides[1];
  job.bool_row_stride = s.bool_mask.strides[2];
  job.bool_col_stride = s.bool_mask.strides[3];
  return job;
}

// The job fields that depend on (batch, first head of the rows).
void bind_heads(const Plan& plan, QueryBlockJob& job, std::int64_t b, std::int64_t first_head) {
  const AttentionShape& s = plan.shape;
  job.alibi_slopes = s.alibi_slopes ? s.alibi_slopes + first_head : nullptr;
  job.mask = s.mask.data ? s.mask.data + b * s.mask.strides[0] + first_head * s.mask.strides[1] : nullptr;
  job.bool_mask =
      s.bool_mask.data ? s.bool_mask.data + b * s.bool_mask.strides[0] + first_head * s.bool_mask.strides[1] : nullptr;
  job.key_limit = s.key_lengths ? std::int64_t(s.key_lengths[b]) : s.kv_len;
}

// Prefill: work items are (batch, query head, query block); each thread packs the K
// panels (and V rows when needed) of a KV head once and reuses them for every query
// block and every query head of the group it processes.
void run_prefill(const Plan& plan, const TensorView<const float>& q, const TensorView<const float>& k,
                 const TensorView<const float>& v, const TensorView<float>& out, const TensorView<float>* lse) {
  const AttentionShape& s = plan.shape;
  const KernelTable& kernels = *plan.kernels;
  const std::int64_t N = s.q_len, M = s.kv_len, D = s.head_dim;
  const int mr = kernels.tile_rows, nr = kernels.panel_keys;
  const std::int64_t q_blocks = (N + plan.block_rows - 1) / plan.block_rows;
  const bool triangular = s.causal || s.window_right >= 0 || s.window_left >= 0;

  // Items in (batch, kv head, query head of the group, query block) order, so a thread's
  // consecutive items share one packed KV head. Static contiguous chunks keep a head's
  // packing on one thread; for causal and windowed attention a head's query blocks are
  // interleaved heavy and light (0, n-1, 1, n-2, ...) so every chunk gets an even share.
  const std::int64_t items = s.batch * s.q_heads * q_blocks;
  const int threads = int(std::min<std::int64_t>(thread_count(s.num_threads), items));

  ThreadScratch parts{};
  parts.key_panels = round_up(std::max<std::int64_t>(M, 1), nr) * D;
  parts.key_bias = plan.centered ? round_up(std::max<std::int64_t>(M, 1), nr) : 0;
  parts.value_rows = plan.v_in_place_prefill ? 0 : M * plan.value_dim_padded;
  parts.q_packed = plan.block_rows * D;
  parts.row_bias = plan.centered ? plan.block_rows : 0;
  parts.center = D;
  parts.scores = std::int64_t(mr) * plan.block_keys;
  parts.acc = plan.block_rows * plan.value_dim_padded;
  parts.row_stats = plan.block_rows;
  AlignedBuffer scratch(parts.total() * threads);

#pragma omp parallel num_threads(threads)
  {
    const ThreadScratch::Parts mine = parts.carve(scratch.get(), omp_get_thread_num());
    QueryBlockJob job = base_job(plan, mine);
    job.acc = mine.acc;
    job.row_max = mine.row_max;
    job.row_sum = mine.row_sum;
    job.key_begin = 0;
    job.key_end = M;
    job.finalize = true;
    job.out_row_stride = out.strides[2];
    job.out_col_stride = out.strides[3];
    if (lse) job.lse_row_stride = lse->strides[2];
    std::int64_t packed_head = -1;
    bool exact = false;

#pragma omp for schedule(static) nowait  // the region's end is the one barrier needed
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t slot = item % q_blocks;
      const std::int64_t bh = item / q_blocks;  // b * Hq + h, with h = hkv * group + g
      const std::int64_t b = bh / s.q_heads, h = bh % s.q_heads, hkv = h / plan.group;
      const std::int64_t qb = !triangular ? slot : (slot % 2 == 0 ? slot / 2 : q_blocks - 1 - slot / 2);

      const std::int64_t kv_head = b * s.kv_heads + hkv;
      if (kv_head != packed_head) {
        load_center(plan, k, b, hkv, mine.center);
        const float spread =
            pack_key_panels(element(k, b, hkv, 0), k.strides[2], k.strides[3], M, D, nr, plan, mine.center,
                            mine.key_panels, mine.key_bias);
        exact = needs_exact_distance(plan, spread);
        bind_distance_form(plan, job, exact, mine.key_bias, mine.row_bias);
        if (!plan.v_in_place_prefill)
          pack_value_rows(element(v, b, hkv, 0), v.strides[2], v.strides[3], M, s.value_dim, plan.value_dim_padded,
                          mine.value_rows);
        packed_head = kv_head;
      }
      job.v_rows = plan.v_in_place_prefill ? element(v, b, hkv, 0) : mine.value_rows;
      job.v_row_stride = plan.v_in_place_prefill ? (job.v_rows ? v.strides[2] : 0) : plan.value_dim_padded;

      job.first_row = qb * plan.block_rows;
      job.rows = std::min(plan.block_rows, N - job.first_row);
      pack_query_rows(plan, q, b, h, 1, job.first_row, job.rows, mr, mine.center, exact, mine.q_packed,
                      mine.row_bias);
      bind_heads(plan, job, b, h);
      job.out = element(out, b, h, job.first_row);
      job.lse = lse ? element(*lse, b, h, job.first_row) : nullptr;
      kernels.forward_query_block(job);
    }
  }
}

// Decoding (few query rows, many keys): the query heads of a KV-head group are stacked
// as rows of one block, so K and V are read once per KV head rather than once per query
// head. The key range is split into chunks processed in parallel, each leaving an
// unnormalized partial (acc, max, sum); the partials are merged by log-sum-exp in chunk
// order. The split depends on the shape only, so results are identical for any thread
// count. K is read in place (dot product) or packed one key block at a time: no copy of
// a whole head, no buffer that grows with M.
void run_decode(const Plan& plan, const TensorView<const float>& q, const TensorView<const float>& k,
                const TensorView<const float>& v, const TensorView<float>& out, const TensorView<float>* lse) {
  const AttentionShape& s = plan.shape;
  const KernelTable& kernels = *plan.kernels;
  const std::int64_t N = s.q_len, M = s.kv_len, D = s.head_dim, G = plan.group;
  const std::int64_t rows = G * N;
  const std::int64_t Dvp = plan.value_dim_padded, Bk = plan.block_keys;
  // K rows are read in place when they are contiguous whole vectors of a plain dot
  // product: no reuse to pay for a packing pass.
  const bool k_in_place = plan.kind == detail::ScoreKind::dot && !plan.centered && k.strides[3] == 1 &&
                          D % kernels.vector_floats == 0;
  // Kernel: with a vector's worth of rows or more (and nothing but exclusions on the
  // scores), the rows become vector lanes; else the smaller tile when it pads less (e.g.
  // 4 stacked heads: one 4-row tile, not a 6-row one with 2 empty rows): decoding is bound by
  // memory, and padded rows only add compute.
  const bool lanes = k_in_place && !plan.natural_units && rows >= kernels.vector_floats;
  const bool small = round_up(rows, kernels.small_tile_rows) < round_up(rows, kernels.tile_rows);
  const int mr = lanes ? kernels.vector_floats : small ? kernels.small_tile_rows : kernels.tile_rows;
  const int nr = kernels.panel_keys;
  const auto forward = lanes ? kernels.forward_lanes_block
                       : small ? kernels.forward_small_block
                               : kernels.forward_query_block;
  const std::int64_t rows_padded = round_up(rows, mr);
  // Keys per kernel call: a block when this path packs K or V one block at a time, else
  // the whole chunk (the kernel walks its blocks itself, transposing Q and starting its
  // prefetch stream once per chunk rather than once per block).
  const bool packs_per_block = !k_in_place || !plan.v_in_place;

  // Aim for 64 work items in all (enough for 64 cores), but no chunk under 512 keys,
  // where the per-chunk merge would start to cost more than the parallelism gains.
  constexpr std::int64_t kTargetItems = 64, kMinChunkKeys = 512;
  const std::int64_t kv_heads = s.batch * s.kv_heads;
  const std::int64_t wanted = std::max<std::int64_t>(
      1, std::min((kTargetItems + kv_heads - 1) / kv_heads, (M + kMinChunkKeys - 1) / kMinChunkKeys));
  const std::int64_t chunk_keys = round_up((std::max<std::int64_t>(M, 1) + wanted - 1) / wanted, Bk);
  const std::int64_t step = packs_per_block ? Bk : chunk_keys;
  const std::int64_t chunks = (std::max<std::int64_t>(M, 1) + chunk_keys - 1) / chunk_keys;
  const std::int64_t items = kv_heads * chunks;
  const int threads = int(std::min<std::int64_t>(thread_count(s.num_threads), items));

  // Partial state of every item: acc, row_max, row_sum. At most kTargetItems chunks
  // per call (fewer when B * Hkv is large), so this does not grow with M.
  const std::int64_t partial_floats = round_up(rows_padded * Dvp + 2 * rows_padded, 16);  // keeps each acc 64-byte aligned
  AlignedBuffer partials(items * partial_floats);
  ThreadScratch parts{};
  parts.key_panels = k_in_place ? 0 : Bk * D;
  parts.key_bias = plan.centered ? Bk : 0;
  parts.value_rows = plan.v_in_place ? 0 : Bk * Dvp;
  parts.q_packed = rows_padded * D;
  parts.row_bias = plan.centered ? rows_padded : 0;
  parts.center = D;
  parts.scores = std::int64_t(mr) * (lanes ? Bk + D : Bk);  // lanes: the transposed Q follows the scores
  AlignedBuffer scratch(parts.total() * threads);

#pragma omp parallel num_threads(threads)
  {
    const ThreadScratch::Parts mine = parts.carve(scratch.get(), omp_get_thread_num());
    QueryBlockJob job = base_job(plan, mine);  // acc, row_max, row_sum: the item's partial state, below
    if (k_in_place) job.k_panels = nullptr;
    job.rows = rows;
    job.first_row = 0;
    job.heads_per_row = G;
    // One chunk per head (short key ranges): the kernel finishes the rows itself, and
    // there is nothing to merge.
    const bool single_chunk = chunks == 1;
    job.out_row_stride = out.strides[2];
    job.out_col_stride = out.strides[3];
    job.out_head_stride = out.strides[1];
    if (lse) {
      job.lse_row_stride = lse->strides[2];
      job.lse_head_stride = lse->strides[1];
    }

#pragma omp for schedule(static) nowait  // single chunk: nothing to wait for (see below)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t head = item / chunks, chunk = item % chunks;
      const std::int64_t b = head / s.kv_heads, hkv = head % s.kv_heads;
      float* partial = partials.get() + item * partial_floats;
      job.acc = partial;
      job.row_max = partial + rows_padded * Dvp;
      job.row_sum = job.row_max + rows_padded;
      load_center(plan, k, b, hkv, mine.center);
      pack_query_rows(plan, q, b, hkv * G, G, 0, rows, mr, mine.center, false, mine.q_packed, mine.row_bias);
      bool exact = false;
      bind_distance_form(plan, job, exact, mine.key_bias, mine.row_bias);
      bind_heads(plan, job, b, hkv * G);

      // Keys past the batch's key length are never read.
      const std::int64_t chunk_end = std::min({M, (chunk + 1) * chunk_keys, job.key_limit});
      job.resume = false;
      job.out = element(out, b, hkv * G, 0);
      job.lse = lse ? element(*lse, b, hkv * G, 0) : nullptr;
      for (std::int64_t j0 = chunk * chunk_keys; j0 < chunk_end || !job.resume; j0 += step) {
        const std::int64_t keys = std::max<std::int64_t>(0, std::min(step, chunk_end - j0));
        job.finalize = single_chunk && j0 + step >= chunk_end;
        if (keys == 0) {  // an empty chunk (key length): only reset the partial state
          job.key_begin = job.key_end = j0;
          forward(job);
          job.resume = true;
          continue;
        }
        if (k_in_place) {
          job.k_rows = element(k, b, hkv, j0);
          job.k_row_stride = k.strides[2];
        } else {
          const float spread = pack_key_panels(element(k, b, hkv, j0), k.strides[2], k.strides[3], keys, D, nr,
                                               plan, mine.center, mine.key_panels, mine.key_bias);
          // The Gaussian form may change from one key block to the next: the Q rows follow.
          if (plan.centered && needs_exact_distance(plan, spread) != exact) {
            exact = !exact;
            pack_query_rows(plan, q, b, hkv * G, G, 0, rows, mr, mine.center, exact, mine.q_packed, mine.row_bias);
            bind_distance_form(plan, job, exact, mine.key_bias, mine.row_bias);
          }
        }
        if (plan.v_in_place) {
          job.v_rows = element(v, b, hkv, j0);
          job.v_row_stride = job.v_rows ? v.strides[2] : 0;
        } else {
          pack_value_rows(element(v, b, hkv, j0), v.strides[2], v.strides[3], keys, s.value_dim,
                          Dvp, mine.value_rows);
          job.v_rows = mine.value_rows;
          job.v_row_stride = Dvp;
        }
        job.key_begin = j0;
        job.key_end = j0 + keys;
        forward(job);  // the first call (resume = false) also resets the state
        job.resume = true;
      }
    }

    // Merge the chunks of each (batch, kv head) in chunk order: out = sum_c w_c acc_c /
    // sum_c w_c sum_c with w_c = 2^(max_c - max), max the largest chunk max. Single-chunk
    // calls skip the merge and its barriers (every thread takes the same branch).
    if (!single_chunk) {
#pragma omp barrier
#pragma omp for schedule(static)
    for (std::int64_t head = 0; head < kv_heads; ++head) {
      const std::int64_t b = head / s.kv_heads, hkv = head % s.kv_heads;
      const float* first = partials.get() + head * chunks * partial_floats;
      auto chunk_max = [&](std::int64_t c, std::int64_t r) { return first[c * partial_floats + rows_padded * Dvp + r]; };
      auto chunk_sum = [&](std::int64_t c, std::int64_t r) {
        return first[c * partial_floats + rows_padded * Dvp + rows_padded + r];
      };
      for (std::int64_t r = 0; r < rows; ++r) {
        float row_max = kNegInf;
        for (std::int64_t c = 0; c < chunks; ++c) row_max = std::max(row_max, chunk_max(c, r));
        float weight[kTargetItems];  // one per chunk: chunks <= wanted <= kTargetItems
        float total = 0.0f;
        for (std::int64_t c = 0; c < chunks; ++c) {
          weight[c] = chunk_max(c, r) == kNegInf ? 0.0f : std::exp2(chunk_max(c, r) - row_max);
          total += weight[c] * chunk_sum(c, r);
        }
        const std::int64_t h = hkv * G + r % G, i = r / G;
        float* dst = element(out, b, h, i);
        for (std::int64_t col = 0; col < s.value_dim; ++col) {
          float value = 0.0f;
          for (std::int64_t c = 0; c < chunks; ++c) value += weight[c] * first[c * partial_floats + r * Dvp + col];
          // total is 0 exactly when no chunk saw a key; a NaN (from a NaN in a visible
          // key or in q) goes through to the row, as in the oracle.
          dst[col * out.strides[3]] = total != 0.0f ? value / total : plan.empty_value;
        }
        if (lse) *element(*lse, b, h, i) = total != 0.0f ? float((row_max + std::log2(total)) / kLog2e) : kNegInf;
      }
    }
    }  // !single_chunk
  }
}

// Decoding shapes: a handful of query rows per head. Up to 16 rows the stacked-heads
// decode path reads K and V once per KV head and splits the keys across threads.
bool use_decode_path(const AttentionShape& s) { return s.q_len <= 16; }

void run(const AttentionShape& s, const TensorView<const float>& q, const TensorView<const float>& k,
         const TensorView<const float>& v, const TensorView<float>& out, const TensorView<float>* lse,
         detail::Transform transform = detail::Transform::none, float empty_value = 0.0f, bool regression = false) {
  const KernelTable& kernels = detail::active_kernels();
  if (s.empty()) return;
  if (s.kv_len == 0) return write_empty_rows(s, out, lse, empty_value);
  const Plan plan = make_plan(kernels, s, v, transform, empty_value, regression);  // reads the tile table: may throw
  if (use_decode_path(s))
    run_decode(plan, q, k, v, out, lse);
  else
    run_prefill(plan, q, k, v, out, lse);
}

}  // namespace

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v, TensorView<float> out,
               const AttentionOptions& options) {
  run(detail::validate_attention(q, k, v, out, nullptr, options), q, k, v, out, nullptr);
}

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v, TensorView<float> out,
               TensorView<float> lse, const AttentionOptions& options) {
  run(detail::validate_attention(q, k, v, out, &lse, options), q, k, v, out, &lse);
}

void merge_into(TensorView<float> out, TensorView<float> lse, TensorView<const float> part_out,
                TensorView<const float> part_lse) {
  detail::validate_merge(out, lse, part_out, part_lse);
  const std::int64_t B = out.shape[0], H = out.shape[1], N = out.shape[2], Dv = out.shape[3];
  if (B == 0 || H == 0 || N == 0) return;  // no rows (and no 2^40 empty loops over a batch of them)
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < N; ++i) {
        float* l = element(lse, b, h, i);
        const float pl = *element(part_lse, b, h, i);
        if (pl == kNegInf) continue;  // the part saw no key: nothing to add
        float* o = element(out, b, h, i);
        const float* po = element(part_out, b, h, i);
        // out = (e^l out + e^pl part_out) / (e^l + e^pl), computed relative to the larger.
        const float m = std::max(*l, pl);
        const float w = *l == kNegInf ? 0.0f : std::exp(*l - m), pw = std::exp(pl - m);
        const float inv = 1.0f / (w + pw);
        for (std::int64_t c = 0; c < Dv; ++c)
          o[c * out.strides[3]] = (w * o[c * out.strides[3]] + pw * po[c * part_out.strides[3]]) * inv;
        *l = m + std::log(w + pw);
      }
}

void nadaraya_watson(TensorView<const float> x_query, TensorView<const float> x_train, TensorView<const float> y_train,
                     TensorView<float> y_pred, const KernelRegressionOptions& options) {
  detail::validate_kernel_regression(x_query, x_train, y_train, y_pred, options);
  // The weights K(u), u = |x - x_j| / h, as softmax of log K: with the Gaussian score
  // s = -scale |x - x_j|^2, the Gaussian kernel is scale = 1 / (2 h^2); the others take
  // scale = 1 / h^2 (s = -u^2) and map s to log K(u) in the kernel's transform.
  AttentionOptions attention_options;
  attention_options.score = Score::gaussian;
  attention_options.num_threads = options.num_threads;
  const double h2 = double(options.bandwidth) * options.bandwidth;
  attention_options.scale = float(options.kernel == Kernel::gaussian ? 0.5 / h2 : 1.0 / h2);
  if (!std::isfinite(*attention_options.scale) || *attention_options.scale <= 0)
    detail::fail_message("options.bandwidth: expected a value whose 1/h^2 is a finite float, got " +
                         std::to_string(options.bandwidth));
  const detail::Transform transform = options.kernel == Kernel::laplacian   ? detail::Transform::nw_laplacian
                                      : options.kernel == Kernel::boxcar    ? detail::Transform::nw_boxcar
                                      : options.kernel == Kernel::epanechnikov ? detail::Transform::nw_epanechnikov
                                                                            : detail::Transform::none;
  const AttentionShape s = detail::validate_attention(x_query, x_train, y_train, y_pred, nullptr, attention_options);
  // No training point in the kernel's support: NaN, the statistical convention.
  run(s, x_query, x_train, y_train, y_pred, nullptr, transform, std::numeric_limits<float>::quiet_NaN(), true);
}

}  // namespace flashcpu
