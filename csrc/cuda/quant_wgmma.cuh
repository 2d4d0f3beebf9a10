// Hopper (sm_90a) main loop of int8_gemm: warpgroup MMAs (wgmma) reading
// both operands from shared memory, which the sm_80 `mma.sync` loop of
// quant_mma.cuh cannot match on an H100 (wgmma is where its int8 peak is).
//
//   acc[m, n] = sum_k A[m, k] * W[n, k]   (int8 x int8 -> exact int32)
//
// Block tile 128 x 128, k tiles of 128 bytes; 256 threads = two warpgroups,
// each computing 64 x 128 with wgmma.m64n128k32 (four per k tile). Every
// thread also copies: A and W tiles go global -> shared with cp.async into
// the 128-byte-swizzled K-major layout that wgmma's descriptors describe
// (16-byte chunk c of row r stored at chunk c ^ (r % 8) of its 128-byte row,
// tiles 1024-byte aligned). Three stages of 32 KiB, two blocks per SM. Per k
// tile: wait for its copies, make them visible to the async proxy, barrier,
// issue the four wgmmas, refill the stage the previous tile used (its wgmmas
// finished: each warpgroup waits for its own at the end of an iteration and
// the barrier orders that before the refill), then wait for these wgmmas.
//
// The accumulator layout is mma.sync's C fragment repeated over n: register
// 4i + j of thread (warp w of the warpgroup, lane = 4g + t) holds
// row 16w + g + 8 (j / 2), column 8i + 2t + (j % 2).
//
// Compiled to a trap on every architecture but sm_90a; the host side only
// launches it after checking that the loaded binary is sm_90a's.
#pragma once
#include <cstdint>
#include "quant_mma.cuh"

namespace flashkd::cuda {

namespace wg {

constexpr int kBM = 128, kBN = 128, kBK = 128;  // kBK in bytes
constexpr int kStages = 3;
constexpr int kThreads = 256;
constexpr int kATileBytes = kBM * kBK, kWTileBytes = kBN * kBK;
constexpr int kStageBytes = kATileBytes + kWTileBytes;
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows x 128 bytes
// Dynamic shared memory: the stages plus slack to align the base to 1024.
constexpr int kSmemBytes = kStages * kStageBytes + kSwizzleAtomBytes;

__device__ __forceinline__ int swizzled(int row, int chunk) { return row * kBK + ((chunk ^ (row & 7)) << 4); }

// Matrix descriptor of a K-major tile with 128-byte swizzling: start address,
// leading byte offset (unused by this layout, 16), stride byte offset = 1024
// between groups of 8 rows, layout type 1 = 128B swizzle. Advancing the start
// by 32 bytes steps k by 32 inside the swizzle atom (the hardware applies the
// XOR to the full address, which is why tiles are 1024-byte aligned).
__device__ __forceinline__ uint64_t descriptor(uint32_t smem_address) {
  return uint64_t((smem_address & 0x3FFFF) >> 4) | (uint64_t(16 >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// Copies k tile kt of rows row0 .. row0 + ROWS - 1 (row_bytes per row, rows
// ld_bytes apart, 16-byte aligned) into a swizzled tile, zero-filling rows past
// `rows` and bytes past row_bytes without reading them.
template <int ROWS>
__device__ __forceinline__ void copy_tile(uint8_t* tile, const uint8_t* base, int64_t ld_bytes, int64_t rows,
                                          int64_t row_bytes, int64_t row0, int64_t kt) {
  constexpr int kChunks = ROWS * (kBK / 16);
  static_assert(kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int it = 0; it < kChunks / kThreads; ++it) {
    const int i = threadIdx.x + it * kThreads;
    const int r = i / (kBK / 16), c = i % (kBK / 16);
    const int64_t row = row0 + r, k = kt * kBK + 16 * c;
    const int64_t left = row_bytes - k;
    const int bytes = row < rows && left > 0 ? (left < 16 ? static_cast<int>(left) : 16) : 0;
    tc::cp_async_16(tile + swizzled(r, c), bytes ? base + row * ld_bytes + k : base, bytes);
  }
}

// d (64 x 128 s32, this warpgroup's) += A (64 x 32 s8) * W^T (32 x 128 s8).
__device__ __forceinline__ void wgmma_m64n128k32(int32_t (&d)[64], uint64_t a_desc, uint64_t w_desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      ".reg .pred accumulate;\n"
      "setp.ne.b32 accumulate, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, accumulate;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(a_desc), "l"(w_desc), "n"(1));
#endif
}

// Keeps the compiler from moving accesses to the accumulators across the
// asynchronous wgmmas that own them until wgmma_wait_all().
__device__ __forceinline__ void fence_registers(int32_t (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}

// Grid: one block per 128 x 128 output tile, rastered like quant_mma.cuh.
__global__ void __launch_bounds__(kThreads, 2)
    int8_wgmma_kernel(const int8_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t M, int64_t N,
                      int64_t K, quant::GemmEpilogue epi) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  uint8_t* smem = smem_raw + ((kSwizzleAtomBytes - raw % kSwizzleAtomBytes) % kSwizzleAtomBytes);
  auto a_tile = [&](int s) { return smem + s * kStageBytes; };
  auto w_tile = [&](int s) { return smem + s * kStageBytes + kATileBytes; };

  int64_t m0, n0;
  tc::tile_origin<kBM, kBN>(blockIdx.x, M, N, m0, n0);
  const int64_t ktiles = (K + kBK - 1) / kBK;
  const uint8_t* a_bytes = reinterpret_cast<const uint8_t*>(a);
  const uint8_t* w_bytes = reinterpret_cast<const uint8_t*>(w);
  const int warpgroup = threadIdx.x / 128;

  int32_t d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) {
      copy_tile<kBM>(a_tile(s), a_bytes, lda, M, K, m0, s);
      copy_tile<kBN>(w_tile(s), w_bytes, ldw, N, K, n0, s);
    }
    tc::cp_async_commit();
  }

  for (int64_t kt = 0; kt < ktiles; ++kt) {
    tc::cp_async_wait<kStages - 2>();
    fence_proxy_async();
    __syncthreads();  // tile kt is in place; every warpgroup finished tile kt - 1
    const int cur = static_cast<int>(kt % kStages);
    const uint32_t a_base = smem_addr(a_tile(cur)) + warpgroup * 64 * kBK;
    const uint32_t w_base = smem_addr(w_tile(cur));
    fence_registers(d);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks)
      wgmma_m64n128k32(d, descriptor(a_base + 32 * ks), descriptor(w_base + 32 * ks));
    wgmma_commit();
    const int64_t next = kt + kStages - 1;
    if (next < ktiles) {
      const int s = static_cast<int>(next % kStages);
      copy_tile<kBM>(a_tile(s), a_bytes, lda, M, K, m0, next);
      copy_tile<kBN>(w_tile(s), w_bytes, ldw, N, K, n0, next);
    }
    tc::cp_async_commit();
    wgmma_wait_all();
    fence_registers(d);
  }
  tc::cp_async_wait<0>();

  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 16; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + warpgroup * 64 + warp * 16 + g + 8 * (j >> 1);
      const int64_t n = n0 + 8 * i + 2 * t + (j & 1);
      if (m < M && n < N) store_epilogue(epi, m, n, d[4 * i + j]);
    }
#else
  __trap();  // never launched: see available()
#endif
}

// True when the int8_wgmma_kernel the runtime loads for the current device
// is the sm_90a build (its sm_80 build only traps).
inline bool available() {
  static Sm90Build build(reinterpret_cast<const void*>(&int8_wgmma_kernel));
  return build.loaded();
}

inline const char* launch(const int8_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t M, int64_t N,
                          int64_t K, const quant::GemmEpilogue& epi, void* stream) {
  const int64_t tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  if (tiles > INT32_MAX) return "flashkd: too many output tiles for the wgmma grid";
  // Over 48 KiB of dynamic shared memory needs the opt-in (per device, so every time).
  const cudaError_t err =
      cudaFuncSetAttribute(int8_wgmma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reported here: must not resurface as a later launch's error
    return cudaGetErrorString(err);
  }
  int8_wgmma_kernel<<<static_cast<unsigned>(tiles), kThreads, kSmemBytes, static_cast<cudaStream_t>(stream)>>>(
      a, lda, w, ldw, M, N, K, epi);
  return last_error();
}

}  // namespace wg

}  // namespace flashkd::cuda
