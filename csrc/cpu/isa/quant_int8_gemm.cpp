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

#if defined(__AVX2__)
// 32 packed bytes -> their 128 ternary values, in order. The four 2-bit fields
// of every byte are split into four vectors, then interleaved back to byte
// order by unpacking (within 128-bit lanes) and joining lane halves: about 30
// instructions where the table does 32 lookups and stores.
inline void decode_ternary_32_bytes(const uint8_t* src, int8_t* dst) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  // Field i of each byte, as its value code - 1. A 16-bit shift moves bits
  // across bytes, but the mask keeps only the byte's own field.
  const __m256i f0 = _mm256_sub_epi8(_mm256_and_si256(bytes, three), one);
  const __m256i f1 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(bytes, 2), three), one);
  const __m256i f2 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), three), one);
  const __m256i f3 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(bytes, 6), three), one);
  // Per 128-bit lane (bytes j of the lane): pairs (f0, f1)[j] and (f2, f3)[j],
  // then quads (f0, f1, f2, f3)[j]: lane 0 holds source bytes 0-15, lane 1 16-31.
  const __m256i p01_lo = _mm256_unpacklo_epi8(f0, f1), p01_hi = _mm256_unpackhi_epi8(f0, f1);
  const __m256i p23_lo = _mm256_unpacklo_epi8(f2, f3), p23_hi = _mm256_unpackhi_epi8(f2, f3);
  const __m256i q0 = _mm256_unpacklo_epi16(p01_lo, p23_lo);  // bytes 0-3 | 16-19
  const __m256i q1 = _mm256_unpackhi_epi16(p01_lo, p23_lo);  // bytes 4-7 | 20-23
  const __m256i q2 = _mm256_unpacklo_epi16(p01_hi, p23_hi);  // bytes 8-11 | 24-27
  const __m256i q3 = _mm256_unpackhi_epi16(p01_hi, p23_hi);  // bytes 12-15 | 28-31
  __m256i* out = reinterpret_cast<__m256i*>(dst);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(q0, q1, 0x20));  // bytes 0-7
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(q2, q3, 0x20));  // bytes 8-15
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(q0, q1, 0x31));  // bytes 16-23
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(q2, q3, 0x31));  // bytes 24-31
}
#endif

void decode_ternary_row(const uint8_t* src, int64_t K, int8_t* dst) {
  static const TernaryTable table;
  const int64_t full = K / quant::kTernaryPerByte;
  int64_t j = 0;
#if defined(__AVX2__)
  for (; j + 32 <= full; j += 32) decode_ternary_32_bytes(src + j, dst + 4 * j);
#endif
  for (; j < full; ++j) std::memcpy(dst + 4 * j, &table.bytes[src[j]], 4);
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
