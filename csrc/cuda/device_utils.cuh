// Small device helpers shared by the CUDA kernels: typed 8-wide loads and
// stores (16-byte transactions when the row allows) and block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "flashkd/common.h"
#include "flashkd/fast_math.h"

namespace flashkd::cuda {

constexpr int kVec = 8;  // elements per thread per step

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// True when 8 consecutive elements from `ptr` can move as 16-byte words.
template <typename T>
__device__ __forceinline__ bool vec_ok(const T* ptr, int64_t col_stride) {
  return col_stride == 1 && (reinterpret_cast<uintptr_t>(ptr) % 16) == 0;
}

// The 8 elements held by consecutive 16-byte words, as floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4* words, float (&out)[kVec]) {
  constexpr int kPerWord = 16 / sizeof(T);
#pragma unroll
  for (int w = 0; w < kVec / kPerWord; ++w) {
    const uint4 word = words[w];
    const T* e = reinterpret_cast<const T*>(&word);
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) out[w * kPerWord + j] = to_float(e[j]);
  }
}

// out[j] = row[(col + j) * stride] for col + j < n, else -inf.
template <typename T>
__device__ __forceinline__ void load8(const T* row, int64_t col, int64_t stride, int64_t n,
                                      bool vec, float (&out)[kVec]) {
  if (vec && col + kVec <= n) {
    constexpr int kWords = kVec * sizeof(T) / 16;
    uint4 words[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = __ldg(reinterpret_cast<const uint4*>(row + col) + w);
    unpack8<T>(words, out);
    return;
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    out[j] = col + j < n ? to_float(row[(col + j) * stride]) : kNegInf;
}

// out[j] = ptr[j] for 8 elements of shared memory at a 16-byte boundary.
template <typename T>
__device__ __forceinline__ void load8_shared(const T* ptr, float (&out)[kVec]) {
  unpack8<T>(reinterpret_cast<const uint4*>(ptr), out);
}

// Two 16-bit floats in one word, a in the low half (the lower address).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&pair);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float a, float b) {
  const __half2 pair = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// 16 bytes of T holding v[0 .. 16 / sizeof(T)), rounded to nearest.
template <typename T>
__device__ __forceinline__ uint4 pack_word(const float* v) {
  if constexpr (sizeof(T) == 4) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  } else {
    return make_uint4(pack_pair<T>(v[0], v[1]), pack_pair<T>(v[2], v[3]), pack_pair<T>(v[4], v[5]),
                      pack_pair<T>(v[6], v[7]));
  }
}

// row[(col + j) * stride] = v[j] for col + j < n. The 16-byte path stores
// with an explicit vector intrinsic: a plain uint4 assignment was split into
// four 4-byte stores in the cluster kernel (nvcc 13.0).
template <typename T>
__device__ __forceinline__ void store8(T* row, int64_t col, int64_t stride, int64_t n, bool vec,
                                       const float (&v)[kVec]) {
  if (vec && col + kVec <= n) {
    constexpr int kPerWord = 16 / sizeof(T);
#pragma unroll
    for (int w = 0; w < kVec / kPerWord; ++w)
      __stwb(reinterpret_cast<uint4*>(row + col) + w, pack_word<T>(v + w * kPerWord));
    return;
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    if (col + j < n) row[(col + j) * stride] = from_float<T>(v[j]);
}

// The shared-memory address of a generic pointer into shared memory, as the
// 32-bit operand that cp.async, ldmatrix, mbarrier and bulk copies take.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Orders this thread's generic-proxy accesses to shared memory before later
// async-proxy ones (wgmma reading a tile, a bulk copy refilling a stage);
// nothing before sm_90, which has no async proxy.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fkd_max(a, b); }
};

// Reduces N values across the block; every thread gets the results.
// `scratch` holds at least 32 * N floats. Ends with a barrier so scratch can be reused.
template <int N, typename Op>
__device__ __forceinline__ void block_allreduce(float (&v)[N], float* scratch, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], o));
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i * 32 + warp] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float x = scratch[i * 32];
    for (int w = 1; w < warps; ++w) x = op(x, scratch[i * 32 + w]);
    v[i] = x;
  }
  __syncthreads();
}

// (value, index) argmax across the block, first index on ties.
__device__ __forceinline__ void block_argmax(float& val, int64_t& idx, float* fscratch,
                                             int64_t* iscratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, val, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > val || (ov == val && oi < idx)) { val = ov; idx = oi; }
  }
  if (lane == 0) { fscratch[warp] = val; iscratch[warp] = idx; }
  __syncthreads();
  val = fscratch[0];
  idx = iscratch[0];
  for (int w = 1; w < warps; ++w)
    if (fscratch[w] > val || (fscratch[w] == val && iscratch[w] < idx)) { val = fscratch[w]; idx = iscratch[w]; }
  __syncthreads();
}

}  // namespace flashkd::cuda
