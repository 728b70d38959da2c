// flashcpu-sweep: sequence-length scaling of fused vs naive vs OpenBLAS attention.
//
// For N = M = min, 2*min, ..., max (B=1, H=4, D=64, fp32 by default) it times each
// implementation (median of --reps calls after one untimed first call; the
// implementations take turns, each call right after its own FMA probe), measures the
// peak working memory of that first call (RSS high-water mark growth beyond the
// resident inputs, via /proc/self/clear_refs), checks every output against the fused
// one and, at a reduced size, against the fp64 oracle, prints a table and writes a
// CSV that tools/plot_scaling.py plots and tools/bench_report renders.
// Run with --help for the options.
#include "common.hpp"

#include <omp.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace fb = flashcpu::bench;
using fb::Impl;

namespace {

struct Options {
  std::int64_t min_n = 256, max_n = 16384;
  std::int64_t heads = 4, dim = 64, batch = 1;
  bool causal = false;
  fb::DType dtype = fb::DType::fp32;
  bool also = false;  // --also-dtype: a second fused line of another type, in the same rounds
  fb::DType also_dtype = fb::DType::fp32;
  int threads = 0;
  int reps = 5;
  std::int64_t naive_max = 1 << 30;  // the textbook naive runs at every size by default
  std::int64_t reference_max = 0;    // the fp64 oracle only with --reference
  bool blas = true;
  std::string csv = "flashcpu-scaling.csv";
};

void usage(FILE* to) {
  std::fprintf(to,
               R"(flashcpu-sweep: time and memory of attention as the sequence grows.

For N = M = MIN, 2*MIN, ..., MAX it runs
  fused          flashcpu::attention (tiled, online softmax: no N x M matrix)
  naive          textbook fp32: plain loops, one score row per thread, std::exp,
                 OpenMP over heads and rows, compiled -O3 -march=native
  openblas       materialized: sgemm, row softmax, sgemm, its score buffers allocated
                 once (with --causal it skips the key blocks a query block cannot see)
  openblas_full  with --causal only: the same over the whole masked N x M square
  reference      the fp64 oracle, only with --reference
With --dtype other than fp32, fused calls the flashcpu::attention overload of those
types, and the baselines widen the 16-bit inputs to fp32 inside each timed call (and
round a 16-bit output back), as a user of an fp32 implementation would have to.

Each implementation gets one untimed first call, during which its peak working memory
is measured (growth of the process's peak RSS beyond the resident inputs, reset with
/proc/self/clear_refs) and its output is checked against the fused one (a mismatch
aborts). Then the implementations take turns for REPS rounds, each call right after a
short FMA probe; the median time is reported, and %%peak is the median of the
per-call ratios to their probes. GFLOP/s counts useful work only, 4*B*H*N*M*D (about
half that with --causal).

If OpenBLAS picked kernels below what this CPU runs, the program re-runs itself once
with OPENBLAS_CORETYPE set to the best core the CPU supports (unless the caller set
the variable), and the header and CSV name the core that ran.

Options:
  --min N              smallest N = M (default 256)
  --max N              largest N = M (default 16384); both are rounded to powers of 2
  --heads H            heads (default 4)
  --dim D              head dimension, D = Dv (default 64)
  --batch B            batch (default 1)
  --causal             causal attention (bottom-right aligned)
  --dtype T            data types (default fp32): bf16 or fp16 (q, k, v and out), bf16kv
                       or fp16kv (fp32 q and out over 16-bit K/V)
  --also-dtype T       also run fused on data of type T (one of the above), as one more
                       implementation "fused_T" taking its turn in the same rounds: e.g.
                       --also-dtype bf16 puts the bf16 kernels (AMX where they run) beside
                       fp32; checked against the fp64 oracle at a reduced size
  --threads T          threads for every implementation (default: OpenMP's)
  --reps R             timed calls per point (default 5; 3 with --quick)
  --quick              N = M from 256 to 4096 and 3 reps: about a minute
  --no-naive-above N   skip the naive baseline when N > this (default: never; at
                       N = 16384 it takes tens of seconds per call); skipped points
                       appear as "skipped"
  --reference N        also run the fp64 oracle up to N = N (it holds an N x N double
                       matrix per thread: 2 GiB at 16384)
  --no-blas            leave out the OpenBLAS baseline
  --csv FILE           CSV output (default flashcpu-scaling.csv): one row per (N, impl)
  --help               this text

Environment: OMP_NUM_THREADS, FLASHCPU_ISA, FLASHCPU_TUNING_FILE, OPENBLAS_CORETYPE,
FLASHCPU_BENCH_BLAS_THREADING=blas (threaded OpenBLAS instead of OpenMP over heads;
then also set OMP_WAIT_POLICY=PASSIVE), FLASHCPU_BENCH_COMMIT (recorded in the CSV).
See bench/README.md.
Plot: python3 tools/plot_scaling.py FILE.csv FILE.png
)");
}

bool parse_int(const char* s, std::int64_t* out) {
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || v < 0) return false;
  *out = v;
  return true;
}

std::int64_t round_pow2(std::int64_t x) {
  std::int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

bool parse(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](std::int64_t* out) {
      if (i + 1 >= argc || !parse_int(argv[i + 1], out)) {
        std::fprintf(stderr, "flashcpu-sweep: %s needs a non-negative integer\n", a.c_str());
        return false;
      }
      ++i;
      return true;
    };
    std::int64_t v = 0;
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    } else if (a == "--min") {
      if (!value(&o->min_n)) return false;
    } else if (a == "--max") {
      if (!value(&o->max_n)) return false;
    } else if (a == "--heads") {
      if (!value(&o->heads)) return false;
    } else if (a == "--dim") {
      if (!value(&o->dim)) return false;
    } else if (a == "--batch") {
      if (!value(&o->batch)) return false;
    } else if (a == "--threads") {
      if (!value(&v)) return false;
      o->threads = int(v);
    } else if (a == "--reps") {
      if (!value(&v)) return false;
      o->reps = int(std::max<std::int64_t>(1, v));
    } else if (a == "--no-naive-above") {
      if (!value(&o->naive_max)) return false;
    } else if (a == "--reference") {
      if (!value(&o->reference_max)) return false;
    } else if (a == "--causal") {
      o->causal = true;
    } else if (a == "--dtype") {
      if (i + 1 >= argc || !fb::parse_dtype(argv[i + 1], &o->dtype)) {
        std::fprintf(stderr, "flashcpu-sweep: --dtype needs fp32, bf16, fp16, bf16kv or fp16kv\n");
        return false;
      }
      ++i;
    } else if (a == "--also-dtype") {
      if (i + 1 >= argc || !fb::parse_dtype(argv[i + 1], &o->also_dtype)) {
        std::fprintf(stderr, "flashcpu-sweep: --also-dtype needs fp32, bf16, fp16, bf16kv or fp16kv\n");
        return false;
      }
      o->also = true;
      ++i;
    } else if (a == "--quick") {
      o->min_n = 256;
      o->max_n = 4096;
      o->reps = 3;
    } else if (a == "--no-blas") {
      o->blas = false;
    } else if (a == "--csv") {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "flashcpu-sweep: --csv needs a file name\n");
        return false;
      }
      o->csv = argv[++i];
    } else {
      std::fprintf(stderr, "flashcpu-sweep: unknown argument '%s' (see --help)\n", a.c_str());
      return false;
    }
  }
  if (o->min_n < 1 || o->max_n < o->min_n || o->heads < 1 || o->dim < 1 || o->batch < 1) {
    std::fprintf(stderr, "flashcpu-sweep: need 1 <= --min <= --max, and positive sizes\n");
    return false;
  }
  if (o->also && o->also_dtype == o->dtype) {
    std::fprintf(stderr, "flashcpu-sweep: --also-dtype %s is the sweep's own type\n", fb::dtype_name(o->dtype));
    return false;
  }
  o->min_n = round_pow2(o->min_n);
  o->max_n = std::max(o->min_n, round_pow2(o->max_n));
  return true;
}

// One implementation on one data type: a column of the table, a line of the plot, the
// "impl" of the CSV (fused_<dtype> for --also-dtype).
struct Lane {
  Impl impl;
  fb::DType dtype;
  std::string name;
};

struct Result {
  std::int64_t n = 0;
  std::size_t lane = 0;
  Impl impl = Impl::fused;
  bool skipped = false;
  std::string note;
  double ms = 0, gflops = 0, peak_frac = 0, extra_mib = -1, analytic_mib = -1;
};

// Progress on stderr: one rewritten line on a terminal, one line per step otherwise.
class Progress {
 public:
  explicit Progress(int total) : total_(total), tty_(isatty(STDERR_FILENO) != 0) {}
  // A transient step (a repetition) is shown on a terminal only.
  void step(const char* impl, std::int64_t n, const std::string& what, bool transient = false) {
    if (transient && !tty_) return;
    std::fprintf(stderr, tty_ ? "\r\033[K[%d/%d] %s N=%lld %s" : "[%d/%d] %s N=%lld %s\n", current_,
                 total_, impl, static_cast<long long>(n), what.c_str());
    std::fflush(stderr);
  }
  void next() { ++current_; }
  void done() {
    if (tty_) std::fprintf(stderr, "\r\033[K");
  }

 private:
  int total_;
  int current_ = 1;
  bool tty_;
};

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

std::string mem_str(double mib) { return mib < 0 ? "n/a" : fmt("%.1f", mib); }

}  // namespace

int main(int argc, char** argv) {
  fb::choose_openblas_core(argv);  // may re-execute this program once; before anything else
  Options o;
  if (!parse(argc, argv, &o)) return 2;
  const int threads = fb::resolve_threads(o.threads);
  const bool blas = o.blas && fb::have_openblas();

  std::vector<Impl> impls = {Impl::fused, Impl::naive};
  if (blas) impls.push_back(Impl::openblas);
  if (blas && o.causal) impls.push_back(Impl::openblas_full);
  if (o.reference_max > 0) impls.push_back(Impl::reference);
  std::vector<Lane> lanes;
  for (Impl impl : impls) lanes.push_back({impl, o.dtype, fb::impl_name(impl)});
  if (o.also) lanes.push_back({Impl::fused, o.also_dtype, std::string("fused_") + fb::dtype_name(o.also_dtype)});
  auto skipped_at = [&](Impl impl, std::int64_t n) {
    return (impl == Impl::naive && n > o.naive_max) ||
           (impl == Impl::reference && n > o.reference_max);
  };
  std::vector<std::int64_t> ns;
  for (std::int64_t n = o.min_n; n <= o.max_n; n *= 2) ns.push_back(n);
  int total = 0;
  for (std::int64_t n : ns) {
    for (const Lane& lane : lanes) total += skipped_at(lane.impl, n) ? 0 : 1;
  }

  const char* wait = std::getenv("OMP_WAIT_POLICY");
  const char* commit_env = std::getenv("FLASHCPU_BENCH_COMMIT");
  const std::string commit = commit_env ? commit_env : "unknown";
  const std::string cpu = fb::cpu_model();
  const fb::OpenblasInfo blas_info = fb::openblas_info();
  fb::Shape base = fb::mha(o.batch, o.heads, 1, 1, o.dim, o.causal);
  base.dtype = o.dtype;
  // The kernel and route of the sweep's calls, named at its first N: the route depends on
  // N (a short prompt takes the decode driver), so the last N adds its own when it differs.
  auto sweep_label = [&](fb::DType dtype) {
    auto at = [&](std::int64_t n) {
      fb::Shape s = base;
      s.n = s.m = n;
      s.dtype = dtype;
      return fb::impl_label(Impl::fused, s);
    };
    const std::string first = at(ns.front()), last = at(ns.back());
    return first == last ? first : first + "; at N = M = " + std::to_string(ns.back()) + ": " + last;
  };
  const std::string fused_label = sweep_label(o.dtype);
  std::fprintf(stderr, "flashcpu-sweep: %s; isa %s (%s), %d threads, OMP_WAIT_POLICY=%s\n",
               cpu.c_str(), flashcpu::active_isa().c_str(), fused_label.c_str(), threads,
               wait ? wait : "(unset)");
  std::fprintf(stderr, "OpenBLAS: %s\n",
               blas ? (blas_info.core + " (" + blas_info.note + "), " +
                       fb::blas_threading_name(fb::default_blas_threading()))
                          .c_str()
                    : (fb::have_openblas() ? "off (--no-blas)" : "not built"));
  std::fprintf(stderr, "measuring FMA peak ...\n");
  const double peak = fb::fma_peak_gflops(threads);
  std::fprintf(stderr, "FMA peak %.1f GFLOP/s (%s, %d threads)\n", peak,
               fb::fma_peak_isa(threads).c_str(), threads);

  std::vector<Result> results;
  Progress progress(total);
  for (std::int64_t n : ns) {
    // One problem per data type (the same values: fb::Problem draws them from its shape).
    std::map<fb::DType, fb::Problem> problems;
    std::map<fb::DType, fb::Shape> shapes;
    for (const Lane& lane : lanes) {
      fb::Shape shape = base;
      shape.n = shape.m = n;
      shape.dtype = lane.dtype;
      shapes.emplace(lane.dtype, shape);
      problems.try_emplace(lane.dtype, shape);
    }
    const double flop = fb::attention_flops(shapes.at(o.dtype));
    fb::Buffer fused_out;
    std::map<std::size_t, fb::MaterializedWorkspace> workspaces;
    std::vector<std::size_t> timed;
    std::map<std::size_t, std::vector<double>> times, ratios;
    const std::size_t first = results.size();
    for (std::size_t l = 0; l < lanes.size(); ++l) {
      const Lane& lane = lanes[l];
      fb::Problem& p = problems.at(lane.dtype);
      Result r;
      r.n = n;
      r.lane = l;
      r.impl = lane.impl;
      r.analytic_mib = fb::analytic_mib(lane.impl, shapes.at(lane.dtype), threads);
      if (skipped_at(lane.impl, n)) {
        r.skipped = true;
        r.note = "N>" + std::to_string(lane.impl == Impl::naive ? o.naive_max : o.reference_max);
        results.push_back(r);
        continue;
      }
      progress.step(lane.name.c_str(), n, "first call (memory, check)");
      r.extra_mib = fb::measure_peak_extra_mib([&] { fb::run(lane.impl, p, o.threads, &workspaces[l]); });
      if (lane.dtype != o.dtype) {
        // Another type's fused line: its output is of that type; the oracle checks it.
      } else if (lane.impl == Impl::fused) {
        fused_out = fb::output_floats(p);
      } else {
        fb::check_output(lane.name.c_str(), p, "fused", fused_out.get());
      }
      fb::check_against_reference(lane.impl, shapes.at(lane.dtype), o.threads);
      results.push_back(r);
      timed.push_back(l);
      progress.next();
    }
    // Rounds: every implementation once per round, each call right after its probe.
    for (int rep = 0; rep < o.reps; ++rep) {
      for (std::size_t l : timed) {
        progress.step(lanes[l].name.c_str(), n,
                      "rep " + std::to_string(rep + 1) + "/" + std::to_string(o.reps), true);
        fb::Problem& p = problems.at(lanes[l].dtype);
        const double probe = fb::fma_probe_now(threads);
        const double t0 = fb::now_seconds();
        fb::run(lanes[l].impl, p, o.threads, &workspaces[l]);
        const double t = fb::now_seconds() - t0;
        times[l].push_back(t);
        ratios[l].push_back(probe > 0 ? flop / t * 1e-9 / probe : 0.0);
      }
    }
    for (std::size_t i = first; i < results.size(); ++i) {
      Result& r = results[i];
      if (r.skipped) continue;
      const double t = fb::median(times[r.lane]);
      r.ms = t * 1e3;
      r.gflops = flop / t * 1e-9;
      r.peak_frac = fb::median(ratios[r.lane]);
    }
  }
  progress.done();

  // The table: one row per N, one column group per implementation (lane).
  auto find = [&](std::int64_t n, std::size_t lane) -> const Result* {
    for (const Result& r : results)
      if (r.n == n && r.lane == lane) return &r;
    return nullptr;
  };
  auto lane_of = [&](Impl impl) {  // the sweep's own type
    std::size_t l = 0;
    while (lanes[l].impl != impl || lanes[l].dtype != o.dtype) ++l;
    return l;
  };
  std::printf("\n%s (%s)\n", cpu.c_str(), fb::cpu_flags_summary(fb::cpu_flags()).c_str());
  const std::string dtype =
      o.dtype == fb::DType::fp32 ? "" : std::string(" ") + fb::dtype_name(o.dtype);
  std::printf("B=%lld H=%lld D=%lld%s%s, %d threads, isa %s, FMA peak %.1f GFLOP/s, median of %d\n",
              static_cast<long long>(o.batch), static_cast<long long>(o.heads),
              static_cast<long long>(o.dim), o.causal ? " causal" : "", dtype.c_str(), threads,
              fused_label.c_str(), peak, o.reps);
  if (blas) {
    std::printf("OpenBLAS core %s (%s); %s\n", blas_info.core.c_str(), blas_info.note.c_str(),
                blas_info.config.c_str());
  }
  if (o.dtype != fb::DType::fp32) {
    std::printf("%s: the baselines widen the 16-bit inputs to fp32 inside each timed call%s\n",
                fb::dtype_name(o.dtype),
                fb::act_elem(o.dtype) == fb::Elem::f32 ? "" : " and round the output back");
  }
  if (o.also) {
    std::printf("%s: fused on %s data (%s), GFLOP/s and %%peak against the same FLOP count\n",
                lanes.back().name.c_str(), fb::dtype_name(o.also_dtype), sweep_label(o.also_dtype).c_str());
  }
  std::printf("%7s", "N=M");
  for (const Lane& lane : lanes) std::printf(" | %-36s", lane.name.c_str());
  std::printf(" | %9s", "fused/nv");
  if (blas) std::printf(" | %9s", "fused/obl");
  if (o.also) std::printf(" | %9s", "fused/2nd");
  std::printf("\n%7s", "");
  for (size_t i = 0; i < lanes.size(); ++i)
    std::printf(" | %9s %8s %6s %9s", "ms", "GFLOP/s", "%peak", "extra MiB");
  std::printf(" | %9s", "speedup");
  if (blas) std::printf(" | %9s", "speedup");
  if (o.also) std::printf(" | %9s", "speedup");
  std::printf("\n");
  for (std::int64_t n : ns) {
    std::printf("%7lld", static_cast<long long>(n));
    for (std::size_t l = 0; l < lanes.size(); ++l) {
      const Result* r = find(n, l);
      if (r->skipped) {
        std::printf(" | %-36s", ("skipped (" + r->note + ")").c_str());
      } else {
        std::printf(" | %9.2f %8.1f %5.1f%% %9s", r->ms, r->gflops, 100 * r->peak_frac,
                    mem_str(r->extra_mib).c_str());
      }
    }
    const Result* f = find(n, lane_of(Impl::fused));
    const Result* nv = find(n, lane_of(Impl::naive));
    std::printf(" | %9s", nv->skipped ? "-" : (fmt("%.1f", nv->ms / f->ms) + "x").c_str());
    if (blas) {
      const Result* b = find(n, lane_of(Impl::openblas));
      std::printf(" | %9s", (fmt("%.2f", b->ms / f->ms) + "x").c_str());
    }
    if (o.also) {  // the second type's fused line: above 1, it is the faster
      const Result* a = find(n, lanes.size() - 1);
      std::printf(" | %9s", (fmt("%.2f", f->ms / a->ms) + "x").c_str());
    }
    std::printf("\n");
  }
  std::printf("extra MiB: peak RSS growth during one call beyond the resident inputs%s\n",
              results.empty() || results.front().extra_mib >= 0
                  ? ""
                  : " (n/a: /proc/self/clear_refs is not writable here)");

  std::ofstream csv(o.csv);
  if (!csv) {
    std::fprintf(stderr, "flashcpu-sweep: cannot write %s\n", o.csv.c_str());
    return 1;
  }
  // Free text goes into the CSV without its commas, so no field needs quoting.
  auto field = [](std::string text) {
    for (char& c : text) c = c == ',' ? ';' : c;
    return text;
  };
  csv << "n,m,batch,heads,dim,causal,dtype,threads,isa,impl,status,time_ms,gflops,peak_frac,"
         "peak_extra_mib,analytic_mib,reps,fma_peak_gflops,cpu_model,openblas_core,commit\n";
  for (const Result& r : results) {
    csv << r.n << ',' << r.n << ',' << o.batch << ',' << o.heads << ',' << o.dim << ','
        << (o.causal ? 1 : 0) << ',' << fb::dtype_name(lanes[r.lane].dtype) << ',' << threads << ','
        << flashcpu::active_isa() << ',' << lanes[r.lane].name << ','
        << (r.skipped ? "skipped" : "ok") << ',';
    if (r.skipped) {
      csv << ",,,";
    } else {
      csv << r.ms << ',' << r.gflops << ',' << r.peak_frac << ',';
    }
    if (r.extra_mib >= 0) csv << r.extra_mib;
    csv << ',';
    if (r.analytic_mib >= 0) csv << r.analytic_mib;
    csv << ',' << o.reps << ',' << peak << ',' << field(cpu) << ','
        << field(blas ? blas_info.core : "none") << ',' << field(commit) << '\n';
  }
  std::fprintf(stderr, "wrote %s\n", o.csv.c_str());
  return 0;
}
