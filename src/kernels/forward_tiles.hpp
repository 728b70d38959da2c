// The fused forward on AMX tiles: bf16 Q, K and V, both products on the matrix unit, the
// online softmax on the vector units between them. Included by kernels/variant.hpp when
// the variant's level compiles the tile instructions (the `amx` line of
// kernels/variants.inc), and by tests/emulation.cpp with EmulatedTiles.
//
// One call handles one query block, as ForwardKernel::forward_query_block does, and
// reuses its stages: which keys a row tile sees (tile_columns), the score terms
// (score_epilogue: masks, softcap, ALiBi), the online softmax and the finalization.
// Only the two products differ:
//   S = Q . K^T   Q unscaled in bf16 (a bf16 q scaled and rounded again would move every
//                 score by up to 2^-9 of its size), K in 32-key panels in the pair layout;
//                 the scale (times log2 e) multiplies the fp32 scores as they leave the tiles.
//   O = alpha O + P . V   P rounded to bf16 in place (as FlashAttention does; the row sums
//                 stay fp32), V packed in the pair layout.
//
// Tile budget (each register 16 rows x 64 bytes, all eight used):
//   tmm0, tmm1  C  scores of keys [0, 16) and [16, 32) of a panel, 16 rows x 16 fp32
//   tmm2        A  16 query rows x 32 dims of Q
//   tmm3, tmm4  B  32 dims x 16 keys of K, for each half of the panel
//   tmm5        C  16 rows x 16 columns of O, loaded from the block's accumulator and back
//   tmm6        A  16 rows x 32 keys of P
//   tmm7        B  32 keys x 16 columns of V
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

  // S for the tile's columns [c0, cols) (whole panels), times the score factor, as
  // ForwardKernel::run_blocks calls it. No row maxima on the way: the softmax takes them.
  static bool raw_scores(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t, float*,
                         PrefetchStream&) {
    const std::int64_t Dt = tile_head_dim(job.dims.head_dim), Bk = job.dims.block_keys;
    const auto* q = reinterpret_cast<const std::uint16_t*>(job.q.q_packed) + r0 * Dt;
    const auto* panels = reinterpret_cast<const std::uint16_t*>(job.keys.k_panels) + (j0 + t.c0 - job.keys.begin) * Dt;
    float* const scores = job.state.scores;
    for (std::int64_t c = t.c0; c < t.cols; c += NR) {
      const std::uint16_t* panel = panels + (c - t.c0) * Dt;
      Tiles::template zero<0>();
      Tiles::template zero<1>();
      for (std::int64_t d = 0; d < Dt; d += kTileDims) {
        Tiles::template load<2>(q + d, Dt * 2);
        Tiles::template load<3>(panel + d * NR, NR * 4);
        Tiles::template load<4>(panel + d * NR + 32, NR * 4);
        Tiles::template dot_bf16<0, 2, 3>();
        Tiles::template dot_bf16<1, 2, 4>();
      }
      Tiles::template store<0>(scores + c, Bk * 4);
      Tiles::template store<1>(scores + c + 16, Bk * 4);
    }
    const float factor = job.score.raw_factor;
    if (factor == 1.0f) return false;
    for (int r = 0; r < MR; ++r) {
      float* s = scores + r * Bk;
      for (std::int64_t j = t.c0; j < t.cols; j += W) (batch::load_aligned(s + j) * batch(factor)).store_aligned(s + j);
    }
    return false;
  }

  // O = alpha O + P . V for the tile's columns [c0, cols), as ForwardKernel::run_blocks
  // calls it (zero weights need no care here but in the chunks flagged non-finite).
  static void accumulate_values(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                                const float* alpha, bool, std::int64_t, std::int64_t, ValuesAhead) {
    const std::int64_t Bk = job.dims.block_keys, Dvp = job.dims.value_dim_padded;
    float* const acc = job.state.acc + r0 * Dvp;
    for (int r = 0; r < MR; ++r) {
      if (alpha[r] == 1.0f) continue;
      const batch a(alpha[r]);
      for (std::int64_t c = 0; c < Dvp; c += W) (batch::load_aligned(acc + r * Dvp + c) * a).store_aligned(acc + r * Dvp + c);
    }
    for (int r = 0; r < MR; ++r) round_weights_to_bf16<W>(job.state.scores + r * Bk, t.c0, t.cols);
    const auto* probs = reinterpret_cast<const std::uint16_t*>(job.state.scores);
    const auto* pairs = static_cast<const std::uint32_t*>(job.keys.v_rows);
    const std::uint8_t* nonfinite = value_pairs_flags(pairs, job.keys.end - job.keys.begin, Dvp, NR);
    const std::int64_t first_chunk = (j0 + t.c0 - job.keys.begin) / NR;
    bool any_nonfinite = false;
    for (std::int64_t c = 0; c < Dvp; c += kTileValueColumns) {
      Tiles::template load<5>(acc + c, Dvp * 4);
      for (std::int64_t k = t.c0; k < t.cols; k += NR) {
        if (nonfinite[first_chunk + (k - t.c0) / NR]) {
          any_nonfinite = true;
          continue;
        }
        Tiles::template load<6>(probs + k, Bk * 4);
        Tiles::template load<7>(pairs + (j0 + k - job.keys.begin) / 2 * Dvp + c, Dvp * 4);
        Tiles::template dot_bf16<5, 6, 7>();
      }
      Tiles::template store<5>(acc + c, Dvp * 4);
    }
    if (!any_nonfinite) return;
    // Chunks holding inf or NaN: weighed here, skipping zero weights.
    for (std::int64_t k = t.c0; k < t.cols; k += NR)
      if (nonfinite[first_chunk + (k - t.c0) / NR])
        add_nonfinite_chunk(probs + k, 2 * Bk, MR, pairs + (j0 + k - job.keys.begin) / 2 * Dvp, NR, Dvp, acc, Dvp);
  }

  // The fused kernel on one job (ForwardKernel::run_blocks with the products above),
  // tiles configured for the call and released after it. Flattened: every vector helper
  // it calls (xsimd's included) is inlined, so this object holds no out-of-line copy that
  // the linker could share with the avx512 objects (tests/check_isa_symbols.cmake).
  __attribute__((flatten)) static void forward_query_block(const QueryBlockJob& job) {
    assert(job.keys.k_panels != nullptr && job.score.kind == ScoreKind::dot);
    assert(!job.score.key_bias && !job.score.row_bias && job.dims.value_dim_padded % kTileValueColumns == 0);
    const TileConfigBlock config = tile_config();
    Tiles::configure(config);
    Base::template run_blocks<TileForwardKernel>(job);
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
