// The tuning table: tile sizes and the least work per thread, built-in defaults per ISA,
// overridden by a tuning file (FLASHCPU_TUNING_FILE or load_tuning) or, for the tiles,
// by set_tile_config.
#pragma once

#include <flashcpu/flashcpu.hpp>

#include "kernels/kernel_api.hpp"

namespace flashcpu::detail {

/// Tile sizes for head dimension `head_dim` on `kernels`' ISA.
TileConfig tiles_for(const KernelTable& kernels, std::int64_t head_dim);

/// The least FLOPs per thread of a call on `isa`'s kernels that leaves num_threads to the
/// library (thread_count, plan.hpp): the tuning file's entry, else kMinFlopsPerThread.
double min_flops_per_thread_for(Isa isa);

/// Both of the above, read under one lock, so that a call plans from one table even while
/// another thread replaces it.
struct Tuning {
  TileConfig tiles;
  double min_flops_per_thread;
};
Tuning tuning_for(const KernelTable& kernels, std::int64_t head_dim);

/// Below this much work a thread's share takes less time than starting and joining it,
/// on the machine this default was measured on. 2 threads, Zen 5 guest, median of 4000
/// calls against 1 thread: 16 heads, N = M = 16, D = 64 (1.0 MFLOP) 13.4 against 12.4 us;
/// 8 heads (0.5 MFLOP) 9.7 against 6.5 us; 2 heads with N = M = 64 (2.1 MFLOP) 13.0
/// against 15.2 us. libgomp's region costs 2.8 us there. On a Zen 4 guest, whose 512-bit
/// FMAs run as two halves, one thread is slower and the second pays off sooner (16 heads,
/// N = M = 16: 15.7 us on 2 threads against 22-27 on 1), so flashcpu-tune measures it.
constexpr double kMinFlopsPerThread = 1 << 20;

/// The largest min_flops_per_thread a tuning file may set (about a second of one core's
/// work); the least is one FLOP. flashcpu-tune writes its measurement clamped to this.
constexpr double kMaxMinFlopsPerThread = 1e12;

}  // namespace flashcpu::detail
