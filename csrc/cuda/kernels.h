// Entry points of the CUDA kernels, callable from torch glue without CUDA
// headers. Each returns nullptr on success or the CUDA error string.
#pragma once
#include <cstdint>
#include "flashkd/distill_params.h"

namespace flashkd::cuda {

// Launches the distillation row kernel on `stream` (a cudaStream_t).
const char* distill_rows(const DistillParams& p, void* stream);

// Which distillation kernel distill_rows prefers: "auto", "stream" or
// "cluster" (set_distill_kernel returns nullptr, or why it cannot; "" goes
// back to FLASHKD_DISTILL_KERNEL's choice), and which
// one its last call launched ("stream" or "cluster"; "auto" before any).
const char* distill_kernel_choice();
const char* set_distill_kernel(const char* name);
const char* last_distill_kernel();

// grad[row, :] *= factor[row] (or factor[0] when factor_per_row is false);
// rows whose factor is exactly 1 are skipped without touching memory.
const char* scale_rows(void* grad, DType dtype, const RowLayout& layout, int64_t rows, int64_t cols,
                       const float* factor, bool factor_per_row, void* stream);

// z[i] = cap * tanh(z[i] / cap) for i < n (float32, contiguous), with the row
// programs' soft cap.
const char* soft_cap_values(float* z, int64_t n, float cap, void* stream);

}  // namespace flashkd::cuda
