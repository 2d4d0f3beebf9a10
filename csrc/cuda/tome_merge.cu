// ToMe merge / unmerge on the GPU and their backward passes. One block per
// merged output row (its group: the head token plus the A tokens merged into
// it, found by scanning the plan in k order, the order of ToMe's
// scatter_reduce); threads own 8 channels each. Backward writes every member's
// gradient row from its group's block, so no atomics are needed.
#include <type_traits>
#include "tome_common.cuh"
#include "tome_kernels.h"

namespace flashkd::cuda {
namespace {

constexpr int kThreads = 128;

// Head token of output row `o` of batch b; sets *j to its B row or -1.
__device__ __forceinline__ int64_t group_head(const MergePlan& p, int64_t b, int64_t o, int64_t* j) {
  const int64_t e = p.out_row_entry(o);
  if (e >= 0) {
    *j = -1;
    return 2 * p.unm[b * p.n_unm + e];
  }
  *j = ~e;
  return 2 * *j + 1;
}

template <typename T>
__device__ __forceinline__ float scalar_at(const void* base, int64_t i) {
  return to_float(static_cast<const T*>(base)[i]);
}

template <typename T>
__global__ void merge_kernel(MergePlan p, MergeTensors t) {
  const int64_t n_out = p.n_out(), cols = t.cols;
  const T* x = static_cast<const T*>(t.x);
  T* out = static_cast<T*>(t.out);
  for (int64_t u = blockIdx.x; u < p.batch * n_out; u += gridDim.x) {
    const int64_t b = u / n_out;
    int64_t j;
    const int64_t head = b * p.tokens + group_head(p, b, u % n_out, &j);
    const int64_t* src = p.src + b * p.r;
    const int64_t* dst = p.dst + b * p.r;
    const bool weighted = t.mode == MergeMode::kWeighted;
    const float head_size = weighted && t.size ? scalar_at<T>(t.size, head) : 1.f;
    float total = head_size;  // kWeighted: summed size; kMean: member count
    int64_t members = 1;
    for (int64_t k = 0; j >= 0 && k < p.r; ++k)
      if (dst[k] == j) {
        total += weighted && t.size ? scalar_at<T>(t.size, b * p.tokens + 2 * src[k]) : 1.f;
        ++members;
      }
    const bool scale = members > 1 && (t.mode == MergeMode::kMean || weighted);  // a group of one keeps its row
    for (int64_t c0 = int64_t(threadIdx.x) * kVec; c0 < cols; c0 += int64_t(blockDim.x) * kVec) {
      float acc[kVec], row[kVec];
      const T* hx = x + head * cols;
      load8(hx, c0, 1, cols, vec_ok(hx, 1), acc);
      if (weighted && scale)
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[v] *= head_size;
      for (int64_t k = 0; j >= 0 && k < p.r; ++k) {
        if (dst[k] != j) continue;
        const int64_t token = b * p.tokens + 2 * src[k];
        const T* sx = x + token * cols;
        load8(sx, c0, 1, cols, vec_ok(sx, 1), row);
        const float s = weighted && t.size ? scalar_at<T>(t.size, token) : 1.f;
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          if (t.mode == MergeMode::kAmax) acc[v] = (row[v] > acc[v] || row[v] != row[v]) ? row[v] : acc[v];
          else acc[v] += weighted ? row[v] * s : row[v];
        }
      }
      if (scale)
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[v] /= total;
      T* o = out + u * cols;
      store8(o, c0, 1, cols, vec_ok(o, 1), acc);
    }
    if (weighted && threadIdx.x == 0) static_cast<T*>(t.size_out)[u] = from_float<T>(total);
  }
}

template <typename T>
__global__ void merge_backward_kernel(MergePlan p, MergeTensors t) {
  __shared__ float scratch[32];
  const int64_t n_out = p.n_out(), cols = t.cols;
  const T* x = static_cast<const T*>(t.x);
  const T* g_out = static_cast<const T*>(t.grad_out);
  const T* y_out = static_cast<const T*>(t.out);
  T* gx = static_cast<T*>(t.grad_x);
  for (int64_t u = blockIdx.x; u < p.batch * n_out; u += gridDim.x) {
    const int64_t b = u / n_out;
    int64_t j;
    const int64_t head = group_head(p, b, u % n_out, &j);
    const int64_t* src = p.src + b * p.r;
    const int64_t* dst = p.dst + b * p.r;
    // member m: the head for m == -1, else the k-th plan entry when it targets j
    auto member = [&](int64_t m) { return b * p.tokens + (m < 0 ? head : 2 * src[m]); };
    auto in_group = [&](int64_t m) { return m < 0 || (j >= 0 && dst[m] == j); };
    const int64_t last = j >= 0 ? p.r : 0;
    int64_t count = 1;
    for (int64_t k = 0; k < last; ++k) count += dst[k] == j ? 1 : 0;

    if (count == 1 && t.mode != MergeMode::kAmax) {
      // A group of one was copied: its gradient passes through unchanged (as on
      // the CPU; g / s * s would round, and be NaN for a size of 0), and its size
      // receives only the size's own gradient (dy/ds = (x - y) / s = 0).
      const int64_t token = member(-1);
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) gx[token * cols + c] = g_out[u * cols + c];
      if (t.mode == MergeMode::kWeighted && t.grad_size && threadIdx.x == 0)
        static_cast<T*>(t.grad_size)[token] =
            t.grad_size_out ? static_cast<const T*>(t.grad_size_out)[u] : from_float<T>(0.f);
      continue;  // count is the same for every thread of the block
    }
    if (t.mode == MergeMode::kWeighted) {
      // y = sum(s_i x_i) / N: dy/dx_i = s_i / N, dy/ds_i = (x_i - y) / N
      const float total = scalar_at<T>(t.size_out, u);
      const float g_size = t.grad_size_out ? scalar_at<T>(t.grad_size_out, u) : 0.f;
      float gy[1] = {0.f};
      if (t.grad_size) {
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
          gy[0] += to_float(g_out[u * cols + c]) * to_float(y_out[u * cols + c]);
        block_allreduce<1>(gy, scratch, SumOp());
      }
      for (int64_t m = -1; m < last; ++m) {
        if (!in_group(m)) continue;
        const int64_t token = member(m);
        const float s = t.size ? scalar_at<T>(t.size, token) : 1.f;
        float gxd[1] = {0.f};
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
          const float g = to_float(g_out[u * cols + c]);
          if (t.grad_size) gxd[0] += g * to_float(x[token * cols + c]);
          gx[token * cols + c] = from_float<T>(g / total * s);
        }
        if (t.grad_size) {
          block_allreduce<1>(gxd, scratch, SumOp());
          if (threadIdx.x == 0)
            static_cast<T*>(t.grad_size)[token] = from_float<T>((gxd[0] - gy[0]) / total + g_size);
        }
      }
      continue;
    }
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float g = to_float(g_out[u * cols + c]);
      if (t.mode == MergeMode::kAmax) {
        // shared equally by the members equal to the maximum (torch's rule)
        const float y = to_float(y_out[u * cols + c]);
        float ties = 0.f;
        for (int64_t m = -1; m < last; ++m)
          if (in_group(m)) ties += to_float(x[member(m) * cols + c]) == y ? 1.f : 0.f;
        for (int64_t m = -1; m < last; ++m)
          if (in_group(m)) {
            const int64_t token = member(m);
            gx[token * cols + c] = from_float<T>(to_float(x[token * cols + c]) == y ? g / ties : 0.f);
          }
      } else {
        const float v = t.mode == MergeMode::kMean ? g / static_cast<float>(count) : g;
        for (int64_t m = -1; m < last; ++m)
          if (in_group(m)) gx[member(m) * cols + c] = from_float<T>(v);
      }
    }
  }
}

template <typename T>
__global__ void unmerge_kernel(MergePlan p, const T* x, int64_t cols, T* out) {
  __shared__ int64_t source;
  const int64_t n_out = p.n_out();
  for (int64_t u = blockIdx.x; u < p.batch * p.tokens; u += gridDim.x) {
    const int64_t b = u / p.tokens, token = u % p.tokens, i = token / 2;
    __syncthreads();
    if (token % 2) {
      if (threadIdx.x == 0) source = p.n_unm + i;  // ToMe reads x as [unm..., B rows...]
    } else {
      for (int64_t k = threadIdx.x; k < p.n_unm; k += blockDim.x)
        if (p.unm[b * p.n_unm + k] == i) source = k;
      for (int64_t k = threadIdx.x; k < p.r; k += blockDim.x)
        if (p.src[b * p.r + k] == i) source = p.n_unm + p.dst[b * p.r + k];
    }
    __syncthreads();
    copy_row(out + u * cols, x + (b * n_out + source) * cols, cols);
  }
}

}  // namespace

const char* tome_merge(const MergePlan& p, const MergeTensors& t, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(t.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    merge_kernel<T><<<grid_for(p.batch * p.n_out()), kThreads, 0, st>>>(p, t);
  });
}

const char* tome_merge_backward(const MergePlan& p, const MergeTensors& t, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(t.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    merge_backward_kernel<T><<<grid_for(p.batch * p.n_out()), kThreads, 0, st>>>(p, t);
  });
}

const char* tome_unmerge(const MergePlan& p, const void* x, DType dtype, int64_t cols, void* out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return launch_for_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    unmerge_kernel<T><<<grid_for(p.batch * p.tokens), kThreads, 0, st>>>(p, static_cast<const T*>(x), cols,
                                                                          static_cast<T*>(out));
  });
}

}  // namespace flashkd::cuda
