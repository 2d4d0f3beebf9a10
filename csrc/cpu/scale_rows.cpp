// CPU backward scaling: grad[row] = round(float(grad[row]) * factor), the
// product formed in float32 and rounded once to the gradient's dtype.
#include <vector>
#include "flashkd/cpu_convert.h"
#include "kernels.h"

namespace flashkd::cpu {

void scale_rows(void* grad, DType dtype, const RowLayout& layout, int64_t begin, int64_t end, int64_t cols,
                const float* factor, bool per_row) {
  std::vector<float> row(cols);
  const int64_t esize = dtype_size(dtype);
  for (int64_t r = begin; r < end; ++r) {
    const float f = factor[per_row ? r : 0];
    if (f == 1.f) continue;
    char* g = static_cast<char*>(grad) + layout.row_offset(r) * esize;
    load_floats(g, dtype, layout.col_stride, cols, row.data());
    for (float& v : row) v *= f;
    store_floats(row.data(), cols, g, dtype, layout.col_stride);
  }
}

}  // namespace flashkd::cpu
