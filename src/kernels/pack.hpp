// The packers: the baseline-compiled driver decides what to pack and where; these write
// it in the kernels' layouts (see JobKeys and QueryPack in kernel_api.hpp), widening
// 16-bit data on the way. Included only from a variant's translation unit, after
// kernels/forward.hpp, inside its namespace.

template <class S>
float pack_key_panels_from(const S* k, std::int64_t row_stride, std::int64_t col_stride, std::int64_t keys,
                           std::int64_t head_dim, int nr, const float* center, float bias_scale, float* panels,
                           float* key_bias) {
  const std::int64_t num_panels = (keys + nr - 1) / nr;
  if constexpr (std::is_same<S, float>::value) {
    if (!center && col_stride == 1) {
      // The common case, a plain transpose of contiguous rows, in 4 x 4 blocks held in
      // SSE registers: short N=256 (H=16, D=64) spent 6% of its time here with scalar copies.
      for (std::int64_t p = 0; p < num_panels; ++p) {
        float* panel = panels + p * head_dim * nr;
        const float* first = k + p * nr * row_stride;
        const std::int64_t valid = min_i64(nr, keys - p * nr);
        const std::int64_t whole = valid / 4 * 4, d_whole = head_dim / 4 * 4;
        for (std::int64_t c = 0; c < whole; c += 4) {
          const float* src = first + c * row_stride;
          std::int64_t d = 0;
          for (; d < d_whole; d += 4) {
            __m128 r0 = _mm_loadu_ps(src + d), r1 = _mm_loadu_ps(src + row_stride + d);
            __m128 r2 = _mm_loadu_ps(src + 2 * row_stride + d), r3 = _mm_loadu_ps(src + 3 * row_stride + d);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            _mm_storeu_ps(panel + d * nr + c, r0);
            _mm_storeu_ps(panel + (d + 1) * nr + c, r1);
            _mm_storeu_ps(panel + (d + 2) * nr + c, r2);
            _mm_storeu_ps(panel + (d + 3) * nr + c, r3);
          }
          for (; d < head_dim; ++d)
            for (int t = 0; t < 4; ++t) panel[d * nr + c + t] = src[t * row_stride + d];
        }
        for (std::int64_t d = 0; d < head_dim; ++d) {
          for (std::int64_t c = whole; c < valid; ++c) panel[d * nr + c] = first[c * row_stride + d];
          for (std::int64_t c = valid; c < nr; ++c) panel[d * nr + c] = 0.0f;
        }
      }
      return 0.0f;
    }
  }
  if (!center) {
    // A plain transpose (and widening): written apart from the centered one because the
    // norms below form a serial chain of dependent additions, 4 cycles per element.
    for (std::int64_t p = 0; p < num_panels; ++p) {
      float* panel = panels + p * head_dim * nr;
      const std::int64_t valid = min_i64(nr, keys - p * nr);
      for (std::int64_t d = 0; d < head_dim; ++d) {
        float* dst = panel + d * nr;
        const S* src = k + p * nr * row_stride + d * col_stride;
        for (std::int64_t c = 0; c < valid; ++c) dst[c] = widen_scalar(src[c * row_stride]);
        for (std::int64_t c = valid; c < nr; ++c) dst[c] = 0.0f;
      }
    }
    return 0.0f;
  }
  float spread = 0.0f;
  for (std::int64_t p = 0; p < num_panels; ++p) {
    float* panel = panels + p * head_dim * nr;
    for (int c = 0; c < nr; ++c) {
      const std::int64_t j = p * nr + c;
      if (j < keys) {
        const S* key = k + j * row_stride;
        float norm = 0.0f;
        for (std::int64_t d = 0; d < head_dim; ++d) {
          const float x = widen_scalar(key[d * col_stride]) - center[d];
          panel[d * nr + c] = x;
          norm += x * x;
        }
        key_bias[j] = bias_scale * norm;
        spread = spread > norm ? spread : norm;
      } else {
        for (std::int64_t d = 0; d < head_dim; ++d) panel[d * nr + c] = 0.0f;
        key_bias[j] = 0.0f;
      }
    }
  }
  return spread;
}

// Rows of value_dim_padded elements, as stored (no widening: P.V widens as it loads).
template <class S>
void pack_value_rows_from(const S* v, std::int64_t row_stride, std::int64_t col_stride, std::int64_t keys,
                          std::int64_t value_dim, std::int64_t value_dim_padded, S* rows) {
  for (std::int64_t j = 0; j < keys; ++j) {
    S* row = rows + j * value_dim_padded;
    for (std::int64_t c = 0; c < value_dim; ++c) row[c] = v[j * row_stride + c * col_stride];
    for (std::int64_t c = value_dim; c < value_dim_padded; ++c) row[c] = S{};  // +0 in every type
  }
}

template <class S>
void pack_query_rows_from(const QueryPack& pack) {
  const std::int64_t D = pack.head_dim, stride = pack.source.col_stride;
  const S* const base = static_cast<const S*>(pack.source.data);
  // (Query i, head g) of row r, stepped rather than divided out per row.
  std::int64_t i = 0, g = 0;
  for (std::int64_t r = 0; r < pack.rows_padded; ++r) {
    float* dst = pack.packed + r * D;
    if (r >= pack.rows) {
      for (std::int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
      if (pack.center) pack.row_bias[r] = 0.0f;
      continue;
    }
    const S* src = base + i * pack.source.row_stride + g * pack.head_stride;
    if (++g == pack.heads_per_row) {
      g = 0;
      ++i;
    }
    if (!pack.center) {  // no norm: its chain of dependent additions would set the pace
      if (stride == 1)
        for (std::int64_t d = 0; d < D; ++d) dst[d] = pack.factor * widen_scalar(src[d]);
      else
        for (std::int64_t d = 0; d < D; ++d) dst[d] = pack.factor * widen_scalar(src[d * stride]);
      continue;
    }
    float norm = 0.0f;
    for (std::int64_t d = 0; d < D; ++d) {
      const float x = widen_scalar(src[d * stride]) - pack.center[d];
      dst[d] = pack.factor * x;
      norm += x * x;
    }
    pack.row_bias[r] = pack.bias_scale * norm;
  }
}

// ---- The layouts of the kernels with bf16 products (kernels/forward_tiles.hpp,
// forward_pairs.hpp). Their sources are bf16, or fp32 and fp16 rounded to bf16 to
// nearest even (allow_bf16_compute).

// Columns per bf16_columns call; even, so a pair of columns never straddles two calls.
constexpr std::int64_t kBf16Columns = 256;
constexpr std::uint16_t kBf16Zeros[kBf16Columns] = {};

// `count` (<= kBf16Columns) columns of a source row as bf16 bits, the first at element
// `at`: a pointer into the source where it holds them as contiguous bf16 (the common
// case, no copy), else `buffer` filled. One type test per call, and loops the compiler
// can vectorize, where a test per element made packing a tenth of a bf16 call's time.
inline const std::uint16_t* bf16_columns(const SourceRows& s, std::int64_t at, std::int64_t count,
                                         std::uint16_t* buffer) {
  const std::int64_t stride = s.col_stride;
  switch (s.type) {
    case DType::bf16: {
      const auto* x = static_cast<const std::uint16_t*>(s.data) + at;
      if (stride == 1) return x;
      for (std::int64_t i = 0; i < count; ++i) buffer[i] = x[i * stride];
      return buffer;
    }
    case DType::f16: {
      const auto* x = static_cast<const f16*>(s.data) + at;
      for (std::int64_t i = 0; i < count; ++i) buffer[i] = round_to_bf16(widen_scalar(x[i * stride]));
      return buffer;
    }
    case DType::f32: break;
  }
  const auto* x = static_cast<const float*>(s.data) + at;
  for (std::int64_t i = 0; i < count; ++i) buffer[i] = round_to_bf16(x[i * stride]);
  return buffer;
}

// K in panels of `panel_keys` keys whose rows are `words` 32-bit words, word w holding
// dimensions (2w, 2w + 1) of every key of the panel (the pair layout of TDPBF16PS's B
// operand and of vdpbf16ps): key j is column j % panel_keys of panel j / panel_keys.
// Words past the head dim, and keys from `keys` to a whole panel, are zero.
inline void pack_bf16_key_pairs(const SourceRows& k, std::int64_t keys, std::int64_t head_dim, std::int64_t words,
                                std::int64_t panel_keys, std::uint32_t* out) {
  const std::int64_t packed = (keys + panel_keys - 1) / panel_keys * panel_keys;
  std::uint16_t buffer[kBf16Columns];
  for (std::int64_t j = 0; j < packed; ++j) {
    std::uint32_t* key = out + (j / panel_keys) * panel_keys * words + j % panel_keys;
    std::int64_t w = 0;
    for (std::int64_t c0 = 0; j < keys && c0 < head_dim; c0 += kBf16Columns) {
      const std::int64_t n = min_i64(kBf16Columns, head_dim - c0);
      const std::uint16_t* x = bf16_columns(k, j * k.row_stride + c0 * k.col_stride, n, buffer);
      for (std::int64_t i = 0; i + 1 < n; i += 2, ++w) key[w * panel_keys] = x[i] | std::uint32_t(x[i + 1]) << 16;
      if (n % 2) key[w++ * panel_keys] = x[n - 1];
    }
    for (; w < words; ++w) key[w * panel_keys] = 0;
  }
}

// One row of `columns` bf16 elements: `count` source columns from element `at`, then zeros.
inline void pack_bf16_row(const SourceRows& s, std::int64_t at, std::int64_t count, std::int64_t columns,
                          std::uint16_t* dst) {
  std::uint16_t buffer[kBf16Columns];
  std::int64_t c0 = 0;
  for (; c0 < count; c0 += kBf16Columns) {
    const std::int64_t n = min_i64(kBf16Columns, count - c0);
    __builtin_memcpy(dst + c0, bf16_columns(s, at + c0 * s.col_stride, n, buffer), std::size_t(n) * 2);
  }
  for (std::int64_t c = count; c < columns; ++c) dst[c] = 0;
}

// Q rows: bf16, unscaled, `width` >= head_dim elements each, zero past head_dim. Those
// kernels multiply the fp32 scores by the factor instead (JobScore::raw_factor): a bf16
// q scaled and rounded again would move every score by up to 2^-9 of its size.
inline void pack_bf16_query_rows(const QueryPack& pack, std::int64_t width) {
  assert(pack.center == nullptr);
  auto* out = reinterpret_cast<std::uint16_t*>(pack.packed);
  std::int64_t i = 0, g = 0;  // (query i, head g) of row r, stepped
  for (std::int64_t r = 0; r < pack.rows_padded; ++r) {
    std::uint16_t* dst = out + r * width;
    if (r >= pack.rows) {
      for (std::int64_t d = 0; d < width; ++d) dst[d] = 0;
      continue;
    }
    pack_bf16_row(pack.source, i * pack.source.row_stride + g * pack.head_stride, pack.head_dim, width, dst);
    if (++g == pack.heads_per_row) {
      g = 0;
      ++i;
    }
  }
}

// The variant's entry points: K and V must be of its kv type KV; Q fp32 or KV.
template <class KV, int NR>
struct Packers {
  static std::int64_t key_panel_floats(std::int64_t keys, std::int64_t head_dim) {
    return (keys > 0 ? (keys + NR - 1) / NR * NR : NR) * head_dim;
  }
  static std::int64_t query_floats(std::int64_t rows, std::int64_t head_dim) { return rows * head_dim; }
  // Floats: room for rows of any element type.
  static std::int64_t value_floats(std::int64_t keys, std::int64_t value_dim_padded) {
    return keys * value_dim_padded;
  }
  static float pack_key_panels(const SourceRows& k, std::int64_t keys, std::int64_t head_dim, const float* center,
                               float bias_scale, float* panels, float* key_bias) {
    assert(k.type == dtype_of<KV>());
    return pack_key_panels_from(static_cast<const KV*>(k.data), k.row_stride, k.col_stride, keys, head_dim, NR,
                                center, bias_scale, panels, key_bias);
  }
  static void pack_value_rows(const SourceRows& v, std::int64_t keys, std::int64_t value_dim,
                              std::int64_t value_dim_padded, void* rows) {
    assert(v.type == dtype_of<KV>());
    pack_value_rows_from(static_cast<const KV*>(v.data), v.row_stride, v.col_stride, keys, value_dim,
                         value_dim_padded, static_cast<KV*>(rows));
  }
  static void pack_query_rows(const QueryPack& pack) {
    assert(pack.source.type == DType::f32 || pack.source.type == dtype_of<KV>());
    if (pack.source.type == DType::f32)
      pack_query_rows_from<float>(pack);
    else
      pack_query_rows_from<KV>(pack);
  }
};
