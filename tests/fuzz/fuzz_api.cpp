// libFuzzer target for the argument checks of every entry point.
//
// Random bytes become shapes, strides (0, huge, overflowing products), options, masks
// and views placed in guarded arenas (PROT_NONE pages on both sides), and then a call of
// one entry point: attention (with and without lse), attention_backward, merge_into,
// nadaraya_watson, reference::attention, reference::attention_backward or
// reference::attention_weights. attention and
// reference::attention also run on 16-bit views of the same bytes (every element-type
// combination the header offers), whose garbage includes 16-bit NaNs and infs. Every call must either raise
// flashcpu::Error, with the outputs bitwise untouched, or compute without reading or
// writing outside its views (the guard pages and AddressSanitizer catch that).
//
// A view whose extent overflows 64-bit indexing is passed anyway: the library must
// reject it. A view that fits 64 bits but not the arena is not a valid input (the
// library cannot know the caller's buffer), so such a case is not called; nor is a valid
// call whose work would take the fuzzer more than a moment.
//
// Built with clang: -fsanitize=fuzzer,address,undefined (tools/run_tests.sh, which runs
// it for a minute on top of the corpus in tests/fuzz/corpus).
#include <flashcpu/flashcpu.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using flashcpu::TensorView;

constexpr std::int64_t kInputFloats = std::int64_t(1) << 20;  // 4 MiB of inputs
constexpr std::int64_t kOutputFloats = std::int64_t(1) << 18;  // 1 MiB of outputs
constexpr double kMaxWork = 2e7;                                // multiply-adds per call

// A float array with an inaccessible page on each side.
class Arena {
 public:
  explicit Arena(std::int64_t floats) : bytes_(std::size_t(floats) * sizeof(float)) {
    const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
    total_ = bytes_ + 2 * page;
    char* base = static_cast<char*>(mmap(nullptr, total_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) std::abort();
    if (mprotect(base + page, bytes_, PROT_READ | PROT_WRITE) != 0) std::abort();
    base_ = base;
    data_ = reinterpret_cast<float*>(base + page);
  }
  float* data() const { return data_; }
  std::int64_t floats() const { return std::int64_t(bytes_ / sizeof(float)); }

 private:
  std::size_t bytes_, total_;
  char* base_;
  float* data_;
};

class Bytes {
 public:
  Bytes(const std::uint8_t* p, std::size_t n) : p_(p), n_(n) {}
  std::uint8_t next() { return i_ < n_ ? p_[i_++] : 0; }
  template <class T, std::size_t K>
  T pick(const T (&table)[K]) {
    return table[next() % K];
  }

 private:
  const std::uint8_t* p_;
  std::size_t n_, i_ = 0;
};

constexpr std::int64_t kBig = std::int64_t(1) << 40;
constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
const std::int64_t kSizes[] = {1, 1, 2, 3, 4, 5, 7, 8, 16, 17, 33, 64, 0, -1, 100, kBig, kMax, 3};
const std::int64_t kStrides[] = {0, 1, 2, 3, 7, 64, 1000, -1, kBig, kMax, kMax / 2, 5};

// The element offset one past the last element of a view, or -1 when it does not fit
// 64 bits (or a size or stride is negative, which the library rejects too).
std::int64_t extent(const std::array<std::int64_t, 4>& shape, const std::array<std::int64_t, 4>& strides) {
  std::int64_t last = 0;
  for (int d = 0; d < 4; ++d) {
    if (shape[d] < 0 || strides[d] < 0) return -1;
    if (shape[d] == 0) return 0;
  }
  for (int d = 0; d < 4; ++d) {
    std::int64_t step = 0;
    if (__builtin_mul_overflow(shape[d] - 1, strides[d], &step) || __builtin_add_overflow(last, step, &last)) return -1;
  }
  return last == kMax ? -1 : last + 1;
}

struct Placement {
  bool ok = true;        // fits the arena (or is invalid and left for the library to reject)
  bool invalid = false;  // the library must reject it
};

// A view of `shape` in `arena` at an offset chosen by the bytes: contiguous, padded, or
// with strides from the table.
template <class T>
TensorView<T> place(Bytes& in, float* arena, std::int64_t floats, std::array<std::int64_t, 4> shape,
                    Placement* placement) {
  std::array<std::int64_t, 4> strides{};
  switch (in.next() % 3) {
    case 0:  // contiguous
    case 1: {  // padded rows
      const std::int64_t pad = in.next() % 2 ? 0 : in.next() % 9;
      std::int64_t s = 1;
      for (int d = 3; d >= 0; --d) {
        strides[d] = s;
        std::int64_t dim = 0;
        if (__builtin_add_overflow(std::max<std::int64_t>(shape[d], 1), d == 3 ? pad : 0, &dim) ||
            __builtin_mul_overflow(s, dim, &s))
          s = kMax;  // saturated: the extent check below overflows and the view is invalid
      }
      break;
    }
    default:
      for (int d = 0; d < 4; ++d) strides[d] = in.pick(kStrides);
  }
  const std::int64_t ext = extent(shape, strides);
  std::int64_t offset = 0;
  if (ext < 0) {
    placement->invalid = true;
  } else if (ext > floats) {
    placement->ok = false;
  } else if (ext < floats) {
    offset = (std::int64_t(in.next()) * 977 + in.next()) % (floats - ext + 1);
  }
  T* data = reinterpret_cast<T*>(arena + offset);
  if (in.next() == 0) data = nullptr;  // a null view: allowed only when empty
  return {data, shape, strides};
}

std::array<std::int64_t, 4> shape4(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) { return {a, b, c, d}; }

// Multiply-adds of a call, roughly: B * Hq * N * M * per_pair (in double: no overflow).
// The same view over elements of type T (strides are in elements, so the view spans
// fewer bytes than the float one it comes from, and fits the same arena).
template <class T, class F>
TensorView<T> as(const TensorView<F>& view) {
  return {reinterpret_cast<T*>(const_cast<std::remove_const_t<F>*>(view.data)), view.shape, view.strides};
}

// attention (entry 0, 1) or reference::attention (4) with q and out of type Q, k and v
// of type KV.
template <class Q, class KV>
void call_typed(int entry, const TensorView<const float>& q, const TensorView<const float>& k,
                const TensorView<const float>& v, const TensorView<float>& out, const TensorView<float>& lse,
                const flashcpu::AttentionOptions& o) {
  const auto q2 = as<const Q>(q);
  const auto k2 = as<const KV>(k), v2 = as<const KV>(v);
  const auto out2 = as<Q>(out);
  if (entry == 0) flashcpu::attention(q2, k2, v2, out2, o);
  if (entry == 1) flashcpu::attention(q2, k2, v2, out2, lse, o);
  if (entry == 4) flashcpu::reference::attention(q2, k2, v2, out2, o);
}

double work(std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t m, double per_pair) {
  return double(std::max<std::int64_t>(b, 0)) * double(std::max<std::int64_t>(h, 0)) *
         double(std::max<std::int64_t>(n, 0)) * double(std::max<std::int64_t>(m, 0)) * std::max(per_pair, 1.0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Arena inputs(kInputFloats), outputs(kOutputFloats);
  static std::vector<float> snapshot = std::vector<float>(std::size_t(kOutputFloats));
  static std::vector<std::int32_t> lengths(64);
  static std::vector<float> per_head(64), per_dim(4096), sinks(64);
  Bytes in(data, size);

  // Inputs: finite values, with a NaN or an inf sometimes (they may propagate; they
  // must not crash).
  const float fill[] = {0.5f, -1.0f, 3.0f, 1e-30f, 1e30f, NAN, INFINITY};
  const float value = in.pick(fill);
  for (std::int64_t i = 0; i < kInputFloats; i += 4099) inputs.data()[i] = value;
  for (std::int64_t i = 0; i < kOutputFloats; ++i) outputs.data()[i] = float(i % 251);

  const std::int64_t B = in.pick(kSizes), Hkv = in.pick(kSizes), G = in.pick(kSizes), N = in.pick(kSizes),
                     M = in.pick(kSizes), D = in.pick(kSizes), Dv = in.pick(kSizes);
  std::int64_t Hq = 0;
  if (__builtin_mul_overflow(Hkv, G, &Hq)) Hq = kMax;
  if (in.next() % 8 == 0) Hq = in.pick(kSizes);  // sometimes not a multiple of Hkv

  // One placement per view: whether it fits its arena, and whether the library must
  // reject it (extent past 64 bits). Views an entry point does not take do not count.
  Placement pq, pk, pv, pout, plse, pmask, pbool;
  float* const ia = inputs.data();
  float* const oa = outputs.data();
  const std::int64_t half = kInputFloats / 4;
  auto q = place<const float>(in, ia, half, shape4(B, Hq, N, D), &pq);
  auto k = place<const float>(in, ia + half, half, shape4(B, Hkv, M, D), &pk);
  auto v = place<const float>(in, ia + 2 * half, half, shape4(B, Hkv, M, Dv), &pv);
  auto out = place<float>(in, oa, kOutputFloats / 2, shape4(B, Hq, N, Dv), &pout);
  auto lse = place<float>(in, oa + kOutputFloats / 2, kOutputFloats / 2, shape4(B, Hq, N, 1), &plse);
  if (in.next() % 16 == 0) out.data = const_cast<float*>(q.data);  // aliasing an input: must be rejected

  flashcpu::AttentionOptions o;
  const std::int64_t windows[] = {-1, -1, 0, 1, 3, 100, -5, kMax};
  const float floats[] = {0.0f, 1.0f, -1.0f, 0.5f, 30.0f, NAN, INFINITY, -INFINITY};
  const std::uint8_t flags = in.next();
  o.causal = flags & 1;
  if (flags & 2) o.scale = in.pick(floats);
  if (flags & 4) o.window_left = in.pick(windows);
  if (flags & 8) o.window_right = in.pick(windows);
  if (flags & 16) o.softcap = in.pick(floats);
  const int threads[] = {0, 1, 2, -1, 3, 64};
  o.num_threads = in.pick(threads);
  const flashcpu::Score scores[] = {flashcpu::Score::dot_product, flashcpu::Score::gaussian, flashcpu::Score::additive,
                                    static_cast<flashcpu::Score>(7)};
  o.score = in.pick(scores);
  if (in.next() % 2 && D >= 0 && D <= std::int64_t(per_dim.size())) {
    for (auto& w : per_dim) w = in.pick(floats);
    o.additive_weights = per_dim.data();
  }
  if (flags & 32 && Hq >= 0 && Hq <= std::int64_t(per_head.size())) {
    for (auto& s : per_head) s = in.pick(floats);
    o.alibi_slopes = per_head.data();
  }
  if (flags & 64 && B >= 0 && B <= std::int64_t(lengths.size())) {
    const std::int32_t choices[] = {0, 1, 5, -3, 1 << 30, std::numeric_limits<std::int32_t>::min()};
    for (auto& l : lengths) l = in.pick(choices);
    o.key_lengths = lengths.data();
  }
  if (flags & 128) {  // a float mask with broadcast dims, somewhere in the inputs
    auto mask_shape = shape4(in.next() % 2 ? 1 : B, in.next() % 2 ? 1 : Hq, in.next() % 2 ? 1 : N, M);
    if (in.next() % 8 == 0) mask_shape[in.next() % 4] = in.pick(kSizes);
    o.mask = place<const float>(in, ia + 3 * half, half, mask_shape, &pmask);
    if (o.mask.data == nullptr) pmask = Placement{};  // null data: the mask is off
  }
  if (in.next() % 4 == 0) {  // a bool mask, its bytes inside the same region
    auto bool_shape = shape4(1, in.next() % 2 ? 1 : Hq, N, M);
    const auto bytes_view = place<const float>(in, ia + 3 * half, half / 4, bool_shape, &pbool);
    o.bool_mask = {reinterpret_cast<const std::uint8_t*>(bytes_view.data), bytes_view.shape, bytes_view.strides};
    if (o.bool_mask.data == nullptr) pbool = Placement{};
  }

  const int entry = in.next() % 6;
  // The views each entry point takes: 0, 1 attention (with lse), 2 merge_into (out, lse,
  // parts shaped like them), 3 nadaraya_watson, 4 reference::attention, 5 weights.
  std::vector<const Placement*> used;
  if (entry != 2) used = {&pq, &pk};
  if (entry <= 1 || entry == 3 || entry == 4) used.push_back(&pv);
  if (entry != 5) used.push_back(&pout);
  if (entry == 1 || entry == 2) used.push_back(&plse);
  if (entry == 0 || entry == 1 || entry >= 4) used.insert(used.end(), {&pmask, &pbool});
  bool fits = true, must_reject = false;
  for (const Placement* u : used) fits = fits && u->ok, must_reject = must_reject || u->invalid;
  if (!fits && !must_reject) return 0;  // fits 64 bits but not our arena: not a valid input
  const double dims = double(std::max(D, Dv)) + (o.score == flashcpu::Score::additive ? 8.0 * double(D) : 0.0);
  const double cost = work(B, Hq, N, M, dims);
  // The fp64 oracles also hold B * Hq * N * M doubles.
  if (!must_reject && (cost > kMaxWork || (entry >= 4 && work(B, Hq, N, M, 1.0) > 1e6))) return 0;

  if (std::getenv("FLASHCPU_FUZZ_VERBOSE"))
    std::fprintf(stderr, "entry %d B=%lld Hq=%lld Hkv=%lld N=%lld M=%lld D=%lld Dv=%lld must_reject=%d\n", entry,
                 (long long)B, (long long)Hq, (long long)Hkv, (long long)N, (long long)M, (long long)D, (long long)Dv,
                 int(must_reject));
  // Attention sinks (NaN and +inf must be rejected), and the element types of attention
  // and reference::attention: 0 fp32, then the 16-bit combinations. Read last, so that
  // earlier bytes keep their meaning in the corpus.
  if (in.next() % 4 == 1 && Hq >= 0 && Hq <= std::int64_t(sinks.size())) {
    for (auto& x : sinks) x = in.pick(floats);
    o.sinks = sinks.data();
  }
  const int types = entry <= 1 || entry == 4 ? in.next() % 5 : 0;
  // The backward, on entry 1's views (out and lse now inputs, holding whatever they
  // hold), plus dout among the inputs and dq, dk, dv in an arena of their own: 0 no,
  // 1 and 2 attention_backward, 3 reference::attention_backward. Read last as well.
  static Arena grads(kOutputFloats);
  static std::vector<float> grads_snapshot = std::vector<float>(std::size_t(kOutputFloats));
  const int backward = entry == 1 && types == 0 ? in.next() % 4 : 0;
  Placement pdout, pdq, pdk, pdv;
  TensorView<const float> dout{};
  TensorView<float> dq{}, dk{}, dv{};
  if (backward) {
    float* const ga = grads.data();
    const std::int64_t third = kOutputFloats / 3;
    dout = place<const float>(in, ia + 3 * half, half, shape4(B, Hq, N, Dv), &pdout);
    dq = place<float>(in, ga, third, shape4(B, Hq, N, D), &pdq);
    dk = place<float>(in, ga + third, third, shape4(B, Hkv, M, D), &pdk);
    dv = place<float>(in, ga + 2 * third, third, shape4(B, Hkv, M, Dv), &pdv);
    for (const Placement* u : {&pdout, &pdq, &pdk, &pdv}) fits = fits && u->ok, must_reject = must_reject || u->invalid;
    if (!fits && !must_reject) return 0;
    if (!must_reject && 3 * cost > kMaxWork) return 0;  // five products and their recomputation
    for (std::int64_t i = 0; i < kOutputFloats; ++i) grads.data()[i] = float(i % 239);
  }
  std::memcpy(grads_snapshot.data(), grads.data(), grads_snapshot.size() * sizeof(float));
  std::memcpy(snapshot.data(), oa, snapshot.size() * sizeof(float));
  bool raised = false;
  try {
    switch (types) {
      case 1: call_typed<flashcpu::bf16, flashcpu::bf16>(entry, q, k, v, out, lse, o); break;
      case 2: call_typed<flashcpu::fp16, flashcpu::fp16>(entry, q, k, v, out, lse, o); break;
      case 3: call_typed<float, flashcpu::bf16>(entry, q, k, v, out, lse, o); break;
      case 4: call_typed<float, flashcpu::fp16>(entry, q, k, v, out, lse, o); break;
      default: break;
    }
    if (types == 0) switch (entry) {
      case 0:
        flashcpu::attention(q, k, v, out, o);
        break;
      case 1:
        if (backward == 0)
          flashcpu::attention(q, k, v, out, lse, o);
        else if (backward < 3)
          flashcpu::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, o);
        else
          flashcpu::reference::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, o);
        break;
      case 2: {  // merge_into: the parts are views of the inputs
        const TensorView<const float> part_lse{v.data, lse.shape, lse.strides};
        flashcpu::merge_into(out, lse, TensorView<const float>{q.data, out.shape, out.strides}, part_lse);
        break;
      }
      case 3: {
        flashcpu::KernelRegressionOptions ko;
        const float bandwidths[] = {1.0f, 0.0f, -1.0f, NAN, INFINITY, 1e-30f};
        ko.bandwidth = in.pick(bandwidths);
        ko.kernel = static_cast<flashcpu::Kernel>(in.next() % 5);
        ko.num_threads = o.num_threads;
        flashcpu::nadaraya_watson(q, k, v, out, ko);
        break;
      }
      case 4:
        flashcpu::reference::attention(q, k, v, out, o);
        break;
      default: {
        const TensorView<float> weights{oa, shape4(B, Hq, N, M), {0, 0, 0, 0}};
        flashcpu::reference::attention_weights(q, k, weights, o);
        break;
      }
    }
  } catch (const flashcpu::Error&) {
    raised = true;
  }
  if (raised && (std::memcmp(snapshot.data(), oa, snapshot.size() * sizeof(float)) != 0 ||
                 std::memcmp(grads_snapshot.data(), grads.data(), grads_snapshot.size() * sizeof(float)) != 0)) {
    std::fprintf(stderr, "flashcpu::Error raised after writing to an output (entry %d)\n", entry);
    std::abort();
  }
  if (must_reject && !raised) {
    const char* names[] = {"q", "k", "v", "out", "lse", "mask", "bool_mask", "dout", "dq", "dk", "dv"};
    const Placement* all[] = {&pq, &pk, &pv, &pout, &plse, &pmask, &pbool, &pdout, &pdq, &pdk, &pdv};
    for (int i = 0; i < 11; ++i)
      if (all[i]->invalid) std::fprintf(stderr, "%s's extent overflows 64 bits\n", names[i]);
    std::fprintf(stderr, "shape B=%lld Hq=%lld Hkv=%lld N=%lld M=%lld D=%lld Dv=%lld\n", (long long)B, (long long)Hq,
                 (long long)Hkv, (long long)N, (long long)M, (long long)D, (long long)Dv);
    auto show = [](const char* name, const auto& view) {
      std::fprintf(stderr, "%s: data %p shape %lld %lld %lld %lld strides %lld %lld %lld %lld\n", name,
                   (const void*)view.data, (long long)view.shape[0], (long long)view.shape[1],
                   (long long)view.shape[2], (long long)view.shape[3], (long long)view.strides[0],
                   (long long)view.strides[1], (long long)view.strides[2], (long long)view.strides[3]);
    };
    show("mask", o.mask);
    show("bool_mask", o.bool_mask);
    std::fprintf(stderr, "a view whose extent overflows 64 bits was accepted (entry %d)\n", entry);
    std::abort();
  }
  return 0;
}
