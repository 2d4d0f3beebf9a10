// Float activations x packed int4 weights (w4a16), accumulated in float32,
// output and bias in the activations' dtype. Compiled once per instruction set.
//
// Blocking as in quant_int8_gemm.cpp: per thread an output block
// [m0, m1) x [n0, n1); its activation rows are converted to float32 once, then
// four weight rows at a time are dequantized, w = (q - zero) * scale per
// group, into a 4 x K float tile that every activation row of the block reuses.
#include <algorithm>
#include <vector>
#include "flashkd/cpu_convert.h"
#include "quant_kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

constexpr int kRows = 4;  // weight rows per tile and activation rows per dot call
using FloatAcc = float[kRows][kRows];

// acc[i][j] = sum_k x[i][k] * w[j][k] for i < MR, j < 4, in float32.
template <int MR>
void dot_block(const float* const* x, const float* const* w, int64_t K, FloatAcc& acc) {
#if defined(__AVX512F__)
  __m512 s[MR][kRows];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRows; ++j) s[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[kRows];
    for (int j = 0; j < kRows; ++j) wv[j] = _mm512_maskz_loadu_ps(m, w[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x[i] + k);
      for (int j = 0; j < kRows; ++j) s[i][j] = _mm512_fmadd_ps(xv, wv[j], s[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRows; ++j) acc[i][j] = _mm512_reduce_add_ps(s[i][j]);
#elif defined(__AVX2__)
  __m256 s[MR][kRows];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRows; ++j) s[i][j] = _mm256_setzero_ps();
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[kRows];
    for (int j = 0; j < kRows; ++j) wv[j] = _mm256_loadu_ps(w[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x[i] + k);
      for (int j = 0; j < kRows; ++j) s[i][j] = _mm256_fmadd_ps(xv, wv[j], s[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRows; ++j) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s[i][j]), _mm256_extractf128_ps(s[i][j], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      float t = _mm_cvtss_f32(h);
      for (int64_t k = K8; k < K; ++k) t += x[i][k] * w[j][k];
      acc[i][j] = t;
    }
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRows; ++j) {
      float t = 0.f;
      for (int64_t k = 0; k < K; ++k) t += x[i][k] * w[j][k];
      acc[i][j] = t;
    }
#endif
}

// Dequantizes packed row n into dst[0, K).
void dequantize_row(const quant::Int4GemmArgs& g, int64_t n, float* dst) {
  const uint8_t* src = g.w + n * g.ldw_bytes;
  for (int64_t k = 0; k + 1 < g.K; k += 2) {  // codes first: two per byte
    dst[k] = static_cast<float>(src[k / 2] & 15u);
    dst[k + 1] = static_cast<float>(src[k / 2] >> 4);
  }
  if (g.K % 2) dst[g.K - 1] = static_cast<float>(quant::int4_value(src[g.K / 2], 0));
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const float scale = g.scale[n * g.groups + grp], zero = g.zero[n * g.groups + grp];
    const int64_t end = std::min(g.K, (grp + 1) * g.group_size);
#pragma omp simd
    for (int64_t k = grp * g.group_size; k < end; ++k) dst[k] = (dst[k] - zero) * scale;
  }
}

}  // namespace

void int4_gemm(const quant::Int4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = std::max<int64_t>(g.K, 1);
  thread_local std::vector<float> x_rows, w_tile;
  x_rows.resize((m1 - m0) * K);
  w_tile.resize(kRows * K);
  const int64_t xsize = dtype_size(g.x_dtype);
  for (int64_t m = m0; m < m1; ++m)
    load_floats(static_cast<const char*>(g.x) + m * g.ldx * xsize, g.x_dtype, 1, g.K, x_rows.data() + (m - m0) * K);

  for (int64_t n = n0; n < n1; n += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, n1 - n));
    const float* w[kRows];
    for (int j = 0; j < kRows; ++j) {
      if (j < nr) dequantize_row(g, n + j, w_tile.data() + j * K);
      w[j] = w_tile.data() + (j < nr ? j : 0) * K;
    }
    float bias[kRows] = {0.f, 0.f, 0.f, 0.f};
    if (g.bias) load_floats(static_cast<const char*>(g.bias) + n * xsize, g.x_dtype, 1, nr, bias);
    for (int64_t m = m0; m < m1; m += kRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kRows, m1 - m));
      const float* x[kRows];
      for (int i = 0; i < kRows; ++i) x[i] = x_rows.data() + (m - m0 + std::min(i, mr - 1)) * K;
      FloatAcc acc;
      switch (mr) {
        case 1: dot_block<1>(x, w, g.K, acc); break;
        case 2: dot_block<2>(x, w, g.K, acc); break;
        case 3: dot_block<3>(x, w, g.K, acc); break;
        default: dot_block<4>(x, w, g.K, acc); break;
      }
      for (int i = 0; i < mr; ++i) {
        float row[kRows];
        for (int j = 0; j < nr; ++j) row[j] = acc[i][j] + bias[j];
        store_floats(row, nr, static_cast<char*>(g.out) + ((m + i) * g.ldo + n) * xsize, g.x_dtype, 1);
      }
    }
  }
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
