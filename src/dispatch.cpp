#include "dispatch.hpp"

#include <flashcpu/flashcpu.hpp>

#include <cpuid.h>

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

bool cpu_supports(Isa isa) {
  if (isa == Isa::sse2) return true;  // every x86-64 has it
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
  if (!osxsave || !avx || !fma) return false;
  const std::uint64_t xcr0 = read_xcr0();
  if ((xcr0 & 0x6) != 0x6) return false;  // XMM and YMM state
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  if (isa == Isa::avx2) return avx2;
  // avx512: F, DQ, CD, BW, VL, and the opmask/ZMM state enabled by the OS.
  const unsigned need = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);
  return avx2 && (b & need) == need && (xcr0 & 0xE6) == 0xE6;
}

struct Choice {
  const KernelTable* table = nullptr;
  std::string error;  // a bad FLASHCPU_ISA value, reported at every call
};

Choice choose() {
  Choice choice;
  Isa cap = Isa::avx512;
  if (const char* env = std::getenv("FLASHCPU_ISA"); env && *env) {
    if (!parse_isa(env, &cap)) {
      choice.error = std::string("flashcpu: FLASHCPU_ISA: expected one of avx512, avx2, sse2, got '") + env + "'";
      return choice;
    }
  }
  for (Isa isa : {Isa::avx512, Isa::avx2, Isa::sse2})  // newest first
    if (int(isa) <= int(cap) && cpu_supports(isa)) {
      choice.table = &kernels_for(isa);
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
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::sse2: return "sse2";
  }
  return "unknown";
}

bool parse_isa(const char* name, Isa* isa) {
  for (Isa candidate : {Isa::avx512, Isa::avx2, Isa::sse2})
    if (std::strcmp(name, isa_name(candidate)) == 0) {
      *isa = candidate;
      return true;
    }
  return false;
}

const KernelTable& kernels_for(Isa isa) {
  switch (isa) {
    case Isa::avx512: return kernel_table_avx512();
    case Isa::avx2: return kernel_table_avx2();
    case Isa::sse2: break;
  }
  return kernel_table_sse2();
}

const KernelTable& active_kernels() {
  const Choice& choice = cached_choice();
  if (!choice.table) throw Error(choice.error);
  return *choice.table;
}

}  // namespace flashcpu::detail

namespace flashcpu {

std::string active_isa() { return detail::active_kernels().name; }

bool isa_supported(const std::string& isa) {
  detail::Isa parsed;
  return detail::parse_isa(isa.c_str(), &parsed) && detail::cpu_supports(parsed);
}

}  // namespace flashcpu
