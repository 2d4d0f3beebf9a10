// Row loop of the CPU distillation kernel. This file is compiled once per
// instruction set (FKD_CPU_ISA names the namespace); cpu_dispatch.cpp picks one
// at run time, so AVX-512 machines get AVX-512 code from a portable wheel.
#include <algorithm>
#include <cstring>
#include <vector>
#include "distill_row.h"
#include "flashkd/cpu_convert.h"
#include "kernels.h"

namespace flashkd::cpu::FKD_CPU_ISA {
namespace {

template <Divergence D, bool kStats, bool kSoftOnly>
void rows_impl(const DistillParams& p, int64_t begin, int64_t end) {
  const int64_t n = p.vocab;
  // The student's row (overwritten by its gradient), the teacher's, and the
  // row kernel's scratch rows, in float32.
  thread_local std::vector<float> buffer;
  const int64_t stride = std::max<int64_t>(n, 1);
  buffer.resize(6 * stride);
  float* s = buffer.data();
  float* t = p.teacher ? buffer.data() + stride : nullptr;
  const RowScratch scratch{buffer.data() + 2 * stride, buffer.data() + 3 * stride, buffer.data() + 4 * stride,
                           buffer.data() + 5 * stride};
  const float grad_scale = p.grad_scale ? *p.grad_scale : 1.f;
  const int64_t gsize = dtype_size(p.student_dtype);

  for (int64_t r = begin; r < end; ++r) {
    const int64_t label = p.labels ? p.labels[r] : -1;
    const bool ignored = p.labels && label == p.ignore_index;
    const float weight = p.weights ? p.weights[r] : 1.f;

    if (!ignored || kStats || p.lse) {
      load_floats(static_cast<const char*>(p.student) + p.student_layout.row_offset(r) * gsize,
                  p.student_dtype, p.student_layout.col_stride, n, s);
      if (t)
        load_floats(static_cast<const char*>(p.teacher) +
                        p.teacher_layout.row_offset(r) * dtype_size(p.teacher_dtype),
                    p.teacher_dtype, p.teacher_layout.col_stride, n, t);
      const float scale = weight * grad_scale * (p.row_scale ? p.row_scale[r] : 1.f);
      const RowResult res = distill_row<D, kStats, kSoftOnly>(s, t, n, ignored ? -1 : label, p.grad != nullptr,
                                                              scale, p, p.lse ? p.lse + r : nullptr, scratch);
      p.loss[r] = ignored ? 0.f : weight * res.loss;
      if constexpr (kStats) {
        std::copy(res.stats, res.stats + kNumStats, p.stats + r * kNumStats);
        p.agree[r] = res.agree;
      }
    } else {
      p.loss[r] = 0.f;
      if (p.lse) p.lse[r] = 0.f;
    }
    if (!p.grad) continue;  // loss and stats only
    char* grad_row = static_cast<char*>(p.grad) + p.grad_layout.row_offset(r) * gsize;
    const int64_t gstride = p.grad_layout.col_stride;
    if (ignored) std::fill(s, s + n, 0.f);
    store_floats(s, n, grad_row, p.student_dtype, gstride);
    // Padded vocabulary columns never receive gradient (zero bits in every dtype).
    for (int64_t c = n; c < p.cols; ++c) std::memset(grad_row + c * gstride * gsize, 0, gsize);
  }
}

struct RowsLauncher {
  const DistillParams& p;
  int64_t begin, end;
  template <Divergence D>
  void operator()() const {
    const bool soft_only = p.hard_weight == 0.f && !(p.softcap > 0.f);
    if (p.stats) rows_impl<D, true, false>(p, begin, end);  // extra passes anyway: the general form
    else if (soft_only) rows_impl<D, false, true>(p, begin, end);
    else rows_impl<D, false, false>(p, begin, end);
  }
};

}  // namespace

void distill_rows(const DistillParams& p, int64_t begin, int64_t end) {
  dispatch_divergence(p.divergence, RowsLauncher{p, begin, end});
}

}  // namespace flashkd::cpu::FKD_CPU_ISA
