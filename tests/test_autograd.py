"""Autograd beyond one plain backward: gradients taken with create_graph=True,
and the fused ops inside torch.utils.checkpoint.

The fused ops' backwards are kernels without derivatives of their own: under
create_graph=True they must return the same first-order gradients, and a second
differentiation through them must raise, never return a gradient that silently
lacks their second-order terms. QuantLinear's straight-through backward is
made of torch ops, so its second derivative exists and must be the STE's.
"""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import flashkd
from flashkd import prune, tome
from flashkd.quant import QuantLinear, dequantized_weight


def _cases(device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    x, scores = rand(2, 9, 16), rand(2, 9)
    merge, unmerge = tome.bipartite_soft_matching(x, 3)
    student, teacher, head = rand(3, 5), rand(3, 5), rand(7, 5)
    targets = torch.tensor([1, 2, 3], device=device)
    ce = flashkd.linear_cross_entropy
    # name: (input to differentiate, a scalar function of it)
    return {
        "tome_merge": (x, lambda v: (merge(v) ** 2).sum()),
        "tome_merge_amax": (x, lambda v: (merge(v, mode="amax") ** 2).sum()),
        "tome_merge_wavg": (x, lambda v: (tome.merge_wavg(merge, v)[0] ** 2).sum()),
        "tome_unmerge": (x, lambda v: (unmerge(v[:, :6] * 1.5) ** 2).sum()),
        "topk_tokens": (x, lambda v: (prune.topk_tokens(v, scores, 4, fuse_remainder=True)[0] ** 2).sum()),
        "distill_loss": (student, lambda v: flashkd.distill_loss(v * 2, teacher, divergence="jsd")),
        "distill_loss_inplace": (student, lambda v: flashkd.distill_loss(v * 2, teacher, inplace_backward=True)),
        "linear_cross_entropy": (student, lambda v: ce(v * 2, head, targets)),
        "linear_cross_entropy_lse": (student, lambda v: ce(v, head, targets, return_lse=True)[1].sum()),
        "linear_cross_entropy_none": (student, lambda v: ce(v, head, targets, reduction="none").sum()),
        "linear_distill_loss": (student, lambda v: flashkd.linear_distill_loss(v, head, teacher, head)),
    }


@pytest.mark.parametrize("case", list(_cases("cpu")))
@pytest.mark.parametrize("second", ["autograd_grad", "backward"])
def test_second_derivative_raises(case, second, device):
    base, f = _cases(device)[case]
    v = base.clone().requires_grad_()
    (plain,) = torch.autograd.grad(f(v), v)
    (graphed,) = torch.autograd.grad(f(v), v, create_graph=True)
    torch.testing.assert_close(graphed.detach(), plain, rtol=0, atol=0)
    assert graphed.requires_grad
    graphed.mul_(1.0)  # a gradient may be modified in place, as gradient clipping does
    with pytest.raises(RuntimeError, match=r"is differentiable once"):
        if second == "autograd_grad":  # reaches only the nodes on a path to v
            torch.autograd.grad((graphed * graphed).sum(), v)
        else:
            (graphed * graphed).sum().backward()


@pytest.mark.parametrize("scheme", ["w1.58a8", "w8a8", "w4a16"])
def test_quant_linear_second_derivative_is_the_ste(scheme, device):
    """y = Q(x) Wq^T with Q the identity for gradients: d/dx sum(d sum(y^2)/dx)
    = 2 (1 Wq^T) Wq, Wq the dequantized weight."""
    torch.manual_seed(0)
    layer = QuantLinear(64, 24, bias=False, scheme=scheme, group_size=32).to(device)
    x = torch.randn(5, 64, device=device, requires_grad=True)
    (g,) = torch.autograd.grad((layer(x) ** 2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    wq = dequantized_weight(layer.weight.detach(), scheme, group_size=32).double()
    expected = 2 * (torch.ones(5, 64, dtype=torch.float64, device=device) @ wq.T) @ wq
    torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(_cases("cpu")))
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_equals_plain(case, reentrant, device):
    """Recomputed in backward, each op gives the bits of the plain call (its
    gradients are made in forward, so the recomputation must make them again)."""
    base, f = _cases(device)[case]
    v = base.clone().requires_grad_()
    (plain,) = torch.autograd.grad(f(v), v)
    checkpoint(f, v, use_reentrant=reentrant).backward()  # (reentrant checkpoints refuse autograd.grad)
    torch.testing.assert_close(v.grad, plain, rtol=0, atol=0)
