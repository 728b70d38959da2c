// The tile-size table: built-in defaults per ISA, overridden by a tuning file
// (FLASHCPU_TUNING_FILE or load_tuning) or by set_tile_config.
#pragma once

#include <flashcpu/flashcpu.hpp>

#include "kernels/kernel_api.hpp"

namespace flashcpu::detail {

/// Tile sizes for head dimension `head_dim` on `kernels`' ISA.
TileConfig tiles_for(const KernelTable& kernels, std::int64_t head_dim);

}  // namespace flashcpu::detail
