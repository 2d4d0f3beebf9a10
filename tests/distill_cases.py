"""What the tests of flashkd.distill_loss (tests/test_distill*.py) share:
inputs, one run of the kernel, the float64 oracle flashkd.reference.distill_loss
and plain torch on the same values, and the checks that judge them
(DESIGN.md sections 2 and 5).

How results are judged (the tolerance model used throughout)
-----------------------------------------------------------
Every case runs three computations on the same input values:
  * the kernel (flashkd.distill_loss), which computes in float32 whatever the
    input dtype and returns its gradient in the student's dtype;
  * the oracle: reference.distill_loss on float64 copies of the very same
    (already rounded) input values, with float64 autograd: "the truth";
  * plain torch: reference.distill_loss on the inputs as given (it computes in
    float32 for fp32/bf16/fp16 inputs), with torch autograd, whose gradient is
    cast back to the student's dtype exactly as torch does for any model.

A result passes when its error against the oracle is no worse than plain
torch's error in the same dtype, up to SLACK, plus a float32 floor:

    |kernel - oracle| <= SLACK * |plain - oracle| + floor

The floor exists because plain torch may be lucky on a given element (error 0)
while the kernel, summing in a different order, is not. It is the float32
noise of the quantities the kernel forms, delta = EPS32 * (sqrt(V) + 1 + S):
  * a sum of V float32 terms (the softmax normaliser, the divergence) carries a
    relative error that grows like sqrt(V) units of roundoff for random
    rounding in the worst order (the kernels sum with a few SIMD or thread
    accumulators, the CPU in fixed blocks, torch pairwise, so a kernel may
    legitimately lose to torch by that much);
  * a log-probability z/T - LSE carries an absolute error of about EPS32
    times the spread S of the logits it is formed from ((max - min) / T, or
    max - min at T = 1 for the hard cross-entropy).
delta is computed per token (each row's own spread). The loss floor is
K_LOSS * delta * (|oracle loss| + c), c the O(1) scale of the per-token weights
that multiply those errors; the gradient floor of a row is K_GRAD * delta *
(max |oracle gradient of the row| + prefactor * max probability of the row),
since an element q_j (x_j - sum_k q_k x_k) carries an error of order q_j * delta
even where it nearly cancels. Calibration on the CPU (every check of
tests/test_distill*.py): the worst case used 0.25 of the gradient floor and
0.15 of the loss floor at K = 4, i.e. K = 1 would just pass; K = 4 leaves a
margin of 4. Mutation check of the same suite: gradients scaled by 1 + 1e-4
(losses by 1 + 1e-5) fail every fp32 case at V = 3; at V = 50257 (delta ~
1.4e-5 there) gradients scaled by 1 + 1e-3 fail.

Gradients in bf16/fp16 are additionally held to the rounding model of their
dtype (unit roundoff u = 2^-8 for bf16, 2^-11 for fp16, 2^-24 for fp32):
the kernel computes the gradient in float32 and rounds it once, so

    |grad - oracle| <= u * |oracle| + (1 + u) * floor (+ the fp16 subnormal spacing / 2).

With a cotangent other than 1 the design rounds twice (the gradient is stored
in the student's dtype during forward, then multiplied in backward), so that
test allows (1 + u)^2 - 1 instead of u.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

import flashkd
from flashkd import reference as R

from checks import device_fixture_with_cuda_kernels, token_factors

DIVS = flashkd.DIVERGENCES
# On a GPU every test runs under each CUDA kernel: the streaming one and the
# Hopper cluster one (where it applies; see test_distill.py::test_cuda_kernel_choice).
device = device_fixture_with_cuda_kernels(torch.ops.flashkd.distill_cuda_kernel, ["stream", "cluster"])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAT_KEYS = ("divergence", "student_entropy", "teacher_entropy", "student_logprob", "teacher_logprob", "agree")

EPS32 = 2.0 ** -24  # unit roundoff of float32, the kernels' compute type
UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# Absolute rounding error of one rounding in the subnormal range (fp16 subnormals
# are spaced 2^-24 apart, so a gradient of 1e-8 is stored as 0 by torch too).
TINY = {torch.float32: 2.0 ** -150, torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25}
SLACK = 2.0  # "no worse than plain torch", with room for a different summation order
K_LOSS = 4.0
K_GRAD = 4.0


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def gen(*key) -> torch.Generator:
    """A CPU generator seeded from the test's own parameters: every
    parametrization draws different values, and every run the same ones."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def logits(shape, g, dtype=torch.float32, device="cpu", scale=2.0):
    """Random logits (never zeros), rounded to `dtype`, generated on the CPU so
    that the CPU and the GPU see the same values."""
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def make_labels(lead, vocab, g, device="cpu", ignore_index=-100, frac_ignored=0.3):
    lab = torch.randint(0, vocab, tuple(lead), generator=g)
    if lab.numel() > 1:
        drop = torch.rand(tuple(lead), generator=g) < frac_ignored
        drop.view(-1)[0] = True  # at least one ignored token
        drop.view(-1)[-1] = False  # and at least one counted
        lab = torch.where(drop, torch.full_like(lab, ignore_index), lab)
    return lab.to(device)


def make_weights(lead, g, device="cpu"):
    return (torch.rand(tuple(lead), generator=g, dtype=torch.float64) * 1.5 + 0.25).float().to(device)


def cpu64(x):
    if x is None:
        return None
    x = x.detach().cpu()
    return x.double() if x.is_floating_point() else x


# ----------------------------------------------------------------------------
# Running the kernel, the oracle and plain torch on the same values
# ----------------------------------------------------------------------------

@dataclass
class Run:
    loss: torch.Tensor
    grad: torch.Tensor
    stats: Optional[dict]
    loss_o: torch.Tensor
    grad_o: torch.Tensor
    stats_o: Optional[dict]
    loss_p: torch.Tensor
    grad_p: torch.Tensor
    stats_p: Optional[dict]
    cot: torch.Tensor


def split_stats(out, kw):
    return out if kw.get("return_stats") else (out, None)


def run_all(student, teacher, *, view=None, cot=None, **kw) -> Run:
    """Kernel, oracle and plain torch on the same values.

    `student` is a leaf-to-be; `view` (optional) maps it to the tensor actually
    passed (a non-contiguous view), and the gradient is read back through it.
    `cot` is the cotangent of the loss (default 1 / ones).
    """
    view = view or (lambda x: x)
    leaf = student.detach().clone().requires_grad_(True)
    s = view(leaf)
    loss, stats = split_stats(flashkd.distill_loss(s, teacher, **kw), kw)
    c = torch.ones_like(loss) if cot is None else cot
    loss.backward(c)
    grad = view(leaf.grad)

    okw = dict(kw)
    okw["labels"] = cpu64(kw.get("labels"))
    okw["weights"] = cpu64(kw.get("weights"))
    s64 = cpu64(view(student)).requires_grad_(True)
    loss_o, stats_o = split_stats(R.distill_loss(s64, cpu64(teacher), **okw), kw)
    loss_o.backward(cpu64(c))

    sp = view(student).detach().clone().requires_grad_(True)
    loss_p, stats_p = split_stats(R.distill_loss(sp, teacher, **kw), kw)
    loss_p.backward(c.to(loss_p.dtype))
    return Run(loss.detach(), grad, stats, loss_o.detach(), s64.grad, stats_o, loss_p.detach(), sp.grad, stats_p,
               cpu64(c))


def logit_spread(student, teacher, kw):
    """Per token, (max - min) over the finite entries of its student and teacher
    rows, at the scale the kernel forms log-probabilities: / T, and at T = 1
    for the hard cross-entropy."""
    vocab = kw.get("vocab_size") or student.shape[-1]
    worst = torch.zeros(student.shape[:-1], dtype=torch.float64)
    for x in (student, teacher):
        x = cpu64(x)[..., :vocab]
        if x.numel() == 0:
            continue
        fin = torch.isfinite(x)
        hi = torch.where(fin, x, -math.inf).amax(-1)
        lo = torch.where(fin, x, math.inf).amin(-1)
        worst = torch.maximum(worst, (hi - lo).nan_to_num(0.0, posinf=0.0, neginf=0.0))
    T = kw.get("temperature", 1.0)
    return worst / min(T, 1.0)


def delta(student, teacher, kw):
    """Per token, the float32 noise level of a log-probability the kernel forms
    (module docstring)."""
    vocab = kw.get("vocab_size") or student.shape[-1]
    return EPS32 * (math.sqrt(vocab) + 1.0 + logit_spread(student, teacher, kw))


def token_scale(lead, kw):
    """Per-token weight multiplying float32 errors of O(1), reduced like the loss."""
    T = kw.get("temperature", 1.0)
    soft_c = kw.get("soft_weight", 1.0) * (T * T if kw.get("t2_scaling") else 1.0)
    per, red = token_factors(lead, kw, soft_c, kw.get("hard_weight", 0.0))
    return per if red == "none" else per.sum()


def grad_coef(lead, kw, cot):
    """Per-token factor of the gradient: d(loss)/d(z) = coef * (terms of size <= the
    probabilities q_j, p_j): soft_weight (T^2) / T for the divergence, hard_weight
    for the cross-entropy, the token weight, the mean divisor and the cotangent."""
    T = kw.get("temperature", 1.0)
    soft_c = kw.get("soft_weight", 1.0) * (T * T if kw.get("t2_scaling") else 1.0) / T
    per, _ = token_factors(lead, kw, soft_c, kw.get("hard_weight", 0.0))
    return per * cot.abs()


def prob_mass(student, teacher, kw):
    """Per token, the largest probability the gradient is made of: of q and p at
    T, of r (TAID), of softmax(z_s) at T = 1 (hard loss)."""
    vocab = kw.get("vocab_size") or student.shape[-1]
    T = kw.get("temperature", 1.0)
    s, t = cpu64(student)[..., :vocab], cpu64(teacher)[..., :vocab]
    if s.numel() == 0:
        return torch.zeros(s.shape[:-1], dtype=torch.float64)
    probs = [torch.softmax(s / T, -1), torch.softmax(t / T, -1), torch.softmax(s, -1)]
    if kw.get("taid_lambda") is not None:
        probs.append(torch.softmax(R.taid_logit(s / T, t / T, kw["taid_lambda"]), -1))
    return torch.stack([x.nan_to_num(0.0).amax(-1) for x in probs]).amax(0)


def _worst(err, bound):
    i = int(torch.argmax((err - bound).reshape(-1)))
    return f"worst at flat index {i}: err={err.reshape(-1)[i]:.3e} bound={bound.reshape(-1)[i]:.3e}"


def check_loss(got, oracle, plain, floor, what="loss"):
    assert got.dtype == torch.float32, f"{what} dtype {got.dtype}"
    assert got.shape == oracle.shape, f"{what} shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    got64, plain64 = cpu64(got), cpu64(plain)
    assert torch.isfinite(got64).all(), f"{what} has non-finite values: {got64}"
    err = (got64 - oracle).abs()
    bound = SLACK * (plain64 - oracle).abs() + floor
    assert (err <= bound).all(), f"{what}: kernel error above torch's error + floor; {_worst(err, bound)}"


def check_grad(got, oracle, plain, floor_rows, dtype, rounds=1, what="grad"):
    """floor_rows: float32 floor per row (shape = leading dims)."""
    assert got.dtype == dtype, f"{what} dtype {got.dtype} != {dtype}"
    assert got.shape == oracle.shape
    got64, plain64 = cpu64(got), cpu64(plain)
    assert torch.isfinite(got64).all(), f"{what} has non-finite values"
    u = UNIT[dtype]
    grow = (1.0 + u) ** rounds
    floor = floor_rows.unsqueeze(-1) if floor_rows.dim() > 0 else floor_rows
    err = (got64 - oracle).abs()
    # (a) the rounding model of the output dtype, element by element
    bound_a = (grow - 1.0) * oracle.abs() + grow * floor + rounds * TINY[dtype]
    assert (err <= bound_a).all(), f"{what}: error beyond {rounds} rounding(s) to {dtype}; {_worst(err, bound_a)}"
    # (b) no worse than torch autograd in the same dtype, which rounds once: row
    # by row when the kernel rounds once too (both round nearly the same float32
    # values, so the rows agree closely); over the whole tensor when it rounds
    # more often (a row's largest error is then a matter of luck on both sides,
    # while over many rows each side's worst case is reached).
    if err.numel():
        err_p = (plain64 - oracle).abs()
        if rounds == 1:
            worst, bound_b = err.amax(-1), SLACK * err_p.amax(-1) + floor_rows + TINY[dtype]
        else:
            worst, bound_b = err.max(), SLACK * rounds * err_p.max() + floor_rows.max() + rounds * TINY[dtype]
        assert (worst <= bound_b).all(), f"{what}: error above torch's; {_worst(worst, bound_b)}"


def check_run(r: Run, student, teacher, kw, *, dtype, rounds=1):
    """Loss, gradient and (if any) statistics of `r` against the oracle."""
    lead = student.shape[:-1]
    d = delta(student, teacher, kw)  # per token
    d_loss = d if kw.get("reduction", "mean") == "none" else (d.max() if d.numel() else torch.tensor(0.0))
    check_loss(r.loss, r.loss_o, r.loss_p, K_LOSS * d_loss * (r.loss_o.abs() + token_scale(lead, kw)))
    # Padded columns must be exactly zero; the rest follows the model.
    # Gradient floor of a row: its largest gradient element, or the size of its
    # probabilities times the gradient's prefactor, whichever is larger (an
    # element q_j (x_j - sum_k q_k x_k) carries an error of order q_j * delta
    # even where the bracket, and so the element, nearly cancels).
    vocab = kw.get("vocab_size") or student.shape[-1]
    gmax = r.grad_o.abs().amax(-1) if r.grad_o.shape[-1] else torch.zeros(lead, dtype=torch.float64)
    scale = gmax + grad_coef(lead, kw, r.cot) * prob_mass(student, teacher, kw)
    check_grad(r.grad, r.grad_o, r.grad_p, K_GRAD * d * scale, dtype, rounds)
    if vocab < student.shape[-1]:
        pad = r.grad[..., vocab:]
        assert (pad == 0).all(), "padded vocabulary columns must get exactly zero gradient"
    if kw.get("return_stats"):
        check_stats(r, d)


def check_stats(r: Run, d):
    assert set(r.stats) == set(STAT_KEYS), sorted(r.stats)
    for k in STAT_KEYS[:-1]:
        got, ref, plain = r.stats[k], r.stats_o[k], r.stats_p[k]
        check_loss(got, ref, plain, K_LOSS * d * (ref.abs() + 1.0), what=f"stats[{k!r}]")
    assert r.stats["agree"].dtype == torch.bool
    assert torch.equal(r.stats["agree"].cpu(), r.stats_o["agree"]), "stats['agree'] differs from the oracle"


def default_cot(loss_shape, g, device):
    """A cotangent other than 1 for reduction='none' (per-token scaling)."""
    return (torch.rand(loss_shape, generator=g, dtype=torch.float64) + 0.5).float().to(device)
