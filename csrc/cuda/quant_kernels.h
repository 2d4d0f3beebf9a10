// CUDA entry points of the quantized matmuls (csrc/cuda/quant_*.cu). Each
// launches on `stream` (a cudaStream_t) and returns nullptr on success or the
// CUDA error string. Arguments and formats: flashkd/quant_params.h.
#pragma once
#include "flashkd/quant_params.h"

namespace flashkd::cuda {

const char* quantize_rows_int8(const quant::QuantizeRowsArgs& args, void* stream);
const char* quantize_weight_rows(const quant::WeightQuantArgs& args, void* stream);
const char* int8_gemm(const quant::Int8GemmArgs& args, void* stream);
const char* ternary_gemm(const quant::TernaryGemmArgs& args, void* stream);
const char* int4_gemm(const quant::Int4GemmArgs& args, void* stream);

// The int8 tensor-core main loop (M > 16): "wgmma" or "mma.sync" on the
// current device; set_int8_mainloop("auto" | "wgmma" | "mma.sync") chooses it,
// "" goes back to FLASHKD_INT8_MAINLOOP's choice (nullptr on success, else why not).
const char* int8_mainloop();
const char* set_int8_mainloop(const char* name);

}  // namespace flashkd::cuda
