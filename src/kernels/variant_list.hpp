// kernels/variants.inc as plain constant tables, for the tests, the tuner and the
// benchmarks (which include it through the source tree): the levels lowest first, and
// each variant's ISA, kv type and tile.
#pragma once

namespace flashcpu::variant_list {

inline constexpr const char* kLevels[] = {
#define FLASHCPU_ISA_LEVEL(name, flags, cpu_test, widest_register, xsimd_arch, by_default) #name,
#include "kernels/variants.inc"
#undef FLASHCPU_ISA_LEVEL
};
inline constexpr int kLevelCount = int(sizeof(kLevels) / sizeof(kLevels[0]));
// Whether dispatch picks each level without FLASHCPU_ISA naming it.
inline constexpr bool kLevelByDefault[] = {
#define FLASHCPU_ISA_LEVEL(name, flags, cpu_test, widest_register, xsimd_arch, by_default) by_default,
#include "kernels/variants.inc"
#undef FLASHCPU_ISA_LEVEL
};

struct Variant {
  const char* isa;
  const char* kv;  // f32, bf16, f16
  int mr, nr;      // query rows of the micro-kernel, keys per K panel
};
inline constexpr Variant kVariants[] = {
#define FLASHCPU_VARIANT(isa, kv, mr, nr, nv, pr, small_mr, small_nv) {#isa, #kv, mr, nr},
#include "kernels/variants.inc"
#undef FLASHCPU_VARIANT
};

}  // namespace flashcpu::variant_list
