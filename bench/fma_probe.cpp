// The FMA-peak probe: fp32 FMA throughput with independent accumulator chains.
//
// Its own translation unit, and the wide code sits in functions carrying a
// per-function target attribute instead of a file-wide -mavx512f: nothing else in
// this file (std:: helpers, OpenMP outlined regions) is compiled for AVX-512, so no
// AVX-512 copy of an inline function can leak into the baseline code at link time.
// The width is chosen at run time with flashcpu::isa_supported, which also checks
// that the OS saves the wide registers.
#include "common.hpp"

#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <vector>

namespace flashcpu::bench {
namespace {

// Each chain is acc = acc * a + b with a just below 1: it converges instead of
// overflowing and never goes subnormal. FMA latency 4 cycles x 2 pipes needs >= 8
// independent chains; 16 zmm chains (of 32 registers) and 12 ymm chains (of 16,
// leaving room for a and b) cover that with margin.
#define FCB_REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define FCB_REP16(X) FCB_REP12(X) X(12) X(13) X(14) X(15)

__attribute__((target("avx512f"), noinline)) float chains_zmm(std::int64_t iters, float seed) {
  const __m512 a = _mm512_set1_ps(0.9999999f), b = _mm512_set1_ps(1e-7f);
#define FCB_DECL(i) __m512 c##i = _mm512_set1_ps(seed + float(i));
#define FCB_STEP(i) c##i = _mm512_fmadd_ps(c##i, a, b);
#define FCB_SUM(i) s = _mm512_add_ps(s, c##i);
  FCB_REP16(FCB_DECL)
  for (std::int64_t it = 0; it < iters; ++it) {
    FCB_REP16(FCB_STEP)
  }
  __m512 s = _mm512_setzero_ps();
  FCB_REP16(FCB_SUM)
  alignas(64) float lanes[16];  // not _mm512_reduce_add_ps: gcc 12 warns falsely in it
  _mm512_store_ps(lanes, s);
  float r = 0;
  for (float x : lanes) r += x;
  return r;
#undef FCB_DECL
#undef FCB_STEP
#undef FCB_SUM
}

__attribute__((target("avx2,fma"), noinline)) float chains_ymm(std::int64_t iters, float seed) {
  const __m256 a = _mm256_set1_ps(0.9999999f), b = _mm256_set1_ps(1e-7f);
#define FCB_DECL(i) __m256 c##i = _mm256_set1_ps(seed + float(i));
#define FCB_STEP(i) c##i = _mm256_fmadd_ps(c##i, a, b);
#define FCB_SUM(i) s = _mm256_add_ps(s, c##i);
  FCB_REP12(FCB_DECL)
  for (std::int64_t it = 0; it < iters; ++it) {
    FCB_REP12(FCB_STEP)
  }
  __m256 s = _mm256_setzero_ps();
  FCB_REP12(FCB_SUM)
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float r = 0;
  for (float x : lanes) r += x;
  return r;
#undef FCB_DECL
#undef FCB_STEP
#undef FCB_SUM
}

// SSE2 has no FMA: a multiply and an add per chain step (2 FLOP, 2 instructions).
__attribute__((noinline)) float chains_xmm(std::int64_t iters, float seed) {
  const __m128 a = _mm_set1_ps(0.9999999f), b = _mm_set1_ps(1e-7f);
#define FCB_DECL(i) __m128 c##i = _mm_set1_ps(seed + float(i));
#define FCB_STEP(i) c##i = _mm_add_ps(_mm_mul_ps(c##i, a), b);
#define FCB_SUM(i) s = _mm_add_ps(s, c##i);
  FCB_REP12(FCB_DECL)
  for (std::int64_t it = 0; it < iters; ++it) {
    FCB_REP12(FCB_STEP)
  }
  __m128 s = _mm_setzero_ps();
  FCB_REP12(FCB_SUM)
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, s);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
#undef FCB_DECL
#undef FCB_STEP
#undef FCB_SUM
}

#undef FCB_REP12
#undef FCB_REP16

// AMX: back-to-back TDPBF16PS, each 16 x 16 x 32 multiply-adds (16,384 FLOP). Four
// independent accumulators (tmm0-3) from two A tiles (tmm4, tmm5) and two B tiles (tmm6,
// tmm7), loaded once: nothing but the products is timed. One product issues every 16
// cycles per core and completes in about 50, so four chains keep the unit busy. The
// operands are 2^-8 in bf16: a product adds 32 * 2^-16 per element, and an hour of them
// stays far below bf16 or fp32 overflow. The configuration is loaded and released within
// the call, on the calling thread (OpenMP threads do not keep one across calls).
struct alignas(64) AmxConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16"), noinline)) float chains_amx(std::int64_t iters, float seed) {
  AmxConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  alignas(64) std::uint16_t operand[16 * 32];
  for (std::uint16_t& x : operand) x = 0x3b80;  // bf16 2^-8
  alignas(64) float out[16 * 16];
  // The whole 64-byte block is the asm's operand, so every byte of it is stored first.
  __asm__ volatile("ldtilecfg %0" ::"m"(config));
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, operand, 64);
  _tile_loadd(5, operand, 64);
  _tile_loadd(6, operand, 64);
  _tile_loadd(7, operand, 64);
  for (std::int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  float sum = seed;
  _tile_stored(0, out, 64);
  sum += out[0];
  _tile_stored(3, out, 64);
  sum += out[255];
  _tile_release();
  return sum;
}

struct Probe {
  float (*fn)(std::int64_t, float);
  double flop_per_iter;  // chains * lanes * 2
};

bool probe_for(const std::string& isa, Probe* out) {
  if (isa == "amx") {
    *out = {chains_amx, 4.0 * 16 * 16 * 32 * 2};
  } else if (isa == "avx512") {
    *out = {chains_zmm, 16.0 * 16 * 2};
  } else if (isa == "avx2") {
    *out = {chains_ymm, 12.0 * 8 * 2};
  } else if (isa == "sse2") {
    *out = {chains_xmm, 12.0 * 4 * 2};
  } else {
    return false;
  }
  return flashcpu::isa_supported(isa);
}

}  // namespace

bool has_fma_probe(const std::string& isa) { return isa == "avx512" || isa == "avx2" || isa == "sse2"; }

namespace {

double measure_probe_gflops(const std::string& isa, int threads, double seconds) {
  Probe probe{};
  if (!probe_for(isa, &probe)) return 0.0;
  threads = resolve_threads(threads);

  // A chunk of ~0.3 ms at peak (8192 iterations of 16 zmm FMAs at 2 per cycle), so
  // the clock is read rarely and every thread stops within a chunk of `seconds`.
  const std::int64_t chunk = 8192;
  std::vector<double> flop(static_cast<std::size_t>(threads), 0.0);
  volatile float sink = 0;

#pragma omp parallel num_threads(threads)
  { (void)0; }  // start the pool before timing

  const double t0 = now_seconds();
#pragma omp parallel num_threads(threads)
  {
    const int id = omp_get_thread_num();
    float local = 0;
    double done = 0;
    do {
      local += probe.fn(chunk, local * 1e-30f + float(id));
      done += double(chunk) * probe.flop_per_iter;
    } while (now_seconds() - t0 < seconds);
    flop[static_cast<std::size_t>(id)] = done;
#pragma omp critical
    sink = sink + local;
  }
  const double wall = now_seconds() - t0;
  (void)sink;

  double total = 0;
  for (double f : flop) total += f;
  return total / wall * 1e-9;
}

}  // namespace

double measure_fma_gflops(const std::string& isa, int threads, double seconds) {
  return has_fma_probe(isa) ? measure_probe_gflops(isa, threads, seconds) : 0.0;
}

double measure_amx_gflops(int threads, double seconds) { return measure_probe_gflops("amx", threads, seconds); }

}  // namespace flashcpu::bench
