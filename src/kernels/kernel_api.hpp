// The interface between the baseline-compiled driver (attention.cpp) and the per-ISA
// kernels. Plain structs and function pointers only: no SIMD types, no std containers,
// so nothing here can be instantiated with one ISA's flags and reused by another.
#pragma once

#include <cstdint>

namespace flashcpu::detail {

enum class Isa { sse2 = 0, avx2 = 1, avx512 = 2 };

/// One query block of one query head against all (visible) keys of its KV head.
/// The driver packs Q, K and V; the kernel runs the fused online softmax and writes
/// the finished rows of out.
struct QueryBlockJob {
  // Q block, pre-scaled by scale*log2(e): rows x head_dim, row stride head_dim,
  // rows padded with zeros up to a multiple of the micro-kernel's rows.
  const float* q_packed;
  std::int64_t rows;       // valid rows in this block
  std::int64_t first_row;  // index of the block's first query row (for causal)
  // K panels of the whole head: panel p holds keys [p*nr, p*nr+nr) as head_dim rows of
  // nr floats (keys contiguous), zero-padded past kv_len.
  const float* k_panels;
  // V of the whole head: kv_len rows of value_dim_padded floats, row stride v_row_stride,
  // columns past value_dim zero (packed, or the caller's buffer when already so).
  const float* v_rows;
  std::int64_t v_row_stride;
  std::int64_t q_len, kv_len, head_dim, value_dim, value_dim_padded;
  std::int64_t block_keys;  // keys per block, a multiple of nr
  bool causal;
  // Output rows (strided view of one head).
  float* out;
  std::int64_t out_row_stride, out_col_stride;
  // Scratch, 64-byte aligned: scores [mr x block_keys], acc [rows_padded x value_dim_padded],
  // row_max and row_sum [rows_padded].
  float* scores;
  float* acc;
  float* row_max;
  float* row_sum;
};

/// What one ISA offers: its micro-kernel geometry and its entry points.
struct KernelTable {
  Isa isa;
  const char* name;
  int vector_floats;  // floats per SIMD register
  int tile_rows;      // mr: query rows of the micro-kernels
  int panel_keys;     // nr: keys per packed K panel
  void (*forward_query_block)(const QueryBlockJob& job);
};

const KernelTable& kernel_table_avx512();
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_sse2();

}  // namespace flashcpu::detail
