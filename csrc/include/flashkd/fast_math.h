// exp / log / logaddexp used by every kernel, on host and device.
//
// Host versions are branch-free polynomial forms that GCC vectorizes inside
// `#pragma omp simd` loops (libm's expf would not vectorize without
// -ffast-math, which we cannot use: -inf and NaN logits must behave).
// Accuracy is about 2 ulp over the range a softmax needs (arguments <= 0).
#pragma once
#include <cmath>
#include <cstring>
#include "flashkd/common.h"

namespace flashkd {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kNaN = __builtin_nanf("");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#if defined(__CUDA_ARCH__)

FKD_HD float fkd_exp(float x) { return exp2f(x * kLog2e); }
FKD_HD float fkd_log(float x) { return logf(x); }
FKD_HD float fkd_log1p(float x) { return log1pf(x); }

#else

FKD_HD float bits_to_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }
FKD_HD int32_t float_to_bits(float f) { int32_t i; std::memcpy(&i, &f, 4); return i; }

// exp(x) = 2^n * e^r, |r| <= ln2/2, degree-6 polynomial for e^r.
FKD_HD float fkd_exp(float x) {
  float xc = x < -87.0f ? -87.0f : x;  // NaN compares false and stays NaN
  xc = xc > 88.0f ? 88.0f : xc;
  const float shift = 12582912.0f;  // 1.5 * 2^23: adds and rounds to nearest int
  const float nf = (xc * kLog2e + shift) - shift;
  float r = xc - nf * 0.693145751953125f;
  r = r - nf * 1.428606765330187e-06f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333338e-3f;
  p = p * r + 4.1666668e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(nf) + 127) << 23);
  const float y = p * scale;
  return x < -87.0f ? 0.0f : y;  // exact 0 for -inf (masked logits)
}

// log(x) for x > 0 (normal floats): x = 2^e * m, m in [sqrt(1/2), sqrt(2)).
FKD_HD float fkd_log(float x) {
  int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  // 2*atanh(s) series: log(m) = 2s + 2s^3/3 + 2s^5/5 + ...
  float p = 0.22222222f;
  p = p * s2 + 0.28571429f;
  p = p * s2 + 0.4f;
  p = p * s2 + 0.66666667f;
  p = p * s2 + 2.0f;
  const float y = static_cast<float>(e) * kLn2 + s * p;
  float out = x == 0.0f ? kNegInf : y;
  out = x != x ? x : out;                   // NaN stays NaN
  out = x == __builtin_huge_valf() ? x : out;
  return out;
}

// log1p for x in [0, 1]: the only range logaddexp needs.
FKD_HD float fkd_log1p(float x) { return fkd_log(1.0f + x); }

#endif

FKD_HD float fkd_max(float a, float b) { return a > b ? a : b; }

// c * tanh(z / c), the logit soft cap (Gemma 2); its derivative is 1 - (y / c)^2.
// One formula on host and device (with CUDA's fast-math tanhf the soft-capped
// loss was off by 1.4e-5 relative on an H100 where torch's was 8e-9):
// - |x| >= 0.4: tanh |x| = 1 - 2 / (e^{2|x|} + 1) with x's sign, which
//   saturates cleanly (+-inf -> +-1); on |x| the quotient stays <= 1, where
//   its rounding is smallest (at most 3.6 ulp, emulated against float64);
// - |x| < 0.4: the odd Taylor series to x^13 (the next term is below 4e-9
//   relative). There 1 - 2 / (e^{2x} + 1) cancels: its absolute error of
//   about 2^-24 is 30 ulp of tanh(1/30), and a cap of 30 meets logits of size
//   1 (Gemma 2), which came out of the cap with ~2e-6 of error where
//   torch.tanh's was ~1e-7.
FKD_HD float soft_cap(float z, float c) {
  const float x = z / c;
  const float x2 = x * x;
  float p = 21844.0f / 6081075.0f;
  p = p * x2 - 1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float series = x + x * x2 * p;
  const float t = 1.0f - 2.0f / (fkd_exp(2.0f * fabsf(x)) + 1.0f);
  const float saturating = x < 0.0f ? -t : t;
  const bool small = x < 0.4f && x > -0.4f;  // false for NaN: NaN stays NaN
  return c * (small ? series : saturating);
}
FKD_HD float soft_cap_grad(float capped, float c) {
  const float u = capped / c;
  return 1.0f - u * u;
}

// log(e^x + e^y) without forming the sum; -inf + -inf = -inf.
FKD_HD float logaddexp(float x, float y) {
  const float m = fkd_max(x, y);
  const float d = x > y ? y - x : x - y;  // -|x - y|, NaN if either is NaN
  const float r = m + fkd_log1p(fkd_exp(d));
  return m == kNegInf ? kNegInf : r;
}

}  // namespace flashkd
