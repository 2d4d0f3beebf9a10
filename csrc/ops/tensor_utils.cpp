#include "tensor_utils.h"
#include <cstdio>
#include <cstdlib>
#include <limits>
#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef FLASHKD_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace flashkd::ops {

DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

std::optional<RowLayout> row_layout(const at::Tensor& t) {
  RowLayout layout;
  layout.col_stride = t.dim() > 0 ? t.stride(-1) : 1;
  // Collapse leading dims from the innermost outwards, skipping size-1 dims.
  int64_t sizes[16], strides[16];
  int nd = 0;
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (nd > 0 && strides[nd - 1] * sizes[nd - 1] == t.stride(d)) {
      sizes[nd - 1] *= t.size(d);
      continue;
    }
    if (nd == 16) return std::nullopt;
    sizes[nd] = t.size(d);
    strides[nd] = t.stride(d);
    ++nd;
  }
  if (nd > kMaxLeadDims) return std::nullopt;
  if (nd == 0) { sizes[0] = 1; strides[0] = 0; nd = 1; }
  layout.ndim = nd;
  for (int i = 0; i < nd; ++i) {  // RowLayout wants outermost first
    layout.size[i] = sizes[nd - 1 - i];
    layout.stride[i] = strides[nd - 1 - i];
  }
  return layout;
}

at::Tensor describable(const at::Tensor& t) { return row_layout(t) ? t : t.contiguous(); }

namespace {

// Asks Linux to back the 2 MiB-aligned interior of a fresh CPU buffer with
// transparent huge pages (honoured in THP's "madvise" mode, a common default,
// and in "always"). The buffers the kernels write are large and written in
// full, so this costs no memory; the first touch then faults 2 MiB at a time
// instead of 4 KiB: filling a fresh 262 MB buffer took 37 ms instead of 162 ms
// on the development machine (torch's own allocator does the same under
// THP_MEM_ALLOC_ENABLE=1). A hint only: failure changes nothing.
void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.is_cpu() || t.nbytes() < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  static const bool poison = [] {
    const char* v = std::getenv("FLASHKD_POISON");
    return v && *v && *v != '0';
  }();
  at::Tensor out = at::empty(sizes, opts);
  advise_huge_pages(out);
  if (poison) {
    if (at::isFloatingType(out.scalar_type())) out.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (out.scalar_type() == at::kBool) out.fill_(true);
    else out.fill_(-7);
  }
  return out;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string num(int64_t v) { return std::to_string(v); }

std::string shape(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

void check_launch(const char* error, const char* what) {
  TORCH_CHECK(error == nullptr, "flashkd: ", what, " failed: ", error ? error : "");
}

#ifdef FLASHKD_WITH_CUDA
bool cuda_compiled() { return true; }

DeviceScope::DeviceScope(const at::Tensor& t) {
  previous_device_ = c10::cuda::current_device();
  c10::cuda::set_device(t.get_device());
  stream = c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}
DeviceScope::~DeviceScope() {
  if (previous_device_ >= 0) c10::cuda::set_device(previous_device_);
}
#else
bool cuda_compiled() { return false; }

DeviceScope::DeviceScope(const at::Tensor&) {
  TORCH_CHECK(false, "flashkd was built without CUDA kernels; reinstall with nvcc and a CUDA build of torch");
}
DeviceScope::~DeviceScope() = default;
#endif

}  // namespace flashkd::ops
