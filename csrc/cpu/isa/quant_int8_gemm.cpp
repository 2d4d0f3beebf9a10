// int8 x int8 GEMM (w8a8, and w1.58a8 while training: ternary weights held as
// int8), with the dequantizing epilogue of flashkd/quant_params.h. Compiled
// once per instruction set. Blocking in quant_gemm_block.h; the weight rows
// are read in place.
#include "quant_gemm_block.h"
#include "quant_int8_dot.h"
#include "quant_kernels.h"

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

// Calls f with the dot-product implementation this CPU runs best.
template <class F>
void with_dot(F&& f) {
#if defined(__AVX512F__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni")) return f(VnniDot{});
  return f(Avx512Dot{});
#elif defined(__AVX2__)
  return f(Avx2Dot{});
#else
  return f(ScalarDot{});
#endif
}

}  // namespace

void int8_gemm(const quant::Int8GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  with_dot([&](auto dot) {
    gemm_block<decltype(dot), int8_t>(g.a, g.lda, g.K, g.epi, nullptr, m0, m1, n0, n1,
                                      [&](int64_t n, int nr, const int8_t** w) {
      for (int j = 0; j < kDotRows; ++j) w[j] = g.w + (n + (j < nr ? j : 0)) * g.ldw;
    });
  });
}

void int32_epilogue(const quant::GemmEpilogue& e, const int32_t* acc, int64_t ldacc, int64_t m0, int64_t m1,
                    int64_t n0, int64_t n1) {
  float bias[kEpilogueCols];
  for (int64_t n = n0; n < n1; n += kEpilogueCols) {
    const int nr = static_cast<int>(std::min<int64_t>(kEpilogueCols, n1 - n));
    load_bias(e, n, nr, bias);
    for (int64_t m = m0; m < m1; ++m) store_row(e, m, n, nr, acc + m * ldacc + (n - n0), bias);
  }
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
