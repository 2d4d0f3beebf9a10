// Descriptors of the token-merging (ToMe) and token-pruning kernels, shared by
// CPU and CUDA code. Torch-free. Every tensor is contiguous (the glue copies).
//
// Token t of a (B, T, C) tensor is in set A when t is even (A row i = token 2i)
// and in set B when t is odd (B row j = token 2j + 1). A merge plan per batch:
//   unm[k], k < n_unm : A rows kept as they are,
//   src[k], k < r     : A rows merged away, each into B row dst[k].
// Merged output rows are [unm..., B rows...] (ToMe order), or with the distill
// token [unm[0], B[0], unm[1:]..., B[1:]...].
#pragma once
#include <cstdint>
#include "flashkd/common.h"

namespace flashkd {

enum class MergeMode : int32_t {
  kSum = 0,       // destination + sources
  kMean = 1,      // (destination + sources) / (1 + number of sources)
  kAmax = 2,      // elementwise max over destination and sources
  kWeighted = 3,  // merge_wavg: sum(x * size) / sum(size), size summed alongside
};

struct MergePlan {
  const int64_t* unm = nullptr;  // (batch, n_unm)
  const int64_t* src = nullptr;  // (batch, r)
  const int64_t* dst = nullptr;  // (batch, r)
  int64_t batch = 0;
  int64_t tokens = 0;  // T of the unmerged tensor
  int64_t n_unm = 0;
  int64_t r = 0;
  bool distill = false;  // output order with a distill token (see above)

  FKD_HD int64_t n_a() const { return (tokens + 1) / 2; }
  FKD_HD int64_t n_b() const { return tokens / 2; }
  FKD_HD int64_t n_out() const { return n_unm + n_b(); }
  FKD_HD int64_t unm_out_row(int64_t k) const { return distill && k > 0 && n_b() > 0 ? k + 1 : k; }
  FKD_HD int64_t dst_out_row(int64_t j) const { return distill ? (j == 0 ? 1 : n_unm + j) : n_unm + j; }
  // The plan entry that merged output row `o` holds: k >= 0 for unm[k], ~j for B row j.
  FKD_HD int64_t out_row_entry(int64_t o) const {
    if (distill && n_b() > 0) {
      if (o == 0) return 0;
      if (o == 1) return ~int64_t{0};
      return o <= n_unm ? o - 1 : ~(o - n_unm);
    }
    return o < n_unm ? o : ~(o - n_unm);
  }
};

// The tensors of one merge call (forward or backward), all (batch, rows, cols)
// or (batch, rows, 1) for sizes, in `dtype`. Null where unused: `size` null
// means all ones; `grad_size_out` null means zero.
struct MergeTensors {
  MergeMode mode = MergeMode::kSum;
  DType dtype = DType::kFloat32;
  int64_t cols = 0;
  const void* x = nullptr;     // (batch, tokens, cols)
  const void* size = nullptr;  // (batch, tokens, 1), kWeighted only
  void* out = nullptr;         // (batch, n_out, cols): written by forward, read by backward
  void* size_out = nullptr;    // (batch, n_out, 1), kWeighted only
  const void* grad_out = nullptr;
  const void* grad_size_out = nullptr;
  void* grad_x = nullptr;
  void* grad_size = nullptr;  // null: not wanted
};

// Most tokens one plan may merge away: ToMe's cap, half of the unprotected
// tokens, and never more than the B rows that may receive a merge (the
// distill token, B row 0, may not: with an odd token count ToMe's own cap
// would force a merge into it).
inline int64_t tome_max_r(int64_t tokens, bool class_token, bool distill_token) {
  const int64_t half = (tokens - (class_token ? 1 : 0) - (distill_token ? 1 : 0)) / 2;
  const int64_t receivers = tokens / 2 - (distill_token ? 1 : 0);
  return half < receivers ? (half > 0 ? half : 0) : (receivers > 0 ? receivers : 0);
}

// Similarity plan of one call: metric (batch, tokens, cols) in, plan out.
struct PlanParams {
  const void* metric = nullptr;
  DType dtype = DType::kFloat32;
  int64_t batch = 0, tokens = 0, cols = 0;
  int64_t r = 0;  // already capped by the caller
  bool class_token = false;
  bool distill_token = false;
  int64_t* unm = nullptr;  // (batch, n_a - r)
  int64_t* src = nullptr;  // (batch, r)
  int64_t* dst = nullptr;  // (batch, r)
};

// Top-k token selection with an optional fused remainder token (EViT).
struct TopkParams {
  const void* x = nullptr;       // (batch, tokens, cols)
  const void* scores = nullptr;  // (batch, tokens)
  DType dtype = DType::kFloat32;         // of x (and out / grad_x)
  DType scores_dtype = DType::kFloat32;  // of scores (and grad_scores)
  int64_t batch = 0, tokens = 0, cols = 0, keep = 0;
  bool fuse_remainder = false;
  bool protect_first = true;
  void* out = nullptr;       // (batch, keep + fuse_remainder, cols)
  int64_t* index = nullptr;  // (batch, keep): written by forward, read by backward
  // backward only
  const void* grad_out = nullptr;  // like out
  void* grad_x = nullptr;          // like x
  void* grad_scores = nullptr;     // like scores; null unless fuse_remainder and wanted
};

}  // namespace flashkd
