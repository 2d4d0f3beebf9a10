// int8_gemm: int8 activations x int8 weights -> exact int32 or the
// dequantizing epilogue (flashkd/quant_params.h). M <= 16 runs the dp4a GEMV
// (weights streamed once); larger M the integer tensor-core mainloop when both
// operands are 16-byte aligned rows (what cp.async needs), else the GEMV
// tiled over M, which accepts any alignment.
#include "quant_gemv.cuh"
#include "quant_kernels.h"
#include "quant_mma.cuh"

namespace flashkd::cuda {

namespace {
bool aligned16(const void* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 16 == 0; }
bool aligned4(const void* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 4 == 0 && ld % 4 == 0; }
}  // namespace

const char* int8_gemm(const quant::Int8GemmArgs& args, void* stream) {
  if (args.M == 0 || args.N == 0) return nullptr;
  if (args.M > gemv::kMaxRows && aligned16(args.a, args.lda) && aligned16(args.w, args.ldw)) {
    const imma::Int8TileCpAsync a_ld{args.a, args.lda, args.M, args.K};
    const imma::Int8TileCpAsync w_ld{args.w, args.ldw, args.N, args.K};
    return imma::launch(a_ld, w_ld, args.M, args.N, args.K, args.epi, stream);
  }
  const gemv::Int8Rows rows{args.w, args.ldw, args.N, args.K, aligned16(args.w, args.ldw),
                            aligned4(args.w, args.ldw)};
  return gemv::launch(args.a, args.lda, rows, args.M, args.N, args.K, args.epi, stream);
}

}  // namespace flashkd::cuda
