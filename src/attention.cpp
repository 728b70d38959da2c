// flashcpu::attention: validate, plan the tiles and the thread split, pack, and run the
// dispatched kernel on each (batch, head, query block).
#include <flashcpu/flashcpu.hpp>

#include <omp.h>

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

}  // namespace

void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v, TensorView<float> out,
               const AttentionOptions& options) {
  const AttentionShape s = detail::validate_attention(q, k, v, out, options);
  const KernelTable& kernels = detail::active_kernels();
  const TileConfig tiles = detail::tiles_for(kernels, s.head_dim);
  if (s.empty()) return;

  const std::int64_t N = s.q_len, M = s.kv_len, D = s.head_dim, Dv = s.value_dim;
  const std::int64_t group = s.q_heads / s.kv_heads;
  const int mr = kernels.tile_rows, nr = kernels.panel_keys;
  // Short sequences get blocks no larger than they need, so that small problems still
  // split into enough work items and no time goes to padding.
  const std::int64_t block_rows = std::min<std::int64_t>(tiles.block_rows, round_up(N, mr));
  const std::int64_t block_keys = std::min<std::int64_t>(tiles.block_keys, round_up(std::max<std::int64_t>(M, 1), nr));
  const std::int64_t q_blocks = (N + block_rows - 1) / block_rows;
  const std::int64_t value_dim_padded = round_up(Dv, kernels.vector_floats);
  // V is read in place when its rows are already whole vectors of contiguous floats.
  const bool v_in_place = v.strides[3] == 1 && Dv == value_dim_padded;
  const std::int64_t key_panels_floats = round_up(std::max<std::int64_t>(M, 1), nr) * D;
  const float q_factor = float(double(s.scale) * 1.4426950408889634);  // scale * log2(e): softmax in base 2

  // Work items in (batch, kv head, query head of the group, query block) order, so a
  // thread's consecutive items share the packed K/V of one head. Static contiguous
  // chunks keep each head's packing on one thread; for causal, the query blocks of a
  // head are interleaved heavy/light (0, n-1, 1, n-2, ...) so every chunk gets an
  // even share of the triangle.
  const std::int64_t items = s.batch * s.q_heads * q_blocks;
  const int threads = static_cast<int>(std::min<std::int64_t>(thread_count(s.num_threads), items));

#pragma omp parallel num_threads(threads)
  {
    AlignedBuffer key_panels(key_panels_floats);
    AlignedBuffer value_rows(v_in_place ? 0 : M * value_dim_padded);
    AlignedBuffer q_packed(block_rows * D);
    AlignedBuffer scores(std::int64_t(mr) * block_keys);
    AlignedBuffer acc(block_rows * value_dim_padded);
    AlignedBuffer row_max(block_rows), row_sum(block_rows);
    std::int64_t packed_head = -1;

#pragma omp for schedule(static)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t slot = item % q_blocks;
      const std::int64_t bh = item / q_blocks;  // b * Hq + h, with h = hkv * group + g
      const std::int64_t b = bh / s.q_heads, h = bh % s.q_heads, hkv = h / group;
      const std::int64_t qb = !s.causal ? slot : (slot % 2 == 0 ? slot / 2 : q_blocks - 1 - slot / 2);

      const std::int64_t kv_head = b * s.kv_heads + hkv;
      if (kv_head != packed_head) {
        pack_key_panels(element(k, b, hkv, 0), k.strides[2], k.strides[3], M, D, nr, key_panels.get());
        if (!v_in_place)
          pack_value_rows(element(v, b, hkv, 0), v.strides[2], v.strides[3], M, Dv, value_dim_padded,
                          value_rows.get());
        packed_head = kv_head;
      }

      const std::int64_t first_row = qb * block_rows;
      const std::int64_t rows = std::min(block_rows, N - first_row);
      float* qp = q_packed.get();
      for (std::int64_t r = 0; r < round_up(rows, mr); ++r)
        for (std::int64_t d = 0; d < D; ++d)
          qp[r * D + d] = r < rows ? q_factor * element(q, b, h, first_row + r)[d * q.strides[3]] : 0.0f;

      detail::QueryBlockJob job{};
      job.q_packed = qp;
      job.rows = rows;
      job.first_row = first_row;
      job.k_panels = key_panels.get();
      job.v_rows = v_in_place ? element(v, b, hkv, 0) : value_rows.get();
      job.v_row_stride = v_in_place ? v.strides[2] : value_dim_padded;
      job.q_len = N;
      job.kv_len = M;
      job.head_dim = D;
      job.value_dim = Dv;
      job.value_dim_padded = value_dim_padded;
      job.block_keys = block_keys;
      job.causal = s.causal;
      job.out = out.data + b * out.strides[0] + h * out.strides[1] + first_row * out.strides[2];
      job.out_row_stride = out.strides[2];
      job.out_col_stride = out.strides[3];
      job.scores = scores.get();
      job.acc = acc.get();
      job.row_max = row_max.get();
      job.row_sum = row_sum.get();
      kernels.forward_query_block(job);
    }
  }
}

}  // namespace flashcpu
