// Tensor-core GEMM mainloop shared by the quantized matmuls:
//   acc[m, n] = sum_k A[m, k] * W[n, k]
// A (M, K) and W (N, K) are both K-contiguous, the "row.col" (TN) operand
// layout of mma.sync. Two kinds of math run on the same pipeline:
//   * Int8Math: int8 x int8 -> exact int32 (m16n8k32 s8), then the
//     dequantizing epilogue (int8_gemm, ternary_gemm);
//   * GroupScaledMath: bf16/fp16 activations x the exact integers q - zero
//     of int4 weights (m16n8k16, float32 accumulation), each 32-deep k stage
//     scaled by its group's scale[n, g] (int4_gemm).
// Tiles are byte tiles: a 64-byte row slice is 64 int8 or 32 bf16/fp16
// values, and the ldmatrix fragments of both MMA shapes are the same bytes
// (an 8 x 16-byte matrix is 8 rows of 16 int8 or of 8 halves). The kernel is
// templated on a tile loader per operand (a policy with fetch/stash), so the
// same pipeline runs on cp.async-copied tiles and on packed weights decoded
// in registers.
//
// Block tile 128 x 128 x 64 bytes, 8 warps as 2 (M) x 4 (N), warp tile
// 64 x 32 = 4 x 4 MMAs of 16 x 8 per 32-byte k step. Three shared-memory
// stages of 2 x 8 KiB = 48 KiB (static, no opt-in needed). Blocks are
// rastered in groups of kGroupM tile rows so that the tiles one wave of
// blocks touches stay in L2.
#pragma once
#include <cstdint>
#include "quant_device.cuh"

namespace flashkd::cuda {

namespace tc {

constexpr int kBM = 128, kBN = 128, kBK = 64;  // kBK in bytes
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

// Four 8x8 b16 matrices (= 8 rows x 16 bytes each); lanes 8i..8i+7 give the
// row addresses of matrix i, and lane l receives word l % 4 of row l / 4 of
// every matrix: bytes 4(l%4)..4(l%4)+3, i.e. four int8 or two 16-bit values,
// which is the A/B fragment layout of both m16n8k32 s8 and m16n8k16 f16/bf16.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a (16x32 s8, row) * b (32x8 s8, col), int32 accumulate (wrapping, no
// saturation, like the CPU's int32 sum).
__device__ __forceinline__ void mma_16x8x32(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// c += a (16x16, row) * b (16x8, col) in bf16 or fp16, float32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                           const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The output tile (m0, n0) of block `id` in a group-major raster of BM x BN
// tiles: kGroupM tile rows (M) at a time, M fastest inside a group, the last
// group possibly shorter. A bijection onto all tiles.
template <int BM, int BN>
__device__ __forceinline__ void tile_origin(int64_t id, int64_t M, int64_t N, int64_t& m0, int64_t& n0) {
  const int64_t m_tiles = (M + BM - 1) / BM, n_tiles = (N + BN - 1) / BN;
  const int64_t per_group = kGroupM * n_tiles;
  const int64_t first_m = id / per_group * kGroupM, local = id % per_group;
  const int64_t group_m = m_tiles - first_m < kGroupM ? m_tiles - first_m : kGroupM;
  m0 = (first_m + local % group_m) * BM;
  n0 = local / group_m * BN;
}

// Where a warp's 64 x 32 output tile sits: inside the block tile (row, col)
// and in the output (m0, n0).
struct WarpTile {
  int row, col, lane;
  int64_t m0, n0;
};

// A fragments of k step ks (32 bytes) for the warp's four 16-row MMA tiles:
// matrices (rows 0-7, bytes 0-15), (rows 8-15, bytes 0-15), (rows 0-7,
// bytes 16-31), (rows 8-15, bytes 16-31) = fragment registers a0..a3.
__device__ __forceinline__ void load_a_fragments(const uint8_t* tile, const WarpTile& w, int ks,
                                                 uint32_t (&af)[4][4]) {
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
    ldmatrix_x4(af[mi], tile + swizzled(w.row + mi * 16 + (w.lane & 15), 2 * ks + (w.lane >> 4)));
}

// B fragments of k step ks for the warp's four 8-column MMA tiles: matrices
// (n 0-7, bytes 0-15), (n 0-7, bytes 16-31), (n 8-15, bytes 0-15),
// (n 8-15, bytes 16-31) = registers b0, b1 of two adjacent n8 tiles.
__device__ __forceinline__ void load_b_fragments(const uint8_t* tile, const WarpTile& w, int ks,
                                                 uint32_t (&bf)[4][2]) {
#pragma unroll
  for (int nj = 0; nj < 2; ++nj) {
    uint32_t r[4];
    ldmatrix_x4(r, tile + swizzled(w.col + nj * 16 + (w.lane & 7) + ((w.lane >> 4) << 3),
                                   2 * ks + ((w.lane >> 3) & 1)));
    bf[2 * nj][0] = r[0];
    bf[2 * nj][1] = r[1];
    bf[2 * nj + 1][0] = r[2];
    bf[2 * nj + 1][1] = r[3];
  }
}

// ---- tile loaders: fetch(tile, row0, kt) starts loading k tile kt of rows
// row0.. into `tile` (or registers), stash(tile) finishes a register-staged
// load after the current stage's MMAs have been issued.

// Row-major (rows, row_bytes) byte tiles copied with cp.async: int8
// activations and weights, or bf16/fp16 activations (2 bytes a value). Needs
// base and ld_bytes 16-byte aligned. Each thread copies two of the 128 x 4
// chunks; rows past `rows` and bytes past row_bytes are zero-filled without
// being read (zero bytes are 0 as int8 and +0.0 as bf16/fp16).
struct RowTileCpAsync {
  const uint8_t* base;
  int64_t ld_bytes, rows, row_bytes;

  __device__ __forceinline__ void fetch(uint8_t* tile, int64_t row0, int64_t kt) {
    static_assert(kBM * kChunksPerRow % kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int it = 0; it < kBM * kChunksPerRow / kThreads; ++it) {
      const int i = threadIdx.x + it * kThreads;
      const int r = i / kChunksPerRow, c = i % kChunksPerRow;
      const int64_t row = row0 + r, k = kt * kBK + 16 * c;
      const int64_t left = row_bytes - k;
      const int bytes = row < rows && left > 0 ? (left < 16 ? static_cast<int>(left) : 16) : 0;
      cp_async_16(tile + swizzled(r, c), bytes ? base + row * ld_bytes + k : base, bytes);
    }
  }
  __device__ __forceinline__ void stash(uint8_t*) {}
};

// Packed ternary (rows, ceil(K/4)) weights decoded to int8: `fetch` reads the
// 16 packed bytes of a 64-deep row slice into registers (thread t: row t / 2,
// bytes 8 (t % 2) .. + 8), `stash` decodes them and stores the int8 weights
// to the (swizzled) tile, so the global-load latency hides behind the math.
// Rows past `rows` and bytes past the row decode to zeros; k past K meets
// zero-filled activations anyway.
struct TernaryTileDecode {
  const uint8_t* base;
  int64_t ld_bytes, rows, row_bytes;
  bool word_ok;  // base and ld_bytes 4-aligned
  uint32_t packed[2];

  __device__ __forceinline__ void fetch(uint8_t*, int64_t row0, int64_t kt) {
    static_assert(kThreads == 2 * kBN && kBK == 64, "two threads per 16-byte packed row slice");
    const int64_t row = row0 + (threadIdx.x >> 1);
    const int64_t off = kt * (kBK / quant::kTernaryPerByte) + 8 * (threadIdx.x & 1);
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

// Packed int4 (rows, ceil(K/2)) weights decoded to the exact integers
// q - zero in T (bf16 or fp16). A k tile is 32 values: thread t fetches the 8
// packed bytes of row t / 2, values 16 (t % 2) .. + 16, and that row's zero
// for the tile's group (group_size % 32 == 0, or one group, so one zero
// serves the tile). Rows past `rows` decode to zeros; values past K meet
// zero-filled activations.
template <typename T>
struct Int4TileDecode {
  static constexpr int kValues = kBK / static_cast<int>(sizeof(T));  // k values per tile
  const uint8_t* base;
  int64_t ld_bytes, rows, row_bytes;
  bool word_ok;  // base and ld_bytes 4-aligned
  const float* zero;  // (rows, groups)
  int64_t groups, group_size;
  uint32_t packed[2];
  uint32_t zero_pair;  // (magic + zero) in both halves, see decode_int4x8

  __device__ __forceinline__ void fetch(uint8_t*, int64_t row0, int64_t kt) {
    static_assert(kThreads == 2 * kBN && kValues == 32, "two threads per 16-value packed row slice");
    const int64_t row = row0 + (threadIdx.x >> 1);
    const int64_t k0 = kt * kValues;
    const int64_t off = k0 / quant::kInt4PerByte + 8 * (threadIdx.x & 1);
    float z = 0.f;
#pragma unroll
    for (int j = 0; j < 2; ++j) packed[j] = 0;
    if (row < rows) {
#pragma unroll
      for (int j = 0; j < 2; ++j) packed[j] = load_word_guarded(base + row * ld_bytes, off + 4 * j, row_bytes, word_ok, 0);
      z = __ldg(zero + row * groups + k0 / group_size);
    }
    zero_pair = int4_magic_pair<T>(z);
  }
  __device__ __forceinline__ void stash(uint8_t* tile) {
    const int r = threadIdx.x >> 1;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      *reinterpret_cast<uint4*>(tile + swizzled(r, 2 * (threadIdx.x & 1) + j)) =
          decode_int4x8<T>(packed[j], zero_pair);
  }
};

// ---- math policies: stage() runs one k tile's MMAs into the accumulators,
// with_store(f) calls f(store), store(m, n, acc) writing one output value.

// Exact int32 accumulators and the dequantizing epilogue.
struct Int8Math {
  using Acc = int32_t;
  static constexpr int kMinBlocks = 2;
  quant::GemmEpilogue epi;

  __device__ __forceinline__ void stage(const uint8_t* a_tile, const uint8_t* w_tile, const WarpTile& w,
                                        int64_t, Acc (&acc)[4][4][4]) const {
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t af[4][4], bf[4][2];
      load_a_fragments(a_tile, w, ks, af);
      load_b_fragments(w_tile, w, ks, bf);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16x8x32(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  template <class F>
  __device__ __forceinline__ void with_store(const F& f) const {
    with_epilogue_store(epi, f);
  }
};

// T (bf16/fp16) activations x the integer weights q - zero: each k tile's
// float32 partial products (exact, then summed over 32 values by the tensor
// core) are scaled by scale[n, g] of the tile's group and added to the
// accumulators, so no weight is ever rounded to T. out = acc + bias, in T.
template <typename T>
struct GroupScaledMath {
  using Acc = float;
  // The per-tile partial sums beside the accumulators need more than the 128
  // registers two blocks per SM allow (ptxas spills); one block of 8 warps
  // per SM is how CUTLASS runs its 64 x 64 warp tiles too.
  static constexpr int kMinBlocks = 1;
  const float* scale;  // (N, groups)
  int64_t groups, group_size, N;
  const T* bias;  // (N) or nullptr
  T* out;
  int64_t ldo;

  __device__ __forceinline__ void stage(const uint8_t* a_tile, const uint8_t* w_tile, const WarpTile& w,
                                        int64_t kt, Acc (&acc)[4][4][4]) const {
    const int64_t g = kt * Int4TileDecode<T>::kValues / group_size;
    // This lane's columns: n0 + 8 ni + 2 (lane % 4) + {0, 1}.
    float s[4][2];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t n = w.n0 + ni * 8 + 2 * (w.lane & 3) + c;
        s[ni][c] = n < N ? __ldg(scale + n * groups + g) : 0.f;
      }
    uint32_t af[2][4][4], bf[2][4][2];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      load_a_fragments(a_tile, w, ks, af[ks]);
      load_b_fragments(w_tile, w, ks, bf[ks]);
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        mma_16x8x16<T>(d, af[0][mi], bf[0][ni]);
        mma_16x8x16<T>(d, af[1][mi], bf[1][ni]);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[mi][ni][j] = fmaf(d[j], s[ni][j & 1], acc[mi][ni][j]);
      }
  }
  template <class F>
  __device__ __forceinline__ void with_store(const F& f) const {
    f([this](int64_t m, int64_t n, float v) { out[m * ldo + n] = add_bias_and_round(v, bias, n); });
  }
};

// Grid: one block per output tile (1-D). Pipeline, one barrier per k tile:
// wait for tile kt, barrier (which also proves every warp finished computing
// tile kt - 1), refill the stage tile kt - 1 used with tile kt + kStages - 1,
// compute tile kt. A register-staged loader writes that freed stage after the
// compute; the barrier of the iteration that consumes it orders the write
// before the reads.
template <class ALoader, class WLoader, class Math>
__global__ void __launch_bounds__(kThreads, Math::kMinBlocks)
    tc_gemm_kernel(const ALoader a_param, const WLoader w_param, const Math math, int64_t M, int64_t N,
                   int64_t ktiles) {
  __shared__ __align__(128) uint8_t smem[kStages][2][kTileBytes];
  ALoader a_ld = a_param;  // loaders may stage data in their registers
  WLoader w_ld = w_param;

  int64_t m0, n0;
  tile_origin<kBM, kBN>(blockIdx.x, M, N, m0, n0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = (warp >> 2) * 64, col = (warp & 3) * 32;
  const WarpTile wt{row, col, lane, m0 + row, n0 + col};

  typename Math::Acc acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) {
      a_ld.fetch(smem[s][0], m0, s);
      w_ld.fetch(smem[s][1], n0, s);
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
      a_ld.fetch(a_next, m0, next);
      w_ld.fetch(w_next, n0, next);
    }
    cp_async_commit();
    const int cur = static_cast<int>(kt % kStages);
    math.stage(smem[cur][0], smem[cur][1], wt, kt, acc);
    if (refill) {
      a_ld.stash(a_next);
      w_ld.stash(w_next);
    }
  }
  cp_async_wait<0>();  // nothing may stay in flight into shared memory at exit

  // C fragment (both MMA shapes): registers 0,1 = (row g, cols 2t, 2t+1),
  // 2,3 = (row g+8, same cols), g = lane / 4, t = lane % 4.
  const int g = lane >> 2, t = lane & 3;
  math.with_store([&](const auto& store) {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t m = wt.m0 + mi * 16 + g + 8 * (j >> 1);
          const int64_t n = wt.n0 + ni * 8 + 2 * t + (j & 1);
          if (m < M && n < N) store(m, n, acc[mi][ni][j]);
        }
  });
}

// K is the activations' row length: a_ld.row_bytes bytes in k tiles of kBK.
template <class ALoader, class WLoader, class Math>
const char* launch(const ALoader& a_ld, const WLoader& w_ld, const Math& math, int64_t M, int64_t N,
                   void* stream) {
  const int64_t tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  if (tiles > INT32_MAX) return "flashkd: too many output tiles for the tensor-core grid";
  const int64_t ktiles = (a_ld.row_bytes + kBK - 1) / kBK;
  tc_gemm_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a_ld, w_ld, math, M, N, ktiles);
  return last_error();
}

}  // namespace tc

}  // namespace flashkd::cuda
