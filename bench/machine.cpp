// What ran: the CPU (model and the flags that matter here), and which OpenBLAS core
// the materialized baseline used, with the one-time re-execution that gives OpenBLAS
// its best core when its own detection falls short. See common.hpp.
#include "common.hpp"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#ifdef FLASHCPU_BENCH_HAVE_OPENBLAS
#include <cblas.h>  // OpenBLAS's own: openblas_get_corename, openblas_get_config
#endif

namespace flashcpu::bench {

namespace {

// The value of the first "<key> : value" line of /proc/cpuinfo, or "".
std::string cpuinfo_field(const char* key) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  const std::size_t len = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, len, key) != 0) continue;
    const std::size_t colon = line.find(':', len);
    if (colon == std::string::npos) continue;
    // Only whitespace may sit between the key and its colon ("model" vs "model name").
    if (line.find_first_not_of(" \t", len) != colon) continue;
    const std::size_t start = line.find_first_not_of(' ', colon + 1);
    return start == std::string::npos ? std::string() : line.substr(start);
  }
  return {};
}

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// The variable that marks a process this code re-executed: it holds the core
// OpenBLAS had picked by itself, for the note.
constexpr const char* kReexecMarker = "FLASHCPU_BENCH_OPENBLAS_DETECTED";
// For the test of the re-execution only: a core name that stands in for the one
// OpenBLAS detected, so the path that CPUs newer than OpenBLAS take runs on any CPU.
constexpr const char* kTestDetected = "FLASHCPU_BENCH_TEST_OPENBLAS_DETECTED";

// What choose_openblas_core found, for openblas_info(). Set once, at the top of main.
std::string g_openblas_core_note = "as OpenBLAS detected it";

}  // namespace

std::string cpu_model() {
  std::string m = cpuinfo_field("model name");
  if (m.empty()) m = "unknown CPU";
  // The family and model numbers tell apart CPUs that a VM names alike ("AMD EPYC" is
  // both a Zen 4, family 25, and a Zen 5, family 26).
  const std::string family = cpuinfo_field("cpu family"), model = cpuinfo_field("model");
  if (!family.empty() && !model.empty()) m += " (family " + family + ", model " + model + ")";
  return m;
}

std::set<std::string> cpu_flags() {
  std::set<std::string> flags;
  std::istringstream in(cpuinfo_field("flags"));
  std::string f;
  while (in >> f) flags.insert(f);
  return flags;
}

std::string cpu_flags_summary(const std::set<std::string>& flags) {
  // The flags that decide which kernels can run, flashcpu's and OpenBLAS's.
  static const char* const kRelevant[] = {
      "sse2",        "avx",         "avx2",     "fma",      "f16c",        "avx512f",
      "avx512dq",    "avx512bw",    "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile",
      "amx_bf16",    "amx_int8"};
  std::string out;
  for (const char* f : kRelevant) {
    if (flags.count(f) == 0) continue;
    if (!out.empty()) out += ' ';
    out += f;
  }
  return out.empty() ? "none of sse2..amx" : out;
}

int openblas_core_rank(const std::string& core) {
  // OpenBLAS 0.3.21's DYNAMIC_ARCH core names, by the widest kernels they run.
  const std::string c = lower(core);
  if (c == "sapphirerapids") return 6;
  if (c == "cooperlake") return 5;  // AVX-512 + BF16
  if (c == "skylakex") return 4;    // AVX-512
  if (c == "haswell" || c == "zen" || c == "excavator") return 3;  // AVX2 + FMA
  if (c == "sandybridge" || c == "bulldozer" || c == "piledriver" || c == "steamroller") return 2;
  return 1;  // SSE-era kernels (Prescott, Nehalem, Core2, Barcelona, ...), or unknown
}

std::string best_openblas_core(const std::set<std::string>& flags) {
  auto has = [&](const char* f) { return flags.count(f) != 0; };
  // Linux lists a flag only when the kernel also saves its register state, so these
  // are flags the process may really use.
  const bool avx512 = has("avx512f") && has("avx512dq") && has("avx512bw") && has("avx512vl");
  if (avx512 && has("avx512_bf16")) return "Cooperlake";
  if (avx512) return "SkylakeX";
  if (has("avx2") && has("fma")) return "Haswell";
  return "";
}

void choose_openblas_core(char** argv) {
#ifdef FLASHCPU_BENCH_HAVE_OPENBLAS
  const char* detected_before = std::getenv(kReexecMarker);
  const char* env = std::getenv("OPENBLAS_CORETYPE");
  const char* pretend = std::getenv(kTestDetected);
  const std::string core = pretend != nullptr ? pretend : openblas_get_corename();
  if (detected_before != nullptr) {
    g_openblas_core_note = std::string("OpenBLAS picked ") + detected_before +
                           "; this program re-ran itself with OPENBLAS_CORETYPE=" +
                           (env ? env : "?");
    unsetenv(kReexecMarker);  // children start clean
    return;
  }
  if (env != nullptr && *env != '\0') {
    g_openblas_core_note = std::string("OPENBLAS_CORETYPE=") + env + " set by the caller";
    return;
  }
  const std::string best = best_openblas_core(cpu_flags());
  if (best.empty() || openblas_core_rank(core) >= openblas_core_rank(best)) return;
  std::fprintf(stderr,
               "OpenBLAS picked its %s kernels, below what this CPU runs: re-running with "
               "OPENBLAS_CORETYPE=%s (it is read when OpenBLAS loads)\n",
               core.c_str(), best.c_str());
  std::fflush(stderr);
  setenv("OPENBLAS_CORETYPE", best.c_str(), 1);
  setenv(kReexecMarker, core.c_str(), 1);
  execv("/proc/self/exe", argv);
  // Still here: exec failed. Carry on with the detected core, and say so.
  unsetenv("OPENBLAS_CORETYPE");
  unsetenv(kReexecMarker);
  g_openblas_core_note = "OpenBLAS picked " + core + "; re-running with OPENBLAS_CORETYPE=" +
                         best + " failed (" + std::strerror(errno) + ")";
#else
  (void)argv;
  g_openblas_core_note = "OpenBLAS not built";
#endif
}

OpenblasInfo openblas_info() {
  OpenblasInfo info;
  info.note = g_openblas_core_note;
  const char* env = std::getenv("OPENBLAS_CORETYPE");
  info.coretype_env = env ? env : "unset";
#ifdef FLASHCPU_BENCH_HAVE_OPENBLAS
  info.core = openblas_get_corename();
  info.config = openblas_get_config();
  // openblas_get_config() ends with a space in 0.3.21.
  while (!info.config.empty() && info.config.back() == ' ') info.config.pop_back();
#else
  info.core = "not built";
  info.config = "not built";
#endif
  return info;
}

}  // namespace flashcpu::bench
