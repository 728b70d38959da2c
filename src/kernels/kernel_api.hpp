// The interface between the baseline-compiled driver (attention.cpp) and the per-ISA
// kernels. Plain structs and function pointers only: no SIMD types, no std containers,
// so nothing here can be instantiated with one ISA's flags and reused by another.
#pragma once

#include <cstdint>

namespace flashcpu::detail {

enum class Isa { sse2 = 0, avx2 = 1, avx512 = 2 };

/// One block of query rows of one KV head against a range of its keys. The driver
/// packs Q, K and V; the kernel runs the fused online softmax.
///
/// Rows may stack several query heads that share the KV head (decoding): packed row r
/// is query index first_row + r / heads_per_row of head r % heads_per_row of the group.
struct QueryBlockJob {
  // Q rows, pre-scaled by scale*log2(e): row stride head_dim, zero rows up to a
  // multiple of the micro-kernel's rows.
  const float* q_packed;
  std::int64_t rows;           // valid packed rows
  std::int64_t first_row;      // query index of packed row 0
  std::int64_t heads_per_row;  // query heads stacked per query index (1 for prefill)
  // Keys [key_begin, key_end) are visited (minus what causal hides).
  std::int64_t key_begin, key_end;
  // K panels starting at key_begin: panel p holds keys key_begin + [p*nr, p*nr+nr) as
  // head_dim rows of nr floats (keys contiguous), zero-padded past the last key.
  // Null when K is read in place instead (decoding, where no panel is reused): then
  // k_rows points at key key_begin, rows of head_dim contiguous floats, head_dim a
  // multiple of the vector width.
  const float* k_panels;
  const float* k_rows;
  std::int64_t k_row_stride;
  // V rows starting at key_begin: value_dim_padded floats each (columns past value_dim
  // zero), row stride v_row_stride; packed, or the caller's buffer when already so.
  const float* v_rows;
  std::int64_t v_row_stride;
  std::int64_t q_len, kv_len, head_dim, value_dim, value_dim_padded;
  std::int64_t block_keys;  // keys per block, a multiple of nr
  bool causal;
  bool resume;    // continue from the running max/sum/acc already in the scratch
  bool finalize;  // write out = acc / sum; otherwise leave the partial state in scratch
  // Output: row r goes to out + (r / heads_per_row) * out_row_stride + (r % heads_per_row) * out_head_stride.
  float* out;
  std::int64_t out_row_stride, out_col_stride, out_head_stride;
  // Scratch, 64-byte aligned: scores [mr x block_keys]; the running state
  // acc [rows_padded x value_dim_padded] (unnormalized), row_max (log2 domain) and
  // row_sum [rows_padded].
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
