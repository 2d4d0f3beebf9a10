#include "head_gemm.h"
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include "tensor_utils.h"

namespace flashkd::ops {
namespace {

enum class Cpu16BitGemm { kAuto, kFloat32, kNative };

Cpu16BitGemm parse_choice(const std::string& name) {
  if (name.empty() || name == "auto") return Cpu16BitGemm::kAuto;
  if (name == "float32") return Cpu16BitGemm::kFloat32;
  TORCH_CHECK_VALUE(name == "native", "CPU 16-bit GEMM must be auto, float32 or native, got '", name, "'");
  return Cpu16BitGemm::kNative;
}

NamedChoice<Cpu16BitGemm>& choice() {
  static NamedChoice<Cpu16BitGemm> c{"FLASHKD_CPU_16BIT_GEMM", parse_choice};
  return c;
}

const char* choice_name(Cpu16BitGemm c) {
  switch (c) {
    case Cpu16BitGemm::kFloat32: return "float32";
    case Cpu16BitGemm::kNative: return "native";
    default: return "auto";
  }
}

// ATen's own test of whether oneDNN multiplies this 16-bit dtype on this CPU
// (torch.ops.mkldnn._is_mkldnn_bf16_supported / _fp16_); false where torch
// has no such op.
bool aten_onednn_supports(at::ScalarType dtype) {
  static const auto ask = [](const char* name) {
    const auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, ""));
    return op.has_value() && op->typed<bool()>().call();
  };
  static const bool bf16 = ask("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = ask("mkldnn::_is_mkldnn_fp16_supported");
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  return dtype == at::kBFloat16 ? bf16 : fp16;
}

// acc = a @ b (`first`: acc is overwritten, not read) or acc += a @ b; acc
// float32 or a's dtype, each product summed in float32 by the GEMM, then
// added to acc (rounded once into a 16-bit acc).
void accumulate_mm(const at::Tensor& acc_in, const at::Tensor& a, const at::Tensor& b, bool first) {
  at::Tensor acc = acc_in;
  if (acc.scalar_type() == a.scalar_type()) {
    if (first) at::mm_out(acc, a, b);
    else acc.addmm_(a, b);
  } else if (a.is_cuda()) {
    at::addmm_out(acc, acc, a, b, at::kFloat, /*beta=*/first ? 0 : 1);  // cuBLAS, float32 output
  } else {
    // CPU ATen has no float32-output GEMM for 16-bit inputs: multiply slices
    // of a's rows, so that the 16-bit product temporary stays small (not the
    // size of the whole gradient), and add each slice in float32.
    constexpr int64_t kSliceRows = 4096;
    for (int64_t r0 = 0; r0 < a.size(0); r0 += kSliceRows) {
      const int64_t rows = std::min(kSliceRows, a.size(0) - r0);
      at::Tensor slice = acc.narrow(0, r0, rows);
      const at::Tensor product = at::mm(a.narrow(0, r0, rows), b);
      if (first) slice.copy_(product);
      else slice.add_(product);
    }
  }
}

}  // namespace

bool cpu_gemm_in_float32(const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  if (!t.device().is_cpu() || (dtype != at::kBFloat16 && dtype != at::kHalf)) return false;
  switch (choice().get()) {
    case Cpu16BitGemm::kFloat32: return true;
    case Cpu16BitGemm::kNative: return false;
    default: return !aten_onednn_supports(dtype);
  }
}

std::string cpu_16bit_gemm(c10::string_view force, bool reset) {
  choice().update(force, reset);
  return choice_name(choice().get());
}

HeadGemm::HeadGemm(const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool in_float32,
                   int64_t panel_bytes)
    : weight_(weight), bias_(bias), in_float32_(in_float32) {
  if (!in_float32_) return;
  const int64_t V = weight.size(0), D = weight.size(1);
  panel_rows_ = D == 0 ? V : std::clamp<int64_t>(panel_bytes / (4 * D), 1, V);
  panel_ = new_output({panel_rows_, D}, weight.options().dtype(at::kFloat));
}

at::Tensor HeadGemm::weight_panel(int64_t v0, int64_t rows) {
  at::Tensor panel = panel_.narrow(0, 0, rows);
  if (held_v0_ != v0) {  // a panel's rows follow from where it starts
    panel.copy_(weight_.narrow(0, v0, rows));
    held_v0_ = v0;
  }
  return panel;
}

void HeadGemm::forward(const at::Tensor& out_in, const at::Tensor& h) {
  at::Tensor out = out_in;
  if (!in_float32_) {
    h_ = h;
    if (bias_) at::addmm_out(out, *bias_, h, weight_.t());
    else at::mm_out(out, h, weight_.t());
    return;
  }
  const auto fopts = h.options().dtype(at::kFloat);
  if (!h_buffer_.defined()) h_buffer_ = new_output({h.size(0), h.size(1)}, fopts);
  h_ = h_buffer_.narrow(0, 0, h.size(0)).copy_(h);
  const int64_t V = weight_.size(0);
  for (int64_t v0 = 0; v0 < V; v0 += panel_rows_) {
    const int64_t rows = std::min(panel_rows_, V - v0);
    const at::Tensor w = weight_panel(v0, rows);
    at::Tensor o = out.narrow(1, v0, rows);  // row stride V: BLAS writes it in place
    if (bias_) at::addmm_out(o, bias_->narrow(0, v0, rows).to(at::kFloat), h_, w.t());
    else at::mm_out(o, h_, w.t());
  }
}

void HeadGemm::backward(const at::Tensor& dlogits, const at::Tensor& dh_in, const at::Tensor& dweight_acc,
                        bool first) {
  at::Tensor dh = dh_in;
  if (!in_float32_) {
    if (dh.defined()) at::mm_out(dh, dlogits, weight_);
    if (dweight_acc.defined()) accumulate_mm(dweight_acc, dlogits.t(), h_, first);
    return;
  }
  at::Tensor dh32;
  if (dh.defined()) {
    if (!dh_buffer_.defined()) dh_buffer_ = new_output({h_buffer_.size(0), h_buffer_.size(1)}, h_.options());
    dh32 = dh_buffer_.narrow(0, 0, dh.size(0));
  }
  // Last panel first: the one forward converted last is still held.
  const int64_t V = weight_.size(0);
  const int64_t last = (V - 1) / panel_rows_ * panel_rows_;
  for (int64_t v0 = last; v0 >= 0; v0 -= panel_rows_) {
    const int64_t rows = std::min(panel_rows_, V - v0);
    const at::Tensor g = dlogits.narrow(1, v0, rows);
    if (dh.defined()) {
      if (v0 == last) at::mm_out(dh32, g, weight_panel(v0, rows));
      else dh32.addmm_(g, weight_panel(v0, rows));
    }
    if (!dweight_acc.defined()) continue;
    const at::Tensor acc = dweight_acc.narrow(0, v0, rows);
    if (acc.scalar_type() == at::kFloat) {
      accumulate_mm(acc, g.t(), h_, first);
    } else {
      // A 16-bit sum (float32_weight_grad=false): the float32 product goes
      // through the panel buffer, which the weight rows no longer need, and
      // is rounded once into the sum.
      at::Tensor product = panel_.narrow(0, 0, rows);
      at::mm_out(product, g.t(), h_);
      held_v0_ = -1;
      if (first) acc.copy_(product);
      else acc.add_(product);
    }
  }
  if (dh.defined()) dh.copy_(dh32);
}

}  // namespace flashkd::ops
