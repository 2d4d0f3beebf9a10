// Float sums over a row in one fixed order, whatever the instruction set.
//
// `#pragma omp simd reduction(+ : x)` lets the compiler choose the order: one
// partial sum per vector lane (8 under AVX2, 16 under AVX-512), or a single
// running sum where it does not vectorize (sanitizer builds, other compilers).
// The float32 error of a running sum grows with the entries each partial sum
// takes, so a 262144-entry softmax denominator was about 8e-6 off under AVX2
// and 4e-6 under AVX-512, and the two gave different losses.
//
// row_sums fixes the order instead: kSumLanes interleaved partial sums (the
// width of an AVX-512 vector of floats, two AVX2 vectors), restarted every
// kSumBlock entries, folded pairwise, and the block totals added in turn.
// Each partial sum then takes at most kSumBlock / kSumLanes entries and the
// total n / kSumBlock, so the error no longer grows with the row on the scale
// of the vocabulary, and the order is written in the source, not chosen by the
// vectorizer. Used by the distillation rows, by the channel sums of the
// ToMe and top-k kernels and by the ternary weight scale (in float64), whose
// results are therefore the same on every instruction set.
#pragma once
#include <algorithm>
#include <cstdint>

namespace flashkd::cpu {
namespace {  // internal linkage: each instruction set's object builds its own

constexpr int kSumLanes = 16;
constexpr int64_t kSumBlock = 1024;

// K sums taken together by one loop (pass 2 of jsd/skl/srkl needs two), of
// floats, or of doubles (the ternary weight scale's mean |w|).
template <int K, class T = float>
struct Sums {
  static constexpr int kCount = K;
  using Value = T;
  T v[K] = {};
};

// The sums of term(j) over j in [0, n), as the Sums<K, T> that term returns
// (how many, and of which type, follow from it); term may also write
// per-entry outputs.
template <class Term>
inline auto row_sums(int64_t n, Term term) {
  using S = decltype(term(int64_t{0}));
  constexpr int K = S::kCount;
  using T = typename S::Value;
  S total;
  for (int64_t begin = 0; begin < n; begin += kSumBlock) {
    const int64_t end = std::min(n, begin + kSumBlock);
    T lanes[K][kSumLanes] = {};
    int64_t j = begin;
    for (; j + kSumLanes <= end; j += kSumLanes) {
#pragma omp simd
      for (int l = 0; l < kSumLanes; ++l) {
        const S t = term(j + l);
        for (int k = 0; k < K; ++k) lanes[k][l] += t.v[k];
      }
    }
    for (int l = 0; j + l < end; ++l) {  // the block's last, partial group of lanes
      const S t = term(j + l);
      for (int k = 0; k < K; ++k) lanes[k][l] += t.v[k];
    }
    for (int width = kSumLanes / 2; width > 0; width /= 2)
      for (int k = 0; k < K; ++k)
        for (int l = 0; l < width; ++l) lanes[k][l] += lanes[k][l + width];
    for (int k = 0; k < K; ++k) total.v[k] += lanes[k][0];
  }
  return total;
}

// The sum of term(j) over j in [0, n), in row_sums' order, in the type term returns.
template <class Term>
inline auto row_sum(int64_t n, Term term) {
  using T = decltype(term(int64_t{0}));
  return row_sums(n, [&](int64_t j) { return Sums<1, T>{{term(j)}}; }).v[0];
}

}  // namespace
}  // namespace flashkd::cpu
