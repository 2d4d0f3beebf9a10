// int4_gemm (w4a16): float activations (fp32/bf16/fp16) x packed int4
// weights with per-group scale and zero, float32 accumulation, out and bias in
// x's dtype (flashkd/quant_params.h).
//
// M <= 16, float32 activations, or shapes the tensor cores cannot take: a
// GEMV-shaped SIMT kernel. Each warp owns kRowsPerWarp weight rows and
// streams their packed bytes once per M tile of up to 16 rows, whose
// activations are staged in shared memory as float one K chunk at a time.
// Lane l handles the 8-deep K pieces 32 s + l of a chunk (one packed 32-bit
// word per row), dequantizes them on the fly as (q - zero) * scale and
// accumulates with FMAs; partial sums are reduced across the warp at the end.
//
// M > 16 with bf16/fp16 activations: the tensor-core mainloop
// (quant_mma.cuh) on the exact integers q - zero, each 32-deep k tile scaled
// by its group's scale. It needs 16-byte aligned activation rows (cp.async)
// and one group per k tile (group_size % 32 == 0, or a single group).
#include "quant_device.cuh"
#include "quant_kernels.h"
#include "quant_mma.cuh"

namespace flashkd::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kSteps = 2;
constexpr int kPiece = 8;  // K values per packed 32-bit word
constexpr int kPieces = kSteps * 32;
constexpr int kChunk = kPieces * kPiece;  // K values staged per pass
constexpr int kMaxRows = 16;

struct Int4Rows {
  const uint8_t* w;
  int64_t ldw_bytes, row_bytes;
  const float* scale;
  const float* zero;
  int64_t groups;
  uint32_t group_size, K;
  bool word_ok;  // w and ldw_bytes 4-byte aligned

  // Weights k0..k0+7 of row n (k0 < K, a multiple of 8), zero past K.
  __device__ __forceinline__ void dequantize(int64_t n, uint32_t k0, uint32_t packed, float (&w8)[kPiece]) const {
    const float* srow = scale + n * groups;
    const float* zrow = zero + n * groups;
    const uint32_t valid = K - k0 < kPiece ? K - k0 : kPiece;
    const uint32_t g0 = k0 / group_size;
    if ((k0 + valid - 1) / group_size == g0) {  // one group covers the piece
      const float s = srow[g0], z = zrow[g0];
#pragma unroll
      for (int j = 0; j < kPiece; ++j)
        w8[j] = j < valid ? __fmul_rn(float((packed >> (4 * j)) & 15u) - z, s) : 0.f;
    } else {
#pragma unroll
      for (int j = 0; j < kPiece; ++j) {
        w8[j] = 0.f;
        if (j < valid) {  // past K the group index may be past the scale row
          const uint32_t g = (k0 + j) / group_size;
          w8[j] = __fmul_rn(float((packed >> (4 * j)) & 15u) - zrow[g], srow[g]);
        }
      }
    }
  }
};

// Grid: x over blocks of kRowsPerBlock weight rows, y over M tiles
// (grid-stride, so any M fits in gridDim.y).
template <int MT, typename T>
__global__ void __launch_bounds__(kThreads)
    int4_gemv_kernel(const T* x, int64_t ldx, Int4Rows rows, int64_t M, int64_t N, const T* bias, T* out,
                     int64_t ldo) {
  __shared__ float4 act[MT][2 * kPieces];  // a piece's 8 floats are two float4
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = (int64_t(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  const uint32_t K = rows.K;

  for (int64_t m0 = int64_t(blockIdx.y) * MT; m0 < M; m0 += int64_t(gridDim.y) * MT) {
    float acc[MT][kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[i][r] = 0.f;

    for (uint32_t kc = 0; kc < K; kc += kChunk) {
      // The chunk's packed weights are loaded first (they need no shared
      // memory), so the loads are in flight together and overlap the staging.
      uint32_t packed[kSteps][kRowsPerWarp];
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const uint32_t k0 = kc + kPiece * (32 * s + lane);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int64_t n = n0 + r;
          packed[s][r] = k0 < K && n < N ? load_word_guarded(rows.w + n * rows.ldw_bytes, k0 / quant::kInt4PerByte,
                                                             rows.row_bytes, rows.word_ok, 0)
                                         : 0u;
        }
      }
      __syncthreads();  // every warp is done reading the previous chunk
      for (int i = threadIdx.x; i < MT * kPieces; i += kThreads) {
        const int mr = i / kPieces, piece = i % kPieces;
        const int64_t m = m0 + mr;
        const int64_t k = int64_t(kc) + kPiece * piece;
        float v[kVec];
        static_assert(kVec == kPiece, "load8 fills one piece");
        if (m < M) {
          const T* xr = x + m * ldx;
          load8(xr, k, 1, K, vec_ok(xr, 1), v);  // -inf past K, zeroed below
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          if (m >= M || k + j >= K) v[j] = 0.f;
        act[mr][2 * piece] = make_float4(v[0], v[1], v[2], v[3]);
        act[mr][2 * piece + 1] = make_float4(v[4], v[5], v[6], v[7]);
      }
      __syncthreads();

#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const int piece = 32 * s + lane;
        const uint32_t k0 = kc + kPiece * piece;
        if (k0 >= K) continue;
        float w[kRowsPerWarp][kPiece];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (n0 + r < N) {
            rows.dequantize(n0 + r, k0, packed[s][r], w[r]);
          } else {
#pragma unroll
            for (int j = 0; j < kPiece; ++j) w[r][j] = 0.f;
          }
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const float4 lo = act[i][2 * piece], hi = act[i][2 * piece + 1];
          const float xv[kPiece] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int j = 0; j < kPiece; ++j) acc[i][r] = fmaf(xv[j], w[r][j], acc[i][r]);
        }
      }
    }

    warp_sum_and_store(acc, lane, [&](int i, int r, float v) {
      const int64_t m = m0 + i, n = n0 + r;
      if (m < M && n < N) out[m * ldo + n] = add_bias_and_round(v, bias, n);
    });
  }
}

template <int MT, typename T>
void launch_tile(const quant::Int4GemmArgs& p, const Int4Rows& rows, cudaStream_t stream) {
  const int64_t m_tiles = (p.M + MT - 1) / MT;
  const dim3 grid(static_cast<unsigned>((p.N + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(m_tiles < 65535 ? m_tiles : 65535));
  int4_gemv_kernel<MT, T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(p.x), p.ldx, rows, p.M, p.N,
                                                         static_cast<const T*>(p.bias), static_cast<T*>(p.out),
                                                         p.ldo);
}

template <typename T>
const char* launch_simt(const quant::Int4GemmArgs& p, const Int4Rows& rows, cudaStream_t stream) {
  if (p.M <= 1) launch_tile<1, T>(p, rows, stream);
  else if (p.M <= 4) launch_tile<4, T>(p, rows, stream);
  else launch_tile<kMaxRows, T>(p, rows, stream);
  return last_error();
}

template <typename T>
const char* launch(const quant::Int4GemmArgs& p, const Int4Rows& rows, cudaStream_t stream) {
  constexpr int kTileValues = tc::Int4TileDecode<T>::kValues;
  const bool tensor_cores = p.M > kMaxRows && aligned_to(p.x, p.ldx * int64_t(sizeof(T)), 16) &&
                            (p.groups == 1 || p.group_size % kTileValues == 0);
  if (!tensor_cores) return launch_simt<T>(p, rows, stream);
  const tc::RowTileCpAsync a_ld{static_cast<const uint8_t*>(p.x), p.ldx * int64_t(sizeof(T)), p.M,
                                p.K * int64_t(sizeof(T))};
  const tc::Int4TileDecode<T> w_ld{p.w, p.ldw_bytes, p.N, rows.row_bytes, rows.word_ok,
                                   p.zero, p.groups, p.group_size, {0, 0}, 0};
  const tc::GroupScaledMath<T> math{p.scale, p.groups, p.group_size, p.N,
                                    static_cast<const T*>(p.bias), static_cast<T*>(p.out), p.ldo};
  return tc::launch(a_ld, w_ld, math, p.M, p.N, stream);
}

template <>
const char* launch<float>(const quant::Int4GemmArgs& p, const Int4Rows& rows, cudaStream_t stream) {
  return launch_simt<float>(p, rows, stream);  // the tensor cores would round x to a 16-bit type
}

}  // namespace

const char* int4_gemm(const quant::Int4GemmArgs& p, void* stream) {
  if (p.M == 0 || p.N == 0) return nullptr;
  // 32-bit K and group arithmetic in the kernel (a row of 2^31 values would be 1 GiB packed).
  if (p.K > INT32_MAX || p.group_size > INT32_MAX || p.group_size < 1)
    return "flashkd: int4_gemm needs 1 <= group_size and K < 2^31";
  const Int4Rows rows{p.w,
                      p.ldw_bytes,
                      (p.K + quant::kInt4PerByte - 1) / quant::kInt4PerByte,
                      p.scale,
                      p.zero,
                      p.groups,
                      static_cast<uint32_t>(p.group_size),
                      static_cast<uint32_t>(p.K),
                      aligned_to(p.w, p.ldw_bytes, 4)};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.x_dtype) {
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, rows, s);
    case DType::kFloat16: return launch<__half>(p, rows, s);
    default: return launch<float>(p, rows, s);
  }
}

}  // namespace flashkd::cuda
