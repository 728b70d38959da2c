// attention_backward: the fused backward's driver. Two passes over the kernels of
// kernels/backward.hpp, each parallel over items that own their outputs outright:
//   1. (batch, KV head, key block): dK and dV of the block, summed over the group's query
//      heads and the query blocks that see it;
//   2. (batch, query head, query block): dQ of the block, summed over its key blocks.
// P and dS are recomputed in each pass, two more products than a single pass, but no
// partial sums are reduced across threads: each output element is summed by one thread in
// an order fixed by the tiles alone, so results are bitwise identical for every thread
// count. Working memory per thread: the tiles, plus one KV head's K and V packed for pass 2.
#include <flashcpu/flashcpu.hpp>

#include <omp.h>

#include <algorithm>

#include "dispatch.hpp"
#include "plan.hpp"
#include "scratch.hpp"
#include "validate.hpp"

namespace flashcpu {
namespace {

using detail::BackwardJob;
using detail::BackwardScratch;
using detail::round_up;

// Query rows and keys per block; rounded up to the variant's tile rows and key panel.
constexpr std::int64_t kBlockRows = 64;
constexpr std::int64_t kBlockKeys = 64;

// The parts of BackwardScratch, in floats, for one thread.
struct BackwardSizes {
  std::int64_t q_rows, dout_rows, rows, key_panels, value_panels, k_rows, keys, center, block, derivs, acc_a, acc_b,
      sums, ones;

  std::int64_t total() const {
    std::int64_t t = 0;
    for (std::int64_t part : {q_rows, dout_rows, rows, rows, key_panels, value_panels, k_rows, keys, center, block,
                              block, derivs, acc_a, acc_b, sums, ones})
      t += round_up(part, 16);
    return t;
  }
  BackwardScratch carve(float* memory, int thread) const {
    float* next = memory + total() * thread;
    auto take = [&next](std::int64_t floats) {
      float* p = next;
      next += round_up(floats, 16);
      return p;
    };
    BackwardScratch m{};
    m.q_rows = take(q_rows);
    m.dout_rows = take(dout_rows);
    m.lse2 = take(rows);
    m.delta = take(rows);
    m.k_panels = take(key_panels);
    m.v_panels = take(value_panels);
    m.k_rows = take(k_rows);
    m.key_bias = take(keys);
    m.center = take(center);
    m.probs = take(block);
    m.dscores = take(block);
    m.derivs = take(derivs);
    m.acc_a = take(acc_a);
    m.acc_b = take(acc_b);
    m.sums = take(sums);
    m.ones = take(ones);
    return m;
  }
};

detail::HeadRows head_rows(const TensorView<const float>& t, std::int64_t b, std::int64_t h) {
  return {t.data ? t.data + b * t.strides[0] + h * t.strides[1] : nullptr, t.strides[1], t.strides[2], t.strides[3]};
}
detail::HeadRowsOut head_rows(const TensorView<float>& t, std::int64_t b, std::int64_t h) {
  return {t.data ? t.data + b * t.strides[0] + h * t.strides[1] : nullptr, t.strides[1], t.strides[2], t.strides[3]};
}

// Zeros every element of a gradient view.
void write_zeros(const TensorView<float>& t) {
  for (std::int64_t b = 0; b < t.shape[0]; ++b)
    for (std::int64_t h = 0; h < t.shape[1]; ++h)
      for (std::int64_t i = 0; i < t.shape[2]; ++i)
        for (std::int64_t c = 0; c < t.shape[3]; ++c)
          t.data[b * t.strides[0] + h * t.strides[1] + i * t.strides[2] + c * t.strides[3]] = 0.0f;
}

}  // namespace

void attention_backward(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
                        TensorView<const float> out, TensorView<const float> lse, TensorView<const float> dout,
                        TensorView<float> dq, TensorView<float> dk, TensorView<float> dv,
                        const AttentionOptions& options) {
  const detail::AttentionShape s = detail::validate_backward(q, k, v, out, lse, dout, dq, dk, dv, options);
  const detail::KernelTable& kernels = detail::active_kernels(detail::DType::f32);
  const std::int64_t B = s.batch, Hq = s.q_heads, Hkv = s.kv_heads, N = s.q_len, M = s.kv_len;
  const std::int64_t D = s.head_dim, Dv = s.value_dim;
  if (B == 0 || Hkv == 0) return;
  if (Hq == 0 || N == 0 || M == 0) {  // no pair of a query and a key: every gradient is 0
    write_zeros(dq);
    write_zeros(dk);
    write_zeros(dv);
    return;
  }
  const std::int64_t group = Hq / Hkv, W = kernels.vector_floats, mr = kernels.tile_rows;
  const std::int64_t Br = round_up(std::min(kBlockRows, N), mr);
  const std::int64_t Bk = round_up(std::min(kBlockKeys, M), kernels.panel_keys);
  const std::int64_t Dp = round_up(D, W), Dvp = round_up(Dv, W), Mp = round_up(M, kernels.panel_keys);

  BackwardSizes sizes{};
  sizes.q_rows = Br * Dp;
  sizes.dout_rows = Br * Dvp;
  sizes.rows = Br;
  sizes.key_panels = Mp * D;  // pass 2 packs the whole head; pass 1 a block
  sizes.value_panels = Mp * Dv;
  sizes.k_rows = Mp * Dp;
  sizes.keys = Mp;
  sizes.center = D;
  sizes.block = Br * Bk;
  sizes.derivs = mr * Bk;
  sizes.acc_a = std::max(Br, Bk) * Dp;
  sizes.acc_b = Bk * Dvp;
  sizes.sums = std::max(Br, Bk);
  sizes.ones = 16;

  const std::int64_t key_blocks = (M + Bk - 1) / Bk, q_blocks = (N + Br - 1) / Br;
  const std::int64_t key_items = B * Hkv * key_blocks, query_items = B * Hq * q_blocks;
  const int threads = int(std::min<std::int64_t>(detail::thread_count(s.num_threads), std::max(key_items, query_items)));
  detail::AlignedBuffer scratch(sizes.total() * threads);  // before any thread starts: failure reaches the caller

  BackwardJob base{};
  base.q_len = N;
  base.kv_len = M;
  base.head_dim = D;
  base.value_dim = Dv;
  base.head_dim_padded = Dp;
  base.value_dim_padded = Dvp;
  base.block_rows = Br;
  base.block_keys = Bk;
  base.group = group;
  base.gaussian = s.score == Score::gaussian;
  base.scale = s.scale;
  base.transform = s.softcap > 0 ? detail::Transform::softcap : detail::Transform::none;
  base.softcap = s.softcap;
  // The fields of (batch b, KV head hkv).
  auto bind = [&](BackwardJob& job, std::int64_t b, std::int64_t hkv) {
    const std::int64_t h0 = hkv * group;  // the group's first query head
    job.alibi_slopes = s.alibi_slopes ? s.alibi_slopes + h0 : nullptr;
    job.masks = detail::masks_at(s, b, h0);
    job.visible = detail::visibility(s, b);
    job.q = head_rows(q, b, h0);
    job.out = head_rows(out, b, h0);
    job.dout = head_rows(dout, b, h0);
    job.lse = head_rows(lse, b, h0);
    job.dq = head_rows(dq, b, h0);
    job.k = head_rows(k, b, hkv);
    job.v = head_rows(v, b, hkv);
    job.dk = head_rows(dk, b, hkv);
    job.dv = head_rows(dv, b, hkv);
  };

  // Pass 1: dK and dV, one key block per item.
#pragma omp parallel num_threads(threads)
  {
    BackwardJob job = base;
    job.scratch = sizes.carve(scratch.get(), omp_get_thread_num());
#pragma omp for schedule(dynamic) nowait
    for (std::int64_t item = 0; item < key_items; ++item) {
      const std::int64_t bk = item / key_blocks, kb = item % key_blocks;
      bind(job, bk / Hkv, bk % Hkv);
      job.first = kb * Bk;
      job.count = std::min(Bk, M - job.first);
      kernels.backward_keys(job);
    }
  }

  // Pass 2: dQ, one query block per item. Items in (batch, KV head, query head, block)
  // order in static chunks, so that a thread packs each KV head it meets once; causal and
  // windowed blocks interleaved heavy and light (0, n-1, 1, n-2, ...) for even chunks.
  const bool triangular = s.causal || s.window_left >= 0 || s.window_right >= 0;
#pragma omp parallel num_threads(threads)
  {
    BackwardJob job = base;
    job.scratch = sizes.carve(scratch.get(), omp_get_thread_num());
    std::int64_t packed_head = -1;
#pragma omp for schedule(static) nowait
    for (std::int64_t item = 0; item < query_items; ++item) {
      const std::int64_t slot = item % q_blocks, bh = item / q_blocks;
      const std::int64_t b = bh / Hq, h = bh % Hq, hkv = h / group;
      const std::int64_t qb = !triangular ? slot : (slot % 2 == 0 ? slot / 2 : q_blocks - 1 - slot / 2);
      bind(job, b, hkv);
      job.head = h % group;
      job.first = qb * Br;
      job.count = std::min(Br, N - job.first);
      job.head_packed = packed_head == b * Hkv + hkv;
      packed_head = b * Hkv + hkv;
      kernels.backward_queries(job);
    }
  }
}

}  // namespace flashcpu
