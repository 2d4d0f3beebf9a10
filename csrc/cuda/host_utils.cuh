// Host-side helpers shared by the CUDA entry points: error strings, whether
// the sm_90a build of a kernel is what the runtime loads, and process-wide
// choices between kernel variants (tests and benchmarks force each one).
#pragma once
#include <cuda_runtime.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace flashkd::cuda {

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Whether the binary the runtime loads for `kernel` on the current device is
// an sm_90 build (binaryVersion 90). Kernels that use Hopper-only features
// (wgmma, clusters, bulk copies) compile to a stub in their sm_80 build, which
// an H100 would run when the wheel lacks sm_90a code. Cached per device.
class Sm90Build {
 public:
  explicit Sm90Build(const void* kernel) : kernel_(kernel) {}
  bool loaded() {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    if (device < 0 || device >= kMaxDevices) return false;
    if (known_[device].load(std::memory_order_relaxed) == 0) {
      cudaFuncAttributes attr{};
      const cudaError_t err = cudaFuncGetAttributes(&attr, kernel_);
      if (err != cudaSuccess) cudaGetLastError();  // clear our error only, never an earlier one
      known_[device].store(err == cudaSuccess && attr.binaryVersion == 90 ? 1 : -1, std::memory_order_relaxed);
    }
    return known_[device].load(std::memory_order_relaxed) > 0;
  }

 private:
  static constexpr int kMaxDevices = 64;
  const void* kernel_;
  std::atomic<signed char> known_[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no (threads may race to fill it)
};

// "auto" or one of a fixed list of variant names, read from an environment
// variable at first use and changeable at run time; set("") goes back to the
// environment's choice (tests and benchmarks force each variant, then reset,
// so a choice made in the environment outlives them). Index 0 is "auto".
// The variants from index `sm90_from` on (0: none) need the sm_90a build on
// an sm_90 GPU: forcing one elsewhere is refused.
template <int N>
class KernelChoice {
 public:
  KernelChoice(const char* env_var, const char* what, const char* const (&names)[N], int sm90_from,
               bool (*sm90_available)())
      : sm90_from_(sm90_from), sm90_available_(sm90_available) {
    unknown_ = std::string("unknown ") + what + ": choose auto";
    for (int i = 0; i < N; ++i) {
      names_[i] = names[i];
      if (i > 0) unknown_ += std::string(i + 1 < N ? ", " : " or ") + names[i];
    }
    for (int i = sm90_from > 0 ? sm90_from : N; i < N; ++i)
      unavailable_[i] = std::string("the ") + names[i] + " " + what +
                        " needs an sm_90 GPU and a build with sm_90a (FLASHKD_CUDA_ARCHS)";
    const char* env = std::getenv(env_var);
    const int from_env = env ? parse(env) : 0;
    from_env_ = forced_ = from_env < 0 ? 0 : from_env;
  }
  // Forces variant `name` ("" or null: the environment's choice); nullptr on
  // success, else why not.
  const char* set(const char* name) {
    if (!name || !*name) {
      forced_ = from_env_;
      return nullptr;
    }
    const int i = parse(name);
    if (i < 0) return unknown_.c_str();
    if (sm90_from_ > 0 && i >= sm90_from_ && !sm90_available_()) return unavailable_[i].c_str();
    forced_ = i;
    return nullptr;
  }
  int forced() const { return forced_; }
  const char* name(int index) const { return names_[index]; }

 private:
  int parse(const char* name) const {
    for (int i = 0; i < N; ++i)
      if (!std::strcmp(name, names_[i])) return i;
    return -1;
  }
  const char* names_[N];
  int sm90_from_;
  bool (*sm90_available_)();
  std::string unknown_, unavailable_[N];
  int from_env_ = 0, forced_ = 0;
};

}  // namespace flashkd::cuda
