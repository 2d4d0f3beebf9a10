// CPU entry points of the quantized matmuls (csrc/cpu/isa/quant_*.cpp), over
// the argument structs the CUDA kernels take (flashkd/quant_params.h). Each
// call does one block of the output so the glue can spread blocks over
// threads with at::parallel_for; the unqualified flashkd::cpu:: version
// dispatches to the instruction set in use.
#pragma once
#include <cstdint>
#include "flashkd/quant_params.h"

namespace flashkd::cpu {

// The ternary GEMM's activations, rearranged once per call so that the 2-bit
// weight codes are multiplied without decoding (csrc/cpu/isa/quant_ternary_gemm.cpp):
// (M, ld) int8, ld = ternary_activation_width(K), and the row sums of a.
struct TernaryActivations {
  int8_t* a;
  int64_t ld;
  int32_t* sum;
};
constexpr int64_t kTernaryBlock = 256;  // values of k per block: 64 packed bytes
inline int64_t ternary_activation_width(int64_t K) { return (K + kTernaryBlock - 1) / kTernaryBlock * kTernaryBlock; }

#define FKD_DECLARE_QUANT_KERNELS(isa)                                                           \
  namespace isa {                                                                                \
  void quantize_rows_int8(const quant::QuantizeRowsArgs& a, int64_t row_begin, int64_t row_end); \
  void quantize_weight_rows(const quant::WeightQuantArgs& a, int64_t row_begin, int64_t row_end); \
  void int8_gemm(const quant::Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);  \
  void ternary_prepare_activations(const quant::TernaryGemmArgs& a, const TernaryActivations& out,     \
                                   int64_t m0, int64_t m1);                                          \
  void ternary_gemm(const quant::TernaryGemmArgs& a, const TernaryActivations& act, int64_t m0, int64_t m1, \
                    int64_t n0, int64_t n1);                                                         \
  void int4_gemm(const quant::Int4GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);  \
  void int4_dequantize_rows(const quant::Int4GemmArgs& a, int64_t n0, int64_t n1, float* out);   \
  void int32_epilogue(const quant::GemmEpilogue& e, const int32_t* acc, int64_t ldacc, int64_t m0,  \
                      int64_t m1, int64_t n0, int64_t n1);                                          \
  void ternary_unpack_rows(const quant::TernaryGemmArgs& a, int64_t n0, int64_t n1, int8_t* out);    \
  }

FKD_DECLARE_QUANT_KERNELS(avx2)
FKD_DECLARE_QUANT_KERNELS(avx512)
FKD_DECLARE_QUANT_KERNELS(generic)
#undef FKD_DECLARE_QUANT_KERNELS

// Rows [row_begin, row_end) of the per-token int8 activation quantization.
void quantize_rows_int8(const quant::QuantizeRowsArgs& a, int64_t row_begin, int64_t row_end);
// Rows [row_begin, row_end) of a weight quantizer (ternary, int8 or int4).
void quantize_weight_rows(const quant::WeightQuantArgs& a, int64_t row_begin, int64_t row_end);
// Output block rows [m0, m1) x columns [n0, n1) of each GEMM, epilogue included.
void int8_gemm(const quant::Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// Activation rows [m0, m1) of a ternary GEMM rearranged into `out`, before any
// ternary_gemm block of the call runs.
void ternary_prepare_activations(const quant::TernaryGemmArgs& a, const TernaryActivations& out, int64_t m0,
                                 int64_t m1);
void ternary_gemm(const quant::TernaryGemmArgs& a, const TernaryActivations& act, int64_t m0, int64_t m1,
                  int64_t n0, int64_t n1);
void int4_gemm(const quant::Int4GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
// Weight rows [n0, n1) of an int4 GEMM dequantized, (q - zero) * scale, into
// out (row-major, K floats a row): the prefill path hands them to BLAS.
void int4_dequantize_rows(const quant::Int4GemmArgs& a, int64_t n0, int64_t n1, float* out);
// The epilogue of output rows [m0, m1) x columns [n0, n1) from int32
// accumulators made elsewhere (oneDNN's GEMM): acc[m * ldacc + (n - n0)]
// holds output (m, n), a panel of columns from n0. The same bits as the
// GEMMs' own epilogue.
void int32_epilogue(const quant::GemmEpilogue& e, const int32_t* acc, int64_t ldacc, int64_t m0, int64_t m1,
                    int64_t n0, int64_t n1);
// Weight rows [n0, n1) of a ternary GEMM decoded to int8 {-1, 0, 1} into out
// (row-major, K a row): the prefill path hands them to oneDNN's int8 GEMM.
void ternary_unpack_rows(const quant::TernaryGemmArgs& a, int64_t n0, int64_t n1, int8_t* out);

// Which int8 dot product the int8 GEMM uses: "avx512-vnni", "avx512", "avx2"
// or "generic" (for the benchmark report and tests). The ternary GEMM runs
// vpdpbusd under "avx512-vnni", scalar code under "generic", else vpmaddubsw.
const char* int8_dot_kind();

}  // namespace flashkd::cpu
