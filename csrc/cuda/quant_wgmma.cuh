// Hopper (sm_90a) main loop of int8_gemm: warpgroup MMAs (wgmma) fed by the
// tensor-map copy engine (TMA), which the sm_80 `mma.sync` loop of
// quant_mma.cuh cannot match on an H100 (wgmma is where its int8 peak is).
//
//   acc[m, n] = sum_k A[m, k] * W[n, k]   (int8 x int8 -> exact int32)
//
// Block tile 128 x 256, k tiles of 128 bytes, four shared-memory stages of
// 16 + 32 KiB, one block per SM. Why this shape: an int8 tile of 128 x 128
// reads 32 KiB from L2 per 2M multiply-adds, which at the H100's int8 rate
// asks more of the L2 than it gives; 128 x 256 reads 48 KiB per 4M. By
// default two blocks form a cluster over the same 256 W rows and adjacent
// 128-row A tiles: each loads its own A tile and half of the W tile, which
// the copy engine multicasts into both blocks, so a block reads 32 KiB of
// L2 per 4M (kCluster = 2; "wgmma-1cta" runs kCluster = 1, every block on
// its own).
//
// Three warpgroups with one job each (warp specialization):
//   * warpgroup 0, the producer: one thread waits until a stage is free in
//     every block of the cluster, announces its 48 KiB on the stage's `full`
//     barrier and has the copy engine load its A tile and its share of the
//     W tile. The copy engine writes the 128-byte swizzled K-major layout
//     that the wgmma descriptors describe (16-byte chunk c of row r at chunk
//     c ^ (r % 8) of its 128-byte row, tiles 1024-byte aligned), and
//     zero-fills rows and k columns past the matrix, so tails need no code
//     and read nothing out of range. A multicast copy lands at the same
//     offset in each block and counts on each block's barrier there.
//   * warpgroups 1 and 2, the consumers: each computes 64 rows x 256 columns
//     with four wgmma.m64n256k32 per k tile. A consumer waits for the tile,
//     issues its wgmmas, and then waits only for the previous tile's (one
//     batch stays in flight, so the tensor cores never idle on the issue),
//     and frees the previous tile's stage: lane 0 of each of its warps
//     arrives on the stage's `empty` barrier of every block of the cluster
//     (8 arrivals per block free a stage: the producers write into all of
//     them).
// The producer never runs more than four tiles ahead, so barrier parities
// (the phase count mod 2) identify phases without ambiguity. A block of a
// cluster ends only when its peer is done too (its consumers still arrive on
// this block's barriers).
//
// The accumulator layout is mma.sync's C fragment repeated over n: register
// 4i + j of thread (warp w of the warpgroup, lane = 4g + t) holds
// row 16w + g + 8 (j / 2), column 8i + 2t + (j % 2).
//
// Compiled to a trap on every architecture but sm_90a; the host side only
// launches it after checking that the loaded binary is sm_90a's.
#pragma once
#include <cooperative_groups.h>
#include <cuda.h>  // CUtensorMap and its encoder's enums (types only: no driver library is linked)
#include <cudaTypedefs.h>
#include <cstdint>
#include "mbarrier.cuh"
#include "quant_mma.cuh"

namespace flashkd::cuda {

namespace wg {

constexpr int kBM = 128, kBN = 256, kBK = 128;  // kBK in bytes
constexpr int kStages = 4;
constexpr int kConsumers = 2;                      // warpgroups, 64 rows each
constexpr int kThreads = 128 * (1 + kConsumers);  // plus the producer warpgroup
constexpr int kConsumerWarps = 4 * kConsumers;    // arrivals from each block that free a stage
constexpr int kATileBytes = kBM * kBK, kWTileBytes = kBN * kBK;
constexpr int kStageBytes = kATileBytes + kWTileBytes;
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows x 128 bytes
constexpr int kAcc = kBN / 2;            // int32 accumulators per consumer thread
// Dynamic shared memory: the stages, their full/empty barriers, and slack to
// align the base to 1024.
constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + kSwizzleAtomBytes;
static_assert(kStageBytes % kSwizzleAtomBytes == 0 && kATileBytes % kSwizzleAtomBytes == 0,
              "every tile starts on a swizzle atom");
static_assert(kBK == 128, "the 128-byte swizzle holds one 128-byte k row");

// Matrix descriptor of a K-major tile with 128-byte swizzling: start address,
// leading byte offset (unused by this layout, 16), stride byte offset = 1024
// between groups of 8 rows, layout type 1 = 128B swizzle. Advancing the start
// by 32 bytes steps k by 32 inside the swizzle atom (the hardware applies the
// XOR to the full address, which is why tiles are 1024-byte aligned).
__device__ __forceinline__ uint64_t descriptor(uint32_t smem_address) {
  return uint64_t((smem_address & 0x3FFFF) >> 4) | (uint64_t(16 >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Loads the box at (k0 bytes, row0) of the tensor map into this block's
// shared memory, counted on `bar`.
__device__ __forceinline__ void tma_load_tile(void* dst, const CUtensorMap& map, int32_t k0, int32_t row0,
                                              uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(k0), "r"(row0), "r"(smem_addr(bar))
      : "memory");
}

// The same box into the same offset of the shared memory of every block of
// the cluster in `blocks` (bit r: rank r), counted on each one's `bar`.
__device__ __forceinline__ void tma_multicast_tile(void* dst, const CUtensorMap& map, int32_t k0, int32_t row0,
                                                   uint64_t* bar, uint16_t blocks) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1, {%2, %3}], [%4], %5;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(k0), "r"(row0), "r"(smem_addr(bar)), "h"(blocks)
      : "memory");
}

// One arrival on the barrier at the same offset in the block of rank `rank`
// of this cluster. Release at the default CTA scope, not the cluster's: what
// the arrival announces (this warp's wgmmas have finished reading the stage)
// involves no memory writes to order, and a cluster-scope release costs a
// GPU-wide memory barrier (MEMBAR.ALL.GPU in the SASS) on every k tile.
__device__ __forceinline__ void mbarrier_arrive_in_block(uint64_t* bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(bar)), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

// The cluster barrier in two halves: every thread of every block arrives
// once, then waits until all have arrived. Not cooperative_groups' cluster
// barrier (distill_cluster.cu's): these are not .aligned (the producer
// warp's threads reach them from diverged paths) and say their memory order.
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;" ::: "memory"); }
#endif

// d (64 x 256 s32, this warpgroup's) += A (64 x 32 s8) * W^T (32 x 256 s8).
__device__ __forceinline__ void wgmma_m64n256k32(int32_t (&d)[kAcc], uint64_t a_desc, uint64_t w_desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, 1;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]),
        "+r"(d[111]), "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]),
        "+r"(d[118]), "+r"(d[119]), "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]),
        "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(a_desc), "l"(w_desc));
#endif
}

// Keeps the compiler from moving accesses to the accumulators across the
// asynchronous wgmmas that own them until a wgmma_wait has retired them.
__device__ __forceinline__ void fence_registers(int32_t (&d)[kAcc]) {
#pragma unroll
  for (int i = 0; i < kAcc; ++i) asm volatile("" : "+r"(d[i])::"memory");
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
// Waits until at most `kInFlight` committed batches of this warpgroup's
// wgmmas are still running.
template <int kInFlight>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kInFlight) : "memory");
#endif
}

// Grid: one block per 128 x 256 output tile; clusters of kCluster blocks
// share a 256-column W tile over kCluster adjacent 128-row A tiles, the
// clusters rastered like quant_mma.cuh's blocks. The tensor maps describe A
// (M rows) and W (N rows) as K-byte rows, in boxes of 128 bytes x 128 rows
// (A) and x 256 / kCluster rows (W: each block's share).
template <int kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    int8_wgmma_kernel(const __grid_constant__ CUtensorMap a_map, const __grid_constant__ CUtensorMap w_map,
                      int64_t M, int64_t N, int64_t K, quant::GemmEpilogue epi) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(kCluster == 1 || kCluster == 2, "one block, or a pair sharing the W tile");
  constexpr int kWShareRows = kBN / kCluster, kWShareBytes = kWTileBytes / kCluster;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);  // the same in every block: the offsets below match too
  uint8_t* smem = smem_raw + ((kSwizzleAtomBytes - raw % kSwizzleAtomBytes) % kSwizzleAtomBytes);
  auto a_tile = [&](int s) { return smem + s * kStageBytes; };
  auto w_tile = [&](int s) { return smem + s * kStageBytes + kATileBytes; };
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;

  const uint32_t rank = kCluster == 1 ? 0 : cooperative_groups::this_cluster().block_rank();
  int64_t m0, n0;
  tc::tile_origin<kBM * kCluster, kBN>(blockIdx.x / kCluster, M, N, m0, n0);
  m0 += rank * kBM;  // may pass M in a cluster's last tile: zero-filled A, nothing stored
  const int64_t ktiles = (K + kBK - 1) / kBK;
  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], kConsumerWarps * kCluster);
    }
    fence_barrier_init();
  }
  // The last block-wide barrier (the roles part here); in a cluster it also
  // keeps peers from copying or arriving into barriers not yet initialized.
  if (kCluster == 1) {
    __syncthreads();
  } else {
    cluster_arrive();
    cluster_wait();
  }

  if (warpgroup == 0) {
    if (threadIdx.x == 0) {
      for (int64_t kt = 0; kt < ktiles; ++kt) {
        const int s = static_cast<int>(kt % kStages);
        const int64_t round = kt / kStages;
        // Round r of stage s reuses it after the consumers of every block
        // freed round r - 1: the (r - 1)-th completion of its empty barrier.
        if (round > 0) mbarrier_wait(&empty[s], static_cast<uint32_t>((round - 1) & 1));
        mbarrier_arrive_expect(&full[s], kStageBytes);  // own A, and every block's W share
        const int32_t k0 = static_cast<int32_t>(kt * kBK);
        tma_load_tile(a_tile(s), a_map, k0, static_cast<int32_t>(m0), &full[s]);
        uint8_t* share = w_tile(s) + rank * kWShareBytes;
        const int32_t share_row0 = static_cast<int32_t>(n0 + rank * kWShareRows);
        if (kCluster == 1)
          tma_load_tile(share, w_map, k0, share_row0, &full[s]);
        else
          tma_multicast_tile(share, w_map, k0, share_row0, &full[s], (1u << kCluster) - 1);
      }
    }
    if (kCluster > 1) cluster_arrive();
  } else {
    const int consumer = warpgroup - 1;
    const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
    int32_t d[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) d[i] = 0;

    for (int64_t kt = 0; kt < ktiles; ++kt) {
      const int s = static_cast<int>(kt % kStages);
      mbarrier_wait(&full[s], static_cast<uint32_t>((kt / kStages) & 1));
      const uint32_t a_base = smem_addr(a_tile(s)) + consumer * 64 * kBK;
      const uint32_t w_base = smem_addr(w_tile(s));
      fence_registers(d);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kBK / 32; ++ks)
        wgmma_m64n256k32(d, descriptor(a_base + 32 * ks), descriptor(w_base + 32 * ks));
      wgmma_commit();
      wgmma_wait<1>();  // the previous tile's wgmmas are done: its stage is free
      fence_registers(d);
      if (kt > 0 && lane < kCluster) {  // lane r frees the stage in the block of rank r
        uint64_t* freed = &empty[(kt - 1) % kStages];
        if (kCluster == 1)
          mbarrier_arrive(freed);
        else
          mbarrier_arrive_in_block(freed, static_cast<uint32_t>(lane));
      }
    }
    wgmma_wait<0>();
    fence_registers(d);
    // This warp's arrivals on peer barriers are behind it. Arriving here, not
    // after the stores, keeps the release's memory barrier off the output.
    if (kCluster > 1) cluster_arrive();

    const int g = lane >> 2, t = lane & 3;
    with_epilogue_store(epi, [&](const auto& store) {
#pragma unroll
      for (int i = 0; i < kAcc / 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t m = m0 + consumer * 64 + warp * 16 + g + 8 * (j >> 1);
          const int64_t n = n0 + 8 * i + 2 * t + (j & 1);
          if (m < M && n < N) store(m, n, d[4 * i + j]);
        }
    });
  }
  if (kCluster > 1) cluster_wait();  // a peer's consumers may still arrive on this block's barriers
#else
  __trap();  // never launched: see available()
#endif
}

// True when the int8_wgmma_kernel the runtime loads for the current device
// is the sm_90a build (its sm_80 build only traps).
inline bool available() {
  static Sm90Build build(reinterpret_cast<const void*>(&int8_wgmma_kernel<2>));
  return build.loaded();
}

// Whether the kernel takes these operands: K-contiguous rows (checked by the
// caller: 16-byte aligned base and row stride), K > 0, and sizes whose box
// coordinates (up to a cluster's tile past the last row) fit the copy
// engine's 32-bit coordinates, and strides its 40 bits.
inline bool fits(int64_t lda, int64_t ldw, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kMaxStride = int64_t(1) << 40, kMaxRows = INT32_MAX - 2 * kBN;
  return K > 0 && K <= INT32_MAX - kBK && M <= kMaxRows && N <= kMaxRows && lda >= K && ldw >= K &&
         lda < kMaxStride && ldw < kMaxStride;
}

// The driver's tensor-map encoder, looked up once through the runtime (the
// extension links only the runtime).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A (rows x K) int8 matrix, rows ld bytes apart, as boxes of 128 bytes x
// box_rows with the 128-byte swizzle; reads past the matrix fill zeros.
inline bool encode_rows(CUtensorMap& map, const int8_t* base, int64_t ld, int64_t rows, int64_t K,
                        uint32_t box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (!encode) return false;
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld)};
  cuuint32_t box[2] = {kBK, box_rows};
  cuuint32_t element_strides[2] = {1, 1};
  return encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(base), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Runs the kernel with clusters of `cluster` blocks (1 or 2); null or why
// not. A refusal (tensor maps, the shared-memory opt-in) is an error, not a
// quiet switch to mma.sync: a test that forces this loop must run it.
inline const char* launch(int cluster, const int8_t* a, int64_t lda, const int8_t* w, int64_t ldw, int64_t M,
                          int64_t N, int64_t K, const quant::GemmEpilogue& epi, void* stream) {
  const int64_t blocks = ((M + cluster * kBM - 1) / (cluster * kBM)) * cluster * ((N + kBN - 1) / kBN);
  if (blocks > INT32_MAX) return "flashkd: too many output tiles for the wgmma grid";
  CUtensorMap a_map, w_map;
  if (!encode_rows(a_map, a, lda, M, K, kBM) || !encode_rows(w_map, w, ldw, N, K, kBN / cluster))
    return "flashkd: the driver refused the int8 GEMM's tensor maps (FLASHKD_INT8_MAINLOOP=mma.sync avoids them)";
  auto kernel = cluster == 1 ? int8_wgmma_kernel<1> : int8_wgmma_kernel<2>;
  // Over 48 KiB of dynamic shared memory needs the opt-in (per device, so every time).
  const cudaError_t opted = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (opted != cudaSuccess) {
    cudaGetLastError();  // reported here: must not resurface as a later launch's error
    return cudaGetErrorString(opted);
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.stream = static_cast<cudaStream_t>(stream);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  // The launch's own result: an error some earlier call left pending is not ours to report or clear.
  const cudaError_t launched = cudaLaunchKernelEx(&cfg, kernel, a_map, w_map, M, N, K, epi);
  if (launched == cudaSuccess) return nullptr;
  cudaGetLastError();
  return cudaGetErrorString(launched);
}

}  // namespace wg

}  // namespace flashkd::cuda
