"""Tests of flashkd.distill_loss (the fused distillation loss) against the
float64 oracle flashkd.reference.distill_loss (DESIGN.md sections 2 and 5).

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
K_LOSS * delta * (|oracle loss| + c), c the O(1) scale of the per-token
weights that multiply those errors; the gradient floor of a row is
K_GRAD * delta * (max |oracle gradient of the row| + prefactor * max
probability of the row), since an element q_j (x_j - sum_k q_k x_k) carries an
error of order q_j * delta even where it nearly cancels. Calibration on the
CPU (every check of this file): the worst case used 0.25 of the gradient floor
and 0.15 of the loss floor at K = 4, i.e. K = 1 would just pass; K = 4 leaves
a margin of 4. Mutation check of the same suite: gradients scaled by 1 + 1e-4
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
import os
import random
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import flashkd
from flashkd import reference as R

from checks import DIV_KW, assert_same_bits, device_fixture_with_cuda_kernels, results_per_cpu_isa, token_factors, RANDOM_CASES
import memory

DIVS = flashkd.DIVERGENCES
# On a GPU every test runs under each CUDA kernel: the streaming one and the
# Hopper cluster one (where it applies; see test_cuda_kernel_choice).
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


def _split(out, kw):
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
    loss, stats = _split(flashkd.distill_loss(s, teacher, **kw), kw)
    c = torch.ones_like(loss) if cot is None else cot
    loss.backward(c)
    grad = view(leaf.grad)

    okw = dict(kw)
    okw["labels"] = cpu64(kw.get("labels"))
    okw["weights"] = cpu64(kw.get("weights"))
    s64 = cpu64(view(student)).requires_grad_(True)
    loss_o, stats_o = _split(R.distill_loss(s64, cpu64(teacher), **okw), kw)
    loss_o.backward(cpu64(c))

    sp = view(student).detach().clone().requires_grad_(True)
    loss_p, stats_p = _split(R.distill_loss(sp, teacher, **kw), kw)
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


# ----------------------------------------------------------------------------
# Correctness matrix
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("V", [1, 3, 50257])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_matches_oracle(div, dtype, V, device):
    """Every divergence x dtype x vocabulary size, per-token losses and gradients."""
    g = gen("oracle", div, dtype, V)
    lead = (2, 3) if V > 1000 else (4, 5)
    dt = DTYPES[dtype]
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    kw = dict(divergence=div, reduction="none", **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    if V == 1:
        # One class: both softmaxes are 1 and every divergence is 0 (up to the
        # float32 rounding of the mixture weights' logs in jsd/skl/srkl). Each
        # gradient has the form q_j (x_j - sum_k q_k x_k), exactly 0 for q = 1.
        assert (r.loss.abs() <= 4 * EPS32).all(), r.loss.abs().max()
        assert (r.grad == 0).all()


@pytest.mark.parametrize("t2_scaling", [False, True])
@pytest.mark.parametrize("T", [0.5, 3.0])
@pytest.mark.parametrize("div", DIVS)
def test_temperature(div, T, t2_scaling, device):
    g = gen("temperature", div, T, t2_scaling)
    dt = torch.bfloat16 if t2_scaling else torch.float32
    s, t = logits((3, 4, 257), g, dt, device), logits((3, 4, 257), g, dt, device)
    kw = dict(divergence=div, temperature=T, t2_scaling=t2_scaling, reduction="sum", **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    if t2_scaling:  # the T^2 factor is exactly a scale of the loss without it
        plain = flashkd.distill_loss(s, t, **{**kw, "t2_scaling": False})
        torch.testing.assert_close(r.loss, plain * (T * T), rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("div", DIVS)
def test_reductions(div, reduction, device):
    """Each reduction with labels (some ignored); weights with half of them."""
    g = gen("reduction", div, reduction)
    lead, V = (5, 7), 129
    s, t = logits((*lead, V), g, device=device), logits((*lead, V), g, device=device)
    kw = dict(divergence=div, reduction=reduction, labels=make_labels(lead, V, g, device), **DIV_KW[div])
    if reduction in ("none", "mean"):
        kw["weights"] = make_weights(lead, g, device)
    cot = default_cot(lead, g, device) if reduction == "none" else None
    r = run_all(s, t, cot=cot, **kw)
    check_run(r, s, t, kw, dtype=torch.float32)
    per_tok = flashkd.distill_loss(s, t, **{**kw, "reduction": "none"})
    valid = (kw["labels"] != -100).sum()
    expected = {"none": per_tok, "sum": per_tok.sum(), "mean": per_tok.sum() / valid,
                "batchmean": per_tok.sum() / valid}[reduction]
    torch.testing.assert_close(r.loss, expected, rtol=8 * EPS32 * math.sqrt(per_tok.numel()), atol=0)


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("div", DIVS)
def test_num_items(div, reduction, device):
    """num_items replaces the divisor of mean (gradient accumulation); sum ignores it."""
    g = gen("num_items", div, reduction)
    lead, V = (4, 6), 64
    s, t = logits((*lead, V), g, device=device), logits((*lead, V), g, device=device)
    kw = dict(divergence=div, reduction=reduction, labels=make_labels(lead, V, g, device), num_items=37.5,
              **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.float32)
    total = flashkd.distill_loss(s, t, **{**kw, "reduction": "sum", "num_items": None})
    expected = total if reduction == "sum" else total / 37.5
    torch.testing.assert_close(r.loss, expected, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
@pytest.mark.parametrize("div", DIVS)
def test_ignore_index(div, ignore_index, device):
    """Ignored tokens: zero loss, exactly zero gradient, not counted by mean.
    ignore_index may be a valid class (3): those labels are then ignored."""
    g = gen("ignore", div, ignore_index)
    lead, V = (6, 5), 40
    dt = torch.bfloat16 if ignore_index == -1 else torch.float32
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    labels = make_labels(lead, V, g, device, ignore_index=ignore_index, frac_ignored=0.4)
    kw = dict(divergence=div, labels=labels, ignore_index=ignore_index, hard_weight=0.5, reduction="none",
              **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    ignored = (labels == ignore_index).cpu()
    assert ignored.any() and (~ignored).any()
    assert (r.loss.cpu()[ignored] == 0).all()
    assert (r.grad.cpu()[ignored] == 0).all()
    assert (r.loss.cpu()[~ignored] != 0).all()
    mean = flashkd.distill_loss(s, t, **{**kw, "reduction": "mean"})
    torch.testing.assert_close(mean, r.loss.sum() / (~ignored).sum(), rtol=8 * EPS32, atol=0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("div", DIVS)
def test_all_ignored(div, reduction, device):
    """Every token ignored: the loss is exactly 0 and the gradient exactly 0, never NaN."""
    g = gen("all_ignored", div, reduction)
    lead, V = (3, 4), 33
    dt = torch.float16 if reduction == "sum" else torch.float32
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    labels = torch.full(lead, -100, dtype=torch.long, device=device)
    kw = dict(divergence=div, labels=labels, hard_weight=0.7, reduction=reduction,
              weights=make_weights(lead, g, device), return_stats=reduction == "none", **DIV_KW[div])
    leaf = s.clone().requires_grad_(True)
    loss, *stats = _split(flashkd.distill_loss(leaf, t, **kw), kw)
    loss.sum().backward()
    assert not loss.isnan().any() and (loss == 0).all()
    assert not leaf.grad.isnan().any() and (leaf.grad == 0).all()
    if kw["return_stats"]:  # statistics are still computed for ignored tokens
        st = stats[0]
        assert all(torch.isfinite(st[k]).all() for k in STAT_KEYS[:-1])
        assert (st["student_logprob"] == 0).all() and (st["teacher_logprob"] == 0).all()
        assert (st["divergence"] > 0).all()


@pytest.mark.parametrize("div", DIVS)
def test_weights(div, device):
    """Per-token weights multiply each token's loss and gradient; weight 0 gives 0."""
    g = gen("weights", div)
    lead, V = (4, 5), 77
    dt = torch.float16 if div in ("jsd", "tvd") else torch.float32
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    w = make_weights(lead, g, device)
    w[0, :2] = 0.0
    kw = dict(divergence=div, weights=w, reduction="none", labels=make_labels(lead, V, g, device),
              hard_weight=0.25, **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    assert (r.loss[0, :2] == 0).all() and (r.grad[0, :2] == 0).all()
    unweighted = flashkd.distill_loss(s, t, **{**kw, "weights": None})
    torch.testing.assert_close(r.loss, unweighted * w, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_vocab_padding(div, dtype, device):
    """Columns >= vocab_size are excluded from both softmaxes (their contents,
    NaN included, do not matter) and receive exactly zero gradient."""
    g = gen("padding", div, dtype)
    dt = DTYPES[dtype]
    lead, cols, vocab = (3, 5), 72, 50
    s, t = logits((*lead, cols), g, dt), logits((*lead, cols), g, dt)
    junk = float("nan") if dtype == "fp32" else 3.0e4
    s[..., vocab:], t[..., vocab:] = junk, -junk
    s, t = s.to(device), t.to(device)
    kw = dict(divergence=div, vocab_size=vocab, labels=make_labels(lead, vocab, g, device), hard_weight=0.3,
              reduction="mean", return_stats=True, **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    assert (r.grad[..., vocab:] == 0).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_return_stats(div, dtype, device):
    """Every statistic against the oracle, with labels (some ignored); the loss
    and gradient are those of the call without statistics."""
    g = gen("stats", div, dtype)
    dt = DTYPES[dtype]
    lead, V = (4, 6), 301
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    # The student's argmax equals the teacher's on some tokens only.
    s[0, :3] = t[0, :3] + 0.01 * s[0, :3]
    kw = dict(divergence=div, labels=make_labels(lead, V, g, device), reduction="none", return_stats=True,
              temperature=1.5, **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    assert r.stats["agree"].any() and not r.stats["agree"].all()
    leaf = s.clone().requires_grad_(True)
    loss = flashkd.distill_loss(leaf, t, **{**kw, "return_stats": False})
    loss.sum().backward()
    torch.testing.assert_close(loss, r.loss, rtol=4 * EPS32, atol=0)
    torch.testing.assert_close(leaf.grad, r.grad, rtol=4 * EPS32, atol=0)
    if leaf.device.type == "cpu":
        # Without statistics, a hard term or a cap the CPU kernel runs a gradient
        # pass without their terms (kSoftOnly in csrc/cpu/distill_row.h): the same bits.
        assert torch.equal(loss, r.loss) and torch.equal(leaf.grad, r.grad)
    counted = kw["labels"] != -100  # soft_weight 1, no hard loss: the loss is the divergence where counted
    torch.testing.assert_close(r.stats["divergence"][counted], loss[counted], rtol=4 * EPS32, atol=0)
    assert (loss[~counted] == 0).all() and (r.stats["divergence"][~counted] > 0).all()


def test_return_stats_without_labels(device):
    g = gen("stats_nolabels")
    s, t = logits((5, 40), g, device=device), logits((5, 40), g, device=device)
    kw = dict(divergence="fkl", return_stats=True)
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.float32)
    assert (r.stats["student_logprob"] == 0).all() and (r.stats["teacher_logprob"] == 0).all()


@pytest.mark.parametrize("no_grad", ["no_grad", "detached"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_loss_only(div, dtype, no_grad, device):
    """Without a gradient to compute (torch.no_grad(), or student logits that
    do not require grad) the loss-only path gives the training path's loss and
    statistics: labels with some ignored, a hard term, weights, T != 1 and
    padded vocabulary columns."""
    g = gen("loss_only", div, dtype)
    dt = DTYPES[dtype]
    lead, V = (3, 7), 257
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    kw = dict(divergence=div, labels=make_labels(lead, V - 9, g, device), weights=make_weights(lead, g, device),
              hard_weight=0.3, temperature=1.7, vocab_size=V - 9, return_stats=True, **DIV_KW[div])
    for reduction in ("none", "mean"):
        leaf = s.clone().requires_grad_(True)
        ref_loss, ref_stats = flashkd.distill_loss(leaf, t, reduction=reduction, **kw)
        if no_grad == "no_grad":
            with torch.no_grad():
                loss, stats = flashkd.distill_loss(leaf, t, reduction=reduction, **kw)
        else:
            loss, stats = flashkd.distill_loss(s, t, reduction=reduction, **kw)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=4 * EPS32, atol=0)
        for k in STAT_KEYS:
            torch.testing.assert_close(stats[k], ref_stats[k], rtol=4 * EPS32, atol=0, msg=k)


def test_loss_only_allocates_no_gradient(device):
    """The loss-only path allocates nothing of the logits' size (the training
    path's gradient buffer is N x V)."""
    g = gen("loss_only_memory")
    s, t = logits((64, 4096), g, device=device), logits((64, 4096), g, device=device)
    labels = make_labels((64,), 4096, g, device)
    call = lambda: flashkd.distill_loss(s, t, divergence="jsd", labels=labels, hard_weight=0.5)  # noqa: E731
    with torch.no_grad():
        assert memory.measure(call, device).peak < s.numel() * s.element_size() // 8
    leaf = s.clone().requires_grad_(True)
    assert memory.measure(lambda: flashkd.distill_loss(leaf, t, divergence="jsd"), device).peak >= \
        s.numel() * s.element_size()  # the check can fail: the training path does allocate the gradient


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_inplace_backward(div, dtype, device):
    """inplace_backward=True: the gradient equals the out-of-place one, bit for
    bit, and it is written into the student's storage."""
    g = gen("inplace", div, dtype)
    dt = DTYPES[dtype]
    lead, V = (3, 4), 200
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    kw = dict(divergence=div, labels=make_labels(lead, V, g, device), hard_weight=0.4, reduction="mean",
              return_stats=True, **DIV_KW[div])
    ref_leaf = s.clone().requires_grad_(True)
    ref_loss, ref_stats = flashkd.distill_loss(ref_leaf, t, **kw)
    ref_loss.backward()

    # The usual case: the logits come out of a model (a non-leaf), and only
    # the loss reads them.
    w = s.clone().requires_grad_(True)
    student = w * 1.0
    loss, stats = flashkd.distill_loss(student, t, inplace_backward=True, **kw)
    assert torch.equal(loss, ref_loss)
    for k in STAT_KEYS:
        assert torch.equal(stats[k], ref_stats[k]), k
    assert not torch.equal(student.detach(), s), "the student logits were not overwritten"
    loss.backward()
    assert torch.equal(w.grad, ref_leaf.grad)
    assert torch.equal(student.detach(), ref_leaf.grad), "the student's storage should hold the gradient"


@pytest.mark.parametrize("div", ["fkl", "srkl"])
def test_inplace_backward_per_token_and_strided(div, device):
    """inplace_backward with reduction='none' (per-token cotangent) and a
    strided student (every other column of a wider tensor)."""
    g = gen("inplace_strided", div)
    lead, V = (3, 5), 90
    base = logits((*lead, 2 * V), g, device=device)
    t = logits((*lead, V), g, device=device)
    kw = dict(divergence=div, reduction="none", **DIV_KW[div])
    cot = default_cot(lead, g, device)
    ref_leaf = base[..., ::2].clone().requires_grad_(True)
    flashkd.distill_loss(ref_leaf, t, **kw).backward(cot)

    w = base.clone().requires_grad_(True)
    wide = w * 1.0
    student = wide[..., ::2]
    assert student.stride(-1) == 2
    loss = flashkd.distill_loss(student, t, inplace_backward=True, **kw)
    loss.backward(cot)
    assert torch.equal(w.grad[..., ::2], ref_leaf.grad)
    assert (w.grad[..., 1::2] == 0).all()
    assert torch.equal(wide.detach()[..., 1::2], base[..., 1::2]), "columns outside the view were written"


SHAPES = {
    "1d": (97,),
    "N1": (1, 97),
    "lead3": (2, 3, 97),
    "lead4": (2, 1, 3, 2, 31),
    "empty": (0, 16),
    "V1_lead": (3, 2, 1),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("div", DIVS)
def test_shapes(div, shape, device):
    """Any number of leading dims (none at all, one token, size-1 dims, zero tokens)."""
    g = gen("shape", div, shape)
    sh = SHAPES[shape]
    s, t = logits(sh, g, device=device), logits(sh, g, device=device)
    labels = make_labels(sh[:-1], sh[-1], g, device) if len(sh) > 1 else torch.tensor(1, device=device)
    for reduction in ("none", "mean"):
        kw = dict(divergence=div, reduction=reduction, labels=labels, hard_weight=0.5, return_stats=True,
                  **DIV_KW[div])
        r = run_all(s, t, **kw)
        check_run(r, s, t, kw, dtype=torch.float32)
        assert r.loss.shape == (sh[:-1] if reduction == "none" else ())
        assert r.stats["divergence"].shape == sh[:-1] and r.stats["agree"].shape == sh[:-1]


def _transposed_lead(x):
    return x.transpose(0, 1)


LAYOUTS = {
    # leading dims transposed: rows are not in memory order
    "transposed_lead": (lambda sh: (sh[1], sh[0], sh[2]), _transposed_lead),
    # every other vocabulary column: last-dim stride 2
    "sliced_vocab": (lambda sh: (sh[0], sh[1], 2 * sh[2]), lambda x: x[..., ::2]),
    # vocabulary-major storage: last-dim stride = number of tokens
    "vocab_major": (lambda sh: (sh[2], sh[0], sh[1]), lambda x: x.permute(1, 2, 0)),
    # more non-mergeable leading dims than the kernel's row layout describes
    # (the kernel describes at most 4; this one is copied to a contiguous tensor)
    "many_lead_dims": (lambda sh: (2, 2, 2, 2, 2, sh[2]), lambda x: x.permute(4, 3, 2, 1, 0, 5)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("div", DIVS)
def test_noncontiguous(div, layout, device):
    """Strided student and teacher views give the results of their contiguous copies."""
    g = gen("layout", div, layout)
    base_shape, view = LAYOUTS[layout]
    sh = base_shape((3, 4, 61))
    dt = torch.bfloat16 if layout == "vocab_major" else torch.float32
    s_base, t_base = logits(sh, g, dt, device), logits(sh, g, dt, device)
    t = view(t_base)
    assert not view(s_base).is_contiguous() and not t.is_contiguous()
    lead, V = t.shape[:-1], t.shape[-1]
    kw = dict(divergence=div, labels=make_labels(lead, V, g, device), hard_weight=0.2, reduction="none",
              **DIV_KW[div])
    r = run_all(s_base, t, view=view, **kw)
    check_run(r, view(s_base), t, kw, dtype=dt)
    # Same values, contiguous: same results up to float32 summation order.
    rc = run_all(view(s_base).contiguous(), t.contiguous(), cot=None, **kw)
    torch.testing.assert_close(r.loss, rc.loss, rtol=16 * EPS32, atol=16 * EPS32)


def test_broadcast_teacher(device):
    """A teacher expanded along the tokens (row stride 0) is read correctly."""
    g = gen("broadcast")
    s = logits((6, 50), g, device=device)
    t = logits((50,), g, device=device).expand(6, 50)
    kw = dict(divergence="jsd", reduction="none", beta=0.7)
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.float32)


MIXED = [("bf16", "fp32"), ("fp32", "fp16"), ("fp16", "bf16")]


@pytest.mark.parametrize("pair", MIXED, ids=["-".join(p) for p in MIXED])
@pytest.mark.parametrize("div", DIVS)
def test_mixed_dtypes(div, pair, device):
    """Student and teacher in different dtypes; the gradient has the student's."""
    g = gen("mixed", div, pair)
    ds, dtch = DTYPES[pair[0]], DTYPES[pair[1]]
    s, t = logits((4, 5, 130), g, ds, device), logits((4, 5, 130), g, dtch, device)
    kw = dict(divergence=div, reduction="mean", labels=make_labels((4, 5), 130, g, device), hard_weight=0.1,
              **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=ds)


def test_vocab_128256(device):
    """A Llama-3-sized vocabulary, once (fkl with the hard loss and statistics)."""
    g = gen("v128256")
    s, t = logits((3, 128256), g, torch.bfloat16, device), logits((3, 128256), g, torch.bfloat16, device)
    kw = dict(divergence="fkl", labels=torch.tensor([5, -100, 128255], device=device), hard_weight=0.5,
              temperature=2.0, t2_scaling=True, reduction="none", return_stats=True)
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.bfloat16)


@pytest.mark.parametrize("div", ["fkl", "jsd", "taid"])
def test_long_rows_sum_in_a_fixed_order_on_the_cpu(div):
    """The CPU kernel's row sums (softmax normalisers, divergence terms) run in
    one order written in csrc/cpu/row_sums.h, not the vectorizer's: every
    instruction set gives the same bits, and over a 262144-entry row the loss
    and the gradient stay within a few float32 roundings of the oracle. (Here
    the vectorizer's order, one running sum per vector lane, was 13 to 43 units
    of roundoff off in the loss and 5 to 35 in the gradient, and AVX2 and
    AVX-512 disagreed; the fixed order is within about one unit.)"""
    g = gen("long rows", div)
    s, t = logits((4, 262144), g, scale=3.0), logits((4, 262144), g, scale=3.0)
    kw = dict(divergence=div, temperature=2.0, labels=torch.tensor([7, 0, -100, 262143]), hard_weight=0.5,
              reduction="none", **DIV_KW[div])
    def run():
        leaf = s.clone().requires_grad_()
        loss = flashkd.distill_loss(leaf, t, **kw)
        loss.sum().backward()
        return loss.detach(), leaf.grad

    results = results_per_cpu_isa(run)
    assert_same_bits(results)
    loss, grad = next(iter(results.values()))
    leaf = s.double().requires_grad_()
    loss_o = R.distill_loss(leaf, t.double(), **kw)
    loss_o.sum().backward()
    assert ((loss.double() - loss_o).abs() <= 8 * EPS32 * loss_o.abs()).all(), (loss, loss_o)
    grad_err = (grad.double() - leaf.grad).abs().amax(-1)
    assert (grad_err <= 8 * EPS32 * leaf.grad.abs().amax(-1)).all(), grad_err / leaf.grad.abs().amax(-1)


# Shapes aimed at the CUDA cluster kernel (csrc/cuda/distill_cluster.cu), which
# splits a row over up to 8 blocks, each caching a 16-byte-aligned slice in
# shared memory: slices of unequal length (V = 128248 over 8), a vocabulary
# tail that is not a multiple of 8 columns (read from global memory), padding
# columns past vocab_size, more rows than resident clusters (V = 12000 fp32
# fills 192 KiB of shared memory, one block per SM, so on an H100 each block
# walks three or four rows: both stages and both barrier phases), a teacher of
# another dtype (another slice size). Elsewhere they are more oracle checks.
ROW_SPLIT_CASES = {
    "bf16-V128248-N40": (40, 128248, "bf16", "bf16", None),
    "fp32-V1028-N64": (64, 1028, "fp32", "fp32", None),
    "fp32-V12000-N400": (400, 12000, "fp32", "fp32", None),
    "bf16-V4096-vocab4001-N300": (300, 4096, "bf16", "bf16", 4001),
    "bf16-fp32-V32000-N70": (70, 32000, "bf16", "fp32", None),
    "fp16-V2048-N512": (512, 2048, "fp16", "fp16", None),
    # At cluster size 8: the last block's slice ends in a 5-column tail read
    # from global memory (one row: more rows of 128253 bf16 would not start
    # on 16-byte boundaries, and would stream); straddles vocab_size; lies
    # wholly past it.
    "bf16-V128253-N1": (1, 128253, "bf16", "bf16", None),
    "bf16-V128256-vocab127999-N40": (40, 128256, "bf16", "bf16", 127999),
    "bf16-V128256-vocab100000-N40": (40, 128256, "bf16", "bf16", 100000),
}


@pytest.mark.parametrize("div", ["fkl", "jsd", "taid"])
@pytest.mark.parametrize("case", list(ROW_SPLIT_CASES))
def test_row_split_shapes(case, div, device):
    n, V, sdt, tdt, vocab_size = ROW_SPLIT_CASES[case]
    g = gen("row_split", case, div)
    s, t = logits((n, V), g, DTYPES[sdt], device), logits((n, V), g, DTYPES[tdt], device)
    kw = dict(divergence=div, labels=make_labels((n,), vocab_size or V, g, device), hard_weight=0.3,
              weights=make_weights((n,), g, device), temperature=1.5, reduction="none", return_stats=True,
              vocab_size=vocab_size, **DIV_KW[div])
    r = run_all(s, t, **kw)
    if device != "cpu" and torch.ops.flashkd.distill_cuda_kernel()[0] == "cluster":
        assert torch.ops.flashkd.distill_cuda_kernel()[1] == "cluster", "the case streamed: it tests nothing more"
    check_run(r, s, t, kw, dtype=DTYPES[sdt])
    # Written in place, the gradient is the same, bit for bit.
    student = s.clone().requires_grad_(True) * 1.0
    loss, _ = flashkd.distill_loss(student, t, inplace_backward=True, **kw)
    assert torch.equal(loss, r.loss.detach())
    assert torch.equal(student.detach(), r.grad)


def test_argmax_ties_across_row_slices(device):
    """The 'agree' statistic takes the first of tied maxima, also when the tied
    columns fall in slices of the row that different blocks own."""
    V = 128256
    g = gen("argmax_ties")
    s, t = logits((3, V), g, torch.bfloat16, device), logits((3, V), g, torch.bfloat16, device)
    s[:, [5, 70000, 127000]] = 30.0   # student: first maximum at column 5
    t[0, [5, 127000]] = 30.0          # teacher: first at 5, agree
    t[1, [70000, 127000]] = 30.0      # first at 70000, disagree
    t[2, 127000] = 30.0               # only 127000, disagree
    kw = dict(divergence="fkl", reduction="none", return_stats=True)
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.bfloat16)
    assert r.stats["agree"].cpu().tolist() == [True, False, False]


def test_cuda_kernel_choice(device):
    """The CUDA kernel that ran: the streaming one when forced, else the
    cluster kernel on contiguous 16-byte-aligned rows; strided rows stream."""
    if device == "cpu":
        pytest.skip("a CUDA kernel choice")
    choice, _ = torch.ops.flashkd.distill_cuda_kernel()
    g = gen("kernel_choice")
    s, t = logits((4, 4096), g, torch.bfloat16, device), logits((4, 4096), g, torch.bfloat16, device)
    flashkd.distill_loss(s, t)
    assert torch.ops.flashkd.distill_cuda_kernel()[1] == ("stream" if choice == "stream" else "cluster")
    flashkd.distill_loss(s[:, ::2], t[:, ::2])
    assert torch.ops.flashkd.distill_cuda_kernel()[1] == "stream"


def test_cuda_kernel_choice_errors():
    if not flashkd.has_cuda_kernels():
        pytest.skip("no CUDA kernels in this build")
    before = torch.ops.flashkd.distill_cuda_kernel()[0]
    with pytest.raises(ValueError, match="unknown distillation kernel"):
        torch.ops.flashkd.distill_cuda_kernel("fastest")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs an sm_90 GPU"):
            torch.ops.flashkd.distill_cuda_kernel("cluster")
    assert torch.ops.flashkd.distill_cuda_kernel()[0] == before, "a refused choice changed the preference"
    # Forcing, then resetting, returns to the environment's choice.
    assert torch.ops.flashkd.distill_cuda_kernel("stream")[0] == "stream"
    assert torch.ops.flashkd.distill_cuda_kernel("", True)[0] == os.environ.get("FLASHKD_DISTILL_KERNEL", "auto")


@pytest.mark.parametrize("t2_scaling", [False, True])
@pytest.mark.parametrize("div", DIVS)
def test_hard_loss_mixing(div, t2_scaling, device):
    """hard_weight * CE(at T = 1) + soft_weight * (T^2) * D, both weights > 0."""
    g = gen("mixing", div, t2_scaling)
    lead, V = (5, 4), 150
    dt = torch.bfloat16 if t2_scaling else torch.float32
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    labels = make_labels(lead, V, g, device)
    kw = dict(divergence=div, labels=labels, hard_weight=0.35, soft_weight=0.65, temperature=2.5,
              t2_scaling=t2_scaling, reduction="none", **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    # The parts add up: hard-only + soft-only = mixed.
    hard = flashkd.distill_loss(s, t, **{**kw, "soft_weight": 0.0})
    soft = flashkd.distill_loss(s, t, **{**kw, "hard_weight": 0.0})
    torch.testing.assert_close(hard + soft, r.loss, rtol=8 * EPS32, atol=8 * EPS32)
    ce = torch.nn.functional.cross_entropy(cpu64(s).reshape(-1, V), cpu64(labels).reshape(-1), reduction="none")
    torch.testing.assert_close(cpu64(hard).reshape(-1), 0.35 * ce, rtol=0, atol=64 * EPS32 * (1 + ce.abs().max()))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("div", DIVS)
def test_grad_output_scaling(div, dtype, device):
    """A cotangent other than 1 (reduction='none' with per-token cotangents,
    then 'mean' with a scalar one, as in loss / accumulation_steps).

    The gradient is computed in forward and stored in the student's dtype, and
    backward multiplies it by the cotangent: two roundings to the student's
    dtype where torch autograd has one. That is inherent in the design, so the
    bound allows two roundings. The CPU path rounds a third time (the
    cotangent itself, see test_backward_scaling_rounds_once), so there the
    bound allows three.
    """
    dt = DTYPES[dtype]
    rounds = 3 if device == "cpu" else 2
    g = gen("cotangent", div, dtype)
    lead, V = (16, 32), 300
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    kw = dict(divergence=div, reduction="none", **DIV_KW[div])
    r = run_all(s, t, cot=default_cot(lead, g, device), **kw)
    check_run(r, s, t, kw, dtype=dt, rounds=rounds)
    kw = dict(divergence=div, reduction="mean", **DIV_KW[div])
    r = run_all(s, t, cot=torch.tensor(1.0 / 3.0, device=device), **kw)
    check_run(r, s, t, kw, dtype=dt, rounds=rounds)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_backward_scaling_rounds_once(dtype, device):
    """Backward multiplies the saved gradient (student dtype) by the cotangent:
    the result must be that product computed exactly and rounded once, the
    float32 product cast to the student's dtype, as torch's own mul does."""
    dt = DTYPES[dtype]
    g = gen("rounds_once", dtype)
    lead, V = (8, 16), 128
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    for reduction, cot in (("none", default_cot(lead, g, device)), ("mean", torch.tensor(1 / 3, device=device))):
        unit, scaled = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        flashkd.distill_loss(unit, t, divergence="rkl", reduction=reduction).backward(torch.ones_like(cot))
        flashkd.distill_loss(scaled, t, divergence="rkl", reduction=reduction).backward(cot)
        factor = cot[..., None] if cot.dim() else cot
        expected = (unit.grad.float() * factor).to(dt)
        mismatch = (scaled.grad != expected).sum().item()
        assert mismatch == 0, f"{reduction}: {mismatch} of {expected.numel()} gradient elements differ"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_scale_rows_long_and_strided_rows(dtype, device):
    """The backward's in-place scaling on rows longer than the CPU's conversion
    chunk (2048), with a partial last chunk, per-row and scalar factors (some
    exactly 1, which skip their row), on a column-strided view: every element
    is the float32 product rounded once, and the elements between the view's
    columns are left alone."""
    dt = DTYPES[dtype]
    g = gen("scale_rows", dtype)
    rows, V = 6, 2 * 2048 + 77
    base = torch.randn(rows, 2 * V, generator=g).to(dt).to(device)
    view = base[:, ::2]
    per_row = torch.rand(rows, generator=g).to(device) * 3
    per_row[2] = 1.0
    for factor in (per_row, torch.tensor(0.37, device=device)):
        before = base.clone()
        torch.ops.flashkd.scale_rows_(view, factor)
        f = factor[:, None] if factor.dim() else factor
        expected = (before[:, ::2].float() * f).to(dt)
        assert torch.equal(view, expected)
        assert torch.equal(base[:, 1::2], before[:, 1::2])


# ----------------------------------------------------------------------------
# Random option combinations
# ----------------------------------------------------------------------------

# The tests above vary one or two options at a time. Here each case draws all
# of them at once (divergence and its parameter, dtypes, leading dims,
# vocabulary and padding, temperature, labels with any ignore_index, hard and
# soft weights, token weights, reduction and num_items, statistics, strided
# layouts, large logits, masked classes) from a generator seeded by the case
# number, and is judged by the same tolerance model (checks.RANDOM_CASES cases).


def draw_options(rng):
    """Random distill_loss options: (kw without labels/weights, leading dims, V, label plan)."""
    div = rng.choice(DIVS)
    kw = dict(divergence=div, reduction=rng.choice(["none", "sum", "mean", "batchmean"]),
              t2_scaling=rng.random() < 0.3, return_stats=rng.random() < 0.3)
    if div == "jsd":
        kw["beta"] = rng.choice([0.5, 0.1, 0.9, rng.uniform(0.01, 0.99)])
    if div in ("skl", "srkl"):
        kw["alpha"] = rng.choice([0.1, 0.0, 0.5, 0.99, rng.uniform(0.0, 0.99)])
    if div == "taid":
        kw["taid_lambda"] = rng.choice([0.0, 1.0, 0.4, rng.uniform(0.0, 1.0)])
    if rng.random() < 0.5:
        kw["temperature"] = rng.choice([0.5, 1.3, 2.0, 3.7])
    if rng.random() < 0.3:
        kw["soft_weight"] = rng.choice([0.0, 0.5, 2.0])
    if kw["reduction"] != "none" and rng.random() < 0.3:
        kw["num_items"] = rng.choice([1.0, 7.0, 123.5])
    lead = tuple(rng.choice([1, 2, 3, 5, 8]) for _ in range(rng.choice([0, 1, 1, 2, 3])))
    V = rng.choice([1, 2, 3, 5, 16, 17, 31, 64, 100, 257, 1000, 3001])
    if V > 1 and rng.random() < 0.3:
        kw["vocab_size"] = rng.randint(1, V)
    labels = None
    if lead and rng.random() < 0.6:
        # ignore_index may be a valid class (0): those labels are then ignored
        labels = dict(ignore_index=rng.choice([-100, -1, 0]), frac_ignored=rng.choice([0.0, 0.3, 1.0]),
                      hard_weight=rng.choice([0.0, 0.5, 1.0, 0.13]))
    return kw, lead, V, labels


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_option_combinations(case, device):
    rng = random.Random(f"distill-{case}")
    kw, lead, V, label_plan = draw_options(rng)
    vocab = kw.get("vocab_size") or V
    dt, tdt = rng.choice(list(DTYPES.values())), rng.choice(list(DTYPES.values()))
    g = gen("random", case)
    if label_plan:
        lab = torch.randint(0, vocab, lead, generator=g)
        drop = torch.rand(lead, generator=g) < label_plan["frac_ignored"]
        kw["labels"] = torch.where(drop, label_plan["ignore_index"], lab).to(device)
        kw["ignore_index"] = label_plan["ignore_index"]
        kw["hard_weight"] = label_plan["hard_weight"]
    if lead and rng.random() < 0.4:
        kw["weights"] = make_weights(lead, g, device)
    scale = rng.choice([1.0, 2.0, 10.0, 30.0])
    layout = rng.choice(["contiguous", "contiguous", "sliced_vocab", "transposed_lead"])
    if layout == "sliced_vocab":
        base_shape, view = (*lead, 2 * V), (lambda x: x[..., ::2])
    elif layout == "transposed_lead" and len(lead) >= 2:
        base_shape, view = (lead[1], lead[0], *lead[2:], V), (lambda x: x.transpose(0, 1))
    else:
        base_shape, view = (*lead, V), (lambda x: x)
    s_base = logits(base_shape, g, dt, scale=scale)
    t = logits((*lead, V), g, tdt, scale=scale)
    if V > 2 and rng.random() < 0.15:
        # Masked classes, -inf in both (never the labels' or column 0)
        mask = torch.rand((*lead, V), generator=g) < 0.2
        mask[..., 0] = False
        if "labels" in kw:
            mask = mask.scatter(-1, kw["labels"].cpu().clamp(0, V - 1).unsqueeze(-1), False)
        base_mask = torch.zeros(base_shape, dtype=torch.bool)
        view(base_mask)[...] = mask
        s_base, t = s_base.masked_fill(base_mask, -math.inf), t.masked_fill(mask, -math.inf)
    s_base, t = s_base.to(device), t.to(device)
    # A per-token cotangent makes the kernel round the gradient twice (stored
    # in forward, scaled in backward): held to that model in float32 only; on
    # a few rows of bf16/fp16 "no worse than torch, which rounds once" is then
    # a matter of luck (test_grad_output_scaling covers that path).
    cot = default_cot(lead, g, device) if kw["reduction"] == "none" and dt == torch.float32 else None
    r = run_all(s_base, t, view=view, cot=cot, **kw)
    check_run(r, view(s_base), t, kw, dtype=dt, rounds=1 if cot is None else 2)


# ----------------------------------------------------------------------------
# Gradient check by finite differences
# ----------------------------------------------------------------------------
#
# torch.autograd.gradcheck wants float64 inputs, and the kernels accept only
# float32, bfloat16 and float16 (they compute in float32), so gradcheck cannot
# be pointed at flashkd.distill_loss; running it on the float64 oracle would
# check the oracle, not the kernel. Instead this checks the kernel's own
# gradient against central finite differences of the kernel's own loss, in
# float32, along random unit directions d:
#
#     (L(x + h d) - L(x - h d)) / (2 h)  ~  <grad L(x), d>
#
# With h = 1e-2 and logits of O(1) (T >= 1), the truncation error is
# h^2 / 6 * |L'''| (a few 1e-5: third derivatives of these losses are O(1)
# for such logits), and the rounding error is about 2 * delta * |L| / (2 h),
# delta the float32 noise of L (~1e-6 here): a few 1e-5 as well. The tolerance
# 5e-4 + 2e-3 * |<grad, d>| sits above both, and far below a wrong gradient
# (a missing term or factor moves <grad, d> by O(|grad|) ~ 0.1 to 1).

def _fd_directional(fn, x, d, h):
    return (fn(x + h * d).double() - fn(x - h * d).double()) / (2 * h)


@pytest.mark.parametrize("config", ["mean_labels_weights", "none_cotangent"])
@pytest.mark.parametrize("div", DIVS)
def test_gradcheck_finite_differences(div, config, device):
    g = gen("gradcheck", div, config)
    lead, V = (3, 4), 7
    s = logits((*lead, V), g, device=device, scale=1.0)
    t = logits((*lead, V), g, device=device, scale=1.0)
    kw = dict(divergence=div, temperature=1.3, **DIV_KW[div])
    if config == "mean_labels_weights":
        kw.update(reduction="mean", labels=make_labels(lead, V, g, device), hard_weight=0.6, soft_weight=0.9,
                  weights=make_weights(lead, g, device), t2_scaling=True)
        cot = None
    else:
        kw.update(reduction="none")
        cot = default_cot(lead, g, device)
    h = 1e-2

    def fn(x):
        loss = flashkd.distill_loss(x, t, **kw)
        return loss if cot is None else (loss * cot).sum()

    T = kw["temperature"]
    if div == "tvd":
        # TVD is not differentiable where p_j = q_j: move the teacher well away
        # from the student; the stencil is checked to keep every sign below.
        t = t + 3.0 * torch.randn(t.shape, generator=g, dtype=torch.float64).float().to(device)
    leaf = s.clone().requires_grad_(True)
    fn(leaf).backward()
    grad = leaf.grad.double()
    assert grad.abs().max() > 1e-3  # a real gradient to check
    if div == "taid":
        # TAID's gradient treats r = softmax(((1 - l) z_s + l z_t) / T) as a
        # constant (stop-gradient on z_s), so the finite differences are taken
        # with r frozen at the point: KL(r0 || q(x)) is fkl against the fixed
        # teacher logits (1 - l) z_s + l z_t.
        lam = kw["taid_lambda"]
        frozen = dict(kw, divergence="fkl", taid_lambda=None)
        t_frozen = (1 - lam) * s + lam * t

        def fd_fn(x):
            loss = flashkd.distill_loss(x, t_frozen, **frozen)
            return loss if cot is None else (loss * cot).sum()

        torch.testing.assert_close(fd_fn(s), fn(s), rtol=1e-5, atol=1e-6)
    else:
        fd_fn = fn
    p = torch.softmax(t.double() / T, -1)
    for k in range(4):
        d = torch.randn(s.shape, generator=g, dtype=torch.float64)
        d = (d / d.norm()).float().to(device)
        if div == "tvd":
            for sign in (1, -1):
                q = torch.softmax((s + sign * h * d).double() / T, -1)
                assert ((q - p).sign() == (torch.softmax(s.double() / T, -1) - p).sign()).all()
        numeric = _fd_directional(fd_fn, s, d, h).item()
        analytic = (grad * d.double()).sum().item()
        assert abs(numeric - analytic) <= 5e-4 + 2e-3 * abs(analytic), (k, numeric, analytic)


# ----------------------------------------------------------------------------
# Extreme inputs
# ----------------------------------------------------------------------------

def _extreme_pair(g, V, device):
    """Rows of +-1e4 logits: a dominant +1e4 class in the student and in the
    teacher (at the same column in row 0, at different columns in row 1),
    -1e4 'soft-masked' entries in both (rows 2, 3), and a row mixing both.
    (Logits all near +1e4, a large common offset, are test_large_logit_offset.)"""
    s = logits((5, V), g, scale=2.0)
    t = logits((5, V), g, scale=2.0)
    s[0, 3] = t[0, 3] = 1e4
    s[1, 0], t[1, 5] = 1e4, 1e4
    m = torch.rand((2, V), generator=g) < 0.4
    s[2:4][m] = -1e4
    t[2:4][m] = -1e4
    t[3, 1] = -1e4  # and one the teacher masks alone
    s[4, :V // 2] = -1e4
    t[4, :V // 4] = -1e4
    t[4, V // 2] = 1e4
    return s.to(device), t.to(device)


@pytest.mark.parametrize("div", DIVS)
def test_extreme_logits(div, device):
    """+-1e4 logits: finite losses and gradients, as accurate as torch's."""
    g = gen("extreme", div)
    V = 64
    s, t = _extreme_pair(g, V, device)
    kw = dict(divergence=div, reduction="none", labels=torch.tensor([3, 0, 7, 9, 60], device=device),
              hard_weight=0.5, return_stats=True, **DIV_KW[div])
    r = run_all(s, t, **kw)
    assert torch.isfinite(r.loss).all() and torch.isfinite(r.grad).all()
    # Log-probabilities of magnitude ~1e4 carry an absolute error ~EPS32 * 1e4 in
    # any float32 computation, torch's included; the floor of each row scales
    # with its own spread, so the rows without such entries are held as tightly
    # as anywhere else.
    check_run(r, s, t, kw, dtype=torch.float32)


@pytest.mark.parametrize("beta, gap", [(0.5, 103.5), (1 - 1e-8, 86.0)])
def test_jsd_mixture_underflow(beta, gap, device):
    """An entry whose mixture beta p + (1 - beta) q rounds to 0 while q does
    not: q = exp(-103.5) is the subnormal 2^-149 on CUDA (its exp keeps
    subnormals; the CPU's flushes it to 0), and 1 - beta = 1e-8 does it with a
    normal q = exp(-86) on any device. The entry's true terms are below
    float32's resolution: the loss and gradient stay finite and match the
    oracle's (they were inf and NaN)."""
    s = torch.tensor([[0.0, -gap]], device=device, requires_grad=True)
    t = torch.tensor([[0.0, -200.0]], device=device)
    loss = flashkd.distill_loss(s, t, divergence="jsd", beta=beta)
    loss.backward()
    s64 = s.detach().cpu().double().requires_grad_(True)
    expected = R.distill_loss(s64, t.cpu().double(), divergence="jsd", beta=beta)
    expected.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss.detach().cpu().double(), expected.detach(), rtol=0, atol=1e-20)
    torch.testing.assert_close(s.grad.cpu().double(), s64.grad, rtol=0, atol=1e-20)


@pytest.mark.parametrize("div", DIVS)
def test_large_logit_offset(div, device):
    """Logits 1e4 + O(1) (the softmax is shift-invariant): losses and gradients
    as accurate as plain torch's in float32, whose log_softmax subtracts the
    max before taking logs. Float32 represents these inputs to 2^-10; the
    oracle sees the same float32 values, so that representation error is not
    part of the comparison."""
    g = gen("offset", div)
    V = 1000
    s = logits((4, V), g) + 1e4
    t = logits((4, V), g) + 1e4
    s, t = s.to(device), t.to(device)
    kw = dict(divergence=div, reduction="none", **DIV_KW[div])
    r = run_all(s, t, **kw)
    assert torch.isfinite(r.loss).all() and torch.isfinite(r.grad).all()
    check_run(r, s, t, kw, dtype=torch.float32)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("div", DIVS)
def test_neg_inf_masked(div, dtype, device):
    """-inf at the same positions in student and teacher (masked classes):
    finite loss, correct gradient, exactly zero gradient at masked positions.
    One row keeps a single class: both distributions are one-hot there."""
    g = gen("neginf", div, dtype)
    dt = DTYPES[dtype]
    lead, V = (4, 3), 96
    s, t = logits((*lead, V), g, dt), logits((*lead, V), g, dt)
    mask = torch.rand((*lead, V), generator=g) < 0.3
    mask[0, 0] = True
    mask[0, 0, 17] = False
    s[mask] = t[mask] = float("-inf")
    s, t = s.to(device), t.to(device)
    labels = make_labels(lead, V, g)
    labels = torch.where(labels >= 0, torch.where(mask.gather(-1, labels.clamp_min(0)[..., None])[..., 0],
                                                  torch.full_like(labels, -100), labels), labels)
    labels[0, 0] = 17
    labels = labels.to(device)
    kw = dict(divergence=div, reduction="none", labels=labels, hard_weight=0.3, temperature=1.5,
              return_stats=True, **DIV_KW[div])
    r = run_all(s, t, **kw)
    assert torch.isfinite(r.loss).all() and torch.isfinite(r.grad).all()
    check_run(r, s, t, kw, dtype=dt)
    assert (r.grad.cpu()[mask] == 0).all()
    # One class left: p = q one-hot, loss 0 up to float32 rounding, gradient exactly 0.
    assert r.loss[0, 0].abs() <= 4 * EPS32 and (r.grad[0, 0] == 0).all()


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("div", DIVS)
def test_non_finite_logits_poison_their_row(div, side, bad, device):
    """A NaN or +inf logit in a counted row makes that row's loss, divergence
    and entropy (of its side) NaN and its whole gradient row NaN, as torch's
    log_softmax does and the oracle says; before, the divergences' p > 0
    masks dropped it for most divergences (loss 0, gradient 0). An ignored row
    stays exactly 0, and every other row keeps the bits of the clean call.

    Rows: 1 has the bad value among finite logits; 2 behind -inf entries of
    its lane ([5, -inf x 7, bad, -inf ...]: a max reduction that resets on a
    NaN ends at -inf there); 3 is ignored; 0 and 4 are clean."""
    g = gen("nonfinite", div, side, bad)
    lead, V = (5,), 40
    s, t = logits((*lead, V), g), logits((*lead, V), g)
    labels = make_labels(lead, V, g, frac_ignored=0.0)
    labels[3] = -100
    labels[2] = 0
    value = float(bad)
    dirty = s if side == "student" else t
    clean = dirty.clone()
    dirty[1, 13] = value
    dirty[2] = -math.inf
    dirty[2, 0], dirty[2, 8] = 5.0, value
    dirty[3, 20] = value
    kw = dict(divergence=div, labels=labels.to(device), hard_weight=0.3, temperature=1.5, reduction="none",
              return_stats=True, **DIV_KW[div])

    def call(x_s, x_t):
        leaf = x_s.clone().to(device).requires_grad_(True)
        loss, stats = flashkd.distill_loss(leaf, x_t.to(device), **kw)
        loss.sum().backward()
        return loss.cpu(), leaf.grad.cpu(), {k: v.cpu() for k, v in stats.items()}

    loss, grad, stats = call(s, t)
    if side == "student":
        clean_loss, clean_grad, _ = call(clean, t)
    else:
        clean_loss, clean_grad, _ = call(s, clean)
    oracle, oracle_stats = R.distill_loss(s.double(), t.double(), **{**kw, "labels": labels})
    poisoned = torch.tensor([False, True, True, False, False])
    assert torch.equal(oracle.isnan(), poisoned)
    assert torch.equal(loss.isnan(), poisoned)
    assert grad[poisoned].isnan().all() and not grad[~poisoned].isnan().any()
    assert (loss[3] == 0).all() and (grad[3] == 0).all()
    for row in (0, 4):
        assert torch.equal(loss[row], clean_loss[row]) and torch.equal(grad[row], clean_grad[row])
    for key in ("divergence", f"{side}_entropy"):
        assert torch.equal(oracle_stats[key][[1, 2]].isnan(), torch.tensor([True, True]))
        assert stats[key][[1, 2]].isnan().all() and not stats[key][[0, 4]].isnan().any(), key
    other = "teacher" if side == "student" else "student"
    assert not stats[f"{other}_entropy"].isnan().any()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_identical_student_teacher(div, dtype, device):
    """Student = teacher: zero loss and zero gradient for every divergence.

    The kernel forms both distributions by the same float32 arithmetic, so
    what remains is float32 rounding: each term of the sum carries a log-ratio
    error of about EPS32 * |log q| and a weight <= 1 (sum of weights 1), so
    |D| <= 4 * EPS32 * (sum q |log q| + sqrt(V)) = 4 * EPS32 * (H + sqrt(V));
    a gradient element q_j * (error) is bounded by that times q_j <= 1.
    """
    g = gen("identical", div, dtype)
    dt = DTYPES[dtype]
    lead, V = (3, 4), 50257 if dtype == "bf16" else 500
    s = logits((*lead, V), g, dt, device, scale=3.0)
    kw = dict(divergence=div, reduction="none", temperature=1.7, return_stats=True, **DIV_KW[div])
    leaf = s.clone().requires_grad_(True)
    loss, stats = flashkd.distill_loss(leaf, s.clone(), **kw)
    loss.sum().backward()
    H = stats["student_entropy"].double()
    bound = 4 * EPS32 * (H + math.sqrt(V))
    assert torch.isfinite(loss).all() and (loss.double().abs() <= bound).all(), (loss.abs().max(), bound.max())
    assert (leaf.grad.double().abs() <= bound[..., None] / 1.7).all(), leaf.grad.abs().max()
    assert stats["agree"].all()
    # Same values, but the two entropies may be summed in different orders.
    assert ((stats["student_entropy"] - stats["teacher_entropy"]).double().abs() <= bound).all()


# ----------------------------------------------------------------------------
# torch.library.opcheck, torch.compile, the nn.Module
# ----------------------------------------------------------------------------

def _op_args(student, teacher, labels=None, weights=None, divergence="fkl", temperature=1.0, beta=0.5, alpha=0.1,
             taid_lambda=None, ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scaling=False,
             vocab_size=None, reduction="mean", num_items=None, return_stats=False):
    return (student, teacher, labels, weights, divergence, temperature, beta, alpha, taid_lambda, ignore_index,
            hard_weight, soft_weight, t2_scaling, vocab_size, reduction, num_items, return_stats)


OPCHECK_CASES = {
    "fkl_mean": dict(),
    "stats_none": dict(divergence="jsd", beta=0.3, reduction="none", return_stats=True),
    "labels_weights": dict(divergence="taid", taid_lambda=0.5, labels=True, weights=True, hard_weight=0.5,
                           temperature=2.0, t2_scaling=True, reduction="sum"),
    "padded_bf16": dict(divergence="skl", alpha=0.2, vocab_size=20, labels=True, num_items=3.0,
                        return_stats=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("op", ["distill_loss", "distill_loss_value"])
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, op, device):
    g = gen("opcheck", case)
    opts = dict(OPCHECK_CASES[case])
    dt = opts.pop("dtype", torch.float32)
    lead, V = (2, 3), 24
    s = logits((*lead, V), g, dt, device).requires_grad_(op == "distill_loss")  # the value op has no backward
    t = logits((*lead, V), g, dt, device)
    if opts.pop("labels", False):
        opts["labels"] = make_labels(lead, opts.get("vocab_size") or V, g, device)
    if opts.pop("weights", False):
        opts["weights"] = make_weights(lead, g, device)
    torch.library.opcheck(getattr(torch.ops.flashkd, op).default, _op_args(s, t, **opts))


def test_torch_compile_no_grad(device):
    """torch.compile(fullgraph=True) under torch.no_grad() (the loss-only op)."""
    torch._dynamo.reset()
    g = gen("compile_no_grad")
    s, t = logits((6, 50), g, device=device), logits((6, 50), g, device=device)
    labels = make_labels((6,), 50, g, device)

    def f(x, y, lab):
        loss, st = flashkd.distill_loss(x, y, divergence="tvd", labels=lab, hard_weight=0.5, return_stats=True)
        return loss, st["teacher_entropy"]

    with torch.no_grad():
        eager, compiled = f(s, t, labels), torch.compile(f, fullgraph=True)(s, t, labels)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["mean_labels", "none_stats"])
def test_torch_compile(case, device):
    """torch.compile(fullgraph=True) of a function calling distill_loss: forward
    and backward equal to eager."""
    torch._dynamo.reset()
    g = gen("compile", case)
    lead, V = (2, 5), 64
    s, t = logits((*lead, V), g, device=device), logits((*lead, V), g, device=device)
    labels = make_labels(lead, V, g, device)
    if case == "mean_labels":
        def f(x, y, lab):
            return flashkd.distill_loss(x, y, divergence="jsd", beta=0.3, labels=lab, hard_weight=0.5,
                                        temperature=2.0) * 2.0
        cot = None
    else:
        def f(x, y, lab):
            loss, st = flashkd.distill_loss(x, y, divergence="srkl", alpha=0.2, labels=lab, reduction="none",
                                            return_stats=True)
            return loss, st["divergence"], st["student_logprob"], st["agree"]
        cot = default_cot(lead, g, device)
    compiled = torch.compile(f, fullgraph=True)
    outs = []
    for fn in (f, compiled):
        x = s.clone().requires_grad_(True)
        out = fn(x, t, labels)
        first = out if cot is None else out[0]
        first.backward(cot)
        outs.append((out if isinstance(out, tuple) else (out,), x.grad))
    (o_eager, g_eager), (o_comp, g_comp) = outs
    for a, b in zip(o_eager, o_comp):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(g_comp, g_eager, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("div", ["fkl", "taid"])
def test_module_equals_functional(div, device):
    g = gen("module", div)
    lead, V = (3, 4), 45
    s, t = logits((*lead, V), g, device=device), logits((*lead, V), g, device=device)
    labels, weights = make_labels(lead, V, g, device), make_weights(lead, g, device)
    opts = dict(divergence=div, temperature=2.0, hard_weight=0.3, reduction="sum", **DIV_KW[div])
    per_call = {}
    if div == "taid":  # lambda changes during training: given per call
        per_call = {"taid_lambda": opts.pop("taid_lambda")}
    mod = flashkd.nn.DistillLoss(**opts)
    assert "temperature=2.0" in repr(mod)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    la = mod(a, t, labels, weights, **per_call)
    lb = flashkd.distill_loss(b, t, labels=labels, weights=weights, **opts, **per_call)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)
    if div == "taid":
        with pytest.raises(ValueError, match="taid_lambda"):
            mod(s, t, labels)
    with pytest.raises(TypeError, match="labels"):
        flashkd.nn.DistillLoss(labels=labels)
    with pytest.raises(TypeError, match="temprature"):
        flashkd.nn.DistillLoss(temprature=2.0)
    with pytest.raises(ValueError, match="divergence"):
        flashkd.nn.DistillLoss(divergence="kl")


MODULE_BAD_OPTIONS = [
    ("DistillLoss", dict(temperature=0.0), "temperature"),
    ("DistillLoss", dict(divergence="jsd", beta=2.0), "beta"),
    ("DistillLoss", dict(num_items=-1.0), "num_items"),
    ("DistillLoss", dict(soft_weight=math.inf), "soft_weight"),
    ("LinearDistillLoss", dict(divergence="skl", alpha=1.0), "alpha"),
    ("LinearDistillLoss", dict(softcap=-1.0), "softcap"),
    ("LinearDistillLoss", dict(chunk_budget_bytes=0), "chunk_budget_bytes"),
    ("LinearCrossEntropyLoss", dict(label_smoothing=2.0), "label_smoothing"),
    ("LinearCrossEntropyLoss", dict(z_loss=-0.1), "z_loss"),
]


@pytest.mark.parametrize("module,options,name", MODULE_BAD_OPTIONS, ids=[f"{m}-{n}" for m, _, n in MODULE_BAD_OPTIONS])
def test_module_checks_options_when_constructed(module, options, name):
    """A bad option fails where it is set (the module runs its op once on one
    token), naming the module and the argument, not at the first batch."""
    with pytest.raises(ValueError, match=f"{module}: .*{name}"):
        getattr(flashkd.nn, module)(**options)
    with torch.device("meta"), pytest.raises(ValueError, match=f"{module}: .*{name}"):
        getattr(flashkd.nn, module)(**options)  # built under a meta-device context (large-model init)
    # taid_lambda may come per call: not required at construction
    getattr(flashkd.nn, module)(**({} if module == "LinearCrossEntropyLoss" else dict(divergence="taid")))


# ----------------------------------------------------------------------------
# Bad inputs: a clear exception that names the argument
# ----------------------------------------------------------------------------

def _bad_cases(device):
    g = gen("bad")
    s = logits((2, 3, 10), g, device=device)
    t = logits((2, 3, 10), g, device=device)
    lab = make_labels((2, 3), 10, g, device)
    s_shared = logits((2, 3, 10), g, device=device).requires_grad_(True)
    cases = {
        "teacher_shape": (ValueError, "teacher_logits", dict(teacher_logits=t[..., :9])),
        "teacher_lead_shape": (ValueError, "teacher_logits", dict(teacher_logits=t[:1])),
        "int_student": (TypeError, "student_logits", dict(student_logits=s.long())),
        "float64_student": (TypeError, "student_logits", dict(student_logits=s.double())),
        "int_teacher": (TypeError, "teacher_logits", dict(teacher_logits=t.int())),
        "not_a_tensor": (TypeError, "student_logits", dict(student_logits=s.tolist())),
        "jsd_beta_0": (ValueError, r"beta.*fkl.*rkl", dict(divergence="jsd", beta=0.0)),
        "jsd_beta_1": (ValueError, r"beta.*fkl.*rkl", dict(divergence="jsd", beta=1.0)),
        "jsd_beta_neg": (ValueError, r"beta.*fkl.*rkl", dict(divergence="jsd", beta=-0.5)),
        "skl_alpha_1": (ValueError, "alpha", dict(divergence="skl", alpha=1.0)),
        "srkl_alpha_neg": (ValueError, "alpha", dict(divergence="srkl", alpha=-0.1)),
        "temperature_0": (ValueError, "temperature", dict(temperature=0.0)),
        "temperature_neg": (ValueError, "temperature", dict(temperature=-1.0)),
        "temperature_nan": (ValueError, "temperature", dict(temperature=float("nan"))),
        "temperature_inf": (ValueError, "temperature", dict(temperature=float("inf"))),
        "taid_no_lambda": (ValueError, "taid_lambda", dict(divergence="taid")),
        "taid_lambda_range": (ValueError, "taid_lambda", dict(divergence="taid", taid_lambda=1.5)),
        "unknown_divergence": (ValueError, "divergence", dict(divergence="kl")),
        "unknown_reduction": (ValueError, "reduction", dict(reduction="avg")),
        "labels_shape": (ValueError, "labels", dict(labels=lab[:, :2])),
        "labels_shape_full": (ValueError, "labels", dict(labels=lab[..., None].expand(2, 3, 10).contiguous())),
        "labels_too_big": (ValueError, "labels", dict(labels=torch.full_like(lab, 10))),
        "labels_negative": (ValueError, "labels", dict(labels=torch.full_like(lab, -3))),
        "labels_beyond_vocab_size": (ValueError, "labels", dict(labels=torch.full_like(lab, 8), vocab_size=8)),
        "float_labels": (TypeError, "labels", dict(labels=lab.float())),
        "hard_weight_no_labels": (ValueError, r"hard_weight.*labels", dict(hard_weight=0.5)),
        "negative_hard_weight": (ValueError, "hard_weight", dict(hard_weight=-1.0, labels=lab)),
        # the value is the error, not the missing labels that a positive weight would need
        "negative_hard_weight_no_labels": (ValueError, "hard_weight must be finite and >= 0", dict(hard_weight=-1.0)),
        "labels_not_tensor": (TypeError, "labels must be a torch.Tensor", dict(labels=lab.tolist(), hard_weight=0.5)),
        "weights_not_tensor": (TypeError, "weights must be a torch.Tensor", dict(weights=[[1.0] * 3] * 2)),
        "ignore_index_float": (TypeError, "ignore_index must be an int", dict(ignore_index=1.5)),
        "vocab_size_float": (TypeError, "vocab_size must be an int", dict(vocab_size=8.0)),
        "negative_soft_weight": (ValueError, "soft_weight", dict(soft_weight=-1.0)),
        "inf_soft_weight": (ValueError, "soft_weight must be finite", dict(soft_weight=math.inf)),
        "nan_hard_weight": (ValueError, "hard_weight must be finite", dict(hard_weight=math.nan, labels=lab)),
        "negative_weights": (ValueError, "weights", dict(weights=-torch.ones(2, 3, device=device))),
        "weights_shape": (ValueError, "weights", dict(weights=torch.ones(3, 2, device=device))),
        "int_weights": (TypeError, "weights", dict(weights=torch.ones(2, 3, dtype=torch.long, device=device))),
        # a meta tensor beside real ones reaches the fake kernel, which must not answer with empty memory
        "meta_teacher": (ValueError, "teacher_logits must be on the device of student_logits",
                         dict(teacher_logits=t.to("meta"))),
        "meta_labels": (ValueError, "labels must be on the device of student_logits",
                        dict(labels=lab.to("meta"), hard_weight=0.5)),
        "vocab_size_0": (ValueError, "vocab_size", dict(vocab_size=0)),
        "vocab_size_big": (ValueError, "vocab_size", dict(vocab_size=11)),
        "num_items_0": (ValueError, "num_items", dict(num_items=0.0)),
        # inplace_backward writes into the student: strides the kernel cannot describe are refused
        "inplace_undescribable": (ValueError, "student_logits", dict(
            student_logits=logits((2, 2, 2, 2, 2, 10), g, device=device).requires_grad_(True)
            .permute(4, 3, 2, 1, 0, 5),
            teacher_logits=logits((2, 2, 2, 2, 2, 10), g, device=device), inplace_backward=True)),
        # ... and so are rows that share memory, which would be read after being overwritten
        "inplace_expanded": (ValueError, "student_logits", dict(
            student_logits=logits((1, 1, 10), g, device=device).requires_grad_(True).expand(2, 3, 10),
            inplace_backward=True)),
        "inplace_teacher_is_student": (ValueError, "student_logits", dict(
            student_logits=s_shared, teacher_logits=s_shared.detach(), inplace_backward=True)),
    }
    return s, t, cases


BAD = list(_bad_cases("cpu")[2])


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(case, device):
    s, t, cases = _bad_cases(device)
    exc, pattern, kw = cases[case]
    args = {"student_logits": s, "teacher_logits": t, **kw}
    student, teacher = args.pop("student_logits"), args.pop("teacher_logits")
    with pytest.raises(exc, match=pattern):
        flashkd.distill_loss(student, teacher, **args)


@pytest.mark.cuda
def test_labels_on_other_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = gen("device_mismatch")
    s, t = logits((2, 10), g, device="cuda"), logits((2, 10), g, device="cuda")
    with pytest.raises(ValueError, match="labels"):
        flashkd.distill_loss(s, t, labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="weights"):
        flashkd.distill_loss(s, t, weights=torch.ones(2))
    with pytest.raises(ValueError, match="teacher_logits"):
        flashkd.distill_loss(s, t.cpu())


# ----------------------------------------------------------------------------
# TAIDSchedule
# ----------------------------------------------------------------------------

def test_taid_schedule_linear():
    sched = flashkd.TAIDSchedule(total_steps=10, lambda_start=0.2, lambda_end=0.9)
    assert sched.value == 0.2
    values = [sched.step() for _ in range(14)]
    for n, v in enumerate(values, start=1):
        assert v == pytest.approx(0.2 + 0.7 * min(n, 10) / 10, abs=1e-12)
    assert sched.value == pytest.approx(0.9)
    state = sched.state_dict()
    other = flashkd.TAIDSchedule(total_steps=10, lambda_start=0.2, lambda_end=0.9)
    other.load_state_dict(state)
    assert other.steps == 14 and other.value == sched.value


def test_taid_schedule_adaptive():
    """Adaptive lambda stays within [linear schedule, lambda_end] and rises
    faster while the loss falls than while it rises."""
    def run(losses):
        sched = flashkd.TAIDSchedule(total_steps=400, lambda_start=0.1, lambda_end=0.8, mode="adaptive",
                                     rate=0.02, momentum=0.5)
        vals = []
        for n, loss in enumerate(losses, start=1):
            v = sched.step(loss)
            assert sched.linear_value(n) - 1e-12 <= v <= 0.8 + 1e-12
            vals.append(v)
        return vals

    steps = 60
    falling = run([10.0 * 0.9 ** n for n in range(steps)])
    rising = run([1.0 * 1.1 ** n for n in range(steps)])
    assert all(b > a for a, b in zip(falling, falling[1:]) if a < 0.8)
    assert all(f > r for f, r in zip(falling[5:], rising[5:]))
    assert falling[-1] > flashkd.TAIDSchedule(total_steps=400, lambda_start=0.1, lambda_end=0.8).linear_value(steps)
    long = run([1.0 / (n + 1) for n in range(2000)])
    assert long[-1] == pytest.approx(0.8)  # reaches lambda_end and stays there
    with pytest.raises(ValueError, match="loss"):
        flashkd.TAIDSchedule(total_steps=5, mode="adaptive").step()


def test_taid_schedule_adaptive_extreme_losses():
    """A loss rising from near 0 makes the relative change, and the momentum,
    huge and negative: lambda keeps to the linear floor (math.exp overflowed
    here before). A non-finite loss is an error, not a momentum."""
    sched = flashkd.TAIDSchedule(total_steps=10, mode="adaptive", momentum=0.5)
    sched.step(1e-12)
    assert sched.step(5.0) == pytest.approx(sched.linear_value(2))
    state = sched.state_dict()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite loss"):
            sched.step(bad)
    assert sched.state_dict() == state  # a refused step changes nothing


@pytest.mark.parametrize("kwargs", [
    dict(total_steps=0), dict(total_steps=2.5), dict(total_steps=10, lambda_start=0.9, lambda_end=0.5),
    dict(total_steps=10, lambda_end=1.5), dict(total_steps=10, lambda_start=-0.1), dict(total_steps=10, mode="cosine"),
    dict(total_steps=10, rate=-1.0), dict(total_steps=10, momentum=1.0),
], ids=["steps0", "steps_float", "start_gt_end", "end_gt_1", "start_neg", "mode", "rate", "momentum"])
def test_taid_schedule_bad_args(kwargs):
    with pytest.raises(ValueError):
        flashkd.TAIDSchedule(**kwargs)


def test_taid_schedule_drives_the_loss(device):
    """The schedule's lambda is a valid taid_lambda, and lambda = 1 makes TAID
    the forward KL (r = p)."""
    g = gen("taid_sched")
    s, t = logits((4, 33), g, device=device), logits((4, 33), g, device=device)
    sched = flashkd.TAIDSchedule(total_steps=3, lambda_start=0.0, lambda_end=1.0)
    losses = []
    for _ in range(4):
        losses.append(flashkd.distill_loss(s, t, divergence="taid", taid_lambda=sched.value))
        sched.step()
    assert losses[0].abs() <= 1e-6  # lambda = 0: r = q, KL(q || q) = 0
    torch.testing.assert_close(losses[-1], flashkd.distill_loss(s, t, divergence="fkl"), rtol=1e-5, atol=1e-6)
    assert losses[1] < losses[2] < losses[3]
