// Bad input: every inconsistency raises flashcpu::Error naming the argument, before
// anything is written. Each case runs against flashcpu::attention and
// flashcpu::reference::attention (same contract) on one arena holding q, k, v and
// out; the whole arena must be bitwise unchanged afterwards. Also the near misses
// that must be accepted (touching but not overlapping, stride 0 on size-1 dims).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "util.hpp"

static_assert(std::is_base_of<std::invalid_argument, flashcpu::Error>::value,
              "flashcpu::Error derives std::invalid_argument");

namespace {

using flashcpu::AttentionOptions;
using flashcpu::TensorView;

constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();

bool is_word_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// Whether `text` contains `word` with no letter, digit or '_' on either side: "k" is in
// "k.shape[2]" and "'k'", not in "keys"; "41" is in "got 41", not in "410".
bool contains_word(const std::string& text, const std::string& word) {
  for (auto pos = text.find(word); pos != std::string::npos; pos = text.find(word, pos + 1)) {
    const bool left = pos == 0 || !is_word_char(text[pos - 1]);
    const bool right = pos + word.size() == text.size() || !is_word_char(text[pos + word.size()]);
    if (left && right) return true;
  }
  return false;
}

// Matches an error message that names one of `words` (loosely: as a word, anywhere).
class MentionsAny : public Catch::MatcherBase<std::string> {
 public:
  explicit MentionsAny(std::vector<std::string> words) : words_(std::move(words)) {}
  bool match(const std::string& text) const override {
    for (const auto& w : words_)
      if (contains_word(text, w)) return true;
    return false;
  }
  std::string describe() const override {
    std::string s = "mentions one of:";
    for (const auto& w : words_) s += " '" + w + "'";
    return s;
  }

 private:
  std::vector<std::string> words_;
};

// A valid problem with distinctive sizes (B=2, Hq=6, Hkv=3, N=7, M=11, D=9, Dv=13),
// all four tensors in one arena with slack before, between and after, so that the
// overlapping placements below stay inside the allocation.
struct Problem {
  static constexpr std::int64_t B = 2, Hq = 6, Hkv = 3, N = 7, M = 11, D = 9, Dv = 13;
  static constexpr std::int64_t kSlack = 2048, kGap = 64;
  static constexpr std::int64_t q_size = B * Hq * N * D, k_size = B * Hkv * M * D, v_size = B * Hkv * M * Dv,
                                out_size = B * Hq * N * Dv;
  static constexpr std::int64_t q_at = kSlack, k_at = q_at + q_size + kGap, v_at = k_at + k_size + kGap,
                                out_at = v_at + v_size + kGap, arena_size = out_at + out_size + kSlack;

  std::vector<float> arena;
  TensorView<const float> q, k, v;
  TensorView<float> out;
  AttentionOptions options;

  Problem() : arena(static_cast<std::size_t>(arena_size)) {
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> dist(-1, 1);
    for (auto& x : arena) x = dist(rng);
    float* base = arena.data();
    q = flashcpu::bhsd<const float>(base + q_at, B, Hq, N, D);
    k = flashcpu::bhsd<const float>(base + k_at, B, Hkv, M, D);
    v = flashcpu::bhsd<const float>(base + v_at, B, Hkv, M, Dv);
    out = flashcpu::bhsd(base + out_at, B, Hq, N, Dv);
  }
  Problem(const Problem&) = delete;
  float* at(std::int64_t offset) { return arena.data() + offset; }
};

struct BadCase {
  const char* what;
  std::function<void(Problem&)> mutate;
  std::vector<std::string> names;  // the message must name one of these
  std::string value;               // and, when not empty, contain this (the bad value)
};

using Fn = void (*)(TensorView<const float>, TensorView<const float>, TensorView<const float>, TensorView<float>,
                    const AttentionOptions&);

void check_rejected(const BadCase& bad, const char* fn_name, Fn fn) {
  Problem p;
  bad.mutate(p);
  const std::vector<float> before = p.arena;
  INFO(fn_name << ": " << bad.what);
  INFO("q " << ftest::describe(p.q) << ", k " << ftest::describe(p.k) << ", v " << ftest::describe(p.v)
            << ", out " << ftest::describe(p.out));
  CHECK_THROWS_AS(fn(p.q, p.k, p.v, p.out, p.options), flashcpu::Error);
  CHECK_THROWS_WITH(fn(p.q, p.k, p.v, p.out, p.options), MentionsAny(bad.names));
  if (!bad.value.empty()) CHECK_THROWS_WITH(fn(p.q, p.k, p.v, p.out, p.options), MentionsAny({bad.value}));
  // Nothing written: not to out's elements, not anywhere in the arena.
  CHECK(std::memcmp(before.data(), p.arena.data(), before.size() * sizeof(float)) == 0);
}

void check_all(const std::vector<BadCase>& cases) {
  for (const auto& bad : cases) {
    check_rejected(bad, "attention", flashcpu::attention);
    check_rejected(bad, "reference::attention", flashcpu::reference::attention);
  }
}

// A float* into the arena for a const view's address (the arena itself is mutable).
float* mut(const float* p) { return const_cast<float*>(p); }

}  // namespace

TEST_CASE("null data with a non-empty shape is rejected", "[errors]") {
  check_all({
      {"q.data null", [](Problem& p) { p.q.data = nullptr; }, {"q"}, ""},
      {"k.data null", [](Problem& p) { p.k.data = nullptr; }, {"k"}, ""},
      {"v.data null", [](Problem& p) { p.v.data = nullptr; }, {"v"}, ""},
      {"out.data null", [](Problem& p) { p.out.data = nullptr; }, {"out"}, ""},
  });
}

TEST_CASE("shape mismatches between the views are rejected", "[errors]") {
  check_all({
      {"k batch", [](Problem& p) { p.k.shape[0] = 41; }, {"k"}, "41"},
      {"v batch", [](Problem& p) { p.v.shape[0] = 41; }, {"v"}, "41"},
      {"out batch", [](Problem& p) { p.out.shape[0] = 41; }, {"out"}, "41"},
      {"out heads", [](Problem& p) { p.out.shape[1] = 41; }, {"out"}, "41"},
      {"v heads vs k", [](Problem& p) { p.v.shape[1] = 41; }, {"v", "k"}, "41"},
      {"k head dim (D) vs q", [](Problem& p) { p.k.shape[3] = 43; }, {"k", "q"}, "43"},
      {"v keys (M) vs k", [](Problem& p) { p.v.shape[2] = 43; }, {"v", "k"}, "43"},
      {"out rows (N) vs q", [](Problem& p) { p.out.shape[2] = 43; }, {"out"}, "43"},
      {"out Dv vs v", [](Problem& p) { p.out.shape[3] = 43; }, {"out", "v"}, "43"},
      {"v Dv vs out", [](Problem& p) { p.v.shape[3] = 43; }, {"v", "out"}, "43"},
      {"Hq=7 not a multiple of Hkv=3",
       [](Problem& p) { p.q.shape[1] = p.out.shape[1] = 7; },
       {"q", "k"},
       ""},
      {"Hkv=0 with Hq=6",
       [](Problem& p) { p.k.shape[1] = p.v.shape[1] = 0; },
       {"k", "q", "v"},
       ""},
      {"D=0", [](Problem& p) { p.q.shape[3] = p.k.shape[3] = 0; }, {"q", "k"}, ""},
  });
}

TEST_CASE("negative sizes and strides are rejected", "[errors]") {
  check_all({
      {"negative N", [](Problem& p) { p.q.shape[2] = p.out.shape[2] = -7; }, {"q", "out"}, "-7"},
      {"negative M", [](Problem& p) { p.k.shape[2] = p.v.shape[2] = -11; }, {"k", "v"}, "-11"},
      {"negative B", [](Problem& p) { p.q.shape[0] = p.k.shape[0] = p.v.shape[0] = p.out.shape[0] = -2; },
       {"q", "k", "v", "out"}, ""},
      {"negative Dv", [](Problem& p) { p.v.shape[3] = p.out.shape[3] = -13; }, {"v", "out"}, "-13"},
      {"q stride", [](Problem& p) { p.q.strides[3] = -1; }, {"q"}, "-1"},
      {"k stride", [](Problem& p) { p.k.strides[2] = -9; }, {"k"}, "-9"},
      {"v stride", [](Problem& p) { p.v.strides[1] = -143; }, {"v"}, "-143"},
      {"out stride", [](Problem& p) { p.out.strides[0] = -546; }, {"out"}, "-546"},
  });
}

TEST_CASE("bad options are rejected", "[errors]") {
  check_all({
      {"scale NaN", [](Problem& p) { p.options.scale = std::numeric_limits<float>::quiet_NaN(); }, {"scale"}, ""},
      {"scale +inf", [](Problem& p) { p.options.scale = std::numeric_limits<float>::infinity(); }, {"scale"}, ""},
      {"scale -inf", [](Problem& p) { p.options.scale = -std::numeric_limits<float>::infinity(); }, {"scale"}, ""},
      {"num_threads -1", [](Problem& p) { p.options.num_threads = -1; }, {"num_threads"}, "-1"},
      {"num_threads -7, causal", [](Problem& p) { p.options.num_threads = -7, p.options.causal = true; },
       {"num_threads"}, "-7"},
  });
}

TEST_CASE("out overlapping q, k or v is rejected", "[errors][overlap]") {
  check_all({
      {"out on q's buffer", [](Problem& p) { p.out.data = mut(p.q.data); }, {"out"}, ""},
      {"out starting inside v (last 5 elements)",
       [](Problem& p) { p.out.data = mut(p.v.data) + Problem::v_size - 5; }, {"out"}, ""},
      {"out ending inside k (first 3 elements)",
       [](Problem& p) { p.out.data = mut(p.k.data) - Problem::out_size + 3; }, {"out"}, ""},
      {"out inside q with padded strides",
       [](Problem& p) {
         p.out.data = mut(p.q.data) + 100;
         p.out.strides = {Problem::Hq * Problem::N * 20, Problem::N * 20, 20, 1};
       },
       {"out"}, ""},
      {"v inside out", [](Problem& p) { p.v.data = p.out.data + 1; }, {"out", "v"}, ""},
  });
}

TEST_CASE("out whose own elements alias each other is rejected", "[errors][overlap]") {
  check_all({
      {"out row stride 0 (N=7)", [](Problem& p) { p.out.strides[2] = 0; }, {"out"}, ""},
      {"out column stride 0 (Dv=13)", [](Problem& p) { p.out.strides[3] = 0; }, {"out"}, ""},
      {"out batch stride 0 (B=2)", [](Problem& p) { p.out.strides[0] = 0; }, {"out"}, ""},
      {"out rows overlapping (row stride 5 < Dv=13)", [](Problem& p) { p.out.strides[2] = 5; }, {"out"}, ""},
      {"out heads overlapping (head stride = row stride)",
       [](Problem& p) { p.out.strides[1] = p.out.strides[2]; },
       {"out"},
       ""},
  });
}

TEST_CASE("sizes and extents that overflow 64-bit indexing are rejected", "[errors][overflow]") {
  check_all({
      {"shape {2^40, 2^40, 1, 1} everywhere",
       [](Problem& p) {
         const std::int64_t big = std::int64_t{1} << 40;
         p.q = flashcpu::bhsd(p.q.data, big, big, 1, 1);
         p.k = flashcpu::bhsd(p.k.data, big, big, 1, 1);
         p.v = flashcpu::bhsd(p.v.data, big, big, 1, 1);
         p.out = flashcpu::bhsd(p.out.data, big, big, 1, 1);
       },
       {"q", "k", "v", "out"},
       ""},
      {"q row stride INT64_MAX/2 (N=7)", [](Problem& p) { p.q.strides[2] = kMax / 2; }, {"q"}, ""},
      {"k row stride INT64_MAX/4 (M=11)", [](Problem& p) { p.k.strides[2] = kMax / 4; }, {"k"}, ""},
      {"v column stride INT64_MAX/8 (Dv=13)", [](Problem& p) { p.v.strides[3] = kMax / 8; }, {"v"}, ""},
      {"out head stride INT64_MAX/2 (Hq=6)", [](Problem& p) { p.out.strides[1] = kMax / 2; }, {"out"}, ""},
      {"q terms fit, their sum does not: strides {2^62, 2^60, 9, 1}",
       [](Problem& p) { p.q.strides = {std::int64_t{1} << 62, std::int64_t{1} << 60, 9, 1}; },
       {"q"},
       ""},
      {"N = INT64_MAX/2 on q and out",
       [](Problem& p) { p.q.shape[2] = p.out.shape[2] = kMax / 2; },
       {"q", "out"},
       ""},
      // Sizes past 2^48, though stride 0 keeps the extents small.
      {"D = 2^48 + 1 on q and k, stride 0",
       [](Problem& p) {
         p.q.shape[3] = p.k.shape[3] = (std::int64_t{1} << 48) + 1;
         p.q.strides[3] = p.k.strides[3] = 0;
       },
       {"q", "k"},
       "281474976710657"},
      {"M = 2^48 + 1 on k and v, stride 0",
       [](Problem& p) {
         p.k.shape[2] = p.v.shape[2] = (std::int64_t{1} << 48) + 1;
         p.k.strides[2] = p.v.strides[2] = 0;
       },
       {"k", "v"},
       "281474976710657"},
  });
}

TEST_CASE("near misses are accepted and computed correctly", "[errors][overlap]") {
  struct Valid {
    const char* what;
    std::function<void(Problem&)> mutate;
  };
  const Valid cases[] = {
      {"out right after v (touching)", [](Problem& p) { p.out.data = mut(p.v.data) + Problem::v_size; }},
      {"out right before q (touching)", [](Problem& p) { p.out.data = mut(p.q.data) - Problem::out_size; }},
      {"out with stride 0 on its size-1 dims",
       [](Problem& p) {
         p.q.shape = {1, 1, 1, Problem::D};
         p.k.shape[0] = p.v.shape[0] = 1;
         p.k.shape[1] = p.v.shape[1] = 1;
         p.out.shape = {1, 1, 1, Problem::Dv};
         p.out.strides = {0, 0, 0, 1};
       }},
      {"inputs with stride 0 (q shared by heads, k and v by batches)",
       [](Problem& p) {
         p.q.strides[1] = 0;
         p.k.strides[0] = p.v.strides[0] = 0;
       }},
      {"scale -0", [](Problem& p) { p.options.scale = -0.0f; }},
      {"negative scale", [](Problem& p) { p.options.scale = -2.0f; }},
      {"num_threads larger than the work", [](Problem& p) { p.options.num_threads = 64; }},
  };
  for (const auto& c : cases) {
    Problem p;
    c.mutate(p);
    INFO(c.what);
    REQUIRE_NOTHROW(flashcpu::attention(p.q, p.k, p.v, p.out, p.options));
    const auto r = ftest::compare_with_reference(p.q, p.k, p.v, p.options, p.out);
    INFO(r.report);
    CHECK(r.ok);
  }
}
