// The CPU distillation row kernel on float32 rows already in cache.
// Included by distill_rows.cpp, which is compiled once per instruction set.
#pragma once
#include <cstdint>
#include "flashkd/distill_params.h"

namespace flashkd::cpu {

struct RowResult {
  float loss = 0.f;  // hard_weight * CE + soft_weight * D, unweighted by the token weight
  float stats[kNumStats] = {0.f, 0.f, 0.f, 0.f, 0.f};
  bool agree = false;
};

inline float row_max(const float* x, int64_t n, float mul) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) m = fkd_max(m, x[k] * mul);
  return m;
}

// log sum exp(x * mul); -inf when every entry is -inf.
inline float row_lse(const float* x, int64_t n, float mul) {
  const float m = row_max(x, n, mul);
  if (m == kNegInf) return kNegInf;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += fkd_exp(x[k] * mul - m);
  return m + std::log(sum);
}

inline int64_t first_argmax(const float* x, int64_t n) {
  const float m = row_max(x, n, 1.f);
  for (int64_t k = 0; k < n; ++k)
    if (x[k] == m) return k;
  return 0;
}

// -sum exp(l) * l over l = x * mul - lse (entropy of softmax(x * mul)).
inline float row_entropy(const float* x, int64_t n, float mul, float lse) {
  float h = 0.f;
#pragma omp simd reduction(+ : h)
  for (int64_t k = 0; k < n; ++k) {
    const float l = x[k] * mul - lse;
    h -= xdiff(fkd_exp(l), l, 0.f);
  }
  return h;
}

// Computes one token's loss and overwrites s[0..n) with
// grad_scale * d(loss)/d(student logits). `t` may be null (hard CE only).
// `label` < 0 means no label for this token.
template <Divergence D, bool kStats>
RowResult distill_row(float* s, const float* t, int64_t n, int64_t label, float grad_scale,
                      const DistillParams& p) {
  using Math = DivergenceMath<D>;
  const float inv_t = p.inv_temperature;
  const DivergenceConsts& k = p.consts;
  const bool hard = p.hard_weight != 0.f && label >= 0;
  const bool soft = t != nullptr;
  RowResult out;

  RowScalars rs;
  rs.A = row_lse(s, n, inv_t);
  const float lse1 = hard ? (inv_t == 1.f ? rs.A : row_lse(s, n, 1.f)) : 0.f;
  float divergence = 0.f;
  if (soft) {
    rs.B = row_lse(t, n, inv_t);
    if constexpr (D == Divergence::kTAID) {
      float m = kNegInf;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) m = fkd_max(m, taid_logit(s[j] * inv_t, t[j] * inv_t, k.lambda));
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) sum += fkd_exp(taid_logit(s[j] * inv_t, t[j] * inv_t, k.lambda) - m);
      rs.R = m == kNegInf ? kNegInf : m + std::log(sum);
    }
    if constexpr (Math::kNeedsPass2) {
      float c0 = 0.f, c1 = 0.f;
#pragma omp simd reduction(+ : c0, c1)
      for (int64_t j = 0; j < n; ++j)
        Math::pass2(s[j] * inv_t - rs.A, t[j] * inv_t - rs.B, 0.f, k, c0, c1);
      rs.c0 = c0;
      rs.c1 = c1;
      divergence = c0;
    }
  }
  if constexpr (kStats) {
    out.stats[kStatStudentEntropy] = row_entropy(s, n, inv_t, rs.A);
    if (soft) {
      out.stats[kStatTeacherEntropy] = row_entropy(t, n, inv_t, rs.B);
      out.agree = first_argmax(s, n) == first_argmax(t, n);
    }
    if (label >= 0) {
      out.stats[kStatStudentLogprob] = s[label] * inv_t - rs.A;
      if (soft) out.stats[kStatTeacherLogprob] = t[label] * inv_t - rs.B;
    }
  }
  const float ce = hard ? lse1 - s[label] : 0.f;

  // Gradient pass: overwrites s. Loss terms of pass-free divergences accrue here.
  const float g_soft = grad_scale * p.soft_weight * inv_t;
  const float g_hard = hard ? grad_scale * p.hard_weight : 0.f;
  float loss_acc = 0.f;
  if (soft) {
#pragma omp simd reduction(+ : loss_acc)
    for (int64_t j = 0; j < n; ++j) {
      const float a = s[j] * inv_t, b = t[j] * inv_t;
      const float lr = D == Divergence::kTAID ? taid_logit(a, b, k.lambda) - rs.R : 0.f;
      const float gd = Math::grad(a - rs.A, b - rs.B, lr, rs, k, loss_acc);
      const float gh = hard ? fkd_exp(s[j] - lse1) : 0.f;
      s[j] = g_soft * gd + g_hard * gh;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = g_hard * fkd_exp(s[j] - lse1);
  }
  if (hard) s[label] -= g_hard;
  if constexpr (!Math::kNeedsPass2) divergence = loss_acc;

  if (soft) out.stats[kStatDivergence] = divergence;
  out.loss = (hard ? p.hard_weight * ce : 0.f) + (soft ? p.soft_weight * divergence : 0.f);
  return out;
}

}  // namespace flashkd::cpu
