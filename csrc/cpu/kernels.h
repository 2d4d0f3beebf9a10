// Entry points of the CPU kernels. Each is built once per instruction set
// into its own namespace; the unqualified flashkd::cpu:: version dispatches.
#pragma once
#include <cstdint>
#include "flashkd/distill_params.h"

namespace flashkd::cpu {

#define FKD_DECLARE_CPU_KERNELS(isa) \
  namespace isa {                    \
  void distill_rows(const DistillParams& p, int64_t begin, int64_t end); \
  }

FKD_DECLARE_CPU_KERNELS(avx2)
FKD_DECLARE_CPU_KERNELS(avx512)
FKD_DECLARE_CPU_KERNELS(generic)
#undef FKD_DECLARE_CPU_KERNELS

// The instruction set the dispatcher uses: "avx512", "avx2" or "generic".
// FLASHKD_CPU_ISA in the environment, or set_isa(), overrides the detected one.
const char* isa();
void set_isa(const char* name);  // "" restores detection; unknown names throw

void distill_rows(const DistillParams& p, int64_t begin, int64_t end);

// grad[row, :] *= factor[row] (or factor[0] unless per_row) for rows [begin, end),
// in float32, rounded once; rows whose factor is 1 are skipped.
void scale_rows(void* grad, DType dtype, const RowLayout& layout, int64_t begin, int64_t end, int64_t cols,
                const float* factor, bool per_row);

}  // namespace flashkd::cpu
