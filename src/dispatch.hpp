// ISA detection and dispatch: detect once, walk the priority list, honour the
// FLASHCPU_ISA cap, cache the choice.
#pragma once

#include "kernels/kernel_api.hpp"

namespace flashcpu::detail {

/// The kernels of the active ISA. Throws Error if FLASHCPU_ISA names no known ISA.
const KernelTable& active_kernels();

/// The kernels of `isa` (which the CPU must support).
const KernelTable& kernels_for(Isa isa);

const char* isa_name(Isa isa);
bool parse_isa(const char* name, Isa* isa);

}  // namespace flashcpu::detail
