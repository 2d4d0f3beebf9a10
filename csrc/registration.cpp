// The whole op surface of flashkd, registered once. Fake (meta) kernels and
// autograd formulas live in python/flashkd/_ops.py.
#include <torch/library.h>
#include "ops/distill.h"
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
  m.def("scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
  m.def("cpu_isa(str force=\"\", bool reset=False) -> str", &cpu_isa);
  m.def("has_cuda_kernels() -> bool", &has_cuda_kernels);
}

TORCH_LIBRARY_IMPL(flashkd, CPU, m) {
  m.impl("distill_loss", &flashkd::ops::distill_loss);
  m.impl("distill_loss_", &flashkd::ops::distill_loss_inplace);
  m.impl("scale_rows_", &flashkd::ops::scale_rows);
}

#ifdef FLASHKD_WITH_CUDA
TORCH_LIBRARY_IMPL(flashkd, CUDA, m) {
  m.impl("distill_loss", &flashkd::ops::distill_loss);
  m.impl("distill_loss_", &flashkd::ops::distill_loss_inplace);
  m.impl("scale_rows_", &flashkd::ops::scale_rows);
}
#endif
