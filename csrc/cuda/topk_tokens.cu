// Top-k token pruning on the GPU. The order is descending score, NaN first,
// ties by position (the CPU's and the oracle's). Forward: every token counts
// the tokens ranked above it (O(T^2) comparisons spread over the whole grid,
// the batch's scores streamed through shared memory), which gives its output
// slot; kept rows are gathered one block per row; the fused remainder is
// summed per column tile. Backward: the slots are rebuilt from the index, then
// one block per input row writes its gradient. The slots live in device
// scratch, so the token count has no shared-memory limit.
#include <type_traits>
#include "tome_common.cuh"
#include "tome_kernels.h"

namespace flashkd::cuda {
namespace {

constexpr int kThreads = 256;

struct Scratch {
  int* slot;     // (batch, tokens): output row of each token, or -1 when dropped
  float* stats;  // (batch, 2): dropped tokens' score sum; grad_out[keep] . out[keep]
};

Scratch carve(const TopkParams& p, void* base) {
  Scratch s;
  s.slot = static_cast<int*>(base);
  s.stats = reinterpret_cast<float*>(s.slot + p.batch * p.tokens);
  return s;
}

// Whether token u (score su) is ordered before token t (score st).
__device__ __forceinline__ bool ranks_above(float su, int64_t u, float st, int64_t t) {
  const bool nu = su != su, nt = st != st;
  if (nu != nt) return nu;
  if (!nu && su != st) return su > st;
  return u < t;
}

// One thread per token. With protect_first token 0 is ranked first and left
// out of everyone else's count.
template <typename S>
__global__ void rank_kernel(TopkParams p, Scratch s) {
  __shared__ float tile[kThreads];
  const int64_t tiles = (p.tokens + kThreads - 1) / kThreads, first = p.protect_first ? 1 : 0;
  for (int64_t unit = blockIdx.x; unit < p.batch * tiles; unit += gridDim.x) {
    const int64_t b = unit / tiles, t = (unit % tiles) * kThreads + threadIdx.x;
    const S* scores = static_cast<const S*>(p.scores) + b * p.tokens;
    const bool live = t < p.tokens;
    const float st = live ? to_float(scores[t]) : 0.f;
    int64_t above = 0;
    for (int64_t u0 = 0; u0 < p.tokens; u0 += kThreads) {
      __syncthreads();  // the previous tile has been read
      if (u0 + threadIdx.x < p.tokens) tile[threadIdx.x] = to_float(scores[u0 + threadIdx.x]);
      __syncthreads();
      const int n = p.tokens - u0 < kThreads ? static_cast<int>(p.tokens - u0) : kThreads;
      for (int j = 0; j < n; ++j) above += (u0 + j >= first && ranks_above(tile[j], u0 + j, st, t)) ? 1 : 0;
    }
    if (!live) continue;
    const int64_t rank = t < first ? 0 : first + above;
    s.slot[b * p.tokens + t] = rank < p.keep ? static_cast<int>(rank) : -1;
    if (rank < p.keep) p.index[b * p.keep + rank] = t;
  }
}

template <typename T>
__global__ void gather_kernel(TopkParams p) {
  const int64_t n_out = p.keep + (p.fuse_remainder ? 1 : 0);
  for (int64_t unit = blockIdx.x; unit < p.batch * p.keep; unit += gridDim.x) {
    const int64_t b = unit / p.keep, k = unit % p.keep;
    copy_row(static_cast<T*>(p.out) + (b * n_out + k) * p.cols,
             static_cast<const T*>(p.x) + (b * p.tokens + p.index[unit]) * p.cols, p.cols);
  }
}

// One block per batch: the dropped tokens' score sum and, for the scores'
// gradient, grad_out[keep] . out[keep].
template <typename T, typename S>
__global__ void stats_kernel(TopkParams p, Scratch s) {
  __shared__ float scratch[64];
  const int64_t n_out = p.keep + 1;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const S* scores = static_cast<const S*>(p.scores) + b * p.tokens;
    const int* slot = s.slot + b * p.tokens;
    float v[2] = {0.f, 0.f};
    for (int64_t t = threadIdx.x; t < p.tokens; t += blockDim.x)
      if (slot[t] < 0) v[0] += to_float(scores[t]);
    if (p.grad_scores) {
      const T* g = static_cast<const T*>(p.grad_out) + (b * n_out + p.keep) * p.cols;
      const T* extra = static_cast<const T*>(p.out) + (b * n_out + p.keep) * p.cols;
      for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) v[1] += to_float(g[c]) * to_float(extra[c]);
    }
    block_allreduce<2>(v, scratch, SumOp());
    if (threadIdx.x == 0) {
      s.stats[2 * b] = v[0];
      s.stats[2 * b + 1] = v[1];
    }
  }
}

// out[keep] = sum over dropped t of (s_t / S) x_t, one thread per column.
template <typename T, typename S>
__global__ void remainder_kernel(TopkParams p, Scratch s) {
  const int64_t n_out = p.keep + 1, col_tiles = (p.cols + kThreads - 1) / kThreads;
  for (int64_t unit = blockIdx.x; unit < p.batch * col_tiles; unit += gridDim.x) {
    const int64_t b = unit / col_tiles, c = (unit % col_tiles) * kThreads + threadIdx.x;
    if (c >= p.cols) continue;
    const S* scores = static_cast<const S*>(p.scores) + b * p.tokens;
    const T* x = static_cast<const T*>(p.x) + b * p.tokens * p.cols;
    const int* slot = s.slot + b * p.tokens;
    const float total = s.stats[2 * b];
    float acc = 0.f;
    for (int64_t t = 0; t < p.tokens; ++t)
      if (slot[t] < 0) acc += (to_float(scores[t]) / total) * to_float(x[t * p.cols + c]);
    static_cast<T*>(p.out)[(b * n_out + p.keep) * p.cols + c] = from_float<T>(acc);
  }
}

__global__ void scatter_slots_kernel(TopkParams p, Scratch s) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.batch * p.keep;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / p.keep, t = p.index[i];
    // an index out of range (never the forward's) is left out, not written out of bounds
    if (t >= 0 && t < p.tokens) s.slot[b * p.tokens + t] = static_cast<int>(i % p.keep);
  }
}

// One block per input row: kept rows take their output row's gradient,
// dropped rows the remainder's share (or zero without a remainder).
template <typename T, typename S>
__global__ void backward_rows_kernel(TopkParams p, Scratch s) {
  __shared__ float scratch[32];
  const int64_t n_out = p.keep + (p.fuse_remainder ? 1 : 0), cols = p.cols;
  for (int64_t unit = blockIdx.x; unit < p.batch * p.tokens; unit += gridDim.x) {
    const int64_t b = unit / p.tokens;
    const int k = s.slot[unit];
    const T* g = static_cast<const T*>(p.grad_out) + b * n_out * cols;
    T* gx = static_cast<T*>(p.grad_x) + unit * cols;
    S* gs = p.grad_scores ? static_cast<S*>(p.grad_scores) + unit : nullptr;
    if (k >= 0 || !p.fuse_remainder) {
      if (k >= 0) {
        copy_row(gx, g + k * cols, cols);
      } else {
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) gx[c] = from_float<T>(0.f);
      }
      if (gs && threadIdx.x == 0) *gs = from_float<S>(0.f);
      continue;
    }
    // remainder = sum_i (s_i / S) x_i: d/dx_t = s_t / S, d/ds_t = (x_t - remainder) / S
    const float total = s.stats[2 * b], g_dot_extra = s.stats[2 * b + 1];
    const float w = to_float(static_cast<const S*>(p.scores)[unit]) / total;
    const T* x = static_cast<const T*>(p.x) + unit * cols;
    const T* g_extra = g + p.keep * cols;
    float g_dot_x[1] = {0.f};
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float ge = to_float(g_extra[c]);
      if (gs) g_dot_x[0] += ge * to_float(x[c]);
      gx[c] = from_float<T>(w * ge);
    }
    if (gs) {  // uniform across the block: the reduction's barriers are safe
      block_allreduce<1>(g_dot_x, scratch, SumOp());
      if (threadIdx.x == 0) *gs = from_float<S>((g_dot_x[0] - g_dot_extra) / total);
    }
  }
}

// Runs launch(x_tag, scores_tag) for x's and the scores' dtypes; returns the
// first launch error.
template <typename Launch>
const char* launch_topk(const TopkParams& p, Launch launch) {
  const char* err = nullptr;  // the inner launch's error (it clears the CUDA error state)
  const char* outer = launch_for_dtype(p.dtype, [&](auto* xtag) {
    err = launch_for_dtype(p.scores_dtype, [&](auto* stag) { launch(xtag, stag); });
  });
  return err ? err : outer;
}

}  // namespace

size_t topk_scratch_bytes(const TopkParams& p) {
  return static_cast<size_t>(p.batch) * (p.tokens * sizeof(int) + 2 * sizeof(float));
}

const char* topk_tokens(const TopkParams& p, void* scratch, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Scratch s = carve(p, scratch);
  const int64_t rank_units = p.batch * ((p.tokens + kThreads - 1) / kThreads);
  const int64_t col_units = p.batch * ((p.cols + kThreads - 1) / kThreads);
  return launch_topk(p, [&](auto* xtag, auto* stag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using S = std::remove_pointer_t<decltype(stag)>;
    rank_kernel<S><<<grid_for(rank_units), kThreads, 0, st>>>(p, s);
    if (cudaPeekAtLastError() != cudaSuccess) return;  // the gather would read an unwritten index
    gather_kernel<T><<<grid_for(p.batch * p.keep), kThreads, 0, st>>>(p);
    if (!p.fuse_remainder) return;
    stats_kernel<T, S><<<grid_for(p.batch), kThreads, 0, st>>>(p, s);
    remainder_kernel<T, S><<<grid_for(col_units), kThreads, 0, st>>>(p, s);
  });
}

const char* topk_tokens_backward(const TopkParams& p, void* scratch, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Scratch s = carve(p, scratch);
  // 0xff bytes make every slot -1 (dropped) until the index says otherwise
  const cudaError_t cleared = cudaMemsetAsync(s.slot, 0xff, static_cast<size_t>(p.batch * p.tokens) * sizeof(int), st);
  if (cleared != cudaSuccess) {
    cudaGetLastError();  // reported here; later launches must not see it
    return cudaGetErrorString(cleared);
  }
  return launch_topk(p, [&](auto* xtag, auto* stag) {
    using T = std::remove_pointer_t<decltype(xtag)>;
    using S = std::remove_pointer_t<decltype(stag)>;
    scatter_slots_kernel<<<grid_for((p.batch * p.keep + kThreads - 1) / kThreads), kThreads, 0, st>>>(p, s);
    if (cudaPeekAtLastError() != cudaSuccess) return;
    if (p.fuse_remainder) stats_kernel<T, S><<<grid_for(p.batch), kThreads, 0, st>>>(p, s);
    backward_rows_kernel<T, S><<<grid_for(p.batch * p.tokens), kThreads, 0, st>>>(p, s);
  });
}

}  // namespace flashkd::cuda
