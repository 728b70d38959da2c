// Attention sinks (AttentionOptions::sinks): a per-head logit that joins every row's
// softmax denominator with no value. Against the oracle on every path (prefill, decode
// with split-KV chunks, the stacked-heads tiles and the lanes kernel), with large and
// small sinks, some heads without one, combined with causal, masks, softcap and GQA;
// rows with no visible key (out 0, lse = the sink); the identity with the lse overload
// followed by merge_into; determinism over thread counts; bad sinks rejected.
//
// Tolerance: attention_oracle.hpp's bound, where the sink is one more score, exact, with
// a zero value row (expect() adds it).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention_oracle.hpp"
#include "util.hpp"

namespace {

using namespace oracle;

// Prefill (N < M, N > M) and decode (split-KV with several chunks; N = 16 with D = 32
// takes the lanes kernel; a single chunk finishes in the kernel), and a short prompt on
// the decode driver (N = 29, one query head per KV head: 29 stacked rows, 2 chunks).
const Dims kShapes[] = {
    {2, 8, 2, 24, 160, 19, 23}, {1, 8, 2, 90, 60, 33, 7},  {2, 8, 2, 1, 1800, 17, 9},
    {1, 8, 2, 16, 1100, 32, 16}, {1, 4, 1, 3, 200, 64, 64}, {1, 3, 3, 29, 700, 32, 32},
};

}  // namespace

TEST_CASE("sinks match the oracle on every path, alone and with other options", "[sinks]") {
  std::uint32_t seed = 5100;
  struct Set {
    const char* name;
    void (*apply)(Problem&);
  };
  const Set sets[] = {
      {"sinks +20", [](Problem& p) { p.sinks(19.0f, 21.0f); }},
      {"sinks -20", [](Problem& p) { p.sinks(-21.0f, -19.0f); }},
      {"sinks near the scores, some -inf", [](Problem& p) { p.sinks(-1.0f, 1.0f, true); }},
      {"sinks + causal + mask", [](Problem& p) { p.sinks(-2.0f, 2.0f), p.causal(), p.full_mask(0.1); }},
      {"sinks + softcap + alibi", [](Problem& p) { p.sinks(0.0f, 3.0f), p.softcap(2.0f), p.alibi(); }},
      {"sinks + everything", [](Problem& p) { p.sinks(-3.0f, 3.0f, true), p.everything(); }},
      {"sinks + gaussian", [](Problem& p) { p.sinks(-1.0f, 1.0f), p.gaussian(); }},
  };
  for (const Set& set : sets)
    for (const Dims& d : kShapes) {
      ++seed;
      Problem p(d, seed, seed % 2 ? Layout::padded : Layout::bshd);
      set.apply(p);
      INFO("option set: " << set.name << (on_decode_driver(d) ? " (decode driver)" : " (prefill driver)"));
      CHECK_PROBLEM(p);
    }
}

TEST_CASE("sinks on randomized shapes with awkward sizes, GQA and views", "[sinks]") {
  std::mt19937 rng(5150);
  const std::int64_t sizes[] = {1, 2, 3, 5, 7, 13, 17, 31, 37, 61, 64, 67, 131};
  auto pick = [&] { return sizes[rng() % (sizeof(sizes) / sizeof(sizes[0]))]; };
  int decode = 0, prefill = 0;
  for (int t = 0; t < 24; ++t) {
    const std::int64_t hkv = 1 + rng() % 3, group = 1 + rng() % 4;
    const Dims d{1 + std::int64_t(rng() % 2), hkv * group, hkv, pick(), pick() + std::int64_t(rng() % 700), pick(),
                 pick()};
    (on_decode_driver(d) ? decode : prefill) += 1;
    Problem p(d, std::uint32_t(rng()), t % 2 ? Layout::sliced : Layout::bshd, t % 3 ? Layout::padded : Layout::bhsd);
    const float centre = float(int(rng() % 41) - 20);  // sinks from -20 to +20
    p.sinks(centre - 1.0f, centre + 1.0f, t % 4 == 3);
    if (t % 3 == 1) p.causal();
    if (t % 5 == 2) p.full_bool(0.3);
    if (t % 7 == 4) p.softcap(1.5f);
    CHECK_PROBLEM(p);
  }
  CHECK(decode > 0);
  CHECK(prefill > 0);
}

TEST_CASE("sinks: a row with no visible key gets out = 0 and lse = its sink", "[sinks][empty]") {
  for (const Dims& d : kShapes) {
    Problem p(d, 5200, Layout::padded);
    p.sinks(-5.0f, 5.0f, true);
    // Batch 0 sees no key at all; later batches keep theirs.
    std::vector<std::int32_t> lengths(std::size_t(d.B), std::int32_t(d.M));
    lengths[0] = 0;
    p.key_lengths(lengths);
    INFO(p.describe());
    CHECK_PROBLEM(p);
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < d.N; ++i) {
        const float sink = p.sink_values[std::size_t(h)];
        // Exactly the sink (and -inf where the head has none), exactly zeros.
        CHECK(std::memcmp(&p.lse.at(0, h, i, 0), &sink, sizeof(float)) == 0);
        for (std::int64_t c = 0; c < d.Dv; ++c) CHECK(p.out.at(0, h, i, c) == 0.0f);
      }
  }
}

TEST_CASE("sinks equal the lse overload followed by merge_into with a zero output and lse = sink",
          "[sinks][merge]") {
  for (const Dims& d : kShapes) {
    Problem p(d, 5300, Layout::bhsd, Layout::bhsd);
    p.sinks(-2.0f, 4.0f, true);
    p.causal();
    const std::vector<float> sinks = p.sink_values;
    // With sinks, in one call.
    flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
    // Without, then the sinks merged in as a shard with zero output.
    flashcpu::AttentionOptions plain = p.opt;
    plain.sinks = nullptr;
    Tensor out(p.out.shape(), Layout::bhsd, kSentinel), lse(p.lse.shape(), Layout::bhsd, kSentinel);
    flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), out.view(), lse.view(), plain);
    Tensor zero(p.out.shape(), Layout::bhsd, 0.0f), sink_lse(p.lse.shape(), Layout::bhsd, 0.0f);
    std::mt19937 unused;
    zero.fill_uniform(unused, 0.0f, 0.0f);
    for (std::int64_t b = 0; b < d.B; ++b)
      for (std::int64_t h = 0; h < d.Hq; ++h)
        for (std::int64_t i = 0; i < d.N; ++i) sink_lse.at(b, h, i, 0) = sinks[std::size_t(h)];
    flashcpu::merge_into(out.view(), lse.view(), zero.cview(), sink_lse.cview());
    // Two routes through fp32: each within a few ulp of the other (relative 1e-5 of the
    // largest output; lse absolute 1e-5 plus relative 1e-6).
    double max_out = 0;
    for (float x : p.out.values()) max_out = std::max(max_out, double(std::fabs(x)));
    const std::vector<float> a = p.out.values(), b = out.values(), la = p.lse.values(), lb = lse.values();
    for (std::size_t e = 0; e < a.size(); ++e) {
      INFO(p.describe() << " element " << e);
      CHECK(std::fabs(double(a[e]) - double(b[e])) <= 1e-5 * max_out + 1e-7);
    }
    for (std::size_t e = 0; e < la.size(); ++e) {
      INFO(p.describe() << " row " << e);
      // Rows that see no key and have no sink: -inf both ways.
      CHECK((la[e] == lb[e] || std::fabs(double(la[e]) - double(lb[e])) <= 1e-5 + 1e-6 * std::fabs(double(lb[e]))));
    }
  }
}

TEST_CASE("sinks: results are bitwise identical for every num_threads", "[sinks][threads]") {
  for (const Dims& d : {Dims{1, 8, 2, 2, 3000, 64, 64}, Dims{1, 8, 2, 40, 300, 64, 64}}) {
    std::vector<std::vector<float>> outs;
    for (int threads : {1, 2, 3, 5}) {
      Problem p(d, 5400, Layout::bhsd, Layout::bhsd);
      p.sinks(-1.0f, 3.0f);
      p.opt.num_threads = threads;
      flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
      std::vector<float> all = p.out.values();
      const std::vector<float> lse = p.lse.values();
      all.insert(all.end(), lse.begin(), lse.end());
      outs.push_back(all);
    }
    for (std::size_t t = 1; t < outs.size(); ++t)
      CHECK(std::memcmp(outs[t].data(), outs[0].data(), outs[0].size() * sizeof(float)) == 0);
  }
}

TEST_CASE("sinks: a NaN or +inf sink is rejected, naming the head, before anything is written",
          "[sinks][errors]") {
  const Dims d{1, 4, 2, 5, 9, 8, 8};
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Problem p(d, 5500, Layout::bhsd, Layout::bhsd);
    p.sinks(0.0f, 1.0f);
    p.sink_values[2] = bad;
    std::mt19937 unused;
    p.out.fill_uniform(unused, kSentinel, kSentinel);
    const std::vector<float> before = p.out.buffer();
    std::string message;
    try {
      flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.opt);
    } catch (const flashcpu::Error& e) {
      message = e.what();
    }
    INFO(message);
    CHECK(message.find("options.sinks[2]: expected a finite value or -inf") != std::string::npos);
    CHECK(std::memcmp(before.data(), p.out.buffer().data(), before.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("sinks with no keys at all (M = 0), and sinks beyond the float range of log2 units", "[sinks][empty]") {
  // M = 0: every row sees no key; lse is the sink (or -inf where a head has none).
  {
    const std::int64_t B = 1, H = 2, N = 3, D = 4;
    std::vector<float> q(std::size_t(B * H * N * D), 0.5f), out(std::size_t(B * H * N * D), 9.0f), lse(std::size_t(B * H * N), 9.0f);
    std::vector<float> kv(1, 0.0f);
    const float sinks[] = {0.5f, -std::numeric_limits<float>::infinity()};
    flashcpu::AttentionOptions opt;
    opt.sinks = sinks;
    const auto empty = flashcpu::bhsd<const float>(kv.data(), B, H, 0, D);
    flashcpu::attention(flashcpu::bhsd<const float>(q.data(), B, H, N, D), empty, empty,
                        flashcpu::bhsd(out.data(), B, H, N, D), flashcpu::bhsd(lse.data(), B, H, N, 1), opt);
    for (float x : out) CHECK(x == 0.0f);
    for (std::int64_t i = 0; i < N; ++i) {
      CHECK(lse[std::size_t(i)] == 0.5f);
      CHECK(lse[std::size_t(N + i)] == -std::numeric_limits<float>::infinity());
    }
    std::vector<float> ref_lse(lse.size(), 9.0f), ref_out(out.size(), 9.0f);
    flashcpu::reference::attention(flashcpu::bhsd<const float>(q.data(), B, H, N, D), empty, empty,
                                   flashcpu::bhsd(ref_out.data(), B, H, N, D),
                                   flashcpu::bhsd(ref_lse.data(), B, H, N, 1), opt);
    CHECK(ref_lse == lse);
    CHECK(ref_out == out);
  }
  // |sink| of 3e38 (beyond FLT_MAX / log2 e): +3e38 takes the whole row (out 0, lse the
  // sink); -3e38 changes nothing where keys are visible, and is the lse of an empty row.
  for (const Dims& d : kShapes) {
    Problem plain(d, 5600, Layout::bhsd, Layout::bhsd);
    plain.key_lengths(std::vector<std::int32_t>(std::size_t(d.B), std::int32_t(d.M)));
    plain.lengths[0] = 0;  // batch 0 sees no key
    flashcpu::attention(plain.q.cview(), plain.k.cview(), plain.v.cview(), plain.out.view(), plain.lse.view(),
                        plain.opt);
    for (float huge : {3e38f, -3e38f}) {
      Problem p(d, 5600, Layout::bhsd, Layout::bhsd);
      p.key_lengths(plain.lengths);
      p.sink_values.assign(std::size_t(d.Hq), huge);
      p.opt.sinks = p.sink_values.data();
      flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
      INFO(p.describe() << " sink " << huge);
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h)
          for (std::int64_t i = 0; i < d.N; ++i) {
            const bool empty = b == 0;
            const float lse = p.lse.at(b, h, i, 0), want_lse = huge > 0 || empty ? huge : plain.lse.at(b, h, i, 0);
            CHECK(std::memcmp(&lse, &want_lse, sizeof(float)) == 0);
            for (std::int64_t c = 0; c < d.Dv; ++c) {
              const float got = p.out.at(b, h, i, c);
              if (huge > 0)
                CHECK(got == 0.0f);  // +0 or -0: the row's weights are all 0
              else
                CHECK(std::memcmp(&got, &plain.out.at(b, h, i, c), sizeof(float)) == 0);
            }
          }
    }
  }
}
