// Many threads at once: calls from 8 std::threads with different shapes, options and
// num_threads (1 and 2), calls from inside an outer OpenMP parallel region (also calls
// that run on one thread, forward and backward), and a thread
// that replaces the tuning table (load_tuning, set_tile_config) meanwhile. Every result
// must be bitwise the single-threaded one for the tiles in force: results do not depend
// on num_threads, and a call reads the tuning table once, so it sees the old table or the
// new one, never a mix. Run under ThreadSanitizer too (tools/run_tests.sh).
//
// Catch2's assertions are not thread-safe: workers record, the test thread asserts.
#include <catch2/catch.hpp>

#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "plan.hpp"
#include "util.hpp"

namespace {

using flashcpu::AttentionOptions;
using flashcpu::TensorView;

// One call's inputs and its expected outputs (bitwise), under each tuning table.
struct Job {
  std::int64_t B, Hq, Hkv, N, M, D;
  bool causal;
  int window;  // window_left, or -1
  std::vector<float> q, k, v;
  std::vector<std::vector<float>> expected;  // per table

  TensorView<const float> view(const std::vector<float>& t, std::int64_t h, std::int64_t s) const {
    return flashcpu::bhsd<const float>(t.data(), B, h, s, D);
  }
  AttentionOptions options(int threads) const {
    AttentionOptions o;
    o.causal = causal;
    o.window_left = window;
    o.num_threads = threads;
    return o;
  }
  std::vector<float> run(int threads) const {
    std::vector<float> out(std::size_t(B * Hq * N * D));
    flashcpu::attention(view(q, Hq, N), view(k, Hkv, M), view(v, Hkv, M), flashcpu::bhsd(out.data(), B, Hq, N, D),
                        options(threads));
    return out;
  }
};

std::vector<Job> make_jobs() {
  // Prefill and decode, MHA and GQA, causal and windowed; all with D = 32 so that the
  // tuning tables below apply to every job.
  const struct {
    std::int64_t B, Hq, Hkv, N, M;
    bool causal;
    int window;
  } shapes[] = {{1, 4, 4, 200, 200, false, -1}, {2, 4, 2, 97, 300, true, -1}, {1, 8, 2, 1, 2000, true, -1},
                {1, 8, 8, 3, 1500, false, 100},  {1, 16, 1, 1, 900, true, 300}, {2, 2, 1, 130, 130, true, 40},
                {1, 4, 4, 17, 600, false, -1},   {1, 2, 2, 300, 100, true, -1}};
  std::vector<Job> jobs;
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (const auto& s : shapes) {
    Job j{s.B, s.Hq, s.Hkv, s.N, s.M, 32, s.causal, s.window, {}, {}, {}, {}};
    j.q.resize(std::size_t(j.B * j.Hq * j.N * j.D));
    j.k.resize(std::size_t(j.B * j.Hkv * j.M * j.D));
    j.v.resize(j.k.size());
    for (auto* t : {&j.q, &j.k, &j.v})
      for (float& x : *t) x = uniform(rng);
    jobs.push_back(std::move(j));
  }
  return jobs;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Two tuning tables for D = 32 on the level whose entries fp32 calls read (on "amx" and
// "avx512bf16" that is "avx512": ftest::f32_tile_isa), A loaded from a file and B set over
// it by set_tile_config, so that the tuner thread below moves A -> B -> A with one
// atomic replacement per step and no third state between. Their blocks differ, and so
// (in the last bits) do their results.
class Tables {
 public:
  Tables() : isa_(ftest::f32_tile_isa(flashcpu::active_isa())), stem_("flashcpu_test_threads_" + std::to_string(::getpid())) {
    write(stem_ + "_a.txt", isa_ + " 32 96 512\n");
    write(stem_ + "_empty.txt", "");
  }
  ~Tables() {
    flashcpu::load_tuning(stem_ + "_empty.txt");  // back to the built-in defaults
    std::remove((stem_ + "_a.txt").c_str());
    std::remove((stem_ + "_empty.txt").c_str());
  }
  void use(int which) const {
    if (which == 0)
      flashcpu::load_tuning(stem_ + "_a.txt");
    else
      flashcpu::set_tile_config(isa_, 32, flashcpu::TileConfig{48, 64});
  }

 private:
  static void write(const std::string& path, const std::string& text) {
    if (std::FILE* f = std::fopen(path.c_str(), "w")) {
      std::fputs(text.c_str(), f);
      std::fclose(f);
    }
  }
  std::string isa_, stem_;
};

}  // namespace

TEST_CASE("concurrent calls from threads and OpenMP regions, with the tuning table changing", "[threads]") {
  std::vector<Job> jobs = make_jobs();
  Tables tables;
  for (int t = 0; t < 2; ++t) {
    tables.use(t);
    for (Job& j : jobs) j.expected.push_back(j.run(1));
  }
  // The two tables must lead to different results on some job, or the check below could
  // not tell a torn table from a whole one.
  bool differ = false;
  for (const Job& j : jobs) differ = differ || !same_bits(j.expected[0], j.expected[1]);
  REQUIRE(differ);

  std::atomic<bool> stop{false};
  std::atomic<int> switches{0};
  // The tuner thread: alternates the two tables until the workers are done.
  std::thread tuner([&] {
    for (int t = 0; !stop.load(); t ^= 1) {
      tables.use(t);
      switches.fetch_add(1);
      std::this_thread::yield();
    }
  });

  constexpr int kWorkers = 8, kRounds = 6;
  std::vector<int> mismatches(kWorkers, 0), calls(kWorkers, 0);
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&, w] {
      for (int round = 0; round < kRounds; ++round) {
        const Job& j = jobs[std::size_t((w + round) % int(jobs.size()))];
        const std::vector<float> got = j.run(1 + (w + round) % 2);
        ++calls[std::size_t(w)];
        if (!same_bits(got, j.expected[0]) && !same_bits(got, j.expected[1])) ++mismatches[std::size_t(w)];
      }
    });
  }
  for (std::thread& t : workers) t.join();

  // Calls from inside an outer OpenMP region (nested parallelism is off by default: the
  // inner team is one thread), still while the tables change.
  std::vector<int> nested_mismatches(jobs.size(), 0);
#pragma omp parallel for num_threads(2) schedule(static)
  for (std::int64_t i = 0; i < std::int64_t(jobs.size()); ++i) {
    const Job& j = jobs[std::size_t(i)];
    const std::vector<float> got = j.run(2);
    if (!same_bits(got, j.expected[0]) && !same_bits(got, j.expected[1])) nested_mismatches[std::size_t(i)] = 1;
  }
  stop.store(true);
  tuner.join();

  INFO("table switches during the run: " << switches.load());
  CHECK(switches.load() > 1);
  for (int w = 0; w < kWorkers; ++w) {
    INFO("worker " << w);
    CHECK(calls[std::size_t(w)] == kRounds);
    CHECK(mismatches[std::size_t(w)] == 0);
  }
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    INFO("job " << i << " called from an OpenMP region");
    CHECK(nested_mismatches[i] == 0);
  }
}

// A call that runs on one thread (num_threads = 1, or a small call under the default)
// does its work on the calling thread. When that thread is one of the caller's own
// OpenMP team, the call's work must still be its own: split by OpenMP's worksharing or
// by omp_get_thread_num(), it had been shared out among the team's threads, each making
// a different call (half of each call's outputs unwritten, and scratch carved for one
// thread indexed by the caller's thread number: a heap overflow under ASan). Also asked
// for 2 threads: the region then cannot nest, and the call plans for one.
TEST_CASE("one-thread calls from inside the caller's OpenMP region do all of their own work", "[threads]") {
  using flashcpu::detail::BackwardSchedule;
  const std::vector<Job> jobs = make_jobs();
  std::vector<std::vector<float>> expected;
  for (const Job& j : jobs) expected.push_back(j.run(1));

  // The backward on three of the shapes (prefill, GQA decode, windowed), and on the first
  // again with one row's lse beyond the range the backward recomputes P from (its coarse
  // rows' statistics pass); every schedule gives the same gradients.
  struct Grads {
    std::vector<float> dq, dk, dv;
  };
  struct BackwardCase {
    std::size_t job;
    std::vector<float> out, lse;
    Grads expected;
  };
  std::vector<BackwardCase> cases;
  for (std::size_t i : {std::size_t(1), std::size_t(2), std::size_t(5), std::size_t(1)}) {
    const Job& j = jobs[i];
    BackwardCase c{i, std::vector<float>(std::size_t(j.B * j.Hq * j.N * j.D)), std::vector<float>(std::size_t(j.B * j.Hq * j.N)), {}};
    flashcpu::attention(j.view(j.q, j.Hq, j.N), j.view(j.k, j.Hkv, j.M), j.view(j.v, j.Hkv, j.M),
                        flashcpu::bhsd(c.out.data(), j.B, j.Hq, j.N, j.D), flashcpu::bhsd(c.lse.data(), j.B, j.Hq, j.N, 1),
                        j.options(1));
    if (cases.size() == 3) c.lse[5] = 3000.0f;
    cases.push_back(std::move(c));
  }
  auto backward = [&](const BackwardCase& c, BackwardSchedule schedule, int threads) {
    const Job& j = jobs[c.job];
    Grads g{std::vector<float>(j.q.size()), std::vector<float>(j.k.size()), std::vector<float>(j.v.size())};
    // dout = out: any fixed values do. Chunks of one key block, so that heads have several.
    flashcpu::detail::attention_backward_scheduled(
        schedule, 1, j.view(j.q, j.Hq, j.N), j.view(j.k, j.Hkv, j.M), j.view(j.v, j.Hkv, j.M), j.view(c.out, j.Hq, j.N),
        flashcpu::bhsd<const float>(c.lse.data(), j.B, j.Hq, j.N, 1), j.view(c.out, j.Hq, j.N),
        flashcpu::bhsd(g.dq.data(), j.B, j.Hq, j.N, j.D), flashcpu::bhsd(g.dk.data(), j.B, j.Hkv, j.M, j.D),
        flashcpu::bhsd(g.dv.data(), j.B, j.Hkv, j.M, j.D), j.options(threads));
    return g;
  };
  for (BackwardCase& c : cases) c.expected = backward(c, BackwardSchedule::automatic, 1);
  const BackwardSchedule schedules[] = {BackwardSchedule::whole_heads, BackwardSchedule::key_blocks_in_turn,
                                        BackwardSchedule::two_passes};

  constexpr int kTeam = 3;
  std::vector<int> mismatches(kTeam, 0), calls(kTeam, 0);
#pragma omp parallel num_threads(kTeam)
  {
    const int t = omp_get_thread_num();
    // Each thread its own order, so the team's threads make different calls at once.
    for (int round = 0; round < 3; ++round)
      for (std::size_t n = 0; n < jobs.size(); ++n) {
        const std::size_t i = (n * std::size_t(t + 1) + std::size_t(round)) % jobs.size();
        for (int threads : {1, 0, 2}) {
          ++calls[std::size_t(t)];
          if (!same_bits(jobs[i].run(threads), expected[i])) ++mismatches[std::size_t(t)];
        }
        const BackwardCase& c = cases[(i + std::size_t(t)) % cases.size()];
        for (BackwardSchedule schedule : schedules)
          for (int threads : {1, 2}) {
            const Grads g = backward(c, schedule, threads);
            ++calls[std::size_t(t)];
            if (!same_bits(g.dq, c.expected.dq) || !same_bits(g.dk, c.expected.dk) || !same_bits(g.dv, c.expected.dv))
              ++mismatches[std::size_t(t)];
          }
      }
  }
  for (int t = 0; t < kTeam; ++t) {
    INFO("thread " << t << " of the caller's team");
    CHECK(calls[std::size_t(t)] > 0);
    CHECK(mismatches[std::size_t(t)] == 0);
  }
}

// Items of `shares` taken by a team of `team` real threads, released at once: how many
// were not taken exactly once, or were out of [0, n).
static std::int64_t wrongly_taken(flashcpu::detail::StealingShares& shares, int team, std::int64_t n) {
  std::vector<std::atomic<int>> taken(static_cast<std::size_t>(n));
  for (auto& t : taken) t.store(0);
  std::atomic<int> ready{0}, out_of_range{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < team; ++t)
    workers.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < team) std::this_thread::yield();
      for (std::int64_t item; shares.take(flashcpu::detail::Team{t, team}, &item);) {
        if (item >= 0 && item < n)
          taken[std::size_t(item)].fetch_add(1);
        else
          out_of_range.fetch_add(1);
      }
    });
  for (auto& w : workers) w.join();
  std::int64_t wrong = out_of_range.load();
  for (auto& t : taken) wrong += t.load() != 1;
  return wrong;
}

TEST_CASE("stealing shares hand out every item once, own items from the front, others' from the back", "[threads]") {
  using flashcpu::detail::StealingShares;
  using flashcpu::detail::Team;
  // The order one thread takes items in when the rest of its team never asks: its own
  // share front to back, then the back of the share with the most left, one at a time.
  SECTION("one thread of a team of three takes everything") {
    StealingShares shares(10, 3);  // shares [0, 4) [4, 7) [7, 10)
    std::vector<std::int64_t> order;
    for (std::int64_t item; shares.take(Team{1, 3}, &item);) order.push_back(item);
    // Its own 4 5 6; then 3 from share 0 (4 left against 3); on a tie the first share.
    const std::vector<std::int64_t> expected = {4, 5, 6, 3, 2, 9, 1, 8, 0, 7};
    CHECK(order == expected);
    CHECK(shares.peek(Team{1, 3}) == -1);
  }
  SECTION("a thread that has begun keeps its last items") {
    StealingShares shares(8, 2, 1);  // [0, 4) [4, 8), each keeping 1 once begun
    std::int64_t item = -1;
    REQUIRE(shares.take(Team{1, 2}, &item));
    CHECK(item == 4);
    std::vector<std::int64_t> order;
    for (; shares.take(Team{0, 2}, &item);) order.push_back(item);
    const std::vector<std::int64_t> expected = {0, 1, 2, 3, 7, 6};  // not 5: thread 1 keeps it
    CHECK(order == expected);
    REQUIRE(shares.take(Team{1, 2}, &item));
    CHECK(item == 5);
    CHECK_FALSE(shares.take(Team{1, 2}, &item));
    // A share whose owner never asked is taken whole.
    StealingShares idle(8, 2, 3);
    order.clear();
    for (; idle.take(Team{0, 2}, &item);) order.push_back(item);
    CHECK(order.size() == 8);
  }
  SECTION("peek names the next own item") {
    StealingShares shares(7, 2);  // [0, 4) [4, 7)
    CHECK(shares.peek(Team{0, 2}) == 0);
    CHECK(shares.peek(Team{1, 2}) == 4);
    std::int64_t item = -1;
    REQUIRE(shares.take(Team{1, 2}, &item));
    CHECK(item == 4);
    CHECK(shares.peek(Team{1, 2}) == 5);
  }
  SECTION("owner and thieves race for the last items") {
    // Small shares, every thread released at once, many times over: the owner's front and
    // a thief's back meet at the last item in most repetitions.
    std::int64_t wrong = 0;
    for (int rep = 0; rep < 600; ++rep) {
      const std::int64_t n = 2 + rep % 15;
      const int team = 2 + rep % 2;
      StealingShares shares(n, team);
      wrong += wrongly_taken(shares, team, n);
    }
    CHECK(wrong == 0);
  }
  SECTION("real threads at once take every item exactly once") {
    // Teams as large as the shares and smaller (OpenMP may give a region fewer threads
    // than asked), packed shares and shares taken from the front.
    for (std::int64_t keep : {0, 1, 3})
      for (std::int64_t packed_below : {std::int64_t(1) << 32, std::int64_t(1)})
        for (int threads : {1, 2, 3, 8})
          for (int team : {1, 2, threads})
            for (std::int64_t n : {0, 1, 2, 7, 1000, 20011}) {
              if (team > threads) continue;
              StealingShares shares(n, threads, keep, packed_below);
              const std::int64_t wrong = wrongly_taken(shares, team, n);
              INFO("n " << n << ", shares " << threads << ", team " << team << ", keep " << keep
                        << ", packed below " << packed_below);
              CHECK(wrong == 0);
            }
  }
}
