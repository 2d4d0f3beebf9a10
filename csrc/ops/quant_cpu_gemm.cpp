// The CPU GEMMs of the quantized matmuls (quant_cpu_gemm.h), and the ops that
// report and choose their main loop:
//   quant_cpu_dot_kind() -> str              the int8 dot-product kernels in use
//   quant_cpu_gemm(force, reset) -> str      "auto", "onednn" or "flashkd"
//   quant_cpu_gemm_onednn(rows) -> bool      whether oneDNN takes `rows` rows
#include "quant_cpu_gemm.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_int_mm.h>
#include <torch/library.h>
#include "tensor_utils.h"
#include "../cpu/quant_kernels.h"

namespace flashkd::ops {
namespace {

// Output blocks handed to one CPU thread: 64 columns keep four-row weight
// tiles hot; 128 activation rows (int8) stay in L2 while they are reused.
constexpr int64_t kBlockN = 64;
constexpr int64_t kBlockM = 128;

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
void int4_gemm_blas(const quant::Int4GemmArgs& args, const at::Tensor& x2, const at::Tensor& bias,
                    const at::Tensor& out) {
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
}

// --- oneDNN's int32 main loop or flashkd's -----------------------------------
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

std::string quant_cpu_dot_kind() { return cpu::int8_dot_kind(); }

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

}  // namespace

namespace quant_cpu {

void int8_gemm(const quant::Int8GemmArgs& args, const at::Tensor& a2, const at::Tensor& w) {
  if (run_on_onednn(args.M, args.K)) {
    onednn_gemm(args.epi, a2, args.N, [&](int64_t n0, int64_t n1) { return w.narrow(0, n0, n1 - n0); });
    return;
  }
  for_blocks(args.M, args.N, kBlockM,
             [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { cpu::int8_gemm(args, m0, m1, n0, n1); });
}

void ternary_gemm(const quant::TernaryGemmArgs& args, const at::Tensor& a2) {
  const int64_t K = args.K;
  if (run_on_onednn(args.M, K)) {
    at::Tensor decoded;  // one panel's weights as int8, reused by every panel
    onednn_gemm(args.epi, a2, args.N, [&](int64_t n0, int64_t n1) {
      if (!decoded.defined()) decoded = at::empty({(n1 - n0) * K}, a2.options());
      int8_t* out = decoded.data_ptr<int8_t>();
      at::parallel_for(n0, n1, std::max<int64_t>(1, 65536 / K), [&](int64_t b, int64_t e) {
        cpu::ternary_unpack_rows(args, b, e, out + (b - n0) * K);
      });
      return decoded.narrow(0, 0, (n1 - n0) * K).view({n1 - n0, K});
    });
    return;
  }
  // The kernel reads the activations rearranged to its weight codes' order:
  // done once here, not per output block.
  const int64_t ld = cpu::ternary_activation_width(K);
  const at::Tensor a = at::empty({args.M, ld}, at::kChar);
  const at::Tensor sum = at::empty({args.M}, at::kInt);
  const cpu::TernaryActivations act{a.data_ptr<int8_t>(), ld, sum.data_ptr<int32_t>()};
  at::parallel_for(0, args.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(ld, 1)),
                   [&](int64_t begin, int64_t end) { cpu::ternary_prepare_activations(args, act, begin, end); });
  for_blocks(args.M, args.N, kBlockM, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    cpu::ternary_gemm(args, act, m0, m1, n0, n1);
  });
}

void int4_gemm(const quant::Int4GemmArgs& args, const at::Tensor& x2, const at::Tensor& bias, const at::Tensor& out) {
  if (args.M >= kBlasRows) {
    int4_gemm_blas(args, x2, bias, out);
    return;
  }
  // The block's rows are held as float32 (about 1 MiB of them, in L2), and each
  // four weight rows are dequantized once per block: the larger the better.
  const int64_t block_m = std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(args.K, 1), 8, kBlockM);
  for_blocks(args.M, args.N, block_m,
             [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { cpu::int4_gemm(args, m0, m1, n0, n1); });
}

}  // namespace quant_cpu
}  // namespace flashkd::ops

TORCH_LIBRARY_FRAGMENT(flashkd, m) {
  m.def("quant_cpu_dot_kind() -> str", &flashkd::ops::quant_cpu_dot_kind);
  m.def("quant_cpu_gemm(str force=\"\", bool reset=False) -> str", &flashkd::ops::quant_cpu_gemm);
  m.def("quant_cpu_gemm_onednn(int rows) -> bool", &flashkd::ops::quant_cpu_gemm_onednn);
}
