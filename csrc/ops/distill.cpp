// Glue of the fused distillation loss: validates, fills DistillParams and runs
// the row kernel of the tensor's device. Shared by CPU and CUDA.
#include "distill.h"
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <cmath>
#include "../cpu/kernels.h"
#include "tensor_utils.h"
#ifdef FLASHKD_WITH_CUDA
#include "../cuda/kernels.h"
#endif

namespace flashkd::ops {
namespace {

Divergence parse_divergence(c10::string_view name) {
  if (name == "fkl") return Divergence::kFKL;
  if (name == "rkl") return Divergence::kRKL;
  if (name == "jsd") return Divergence::kJSD;
  if (name == "skl") return Divergence::kSKL;
  if (name == "srkl") return Divergence::kSRKL;
  if (name == "tvd") return Divergence::kTVD;
  if (name == "taid") return Divergence::kTAID;
  TORCH_CHECK_VALUE(false, "divergence must be one of fkl, rkl, jsd, skl, srkl, tvd, taid; got '",
                    std::string(name), "'");
}

DivergenceConsts make_consts(Divergence d, double beta, double alpha,
                             std::optional<double> taid_lambda) {
  DivergenceConsts k;
  auto set = [&](double wp) {
    k.w_p = static_cast<float>(wp);
    k.w_q = static_cast<float>(1.0 - wp);
    k.log_w_p = static_cast<float>(std::log(wp));
    k.log_w_q = static_cast<float>(std::log1p(-wp));
  };
  switch (d) {
    case Divergence::kJSD:
      TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "beta must be in (0, 1) for jsd, got ", num(beta),
                        "; at beta = 0 or 1 the JSD vanishes: use divergence='fkl' or 'rkl'");
      set(beta);
      break;
    case Divergence::kSKL:
    case Divergence::kSRKL:
      TORCH_CHECK_VALUE(alpha >= 0.0 && alpha < 1.0, "alpha must be in [0, 1) for skl/srkl, got ", num(alpha));
      set(d == Divergence::kSKL ? alpha : 1.0 - alpha);
      break;
    case Divergence::kTAID:
      TORCH_CHECK_VALUE(taid_lambda.has_value(), "taid_lambda is required for divergence='taid'");
      TORCH_CHECK_VALUE(*taid_lambda >= 0.0 && *taid_lambda <= 1.0, "taid_lambda must be in [0, 1], got ",
                        num(*taid_lambda));
      k.lambda = static_cast<float>(*taid_lambda);
      break;
    default:
      break;
  }
  return k;
}

}  // namespace

int64_t reduction_code(c10::string_view r) {
  if (r == "none") return 0;
  if (r == "sum") return 1;
  if (r == "mean" || r == "batchmean") return 2;
  TORCH_CHECK_VALUE(false, "reduction must be 'none', 'sum', 'mean' or 'batchmean', got '", std::string(r), "'");
}

void set_loss_options(DistillParams& p, c10::string_view divergence, double temperature, double beta, double alpha,
                      std::optional<double> taid_lambda, double hard_weight, double soft_weight, bool t2_scaling) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be > 0, got ", num(temperature));
  TORCH_CHECK_VALUE(std::isfinite(hard_weight) && hard_weight >= 0, "hard_weight must be finite and >= 0, got ",
                    num(hard_weight));
  TORCH_CHECK_VALUE(std::isfinite(soft_weight) && soft_weight >= 0, "soft_weight must be finite and >= 0, got ",
                    num(soft_weight));
  p.divergence = parse_divergence(divergence);
  p.consts = make_consts(p.divergence, beta, alpha, taid_lambda);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.hard_weight = static_cast<float>(hard_weight);
  p.soft_weight = static_cast<float>(soft_weight * (t2_scaling ? temperature * temperature : 1.0));
}

void run_distill_rows(const DistillParams& p, const at::Tensor& like) {
  if (p.rows == 0) return;
  if (like.is_cuda()) {
#ifdef FLASHKD_WITH_CUDA
    DeviceScope scope(like);
    check_launch(cuda::distill_rows(p, scope.stream), "distillation CUDA kernel");
#else
    DeviceScope scope(like);  // throws: built without CUDA
#endif
    return;
  }
  TORCH_CHECK_VALUE(like.is_cpu(), "logits must be CPU or CUDA tensors, got ", like.device());
  const int64_t grain = std::max<int64_t>(1, 16384 / p.vocab);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { cpu::distill_rows(p, begin, end); });
}

at::Tensor checked_labels(const std::optional<at::Tensor>& labels, at::IntArrayRef lead, int64_t rows,
                          int64_t vocab, int64_t ignore_index, const at::Device& device, const char* name) {
  if (!labels) return {};
  const at::Tensor& l = *labels;
  TORCH_CHECK_TYPE(at::isIntegralType(l.scalar_type(), /*includeBool=*/false),
                   name, " must be an integer tensor, got ", l.scalar_type());
  TORCH_CHECK_VALUE(l.sizes() == lead, name, " must have shape ", shape(lead),
                    " (the logits without their last dim), got ", shape(l.sizes()));
  TORCH_CHECK_VALUE(l.device() == device, name, " must be on ", device, ", got ", l.device());
  at::Tensor flat = l.to(at::kLong).contiguous().reshape({rows});
  if (rows > 0) {
    const at::Tensor bad = flat.ne(ignore_index).logical_and(flat.lt(0).logical_or(flat.ge(vocab)));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), name, " must be in [0, ", num(vocab),
                      ") or equal ignore_index=", num(ignore_index));
  }
  return flat;
}

at::Tensor checked_weights(const std::optional<at::Tensor>& weights, at::IntArrayRef lead, int64_t rows,
                           const at::Device& device) {
  if (!weights) return {};
  const at::Tensor& w = *weights;
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), "weights must be a float tensor, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.sizes() == lead, "weights must have shape ", shape(lead), ", got ", shape(w.sizes()));
  TORCH_CHECK_VALUE(w.device() == device, "weights must be on ", device, ", got ", w.device());
  at::Tensor flat = w.to(at::kFloat).contiguous().reshape({rows});
  if (rows > 0) TORCH_CHECK_VALUE(!flat.lt(0).any().item<bool>(), "weights must be >= 0");
  return flat;
}

// 1 / max(denominator, 1) as a float32 scalar on the logits' device, where the
// denominator is num_items or the count of tokens whose label is not ignored.
at::Tensor mean_scale(const at::Tensor& labels, int64_t rows, int64_t ignore_index,
                      std::optional<double> num_items, const at::TensorOptions& opts) {
  if (num_items) {
    TORCH_CHECK_VALUE(*num_items > 0, "num_items must be > 0, got ", num(*num_items));
    return at::full({}, 1.0 / *num_items, opts.dtype(at::kFloat));
  }
  at::Tensor count = labels.defined() ? labels.ne(ignore_index).sum().to(at::kFloat)
                                      : at::full({}, static_cast<double>(rows), opts.dtype(at::kFloat));
  return count.clamp_min(1.0).reciprocal();
}

DistillResult distill_forward(const at::Tensor& student_in, const at::Tensor& teacher_in,
                              const std::optional<at::Tensor>& labels_in,
                              const std::optional<at::Tensor>& weights_in, c10::string_view divergence,
                              double temperature, double beta, double alpha,
                              std::optional<double> taid_lambda, int64_t ignore_index, double hard_weight,
                              double soft_weight, bool t2_scaling, std::optional<int64_t> vocab_size,
                              c10::string_view reduction, std::optional<double> num_items,
                              bool return_stats, GradTarget grad_target) {
  TORCH_CHECK_VALUE(student_in.dim() >= 1, "student_logits must have at least 1 dim (..., V)");
  TORCH_CHECK_VALUE(teacher_in.sizes() == student_in.sizes(), "teacher_logits must have the shape of student_logits ",
                    shape(student_in.sizes()), ", got ", shape(teacher_in.sizes()));
  TORCH_CHECK_VALUE(teacher_in.device() == student_in.device(), "teacher_logits must be on the device of student_logits");
  const int64_t cols = student_in.size(-1);
  TORCH_CHECK_VALUE(cols >= 1, "student_logits must have a vocabulary dim of size >= 1");
  const int64_t vocab = vocab_size.value_or(cols);
  TORCH_CHECK_VALUE(vocab >= 1 && vocab <= cols, "vocab_size must be in [1, ", num(cols), "], got ", num(vocab));

  DistillParams p;
  set_loss_options(p, divergence, temperature, beta, alpha, taid_lambda, hard_weight, soft_weight, t2_scaling);
  TORCH_CHECK_VALUE(hard_weight == 0 || labels_in.has_value(), "hard_weight > 0 needs labels");
  const int64_t red = reduction_code(reduction);
  p.student_dtype = kernel_dtype(student_in, "student_logits");
  p.teacher_dtype = kernel_dtype(teacher_in, "teacher_logits");

  const at::Tensor student = describable(student_in);
  const at::Tensor teacher = describable(teacher_in);
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  const int64_t rows = student.numel() / cols;
  TORCH_CHECK_VALUE(rows < (int64_t(1) << 31), "flashkd supports fewer than 2^31 tokens per call");
  const at::Tensor labels = checked_labels(labels_in, lead, rows, vocab, ignore_index, student.device());
  const at::Tensor weights = checked_weights(weights_in, lead, rows, student.device());

  const auto fopts = student.options().dtype(at::kFloat);
  at::Tensor grad;
  if (grad_target == GradTarget::kStudent) grad = student_in;
  else if (grad_target == GradTarget::kNewBuffer)
    grad = new_output(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor loss_tok = new_output({rows}, fopts);
  at::Tensor stats = new_output({return_stats ? rows : 0, kNumStats}, fopts);
  at::Tensor agree = new_output({return_stats ? rows : 0}, student.options().dtype(at::kBool));
  const at::Tensor scale = red == 2 ? mean_scale(labels, rows, ignore_index, num_items, student.options())
                                    : at::Tensor();

  p.rows = rows;
  p.cols = cols;
  p.vocab = vocab;
  p.student = student.data_ptr();
  p.student_layout = *row_layout(student);
  p.teacher = teacher.data_ptr();
  p.teacher_layout = *row_layout(teacher);
  p.labels = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  p.weights = weights.defined() ? weights.data_ptr<float>() : nullptr;
  p.ignore_index = ignore_index;
  if (grad.defined()) {
    p.grad = grad.data_ptr();
    p.grad_layout = *row_layout(grad);
  }
  p.grad_scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
  p.loss = loss_tok.data_ptr<float>();
  p.stats = return_stats ? stats.data_ptr<float>() : nullptr;
  p.agree = return_stats ? agree.data_ptr<bool>() : nullptr;
  run_distill_rows(p, student);

  std::vector<int64_t> lead_v(lead.begin(), lead.end());
  at::Tensor loss;
  if (red == 0) loss = loss_tok.reshape(lead_v);
  else if (red == 1) loss = loss_tok.sum();
  else loss = loss_tok.sum() * scale;
  std::vector<int64_t> stats_shape = lead_v;
  stats_shape.push_back(kNumStats);
  if (return_stats) {
    stats = stats.reshape(stats_shape);
    agree = agree.reshape(lead_v);
  }
  return {loss, grad, stats, agree};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, c10::string_view divergence, double temperature, double beta,
    double alpha, std::optional<double> taid_lambda, int64_t ignore_index, double hard_weight, double soft_weight,
    bool t2_scaling, std::optional<int64_t> vocab_size, c10::string_view reduction, std::optional<double> num_items,
    bool return_stats) {
  DistillResult r = distill_forward(student, teacher, labels, weights, divergence, temperature, beta, alpha,
                                    taid_lambda, ignore_index, hard_weight, soft_weight, t2_scaling, vocab_size,
                                    reduction, num_items, return_stats, GradTarget::kNewBuffer);
  return {r.loss, r.grad, r.stats, r.agree};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_inplace(
    at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, c10::string_view divergence, double temperature, double beta,
    double alpha, std::optional<double> taid_lambda, int64_t ignore_index, double hard_weight, double soft_weight,
    bool t2_scaling, std::optional<int64_t> vocab_size, c10::string_view reduction, std::optional<double> num_items,
    bool return_stats) {
  TORCH_CHECK_VALUE(row_layout(student).has_value(),
                    "student_logits: inplace_backward needs strides flashkd can describe; pass a contiguous tensor");
  // Rows that share memory (an expand()) or a teacher in the same storage
  // would be read after the gradient has overwritten them.
  TORCH_CHECK_VALUE(at::has_internal_overlap(student) != at::MemOverlap::Yes,
                    "student_logits: inplace_backward needs a student whose elements do not share memory "
                    "(not an expand()); pass a contiguous copy");
  const at::MemOverlapStatus with_teacher = at::get_overlap_status(student, teacher);
  TORCH_CHECK_VALUE(with_teacher != at::MemOverlapStatus::Full && with_teacher != at::MemOverlapStatus::Partial,
                    "student_logits: inplace_backward cannot overwrite memory that teacher_logits also reads");
  DistillResult r = distill_forward(student, teacher, labels, weights, divergence, temperature, beta, alpha,
                                    taid_lambda, ignore_index, hard_weight, soft_weight, t2_scaling, vocab_size,
                                    reduction, num_items, return_stats, GradTarget::kStudent);
  return {r.loss, r.stats, r.agree};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_value(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, c10::string_view divergence, double temperature, double beta,
    double alpha, std::optional<double> taid_lambda, int64_t ignore_index, double hard_weight, double soft_weight,
    bool t2_scaling, std::optional<int64_t> vocab_size, c10::string_view reduction, std::optional<double> num_items,
    bool return_stats) {
  DistillResult r = distill_forward(student, teacher, labels, weights, divergence, temperature, beta, alpha,
                                    taid_lambda, ignore_index, hard_weight, soft_weight, t2_scaling, vocab_size,
                                    reduction, num_items, return_stats, GradTarget::kNone);
  return {r.loss, r.stats, r.agree};
}

std::vector<std::string> distill_cuda_kernel(c10::string_view force, bool reset) {
#ifdef FLASHKD_WITH_CUDA
  if (reset || !force.empty()) {
    const std::string name(force);  // empty: back to the environment's choice
    const char* err = cuda::set_distill_kernel(name.c_str());
    TORCH_CHECK_VALUE(err == nullptr, "distill_cuda_kernel('", name, "'): ", err ? err : "");
  }
  return {cuda::distill_kernel_choice(), cuda::last_distill_kernel()};
#else
  (void)force;
  (void)reset;
  return {"none", "none"};
#endif
}

}  // namespace flashkd::ops
