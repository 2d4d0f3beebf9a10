// Host-side helpers shared by the CUDA entry points: error strings, whether
// the sm_90a build of a kernel is what the runtime loads, and process-wide
// choices between kernel variants (tests and benchmarks force each one).
#pragma once
#include <cuda_runtime.h>
#include <cstdlib>
#include <cstring>

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
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
      cudaGetLastError();
      return false;
    }
    if (known_[device] == 0) {
      cudaFuncAttributes attr{};
      const bool ok = cudaFuncGetAttributes(&attr, kernel_) == cudaSuccess && attr.binaryVersion == 90;
      cudaGetLastError();
      known_[device] = ok ? 1 : -1;
    }
    return known_[device] > 0;
  }

 private:
  static constexpr int kMaxDevices = 64;
  const void* kernel_;
  signed char known_[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no
};

// "auto" or one of a fixed list of variant names, read from an environment
// variable at first use and changeable at run time; reset() goes back to the
// environment's choice (tests and benchmarks force each variant, then reset,
// so a choice made in the environment outlives them). Index 0 is "auto".
template <int N>
class KernelChoice {
 public:
  KernelChoice(const char* env_var, const char* const (&names)[N]) {
    for (int i = 0; i < N; ++i) names_[i] = names[i];
    const char* env = std::getenv(env_var);
    const int from_env = env ? parse(env) : 0;
    from_env_ = forced_ = from_env < 0 ? 0 : from_env;
  }
  // The variant's index, or -1 when `name` is none of them.
  int parse(const char* name) const {
    for (int i = 0; i < N; ++i)
      if (!std::strcmp(name, names_[i])) return i;
    return -1;
  }
  int forced() const { return forced_; }
  void force(int index) { forced_ = index; }
  void reset() { forced_ = from_env_; }
  const char* name(int index) const { return names_[index]; }

 private:
  const char* names_[N];
  int from_env_ = 0, forced_ = 0;
};

}  // namespace flashkd::cuda
