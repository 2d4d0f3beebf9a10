// dp4a GEMV for int8 activations: the small-M path (M <= 16) of int8_gemm and
// ternary_gemm, where a tensor-core tile would waste most of its rows, and
// their fallback for operands that cp.async cannot copy (unaligned rows).
//
// Each warp owns kRowsPerWarp weight rows and streams them exactly once per
// M tile; the M tile's activations are staged in shared memory one K chunk
// at a time and reused by all 8 warps. Lane l handles the 16-deep K pieces
// 32 s + l (s < kSteps) of a chunk, so each load instruction of a warp covers
// one contiguous span of the weight row (512 int8 bytes, or 128 packed
// ternary bytes) and the shared-memory reads of the activations are
// conflict-free. The int32 partial sums are reduced across the warp at the
// end, which is exact (integer addition in any order).
#pragma once
#include <cstdint>
#include "quant_device.cuh"

namespace flashkd::cuda {

namespace gemv {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kSteps = 4;
constexpr int kChunk = kSteps * 32 * 16;  // K values staged per pass
constexpr int kPieces = kChunk / 16;      // 16-byte activation pieces per row and chunk
constexpr int kMaxRows = 16;              // largest M tile

// Weight-row policies: load(n, k) fetches what the 16 weights k..k+15 of row
// n need (k is a multiple of 16 and < K); expand() turns it into four words
// of int8 weights, word j = k + 4j .. k + 4j + 3. Rows >= N read as zeros.
struct Int8Rows {
  using Raw = uint4;
  const int8_t* w;
  int64_t ldw, N, K;
  bool vec16, word_ok;  // w and ldw 16- / 4-byte aligned

  __device__ __forceinline__ Raw load(int64_t n, int64_t k) const {
    if (n >= N) return make_uint4(0, 0, 0, 0);
    return load16_guarded(reinterpret_cast<const uint8_t*>(w + n * ldw), k, K, vec16, word_ok);
  }
  __device__ __forceinline__ static uint4 expand(Raw r) { return r; }
};

struct TernaryRows {
  using Raw = uint32_t;
  const uint8_t* w;
  int64_t ldw_bytes, N, row_bytes;
  bool word_ok;  // w and ldw_bytes 4-byte aligned

  __device__ __forceinline__ Raw load(int64_t n, int64_t k) const {
    if (n >= N) return 0x55555555u;
    return load_word_guarded(w + n * ldw_bytes, k / quant::kTernaryPerByte, row_bytes, word_ok,
                             kTernaryZeroByte);
  }
  __device__ __forceinline__ static uint4 expand(Raw r) { return decode_ternary16(r); }
};

// Grid: x over blocks of kRowsPerBlock weight rows, y over M tiles of MT rows
// (grid-stride, so any M fits in gridDim.y).
template <int MT, class Rows>
__global__ void __launch_bounds__(kThreads)
    dp4a_gemv_kernel(const int8_t* a, int64_t lda, Rows rows, int64_t M, int64_t N, int64_t K,
                     quant::GemmEpilogue epi) {
  __shared__ uint4 act[MT][kPieces];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = (int64_t(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  const bool a_vec16 = aligned_to(a, lda, 16), a_word = aligned_to(a, lda, 4);

  for (int64_t m0 = int64_t(blockIdx.y) * MT; m0 < M; m0 += int64_t(gridDim.y) * MT) {
    int32_t acc[MT][kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[i][r] = 0;

    for (int64_t kc = 0; kc < K; kc += kChunk) {
      // The chunk's weight loads go first (they need no shared memory), so
      // they are in flight together and overlap the activation staging.
      typename Rows::Raw raw[kSteps][kRowsPerWarp];
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const int64_t k = kc + 16 * (32 * s + lane);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) raw[s][r] = k < K ? rows.load(n0 + r, k) : typename Rows::Raw{};
      }
      __syncthreads();  // every warp is done reading the previous chunk
      for (int i = threadIdx.x; i < MT * kPieces; i += kThreads) {
        const int mr = i / kPieces, piece = i % kPieces;
        const int64_t m = m0 + mr;
        act[mr][piece] = m < M ? load16_guarded(reinterpret_cast<const uint8_t*>(a + m * lda),
                                                kc + 16 * piece, K, a_vec16, a_word)
                               : make_uint4(0, 0, 0, 0);
      }
      __syncthreads();
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const int piece = 32 * s + lane;
        if (kc + 16 * piece >= K) continue;
        uint4 wv[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) wv[r] = Rows::expand(raw[s][r]);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const uint4 x = act[i][piece];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            int32_t v = acc[i][r];
            v = __dp4a(static_cast<int>(x.x), static_cast<int>(wv[r].x), v);
            v = __dp4a(static_cast<int>(x.y), static_cast<int>(wv[r].y), v);
            v = __dp4a(static_cast<int>(x.z), static_cast<int>(wv[r].z), v);
            acc[i][r] = __dp4a(static_cast<int>(x.w), static_cast<int>(wv[r].w), v);
          }
        }
      }
    }

    warp_sum_and_store(acc, lane, [&](int i, int r, int32_t v) {
      if (m0 + i < M && n0 + r < N)
        with_epilogue_store(epi, [&](const auto& store) { store(m0 + i, n0 + r, v); });
    });
  }
}

template <int MT, class Rows>
const char* launch_tile(const int8_t* a, int64_t lda, const Rows& rows, int64_t M, int64_t N, int64_t K,
                        const quant::GemmEpilogue& epi, cudaStream_t stream) {
  const int64_t m_tiles = (M + MT - 1) / MT;
  const dim3 grid(static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(m_tiles < 65535 ? m_tiles : 65535));
  dp4a_gemv_kernel<MT><<<grid, kThreads, 0, stream>>>(a, lda, rows, M, N, K, epi);
  return last_error();
}

// Picks the smallest M tile that holds M (up to kMaxRows; larger M loops).
template <class Rows>
const char* launch(const int8_t* a, int64_t lda, const Rows& rows, int64_t M, int64_t N, int64_t K,
                   const quant::GemmEpilogue& epi, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (M <= 1) return launch_tile<1>(a, lda, rows, M, N, K, epi, s);
  if (M <= 2) return launch_tile<2>(a, lda, rows, M, N, K, epi, s);
  if (M <= 4) return launch_tile<4>(a, lda, rows, M, N, K, epi, s);
  if (M <= 8) return launch_tile<8>(a, lda, rows, M, N, K, epi, s);
  return launch_tile<kMaxRows>(a, lda, rows, M, N, K, epi, s);
}

}  // namespace gemv

}  // namespace flashkd::cuda
