// Weight quantizers of the quantized linear layers (formulas in
// flashkd/quant_params.h), one row of W at a time: a pass for the row's (or
// each group's) statistics, a pass to write the codes. Compiled once per
// instruction set; the loops vectorize.
#include <algorithm>
#include <cmath>
#include "flashkd/cpu_convert.h"
#include "quant_kernels.h"
#include "row_sums.h"

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

// q[k] = code(x[k], scale) for k < K (code: a quant_params.h quantizer).
template <class Code>
void write_codes(const float* x, int64_t K, float scale, int8_t* q, Code code) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) q[k] = code(x[k], scale);
}

}  // namespace

void quantize_weight_rows(const quant::WeightQuantArgs& a, int64_t row_begin, int64_t row_end) {
  const int64_t K = a.cols;
  for_each_float_row(a.w, a.w_dtype, a.ldw, K, row_begin, row_end, [&](int64_t r, const float* x) {
    switch (a.scheme) {
      case quant::WeightScheme::kTernary: {
        float scale;
        if (a.tensor_scale) {
          scale = *a.tensor_scale;
        } else {
          // |w| is exact in float64; the order of the sum is fixed (row_sums.h),
          // so the rounded scale is the same on every instruction set.
          const double sum = row_sum(K, [&](int64_t k) { return std::fabs(static_cast<double>(x[k])); });
          scale = quant::ternary_weight_scale(sum, K);
          a.scale[r] = scale;
        }
        write_codes(x, K, scale, a.q8 + r * K, [](float v, float s) { return quant::ternary_code(v, s); });
        break;
      }
      case quant::WeightScheme::kInt8: {
        const float scale = quant::int8_weight_scale(abs_max(x, K));
        a.scale[r] = scale;
        write_codes(x, K, scale, a.q8 + r * K, [](float v, float s) { return quant::int8_code(v, s); });
        break;
      }
      case quant::WeightScheme::kInt4: {
        uint8_t* q = a.q4 + r * K;
        for (int64_t g = 0; g < a.groups; ++g) {
          const int64_t k0 = g * a.group_size, k1 = std::min(K, k0 + a.group_size);
          float scale = 1.f, zero = 0.f;  // an empty group (K = 0)
          if (k1 > k0) {
            const MinMax range = min_max(x + k0, k1 - k0);
            scale = quant::int4_weight_scale(range.lo, range.hi);
            zero = quant::int4_zero(range.lo, scale);
          }
          a.scale[r * a.groups + g] = scale;
          a.zero[r * a.groups + g] = zero;
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) q[k] = quant::int4_code(x[k], scale, zero);
        }
        break;
      }
    }
  });
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
