// Glue of flashkd::scale_rows_, the backward of every fused loss: the gradient
// is computed in forward, so backward only multiplies it by grad_output.
#include "distill.h"
#include "tensor_utils.h"
#include <ATen/Parallel.h>
#include "../cpu/kernels.h"
#ifdef FLASHKD_WITH_CUDA
#include "../cuda/kernels.h"
#endif

namespace flashkd::ops {

void scale_rows(at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK_VALUE(grad.dim() >= 1, "grad must have at least 1 dim");
  const int64_t cols = grad.size(-1);
  const int64_t rows = cols == 0 ? 0 : grad.numel() / cols;
  const bool per_row = factor.dim() > 0;
  TORCH_CHECK_VALUE(!per_row || factor.numel() == rows, "factor must be 0-d or have one entry per row (", num(rows),
                    "), got ", shape(factor.sizes()));
  TORCH_CHECK_VALUE(factor.device() == grad.device(), "factor must be on the device of grad");
  if (rows == 0) return;
  const auto layout = row_layout(grad);
  TORCH_CHECK_VALUE(layout.has_value(), "grad: strides not supported by scale_rows_");
  const at::Tensor f = factor.to(at::kFloat).contiguous();
  const DType dtype = kernel_dtype(grad, "grad");
  if (grad.is_cuda()) {
#ifdef FLASHKD_WITH_CUDA
    DeviceScope scope(grad);
    check_launch(cuda::scale_rows(grad.data_ptr(), dtype, *layout, rows, cols, f.data_ptr<float>(), per_row,
                                  scope.stream),
                 "scale_rows_ CUDA kernel");
#else
    DeviceScope scope(grad);  // throws: built without CUDA
#endif
    return;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
    cpu::scale_rows(grad.data_ptr(), dtype, *layout, begin, end, cols, f.data_ptr<float>(), per_row);
  });
}

}  // namespace flashkd::ops
