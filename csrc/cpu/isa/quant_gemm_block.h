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

// The widest row store_row takes (its float staging row is on the stack).
constexpr int kEpilogueCols = 64;

// Output row m, columns [n, n + nr <= n + kEpilogueCols), of the int32 accumulators acc[0..nr):
// each scaled, biased and rounded once to the output dtype (or stored as is
// for an int32 output). `bias` holds the row's nr bias values as floats (zeros
// without a bias). Both epilogues below end here, so a block's results are the
// same bits whichever GEMM made its accumulators.
inline void store_row(const GemmEpilogue& e, int64_t m, int64_t n, int nr, const int32_t* acc, const float* bias) {
  if (e.out_int32) {
    for (int j = 0; j < nr; ++j) e.out_int32[m * e.ldo + n + j] = acc[j];
    return;
  }
  float row[kEpilogueCols];
  const float a_scale = e.a_scale[m];
  if (e.w_scale_per_row) {  // branches outside the loops, which then vectorize
    for (int j = 0; j < nr; ++j) row[j] = static_cast<float>(acc[j]) * a_scale * e.w_scale[n + j];
  } else {
    for (int j = 0; j < nr; ++j) row[j] = static_cast<float>(acc[j]) * a_scale * e.w_scale[0];
  }
  if (e.bias)
    for (int j = 0; j < nr; ++j) row[j] += bias[j];
  store_floats(row, nr, static_cast<char*>(e.out) + (m * e.ldo + n) * dtype_size(e.out_dtype), e.out_dtype, 1);
}

// Columns [n, n + nr) of the bias as floats in out (zeros without a bias).
inline void load_bias(const GemmEpilogue& e, int64_t n, int nr, float* out) {
  if (e.bias) load_floats(static_cast<const char*>(e.bias) + n * dtype_size(e.bias_dtype), e.bias_dtype, 1, nr, out);
  else std::fill(out, out + nr, 0.f);
}

// Writes rows [m, m + mr) x columns [n, n + nr) of the block's results.
void store_block(const GemmEpilogue& e, int64_t m, int mr, int64_t n, int nr, const DotAcc& acc) {
  float bias[kDotRows];
  load_bias(e, n, nr, bias);
  for (int i = 0; i < mr; ++i) store_row(e, m + i, n, nr, acc[i], bias);
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
