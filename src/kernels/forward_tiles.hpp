// The fused forward on AMX tiles: bf16 Q, K and V, both products on the matrix unit, the
// online softmax on the vector units between them. Included by kernels/variant.hpp when
// the variant's level compiles the tile instructions (the `amx` line of
// kernels/variants.inc), and by tests/emulation.cpp with EmulatedTiles.
//
// One call handles one query block, as ForwardKernel::forward_query_block does, and
// reuses its stages: which keys a row tile sees (tile_columns), the score terms
// (score_epilogue: masks, softcap, ALiBi), the online softmax and the finalization.
// The two products differ, and the loop that takes row tiles in pairs (below):
//   S = Q . K^T   Q unscaled in bf16 (a bf16 q scaled and rounded again would move every
//                 score by up to 2^-9 of its size), K in 32-key panels in the pair layout;
//                 the scale (times log2 e) multiplies the fp32 scores in the softmax's
//                 exponent (one FMA), or in a pass of its own before the score terms.
//   O = alpha O + P . V   P written as bf16 by the softmax (as FlashAttention rounds it;
//                 the row sums stay fp32) into rows of its own after the scores' (the
//                 scores stay whole), V packed in the pair layout.
//
// Row tiles go two at a time where both see keys of the block, so that each K or V tile
// loaded from L2 serves 32 rows (a block's K and V exceed L1: 64 KiB each at D = 128).
// Where a pair sees the whole of a block after its first (weigh_block_in_steps), S and the
// softmax go 64 keys at a time, so that the scores stay in L1; elsewhere S fills the
// block's score rows and online_softmax weighs them.
// Tile budget (each register 16 rows x 64 bytes, all eight used, the same in both
// products):
//   tmm0-tmm3  C  two row tiles: S of a panel's keys [0, 16) and [16, 32), or 32 columns
//                 of O, for each tile (tmm0, tmm1 the first, tmm2, tmm3 the second);
//                 one row tile: S of two panels, or 64 columns of O
//   tmm4, tmm5 A  16 rows x 32 dims of Q, or x 32 keys of P: the first and second tile
//   tmm6, tmm7 B  32 dims x 16 keys of K, or 32 keys x 16 columns of V
// Four accumulators, not one or two: a product waits for the one before it on the same
// accumulator (its latency is about three times its issue interval), so chains of one
// tile each left the matrix unit mostly idle (perf: the P.V product's single chain held
// 31% of P128_bf16's samples before this layout).
//
// Packed layouts (TilePackers writes them; bf16 bits in the driver's float scratch):
//   Q  rows of head_dim_tiles = round_up(D, 32) elements, zero past D;
//   K  panel p (keys 32p .. 32p + 31): head_dim_tiles / 2 rows of 32 keys x (d, d + 1);
//   V  by pairs of keys, in chunks of 32 keys (kernels/pair_values.hpp). A zero weight
//      times an inf or NaN value is NaN on the tiles; such a chunk (a stale KV-cache
//      slot, say) is weighed by the vector units instead, where a zero weight adds
//      nothing, as in the vector kernels.

template <class Arch>
using TileBase = ForwardKernel<Arch, 16, 32 / int(xsimd::batch<float, Arch>::size), 1, 16, bf16>;

inline std::int64_t round_up_i64(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

constexpr int kTileRows = 16;         // query rows per tile
constexpr int kTilePanelKeys = 32;    // keys per K panel and per P.V step
constexpr int kTileDims = 32;         // head dimensions per S step
constexpr int kTileValueColumns = 16;  // value columns per P.V tile

inline std::int64_t tile_head_dim(std::int64_t head_dim) { return round_up_i64(head_dim, kTileDims); }

template <class Arch, class Tiles>
struct TileForwardKernel : TileBase<Arch> {
  using Base = TileBase<Arch>;
  using batch = typename Base::batch;
  using TileColumns = typename Base::TileColumns;
  static constexpr int W = Base::W;
  static constexpr int MR = kTileRows;
  static constexpr int NR = kTilePanelKeys;
  static_assert(Base::NR == NR, "the vector stages see the tile geometry");

  static TileConfigBlock tile_config() {
    TileConfigBlock config;
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = 16;
      config.bytes_per_row[t] = 64;
    }
    return config;
  }

  // The products, by register (the tile budget above): C tmm0-tmm3, A tmm4 (first row
  // tile) and tmm5 (second), B tmm6 and tmm7.
  template <int C, int A, int B>
  static void dot() {
    Tiles::template dot_bf16<C, A, B>();
  }

  // Raw scores of one row tile for NP (1 or 2) panels from `panel`: accumulator tile 2p +
  // h holds keys [16h, 16h + 16) of panel p, a chain of D / 32 products, independent of
  // the others.
  template <int NP>
  static void score_one_tile(const std::uint16_t* q, std::int64_t Dt, const std::uint16_t* panel, float* scores,
                             std::int64_t Bk) {
    Tiles::template zero<0>();
    Tiles::template zero<1>();
    if constexpr (NP == 2) {
      Tiles::template zero<2>();
      Tiles::template zero<3>();
    }
    const std::uint16_t* next_panel = panel + NR * Dt;
    for (std::int64_t d = 0; d < Dt; d += kTileDims) {
      Tiles::template load<4>(q + d, Dt * 2);
      Tiles::template load<6>(panel + d * NR, NR * 4);
      dot<0, 4, 6>();
      Tiles::template load<7>(panel + d * NR + 32, NR * 4);
      dot<1, 4, 7>();
      if constexpr (NP == 2) {
        Tiles::template load<6>(next_panel + d * NR, NR * 4);
        dot<2, 4, 6>();
        Tiles::template load<7>(next_panel + d * NR + 32, NR * 4);
        dot<3, 4, 7>();
      }
    }
    Tiles::template store<0>(scores, Bk * 4);
    Tiles::template store<1>(scores + 16, Bk * 4);
    if constexpr (NP == 2) {
      Tiles::template store<2>(scores + 32, Bk * 4);
      Tiles::template store<3>(scores + 48, Bk * 4);
    }
  }

  // Raw scores of two row tiles (Q rows at q and q + 16 Dt) for one panel: each K tile
  // loaded serves both, so K, read from L2, is loaded half as often per product.
  static void score_two_tiles(const std::uint16_t* q, std::int64_t Dt, const std::uint16_t* panel, float* scores,
                              float* scores_second, std::int64_t Bk) {
    Tiles::template zero<0>();
    Tiles::template zero<1>();
    Tiles::template zero<2>();
    Tiles::template zero<3>();
    for (std::int64_t d = 0; d < Dt; d += kTileDims) {
      Tiles::template load<4>(q + d, Dt * 2);
      Tiles::template load<6>(panel + d * NR, NR * 4);
      dot<0, 4, 6>();
      Tiles::template load<5>(q + MR * Dt + d, Dt * 2);
      dot<2, 5, 6>();
      Tiles::template load<7>(panel + d * NR + 32, NR * 4);
      dot<1, 4, 7>();
      dot<3, 5, 7>();
    }
    Tiles::template store<0>(scores, Bk * 4);
    Tiles::template store<1>(scores + 16, Bk * 4);
    Tiles::template store<2>(scores_second, Bk * 4);
    Tiles::template store<3>(scores_second + 16, Bk * 4);
  }

  // The softmax's weights as the P.V product takes them: bf16, weight j of a row in its
  // 16-bit word j (kernels/pair_values.hpp), in the row `out_offset` floats after the
  // score row (weights_offset: the scratch's rows after both tiles' scores, at the same
  // stride, half of each used). The scores come raw: the score factor is applied here
  // (one FMA; see score_factor). Per vector, against the fp32 softmax: exp2's polynomial
  // two FMAs shorter, no NaN probe (a NaN score gives a NaN weight and sum), and one
  // conversion per two vectors; each saving is about a tenth of the loop's vector
  // operations.
  //
  // The max is lazy (online_softmax's Weights::lazy_max): a row whose running max already
  // covers the block's scores skips the max pass, the alpha and the accumulator's rescale.
  // The limit on the sum, 2^12, keeps every weight below 2^12 (a false alarm needs the
  // block's average weight above 8 at 512 keys: scores that have grown); the fp32
  // accumulator gives up 12 of its 128 exponent bits of headroom for it.
  struct Bf16Weights {
    static constexpr bool scaled = true, lazy_max = true;
    static constexpr float kLazyLimit = 4096.0f;
    std::int64_t out_offset;
    batch weigh_row(float* s, std::int64_t c0, std::int64_t cols, float shift, float factor) const {
      return weigh(s + c0, reinterpret_cast<std::uint16_t*>(s + out_offset) + c0, cols - c0, shift, factor,
                   batch(0.0f));
    }
    // The weights of n scores (a multiple of 2W) from `scores` to `out`; returns `sum` plus
    // their lane sums.
    static batch weigh(const float* scores, std::uint16_t* out, std::int64_t n, float shift, float factor,
                       batch sum) {
      static_assert(NR % (2 * W) == 0, "whole panels hold whole pairs of vectors");
      const batch shift_v(shift), factor_v(factor);
      batch sum_odd(0.0f);
      for (std::int64_t j = 0; j < n; j += 2 * W) {
        const batch p =
            exp2_nonpositive<Arch, true>(xsimd::fma(batch::load_aligned(scores + j), factor_v, -shift_v));
        const batch q =
            exp2_nonpositive<Arch, true>(xsimd::fma(batch::load_aligned(scores + j + W), factor_v, -shift_v));
        store_pair(p, q, out + j);
        sum += p;
        sum_odd += q;
      }
      return sum + sum_odd;
    }
    // p's lanes to out[0, W), q's to out[W, 2W), rounded to nearest even.
    static void store_pair(const batch& p, const batch& q, std::uint16_t* out) {
#if defined(__AVX512BF16__)
      if constexpr (W == 16) {
        _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(q, p));
        return;
      }
#endif
      alignas(64) float lanes[2 * W];
      p.store_aligned(lanes);
      q.store_aligned(lanes + W);
      for (int i = 0; i < 2 * W; ++i) out[i] = round_to_bf16(lanes[i]);
    }
  };

  // Floats from a score row of the scratch to its weights row: past both tiles' scores.
  static std::int64_t weights_offset(const QueryBlockJob& job) { return 2 * MR * job.dims.block_keys; }

  // The factor the softmax applies to the raw scores: the job's, unless score terms
  // (masks, softcap, ALiBi) need the scores in log2 units first, or it is not positive
  // (the softmax takes a raw row's maximum); then scale_scores applies it and this is 1.
  static float score_factor(const QueryBlockJob& job) {
    const bool terms = job.score.key_bias || job.score.row_bias || job.score.natural_units;
    return !terms && job.score.raw_factor > 0.0f ? job.score.raw_factor : 1.0f;
  }

  // The score factor on rows [0, rows) of the score scratch, columns [c0, cols), where
  // the softmax does not apply it.
  static void scale_scores(const QueryBlockJob& job, int rows, std::int64_t c0, std::int64_t cols) {
    const float factor = job.score.raw_factor;
    if (factor == 1.0f || score_factor(job) != 1.0f) return;
    const std::int64_t Bk = job.dims.block_keys;
    for (int r = 0; r < rows; ++r) {
      float* s = job.state.scores + r * Bk;
      for (std::int64_t j = c0; j < cols; j += W) (batch::load_aligned(s + j) * batch(factor)).store_aligned(s + j);
    }
  }

  // S for one tile's columns [c0, cols) (whole panels), raw or times the score factor
  // (score_factor). No row maxima on the way: the softmax takes them.
  static void raw_scores(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t) {
    const std::int64_t Dt = tile_head_dim(job.dims.head_dim), Bk = job.dims.block_keys;
    const auto* q = reinterpret_cast<const std::uint16_t*>(job.q.q_packed) + r0 * Dt;
    const auto* panels = reinterpret_cast<const std::uint16_t*>(job.keys.k_panels) + (j0 + t.c0 - job.keys.begin) * Dt;
    float* const scores = job.state.scores;
    std::int64_t c = t.c0;
    for (; c + 2 * NR <= t.cols; c += 2 * NR) score_one_tile<2>(q, Dt, panels + (c - t.c0) * Dt, scores + c, Bk);
    if (c < t.cols) score_one_tile<1>(q, Dt, panels + (c - t.c0) * Dt, scores + c, Bk);
    scale_scores(job, MR, t.c0, t.cols);
  }

  // S for the row tiles at r0 and r0 + 16 over the columns [c0, cols) of both, into the
  // score scratch's first and second 16 rows.
  static void raw_scores_two(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, std::int64_t c0,
                             std::int64_t cols) {
    const std::int64_t Dt = tile_head_dim(job.dims.head_dim), Bk = job.dims.block_keys;
    const auto* q = reinterpret_cast<const std::uint16_t*>(job.q.q_packed) + r0 * Dt;
    const auto* panels = reinterpret_cast<const std::uint16_t*>(job.keys.k_panels) + (j0 + c0 - job.keys.begin) * Dt;
    float* const scores = job.state.scores;
    for (std::int64_t c = c0; c < cols; c += NR)
      score_two_tiles(q, Dt, panels + (c - c0) * Dt, scores + c, scores + MR * Bk + c, Bk);
    scale_scores(job, 2 * MR, c0, cols);
  }

  // Keys per step of weigh_block_in_steps: S of 32 rows x 64 keys (8 KiB) stays in L1
  // between its tile stores and the softmax's loads. tools/ab_builds against the whole
  // block's scores, one thread, H = 8, N = M = 2048, per-round medians: 64 keys 1.121 at
  // D = 64 and 1.044 at D = 128; 32 keys 1.088 and 1.053; 128 keys 1.060 and 1.018.
  static constexpr std::int64_t kStepKeys = 2 * NR;

  // Whether the row tiles at r0 and r0 + 16 (t, t_second) can take weigh_block_in_steps in
  // the block at j0: blocks of at least a step (its scores fit the score scratch), both
  // tiles see every column of [0, t.cols) (whole panels), no score terms, the factor
  // applied in the exponent, and every row (padding rows too) has a running max.
  static bool whole_block(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                          const TileColumns& t_second) {
    if (job.dims.block_keys < kStepKeys || t.first != 0 || t.num_keys != t.cols || t_second.first != 0 ||
        t_second.num_keys != t.cols || t_second.cols != t.cols)
      return false;
    if (job.score.key_bias || job.score.row_bias || job.score.natural_units || !(job.score.raw_factor > 0.0f))
      return false;
    // Visible intervals grow with the row (kernels/forward.hpp: visible_lo, visible_hi), so
    // the first row's end and the last real row's start bound every row's.
    const std::int64_t G = job.q.heads_per_row;
    const std::int64_t first = job.q.first_row + r0 / G;
    const std::int64_t last = job.q.first_row + (min_i64(r0 + 2 * MR, job.q.rows) - 1) / G;
    if (Base::lo(job, last) > j0 || Base::hi(job, first) < j0 + t.cols - 1) return false;
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < 2 * MR; ++r)
      if (job.state.row_max[r0 + r] == neg_inf) return false;
    return true;
  }

  // S and the weights of the row tiles at r0 and r0 + 16 for the block's columns [0, cols),
  // 64 keys at a time: each step's scores go to the first 8 KiB of the score scratch and
  // are weighed (against each row's running max, the lazy max of Bf16Weights) while they
  // are in L1, instead of a whole block's scores going out to L2 and back. Returns false,
  // with the job's state untouched, when some row's sum passes the lazy limit: the caller
  // then runs the block the usual way (S of the whole block, online_softmax).
  static bool weigh_block_in_steps(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, std::int64_t cols,
                                   float factor) {
    const std::int64_t Dt = tile_head_dim(job.dims.head_dim), Bk = job.dims.block_keys;
    const auto* q = reinterpret_cast<const std::uint16_t*>(job.q.q_packed) + r0 * Dt;
    const auto* panels = reinterpret_cast<const std::uint16_t*>(job.keys.k_panels) + (j0 - job.keys.begin) * Dt;
    float* const step_scores = job.state.scores;
    auto* const weights = reinterpret_cast<std::uint16_t*>(job.state.scores + weights_offset(job));
    const float* const running_max = job.state.row_max + r0;
    alignas(64) float sums[2 * MR][W];
    for (int r = 0; r < 2 * MR; ++r) batch(0.0f).store_aligned(sums[r]);
    for (std::int64_t c = 0; c < cols; c += kStepKeys) {
      const std::int64_t keys = min_i64(kStepKeys, cols - c);
      for (std::int64_t p = 0; p < keys; p += NR)
        score_two_tiles(q, Dt, panels + (c + p) * Dt, step_scores + p, step_scores + MR * kStepKeys + p, kStepKeys);
      for (int r = 0; r < 2 * MR; ++r) {
        const batch sum = Bf16Weights::weigh(step_scores + r * kStepKeys, weights + 2 * r * Bk + c, keys,
                                             running_max[r], factor, batch::load_aligned(sums[r]));
        sum.store_aligned(sums[r]);
      }
    }
    float row_sums[2 * MR];
    for (int r = 0; r < 2 * MR; ++r) {
      row_sums[r] = xsimd::hadd(batch::load_aligned(sums[r]));
      if (row_sums[r] > Bf16Weights::kLazyLimit) return false;  // a NaN sum is kept, as in online_softmax
    }
    for (int r = 0; r < 2 * MR; ++r) job.state.row_sum[r0 + r] += row_sums[r];
    return true;
  }

  // The P.V operands of one call: weights as bf16 in the scratch's weights rows, V's pairs and
  // chunk flags from key c0 of the block on, and the chunks [0, chunks).
  struct ValueChunks {
    const std::uint16_t* probs;  // the first tile's weights at column c0 (the second's MR rows on)
    const std::uint32_t* pairs;
    const std::uint8_t* nonfinite;
    std::int64_t chunks, Bk, Dvp;
  };
  static ValueChunks value_chunks(const QueryBlockJob& job, std::int64_t j0, std::int64_t c0, std::int64_t cols) {
    const std::int64_t Dvp = job.dims.value_dim_padded, keys = job.keys.end - job.keys.begin;
    const auto* all_pairs = static_cast<const std::uint32_t*>(job.keys.v_rows);
    ValueChunks v;
    v.probs = reinterpret_cast<const std::uint16_t*>(job.state.scores + weights_offset(job)) + c0;
    v.pairs = all_pairs + (j0 + c0 - job.keys.begin) / 2 * Dvp;
    v.nonfinite = value_pairs_flags(all_pairs, keys, Dvp, NR) + (j0 + c0 - job.keys.begin) / NR;
    v.chunks = (cols - c0) / NR;
    v.Bk = job.dims.block_keys;
    v.Dvp = Dvp;
    return v;
  }

  // One row tile's NC (1 to 4) accumulator tiles of 16 value columns from acc + c: each
  // adds the chunks' products in key order (a chain per tile, independent of the others),
  // skipping the chunks flagged non-finite.
  template <int NC>
  static void values_one_tile(const ValueChunks& v, std::int64_t c, float* acc) {
    const std::int64_t Dvp = v.Dvp;
    Tiles::template load<0>(acc + c, Dvp * 4);
    if constexpr (NC > 1) Tiles::template load<1>(acc + c + 16, Dvp * 4);
    if constexpr (NC > 2) Tiles::template load<2>(acc + c + 32, Dvp * 4);
    if constexpr (NC > 3) Tiles::template load<3>(acc + c + 48, Dvp * 4);
    for (std::int64_t k = 0; k < v.chunks; ++k) {
      if (v.nonfinite[k]) continue;
      const std::uint32_t* pairs = v.pairs + k * (NR / 2) * Dvp + c;
      Tiles::template load<4>(v.probs + k * NR, v.Bk * 4);
      Tiles::template load<6>(pairs, Dvp * 4);
      dot<0, 4, 6>();
      if constexpr (NC > 1) {
        Tiles::template load<7>(pairs + 16, Dvp * 4);
        dot<1, 4, 7>();
      }
      if constexpr (NC > 2) {
        Tiles::template load<6>(pairs + 32, Dvp * 4);
        dot<2, 4, 6>();
      }
      if constexpr (NC > 3) {
        Tiles::template load<7>(pairs + 48, Dvp * 4);
        dot<3, 4, 7>();
      }
    }
    Tiles::template store<0>(acc + c, Dvp * 4);
    if constexpr (NC > 1) Tiles::template store<1>(acc + c + 16, Dvp * 4);
    if constexpr (NC > 2) Tiles::template store<2>(acc + c + 32, Dvp * 4);
    if constexpr (NC > 3) Tiles::template store<3>(acc + c + 48, Dvp * 4);
  }

  // Two row tiles' NC (1 or 2) accumulator tiles of 16 value columns each: each V tile
  // loaded serves both.
  template <int NC>
  static void values_two_tiles(const ValueChunks& v, std::int64_t c, float* acc, float* acc_second) {
    const std::int64_t Dvp = v.Dvp;
    Tiles::template load<0>(acc + c, Dvp * 4);
    Tiles::template load<2>(acc_second + c, Dvp * 4);
    if constexpr (NC > 1) {
      Tiles::template load<1>(acc + c + 16, Dvp * 4);
      Tiles::template load<3>(acc_second + c + 16, Dvp * 4);
    }
    for (std::int64_t k = 0; k < v.chunks; ++k) {
      if (v.nonfinite[k]) continue;
      const std::uint32_t* pairs = v.pairs + k * (NR / 2) * Dvp + c;
      Tiles::template load<4>(v.probs + k * NR, v.Bk * 4);
      Tiles::template load<6>(pairs, Dvp * 4);
      dot<0, 4, 6>();
      Tiles::template load<5>(v.probs + MR * 2 * v.Bk + k * NR, v.Bk * 4);
      dot<2, 5, 6>();
      if constexpr (NC > 1) {
        Tiles::template load<7>(pairs + 16, Dvp * 4);
        dot<1, 4, 7>();
        dot<3, 5, 7>();
      }
    }
    Tiles::template store<0>(acc + c, Dvp * 4);
    Tiles::template store<2>(acc_second + c, Dvp * 4);
    if constexpr (NC > 1) {
      Tiles::template store<1>(acc + c + 16, Dvp * 4);
      Tiles::template store<3>(acc_second + c + 16, Dvp * 4);
    }
  }

  // Before P.V: rows [0, rows) of the accumulator at acc rescaled by alpha.
  static void rescale_accumulator(const QueryBlockJob& job, const float* alpha, float* acc, int rows) {
    const std::int64_t Dvp = job.dims.value_dim_padded;
    for (int r = 0; r < rows; ++r) {
      if (alpha[r] == 1.0f) continue;
      const batch a(alpha[r]);
      for (std::int64_t c = 0; c < Dvp; c += W) (batch::load_aligned(acc + r * Dvp + c) * a).store_aligned(acc + r * Dvp + c);
    }
  }

  // Chunks holding inf or NaN: weighed apart, skipping zero weights (a zero weight times
  // an inf or NaN value is NaN on the tiles).
  static void add_nonfinite_chunks(const ValueChunks& v, const std::uint16_t* probs, float* acc) {
    for (std::int64_t k = 0; k < v.chunks; ++k)
      if (v.nonfinite[k])
        add_nonfinite_chunk(probs + k * NR, 2 * v.Bk, MR, v.pairs + k * (NR / 2) * v.Dvp, NR, v.Dvp, acc, v.Dvp);
  }

  // O = alpha O + P . V for one row tile's columns [c0, cols), 64 value columns at a time.
  static void accumulate_values(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                                const float* alpha) {
    const std::int64_t Dvp = job.dims.value_dim_padded;
    float* const acc = job.state.acc + r0 * Dvp;
    rescale_accumulator(job, alpha, acc, MR);
    const ValueChunks v = value_chunks(job, j0, t.c0, t.cols);
    std::int64_t c = 0;
    for (; c + 4 * kTileValueColumns <= Dvp; c += 4 * kTileValueColumns) values_one_tile<4>(v, c, acc);
    switch ((Dvp - c) / kTileValueColumns) {
      case 3: values_one_tile<3>(v, c, acc); break;
      case 2: values_one_tile<2>(v, c, acc); break;
      case 1: values_one_tile<1>(v, c, acc); break;
      default: break;
    }
    add_nonfinite_chunks(v, v.probs, acc);
  }

  // The same for the row tiles at r0 and r0 + 16 over the columns [c0, cols) of both,
  // 32 value columns at a time. Each tile's weights outside its own columns are zeros
  // here: a zero weight adds nothing (the product is exact), and the chunks with
  // non-finite values skip zero weights.
  static void accumulate_values_two(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, std::int64_t c0,
                                    std::int64_t cols, const float* alpha, const float* alpha_second) {
    const std::int64_t Dvp = job.dims.value_dim_padded, Bk = job.dims.block_keys;
    float* const acc = job.state.acc + r0 * Dvp;
    float* const acc_second = acc + MR * Dvp;
    rescale_accumulator(job, alpha, acc, MR);
    rescale_accumulator(job, alpha_second, acc_second, MR);
    const ValueChunks v = value_chunks(job, j0, c0, cols);
    std::int64_t c = 0;
    for (; c + 2 * kTileValueColumns <= Dvp; c += 2 * kTileValueColumns) values_two_tiles<2>(v, c, acc, acc_second);
    if (c < Dvp) values_two_tiles<1>(v, c, acc, acc_second);
    add_nonfinite_chunks(v, v.probs, acc);
    add_nonfinite_chunks(v, v.probs + 2 * MR * Bk, acc_second);
  }

  // A tile's bf16 weights (rows from `rows` on) outside [c0, cols) within [u0, u1) set to
  // zero (its softmax wrote only its own columns).
  static void zero_outside(float* rows, std::int64_t Bk, std::int64_t u0, std::int64_t u1, const TileColumns& t) {
    for (int r = 0; r < MR; ++r) {
      auto* weights = reinterpret_cast<std::uint16_t*>(rows + r * Bk);
      for (std::int64_t j = u0; j < t.c0; ++j) weights[j] = 0;
      for (std::int64_t j = t.cols; j < u1; ++j) weights[j] = 0;
    }
  }

  // The fused kernel on one job: ForwardKernel::run_blocks, with the products above and
  // the row tiles taken two at a time where both see keys of the block (the second's
  // scores in the scratch's second 16 rows: KernelTable::score_rows), so that each K and
  // V tile loaded serves 32 rows. Tiles configured for the call and released after it.
  // Flattened: every vector helper it calls (xsimd's included) is inlined, so this object
  // holds no out-of-line copy that the linker could share with the avx512 objects
  // (tests/check_isa_symbols.cmake).
  __attribute__((flatten)) static void forward_query_block(const QueryBlockJob& job) {
    assert(job.keys.k_panels != nullptr && job.score.kind == ScoreKind::dot);
    assert(!job.score.key_bias && !job.score.row_bias && job.dims.value_dim_padded % kTileValueColumns == 0);
    assert(job.q.rows > 0 && job.dims.block_keys % NR == 0);
    const TileConfigBlock config = tile_config();
    Tiles::configure(config);
    const std::int64_t Bk = job.dims.block_keys;
    const std::int64_t rows_padded = (job.q.rows + MR - 1) / MR * MR;
    if (!job.state.resume) Base::reset_state(job, rows_padded);
    const typename Base::KeySpan span = Base::key_span(job);
    QueryBlockJob second = job;  // the second tile's view: its scores in the scratch's second 16 rows
    second.state.scores += MR * Bk;
    typename Base::TileWeights w, w_second;
    const float factor = score_factor(job);
    const Bf16Weights weights{weights_offset(job)};
    for (std::int64_t j0 = span.start; j0 < span.end; j0 += Bk) {
      const std::int64_t block_end = min_i64(j0 + Bk, span.end);
      for (std::int64_t r0 = 0; r0 < rows_padded; r0 += 2 * MR) {
        TileColumns t, t_second;
        const bool live = Base::tile_columns(job, r0, j0, block_end, &t);
        const bool live_second = r0 + MR < rows_padded && Base::tile_columns(job, r0 + MR, j0, block_end, &t_second);
        if (live && live_second && whole_block(job, r0, j0, t, t_second) &&
            weigh_block_in_steps(job, r0, j0, t.cols, factor)) {
          static constexpr float kOnes[2 * MR] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
          accumulate_values_two(job, r0, j0, 0, t.cols, kOnes, kOnes + MR);
        } else if (live && live_second) {
          const std::int64_t u0 = t.c0 < t_second.c0 ? t.c0 : t_second.c0;
          const std::int64_t u1 = t.cols > t_second.cols ? t.cols : t_second.cols;
          raw_scores_two(job, r0, j0, u0, u1);
          Base::template weigh_scores<Bf16Weights>(job, r0, j0, t, nullptr, false, &w, factor, weights);
          Base::template weigh_scores<Bf16Weights>(second, r0 + MR, j0, t_second, nullptr, false, &w_second, factor,
                                                   weights);
          zero_outside(job.state.scores + weights_offset(job), Bk, u0, u1, t);
          zero_outside(second.state.scores + weights_offset(job), Bk, u0, u1, t_second);
          accumulate_values_two(job, r0, j0, u0, u1, w.alpha, w_second.alpha);
        } else if (live || live_second) {
          const std::int64_t r = live ? r0 : r0 + MR;
          const TileColumns& one = live ? t : t_second;
          raw_scores(job, r, j0, one);
          Base::template weigh_scores<Bf16Weights>(job, r, j0, one, nullptr, false, &w, factor, weights);
          accumulate_values(job, r, j0, one, w.alpha);
        }
      }
    }
    if (job.state.finalize) Base::finalize(job);
    Tiles::release();
  }
};

// The packers of the tile layouts above, and the scratch they need. Sources are bf16, or
// fp32 / fp16 rounded to bf16 (allow_bf16_compute).
struct TilePackers {
  static std::int64_t key_panel_floats(std::int64_t keys, std::int64_t head_dim) {
    return round_up_i64(keys > 0 ? keys : 1, kTilePanelKeys) * tile_head_dim(head_dim) / 2;
  }
  static std::int64_t query_floats(std::int64_t rows, std::int64_t head_dim) {
    return round_up_i64(rows, 2) * tile_head_dim(head_dim) / 2;
  }
  static std::int64_t value_floats(std::int64_t keys, std::int64_t value_dim_padded) {
    return value_pairs_floats(keys, value_dim_padded, kTilePanelKeys);
  }

  static float pack_key_panels(const SourceRows& k, std::int64_t keys, std::int64_t head_dim, const float* center,
                               float, float* panels, float*) {
    assert(center == nullptr);
    (void)center;
    pack_bf16_key_pairs(k, keys, head_dim, tile_head_dim(head_dim) / 2, kTilePanelKeys,
                        reinterpret_cast<std::uint32_t*>(panels));
    return 0.0f;
  }

  // V by pairs of keys, flags per 32-key chunk (pair_values.hpp).
  static void pack_value_rows(const SourceRows& v, std::int64_t keys, std::int64_t value_dim,
                              std::int64_t value_dim_padded, void* rows) {
    pack_bf16_value_pairs(v, keys, value_dim, value_dim_padded, kTilePanelKeys, static_cast<std::uint32_t*>(rows));
  }

  // Q in bf16, rows of tile_head_dim elements (pack.hpp).
  static void pack_query_rows(const QueryPack& pack) { pack_bf16_query_rows(pack, tile_head_dim(pack.head_dim)); }
};
