// flashcpu-tune: searches the fused kernel's tile sizes (block_rows x block_keys) per
// head dimension on this machine and writes a tuning file the library reads.
// Run with --help for the options and the file format.
#include "common.hpp"

#include <omp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dispatch.hpp"
#include "kernels/variant_list.hpp"
#include "tuning.hpp"

namespace fb = flashcpu::bench;

namespace {

// Multiples of 24: whole tiles of every ISA's micro-kernel rows (6 on AVX-512, 4 below)
// and of the 8 the tuning file requires. Keys: 32 is a distinct candidate on AVX2 and
// SSE2; on AVX-512 it runs as 64 (whole 64-key panels), a repeat of the next candidate.
const std::vector<int> kRows = {24, 48, 72, 96, 144, 192, 288};
const std::vector<int> kKeys = {32, 64, 128, 192, 256, 384, 512, 768, 1024};
const std::vector<int> kQuickRows = {48, 96, 144, 192};
const std::vector<int> kQuickKeys = {64, 128, 256, 512};

struct Workload {
  std::int64_t batch, heads, n, m;
  bool causal;
};

struct Options {
  std::string out = "flashcpu-tuning.txt";
  std::vector<std::int64_t> dims = {64, 80, 128, 256};
  std::vector<int> rows = kRows, keys = kKeys;
  std::vector<Workload> workloads;  // empty: the defaults below
  bool quick = false;
  int threads = 0;
  int reps = 3;
  double min_gain = 2.0;  // percent a candidate must beat the default by
  std::string isa;        // empty: the active one
};

void usage(FILE* to) {
  std::fprintf(to,
               R"(flashcpu-tune: find the fastest tile sizes of flashcpu::attention on this machine.

For each head dimension D it tries every block_rows x block_keys candidate
(block_rows in {24,48,72,96,144,192,288}, block_keys in {32,64,128,...,1024}, where 32 runs as 64 on AVX-512; with
--quick {48,96,144,192} x {64,128,256,512}), installs it with
flashcpu::set_tile_config(isa, D, {block_rows, block_keys}), times flashcpu::attention on
the workloads (median of --reps calls each; the score is the geometric mean of GFLOP/s
over the workloads), and keeps the best. On a level whose kernels compute bf16 products
(amx, avx512bf16) the workloads are bf16: that level's entries drive its bf16 prefill
kernel, and its fp32 calls run the level below. The built-in default, as read
before any change, is then re-timed against the best, alternating A B A B, and the
winner is written. Progress (count, best so far, ETA) goes to stderr.

Options:
  --out FILE       tuning file to write (default flashcpu-tuning.txt)
  --dims LIST      head dimensions, comma-separated (default 64,80,128,256); Dv = D
  --quick          the small candidate grid and smaller default workloads
  --threads T      threads (default: OpenMP's)
  --reps R         timed calls per candidate and workload (default 3)
  --workload W     B:H:N:M[:causal], repeatable; replaces the defaults, which are
                   1:8:2048:2048 and 1:8:256:256 (1:8:1024:1024 and 1:8:256:256 with --quick)
  --min-gain PCT   keep the default unless the best beats it by PCT percent in the
                   final A/B comparison (default 2: noise on a shared VM is about that)
  --rows LIST      block_rows candidates (multiples of 8; the kernel rounds them up to
                   its tile rows, 6 on AVX-512), comma-separated
  --keys LIST      block_keys candidates (multiples of 32; the kernel rounds them up to
                   its key panel, 64 on AVX-512), comma-separated
  --isa NAME       tune for another ISA level (src/kernels/variants.inc) than the active one (the tool
                   re-runs itself with FLASHCPU_ISA=NAME, as the ISA is fixed per process);
                   "all" tunes every ISA this CPU supports, one after another, into one file
  --help           this text

File format (what flashcpu::load_tuning parses): plain text; a line starting with '#' is
a comment, blank lines are ignored; one entry per line, fields separated by spaces:
    <isa> <head_dim> <block_rows> <block_keys>
    <isa> min_flops_per_thread <flops>
e.g. "avx512 64 144 256". The tool writes a header comment with the date, CPU, workload
and the default vs tuned GFLOP/s of each D.

Threads: with 2 or more threads, the tool also times short calls (16 heads, D = 64,
N = M from 8 to 64 for fp32, 0.26 to 16.8 MFLOP; from 24 to 96 for a level's bf16 kernels)
at one thread against all of them, 21 rounds of a pair of batches per size, and writes
the least FLOPs per thread from which the threads won by --min-gain, and lost at no
larger size (flashcpu::min_flops_per_thread; a call with num_threads = 0 takes
floor(FLOPs / that) threads).

Using the file: the library loads it on first use when the environment variable
FLASHCPU_TUNING_FILE names it (export FLASHCPU_TUNING_FILE=$PWD/flashcpu-tuning.txt), or
when a program calls flashcpu::load_tuning("flashcpu-tuning.txt"). Entries for other
ISAs or head dimensions are ignored; a head dimension without an entry keeps the
built-in default.

Notes: run on an otherwise idle machine; on a shared VM repeat and keep gains above
~5%% only. If FLASHCPU_TUNING_FILE is already set, "default" means that file's entries.
)");
}

bool parse_list(const std::string& s, std::vector<std::int64_t>* out) {
  out->clear();
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v <= 0) return false;
    out->push_back(v);
  }
  return !out->empty();
}

bool parse_workload(const std::string& s, Workload* w) {
  std::vector<std::string> f;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ':')) f.push_back(item);
  if (f.size() != 4 && f.size() != 5) return false;
  std::int64_t v[4];
  for (int i = 0; i < 4; ++i) {
    char* end = nullptr;
    v[i] = std::strtoll(f[std::size_t(i)].c_str(), &end, 10);
    if (f[std::size_t(i)].empty() || *end != '\0' || v[i] <= 0) return false;
  }
  if (f.size() == 5 && f[4] != "causal" && f[4] != "c") return false;
  *w = {v[0], v[1], v[2], v[3], f.size() == 5};
  return true;
}

bool parse(int argc, char** argv, Options* o) {
  bool rows_set = false, keys_set = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&](std::string* out) {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "flashcpu-tune: %s needs a value\n", a.c_str());
        return false;
      }
      *out = argv[++i];
      return true;
    };
    std::string v;
    std::vector<std::int64_t> list;
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    } else if (a == "--quick") {
      o->quick = true;
    } else if (a == "--out") {
      if (!next(&o->out)) return false;
    } else if (a == "--isa") {
      if (!next(&o->isa)) return false;
    } else if (a == "--dims" || a == "--rows" || a == "--keys") {
      if (!next(&v) || !parse_list(v, &list)) {
        std::fprintf(stderr,
                     "flashcpu-tune: %s needs a comma-separated list of positive integers\n",
                     a.c_str());
        return false;
      }
      if (a == "--dims") {
        o->dims = list;
      } else {
        std::vector<int>& dst = a == "--rows" ? o->rows : o->keys;
        dst.assign(list.begin(), list.end());
        (a == "--rows" ? rows_set : keys_set) = true;
      }
    } else if (a == "--threads" || a == "--reps") {
      if (!next(&v) || !parse_list(v, &list) || list.size() != 1) {
        std::fprintf(stderr, "flashcpu-tune: %s needs a positive integer\n", a.c_str());
        return false;
      }
      (a == "--threads" ? o->threads : o->reps) = int(list[0]);
    } else if (a == "--min-gain") {
      if (!next(&v)) return false;
      char* end = nullptr;
      o->min_gain = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || o->min_gain < 0) {
        std::fprintf(stderr, "flashcpu-tune: --min-gain needs a non-negative percentage\n");
        return false;
      }
    } else if (a == "--workload") {
      Workload w{};
      if (!next(&v) || !parse_workload(v, &w)) {
        std::fprintf(stderr, "flashcpu-tune: --workload needs B:H:N:M or B:H:N:M:causal\n");
        return false;
      }
      o->workloads.push_back(w);
    } else {
      std::fprintf(stderr, "flashcpu-tune: unknown argument '%s' (see --help)\n", a.c_str());
      return false;
    }
  }
  if (o->quick) {
    if (!rows_set) o->rows = kQuickRows;
    if (!keys_set) o->keys = kQuickKeys;
  }
  if (o->workloads.empty()) {
    o->workloads.push_back({1, 8, o->quick ? 1024 : 2048, o->quick ? 1024 : 2048, false});
    o->workloads.push_back({1, 8, 256, 256, false});
  }
  return true;
}

std::string today() {
  char buf[64];
  const std::time_t t = std::time(nullptr);
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S %Z", std::localtime(&t));
  return buf;
}

std::string duration(double s) {
  char buf[32];
  const long t = std::lround(s);
  std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  return buf;
}

std::string workload_str(const std::vector<Workload>& ws) {
  std::string s;
  for (const Workload& w : ws) {
    if (!s.empty()) s += "; ";
    s += "B=" + std::to_string(w.batch) + " H=" + std::to_string(w.heads) +
         " N=" + std::to_string(w.n) + " M=" + std::to_string(w.m) + (w.causal ? " causal" : "");
  }
  return s;
}

// The path of this executable, for re-running with FLASHCPU_ISA set.
std::string self_exe(const char* argv0) {
  char buf[4096];
  const ssize_t len = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (len <= 0) return argv0;
  buf[len] = '\0';
  return buf;
}

// Runs this tool again with FLASHCPU_ISA=isa and the given arguments; returns its
// exit status.
int run_child(const std::string& exe, const std::string& isa,
              const std::vector<std::string>& args) {
  std::vector<char*> cargv;
  cargv.push_back(const_cast<char*>(exe.c_str()));
  for (const std::string& a : args) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return 127;
  if (pid == 0) {
    setenv("FLASHCPU_ISA", isa.c_str(), 1);
    execv(exe.c_str(), cargv.data());
    std::perror("flashcpu-tune: execv");
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

// Our own arguments minus "--isa X" and "--out F".
std::vector<std::string> forwarded_args(int argc, char** argv) {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--isa" || a == "--out") {
      ++i;
      continue;
    }
    args.push_back(a);
  }
  return args;
}

// Progress on stderr: one rewritten line on a terminal, a line per step otherwise.
void progress(const std::string& line, bool final_line) {
  static const bool tty = isatty(STDERR_FILENO) != 0;
  if (tty) {
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final_line ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

struct Bench {
  std::vector<fb::Problem> problems;
  int threads;
  int reps;

  // Geometric mean over the workloads of GFLOP/s (median of reps, after a warm-up).
  double score() {
    double log_sum = 0;
    for (fb::Problem& p : problems) {
      fb::run(fb::Impl::fused, p, threads);  // warm-up (and any per-call setup)
      std::vector<double> t;
      for (int r = 0; r < reps; ++r) {
        const double t0 = fb::now_seconds();
        fb::run(fb::Impl::fused, p, threads);
        t.push_back(fb::now_seconds() - t0);
      }
      log_sum += std::log(fb::attention_flops(p.shape) / fb::median(t) * 1e-9);
    }
    return std::exp(log_sum / double(problems.size()));
  }
};

struct DimResult {
  std::int64_t dim;
  flashcpu::TileConfig def, best;
  double def_gflops, best_gflops;
};

bool same(const flashcpu::TileConfig& a, const flashcpu::TileConfig& b) {
  return a.block_rows == b.block_rows && a.block_keys == b.block_keys;
}

std::string tiles(const flashcpu::TileConfig& t) {
  return "br=" + std::to_string(t.block_rows) + " bc=" + std::to_string(t.block_keys);
}

// What the tiles under the active level's name drive: its fp32 variant, or, on a level
// whose variants compute bf16 products (amx, avx512bf16), its bf16 prefill kernel. Such a
// level runs its fp32 calls on the level below, whose entries are tuned under that
// level's name (--isa avx512), so it is timed on bf16 data.
struct TuningTarget {
  const flashcpu::detail::KernelTable* kernels;
  fb::DType dtype;
};
TuningTarget tuning_target() {
  namespace fd = flashcpu::detail;
  const fd::KernelTable& bf16 = fd::active_kernels(fd::DType::bf16);
  if (bf16.bf16_products) return {&bf16, fb::DType::bf16};
  return {&fd::active_kernels(fd::DType::f32), fb::DType::fp32};
}

// The least work per thread (flashcpu::min_flops_per_thread): the smallest call from which
// `threads` threads beat one, on 16 heads of N = M = n, D = 64, in the tiles' data type:
// n from 8 to 64 (0.26 to 16.8 MFLOP) for fp32; for bf16 (a level with bf16 products)
// from 24 to 96 (2.4 to 38 MFLOP), since bf16 calls of 16 queries or fewer decode on the
// level below, whose own entry covers them. 21 rounds over the sizes, each a pair of
// batches of calls (about 5 ms each) at one thread and at `threads`, in alternating
// order; a size's ratio is the median over its pairs of one thread's time over the
// threads' time. The threads take a call of F FLOPs when F >= threads x the entry
// (thread_count, src/plan.hpp), so the entry is F / threads for the smallest F whose
// ratio is at least 1 + min_gain with no larger size's below 1, or the built-in default
// if that is lower and the smallest size qualified (nothing was measured below it). If no
// size qualifies, the largest one (threads only above `threads` times the largest size);
// with one thread, nothing is measured.
struct ThreadsResult {
  bool measured = false;
  double min_flops = 0;
  std::vector<std::pair<double, double>> ratios;  // (FLOPs, median ratio) per size
};

ThreadsResult measure_min_flops(fb::DType dtype, int threads, double min_gain) {
  ThreadsResult res;
  if (threads < 2) return res;
  constexpr int kRounds = 21;
  constexpr double kBatchSeconds = 5e-3;
  const std::vector<std::int64_t> lengths = dtype == fb::DType::bf16 ? std::vector<std::int64_t>{24, 32, 48, 64, 96}
                                                                     : std::vector<std::int64_t>{8, 12, 16, 24, 32, 48, 64};
  std::vector<fb::Problem> problems;
  std::vector<int> calls;
  for (std::int64_t n : lengths) {
    fb::Shape shape = fb::mha(1, 16, n, n, 64, false);
    shape.dtype = dtype;
    problems.emplace_back(shape);
    fb::Problem& p = problems.back();
    fb::run(fb::Impl::fused, p, 1);  // warm-up
    fb::run(fb::Impl::fused, p, threads);
    const double t0 = fb::now_seconds();
    for (int i = 0; i < 20; ++i) fb::run(fb::Impl::fused, p, 1);
    calls.push_back(std::max(5, int(kBatchSeconds / std::max((fb::now_seconds() - t0) / 20, 1e-7))));
  }
  // Each batch starts after a pause, so that OpenMP's idle workers, which spin for a
  // while after a region, have gone to sleep and do not share a core (or a hyperthread's
  // sibling) with a one-thread batch. (Under OMP_WAIT_POLICY=active they never sleep;
  // the file records the policy.)
  auto batch = [&](std::size_t s, int t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    const double start = fb::now_seconds();
    for (int i = 0; i < calls[s]; ++i) fb::run(fb::Impl::fused, problems[s], t);
    return fb::now_seconds() - start;
  };
  // Rounds over every size in turn, so that a slow spell of a shared machine falls on
  // all sizes rather than on one.
  std::vector<std::vector<double>> ratios(lengths.size());
  for (int r = 0; r < kRounds; ++r) {
    for (std::size_t s = 0; s < lengths.size(); ++s) {
      double one, many;
      if ((r + int(s)) % 2 == 0) {
        one = batch(s, 1);
        many = batch(s, threads);
      } else {
        many = batch(s, threads);
        one = batch(s, 1);
      }
      ratios[s].push_back(one / many);
    }
  }
  for (std::size_t s = 0; s < lengths.size(); ++s)
    res.ratios.emplace_back(fb::attention_flops(problems[s].shape), fb::median(ratios[s]));
  res.measured = true;
  // The smallest size where the threads won by min_gain, with no larger size where they
  // lost; else the largest size.
  res.min_flops = res.ratios.back().first;
  std::size_t from = res.ratios.size();
  for (std::size_t i = res.ratios.size(); i-- > 0;) {
    if (res.ratios[i].second < 1.0) break;
    if (res.ratios[i].second >= 1.0 + min_gain / 100.0) from = i;
  }
  if (from < res.ratios.size()) res.min_flops = res.ratios[from].first / threads;
  // Won at the smallest size: the threshold lies somewhere below, so a lower default stands.
  if (from == 0) res.min_flops = std::min(res.min_flops, flashcpu::detail::kMinFlopsPerThread);
  return res;
}

int tune(const Options& o) {
  const std::string isa = flashcpu::active_isa();
  const TuningTarget target = tuning_target();
  const int threads = fb::resolve_threads(o.threads);
  if (const char* f = std::getenv("FLASHCPU_TUNING_FILE")) {
    std::fprintf(stderr, "note: FLASHCPU_TUNING_FILE=%s is set: the baseline is its entries\n", f);
  }
  // The baseline, read before any set_tile_config call.
  std::vector<flashcpu::TileConfig> defaults;
  for (std::int64_t d : o.dims) defaults.push_back(flashcpu::detail::tiles_for(*target.kernels, d));

  std::fprintf(stderr, "flashcpu-tune: isa %s (%s on %s data), %d threads, dims", isa.c_str(),
               target.kernels->name, fb::dtype_name(target.dtype), threads);
  for (std::int64_t d : o.dims) std::fprintf(stderr, " %lld", static_cast<long long>(d));
  std::fprintf(stderr, ", %zu x %zu candidates, workload %s, median of %d\n", o.rows.size(),
               o.keys.size(), workload_str(o.workloads).c_str(), o.reps);

  const std::size_t per_dim = o.rows.size() * o.keys.size();
  const std::size_t total = per_dim * o.dims.size();
  std::size_t done = 0;
  const double start = fb::now_seconds();
  std::vector<DimResult> results;

  for (std::size_t di = 0; di < o.dims.size(); ++di) {
    const std::int64_t d = o.dims[di];
    Bench bench{{}, threads, o.reps};
    for (const Workload& w : o.workloads) {
      fb::Shape shape = fb::mha(w.batch, w.heads, w.n, w.m, d, w.causal);
      shape.dtype = target.dtype;
      bench.problems.emplace_back(shape);
    }
    DimResult res{d, defaults[di], defaults[di], 0, 0};
    double best = 0;
    std::size_t idx = 0;
    for (int br : o.rows) {
      for (int bc : o.keys) {
        ++idx;
        ++done;
        const flashcpu::TileConfig cand{br, bc};
        std::string line;
        try {
          flashcpu::set_tile_config(isa, d, cand);
          const double g = bench.score();
          if (g > best) {
            best = g;
            res.best = cand;
          }
          char buf[96];
          std::snprintf(buf, sizeof buf, "%7.1f GFLOP/s", g);
          line = buf;
        } catch (const flashcpu::Error& e) {
          line = std::string("rejected: ") + e.what();
        }
        const double elapsed = fb::now_seconds() - start;
        const double eta = elapsed / double(done) * double(total - done);
        char head[160];
        std::snprintf(head, sizeof head, "[%zu/%zu] D=%lld %zu/%zu br=%d bc=%d: ", done, total,
                      static_cast<long long>(d), idx, per_dim, br, bc);
        char tail[160];
        std::snprintf(tail, sizeof tail, " | best %.1f (%s) | ETA %s", best,
                      tiles(res.best).c_str(), duration(eta).c_str());
        progress(head + line + tail, false);
      }
    }

    // Default vs best, alternating, so drift on a shared machine hits both alike.
    std::vector<double> gd, gb;
    for (int r = 0; r < 2 * o.reps + 1; ++r) {
      flashcpu::set_tile_config(isa, d, defaults[di]);
      gd.push_back(bench.score());
      flashcpu::set_tile_config(isa, d, res.best);
      gb.push_back(bench.score());
    }
    res.def_gflops = fb::median(gd);
    res.best_gflops = fb::median(gb);
    if (same(res.best, res.def)) {  // the default won the search: one figure for both
      gd.insert(gd.end(), gb.begin(), gb.end());
      res.def_gflops = res.best_gflops = fb::median(gd);
    } else if (best == 0 || res.best_gflops < res.def_gflops * (1.0 + o.min_gain / 100.0)) {
      // Not clearly better than the default (noise on a shared machine): keep it.
      res.best = res.def;
      res.best_gflops = res.def_gflops;
    }
    flashcpu::set_tile_config(isa, d, res.best);
    char buf[200];
    std::snprintf(
        buf, sizeof buf, "D=%lld: default %s %.1f GFLOP/s -> tuned %s %.1f GFLOP/s (%+.1f%%)",
        static_cast<long long>(d), tiles(res.def).c_str(), res.def_gflops, tiles(res.best).c_str(),
        res.best_gflops, 100.0 * (res.best_gflops / res.def_gflops - 1.0));
    progress(buf, true);
    results.push_back(res);
  }

  progress("threads: timing 1 against " + std::to_string(threads) + " threads on short calls", false);
  const ThreadsResult split = measure_min_flops(target.dtype, threads, o.min_gain);
  // The entry as written: a whole number in the range the file accepts.
  const double min_flops = std::clamp(std::round(split.min_flops), 1.0, flashcpu::detail::kMaxMinFlopsPerThread);
  if (split.measured) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "min_flops_per_thread: %.0f (default %.0f)", min_flops,
                  flashcpu::detail::kMinFlopsPerThread);
    progress(buf, true);
    if (threads > omp_get_num_procs())
      std::fprintf(stderr,
                   "flashcpu-tune: warning: %d threads on %d processors: the threads' times include "
                   "oversubscription\n",
                   threads, omp_get_num_procs());
  } else {
    progress("min_flops_per_thread: not measured with one thread", true);
  }

  std::ofstream out(o.out);
  if (!out) {
    std::fprintf(stderr, "flashcpu-tune: cannot write %s\n", o.out.c_str());
    return 1;
  }
  auto list = [](const std::vector<int>& v) {
    std::string s;
    for (int x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
    return s;
  };
  out << "# flashcpu tuning file, written by flashcpu-tune\n"
      << "# date: " << today() << "\n"
      << "# cpu: " << fb::cpu_model() << ", " << threads << " threads\n"
      << "# isa: " << isa << " (" << target.kernels->name << " on " << fb::dtype_name(target.dtype) << " data)\n"
      << "# workload: " << workload_str(o.workloads) << "; D = Dv = head_dim; score = geometric"
      << " mean of GFLOP/s, median of " << o.reps << "\n"
      << "# candidates: block_rows {" << list(o.rows) << "} x block_keys {" << list(o.keys) << "}\n"
      << "# format: <isa> <head_dim> <block_rows> <block_keys>; <isa> min_flops_per_thread <flops>\n";
  for (const DimResult& r : results) {
    char buf[200];
    std::snprintf(
        buf, sizeof buf, "# D=%lld: default %s %.1f GFLOP/s, tuned %s %.1f GFLOP/s (%+.1f%%)\n",
        static_cast<long long>(r.dim), tiles(r.def).c_str(), r.def_gflops, tiles(r.best).c_str(),
        r.best_gflops, 100.0 * (r.best_gflops / r.def_gflops - 1.0));
    out << buf;
  }
  if (split.measured) {
    // The OpenMP wait policy decides what a region's start costs: with "passive" the
    // workers sleep between calls and each call wakes them (on a 2-core KVM guest the
    // threads then lost at every size measured, up to 17 MFLOP for fp32).
    const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
    out << "# threads: OMP_WAIT_POLICY=" << (wait_policy ? wait_policy : "(unset)")
        << "; 16 heads, N = M = n, D = 64, median over 21 pairs of 1-thread time / " << threads
        << "-thread time:";
    for (const auto& [flops, ratio] : split.ratios) {
      char buf[64];
      std::snprintf(buf, sizeof buf, " %.2f MFLOP %.2f", flops * 1e-6, ratio);
      out << buf;
    }
    out << "\n";
  }
  for (const DimResult& r : results) {
    out << isa << ' ' << r.dim << ' ' << r.best.block_rows << ' ' << r.best.block_keys << '\n';
  }
  if (split.measured) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "%.0f", min_flops);
    out << isa << " min_flops_per_thread " << buf << '\n';
  }
  out.close();

  // Read it back through the library, as a user's program would.
  flashcpu::load_tuning(o.out);
  for (const DimResult& r : results) {
    if (!same(flashcpu::detail::tiles_for(*target.kernels, r.dim), r.best)) {
      std::fprintf(stderr, "flashcpu-tune: %s does not round-trip for D=%lld\n", o.out.c_str(),
                   static_cast<long long>(r.dim));
      return 1;
    }
  }
  if (split.measured && flashcpu::min_flops_per_thread(isa) != min_flops) {
    std::fprintf(stderr, "flashcpu-tune: %s does not round-trip min_flops_per_thread\n", o.out.c_str());
    return 1;
  }
  std::fprintf(stderr, "wrote %s (%s); use it with FLASHCPU_TUNING_FILE=%s\n", o.out.c_str(),
               duration(fb::now_seconds() - start).c_str(), o.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, &o)) return 2;
  const std::string exe = self_exe(argv[0]);

  if (o.isa == "all") {
    // One child per supported ISA, each with FLASHCPU_ISA set, into temporary files
    // that are then concatenated (every line keeps its meaning in one file).
    std::string merged;
    for (int l = flashcpu::variant_list::kLevelCount - 1; l >= 0; --l) {  // best first
      const char* isa = flashcpu::variant_list::kLevels[l];
      if (!flashcpu::isa_supported(isa)) {
        std::fprintf(stderr, "flashcpu-tune: %s not supported here, skipped\n", isa);
        continue;
      }
      const std::string part = o.out + "." + isa + ".part";
      std::vector<std::string> args = forwarded_args(argc, argv);
      args.insert(args.end(), {"--isa", isa, "--out", part});
      const int rc = run_child(exe, isa, args);
      if (rc != 0) {
        std::fprintf(stderr, "flashcpu-tune: tuning %s failed (exit %d)\n", isa, rc);
        return rc;
      }
      std::ifstream in(part);
      std::stringstream ss;
      ss << in.rdbuf();
      merged += ss.str() + "\n";
      std::remove(part.c_str());
    }
    std::ofstream out(o.out);
    out << merged;
    if (!out) {
      std::fprintf(stderr, "flashcpu-tune: cannot write %s\n", o.out.c_str());
      return 1;
    }
    out.close();
    flashcpu::load_tuning(o.out);  // raises if the merged file does not parse
    std::fprintf(stderr, "wrote %s for every supported ISA\n", o.out.c_str());
    return 0;
  }

  if (!o.isa.empty() && o.isa != flashcpu::active_isa()) {
    if (!flashcpu::isa_supported(o.isa)) {
      std::fprintf(stderr, "flashcpu-tune: this CPU cannot run %s\n", o.isa.c_str());
      return 2;
    }
    const char* env = std::getenv("FLASHCPU_ISA");
    if (env != nullptr && o.isa == env) {  // already re-run, still not active
      std::fprintf(stderr, "flashcpu-tune: FLASHCPU_ISA=%s did not select %s (active: %s)\n", env,
                   o.isa.c_str(), flashcpu::active_isa().c_str());
      return 2;
    }
    std::vector<std::string> args = forwarded_args(argc, argv);
    args.insert(args.end(), {"--isa", o.isa, "--out", o.out});
    return run_child(exe, o.isa, args);
  }

  try {
    return tune(o);
  } catch (const flashcpu::Error& e) {
    std::fprintf(stderr, "flashcpu-tune: %s\n", e.what());
    return 1;
  }
}
