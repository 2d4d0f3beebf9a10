// int8_gemm: int8 activations x int8 weights -> exact int32 or the
// dequantizing epilogue (flashkd/quant_params.h). M <= 16 runs the dp4a GEMV
// (weights streamed once). Larger M runs a tensor-core main loop when both
// operands are 16-byte aligned rows (what cp.async and the copy engine
// need), else the GEMV tiled over M, which accepts any alignment. The
// tensor-core loop is wgmma (quant_wgmma.cuh) where the sm_90a build runs on
// an sm_90 device and the sizes fit its tensor maps (wg::fits), mma.sync
// (quant_mma.cuh) elsewhere; set_int8_mainloop("mma.sync") forces the latter
// and "wgmma-1cta" the wgmma loop without clusters (tests run all three), as
// the environment variable FLASHKD_INT8_MAINLOOP does.
#include "quant_gemv.cuh"
#include "quant_kernels.h"
#include "quant_mma.cuh"
#include "quant_wgmma.cuh"

namespace flashkd::cuda {

namespace {

constexpr const char* kMainloops[] = {"auto", "mma.sync", "wgmma", "wgmma-1cta"};
// Indices into kMainloops; 0 is auto. From kWgmma on, the loops need sm_90a.
enum Mainloop { kMmaSync = 1, kWgmma = 2, kWgmmaOneBlock = 3 };

KernelChoice<4>& mainloop_choice() {
  static KernelChoice<4> choice("FLASHKD_INT8_MAINLOOP", "int8 main loop", kMainloops, kWgmma, wg::available);
  return choice;
}

// The loop that runs where the operands allow a tensor-core loop.
Mainloop mainloop() {
  const int forced = mainloop_choice().forced();
  if (forced == kMmaSync || !wg::available()) return kMmaSync;
  return forced == kWgmmaOneBlock ? kWgmmaOneBlock : kWgmma;
}

}  // namespace

const char* set_int8_mainloop(const char* name) { return mainloop_choice().set(name); }

const char* int8_mainloop() { return kMainloops[mainloop()]; }

const char* int8_gemm(const quant::Int8GemmArgs& args, void* stream) {
  if (args.M == 0 || args.N == 0) return nullptr;
  if (args.M > gemv::kMaxRows && aligned_to(args.a, args.lda, 16) && aligned_to(args.w, args.ldw, 16)) {
    const Mainloop loop = mainloop();
    if (loop != kMmaSync && wg::fits(args.lda, args.ldw, args.M, args.N, args.K))
      return wg::launch(loop == kWgmma ? 2 : 1, args.a, args.lda, args.w, args.ldw, args.M, args.N, args.K,
                        args.epi, stream);
    const tc::RowTileCpAsync a_ld{reinterpret_cast<const uint8_t*>(args.a), args.lda, args.M, args.K};
    const tc::RowTileCpAsync w_ld{reinterpret_cast<const uint8_t*>(args.w), args.ldw, args.N, args.K};
    return tc::launch(a_ld, w_ld, tc::Int8Math{args.epi}, args.M, args.N, stream);
  }
  const gemv::Int8Rows rows{args.w, args.ldw, args.N, args.K, aligned_to(args.w, args.ldw, 16),
                            aligned_to(args.w, args.ldw, 4)};
  return gemv::launch(args.a, args.lda, rows, args.M, args.N, args.K, args.epi, stream);
}

}  // namespace flashkd::cuda
