// The fused attention forward kernel, written once and templated on the architecture.
//
// A per-ISA translation unit defines FLASHCPU_ISA_NAMESPACE, includes this file and
// instantiates its kernel table. Everything here lives in that namespace, so the
// linker can never merge one ISA's inline code into another's path.
//
// One call handles one query block (Br rows) of one head against its visible keys:
//   for each key block (Bk keys):
//     for each row tile (MR rows):
//       S  = Q_tile . K_block^T         micro-kernel MR x NR, Q pre-scaled by scale*log2 e
//       mask (causal diagonal, key tail), then per row: m' = max(m, rowmax S),
//       P  = 2^(S - m'), alpha = 2^(m - m'), l = alpha*l + rowsum P
//       O  = alpha*O + P . V_block     micro-kernel MR x (NV vectors), O in the block buffer
//   out = O / l (rows that saw no key: 0)
// Working memory is the scratch the driver passes: O(Br*Dv + MR*Bk), independent of N, M.
#pragma once

#ifndef FLASHCPU_ISA_NAMESPACE
#error "define FLASHCPU_ISA_NAMESPACE before including kernels/forward.hpp"
#endif

#include <cassert>  // xsimd 8.1 uses assert without including it
#include <cstdint>
#include <limits>
#include <type_traits>

#include <immintrin.h>
#include <xsimd/xsimd.hpp>

#include "kernels/kernel_api.hpp"

namespace flashcpu::detail::FLASHCPU_ISA_NAMESPACE {

#include "kernels/vmath.hpp"

inline std::int64_t min_i64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

/// MR: query rows per micro-kernel; NRV: key vectors per S tile (NR = NRV * W keys,
/// the K panel width); NV: value vectors per P.V tile.
template <class Arch, int MR, int NRV, int NV>
struct ForwardKernel {
  using batch = xsimd::batch<float, Arch>;
  static constexpr int W = int(batch::size);
  static constexpr int NR = NRV * W;

  // scores[r][p*NR + c] = sum_d q[r][d] * panel_p[d][c] for MR rows and `panels` panels.
  static void scores_tile(const float* q, std::int64_t D, const float* panels, std::int64_t num_panels,
                          float* scores, std::int64_t scores_stride) {
    for (std::int64_t p = 0; p < num_panels; ++p) {
      const float* panel = panels + p * D * NR;
      batch acc[MR][NRV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NRV; ++v) acc[r][v] = batch(0.0f);
      for (std::int64_t d = 0; d < D; ++d) {
        batch keys[NRV];
        for (int v = 0; v < NRV; ++v) keys[v] = batch::load_aligned(panel + d * NR + v * W);
        for (int r = 0; r < MR; ++r) {
          const batch qv(q[r * D + d]);
          for (int v = 0; v < NRV; ++v) acc[r][v] = xsimd::fma(qv, keys[v], acc[r][v]);
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NRV; ++v) acc[r][v].store_aligned(scores + r * scores_stride + p * NR + v * W);
    }
  }

  // The same scores from K rows read in place (decoding: K is streamed once, packing it
  // would cost a second pass). W keys at a time: per key, one vector of partial dot
  // products per row, then haddp turns W such vectors into W finished scores.
  static void scores_tile_rows(const float* q, std::int64_t D, const float* k, std::int64_t k_stride,
                               std::int64_t num_keys, std::int64_t cols, float* scores, std::int64_t scores_stride) {
    alignas(64) batch partial[MR][W];
    for (std::int64_t j0 = 0; j0 < cols; j0 += W) {
      for (int t = 0; t < W; ++t) {
        batch acc[MR];
        for (int r = 0; r < MR; ++r) acc[r] = batch(0.0f);
        if (j0 + t < num_keys) {
          const float* key = k + (j0 + t) * k_stride;
          for (std::int64_t d = 0; d < D; d += W) {
            const batch kv = batch::load_unaligned(key + d);
            for (int r = 0; r < MR; ++r) acc[r] = xsimd::fma(batch::load_aligned(q + r * D + d), kv, acc[r]);
          }
        }
        for (int r = 0; r < MR; ++r) partial[r][t] = acc[r];
      }
      for (int r = 0; r < MR; ++r) sum_rows<Arch>(partial[r]).store_aligned(scores + r * scores_stride + j0);
    }
  }

  // acc[r][c0 .. c0+NVC*W) = alpha[r] * acc[r][..] + sum_j probs[r][j] * v[j][..].
  template <int NVC>
  static void pv_tile(const float* probs, std::int64_t probs_stride, const float* v, std::int64_t v_stride,
                      std::int64_t num_keys, const float* alpha, float* acc, std::int64_t acc_stride) {
    batch o[MR][NVC];
    for (int r = 0; r < MR; ++r) {
      const batch a(alpha[r]);
      for (int c = 0; c < NVC; ++c) o[r][c] = batch::load_aligned(acc + r * acc_stride + c * W) * a;
    }
    for (std::int64_t j = 0; j < num_keys; ++j) {
      batch vals[NVC];
      for (int c = 0; c < NVC; ++c) vals[c] = batch::load_unaligned(v + j * v_stride + c * W);
      for (int r = 0; r < MR; ++r) {
        const batch p(probs[r * probs_stride + j]);
        for (int c = 0; c < NVC; ++c) o[r][c] = xsimd::fma(p, vals[c], o[r][c]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NVC; ++c) o[r][c].store_aligned(acc + r * acc_stride + c * W);
  }

  static void forward_query_block(const QueryBlockJob& job) {
    const std::int64_t D = job.head_dim, M = job.kv_len, N = job.q_len;
    const std::int64_t Dvp = job.value_dim_padded, Bk = job.block_keys, G = job.heads_per_row;
    const std::int64_t rows_padded = (job.rows + MR - 1) / MR * MR;
    const std::int64_t diag = M - N;  // query i sees keys j <= i + diag when causal
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();

    if (!job.resume) {
      for (std::int64_t i = 0; i < rows_padded * Dvp; ++i) job.acc[i] = 0.0f;
      for (std::int64_t r = 0; r < rows_padded; ++r) {
        job.row_max[r] = neg_inf;
        job.row_sum[r] = 0.0f;
      }
    }
    // Keys past the last row's diagonal are invisible to the whole block: never visited.
    const std::int64_t last_query = job.first_row + (job.rows - 1) / G;
    const std::int64_t key_end = job.causal ? min_i64(job.key_end, last_query + diag + 1) : job.key_end;

    for (std::int64_t j0 = job.key_begin; j0 < key_end; j0 += Bk) {
      const std::int64_t block_end = min_i64(j0 + Bk, key_end);
      for (std::int64_t r0 = 0; r0 < rows_padded; r0 += MR) {
        // Keys this tile can see in this block; a tile wholly above the diagonal is skipped.
        const std::int64_t tile_last_query = job.first_row + (min_i64(r0 + MR, job.rows) - 1) / G;
        const std::int64_t tile_end = job.causal ? min_i64(block_end, tile_last_query + diag + 1) : block_end;
        if (tile_end <= j0) continue;
        const std::int64_t num_keys = tile_end - j0;
        const std::int64_t num_panels = (num_keys + NR - 1) / NR;
        const std::int64_t cols = num_panels * NR;
        if (job.k_panels)
          scores_tile(job.q_packed + r0 * D, D, job.k_panels + (j0 - job.key_begin) * D, num_panels, job.scores, Bk);
        else
          scores_tile_rows(job.q_packed + r0 * D, D, job.k_rows + (j0 - job.key_begin) * job.k_row_stride,
                           job.k_row_stride, num_keys, cols, job.scores, Bk);

        float alpha[MR];
        for (int r = 0; r < MR; ++r) {
          float* s = job.scores + r * Bk;
          // Exclude padded keys and, when causal, keys past this row's diagonal.
          std::int64_t visible = num_keys;
          if (job.causal) visible = min_i64(visible, job.first_row + (r0 + r) / G + diag + 1 - j0);
          if (visible < 0) visible = 0;
          for (std::int64_t j = visible; j < cols; ++j) s[j] = neg_inf;

          batch block_max(neg_inf);
          for (std::int64_t j = 0; j < cols; j += W) block_max = xsimd::max(block_max, batch::load_aligned(s + j));
          const float old_max = job.row_max[r0 + r];
          const float bm = reduce_max<Arch>(block_max);
          const float new_max = bm > old_max ? bm : old_max;
          // A row that has seen no key yet keeps max -inf; subtracting 0 then maps every
          // -inf score to weight 0 instead of NaN.
          const float shift = new_max == neg_inf ? 0.0f : new_max;
          alpha[r] = exp2_nonpositive_scalar<Arch>(old_max - shift);
          const batch shift_v(shift);
          batch sum(0.0f);
          for (std::int64_t j = 0; j < cols; j += W) {
            const batch p = exp2_nonpositive<Arch>(batch::load_aligned(s + j) - shift_v);
            p.store_aligned(s + j);
            sum += p;
          }
          job.row_sum[r0 + r] = alpha[r] * job.row_sum[r0 + r] + xsimd::hadd(sum);
          job.row_max[r0 + r] = new_max;
        }

        const float* v_block = job.v_rows + (j0 - job.key_begin) * job.v_row_stride;
        float* acc = job.acc + r0 * Dvp;
        std::int64_t c = 0;
        for (; c + NV * W <= Dvp; c += NV * W)
          pv_tile<NV>(job.scores, Bk, v_block + c, job.v_row_stride, num_keys, alpha, acc + c, Dvp);
        for (; c < Dvp; c += W) pv_tile<1>(job.scores, Bk, v_block + c, job.v_row_stride, num_keys, alpha, acc + c, Dvp);
      }
    }

    if (!job.finalize) return;
    for (std::int64_t r = 0; r < job.rows; ++r) {
      const float sum = job.row_sum[r];
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // no visible key: zeros
      float* out = job.out + (r / G) * job.out_row_stride + (r % G) * job.out_head_stride;
      const float* acc = job.acc + r * Dvp;
      for (std::int64_t c = 0; c < job.value_dim; ++c) out[c * job.out_col_stride] = acc[c] * inv;
    }
  }
};

}  // namespace flashcpu::detail::FLASHCPU_ISA_NAMESPACE
