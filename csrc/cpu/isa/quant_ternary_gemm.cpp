// int8 activations x packed ternary weights (w1.58a8 inference), exact in
// int32, with the dequantizing epilogue. Compiled once per instruction set;
// blocking in quant_gemm_block.h.
//
// The 2-bit codes are never decoded to int8. With c = w + 1 in {0, 1, 2},
//   sum_k a_k w_k = sum_k a_k c_k - sum_k a_k,
// and sum_k a_k c_k is an unsigned x signed byte dot product: vpdpbusd on
// AVX-512 VNNI, vpmaddubsw on AVX2 (|c a| <= 256, so its int16 pair sums never
// saturate). Field f (bits 2f) of the 64 packed bytes of a 256-wide block of
// k holds the codes of k = 4 t + f (t < 64): one shift and one mask give them
// as a vector in t order. The activations are rearranged once per call into
// that order (ternary_prepare_activations: within each block a'[64 f + t] =
// a[4 t + f], zero past K; a byte transpose done with shuffles), and their
// row sums taken.
#include <cstring>
#include <vector>
#include "quant_gemm_block.h"
#include "quant_kernels.h"
#include "weight_prefetch.h"

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

constexpr int64_t kBlockBytes = kTernaryBlock / quant::kTernaryPerByte;  // packed bytes of a block: 64

struct ScalarCodeDot {
  static constexpr bool kNeedsWeightSums = false;
  template <int MR>
  static void run(const int8_t* const* a, const uint8_t* const* w, const int32_t*, int64_t Kp, DotAcc& acc) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kDotRows; ++j) {
        int32_t s = 0;
        for (int64_t b = 0; b < Kp; b += kTernaryBlock)
          for (int f = 0; f < quant::kTernaryPerByte; ++f)
            for (int64_t t = 0; t < kBlockBytes; ++t)
              s += a[i][b + kBlockBytes * f + t] * ((w[j][b / quant::kTernaryPerByte + t] >> (2 * f)) & 3);
        acc[i][j] = s;
      }
  }
};

#if defined(__AVX2__)
// Two activation rows per sweep, as Avx2Dot (quant_int8_dot.h), so that the
// accumulators stay in registers. Per block and weight row the 8 vpmaddubsw
// products are summed in int16 (at most 8 * 512 in magnitude) before one
// vpmaddwd widens them.
struct Avx2CodeDot : TwoRowSweeps<Avx2CodeDot, uint8_t> {
 private:
  friend struct TwoRowSweeps<Avx2CodeDot, uint8_t>;
  template <int F>
  static __m256i field(__m256i packed, __m256i three) {
    return _mm256_and_si256(_mm256_srli_epi16(packed, 2 * F), three);
  }
  static __m256i load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

  template <int NR>
  static void run_rows(const int8_t* a0, const int8_t* a1, const uint8_t* const* w, int64_t Kp, int32_t* acc0,
                       int32_t* acc1) {
    const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s02 = s00, s03 = s00;
    __m256i s10 = s00, s11 = s00, s12 = s00, s13 = s00;
    for (int64_t b = 0; b < Kp; b += kTernaryBlock) {
      const int8_t* x0 = a0 + b;
      const int8_t* x1 = a1 + b;
      const int64_t wb = b / quant::kTernaryPerByte;
#define FKD_FIELD(F, h)                                                          \
  {                                                                              \
    const __m256i c = field<F>(p, three);                                        \
    t0 = _mm256_add_epi16(t0, _mm256_maddubs_epi16(c, load(x0 + 64 * F + 32 * h))); \
    if constexpr (NR > 1)                                                        \
      t1 = _mm256_add_epi16(t1, _mm256_maddubs_epi16(c, load(x1 + 64 * F + 32 * h))); \
  }
#define FKD_WEIGHT_ROW(j)                                                                  \
  {                                                                                        \
    __m256i t0 = _mm256_setzero_si256(), t1 = t0;                                          \
    __m256i p = load(w[j] + wb);                                                           \
    FKD_FIELD(0, 0) FKD_FIELD(1, 0) FKD_FIELD(2, 0) FKD_FIELD(3, 0)                        \
    p = load(w[j] + wb + 32);                                                              \
    FKD_FIELD(0, 1) FKD_FIELD(1, 1) FKD_FIELD(2, 1) FKD_FIELD(3, 1)                        \
    s0##j = _mm256_add_epi32(s0##j, _mm256_madd_epi16(t0, ones));                          \
    if constexpr (NR > 1) s1##j = _mm256_add_epi32(s1##j, _mm256_madd_epi16(t1, ones));    \
  }
      FKD_WEIGHT_ROW(0) FKD_WEIGHT_ROW(1) FKD_WEIGHT_ROW(2) FKD_WEIGHT_ROW(3)
#undef FKD_WEIGHT_ROW
#undef FKD_FIELD
    }
    const __m256i row0[kDotRows] = {s00, s01, s02, s03};
    for (int j = 0; j < kDotRows; ++j) acc0[j] = hsum_epi32(row0[j]);
    if constexpr (NR > 1) {
      const __m256i row1[kDotRows] = {s10, s11, s12, s13};
      for (int j = 0; j < kDotRows; ++j) acc1[j] = hsum_epi32(row1[j]);
    }
  }
};
#endif

#if defined(__AVX512F__)
// The whole 4 x 4 block per sweep: 16 accumulators, the 4 packed weight
// vectors and one field of each fit AVX-512's 32 registers.
struct VnniCodeDot {
  static constexpr bool kNeedsWeightSums = false;
  template <int F>
  static __m512i field(__m512i packed, __m512i three) {
    return _mm512_and_si512(_mm512_srli_epi16(packed, 2 * F), three);
  }
  template <int MR>
  __attribute__((target("avx512vnni"))) static void run(const int8_t* const* a, const uint8_t* const* w,
                                                        const int32_t*, int64_t Kp, DotAcc& acc) {
    FKD_DECLARE_ACC(__m512i, _mm512_setzero_si512());
    const __m512i three = _mm512_set1_epi8(3);
#define FKD_DP(s, v, c) _mm512_dpbusd_epi32(s, c, v)  // unsigned codes x signed activations
    for (int64_t b = 0; b < Kp; b += kTernaryBlock) {
      const int64_t wb = b / quant::kTernaryPerByte;
      const __m512i p0 = _mm512_loadu_si512(w[0] + wb), p1 = _mm512_loadu_si512(w[1] + wb);
      const __m512i p2 = _mm512_loadu_si512(w[2] + wb), p3 = _mm512_loadu_si512(w[3] + wb);
#define FKD_FIELD(F)                                                                                \
  {                                                                                                 \
    const __m512i w0 = field<F>(p0, three), w1 = field<F>(p1, three);                               \
    const __m512i w2 = field<F>(p2, three), w3 = field<F>(p3, three);                               \
    FKD_ROW_UPDATE(0, _mm512_loadu_si512(a[0] + b + 64 * F), FKD_DP)                                \
    FKD_ROW_UPDATE(1, _mm512_loadu_si512(a[1] + b + 64 * F), FKD_DP)                                \
    FKD_ROW_UPDATE(2, _mm512_loadu_si512(a[2] + b + 64 * F), FKD_DP)                                \
    FKD_ROW_UPDATE(3, _mm512_loadu_si512(a[3] + b + 64 * F), FKD_DP)                                \
  }
      FKD_FIELD(0) FKD_FIELD(1) FKD_FIELD(2) FKD_FIELD(3)
#undef FKD_FIELD
    }
#undef FKD_DP
    _mm512_storeu_si512(acc, FKD_BLOCK_SUMS_EPI32());
  }
};
#endif

#if defined(__AVX2__)
// One block of 256 activations into field order, y[64 f + t] = x[4 t + f]: a
// transpose of 64 x 4 bytes. Per 32 bytes (t = 8 r .. 8 r + 7) a byte shuffle
// gathers each lane's field f into dword f, a dword permute pairs the two lanes'
// dwords into qword f; a 4 x 4 qword transpose of four such vectors then yields
// 32 bytes of each field. Adds the block's activation sum to `sums`.
inline __m256i rearrange_block(const int8_t* src, int8_t* dst, __m256i sums) {
  const __m256i by_field = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i lane_pairs = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {  // t < 32, then t >= 32
    __m256i u[4];
    for (int r = 0; r < 4; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 128 * half + 32 * r));
      sums = _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
      u[r] = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, by_field), lane_pairs);
    }
    const __m256i t0 = _mm256_unpacklo_epi64(u[0], u[1]), t1 = _mm256_unpackhi_epi64(u[0], u[1]);
    const __m256i t2 = _mm256_unpacklo_epi64(u[2], u[3]), t3 = _mm256_unpackhi_epi64(u[2], u[3]);
    const __m256i field[4] = {_mm256_permute2x128_si256(t0, t2, 0x20), _mm256_permute2x128_si256(t1, t3, 0x20),
                              _mm256_permute2x128_si256(t0, t2, 0x31), _mm256_permute2x128_si256(t1, t3, 0x31)};
    for (int f = 0; f < quant::kTernaryPerByte; ++f)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kBlockBytes * f + 32 * half), field[f]);
  }
  return sums;
}
#endif

// Calls f with the code dot product this CPU runs best.
template <class F>
void with_code_dot(F&& f) {
#if defined(__AVX512F__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni")) return f(VnniCodeDot{});
#endif
#if defined(__AVX2__)
  return f(Avx2CodeDot{});
#else
  return f(ScalarCodeDot{});
#endif
}

}  // namespace

void ternary_prepare_activations(const quant::TernaryGemmArgs& g, const TernaryActivations& act, int64_t m0,
                                 int64_t m1) {
  const int64_t K = g.K, full = K / kTernaryBlock * kTernaryBlock;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* src = g.a + m * g.lda;
    int8_t* dst = act.a + m * act.ld;
    std::memset(dst + full, 0, act.ld - full);  // the last block's columns past K
    int32_t sum = 0;
    int64_t k = 0;
#if defined(__AVX2__)
    __m256i sums = _mm256_setzero_si256();
    for (; k < full; k += kTernaryBlock) sums = rearrange_block(src + k, dst + k, sums);
    sum = hsum_epi32(sums);
#endif
    for (; k < K; ++k) {
      const int64_t r = k % kTernaryBlock;
      dst[k - r + kBlockBytes * (r % quant::kTernaryPerByte) + r / quant::kTernaryPerByte] = src[k];
      sum += src[k];
    }
    act.sum[m] = sum;
  }
}

void ternary_gemm(const quant::TernaryGemmArgs& g, const TernaryActivations& act, int64_t m0, int64_t m1,
                  int64_t n0, int64_t n1) {
  // The dot products read whole blocks. With K a multiple of the block the
  // packed rows are read in place; otherwise each is copied into a tile row
  // of whole blocks. Whatever the tile holds past the packed row (an earlier
  // call's bytes) meets activations that are zero there, as do the codes past K
  // in the row's last byte, so it is never cleared.
  const int64_t tile_bytes = act.ld / quant::kTernaryPerByte;
  const bool in_place = act.ld == g.K;
  const int64_t packed_bytes = (g.K + quant::kTernaryPerByte - 1) / quant::kTernaryPerByte;
  thread_local std::vector<uint8_t> tile;
  if (!in_place && tile.size() < static_cast<size_t>(kDotRows * tile_bytes)) tile.resize(kDotRows * tile_bytes);
  with_code_dot([&](auto dot) {
    gemm_block<decltype(dot), uint8_t>(
        act.a, act.ld, act.ld, g.epi, act.sum, m0, m1, n0, n1, [&](int64_t n, int nr, const uint8_t** w) {
          prefetch_rows_ahead(g.w, g.ldw_bytes, n, n0, n1, kDotRows);
          for (int j = 0; j < kDotRows; ++j) {
            const uint8_t* row = g.w + (n + (j < nr ? j : 0)) * g.ldw_bytes;
            if (in_place) {
              w[j] = row;
            } else {
              std::memcpy(tile.data() + j * tile_bytes, row, packed_bytes);
              w[j] = tile.data() + j * tile_bytes;
            }
          }
        });
  });
}

void ternary_unpack_rows(const quant::TernaryGemmArgs& g, int64_t n0, int64_t n1, int8_t* out) {
  const int64_t full = g.K / quant::kTernaryPerByte;  // bytes whose four codes are all inside K
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* src = g.w + n * g.ldw_bytes;
    int8_t* dst = out + (n - n0) * g.K;
    for (int64_t b = 0; b < full; ++b)  // vectorized: four shifts and masks per packed vector
      for (int i = 0; i < quant::kTernaryPerByte; ++i)
        dst[b * quant::kTernaryPerByte + i] = static_cast<int8_t>(quant::ternary_value(src[b], i));
    for (int64_t k = full * quant::kTernaryPerByte; k < g.K; ++k)
      dst[k] = static_cast<int8_t>(quant::ternary_value(src[full], static_cast<int>(k - full * quant::kTernaryPerByte)));
  }
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
