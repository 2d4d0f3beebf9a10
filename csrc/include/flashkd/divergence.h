// The per-element math of every divergence (DESIGN.md §2), shared by the CPU
// and CUDA row kernels. All quantities are float32 and in log space.
//
// Notation for one row: a = z_s / T, b = z_t / T, A = LSE(a), B = LSE(b),
// lq = a - A = log q (student), lp = b - B = log p (teacher).
// Each divergence D(p, q) is a sum over the vocabulary of per-element terms.
// Its gradient with respect to a is q_j (g_j - sum_k q_k g_k), g = dD/dq;
// the sums a row needs beyond A and B come from an extra pass ("pass 2").
#pragma once
#include "flashkd/fast_math.h"

namespace flashkd {

enum class Divergence : int32_t { kFKL = 0, kRKL, kJSD, kSKL, kSRKL, kTVD, kTAID };

// Constants of one call, folded on the host.
struct DivergenceConsts {
  float w_p = 0.5f, w_q = 0.5f;          // mixture weights (jsd: beta, 1-beta; skl/srkl)
  float log_w_p = 0.f, log_w_q = 0.f;    // their logs (may be -inf)
  float lambda = 0.f;                    // taid interpolation
};

// A log-sum-exp kept as (max, log of the max-shifted sum). Log-probabilities
// are formed as (x - max) - log_sum, as accurate as torch's log_softmax even
// when |max| is large (logits ~1e4), where max + log_sum would round to the
// ulp of max before the subtraction.
struct LogNorm {
  float max = kNegInf, log_sum = 0.f;
  FKD_HD float log_prob(float x) const { return (x - max) - log_sum; }
  FKD_HD float value() const { return max + log_sum; }
  // 0, or NaN when the row held a NaN or +inf (log_sum is then NaN or inf).
  // The divergence terms alone would drop such a row: xdiff keeps only p > 0,
  // and a NaN probability is not. Added to a row's loss, statistics and
  // gradient scale, it makes the whole row NaN, as torch's log_softmax does.
  FKD_HD float poison() const { return log_sum * 0.f; }
};

// Per-row scalars: A, B (and R, of the TAID mixture logits), and the two
// pass-2 sums c0, c1 whose meaning depends on the divergence.
struct RowScalars {
  LogNorm A, B, R;
  float c0 = 0.f, c1 = 0.f;
};

// x * (lx - ly) with 0 * anything = 0 (masked entries carry -inf logs).
FKD_HD float xdiff(float x, float lx, float ly) { return x > 0.f ? x * (lx - ly) : 0.f; }

// One vocabulary entry of a row as the divergences see it: the student's and
// teacher's log-probabilities and probabilities (q = exp(lq), p = exp(lp)),
// for TAID the log-probability lr of its mixture, and for jsd/skl/srkl the
// log lm of the mixture of p and q the divergence compares against
// (Math::log_mixture). The caller supplies q, p and lm: the CPU kernel from the
// exponentials its log-sum-exp pass kept and the mixture logs its pass 2 kept,
// the CUDA kernel by `entry<D>` (what a divergence does not read costs nothing).
struct Entry {
  float lq, lp, lr, q, p, lm;
};

template <Divergence D>
struct DivergenceMath;

// The base of divergences that compare against no mixture of p and q.
struct NoMixture {
  static constexpr bool kHasMixture = false;
  FKD_HD static float log_mixture(const Entry&, const DivergenceConsts&) { return 0.f; }
};

// KL(p || q). Gradient q - p; no pass 2.
template <>
struct DivergenceMath<Divergence::kFKL> : NoMixture {
  static constexpr bool kNeedsPass2 = false;
  FKD_HD static void pass2(const Entry&, const DivergenceConsts&, float&, float&) {}
  FKD_HD static float grad(const Entry& e, const RowScalars&, const DivergenceConsts&, float& loss) {
    loss += xdiff(e.p, e.lp, e.lq);
    return e.q - e.p;
  }
};

// KL(q || p). c0 = D itself; gradient q (lq - lp - D).
template <>
struct DivergenceMath<Divergence::kRKL> : NoMixture {
  static constexpr bool kNeedsPass2 = true;
  FKD_HD static void pass2(const Entry& e, const DivergenceConsts&, float& c0, float&) {
    c0 += xdiff(e.q, e.lq, e.lp);
  }
  FKD_HD static float grad(const Entry& e, const RowScalars& s, const DivergenceConsts&, float&) {
    return e.q > 0.f ? e.q * (e.lq - e.lp - s.c0) : 0.f;
  }
};

// beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q (w_p = beta).
// c0 = D, c1 = KL(q||m); gradient (1-beta) q (lq - lm - c1).
// log m is taken of the mixture itself, from p and q: one log where
// logaddexp costs an exp and a log1p. Both weights are
// positive, so lq - lm <= -log(1-beta) and lp - lm <= -log(beta) stay
// bounded. m underflows to 0 where w_p p and w_q q both round to 0, which
// happens with p or q still above 0: a subnormal q = 2^-149 at beta = 0.5
// (CUDA's exp keeps subnormals), or a normal q with 1 - beta below ~1e-7.
// Such an entry's terms are below float32's resolution (p and q times a
// bounded log ratio), so it adds nothing: log m = -inf would make them inf.
template <>
struct DivergenceMath<Divergence::kJSD> {
  static constexpr bool kNeedsPass2 = true;
  static constexpr bool kHasMixture = true;
  FKD_HD static float log_mixture(const Entry& e, const DivergenceConsts& k) {
    return fkd_log(k.w_p * e.p + k.w_q * e.q);
  }
  FKD_HD static void pass2(const Entry& e, const DivergenceConsts& k, float& c0, float& c1) {
    const bool mixed = e.lm > kNegInf;
    const float kq = mixed ? xdiff(e.q, e.lq, e.lm) : 0.f;
    c0 += mixed ? k.w_p * xdiff(e.p, e.lp, e.lm) + k.w_q * kq : 0.f;
    c1 += kq;
  }
  FKD_HD static float grad(const Entry& e, const RowScalars& s, const DivergenceConsts& k, float&) {
    return (e.q > 0.f && e.lm > kNegInf) ? k.w_q * e.q * (e.lq - e.lm - s.c1) : 0.f;
  }
};

// Skew KL: KL(p || alpha p + (1-alpha) q) (w_p = alpha, w_q = 1 - alpha).
// g_j = -(1-alpha) p_j / mix_j; c0 = D, c1 = sum q g.
template <>
struct DivergenceMath<Divergence::kSKL> {
  static constexpr bool kNeedsPass2 = true;
  static constexpr bool kHasMixture = true;
  // logaddexp, not the log of w_p p + w_q q: where p and q underflow but their
  // logs do not, q p / mix below stays accurate instead of 0 / 0.
  FKD_HD static float log_mixture(const Entry& e, const DivergenceConsts& k) {
    return logaddexp(k.log_w_p + e.lp, k.log_w_q + e.lq);
  }
  FKD_HD static float qg(const Entry& e, const DivergenceConsts& k) {
    // q * g computed in log space: p q / mix never overflows this way.
    return (e.lq > kNegInf && e.lp > kNegInf) ? -k.w_q * fkd_exp(e.lq + e.lp - e.lm) : 0.f;
  }
  FKD_HD static void pass2(const Entry& e, const DivergenceConsts& k, float& c0, float& c1) {
    c0 += xdiff(e.p, e.lp, e.lm);
    c1 += qg(e, k);
  }
  FKD_HD static float grad(const Entry& e, const RowScalars& s, const DivergenceConsts& k, float&) {
    return qg(e, k) - e.q * s.c1;
  }
};

// Skew reverse KL: KL(q || (1-alpha) p + alpha q) (w_p = 1 - alpha, w_q = alpha).
// c0 = D, c1 = sum q * (q / mix); gradient q (lq - lmix - c0 - alpha (q/mix - c1)).
template <>
struct DivergenceMath<Divergence::kSRKL> {
  static constexpr bool kNeedsPass2 = true;
  static constexpr bool kHasMixture = true;
  FKD_HD static float log_mixture(const Entry& e, const DivergenceConsts& k) {
    return logaddexp(k.log_w_p + e.lp, k.log_w_q + e.lq);
  }
  FKD_HD static void pass2(const Entry& e, const DivergenceConsts&, float& c0, float& c1) {
    c0 += xdiff(e.q, e.lq, e.lm);
    c1 += e.q > 0.f ? e.q * fkd_exp(e.lq - e.lm) : 0.f;
  }
  FKD_HD static float grad(const Entry& e, const RowScalars& s, const DivergenceConsts& k, float&) {
    return e.q > 0.f ? e.q * (e.lq - e.lm - s.c0 - k.w_q * (fkd_exp(e.lq - e.lm) - s.c1)) : 0.f;
  }
};

// Total variation: 1/2 sum |p - q|, subgradient 0 where p == q.
// c0 = D, c1 = sum q g with g = sign(q - p) / 2.
template <>
struct DivergenceMath<Divergence::kTVD> : NoMixture {
  static constexpr bool kNeedsPass2 = true;
  FKD_HD static float half_sign(float q, float p) { return q > p ? 0.5f : (q < p ? -0.5f : 0.f); }
  FKD_HD static void pass2(const Entry& e, const DivergenceConsts&, float& c0, float& c1) {
    c0 += 0.5f * (e.q > e.p ? e.q - e.p : e.p - e.q);
    c1 += e.q * half_sign(e.q, e.p);
  }
  FKD_HD static float grad(const Entry& e, const RowScalars& s, const DivergenceConsts&, float&) {
    return e.q * (half_sign(e.q, e.p) - s.c1);
  }
};

// TAID: KL(r || q), r = softmax((1-lambda) a + lambda b) with a detached,
// so the gradient is q - r. `lr` is passed in by the row kernel.
template <>
struct DivergenceMath<Divergence::kTAID> : NoMixture {
  static constexpr bool kNeedsPass2 = false;
  FKD_HD static void pass2(const Entry&, const DivergenceConsts&, float&, float&) {}
  FKD_HD static float grad(const Entry& e, const RowScalars&, const DivergenceConsts&, float& loss) {
    const float r = fkd_exp(e.lr);
    loss += xdiff(r, e.lr, e.lq);
    return e.q - r;
  }
};

// The entry of divergence D computed from the log-probabilities alone.
template <Divergence D>
FKD_HD Entry entry(float lq, float lp, const DivergenceConsts& k, float lr = 0.f) {
  Entry e{lq, lp, lr, fkd_exp(lq), fkd_exp(lp), 0.f};
  if constexpr (DivergenceMath<D>::kHasMixture) e.lm = DivergenceMath<D>::log_mixture(e, k);
  return e;
}

// Calls f.template operator()<D>() for the runtime divergence `d`.
template <typename F>
inline auto dispatch_divergence(Divergence d, F&& f) {
  switch (d) {
    case Divergence::kFKL: return f.template operator()<Divergence::kFKL>();
    case Divergence::kRKL: return f.template operator()<Divergence::kRKL>();
    case Divergence::kJSD: return f.template operator()<Divergence::kJSD>();
    case Divergence::kSKL: return f.template operator()<Divergence::kSKL>();
    case Divergence::kSRKL: return f.template operator()<Divergence::kSRKL>();
    case Divergence::kTVD: return f.template operator()<Divergence::kTVD>();
    default: return f.template operator()<Divergence::kTAID>();
  }
}

}  // namespace flashkd

namespace flashkd {

// The TAID mixture logit (1 - lambda) a + lambda b, with 0 * -inf = 0 at the ends.
FKD_HD float taid_logit(float a, float b, float lambda) {
  const float from_b = lambda > 0.f ? lambda * b : 0.f;
  const float from_a = lambda < 1.f ? (1.f - lambda) * a : 0.f;
  return from_a + from_b;
}

}  // namespace flashkd
