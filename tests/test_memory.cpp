// Working memory stays bounded across calls: the scratch of a call goes back when it
// returns. 100 calls of mixed shapes (prefill and decode, M up to 16384, so the larger
// scratch is several MiB) must leave the process's resident memory within a few MiB of
// where the first calls left it. Through malloc, glibc's adaptive mmap threshold kept
// such scratch on the heap: 21.5 MiB after these calls, 113 MiB after 20 calls at
// N = M = 16384 (see src/attention.cpp, AlignedBuffer).
#include <catch2/catch.hpp>

#include <flashcpu/flashcpu.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "scratch.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define FTEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FTEST_ASAN 1
#endif
#endif

namespace {

double resident_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return -1.0;
}

}  // namespace

TEST_CASE("resident memory stays bounded over 100 calls of mixed sizes", "[memory]") {
#ifdef FTEST_ASAN
  WARN("not run under AddressSanitizer: its allocator quarantines freed memory, so RSS says nothing");
  return;
#else
  const std::int64_t D = 64, max_n = 4096, max_m = 16384;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> q(std::size_t(2 * max_n * D)), k(std::size_t(max_m * D)), v(std::size_t(max_m * D)),
      out(std::size_t(2 * max_n * D), 0.0f);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = uniform(rng);
  auto call = [&](int c) {
    // Prefill (N in 17..4012; call 0, N = 17 with two query heads on one KV head, is a
    // short prompt on the decode driver), decode (N in 1..16), and mid-sized prefill; M
    // from 1000 to 16383.
    const std::int64_t n = c % 3 == 0 ? 17 + c * 37 % 3996 : c % 3 == 1 ? 1 + c % 16 : 300;
    const std::int64_t m = 1000 + (c * 7919) % (max_m - 1000);
    flashcpu::AttentionOptions options;
    options.causal = c % 2 == 0;
    flashcpu::attention(flashcpu::bhsd<const float>(q.data(), 1, 2, n, D),
                        flashcpu::bhsd<const float>(k.data(), 1, 1, m, D),
                        flashcpu::bhsd<const float>(v.data(), 1, 1, m, D), flashcpu::bhsd(out.data(), 1, 2, n, D),
                        options);
  };
  for (int c = 0; c < 3; ++c) call(c);  // OpenMP's threads and their stacks exist from here
  const double settled = resident_mib();
  REQUIRE(settled > 0);
  for (int c = 3; c < 100; ++c) call(c);
  const double after = resident_mib();
  INFO("resident after 3 calls " << settled << " MiB, after 100 calls " << after << " MiB");
  // The largest call's scratch is about 8 MiB per thread (a packed K and V head); a bound of 4 MiB fails if
  // even one thread's scratch stays resident.
  CHECK(after - settled < 4.0);
#endif
}

TEST_CASE("huge stride-0 views whose working memory cannot exist raise std::bad_alloc, and write nothing",
          "[memory][overflow]") {
  // Valid calls: q, k and v of stride 0 may be far larger than memory. Their scratch
  // (packed K panels, packed Q rows) cannot be allocated; before its sizes saturated,
  // K's panels for M = 2^31 - 1 keys of D = 2^32 (M D just under 2^63, rounded up to
  // whole panels: over it) wrapped to a small buffer and the call crashed.
  struct Huge {
    const char* what;
    std::int64_t Hq, N, M, D;
  };
  const Huge cases[] = {
      {"decoding, D = 2^47", 1, 1, 4, std::int64_t(1) << 47},
      {"prefill, D = 2^47", 1, 100, 4, std::int64_t(1) << 47},
      {"prefill, K panels over 2^63 floats (M = 2^31 - 1, D = 2^32)", 1, 100, (std::int64_t(1) << 31) - 1,
       std::int64_t(1) << 32},
      {"decoding 2^20 stacked rows of D = 2^30", std::int64_t(1) << 20, 1, 4, std::int64_t(1) << 30},
      {"decoding, packed Q rows over 2^63 floats (2^15 - 1 stacked rows of D = 2^48)", (std::int64_t(1) << 15) - 1, 1,
       4, std::int64_t(1) << 48},
      {"D = 2^48, the largest size", 1, 1, 4, std::int64_t(1) << 48},
  };
  for (const Huge& c : cases) {
    INFO(c.what);
    const float q = 0.5f, k = 0.25f, v = 1.0f;
    std::vector<float> out(std::size_t(c.Hq * c.N), -7.0f), lse(std::size_t(c.Hq * c.N), -7.0f);
    const flashcpu::TensorView<const float> qv{&q, {1, c.Hq, c.N, c.D}, {0, 0, 0, 0}};
    const flashcpu::TensorView<const float> kv{&k, {1, 1, c.M, c.D}, {0, 0, 0, 0}};
    const flashcpu::TensorView<const float> vv{&v, {1, 1, c.M, 1}, {0, 0, 0, 0}};
    const flashcpu::TensorView<float> ov{out.data(), {1, c.Hq, c.N, 1}, {c.Hq * c.N, c.N, 1, 1}};
    const flashcpu::TensorView<float> lv{lse.data(), {1, c.Hq, c.N, 1}, {c.Hq * c.N, c.N, 1, 1}};
    CHECK_THROWS_AS(flashcpu::attention(qv, kv, vv, ov, lv), std::bad_alloc);
    bool untouched = true;
    for (std::size_t i = 0; i < out.size(); ++i) untouched = untouched && out[i] == -7.0f && lse[i] == -7.0f;
    CHECK(untouched);
  }
#ifndef FTEST_ASAN  // AddressSanitizer ends the process on so large a malloc instead of failing it
  // The oracle's N x M matrix (and the regression's M weights) for 2^48 keys of stride 0,
  // past any address space (so no overcommit setting lets the allocation succeed): its
  // buffers are allocated before its parallel regions, where a std::bad_alloc used to
  // end the process.
  const std::int64_t M = std::int64_t(1) << 48;
  const float x = 0.5f;
  std::vector<float> out(100, -7.0f);
  const flashcpu::TensorView<const float> q{&x, {1, 1, 100, 1}, {0, 0, 0, 0}};
  const flashcpu::TensorView<const float> k{&x, {1, 1, M, 1}, {0, 0, 0, 0}};
  const flashcpu::TensorView<float> o{out.data(), {1, 1, 100, 1}, {100, 100, 1, 1}};
  CHECK_THROWS_AS(flashcpu::reference::attention(q, k, k, o), std::bad_alloc);
  CHECK_THROWS_AS(flashcpu::reference::nadaraya_watson(q, k, k, o), std::bad_alloc);
  CHECK(std::count(out.begin(), out.end(), -7.0f) == 100);
#endif
}

namespace {

// One attention call on stride-0 q, k and v of head dimension D (each a single zero), with
// small real out and lse; what it raised, and whether out and lse are untouched.
template <class Q, class KV>
std::string huge_call(std::int64_t Hq, std::int64_t Hkv, std::int64_t N, std::int64_t M, std::int64_t D,
                      const flashcpu::AttentionOptions& options, bool* untouched) {
  const Q q{};
  const KV k{}, v{};
  std::vector<Q> out(std::size_t(Hq * N));
  std::vector<float> lse(std::size_t(Hq * N), -7.0f);
  const std::vector<Q> before = out;
  const flashcpu::TensorView<const Q> qv{&q, {1, Hq, N, D}, {0, 0, 0, 0}};
  const flashcpu::TensorView<const KV> kv{&k, {1, Hkv, M, D}, {0, 0, 0, 0}};
  const flashcpu::TensorView<const KV> vv{&v, {1, Hkv, M, 1}, {0, 0, 0, 0}};
  const flashcpu::TensorView<Q> ov{out.data(), {1, Hq, N, 1}, {Hq * N, N, 1, 1}};
  const flashcpu::TensorView<float> lv{lse.data(), {1, Hq, N, 1}, {Hq * N, N, 1, 1}};
  std::string raised = "nothing";
  try {
    flashcpu::attention(qv, kv, vv, ov, lv, options);
  } catch (const std::bad_alloc&) {
    raised = "bad_alloc";
  } catch (const flashcpu::Error& e) {
    raised = std::string("Error: ") + e.what();
  }
  *untouched = std::memcmp(before.data(), out.data(), out.size() * sizeof(Q)) == 0 &&
               std::count(lse.begin(), lse.end(), -7.0f) == std::int64_t(lse.size());
  return raised;
}

}  // namespace

TEST_CASE("randomized huge stride-0 views reach every path and raise std::bad_alloc before writing",
          "[memory][overflow]") {
  // Head dimensions from 2^46 to 2^48: any path packs at least 4 rows or keys of D values
  // (2^50 bytes and more, past any address space, so no overcommit setting lets the
  // allocation succeed and the call run), and 2^15 - 1 stacked rows of D = 2^48 need
  // more than 2^63 floats (saturated sizes). Every element type, decoding (lanes, small
  // and full tiles) and prefill, GQA, causal, the Gaussian score, allow_bf16_compute.
  std::mt19937 rng(77);
  auto pick = [&](std::initializer_list<std::int64_t> xs) {
    return *(xs.begin() + std::uniform_int_distribution<std::size_t>(0, xs.size() - 1)(rng));
  };
  for (int trial = 0; trial < 200; ++trial) {
    const std::int64_t group = pick({1, 4, 8, 16, 32767});  // 2^15 - 1 stacked rows: packed Q rows reach 2^63
    const std::int64_t Hkv = group > 16 ? 1 : pick({1, 2, 3}), N = group > 16 ? 1 : pick({1, 2, 5, 16, 17, 100});
    const std::int64_t M = pick({1, 7, 64, 300}), D = (std::int64_t(1) << pick({46, 47, 48})) - pick({0, 1, 5});
    flashcpu::AttentionOptions options;
    options.causal = rng() % 2 == 0;
    options.allow_bf16_compute = rng() % 2 == 0;
    if (rng() % 4 == 0) options.score = flashcpu::Score::gaussian;
    const int types = int(rng() % 5);
    INFO("trial " << trial << ": Hq " << Hkv * group << ", Hkv " << Hkv << ", N " << N << ", M " << M << ", D " << D
                  << ", types " << types << ", causal " << options.causal << ", allow_bf16_compute "
                  << options.allow_bf16_compute << ", gaussian " << (options.score == flashcpu::Score::gaussian));
    bool untouched = false;
    std::string raised;
    switch (types) {
      case 0: raised = huge_call<float, float>(Hkv * group, Hkv, N, M, D, options, &untouched); break;
      case 1: raised = huge_call<flashcpu::bf16, flashcpu::bf16>(Hkv * group, Hkv, N, M, D, options, &untouched); break;
      case 2: raised = huge_call<flashcpu::fp16, flashcpu::fp16>(Hkv * group, Hkv, N, M, D, options, &untouched); break;
      case 3: raised = huge_call<float, flashcpu::bf16>(Hkv * group, Hkv, N, M, D, options, &untouched); break;
      default: raised = huge_call<float, flashcpu::fp16>(Hkv * group, Hkv, N, M, D, options, &untouched); break;
    }
    CHECK(raised == "bad_alloc");
    CHECK(untouched);
  }
}

TEST_CASE("scratch: mapped pieces start on a 2 MiB boundary and reach their end; overflowed sizes are refused",
          "[memory]") {
  using flashcpu::detail::AlignedBuffer;
  constexpr std::uintptr_t kHugePage = std::uintptr_t(2) << 20;
  // At the mapping threshold, and past a whole number of huge pages.
  for (const std::int64_t floats : {std::int64_t(AlignedBuffer::kMapBytes / sizeof(float)), std::int64_t(3 << 20) + 5}) {
    AlignedBuffer buffer(floats);
    INFO(floats << " floats at " << static_cast<const void*>(buffer.get()));
    CHECK(reinterpret_cast<std::uintptr_t>(buffer.get()) % kHugePage == 0);
    buffer.get()[0] = 1.0f;
    buffer.get()[floats - 1] = 2.0f;  // both ends writable
  }
  {
    AlignedBuffer small(100);
    CHECK(reinterpret_cast<std::uintptr_t>(small.get()) % 64 == 0);
  }
  // The backward passes INT64_MAX for a size that overflowed: refused, never wrapped.
  CHECK_THROWS_AS(AlignedBuffer(std::numeric_limits<std::int64_t>::max()), std::bad_alloc);
  CHECK_THROWS_AS(AlignedBuffer(std::int64_t(1) << 60), std::bad_alloc);
}
