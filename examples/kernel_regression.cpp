// flashcpu-kernel-regression: attention as Nadaraya-Watson kernel regression.
//
// The classic demonstration that attention pooling is kernel regression. Fifty noisy
// samples of f(x) = 2 sin(x) + x^0.8 on [0, 5] are the keys (x_j) and values (y_j);
// a grid of query points asks "what is f here?". The Nadaraya-Watson estimate
//
//     f_hat(x) = sum_j K((x - x_j) / h) y_j / sum_j K((x - x_j) / h)
//
// is a weighted average of the training targets, the weights being a kernel of the
// distance to each training input normalised to sum to one: exactly a softmax over
// the scores log K. For the Gaussian kernel log K = -(x - x_j)^2 / (2 h^2), which is
// flashcpu's Score::gaussian with scale = 1 / (2 h^2).
//
// The program:
//   1. fits the data with flashcpu::nadaraya_watson for four kernels and three
//      bandwidths and prints the mean squared error against the noise-free f;
//   2. materialises the Gaussian attention weights with
//      flashcpu::reference::attention_weights and checks weights . y == the fit;
//   3. checks that the fused flashcpu::attention with Score::gaussian is the
//      Gaussian fit, and that the fused fits agree with the double-precision
//      reference::nadaraya_watson (NaN in the same places);
//   4. writes CSVs for examples/plot_kernel_regression.py.
// Every tensor is [B = 1, H = 1, N, D = 1] in BHSD layout. Run with --help for the
// options and the files written.

#include "kernel_regression_data.hpp"

#include <flashcpu/flashcpu.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace kernel_regression;

constexpr const char* kProgram = "flashcpu-kernel-regression";
constexpr double kBandwidths[] = {0.1, 0.3, 1.0};

struct KernelInfo {
  flashcpu::Kernel kernel;
  const char* name;
};
constexpr KernelInfo kKernels[] = {
    {flashcpu::Kernel::gaussian, "gaussian"},
    {flashcpu::Kernel::laplacian, "laplacian"},
    {flashcpu::Kernel::boxcar, "boxcar"},
    {flashcpu::Kernel::epanechnikov, "epanechnikov"},
};

// Fused results must match the double-precision reference to |a - b| <= tol * max(1, |b|):
// the tolerance tests/test_reference.cpp holds the fused attention kernel to.
constexpr double kTolerance = 1e-5;

std::string fmt_g(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string column_name(const KernelInfo& k, double h) { return std::string(k.name) + "_h" + fmt_g(h); }

// Mean squared error against f over the finite predictions, and how many were NaN.
struct Mse {
  double mse = 0;
  int nan = 0;
};
Mse score(const std::vector<float>& x, const std::vector<float>& pred) {
  Mse s;
  double sum = 0;
  int finite = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (std::isnan(pred[i])) {
      ++s.nan;
      continue;
    }
    const double e = pred[i] - truth(x[i]);
    sum += e * e;
    ++finite;
  }
  s.mse = finite ? sum / finite : std::numeric_limits<double>::quiet_NaN();
  return s;
}

// One fit: the fused and the reference prediction on one grid.
struct Fit {
  std::vector<float> fused, reference;
};

Fit fit(const std::vector<float>& xq, const std::vector<float>& xt, const std::vector<float>& yt,
        flashcpu::Kernel kernel, double h) {
  flashcpu::KernelRegressionOptions opt;
  opt.kernel = kernel;
  opt.bandwidth = float(h);
  Fit f{std::vector<float>(xq.size()), std::vector<float>(xq.size())};
  flashcpu::nadaraya_watson(col(xq), col(xt), col(yt), col(f.fused), opt);
  flashcpu::reference::nadaraya_watson(col(xq), col(xt), col(yt), col(f.reference), opt);
  return f;
}

// The largest |a - b| over the entries finite in both, and whether a and b have NaN
// in exactly the same places.
struct Diff {
  double max_abs = 0;
  bool within_tolerance = true;
  int nan_mismatches = 0;
};
void accumulate(Diff& d, const std::vector<float>& a, const std::vector<double>& b) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    const bool an = std::isnan(a[i]), bn = std::isnan(b[i]);
    if (an || bn) {
      d.nan_mismatches += an != bn;
      continue;
    }
    const double e = std::fabs(double(a[i]) - b[i]);
    d.max_abs = std::max(d.max_abs, e);
    if (e > kTolerance * std::max(1.0, std::fabs(b[i]))) d.within_tolerance = false;
  }
}
void accumulate(Diff& d, const std::vector<float>& a, const std::vector<float>& b) {
  accumulate(d, a, std::vector<double>(b.begin(), b.end()));
}
bool ok(const Diff& d) { return d.within_tolerance && d.nan_mismatches == 0; }
const char* verdict(bool good) { return good ? "ok" : "MISMATCH"; }

// Is a NaN where the library put one? Independently of the library: a query gets NaN
// exactly when no training input lies inside the kernel's support (|x - x_j| <= h for
// the boxcar, < h for Epanechnikov, whose weight is 0 at u = 1; never for the
// Gaussian and Laplacian). Queries whose nearest input sits within float rounding of
// the edge are left out, as either answer is right there.
struct SupportCheck {
  int nan_inside = 0;      // NaN although a training input is in the support
  int finite_outside = 0;  // a value although none is
  std::string first_bad;   // the first offending case, for the report
};
void check_support(SupportCheck& c, const char* kernel_name, flashcpu::Kernel kernel, double h,
                   const std::vector<float>& xq, const std::vector<float>& xt, const std::vector<float>& pred) {
  const bool compact = kernel == flashcpu::Kernel::boxcar || kernel == flashcpu::Kernel::epanechnikov;
  for (std::size_t i = 0; i < xq.size(); ++i) {
    double nearest = std::numeric_limits<double>::infinity();
    std::size_t jn = 0;
    for (std::size_t j = 0; j < xt.size(); ++j) {
      const double d = std::fabs(double(xq[i]) - double(xt[j]));
      if (d < nearest) nearest = d, jn = j;
    }
    const bool clearly_inside = !compact || nearest < h * (1 - 1e-5);
    const bool clearly_outside = compact && nearest > h * (1 + 1e-5);
    const bool is_nan = std::isnan(pred[i]);
    char buf[256];
    if (is_nan && clearly_inside) {
      if (c.nan_inside++ == 0 && c.first_bad.empty()) {
        std::snprintf(buf, sizeof buf,
                      "%s h=%g: query x=%.9g is NaN, but training input x_%zu=%.9g is %.6g away (u=%.6g)",
                      kernel_name, h, double(xq[i]), jn, double(xt[jn]), nearest, nearest / h);
        c.first_bad = buf;
      }
    } else if (!is_nan && clearly_outside) {
      if (c.finite_outside++ == 0 && c.first_bad.empty()) {
        std::snprintf(buf, sizeof buf,
                      "%s h=%g: query x=%.9g is %.9g, but its nearest training input x_%zu=%.9g is %.6g away "
                      "(u=%.6g)",
                      kernel_name, h, double(xq[i]), double(pred[i]), jn, double(xt[jn]), nearest, nearest / h);
        c.first_bad = buf;
      }
    }
  }
}

void write_predictions(const std::string& path, const std::vector<float>& x,
                       const std::vector<std::vector<float>>& columns, const std::vector<std::string>& names) {
  Csv csv(path, kProgram);
  std::fputs("x,truth", csv.f);
  for (const auto& n : names) std::fprintf(csv.f, ",%s", n.c_str());
  std::fputc('\n', csv.f);
  for (std::size_t i = 0; i < x.size(); ++i) {
    put(csv.f, x[i]);
    std::fputc(',', csv.f);
    put(csv.f, truth(x[i]));
    for (const auto& c : columns) {
      std::fputc(',', csv.f);
      put(csv.f, c[i]);
    }
    std::fputc('\n', csv.f);
  }
}

constexpr const char* kHelp = R"(flashcpu-kernel-regression: attention as Nadaraya-Watson kernel regression

Usage: flashcpu-kernel-regression [--out DIR] [--seed N] [--weights-bandwidth H]

Draws 50 training points x_j ~ U(0, 5) (sorted), y_j = 2 sin(x_j) + x_j^0.8 + eps,
eps ~ N(0, 0.5^2), and predicts f on two query grids, 0..5 in steps of 0.1 (51
queries) and of 0.01 (501 queries), with flashcpu::nadaraya_watson for the gaussian,
laplacian, boxcar and epanechnikov kernels at bandwidths h = 0.1, 0.3 and 1. Prints
the mean squared error against the noise-free f. A query with no training point
inside a compact kernel's support (boxcar, epanechnikov: |x - x_j| >= h) has no
estimate and gets NaN; the MSE is over the finite predictions and the NaN are counted.

Then it checks that Nadaraya-Watson is attention:
  * the Gaussian attention weights W [51 queries x 50 inputs], from
    flashcpu::reference::attention_weights with score = Score::gaussian and
    scale = 1 / (2 h^2), give W y == nadaraya_watson(gaussian, h);
  * the fused flashcpu::attention with the same options == nadaraya_watson(gaussian, h);
  * every fused fit == reference::nadaraya_watson (double precision), NaN included,
    and NaN appears exactly where no training input is inside the support.
Exits 1 if a check fails (the CSVs are written anyway).

Options:
  --out DIR              where to write the CSVs (default ./kernel-regression-out;
                         created if missing)
  --seed N               seed of the data set (default 20240611)
  --weights-bandwidth H  bandwidth of the weights matrix and the cross-checks (default 0.3)
  -h, --help             this text

Files written to DIR:
  train.csv             x, y, truth: the 50 training points, sorted by x
  predictions.csv       x, truth, then one column per fit named KERNEL_hH
                        (e.g. gaussian_h0.3) on the 0.1 grid; "nan" = no estimate
  predictions_fine.csv  the same on the 0.01 grid (for smooth curves)
  mse.csv               kernel, bandwidth, grid_step, queries, nan, mse
  weights.csv           the Gaussian attention weights: x_query, bandwidth, then w_0 ...
                        w_49, w_j being the weight of train.csv's row j (each row sums to 1)

Plot them with: python3 examples/plot_kernel_regression.py DIR
)";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "flashcpu-kernel-regression: %s (see --help)\n", msg.c_str());
  std::exit(2);
}

}  // namespace

int run(int argc, char** argv) {
  std::string out_dir = "kernel-regression-out";
  std::uint32_t seed = kDefaultSeed;
  double weights_h = 0.3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kHelp, stdout);
      return 0;
    } else if (a == "--out") {
      out_dir = value();
    } else if (a == "--seed") {
      const std::string v = value();
      if (!parse_seed(v, seed)) usage_error("--seed: expected an integer in [0, 2^32), got " + v);
    } else if (a == "--weights-bandwidth") {
      const std::string v = value();
      char* end = nullptr;
      weights_h = std::strtod(v.c_str(), &end);
      if (v.empty() || *end || !(weights_h > 0) || !std::isfinite(weights_h))
        usage_error("--weights-bandwidth: expected a number > 0, got " + v);
    } else {
      usage_error("unknown argument " + a);
    }
  }
  if (!make_dir(out_dir)) {
    std::fprintf(stderr, "flashcpu-kernel-regression: cannot create %s: %s\n", out_dir.c_str(), std::strerror(errno));
    return 1;
  }

  // ---- The data set: keys x_train, values y_train. -----------------------------------
  const TrainingSet data = make_training_set(seed);
  const std::vector<float>& x_train = data.x;
  const std::vector<float>& y_train = data.y;

  const std::vector<float> x_coarse = grid(0.1), x_fine = grid(0.01);

  std::printf("flashcpu-kernel-regression: Nadaraya-Watson kernel regression as attention\n");
  std::printf("  f(x) = 2 sin(x) + x^0.8; %d training points x ~ U(0, 5), sorted, y = f(x) + N(0, 0.5^2), seed %u\n",
              kTrain, seed);
  std::printf("  queries: 0..5 step 0.1 (%zu) and step 0.01 (%zu); ISA %s\n\n", x_coarse.size(), x_fine.size(),
              flashcpu::active_isa().c_str());

  // ---- 1. Fits: four kernels x three bandwidths, on both grids. --------------------------
  std::vector<std::string> names;
  std::vector<std::vector<float>> coarse_cols, fine_cols;
  Diff fused_vs_ref;
  SupportCheck support;
  struct Row {
    std::string kernel;
    double h;
    Mse coarse, fine;
    Diff vs_reference;  // fused vs reference::nadaraya_watson, both grids
  };
  std::vector<Row> rows;
  for (const auto& k : kKernels)
    for (double h : kBandwidths) {
      const Fit c = fit(x_coarse, x_train, y_train, k.kernel, h);
      const Fit f = fit(x_fine, x_train, y_train, k.kernel, h);
      Diff d;
      accumulate(d, c.fused, c.reference);
      accumulate(d, f.fused, f.reference);
      fused_vs_ref.max_abs = std::max(fused_vs_ref.max_abs, d.max_abs);
      fused_vs_ref.within_tolerance = fused_vs_ref.within_tolerance && d.within_tolerance;
      fused_vs_ref.nan_mismatches += d.nan_mismatches;
      check_support(support, k.name, k.kernel, h, x_coarse, x_train, c.fused);
      check_support(support, k.name, k.kernel, h, x_fine, x_train, f.fused);
      names.push_back(column_name(k, h));
      coarse_cols.push_back(c.fused);
      fine_cols.push_back(f.fused);
      rows.push_back({k.name, h, score(x_coarse, c.fused), score(x_fine, f.fused), d});
    }

  // Baselines: the mean of y (average pooling: every weight 1/50) and the noise itself.
  double mean_y = 0;
  for (float y : y_train) mean_y += y;
  mean_y /= kTrain;
  const Mse avg_coarse = score(x_coarse, std::vector<float>(x_coarse.size(), float(mean_y)));
  const Mse avg_fine = score(x_fine, std::vector<float>(x_fine.size(), float(mean_y)));
  double noise_mse = 0;
  for (int j = 0; j < kTrain; ++j) {
    const double e = y_train[std::size_t(j)] - truth(x_train[std::size_t(j)]);
    noise_mse += e * e;
  }
  noise_mse /= kTrain;

  std::printf("Mean squared error against the noise-free f, over the finite predictions. NaN counts the\n"
              "queries with no training point inside the kernel's support: they have no estimate.\n"
              "The last column is max |fused - reference::nadaraya_watson| over both grids.\n\n");
  const std::string rule(13 + 1 + 4 + 3 + 13 + 3 + 13 + 3 + 11, '-');
  std::printf("  %-13s %4s | %-13s | %-13s | %11s\n", "", "", " grid 0.1", " grid 0.01", "fused vs");
  std::printf("  %-13s %4s | %8s %4s | %8s %4s | %11s\n", "kernel", "h", "MSE", "NaN", "MSE", "NaN", "reference");
  std::printf("  %s\n", rule.c_str());
  std::string last_kernel;
  for (const Row& r : rows) {
    if (!last_kernel.empty() && r.kernel != last_kernel) std::printf("\n");
    std::printf("  %-13s %4s | %8.4f %4d | %8.4f %4d | %9.2e%s\n", r.kernel == last_kernel ? "" : r.kernel.c_str(),
                fmt_g(r.h).c_str(), r.coarse.mse, r.coarse.nan, r.fine.mse, r.fine.nan, r.vs_reference.max_abs,
                ok(r.vs_reference) ? "  " : " !");
    last_kernel = r.kernel;
  }
  std::printf("  %s\n", rule.c_str());
  std::printf("  %-13s %4s | %8.4f %4d | %8.4f %4d |\n", "mean of y", "inf", avg_coarse.mse, avg_coarse.nan,
              avg_fine.mse, avg_fine.nan);
  std::printf("  (51 and 501 queries. \"mean of y\": average pooling, every weight 1/50, the limit of any\n"
              "  kernel as h -> infinity. For scale, the training noise has mean square %.4f.)\n",
              noise_mse);
  if (!fused_vs_ref.within_tolerance)
    std::printf("  ! fused differs from the double-precision reference by more than %g x max(1, |ref|)\n",
                kTolerance);
  std::printf("\n");

  // ---- 2. The attention weights of the Gaussian fit. -----------------------------------
  const std::size_t nq = x_coarse.size(), nt = x_train.size();
  flashcpu::AttentionOptions gauss;
  gauss.score = flashcpu::Score::gaussian;
  gauss.scale = float(1.0 / (2.0 * weights_h * weights_h));  // s = -(x - x_j)^2 / (2 h^2)

  std::vector<float> weights(nq * nt);
  std::string weights_error;  // set if the library refuses: reported, not worked around
  try {
    flashcpu::reference::attention_weights(col(x_coarse), col(x_train),
                                           flashcpu::bhsd(weights.data(), 1, 1, std::int64_t(nq), std::int64_t(nt)),
                                           gauss);
  } catch (const flashcpu::Error& e) {
    weights_error = e.what();
  }
  const bool have_weights = weights_error.empty();
  std::vector<double> wy(nq, 0.0);
  double row_sum_err = 0;
  for (std::size_t i = 0; have_weights && i < nq; ++i) {
    double sum = 0;
    for (std::size_t j = 0; j < nt; ++j) {
      wy[i] += double(weights[i * nt + j]) * y_train[j];
      sum += weights[i * nt + j];
    }
    row_sum_err = std::max(row_sum_err, std::fabs(sum - 1.0));
  }

  flashcpu::KernelRegressionOptions nw_gauss;
  nw_gauss.kernel = flashcpu::Kernel::gaussian;
  nw_gauss.bandwidth = float(weights_h);
  std::vector<float> nw_coarse(nq), nw_fine(x_fine.size());
  flashcpu::nadaraya_watson(col(x_coarse), col(x_train), col(y_train), col(nw_coarse), nw_gauss);
  flashcpu::nadaraya_watson(col(x_fine), col(x_train), col(y_train), col(nw_fine), nw_gauss);
  Diff weights_vs_nw;
  if (have_weights) accumulate(weights_vs_nw, nw_coarse, wy);

  // ---- 3. The other direction: fused attention with the Gaussian score is the fit. -----
  std::vector<float> att_coarse(nq), att_fine(x_fine.size());
  flashcpu::attention(col(x_coarse), col(x_train), col(y_train), col(att_coarse), gauss);
  flashcpu::attention(col(x_fine), col(x_train), col(y_train), col(att_fine), gauss);
  Diff attention_vs_nw;
  accumulate(attention_vs_nw, att_coarse, nw_coarse);
  accumulate(attention_vs_nw, att_fine, nw_fine);
  const bool bitwise = std::memcmp(att_coarse.data(), nw_coarse.data(), nq * sizeof(float)) == 0 &&
                       std::memcmp(att_fine.data(), nw_fine.data(), x_fine.size() * sizeof(float)) == 0;

  const bool support_ok = support.nan_inside == 0 && support.finite_outside == 0;
  std::printf("Cross-checks (Gaussian kernel, h = %g, i.e. Score::gaussian with scale = 1/(2 h^2) = %g)\n",
              weights_h, double(*gauss.scale));
  if (have_weights) {
    std::printf("  attention weights W [%zu x %zu], reference::attention_weights: max |row sum - 1| = %.3g\n", nq,
                nt, row_sum_err);
    std::printf("  W . y vs nadaraya_watson(gaussian):             max |diff| = %.3g  %s\n", weights_vs_nw.max_abs,
                verdict(ok(weights_vs_nw)));
  } else {
    std::printf("  attention weights W [%zu x %zu]: reference::attention_weights raised flashcpu::Error:\n    %s\n"
                "  W . y vs nadaraya_watson(gaussian): not checked  FAILED (no weights; weights.csv not written)\n",
                nq, nt, weights_error.c_str());
  }
  std::printf("  fused attention(Score::gaussian) vs nadaraya_watson(gaussian), both grids:\n"
              "                                                  max |diff| = %.3g  %s%s\n",
              attention_vs_nw.max_abs, verdict(ok(attention_vs_nw)), bitwise ? " (bitwise identical)" : "");
  std::printf("All 12 fits, both grids:\n");
  std::printf("  fused nadaraya_watson vs reference::nadaraya_watson (double loop):\n"
              "                                                  max |diff| = %.3g, NaN in different places: %d  %s\n",
              fused_vs_ref.max_abs, fused_vs_ref.nan_mismatches, verdict(ok(fused_vs_ref)));
  std::printf("  NaN exactly where no training input is in the support: NaN inside %d, value outside %d  %s\n",
              support.nan_inside, support.finite_outside, verdict(support_ok));
  if (!support.first_bad.empty()) std::printf("    first case: %s\n", support.first_bad.c_str());
  std::printf("\n");

  // ---- 4. CSVs. ----------------------------------------------------------------------------
  {
    Csv csv(out_dir + "/train.csv", kProgram);
    std::fputs("x,y,truth\n", csv.f);
    for (std::size_t j = 0; j < nt; ++j)
      std::fprintf(csv.f, "%.9g,%.9g,%.9g\n", double(x_train[j]), double(y_train[j]), truth(x_train[j]));
  }
  write_predictions(out_dir + "/predictions.csv", x_coarse, coarse_cols, names);
  write_predictions(out_dir + "/predictions_fine.csv", x_fine, fine_cols, names);
  {
    Csv csv(out_dir + "/mse.csv", kProgram);
    std::fputs("kernel,bandwidth,grid_step,queries,nan,mse\n", csv.f);
    for (const Row& r : rows) {
      std::fprintf(csv.f, "%s,%g,0.1,%zu,%d,", r.kernel.c_str(), r.h, nq, r.coarse.nan);
      put(csv.f, r.coarse.mse);
      std::fprintf(csv.f, "\n%s,%g,0.01,%zu,%d,", r.kernel.c_str(), r.h, x_fine.size(), r.fine.nan);
      put(csv.f, r.fine.mse);
      std::fputc('\n', csv.f);
    }
  }
  if (have_weights) {
    Csv csv(out_dir + "/weights.csv", kProgram);
    std::fputs("x_query,bandwidth", csv.f);
    for (std::size_t j = 0; j < nt; ++j) std::fprintf(csv.f, ",w_%zu", j);
    std::fputc('\n', csv.f);
    for (std::size_t i = 0; i < nq; ++i) {
      std::fprintf(csv.f, "%.9g,%g", double(x_coarse[i]), weights_h);
      for (std::size_t j = 0; j < nt; ++j) std::fprintf(csv.f, ",%.9g", double(weights[i * nt + j]));
      std::fputc('\n', csv.f);
    }
  }
  std::printf("Wrote train.csv, predictions.csv, predictions_fine.csv, mse.csv%s to %s\n",
              have_weights ? ", weights.csv" : "", out_dir.c_str());

  const bool all_ok = have_weights && ok(weights_vs_nw) && ok(attention_vs_nw) && ok(fused_vs_ref) && support_ok;
  if (!all_ok) std::printf("A cross-check FAILED (see above).\n");
  return all_ok ? 0 : 1;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const flashcpu::Error& e) {  // an argument the library refuses, e.g. a tiny bandwidth
    std::fprintf(stderr, "flashcpu-kernel-regression: %s\n", e.what());
    return 1;
  }
}
