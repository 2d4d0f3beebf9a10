// The logit soft cap on its own, for the LSE backward (csrc/cpu/isa/soft_cap.cpp
// says why): flashkd::soft_cap, the function the row programs apply, so the
// values are the bits the forward's LSE was formed from.
#include "device_utils.cuh"
#include "kernels.h"

namespace flashkd::cuda {
namespace {

__global__ void soft_cap_kernel(float* z, int64_t n, float cap) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) z[i] = soft_cap(z[i], cap);
}

}  // namespace

const char* soft_cap_values(float* z, int64_t n, float cap, void* stream) {
  if (n == 0) return nullptr;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  soft_cap_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kThreads, 0,
                    static_cast<cudaStream_t>(stream)>>>(z, n, cap);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashkd::cuda
