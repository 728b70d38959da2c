// The fused forward with Q.K^T by vdpbf16ps (AVX512-BF16): bf16 Q and K multiplied in
// pairs of dimensions, two products per fp32 lane and instruction, twice the rate of the
// fp32 FMAs on the same registers. Included by kernels/variant.hpp for a level whose
// flags enable AVX512-BF16 but not the tiles (the `avx512bf16` line of
// kernels/variants.inc), and by tests/emulation.cpp with EmulatedPairDot.
//
// The score terms, the online softmax and the finalization are ForwardKernel's, through
// ForwardKernel::run_blocks. P.V comes in two forms (the PairValues parameter):
//   false  ForwardKernel's: bf16 V rows widened exactly as they load, P kept in fp32;
//   true   by vdpbf16ps as well: P rounded to bf16 (relative error 2^-8 per weight, the
//          row sums stay fp32) and V packed by pairs of keys (kernels/pair_values.hpp),
//          two keys per instruction, half the instructions of the widened form.
//
// Packed layouts (PairPackers; each bf16 pair one 32-bit word of the driver's float
// scratch, element 2t in the low half):
//   Q  rows of head_pairs = ceil(D / 2) words (q[2t], q[2t + 1]), as given, unscaled (a
//      bf16 q scaled and rounded again would move every score by up to 2^-9 of its
//      size): the scale (times log2 e) multiplies the fp32 scores as they are stored;
//   K  panel p (keys NR p .. NR p + NR - 1): head_pairs rows of NR words (k[2t], k[2t + 1]);
//   V  rows as stored, like the bf16 vector variant; with pair values, by pairs of keys
//      in chunks of NR keys.

inline std::int64_t head_pairs(std::int64_t head_dim) { return (head_dim + 1) / 2; }

// acc + q.hi k.hi + q.lo k.lo in each 32-bit lane, the lanes holding bf16 pairs.
#if defined(__AVX512BF16__)
struct HardwarePairDot {
  template <class batch>
  static batch step(batch acc, batch q, batch k) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(q), (__m512bh)_mm512_castps_si512(k));
  }
};
#endif

// The same on any vector width, lane by lane as the SDM defines VDPBF16PS (the odd
// product first, then the even one, each an FMA in Bf16DotArithmetic: subnormal inputs
// read as zero, subnormal sums flushed), for tests on CPUs without AVX512-BF16. Bitwise
// the instruction on Zen 4 and Zen 5 on random and chosen lanes: subnormals, overflow,
// infinities, NaN-ness (test_bf16_products.cpp).
struct EmulatedPairDot {
  template <class batch>
  static batch step(batch acc, batch q, batch k) {
    constexpr std::size_t n = batch::size;
    alignas(64) float a[n], x[n], y[n];
    acc.store_aligned(a);
    q.store_aligned(x);
    k.store_aligned(y);
    for (std::size_t i = 0; i < n; ++i) {
      std::uint32_t qb, kb;
      __builtin_memcpy(&qb, &x[i], 4);
      __builtin_memcpy(&kb, &y[i], 4);
      const float odd = Bf16DotArithmetic::fma(a[i], qb >> 16, kb >> 16);
      a[i] = Bf16DotArithmetic::fma(odd, qb & 0xffffu, kb & 0xffffu);
    }
    return batch::load_aligned(a);
  }
};

template <class Arch, int MR, int NRV, int NV, int PR, class Dot, bool PairValues>
struct PairForwardKernel : ForwardKernel<Arch, MR, NRV, NV, PR, bf16> {
  using Base = ForwardKernel<Arch, MR, NRV, NV, PR, bf16>;
  using batch = typename Base::batch;
  using TileColumns = typename Base::TileColumns;
  static constexpr int NR = Base::NR;
  static constexpr int W = Base::W;

  struct PairStep {
    batch operator()(std::int64_t, batch q, batch k, batch acc) const { return Dot::step(acc, q, k); }
  };

  // S for the tile's columns [c0, cols): ForwardKernel's panel micro-kernel, one step per
  // pair of dimensions (the broadcast and the loads move the pairs' bits untouched).
  // Decoding (the small kernel, PairValues false) may read bf16 K rows in place instead:
  // a row's consecutive elements are already the pairs vdpbf16ps takes, so ForwardKernel's
  // row micro-kernel runs on them as 32-bit words, half as many steps as widened K, and
  // no widening (the decode driver reads K in place when D is a multiple of 2W and the
  // rows start on 4-byte boundaries, src/decode.cpp).
  static bool raw_scores(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                         float* tile_max, PrefetchStream& ahead) {
    const std::int64_t Dh = head_pairs(job.dims.head_dim);
    const float* q = job.q.q_packed + r0 * Dh;
    if (job.keys.k_rows) {
      const std::int64_t stride = job.keys.k_row_stride / 2;  // in words (the driver keeps it even)
      const auto* k = reinterpret_cast<const float*>(Base::k_rows(job) + (j0 + t.c0 - job.keys.begin) * job.keys.k_row_stride);
      float* const scores = job.state.scores + t.c0;
      const float factor = job.score.raw_factor;
      if constexpr (MR % 2 == 0) {
        if (Base::padding_half(job, r0)) {  // the live rows only
          Base::template scores_tile_rows<MR / 2, Base::kHalfKeysPerPass, PairStep>(
              q, Dh, k, stride, t.num_keys - t.c0, t.cols - t.c0, scores, job.dims.block_keys, ahead, factor);
          return false;
        }
      }
      Base::template scores_tile_rows<MR, Base::kFullKeysPerPass, PairStep>(
          q, Dh, k, stride, t.num_keys - t.c0, t.cols - t.c0, scores, job.dims.block_keys, ahead, factor);
      return false;
    }
    const float* panels = job.keys.k_panels + (j0 + t.c0 - job.keys.begin) * Dh;
    Base::scores_tile(q, Dh, Dh, panels, (t.cols - t.c0) / NR, job.state.scores + t.c0, job.dims.block_keys,
                      job.score.raw_factor, tile_max, PairStep{});
    return true;
  }

  // acc[r][0 .. NVC W) = alpha[r] acc[..] + P.V over `pair_count` pairs of keys (whole
  // chunks, none flagged), for ROWS rows: per pair, one product of the row's weight pair
  // (word t of its weights, broadcast) and the pair row's NVC vectors.
  template <int ROWS, int NVC>
  static void pair_values_tile(const std::uint32_t* weights, std::int64_t weights_stride, const float* alpha,
                               const std::uint32_t* pairs, std::int64_t Dvp, std::int64_t pair_count, float* acc) {
    batch o[ROWS][NVC];
    for (int r = 0; r < ROWS; ++r) {
      const batch a(alpha[r]);
      for (int c = 0; c < NVC; ++c) o[r][c] = batch::load_aligned(acc + r * Dvp + c * W) * a;
    }
    for (std::int64_t t = 0; t < pair_count; ++t) {
      batch vals[NVC];
      for (int c = 0; c < NVC; ++c)
        vals[c] = batch::load_aligned(reinterpret_cast<const float*>(pairs + t * Dvp + c * W));
      for (int r = 0; r < ROWS; ++r) {
        float word;
        __builtin_memcpy(&word, weights + r * weights_stride + t, 4);
        const batch p(word);
        for (int c = 0; c < NVC; ++c) o[r][c] = Dot::step(o[r][c], p, vals[c]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < NVC; ++c) o[r][c].store_aligned(acc + r * Dvp + c * W);
  }

  // O = alpha O + P.V with pair values, for the tile's columns [c0, cols) (whole
  // chunks): runs of unflagged chunks by pair_values_tile, NV vectors of columns at a
  // time; flagged chunks (an inf or NaN value) apart, skipping zero weights.
  static void accumulate_values(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                                const float* alpha, bool masked_out, std::int64_t clean_begin,
                                std::int64_t clean_end, ValuesAhead ahead) {
    if constexpr (!PairValues) {
      Base::accumulate_values(job, r0, j0, t, alpha, masked_out, clean_begin, clean_end, ahead);
    } else {
      const std::int64_t Bk = job.dims.block_keys, Dvp = job.dims.value_dim_padded;
      float* const scores = job.state.scores;
      for (int r = 0; r < MR; ++r) round_weights_to_bf16<W>(scores + r * Bk, t.c0, t.cols);
      const auto* weights = reinterpret_cast<const std::uint32_t*>(scores);  // row r's pair t at r Bk + t
      const auto* pairs = static_cast<const std::uint32_t*>(job.keys.v_rows);
      const std::uint8_t* nonfinite = value_pairs_flags(pairs, job.keys.end - job.keys.begin, Dvp, NR);
      const std::int64_t first = j0 - job.keys.begin;  // the block's first key, from keys.begin
      for (int h = 0; h < MR; h += PR) {
        const float* a = alpha + h;
        float* acc = job.state.acc + (r0 + h) * Dvp;
        const std::uint32_t* w = weights + h * Bk;
        // Runs of unflagged chunks; alpha scales acc with the first run (or alone).
        std::int64_t k = t.c0;
        bool scaled = false;
        alignas(64) float one[PR];
        for (int r = 0; r < PR; ++r) one[r] = 1.0f;
        while (k < t.cols || !scaled) {
          while (k < t.cols && nonfinite[(first + k) / NR]) k += NR;
          if (k == t.cols && scaled) break;
          std::int64_t end = k;
          while (end < t.cols && !nonfinite[(first + end) / NR]) end += NR;
          const std::uint32_t* run_pairs = pairs + (first + k) / 2 * Dvp;
          const float* scale = scaled ? one : a;
          std::int64_t c = 0;
          for (; c + NV * W <= Dvp; c += NV * W)
            pair_values_tile<PR, NV>(w + k / 2, Bk, scale, run_pairs + c, Dvp, (end - k) / 2, acc + c);
          for (; c < Dvp; c += W)
            pair_values_tile<PR, 1>(w + k / 2, Bk, scale, run_pairs + c, Dvp, (end - k) / 2, acc + c);
          scaled = true;
          k = end;
        }
        for (std::int64_t chunk = t.c0; chunk < t.cols; chunk += NR)
          if (nonfinite[(first + chunk) / NR])
            add_nonfinite_chunk(reinterpret_cast<const std::uint16_t*>(w) + chunk, 2 * Bk, PR,
                                pairs + (first + chunk) / 2 * Dvp, NR, Dvp, acc, Dvp);
      }
    }
  }

  // ForwardKernel::run_blocks with the products above. Flattened, so that this object
  // holds no out-of-line copy of an xsimd function that the linker could share with the
  // avx512 objects (tests/check_isa_symbols.cmake).
  __attribute__((flatten)) static void forward_query_block(const QueryBlockJob& job) {
    assert((job.keys.k_panels != nullptr || !PairValues) && job.score.kind == ScoreKind::dot);
    assert(!job.score.key_bias && !job.score.row_bias);
    Base::template run_blocks<PairForwardKernel>(job);
  }
};

// The packers of the layouts above, and the scratch they need. Sources are bf16, or fp32
// / fp16 rounded to bf16 (allow_bf16_compute).
template <int NR, bool PairValues>
struct PairPackers {
  static std::int64_t key_panel_floats(std::int64_t keys, std::int64_t head_dim) {
    return (keys > 0 ? (keys + NR - 1) / NR * NR : NR) * head_pairs(head_dim);
  }
  static std::int64_t query_floats(std::int64_t rows, std::int64_t head_dim) { return rows * head_pairs(head_dim); }
  static std::int64_t value_floats(std::int64_t keys, std::int64_t value_dim_padded) {
    return PairValues ? value_pairs_floats(keys, value_dim_padded, NR) : keys * value_dim_padded;
  }

  static float pack_key_panels(const SourceRows& k, std::int64_t keys, std::int64_t head_dim, const float* center,
                               float, float* panels, float*) {
    assert(center == nullptr);
    (void)center;
    pack_bf16_key_pairs(k, keys, head_dim, head_pairs(head_dim), NR, reinterpret_cast<std::uint32_t*>(panels));
    return 0.0f;
  }

  static void pack_value_rows(const SourceRows& v, std::int64_t keys, std::int64_t value_dim,
                              std::int64_t value_dim_padded, void* rows) {
    if constexpr (PairValues) {
      pack_bf16_value_pairs(v, keys, value_dim, value_dim_padded, NR, static_cast<std::uint32_t*>(rows));
    } else {
      auto* out = static_cast<std::uint16_t*>(rows);  // bf16 rows (fp32 / fp16 rounded)
      for (std::int64_t j = 0; j < keys; ++j)
        pack_bf16_row(v, j * v.row_stride, value_dim, value_dim_padded, out + j * value_dim_padded);
    }
  }

  // Q in bf16, rows of 2 head_pairs elements, which are head_pairs little-endian pairs
  // (pack.hpp).
  static void pack_query_rows(const QueryPack& pack) { pack_bf16_query_rows(pack, 2 * head_pairs(pack.head_dim)); }
};
