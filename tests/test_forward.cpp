// The fused kernel against the reference: awkward and random shapes, the edges of
// every tile (default, overridden and micro-kernel), strided/padded/sliced views,
// grouped- and multi-query heads, causal alignments, large scores, empty calls and
// thread-count determinism. CTest runs all of it once per forced ISA.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "util.hpp"

using ftest::Case;
using ftest::Layout;

namespace {

// Cost guard for generated cases, in multiply-adds of one fused call
// (B·Hq·N·M·(D + Dv)); the reference and the bound cost about twice that in double.
// Keeps the whole binary at a few seconds in Release and well under a minute under
// ASan+UBSan in Debug.
constexpr std::int64_t kBudget = 1'000'000;

std::int64_t cost(const Case& c) { return c.B * c.Hq * c.N * c.M * (c.D + c.Dv); }

const Layout kInputLayouts[] = {Layout::bhsd, Layout::bshd, Layout::padded, Layout::sliced, Layout::broadcast};
const Layout kOutLayouts[] = {Layout::bhsd, Layout::bshd, Layout::padded, Layout::sliced};

// Decoding shapes, each at B = 2, causal and not, against the oracle; `vary(c)` sets
// what alternates from case to case (a view's layout, by the seed).
struct DecodeShape {
  std::int64_t Hq, Hkv, N, M, D, Dv;
};
template <class Vary>
void check_decode_shapes(std::initializer_list<DecodeShape> shapes, std::uint32_t seed, Vary vary) {
  for (const DecodeShape& sh : shapes)
    for (const bool causal : {false, true}) {
      Case c;
      c.B = 2, c.Hq = sh.Hq, c.Hkv = sh.Hkv, c.N = sh.N, c.M = sh.M, c.D = sh.D, c.Dv = sh.Dv;
      c.causal = causal;
      c.seed = ++seed;
      vary(c);
      FTEST_CHECK_CASE(c);
    }
}

}  // namespace

TEST_CASE("fused matches the reference on randomized awkward shapes", "[forward][random]") {
  std::mt19937 rng(20240611u);
  // N and M: 1 and primes. D and Dv: 1, 3, 17 and 80 are not multiples of any vector
  // width (16/8/4 floats); 256 is the large head dim.
  const std::int64_t lengths[] = {1, 2, 7, 13, 31, 97, 131, 257};
  const std::int64_t dims[] = {1, 3, 17, 80, 256};
  const std::pair<std::int64_t, std::int64_t> heads[] = {{1, 1}, {2, 2}, {8, 2}, {4, 1}, {3, 3}};
  const std::optional<float> scales[] = {std::nullopt, std::nullopt, 0.05f, 0.7f, -0.3f, 1.0f};
  auto pick = [&rng](const auto& options) {
    return options[rng() % (sizeof(options) / sizeof(options[0]))];
  };
  // What the random choices must have covered (a loop count alone could not fail).
  int causal_cases = 0, decode_cases = 0, odd_dims = 0;
  for (const std::int64_t N : lengths)
    for (const std::int64_t M : lengths) {
      Case c;
      c.N = N, c.M = M;
      c.seed = rng();
      do {
        c.D = pick(dims), c.Dv = pick(dims);
        std::tie(c.Hq, c.Hkv) = pick(heads);
        c.B = 1 + rng() % 2;
      } while (cost(c) > kBudget);
      c.causal = rng() % 2 == 0;
      c.scale = pick(scales);
      c.lq = pick(kInputLayouts), c.lk = pick(kInputLayouts), c.lv = pick(kInputLayouts);
      c.lo = pick(kOutLayouts);
      if (c.lq == Layout::broadcast && c.B > 1) c.lq = Layout::bhsd;  // keep q varied across batches
      FTEST_CHECK_CASE(c);
      causal_cases += c.causal;
      decode_cases += c.N <= 16 || c.N * (c.Hq / c.Hkv) <= 48;  // the decode driver (use_decode_path)
      odd_dims += c.D % 4 != 0 && c.Dv % 4 != 0;
    }
  INFO("of 64 cases: " << causal_cases << " causal, " << decode_cases << " on the decode driver, " << odd_dims
                       << " with D and Dv both off every vector width");
  CHECK(causal_cases >= 16);
  CHECK(causal_cases <= 48);
  CHECK(decode_cases >= 16);
  CHECK(decode_cases <= 48);
  CHECK(odd_dims >= 8);
}

TEST_CASE("fused matches the reference at the edges of the default tiles", "[forward][tiles]") {
  // Tile size T: lengths 1, T-1, T, T+1, 3T+5 for N against block_rows and M against
  // block_keys. Causal couples the two (which key blocks a query block sees), so it
  // gets the full cross; without a mask the query and key blocks are independent, so
  // a line of each suffices.
  SECTION("D=17, Dv=9: causal, every N edge against every M edge; non-causal lines") {
    const flashcpu::TileConfig t = flashcpu::tile_config(17);
    INFO("tiles {" << t.block_rows << ", " << t.block_keys << "}");
    std::uint32_t seed = 100;
    for (const std::int64_t N : ftest::edge_lengths(t.block_rows))
      for (const std::int64_t M : ftest::edge_lengths(t.block_keys)) {
        Case c;
        c.N = N, c.M = M, c.D = 17, c.Dv = 9, c.causal = true, c.seed = ++seed;
        FTEST_CHECK_CASE(c);
        if (M == t.block_keys + 1 || N == t.block_rows + 1) {
          c.causal = false;
          FTEST_CHECK_CASE(c);
        }
      }
  }
  for (const auto& [D, Dv] : {std::pair<std::int64_t, std::int64_t>{80, 17}, {256, 80}}) {
    DYNAMIC_SECTION("D=" << D << ", Dv=" << Dv << ": N edges at M = block_keys + 1, M edges at N = 9") {
      const flashcpu::TileConfig t = flashcpu::tile_config(D);
      INFO("tiles {" << t.block_rows << ", " << t.block_keys << "}");
      std::uint32_t seed = 200;
      for (const std::int64_t N : ftest::edge_lengths(t.block_rows)) {
        Case c;
        c.N = N, c.M = t.block_keys + 1, c.D = D, c.Dv = Dv, c.Hq = D > 128 ? 1 : 2, c.Hkv = 1;
        c.causal = N % 2 == 1, c.seed = ++seed;
        FTEST_CHECK_CASE(c);
      }
      for (const std::int64_t M : ftest::edge_lengths(t.block_keys)) {
        Case c;  // N = 9: a full micro-kernel row tile on every ISA plus a tail row
        c.N = 9, c.M = M, c.D = D, c.Dv = Dv, c.Hq = D > 128 ? 1 : 2, c.Hkv = 1;
        c.causal = M % 2 == 1, c.seed = ++seed;
        FTEST_CHECK_CASE(c);
      }
    }
  }
}

TEST_CASE("fused matches the reference with overridden tile shapes", "[forward][tiles]") {
  struct Variant {
    flashcpu::TileConfig tiles;
    std::int64_t D, Dv, Hq, Hkv;
  };
  // Head dims chosen per tile to keep the sweeps cheap. Small tiles: the full cross of
  // N and M edges, causal and not. {128, 512}: lines only (N edges at M = 513, M edges
  // at N = 129), as its cross would cost more than the rest of the suite. Three query
  // heads per KV head, so that row edges from 17 up stack more rows than
  // kDecodeMaxStackedRows and stay on the prefill driver, whose blocks these are.
  const Variant variants[] = {{{8, 32}, 3, 17, 2, 1}, {{16, 64}, 80, 9, 3, 1}, {{24, 96}, 17, 5, 3, 1},
                              {{128, 512}, 5, 3, 1, 1}};
  std::uint32_t seed = 300;
  for (const Variant& var : variants) {
    ftest::TileOverride override_tiles(var.D, var.tiles);
    const flashcpu::TileConfig now = flashcpu::tile_config(var.D);
    REQUIRE(now.block_rows == var.tiles.block_rows);
    REQUIRE(now.block_keys == var.tiles.block_keys);
    INFO("tiles {" << var.tiles.block_rows << ", " << var.tiles.block_keys << "}");
    // The blocks as run: rounded up to whole micro-kernel tiles (6 rows, 64 keys on avx512).
    const std::string isa = flashcpu::active_isa();
    const std::int64_t rows_used = (var.tiles.block_rows + ftest::micro_rows(isa) - 1) / ftest::micro_rows(isa) *
                                   ftest::micro_rows(isa);
    const std::int64_t keys_used = (var.tiles.block_keys + ftest::key_panel(isa) - 1) / ftest::key_panel(isa) *
                                   ftest::key_panel(isa);
    INFO("blocks as run {" << rows_used << ", " << keys_used << "}");
    const bool lines_only = keys_used >= 512;
    for (const std::int64_t N : ftest::edge_lengths(rows_used))
      for (const std::int64_t M : ftest::edge_lengths(keys_used)) {
        if (lines_only && N != rows_used + 1 && M != keys_used + 1) continue;
        for (const bool causal : {false, true}) {
          Case c;
          c.N = N, c.M = M, c.D = var.D, c.Dv = var.Dv, c.Hq = var.Hq, c.Hkv = var.Hkv;
          c.causal = causal, c.seed = ++seed;
          c.lq = Layout::padded;  // strided rows under small tiles too
          FTEST_CHECK_CASE(c);
        }
      }
  }
}

TEST_CASE("fused matches the reference at micro-kernel and vector-width edges", "[forward][micro]") {
  // Register tile rows 6 / 4 / 4 (avx512 / avx2 / sse2), key panels 64 / 16 / 8 floats,
  // vectors 16 / 8 / 4 floats: lengths and head dims one below, at and one above each.
  // N = 17 and 33 with two query heads stack at most 66 rows (both drivers); 49, past
  // kDecodeMaxStackedRows whatever the grouping, is prefill.
  const std::int64_t rows[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 16, 17, 33, 49};
  const std::int64_t keys[] = {3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65};
  const std::int64_t dims[] = {1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33};
  std::size_t next = 0;
  std::uint32_t seed = 400;
  for (const std::int64_t N : rows)
    for (const std::int64_t M : keys) {
      Case c;
      c.N = N, c.M = M;
      c.D = dims[next % 13], c.Dv = dims[(next * 5 + 3) % 13];
      c.Hq = 2, c.Hkv = next % 2 == 0 ? 1 : 2;
      c.causal = next % 3 == 0;
      c.seed = ++seed;
      ++next;
      FTEST_CHECK_CASE(c);
    }
}

TEST_CASE("decoding with a vector's worth of stacked rows or more (rows as vector lanes)", "[forward][decode]") {
  // Decoding shapes (N <= 16) whose stacked rows G*N reach the vector width (16 / 8 / 4
  // floats) take the lanes kernel when K rows are whole vectors (D a multiple of 16 here,
  // so on every ISA; on SSE2 only from M = 512, fewer keys take the tiles there): rows at,
  // below and above one and two lane tiles, key counts across block (256) and chunk (512+)
  // boundaries, causal and not, and out-of-place V (Dv = 19).
  check_decode_shapes({{16, 16, 16, 16, 64, 64}, {16, 1, 1, 300, 32, 19}, {32, 2, 1, 1100, 16, 16},
                       {8, 1, 2, 257, 64, 64}, {4, 1, 5, 33, 48, 7}, {16, 2, 3, 700, 32, 32}, {2, 2, 16, 1, 16, 16},
                       {8, 2, 9, 520, 64, 19}, {12, 4, 16, 31, 16, 33}},
                      700, [](Case& c) { c.lq = c.seed % 2 == 0 ? Layout::padded : Layout::bshd; });  // strided q rows
}

TEST_CASE("decoding with 1 to 3 stacked rows (tiles partly padding)", "[forward][decode]") {
  // 1 or 2 stacked rows fill half of a 4-row decoding tile: with K read in place (D a
  // multiple of 16 here, so on every ISA) that half alone is scored, weighed and
  // accumulated, its P.V tiles as wide as the value row allows (D = 128: 8 vectors on
  // AVX-512, D = 64: 4); 3 rows take the whole tile. D = 17 packs K, which scores every row.
  // 9 rows: the last 6-row tile has 3 live rows on AVX-512, the last 4-row tile 1 on SSE2
  // (below 512 keys; AVX2 takes 8 rows and more as vector lanes).
  // Key counts across blocks (256) and chunks (512+); causal (2 queries see different keys)
  // and not; out-of-place V (Dv = 19, 136).
  check_decode_shapes({{4, 4, 1, 1031, 128, 128}, {4, 2, 1, 777, 128, 136}, {3, 3, 2, 513, 128, 128},
                       {2, 2, 1, 300, 64, 64}, {6, 3, 1, 1300, 64, 19}, {2, 1, 1, 257, 256, 256},
                       {3, 1, 1, 1100, 128, 128}, {3, 3, 1, 97, 64, 64}, {2, 1, 1, 600, 17, 9}, {1, 1, 2, 1, 16, 16},
                       {9, 1, 1, 700, 64, 64}, {9, 1, 1, 300, 128, 128}},
                      750, [](Case& c) { c.lv = c.seed % 2 == 0 ? Layout::padded : Layout::bhsd; });  // V packed or not
}

TEST_CASE("fused matches the reference for GQA, MQA and causal alignments through every layout",
          "[forward][gqa][causal][strides]") {
  struct Lengths {
    const char* name;
    bool causal;
    std::int64_t N, M;
  };
  const Lengths lengths[] = {{"non-causal", false, 23, 61},
                             {"causal N < M", true, 23, 61},
                             {"causal N > M", true, 61, 23},
                             {"causal N == M", true, 41, 41}};
  const std::pair<std::int64_t, std::int64_t> heads[] = {{8, 2}, {4, 1}, {3, 3}};
  // q / k / v / out layouts, rotated over the cases.
  const Layout combos[][4] = {
      {Layout::bhsd, Layout::bhsd, Layout::bhsd, Layout::bhsd},
      {Layout::bshd, Layout::bshd, Layout::bshd, Layout::bshd},
      {Layout::padded, Layout::padded, Layout::padded, Layout::padded},
      {Layout::sliced, Layout::sliced, Layout::sliced, Layout::sliced},
      {Layout::sliced, Layout::bshd, Layout::broadcast, Layout::padded},
  };
  std::size_t next = 0;
  for (const auto& len : lengths)
    for (const auto& [Hq, Hkv] : heads) {
      Case c;
      c.B = 2, c.Hq = Hq, c.Hkv = Hkv, c.N = len.N, c.M = len.M, c.D = 33, c.Dv = 19;
      c.causal = len.causal;
      const auto& layouts = combos[next % 5];
      c.lq = layouts[0], c.lk = layouts[1], c.lv = layouts[2], c.lo = layouts[3];
      c.seed = 500 + static_cast<std::uint32_t>(next++);
      INFO(len.name);
      FTEST_CHECK_CASE(c);
    }
  // Every layout for one GQA causal case, plus broadcast (stride-0) keys and values.
  for (const Layout layout : kOutLayouts) {
    Case c;
    c.B = 2, c.Hq = 8, c.Hkv = 2, c.N = 29, c.M = 43, c.D = 24, c.Dv = 40, c.causal = true;
    c.lq = c.lk = c.lv = c.lo = layout;
    c.seed = 600;
    FTEST_CHECK_CASE(c);
    c.lk = c.lv = Layout::broadcast;
    FTEST_CHECK_CASE(c);
  }
}

TEST_CASE("scores of magnitude 1e4..1e5 neither overflow nor lose the answer", "[forward][large]") {
  SECTION("random q, k in [-100, 100], D=64, scale 1: scores ~1e4-1e5, nearly one-hot rows") {
    for (const bool causal : {false, true}) {
      Case c;
      c.B = 1, c.Hq = 2, c.Hkv = 1, c.N = 33, c.M = 77, c.D = 64, c.Dv = 20;
      c.scale = 1.0f, c.causal = causal;
      c.qk_lo = -100.0f, c.qk_hi = 100.0f;
      c.v_lo = -3.0f, c.v_hi = 3.0f;
      c.seed = 700;
      FTEST_CHECK_CASE(c);
    }
  }
  SECTION("all scores equal and huge (+1e4, +1.02e5, -1e4): out is the mean of v") {
    // q = k = 12.5, D=64: every score is 64 * 156.25 = 1e4; 40 -> 102400; k = -12.5 ->
    // -1e4. Without the running max, exp overflows (to inf/inf) or underflows (0/0).
    for (const auto& [qv, kv] : {std::pair<float, float>{12.5f, 12.5f}, {40.0f, 40.0f}, {12.5f, -12.5f}}) {
      for (const bool causal : {false, true}) {
        Case c;
        c.N = 19, c.M = 45, c.D = 64, c.Dv = 9, c.scale = 1.0f, c.causal = causal;
        c.seed = 710;
        const float nan = std::numeric_limits<float>::quiet_NaN();
        ftest::Tensor q({1, 1, c.N, c.D}, Layout::bhsd, nan), k({1, 1, c.M, c.D}, Layout::bhsd, nan),
            v({1, 1, c.M, c.Dv}, Layout::bhsd, nan), out({1, 1, c.N, c.Dv}, Layout::bhsd, nan);
        std::mt19937 rng(c.seed);
        q.fill_uniform(rng, qv, qv);
        k.fill_uniform(rng, kv, kv);
        v.fill_uniform(rng, -1, 1);
        flashcpu::AttentionOptions opt;
        opt.scale = 1.0f, opt.causal = causal;
        flashcpu::attention(q.cview(), k.cview(), v.cview(), out.view(), opt);
        INFO("q = " << qv << ", k = " << kv << ", causal = " << causal);
        const auto r = ftest::compare_with_reference(q.cview(), k.cview(), v.cview(), opt, out.cview());
        INFO(r.report);
        CHECK(r.ok);
        bool finite = true;
        for (const float x : out.values()) finite = finite && std::isfinite(x);
        CHECK(finite);
        // Row N-1 sees every key: the plain mean of v.
        for (std::int64_t col = 0; col < c.Dv; ++col) {
          double mean = 0;
          for (std::int64_t j = 0; j < c.M; ++j) mean += v.at(0, 0, j, col);
          CHECK(out.at(0, 0, c.N - 1, col) == Approx(mean / double(c.M)).margin(1e-5));
        }
      }
    }
  }
}

TEST_CASE("results are bitwise identical for every num_threads", "[forward][threads]") {
  std::vector<Case> cases;
  {
    const flashcpu::TileConfig t = flashcpu::tile_config(17);
    Case c;  // default tiles: several query and key blocks
    c.B = 1, c.Hq = 2, c.Hkv = 2, c.N = 2 * t.block_rows + 3, c.M = t.block_keys + 5, c.D = 17, c.Dv = 17;
    cases.push_back(c);
    c.causal = true;  // N < M
    cases.push_back(c);
    c.Hq = 4, c.Hkv = 2, c.N = 3 * t.block_rows + 5, c.M = t.block_rows + 7;  // GQA, causal N > M
    cases.push_back(c);
    c.Hq = 4, c.Hkv = 1, c.N = 1, c.M = 4 * t.block_keys + 9, c.causal = false;  // decode: one query, MQA
    cases.push_back(c);
  }
  for (Case& c : cases) c.seed = 800;

  {  // the same with many small {8, 32} tiles
    ftest::TileOverride small(29, {8, 32});
    Case c;
    c.B = 1, c.Hq = 4, c.Hkv = 2, c.N = 61, c.M = 203, c.D = 29, c.Dv = 11, c.causal = true, c.seed = 801;
    std::vector<float> first;
    for (const int threads : {1, 2, 3, 7, 0}) {
      c.threads = threads;
      const auto out = ftest::run_fused_buffer(c);
      if (first.empty()) {
        first = out;
        FTEST_CHECK_CASE(c);
      }
      INFO(c.describe() << " tiles {8, 32}");
      CHECK(std::memcmp(out.data(), first.data(), out.size() * sizeof(float)) == 0);
    }
  }

  for (Case c : cases) {
    std::vector<float> first;
    for (const int threads : {1, 2, 3, 7, 0}) {
      c.threads = threads;
      const auto out = ftest::run_fused_buffer(c);
      if (first.empty()) {
        first = out;
        FTEST_CHECK_CASE(c);
      }
      INFO(c.describe() << " vs num_threads=1");
      REQUIRE(out.size() == first.size());
      CHECK(std::memcmp(out.data(), first.data(), out.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("working memory above the mapping threshold (2 MiB aligned huge pages) is used correctly",
          "[forward][scratch]") {
  // Prefill (N = 49: more stacked rows than kDecodeMaxStackedRows) packs a whole K (and V)
  // head per thread: at M = 4099 and D = Dv = 67 that is over 1 MiB, so the call's scratch
  // is mapped, 2 MiB aligned and advised as huge pages (src/scratch.hpp). An error in that
  // carving would shift or overlap the threads' parts.
  Case c;
  c.B = 1, c.Hq = 3, c.Hkv = 3, c.N = 49, c.M = 4099, c.D = 67, c.Dv = 67, c.seed = 1234;
  for (const int threads : {1, 3}) {
    c.threads = threads;
    c.lv = threads == 1 ? Layout::bhsd : Layout::padded;  // V read in place or packed
    FTEST_CHECK_CASE(c);
  }
}

TEST_CASE("empty calls are valid", "[forward][empty]") {
  const float sentinel = -12345.5f;
  flashcpu::AttentionOptions plain, causal;
  causal.causal = true;
  using Fn = void (*)(flashcpu::TensorView<const float>, flashcpu::TensorView<const float>,
                      flashcpu::TensorView<const float>, flashcpu::TensorView<float>, const flashcpu::AttentionOptions&);
  const std::pair<const char*, Fn> fns[] = {{"attention", flashcpu::attention},
                                            {"reference::attention", flashcpu::reference::attention}};

  for (const auto& [fn_name, fn] : fns)
    for (const auto* opt : {&plain, &causal}) {
      INFO(fn_name << (opt->causal ? " causal" : ""));
      {  // B = 0, N = 0: nothing written, non-null and null data
        for (const ftest::Shape qs : {ftest::Shape{0, 4, 5, 3}, ftest::Shape{2, 4, 0, 3}}) {
          const std::int64_t B = qs[0], N = qs[2];
          ftest::Tensor q(qs, Layout::bhsd, 0.5f), k({B, 2, 7, 3}, Layout::bhsd, 0.5f),
              v({B, 2, 7, 6}, Layout::bhsd, 0.5f), out({B, 4, N, 6}, Layout::bhsd, sentinel);
          CHECK_NOTHROW(fn(q.cview(), k.cview(), v.cview(), out.view(), *opt));
          CHECK(out.padding_intact());
          auto qn = q.cview(), on = out.cview();
          qn.data = nullptr;
          flashcpu::TensorView<float> onull{nullptr, on.shape, on.strides};
          auto kn = k.cview(), vn = v.cview();
          if (B == 0) kn.data = vn.data = nullptr;  // k and v are empty only when B = 0
          CHECK_NOTHROW(fn(qn, kn, vn, onull, *opt));
        }
      }
      {  // M = 0, N > 0: out is all zeros
        for (const bool null_kv : {false, true}) {
          ftest::Tensor q({2, 4, 5, 3}, Layout::padded, 0.5f), k({2, 2, 0, 3}, Layout::bhsd, 0.5f),
              v({2, 2, 0, 6}, Layout::bhsd, 0.5f), out({2, 4, 5, 6}, Layout::padded, sentinel);
          std::mt19937 rng(1);
          q.fill_uniform(rng, -1, 1);
          auto kv = k.cview(), vv = v.cview();
          if (null_kv) kv.data = vv.data = nullptr;
          INFO("null k, v: " << null_kv);
          REQUIRE_NOTHROW(fn(q.cview(), kv, vv, out.view(), *opt));
          CHECK(out.padding_intact());
          bool zeros = true;
          for (std::int64_t b = 0; b < 2; ++b)
            for (std::int64_t h = 0; h < 4; ++h)
              for (std::int64_t i = 0; i < 5; ++i)
                for (std::int64_t c = 0; c < 6; ++c) zeros = zeros && out.at(b, h, i, c) == 0.0f;
          CHECK(zeros);
        }
      }
    }
}

TEST_CASE("no keys and no value columns: nothing is walked, however many rows there are", "[forward][empty]") {
  // M = 0 and Dv = 0 without lse: out has no element, and 2^40 heads x 2^20 rows are not visited.
  const std::int64_t Hq = std::int64_t(1) << 40, Hkv = 256, N = std::int64_t(1) << 20;
  std::vector<float> none(4, 0.5f);
  const flashcpu::TensorView<const float> q{none.data(), {1, Hq, N, 4}, {0, 0, 0, 1}};
  const flashcpu::TensorView<const float> k{none.data(), {1, Hkv, 0, 4}, {0, 0, 4, 1}};
  const flashcpu::TensorView<const float> v{none.data(), {1, Hkv, 0, 0}, {0, 0, 1, 1}};
  const flashcpu::TensorView<float> out{none.data(), {1, Hq, N, 0}, {0, 0, 0, 1}};
  CHECK_NOTHROW(flashcpu::attention(q, k, v, out));
  CHECK_NOTHROW(flashcpu::reference::attention(q, k, v, out));
  const flashcpu::TensorView<float> weights{none.data(), {1, Hq, N, 0}, {0, 0, 0, 1}};
  CHECK_NOTHROW(flashcpu::reference::attention_weights(q, k, weights));
}

TEST_CASE("causal with N > M: the first N - M rows are zero, the rest match", "[forward][causal]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::int64_t B = 2, Hq = 4, Hkv = 2, N = 45, M = 13, D = 17, Dv = 9;
  ftest::Tensor q({B, Hq, N, D}, Layout::bshd, nan), k({B, Hkv, M, D}, Layout::bhsd, nan),
      v({B, Hkv, M, Dv}, Layout::sliced, nan), out({B, Hq, N, Dv}, Layout::padded, -1.0f);
  std::mt19937 rng(900);
  q.fill_uniform(rng, -1, 1);
  k.fill_uniform(rng, -1, 1);
  v.fill_uniform(rng, -1, 1);
  flashcpu::AttentionOptions opt;
  opt.causal = true;
  flashcpu::attention(q.cview(), k.cview(), v.cview(), out.view(), opt);
  std::int64_t nonzero = 0;
  std::string first;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < N - M; ++i)
        for (std::int64_t c = 0; c < Dv; ++c)
          if (out.at(b, h, i, c) != 0.0f && nonzero++ == 0)
            first = "out(" + std::to_string(b) + ", " + std::to_string(h) + ", " + std::to_string(i) + ", " +
                    std::to_string(c) + ") = " + std::to_string(out.at(b, h, i, c));
  INFO("rows 0.." << N - M - 1 << " see no key; first nonzero: " << first);
  CHECK(nonzero == 0);
  const auto r = ftest::compare_with_reference(q.cview(), k.cview(), v.cview(), opt, out.cview());
  INFO(r.report);
  CHECK(r.ok);
  CHECK(out.padding_intact());
}
