// The whole op surface of flashkd, registered once. Fake (meta) kernels and
// autograd formulas live in python/flashkd/_ops.py.
#include <torch/library.h>
#include "ops/distill.h"
#include "ops/head_gemm.h"
#include "ops/linear_loss.h"
#include "ops/tensor_utils.h"
#include "cpu/kernels.h"

namespace {

// Which CPU instruction set the kernels use; `force` ("avx2", "avx512", or
// "" for auto-detection) changes it when non-empty or reset is true.
std::string cpu_isa(c10::string_view force, bool reset) {
  if (reset || !force.empty()) flashkd::cpu::set_isa(std::string(force).c_str());
  return flashkd::cpu::isa();
}

bool has_cuda_kernels() { return flashkd::ops::cuda_compiled(); }

// Whether the linear losses run a CPU head of this dtype in float32 (head_gemm.h).
bool cpu_16bit_gemm_in_float32(at::ScalarType dtype) {
  return flashkd::ops::cpu_gemm_in_float32(at::empty({0}, at::TensorOptions().dtype(dtype)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_loss_op(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& t_hidden, const std::optional<at::Tensor>& t_weight,
    const std::optional<at::Tensor>& t_bias, const std::optional<at::Tensor>& t_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights, c10::string_view divergence,
    double temperature, double beta, double alpha, std::optional<double> taid_lambda, int64_t ignore_index,
    double hard_weight, double soft_weight, bool t2_scaling, std::optional<int64_t> vocab_size,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    std::optional<double> num_items, bool return_stats, bool return_lse, int64_t grad_mask,
    const std::optional<at::Tensor>& row_scale, std::optional<int64_t> chunk_budget_bytes,
    bool float32_weight_grad) {
  auto r = flashkd::ops::linear_loss(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, labels, weights,
                                     divergence, temperature, beta, alpha, taid_lambda, ignore_index, hard_weight,
                                     soft_weight, t2_scaling, vocab_size, label_smoothing, z_loss, softcap,
                                     reduction, num_items, return_stats, return_lse, grad_mask, row_scale,
                                     chunk_budget_bytes, float32_weight_grad);
  return {r.loss, r.dhidden, r.dweight, r.dbias, r.lse, r.stats, r.agree};
}

}  // namespace

TORCH_LIBRARY(flashkd, m) {
  m.def(
      "distill_loss(Tensor student, Tensor teacher, Tensor? labels, Tensor? weights, str divergence, "
      "float temperature, float beta, float alpha, float? taid_lambda, int ignore_index, float hard_weight, "
      "float soft_weight, bool t2_scaling, int? vocab_size, str reduction, float? num_items, bool return_stats) "
      "-> (Tensor loss, Tensor grad, Tensor stats, Tensor agree)");
  m.def(
      "distill_loss_(Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor? weights, str divergence, "
      "float temperature, float beta, float alpha, float? taid_lambda, int ignore_index, float hard_weight, "
      "float soft_weight, bool t2_scaling, int? vocab_size, str reduction, float? num_items, bool return_stats) "
      "-> (Tensor loss, Tensor stats, Tensor agree)");
  m.def(
      "distill_loss_value(Tensor student, Tensor teacher, Tensor? labels, Tensor? weights, str divergence, "
      "float temperature, float beta, float alpha, float? taid_lambda, int ignore_index, float hard_weight, "
      "float soft_weight, bool t2_scaling, int? vocab_size, str reduction, float? num_items, bool return_stats) "
      "-> (Tensor loss, Tensor stats, Tensor agree)");
  m.def("scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
  m.def("soft_cap(Tensor z, float cap) -> Tensor");
  m.def(
      "linear_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_hidden, Tensor? teacher_weight, "
      "Tensor? teacher_bias, Tensor? teacher_logits, Tensor? labels, Tensor? weights, str divergence, "
      "float temperature, float beta, float alpha, float? taid_lambda, int ignore_index, float hard_weight, "
      "float soft_weight, bool t2_scaling, int? vocab_size, float label_smoothing, float z_loss, float? softcap, "
      "str reduction, float? num_items, bool return_stats, bool return_lse, int grad_mask, Tensor? row_scale, "
      "int? chunk_budget_bytes, bool float32_weight_grad) "
      "-> (Tensor loss, Tensor dhidden, Tensor dweight, Tensor dbias, Tensor lse, Tensor stats, Tensor agree)");
  m.def("cpu_isa(str force=\"\", bool reset=False) -> str", &cpu_isa);
  m.def("cpu_16bit_gemm(str force=\"\", bool reset=False) -> str", &flashkd::ops::cpu_16bit_gemm);
  m.def("cpu_16bit_gemm_in_float32(ScalarType dtype) -> bool", &cpu_16bit_gemm_in_float32);
  m.def("has_cuda_kernels() -> bool", &has_cuda_kernels);
  m.def("distill_cuda_kernel(str force=\"\", bool reset=False) -> str[]", &flashkd::ops::distill_cuda_kernel);
}

TORCH_LIBRARY_IMPL(flashkd, CPU, m) {
  m.impl("distill_loss", &flashkd::ops::distill_loss);
  m.impl("distill_loss_", &flashkd::ops::distill_loss_inplace);
  m.impl("distill_loss_value", &flashkd::ops::distill_loss_value);
  m.impl("scale_rows_", &flashkd::ops::scale_rows);
  m.impl("soft_cap", &flashkd::ops::soft_cap);
  m.impl("linear_loss", &linear_loss_op);
}

#ifdef FLASHKD_WITH_CUDA
TORCH_LIBRARY_IMPL(flashkd, CUDA, m) {
  m.impl("distill_loss", &flashkd::ops::distill_loss);
  m.impl("distill_loss_", &flashkd::ops::distill_loss_inplace);
  m.impl("distill_loss_value", &flashkd::ops::distill_loss_value);
  m.impl("scale_rows_", &flashkd::ops::scale_rows);
  m.impl("soft_cap", &flashkd::ops::soft_cap);
  m.impl("linear_loss", &linear_loss_op);
}
#endif
