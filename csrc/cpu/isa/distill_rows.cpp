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

// Float32 rows with unit column stride are used where they lie instead of
// being copied into the scratch rows first: the teacher's always, the
// student's when nothing writes it (no gradient, no soft cap), and the
// gradient is computed in its output row (the student's copy is made there,
// or, with inplace_backward, is the row itself). A float32 fkl call spent
// about a fifth of its time in those copies.
struct RowSources {
  bool teacher_in_place, student_in_place, grad_in_place;
  explicit RowSources(const DistillParams& p) {
    const bool f32_student = p.student_dtype == DType::kFloat32 && p.student_layout.col_stride == 1;
    teacher_in_place = p.teacher && p.teacher_dtype == DType::kFloat32 && p.teacher_layout.col_stride == 1;
    grad_in_place = p.grad && f32_student && p.grad_layout.col_stride == 1;  // the gradient has the student's dtype
    student_in_place = !p.grad && f32_student && !(p.softcap > 0.f);
  }
};

template <Divergence D, bool kStats, bool kSoftOnly>
void rows_impl(const DistillParams& p, int64_t begin, int64_t end) {
  const int64_t n = p.vocab;
  // The student's row (overwritten by its gradient), the teacher's, and the
  // row kernel's scratch rows, in float32.
  thread_local std::vector<float> buffer;
  const int64_t stride = std::max<int64_t>(n, 1);
  buffer.resize(6 * stride);
  const RowScratch scratch{buffer.data() + 2 * stride, buffer.data() + 3 * stride, buffer.data() + 4 * stride,
                           buffer.data() + 5 * stride};
  const RowSources in_place(p);
  const float grad_scale = p.grad_scale ? *p.grad_scale : 1.f;
  const int64_t gsize = dtype_size(p.student_dtype);

  for (int64_t r = begin; r < end; ++r) {
    const int64_t label = p.labels ? p.labels[r] : -1;
    const bool ignored = p.labels && label == p.ignore_index;
    const float weight = p.weights ? p.weights[r] : 1.f;
    const char* student_row = static_cast<const char*>(p.student) + p.student_layout.row_offset(r) * gsize;
    char* grad_row = p.grad ? static_cast<char*>(p.grad) + p.grad_layout.row_offset(r) * gsize : nullptr;
    // distill_row writes s only with a gradient or a soft cap, where s is never the student's own row.
    float* s = in_place.grad_in_place      ? reinterpret_cast<float*>(grad_row)
               : in_place.student_in_place ? const_cast<float*>(reinterpret_cast<const float*>(student_row))
                                           : buffer.data();
    const float* t = nullptr;

    if (!ignored || kStats || p.lse) {
      if (!in_place.student_in_place && static_cast<const void*>(s) != student_row)
        load_floats(student_row, p.student_dtype, p.student_layout.col_stride, n, s);
      if (p.teacher) {
        const char* teacher_row =
            static_cast<const char*>(p.teacher) + p.teacher_layout.row_offset(r) * dtype_size(p.teacher_dtype);
        if (in_place.teacher_in_place) {
          t = reinterpret_cast<const float*>(teacher_row);
        } else {
          load_floats(teacher_row, p.teacher_dtype, p.teacher_layout.col_stride, n, buffer.data() + stride);
          t = buffer.data() + stride;
        }
      }
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
    const int64_t gstride = p.grad_layout.col_stride;
    if (ignored) std::fill(s, s + n, 0.f);
    if (!in_place.grad_in_place) store_floats(s, n, grad_row, p.student_dtype, gstride);
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
