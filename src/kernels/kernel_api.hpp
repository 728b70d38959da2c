// The interface between the baseline-compiled driver (attention.cpp) and the per-ISA
// kernels. Plain structs and function pointers only: no SIMD types, no std containers,
// so nothing here can be instantiated with one ISA's flags and reused by another.
#pragma once

#include <cstdint>

namespace flashcpu::detail {

enum class Isa { sse2 = 0, avx2 = 1, avx512 = 2 };

/// How the raw score of a (row, key) pair is computed by the micro-kernel.
enum class ScoreKind {
  dot,               // q_packed . k  (dot product, and the Gaussian expanded into one, see key_bias)
  squared_distance,  // distance_factor * sum_d (q_packed[d] - k[d])^2  (Gaussian, exact differences)
  additive,          // sum_d additive_weights[d] * tanh(q_packed[d] + k[d])
};

/// A nonlinear map of the natural-log score, applied right after the raw score (and its
/// biases): soft-capping, or the log of a Nadaraya-Watson kernel of the distance when the
/// raw score is s = -u^2.
enum class Transform { none, softcap, nw_laplacian, nw_boxcar, nw_epanechnikov };

/// One block of query rows of one KV head against a range of its keys. The driver
/// packs Q, K and V; the kernel runs the fused online softmax.
///
/// Rows may stack several query heads that share the KV head (decoding): packed row r
/// is query index first_row + r / heads_per_row of head r % heads_per_row of the group.
struct QueryBlockJob {
  // Q rows, pre-scaled (see QueryBlockJob::natural_units): row stride head_dim, zero rows
  // up to a multiple of the micro-kernel's rows.
  const float* q_packed;
  std::int64_t rows;           // valid packed rows
  std::int64_t first_row;      // query index of packed row 0
  std::int64_t heads_per_row;  // query heads stacked per query index (1 for prefill)
  // Keys [key_begin, key_end) are offered; the visibility rules below may hide some.
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

  // The score. Scores are kept in log2 units (softmax by exp2). With natural_units false
  // the driver has folded log2(e) into every term below; with it true the terms are in
  // natural units, the transform, ALiBi and mask apply, and then the kernel multiplies
  // by log2(e).
  ScoreKind kind;
  bool natural_units;
  const float* additive_weights;  // kind == additive: head_dim weights, times the scale
  float distance_factor;          // kind == squared_distance: -scale
  const float* key_bias;          // null, or per key from key_begin: added to the score
  const float* row_bias;          // null, or per packed row: added to the score
  Transform transform;
  float softcap;
  const float* alibi_slopes;  // null, or the slope of each head of the group: s -= slope * |d - j|
  // Masks at (batch, first head of the group, query 0, key 0), with broadcast strides.
  const float* mask;
  const std::uint8_t* bool_mask;
  std::int64_t mask_head_stride, mask_row_stride, mask_col_stride;
  std::int64_t bool_head_stride, bool_row_stride, bool_col_stride;
  // Visibility of key j to query i: lo_i <= j <= hi_i and j < key_limit, where
  // lo_i = i + lo_offset when has_lo (else 0) and hi_i = i + hi_offset when has_hi.
  bool has_lo, has_hi;
  std::int64_t lo_offset, hi_offset;
  std::int64_t key_limit;

  float empty_value;  // what a row with no visible key gets: 0 (attention), NaN (kernel regression)
  bool resume;    // continue from the running max/sum/acc already in the scratch
  bool finalize;  // write out = acc / sum (and lse); otherwise leave the partial state
  // Output: row r goes to out + (r / heads_per_row) * out_row_stride + (r % heads_per_row) * out_head_stride.
  float* out;
  std::int64_t out_row_stride, out_col_stride, out_head_stride;
  float* lse;  // null, or like out with lse_row_stride and lse_head_stride
  std::int64_t lse_row_stride, lse_head_stride;
  // Scratch, 64-byte aligned: scores [mr x block_keys]; the running state
  // acc [rows_padded x value_dim_padded] (unnormalized), row_max (log2 units) and
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
  // The same kernel with fewer rows per tile (same panels), for decoding blocks whose
  // rows (query heads of a group x queries) would leave most of a tile_rows tile empty.
  int small_tile_rows;
  void (*forward_small_block)(const QueryBlockJob& job);
  // Decoding with at least vector_floats rows, dot product, K in place, no mask, bias or
  // transform: the rows as vector lanes (see ForwardKernel::forward_lanes_block).
  void (*forward_lanes_block)(const QueryBlockJob& job);
};

const KernelTable& kernel_table_avx512();
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_sse2();

}  // namespace flashcpu::detail
