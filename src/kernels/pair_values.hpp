// P.V from bf16 weights and V packed by pairs of keys: what the AMX tile kernel
// (kernels/forward_tiles.hpp, TDPBF16PS) and the vdpbf16ps kernel with pair values
// (kernels/forward_pairs.hpp) share. Included only from a variant's translation unit,
// after kernels/pack.hpp, inside its namespace.
//
// Layout of V (pack_bf16_value_pairs): rows of value_dim_padded 32-bit words, row t for
// keys 2t and 2t + 1; word c holds column c of key 2t (low half) and of key 2t + 1 (high
// half). Keys are padded with zeros to whole chunks of `chunk_keys`; then one byte per
// chunk, 1 when a value in it is inf or NaN.
// Weights: a row's fp32 probabilities rounded to bf16 in place (round_weights_to_bf16),
// so that its 32-bit word t holds the weights of keys 2t and 2t + 1, the pair a single
// product takes. The row sums stay fp32.
// A zero weight times an inf or NaN value is NaN in a product of pairs; a chunk holding
// one (a stale KV-cache slot, say) is weighed apart, skipping zero weights
// (add_nonfinite_chunk), as the vector kernels skip them.

inline bool bf16_nonfinite(std::uint16_t bits) { return (bits & 0x7f80u) == 0x7f80u; }

// Keys rounded up to whole chunks (at least one, for the scratch of an empty range).
inline std::int64_t value_pairs_keys(std::int64_t keys, std::int64_t chunk_keys) {
  return (keys > 0 ? keys + chunk_keys - 1 : chunk_keys) / chunk_keys * chunk_keys;
}

inline std::int64_t value_pairs_floats(std::int64_t keys, std::int64_t value_dim_padded, std::int64_t chunk_keys) {
  const std::int64_t packed = value_pairs_keys(keys, chunk_keys);
  return packed * value_dim_padded / 2 + (packed / chunk_keys + 3) / 4;
}

// The chunks' flags of V packed for `keys` keys, past the pair rows.
inline std::uint8_t* value_pairs_flags(std::uint32_t* pairs, std::int64_t keys, std::int64_t value_dim_padded,
                                       std::int64_t chunk_keys) {
  return reinterpret_cast<std::uint8_t*>(pairs + value_pairs_keys(keys, chunk_keys) / 2 * value_dim_padded);
}
inline const std::uint8_t* value_pairs_flags(const std::uint32_t* pairs, std::int64_t keys,
                                             std::int64_t value_dim_padded, std::int64_t chunk_keys) {
  return value_pairs_flags(const_cast<std::uint32_t*>(pairs), keys, value_dim_padded, chunk_keys);
}

inline void pack_bf16_value_pairs(const SourceRows& v, std::int64_t keys, std::int64_t value_dim,
                                  std::int64_t value_dim_padded, std::int64_t chunk_keys, std::uint32_t* out) {
  const std::int64_t packed = (keys + chunk_keys - 1) / chunk_keys * chunk_keys;
  std::uint8_t* nonfinite = value_pairs_flags(out, keys, value_dim_padded, chunk_keys);
  for (std::int64_t chunk = 0; chunk < packed / chunk_keys; ++chunk) nonfinite[chunk] = 0;
  std::uint16_t even_buffer[kBf16Columns], odd_buffer[kBf16Columns];
  for (std::int64_t t = 0; t < packed / 2; ++t) {
    std::uint32_t* pair = out + t * value_dim_padded;
    const std::int64_t even = 2 * t, odd = 2 * t + 1;
    unsigned bad = 0;
    for (std::int64_t c0 = 0; even < keys && c0 < value_dim; c0 += kBf16Columns) {
      const std::int64_t n = min_i64(kBf16Columns, value_dim - c0);
      const std::uint16_t* a = bf16_columns(v, even * v.row_stride + c0 * v.col_stride, n, even_buffer);
      const std::uint16_t* b =
          odd < keys ? bf16_columns(v, odd * v.row_stride + c0 * v.col_stride, n, odd_buffer) : kBf16Zeros;
      for (std::int64_t i = 0; i < n; ++i) {
        pair[c0 + i] = a[i] | std::uint32_t(b[i]) << 16;
        bad |= unsigned(bf16_nonfinite(a[i])) | unsigned(bf16_nonfinite(b[i]));
      }
    }
    for (std::int64_t c = even < keys ? value_dim : 0; c < value_dim_padded; ++c) pair[c] = 0;
    if (bad) nonfinite[even / chunk_keys] = 1;
  }
}

// Row `row`'s probabilities [c0, cols) to bf16, in place: element j's 16 bits go to the
// row's j-th 16-bit slot, which lies in floats already read (c0 even).
template <int W>
inline void round_weights_to_bf16(float* row, std::int64_t c0, std::int64_t cols) {
  auto* out = reinterpret_cast<std::uint16_t*>(row);
  std::int64_t j = c0;
#if defined(__AVX512BF16__)
  if constexpr (W == 16)
    for (; j + 16 <= cols; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + j)));
#endif
  for (; j < cols; ++j) out[j] = round_to_bf16(row[j]);
}

// acc[r][c] += p[r][j] v[j][c] over the chunk_keys keys of a chunk, for rows [0, rows),
// skipping zero weights: the chunk's first key's weight of row r at weights[r *
// weights_stride] (bf16 slots), its first pair row at `pairs`.
inline void add_nonfinite_chunk(const std::uint16_t* weights, std::int64_t weights_stride, int rows,
                                const std::uint32_t* pairs, std::int64_t chunk_keys, std::int64_t value_dim_padded,
                                float* acc, std::int64_t acc_stride) {
  for (int r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < chunk_keys; ++j) {
      const float p = widen_scalar(bf16{weights[r * weights_stride + j]});
      if (p == 0.0f) continue;
      const std::uint32_t* pair = pairs + (j / 2) * value_dim_padded;
      const int shift = j % 2 ? 16 : 0;
      for (std::int64_t c = 0; c < value_dim_padded; ++c)
        acc[r * acc_stride + c] += p * widen_scalar(bf16{std::uint16_t(pair[c] >> shift)});
    }
}
