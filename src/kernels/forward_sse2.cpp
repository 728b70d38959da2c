// sse2 kernels: explicit instantiation of kernels/forward.hpp only. This file alone is
// compiled with the sse2 flags (see src/CMakeLists.txt).
#define FLASHCPU_ISA_NAMESPACE sse2
#include "kernels/forward.hpp"

namespace flashcpu::detail {
namespace {
// Register budget (16 vector registers): S tile 4 rows x 8 keys = 8 accumulators + 2 key loads + 1 broadcast
//   (no FMA: multiply and add); P.V tile 4 rows x 2 vectors, likewise.
using Kernel = sse2::ForwardKernel<xsimd::sse2, 4, 2, 2>;
}  // namespace

const KernelTable& kernel_table_sse2() {
  static const KernelTable table{Isa::sse2, "sse2", Kernel::W, 4, Kernel::NR, &Kernel::forward_query_block,
                                 4, &Kernel::forward_query_block, &Kernel::forward_lanes_block};  // already 4 rows
  return table;
}

}  // namespace flashcpu::detail
