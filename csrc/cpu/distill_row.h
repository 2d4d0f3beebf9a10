// The CPU distillation row kernel on float32 rows already in cache.
// Included by distill_rows.cpp, which is compiled once per instruction set.
#pragma once
#include <algorithm>
#include <cstdint>
#include "flashkd/distill_params.h"
#include "row_sums.h"

namespace flashkd::cpu {
// Internal linkage, so that each instruction set's object keeps its own
// build of these (see flashkd/cpu_convert.h).
namespace {

struct RowResult {
  float loss = 0.f;  // hard_weight * CE + soft_weight * D, unweighted by the token weight
  float stats[kNumStats] = {0.f, 0.f, 0.f, 0.f, 0.f};
  bool agree = false;
};

// x with infinities replaced by +-FLT_MAX (NaN kept): a finite number times 0 is 0.
inline float finite_or_max(float x) {
  const float big = 3.4028235e38f;
  return x > big ? big : (x < -big ? -big : x);
}

inline float row_max(const float* x, int64_t n, float mul) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < n; ++k) m = fkd_max(m, x[k] * mul);
  return m;
}

// The softmax of x * mul over a row: its log-sum-exp (max = -inf when every
// entry is -inf) and the shifted exponentials exp(x * mul - max), kept in `e`,
// so that the probabilities are e[k] * inv_sum: later passes multiply instead
// of taking an exponential per entry again.
struct RowSoftmax {
  LogNorm norm;
  float inv_sum = 0.f;
  const float* e = nullptr;
  float prob(int64_t k) const { return e[k] * inv_sum; }
};

inline RowSoftmax row_softmax(const float* x, int64_t n, float mul, float* e) {
  const float m = row_max(x, n, mul);
  if (m == kNegInf) {
    // Every entry -inf, or some NaN: the max reduction can drop a NaN (and
    // what came before it in its lane), which the sum below would otherwise
    // carry into log_sum. Rare rows, so a scan costs nothing.
    const bool has_nan = std::any_of(x, x + n, [](float v) { return v != v; });
    const float fill = has_nan ? kNaN : 0.f;
    std::fill(e, e + n, fill);
    return {LogNorm{kNegInf, fill}, fill, e};
  }
  const float sum = row_sum(n, [&](int64_t k) { return e[k] = fkd_exp(x[k] * mul - m); });
  return {LogNorm{m, std::log(sum)}, 1.f / sum, e};
}

inline int64_t first_argmax(const float* x, int64_t n) {
  const float m = row_max(x, n, 1.f);
  for (int64_t k = 0; k < n; ++k)
    if (x[k] == m) return k;
  return 0;
}

// -sum p * log p over p = softmax(x * mul) (the entropy), p from the kept exponentials.
inline float row_entropy(const float* x, int64_t n, float mul, const RowSoftmax& sm) {
  return -row_sum(n, [&](int64_t k) { return xdiff(sm.prob(k), sm.norm.log_prob(x[k] * mul), 0.f); });
}

// Scratch rows of one thread: the exponentials of the student at T, of the
// teacher at T, and of the student at T = 1 (the hard term, when T != 1), and
// the mixture logs pass 2 computes for the gradient pass (jsd, skl, srkl).
struct RowScratch {
  float *student, *teacher, *student_t1, *mixture;
};

// Computes one token's loss and, when `want_grad`, overwrites s[0..n) with
// grad_scale * d(loss)/d(student logits). `t` may be null (hard CE only).
// `label` < 0 means no label for this token. `lse_out`, when non-null,
// receives the log-sum-exp of the (capped) student logits at T = 1.
// kSoftOnly: the call has no hard term and no soft cap (p.hard_weight == 0,
// p.softcap <= 0), so the gradient pass leaves out their terms, which are
// otherwise computed branch-free (zero weights, a factor of one): about a
// third of that pass's instructions. Same results bit for bit.
// Out of line: GCC inlined it into the row loop for fkl alone, where the bf16
// fkl training call then ran 13% slower (4096 x 32000, 113-116 against
// 98-100 ms) and the float32 one 2-5% faster; the other divergences were
// out of line already.
template <Divergence D, bool kStats, bool kSoftOnly>
__attribute__((noinline)) RowResult distill_row(float* s, const float* t, int64_t n, int64_t label, bool want_grad,
                                                float grad_scale, const DistillParams& p, float* lse_out,
                                                const RowScratch& scratch) {
  using Math = DivergenceMath<D>;
  const float inv_t = p.inv_temperature;
  const DivergenceConsts k = p.consts;  // a local copy: the loops store floats, which could alias p
  const bool hard = p.hard_weight != 0.f && label >= 0;
  const bool soft = t != nullptr;
  const float cap = p.softcap;
  RowResult out;

  if (cap > 0.f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = soft_cap(s[j], cap);
  }
  RowScalars rs;
  const RowSoftmax q = row_softmax(s, n, inv_t, scratch.student);
  rs.A = q.norm;
  // The hard term's softmax, at T = 1: q itself at T = 1 (and where unused).
  const bool want_lse1 = hard || lse_out;
  const RowSoftmax q1 = want_lse1 && inv_t != 1.f ? row_softmax(s, n, 1.f, scratch.student_t1) : q;
  const LogNorm lse1 = want_lse1 ? q1.norm : LogNorm{};
  if (lse_out) *lse_out = lse1.value();
  float divergence = 0.f;
  RowSoftmax pt;
  if (soft) {
    pt = row_softmax(t, n, inv_t, scratch.teacher);
    rs.B = pt.norm;
    if constexpr (D == Divergence::kTAID) {
      // The mixture is formed from log-probs, not logits: softmax is shift
      // invariant, and log-probs are small, so no precision is lost at |z| ~ 1e4.
      float m = kNegInf;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j)
        m = fkd_max(m, taid_logit(rs.A.log_prob(s[j] * inv_t), rs.B.log_prob(t[j] * inv_t), k.lambda));
      const float sum = row_sum(n, [&](int64_t j) {
        return fkd_exp(taid_logit(rs.A.log_prob(s[j] * inv_t), rs.B.log_prob(t[j] * inv_t), k.lambda) - m);
      });
      rs.R = m == kNegInf ? LogNorm{} : LogNorm{m, std::log(sum)};
    }
    if constexpr (Math::kNeedsPass2) {
      float* mixture = scratch.mixture;
      const Sums<2> c = row_sums(n, [&](int64_t j) {
        Entry e{rs.A.log_prob(s[j] * inv_t), rs.B.log_prob(t[j] * inv_t), 0.f, q.prob(j), pt.prob(j), 0.f};
        if constexpr (Math::kHasMixture) {
          e.lm = Math::log_mixture(e, k);
          mixture[j] = e.lm;
        }
        Sums<2> terms;
        Math::pass2(e, k, terms.v[0], terms.v[1]);
        return terms;
      });
      rs.c0 = c.v[0];
      rs.c1 = c.v[1];
      divergence = c.v[0];
    }
  }
  // NaN when either row held a NaN or +inf (LogNorm::poison), else 0.
  const float poison = rs.A.poison() + rs.B.poison();
  divergence += poison;
  const float row_scale = grad_scale + poison;  // a NaN row gets a NaN gradient
  if constexpr (kStats) {
    out.stats[kStatStudentEntropy] = row_entropy(s, n, inv_t, q) + rs.A.poison();
    if (soft) {
      out.stats[kStatTeacherEntropy] = row_entropy(t, n, inv_t, pt) + rs.B.poison();
      out.agree = first_argmax(s, n) == first_argmax(t, n);
    }
    if (label >= 0) {
      out.stats[kStatStudentLogprob] = rs.A.log_prob(s[label] * inv_t);
      if (soft) out.stats[kStatTeacherLogprob] = rs.B.log_prob(t[label] * inv_t);
    }
  }

  // Hard term: smoothed cross-entropy plus z-loss (DESIGN.md §2).
  const float eps = p.label_smoothing;
  float hard_loss = 0.f;
  if (hard) {
    float mean_z = 0.f;
    if (eps != 0.f) {
      mean_z = row_sum(n, [&](int64_t j) { return s[j]; }) / static_cast<float>(n);
    }
    const float lse = lse1.value();
    hard_loss = -(1.f - eps) * lse1.log_prob(s[label]) + eps * ((lse1.max - mean_z) + lse1.log_sum) +
                p.z_loss * lse * lse;
  }

  if (!want_grad) {
    // Loss only: pass-free divergences (fkl, taid) still need their terms
    // summed; the gradient (and the exponentials only it uses) is skipped.
    if constexpr (!Math::kNeedsPass2) {
      if (soft) {
        divergence = row_sum(n, [&](int64_t j) {
          const float lq = rs.A.log_prob(s[j] * inv_t), lp = rs.B.log_prob(t[j] * inv_t);
          const float lr = D == Divergence::kTAID ? rs.R.log_prob(taid_logit(lq, lp, k.lambda)) : 0.f;
          float loss_term = 0.f;
          Math::grad(Entry{lq, lp, lr, q.prob(j), pt.prob(j), 0.f}, rs, k, loss_term);
          return loss_term;
        }) + poison;
      }
    }
    if (soft) out.stats[kStatDivergence] = divergence;
    out.loss = (hard ? p.hard_weight * hard_loss : 0.f) + (soft ? p.soft_weight * divergence : 0.f);
    return out;
  }

  // Gradient pass: overwrites s. Loss terms of pass-free divergences accrue here.
  const float g_soft = row_scale * p.soft_weight * inv_t;
  const float g_hard = hard ? row_scale * p.hard_weight : 0.f;
  // d(ce + z lse^2)/dz = g_soft_max * softmax (0 without a hard term, where lse1 is unset)
  const float g_soft_max = hard ? g_hard * (1.f + 2.f * p.z_loss * lse1.value()) : 0.f;
  const float g_uniform = g_hard * eps / static_cast<float>(n);
  // The cap's derivative at the label, read before s is overwritten.
  const float label_cap_grad = hard && cap > 0.f ? soft_cap_grad(s[label], cap) : 1.f;
  // The loops below are branch-free in loop-invariant flags (GCC does not
  // vectorize a select on an invariant condition): an unused hard term has
  // zero weights (and q1 is then q), an absent cap a factor of one.
  const float cap_inv = cap > 0.f ? 1.f / cap : 0.f;
  const float* mixture = scratch.mixture;  // a local: a pointer read in the loop stops vectorization
  float loss_acc = 0.f;
  if (soft) {
    loss_acc = row_sum(n, [&](int64_t j) {
      const float lq = rs.A.log_prob(s[j] * inv_t), lp = rs.B.log_prob(t[j] * inv_t);
      const float lr = D == Divergence::kTAID ? rs.R.log_prob(taid_logit(lq, lp, k.lambda)) : 0.f;
      float loss_term = 0.f;
      const float lm = Math::kHasMixture ? mixture[j] : 0.f;
      const float g_div = Math::grad(Entry{lq, lp, lr, q.prob(j), pt.prob(j), lm}, rs, k, loss_term);
      if constexpr (kSoftOnly) {
        s[j] = g_soft * g_div;
      } else {
        const float g = g_soft_max * q1.prob(j) - g_uniform + g_soft * g_div;
        const float u = finite_or_max(s[j]) * cap_inv;  // 0 without a cap, even at -inf
        s[j] = g * (1.f - u * u);
      }
      return loss_term;
    });
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float g = g_soft_max * q1.prob(j) - g_uniform;
      const float u = finite_or_max(s[j]) * cap_inv;  // 0 without a cap, even at -inf
      s[j] = g * (1.f - u * u);
    }
  }
  if (hard) s[label] -= g_hard * (1.f - eps) * label_cap_grad;  // the one-hot part
  if constexpr (!Math::kNeedsPass2) divergence = loss_acc + poison;

  if (soft) out.stats[kStatDivergence] = divergence;
  out.loss = (hard ? p.hard_weight * hard_loss : 0.f) + (soft ? p.soft_weight * divergence : 0.f);
  return out;
}

}  // namespace
}  // namespace flashkd::cpu
