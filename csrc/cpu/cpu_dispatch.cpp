// Chooses the instruction set of the CPU kernels once, at first use.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include "kernels.h"

namespace flashkd::cpu {
namespace {

Isa detect() {
#if defined(FKD_HAVE_X86_ISAS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
  throw std::runtime_error("flashkd: this x86-64 CPU lacks AVX2/FMA/F16C, which the wheel needs");
#else
  return Isa::kGeneric;
#endif
}

Isa parse(const char* name) {
  const std::string s(name);
#if defined(FKD_HAVE_X86_ISAS)
  const Isa best = detect();
  if (s == "avx2") return Isa::kAvx2;
  if (s == "avx512") {
    if (best != Isa::kAvx512) throw std::invalid_argument("flashkd: this CPU has no AVX-512");
    return Isa::kAvx512;
  }
#else
  if (s == "generic") return Isa::kGeneric;
#endif
  throw std::invalid_argument("flashkd: unknown CPU instruction set '" + s + "'");
}

Isa initial() {
  const char* env = std::getenv("FLASHKD_CPU_ISA");
  return (env && *env) ? parse(env) : detect();
}

Isa& current() {
  static Isa isa = initial();
  return isa;
}

}  // namespace

Isa current_isa() { return current(); }

const char* isa() {
  switch (current()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

void set_isa(const char* name) { current() = (name && *name) ? parse(name) : detect(); }

void distill_rows(const DistillParams& p, int64_t begin, int64_t end) {
  FKD_CPU_DISPATCH(distill_rows, p, begin, end);
}

void scale_rows(void* grad, DType dtype, const RowLayout& layout, int64_t begin, int64_t end, int64_t cols,
                const float* factor, bool per_row) {
  FKD_CPU_DISPATCH(scale_rows, grad, dtype, layout, begin, end, cols, factor, per_row);
}

void soft_cap_values(float* z, int64_t n, float cap) { FKD_CPU_DISPATCH(soft_cap_values, z, n, cap); }

}  // namespace flashkd::cpu
