// The distillation row program: what one block does for its columns of one
// token row. Three sweeps (log-sum-exps and argmaxes; the sums some
// divergences need, "pass 2"; the gradient with the pass-free loss and the
// entropies), with a reduction after each. The per-element math is
// flashkd/divergence.h, shared with the CPU.
//
// Both CUDA kernels run this one program; they differ in two policies:
//   Source  where a thread's 8 columns come from: global memory (GlobalRow,
//           the streaming kernel in distill_kernel.cu) or this block's slice
//           of the row cached in shared memory (distill_cluster.cu);
//   Combine how block-level partials become row totals: as they are when one
//           block owns the row (SingleBlock), or merged across the blocks of
//           a thread-block cluster that split the row between them.
#pragma once
#include "device_utils.cuh"
#include "flashkd/distill_params.h"

namespace flashkd::cuda {

// Running log-sum-exp of some elements: max m and s = sum exp(x - m).
// Partials over disjoint elements merge exactly (merge below).
// m is the max of the entries that are not NaN (fmaxf skips NaN), so that a
// NaN cannot hide the entries before it; a NaN entry, or a +inf one, makes s
// NaN instead, and s stays NaN through every later add and merge (0 * NaN),
// which is how LogNorm::poison finds the row. While m is -inf, s is 0 or NaN.
struct OnlineLse {
  float m = kNegInf, s = 0.f;
  __device__ __forceinline__ void add(const float (&x)[kVec]) {
    float mm = m;
#pragma unroll
    for (int j = 0; j < kVec; ++j) mm = fmaxf(mm, x[j]);
    if (mm == kNegInf) {  // only -inf and NaN entries so far
#pragma unroll
      for (int j = 0; j < kVec; ++j) s += x[j] != x[j] ? x[j] : 0.f;
      return;
    }
    float acc = s * fkd_exp(m - mm);
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc += fkd_exp(x[j] - mm);
    s = acc;
    m = mm;
  }
  __device__ __forceinline__ LogNorm norm() const { return m == kNegInf ? LogNorm{kNegInf, s} : LogNorm{m, logf(s)}; }
};

__device__ __forceinline__ OnlineLse merge(const OnlineLse& a, const OnlineLse& b) {
  const float m = fkd_max(a.m, b.m);
  if (m == kNegInf) return {kNegInf, a.s + b.s};
  return {m, a.s * fkd_exp(a.m - m) + b.s * fkd_exp(b.m - m)};
}

// Merges each thread's OnlineLse values into the block's (every thread gets them).
template <int N>
__device__ __forceinline__ void block_merge(OnlineLse (&l)[N], float* scratch) {
  float m[N], s[N];
#pragma unroll
  for (int i = 0; i < N; ++i) m[i] = l[i].m;
  block_allreduce(m, scratch, MaxOp{});
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = m[i] == kNegInf ? l[i].s : l[i].s * fkd_exp(l[i].m - m[i]);
  block_allreduce(s, scratch, SumOp{});
#pragma unroll
  for (int i = 0; i < N; ++i) l[i] = OnlineLse{m[i], s[i]};
}

// Largest value and its column, the first column on ties.
struct ArgMax {
  float val = kNegInf;
  int64_t at = 0;
  __device__ __forceinline__ void track(const float (&x)[kVec], int64_t col) {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (x[j] > val) { val = x[j]; at = col + j; }
  }
};

__device__ __forceinline__ ArgMax merge(const ArgMax& a, const ArgMax& b) {
  return b.val > a.val || (b.val == a.val && b.at < a.at) ? b : a;
}

// Sweep 1's partial results.
struct Sweep1 {
  OnlineLse lse[3];  // student at T, teacher at T, student at T = 1 (hard term)
  float zsum = 0.f;  // sum of the student's logits (label smoothing)
  ArgMax student_max, teacher_max;
};

__device__ __forceinline__ Sweep1 merge(const Sweep1& a, const Sweep1& b) {
  Sweep1 r;
#pragma unroll
  for (int i = 0; i < 3; ++i) r.lse[i] = merge(a.lse[i], b.lse[i]);
  r.zsum = a.zsum + b.zsum;
  r.student_max = merge(a.student_max, b.student_max);
  r.teacher_max = merge(a.teacher_max, b.teacher_max);
  return r;
}

// A few summed floats (pass-2 sums, sweep 3's loss and entropies).
template <int N>
struct Sums {
  float v[N];
};

template <int N>
__device__ __forceinline__ Sums<N> merge(const Sums<N>& a, const Sums<N>& b) {
  Sums<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}

// One block owns the row: its block-level results are the row's.
struct SingleBlock {
  template <typename T>
  __device__ __forceinline__ T across(const T& v) { return v; }
  __device__ __forceinline__ bool leader() const { return true; }
};

// Threads for a block that sweeps `columns`: at least 4 groups of 8 columns
// per thread, 64 to `max_threads`.
inline int threads_for_columns(int64_t columns, int max_threads) {
  int t = 64;
  while (t < max_threads && int64_t(t) * kVec * 4 < columns) t *= 2;
  return t;
}

// Shared memory the row program reduces through.
struct RowScratch {
  float f[32 * 4];
  int64_t i[32];
};

// One row of both logit matrices in global memory, read 8 columns at a time
// (16-byte loads where the row allows); columns at or past the vocabulary read -inf.
template <typename Ts, typename Tt>
struct GlobalRow {
  const Ts* student_row;
  const Tt* teacher_row;  // null without a teacher
  int64_t ss, ts, vocab;
  bool svec, tvec;

  __device__ __forceinline__ GlobalRow(const DistillParams& p, int64_t row)
      : student_row(static_cast<const Ts*>(p.student) + p.student_layout.row_offset(row)),
        teacher_row(p.teacher ? static_cast<const Tt*>(p.teacher) + p.teacher_layout.row_offset(row) : nullptr),
        ss(p.student_layout.col_stride),
        ts(p.teacher ? p.teacher_layout.col_stride : 1),
        vocab(p.vocab),
        svec(vec_ok(student_row, ss)),
        tvec(teacher_row && vec_ok(teacher_row, ts)) {}

  __device__ __forceinline__ void student(int64_t c, float (&x)[kVec]) const {
    load8(student_row, c, ss, vocab, svec, x);
  }
  __device__ __forceinline__ void teacher(int64_t c, float (&x)[kVec]) const {
    load8(teacher_row, c, ts, vocab, tvec, x);
  }
};

// Runs the row program for columns [lo, hi) of `row` (hi <= p.cols). Every
// thread of the block calls it; with a cluster Combine every block of the
// cluster calls it for the same row, each with its own columns, and the
// leader (rank 0) writes the row's scalar outputs.
template <Divergence D, typename Ts, typename Tt, typename Source, typename Combine>
__device__ __forceinline__ void distill_row(const DistillParams& p, int64_t row, const GlobalRow<Ts, Tt>& g,
                                            const Source& src, int64_t lo, int64_t hi, Combine& combine,
                                            RowScratch& sh) {
  using Math = DivergenceMath<D>;
  const int64_t label = p.labels ? p.labels[row] : -1;
  const bool ignored = p.labels && label == p.ignore_index;
  const bool want_stats = p.stats != nullptr;
  const bool soft = p.teacher != nullptr;
  const bool hard = !ignored && label >= 0 && p.hard_weight != 0.f;
  const float inv_t = p.inv_temperature;
  const float cap = p.softcap, eps = p.label_smoothing;
  const bool separate_ce = (hard || p.lse) && inv_t != 1.f;
  const DivergenceConsts& k = p.consts;
  const bool writes_row = combine.leader() && threadIdx.x == 0;

  const bool want_grad = p.grad != nullptr;  // null: loss and stats only
  Ts* grow = want_grad ? static_cast<Ts*>(p.grad) + p.grad_layout.row_offset(row) : nullptr;
  const int64_t gs = p.grad_layout.col_stride;
  const bool gvec = want_grad && vec_ok(grow, gs);
  const int64_t n = p.vocab;
  const int64_t load_end = hi < n ? hi : n;
  const int64_t step = int64_t(blockDim.x) * kVec;
  const int64_t first = lo + int64_t(threadIdx.x) * kVec;

  // Student logits as the math sees them: soft-capped when asked.
  auto load_student = [&](int64_t c, float (&s)[kVec]) {
    src.student(c, s);
    if (cap > 0.f) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) s[j] = soft_cap(s[j], cap);
    }
  };

  if (ignored && !want_stats && !p.lse) {
    const float zeros[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (want_grad)
      for (int64_t c = first; c < hi; c += step) store8(grow, c, gs, hi, gvec, zeros);
    if (writes_row) p.loss[row] = 0.f;
    return;
  }

  // Sweep 1: log-sum-exps (student at T, teacher at T, student at 1), argmaxes.
  Sweep1 s1;
  for (int64_t c = first; c < load_end; c += step) {
    float s[kVec], t[kVec], x[kVec];
    load_student(c, s);
    if (hard && eps != 0.f) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) s1.zsum += c + j < n ? s[j] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = s[j] * inv_t;
    s1.lse[0].add(x);
    if (separate_ce) s1.lse[2].add(s);
    if (want_stats) s1.student_max.track(s, c);
    if (soft) {
      src.teacher(c, t);
      if (want_stats) s1.teacher_max.track(t, c);
#pragma unroll
      for (int j = 0; j < kVec; ++j) t[j] *= inv_t;
      s1.lse[1].add(t);
    }
  }
  // The label's logits, read from global memory before any thread passes the
  // reductions below: sweep 3 may overwrite the student row with its gradient
  // (in place), and in a cluster another block may own the label's column.
  const bool has_label = !ignored && label >= 0;  // validated to be < vocab
  float zlabel = has_label ? to_float(g.student_row[label * g.ss]) : 0.f;
  if (cap > 0.f) zlabel = soft_cap(zlabel, cap);
  const float tlabel = soft && has_label ? to_float(g.teacher_row[label * g.ts]) : 0.f;
  block_merge(s1.lse, sh.f);
  if (hard && eps != 0.f) {
    float z[1] = {s1.zsum};
    block_allreduce(z, sh.f, SumOp{});
    s1.zsum = z[0];
  }
  if (want_stats && soft) {
    block_argmax(s1.student_max.val, s1.student_max.at, sh.f, sh.i);
    block_argmax(s1.teacher_max.val, s1.teacher_max.at, sh.f, sh.i);
  }
  s1 = combine.across(s1);
  RowScalars rs;
  rs.A = s1.lse[0].norm();
  rs.B = s1.lse[1].norm();
  const LogNorm lse1 = separate_ce ? s1.lse[2].norm() : rs.A;
  const float zsum = s1.zsum;
  const bool agree = want_stats && soft && s1.student_max.at == s1.teacher_max.at;

  // Sweep 2: the sums some gradients need (see divergence.h); for TAID the
  // log-sum-exp of its mixture, formed from log-probs (small numbers, so no
  // precision is lost at |z| ~ 1e4; softmax is shift invariant).
  if constexpr (Math::kNeedsPass2 || D == Divergence::kTAID) {
    if (soft) {
      Sums<2> c2{{0.f, 0.f}};
      OnlineLse mix[1];
      for (int64_t col = first; col < load_end; col += step) {
        float s[kVec], t[kVec], r[kVec];
        load_student(col, s);
        src.teacher(col, t);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float lq = rs.A.log_prob(s[j] * inv_t), lp = rs.B.log_prob(t[j] * inv_t);
          if constexpr (D == Divergence::kTAID) r[j] = taid_logit(lq, lp, k.lambda);
          else Math::pass2(entry<D>(lq, lp, k), k, c2.v[0], c2.v[1]);
        }
        if constexpr (D == Divergence::kTAID) mix[0].add(r);
      }
      if constexpr (D == Divergence::kTAID) {
        block_merge(mix, sh.f);
        rs.R = combine.across(mix[0]).norm();
      } else {
        block_allreduce(c2.v, sh.f, SumOp{});
        c2 = combine.across(c2);
        rs.c0 = c2.v[0];
        rs.c1 = c2.v[1];
      }
    }
  }

  // Sweep 3: gradient (padded columns get 0), pass-free losses, entropies.
  // NaN when either row held a NaN or +inf (LogNorm::poison), else 0: it
  // makes the row's loss, statistics and gradient NaN.
  const float poison = rs.A.poison() + rs.B.poison();
  float scale = ignored ? 0.f : (p.weights ? p.weights[row] : 1.f) + poison;
  if (p.grad_scale) scale *= *p.grad_scale;
  if (p.row_scale) scale *= p.row_scale[row];
  const float g_soft = scale * p.soft_weight * inv_t;
  const float g_hard = hard ? scale * p.hard_weight : 0.f;
  // d(ce + z lse^2)/dz = g_soft_max * softmax (0 without a hard term, where lse1 is unset)
  const float g_soft_max = hard ? g_hard * (1.f + 2.f * p.z_loss * lse1.value()) : 0.f;
  const float g_uniform = g_hard * eps / static_cast<float>(n);
  const float g_label = g_hard * (1.f - eps);
  Sums<3> acc{{0.f, 0.f, 0.f}};  // pass-free loss, sum q log q, sum p log p
  // Only the loss of fkl and taid, and the entropies, come from this sweep
  // besides the gradient.
  const bool sweep3_sums = want_stats || (soft && !Math::kNeedsPass2);
  const int64_t sweep3_end = want_grad ? hi : sweep3_sums ? load_end : lo;
  for (int64_t c = first; c < sweep3_end; c += step) {
    float s[kVec], t[kVec], gr[kVec];
    load_student(c, s);
    if (soft) src.teacher(c, t);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float gj = 0.f;
      if (c + j < n) {
        if (soft) {
          const float a = s[j] * inv_t, b = t[j] * inv_t;
          const float lq = rs.A.log_prob(a), lp = rs.B.log_prob(b);
          const float lr = D == Divergence::kTAID ? rs.R.log_prob(taid_logit(lq, lp, k.lambda)) : 0.f;
          const Entry e = entry<D>(lq, lp, k, lr);
          gj = g_soft * Math::grad(e, rs, k, acc.v[0]);
          if (want_stats) {
            acc.v[1] += xdiff(e.q, lq, 0.f);
            acc.v[2] += xdiff(e.p, lp, 0.f);
          }
        } else if (want_stats) {
          const float lq = rs.A.log_prob(s[j] * inv_t);
          acc.v[1] += xdiff(fkd_exp(lq), lq, 0.f);
        }
        if (hard) gj += g_soft_max * fkd_exp(lse1.log_prob(s[j])) - g_uniform - (c + j == label ? g_label : 0.f);
        if (cap > 0.f) gj *= soft_cap_grad(s[j], cap);
      }
      gr[j] = ignored ? 0.f : gj;
    }
    if (want_grad) store8(grow, c, gs, hi, gvec, gr);
  }
  if (sweep3_sums) {
    block_allreduce(acc.v, sh.f, SumOp{});
    acc = combine.across(acc);
  }

  if (writes_row) {
    const float divergence = soft ? (Math::kNeedsPass2 ? rs.c0 : acc.v[0]) + poison : 0.f;
    float loss = soft ? p.soft_weight * divergence : 0.f;
    if (hard)
      loss += p.hard_weight * (-(1.f - eps) * lse1.log_prob(zlabel) +
                               eps * ((lse1.max - zsum / static_cast<float>(n)) + lse1.log_sum) +
                               p.z_loss * lse1.value() * lse1.value());
    if (p.lse) p.lse[row] = lse1.value();
    const float w = p.weights ? p.weights[row] : 1.f;
    p.loss[row] = ignored ? 0.f : w * loss;
    if (want_stats) {
      float* st = p.stats + row * kNumStats;
      st[kStatDivergence] = divergence;
      st[kStatStudentEntropy] = -acc.v[1] + rs.A.poison();
      st[kStatTeacherEntropy] = -acc.v[2] + rs.B.poison();
      st[kStatStudentLogprob] = has_label ? rs.A.log_prob(zlabel * inv_t) : 0.f;
      st[kStatTeacherLogprob] = has_label && soft ? rs.B.log_prob(tlabel * inv_t) : 0.f;
      p.agree[row] = agree;
    }
  }
}

// Calls f.template operator()<D, Ts, Tt>() for p's divergence and the
// dtypes of its student and teacher logits (one kernel instance each).
template <typename F, Divergence D, typename Ts>
auto with_teacher_type(const DistillParams& p, const F& f) {
  switch (p.teacher_dtype) {
    case DType::kFloat32: return f.template operator()<D, Ts, float>();
    case DType::kBFloat16: return f.template operator()<D, Ts, __nv_bfloat16>();
    default: return f.template operator()<D, Ts, __half>();
  }
}

template <typename F>
struct WithStudentType {
  const DistillParams& p;
  const F& f;
  template <Divergence D>
  auto operator()() const {
    switch (p.student_dtype) {
      case DType::kFloat32: return with_teacher_type<F, D, float>(p, f);
      case DType::kBFloat16: return with_teacher_type<F, D, __nv_bfloat16>(p, f);
      default: return with_teacher_type<F, D, __half>(p, f);
    }
  }
};

template <typename F>
auto dispatch_row_types(const DistillParams& p, const F& f) {
  return dispatch_divergence(p.divergence, WithStudentType<F>{p, f});
}

}  // namespace flashkd::cuda
