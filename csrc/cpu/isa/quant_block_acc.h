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

