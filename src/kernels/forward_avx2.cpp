// avx2 kernels: explicit instantiation of kernels/forward.hpp only. This file alone is
// compiled with the avx2 flags (see src/CMakeLists.txt).
#define FLASHCPU_ISA_NAMESPACE avx2
#include "kernels/forward.hpp"

namespace flashcpu::detail {
namespace {
// Register budget (16 vector registers): S tile 4 rows x 16 keys = 8 accumulators + 2 key loads + 1 broadcast;
//   P.V tile 4 rows x 2 vectors = 8 accumulators + 2 value loads + 1 broadcast.
using Kernel = avx2::ForwardKernel<xsimd::fma3<xsimd::avx2>, 4, 2, 2>;
}  // namespace

const KernelTable& kernel_table_avx2() {
  static const KernelTable table{Isa::avx2, "avx2", Kernel::W, 4, Kernel::NR, &Kernel::forward_query_block,
                                 4, &Kernel::forward_query_block, &Kernel::forward_lanes_block};  // already 4 rows
  return table;
}

}  // namespace flashcpu::detail
