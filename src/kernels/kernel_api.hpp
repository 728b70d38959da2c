// The interface between the baseline-compiled driver and the kernel variants (one
// translation unit each, listed in kernels/variants.inc). Plain structs and function
// pointers only: no SIMD types, no std containers, and no inline code (DqTurns' atomics
// are used only through functions of the driver), so nothing here can be instantiated
// with one ISA's flags and reused by another.
#pragma once

#include <atomic>
#include <cstdint>

namespace flashcpu::detail {

/// The instruction-set levels, lowest first (kernels/variants.inc).
enum class Isa {
#define FLASHCPU_ISA_LEVEL(name, flags, cpu_test, widest_register, xsimd_arch, by_default) name,
#include "kernels/variants.inc"
#undef FLASHCPU_ISA_LEVEL
};

/// Element types of tensors in memory. Arithmetic is fp32 throughout.
enum class DType { f32, bf16, f16 };

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

/// One block of query rows of one KV head against a range of its keys: the driver packs
/// Q, K and V through the variant's packers; the kernel runs the fused online softmax.
/// Its parts:

/// Sizes of the call and of the tiles.
struct JobDims {
  std::int64_t q_len, kv_len, head_dim, value_dim, value_dim_padded;
  std::int64_t block_keys;  // keys per block, a multiple of the variant's nr
};

/// The query rows. Rows may stack several query heads that share the KV head
/// (decoding): packed row r is query index first_row + r / heads_per_row of head
/// r % heads_per_row of the group.
struct JobRows {
  // fp32, pre-scaled (see JobScore::natural_units): row stride head_dim, zero rows up
  // to a multiple of the micro-kernel's rows.
  const float* q_packed;
  std::int64_t rows;           // valid packed rows
  std::int64_t first_row;      // query index of packed row 0
  std::int64_t heads_per_row;  // query heads stacked per query index (1 for prefill)
};

/// The keys [begin, end) offered; the visibility rules may hide some.
struct JobKeys {
  std::int64_t begin, end;
  // K panels (fp32) starting at `begin`: panel p holds keys begin + [p*nr, p*nr+nr) as
  // head_dim rows of nr floats (keys contiguous), zero-padded past the last key.
  // Null when K is read in place instead (decoding, where no panel is reused): then
  // k_rows points at key `begin`, rows of head_dim contiguous elements of the variant's
  // kv type, head_dim a multiple of the vector width.
  const float* k_panels;
  const void* k_rows;
  std::int64_t k_row_stride;
  // V rows of the variant's kv type starting at `begin`: value_dim_padded elements each
  // (columns past value_dim zero), row stride v_row_stride; packed, or the caller's
  // buffer when already so.
  const void* v_rows;
  std::int64_t v_row_stride;
  // Decoding with K and V read in place: the K and V rows of the first keys the thread
  // is likely to read after this job (the next item of its own share, StealingShares::peek:
  // another thread may take it), and how many there are; null and 0 when none. The job's
  // prefetch stream runs on into them once it has requested its own last key, so the next
  // item starts on rows already on their way instead of stalling while its stream ramps up.
  const void* next_k_rows;
  const void* next_v_rows;
  std::int64_t next_keys;
};

/// The score. Scores are kept in log2 units (softmax by exp2). With natural_units false
/// the driver has folded log2(e) into every term below; with it true the terms are in
/// natural units, the transform, ALiBi and mask apply, and then the kernel multiplies by
/// log2(e).
struct JobScore {
  ScoreKind kind;
  bool natural_units;
  const float* additive_weights;  // kind == additive: head_dim weights, times the scale
  float distance_factor;          // kind == squared_distance: -scale
  const float* key_bias;          // null, or per key from keys.begin: added to the score
  const float* row_bias;          // null, or per packed row: added to the score
  Transform transform;
  float softcap;
  const float* alibi_slopes;  // null, or the slope of each head of the group: s -= slope * |d - j|
  // The factor the packers fold into Q (q_factor); a tile kernel, whose packer keeps Q as
  // stored (it is rounded to bf16 once, never twice), multiplies the raw scores by it.
  float raw_factor;
};

/// Masks at (batch, first head of the group, query 0, key 0), with broadcast strides.
struct JobMasks {
  const float* mask;
  const std::uint8_t* bool_mask;
  std::int64_t mask_head_stride, mask_row_stride, mask_col_stride;
  std::int64_t bool_head_stride, bool_row_stride, bool_col_stride;
};

/// Visibility of key j to query i: lo_i <= j <= hi_i and j < key_limit, where
/// lo_i = i + lo_offset when has_lo (else 0) and hi_i = i + hi_offset when has_hi.
struct JobVisibility {
  bool has_lo, has_hi;
  std::int64_t lo_offset, hi_offset;
  std::int64_t key_limit;
};

/// Where finished rows go. Row r goes to out + (r / heads_per_row) * out_row_stride +
/// (r % heads_per_row) * out_head_stride, in elements of out_type.
struct JobOutput {
  float empty_value;  // what a row with no visible key gets: 0 (attention), NaN (kernel regression)
  void* out;
  DType out_type;
  std::int64_t out_row_stride, out_col_stride, out_head_stride;
  float* lse;  // null, or like out with lse_row_stride and lse_head_stride
  std::int64_t lse_row_stride, lse_head_stride;
  const float* sinks;  // null, or each head of the group's sink (natural units), joined in at finalize
};

/// The running state, in scratch (64-byte aligned): scores [mr x block_keys]; acc
/// [rows_padded x value_dim_padded] (unnormalized), row_max (log2 units) and row_sum
/// [rows_padded].
struct JobState {
  bool resume;    // continue from the running max/sum/acc already there
  bool finalize;  // write out = acc / sum (and lse); otherwise leave the partial state
  float* scores;
  float* acc;
  float* row_max;
  float* row_sum;
};

struct QueryBlockJob {
  JobDims dims;
  JobRows q;
  JobKeys keys;
  JobScore score;
  JobMasks masks;
  JobVisibility visible;
  JobOutput output;
  JobState state;
};

/// A strided source of rows for the packers: element (row, col) of `type` at
/// data + row * row_stride + col * col_stride (in elements).
struct SourceRows {
  const void* data;
  DType type;
  std::int64_t row_stride, col_stride;
};

/// Query rows to pack: packed row r is query first + r / heads_per_row of head
/// r % heads_per_row, whose row is at source.data + query * source.row_stride + head *
/// head_stride; times `factor`, minus `center` when it is not null (Gaussian, then
/// row_bias[r] = bias_scale * |q - center|^2). Rows from `rows` to `rows_padded` are zero.
struct QueryPack {
  SourceRows source;
  std::int64_t head_stride, heads_per_row, rows, rows_padded, head_dim;
  float factor;
  const float* center;
  float bias_scale;
  float* packed;
  float* row_bias;
};

/// The fused backward (kernels/backward.hpp), computed in fp32. One (batch, KV head) at a
/// time: views at row 0 of that head; q, out, dout, lse and dq at the group's first query
/// head, their head stride stepping through the group. Elements are of `type`: fp32, or
/// 16-bit (q, k, v, out, dout and the gradients of a 16-bit call), widened as they are
/// packed and rounded once as the gradients are written. lse is always fp32.
struct HeadRows {
  const void* data;
  DType type;
  std::int64_t head_stride, row_stride, col_stride;
};
struct HeadRowsOut {
  void* data;
  DType type;
  std::int64_t head_stride, row_stride, col_stride;
};

/// Working memory of the backward, 64-byte aligned parts (sizes in src/backward.cpp).
/// Query side: q rows and dout rows (head_dim_padded and value_dim_padded wide), lse in
/// log2 units and D_i = dout_i . out_i, of one query block or (the one pass) of every query
/// row of the group, the thread's or shared by the threads of a head. Key side: K and V
/// of one key block (two passes) or of a chunk of key blocks, block after block (the one
/// pass), as fp32 panels (the forward's layout) and K rows head_dim_padded wide. Then a
/// block pair's P and dS [block_rows x block_keys], a tile of soft-capping derivatives
/// [tile_rows x block_keys], and the accumulators of dK and dV (of the key side's keys)
/// and dQ (of the query side's rows). A variant with bf16 products (KernelTable::
/// bf16_products; the parts below are empty for the others) also keeps, on the query
/// side, q and dout as bf16 pairs of dimensions, (head_dim + 1) / 2 and (value_dim + 1) /
/// 2 words a row (q_pairs, dout_pairs: S and dP), as pairs of rows, head_dim_padded and
/// value_dim_padded words a pair (q_row_pairs, dout_row_pairs: dK and dV), and a flag per
/// row (row_flags: 1 when its q, 2 when its dout holds an inf or NaN); on the key side,
/// its K and V pair panels in the room of the fp32 ones and K by pairs of keys in the
/// room of k_rows (dQ; pack_bf16_value_pairs' layout, with its flags of non-finite
/// chunks); and a block pair's P and dS by pairs of rows, block_rows / 2 x block_keys
/// words each (weight_pairs).
struct BackwardScratch {
  // Per query row, P = 2^(s - row_shift) * row_scale (s in log2 units): the row's lse and
  // 1, or (coarse rows, see BackwardJob::coarse_shift) its max score and 1 / sum.
  float *q_rows, *dout_rows, *row_shift, *row_scale, *delta;
  float *k_panels, *v_panels, *k_rows;
  float *probs, *dscores, *derivs;
  float *dk_acc, *dv_acc, *dq_acc, *ones;
  float *q_pairs, *dout_pairs, *q_row_pairs, *dout_row_pairs, *row_flags;
  float *weight_pairs;
};

/// The order of dQ additions when the key chunks of one KV head run on several threads at
/// once (src/backward.cpp). backward_key_chunk visits the group's query blocks in order;
/// its t-th (head g, block b: t = g * q_blocks + b) is its "turn" t. Chunk c adds its
/// share to turn t's dQ rows only after chunk c - 1 has passed t, so every dQ row sums
/// its key blocks in key order, as one thread would, whatever the threads. A chunk passes
/// turns in order, each only after chunk c - 1 has (the turns before its first visited
/// one at that one), so no chunk's count runs ahead of its predecessor's.
struct DqTurns {
  const std::atomic<std::int64_t>* previous;  // turns chunk c - 1 has passed; null: none to wait for
  std::atomic<std::int64_t>* own;             // turns this chunk has passed; null: no one waits
};
/// Returns once turns.previous (if any) has passed turn t; and: this chunk has passed
/// turns [0, past). Defined in the baseline-compiled src/backward.cpp, so that no variant
/// instantiates the atomics' inline code with its own ISA's flags.
void await_turn(const DqTurns& turns, std::int64_t t);
void pass_turns(const DqTurns& turns, std::int64_t past);

// The most keys a backward block may have (the kernel judges its keys' tiles on the stack).
constexpr std::int64_t kMaxBackwardBlockKeys = 256;

struct BackwardJob {
  std::int64_t q_len, kv_len, head_dim, value_dim, head_dim_padded, value_dim_padded;
  std::int64_t block_rows, block_keys;  // multiples of tile_rows and panel_keys; block_keys <= kMaxBackwardBlockKeys
  std::int64_t group;                   // query heads per KV head
  bool gaussian;                        // -scale |q - k|^2, else scale q.k
  float scale;
  Transform transform;  // none or softcap
  float softcap;
  const float* alibi_slopes;  // null, or at the group's first head
  const float* sinks;         // null, or at the group's first head (natural units)
  JobMasks masks;             // at (batch, the group's first head)
  JobVisibility visible;
  HeadRows q, k, v, out, dout, lse;
  HeadRowsOut dq, dk, dv;
  BackwardScratch scratch;
  // Coarse rows (coarse_lse): backward_row_stats recomputes such a row's max score (log2
  // units) and 1 / its sum; the passes read them here, at the group's first head, head
  // stride q_len, row stride 1. Null when the call has no coarse row.
  float* coarse_shift;
  float* coarse_scale;
  // The item: keys [first, first + count) of the KV head (backward_keys and
  // backward_key_chunk write their dk and dv rows), or queries [first, first + count) of
  // query head `head` of the group (backward_queries and backward_write_queries write
  // their dq rows; backward_pack_queries packs them; backward_row_stats computes the
  // statistics of their coarse rows).
  std::int64_t first, count, head;
  DqTurns turns;  // backward_key_chunk's with key chunks in turn; {null, null} for whole heads
};

/// Whether a row's lse is too coarse to recompute P = exp(s - lse) from: 1024 or more in
/// log2 units has an ulp of 2^-13 or more (a row masked by -1e9 has lse ~ -1e9, ulp 64).
/// -inf (a row that sees nothing) and NaN are not. The driver asks it to decide whether
/// a call needs the statistics, the kernels for each row (src/backward.cpp).
bool coarse_lse(float lse);

/// What one variant offers: its micro-kernel geometry, its entry points and its packers.
struct KernelTable {
  Isa isa;
  DType kv;
  const char* name;   // <kv>_attn_fwd_<mr>x<nr>__<isa>
  int vector_floats;  // floats per SIMD register
  int tile_rows;      // mr: query rows of the micro-kernels
  int panel_keys;     // nr: keys per packed K panel
  // Q.K^T from bf16 Q and K as given (AMX tiles, kernels/forward_tiles.hpp; vdpbf16ps,
  // kernels/forward_pairs.hpp): the variant takes only bf16 q, k and v (or any, rounded,
  // under allow_bf16_compute) with the dot product, for prefill, and for the decoding
  // that bf16_products_take (src/plan.hpp) gives it. The driver hands anything else to
  // the level below (dispatch.hpp, kernels_below).
  bool bf16_products;
  bool tiles;        // AMX tiles: K panels only, also for decoding 16 or more stacked rows
  bool pair_values;  // forward_query_block's P.V from bf16 weights and V packed by pairs of keys
                     // (kernels/pair_values.hpp), never read in place; without tiles, the
                     // small kernel reads V as stored (decoding)
  int value_columns;  // value_dim is padded to a multiple of this (JobDims::value_dim_padded)
  void (*forward_query_block)(const QueryBlockJob& job);
  // The same kernel with fewer rows per tile (same panels), for decoding blocks whose
  // rows (query heads of a group x queries) would leave most of a tile_rows tile empty.
  // The vdpbf16ps variant decodes on it alone, with V rows as stored. Null for the tiles.
  int small_tile_rows;
  void (*forward_small_block)(const QueryBlockJob& job);
  // Decoding with at least vector_floats rows, dot product, fp32 K in place, no mask,
  // bias or transform: the rows as vector lanes (see ForwardKernel::forward_lanes_block).
  // Null where the variant has none (16-bit K/V: see kernels/variant.hpp).
  void (*forward_lanes_block)(const QueryBlockJob& job);

  // K of keys [0, keys) as fp32 panels of panel_keys keys (see JobKeys). With a center
  // (Gaussian), packs k - center, writes key_bias[j] = bias_scale * |k_j - center|^2 and
  // returns the largest |k_j - center|^2 (else 0). The source is of the variant's kv type.
  float (*pack_key_panels)(const SourceRows& k, std::int64_t keys, std::int64_t head_dim, const float* center,
                           float bias_scale, float* panels, float* key_bias);
  // V of keys [0, keys) as rows of value_dim_padded elements of the kv type, zero past
  // value_dim.
  void (*pack_value_rows)(const SourceRows& v, std::int64_t keys, std::int64_t value_dim,
                          std::int64_t value_dim_padded, void* rows);
  // Q rows (fp32, or of the kv type) in the kernels' layout.
  void (*pack_query_rows)(const QueryPack& pack);
  // The scratch the three packers write, in floats: K of `keys` keys, Q of `rows` rows
  // (a multiple of tile_rows), V of `keys` keys.
  std::int64_t (*key_panel_floats)(std::int64_t keys, std::int64_t head_dim);
  std::int64_t (*query_floats)(std::int64_t rows, std::int64_t head_dim);
  std::int64_t (*value_floats)(std::int64_t keys, std::int64_t value_dim_padded);

  // The fused backward on the same micro-kernels (fp32 variants, and the vdpbf16ps
  // variant for bf16 data and the dot product; null for the others): dK and dV of a key
  // block, dQ of a query block (two passes, each recomputing P and dS), or all three in
  // one pass over a KV head's key blocks, with the group's query side packed before and
  // its dq written after. Bitwise the same results.
  const char* backward_name;  // <f32 or bf16>_attn_bwd_<mr>x<nr>__<isa>
  void (*backward_keys)(const BackwardJob& job);
  void (*backward_queries)(const BackwardJob& job);
  void (*backward_pack_queries)(const BackwardJob& job);
  void (*backward_key_chunk)(const BackwardJob& job);
  void (*backward_write_queries)(const BackwardJob& job);
  void (*backward_row_stats)(const BackwardJob& job);

  // Rows of score scratch (times block_keys floats) a forward entry of `mr`-row tiles
  // needs: the AMX kernel scores two row tiles at once, and writes their bf16 weights to
  // as many rows after them (kernels/forward_tiles.hpp).
  std::int64_t score_rows(int mr) const { return tiles ? 4 * std::int64_t(mr) : std::int64_t(mr); }
};

/// Writes count floats to out + offset + c * stride (elements of `type`), rounded to
/// nearest even once (fp32: as they are): the one narrowing of results to 16 bits
/// (src/convert.cpp).
void store_values(const float* values, std::int64_t count, DType type, void* out, std::int64_t offset,
                    std::int64_t stride);

/// Each variant's table, named after it (kernels/variant.cpp.in).
#define FLASHCPU_VARIANT(isa, kv, mr, nr, nv, pr, small_mr, small_nv) const KernelTable& kernel_table_##kv##_##isa();
#include "kernels/variants.inc"
#undef FLASHCPU_VARIANT

}  // namespace flashcpu::detail
