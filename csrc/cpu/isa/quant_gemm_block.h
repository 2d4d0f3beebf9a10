// The blocked GEMM loop and dequantizing epilogue shared by the int8 and
// ternary GEMMs (quant_int8_gemm.cpp, quant_ternary_gemm.cpp).
//
// Blocking: the glue hands each thread an output block [m0, m1) x [n0, n1)
// (its activation rows stay in L2). Within it, four weight rows at a time are
// made available in the form the dot product reads and reused against every
// activation row of the block, four rows per dot-product call. At decode
// sizes (M = 1..16) this is a GEMV that reads the weights once.
#pragma once
#include <algorithm>
#include "flashkd/cpu_convert.h"
#include "flashkd/quant_params.h"
#include "quant_int8_dot.h"

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

using quant::GemmEpilogue;

// Writes rows [m, m + mr) x columns [n, n + nr) of the block's results.
void store_block(const GemmEpilogue& e, int64_t m, int mr, int64_t n, int nr, const DotAcc& acc) {
  if (e.out_int32) {
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < nr; ++j) e.out_int32[(m + i) * e.ldo + n + j] = acc[i][j];
    return;
  }
  float bias[kDotRows] = {0.f, 0.f, 0.f, 0.f};
  if (e.bias)
    load_floats(static_cast<const char*>(e.bias) + n * dtype_size(e.bias_dtype), e.bias_dtype, 1, nr, bias);
  float w_scale[kDotRows];
  for (int j = 0; j < nr; ++j) w_scale[j] = e.w_scale_per_row ? e.w_scale[n + j] : e.w_scale[0];
  const int64_t osize = dtype_size(e.out_dtype);
  for (int i = 0; i < mr; ++i) {
    const float a_scale = e.a_scale[m + i];
    float row[kDotRows];
    for (int j = 0; j < nr; ++j) {
      const float scaled = static_cast<float>(acc[i][j]) * a_scale * w_scale[j];
      row[j] = e.bias ? scaled + bias[j] : scaled;
    }
    store_floats(row, nr, static_cast<char*>(e.out) + ((m + i) * e.ldo + n) * osize, e.out_dtype, 1);
  }
}

// `weight_rows(n, nr, rows)` fills rows[0..4) with weight rows n..n+nr-1 as
// Dot reads them, elements of type W (entries past nr repeat row n: computed,
// never stored). `row_offset`, when set, is subtracted from every result of
// activation row m (row_offset[m]) before the epilogue.
template <class Dot, class W, class WeightRows>
void gemm_block(const int8_t* a, int64_t lda, int64_t K, const GemmEpilogue& epi, const int32_t* row_offset,
                int64_t m0, int64_t m1, int64_t n0, int64_t n1, WeightRows&& weight_rows) {
  for (int64_t n = n0; n < n1; n += kDotRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kDotRows, n1 - n));
    const W* w[kDotRows];
    weight_rows(n, nr, w);
    int32_t w_sum[kDotRows] = {0, 0, 0, 0};
    if constexpr (Dot::kNeedsWeightSums)
      for (int j = 0; j < kDotRows; ++j) w_sum[j] = Dot::row_sum(w[j], K);
    for (int64_t m = m0; m < m1; m += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, m1 - m));
      const int8_t* rows[4];
      for (int i = 0; i < 4; ++i) rows[i] = a + (m + std::min(i, mr - 1)) * lda;
      DotAcc acc;
      switch (mr) {
        case 1: Dot::template run<1>(rows, w, w_sum, K, acc); break;
        case 2: Dot::template run<2>(rows, w, w_sum, K, acc); break;
        case 3: Dot::template run<3>(rows, w, w_sum, K, acc); break;
        default: Dot::template run<4>(rows, w, w_sum, K, acc); break;
      }
      if (row_offset)
        for (int i = 0; i < mr; ++i)
          for (int j = 0; j < nr; ++j) acc[i][j] -= row_offset[m + i];
      store_block(epi, m, mr, n, nr, acc);
    }
  }
}

}  // namespace
}  // namespace flashkd::cpu::FKD_CPU_ISA
