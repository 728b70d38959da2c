// Vector math for the kernels, templated on the xsimd architecture. Included only from
// kernels/forward.hpp, inside that file's per-ISA namespace, so each ISA gets its own
// copy of every helper (no inline function is shared between differently-flagged TUs).

// 2^x for x <= 0 as the online softmax uses it (scores minus the running max).
// Range reduction x = n + f with n = round(x), f in [-1/2, 1/2]; 2^f by a degree-6
// Taylor polynomial of e^(f ln 2), whose truncation error (ln2/2)^7/7! ~ 1.2e-7 is
// about one float ulp; 2^n is built in the exponent bits. Inputs below -127 (and
// -inf) give exactly 0, which the masking relies on: exp2(-inf - m) must be 0.
template <class Arch>
inline xsimd::batch<float, Arch> exp2_nonpositive(xsimd::batch<float, Arch> x) {
  using batch = xsimd::batch<float, Arch>;
  using ibatch = xsimd::batch<std::int32_t, Arch>;
  x = xsimd::min(xsimd::max(x, batch(-127.0f)), batch(127.0f));
  const batch n = xsimd::nearbyint(x);
  const batch f = x - n;
  batch p(1.5403530393381608e-4f);
  p = xsimd::fma(p, f, batch(1.3333558146428443e-3f));
  p = xsimd::fma(p, f, batch(9.6181291076284772e-3f));
  p = xsimd::fma(p, f, batch(5.5504108664821580e-2f));
  p = xsimd::fma(p, f, batch(2.4022650695910071e-1f));
  p = xsimd::fma(p, f, batch(6.9314718055994531e-1f));
  p = xsimd::fma(p, f, batch(1.0f));
  // n = -127 gives a zero exponent field: the product is 0, not a denormal.
  const ibatch biased = (xsimd::to_int(n) + ibatch(127)) << 23;
  return p * xsimd::bitwise_cast<batch>(biased);
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

template <class Arch>
inline float reduce_max(xsimd::batch<float, Arch> b) {
  alignas(64) float lanes[xsimd::batch<float, Arch>::size];
  b.store_aligned(lanes);
  float m = lanes[0];
  for (std::size_t i = 1; i < xsimd::batch<float, Arch>::size; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}
