// ToMe merge / unmerge on the CPU and their backward passes. Each merged
// output row is a group: its head token (the kept A token, or the B token
// itself) plus the A tokens merged into it, in plan order k (the order of
// ToMe's scatter_reduce). Forward reduces a group into its row; backward
// writes the gradient of every member token, so each gradient row is written
// exactly once and no two work units touch the same memory.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include "flashkd/cpu_convert.h"
#include "row_sums.h"
#include "tome_kernels.h"

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

// The members of every output row of one batch.
struct Groups {
  const MergePlan* plan = nullptr;
  int64_t batch = -1;
  std::vector<int64_t> start;    // sources of B row j: members[start[j], start[j + 1])
  std::vector<int64_t> members;  // tokens of the merged A rows, grouped by destination

  void build(const MergePlan& p, int64_t b) {
    plan = &p;
    batch = b;
    const int64_t n_b = p.n_b();
    const int64_t* src = p.src + b * p.r;
    const int64_t* dst = p.dst + b * p.r;
    start.assign(n_b + 1, 0);
    for (int64_t k = 0; k < p.r; ++k) ++start[dst[k] + 1];
    for (int64_t j = 0; j < n_b; ++j) start[j + 1] += start[j];
    members.resize(p.r);
    std::vector<int64_t>& fill = scratch;
    fill.assign(start.begin(), start.end() - 1);
    for (int64_t k = 0; k < p.r; ++k) members[fill[dst[k]]++] = 2 * src[k];  // stable: k order kept
  }

  // Head token of output row `o`, and its source tokens [first, last).
  int64_t group(int64_t o, const int64_t** first, const int64_t** last) const {
    const int64_t e = plan->out_row_entry(o);
    if (e >= 0) {
      *first = *last = members.data();
      return 2 * plan->unm[batch * plan->n_unm + e];
    }
    const int64_t j = ~e;
    *first = members.data() + start[j];
    *last = members.data() + start[j + 1];
    return 2 * j + 1;
  }

 private:
  std::vector<int64_t> scratch;
};

const char* row_ptr(const void* base, DType dtype, int64_t row, int64_t cols) {
  return static_cast<const char*>(base) + row * cols * dtype_size(dtype);
}
char* row_ptr(void* base, DType dtype, int64_t row, int64_t cols) {
  return static_cast<char*>(base) + row * cols * dtype_size(dtype);
}
float load_scalar(const void* base, DType dtype, int64_t i) {
  float v = 0.f;  // every dtype is handled; the initializer quiets -Wmaybe-uninitialized (aarch64 GCC)
  load_floats(row_ptr(base, dtype, i, 1), dtype, 1, 1, &v);
  return v;
}
void store_scalar(float v, void* base, DType dtype, int64_t i) { store_floats(&v, 1, row_ptr(base, dtype, i, 1), dtype, 1); }

}  // namespace

void tome_merge(const MergePlan& p, const MergeTensors& t, int64_t begin, int64_t end) {
  const int64_t cols = t.cols, n_out = p.n_out();
  thread_local Groups groups;
  thread_local std::vector<float> acc, row;
  acc.resize(cols);
  row.resize(cols);
  groups.batch = -1;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t b = u / n_out, o = u % n_out;
    if (groups.batch != b) groups.build(p, b);
    const int64_t *first, *last;
    const int64_t head = b * p.tokens + groups.group(o, &first, &last);
    if (first == last) {
      // A group of one (most rows) keeps its row exactly in every mode (a
      // weighted average of one row is that row) and its size.
      std::memcpy(row_ptr(t.out, t.dtype, u, cols), row_ptr(t.x, t.dtype, head, cols), cols * dtype_size(t.dtype));
      if (t.mode == MergeMode::kWeighted) store_scalar(t.size ? load_scalar(t.size, t.dtype, head) : 1.f, t.size_out, t.dtype, u);
      continue;
    }
    load_floats(row_ptr(t.x, t.dtype, head, cols), t.dtype, 1, cols, acc.data());
    float weight = 1.f;  // kWeighted: total size; kMean: member count
    if (t.mode == MergeMode::kWeighted) {
      weight = t.size ? load_scalar(t.size, t.dtype, head) : 1.f;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) acc[c] *= weight;
    }
    for (const int64_t* m = first; m != last; ++m) {
      const int64_t token = b * p.tokens + *m;
      load_floats(row_ptr(t.x, t.dtype, token, cols), t.dtype, 1, cols, row.data());
      switch (t.mode) {
        case MergeMode::kAmax:
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) acc[c] = (row[c] > acc[c] || row[c] != row[c]) ? row[c] : acc[c];
          break;
        case MergeMode::kWeighted: {
          const float s = t.size ? load_scalar(t.size, t.dtype, token) : 1.f;
          weight += s;
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) acc[c] += row[c] * s;
          break;
        }
        default:
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) acc[c] += row[c];
      }
    }
    if (t.mode == MergeMode::kMean) weight = static_cast<float>(1 + (last - first));
    if (t.mode == MergeMode::kMean || t.mode == MergeMode::kWeighted) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) acc[c] /= weight;
    }
    store_floats(acc.data(), cols, row_ptr(t.out, t.dtype, u, cols), t.dtype, 1);
    if (t.mode == MergeMode::kWeighted) store_scalar(weight, t.size_out, t.dtype, u);
  }
}

void tome_merge_backward(const MergePlan& p, const MergeTensors& t, int64_t begin, int64_t end) {
  const int64_t cols = t.cols, n_out = p.n_out();
  thread_local Groups groups;
  thread_local std::vector<float> g, y, row, ties;
  g.resize(cols);
  y.resize(cols);
  row.resize(cols);
  ties.resize(cols);
  groups.batch = -1;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t b = u / n_out, o = u % n_out;
    if (groups.batch != b) groups.build(p, b);
    const int64_t *first, *last;
    const int64_t head = groups.group(o, &first, &last);
    const int64_t count = 1 + (last - first);
    // Member m of the group: the head for m < 0, else first[m].
    auto token_of = [&](int64_t m) { return b * p.tokens + (m < 0 ? head : first[m]); };
    if (count == 1 && t.mode != MergeMode::kAmax) {
      // A group of one was copied: its gradient passes through unchanged, and
      // its size only receives the size's own gradient (dy/ds = (x - y) / s = 0).
      const int64_t token = token_of(-1);
      std::memcpy(row_ptr(t.grad_x, t.dtype, token, cols), row_ptr(t.grad_out, t.dtype, u, cols),
                  cols * dtype_size(t.dtype));
      if (t.mode == MergeMode::kWeighted && t.grad_size)
        store_scalar(t.grad_size_out ? load_scalar(t.grad_size_out, t.dtype, u) : 0.f, t.grad_size, t.dtype, token);
      continue;
    }
    load_floats(row_ptr(t.grad_out, t.dtype, u, cols), t.dtype, 1, cols, g.data());

    switch (t.mode) {
      case MergeMode::kSum:
      case MergeMode::kMean: {
        if (t.mode == MergeMode::kMean) {
          const float n = static_cast<float>(count);
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) g[c] /= n;
        }
        for (int64_t m = -1; m < count - 1; ++m)
          store_floats(g.data(), cols, row_ptr(t.grad_x, t.dtype, token_of(m), cols), t.dtype, 1);
        break;
      }
      case MergeMode::kAmax: {
        // As torch's scatter_reduce("amax"): the gradient is shared equally by
        // every member equal to the maximum.
        load_floats(row_ptr(t.out, t.dtype, u, cols), t.dtype, 1, cols, y.data());
        std::fill(ties.begin(), ties.end(), 0.f);
        for (int64_t m = -1; m < count - 1; ++m) {
          load_floats(row_ptr(t.x, t.dtype, token_of(m), cols), t.dtype, 1, cols, row.data());
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) ties[c] += row[c] == y[c] ? 1.f : 0.f;
        }
        for (int64_t m = -1; m < count - 1; ++m) {
          load_floats(row_ptr(t.x, t.dtype, token_of(m), cols), t.dtype, 1, cols, row.data());
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) row[c] = row[c] == y[c] ? g[c] / ties[c] : 0.f;
          store_floats(row.data(), cols, row_ptr(t.grad_x, t.dtype, token_of(m), cols), t.dtype, 1);
        }
        break;
      }
      case MergeMode::kWeighted: {
        // y = sum(s_i x_i) / N, N = sum(s_i): dy/dx_i = s_i / N, dy/ds_i = (x_i - y) / N.
        const float total = load_scalar(t.size_out, t.dtype, u);
        const float g_size = t.grad_size_out ? load_scalar(t.grad_size_out, t.dtype, u) : 0.f;
        float gy = 0.f;  // <g, y>
        if (t.grad_size) {
          load_floats(row_ptr(t.out, t.dtype, u, cols), t.dtype, 1, cols, y.data());
          gy = row_sum(cols, [&](int64_t c) { return g[c] * y[c]; });
        }
        for (int64_t m = -1; m < count - 1; ++m) {
          const int64_t token = token_of(m);
          const float s = t.size ? load_scalar(t.size, t.dtype, token) : 1.f;
          if (t.grad_size) {
            load_floats(row_ptr(t.x, t.dtype, token, cols), t.dtype, 1, cols, row.data());
            const float gx = row_sum(cols, [&](int64_t c) { return g[c] * row[c]; });
            store_scalar((gx - gy) / total + g_size, t.grad_size, t.dtype, token);
          }
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) row[c] = g[c] / total * s;
          store_floats(row.data(), cols, row_ptr(t.grad_x, t.dtype, token, cols), t.dtype, 1);
        }
        break;
      }
    }
  }
}

void tome_unmerge(const MergePlan& p, const void* x, DType dtype, int64_t cols, void* out, int64_t begin,
                  int64_t end) {
  const int64_t n_a = p.n_a(), n_out = p.n_out(), esize = dtype_size(dtype);
  thread_local std::vector<int64_t> source;  // merged row read by each A token of the batch
  int64_t batch = -1;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t b = u / p.tokens, token = u % p.tokens;
    if (batch != b) {
      batch = b;
      source.resize(n_a);
      for (int64_t k = 0; k < p.n_unm; ++k) source[p.unm[b * p.n_unm + k]] = k;
      for (int64_t k = 0; k < p.r; ++k) source[p.src[b * p.r + k]] = p.n_unm + p.dst[b * p.r + k];
    }
    // ToMe reads the merged tensor as [unm..., B rows...] whatever the merge order.
    const int64_t row = token % 2 ? p.n_unm + token / 2 : source[token / 2];
    std::memcpy(row_ptr(out, dtype, u, cols), row_ptr(x, dtype, b * n_out + row, cols), cols * esize);
  }
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
