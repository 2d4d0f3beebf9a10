// Glue of top-k token pruning: flashkd::topk_tokens and its backward. Fake
// kernels and autograd are in python/flashkd/_tome_ops.py.
#include <ATen/Parallel.h>
#include <cstdint>
#include <torch/library.h>
#include "../cpu/tome_kernels.h"
#include "tensor_utils.h"
#ifdef FLASHKD_WITH_CUDA
#include "../cuda/tome_kernels.h"
#endif

namespace flashkd::ops {
namespace {

using at::Tensor;

TopkParams make_params(const Tensor& x, const Tensor& scores, int64_t keep, bool fuse_remainder, bool protect_first) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be 3-D (batch, tokens, channels), got shape ", shape(x.sizes()));
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == x.size(0) && scores.size(1) == x.size(1),
                    "scores must have shape (", num(x.size(0)), ", ", num(x.size(1)), "), got ", shape(scores.sizes()));
  TORCH_CHECK_VALUE(scores.device() == x.device(), "scores must be on the device of x");
  const int64_t min_keep = protect_first ? 2 : 1;
  TORCH_CHECK_VALUE(keep >= min_keep && keep <= x.size(1), "keep must be in [", num(min_keep), ", ", num(x.size(1)),
                    "] (the number of tokens), got ", num(keep));
  TopkParams p;
  p.dtype = kernel_dtype(x, "x");
  p.scores_dtype = kernel_dtype(scores, "scores");
  p.batch = x.size(0);
  p.tokens = x.size(1);
  p.cols = x.size(2);
  p.keep = keep;
  p.fuse_remainder = fuse_remainder;
  p.protect_first = protect_first;
  return p;
}

void run(const TopkParams& p, bool backward, const Tensor& like) {
  if (p.batch == 0) return;
  if (like.is_cuda()) {
#ifdef FLASHKD_WITH_CUDA
    DeviceScope scope(like);
    TORCH_CHECK_VALUE(p.tokens <= INT32_MAX, "x has ", num(p.tokens), " tokens; the CUDA kernels take at most 2^31 - 1");
    const Tensor scratch =
        at::empty({static_cast<int64_t>(cuda::topk_scratch_bytes(p))}, like.options().dtype(at::kByte));
    check_launch(backward ? cuda::topk_tokens_backward(p, scratch.data_ptr(), scope.stream)
                          : cuda::topk_tokens(p, scratch.data_ptr(), scope.stream),
                 backward ? "topk_tokens_backward CUDA kernel" : "topk_tokens CUDA kernel");
#else
    DeviceScope scope(like);  // throws: built without CUDA
#endif
    return;
  }
  at::parallel_for(0, p.batch, 1, [&](int64_t b, int64_t e) {
    backward ? cpu::topk_tokens_backward(p, b, e) : cpu::topk_tokens(p, b, e);
  });
}

std::tuple<Tensor, Tensor> topk_tokens(const Tensor& x_in, const Tensor& scores_in, int64_t keep, bool fuse_remainder,
                                       bool protect_first) {
  TopkParams p = make_params(x_in, scores_in, keep, fuse_remainder, protect_first);
  const Tensor x = x_in.contiguous(), scores = scores_in.contiguous();
  Tensor out = new_output({p.batch, keep + (fuse_remainder ? 1 : 0), p.cols}, x.options());
  Tensor index = new_output({p.batch, keep}, x.options().dtype(at::kLong));
  p.x = x.data_ptr();
  p.scores = scores.data_ptr();
  p.out = out.data_ptr();
  p.index = index.data_ptr<int64_t>();
  run(p, false, x);
  return {out, index};
}

std::tuple<Tensor, Tensor> topk_tokens_backward(const Tensor& grad_out, const Tensor& x_in, const Tensor& scores_in,
                                                const Tensor& out, const Tensor& index_in, bool fuse_remainder,
                                                bool protect_first, bool scores_grad) {
  TopkParams p = make_params(x_in, scores_in, index_in.dim() == 2 ? index_in.size(1) : -1, fuse_remainder,
                             protect_first);
  const std::vector<int64_t> out_shape{p.batch, p.keep + (fuse_remainder ? 1 : 0), p.cols};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == grad_out.sizes(),
                    "grad_out and out must have shape ", shape(out_shape));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x_in.scalar_type() && out.scalar_type() == x_in.scalar_type(),
                   "grad_out and out must have the dtype of x");
  TORCH_CHECK_TYPE(index_in.scalar_type() == at::kLong && index_in.size(0) == p.batch, "index must be int64 (batch, keep)");
  TORCH_CHECK_VALUE(grad_out.device() == x_in.device() && out.device() == x_in.device() &&
                        index_in.device() == x_in.device(),
                    "grad_out, out and index must be on the device of x");
  const Tensor x = x_in.contiguous(), scores = scores_in.contiguous(), g = grad_out.contiguous(),
               y = out.contiguous(), index = index_in.contiguous();
  Tensor grad_x = new_output(x.sizes(), x.options());
  const bool want_scores = scores_grad && fuse_remainder;
  Tensor grad_scores = want_scores ? new_output(scores.sizes(), scores.options()) : at::empty({0}, scores.options());
  p.x = x.data_ptr();
  p.scores = scores.data_ptr();
  p.out = const_cast<void*>(y.data_ptr());
  p.index = const_cast<int64_t*>(index.data_ptr<int64_t>());
  p.grad_out = g.data_ptr();
  p.grad_x = grad_x.data_ptr();
  p.grad_scores = want_scores ? grad_scores.data_ptr() : nullptr;
  run(p, true, x);
  return {grad_x, grad_scores};
}

}  // namespace
}  // namespace flashkd::ops

TORCH_LIBRARY_FRAGMENT(flashkd, m) {
  m.def("topk_tokens(Tensor x, Tensor scores, SymInt keep, bool fuse_remainder, bool protect_first) "
        "-> (Tensor out, Tensor index)");
  m.def("topk_tokens_backward(Tensor grad_out, Tensor x, Tensor scores, Tensor out, Tensor index, "
        "bool fuse_remainder, bool protect_first, bool scores_grad) -> (Tensor grad_x, Tensor grad_scores)");
}

TORCH_LIBRARY_IMPL(flashkd, CPU, m) {
  m.impl("topk_tokens", &flashkd::ops::topk_tokens);
  m.impl("topk_tokens_backward", &flashkd::ops::topk_tokens_backward);
}
#ifdef FLASHKD_WITH_CUDA
TORCH_LIBRARY_IMPL(flashkd, CUDA, m) {
  m.impl("topk_tokens", &flashkd::ops::topk_tokens);
  m.impl("topk_tokens_backward", &flashkd::ops::topk_tokens_backward);
}
#endif
