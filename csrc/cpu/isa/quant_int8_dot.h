// Exact int8 dot-product blocks of the int8 GEMM (the ternary GEMM shares the
// block shape): MR activation rows against 4 weight rows, all of length K, accumulated in
// int32 (exact while every partial sum fits, i.e. for K < 2^31 / (128*127)).
// One implementation per instruction set:
//  * AVX-512 VNNI (vpdpbusd, unsigned x signed bytes): the activations are
//    offset by +128 (xor 0x80) to make them unsigned, and 128 * sum_k w[k] is
//    subtracted from each result. int32 wraps modulo 2^32, so the corrected
//    sum is exact even where the offset sum alone would overflow.
//  * AVX-512 / AVX2 without VNNI: sign-extend to int16 and vpmaddwd (exact;
//    vpmaddubsw would saturate at int16).
//  * generic: scalar.
#pragma once
#include <cstdint>
#include "quant_block_acc.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace flashkd::cpu::FKD_CPU_ISA {

constexpr int kDotRows = 4;  // weight rows per block (MR activation rows, MR <= 4)

using DotAcc = int32_t[4][kDotRows];

// Dot kernels that sweep K for two activation rows at a time, so that their
// accumulators stay in registers (the AVX2 int8 and ternary ones): a block of
// MR <= 4 rows is one or two sweeps of Impl::run_rows<rows>(a0, a1, w, K,
// acc0, acc1), over weight rows of type W.
template <class Impl, typename W>
struct TwoRowSweeps {
  static constexpr bool kNeedsWeightSums = false;
  template <int MR>
  static void run(const int8_t* const* a, const W* const* w, const int32_t*, int64_t K, DotAcc& acc) {
    Impl::template run_rows<(MR >= 2 ? 2 : 1)>(a[0], a[1], w, K, acc[0], acc[1]);
    if constexpr (MR > 2) Impl::template run_rows<MR - 2>(a[2], a[3], w, K, acc[2], acc[3]);
  }
};

struct ScalarDot {
  static constexpr bool kNeedsWeightSums = false;
  template <int MR>
  static void run(const int8_t* const* a, const int8_t* const* w, const int32_t*, int64_t K, DotAcc& acc) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kDotRows; ++j) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(a[i][k]) * w[j][k];
        acc[i][j] = s;
      }
  }
};

#if defined(__AVX512F__)
inline __mmask64 tail_mask64(int64_t n) { return n >= 64 ? ~0ull : ((1ull << n) - 1); }
inline __mmask32 tail_mask32(int64_t n) { return n >= 32 ? ~0u : ((1u << n) - 1); }

struct VnniDot {
  static constexpr bool kNeedsWeightSums = true;
  template <int MR>
  __attribute__((target("avx512vnni"))) static void run(const int8_t* const* a, const int8_t* const* w,
                                                        const int32_t* w_sum, int64_t K, DotAcc& acc) {
    FKD_DECLARE_ACC(__m512i, _mm512_setzero_si512());
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
#define FKD_VNNI(s, v, w) _mm512_dpbusd_epi32(s, v, w)
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 m = tail_mask64(K - k);
      const __m512i w0 = _mm512_maskz_loadu_epi8(m, w[0] + k), w1 = _mm512_maskz_loadu_epi8(m, w[1] + k);
      const __m512i w2 = _mm512_maskz_loadu_epi8(m, w[2] + k), w3 = _mm512_maskz_loadu_epi8(m, w[3] + k);
      // Past K both are zero-loaded: (0 ^ 0x80) * 0 adds nothing.
#define FKD_A(i) _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, a[i] + k), flip)
      FKD_ROW_UPDATE(0, FKD_A(0), FKD_VNNI)
      FKD_ROW_UPDATE(1, FKD_A(1), FKD_VNNI)
      FKD_ROW_UPDATE(2, FKD_A(2), FKD_VNNI)
      FKD_ROW_UPDATE(3, FKD_A(3), FKD_VNNI)
#undef FKD_A
    }
#undef FKD_VNNI
    // Undo the offset: 128 * sum_k w[j][k] from column j of every row (int32
    // wraps, so this is exact modulo 2^32 like the sums themselves).
    const __m512i offset = _mm512_slli_epi32(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_sum))), 7);
    _mm512_storeu_si512(acc, _mm512_sub_epi32(FKD_BLOCK_SUMS_EPI32(), offset));
  }

  // sum_k w[k] for the VNNI offset correction.
  __attribute__((target("avx512vnni"))) static int32_t row_sum(const int8_t* w, int64_t K) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64)
      s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(tail_mask64(K - k), w + k));
    return _mm512_reduce_add_epi32(s);
  }
};

struct Avx512Dot {
  static constexpr bool kNeedsWeightSums = false;
  template <int MR>
  static void run(const int8_t* const* a, const int8_t* const* w, const int32_t*, int64_t K, DotAcc& acc) {
    FKD_DECLARE_ACC(__m512i, _mm512_setzero_si512());
#define FKD_MADD(s, v, w) _mm512_add_epi32(s, _mm512_madd_epi16(v, w))
#define FKD_LOAD16(p) _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, (p) + k))
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 m = tail_mask32(K - k);
      const __m512i w0 = FKD_LOAD16(w[0]), w1 = FKD_LOAD16(w[1]), w2 = FKD_LOAD16(w[2]), w3 = FKD_LOAD16(w[3]);
      FKD_ROW_UPDATE(0, FKD_LOAD16(a[0]), FKD_MADD)
      FKD_ROW_UPDATE(1, FKD_LOAD16(a[1]), FKD_MADD)
      FKD_ROW_UPDATE(2, FKD_LOAD16(a[2]), FKD_MADD)
      FKD_ROW_UPDATE(3, FKD_LOAD16(a[3]), FKD_MADD)
    }
#undef FKD_LOAD16
#undef FKD_MADD
    _mm512_storeu_si512(acc, FKD_BLOCK_SUMS_EPI32());
  }
};
#endif

#if defined(__AVX2__)
inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline int32_t tail_dot(const int8_t* a, const int8_t* w, int64_t k0, int64_t k1) {
  int32_t t = 0;
  for (int64_t k = k0; k < k1; ++k) t += static_cast<int32_t>(a[k]) * w[k];
  return t;
}

// Two activation rows per sweep over K: their 8 accumulators, the 4 weight
// vectors and the 2 activation vectors fit AVX2's 16 registers. (A whole 4 x 4
// block did not: GCC kept its 16 accumulators on the stack, a load and a store
// per update; the int8 GEMM at 1024^3 took 12.5-13 ms that way, 10.1-10.8 ms
// this way.) A 4-row block sweeps twice, reloading the weight rows from L1.
struct Avx2Dot : TwoRowSweeps<Avx2Dot, int8_t> {
 private:
  friend struct TwoRowSweeps<Avx2Dot, int8_t>;
  template <int NR>
  static void run_rows(const int8_t* a0, const int8_t* a1, const int8_t* const* w, int64_t K, int32_t* acc0,
                       int32_t* acc1) {
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s02 = s00, s03 = s00;
    __m256i s10 = s00, s11 = s00, s12 = s00, s13 = s00;
    const int64_t K16 = K - K % 16;
#define FKD_LOAD16(p) _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>((p) + k)))
#define FKD_MADD(s, v, w) s = _mm256_add_epi32(s, _mm256_madd_epi16(v, w))
    for (int64_t k = 0; k < K16; k += 16) {
      const __m256i w0 = FKD_LOAD16(w[0]), w1 = FKD_LOAD16(w[1]), w2 = FKD_LOAD16(w[2]), w3 = FKD_LOAD16(w[3]);
      const __m256i v0 = FKD_LOAD16(a0);
      FKD_MADD(s00, v0, w0); FKD_MADD(s01, v0, w1); FKD_MADD(s02, v0, w2); FKD_MADD(s03, v0, w3);
      if constexpr (NR > 1) {
        const __m256i v1 = FKD_LOAD16(a1);
        FKD_MADD(s10, v1, w0); FKD_MADD(s11, v1, w1); FKD_MADD(s12, v1, w2); FKD_MADD(s13, v1, w3);
      }
    }
#undef FKD_MADD
#undef FKD_LOAD16
    // The K % 16 tail in scalar code (AVX2 has no masked byte loads).
    const __m256i row0[kDotRows] = {s00, s01, s02, s03};
    for (int j = 0; j < kDotRows; ++j) acc0[j] = hsum_epi32(row0[j]) + tail_dot(a0, w[j], K16, K);
    if constexpr (NR > 1) {
      const __m256i row1[kDotRows] = {s10, s11, s12, s13};
      for (int j = 0; j < kDotRows; ++j) acc1[j] = hsum_epi32(row1[j]) + tail_dot(a1, w[j], K16, K);
    }
  }
};
#endif

}  // namespace flashkd::cpu::FKD_CPU_ISA
