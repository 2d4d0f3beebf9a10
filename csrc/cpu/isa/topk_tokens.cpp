// Top-k token pruning on the CPU, one batch at a time: a stable partial sort
// of the scores picks the kept tokens, their rows are gathered, and with
// fuse_remainder the dropped tokens are folded into one score-weighted token.
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>
#include "flashkd/cpu_convert.h"
#include "row_sums.h"
#include "tome_kernels.h"

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

// Descending score, NaN above everything (as torch.sort), ties by position.
struct ScoreGreater {
  const float* s;
  bool operator()(int64_t a, int64_t b) const {
    const bool na = s[a] != s[a], nb = s[b] != s[b];
    if (na != nb) return na;
    if (!na && s[a] != s[b]) return s[a] > s[b];
    return a < b;
  }
};

char* row_ptr(void* base, DType dtype, int64_t row, int64_t cols) {
  return static_cast<char*>(base) + row * cols * dtype_size(dtype);
}
const char* row_ptr(const void* base, DType dtype, int64_t row, int64_t cols) {
  return static_cast<const char*>(base) + row * cols * dtype_size(dtype);
}

// Scores of batch b as float32, and `kept[t]` = output position of token t or -1.
void load_selection(const TopkParams& p, int64_t b, std::vector<float>& scores, std::vector<int64_t>& kept) {
  scores.resize(p.tokens);
  load_floats(row_ptr(p.scores, p.scores_dtype, b, p.tokens), p.scores_dtype, 1, p.tokens, scores.data());
  kept.assign(p.tokens, -1);
  for (int64_t k = 0; k < p.keep; ++k) {
    const int64_t t = p.index[b * p.keep + k];
    if (t >= 0 && t < p.tokens) kept[t] = k;  // out of range (never the forward's): left out, not written
  }
}

// Sum of the dropped tokens' scores (the remainder's normalizer).
float dropped_total(const std::vector<float>& scores, const std::vector<int64_t>& kept) {
  float total = 0.f;
  for (size_t t = 0; t < scores.size(); ++t)
    if (kept[t] < 0) total += scores[t];
  return total;
}

}  // namespace

void topk_tokens(const TopkParams& p, int64_t batch_begin, int64_t batch_end) {
  const int64_t cols = p.cols, n_out = p.keep + (p.fuse_remainder ? 1 : 0), esize = dtype_size(p.dtype);
  thread_local std::vector<float> scores, acc, row;
  thread_local std::vector<int64_t> order, kept;
  for (int64_t b = batch_begin; b < batch_end; ++b) {
    scores.resize(p.tokens);
    load_floats(row_ptr(p.scores, p.scores_dtype, b, p.tokens), p.scores_dtype, 1, p.tokens, scores.data());
    const int64_t first = p.protect_first ? 1 : 0;  // token 0 is placed first, its score ignored
    order.resize(p.tokens);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::partial_sort(order.begin() + first, order.begin() + p.keep, order.end(), ScoreGreater{scores.data()});
    int64_t* index = p.index + b * p.keep;
    std::copy(order.begin(), order.begin() + p.keep, index);
    for (int64_t k = 0; k < p.keep; ++k)
      std::memcpy(row_ptr(p.out, p.dtype, b * n_out + k, cols), row_ptr(p.x, p.dtype, b * p.tokens + index[k], cols),
                  cols * esize);
    if (!p.fuse_remainder) continue;

    load_selection(p, b, scores, kept);
    const float total = dropped_total(scores, kept);
    acc.assign(cols, 0.f);
    row.resize(cols);
    for (int64_t t = 0; t < p.tokens; ++t) {
      if (kept[t] >= 0) continue;
      const float w = scores[t] / total;
      load_floats(row_ptr(p.x, p.dtype, b * p.tokens + t, cols), p.dtype, 1, cols, row.data());
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) acc[c] += w * row[c];
    }
    store_floats(acc.data(), cols, row_ptr(p.out, p.dtype, b * n_out + p.keep, cols), p.dtype, 1);
  }
}

void topk_tokens_backward(const TopkParams& p, int64_t batch_begin, int64_t batch_end) {
  const int64_t cols = p.cols, n_out = p.keep + (p.fuse_remainder ? 1 : 0), esize = dtype_size(p.dtype);
  thread_local std::vector<float> scores, g_extra, row;
  thread_local std::vector<int64_t> kept;
  for (int64_t b = batch_begin; b < batch_end; ++b) {
    load_selection(p, b, scores, kept);
    float total = 0.f, g_dot_extra = 0.f;
    if (p.fuse_remainder) {
      total = dropped_total(scores, kept);
      g_extra.resize(cols);
      row.resize(cols);
      load_floats(row_ptr(p.grad_out, p.dtype, b * n_out + p.keep, cols), p.dtype, 1, cols, g_extra.data());
      load_floats(row_ptr(p.out, p.dtype, b * n_out + p.keep, cols), p.dtype, 1, cols, row.data());
      for (int64_t c = 0; c < cols; ++c) g_dot_extra += g_extra[c] * row[c];
    }
    for (int64_t t = 0; t < p.tokens; ++t) {
      char* gx = row_ptr(p.grad_x, p.dtype, b * p.tokens + t, cols);
      float g_score = 0.f;
      if (kept[t] >= 0) {
        std::memcpy(gx, row_ptr(p.grad_out, p.dtype, b * n_out + kept[t], cols), cols * esize);
      } else if (p.fuse_remainder) {
        // remainder = sum_i (s_i / S) x_i: d/dx_t = s_t / S, d/ds_t = (x_t - remainder) / S
        const float w = scores[t] / total;
        if (p.grad_scores) {
          load_floats(row_ptr(p.x, p.dtype, b * p.tokens + t, cols), p.dtype, 1, cols, row.data());
          const float g_dot_x = row_sum(cols, [&](int64_t c) { return g_extra[c] * row[c]; });
          g_score = (g_dot_x - g_dot_extra) / total;
        }
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) row[c] = w * g_extra[c];
        store_floats(row.data(), cols, gx, p.dtype, 1);
      } else {
        std::memset(gx, 0, cols * esize);  // zero bits in every dtype
      }
      if (p.grad_scores) {
        char* gs = static_cast<char*>(p.grad_scores) + (b * p.tokens + t) * dtype_size(p.scores_dtype);
        store_floats(&g_score, 1, gs, p.scores_dtype, 1);
      }
    }
  }
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
