// int8_gemm: int8 activations x int8 weights -> exact int32 or the
// dequantizing epilogue (flashkd/quant_params.h). M <= 16 runs the dp4a GEMV
// (weights streamed once). Larger M runs a tensor-core main loop when both
// operands are 16-byte aligned rows (what cp.async and the copy engine
// need), else the GEMV tiled over M, which accepts any alignment. The
// tensor-core loop is wgmma (quant_wgmma.cuh) where the sm_90a build runs on
// an sm_90 device and the sizes fit its tensor maps (wg::fits), mma.sync
// (quant_mma.cuh) elsewhere; set_int8_mainloop("mma.sync") forces the latter
// (tests run both), as the environment variable FLASHKD_INT8_MAINLOOP does.
#include "quant_gemv.cuh"
#include "quant_kernels.h"
#include "quant_mma.cuh"
#include "quant_wgmma.cuh"

namespace flashkd::cuda {

namespace {

constexpr const char* kMainloops[] = {"auto", "mma.sync", "wgmma"};
enum Mainloop { kMmaSync = 1, kWgmma = 2 };  // indices into kMainloops; 0 is auto

KernelChoice<3>& mainloop_choice() {
  static KernelChoice<3> choice("FLASHKD_INT8_MAINLOOP", "int8 main loop", kMainloops, kWgmma, wg::available);
  return choice;
}

bool use_wgmma() { return mainloop_choice().forced() != kMmaSync && wg::available(); }

}  // namespace

const char* set_int8_mainloop(const char* name) { return mainloop_choice().set(name); }

const char* int8_mainloop() { return use_wgmma() ? "wgmma" : "mma.sync"; }

const char* int8_gemm(const quant::Int8GemmArgs& args, void* stream) {
  if (args.M == 0 || args.N == 0) return nullptr;
  if (args.M > gemv::kMaxRows && aligned_to(args.a, args.lda, 16) && aligned_to(args.w, args.ldw, 16)) {
    if (use_wgmma() && wg::fits(args.lda, args.ldw, args.M, args.N, args.K))
      return wg::launch(args.a, args.lda, args.w, args.ldw, args.M, args.N, args.K, args.epi, stream);
    const tc::RowTileCpAsync a_ld{reinterpret_cast<const uint8_t*>(args.a), args.lda, args.M, args.K};
    const tc::RowTileCpAsync w_ld{reinterpret_cast<const uint8_t*>(args.w), args.ldw, args.N, args.K};
    return tc::launch(a_ld, w_ld, tc::Int8Math{args.epi}, args.M, args.N, stream);
  }
  const gemv::Int8Rows rows{args.w, args.ldw, args.N, args.K, aligned_to(args.w, args.ldw, 16),
                            aligned_to(args.w, args.ldw, 4)};
  return gemv::launch(args.a, args.lda, rows, args.M, args.N, args.K, args.epi, stream);
}

}  // namespace flashkd::cuda
