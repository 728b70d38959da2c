// The element types kernels read, and their widening to fp32. Included only from
// kernels/forward.hpp, inside that file's per-variant namespace (see vmath.hpp).
//
// bf16 is the top half of an fp32: widening is a 16-bit shift, exact. fp16 widens
// exactly too: by F16C's vcvtph2ps on AVX2 and AVX-512, by integer arithmetic on SSE2
// (no fp32 denormal on the way, so flush-to-zero and denormals-are-zero do not apply).

using f32 = float;
struct bf16 { std::uint16_t bits; };  // layout of flashcpu::bf16
struct f16 { std::uint16_t bits; };   // layout of flashcpu::fp16

inline float widen_scalar(float x) { return x; }
inline float widen_scalar(bf16 x) {
  const std::uint32_t bits = std::uint32_t(x.bits) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
inline float widen_scalar(f16 x) {
#ifdef __F16C__
  return _cvtsh_ss(x.bits);
#else
  // Normal: the magnitude bits shifted into an fp32's place, exponent rebiased (127
  // against 15); subnormal: mantissa * 2^-24, a normal float; inf and NaN keep an
  // all-ones exponent and their payload.
  const std::uint32_t magnitude = x.bits & 0x7fffu, sign = std::uint32_t(x.bits & 0x8000u) << 16;
  if (magnitude < 0x0400u) {
    const float f = float(magnitude) * 0x1p-24f;
    return sign ? -f : f;
  }
  const std::uint32_t bits =
      sign | (magnitude >= 0x7c00u ? 0x7f800000u | (magnitude & 0x3ffu) << 13 : (magnitude << 13) + (112u << 23));
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
#endif
}

// The scalar arithmetic of x86's bf16 dot-product instructions (VDPBF16PS, TDPBF16PS), for
// their emulations on CPUs without them (EmulatedPairDot, EmulatedTiles): every input,
// the accumulator's included, read with subnormals as zeros of their sign; each sum
// rounded once to fp32 (as by an FMA), to nearest even, and flushed to the zero of its
// sign when tiny. A sum is taken in double, where a product of two bf16 values is exact,
// and where the sum is inexact only when one side is far below half an fp32 ulp of the
// other, so its rounding to fp32 is the FMA's one (vectors without FMA would round a
// product below fp32's normals first).
struct Bf16DotArithmetic {
  // A bf16 value (its bits), a subnormal read as the zero of its sign.
  static double input(std::uint32_t bits) {
    const std::uint32_t word = (bits & 0x7f80u) == 0 ? (bits & 0x8000u) << 16 : (bits & 0xffffu) << 16;
    float x;
    __builtin_memcpy(&x, &word, 4);
    return x;
  }
  // An fp32 accumulator, a subnormal read as the zero of its sign.
  static double accumulator(float x) { return flushed(x); }
  // x rounded to fp32, or the zero of its sign where x86 flushes it: when x rounded to
  // 24 bits with no bound on the exponent (x 2^64 rounded to fp32: exact scaling, a normal
  // result) lies below 2^-126 in size. So 2^-126 - 2^-150 flushes, though fp32's own
  // rounding would take it up to 2^-126.
  static float flushed(double x) {
    const float scaled = float(x * 0x1p64);
    if (scaled < 0x1p-62f && scaled > -0x1p-62f) return __builtin_signbit(scaled) ? -0.0f : 0.0f;
    return float(x);
  }
  // acc + a b (a and b the bits of bf16 values), one rounding.
  static float fma(float acc, std::uint32_t a, std::uint32_t b) {
    return flushed(accumulator(acc) + input(a) * input(b));
  }
  // x + y, one rounding.
  static float add(float x, float y) { return flushed(accumulator(x) + accumulator(y)); }
};

// W consecutive elements widened to one batch.
template <class Arch>
inline xsimd::batch<float, Arch> widen(const float* p) {
  return xsimd::batch<float, Arch>::load_unaligned(p);
}

template <class Arch>
inline xsimd::batch<float, Arch> widen(const bf16* p) {
  constexpr int W = int(xsimd::batch<float, Arch>::size);
  if constexpr (W == 16) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  } else if constexpr (W == 8) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  } else {
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), x));  // each element in a lane's top half
  }
}

template <class Arch>
inline xsimd::batch<float, Arch> widen(const f16* p) {
  constexpr int W = int(xsimd::batch<float, Arch>::size);
  if constexpr (W == 16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else if constexpr (W == 8) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    // As widen_scalar(f16), on four lanes.
    const __m128i h = _mm_unpacklo_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), _mm_setzero_si128());
    const __m128i magnitude = _mm_and_si128(h, _mm_set1_epi32(0x7fff));
    const __m128i sign = _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x8000)), 16);
    const __m128i shifted = _mm_slli_epi32(magnitude, 13);
    const __m128i normal = _mm_add_epi32(shifted, _mm_set1_epi32(112 << 23));
    const __m128i subnormal = _mm_castps_si128(_mm_mul_ps(_mm_cvtepi32_ps(magnitude), _mm_set1_ps(0x1p-24f)));
    const __m128i special = _mm_or_si128(shifted, _mm_set1_epi32(0x7f800000));
    const __m128i is_special = _mm_cmpgt_epi32(magnitude, _mm_set1_epi32(0x7bff));
    const __m128i is_subnormal = _mm_cmplt_epi32(magnitude, _mm_set1_epi32(0x0400));
    const __m128i finite = _mm_or_si128(_mm_and_si128(is_subnormal, subnormal), _mm_andnot_si128(is_subnormal, normal));
    const __m128i value = _mm_or_si128(_mm_and_si128(is_special, special), _mm_andnot_si128(is_special, finite));
    return _mm_castsi128_ps(_mm_or_si128(value, sign));
  }
}

// x rounded to bf16 (to nearest even; NaN stays a quiet NaN of its sign), as its bits.
inline std::uint16_t round_to_bf16(float x) {
  std::uint32_t bits;
  __builtin_memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return std::uint16_t(bits >> 16 | 0x40u);
  return std::uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
