// CUDA distillation kernel: one block per token row, three sweeps over the
// vocabulary (statistics, optional pass-2 sums, gradient) with 16-byte loads.
// The per-element math is csrc/include/flashkd/divergence.h, shared with the CPU.
#include "device_utils.cuh"
#include "flashkd/distill_params.h"
#include "kernels.h"

namespace flashkd::cuda {
namespace {

// 512 threads, two blocks per SM: caps the kernel at 64 registers per thread.
// (A cluster variant caching each row in shared memory measured 2x slower on
// H100; see the commit that removed it.)
constexpr int kMaxThreads = 512;

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

// Combines per-thread OnlineLse values into block-wide log-sum-exps.
template <int N>
__device__ __forceinline__ void block_lse(OnlineLse (&l)[N], LogNorm (&out)[N], float* scratch) {
  float m[N], s[N];
#pragma unroll
  for (int i = 0; i < N; ++i) m[i] = l[i].m;
  block_allreduce(m, scratch, MaxOp{});
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = m[i] == kNegInf ? 0.f : l[i].s * fkd_exp(l[i].m - m[i]);
  block_allreduce(s, scratch, SumOp{});
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = m[i] == kNegInf ? LogNorm{} : LogNorm{m[i], logf(s[i])};
}

__device__ __forceinline__ void track_argmax(const float (&x)[kVec], int64_t col, float& best,
                                             int64_t& at) {
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    if (x[j] > best) { best = x[j]; at = col + j; }
}

template <Divergence D, typename Ts, typename Tt>
__global__ void __launch_bounds__(kMaxThreads, 2) distill_kernel(const DistillParams p) {
  using Math = DivergenceMath<D>;
  __shared__ float scratch[32 * 4];
  __shared__ int64_t iscratch[32];
  const int64_t row = blockIdx.x;
  const int64_t label = p.labels ? p.labels[row] : -1;
  const bool ignored = p.labels && label == p.ignore_index;
  const bool want_stats = p.stats != nullptr;
  const bool soft = p.teacher != nullptr;
  const bool hard = !ignored && label >= 0 && p.hard_weight != 0.f;
  const float inv_t = p.inv_temperature;
  const float cap = p.softcap, eps = p.label_smoothing;
  const bool separate_ce = (hard || p.lse) && inv_t != 1.f;
  const DivergenceConsts& k = p.consts;

  const Ts* srow = static_cast<const Ts*>(p.student) + p.student_layout.row_offset(row);
  const Tt* trow = soft ? static_cast<const Tt*>(p.teacher) + p.teacher_layout.row_offset(row) : nullptr;
  Ts* grow = static_cast<Ts*>(p.grad) + p.grad_layout.row_offset(row);
  const int64_t ss = p.student_layout.col_stride, ts = soft ? p.teacher_layout.col_stride : 1;
  const int64_t gs = p.grad_layout.col_stride;
  const bool svec = vec_ok(srow, ss), tvec = soft && vec_ok(trow, ts), gvec = vec_ok(grow, gs);
  const int64_t n = p.vocab, cols = p.cols;
  const int64_t step = int64_t(blockDim.x) * kVec;
  const int64_t first = int64_t(threadIdx.x) * kVec;

  // Student logits as the math sees them: soft-capped when asked.
  auto load_student = [&](int64_t c, float (&s)[kVec]) {
    load8(srow, c, ss, n, svec, s);
    if (cap > 0.f) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) s[j] = soft_cap(s[j], cap);
    }
  };

  if (ignored && !want_stats && !p.lse) {
    const float zeros[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t c = first; c < cols; c += step) store8(grow, c, gs, cols, gvec, zeros);
    if (threadIdx.x == 0) p.loss[row] = 0.f;
    return;
  }

  // Sweep 1: log-sum-exps (student at T, teacher at T, student at 1, TAID mixture).
  OnlineLse lse[3];
  float sbest = kNegInf, tbest = kNegInf, zsum = 0.f;
  int64_t sat = 0, tat = 0;
  for (int64_t c = first; c < n; c += step) {
    float s[kVec], t[kVec], x[kVec];
    load_student(c, s);
    if (hard && eps != 0.f) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) zsum += c + j < n ? s[j] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = s[j] * inv_t;
    lse[0].add(x);
    if (separate_ce) lse[2].add(s);
    if (want_stats) track_argmax(s, c, sbest, sat);
    if (soft) {
      load8(trow, c, ts, n, tvec, t);
      if (want_stats) track_argmax(t, c, tbest, tat);
#pragma unroll
      for (int j = 0; j < kVec; ++j) t[j] *= inv_t;
      lse[1].add(t);
    }
  }
  // The label's logits, read before any thread passes the barriers below:
  // sweep 3 may overwrite the student row with its gradient (in place).
  const bool has_label = !ignored && label >= 0;  // validated to be < vocab
  float zlabel = has_label ? to_float(srow[label * ss]) : 0.f;
  if (cap > 0.f) zlabel = soft_cap(zlabel, cap);
  const float tlabel = soft && has_label ? to_float(trow[label * ts]) : 0.f;
  LogNorm lses[3];
  block_lse(lse, lses, scratch);
  if (hard && eps != 0.f) {
    float z[1] = {zsum};
    block_allreduce(z, scratch, SumOp{});
    zsum = z[0];
  }
  RowScalars rs;
  rs.A = lses[0];
  rs.B = lses[1];
  const LogNorm lse1 = separate_ce ? lses[2] : lses[0];
  bool agree = false;
  if (want_stats && soft) {
    block_argmax(sbest, sat, scratch, iscratch);
    block_argmax(tbest, tat, scratch, iscratch);
    agree = sat == tat;
  }

  // Sweep 2: the sums some gradients need (see divergence.h); for TAID the
  // log-sum-exp of its mixture, formed from log-probs (small numbers, so no
  // precision is lost at |z| ~ 1e4; softmax is shift invariant).
  if constexpr (Math::kNeedsPass2 || D == Divergence::kTAID) {
    if (soft) {
      float c[2] = {0.f, 0.f};
      OnlineLse mix[1];
      for (int64_t col = first; col < n; col += step) {
        float s[kVec], t[kVec], r[kVec];
        load_student(col, s);
        load8(trow, col, ts, n, tvec, t);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float lq = rs.A.log_prob(s[j] * inv_t), lp = rs.B.log_prob(t[j] * inv_t);
          if constexpr (D == Divergence::kTAID) r[j] = taid_logit(lq, lp, k.lambda);
          else Math::pass2(lq, lp, 0.f, k, c[0], c[1]);
        }
        if constexpr (D == Divergence::kTAID) mix[0].add(r);
      }
      if constexpr (D == Divergence::kTAID) {
        LogNorm r[1];
        block_lse(mix, r, scratch);
        rs.R = r[0];
      } else {
        block_allreduce(c, scratch, SumOp{});
        rs.c0 = c[0];
        rs.c1 = c[1];
      }
    }
  }

  // Sweep 3: gradient (padded columns get 0), pass-free losses, entropies.
  float scale = ignored ? 0.f : (p.weights ? p.weights[row] : 1.f);
  if (p.grad_scale) scale *= *p.grad_scale;
  if (p.row_scale) scale *= p.row_scale[row];
  const float g_soft = scale * p.soft_weight * inv_t;
  const float g_hard = hard ? scale * p.hard_weight : 0.f;
  // d(ce + z lse^2)/dz = g_soft_max * softmax (0 without a hard term, where lse1 is unset)
  const float g_soft_max = hard ? g_hard * (1.f + 2.f * p.z_loss * lse1.value()) : 0.f;
  const float g_uniform = g_hard * eps / static_cast<float>(n);
  const float g_label = g_hard * (1.f - eps);
  float acc[3] = {0.f, 0.f, 0.f};  // pass-free loss, sum q log q, sum p log p
  for (int64_t c = first; c < cols; c += step) {
    float s[kVec], t[kVec], g[kVec];
    load_student(c, s);
    if (soft) load8(trow, c, ts, n, tvec, t);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float gj = 0.f;
      if (c + j < n) {
        if (soft) {
          const float a = s[j] * inv_t, b = t[j] * inv_t;
          const float lq = rs.A.log_prob(a), lp = rs.B.log_prob(b);
          const float lr = D == Divergence::kTAID ? rs.R.log_prob(taid_logit(lq, lp, k.lambda)) : 0.f;
          gj = g_soft * Math::grad(lq, lp, lr, rs, k, acc[0]);
          if (want_stats) {
            acc[1] += xdiff(fkd_exp(lq), lq, 0.f);
            acc[2] += xdiff(fkd_exp(lp), lp, 0.f);
          }
        } else if (want_stats) {
          const float lq = rs.A.log_prob(s[j] * inv_t);
          acc[1] += xdiff(fkd_exp(lq), lq, 0.f);
        }
        if (hard) gj += g_soft_max * fkd_exp(lse1.log_prob(s[j])) - g_uniform - (c + j == label ? g_label : 0.f);
        if (cap > 0.f) gj *= soft_cap_grad(s[j], cap);
      }
      g[j] = ignored ? 0.f : gj;
    }
    store8(grow, c, gs, cols, gvec, g);
  }
  block_allreduce(acc, scratch, SumOp{});

  if (threadIdx.x == 0) {
    const float divergence = soft ? (Math::kNeedsPass2 ? rs.c0 : acc[0]) : 0.f;
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
      st[kStatStudentEntropy] = -acc[1];
      st[kStatTeacherEntropy] = -acc[2];
      st[kStatStudentLogprob] = has_label ? rs.A.log_prob(zlabel * inv_t) : 0.f;
      st[kStatTeacherLogprob] = has_label && soft ? rs.B.log_prob(tlabel * inv_t) : 0.f;
      p.agree[row] = agree;
    }
  }
}

int threads_for(int64_t vocab) {
  int t = 64;
  while (t < kMaxThreads && int64_t(t) * kVec * 4 < vocab) t *= 2;
  return t;
}

template <Divergence D, typename Ts>
cudaError_t launch_teacher(const DistillParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.rows)), block(threads_for(p.vocab));
  switch (p.teacher_dtype) {
    case DType::kFloat32: distill_kernel<D, Ts, float><<<grid, block, 0, stream>>>(p); break;
    case DType::kBFloat16: distill_kernel<D, Ts, __nv_bfloat16><<<grid, block, 0, stream>>>(p); break;
    case DType::kFloat16: distill_kernel<D, Ts, __half><<<grid, block, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

struct Launcher {
  const DistillParams& p;
  cudaStream_t stream;
  template <Divergence D>
  cudaError_t operator()() const {
    switch (p.student_dtype) {
      case DType::kFloat32: return launch_teacher<D, float>(p, stream);
      case DType::kBFloat16: return launch_teacher<D, __nv_bfloat16>(p, stream);
      default: return launch_teacher<D, __half>(p, stream);
    }
  }
};

}  // namespace

const char* distill_rows(const DistillParams& p, void* stream) {
  if (p.rows == 0) return nullptr;
  const cudaError_t err = dispatch_divergence(p.divergence, Launcher{p, static_cast<cudaStream_t>(stream)});
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace flashkd::cuda
