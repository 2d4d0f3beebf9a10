// Shared by CPU (.cpp) and CUDA (.cu) code. Never includes torch headers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FKD_HD __host__ __device__ __forceinline__
#else
#define FKD_HD inline __attribute__((always_inline))
#endif

namespace flashkd {

// Element types a kernel can read. The glue maps at::ScalarType onto these.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kMaxLeadDims = 4;

// Where row `r` of a (..., V) tensor starts, for any strides. Leading dims are
// collapsed by the glue first, so most tensors have ndim == 1 here.
struct RowLayout {
  int32_t ndim = 1;
  int64_t size[kMaxLeadDims] = {0, 0, 0, 0};
  int64_t stride[kMaxLeadDims] = {0, 0, 0, 0};  // in elements
  int64_t col_stride = 1;                        // in elements

  FKD_HD int64_t row_offset(int64_t row) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      const int64_t i = row % size[d];
      row /= size[d];
      off += i * stride[d];
    }
    return off;
  }
};

}  // namespace flashkd
