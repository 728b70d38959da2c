// The backward's benchmark support: FLOP count, problems, and the materialized OpenBLAS
// baseline (see common.hpp).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.hpp"

#ifdef FLASHCPU_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace flashcpu::bench {

double backward_flops(const Shape& s) {
  return 2.0 * double(s.batch) * double(s.q_heads) * visible_pairs(s.n, s.m, s.causal) * double(3 * s.d + 2 * s.dv);
}

BackwardProblem::BackwardProblem(const Shape& s, std::uint64_t seed) : fwd(s, seed) {
  const std::size_t rows = std::size_t(s.batch * s.q_heads * s.n);
  lse = allocate_floats(std::max<std::size_t>(rows, 1));
  dout = allocate_floats(fwd.out_size());
  dq = allocate_floats(fwd.q_size());
  dk = allocate_floats(fwd.k_size());
  dv = allocate_floats(fwd.v_size());
  fill_uniform(dout.get(), fwd.out_size(), seed * 3 + 7);
  fill_zero(dq.get(), fwd.q_size());
  fill_zero(dk.get(), fwd.k_size());
  fill_zero(dv.get(), fwd.v_size());
  AttentionOptions options;
  options.causal = s.causal;
  options.allow_bf16_compute = s.bf16_compute;  // as a model trained so runs its forward
  attention(fwd.qv(), fwd.kv(), fwd.vv(), fwd.outv(), bhsd<float>(lse.get(), s.batch, s.q_heads, s.n, 1), options);
  const Elem e = act_elem(s.dtype);
  if (kv_elem(s.dtype) != e) throw Error("the backward takes fp32 or all-16-bit data, not " + describe(s));
  if (e == Elem::f32) return;
  // out and dout as 16-bit values (the forward's out rounded, as a 16-bit forward writes it).
  narrow(fwd.out.get(), e, fwd.out16.get(), fwd.out_size());
  widen(fwd.out16.get(), e, fwd.out.get(), fwd.out_size());
  dout16 = allocate_elems(e, fwd.out_size());
  narrow(dout.get(), e, dout16.get(), fwd.out_size());
  widen(dout16.get(), e, dout.get(), fwd.out_size());
  // Touched here, as the fp32 gradients are above, so that the first timed call's peak
  // memory does not count their pages.
  dq16 = allocate_elems(e, fwd.q_size());
  dk16 = allocate_elems(e, fwd.k_size());
  dv16 = allocate_elems(e, fwd.v_size());
  std::memset(dq16.get(), 0, fwd.q_size() * elem_bytes(e));
  std::memset(dk16.get(), 0, fwd.k_size() * elem_bytes(e));
  std::memset(dv16.get(), 0, fwd.v_size() * elem_bytes(e));
}

TensorView<const float> BackwardProblem::lsev() const {
  return bhsd<const float>(lse.get(), fwd.shape.batch, fwd.shape.q_heads, fwd.shape.n, 1);
}
TensorView<const float> BackwardProblem::doutv() const {
  return bhsd<const float>(dout.get(), fwd.shape.batch, fwd.shape.q_heads, fwd.shape.n, fwd.shape.dv);
}
TensorView<float> BackwardProblem::dqv() const {
  return bhsd<float>(dq.get(), fwd.shape.batch, fwd.shape.q_heads, fwd.shape.n, fwd.shape.d);
}
TensorView<float> BackwardProblem::dkv() const {
  return bhsd<float>(dk.get(), fwd.shape.batch, fwd.shape.kv_heads, fwd.shape.m, fwd.shape.d);
}
TensorView<float> BackwardProblem::dvv() const {
  return bhsd<float>(dv.get(), fwd.shape.batch, fwd.shape.kv_heads, fwd.shape.m, fwd.shape.dv);
}

const char* backward_impl_name(BackwardImpl impl) { return impl == BackwardImpl::fused ? "fused" : "openblas"; }

namespace {

// P = exp(S - lse) over the first `visible` of m scores of a row (0 past them), in place.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void probs_row(
    float* s, std::int64_t m, std::int64_t visible, float lse) {
  visible = std::clamp<std::int64_t>(visible, 0, m);
  if (lse == -INFINITY) visible = 0;  // a row with no visible key
#pragma omp simd
  for (std::int64_t j = 0; j < visible; ++j) s[j] = exp_nonpositive(std::min(s[j] - lse, 0.0f));
  for (std::int64_t j = visible; j < m; ++j) s[j] = 0.0f;
}

// dS = P (dP - delta) over a row of m, in place in dp.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void dscores_row(
    const float* p, float* dp, std::int64_t m, float delta) {
#pragma omp simd
  for (std::int64_t j = 0; j < m; ++j) dp[j] = p[j] * (dp[j] - delta);
}

}  // namespace

void openblas_attention_backward(BackwardProblem& p, int threads, MaterializedWorkspace* workspace) {
#ifndef FLASHCPU_BENCH_HAVE_OPENBLAS
  (void)p, (void)threads, (void)workspace;
  throw Error("openblas_attention_backward: this build has no OpenBLAS (FLASHCPU_BENCH_HAVE_OPENBLAS)");
#else
  const Shape& s = p.fwd.shape;
  const std::int64_t B = s.batch, Hq = s.q_heads, Hkv = s.kv_heads, N = s.n, M = s.m, D = s.d, Dv = s.dv;
  const std::int64_t group = Hq / Hkv, items = B * Hkv;
  const float scale = 1.0f / std::sqrt(float(D));
  const std::int64_t block = s.causal ? std::min(N, kCausalSkipRows) : N;
  threads = int(std::min<std::int64_t>(resolve_threads(threads), std::max<std::int64_t>(items, 1)));
  MaterializedWorkspace scratch;
  MaterializedWorkspace& ws = workspace != nullptr ? *workspace : scratch;
  ws.reserve(std::size_t(2 * threads), std::size_t(block * M));
  const float* q = p.fwd.q.get();
  const float* k = p.fwd.k.get();
  const float* v = p.fwd.v.get();
  const float* o = p.fwd.out.get();
  const float* lse = p.lse.get();
  const float* dout = p.dout.get();
  float* dq = p.dq.get();
  float* dk = p.dk.get();
  float* dv = p.dv.get();

  openblas_set_num_threads(1);
#pragma omp parallel num_threads(threads)
  {
    float* S = ws.buffers[std::size_t(2 * omp_get_thread_num())].get();
    float* dP = ws.buffers[std::size_t(2 * omp_get_thread_num() + 1)].get();
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t b = item / Hkv, hk = item % Hkv;
      const float* kp = k + (b * Hkv + hk) * M * D;
      const float* vp = v + (b * Hkv + hk) * M * Dv;
      float* dkp = dk + (b * Hkv + hk) * M * D;
      float* dvp = dv + (b * Hkv + hk) * M * Dv;
      std::fill(dkp, dkp + M * D, 0.0f);
      std::fill(dvp, dvp + M * Dv, 0.0f);
      for (std::int64_t g = 0; g < group; ++g) {
        const std::int64_t h = hk * group + g, row0 = (b * Hq + h) * N;
        for (std::int64_t r0 = 0; r0 < N; r0 += block) {
          const std::int64_t rows = std::min(block, N - r0);
          // Keys the block's rows can see: up to its last row's diagonal.
          const std::int64_t cols = s.causal ? std::clamp<std::int64_t>(r0 + rows + (M - N), 0, M) : M;
          const float* qp = q + (row0 + r0) * D;
          const float* dop = dout + (row0 + r0) * Dv;
          float* dqp = dq + (row0 + r0) * D;
          if (cols == 0) {
            std::fill(dqp, dqp + rows * D, 0.0f);
            continue;
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(cols), int(D), scale, qp, int(D), kp,
                      int(D), 0.0f, S, int(cols));
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(cols), int(Dv), 1.0f, dop, int(Dv), vp,
                      int(Dv), 0.0f, dP, int(cols));
          for (std::int64_t i = 0; i < rows; ++i) {
            const std::int64_t row = row0 + r0 + i;
            const std::int64_t visible = s.causal ? r0 + i + (M - N) + 1 : M;
            probs_row(S + i * cols, cols, visible, lse[row]);
            float delta = 0.0f;
            for (std::int64_t c = 0; c < Dv; ++c) delta += dout[row * Dv + c] * o[row * Dv + c];
            dscores_row(S + i * cols, dP + i * cols, cols, delta);
          }
          // dV += P^T dO; dQ = scale dS K; dK += scale dS^T Q.
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(cols), int(Dv), int(rows), 1.0f, S, int(cols), dop,
                      int(Dv), 1.0f, dvp, int(Dv));
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(D), int(cols), scale, dP, int(cols), kp,
                      int(D), 0.0f, dqp, int(D));
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(cols), int(D), int(rows), scale, dP, int(cols), qp,
                      int(D), 1.0f, dkp, int(D));
        }
      }
    }
  }
#endif
}

void run_backward(BackwardImpl impl, BackwardProblem& p, int threads, MaterializedWorkspace* workspace) {
  if (impl == BackwardImpl::openblas) return openblas_attention_backward(p, threads, workspace);
  AttentionOptions options;
  options.causal = p.fwd.shape.causal;
  options.num_threads = threads;
  options.allow_bf16_compute = p.fwd.shape.bf16_compute;
  const Shape& s = p.fwd.shape;
  // The 16-bit overload, on the 16-bit copies.
  auto with16 = [&](auto tag) {
    using T = decltype(tag);
    auto in = [&](const RawBuffer& b, std::int64_t heads, std::int64_t seq, std::int64_t dim) {
      return bhsd<const T>(static_cast<const T*>(b.get()), s.batch, heads, seq, dim);
    };
    auto grad = [&](const RawBuffer& b, std::int64_t heads, std::int64_t seq, std::int64_t dim) {
      return bhsd<T>(static_cast<T*>(b.get()), s.batch, heads, seq, dim);
    };
    attention_backward(in(p.fwd.q16, s.q_heads, s.n, s.d), in(p.fwd.k16, s.kv_heads, s.m, s.d),
                       in(p.fwd.v16, s.kv_heads, s.m, s.dv), in(p.fwd.out16, s.q_heads, s.n, s.dv), p.lsev(),
                       in(p.dout16, s.q_heads, s.n, s.dv), grad(p.dq16, s.q_heads, s.n, s.d),
                       grad(p.dk16, s.kv_heads, s.m, s.d), grad(p.dv16, s.kv_heads, s.m, s.dv), options);
  };
  switch (act_elem(s.dtype)) {
    case Elem::bf16:
      return with16(bf16{});
    case Elem::fp16:
      return with16(fp16{});
    case Elem::f32:
      break;
  }
  attention_backward(p.fwd.qv(), p.fwd.kv(), p.fwd.vv(), p.fwd.outv(), p.lsev(), p.doutv(), p.dqv(), p.dkv(),
                     p.dvv(), options);
}

double check_backward_against_fused(BackwardImpl impl, BackwardProblem& p, int threads,
                                    MaterializedWorkspace* workspace) {
  const std::size_t sizes[3] = {p.fwd.q_size(), p.fwd.k_size(), p.fwd.v_size()};
  float* grads[3] = {p.dq.get(), p.dk.get(), p.dv.get()};
  run_backward(BackwardImpl::fused, p, threads, nullptr);
  std::vector<float> fused[3];
  for (int t = 0; t < 3; ++t) fused[t].assign(grads[t], grads[t] + sizes[t]);
  run_backward(impl, p, threads, workspace);
  double largest = 0, diff = 0;
  for (int t = 0; t < 3; ++t)
    for (std::size_t x = 0; x < sizes[t]; ++x) {
      largest = std::max(largest, std::fabs(double(fused[t][x])));
      diff = std::max(diff, std::fabs(double(fused[t][x]) - double(grads[t][x])));
    }
  const double relative = largest > 0 ? diff / largest : diff;
  if (!(relative <= 1e-3))
    throw Error(std::string("backward cross-check: ") + backward_impl_name(impl) + " differs from fused by " +
                std::to_string(relative) + " of the largest gradient on " + describe(p.fwd.shape));
  return relative;
}

void check_backward_against_fp32(BackwardProblem& p, int threads) {
  const Elem e = act_elem(p.fwd.shape.dtype);
  const std::size_t sizes[3] = {p.fwd.q_size(), p.fwd.k_size(), p.fwd.v_size()};
  float* fp32[3] = {p.dq.get(), p.dk.get(), p.dv.get()};
  const char* names[3] = {"dq", "dk", "dv"};
  // The last run's gradients, widened: of the 16-bit buffers, or (fp32 data under
  // allow_bf16_compute) of the fp32 ones, before the exact backward overwrites them.
  std::vector<float> got[3];
  for (int t = 0; t < 3; ++t) {
    got[t].resize(sizes[t]);
    if (e == Elem::f32)
      std::memcpy(got[t].data(), fp32[t], sizes[t] * sizeof(float));
    else
      widen(t == 0 ? p.dq16.get() : t == 1 ? p.dk16.get() : p.dv16.get(), e, got[t].data(), sizes[t]);
  }
  AttentionOptions options;
  options.causal = p.fwd.shape.causal;
  options.num_threads = threads;
  attention_backward(p.fwd.qv(), p.fwd.kv(), p.fwd.vv(), p.fwd.outv(), p.lsev(), p.doutv(), p.dqv(), p.dkv(),
                     p.dvv(), options);
  const bool pairs = backward_pair_products(p.fwd.shape);
  for (int t = 0; t < 3; ++t) {
    if (!pairs) {
      RawBuffer rounded = allocate_elems(e, sizes[t]), ran = allocate_elems(e, sizes[t]);
      narrow(fp32[t], e, rounded.get(), sizes[t]);
      narrow(got[t].data(), e, ran.get(), sizes[t]);
      if (std::memcmp(rounded.get(), ran.get(), sizes[t] * elem_bytes(e)) != 0)
        throw Error(std::string("backward cross-check: ") + names[t] + " is not the fp32 backward's rounded, on " +
                    describe(p.fwd.shape));
      continue;
    }
    double largest = 0, diff = 0;
    for (std::size_t x = 0; x < sizes[t]; ++x) {
      largest = std::max(largest, std::fabs(double(fp32[t][x])));
      diff = std::max(diff, std::fabs(double(fp32[t][x]) - double(got[t][x])));
    }
    if (!(diff <= 0x1p-4 * largest))
      throw Error(std::string("backward cross-check: ") + names[t] + " differs from the fp32 backward's by " +
                  std::to_string(diff / largest) + " of its largest element, on " + describe(p.fwd.shape));
  }
}

}  // namespace flashcpu::bench
