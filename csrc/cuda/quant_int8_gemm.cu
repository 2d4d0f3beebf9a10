// int8_gemm: int8 activations x int8 weights -> exact int32 or the
// dequantizing epilogue (flashkd/quant_params.h). M <= 16 runs the dp4a GEMV
// (weights streamed once); larger M the integer tensor-core mainloop when both
// operands are 16-byte aligned rows (what cp.async needs), else the GEMV
// tiled over M, which accepts any alignment.
#include "quant_gemv.cuh"
#include "quant_kernels.h"
#include "quant_mma.cuh"

namespace flashkd::cuda {

const char* int8_gemm(const quant::Int8GemmArgs& args, void* stream) {
  if (args.M == 0 || args.N == 0) return nullptr;
  if (args.M > gemv::kMaxRows && aligned_to(args.a, args.lda, 16) && aligned_to(args.w, args.ldw, 16)) {
    const tc::RowTileCpAsync a_ld{reinterpret_cast<const uint8_t*>(args.a), args.lda, args.M, args.K};
    const tc::RowTileCpAsync w_ld{reinterpret_cast<const uint8_t*>(args.w), args.ldw, args.N, args.K};
    return tc::launch(a_ld, w_ld, tc::Int8Math{args.epi}, args.M, args.N, stream);
  }
  const gemv::Int8Rows rows{args.w, args.ldw, args.N, args.K, aligned_to(args.w, args.ldw, 16),
                            aligned_to(args.w, args.ldw, 4)};
  return gemv::launch(args.a, args.lda, rows, args.M, args.N, args.K, args.epi, stream);
}

}  // namespace flashkd::cuda
