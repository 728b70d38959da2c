// The fused forward with Q.K^T by vdpbf16ps (AVX512-BF16): bf16 Q and K multiplied in
// pairs of dimensions, two products per fp32 lane and instruction, twice the rate of the
// fp32 FMAs on the same registers. Included by kernels/variant.hpp for a level whose
// flags enable AVX512-BF16 but not the tiles (the `avx512bf16` line of
// kernels/variants.inc), and by tests/emulation.cpp with EmulatedPairDot.
//
// Only the S product is new. The score terms, the online softmax, P.V (bf16 V rows
// widened exactly as they load, P kept in fp32) and the finalization are ForwardKernel's,
// through ForwardKernel::run_blocks.
//
// Packed layouts (PairPackers; each bf16 pair one 32-bit word of the driver's float
// scratch, element 2t in the low half):
//   Q  rows of head_pairs = ceil(D / 2) words (q[2t], q[2t + 1]), as given, unscaled (a
//      bf16 q scaled and rounded again would move every score by up to 2^-9 of its
//      size): the scale (times log2 e) multiplies the fp32 scores as they are stored;
//   K  panel p (keys NR p .. NR p + NR - 1): head_pairs rows of NR words (k[2t], k[2t + 1]);
//   V  rows as stored, like the bf16 vector variant.

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

// The same on any vector width, element by element as the SDM defines VDPBF16PS (the
// odd product first; each sum rounded to fp32), for tests on CPUs without AVX512-BF16.
struct EmulatedPairDot {
  template <class batch>
  static batch step(batch acc, batch q, batch k) {
    using ibatch = xsimd::batch<std::int32_t, typename batch::arch_type>;
    const ibatch high(std::int32_t(0xffff0000u));
    const ibatch qi = xsimd::bitwise_cast<ibatch>(q), ki = xsimd::bitwise_cast<ibatch>(k);
    const batch q_hi = xsimd::bitwise_cast<batch>(qi & high), k_hi = xsimd::bitwise_cast<batch>(ki & high);
    const batch q_lo = xsimd::bitwise_cast<batch>(qi << 16), k_lo = xsimd::bitwise_cast<batch>(ki << 16);
    return xsimd::fma(q_lo, k_lo, xsimd::fma(q_hi, k_hi, acc));
  }
};

template <class Arch, int MR, int NRV, int NV, int PR, class Dot>
struct PairForwardKernel : ForwardKernel<Arch, MR, NRV, NV, PR, bf16> {
  using Base = ForwardKernel<Arch, MR, NRV, NV, PR, bf16>;
  using batch = typename Base::batch;
  using TileColumns = typename Base::TileColumns;
  static constexpr int NR = Base::NR;

  struct PairStep {
    batch operator()(std::int64_t, batch q, batch k, batch acc) const { return Dot::step(acc, q, k); }
  };

  // S for the tile's columns [c0, cols): ForwardKernel's panel micro-kernel, one step per
  // pair of dimensions (the broadcast and the loads move the pairs' bits untouched).
  static bool raw_scores(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                         float* tile_max, PrefetchStream&) {
    const std::int64_t Dh = head_pairs(job.dims.head_dim);
    const float* q = job.q.q_packed + r0 * Dh;
    const float* panels = job.keys.k_panels + (j0 + t.c0 - job.keys.begin) * Dh;
    Base::scores_tile(q, Dh, Dh, panels, (t.cols - t.c0) / NR, job.state.scores + t.c0, job.dims.block_keys,
                      job.score.raw_factor, tile_max, PairStep{});
    return true;
  }

  // ForwardKernel::run_blocks with the product above. Flattened, so that this object
  // holds no out-of-line copy of an xsimd function that the linker could share with the
  // avx512 objects (tests/check_isa_symbols.cmake).
  __attribute__((flatten)) static void forward_query_block(const QueryBlockJob& job) {
    assert(job.keys.k_panels != nullptr && job.score.kind == ScoreKind::dot);
    assert(!job.score.key_bias && !job.score.row_bias);
    Base::template run_blocks<PairForwardKernel>(job);
  }
};

// The packers of the layouts above, and the scratch they need. Sources are bf16, or fp32
// / fp16 rounded to bf16 (allow_bf16_compute).
template <int NR>
struct PairPackers {
  static std::int64_t key_panel_floats(std::int64_t keys, std::int64_t head_dim) {
    return (keys > 0 ? (keys + NR - 1) / NR * NR : NR) * head_pairs(head_dim);
  }
  static std::int64_t query_floats(std::int64_t rows, std::int64_t head_dim) { return rows * head_pairs(head_dim); }
  static std::int64_t value_floats(std::int64_t keys, std::int64_t value_dim_padded) {
    return keys * value_dim_padded;
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
    auto* out = static_cast<std::uint16_t*>(rows);  // bf16 rows (fp32 / fp16 rounded)
    for (std::int64_t j = 0; j < keys; ++j)
      pack_bf16_row(v, j * v.row_stride, value_dim, value_dim_padded, out + j * value_dim_padded);
  }

  // Q in bf16, rows of 2 head_pairs elements, which are head_pairs little-endian pairs
  // (pack.hpp).
  static void pack_query_rows(const QueryPack& pack) { pack_bf16_query_rows(pack, 2 * head_pairs(pack.head_dim)); }
};
