// Glue of the quantized matmuls (issue #6): checks, output allocation, and
// the CPU (blocked over threads) or CUDA kernels of flashkd/quant_params.h.
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
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_int_mm.h>
#include <torch/library.h>
#include "tensor_utils.h"
#include "../cpu/quant_kernels.h"
#ifdef FLASHKD_WITH_CUDA
#include "../cuda/quant_kernels.h"
#endif

namespace flashkd::ops {
namespace {

using quant::GemmEpilogue;

// Output blocks handed to one CPU thread: 64 columns keep four-row weight
// tiles hot; 128 activation rows (int8) stay in L2 while they are reused.
constexpr int64_t kBlockN = 64;
constexpr int64_t kBlockM = 128;

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

// Runs `block(m0, m1, n0, n1)` over the (M, N) output in parallel CPU blocks.
template <class F>
void for_blocks(int64_t M, int64_t N, int64_t block_m, F&& block) {
  const int64_t tiles_m = (M + block_m - 1) / block_m, tiles_n = (N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / tiles_n) * block_m, n0 = (t % tiles_n) * kBlockN;
      block(m0, std::min(M, m0 + block_m), n0, std::min(N, n0 + kBlockN));
    }
  });
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

// From this many rows on, int4_linear on the CPU dequantizes the weights panel
// by panel and multiplies with ATen's GEMM, whose BLAS microkernels beat the
// dot-product kernel once the dequantization is spread over enough rows.
// Measured at N = K = 1024, fp32 (2-core EPYC): kernel vs this path 0.97 vs
// 1.23 ms at M = 64, 1.87 vs 1.91 ms at 128, 14.7 vs 11.5 ms at 1024.
constexpr int64_t kBlasRows = 256;

// Output columns (weight rows) per panel of the CPU paths that hand weight
// panels to ATen's GEMMs: as many as fit `budget` bytes at `bytes_per_column`
// each, a multiple of `multiple` and at least that, at most N.
int64_t panel_columns(int64_t N, int64_t bytes_per_column, int64_t budget, int64_t multiple) {
  const int64_t fit = budget / std::max<int64_t>(bytes_per_column, 1) / multiple * multiple;
  return std::min(N, std::max(multiple, fit));
}

// out (M, N) = x2 (M, K) @ dequantized(W)^T + bias: weight panels of about
// 4 MiB of float32 are dequantized in parallel and multiplied in float32,
// bias included in float32 before the one rounding to x's dtype, as the
// kernels do. A float32 output takes each panel's product in place (its
// columns are a strided view BLAS writes directly, bias included): at
// M = N = K = 1024 the separate product, bias pass and copy cost 0.2-0.3 ms
// (0.92x -> 1.00x of float32 nn.Linear on the 2-core Xeon).
at::Tensor int4_linear_blas(const quant::Int4GemmArgs& args, const at::Tensor& x2, const at::Tensor& bias,
                            at::Tensor out) {
  const int64_t M = args.M, N = args.N, K = args.K;
  const at::Tensor xf = x2.to(at::kFloat);
  const at::Tensor out2 = out.view({M, N});
  const bool in_place = out.scalar_type() == at::kFloat;
  const int64_t panel = panel_columns(N, K * int64_t{sizeof(float)}, int64_t{4} << 20, 16);
  // Both buffers are reused by every panel; the last, narrower panel views
  // their leading elements (contiguous), so mm_out needs no copy.
  at::Tensor w_panel = at::empty({panel * K}, xf.options());
  at::Tensor y_panel = in_place ? at::Tensor() : at::empty({M * panel}, xf.options());
  const at::Tensor bias_f = bias.defined() ? bias.to(at::kFloat) : at::Tensor();
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t nb = std::min(panel, N - n0);
    float* w = w_panel.data_ptr<float>();
    at::parallel_for(n0, n0 + nb, 8, [&](int64_t b, int64_t e) { cpu::int4_dequantize_rows(args, b, e, w + (b - n0) * K); });
    const at::Tensor wt = w_panel.narrow(0, 0, nb * K).view({nb, K}).t();
    at::Tensor y = in_place ? out2.narrow(1, n0, nb) : y_panel.narrow(0, 0, M * nb).view({M, nb});
    if (bias_f.defined()) at::addmm_out(y, bias_f.narrow(0, n0, nb), xf, wt);
    else at::mm_out(y, xf, wt);
    if (!in_place) out2.narrow(1, n0, nb).copy_(y);
  }
  return out;
}

// --- CPU integer GEMMs: oneDNN's main loop or flashkd's ----------------------
//
// flashkd's dot-product kernels read each weight row once per four activation
// rows: the fastest at decode sizes, but they do not block for reuse, so their
// time grows with M. From kOneDnnRows rows on, the int32 main loop runs in
// oneDNN (ATen's _int_mm: AMX or VNNI tiles) and flashkd adds the epilogue; the
// accumulators are the same exact integers. Measured, int32 GEMM alone, N = K
// = 4096, one call (2-core Xeon; flashkd vs oneDNN): M = 16 1.01 vs 0.63 ms
// with AMX, 1.06 vs 1.14 with AVX-512 VNNI only, 2.32 vs 2.44 with oneDNN
// limited to AVX2; M = 32 1.75 vs 0.72, 1.83 vs 1.49, 4.60 vs 3.55; M = 1024
// at N = K = 1024 3.54 vs 0.72 ms (AMX). But ATen's _int_mm calls oneDNN only
// on CPUs with AVX-512 VNNI; elsewhere it runs a scalar triple loop (1178 ms
// at 1024^3 on a 2-core AVX2 EPYC, where flashkd's kernel takes 19 ms), so
// "auto" takes oneDNN only there.
constexpr int64_t kOneDnnRows = 32;
// Columns per oneDNN call: its int32 accumulators (M x columns) and, for
// ternary weights, the weights decoded to int8 (columns x K) stay this small.
constexpr int64_t kPanelBytes = int64_t{8} << 20;

enum class CpuGemm { kAuto, kOneDnn, kFlashkd };

const char* cpu_gemm_name(CpuGemm g) {
  return g == CpuGemm::kOneDnn ? "onednn" : g == CpuGemm::kFlashkd ? "flashkd" : "auto";
}

// Whether this torch has oneDNN and it is enabled (torch.backends.mkldnn):
// without it _int_mm falls back to plain loops.
bool onednn_enabled() { return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn(); }

// Whether "auto" may pick oneDNN: on x86 CPUs with AVX-512 VNNI, the test
// ATen's _int_mm makes (at::cpu::is_avx512_vnni_supported, the same CPUID
// bit). Other CPUs' int8 GEMM in oneDNN has not been measured against
// flashkd's portable kernels.
bool auto_onednn_cpu() {
#if defined(FKD_HAVE_X86_ISAS)
  static const bool vnni = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return vnni;
#else
  return false;
#endif
}

CpuGemm parse_cpu_gemm(const std::string& name) {
  if (name.empty() || name == "auto") return CpuGemm::kAuto;
  if (name == "flashkd") return CpuGemm::kFlashkd;
  TORCH_CHECK_VALUE(name == "onednn", "CPU int8 GEMM must be auto, onednn or flashkd, got '", name, "'");
  TORCH_CHECK_VALUE(onednn_enabled(),
                    "CPU int8 GEMM 'onednn': this torch has no oneDNN, or it is disabled (torch.backends.mkldnn)");
  return CpuGemm::kOneDnn;
}

NamedChoice<CpuGemm>& cpu_gemm_choice() {
  static NamedChoice<CpuGemm> choice{"FLASHKD_CPU_INT8_GEMM", parse_cpu_gemm};
  return choice;
}

bool run_on_onednn(int64_t M, int64_t K) {
  if (K == 0) return false;  // nothing to multiply: flashkd's epilogue of zero sums
  switch (cpu_gemm_choice().get()) {
    case CpuGemm::kOneDnn: return true;
    case CpuGemm::kFlashkd: return false;
    default: return M >= kOneDnnRows && auto_onednn_cpu() && onednn_enabled();
  }
}

// The operands of _int_mm with strides whose leading dimensions oneDNN
// accepts. ATen reads those from the strides, and a size-1 dimension's stride
// is arbitrary: 0 in an expanded or as_strided view, 1 in the transpose of a
// one-column matrix. Given such a stride, _int_mm (torch 2.14.1, AMD EPYC)
// left its output unwritten, with no error: for one-row weights of stride 0,
// and for every product with K = 1 and N >= 2 (as in pytorch/pytorch#195066).
// `rows` is contiguous (n, K); as_gemm_rows spells out its (K, 1) strides,
// as_gemm_columns gives its transpose (K, n): column-major, or for K = 1 the
// same memory read as one row.
at::Tensor as_gemm_rows(const at::Tensor& rows) {
  TORCH_INTERNAL_ASSERT(rows.dim() == 2 && rows.is_contiguous());
  return rows.as_strided(rows.sizes(), {rows.size(1), 1});
}
at::Tensor as_gemm_columns(const at::Tensor& rows) {
  TORCH_INTERNAL_ASSERT(rows.dim() == 2 && rows.is_contiguous());
  const int64_t n = rows.size(0), K = rows.size(1);
  return K == 1 ? rows.as_strided({1, n}, {n, 1}) : rows.as_strided({K, n}, {1, K});
}

// The epilogue's output from a2 (M, K) int8 times the int8 weight rows that
// `weight_rows(n0, n1)` returns ((n1 - n0, K), contiguous), panel by panel:
// oneDNN's int32 GEMM, then flashkd's epilogue over the panel's rows in parallel.
template <class WeightRows>
void onednn_gemm(const quant::GemmEpilogue& epi, const at::Tensor& a2_in, int64_t N, WeightRows&& weight_rows) {
  const at::Tensor a2 = as_gemm_rows(a2_in);
  const int64_t M = a2.size(0), K = a2.size(1);
  const int64_t per_column = std::max<int64_t>(4 * M, K);  // accumulators or decoded weights
  const int64_t panel = panel_columns(N, per_column, kPanelBytes, 64);
  at::Tensor acc_buffer = at::empty({M * panel}, a2.options().dtype(at::kInt));
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t n1 = std::min(N, n0 + panel);
    at::Tensor acc = acc_buffer.narrow(0, 0, M * (n1 - n0)).view({M, n1 - n0});
    at::_int_mm_out(acc, a2, as_gemm_columns(weight_rows(n0, n1)));
    const int32_t* acc_data = acc.data_ptr<int32_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / (n1 - n0)), [&](int64_t m0, int64_t m1) {
      cpu::int32_epilogue(epi, acc_data, n1 - n0, m0, m1, n0, n1);
    });
  }
}

void check_activations_int8(const at::Tensor& a) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kChar, "a must be int8 (quantized activations), got ", a.scalar_type());
}

// The CPU integer GEMM of each weight format, over output blocks in parallel,
// by argument type, so that int8_linear and ternary_linear share one driver.
void cpu_gemm(const quant::Int8GemmArgs& args) {
  for_blocks(args.M, args.N, kBlockM,
             [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { cpu::int8_gemm(args, m0, m1, n0, n1); });
}
void cpu_gemm(const quant::TernaryGemmArgs& args) {
  // The kernel reads the activations rearranged to its weight codes' order:
  // done once here, not per output block.
  const int64_t ld = cpu::ternary_activation_width(args.K);
  const at::Tensor a = at::empty({args.M, ld}, at::kChar);
  const at::Tensor sum = at::empty({args.M}, at::kInt);
  const cpu::TernaryActivations act{a.data_ptr<int8_t>(), ld, sum.data_ptr<int32_t>()};
  at::parallel_for(0, args.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(ld, 1)),
                   [&](int64_t begin, int64_t end) { cpu::ternary_prepare_activations(args, act, begin, end); });
  for_blocks(args.M, args.N, kBlockM, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    cpu::ternary_gemm(args, act, m0, m1, n0, n1);
  });
}
#ifdef FLASHKD_WITH_CUDA
const char* cuda_gemm(const quant::Int8GemmArgs& args, void* stream) { return cuda::int8_gemm(args, stream); }
const char* cuda_gemm(const quant::TernaryGemmArgs& args, void* stream) { return cuda::ternary_gemm(args, stream); }
#endif

// int8 activations a2 (M, K) times checked weights (args without the
// epilogue): sets up the epilogue's output, then runs the GEMM on a's device.
// `int8_weight_rows(n0, n1)` gives weight rows as int8 for oneDNN.
template <typename Args, class WeightRows>
at::Tensor integer_linear(Args args, const at::Tensor& a, const at::Tensor& a2, WeightRows&& int8_weight_rows,
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
  if (run_on_onednn(args.M, args.K)) onednn_gemm(args.epi, a2, args.N, int8_weight_rows);
  else cpu_gemm(args);
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
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be >= 1, got ", num(group_size));
  quant::WeightScheme kind = quant::WeightScheme::kTernary;
  if (scheme == "w1.58a8") kind = quant::WeightScheme::kTernary;
  else if (scheme == "w8a8") kind = quant::WeightScheme::kInt8;
  else if (scheme == "w4a16") kind = quant::WeightScheme::kInt4;
  else TORCH_CHECK_VALUE(false, "scheme must be one of w1.58a8, w8a8, w4a16, got '", std::string(scheme), "'");
  const at::Tensor wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1);
  // A group as wide as the row or wider is one group: its width is taken as K
  // (the CUDA kernels index with 32-bit group widths; K + group_size could overflow).
  group_size = std::min(group_size, std::max<int64_t>(K, 1));
  const int64_t groups = std::max<int64_t>(1, (K + group_size - 1) / group_size);
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
  const quant::WeightQuantArgs args{wc.data_ptr(), dtype, K, N, K, kind, group_size, groups,
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
  const auto weight_rows = [&](int64_t n0, int64_t n1) { return wc.narrow(0, n0, n1 - n0); };
  return integer_linear(args, a, a2, weight_rows, a_scale, w_scale, bias, out_dtype, "int8_linear CUDA kernel");
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
  at::Tensor decoded;  // one panel's weights as int8, reused by every panel
  const auto weight_rows = [&](int64_t n0, int64_t n1) {
    if (!decoded.defined()) decoded = at::empty({(n1 - n0) * K}, a2.options());
    int8_t* out = decoded.data_ptr<int8_t>();
    at::parallel_for(n0, n1, std::max<int64_t>(1, 65536 / K), [&](int64_t b, int64_t e) {
      cpu::ternary_unpack_rows(args, b, e, out + (b - n0) * K);
    });
    return decoded.narrow(0, 0, (n1 - n0) * K).view({n1 - n0, K});
  };
  return integer_linear(args, a, a2, weight_rows, a_scale, w_scale, bias, out_dtype, "ternary_linear CUDA kernel");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale,
                       const at::Tensor& zero, int64_t group_size, const std::optional<at::Tensor>& bias) {
  const DType dtype = kernel_dtype(x, "x");
  check_weight_2d(w_packed, at::kByte, "w_packed", "uint8 (two 4-bit codes per byte)");
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be >= 1, got ", num(group_size));
  const at::Tensor x2 = as_rows(x, "x");
  const int64_t M = x2.size(0), K = x2.size(1), N = w_packed.size(0);
  const int64_t kb = (K + quant::kInt4PerByte - 1) / quant::kInt4PerByte;
  // A group as wide as the row or wider is one group: its width is taken as K
  // (the CUDA kernels index with 32-bit group widths; K + group_size could overflow).
  group_size = std::min(group_size, std::max<int64_t>(K, 1));
  const int64_t groups = std::max<int64_t>(1, (K + group_size - 1) / group_size);
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
                                 zc.data_ptr<float>(), group_size, groups, M, N, K,
                                 bias ? bias_c.data_ptr() : nullptr, out.data_ptr(), N};
  if (x.is_cuda()) {
    DeviceScope scope(x);
#ifdef FLASHKD_WITH_CUDA
    check_launch(cuda::int4_gemm(args, scope.stream), "int4_linear CUDA kernel");
#endif
    return out;
  }
  if (M >= kBlasRows) return int4_linear_blas(args, x2, bias_c, out);
  // The block's rows are held as float32 (about 1 MiB of them, in L2), and each
  // four weight rows are dequantized once per block: the larger the better.
  const int64_t block_m = std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(K, 1), 8, kBlockM);
  for_blocks(M, N, block_m, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { cpu::int4_gemm(args, m0, m1, n0, n1); });
  return out;
}

std::string quant_int8_dot_kind() { return cpu::int8_dot_kind(); }

// Whether a CPU integer GEMM of `rows` activation rows (and a nonzero depth)
// runs its int32 main loop in ATen's _int_mm under the current choice.
bool quant_cpu_gemm_onednn(int64_t rows) { return run_on_onednn(rows, 1); }

// The CPU integer GEMMs' main loop: "auto" (oneDNN from kOneDnnRows rows on,
// where the CPU has AVX-512 VNNI and torch has oneDNN on), "onednn" (ATen's
// _int_mm for every call: a scalar loop without AVX-512 VNNI) or "flashkd" (its
// dot-product kernels for every call); `force` changes it when non-empty,
// reset=True with no `force` goes back to FLASHKD_CPU_INT8_GEMM's choice (auto
// without it).
std::string quant_cpu_gemm(c10::string_view force, bool reset) {
  cpu_gemm_choice().update(force, reset);
  return cpu_gemm_name(cpu_gemm_choice().get());
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
  m.def("quant_cpu_dot_kind() -> str", &flashkd::ops::quant_int8_dot_kind);
  m.def("quant_cpu_gemm(str force=\"\", bool reset=False) -> str", &flashkd::ops::quant_cpu_gemm);
  m.def("quant_cpu_gemm_onednn(int rows) -> bool", &flashkd::ops::quant_cpu_gemm_onednn);
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
