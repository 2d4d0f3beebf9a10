// Device helpers shared by the quantized-matmul kernels (quant_*.cu): bounds-
// guarded loads of packed rows, the 2-bit ternary decoder and the int32 ->
// float epilogue of flashkd/quant_params.h.
#pragma once
#include <cstdint>
#include <type_traits>
#include "device_utils.cuh"
#include "host_utils.cuh"
#include "flashkd/quant_params.h"

namespace flashkd::cuda {

// The byte that decodes to four zero weights (code 1 = w + 1 in every slot).
constexpr uint8_t kTernaryZeroByte = 0x55;

// True when every row p + i * ld (ld in bytes, or in int8 elements) starts on
// a `bytes` boundary.
__host__ __device__ __forceinline__ bool aligned_to(const void* p, int64_t ld, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 && ld % bytes == 0;
}

// Bytes row[off, off + 4) as a little-endian word; bytes at or past `len`
// read as `fill` and are never touched. `word_ok`: row + off is 4-aligned.
__device__ __forceinline__ uint32_t load_word_guarded(const uint8_t* row, int64_t off, int64_t len,
                                                      bool word_ok, uint8_t fill) {
  if (word_ok && off + 4 <= len) return __ldg(reinterpret_cast<const uint32_t*>(row + off));
  uint32_t w = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t b = off + j < len ? __ldg(row + off + j) : fill;
    w |= b << (8 * j);
  }
  return w;
}

// Bytes row[off, off + 16) with zeros at or past `len` (off is a multiple of
// 16). `vec16`/`word_ok`: row + off is 16-/4-aligned.
__device__ __forceinline__ uint4 load16_guarded(const uint8_t* row, int64_t off, int64_t len,
                                                bool vec16, bool word_ok) {
  if (vec16 && off + 16 <= len) return __ldg(reinterpret_cast<const uint4*>(row + off));
  return make_uint4(load_word_guarded(row, off, len, word_ok, 0),
                    load_word_guarded(row, off + 4, len, word_ok, 0),
                    load_word_guarded(row, off + 8, len, word_ok, 0),
                    load_word_guarded(row, off + 12, len, word_ok, 0));
}

// Four packed ternary bytes (16 weights, k = 0..15 relative) -> four words of
// int8 weights, word j holding k = 4j..4j+3 (the order dp4a and the int8 MMA
// read). t_i = (p >> 2i) & 0x03 per byte holds slot i of every byte; the
// byte-permutes transpose that 4x4 byte matrix so word j gathers byte j's four
// slots. Codes c in {0,1,2} become c - 1 per byte without borrows between
// bytes: (c + 0x7f) ^ 0x80 == c - 1 (mod 256) for c <= 3.
__device__ __forceinline__ uint4 decode_ternary16(uint32_t p) {
  const uint32_t t0 = p & 0x03030303u, t1 = (p >> 2) & 0x03030303u;
  const uint32_t t2 = (p >> 4) & 0x03030303u, t3 = (p >> 6) & 0x03030303u;
  const uint32_t u0 = __byte_perm(t0, t1, 0x5140), u1 = __byte_perm(t0, t1, 0x7362);
  const uint32_t v0 = __byte_perm(t2, t3, 0x5140), v1 = __byte_perm(t2, t3, 0x7362);
  auto minus_one = [](uint32_t c) { return (c + 0x7f7f7f7fu) ^ 0x80808080u; };
  return make_uint4(minus_one(__byte_perm(u0, v0, 0x5410)), minus_one(__byte_perm(u0, v0, 0x7632)),
                    minus_one(__byte_perm(u1, v1, 0x5410)), minus_one(__byte_perm(u1, v1, 0x7632)));
}

// int4 -> bf16/fp16 without conversions: a 4-bit q in the low mantissa bits
// of bf16 128.0 (0x4300, 7 mantissa bits) or fp16 1024.0 (0x6400, 10 bits)
// is exactly 128 + q or 1024 + q; subtracting (128 or 1024) + zero in the
// same type leaves q - zero, exact for an integer zero in [0, 15] (every
// value involved is an integer below 2^8, which both types hold exactly).
template <typename T> struct Int4Magic;
template <> struct Int4Magic<__nv_bfloat16> {
  static constexpr uint32_t kPairBits = 0x43004300u;
  static constexpr float kValue = 128.f;
};
template <> struct Int4Magic<__half> {
  static constexpr uint32_t kPairBits = 0x64006400u;
  static constexpr float kValue = 1024.f;
};

// (magic + zero) in both 16-bit halves of a word.
template <typename T> __device__ __forceinline__ uint32_t int4_magic_pair(float zero);
template <> __device__ __forceinline__ uint32_t int4_magic_pair<__nv_bfloat16>(float zero) {
  const __nv_bfloat162 v = __float2bfloat162_rn(Int4Magic<__nv_bfloat16>::kValue + zero);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t int4_magic_pair<__half>(float zero) {
  const __half2 v = __float2half2_rn(Int4Magic<__half>::kValue + zero);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// a - b in both 16-bit halves of a word.
template <typename T> __device__ __forceinline__ uint32_t sub_pairs(uint32_t a, uint32_t b);
template <> __device__ __forceinline__ uint32_t sub_pairs<__nv_bfloat16>(uint32_t a, uint32_t b) {
  const __nv_bfloat162 d =
      __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&d);
}
template <> __device__ __forceinline__ uint32_t sub_pairs<__half>(uint32_t a, uint32_t b) {
  const __half2 d = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&d);
}

// One packed int4 word (8 values, k = 0..7 relative, value j in bits 4j..4j+3)
// -> four words of T pairs, word i holding k = 2i (low half) and 2i + 1, each
// q - zero exactly; `zero_pair` is int4_magic_pair<T>(zero).
template <typename T>
__device__ __forceinline__ uint4 decode_int4x8(uint32_t p, uint32_t zero_pair) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t x = p >> (8 * i);
    w[i] = sub_pairs<T>((x & 0xFu) | ((x << 12) & 0xF0000u) | Int4Magic<T>::kPairBits, zero_pair);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// out[m, n] from the exact accumulator: the int32 itself, or
// float(acc) * a_scale[m] * w_scale[n] + bias[n] in that order with every
// operation rounded separately (_rn intrinsics are never fused into an FMA),
// so the result equals a plain float32 evaluation on the CPU bit for bit.
//
// One store type per variant (int32; output dtype x bias dtype or none), and
// with_epilogue_store() hands a kernel's store loop the one its epilogue
// needs, so the loop holds no branch on the epilogue's fields. With one
// generic store per element, the compiler duplicated the unrolled store loops
// (64 or 128 stores per thread) once per path through those branches, and
// ptxas took minutes per kernel (the wgmma GEMM's PTX was 189k lines).
struct StoreInt32 {
  const quant::GemmEpilogue& e;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int32_t acc) const {
    e.out_int32[m * e.ldo + n] = acc;
  }
};

template <typename Out, typename Bias>  // Bias void: no bias
struct StoreScaled {
  const quant::GemmEpilogue& e;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int32_t acc) const {
    // Read-only loads (__ldg): no kernel writes the scales or the bias.
    const float ws = __ldg(e.w_scale + (e.w_scale_per_row ? n : 0));
    float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), __ldg(e.a_scale + m)), ws);
    if constexpr (!std::is_void_v<Bias>) v = __fadd_rn(v, to_float(__ldg(static_cast<const Bias*>(e.bias) + n)));
    static_cast<Out*>(e.out)[m * e.ldo + n] = from_float<Out>(v);
  }
};

template <typename Out, class F>
__device__ __forceinline__ void with_bias_store(const quant::GemmEpilogue& e, const F& f) {
  if (!e.bias) return f(StoreScaled<Out, void>{e});
  switch (e.bias_dtype) {
    case DType::kBFloat16: return f(StoreScaled<Out, __nv_bfloat16>{e});
    case DType::kFloat16: return f(StoreScaled<Out, __half>{e});
    default: return f(StoreScaled<Out, float>{e});
  }
}

// Calls f(store) with the store for e; store(m, n, acc) writes out[m, n].
template <class F>
__device__ __forceinline__ void with_epilogue_store(const quant::GemmEpilogue& e, const F& f) {
  if (e.out_int32) return f(StoreInt32{e});
  switch (e.out_dtype) {
    case DType::kBFloat16: return with_bias_store<__nv_bfloat16>(e, f);
    case DType::kFloat16: return with_bias_store<__half>(e, f);
    default: return with_bias_store<float>(e, f);
  }
}

// The int4 kernels' output element: their float32 sum plus the bias (of the
// output's dtype T; none when null), rounded to T once.
template <typename T>
__device__ __forceinline__ T add_bias_and_round(float v, const T* bias, int64_t n) {
  return from_float<T>(bias ? v + to_float(bias[n]) : v);
}

__device__ __forceinline__ int32_t warp_sum(int32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The GEMVs' end: sums each of a warp's MT x R partial results across the
// warp and stores result t = R i + r from lane t % 32, so the stores leave
// from all lanes at once rather than one after another from lane 0. The
// butterfly sums leave every total in every lane, bitwise the same in each
// (each step adds the same two values, and IEEE addition commutes), so any
// lane may store it. Each kernel then inlines ceil(MT R / 32) store sites,
// not MT R: with one site per result, the compiler duplicated the unrolled
// sums once per epilogue variant (output dtype x bias dtype x ...) and ptxas
// took two minutes for the MT = 16 int8 GEMV alone.
template <int MT, int R, typename T, class Store>
__device__ __forceinline__ void warp_sum_and_store(const T (&partial)[MT][R], int lane, const Store& store) {
  constexpr int kItems = MT * R, kPerLane = (kItems + 31) / 32;
  T mine[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) mine[j] = T(0);
#pragma unroll
  for (int t = 0; t < kItems; ++t) {
    const T total = warp_sum(partial[t / R][t % R]);
    if (t % 32 == lane) mine[t / 32] = total;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int t = 32 * j + lane;
    if (t < kItems) store(t / R, t % R, mine[j]);
  }
}

}  // namespace flashkd::cuda
