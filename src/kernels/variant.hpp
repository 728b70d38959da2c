// One kernel variant (a line of kernels/variants.inc): kernels/forward.hpp, the packers
// and (fp32 variants and the vdpbf16ps one) kernels/backward.hpp instantiated for its
// ISA, kv type and tiles,
// behind its KernelTable. Included once, by the variant's generated translation unit,
// which defines FLASHCPU_VARIANT_*.
#include "kernels/forward.hpp"

namespace flashcpu::detail {
namespace FLASHCPU_ISA_NAMESPACE {

#include "kernels/pack.hpp"
#include "kernels/pair_values.hpp"
#include "kernels/tiles.hpp"
#include "kernels/forward_tiles.hpp"
#include "kernels/forward_pairs.hpp"

}  // namespace FLASHCPU_ISA_NAMESPACE
}  // namespace flashcpu::detail

#include "kernels/backward.hpp"  // after the packers, which it calls

namespace flashcpu::detail {
namespace FLASHCPU_ISA_NAMESPACE {

// The xsimd architecture of each ISA level.
#define FLASHCPU_ISA_LEVEL(name, flags, cpu_test, widest_register, xsimd_arch, by_default) using arch_##name = xsimd_arch;
#include "kernels/variants.inc"
#undef FLASHCPU_ISA_LEVEL

#define FLASHCPU_PASTE2(a, b) a##b
#define FLASHCPU_PASTE(a, b) FLASHCPU_PASTE2(a, b)
#define FLASHCPU_STRING2(x) #x
#define FLASHCPU_STRING(x) FLASHCPU_STRING2(x)

namespace {
using Arch = FLASHCPU_PASTE(arch_, FLASHCPU_VARIANT_ISA);
using KV = FLASHCPU_VARIANT_KV;
constexpr int kW = int(xsimd::batch<float, Arch>::size);
static_assert(FLASHCPU_VARIANT_NR % kW == 0, "nr is a whole number of vectors");
constexpr int kPanelVectors = FLASHCPU_VARIANT_NR / kW;
// A level whose flags enable the tile instructions (AMX) gets the tile kernel and its
// packers; one whose flags enable AVX512-BF16 without them gets the vdpbf16ps kernel.
// Either variant is bf16 only (variants.inc) and has no lanes kernel; the tiles have no
// small kernel either (the driver hands the decoding they do not take to the level
// below). Neither instantiates a vector kernel of its own outside a flattened entry: an
// out-of-line copy of an xsimd function in this object would share its name with the
// avx512 objects' copy (tests/check_isa_symbols.cmake).
using ForwardEntry = void (*)(const QueryBlockJob&);
// The small kernel's P.V tiles: small_nv vectors over as many of its rows as the
// registers hold (accumulators, the value vectors and one broadcast): all small_mr rows
// of a 4 x 4 AVX-512 tile, 2 rows of a 4 x 8 one.
constexpr int kVectorRegisters = kW >= 16 ? 32 : 16;
constexpr int small_pv_rows() {
  int rows = FLASHCPU_VARIANT_SMALL_MR;
  while (rows % 2 == 0 && rows * FLASHCPU_VARIANT_SMALL_NV + FLASHCPU_VARIANT_SMALL_NV + 1 > kVectorRegisters) rows /= 2;
  return rows;
}
static_assert(small_pv_rows() * FLASHCPU_VARIANT_SMALL_NV + FLASHCPU_VARIANT_SMALL_NV + 1 <= kVectorRegisters,
              "the small kernel's P.V tile fits the registers");
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr bool kBf16Products = true, kTiles = true, kPairValues = true;
static_assert(std::is_same<KV, bf16>::value && FLASHCPU_VARIANT_MR == kTileRows &&
                  FLASHCPU_VARIANT_NR == kTilePanelKeys,
              "the tile variant is bf16, 16 rows x 32 keys");
using Kernel = TileForwardKernel<Arch, HardwareTiles>;
using Pack = TilePackers;
constexpr ForwardEntry kSmallEntry = nullptr, kLanesEntry = nullptr;
#elif defined(__AVX512BF16__)
// P.V: V widened (kPairValues false) or by vdpbf16ps from bf16 weights and pair values
// (true). On Zen 5 (2 threads, tools/ab_builds, the two settings dlopen'd in one process,
// paired median of 8 rounds) pair values were 1.30x faster on bf16 P64, 1.35x on P128
// and 1.34x on causal C128 (H = 8, N = M = 4096), 1.29x by the minima on N = M = 256.
constexpr bool kBf16Products = true, kTiles = false, kPairValues = true;
static_assert(std::is_same<KV, bf16>::value, "the vdpbf16ps variant is bf16");
using Kernel = PairForwardKernel<Arch, FLASHCPU_VARIANT_MR, kPanelVectors, FLASHCPU_VARIANT_NV, FLASHCPU_VARIANT_PR,
                                 HardwarePairDot, kPairValues>;
using Pack = PairPackers<FLASHCPU_VARIANT_NR, kPairValues>;
// Decoding (bf16_products_take in src/plan.cpp: V read as stored): S by vdpbf16ps from K
// rows read in place (or from the same pair panels), P.V from V rows widened as they
// load, on the avx512 bf16 variant's small tiles.
using SmallKernel = PairForwardKernel<Arch, FLASHCPU_VARIANT_SMALL_MR, kPanelVectors, FLASHCPU_VARIANT_SMALL_NV,
                                      small_pv_rows(), HardwarePairDot, false>;
constexpr ForwardEntry kSmallEntry = &SmallKernel::forward_query_block, kLanesEntry = nullptr;
#else
constexpr bool kBf16Products = false, kTiles = false, kPairValues = false;
using Kernel = ForwardKernel<Arch, FLASHCPU_VARIANT_MR, kPanelVectors, FLASHCPU_VARIANT_NV, FLASHCPU_VARIANT_PR, KV>;
using SmallKernel =
    ForwardKernel<Arch, FLASHCPU_VARIANT_SMALL_MR, kPanelVectors, FLASHCPU_VARIANT_SMALL_NV, small_pv_rows(), KV>;
using Pack = Packers<KV, FLASHCPU_VARIANT_NR>;
// The lanes kernel serves fp32 K only. For 16-bit K the tiles were faster at every row
// count measured on AVX2 (Zen 4 VM, 2 threads, the two builds called in turn in one
// process, paired median of 10 rounds, D = 128): the lanes kernel, widening each key
// block once, took 1.12x the tiles' time for bf16 with 16 stacked rows (DEC4_bf16), 1.16x
// for fp32 q over fp16 K/V and 1.13x over bf16, and 1.23-1.28x for bf16 with 8 rows; for
// fp32 K the tiles took 1.03-1.09x the lanes' time.
template <class K = Kernel>  // dependent, so a 16-bit variant never instantiates it
constexpr ForwardEntry lanes_entry() {
  if constexpr (std::is_same<KV, float>::value)
    return &K::forward_lanes_block;
  else
    return nullptr;
}
constexpr ForwardEntry kSmallEntry = &SmallKernel::forward_query_block, kLanesEntry = lanes_entry();
#endif
// The backward exists for fp32 variants, which every data type's call can take (16-bit
// data widened), and for the vdpbf16ps variant, whose five products take bf16 pairs for
// bf16 data and the dot product (kernels/backward.hpp). The other 16-bit variants' tables hold
// nulls, and the template keeps them from instantiating the backward at all.
constexpr bool kPairBackward = kBf16Products && !kTiles;
constexpr bool kHasBackward = std::is_same<KV, float>::value || kPairBackward;
using BackwardEntry = void (*)(const BackwardJob&);
enum class BackwardPart { keys, queries, pack_queries, key_chunk, write_queries, row_stats };
// The vdpbf16ps variant's entries, flattened like its forward (see forward_query_block in
// kernels/forward_pairs.hpp): no out-of-line copy of a function the avx512 objects also
// define.
template <class Backward>
struct FlatBackward {
  __attribute__((flatten)) static void backward_keys(const BackwardJob& job) { Backward::backward_keys(job); }
  __attribute__((flatten)) static void backward_queries(const BackwardJob& job) { Backward::backward_queries(job); }
  __attribute__((flatten)) static void backward_pack_queries(const BackwardJob& job) {
    Backward::backward_pack_queries(job);
  }
  __attribute__((flatten)) static void backward_key_chunk(const BackwardJob& job) { Backward::backward_key_chunk(job); }
  __attribute__((flatten)) static void backward_write_queries(const BackwardJob& job) {
    Backward::backward_write_queries(job);
  }
  __attribute__((flatten)) static void backward_row_stats(const BackwardJob& job) { Backward::backward_row_stats(job); }
};
template <class Backward>
constexpr BackwardEntry entry_of(BackwardPart part) {
  return part == BackwardPart::keys            ? &Backward::backward_keys
         : part == BackwardPart::queries       ? &Backward::backward_queries
         : part == BackwardPart::pack_queries  ? &Backward::backward_pack_queries
         : part == BackwardPart::key_chunk     ? &Backward::backward_key_chunk
         : part == BackwardPart::write_queries ? &Backward::backward_write_queries
                                               : &Backward::backward_row_stats;
}
template <class T>
constexpr BackwardEntry backward_entry(BackwardPart part) {
  if constexpr (std::is_same<T, float>::value) {
    return entry_of<
        BackwardKernel<Arch, FLASHCPU_VARIANT_MR, kPanelVectors, FLASHCPU_VARIANT_NV, FLASHCPU_VARIANT_PR>>(part);
  } else if constexpr (kPairBackward) {
#if defined(__AVX512BF16__) && !defined(__AMX_TILE__)
    return entry_of<FlatBackward<BackwardKernel<Arch, FLASHCPU_VARIANT_MR, kPanelVectors, FLASHCPU_VARIANT_NV,
                                                FLASHCPU_VARIANT_PR, HardwarePairDot>>>(part);
#endif
  }
  return nullptr;
}
}  // namespace

}  // namespace FLASHCPU_ISA_NAMESPACE

const KernelTable& FLASHCPU_PASTE(FLASHCPU_PASTE(FLASHCPU_PASTE(kernel_table_, FLASHCPU_VARIANT_KV), _),
                                  FLASHCPU_VARIANT_ISA)() {
  using namespace FLASHCPU_ISA_NAMESPACE;
  static const KernelTable table{
      Isa::FLASHCPU_VARIANT_ISA,
      dtype_of<KV>(),
      FLASHCPU_STRING(FLASHCPU_VARIANT_KV) "_attn_fwd_" FLASHCPU_STRING(FLASHCPU_VARIANT_MR) "x" FLASHCPU_STRING(
          FLASHCPU_VARIANT_NR) "__" FLASHCPU_STRING(FLASHCPU_VARIANT_ISA),
      kW,
      FLASHCPU_VARIANT_MR,
      Kernel::NR,
      kBf16Products,
      kTiles,
      kPairValues,
      kTiles ? kTileValueColumns : kW,
      &Kernel::forward_query_block,
      FLASHCPU_VARIANT_SMALL_MR,
      kSmallEntry,
      kLanesEntry,
      &Pack::pack_key_panels,
      &Pack::pack_value_rows,
      &Pack::pack_query_rows,
      &Pack::key_panel_floats,
      &Pack::query_floats,
      &Pack::value_floats,
      kHasBackward ? FLASHCPU_STRING(FLASHCPU_VARIANT_KV) "_attn_bwd_" FLASHCPU_STRING(FLASHCPU_VARIANT_MR) "x" FLASHCPU_STRING(FLASHCPU_VARIANT_NR) "__" FLASHCPU_STRING(FLASHCPU_VARIANT_ISA) : nullptr,
      backward_entry<KV>(BackwardPart::keys),
      backward_entry<KV>(BackwardPart::queries),
      backward_entry<KV>(BackwardPart::pack_queries),
      backward_entry<KV>(BackwardPart::key_chunk),
      backward_entry<KV>(BackwardPart::write_queries),
      backward_entry<KV>(BackwardPart::row_stats)};
  return table;
}

}  // namespace flashcpu::detail
