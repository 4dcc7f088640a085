// exp that the compiler vectorises: the CPU kernels' one exponential per pair runs in loops GCC turns into SIMD code,
// which a call of std::exp (a libm function, scalar) prevents. Branch-free: range reduction x = k ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite, k rounded by the 1.5 * 2^p trick), a polynomial for exp(r), and 2^k built from its bits
// in two halves (so k = 128 or -126 needs no special case). Accurate to about 1 ulp where the result is a normal
// number (at most 1.01 ulp measured, with and without FMA; tests/cpu_exp_check.cpp checks 1.5 ulp against long
// double on a dense grid); results below the smallest normal number flush to 0 (the kernels add them to sums of at
// least 1), exp(x) = inf above the largest finite result, NaN stays NaN.
#pragma once

#include <bit>
#include <cstdint>
#include <limits>

#if defined(__GNUC__)
#define MK_VEXP inline __attribute__((always_inline))  // inlined in every loop, or the loop cannot be vectorised
#else
#define MK_VEXP inline
#endif

namespace metric_kernels::cpu {

MK_VEXP float vexp(float x) {
  constexpr float kHi = 88.7228317f;   // just under ln(FLT_MAX)
  constexpr float kLo = -87.3365479f;  // just under ln(FLT_MIN): below it the result is subnormal (flushed to 0)
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in k * .
  constexpr float kRound = 12582912.0f;                             // 1.5 * 2^23: t = y + kRound rounds y
  const float c = x < kLo ? kLo : (x > kHi ? kHi : x);             // NaN passes (both comparisons false)
  const float t = c * kLog2e + kRound;
  const float n = t - kRound;
  const int32_t k = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  float r = c - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // Cephes' expf polynomial (minimax on [-ln2/2, ln2/2]).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  const int32_t k1 = k >> 1, k2 = k - k1;  // 2^k = 2^k1 * 2^k2, each in the normal range
  const float s1 = std::bit_cast<float>((k1 + 127) << 23), s2 = std::bit_cast<float>((k2 + 127) << 23);
  const float y = e * s1 * s2;
  return x > kHi ? std::numeric_limits<float>::infinity() : (x < kLo ? 0.0f : y);
}

MK_VEXP double vexp(double x) {
  constexpr double kHi = 709.782712893383973;   // ln(DBL_MAX)
  constexpr double kLo = -708.396418532264079;  // ln(DBL_MIN)
  constexpr double kLog2e = 1.44269504088896338700e+00;
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;  // fdlibm's split
  constexpr double kRound = 6755399441055744.0;                                              // 1.5 * 2^52
  const double c = x < kLo ? kLo : (x > kHi ? kHi : x);
  const double t = c * kLog2e + kRound;
  const double n = t - kRound;
  // k fits 32 bits; the low word of t's bits holds it (kRound's low word is 0).
  const int32_t k = static_cast<int32_t>(static_cast<uint32_t>(std::bit_cast<uint64_t>(t)));
  double r = c - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // Taylor series to r^13: the remainder is under 5e-18 relative for |r| <= ln2 / 2.
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double e = p * (r * r) + r + 1.0;
  const int32_t k1 = k >> 1, k2 = k - k1;
  const double s1 = std::bit_cast<double>(static_cast<uint64_t>(k1 + 1023) << 52);
  const double s2 = std::bit_cast<double>(static_cast<uint64_t>(k2 + 1023) << 52);
  const double y = e * s1 * s2;
  return x > kHi ? std::numeric_limits<double>::infinity() : (x < kLo ? 0.0 : y);
}

}  // namespace metric_kernels::cpu
