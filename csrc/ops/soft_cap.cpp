// Glue of flashkd::soft_cap (csrc/cpu/isa/soft_cap.cpp says why it exists).
#include <ATen/Parallel.h>
#include "linear_loss.h"
#include "tensor_utils.h"
#include "../cpu/kernels.h"
#ifdef FLASHKD_WITH_CUDA
#include "../cuda/kernels.h"
#endif

namespace flashkd::ops {

at::Tensor soft_cap(const at::Tensor& z, double cap) {
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat, "z must be float32, got ", z.scalar_type());
  TORCH_CHECK_VALUE(cap > 0, "cap must be > 0, got ", num(cap));
  at::Tensor out = z.clone(at::MemoryFormat::Contiguous);
  const int64_t n = out.numel();
  if (n == 0) return out;
  float* data = out.data_ptr<float>();
  const float c = static_cast<float>(cap);  // the float32 cap the kernels hold (DistillParams::softcap)
  if (out.is_cuda()) {
    DeviceScope scope(out);
#ifdef FLASHKD_WITH_CUDA
    check_launch(cuda::soft_cap_values(data, n, c, scope.stream), "soft_cap CUDA kernel");
#endif
    return out;
  }
  at::parallel_for(0, n, 16384,
                   [&](int64_t begin, int64_t end) { cpu::soft_cap_values(data + begin, end - begin, c); });
  return out;
}

}  // namespace flashkd::ops
