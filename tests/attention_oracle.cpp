// The attention oracle shared by test_options.cpp and test_scores.cpp; see
// attention_oracle.hpp for the tolerance of the fused kernel and what each helper does.
#include "attention_oracle.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace oracle {

std::string str(const Dims& d) {
  std::ostringstream os;
  os << "B=" << d.B << " Hq=" << d.Hq << " Hkv=" << d.Hkv << " N=" << d.N << " M=" << d.M << " D=" << d.D
     << " Dv=" << d.Dv;
  return os.str();
}

float elem(const TensorView<const float>& t, std::int64_t b, std::int64_t h, std::int64_t s, std::int64_t d) {
  return t.data[b * t.strides[0] + h * t.strides[1] + s * t.strides[2] + d * t.strides[3]];
}

Shape contiguous(Shape s) { return {s[1] * s[2] * s[3], s[2] * s[3], s[3], 1}; }

void row_scores(const TensorView<const float>& q, const TensorView<const float>& k, const AttentionOptions& opt,
                const Dims& d, double scale, std::int64_t b, std::int64_t h, std::int64_t i, std::vector<double>& s,
                std::vector<double>& a_dot) {
  const std::int64_t g = h / (d.Hq / d.Hkv), diag = i + d.M - d.N;
  const float* qr = q.data + b * q.strides[0] + h * q.strides[1] + i * q.strides[2];
  const std::int64_t qs = q.strides[3];
  for (std::int64_t j = 0; j < d.M; ++j) {
    const bool excluded = (opt.bool_mask.data && mask_at(opt.bool_mask, b, h, i, j) == 0) || (opt.causal && j > diag) ||
                          (opt.window_left >= 0 && j < diag - opt.window_left) ||
                          (opt.window_right >= 0 && j > diag + opt.window_right) ||
                          (opt.key_lengths && j >= opt.key_lengths[b]);
    if (excluded) {
      s[std::size_t(j)] = -std::numeric_limits<double>::infinity();
      continue;
    }
    double x = 0, a = 0;
    const float* kr = k.data + b * k.strides[0] + g * k.strides[1] + j * k.strides[2];
    const std::int64_t ks = k.strides[3];
    switch (opt.score) {
      case Score::dot_product:
        for (std::int64_t c = 0; c < d.D; ++c) {
          const double p = double(qr[c * qs]) * double(kr[c * ks]);
          x += p, a += std::fabs(p);
        }
        break;
      case Score::gaussian:
        for (std::int64_t c = 0; c < d.D; ++c) {
          const double t = double(qr[c * qs]) - double(kr[c * ks]);
          x -= t * t;
        }
        break;
      case Score::additive:
        for (std::int64_t c = 0; c < d.D; ++c)
          x += double(opt.additive_weights[c]) * std::tanh(double(qr[c * qs]) + double(kr[c * ks]));
        break;
    }
    a_dot[std::size_t(j)] = std::fabs(scale) * a;
    x *= scale;
    if (opt.softcap > 0) x = double(opt.softcap) * std::tanh(x / double(opt.softcap));
    if (opt.alibi_slopes) x -= double(opt.alibi_slopes[h]) * double(std::llabs(diag - j));
    if (opt.mask.data) x += double(mask_at(opt.mask, b, h, i, j));
    s[std::size_t(j)] = x;
  }
}

double weight_perturbation(const std::vector<double>& lw, const std::vector<double>& delta, std::int64_t M,
                           std::vector<double>& coef) {
  const double inf = std::numeric_limits<double>::infinity();
  double delta_bar = 0, log_e = -inf;
  for (std::int64_t j = 0; j < M; ++j) {
    const double l = lw[std::size_t(j)];
    if (l == -inf) continue;
    delta_bar += std::exp(l) * delta[std::size_t(j)];
    const double t = l + delta[std::size_t(j)];
    log_e = std::max(log_e, t) + std::log1p(std::exp(-std::fabs(log_e - t)));  // log(e^log_e + e^t)
  }
  for (std::int64_t j = 0; j < M; ++j) {
    const double l = lw[std::size_t(j)];
    if (l == -inf) {
      coef[std::size_t(j)] = 0;
      continue;
    }
    const double up = delta[std::size_t(j)] + delta_bar;  // log(e^up - 1) = up + log(-expm1(-up))
    const double log_up = up > 0 ? up + std::log(-std::expm1(-up)) : -inf;
    const double down = -std::expm1(-delta[std::size_t(j)] - log_e);
    const double log_f = std::max(log_up, down > 0 ? std::log(down) : -inf);
    coef[std::size_t(j)] = std::exp(l + log_f);
  }
  return std::max(delta_bar, log_e);
}

Expected expect(TensorView<const float> q, TensorView<const float> k, TensorView<const float> v,
                const AttentionOptions& opt) {
  Expected e;
  const Dims d{q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]};
  e.d = d;
  const std::int64_t rows = d.B * d.Hq * d.N;
  e.out.assign(std::size_t(std::max<std::int64_t>(rows * d.Dv, 1)), kNaN);
  e.lse.assign(std::size_t(std::max<std::int64_t>(rows, 1)), kNaN);
  e.out_tol.assign(e.out.size(), 0.0);
  e.lse_tol.assign(e.lse.size(), 0.0);
  try {
    flashcpu::reference::attention(q, k, v, flashcpu::bhsd(e.out.data(), d.B, d.Hq, d.N, d.Dv),
                                   flashcpu::bhsd(e.lse.data(), d.B, d.Hq, d.N, 1), opt);
  } catch (const std::exception& ex) {
    e.error = ex.what();
    return e;
  }
  // The scale as the library resolves it (a float; 1/sqrt(D) rounded to float).
  const double scale = opt.scale                         ? double(*opt.scale)
                       : opt.score == Score::dot_product ? double(float(1.0 / std::sqrt(double(d.D))))
                       : opt.score == Score::gaussian    ? 0.5
                                                         : 1.0;
  double add_sum = 0;
  if (opt.score == Score::additive && opt.additive_weights)
    for (std::int64_t c = 0; c < d.D; ++c) add_sum += std::fabs(double(opt.additive_weights[c]));
  const std::int64_t group = d.Hq / d.Hkv;
  // Index M holds the sink, when there is one: a score with an exact value and no value row.
  const std::int64_t Mk = d.M + 1;
  const std::size_t Ms = std::size_t(Mk);
  const std::size_t Dvs = std::size_t(std::max<std::int64_t>(d.Dv, 1));
  std::vector<double> key_r2(Ms), s(Ms), w(Ms), delta(Ms), a_dot(Ms), lw(Ms), coef(Ms);
  std::vector<double> mine(Dvs), mag(Dvs), dev(Dvs), dev_ref(Dvs);
  Worst ref_out, ref_lse;
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h) {
      const std::int64_t g = h / group;
      if (opt.score == Score::gaussian)  // each key's squared distance to key 0, the kernel's center
        for (std::int64_t j = 0; j < d.M; ++j) {
          double r2 = 0;
          for (std::int64_t c = 0; c < d.D; ++c) {
            const double t = double(elem(k, b, g, j, c)) - double(elem(k, b, g, 0, c));
            r2 += t * t;
          }
          key_r2[std::size_t(j)] = r2;
        }
      for (std::int64_t i = 0; i < d.N; ++i) {
        const std::int64_t row = (b * d.Hq + h) * d.N + i;
        row_scores(q, k, opt, d, scale, b, h, i, s, a_dot);
        s[std::size_t(d.M)] = opt.sinks ? double(opt.sinks[h]) : -std::numeric_limits<double>::infinity();
        a_dot[std::size_t(d.M)] = 0;
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < Mk; ++j) m = std::max(m, s[std::size_t(j)]);
        if (m == -std::numeric_limits<double>::infinity()) {  // no visible key: exact zeros and -inf
          ++e.empty_rows;
          for (std::int64_t c = 0; c < d.Dv; ++c)
            ref_out.record(e.out[std::size_t(row * d.Dv + c)], 0.0, 0.0, b, h, i, c);
          ref_lse.record(e.lse[std::size_t(row)], -std::numeric_limits<double>::infinity(), 0.0, b, h, i, 0);
          continue;
        }
        double sum = 0;
        for (std::int64_t j = 0; j < Mk; ++j) sum += (w[std::size_t(j)] = std::exp(s[std::size_t(j)] - m));
        const double L = m + std::log(sum);
        double query_r2 = 0;  // the query's squared distance to the center (Gaussian)
        if (opt.score == Score::gaussian && d.M > 0)
          for (std::int64_t c = 0; c < d.D; ++c) {
            const double t = double(elem(q, b, h, i, c)) - double(elem(k, b, g, 0, c));
            query_r2 += t * t;
          }
        const std::int64_t diag = i + d.M - d.N;
        double s_bar = 0;
        for (std::int64_t j = 0; j < Mk; ++j) {
          const double sj = s[std::size_t(j)];
          w[std::size_t(j)] /= sum;
          lw[std::size_t(j)] = sj - L;
          if (sj == -std::numeric_limits<double>::infinity()) continue;
          double a = 0;
          if (j < d.M) switch (opt.score) {
            case Score::dot_product: a = a_dot[std::size_t(j)]; break;
            case Score::gaussian: a = 2 * std::fabs(scale) * (query_r2 + key_r2[std::size_t(j)]); break;
            case Score::additive: a = std::fabs(scale) * add_sum; break;
          }
          double t = 0;
          if (opt.alibi_slopes && j < d.M) t += std::fabs(double(opt.alibi_slopes[h]) * double(std::llabs(diag - j)));
          if (opt.mask.data && j < d.M) t += std::fabs(double(mask_at(opt.mask, b, h, i, j)));
          delta[std::size_t(j)] = kU * (double(d.D + 10) * a + 8 * (t + std::fabs(sj) + std::fabs(m)) + 16);
          s_bar += w[std::size_t(j)] * (std::fabs(sj) + std::fabs(m) + 1);
        }
        const double lse_bound = weight_perturbation(lw, delta, Mk, coef);
        e.lse_tol[std::size_t(row)] = lse_bound + kLseAtol + 4 * kU * std::fabs(L);
        ref_lse.record(e.lse[std::size_t(row)], L, 4 * kU * std::fabs(L) + 1e-12 * s_bar, b, h, i, 0);
        std::fill(mine.begin(), mine.end(), 0.0), std::fill(mag.begin(), mag.end(), 0.0);
        std::fill(dev.begin(), dev.end(), 0.0), std::fill(dev_ref.begin(), dev_ref.end(), 0.0);
        const float* r = &e.out[std::size_t(row * d.Dv)];
        for (std::int64_t j = 0; j < d.M; ++j) {
          const double wj = w[std::size_t(j)], cj = coef[std::size_t(j)];
          if (!(wj > 0) && !(cj > 0)) continue;
          const double rj = wj * (std::fabs(s[std::size_t(j)]) + std::fabs(m) + 1);
          const float* vj = v.data + b * v.strides[0] + g * v.strides[1] + j * v.strides[2];
          for (std::int64_t c = 0; c < d.Dv; ++c) {
            const double x = vj[c * v.strides[3]], spread = std::fabs(x - double(r[c]));
            mine[std::size_t(c)] += wj * x;
            mag[std::size_t(c)] += wj * std::fabs(x);
            if (spread > 0) dev[std::size_t(c)] += cj * spread;  // cj may be inf
            dev_ref[std::size_t(c)] += rj * spread;
          }
        }
        if (s[std::size_t(d.M)] != -std::numeric_limits<double>::infinity())  // the sink's value row is 0
          for (std::int64_t c = 0; c < d.Dv; ++c) {
            const double spread = std::fabs(double(r[c]));
            if (spread > 0) dev[std::size_t(c)] += coef[std::size_t(d.M)] * spread;
            dev_ref[std::size_t(c)] += w[std::size_t(d.M)] * (std::fabs(s[std::size_t(d.M)]) + std::fabs(m) + 1) * spread;
          }
        for (std::int64_t c = 0; c < d.Dv; ++c) {
          const std::size_t cs = std::size_t(c);
          e.out_tol[std::size_t(row * d.Dv + c)] = kAtol * mag[cs] + kRtol * std::fabs(double(r[c])) + dev[cs];
          // Both in double, rounded once: the reference must agree to a few float ulp.
          ref_out.record(r[c], mine[cs], 4 * kU * std::fabs(mine[cs]) + 1e-9 * mag[cs] + 1e-12 * dev_ref[cs], b, h, i,
                         c);
        }
      }
    }
  if (ref_out.bad || ref_lse.bad)
    e.ref_report = "REFERENCE DISAGREES with the test's own double softmax of the documented scores:\n  " +
                   ref_out.text("out", "reference", "test") + "\n  " + ref_lse.text("lse", "reference", "test");
  return e;
}

Outcome compare(const Expected& e, TensorView<const float> out, const TensorView<const float>* lse) {
  Outcome o;
  if (!e.error.empty()) return {false, "reference threw: " + e.error};
  if (!e.ref_report.empty()) return {false, e.ref_report};
  Worst wo, wl;
  const Dims& d = e.d;
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t i = 0; i < d.N; ++i) {
        const std::int64_t row = (b * d.Hq + h) * d.N + i;
        for (std::int64_t c = 0; c < d.Dv; ++c) {
          const std::size_t at = std::size_t(row * d.Dv + c);
          wo.record(elem(out, b, h, i, c), e.out[at], e.out_tol[at], b, h, i, c);
        }
        if (lse) wl.record(elem(*lse, b, h, i, 0), e.lse[std::size_t(row)], e.lse_tol[std::size_t(row)], b, h, i, 0);
      }
  o.ok = wo.bad == 0 && wl.bad == 0;
  o.out_ratio = wo.ratio, o.lse_ratio = wl.ratio;
  o.report = wo.text("out") + "\n" + (lse ? wl.text("lse") : std::string("lse: not compared")) +
             "\nrows with no visible key (reference): " + std::to_string(e.empty_rows);
  return o;
}

Outcome run_check(Problem& p, std::int64_t* empty_rows) {
  std::mt19937 unused;
  p.out.fill_uniform(unused, kSentinel, kSentinel);
  p.lse.fill_uniform(unused, kSentinel, kSentinel);
  Tensor out2(p.out.shape(), Layout::bhsd, kSentinel);
  try {
    flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), p.lse.view(), p.opt);
    flashcpu::attention(p.q.cview(), p.k.cview(), p.v.cview(), out2.view(), p.opt);
  } catch (const std::exception& ex) {
    return {false, std::string("flashcpu::attention threw: ") + ex.what()};
  }
  const Expected e = expect(p.q.cview(), p.k.cview(), p.v.cview(), p.opt);
  if (empty_rows) *empty_rows = e.empty_rows;
  const TensorView<const float> lse = p.lse.cview();
  Outcome o = compare(e, p.out.cview(), &lse);
  bool same = true;
  for (std::int64_t b = 0; b < p.d.B && same; ++b)
    for (std::int64_t h = 0; h < p.d.Hq && same; ++h)
      for (std::int64_t i = 0; i < p.d.N && same; ++i)
        for (std::int64_t c = 0; c < p.d.Dv && same; ++c) {
          const float x = p.out.at(b, h, i, c), y = out2.at(b, h, i, c);
          same = std::memcmp(&x, &y, sizeof(float)) == 0;
        }
  if (!same) o.ok = false, o.report += "\nattention without lse gave a different out (not bitwise equal)";
  if (!p.out.padding_intact()) o.ok = false, o.report += "\nattention wrote outside out's view";
  if (!p.lse.padding_intact()) o.ok = false, o.report += "\nattention wrote outside lse's view";
  return o;
}

}  // namespace oracle
