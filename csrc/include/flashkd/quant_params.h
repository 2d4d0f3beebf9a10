// Packed weight formats and kernel arguments of the quantized matmuls, shared
// by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels. Never includes torch.
//
// All matrices are row-major with the given leading dimension (in elements).
// Weights are (N = out_features, K = in_features), like nn.Linear.
//
// Formats (flashkd.reference.quant is the executable statement of them):
//  * activations, per row m:  amax = max_k |x[m,k]| (float32)
//      a_scale[m] = max(amax, 1e-5f) / 127.f
//      inv        = 127.f / max(amax, 1e-5f)
//      q[m,k]     = (int8) clamp(rint(x[m,k] * inv), -128, 127)   (round half to even)
//  * int8 weights: int8 (N, K), w_scale float32 per output row.
//  * ternary weights packed: uint8 (N, ceil(K/4)); the 2-bit code of w[n,k]
//    is w + 1 in {0, 1, 2}, stored in bits [2i, 2i+2) of byte k/4 with
//    i = k % 4; padding codes past K are 1 (w = 0).
//  * int4 weights packed: uint8 (N, ceil(K/2)); q[n,k] in [0, 15] in the low
//    nibble of byte k/2 for even k, high nibble for odd k; padding nibbles 0.
//    Group g = k / group_size has float32 scale[n, g] and zero[n, g]
//    (an integer value in [0, 15]); w = (q - zero) * scale.
#pragma once
#include <cmath>
#include <cstdint>
#include "flashkd/common.h"

namespace flashkd::quant {

constexpr int kTernaryPerByte = 4;
constexpr int kInt4PerByte = 2;

FKD_HD int ternary_value(uint8_t byte, int i) { return static_cast<int>((byte >> (2 * i)) & 3u) - 1; }
FKD_HD int int4_value(uint8_t byte, int i) { return static_cast<int>((byte >> (4 * i)) & 15u); }

// ---- weight quantizers (training form every step, and freeze) -------------
//  * ternary (w1.58a8): gamma = mean |w| over the row (or the whole tensor),
//    summed in float64, rounded to float32; scale = max(gamma, 1e-5);
//    q = clamp(rint(w / scale), -1, 1)
//  * int8 (w8a8): scale = max(max |w|, 1e-5) / 127; q = clamp(rint(w / scale), -127, 127)
//  (a NaN in a row, or in an int4 group, makes its scale, and int4's zero, NaN
//  and its codes 0: the outputs it reaches are NaN, as in the oracle)
//  * int4 (w4a16), per group of group_size along the row: scale =
//    max(max - min, 1e-5) / 15, zero = clamp(rint(-min / scale), 0, 15),
//    q = clamp(rint(w / scale) + zero, 0, 15); an empty group (K = 0) has
//    scale 1 and zero 0.
// Divisions are IEEE float32 and rint rounds half to even on both devices.
enum class WeightScheme : int32_t { kTernary = 0, kInt8 = 1, kInt4 = 2 };

constexpr float kScaleEps = 1e-5f;

FKD_HD float rint_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);  // the default rounding mode: half to even
#endif
}

FKD_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FKD_HD float clamp_to(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }
// A rounded value as a code in [lo, hi]; a NaN (the value of a NaN weight, or
// any weight of a row whose scale is NaN) gets code 0, in every scheme's
// range, where a float -> int cast of NaN would be undefined. The NaN scale
// still makes the outputs it reaches NaN.
FKD_HD float code_in(float v, float lo, float hi) { return v != v ? 0.f : clamp_to(v, lo, hi); }

// max / min that keep a NaN operand, where fmaxf, fminf and std::max drop it:
// a NaN weight or activation must make its scale NaN, and so its outputs, as
// torch's amax / amin do in the oracle, not vanish into valid codes.
FKD_HD float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }
FKD_HD float min_keep_nan(float a, float b) { return (a < b || a != a) ? a : b; }

// max(v, 1e-5) of every scale formula, activations' too; a NaN stays NaN (a
// row of no values, or one holding a NaN), as torch's clamp_min keeps it.
FKD_HD float clip_to_eps(float v) { return v < kScaleEps ? kScaleEps : v; }

FKD_HD float ternary_weight_scale(double abs_sum, int64_t count) {
  return clip_to_eps(static_cast<float>(abs_sum / static_cast<double>(count)));
}
FKD_HD int8_t ternary_code(float w, float scale) {
  return static_cast<int8_t>(code_in(rint_even(div_rn(w, scale)), -1.f, 1.f));
}
FKD_HD float int8_weight_scale(float amax) { return div_rn(clip_to_eps(amax), 127.f); }
FKD_HD int8_t int8_code(float w, float scale) {
  return static_cast<int8_t>(code_in(rint_even(div_rn(w, scale)), -127.f, 127.f));
}
FKD_HD float int4_weight_scale(float lo, float hi) {
  return div_rn(clip_to_eps(hi - lo), 15.f);
}
FKD_HD float int4_zero(float lo, float scale) { return clamp_to(rint_even(div_rn(-lo, scale)), 0.f, 15.f); }
FKD_HD uint8_t int4_code(float w, float scale, float zero) {
  return static_cast<uint8_t>(code_in(rint_even(div_rn(w, scale)) + zero, 0.f, 15.f));
}

// w (rows, cols) float -> unpacked codes and scales: q8 (rows, cols) int8 and
// scale (rows) for ternary and int8 (a per-tensor ternary scale is computed
// by the caller and passed as tensor_scale, then scale is not written); q4
// (rows, cols) uint8 and scale, zero (rows, groups) for int4.
struct WeightQuantArgs {
  const void* w;
  DType w_dtype;
  int64_t ldw;
  int64_t rows, cols;
  WeightScheme scheme;
  int64_t group_size, groups;
  const float* tensor_scale;
  int8_t* q8;
  uint8_t* q4;
  float* scale;
  float* zero;
};

// x (M, K) float -> q (M, K) int8 contiguous, a_scale (M) float32.
struct QuantizeRowsArgs {
  const void* x;
  DType x_dtype;
  int64_t ldx;
  int64_t rows, cols;
  int8_t* q;
  float* scale;
};

// Shared epilogue: out[m, n] = float(acc) * a_scale[m] * w_scale[n or 0] + bias[n],
// computed in float32 in that order, stored as out_dtype. With out_int32 set
// instead, the exact int32 accumulators are stored and no scales are read.
struct GemmEpilogue {
  const float* a_scale;    // (M)
  const float* w_scale;    // (N) or (1)
  bool w_scale_per_row;
  const void* bias;        // (N) or nullptr
  DType bias_dtype;
  void* out;               // (M, N), leading dimension ldo
  DType out_dtype;
  int32_t* out_int32;      // (M, N), leading dimension ldo; when set, out is unused
  int64_t ldo;
};

// int8 activations x int8 weights (w8a8, and w1.58a8 while training: the
// ternary weights held as int8 in {-1, 0, 1}).
struct Int8GemmArgs {
  const int8_t* a;  int64_t lda;  // (M, K)
  const int8_t* w;  int64_t ldw;  // (N, K)
  int64_t M, N, K;
  GemmEpilogue epi;
};

// int8 activations x packed ternary weights (w1.58a8 inference).
struct TernaryGemmArgs {
  const int8_t* a;  int64_t lda;        // (M, K)
  const uint8_t* w; int64_t ldw_bytes;  // (N, ceil(K/4))
  int64_t M, N, K;
  GemmEpilogue epi;
};

// float activations x packed int4 weights (w4a16). Accumulates in float32;
// out and bias have x's dtype. out[m,n] = sum_k x[m,k] * w[n,k] + bias[n].
struct Int4GemmArgs {
  const void* x;    DType x_dtype; int64_t ldx;  // (M, K)
  const uint8_t* w; int64_t ldw_bytes;           // (N, ceil(K/2))
  const float* scale;                            // (N, groups), contiguous
  const float* zero;                             // (N, groups), contiguous
  int64_t group_size, groups;
  int64_t M, N, K;
  const void* bias;                              // (N) or nullptr, x's dtype
  void* out; int64_t ldo;                        // (M, N), x's dtype
};

}  // namespace flashkd::quant
