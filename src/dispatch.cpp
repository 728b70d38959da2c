#include "dispatch.hpp"

#include <flashcpu/flashcpu.hpp>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace flashcpu::detail {
namespace {

// XCR0: which register states the OS saves. CPUID alone says what the CPU has, not
// whether the OS enabled it.
std::uint64_t read_xcr0() {
  std::uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (std::uint64_t(edx) << 32) | eax;
}

// What the levels' cpu tests in kernels/variants.inc read.
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512_fcdbwdqvl = false;  // AVX-512 F, CD, BW, DQ and VL
  bool avx512_bf16 = false;
  bool amx_tile = false, amx_bf16 = false;
  bool ymm_state = false, zmm_state = false, tile_state = false;  // enabled by the OS (XCR0)
  // Linux gives a process the tile data state only when asked (arch_prctl
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); the first tile instruction of a process
  // that has not asked is killed. Asked once, here, when the CPU and the OS have AMX.
  bool tile_permitted = false;
};

bool request_tile_permission() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

CpuFeatures read_cpu() {
  CpuFeatures cpu;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return cpu;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  cpu.fma = c & (1u << 12);
  cpu.f16c = c & (1u << 29);
  if (osxsave && avx) {
    const std::uint64_t xcr0 = read_xcr0();
    cpu.ymm_state = (xcr0 & 0x6) == 0x6;           // XMM and YMM state
    cpu.zmm_state = cpu.ymm_state && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM0-15 upper halves, ZMM16-31
    cpu.tile_state = (xcr0 & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
  }
  if (__get_cpuid_max(0, nullptr) < 7) return cpu;
  __cpuid_count(7, 0, a, b, c, d);
  cpu.avx2 = b & (1u << 5);
  const unsigned avx512 = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);
  cpu.avx512_fcdbwdqvl = (b & avx512) == avx512;
  cpu.amx_bf16 = d & (1u << 22);
  cpu.amx_tile = d & (1u << 24);
  if (a >= 1) {  // leaf 7 sub-leaf 1
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    cpu.avx512_bf16 = a1 & (1u << 5);
  }
  if (cpu.amx_tile && cpu.amx_bf16 && cpu.tile_state) cpu.tile_permitted = request_tile_permission();
  return cpu;
}

bool cpu_supports(Isa isa) {
  static const CpuFeatures cpu = read_cpu();
  switch (isa) {
#define FLASHCPU_ISA_LEVEL(name, flags, cpu_test, widest_register, xsimd_arch, by_default) \
  case Isa::name:                                                             \
    return cpu_test;
#include "kernels/variants.inc"
#undef FLASHCPU_ISA_LEVEL
  }
  return false;
}

struct Level {
  Isa isa;
  const char* name;
  bool by_default;  // picked without FLASHCPU_ISA naming it (kernels/variants.inc)
};
constexpr Level kLevels[] = {
#define FLASHCPU_ISA_LEVEL(name, flags, cpu_test, widest_register, xsimd_arch, by_default) {Isa::name, #name, by_default},
#include "kernels/variants.inc"
#undef FLASHCPU_ISA_LEVEL
};
constexpr int kLevelCount = int(sizeof(kLevels) / sizeof(kLevels[0]));

struct Variant {
  Isa isa;
  DType kv;
  const KernelTable& (*table)();
};
constexpr DType dtype_named_f32 = DType::f32, dtype_named_bf16 = DType::bf16, dtype_named_f16 = DType::f16;
constexpr Variant kVariants[] = {
#define FLASHCPU_VARIANT(isa, kv, mr, nr, nv, pr, small_mr, small_nv) {Isa::isa, dtype_named_##kv, &kernel_table_##kv##_##isa},
#include "kernels/variants.inc"
#undef FLASHCPU_VARIANT
};

struct Choice {
  bool valid = false;
  Isa level{};
  std::string error;  // a bad FLASHCPU_ISA value, reported at every call
};

Choice choose() {
  Choice choice;
  Isa cap = kLevels[kLevelCount - 1].isa;
  bool named = false;
  if (const char* env = std::getenv("FLASHCPU_ISA"); env && *env) {
    if (!parse_isa(env, &cap)) {
      choice.error = std::string("flashcpu: FLASHCPU_ISA: expected one of ") + isa_names() + ", got '" + env + "'";
      return choice;
    }
    named = true;
  }
  for (int l = kLevelCount - 1; l >= 0; --l)  // newest first
    if (int(kLevels[l].isa) <= int(cap) && (named || kLevels[l].by_default) && cpu_supports(kLevels[l].isa)) {
      choice.level = kLevels[l].isa;
      choice.valid = true;
      break;
    }
  return choice;
}

const Choice& cached_choice() {
  static const Choice choice = choose();
  return choice;
}

}  // namespace

const char* isa_name(Isa isa) {
  for (const Level& level : kLevels)
    if (level.isa == isa) return level.name;
  return "unknown";
}

bool parse_isa(const char* name, Isa* isa) {
  for (const Level& level : kLevels)
    if (std::strcmp(name, level.name) == 0) {
      *isa = level.isa;
      return true;
    }
  return false;
}

const char* isa_names() {
  static const std::string names = [] {
    std::string joined;
    for (const Level& level : kLevels) joined += (joined.empty() ? "" : ", ") + std::string(level.name);
    return joined;
  }();
  return names.c_str();
}

const KernelTable& kernels_for(Isa isa, DType kv) {
  // A level without a variant for kv (the AMX level is bf16 only) runs the one of the
  // highest level below it that has one.
  for (int level = int(isa); level >= 0; --level)
    for (const Variant& variant : kVariants)
      if (int(variant.isa) == level && variant.kv == kv) return variant.table();
  throw Error(std::string("flashcpu: no kernel variant for ISA ") + isa_name(isa));  // a gap in variants.inc
}

const KernelTable& kernels_below(Isa isa, DType kv) {
  if (int(isa) == 0) throw Error(std::string("flashcpu: no level below ISA ") + isa_name(isa));
  return kernels_for(Isa(int(isa) - 1), kv);
}

Isa active_level() {
  const Choice& choice = cached_choice();
  if (!choice.valid) throw Error(choice.error);
  return choice.level;
}

}  // namespace flashcpu::detail

namespace flashcpu {

std::string active_isa() { return detail::isa_name(detail::active_level()); }

bool isa_supported(const std::string& isa) {
  detail::Isa parsed;
  return detail::parse_isa(isa.c_str(), &parsed) && detail::cpu_supports(parsed);
}

}  // namespace flashcpu
