// Entry points of the CPU token-merging and token-pruning kernels. Each is
// built once per instruction set (csrc/cpu/isa/tome_*.cpp, topk_tokens.cpp);
// the unqualified flashkd::cpu:: versions (tome_dispatch.cpp) pick one.
#pragma once
#include <cstdint>
#include "flashkd/tome_params.h"

namespace flashkd::cpu {

// Work units: plan and top-k run per batch; merge and merge-backward per
// (batch, merged output row) = batch * n_out + row; unmerge per
// (batch, token) = batch * tokens + token.
#define FKD_DECLARE_TOME_KERNELS(isa)                                                                   \
  namespace isa {                                                                                       \
  void tome_plan(const PlanParams& p, int64_t batch_begin, int64_t batch_end);                          \
  void tome_merge(const MergePlan& plan, const MergeTensors& t, int64_t begin, int64_t end);            \
  void tome_merge_backward(const MergePlan& plan, const MergeTensors& t, int64_t begin, int64_t end);   \
  void tome_unmerge(const MergePlan& plan, const void* x, DType dtype, int64_t cols, void* out,         \
                    int64_t begin, int64_t end);                                                        \
  void topk_tokens(const TopkParams& p, int64_t batch_begin, int64_t batch_end);                        \
  void topk_tokens_backward(const TopkParams& p, int64_t batch_begin, int64_t batch_end);               \
  }

FKD_DECLARE_TOME_KERNELS(avx2)
FKD_DECLARE_TOME_KERNELS(avx512)
FKD_DECLARE_TOME_KERNELS(generic)
#undef FKD_DECLARE_TOME_KERNELS

void tome_plan(const PlanParams& p, int64_t batch_begin, int64_t batch_end);
void tome_merge(const MergePlan& plan, const MergeTensors& t, int64_t begin, int64_t end);
void tome_merge_backward(const MergePlan& plan, const MergeTensors& t, int64_t begin, int64_t end);
void tome_unmerge(const MergePlan& plan, const void* x, DType dtype, int64_t cols, void* out, int64_t begin,
                  int64_t end);
void topk_tokens(const TopkParams& p, int64_t batch_begin, int64_t batch_end);
void topk_tokens_backward(const TopkParams& p, int64_t batch_begin, int64_t batch_end);

}  // namespace flashkd::cpu
