"""Memory of the fused linear losses' op: the workspace beyond the returned gradients
stays within chunk_budget_bytes plus a small constant, whatever the vocabulary, in forward,
in a training step and under no_grad; and float32_weight_grad=False, which sums d weight
over the chunks in its own dtype (its values, and the float32 sum's workspace gone)."""
import pytest
import torch

import flashkd
from flashkd import reference as R

import memory
from linear_tolerance import UNIT
from linear_ce_cases import DTYPES, float32_head_budget, make_inputs, op_args, rows_budget


def test_memory_helper(device):
    """tests/memory.py reconstructs a known peak (CPU); on CUDA it reads the allocator."""
    if device == "cpu":
        memory.self_test()
    m = memory.measure(lambda: torch.empty(1 << 20, dtype=torch.uint8, device=device), device)
    assert m.peak >= 1 << 20 and m.net >= 1 << 20


WORKSPACE_SHAPES = [(64, 4000, 32), (64, 32000, 32), (300, 4000, 16), (5, 32000, 64)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("N,V,D", WORKSPACE_SHAPES)
def test_workspace_forward(N, V, D, reduction, device):
    """The op call (the loss and its gradients are computed during forward) needs at most
    chunk_budget_bytes + a small constant beyond the gradients it returns, whatever V."""
    budget = 256 << 10  # 256 KiB; the full logits are 1-75 MiB
    inp = make_inputs(device, lead=(N,), V=V, D=D, ignore=0.1)
    args = op_args(dict(inp, weights=None), bias=False, reduction=reduction, grad_mask=3, budget=budget)
    torch.ops.flashkd.linear_loss(*args)  # warm-up: one-time allocations (cuBLAS workspace) are not workspace
    m = memory.measure(lambda: torch.ops.flashkd.linear_loss(*args), device)
    loss, dh, dw = m.result[:3]
    returned = memory.nbytes(m.result)
    assert dh.shape == inp["h"].shape and dw.shape == inp["W"].shape
    workspace = m.peak - returned
    assert workspace <= budget + memory.glue_allowance(N), \
        f"N={N} V={V} D={D}: workspace {workspace} B > budget {budget} B + {memory.glue_allowance(N)} B"


# A training step holds the gradients once: backward scales the ones made in
# forward in place (no zero-filled grads for unused outputs, no out-of-place
# products), and reduction="none" makes them only in backward.
@pytest.mark.parametrize("with_lse", [False, True], ids=["loss", "loss_and_lse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("N,V,D", [(64, 4000, 32), (64, 32000, 32)])
def test_workspace_training_step(N, V, D, reduction, with_lse, device):
    """A whole training step, loss = linear_cross_entropy(...); loss.backward(): peak memory
    beyond the final .grad tensors stays within chunk_budget_bytes + a small constant
    (DESIGN.md section 3: peak extra memory = dweight + dhidden + the budget), also when
    the returned LSE is differentiated (its backward recomputes the logits in tiles;
    before 2026-12-07 it held two more weight-sized tensors, 33x the budget at V=32000)."""
    budget = 256 << 10
    inp = make_inputs(device, lead=(N,), V=V, D=D, ignore=0.1)
    h, W = inp["h"].requires_grad_(), inp["W"].requires_grad_()

    def step():
        out = flashkd.linear_cross_entropy(h, W, inp["y"], chunk_budget_bytes=budget, reduction=reduction,
                                           return_lse=with_lse)
        (out[0].sum() + out[1].sum() if with_lse else out.sum()).backward()
        return None

    step()  # warm-up
    h.grad = W.grad = None
    m = memory.measure(step, device)
    workspace = m.peak - memory.nbytes([h.grad, W.grad])
    assert workspace <= budget + memory.glue_allowance(N), \
        f"N={N} V={V} D={D}: workspace {workspace} B > budget {budget} B + {memory.glue_allowance(N)} B " \
        f"(gradients {memory.nbytes([h.grad, W.grad])} B)"


# float32_weight_grad=False: d(weight) summed over the chunks in its own dtype.


def _heads(fn, inp, **kw):
    """Loss, d hidden and d weight of linear_cross_entropy or linear_distill_loss (the
    student against a teacher head made from the same inputs)."""
    h, W = inp["h"].detach().clone().requires_grad_(), inp["W"].detach().clone().requires_grad_()
    if fn is flashkd.linear_cross_entropy:
        loss = fn(h, W, inp["y"], **kw)
    else:
        loss = fn(h, W, h.detach().flip(-1), W.detach().flip(0), labels=inp["y"], hard_weight=0.5,
                  divergence="jsd", **kw)
    loss.backward()
    return loss.detach(), h.grad, W.grad


@pytest.mark.parametrize("fn", [flashkd.linear_cross_entropy, flashkd.linear_distill_loss],
                         ids=["cross_entropy", "distill"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_weight_grad_summed_in_its_dtype(fn, dtype, device, cpu_gemm_mode):
    """The loss and d hidden do not depend on how d weight is summed (the same bits);
    in float32 neither does d weight. In 16 bits, d weight differs from the float32 sum
    by at most one rounding per chunk: |err| <= chunks * u * sum_t |G_tj| |h_td| (+ the
    last rounding), G the oracle's d loss / d logits. Four chunks, so that a chunk summed
    twice or not at all (a quarter of that sum) would fail."""
    dt = DTYPES[dtype]
    if dt == torch.float32 and cpu_gemm_mode == "float32":
        pytest.skip("a float32 head has one way to run")
    N, V, D = 40, 300, 24
    inp = make_inputs(device, lead=(N,), V=V, D=D, dtype=dt, ignore=0.2)
    heads = 1 if fn is flashkd.linear_cross_entropy else 2
    if cpu_gemm_mode == "float32" and device == "cpu":
        budget = float32_head_budget(10, V, D, heads)
    else:
        budget = rows_budget(V, 10, dt.itemsize * heads)
    loss32, dh32, dw32 = _heads(fn, inp, chunk_budget_bytes=budget)
    loss, dh, dw = _heads(fn, inp, chunk_budget_bytes=budget, float32_weight_grad=False)
    assert dw.dtype == dt
    assert torch.equal(loss, loss32) and torch.equal(dh, dh32)
    if dt == torch.float32:
        assert torch.equal(dw, dw32)
        return
    z = R.head_logits(inp["h"], inp["W"], None, torch.float64).detach().requires_grad_()
    if fn is flashkd.linear_cross_entropy:
        R.cross_entropy(z, inp["y"]).backward()
    else:
        teacher = R.head_logits(inp["h"].flip(-1), inp["W"].flip(0), None, torch.float64)
        R.distill_loss(z, teacher, labels=inp["y"], hard_weight=0.5, divergence="jsd").backward()
    terms = z.grad.abs().T @ inp["h"].double().abs()
    chunks = -(-N // 10)
    u = UNIT[dt]
    err = (dw.double() - dw32.double()).abs()
    bound = chunks * u * terms + u * dw32.double().abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    assert not torch.equal(dw, dw32)  # the option did change the summation


@pytest.mark.parametrize("float32_weight_grad", [True, False])
def test_workspace_of_the_weight_grad_sum(float32_weight_grad, device, cpu_gemm_mode):
    """bf16: the float32 sum of d weight is workspace the size of two bf16 gradients;
    summed in bf16 it is gone, and what is left is the budget and the GEMMs' own
    scratch (ATen's CPU bf16 GEMMs pack or widen operands: 1-4 MB at these sizes; heads
    run in float32 on the CPU have none that the allocator sees, so there the budget
    holds to the glue's allowance)."""
    budget = 256 << 10
    N, V, D = 64, 32000, 64
    inp = make_inputs(device, lead=(N,), V=V, D=D, dtype=torch.bfloat16, ignore=0.1)
    args = op_args(dict(inp, weights=None), bias=False, reduction="mean", grad_mask=3, budget=budget,
                   float32_weight_grad=float32_weight_grad)
    torch.ops.flashkd.linear_loss(*args)  # warm-up
    m = memory.measure(lambda: torch.ops.flashkd.linear_loss(*args), device)
    workspace = m.peak - memory.nbytes(m.result)
    float32_sum = V * D * 4
    if float32_weight_grad:
        assert workspace >= float32_sum, f"workspace {workspace} B < the float32 sum's {float32_sum} B"
    else:
        assert workspace < float32_sum / 2, f"workspace {workspace} B: a float32 sum of {float32_sum} B is left"
        if cpu_gemm_mode == "float32" and device == "cpu":
            assert workspace <= budget + memory.glue_allowance(N), f"workspace {workspace} B > budget {budget} B"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradients_without_autograd(mode, device):
    """Under torch.no_grad() / inference_mode the op makes no gradients (one GEMM per
    chunk, not three), although the parameters require grad: the call's whole peak stays
    within the budget (d weight alone would be 8 MiB), and the loss is the same."""
    budget = 256 << 10
    inp = make_inputs(device, lead=(64,), V=32000, D=64, ignore=0.1)
    h, W = inp["h"].requires_grad_(), inp["W"].requires_grad_()
    with_grad = flashkd.linear_cross_entropy(h, W, inp["y"], chunk_budget_bytes=budget)

    def call():
        with getattr(torch, mode)():
            return flashkd.linear_cross_entropy(h, W, inp["y"], chunk_budget_bytes=budget)

    call()  # warm-up
    m = memory.measure(call, device)
    assert not m.result.requires_grad
    assert torch.equal(m.result, with_grad.detach())
    assert m.peak <= budget + memory.glue_allowance(64), f"peak {m.peak} B > budget {budget} B + allowance"


def test_workspace_independent_of_vocab(device):
    """Same budget, 8x the vocabulary: the workspace beyond the gradients stays within the
    same bound (the logits are never materialized; only the gradient grows with V)."""
    budget = 256 << 10
    spaces = {}
    for V in (4000, 32000):
        inp = make_inputs(device, lead=(128,), V=V, D=32)
        args = op_args(dict(inp, weights=None), bias=False, reduction="mean", grad_mask=3, budget=budget)
        torch.ops.flashkd.linear_loss(*args)  # warm-up
        m = memory.measure(lambda: torch.ops.flashkd.linear_loss(*args), device)
        spaces[V] = m.peak - memory.nbytes(m.result)
        assert spaces[V] <= budget + memory.glue_allowance(128), spaces
    # 32000 x 128 float32 logits would be 16 MiB, 4000 x 128 2 MiB: neither shows up.
    assert abs(spaces[32000] - spaces[4000]) <= memory.glue_allowance(128), spaces
