// Accumulator blocks of the quantized GEMMs' dot-product kernels: MR (<= 4)
// activation rows against 4 weight rows, in vector registers s00 .. s33.
//
// The accumulators are named variables, not an array: GCC kept an array of
// 16 zmm values in memory and stored every update to the stack (seen in the
// disassembly), which cost about 3x. Rows past MR are never updated.
#pragma once
#define FKD_DECLARE_ACC(type, zero)                                                            \
  type s00 = zero, s01 = zero, s02 = zero, s03 = zero, s10 = zero, s11 = zero, s12 = zero, s13 = zero, \
       s20 = zero, s21 = zero, s22 = zero, s23 = zero, s30 = zero, s31 = zero, s32 = zero, s33 = zero
// Row i of the block: s##i##j = UPDATE(s##i##j, activation vector, w##j).
#define FKD_ROW_UPDATE(i, av, UPDATE)                                                    \
  if constexpr (MR > i) {                                                               \
    const auto v = av;                                                                  \
    s##i##0 = UPDATE(s##i##0, v, w0); s##i##1 = UPDATE(s##i##1, v, w1);                 \
    s##i##2 = UPDATE(s##i##2, v, w2); s##i##3 = UPDATE(s##i##3, v, w3);                 \
  }
// acc[i][j] = REDUCE(s##i##j, i, j) for the rows i < MR.
#define FKD_ROW_STORE(i, REDUCE)                                                          \
  if constexpr (MR > i) {                                                                \
    acc[i][0] = REDUCE(s##i##0, i, 0); acc[i][1] = REDUCE(s##i##1, i, 1);                \
    acc[i][2] = REDUCE(s##i##2, i, 2); acc[i][3] = REDUCE(s##i##3, i, 3);                \
  }
#define FKD_STORE_ALL_ROWS(REDUCE) \
  FKD_ROW_STORE(0, REDUCE) FKD_ROW_STORE(1, REDUCE) FKD_ROW_STORE(2, REDUCE) FKD_ROW_STORE(3, REDUCE)


#if defined(__AVX512F__)
#include <immintrin.h>
// The 16 sums of the int32 block s00 .. s33, row-major in one vector (so
// that one store fills a 4 x 4 int32 array): a transpose-and-add tree of 45
// instructions, where 16 separate reductions take about 140 (a quarter of
// the block's instructions at K = 1024). Integer sums: the same whatever the
// order.
inline __m512i block_sums_epi32(__m512i s00, __m512i s01, __m512i s02, __m512i s03, __m512i s10, __m512i s11,
                                __m512i s12, __m512i s13, __m512i s20, __m512i s21, __m512i s22, __m512i s23,
                                __m512i s30, __m512i s31, __m512i s32, __m512i s33) {
  // Per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
  const auto pairs = [](__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  };
  // Per 128-bit lane: that lane's sums of a, b, c and d.
  const auto quads = [&](__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i ab = pairs(a, b), cd = pairs(c, d);
    return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  };
  // Lanes (l0 + l1, l2 + l3) of x, then of y.
  const auto halves = [](__m512i x, __m512i y) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  const __m512i r0 = quads(s00, s01, s02, s03), r1 = quads(s10, s11, s12, s13);
  const __m512i r2 = quads(s20, s21, s22, s23), r3 = quads(s30, s31, s32, s33);
  return halves(halves(r0, r1), halves(r2, r3));
}
#define FKD_BLOCK_SUMS_EPI32() \
  block_sums_epi32(s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
#endif
