// Host-side conversion between storage dtypes and float32 rows. Torch-free;
// the loops vectorize (bf16 is a shift, fp16 uses F16C via _Float16).
#pragma once
#include <algorithm>
#include <cmath>
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

inline float fp16_to_float(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}

inline uint16_t float_to_fp16(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
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
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) dst[k] = fp16_to_float(s[k]);
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
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) d[k * stride] = float_to_fp16(src[k]);
      return;
    }
  }
}

inline int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// max_k |x[k]| (0 for an empty row).
inline float abs_max(const float* x, int64_t n) {
  float m = 0.f;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) m = std::max(m, std::fabs(x[k]));
  return m;
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
