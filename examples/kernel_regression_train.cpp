// flashcpu-kernel-regression-train: learning the Gaussian kernel's width by gradient
// descent through flashcpu::attention_backward.
//
// flashcpu-kernel-regression fits the data of its example at three fixed bandwidths.
// This program learns the width instead. The model is Nadaraya-Watson with a learnable
// inverse width w > 0:
//
//     f(x) = sum_i softmax_i(-1/2 ((x - x_i) w)^2) y_i,
//
// which is flashcpu::attention with Score::gaussian and scale = 1/2 on queries q = w x,
// keys k_i = w x_i and values v_i = y_i: -1/2 |q - k_i|^2 = -1/2 ((x - x_i) w)^2. In the
// first example's terms, w = 1/h.
//
// Fitting w to the training points directly would drive it to infinity: each point
// would then be predicted from itself. So the loss is leave-one-out. Each training
// input is a query, the training inputs are the keys, and a bool mask that is zero on
// the diagonal hides each query's own key:
//
//     L(w) = 1/n sum_i (f_{-i}(x_i) - y_i)^2,   f_{-i}: the model without point i.
//
// Its gradient comes from the library's backward pass. With out = attention(q, k, v)
// and dout = dL/dout = 2 (out - y) / n, attention_backward gives dq and dk. Since
// q = w x and k = w x,
//
//     dL/dw = sum_i dq_i x_i + sum_j dk_j x_j.
//
// The program:
//   1. trains w by gradient descent on log w, from w = 0.3 by default;
//   2. searches 400 log-spaced w in [0.1, 100] on the same loss and compares the best
//      one with the learned w;
//   3. checks the gradient against a central finite difference of a leave-one-out
//      loss written here in double with plain loops (no library call);
//   4. writes CSVs for examples/plot_kernel_regression.py.
// The data set is the first example's: the same f, noise, 50 points and seed. Run with
// --help for the options and the files written.

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

constexpr const char* kProgram = "flashcpu-kernel-regression-train";

// The grid search covers three decades of w: the two starts the help suggests (0.3,
// where the softmax is nearly flat, and 20, where each point is predicted by almost
// only its nearest neighbour) and both flat tails of the loss. With 400 points,
// neighbouring w differ by a factor 1000^(1/399) = 1.0175.
constexpr double kGridMin = 0.1, kGridMax = 100.0;
constexpr int kGridPoints = 400;

constexpr double kDefaultStart = 0.3;
constexpr int kDefaultEpochs = 50;

// Gradient descent on theta = log w: w stays positive, and a step changes w by a
// factor, which suits a width (0.3 to 5 and 5 to 80 are alike). The step is
// -step_size * dL/dtheta, and the step size adapts to the sign of the gradient: it grows
// by 1.2 while successive gradients agree in sign and halves when they disagree (the
// step went past the minimum). A fixed step size does not suit the whole path: the loss
// is nearly flat in both tails and its slope in log w reaches 0.37 near w = 1, against
// a curvature of about 0.1 at the minimum. The sign of the gradient is also what stays
// reliable at the end: near the minimum the fp32 loss changes by less than its rounding
// (a few 1e-8 here), while the gradient still matches the double finite difference (see
// check 3). Each step is capped at |delta theta| <= 1 (a factor e in w), so a grown step
// size cannot throw w off the scale of the data. On the default data set, simulated in
// double, every start in [0.1, 100] with every initial step size from 0.3 to 10 reached
// the minimum to 1e-6 in 9 to 32 epochs; on 40 seeds, the descent here from 0.3 and from
// 20 always ended within one grid step of a minimum of the grid search's curve.
constexpr double kInitialStepSize = 1.0;
constexpr double kGrow = 1.2, kShrink = 0.5;
constexpr double kMaxLogStep = 1.0;

// The finite-difference check. Each term of dL/dw = sum_i dq_i x_i + sum_j dk_j x_j comes
// from fp32 arithmetic and is taken to be good to kTermAccuracy of the terms' size (1e-5:
// the tolerance tests/test_reference.cpp holds the fp32 forward to). The terms have both
// signs and cancel, so the check is |dL/dw - FD| <= kTermAccuracy * sum |terms|: a
// relative tolerance of kTermAccuracy * cancel, cancel = sum |terms| / |FD| (printed).
//
// The points are the powers of two from 1/4 to 128. w x_i is then exact in fp32, so the
// check sees the library's arithmetic and not the rounding of q = w x, and they span the
// descent's path from either suggested start (0.3 or 20) to the minimum and beyond, to
// kernels so narrow that each point weighs only its nearest neighbours: there dq and dk
// are small sums of dS (q - k) next to the points' own size, which the backward sums
// term by term so that they keep their accuracy.
//
// The central difference in double, step d = 1e-5 w, adds a truncation of order
// (d / w)^2 = 1e-10 and a rounding of order 1e-16 L / d: nothing at this scale. A wrong
// gradient would be off by order 1.
constexpr double kFdPoints[] = {0.25, 1, 4, 16, 64, 128};
constexpr double kTermAccuracy = 1e-5;
constexpr double kFdRelativeStep = 1e-5;

// ---- The leave-one-out problem, through flashcpu. --------------------------------------

struct Evaluation {
  double loss = 0;
  double loss_error_bound = 0;  // from out_i good to kTermAccuracy * max(1, |out_i|)
  double grad = 0;              // dL/dw
  double grad_terms_abs = 0;    // sum_i |dq_i x_i| + sum_j |dk_j x_j|: how much the sum cancels
};

// The buffers of one loss evaluation, allocated once: training runs the forward and the
// backward once an epoch, the grid search the forward 400 times.
class LeaveOneOut {
 public:
  explicit LeaveOneOut(const TrainingSet& data)
      : x_(data.x), y_(data.y), n_(data.x.size()), scaled_x_(n_), out_(n_), lse_(n_), dout_(n_), dq_(n_), dk_(n_),
        dv_(n_), not_self_(n_ * n_, 1) {
    for (std::size_t i = 0; i < n_; ++i) not_self_[i * n_ + i] = 0;  // query i may not see key i
    options_.score = flashcpu::Score::gaussian;
    options_.scale = 0.5f;  // s = -1/2 |q - k|^2 = -1/2 ((x_i - x_j) w)^2
    options_.bool_mask = flashcpu::bhsd<const std::uint8_t>(not_self_.data(), 1, 1, std::int64_t(n_), std::int64_t(n_));
  }
  // options_ points into not_self_: a copy would point into the original.
  LeaveOneOut(const LeaveOneOut&) = delete;
  LeaveOneOut& operator=(const LeaveOneOut&) = delete;

  // The loss at w and, if asked, its gradient dL/dw.
  Evaluation evaluate(double w, bool with_gradient) {
    // q and k are the same points, w x_i: one buffer serves as both.
    for (std::size_t i = 0; i < n_; ++i) scaled_x_[i] = float(w * double(x_[i]));
    flashcpu::attention(col(scaled_x_), col(scaled_x_), col(y_), col(out_), col(lse_), options_);

    Evaluation e;
    for (std::size_t i = 0; i < n_; ++i) {
      const double residual = double(out_[i]) - double(y_[i]);
      e.loss += residual * residual;
      // d(r^2) = 2 |r| dr, to first order.
      e.loss_error_bound += 2 * std::fabs(residual) * kTermAccuracy * std::max(1.0, std::fabs(double(out_[i])));
      dout_[i] = float(2.0 * residual / double(n_));  // dL/dout_i
    }
    e.loss /= double(n_);
    e.loss_error_bound /= double(n_);
    if (!with_gradient) return e;

    flashcpu::attention_backward(col(scaled_x_), col(scaled_x_), col(y_), col(out_), col(lse_), col(dout_), col(dq_),
                                 col(dk_), col(dv_), options_);
    // q_i = w x_i and k_j = w x_j, so dq_i/dw = x_i and dk_j/dw = x_j. dv is not needed:
    // the values y do not depend on w.
    for (std::size_t i = 0; i < n_; ++i) {
      const double from_query = double(dq_[i]) * double(x_[i]);
      const double from_key = double(dk_[i]) * double(x_[i]);
      e.grad += from_query + from_key;
      e.grad_terms_abs += std::fabs(from_query) + std::fabs(from_key);
    }
    return e;
  }

 private:
  const std::vector<float>& x_;
  const std::vector<float>& y_;
  std::size_t n_;
  std::vector<float> scaled_x_, out_, lse_, dout_, dq_, dk_, dv_;
  std::vector<std::uint8_t> not_self_;  // [n, n], row = query, column = key
  flashcpu::AttentionOptions options_;
};

// ---- The same loss in double, for the finite-difference check. -------------------------

// Written out with plain loops and no library call, so that it checks the library
// rather than repeating it. Each row's largest score is subtracted before exp: at
// w = 100 the scores reach -1/2 (100 * 5)^2 = -125000, and exp of that is 0 in double.
double loo_loss_double(const TrainingSet& data, double w) {
  const std::size_t n = data.x.size();
  double sum_sq = 0;
  for (std::size_t i = 0; i < n; ++i) {
    double max_score = -std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < n; ++j) {
      if (j == i) continue;
      const double d = (double(data.x[i]) - double(data.x[j])) * w;
      max_score = std::max(max_score, -0.5 * d * d);
    }
    double weighted = 0, total = 0;
    for (std::size_t j = 0; j < n; ++j) {
      if (j == i) continue;
      const double d = (double(data.x[i]) - double(data.x[j])) * w;
      const double p = std::exp(-0.5 * d * d - max_score);
      weighted += p * double(data.y[j]);
      total += p;
    }
    const double residual = weighted / total - double(data.y[i]);
    sum_sq += residual * residual;
  }
  return sum_sq / double(n);
}

// ---- Training. -------------------------------------------------------------------------

struct EpochRecord {
  int epoch;
  double w, loss, grad;  // where the descent stands after this epoch
  double step_size;      // for the next step
  bool passed_minimum;   // this epoch's step changed the sign of the gradient
};

std::vector<EpochRecord> train(LeaveOneOut& problem, double w_start, int epochs) {
  std::vector<EpochRecord> history;
  double log_w = std::log(w_start);
  Evaluation at = problem.evaluate(w_start, true);
  double slope = w_start * at.grad;  // dL/dlog w = w dL/dw
  double step_size = kInitialStepSize;
  history.push_back({0, w_start, at.loss, at.grad, step_size, false});
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    log_w += std::clamp(-step_size * slope, -kMaxLogStep, kMaxLogStep);
    const double w = std::exp(log_w);
    at = problem.evaluate(w, true);
    const double new_slope = w * at.grad;
    const bool passed_minimum = !(new_slope * slope > 0);  // a zero slope counts as passed: stop growing
    step_size *= passed_minimum ? kShrink : kGrow;
    slope = new_slope;
    history.push_back({epoch, w, at.loss, at.grad, step_size, passed_minimum});
  }
  return history;
}

// ---- Output. ---------------------------------------------------------------------------

// The model's prediction at the points `xq`, from all the training points (no mask:
// a query that is not a training input has no point of its own to leave out).
std::vector<float> predict(const TrainingSet& data, double w, const std::vector<float>& xq) {
  std::vector<float> q(xq.size()), k(data.x.size()), out(xq.size());
  for (std::size_t i = 0; i < xq.size(); ++i) q[i] = float(w * double(xq[i]));
  for (std::size_t j = 0; j < k.size(); ++j) k[j] = float(w * double(data.x[j]));
  flashcpu::AttentionOptions gauss;
  gauss.score = flashcpu::Score::gaussian;
  gauss.scale = 0.5f;
  flashcpu::attention(col(q), col(k), col(data.y), col(out), gauss);
  return out;
}

double mse_against_truth(const std::vector<float>& x, const std::vector<float>& pred) {
  double sum = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double e = double(pred[i]) - truth(x[i]);
    sum += e * e;
  }
  return sum / double(x.size());
}

constexpr const char* kHelp = R"(flashcpu-kernel-regression-train: learn the Gaussian kernel's width by gradient descent

Usage: flashcpu-kernel-regression-train [--out DIR] [--seed N] [--w0 W] [--epochs N]

The data set of flashcpu-kernel-regression: 50 points x_i ~ U(0, 5) (sorted),
y_i = 2 sin(x_i) + x_i^0.8 + eps, eps ~ N(0, 0.5^2). The model is
  f(x) = sum_i softmax_i(-1/2 ((x - x_i) w)^2) y_i,
flashcpu::attention with Score::gaussian, scale 1/2, q = w x, k = w x_i, v = y_i
(w = 1/h, h being the bandwidth of the first example). The loss is the leave-one-out
mean squared error: each training point is predicted from the other 49 (a bool mask
zero on the diagonal), so w cannot win by predicting points from themselves.

The program:
  * trains w by gradient descent on log w, the gradient coming from
    flashcpu::attention_backward (dL/dw = sum_i dq_i x_i + sum_j dk_j x_j); the step
    size grows 1.2x while the gradient keeps its sign and halves when a step passes
    the minimum. Prints w, the loss and dL/dw each epoch;
  * evaluates the same loss at 400 log-spaced w in [0.1, 100] and compares the best
    with the learned w: they should agree within one grid step (1.75%). The loss may
    have several minima; the learned w is then held to the grid's minimum nearest it;
  * checks dL/dw against a central finite difference of the same loss written in
    double with plain loops, at w = 1/4, 1, 4, 16, 64 and 128, and the flashcpu loss
    against the double loss there: |dL/dw - FD| must stay within 1e-5 of sum |dq_i x_i| +
    sum |dk_j x_j| (1e-5 being the fp32 kernels' accuracy), the loss within the error
    its fp32 outputs allow;
  * fits f on 0..5 step 0.01 from all 50 points with the starting and the learned w.
Exits 1 if a check fails (the CSVs are written anyway).

Options:
  --out DIR     where to write the CSVs (default ./kernel-regression-out; created if
                missing; the file names differ from flashcpu-kernel-regression's)
  --seed N      seed of the data set (default 20240611)
  --w0 W        the starting w, in [0.1, 100] (the grid's range). Default 0.3 (h = 3.3:
                the fit is nearly flat); 20 starts from the other side (h = 0.05: each
                point predicted by almost only its nearest neighbour)
  --epochs N    epochs of gradient descent, 1 to 10000 (default 50)
  -h, --help    this text

Files written to DIR:
  training_points.csv   x, y, truth: the 50 training points, sorted by x
  training_loss.csv     epoch, w, loss, dloss_dw, step_size, passed_minimum: one row
                        per epoch, epoch 0 being the start; passed_minimum = 1 when
                        the epoch's step changed the gradient's sign
  training_fit.csv      x, truth, before, after: the fit on 0..5 step 0.01 with the
                        starting and the learned w
  training_grid.csv     w, loss: the grid search

Plot them with: python3 examples/plot_kernel_regression.py DIR
)";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "%s: %s (see --help)\n", kProgram, msg.c_str());
  std::exit(2);
}

double parse_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end || !std::isfinite(v)) usage_error(flag + ": expected a number, got " + text);
  return v;
}

}  // namespace

int run(int argc, char** argv) {
  std::string out_dir = "kernel-regression-out";
  std::uint32_t seed = kDefaultSeed;
  double w_start = kDefaultStart;
  int epochs = kDefaultEpochs;
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
    } else if (a == "--w0") {
      w_start = parse_number(a, value());
      if (!(w_start >= kGridMin && w_start <= kGridMax)) usage_error("--w0: expected a number in [0.1, 100]");
    } else if (a == "--epochs") {
      const double e = parse_number(a, value());
      if (!(e >= 1 && e <= 10000 && e == std::floor(e))) usage_error("--epochs: expected an integer in [1, 10000]");
      epochs = int(e);
    } else {
      usage_error("unknown argument " + a);
    }
  }
  if (!make_dir(out_dir)) {
    std::fprintf(stderr, "%s: cannot create %s: %s\n", kProgram, out_dir.c_str(), std::strerror(errno));
    return 1;
  }

  const TrainingSet data = make_training_set(seed);
  LeaveOneOut problem(data);

  std::printf("%s: the Gaussian kernel's width, learned through flashcpu::attention_backward\n", kProgram);
  std::printf("  f(x) = 2 sin(x) + x^0.8; %d training points x ~ U(0, 5), sorted, y = f(x) + N(0, 0.5^2), seed %u\n",
              kTrain, seed);
  std::printf("  model f(x) = sum_i softmax_i(-1/2 ((x - x_i) w)^2) y_i: Score::gaussian, scale 1/2,\n"
              "  q = w x, k = w x_i, v = y_i\n");
  std::printf("  loss: leave-one-out MSE (bool mask zero on the diagonal); ISA %s\n\n",
              flashcpu::active_isa().c_str());

  // ---- 1. Training. -------------------------------------------------------------------
  std::printf("1. Gradient descent on log w from w = %g (h = 1/w = %.4g), %d epochs: log w -= step size x\n"
              "   dL/dlog w. The step size starts at %g, grows x%g while the gradient keeps its sign and\n"
              "   halves when a step passes the minimum (the gradient changes sign).\n\n",
              w_start, 1 / w_start, epochs, kInitialStepSize, kGrow);
  const std::vector<EpochRecord> history = train(problem, w_start, epochs);
  std::printf("  %5s  %10s  %8s  %12s  %11s  %9s\n", "epoch", "w", "h = 1/w", "LOO loss", "dL/dw", "step size");
  for (const EpochRecord& r : history) {
    std::printf("  %5d  %10.6f  %8.5f  %12.9f  %11.3e  %9.4g", r.epoch, r.w, 1 / r.w, r.loss, r.grad, r.step_size);
    if (r.passed_minimum) std::printf("   passed the minimum");
    std::printf("\n");
  }
  const EpochRecord& start = history.front();
  const EpochRecord& learned = history.back();
  std::printf("\n  learned w = %.6f (h = %.5f), LOO loss %.9f, dL/dw %.3e; from loss %.9f at w = %g.\n\n",
              learned.w, 1 / learned.w, learned.loss, learned.grad, start.loss, start.w);

  // ---- 2. Grid search on the same loss. -----------------------------------------------
  std::vector<double> grid_w(kGridPoints), grid_loss(kGridPoints);
  int best = 0;
  for (int g = 0; g < kGridPoints; ++g) {
    grid_w[std::size_t(g)] = kGridMin * std::pow(kGridMax / kGridMin, double(g) / (kGridPoints - 1));
    grid_loss[std::size_t(g)] = problem.evaluate(grid_w[std::size_t(g)], false).loss;
    if (grid_loss[std::size_t(g)] < grid_loss[std::size_t(best)]) best = g;
  }
  const double grid_ratio = std::pow(kGridMax / kGridMin, 1.0 / (kGridPoints - 1));
  // The loss need not have one minimum (with --seed 5 it has three), and gradient
  // descent finds the one its start leads to. So the learned w is held to the grid's
  // local minimum nearest to it, and compared with the grid's best as well.
  std::vector<int> local_minima;  // interior grid points below both neighbours
  for (int g = 1; g + 1 < kGridPoints; ++g)
    if (grid_loss[std::size_t(g)] < grid_loss[std::size_t(g - 1)] &&
        grid_loss[std::size_t(g)] < grid_loss[std::size_t(g + 1)])
      local_minima.push_back(g);
  int nearest = best;
  for (int g : local_minima)
    if (std::fabs(std::log(grid_w[std::size_t(g)] / learned.w)) <
        std::fabs(std::log(grid_w[std::size_t(nearest)] / learned.w)))
      nearest = g;
  const double w_grid = grid_w[std::size_t(best)], loss_grid = grid_loss[std::size_t(best)];
  const double w_near = grid_w[std::size_t(nearest)];
  const double w_rel_diff = std::fabs(learned.w - w_grid) / w_grid;
  const double w_near_rel_diff = std::fabs(learned.w - w_near) / w_near;
  // A grid point is within half a step of the minimum it brackets, and the descent's w
  // is much closer than that: they should differ by less than one step.
  const bool grid_agrees = w_near_rel_diff <= grid_ratio - 1;
  std::printf("2. Grid search: the same loss at %d log-spaced w in [%g, %g] (neighbours %.2f%% apart).\n",
              kGridPoints, kGridMin, kGridMax, 100 * (grid_ratio - 1));
  std::printf("  grid best   w = %.6f (h = %.5f), LOO loss %.9f\n", w_grid, 1 / w_grid, loss_grid);
  std::printf("  learned     w = %.6f (h = %.5f), LOO loss %.9f\n", learned.w, 1 / learned.w, learned.loss);
  std::printf("  |w_learned - w_grid| / w_grid = %.3e (%.3f%%; one grid step is %.2f%%)", w_rel_diff,
              100 * w_rel_diff, 100 * (grid_ratio - 1));
  if (nearest == best) std::printf("  %s", grid_agrees ? "ok" : "DISAGREE");
  std::printf("\n  loss_learned - loss_grid = %.3e\n", learned.loss - loss_grid);
  if (learned.w < kGridMin || learned.w > kGridMax) {
    // From a start on the far side of a maximum, the loss keeps falling toward a limit.
    std::printf("  The descent left the grid's range: from w = %g the loss falls toward %s.\n", start.w,
                learned.w < kGridMin ? "w -> 0 (each point predicted by the mean of the others)"
                                     : "w -> infinity (each point predicted by its nearest neighbour)");
  } else if (nearest != best) {
    std::printf("  The loss has %zu local minima on the grid, at w =", local_minima.size());
    for (int g : local_minima) std::printf(" %.4g", grid_w[std::size_t(g)]);
    std::printf(".\n  The descent found the one at w = %.6f (loss %.9f), not the grid's best:\n"
                "  |w_learned - w_local| / w_local = %.3e  %s\n",
                w_near, grid_loss[std::size_t(nearest)], w_near_rel_diff, grid_agrees ? "ok" : "DISAGREE");
  }
  std::printf("\n");

  // ---- 3. The gradient against a finite difference of the double loss. ---------------
  std::printf("3. dL/dw from attention_backward against the central difference (L(w + d) - L(w - d)) / 2d\n"
              "   of the leave-one-out loss in double (plain loops), d = %g w, at powers of two (w x exact in\n"
              "   fp32). cancel = (sum |dq_i x_i| + sum |dk_j x_j|) / |FD|; the gradient's relative error may\n"
              "   be %g x cancel (each fp32 term good to %g of their size). The flashcpu loss is checked\n"
              "   against the double loss too, its tolerance from out good to %g x max(1, |out|).\n\n",
              kFdRelativeStep, kTermAccuracy, kTermAccuracy, kTermAccuracy);
  std::printf("  %9s | %13s %13s %6s %9s %9s | %9s %9s\n", "w", "flashcpu", "finite diff", "cancel", "rel err",
              "tolerance", "loss err", "tolerance");
  bool gradient_ok = true, loss_ok = true;
  for (const double w : kFdPoints) {
    const Evaluation e = problem.evaluate(w, true);
    const double d = kFdRelativeStep * w;
    const double fd = (loo_loss_double(data, w + d) - loo_loss_double(data, w - d)) / (2 * d);
    const double cancel = e.grad_terms_abs / std::fabs(fd);
    const double grad_err = std::fabs(e.grad - fd) / std::fabs(fd);
    const double grad_tol = kTermAccuracy * cancel;
    const double loss_double = loo_loss_double(data, w);
    const double loss_err = std::fabs(e.loss - loss_double) / loss_double;
    const double loss_tol = e.loss_error_bound / loss_double;
    // Written as err <= tol so that a NaN fails.
    const bool grad_point_ok = grad_err <= grad_tol, loss_point_ok = loss_err <= loss_tol;
    gradient_ok = gradient_ok && grad_point_ok;
    loss_ok = loss_ok && loss_point_ok;
    std::printf("  %9g | %13.6e %13.6e %6.1f %9.2e %9.2e | %9.2e %9.2e  %s\n", w, e.grad, fd, cancel, grad_err,
                grad_tol, loss_err, loss_tol, grad_point_ok && loss_point_ok ? "ok" : "FAILED");
  }
  {
    // At the minimum the gradient is zero up to rounding: both are printed, not compared.
    const Evaluation e = problem.evaluate(learned.w, true);
    const double d = kFdRelativeStep * learned.w;
    const double fd = (loo_loss_double(data, learned.w + d) - loo_loss_double(data, learned.w - d)) / (2 * d);
    std::printf("  %9.6f | %13.6e %13.6e   (the learned w, a minimum: both ~0, not compared)\n", learned.w,
                e.grad, fd);
  }
  std::printf("\n");

  // ---- 4. Fits before and after, and the CSVs. --------------------------------------
  const std::vector<float> x_fine = grid(0.01), x_coarse = grid(0.1);
  const std::vector<float> fit_before = predict(data, start.w, x_fine), fit_after = predict(data, learned.w, x_fine);
  std::printf("4. The fit from all 50 points against the noise-free f, MSE on 0..5 step 0.1 (as in\n"
              "   flashcpu-kernel-regression's table): before (w = %g) %.4f, after (w = %.4f) %.4f\n\n",
              start.w, mse_against_truth(x_coarse, predict(data, start.w, x_coarse)), learned.w,
              mse_against_truth(x_coarse, predict(data, learned.w, x_coarse)));
  {
    Csv csv(out_dir + "/training_points.csv", kProgram);
    std::fputs("x,y,truth\n", csv.f);
    for (std::size_t j = 0; j < data.x.size(); ++j)
      std::fprintf(csv.f, "%.9g,%.9g,%.9g\n", double(data.x[j]), double(data.y[j]), truth(data.x[j]));
  }
  {
    Csv csv(out_dir + "/training_loss.csv", kProgram);
    std::fputs("epoch,w,loss,dloss_dw,step_size,passed_minimum\n", csv.f);
    for (const EpochRecord& r : history) {
      std::fprintf(csv.f, "%d", r.epoch);
      for (double v : {r.w, r.loss, r.grad, r.step_size}) {
        std::fputc(',', csv.f);
        put(csv.f, v);
      }
      std::fprintf(csv.f, ",%d\n", int(r.passed_minimum));
    }
  }
  {
    Csv csv(out_dir + "/training_fit.csv", kProgram);
    std::fputs("x,truth,before,after\n", csv.f);
    for (std::size_t i = 0; i < x_fine.size(); ++i) {
      put(csv.f, x_fine[i]);
      for (double v : {truth(x_fine[i]), double(fit_before[i]), double(fit_after[i])}) {
        std::fputc(',', csv.f);
        put(csv.f, v);
      }
      std::fputc('\n', csv.f);
    }
  }
  {
    Csv csv(out_dir + "/training_grid.csv", kProgram);
    std::fputs("w,loss\n", csv.f);
    for (int g = 0; g < kGridPoints; ++g) {
      put(csv.f, grid_w[std::size_t(g)]);
      std::fputc(',', csv.f);
      put(csv.f, grid_loss[std::size_t(g)]);
      std::fputc('\n', csv.f);
    }
  }
  std::printf("Wrote training_points.csv, training_loss.csv, training_fit.csv, training_grid.csv to %s\n",
              out_dir.c_str());

  const bool all_ok = grid_agrees && gradient_ok && loss_ok;
  if (!all_ok) std::printf("A check FAILED (see above).\n");
  return all_ok ? 0 : 1;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const flashcpu::Error& e) {
    std::fprintf(stderr, "%s: %s\n", kProgram, e.what());
    return 1;
  }
}
