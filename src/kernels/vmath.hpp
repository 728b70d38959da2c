// Vector math for the kernels, templated on the xsimd architecture. Included only from
// kernels/forward.hpp, inside that file's per-ISA namespace, so each ISA gets its own
// copy of every helper (no inline function is shared between differently-flagged TUs).

// 2^f for f in [-1/2, 1/2] (see exp2_nonpositive).
template <class Arch>
inline xsimd::batch<float, Arch> exp2_fraction(xsimd::batch<float, Arch> f) {
  using batch = xsimd::batch<float, Arch>;
  batch p(1.5403530393381608e-4f);
  p = xsimd::fma(p, f, batch(1.3333558146428443e-3f));
  p = xsimd::fma(p, f, batch(9.6181291076284772e-3f));
  p = xsimd::fma(p, f, batch(5.5504108664821580e-2f));
  p = xsimd::fma(p, f, batch(2.4022650695910071e-1f));
  p = xsimd::fma(p, f, batch(6.9314718055994531e-1f));
  return xsimd::fma(p, f, batch(1.0f));
}

// 2^f for f in [-1/2, 1/2] to about 3e-6 relative: a degree-4 polynomial fitted to
// 2^f's relative error on Chebyshev nodes (max 2.7e-6 on a 20001-point grid), for weights
// that are rounded to bf16 next (2^-9 relative), where the degree-6 one's last two terms
// change nothing that survives the rounding.
template <class Arch>
inline xsimd::batch<float, Arch> exp2_fraction_for_bf16(xsimd::batch<float, Arch> f) {
  using batch = xsimd::batch<float, Arch>;
  batch p(9.560510206679456e-3f);
  p = xsimd::fma(p, f, batch(5.591703917490383e-2f));
  p = xsimd::fma(p, f, batch(2.4024981109531754e-1f));
  p = xsimd::fma(p, f, batch(6.931219676960554e-1f));
  return xsimd::fma(p, f, batch(9.999991908565864e-1f));
}

// 2^x for x <= 0 as the online softmax uses it (scores minus the running max).
// Range reduction x = n + f with n = round(x), f in [-1/2, 1/2]; 2^f by a degree-6
// Taylor polynomial of e^(f ln 2), whose truncation error (ln2/2)^7/7! ~ 1.2e-7 is
// about one float ulp; 2^n is built in the exponent bits. Inputs below -127 (and
// -inf) give exactly 0, which the masking relies on: exp2(-inf - m) must be 0. NaN
// gives 0 (the softmax probes for it beside).
//
// `ForBf16Weights`: for weights rounded to bf16 next, exp2_fraction_for_bf16's shorter
// polynomial, and NaN gives NaN, so that a NaN score makes the row's sum NaN without a
// probe beside it. Positive x is allowed too (weights against a lazy max): 2^x up to
// 2^127, and inf or 2^127 above (either is far past the lazy limit that sends the row back).
template <class Arch, bool ForBf16Weights = false>
inline xsimd::batch<float, Arch> exp2_nonpositive(xsimd::batch<float, Arch> x) {
  using batch = xsimd::batch<float, Arch>;
  using ibatch = xsimd::batch<std::int32_t, Arch>;
  const auto fraction = [](batch f) {
    if constexpr (ForBf16Weights)
      return exp2_fraction_for_bf16<Arch>(f);
    else
      return exp2_fraction<Arch>(f);
  };
  if constexpr (std::is_same<Arch, xsimd::avx512bw>::value) {
    // AVX-512 has the reduction and the scaling as single instructions (not in xsimd
    // 8.1): f = x - round(x) by vreduceps, p * 2^n by vscalefps, and the zero below -127
    // by a zero-masked scalef. 10 operations instead of 13, same polynomial, same results
    // for x > -127 (the scaling is exact for results in the normal range). Live lanes:
    // x > -127, and for bf16 weights also NaN (unordered), which the arithmetic carries.
    const __m512 xr = x;
    const __mmask16 live =
        _mm512_cmp_ps_mask(xr, _mm512_set1_ps(-127.0f), ForBf16Weights ? _CMP_NLE_UQ : _CMP_GT_OQ);
    const __m512 f = _mm512_reduce_ps(xr, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 n = _mm512_sub_ps(xr, f);
    return _mm512_maskz_scalef_ps(live, fraction(batch(f)), n);
  }
  batch y = xsimd::max(x, batch(-127.0f));  // x <= 0 by contract: no upper clamp
  if constexpr (ForBf16Weights) y = xsimd::min(y, batch(127.0f));
  const batch n = xsimd::nearbyint(y);
  // n = -127 gives a zero exponent field: the product is 0, not a denormal.
  const ibatch biased = (xsimd::to_int(n) + ibatch(127)) << 23;
  const batch p = fraction(y - n) * xsimd::bitwise_cast<batch>(biased);
  if constexpr (ForBf16Weights) return xsimd::select(xsimd::isnan(x), x, p);
  return p;
}

// The same function on one float, used for the per-row rescale factor alpha, so that
// scalar and vector paths agree bit for bit on equal inputs.
template <class Arch>
inline float exp2_nonpositive_scalar(float x) {
  using batch = xsimd::batch<float, Arch>;
  alignas(64) float lanes[batch::size];
  exp2_nonpositive<Arch>(batch(x)).store_aligned(lanes);
  return lanes[0];
}

// Keeps a loaded vector in a register: GCC otherwise folds a load used by several FMAs
// into each of them as a memory operand, and a loop whose FMAs all read memory runs out
// of load ports before FMA units (the in-place decode S loop: 10 loads per 8 FMAs).
template <class Arch>
inline void keep_in_register(xsimd::batch<float, Arch>& b) {
  asm("" : "+v"(b.data));
}

template <class Arch>
inline float reduce_max(xsimd::batch<float, Arch> b) {
  if constexpr (std::is_same<Arch, xsimd::avx512bw>::value) return _mm512_reduce_max_ps(b);  // not in xsimd 8.1
  alignas(64) float lanes[xsimd::batch<float, Arch>::size];
  b.store_aligned(lanes);
  float m = lanes[0];
  for (std::size_t i = 1; i < xsimd::batch<float, Arch>::size; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}

// The lane sums of W vectors that come two at a time (vectors 2k and 2k + 1 by
// add(k, a, b), k = 0 .. W/2 - 1 in order): sums() gives the W sums in order. xsimd 8.1's
// haddp returns the lanes in the wrong order on AVX-512 (its float version), so that ISA
// gets its own transpose-and-add tree, whose first two stages run as the pairs come: it
// keeps 4 vectors per 16 instead of 16 (the decoding kernel's S, kernels/forward.hpp).
template <class Arch>
class PairSums {
  using batch = xsimd::batch<float, Arch>;

 public:
  void add(int k, batch a, batch b) {
    rows_[2 * k] = a;
    rows_[2 * k + 1] = b;
  }
  batch sums() const { return xsimd::haddp(rows_); }

 private:
  batch rows_[batch::size];
};

#if defined(__AVX512F__)
template <>
class PairSums<xsimd::avx512bw> {
 public:
  void add(int k, __m512 a, __m512 b) {
    // Stage 1, vectors 2k and 2k + 1; per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3].
    const __m512 t = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    // Stage 2, two such: per 128-bit lane, that lane's sums of vectors 4m .. 4m+3.
    if (k % 2 == 0)
      pending_ = t;
    else
      quads_[k / 2] = _mm512_add_ps(_mm512_shuffle_ps(pending_, t, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(pending_, t, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Stage 3: the 16 sums in order.
  __m512 sums() const {
    const __m512* u = quads_;
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
  }

 private:
  __m512 pending_, quads_[4];
};
#endif

// tanh for the additive score and soft-capping. xsimd's tanh, which is accurate to a
// few ulp; kept behind one name so a faster approximation can be swapped in here.
template <class Arch>
inline xsimd::batch<float, Arch> tanh_fast(xsimd::batch<float, Arch> x) {
  return xsimd::tanh(x);
}

// x (natural-log units) times log2(e), a finite x kept finite: a sink or an lse beyond
// FLT_MAX / log2(e) would overflow to -inf and read as "nothing". -inf and NaN stay.
inline float log2_units(float x) {
  constexpr float lowest = std::numeric_limits<float>::lowest(), highest = std::numeric_limits<float>::max();
  if (x == -std::numeric_limits<float>::infinity()) return x;
  const float y = x * 1.4426950408889634f;
  return y < lowest ? lowest : y > highest ? highest : y;
}

// log2 of a positive float, for the log-sum-exp output (once per row). The builtin calls
// libm's log2f directly: no inline std:: wrapper that differently-flagged TUs would share.
inline float log2_scalar(float x) { return __builtin_log2f(x); }
