#pragma once
#include <ATen/ATen.h>
#include "flashkd/distill_params.h"

namespace flashkd::ops {

struct DistillResult {
  at::Tensor loss, grad, stats, agree;
};

// Validated labels as contiguous int64 [rows] (undefined when absent).
at::Tensor checked_labels(const std::optional<at::Tensor>& labels, at::IntArrayRef lead, int64_t rows,
                          int64_t vocab, int64_t ignore_index, const at::Device& device,
                          const char* name = "labels");
// Validated token weights as contiguous float32 [rows] (undefined when absent).
at::Tensor checked_weights(const std::optional<at::Tensor>& weights, at::IntArrayRef lead, int64_t rows,
                           const at::Device& device);
// "none" -> 0, "sum" -> 1, "mean"/"batchmean" -> 2; anything else is a ValueError.
int64_t reduction_code(c10::string_view reduction);

// Validates the loss options shared by every distillation op and stores them in `p`.
void set_loss_options(DistillParams& p, c10::string_view divergence, double temperature, double beta, double alpha,
                      std::optional<double> taid_lambda, double hard_weight, double soft_weight, bool t2_scaling);

// Runs the row kernel of `like`'s device over p.rows rows.
void run_distill_rows(const DistillParams& p, const at::Tensor& like);

// Scale that turns a token sum into the mean (see DESIGN.md §2 "Reduction").
at::Tensor mean_scale(const at::Tensor& labels, int64_t rows, int64_t ignore_index,
                      std::optional<double> num_items, const at::TensorOptions& opts);

// flashkd::distill_loss: (loss, grad of loss w.r.t. student logits, stats, agree).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distill_loss(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, c10::string_view divergence, double temperature, double beta,
    double alpha, std::optional<double> taid_lambda, int64_t ignore_index, double hard_weight, double soft_weight,
    bool t2_scaling, std::optional<int64_t> vocab_size, c10::string_view reduction, std::optional<double> num_items,
    bool return_stats);

// flashkd::distill_loss_: the same, writing the gradient into `student`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_inplace(
    at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, c10::string_view divergence, double temperature, double beta,
    double alpha, std::optional<double> taid_lambda, int64_t ignore_index, double hard_weight, double soft_weight,
    bool t2_scaling, std::optional<int64_t> vocab_size, c10::string_view reduction, std::optional<double> num_items,
    bool return_stats);

// flashkd::distill_loss_value: the loss and stats alone, for calls that need
// no gradient (evaluation, a student that does not require grad): no [.., V]
// buffer is allocated and the gradient sweep is skipped.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_loss_value(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& weights, c10::string_view divergence, double temperature, double beta,
    double alpha, std::optional<double> taid_lambda, int64_t ignore_index, double hard_weight, double soft_weight,
    bool t2_scaling, std::optional<int64_t> vocab_size, c10::string_view reduction, std::optional<double> num_items,
    bool return_stats);

// flashkd::distill_cuda_kernel: [preference, last launched]. The preference
// ("auto", "stream" or "cluster") changes when `force` is non-empty; reset=True
// with no `force` goes back to the choice of FLASHKD_DISTILL_KERNEL (auto
// without it). The second is the kernel the last CUDA call ran ("auto" before
// any; "none" for both without CUDA kernels).
std::vector<std::string> distill_cuda_kernel(c10::string_view force, bool reset);

// flashkd::scale_rows_: grad[row] *= factor (0-d, or one factor per row).
void scale_rows(at::Tensor& grad, const at::Tensor& factor);

// Where distill_forward puts the gradient: a new buffer, the student logits
// themselves, or nowhere (loss only; DistillResult::grad is undefined).
enum class GradTarget { kNewBuffer, kStudent, kNone };

DistillResult distill_forward(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& weights,
                              c10::string_view divergence, double temperature, double beta, double alpha,
                              std::optional<double> taid_lambda, int64_t ignore_index, double hard_weight,
                              double soft_weight, bool t2_scaling, std::optional<int64_t> vocab_size,
                              c10::string_view reduction, std::optional<double> num_items, bool return_stats,
                              GradTarget grad_target);

}  // namespace flashkd::ops
