// Glue helpers: map tensors onto the torch-free kernel descriptors, allocate
// outputs (poisoned with NaN under FLASHKD_POISON=1, so tests catch unwritten
// elements), and run a kernel on the tensor's device.
#pragma once
#include <ATen/ATen.h>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <string>
#include "flashkd/common.h"

namespace flashkd::ops {

// float32 / bfloat16 / float16, else a TypeError naming `name`.
DType kernel_dtype(const at::Tensor& t, const char* name);

// Row layout of a (..., V) tensor over its leading dims; nullopt when the
// leading dims cannot be collapsed to kMaxLeadDims (callers then copy).
std::optional<RowLayout> row_layout(const at::Tensor& t);

// `t`, copied to contiguous only if its strides cannot be described.
at::Tensor describable(const at::Tensor& t);

// Uninitialized output, or NaN-filled when FLASHKD_POISON is set; large CPU
// buffers are backed by huge pages where Linux allows it (fewer page faults).
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

// The current CUDA stream of `t`'s device, with that device made current
// for the guard's lifetime. Throws on builds without CUDA.
struct DeviceScope {
  explicit DeviceScope(const at::Tensor& t);
  ~DeviceScope();
  void* stream = nullptr;
 private:
  int previous_device_ = -1;
};

// Throws a RuntimeError naming `what` when a kernel launcher returned an error.
void check_launch(const char* error, const char* what);

bool cuda_compiled();

// A process-wide choice among named settings, as the ops that pick a kernel
// path keep one: `parse` maps a name ("" for the automatic choice) to a value
// or raises; the environment variable `env` gives the value at first use,
// update(force) sets another, update("", true) goes back to the variable's.
template <class E>
class NamedChoice {
 public:
  using Parse = E (*)(const std::string&);
  NamedChoice(const char* env, Parse parse) : env_(env), parse_(parse), value_(from_environment()) {}
  E get() const { return value_.load(); }
  void update(c10::string_view force, bool reset) {
    if (!force.empty()) value_ = parse_(std::string(force));
    else if (reset) value_ = from_environment();
  }

 private:
  E from_environment() const {
    const char* v = std::getenv(env_);
    if (v == nullptr) return parse_("");
    try {
      return parse_(v);
    } catch (const c10::ValueError& e) {
      C10_THROW_ERROR(ValueError, std::string(env_) + "=" + v + ": " + e.msg());
    }
  }
  const char* env_;
  Parse parse_;
  std::atomic<E> value_;
};

// Numbers and shapes for error messages, formatted with snprintf. (On the GPU
// machine's torch 2.11 + gcc 13 build, inserting a number into the ostream
// behind c10::str crashed the process instead of raising; strings are safe.)
std::string num(double v);
std::string num(int64_t v);
std::string shape(at::IntArrayRef sizes);

}  // namespace flashkd::ops
