// Shared-memory barriers (mbarrier) of sm_90, which the copy engine's bulk
// copies complete on: a barrier's phase ends when `count` arrivals and the
// bytes announced with arrive_expect have all landed. Used by the cluster
// distillation kernel (bulk row copies) and the int8 wgmma GEMM (tensor-map
// tile copies, and the consumers' "stage free" arrivals). Only compiled
// for sm_90 and later; the callers guard their use the same way.
#pragma once
#include <cstdint>
#include "device_utils.cuh"

namespace flashkd::cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes the initialized barriers visible to the bulk copies (async proxy)
// and to the other blocks of a cluster.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One arrival, plus `bytes` of copies that the phase now also waits for.
__device__ __forceinline__ void mbarrier_arrive_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// One plain arrival (release: this thread's earlier accesses happen before
// whatever the waiter does next).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Waits until the phase of parity `parity` has completed. A fresh barrier
// is in phase 0, so waiting for parity 0 waits for its first completion.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n\t.reg .pred ready;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, ready;\n\t}"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace flashkd::cuda
