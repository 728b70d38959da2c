// attention_backward: the fused backward's driver, over the kernels of
// kernels/backward.hpp. Every item owns its outputs outright: no partial sums are
// reduced across threads, and each output element is summed by one thread in an order
// fixed by the tiles alone, so results are bitwise identical for every thread count.
// Two schedules, with bitwise the same results (kernels/backward.hpp):
//  - one pass, items (batch, KV head): dK, dV and dQ of the head, P and dS once per
//    block pair; when there are enough heads to go round the threads;
//  - two passes, parallel over blocks, for few heads on many threads:
//      1. (batch, KV head, key block): dK and dV of the block, summed over the group's
//         query heads and the query blocks that see it;
//      2. (batch, query head, query block): dQ of the block, summed over its key blocks;
//    P and dS are recomputed in each pass, two more products.
// Working memory per thread: the tiles, plus every query row of the group (one pass) or
// one KV head's K and V packed (pass 2).
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
// P64 backward, AVX2, 2 threads, rows x keys: 64 x 64, 32 x 64, 64 x 128, 128 x 128 and
// 32 x 128 all ran at 117-139 GFLOP/s, within the noise of two alternating runs of each.
constexpr std::int64_t kBlockRows = 64;
constexpr std::int64_t kBlockKeys = 64;
// The largest per-thread scratch of the one-pass schedule (it holds every query row of
// a group): beyond it, two passes.
constexpr std::int64_t kOnePassBytes = std::int64_t(64) << 20;

// The parts of BackwardScratch, in floats, for one thread.
struct BackwardSizes {
  std::int64_t query_rows;  // rows of the query side: a block, or every row of the group
  std::int64_t keys;        // keys of the key side: a block, or the whole head (padded)
  std::int64_t dq_rows;     // rows of dQ accumulated
  std::int64_t head_dim, value_dim, head_dim_padded, value_dim_padded, block_rows, block_keys, tile_rows;

  // Calls part(&BackwardScratch::field, floats) for every part, in memory order.
  template <class Part>
  void layout(Part part) const {
    part(&BackwardScratch::q_rows, query_rows * head_dim_padded);
    part(&BackwardScratch::dout_rows, query_rows * value_dim_padded);
    part(&BackwardScratch::lse2, query_rows);
    part(&BackwardScratch::delta, query_rows);
    part(&BackwardScratch::k_panels, keys * head_dim);
    part(&BackwardScratch::v_panels, keys * value_dim);
    part(&BackwardScratch::k_rows, keys * head_dim_padded);
    part(&BackwardScratch::probs, block_rows * block_keys);
    part(&BackwardScratch::dscores, block_rows * block_keys);
    part(&BackwardScratch::derivs, tile_rows * block_keys);
    part(&BackwardScratch::dk_acc, block_keys * head_dim_padded);
    part(&BackwardScratch::dv_acc, block_keys * value_dim_padded);
    part(&BackwardScratch::dq_acc, dq_rows * head_dim_padded);
    part(&BackwardScratch::ones, 16);
  }
  std::int64_t total() const {  // 64-byte aligned parts
    std::int64_t t = 0;
    layout([&t](float* BackwardScratch::*, std::int64_t floats) { t += round_up(floats, 16); });
    return t;
  }
  BackwardScratch carve(float* memory, int thread) const {
    BackwardScratch m{};
    float* next = memory + total() * thread;
    layout([&](float* BackwardScratch::*field, std::int64_t floats) {
      m.*field = next;
      next += round_up(floats, 16);
    });
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
  const std::int64_t Dp = round_up(D, W), Dvp = round_up(Dv, W);

  // The schedule. One pass per KV head does five products per block pair; two passes do
  // seven but split a head's work into blocks. One pass when whole heads keep the
  // threads as busy: rounds of heads x 5 <= heads per thread x 7 (and its per-thread
  // scratch, every query row of a group, stays below kOnePassBytes).
  const std::int64_t key_blocks = (M + Bk - 1) / Bk, q_blocks = (N + Br - 1) / Br;
  const std::int64_t heads = B * Hkv, key_items = heads * key_blocks, query_items = B * Hq * q_blocks;
  const std::int64_t wanted = detail::thread_count(s.num_threads);
  BackwardSizes one_pass{group * q_blocks * Br, Bk, group * q_blocks * Br, D, Dv, Dp, Dvp, Br, Bk, mr};
  const bool whole_heads = (heads + wanted - 1) / wanted * 5 <= heads * 7 / wanted &&
                           one_pass.total() * std::int64_t(sizeof(float)) <= kOnePassBytes;
  // Two passes: the query side of a block; the key side of the whole head (pass 2).
  const BackwardSizes two_pass{Br, round_up(M, kernels.panel_keys), Br, D, Dv, Dp, Dvp, Br, Bk, mr};
  const BackwardSizes& sizes = whole_heads ? one_pass : two_pass;
  const int threads = int(std::min<std::int64_t>(wanted, whole_heads ? heads : std::max(key_items, query_items)));
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

  if (whole_heads) {
#pragma omp parallel num_threads(threads)
    {
      BackwardJob job = base;
      job.scratch = sizes.carve(scratch.get(), omp_get_thread_num());
#pragma omp for schedule(dynamic) nowait
      for (std::int64_t item = 0; item < heads; ++item) {
        bind(job, item / Hkv, item % Hkv);
        kernels.backward_head(job);
      }
    }
    return;
  }

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
