// quantize_weight_rows: the weight quantizers of flashkd/quant_params.h
// (ternary, int8, int4), with the shared formulas, so codes and scales equal
// the CPU's bit for bit (the ternary row sum is float64 in both; its order
// differs, which can move the float64 sum by an ulp but not, in any case we
// know of, its float32 rounding). One block per row (grid-stride): ternary and
// int8 reduce the row across the block, then write the codes; int4 gives each
// warp whole groups (lanes stride over a group, shuffles reduce min and max).
#include "quant_device.cuh"
#include "quant_kernels.h"

namespace flashkd::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ double block_sum(double v, double* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next row
  return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = quant::max_keep_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = quant::max_keep_nan(total, scratch[w]);
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_weights_kernel(const T* w, quant::WeightQuantArgs a) {
  __shared__ double dscratch[kWarps];
  __shared__ float fscratch[kWarps];
  const int64_t K = a.cols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* wr = w + r * a.ldw;
    if (a.scheme == quant::WeightScheme::kInt4) {
      for (int64_t g = warp; g < a.groups; g += kWarps) {
        const int64_t k0 = g * a.group_size, k1 = k0 + a.group_size < K ? k0 + a.group_size : K;
        float lo = INFINITY, hi = -INFINITY;
        for (int64_t k = k0 + lane; k < k1; k += 32) {
          const float v = to_float(wr[k]);
          lo = quant::min_keep_nan(lo, v);
          hi = quant::max_keep_nan(hi, v);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          lo = quant::min_keep_nan(lo, __shfl_xor_sync(0xffffffffu, lo, o));
          hi = quant::max_keep_nan(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        }
        float scale = 1.f, zero = 0.f;  // an empty group (K = 0)
        if (k1 > k0) {
          scale = quant::int4_weight_scale(lo, hi);
          zero = quant::int4_zero(lo, scale);
        }
        if (lane == 0) {
          a.scale[r * a.groups + g] = scale;
          a.zero[r * a.groups + g] = zero;
        }
        for (int64_t k = k0 + lane; k < k1; k += 32) a.q4[r * K + k] = quant::int4_code(to_float(wr[k]), scale, zero);
      }
      continue;
    }
    float scale;
    if (a.scheme == quant::WeightScheme::kTernary) {
      if (a.tensor_scale) {
        scale = *a.tensor_scale;
      } else {
        double sum = 0.0;
        for (int64_t k = threadIdx.x; k < K; k += kThreads) sum += fabs(static_cast<double>(to_float(wr[k])));
        scale = quant::ternary_weight_scale(block_sum(sum, dscratch), K);
      }
    } else {
      float amax = 0.f;
      for (int64_t k = threadIdx.x; k < K; k += kThreads) amax = quant::max_keep_nan(amax, fabsf(to_float(wr[k])));
      scale = quant::int8_weight_scale(block_max(amax, fscratch));
    }
    if (threadIdx.x == 0 && !a.tensor_scale) a.scale[r] = scale;
    const bool ternary = a.scheme == quant::WeightScheme::kTernary;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      const float v = to_float(wr[k]);
      a.q8[r * K + k] = ternary ? quant::ternary_code(v, scale) : quant::int8_code(v, scale);
    }
  }
}

template <typename T>
void launch(const quant::WeightQuantArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(a.rows < 65535 ? a.rows : 65535);
  quantize_weights_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(a.w), a);
}

}  // namespace

const char* quantize_weight_rows(const quant::WeightQuantArgs& a, void* stream) {
  if (a.rows == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.w_dtype) {
    case DType::kFloat32: launch<float>(a, s); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(a, s); break;
    case DType::kFloat16: launch<__half>(a, s); break;
  }
  return last_error();
}

}  // namespace flashkd::cuda
