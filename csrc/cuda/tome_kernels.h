// Entry points of the CUDA token-merging and token-pruning kernels, callable
// from torch glue without CUDA headers. Each returns nullptr on success or
// the CUDA error string; `stream` is a cudaStream_t.
#pragma once
#include <cstddef>
#include <cstdint>
#include "flashkd/tome_params.h"

namespace flashkd::cuda {

// Bytes of device scratch tome_plan needs (inverse norms, best partners, ranks).
size_t tome_plan_scratch_bytes(const PlanParams& p);
// Similarity + per-row argmax (tiled, the score matrix is never stored), then
// one block per batch ranks the edges.
const char* tome_plan(const PlanParams& p, void* scratch, void* stream);
// One block per merged output row (forward) or per group of member tokens (backward).
const char* tome_merge(const MergePlan& plan, const MergeTensors& t, void* stream);
const char* tome_merge_backward(const MergePlan& plan, const MergeTensors& t, void* stream);
// One block per output token.
const char* tome_unmerge(const MergePlan& plan, const void* x, DType dtype, int64_t cols, void* out, void* stream);
// Bytes of device scratch the top-k kernels need (each token's output slot).
size_t topk_scratch_bytes(const TopkParams& p);
// Token ranks over a (batch x token tiles) grid, then one block per output
// row (forward) or per input row (backward).
const char* topk_tokens(const TopkParams& p, void* scratch, void* stream);
const char* topk_tokens_backward(const TopkParams& p, void* scratch, void* stream);

}  // namespace flashkd::cuda
