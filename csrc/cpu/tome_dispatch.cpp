// Per-ISA dispatch of the token-merging and token-pruning CPU kernels.
#include "kernels.h"
#include "tome_kernels.h"

namespace flashkd::cpu {

void tome_plan(const PlanParams& p, int64_t batch_begin, int64_t batch_end) {
  FKD_CPU_DISPATCH(tome_plan, p, batch_begin, batch_end);
}
void tome_merge(const MergePlan& plan, const MergeTensors& t, int64_t begin, int64_t end) {
  FKD_CPU_DISPATCH(tome_merge, plan, t, begin, end);
}
void tome_merge_backward(const MergePlan& plan, const MergeTensors& t, int64_t begin, int64_t end) {
  FKD_CPU_DISPATCH(tome_merge_backward, plan, t, begin, end);
}
void tome_unmerge(const MergePlan& plan, const void* x, DType dtype, int64_t cols, void* out, int64_t begin,
                  int64_t end) {
  FKD_CPU_DISPATCH(tome_unmerge, plan, x, dtype, cols, out, begin, end);
}
void topk_tokens(const TopkParams& p, int64_t batch_begin, int64_t batch_end) {
  FKD_CPU_DISPATCH(topk_tokens, p, batch_begin, batch_end);
}
void topk_tokens_backward(const TopkParams& p, int64_t batch_begin, int64_t batch_end) {
  FKD_CPU_DISPATCH(topk_tokens_backward, p, batch_begin, batch_end);
}

}  // namespace flashkd::cpu
