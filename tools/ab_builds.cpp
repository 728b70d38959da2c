// flashcpu-ab: two builds of libflashcpu in one process, called in turn, so that both see
// the same machine from one call to the next. On a shared VM whose speed drifts over
// minutes, alternating two binaries run for run compares different moments; here every
// round calls build A then build B (B then A on odd rounds) on the same tensors, and the
// ratio of each round's pair is the figure. tools/ab_builds builds the two libraries and
// runs this; see its header for use.
//
//   flashcpu-ab libA.so[@isa] libB.so[@isa] rounds "mode Hq Hkv N M D threads causal [cold]" ...
//   "@isa" caps that build's dispatch as FLASHCPU_ISA would (each copy of the library
//   chooses its level once, at its first call), so one build can be compared with itself
//   at two levels: lib.so@avx2 lib.so@avx512.
//   mode: f32 (fp32 forward), bwd (fp32 backward), bwdc (fp32 backward under
//   allow_bf16_compute), bf16 (bf16 q, k, v, out), bwd16 (bf16 backward), f16kv (fp32 q over fp16 K/V), bf16kv (fp32 q over bf16 K/V), bf16kvc (bf16kv under
//   allow_bf16_compute). Dv = D, B = 1. "cold": K and V in as
//   many copies as make 1 GiB (at least 2), each call reading the next one, so that a
//   decode step reads its cache from memory, as in a model with many layers, and not from
//   the last-level cache the previous call filled. The warm-up reads every copy once.
//
// Prints per workload: min and median time of each build, min(A) / min(B), and the
// median with quartiles of the per-round ratio A / B (> 1: B is faster).
#include <flashcpu/flashcpu.hpp>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

using namespace flashcpu;

namespace {

template <class T>
using In = TensorView<const T>;
template <class T>
using Out = TensorView<T>;
using Opt = const AttentionOptions&;

// The entry points of one build, looked up by their mangled names in the shared object.
struct Build {
  void (*f32)(In<float>, In<float>, In<float>, Out<float>, Opt);
  void (*f32_lse)(In<float>, In<float>, In<float>, Out<float>, Out<float>, Opt);
  void (*bwd)(In<float>, In<float>, In<float>, In<float>, In<float>, In<float>, Out<float>, Out<float>, Out<float>, Opt);
  void (*bwd16)(In<bf16>, In<bf16>, In<bf16>, In<bf16>, In<float>, In<bf16>, Out<bf16>, Out<bf16>, Out<bf16>, Opt);
  void (*bf16_all)(In<bf16>, In<bf16>, In<bf16>, Out<bf16>, Opt);
  void (*f16kv)(In<float>, In<fp16>, In<fp16>, Out<float>, Opt);
  void (*bf16kv)(In<float>, In<bf16>, In<bf16>, Out<float>, Opt);
  bf16 (*round_bf16)(float);
  fp16 (*round_fp16)(float);
  std::string isa;  // the level this build dispatches to (active_isa)
};

template <class F>
void bind(void* lib, const char* name, F& f) {
  void* p = dlsym(lib, name);
  if (!p) {
    std::fprintf(stderr, "flashcpu-ab: %s\n", dlerror());
    std::exit(1);
  }
  static_assert(sizeof(f) == sizeof(p), "function and object pointers differ in size");
  std::memcpy(&f, &p, sizeof(p));
}

// `spec` is "lib.so" or "lib.so@isa": a trailing "@" and a lower-case name, so that a
// path with an "@" of its own stays whole.
Build load(const std::string& spec) {
  const std::size_t at = spec.rfind('@');
  const bool capped = at != std::string::npos && at + 1 < spec.size() &&
                      spec.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789", at + 1) == std::string::npos;
  const std::string path = capped ? spec.substr(0, at) : spec, cap = capped ? spec.substr(at + 1) : "";
  // Local and deep-bound: each build resolves its own symbols, never the other's.
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (!lib) {
    std::fprintf(stderr, "flashcpu-ab: %s\n", dlerror());
    std::exit(1);
  }
  Build b{};
  bind(lib, "_ZN8flashcpu9attentionENS_10TensorViewIKfEES2_S2_NS0_IfEERKNS_16AttentionOptionsE", b.f32);
  bind(lib, "_ZN8flashcpu9attentionENS_10TensorViewIKfEES2_S2_NS0_IfEES3_RKNS_16AttentionOptionsE", b.f32_lse);
  bind(lib,
       "_ZN8flashcpu18attention_backwardENS_10TensorViewIKfEES2_S2_S2_S2_S2_NS0_IfEES3_S3_RKNS_"
       "16AttentionOptionsE",
       b.bwd);
  bind(lib,
       "_ZN8flashcpu18attention_backwardENS_10TensorViewIKNS_4bf16EEES3_S3_S3_NS0_IKfEES3_NS0_IS1_EES6_S6_RKNS_"
       "16AttentionOptionsE",
       b.bwd16);
  bind(lib, "_ZN8flashcpu9attentionENS_10TensorViewIKNS_4bf16EEES3_S3_NS0_IS1_EERKNS_16AttentionOptionsE", b.bf16_all);
  bind(lib, "_ZN8flashcpu9attentionENS_10TensorViewIKfEENS0_IKNS_4fp16EEES5_NS0_IfEERKNS_16AttentionOptionsE",
       b.f16kv);
  bind(lib, "_ZN8flashcpu9attentionENS_10TensorViewIKfEENS0_IKNS_4bf16EEES5_NS0_IfEERKNS_16AttentionOptionsE",
       b.bf16kv);
  bind(lib, "_ZN8flashcpu7to_bf16Ef", b.round_bf16);
  bind(lib, "_ZN8flashcpu7to_fp16Ef", b.round_fp16);
  // The level is chosen at the first call that asks for it, from FLASHCPU_ISA as it is
  // then: set it for this copy alone, and ask now.
  std::string (*active_isa)() = nullptr;
  bind(lib, "_ZN8flashcpu10active_isaB5cxx11Ev", active_isa);
  const char* outer = std::getenv("FLASHCPU_ISA");
  const std::string saved = outer ? outer : "";
  if (!cap.empty()) setenv("FLASHCPU_ISA", cap.c_str(), 1);
  try {
    b.isa = active_isa();
  } catch (const std::exception& e) {  // a name that is no level
    std::fprintf(stderr, "flashcpu-ab: %s\n", e.what());
    std::exit(2);
  }
  if (!cap.empty() && b.isa != cap) {  // dispatch falls back from a level the CPU lacks
    std::fprintf(stderr, "flashcpu-ab: %s@%s runs %s: this CPU (or OS) lacks %s\n", path.c_str(), cap.c_str(),
                 b.isa.c_str(), cap.c_str());
    std::exit(2);
  }
  if (outer)
    setenv("FLASHCPU_ISA", saved.c_str(), 1);
  else
    unsetenv("FLASHCPU_ISA");
  return b;
}

struct Workload {
  std::string mode;   // as given, for the output
  std::string calls;  // the call it times: mode without the "c" of bwdc and bf16kvc
  bool bf16_compute = false;  // bwdc, bf16kvc: the call under allow_bf16_compute
  long Hq = 0, Hkv = 0, N = 0, M = 0, D = 0;
  int threads = 0;
  bool causal = false;
  long copies = 1, next = 0;  // copies of K and V (cold), and the one the next call reads
  std::size_t nk = 0;         // elements of one copy of K (or V)
  std::vector<float> q, k, v, out, lse, dq, dk, dv;
  std::vector<bf16> q16, k16, v16, out16, dq16, dk16, dv16;
  std::vector<fp16> kh, vh;
  std::vector<double> ms_a, ms_b;

  template <class T>
  In<T> queries(const std::vector<T>& x) const { return bhsd<const T>(x.data(), 1, Hq, N, D); }
  template <class T>
  In<T> keys(const std::vector<T>& x) const { return bhsd<const T>(x.data() + next * nk, 1, Hkv, M, D); }
  template <class T>
  Out<T> queries_out(std::vector<T>& x) const { return bhsd<T>(x.data(), 1, Hq, N, D); }
  template <class T>
  Out<T> keys_out(std::vector<T>& x) const { return bhsd<T>(x.data(), 1, Hkv, M, D); }
  AttentionOptions options() const {
    AttentionOptions o;
    o.causal = causal;
    o.num_threads = threads;
    o.allow_bf16_compute = bf16_compute;
    return o;
  }

  double run(const Build& b) {
    const AttentionOptions o = options();
    next = (next + 1) % copies;
    const auto start = std::chrono::steady_clock::now();
    if (calls == "f32")
      b.f32(queries(q), keys(k), keys(v), queries_out(out), o);
    else if (calls == "bwd")
      b.bwd(queries(q), keys(k), keys(v), queries(out), bhsd<const float>(lse.data(), 1, Hq, N, 1), queries(out),
            queries_out(dq), keys_out(dk), keys_out(dv), o);
    else if (calls == "bwd16")
      b.bwd16(queries(q16), keys(k16), keys(v16), queries(out16), bhsd<const float>(lse.data(), 1, Hq, N, 1),
              queries(out16), queries_out(dq16), keys_out(dk16), keys_out(dv16), o);
    else if (calls == "bf16")
      b.bf16_all(queries(q16), keys(k16), keys(v16), queries_out(out16), o);
    else if (calls == "f16kv")
      b.f16kv(queries(q), keys(kh), keys(vh), queries_out(out), o);
    else
      b.bf16kv(queries(q), keys(k16), keys(v16), queries_out(out), o);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
};

Workload parse(const char* spec, const Build& convert) {
  Workload w;
  char mode[16] = {}, cold[8] = {};
  int causal = 0;
  char extra[2] = {};
  const int fields = std::sscanf(spec, "%15s %ld %ld %ld %ld %ld %d %d %7s %1s", mode, &w.Hq, &w.Hkv, &w.N, &w.M, &w.D,
                                 &w.threads, &causal, cold, extra);
  if (fields < 8 || fields > 9 || (fields == 9 && std::strcmp(cold, "cold") != 0) || w.Hq < 1 || w.Hkv < 1 || w.Hq % w.Hkv != 0 ||
      w.N < 1 || w.M < 1 || w.D < 1) {
    std::fprintf(stderr, "flashcpu-ab: expected \"mode Hq Hkv N M D threads causal [cold]\", got \"%s\"\n", spec);
    std::exit(2);
  }
  w.mode = mode;
  w.bf16_compute = w.mode == "bwdc" || w.mode == "bf16kvc";
  w.calls = w.bf16_compute ? w.mode.substr(0, w.mode.size() - 1) : w.mode;
  if (w.calls != "f32" && w.calls != "bwd" && w.calls != "bf16" && w.calls != "bwd16" && w.calls != "f16kv" &&
      w.calls != "bf16kv") {
    std::fprintf(stderr, "flashcpu-ab: mode is f32, bwd, bwdc, bf16, bwd16, f16kv, bf16kv or bf16kvc, got \"%s\"\n", mode);
    std::exit(2);
  }
  w.causal = causal != 0;
  const std::size_t nq = std::size_t(w.Hq * w.N * w.D), nk = std::size_t(w.Hkv * w.M * w.D);
  w.nk = nk;
  if (fields == 9) {  // K and V as stored (2 or 4 bytes), the copies at least 1 GiB in all
    const double bytes = 2.0 * double(nk) * (w.calls == "f32" || w.calls == "bwd" ? 4 : 2);
    w.copies = std::max(2L, long(double(1L << 30) / bytes + 0.999));
  }
  w.q.resize(nq);
  w.out.resize(nq);
  w.dq.resize(nq);
  w.k.resize(nk);
  w.v.resize(nk);
  w.dk.resize(nk);
  w.dv.resize(nk);
  w.lse.resize(std::size_t(w.Hq * w.N));
  unsigned state = 1;
  auto uniform = [&] {
    state = state * 1664525u + 1013904223u;
    return float(state >> 8) / float(1 << 24) - 0.5f;
  };
  for (auto* x : {&w.q, &w.k, &w.v})
    for (float& y : *x) y = uniform();
  for (float x : w.q) w.q16.push_back(convert.round_bf16(x));
  // Only the K and V the mode reads get copies.
  const bool f32 = w.calls == "f32" || w.calls == "bwd";
  for (float x : w.k) w.k16.push_back(convert.round_bf16(x)), w.kh.push_back(convert.round_fp16(x));
  for (float x : w.v) w.v16.push_back(convert.round_bf16(x)), w.vh.push_back(convert.round_fp16(x));
  auto replicate = [&](auto& x, bool needed) {
    if (!needed) return;
    x.resize(nk * w.copies);
    for (long c = 1; c < w.copies; ++c) std::copy(x.begin(), x.begin() + long(nk), x.begin() + c * long(nk));
  };
  replicate(w.k, f32);
  replicate(w.v, f32);
  const bool bf16_cache = w.calls == "bf16" || w.calls == "bwd16" || w.calls == "bf16kv";
  replicate(w.k16, bf16_cache);
  replicate(w.v16, bf16_cache);
  replicate(w.kh, w.calls == "f16kv");
  replicate(w.vh, w.calls == "f16kv");
  w.out16.resize(nq);
  w.dq16.resize(nq);
  w.dk16.resize(nk);
  w.dv16.resize(nk);
  return w;
}

double quantile(std::vector<double> x, double f) {
  std::sort(x.begin(), x.end());
  return x[std::size_t(f * double(x.size() - 1) + 0.5)];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: flashcpu-ab libA.so libB.so rounds \"mode Hq Hkv N M D threads causal [cold]\" ...\n");
    return 2;
  }
  const Build a = load(argv[1]), b = load(argv[2]);
  std::printf("A runs %s, B runs %s\n", a.isa.c_str(), b.isa.c_str());
  const int rounds = std::atoi(argv[3]);
  if (rounds < 1) {
    std::fprintf(stderr, "flashcpu-ab: rounds must be at least 1\n");
    return 2;
  }
  std::vector<Workload> work;
  for (int i = 4; i < argc; ++i) work.push_back(parse(argv[i], a));
  for (Workload& w : work) {
    if (w.calls == "bwd" || w.calls == "bwd16") {  // out and lse for the backward, from build A
      a.f32_lse(w.queries(w.q), w.keys(w.k), w.keys(w.v), w.queries_out(w.out),
                bhsd<float>(w.lse.data(), 1, w.Hq, w.N, 1), w.options());
      for (std::size_t x = 0; x < w.out.size(); ++x) w.out16[x] = a.round_bf16(w.out[x]);  // bwd16: dout = out
    }
    // Warm-up: OpenMP's pool, each build's scratch, and every copy of K and V read once,
    // by the two builds in turn (each call reads the next copy). The first read of
    // freshly written memory is slow on the KVM guests here (the figures are at
    // read_through, bench/common.hpp), so a cold run whose calls met each copy for the
    // first time measured that, not the kernel: DEC read 22 ms a call in some processes
    // and 3 ms in others.
    for (long c = 0; c < std::max(w.copies, 2L); ++c) w.run(c % 2 == 0 ? a : b);
  }
  for (int r = 0; r < rounds; ++r)
    for (Workload& w : work) {
      if (r % 2 == 0) {
        w.ms_a.push_back(w.run(a));
        w.ms_b.push_back(w.run(b));
      } else {
        w.ms_b.push_back(w.run(b));
        w.ms_a.push_back(w.run(a));
      }
    }
  std::printf("%-6s %3s %3s %5s %5s %4s %2s %1s %4s | %9s %9s | %9s %9s | %7s | %s\n", "mode", "Hq", "Hkv", "N", "M",
              "D", "th", "c", "kv", "A min ms", "A median", "B min ms", "B median", "min A/B", "A/B per round: median (q1-q3)");
  for (const Workload& w : work) {
    std::vector<double> ratio;
    for (std::size_t i = 0; i < w.ms_a.size(); ++i) ratio.push_back(w.ms_a[i] / w.ms_b[i]);
    const double min_a = quantile(w.ms_a, 0), min_b = quantile(w.ms_b, 0);
    std::printf("%-6s %3ld %3ld %5ld %5ld %4ld %2d %1d %4s | %9.3f %9.3f | %9.3f %9.3f | %7.3f | %.3f (%.3f-%.3f)\n",
                w.mode.c_str(), w.Hq, w.Hkv, w.N, w.M, w.D, w.threads, int(w.causal), w.copies > 1 ? "cold" : "hot", min_a, quantile(w.ms_a, 0.5),
                min_b, quantile(w.ms_b, 0.5), min_a / min_b, quantile(ratio, 0.5), quantile(ratio, 0.25),
                quantile(ratio, 0.75));
  }
}
