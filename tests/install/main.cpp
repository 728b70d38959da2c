// A flashcpu consumer: computes a small causal grouped-query attention with the fused
// kernel and checks it against the reference. Exit status 0 only when they agree.
#include <flashcpu/flashcpu.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const std::int64_t B = 2, Hq = 4, Hkv = 2, N = 13, M = 21, D = 24, Dv = 20;
  std::vector<float> q(B * Hq * N * D), k(B * Hkv * M * D), v(B * Hkv * M * Dv);
  std::vector<float> out(B * Hq * N * Dv, -1.0f), ref(out.size(), -2.0f);
  unsigned state = 12345u;  // a tiny LCG: no <random> distribution differences
  auto next = [&state] {
    state = state * 1664525u + 1013904223u;
    return float(state >> 8) / float(1u << 24) * 2.0f - 1.0f;
  };
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = next();

  flashcpu::AttentionOptions options;
  options.causal = true;
  const auto qv = flashcpu::bhsd<const float>(q.data(), B, Hq, N, D);
  const auto kv = flashcpu::bhsd<const float>(k.data(), B, Hkv, M, D);
  const auto vv = flashcpu::bhsd<const float>(v.data(), B, Hkv, M, Dv);
  try {
    flashcpu::attention(qv, kv, vv, flashcpu::bhsd(out.data(), B, Hq, N, Dv), options);
    flashcpu::reference::attention(qv, kv, vv, flashcpu::bhsd(ref.data(), B, Hq, N, Dv), options);
  } catch (const flashcpu::Error& e) {
    std::printf("flashcpu consumer: unexpected error: %s\n", e.what());
    return 1;
  }
  // |v| <= 1 and D = 24: an fp32 kernel agrees with the double reference to ~1e-6.
  double worst = 0;
  for (std::size_t i = 0; i < out.size(); ++i) worst = std::fmax(worst, std::fabs(double(out[i]) - ref[i]));
  std::printf("flashcpu consumer: isa %s, max |fused - reference| = %g\n", flashcpu::active_isa().c_str(), worst);
  if (!(worst <= 1e-4)) {
    std::printf("flashcpu consumer: MISMATCH\n");
    return 1;
  }
  std::printf("flashcpu consumer: OK\n");
  return 0;
}
