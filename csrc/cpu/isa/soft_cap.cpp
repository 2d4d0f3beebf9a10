// The logit soft cap on its own, for the LSE backward, which recomputes the
// capped logits: the loop of the row kernel (distill_row.h), built with the
// same flags, so the values come out as the very bits the forward's LSE was
// formed from. torch's c * tanh(z / c) differs from them by up to ~5 units of
// 2^-24 (relative) in a few percent of logits; exp(capped - lse) then moved
// d lse / dz by as much times |capped| (48 units of 2^-24 at a cap of 30).
#include "flashkd/fast_math.h"
#include "kernels.h"

namespace flashkd::cpu::FKD_CPU_ISA {

void soft_cap_values(float* z, int64_t n, float cap) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] = soft_cap(z[j], cap);
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
