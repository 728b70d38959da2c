// Decoding (few query rows, many keys; also short prompts, see kDecodeMaxStackedRows):
// the query heads of a KV-head group are stacked as rows of one block, so K and V are
// read once per KV head rather than once per query head. The key range is split into
// chunks processed in parallel, each leaving an unnormalized partial (acc, max, sum); the
// partials are merged by log-sum-exp in chunk order (merge.hpp). The split depends on the
// shape only, so results are identical for any thread count. K is read in place (dot
// product) or packed one key block at a time: no copy of a whole head, no buffer that
// grows with M.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <limits>

#include "merge.hpp"
#include "plan.hpp"
#include "scratch.hpp"

namespace flashcpu::detail {
namespace {

// The geometry of one decode call.
struct DecodeSplit {
  bool k_in_place;       // K rows read where they are
  bool lanes, small;     // which kernel: rows as vector lanes, the small tile, else the full one
  int mr;                // rows per tile of that kernel
  std::int64_t rows, rows_padded;
  std::int64_t chunk_keys, chunks, items;
  std::int64_t step;     // keys per kernel call
  std::int64_t partial_floats;
  void (*forward)(const QueryBlockJob&);
};

// Aim for 64 work items in all (enough for 64 cores), but no chunk under 512 keys,
// where the per-chunk merge would start to cost more than the parallelism gains.
constexpr std::int64_t kTargetItems = 64, kMinChunkKeys = 512;
static_assert(kTargetItems + 1 <= kMaxMergeParts, "every chunk of a head and its sink fit one merge");
// The lanes kernel (rows in vector lanes) does no padded or horizontal work, and since Q's
// transpose runs in registers (kernels/forward.hpp) its setup costs little: with 8 or 16
// lanes it runs at any key count. 16 stacked rows, fp32, 1 thread, tiles' time / lanes'
// time, median of 4000 calls, Zen 5: AVX-512 1.19x at M = 16, 1.17-1.24x at M = 64 to 256
// (D = 64), 1.08-1.20x at D = 128; AVX2 1.04-1.05x at M = 16 to 256, 1.00x at D = 128.
// SSE2's 4 lanes still lose below some hundreds of keys (M = 16: 0.90x, M = 64 and 256:
// 0.89x); there the earlier measurement on AVX2 stands (M = 1024: 1.03-1.06x).
constexpr std::int64_t kLanesMinKeysSse2 = 512;

DecodeSplit split_decode(const Plan& plan, const CallViews& views) {
  const AttentionShape& s = plan.shape;
  const KernelTable& kernels = *plan.kernels;
  DecodeSplit d{};
  d.rows = plan.group * s.q_len;
  // K rows are read in place when they are contiguous whole vectors of a plain dot
  // product: no reuse to pay for a packing pass. (AMX tiles read K panels only: each key
  // block is packed for a tile of 16 or more stacked rows, see bf16_products_take.) The
  // vdpbf16ps kernel reads a bf16 row as 32-bit words of pairs of elements: D a multiple
  // of two vectors, and each row on a 4-byte boundary.
  const std::int64_t k_vector_elements = kernels.bf16_products ? 2 * kernels.vector_floats : kernels.vector_floats;
  // (The stride of a dimension of size 1 is never stepped, so it may be odd.)
  const auto even_steps = [&views](int dim) { return views.k.shape[dim] == 1 || views.k.strides[dim] % 2 == 0; };
  const bool k_on_words = !kernels.bf16_products || (even_steps(0) && even_steps(1) && even_steps(2) &&
                                                      reinterpret_cast<std::uintptr_t>(views.k.data) % 4 == 0);
  d.k_in_place = !kernels.tiles && plan.kind == ScoreKind::dot && !plan.centered && views.k.type == kernels.kv &&
                 views.k.strides[3] == 1 && s.head_dim % k_vector_elements == 0 && k_on_words;
  // Kernel: with a vector's worth of rows or more (on SSE2 also kLanesMinKeysSse2 keys or
  // more) and nothing but exclusions on the scores, the rows become vector lanes where the
  // variant has a lanes kernel (fp32 K); else the smaller tile when it pads less (e.g. 4
  // stacked heads: one 4-row tile, not a 6-row one with 2 empty rows): decoding is bound
  // by memory, and padded rows only add compute.
  d.lanes = kernels.forward_lanes_block && d.k_in_place && !plan.natural_units && d.rows >= kernels.vector_floats &&
            (kernels.vector_floats >= 8 || s.kv_len >= kLanesMinKeysSse2);
  // (The vdpbf16ps variant decodes on its small kernel only: its full one pairs V.)
  d.small = (kernels.bf16_products && !kernels.tiles) || round_up(d.rows, kernels.small_tile_rows) < round_up(d.rows, kernels.tile_rows);
  d.mr = d.lanes ? kernels.vector_floats : d.small ? kernels.small_tile_rows : kernels.tile_rows;
  d.forward = d.lanes   ? kernels.forward_lanes_block
              : d.small ? kernels.forward_small_block
                        : kernels.forward_query_block;
  // The vdpbf16ps variant's small kernel widens V as stored: bf16_products_take routed
  // only calls whose V it can read in place here.
  assert(kernels.tiles || !kernels.pair_values || plan.v_in_place);
  assert(d.forward);
  d.rows_padded = round_up(d.rows, d.mr);
  const std::int64_t M = std::max<std::int64_t>(s.kv_len, 1), Bk = plan.block_keys;
  const std::int64_t kv_heads = s.batch * s.kv_heads;
  const std::int64_t wanted =
      std::max<std::int64_t>(1, std::min((kTargetItems + kv_heads - 1) / kv_heads, (M + kMinChunkKeys - 1) / kMinChunkKeys));
  d.chunk_keys = round_up((M + wanted - 1) / wanted, Bk);
  d.chunks = (M + d.chunk_keys - 1) / d.chunk_keys;
  d.items = kv_heads * d.chunks;
  // Keys per kernel call: a block when this path packs K or V one block at a time, else
  // the whole chunk (the kernel walks its blocks itself, transposing Q and starting its
  // prefetch stream once per chunk rather than once per block).
  d.step = !d.k_in_place || !plan.v_in_place ? Bk : d.chunk_keys;
  // acc, row_max, row_sum of one item; a multiple of 16 keeps each acc 64-byte aligned.
  d.partial_floats =
      saturated_lines(saturated_sum(saturated_product(d.rows_padded, plan.value_dim_padded), 2 * d.rows_padded));
  return d;
}

ThreadScratch decode_scratch(const Plan& plan, const DecodeSplit& d) {
  const std::int64_t D = plan.shape.head_dim, Bk = plan.block_keys;
  const KernelTable& kernels = *plan.kernels;
  require_scratch_product(std::max(Bk, d.rows_padded), std::max(D, plan.value_dim_padded));
  ThreadScratch parts{};
  parts.key_panels = d.k_in_place ? 0 : kernels.key_panel_floats(Bk, D);
  parts.key_bias = plan.centered ? Bk : 0;
  parts.value_rows = plan.v_in_place ? 0 : kernels.value_floats(Bk, plan.value_dim_padded);
  parts.q_packed = kernels.query_floats(d.rows_padded, D);
  parts.row_bias = plan.centered ? d.rows_padded : 0;
  parts.center = D;
  // Lanes: the transposed Q of every group of rows follows the scores.
  parts.scores = kernels.score_rows(d.mr) * Bk + (d.lanes ? d.rows_padded * D : 0);  // fits: checked above
  return parts;
}

// Points the job at keys [j0, j0 + keys) of KV head (b, hkv), packing what is not read
// in place; the Gaussian form may change from one key block to the next, and the Q rows
// follow it.
void bind_key_block(const Plan& plan, const CallViews& views, const DecodeSplit& d, std::int64_t b,
                    std::int64_t hkv, std::int64_t j0, std::int64_t keys, const ThreadScratch::Parts& mine,
                    bool* exact, QueryBlockJob& job) {
  const AttentionShape& s = plan.shape;
  const std::int64_t G = plan.group;
  if (d.k_in_place) {
    job.keys.k_rows = views.k.row(b, hkv, j0);
    job.keys.k_row_stride = views.k.strides[2];
  } else {
    const float spread = plan.kernels->pack_key_panels(views.k.rows_from(b, hkv, j0), keys, s.head_dim,
                                                       plan.centered ? mine.center : nullptr, plan.bias_scale,
                                                       mine.key_panels, mine.key_bias);
    if (plan.centered && needs_exact_distance(plan, spread) != *exact) {
      *exact = !*exact;
      pack_queries(plan, views.q, b, hkv * G, G, 0, d.rows, d.mr, mine.center, *exact, mine.q_packed, mine.row_bias);
      bind_distance_form(plan, job, *exact, mine.key_bias, mine.row_bias);
    }
  }
  if (plan.v_in_place) {
    job.keys.v_rows = views.v.row(b, hkv, j0);
    job.keys.v_row_stride = job.keys.v_rows ? views.v.strides[2] : 0;
  } else {
    plan.kernels->pack_value_rows(views.v.rows_from(b, hkv, j0), keys, s.value_dim, plan.value_dim_padded,
                                  mine.value_rows);
    job.keys.v_rows = mine.value_rows;
    job.keys.v_row_stride = plan.value_dim_padded;
  }
  job.keys.begin = j0;
  job.keys.end = j0 + keys;
}

// One work item: chunk `chunk` of KV head (b, hkv), leaving its partial state in the
// job's acc/row_max/row_sum (or, with a single chunk, finishing the rows).
void run_chunk(const Plan& plan, const CallViews& views, const DecodeSplit& d, std::int64_t b, std::int64_t hkv,
               std::int64_t chunk, std::int64_t next_item, const ThreadScratch::Parts& mine, QueryBlockJob& job) {
  const std::int64_t G = plan.group, M = plan.shape.kv_len;
  load_center(plan, views.k, b, hkv, mine.center);
  pack_queries(plan, views.q, b, hkv * G, G, 0, d.rows, d.mr, mine.center, false, mine.q_packed, mine.row_bias);
  bool exact = false;
  bind_distance_form(plan, job, exact, mine.key_bias, mine.row_bias);
  bind_heads(plan, job, b, hkv * G);
  job.output.out = views.out.row(b, hkv * G, 0);
  job.output.lse = views.lse_at(b, hkv * G, 0);

  // Keys past the batch's key length are never read.
  const std::int64_t chunk_end = std::min({M, (chunk + 1) * d.chunk_keys, job.visible.key_limit});
  // The rows the thread reads next (item next_item, or none), for the prefetch stream of
  // the chunk's last kernel call: only when K and V are read in place (packed rows come
  // from the packing pass instead), and only keys below the next batch's key length.
  const void* next_k = nullptr;
  const void* next_v = nullptr;
  std::int64_t next_keys = 0;
  if (next_item >= 0 && d.k_in_place && plan.v_in_place) {
    const std::int64_t head = next_item / d.chunks, first_key = next_item % d.chunks * d.chunk_keys;
    const std::int64_t nb = head / plan.shape.kv_heads, nh = head % plan.shape.kv_heads;
    next_keys = std::min(d.chunk_keys, std::min(M, visibility(plan.shape, nb).key_limit) - first_key);
    if (next_keys > 0) {
      next_k = views.k.row(nb, nh, first_key);
      next_v = views.v.row(nb, nh, first_key);
    }
  }
  job.state.resume = false;
  for (std::int64_t j0 = chunk * d.chunk_keys; j0 < chunk_end || !job.state.resume; j0 += d.step) {
    const std::int64_t keys = std::max<std::int64_t>(0, std::min(d.step, chunk_end - j0));
    job.state.finalize = d.chunks == 1 && j0 + d.step >= chunk_end;
    const bool last_call = j0 + d.step >= chunk_end;
    job.keys.next_k_rows = last_call ? next_k : nullptr;
    job.keys.next_v_rows = last_call ? next_v : nullptr;
    job.keys.next_keys = last_call ? next_keys : 0;
    if (keys == 0) {  // an empty chunk (key length): only reset the partial state
      job.keys.begin = job.keys.end = j0;
    } else {
      bind_key_block(plan, views, d, b, hkv, j0, keys, mine, &exact, job);
    }
    d.forward(job);  // the first call (resume = false) also resets the state
    job.state.resume = true;
  }
}

// Merges the chunks of KV head `head` (b * Hkv + hkv) in chunk order into out and lse.
void merge_chunks(const Plan& plan, const CallViews& views, const DecodeSplit& d, float* partials, std::int64_t head) {
  const AttentionShape& s = plan.shape;
  const std::int64_t b = head / s.kv_heads, hkv = head % s.kv_heads, G = plan.group;
  const std::int64_t Dvp = plan.value_dim_padded;
  float* first = partials + head * d.chunks * d.partial_floats;
  Partial parts[kTargetItems + 1];  // chunks <= kTargetItems, and the sink
  for (std::int64_t r = 0; r < d.rows; ++r) {
    for (std::int64_t c = 0; c < d.chunks; ++c) {
      const float* partial = first + c * d.partial_floats;
      const float row_max = partial[d.rows_padded * Dvp + r];  // log2 units
      parts[c] = {partial + r * Dvp, 1, float(row_max * 0.6931471805599453),
                  partial[d.rows_padded * Dvp + d.rows_padded + r]};
    }
    // A sink is one more part, with no values.
    const std::int64_t h = hkv * G + r % G, i = r / G;
    std::int64_t count = d.chunks;
    if (s.sinks) parts[count++] = {nullptr, 0, s.sinks[h], 1.0f};
    // Merged into chunk 0's accumulator row, then stored in the output's type.
    float* merged = first + r * Dvp;
    const float lse = merge_partials(parts, count, s.value_dim, plan.empty_value, merged, 1);
    if (s.value_dim > 0) store_values(merged, s.value_dim, views.out.type, views.out.row(b, h, i), 0, views.out.strides[3]);
    if (float* row_lse = views.lse_at(b, h, i)) *row_lse = lse;
  }
}

}  // namespace

std::string describe_decode(const Plan& plan, const AnyView& k) {
  CallViews views{};
  views.k = k;  // the split reads K's layout only
  const DecodeSplit d = split_decode(plan, views);
  std::string kernel;
  if (d.lanes)
    kernel = "lanes (" + std::to_string(d.mr) + " rows per vector)";
  else
    kernel = std::to_string(d.mr) + "-row tiles";
  return "decode " + kernel + ", K " + (d.k_in_place ? "in place" : "packed per block") +
         ", bc=" + std::to_string(plan.block_keys);
}

void run_decode(const Plan& plan, const CallViews& views) {
  const AttentionShape& s = plan.shape;
  const DecodeSplit d = split_decode(plan, views);
  const int threads =
      int(std::min<std::int64_t>(thread_count(s.num_threads, forward_flops(s), plan.min_flops_per_thread), d.items));
  // Partial state of every item. At most kTargetItems chunks per call (fewer when B * Hkv
  // is large), so this does not grow with M.
  AlignedBuffer partials(saturated_product(d.items, d.partial_floats));
  const ThreadScratch parts = decode_scratch(plan, d);
  AlignedBuffer scratch(saturated_product(parts.total(), threads));
  StealingShares shares(d.items, threads);

  run_parallel(threads, [&](const Team& team) {
    const ThreadScratch::Parts mine = parts.carve(scratch.get(), team.index);
    QueryBlockJob job = base_job(plan, views);
    job.q = {mine.q_packed, d.rows, 0, plan.group};
    job.keys.k_panels = d.k_in_place ? nullptr : mine.key_panels;
    job.score.key_bias = plan.centered ? mine.key_bias : nullptr;
    job.score.row_bias = plan.centered ? mine.row_bias : nullptr;
    job.state.scores = mine.scores;

    for (std::int64_t item; shares.take(team, &item);) {
      const std::int64_t head = item / d.chunks, chunk = item % d.chunks;
      float* partial = partials.get() + item * d.partial_floats;
      job.state.acc = partial;
      job.state.row_max = partial + d.rows_padded * plan.value_dim_padded;
      job.state.row_sum = job.state.row_max + d.rows_padded;
      run_chunk(plan, views, d, head / s.kv_heads, head % s.kv_heads, chunk, shares.peek(team), mine, job);
    }

    // Single-chunk calls skip the merge and its barrier (every thread takes the same
    // branch); a team of one (a direct call) needs no barrier.
    if (d.chunks > 1) {
      if (team.size > 1) {
#pragma omp barrier
      }
      const std::int64_t heads = s.batch * s.kv_heads;
      for (std::int64_t head = team.first(heads), past = team.past(heads); head < past; ++head)
        merge_chunks(plan, views, d, partials.get(), head);
    }
  });
}

}  // namespace flashcpu::detail
