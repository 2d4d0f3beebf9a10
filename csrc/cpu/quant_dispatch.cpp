// Dispatches the quantized-matmul CPU kernels to the instruction set in use.
#include "quant_kernels.h"
#include "kernels.h"

namespace flashkd::cpu {

void quantize_rows_int8(const quant::QuantizeRowsArgs& a, int64_t row_begin, int64_t row_end) {
  FKD_CPU_DISPATCH(quantize_rows_int8, a, row_begin, row_end);
}

void quantize_weight_rows(const quant::WeightQuantArgs& a, int64_t row_begin, int64_t row_end) {
  FKD_CPU_DISPATCH(quantize_weight_rows, a, row_begin, row_end);
}

void int8_gemm(const quant::Int8GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  FKD_CPU_DISPATCH(int8_gemm, a, m0, m1, n0, n1);
}

void ternary_prepare_activations(const quant::TernaryGemmArgs& a, const TernaryActivations& out, int64_t m0,
                                 int64_t m1) {
  FKD_CPU_DISPATCH(ternary_prepare_activations, a, out, m0, m1);
}

void ternary_gemm(const quant::TernaryGemmArgs& a, const TernaryActivations& act, int64_t m0, int64_t m1,
                  int64_t n0, int64_t n1) {
  FKD_CPU_DISPATCH(ternary_gemm, a, act, m0, m1, n0, n1);
}

void int4_gemm(const quant::Int4GemmArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  FKD_CPU_DISPATCH(int4_gemm, a, m0, m1, n0, n1);
}

void int4_dequantize_rows(const quant::Int4GemmArgs& a, int64_t n0, int64_t n1, float* out) {
  FKD_CPU_DISPATCH(int4_dequantize_rows, a, n0, n1, out);
}

void int32_epilogue(const quant::GemmEpilogue& e, const int32_t* acc, int64_t ldacc, int64_t m0, int64_t m1,
                    int64_t n0, int64_t n1) {
  FKD_CPU_DISPATCH(int32_epilogue, e, acc, ldacc, m0, m1, n0, n1);
}

void ternary_unpack_rows(const quant::TernaryGemmArgs& a, int64_t n0, int64_t n1, int8_t* out) {
  FKD_CPU_DISPATCH(ternary_unpack_rows, a, n0, n1, out);
}

const char* int8_dot_kind() {
#if defined(FKD_HAVE_X86_ISAS)
  if (current_isa() == Isa::kAvx512) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") ? "avx512-vnni" : "avx512";
  }
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace flashkd::cpu
