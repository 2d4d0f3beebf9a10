// The Hopper distillation kernel (distill_cluster.cu), as distill_kernel.cu
// sees it.
#pragma once
#include "flashkd/distill_params.h"

namespace flashkd::cuda {

// Whether the runtime loads the sm_90 build of the cluster kernel here.
bool cluster_kernel_available();

// Launches the cluster kernel on `stream` when it suits p on the current
// device and returns true (*err: the launch error or nullptr); returns false,
// launching nothing, when it does not (no sm_90 build, strided or unaligned
// rows, slices too long for shared memory).
bool launch_distill_cluster(const DistillParams& p, void* stream, const char** err);

}  // namespace flashkd::cuda
