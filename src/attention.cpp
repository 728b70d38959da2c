// flashcpu::attention: validate, plan the tiles and the thread split, pack, and run the
// dispatched kernel on each (batch, head, query block).
#include <flashcpu/flashcpu.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "dispatch.hpp"
#include "tuning.hpp"
#include "validate.hpp"

namespace flashcpu {
namespace {

using detail::AttentionShape;
using detail::KernelTable;

std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned scratch, owned by one thread for one call.
struct AlignedBuffer {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> memory;
  explicit AlignedBuffer(std::int64_t floats)
      : memory(static_cast<float*>(std::aligned_alloc(64, std::size_t(round_up(floats > 0 ? floats : 1, 16)) * 4))) {
    if (!memory) throw std::bad_alloc();
  }
  float* get() const { return memory.get(); }
};

template <class T>
const T* element(const TensorView<T>& view, std::int64_t b, std::int64_t h, std::int64_t i) {
  return view.data + b * view.strides[0] + h * view.strides[1] + i * view.strides[2];
}

// K of one head as panels of `nr` keys: panel p is head_dim rows of nr floats (keys
// contiguous), zero past the last key, so the S micro-kernel loads whole vectors.
void pack_key_panels(const float* k, std::int64_t row_stride, std::int64_t col_stride, std::int64_t keys,
                     std::int64_t head_dim, int nr, float* panels) {
  const std::int64_t num_panels = (keys + nr - 1) / nr;
  for (std::int64_t p = 0; p < num_panels; ++p) {
    float* panel = panels + p * head_dim * nr;
    for (int c = 0; c < nr; ++c) {
      const std::int64_t j = p * nr + c;
      if (j < keys) {
        const float* key = k + j * row_stride;
        for (std::int64_t d = 0; d < head_dim; ++d) panel[d * nr + c] = key[d * col_stride];
      } else {
        for (std::int64_t d = 0; d < head_dim; ++d) panel[d * nr + c] = 0.0f;
      }
    }
  }
}

// V of one head as rows of value_dim_padded floats, zero past value_dim.
void pack_value_rows(const float* v, std::int64_t row_stride, std::int64_t col_stride, std::int64_t keys,
                     std::int64_t value_dim, std::int64_t value_dim_padded, float* rows) {
  for (std::int64_t j = 0; j < keys; ++j) {
    float* row = rows + j * value_dim_padded;
    for (std::int64_t c = 0; c < value_dim; ++c) row[c] = v[j * row_stride + c * col_stride];
    for (std::int64_t c = value_dim; c < value_dim_padded; ++c) row[c] = 0.0f;
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
  bool v_in_place;                // V rows already whole vectors of contiguous floats
  float q_factor;                 // scale * log2(e): the kernels' softmax is in base 2
};

Plan make_plan(const KernelTable& kernels, const AttentionShape& s, const TensorView<const float>& v) {
  Plan plan{};
  plan.kernels = &kernels;
  plan.shape = s;
  plan.group = s.q_heads / s.kv_heads;
  const TileConfig tiles = detail::tiles_for(kernels, s.head_dim);
  // Short sequences get blocks no larger than they need, so that small problems still
  // split into enough work items and no time goes to padding.
  plan.block_rows = std::min<std::int64_t>(tiles.block_rows, round_up(s.q_len, kernels.tile_rows));
  plan.block_keys = std::min<std::int64_t>(tiles.block_keys, round_up(std::max<std::int64_t>(s.kv_len, 1), kernels.panel_keys));
  plan.value_dim_padded = round_up(s.value_dim, kernels.vector_floats);
  plan.v_in_place = v.strides[3] == 1 && s.value_dim == plan.value_dim_padded;
  plan.q_factor = float(double(s.scale) * 1.4426950408889634);
  return plan;
}

// Copies query rows into the kernel's layout, pre-scaled by q_factor: packed row r is
// query first_row + r / heads_per_row of head first_head + r % heads_per_row; rows from
// `rows` up to a multiple of mr are zero.
void pack_query_rows(const TensorView<const float>& q, std::int64_t b, std::int64_t first_head,
                     std::int64_t heads_per_row, std::int64_t first_row, std::int64_t rows, int mr, float factor,
                     float* packed) {
  const std::int64_t D = q.shape[3];
  for (std::int64_t r = 0; r < round_up(rows, mr); ++r) {
    float* dst = packed + r * D;
    if (r >= rows) {
      for (std::int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
      continue;
    }
    const float* src = element(q, b, first_head + r % heads_per_row, first_row + r / heads_per_row);
    for (std::int64_t d = 0; d < D; ++d) dst[d] = factor * src[d * q.strides[3]];
  }
}

// Per-thread scratch carved out of one allocation made before the parallel region, so
// a failed allocation is reported to the caller rather than inside OpenMP.
struct ThreadScratch {
  std::int64_t key_panels, value_rows, q_packed, scores, acc, row_stats;  // floats of each part
  std::int64_t total() const {
    return round_up(key_panels, 16) + round_up(value_rows, 16) + round_up(q_packed, 16) + round_up(scores, 16) +
           round_up(acc, 16) + 2 * round_up(row_stats, 16);
  }
};

detail::QueryBlockJob base_job(const Plan& plan) {
  detail::QueryBlockJob job{};
  job.q_len = plan.shape.q_len;
  job.kv_len = plan.shape.kv_len;
  job.head_dim = plan.shape.head_dim;
  job.value_dim = plan.shape.value_dim;
  job.value_dim_padded = plan.value_dim_padded;
  job.block_keys = plan.block_keys;
  job.causal = plan.shape.causal;
  job.heads_per_row = 1;
  return job;
}

// Prefill: work items are (batch, query head, query block); each thread packs the K
// panels (and V rows when needed) of a KV head once and reuses them for every query
// block and every query head of the group it processes.
void run_prefill(const Plan& plan, const TensorView<const float>& q, const TensorView<const float>& k,
                 const TensorView<const float>& v, const TensorView<float>& out) {
  const AttentionShape& s = plan.shape;
  const KernelTable& kernels = *plan.kernels;
  const std::int64_t N = s.q_len, M = s.kv_len, D = s.head_dim;
  const int mr = kernels.tile_rows, nr = kernels.panel_keys;
  const std::int64_t q_blocks = (N + plan.block_rows - 1) / plan.block_rows;

  // Items in (batch, kv head, query head of the group, query block) order, so a thread's
  // consecutive items share one packed KV head. Static contiguous chunks keep a head's
  // packing on one thread; for causal, a head's query blocks are interleaved heavy and
  // light (0, n-1, 1, n-2, ...) so that every chunk gets an even share of the triangle.
  const std::int64_t items = s.batch * s.q_heads * q_blocks;
  const int threads = int(std::min<std::int64_t>(thread_count(s.num_threads), items));

  ThreadScratch parts{};
  parts.key_panels = round_up(std::max<std::int64_t>(M, 1), nr) * D;
  parts.value_rows = plan.v_in_place ? 0 : M * plan.value_dim_padded;
  parts.q_packed = plan.block_rows * D;
  parts.scores = std::int64_t(mr) * plan.block_keys;
  parts.acc = plan.block_rows * plan.value_dim_padded;
  parts.row_stats = plan.block_rows;
  AlignedBuffer scratch(parts.total() * threads);

#pragma omp parallel num_threads(threads)
  {
    float* mine = scratch.get() + parts.total() * omp_get_thread_num();
    auto carve = [&mine](std::int64_t floats) { float* p = mine; mine += round_up(floats, 16); return p; };
    float* key_panels = carve(parts.key_panels);
    float* value_rows = carve(parts.value_rows);
    float* q_packed = carve(parts.q_packed);
    detail::QueryBlockJob job = base_job(plan);
    job.scores = carve(parts.scores);
    job.acc = carve(parts.acc);
    job.row_max = carve(parts.row_stats);
    job.row_sum = carve(parts.row_stats);
    job.q_packed = q_packed;
    job.key_begin = 0;
    job.key_end = M;
    job.k_panels = key_panels;
    job.finalize = true;
    job.out_row_stride = out.strides[2];
    job.out_col_stride = out.strides[3];
    std::int64_t packed_head = -1;

#pragma omp for schedule(static)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t slot = item % q_blocks;
      const std::int64_t bh = item / q_blocks;  // b * Hq + h, with h = hkv * group + g
      const std::int64_t b = bh / s.q_heads, h = bh % s.q_heads, hkv = h / plan.group;
      const std::int64_t qb = !s.causal ? slot : (slot % 2 == 0 ? slot / 2 : q_blocks - 1 - slot / 2);

      const std::int64_t kv_head = b * s.kv_heads + hkv;
      if (kv_head != packed_head) {
        pack_key_panels(element(k, b, hkv, 0), k.strides[2], k.strides[3], M, D, nr, key_panels);
        if (!plan.v_in_place)
          pack_value_rows(element(v, b, hkv, 0), v.strides[2], v.strides[3], M, s.value_dim, plan.value_dim_padded,
                          value_rows);
        packed_head = kv_head;
      }
      job.v_rows = plan.v_in_place ? element(v, b, hkv, 0) : value_rows;
      job.v_row_stride = plan.v_in_place ? v.strides[2] : plan.value_dim_padded;

      job.first_row = qb * plan.block_rows;
      job.rows = std::min(plan.block_rows, N - job.first_row);
      pack_query_rows(q, b, h, 1, job.first_row, job.rows, mr, plan.q_factor, q_packed);
      job.out = out.data + b * out.strides[0] + h * out.strides[1] + job.first_row * out.strides[2];
      kernels.forward_query_block(job);
    }
  }
}

// Decoding (few query rows, many keys): the query heads of a KV-head group are stacked
// as rows of one block, so K and V are read once per KV head rather than once per query
// head. The key range is split into chunks processed in parallel, each leaving an
// unnormalized partial (acc, max, sum); the partials are merged by log-sum-exp in chunk
// order. The split depends on the shape only, so results are identical for any thread
// count. K is packed one key block at a time (streaming, no per-head copy).
void run_decode(const Plan& plan, const TensorView<const float>& q, const TensorView<const float>& k,
                const TensorView<const float>& v, const TensorView<float>& out) {
  const AttentionShape& s = plan.shape;
  const KernelTable& kernels = *plan.kernels;
  const std::int64_t N = s.q_len, M = s.kv_len, D = s.head_dim, G = plan.group;
  const int mr = kernels.tile_rows, nr = kernels.panel_keys;
  const std::int64_t rows = G * N, rows_padded = round_up(rows, mr);
  const std::int64_t Dvp = plan.value_dim_padded, Bk = plan.block_keys;

  // Aim for 64 work items in all (enough for 64 cores), but no chunk under 512 keys,
  // where the per-chunk merge would start to cost more than the parallelism gains.
  constexpr std::int64_t kTargetItems = 64, kMinChunkKeys = 512;
  const std::int64_t kv_heads = s.batch * s.kv_heads;
  const std::int64_t wanted = std::max<std::int64_t>(
      1, std::min((kTargetItems + kv_heads - 1) / kv_heads, (M + kMinChunkKeys - 1) / kMinChunkKeys));
  const std::int64_t chunk_keys = round_up((std::max<std::int64_t>(M, 1) + wanted - 1) / wanted, Bk);
  const std::int64_t chunks = (std::max<std::int64_t>(M, 1) + chunk_keys - 1) / chunk_keys;
  const std::int64_t items = kv_heads * chunks;
  const int threads = int(std::min<std::int64_t>(thread_count(s.num_threads), items));

  // Partial state of every item: acc, row_max, row_sum. At most kTargetItems chunks
  // per call (fewer when B * Hkv is large), so this does not grow with M.
  const std::int64_t partial_floats = rows_padded * Dvp + 2 * rows_padded;
  AlignedBuffer partials(items * partial_floats);
  // K rows are read in place when they are contiguous whole vectors: no reuse to pay
  // for a packing pass.
  const bool k_in_place = k.strides[3] == 1 && D % kernels.vector_floats == 0;
  ThreadScratch parts{};
  parts.key_panels = k_in_place ? 0 : Bk * D;
  parts.value_rows = plan.v_in_place ? 0 : Bk * Dvp;
  parts.q_packed = rows_padded * D;
  parts.scores = std::int64_t(mr) * Bk;
  AlignedBuffer scratch(parts.total() * threads);

#pragma omp parallel num_threads(threads)
  {
    float* mine = scratch.get() + parts.total() * omp_get_thread_num();
    auto carve = [&mine](std::int64_t floats) { float* p = mine; mine += round_up(floats, 16); return p; };
    float* key_panels = carve(parts.key_panels);
    float* value_rows = carve(parts.value_rows);
    float* q_packed = carve(parts.q_packed);
    detail::QueryBlockJob job = base_job(plan);
    job.scores = carve(parts.scores);
    job.q_packed = q_packed;
    job.k_panels = k_in_place ? nullptr : key_panels;
    job.rows = rows;
    job.first_row = 0;
    job.heads_per_row = G;
    job.finalize = false;

#pragma omp for schedule(static)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t head = item / chunks, chunk = item % chunks;
      const std::int64_t b = head / s.kv_heads, hkv = head % s.kv_heads;
      float* partial = partials.get() + item * partial_floats;
      job.acc = partial;
      job.row_max = partial + rows_padded * Dvp;
      job.row_sum = job.row_max + rows_padded;
      pack_query_rows(q, b, hkv * G, G, 0, rows, mr, plan.q_factor, q_packed);

      const std::int64_t chunk_end = std::min(M, (chunk + 1) * chunk_keys);
      job.resume = false;
      for (std::int64_t j0 = chunk * chunk_keys; j0 < chunk_end || !job.resume; j0 += Bk) {
        const std::int64_t keys = std::max<std::int64_t>(0, std::min(Bk, chunk_end - j0));
        if (k_in_place) {
          job.k_rows = element(k, b, hkv, j0);
          job.k_row_stride = k.strides[2];
        } else {
          pack_key_panels(element(k, b, hkv, j0), k.strides[2], k.strides[3], keys, D, nr, key_panels);
        }
        if (plan.v_in_place) {
          job.v_rows = element(v, b, hkv, j0);
          job.v_row_stride = v.strides[2];
        } else {
          pack_value_rows(element(v, b, hkv, j0), v.strides[2], v.strides[3], keys, s.value_dim, Dvp, value_rows);
          job.v_rows = value_rows;
          job.v_row_stride = Dvp;
        }
        job.key_begin = j0;
        job.key_end = j0 + keys;
        kernels.forward_query_block(job);  // the first call (resume = false) also resets the state
        job.resume = true;
      }
    }

    // Merge the chunks of each (batch, kv head) in chunk order: out = sum_c w_c acc_c /
    // sum_c w_c sum_c with w_c = 2^(max_c - max), max the largest chunk max.
#pragma omp for schedule(static)
    for (std::int64_t head = 0; head < kv_heads; ++head) {
      const std::int64_t b = head / s.kv_heads, hkv = head % s.kv_heads;
      const float* first = partials.get() + head * chunks * partial_floats;
      for (std::int64_t r = 0; r < rows; ++r) {
        float row_max = -INFINITY;
        for (std::int64_t c = 0; c < chunks; ++c)
          row_max = std::max(row_max, first[c * partial_floats + rows_padded * Dvp + r]);
        float total = 0.0f;
        for (std::int64_t c = 0; c < chunks; ++c) {
          const float* partial = first + c * partial_floats;
          const float m = partial[rows_padded * Dvp + r];
          if (m != -INFINITY) total += std::exp2(m - row_max) * partial[rows_padded * Dvp + rows_padded + r];
        }
        float* dst = out.data + b * out.strides[0] + (hkv * G + r % G) * out.strides[1] + (r / G) * out.strides[2];
        for (std::int64_t col = 0; col < s.value_dim; ++col) {
          float value = 0.0f;
          for (std::int64_t c = 0; c < chunks; ++c) {
            const float* partial = first + c * partial_floats;
            const float m = partial[rows_padded * Dvp + r];
            if (m != -INFINITY) value += std::exp2(m - row_max) * partial[r * Dvp + col];
          }
          dst[col * out.strides[3]] = total > 0.0f ? value / total : 0.0f;  // no visible key: zeros
        }
      }
    }
  }
}

// Decoding shapes: a handful of query rows per head. Up to 16 rows the stacked-heads
// decode path reads K and V once per KV head and splits the keys across threads.
bool use_decode_path(const AttentionShape& s) { return s.q_len <= 16; }

}  // namespace

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v, TensorView<float> out,
               const AttentionOptions& options) {
  const AttentionShape s = detail::validate_attention(q, k, v, out, options);
  const KernelTable& kernels = detail::active_kernels();
  const Plan plan = make_plan(kernels, s, v);  // reads the tile table: may throw on a bad tuning file
  if (s.empty()) return;
  if (use_decode_path(s))
    run_decode(plan, q, k, v, out);
  else
    run_prefill(plan, q, k, v, out);
}

}  // namespace flashcpu
