// avx512 kernels: explicit instantiation of kernels/forward.hpp only. This file alone is
// compiled with the avx512 flags (see src/CMakeLists.txt).
#define FLASHCPU_ISA_NAMESPACE avx512
#include "kernels/forward.hpp"

namespace flashcpu::detail {
namespace {
// Register budget (32 vector registers): S tile 6 rows x 64 keys = 24 accumulators + 4 key loads + 1 broadcast;
//   P.V tile 6 rows x 4 vectors = 24 accumulators + 4 value loads + 1 broadcast (a 64-float V
//   row is used whole, each probability broadcast once).
// Why 6 x 64 for S: on this machine the loads, not only the FMAs, set the pace. A synthetic
// loop of 24 independent FMAs per iteration ran at 99% of the FMA peak with 6 broadcast
// loads, 91% with 12, 90% with 6 broadcasts and 4 vector loads. 6 x 64 needs 10 loads per
// 24 FMAs where 12 x 32 needs 14. Interleaved A/B runs (2 threads, median of 3, twice):
// P64 58.8 / 59.0 ms against 60.2 / 59.7 (12 x 32), P128 114 / 112 against 116 / 115,
// short N=64 84 against 92 us, N=256 1.01 against 1.03-1.04 ms. Earlier: the 6 x 4 P.V tile
// gained 5-10% over 12 rows x 2 vectors.
constexpr int kRows = 6;
using Kernel = avx512::ForwardKernel<xsimd::avx512bw, kRows, 4, 4, 6>;
// Decoding with GQA groups of 4 heads: 4 rows x 64 keys (16 accumulators, the same panels)
// for S and 4 rows x 4 vectors (16 accumulators + 4 loads + 1 broadcast) for P.V.
using SmallKernel = avx512::ForwardKernel<xsimd::avx512bw, 4, 4, 4>;
static_assert(SmallKernel::NR == Kernel::NR, "both kernels read the same K panels");
}  // namespace

const KernelTable& kernel_table_avx512() {
  static const KernelTable table{Isa::avx512, "avx512", Kernel::W, kRows, Kernel::NR, &Kernel::forward_query_block,
                                 4,  &SmallKernel::forward_query_block, &Kernel::forward_lanes_block};
  return table;
}

}  // namespace flashcpu::detail
