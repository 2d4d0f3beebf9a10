// Helpers shared by the token-merging and token-pruning CUDA kernels.
#pragma once
#include "device_utils.cuh"

namespace flashkd::cuda {

// Calls f(T*) with a null pointer of the element type of `dtype`, so a
// generic lambda can launch a kernel template for it; returns the launch error.
template <typename F>
const char* launch_for_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(static_cast<float*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case DType::kFloat16: f(static_cast<__half*>(nullptr)); break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Grid size for `units` blocks of a grid-stride loop.
inline unsigned grid_for(int64_t units) {
  return static_cast<unsigned>(units < (1 << 30) ? (units > 0 ? units : 1) : (1 << 30));
}

// out[0 .. cols) = in[0 .. cols) bit for bit (NaN payloads too), the block's
// threads striding over the row: 16-byte words where both rows are aligned.
template <typename T>
__device__ __forceinline__ void copy_row(T* out, const T* in, int64_t cols) {
  int64_t done = 0;
  if (vec_ok(in, 1) && vec_ok(out, 1)) {
    constexpr int kPerWord = 16 / sizeof(T);
    const int64_t words = cols / kPerWord;
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x)
      __stwb(reinterpret_cast<uint4*>(out) + w, __ldg(reinterpret_cast<const uint4*>(in) + w));
    done = words * kPerWord;
  }
  for (int64_t c = done + threadIdx.x; c < cols; c += blockDim.x) out[c] = in[c];
}

}  // namespace flashkd::cuda
