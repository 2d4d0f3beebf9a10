// int8 x int8 GEMM (w8a8, and w1.58a8 while training) and int8 x packed
// ternary GEMM (w1.58a8 inference), with the dequantizing epilogue of
// flashkd/quant_params.h. Compiled once per instruction set.
//
// Blocking: the glue hands each thread an output block [m0, m1) x [n0, n1)
// (its activation rows stay in L2). Within it, four weight rows at a time are
// made available as int8 (read in place for int8 weights; decoded from 2-bit
// codes into a 4 x K int8 tile for ternary ones) and reused against every
// activation row of the block, four rows per dot-product call. At decode
// sizes (M = 1..16) this is a GEMV that reads the packed weights once; at
// prefill/training sizes each decoded tile serves the whole M block.
#include <algorithm>
#include <cstring>
#include <vector>
#include "flashkd/cpu_convert.h"
#include "quant_int8_dot.h"
#include "quant_kernels.h"

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

// `weight_rows(n, nr, rows)` fills rows[0..4) with int8 weight rows n..n+nr-1
// (entries past nr repeat row n: computed, never stored).
template <class Dot, class WeightRows>
void gemm_block(const int8_t* a, int64_t lda, int64_t K, const GemmEpilogue& epi, int64_t m0, int64_t m1,
                int64_t n0, int64_t n1, WeightRows&& weight_rows) {
  for (int64_t n = n0; n < n1; n += kDotRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kDotRows, n1 - n));
    const int8_t* w[kDotRows];
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
      store_block(epi, m, mr, n, nr, acc);
    }
  }
}

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

// Byte b -> its four ternary values as int8, little-endian (code c -> c - 1).
struct TernaryTable {
  uint32_t bytes[256];
  TernaryTable() {
    for (int b = 0; b < 256; ++b) {
      uint32_t v = 0;
      for (int i = 0; i < quant::kTernaryPerByte; ++i)
        v |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(quant::ternary_value(b, i)))) << (8 * i);
      bytes[b] = v;
    }
  }
};

void decode_ternary_row(const uint8_t* src, int64_t K, int8_t* dst) {
  static const TernaryTable table;
  const int64_t full = K / quant::kTernaryPerByte;
  for (int64_t j = 0; j < full; ++j) std::memcpy(dst + 4 * j, &table.bytes[src[j]], 4);
  for (int64_t k = 4 * full; k < K; ++k) dst[k] = static_cast<int8_t>(quant::ternary_value(src[full], k - 4 * full));
}

}  // namespace

void int8_gemm(const quant::Int8GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  with_dot([&](auto dot) {
    gemm_block<decltype(dot)>(g.a, g.lda, g.K, g.epi, m0, m1, n0, n1, [&](int64_t n, int nr, const int8_t** w) {
      for (int j = 0; j < kDotRows; ++j) w[j] = g.w + (n + (j < nr ? j : 0)) * g.ldw;
    });
  });
}

void ternary_gemm(const quant::TernaryGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  thread_local std::vector<int8_t> tile;
  tile.resize(kDotRows * std::max<int64_t>(g.K, 1));
  with_dot([&](auto dot) {
    gemm_block<decltype(dot)>(g.a, g.lda, g.K, g.epi, m0, m1, n0, n1, [&](int64_t n, int nr, const int8_t** w) {
      for (int j = 0; j < kDotRows; ++j) {
        int8_t* row = tile.data() + j * g.K;
        if (j < nr) decode_ternary_row(g.w + (n + j) * g.ldw_bytes, g.K, row);
        w[j] = j < nr ? row : tile.data();
      }
    });
  });
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
