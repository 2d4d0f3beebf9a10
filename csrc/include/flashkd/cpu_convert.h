// Host-side conversion between storage dtypes and float32 rows. Torch-free.
// bf16 is a shift and its loops vectorize; fp16 rows convert eight values per
// F16C instruction where the instruction set has it (see load_floats), since
// GCC 12 leaves loops over its half type scalar.
#pragma once
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <vector>
#include "flashkd/common.h"

namespace flashkd::cpu {
// Internal linkage: these are compiled into every instruction set's objects
// with that set's flags, and one inline copy with external linkage would be
// kept by the linker for all of them (an AVX-512 copy would then run on AVX2
// machines, or an AVX2 copy in the AVX-512 kernels).
namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept NaN (as torch does).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}

// IEEE half <-> float32 by bit manipulation: round to nearest even, NaN kept
// NaN (quieted), subnormals exact. Used where the compiler has no half type
// in C++; tests/cpp/fp16_convert_check.cpp checks it against one that does.
inline float fp16_to_float_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1fu) {
    u = sign | 0x7f800000u | (mantissa << 13);  // inf, NaN (payload kept)
  } else if (exponent != 0) {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // subnormal: m * 2^-24, exact
    return sign ? -magnitude : magnitude;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_fp16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((magnitude >> 13) & 0x3ffu);  // NaN
  if (magnitude >= 0x47800000u) return sign | 0x7c00u;  // 2^16 and beyond (inf included): inf
  if (magnitude < 0x38800000u) {
    // Below 2^-14: a subnormal half, m * 2^-24 with m = round(|f| * 2^24), an
    // exact scaling; m = 1024 is the smallest normal half's encoding.
    const float m = std::nearbyint(std::fabs(f) * 16777216.0f);  // the default rounding mode: to nearest even
    return sign | static_cast<uint16_t>(m);
  }
  // Normal: rebias 127 -> 15, keep 10 mantissa bits, round on the 13 dropped
  // ones (a carry into the exponent is right, up to 65520 -> inf).
  uint32_t h = (((magnitude >> 23) - 112u) << 10) | ((magnitude >> 13) & 0x3ffu);
  const uint32_t dropped = magnitude & 0x1fffu;
  h += dropped > 0x1000u || (dropped == 0x1000u && (h & 1u));
  return sign | static_cast<uint16_t>(h);
}

// The compiler's half type, where it has one in C++: AVX2 / AVX-512 builds
// then convert with F16C instructions in vectorized loops. GCC has _Float16
// in C++ on x86-64 from version 12 (Clang from 15); ARM compilers have __fp16.
#if defined(__ARM_FP16_FORMAT_IEEE)
#define FKD_HALF_TYPE __fp16
#elif (defined(__x86_64__) || defined(__i386__)) && \
    ((defined(__clang__) && __clang_major__ >= 15) || (!defined(__clang__) && __GNUC__ >= 12))
#define FKD_HALF_TYPE _Float16
#endif

inline float fp16_to_float(uint16_t h) {
#if defined(FKD_HALF_TYPE)
  FKD_HALF_TYPE x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
#else
  return fp16_to_float_bits(h);
#endif
}

inline uint16_t float_to_fp16(float f) {
#if defined(FKD_HALF_TYPE)
  const FKD_HALF_TYPE x = static_cast<FKD_HALF_TYPE>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
#else
  return float_to_fp16_bits(f);
#endif
}

// dst[k] = float(src[k * stride]) for k < n.
inline void load_floats(const void* src, DType dtype, int64_t stride, int64_t n, float* dst) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* s = static_cast<const float*>(src);
      if (stride == 1) {  // n == 0 may come with a null src (an empty tensor), which memcpy must not see
        if (n > 0) std::memcpy(dst, s, n * sizeof(float));
        return;
      }
      for (int64_t k = 0; k < n; ++k) dst[k] = s[k * stride];
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      if (stride == 1) {
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) dst[k] = bf16_to_float(s[k]);
        return;
      }
      for (int64_t k = 0; k < n; ++k) dst[k] = bf16_to_float(s[k * stride]);
      return;
    }
    case DType::kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      if (stride == 1) {
        int64_t k = 0;
#if defined(__F16C__)
        // The same conversion as the scalar tail's (exact: every half is a float).
        for (; k + 8 <= n; k += 8)
          _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k))));
#endif
        for (; k < n; ++k) dst[k] = fp16_to_float(s[k]);
        return;
      }
      for (int64_t k = 0; k < n; ++k) dst[k] = fp16_to_float(s[k * stride]);
      return;
    }
  }
}

// dst[k * stride] = src[k] rounded to `dtype`, for k < n.
inline void store_floats(const float* src, int64_t n, void* dst, DType dtype, int64_t stride) {
  switch (dtype) {
    case DType::kFloat32: {
      float* d = static_cast<float*>(dst);
      if (stride == 1) {  // n == 0 may come with a null dst (an empty tensor)
        if (n > 0) std::memcpy(d, src, n * sizeof(float));
        return;
      }
      for (int64_t k = 0; k < n; ++k) d[k * stride] = src[k];
      return;
    }
    case DType::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) d[k * stride] = float_to_bf16(src[k]);
      return;
    }
    case DType::kFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      int64_t k = 0;
#if defined(__F16C__)
      // Round to nearest even, as the scalar tail's conversion (the same instruction, one lane).
      if (stride == 1)
        for (; k + 8 <= n; k += 8)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + k),
                           _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
#endif
      for (; k < n; ++k) d[k * stride] = float_to_fp16(src[k]);
      return;
    }
  }
}

inline int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// max_k |x[k]| (0 for an empty row); NaN where some x[k] is NaN (the max
// reduction itself drops NaNs, so they are counted beside it).
inline float abs_max(const float* x, int64_t n) {
  float m = 0.f;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t k = 0; k < n; ++k) {
    m = std::max(m, std::fabs(x[k]));
    nan |= x[k] != x[k];
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// The least and the greatest of x[0, n), n >= 1. Written as selects, not
// std::min / std::max: GCC 12 keeps a std::min or std::max reduction of
// plain floats scalar (it reports the loop vectorized, yet emits a vminss
// chain: 4 cycles an entry), while `a < b ? a : b` becomes vminps. Always
// inlined: left as a call, it kept the caller's next loop (int4 codes) scalar.
struct MinMax {
  float lo, hi;
};
// A NaN among them makes both NaN, as abs_max does.
__attribute__((always_inline)) inline MinMax min_max(const float* x, int64_t n) {
  float lo = x[0], hi = x[0];
  int nan = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : nan)
  for (int64_t k = 0; k < n; ++k) {
    lo = lo < x[k] ? lo : x[k];
    hi = hi > x[k] ? hi : x[k];
    nan |= x[k] != x[k];
  }
  if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
  return {lo, hi};
}

// Calls fn(r, row) for rows [begin, end) of a (rows, n) matrix of `dtype`
// whose rows are `ld` elements apart, each row converted to float32 in a
// thread-local buffer (at least one float, so row is valid even when n == 0).
template <class F>
void for_each_float_row(const void* base, DType dtype, int64_t ld, int64_t n, int64_t begin, int64_t end, F&& fn) {
  thread_local std::vector<float> buffer;
  buffer.resize(n > 1 ? n : 1);
  const int64_t esize = dtype_size(dtype);
  for (int64_t r = begin; r < end; ++r) {
    load_floats(static_cast<const char*>(base) + r * ld * esize, dtype, 1, n, buffer.data());
    fn(r, buffer.data());
  }
}

}  // namespace
}  // namespace flashkd::cpu
