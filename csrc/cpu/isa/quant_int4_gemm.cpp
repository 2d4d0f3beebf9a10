// Float activations x packed int4 weights (w4a16), accumulated in float32,
// output and bias in the activations' dtype. Compiled once per instruction set.
//
// Blocking as in quant_int8_gemm.cpp: per thread an output block
// [m0, m1) x [n0, n1). Two paths (and, from kBlasRows rows on, the glue's
// third: int4_dequantize_rows panels multiplied by ATen's GEMM):
//  * prefill/training sizes (or odd group sizes): the block's activation rows
//    are converted to float32 once, then four weight rows at a time are
//    dequantized, w = (q - zero) * scale per group, into a 4 x K float tile
//    that every activation row of the block reuses;
//  * decode sizes (fewer than 8 rows, even group size, AVX2/AVX-512): the
//    activation rows are split into even/odd columns to match the nibbles, and
//    each weight byte goes straight from nibbles to FMAs, the zero point
//    applied once per group through the group's activation sum; one row
//    (M = 1) goes against four weight rows at a time.
#include <algorithm>
#include <cstring>
#include <vector>
#include "flashkd/cpu_convert.h"
#include "quant_block_acc.h"
#include "quant_kernels.h"
#include "weight_prefetch.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

constexpr int kRows = 4;  // weight rows per tile and activation rows per dot call
using FloatAcc = float[kRows][kRows];

#if defined(__AVX2__)
inline float hsum_ps(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float tail_dot(const float* x, const float* w, int64_t k0, int64_t k1) {
  float t = 0.f;
  for (int64_t k = k0; k < k1; ++k) t += x[k] * w[k];
  return t;
}
#endif

// acc[i][j] = sum_k x[i][k] * w[j][k] for i < MR, j < 4, in float32.
template <int MR>
void dot_block(const float* const* x, const float* const* w, int64_t K, FloatAcc& acc) {
#if defined(__AVX512F__)
  FKD_DECLARE_ACC(__m512, _mm512_setzero_ps());
#define FKD_FMA(s, v, w) _mm512_fmadd_ps(v, w, s)
#define FKD_LOAD(p) _mm512_maskz_loadu_ps(m, (p) + k)
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 w0 = FKD_LOAD(w[0]), w1 = FKD_LOAD(w[1]), w2 = FKD_LOAD(w[2]), w3 = FKD_LOAD(w[3]);
    FKD_ROW_UPDATE(0, FKD_LOAD(x[0]), FKD_FMA)
    FKD_ROW_UPDATE(1, FKD_LOAD(x[1]), FKD_FMA)
    FKD_ROW_UPDATE(2, FKD_LOAD(x[2]), FKD_FMA)
    FKD_ROW_UPDATE(3, FKD_LOAD(x[3]), FKD_FMA)
  }
#undef FKD_LOAD
#define FKD_REDUCE(v, i, j) _mm512_reduce_add_ps(v)
  FKD_STORE_ALL_ROWS(FKD_REDUCE)
#undef FKD_REDUCE
#undef FKD_FMA
#elif defined(__AVX2__)
  FKD_DECLARE_ACC(__m256, _mm256_setzero_ps());
  const int64_t K8 = K - K % 8;
#define FKD_FMA(s, v, w) _mm256_fmadd_ps(v, w, s)
#define FKD_LOAD(p) _mm256_loadu_ps((p) + k)
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 w0 = FKD_LOAD(w[0]), w1 = FKD_LOAD(w[1]), w2 = FKD_LOAD(w[2]), w3 = FKD_LOAD(w[3]);
    FKD_ROW_UPDATE(0, FKD_LOAD(x[0]), FKD_FMA)
    FKD_ROW_UPDATE(1, FKD_LOAD(x[1]), FKD_FMA)
    FKD_ROW_UPDATE(2, FKD_LOAD(x[2]), FKD_FMA)
    FKD_ROW_UPDATE(3, FKD_LOAD(x[3]), FKD_FMA)
  }
#undef FKD_LOAD
#undef FKD_FMA
  // The K % 8 tail in scalar code.
#define FKD_REDUCE(v, i, j) hsum_ps(v) + tail_dot(x[i], w[j], K8, K)
  FKD_STORE_ALL_ROWS(FKD_REDUCE)
#undef FKD_REDUCE
#else
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kRows; ++j) {
      float t = 0.f;
      for (int64_t k = 0; k < K; ++k) t += x[i][k] * w[j][k];
      acc[i][j] = t;
    }
#endif
}

// Byte b -> its two codes as floats (low nibble first).
struct NibbleTable {
  float pair[256][2];
  NibbleTable() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < quant::kInt4PerByte; ++i) pair[b][i] = static_cast<float>(quant::int4_value(b, i));
  }
};

// Dequantizes packed row n into dst[0, K).
void dequantize_row(const quant::Int4GemmArgs& g, int64_t n, float* dst) {
  static const NibbleTable table;
  const uint8_t* src = g.w + n * g.ldw_bytes;
  for (int64_t j = 0; j < g.K / 2; ++j) std::memcpy(dst + 2 * j, table.pair[src[j]], 2 * sizeof(float));
  if (g.K % 2) dst[g.K - 1] = table.pair[src[g.K / 2]][0];
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const float scale = g.scale[n * g.groups + grp], zero = g.zero[n * g.groups + grp];
    const int64_t end = std::min(g.K, (grp + 1) * g.group_size);
#pragma omp simd
    for (int64_t k = grp * g.group_size; k < end; ++k) dst[k] = (dst[k] - zero) * scale;
  }
}

#if defined(__AVX2__)  // the decode path's (below); other CPUs take the tile path
// Activation rows de-interleaved to match the nibbles (lo[j] = x[2j], hi[j] =
// x[2j + 1], hi zero-padded for odd K) with their per-group sums, so that a
// weight byte j multiplies lo[j] and hi[j] without shuffles.
struct SplitRows {
  std::vector<float> lo, hi, group_sum;
  int64_t bytes = 0, groups = 0;
  const float* lo_row(int64_t i) const { return lo.data() + i * bytes; }
  const float* hi_row(int64_t i) const { return hi.data() + i * bytes; }
};

void split_rows(const quant::Int4GemmArgs& g, int64_t m0, int64_t m1, SplitRows& s) {
  s.bytes = (g.K + 1) / 2;
  s.groups = g.groups;
  s.lo.assign((m1 - m0) * s.bytes, 0.f);
  s.hi.assign((m1 - m0) * s.bytes, 0.f);
  s.group_sum.assign((m1 - m0) * g.groups, 0.f);
  thread_local std::vector<float> row;
  row.resize(std::max<int64_t>(g.K, 1));
  const int64_t xsize = dtype_size(g.x_dtype);
  for (int64_t m = m0; m < m1; ++m) {
    load_floats(static_cast<const char*>(g.x) + m * g.ldx * xsize, g.x_dtype, 1, g.K, row.data());
    float* lo = s.lo.data() + (m - m0) * s.bytes;
    float* hi = s.hi.data() + (m - m0) * s.bytes;
    for (int64_t j = 0; j < g.K / 2; ++j) {
      lo[j] = row[2 * j];
      hi[j] = row[2 * j + 1];
    }
    if (g.K % 2) lo[g.K / 2] = row[g.K - 1];
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      float sum = 0.f;
      for (int64_t k = grp * g.group_size; k < std::min(g.K, (grp + 1) * g.group_size); ++k) sum += row[k];
      s.group_sum[(m - m0) * g.groups + grp] = sum;
    }
  }
}
#endif

// Vector primitives of the even-group path: `n` (<= kLanes) weight bytes
// widened to their low and high nibbles as floats, and `n` floats, with
// lanes past n zero. 256-bit in the AVX-512 build too: on this project's
// AVX-512 EPYC the 512-bit form (masked byte loads widened to 16 lanes) was
// about 1.5x slower at M = 1..7, N = K = 4096 and at M = 1, N = K = 8192
// (best of 4 interleaved runs of 30 calls each: 1.58 against 1.02 ms at M = 1).
// On a Sapphire Rapids VM (2026-12-06) a 512-bit one-token form that put a
// group's 16 dequantized levels in a register and looked weights up with
// vpermps (no int-to-float conversion, no per-group rescale) measured faster
// than this form, medians of 4 interleaved runs at M = 1: N = K = 4096 0.72
// -> 0.65 ms, 8192 2.56 -> 2.12 ms; it was left out because it is 512-bit
// and unmeasured on the EPYC, where the last 512-bit form lost.
#if defined(__AVX2__)
constexpr int kLanes = 8;
using VecF = __m256;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vset1(float v) { return _mm256_set1_ps(v); }
inline void load_nibbles(const uint8_t* p, int64_t n, VecF& lo, VecF& hi) {
  int64_t bytes = 0;
  if (n >= 8) std::memcpy(&bytes, p, 8);  // a fixed-size copy is one load; the tail's is a call
  else std::memcpy(&bytes, p, static_cast<size_t>(n));
  const __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
inline VecF loadf(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  alignas(32) float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  std::memcpy(t, p, static_cast<size_t>(n) * sizeof(float));
  return _mm256_load_ps(t);
}
inline VecF fma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
#endif

#if defined(__AVX2__)
// acc[i] = sum_g scale[g] * (sum_{k in g} x[i,k] q[k] - zero[g] * sum_{k in g} x[i,k])
// for weight row n and activation rows r..r+MR-1 of the split block. Needs an
// even group size, so that every group covers whole bytes.
template <int MR>
void dot_row_even_groups(const quant::Int4GemmArgs& g, const SplitRows& s, int64_t r, int64_t n, float* acc) {
  const uint8_t* w = g.w + n * g.ldw_bytes;
  const int64_t group_bytes = g.group_size / 2;
  VecF total[MR];
  float zero_term[MR] = {};
  for (int i = 0; i < MR; ++i) total[i] = vzero();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const int64_t j0 = grp * group_bytes, j1 = std::min(s.bytes, j0 + group_bytes);
    VecF p[MR];
    for (int i = 0; i < MR; ++i) p[i] = vzero();
    for (int64_t j = j0; j < j1; j += kLanes) {
      const int64_t cnt = std::min<int64_t>(kLanes, j1 - j);
      VecF lo, hi;
      load_nibbles(w + j, cnt, lo, hi);
      for (int i = 0; i < MR; ++i)
        p[i] = fma(hi, loadf(s.hi_row(r + i) + j, cnt), fma(lo, loadf(s.lo_row(r + i) + j, cnt), p[i]));
    }
    const float scale = g.scale[n * g.groups + grp], zero = g.zero[n * g.groups + grp];
    for (int i = 0; i < MR; ++i) {
      total[i] = fma(p[i], vset1(scale), total[i]);
      zero_term[i] += scale * zero * s.group_sum[(r + i) * g.groups + grp];
    }
  }
  for (int i = 0; i < MR; ++i) acc[i] = hsum_ps(total[i]) - zero_term[i];
}
#endif

#if defined(__AVX2__)
// Activation row r of the split block (a lone token: M = 1, or the last row
// of a block of 4k + 1) against kTokenRows weight rows `rows`:
// kTokenRows independent FMA chains where dot_row_even_groups<1> has one.
// Measured at M = 1 on this project's AVX-512 EPYC, the two paths alternated
// in one process: weights in cache (best of 100 calls), N = K = 4096
// 0.97 -> 0.53 ms, 8192 4.54 -> 2.76 ms (AVX2 build: 1.39 -> 0.72, 6.31 ->
// 3.55 ms); weights read from memory (12 weight sets in turn, medians),
// N = K = 4096 1.73 -> 1.23 ms (AVX2 build: 1.56 -> 1.19 ms). Same results
// bit for bit. (A version generic over several activation rows, MR x NR
// chains in two-dimensional arrays, measured slower than the old path at
// M = 4 and under AVX2; not analysed further.)
constexpr int kTokenRows = 4;
void dot_rows_one_token(const quant::Int4GemmArgs& g, const SplitRows& s, int64_t r, const int64_t* rows,
                        float* acc) {
  const int64_t group_bytes = g.group_size / 2;
  const uint8_t* w[kTokenRows];
  VecF total[kTokenRows];
  float zero_term[kTokenRows] = {};
  for (int j = 0; j < kTokenRows; ++j) {
    w[j] = g.w + rows[j] * g.ldw_bytes;
    total[j] = vzero();
  }
  const float* x_lo = s.lo_row(r);
  const float* x_hi = s.hi_row(r);
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const int64_t j0 = grp * group_bytes, j1 = std::min(s.bytes, j0 + group_bytes);
    VecF p[kTokenRows];
    for (int j = 0; j < kTokenRows; ++j) p[j] = vzero();
    for (int64_t b = j0; b < j1; b += kLanes) {
      const int64_t cnt = std::min<int64_t>(kLanes, j1 - b);
      const VecF xl = loadf(x_lo + b, cnt), xh = loadf(x_hi + b, cnt);
      for (int j = 0; j < kTokenRows; ++j) {
        VecF lo, hi;
        load_nibbles(w[j] + b, cnt, lo, hi);
        p[j] = fma(hi, xh, fma(lo, xl, p[j]));
      }
    }
    const float x_sum = s.group_sum[r * g.groups + grp];
    for (int j = 0; j < kTokenRows; ++j) {
      const float scale = g.scale[rows[j] * g.groups + grp], zero = g.zero[rows[j] * g.groups + grp];
      total[j] = fma(p[j], vset1(scale), total[j]);
      zero_term[j] += scale * zero * x_sum;
    }
  }
  for (int j = 0; j < kTokenRows; ++j) acc[j] = hsum_ps(total[j]) - zero_term[j];
}

// Output row m (row r of the split block), columns [n0, n1).
void int4_gemm_one_token(const quant::Int4GemmArgs& g, const SplitRows& split, int64_t r, int64_t m, int64_t n0,
                         int64_t n1) {
  const int64_t xsize = dtype_size(g.x_dtype);
  for (int64_t n = n0; n < n1; n += kTokenRows) {
    prefetch_rows_ahead(g.w, g.ldw_bytes, n, n0, n1, kTokenRows);
    const int nr = static_cast<int>(std::min<int64_t>(kTokenRows, n1 - n));
    int64_t rows[kTokenRows];
    for (int j = 0; j < kTokenRows; ++j) rows[j] = n + std::min(j, nr - 1);  // a short pass repeats its last row
    float acc[kTokenRows], bias[kTokenRows] = {};
    dot_rows_one_token(g, split, r, rows, acc);
    if (g.bias) load_floats(static_cast<const char*>(g.bias) + n * xsize, g.x_dtype, 1, nr, bias);
    for (int j = 0; j < nr; ++j) acc[j] += bias[j];
    store_floats(acc, nr, static_cast<char*>(g.out) + (m * g.ldo + n) * xsize, g.x_dtype, 1);
  }
}

void int4_gemm_even_groups(const quant::Int4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  thread_local SplitRows split;
  split_rows(g, m0, m1, split);
  // Rows in groups of up to four; a lone last row goes through the one-token path.
  const int64_t grouped_end = (m1 - m0) % kRows == 1 ? m1 - 1 : m1;
  const int64_t xsize = dtype_size(g.x_dtype);
  float bias = 0.f;
  for (int64_t n = n0; n < n1 && m0 < grouped_end; ++n) {
    prefetch_rows_ahead(g.w, g.ldw_bytes, n, n0, n1, 1);
    if (g.bias) load_floats(static_cast<const char*>(g.bias) + n * xsize, g.x_dtype, 1, 1, &bias);
    for (int64_t m = m0; m < grouped_end; m += kRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kRows, grouped_end - m));  // 2, 3 or 4
      float acc[kRows];
      switch (mr) {
        case 2: dot_row_even_groups<2>(g, split, m - m0, n, acc); break;
        case 3: dot_row_even_groups<3>(g, split, m - m0, n, acc); break;
        default: dot_row_even_groups<4>(g, split, m - m0, n, acc); break;
      }
      for (int i = 0; i < mr; ++i) {
        const float v = acc[i] + bias;
        store_floats(&v, 1, static_cast<char*>(g.out) + ((m + i) * g.ldo + n) * xsize, g.x_dtype, 1);
      }
    }
  }
  if (grouped_end < m1) int4_gemm_one_token(g, split, grouped_end - m0, grouped_end, n0, n1);
}

#endif

}  // namespace

void int4_gemm(const quant::Int4GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(__AVX2__)
  // Decode sizes: nibbles straight into FMAs (measured 4x faster at M = 1,
  // N = K = 4096 than dequantizing rows first); from about 8 rows on, the
  // dequantized tile's reuse across rows wins.
  if (g.group_size % 2 == 0 && m1 - m0 < 8) return int4_gemm_even_groups(g, m0, m1, n0, n1);
#endif
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

void int4_dequantize_rows(const quant::Int4GemmArgs& g, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) dequantize_row(g, n, out + (n - n0) * g.K);
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
