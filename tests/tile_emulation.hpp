// The AMX variant's kernel table on emulated tiles (tile_emulation.cpp).
#pragma once

#include "kernels/kernel_api.hpp"

namespace flashcpu::detail {

const KernelTable& emulated_tile_kernels();

}  // namespace flashcpu::detail
