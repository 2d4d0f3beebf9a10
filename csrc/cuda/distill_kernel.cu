// CUDA distillation: the streaming kernel, one block per token row whose
// three sweeps (distill_row.cuh) read the row from global memory with 16-byte
// loads, and the choice between it and the Hopper cluster kernel
// (distill_cluster.cu), which caches rows in shared memory. The cluster kernel
// runs wherever it applies unless set_distill_kernel("stream") or the
// environment variable FLASHKD_DISTILL_KERNEL=stream says otherwise.
#include <atomic>
#include "distill_cluster.h"
#include "distill_row.cuh"
#include "host_utils.cuh"
#include "kernels.h"

namespace flashkd::cuda {
namespace {

// 512 threads, two blocks per SM: caps the kernel at 64 registers per thread.
constexpr int kMaxThreads = 512;

template <Divergence D, typename Ts, typename Tt>
__global__ void __launch_bounds__(kMaxThreads, 2) distill_kernel(const DistillParams p) {
  __shared__ RowScratch scratch;
  const int64_t row = blockIdx.x;
  const GlobalRow<Ts, Tt> g(p, row);
  SingleBlock combine;
  distill_row<D, Ts, Tt>(p, row, g, g, 0, p.cols, combine, scratch);
}

struct StreamLauncher {
  const DistillParams& p;
  cudaStream_t stream;
  template <Divergence D, typename Ts, typename Tt>
  const char* operator()() const {
    const dim3 grid(static_cast<unsigned>(p.rows)), block(threads_for_columns(p.vocab, kMaxThreads));
    distill_kernel<D, Ts, Tt><<<grid, block, 0, stream>>>(p);
    return last_error();
  }
};

constexpr const char* kKernels[] = {"auto", "stream", "cluster"};
enum Kernel { kStream = 1, kCluster = 2 };  // indices into kKernels; 0 is auto

KernelChoice<3>& kernel_choice() {
  static KernelChoice<3> choice("FLASHKD_DISTILL_KERNEL", "distillation kernel", kKernels, kCluster,
                                cluster_kernel_available);
  return choice;
}

std::atomic<int> last_kernel{0};

}  // namespace

const char* set_distill_kernel(const char* name) { return kernel_choice().set(name); }

const char* distill_kernel_choice() { return kernel_choice().name(kernel_choice().forced()); }

const char* last_distill_kernel() { return kKernels[last_kernel.load()]; }

const char* distill_rows(const DistillParams& p, void* stream) {
  if (p.rows == 0) return nullptr;
  // auto and cluster both take the cluster kernel wherever it applies.
  if (kernel_choice().forced() != kStream) {
    const char* err = nullptr;
    if (launch_distill_cluster(p, stream, &err)) {
      last_kernel = kCluster;
      return err;
    }
  }
  last_kernel = kStream;
  return dispatch_row_types(p, StreamLauncher{p, static_cast<cudaStream_t>(stream)});
}

}  // namespace flashkd::cuda
