// avx512 kernels: explicit instantiation of kernels/forward.hpp only. This file alone is
// compiled with the avx512 flags (see src/CMakeLists.txt).
#define FLASHCPU_ISA_NAMESPACE avx512
#include "kernels/forward.hpp"

namespace flashcpu::detail {
namespace {
// Register budget (32 vector registers): S tile 12 rows x 32 keys = 24 accumulators + 2 key loads + 1 broadcast;
//   P.V tiles of 6 rows x 4 vectors = 24 accumulators + 4 value loads + 1 broadcast, two per
//   row tile (a 64-float V row is used whole, each probability broadcast once).
// Measured on P64 and P128 (2 threads, median of 5): the 12-row S tile gained 3% over 8 rows
// (14 rows pads the 64-row blocks more and measured no better in isolation); the 6 x 4
// P.V tiles gained another 5-10% over 12 rows x 2 vectors.
constexpr int kRows = 12;
using Kernel = avx512::ForwardKernel<xsimd::avx512bw, kRows, 2, 4, 6>;
// Decoding with GQA groups of up to 4 heads: 4 rows x 32 keys (8 accumulators) for S and
// 4 rows x 4 vectors (16 accumulators + 4 loads + 1 broadcast) for P.V.
using SmallKernel = avx512::ForwardKernel<xsimd::avx512bw, 4, 2, 4>;
}  // namespace

const KernelTable& kernel_table_avx512() {
  static const KernelTable table{Isa::avx512, "avx512", Kernel::W, kRows, Kernel::NR, &Kernel::forward_query_block,
                                 4,  &SmallKernel::forward_query_block, &Kernel::forward_lanes_block};
  return table;
}

}  // namespace flashcpu::detail
