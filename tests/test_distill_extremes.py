"""flashkd.distill_loss on extreme inputs: +-1e4 logits, large offsets,
-inf (masked) classes, NaN and inf rows, identical student and teacher."""
import math

import pytest
import torch

import flashkd
from flashkd import reference as R

from checks import DIV_KW
from distill_cases import (  # noqa: F401  (fixture)
    DIVS, DTYPES, EPS32, check_run, device, gen, logits, make_labels, run_all,
)


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
