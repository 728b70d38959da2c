// ISA detection and dispatch: detect once, take the highest level of kernels/variants.inc
// the CPU runs, honour the FLASHCPU_ISA cap, cache the choice; then each call picks the
// variant of that level for its data type.
#pragma once

#include "kernels/kernel_api.hpp"

namespace flashcpu::detail {

/// The active ISA level. Throws Error if FLASHCPU_ISA names no known level.
Isa active_level();

/// The variant of `isa` (which the CPU must support) whose K and V are of type `kv`, or
/// that of the highest level below it that has one.
const KernelTable& kernels_for(Isa isa, DType kv);

/// The variant for `kv` of the levels below `isa`: where a call the tile variant does not
/// take goes (kernels/kernel_api.hpp, KernelTable::tiles).
const KernelTable& kernels_below(Isa isa, DType kv);

/// The active level's variant for `kv`.
inline const KernelTable& active_kernels(DType kv = DType::f32) { return kernels_for(active_level(), kv); }

const char* isa_name(Isa isa);
bool parse_isa(const char* name, Isa* isa);
/// "sse2, avx2, avx512": the level names, for messages.
const char* isa_names();

}  // namespace flashcpu::detail
