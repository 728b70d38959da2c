// avx512 kernels: explicit instantiation of kernels/forward.hpp only. This file alone is
// compiled with the avx512 flags (see src/CMakeLists.txt).
#define FLASHCPU_ISA_NAMESPACE avx512
#include "kernels/forward.hpp"

namespace flashcpu::detail {
namespace {
// Register budget (32 vector registers): S tile 8 rows x 32 keys = 16 accumulators + 2 key loads + 1 broadcast;
//   P.V tile 8 rows x 2 vectors = 16 accumulators + 2 value loads + 1 broadcast.
using Kernel = avx512::ForwardKernel<xsimd::avx512bw, 8, 2, 2>;
}  // namespace

const KernelTable& kernel_table_avx512() {
  static const KernelTable table{Isa::avx512, "avx512", Kernel::W, 8, Kernel::NR, &Kernel::forward_query_block};
  return table;
}

}  // namespace flashcpu::detail
