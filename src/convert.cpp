// Conversions between float and the 16-bit storage formats bf16 and fp16.
//
// Scalar, portable integer code on the bit patterns: it runs when data enters or leaves
// the library, not in the kernels, and working on bits keeps the results independent of
// the floating-point environment (rounding mode, flush-to-zero).
#include <flashcpu/flashcpu.hpp>

#include <cstdint>
#include <cstring>

#include "kernels/kernel_api.hpp"

namespace flashcpu {
namespace {

std::uint32_t bits_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

float float_of(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

constexpr std::uint32_t kFloatInf = 0x7f800000u;  // exponent all ones, mantissa 0

}  // namespace

float to_float(bf16 x) { return float_of(std::uint32_t{x.bits} << 16); }

bf16 to_bf16(float x) {
  std::uint32_t u = bits_of(x);
  // A NaN whose payload sits only in the low 16 bits would truncate to inf: the quiet
  // bit keeps it a NaN (and quiets a signalling one, as any arithmetic would).
  if ((u & 0x7fffffffu) > kFloatInf) return {std::uint16_t((u >> 16) | 0x0040u)};
  // Round to nearest, ties to even: below half of the kept unit adds nothing up, above it
  // carries, and at exactly half the kept lowest bit decides. A carry out of the mantissa
  // is right as it is: it moves to the next binade, or from the largest finite value to
  // inf. Subnormals need no case: their bits are ordered and spaced like the normals'.
  u += 0x7fffu + ((u >> 16) & 1u);
  return {std::uint16_t(u >> 16)};
}

float to_float(fp16 x) {
  const std::uint32_t sign = std::uint32_t(x.bits & 0x8000u) << 16;
  const std::uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return float_of(sign | kFloatInf | mantissa << 13);  // inf, NaN payload kept
  if (exponent != 0) return float_of(sign | (exponent + 127 - 15) << 23 | mantissa << 13);
  // Zero or a subnormal, mantissa * 2^-24: a normal float, so the product is exact and
  // not subject to flush-to-zero.
  const float magnitude = float(mantissa) * 0x1p-24f;
  return sign != 0 ? -magnitude : magnitude;
}

fp16 to_fp16(float x) {
  const std::uint32_t u = bits_of(x);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  std::uint32_t a = u & 0x7fffffffu;
  // Keep the payload's top bits; the quiet bit stops a low-bits-only payload becoming inf.
  if (a > kFloatInf) return {std::uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};
  // From 2^16 up (inf included) the exponent does not fit; 65520 up to 2^16 gets to inf by
  // the rounding carry below, as round-to-nearest-even requires.
  if (a >= 0x47800000u) return {std::uint16_t(sign | 0x7c00u)};
  if (a >= 0x38800000u) {  // at least 2^-14: a normal fp16
    a -= std::uint32_t(127 - 15) << 23;  // rebias the exponent
    a += 0xfffu + ((a >> 13) & 1u);      // ties to even, as in to_bf16
    return {std::uint16_t(sign | (a >> 13))};
  }
  // Below 2^-14 the result is a subnormal, round(|x| * 2^24). Below 2^-25 (half the
  // smallest subnormal) that is 0; this also sends float subnormals, which have no
  // implicit bit, away from the path below.
  if (a < 0x33000000u) return {sign};
  // |x| = significand * 2^(e - 150), so |x| * 2^24 = significand >> (126 - e), with e in
  // [102, 112]: a shift of 14 to 24.
  const std::uint32_t significand = (a & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126 - (a >> 23);
  const std::uint32_t half = 1u << (shift - 1);
  const std::uint32_t rest = significand & ((half << 1) - 1);
  std::uint32_t q = significand >> shift;
  q += rest > half || (rest == half && (q & 1u) != 0);  // may carry into 0x0400: 2^-14, right
  return {std::uint16_t(sign | q)};
}

}  // namespace flashcpu

namespace flashcpu::detail {

void store_values(const float* values, std::int64_t count, DType type, void* out, std::int64_t offset,
                  std::int64_t stride) {
  switch (type) {
    case DType::f32: {
      float* dst = static_cast<float*>(out) + offset;
      for (std::int64_t c = 0; c < count; ++c) dst[c * stride] = values[c];
      return;
    }
    case DType::bf16: {
      bf16* dst = static_cast<bf16*>(out) + offset;
      for (std::int64_t c = 0; c < count; ++c) dst[c * stride] = to_bf16(values[c]);
      return;
    }
    case DType::f16: {
      fp16* dst = static_cast<fp16*>(out) + offset;
      for (std::int64_t c = 0; c < count; ++c) dst[c * stride] = to_fp16(values[c]);
      return;
    }
  }
}

}  // namespace flashcpu::detail
