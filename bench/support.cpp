// Problem setup, the OpenBLAS baseline, correctness checks, peak-memory measurement
// and the read-bandwidth probe. See common.hpp for the contracts.
#include "common.hpp"

#include <malloc.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <string>

#include "dispatch.hpp"
#include "kernels/variant_list.hpp"
#include "plan.hpp"
#include "tuning.hpp"

#ifdef FLASHCPU_BENCH_HAVE_OPENBLAS
#include <cblas.h>  // OpenBLAS's own cblas.h: declares openblas_set_num_threads
#endif

namespace flashcpu::bench {

// ---------------------------------------------------------------------------------
// Data types
// ---------------------------------------------------------------------------------

std::size_t elem_bytes(Elem e) { return e == Elem::f32 ? sizeof(float) : sizeof(std::uint16_t); }

const char* elem_name(Elem e) {
  switch (e) {
    case Elem::f32:
      return "fp32";
    case Elem::bf16:
      return "bf16";
    case Elem::fp16:
      return "fp16";
  }
  return "?";
}

namespace {

// The one table of the data types: what each is called and how it stores q/out and K/V.
struct DTypeRow {
  DType type;
  const char* name;
  Elem act, kv;
};
constexpr DTypeRow kDTypeRows[] = {
    {DType::fp32, "fp32", Elem::f32, Elem::f32},
    {DType::bf16, "bf16", Elem::bf16, Elem::bf16},
    {DType::fp16, "fp16", Elem::fp16, Elem::fp16},
    {DType::bf16kv, "bf16kv", Elem::f32, Elem::bf16},
    {DType::fp16kv, "fp16kv", Elem::f32, Elem::fp16},
};

const DTypeRow& row_of(DType t) {
  for (const DTypeRow& r : kDTypeRows)
    if (r.type == t) return r;
  return kDTypeRows[0];
}

// "" for fp32, "bf16" (every tensor), "fp16 K/V" (fp32 q and out): for names and labels.
std::string dtype_text(DType t) {
  const DTypeRow& r = row_of(t);
  if (r.kv == Elem::f32) return "";
  return std::string(elem_name(r.kv)) + (r.act == Elem::f32 ? " K/V" : "");
}

}  // namespace

const char* dtype_name(DType t) { return row_of(t).name; }

bool parse_dtype(const std::string& name, DType* out) {
  for (const DTypeRow& r : kDTypeRows) {
    if (name == r.name) {
      *out = r.type;
      return true;
    }
  }
  return false;
}

Elem act_elem(DType t) { return row_of(t).act; }
Elem kv_elem(DType t) { return row_of(t).kv; }

// ---------------------------------------------------------------------------------
// Shapes and formulas
// ---------------------------------------------------------------------------------

Shape mha(std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t m, std::int64_t d,
          bool causal) {
  return gqa(b, h, h, n, m, d, causal);
}

Shape gqa(std::int64_t b, std::int64_t hq, std::int64_t hkv, std::int64_t n, std::int64_t m,
          std::int64_t d, bool causal) {
  Shape s;
  s.batch = b;
  s.q_heads = hq;
  s.kv_heads = hkv;
  s.n = n;
  s.m = m;
  s.d = d;
  s.dv = d;
  s.causal = causal;
  return s;
}

std::string describe(const Shape& s) {
  std::ostringstream os;
  os << "B=" << s.batch << " Hq=" << s.q_heads << " Hkv=" << s.kv_heads << " N=" << s.n
     << " M=" << s.m << " D=" << s.d;
  if (s.dv != s.d) os << " Dv=" << s.dv;
  if (s.causal) os << " causal";
  if (s.dtype != DType::fp32) os << " " << dtype_text(s.dtype);
  if (s.bf16_compute) os << " allow_bf16_compute";
  return os.str();
}

double visible_pairs(std::int64_t n, std::int64_t m, bool causal) {
  if (!causal) return double(n) * double(m);
  // sum_{i=0}^{n-1} clamp(i + (m - n) + 1, 0, m): closed form over the three ranges
  // would do, but the loop is exact and costs nothing next to a benchmark.
  double pairs = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    pairs += double(std::clamp<std::int64_t>(i + (m - n) + 1, 0, m));
  }
  return pairs;
}

double attention_flops(const Shape& s) {
  return 2.0 * double(s.batch) * double(s.q_heads) * visible_pairs(s.n, s.m, s.causal) *
         double(s.d + s.dv);
}

double kv_bytes(const Shape& s) {
  return double(s.batch) * double(s.kv_heads) * double(s.m) * double(s.d + s.dv) *
         double(elem_bytes(kv_elem(s.dtype)));
}

// ---------------------------------------------------------------------------------
// Buffers and problems
// ---------------------------------------------------------------------------------

void FreeDeleter::operator()(void* p) const noexcept { std::free(p); }

namespace {

void* allocate_bytes(std::size_t bytes) {
  bytes = std::max<std::size_t>(64, (bytes + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) {
    std::fprintf(stderr, "flashcpu bench: cannot allocate %.1f MiB\n", double(bytes) / (1 << 20));
    std::abort();
  }
  return p;
}

}  // namespace

Buffer allocate_floats(std::size_t count) {
  return Buffer(static_cast<float*>(allocate_bytes(count * sizeof(float))));
}

RawBuffer allocate_elems(Elem e, std::size_t count) {
  return RawBuffer(allocate_bytes(count * elem_bytes(e)));
}

float* GrowingBuffer::reserve(std::size_t count) {
  if (count > floats) {
    data.reset();  // free first: old and new need not coexist
    data = allocate_floats(count);
    floats = count;
  }
  return data.get();
}

// ---------------------------------------------------------------------------------
// 16-bit conversions
// ---------------------------------------------------------------------------------

namespace {

std::uint32_t bits_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

float float_of(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// c ? a : b on bits, as a mask. A ?: whose operand is float arithmetic lets GCC move
// that arithmetic into a branch, which it will not turn back into a select (an FP
// operation may trap), and the loop stays scalar.
inline std::uint32_t bit_select(bool c, std::uint32_t a, std::uint32_t b) {
  const std::uint32_t mask = 0u - std::uint32_t(c);
  return (a & mask) | (b & ~mask);
}

// One block of a conversion. The library's conversions (src/convert.cpp) are scalar
// and branch per value: fine where data enters or leaves it, slow for a baseline that
// widens a whole KV cache per call (DEC's 16 Mi K/V values: 42-58 ms through
// to_float(fp16), 5-7 ms here; 1 thread, AMD EPYC, a shared VM). These compute the
// same bits with selects instead of branches, so the loops vectorize; cloned for
// x86-64-v4, v3 and the baseline like softmax_row. tests/test_bench_support.cpp checks
// them against the library: every bf16 and fp16 value, and a sample of floats with
// every rounding tie. They assume the default floating-point environment (round to
// nearest, no flush-to-zero), as the bench has.
#define FLASHCPU_BENCH_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

FLASHCPU_BENCH_CLONES void convert_block(const bf16* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = float_of(std::uint32_t{src[i].bits} << 16);
}

FLASHCPU_BENCH_CLONES void convert_block(const fp16* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t h = src[i].bits, sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
    // Normals: the exponent rebiased by 127 - 15; inf and NaN (exponent 31) rebiased
    // twice, to 255, keeping the NaN payload.
    constexpr std::uint32_t kRebias = (127u - 15u) << 23;
    const std::uint32_t normal = (em << 13) + (em >= 0x7c00u ? 2 * kRebias : kRebias);
    // Zero and subnormals: mantissa * 2^-24, a normal float, so exact.
    const std::uint32_t small = bits_of(float(std::int32_t(em)) * 0x1p-24f);
    dst[i] = float_of(sign | bit_select(em < 0x0400u, small, normal));
  }
}

FLASHCPU_BENCH_CLONES void convert_block(const float* src, bf16* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t u = bits_of(src[i]);
    // Ties to even as in to_bf16; a NaN keeps its top bits and gets the quiet bit, so a
    // payload only in the low half does not become inf.
    const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const std::uint32_t nan = (u >> 16) | 0x0040u;
    dst[i].bits = std::uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  }
}

FLASHCPU_BENCH_CLONES void convert_block(const float* src, fp16* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    // Rounding by one float addition (Marat Dukhan's FP16 library,
    // fp16_ieee_from_fp32_value). base = 4|x| (as |x| * 2^112 * 2^-110, which is inf
    // from 2^16 up) plus 2^(e + 15), e = max(|x|'s exponent, -14): the sum keeps 10
    // bits below 4|x|'s leading bit, so the FPU rounds |x| to fp16 precision, to
    // nearest even, subnormals included. The sum's low 5 exponent bits plus its low 12
    // mantissa bits (|x|'s leading 1 and any carry of the rounding) are then fp16's
    // exponent and mantissa.
    const float x = src[i];
    const std::uint32_t w = bits_of(x), shl1 = w + w, sign = (w >> 16) & 0x8000u;
    std::uint32_t bias = shl1 & 0xff000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    const float base =
        float_of((bias >> 1) + 0x07800000u) + (std::fabs(x) * 0x1p+112f) * 0x1p-110f;
    const std::uint32_t b = bits_of(base);
    const std::uint32_t finite = ((b >> 13) & 0x7c00u) + (b & 0x0fffu);
    // A NaN keeps its payload's top bits with the quiet bit set, as to_fp16 does.
    const std::uint32_t nan = 0x7e00u | ((w >> 13) & 0x3ffu);
    dst[i].bits = std::uint16_t(sign | bit_select(shl1 > 0xff000000u, nan, finite));
  }
}

#undef FLASHCPU_BENCH_CLONES

// Converts count values in blocks spread over an OpenMP team (static: a thread
// converts, and so first touches, the same range every call). 16 Ki values a block:
// one dispatched call per block costs nothing, and a 1 MiB output still splits.
template <class Src, class Dst>
void convert(const Src* src, Dst* dst, std::size_t count, int threads) {
  constexpr std::size_t kBlock = 16384;
  const auto blocks = static_cast<std::int64_t>((count + kBlock - 1) / kBlock);
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads))
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::size_t i = std::size_t(b) * kBlock;
    convert_block(src + i, dst + i, std::min(kBlock, count - i));
  }
}

}  // namespace

void widen(const void* src, Elem e, float* dst, std::size_t count, int threads) {
  switch (e) {
    case Elem::f32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case Elem::bf16:
      convert(static_cast<const bf16*>(src), dst, count, threads);
      return;
    case Elem::fp16:
      convert(static_cast<const fp16*>(src), dst, count, threads);
      return;
  }
}

void narrow(const float* src, Elem e, void* dst, std::size_t count, int threads) {
  switch (e) {
    case Elem::f32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case Elem::bf16:
      convert(src, static_cast<bf16*>(dst), count, threads);
      return;
    case Elem::fp16:
      convert(src, static_cast<fp16*>(dst), count, threads);
      return;
  }
}

// ---------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------

namespace {

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

void fill_uniform(float* p, std::size_t count, std::uint64_t seed) {
  const auto n = static_cast<std::int64_t>(count);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint64_t r = splitmix64(seed * 0x632be59bd9b4e019ULL + std::uint64_t(i));
    p[i] = float(r >> 40) * (2.0f / 16777216.0f) - 1.0f;
  }
}

void fill_zero(float* p, std::size_t count) {
  const auto n = static_cast<std::int64_t>(count);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) p[i] = 0.0f;
}

namespace {

std::size_t count_of(std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) {
  return std::size_t(b) * std::size_t(h) * std::size_t(s) * std::size_t(d);
}

}  // namespace

Problem::Problem(const Shape& s, std::uint64_t seed) : shape(s) {
  q = allocate_floats(q_size());
  k = allocate_floats(k_size());
  v = allocate_floats(v_size());
  out = allocate_floats(out_size());
  fill_uniform(q.get(), q_size(), seed * 3 + 0);
  fill_uniform(k.get(), k_size(), seed * 3 + 1);
  fill_uniform(v.get(), v_size(), seed * 3 + 2);
  fill_zero(out.get(), out_size());
  // A 16-bit tensor: the fp32 values rounded to its type, kept in both buffers.
  auto round = [](Buffer& values, RawBuffer& bits, Elem e, std::size_t count) {
    if (e == Elem::f32) return;
    bits = allocate_elems(e, count);
    narrow(values.get(), e, bits.get(), count);
    widen(bits.get(), e, values.get(), count);
  };
  const Elem act = act_elem(s.dtype), kve = kv_elem(s.dtype);
  round(q, q16, act, q_size());
  round(k, k16, kve, k_size());
  round(v, v16, kve, v_size());
  round(out, out16, act, out_size());
}

TensorView<const float> Problem::qv() const {
  return bhsd<const float>(q.get(), shape.batch, shape.q_heads, shape.n, shape.d);
}
TensorView<const float> Problem::kv() const {
  return bhsd<const float>(k.get(), shape.batch, shape.kv_heads, shape.m, shape.d);
}
TensorView<const float> Problem::vv() const {
  return bhsd<const float>(v.get(), shape.batch, shape.kv_heads, shape.m, shape.dv);
}
TensorView<float> Problem::outv() const {
  return bhsd<float>(out.get(), shape.batch, shape.q_heads, shape.n, shape.dv);
}
std::size_t Problem::q_size() const {
  return count_of(shape.batch, shape.q_heads, shape.n, shape.d);
}
std::size_t Problem::k_size() const {
  return count_of(shape.batch, shape.kv_heads, shape.m, shape.d);
}
std::size_t Problem::v_size() const {
  return count_of(shape.batch, shape.kv_heads, shape.m, shape.dv);
}
std::size_t Problem::out_size() const {
  return count_of(shape.batch, shape.q_heads, shape.n, shape.dv);
}
double Problem::input_bytes() const { return bench::input_bytes(shape); }

namespace {

// Elements of q and out, and of k and v.
double act_count(const Shape& s) {
  return double(count_of(s.batch, s.q_heads, s.n, s.d) + count_of(s.batch, s.q_heads, s.n, s.dv));
}
double kv_count(const Shape& s) {
  return double(count_of(s.batch, s.kv_heads, s.m, s.d) + count_of(s.batch, s.kv_heads, s.m, s.dv));
}

// Elements the dtype stores in 16 bits: those a baseline widens into fp32 copies.
double count16(const Shape& s) {
  return (act_elem(s.dtype) == Elem::f32 ? 0.0 : act_count(s)) +
         (kv_elem(s.dtype) == Elem::f32 ? 0.0 : kv_count(s));
}

}  // namespace

double input_bytes(const Shape& s) {
  return act_count(s) * double(elem_bytes(act_elem(s.dtype))) +
         kv_count(s) * double(elem_bytes(kv_elem(s.dtype)));
}

double resident_bytes(const Shape& s) {
  return (act_count(s) + kv_count(s)) * sizeof(float) + count16(s) * sizeof(std::uint16_t);
}
// ---------------------------------------------------------------------------------
// The OpenBLAS baseline
// ---------------------------------------------------------------------------------

const char* impl_name(Impl impl) {
  switch (impl) {
    case Impl::fused:
      return "fused";
    case Impl::naive:
      return "naive";
    case Impl::openblas:
      return "openblas";
    case Impl::openblas_full:
      return "openblas_full";
    case Impl::reference:
      return "reference";
  }
  return "?";
}

bool have_openblas() {
#ifdef FLASHCPU_BENCH_HAVE_OPENBLAS
  return true;
#else
  return false;
#endif
}

const char* blas_threading_name(BlasThreading t) {
  return t == BlasThreading::heads_parallel ? "heads-parallel" : "blas-threaded";
}

BlasThreading default_blas_threading() {
  const char* env = std::getenv("FLASHCPU_BENCH_BLAS_THREADING");
  if (env != nullptr && std::strcmp(env, "blas") == 0) return BlasThreading::blas_threaded;
  return BlasThreading::heads_parallel;
}

namespace {

// Softmax of one score row in place over its first `visible` entries; the rest (the
// causal mask) become 0, and a row with no visible key is all zeros. Cloned for
// x86-64-v4 (AVX-512), v3 (AVX2+FMA) and the baseline, picked at load time: the
// OpenMP simd reductions let the compiler reassociate the max and the sum.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void softmax_row(
    float* s, std::int64_t m, std::int64_t visible) {
  visible = std::clamp<std::int64_t>(visible, 0, m);
  if (visible > 0) {
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (std::int64_t j = 0; j < visible; ++j) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (std::int64_t j = 0; j < visible; ++j) {
      const float e = exp_nonpositive(s[j] - mx);
      s[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (std::int64_t j = 0; j < visible; ++j) s[j] *= inv;
  }
  for (std::int64_t j = visible; j < m; ++j) s[j] = 0.0f;
}

void require(bool ok, const std::string& what) {
  if (!ok) throw Error("openblas_attention: " + what);
}

}  // namespace

void MaterializedWorkspace::reserve(std::size_t count, std::size_t floats) {
  if (buffers.size() >= count && floats_each >= floats) return;
  buffers.clear();  // free first: old and new need not coexist
  floats_each = std::max(floats_each, floats);
  for (std::size_t i = 0; i < count; ++i) buffers.push_back(allocate_floats(floats_each));
}

namespace {

// How openblas_attention splits its work: items of `rows` query rows, `split` per
// head, and the floats of one score buffer.
struct MaterializedPlan {
  std::int64_t rows = 0, split = 1, items = 0, buffers = 0;
  std::size_t floats = 0;
  bool skip = false;  // causal: each item's keys end at its bottom row's diagonal
};

MaterializedPlan plan_materialized(std::int64_t heads, std::int64_t n, std::int64_t m,
                                   bool causal, bool full_square, int threads,
                                   BlasThreading threading) {
  MaterializedPlan p;
  p.skip = causal && !full_square;
  if (p.skip) {
    p.rows = std::min(n, kCausalSkipRows);
  } else if (threading == BlasThreading::heads_parallel && heads < threads) {
    // Fewer heads than threads (S16K has one): split each head's rows.
    p.rows = (n + (threads + heads - 1) / heads - 1) / ((threads + heads - 1) / heads);
  } else {
    p.rows = n;
  }
  p.rows = std::max<std::int64_t>(p.rows, 1);
  p.split = (n + p.rows - 1) / p.rows;
  p.items = heads * p.split;
  p.buffers = threading == BlasThreading::heads_parallel ? std::min<std::int64_t>(threads, p.items)
                                                         : 1;
  p.floats = std::size_t(p.rows) * std::size_t(m);
  return p;
}

}  // namespace

void openblas_attention(TensorView<const float> q, TensorView<const float> k,
                        TensorView<const float> v, TensorView<float> out,
                        const AttentionOptions& options, bool full_square,
                        BlasThreading threading, MaterializedWorkspace* workspace) {
#ifndef FLASHCPU_BENCH_HAVE_OPENBLAS
  (void)q, (void)k, (void)v, (void)out, (void)options, (void)full_square, (void)threading,
      (void)workspace;
  throw Error("openblas_attention: this build has no OpenBLAS (FLASHCPU_BENCH_HAVE_OPENBLAS)");
#else
  const std::int64_t B = q.shape[0], Hq = q.shape[1], N = q.shape[2], D = q.shape[3];
  const std::int64_t Hkv = k.shape[1], M = k.shape[2], Dv = v.shape[3];
  require(k.shape[0] == B && v.shape[0] == B && out.shape[0] == B, "batch sizes differ");
  require(Hkv > 0 && Hq % Hkv == 0 && v.shape[1] == Hkv && out.shape[1] == Hq,
          "head counts: need Hq % Hkv == 0");
  require(k.shape[3] == D && v.shape[2] == M && out.shape[2] == N && out.shape[3] == Dv,
          "shapes do not match");
  require(q.strides[3] == 1 && k.strides[3] == 1 && v.strides[3] == 1 && out.strides[3] == 1,
          "the last stride of every view must be 1");
  if (B == 0 || Hq == 0 || N == 0 || Dv == 0) return;

  const float scale = options.scale ? *options.scale : 1.0f / std::sqrt(float(D));
  const int threads = resolve_threads(options.num_threads);
  const std::int64_t group = Hq / Hkv, heads = B * Hq;
  const std::int64_t shift = M - N;  // causal: row i sees j <= i + shift
  auto visible = [&](std::int64_t i) {
    return options.causal ? std::clamp<std::int64_t>(i + shift + 1, 0, M) : M;
  };
  const MaterializedPlan plan =
      plan_materialized(heads, N, M, options.causal, full_square, threads, threading);
  MaterializedWorkspace scratch;
  MaterializedWorkspace& ws = workspace != nullptr ? *workspace : scratch;
  ws.reserve(std::size_t(plan.buffers), plan.floats);

  // Rows [r0, r1) of one head: S = scale * Q K^T over keys [0, cols), softmax rows,
  // O = P V. `rows_parallel` spreads the softmax over a team (blas_threaded mode,
  // where the sgemms thread inside OpenBLAS).
  auto block = [&](std::int64_t bh, std::int64_t r0, std::int64_t r1, float* S,
                   bool rows_parallel) {
    const std::int64_t b = bh / Hq, h = bh % Hq, hk = h / group, rows = r1 - r0;
    const std::int64_t cols = plan.skip ? visible(r1 - 1) : M;
    const float* qp = q.data + b * q.strides[0] + h * q.strides[1] + r0 * q.strides[2];
    const float* kp = k.data + b * k.strides[0] + hk * k.strides[1];
    const float* vp = v.data + b * v.strides[0] + hk * v.strides[1];
    float* op = out.data + b * out.strides[0] + h * out.strides[1] + r0 * out.strides[2];
    if (cols == 0) {  // no row of the block sees a key
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t e = 0; e < Dv; ++e) op[i * out.strides[2] + e] = 0.0f;
      return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(cols), int(D), scale, qp,
                int(q.strides[2]), kp, int(k.strides[2]), 0.0f, S, int(cols));
    if (rows_parallel) {
#pragma omp parallel for schedule(static) num_threads(threads)
      for (std::int64_t i = 0; i < rows; ++i)
        softmax_row(S + i * cols, cols, std::min(cols, visible(r0 + i)));
    } else {
      for (std::int64_t i = 0; i < rows; ++i)
        softmax_row(S + i * cols, cols, std::min(cols, visible(r0 + i)));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(Dv), int(cols), 1.0f,
                S, int(cols), vp, int(v.strides[2]), 0.0f, op, int(out.strides[2]));
  };

  if (threading == BlasThreading::heads_parallel) {
    // OpenMP over (head, row block) items, OpenBLAS single-threaded inside each one.
    // Causal-skip items differ in size: dynamic scheduling balances them.
    openblas_set_num_threads(1);
#pragma omp parallel num_threads(int(plan.buffers))
    {
      float* S = ws.buffers[std::size_t(omp_get_thread_num())].get();
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t item = 0; item < plan.items; ++item) {
        const std::int64_t r0 = (item % plan.split) * plan.rows;
        const std::int64_t r1 = std::min(N, r0 + plan.rows);
        block(item / plan.split, r0, r1, S, false);
      }
    }
  } else {
    openblas_set_num_threads(threads);
    for (std::int64_t item = 0; item < plan.items; ++item) {
      const std::int64_t r0 = (item % plan.split) * plan.rows;
      block(item / plan.split, r0, std::min(N, r0 + plan.rows), ws.buffers[0].get(), true);
    }
  }
#endif
}

namespace {

// The fp32 tensors an fp32 baseline runs on: p's own where the dtype stores a tensor in
// fp32; else a copy widened from the 16-bit one into ws (the output: a buffer there,
// rounded by the caller).
struct Fp32Io {
  TensorView<const float> q, k, v;
  TensorView<float> out;
};

Fp32Io widened_io(const Problem& p, MaterializedWorkspace& ws, int threads) {
  Fp32Io io{p.qv(), p.kv(), p.vv(), p.outv()};
  auto widened = [&](const RawBuffer& bits, Elem e, GrowingBuffer& to, std::size_t count) {
    float* f = to.reserve(count);
    widen(bits.get(), e, f, count, threads);
    return f;
  };
  const Elem act = act_elem(p.shape.dtype), kv = kv_elem(p.shape.dtype);
  if (kv != Elem::f32) {
    io.k.data = widened(p.k16, kv, ws.k, p.k_size());
    io.v.data = widened(p.v16, kv, ws.v, p.v_size());
  }
  if (act != Elem::f32) {
    io.q.data = widened(p.q16, act, ws.q, p.q_size());
    io.out.data = ws.out.reserve(p.out_size());
  }
  return io;
}

}  // namespace

void run(Impl impl, Problem& p, int threads, MaterializedWorkspace* workspace,
         BlasThreading blas) {
  AttentionOptions opts;
  opts.causal = p.shape.causal;
  opts.num_threads = threads;
  opts.allow_bf16_compute = p.shape.bf16_compute;  // the oracle ignores it: exact fp64
  if (impl == Impl::fused || impl == Impl::reference) {
    p.visit([&](auto q, auto k, auto v, auto out) {
      if (impl == Impl::fused) {
        attention(q, k, v, out, opts);
      } else {
        reference::attention(q, k, v, out, opts);
      }
    });
    return;
  }
  MaterializedWorkspace scratch;
  MaterializedWorkspace& ws = workspace != nullptr ? *workspace : scratch;
  const Fp32Io io = widened_io(p, ws, threads);
  if (impl == Impl::naive) {
    naive_attention(io.q, io.k, io.v, io.out, opts);
  } else {
    openblas_attention(io.q, io.k, io.v, io.out, opts, impl == Impl::openblas_full, blas, &ws);
  }
  if (p.out16) narrow(io.out.data, act_elem(p.shape.dtype), p.out16.get(), p.out_size(), threads);
}

double analytic_mib(Impl impl, const Shape& s, int threads, BlasThreading t) {
  const double heads = double(s.batch * s.q_heads), n = double(s.n), m = double(s.m);
  const double th = double(resolve_threads(threads));
  constexpr double kMiB = 1 << 20;
  const double widened = count16(s) * sizeof(float);
  switch (impl) {
    case Impl::fused:
      return -1.0;
    case Impl::naive:
      return (std::min(th, heads * n) * m * sizeof(float) + widened) / kMiB;
    case Impl::reference:
      return std::min(th, heads) * n * m * sizeof(double) / kMiB;
    case Impl::openblas:
    case Impl::openblas_full: {
      const MaterializedPlan p = plan_materialized(s.batch * s.q_heads, s.n, s.m, s.causal,
                                                   impl == Impl::openblas_full, int(th), t);
      return (double(p.buffers) * double(p.floats) * sizeof(float) + widened) / kMiB;
    }
  }
  return -1.0;
}

namespace {

namespace fd = flashcpu::detail;

fd::DType dtype_of_elem(Elem e) {
  return e == Elem::bf16 ? fd::DType::bf16 : e == Elem::fp16 ? fd::DType::f16 : fd::DType::f32;
}

// The library's view of a benchmark's call: the dot product, no option but causal.
fd::AttentionShape call_shape(const Shape& s) {
  fd::AttentionShape call{};
  call.batch = s.batch;
  call.q_heads = s.q_heads;
  call.kv_heads = s.kv_heads;
  call.q_len = s.n;
  call.kv_len = s.m;
  call.head_dim = s.d;
  call.value_dim = s.dv;
  call.score = Score::dot_product;
  call.causal = s.causal;
  call.allow_bf16_compute = s.bf16_compute;
  return call;
}

// K or V of the benchmark's problems as the library sees them: contiguous [B, Hkv, M, dim]
// (the layout alone; no data).
fd::AnyView key_side_view(const Shape& s, std::int64_t dim) {
  fd::AnyView v{};
  v.type = dtype_of_elem(kv_elem(s.dtype));
  v.shape = {s.batch, s.kv_heads, s.m, dim};
  v.strides = {s.kv_heads * s.m * dim, s.m * dim, dim, 1};
  return v;
}

// The variant flashcpu::attention picks for this shape (the library's own choice,
// src/plan.cpp): on the amx level, say, bf16 prefill takes the tile kernel and fp32 the
// avx512 one.
const fd::KernelTable& fused_kernels(const Shape& s) {
  return fd::kernels_for_call(call_shape(s), dtype_of_elem(act_elem(s.dtype)), dtype_of_elem(kv_elem(s.dtype)),
                              key_side_view(s, s.dv), fd::Transform::none);
}

}  // namespace

bool fused_runs_on_tiles(const Shape& s) { return fused_kernels(s).tiles; }
bool fused_rounds_to_bf16(const Shape& s) { return s.bf16_compute && fused_kernels(s).bf16_products; }

// The variant attention_backward picks (src/backward.cpp): bf16 data, or any data under
// allow_bf16_compute, on a level with vdpbf16ps takes its pair products, everything else
// an fp32 variant.
const fd::KernelTable& backward_kernels(const Shape& s) {
  return fd::backward_kernels(dtype_of_elem(act_elem(s.dtype)), Score::dot_product, s.bf16_compute);
}
std::string fused_backward_label(const Shape& s) { return backward_kernels(s).backward_name; }
bool backward_pair_products(const Shape& s) { return backward_kernels(s).bf16_products; }

std::string fused_label(const Shape& s) {
  const fd::KernelTable& kernels = fused_kernels(s);
  const fd::AttentionShape call = call_shape(s);
  std::string route;
  if (fd::use_decode_path(call, kernels)) {  // the decode driver: its kernel and key block
    const fd::Plan plan = fd::make_plan(kernels, call, key_side_view(s, s.dv), fd::Transform::none, 0.0f, false);
    route = fd::describe_decode(plan, key_side_view(s, s.d));
  } else {
    const TileConfig t = fd::tiles_for(kernels, s.d);  // the tiles it plans with
    route = "br=" + std::to_string(t.block_rows) + " bc=" + std::to_string(t.block_keys);
  }
  return active_isa() + " " + kernels.name + " " + route;
}

std::string impl_label(Impl impl, const Shape& s) {
  const Elem act = act_elem(s.dtype), kv = kv_elem(s.dtype);
  // The fused kernel and the oracle take the 16-bit types; the baselines widen them.
  const std::string types = s.dtype == DType::fp32 ? "" : ", " + dtype_text(s.dtype);
  const std::string option = s.bf16_compute ? ", allow_bf16_compute" : "";
  std::string widening;
  if (kv != Elem::f32) {
    widening = std::string(act == Elem::f32 ? ", K/V" : ", q/K/V") + " widened from " +
               elem_name(kv);
    if (act != Elem::f32) widening += std::string(", out rounded to ") + elem_name(act);
  }
  switch (impl) {
    case Impl::fused:
      return fused_label(s) + types + option;
    case Impl::naive:
      return "naive fp32 -O3 -march=native" + widening;
    case Impl::openblas:
    case Impl::openblas_full:
      return "openblas " + openblas_info().core + " " +
             blas_threading_name(default_blas_threading()) +
             (s.causal ? (impl == Impl::openblas ? " causal-skip" : " full-square") : "") +
             widening;
    case Impl::reference:
      return "reference (fp64)" + types;
  }
  return "";
}

// ---------------------------------------------------------------------------------
// Correctness
// ---------------------------------------------------------------------------------

Diff compare(const float* a, const float* b, std::size_t count, double atol, double rtol) {
  Diff d;
  for (std::size_t i = 0; i < count; ++i) {
    const double err = std::fabs(double(a[i]) - double(b[i]));
    // A NaN anywhere counts as an infinite error.
    const double excess =
        std::isnan(err) ? INFINITY : err / (atol + rtol * std::fabs(double(b[i])));
    if (excess > d.max_excess) {
      d.max_excess = excess;
      d.worst = i;
      d.a = a[i];
      d.b = b[i];
    }
    d.max_abs = std::max(d.max_abs, std::isnan(err) ? INFINITY : err);
  }
  return d;
}

Diff compare_to_scale(const float* actual, const float* expected, std::size_t count,
                      double rtol, double extra_atol) {
  double scale = 0;
  for (std::size_t i = 0; i < count; ++i) scale = std::max(scale, std::fabs(double(expected[i])));
  // 0/0 (both exactly zero on an all-zero expectation) is a NaN excess, which never
  // counts as worse; any other difference from an all-zero expectation is infinite.
  return compare(actual, expected, count, kRelToScale * scale + extra_atol, rtol);
}

double output_rounding_rtol(DType t) {
  // Twice the unit roundoff: bf16 keeps 8 significant bits, fp16 11.
  switch (act_elem(t)) {
    case Elem::f32:
      return 0.0;
    case Elem::bf16:
      return 0x1p-7;
    case Elem::fp16:
      return 0x1p-10;
  }
  return 0.0;
}

Buffer output_floats(const Problem& p) {
  Buffer f = allocate_floats(p.out_size());
  if (p.out16) {
    widen(p.out16.get(), act_elem(p.shape.dtype), f.get(), p.out_size());
  } else {
    std::memcpy(f.get(), p.out.get(), p.out_size() * sizeof(float));
  }
  return f;
}

double weight_rounding_atol(const Problem& p) {
  const bool all_bf16 = act_elem(p.shape.dtype) == Elem::bf16 && kv_elem(p.shape.dtype) == Elem::bf16;
  if (!all_bf16 && !fused_rounds_to_bf16(p.shape)) return 0.0;
  double vmax = 0;
  for (std::size_t i = 0; i < p.v_size(); ++i) vmax = std::max(vmax, std::fabs(double(p.v[i])));
  return 0x1p-8 * vmax;
}

Diff compare_output(const Problem& p, const float* expected) {
  const Buffer actual = output_floats(p);
  return compare_to_scale(actual.get(), expected, p.out_size(),
                          output_rounding_rtol(p.shape.dtype), weight_rounding_atol(p));
}

namespace {

[[noreturn]] void fail_mismatch(const char* what_a, const char* what_b, const Problem& p,
                                const Diff& d) {
  const Shape& s = p.shape;
  const std::size_t i = d.worst;
  const std::size_t e = i % std::size_t(s.dv), row = i / std::size_t(s.dv);
  const std::size_t n = row % std::size_t(s.n), bh = row / std::size_t(s.n);
  const double rtol = output_rounding_rtol(s.dtype);
  char per_element[128] = "";
  const double weights = weight_rounding_atol(p);
  if (weights > 0) std::snprintf(per_element, sizeof per_element, " + %.1e for the bf16 weights", weights);
  if (rtol > 0)
    std::snprintf(per_element + std::strlen(per_element), sizeof per_element - std::strlen(per_element),
                  " + %.1e of |%s|", rtol, what_b);
  std::fprintf(stderr,
               "\n*** flashcpu bench: OUTPUT MISMATCH %s vs %s on %s\n"
               "*** worst at (b*h=%zu, n=%zu, e=%zu): %s=%.8g %s=%.8g, |diff|=%.3g, "
               "%.3g times the tolerance (%.0e of max|%s|%s)\n"
               "*** the benchmark numbers would be meaningless: aborting.\n",
               what_a, what_b, describe(s).c_str(), bh, n, e, what_a, double(d.a), what_b,
               double(d.b), double(std::fabs(d.a - d.b)), d.max_excess, kRelToScale, what_b,
               per_element);
  std::fflush(stderr);
  std::abort();
}

}  // namespace

void check_against_fused(Impl impl, Problem& p, int threads, MaterializedWorkspace* workspace) {
  if (impl == Impl::fused) return;
  run(Impl::fused, p, threads);
  const Buffer fused_out = output_floats(p);
  run(impl, p, threads, workspace);
  check_output(impl_name(impl), p, "fused", fused_out.get());
}

void check_output(const char* name, const Problem& p, const char* expected_name,
                  const float* expected) {
  const Diff d = compare_output(p, expected);
  if (d.max_excess > 1.0) fail_mismatch(name, expected_name, p, d);
}

Shape reduced(const Shape& s) {
  Shape r = s;
  r.batch = 1;
  r.kv_heads = std::min<std::int64_t>(s.kv_heads, 2);
  r.q_heads = r.kv_heads * (s.q_heads / std::max<std::int64_t>(s.kv_heads, 1));
  constexpr std::int64_t kCap = 160, kShiftCap = 96;
  const std::int64_t shift = std::clamp<std::int64_t>(s.m - s.n, -kShiftCap, kShiftCap);
  r.n = std::min(s.n, kCap);
  r.m = std::max<std::int64_t>(std::min(s.m, r.n + shift), std::min<std::int64_t>(s.m, 1));
  return r;
}

Problem bf16_rounded_copy(const Problem& p) {
  Shape s = p.shape;
  s.dtype = DType::fp32;
  s.bf16_compute = false;
  Problem r(s);
  // From the fp32 buffers, which hold the 16-bit values too.
  auto round_into = [](const Buffer& from, Buffer& to, std::size_t n, bool flush) {
    for (std::size_t i = 0; i < n; ++i) {
      const float x = to_float(to_bf16(from[i]));
      to[i] = flush && std::fabs(x) < std::numeric_limits<float>::min() ? 0.0f : x;
    }
  };
  round_into(p.q, r.q, p.q_size(), true);
  round_into(p.k, r.k, p.k_size(), true);
  round_into(p.v, r.v, p.v_size(), false);
  return r;
}

Buffer reference_output(Impl impl, const Problem& tested, int threads) {
  if (impl == Impl::fused && fused_rounds_to_bf16(tested.shape)) {
    Problem oracle = bf16_rounded_copy(tested);
    run(Impl::reference, oracle, threads);
    return output_floats(oracle);
  }
  // The same inputs, in the same types.
  Problem oracle(tested.shape);
  std::memcpy(oracle.q.get(), tested.q.get(), tested.q_size() * sizeof(float));
  std::memcpy(oracle.k.get(), tested.k.get(), tested.k_size() * sizeof(float));
  std::memcpy(oracle.v.get(), tested.v.get(), tested.v_size() * sizeof(float));
  constexpr std::size_t k16Bytes = 2;  // bf16 and fp16
  if (tested.q16) std::memcpy(oracle.q16.get(), tested.q16.get(), tested.q_size() * k16Bytes);
  if (tested.k16) std::memcpy(oracle.k16.get(), tested.k16.get(), tested.k_size() * k16Bytes);
  if (tested.v16) std::memcpy(oracle.v16.get(), tested.v16.get(), tested.v_size() * k16Bytes);
  run(Impl::reference, oracle, threads);
  return output_floats(oracle);
}

void check_against_reference(Impl impl, const Shape& s, int threads) {
  if (impl == Impl::reference) return;
  if ((impl == Impl::openblas || impl == Impl::openblas_full) && !have_openblas()) return;
  Problem tested(reduced(s));
  run(impl, tested, threads);
  const bool rounded = impl == Impl::fused && fused_rounds_to_bf16(tested.shape);
  check_output(impl_name(impl), tested, rounded ? "reference (fp64, q/k/v rounded to bf16)" : "reference (fp64)",
               reference_output(impl, tested, threads).get());
}

void self_check(bool verbose) {
  std::vector<Shape> shapes = {
      mha(1, 2, 67, 67, 64, false),      // MHA, N and M not tile multiples
      mha(1, 2, 67, 67, 64, true),       // causal, square
      gqa(2, 4, 2, 5, 37, 80, true),     // GQA, causal with N < M, D = 80
      gqa(1, 8, 2, 1, 300, 128),         // decode, GQA
      mha(1, 2, 40, 17, 64, true),       // causal with N > M: the first 23 rows see no key
      mha(1, 1, 45, 60, 64, true),       // one head: OpenBLAS splits its rows over threads
      mha(1, 2, 601, 601, 32, true),     // causal over several skip blocks, a partial last one
      mha(1, 1, 300, 700, 16, true),     // causal N < M across skip blocks
  };
  Shape dv = gqa(1, 4, 1, 33, 70, 64, false);  // MQA, Dv != D
  dv.dv = 48;
  shapes.push_back(dv);
  // Each 16-bit dtype: GQA causal prefill with N < M, and a decode step.
  for (DType t : kDTypes) {
    if (t == DType::fp32) continue;
    for (Shape s : {gqa(1, 4, 2, 37, 70, 64, true), gqa(1, 8, 2, 1, 300, 128)}) {
      s.dtype = t;
      shapes.push_back(s);
    }
  }

  for (const Shape& s : shapes) {
    Problem oracle(s);
    run(Impl::reference, oracle, 0);
    const Buffer expected = output_floats(oracle);
    if (verbose) std::fprintf(stderr, "self-check %-54s", describe(s).c_str());
    for (Impl impl : {Impl::fused, Impl::naive, Impl::openblas, Impl::openblas_full}) {
      if ((impl == Impl::openblas || impl == Impl::openblas_full) && !have_openblas()) continue;
      const std::vector<BlasThreading> modes =
          impl == Impl::openblas || impl == Impl::openblas_full
              ? std::vector<BlasThreading>{BlasThreading::heads_parallel,
                                           BlasThreading::blas_threaded}
              : std::vector<BlasThreading>{BlasThreading::heads_parallel};
      double worst = 0;
      for (BlasThreading t : modes) {
        Problem p(s);
        run(impl, p, 0, nullptr, t);
        const Diff d = compare_output(p, expected.get());
        if (d.max_excess > 1.0) fail_mismatch(impl_name(impl), "reference (fp64)", p, d);
        worst = std::max(worst, d.max_excess);
      }
      if (verbose) std::fprintf(stderr, "  %s %.2f", impl_name(impl), worst);
    }
    if (verbose) std::fprintf(stderr, "  (of the tolerance) ok\n");
  }
}

// ---------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------

double proc_status_mib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::size_t len = std::strlen(field);
  while (std::getline(in, line)) {
    if (line.compare(0, len, field) == 0 && line.size() > len && line[len] == ':') {
      return std::strtod(line.c_str() + len + 1, nullptr) / 1024.0;  // kB -> MiB
    }
  }
  return -1.0;
}

namespace detail {

// glibc serves a large allocation from a fresh mmap only while its size is above the
// mmap threshold, which rises (up to 32 MiB) each time such a block is freed; below
// it, memory comes from an arena, and the free top of a thread's arena stays
// resident (malloc_trim releases only the main arena's top). A measured call could
// then reuse resident pages left by an earlier, different call and show no growth.
// So before the measured call: both thresholds pinned at 128 KiB (every large buffer
// is mapped and faulted in, hence counted), each OpenMP thread frees a 96 KiB block
// into its arena's top, which makes glibc trim that arena down (a free of >= 64 KiB
// merging into the top trims it when the top exceeds the trim threshold), then
// malloc_trim(0) for the main arena and the free lists. Afterwards the thresholds go
// to glibc's steady state after large frees (mmap above 32 MiB, trim above 64 MiB),
// so the timed calls allocate the way an untouched process settles to.
double begin_peak_measure() {
  mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  mallopt(M_TRIM_THRESHOLD, 128 * 1024);
  const int team = std::max(omp_get_max_threads(), omp_get_num_procs());
#pragma omp parallel num_threads(team)
  {
    void* p = std::malloc(96 * 1024);
    if (p != nullptr) static_cast<volatile char*>(p)[0] = 0;
    std::free(p);
  }
  malloc_trim(0);
  const double rss = proc_status_mib("VmRSS");
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5" << std::flush;
  if (!clear || rss < 0) return -1.0;
  return rss;
}

double end_peak_measure(double rss_before) {
  const double hwm = proc_status_mib("VmHWM");
  mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
  mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);
  if (rss_before < 0 || hwm < 0) return -1.0;
  return std::max(0.0, hwm - rss_before);
}

}  // namespace detail

// ---------------------------------------------------------------------------------
// Probes and small helpers
// ---------------------------------------------------------------------------------

int resolve_threads(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }

double median(std::vector<double> xs) {
  if (xs.empty()) return 0.0;
  std::sort(xs.begin(), xs.end());
  const std::size_t n = xs.size();
  return n % 2 ? xs[n / 2] : 0.5 * (xs[n / 2 - 1] + xs[n / 2]);
}

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

namespace {

// Best of `passes` timed sums over p[0, n), each thread its static share (the same
// split that first-touched it), in GB/s.
double read_passes_gbps(const std::uint64_t* p, std::int64_t n, int threads, int passes) {
  double best = 0;
  std::uint64_t sink = 0;
  for (int pass = 0; pass < passes; ++pass) {
    std::uint64_t sum = 0;
    const double t0 = now_seconds();
    // Integer sums are associative, so this vectorizes without fast-math.
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : sum)
    for (std::int64_t i = 0; i < n; ++i) sum += p[i];
    const double dt = now_seconds() - t0;
    sink += sum;
    best = std::max(best, double(n) * sizeof(std::uint64_t) / dt * 1e-9);
  }
  // Keep the sums alive: an empty asm that takes the value as an input cannot be dropped,
  // where a call with no effect (fputs of "") can.
  asm volatile("" : : "r"(sink));
  return best;
}

// A buffer of n words, first-touched by `threads` threads in static shares; null
// when the allocation fails. Freed with std::free.
std::uint64_t* touched_words(std::int64_t n, int threads) {
  auto* p = static_cast<std::uint64_t*>(std::aligned_alloc(64, std::size_t(n) * 8));
  if (p == nullptr) return nullptr;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t i = 0; i < n; ++i) p[i] = std::uint64_t(i);
  return p;
}

}  // namespace

void read_through(const Problem& p, int threads) {
  threads = resolve_threads(threads);
  const Elem act = act_elem(p.shape.dtype), kve = kv_elem(p.shape.dtype);
  auto read = [threads](const void* data, std::size_t bytes) {
    if (data != nullptr)
      read_passes_gbps(static_cast<const std::uint64_t*>(data), std::int64_t(bytes / sizeof(std::uint64_t)), threads, 1);
  };
  read(p.q.get(), p.q_size() * sizeof(float));
  read(p.k.get(), p.k_size() * sizeof(float));
  read(p.v.get(), p.v_size() * sizeof(float));
  read(p.out.get(), p.out_size() * sizeof(float));
  read(p.q16.get(), p.q_size() * elem_bytes(act));
  read(p.k16.get(), p.k_size() * elem_bytes(kve));
  read(p.v16.get(), p.v_size() * elem_bytes(kve));
  read(p.out16.get(), p.out_size() * elem_bytes(act));
}

double measure_read_gbps(int threads, std::size_t bytes, int passes) {
  threads = resolve_threads(threads);
  const auto n = static_cast<std::int64_t>(bytes / sizeof(std::uint64_t));
  std::uint64_t* p = touched_words(n, threads);
  if (p == nullptr) return 0.0;
  const double gbps = read_passes_gbps(p, n, threads, passes);
  std::free(p);
  return gbps;
}

namespace {

struct PeakCache {
  std::mutex mu;
  std::map<int, std::pair<double, std::string>> fma;
  std::map<int, double> bw;
  std::map<int, double> amx;
};
PeakCache& cache() {
  static PeakCache c;
  return c;
}

std::pair<double, std::string> fma_entry(int threads) {
  threads = resolve_threads(threads);
  PeakCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.fma.find(threads);
  if (it != c.fma.end()) return it->second;
  std::pair<double, std::string> best{0.0, "none"};
  for (const char* isa : flashcpu::variant_list::kLevels) {  // levels without a probe measure 0
    // Best of four 50 ms windows: a neighbour on the shared VM only ever lowers the
    // figure, and a short window is more likely to find both cores free.
    double g = 0;
    for (int w = 0; w < 4; ++w) g = std::max(g, measure_fma_gflops(isa, threads, 0.05));
    if (g > best.first) best = {g, isa};
  }
  c.fma[threads] = best;
  return best;
}

}  // namespace

double fma_peak_gflops(int threads) { return fma_entry(threads).first; }
std::string fma_peak_isa(int threads) { return fma_entry(threads).second; }

// The figure of `entries` for this thread count, measured on first use.
template <class Measure>
double cached_probe(std::map<int, double> PeakCache::*entries, int threads, Measure measure) {
  threads = resolve_threads(threads);
  PeakCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = (c.*entries).find(threads);
  if (it != (c.*entries).end()) return it->second;
  return (c.*entries)[threads] = measure(threads);
}

double read_bandwidth_gbps(int threads) {
  return cached_probe(&PeakCache::bw, threads, [](int t) { return measure_read_gbps(t); });
}

double amx_peak_gflops(int threads) {
  return cached_probe(&PeakCache::amx, threads, [](int t) {
    double g = 0;  // best of four 50 ms windows, as the FMA peak
    for (int w = 0; w < 4; ++w) g = std::max(g, measure_amx_gflops(t, 0.05));
    return g;
  });
}

double amx_probe_now(int threads) {
  double best = 0;
  for (int w = 0; w < 3; ++w) best = std::max(best, measure_amx_gflops(threads, 0.02));
  return best;
}

double fma_probe_now(int threads) {
  const std::string isa = fma_peak_isa(threads);
  double best = 0;
  for (int w = 0; w < 3; ++w) best = std::max(best, measure_fma_gflops(isa, threads, 0.02));
  return best;
}

double read_probe_now(int threads) {
  threads = resolve_threads(threads);
  // One buffer for the process, touched once, so a probe costs two passes and no
  // allocation. Touched by the thread count of the first probe.
  static const std::int64_t n = std::int64_t((std::size_t(512) << 20) / sizeof(std::uint64_t));
  static const std::uint64_t* buffer = touched_words(n, threads);
  return buffer == nullptr ? 0.0 : read_passes_gbps(buffer, n, threads, 2);
}

}  // namespace flashcpu::bench
