// The kernels with bf16 products, on emulated instructions and SSE2 vectors, so that
// test_bf16_products.cpp checks their packing, tiling, tails and options against the
// oracle on any CPU:
//  - the AMX tile kernel (src/kernels/forward_tiles.hpp) on EmulatedTiles
//    (src/kernels/tiles.hpp);
//  - the vdpbf16ps kernel (src/kernels/forward_pairs.hpp) with EmulatedPairDot, in both
//    its forms of P.V (V widened, and pair values), and its backward
//    (src/kernels/backward.hpp, all five products by pairs), for test_backward.cpp.
// Only the instructions themselves (and the vector width of the stages between them)
// differ from the variants the library dispatches to; on a CPU that has them, the
// forced-ISA runs (flashcpu_tests_amx, flashcpu_tests_avx512bf16) test those too.
//
// Compiled for the baseline like every test file; it never reaches the library's
// dispatch.
#define FLASHCPU_ISA_NAMESPACE bf16_products_emulated
#include "kernels/forward.hpp"

namespace flashcpu::detail::bf16_products_emulated {
#include "kernels/pack.hpp"
#include "kernels/pair_values.hpp"
#include "kernels/tiles.hpp"
#include "kernels/forward_tiles.hpp"
#include "kernels/forward_pairs.hpp"
}  // namespace flashcpu::detail::bf16_products_emulated
#include "kernels/backward.hpp"

#include "emulation.hpp"

namespace flashcpu::detail {

namespace {

// A bf16-product variant's table (forward only, no small or lanes kernel) for a kernel and
// its packers on emulated instructions; pair_kernels adds the vdpbf16ps small kernel.
template <class Kernel, class Pack>
KernelTable emulated_table(Isa isa, const char* name, int rows, int keys, bool tiles, bool pair_values,
                           int value_columns) {
  return {isa,
          DType::bf16,
          name,
          int(Kernel::W),
          rows,
          keys,
          true,
          tiles,
          pair_values,
          value_columns,
          &Kernel::forward_query_block,
          rows,
          nullptr,
          nullptr,
          &Pack::pack_key_panels,
          &Pack::pack_value_rows,
          &Pack::pack_query_rows,
          &Pack::key_panel_floats,
          &Pack::query_floats,
          &Pack::value_floats,
          nullptr,
          nullptr,
          nullptr,
          nullptr,
          nullptr,
          nullptr,
          nullptr};
}

template <bool PairValues>
const KernelTable& pair_kernels(const char* name) {
  using namespace bf16_products_emulated;
  constexpr int kRows = 4, kKeys = 16, kW = 4;
  using Kernel = PairForwardKernel<xsimd::sse2, kRows, kKeys / kW, 2, kRows, EmulatedPairDot, PairValues>;
  using Backward = BackwardKernel<xsimd::sse2, kRows, kKeys / kW, 2, kRows, EmulatedPairDot>;
  // Decoding's small kernel, as in kernels/variant.hpp: V widened, P.V tiles of half the rows.
  using Small = PairForwardKernel<xsimd::sse2, kRows, kKeys / kW, 2, kRows / 2, EmulatedPairDot, false>;
  static const KernelTable table = [&] {
    KernelTable t = emulated_table<Kernel, PairPackers<kKeys, PairValues>>(Isa::avx512bf16, name, kRows, kKeys,
                                                                            false, PairValues, kW);
    t.forward_small_block = &Small::forward_query_block;
    t.backward_name = "bf16_attn_bwd_4x16__avx512bf16 (emulated vdpbf16ps, sse2 vectors)";
    t.backward_keys = &Backward::backward_keys;
    t.backward_queries = &Backward::backward_queries;
    t.backward_pack_queries = &Backward::backward_pack_queries;
    t.backward_key_chunk = &Backward::backward_key_chunk;
    t.backward_write_queries = &Backward::backward_write_queries;
    t.backward_row_stats = &Backward::backward_row_stats;
    return t;
  }();
  return table;
}

}  // namespace

const KernelTable& emulated_tile_kernels() {
  using namespace bf16_products_emulated;
  static const KernelTable table = emulated_table<TileForwardKernel<xsimd::sse2, EmulatedTiles>, TilePackers>(
      Isa::amx, "bf16_attn_fwd_16x32__amx (emulated tiles, sse2 vectors)", kTileRows, kTilePanelKeys, true, true,
      kTileValueColumns);
  return table;
}

const KernelTable& emulated_pair_kernels() {
  return pair_kernels<false>("bf16_attn_fwd_4x16__avx512bf16 (emulated vdpbf16ps, sse2 vectors)");
}

const KernelTable& emulated_pair_value_kernels() {
  return pair_kernels<true>("bf16_attn_fwd_4x16__avx512bf16 with pair values (emulated vdpbf16ps, sse2 vectors)");
}

void emulated_vdpbf16ps(float* acc, const std::uint32_t* a, const std::uint32_t* b, std::size_t lanes) {
  using batch = xsimd::batch<float, xsimd::sse2>;
  using ibatch = xsimd::batch<std::int32_t, xsimd::sse2>;
  for (std::size_t i = 0; i < lanes; i += batch::size) {
    const batch x = xsimd::bitwise_cast<batch>(ibatch::load_unaligned(reinterpret_cast<const std::int32_t*>(a + i)));
    const batch y = xsimd::bitwise_cast<batch>(ibatch::load_unaligned(reinterpret_cast<const std::int32_t*>(b + i)));
    bf16_products_emulated::EmulatedPairDot::step(batch::load_unaligned(acc + i), x, y).store_unaligned(acc + i);
  }
}

void emulated_tdpbf16ps(float* c, const std::uint16_t* a, const std::uint16_t* b) {
  using Tiles = bf16_products_emulated::EmulatedTiles;
  bf16_products_emulated::TileConfigBlock config;
  for (int t = 0; t < 3; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  Tiles::configure(config);
  Tiles::load<0>(c, 64);
  Tiles::load<1>(a, 64);
  Tiles::load<2>(b, 64);
  Tiles::dot_bf16<0, 1, 2>();
  Tiles::store<0>(c, 64);
  Tiles::release();
}

}  // namespace flashcpu::detail
