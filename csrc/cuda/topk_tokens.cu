// Top-k token pruning on the GPU, one block per batch. Each token's rank is
// counted directly (O(T^2) comparisons, cheap for ViT token counts; the order
// is descending score, NaN first, ties by position), ranks live in dynamic
// shared memory, and the kept rows, the fused remainder and the backward are
// written from them.
#include <type_traits>
#include "tome_common.cuh"
#include "tome_kernels.h"

namespace flashkd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxTokens = 12000;  // ranks (4 bytes each) within 48 KiB of shared memory

template <typename S>
__device__ __forceinline__ bool ranks_above(const S* s, int64_t a, int64_t b) {
  const float sa = to_float(s[a]), sb = to_float(s[b]);
  const bool na = sa != sa, nb = sb != sb;
  if (na != nb) return na;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

template <typename S>
__device__ float dropped_total(const TopkParams& p, const S* s, const int* pos, float* scratch) {
  float v[1] = {0.f};
  for (int64_t t = threadIdx.x; t < p.tokens; t += blockDim.x)
    if (pos[t] < 0) v[0] += to_float(s[t]);
  block_allreduce<1>(v, scratch, SumOp());
  return v[0];
}

template <typename T, typename S>
__global__ void topk_kernel(TopkParams p) {
  extern __shared__ int pos[];  // output position of each token, or -1
  __shared__ float scratch[32];
  const int64_t n_out = p.keep + (p.fuse_remainder ? 1 : 0), cols = p.cols;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const S* s = static_cast<const S*>(p.scores) + b * p.tokens;
    const T* x = static_cast<const T*>(p.x) + b * p.tokens * cols;
    T* out = static_cast<T*>(p.out) + b * n_out * cols;
    const int64_t first = p.protect_first ? 1 : 0;
    for (int64_t t = threadIdx.x; t < p.tokens; t += blockDim.x) {
      int64_t rank = 0;
      if (t >= first) {
        rank = first;
        for (int64_t u = first; u < p.tokens; ++u) rank += ranks_above(s, u, t) ? 1 : 0;
      }
      pos[t] = rank < p.keep ? static_cast<int>(rank) : -1;
      if (rank < p.keep) p.index[b * p.keep + rank] = t;
    }
    __syncthreads();
    for (int64_t t = 0; t < p.tokens; ++t) {
      if (pos[t] < 0) continue;
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[pos[t] * cols + c] = x[t * cols + c];
    }
    if (p.fuse_remainder) {
      const float total = dropped_total(p, s, pos, scratch);
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = 0.f;
        for (int64_t t = 0; t < p.tokens; ++t)
          if (pos[t] < 0) acc += (to_float(s[t]) / total) * to_float(x[t * cols + c]);
        out[p.keep * cols + c] = from_float<T>(acc);
      }
    }
    __syncthreads();
  }
}

template <typename T, typename S>
__global__ void topk_backward_kernel(TopkParams p) {
  extern __shared__ int pos[];
  __shared__ float scratch[32];
  const int64_t n_out = p.keep + (p.fuse_remainder ? 1 : 0), cols = p.cols;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const S* s = static_cast<const S*>(p.scores) + b * p.tokens;
    const T* x = static_cast<const T*>(p.x) + b * p.tokens * cols;
    const T* g = static_cast<const T*>(p.grad_out) + b * n_out * cols;
    const T* extra = static_cast<const T*>(p.out) + (b * n_out + p.keep) * cols;
    T* gx = static_cast<T*>(p.grad_x) + b * p.tokens * cols;
    S* gs = p.grad_scores ? static_cast<S*>(p.grad_scores) + b * p.tokens : nullptr;
    for (int64_t t = threadIdx.x; t < p.tokens; t += blockDim.x) pos[t] = -1;
    __syncthreads();
    for (int64_t k = threadIdx.x; k < p.keep; k += blockDim.x) pos[p.index[b * p.keep + k]] = static_cast<int>(k);
    __syncthreads();
    float total = 0.f, ge[1] = {0.f};
    if (p.fuse_remainder) {
      total = dropped_total(p, s, pos, scratch);
      if (gs) {
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
          ge[0] += to_float(g[p.keep * cols + c]) * to_float(extra[c]);
        block_allreduce<1>(ge, scratch, SumOp());
      }
    }
    for (int64_t t = 0; t < p.tokens; ++t) {
      const int k = pos[t];
      if (k >= 0 || !p.fuse_remainder) {
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
          gx[t * cols + c] = k >= 0 ? g[k * cols + c] : from_float<T>(0.f);
        if (gs && threadIdx.x == 0) gs[t] = from_float<S>(0.f);
        continue;
      }
      // remainder = sum_i (s_i / S) x_i: d/dx_t = s_t / S, d/ds_t = (x_t - remainder) / S
      const float w = to_float(s[t]) / total;
      float gxd[1] = {0.f};
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        const float ge_c = to_float(g[p.keep * cols + c]);
        if (gs) gxd[0] += ge_c * to_float(x[t * cols + c]);
        gx[t * cols + c] = from_float<T>(w * ge_c);
      }
      if (gs) {
        block_allreduce<1>(gxd, scratch, SumOp());
        if (threadIdx.x == 0) gs[t] = from_float<S>((gxd[0] - ge[0]) / total);
      }
    }
    __syncthreads();
  }
}

// Runs launch(x_tag, scores_tag) for x's and the scores' dtypes, with the
// ranks' dynamic shared memory; returns the first launch error.
template <typename Launch>
const char* launch_topk(const TopkParams& p, const char* name, Launch launch) {
  if (p.tokens > kMaxTokens) return name;  // the caller's message names the kernel and the limit
  const char* err = nullptr;  // the inner launch's error (it clears the CUDA error state)
  const char* outer = launch_for_dtype(p.dtype, [&](auto* xtag) {
    err = launch_for_dtype(p.scores_dtype, [&](auto* stag) { launch(xtag, stag); });
  });
  return err ? err : outer;
}

size_t rank_bytes(const TopkParams& p) { return static_cast<size_t>(p.tokens) * sizeof(int); }

}  // namespace

const char* topk_tokens(const TopkParams& p, void* stream) {
  return launch_topk(p, "topk_tokens CUDA kernel: more than 12000 tokens", [&](auto* xtag, auto* stag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using S = std::remove_pointer_t<decltype(stag)>;
    topk_kernel<T, S><<<grid_for(p.batch), kThreads, rank_bytes(p), static_cast<cudaStream_t>(stream)>>>(p);
  });
}

const char* topk_tokens_backward(const TopkParams& p, void* stream) {
  return launch_topk(p, "topk_tokens_backward CUDA kernel: more than 12000 tokens", [&](auto* xtag, auto* stag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using S = std::remove_pointer_t<decltype(stag)>;
    topk_backward_kernel<T, S><<<grid_for(p.batch), kThreads, rank_bytes(p), static_cast<cudaStream_t>(stream)>>>(p);
  });
}

}  // namespace flashkd::cuda
