// The CPU side of the quantized matmuls' GEMMs (csrc/ops/quant.cpp checks the
// arguments and allocates; these run them): output blocks spread over
// threads, oneDNN's int32 main loop where it is faster, and ATen's float GEMM
// for the int4 product over many rows.
#pragma once
#include <ATen/ATen.h>
#include "flashkd/quant_params.h"

namespace flashkd::ops::quant_cpu {

// `args` with its epilogue set; a2 the contiguous (M, K) int8 activations
// args points into, w the contiguous (N, K) int8 weights.
void int8_gemm(const quant::Int8GemmArgs& args, const at::Tensor& a2, const at::Tensor& w);

// As int8_gemm, for the packed ternary weights args points at.
void ternary_gemm(const quant::TernaryGemmArgs& args, const at::Tensor& a2);

// out (M, N, x's dtype) = x2 (M, K) @ dequantized(W)^T + bias (undefined:
// none), for the contiguous x2, bias and out that args points into.
void int4_gemm(const quant::Int4GemmArgs& args, const at::Tensor& x2, const at::Tensor& bias, const at::Tensor& out);

}  // namespace flashkd::ops::quant_cpu
