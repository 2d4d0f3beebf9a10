// quantize_rows_int8: per-row absmax int8 quantization of float activations,
// exactly the formula of flashkd/quant_params.h (IEEE division, round half to
// even, clamp), so the codes and scales equal the CPU's bit for bit. One warp
// per row: two sweeps with 16-byte loads where the row start allows (load8
// falls back to scalar loads otherwise), a shuffle max in between.
#include "quant_device.cuh"
#include "quant_kernels.h"

namespace flashkd::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

__device__ __forceinline__ int8_t quantize(float x, float inv) {
  const float r = rintf(__fmul_rn(x, inv));  // round half to even
  return static_cast<int8_t>(__float2int_rn(fminf(fmaxf(r, -128.f), 127.f)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_rows_kernel(const T* x, int64_t ldx, int64_t rows, int64_t cols, int8_t* q, float* scale) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5); row < rows; row += stride) {
    const T* xr = x + row * ldx;
    const bool vec = vec_ok(xr, 1);
    float amax = 0.f;
    for (int64_t c = int64_t(lane) * kVec; c < cols; c += 32 * kVec) {
      float v[kVec];
      load8(xr, c, 1, cols, vec, v);
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        if (c + j < cols) amax = quant::max_keep_nan(amax, fabsf(v[j]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = quant::max_keep_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float clamped = quant::clip_to_eps(amax);
    const float inv = __fdiv_rn(127.f, clamped);
    if (lane == 0) scale[row] = __fdiv_rn(clamped, 127.f);

    int8_t* qr = q + row * cols;
    for (int64_t c = int64_t(lane) * kVec; c < cols; c += 32 * kVec) {
      float v[kVec];
      load8(xr, c, 1, cols, vec, v);
      if (c + kVec <= cols && reinterpret_cast<uintptr_t>(qr + c) % 8 == 0) {
        uint32_t word[2] = {0, 0};
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          word[j / 4] |= uint32_t(static_cast<uint8_t>(quantize(v[j], inv))) << (8 * (j % 4));
        *reinterpret_cast<uint2*>(qr + c) = make_uint2(word[0], word[1]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          if (c + j < cols) qr[c + j] = quantize(v[j], inv);
      }
    }
  }
}

template <typename T>
void launch(const quant::QuantizeRowsArgs& args, cudaStream_t stream) {
  const int64_t blocks = (args.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  quantize_rows_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kThreads, 0, stream>>>(
      static_cast<const T*>(args.x), args.ldx, args.rows, args.cols, args.q, args.scale);
}

}  // namespace

const char* quantize_rows_int8(const quant::QuantizeRowsArgs& args, void* stream) {
  if (args.rows == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.x_dtype) {
    case DType::kFloat32: launch<float>(args, s); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(args, s); break;
    case DType::kFloat16: launch<__half>(args, s); break;
  }
  return last_error();
}

}  // namespace flashkd::cuda
