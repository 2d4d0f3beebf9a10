// ToMe matching plan on the GPU in three launches: inverse L2 norms of every
// token; a tiled A x B similarity whose (16 x 16) tiles are reduced straight
// into each A row's best partner (the score matrix is never stored); one block
// per batch that ranks the edges (stable: equal scores keep the smaller A row
// first; the class token last) and writes unm / src / dst.
#include <type_traits>
#include "tome_common.cuh"
#include "tome_kernels.h"

namespace flashkd::cuda {
namespace {

constexpr int kTile = 16;   // A rows and B rows per similarity block
constexpr int kChunk = 32;  // channels staged in shared memory per step

struct Scratch {
  float* inv_norm;   // (batch, tokens)
  float* node_max;   // (batch, n_a)
  int64_t* node_idx; // (batch, n_a)
  int64_t* rank;     // (batch, n_a)
};

Scratch carve(const PlanParams& p, void* base) {
  const int64_t n_a = (p.tokens + 1) / 2;
  char* c = static_cast<char*>(base);
  Scratch s;
  s.node_idx = reinterpret_cast<int64_t*>(c);
  s.rank = s.node_idx + p.batch * n_a;
  s.inv_norm = reinterpret_cast<float*>(s.rank + p.batch * n_a);
  s.node_max = s.inv_norm + p.batch * p.tokens;
  return s;
}

template <typename T>
__global__ void inv_norm_kernel(const T* metric, int64_t rows, int64_t cols, float* inv_norm) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < rows; row += warps) {
    const T* x = metric + row * cols;
    float ss = 0.f;
    for (int64_t c = lane; c < cols; c += 32) {
      const float v = to_float(x[c]);
      ss += v * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) inv_norm[row] = 1.f / sqrtf(ss);  // a zero row gives NaN scores, never chosen
  }
}

// Block (tx, ty) = (B row in tile, A row in tile); one block per (batch, A tile).
template <typename T>
__global__ void best_partner_kernel(PlanParams p, Scratch s) {
  __shared__ float sa[kTile][kChunk + 1], sb[kTile][kChunk + 1], score[kTile][kTile + 1];
  __shared__ float best[kTile];
  __shared__ int64_t best_j[kTile];
  const int64_t n_a = (p.tokens + 1) / 2, n_b = p.tokens / 2, cols = p.cols;
  const int64_t a_tiles = (n_a + kTile - 1) / kTile;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTile + tx;
  const T* metric = static_cast<const T*>(p.metric);
  for (int64_t unit = blockIdx.x; unit < p.batch * a_tiles; unit += gridDim.x) {
    const int64_t b = unit / a_tiles, i0 = (unit % a_tiles) * kTile;
    const T* batch = metric + b * p.tokens * cols;
    const float* inv = s.inv_norm + b * p.tokens;
    if (tid < kTile) {  // a row without a finite score keeps the first B row that may receive a merge
      best[tid] = kNegInf;
      best_j[tid] = p.distill_token ? 1 : 0;
    }
    for (int64_t j0 = 0; j0 < n_b; j0 += kTile) {
      __syncthreads();  // score[] of the previous tile has been read
      float acc = 0.f;
      for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
        __syncthreads();
        for (int e = tid; e < kTile * kChunk; e += kTile * kTile) {
          const int row = e / kChunk, col = e % kChunk;
          const int64_t c = c0 + col, i = i0 + row, j = j0 + row;
          sa[row][col] = (i < n_a && c < cols) ? to_float(batch[(2 * i) * cols + c]) : 0.f;
          sb[row][col] = (j < n_b && c < cols) ? to_float(batch[(2 * j + 1) * cols + c]) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < kChunk; ++k) acc += sa[ty][k] * sb[tx][k];
      }
      const int64_t i = i0 + ty, j = j0 + tx;
      const bool valid = i < n_a && j < n_b && !(p.distill_token && j == 0);
      score[ty][tx] = valid ? acc * inv[2 * i] * inv[2 * j + 1] : kNegInf;
      __syncthreads();
      if (tx == 0)  // in j order with a strict >: the smallest j wins ties
        for (int n = 0; n < kTile; ++n)
          if (score[ty][n] > best[ty]) {
            best[ty] = score[ty][n];
            best_j[ty] = j0 + n;
          }
    }
    __syncthreads();
    if (tid < kTile && i0 + tid < n_a) {
      const int64_t i = i0 + tid;
      s.node_max[b * n_a + i] = best[tid];
      s.node_idx[b * n_a + i] = best_j[tid];
    }
    __syncthreads();
  }
}

__global__ void edge_kernel(PlanParams p, Scratch s) {
  const int64_t n_a = (p.tokens + 1) / 2, r = p.r, n_unm = n_a - r;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const float* key = s.node_max + b * n_a;
    int64_t* rank = s.rank + b * n_a;
    // Rank in the stable descending order of the scores; the class token (A
    // row 0) ranks last, so it is never merged, not even after -inf rows.
    const int64_t first = p.class_token ? 1 : 0;
    for (int64_t i = threadIdx.x; i < n_a; i += blockDim.x) {
      const float ki = key[i];
      int64_t n = 0;
      for (int64_t k = first; k < n_a; ++k) n += (key[k] > ki || (key[k] == ki && k < i)) ? 1 : 0;
      rank[i] = (first && i == 0) ? n_a - 1 : n;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n_a; i += blockDim.x) {
      const int64_t ri = rank[i];
      if (ri < r) {
        p.src[b * r + ri] = i;
        p.dst[b * r + ri] = s.node_idx[b * n_a + i];
      } else if (p.class_token) {  // kept rows back in position order
        int64_t pos = 0;
        for (int64_t k = 0; k < i; ++k) pos += rank[k] >= r ? 1 : 0;
        p.unm[b * n_unm + pos] = i;
      } else {
        p.unm[b * n_unm + ri - r] = i;
      }
    }
    __syncthreads();
  }
}

}  // namespace

size_t tome_plan_scratch_bytes(const PlanParams& p) {
  const int64_t n_a = (p.tokens + 1) / 2;
  return static_cast<size_t>(p.batch) * (2 * n_a * sizeof(int64_t) + (p.tokens + n_a) * sizeof(float));
}

const char* tome_plan(const PlanParams& p, void* scratch, void* stream) {
  if (p.batch == 0 || p.tokens == 0) return nullptr;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Scratch s = carve(p, scratch);
  const int64_t n_a = (p.tokens + 1) / 2;
  const int64_t tiles = p.batch * ((n_a + kTile - 1) / kTile);
  return launch_for_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* metric = static_cast<const T*>(p.metric);
    inv_norm_kernel<T><<<grid_for((p.batch * p.tokens + 7) / 8), 256, 0, st>>>(metric, p.batch * p.tokens, p.cols,
                                                                               s.inv_norm);
    best_partner_kernel<T><<<grid_for(tiles), dim3(kTile, kTile), 0, st>>>(p, s);
    edge_kernel<<<grid_for(p.batch), 256, 0, st>>>(p, s);
  });
}

}  // namespace flashkd::cuda
