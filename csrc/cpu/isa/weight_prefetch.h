// Software prefetch of packed weight rows for the weight-decoding GEMMs at
// decode sizes (ternary and int4; quant_ternary_gemm.cpp, quant_int4_gemm.cpp).
//
// Why: those kernels read a few weight rows in lockstep, and a packed row is
// short (1 KB ternary, 2 KB int4 at K = 4096): each block of rows is a handful
// of short streams that the hardware prefetcher, which stops at 4 KB pages,
// picks up too late. The ternary GEMM read its weights at about a third of
// the bandwidth the int8 GEMM reaches. Requesting, as each block starts, the
// block about 8 KB ahead keeps enough cache lines in flight. Measured on this
// project's 2-core AVX-512 EPYC, weights read from memory, with and without
// the prefetch alternated in one process (medians, 2 threads): ternary
// M = 1, N = K = 4096 0.44 -> 0.25 ms, N = K = 8192 1.70 -> 1.03 ms,
// N = 16384, K = 2048 0.94 -> 0.50 ms, M = 4 0.67 -> 0.39 ms; int4 M = 1,
// N = K = 4096 1.28 -> 1.13 ms (one thread 1.90 -> 1.68 ms), N = 14336,
// K = 4096 4.43 -> 4.01 ms. Rows of 4 KB or more (ternary K = 16384, int4
// K >= 8192) gained nothing, so they get none. Neither does the int8 GEMM:
// its weights stream at close to the bandwidth already, and the same
// prefetch made it slower on one thread.
#pragma once
#include <algorithm>
#include <cstdint>

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

constexpr int64_t kPrefetchAheadBytes = 8192;
constexpr int64_t kCacheLine = 64;
constexpr int64_t kPageBytes = 4096;

// Into L2 (prefetcht1 on x86): into L1 (prefetcht0) it made the ternary GEMM
// slower. GCC deems a function whose only effect is __builtin_prefetch
// "const" and deletes calls to it (the first build had no prefetch left);
// the empty volatile asm gives the loop an effect it must keep.
inline void prefetch_bytes(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += kCacheLine) {
    __builtin_prefetch(p + o, 0, 2);
    asm volatile("");
  }
}

// Rows [n0, n1) of a packed weight matrix, stored back to back `row_bytes`
// apart (the glue makes the packed weights contiguous), are read in blocks of
// `block_rows` rows. Called as the block at row n starts, this requests the
// rows that lie about kPrefetchAheadBytes beyond it (at least the next block),
// ending before n1; the first block also requests those in between.
inline void prefetch_rows_ahead(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t n0, int64_t n1,
                                int64_t block_rows) {
  // Rows of a page or more: the hardware's streams keep up. (Empty rows: K = 0.)
  if (row_bytes >= kPageBytes || row_bytes <= 0) return;
  const int64_t ahead = block_rows * std::max<int64_t>(1, kPrefetchAheadBytes / (block_rows * row_bytes));
  const int64_t from = n == n0 ? n + block_rows : n + ahead;
  const int64_t to = std::min(n1, n + ahead + block_rows);
  if (from < to) prefetch_bytes(w + from * row_bytes, (to - from) * row_bytes);
}

}  // namespace
}  // namespace flashkd::cpu::FKD_CPU_ISA
