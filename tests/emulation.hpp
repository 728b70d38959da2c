// The bf16-product variants' kernel tables on emulated instructions (emulation.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/kernel_api.hpp"

namespace flashcpu::detail {

/// The AMX variant's kernel on emulated tiles, with SSE2 vectors.
const KernelTable& emulated_tile_kernels();

/// The avx512bf16 variant's kernel with vdpbf16ps emulated on SSE2 vectors (4 rows x 16 keys),
/// and its backward (its five products by pairs).
const KernelTable& emulated_pair_kernels();

/// The same with P.V by vdpbf16ps too: bf16 weights, V packed by pairs of keys.
const KernelTable& emulated_pair_value_kernels();

/// acc[i] = VDPBF16PS(acc[i], a[i], b[i]) for i < lanes (a multiple of 4), each 32-bit
/// word of a and b a pair of bf16 values: the kernels' emulated instruction.
void emulated_vdpbf16ps(float* acc, const std::uint32_t* a, const std::uint32_t* b, std::size_t lanes);

/// c = TDPBF16PS(c, a, b) on whole tiles, as the tile kernel's EmulatedTiles computes it:
/// c 16 x 16 fp32, a 16 rows of 32 bf16, b 16 rows of 16 pairs of bf16, each row 64 bytes.
void emulated_tdpbf16ps(float* c, const std::uint16_t* a, const std::uint16_t* b);

}  // namespace flashcpu::detail
