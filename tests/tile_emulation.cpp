// The AMX tile kernel (src/kernels/forward_tiles.hpp) on emulated tiles
// (EmulatedTiles, src/kernels/tiles.hpp), with SSE2 vectors for the softmax between the
// products: the same packing, tiling, tails and options as the AMX variant, run on any
// CPU, so that test_tiles.cpp checks them against the oracle where no AMX exists. Only
// the instructions themselves (and the 16-lane vector stages) differ from the variant
// the library dispatches to; on an AMX machine the forced-ISA runs test that one too.
//
// Compiled for the baseline like every test file; it never reaches the library's
// dispatch.
#define FLASHCPU_ISA_NAMESPACE tiles_emulated
#include "kernels/forward.hpp"

namespace flashcpu::detail::tiles_emulated {
#include "kernels/tiles.hpp"
#include "kernels/forward_tiles.hpp"
}  // namespace flashcpu::detail::tiles_emulated

#include "tile_emulation.hpp"

namespace flashcpu::detail {

const KernelTable& emulated_tile_kernels() {
  using namespace tiles_emulated;
  using Kernel = TileForwardKernel<xsimd::sse2, EmulatedTiles>;
  static const KernelTable table{Isa::amx,
                                 DType::bf16,
                                 "bf16_attn_fwd_16x32__amx (emulated tiles, sse2 vectors)",
                                 4,
                                 kTileRows,
                                 kTilePanelKeys,
                                 true,
                                 kTileValueColumns,
                                 &Kernel::forward_query_block,
                                 kTileRows,
                                 nullptr,
                                 nullptr,
                                 &TilePackers::pack_key_panels,
                                 &TilePackers::pack_value_rows,
                                 &TilePackers::pack_query_rows,
                                 &TilePackers::key_panel_floats,
                                 &TilePackers::query_floats,
                                 &TilePackers::value_floats,
                                 nullptr,
                                 nullptr,
                                 nullptr,
                                 nullptr,
                                 nullptr};
  return table;
}

}  // namespace flashcpu::detail
