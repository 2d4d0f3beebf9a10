// CUDA distillation kernel for Hopper (sm_90): each token row is split over
// a thread-block cluster, and each block caches its slice of the row (student
// and teacher logits, in their own dtypes) in shared memory, so global memory
// is read once per row and the row program's three sweeps (distill_row.cuh)
// read shared memory. Partial results meet through distributed shared memory.
//
// Why: the streaming kernel (distill_kernel.cu) reads each row two or three
// times; at N = 8192, V = 128256 the rows in flight exceed the L2, so the
// re-reads come from HBM and it ran at 40% of the copy bandwidth on an H100
// (bench/NOTES.md). Here the bytes leave HBM once.
//
// How: persistent clusters walk the rows; a block's shared memory holds two
// stages, and while it works on one row a bulk copy (cp.async.bulk, completion
// counted by an mbarrier) fills the other with its slice of the next row.
// Rows whose slices do not fit two stages in shared memory at a cluster size
// of at most 8 (e.g. float32 logits at V = 128256), strided rows and rows not
// on 16-byte boundaries stay on the streaming kernel.
#include <cooperative_groups.h>
#include <algorithm>
#include <mutex>
#include "distill_cluster.h"
#include "distill_row.cuh"
#include "host_utils.cuh"
#include "mbarrier.cuh"

namespace flashkd::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxClusterSize = 8;  // the portable maximum
constexpr int kMaxThreads = 512;
constexpr int kStages = 2;

// How the rows of one call are cut: every block of a cluster owns `slice`
// columns (the last block fewer), cached at the start of a stage (student)
// and at `teacher_offset` (teacher).
struct CachePlan {
  int cluster_size = 1;
  int threads = 64;
  int64_t slice = 0;           // a multiple of 8 columns
  int64_t teacher_offset = 0;  // bytes, a multiple of 16
  int64_t stage_bytes = 0;     // a multiple of 16
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

constexpr int kSlotBytes = 64;  // the largest value merged across the cluster (Sweep1)

// Copies `bytes` (a multiple of 16, both ends 16-byte aligned) from global
// to this block's shared memory, counted on `bar`.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// `v` from lane (lane + delta) of the warp, for any 4-byte-aligned struct.
template <typename T>
__device__ __forceinline__ T shuffle_down(const T& v, int delta) {
  static_assert(sizeof(T) % 4 == 0, "shuffle moves 4-byte words");
  T out;
  const uint32_t* from = reinterpret_cast<const uint32_t*>(&v);
  uint32_t* to = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
  for (int i = 0; i < int(sizeof(T) / 4); ++i) to[i] = __shfl_down_sync(0xffffffffu, from[i], delta);
  return out;
}

// Merges block-level partials across the cluster. Thread 0 of every block
// posts its value in its own shared memory; after one cluster barrier, lane r
// of warp 0 reads rank r's value and the warp merges them in a fixed tree (so
// every block computes the same totals, bit for bit) for its block. Posting
// slots alternate: a block writes a slot again only two merges later, after
// a barrier that every reader of its previous contents has passed.
struct ClusterCombine {
  unsigned char* slots;   // 2 * kSlotBytes of this block's shared memory
  unsigned char* result;  // kSlotBytes
  int size;               // a power of two, at most 32
  unsigned rank;
  int merges = 0;

  template <typename T>
  __device__ __forceinline__ T across(const T& v) {
    static_assert(sizeof(T) <= kSlotBytes, "enlarge kSlotBytes");
    cg::cluster_group cluster = cg::this_cluster();
    T* slot = reinterpret_cast<T*>(slots + (merges++ & 1) * kSlotBytes);
    if (threadIdx.x == 0) *slot = v;
    cluster.sync();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      T total = *cluster.map_shared_rank(slot, lane < size ? lane : 0);
      for (int delta = size / 2; delta > 0; delta /= 2) {
        const T other = shuffle_down(total, delta);
        if (lane < delta) total = merge(total, other);
      }
      if (lane == 0) *reinterpret_cast<T*>(result) = total;
    }
    // `result` is written again only after the next cluster barrier, which
    // every thread of this block reaches after reading it here.
    __syncthreads();
    return *reinterpret_cast<const T*>(result);
  }
  __device__ __forceinline__ bool leader() const { return rank == 0; }
};

// A block's slice of the row in shared memory (column `lo` at index 0); the
// few columns past the cached part (the vocabulary's last < 8) come from global memory.
template <typename Ts, typename Tt>
struct CachedSlice {
  const GlobalRow<Ts, Tt>& g;
  const Ts* student_cache;
  const Tt* teacher_cache;
  int64_t lo, cached_end;

  __device__ __forceinline__ void student(int64_t c, float (&x)[kVec]) const {
    if (c + kVec <= cached_end) load8_shared(student_cache + (c - lo), x);
    else g.student(c, x);
  }
  __device__ __forceinline__ void teacher(int64_t c, float (&x)[kVec]) const {
    if (c + kVec <= cached_end) load8_shared(teacher_cache + (c - lo), x);
    else g.teacher(c, x);
  }
};

#endif  // __CUDA_ARCH__ >= 900

template <Divergence D, typename Ts, typename Tt>
__global__ void __launch_bounds__(kMaxThreads, 1) distill_cluster_kernel(const DistillParams p, const CachePlan plan) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char stages[];
  __shared__ RowScratch scratch;
  __shared__ __align__(16) unsigned char slots[2 * kSlotBytes];
  __shared__ __align__(16) unsigned char result[kSlotBytes];
  __shared__ uint64_t filled[kStages];

  const unsigned rank = cg::this_cluster().block_rank();
  const int64_t first_row = blockIdx.x / plan.cluster_size, row_step = gridDim.x / plan.cluster_size;
  const int64_t lo = rank * plan.slice;
  const int64_t hi = lo < p.cols ? min(lo + plan.slice, p.cols) : lo;  // may be empty
  const int64_t vocab_end = min(hi, p.vocab);
  const int64_t cached = vocab_end > lo ? (vocab_end - lo) / kVec * kVec : 0;
  const uint32_t student_bytes = static_cast<uint32_t>(cached * sizeof(Ts));
  const uint32_t teacher_bytes = p.teacher ? static_cast<uint32_t>(cached * sizeof(Tt)) : 0;
  auto student_cache = [&](int s) { return reinterpret_cast<Ts*>(stages + s * plan.stage_bytes); };
  auto teacher_cache = [&](int s) {
    return reinterpret_cast<Tt*>(stages + s * plan.stage_bytes + plan.teacher_offset);
  };
  // Thread 0 starts copying `row`'s slice into stage s.
  auto prefetch = [&](int64_t row, int s) {
    if (threadIdx.x != 0) return;
    fence_proxy_async();
    mbarrier_arrive_expect(&filled[s], student_bytes + teacher_bytes);
    if (student_bytes)
      bulk_copy_to_shared(student_cache(s), static_cast<const Ts*>(p.student) + p.student_layout.row_offset(row) + lo,
                          student_bytes, &filled[s]);
    if (teacher_bytes)
      bulk_copy_to_shared(teacher_cache(s), static_cast<const Tt*>(p.teacher) + p.teacher_layout.row_offset(row) + lo,
                          teacher_bytes, &filled[s]);
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbarrier_init(&filled[s], 1);
    fence_barrier_init();
  }
  __syncthreads();

  ClusterCombine combine{slots, result, plan.cluster_size, rank};
  if (first_row < p.rows) prefetch(first_row, 0);
  int k = 0;  // rows done by this block; row k uses stage k % 2, that stage's (k / 2)-th fill
  for (int64_t row = first_row; row < p.rows; row += row_step, ++k) {
    const int s = k & 1;
    __syncthreads();  // every thread is done reading stage s ^ 1 (the previous row)
    if (row + row_step < p.rows) prefetch(row + row_step, s ^ 1);
    mbarrier_wait(&filled[s], (k >> 1) & 1);
    const GlobalRow<Ts, Tt> g(p, row);
    const CachedSlice<Ts, Tt> src{g, student_cache(s), teacher_cache(s), lo, lo + cached};
    distill_row<D, Ts, Tt>(p, row, g, src, lo, hi, combine, scratch);
  }
  cg::this_cluster().sync();  // peers may still be reading this block's slots
#endif
}

size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }
int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Every row of the layout starts on a 16-byte boundary and is contiguous.
bool rows_aligned(const void* base, const RowLayout& layout, size_t elem) {
  if (layout.col_stride != 1 || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int d = 0; d < layout.ndim; ++d)
    if (layout.size[d] > 1 && (layout.stride[d] * static_cast<int64_t>(elem)) % 16 != 0) return false;
  return true;
}

// A launch of `clusters` clusters of the plan on `stream` (kernel arguments
// aside). Not copyable: the config points at the attribute beside it.
struct ClusterLaunch {
  cudaLaunchAttribute attr{};
  cudaLaunchConfig_t cfg{};
  ClusterLaunch(const CachePlan& plan, int64_t clusters, cudaStream_t stream) {
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = plan.cluster_size;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(clusters * plan.cluster_size));
    cfg.blockDim = dim3(plan.threads);
    cfg.dynamicSmemBytes = kStages * plan.stage_bytes;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// The smallest cluster whose slices fit two stages in `smem` bytes.
bool make_plan(const DistillParams& p, int64_t smem, CachePlan* plan) {
  for (int size = 1; size <= kMaxClusterSize; size *= 2) {
    const int64_t slice = round_up((p.cols + size - 1) / size, kVec);
    const int64_t student = round_up(slice * dtype_size(p.student_dtype), 16);
    const int64_t teacher = p.teacher ? round_up(slice * dtype_size(p.teacher_dtype), 16) : 0;
    if (kStages * (student + teacher) > smem) continue;
    plan->cluster_size = size;
    plan->threads = threads_for_columns(slice, kMaxThreads);
    plan->slice = slice;
    plan->teacher_offset = student;
    plan->stage_bytes = student + teacher;
    return true;
  }
  return false;
}

// Clusters of `plan` that fit on the device at once (0: none), cached per
// kernel, device and plan shape: the occupancy query costs more than a launch.
// A kernel's first query on a device also raises its dynamic shared memory
// limit to `smem_limit` (over 48 KiB needs the opt-in), which then serves
// every plan, so launches need no attribute call.
int resident_clusters(const void* kernel, const CachePlan& plan, int device, int smem_limit) {
  struct Entry {
    const void* kernel;
    int device, cluster_size, threads;
    int64_t stage_bytes;
    int clusters;
  };
  constexpr int kEntries = 16;
  static Entry cache[kEntries];
  static int next = 0;
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (e.kernel == kernel && e.device == device && e.cluster_size == plan.cluster_size &&
        e.threads == plan.threads && e.stage_bytes == plan.stage_bytes)
      return e.clusters;
  // An error left by an earlier call is the caller's to report: leave it
  // pending, and cache nothing from a query it could have failed.
  if (cudaPeekAtLastError() != cudaSuccess) return 0;
  const ClusterLaunch launch(plan, 1, nullptr);
  int clusters = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.cfg) != cudaSuccess) {
    clusters = 0;
    cudaGetLastError();  // ours, now handled: the streaming kernel runs instead
  }
  cache[next] = Entry{kernel, device, plan.cluster_size, plan.threads, plan.stage_bytes, clusters};
  next = (next + 1) % kEntries;
  return clusters;
}

struct Launcher {
  const DistillParams& p;
  const CachePlan& plan;
  int device, smem_limit;
  cudaStream_t stream;
  const char** err;

  template <Divergence D, typename Ts, typename Tt>
  bool operator()() const {
    const auto kernel = distill_cluster_kernel<D, Ts, Tt>;
    const int clusters = resident_clusters(reinterpret_cast<const void*>(kernel), plan, device, smem_limit);
    if (clusters <= 0) return false;
    const ClusterLaunch launch(plan, std::min<int64_t>(clusters, p.rows), stream);
    if (cudaLaunchKernelEx(&launch.cfg, kernel, p, plan) != cudaSuccess) {
      // Refused at launch although the occupancy query allowed it (a shared
      // GPU's limits, say): the streaming kernel runs instead, and reports
      // the error itself if the device is broken.
      cudaGetLastError();
      return false;
    }
    *err = last_error();
    return true;
  }
};

Sm90Build& sm90_build() {
  static Sm90Build build(
      reinterpret_cast<const void*>(distill_cluster_kernel<Divergence::kFKL, __nv_bfloat16, __nv_bfloat16>));
  return build;
}

}  // namespace

bool cluster_kernel_available() { return sm90_build().loaded(); }

bool launch_distill_cluster(const DistillParams& p, void* stream, const char** err) {
  *err = nullptr;
  if (!cluster_kernel_available()) return false;
  if (!rows_aligned(p.student, p.student_layout, dtype_size(p.student_dtype))) return false;
  if (p.teacher && !rows_aligned(p.teacher, p.teacher_layout, dtype_size(p.teacher_dtype))) return false;
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const int smem_limit = optin - 2048;  // room for the kernel's static shared memory (about 1 KiB)
  CachePlan plan;
  if (!make_plan(p, smem_limit, &plan)) return false;
  return dispatch_row_types(p, Launcher{p, plan, device, smem_limit, static_cast<cudaStream_t>(stream), err});
}

}  // namespace flashkd::cuda
