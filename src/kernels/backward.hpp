// The fused attention backward (FlashAttention-2), templated on the architecture and built
// from the fp32 forward's micro-kernels (kernels/forward.hpp): the S tile over K panels, the
// score epilogue, and the P.V tiles. Included by each fp32 variant's translation unit and
// the vdpbf16ps variant's (kernels/variant.hpp), inside its ISA namespace like the
// forward, and by tests/emulation.cpp.
//
// For a block of query rows against a block of keys, with P recomputed from the saved lse:
//   S  = f(Q, K) (scale, soft-capping, ALiBi, masks: the forward's epilogue)
//   P  = 2^(S log2 e - lse log2 e) on the visible pairs, 0 elsewhere
//   dP = dO V^T                     the S micro-kernel again, dO as queries, V as panels
//   dS = P (dP - D_i) [times 1 - tanh^2(r / c) under soft-capping], D_i = dO_i . O_i
// and then (backward_keys, one key block)
//   dV += P^T dO,  dK += dS^T Q     P.V tiles with the roles of rows and keys exchanged
// or (backward_queries, one query block)
//   dQ += dS K                      the P.V tile, keys with dS = 0 kept out (garbage rows)
// or both (the one pass: backward_key_chunk, every query row of the group at hand).
// The Gaussian's dQ and dK are summed from exact differences instead (exact_keys). The
// scale (and the Gaussian's factor 2) is applied when the rows are written. 16-bit q, k,
// v, out and dout are widened as they are packed, and 16-bit gradients rounded once as
// they are written; everything between is this fp32 code. Working memory: the scratch the
// driver passes.
//
// With PairDot (the vdpbf16ps variant, for bf16 data and the dot product, and for fp32
// and fp16 data under allow_bf16_compute: their q, k, v and dout rounded to bf16 as they
// are packed, so that the call computes what a bf16 call on the rounded inputs does), all
// five products take pairs, two products per lane and instruction, as the forward with
// pair values does:
//   S, dP   the forward's S tile: q and dout as bf16 pairs of dimensions (the scratch's
//           q_pairs and dout_pairs), K and V as pair panels in the room of the fp32 ones.
//           Products of bf16 values are exact in fp32 and each pair adds them with two
//           roundings, as two FMAs would: the fp32 error bound, the sums in another order
//           (and vdpbf16ps reads subnormal inputs as zero);
//   dV, dK  over pairs of query rows: P and dS rounded to bf16 by pairs of rows
//           (weight_pairs), dout and q by pairs of rows (dout_row_pairs, q_row_pairs);
//   dQ      over pairs of keys: dS rounded to bf16 in place by pairs of keys (as the
//           forward rounds P), K by pairs of keys in the room of k_rows.
// Rounding P and dS costs each of their terms up to 2^-8 of its size (the forward rounds
// P so too). A block pair whose P (or dS) is zero throughout adds nothing by pairs
// either: vdpbf16ps would flush a subnormal accumulator, which the fp32 tiles' zeros
// leave, and the schedules differ in which such block pairs they visit. A pair product of a zero weight and an inf or NaN operand is NaN where the
// fp32 tiles skip the zero: a query block whose q (or dout) holds one takes the fp32 tiles
// for dK (or dV), and a chunk of keys whose K holds one is added apart for dQ, skipping
// zero weights (add_nonfinite_chunk), as the forward does for V. The choice depends only
// on the block's data, so results stay bitwise alike across schedules and threads.
#pragma once

#ifndef FLASHCPU_ISA_NAMESPACE
#error "define FLASHCPU_ISA_NAMESPACE before including kernels/backward.hpp"
#endif

#include "kernels/forward.hpp"

namespace flashcpu::detail::FLASHCPU_ISA_NAMESPACE {

template <class Arch, int MR, int NRV, int NV, int PR, class PairDot = void>
struct BackwardKernel {
  using Fwd = ForwardKernel<Arch, MR, NRV, NV, PR, float>;
  static constexpr bool kPairs = !std::is_void<PairDot>::value;
  using batch = typename Fwd::batch;
  static constexpr int W = Fwd::W;
  static constexpr int NR = Fwd::NR;
  // Keys per tile of the exchanged products (dV, dK). With 32 registers, the forward's P.V
  // tile rows (AVX-512: 6 keys x 4 vectors, 24 accumulators); against 4 keys, Zen 5, 2
  // threads, tools/ab_builds, median per-round ratio in three runs: P64's backward 1.004
  // to 1.036 as fast, C128's 1.014 to 1.089, S16K's 1.022 (one run). With 16 registers, 4
  // keys: AVX2's 6 x 2 tiles ran P64's and C128's backward 0.85x and 0.83x as fast (the
  // cause not studied).
  static constexpr int KR = Fwd::kVectorRegisters >= 32 ? PR : 4;
  static_assert(!kPairs || MR % 2 == 0, "pair products take the tiles' rows in pairs");

  static std::int64_t lo(const BackwardJob& job, std::int64_t i) { return visible_lo(job.visible, i); }
  static std::int64_t hi(const BackwardJob& job, std::int64_t i) { return visible_hi(job.visible, i); }
  static std::int64_t key_end(const BackwardJob& job) { return min_i64(job.kv_len, job.visible.key_limit); }
  static std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }
  // S and dP by pairs (kPairs): one step of vdpbf16ps per pair of dimensions.
  struct PairStep {
    batch operator()(std::int64_t, batch q, batch k, batch acc) const {
      if constexpr (kPairs) return PairDot::step(acc, q, k);
      return acc;
    }
  };
  static float lse_at(const BackwardJob& job, std::int64_t g, std::int64_t i) {
    return static_cast<const float*>(job.lse.data)[g * job.lse.head_stride + i * job.lse.row_stride];
  }

  // The rows' elements by type: fp32 as they are, 16-bit widened exactly (elements.hpp).
  // The loops below are those of fp32 for every type, so a 16-bit call computes bitwise
  // what an fp32 call computes on the widened values. typed() calls f with the rows'
  // data at element `offset` as a pointer to their element type.
  template <class F>
  static decltype(auto) typed(const HeadRows& rows, std::int64_t offset, F&& f) {
    switch (rows.type) {
      case DType::bf16: return f(static_cast<const bf16*>(rows.data) + offset);
      case DType::f16: return f(static_cast<const f16*>(rows.data) + offset);
      case DType::f32: break;
    }
    return f(static_cast<const float*>(rows.data) + offset);
  }
  // Pairs of rows 2t and 2t + 1 of `src` (fp32 rows `stride` apart), t < pair_rows, rounded
  // to bf16 over columns [0, cols): word j of pair row t (at dst + t * dst_stride) holds
  // row 2t's element j in its low half and row 2t + 1's in its high half.
  static void row_pairs(const float* src, std::int64_t stride, std::int64_t pair_rows, std::int64_t cols,
                        std::uint32_t* dst, std::int64_t dst_stride) {
    for (std::int64_t t = 0; t < pair_rows; ++t) {
      const float* a = src + 2 * t * stride;
      const float* b = a + stride;
      std::uint32_t* out = dst + t * dst_stride;
      std::int64_t j = 0;
#if defined(__AVX512BF16__)
      if constexpr (W == 16)
        for (; j + 16 <= cols; j += 16) {
          const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + j)));
          const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b + j)));
          _mm512_storeu_si512(out + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
#endif
      for (; j < cols; ++j) out[j] = round_to_bf16(a[j]) | std::uint32_t(round_to_bf16(b[j])) << 16;
    }
  }

  // Whether rows [0, rows) of x (`stride` apart) are +-0 over columns [0, cols) (whole
  // vectors); a NaN is not zero.
  static bool all_zero(const float* x, std::int64_t stride, std::int64_t rows, std::int64_t cols) {
    const batch zero(0.0f);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t j = 0; j < cols; j += W)
        if (!xsimd::all(batch::load_aligned(x + r * stride + j) == zero)) return false;
    return true;
  }

  // acc[r][c] += the pair products of weight word w[r * row_stride + t * pair_stride] and
  // value words values[t * value_stride + c], over t < count, for ROWS rows and NVC
  // vectors of columns.
  template <int ROWS, int NVC>
  static void pair_tile(const std::uint32_t* w, std::int64_t row_stride, std::int64_t pair_stride,
                        const std::uint32_t* values, std::int64_t value_stride, std::int64_t count, float* acc,
                        std::int64_t acc_stride) {
    batch o[ROWS][NVC];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < NVC; ++c) o[r][c] = batch::load_aligned(acc + r * acc_stride + c * W);
    for (std::int64_t t = 0; t < count; ++t) {
      batch v[NVC];
      for (int c = 0; c < NVC; ++c)
        v[c] = batch::load_aligned(reinterpret_cast<const float*>(values + t * value_stride + c * W));
      for (int r = 0; r < ROWS; ++r) {
        float word;
        __builtin_memcpy(&word, w + r * row_stride + t * pair_stride, 4);
        const batch p(word);
        for (int c = 0; c < NVC; ++c) o[r][c] = PairDot::step(o[r][c], p, v[c]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < NVC; ++c) o[r][c].store_aligned(acc + r * acc_stride + c * W);
  }
  // The same over value columns [0, columns) (whole vectors): NV vectors at a time, then one.
  template <int ROWS>
  static void pair_rows_product(const std::uint32_t* w, std::int64_t row_stride, std::int64_t pair_stride,
                                const std::uint32_t* values, std::int64_t value_stride, std::int64_t count,
                                std::int64_t columns, float* acc, std::int64_t acc_stride) {
    std::int64_t c = 0;
    for (; c + NV * W <= columns; c += NV * W)
      pair_tile<ROWS, NV>(w, row_stride, pair_stride, values + c, value_stride, count, acc + c, acc_stride);
    for (; c < columns; c += W)
      pair_tile<ROWS, 1>(w, row_stride, pair_stride, values + c, value_stride, count, acc + c, acc_stride);
  }

  // The rows from element `offset` as the packers' source.
  static SourceRows source_at(const HeadRows& rows, std::int64_t offset) {
    return typed(rows, offset, [&](const auto* src) { return SourceRows{src, rows.type, rows.row_stride, rows.col_stride}; });
  }
  // dst[c] = element offset + c * col_stride of the rows, c < count.
  static void widen_row(const HeadRows& rows, std::int64_t offset, std::int64_t count, float* dst) {
    typed(rows, offset, [&](const auto* src) {
      if (rows.col_stride == 1)  // a loop the compiler vectorizes
        for (std::int64_t c = 0; c < count; ++c) dst[c] = widen_scalar(src[c]);
      else
        for (std::int64_t c = 0; c < count; ++c) dst[c] = widen_scalar(src[c * rows.col_stride]);
    });
  }
  // x[c] rounded to bf16 (to nearest even) and widened back, c < count: fp32 and fp16 q
  // and dout under allow_bf16_compute, so that everything after (the pairs, D_i, the
  // fp32 tiles of a non-finite block) sees the values a bf16 call would.
  static void to_bf16_values(float* x, std::int64_t count) {
    for (std::int64_t c = 0; c < count; ++c) {
      const std::uint32_t bits = std::uint32_t(round_to_bf16(x[c])) << 16;
      __builtin_memcpy(x + c, &bits, 4);
    }
  }
  // sum_c x[c] * (element offset + c * col_stride), in order.
  static float dot_row(const float* x, const HeadRows& rows, std::int64_t offset, std::int64_t count) {
    return typed(rows, offset, [&](const auto* src) {
      float sum = 0.0f;
      for (std::int64_t c = 0; c < count; ++c) sum += x[c] * widen_scalar(src[c * rows.col_stride]);
      return sum;
    });
  }
  // Element `offset` of a gradient set to x, rounded to its type (fp32: as it is).
  static void store_at(const HeadRowsOut& rows, std::int64_t offset, float x) {
    if (rows.type == DType::f32)
      static_cast<float*>(rows.data)[offset] = x;
    else
      store_values(&x, 1, rows.type, rows.data, offset, 1);
  }

  // Query rows [i0, i0 + rows) of head g into the scratch: q and dout as rows of
  // head_dim_padded and value_dim_padded floats, each row's shift and scale of P (see
  // BackwardScratch), D_i = dout_i . out_i; with pair products also q and dout as bf16
  // pairs. A row with no visible key (lse -inf) and the rows up to rows_padded get zeros,
  // shift -inf and scale 0: nothing flows through them, whatever their q and dout hold.
  static void pack_query_side(const BackwardJob& job, std::int64_t g, std::int64_t i0, std::int64_t rows,
                              std::int64_t rows_padded) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t D = job.head_dim, Dv = job.value_dim, Dp = job.head_dim_padded, Dvp = job.value_dim_padded;
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    for (std::int64_t r = 0; r < rows_padded; ++r) {
      float* qr = m.q_rows + r * Dp;
      float* dr = m.dout_rows + r * Dvp;
      const std::int64_t i = i0 + r;
      const float lse = r < rows ? lse_at(job, g, i) : neg_inf, lse2 = log2_units(lse);
      if (lse2 == neg_inf) {
        for (std::int64_t d = 0; d < Dp; ++d) qr[d] = 0.0f;
        for (std::int64_t c = 0; c < Dvp; ++c) dr[c] = 0.0f;
        m.row_shift[r] = neg_inf;
        m.row_scale[r] = 0.0f;
        m.delta[r] = 0.0f;
        continue;
      }
      widen_row(job.q, g * job.q.head_stride + i * job.q.row_stride, D, qr);
      if (kPairs && job.q.type != DType::bf16) to_bf16_values(qr, D);
      for (std::int64_t d = D; d < Dp; ++d) qr[d] = 0.0f;
      float delta = 0.0f;
      if (Dv > 0) {  // else out and dout may be null
        widen_row(job.dout, g * job.dout.head_stride + i * job.dout.row_stride, Dv, dr);
        if (kPairs && job.dout.type != DType::bf16) to_bf16_values(dr, Dv);
        delta = dot_row(dr, job.out, g * job.out.head_stride + i * job.out.row_stride, Dv);
      }
      for (std::int64_t c = Dv; c < Dvp; ++c) dr[c] = 0.0f;
      m.delta[r] = delta;
      const bool from_stats = job.coarse_shift && coarse_lse(lse);
      m.row_shift[r] = from_stats ? job.coarse_shift[g * job.q_len + i] : lse2;
      m.row_scale[r] = from_stats ? job.coarse_scale[g * job.q_len + i] : 1.0f;
    }
    if constexpr (kPairs) {  // q and dout by pairs of dimensions and of rows, and the rows' flags
      // The fp32 rows hold bf16 values (widened exactly, or rounded above; zeros past D
      // and Dv, and on empty rows), so rounding them back gives the bf16 bits; a row of Dp floats covers the
      // 2 head_pairs(D) elements of its pairs (Dp >= D + 1 when D is odd).
      const std::int64_t Dh = head_pairs(D), Dvh = head_pairs(Dv);
      for (std::int64_t r = 0; r < rows_padded; ++r) {
        auto* qp = reinterpret_cast<std::uint16_t*>(m.q_pairs + r * Dh);
        auto* dp = reinterpret_cast<std::uint16_t*>(m.dout_pairs + r * Dvh);
        for (std::int64_t d = 0; d < 2 * Dh; ++d) qp[d] = round_to_bf16(m.q_rows[r * Dp + d]);
        for (std::int64_t c = 0; c < 2 * Dvh; ++c) dp[c] = round_to_bf16(m.dout_rows[r * Dvp + c]);
      }
      row_pairs(m.q_rows, Dp, rows_padded / 2, Dp, reinterpret_cast<std::uint32_t*>(m.q_row_pairs), Dp);
      row_pairs(m.dout_rows, Dvp, rows_padded / 2, Dvp, reinterpret_cast<std::uint32_t*>(m.dout_row_pairs), Dvp);
      for (std::int64_t r = 0; r < rows_padded; ++r) {
        bool q_bad = false, dout_bad = false;
        for (std::int64_t d = 0; d < D; ++d) q_bad = q_bad || !std::isfinite(m.q_rows[r * Dp + d]);
        for (std::int64_t c = 0; c < Dv; ++c) dout_bad = dout_bad || !std::isfinite(m.dout_rows[r * Dvp + c]);
        m.row_flags[r] = float((q_bad ? 1 : 0) + (dout_bad ? 2 : 0));
      }
    }
  }

  // K and V (unless v_panels is null) of keys [j0, j0 + n) as fp32 panels (pair panels
  // with pair products), and, when k_rows is not null, K as rows of head_dim_padded floats
  // (with pair products: by pairs of keys, pack_bf16_value_pairs' layout and flags).
  static void pack_key_side(const BackwardJob& job, std::int64_t j0, std::int64_t n, float* k_panels,
                            float* v_panels, float* k_rows) {
    const std::int64_t D = job.head_dim, Dp = job.head_dim_padded, Dv = job.value_dim;
    if constexpr (kPairs) {
      pack_bf16_key_pairs(source_at(job.k, j0 * job.k.row_stride), n, D, head_pairs(D), NR,
                          reinterpret_cast<std::uint32_t*>(k_panels));
      if (v_panels && Dv > 0)
        pack_bf16_key_pairs(source_at(job.v, j0 * job.v.row_stride), n, Dv, head_pairs(Dv), NR,
                            reinterpret_cast<std::uint32_t*>(v_panels));
      if (k_rows)  // K by pairs of keys for dQ, with the flags of its chunks of NR keys
        pack_bf16_value_pairs(source_at(job.k, j0 * job.k.row_stride), n, D, Dp, NR,
                              reinterpret_cast<std::uint32_t*>(k_rows));
      return;
    }
    panels_from(job.k, j0, n, D, k_panels);
    if (v_panels && Dv > 0)  // else v may be null
      panels_from(job.v, j0, n, Dv, v_panels);
    if (!k_rows) return;
    for (std::int64_t j = 0; j < n; ++j) {
      float* row = k_rows + j * Dp;
      widen_row(job.k, (j0 + j) * job.k.row_stride, D, row);
      for (std::int64_t d = D; d < Dp; ++d) row[d] = 0.0f;
    }
  }
  // Rows [j0, j0 + n) of a KV head as fp32 panels of NR keys.
  static void panels_from(const HeadRows& rows, std::int64_t j0, std::int64_t n, std::int64_t dim, float* panels) {
    typed(rows, j0 * rows.row_stride, [&](const auto* src) {
      pack_key_panels_from(src, rows.row_stride, rows.col_stride, n, dim, NR, nullptr, 0.0f, panels, nullptr);
    });
  }

  // The forward's job as its score epilogue reads it, for query rows from i0 of head g.
  static QueryBlockJob epilogue_job(const BackwardJob& job, std::int64_t g, std::int64_t i0, std::int64_t rows) {
    QueryBlockJob ep{};
    ep.dims.q_len = job.q_len;
    ep.dims.kv_len = job.kv_len;
    ep.dims.head_dim = job.head_dim;
    ep.dims.value_dim = job.value_dim;
    ep.dims.value_dim_padded = job.value_dim_padded;
    ep.dims.block_keys = job.block_keys;
    ep.q.first_row = i0;
    ep.q.rows = rows;
    ep.q.heads_per_row = 1;
    ep.keys.begin = 0;
    ep.keys.end = job.kv_len;
    ep.score.natural_units = true;
    ep.score.transform = job.transform;
    ep.score.softcap = job.softcap;
    ep.score.alibi_slopes = job.alibi_slopes ? job.alibi_slopes + g : nullptr;
    ep.masks = job.masks;
    ep.masks.mask = job.masks.mask ? job.masks.mask + g * job.masks.mask_head_stride : nullptr;
    ep.masks.bool_mask = job.masks.bool_mask ? job.masks.bool_mask + g * job.masks.bool_head_stride : nullptr;
    ep.visible = job.visible;
    return ep;
  }

  // The scores (log2 units) of packed query rows [r0, r0 + MR) against keys [j0, j0 + n)
  // (panels at k_panels) into probs (row stride block_keys, columns up to n rounded up to
  // NR): the micro-kernel, then soft-capping, ALiBi and the masks. Under soft-capping,
  // also the derivative 1 - tanh^2 of each raw score into scratch.derivs.
  static void score_tile(const BackwardJob& job, QueryBlockJob& ep, std::int64_t r0, std::int64_t j0,
                         std::int64_t n, const float* k_panels, float* probs) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t D = job.head_dim, Dp = job.head_dim_padded, Bk = job.block_keys;
    const std::int64_t num_panels = (n + NR - 1) / NR, cols = num_panels * NR;
    const bool softcap = job.transform == Transform::softcap;
    // Without soft-capping, ALiBi or masks the epilogue would only convert to log2
    // units: the micro-kernel's factor does it instead, as in the forward.
    const bool epilogue = softcap || job.alibi_slopes || job.masks.mask || job.masks.bool_mask;
    const float factor = epilogue ? job.scale : job.scale * 1.4426950408889634f;
    float tile_max[MR];
    if constexpr (kPairs) {
      assert(!job.gaussian);
      const std::int64_t Dh = head_pairs(D);
      Fwd::scores_tile(m.q_pairs + r0 * Dh, Dh, Dh, k_panels, num_panels, probs, Bk, factor, tile_max, PairStep{});
    } else if (job.gaussian)
      Fwd::scores_tile(m.q_rows + r0 * Dp, Dp, D, k_panels, num_panels, probs, Bk, -factor, tile_max,
                       typename Fwd::DistanceStep{});
    else
      Fwd::scores_tile(m.q_rows + r0 * Dp, Dp, D, k_panels, num_panels, probs, Bk, factor, tile_max,
                       typename Fwd::DotStep{});
    if (softcap) {  // d(c tanh(r / c)) / dr, from the raw score before the epilogue caps it
      const batch cap(job.softcap);
      for (int r = 0; r < MR; ++r)
        for (std::int64_t j = 0; j < cols; j += W) {
          const batch t = tanh_fast<Arch>(batch::load_aligned(probs + r * Bk + j) / cap);
          xsimd::fnma(t, t, batch(1.0f)).store_aligned(m.derivs + r * Bk + j);
        }
    }
    if (epilogue) {
      ep.state.scores = probs;
      Fwd::score_epilogue(ep, r0, j0, 0, cols);  // soft-capping, ALiBi, masks; log2 units
    }
  }

  // Keys [first, past) of the block [j0, j0 + n) that query i sees, relative to j0.
  static void visible_columns(const BackwardJob& job, std::int64_t i, std::int64_t j0, std::int64_t n,
                              std::int64_t* first, std::int64_t* past) {
    *first = lo(job, i) - j0;
    *past = min_i64(min_i64(hi(job, i) + 1, key_end(job)) - j0, n);
    if (*first < 0) *first = 0;
    if (*past < *first) *past = *first;
  }

  // P and dS (the gradient of the raw score scale * f(q, k), without the scale) of the
  // packed query rows [0, rows_padded) (query i0 + r) against keys [j0, j0 + n), whose
  // panels start at k_panels and v_panels, into scratch.probs and scratch.dscores (row
  // stride block_keys, columns up to n rounded up to NR). Excluded pairs and rows get
  // exactly 0 in both, whatever K and V hold there; a NaN score stays NaN in both on
  // every ISA (the zero tests are written !(x == 0): xsimd's != is ordered on AVX and
  // unordered on SSE2).
  static void block_grads(const BackwardJob& job, QueryBlockJob& ep, std::int64_t i0, std::int64_t rows,
                          std::int64_t rows_padded, std::int64_t j0, std::int64_t n, const float* k_panels,
                          const float* v_panels) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t Dv = job.value_dim, Dvp = job.value_dim_padded;
    const std::int64_t Bk = job.block_keys, num_panels = (n + NR - 1) / NR, cols = num_panels * NR;
    const bool softcap = job.transform == Transform::softcap;
    const batch iota = Fwd::lane_indices(), zero(0.0f);
    for (std::int64_t r0 = 0; r0 < rows_padded; r0 += MR) {
      float* const probs = m.probs + r0 * Bk;
      float* const dscores = m.dscores + r0 * Bk;
      const std::int64_t first_i = i0 + r0, last_i = i0 + min_i64(r0 + MR, rows) - 1;
      if (r0 >= rows || lo(job, first_i) > j0 + n - 1 || hi(job, last_i) < j0 || j0 >= key_end(job)) {
        for (int r = 0; r < MR; ++r)
          for (std::int64_t j = 0; j < cols; j += W) {
            zero.store_aligned(probs + r * Bk + j);
            zero.store_aligned(dscores + r * Bk + j);
          }
        continue;
      }
      score_tile(job, ep, r0, j0, n, k_panels, probs);
      for (int r = 0; r < MR; ++r) {
        float* s = probs + r * Bk;
        const std::int64_t row = r0 + r;
        std::int64_t first = 0, past = 0;
        if (row < rows && m.row_shift[row] != -std::numeric_limits<float>::infinity())
          visible_columns(job, i0 + row, j0, n, &first, &past);
        const batch shift(m.row_shift[row]), scale(m.row_scale[row]);
        const batch first_v = batch(float(first)), past_v = batch(float(past));  // exact below 2^24
        for (std::int64_t j = 0; j < cols; j += W) {
          const batch column = iota + batch(float(j));
          const batch x = batch::load_aligned(s + j) - shift;
          // P <= 1: a rounding above 0 is clamped; a NaN score (NaN in q or in a visible
          // key) stays NaN, as in the forward; an excluded score (-inf) gives 0.
          batch p = exp2_nonpositive<Arch>(xsimd::select(x > zero, zero, x)) * scale;
          p = xsimd::select(xsimd::isnan(x), x, p);
          xsimd::select(column >= first_v && column < past_v, p, zero).store_aligned(s + j);
        }
      }
      float tile_max[MR];
      if constexpr (kPairs)
        Fwd::scores_tile(m.dout_pairs + r0 * head_pairs(Dv), head_pairs(Dv), head_pairs(Dv), v_panels, num_panels,
                         dscores, Bk, 1.0f, tile_max, PairStep{});
      else
        Fwd::scores_tile(m.dout_rows + r0 * Dvp, Dvp, Dv, v_panels, num_panels, dscores, Bk, 1.0f, tile_max,
                         typename Fwd::DotStep{});
      for (int r = 0; r < MR; ++r) {
        const batch delta(m.delta[r0 + r]);
        for (std::int64_t j = 0; j < cols; j += W) {
          const batch p = batch::load_aligned(probs + r * Bk + j);
          batch ds = p * (batch::load_aligned(dscores + r * Bk + j) - delta);
          if (softcap) ds *= batch::load_aligned(m.derivs + r * Bk + j);
          xsimd::select(p == zero, zero, ds).store_aligned(dscores + r * Bk + j);
        }
      }
    }
  }

  // tile(std::integral_constant<int, KEYS>{}, jj) over the keys [0, n) rounded up to 4:
  // tiles of KR keys (the forward's P.V tile rows, keys for rows), then 4 and 2 for the
  // rest (the columns past n hold zeros up to a whole panel).
  template <class Tile>
  static void for_key_tiles(std::int64_t n, Tile&& tile) {
    static_assert(KR % 2 == 0, "the key tiles step by KR, then 4 and 2");
    const std::int64_t keys = round_up(n, 4);
    std::int64_t jj = 0;
    for (; jj + KR <= keys; jj += KR) tile(std::integral_constant<int, KR>{}, jj);
    if constexpr (KR > 4)
      for (; jj + 4 <= keys; jj += 4) tile(std::integral_constant<int, 4>{}, jj);
    if constexpr (KR > 2)
      if (jj < keys) tile(std::integral_constant<int, 2>{}, jj);
  }

  // The query block's share of a key block's dV and dK (P and dS in the scratch, rows
  // [0, rows_padded); k_panels: the block's K panels). dV += P^T dO and, for the dot
  // product, dK += dS^T Q: P.V tiles whose rows are keys (probs[key][row] at probs + key
  // + row * Bk). The Gaussian's dK is summed from exact differences (exact_keys). The safe
  // and plain tiles add the same amounts wherever q and dout are finite, so the choice
  // leaves results bitwise alike across schedules.
  static void accumulate_keys(const BackwardJob& job, std::int64_t rows_padded, std::int64_t n,
                              const float* k_panels) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t Dp = job.head_dim_padded, Dvp = job.value_dim_padded, Bk = job.block_keys;
    const batch zero(0.0f);
    // With pair products, dV and dK by pairs of rows, each unless a row's dout (dV) or q
    // (dK) holds an inf or NaN; the fp32 tiles below take what is left.
    bool fp32_dv = true, fp32_dk = !job.gaussian;
    if constexpr (kPairs) {
      bool q_bad = false, dout_bad = false;
      for (std::int64_t r = 0; r < rows_padded; ++r) {
        const int flags = int(m.row_flags[r]);
        q_bad = q_bad || (flags & 1);
        dout_bad = dout_bad || (flags & 2);
      }
      const std::int64_t pairs = rows_padded / 2, cols = round_up(n, NR), half = job.block_rows / 2 * Bk;
      auto* const p_pairs = reinterpret_cast<std::uint32_t*>(m.weight_pairs);
      auto* const ds_pairs = p_pairs + half;
      const bool dv_pairs = !dout_bad && !all_zero(m.probs, Bk, rows_padded, cols);
      const bool dk_pairs = !q_bad && !all_zero(m.dscores, Bk, rows_padded, cols);
      if (dv_pairs) row_pairs(m.probs, Bk, pairs, cols, p_pairs, Bk);
      if (dk_pairs) row_pairs(m.dscores, Bk, pairs, cols, ds_pairs, Bk);
      auto pair_tile_keys = [&](auto keys, std::int64_t jj) {
        constexpr int KEYS = decltype(keys)::value;
        if (dv_pairs)
          pair_rows_product<KEYS>(p_pairs + jj, 1, Bk, reinterpret_cast<const std::uint32_t*>(m.dout_row_pairs), Dvp,
                                  pairs, Dvp, m.dv_acc + jj * Dvp, Dvp);
        if (dk_pairs)
          pair_rows_product<KEYS>(ds_pairs + jj, 1, Bk, reinterpret_cast<const std::uint32_t*>(m.q_row_pairs), Dp,
                                  pairs, Dp, m.dk_acc + jj * Dp, Dp);
      };
      for_key_tiles(n, pair_tile_keys);
      fp32_dv = dout_bad;
      fp32_dk = q_bad;
      if (!fp32_dv && !fp32_dk) return;
    }
    // Keys that some row of the block does not weigh take the safe tile: a zero P (or dS)
    // must keep that row's dout (or q) out, which may hold NaN or inf. Judged per vector
    // of W keys; a tile is safe when any vector it touches is.
    assert(Bk <= kMaxBackwardBlockKeys);
    bool strip_safe[kMaxBackwardBlockKeys / W];
    for (std::int64_t j = 0; j < n; j += W) {
      xsimd::batch_bool<float, Arch> any_zero(false);
      for (std::int64_t r = 0; r < rows_padded; ++r)
        any_zero = any_zero || batch::load_aligned(m.probs + r * Bk + j) == zero;
      strip_safe[j / W] = xsimd::any(any_zero);
    }
    // A tile of KEYS keys from jj (for_key_tiles). Each accumulator sums its rows in order
    // whatever the tile, so results do not depend on it.
    auto tile = [&](auto keys, std::int64_t jj) {
      constexpr int KEYS = decltype(keys)::value;
      bool safe = false;
      for (std::int64_t s = jj / W; s <= (jj + KEYS - 1) / W; ++s) safe = safe || strip_safe[s];
      if (safe) {
        if (fp32_dv)
          Fwd::template pv_rows<KEYS, true>(m.probs + jj, 1, Bk, m.dout_rows, Dvp, rows_padded, m.ones,
                                            m.dv_acc + jj * Dvp, Dvp);
        if (fp32_dk)
          Fwd::template pv_rows<KEYS, true>(m.dscores + jj, 1, Bk, m.q_rows, Dp, rows_padded, m.ones,
                                            m.dk_acc + jj * Dp, Dp);
      } else {
        if (fp32_dv)
          Fwd::template pv_rows<KEYS>(m.probs + jj, 1, Bk, m.dout_rows, Dvp, rows_padded, m.ones,
                                      m.dv_acc + jj * Dvp, Dvp);
        if (fp32_dk)
          Fwd::template pv_rows<KEYS>(m.dscores + jj, 1, Bk, m.q_rows, Dp, rows_padded, m.ones, m.dk_acc + jj * Dp,
                                      Dp);
      }
    };
    for_key_tiles(n, tile);
    if (job.gaussian) exact_keys(job, rows_padded, n, k_panels);
  }

  // The Gaussian's d(-|q - k|^2)/dk = 2 (q - k), summed as sum_i dS_ij (q_i - k_j) term by
  // term: the products form sum_i dS_ij q_i - k_j sum_i dS_ij cancels catastrophically
  // when the points sit far apart compared with the distances that carry the weight
  // (kernel regression with a narrow kernel). Keys in vector lanes, read from the panels;
  // dk_acc holds [head_dim][block_keys] here. A pair with dS = 0 adds nothing, whatever
  // the (excluded) key holds.
  static void exact_keys(const BackwardJob& job, std::int64_t rows_padded, std::int64_t n, const float* k_panels) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t D = job.head_dim, Dp = job.head_dim_padded, Bk = job.block_keys;
    const batch zero(0.0f);
    for (std::int64_t d = 0; d < D; ++d)
      for (std::int64_t j = 0; j < n; j += W) {
        const batch k = batch::load_aligned(k_panels + (j / NR) * D * NR + d * NR + j % NR);
        batch acc = batch::load_aligned(m.dk_acc + d * Bk + j);
        for (std::int64_t r = 0; r < rows_padded; ++r) {
          const batch ds = batch::load_aligned(m.dscores + r * Bk + j);
          acc = xsimd::select(!(ds == zero), xsimd::fma(ds, batch(m.q_rows[r * Dp + d]) - k, acc), acc);
        }
        acc.store_aligned(m.dk_acc + d * Bk + j);
      }
  }

  // The key block's share of the query block's dQ: for the dot product dQ += dS K (K rows
  // of the block at k_rows; keys whose dS is 0 for a row keep their possibly garbage rows
  // out); for the Gaussian sum_j dS_ij (k_j - q_i) term by term (see exact_keys), keys in
  // vector lanes from the panels, one horizontal sum per row and dimension.
  static void accumulate_queries(const BackwardJob& job, std::int64_t rows, std::int64_t rows_padded, std::int64_t n,
                                 const float* k_panels, const float* k_rows) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t D = job.head_dim, Dp = job.head_dim_padded, Bk = job.block_keys;
    if constexpr (kPairs) {
      // dS rounded to bf16 in place by pairs of keys, times K by pairs of keys, chunk by
      // chunk of NR keys; a chunk whose K holds an inf or NaN apart, skipping zero weights.
      const std::int64_t cols = round_up(n, NR);
      if (all_zero(m.dscores, Bk, rows_padded, cols)) return;
      for (std::int64_t r = 0; r < rows_padded; ++r) round_weights_to_bf16<W>(m.dscores + r * Bk, 0, cols);
      const auto* weights = reinterpret_cast<const std::uint32_t*>(m.dscores);  // row r's pair t at r Bk + t
      const auto* pairs = reinterpret_cast<const std::uint32_t*>(k_rows);
      const std::uint8_t* nonfinite = value_pairs_flags(pairs, n, Dp, NR);
      for (std::int64_t chunk = 0; chunk < cols; chunk += NR) {
        const std::uint32_t* chunk_pairs = pairs + chunk / 2 * Dp;
        for (std::int64_t h = 0; h < rows_padded; h += PR)
          if (nonfinite[chunk / NR])
            add_nonfinite_chunk(reinterpret_cast<const std::uint16_t*>(weights + h * Bk) + chunk, 2 * Bk, PR,
                                chunk_pairs, NR, Dp, m.dq_acc + h * Dp, Dp);
          else
            pair_rows_product<PR>(weights + h * Bk + chunk / 2, Bk, 1, chunk_pairs, Dp,
                                  (min_i64(chunk + NR, n) - chunk + 1) / 2, Dp, m.dq_acc + h * Dp, Dp);
      }
      return;
    }
    if (!job.gaussian) {
      for (std::int64_t h = 0; h < rows_padded; h += PR)
        Fwd::template pv_classified<PR>(m.dscores + h * Bk, Bk, k_rows, Dp, 0, n, m.ones, m.dq_acc + h * Dp, Dp);
      return;
    }
    const batch zero(0.0f);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t d = 0; d < D; ++d) {
        const batch q(m.q_rows[r * Dp + d]);
        batch acc = zero;
        for (std::int64_t j = 0; j < n; j += W) {
          const batch ds = batch::load_aligned(m.dscores + r * Bk + j);
          const batch k = batch::load_aligned(k_panels + (j / NR) * D * NR + d * NR + j % NR);
          acc = xsimd::select(!(ds == zero), xsimd::fma(ds, k - q, acc), acc);
        }
        m.dq_acc[r * Dp + d] += xsimd::hadd(acc);
      }
  }

  // dk and dv rows of keys [j0, j0 + n) from the accumulators: dk_j = scale sum_i dS_ij
  // q_i (dot), 2 scale sum_i dS_ij (q_i - k_j) (Gaussian, accumulated [dim][key]).
  static void write_keys(const BackwardJob& job, std::int64_t j0, std::int64_t n) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t D = job.head_dim, Dv = job.value_dim, Dp = job.head_dim_padded, Dvp = job.value_dim_padded;
    const std::int64_t Bk = job.block_keys;
    const float factor = job.gaussian ? 2.0f * job.scale : job.scale;
    for (std::int64_t jj = 0; jj < n; ++jj) {
      const std::int64_t j = j0 + jj;
      // + 0: a zero sum times a negative scale is +0, as in the oracle. The dot product's
      // row is finished in place (the accumulator is reset for the next block) and
      // written in one call.
      if (job.gaussian) {
        for (std::int64_t d = 0; d < D; ++d)
          store_at(job.dk, j * job.dk.row_stride + d * job.dk.col_stride, factor * m.dk_acc[d * Bk + jj] + 0.0f);
      } else {
        float* row = m.dk_acc + jj * Dp;
        for (std::int64_t d = 0; d < D; ++d) row[d] = factor * row[d] + 0.0f;
        store_values(row, D, job.dk.type, job.dk.data, j * job.dk.row_stride, job.dk.col_stride);
      }
      if (Dv == 0) continue;  // dv may be null
      store_values(m.dv_acc + jj * Dvp, Dv, job.dv.type, job.dv.data, j * job.dv.row_stride, job.dv.col_stride);
    }
  }

  // dq rows of queries [i0, i0 + rows) of head g from the scratch's dq_acc: dq_i = scale
  // sum_j dS_ij k_j (dot), 2 scale sum_j dS_ij (k_j - q_i) (Gaussian).
  static void write_queries(const BackwardJob& job, std::int64_t g, std::int64_t i0, std::int64_t rows) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t D = job.head_dim, Dp = job.head_dim_padded;
    const float factor = job.gaussian ? 2.0f * job.scale : job.scale;
    for (std::int64_t r = 0; r < rows; ++r) {  // finished in place, as in write_keys
      float* acc = m.dq_acc + r * Dp;
      for (std::int64_t d = 0; d < D; ++d) acc[d] = factor * acc[d] + 0.0f;
      store_values(acc, D, job.dq.type, job.dq.data, g * job.dq.head_stride + (i0 + r) * job.dq.row_stride,
                   job.dq.col_stride);
    }
  }

  static void fill(float* p, std::int64_t count, float value) {
    for (std::int64_t x = 0; x < count; ++x) p[x] = value;
  }

  // The queries that can see a key of [j0, j0 + n): hi_i >= j0 and lo_i <= j0 + n - 1.
  static void query_range(const BackwardJob& job, std::int64_t j0, std::int64_t n, std::int64_t* begin,
                          std::int64_t* end) {
    *begin = 0;
    *end = j0 < key_end(job) ? job.q_len : 0;
    if (job.visible.has_hi && j0 - job.visible.hi_offset > *begin) *begin = j0 - job.visible.hi_offset;
    if (job.visible.has_lo) *end = min_i64(*end, j0 + n - job.visible.lo_offset);
  }

  // dK and dV of keys [first, first + count) of the KV head, summed over every query head
  // of the group and every query block that sees them, in that fixed order.
  static void backward_keys(const BackwardJob& job) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t N = job.q_len, Br = job.block_rows, Bk = job.block_keys;
    const std::int64_t j0 = job.first, n = job.count;
    assert(n > 0 && n <= Bk && Br % MR == 0 && Bk % NR == 0);
    pack_key_side(job, j0, n, m.k_panels, m.v_panels, nullptr);
    fill(m.dk_acc, Bk * job.head_dim_padded, 0.0f);
    fill(m.dv_acc, Bk * job.value_dim_padded, 0.0f);
    fill(m.ones, 16, 1.0f);
    std::int64_t i_begin, i_end;
    query_range(job, j0, n, &i_begin, &i_end);
    for (std::int64_t g = 0; g < job.group; ++g)
      for (std::int64_t i0 = i_begin / Br * Br; i0 < i_end; i0 += Br) {
        const std::int64_t rows = min_i64(Br, N - i0), rows_padded = round_up(rows, MR);
        pack_query_side(job, g, i0, rows, rows_padded);
        QueryBlockJob ep = epilogue_job(job, g, i0, rows);
        block_grads(job, ep, i0, rows, rows_padded, j0, n, m.k_panels, m.v_panels);
        accumulate_keys(job, rows_padded, n, m.k_panels);
      }
    write_keys(job, j0, n);
  }

  // dQ of queries [first, first + count) of query head `head`, summed over the key blocks
  // they see, in key order.
  static void backward_queries(const BackwardJob& job) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t M = job.kv_len, Dp = job.head_dim_padded;
    const std::int64_t Bk = job.block_keys, g = job.head, i0 = job.first, rows = job.count;
    const std::int64_t rows_padded = round_up(rows, MR);
    assert(rows > 0 && rows <= job.block_rows && Bk % NR == 0);
    pack_query_side(job, g, i0, rows, rows_padded);
    fill(m.dq_acc, rows_padded * Dp, 0.0f);
    fill(m.ones, 16, 1.0f);
    QueryBlockJob ep = epilogue_job(job, g, i0, rows);
    // The keys some row sees: [lo of the first row, hi of the last], below key_end.
    const std::int64_t j_begin = lo(job, i0) > 0 ? lo(job, i0) : 0;
    const std::int64_t j_end = min_i64(key_end(job), hi(job, i0 + rows - 1) + 1);
    for (std::int64_t j0 = j_begin / Bk * Bk; j0 < j_end; j0 += Bk) {
      const std::int64_t n = min_i64(Bk, M - j0);
      // Packed per block: a pass over K and V per query block, against 2 Br flops per
      // element packed, keeps the scratch independent of M.
      pack_key_side(job, j0, n, m.k_panels, m.v_panels, job.gaussian ? nullptr : m.k_rows);
      block_grads(job, ep, i0, rows, rows_padded, j0, n, m.k_panels, m.v_panels);
      accumulate_queries(job, rows, rows_padded, n, m.k_panels, m.k_rows);
    }
    write_queries(job, g, i0, rows);
  }

  // The statistics of the coarse rows (see BackwardJob::coarse_shift) among queries
  // [first, first + count) of query head `head`: the largest visible score m (log2
  // units) and 1 / sum_j 2^(s_j - m), over the key blocks in order with the scores
  // exactly as block_grads computes them, so that P = 2^(s - m) / sum is the softmax of
  // those scores whatever the lse's rounding. A row masked entirely by -1e9 has equal
  // fp32 scores and gets P = 1 / (its visible keys), as the forward weighs it. A sink
  // joins the sum as it does in the forward.
  static void backward_row_stats(const BackwardJob& job) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t M = job.kv_len, Bk = job.block_keys, g = job.head, i0 = job.first, rows = job.count;
    const std::int64_t rows_padded = round_up(rows, MR);
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    auto coarse_row = [&](std::int64_t r) { return coarse_lse(lse_at(job, g, i0 + r)); };
    bool any = false;
    for (std::int64_t r = 0; r < rows; ++r) any = any || coarse_row(r);
    if (!any) return;
    pack_query_side(job, g, i0, rows, rows_padded);
    // The forward's online softmax keeps each packed row's running max and sum.
    QueryBlockJob ep = epilogue_job(job, g, i0, rows);
    ep.keys.k_panels = m.k_panels;  // column tiles of whole panels
    ep.state.scores = m.probs;
    ep.state.row_max = m.dq_acc;
    ep.state.row_sum = m.dq_acc + rows_padded;
    for (std::int64_t r = 0; r < rows_padded; ++r) ep.state.row_max[r] = neg_inf, ep.state.row_sum[r] = 0.0f;
    const std::int64_t j_begin = lo(job, i0) > 0 ? lo(job, i0) : 0;
    const std::int64_t j_end = min_i64(key_end(job), hi(job, i0 + rows - 1) + 1);
    for (std::int64_t j0 = j_begin / Bk * Bk; j0 < j_end; j0 += Bk) {
      const std::int64_t n = min_i64(Bk, M - j0);
      pack_key_side(job, j0, n, m.k_panels, nullptr, nullptr);
      for (std::int64_t r0 = 0; r0 < rows; r0 += MR) {
        bool tile_coarse = false;
        for (std::int64_t r = r0; r < min_i64(r0 + MR, rows); ++r) tile_coarse = tile_coarse || coarse_row(r);
        typename Fwd::TileColumns t;
        if (!tile_coarse || !Fwd::tile_columns(ep, r0, j0, min_i64(j0 + n, key_end(job)), &t)) continue;
        score_tile(job, ep, r0, j0, n, m.k_panels, m.probs);
        float tile_max[MR], alpha[MR];
        std::int64_t clean_begin = t.first, clean_end = t.num_keys;
        Fwd::online_softmax(ep, r0, j0, t, tile_max, false, alpha, &clean_begin, &clean_end);
      }
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      if (!coarse_row(r)) continue;
      float top = ep.state.row_max[r], sum = ep.state.row_sum[r];
      if (job.sinks && job.sinks[g] != neg_inf) {  // as the forward's finalize joins it
        const typename Fwd::SinkJoin joined = Fwd::join_sink(top, sum, log2_units(job.sinks[g]));
        top = joined.top;
        sum = joined.sum;
      }
      job.coarse_shift[g * job.q_len + i0 + r] = top;
      job.coarse_scale[g * job.q_len + i0 + r] = sum == 0.0f ? 0.0f : 1.0f / sum;  // a NaN sum stays NaN
    }
  }

  // The one pass: dK, dV and dQ of a KV head with P and dS once per block pair. Three
  // entries, which the driver runs in order for each head: every query block's
  // backward_pack_queries, every key block's backward_key_chunk (in key order on one
  // thread, or on several taking turns at dQ), every query block's backward_write_queries.
  // Each accumulator sees the same additions in the same order as in the two passes (a pair
  // one schedule visits and the other skips adds exact zeros), so the results are bitwise
  // those of backward_keys and backward_queries. job.scratch's query side (q_rows,
  // dout_rows, row_shift, row_scale, delta, dq_acc) holds every query row of the group
  // here: head g's block i0 from row g * (q_blocks * block_rows) + i0.

  // The job with the query side of block i0 of head g: its rows of the group's buffers.
  static BackwardJob block_view(const BackwardJob& job, std::int64_t g, std::int64_t i0) {
    const std::int64_t Br = job.block_rows, Np = (job.q_len + Br - 1) / Br * Br;  // rows of a head
    const std::int64_t row = g * Np + i0;
    BackwardJob view = job;
    view.scratch.q_rows += row * job.head_dim_padded;
    view.scratch.dout_rows += row * job.value_dim_padded;
    view.scratch.row_shift += row;
    view.scratch.row_scale += row;
    view.scratch.delta += row;
    view.scratch.dq_acc += row * job.head_dim_padded;
    if constexpr (kPairs) {
      view.scratch.q_pairs += row * head_pairs(job.head_dim);
      view.scratch.dout_pairs += row * head_pairs(job.value_dim);
      view.scratch.q_row_pairs += row / 2 * job.head_dim_padded;
      view.scratch.dout_row_pairs += row / 2 * job.value_dim_padded;
      view.scratch.row_flags += row;
    }
    return view;
  }

  // Queries [first, first + count) of query head `head`: their query side packed into the
  // group's buffers, their dQ accumulators zeroed.
  static void backward_pack_queries(const BackwardJob& job) {
    const std::int64_t g = job.head, i0 = job.first, rows = job.count, rows_padded = round_up(rows, MR);
    assert(rows > 0 && rows <= job.block_rows && i0 % job.block_rows == 0);
    const BackwardJob view = block_view(job, g, i0);
    pack_query_side(view, g, i0, rows, rows_padded);
    fill(view.scratch.dq_acc, rows_padded * job.head_dim_padded, 0.0f);
  }

  // Keys [first, first + count), up to a chunk of several key blocks: dK and dV of each
  // block, written, and their shares of dQ of every query row of the group, added to the
  // group's accumulators. The query blocks are visited head by head, block by block, and
  // each against the chunk's key blocks in order: the query side is read once per chunk,
  // not once per key block, and each dQ row still sums its key blocks in key order. The
  // chunk's K and V (panels, and K rows) and its dK and dV accumulators lie block after
  // block in the scratch (block_scratch). Query block i0 of head g is turn t =
  // g * q_blocks + i0 / block_rows: with job.turns, the chunk adds to its dQ only once
  // the previous chunk has passed it (await_turn), and passes it on after (pass_turns).
  static void backward_key_chunk(const BackwardJob& job) {
    const BackwardScratch& m = job.scratch;
    const std::int64_t N = job.q_len, Br = job.block_rows, Bk = job.block_keys, q_blocks = (N + Br - 1) / Br;
    const std::int64_t D = job.head_dim, Dv = job.value_dim, Dp = job.head_dim_padded, Dvp = job.value_dim_padded;
    const std::int64_t first = job.first, blocks = (job.count + Bk - 1) / Bk;
    assert(job.count > 0 && first % Bk == 0 && Br % MR == 0 && Bk % NR == 0);
    // Key block c of the chunk: keys [first + c Bk, + n_of(c)), its scratch.
    auto n_of = [&](std::int64_t c) { return min_i64(Bk, job.count - c * Bk); };
    auto block_scratch = [&](const BackwardJob& view, std::int64_t c) {
      BackwardJob b = view;
      b.scratch.k_panels += c * Bk * D;
      b.scratch.v_panels += c * Bk * Dv;
      b.scratch.k_rows += c * Bk * Dp;
      b.scratch.dk_acc += c * Bk * Dp;  // also the Gaussian's [head_dim][block_keys]
      b.scratch.dv_acc += c * Bk * Dvp;
      return b;
    };
    for (std::int64_t c = 0; c < blocks; ++c) {
      const BackwardScratch& b = block_scratch(job, c).scratch;
      pack_key_side(job, first + c * Bk, n_of(c), b.k_panels, b.v_panels, job.gaussian ? nullptr : b.k_rows);
    }
    fill(m.dk_acc, blocks * Bk * Dp, 0.0f);
    fill(m.dv_acc, blocks * Bk * Dvp, 0.0f);
    fill(m.ones, 16, 1.0f);
    // The query blocks each key block visits alone (backward_keys): from b_begin / Br * Br
    // up to b_end; the chunk visits their union.
    std::int64_t i_begin = N, i_end = 0;
    for (std::int64_t c = 0; c < blocks; ++c) {
      std::int64_t b_begin, b_end;
      query_range(job, first + c * Bk, n_of(c), &b_begin, &b_end);
      if (b_begin / Br * Br >= b_end) continue;
      i_begin = b_begin < i_begin ? b_begin : i_begin;
      i_end = b_end > i_end ? b_end : i_end;
    }
    for (std::int64_t g = 0; g < job.group; ++g)
      for (std::int64_t i0 = i_begin / Br * Br; i0 < i_end; i0 += Br) {
        const std::int64_t rows = min_i64(Br, N - i0), rows_padded = round_up(rows, MR);
        const std::int64_t turn = g * q_blocks + i0 / Br;
        const BackwardJob view = block_view(job, g, i0);
        QueryBlockJob ep = epilogue_job(job, g, i0, rows);
        bool waited = false;
        for (std::int64_t c = 0; c < blocks; ++c) {
          const std::int64_t j0 = first + c * Bk, n = n_of(c);
          std::int64_t b_begin, b_end;
          query_range(job, j0, n, &b_begin, &b_end);
          if (i0 < b_begin / Br * Br || i0 >= b_end) continue;
          const BackwardJob b = block_scratch(view, c);
          block_grads(b, ep, i0, rows, rows_padded, j0, n, b.scratch.k_panels, b.scratch.v_panels);
          accumulate_keys(b, rows_padded, n, b.scratch.k_panels);
          if (!waited) await_turn(job.turns, turn);
          waited = true;
          accumulate_queries(b, rows, rows_padded, n, b.scratch.k_panels, b.scratch.k_rows);
        }
        // A turn is passed only once the previous chunk has passed it, added to or not:
        // then no chunk runs ahead of the one before it, whichever turns each touches.
        if (!waited) await_turn(job.turns, turn);
        pass_turns(job.turns, turn + 1);
      }
    for (std::int64_t c = 0; c < blocks; ++c) write_keys(block_scratch(job, c), first + c * Bk, n_of(c));
    const std::int64_t turns = job.group * q_blocks;
    await_turn(job.turns, turns - 1);
    pass_turns(job.turns, turns);
  }

  // Queries [first, first + count) of query head `head`: their dq rows, from the group's
  // accumulators.
  static void backward_write_queries(const BackwardJob& job) {
    write_queries(block_view(job, job.head, job.first), job.head, job.first, job.count);
  }
};

}  // namespace flashcpu::detail::FLASHCPU_ISA_NAMESPACE
