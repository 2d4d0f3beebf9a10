// Checks cpu_convert.h's bit-manipulation fp16 conversions (used where the
// compiler has no half type in C++: GCC 11, CPUs other than x86 and ARM)
// against the compiler's own half type: every one of the 65536 halves to
// float, and to half every float whose 13 bits below the half's mantissa sit
// at a rounding boundary (for every sign, exponent and kept mantissa), plus
// random floats. NaNs must stay NaN; every other result must match bit for
// bit. Exit status 77: this compiler has no half type to compare with.
// Built and run by tests/test_build.py.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include "flashkd/cpu_convert.h"

using namespace flashkd::cpu;

int main() {
#if !defined(FKD_HALF_TYPE)
  std::puts("no half type in C++ to compare with");
  return 77;
#else
  long failures = 0;
  auto report = [&](const char* what, uint32_t input, uint32_t got, uint32_t want) {
    if (failures++ < 10) std::printf("%s(0x%08x): 0x%08x, want 0x%08x\n", what, input, got, want);
  };
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = fp16_to_float_bits(static_cast<uint16_t>(h)), want = fp16_to_float(static_cast<uint16_t>(h));
    uint32_t g, w;
    std::memcpy(&g, &got, 4);
    std::memcpy(&w, &want, 4);
    if (std::isnan(want) ? !std::isnan(got) : g != w) report("fp16_to_float_bits", h, g, w);
  }
  auto check_to_half = [&](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    const uint16_t got = float_to_fp16_bits(f), want = float_to_fp16(f);
    const bool want_nan = (want & 0x7c00u) == 0x7c00u && (want & 0x3ffu);
    const bool got_nan = (got & 0x7c00u) == 0x7c00u && (got & 0x3ffu);
    if (want_nan ? !got_nan : got != want) report("float_to_fp16_bits", u, got, want);
  };
  const uint32_t low_bits[] = {0x0, 0x1, 0xfff, 0x1000, 0x1001, 0x1fff};
  for (uint32_t high = 0; high < (1u << 19); ++high)
    for (uint32_t low : low_bits) check_to_half(high << 13 | low);
  std::mt19937 rng(12345);
  for (int i = 0; i < 4000000; ++i) check_to_half(static_cast<uint32_t>(rng()));
  std::printf("%ld mismatches\n", failures);
  return failures ? 1 : 0;
#endif
}
