// Fused linear losses (DESIGN.md §3): cut cross-entropy and linear
// distillation. Tokens are walked in chunks whose logits fit a memory budget;
// per chunk, ATen GEMMs (cuBLAS / CPU BLAS) make the logits, the distillation
// row kernel turns them into loss and d(logits) in place, and two more GEMMs
// fold d(logits) into d(hidden) and d(weight). No [N, V] tensor ever exists.
#include "linear_loss.h"
#include <cmath>
#include "distill.h"
#include "head_gemm.h"
#include "tensor_utils.h"

namespace flashkd::ops {
namespace {

enum GradMask : int64_t { kGradHidden = 1, kGradWeight = 2, kGradBias = 4 };

int64_t default_budget(const at::Tensor& t) { return t.is_cuda() ? (int64_t(512) << 20) : (int64_t(32) << 20); }

// (N, D) view of (..., D) hidden states; reshape copies only when no view exists.
at::Tensor matrix_of(const at::Tensor& h) { return h.reshape({-1, h.size(-1)}); }

void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const char* hname, const char* wname, const char* bname) {
  TORCH_CHECK_VALUE(hidden.dim() >= 1, hname, " must have shape (..., D)");
  TORCH_CHECK_VALUE(weight.dim() == 2, wname, " must be 2-D (V, D), got ", weight.dim(), " dims");
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(-1), wname, " has D=", num(weight.size(1)), " but ", hname,
                    " has D=", num(hidden.size(-1)));
  TORCH_CHECK_VALUE(hidden.size(-1) >= 1, hname, " must have a hidden size D >= 1, got shape ",
                    shape(hidden.sizes()));
  TORCH_CHECK_VALUE(weight.size(0) >= 1, wname, " must have at least one row (a vocabulary V >= 1), got shape ",
                    shape(weight.sizes()));
  kernel_dtype(hidden, hname);  // first: an integer hidden is the error to name, not the mismatch
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), wname, " dtype ", weight.scalar_type(),
                   " differs from ", hname, " dtype ", hidden.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), wname, " must be on the device of ", hname);
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), bname, " must have shape (",
                      num(weight.size(0)), ",), got ", shape(bias->sizes()));
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), bname, " must have the dtype of ", hname);
    TORCH_CHECK_VALUE(bias->device() == hidden.device(), bname, " must be on the device of ", hname);
  }
}

}  // namespace

LinearLossResult linear_loss(const at::Tensor& hidden_in, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& t_hidden_in,
                             const std::optional<at::Tensor>& t_weight, const std::optional<at::Tensor>& t_bias,
                             const std::optional<at::Tensor>& t_logits, const std::optional<at::Tensor>& labels_in,
                             const std::optional<at::Tensor>& weights_in, c10::string_view divergence,
                             double temperature, double beta, double alpha, std::optional<double> taid_lambda,
                             int64_t ignore_index, double hard_weight, double soft_weight, bool t2_scaling,
                             std::optional<int64_t> vocab_size, double label_smoothing, double z_loss,
                             std::optional<double> softcap, c10::string_view reduction,
                             std::optional<double> num_items, bool return_stats, bool return_lse,
                             int64_t grad_mask, const std::optional<at::Tensor>& row_scale_in,
                             std::optional<int64_t> chunk_budget_bytes, bool float32_weight_grad) {
  const bool teacher_from_weights = t_hidden_in.has_value() || t_weight.has_value();
  const bool has_teacher = teacher_from_weights || t_logits.has_value();
  // Errors name the arguments as the caller wrote them: without a teacher this
  // op is linear_cross_entropy (hidden, weight, bias, targets), with one
  // linear_distill_loss (student_hidden, student_weight, student_bias, labels).
  // The Python layer (linear.py) follows the same rule.
  const char* labels_name = has_teacher ? "labels" : "targets";
  check_linear(hidden_in, weight, bias, has_teacher ? "student_hidden" : "hidden",
               has_teacher ? "student_weight" : "weight", has_teacher ? "student_bias" : "bias");
  TORCH_CHECK_VALUE(!(teacher_from_weights && t_logits.has_value()),
                    "give the teacher either as teacher_hidden + teacher_weight or as teacher_logits, not both");
  if (teacher_from_weights) {
    TORCH_CHECK_VALUE(t_hidden_in.has_value() && t_weight.has_value(),
                      "teacher_hidden and teacher_weight must be given together");
    check_linear(*t_hidden_in, *t_weight, t_bias, "teacher_hidden", "teacher_weight", "teacher_bias");
  }
  TORCH_CHECK_VALUE(has_teacher || soft_weight == 0 || hard_weight > 0,
                    "a loss without teacher needs hard_weight > 0");

  const at::Tensor hidden = matrix_of(hidden_in);
  const int64_t rows = hidden.size(0), V = weight.size(0);
  const auto lead = hidden_in.sizes().slice(0, hidden_in.dim() - 1);
  const int64_t vocab = vocab_size.value_or(V);
  TORCH_CHECK_VALUE(vocab >= 1 && vocab <= V, "vocab_size must be in [1, ", num(V), "], got ", num(vocab));
  at::Tensor t_hidden, t_w;
  if (teacher_from_weights) {
    TORCH_CHECK_VALUE(t_hidden_in->sizes().slice(0, t_hidden_in->dim() - 1) == lead,
                      "teacher_hidden must have the leading shape ", shape(lead), " of student_hidden, got ",
                      shape(t_hidden_in->sizes()));
    TORCH_CHECK_VALUE(t_weight->size(0) >= V, "teacher_weight has a vocabulary of ", num(t_weight->size(0)),
                      ", smaller than the student's ", num(V));
    TORCH_CHECK_VALUE(t_hidden_in->device() == hidden.device(),
                      "teacher_hidden must be on the device of student_hidden");
    t_hidden = matrix_of(*t_hidden_in);
    t_w = t_weight->narrow(0, 0, V);
  }
  at::Tensor t_logits2d;
  if (t_logits) {
    TORCH_CHECK_VALUE(t_logits->dim() >= 1 && t_logits->sizes().slice(0, t_logits->dim() - 1) == lead,
                      "teacher_logits must have shape ", shape(lead), " + (V_teacher,), got ",
                      shape(t_logits->sizes()));
    TORCH_CHECK_VALUE(t_logits->size(-1) >= V, "teacher_logits has a vocabulary of ", num(t_logits->size(-1)),
                      ", smaller than the student's ", num(V));
    TORCH_CHECK_TYPE(at::isFloatingType(t_logits->scalar_type()), "teacher_logits must be a float tensor");
    TORCH_CHECK_VALUE(t_logits->device() == hidden.device(),
                      "teacher_logits must be on the device of student_hidden");
    t_logits2d = matrix_of(*t_logits).narrow(1, 0, V);
  }

  DistillParams p;
  set_loss_options(p, divergence, temperature, beta, alpha, taid_lambda, hard_weight, soft_weight, t2_scaling);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, "label_smoothing must be in [0, 1], got ",
                    num(label_smoothing));
  TORCH_CHECK_VALUE(std::isfinite(z_loss) && z_loss >= 0, "z_loss must be >= 0, got ", num(z_loss));
  TORCH_CHECK_VALUE(!softcap || *softcap > 0, "softcap must be > 0, got ", num(softcap.value_or(0.0)));
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  p.softcap = static_cast<float>(softcap.value_or(0.0));
  const int64_t red = reduction_code(reduction);
  const at::Tensor labels =
      checked_labels(labels_in, lead, rows, vocab, ignore_index, hidden.device(), labels_name);
  const at::Tensor weights = checked_weights(weights_in, lead, rows, hidden.device());
  TORCH_CHECK_VALUE(hard_weight == 0 || labels.defined(), "hard_weight > 0 needs ", labels_name);
  at::Tensor row_scale;
  if (row_scale_in) {
    TORCH_CHECK_VALUE(row_scale_in->numel() == rows, "row_scale must have one entry per token");
    row_scale = row_scale_in->to(at::kFloat).contiguous().reshape({rows});
  }

  const auto fopts = hidden.options().dtype(at::kFloat);
  const at::Tensor scale = red == 2 ? mean_scale(labels, rows, ignore_index, num_items, hidden.options())
                                    : at::Tensor();
  at::Tensor loss_tok = new_output({rows}, fopts);
  at::Tensor lse = new_output({return_lse ? rows : 0}, fopts);
  at::Tensor stats = new_output({return_stats ? rows : 0, kNumStats}, fopts);
  at::Tensor agree = new_output({return_stats ? rows : 0}, hidden.options().dtype(at::kBool));
  const bool want_dh = grad_mask & kGradHidden, want_dw = grad_mask & kGradWeight;
  const bool want_db = (grad_mask & kGradBias) && bias.has_value();
  // d(hidden) is allocated in the caller's shape (not returned as a view: backward scales it in place).
  at::Tensor dhidden_out = want_dh ? new_output(hidden_in.sizes(), hidden.options()) : at::Tensor();
  at::Tensor dhidden = want_dh ? dhidden_out.view({rows, hidden.size(1)}) : at::Tensor();
  // d(weight) and d(bias) accumulate over chunks in float32; d(weight) in its
  // own dtype if asked (float32_weight_grad=false): for a 16-bit weight that
  // drops the float32 copy, twice the gradient's size (cut-cross-entropy's
  // way), at the price of one rounding per chunk.
  const auto dweight_opts = float32_weight_grad ? fopts : hidden.options();
  // Written by the first chunk (zeros where there is none).
  at::Tensor dweight_acc = want_dw ? new_output({V, hidden.size(1)}, dweight_opts) : at::Tensor();
  at::Tensor dbias_acc = want_db ? new_output({V}, fopts) : at::Tensor();
  if (rows == 0) {
    if (want_dw) dweight_acc.zero_();
    if (want_db) dbias_acc.zero_();
  }

  // On some CPUs a 16-bit head runs its GEMMs in float32 (head_gemm.h): its
  // logits are then float32, and each chunk also holds float32 copies of the
  // hidden states (and of d(hidden)), each head a float32 weight panel.
  const bool head_f32 = cpu_gemm_in_float32(hidden);
  const bool convert_teacher = t_logits && t_logits2d.scalar_type() == at::kDouble;
  const bool teacher_f32 = teacher_from_weights && cpu_gemm_in_float32(t_hidden);
  const int64_t student_logit_bytes = head_f32 ? 4 : hidden.element_size();
  const int64_t teacher_logit_bytes = teacher_from_weights ? (teacher_f32 ? 4 : t_hidden.element_size())
                                      : convert_teacher    ? 4
                                                           : 0;
  // Rows per chunk: the student's logits, a computed teacher's, and float64
  // teacher logits converted to float32 (the row kernel reads 16/32-bit
  // floats; a 2-D view always has a row layout it can read), and the float32
  // copies above, fit the budget.
  const int64_t student_row_bytes = V * student_logit_bytes;
  const int64_t row_bytes = student_row_bytes + V * teacher_logit_bytes +
                            (head_f32 ? 4 * hidden.size(1) * (want_dh ? 2 : 1) : 0) +
                            (teacher_f32 ? 4 * t_hidden.size(1) : 0);
  // A float32 head's weight panel takes a quarter of the budget (shared by
  // two such heads), the chunk the rest.
  const bool panels = head_f32 || teacher_f32;
  // The default gives the student's logits default_budget() and whatever else
  // a chunk holds its share in proportion, so both losses chunk alike, and
  // puts the panels' quarter on top.
  const int64_t default_chunk_bytes = default_budget(hidden) * row_bytes / student_row_bytes;
  const int64_t budget = chunk_budget_bytes.value_or(panels ? default_chunk_bytes / 3 * 4 : default_chunk_bytes);
  TORCH_CHECK_VALUE(budget > 0, "chunk_budget_bytes must be > 0, got ", num(budget));
  const int64_t panel_bytes = panels ? budget / 4 : 0;
  const int64_t chunk_bytes = budget - panel_bytes;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(rows, chunk_bytes / std::max<int64_t>(row_bytes, 1)));
  HeadGemm student_head(weight, bias, head_f32, teacher_f32 ? panel_bytes / 2 : panel_bytes);
  std::optional<HeadGemm> teacher_head;
  if (teacher_from_weights) {
    std::optional<at::Tensor> tb;
    if (t_bias) tb = t_bias->narrow(0, 0, V);
    teacher_head.emplace(t_w, tb, teacher_f32, head_f32 ? panel_bytes / 2 : panel_bytes);
  }
  // One buffer per logit matrix, reused by every chunk (the last one is
  // shorter): no allocation, and on the CPU no fresh pages, per chunk.
  at::Tensor logits_buf = new_output({rows ? chunk : 0, V}, hidden.options().dtype(student_head.logits_dtype()));
  at::Tensor teacher_buf =
      teacher_from_weights ? new_output({rows ? chunk : 0, V}, t_hidden.options().dtype(teacher_head->logits_dtype()))
      : convert_teacher   ? new_output({rows ? chunk : 0, V}, hidden.options().dtype(at::kFloat))
                          : at::Tensor();

  p.cols = V;
  p.vocab = vocab;
  p.ignore_index = ignore_index;
  p.grad_scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
  p.student_dtype = kernel_dtype(logits_buf, "hidden");
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    const at::Tensor h = hidden.narrow(0, r0, n);
    at::Tensor logits = logits_buf.narrow(0, 0, n);
    student_head.forward(logits, h);
    at::Tensor tlog;
    if (teacher_from_weights) {
      tlog = teacher_buf.narrow(0, 0, n);
      teacher_head->forward(tlog, t_hidden.narrow(0, r0, n));
    } else if (convert_teacher) {
      tlog = teacher_buf.narrow(0, 0, n).copy_(t_logits2d.narrow(0, r0, n));
    } else if (t_logits) {
      tlog = t_logits2d.narrow(0, r0, n);
    }
    p.rows = n;
    p.student = logits.data_ptr();
    p.student_layout = *row_layout(logits);
    p.grad = want_dh || want_dw || want_db ? logits.data_ptr() : nullptr;  // d(logits) overwrite the logits
    p.grad_layout = p.student_layout;
    p.teacher = tlog.defined() ? tlog.data_ptr() : nullptr;
    if (tlog.defined()) {
      p.teacher_dtype = kernel_dtype(tlog, "teacher_logits");
      p.teacher_layout = *row_layout(tlog);
    }
    p.labels = labels.defined() ? labels.data_ptr<int64_t>() + r0 : nullptr;
    p.weights = weights.defined() ? weights.data_ptr<float>() + r0 : nullptr;
    p.row_scale = row_scale.defined() ? row_scale.data_ptr<float>() + r0 : nullptr;
    p.loss = loss_tok.data_ptr<float>() + r0;
    p.lse = return_lse ? lse.data_ptr<float>() + r0 : nullptr;
    p.stats = return_stats ? stats.data_ptr<float>() + r0 * kNumStats : nullptr;
    p.agree = return_stats ? agree.data_ptr<bool>() + r0 : nullptr;
    run_distill_rows(p, logits);
    student_head.backward(logits, want_dh ? dhidden.narrow(0, r0, n) : at::Tensor(),
                          want_dw ? dweight_acc : at::Tensor(), r0 == 0);
    if (want_db) {
      if (r0 == 0) at::sum_out(dbias_acc, logits, 0, false, at::kFloat);
      else dbias_acc.add_(logits.sum(0, false, at::kFloat));
    }
  }
  // Freed before d(weight) is converted to its dtype below, the moment both
  // its float32 sum and the result are held (Gemma-2-2B's head in bf16 on a
  // GPU: 2.4 GB + 1.2 GB, and 0.5 GB of chunk buffers).
  logits_buf.reset();
  teacher_buf.reset();

  std::vector<int64_t> lead_v(lead.begin(), lead.end());
  LinearLossResult out;
  if (red == 0) out.loss = loss_tok.reshape(lead_v);
  else if (red == 1) out.loss = loss_tok.sum();
  else out.loss = loss_tok.sum() * scale;
  // Outputs never alias each other: an absent gradient is its own empty tensor.
  out.dhidden = want_dh ? dhidden_out : hidden.new_empty({0});
  out.dweight = want_dw ? dweight_acc.to(weight.scalar_type()) : hidden.new_empty({0});
  out.dbias = want_db ? dbias_acc.to(bias->scalar_type()) : hidden.new_empty({0});
  out.lse = return_lse ? lse.reshape(lead_v) : lse;
  std::vector<int64_t> stats_shape = lead_v;
  stats_shape.push_back(kNumStats);
  out.stats = return_stats ? stats.reshape(stats_shape) : stats;
  out.agree = return_stats ? agree.reshape(lead_v) : agree;
  return out;
}

}  // namespace flashkd::ops
