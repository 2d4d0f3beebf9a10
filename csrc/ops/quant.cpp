// Glue of the quantized matmuls (issue #6): checks, output allocation, and
// the CPU GEMMs (quant_cpu_gemm.cpp) or CUDA kernels of flashkd/quant_params.h.
// Schemas are registered at the bottom of this file; fake kernels, autograd
// and the Python API live in python/flashkd/quant/.
//
//   quantize_int8_rows(x) -> (q, scale)          per-token int8 activations
//   quantize_weight(w, scheme, group_size, per_tensor) -> (q, scale, zero)
//                                                weight codes, unpacked
//   int8_linear(a, w, a_scale?, w_scale?, bias?, out_dtype?)
//   ternary_linear(a, w_packed, a_scale?, w_scale?, bias?, out_dtype?)
//   int4_linear(x, w_packed, scale, zero, group_size, bias?)
//
// The int8 and ternary ops return the exact int32 accumulators when a_scale
// is None (then w_scale, bias and out_dtype must be None too), else the
// dequantized (..., N) output in out_dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "quant_cpu_gemm.h"
#include "tensor_utils.h"
#include "../cpu/quant_kernels.h"
#ifdef FLASHKD_WITH_CUDA
#include "../cuda/quant_kernels.h"
#endif

namespace flashkd::ops {
namespace {

using quant::GemmEpilogue;

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name);
}

// (..., K) -> contiguous (M, K) view or copy.
at::Tensor as_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " must have at least 1 dim, got a 0-d tensor");
  int64_t rows = 1;  // not reshape(-1, K): that is ambiguous when K == 0
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)}).contiguous();
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = n;
  return s;
}

void check_weight_2d(const at::Tensor& w, at::ScalarType dtype, const char* name, const char* dtype_name) {
  TORCH_CHECK_TYPE(w.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2, name, " must be 2-D (out_features, packed in_features), got shape ",
                    shape(w.sizes()));
}

// Checks the epilogue's inputs and points `epi` at them and at the output.
at::Tensor setup_epilogue(GemmEpilogue& epi, const at::Tensor& a, int64_t M, int64_t N,
                          const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& w_scale,
                          const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype,
                          std::vector<at::Tensor>& keep) {
  const auto shape_out = out_shape(a, N);
  epi = GemmEpilogue{};
  epi.ldo = N;
  if (!a_scale) {
    TORCH_CHECK_VALUE(!w_scale && !bias && !out_dtype,
                      "w_scale, bias and out_dtype must be None when a_scale is None (int32 accumulator output)");
    at::Tensor out = new_output(shape_out, a.options().dtype(at::kInt));
    epi.out_int32 = out.data_ptr<int32_t>();
    return out;
  }
  TORCH_CHECK_VALUE(w_scale.has_value(), "w_scale is required when a_scale is given");
  TORCH_CHECK_VALUE(out_dtype.has_value(), "out_dtype is required when a_scale is given");
  TORCH_CHECK_TYPE(a_scale->scalar_type() == at::kFloat, "a_scale must be float32, got ", a_scale->scalar_type());
  TORCH_CHECK_VALUE(a_scale->numel() == M, "a_scale must have one entry per row of a (", num(M), "), got shape ",
                    shape(a_scale->sizes()));
  TORCH_CHECK_TYPE(w_scale->scalar_type() == at::kFloat, "w_scale must be float32, got ", w_scale->scalar_type());
  TORCH_CHECK_VALUE(w_scale->dim() <= 1 && (w_scale->numel() == N || w_scale->numel() == 1),
                    "w_scale must have shape [out_features] (", num(N), ") or [1], got ", shape(w_scale->sizes()));
  check_device(*a_scale, a, "a_scale", "a");
  check_device(*w_scale, a, "w_scale", "a");
  keep.push_back(a_scale->contiguous());
  keep.push_back(w_scale->contiguous());
  epi.a_scale = keep[keep.size() - 2].data_ptr<float>();
  epi.w_scale = keep.back().data_ptr<float>();
  epi.w_scale_per_row = w_scale->numel() != 1;  // N == 1: both forms read entry 0
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [out_features] (", num(N),
                      "), got ", shape(bias->sizes()));
    check_device(*bias, a, "bias", "a");
    keep.push_back(bias->contiguous());
    epi.bias = keep.back().data_ptr();
    epi.bias_dtype = kernel_dtype(keep.back(), "bias");
  }
  at::Tensor out = new_output(shape_out, a.options().dtype(*out_dtype));
  epi.out_dtype = kernel_dtype(out, "out_dtype");
  epi.out = out.data_ptr();
  return out;
}

// The int4 weight groups of rows of K values: (count, width), after checking
// group_size. A group as wide as the row or wider is one group of width K
// (the CUDA kernels index with 32-bit group widths; K + group_size could overflow).
std::pair<int64_t, int64_t> weight_groups(int64_t K, int64_t group_size) {
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be >= 1, got ", num(group_size));
  const int64_t width = std::min(group_size, std::max<int64_t>(K, 1));
  return {std::max<int64_t>(1, (K + width - 1) / width), width};
}

void check_activations_int8(const at::Tensor& a) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kChar, "a must be int8 (quantized activations), got ", a.scalar_type());
}

#ifdef FLASHKD_WITH_CUDA
const char* cuda_gemm(const quant::Int8GemmArgs& args, void* stream) { return cuda::int8_gemm(args, stream); }
const char* cuda_gemm(const quant::TernaryGemmArgs& args, void* stream) { return cuda::ternary_gemm(args, stream); }
#endif

// int8 activations a2 (M, K) times checked weights (args without the
// epilogue): sets up the epilogue's output, then runs the GEMM on a's device,
// on the CPU by `cpu_gemm(args)`.
template <typename Args, class CpuGemm>
at::Tensor integer_linear(Args args, const at::Tensor& a, CpuGemm&& cpu_gemm,
                          const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& w_scale,
                          const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype,
                          const char* what) {
  std::vector<at::Tensor> keep;  // contiguous scales and bias the epilogue points into
  at::Tensor out = setup_epilogue(args.epi, a, args.M, args.N, a_scale, w_scale, bias, out_dtype, keep);
  if (args.M == 0 || args.N == 0) return out;
  if (a.is_cuda()) {
    DeviceScope scope(a);
#ifdef FLASHKD_WITH_CUDA
    check_launch(cuda_gemm(args, scope.stream), what);
#endif
    return out;
  }
  cpu_gemm(args);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_int8_rows(const at::Tensor& x) {
  const DType dtype = kernel_dtype(x, "x");
  const at::Tensor rows = as_rows(x, "x");
  const int64_t M = rows.size(0), K = rows.size(1);
  at::Tensor q = new_output(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = new_output(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  const quant::QuantizeRowsArgs args{rows.data_ptr(), dtype, K, M, K, q.data_ptr<int8_t>(), scale.data_ptr<float>()};
  if (x.is_cuda()) {
    DeviceScope scope(x);
#ifdef FLASHKD_WITH_CUDA
    check_launch(cuda::quantize_rows_int8(args, scope.stream), "quantize_int8_rows CUDA kernel");
#endif
    return {q, scale};
  }
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) { cpu::quantize_rows_int8(args, begin, end); });
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_weight(const at::Tensor& w, c10::string_view scheme,
                                                               int64_t group_size, bool per_tensor) {
  const DType dtype = kernel_dtype(w, "weight");
  TORCH_CHECK_VALUE(w.dim() == 2, "weight must be 2-D [out_features, in_features], got shape ", shape(w.sizes()));
  quant::WeightScheme kind = quant::WeightScheme::kTernary;
  if (scheme == "w1.58a8") kind = quant::WeightScheme::kTernary;
  else if (scheme == "w8a8") kind = quant::WeightScheme::kInt8;
  else if (scheme == "w4a16") kind = quant::WeightScheme::kInt4;
  else TORCH_CHECK_VALUE(false, "scheme must be one of w1.58a8, w8a8, w4a16, got '", std::string(scheme), "'");
  const at::Tensor wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1);
  const auto [groups, width] = weight_groups(K, group_size);
  const bool int4 = kind == quant::WeightScheme::kInt4;
  const auto f32 = wc.options().dtype(at::kFloat);
  at::Tensor q = new_output({N, K}, wc.options().dtype(int4 ? at::kByte : at::kChar));
  at::Tensor zero = int4 ? new_output({N, groups}, f32) : new_output({0}, f32);
  at::Tensor scale;
  const bool tensor_scale = per_tensor && kind == quant::WeightScheme::kTernary;
  if (tensor_scale) {  // gamma over the whole tensor, summed in float64 (NaN for an empty one)
    scale = (at::sum(wc.abs(), at::kDouble) / static_cast<double>(wc.numel()))  // |w| exact in any dtype
                .to(at::kFloat)
                .clamp_min(quant::kScaleEps)
                .reshape({1});
  } else {
    scale = int4 ? new_output({N, groups}, f32) : new_output({N}, f32);
  }
  if (N == 0) return {q, scale, zero};
  const quant::WeightQuantArgs args{wc.data_ptr(), dtype, K, N, K, kind, width, groups,
                                    tensor_scale ? scale.data_ptr<float>() : nullptr,
                                    int4 ? nullptr : q.data_ptr<int8_t>(), int4 ? q.data_ptr<uint8_t>() : nullptr,
                                    scale.data_ptr<float>(), int4 ? zero.data_ptr<float>() : nullptr};
  if (wc.is_cuda()) {
    DeviceScope scope(wc);
#ifdef FLASHKD_WITH_CUDA
    check_launch(cuda::quantize_weight_rows(args, scope.stream), "quantize_weight CUDA kernel");
#endif
    return {q, scale, zero};
  }
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) { cpu::quantize_weight_rows(args, begin, end); });
  return {q, scale, zero};
}

at::Tensor int8_linear(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& a_scale,
                       const std::optional<at::Tensor>& w_scale, const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype) {
  check_activations_int8(a);
  check_weight_2d(w, at::kChar, "w", "int8");
  check_device(w, a, "w", "a");
  const at::Tensor a2 = as_rows(a, "a");
  const int64_t M = a2.size(0), K = a2.size(1), N = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == K, "w must have shape [out_features, in_features] with in_features = a.size(-1) (",
                    num(K), "), got ", shape(w.sizes()));
  const at::Tensor wc = w.contiguous();
  const quant::Int8GemmArgs args{a2.data_ptr<int8_t>(), K, wc.data_ptr<int8_t>(), K, M, N, K, {}};
  const auto cpu_gemm = [&](const quant::Int8GemmArgs& full) { quant_cpu::int8_gemm(full, a2, wc); };
  return integer_linear(args, a, cpu_gemm, a_scale, w_scale, bias, out_dtype, "int8_linear CUDA kernel");
}

at::Tensor ternary_linear(const at::Tensor& a, const at::Tensor& w_packed, const std::optional<at::Tensor>& a_scale,
                          const std::optional<at::Tensor>& w_scale, const std::optional<at::Tensor>& bias,
                          std::optional<at::ScalarType> out_dtype) {
  check_activations_int8(a);
  check_weight_2d(w_packed, at::kByte, "w_packed", "uint8 (four 2-bit codes per byte)");
  check_device(w_packed, a, "w_packed", "a");
  const at::Tensor a2 = as_rows(a, "a");
  const int64_t M = a2.size(0), K = a2.size(1), N = w_packed.size(0);
  const int64_t kb = (K + quant::kTernaryPerByte - 1) / quant::kTernaryPerByte;
  TORCH_CHECK_VALUE(w_packed.size(1) == kb, "w_packed must have shape [out_features, ceil(in_features / 4)] with ",
                    "in_features = a.size(-1) (", num(K), " -> ", num(kb), " bytes), got ", shape(w_packed.sizes()));
  const at::Tensor wc = w_packed.contiguous();
  const quant::TernaryGemmArgs args{a2.data_ptr<int8_t>(), K, wc.data_ptr<uint8_t>(), kb, M, N, K, {}};
  const auto cpu_gemm = [&](const quant::TernaryGemmArgs& full) { quant_cpu::ternary_gemm(full, a2); };
  return integer_linear(args, a, cpu_gemm, a_scale, w_scale, bias, out_dtype, "ternary_linear CUDA kernel");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale,
                       const at::Tensor& zero, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const DType dtype = kernel_dtype(x, "x");
  check_weight_2d(w_packed, at::kByte, "w_packed", "uint8 (two 4-bit codes per byte)");
  const at::Tensor x2 = as_rows(x, "x");
  const int64_t M = x2.size(0), K = x2.size(1), N = w_packed.size(0);
  const int64_t kb = (K + quant::kInt4PerByte - 1) / quant::kInt4PerByte;
  const auto [groups, width] = weight_groups(K, group_size);
  TORCH_CHECK_VALUE(w_packed.size(1) == kb, "w_packed must have shape [out_features, ceil(in_features / 2)] with ",
                    "in_features = x.size(-1) (", num(K), " -> ", num(kb), " bytes), got ", shape(w_packed.sizes()));
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, std::pair{&zero, "zero"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == N && t->size(1) == groups, name,
                      " must have shape [out_features, ceil(in_features / group_size)] = ", shape({N, groups}),
                      ", got ", shape(t->sizes()));
    check_device(*t, x, name, "x");
  }
  check_device(w_packed, x, "w_packed", "x");
  at::Tensor bias_c;
  if (bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have the dtype of x (", x.scalar_type(),
                     "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [out_features] (", num(N),
                      "), got ", shape(bias->sizes()));
    check_device(*bias, x, "bias", "x");
    bias_c = bias->contiguous();
  }
  const at::Tensor wc = w_packed.contiguous(), sc = scale.contiguous(), zc = zero.contiguous();
  at::Tensor out = new_output(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return out;
  const quant::Int4GemmArgs args{x2.data_ptr(), dtype, K, wc.data_ptr<uint8_t>(), kb, sc.data_ptr<float>(),
                                 zc.data_ptr<float>(), width, groups, M, N, K,
                                 bias ? bias_c.data_ptr() : nullptr, out.data_ptr(), N};
  if (x.is_cuda()) {
    DeviceScope scope(x);
#ifdef FLASHKD_WITH_CUDA
    check_launch(cuda::int4_gemm(args, scope.stream), "int4_linear CUDA kernel");
#endif
    return out;
  }
  quant_cpu::int4_gemm(args, x2, bias_c, out);
  return out;
}

// The int8 tensor-core main loop CUDA uses for M > 16 on the current device
// ("wgmma", "wgmma-1cta" or "mma.sync"; "none" without CUDA kernels); `force`
// ("auto" or one of those) changes it when non-empty; reset=True with no `force`
// goes back to the choice of FLASHKD_INT8_MAINLOOP (auto without it).
std::string quant_cuda_mainloop(c10::string_view force, bool reset) {
#ifdef FLASHKD_WITH_CUDA
  if (reset || !force.empty()) {
    const std::string name(force);  // empty: back to the environment's choice
    const char* err = cuda::set_int8_mainloop(name.c_str());
    TORCH_CHECK_VALUE(err == nullptr, "quant_cuda_mainloop('", name, "'): ", err ? err : "");
  }
  return cuda::int8_mainloop();
#else
  (void)force;
  (void)reset;
  return "none";
#endif
}

}  // namespace flashkd::ops

TORCH_LIBRARY_FRAGMENT(flashkd, m) {
  m.def("quantize_int8_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_weight(Tensor w, str scheme, int group_size=128, bool per_tensor=False) -> (Tensor, Tensor, Tensor)");
  m.def("int8_linear(Tensor a, Tensor w, Tensor? a_scale=None, Tensor? w_scale=None, Tensor? bias=None, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("ternary_linear(Tensor a, Tensor w_packed, Tensor? a_scale=None, Tensor? w_scale=None, Tensor? bias=None, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor w_packed, Tensor scale, Tensor zero, int group_size, Tensor? bias=None) -> Tensor");
  m.def("quant_cuda_mainloop(str force=\"\", bool reset=False) -> str", &flashkd::ops::quant_cuda_mainloop);
}

TORCH_LIBRARY_IMPL(flashkd, CPU, m) {
  m.impl("quantize_int8_rows", &flashkd::ops::quantize_int8_rows);
  m.impl("quantize_weight", &flashkd::ops::quantize_weight);
  m.impl("int8_linear", &flashkd::ops::int8_linear);
  m.impl("ternary_linear", &flashkd::ops::ternary_linear);
  m.impl("int4_linear", &flashkd::ops::int4_linear);
}

#ifdef FLASHKD_WITH_CUDA
TORCH_LIBRARY_IMPL(flashkd, CUDA, m) {
  m.impl("quantize_int8_rows", &flashkd::ops::quantize_int8_rows);
  m.impl("quantize_weight", &flashkd::ops::quantize_weight);
  m.impl("int8_linear", &flashkd::ops::int8_linear);
  m.impl("ternary_linear", &flashkd::ops::ternary_linear);
  m.impl("int4_linear", &flashkd::ops::int4_linear);
}
#endif
