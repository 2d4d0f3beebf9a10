"""flashkd.linear_distill_loss at special values: a teacher equal to the student,
all tokens ignored, length-1 sequences with shift, NaN inputs (which poison only their
tokens), no gradient to the teacher, and the hard-label-only loss equal to
linear_cross_entropy."""
import math

import pytest
import torch

import flashkd

from checks import DIV_KW
from linear_distill_cases import DIVS, make_inputs, rows_budget, run


@pytest.mark.parametrize("div", DIVS)
def test_identical_teacher(div, device):
    """Teacher = student (same hidden, same weight, same bias): zero loss, zero gradient."""
    inp = make_inputs(device, sbias=True, Dt=24, Vt=37)
    inp.update(th=inp["h"], tW=inp["W"], tb=inp["b"])
    loss, _, grads = run(flashkd.linear_distill_loss, inp, divergence=div, **DIV_KW[div], temperature=1.5,
                         chunk_budget_bytes=rows_budget(inp, 3.5))
    assert abs(loss.item()) <= 1e-6, loss
    for k, g in grads.items():
        assert g.abs().max().item() <= 1e-6, f"grad {k}: {g.abs().max().item()}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["weights", "logits"])
@pytest.mark.parametrize("div", ["fkl", "jsd", "tvd", "taid"])
def test_all_ignored(div, teacher, reduction, device):
    """Every label ignored: loss 0, gradients exactly 0, no NaN."""
    inp = make_inputs(device, teacher=teacher, sbias=True, weights=True)
    inp["y"] = torch.full_like(inp["y"], -100)
    loss, _, grads = run(flashkd.linear_distill_loss, inp, divergence=div, **DIV_KW[div], reduction=reduction,
                         hard_weight=0.5, chunk_budget_bytes=rows_budget(inp, 3.5))
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    for k, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), f"grad {k} not exactly 0"


def test_shift_length_one(device):
    inp = make_inputs(device, lead=(3, 1), sbias=True)
    loss, _, grads = run(flashkd.linear_distill_loss, inp, divergence="fkl", shift=True, hard_weight=1.0)
    assert torch.equal(loss, torch.zeros_like(loss)) and all(torch.equal(g, torch.zeros_like(g))
                                                           for g in grads.values())


def test_teacher_gets_no_gradient(device):
    inp = make_inputs(device, sbias=True, tbias=True, ignore=0.2)
    th, tW, tb = (inp[k].clone().requires_grad_() for k in ("th", "tW", "tb"))
    h = inp["h"].clone().requires_grad_()
    loss = flashkd.linear_distill_loss(h, inp["W"], th, tW, teacher_bias=tb, labels=inp["y"], divergence="jsd")
    loss.backward()
    assert th.grad is None and tW.grad is None and tb.grad is None
    assert h.grad is not None and torch.isfinite(h.grad).all()
    tl = inp["th"] @ inp["tW"].T
    tl.requires_grad_()
    flashkd.linear_distill_loss(inp["h"].clone().requires_grad_(), inp["W"], teacher_logits=tl).backward()
    assert tl.grad is None


@pytest.mark.parametrize("where", ["teacher_token", "ignored_teacher_token", "student_token", "teacher_vocab_entry"])
@pytest.mark.parametrize("teacher", ["weights", "logits"])
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_nan_poisons_its_tokens(div, teacher, where, device):
    """A NaN reaching a counted token's logits makes that token's loss and
    hidden-gradient row NaN, and so the weight and bias gradients, as in plain
    torch; other tokens keep the bits of the clean call. A NaN in an ignored
    token's teacher changes nothing. A NaN teacher weight or logit column
    reaches every token."""
    inp = make_inputs(device, teacher=teacher, sbias=True, lead=(6,))
    inp["y"][2] = -100
    kw = dict(divergence=div, **DIV_KW[div], reduction="none", hard_weight=0.3,
              chunk_budget_bytes=rows_budget(inp, 2.5))
    clean = run(flashkd.linear_distill_loss, inp, **kw)
    tkey = "th" if teacher == "weights" else "tl"
    token = 2 if where == "ignored_teacher_token" else 4
    poisoned = torch.zeros(6, dtype=torch.bool)
    if where == "teacher_vocab_entry":  # the teacher's logit column 5, of every token
        if teacher == "weights":
            inp["tW"][5, 3] = math.nan
        else:
            inp["tl"][:, 5] = math.nan
        poisoned[:] = True
        poisoned[2] = False  # ignored
    else:
        inp["h" if where == "student_token" else tkey][token, 3] = math.nan
        poisoned[token] = where != "ignored_teacher_token"
    loss, _, grads = run(flashkd.linear_distill_loss, inp, **kw)
    loss = loss.cpu()
    assert torch.equal(loss.isnan(), poisoned), loss
    grad_h = grads["h"].cpu()
    assert grad_h[poisoned].isnan().all() and not grad_h[~poisoned].isnan().any()
    assert torch.equal(loss[~poisoned], clean[0].cpu()[~poisoned])
    assert torch.equal(grad_h[~poisoned], clean[2]["h"].cpu()[~poisoned])
    for k in ("W", "b"):
        assert grads[k].isnan().all() if poisoned.any() else torch.equal(grads[k], clean[2][k]), k


def test_hard_only_equals_linear_cross_entropy(device):
    """soft_weight 0, hard_weight 1: the cross-entropy of linear_cross_entropy."""
    inp = make_inputs(device, sbias=True, ignore=0.3)
    budget = rows_budget(inp, 3.5)
    a = run(flashkd.linear_distill_loss, inp, soft_weight=0.0, hard_weight=1.0, chunk_budget_bytes=budget)
    leaves = [inp[k].clone().requires_grad_() for k in ("h", "W", "b")]
    ce = flashkd.linear_cross_entropy(leaves[0], leaves[1], inp["y"], leaves[2], chunk_budget_bytes=budget)
    (ce * 1.75).backward()
    torch.testing.assert_close(a[0], ce.detach().double(), rtol=1e-6, atol=1e-6)
    for k, t in zip(("h", "W", "b"), leaves):
        torch.testing.assert_close(a[2][k], t.grad.double(), rtol=1e-5, atol=1e-7)
