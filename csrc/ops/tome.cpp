// Glue of the token-merging (ToMe) ops: validates, fills the torch-free
// descriptors and runs the kernels of the tensor's device. Registers
// flashkd::tome_plan, tome_merge(_backward), tome_merge_wavg(_backward) and
// tome_unmerge; fake kernels and autograd are in python/flashkd/_tome_ops.py.
//
// The plan's index tensors must come from tome_plan for a metric with the
// same number of tokens as x: they are trusted (checking their values would
// cost a device synchronization), only their shapes are checked.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include "../cpu/tome_kernels.h"
#include "tensor_utils.h"
#ifdef FLASHKD_WITH_CUDA
#include "../cuda/tome_kernels.h"
#endif

namespace flashkd::ops {
namespace {

using at::Tensor;

MergeMode parse_mode(c10::string_view mode) {
  if (mode == "sum") return MergeMode::kSum;
  if (mode == "mean") return MergeMode::kMean;
  if (mode == "amax") return MergeMode::kAmax;
  TORCH_CHECK_VALUE(false, "mode must be 'mean', 'sum' or 'amax', got '", std::string(mode), "'");
}

// t as a contiguous (batch, tokens, channels) tensor, or a clear error.
Tensor contiguous_3d(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must be 3-D (batch, tokens, channels), got shape ", shape(t.sizes()));
  return t.contiguous();
}

void check_index(const Tensor& t, const char* name, int64_t batch, const Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == batch, name, " must be (batch=", num(batch), ", n), got shape ",
                    shape(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the device of x");
}

// The plan of (batch, tokens) from its index tensors; x_tokens is checked to fit.
MergePlan make_plan(const Tensor& unm, const Tensor& src, const Tensor& dst, int64_t batch, int64_t tokens,
                    bool distill, const Tensor& like) {
  check_index(unm, "unm_idx", batch, like);
  check_index(src, "src_idx", batch, like);
  check_index(dst, "dst_idx", batch, like);
  TORCH_CHECK_VALUE(dst.size(1) == src.size(1), "dst_idx must have as many columns as src_idx (",
                    num(src.size(1)), "), got ", num(dst.size(1)));
  MergePlan p;
  p.batch = batch;
  p.tokens = tokens;
  p.n_unm = unm.size(1);
  p.r = src.size(1);
  p.distill = distill;
  TORCH_CHECK_VALUE(p.n_unm + p.r == p.n_a(), "unm_idx and src_idx must together cover the ", num(p.n_a()),
                    " even tokens of ", num(tokens), " tokens, got ", num(p.n_unm), " + ", num(p.r));
  TORCH_CHECK_VALUE(p.r <= p.n_b(), "src_idx: at most ", num(p.n_b()), " tokens can merge into ", num(p.n_b()),
                    " destinations, got ", num(p.r));
  // The distill-token output order places B row 0 after the first kept A row.
  TORCH_CHECK_VALUE(!distill || p.n_b() == 0 || p.n_unm >= 1,
                    "unm_idx: a merge with distill_token needs at least one kept even token, got none");
  return p;
}

struct Indices {
  Tensor unm, src, dst;
  Indices(const Tensor& u, const Tensor& s, const Tensor& d) : unm(u.contiguous()), src(s.contiguous()), dst(d.contiguous()) {}
  void bind(MergePlan& p) const {
    p.unm = unm.data_ptr<int64_t>();
    p.src = src.data_ptr<int64_t>();
    p.dst = dst.data_ptr<int64_t>();
  }
};

void run_merge(const MergePlan& p, const MergeTensors& t, bool backward, const Tensor& like) {
  const int64_t units = p.batch * p.n_out();
  if (units == 0) return;
  if (like.is_cuda()) {
#ifdef FLASHKD_WITH_CUDA
    DeviceScope scope(like);
    check_launch(backward ? cuda::tome_merge_backward(p, t, scope.stream) : cuda::tome_merge(p, t, scope.stream),
                 backward ? "tome_merge_backward CUDA kernel" : "tome_merge CUDA kernel");
#else
    DeviceScope scope(like);  // throws: built without CUDA
#endif
    return;
  }
  at::parallel_for(0, units, std::max<int64_t>(1, 8192 / std::max<int64_t>(t.cols, 1)), [&](int64_t b, int64_t e) {
    backward ? cpu::tome_merge_backward(p, t, b, e) : cpu::tome_merge(p, t, b, e);
  });
}

std::tuple<Tensor, Tensor, Tensor> tome_plan(const Tensor& metric_in, int64_t r, bool class_token, bool distill_token) {
  const Tensor metric = contiguous_3d(metric_in, "metric");
  const DType dtype = kernel_dtype(metric, "metric");
  const int64_t batch = metric.size(0), tokens = metric.size(1);
  TORCH_CHECK_VALUE(metric.size(2) > 0, "metric must have at least one channel, got shape ", shape(metric.sizes()));
  const int64_t cap = tome_max_r(tokens, class_token, distill_token);
  TORCH_CHECK_VALUE(r >= 0 && r <= cap, "r must be in [0, ", num(cap), "] for ", num(tokens),
                    " tokens (cap it first), got ", num(r));
  PlanParams p;
  p.metric = metric.data_ptr();
  p.dtype = dtype;
  p.batch = batch;
  p.tokens = tokens;
  p.cols = metric.size(2);
  p.r = r;
  p.class_token = class_token;
  p.distill_token = distill_token;
  const int64_t n_a = (tokens + 1) / 2;
  const auto opts = metric.options().dtype(at::kLong);
  Tensor unm = new_output({batch, n_a - r}, opts), src = new_output({batch, r}, opts), dst = new_output({batch, r}, opts);
  p.unm = unm.data_ptr<int64_t>();
  p.src = src.data_ptr<int64_t>();
  p.dst = dst.data_ptr<int64_t>();
  if (batch == 0 || n_a == 0) return {unm, src, dst};
  if (metric.is_cuda()) {
#ifdef FLASHKD_WITH_CUDA
    DeviceScope scope(metric);
    Tensor scratch = at::empty({static_cast<int64_t>(cuda::tome_plan_scratch_bytes(p))}, metric.options().dtype(at::kByte));
    check_launch(cuda::tome_plan(p, scratch.data_ptr(), scope.stream), "tome_plan CUDA kernel");
#else
    DeviceScope scope(metric);  // throws: built without CUDA
#endif
  } else {
    at::parallel_for(0, batch, 1, [&](int64_t b, int64_t e) { cpu::tome_plan(p, b, e); });
  }
  return {unm, src, dst};
}

MergeTensors merge_tensors(const Tensor& x, MergeMode mode) {
  MergeTensors t;
  t.mode = mode;
  t.dtype = kernel_dtype(x, "x");
  t.cols = x.size(2);
  return t;
}

Tensor tome_merge(const Tensor& x_in, const Tensor& unm, const Tensor& src, const Tensor& dst, c10::string_view mode,
                  bool distill_token) {
  const Tensor x = contiguous_3d(x_in, "x");
  MergeTensors t = merge_tensors(x, parse_mode(mode));
  MergePlan p = make_plan(unm, src, dst, x.size(0), x.size(1), distill_token, x);
  const Indices idx(unm, src, dst);
  idx.bind(p);
  Tensor out = new_output({p.batch, p.n_out(), t.cols}, x.options());
  t.x = x.data_ptr();
  t.out = out.data_ptr();
  run_merge(p, t, false, x);
  return out;
}

// A merge backward's grad_out and saved out: the merged shape, x's dtype.
void check_merged_grad(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                       const std::vector<int64_t>& out_shape) {
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == grad_out.sizes(),
                    "grad_out and out must have the merged shape ", shape(out_shape));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
                   "grad_out and out must have the dtype of x");
  TORCH_CHECK_VALUE(grad_out.device() == x.device() && out.device() == x.device(),
                    "grad_out and out must be on the device of x");
}

Tensor tome_merge_backward(const Tensor& grad_out, const Tensor& x_in, const Tensor& out, const Tensor& unm,
                           const Tensor& src, const Tensor& dst, c10::string_view mode, bool distill_token) {
  const Tensor x = contiguous_3d(x_in, "x");
  MergeTensors t = merge_tensors(x, parse_mode(mode));
  MergePlan p = make_plan(unm, src, dst, x.size(0), x.size(1), distill_token, x);
  const Indices idx(unm, src, dst);
  idx.bind(p);
  check_merged_grad(grad_out, out, x, {p.batch, p.n_out(), t.cols});
  const Tensor g = grad_out.contiguous(), y = out.contiguous();
  Tensor grad_x = new_output(x.sizes(), x.options());
  t.x = x.data_ptr();
  t.out = const_cast<void*>(y.data_ptr());
  t.grad_out = g.data_ptr();
  t.grad_x = grad_x.data_ptr();
  run_merge(p, t, true, x);
  return grad_x;
}

// size: (batch, tokens, 1) in the dtype of x, or absent (all ones).
std::optional<Tensor> checked_size(const std::optional<Tensor>& size, const Tensor& x, const char* name,
                                   int64_t tokens) {
  if (!size.has_value()) return std::nullopt;
  const Tensor& s = *size;
  TORCH_CHECK_VALUE(s.dim() == 3 && s.size(0) == x.size(0) && s.size(1) == tokens && s.size(2) == 1, name,
                    " must have shape (", num(x.size(0)), ", ", num(tokens), ", 1), got ", shape(s.sizes()));
  TORCH_CHECK_TYPE(s.scalar_type() == x.scalar_type(), name, " must have the dtype of x");
  TORCH_CHECK_VALUE(s.device() == x.device(), name, " must be on the device of x");
  return s.contiguous();
}

// What the size-weighted merge and its backward both check and set up: x
// contiguous, the plan bound to its index tensors, the optional token sizes.
struct WeightedMerge {
  Tensor x;
  MergeTensors t;
  MergePlan p;
  Indices idx;
  std::optional<Tensor> size;

  WeightedMerge(const Tensor& x_in, const std::optional<Tensor>& size_in, const Tensor& unm, const Tensor& src,
                const Tensor& dst, bool distill_token)
      : x(contiguous_3d(x_in, "x")),
        t(merge_tensors(x, MergeMode::kWeighted)),
        p(make_plan(unm, src, dst, x.size(0), x.size(1), distill_token, x)),
        idx(unm, src, dst),
        size(checked_size(size_in, x, "size", p.tokens)) {
    idx.bind(p);
    t.x = x.data_ptr();
    t.size = size ? size->data_ptr() : nullptr;
  }
};

std::tuple<Tensor, Tensor> tome_merge_wavg(const Tensor& x_in, const std::optional<Tensor>& size_in, const Tensor& unm,
                                           const Tensor& src, const Tensor& dst, bool distill_token) {
  WeightedMerge w(x_in, size_in, unm, src, dst, distill_token);
  const Tensor& x = w.x;
  MergeTensors& t = w.t;
  const MergePlan& p = w.p;
  Tensor out = new_output({p.batch, p.n_out(), t.cols}, x.options());
  Tensor size_out = new_output({p.batch, p.n_out(), 1}, x.options());
  t.out = out.data_ptr();
  t.size_out = size_out.data_ptr();
  run_merge(p, t, false, x);
  return {out, size_out};
}

std::tuple<Tensor, Tensor> tome_merge_wavg_backward(const Tensor& grad_out, const std::optional<Tensor>& grad_size_out,
                                                    const Tensor& x_in, const std::optional<Tensor>& size_in,
                                                    const Tensor& out, const Tensor& size_out, const Tensor& unm,
                                                    const Tensor& src, const Tensor& dst, bool distill_token,
                                                    bool size_grad) {
  WeightedMerge w(x_in, size_in, unm, src, dst, distill_token);
  const Tensor& x = w.x;
  MergeTensors& t = w.t;
  const MergePlan& p = w.p;
  const auto size_o = checked_size(size_out, x, "size_out", p.n_out());
  const auto g_size = checked_size(grad_size_out, x, "grad_size_out", p.n_out());
  check_merged_grad(grad_out, out, x, {p.batch, p.n_out(), t.cols});
  const Tensor g = grad_out.contiguous(), y = out.contiguous();
  Tensor grad_x = new_output(x.sizes(), x.options());
  Tensor grad_size = size_grad ? new_output({p.batch, p.tokens, 1}, x.options()) : at::empty({0}, x.options());
  t.out = const_cast<void*>(y.data_ptr());
  t.size_out = const_cast<void*>(size_o->data_ptr());
  t.grad_out = g.data_ptr();
  t.grad_size_out = g_size ? g_size->data_ptr() : nullptr;
  t.grad_x = grad_x.data_ptr();
  t.grad_size = size_grad ? grad_size.data_ptr() : nullptr;
  run_merge(p, t, true, x);
  return {grad_x, grad_size};
}

Tensor tome_unmerge(const Tensor& x_in, const Tensor& unm, const Tensor& src, const Tensor& dst, int64_t tokens) {
  const Tensor x = contiguous_3d(x_in, "x");
  const DType dtype = kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(tokens >= 0, "tokens must be >= 0, got ", num(tokens));
  MergePlan p = make_plan(unm, src, dst, x.size(0), tokens, false, x);
  TORCH_CHECK_VALUE(x.size(1) == p.n_out(), "x must have ", num(p.n_out()), " merged tokens for this plan, got ",
                    num(x.size(1)));
  const Indices idx(unm, src, dst);
  idx.bind(p);
  const int64_t cols = x.size(2);
  Tensor out = new_output({p.batch, tokens, cols}, x.options());
  const int64_t units = p.batch * tokens;
  if (units == 0 || cols == 0) return out;
  if (x.is_cuda()) {
#ifdef FLASHKD_WITH_CUDA
    DeviceScope scope(x);
    check_launch(cuda::tome_unmerge(p, x.data_ptr(), dtype, cols, out.data_ptr(), scope.stream),
                 "tome_unmerge CUDA kernel");
#else
    DeviceScope scope(x);  // throws: built without CUDA
#endif
  } else {
    at::parallel_for(0, units, std::max<int64_t>(1, 16384 / cols), [&](int64_t b, int64_t e) {
      cpu::tome_unmerge(p, x.data_ptr(), dtype, cols, out.data_ptr(), b, e);
    });
  }
  return out;
}

}  // namespace
}  // namespace flashkd::ops

TORCH_LIBRARY_FRAGMENT(flashkd, m) {
  m.def("tome_plan(Tensor metric, SymInt r, bool class_token, bool distill_token) "
        "-> (Tensor unm_idx, Tensor src_idx, Tensor dst_idx)");
  m.def("tome_merge(Tensor x, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, str mode, bool distill_token) -> Tensor");
  m.def("tome_merge_backward(Tensor grad_out, Tensor x, Tensor out, Tensor unm_idx, Tensor src_idx, "
        "Tensor dst_idx, str mode, bool distill_token) -> Tensor");
  m.def("tome_merge_wavg(Tensor x, Tensor? size, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, "
        "bool distill_token) -> (Tensor out, Tensor size_out)");
  m.def("tome_merge_wavg_backward(Tensor grad_out, Tensor? grad_size_out, Tensor x, Tensor? size, Tensor out, "
        "Tensor size_out, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, bool distill_token, bool size_grad) "
        "-> (Tensor grad_x, Tensor grad_size)");
  m.def("tome_unmerge(Tensor x, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, SymInt tokens) -> Tensor");
}

#define FKD_TOME_IMPLS(m)                                                        \
  m.impl("tome_plan", &flashkd::ops::tome_plan);                                 \
  m.impl("tome_merge", &flashkd::ops::tome_merge);                               \
  m.impl("tome_merge_backward", &flashkd::ops::tome_merge_backward);             \
  m.impl("tome_merge_wavg", &flashkd::ops::tome_merge_wavg);                     \
  m.impl("tome_merge_wavg_backward", &flashkd::ops::tome_merge_wavg_backward);   \
  m.impl("tome_unmerge", &flashkd::ops::tome_unmerge)

TORCH_LIBRARY_IMPL(flashkd, CPU, m) { FKD_TOME_IMPLS(m); }
#ifdef FLASHKD_WITH_CUDA
TORCH_LIBRARY_IMPL(flashkd, CUDA, m) { FKD_TOME_IMPLS(m); }
#endif
