// Sizes and layouts that inference engines really pass, against the oracle:
//  - an innermost stride other than 1 (every other element) for q, k, v and out, on the
//    prefill, decode and lanes paths;
//  - views whose extent passes 2^31 elements, with rows at offsets past 2^31, for
//    prefill and decode (sparse MAP_NORESERVE buffers: only the rows used are touched);
//  - a sliding window over a KV cache of more than 2^24 keys, through the lanes kernel
//    (it compared key indices as floats, exact only below 2^24);
//  - head dimensions 512 and 576 (DeepSeek-style MLA: D = 576, Dv = 512).
#include <catch2/catch.hpp>

#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention_oracle.hpp"
#include "util.hpp"

namespace {

using namespace oracle;

// A view of `shape` with the given strides over a float buffer of its own.
struct StridedTensor {
  std::vector<float> buf;
  TensorView<float> view;
  StridedTensor(Shape shape, Shape strides, float pad) {
    std::int64_t extent = 1;
    for (int d = 0; d < 4; ++d) extent += (shape[d] - 1) * strides[d];
    buf.assign(std::size_t(extent), pad);
    view = {buf.data(), shape, strides};
  }
  float& at(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t c) {
    return view.data[b * view.strides[0] + h * view.strides[1] + i * view.strides[2] + c * view.strides[3]];
  }
};

// [B, H, S, D] with every element `step` apart: rows of step * D floats.
Shape spaced(const Shape& s, std::int64_t step) {
  return {s[1] * s[2] * s[3] * step, s[2] * s[3] * step, s[3] * step, step};
}

// A sparse anonymous mapping: virtual size only; untouched pages read as zeros and
// cost no memory.
class SparseBuffer {
 public:
  explicit SparseBuffer(std::size_t floats) : bytes_(floats * sizeof(float)) {
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : static_cast<float*>(p);
  }
  ~SparseBuffer() {
    if (data_) munmap(data_, bytes_);
  }
  SparseBuffer(const SparseBuffer&) = delete;
  SparseBuffer& operator=(const SparseBuffer&) = delete;
  float* data() const { return data_; }

 private:
  std::size_t bytes_;
  float* data_;
};

std::string check(const TensorView<const float>& q, const TensorView<const float>& k,
                  const TensorView<const float>& v, const TensorView<float>& out, const AttentionOptions& opt,
                  bool* ok) {
  flashcpu::attention(q, k, v, out, opt);
  const Expected e = expect(q, k, v, opt);
  const Outcome o = compare(e, out, nullptr);
  *ok = o.ok;
  return o.report;
}

}  // namespace

TEST_CASE("innermost strides other than 1 for q, k, v and out, on every path", "[layouts]") {
  // Prefill; decode (split-KV, K packed: D = 17); decode with K rows of whole vectors;
  // 16 stacked rows (the lanes kernel takes contiguous rows only, so strided views send
  // it to the tile kernel: the test checks that choice too).
  const Dims shapes[] = {{1, 4, 2, 37, 150, 24, 17}, {2, 4, 2, 3, 1200, 17, 9}, {1, 8, 2, 2, 900, 32, 16},
                         {1, 16, 1, 1, 700, 32, 16}};
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (const Dims& d : shapes)
    for (int which = 0; which < 5; ++which) {  // 0..3: one of q, k, v, out strided; 4: all
      auto step = [&](int t) -> std::int64_t { return which == 4 || which == t ? 2 : 1; };
      const Shape qs{d.B, d.Hq, d.N, d.D}, ks{d.B, d.Hkv, d.M, d.D}, vs{d.B, d.Hkv, d.M, d.Dv},
          os{d.B, d.Hq, d.N, d.Dv};
      StridedTensor q(qs, spaced(qs, step(0)), kNaN), k(ks, spaced(ks, step(1)), kNaN), v(vs, spaced(vs, step(2)), kNaN),
          out(os, spaced(os, step(3)), kSentinel);
      for (auto* t : {&q, &k, &v})
        for (std::int64_t b = 0; b < t->view.shape[0]; ++b)
          for (std::int64_t h = 0; h < t->view.shape[1]; ++h)
            for (std::int64_t i = 0; i < t->view.shape[2]; ++i)
              for (std::int64_t c = 0; c < t->view.shape[3]; ++c) t->at(b, h, i, c) = uniform(rng);
      for (const bool causal : {false, true}) {
        AttentionOptions opt;
        opt.causal = causal;
        bool ok = false;
        const std::string report = check(q.view, k.view, v.view, out.view, opt, &ok);
        INFO(str(d) << " strided: " << (which == 4 ? "all" : which == 0 ? "q" : which == 1 ? "k" : which == 2 ? "v" : "out")
                    << (causal ? " causal" : "") << " isa=" << flashcpu::active_isa() << "\n"
                    << report);
        CHECK(ok);
        // The elements between the strided ones are never written.
        if (step(3) == 2) {
          bool untouched = true;
          for (std::size_t e = 1; e < out.buf.size(); e += 2) untouched = untouched && out.buf[e] == kSentinel;
          CHECK(untouched);
        }
      }
    }
}

TEST_CASE("views past 2^31 elements, with rows at offsets past 2^31", "[layouts][large]") {
  // Two heads 2^31 + 160 elements apart: the second head of q, k, v and out starts past
  // 2^31 elements (8 GiB), and each view spans more than 2^31. Only the rows used are
  // touched, so the test holds a few MiB.
  const std::int64_t head_stride = (std::int64_t(1) << 31) + 160;
  // Prefill (N = 49: 49 stacked rows), a short prompt and two decoding shapes (the decode driver).
  const Dims shapes[] = {{1, 2, 2, 49, 300, 32, 16},
                         {1, 2, 2, 40, 300, 32, 16},
                         {1, 2, 2, 1, 1500, 32, 16},
                         {1, 2, 2, 3, 800, 17, 9}};
  for (const Dims& d : shapes) {
    const std::size_t floats = std::size_t(head_stride) * 2;
    SparseBuffer qb(floats), kb(floats), vb(floats), ob(floats);
    REQUIRE(qb.data());
    REQUIRE(kb.data());
    REQUIRE(vb.data());
    REQUIRE(ob.data());
    auto view = [&](float* p, std::int64_t s, std::int64_t dim) -> TensorView<float> {
      return {p, {1, 2, s, dim}, {2 * head_stride, head_stride, dim, 1}};
    };
    const TensorView<float> q = view(qb.data(), d.N, d.D), k = view(kb.data(), d.M, d.D),
                            v = view(vb.data(), d.M, d.Dv), out = view(ob.data(), d.N, d.Dv);
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (const TensorView<float>& t : {q, k, v})
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t i = 0; i < t.shape[2]; ++i)
          for (std::int64_t c = 0; c < t.shape[3]; ++c) t.data[h * head_stride + i * t.shape[3] + c] = uniform(rng);
    for (const bool causal : {false, true}) {
      AttentionOptions opt;
      opt.causal = causal;
      bool ok = false;
      const std::string report = check(q, k, v, out, opt, &ok);
      INFO(str(d) << (causal ? " causal" : "") << " head stride 2^31 + 160, isa=" << flashcpu::active_isa() << "\n"
                  << report);
      CHECK(ok);
    }
  }
}

TEST_CASE("a sliding window over more than 2^24 keys, through the lanes kernel", "[layouts][large]") {
  // 16 query heads on one KV head, one query: 16 stacked rows, the lanes kernel on every
  // ISA. The window sees the last 201 keys of 2^24 + 77; everything else is never read.
  const std::int64_t M = (std::int64_t(1) << 24) + 77, D = 16, window = 200;
  SparseBuffer kb(std::size_t(M * D)), vb(std::size_t(M * D));
  REQUIRE(kb.data());
  REQUIRE(vb.data());
  StridedTensor q({1, 16, 1, D}, spaced({1, 16, 1, D}, 1), kNaN), out({1, 16, 1, D}, spaced({1, 16, 1, D}, 1), kSentinel);
  StridedTensor k_small({1, 1, window + 1, D}, spaced({1, 1, window + 1, D}, 1), kNaN),
      v_small({1, 1, window + 1, D}, spaced({1, 1, window + 1, D}, 1), kNaN),
      out_small({1, 16, 1, D}, spaced({1, 16, 1, D}, 1), kSentinel);
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (std::int64_t h = 0; h < 16; ++h)
    for (std::int64_t c = 0; c < D; ++c) q.at(0, h, 0, c) = uniform(rng);
  for (std::int64_t j = 0; j <= window; ++j)
    for (std::int64_t c = 0; c < D; ++c) {
      const float x = uniform(rng), y = uniform(rng);
      kb.data()[(M - 1 - window + j) * D + c] = k_small.at(0, 0, j, c) = x;
      vb.data()[(M - 1 - window + j) * D + c] = v_small.at(0, 0, j, c) = y;
    }
  const TensorView<const float> k{kb.data(), {1, 1, M, D}, {M * D, M * D, D, 1}};
  const TensorView<const float> v{vb.data(), {1, 1, M, D}, {M * D, M * D, D, 1}};
  AttentionOptions opt;
  opt.causal = true;
  opt.window_left = window;
  flashcpu::attention(q.view, k, v, out.view, opt);
  // The same attention over the window's keys alone, checked against the oracle.
  bool ok = false;
  const std::string report = check(q.view, k_small.view, v_small.view, out_small.view, {}, &ok);
  INFO(report);
  REQUIRE(ok);
  double worst = 0, scale = 0;
  for (std::int64_t h = 0; h < 16; ++h)
    for (std::int64_t c = 0; c < D; ++c) {
      worst = std::max(worst, double(std::fabs(out.at(0, h, 0, c) - out_small.at(0, h, 0, c))));
      scale = std::max(scale, double(std::fabs(out_small.at(0, h, 0, c))));
    }
  INFO("isa=" << flashcpu::active_isa() << " max |windowed - small| = " << worst << ", output scale " << scale);
  // Two fp32 evaluations of one softmax over 201 keys (different chunking and blocks):
  // within the oracle tests' accumulation bound, 1e-5 of the values' magnitude.
  CHECK(worst <= 1e-5);
}

TEST_CASE("head dimensions 512 and 576 (MLA), prefill and decode", "[layouts]") {
  const Dims shapes[] = {{1, 2, 1, 33, 70, 576, 512}, {1, 4, 1, 2, 700, 576, 512}, {1, 2, 2, 20, 40, 512, 512},
                         {1, 16, 1, 1, 300, 576, 512}};
  std::uint32_t seed = 600;
  for (const Dims& d : shapes)
    for (const bool causal : {false, true}) {
      Problem p(d, ++seed, Layout::padded, Layout::bhsd, -0.2f, 0.2f);
      if (causal) p.causal();
      CHECK_PROBLEM(p);
    }
}

TEST_CASE("windows wider than the sequence are unbounded, up to INT64_MAX (found by fuzzing)", "[layouts][options]") {
  // window_left = INT64_MAX overflowed the offset i + (M - N) - window (undefined
  // behaviour); any window that reaches past every key on its side now reads as -1.
  const Dims shapes[] = {{1, 2, 1, 40, 70, 16, 8}, {1, 4, 2, 3, 900, 16, 8}};
  for (const Dims& d : shapes)
    for (const bool causal : {false, true})
      for (const std::int64_t wide : {d.M, std::int64_t(1) << 40, std::numeric_limits<std::int64_t>::max()}) {
        Problem wide_p(d, 41), plain(d, 41);
        if (causal) wide_p.causal(), plain.causal();
        wide_p.window(wide, wide);
        flashcpu::attention(wide_p.q.cview(), wide_p.k.cview(), wide_p.v.cview(), wide_p.out.view(), wide_p.opt);
        flashcpu::attention(plain.q.cview(), plain.k.cview(), plain.v.cview(), plain.out.view(), plain.opt);
        INFO(str(d) << (causal ? " causal" : "") << " window " << wide);
        // Bitwise the unbounded call, which the oracle tests check (the test's own double
        // semantics, in attention_oracle.cpp, would overflow on these windows too).
        CHECK(wide_p.out.values() == plain.out.values());
      }
}

TEST_CASE("merge_into of views with no rows returns at once, whatever the batch (found by fuzzing)", "[layouts][merge]") {
  // A batch of 2^40 with zero heads: nothing to merge, and no loop of 2^40 empty steps.
  const std::int64_t B = std::int64_t(1) << 40;
  float one = 1.0f;
  const TensorView<float> out{&one, {B, 0, 1, 1}, {0, 0, 0, 0}}, lse{&one, {B, 0, 1, 1}, {0, 0, 0, 0}};
  flashcpu::merge_into(out, lse, out, lse);  // finishes: the test would time out otherwise
  CHECK(one == 1.0f);
}

TEST_CASE("a size-1 dim's stride may be any value up to INT64_MAX (found by fuzzing)", "[layouts]") {
  // v.strides[0] = 2^62 - 1 on a batch of 1 is a valid view (the stride is never applied),
  // but the check whether V's rows start on 64-byte lines multiplied it by the element
  // size and overflowed (undefined behaviour). The result must equal the plain view's.
  const Dims d{1, 4, 2, 30, 30, 16, 16};  // 60 stacked rows: prefill, which reads V in place
  Problem odd(d, 43, Layout::bhsd, Layout::bhsd), plain(d, 43, Layout::bhsd, Layout::bhsd);
  auto v = odd.v.cview();
  v.strides[0] = std::numeric_limits<std::int64_t>::max() / 2;
  flashcpu::attention(odd.q.cview(), odd.k.cview(), v, odd.out.view(), odd.opt);
  flashcpu::attention(plain.q.cview(), plain.k.cview(), plain.v.cview(), plain.out.view(), plain.opt);
  CHECK(odd.out.values() == plain.out.values());
}

TEST_CASE("one key: the key dimension's stride may be any value up to INT64_MAX on the decode paths", "[layouts]") {
  // With M = 1 the key dimension has size one, so validation leaves its stride unbounded;
  // the decoding prefetch stream multiplied it by the element size (a signed overflow,
  // undefined behaviour, at 2^62) although it never steps it. 4 stacked rows read K in
  // place on tiles, 16 on the lanes kernel (fp32 K, AVX2 and up), 48 past both.
  for (const Dims& d : {Dims{1, 8, 2, 1, 1, 32, 32}, Dims{1, 32, 2, 1, 1, 32, 32}, Dims{2, 48, 1, 1, 1, 16, 16}}) {
    INFO(str(d));
    Problem odd(d, 44, Layout::bhsd, Layout::bhsd), plain(d, 44, Layout::bhsd, Layout::bhsd);
    auto k = odd.k.cview(), v = odd.v.cview();
    k.strides[2] = std::numeric_limits<std::int64_t>::max() / 2;
    v.strides[2] = std::numeric_limits<std::int64_t>::max() / 2 + 1;
    flashcpu::attention(odd.q.cview(), k, v, odd.out.view(), odd.opt);
    flashcpu::attention(plain.q.cview(), plain.k.cview(), plain.v.cview(), plain.out.view(), plain.opt);
    CHECK(odd.out.values() == plain.out.values());
  }
}
