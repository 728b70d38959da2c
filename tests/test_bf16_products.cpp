// The kernels with bf16 products against the fp64 oracle, on emulated instructions
// (emulation.cpp), so they are checked on every machine:
//  - the AMX tile kernel (src/kernels/forward_tiles.hpp), both products on tiles;
//  - the vdpbf16ps kernel (src/kernels/forward_pairs.hpp), Q.K^T in pairs of dimensions,
//    with P.V from V widened and with pair values (P.V by vdpbf16ps too);
//  - decoding with 16 or more stacked rows on the tiles.
// bf16 q, k, v and out, with every option these kernels take (causal, windows, key
// lengths, additive and bool masks, softcap, ALiBi, sinks, lse), GQA, strided views,
// column strides of 2, garbage in excluded slots, and lengths and head dims that are not
// multiples of the tiles. The variants themselves run in the forced-ISA runs "flashcpu_tests_amx" and
// "flashcpu_tests_avx512bf16" on CPUs that have them (every bf16 test of
// test_16bit.cpp); elsewhere those runs report "Skipped".
//
// Tolerance. q, k and v are bf16 values, so every product is exact and the scores are
// fp32 sums (error ~ D 2^-24 sum |q_d k_d|, negligible here). The output's one rounding
// to bf16 adds at most u |out|, u = 2^-8. With pair values (the tiles, and the pair
// kernel's second form) each weight p is rounded to bf16 (relative error <= u) before
// P.V and the row sum l stays fp32, so
// |sum_j (p~_j - p_j) v_j| / l <= u max_j |v_j| (not when the pair kernel decodes: its
// small kernel weighs V widened, with fp32 weights). Bound: u (|ref| + max|v| where the
// weights are rounded) + 1e-5 (fp32 arithmetic). lse involves no 16-bit rounding:
// 2e-5 (1 + |lse|), tight enough that a single missed or extra key among the longest rows
// here (weight >= 1e-3) fails it.
// Margins: where the weights are rounded the output's rounding alone may take up to half
// of the bound (observed worst 0.49), so the check is 0.75; with V widened and fp32
// weights (the pair kernel's decoding too: worst 0.98 observed) the bound is that
// rounding alone, which may use all of it (no margin check). lse errors were at most 1% of their
// bound, checked at 10%.
// The emulated vdpbf16ps itself is checked bitwise against the instruction where the CPU
// has it (rounding, the order of the two products, subnormals, infinities, NaN).
// Mutations that these tests caught: the score factor off by 0.1%, V read one column
// pair off, zero weights multiplied into a poisoned chunk, V read in place on the tiles
// when decoding, a pair's odd element dropped by the K packer, a column stride ignored,
// flagged chunks left out, alpha applied to every run of chunks.
#include <catch2/catch.hpp>

#include <flashcpu/flashcpu.hpp>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dispatch.hpp"
#include "plan.hpp"
#include "emulation.hpp"
#include "validate.hpp"

namespace {

using flashcpu::bf16;
using flashcpu::fp16;

// The element type of q, k, v and out: bf16, or fp32 / fp16 rounded to bf16 by the
// packers (allow_bf16_compute).
enum class Input { bf16, f32, f16 };

struct TileCase {
  Input input = Input::bf16;
  std::int64_t B = 1, Hq = 1, Hkv = 1, N = 17, M = 1, D = 1, Dv = 1;
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;
  bool key_lengths = false, mask = false, bool_mask = false, alibi = false, sinks = false;
  float softcap = 0.0f;
  bool strided = false;  // [B, S, H, D] buffers with padded rows instead of [B, H, S, D]
  bool spread = false;   // elements of a row 2 apart (a column stride of 2)
  bool poison = false;   // NaN and inf in K and V past each batch's key length
  bool poison_masked = false;  // NaN and inf in K and V of keys the bool mask hides from every row
  bool shifted = false;  // K's and V's first element one element past the buffer's start (2 bytes: off 4-byte words)
  float qk_range = 1.0f;
  // Key j's row times key_step^(j / step_keys) (step_keys > 0): scores that jump from one
  // stretch of keys to the next, up or down.
  float key_step = 1.0f;
  std::int64_t step_keys = 0;
  int threads = 2;
  std::uint32_t seed = 1;

  std::string describe() const {
    std::ostringstream s;
    s << "B=" << B << " Hq=" << Hq << " Hkv=" << Hkv << " N=" << N << " M=" << M << " D=" << D << " Dv=" << Dv
      << " causal=" << causal << " window=" << window_left << "," << window_right << " key_lengths=" << key_lengths
      << " mask=" << mask << " bool_mask=" << bool_mask << " alibi=" << alibi << " sinks=" << sinks
      << " softcap=" << softcap << " strided=" << strided << " spread=" << spread << " poison=" << poison
      << " poison_masked=" << poison_masked << " shifted=" << shifted << " key_step=" << key_step << " every "
      << step_keys << " threads=" << threads
      << " seed=" << seed << " input=" << (input == Input::bf16 ? "bf16" : input == Input::f32 ? "fp32" : "fp16");
    return s.str();
  }
};

// A [B, H, S, E] tensor of `type` in a buffer laid out [B, H, S, E] or, strided,
// [B, S, H, E + 3], with its values widened to fp32 (exact) in the same layout; spread,
// the elements of a row 2 apart; starting `base` elements into its storage.
struct Buffer {
  std::int64_t B, H, S, E;
  Input type;
  std::int64_t base;
  std::array<std::int64_t, 4> strides;
  std::vector<float> values;  // the elements (bf16 and fp16 ones widened); fp32 input reads it
  std::vector<bf16> bits;
  std::vector<fp16> halves;

  Buffer(std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t e, bool strided, Input t, bool spread = false,
         std::int64_t first = 0)
      : B(b), H(h), S(s), E(e), type(t), base(first) {
    const std::int64_t col = spread ? 2 : 1, row = strided ? col * e + 3 : col * e;
    strides = strided ? std::array<std::int64_t, 4>{s * h * row, row, h * row, col}
                      : std::array<std::int64_t, 4>{h * s * row, s * row, row, col};
    const std::size_t n = std::size_t(base + std::max<std::int64_t>(b * h * s * row, 1));
    const float nan = std::numeric_limits<float>::quiet_NaN();  // padding: NaN, never read
    values.assign(n, nan);
    bits.assign(n, flashcpu::to_bf16(nan));
    halves.assign(n, flashcpu::to_fp16(nan));
  }
  std::int64_t at(std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t e) const {
    return base + b * strides[0] + h * strides[1] + s * strides[2] + e * strides[3];
  }
  void set(std::int64_t i, float x) {
    const std::size_t at = std::size_t(i);
    if (type == Input::bf16) {
      bits[at] = flashcpu::to_bf16(x);
      values[at] = flashcpu::to_float(bits[at]);
    } else if (type == Input::f16) {
      halves[at] = flashcpu::to_fp16(x);
      values[at] = flashcpu::to_float(halves[at]);
    } else {
      values[at] = x;
    }
  }
  void fill(std::mt19937& rng, float range) {
    std::uniform_real_distribution<float> u(-range, range);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t s = 0; s < S; ++s)
          for (std::int64_t e = 0; e < E; ++e) set(at(b, h, s, e), u(rng));
  }
  flashcpu::TensorView<const float> fview() const { return {values.data() + base, {B, H, S, E}, strides}; }
  template <class T>
  flashcpu::TensorView<const T> view() const {
    if constexpr (std::is_same<T, bf16>::value)
      return {bits.data() + base, {B, H, S, E}, strides};
    else if constexpr (std::is_same<T, fp16>::value)
      return {halves.data() + base, {B, H, S, E}, strides};
    else
      return {values.data() + base, {B, H, S, E}, strides};
  }
};

inline float widened(float x) { return x; }
inline float widened(bf16 x) { return flashcpu::to_float(x); }
inline float widened(fp16 x) { return flashcpu::to_float(x); }

// The kernel of `kernels`, through the driver the library would call (prefill, or
// decoding: use_decode_path), on q, k, v of type T: out (T, widened) and lse. Returns
// the route taken: "prefill", or the decode driver's description (describe_decode).
template <class T>
std::string run_kernel(const flashcpu::detail::KernelTable& kernels, const Buffer& q, const Buffer& k, const Buffer& v,
                const flashcpu::AttentionOptions& o, std::vector<float>* out, std::vector<float>* lse) {
  const std::int64_t B = q.B, Hq = q.H, N = q.S, Dv = v.E;
  std::vector<T> out_t(out->size());
  const flashcpu::TensorView<T> out_view = flashcpu::bhsd(out_t.data(), B, Hq, N, Dv);
  flashcpu::TensorView<float> lse_view = flashcpu::bhsd(lse->data(), B, Hq, N, 1);
  const flashcpu::TensorView<const T> qv = q.view<T>(), kv = k.view<T>(), vv = v.view<T>();
  namespace fd = flashcpu::detail;
  const fd::AttentionShape s = fd::validate_attention(qv, kv, vv, out_view, &lse_view, o);
  const fd::CallViews views{fd::AnyView::of(qv), fd::AnyView::of(kv), fd::AnyView::of(vv), fd::AnyView::of(out_view),
                            lse_view, true};
  const fd::Plan plan = fd::make_plan(kernels, s, views.v, fd::Transform::none, 0.0f, false);
  const bool decoding = fd::use_decode_path(s, kernels);
  if (decoding)
    fd::run_decode(plan, views);
  else
    fd::run_prefill(plan, views);
  for (std::size_t i = 0; i < out_t.size(); ++i) (*out)[i] = widened(out_t[i]);
  return decoding ? fd::describe_decode(plan, views.k) : "prefill";
}

struct Outcome {
  bool ok = true;
  double worst_out = 0, worst_lse = 0;  // error / bound
  std::string report;
  std::string route;                    // run_kernel's
  bool weights_rounded = false;         // P.V took bf16 weights (the bound's u max|v| term)
  std::vector<std::uint32_t> out_bits;  // the kernel's output (widened), for bitwise comparisons
};

Outcome run_tile_case(const flashcpu::detail::KernelTable& kernels, const TileCase& c) {
  std::mt19937 rng(c.seed);
  const std::int64_t first = c.shifted ? 1 : 0;
  Buffer q(c.B, c.Hq, c.N, c.D, c.strided, c.input, c.spread),
      k(c.B, c.Hkv, c.M, c.D, c.strided, c.input, c.spread, first),
      v(c.B, c.Hkv, c.M, c.Dv, c.strided, c.input, c.spread, first);
  q.fill(rng, c.qk_range);
  k.fill(rng, c.qk_range);
  v.fill(rng, 1.0f);
  if (c.step_keys > 0)
    for (std::int64_t b = 0; b < c.B; ++b)
      for (std::int64_t h = 0; h < c.Hkv; ++h)
        for (std::int64_t j = 0; j < c.M; ++j) {
          const float factor = std::pow(c.key_step, float(j / c.step_keys));
          for (std::int64_t d = 0; d < c.D; ++d) k.set(k.at(b, h, j, d), k.values[std::size_t(k.at(b, h, j, d))] * factor);
        }

  flashcpu::AttentionOptions o;
  o.causal = c.causal;
  o.num_threads = c.threads;
  o.window_left = c.window_left;
  o.window_right = c.window_right;
  o.softcap = c.softcap;
  o.allow_bf16_compute = c.input != Input::bf16;
  std::vector<std::int32_t> lengths;
  if (c.key_lengths) {
    std::uniform_int_distribution<std::int32_t> len(0, std::int32_t(c.M));
    for (std::int64_t b = 0; b < c.B; ++b) lengths.push_back(len(rng));
    o.key_lengths = lengths.data();
  }
  if (c.poison)  // stale slots past each batch's length: what a KV cache may hold there
    for (std::int64_t b = 0; b < c.B; ++b)
      for (std::int64_t h = 0; h < c.Hkv; ++h)
        for (std::int64_t j = c.key_lengths ? lengths[std::size_t(b)] : c.M; j < c.M; ++j) {
          for (std::int64_t d = 0; d < c.D; ++d) k.set(k.at(b, h, j, d), std::numeric_limits<float>::quiet_NaN());
          for (std::int64_t e = 0; e < c.Dv; ++e)
            v.set(v.at(b, h, j, e), e % 2 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN());
        }
  std::vector<float> mask;
  if (c.mask) {  // [1, Hq, N, M], broadcast over the batch
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (std::int64_t i = 0; i < c.Hq * c.N * c.M; ++i) {
      const float x = u(rng);
      mask.push_back(x < 0.1f ? -std::numeric_limits<float>::infinity() : x < 0.5f ? -2.0f * x : 0.0f);
    }
    o.mask = {mask.data(), {1, c.Hq, c.N, c.M}, {0, c.N * c.M, c.M, 1}};
  }
  std::vector<std::uint8_t> bool_mask;
  if (c.bool_mask || c.poison_masked) {  // [B, 1, N, M], broadcast over the heads
    std::uniform_int_distribution<int> u(0, 4);
    for (std::int64_t i = 0; i < c.B * c.N * c.M; ++i) bool_mask.push_back(!c.bool_mask || u(rng) != 0);
    o.bool_mask = {bool_mask.data(), {c.B, 1, c.N, c.M}, {c.N * c.M, 0, c.M, 1}};
  }
  if (c.poison_masked) {  // stale slots anywhere in the cache, hidden from every row
    std::uniform_int_distribution<int> u(0, 19);
    for (std::int64_t b = 0; b < c.B; ++b)
      for (std::int64_t j = 0; j < c.M; ++j) {
        if (u(rng) != 0) continue;
        for (std::int64_t i = 0; i < c.N; ++i) bool_mask[std::size_t((b * c.N + i) * c.M + j)] = 0;
        for (std::int64_t h = 0; h < c.Hkv; ++h) {
          for (std::int64_t d = 0; d < c.D; ++d) k.set(k.at(b, h, j, d), std::numeric_limits<float>::quiet_NaN());
          for (std::int64_t e = 0; e < c.Dv; ++e)
            v.set(v.at(b, h, j, e), e % 2 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN());
        }
      }
  }
  std::vector<float> slopes, sinks;
  for (std::int64_t h = 0; h < c.Hq; ++h) {
    slopes.push_back(0.05f * float(h + 1));
    sinks.push_back(0.25f * float(h) - 0.5f);
  }
  if (c.alibi) o.alibi_slopes = slopes.data();
  if (c.sinks) o.sinks = sinks.data();

  // The reference, on the same values widened to fp32 (exact).
  std::vector<float> ref(std::size_t(std::max<std::int64_t>(c.B * c.Hq * c.N * c.Dv, 1)));
  std::vector<float> ref_lse(std::size_t(std::max<std::int64_t>(c.B * c.Hq * c.N, 1)));
  flashcpu::reference::attention(q.fview(), k.fview(), v.fview(), flashcpu::bhsd(ref.data(), c.B, c.Hq, c.N, c.Dv),
                                 flashcpu::bhsd(ref_lse.data(), c.B, c.Hq, c.N, 1), o);

  // The kernel, through the prefill or decode driver, on emulated instructions.
  std::vector<float> out(ref.size(), 12345.0f), lse(ref_lse.size(), 12345.0f);
  const std::string route = c.input == Input::bf16  ? run_kernel<bf16>(kernels, q, k, v, o, &out, &lse)
                            : c.input == Input::f16 ? run_kernel<fp16>(kernels, q, k, v, o, &out, &lse)
                                                    : run_kernel<float>(kernels, q, k, v, o, &out, &lse);

  // The largest |v| a row may weigh: every value of its KV head (poisoned slots aside).
  // Inputs rounded to bf16 (fp32, fp16) move each score s_ij by at most
  // shift_i = (2u + u^2) scale max_j sum_d |q_id k_jd| (softcap only shrinks differences;
  // masks and ALiBi are exact), each weight then by a factor within e^(+-2 shift_i) after
  // normalization, and each value by u |v|: out gains (e^(2 shift_i) - 1) max|v| + u max|v|,
  // lse gains shift_i. A 16-bit out adds its rounding, u_out |ref| (bf16: 2^-8, fp16 2^-11).
  Outcome r;
  r.route = route;
  // Pair values round the weights: the tiles always, the vdpbf16ps variant's second form
  // in prefill only (it decodes on its small kernel, from V widened as stored).
  r.weights_rounded = kernels.pair_values && (kernels.tiles || route == "prefill");
  const double u = std::ldexp(1.0, -8);
  const bool rounded = c.input != Input::bf16;
  const double u_out = c.input == Input::f32 ? 0.0 : c.input == Input::f16 ? std::ldexp(1.0, -11) : u;
  const double scale = 1.0 / std::sqrt(double(c.D));
  std::ostringstream report;
  for (std::int64_t b = 0; b < c.B; ++b)
    for (std::int64_t h = 0; h < c.Hq; ++h) {
      double vmax = 0;
      const std::int64_t hkv = h / (c.Hq / c.Hkv), limit = c.key_lengths ? lengths[std::size_t(b)] : c.M;
      const std::int64_t sane = c.poison ? limit : c.M;
      for (std::int64_t j = 0; j < sane; ++j)
        for (std::int64_t e = 0; e < c.Dv; ++e) {
          const double x = std::fabs(double(v.values[std::size_t(v.at(b, hkv, j, e))]));
          if (std::isfinite(x)) vmax = std::max(vmax, x);  // poisoned slots are weighed by 0
        }
      for (std::int64_t i = 0; i < c.N; ++i) {
        double shift = 0;
        if (rounded)
          for (std::int64_t j = 0; j < sane; ++j) {
            double dot = 0;
            for (std::int64_t d = 0; d < c.D; ++d)
              dot += std::fabs(double(q.values[std::size_t(q.at(b, h, i, d))]) * k.values[std::size_t(k.at(b, hkv, j, d))]);
            if (std::isfinite(dot)) shift = std::max(shift, (2 * u + u * u) * scale * dot);
          }
        const double weights_term = (r.weights_rounded ? u * vmax : 0.0) + (rounded ? std::expm1(2 * shift) * vmax + u * vmax : 0.0);
        for (std::int64_t e = 0; e < c.Dv; ++e) {
          const std::size_t at = std::size_t(((b * c.Hq + h) * c.N + i) * c.Dv + e);
          const double got = out[at], want = ref[at];
          const double bound = weights_term + u_out * std::fabs(want) + 1e-5;
          const double ratio = std::isnan(want) ? (std::isnan(got) ? 0.0 : 1e9) : std::fabs(got - want) / bound;
          if (!(ratio <= 1.0) && r.ok) {
            r.ok = false;
            report << "out(" << b << "," << h << "," << i << "," << e << "): got " << got << ", want " << want
                   << ", bound " << bound << "\n";
          }
          if (ratio == ratio) r.worst_out = std::max(r.worst_out, ratio);
        }
        const std::size_t at = std::size_t((b * c.Hq + h) * c.N + i);
        const double got = lse[at], want = ref_lse[at];
        const double bound = 2e-5 * (1.0 + std::fabs(want)) + shift;
        const bool same_inf = std::isinf(want) && got == want;
        const double ratio = same_inf ? 0.0 : std::isnan(want) ? (std::isnan(got) ? 0.0 : 1e9) : std::fabs(got - want) / bound;
        if (!(ratio <= 1.0) && r.ok) {
          r.ok = false;
          report << "lse(" << b << "," << h << "," << i << "): got " << got << ", want " << want << "\n";
        }
        if (ratio == ratio) r.worst_lse = std::max(r.worst_lse, ratio);
      }
    }
  r.report = report.str();
  for (float x : out) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, 4);
    r.out_bits.push_back(bits);
  }
  return r;
}

// Both emulated kernels on the case.
#define TILE_CHECK_CASE(c)                                                                        \
  for (const flashcpu::detail::KernelTable* kernels_ : kEmulated) {                               \
    const TileCase& tile_case_ = (c);                                                             \
    const Outcome tile_r_ = run_tile_case(*kernels_, tile_case_);                                 \
    INFO(kernels_->name << ": " << tile_case_.describe());                                        \
    INFO(tile_r_.report);                                                                         \
    CHECK(tile_r_.ok);                                                                            \
    if (tile_r_.weights_rounded && tile_case_.input == Input::bf16) CHECK(tile_r_.worst_out <= 0.75); \
    if (tile_case_.input == Input::bf16) CHECK(tile_r_.worst_lse <= 0.1);                         \
  }

const flashcpu::detail::KernelTable* const kEmulated[] = {&flashcpu::detail::emulated_tile_kernels(),
                                                          &flashcpu::detail::emulated_pair_kernels(),
                                                          &flashcpu::detail::emulated_pair_value_kernels()};

}  // namespace

TEST_CASE("bf16 products (emulated AMX, vdpbf16ps): shapes at the edges of the tiles, against the oracle", "[bf16products]") {
  // Rows past 16 (prefill takes N > 16), keys around the 32-key panel, head dims around
  // the 32-dim step, value dims around the 16-column tile.
  for (std::int64_t N : {17, 31, 33, 48})
    for (std::int64_t M : {1, 2, 31, 32, 33, 97})
      for (std::int64_t D : {1, 5, 32, 33, 64}) {
        TileCase c;
        c.N = N;
        c.M = M;
        c.D = D;
        c.Dv = (N + M + D) % 3 == 0 ? 16 : (N + M + D) % 3 == 1 ? 7 : 17;
        c.seed = std::uint32_t(N * 1000 + M * 10 + D);
        TILE_CHECK_CASE(c);
      }
  // Rows longer than the packers' 256-column chunks (kBf16Columns in pack.hpp), with
  // odd lengths, from bf16, fp32 and fp16 sources, contiguous and 2 apart.
  int trial = 0;
  for (std::int64_t D : {257, 300})
    for (Input input : {Input::bf16, Input::f32, Input::f16}) {
      TileCase c;
      c.input = input;
      c.N = 20;
      c.M = 37;
      c.D = D;
      c.Dv = D == 257 ? 300 : 259;
      c.spread = trial++ % 2 == 1;
      c.seed = std::uint32_t(7000 + trial);
      TILE_CHECK_CASE(c);
    }
}

TEST_CASE("bf16 products (emulated AMX, vdpbf16ps): every option they take, GQA, strided views", "[bf16products]") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    TileCase c;
    c.B = 1 + trial % 2;
    c.Hkv = 1 + trial % 2;
    c.Hq = c.Hkv * (1 + trial % 3);
    c.N = std::uniform_int_distribution<std::int64_t>(17, 90)(rng);
    c.M = std::uniform_int_distribution<std::int64_t>(1, 300)(rng);
    c.D = std::vector<std::int64_t>{3, 16, 31, 40, 64, 80}[std::size_t(trial % 6)];
    c.Dv = std::vector<std::int64_t>{1, 16, 19, 33}[std::size_t(trial % 4)];
    c.causal = trial % 3 == 0;
    if (trial % 5 == 1) {
      c.window_left = std::uniform_int_distribution<std::int64_t>(0, 40)(rng);
      c.window_right = trial % 2 ? -1 : std::uniform_int_distribution<std::int64_t>(0, 10)(rng);
    }
    c.key_lengths = trial % 4 == 2;
    c.poison = c.key_lengths && trial % 8 == 2;
    c.mask = trial % 7 == 3;
    c.bool_mask = trial % 6 == 4;
    c.alibi = trial % 5 == 2;
    c.sinks = trial % 4 == 1;
    c.softcap = trial % 9 == 5 ? 3.0f : 0.0f;
    c.strided = trial % 2 == 1;
    c.spread = trial % 4 == 3;
    c.qk_range = trial % 3 == 1 ? 2.5f : 1.0f;  // sharper weights: a wrong key shows
    c.threads = 1 + trial % 3;
    c.seed = std::uint32_t(100 + trial);
    TILE_CHECK_CASE(c);
  }
}

TEST_CASE("bf16 products (emulated AMX, vdpbf16ps): garbage past the key length stays out", "[bf16products]") {
  // NaN keys and NaN / inf values in excluded slots, inside a 32-key chunk that visible
  // keys share: on the tiles the chunk is weighed on the vector units, where a zero weight
  // adds nothing (as in the vector kernels' P.V).
  for (std::uint32_t seed = 1; seed <= 6; ++seed) {
    TileCase c;
    c.B = 3;
    c.N = 40;
    c.M = 70;
    c.D = 32;
    c.Dv = 24;
    c.key_lengths = true;
    c.poison = true;
    c.causal = seed % 2 == 0;
    c.seed = seed;
    TILE_CHECK_CASE(c);
  }
}

TEST_CASE("bf16 products (emulated AMX, vdpbf16ps): garbage in masked slots anywhere", "[bf16products]") {
  // Keys hidden from every row by the bool mask, their K NaN and V NaN / inf, scattered
  // through several key blocks: with pair values their chunks are weighed apart, between
  // runs of clean chunks, and each row's rescaling by alpha must apply once.
  for (std::uint32_t seed = 1; seed <= 8; ++seed) {
    TileCase c;
    c.B = 2;
    c.N = 17 + 9 * seed;
    c.M = 300 + 97 * seed;
    c.D = seed % 2 ? 32 : 19;
    c.Dv = seed % 3 ? 24 : 9;
    c.poison_masked = true;
    c.bool_mask = seed % 4 == 0;
    c.causal = seed % 2 == 0;
    c.qk_range = 2.5f;  // sharp weights: later blocks raise the running max
    c.seed = seed;
    TILE_CHECK_CASE(c);
  }
}

TEST_CASE("bf16 products: scores that jump from one key block to the next, emulated and on AMX", "[bf16products]") {
  // The tiles' softmax weighs a row against its running max before it knows the block's
  // max (Bf16Weights' lazy max) and weighs it again when the sum passes 2^12. Keys scaled
  // by 4 or 1/4 every 200 or 333 keys move the largest score by about 1, 4, 16, 64 and
  // 256 (natural units) from stretch to stretch: rises the lazy weights take (below 2^12),
  // rises that send the row back, one past 2^128 (weights that would overflow without it),
  // and falls, where the running max stays far above. Masks and the causal diagonal make
  // rows partly visible (the usual two passes); sinks join at the end.
  namespace fd = flashcpu::detail;
  std::vector<TileCase> cases;
  for (int trial = 0; trial < 8; ++trial) {
    TileCase c;
    c.N = 40 + 3 * trial;
    c.M = 1100 + 7 * trial;
    c.Hq = 2;
    c.D = trial % 2 ? 32 : 19;
    c.Dv = trial % 3 ? 24 : 33;
    c.key_step = trial % 4 == 3 ? 0.25f : 4.0f;
    c.step_keys = trial % 2 ? 200 : 333;
    c.causal = trial % 4 == 1;
    c.bool_mask = trial == 2;
    c.sinks = trial % 3 == 0;
    c.seed = std::uint32_t(500 + trial);
    cases.push_back(c);
    TILE_CHECK_CASE(c);
  }
  if (fd::active_level() != fd::Isa::amx) {
    WARN("the AMX variant itself: not run (the active level is " << flashcpu::active_isa() << ", not amx)");
    return;
  }
  for (const TileCase& c : cases) {
    const Outcome r = run_tile_case(fd::kernels_for(fd::Isa::amx, fd::DType::bf16), c);
    INFO("amx: " << c.describe());
    INFO(r.report);
    CHECK(r.ok);
    CHECK(r.worst_out <= 0.75);
    CHECK(r.worst_lse <= 0.1);
  }
}

TEST_CASE("bf16 products (emulated AMX, vdpbf16ps): the same bits on any thread count", "[bf16products]") {
  TileCase c;
  c.B = 2;
  c.Hq = 4;
  c.Hkv = 2;
  c.N = 70;
  c.M = 130;
  c.D = 48;
  c.Dv = 20;
  c.causal = true;
  for (const flashcpu::detail::KernelTable* kernels : kEmulated) {
    INFO(kernels->name);
    std::vector<std::vector<std::uint32_t>> outputs;
    for (int threads : {1, 2, 3}) {
      c.threads = threads;
      const Outcome r = run_tile_case(*kernels, c);  // against the oracle, and kept for the bits
      CHECK(r.ok);
      outputs.push_back(r.out_bits);
    }
    CHECK(outputs[0] == outputs[1]);
    CHECK(outputs[0] == outputs[2]);
  }
}

TEST_CASE("bf16 products (emulated AMX, vdpbf16ps): fp32 and fp16 inputs under allow_bf16_compute", "[bf16products]") {
  // The packers round q, k and v to bf16; out keeps the inputs' type. The bound adds the
  // rounding's effect on the scores and the values (run_tile_case).
  std::mt19937 rng(11);
  for (int trial = 0; trial < 24; ++trial) {
    TileCase c;
    c.input = trial % 2 ? Input::f32 : Input::f16;
    c.Hkv = 1 + trial % 2;
    c.Hq = c.Hkv * (1 + trial % 3);
    c.N = std::uniform_int_distribution<std::int64_t>(17, 70)(rng);
    c.M = std::uniform_int_distribution<std::int64_t>(1, 200)(rng);
    c.D = std::vector<std::int64_t>{3, 16, 33, 64}[std::size_t(trial % 4)];
    c.Dv = std::vector<std::int64_t>{1, 16, 21}[std::size_t(trial % 3)];
    c.causal = trial % 3 == 0;
    c.key_lengths = trial % 4 == 2;
    c.poison = c.key_lengths;
    c.mask = trial % 5 == 3;
    c.sinks = trial % 4 == 1;
    c.strided = trial % 2 == 0;
    c.spread = trial % 3 == 1;
    c.seed = std::uint32_t(500 + trial);
    TILE_CHECK_CASE(c);
  }
}

// A decoding case of `N` queries, G query heads per KV head and M keys, with the
// options, shapes and thread counts varied by `trial`; the caller picks D, Dv, the
// layouts and the input type.
namespace {
TileCase decode_case(std::int64_t N, std::int64_t G, std::int64_t M, int trial, std::mt19937& rng) {
  TileCase c;
  c.N = N;
  c.Hkv = 1 + trial % 2;
  c.Hq = c.Hkv * G;
  c.B = 1 + trial % 3 / 2;
  c.M = M;
  c.causal = trial % 3 == 0;
  c.key_lengths = trial % 4 == 1;
  c.poison = c.key_lengths && trial % 8 == 1;
  c.mask = trial % 5 == 2;
  c.bool_mask = trial % 6 == 3;
  c.alibi = trial % 7 == 4;
  c.sinks = trial % 4 == 3;
  c.softcap = trial % 9 == 6 ? 3.0f : 0.0f;
  if (trial % 10 == 7) c.window_left = std::uniform_int_distribution<std::int64_t>(0, M)(rng);
  c.qk_range = trial % 3 == 1 ? 2.5f : 1.0f;
  c.threads = 1 + trial % 3;
  return c;
}
}  // namespace

TEST_CASE("bf16 products (emulated AMX): key blocks weighed in steps of 64 keys, every option, on AMX too",
          "[bf16products]") {
  // A pair of row tiles that sees a whole key block, past its first, takes S and the
  // weights 64 keys at a time (TileForwardKernel::weigh_block_in_steps); the causal
  // diagonal, windows, key lengths, masks and score terms, the last partial block and a
  // pair's first block take the usual path, so each case mixes both. M spans two to four
  // 512-key blocks; rows stack up to 64 (prefill) or 32 and 40 (decoding, G query heads
  // per KV head as rows). On the emulated tiles everywhere, and on the AMX variant where
  // the active level is amx.
  namespace fd = flashcpu::detail;
  std::mt19937 rng(23);
  std::vector<TileCase> cases;
  for (int trial = 0; trial < 14; ++trial) {
    TileCase c;
    c.Hkv = 1 + trial % 2;
    c.Hq = c.Hkv * (1 + trial % 3);
    c.N = std::uniform_int_distribution<std::int64_t>(32, 100)(rng);
    c.M = std::uniform_int_distribution<std::int64_t>(530, 1700)(rng);
    c.D = std::vector<std::int64_t>{32, 19, 64, 128, 5}[std::size_t(trial % 5)];
    c.Dv = std::vector<std::int64_t>{24, 33, 64, 1}[std::size_t(trial % 4)];
    c.causal = trial % 3 == 0;
    if (trial % 5 == 1) c.window_left = std::uniform_int_distribution<std::int64_t>(100, 900)(rng);
    c.key_lengths = trial % 4 == 2;
    c.poison = c.key_lengths;
    c.mask = trial % 7 == 3;
    c.alibi = trial % 6 == 4;
    c.softcap = trial % 9 == 5 ? 3.0f : 0.0f;
    c.sinks = trial % 4 == 1;
    c.strided = trial % 2 == 1;
    c.qk_range = trial % 3 == 1 ? 2.5f : 1.0f;
    c.threads = 1 + trial % 3;
    c.seed = std::uint32_t(700 + trial);
    cases.push_back(c);
  }
  for (int trial = 0; trial < 4; ++trial) {
    TileCase c = decode_case(trial % 2 ? 2 : 1, trial % 2 ? 20 : 32, 1100 + 300 * trial, trial, rng);
    c.D = trial % 2 ? 64 : 33;
    c.Dv = trial % 2 ? 17 : 64;
    c.seed = std::uint32_t(720 + trial);
    cases.push_back(c);
  }
  const bool amx = fd::active_level() == fd::Isa::amx;
  for (const TileCase& c : cases) {
    for (const fd::KernelTable* kernels :
         {&fd::emulated_tile_kernels(), amx ? &fd::kernels_for(fd::Isa::amx, fd::DType::bf16) : nullptr}) {
      if (!kernels) continue;
      const Outcome r = run_tile_case(*kernels, c);
      INFO(kernels->name << ": " << c.describe() << " (" << r.route << ")");
      INFO(r.report);
      CHECK(r.ok);
      CHECK(r.worst_out <= 0.75);
      CHECK(r.worst_lse <= 0.1);
    }
  }
  if (!amx) WARN("the AMX variant itself: not run (the active level is " << flashcpu::active_isa() << ", not amx)");
}

TEST_CASE("bf16 products (emulated AMX): decoding with 16 or more stacked rows per KV head", "[bf16products]") {
  // The decode driver stacks the query heads of a KV head as rows (row r: query r / G of
  // head r % G), splits the keys into chunks of at least 512 and merges the chunks'
  // partial states: M up to 1500 gives up to three chunks, M = 1 and 33 a single one.
  const flashcpu::detail::KernelTable& tiles = flashcpu::detail::emulated_tile_kernels();
  struct Rows {
    std::int64_t N, G;
  };
  const Rows shapes[] = {{1, 16}, {2, 8}, {4, 4}, {3, 6}, {5, 4}, {16, 1}, {1, 17}, {7, 3}};
  std::mt19937 rng(19);
  int trial = 0;
  for (const Rows& rows : shapes)
    for (std::int64_t M : {1, 33, 700, 1500}) {
      TileCase c = decode_case(rows.N, rows.G, M, trial, rng);
      c.D = std::vector<std::int64_t>{64, 5, 33, 128}[std::size_t(trial % 4)];
      c.Dv = std::vector<std::int64_t>{64, 7, 17, 32, 1}[std::size_t(trial % 5)];
      c.strided = trial % 2 == 1;
      c.spread = trial % 5 == 3;
      c.input = trial % 11 == 5 ? Input::f32 : trial % 11 == 8 ? Input::f16 : Input::bf16;
      c.seed = std::uint32_t(900 + trial);
      ++trial;
      const Outcome r = run_tile_case(tiles, c);
      INFO(tiles.name << ": " << c.describe());
      INFO(r.report);
      CHECK(r.ok);
      CHECK(r.weights_rounded);
      if (c.input == Input::bf16) CHECK(r.worst_out <= 0.75);
      if (c.input == Input::bf16) CHECK(r.worst_lse <= 0.1);
    }
}

TEST_CASE("bf16 products (emulated vdpbf16ps): decoding on the small kernel, K rows read in place as pairs",
          "[bf16products]") {
  // The vdpbf16ps variant decodes any number of stacked rows on its small kernel: S from
  // bf16 K rows read in place as 32-bit pairs when D is a multiple of two vectors (8 on
  // the emulated SSE2 vectors: D = 8, 40, 64, 128) and the rows sit on 4-byte boundaries
  // (not with the strided buffers' odd row strides, nor with K starting 2 bytes off a
  // word), else from pair panels packed per block (those, and D = 5, 33, a column stride
  // of 2); P.V from V widened. Chunks of 512 keys and more, merged: M = 1500 gives three.
  // The table with pair values (the form the library dispatches to) takes only the calls
  // whose V it can read in place (bf16_products_take). Which way K went is read from the
  // decode driver's own description of the call.
  namespace fd = flashcpu::detail;
  struct Rows {
    std::int64_t N, G;
  };
  const Rows shapes[] = {{1, 1}, {1, 2}, {1, 4}, {1, 5}, {2, 4}, {4, 4}, {3, 1}, {1, 16}};
  std::mt19937 rng(29);
  int trial = 0, k_in_place = 0, k_packed_words = 0;
  for (const fd::KernelTable* kernels : {&fd::emulated_pair_kernels(), &fd::emulated_pair_value_kernels()})
    for (const Rows& rows : shapes)
      for (std::int64_t M : {1, 33, 700, 1500}) {
        TileCase c = decode_case(rows.N, rows.G, M, trial, rng);
        c.D = std::vector<std::int64_t>{64, 5, 40, 128, 8, 33}[std::size_t(trial % 6)];
        c.Dv = std::vector<std::int64_t>{64, 7, 16, 32, 1}[std::size_t(trial % 5)];
        c.poison_masked = trial % 13 == 6;
        c.strided = trial % 4 == 2;
        c.spread = trial % 7 == 5;
        c.shifted = trial % 8 == 0;
        c.input = trial % 11 == 5 ? Input::f32 : Input::bf16;
        c.seed = std::uint32_t(1300 + trial);
        ++trial;
        // What bf16_products_take asks of V for the table with pair values.
        const bool v_as_stored = !c.spread && c.Dv % 4 == 0 && c.input == Input::bf16;
        if (kernels->pair_values && !v_as_stored) continue;
        const Outcome r = run_tile_case(*kernels, c);
        INFO(kernels->name << ": " << c.describe());
        INFO(r.report);
        INFO(r.route);
        CHECK(r.ok);
        if (c.input == Input::bf16) CHECK(r.worst_lse <= 0.1);
        // K in place exactly where its rows are whole pairs of vectors on 4-byte words.
        const bool words = !c.strided && !c.shifted && !c.spread && c.D % 8 == 0 && c.input == Input::bf16;
        const bool in_place = r.route.find("K in place") != std::string::npos;
        CHECK(r.route.rfind("decode ", 0) == 0);
        CHECK(in_place == words);
        k_in_place += in_place;
        k_packed_words += !in_place && c.shifted && !c.strided && !c.spread && c.D % 8 == 0;
      }
  CHECK(k_in_place >= 10);     // 11 with these seeds
  CHECK(k_packed_words >= 5);  // 6
}

TEST_CASE("bf16 products (emulated vdpbf16ps): K read in place whatever the strides of its size-1 dimensions",
          "[bf16products]") {
  // The word check (bf16 pairs on 4-byte boundaries) looks at the strides the kernel
  // steps by: one batch, one KV head or one key never steps, so an odd stride there is
  // no reason to pack. K: [B, Hkv, M, 64] in one buffer, with stride 777 on a chosen dim.
  namespace fd = flashcpu::detail;
  const fd::KernelTable& kernels = fd::emulated_pair_value_kernels();
  std::vector<bf16> kbuf(40000, flashcpu::to_bf16(0.5f)), vbuf(40000, flashcpu::to_bf16(0.5f)), qbuf(4096);
  std::vector<bf16> obuf(4096);
  struct Layout {
    std::int64_t B, Hkv, M;
    int odd_dim;
    bool in_place;
  };
  const Layout layouts[] = {{1, 2, 100, 0, true},  {2, 2, 100, 0, false}, {2, 1, 100, 1, true},
                            {2, 2, 100, 1, false}, {2, 2, 1, 2, true},    {2, 2, 3, 2, false}};
  for (const Layout& l : layouts) {
    std::array<std::int64_t, 4> strides{2 * l.M * 64 * 2, l.M * 64, 64, 1};
    strides[std::size_t(l.odd_dim)] = 777;
    const flashcpu::TensorView<const bf16> k{kbuf.data(), {l.B, l.Hkv, l.M, 64}, strides};
    const flashcpu::TensorView<const bf16> v{vbuf.data(), {l.B, l.Hkv, l.M, 64}, strides};
    const flashcpu::TensorView<const bf16> q = flashcpu::bhsd(static_cast<const bf16*>(qbuf.data()), l.B, l.Hkv, 1, 64);
    const flashcpu::TensorView<bf16> out = flashcpu::bhsd(obuf.data(), l.B, l.Hkv, 1, 64);
    const fd::AttentionShape s = fd::validate_attention(q, k, v, out, nullptr, flashcpu::AttentionOptions{});
    const fd::Plan plan = fd::make_plan(kernels, s, fd::AnyView::of(v), fd::Transform::none, 0.0f, false);
    const std::string route = fd::describe_decode(plan, fd::AnyView::of(k));
    INFO("B=" << l.B << " Hkv=" << l.Hkv << " M=" << l.M << " stride 777 on dim " << l.odd_dim << ": " << route);
    CHECK((route.find("K in place") != std::string::npos) == l.in_place);
  }
}

TEST_CASE("allow_bf16_compute: fp32 q over a bf16 cache, decoded on the level's choice", "[bf16products]") {
  // Through the public entry point: where the library picks the vdpbf16ps variant (a CPU
  // with AVX512-BF16, or AMX), q is rounded to bf16 and the products are exact, so the
  // result is the oracle's on the rounded q within fp32 arithmetic; elsewhere q stays
  // fp32. The rounding moves scores by ~2^-8 of their size here, far beyond the bound, so
  // each side fails if the other's q were used.
  namespace fd = flashcpu::detail;
  std::mt19937 rng(37);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const std::int64_t D : {128, 64, 40}) {
    const std::int64_t B = 2, Hq = 8, Hkv = 2, N = 1, M = 1100, Dv = D;
    std::vector<float> q(std::size_t(B * Hq * N * D)), kf(std::size_t(B * Hkv * M * D)), vf(std::size_t(B * Hkv * M * Dv));
    std::vector<bf16> k(kf.size()), v(vf.size());
    for (float& x : q) x = u(rng);
    for (std::size_t i = 0; i < kf.size(); ++i) kf[i] = flashcpu::to_float(k[i] = flashcpu::to_bf16(u(rng)));
    for (std::size_t i = 0; i < vf.size(); ++i) vf[i] = flashcpu::to_float(v[i] = flashcpu::to_bf16(u(rng)));
    flashcpu::AttentionOptions o;
    o.allow_bf16_compute = true;
    o.num_threads = 2;
    const auto qv = flashcpu::bhsd<const float>(q.data(), B, Hq, N, D);
    const auto kv = flashcpu::bhsd<const bf16>(k.data(), B, Hkv, M, D);
    const auto vv = flashcpu::bhsd<const bf16>(v.data(), B, Hkv, M, Dv);
    std::vector<float> out(std::size_t(B * Hq * N * Dv)), lse(std::size_t(B * Hq * N));
    flashcpu::attention(qv, kv, vv, flashcpu::bhsd(out.data(), B, Hq, N, Dv), flashcpu::bhsd(lse.data(), B, Hq, N, 1), o);

    const fd::AttentionShape s = fd::validate_attention(qv, kv, vv, flashcpu::bhsd(out.data(), B, Hq, N, Dv), nullptr, o);
    const bool rounded =
        fd::kernels_for_call(s, fd::DType::f32, fd::DType::bf16, fd::AnyView::of(vv), fd::Transform::none).bf16_products;
    std::vector<float> q_seen = q;
    if (rounded)
      for (float& x : q_seen) x = flashcpu::to_float(flashcpu::to_bf16(x));
    std::vector<float> ref(out.size()), ref_lse(lse.size());
    flashcpu::reference::attention(flashcpu::bhsd<const float>(q_seen.data(), B, Hq, N, D),
                                   flashcpu::bhsd<const float>(kf.data(), B, Hkv, M, D),
                                   flashcpu::bhsd<const float>(vf.data(), B, Hkv, M, Dv),
                                   flashcpu::bhsd(ref.data(), B, Hq, N, Dv), flashcpu::bhsd(ref_lse.data(), B, Hq, N, 1), o);
    INFO("D = " << D << ", q rounded: " << rounded);
    // fp32 arithmetic on exact products, |v| <= 1: 2e-5 (as run_tile_case, no 16-bit rounding).
    double worst = 0;
    for (std::size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::fabs(double(out[i]) - ref[i]) / 2e-5);
    for (std::size_t i = 0; i < lse.size(); ++i)
      worst = std::max(worst, std::fabs(double(lse[i]) - ref_lse[i]) / (2e-5 * (1.0 + std::fabs(ref_lse[i]))));
    CHECK(worst <= 1.0);
  }
}

// Two kernels' outputs on one case, each checked against the oracle by run_tile_case,
// and against each other: each is within its bound of the oracle, so they differ by at
// most the sum, u (2 max|v| + |a| + |b|) + 2e-5 with |v| <= 1 here (both bounds at their
// widest: rounded weights and a bf16 output).
void check_same_within_tolerance(const flashcpu::detail::KernelTable& a, const flashcpu::detail::KernelTable& b,
                                 const TileCase& c) {
  const Outcome ra = run_tile_case(a, c), rb = run_tile_case(b, c);
  INFO(a.name << " against " << b.name << ": " << c.describe());
  INFO(ra.report << rb.report);
  REQUIRE(ra.ok);
  REQUIRE(rb.ok);
  const double u = std::ldexp(1.0, -8);
  double worst = 0;
  for (std::size_t i = 0; i < ra.out_bits.size(); ++i) {
    float x, y;
    std::memcpy(&x, &ra.out_bits[i], 4);
    std::memcpy(&y, &rb.out_bits[i], 4);
    if (std::isnan(x) || std::isnan(y)) {
      CHECK(std::isnan(x) == std::isnan(y));
      continue;
    }
    worst = std::max(worst, std::fabs(double(x) - y) / (u * (2.0 + std::fabs(x) + std::fabs(y)) + 2e-5));
  }
  CHECK(worst <= 1.0);
}

TEST_CASE("bf16 products: with AMX capped off, the avx512bf16 kernels give the same results", "[bf16products][fallback]") {
  // The fallback a user gets when AMX is unavailable (no AMX, no tile state, Linux
  // refusing it, FLASHCPU_ISA=avx512bf16): the same attention within the tolerance. On
  // emulated instructions everywhere; on the variants themselves where the active level
  // is amx (the forced run flashcpu_tests_amx on a CPU with AMX).
  namespace fd = flashcpu::detail;
  std::vector<TileCase> cases;
  for (int trial = 0; trial < 6; ++trial) {
    TileCase c;
    c.B = 1 + trial % 2;
    c.Hkv = 2;
    c.Hq = 2 * (1 + trial % 3);
    c.N = 17 + 23 * trial;
    c.M = 40 + 61 * trial;
    c.D = std::vector<std::int64_t>{64, 33, 128, 5, 80, 16}[std::size_t(trial)];
    c.Dv = std::vector<std::int64_t>{64, 17, 128, 7, 48, 1}[std::size_t(trial)];
    c.causal = trial % 2 == 0;
    c.key_lengths = trial % 3 == 1;
    c.poison = c.key_lengths;
    c.sinks = trial % 4 == 3;
    c.seed = std::uint32_t(300 + trial);
    cases.push_back(c);
  }
  for (const TileCase& c : cases) {
    check_same_within_tolerance(fd::emulated_tile_kernels(), fd::emulated_pair_kernels(), c);
    check_same_within_tolerance(fd::emulated_tile_kernels(), fd::emulated_pair_value_kernels(), c);
  }
  if (fd::active_level() != fd::Isa::amx) {
    WARN("the AMX and avx512bf16 variants themselves: not run (the active level is " << flashcpu::active_isa()
                                                                                       << ", not amx)");
    return;
  }
  for (const TileCase& c : cases)
    check_same_within_tolerance(fd::kernels_for(fd::Isa::amx, fd::DType::bf16),
                                fd::kernels_for(fd::Isa::avx512bf16, fd::DType::bf16), c);
}

namespace {

// VDPBF16PS itself on `lanes` (a multiple of 16) lanes, where the CPU has AVX512-BF16.
__attribute__((target("avx512f,avx512bf16"))) void hardware_vdpbf16ps(float* acc, const std::uint32_t* a,
                                                                       const std::uint32_t* b, std::size_t lanes) {
  for (std::size_t i = 0; i < lanes; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_dpbf16_ps(_mm512_loadu_ps(acc + i), (__m512bh)_mm512_loadu_si512(a + i),
                                               (__m512bh)_mm512_loadu_si512(b + i)));
}

// Whether an emulated result is the instruction's: the same bits, or both NaN (payloads
// differ between implementations).
bool same_result(float emulated, float hardware) {
  return (std::isnan(emulated) && std::isnan(hardware)) || std::memcmp(&emulated, &hardware, 4) == 0;
}

// Random bits of a float (bits = 32) or bf16 (bits = 16) value, in the classes the
// instruction treats apart: normals near 1 (their products and sums near 1), normals near
// the bottom of the range (products and sums around the subnormals) and the top (sums
// that overflow), subnormals, zeros, infinities and NaN, each of either sign.
std::uint32_t random_value_bits(std::mt19937& rng, int bits) {
  const int mantissa_bits = bits == 32 ? 23 : 7;
  const std::uint32_t sign = std::uint32_t(rng() & 1u) << (bits - 1), mantissa = rng() & ((1u << mantissa_bits) - 1);
  const unsigned pick = rng() % 100;
  std::uint32_t exponent;
  if (pick < 40)
    exponent = 100 + rng() % 55;  // 2^-27 .. 2^27
  else if (pick < 65)
    exponent = 1 + rng() % 40;  // just above the subnormals
  else if (pick < 70)
    exponent = 200 + rng() % 55;  // 2^73 .. 2^127: products and sums that overflow
  else if (pick < 85)
    return sign | (mantissa | 1u);  // subnormal
  else if (pick < 92)
    return sign;  // zero
  else if (pick < 96)
    return sign | (255u << mantissa_bits);  // infinity
  else
    return sign | (255u << mantissa_bits) | (mantissa | 1u);  // NaN
  return sign | exponent << mantissa_bits | mantissa;
}

}  // namespace

TEST_CASE("emulated vdpbf16ps is bitwise the instruction: rounding, order, subnormals, infinities, NaN", "[bf16products]") {
  // The emulated kernels stand for the avx512bf16 variant on CPUs without AVX512-BF16;
  // here, where the CPU has it, their instruction is checked against it lane by lane:
  // the odd pair's product added first, each sum rounded to fp32, subnormal inputs and
  // sums read and written as zeros of their sign (a sum is flushed when, rounded to 24
  // bits with no bound on the exponent, it is below 2^-126). NaN matches any NaN
  // (payloads differ between implementations). What the emulation does was read off Zen
  // 5 (a standalone probe of the cases below), and Zen 4 agrees; another CPU that differs
  // fails here.
  if (!flashcpu::isa_supported("avx512bf16")) {
    WARN("not run: this CPU has no AVX512-BF16 to compare with");
    return;
  }
  // Fixed lanes first (acc, a, b; the odd bf16 of a pair in the high half): flushes
  // around 2^-126, of the first sum too, and the order of the two products.
  const std::uint32_t fixed[][3] = {
      {0x00800000, 0x1A000000, 0x9A000000},  // 2^-126 - 2^-150: tiny at 24 bits: 0
      {0x00800000, 0x1A000000, 0x99800000},  // 2^-126 - 2^-151: a tie, rounded to 2^-126
      {0x00800000, 0x1A000000, 0x99000000},  // 2^-126 - 2^-152: 2^-126
      {0x00800001, 0x1A000000, 0x9A000000},  // (2^-126 + 2^-149) - 2^-150: a tie, to 2^-126
      {0x00C00000, 0x80800000, 0x3F800000},  // 1.5 2^-126 - 2^-126: a subnormal sum, -> 0
      {0x00C00000, 0x80800080, 0x3F803F80},  // the same, then + 2^-126: 2^-126 (the first sum flushed)
      {0x00400000, 0x00800000, 0x3F800000},  // a subnormal accumulator read as 0: 2^-126
      {0x3F800000, 0x4B80CB80, 0x3F803F80},  // 1 + 2^24 - 2^24: 0 when the odd product comes first
      {0x7F000000, 0x7F000000, 0x40000000},  // 2^127 + 2^128: inf
  };
  constexpr std::size_t kFixed = sizeof(fixed) / sizeof(fixed[0]);
  std::mt19937 rng(4242);
  constexpr std::size_t kLanes = std::size_t(1) << 18;
  std::vector<float> acc(kLanes), emulated(kLanes), hardware(kLanes);
  std::vector<std::uint32_t> a(kLanes), b(kLanes);
  for (std::size_t i = 0; i < kLanes; ++i) {
    const std::uint32_t bits = i < kFixed ? fixed[i][0] : random_value_bits(rng, 32);
    std::memcpy(&acc[i], &bits, 4);
    if (i < kFixed) {
      a[i] = fixed[i][1], b[i] = fixed[i][2];
      continue;
    }
    for (std::uint32_t* x : {&a[i], &b[i]}) {
      const std::uint32_t even = random_value_bits(rng, 16), odd = random_value_bits(rng, 16);
      *x = even | odd << 16;
    }
  }
  emulated = acc;
  hardware = acc;
  flashcpu::detail::emulated_vdpbf16ps(emulated.data(), a.data(), b.data(), kLanes);
  hardware_vdpbf16ps(hardware.data(), a.data(), b.data(), kLanes);
  std::size_t differ = 0, subnormal_inputs = 0, overflowed = 0;
  for (std::size_t i = 0; i < kLanes; ++i) {
    bool finite = std::isfinite(acc[i]);
    for (std::uint32_t half : {a[i] & 0xffffu, a[i] >> 16, b[i] & 0xffffu, b[i] >> 16}) {
      subnormal_inputs += (half & 0x7f80u) == 0 && (half & 0x7fu) != 0;
      finite = finite && (half & 0x7f80u) != 0x7f80u;
    }
    overflowed += finite && std::isinf(hardware[i]);  // finite inputs, a sum beyond fp32
    if (same_result(emulated[i], hardware[i])) continue;
    if (++differ <= 5) {
      std::uint32_t e, h, c;
      std::memcpy(&e, &emulated[i], 4), std::memcpy(&h, &hardware[i], 4), std::memcpy(&c, &acc[i], 4);
      INFO("lane " << i << std::hex << ": acc " << c << ", a " << a[i] << ", b " << b[i] << ": emulated " << e
                   << ", instruction " << h);
      CHECK(false);
    }
  }
  INFO(subnormal_inputs << " subnormal bf16 inputs, " << overflowed << " lanes of finite inputs that came out inf");
  CHECK(differ == 0);
  CHECK(subnormal_inputs > kLanes / 10);  // the cases the emulation had wrong before
  CHECK(overflowed > kLanes / 1000);
}

namespace {

// One TDPBF16PS on the CPU's tiles, where isa_supported("amx") (the OS has granted this
// process the tile state): c (16 x 16 fp32) += a (16 x 32 bf16) . b (16 rows of 16 pairs
// of bf16), every row 64 bytes. The instructions are written out, as the library's
// HardwareTiles writes LDTILECFG: this file is compiled for the baseline.
void hardware_tdpbf16ps(float* c, const std::uint16_t* a, const std::uint16_t* b) {
  alignas(64) unsigned char config[64] = {};
  config[0] = 1;  // palette 1; bytes per row at 16 (16-bit each), rows at 48
  for (int t = 0; t < 3; ++t) {
    config[16 + 2 * t] = 64;
    config[48 + t] = 16;
  }
  const long stride = 64;
  __asm__ volatile("ldtilecfg %0" ::"m"(config));
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm0" ::"r"(c), "r"(stride) : "memory");
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm1" ::"r"(a), "r"(stride) : "memory");
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm2" ::"r"(b), "r"(stride) : "memory");
  __asm__ volatile("tdpbf16ps %%tmm2, %%tmm1, %%tmm0" ::: "memory");  // tmm0 += tmm1 . tmm2
  __asm__ volatile("tilestored %%tmm0, (%0,%1,1)" ::"r"(c), "r"(stride) : "memory");
  __asm__ volatile("tilerelease" ::: "memory");
}

// Products whose result tells the SDM's order and flushes of TDPBF16PS apart from the
// alternatives; one per diagonal element (m = n = its index) of a tile. a and b: the bf16
// bits of pair 0's even and odd elements, then pair 1's; every other pair zero.
struct TileProductCase {
  std::uint32_t c;           // fp32 bits
  std::uint16_t a[4], b[4];  // even0, odd0, even1, odd1
  std::uint32_t expected;    // fp32 bits; 0x7fc00000: any NaN
  const char* what;
};
constexpr std::uint16_t kOne = 0x3F80, kMinusOne = 0xBF80, kTwoTo24 = 0x4B80, kMinusTwoTo24 = 0xCB80;
const TileProductCase kTileProductCases[] = {
    {0x3F800000, {kTwoTo24, 0, kMinusTwoTo24, 0}, {kOne, 0, kOne, 0}, 0x3F800000,
     "1 + (2^24 - 2^24): the products summed apart from C (0 if summed into C)"},
    {0x00000000, {kTwoTo24, kOne, kMinusTwoTo24, 0}, {kOne, kOne, kOne, 0}, 0x3F800000,
     "even chain 2^24 - 2^24, odd chain 1: two chains (0 in one)"},
    {0x4B800000, {kOne, 0, 0, kOne}, {kOne, 0, 0, kOne}, 0x4B800001,
     "2^24 + (1 + 1): the chains added before C (2^24 one at a time)"},
    {0x00400000, {0x2000, 0, 0, 0}, {0x2000, 0, 0, 0}, 0x00800000,
     "C = 2^-127, a subnormal, + 2^-63 2^-63: C read as zero"},
    {0x00000000, {0x0040, 0, 0, 0}, {0x7180, 0, 0, 0}, 0x00000000, "a subnormal bf16 (2^-127) times 2^100: read as zero"},
    {0x00000000, {0x1F80, 0, 0x1F80, 0}, {0x2000, 0, 0x2000, 0}, 0x00000000,
     "2^-64 2^-63 twice: each step's subnormal sum flushed"},
    {0x00000000, {0x00C0, 0x8080, 0, 0}, {kOne, kOne, 0, 0}, 0x00000000,
     "chains 1.5 2^-126 and -2^-126: their subnormal sum flushed"},
    {0x00000000, {0x2000, 0, 0x9A00, 0}, {0x2000, 0, 0x1A00, 0}, 0x00000000,
     "chain 2^-126 - 2^-150: tiny at 24 bits, flushed (fp32's own rounding gives 2^-126)"},
    {0x00000000, {0x2000, 0, 0x9A00, 0}, {0x2000, 0, 0x1980, 0}, 0x00800000,
     "chain 2^-126 - 2^-151: 2^-126 at 24 bits, kept (flushed if tininess came before rounding)"},
    {0x80000000, {kMinusOne, 0, kOne, 0}, {kOne, 0, kOne, 0}, 0x00000000, "-0 + (-1 + 1): +0"},
    {0x7F000000, {0x7F00, 0x7F00, 0, 0}, {kOne, kOne, 0, 0}, 0x7F800000, "2^127 + (2^127 + 2^127): inf"},
    {0x3F800000, {0x7F80, 0, 0, 0}, {0, 0, 0, 0}, 0x7fc00000, "inf times 0: NaN"},
};
constexpr int kTileProductCaseCount = int(sizeof(kTileProductCases) / sizeof(kTileProductCases[0]));
static_assert(kTileProductCaseCount <= 16, "one case per row of a tile");

// The tiles of kTileProductCases: case i at row i of a and c, column i of b.
void fill_tile_product_cases(float* c, std::uint16_t* a, std::uint16_t* b) {
  std::fill(c, c + 256, 0.0f);
  std::fill(a, a + 512, std::uint16_t(0));
  std::fill(b, b + 512, std::uint16_t(0));
  for (int i = 0; i < kTileProductCaseCount; ++i) {
    const TileProductCase& t = kTileProductCases[i];
    std::memcpy(&c[i * 16 + i], &t.c, 4);
    for (int k = 0; k < 2; ++k)
      for (int e = 0; e < 2; ++e) {
        a[i * 32 + 2 * k + e] = t.a[2 * k + e];  // row i, pair k
        b[k * 32 + 2 * i + e] = t.b[2 * k + e];  // pair row k, column i
      }
  }
}

}  // namespace

TEST_CASE("emulated TDPBF16PS follows the SDM: two chains, their sum, then C; subnormals read and written as zero",
          "[bf16products]") {
  // The tile kernel's emulated instruction, on the cases that tell the SDM's order
  // (tiles.hpp) from summing into C, and its flushes from IEEE subnormals. The instruction
  // itself is compared with it below, on a CPU with AMX.
  alignas(64) float c[256];
  alignas(64) std::uint16_t a[512], b[512];
  fill_tile_product_cases(c, a, b);
  flashcpu::detail::emulated_tdpbf16ps(c, a, b);
  for (int i = 0; i < kTileProductCaseCount; ++i) {
    const TileProductCase& t = kTileProductCases[i];
    std::uint32_t got;
    std::memcpy(&got, &c[i * 16 + i], 4);
    INFO(t.what << std::hex << ": got " << got << ", expected " << t.expected);
    if (t.expected == 0x7fc00000u)
      CHECK(std::isnan(c[i * 16 + i]));
    else
      CHECK(got == t.expected);
  }
}

TEST_CASE("emulated TDPBF16PS is bitwise the instruction: order, rounding, subnormals, infinities, NaN",
          "[bf16products]") {
  // The tile kernel's tests on CPUs without AMX run on EmulatedTiles. Here, where the CPU
  // has AMX, the instruction is checked against it element by element: the chosen cases
  // above, then random tiles of three kinds. An element sums 32 products, so values drawn
  // with the specials of random_value_bits would make nearly every element inf or NaN:
  // one tile in 8 draws them (kind 0); half draw finite values of every size (kind 1);
  // the rest draw a and b from 2^-71 to 2^-63 and c zero or near 2^-126 (kind 2), so that
  // the chains' sums cross fp32's smallest normal, where the flushes act. NaN matches any
  // NaN.
  if (!flashcpu::isa_supported("amx")) {
    WARN("not run: this CPU (or OS) offers no AMX tiles to compare with");
    return;
  }
  std::mt19937 rng(2424);
  const auto draw = [&rng](int bits, int kind) -> std::uint32_t {
    if (kind == 2) {
      const std::uint32_t sign = std::uint32_t(rng() & 1u) << (bits - 1);
      if (bits == 16) return sign | (56u + rng() % 9) << 7 | (rng() & 0x7fu);  // 2^-71 .. 2^-63
      return rng() % 2 ? sign : sign | (1u + rng() % 8) << 23 | (rng() & 0x7fffffu);  // 0, or 2^-126 .. 2^-118
    }
    const std::uint32_t all_ones = bits == 32 ? 0x7f800000u : 0x7f80u;
    for (;;) {
      const std::uint32_t x = random_value_bits(rng, bits);
      if (kind == 0 || (x & all_ones) != all_ones) return x;
    }
  };
  constexpr int kTiles = 1024;
  std::size_t differ = 0, compared = 0, finite = 0, zeros = 0, smallest = 0;
  alignas(64) float c[256], emulated[256], hardware[256];
  alignas(64) std::uint16_t a[512], b[512];
  for (int tile = 0; tile < kTiles; ++tile) {
    const int kind = tile % 8 == 0 ? 0 : tile % 8 <= 4 ? 1 : 2;
    if (tile == 0) {
      fill_tile_product_cases(c, a, b);
    } else {
      for (float& x : c) {
        const std::uint32_t bits = draw(32, kind);
        std::memcpy(&x, &bits, 4);
      }
      for (std::uint16_t& x : a) x = std::uint16_t(draw(16, kind));
      for (std::uint16_t& x : b) x = std::uint16_t(draw(16, kind));
    }
    std::copy(c, c + 256, emulated);
    std::copy(c, c + 256, hardware);
    flashcpu::detail::emulated_tdpbf16ps(emulated, a, b);
    hardware_tdpbf16ps(hardware, a, b);
    for (int i = 0; i < 256; ++i, ++compared) {
      finite += kind != 0 && std::isfinite(hardware[i]);
      zeros += kind == 2 && hardware[i] == 0.0f;
      smallest += kind == 2 && hardware[i] != 0.0f && std::fabs(hardware[i]) < 0x1p-124f;
      if (same_result(emulated[i], hardware[i])) continue;
      if (++differ <= 5) {
        std::uint32_t e, h, c0;
        std::memcpy(&e, &emulated[i], 4), std::memcpy(&h, &hardware[i], 4), std::memcpy(&c0, &c[i], 4);
        INFO("tile " << tile << " (kind " << kind << "), element (" << i / 16 << ", " << i % 16 << ")" << std::hex
                     << ": c " << c0 << ": emulated " << e << ", instruction " << h
                     << (tile == 0 && i / 16 == i % 16 && i / 16 < kTileProductCaseCount
                             ? std::string(" (") + kTileProductCases[i / 16].what + ")"
                             : std::string()));
        CHECK(false);
      }
    }
  }
  INFO(compared << " elements compared, " << finite << " of finite inputs with a finite result; from inputs "
                << "around the flush boundary, " << zeros << " zeros and " << smallest << " nonzero below 2^-124");
  CHECK(differ == 0);
  CHECK(finite > compared / 2);
  CHECK(zeros > compared / 50);
  CHECK(smallest > compared / 50);
}

TEST_CASE("bf16 products: which calls the variants take", "[bf16products]") {
  namespace fd = flashcpu::detail;
  const fd::KernelTable& tiles = fd::emulated_tile_kernels();
  const fd::KernelTable& pairs = fd::emulated_pair_kernels();
  const auto shape = [](std::int64_t N, std::int64_t Hq, std::int64_t Hkv) {
    fd::AttentionShape s{};
    s.batch = 1;
    s.q_len = N;
    s.kv_len = 100;
    s.q_heads = Hq;
    s.kv_heads = Hkv;
    s.head_dim = s.value_dim = 64;
    s.score = flashcpu::Score::dot_product;
    return s;
  };
  // V of the shape, contiguous, of type `type`, or with a column stride of 2.
  const auto values = [](const fd::AttentionShape& s, fd::DType type = fd::DType::bf16, std::int64_t column = 1) {
    fd::AnyView v{};
    v.type = type;
    v.shape = {s.batch, s.kv_heads, s.kv_len, s.value_dim};
    v.strides = {s.kv_heads * s.kv_len * s.value_dim * column, s.kv_len * s.value_dim * column,
                 s.value_dim * column, column};
    return v;
  };
  const auto takes = [&](const fd::KernelTable& kernels, const fd::AttentionShape& s,
                         fd::DType q = fd::DType::bf16, fd::Transform t = fd::Transform::none) {
    return fd::bf16_products_take(kernels, s, q, fd::DType::bf16, values(s), t);
  };
  const fd::KernelTable& pair_values = fd::emulated_pair_value_kernels();
  // Prefill: all three.
  CHECK(takes(tiles, shape(17, 1, 1)));
  CHECK(takes(pairs, shape(17, 1, 1)));
  CHECK(takes(pair_values, shape(17, 1, 1)));
  // Decoding: the tiles from 16 stacked rows (query heads per KV head x queries) up.
  CHECK(takes(tiles, shape(4, 32, 8)));
  CHECK(takes(tiles, shape(1, 16, 1)));
  CHECK(takes(tiles, shape(16, 4, 4)));
  CHECK_FALSE(takes(tiles, shape(3, 32, 8)));
  CHECK_FALSE(takes(tiles, shape(1, 32, 8)));
  // The vdpbf16ps variant: any rows, on its small kernel, which reads V as stored. With
  // pair values (the variant the library dispatches to), only a V it can read in place.
  CHECK(takes(pairs, shape(4, 32, 8)));
  CHECK(takes(pairs, shape(1, 1, 1)));
  CHECK(takes(pair_values, shape(4, 32, 8)));
  CHECK(fd::bf16_products_take(pairs, shape(1, 32, 8), fd::DType::bf16, fd::DType::bf16,
                               values(shape(1, 32, 8), fd::DType::bf16, 2), fd::Transform::none));
  CHECK_FALSE(fd::bf16_products_take(pair_values, shape(1, 32, 8), fd::DType::bf16, fd::DType::bf16,
                                     values(shape(1, 32, 8), fd::DType::bf16, 2), fd::Transform::none));
  fd::AttentionShape narrow = shape(1, 32, 8);
  narrow.value_dim = 6;  // not a whole number of the emulated variant's 4-float vectors
  CHECK_FALSE(takes(pair_values, narrow));
  fd::AttentionShape rounded_cache = shape(1, 32, 8);
  rounded_cache.allow_bf16_compute = true;
  CHECK(takes(pair_values, rounded_cache, fd::DType::f32));  // fp32 q over a bf16 cache, rounded
  CHECK_FALSE(fd::bf16_products_take(pair_values, rounded_cache, fd::DType::f32, fd::DType::f32,
                                     values(rounded_cache, fd::DType::f32), fd::Transform::none));
  CHECK_FALSE(takes(pair_values, shape(1, 32, 8), fd::DType::f32));  // without the option
  // Other scores, kernel regression's transforms, fp32 q without the option: not taken.
  fd::AttentionShape gaussian = shape(64, 1, 1);
  gaussian.score = flashcpu::Score::gaussian;
  CHECK_FALSE(takes(tiles, gaussian));
  CHECK_FALSE(takes(tiles, shape(64, 1, 1), fd::DType::bf16, fd::Transform::nw_laplacian));
  CHECK_FALSE(takes(tiles, shape(64, 1, 1), fd::DType::f32));
  fd::AttentionShape allowed = shape(64, 1, 1);
  allowed.allow_bf16_compute = true;
  CHECK(takes(tiles, allowed, fd::DType::f32));

  // The library's choice at the active level (kernels_for_call, which attention() and the
  // benchmark labels use): a level's table for k's type, except that a bf16-product
  // variant hands what it does not take to the level below.
  for (fd::DType k : {fd::DType::f32, fd::DType::bf16, fd::DType::f16}) {
    const fd::KernelTable& level = fd::active_kernels(k);
    const fd::DType q = k == fd::DType::bf16 ? fd::DType::bf16 : k;
    const fd::KernelTable& prefill = fd::kernels_for_call(shape(64, 4, 2), q, k, values(shape(64, 4, 2), k),
                                                          fd::Transform::none);
    const fd::KernelTable& decode = fd::kernels_for_call(shape(1, 32, 8), q, k, values(shape(1, 32, 8), k),
                                                         fd::Transform::none);
    const fd::KernelTable& strided = fd::kernels_for_call(shape(1, 32, 8), q, k, values(shape(1, 32, 8), k, 2),
                                                          fd::Transform::none);
    INFO("k type " << int(k) << ", level " << level.name);
    CHECK(prefill.kv == k);
    CHECK(decode.kv == k);
    CHECK(int(prefill.isa) <= int(fd::active_level()));
    if (!level.bf16_products) {
      CHECK(&prefill == &level);
      CHECK(&decode == &level);
      CHECK(&strided == &level);
    } else {
      CHECK(&prefill == &level);  // bf16 prefill: the bf16-product variant
      // 4 stacked rows: the vdpbf16ps variant's small kernel (at amx, the level below
      // the tiles); with V it cannot read in place, the vector kernels of avx512.
      CHECK(decode.bf16_products);
      CHECK_FALSE(decode.tiles);
      CHECK(decode.isa == fd::Isa::avx512bf16);
      CHECK_FALSE(strided.bf16_products);
    }
  }
}

TEST_CASE("allow_bf16_compute changes nothing where no level with bf16 products runs", "[bf16products]") {
  // Through the public entry point, fp32 in and out: at avx512 and below the option must
  // leave every bit as it is (the exact fp32 kernels run). At amx and avx512bf16 the
  // emulated cases above cover it.
  if (flashcpu::detail::active_kernels(flashcpu::detail::DType::bf16).bf16_products) {
    WARN("the active level has bf16 products: covered by the emulated cases");
    return;
  }
  const std::int64_t B = 1, H = 2, N = 40, M = 70, D = 24;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> q(std::size_t(B * H * N * D)), k(std::size_t(B * H * M * D)), v(k.size());
  for (float& x : q) x = u(rng);
  for (float& x : k) x = u(rng);
  for (float& x : v) x = u(rng);
  std::vector<float> exact(q.size()), allowed(q.size());
  flashcpu::AttentionOptions o;
  o.causal = true;
  flashcpu::attention(flashcpu::bhsd<const float>(q.data(), B, H, N, D), flashcpu::bhsd<const float>(k.data(), B, H, M, D),
                      flashcpu::bhsd<const float>(v.data(), B, H, M, D), flashcpu::bhsd(exact.data(), B, H, N, D), o);
  o.allow_bf16_compute = true;
  flashcpu::attention(flashcpu::bhsd<const float>(q.data(), B, H, N, D), flashcpu::bhsd<const float>(k.data(), B, H, M, D),
                      flashcpu::bhsd<const float>(v.data(), B, H, M, D), flashcpu::bhsd(allowed.data(), B, H, N, D), o);
  CHECK(std::memcmp(exact.data(), allowed.data(), exact.size() * sizeof(float)) == 0);
}
