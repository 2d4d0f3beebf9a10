// The body of the CUDA distillation row kernel, generic over where a row's
// elements come from (`Src`) and how partial sums are combined (`Red`):
//   - one block per row reading global memory three times (any GPU, any V);
//   - a cluster of blocks per row on sm_90, each keeping its slice of the row
//     in shared memory, so HBM is read once (distill_kernel.cu).
// Three sweeps: (1) log-sum-exps, (2) the sums some gradients need,
// (3) gradient and remaining losses. Per-element math: flashkd/divergence.h.
//
// Src must provide:
//   int64_t begin, end;                      columns this block owns ([begin, end) of cols)
//   void first(int64_t c, float (&s)[8], float (&t)[8], bool soft);   sweep 1 read (-inf past vocab)
//   float student_at(int64_t col), teacher_at(int64_t col);          one element, from global memory
//   void again(int64_t c, float (&s)[8], float (&t)[8], bool soft);   later reads
//   void store(int64_t c, const float (&g)[8]);                      gradient write
// Red must provide sum<N>(float (&)[N]), max<N>(float (&)[N]),
//   argmax(float&, int64_t&) and bool leader() (one thread writes the outputs).
#pragma once
#include "device_utils.cuh"
#include "flashkd/distill_params.h"

namespace flashkd::cuda {

// Running log-sum-exp of one thread's elements, updated 8 at a time.
struct OnlineLse {
  float m = kNegInf, s = 0.f;
  __device__ __forceinline__ void add(const float (&x)[kVec]) {
    float mm = m;
#pragma unroll
    for (int j = 0; j < kVec; ++j) mm = fkd_max(mm, x[j]);
    if (mm == kNegInf) return;
    float acc = s * fkd_exp(m - mm);
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc += fkd_exp(x[j] - mm);
    s = acc;
    m = mm;
  }
};

template <int N, class Red>
__device__ __forceinline__ void reduce_lse(OnlineLse (&l)[N], float (&out)[N], Red& red) {
  float m[N], s[N];
#pragma unroll
  for (int i = 0; i < N; ++i) m[i] = l[i].m;
  red.max(m);
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = m[i] == kNegInf ? 0.f : l[i].s * fkd_exp(l[i].m - m[i]);
  red.sum(s);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = m[i] == kNegInf ? kNegInf : m[i] + logf(s[i]);
}

__device__ __forceinline__ void track_argmax(const float (&x)[kVec], int64_t col, float& best, int64_t& at) {
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    if (x[j] > best) { best = x[j]; at = col + j; }
}

// Whether a row needs no computation at all (an ignored token with no
// per-token outputs): the caller then only zeroes its gradient.
__device__ __forceinline__ bool row_is_skipped(const DistillParams& p, int64_t row) {
  return p.labels && p.labels[row] == p.ignore_index && !p.stats && !p.lse;
}

template <Divergence D, class Src, class Red>
__device__ __forceinline__ void distill_row_body(const DistillParams& p, int64_t row, Src& src, Red& red) {
  using Math = DivergenceMath<D>;
  const int64_t label = p.labels ? p.labels[row] : -1;
  const bool ignored = p.labels && label == p.ignore_index;
  const bool want_stats = p.stats != nullptr;
  const bool soft = p.teacher != nullptr;
  const bool has_label = !ignored && label >= 0;  // validated to be < vocab
  const bool hard = has_label && p.hard_weight != 0.f;
  const float inv_t = p.inv_temperature;
  const float cap = p.softcap, eps = p.label_smoothing;
  const bool separate_ce = (hard || p.lse) && inv_t != 1.f;
  const DivergenceConsts& k = p.consts;
  const int64_t n = p.vocab;
  const int64_t step = int64_t(blockDim.x) * kVec;
  const int64_t first = src.begin + int64_t(threadIdx.x) * kVec;
  const int64_t vend = src.end < n ? src.end : n;  // columns of this block that count

  auto apply_cap = [&](float (&s)[kVec]) {
    if (cap > 0.f) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) s[j] = soft_cap(s[j], cap);
    }
  };

  // The label's logits, read before any barrier: sweep 3 may overwrite the
  // student row with its gradient (in place), possibly from another block.
  float zlabel = has_label ? src.student_at(label) : 0.f;
  if (cap > 0.f) zlabel = soft_cap(zlabel, cap);
  const float tlabel = soft && has_label ? src.teacher_at(label) : 0.f;

  // Sweep 1: log-sum-exps (student at T, teacher at T, student at 1, TAID mixture).
  OnlineLse lse[4];
  float sbest = kNegInf, tbest = kNegInf, zsum = 0.f;
  int64_t sat = 0, tat = 0;
  for (int64_t c = first; c < src.end; c += step) {
    float s[kVec], t[kVec], x[kVec];
    src.first(c, s, t, soft);  // -inf past the vocabulary
    apply_cap(s);
    if (hard && eps != 0.f) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) zsum += c + j < n ? s[j] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = c + j < n ? s[j] * inv_t : kNegInf;
    lse[0].add(x);
    if (separate_ce) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] = c + j < n ? s[j] : kNegInf;
      lse[2].add(x);
    }
    if (want_stats) track_argmax(x, c, sbest, sat);
    if (soft) {
      if (want_stats) track_argmax(t, c, tbest, tat);
      if constexpr (D == Divergence::kTAID) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[j] = taid_logit(s[j] * inv_t, t[j] * inv_t, k.lambda);
        lse[3].add(x);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) t[j] *= inv_t;
      lse[1].add(t);
    }
  }
  float lses[4];
  reduce_lse(lse, lses, red);
  if (hard && eps != 0.f) {
    float z[1] = {zsum};
    red.sum(z);
    zsum = z[0];
  }
  RowScalars rs;
  rs.A = lses[0];
  rs.B = lses[1];
  rs.R = lses[3];
  const float lse1 = separate_ce ? lses[2] : lses[0];
  bool agree = false;
  if (want_stats && soft) {
    red.argmax(sbest, sat);
    red.argmax(tbest, tat);
    agree = sat == tat;
  }

  // Sweep 2: the sums some gradients need (see divergence.h).
  if constexpr (Math::kNeedsPass2) {
    if (soft) {
      float c2[2] = {0.f, 0.f};
      for (int64_t c = first; c < vend; c += step) {
        float s[kVec], t[kVec];
        src.again(c, s, t, true);
        apply_cap(s);
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          if (c + j < n) Math::pass2(s[j] * inv_t - rs.A, t[j] * inv_t - rs.B, 0.f, k, c2[0], c2[1]);
      }
      red.sum(c2);
      rs.c0 = c2[0];
      rs.c1 = c2[1];
    }
  }

  // Sweep 3: gradient (padded columns get 0), pass-free losses, entropies.
  float scale = ignored ? 0.f : (p.weights ? p.weights[row] : 1.f);
  if (p.grad_scale) scale *= *p.grad_scale;
  if (p.row_scale) scale *= p.row_scale[row];
  const float g_soft = scale * p.soft_weight * inv_t;
  const float g_hard = hard ? scale * p.hard_weight : 0.f;
  const float g_soft_max = g_hard * (1.f + 2.f * p.z_loss * lse1);  // d(ce + z lse^2)/dz = this * softmax
  const float g_uniform = g_hard * eps / static_cast<float>(n);
  const float g_label = g_hard * (1.f - eps);
  float acc[3] = {0.f, 0.f, 0.f};  // pass-free loss, sum q log q, sum p log p
  for (int64_t c = first; c < src.end; c += step) {
    float s[kVec], t[kVec], g[kVec];
    src.again(c, s, t, soft);
    apply_cap(s);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float gj = 0.f;
      if (c + j < n) {
        if (soft) {
          const float a = s[j] * inv_t, b = t[j] * inv_t;
          const float lq = a - rs.A, lp = b - rs.B;
          const float lr = D == Divergence::kTAID ? taid_logit(a, b, k.lambda) - rs.R : 0.f;
          gj = g_soft * Math::grad(lq, lp, lr, rs, k, acc[0]);
          if (want_stats) {
            acc[1] += xdiff(fkd_exp(lq), lq, 0.f);
            acc[2] += xdiff(fkd_exp(lp), lp, 0.f);
          }
        } else if (want_stats) {
          const float lq = s[j] * inv_t - rs.A;
          acc[1] += xdiff(fkd_exp(lq), lq, 0.f);
        }
        if (hard) gj += g_soft_max * fkd_exp(s[j] - lse1) - g_uniform - (c + j == label ? g_label : 0.f);
        if (cap > 0.f) gj *= soft_cap_grad(s[j], cap);
      }
      g[j] = ignored ? 0.f : gj;
    }
    src.store(c, g);
  }
  red.sum(acc);

  if (red.leader()) {
    const float divergence = soft ? (Math::kNeedsPass2 ? rs.c0 : acc[0]) : 0.f;
    float loss = soft ? p.soft_weight * divergence : 0.f;
    if (hard)
      loss += p.hard_weight * ((1.f - eps) * (lse1 - zlabel) + eps * (lse1 - zsum / static_cast<float>(n)) +
                               p.z_loss * lse1 * lse1);
    if (p.lse) p.lse[row] = lse1;
    const float w = p.weights ? p.weights[row] : 1.f;
    p.loss[row] = ignored ? 0.f : w * loss;
    if (want_stats) {
      float* st = p.stats + row * kNumStats;
      st[kStatDivergence] = divergence;
      st[kStatStudentEntropy] = -acc[1];
      st[kStatTeacherEntropy] = -acc[2];
      st[kStatStudentLogprob] = has_label ? zlabel * inv_t - rs.A : 0.f;
      st[kStatTeacherLogprob] = has_label && soft ? tlabel * inv_t - rs.B : 0.f;
      p.agree[row] = agree;
    }
  }
}

}  // namespace flashkd::cuda
