// attention_backward: the fused backward's driver, over the kernels of
// kernels/backward.hpp. No partial sums are reduced across threads: each output element
// is summed in an order fixed by the blocks alone, so results are bitwise identical for
// every thread count and schedule (detail::BackwardSchedule):
//  - the one pass over whole heads, items (batch, KV head): dK, dV and dQ of the head,
//    P and dS once per block pair; when there are enough heads to go round the threads;
//  - the one pass over key chunks in turn, items (batch, KV head, key chunk), for few
//    heads on many threads: dK and dV of the chunk's key blocks, and their share of the
//    group's dQ, which the chunks of a head add in key order, each query block's rows
//    waiting for the chunk before (detail::DqTurns). The group's query side is packed
//    before, by query block, shared by the threads, and its dq written after;
//  - two passes, when a group's query rows would take too much memory:
//      1. (batch, KV head, key block): dK and dV of the block, summed over the group's
//         query heads and the query blocks that see it;
//      2. (batch, query head, query block): dQ of the block, summed over its key blocks;
//    P and dS are recomputed in each pass, two more products.
// Working memory: per thread the tiles and a block's query side, or (whole heads) every
// query row of its group; the key chunks in turn share every query row of each group.
// Rows whose lse is too coarse to recompute P from (masked by -1e9, say) get their own
// statistics first (backward_row_stats).
// The kernels: an fp32 variant's, 16-bit data widened, or for the dot product on bf16 data
// (or on fp32 and fp16 data under allow_bf16_compute, rounded to bf16 as packed) the
// vdpbf16ps variant's where the level has it (detail::backward_kernels).
#include <flashcpu/flashcpu.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

#include "dispatch.hpp"
#include "plan.hpp"
#include "scratch.hpp"
#include "tuning.hpp"
#include "validate.hpp"

namespace flashcpu {
namespace {

using detail::BackwardJob;
using detail::BackwardScratch;
using detail::round_up;
using detail::saturated_lines;
using detail::saturated_product;
using detail::saturated_sum;

// Query rows and keys per block; rounded up to the variant's tile rows and key panel.
// P64 backward, AVX2, 2 threads, rows x keys: 64 x 64, 32 x 64, 64 x 128, 128 x 128 and
// 32 x 128 all ran at 117-139 GFLOP/s, within the noise of two alternating runs of each.
constexpr std::int64_t kBlockRows = 64;
constexpr std::int64_t kBlockKeys = 64;
static_assert(kBlockKeys <= detail::kMaxBackwardBlockKeys, "rounded up to a key panel (at most 64 keys)");
// The largest scratch per thread of the one pass, which holds every query row of a group
// (whole heads: per thread; key chunks in turn: per head, averaged over the threads).
constexpr std::int64_t kOnePassBytes = std::int64_t(64) << 20;
// The key side of a chunk of the one pass (K panels and rows, V panels, the dK and dV
// accumulators), which visits each query block against all of the chunk's key blocks:
// the query side is read once per chunk. 2 threads, Zen 5, one head (key chunks in
// turn), N = M = 8192, D = 64, in one process: 300 GFLOP/s with chunks of 1 block, 326
// with 2 or 4, 319 with 8; two heads, causal, N = M = 4096, D = 128 (whole heads): 1 to 4
// blocks within 2%, 8 blocks 5-8% slower. About 320 KiB: 4 blocks at D = 64, 2 at 128.
constexpr std::int64_t kChunkBytes = std::int64_t(320) << 10;

// A key chunk's passed turns (detail::DqTurns), a cache line each: neighbours are
// written by different threads.
struct alignas(64) Turns {
  std::atomic<std::int64_t> passed{0};
};

// The parts of BackwardScratch, in floats, for one thread (or, with no keys and blocks,
// the query side of a group).
struct BackwardSizes {
  std::int64_t query_rows;  // rows of the query side: a block, or every row of the group
  std::int64_t keys;        // keys of the key side: a block, or a chunk of blocks (the one pass)
  std::int64_t dq_rows;     // rows of dQ accumulated
  std::int64_t head_dim, value_dim, head_dim_padded, value_dim_padded, block_rows, block_keys, tile_rows;
  bool pairs;  // the variant's pair products (kernels/backward.hpp): their parts, else none

  // Calls part(&BackwardScratch::field, floats) for every part, in memory order.
  template <class Part>
  void layout(Part part) const {
    part(&BackwardScratch::q_rows, saturated_product(query_rows, head_dim_padded));
    part(&BackwardScratch::dout_rows, saturated_product(query_rows, value_dim_padded));
    part(&BackwardScratch::row_shift, query_rows);
    part(&BackwardScratch::row_scale, query_rows);
    part(&BackwardScratch::delta, query_rows);
    part(&BackwardScratch::k_panels, saturated_product(keys, head_dim));
    part(&BackwardScratch::v_panels, saturated_product(keys, value_dim));
    part(&BackwardScratch::k_rows, saturated_product(keys, head_dim_padded));
    part(&BackwardScratch::probs, saturated_product(block_rows, block_keys));
    part(&BackwardScratch::dscores, saturated_product(block_rows, block_keys));
    part(&BackwardScratch::derivs, saturated_product(tile_rows, block_keys));
    part(&BackwardScratch::dk_acc, saturated_product(keys, head_dim_padded));
    part(&BackwardScratch::dv_acc, saturated_product(keys, value_dim_padded));
    part(&BackwardScratch::dq_acc, saturated_product(dq_rows, head_dim_padded));
    part(&BackwardScratch::ones, 16);
    const std::int64_t pair_rows = pairs ? query_rows / 2 + query_rows % 2 : 0;  // saturated sizes stay so
    part(&BackwardScratch::q_pairs, pairs ? saturated_product(query_rows, (head_dim + 1) / 2) : 0);
    part(&BackwardScratch::dout_pairs, pairs ? saturated_product(query_rows, (value_dim + 1) / 2) : 0);
    part(&BackwardScratch::q_row_pairs, saturated_product(pair_rows, head_dim_padded));
    part(&BackwardScratch::dout_row_pairs, saturated_product(pair_rows, value_dim_padded));
    part(&BackwardScratch::row_flags, pairs ? query_rows : 0);
    part(&BackwardScratch::weight_pairs, pairs ? saturated_product(block_rows, block_keys) : 0);
  }
  // Floats per thread, 64-byte aligned parts; detail::kSaturated when that overflows (a
  // stride-0 view can be huge and valid), which the allocation then refuses.
  std::int64_t total() const {
    std::int64_t t = 0;
    layout([&](float* BackwardScratch::*, std::int64_t floats) {
      t = saturated_sum(t, saturated_lines(floats));
    });
    return t;
  }
  // The part-th copy in `memory`: a thread's, or (group sides) a head's.
  BackwardScratch carve(float* memory, std::int64_t part) const {
    BackwardScratch m{};
    float* next = memory + total() * part;
    layout([&](float* BackwardScratch::*field, std::int64_t floats) {
      m.*field = next;
      next += round_up(floats, 16);
    });
    return m;
  }
};

template <class T>
detail::HeadRows head_rows(const TensorView<const T>& t, std::int64_t b, std::int64_t h) {
  return {t.data ? t.data + b * t.strides[0] + h * t.strides[1] : nullptr, detail::dtype_of<T>(), t.strides[1],
          t.strides[2], t.strides[3]};
}
template <class T>
detail::HeadRowsOut head_rows(const TensorView<T>& t, std::int64_t b, std::int64_t h) {
  return {t.data ? t.data + b * t.strides[0] + h * t.strides[1] : nullptr, detail::dtype_of<T>(), t.strides[1],
          t.strides[2], t.strides[3]};
}

// Zeros every element of a gradient view (all bits clear: +0 in every type). A view with
// no elements may still have huge outer sizes (2^40 query heads over 0 rows): it is not
// walked.
template <class T>
void write_zeros(const TensorView<T>& t) {
  if (t.shape[0] == 0 || t.shape[1] == 0 || t.shape[2] == 0 || t.shape[3] == 0) return;
  for (std::int64_t b = 0; b < t.shape[0]; ++b)
    for (std::int64_t h = 0; h < t.shape[1]; ++h)
      for (std::int64_t i = 0; i < t.shape[2]; ++i)
        for (std::int64_t c = 0; c < t.shape[3]; ++c)
          t.data[b * t.strides[0] + h * t.strides[1] + i * t.strides[2] + c * t.strides[3]] = T{};
}

}  // namespace

namespace detail {
void await_turn(const DqTurns& turns, std::int64_t t) {
  if (!turns.previous) return;
  for (int spins = 0; turns.previous->load(std::memory_order_acquire) <= t;)
    if (spins < 64)
      __builtin_ia32_pause(), ++spins;
    else
      std::this_thread::yield();  // the previous chunk's thread may share this core
}
void pass_turns(const DqTurns& turns, std::int64_t past) {
  if (turns.own) turns.own->store(past, std::memory_order_release);
}

bool coarse_lse(float lse) {
  const float lse2 = lse * 1.4426950408889634f;  // +-inf beyond the range: coarse too
  return (lse2 >= 1024.0f || lse2 <= -1024.0f) && lse != -std::numeric_limits<float>::infinity();
}
// For the dot product on bf16 data (or on fp32 and fp16 data under allow_bf16_compute,
// which the variant rounds to bf16 as it packs them), the active level's vdpbf16ps
// variant (on the amx level, the one below its tile variant) when it has a backward;
// else the active level's fp32 variant, 16-bit data widened.
const KernelTable& backward_kernels(DType data, Score score, bool allow_bf16_compute) {
  if ((data == DType::bf16 || allow_bf16_compute) && score == Score::dot_product) {
    const KernelTable* pairs = &active_kernels(DType::bf16);
    if (pairs->tiles) pairs = &kernels_below(pairs->isa, DType::bf16);
    if (pairs->bf16_products && pairs->backward_keys) return *pairs;
  }
  return active_kernels(DType::f32);
}
}  // namespace detail

namespace {

// The driver for every element type T of q, k, v, out, dout and the gradients, reading
// and writing T through HeadRows (kernels/backward.hpp). `forced`: the kernels to run
// instead of backward_kernels' choice (tests).
template <class T>
void backward_any(TensorView<const T> q, TensorView<const T> k, TensorView<const T> v, TensorView<const T> out,
                  TensorView<const float> lse, TensorView<const T> dout, TensorView<T> dq, TensorView<T> dk,
                  TensorView<T> dv, const AttentionOptions& options,
                  detail::BackwardSchedule schedule = detail::BackwardSchedule::automatic,
                  std::int64_t chunk_blocks = 0, const detail::KernelTable* forced = nullptr) {
  const detail::AttentionShape s = detail::validate_backward(q, k, v, out, lse, dout, dq, dk, dv, options);
  const detail::KernelTable& kernels =
      forced ? *forced : detail::backward_kernels(detail::dtype_of<T>(), s.score, s.allow_bf16_compute);
  if (!kernels.backward_keys || (kernels.bf16_products && s.score != Score::dot_product))
    throw std::logic_error(std::string("flashcpu: the backward cannot run on ") + kernels.name);
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
  if (Bk > detail::kMaxBackwardBlockKeys)  // a key panel wider than any variant's (64 keys)
    throw std::logic_error("flashcpu: backward key blocks of " + std::to_string(Bk) +
                           " keys exceed the kernels' limit");
  const std::int64_t Dp = round_up(D, W), Dvp = round_up(Dv, W);
  const bool pairs = kernels.bf16_products;  // the scratch of pair products (kernels/backward.hpp)

  // The schedule. The one pass does five products per block pair; two passes do seven
  // but need no memory for a whole group's query rows. The one pass runs over whole heads
  // when they keep the threads busy (at least 90% of the rounds' slots filled), else over
  // the heads' key chunks, threads taking turns at dQ (detail::DqTurns), when there are
  // chunks for every thread and the groups' query sides fit kOnePassBytes per thread.
  // Else whole heads if the old rule of thumb (rounds x 5 <= heads per thread x 7) and
  // the memory allow, else two passes.
  const std::int64_t key_blocks = (M + Bk - 1) / Bk, q_blocks = (N + Br - 1) / Br;
  const std::int64_t heads = B * Hkv;
  // Its five products: two and a half times a forward's two.
  const std::int64_t wanted = detail::thread_count(s.num_threads, 2.5 * detail::forward_flops(s),
                                                      detail::min_flops_per_thread_for(kernels.isa));
  if (chunk_blocks <= 0) {
    // About kChunkBytes of key side, but no fewer than 4 chunks per thread while a chunk
    // can shrink (short M on few heads).
    const double key_bytes = double(sizeof(float)) * double(D + Dv + 2 * Dp + Dvp) * double(Bk);
    const double by_bytes = std::floor(double(kChunkBytes) / key_bytes);
    const double by_threads = std::floor(double(heads) * double(key_blocks) / (4.0 * double(wanted)));
    chunk_blocks = std::int64_t(std::max(1.0, std::min({by_bytes, by_threads, double(key_blocks)})));
  }
  const std::int64_t Ck = Bk * std::min(chunk_blocks, key_blocks);  // keys per chunk
  const std::int64_t key_chunks = (M + Ck - 1) / Ck;
  std::int64_t key_items = 0, chunk_items = 0, query_items = 0;
  if (__builtin_mul_overflow(heads, key_blocks, &key_items) || __builtin_mul_overflow(heads, key_chunks, &chunk_items) ||
      __builtin_mul_overflow(B * Hq, q_blocks, &query_items))
    throw std::bad_alloc();  // more blocks than any memory holds the tensors of
  const std::int64_t group_rows = saturated_product(group, q_blocks * Br);  // a group's query rows, padded per block
  const BackwardSizes one_pass{group_rows, Ck, group_rows, D, Dv, Dp, Dvp, Br, Bk, mr, pairs};
  // Two passes (and the coarse rows' statistics): the query side and the key side of a
  // block.
  const BackwardSizes two_pass{Br, Bk, Br, D, Dv, Dp, Dvp, Br, Bk, mr, pairs};
  // Key chunks in turn: each head's query side, shared by the threads, and per thread a
  // block's query side (the coarse rows' statistics) and a chunk's key side.
  const BackwardSizes group_side{group_rows, 0, group_rows, D, Dv, Dp, Dvp, 0, 0, 0, pairs};
  const BackwardSizes in_turn_thread{Br, Ck, Br, D, Dv, Dp, Dvp, Br, Bk, mr, pairs};
  constexpr std::int64_t kBudget = kOnePassBytes / std::int64_t(sizeof(float));
  const std::int64_t shared_floats = saturated_product(group_side.total(), heads);
  const bool one_pass_fits = one_pass.total() <= kBudget;
  const bool in_turn_fits = chunk_items >= wanted && shared_floats / wanted <= kBudget;
  const double slots = double((heads + wanted - 1) / wanted) * double(wanted);  // rounds x threads
  if (schedule == detail::BackwardSchedule::automatic)
    schedule = one_pass_fits && double(heads) >= 0.9 * slots          ? detail::BackwardSchedule::whole_heads
               : in_turn_fits                                          ? detail::BackwardSchedule::key_blocks_in_turn
               : one_pass_fits && slots * 5.0 <= double(heads) * 7.0 ? detail::BackwardSchedule::whole_heads
                                                                       : detail::BackwardSchedule::two_passes;
  const bool whole_heads = schedule == detail::BackwardSchedule::whole_heads;
  const bool in_turn = schedule == detail::BackwardSchedule::key_blocks_in_turn;
  const BackwardSizes& sizes = whole_heads ? one_pass : in_turn ? in_turn_thread : two_pass;
  const std::int64_t items = whole_heads ? heads : in_turn ? chunk_items : std::max(key_items, query_items);
  const int threads = int(std::min<std::int64_t>(wanted, items));
  const std::int64_t scratch_floats = saturated_product(sizes.total(), threads);
  // Before any thread starts: failure reaches the caller.
  detail::AlignedBuffer scratch(scratch_floats);
  detail::AlignedBuffer shared(in_turn ? shared_floats : 0);
  std::unique_ptr<Turns[]> turns(in_turn ? new Turns[std::size_t(chunk_items)] : nullptr);

  // Coarse rows (see BackwardJob::coarse_shift): their statistics for the whole call, B x
  // Hq x N each, only when there is one.
  bool any_coarse = false;
  for (std::int64_t b = 0; b < B && !any_coarse; ++b)
    for (std::int64_t h = 0; h < Hq && !any_coarse; ++h)
      for (std::int64_t i = 0; i < N && !any_coarse; ++i)
        any_coarse = detail::coarse_lse(lse.data[b * lse.strides[0] + h * lse.strides[1] + i * lse.strides[2]]);
  std::int64_t stats_floats = 0;
  if (any_coarse && (__builtin_mul_overflow(B * Hq, N, &stats_floats) || stats_floats > PTRDIFF_MAX / 8))
    throw std::bad_alloc();
  std::unique_ptr<float[]> coarse_stats(any_coarse ? new float[std::size_t(2 * stats_floats)]() : nullptr);

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
    job.sinks = s.sinks ? s.sinks + h0 : nullptr;
    job.coarse_shift = any_coarse ? coarse_stats.get() + (b * Hq + h0) * N : nullptr;
    job.coarse_scale = any_coarse ? coarse_stats.get() + (B * Hq + b * Hq + h0) * N : nullptr;
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

  // Items (batch, query head, query block), for the coarse rows' statistics, pass 2 and
  // the key chunks' packing and writing; returns the item's KV head of the call, b * Hkv
  // + hkv.
  auto bind_query_block = [&](BackwardJob& job, std::int64_t item) {
    const std::int64_t bh = item / q_blocks, b = bh / Hq, h = bh % Hq;
    bind(job, b, h / group);
    job.head = h % group;
    job.first = item % q_blocks * Br;
    job.count = std::min(Br, N - job.first);
    return b * Hkv + h / group;
  };
  // entry(job) for every query block of the group, in order (the one pass).
  auto for_query_blocks = [&](BackwardJob& job, void (*entry)(const BackwardJob&)) {
    for (job.head = 0; job.head < group; ++job.head)
      for (job.first = 0; job.first < N; job.first += Br) {
        job.count = std::min(Br, N - job.first);
        entry(job);
      }
  };
  if (any_coarse) {
    // Statistics of the coarse rows; two-pass-sized scratch suffices (a block per item).
    detail::ItemQueue queue(query_items);
    detail::run_parallel(threads, [&](const detail::Team& team) {
      BackwardJob job = base;
      job.scratch = two_pass.carve(scratch.get(), team.index);
      for (std::int64_t item; queue.take(&item);) {
        bind_query_block(job, item);
        kernels.backward_row_stats(job);
      }
    });
  }

  if (whole_heads) {
    detail::ItemQueue queue(heads);
    detail::run_parallel(threads, [&](const detail::Team& team) {
      BackwardJob job = base;
      job.scratch = sizes.carve(scratch.get(), team.index);
      for (std::int64_t item; queue.take(&item);) {
        bind(job, item / Hkv, item % Hkv);
        for_query_blocks(job, kernels.backward_pack_queries);
        for (std::int64_t j0 = 0; j0 < M; j0 += Ck) {
          job.first = j0;
          job.count = std::min(Ck, M - j0);
          kernels.backward_key_chunk(job);
        }
        for_query_blocks(job, kernels.backward_write_queries);
      }
    });
    return;
  }

  if (in_turn) {
    // The query side of head `head` (batch x KV head) in its share of `shared`, the rest of
    // the scratch the thread's.
    auto group_scratch = [&](BackwardScratch m, std::int64_t head) {
      const BackwardScratch g = group_side.carve(shared.get(), head);
      m.q_rows = g.q_rows, m.dout_rows = g.dout_rows, m.dq_acc = g.dq_acc;
      m.row_shift = g.row_shift, m.row_scale = g.row_scale, m.delta = g.delta;
      m.q_pairs = g.q_pairs, m.dout_pairs = g.dout_pairs, m.row_flags = g.row_flags;
      m.q_row_pairs = g.q_row_pairs, m.dout_row_pairs = g.dout_row_pairs;
      return m;
    };
    // Items (batch, query head, query block), each packing or writing its block.
    auto per_query_block = [&](void (*entry)(const BackwardJob&)) {
      detail::StealingShares shares(query_items, threads);
      detail::run_parallel(threads, [&](const detail::Team& team) {
        BackwardJob job = base;
        const BackwardScratch own = sizes.carve(scratch.get(), team.index);
        for (std::int64_t item; shares.take(team, &item);) {
          job.scratch = group_scratch(own, bind_query_block(job, item));
          entry(job);
        }
      });
    };
    per_query_block(kernels.backward_pack_queries);
    // Items (batch, KV head, key chunk), handed out in that order. A chunk waits only for
    // the one before it, which was handed out before it and is running or done; the
    // lowest unfinished item waits for no one. So every item finishes, on any number of
    // threads.
    detail::ItemQueue queue(chunk_items);
    detail::run_parallel(threads, [&](const detail::Team& team) {
      BackwardJob job = base;
      const BackwardScratch own = sizes.carve(scratch.get(), team.index);
      for (std::int64_t item; queue.take(&item);) {
        const std::int64_t head = item / key_chunks, kc = item % key_chunks;
        bind(job, head / Hkv, head % Hkv);
        job.scratch = group_scratch(own, head);
        job.first = kc * Ck;
        job.count = std::min(Ck, M - job.first);
        job.turns = {kc > 0 ? &turns[std::size_t(item - 1)].passed : nullptr, &turns[std::size_t(item)].passed};
        kernels.backward_key_chunk(job);
      }
    });
    per_query_block(kernels.backward_write_queries);
    return;
  }

  // Pass 1: dK and dV, one key block per item.
  detail::ItemQueue key_queue(key_items);
  detail::run_parallel(threads, [&](const detail::Team& team) {
    BackwardJob job = base;
    job.scratch = sizes.carve(scratch.get(), team.index);
    for (std::int64_t item; key_queue.take(&item);) {
      const std::int64_t bk = item / key_blocks, kb = item % key_blocks;
      bind(job, bk / Hkv, bk % Hkv);
      job.first = kb * Bk;
      job.count = std::min(Bk, M - job.first);
      kernels.backward_keys(job);
    }
  });

  // Pass 2: dQ, one query block per item. Causal and windowed blocks are interleaved
  // heavy and light (0, n-1, 1, n-2, ...) so that static shares start even.
  const bool triangular = s.causal || s.window_left >= 0 || s.window_right >= 0;
  detail::StealingShares shares(query_items, threads);
  detail::run_parallel(threads, [&](const detail::Team& team) {
    BackwardJob job = base;
    job.scratch = sizes.carve(scratch.get(), team.index);
    for (std::int64_t item; shares.take(team, &item);) {
      const std::int64_t slot = item % q_blocks, qb = !triangular ? slot : (slot % 2 == 0 ? slot / 2 : q_blocks - 1 - slot / 2);
      bind_query_block(job, item - slot + qb);
      kernels.backward_queries(job);
    }
  });
}

}  // namespace

void attention_backward(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
                        TensorView<const float> out, TensorView<const float> lse, TensorView<const float> dout,
                        TensorView<float> dq, TensorView<float> dk, TensorView<float> dv,
                        const AttentionOptions& options) {
  backward_any(q, k, v, out, lse, dout, dq, dk, dv, options);
}
namespace detail {
void attention_backward_scheduled(BackwardSchedule schedule, std::int64_t chunk_blocks, TensorView<const float> q,
                                  TensorView<const float> k,
                                  TensorView<const float> v, TensorView<const float> out,
                                  TensorView<const float> lse, TensorView<const float> dout, TensorView<float> dq,
                                  TensorView<float> dk, TensorView<float> dv, const AttentionOptions& options) {
  backward_any(q, k, v, out, lse, dout, dq, dk, dv, options, schedule, chunk_blocks);
}
}  // namespace detail
void attention_backward(TensorView<const bf16> q, TensorView<const bf16> k, TensorView<const bf16> v,
                        TensorView<const bf16> out, TensorView<const float> lse, TensorView<const bf16> dout,
                        TensorView<bf16> dq, TensorView<bf16> dk, TensorView<bf16> dv, const AttentionOptions& options) {
  backward_any(q, k, v, out, lse, dout, dq, dk, dv, options);
}
namespace detail {
template <class T>
void attention_backward_with(const KernelTable& kernels, BackwardSchedule schedule, std::int64_t chunk_blocks,
                             TensorView<const T> q, TensorView<const T> k, TensorView<const T> v,
                             TensorView<const T> out, TensorView<const float> lse, TensorView<const T> dout,
                             TensorView<T> dq, TensorView<T> dk, TensorView<T> dv, const AttentionOptions& options) {
  backward_any(q, k, v, out, lse, dout, dq, dk, dv, options, schedule, chunk_blocks, &kernels);
}
template <class T>
using In = TensorView<const T>;
template void attention_backward_with(const KernelTable&, BackwardSchedule, std::int64_t, In<float>, In<float>,
                                      In<float>, In<float>, In<float>, In<float>, TensorView<float>,
                                      TensorView<float>, TensorView<float>, const AttentionOptions&);
template void attention_backward_with(const KernelTable&, BackwardSchedule, std::int64_t, In<bf16>, In<bf16>,
                                      In<bf16>, In<bf16>, In<float>, In<bf16>, TensorView<bf16>, TensorView<bf16>,
                                      TensorView<bf16>, const AttentionOptions&);
template void attention_backward_with(const KernelTable&, BackwardSchedule, std::int64_t, In<fp16>, In<fp16>,
                                      In<fp16>, In<fp16>, In<float>, In<fp16>, TensorView<fp16>, TensorView<fp16>,
                                      TensorView<fp16>, const AttentionOptions&);
}  // namespace detail
void attention_backward(TensorView<const fp16> q, TensorView<const fp16> k, TensorView<const fp16> v,
                        TensorView<const fp16> out, TensorView<const float> lse, TensorView<const fp16> dout,
                        TensorView<fp16> dq, TensorView<fp16> dk, TensorView<fp16> dv, const AttentionOptions& options) {
  backward_any(q, k, v, out, lse, dout, dq, dk, dv, options);
}

}  // namespace flashcpu
