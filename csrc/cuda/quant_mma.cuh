// Integer tensor-core GEMM mainloop shared by int8_gemm and ternary_gemm:
//   acc[m, n] = sum_k A[m, k] * W[n, k]   (int8 x int8 -> exact int32)
// A (M, K) and W (N, K) are both K-contiguous, which is the "row.col" (TN)
// operand layout of mma.sync m16n8k32 s8. The kernel is templated on a tile
// loader per operand (a policy with fetch/stash), so the same pipeline runs
// on cp.async-copied int8 tiles and on ternary tiles decoded in registers.
//
// Block tile 128 x 128 x 64, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 =
// 4 x 4 MMAs of 16 x 8 per 32-deep k step. Three shared-memory stages of
// 2 x 8 KiB = 48 KiB (static, no opt-in needed), two blocks per SM. Blocks are
// rastered in groups of kGroupM tile rows so that the tiles one wave of
// blocks touches stay in L2.
#pragma once
#include <cstdint>
#include "quant_device.cuh"

namespace flashkd::cuda {

namespace imma {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kStages = 3;
constexpr int64_t kGroupM = 8;
constexpr int kThreads = 256;
constexpr int kTileBytes = kBM * kBK;  // one operand's tile; kBN == kBM
constexpr int kChunksPerRow = kBK / 16;
static_assert(kBM == kBN, "one tile size serves both operands");

// A tile is stored row by row (64 bytes = four 16-byte chunks per row). The
// chunk index is XOR-swizzled with (row / 2) % 4 so that the eight row
// addresses of one ldmatrix 8x16-byte matrix (rows r..r+7, one logical chunk)
// fall in eight distinct 16-byte bank groups: row parity picks the 64-byte
// half of a 128-byte bank line, the swizzle picks the chunk inside it.
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that reads only `src_bytes` (0..16) bytes and
// zero-fills the rest, so partial K chunks and rows past the end read nothing
// out of range. `src` must be 16-byte aligned even when src_bytes < 16.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices (= 8 rows x 16 int8 each); lanes 8i..8i+7 give the
// row addresses of matrix i, and lane l receives word l % 4 of row l / 4 of
// every matrix, i.e. int8 columns 4(l%4)..4(l%4)+3 -- the s8 MMA fragment.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a (16x32 s8, row) * b (32x8 s8, col), int32 accumulate (wrapping, no
// saturation, like the CPU's int32 sum).
__device__ __forceinline__ void mma_s8_16x8x32(int32_t (&c)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Loads int8 (rows, K) tiles with cp.async; needs base and ld 16-byte aligned.
// Each thread copies two of the 128 x 4 chunks; rows past `rows` and bytes
// past K are zero-filled without being read.
struct Int8TileCpAsync {
  const int8_t* base;
  int64_t ld, rows, K;

  __device__ __forceinline__ void fetch(uint8_t* tile, int64_t row0, int64_t k0) {
    static_assert(kBM * kChunksPerRow % kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int it = 0; it < kBM * kChunksPerRow / kThreads; ++it) {
      const int i = threadIdx.x + it * kThreads;
      const int r = i / kChunksPerRow, c = i % kChunksPerRow;
      const int64_t row = row0 + r, k = k0 + 16 * c;
      const int64_t left = K - k;
      const int bytes = row < rows && left > 0 ? (left < 16 ? static_cast<int>(left) : 16) : 0;
      cp_async_16(tile + swizzled(r, c), bytes ? base + row * ld + k : base, bytes);
    }
  }
  __device__ __forceinline__ void stash(uint8_t*) {}
};

// Loads packed ternary (rows, ceil(K/4)) tiles: `fetch` reads the 16 packed
// bytes of a 64-deep row slice into registers (thread t: row t / 2, bytes
// 8 (t % 2) .. + 8), `stash` decodes them after the MMAs of the current stage
// have been issued and stores the int8 weights to the (swizzled) tile, so the
// global-load latency hides behind the math. Rows past `rows` and bytes past
// the row decode to zeros; k past K meets zero-filled activations anyway.
struct TernaryTileDecode {
  const uint8_t* base;
  int64_t ld_bytes, rows, row_bytes;
  bool word_ok;  // base and ld_bytes 4-aligned
  uint32_t packed[2];

  __device__ __forceinline__ void fetch(uint8_t*, int64_t row0, int64_t k0) {
    static_assert(kThreads == 2 * kBN && kBK == 64, "two threads per 16-byte packed row slice");
    const int64_t row = row0 + (threadIdx.x >> 1);
    const int64_t off = k0 / quant::kTernaryPerByte + 8 * (threadIdx.x & 1);
#pragma unroll
    for (int j = 0; j < 2; ++j)
      packed[j] = row < rows ? load_word_guarded(base + row * ld_bytes, off + 4 * j, row_bytes,
                                                 word_ok, kTernaryZeroByte)
                             : 0x55555555u;
  }
  __device__ __forceinline__ void stash(uint8_t* tile) {
    const int r = threadIdx.x >> 1;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      *reinterpret_cast<uint4*>(tile + swizzled(r, 2 * (threadIdx.x & 1) + j)) = decode_ternary16(packed[j]);
  }
};

// One 64-deep stage: two k32 steps of 4 x 4 MMAs per warp.
__device__ __forceinline__ void warp_tile_mma(const uint8_t* a_tile, const uint8_t* b_tile, int warp_m,
                                              int warp_n, int lane, int32_t (&acc)[4][4][4]) {
#pragma unroll
  for (int ks = 0; ks < kBK / 32; ++ks) {
    // A: matrices (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31),
    // (rows 8-15, k 16-31) = fragment registers a0..a3 of m16n8k32.
    uint32_t af[4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
      ldmatrix_x4(af[mi], a_tile + swizzled(warp_m * 64 + mi * 16 + (lane & 15), 2 * ks + (lane >> 4)));
    // W: matrices (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15),
    // (n 8-15, k 16-31) = registers b0, b1 of two adjacent n8 tiles.
    uint32_t bf[4][2];
#pragma unroll
    for (int nj = 0; nj < 2; ++nj) {
      uint32_t r[4];
      ldmatrix_x4(r, b_tile + swizzled(warp_n * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3),
                                       2 * ks + ((lane >> 3) & 1)));
      bf[2 * nj][0] = r[0];
      bf[2 * nj][1] = r[1];
      bf[2 * nj + 1][0] = r[2];
      bf[2 * nj + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) mma_s8_16x8x32(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
  }
}

// Grid: one block per output tile (1-D). Pipeline, one barrier per k tile:
// wait for tile kt, barrier (which also proves every warp finished computing
// tile kt - 1), refill the stage tile kt - 1 used with tile kt + kStages - 1,
// compute tile kt. A register-staged
// loader writes that freed stage after the compute; the barrier of the
// iteration that consumes it orders the write before the reads.
template <class ALoader, class WLoader>
__global__ void __launch_bounds__(kThreads, 2)
    imma_gemm_kernel(const ALoader a_param, const WLoader w_param, int64_t M, int64_t N, int64_t K,
                     quant::GemmEpilogue epi) {
  __shared__ __align__(128) uint8_t smem[kStages][2][kTileBytes];
  ALoader a_ld = a_param;  // loaders may stage data in their registers
  WLoader w_ld = w_param;

  // Group-major raster: kGroupM tile rows (M) at a time, M fastest inside a
  // group; the last group may be shorter. A bijection onto all tiles.
  const int64_t m_tiles = (M + kBM - 1) / kBM, n_tiles = (N + kBN - 1) / kBN;
  const int64_t id = blockIdx.x, per_group = kGroupM * n_tiles;
  const int64_t first_m = id / per_group * kGroupM, local = id % per_group;
  const int64_t group_m = m_tiles - first_m < kGroupM ? m_tiles - first_m : kGroupM;
  const int64_t m0 = (first_m + local % group_m) * kBM, n0 = local / group_m * kBN;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int64_t ktiles = (K + kBK - 1) / kBK;

  int32_t acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) {
      a_ld.fetch(smem[s][0], m0, int64_t(s) * kBK);
      w_ld.fetch(smem[s][1], n0, int64_t(s) * kBK);
      a_ld.stash(smem[s][0]);
      w_ld.stash(smem[s][1]);
    }
    cp_async_commit();  // possibly empty: keeps one group per tile for wait<>
  }

  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t next = kt + kStages - 1;
    const bool refill = next < ktiles;
    uint8_t* a_next = smem[next % kStages][0];
    uint8_t* w_next = smem[next % kStages][1];
    if (refill) {
      a_ld.fetch(a_next, m0, next * kBK);
      w_ld.fetch(w_next, n0, next * kBK);
    }
    cp_async_commit();
    const int cur = static_cast<int>(kt % kStages);
    warp_tile_mma(smem[cur][0], smem[cur][1], warp_m, warp_n, lane, acc);
    if (refill) {
      a_ld.stash(a_next);
      w_ld.stash(w_next);
    }
  }
  cp_async_wait<0>();  // nothing may stay in flight into shared memory at exit

  // C fragment: registers 0,1 = (row g, cols 2t, 2t+1), 2,3 = (row g+8, same
  // cols), g = lane / 4, t = lane % 4.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t m = m0 + warp_m * 64 + mi * 16 + g + 8 * (j >> 1);
        const int64_t n = n0 + warp_n * 32 + ni * 8 + 2 * t + (j & 1);
        if (m < M && n < N) store_epilogue(epi, m, n, acc[mi][ni][j]);
      }
}

template <class ALoader, class WLoader>
const char* launch(const ALoader& a_ld, const WLoader& w_ld, int64_t M, int64_t N, int64_t K,
                   const quant::GemmEpilogue& epi, void* stream) {
  const int64_t tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  if (tiles > INT32_MAX) return "flashkd: too many output tiles for the int8 tensor-core grid";
  imma_gemm_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a_ld, w_ld, M, N, K, epi);
  return last_error();
}

}  // namespace imma

}  // namespace flashkd::cuda
