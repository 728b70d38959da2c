// The fused attention forward kernel, written once and templated on the architecture.
//
// Each kernel variant's translation unit (kernels/variant.hpp, one per line of
// kernels/variants.inc) defines FLASHCPU_ISA_NAMESPACE, includes this file and
// instantiates its kernel table. Everything here lives in that namespace, so the
// linker can never merge one ISA's inline code into another's path.
//
// One call handles one query block (Br rows) of one head against its visible keys:
//   for each key block (Bk keys):
//     for each row tile (MR rows):
//       S  = Q_tile . K_block^T         micro-kernel MR x NR, Q pre-scaled by scale*log2 e
//       mask (causal diagonal, key tail), then per row: m' = max(m, rowmax S),
//       P  = 2^(S - m'), alpha = 2^(m - m'), l = alpha*l + rowsum P
//       O  = alpha*O + P . V_block     micro-kernel MR x (NV vectors), O in the block buffer
//   out = O / l (rows that saw no key: 0)
// Working memory is the scratch the driver passes: O(Br*Dv + MR*Bk), independent of N, M.
#pragma once

#ifndef FLASHCPU_ISA_NAMESPACE
#error "define FLASHCPU_ISA_NAMESPACE before including kernels/forward.hpp"
#endif

#include <cassert>  // xsimd 8.1 uses assert without including it
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <immintrin.h>
#include <xsimd/xsimd.hpp>

#include "kernels/kernel_api.hpp"

namespace flashcpu::detail::FLASHCPU_ISA_NAMESPACE {

#include "kernels/vmath.hpp"
#include "kernels/elements.hpp"

template <class T>
constexpr DType dtype_of() {
  return std::is_same<T, bf16>::value ? DType::bf16 : std::is_same<T, f16>::value ? DType::f16 : DType::f32;
}

inline std::int64_t min_i64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

// The visible key interval [lo_i, hi_i] of query i (JobVisibility); it moves right with
// i, so the interval of a set of consecutive rows spans lo(first) .. hi(last). Shared by
// the forward and the backward kernels.
inline std::int64_t visible_lo(const JobVisibility& v, std::int64_t i) { return v.has_lo ? i + v.lo_offset : 0; }
inline std::int64_t visible_hi(const JobVisibility& v, std::int64_t i) {
  constexpr std::int64_t unbounded = std::numeric_limits<std::int64_t>::max() / 4;
  return v.has_hi ? i + v.hi_offset : unbounded;
}

// Decoding streams K and V from memory once, by software prefetches that keep requests in
// flight evenly rather than in a burst per block. A block's S phase requests K rows, a
// fixed distance ahead of the keys being scored, one row per key scored; its P.V phase
// requests the next block's V rows, one per key weighed (ValuesAhead). So both halves of
// a block keep memory busy. (The first block's V rows, which no P.V phase before it
// requests, ride along with its K rows; so do every block's when its P.V tiles read whole
// rows and the job is one row tile: values_with_keys.)
// DEC (Hq=32, Hkv=8, M=8192, D=128), K/V bytes per second against the read probe, median
// of 5 by distance (K and V both requested in the S phase, on a Xeon): 32 keys 97%, 64
// keys 101%, 128 keys 95%, 256 keys 87%, 1024 keys 87%; the burst per block it replaced
// reached 80-83%. On AVX2 with 16-bit K/V, where the S loop is fast, requesting V in the
// P.V phase rather than with K gained 10-20% (docs/performance-notes.md).
constexpr std::int64_t kPrefetchKeys = 64;

struct PrefetchStream {
  const char* k = nullptr;  // K row of the next key to request
  const char* v = nullptr;
  std::int64_t k_stride = 0, v_stride = 0, k_bytes = 0, v_bytes = 0;  // in bytes
  std::int64_t k_left = 0, v_left = 0;                                // rows still to request
  // Where the stream goes on once k_left reaches 0: the first rows of the thread's next
  // work item (JobKeys::next_k_rows), K and V alike. Before, each item began with a burst
  // of requests and waited on its first rows. Zen 5, 2 threads, cold, tools/ab_builds
  // with the two builds in both orders (24 rounds each), per-round medians old / new:
  // DRAFT (16 heads, N = 32, M = 8192, causal) 1.058 and 1.048, fp32 DEC 1.026 and 1.024;
  // 16-bit DEC and DEC64 within the noise (0.96-1.04); hot calls unchanged.
  const char* next_k = nullptr;
  const char* next_v = nullptr;
  std::int64_t next_left = 0;

  void step() {
    if (k_left == 0 && next_left > 0) {
      k = next_k;
      v = next_v;
      k_left = next_left;
      v_left = next_v ? next_left : 0;
      next_left = 0;
    }
    if (k_left > 0) {
      for (std::int64_t b = 0; b < k_bytes; b += 64) __builtin_prefetch(k + b, 0, 2);
      k += k_stride;
      --k_left;
    }
    if (v_left > 0) {
      for (std::int64_t b = 0; b < v_bytes; b += 64) __builtin_prefetch(v + b, 0, 2);
      v += v_stride;
      --v_left;
    }
  }
};

// The V rows a decoding block's P.V tiles request for the next block: the row `offset`
// bytes past each row read, for the run's first `keys` keys (the rest lie past the end).
struct ValuesAhead {
  std::int64_t offset = 0, keys = 0;
};

/// MR: query rows per micro-kernel; NRV: key vectors per S tile (NR = NRV * W keys,
/// the K panel width); NV: value vectors per P.V tile; PR: rows per P.V tile (MR by
/// default; a fraction of MR lets the P.V tile span more value vectors); KV: the element
/// type K rows and V rows are read as (f32, bf16, f16), widened to fp32 as they load.
template <class Arch, int MR, int NRV, int NV, int PR = MR, class KV = float>
struct ForwardKernel {
  static_assert(MR % PR == 0, "P.V tiles split the row tile evenly");
  using batch = xsimd::batch<float, Arch>;
  static constexpr int W = int(batch::size);
  static constexpr int NR = NRV * W;
  // Vector registers of the ISA: 32 with AVX-512's 16-float vectors, else 16. The tile
  // shapes chosen inside the kernel (half tiles, whole-row P.V tiles) must fit them.
  static constexpr int kVectorRegisters = W >= 16 ? 32 : 16;

  static batch load_kv(const KV* p) { return widen<Arch>(p); }
  static const KV* k_rows(const QueryBlockJob& job) { return static_cast<const KV*>(job.keys.k_rows); }
  static const KV* v_rows(const QueryBlockJob& job) { return static_cast<const KV*>(job.keys.v_rows); }

  // The S micro-kernel over packed K panels, one MR x NR tile per panel, written once for
  // every score (q: MR rows, q_stride floats apart): `step(d, q, k, acc)` accumulates dimension d of a (query, key) pair;
  // each tile is multiplied by `factor` when stored. tile_max[r] = the largest of row
  // r's scores, taken while they are still in registers (it saves the softmax a pass
  // when nothing else changes the scores).
  template <class Step>
  static void scores_tile(const float* q, std::int64_t q_stride, std::int64_t D, const float* panels,
                          std::int64_t num_panels, float* scores, std::int64_t scores_stride, float factor,
                          float* tile_max, Step step) {
    // The running maxima live in memory, not registers: with MR*NRV accumulators they
    // would push a large tile over the register budget, and they are touched once per panel.
    alignas(64) float running_max[MR][W];
    for (int r = 0; r < MR; ++r) batch(-std::numeric_limits<float>::infinity()).store_aligned(running_max[r]);
    for (std::int64_t p = 0; p < num_panels; ++p) {
      const float* panel = panels + p * D * NR;
      batch acc[MR][NRV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NRV; ++v) acc[r][v] = batch(0.0f);
      for (std::int64_t d = 0; d < D; ++d) {
        batch keys[NRV];
        for (int v = 0; v < NRV; ++v) keys[v] = batch::load_aligned(panel + d * NR + v * W);
        for (int r = 0; r < MR; ++r) {
          float q_rd;  // by memcpy: the pair kernels' q words were written as bf16 halves
          __builtin_memcpy(&q_rd, q + r * q_stride + d, 4);
          const batch qv(q_rd);
          for (int v = 0; v < NRV; ++v) acc[r][v] = step(d, qv, keys[v], acc[r][v]);
        }
      }
      for (int r = 0; r < MR; ++r) {
        batch row_max = batch::load_aligned(running_max[r]);
        for (int v = 0; v < NRV; ++v) {
          if (factor != 1.0f) acc[r][v] *= batch(factor);
          acc[r][v].store_aligned(scores + r * scores_stride + p * NR + v * W);
          row_max = xsimd::max(row_max, acc[r][v]);
        }
        row_max.store_aligned(running_max[r]);
      }
    }
    for (int r = 0; r < MR; ++r) tile_max[r] = reduce_max<Arch>(batch::load_aligned(running_max[r]));
  }

  // The per-dimension steps of the three scores:
  //  - dot product: acc + q k;
  //  - Gaussian from exact differences (times -scale when stored): acc + (q - k)^2, one
  //    more operation than the dot product but no cancellation, for kernel regression,
  //    small D and widely spread keys;
  //  - Bahdanau: acc + w_d tanh(q + k), D tanh per score, transcendental-bound, but never
  //    the N x M x D feature tensor.
  // (Function objects, not function pointers: through a pointer GCC stops keeping a
  // large tile's accumulators in registers.)
  struct DotStep {
    batch operator()(std::int64_t, batch q, batch k, batch acc) const { return xsimd::fma(q, k, acc); }
  };
  struct DistanceStep {
    batch operator()(std::int64_t, batch q, batch k, batch acc) const {
      const batch diff = q - k;
      return xsimd::fma(diff, diff, acc);
    }
  };

  // The same scores from K rows read in place (decoding: K is streamed once, packing it
  // would cost a second pass), for the tile's first ROWS rows. W keys at a time: per key,
  // one vector of partial dot products per row, then PairSums turns W such vectors into W
  // finished scores. KP keys per pass over D: ROWS*KP accumulator chains hide the FMA
  // latency, and each query vector loaded serves KP keys (see kFullKeysPerPass).
  // Step as for scores_tile; Elem the type K rows are read as, widened as they load. The
  // vdpbf16ps kernel (kernels/forward_pairs.hpp) passes its pair step, bf16 K rows as the
  // 32-bit words of their pairs of dimensions (Elem float: loaded as they are), D in
  // words, and `factor` for the scores (its Q is unscaled).
  template <int ROWS, int KP, class Step = DotStep, class Elem = KV>
  static void scores_tile_rows(const float* q, std::int64_t D, const Elem* k, std::int64_t k_stride,
                               std::int64_t num_keys, std::int64_t cols, float* scores, std::int64_t scores_stride,
                               PrefetchStream& ahead, float factor = 1.0f) {
    static_assert(KP % 2 == 0 && W % KP == 0, "keys are taken in pairs, whole passes to a vector");
    for (std::int64_t j0 = 0; j0 < cols; j0 += W) {
      PairSums<Arch> sums[ROWS];
      for (int t = 0; t < W; t += KP) {
        batch acc[ROWS][KP];
        for (int r = 0; r < ROWS; ++r)
          for (int u = 0; u < KP; ++u) acc[r][u] = batch(0.0f);
        // Keys of the pass past num_keys: the last key is read again, its scores dropped below.
        const std::int64_t present = min_i64(KP, num_keys - (j0 + t));
        if (present > 0) {
          const Elem* key[KP];
          for (int u = 0; u < KP; ++u) {
            key[u] = k + (j0 + t + (u < present ? u : present - 1)) * k_stride;
            ahead.step();
          }
          for (std::int64_t d = 0; d < D; d += W) {
            batch kv[KP];
            for (int u = 0; u < KP; ++u) kv[u] = widen<Arch>(key[u] + d);
            for (int r = 0; r < ROWS; ++r) {
              batch qv = batch::load_aligned(q + r * D + d);
              keep_in_register(qv);  // one load for the pass's keys
              for (int u = 0; u < KP; ++u) acc[r][u] = Step{}(d, qv, kv[u], acc[r][u]);
            }
          }
        }
        for (int r = 0; r < ROWS; ++r)
          for (int u = 0; u < KP; u += 2)
            sums[r].add((t + u) / 2, u < present ? acc[r][u] : batch(0.0f),
                        u + 1 < present ? acc[r][u + 1] : batch(0.0f));
      }
      // (A factor of 1 leaves the bits as they are.)
      for (int r = 0; r < ROWS; ++r)
        (batch(sums[r].sums()) * batch(factor)).store_aligned(scores + r * scores_stride + j0);
    }
  }

  // (0, 1, ..., W - 1), for positions within a vector.
  static batch lane_indices() {
    alignas(64) float lanes[W];
    for (int t = 0; t < W; ++t) lanes[t] = float(t);
    return batch::load_aligned(lanes);
  }

  // The score terms after the raw product, in the documented order, on columns [c0, cols)
  // of one tile: biases, transform, ALiBi, additive mask, bool mask; then log2 units.
  // Returns whether a mask excluded a key of a valid row (a -inf entry or a zero in
  // the bool mask): the P.V product must then keep those keys' value rows out.
  static bool score_epilogue(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, std::int64_t c0,
                             std::int64_t cols) {
    const std::int64_t G = job.q.heads_per_row, diag = job.dims.kv_len - job.dims.q_len;
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const batch iota = lane_indices();
    bool masked_out = false;
    for (int r = 0; r < MR; ++r) {
      float* s = job.state.scores + r * job.dims.block_keys;
      const std::int64_t row = r0 + r, i = job.q.first_row + row / G, g = row % G;
      if (row >= job.q.rows) continue;  // padding rows: no query, no mask row to read
      if (job.score.key_bias || job.score.row_bias) {
        const batch rb(job.score.row_bias ? job.score.row_bias[row] : 0.0f);
        const float* kb = job.score.key_bias ? job.score.key_bias + (j0 - job.keys.begin) : nullptr;
        for (std::int64_t j = c0; j < cols; j += W) {
          batch x = batch::load_aligned(s + j) + rb;
          if (kb) x += batch::load_unaligned(kb + j);
          x.store_aligned(s + j);
        }
      }
      if (!job.score.natural_units) continue;
      const float cap = job.score.softcap;
      for (std::int64_t j = c0; j < cols; j += W) {
        batch x = batch::load_aligned(s + j);
        switch (job.score.transform) {
          case Transform::none: break;
          case Transform::softcap: x = batch(cap) * tanh_fast<Arch>(x / batch(cap)); break;
          case Transform::nw_laplacian: x = -xsimd::sqrt(xsimd::max(-x, batch(0.0f))); break;
          case Transform::nw_boxcar: x = xsimd::select(-x <= batch(1.0f), batch(0.0f), batch(neg_inf)); break;
          case Transform::nw_epanechnikov:
            x = xsimd::select(-x < batch(1.0f), xsimd::log1p(xsimd::max(x, batch(-1.0f))), batch(neg_inf));
            break;
        }
        if (job.score.alibi_slopes) {
          // |d - key| with key = j0 + j + lane, exact in float below 2^24 keys.
          const batch dist = xsimd::abs(batch(float(i + diag - j0 - j)) - iota);
          x = xsimd::fnma(batch(job.score.alibi_slopes[g]), dist, x);
        }
        x.store_aligned(s + j);
      }
      if (job.masks.mask) {
        // A -inf entry excludes the key whatever its score: NaN + -inf would be NaN, and
        // an excluded key's K row may hold anything (a stale KV-cache slot).
        const float* m = job.masks.mask + g * job.masks.mask_head_stride + i * job.masks.mask_row_stride + j0 * job.masks.mask_col_stride;
        if (job.masks.mask_col_stride == 1) {
          for (std::int64_t j = c0; j < cols; j += W) {
            const std::int64_t n = min_i64(W, job.keys.end - j0 - j);  // never read past the keys
            if (n == W) {
              const batch mv = batch::load_unaligned(m + j);
              const auto excluded = mv == batch(neg_inf);
              masked_out = masked_out || xsimd::any(excluded);
              xsimd::select(excluded, mv, batch::load_aligned(s + j) + mv).store_aligned(s + j);
            } else {
              for (std::int64_t t = 0; t < n; ++t) {
                masked_out = masked_out || m[j + t] == neg_inf;
                s[j + t] = m[j + t] == neg_inf ? neg_inf : s[j + t] + m[j + t];
              }
            }
          }
        } else {
          for (std::int64_t j = c0; j < min_i64(cols, job.keys.end - j0); ++j) {
            const float mj = m[j * job.masks.mask_col_stride];
            masked_out = masked_out || mj == neg_inf;
            s[j] = mj == neg_inf ? neg_inf : s[j] + mj;
          }
        }
      }
      if (job.masks.bool_mask) {
        const std::uint8_t* m =
            job.masks.bool_mask + g * job.masks.bool_head_stride + i * job.masks.bool_row_stride + j0 * job.masks.bool_col_stride;
        const std::int64_t stride = job.masks.bool_col_stride, past = min_i64(cols, job.keys.end - j0);
        int zeros = 0;  // branch-free, so the compiler vectorizes the contiguous case
        if (stride == 1) {
          for (std::int64_t j = c0; j < past; ++j) {
            const bool excluded = m[j] == 0;
            s[j] = excluded ? neg_inf : s[j];
            zeros |= excluded;
          }
        } else {
          for (std::int64_t j = c0; j < past; ++j) {
            const bool excluded = m[j * stride] == 0;
            s[j] = excluded ? neg_inf : s[j];
            zeros |= excluded;
          }
        }
        masked_out = masked_out || zeros != 0;
      }
      // To log2 units. A finite score stays finite: a row masked with -FLT_MAX (what
      // frameworks pad with) times log2(e) would overflow to -inf and read as excluded.
      const batch log2e(1.4426950408889634f), lowest(std::numeric_limits<float>::lowest());
      for (std::int64_t j = c0; j < cols; j += W) {
        const batch x = batch::load_aligned(s + j), y = x * log2e;
        xsimd::select(y == batch(neg_inf) && x != batch(neg_inf), lowest, y).store_aligned(s + j);
      }
    }
    return masked_out;
  }

  // acc[r][c0 .. c0+NVC*W) = alpha[r] * acc[r][..] + sum_j probs[r][j] * v[j][..], for
  // ROWS rows.
  // probs[r][j] is at probs + r * probs_stride + j * key_stride.
  // SAFE: a zero probability adds nothing, whatever the value row holds. An excluded
  // key's probability is exactly 0, and 0 * NaN (a stale or poisoned KV-cache slot) is
  // NaN; the select keeps such a row out at one extra operation per FMA, so only keys
  // that some row of the tile excludes take this path. Visible pairs get the same FMA.
  // AHEAD: request the V rows of `ahead` (decoding).
  template <int ROWS, int NVC, bool SAFE = false, bool AHEAD = false>
  static void pv_tile(const float* probs, std::int64_t probs_stride, std::int64_t key_stride, const KV* v,
                      std::int64_t v_stride, std::int64_t num_keys, const float* alpha, float* acc,
                      std::int64_t acc_stride, ValuesAhead ahead = {}) {
    batch o[ROWS][NVC];
    for (int r = 0; r < ROWS; ++r) {
      const batch a(alpha[r]);
      for (int c = 0; c < NVC; ++c) o[r][c] = batch::load_aligned(acc + r * acc_stride + c * W) * a;
    }
    for (std::int64_t j = 0; j < num_keys; ++j) {
      if constexpr (AHEAD) {
        if (j < ahead.keys) {
          const char* row = reinterpret_cast<const char*>(v + j * v_stride) + ahead.offset;
          for (int b = 0; b < NVC * W * int(sizeof(KV)); b += 64) __builtin_prefetch(row + b, 0, 2);
        }
      }
      batch vals[NVC];
      for (int c = 0; c < NVC; ++c) vals[c] = load_kv(v + j * v_stride + c * W);
      for (int r = 0; r < ROWS; ++r) {
        const batch p(probs[r * probs_stride + j * key_stride]);
        if constexpr (SAFE) {
          // Keep o where p == 0, not add where p != 0: xsimd's != is ordered on AVX and
          // unordered on SSE2, and a NaN weight (the backward's, from a NaN score) must stay
          // in on every ISA; the negation !(p == 0) would cost AVX2 five more operations.
          const auto dead = p == batch(0.0f);
          for (int c = 0; c < NVC; ++c) o[r][c] = xsimd::select(dead, o[r][c], xsimd::fma(p, vals[c], o[r][c]));
        } else {
          for (int c = 0; c < NVC; ++c) o[r][c] = xsimd::fma(p, vals[c], o[r][c]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < NVC; ++c) o[r][c].store_aligned(acc + r * acc_stride + c * W);
  }

  // The P.V tiles of ROWS rows across all Dvp value columns: NVW (by default NV) vectors
  // at a time, then pairs of vectors, then a single one. With NVW odd, an odd remainder
  // gives up one wide tile for pairs (Dvp = 16 vectors, NVW = 3: 3 3 3 3 2 2, not 3 3 3 3 3
  // 1): a single vector has only ROWS accumulator chains, too few to hide the FMA latency.
  template <int ROWS, bool SAFE = false, bool AHEAD = false, int NVW = NV>
  static void pv_rows(const float* probs, std::int64_t probs_stride, std::int64_t key_stride, const KV* v,
                      std::int64_t v_stride, std::int64_t num_keys, const float* alpha, float* acc, std::int64_t Dvp,
                      ValuesAhead ahead = {}) {
    const std::int64_t vectors = Dvp / W;
    std::int64_t wide = vectors / NVW;
    if (NVW > 2 && NVW % 2 == 1 && (vectors - wide * NVW) % 2 == 1 && wide > 0) --wide;
    std::int64_t c = 0;
    for (; c < wide * NVW * W; c += NVW * W)
      pv_tile<ROWS, NVW, SAFE, AHEAD>(probs, probs_stride, key_stride, v + c, v_stride, num_keys, alpha, acc + c, Dvp,
                                     ahead);
    if constexpr (NVW > 2)
      for (; c + 2 * W <= Dvp; c += 2 * W)
        pv_tile<ROWS, 2, SAFE, AHEAD>(probs, probs_stride, key_stride, v + c, v_stride, num_keys, alpha, acc + c, Dvp,
                                      ahead);
    for (; c < Dvp; c += W)
      pv_tile<ROWS, 1, SAFE, AHEAD>(probs, probs_stride, key_stride, v + c, v_stride, num_keys, alpha, acc + c, Dvp,
                                    ahead);
  }

  // O = alpha * O + P.V over consecutive runs of a block's keys: alpha scales O once, with
  // the first run that has keys (or alone, in finish(), if none had), later runs by 1;
  // a run that some row excludes takes the safe tile. probs[r][j] for key j of the block
  // is at probs + r * probs_stride + j * key_stride; v points at the block's first value row.
  template <int ROWS, int NVW = NV>
  class PvRuns {
   public:
    PvRuns(const float* probs, std::int64_t probs_stride, std::int64_t key_stride, const KV* v,
           std::int64_t v_stride, const float* alpha, float* acc, std::int64_t Dvp, ValuesAhead ahead = {})
        : probs_(probs), probs_stride_(probs_stride), key_stride_(key_stride), v_(v), v_stride_(v_stride),
          scale_(alpha), acc_(acc), Dvp_(Dvp), ahead_(ahead) {
      for (int r = 0; r < ROWS; ++r) one_[r] = 1.0f;
    }
    // Keys [from, to); `safe` when some row excludes one of them.
    void add(std::int64_t from, std::int64_t to, bool safe) {
      if (to <= from) return;
      const float* p = probs_ + from * key_stride_;
      const KV* v = v_ + from * v_stride_;
      const ValuesAhead ahead{ahead_.offset, ahead_.keys - from};
      if (ahead.keys > 0) {
        if (safe)
          pv_rows<ROWS, true, true, NVW>(p, probs_stride_, key_stride_, v, v_stride_, to - from, scale_, acc_, Dvp_,
                                         ahead);
        else
          pv_rows<ROWS, false, true, NVW>(p, probs_stride_, key_stride_, v, v_stride_, to - from, scale_, acc_, Dvp_,
                                          ahead);
      } else if (safe) {
        pv_rows<ROWS, true, false, NVW>(p, probs_stride_, key_stride_, v, v_stride_, to - from, scale_, acc_, Dvp_);
      } else {
        pv_rows<ROWS, false, false, NVW>(p, probs_stride_, key_stride_, v, v_stride_, to - from, scale_, acc_, Dvp_);
      }
      scale_ = one_;
    }
    void finish() {
      if (scale_ != one_)
        pv_rows<ROWS, false, false, NVW>(probs_, probs_stride_, key_stride_, v_, v_stride_, 0, scale_, acc_, Dvp_);
    }

   private:
    const float* probs_;
    std::int64_t probs_stride_, key_stride_;
    const KV* v_;
    std::int64_t v_stride_;
    const float* scale_;
    float* acc_;
    std::int64_t Dvp_;
    ValuesAhead ahead_;
    alignas(64) float one_[ROWS];
  };

  // P.V over keys [first, last) of a block whose zero probabilities may sit anywhere (a
  // mask excluded keys), key stride 1. Classified per vector of W keys: keys that no row
  // weighs are skipped, keys that every row weighs take the plain tile, the rest the safe
  // one; consecutive vectors of one class make one run. A key block masked for every row
  // (a padded KV cache) then costs nothing, and a causal pattern given as a mask takes
  // the safe tile only near its diagonal.
  template <int ROWS, int NVW = NV>
  static void pv_classified(const float* probs, std::int64_t probs_stride, const KV* v, std::int64_t v_stride,
                            std::int64_t first, std::int64_t last, const float* alpha, float* acc, std::int64_t Dvp,
                            ValuesAhead ahead = {}) {
    enum { skip, clean, mixed };
    PvRuns<ROWS, NVW> runs(probs, probs_stride, 1, v, v_stride, alpha, acc, Dvp, ahead);
    auto flush = [&](int kind, std::int64_t from, std::int64_t to) {
      if (kind != skip) runs.add(from < first ? first : from, min_i64(to, last), kind == mixed);
    };
    int run_kind = -1;
    std::int64_t run_begin = first;
    // Whole aligned vectors: the columns they add outside [first, last) are computed
    // and hold zeros (excluded), which can only make a vector mixed, never wrong.
    for (std::int64_t c = first / W * W; c < last; c += W) {
      xsimd::batch_bool<float, Arch> all_zero(true), any_zero(false);
      for (int r = 0; r < ROWS; ++r) {
        const auto zero = batch::load_aligned(probs + r * probs_stride + c) == batch(0.0f);
        all_zero = all_zero && zero;
        any_zero = any_zero || zero;
      }
      const int kind = xsimd::all(all_zero) ? skip : xsimd::any(any_zero) ? mixed : clean;
      if (kind != run_kind) {
        if (run_kind >= 0) flush(run_kind, run_begin, c);
        run_kind = kind;
        run_begin = c;
      }
    }
    flush(run_kind, run_begin, last);
    runs.finish();
  }

  // P.V over keys [first, last) of a block as up to three runs: the keys that some row
  // excludes by its visible interval, [first, clean_begin) and [clean_end, last), take
  // the safe tile; the keys between, visible to every row, the plain one.
  template <int ROWS, int NVW = NV>
  static void pv_runs(const float* probs, std::int64_t probs_stride, std::int64_t key_stride, const KV* v,
                      std::int64_t v_stride, std::int64_t first, std::int64_t clean_begin, std::int64_t clean_end,
                      std::int64_t last, const float* alpha, float* acc, std::int64_t Dvp,
                      ValuesAhead ahead = {}) {
    clean_begin = clean_begin < first ? first : min_i64(clean_begin, last);
    clean_end = clean_end < clean_begin ? clean_begin : min_i64(clean_end, last);
    PvRuns<ROWS, NVW> runs(probs, probs_stride, key_stride, v, v_stride, alpha, acc, Dvp, ahead);
    runs.add(first, clean_begin, true);
    runs.add(clean_begin, clean_end, false);
    runs.add(clean_end, last, true);
    runs.finish();
  }

  static std::int64_t lo(const QueryBlockJob& job, std::int64_t i) { return visible_lo(job.visible, i); }
  static std::int64_t hi(const QueryBlockJob& job, std::int64_t i) { return visible_hi(job.visible, i); }

  // A sink joins a row's running max and sum (log2 units): top = max(max, sink2), sum' =
  // sum * 2^(max - top) + 2^(sink2 - top); `scale` = 2^(max - top) rescales what was
  // accumulated against the max. A NaN max counts as below the sink, so that its NaN
  // stays in the sum.
  struct SinkJoin {
    float top, sum, scale;
    bool sink_top;  // the sink is the larger
  };
  static SinkJoin join_sink(float row_max, float row_sum, float sink2) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    SinkJoin j;
    j.sink_top = !(row_max >= sink2);
    j.top = j.sink_top ? sink2 : row_max;
    j.scale = row_max == neg_inf ? 0.0f : exp2_nonpositive_scalar<Arch>(row_max - j.top);
    j.sum = row_sum * j.scale + exp2_nonpositive_scalar<Arch>(sink2 - j.top);
    return j;
  }

  // The columns of one row tile in one key block, relative to the block's first key j0.
  struct TileColumns {
    std::int64_t first;     // first visible key
    std::int64_t num_keys;  // keys [0, num_keys) may be visible
    std::int64_t c0, cols;  // computed: whole panels (packed K) or whole vectors (K in place)
  };

  // The keys the tile of rows [r0, r0 + MR) can see in the block [j0, block_end); false
  // when it sees none (the tile is skipped).
  static bool tile_columns(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, std::int64_t block_end,
                           TileColumns* t) {
    const std::int64_t G = job.q.heads_per_row;
    const std::int64_t tile_first = job.q.first_row + r0 / G;
    const std::int64_t tile_last = job.q.first_row + (min_i64(r0 + MR, job.q.rows) - 1) / G;
    const std::int64_t tile_begin = lo(job, tile_first) > j0 ? lo(job, tile_first) : j0;
    const std::int64_t tile_end = min_i64(block_end, hi(job, tile_last) + 1);
    if (tile_end <= tile_begin) return false;
    const std::int64_t unit = job.keys.k_panels ? NR : W;
    t->first = tile_begin - j0;
    t->num_keys = tile_end - j0;
    t->c0 = t->first / unit * unit;
    t->cols = (t->num_keys + unit - 1) / unit * unit;
    return true;
  }

  // The raw scores of the tile into job.state.scores, by the job's score kind.
  // Returns whether tile_max holds each row's maximum (the panel micro-kernel takes it).
  static bool raw_scores(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                         float* tile_max, PrefetchStream& ahead) {
    const std::int64_t D = job.dims.head_dim, Bk = job.dims.block_keys;
    float* const scores = job.state.scores + t.c0;
    const float* q = job.q.q_packed + r0 * D;
    const float* panels = job.keys.k_panels ? job.keys.k_panels + (j0 + t.c0 - job.keys.begin) * D : nullptr;
    const std::int64_t num_panels = (t.cols - t.c0) / NR;
    if (job.score.kind == ScoreKind::squared_distance) {
      scores_tile(q, D, D, panels, num_panels, scores, Bk, job.score.distance_factor, tile_max, DistanceStep{});
    } else if (job.score.kind == ScoreKind::additive) {
      const float* w = job.score.additive_weights;
      scores_tile(q, D, D, panels, num_panels, scores, Bk, 1.0f, tile_max,
                  [w](std::int64_t d, batch qv, batch kv, batch acc) {
                    return xsimd::fma(batch(w[d]), tanh_fast<Arch>(qv + kv), acc);
                  });
    } else if (panels) {
      scores_tile(q, D, D, panels, num_panels, scores, Bk, 1.0f, tile_max, DotStep{});
    } else {
      const KV* k = k_rows(job) + (j0 + t.c0 - job.keys.begin) * job.keys.k_row_stride;
      if constexpr (MR % 2 == 0) {
        if (padding_half(job, r0)) {  // the live rows only
          scores_tile_rows<MR / 2, kHalfKeysPerPass>(q, D, k, job.keys.k_row_stride, t.num_keys - t.c0,
                                                     t.cols - t.c0, scores, Bk, ahead);
          return false;
        }
      }
      scores_tile_rows<MR, kFullKeysPerPass>(q, D, k, job.keys.k_row_stride, t.num_keys - t.c0, t.cols - t.c0,
                                             scores, Bk, ahead);
    }
    return panels != nullptr;
  }

  // Whether the second half of the tile at r0 is padding while K is read in place
  // (decoding with 1 or 2 stacked rows on a 4-row tile: MHA, or 2 query heads per KV
  // head; any last tile at most half full). Such a tile scores, weighs and accumulates
  // its first half only: its padding rows get alpha 1, and their scores are neither
  // computed nor read (the epilogue, the softmax and the P.V tiles see live rows only).
  // The panel kernels (and the AMX and vdpbf16ps ones, which read panels only) score
  // every row.
  static bool padding_half(const QueryBlockJob& job, std::int64_t r0) {
    return MR % 2 == 0 && job.keys.k_rows != nullptr && job.q.rows - r0 <= MR / 2;
  }
  // Keys per pass of the half tile's scores: 4 (2 rows x 4 keys, the full tile's 8
  // chains), or 2 where 4 would not fit the registers with the keys and a query vector
  // (3 rows of a 6-row tile on 16 registers).
  static constexpr int kHalfKeysPerPass = (MR / 2) * 4 + 4 + 1 <= kVectorRegisters ? 4 : 2;
  // The same for a whole tile: 4 keys where MR x 4 accumulators, the keys and a query
  // vector fit the registers (AVX-512's 4- and 6-row tiles: 21 and 29 of 32), else 2. Per
  // pass the loop loads MR query vectors and KP keys for MR x KP FMAs, and runs the pass's
  // fixed work (zeroing, the first stages of the horizontal sums, prefetch requests) once:
  // with 2 keys the loads and that work held the S loop to about half the FMA rate. Zen 4,
  // avx512bf16, tools/ab_builds per-round medians against 2 keys (20 rounds): fp32 q over
  // bf16 K/V, 4 GQA rows, D = 128, 1.06 cold, 1.14 hot at 1 thread; D = 64 cold 1.20;
  // fp16 K/V cold 1.10; 6 rows 1.17; fp32 K/V cold 0.99 (bound by memory). The scores are
  // bitwise those of 2 keys per pass: each (row, key) chain and the order of the sums are
  // unchanged.
  static constexpr int kFullKeysPerPass = MR * 4 + 4 + 1 <= kVectorRegisters ? 4 : 2;

  // Per row of the tile, the exclusions by its visible interval, the running max
  // and sum, and the scores turned into probabilities in place; alpha[r] rescales the
  // row's accumulator. [clean_begin, clean_end) narrows to the keys every valid row sees.
  //
  // `weights` computes and stores a row's weights, weigh_row(s, c0, cols, shift, factor)
  // -> the vector whose lanes sum to the row's sum, NaN when a score is NaN (a NaN in q or
  // in a visible key's K row: the row's output is NaN, as in the oracle). FloatWeights
  // writes them as fp32 in place; a kernel whose P.V takes other weights (the AMX kernel's
  // bf16) may write those instead, elsewhere, and may leave the score factor to this pass
  // (Weights::scaled: the scores are raw, `factor` > 0 turns them into log2 units here,
  // one rounding per weight where the separate pass made two).
  //
  // Weights::lazy_max: a row that has a running max and sees all of the tile's columns is
  // first weighed against that max, without a max pass, and keeps it (alpha 1) when the
  // sum stays at most Weights::kLazyLimit; above it (a score well above the running max,
  // or an overflow) the row is weighed again the usual way, so the scores must survive
  // the first weighing. Weights relative to a stale max may exceed 1, by at most the
  // limit; a NaN sum is kept (the row is NaN either way).
  struct FloatWeights {
    static constexpr bool scaled = false, lazy_max = false;
    static batch weigh_row(float* s, std::int64_t c0, std::int64_t cols, float shift, float) {
      // exp2_nonpositive maps NaN to 0, so NaN scores are caught beside it: a sum of the
      // exponents is NaN exactly when one of them is (-inf stays -inf). One add per vector.
      const batch shift_v(shift);
      batch sum(0.0f), nan_probe(0.0f);
      for (std::int64_t j = c0; j < cols; j += W) {
        const batch x = batch::load_aligned(s + j) - shift_v;
        const batch p = exp2_nonpositive<Arch>(x);
        p.store_aligned(s + j);
        sum += p;
        nan_probe += x;
      }
      return xsimd::select(xsimd::isnan(nan_probe), nan_probe, sum);
    }
  };
  template <class Weights = FloatWeights>
  static void online_softmax(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                             const float* tile_max, bool have_tile_max, float* alpha, std::int64_t* clean_begin,
                             std::int64_t* clean_end, float factor = 1.0f, const Weights& weights = Weights{}) {
    assert(!Weights::scaled || (factor > 0.0f && !have_tile_max));
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t G = job.q.heads_per_row, Bk = job.dims.block_keys, c0 = t.c0, cols = t.cols;
    const batch iota = lane_indices();
    const int rows = padding_half(job, r0) ? MR / 2 : MR;
    for (int r = rows; r < MR; ++r) alpha[r] = 1.0f;
    for (int r = 0; r < rows; ++r) {
      float* s = job.state.scores + r * Bk;
      // Exclusions by the row's interval and the key range: everything outside
      // [visible_begin, visible_end) becomes -inf.
      // (No division where each row is its own query, as in prefill: a 64-bit idiv per
      // row and block was a visible part of the AMX kernel's per-row work.)
      const std::int64_t i = job.q.first_row + (G == 1 ? r0 + r : (r0 + r) / G);
      std::int64_t visible_begin = lo(job, i) - j0, visible_end = min_i64(t.num_keys, hi(job, i) + 1 - j0);
      if (visible_begin < c0) visible_begin = c0;
      if (visible_end < visible_begin) visible_end = visible_begin;
      if (r0 + r < job.q.rows) {
        if (visible_begin > *clean_begin) *clean_begin = visible_begin;
        *clean_end = min_i64(*clean_end, visible_end);
      }
      if constexpr (Weights::lazy_max) {
        const float running_max = job.state.row_max[r0 + r];
        if (running_max != neg_inf && visible_begin == c0 && visible_end == cols) {
          const float sum = xsimd::hadd(weights.weigh_row(s, c0, cols, running_max, factor));
          if (!(sum > Weights::kLazyLimit)) {
            alpha[r] = 1.0f;
            job.state.row_sum[r0 + r] += sum;
            continue;
          }
        }
      }
      float bm;
      if (have_tile_max && visible_begin == c0 && visible_end == cols) {
        bm = tile_max[r];  // nothing excluded, nothing added: the micro-kernel's max holds
      } else {
        // Whole vectors with a lane select: scalar stores read back by a vector load
        // would stall store-to-load forwarding (measured: 17% of a short decode).
        batch block_max(neg_inf);
        if (visible_begin == c0 && visible_end == cols) {
          for (std::int64_t j = c0; j < cols; j += W) block_max = xsimd::max(block_max, batch::load_aligned(s + j));
        } else {
          const batch first = batch(float(visible_begin)), past = batch(float(visible_end));  // exact below 2^24
          for (std::int64_t j = c0; j < cols; j += W) {
            const batch column = iota + batch(float(j));
            const batch x =
                xsimd::select(column >= first && column < past, batch::load_aligned(s + j), batch(neg_inf));
            x.store_aligned(s + j);
            block_max = xsimd::max(block_max, x);
          }
        }
        bm = reduce_max<Arch>(block_max);
      }
      if constexpr (Weights::scaled) bm *= factor;  // exact: rounding keeps the order (factor > 0)
      const float old_max = job.state.row_max[r0 + r];
      const float new_max = bm > old_max ? bm : old_max;
      // A row that has seen no key yet keeps max -inf; subtracting 0 then maps every
      // -inf score to weight 0 instead of NaN.
      const float shift = new_max == neg_inf ? 0.0f : new_max;
      // 2^0 is exactly 1: a row whose max did not grow skips the exponential.
      alpha[r] = old_max == shift ? 1.0f : exp2_nonpositive_scalar<Arch>(old_max - shift);
      const batch sum = weights.weigh_row(s, c0, cols, shift, factor);
      job.state.row_sum[r0 + r] = alpha[r] * job.state.row_sum[r0 + r] + xsimd::hadd(sum);
      job.state.row_max[r0 + r] = new_max;
    }
  }

  // O = alpha * O + P.V for the tile, over its visible keys; keys that some row
  // excludes keep their value rows out (see pv_tile's SAFE). The first P.V tile requests
  // `ahead`, the next block's V rows when decoding.
  static void accumulate_values(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                                const float* alpha, bool masked_out, std::int64_t clean_begin,
                                std::int64_t clean_end, ValuesAhead ahead) {
    const std::int64_t Dvp = job.dims.value_dim_padded;
    if constexpr (MR % 2 == 0) {
      if (padding_half(job, r0)) {  // the live half's rows, on as many vectors as they fill
        if (half_tile_wide(Dvp))
          values_of_rows<MR / 2, kHalfRowsVectors>(job, r0, j0, t, 0, alpha, masked_out, clean_begin, clean_end,
                                                   ahead);
        else
          values_of_rows<MR / 2, (kHalfRowsVectors + 1) / 2>(job, r0, j0, t, 0, alpha, masked_out, clean_begin,
                                                             clean_end, ahead);
        return;
      }
    }
    if constexpr (PR < MR) {
      if (Dvp < NV * W) {
        values_of_rows<MR, kWholeRowsVectors>(job, r0, j0, t, 0, alpha, masked_out, clean_begin, clean_end, ahead);
        return;
      }
    }
    // Rows past the job's are padding (a decoding tile of 4 rows for 1 to 3 stacked rows):
    // a P.V tile of padding only is skipped.
    for (int h = 0; h < MR && r0 + h < job.q.rows; h += PR, ahead = {})
      values_of_rows<PR, NV>(job, r0, j0, t, h, alpha, masked_out, clean_begin, clean_end, ahead);
  }

  // A P.V tile of PR < MR rows spans NV vectors (decoding's small kernel on AVX-512: 2 rows
  // x 8 vectors, one pass over a V row of 128 values). A value row narrower than NV vectors
  // would leave such tiles only their pairs of vectors (2 rows x 2 vectors at D = 64: 4
  // accumulator chains, too few for the FMA latency), so it takes all MR rows at once
  // instead, on the widest power of two of vectors whose MR-row tile fits the registers
  // (accumulators, the value vectors, one broadcast): 4 rows x 4 vectors on AVX-512.
  static constexpr int whole_rows_vectors() {
    int n = NV;
    while (n > 1 && MR * n + n + 1 > kVectorRegisters) n /= 2;
    return n;
  }
  static constexpr int kWholeRowsVectors = whole_rows_vectors();
  // The same for half the tile's rows (padding_half), up to 8 vectors: 2 rows x 8 vectors
  // on AVX-512, 2 x 4 on AVX2 and SSE2; 2 x 4 on AVX-512 when the value row is narrower.
  static constexpr int half_rows_vectors() {
    int n = 8;
    while (n > 1 && (MR / 2) * n + n + 1 > kVectorRegisters) n /= 2;
    return n;
  }
  static constexpr int kHalfRowsVectors = half_rows_vectors();
  // Whether a half tile's value row takes kHalfRowsVectors-wide P.V tiles (else half that).
  static bool half_tile_wide(std::int64_t Dvp) { return Dvp >= kHalfRowsVectors * W || kHalfRowsVectors < 2; }

  // accumulate_values for rows [h, h + ROWS) of the tile, on P.V tiles NVW vectors wide.
  template <int ROWS, int NVW>
  static void values_of_rows(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                             int h, const float* alpha, bool masked_out, std::int64_t clean_begin,
                             std::int64_t clean_end, ValuesAhead ahead) {
    const std::int64_t Bk = job.dims.block_keys, Dvp = job.dims.value_dim_padded;
    const KV* v_block = v_rows(job) + (j0 - job.keys.begin) * job.keys.v_row_stride;
    const float* probs = job.state.scores + h * Bk;
    float* acc = job.state.acc + (r0 + h) * Dvp;
    if (masked_out)  // masks exclude anywhere: classify the keys
      pv_classified<ROWS, NVW>(probs, Bk, v_block, job.keys.v_row_stride, t.first, t.num_keys, alpha + h, acc, Dvp,
                               ahead);
    else
      pv_runs<ROWS, NVW>(probs, Bk, 1, v_block, job.keys.v_row_stride, t.first, clean_begin, clean_end, t.num_keys,
                         alpha + h, acc, Dvp, ahead);
  }

  // The fused kernel on one job: per key block and row tile, raw scores, the score
  // epilogue (biases, transform, ALiBi, masks), the online softmax, and P.V.
  static void forward_query_block(const QueryBlockJob& job) { run_blocks<ForwardKernel>(job); }

  // forward_query_block's loop, with the two products taken from `Products`: this kernel,
  // or one derived from it that computes them otherwise (vdpbf16ps in
  // kernels/forward_pairs.hpp) and shares every other stage. (The AMX kernel,
  // kernels/forward_tiles.hpp, runs its own loop, which takes row tiles in pairs, on the
  // same stages: key_span, tile_columns, weigh_scores, finalize.) Its static functions:
  //   raw_scores(job, r0, j0, t, tile_max, ahead) -> whether tile_max holds the row maxima
  //   accumulate_values(job, r0, j0, t, alpha, masked_out, clean_begin, clean_end, ahead)
  template <class Products>
  static void run_blocks(const QueryBlockJob& job) {
    assert(job.q.rows > 0 && job.dims.block_keys % NR == 0);
    assert((job.keys.k_panels != nullptr) != (job.keys.k_rows != nullptr) || job.keys.begin == job.keys.end);
    assert(job.keys.k_panels || job.dims.head_dim % W == 0);
    const std::int64_t Bk = job.dims.block_keys;
    const std::int64_t rows_padded = (job.q.rows + MR - 1) / MR * MR;
    if (!job.state.resume) reset_state(job, rows_padded);
    const KeySpan span = key_span(job);

    // Decoding (K read in place): K rows requested kPrefetchKeys keys ahead of the keys
    // being scored, V rows a block ahead of the keys being weighed (see PrefetchStream).
    PrefetchStream ahead = prefetch_stream(job, span.start, span.end);
    for (std::int64_t j0 = span.start; j0 < span.end; j0 += Bk) {
      const std::int64_t block_end = min_i64(j0 + Bk, span.end);
      ValuesAhead next_values = values_ahead(job, j0, span.end);
      for (std::int64_t r0 = 0; r0 < rows_padded; r0 += MR) {
        TileColumns t;
        if (!tile_columns(job, r0, j0, block_end, &t)) continue;
        float tile_max[MR];
        const bool have_tile_max = Products::raw_scores(job, r0, j0, t, tile_max, ahead);
        TileWeights w;
        weigh_scores(job, r0, j0, t, tile_max, have_tile_max, &w);
        Products::accumulate_values(job, r0, j0, t, w.alpha, w.masked_out, w.clean_begin, w.clean_end, next_values);
        next_values = {};  // requested once per block
      }
    }

    if (job.state.finalize) finalize(job);
  }

  // The keys [start, end) of a job's key blocks: from the first key its first row sees
  // (on a panel boundary) to the last its last row sees; blocks no row can see are never
  // visited.
  struct KeySpan {
    std::int64_t start, end;
  };
  static KeySpan key_span(const QueryBlockJob& job) {
    const std::int64_t G = job.q.heads_per_row;
    const std::int64_t key_end = min_i64(job.keys.end, job.visible.key_limit);
    const std::int64_t first_query = job.q.first_row, last_query = job.q.first_row + (job.q.rows - 1) / G;
    const std::int64_t begin = lo(job, first_query) > job.keys.begin ? lo(job, first_query) : job.keys.begin;
    const std::int64_t end = min_i64(key_end, hi(job, last_query) + 1);
    const std::int64_t start =
        begin <= job.keys.begin ? job.keys.begin : job.keys.begin + (begin - job.keys.begin) / NR * NR;
    return {start, end};
  }

  // A tile's raw scores (in job.state.scores) turned into weights: the score terms (masks,
  // softcap, ALiBi), then the online softmax.
  struct TileWeights {
    float alpha[MR];                      // rescales each row's accumulator
    bool masked_out;                      // a mask excluded some key of the tile
    std::int64_t clean_begin, clean_end;  // the keys every valid row sees
  };
  template <class Weights = FloatWeights>
  static void weigh_scores(const QueryBlockJob& job, std::int64_t r0, std::int64_t j0, const TileColumns& t,
                           const float* tile_max, bool have_tile_max, TileWeights* w, float factor = 1.0f,
                           const Weights& weights = Weights{}) {
    w->masked_out = false;
    if (job.score.key_bias || job.score.row_bias || job.score.natural_units) {
      w->masked_out = score_epilogue(job, r0, j0, t.c0, t.cols);
      have_tile_max = false;
    }
    w->clean_begin = t.first;
    w->clean_end = t.num_keys;
    online_softmax<Weights>(job, r0, j0, t, tile_max, have_tile_max, w->alpha, &w->clean_begin, &w->clean_end,
                            factor, weights);
  }

  // out = acc / sum and lse for the job's rows; rows that saw no key get empty_value.
  // A sink joins the denominator here: sum' = sum * 2^(max - max') + 2^(sink - max'),
  // max' = max(max, sink) (log2 units), and acc scales by 2^(max - max') with it.
  static void finalize(const QueryBlockJob& job) {
    const std::int64_t G = job.q.heads_per_row, Dvp = job.dims.value_dim_padded;
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t Dv = job.dims.value_dim;
    for (std::int64_t r = 0, i = 0, g = 0; r < job.q.rows; ++r) {  // row r is query i, head g
      // sum is 0 exactly when the row saw no key (and has no sink); a NaN sum (a NaN
      // score) is not empty: it makes the row NaN, as in the oracle.
      float sum = job.state.row_sum[r], row_max = job.state.row_max[r], scale = 1.0f;
      // lse = top + log(sum) in natural units, with top the larger of the row's max and
      // its sink: taken from the sink itself when it is the larger, so that a sink beyond
      // FLT_MAX / log2(e) (whose log2 units saturate below) still gives its exact lse.
      float top_natural = row_max * 0.6931471805599453f;
      const float sink = job.output.sinks ? job.output.sinks[g] : neg_inf;
      if (sink != neg_inf) {
        const SinkJoin joined = join_sink(row_max, sum, log2_units(sink));
        scale = joined.scale;
        sum = joined.sum;
        if (joined.sink_top) top_natural = sink;
      }
      const bool empty = sum == 0.0f;
      const std::int64_t offset = i * job.output.out_row_stride + g * job.output.out_head_stride;
      if (Dv > 0 && job.output.out_type != DType::f32) {
        // 16-bit output: normalized in place (the state is finished), rounded once.
        float* acc = job.state.acc + r * Dvp;
        const float inv = empty ? 0.0f : scale / sum;
        for (std::int64_t c = 0; c < Dv; ++c) acc[c] = empty ? job.output.empty_value : acc[c] * inv;
        store_values(acc, Dv, job.output.out_type, job.output.out, offset, job.output.out_col_stride);
      } else if (Dv > 0) {  // with Dv = 0 out may be null: only lse is written
        float* out = static_cast<float*>(job.output.out) + offset;
        const float* acc = job.state.acc + r * Dvp;
        const float inv = empty ? 0.0f : scale / sum;
        if (empty) {
          for (std::int64_t c = 0; c < Dv; ++c) out[c * job.output.out_col_stride] = job.output.empty_value;
        } else if (job.output.out_col_stride == 1) {
          std::int64_t c = 0;
          for (; c + W <= Dv; c += W) (batch::load_aligned(acc + c) * batch(inv)).store_unaligned(out + c);
          for (; c < Dv; ++c) out[c] = acc[c] * inv;
        } else {
          for (std::int64_t c = 0; c < Dv; ++c) out[c * job.output.out_col_stride] = acc[c] * inv;
        }
      }
      // A row with no visible key but a sink: sum = 1 and lse is the sink itself, exactly.
      if (job.output.lse)
        job.output.lse[i * job.output.lse_row_stride + g * job.output.lse_head_stride] =
            empty ? neg_inf : top_natural + log2_scalar(sum) * 0.6931471805599453f;
      if (++g == G) {
        g = 0;
        ++i;
      }
    }
  }

  static void reset_state(const QueryBlockJob& job, std::int64_t rows_padded) {
    for (std::int64_t i = 0; i < rows_padded * job.dims.value_dim_padded; ++i) job.state.acc[i] = 0.0f;
    for (std::int64_t r = 0; r < rows_padded; ++r) {
      job.state.row_max[r] = -std::numeric_limits<float>::infinity();
      job.state.row_sum[r] = 0.0f;
    }
  }

  // The prefetch stream over keys [start, end) of a job that reads K in place (else none),
  // already kPrefetchKeys keys ahead: K rows of every key, V rows of the first block, then
  // those of the first keys of the thread's next item (JobKeys::next_k_rows).
  static PrefetchStream prefetch_stream(const QueryBlockJob& job, std::int64_t start, std::int64_t end) {
    PrefetchStream ahead;
    if (!job.keys.k_rows || start >= end) return ahead;
    ahead.k = reinterpret_cast<const char*>(k_rows(job) + (start - job.keys.begin) * job.keys.k_row_stride);
    ahead.v = reinterpret_cast<const char*>(v_rows(job) + (start - job.keys.begin) * job.keys.v_row_stride);
    constexpr std::int64_t bytes = sizeof(KV);
    // One key in all: its dimension's stride is never stepped and may be any size (as
    // large as 2^62: validation bounds only the strides of dimensions longer than one).
    ahead.k_stride = job.dims.kv_len > 1 ? job.keys.k_row_stride * bytes : 0;
    ahead.v_stride = job.dims.kv_len > 1 ? job.keys.v_row_stride * bytes : 0;
    ahead.k_bytes = job.dims.head_dim * bytes;
    ahead.v_bytes = job.dims.value_dim * bytes;
    ahead.k_left = end - start;
    ahead.v_left = values_with_keys(job) ? end - start : min_i64(job.dims.block_keys, end - start);
    if (job.keys.next_k_rows && job.keys.next_keys > 0) {
      ahead.next_k = static_cast<const char*>(job.keys.next_k_rows);
      ahead.next_v = static_cast<const char*>(job.keys.next_v_rows);
      ahead.next_left = min_i64(job.keys.next_keys, kPrefetchKeys);
    }
    for (std::int64_t j = 0; j < kPrefetchKeys; ++j) ahead.step();
    return ahead;
  }

  // Whether the stream requests every key's V row with its K row, not only the first
  // block's: for a job of one row tile whose P.V tiles read whole value rows (no
  // values_ahead), where else only the hardware prefetcher fetched V. Zen 5, cold,
  // tools/ab_builds per-round medians against the first block's only, in both orders:
  // fp32 q over bf16 K/V, 32/8 heads, D = 64, M = 16384, 1.07-1.16 at 2 threads and
  // 1.09-1.11 at one, fp16 K/V 1.06; at D = 96 and 128, fp32 K/V, and 1 or 2 rows per
  // tile, 0.94-1.09 with no sign that held in both orders. Requested so for every job,
  // 16 stacked bf16 rows (several tiles, more arithmetic per key) ran 0.89-0.96.
  static bool values_with_keys(const QueryBlockJob& job) {
    return job.q.rows <= MR && whole_value_rows(job);
  }
  // Whether the job's P.V tiles read each value row whole, in one pass.
  static bool whole_value_rows(const QueryBlockJob& job) {
    return job.dims.value_dim_padded <= value_tile_vectors(job) * W;
  }

  // The V rows that block [j0, j0 + block_keys) requests for the next one, up to `end`,
  // when decoding (a job that reads K in place); else none.
  // None when a P.V tile spans the whole value row: its first pass then reads the V rows
  // in order, a stream the hardware prefetcher follows, and software requests only added
  // to its traffic (Zen 5, fp16 V, D = 128, 2 x 8-vector tiles: 1.04-1.08x faster
  // without them). Rows read in column passes skip ahead of the prefetcher and need them.
  static ValuesAhead values_ahead(const QueryBlockJob& job, std::int64_t j0, std::int64_t end) {
    const std::int64_t Bk = job.dims.block_keys;
    if (!job.keys.k_rows || j0 + Bk >= end || whole_value_rows(job)) return {};
    return {Bk * job.keys.v_row_stride * std::int64_t(sizeof(KV)), min_i64(Bk, end - j0 - Bk)};
  }
  // The width, in vectors, of the P.V tiles that read the job's V rows (accumulate_values):
  // NV, or kWholeRowsVectors when a 16-bit value row narrower than NV vectors takes all
  // rows at once (D = 96: 4 + 2 vectors, two column passes, so requests: bf16 K/V 32/8
  // heads M = 16384, tools/ab_builds cold, 1.049 and 1.064 against none; fp16 at D = 80
  // 1.029). The half tiles keep NV: fp32 1 or 2 rows at D = 128 on 2 x 8 tiles ran
  // 0.97-0.985x without requests (same method).
  static int value_tile_vectors(const QueryBlockJob& job) {
    return PR < MR && job.dims.value_dim_padded < NV * W ? kWholeRowsVectors : NV;
  }

  // qt[d][r] = rows[r][d] for W rows of D floats (row stride D, a multiple of W: the
  // lanes kernel reads K in place, which needs whole vectors), one W x W block at a time
  // in registers. Each block is log2(W) rounds of interleaving pairs of vectors. Gathers
  // (one per column) had cost a quarter of a 16-query decode over 16 keys on Zen 5.
  static void transpose_rows(const float* rows, std::int64_t D, float* qt) {
    for (std::int64_t d0 = 0; d0 < D; d0 += W) {
      const float* in = rows + d0;
      float* out = qt + d0 * W;
      if constexpr (std::is_same<Arch, xsimd::avx512bw>::value) {
        __m512 a[16], b[16];
        for (int r = 0; r < 16; ++r) a[r] = _mm512_loadu_ps(in + r * D);
        // Per 128-bit lane k: b[2i] = rows 2i, 2i+1 at columns 4k, 4k+1 (interleaved);
        // b[2i+1] the same at columns 4k+2, 4k+3.
        for (int i = 0; i < 8; ++i) {
          b[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
          b[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
        }
        // a[4i + c], lane k: rows 4i .. 4i+3 of column 4k + c.
        for (int i = 0; i < 4; ++i) {
          const __m512d e0 = _mm512_castps_pd(b[4 * i]), e1 = _mm512_castps_pd(b[4 * i + 1]);
          const __m512d e2 = _mm512_castps_pd(b[4 * i + 2]), e3 = _mm512_castps_pd(b[4 * i + 3]);
          a[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(e0, e2));
          a[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(e0, e2));
          a[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(e1, e3));
          a[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(e1, e3));
        }
        for (int c = 0; c < 4; ++c) {
          // Lanes (rows 0-3 of columns c, c+8; rows 4-7 of c, c+8), and of c+4, c+12;
          // the same for rows 8-15.
          const __m512 lo_even = _mm512_shuffle_f32x4(a[c], a[4 + c], 0x88);
          const __m512 lo_odd = _mm512_shuffle_f32x4(a[c], a[4 + c], 0xdd);
          const __m512 hi_even = _mm512_shuffle_f32x4(a[8 + c], a[12 + c], 0x88);
          const __m512 hi_odd = _mm512_shuffle_f32x4(a[8 + c], a[12 + c], 0xdd);
          _mm512_store_ps(out + c * 16, _mm512_shuffle_f32x4(lo_even, hi_even, 0x88));
          _mm512_store_ps(out + (c + 8) * 16, _mm512_shuffle_f32x4(lo_even, hi_even, 0xdd));
          _mm512_store_ps(out + (c + 4) * 16, _mm512_shuffle_f32x4(lo_odd, hi_odd, 0x88));
          _mm512_store_ps(out + (c + 12) * 16, _mm512_shuffle_f32x4(lo_odd, hi_odd, 0xdd));
        }
      } else if constexpr (W == 8) {  // AVX2
        __m256 a[8], b[8];
        for (int r = 0; r < 8; ++r) a[r] = _mm256_loadu_ps(in + r * D);
        for (int i = 0; i < 4; ++i) {
          b[2 * i] = _mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]);
          b[2 * i + 1] = _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]);
        }
        // a[4h + c], 128-bit lane k: rows 4h .. 4h+3 of column 4k + c.
        for (int h = 0; h < 2; ++h) {
          a[4 * h] = _mm256_shuffle_ps(b[4 * h], b[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
          a[4 * h + 1] = _mm256_shuffle_ps(b[4 * h], b[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
          a[4 * h + 2] = _mm256_shuffle_ps(b[4 * h + 1], b[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
          a[4 * h + 3] = _mm256_shuffle_ps(b[4 * h + 1], b[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int c = 0; c < 4; ++c) {
          _mm256_store_ps(out + c * 8, _mm256_permute2f128_ps(a[c], a[4 + c], 0x20));
          _mm256_store_ps(out + (c + 4) * 8, _mm256_permute2f128_ps(a[c], a[4 + c], 0x31));
        }
      } else {  // SSE2: element by element (the 4 x 4 transposes measured no faster)
        for (int r = 0; r < W; ++r)
          for (std::int64_t d = 0; d < W; ++d) out[d * W + r] = in[r * D + d];
      }
    }
  }

  // KB scores of the W query rows of a lane tile against KB keys read in place:
  // out[t][lane] = sum_d k[t][d] * qt[d][lane], one accumulator chain per key.
  template <int KB>
  static void lanes_scores(const float* qt, std::int64_t D, const float* k, std::int64_t k_stride, float* out) {
    batch acc[KB];
    for (int t = 0; t < KB; ++t) acc[t] = batch(0.0f);
    for (std::int64_t d = 0; d < D; ++d) {
      const batch qv = batch::load_aligned(qt + d * W);
      for (int t = 0; t < KB; ++t) acc[t] = xsimd::fma(batch(k[t * k_stride + d]), qv, acc[t]);
    }
    for (int t = 0; t < KB; ++t) acc[t].store_aligned(out + t * W);
  }

  // Decoding with at least W query rows (stacked heads and queries) against K rows read
  // in place, plain dot-product scores: the rows are the W lanes of a vector. Q is
  // transposed once per call (head_dim rows of W floats per W query rows), each key's
  // scores for all W rows come from broadcasts of that key's elements (no horizontal
  // sums), and the online softmax runs on whole vectors of rows. Handles exclusions
  // (causal, window); not masks, biases or transforms. Key blocks are the outer loop and
  // groups of W rows the inner one, so a block's K and V serve every group while they
  // are in cache. Scratch: job.state.scores holds block_keys x W scores, then head_dim x
  // rows_padded of transposed Q (head_dim x W per group). fp32 K only (see variant.hpp).
  static void forward_lanes_block(const QueryBlockJob& job) {
    static_assert(std::is_same<KV, float>::value, "the lanes kernel reads fp32 K");
    assert(job.keys.k_panels == nullptr && (job.keys.k_rows != nullptr || job.keys.begin == job.keys.end) &&
           "lanes read K in place");
    assert(job.dims.head_dim % W == 0);
    assert(!job.score.natural_units && !job.score.key_bias && !job.score.row_bias && !job.masks.mask &&
           !job.masks.bool_mask && job.score.kind == ScoreKind::dot && "lanes take plain dot products only");
    constexpr int KB = 8;  // keys per S step: 8 FMA chains of latency 4 at 2 FMAs per cycle
    constexpr int PV_ROWS = 4;
    static_assert(W % PV_ROWS == 0, "the P.V tiles split the lanes evenly");
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t D = job.dims.head_dim, G = job.q.heads_per_row, Dvp = job.dims.value_dim_padded, Bk = job.dims.block_keys;
    const std::int64_t rows_padded = (job.q.rows + W - 1) / W * W;
    if (!job.state.resume) reset_state(job, rows_padded);
    // Only the keys some row can see: [lo of the first query, hi of the last one]. A
    // sliding window then reads its window, not the whole cache.
    const std::int64_t first_query = job.q.first_row, last_query = job.q.first_row + (job.q.rows - 1) / G;
    std::int64_t begin = job.keys.begin, end = min_i64(job.keys.end, job.visible.key_limit);
    if (job.visible.has_lo && first_query + job.visible.lo_offset > begin) begin = first_query + job.visible.lo_offset;
    if (job.visible.has_hi) end = min_i64(end, last_query + job.visible.hi_offset + 1);
    float* const st = job.state.scores;                   // [Bk][W]
    float* const qt_all = job.state.scores + Bk * W;         // per group of W rows: [D][W]
    PrefetchStream ahead = prefetch_stream(job, begin, end);
    for (std::int64_t r0 = 0; r0 < rows_padded; r0 += W) transpose_rows(job.q.q_packed + r0 * D, D, qt_all + r0 * D);

    for (std::int64_t j0 = begin; j0 < end; j0 += Bk) {
      const std::int64_t n = min_i64(Bk, end - j0);
      const float* k = k_rows(job) + (j0 - job.keys.begin) * job.keys.k_row_stride;
      const std::int64_t k_stride = job.keys.k_row_stride;
      const KV* v_block = v_rows(job) + (j0 - job.keys.begin) * job.keys.v_row_stride;
      // The first group's P.V tiles request the next block's V rows (see PrefetchStream),
      // and its S steps K's request stream.
      ValuesAhead next_values = values_ahead(job, j0, end);
      for (std::int64_t r0 = 0; r0 < rows_padded; r0 += W) {
        const float* qt = qt_all + r0 * D;
        alignas(64) float alpha[W];
        // Keys in [clean_first, clean_past) are visible to every valid lane; P.V keeps the
        // others' value rows out (see pv_tile's SAFE).
        const std::int64_t valid = min_i64(W, job.q.rows - r0);
        const std::int64_t lane_first = job.q.first_row + r0 / G, lane_last = job.q.first_row + (r0 + valid - 1) / G;
        const std::int64_t clean_first = job.visible.has_lo ? lane_last + job.visible.lo_offset : begin;
        const std::int64_t clean_past = job.visible.has_hi ? lane_first + job.visible.hi_offset + 1 : end;
        batch m = batch::load_unaligned(job.state.row_max + r0), l = batch::load_unaligned(job.state.row_sum + r0);
        std::int64_t t = 0;
        for (; t + KB <= n; t += KB) {
          if (r0 == 0)
            for (int u = 0; u < KB; ++u) ahead.step();
          lanes_scores<KB>(qt, D, k + t * k_stride, k_stride, st + t * W);
        }
        for (; t < n; ++t) {
          if (r0 == 0) ahead.step();
          lanes_scores<1>(qt, D, k + t * k_stride, k_stride, st + t * W);
        }
        // Each lane's visible keys [lo, hi], relative to this block and clamped to
        // [-1, n]: small integers, exact in float whatever M is (absolute key indices
        // are exact only below 2^24).
        alignas(64) float lane_lo[W], lane_hi[W];
        for (int r = 0; r < W; ++r) {
          const std::int64_t i = job.q.first_row + (r0 + r) / G;
          const std::int64_t lo_rel = job.visible.has_lo ? i + job.visible.lo_offset - j0 : -1;
          const std::int64_t hi_rel = job.visible.has_hi ? i + job.visible.hi_offset - j0 : n;
          lane_lo[r] = float(lo_rel < -1 ? -1 : min_i64(lo_rel, n));
          lane_hi[r] = float(hi_rel < -1 ? -1 : min_i64(hi_rel, n));
        }
        const batch first_key = batch::load_aligned(lane_lo), last_key = batch::load_aligned(lane_hi);
        batch block_max(neg_inf);
        for (t = 0; t < n; ++t) {
          batch x = batch::load_aligned(st + t * W);
          if (job.visible.has_lo || job.visible.has_hi) {
            const batch key = batch(float(t));
            xsimd::batch_bool<float, Arch> visible(true);
            if (job.visible.has_lo) visible = visible && key >= first_key;
            if (job.visible.has_hi) visible = visible && key <= last_key;
            x = xsimd::select(visible, x, batch(neg_inf));
            x.store_aligned(st + t * W);
          }
          block_max = xsimd::max(block_max, x);
        }
        const batch new_max = xsimd::max(m, block_max);
        // Rows that have seen no key keep max -inf; a shift of 0 maps their scores to 0.
        const batch shift = xsimd::select(new_max == batch(neg_inf), batch(0.0f), new_max);
        const batch a = exp2_nonpositive<Arch>(m - shift);
        batch sum(0.0f), nan_probe(0.0f);  // NaN scores make the row sum NaN (see forward_query_block)
        for (t = 0; t < n; ++t) {
          const batch x = batch::load_aligned(st + t * W) - shift;
          const batch p = exp2_nonpositive<Arch>(x);
          p.store_aligned(st + t * W);
          sum += p;
          nan_probe += x;
        }
        sum = xsimd::select(xsimd::isnan(nan_probe), nan_probe, sum);
        l = xsimd::fma(a, l, sum);
        m = new_max;
        a.store_aligned(alpha);
        for (int h = 0; h < W; h += PV_ROWS, next_values = {})
          pv_runs<PV_ROWS>(st + h, 1, W, v_block, job.keys.v_row_stride, 0, clean_first - j0, clean_past - j0, n,
                           alpha + h, job.state.acc + (r0 + h) * Dvp, Dvp, next_values);
        m.store_unaligned(job.state.row_max + r0);
        l.store_unaligned(job.state.row_sum + r0);
      }
    }
    if (job.state.finalize) finalize(job);
  }
};

}  // namespace flashcpu::detail::FLASHCPU_ISA_NAMESPACE
