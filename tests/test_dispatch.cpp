// ISA dispatch (and FLASHCPU_ISA forcing), tile configuration and tuning files.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <omp.h>
#include <unistd.h>

#include "dispatch.hpp"
#include "kernels/variant_list.hpp"
#include "plan.hpp"
#include "tuning.hpp"
#include "util.hpp"

namespace {

// The level an unforced run picks: the best supported one that dispatch picks unasked.
std::string best_supported() {
  using flashcpu::variant_list::kLevels;
  for (int l = flashcpu::variant_list::kLevelCount - 1; l >= 0; --l)
    if (flashcpu::variant_list::kLevelByDefault[l] && flashcpu::isa_supported(kLevels[l])) return kLevels[l];
  return "none";
}

}  // namespace

TEST_CASE("FLASHCPU_ISA selects the kernel ISA, or the run is reported as not run", "[dispatch]") {
  const char* forced = std::getenv("FLASHCPU_ISA");
  const std::string active = flashcpu::active_isa();
  INFO("FLASHCPU_ISA=" << (forced ? forced : "(unset)") << ", active_isa()=" << active);
  CHECK(flashcpu::isa_supported(active));
  if (forced == nullptr || *forced == '\0') {
    // Unforced: the best ISA the machine supports.
    CHECK(active == best_supported());
  } else if (flashcpu::isa_supported(forced)) {
    REQUIRE(active == forced);
  } else {
    WARN("ISA " << forced << " not available on this machine: not run");
    ftest::note_isa_unavailable();
  }
  // Chosen once per process: stable across calls.
  CHECK(flashcpu::active_isa() == active);
}

TEST_CASE("active_isa and isa_supported are consistent", "[dispatch]") {
  const std::string active = flashcpu::active_isa();
  bool listed = false;
  for (const char* level : flashcpu::variant_list::kLevels) listed = listed || active == level;
  CHECK(listed);
  // ISA levels nest: a CPU that runs one level runs every level below it.
  for (int l = 1; l < flashcpu::variant_list::kLevelCount; ++l)
    if (flashcpu::isa_supported(flashcpu::variant_list::kLevels[l]))
      CHECK(flashcpu::isa_supported(flashcpu::variant_list::kLevels[l - 1]));
}

TEST_CASE("isa_supported agrees with the features Linux reports", "[dispatch]") {
  // An independent reading: /proc/cpuinfo lists a feature only when the kernel also
  // saves its register state, which is what the library's CPUID + XGETBV check decides.
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, flags;
  while (std::getline(cpuinfo, line))
    if (line.rfind("flags", 0) == 0) {
      flags = " " + line.substr(line.find(':') + 1) + " ";
      break;
    }
  if (flags.empty()) {
    WARN("no flags line in /proc/cpuinfo: not run");
    return;
  }
  auto has = [&](const char* f) { return flags.find(std::string(" ") + f + " ") != std::string::npos; };
  INFO("flags:" << flags);
  CHECK(flashcpu::isa_supported("sse2") == has("sse2"));
  const bool avx2 = has("avx2") && has("fma") && has("f16c");
  CHECK(flashcpu::isa_supported("avx2") == avx2);
  const bool avx512 = avx2 && has("avx512f") && has("avx512dq") && has("avx512cd") && has("avx512bw") && has("avx512vl");
  CHECK(flashcpu::isa_supported("avx512") == avx512);
  // Linux lists amx_tile only when it supports the tile state, which it then grants on
  // request (the library asks once, when it first reads the CPU).
  CHECK(flashcpu::isa_supported("avx512bf16") == (avx512 && has("avx512_bf16")));
  CHECK(flashcpu::isa_supported("amx") == (avx512 && has("avx512_bf16") && has("amx_tile") && has("amx_bf16")));
}

TEST_CASE("tile_config gives tiles the active micro-kernel can use", "[tiles]") {
  const std::string isa = flashcpu::active_isa();
  for (std::int64_t d : {1, 3, 17, 64, 80, 128, 256}) {
    const flashcpu::TileConfig t = flashcpu::tile_config(d);
    INFO("isa " << isa << " D=" << d << " tiles {" << t.block_rows << ", " << t.block_keys << "}");
    CHECK(t.block_rows > 0);
    CHECK(t.block_keys > 0);
    CHECK(t.block_rows % ftest::micro_rows(isa) == 0);
    CHECK(t.block_keys % ftest::key_panel(isa) == 0);
  }
}

TEST_CASE("set_tile_config overrides and restores the tiles", "[tiles]") {
  // tile_config reports the tiles of fp32 calls: on "amx" and "avx512bf16" those run the
  // "avx512" kernels and read that level's entries.
  const std::string isa = ftest::f32_tile_isa(flashcpu::active_isa());
  const std::int64_t d = 40;
  const flashcpu::TileConfig before = flashcpu::tile_config(d);
  for (const flashcpu::TileConfig t : {flashcpu::TileConfig{8, 32}, {16, 64}, {24, 96}, {128, 512}}) {
    INFO("override {" << t.block_rows << ", " << t.block_keys << "}");
    flashcpu::set_tile_config(isa, d, t);
    const flashcpu::TileConfig now = flashcpu::tile_config(d);
    CHECK(now.block_rows == t.block_rows);
    CHECK(now.block_keys == t.block_keys);
  }
  flashcpu::set_tile_config(isa, d, std::nullopt);
  const flashcpu::TileConfig after = flashcpu::tile_config(d);
  CHECK(after.block_rows == before.block_rows);
  CHECK(after.block_keys == before.block_keys);
}

TEST_CASE("set_tile_config rejects tiles no ISA can use", "[tiles][errors]") {
  const std::string isa = flashcpu::active_isa();
  const std::int64_t d = 40;
  const flashcpu::TileConfig before = flashcpu::tile_config(d);
  for (const flashcpu::TileConfig t :
       {flashcpu::TileConfig{0, 32}, {8, 0}, {7, 32}, {8, 31}, {12, 32}, {8, 48}, {-8, 32}, {8, -32}}) {
    INFO("tiles {" << t.block_rows << ", " << t.block_keys << "}");
    // {12, 32} and {8, 48} are rejected by the file format's rule, multiples of 8 rows
    // and 32 keys on every ISA (the kernels round the tiles up to their own multiples).
    CHECK_THROWS_AS(flashcpu::set_tile_config(isa, d, t), flashcpu::Error);
    const flashcpu::TileConfig now = flashcpu::tile_config(d);
    CHECK(now.block_rows == before.block_rows);
    CHECK(now.block_keys == before.block_keys);
  }
}

TEST_CASE("load_tuning rejects missing and malformed files", "[tiles][errors]") {
  const flashcpu::TileConfig before = flashcpu::tile_config(64);
  CHECK_THROWS_AS(flashcpu::load_tuning("/nonexistent/flashcpu-tuning.txt"), flashcpu::Error);

  // In the working directory, named per process: the CTest runs may go in parallel.
  const std::string path = "flashcpu_test_bad_tuning_" + std::to_string(::getpid()) + ".txt";
  {
    std::ofstream f(path);
    f << "this is not a tuning file {{{ 1 2\n";
  }
  CHECK_THROWS_AS(flashcpu::load_tuning(path), flashcpu::Error);
  std::remove(path.c_str());

  const flashcpu::TileConfig after = flashcpu::tile_config(64);
  CHECK(after.block_rows == before.block_rows);
  CHECK(after.block_keys == before.block_keys);
}

// The environment's tuning file against the first use of the table. Hidden: each runs
// alone, in a process of its own, from the tuning_env_* CTests (tests/CMakeLists.txt),
// whose FLASHCPU_TUNING_FILE holds, for every level, "min_flops_per_thread 12345" and
// tiles {24, 160} at head dim 40.
TEST_CASE("FLASHCPU_TUNING_FILE is read at the first lookup", "[.][tuning_env_lookup]") {
  REQUIRE(std::getenv("FLASHCPU_TUNING_FILE") != nullptr);
  // First the lookup every call plans through (tuning_for), then the threads' entry alone.
  const flashcpu::TileConfig t = flashcpu::tile_config(40);
  CHECK(t.block_rows == 24);
  CHECK(t.block_keys == 160);
  CHECK(flashcpu::min_flops_per_thread("sse2") == 12345.0);
  CHECK(flashcpu::min_flops_per_thread("avx512") == 12345.0);
}

TEST_CASE("FLASHCPU_TUNING_FILE never replaces a load_tuning made before the first lookup",
          "[.][tuning_env_load_first]") {
  REQUIRE(std::getenv("FLASHCPU_TUNING_FILE") != nullptr);
  const std::string path = "flashcpu_test_env_first_" + std::to_string(::getpid()) + ".txt";
  std::ofstream(path) << "sse2 min_flops_per_thread 67890\n";
  flashcpu::load_tuning(path);  // the process's first use of the table
  std::remove(path.c_str());
  auto check_loaded = [] {
    CHECK(flashcpu::min_flops_per_thread("sse2") == 67890.0);
    CHECK(flashcpu::min_flops_per_thread("avx512") == flashcpu::detail::kMinFlopsPerThread);  // not the environment's
    const flashcpu::TileConfig t = flashcpu::tile_config(40);
    CHECK_FALSE((t.block_rows == 24 && t.block_keys == 160));
  };
  check_loaded();
  // A call plans with the table: it must not bring the environment's file back either.
  std::vector<float> q(2 * 5 * 40, 0.5f), k(2 * 70 * 40, 0.25f), out(q.size());
  flashcpu::attention(flashcpu::bhsd<const float>(q.data(), 1, 2, 5, 40), flashcpu::bhsd<const float>(k.data(), 1, 2, 70, 40),
                      flashcpu::bhsd<const float>(k.data(), 1, 2, 70, 40), flashcpu::bhsd(out.data(), 1, 2, 5, 40));
  check_loaded();
}

TEST_CASE("min_flops_per_thread: tuning-file entries, their errors, and the threads they give",
          "[tiles][threads][errors]") {
  namespace fd = flashcpu::detail;
  // Named per process in the working directory, as above.
  const std::string stem = "flashcpu_test_min_flops_" + std::to_string(::getpid());
  auto write = [&](const std::string& name, const std::string& text) {
    const std::string path = stem + "_" + name + ".txt";
    std::ofstream(path) << text;
    return path;
  };
  const std::string empty = write("empty", "# nothing\n");
  flashcpu::load_tuning(empty);
  for (const char* isa : {"sse2", "avx2", "avx512", "avx512bf16", "amx"})
    CHECK(flashcpu::min_flops_per_thread(isa) == double(1 << 20));  // the built-in default
  CHECK_THROWS_AS(flashcpu::min_flops_per_thread("avx1024"), flashcpu::Error);

  // One level's entry, beside a tile entry; the others keep the default.
  const std::string good = write("good", "avx2 min_flops_per_thread 131072\navx2 64 144 256\n"
                                         "sse2 min_flops_per_thread 4e6 # comment\n");
  flashcpu::load_tuning(good);
  CHECK(flashcpu::min_flops_per_thread("avx2") == 131072.0);
  CHECK(flashcpu::min_flops_per_thread("sse2") == 4e6);
  CHECK(flashcpu::min_flops_per_thread("avx512") == double(1 << 20));
  // thread_count: floor(FLOPs / entry) threads, at least 1, at most OpenMP's default;
  // num_threads, when set, wins.
  const int most = omp_get_max_threads();
  CHECK(fd::thread_count(0, 131071.0, fd::min_flops_per_thread_for(fd::Isa::avx2)) == 1);
  CHECK(fd::thread_count(0, 2 * 131072.0, fd::min_flops_per_thread_for(fd::Isa::avx2)) == std::min(2, most));
  CHECK(fd::thread_count(0, 1e12, fd::min_flops_per_thread_for(fd::Isa::avx2)) == most);
  CHECK(fd::thread_count(0, 2 * 131072.0, fd::min_flops_per_thread_for(fd::Isa::avx512)) == 1);  // the default's 2^20
  CHECK(fd::thread_count(0, 2.0 * (1 << 20), fd::min_flops_per_thread_for(fd::Isa::avx512)) == std::min(2, most));
  CHECK(fd::thread_count(3, 1.0, 1e6) == 3);
  // What a call plans with: the entry of its kernels' level, read with its tiles.
  const std::string f32_isa = ftest::f32_tile_isa(flashcpu::active_isa());
  const std::string planned = write("planned", f32_isa + " min_flops_per_thread 5000\n" + f32_isa + " 64 48 128\n");
  flashcpu::load_tuning(planned);
  {
    std::vector<float> q(2 * 100 * 64, 0.5f), k(2 * 300 * 64, 0.25f), out(q.size());
    const auto qv = flashcpu::bhsd<const float>(q.data(), 1, 2, 100, 64);
    const auto kv = flashcpu::bhsd<const float>(k.data(), 1, 2, 300, 64);
    const auto ov = flashcpu::bhsd(out.data(), 1, 2, 100, 64);
    const fd::AttentionShape s = fd::validate_attention(qv, kv, kv, ov, nullptr, flashcpu::AttentionOptions{});
    const fd::KernelTable& kernels = fd::kernels_for_call(s, fd::DType::f32, fd::DType::f32, fd::AnyView::of(kv),
                                                          fd::Transform::none);
    const fd::Plan plan = fd::make_plan(kernels, s, fd::AnyView::of(kv), fd::Transform::none, 0.0f, false);
    CHECK(plan.min_flops_per_thread == 5000.0);
    CHECK(plan.block_rows == 48);
    CHECK(plan.block_keys == 128);
  }
  CHECK(flashcpu::min_flops_per_thread(f32_isa) == 5000.0);
  std::remove(planned.c_str());
  flashcpu::load_tuning(good);

  // Malformed entries: the whole file is rejected and the table kept.
  for (const char* bad : {"avx2 min_flops_per_thread 0\n", "avx2 min_flops_per_thread -5\n",
                          "avx2 min_flops_per_thread 2e12\n", "avx2 min_flops_per_thread many\n",
                          "avx2 min_flops_per_thread\n", "avx2 min_flops_per_thread 1000 2000\n",
                          "avx2 min_flops_per_thread nan\n", "avx2 min_flops_per_thread inf\n",
                          "avx1024 min_flops_per_thread 1000\n", "avx2 64x 144 256\n"}) {
    INFO("line: " << bad);
    const std::string path = write("bad", bad);
    CHECK_THROWS_AS(flashcpu::load_tuning(path), flashcpu::Error);
    CHECK(flashcpu::min_flops_per_thread("avx2") == 131072.0);
    std::remove(path.c_str());
  }
  {  // The out-of-range message names the range the library enforces.
    const std::string path = write("bad", "avx2 min_flops_per_thread 2e12\n");
    std::string what;
    try {
      flashcpu::load_tuning(path);
    } catch (const flashcpu::Error& e) {
      what = e.what();
    }
    INFO(what);
    CHECK(what.find("line 1:") != std::string::npos);
    CHECK(what.find("flops in [1, 1e+12], got 'avx2 min_flops_per_thread 2e12'") != std::string::npos);
    std::remove(path.c_str());
  }
  // A file without the entry brings back the default.
  flashcpu::load_tuning(empty);
  CHECK(flashcpu::min_flops_per_thread("avx2") == double(1 << 20));
  std::remove(empty.c_str());
  std::remove(good.c_str());
}
