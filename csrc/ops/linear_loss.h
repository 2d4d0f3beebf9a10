#pragma once
#include <ATen/ATen.h>

namespace flashkd::ops {

struct LinearLossResult {
  at::Tensor loss, dhidden, dweight, dbias, lse, stats, agree;
};

// flashkd::linear_loss: student head (hidden @ weight.T + bias), optional
// teacher (its head, or its logits), distillation + cross-entropy, computed
// chunk by chunk with gradients made during forward (grad_mask: 1 hidden,
// 2 weight, 4 bias). `row_scale` multiplies each token's gradient (the
// backward of reduction="none" recomputes with row_scale = grad_output).
// d(weight) is summed over the chunks in float32, or with
// float32_weight_grad=false in the weight's own dtype.
LinearLossResult linear_loss(const at::Tensor& hidden, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& t_hidden,
                             const std::optional<at::Tensor>& t_weight, const std::optional<at::Tensor>& t_bias,
                             const std::optional<at::Tensor>& t_logits, const std::optional<at::Tensor>& labels,
                             const std::optional<at::Tensor>& weights, c10::string_view divergence,
                             double temperature, double beta, double alpha, std::optional<double> taid_lambda,
                             int64_t ignore_index, double hard_weight, double soft_weight, bool t2_scaling,
                             std::optional<int64_t> vocab_size, double label_smoothing, double z_loss,
                             std::optional<double> softcap, c10::string_view reduction,
                             std::optional<double> num_items, bool return_stats, bool return_lse,
                             int64_t grad_mask, const std::optional<at::Tensor>& row_scale,
                             std::optional<int64_t> chunk_budget_bytes, bool float32_weight_grad);

// flashkd::soft_cap: cap * tanh(z / cap) of float32 logits, as the row kernels
// cap them (the LSE backward recomputes the capped logits with it).
at::Tensor soft_cap(const at::Tensor& z, double cap);

}  // namespace flashkd::ops
