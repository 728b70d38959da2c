// Shared helpers for the flashcpu tests: owning strided tensors (and 16-bit copies of
// them), the comparison of the fused kernel against the reference oracle with a
// per-element error bound, and the flag that turns a forced-but-unavailable ISA into a
// skipped CTest run.
#pragma once

#include <flashcpu/flashcpu.hpp>

#include <array>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace ftest {

using Shape = std::array<std::int64_t, 4>;  // [batch, heads, seq, dim]

/// How a test tensor sits in its buffer.
enum class Layout {
  bhsd,       // contiguous [B, H, S, D]
  bshd,       // contiguous [B, S, H, D] seen through flashcpu::bshd
  padded,     // [B, H, S, D] with extra elements after every row, head and batch
  sliced,     // a window [:, 2:2+S, 1:1+H, 3:3+D] of a larger [B+1, S+5, H+2, D+7] BSHD buffer
  broadcast,  // batch stride 0: every batch reads the same [H, S, D] (inputs only)
};
const char* layout_name(Layout layout);

/// A buffer that owns its storage, plus a strided view into it. Every buffer element
/// starts as `pad`; those outside the view keep it, so a kernel that reads padding
/// (pad = NaN) or writes it (pad = a sentinel) is caught.
class Tensor {
 public:
  Tensor(Shape shape, Layout layout, float pad);

  flashcpu::TensorView<float> view() { return {buf_.data() + offset_, shape_, strides_}; }
  flashcpu::TensorView<const float> cview() const { return {buf_.data() + offset_, shape_, strides_}; }
  const Shape& shape() const { return shape_; }

  float& at(std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) {
    return buf_[static_cast<std::size_t>(index(b, h, s, d))];
  }
  float at(std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) const {
    return buf_[static_cast<std::size_t>(index(b, h, s, d))];
  }

  /// Sets every element of the view to a uniform value in [lo, hi] (lo == hi: constant).
  void fill_uniform(std::mt19937& rng, float lo, float hi);
  /// Whether every buffer element outside the view still holds the padding (bitwise).
  bool padding_intact() const;
  const std::vector<float>& buffer() const { return buf_; }
  /// The view's elements in [b, h, s, d] order (comparable across differently placed buffers).
  std::vector<float> values() const;

 private:
  std::int64_t index(std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) const {
    return offset_ + b * strides_[0] + h * strides_[1] + s * strides_[2] + d * strides_[3];
  }
  Shape shape_;
  Shape strides_{};
  std::int64_t offset_ = 0;
  float pad_;
  std::vector<float> buf_;
};

std::string describe(const flashcpu::TensorView<const float>& view);

/// Outcome of comparing one fused result with the reference.
struct Result {
  bool ok = true;          // fused within tolerance, reference consistent, padding intact
  std::string report;      // what was compared; on failure the worst element with both values
  double worst_ratio = 0;  // max over elements of |fused - ref| / tol
};

/// Runs reference::attention on the same views and compares `out` with it element-wise
/// under the bound documented in util.cpp. Also checks the reference itself against an
/// independent naive double computation done here (it is the oracle, so it is tested too).
Result compare_with_reference(flashcpu::TensorView<const float> q, flashcpu::TensorView<const float> k,
                              flashcpu::TensorView<const float> v, const flashcpu::AttentionOptions& options,
                              flashcpu::TensorView<const float> out);

/// One forward problem: shapes, options, layouts, value ranges and the seed of its data.
struct Case {
  std::int64_t B = 1, Hq = 1, Hkv = 1, N = 1, M = 1, D = 1, Dv = 1;
  bool causal = false;
  std::optional<float> scale;
  int threads = 0;
  Layout lq = Layout::bhsd, lk = Layout::bhsd, lv = Layout::bhsd, lo = Layout::bhsd;
  float qk_lo = -1.0f, qk_hi = 1.0f;  // range of q and k entries
  float v_lo = -1.0f, v_hi = 1.0f;    // range of v entries
  std::uint32_t seed = 1;
  std::string describe() const;
};

/// Builds the tensors of `c` (padding NaN for inputs, a sentinel for out), runs
/// flashcpu::attention, and compares with the reference.
Result run_case(const Case& c);

/// Fused output of `c` alone (the out view's elements), for bitwise comparisons between
/// runs.
std::vector<float> run_fused_buffer(const Case& c);

/// Multiples the active ISA's micro-kernel rounds the tiles up to: rows 6 (avx512) / 4,
/// key panel 64 / 16 / 8 floats.
int micro_rows(const std::string& isa);
int key_panel(const std::string& isa);

/// The level whose tuning entries fp32 calls read when `isa` is active: itself, or on
/// "amx" and "avx512bf16" (whose own entries drive their bf16 kernels) "avx512".
std::string f32_tile_isa(const std::string& isa);

/// Sets a tile override for fp32 calls at head_dim on the active ISA (the entry of
/// f32_tile_isa(active_isa())) and removes it on scope exit.
class TileOverride {
 public:
  TileOverride(std::int64_t head_dim, flashcpu::TileConfig tiles);
  ~TileOverride();
  TileOverride(const TileOverride&) = delete;
  TileOverride& operator=(const TileOverride&) = delete;

 private:
  std::string isa_;
  std::int64_t head_dim_;
};

/// Lengths at the edges of a tile size T: 1, T-1, T, T+1, 3T+5 (without duplicates or zeros).
std::vector<std::int64_t> edge_lengths(std::int64_t tile);

// Accuracy margins. The derived error bounds are worst cases, far above what a sound
// kernel reaches, so a kernel 10x less accurate would still pass them. Every comparison
// also requires its worst error to stay within a fraction of the bound, per family, and
// the largest fraction of each test case is recorded and printed at the end of the run
// (main.cpp), per ISA:
//  - plain dot-product attention (compare_with_reference, FTEST_CHECK_CASE): observed up
//    to 1.4% (AVX2, SSE2); 8%, room for other ISAs' summation orders. With exp2's
//    polynomial cut from degree 6 to 5 (about 10x its error) the worst case went to 13%,
//    and fails;
//  - options and scores (attention_oracle.hpp, CHECK_PROBLEM), whose bounds also carry
//    the masks', ALiBi's and the transforms' terms: observed up to 5.3%; 20%.
inline constexpr double kMarginFraction = 0.08;
inline constexpr double kOptionsMarginFraction = 0.20;
/// Records the worst |error| / bound of one comparison under the running test case.
void record_margin(double ratio);
/// The test cases' largest recorded fractions, one line each, for the end of the run.
std::string margin_summary();

// The [dispatch] test calls this when FLASHCPU_ISA names an ISA this machine lacks;
// main() then exits with the code CTest reports as "Skipped" (defined in main.cpp).
void note_isa_unavailable();
bool isa_unavailable_noted();

// ---- 16-bit data (test_16bit.cpp, test_backward.cpp)

template <class T>
T narrow(float x) {
  if constexpr (std::is_same<T, flashcpu::bf16>::value)
    return flashcpu::to_bf16(x);
  else
    return flashcpu::to_fp16(x);
}
inline float widen(float x) { return x; }
inline float widen(flashcpu::bf16 x) { return flashcpu::to_float(x); }
inline float widen(flashcpu::fp16 x) { return flashcpu::to_float(x); }

template <class T>
const char* type_name() {
  return std::is_same<T, float>::value ? "fp32" : std::is_same<T, flashcpu::bf16>::value ? "bf16" : "fp16";
}

// Unit roundoff of a 16-bit type: its largest relative rounding error.
template <class T>
double unit_roundoff() {
  return std::is_same<T, flashcpu::bf16>::value ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
}

// Rounds every element of the tensor's view to T's nearest value, in place.
template <class T>
void round_view(Tensor& t) {
  const Shape s = t.shape();
  for (std::int64_t b = 0; b < s[0]; ++b)
    for (std::int64_t h = 0; h < s[1]; ++h)
      for (std::int64_t i = 0; i < s[2]; ++i)
        for (std::int64_t c = 0; c < s[3]; ++c) t.at(b, h, i, c) = widen(narrow<T>(t.at(b, h, i, c)));
}

// A copy of a whole tensor buffer (padding included: NaN padding stays NaN, so a kernel
// reading it is caught) in T, viewed with the same offset and strides.
template <class T>
struct Copy {
  std::vector<T> buf;
  std::int64_t offset;
  Shape shape, strides;

  explicit Copy(const Tensor& t) {
    const flashcpu::TensorView<const float> v = t.cview();
    offset = v.data - t.buffer().data();
    shape = v.shape;
    strides = v.strides;
    buf.resize(t.buffer().size());
    for (std::size_t e = 0; e < buf.size(); ++e) {
      if constexpr (std::is_same<T, float>::value)
        buf[e] = t.buffer()[e];
      else
        buf[e] = narrow<T>(t.buffer()[e]);
    }
  }
  flashcpu::TensorView<const T> cview() const { return {buf.data() + offset, shape, strides}; }
  flashcpu::TensorView<T> view() { return {buf.data() + offset, shape, strides}; }
  T at(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t c) const {
    return buf[std::size_t(offset + b * strides[0] + h * strides[1] + i * strides[2] + c * strides[3])];
  }
};

// Whether two buffers hold the same bits outside the view (the kernel wrote nothing
// there) and, with `inside` true, inside it too.
template <class T>
bool same_bits(const Copy<T>& a, const Copy<T>& b, bool inside) {
  std::vector<char> in_view(a.buf.size(), 0);
  for (std::int64_t x = 0; x < a.shape[0]; ++x)
    for (std::int64_t y = 0; y < a.shape[1]; ++y)
      for (std::int64_t z = 0; z < a.shape[2]; ++z)
        for (std::int64_t w = 0; w < a.shape[3]; ++w)
          in_view[std::size_t(a.offset + x * a.strides[0] + y * a.strides[1] + z * a.strides[2] + w * a.strides[3])] = 1;
  for (std::size_t e = 0; e < a.buf.size(); ++e)
    if ((inside || !in_view[e]) && std::memcmp(&a.buf[e], &b.buf[e], sizeof(T)) != 0) return false;
  return true;
}

}  // namespace ftest

/// Runs a Case and reports it: the case (seed included) and the worst element on failure.
#define FTEST_CHECK_CASE(c)                     \
  do {                                          \
    const ::ftest::Case& ftest_case_ = (c);     \
    const auto ftest_r_ = ::ftest::run_case(ftest_case_); \
    INFO(ftest_case_.describe());               \
    INFO(ftest_r_.report);                      \
    CHECK(ftest_r_.ok);                         \
    ::ftest::record_margin(ftest_r_.worst_ratio); \
    CHECK(ftest_r_.worst_ratio <= ::ftest::kMarginFraction); \
  } while (false)
