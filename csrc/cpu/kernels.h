// Entry points of the CPU kernels. Each is built once per instruction set
// into its own namespace; the unqualified flashkd::cpu:: version dispatches.
#pragma once
#include <cstdint>
#include "flashkd/distill_params.h"

namespace flashkd::cpu {

#define FKD_DECLARE_CPU_KERNELS(isa) \
  namespace isa {                    \
  void distill_rows(const DistillParams& p, int64_t begin, int64_t end); \
  void scale_rows(void* grad, DType dtype, const RowLayout& layout, int64_t begin, int64_t end, int64_t cols, \
                  const float* factor, bool per_row); \
  void soft_cap_values(float* z, int64_t n, float cap); \
  }

FKD_DECLARE_CPU_KERNELS(avx2)
FKD_DECLARE_CPU_KERNELS(avx512)
FKD_DECLARE_CPU_KERNELS(generic)
#undef FKD_DECLARE_CPU_KERNELS

enum class Isa { kGeneric, kAvx2, kAvx512 };
Isa current_isa();

// Calls flashkd::cpu::<isa>::fn(args...) for the instruction set in use. A new
// kernel family: put its per-ISA code in csrc/cpu/isa/ (declared for all three
// namespaces, as below) and its dispatcher in csrc/cpu/, using this macro.
#if defined(FKD_HAVE_X86_ISAS)
#define FKD_CPU_DISPATCH(fn, ...)                                                        \
  return ::flashkd::cpu::current_isa() == ::flashkd::cpu::Isa::kAvx512                 \
             ? ::flashkd::cpu::avx512::fn(__VA_ARGS__)                                 \
             : ::flashkd::cpu::avx2::fn(__VA_ARGS__)
#else
#define FKD_CPU_DISPATCH(fn, ...) return ::flashkd::cpu::generic::fn(__VA_ARGS__)
#endif

// The instruction set the dispatcher uses: "avx512", "avx2" or "generic".
// FLASHKD_CPU_ISA in the environment, or set_isa(), overrides the detected one.
const char* isa();
void set_isa(const char* name);  // "" restores detection; unknown names throw

void distill_rows(const DistillParams& p, int64_t begin, int64_t end);

// grad[row, :] *= factor[row] (or factor[0] unless per_row) for rows [begin, end),
// in float32, rounded once; rows whose factor is 1 are skipped.
void scale_rows(void* grad, DType dtype, const RowLayout& layout, int64_t begin, int64_t end, int64_t cols,
                const float* factor, bool per_row);

// z[j] = cap * tanh(z[j] / cap) for j < n, with the row kernel's soft cap: the
// same bits as the logits its LSE and gradients were formed from.
void soft_cap_values(float* z, int64_t n, float cap);

}  // namespace flashkd::cpu
