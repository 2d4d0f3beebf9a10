// ToMe bipartite matching plan on the CPU, one batch at a time: cosine
// similarity of every A row with every B row, each A row's best B partner,
// then a stable descending sort of those best scores. The (n_a, n_b) score
// matrix is never stored: a register tile of MR A rows x NR B rows is reduced
// into the running per-row maximum as soon as it is computed.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>
#include "flashkd/cpu_convert.h"
#include "row_sums.h"
#include "tome_kernels.h"

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float VecU __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));  // unaligned loads

constexpr int kMR = 4;               // A rows per register tile
constexpr int kNV = 2;               // vectors of B columns per register tile
constexpr int kNR = kNV * kLanes;    // B rows per register tile

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// out = metric row `row` / its L2 norm, in float32 (float32 rows are read in
// place, the others converted first).
void load_normalized(const char* batch, DType dtype, int64_t cols, int64_t row, float* out) {
  const char* src = batch + row * cols * dtype_size(dtype);
  const float* x = out;
  if (dtype == DType::kFloat32) x = reinterpret_cast<const float*>(src);
  else load_floats(src, dtype, 1, cols, out);
  // In row_sums' fixed order, so that AVX2 and AVX-512 builds score alike.
  const float ss = row_sum(cols, [&](int64_t c) { return x[c] * x[c]; });
  const float inv = 1.f / std::sqrt(ss);  // a zero row gives NaN scores, which are never chosen
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) out[c] = x[c] * inv;
}

// Scores of A rows [0, kMR) against B rows [j0, j0 + kNV * kLanes), folded
// into the running best partner of each row. a: A rows (row-major, cols
// each); bt: B transposed, (cols, ldb), zero in the padding columns.
template <int kNV>
void tile(const float* a, const float* bt, int64_t cols, int64_t ldb, int64_t j0, int64_t n_b, bool skip_first_b,
          float* best, int64_t* best_j) {
  Vec acc[kMR][kNV] = {};
  for (int64_t c = 0; c < cols; ++c) {
    Vec b[kNV];
    for (int v = 0; v < kNV; ++v) b[v] = *reinterpret_cast<const VecU*>(bt + c * ldb + j0 + v * kLanes);
    for (int m = 0; m < kMR; ++m) {
      const float am = a[m * cols + c];  // scalar * vector: a broadcast
      for (int v = 0; v < kNV; ++v) acc[m][v] += am * b[v];
    }
  }
  const int64_t jn = std::min<int64_t>(kNV * kLanes, n_b - j0);
  for (int m = 0; m < kMR; ++m) {
    alignas(64) float s[kNV * kLanes];
    for (int v = 0; v < kNV; ++v) *reinterpret_cast<VecU*>(s + v * kLanes) = acc[m][v];
    // Most tiles cannot beat the row's best (padding columns score 0 and
    // only make this test conservative): skip their scalar scan.
    // NaN scores (a zero row) never win, so they must not poison the maximum either.
    float tile_max = -INFINITY;
    for (int n = 0; n < kNV * kLanes; ++n) tile_max = s[n] > tile_max ? s[n] : tile_max;
    if (!(tile_max > best[m])) continue;
    // strict > keeps the smallest j among equal maxima
    for (int64_t n = (j0 == 0 && skip_first_b) ? 1 : 0; n < jn; ++n)
      if (s[n] > best[m]) {
        best[m] = s[n];
        best_j[m] = j0 + n;
      }
  }
}

// Best B partner of A rows [0, kMR) over all B rows, in tiles of kNR B rows
// (a narrower last tile when it fits one vector, to skip padding work). A
// row without a finite score keeps the first B row that may receive a merge.
void best_partners(const float* a, const float* bt, int64_t cols, int64_t ldb, int64_t n_b, bool skip_first_b,
                   float* best, int64_t* best_j) {
  for (int m = 0; m < kMR; ++m) {
    best[m] = -INFINITY;
    best_j[m] = skip_first_b ? 1 : 0;
  }
  for (int64_t j0 = 0; j0 < n_b; j0 += kNR) {
    if (n_b - j0 <= kLanes) tile<1>(a, bt, cols, ldb, j0, n_b, skip_first_b, best, best_j);
    else tile<kNV>(a, bt, cols, ldb, j0, n_b, skip_first_b, best, best_j);
  }
}

}  // namespace

void tome_plan(const PlanParams& p, int64_t batch_begin, int64_t batch_end) {
  const int64_t n_a = (p.tokens + 1) / 2, n_b = p.tokens / 2, cols = p.cols, r = p.r;
  const int64_t ldb = round_up(std::max<int64_t>(n_b, 1), kNR);
  thread_local std::vector<float> a_buf, b_rows, bt_buf, node_max;
  thread_local std::vector<int64_t> node_idx, order;
  a_buf.assign(round_up(n_a, kMR) * cols, 0.f);  // padding rows stay zero
  bt_buf.assign(cols * ldb, 0.f);                // padding columns stay zero
  b_rows.resize(n_b * cols);
  node_max.resize(round_up(n_a, kMR));
  node_idx.resize(round_up(n_a, kMR));
  order.resize(n_a);

  for (int64_t b = batch_begin; b < batch_end; ++b) {
    const char* batch = static_cast<const char*>(p.metric) + b * p.tokens * cols * dtype_size(p.dtype);
    // One sequential pass over the tokens (the metric is read once, in order).
    for (int64_t t = 0; t < p.tokens; ++t)
      load_normalized(batch, p.dtype, cols, t, (t % 2 ? b_rows.data() : a_buf.data()) + (t / 2) * cols);
    // B transposed, kLanes rows at a time so that each store fills a cache line.
    for (int64_t j0 = 0; j0 < n_b; j0 += kLanes) {
      const int64_t jn = std::min<int64_t>(kLanes, n_b - j0);
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t jj = 0; jj < jn; ++jj) bt_buf[c * ldb + j0 + jj] = b_rows[(j0 + jj) * cols + c];
    }
    for (int64_t i0 = 0; i0 < n_a; i0 += kMR)
      best_partners(a_buf.data() + i0 * cols, bt_buf.data(), cols, ldb, n_b, p.distill_token,
                    node_max.data() + i0, node_idx.data() + i0);
    // Descending best score, stable; the class token (A row 0) ranks last, so
    // it is never merged, not even after rows whose best score is -inf.
    const int64_t first = p.class_token ? 1 : 0;
    std::iota(order.begin(), order.end() - first, first);
    if (p.class_token) order.back() = 0;
    std::stable_sort(order.begin(), order.end() - first,
                     [&](int64_t x, int64_t y) { return node_max[x] > node_max[y]; });
    int64_t* unm = p.unm + b * (n_a - r);
    int64_t* src = p.src + b * r;
    int64_t* dst = p.dst + b * r;
    for (int64_t k = 0; k < r; ++k) {
      src[k] = order[k];
      dst[k] = node_idx[order[k]];
    }
    std::copy(order.begin() + r, order.end(), unm);
    if (p.class_token) std::sort(unm, unm + (n_a - r));
  }
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
