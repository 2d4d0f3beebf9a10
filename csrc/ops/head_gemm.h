// The GEMMs of one LM head over a chunk of tokens, for the linear losses:
// logits = h Wᵀ + b, d(hidden) = d(logits) W, d(weight) (+)= d(logits)ᵀ h.
//
// They run in the inputs' dtype (cuBLAS; CPU BLAS or oneDNN), except on a
// CPU whose ATen has no oneDNN GEMM for 16-bit floats (an AVX2-only x86, or
// oneDNN disabled): there ATen multiplies bfloat16 / float16 matrices with a
// fallback loop, 7x (logits) to 250x (d(hidden)) slower than float32 at
// 256 x 512 x 32000 on a 2-core AMD EPYC (torch 2.14.1), so the head runs in
// float32 instead. The chunk's hidden states are converted whole; the weight
// a panel of rows at a time into a scratch buffer of `panel_bytes`, so no
// float32 copy of the whole weight exists; the logits and d(logits) are
// float32 (more accurate than the 16-bit logits the native path makes).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>

namespace flashkd::ops {

// Whether flashkd runs GEMMs on operands like `t` in float32 (the linear
// losses' heads here; QuantLinear's w4a16 product and backward through
// flashkd.cpu_gemm_dtype): CPU, 16-bit, and cpu_16bit_gemm() is "float32",
// or "auto" where ATen has no oneDNN GEMM for that dtype.
bool cpu_gemm_in_float32(const at::Tensor& t);

// The CPU choice for 16-bit GEMMs: "auto", "float32" or "native"; `force`
// changes it when non-empty, reset=True with no `force` goes back to the
// choice of FLASHKD_CPU_16BIT_GEMM (auto without it).
std::string cpu_16bit_gemm(c10::string_view force, bool reset);

class HeadGemm {
 public:
  // `in_float32` from cpu_gemm_in_float32; `panel_bytes` bounds the float32
  // weight panel then (at least one row is used).
  HeadGemm(const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool in_float32, int64_t panel_bytes);

  // The dtype of the logits the head makes (and of the d(logits) it takes).
  at::ScalarType logits_dtype() const { return in_float32_ ? at::kFloat : weight_.scalar_type(); }

  // out (n, V) = h Wᵀ + b, for h (n, D) in the weight's dtype; h is kept for backward.
  void forward(const at::Tensor& out, const at::Tensor& h);

  // For the chunk of the last forward: dh (n, D, the hidden dtype; skipped
  // when undefined) = d(logits) W, and d(weight)'s accumulator (skipped when
  // undefined) = (first chunk) or += d(logits)ᵀ h.
  void backward(const at::Tensor& dlogits, const at::Tensor& dh, const at::Tensor& dweight_acc, bool first);

 private:
  at::Tensor weight_panel(int64_t v0, int64_t rows);  // W[v0 : v0 + rows] in float32
  at::Tensor weight_;
  std::optional<at::Tensor> bias_;
  bool in_float32_;
  int64_t panel_rows_ = 0;
  at::Tensor panel_;                         // float32 scratch for weight rows
  int64_t held_v0_ = -1;                     // the first weight row panel_ holds (-1: none)
  at::Tensor h_;                             // the last forward's h (float32 copy in float32 mode)
  at::Tensor h_buffer_, dh_buffer_;          // float32 scratch, sized by the first (largest) chunk
};

}  // namespace flashkd::ops
