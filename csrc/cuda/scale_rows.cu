// In-place row scaling used by backward: grad[row] *= factor. Reads the factor
// on the device, so the common grad_output == 1 costs one launch and no sync.
#include "device_utils.cuh"
#include "kernels.h"

namespace flashkd::cuda {
namespace {

template <typename T>
__global__ void scale_rows_kernel(T* grad, RowLayout layout, int64_t rows, int64_t cols,
                                  const float* factor, bool per_row) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float f = factor[per_row ? row : 0];
    if (f == 1.f) {
      if (!per_row) return;  // uniform factor of one: nothing to do anywhere
      continue;
    }
    T* g = grad + layout.row_offset(row);
    const bool vec = vec_ok(g, layout.col_stride);
    for (int64_t c = int64_t(threadIdx.x) * kVec; c < cols; c += int64_t(blockDim.x) * kVec) {
      float v[kVec];
      load8(g, c, layout.col_stride, cols, vec, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] *= f;
      store8(g, c, layout.col_stride, cols, vec, v);
    }
  }
}

}  // namespace

const char* scale_rows(void* grad, DType dtype, const RowLayout& layout, int64_t rows, int64_t cols,
                       const float* factor, bool per_row, void* stream) {
  if (rows == 0 || cols == 0) return nullptr;
  const unsigned blocks = static_cast<unsigned>(rows < 65535 ? rows : 65535);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      scale_rows_kernel<<<blocks, 256, 0, s>>>(static_cast<float*>(grad), layout, rows, cols, factor, per_row);
      break;
    case DType::kBFloat16:
      scale_rows_kernel<<<blocks, 256, 0, s>>>(static_cast<__nv_bfloat16*>(grad), layout, rows, cols, factor, per_row);
      break;
    case DType::kFloat16:
      scale_rows_kernel<<<blocks, 256, 0, s>>>(static_cast<__half*>(grad), layout, rows, cols, factor, per_row);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashkd::cuda
