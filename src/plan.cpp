// Planning one call: tiles, score form and the job fields shared by both drivers.
#include "plan.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "dispatch.hpp"
#include "tuning.hpp"

namespace flashcpu::detail {
namespace {

constexpr double kLog2e = 1.4426950408889634;

float load_element(const void* p, DType type) {
  switch (type) {
    case DType::bf16: return to_float(*static_cast<const bf16*>(p));
    case DType::f16: return to_float(*static_cast<const fp16*>(p));
    case DType::f32: break;
  }
  return *static_cast<const float*>(p);
}

}  // namespace

int thread_count(int requested, double flops, double min_flops_per_thread) {
  // Inside a caller's parallel region that cannot nest, OpenMP would give the call's
  // region one thread whatever it asks: plan for one (scratch for one thread, and no
  // region at all, see run_parallel), since omp_get_max_threads() still says the outer count.
  if (omp_get_active_level() >= omp_get_max_active_levels()) return 1;
  if (requested > 0) return requested;
  return int(std::clamp(std::floor(flops / min_flops_per_thread), 1.0, double(omp_get_max_threads())));
}

StealingShares::StealingShares(std::int64_t n, int threads, std::int64_t keep, std::int64_t packed_below)
    : keep_(std::uint64_t(std::max<std::int64_t>(keep, 0))), shares_(std::size_t(std::max(threads, 1))) {
  const int size = int(shares_.size());
  // The largest share holds at most n / size + 1 items; lo and hi must fit 32 bits.
  packed_ = n / size + 1 < std::min(packed_below, std::int64_t(1) << 32);
  for (int t = 0; t < size; ++t) {
    const Team team{t, size};
    Share& share = shares_[std::size_t(t)];
    share.first = team.first(n);
    share.past = team.past(n);
    share.next.store(share.first, std::memory_order_relaxed);
    share.range.store(std::uint64_t(share.past - share.first) << 32, std::memory_order_relaxed);
  }
}

bool StealingShares::take(const Team& team, std::int64_t* item) {
  Share& own = shares_[std::size_t(team.index)];
  if (keep_ > 0 && !own.begun.load(std::memory_order_relaxed)) own.begun.store(true, std::memory_order_relaxed);
  // Relaxed: an item's number is all that passes between threads; the region's end (or
  // a barrier, as decoding's before its merge) orders its results.
  if (!packed_) {  // the thread's own share first, then the others', from the front
    for (std::size_t s = 0; s < shares_.size(); ++s) {
      Share& share = shares_[(std::size_t(team.index) + s) % shares_.size()];
      const std::int64_t next = share.next.fetch_add(1, std::memory_order_relaxed);
      if (next < share.past) {
        *item = next;
        return true;
      }
    }
    return false;
  }
  std::uint64_t range = own.range.load(std::memory_order_relaxed);
  while ((range & 0xffffffffu) < (range >> 32))
    if (own.range.compare_exchange_weak(range, range + 1, std::memory_order_relaxed)) {
      *item = own.first + std::int64_t(range & 0xffffffffu);
      return true;
    }
  for (;;) {  // the back of the share with the most left
    Share* victim = nullptr;
    std::uint64_t most = 0, victim_range = 0;
    for (Share& share : shares_) {
      const std::uint64_t r = share.range.load(std::memory_order_relaxed);
      const std::uint64_t lo = r & 0xffffffffu, hi = r >> 32;
      const std::uint64_t kept = share.begun.load(std::memory_order_relaxed) ? keep_ : 0;
      if (hi > lo + kept && hi - lo > most) {
        most = hi - lo;
        victim = &share;
        victim_range = r;
      }
    }
    if (victim == nullptr) return false;
    const std::uint64_t hi = victim_range >> 32;
    if (victim->range.compare_exchange_weak(victim_range, victim_range - (std::uint64_t(1) << 32),
                                            std::memory_order_relaxed)) {
      *item = victim->first + std::int64_t(hi) - 1;
      return true;
    }
  }
}

std::int64_t StealingShares::peek(const Team& team) const {
  const Share& own = shares_[std::size_t(team.index)];
  if (!packed_) {
    const std::int64_t next = own.next.load(std::memory_order_relaxed);
    return next < own.past ? next : -1;
  }
  const std::uint64_t range = own.range.load(std::memory_order_relaxed);
  return (range & 0xffffffffu) < (range >> 32) ? own.first + std::int64_t(range & 0xffffffffu) : -1;
}

double forward_flops(const AttentionShape& s) {
  return 2.0 * double(s.batch) * double(s.q_heads) * double(s.q_len) * double(s.kv_len) *
         double(s.head_dim + s.value_dim);
}

bool decoding_shape(const AttentionShape& s) { return s.q_len <= 16; }

bool use_decode_path(const AttentionShape& s, const KernelTable& kernels) {
  return decoding_shape(s) || (!kernels.bf16_products && s.q_len <= kDecodeMaxStackedRows / s.group());
}

bool values_in_place(const KernelTable& kernels, const AttentionShape& s, const AnyView& v) {
  return v.strides[3] == 1 && s.value_dim == round_up(s.value_dim, kernels.value_columns) && v.type == kernels.kv;
}

// Such a variant takes the dot product, and bf16 q and k or any types if the call allows
// rounding them to bf16; for prefill, and for decoding:
//  - on the tiles, with a whole tile of stacked rows (query heads per KV head x queries
//    >= 16: batched or speculative decoding, or a wide GQA group). Fewer stacked rows are
//    bound by memory more than by arithmetic: the vector kernels read K in place there.
//  - on vdpbf16ps, any number of rows on its small kernel, when V can be read as stored
//    (the small kernel widens V rows; the variant's packer would pair them). S takes half
//    the instructions of widened K: fp32 q rounded over a bf16 cache, under
//    allow_bf16_compute, takes it too.
// Neither takes other scores or transforms.
bool bf16_products_take(const KernelTable& kernels, const AttentionShape& s, DType q, DType k, const AnyView& v,
                        Transform transform) {
  const bool bf16_inputs = q == DType::bf16 && k == DType::bf16;
  const bool decoding_taken =
      kernels.tiles ? s.q_len * s.group() >= kernels.tile_rows
                    : kernels.forward_small_block && (!kernels.pair_values || values_in_place(kernels, s, v));
  return (bf16_inputs || s.allow_bf16_compute) && s.score == Score::dot_product && transform == Transform::none &&
         (!decoding_shape(s) || decoding_taken);
}

const KernelTable& kernels_for_call(const AttentionShape& s, DType q, DType k, const AnyView& v, Transform transform) {
  const KernelTable* chosen = &active_kernels(k);
  if (s.allow_bf16_compute && k != DType::bf16) {
    const KernelTable& rounded = active_kernels(DType::bf16);
    if (rounded.bf16_products && bf16_products_take(rounded, s, q, k, v, transform)) chosen = &rounded;
  }
  while (chosen->bf16_products && !bf16_products_take(*chosen, s, q, k, v, transform))
    chosen = &kernels_below(chosen->isa, k);
  return *chosen;
}

Plan make_plan(const KernelTable& kernels, const AttentionShape& s, const AnyView& v, Transform transform,
               float empty_value, bool regression) {
  Plan plan{};
  plan.kernels = &kernels;
  plan.shape = s;
  plan.group = s.group();
  const Tuning tuning = tuning_for(kernels, s.head_dim);
  const TileConfig tiles = tuning.tiles;
  plan.min_flops_per_thread = tuning.min_flops_per_thread;
  // Short sequences get blocks no larger than they need, so that small problems still
  // split into enough work items and no time goes to padding.
  plan.block_rows = round_up(std::min<std::int64_t>(tiles.block_rows, std::max<std::int64_t>(s.q_len, 1)), kernels.tile_rows);
  plan.block_keys = std::min(round_up(tiles.block_keys, kernels.panel_keys),
                             round_up(std::max<std::int64_t>(s.kv_len, 1), kernels.panel_keys));
  plan.value_dim_padded = round_up(s.value_dim, kernels.value_columns);
  // (Never when the table's type is not V's: allow_bf16_compute, whose packers convert;
  // nor with pair values, which read V in their own layout, except on the vdpbf16ps
  // variant's small kernel: decoding.)
  plan.v_in_place = values_in_place(kernels, s, v) &&
                    (!kernels.pair_values || (!kernels.tiles && use_decode_path(s, kernels)));
  const std::int64_t bytes = element_bytes(v.type);
  // (elements mod 64) first: a stride of a size-1 dim may be any value up to INT64_MAX.
  const auto on_lines = [bytes](std::int64_t elements) { return elements % 64 * bytes % 64 == 0; };
  plan.v_in_place_prefill = plan.v_in_place && reinterpret_cast<std::uintptr_t>(v.data) % 64 == 0 &&
                            on_lines(v.strides[0]) && on_lines(v.strides[1]) && on_lines(v.strides[2]);

  plan.transform = s.softcap > 0 ? Transform::softcap : transform;
  // Nonlinear terms need the natural-log score; otherwise log2(e) is folded in up front.
  plan.natural_units = plan.transform != Transform::none || s.alibi_slopes || s.mask.data || s.bool_mask.data;
  const double unit = plan.natural_units ? 1.0 : kLog2e;
  // Gaussian: -scale |q - k|^2. From exact differences where small distances must be
  // accurate (kernel regression, whose transforms take square roots and logs of them) or
  // where D is small enough that the extra subtraction costs little next to the exp.
  // Otherwise expanded as 2 scale q.k - scale |q|^2 - scale |k|^2: a dot product plus a
  // row bias and a key bias, as fast as the dot product (after centering, see load_center).
  const bool exact_distance = s.score == Score::gaussian && (regression || s.head_dim < 32);
  plan.kind = s.score == Score::additive ? ScoreKind::additive
              : exact_distance           ? ScoreKind::squared_distance
                                         : ScoreKind::dot;
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
void load_center(const Plan& plan, const AnyView& k, std::int64_t b, std::int64_t hkv, float* center) {
  const std::int64_t D = plan.shape.head_dim;
  const char* key0 = static_cast<const char*>(k.row(b, hkv, 0));
  bool finite = true;
  for (std::int64_t d = 0; d < D; ++d) {
    center[d] = plan.centered && plan.shape.kv_len > 0
                    ? load_element(key0 + d * k.strides[3] * element_bytes(k.type), k.type)
                    : 0.0f;
    finite = finite && std::isfinite(center[d]);
  }
  // Key 0 may be an excluded slot holding NaN or inf (a stale KV cache): it must not
  // become every score's reference point. The origin then serves, with the exact
  // distances if the keys' spread calls for them.
  if (!finite)
    for (std::int64_t d = 0; d < D; ++d) center[d] = 0.0f;
}

// The expanded Gaussian loses about 2^-24 * scale * |k - c|^2 of each score to
// cancellation (c the center). Keys whose spread makes that exceed ~1e-5 (scale * |k - c|^2
// > 256; normalized attention data sits near 64) are scored from exact differences
// instead, for this head (prefill) or key block (decoding): accuracy over speed.
bool needs_exact_distance(const Plan& plan, float spread) {
  return plan.centered && double(plan.shape.scale) * spread > 256.0;
}

void bind_distance_form(const Plan& plan, QueryBlockJob& job, bool exact, float* key_bias, float* row_bias) {
  if (!plan.centered) return;
  job.score.kind = exact ? ScoreKind::squared_distance : ScoreKind::dot;
  job.score.key_bias = exact ? nullptr : key_bias;
  job.score.row_bias = exact ? nullptr : row_bias;
}

void pack_queries(const Plan& plan, const AnyView& q, std::int64_t b, std::int64_t first_head,
                  std::int64_t heads_per_row, std::int64_t first_row, std::int64_t rows, int mr, const float* center,
                  bool exact_distance, float* packed, float* row_bias) {
  QueryPack pack{};
  pack.source = q.rows_from(b, first_head, first_row);
  pack.head_stride = q.strides[1];
  pack.heads_per_row = heads_per_row;
  pack.rows = rows;
  pack.rows_padded = round_up(rows, mr);
  pack.head_dim = plan.shape.head_dim;
  pack.factor = exact_distance ? 1.0f : plan.q_factor;
  pack.center = plan.centered ? center : nullptr;
  pack.bias_scale = plan.bias_scale;
  pack.packed = packed;
  pack.row_bias = row_bias;
  plan.kernels->pack_query_rows(pack);
}

JobVisibility visibility(const AttentionShape& s, std::int64_t b) {
  // Window and causal bounds around the diagonal d = i + (M - N), and the batch's key length.
  JobVisibility visible{};
  const std::int64_t diag = s.kv_len - s.q_len;
  visible.has_lo = s.window_left >= 0;
  visible.lo_offset = diag - s.window_left;
  visible.has_hi = s.causal || s.window_right >= 0;
  visible.hi_offset =
      diag + (s.causal ? std::min<std::int64_t>(s.window_right >= 0 ? s.window_right : 0, 0) : s.window_right);
  visible.key_limit = s.key_lengths && b < s.batch ? std::int64_t(s.key_lengths[b]) : s.kv_len;
  return visible;
}

QueryBlockJob base_job(const Plan& plan, const CallViews& views) {
  const AttentionShape& s = plan.shape;
  QueryBlockJob job{};
  job.dims.q_len = s.q_len;
  job.dims.kv_len = s.kv_len;
  job.dims.head_dim = s.head_dim;
  job.dims.value_dim = s.value_dim;
  job.dims.value_dim_padded = plan.value_dim_padded;
  job.dims.block_keys = plan.block_keys;
  job.q.heads_per_row = 1;
  job.score.kind = plan.kind;
  job.score.natural_units = plan.natural_units;
  job.score.additive_weights = plan.additive_weights.empty() ? nullptr : plan.additive_weights.data();
  job.score.distance_factor = plan.distance_factor;
  job.score.transform = plan.transform;
  job.score.softcap = s.softcap;
  job.score.raw_factor = plan.q_factor;
  job.output.empty_value = plan.empty_value;
  job.output.out_type = views.out.type;
  job.output.out_row_stride = views.out.strides[2];
  job.output.out_col_stride = views.out.strides[3];
  job.output.out_head_stride = views.out.strides[1];
  job.output.lse_row_stride = views.lse.strides[2];
  job.output.lse_head_stride = views.lse.strides[1];
  job.visible = visibility(s, 0);
  job.masks = masks_at(s, 0, 0);
  return job;
}

JobMasks masks_at(const AttentionShape& s, std::int64_t b, std::int64_t first_head) {
  JobMasks masks{};
  masks.mask = s.mask.data ? s.mask.data + b * s.mask.strides[0] + first_head * s.mask.strides[1] : nullptr;
  masks.bool_mask =
      s.bool_mask.data ? s.bool_mask.data + b * s.bool_mask.strides[0] + first_head * s.bool_mask.strides[1] : nullptr;
  masks.mask_head_stride = s.mask.strides[1];
  masks.mask_row_stride = s.mask.strides[2];
  masks.mask_col_stride = s.mask.strides[3];
  masks.bool_head_stride = s.bool_mask.strides[1];
  masks.bool_row_stride = s.bool_mask.strides[2];
  masks.bool_col_stride = s.bool_mask.strides[3];
  return masks;
}

void bind_heads(const Plan& plan, QueryBlockJob& job, std::int64_t b, std::int64_t first_head) {
  const AttentionShape& s = plan.shape;
  job.score.alibi_slopes = s.alibi_slopes ? s.alibi_slopes + first_head : nullptr;
  job.output.sinks = s.sinks ? s.sinks + first_head : nullptr;
  job.masks = masks_at(s, b, first_head);
  job.visible = visibility(s, b);
}

}  // namespace flashcpu::detail
