// attention_backward and its oracle, reference::attention_backward.
//
// The oracle is checked against central finite differences of reference::attention; the
// fused backward against the oracle on every ISA level (the CTest runs per level), on
// shapes with awkward tails, strided views, GQA, causal with N > M and N < M, every
// option, both scores, rows that see nothing and garbage in excluded K/V slots; then
// determinism over thread counts, the zero-size cases and the argument checks.
//
// Tolerance of the fused backward (fp32, u = 2^-24) against the oracle (double), per
// element, derived here in double from the test's own scores (attention_oracle.hpp's
// row_scores) and the forward's tolerances (expect()), over the visible pairs (i, j):
//   P_ij is recomputed from the forward's lse: relative error eP_ij/P_ij = Δ_j + Δlse_i +
//     2u|lse_i| + 4u, with Δ_j the forward's score bound (attention_oracle.hpp), Δlse_i
//     the bound on the lse the forward wrote, and the lse's conversion to log2 units;
//   dP_ij = dO_i.v_j, a length-Dv fp32 dot: (Dv + 2) u Σ_c |dO_ic v_jc|;
//   D_i = dO_i.O_i from the forward's out: Σ_c |dO_ic| tol(O_ic) + (Dv + 2) u Σ_c |dO_ic O_ic|;
//   dS_ij = P_ij (dP_ij - D_i): eP_ij |dP_ij - D_i| + P_ij (e dP_ij + e D_i), and under
//     soft-capping times the derivative t' = 1 - tanh^2, plus P_ij |dP_ij - D_i| (10 u +
//     2 |t| t' Δ_j / c) for its own error (tanh good to a few ulp, the score to Δ_j);
//   then each gradient element is a sum of n terms x_t y_t (n = N·G for dk and dv, M for
//     dq) with x = dS or P: Σ_t e(x_t)|y_t| + (n + 2) u Σ_t |x_t y_t|, y = |k|, |q| or |dO|
//     (the Gaussian: y = |q - k|, times 2: its dq and dk are summed from exact
//     differences).
// Worst cases, far above what the kernels reach: every comparison must also stay within
// kBackwardMargin of its bound (observed: see the constant).
// The bf16 kernels with pair products (vdpbf16ps; bf16 data, dot product): S and dP are
// exact products of the bf16 inputs summed with the roundings of FMAs, so the terms above
// hold; P and dS are rounded to bf16 before the other three products, which adds
// u16 Σ_t |x_t y_t| (u16 = 2^-8) to each gradient's bound; and the gradient is rounded to
// bf16 once: u16 (|oracle| + bound) more. The subnormals vdpbf16ps reads and writes as
// zero (as its emulation does) are not in this bound: the tests' values are far from them.
// fp32 data under allow_bf16_compute runs those kernels on q, k, v and dout rounded to
// bf16: its gradients, rounded to bf16, must be bitwise the bf16 call's on the rounded
// inputs, and they are held to the oracle on the rounded inputs under the bound above
// without the final rounding (their own fp32 rounding: u |oracle|). fp16 data under it:
// bitwise the fp32 call's on the widened fp16 values, rounded to fp16.
#include <catch2/catch.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "attention_oracle.hpp"
#include "emulation.hpp"
#include "plan.hpp"
#include "util.hpp"

namespace {

using namespace oracle;
using flashcpu::bhsd;

// The derived bounds are worst cases; each comparison must also stay within this fraction
// of its bound. Observed: 0.084 (AVX2), 0.124 (SSE2).
constexpr double kBackwardMargin = 0.25;

// dout (padding NaN) and the three gradients (padding a sentinel) of a Problem.
struct Grads {
  Tensor dout, dq, dk, dv;
  Grads(const Problem& p, Layout outs)
      : dout(p.out.shape(), outs, kNaN),
        dq(p.q.shape(), outs, kSentinel),
        dk(p.k.shape(), outs, kSentinel),
        dv(p.v.shape(), outs, kSentinel) {}
};

// out and lse from the fused forward, then dout uniform in [-1, 1].
void forward(Problem& p, Grads& g) {
  flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
  g.dout.fill_uniform(p.rng, -1.0f, 1.0f);
}

using flashcpu::detail::BackwardSchedule;
// Every schedule the driver has (src/backward.cpp), the automatic choice first.
constexpr BackwardSchedule kSchedules[] = {BackwardSchedule::automatic, BackwardSchedule::whole_heads,
                                           BackwardSchedule::key_blocks_in_turn, BackwardSchedule::two_passes};
const char* schedule_name(BackwardSchedule s) {
  return s == BackwardSchedule::automatic            ? "automatic"
         : s == BackwardSchedule::whole_heads        ? "whole heads"
         : s == BackwardSchedule::key_blocks_in_turn ? "key blocks in turn"
                                                     : "two passes";
}

// chunk_blocks: key blocks per chunk of the one pass; 0 the driver's choice, which on the
// tests' shapes puts a head's keys in one chunk.
void run_fused(Problem& p, Grads& g, BackwardSchedule schedule = BackwardSchedule::automatic,
               std::int64_t chunk_blocks = 0) {
  flashcpu::detail::attention_backward_scheduled(schedule, chunk_blocks, p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(),
                                                 p.lse.cview(), g.dout.cview(), g.dq.view(), g.dk.view(),
                                                 g.dv.view(), p.opt);
}

// The oracle's gradients, contiguous.
struct Exact {
  std::vector<float> dq, dk, dv;
};
Exact run_oracle(Problem& p, Grads& g) {
  const Dims& d = p.d;
  Exact e;
  e.dq.assign(std::size_t(std::max<std::int64_t>(d.B * d.Hq * d.N * d.D, 1)), kNaN);
  e.dk.assign(std::size_t(std::max<std::int64_t>(d.B * d.Hkv * d.M * d.D, 1)), kNaN);
  e.dv.assign(std::size_t(std::max<std::int64_t>(d.B * d.Hkv * d.M * d.Dv, 1)), kNaN);
  flashcpu::reference::attention_backward(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(), p.lse.cview(),
                                          g.dout.cview(), bhsd(e.dq.data(), d.B, d.Hq, d.N, d.D),
                                          bhsd(e.dk.data(), d.B, d.Hkv, d.M, d.D),
                                          bhsd(e.dv.data(), d.B, d.Hkv, d.M, d.Dv), p.opt);
  return e;
}

double resolved_scale(const Problem& p) {
  return p.opt.scale                               ? double(*p.opt.scale)
         : p.opt.score == Score::dot_product ? double(float(1.0 / std::sqrt(double(p.d.D))))
                                             : 0.5;
}

// The per-element bounds of the header comment, contiguous like Exact. weights_u: the
// relative rounding of P and dS before dV, dK and dQ (0 for fp32; bf16's unit roundoff
// where those products take bf16 pairs), a term weights_u |x_t y_t| each.
Exact bounds(Problem& p, Grads& g, const Expected& fwd, double weights_u = 0) {
  const Dims& d = p.d;
  const std::int64_t G = d.Hq / d.Hkv;
  const double u = kU, scale = resolved_scale(p);
  const bool gauss = p.opt.score == Score::gaussian;
  const double cap = p.opt.softcap;
  std::vector<double> tq(std::size_t(d.B * d.Hq * d.N * d.D), 0.0), tk(std::size_t(d.B * d.Hkv * d.M * d.D), 0.0),
      tv(std::size_t(d.B * d.Hkv * d.M * d.Dv), 0.0);
  std::vector<double> s(std::size_t(d.M)), a(std::size_t(d.M)), P(std::size_t(d.M)), eP(std::size_t(d.M)),
      dS(std::size_t(d.M)), edS(std::size_t(d.M));
  const auto q = p.q.cview(), k = p.k.cview(), v = p.v.cview(), dout = g.dout.cview();
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h) {
      const std::int64_t hk = h / G;
      for (std::int64_t i = 0; i < d.N; ++i) {
        row_scores(q, k, p.opt, d, scale, b, h, i, s, a);
        const std::size_t row = std::size_t((b * d.Hq + h) * d.N + i);
        double top = p.opt.sinks ? double(p.opt.sinks[h]) : -kInf;
        for (std::int64_t j = 0; j < d.M; ++j) top = std::max(top, s[std::size_t(j)]);
        if (top == -kInf) continue;  // no visible key, no sink: nothing flows through the row
        double sum = p.opt.sinks && p.opt.sinks[h] != -kInf ? std::exp(double(p.opt.sinks[h]) - top) : 0.0;
        for (std::int64_t j = 0; j < d.M; ++j) sum += s[std::size_t(j)] == -kInf ? 0.0 : std::exp(s[std::size_t(j)] - top);
        double Drow = 0, eD = 0;
        for (std::int64_t x = 0; x < d.Dv; ++x) {
          const double o = fwd.out[row * std::size_t(d.Dv) + std::size_t(x)], dO = elem(dout, b, h, i, x);
          Drow += dO * o;
          eD += std::fabs(dO) * fwd.out_tol[row * std::size_t(d.Dv) + std::size_t(x)] + (d.Dv + 2) * u * std::fabs(dO * o);
        }
        // Drow from the reference out; its own error is in eD.
        const double lse_err = fwd.lse_tol[row] + 4 * u;
        for (std::int64_t j = 0; j < d.M; ++j) {
          const std::size_t js = std::size_t(j);
          if (s[js] == -kInf) {
            P[js] = eP[js] = dS[js] = edS[js] = 0;
            continue;
          }
          // The raw score and its magnitude a_j, as the forward's bound takes them.
          double raw = 0, mag = 0;
          for (std::int64_t x = 0; x < d.D; ++x) {
            const double qx = elem(q, b, h, i, x), kx = elem(k, b, hk, j, x);
            if (gauss) {
              raw -= (qx - kx) * (qx - kx);
              mag += (qx - kx) * (qx - kx);
            } else {
              raw += qx * kx;
              mag += std::fabs(qx * kx);
            }
          }
          raw *= scale;
          mag *= std::fabs(scale);
          const double t = cap > 0 ? std::tanh(raw / cap) : 0.0;
          const double capped = cap > 0 ? cap * t : raw;
          const double delta_j = u * ((d.D + 10) * mag + 8 * (std::fabs(s[js]) + std::fabs(raw) + std::fabs(s[js] - capped)) + 16);
          P[js] = std::exp(s[js] - top) / sum;
          // The saved lse's bound, then its conversion to log2 units and the subtraction.
          eP[js] = P[js] * 1.01 * (delta_j + lse_err + 2 * u * std::fabs(top + std::log(sum)) + 4 * u);
          double dP = 0, edP = 0;
          for (std::int64_t x = 0; x < d.Dv; ++x) {
            const double t2 = double(elem(dout, b, h, i, x)) * double(elem(v, b, hk, j, x));
            dP += t2;
            edP += std::fabs(t2);
          }
          edP *= (d.Dv + 2) * u;
          const double deriv = cap > 0 ? 1 - t * t : 1.0;
          dS[js] = P[js] * (dP - Drow) * deriv;
          edS[js] = (eP[js] * std::fabs(dP - Drow) + P[js] * (edP + eD)) * deriv;
          // 1 - t^2 from a t good to a few ulp (xsimd's tanh) is off by ~10 u absolutely,
          // which near |t| = 1 is large against 1 - t^2 itself; and the score's own error
          // moves it by 2 |t| (1 - t^2) Δ_j / c.
          if (cap > 0)
            edS[js] += P[js] * std::fabs(dP - Drow) * (10 * u + 2 * std::fabs(t) * deriv * delta_j / cap);
        }
        const double nq = double(d.M + 2) * u + weights_u, nk = double(d.N * G + 2) * u + weights_u;
        const double f = gauss ? 2 * std::fabs(scale) : std::fabs(scale);
        for (std::int64_t j = 0; j < d.M; ++j) {
          const std::size_t js = std::size_t(j);
          if (P[js] == 0 && eP[js] == 0) continue;
          for (std::int64_t x = 0; x < d.D; ++x) {
            const double qx = elem(q, b, h, i, x), kx = elem(k, b, hk, j, x);
            const double yk = gauss ? std::fabs(kx - qx) : std::fabs(kx);
            const double yq = gauss ? yk : std::fabs(qx);
            tq[row * std::size_t(d.D) + std::size_t(x)] += f * (edS[js] * yk + nq * std::fabs(dS[js]) * yk);
            tk[std::size_t(((b * d.Hkv + hk) * d.M + j) * d.D + x)] += f * (edS[js] * yq + nk * std::fabs(dS[js]) * yq);
          }
          for (std::int64_t x = 0; x < d.Dv; ++x) {
            const double dO = std::fabs(elem(dout, b, h, i, x));
            tv[std::size_t(((b * d.Hkv + hk) * d.M + j) * d.Dv + x)] += eP[js] * dO + nk * P[js] * dO;
          }
        }
      }
    }
  Exact out;
  out.dq.assign(tq.begin(), tq.end());
  out.dk.assign(tk.begin(), tk.end());
  out.dv.assign(tv.begin(), tv.end());
  return out;
}

struct BackwardOutcome {
  bool ok = true;
  double ratio = 0;  // worst |fused - oracle| / bound
  std::string report;
};

// Compares one gradient view with the oracle's contiguous values under the bounds.
void compare_grad(const char* name, const Tensor& got, const std::vector<float>& want, const std::vector<float>& tol,
                  BackwardOutcome& o) {
  const Shape sh = got.shape();
  Worst w;
  for (std::int64_t b = 0; b < sh[0]; ++b)
    for (std::int64_t h = 0; h < sh[1]; ++h)
      for (std::int64_t i = 0; i < sh[2]; ++i)
        for (std::int64_t c = 0; c < sh[3]; ++c) {
          const std::size_t x = std::size_t(((b * sh[1] + h) * sh[2] + i) * sh[3] + c);
          // The bound plus one rounding of the result to float.
          const double bound = double(tol[x]) + kU * std::fabs(double(want[x]));
          w.record(got.at(b, h, i, c), want[x], bound, b, h, i, c);
        }
  if (w.bad > 0) o.ok = false;
  o.ratio = std::max(o.ratio, w.ratio);
  if (!got.padding_intact()) {
    o.ok = false;
    o.report += std::string(name) + ": wrote outside its view\n";
  }
  o.report += w.text(name, "fused", "oracle") + "\n";
}

// The fused fp32 gradients in g against the oracle's, under the bounds from fwd.
void compare_with_oracle(Problem& p, Grads& g, const Expected& fwd, BackwardOutcome& o, const std::string& suffix = "") {
  const Exact want = run_oracle(p, g);
  const Exact tol = bounds(p, g, fwd);
  compare_grad(("dq" + suffix).c_str(), g.dq, want.dq, tol.dq, o);
  compare_grad(("dk" + suffix).c_str(), g.dk, want.dk, tol.dk, o);
  compare_grad(("dv" + suffix).c_str(), g.dv, want.dv, tol.dv, o);
}

BackwardOutcome check_backward(Problem& p, Layout outs = Layout::padded,
                               BackwardSchedule schedule = BackwardSchedule::automatic, std::int64_t chunk_blocks = 0) {
  Grads g(p, outs);
  forward(p, g);
  const Expected fwd = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
  run_fused(p, g, schedule, chunk_blocks);
  BackwardOutcome o;
  compare_with_oracle(p, g, fwd, o);
  return o;
}

#define CHECK_BACKWARD(p, ...)                                  \
  do {                                                          \
    const BackwardOutcome outcome_ = check_backward(p, ##__VA_ARGS__); \
    INFO((p).describe());                                       \
    INFO(outcome_.report);                                      \
    CHECK(outcome_.ok);                                         \
    ::ftest::record_margin(outcome_.ratio);                     \
    CHECK(outcome_.ratio <= kBackwardMargin);                   \
  } while (false)

// Whether attention_backward on T takes its products by bf16 pairs (the vdpbf16ps
// variant: bf16 data, the dot product, a level that has it).
template <class T>
bool pair_products(const Problem& p) {
  return std::is_same<T, flashcpu::bf16>::value &&
         flashcpu::detail::backward_kernels(flashcpu::detail::DType::bf16, p.opt.score, false).bf16_products;
}

// The gradients of the kernels with pair products (16-bit ones widened) in g, with the
// dout they came from, against the oracle under the fp32 bounds with P and dS rounded to
// bf16 (weights_u = bf16's 2^-8), plus one rounding to the gradients' type (final_u:
// 2^-8 or 2^-11; 0 for fp32): tol + final_u (|want| + tol), and compare_grad's u |want|.
// fwd's out_tol must include out's rounding.
void compare_with_oracle16(Problem& p, Grads& g, const Expected& fwd, double final_u, BackwardOutcome& o,
                           const std::string& suffix) {
  const Exact want = run_oracle(p, g), tol = bounds(p, g, fwd, ftest::unit_roundoff<flashcpu::bf16>());
  auto rounded = [final_u](const std::vector<float>& w, std::vector<float> t) {
    for (std::size_t x = 0; x < t.size(); ++x) t[x] += float(final_u * (std::fabs(double(w[x])) + double(t[x])));
    return t;
  };
  compare_grad(("dq" + suffix).c_str(), g.dq, want.dq, rounded(want.dq, tol.dq), o);
  compare_grad(("dk" + suffix).c_str(), g.dk, want.dk, rounded(want.dk, tol.dk), o);
  compare_grad(("dv" + suffix).c_str(), g.dv, want.dv, rounded(want.dv, tol.dv), o);
}

// Elements of `got` (inside its view) whose bits differ from want's rounded to T; with
// nan_matches, a NaN matches any NaN.
template <class T>
std::int64_t rounded_mismatches(const ftest::Copy<T>& got, const Tensor& want, bool nan_matches = false) {
  const Shape sh = want.shape();
  std::int64_t bad = 0;
  for (std::int64_t b = 0; b < sh[0]; ++b)
    for (std::int64_t h = 0; h < sh[1]; ++h)
      for (std::int64_t i = 0; i < sh[2]; ++i)
        for (std::int64_t c = 0; c < sh[3]; ++c) {
          const T x = got.at(b, h, i, c), y = ftest::narrow<T>(want.at(b, h, i, c));
          const bool both_nan = std::isnan(ftest::widen(x)) && std::isnan(ftest::widen(y));
          bad += !(nan_matches && both_nan) && std::memcmp(&x, &y, sizeof(T)) != 0;
        }
  return bad;
}

// The 16-bit backward (T = bf16 or fp16) on a problem whose q, k, v, out and dout are
// first rounded to T (in the fp32 tensors too). Where it widens them exactly and runs
// the fp32 code in the same order, each gradient must be bitwise the fp32 backward's on
// those fp32 tensors, rounded to T; the fp32 gradients are compared with the oracle as
// in check_backward (their bound's D_i term widened by out's rounding), so the 16-bit
// ones are within that bound plus one rounding (u16 = 2^-8 or 2^-11 relative) of the
// oracle. Where it takes its products by bf16 pairs (pair_products: that bound with P and
// dS rounded to bf16, the sums in another order), the 16-bit gradients are compared with
// the oracle under that bound plus one rounding directly. *mismatches counts the 16-bit elements that differ from
// the fp32 ones rounded.
template <class T>
BackwardOutcome check_backward16(Problem& p, Layout outs, std::int64_t* mismatches) {
  using ftest::Copy;
  ftest::round_view<T>(p.q);
  ftest::round_view<T>(p.k);
  ftest::round_view<T>(p.v);
  Grads g(p, outs), g16(p, outs);
  forward(p, g);
  ftest::round_view<T>(p.out);  // as a 16-bit forward writes it
  ftest::round_view<T>(g.dout);
  // The oracle takes D_i = dO_i . O_i from its own exact P; the kernels from the rounded
  // out, whose error bound gains the rounding: u16 (|O| + tol).
  Expected fwd = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
  for (std::size_t x = 0; x < fwd.out_tol.size(); ++x)
    fwd.out_tol[x] += ftest::unit_roundoff<T>() * (std::fabs(double(fwd.out[x])) + fwd.out_tol[x]);
  run_fused(p, g);
  const Copy<T> q(p.q), k(p.k), v(p.v), out(p.out), dout(g.dout);  // NaN padding stays NaN
  Copy<T> dq(g16.dq), dk(g16.dk), dv(g16.dv);
  const Copy<T> dq_before(dq), dk_before(dk), dv_before(dv);
  flashcpu::attention_backward(q.cview(), k.cview(), v.cview(), out.cview(), p.lse.cview(), dout.cview(), dq.view(),
                               dk.view(), dv.view(), p.opt);
  BackwardOutcome o;
  *mismatches = 0;
  auto rounded_from = [&](const char* name, const Copy<T>& got, const Copy<T>& before, const Tensor& want) {
    const std::int64_t bad = rounded_mismatches(got, want);
    *mismatches += bad;
    if (bad > 0) o.report += std::string(name) + ": " + std::to_string(bad) + " elements differ from the fp32 result rounded\n";
    if (!ftest::same_bits(before, got, false)) {
      o.ok = false;
      o.report += std::string(name) + ": wrote outside its view\n";
    }
  };
  rounded_from("dq", dq, dq_before, g.dq);
  rounded_from("dk", dk, dk_before, g.dk);
  rounded_from("dv", dv, dv_before, g.dv);
  compare_with_oracle(p, g, fwd, o, " (fp32)");
  if (pair_products<T>(p)) {
    Grads widened = g;  // its dout, and the 16-bit gradients widened
    for (auto [from, to] : {std::pair{&dq, &widened.dq}, {&dk, &widened.dk}, {&dv, &widened.dv}}) {
      const Shape sh = to->shape();
      for (std::int64_t b = 0; b < sh[0]; ++b)
        for (std::int64_t h = 0; h < sh[1]; ++h)
          for (std::int64_t i = 0; i < sh[2]; ++i)
            for (std::int64_t c = 0; c < sh[3]; ++c) to->at(b, h, i, c) = flashcpu::to_float(from->at(b, h, i, c));
    }
    compare_with_oracle16(p, widened, fwd, ftest::unit_roundoff<T>(), o,
                          std::string(" (") + ftest::type_name<T>() + ", pair products)");
  }
  return o;
}

// A bf16 training step as a user runs it: q, k and v rounded to bf16 (in p's fp32
// tensors too), out and lse from the forward on them, out and dout rounded to bf16.
void round_to_bf16(Problem& p, Grads& g) {
  ftest::round_view<flashcpu::bf16>(p.q);
  ftest::round_view<flashcpu::bf16>(p.k);
  ftest::round_view<flashcpu::bf16>(p.v);
  forward(p, g);
  ftest::round_view<flashcpu::bf16>(p.out);
  ftest::round_view<flashcpu::bf16>(g.dout);
}

// attention_backward on T copies of p's q, k, v, out and of `dout` (T = float: copies of
// the values as they are), on `kernels`, with `options`; the gradients widened into
// grads' views. Fails the test if it writes outside a view.
template <class T>
void run_fused_as(Problem& p, const Tensor& dout, Grads& grads, const flashcpu::detail::KernelTable& kernels,
                  const flashcpu::AttentionOptions& options, BackwardSchedule schedule = BackwardSchedule::automatic,
                  std::int64_t chunk_blocks = 0) {
  using ftest::Copy;
  const Copy<T> q(p.q), k(p.k), v(p.v), out(p.out), dt(dout);
  Copy<T> dq(grads.dq), dk(grads.dk), dv(grads.dv);
  const Copy<T> dq_before(dq), dk_before(dk), dv_before(dv);
  flashcpu::detail::attention_backward_with(kernels, schedule, chunk_blocks, q.cview(), k.cview(), v.cview(),
                                            out.cview(), p.lse.cview(), dt.cview(), dq.view(), dk.view(), dv.view(),
                                            options);
  auto widen = [](const Copy<T>& from, const Copy<T>& before, Tensor& to) {
    CHECK(ftest::same_bits(before, from, false));
    const Shape sh = to.shape();
    for (std::int64_t b = 0; b < sh[0]; ++b)
      for (std::int64_t h = 0; h < sh[1]; ++h)
        for (std::int64_t i = 0; i < sh[2]; ++i)
          for (std::int64_t c = 0; c < sh[3]; ++c) to.at(b, h, i, c) = ftest::widen(from.at(b, h, i, c));
  };
  widen(dq, dq_before, grads.dq);
  widen(dk, dk_before, grads.dk);
  widen(dv, dv_before, grads.dv);
}

// attention_backward on bf16 copies of p's tensors (round_to_bf16 first) on `kernels`
// (null: the library's choice), the gradients widened into g's views.
void run_fused_bf16(Problem& p, Grads& g, BackwardSchedule schedule = BackwardSchedule::automatic,
                    std::int64_t chunk_blocks = 0, const flashcpu::detail::KernelTable* kernels = nullptr) {
  run_fused_as<flashcpu::bf16>(
      p, g.dout, g,
      kernels ? *kernels : flashcpu::detail::backward_kernels(flashcpu::detail::DType::bf16, p.opt.score, false),
      p.opt, schedule, chunk_blocks);
}

// The kernels with their products by bf16 pairs: the avx512bf16 variant's backward on
// emulated vdpbf16ps (SSE2 vectors, 4-row tiles), on every machine, and the dispatched
// one where the level runs it.
std::vector<const flashcpu::detail::KernelTable*> pair_backward_kernels() {
  std::vector<const flashcpu::detail::KernelTable*> list{&flashcpu::detail::emulated_pair_kernels()};
  const flashcpu::detail::KernelTable& dispatched = flashcpu::detail::backward_kernels(flashcpu::detail::DType::bf16, Score::dot_product, false);
  if (dispatched.bf16_products) list.push_back(&dispatched);
  return list;
}

template <class T>
void check_backward16_case(Problem& p, Layout outs) {
  std::int64_t mismatches = 0;
  const BackwardOutcome outcome = check_backward16<T>(p, outs, &mismatches);
  INFO(ftest::type_name<T>() << ", " << p.describe());
  INFO(outcome.report);
  if (!pair_products<T>(p)) CHECK(mismatches == 0);
  // Within the bound; not within kBackwardMargin of it: out's rounding, a real error
  // of up to u16 |O| (observed up to 0.73 of the bound with bf16), dominates the D_i term.
  // The margin holds for the same code on fp32 data (the tests above).
  CHECK(outcome.ok);
}

// Key lengths that cut every shape short, small ones included: M - 1 for batch 0, M / 2
// for batch 1.
void short_keys(Problem& p) {
  std::vector<std::int32_t> l;
  for (std::int64_t b = 0; b < p.d.B; ++b) l.push_back(std::int32_t(b == 0 ? std::max<std::int64_t>(p.d.M - 1, 0) : p.d.M / 2));
  p.key_lengths(std::move(l));
}

// Every option at once, on any shape (attention_oracle.hpp's everything() needs M > 37).
void every_option(Problem& p) {
  p.causal();
  p.full_mask(0.05);
  p.full_bool(0.2);
  short_keys(p);
  p.window(p.d.M / 2 + 3, 2);
  p.scale(0.4f);
  p.softcap(3.0f);
  p.alibi();
}

// The option sets of the tests below.
struct Set {
  const char* name;
  void (*apply)(Problem&);
};
const Set kSets[] = {
    {"none", [](Problem&) {}},
    {"causal", [](Problem& p) { p.causal(); }},
    {"gaussian", [](Problem& p) { p.gaussian(); }},
    {"softcap 2", [](Problem& p) { p.softcap(2.0f), p.scale(1.5f); }},
    {"alibi + causal", [](Problem& p) { p.alibi(), p.causal(); }},
    {"mask with -inf", [](Problem& p) { p.full_mask(0.2); }},
    {"bool mask", [](Problem& p) { p.full_bool(0.3); }},
    {"key lengths", [](Problem& p) { short_keys(p); }},
    {"window", [](Problem& p) { p.window(5, 3); }},
    {"sinks", [](Problem& p) { p.sinks(-1.0f, 1.0f, true); }},
    {"everything", [](Problem& p) { every_option(p); }},
    {"gaussian + everything", [](Problem& p) { every_option(p), p.gaussian(), p.sinks(-1.0f, 1.0f); }},
};

// L = sum(dout * reference::attention(q, k, v)), in double over the float outputs.
double loss(Problem& p, const Tensor& dout) {
  flashcpu::reference::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.opt);
  const Shape sh = p.out.shape();
  double l = 0;
  for (std::int64_t b = 0; b < sh[0]; ++b)
    for (std::int64_t h = 0; h < sh[1]; ++h)
      for (std::int64_t i = 0; i < sh[2]; ++i)
        for (std::int64_t c = 0; c < sh[3]; ++c) l += double(dout.at(b, h, i, c)) * double(p.out.at(b, h, i, c));
  return l;
}

}  // namespace

TEST_CASE("the backward oracle matches central finite differences of reference::attention", "[backward][reference]") {
  // Step 1e-2 on inputs in [-1, 1]: the truncation error h^2/6 |L'''| and the rounding of
  // the float outputs (L ~ 1 to 2^-24 each, over 2h) both stay below 1e-4; the bound
  // 2e-3 + 1e-2 |g| leaves room and still fails a wrong sign, factor or missing term,
  // whose errors are of the size of the gradient itself (checked: the gradients below
  // reach 0.1 and more).
  const double h = 1e-2;
  std::uint32_t seed = 7000;
  for (const Set& set : kSets) {
    for (const Dims& d : {Dims{1, 2, 1, 5, 7, 3, 4}, Dims{1, 2, 2, 6, 3, 2, 3}}) {
      Problem p(d, ++seed, Layout::padded, Layout::bhsd);
      set.apply(p);
      Grads g(p, Layout::bhsd);
      forward(p, g);
      const Exact e = run_oracle(p, g);
      double largest = 0;
      auto check = [&](Tensor& t, const std::vector<float>& grad, const char* name) {
        const Shape sh = t.shape();
        for (std::int64_t b = 0; b < sh[0]; ++b)
          for (std::int64_t hh = 0; hh < sh[1]; ++hh)
            for (std::int64_t i = 0; i < sh[2]; ++i)
              for (std::int64_t c = 0; c < sh[3]; ++c) {
                float& x = t.at(b, hh, i, c);
                const float saved = x;
                x = float(saved + h);
                const double up = loss(p, g.dout);
                x = float(saved - h);
                const double down = loss(p, g.dout);
                x = saved;
                const double fd = (up - down) / (2 * h);
                const double an = grad[std::size_t(((b * sh[1] + hh) * sh[2] + i) * sh[3] + c)];
                largest = std::max(largest, std::fabs(an));
                INFO(set.name << " " << p.describe() << " " << name << "(" << b << "," << hh << "," << i << "," << c
                              << "): oracle " << an << ", finite difference " << fd);
                CHECK(std::fabs(an - fd) <= 2e-3 + 1e-2 * std::fabs(fd));
              }
      };
      check(p.q, e.dq, "dq");
      check(p.k, e.dk, "dk");
      check(p.v, e.dv, "dv");
      INFO(set.name);
      CHECK(largest > 0.05);  // the comparison had something to compare
    }
  }
}

// The option sets' shapes: prefill-like and decode-like; N > M and N < M (causal aligned
// bottom-right); sizes off every tile and vector multiple; GQA.
const Dims kOptionShapes[] = {
    {2, 4, 2, 37, 53, 19, 23}, {1, 6, 2, 90, 31, 33, 7}, {1, 2, 1, 1, 150, 17, 9},
    {1, 4, 1, 130, 200, 64, 64}, {1, 3, 3, 7, 1, 5, 3},
};

TEST_CASE("the fused backward matches the oracle for every option set and score", "[backward]") {
  std::uint32_t seed = 7100;
  for (const Set& set : kSets)
    for (const Dims& d : kOptionShapes) {
      ++seed;
      Problem p(d, seed, seed % 2 ? Layout::padded : Layout::bshd, seed % 3 ? Layout::padded : Layout::bhsd);
      set.apply(p);
      // Each option set on each forced schedule in turn, on 3 threads (more than a 2-core
      // machine has, so that key chunks in turn wait for one another). Chunks of one key
      // block, or of two, so that a head has several (and a shorter last one).
      const BackwardSchedule schedule = kSchedules[1 + seed % 3];
      const std::int64_t chunk_blocks = 1 + seed / 3 % 2;
      p.opt.num_threads = 3;
      INFO("option set: " << set.name << ", " << schedule_name(schedule) << ", chunks of " << chunk_blocks);
      CHECK_BACKWARD(p, seed % 2 ? Layout::bshd : Layout::sliced, schedule, chunk_blocks);
    }
}

// A randomized awkward shape: sizes of 1, primes and around the vector and tile widths for
// N, M, D and Dv, 1 or 2 batches, up to 3 KV heads of up to 3 query heads each, and the
// layouts of q (and out), of K and V (never contiguous BHSD), and of the gradients.
struct RandomShape {
  Dims d;
  std::uint32_t seed;
  Layout in, kv, grads;
};
RandomShape random_shape(std::mt19937& rng) {
  const std::int64_t sizes[] = {1, 2, 3, 5, 7, 13, 17, 31, 37, 61, 64, 65, 67, 131};
  auto pick = [&] { return sizes[rng() % (sizeof(sizes) / sizeof(sizes[0]))]; };
  const Layout layouts[] = {Layout::bhsd, Layout::bshd, Layout::padded, Layout::sliced};
  const std::int64_t hkv = 1 + rng() % 3, group = 1 + rng() % 3;
  RandomShape r;
  r.d = Dims{1 + std::int64_t(rng() % 2), hkv * group, hkv, pick(), pick(), pick(), pick()};
  r.seed = std::uint32_t(rng());
  r.in = layouts[rng() % 4], r.kv = layouts[rng() % 3 + 1], r.grads = layouts[rng() % 4];
  return r;
}

TEST_CASE("the fused backward on randomized awkward shapes, views and GQA", "[backward][16bit]") {
  std::mt19937 rng(7200);
  for (int t = 0; t < 30; ++t) {
    const RandomShape shape = random_shape(rng);
    const Dims& d = shape.d;
    const std::uint32_t seed = shape.seed;
    const Layout in = shape.in, kv = shape.kv, grads = shape.grads;
    auto options = [t](Problem& p) {
      if (t % 2) p.gaussian();
      if (t % 3 == 1) p.causal();
      if (t % 5 == 2) p.full_bool(0.3);
      if (t % 7 == 3) p.softcap(1.5f);
      if (t % 4 == 0) p.alibi();
      p.opt.num_threads = t % 2 ? 1 : 3;
    };
    // One thread: whole heads; three: every schedule in turn, the one pass's first on
    // chunks of 1 key block (several a head), next on the driver's.
    const BackwardSchedule schedule = t % 2 ? BackwardSchedule::automatic : kSchedules[t / 2 % 4];
    const std::int64_t chunk_blocks = t % 2 == 0 && t % 16 < 8 ? 1 : 0;
    Problem p(d, seed, in, kv);
    options(p);
    INFO(schedule_name(schedule) << (chunk_blocks ? ", chunks of 1 key block" : ""));
    CHECK_BACKWARD(p, grads, schedule, chunk_blocks);
    if (t % 3 != 0) continue;
    // Every third shape also through the 16-bit backward, bf16 and fp16 in turn on each
    // score (t = 0, 3 bf16; 6, 9 fp16; ...).
    Problem p16(d, seed, in, kv);
    options(p16);
    if (t / 6 % 2 == 0)
      check_backward16_case<flashcpu::bf16>(p16, grads);
    else
      check_backward16_case<flashcpu::fp16>(p16, grads);
  }
}

TEST_CASE("the Gaussian backward stays accurate with a narrow kernel over spread-out points", "[backward]") {
  // Kernel regression with a learned width w (examples/kernel_regression_train.cpp):
  // keys = queries = w x for 1-D points x in [0, 5], leave-one-out (diagonal excluded),
  // scale 1/2, so at w = 64 each row weighs its nearest neighbours only. Then dq and dk
  // are small sums of dS_ij (q_i - k_j) next to the points' own size, and the chain rule
  // dL/dw = (sum_i dq_i q_i + sum_j dk_j k_j) / w cancels further. Checked: each element
  // under the derived bound, and the contraction within 5e-8 of sum |terms|. Observed,
  // summed term by term as the kernels do: at most 1.8e-8 (AVX2, SSE2; w = 4, 16, 64).
  // Formed as differences of products (sum dS k - q sum dS, shifted by key 0), as an
  // earlier version did: 6.5e-8 to 9.8e-8 at w = 16 and 64, which this check fails.
  for (const double w : {4.0, 16.0, 64.0}) {
    const Dims d{1, 1, 1, 50, 50, 1, 1};
    Problem p(d, 7700, Layout::bhsd, Layout::bhsd);
    std::uniform_real_distribution<double> x01(0.0, 5.0);
    for (std::int64_t i = 0; i < d.N; ++i) {
      const double x = x01(p.rng);
      p.q.at(0, 0, i, 0) = p.k.at(0, 0, i, 0) = float(w * x);
      p.v.at(0, 0, i, 0) = float(std::sin(2 * x) + 0.3 * x);
    }
    p.gaussian();
    const Shape shape{d.B, d.Hq, d.N, d.M};
    p.opt.bool_mask = make_view<std::uint8_t>(p.bool_buf, shape, contiguous(shape), 0, 0,
                                              [](auto, auto, auto i, auto j) { return std::uint8_t(i != j); });
    p.note("keys = queries = w x, x in [0, 5], w = " + std::to_string(w) + ", diagonal excluded");
    CHECK_BACKWARD(p);

    Grads g(p, Layout::bhsd);
    forward(p, g);
    run_fused(p, g);
    const Exact e = run_oracle(p, g);
    double fused = 0, exact = 0, terms = 0;
    for (std::int64_t i = 0; i < d.N; ++i) {
      const double qi = p.q.at(0, 0, i, 0);
      fused += double(g.dq.at(0, 0, i, 0)) * qi + double(g.dk.at(0, 0, i, 0)) * qi;
      exact += double(e.dq[std::size_t(i)]) * qi + double(e.dk[std::size_t(i)]) * qi;
      terms += std::fabs(double(e.dq[std::size_t(i)]) * qi) + std::fabs(double(e.dk[std::size_t(i)]) * qi);
    }
    INFO(p.describe() << ": sum dq q + dk k: fused " << fused << ", oracle " << exact << ", sum |terms| " << terms
                      << ", |difference| / sum |terms| " << std::fabs(fused - exact) / terms);
    CHECK(std::fabs(fused - exact) <= 5e-8 * terms);
  }
}

// Stale KV-cache slots: keys past key_lengths ({60, 23}) hold NaN and inf in K and V, and
// row 3 of every head sees nothing (a bool mask zero across it).
void stale_slots(Problem& p) {
  const Dims& d = p.d;
  p.key_lengths({60, 23});
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t j = p.lengths[std::size_t(b)]; j < d.M; ++j) {
        for (std::int64_t x = 0; x < d.D; ++x) p.k.at(b, h, j, x) = j % 2 ? kNaN : kInf;
        for (std::int64_t x = 0; x < d.Dv; ++x) p.v.at(b, h, j, x) = j % 2 ? -kInf : kNaN;
      }
  const Shape shape{d.B, d.Hq, d.N, d.M};
  p.opt.bool_mask = make_view<std::uint8_t>(p.bool_buf, shape, contiguous(shape), 0, 0,
                                            [](auto, auto, auto i, auto) { return std::uint8_t(i == 3 ? 0 : 1); });
  p.note("bool mask: row 3 empty");
}
// dk and dv of the stale keys, and dq of row 3, exactly 0.
void check_stale_slots_zero(const Problem& p, const Grads& g) {
  const Dims& d = p.d;
  for (std::int64_t b = 0; b < d.B; ++b) {
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t j = p.lengths[std::size_t(b)]; j < d.M; ++j) {
        for (std::int64_t x = 0; x < d.D; ++x) CHECK(g.dk.at(b, h, j, x) == 0.0f);
        for (std::int64_t x = 0; x < d.Dv; ++x) CHECK(g.dv.at(b, h, j, x) == 0.0f);
      }
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t x = 0; x < d.D; ++x) CHECK(g.dq.at(b, h, 3, x) == 0.0f);
  }
}

TEST_CASE("the fused backward keeps garbage in excluded K and V slots out", "[backward]") {
  // Keys past key_lengths and keys behind a -inf mask column hold NaN and inf (stale
  // KV-cache slots); rows masked entirely see nothing. dk and dv of those keys must be
  // exactly 0, and nothing else may turn NaN.
  for (bool gauss : {false, true}) {
    Problem p(Dims{2, 4, 2, 40, 75, 16, 8}, gauss ? 7301 : 7300);
    if (gauss) p.gaussian();
    stale_slots(p);
    CHECK_BACKWARD(p);
    Grads g(p, Layout::padded);
    forward(p, g);
    run_fused(p, g);
    check_stale_slots_zero(p, g);
  }
}

TEST_CASE("the backward of rows masked entirely by -1e9 or -FLT_MAX weighs their keys evenly", "[backward]") {
  // Such a row's lse is about -1e9 (or -FLT_MAX ln 2), whose fp32 ulp (64 and more) is
  // far coarser than the row's softmax: P recomputed as exp(s - lse) would be 0 or 1.
  // The backward recomputes these rows' max and sum instead (backward_row_stats). With q
  // = 0 on those rows every score is the mask value exactly, in fp32 as in double, so the
  // oracle weighs the keys evenly too, and the fused gradients must match it to fp32
  // accuracy: on both schedules, and with sinks of -1e9 (exact in fp32), which then
  // count as one more key of those rows.
  for (int threads : {1, 2})
    for (bool sinks : {false, true}) {
      const Dims d{1, 2, 1, 9, 20, 8, 8};
      Problem p(d, 7800, Layout::bhsd, Layout::bhsd);
      for (std::int64_t h = 0; h < d.Hq; ++h)
        for (std::int64_t x = 0; x < d.D; ++x) p.q.at(0, h, 2, x) = p.q.at(0, h, 3, x) = 0.0f;
      const Shape shape{1, 1, d.N, d.M};
      p.opt.mask = make_view<float>(p.mask_buf, shape, contiguous(shape), 0, kNaN, [](auto, auto, auto i, auto) {
        return i == 2 ? -1e9f : i == 3 ? -std::numeric_limits<float>::max() : 0.0f;
      });
      p.opt.num_threads = threads;
      if (sinks) {
        p.sink_values.assign(std::size_t(d.Hq), -1e9f);
        p.opt.sinks = p.sink_values.data();
      }
      Grads g(p, Layout::bhsd);
      forward(p, g);
      run_fused(p, g);
      const Exact e = run_oracle(p, g);
      INFO("threads " << threads << (sinks ? ", sinks -1e9" : ""));
      for (auto [got, want] : {std::pair{&g.dq, &e.dq}, {&g.dk, &e.dk}, {&g.dv, &e.dv}}) {
        const std::vector<float> x = got->values();
        double worst = 0;
        for (std::size_t t = 0; t < x.size(); ++t)
          worst = std::max(worst, std::fabs(double(x[t]) - double((*want)[t])) / (1 + std::fabs(double((*want)[t]))));
        CHECK(worst <= 1e-5);
      }
    }
}

// Non-finite values where a row cannot see them, or where it can, for the poison tests:
// the oracle's rule is the forward's, a key or row with zero weight adds nothing whatever
// it holds and a NaN in a visible pair makes what it touches NaN.
struct Poison {
  const char* what;
  Dims dims;
  void (*apply)(Problem&);
  bool dout_inf_row0;  // dout row 0 of head 0 set to inf after the forward
};
const Poison kPoisons[] = {
    {"q NaN on a row the bool mask hides entirely", Dims{1, 2, 1, 8, 8, 8, 8},
     [](Problem& p) {
       const Shape shape{p.d.B, p.d.Hq, p.d.N, p.d.M};
       p.opt.bool_mask = make_view<std::uint8_t>(p.bool_buf, shape, contiguous(shape), 0, 0,
                                                 [](auto, auto, auto i, auto) { return std::uint8_t(i != 3); });
       for (std::int64_t x = 0; x < p.d.D; ++x) p.q.at(0, 0, 3, x) = kNaN;
     },
     false},
    {"q inf on causal rows that see no key (N > M)", Dims{1, 2, 1, 12, 6, 8, 8},
     [](Problem& p) {
       p.causal();
       for (std::int64_t x = 0; x < p.d.D; ++x) p.q.at(0, 1, 0, x) = kInf;
     },
     false},
    {"causal, dout inf on row 0 (it sees key 0 only)", Dims{1, 2, 1, 8, 8, 8, 8}, [](Problem& p) { p.causal(); },
     true},
    // dK of the keys row 0 cannot see must keep its q out (the pair products' fp32 tiles).
    {"causal, q inf on row 0 (it sees key 0 only)", Dims{1, 2, 1, 8, 8, 8, 8},
     [](Problem& p) {
       p.causal();
       for (std::int64_t x = 0; x < p.d.D; ++x) p.q.at(0, 0, 0, x) = kInf;
     },
     false},
    // dV and dK take tiles of 6 keys across the vectors of keys that pick the safe
    // tile (AVX-512): keys 12-17 must take it for key 16 alone, the only zero weight
    // of keys 16-31. N = 12 leaves no padding row in the 6-row tiles, and M = 32 no
    // padding key (a padding row's or key's zeros would make the vector safe anyway).
    {"dout inf on row 0, which a bool mask hides key 16 from (N = 12, M = 32)", Dims{1, 2, 1, 12, 32, 8, 8},
     [](Problem& p) {
       const Shape shape{p.d.B, p.d.Hq, p.d.N, p.d.M};
       p.opt.bool_mask = make_view<std::uint8_t>(p.bool_buf, shape, contiguous(shape), 0, 0,
                                                 [](auto, auto, auto i, auto j) { return std::uint8_t(i != 0 || j != 16); });
     },
     true},
    {"causal, NaN in key 2: rows before it stay finite", Dims{1, 2, 1, 8, 8, 8, 8},
     [](Problem& p) {
       p.causal();
       p.k.at(0, 0, 2, 1) = kNaN;
     },
     false}};

// The gradients in g against the oracle's e on a poisoned problem: the same NaN and inf
// elements, the finite ones within `relative` (1 + |oracle|), and some finite.
void check_poisoned(Grads& g, const Exact& e, double relative) {
  std::size_t finite = 0;
  for (auto [got, want] : {std::pair{&g.dq, &e.dq}, {&g.dk, &e.dk}, {&g.dv, &e.dv}}) {
    const std::vector<float> x = got->values();
    for (std::size_t t = 0; t < x.size(); ++t) {
      const float w = (*want)[t];
      INFO((got == &g.dq ? "dq" : got == &g.dk ? "dk" : "dv") << " element " << t << ": fused " << x[t] << ", oracle " << w);
      CHECK(std::isnan(x[t]) == std::isnan(w));
      CHECK(std::isinf(x[t]) == std::isinf(w));
      if (std::isfinite(w)) {
        ++finite;
        CHECK(std::fabs(double(x[t]) - double(w)) <= relative * (1 + std::fabs(double(w))));
      }
    }
  }
  CHECK(finite > 0);  // the poison did not simply spread everywhere
}

TEST_CASE("non-finite q, dout or keys: what a row cannot see stays out, a visible NaN propagates", "[backward]") {
  for (bool gauss : {false, true})
    for (const Poison& poison : kPoisons) {
      Problem p(poison.dims, 7900, Layout::bhsd, Layout::bhsd);
      if (gauss) p.gaussian();
      poison.apply(p);
      p.note(poison.what);
      Grads g(p, Layout::bhsd);
      forward(p, g);
      if (poison.dout_inf_row0)
        for (std::int64_t x = 0; x < p.d.Dv; ++x) g.dout.at(0, 0, 0, x) = kInf;
      run_fused(p, g);
      const Exact e = run_oracle(p, g);
      INFO(p.describe());
      check_poisoned(g, e, 1e-4);
    }
}

TEST_CASE("the fused backward is bitwise identical for 1, 2, 3 and 5 threads and every schedule",
          "[backward][threads]") {
  // The automatic choice (src/backward.cpp) takes whole heads with 1 thread and with 2 on
  // 4 heads, key chunks in turn with 2, 3 and 5 threads on 1 head and with 3 and 5 on 4;
  // each schedule is also forced on each thread count, and the one pass's on chunks of
  // 1 and 2 key blocks (M = 170: 3 blocks, so 3 and 2 chunks a head, the last shorter)
  // besides the driver's (one chunk here). All must agree bitwise with one thread.
  // The last shape: N > M, causal under a narrow window, and key lengths that leave
  // batch 1's last key block (and so a chunk of 1 block) empty. Then the same with the
  // dot product on bf16 data through the kernels with pair products.
  std::vector<const flashcpu::detail::KernelTable*> modes{nullptr};  // null: fp32
  for (const flashcpu::detail::KernelTable* pairs : pair_backward_kernels()) modes.push_back(pairs);
  for (const flashcpu::detail::KernelTable* mode : modes)
  for (int t = 0; t < 8; ++t) {
    const bool gauss = t % 2 == 1;
    if (mode && gauss) continue;
    const Dims d = t < 2   ? Dims{2, 6, 2, 150, 170, 24, 20}
                   : t < 6 ? Dims{1, 3, 1, 150, 170, 24, 20}
                           : Dims{2, 3, 1, 170, 150, 24, 20};
    std::vector<float> first_dq, first_dk, first_dv;
    for (int threads : {1, 2, 3, 5})
      for (int run = 0; run < 8; ++run) {
        // The four schedules, then the one pass's two on chunks of 1 and 2 key blocks.
        const BackwardSchedule schedule = run < 4 ? kSchedules[run] : kSchedules[1 + run % 2];
        const std::int64_t chunk_blocks = run < 4 ? 0 : run < 6 ? 1 : 2;
        Problem p(d, 7400);
        if (t < 4) {
          p.causal();
          p.full_mask(0.05);
        } else if (t >= 6) {
          p.causal();
          p.window(9, 4);
          short_keys(p);
        } else {  // every option, sinks, and a row masked by -1e9 (its statistics recomputed)
          every_option(p);
          p.sinks(-1.0f, 1.0f);
          for (std::int64_t h = 0; h < d.Hq; ++h)
            for (std::int64_t j = 0; j < d.M; ++j) p.mask_buf[std::size_t((h * d.N + 7) * d.M + j)] = -1e9f;
        }
        if (gauss) p.gaussian();
        p.opt.num_threads = threads;
        Grads g(p, Layout::padded);
        if (mode) {
          round_to_bf16(p, g);
          run_fused_bf16(p, g, schedule, chunk_blocks, mode);
        } else {
          forward(p, g);
          run_fused(p, g, schedule, chunk_blocks);
        }
        if (first_dq.empty()) {
          first_dq = g.dq.values(), first_dk = g.dk.values(), first_dv = g.dv.values();
          continue;
        }
        INFO((mode ? mode->backward_name : "fp32") << ", threads " << threads << ", " << schedule_name(schedule)
                                                   << ", chunks of " << chunk_blocks << (gauss ? ", gaussian" : ", dot")
                                                   << ", heads " << d.B * d.Hkv);
        CHECK(std::memcmp(first_dq.data(), g.dq.values().data(), first_dq.size() * sizeof(float)) == 0);
        CHECK(std::memcmp(first_dk.data(), g.dk.values().data(), first_dk.size() * sizeof(float)) == 0);
        CHECK(std::memcmp(first_dv.data(), g.dv.values().data(), first_dv.size() * sizeof(float)) == 0);
      }
  }
}

TEST_CASE("the 16-bit backward is the fp32 backward on the widened inputs, rounded once (or, with pair products, within its bound)",
          "[backward][16bit]") {
  // Every option set on a prefill-like and a decode-like shape with GQA, strided and padded
  // views; both element types; one thread (one pass) and three (two passes on few heads).
  const Dims shapes[] = {{2, 4, 2, 37, 53, 19, 23}, {1, 6, 2, 5, 131, 32, 17}};
  std::uint32_t seed = 7800;
  for (const Set& set : kSets)
    for (const Dims& d : shapes)
      for (const int threads : {1, 3}) {
        ++seed;
        INFO("option set: " << set.name << ", threads " << threads);
        const Layout in = seed % 2 ? Layout::padded : Layout::bshd, out = seed % 3 ? Layout::sliced : Layout::bhsd;
        Problem pb(d, seed, in, Layout::padded);
        set.apply(pb);
        pb.opt.num_threads = threads;
        check_backward16_case<flashcpu::bf16>(pb, out);
        Problem ph(d, seed + 5000, in, Layout::padded);
        set.apply(ph);
        ph.opt.num_threads = threads;
        check_backward16_case<flashcpu::fp16>(ph, out);
      }
}

// run_fused_bf16 on a problem rounded to bf16 (round_to_bf16 done), against the oracle
// under compare_with_oracle16's bounds.
BackwardOutcome check_pairs(Problem& p, Grads& g, const flashcpu::detail::KernelTable& kernels,
                            BackwardSchedule schedule = BackwardSchedule::automatic, std::int64_t chunk_blocks = 0) {
  const double u16 = ftest::unit_roundoff<flashcpu::bf16>();
  Expected fwd = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
  for (std::size_t x = 0; x < fwd.out_tol.size(); ++x)
    fwd.out_tol[x] += u16 * (std::fabs(double(fwd.out[x])) + fwd.out_tol[x]);
  run_fused_bf16(p, g, schedule, chunk_blocks, &kernels);
  BackwardOutcome o;
  compare_with_oracle16(p, g, fwd, u16, o, "");
  return o;
}

// check(p, gradient layout, schedule, chunk blocks) -> BackwardOutcome for each option
// set of the dot product on each shape, on 3 threads: p's layouts, the gradients', the
// forced schedule (each of the three in turn) and chunks of 1 or 2 key blocks from the
// case's seed (seed0 + its index).
template <class Check>
void each_dot_set(const std::vector<Dims>& shapes, std::uint32_t seed0, Check check) {
  std::uint32_t seed = seed0;
  for (const Set& set : kSets)
    for (const Dims& d : shapes) {
      ++seed;
      Problem p(d, seed, seed % 2 ? Layout::padded : Layout::bshd, seed % 3 ? Layout::padded : Layout::bhsd);
      set.apply(p);
      if (p.opt.score != Score::dot_product) continue;
      const BackwardSchedule schedule = kSchedules[1 + seed % 3];
      const std::int64_t chunk_blocks = 1 + seed / 3 % 2;
      p.opt.num_threads = 3;
      const BackwardOutcome o = check(p, seed % 2 ? Layout::bshd : Layout::sliced, schedule, chunk_blocks);
      INFO("option set: " << set.name << ", " << schedule_name(schedule) << ", chunks of " << chunk_blocks);
      INFO(p.describe());
      INFO(o.report);
      CHECK(o.ok);
    }
}

TEST_CASE("the bf16 backward with pair products: every option set, schedule and awkward shape against the oracle",
          "[backward][16bit][bf16products]") {
  // The option sets of the dot product (the Gaussian's backward stays fp32) on the shapes
  // of the fp32 test, and on 0 and 1 value dims and on head dims past the packers'
  // 256-column steps, each forced schedule in turn on 3 threads; then randomized shapes with tails
  // off the vectors, the 16-key panels of the emulated kernels and the 64 of AVX-512, odd
  // head and value dims (the last pair half empty), GQA, strided views.
  std::vector<Dims> shapes(std::begin(kOptionShapes), std::end(kOptionShapes));
  shapes.push_back({1, 2, 1, 9, 20, 7, 0});  // dS = 0 throughout: the packing of empty value rows
  shapes.push_back({1, 2, 1, 9, 20, 7, 1});
  shapes.push_back({1, 2, 1, 13, 70, 301, 259});
  for (const flashcpu::detail::KernelTable* kernels : pair_backward_kernels()) {
    INFO(kernels->backward_name);
    each_dot_set(shapes, 9100, [&](Problem& p, Layout grads, BackwardSchedule schedule, std::int64_t chunk_blocks) {
      Grads g(p, grads);
      round_to_bf16(p, g);
      return check_pairs(p, g, *kernels, schedule, chunk_blocks);
    });
    std::mt19937 rng(9200);
    for (int t = 0; t < 24; ++t) {
      const RandomShape shape = random_shape(rng);
      Problem p(shape.d, shape.seed, shape.in, shape.kv);
      if (t % 3 == 1) p.causal();
      if (t % 5 == 2) p.full_bool(0.3);
      if (t % 7 == 3) p.softcap(1.5f);
      if (t % 4 == 0) p.alibi();
      p.opt.num_threads = t % 2 ? 1 : 3;
      const BackwardSchedule schedule = t % 2 ? BackwardSchedule::automatic : kSchedules[t / 2 % 4];
      Grads g(p, shape.grads);
      round_to_bf16(p, g);
      const BackwardOutcome o = check_pairs(p, g, *kernels, schedule, t % 4 == 0 ? 1 : 0);
      INFO(schedule_name(schedule) << ", " << p.describe());
      INFO(o.report);
      CHECK(o.ok);
    }
  }
}

TEST_CASE("the bf16 backward with pair products keeps garbage and non-finite rows where the fp32 one does",
          "[backward][16bit][bf16products]") {
  for (const flashcpu::detail::KernelTable* kernels : pair_backward_kernels()) {
    INFO(kernels->backward_name);
    {  // NaN and inf in K and V past the key lengths (stale cache slots), a row that sees nothing
      Problem p(Dims{2, 4, 2, 40, 75, 16, 9}, 9300);
      stale_slots(p);
      p.opt.num_threads = 2;
      Grads g(p, Layout::padded);
      round_to_bf16(p, g);
      const BackwardOutcome o = check_pairs(p, g, *kernels);
      INFO(o.report);
      CHECK(o.ok);
      check_stale_slots_zero(p, g);
    }
    // The fp32 test's poisons, and a row masked entirely by -1e9 (its statistics
    // recomputed from the pair scores): the oracle's NaN and inf pattern, and its finite
    // values to bf16 accuracy (out, dout and the gradients rounded: 2^-6 relative, with
    // room).
    for (const Poison& poison : kPoisons) {
      Problem p(poison.dims, 9400, Layout::bhsd, Layout::bhsd);
      poison.apply(p);
      p.note(poison.what);
      Grads g(p, Layout::bhsd);
      round_to_bf16(p, g);
      if (poison.dout_inf_row0)
        for (std::int64_t x = 0; x < p.d.Dv; ++x) g.dout.at(0, 0, 0, x) = kInf;
      run_fused_bf16(p, g, BackwardSchedule::automatic, 0, kernels);
      const Exact e = run_oracle(p, g);
      INFO(p.describe());
      check_poisoned(g, e, 0x1p-6);
    }
    {
      const Dims d{1, 2, 1, 9, 20, 9, 7};
      Problem p(d, 9410, Layout::bhsd, Layout::bhsd);
      for (std::int64_t h = 0; h < d.Hq; ++h)
        for (std::int64_t x = 0; x < d.D; ++x) p.q.at(0, h, 2, x) = 0.0f;
      const Shape mask_shape{1, 1, d.N, d.M};
      p.opt.mask = make_view<float>(p.mask_buf, mask_shape, contiguous(mask_shape), 0, kNaN,
                                    [](auto, auto, auto i, auto) { return i == 2 ? -1e9f : 0.0f; });
      p.note("row 2 masked by -1e9");
      Grads g(p, Layout::bhsd);
      round_to_bf16(p, g);
      run_fused_bf16(p, g, BackwardSchedule::automatic, 0, kernels);
      const Exact e = run_oracle(p, g);
      INFO(p.describe());
      check_poisoned(g, e, 0x1p-6);
    }
  }
}

// ---- fp32 and fp16 data under allow_bf16_compute: the kernels with pair products round
// q, k, v and dout to bf16 as they pack them, so a call computes what the bf16 call on
// the rounded inputs computes (with an fp32 out, which the tests below round to bf16
// first so that both calls read the same out).

// run_fused_as under allow_bf16_compute.
template <class T>
void run_fused_allowed(Problem& p, const Tensor& dout, Grads& grads, const flashcpu::detail::KernelTable& kernels,
                       BackwardSchedule schedule = BackwardSchedule::automatic, std::int64_t chunk_blocks = 0) {
  flashcpu::AttentionOptions allowed = p.opt;
  allowed.allow_bf16_compute = true;
  run_fused_as<T>(p, dout, grads, kernels, allowed, schedule, chunk_blocks);
}

// Elements of the fp32 gradients `wide` that, rounded to T, differ from `want` (T values
// widened); a NaN matches any NaN. Reported into o.
template <class T>
void check_rounded_bits(const char* name, const Tensor& wide, const Tensor& want, BackwardOutcome& o) {
  const std::int64_t bad = rounded_mismatches(ftest::Copy<T>(wide), want, true);
  if (bad > 0) {
    o.ok = false;
    o.report += std::string(name) + ": " + std::to_string(bad) + " elements differ\n";
  }
}

// fp32 data under allow_bf16_compute on `kernels`, p unrounded. out and lse come from the
// forward on the inputs rounded to bf16 (as a forward under the option makes them; the
// oracle's bound assumes them), out rounded to bf16 so that the bf16 call reads the same
// out; after_forward (may be null) then changes dout. The call on the unrounded inputs
// must be bitwise, in fp32, the call on the inputs rounded beforehand (the rounding is
// all the unrounded values reach), and its gradients rounded to bf16 bitwise the bf16
// call's; with `oracle`, they must be within compare_with_oracle16's bounds of the oracle
// on the rounded inputs, with no final rounding. On return p holds the rounded values.
BackwardOutcome check_allowed(Problem& p, Layout grads, const flashcpu::detail::KernelTable& kernels,
                              BackwardSchedule schedule, std::int64_t chunk_blocks, bool oracle,
                              void (*after_forward)(Problem&, Tensor& dout) = nullptr) {
  using flashcpu::bf16;
  Grads g(p, grads), g32(p, grads), g_rounded(p, grads);
  const Tensor q = p.q, k = p.k, v = p.v;
  for (Tensor* t : {&p.q, &p.k, &p.v}) ftest::round_view<bf16>(*t);
  forward(p, g);
  if (after_forward) after_forward(p, g.dout);
  ftest::round_view<bf16>(p.out);
  const Tensor dout = g.dout;
  ftest::round_view<bf16>(g.dout);
  run_fused_allowed<float>(p, g.dout, g_rounded, kernels, schedule, chunk_blocks);
  const Tensor q16 = p.q, k16 = p.k, v16 = p.v;
  p.q = q, p.k = k, p.v = v;
  run_fused_allowed<float>(p, dout, g32, kernels, schedule, chunk_blocks);
  p.q = q16, p.k = k16, p.v = v16;
  run_fused_bf16(p, g, schedule, chunk_blocks, &kernels);
  BackwardOutcome o;
  for (auto [got, want, name] : {std::tuple{&g32.dq, &g_rounded.dq, "dq"}, {&g32.dk, &g_rounded.dk, "dk"},
                                 {&g32.dv, &g_rounded.dv, "dv"}}) {
    const std::vector<float> x = got->values(), y = want->values();
    if (std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) != 0) {
      o.ok = false;
      o.report += std::string(name) + ": not bitwise the call on the inputs rounded beforehand\n";
    }
  }
  check_rounded_bits<bf16>("dq", g32.dq, g.dq, o);
  check_rounded_bits<bf16>("dk", g32.dk, g.dk, o);
  check_rounded_bits<bf16>("dv", g32.dv, g.dv, o);
  if (oracle) {
    const double u16 = ftest::unit_roundoff<bf16>();
    Expected fwd = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
    for (std::size_t x = 0; x < fwd.out_tol.size(); ++x)
      fwd.out_tol[x] += u16 * (std::fabs(double(fwd.out[x])) + fwd.out_tol[x]);
    g32.dout = g.dout;  // the rounded dout, the oracle's
    compare_with_oracle16(p, g32, fwd, 0.0, o, " (fp32, allow_bf16_compute)");
  }
  return o;
}

TEST_CASE("fp32 data under allow_bf16_compute: the bf16 backward on the rounded inputs, against it and the oracle",
          "[backward][bf16products]") {
  // The dot-product option sets on the option shapes and 12 randomized awkward ones,
  // each on a forced schedule, then the poisons and two finite fp32 values beyond bf16's
  // range (rounded to inf: the flags must see them), bitwise against the bf16 call.
  for (const flashcpu::detail::KernelTable* kernels : pair_backward_kernels()) {
    INFO(kernels->backward_name);
    each_dot_set(std::vector<Dims>(std::begin(kOptionShapes), std::end(kOptionShapes)), 9500,
                 [&](Problem& p, Layout grads, BackwardSchedule schedule, std::int64_t chunk_blocks) {
                   return check_allowed(p, grads, *kernels, schedule, chunk_blocks, true);
                 });
    std::mt19937 rng(9600);
    for (int t = 0; t < 12; ++t) {
      const RandomShape shape = random_shape(rng);
      Problem p(shape.d, shape.seed, shape.in, shape.kv);
      if (t % 3 == 1) p.causal();
      if (t % 5 == 2) p.full_bool(0.3);
      if (t % 4 == 0) p.alibi();
      p.opt.num_threads = t % 2 ? 1 : 3;
      const BackwardOutcome o = check_allowed(p, shape.grads, *kernels, kSchedules[t % 4], 0, true);
      INFO(p.describe());
      INFO(o.report);
      CHECK(o.ok);
    }
    for (const Poison& poison : kPoisons) {
      Problem p(poison.dims, 9700, Layout::bhsd, Layout::bhsd);
      poison.apply(p);
      const auto inf_row0 = [](Problem& q, Tensor& dout) {
        for (std::int64_t x = 0; x < q.d.Dv; ++x) dout.at(0, 0, 0, x) = kInf;
      };
      const BackwardOutcome o = check_allowed(p, Layout::bhsd, *kernels, BackwardSchedule::automatic, 0, false,
                                              poison.dout_inf_row0 ? +inf_row0 : nullptr);
      INFO(poison.what);
      INFO(o.report);
      CHECK(o.ok);
    }
    // 3.4e38: finite in fp32, beyond bf16's largest finite (3.39e38), so inf once rounded.
    const char* where[] = {"q", "k", "v", "dout"};
    for (int c = 0; c < 4; ++c) {
      Problem p(Dims{1, 2, 1, 8, 20, 8, 8}, 9710, Layout::bhsd, Layout::bhsd);
      p.causal();
      if (c < 3) (c == 0 ? p.q.at(0, 1, 4, 2) : c == 1 ? p.k.at(0, 0, 3, 2) : p.v.at(0, 0, 5, 1)) = 3.4e38f;
      const auto big_dout = [](Problem&, Tensor& dout) { dout.at(0, 1, 6, 3) = 3.4e38f; };
      const BackwardOutcome o = check_allowed(p, Layout::bhsd, *kernels, BackwardSchedule::automatic, 0, false,
                                              c == 3 ? +big_dout : nullptr);
      INFO(where[c] << " 3.4e38");
      INFO(o.report);
      CHECK(o.ok);
    }
  }
}

TEST_CASE("fp32 data under allow_bf16_compute is bitwise identical for 1, 2, 3 and 5 threads and every schedule",
          "[backward][threads][bf16products]") {
  // The pair kernels on unrounded fp32 data, every option (a row masked by -1e9 among
  // them) on one KV head of three query heads, and causal under a narrow window with key
  // lengths on two (the shapes of the fp32 test above): each schedule on each thread
  // count, and the one pass's on chunks of 1 key block, all against one thread.
  for (const flashcpu::detail::KernelTable* kernels : pair_backward_kernels())
    for (int shape = 0; shape < 2; ++shape) {
      const Dims d = shape == 0 ? Dims{1, 3, 1, 150, 170, 24, 20} : Dims{2, 3, 1, 170, 150, 24, 20};
      std::vector<float> first[3];
      for (int threads : {1, 2, 3, 5})
        for (int run = 0; run < 6; ++run) {
          const BackwardSchedule schedule = run < 4 ? kSchedules[run] : kSchedules[1 + run % 2];
          const std::int64_t chunk_blocks = run < 4 ? 0 : 1;
          Problem p(d, 9750, Layout::padded, Layout::padded);
          if (shape == 0) {
            every_option(p);
            p.sinks(-1.0f, 1.0f);
            for (std::int64_t h = 0; h < d.Hq; ++h)
              for (std::int64_t j = 0; j < d.M; ++j) p.mask_buf[std::size_t((h * d.N + 7) * d.M + j)] = -1e9f;
          } else {
            p.causal();
            p.window(9, 4);
            short_keys(p);
          }
          p.opt.num_threads = threads;
          Grads g(p, Layout::padded);
          forward(p, g);
          run_fused_allowed<float>(p, g.dout, g, *kernels, schedule, chunk_blocks);
          const std::vector<float> got[3] = {g.dq.values(), g.dk.values(), g.dv.values()};
          if (first[0].empty()) {
            for (int x = 0; x < 3; ++x) first[x] = got[x];
            continue;
          }
          INFO(kernels->backward_name << ", threads " << threads << ", " << schedule_name(schedule) << ", chunks of "
                                      << chunk_blocks << ", shape " << shape);
          for (int x = 0; x < 3; ++x)
            CHECK(std::memcmp(first[x].data(), got[x].data(), first[x].size() * sizeof(float)) == 0);
        }
    }
}

TEST_CASE("the pair kernels' dV and dK carry the rounding of P and dS: their fallback does not run on finite data",
          "[backward][bf16products]") {
  // A query block whose q or dout holds an inf or NaN takes the fp32 tiles for dK or dV,
  // which do not round P and dS; the bounds above would pass that too, only slower. On
  // finite inputs already in bf16, fp32 data under the option, against the exact fp32
  // backward on the same values: P and dS rounded to bf16 move most dV and dK elements by
  // far more than 2^-16 of their size (2^-9 relative per term; about 99% of them here),
  // where the fp32 tiles would differ from the exact backward only by the S and dP sums'
  // order (amplified where dS = P (dP - D_i) cancels: 0 to 40 elements past 2^-16 with
  // the flags forced on; the half is an empirical margin). One query block per head
  // (N <= 64 rows), two heads per KV head: each element shows those blocks' path.
  for (const flashcpu::detail::KernelTable* kernels : pair_backward_kernels())
    for (const bool causal : {false, true}) {
      Problem p(Dims{1, 4, 2, 48, 130, 40, 24}, causal ? 9761 : 9760, Layout::padded, Layout::padded);
      if (causal) p.causal();
      p.opt.num_threads = 2;
      for (Tensor* t : {&p.q, &p.k, &p.v}) ftest::round_view<flashcpu::bf16>(*t);
      Grads exact(p, Layout::bhsd), pairs(p, Layout::bhsd);
      forward(p, exact);
      ftest::round_view<flashcpu::bf16>(exact.dout);
      run_fused(p, exact);
      run_fused_allowed<float>(p, exact.dout, pairs, *kernels);
      for (auto [got, want, name] : {std::tuple{&pairs.dv, &exact.dv, "dv"}, {&pairs.dk, &exact.dk, "dk"}}) {
        const std::vector<float> x = got->values(), y = want->values();
        std::size_t moved = 0, counted = 0;
        for (std::size_t e = 0; e < x.size(); ++e) {
          if (y[e] == 0.0f) continue;  // keys no row sees
          ++counted;
          moved += std::fabs(double(x[e]) - double(y[e])) > 0x1p-16 * std::fabs(double(y[e]));
        }
        INFO(kernels->backward_name << ", causal " << causal << ", " << name << ": " << moved << " of " << counted
                                    << " elements moved by more than 2^-16");
        CHECK(counted > 0);
        CHECK(moved * 2 > counted);
      }
    }
}

TEST_CASE("fp16 data under allow_bf16_compute: the fp32 call on the widened fp16 values, rounded to fp16",
          "[backward][16bit][bf16products]") {
  // fp16 inputs widen exactly, so the fp16 call rounds them to bf16 as the fp32 call does
  // (checked above against the oracle), and rounds its gradients to fp16 once.
  using flashcpu::fp16;
  for (const flashcpu::detail::KernelTable* kernels : pair_backward_kernels()) {
    INFO(kernels->backward_name);
    std::uint32_t seed = 9800;
    for (const Set& set : kSets) {
      ++seed;
      Problem p(Dims{2, 4, 2, 37, 53, 19, 23}, seed, Layout::padded, Layout::padded);
      set.apply(p);
      if (p.opt.score != Score::dot_product) continue;
      p.opt.num_threads = 2;
      Grads g(p, Layout::sliced), g16(p, Layout::sliced);
      for (Tensor* t : {&p.q, &p.k, &p.v}) ftest::round_view<fp16>(*t);
      forward(p, g);
      ftest::round_view<fp16>(p.out);
      ftest::round_view<fp16>(g.dout);
      run_fused_allowed<float>(p, g.dout, g, *kernels);
      run_fused_allowed<fp16>(p, g.dout, g16, *kernels);
      BackwardOutcome o;
      check_rounded_bits<fp16>("dq", g.dq, g16.dq, o);
      check_rounded_bits<fp16>("dk", g.dk, g16.dk, o);
      check_rounded_bits<fp16>("dv", g.dv, g16.dv, o);
      INFO("option set: " << set.name);
      INFO(o.report);
      CHECK(o.ok);
    }
  }
}

TEST_CASE("allow_bf16_compute: the backward kernels it chooses, through the public entry points", "[backward][bf16products]") {
  // Where the level has pair products, fp32 and fp16 data under the option take them for
  // the dot product (bitwise the forced kernels' results), and nothing else changes:
  // without the option, with the Gaussian, and on every level without them (the CTest
  // runs per level), the option leaves every bit of the fp32 call as it is.
  namespace fd = flashcpu::detail;
  const fd::KernelTable& pairs = fd::backward_kernels(fd::DType::bf16, Score::dot_product, false);
  const fd::KernelTable& fp32 = fd::backward_kernels(fd::DType::f32, Score::dot_product, false);
  CHECK(&fd::backward_kernels(fd::DType::f32, Score::dot_product, true) == &pairs);
  CHECK(&fd::backward_kernels(fd::DType::f16, Score::dot_product, true) == &pairs);
  CHECK(&fd::backward_kernels(fd::DType::f16, Score::dot_product, false) == &fp32);
  CHECK(&fd::backward_kernels(fd::DType::f32, Score::gaussian, true) == &fp32);
  CHECK(&fd::backward_kernels(fd::DType::bf16, Score::gaussian, false) == &fp32);
  CHECK_FALSE(fp32.bf16_products);
  for (const bool gauss : {false, true}) {
    Problem p(Dims{1, 4, 2, 45, 70, 24, 20}, gauss ? 9901 : 9900, Layout::padded, Layout::padded);
    p.causal();
    if (gauss) p.gaussian();
    Grads g(p, Layout::bhsd), exact(p, Layout::bhsd), forced(p, Layout::bhsd);
    forward(p, g);
    exact.dout = forced.dout = g.dout;
    flashcpu::AttentionOptions allowed = p.opt;
    allowed.allow_bf16_compute = true;
    flashcpu::attention_backward(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(), p.lse.cview(), g.dout.cview(),
                                 g.dq.view(), g.dk.view(), g.dv.view(), allowed);
    run_fused(p, exact);
    const bool takes_pairs = !gauss && pairs.bf16_products;
    if (takes_pairs)
      run_fused_allowed<float>(p, g.dout, forced, pairs);
    else
      forced = exact;
    INFO((gauss ? "gaussian" : "dot product") << ", pairs " << takes_pairs << ", level " << flashcpu::active_isa());
    for (auto [got, want] : {std::pair{&g.dq, &forced.dq}, {&g.dk, &forced.dk}, {&g.dv, &forced.dv}})
      CHECK(std::memcmp(got->values().data(), want->values().data(), got->values().size() * sizeof(float)) == 0);
    if (takes_pairs)  // the option took effect: the rounded inputs moved the gradients
      CHECK(std::memcmp(g.dq.values().data(), exact.dq.values().data(), g.dq.values().size() * sizeof(float)) != 0);
    // fp16 through its public entry under the option: the kernels chosen above.
    using flashcpu::fp16;
    const ftest::Copy<fp16> q16(p.q), k16(p.k), v16(p.v), out16(p.out), dout16(g.dout);
    ftest::Copy<fp16> dq16(g.dq), dk16(g.dk), dv16(g.dv);
    flashcpu::attention_backward(q16.cview(), k16.cview(), v16.cview(), out16.cview(), p.lse.cview(), dout16.cview(),
                                 dq16.view(), dk16.view(), dv16.view(), allowed);
    Grads g16(p, Layout::bhsd);
    run_fused_as<fp16>(p, g.dout, g16, takes_pairs ? pairs : fp32, allowed);
    for (auto [got, want] : {std::pair{&dq16, &g16.dq}, {&dk16, &g16.dk}, {&dv16, &g16.dv}}) {
      const std::int64_t bad = rounded_mismatches(*got, *want);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("the 16-bit backward checks its arguments and writes zeros when nothing is visible", "[backward][16bit][errors]") {
  using flashcpu::bf16;
  const Dims d{1, 2, 1, 6, 5, 4, 3};
  Problem p(d, 8000, Layout::bhsd, Layout::bhsd);
  Grads g(p, Layout::bhsd);
  forward(p, g);
  const ftest::Copy<bf16> q(p.q), k(p.k), v(p.v), out(p.out), dout(g.dout);
  ftest::Copy<bf16> dq(g.dq), dk(g.dk), dv(g.dv);
  const ftest::Copy<bf16> dq_before(dq), dk_before(dk), dv_before(dv);
  // The call must raise an Error naming `what` and write nothing.
  auto expect_error = [&](const std::string& what, flashcpu::TensorView<bf16> dq_view,
                          flashcpu::TensorView<bf16> dv_view) {
    std::string message = "(no error)";
    try {
      flashcpu::attention_backward(q.cview(), k.cview(), v.cview(), out.cview(), p.lse.cview(), dout.cview(), dq_view,
                                   dk.view(), dv_view, p.opt);
    } catch (const flashcpu::Error& e) {
      message = e.what();
    }
    INFO("expected an Error naming " << what << ", got: " << message);
    CHECK(message.find(what) != std::string::npos);
    CHECK(ftest::same_bits(dq_before, dq, true));
    CHECK(ftest::same_bits(dk_before, dk, true));
    CHECK(ftest::same_bits(dv_before, dv, true));
  };
  auto bad_dq = dq.view();
  bad_dq.shape[3] = 5;
  expect_error("dq.shape[3]", bad_dq, dv.view());
  // dv over dout: the same overlap checks as fp32. dv's extent (1x1x5x3) lies inside dout's
  // (1x2x6x3), so the only overlap is with dout whatever the heap puts after it (a dq-shaped
  // view there ran past dout's buffer and could meet another input first).
  expect_error("dv: expected memory disjoint from dout", dq.view(),
               {const_cast<bf16*>(dout.cview().data), dv.view().shape, dv.view().strides});
  // No queries: dk and dv get +0 (all bits clear).
  Problem none(Dims{1, 2, 1, 0, 5, 3, 4}, 8001);
  Grads gn(none, Layout::padded);
  forward(none, gn);
  const ftest::Copy<bf16> nq(none.q), nk(none.k), nv(none.v), nout(none.out), ndout(gn.dout);
  ftest::Copy<bf16> ndq(gn.dq), ndk(gn.dk), ndv(gn.dv);
  flashcpu::attention_backward(nq.cview(), nk.cview(), nv.cview(), nout.cview(), none.lse.cview(), ndout.cview(),
                               ndq.view(), ndk.view(), ndv.view(), none.opt);
  for (std::int64_t h = 0; h < 1; ++h)
    for (std::int64_t j = 0; j < 5; ++j)
      for (std::int64_t c = 0; c < 3; ++c) CHECK(ndk.at(0, h, j, c).bits == 0);
  for (std::int64_t j = 0; j < 5; ++j)
    for (std::int64_t c = 0; c < 4; ++c) CHECK(ndv.at(0, 0, j, c).bits == 0);
}

TEST_CASE("the backward with no queries, no keys or no heads writes zero gradients", "[backward]") {
  for (const Dims& d : {Dims{1, 2, 1, 0, 5, 3, 4}, Dims{1, 2, 1, 4, 0, 3, 4}, Dims{2, 0, 1, 4, 5, 3, 4}}) {
    Problem p(d, 7500);
    Grads g(p, Layout::padded);
    forward(p, g);
    run_fused(p, g);
    for (float x : g.dq.values()) CHECK(x == 0.0f);
    for (float x : g.dk.values()) CHECK(x == 0.0f);
    for (float x : g.dv.values()) CHECK(x == 0.0f);
    const Exact e = run_oracle(p, g);
    for (std::size_t x = 0; x < g.dk.values().size(); ++x) CHECK(e.dk[x] == 0.0f);
  }
}

TEST_CASE("the backward rejects bad arguments before writing", "[backward][errors]") {
  const Dims d{1, 2, 1, 6, 5, 4, 3};
  Problem p(d, 7600, Layout::bhsd, Layout::bhsd);
  Grads g(p, Layout::bhsd);
  forward(p, g);
  auto expect_error = [&](const std::string& what, auto&& call) {
    const std::vector<float> dq = g.dq.buffer(), dk = g.dk.buffer(), dv = g.dv.buffer();
    bool threw = false;
    try {
      call();
    } catch (const flashcpu::Error& e) {
      threw = true;
      INFO(e.what());
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
    INFO("expected an Error naming " << what);
    CHECK(threw);
    CHECK(std::memcmp(dq.data(), g.dq.buffer().data(), dq.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(dk.data(), g.dk.buffer().data(), dk.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(dv.data(), g.dv.buffer().data(), dv.size() * sizeof(float)) == 0);
  };
  for (int oracle_side = 0; oracle_side < 2; ++oracle_side) {
    auto call = [&](auto q, auto k, auto v, auto out, auto lse, auto dout, auto dq, auto dk, auto dv,
                    const AttentionOptions& o) {
      if (oracle_side)
        flashcpu::reference::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, o);
      else
        flashcpu::attention_backward(q, k, v, out, lse, dout, dq, dk, dv, o);
    };
    const auto q = p.q.cview(), k = p.k.cview(), v = p.v.cview(), out = p.out.cview(), lse = p.lse.cview();
    const auto dout = g.dout.cview();
    const auto dq = g.dq.view(), dk = g.dk.view(), dv = g.dv.view();
    AttentionOptions additive;
    std::vector<float> w(std::size_t(d.D), 1.0f);
    additive.score = Score::additive;
    additive.additive_weights = w.data();
    expect_error("no backward yet", [&] { call(q, k, v, out, lse, dout, dq, dk, dv, additive); });
    auto bad = dout;
    bad.shape[3] = 2;
    expect_error("dout.shape[3]", [&] { call(q, k, v, out, lse, bad, dq, dk, dv, p.opt); });
    auto bad_dq = dq;
    bad_dq.shape[2] = 5;
    expect_error("dq.shape[2]", [&] { call(q, k, v, out, lse, dout, bad_dq, dk, dv, p.opt); });
    auto bad_dk = dk;
    bad_dk.shape[3] = 3;
    expect_error("dk.shape[3]", [&] { call(q, k, v, out, lse, dout, dq, bad_dk, dv, p.opt); });
    auto bad_dv = dv;
    bad_dv.shape[1] = 2;
    expect_error("dv.shape[1]", [&] { call(q, k, v, out, lse, dout, dq, dk, bad_dv, p.opt); });
    auto bad_lse = lse;
    bad_lse.shape[2] = 7;
    expect_error("lse.shape[2]", [&] { call(q, k, v, out, bad_lse, dout, dq, dk, dv, p.opt); });
    auto self = dq;
    self.strides[2] = 1;
    expect_error("dq.strides", [&] { call(q, k, v, out, lse, dout, self, dk, dv, p.opt); });
    // A gradient over an input, and two gradients over each other.
    const flashcpu::TensorView<float> over_q{const_cast<float*>(q.data), q.shape, q.strides};
    expect_error("dq: expected memory disjoint from q", [&] { call(q, k, v, out, lse, dout, over_q, dk, dv, p.opt); });
    const flashcpu::TensorView<float> over_dout{const_cast<float*>(dout.data), dv.shape, dv.strides};
    expect_error("dv: expected memory disjoint from dout",
                 [&] { call(q, k, v, out, lse, dout, dq, dk, over_dout, p.opt); });
    const flashcpu::TensorView<float> dk_over_dq{dq.data, dk.shape, dk.strides};
    expect_error("dk: expected memory disjoint from dq", [&] { call(q, k, v, out, lse, dout, dq, dk_over_dq, dv, p.opt); });
    AttentionOptions threads;
    threads.num_threads = -1;
    expect_error("options.num_threads", [&] { call(q, k, v, out, lse, dout, dq, dk, dv, threads); });
  }
}

TEST_CASE("a gradient with no elements is not walked, however many heads it spans", "[backward]") {
  // 2^40 query heads over N = 0 rows: dq has no element, dk and dv are small and get zeros.
  const std::int64_t Hq = std::int64_t(1) << 40, Hkv = 256, M = 1, D = 4;
  std::vector<float> keys(std::size_t(Hkv * M * D), 0.5f), dk(keys.size()), dv(keys.size()), none(1);
  const flashcpu::TensorView<const float> rows{none.data(), {1, Hq, 0, D}, {0, 0, D, 1}};
  const flashcpu::TensorView<const float> lse{none.data(), {1, Hq, 0, 1}, {0, 0, 1, 1}};
  const flashcpu::TensorView<const float> k{keys.data(), {1, Hkv, M, D}, {Hkv * M * D, M * D, D, 1}};
  const flashcpu::TensorView<float> dq{none.data(), {1, Hq, 0, D}, {0, 0, D, 1}};
  for (const bool oracle : {false, true}) {
    INFO((oracle ? "reference::attention_backward" : "attention_backward"));
    std::fill(dk.begin(), dk.end(), 7.0f);
    std::fill(dv.begin(), dv.end(), 7.0f);
    const flashcpu::TensorView<float> dkv{dk.data(), k.shape, k.strides}, dvv{dv.data(), k.shape, k.strides};
    if (oracle)
      flashcpu::reference::attention_backward(rows, k, k, rows, lse, rows, dq, dkv, dvv);
    else
      flashcpu::attention_backward(rows, k, k, rows, lse, rows, dq, dkv, dvv);
    CHECK(std::all_of(dk.begin(), dk.end(), [](float x) { return x == 0.0f; }));
    CHECK(std::all_of(dv.begin(), dv.end(), [](float x) { return x == 0.0f; }));
  }
}
