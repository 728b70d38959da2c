// The float <-> bf16 / fp16 conversions, against references computed here by other means:
//  - to_float against a decoding of the sign, exponent and mantissa fields in double,
//    for all 65,536 patterns of each type;
//  - every pattern through to_float and back;
//  - to_bf16 / to_fp16 against rounding done in double arithmetic (|x| in units of its ulp,
//    floor, ties to even), over 2^24 floats spread across all 2^32 bit patterns, and against
//    the answer known by construction at, and one float ulp either side of, the midpoint
//    between every pair of neighbouring 16-bit values;
//  - the named special cases: ties both ways, zeros, subnormals, overflow, inf, NaN.
#include <catch2/catch.hpp>

#include <flashcpu/flashcpu.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

namespace {

using flashcpu::bf16;
using flashcpu::fp16;

constexpr double kInf = std::numeric_limits<double>::infinity();

float f32(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

std::uint32_t bits_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

// 2^e for |e| < 1023, so that scaling is a multiplication: exact, and several times faster
// than std::ldexp in the sweep.
double pow2(int e) {
  const std::uint64_t u = std::uint64_t(e + 1023) << 52;
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

std::string hex(std::uint32_t u) {
  char s[16];
  std::snprintf(s, sizeof s, "0x%x", unsigned(u));
  return s;
}

std::string num(double x) {
  char s[32];
  std::snprintf(s, sizeof s, "%.9g", x);
  return s;
}

template <class T>
struct Format;
template <>
struct Format<bf16> {
  static constexpr int mbits = 7, ebits = 8;
  static constexpr const char* name = "bf16";
  static std::uint16_t from(float x) { return flashcpu::to_bf16(x).bits; }
};
template <>
struct Format<fp16> {
  static constexpr int mbits = 10, ebits = 5;
  static constexpr const char* name = "fp16";
  static std::uint16_t from(float x) { return flashcpu::to_fp16(x).bits; }
};

template <class T>
constexpr int kBias = (1 << (Format<T>::ebits - 1)) - 1;
template <class T>
constexpr unsigned kExpAllOnes = (1u << Format<T>::ebits) - 1;
template <class T>
constexpr unsigned kInfBits = kExpAllOnes<T> << Format<T>::mbits;
template <class T>
constexpr unsigned kQuietBit = 1u << (Format<T>::mbits - 1);

template <class T>
bool is_nan_bits(unsigned b) { return (b & 0x7fffu) > kInfBits<T>; }

// The value of a 16-bit pattern from its fields, in double (where every one is exact).
template <class T>
double decode(unsigned b) {
  constexpr int m = Format<T>::mbits;
  const int mantissa = int(b & ((1u << m) - 1));
  const unsigned exponent = (b >> m) & kExpAllOnes<T>;
  double v;
  if (exponent == kExpAllOnes<T>)
    v = mantissa == 0 ? kInf : std::numeric_limits<double>::quiet_NaN();
  else if (exponent == 0)
    v = mantissa * pow2(1 - kBias<T> - m);
  else
    v = (mantissa + (1 << m)) * pow2(int(exponent) - kBias<T> - m);
  return std::copysign(v, (b & 0x8000u) ? -1.0 : 1.0);
}

// The correctly rounded value of a non-NaN x in T, by arithmetic in double: |x| counted in
// ulps of its binade (of the subnormal binade below the normals), rounded half to even;
// past the largest finite value, where the next step would be 2^(emax + 1), inf.
// In ulp units the integer part's parity is the mantissa's, so "even" is the same test.
template <class T>
double round_ref(float x) {
  constexpr int m = Format<T>::mbits, emin = 1 - kBias<T>;
  const double a = std::fabs(double(x));
  int e;
  std::frexp(a, &e);  // a in [2^(e-1), 2^e)
  const int ulp_exp = std::max(e - 1, emin) - m;
  const double t = a * pow2(-ulp_exp);  // exact: a power-of-two scaling
  double q = std::floor(t);
  const double frac = t - q;  // exact
  if (frac > 0.5 || (frac == 0.5 && std::fmod(q, 2.0) != 0)) q += 1;
  double r = q * pow2(ulp_exp);
  if (r >= pow2(kBias<T> + 1)) r = kInf;
  return std::copysign(r, double(x));
}

// The NaN the contract asks for: the float's sign, exponent all ones, the payload's top
// mantissa bits, and the quiet bit set.
template <class T>
unsigned expected_nan(std::uint32_t u) {
  constexpr int m = Format<T>::mbits;
  return ((u >> 16) & 0x8000u) | kInfBits<T> | kQuietBit<T> | ((u & 0x7fffffu) >> (23 - m));
}

// Counts failures of a sweep and keeps the first few, so that millions of cases cost no
// Catch2 assertion each.
struct Failures {
  long count = 0;
  std::string first;
  void add(const std::string& what) {
    if (count++ < 5) first += what + "\n";
  }
};

// Checks T's rounding of x against round_ref (and the NaN rule); with want >= 0, also
// against that pattern, known by construction.
template <class T>
void check_rounding(float x, Failures& fails, long want = -1) {
  const std::uint32_t u = bits_of(x);
  const unsigned got = Format<T>::from(x);
  std::string bad;
  if (std::isnan(x)) {
    if (got != expected_nan<T>(u)) bad = "NaN rule";
  } else {
    const double v = decode<T>(got), r = round_ref<T>(x);
    if (!(v == r && std::signbit(v) == std::signbit(r))) bad = "reference " + num(r);
    if (want >= 0 && got != unsigned(want)) bad += " expected " + hex(unsigned(want));
  }
  if (!bad.empty()) fails.add(std::string(Format<T>::name) + "(" + hex(u) + ") = " + hex(got) + ": " + bad);
}

template <class T>
void check_decoding_and_round_trip() {
  Failures fails;
  for (unsigned b = 0; b < 0x10000u; ++b) {
    const T x{std::uint16_t(b)};
    const float f = flashcpu::to_float(x);
    const unsigned back = Format<T>::from(f);
    const std::uint32_t sign = (b & 0x8000u) << 16;
    if (is_nan_bits<T>(b)) {
      // A NaN keeps its sign and its whole payload in the float, the quiet bit as it was.
      const std::uint32_t payload = (b & ((1u << Format<T>::mbits) - 1)) << (23 - Format<T>::mbits);
      if (bits_of(f) != (sign | 0x7f800000u | payload)) fails.add("to_float NaN " + hex(b));
      // Back, a quiet NaN is unchanged; a signalling one comes back quiet (the quiet bit
      // set), with the same sign and the rest of its payload.
      if (back != (b | kQuietBit<T>)) fails.add("NaN round trip " + hex(b) + " -> " + hex(back));
    } else {
      // Exact: the value, and the sign of a zero.
      const double want = decode<T>(b);
      if (!(double(f) == want && std::signbit(f) == std::signbit(want)))
        fails.add("to_float " + hex(b) + " = " + num(f));
      // Every value of T is a float, so rounding it back finds the same pattern.
      if (back != b) fails.add("round trip " + hex(b) + " -> " + hex(back));
    }
  }
  INFO(Format<T>::name << ":\n" << fails.first);
  CHECK(fails.count == 0);
}

// At the midpoint between each pair of neighbouring non-negative patterns b, b + 1 (the
// float there is exact) the tie goes to the even one; one float ulp below goes to b,
// one above to b + 1. Past the largest finite pattern, b + 1 is inf: 2^(emax + 1) is
// where the next value would be, and the largest finite mantissa is odd, so its
// midpoint goes to inf. Both signs.
template <class T>
void check_midpoints() {
  Failures fails;
  for (unsigned b = 0; b < kInfBits<T>; ++b) {
    const double lo = decode<T>(b);
    const double hi = b + 1 == kInfBits<T> ? pow2(kBias<T> + 1) : decode<T>(b + 1);
    const float mid = float((lo + hi) / 2);
    if (double(mid) != (lo + hi) / 2) fails.add("midpoint not a float at " + hex(b));
    const unsigned even = (b & 1u) ? b + 1 : b;
    for (const unsigned sign : {0u, 0x8000u}) {
      const float s = sign ? -1.0f : 1.0f;
      check_rounding<T>(s * mid, fails, sign | even);
      check_rounding<T>(s * std::nextafter(mid, 0.0f), fails, sign | b);
      check_rounding<T>(s * std::nextafter(mid, FLT_MAX), fails, sign | (b + 1));
    }
  }
  INFO(fails.first);
  CHECK(fails.count == 0);
}

struct Case {
  float x;
  unsigned want;
  const char* why;
};

template <class T, std::size_t N>
void check_cases(const Case (&cases)[N]) {
  for (const Case& c : cases) {
    INFO(Format<T>::name << "(" << hex(bits_of(c.x)) << "): " << c.why);
    CHECK(hex(Format<T>::from(c.x)) == hex(c.want));
  }
}

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kFInf = std::numeric_limits<float>::infinity();

}  // namespace

TEST_CASE("to_float matches a field decoding, and every 16-bit pattern survives the round trip", "[convert]") {
  check_decoding_and_round_trip<bf16>();
  check_decoding_and_round_trip<fp16>();
}

TEST_CASE("to_bf16 and to_fp16 round 2^24 floats spread over all bit patterns correctly", "[convert]") {
  // k * 2654435761 (a prime, so odd: a bijection mod 2^32) for 2^24 values of k spreads
  // the samples evenly over every sign, exponent and mantissa, NaNs and float subnormals
  // included, with well-mixed low bits where the rounding happens.
  Failures fails;
  for (std::uint32_t k = 0; k < (1u << 24); ++k) {
    const float x = f32(k * 2654435761u);
    check_rounding<bf16>(x, fails);
    check_rounding<fp16>(x, fails);
  }
  INFO(fails.first);
  CHECK(fails.count == 0);
}

TEST_CASE("to_bf16 and to_fp16 round correctly at and around every midpoint", "[convert]") {
  check_midpoints<bf16>();
  check_midpoints<fp16>();
}

TEST_CASE("to_fp16 special cases", "[convert]") {
  const Case cases[] = {
      {0.0f, 0x0000, "+0 stays +0"},
      {-0.0f, 0x8000, "-0 keeps its sign"},
      {1.0f, 0x3c00, "exact"},
      {f32(0x3f801000), 0x3c00, "1 + 2^-11, a tie between 0x3c00 and 0x3c01: down to the even mantissa"},
      {f32(0x3f803000), 0x3c02, "1 + 3 * 2^-11, a tie between 0x3c01 and 0x3c02: up to the even mantissa"},
      {f32(0xbf803000), 0xbc02, "ties round the magnitude: the same for negatives"},
      {f32(0x3f801001), 0x3c01, "just above a tie: up"},
      {f32(0x3f802fff), 0x3c01, "just below a tie: down"},
      {0x1p-14f, 0x0400, "the smallest normal, exact"},
      {1023 * 0x1p-24f, 0x03ff, "the largest subnormal, exact"},
      {2047 * 0x1p-25f, 0x0400, "a tie between the largest subnormal (odd) and the smallest normal (even): up"},
      {0x1p-24f, 0x0001, "the smallest subnormal, exact"},
      {-0x1p-24f, 0x8001, "the same, negative"},
      {0x1p-25f, 0x0000, "half the smallest subnormal, a tie between 0 and 2^-24: to the even 0"},
      {-0x1p-25f, 0x8000, "the same, and the zero keeps the sign"},
      {std::nextafter(0x1p-25f, 1.0f), 0x0001, "just above half the smallest subnormal: up to 2^-24"},
      {3 * 0x1p-25f, 0x0002, "a subnormal tie between 1 and 2 units: to the even 2"},
      {5 * 0x1p-25f, 0x0002, "a subnormal tie between 2 and 3 units: to the even 2"},
      {0x1p-26f, 0x0000, "below half the smallest subnormal: underflows to 0"},
      {-0x1p-26f, 0x8000, "underflows to -0, keeping the sign"},
      {f32(0x00000001), 0x0000, "the smallest float subnormal underflows"},
      {f32(0x80000001), 0x8000, "the same, negative: -0"},
      {65504.0f, 0x7bff, "the largest finite fp16, exact"},
      {65519.0f, 0x7bff, "below the midpoint 65520 between 65504 and 2^16: down"},
      {65519.99f, 0x7bff, "just below the midpoint (65519.9921875): down"},
      {65520.0f, 0x7c00, "the midpoint; 65504's mantissa is odd, 2^16's (as inf) even: up, to inf"},
      {-65520.0f, 0xfc00, "the same, negative: -inf"},
      {65536.0f, 0x7c00, "2^16 is past the range"},
      {FLT_MAX, 0x7c00, "far past the range: inf"},
      {-FLT_MAX, 0xfc00, "far past the range: -inf"},
      {kFInf, 0x7c00, "inf stays inf"},
      {-kFInf, 0xfc00, "-inf stays -inf"},
      {kNaN, 0x7e00, "the default quiet NaN"},
      {f32(0xffc00000), 0xfe00, "a NaN keeps its sign"},
      {f32(0x7f800001), 0x7e00, "a payload in the lowest bit only: the quiet bit keeps it a NaN, not inf"},
      {f32(0xff800001), 0xfe00, "the same, negative"},
      {f32(0x7fa00000), 0x7f00, "a signalling NaN: the payload's top bits kept, the quiet bit set"},
      {f32(0x7fffffff), 0x7fff, "a full payload is truncated, never carried into the sign"},
  };
  check_cases<fp16>(cases);
}

TEST_CASE("to_bf16 special cases", "[convert]") {
  const Case cases[] = {
      {0.0f, 0x0000, "+0 stays +0"},
      {-0.0f, 0x8000, "-0 keeps its sign"},
      {1.0f, 0x3f80, "exact"},
      {f32(0x3f808000), 0x3f80, "a tie between 0x3f80 and 0x3f81: down to the even mantissa"},
      {f32(0x3f818000), 0x3f82, "a tie between 0x3f81 and 0x3f82: up to the even mantissa"},
      {f32(0xbf818000), 0xbf82, "ties round the magnitude: the same for negatives"},
      {f32(0x3f808001), 0x3f81, "just above a tie: up"},
      {f32(0x3f817fff), 0x3f81, "just below a tie: down"},
      {f32(0x3fff8000), 0x4000, "a tie that carries into the exponent: 2"},
      {FLT_MAX, 0x7f80, "past the midpoint between the largest bf16 (0x7f7f) and 2^128: inf"},
      {-FLT_MAX, 0xff80, "the same, negative: -inf"},
      {f32(0x7f7f8000), 0x7f80, "that midpoint: 0x7f7f's mantissa is odd, so up, to inf"},
      {f32(0x7f7f7fff), 0x7f7f, "just below it: the largest finite bf16"},
      {kFInf, 0x7f80, "inf stays inf"},
      {-kFInf, 0xff80, "-inf stays -inf"},
      {f32(0x00010000), 0x0001, "the smallest bf16 subnormal, 2^-133, exact: not flushed"},
      {f32(0x00012345), 0x0001, "a float subnormal rounds among the bf16 subnormals: down"},
      {f32(0x0001c000), 0x0002, "above half a unit: up"},
      {f32(0x00008000), 0x0000, "a tie between 0 and 2^-133: to the even 0"},
      {f32(0x00018000), 0x0002, "a tie between 1 and 2 units: to the even 2"},
      {f32(0x80018000), 0x8002, "the same, negative"},
      {f32(0x00000001), 0x0000, "the smallest float subnormal is far below half of 2^-133: 0"},
      {f32(0x80000001), 0x8000, "the same, negative: -0"},
      {f32(0x007fffff), 0x0080, "the largest float subnormal rounds up to the smallest normal"},
      {kNaN, 0x7fc0, "the default quiet NaN"},
      {f32(0xffc00000), 0xffc0, "a NaN keeps its sign"},
      {f32(0x7f800001), 0x7fc0, "a payload in the low 16 bits only: the quiet bit keeps it a NaN, not inf"},
      {f32(0xff800001), 0xffc0, "the same, negative"},
      {f32(0x7fa00000), 0x7fe0, "a signalling NaN: the payload's top bits kept, the quiet bit set"},
      {f32(0x7fffffff), 0x7fff, "a full payload is truncated, never carried into the sign"},
  };
  check_cases<bf16>(cases);
}
