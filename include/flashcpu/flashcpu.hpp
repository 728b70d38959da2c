// flashcpu: fused, cache-tiled attention for CPUs.
//
// The one public header. It holds strided views, options, the entry points and
// the error type; no SIMD types leak out of it.
//
//   #include <flashcpu/flashcpu.hpp>
//   std::vector<float> q(B*H*N*D), k(B*H*M*D), v(B*H*M*D), o(B*H*N*D);
//   flashcpu::attention(flashcpu::bhsd<const float>(q.data(), B, H, N, D),
//                       flashcpu::bhsd<const float>(k.data(), B, H, M, D),
//                       flashcpu::bhsd<const float>(v.data(), B, H, M, D),
//                       flashcpu::bhsd(o.data(), B, H, N, D),
//                       {.causal = true});   // C++20 designated init; C++17: set fields
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace flashcpu {

/// A non-owning strided view of a 4-D tensor laid out as [batch, heads, seq, dim].
/// Strides are in elements and may take any non-negative value, so BHSD, BSHD,
/// sliced and padded buffers are all used in place. An aggregate: no constructors.
template <class T>
struct TensorView {
  T* data;
  std::array<std::int64_t, 4> shape;    // [batch, heads, seq, dim]
  std::array<std::int64_t, 4> strides;  // in elements

  /// A mutable view converts to a read-only one.
  operator TensorView<const T>() const { return {data, shape, strides}; }
};

/// A contiguous [B, H, S, D] view (row-major, "BHSD").
template <class T>
TensorView<T> bhsd(T* data, std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) {
  return {data, {b, h, s, d}, {h * s * d, s * d, d, 1}};
}

/// A view of a contiguous [B, S, H, D] buffer ("BSHD", as most model code stores
/// activations), presented in the library's [B, H, S, D] order without a copy.
template <class T>
TensorView<T> bshd(T* data, std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) {
  return {data, {b, h, s, d}, {s * h * d, d, h * d, 1}};
}

struct AttentionOptions {
  std::optional<float> scale;  // default 1/sqrt(D)
  bool causal = false;         // query i sees key j only when j <= i + (M - N)
  int num_threads = 0;         // 0: OpenMP's default
};

/// Every invalid argument raises this, naming the argument, the expected and the
/// actual value, before anything is written.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// out = softmax(scale * q k^T) v, fused and tiled: the N x M score matrix is never
/// materialized.
///   q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv], out [B, Hq, N, Dv].
/// Hq must be a multiple of Hkv; query head h reads key/value head h / (Hq / Hkv)
/// (multi-head, grouped-query and multi-query attention). With `causal`, the
/// diagonal is aligned bottom-right (KV-cache decoding). A query row that sees no
/// key gets zeros. Results are bitwise identical for every num_threads.
/// `out` must not share memory with q, k or v (checked on address ranges).
void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, const AttentionOptions& options = {});

namespace reference {
/// The naive oracle: materializes the full score matrix of each head, then a row
/// softmax and the weighted sum, all in double. Same contract as flashcpu::attention.
void attention(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
               TensorView<float> out, const AttentionOptions& options = {});
}  // namespace reference

/// The instruction set the kernels run with: "avx512", "avx2" or "sse2". Chosen once
/// from the CPU's features; the environment variable FLASHCPU_ISA (avx512, avx2,
/// sse2) caps it at a lower level.
std::string active_isa();

/// Whether this CPU (and OS) can run the kernels of `isa` ("avx512", "avx2", "sse2").
bool isa_supported(const std::string& isa);

/// Tile sizes the fused kernel uses for one head dimension on the active ISA.
struct TileConfig {
  int block_rows;  // queries per block (a multiple of the micro-kernel's rows)
  int block_keys;  // keys per block (a multiple of the micro-kernel's key panel)
};

/// The tile sizes attention() uses for head dimension `head_dim` on the active ISA:
/// from a loaded tuning file when it has an entry, else the built-in defaults.
TileConfig tile_config(std::int64_t head_dim);

/// Loads a tuning file written by the flashcpu-tune tool (replacing any earlier
/// one). Raises Error if the file cannot be read or parsed. The environment
/// variable FLASHCPU_TUNING_FILE names a file loaded on first use.
void load_tuning(const std::string& path);

/// Sets (or, with nullopt, removes) the tile sizes for one ISA and head dimension
/// in the process's tuning table. Used by the tuner; raises Error on invalid sizes.
void set_tile_config(const std::string& isa, std::int64_t head_dim, std::optional<TileConfig> tiles);

}  // namespace flashcpu
