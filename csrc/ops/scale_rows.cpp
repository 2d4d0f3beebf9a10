// Glue of flashkd::scale_rows_, the backward of every fused loss: the gradient
// is computed in forward, so backward only multiplies it by grad_output.
#include "distill.h"
#include "tensor_utils.h"
#ifdef FLASHKD_WITH_CUDA
#include "../cuda/kernels.h"
#endif

namespace flashkd::ops {

void scale_rows(at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK_VALUE(grad.dim() >= 1, "grad must have at least 1 dim");
  const int64_t cols = grad.size(-1);
  const int64_t rows = cols == 0 ? 0 : grad.numel() / cols;
  const bool per_row = factor.dim() > 0;
  TORCH_CHECK_VALUE(!per_row || factor.numel() == rows, "factor must be 0-d or have one entry per row (", rows,
                    "), got ", factor.sizes());
  TORCH_CHECK_VALUE(factor.device() == grad.device(), "factor must be on the device of grad");
  if (rows == 0) return;
  if (grad.is_cuda()) {
#ifdef FLASHKD_WITH_CUDA
    const auto layout = row_layout(grad);
    TORCH_CHECK_VALUE(layout.has_value(), "grad: strides not supported by scale_rows_");
    const at::Tensor f = factor.to(at::kFloat).contiguous();
    DeviceScope scope(grad);
    check_launch(cuda::scale_rows(grad.data_ptr(), kernel_dtype(grad, "grad"), *layout, rows, cols,
                                  f.data_ptr<float>(), per_row, scope.stream),
                 "scale_rows_ CUDA kernel");
    return;
#endif
  }
  // CPU: the factor is host memory, so skipping the common factor of one is free.
  if (!per_row) {
    if (factor.item<double>() != 1.0) grad.mul_(factor.to(grad.scalar_type()));
    return;
  }
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end() - 1);
  shape.push_back(1);
  grad.mul_(factor.to(grad.scalar_type()).reshape(shape));
}

}  // namespace flashkd::ops
