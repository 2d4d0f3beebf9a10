// CUDA distillation kernels and their launcher. Two ways to run one row
// (the body is distill_row.cuh):
//   distill_kernel          one block per row, reads global memory per sweep;
//   distill_cluster_kernel  sm_90: a cluster of blocks per row, each caching
//                           its slice in shared memory, so the logits cross
//                           HBM once; partial sums meet through distributed
//                           shared memory.
#include <cooperative_groups.h>
#include <cstdlib>
#include "distill_row.cuh"
#include "kernels.h"

namespace cg = cooperative_groups;

namespace flashkd::cuda {
namespace {

// 512 threads, two blocks per SM: caps the kernels at 64 registers per thread.
constexpr int kMaxThreads = 512;
constexpr int kMaxCluster = 8;
// Shared-memory slice per block: two blocks per SM fit when a slice is this small...
constexpr int64_t kSliceBytesTwoPerSm = 110 * 1024;
// ...and one per SM up to this.
constexpr int64_t kSliceBytesMax = 200 * 1024;

// Row elements straight from global memory.
template <typename Ts, typename Tt>
struct GlobalSrc {
  const Ts* srow;
  const Tt* trow;
  Ts* grow;
  int64_t ss, ts, gs, n, cols, begin, end;
  bool svec, tvec, gvec;

  __device__ GlobalSrc(const DistillParams& p, int64_t row) {
    srow = static_cast<const Ts*>(p.student) + p.student_layout.row_offset(row);
    trow = p.teacher ? static_cast<const Tt*>(p.teacher) + p.teacher_layout.row_offset(row) : nullptr;
    grow = static_cast<Ts*>(p.grad) + p.grad_layout.row_offset(row);
    ss = p.student_layout.col_stride;
    ts = p.teacher ? p.teacher_layout.col_stride : 1;
    gs = p.grad_layout.col_stride;
    svec = vec_ok(srow, ss);
    tvec = trow && vec_ok(trow, ts);
    gvec = vec_ok(grow, gs);
    n = p.vocab;
    cols = p.cols;
    begin = 0;
    end = p.cols;
  }
  __device__ void first(int64_t c, float (&s)[kVec], float (&t)[kVec], bool soft) { again(c, s, t, soft); }
  __device__ void again(int64_t c, float (&s)[kVec], float (&t)[kVec], bool soft) {
    load8(srow, c, ss, n, svec, s);
    if (soft) load8(trow, c, ts, n, tvec, t);
  }
  __device__ void store(int64_t c, const float (&g)[kVec]) { store8(grow, c, gs, cols, gvec, g); }
  __device__ float student_at(int64_t col) const { return to_float(srow[col * ss]); }
  __device__ float teacher_at(int64_t col) const { return to_float(trow[col * ts]); }
};

struct BlockRed {
  float* scratch;     // 32 * 4 floats
  int64_t* iscratch;  // 32
  template <int N> __device__ void sum(float (&v)[N]) { block_allreduce(v, scratch, SumOp{}); }
  template <int N> __device__ void max(float (&v)[N]) { block_allreduce(v, scratch, MaxOp{}); }
  __device__ void argmax(float& v, int64_t& i) { block_argmax(v, i, scratch, iscratch); }
  __device__ bool leader() const { return threadIdx.x == 0; }
};

__device__ void zero_row_grad(void* grad, DType dtype, const RowLayout& layout, int64_t row, int64_t begin,
                              int64_t end) {
  const float zeros[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  auto run = [&](auto* g) {
    g += layout.row_offset(row);
    const bool vec = vec_ok(g, layout.col_stride);
    for (int64_t c = begin + int64_t(threadIdx.x) * kVec; c < end; c += int64_t(blockDim.x) * kVec)
      store8(g, c, layout.col_stride, end, vec && (c % kVec == 0), zeros);
  };
  if (dtype == DType::kFloat32) run(static_cast<float*>(grad));
  else if (dtype == DType::kBFloat16) run(static_cast<__nv_bfloat16*>(grad));
  else run(static_cast<__half*>(grad));
}

template <Divergence D, typename Ts, typename Tt>
__global__ void __launch_bounds__(kMaxThreads, 2) distill_kernel(const DistillParams p) {
  __shared__ float scratch[32 * 4];
  __shared__ int64_t iscratch[32];
  const int64_t row = blockIdx.x;
  if (row_is_skipped(p, row)) {
    zero_row_grad(p.grad, p.student_dtype, p.grad_layout, row, 0, p.cols);
    if (threadIdx.x == 0) p.loss[row] = 0.f;
    return;
  }
  GlobalSrc<Ts, Tt> src(p, row);
  BlockRed red{scratch, iscratch};
  distill_row_body<D>(p, row, src, red);
}

// ---------------------------------------------------------------------------
// sm_90: one cluster per row, the row cached in shared memory.

// A block's slice of the row in shared memory, in the input dtypes.
template <typename Ts, typename Tt>
struct SmemSrc : GlobalSrc<Ts, Tt> {
  Ts* s_cache;
  Tt* t_cache;
  __device__ SmemSrc(const DistillParams& p, int64_t row, int64_t begin_, int64_t end_, char* smem)
      : GlobalSrc<Ts, Tt>(p, row) {
    this->begin = begin_;
    this->end = end_;
    s_cache = reinterpret_cast<Ts*>(smem);
    t_cache = reinterpret_cast<Tt*>(smem + (end_ - begin_) * sizeof(Ts));
  }
  __device__ void first(int64_t c, float (&s)[kVec], float (&t)[kVec], bool soft) {
    GlobalSrc<Ts, Tt>::again(c, s, t, soft);
    put(s_cache + (c - this->begin), s);
    if (soft) put(t_cache + (c - this->begin), t);
  }
  __device__ void again(int64_t c, float (&s)[kVec], float (&t)[kVec], bool soft) {
    get(s_cache + (c - this->begin), s);
    if (soft) get(t_cache + (c - this->begin), t);
  }
  // Values round-trip exactly: they came from T, and -inf exists in every T.
  template <typename T> __device__ static void put(T* dst, const float (&v)[kVec]) {
    uint4 words[kVec * sizeof(T) / 16];
    T* e = reinterpret_cast<T*>(words);
#pragma unroll
    for (int j = 0; j < kVec; ++j) e[j] = from_float<T>(v[j]);
#pragma unroll
    for (int w = 0; w < int(kVec * sizeof(T) / 16); ++w) reinterpret_cast<uint4*>(dst)[w] = words[w];
  }
  template <typename T> __device__ static void get(const T* src, float (&v)[kVec]) {
    uint4 words[kVec * sizeof(T) / 16];
#pragma unroll
    for (int w = 0; w < int(kVec * sizeof(T) / 16); ++w) words[w] = reinterpret_cast<const uint4*>(src)[w];
    const T* e = reinterpret_cast<const T*>(words);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = to_float(e[j]);
  }
};

// Block reduction, then an exchange through distributed shared memory: each
// block publishes its value in its own slot of the current round (a fresh slot
// per round, so no block overwrites a value another may still read), the
// cluster syncs, and every thread folds all blocks' values in rank order, so
// every block gets bitwise-identical results.
struct ClusterRed {
  static constexpr int kRounds = 8, kSlot = 4;
  BlockRed block;
  float* xchg;  // [kRounds][kSlot] floats in this block's shared memory
  int round = 0;

  template <int N, typename Fold>
  __device__ void exchange(float (&v)[N], Fold fold) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    static_assert(N <= kSlot, "exchange slot too small");
    cg::cluster_group cluster = cg::this_cluster();
    float* slot = xchg + (round++) * kSlot;
    if (threadIdx.x == 0)
#pragma unroll
      for (int i = 0; i < N; ++i) slot[i] = v[i];
    cluster.sync();
    const float* first = cluster.map_shared_rank(slot, 0);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = first[i];
    for (unsigned r = 1; r < cluster.num_blocks(); ++r) fold(v, cluster.map_shared_rank(slot, r));
#endif
  }
  template <int N> __device__ void sum(float (&v)[N]) {
    block.sum(v);
    exchange(v, [](float (&a)[N], const float* b) {
#pragma unroll
      for (int i = 0; i < N; ++i) a[i] += b[i];
    });
  }
  template <int N> __device__ void max(float (&v)[N]) {
    block.max(v);
    exchange(v, [](float (&a)[N], const float* b) {
#pragma unroll
      for (int i = 0; i < N; ++i) a[i] = fkd_max(a[i], b[i]);
    });
  }
  __device__ void argmax(float& v, int64_t& i) {
    block.argmax(v, i);
    float pair[2] = {v, static_cast<float>(i)};  // exact: vocabularies < 2^24
    exchange(pair, [](float (&a)[2], const float* b) {
      if (b[0] > a[0] || (b[0] == a[0] && b[1] < a[1])) { a[0] = b[0]; a[1] = b[1]; }
    });
    v = pair[0];
    i = static_cast<int64_t>(pair[1]);
  }
  __device__ bool leader() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return threadIdx.x == 0 && cg::this_cluster().block_rank() == 0;
#else
    return false;
#endif
  }
};

// Columns per cluster block: a multiple of kVec so slices stay 16-byte aligned.
__host__ __device__ inline int64_t slice_cols(int64_t cols, int blocks) {
  const int64_t per = (cols + blocks - 1) / blocks;
  return (per + kVec - 1) / kVec * kVec;
}

template <Divergence D, typename Ts, typename Tt>
__global__ void __launch_bounds__(kMaxThreads, 1) distill_cluster_kernel(const DistillParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) char smem[];
  __shared__ float scratch[32 * 4];
  __shared__ int64_t iscratch[32];
  __shared__ float xchg[ClusterRed::kRounds * ClusterRed::kSlot];
  cg::cluster_group cluster = cg::this_cluster();
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t row = blockIdx.x / blocks;
  const int64_t per = slice_cols(p.cols, blocks);
  const int64_t begin = rank * per;
  const int64_t end = begin + per < p.cols ? begin + per : p.cols;
  if (row_is_skipped(p, row)) {  // uniform across the cluster: no syncs are skipped unevenly
    zero_row_grad(p.grad, p.student_dtype, p.grad_layout, row, begin, end);
    if (threadIdx.x == 0 && rank == 0) p.loss[row] = 0.f;
    return;
  }
  SmemSrc<Ts, Tt> src(p, row, begin, end, smem);
  ClusterRed red{BlockRed{scratch, iscratch}, xchg};
  distill_row_body<D>(p, row, src, red);
  cluster.sync();  // no block may exit while others can still read its shared memory
#endif
}

// ---------------------------------------------------------------------------
// Launch

int threads_for(int64_t cols_per_block) {
  int t = 64;
  while (t < kMaxThreads && int64_t(t) * kVec * 4 < cols_per_block) t *= 2;
  return t;
}

int dtype_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

bool aligned_rows(const void* base, const RowLayout& l, int elem) {
  if (l.col_stride != 1 || reinterpret_cast<uintptr_t>(base) % 16) return false;
  for (int d = 0; d < l.ndim; ++d)
    if ((l.stride[d] * elem) % 16) return false;
  return true;
}

// Blocks per row for the shared-memory cluster path, or 0 when it does not
// apply (pre-Hopper GPU, small or huge vocabularies, strided or unaligned rows).
int cluster_blocks(const DistillParams& p, int64_t& smem_bytes) {
  static const int major = [] {
    int dev = 0, v = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev);
    return v;
  }();
  if (major < 9 || p.cols < 4096) return 0;
  const int es = dtype_bytes(p.student_dtype), et = p.teacher ? dtype_bytes(p.teacher_dtype) : 0;
  if (!aligned_rows(p.student, p.student_layout, es) || !aligned_rows(p.grad, p.grad_layout, es)) return 0;
  if (p.teacher && !aligned_rows(p.teacher, p.teacher_layout, et)) return 0;
  for (int64_t budget : {kSliceBytesTwoPerSm, kSliceBytesMax}) {
    for (int blocks = 1; blocks <= kMaxCluster; ++blocks) {
      const int64_t bytes = slice_cols(p.cols, blocks) * (es + et);
      if (bytes <= budget) {
        smem_bytes = bytes;
        return blocks;
      }
    }
  }
  return 0;
}

template <Divergence D, typename Ts, typename Tt>
cudaError_t launch(const DistillParams& p, cudaStream_t stream) {
  int64_t smem = 0;
  const int blocks = cluster_blocks(p, smem);
  if (blocks > 0 && !std::getenv("FLASHKD_NO_CLUSTER")) {
    auto kernel = distill_cluster_kernel<D, Ts, Tt>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(p.rows * blocks));
    cfg.blockDim = dim3(threads_for(slice_cols(p.cols, blocks)));
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = blocks;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, p);
  }
  distill_kernel<D, Ts, Tt><<<dim3(static_cast<unsigned>(p.rows)), dim3(threads_for(p.vocab)), 0, stream>>>(p);
  return cudaGetLastError();
}

template <Divergence D, typename Ts>
cudaError_t launch_teacher(const DistillParams& p, cudaStream_t stream) {
  switch (p.teacher_dtype) {
    case DType::kFloat32: return launch<D, Ts, float>(p, stream);
    case DType::kBFloat16: return launch<D, Ts, __nv_bfloat16>(p, stream);
    default: return launch<D, Ts, __half>(p, stream);
  }
}

struct Launcher {
  const DistillParams& p;
  cudaStream_t stream;
  template <Divergence D>
  cudaError_t operator()() const {
    switch (p.student_dtype) {
      case DType::kFloat32: return launch_teacher<D, float>(p, stream);
      case DType::kBFloat16: return launch_teacher<D, __nv_bfloat16>(p, stream);
      default: return launch_teacher<D, __half>(p, stream);
    }
  }
};

}  // namespace

const char* distill_rows(const DistillParams& p, void* stream) {
  if (p.rows == 0) return nullptr;
  const cudaError_t err = dispatch_divergence(p.divergence, Launcher{p, static_cast<cudaStream_t>(stream)});
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashkd::cuda
