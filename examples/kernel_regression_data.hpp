// The data set and the file helpers shared by the two kernel-regression examples,
// flashcpu-kernel-regression and flashcpu-kernel-regression-train. Both draw the same
// fifty points from the same seed, so the fits of one and the learned width of the
// other are about one data set.
#pragma once

#include <flashcpu/flashcpu.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <sys/types.h>

namespace kernel_regression {

constexpr int kTrain = 50;            // training points
constexpr double kXMax = 5.0;         // inputs in [0, 5]
constexpr double kNoiseSd = 0.5;      // y = f(x) + N(0, 0.5^2)
constexpr std::uint32_t kDefaultSeed = 20240611;

constexpr double kTwoPi = 6.283185307179586476925286766559;

/// The noise-free function the examples estimate.
inline double truth(double x) { return 2.0 * std::sin(x) + std::pow(x, 0.8); }

/// Random numbers from std::mt19937, whose output sequence the standard fixes. The
/// std:: distributions are implementation-defined, so uniform and normal draws are
/// made by hand: the data set is the same with every standard library.
struct Rng {
  std::mt19937 gen;
  explicit Rng(std::uint32_t seed) : gen(seed) {}
  double uniform() { return (double(gen()) + 0.5) / 4294967296.0; }  // in (0, 1)
  double normal() {                                                   // Box-Muller
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
  }
};

/// kTrain inputs x ~ U(0, 5), sorted, and targets y = f(x) + N(0, 0.5^2). The inputs
/// are drawn first and the noise after sorting: changing this order changes the data.
struct TrainingSet {
  std::vector<float> x, y;
};
inline TrainingSet make_training_set(std::uint32_t seed) {
  Rng rng(seed);
  TrainingSet t{std::vector<float>(kTrain), std::vector<float>(kTrain)};
  for (auto& x : t.x) x = float(kXMax * rng.uniform());
  std::sort(t.x.begin(), t.x.end());
  for (std::size_t j = 0; j < t.x.size(); ++j) t.y[j] = float(truth(t.x[j]) + kNoiseSd * rng.normal());
  return t;
}

/// A [1, 1, n, 1] view of a vector: one head of n one-dimensional tokens.
inline flashcpu::TensorView<const float> col(const std::vector<float>& v) {
  return flashcpu::bhsd<const float>(v.data(), 1, 1, std::int64_t(v.size()), 1);
}
inline flashcpu::TensorView<float> col(std::vector<float>& v) {
  return flashcpu::bhsd(v.data(), 1, 1, std::int64_t(v.size()), 1);
}

/// The query grid 0, step, ..., 5 (both ends included).
inline std::vector<float> grid(double step) {
  const int n = int(std::lround(kXMax / step)) + 1;
  std::vector<float> x(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) x[std::size_t(i)] = float(i * step);
  return x;
}

/// Parses --seed's value; false if it is not an integer in [0, 2^32).
inline bool parse_seed(const std::string& text, std::uint32_t& seed) {
  char* end = nullptr;
  const unsigned long long s = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || *end || s > 0xffffffffull) return false;
  seed = std::uint32_t(s);
  return true;
}

/// mkdir -p: creates each missing component; true if `path` is a directory at the end.
inline bool make_dir(const std::string& path) {
  std::string prefix;
  std::size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    prefix = path.substr(0, pos);
    if (prefix.empty()) continue;
    if (mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) return false;
  }
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

/// An output file that exits the program, naming it, if it cannot be opened.
struct Csv {
  std::FILE* f;
  std::string path;
  Csv(const std::string& p, const char* program) : f(std::fopen(p.c_str(), "w")), path(p) {
    if (!f) {
      std::fprintf(stderr, "%s: cannot write %s: %s\n", program, p.c_str(), std::strerror(errno));
      std::exit(1);
    }
  }
  ~Csv() { std::fclose(f); }
  Csv(const Csv&) = delete;
  Csv& operator=(const Csv&) = delete;
};

/// One CSV number: 9 significant digits round-trip a float; NaN is written "nan".
inline void put(std::FILE* f, double v) {
  if (std::isnan(v))
    std::fputs("nan", f);
  else
    std::fprintf(f, "%.9g", v);
}

}  // namespace kernel_regression
