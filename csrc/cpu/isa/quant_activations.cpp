// Per-token int8 activation quantization (formula in flashkd/quant_params.h):
// one pass for the row's absolute maximum, one to scale, round half to even
// and clamp. Compiled once per instruction set; the loops vectorize.
#include <algorithm>
#include <cmath>
#include "flashkd/cpu_convert.h"
#include "quant_kernels.h"

namespace flashkd::cpu::FKD_CPU_ISA {

void quantize_rows_int8(const quant::QuantizeRowsArgs& a, int64_t row_begin, int64_t row_end) {
  const int64_t K = a.cols;
  for_each_float_row(a.x, a.x_dtype, a.ldx, K, row_begin, row_end, [&](int64_t r, const float* x) {
    const float clipped = quant::clip_to_eps(abs_max(x, K));
    const float inv = 127.f / clipped;
    a.scale[r] = clipped / 127.f;
    int8_t* q = a.q + r * K;
    // No `omp simd` here: with it GCC 12 leaves this float -> int8 loop scalar
    // ("no vectype"), without it the loop vectorizes (checked with -fopt-info-vec).
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::nearbyint(x[k] * inv);  // round half to even (default rounding mode)
      q[k] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, v)));
    }
  });
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
