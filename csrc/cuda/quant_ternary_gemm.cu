// ternary_gemm: int8 activations x packed 2-bit ternary weights (w1.58a8).
// M <= 16: the dp4a GEMV decoding four packed bytes per lane and step, a
// memory-bound stream of N * ceil(K/4) bytes. Larger M: the integer
// tensor-core mainloop of int8_gemm with a loader that decodes each weight
// tile into shared memory as int8 (needs 16-byte aligned activation rows for
// cp.async; otherwise the GEMV tiled over M).
#include "quant_gemv.cuh"
#include "quant_kernels.h"
#include "quant_mma.cuh"

namespace flashkd::cuda {

const char* ternary_gemm(const quant::TernaryGemmArgs& args, void* stream) {
  if (args.M == 0 || args.N == 0) return nullptr;
  const int64_t row_bytes = (args.K + quant::kTernaryPerByte - 1) / quant::kTernaryPerByte;
  const bool w_word_ok = aligned_to(args.w, args.ldw_bytes, 4);
  if (args.M > gemv::kMaxRows && aligned_to(args.a, args.lda, 16)) {
    const tc::RowTileCpAsync a_ld{reinterpret_cast<const uint8_t*>(args.a), args.lda, args.M, args.K};
    const tc::TernaryTileDecode w_ld{args.w, args.ldw_bytes, args.N, row_bytes, w_word_ok, {0, 0}};
    return tc::launch(a_ld, w_ld, tc::Int8Math{args.epi}, args.M, args.N, stream);
  }
  const gemv::TernaryRows rows{args.w, args.ldw_bytes, args.N, row_bytes, w_word_ok};
  return gemv::launch(args.a, args.lda, rows, args.M, args.N, args.K, args.epi, stream);
}

}  // namespace flashkd::cuda
