// Prefill: work items are (batch, query head, query block); each thread packs the K
// panels (and V rows when needed) of a KV head once and reuses them for every query
// block and every query head of the group it processes.
#include <algorithm>

#include "plan.hpp"
#include "scratch.hpp"

namespace flashcpu::detail {
namespace {

ThreadScratch prefill_scratch(const Plan& plan) {
  const AttentionShape& s = plan.shape;
  const std::int64_t M = s.kv_len, D = s.head_dim, nr = plan.kernels->panel_keys;
  require_scratch_product(M, std::max(D, plan.value_dim_padded));  // a KV head's panels and value rows
  ThreadScratch parts{};
  parts.key_panels = plan.kernels->key_panel_floats(M, D);
  parts.key_bias = plan.centered ? round_up(std::max<std::int64_t>(M, 1), nr) : 0;
  parts.value_rows = plan.v_in_place_prefill ? 0 : plan.kernels->value_floats(M, plan.value_dim_padded);
  parts.q_packed = plan.kernels->query_floats(plan.block_rows, D);
  parts.row_bias = plan.centered ? plan.block_rows : 0;
  parts.center = D;
  parts.scores = plan.kernels->score_rows(plan.kernels->tile_rows) * plan.block_keys;
  parts.acc = saturated_product(plan.block_rows, plan.value_dim_padded);
  parts.row_stats = plan.block_rows;
  return parts;
}

// Packs K (and V unless read in place) of KV head (b, hkv) into the thread's scratch and
// points the job at them; returns whether its keys need the exact Gaussian form.
bool pack_kv_head(const Plan& plan, const CallViews& views, std::int64_t b, std::int64_t hkv,
                  const ThreadScratch::Parts& mine, QueryBlockJob& job) {
  const AttentionShape& s = plan.shape;
  load_center(plan, views.k, b, hkv, mine.center);
  const float spread = plan.kernels->pack_key_panels(views.k.rows_from(b, hkv, 0), s.kv_len, s.head_dim,
                                                     plan.centered ? mine.center : nullptr, plan.bias_scale,
                                                     mine.key_panels, mine.key_bias);
  const bool exact = needs_exact_distance(plan, spread);
  bind_distance_form(plan, job, exact, mine.key_bias, mine.row_bias);
  if (plan.v_in_place_prefill) {
    job.keys.v_rows = views.v.row(b, hkv, 0);
    job.keys.v_row_stride = job.keys.v_rows ? views.v.strides[2] : 0;
  } else {
    plan.kernels->pack_value_rows(views.v.rows_from(b, hkv, 0), s.kv_len, s.value_dim, plan.value_dim_padded,
                                  mine.value_rows);
    job.keys.v_rows = mine.value_rows;
    job.keys.v_row_stride = plan.value_dim_padded;
  }
  return exact;
}

}  // namespace

void run_prefill(const Plan& plan, const CallViews& views) {
  const AttentionShape& s = plan.shape;
  const KernelTable& kernels = *plan.kernels;
  const std::int64_t N = s.q_len;
  const int mr = kernels.tile_rows;
  const std::int64_t q_blocks = (N + plan.block_rows - 1) / plan.block_rows;
  const bool triangular = s.causal || s.window_right >= 0 || s.window_left >= 0;

  // Items in (batch, kv head, query head of the group, query block) order, so a thread's
  // consecutive items share one packed KV head. Contiguous shares keep a head's packing
  // on one thread, and a thread done early takes items from the back of another's share
  // (StealingShares), packing that head too; for causal and windowed attention a head's
  // query blocks are interleaved heavy and light (0, n-1, 1, n-2, ...) so every share
  // starts with an even load.
  const std::int64_t items = s.batch * s.q_heads * q_blocks;
  const int threads =
      int(std::min<std::int64_t>(thread_count(s.num_threads, forward_flops(s), plan.min_flops_per_thread), items));
  const ThreadScratch parts = prefill_scratch(plan);
  AlignedBuffer scratch(saturated_product(parts.total(), threads));
  StealingShares shares(items, threads, 1);

  run_parallel(threads, [&](const Team& team) {
    const ThreadScratch::Parts mine = parts.carve(scratch.get(), team.index);
    QueryBlockJob job = base_job(plan, views);
    job.q.q_packed = mine.q_packed;
    job.keys.k_panels = mine.key_panels;
    job.keys.begin = 0;
    job.keys.end = s.kv_len;
    job.score.key_bias = plan.centered ? mine.key_bias : nullptr;
    job.score.row_bias = plan.centered ? mine.row_bias : nullptr;
    job.state = {false, true, mine.scores, mine.acc, mine.row_max, mine.row_sum};
    std::int64_t packed_head = -1;
    bool exact = false;

    for (std::int64_t item; shares.take(team, &item);) {
      const std::int64_t slot = item % q_blocks;
      const std::int64_t bh = item / q_blocks;  // b * Hq + h, with h = hkv * group + g
      const std::int64_t b = bh / s.q_heads, h = bh % s.q_heads, hkv = h / plan.group;
      const std::int64_t qb = !triangular ? slot : (slot % 2 == 0 ? slot / 2 : q_blocks - 1 - slot / 2);

      const std::int64_t kv_head = b * s.kv_heads + hkv;
      if (kv_head != packed_head) {
        exact = pack_kv_head(plan, views, b, hkv, mine, job);
        packed_head = kv_head;
      }
      job.q.first_row = qb * plan.block_rows;
      job.q.rows = std::min(plan.block_rows, N - job.q.first_row);
      pack_queries(plan, views.q, b, h, 1, job.q.first_row, job.q.rows, mr, mine.center, exact, mine.q_packed,
                   mine.row_bias);
      bind_heads(plan, job, b, h);
      job.output.out = views.out.row(b, h, job.q.first_row);
      job.output.lse = views.lse_at(b, h, job.q.first_row);
      kernels.forward_query_block(job);
    }
  });
}

}  // namespace flashcpu::detail
