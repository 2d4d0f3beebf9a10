"""flashkd.linear_cross_entropy (LM head + cross-entropy that never materializes the
[tokens x vocab] logits) and the op behind it, torch.ops.flashkd.linear_loss: values and
gradients against the float64 oracle for every option, random option combinations, finite
differences, opcheck, torch.compile, bad inputs. The tolerance model: tests/linear_ce_cases.py."""
from __future__ import annotations

import math
import random

import pytest
import torch

import flashkd
from flashkd import reference as R

from checks import (CPU_16BIT_GEMMS, RANDOM_CASES, assert_compile_matches_eager, cpu_16bit_gemm, directional_check,
                    random_lead, results_per_cpu_isa)
from linear_tolerance import UNIT
from linear_ce_cases import DTYPES, check_against, check_case, make_inputs, op_args, plain_ce, rows_budget, run


# ----------------------------------------------------------------------------- values and gradients


OPTION_CASES = {
    "default": dict(),
    "ignore": dict(ignore=0.3),
    "ignore_index_5": dict(ignore=0.3, ignore_index=5),
    "softcap": dict(softcap=4.0, scale=8.0),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=0.05),
    "weights": dict(weights=True, ignore=0.2),
    "bias": dict(bias=True),
    "sum": dict(reduction="sum", ignore=0.2),
    "none": dict(reduction="none", ignore=0.2),
    "batchmean": dict(reduction="batchmean", ignore=0.2),
    "num_items": dict(num_items=11.0, ignore=0.2),
    "shift": dict(shift=True),
    "shift_ignore_none": dict(shift=True, ignore=0.3, reduction="none"),
    "return_lse": dict(return_lse=True),
    "return_lse_none_softcap_bias": dict(return_lse=True, reduction="none", softcap=5.0, scale=6.0, bias=True),
    "return_lse_shift_ignore": dict(return_lse=True, shift=True, ignore=0.3, weights=True),
    "all_mean": dict(bias=True, ignore=0.25, softcap=6.0, scale=5.0, label_smoothing=0.15, z_loss=0.02, weights=True),
    "all_none": dict(bias=True, ignore=0.25, softcap=6.0, scale=5.0, label_smoothing=0.15, z_loss=0.02,
                     weights=True, reduction="none"),
    "all_sum_shift": dict(bias=True, ignore=0.25, label_smoothing=0.05, z_loss=0.01, reduction="sum", shift=True),
    "all_num_items_lse": dict(bias=True, ignore=0.25, softcap=6.0, label_smoothing=0.1, z_loss=0.02, weights=True,
                              num_items=5.0, return_lse=True),
}


@pytest.mark.parametrize("chunks", ["one_chunk", "many_chunks"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_oracle(case, chunks, device):
    # 14 tokens; 3.5 rows of budget -> chunks of 3 rows, the last one partial.
    check_case(device, budget_rows=3.5 if chunks == "many_chunks" else None, **OPTION_CASES[case])


SHAPES = {
    "N1": dict(lead=(1,), V=37, D=24),
    "N1_no_lead": dict(lead=(), V=37, D=24),
    "V1": dict(lead=(5,), V=1, D=8),
    "V3": dict(lead=(5,), V=3, D=8),
    "N_lt_chunk": dict(lead=(2,), V=37, D=24),  # fewer tokens than one chunk holds (default budget)
    "lead3": dict(lead=(2, 3, 4), V=29, D=16),
    "V50257": dict(lead=(7,), V=50257, D=16),
    "V128256": dict(lead=(3,), V=128256, D=8),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes(shape, device):
    # z_loss makes V = 1 non-trivial (its cross-entropy is identically 0).
    budget_rows = None if shape == "N_lt_chunk" else 3.5
    check_case(device, budget_rows=budget_rows, z_loss=0.05, bias=True, ignore=0.2, **SHAPES[shape])


@pytest.mark.parametrize("cap", [30.0, 4.0])
def test_softcap_accuracy(cap, device):
    """The soft cap itself, elementwise: with V = 1 the LSE is the capped logit
    c tanh(z / c), here over z from -8c to 8c and around 0 (log-spaced). It
    stays within 8 float32 ulp of the float64 value. (1 - 2 / (e^{2x} + 1)
    alone cancels for |z| << c: an absolute error of about 2^-24 c, millions of
    ulp for the smallest z here, 30 ulp for z = 1 at c = 30.)"""
    mag = torch.logspace(-6, math.log10(8 * cap), 2000, dtype=torch.float64)
    z = torch.cat([mag, -mag, torch.linspace(-8 * cap, 8 * cap, 2001, dtype=torch.float64)]).float()
    h = z[:, None].to(device)
    W = torch.ones(1, 1, device=device)
    _, lse = flashkd.linear_cross_entropy(h, W, torch.zeros(z.shape, dtype=torch.long, device=device),
                                          softcap=cap, return_lse=True, reduction="none")
    want = R.soft_cap(z.double(), cap)
    mag32 = want.float().abs()
    ulp = (torch.nextafter(mag32, torch.tensor(math.inf)) - mag32).double()
    err_ulp = (lse.cpu().double() - want).abs() / ulp
    assert err_ulp.max() <= 8.0, f"worst {err_ulp.max():.1f} ulp at z = {z[err_ulp.argmax()]:.6g}"


@pytest.mark.parametrize("cap", [30.0, 4.0])
def test_lse_gradient_through_softcap(cap, device):
    """With V = 1 the softmax is exactly 1 when it is formed from the capped logits
    the LSE came from, so d lse / dz is the cap's derivative 1 - (lse / c)^2 up to
    that formula's own rounding. The backward recomputes the capped logits: until
    2026-12-08 with torch's tanh, whose last bits differ from the kernels' soft cap,
    and exp(capped - lse) then missed 1 by up to 48 units of 2^-24 at c = 30
    (random case 1540075 under the portable kernels). Every CPU instruction set."""
    z = torch.linspace(-2 * cap, 2 * cap, 4001)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run():
        h = z[:, None].to(device).requires_grad_()
        _, lse = flashkd.linear_cross_entropy(h, torch.ones(1, 1, device=device),
                                              torch.full(z.shape, -100, device=device), softcap=cap,
                                              return_lse=True, reduction="none")
        (lse * g.float().to(device)).sum().backward()
        return lse.detach().cpu().double(), h.grad[:, 0].cpu().double()

    for where, (lse, dz) in (results_per_cpu_isa(run) if device == "cpu" else {"cuda": run()}).items():
        err = (dz - g * (1 - (lse / cap) ** 2)).abs() / g.abs()
        assert err.max() <= 4 * 2.0 ** -24, f"{where}: {err.max() / 2 ** -24:.1f} x 2^-24 at z = {z[err.argmax()]:.6g}"


def test_soft_cap_op(device):
    """torch.ops.flashkd.soft_cap, which that backward uses: any layout in, a
    contiguous float32 result equal to the LSE of one-logit rows (the row
    kernel's cap); opcheck; bad inputs named."""
    z = (torch.randn(7, 9, generator=torch.Generator().manual_seed(1)) * 40).to(device).t()  # a transposed view
    got = torch.ops.flashkd.soft_cap(z, 30.0)
    assert got.is_contiguous() and got.dtype == torch.float32
    _, lse = flashkd.linear_cross_entropy(z.reshape(-1, 1), torch.ones(1, 1, device=device),
                                          torch.full((63,), -100, device=device), softcap=30.0, return_lse=True,
                                          reduction="none")
    assert torch.equal(got.reshape(-1), lse)
    torch.library.opcheck(torch.ops.flashkd.soft_cap.default, (z, 30.0))
    with pytest.raises(TypeError, match="z must be float32"):
        torch.ops.flashkd.soft_cap(z.double(), 30.0)
    with pytest.raises(ValueError, match="cap must be > 0"):
        torch.ops.flashkd.soft_cap(z, 0.0)

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extreme_logits(reduction, device):
    # Logits of order +-1e4: softmax is one-hot, the LSE is the max; no overflow, no NaN.
    check_case(device, scale=1.5e4, bias=True, ignore=0.2, reduction=reduction, budget_rows=3.5)


@pytest.mark.parametrize("requires", ["h", "W", "b", "hW", "hb", "Wb", "hWb", ""])
def test_requires_grad_subsets(requires, device):
    # The op's grad_mask follows which of hidden/weight/bias require grad.
    check_case(device, bias=True, ignore=0.2, budget_rows=3.5, requires=tuple(requires), label_smoothing=0.1)


LOWP_CASES = {
    "bias_ignore": dict(bias=True, ignore=0.2),
    "softcap_smooth_zloss_weights": dict(softcap=5.0, scale=6.0, label_smoothing=0.1, z_loss=0.01, weights=True),
    "none_shift": dict(reduction="none", shift=True, ignore=0.2, bias=True),
    "lse_sum": dict(return_lse=True, reduction="sum"),
}


@pytest.mark.parametrize("case", list(LOWP_CASES))
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision(dtype, case, device, cpu_gemm_mode):
    # Judged against plain torch in the same dtype (linear_ce_cases.py): both round the
    # logits and gradients to bf16/fp16; the kernel keeps the loss math in float32.
    check_case(device, dtype=DTYPES[dtype], lead=(4, 16), V=300, D=64, budget_rows=7.5, **LOWP_CASES[case])


LAYOUTS = {
    # each: make(contiguous hidden) -> the leaf tensor; view(leaf) -> the hidden passed in
    "transposed_lead": dict(make=lambda h: h.transpose(0, 1).contiguous(), view=lambda x: x.transpose(0, 1)),
    "sliced_last_dim": dict(make=lambda h: torch.cat([h[..., :3], h, h[..., :5]], -1),
                            view=lambda x: x[..., 3:-5]),
    "strided_tokens": dict(make=lambda h: torch.stack([h, h * 0.5], -2).flatten(-3, -2),
                           view=lambda x: x[:, ::2]),
    "expanded_zero_stride": dict(make=lambda h: h[:1, :1], view=lambda x: x.expand(2, 7, x.shape[-1])),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_noncontiguous_hidden(layout, device):
    check_case(device, bias=True, ignore=0.2, budget_rows=3.5, view=LAYOUTS[layout], label_smoothing=0.1)


@pytest.mark.parametrize("layout", ["column_major", "sliced"])
def test_noncontiguous_weight_and_targets(layout, device):
    inp = make_inputs(device, bias=True, ignore=0.2)
    W = inp["W"]
    if layout == "column_major":
        inp["W"] = W.t().contiguous().t()
    else:
        inp["W"] = torch.cat([W, W[:, :4]], 1)[:, :W.shape[1]]
    yb = torch.stack([inp["y"], inp["y"]], -1)
    inp["y"] = yb[..., 0]  # strided targets
    assert not inp["W"].is_contiguous() and not inp["y"].is_contiguous()
    kern = run(flashkd.linear_cross_entropy, inp, chunk_budget_bytes=rows_budget(37, 3.5))
    oracle = run(R.linear_cross_entropy, inp, dtype=torch.float64)
    plain = run(plain_ce, inp)
    check_against(kern, oracle, plain, V=37, D=24)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extras", ["plain", "all_options"])
def test_all_targets_ignored(reduction, extras, device):
    """Loss 0 (per token 0 for "none"), gradients exactly 0, never NaN."""
    kw = dict(label_smoothing=0.1, z_loss=0.05, softcap=5.0) if extras == "all_options" else {}
    inp = make_inputs(device, bias=True, weights=extras == "all_options")
    inp["y"] = torch.full_like(inp["y"], -100)
    loss, _, grads = run(flashkd.linear_cross_entropy, inp, reduction=reduction,
                         chunk_budget_bytes=rows_budget(37, 3.5), **kw)
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    for k, g in grads.items():
        assert g is not None and torch.equal(g, torch.zeros_like(g)), f"grad {k} not exactly 0: {g}"


@pytest.mark.parametrize("options", ["plain", "all_options"])
def test_nan_hidden_poisons_its_token(options, device):
    """A NaN in a counted token's hidden state makes its loss and hidden
    gradient row NaN, and so every weight and bias gradient, as
    F.cross_entropy does; the other tokens keep the bits of the clean call.
    A NaN in an ignored token's hidden state changes no loss and leaves that
    token's hidden gradient 0 (F.cross_entropy makes it NaN), but the weight
    gradient dW = dz^T h takes 0 * NaN from it, as plain torch's does."""
    kw = dict(label_smoothing=0.1, z_loss=0.05, softcap=5.0) if options == "all_options" else {}
    kw.update(reduction="none", chunk_budget_bytes=rows_budget(37, 2.5))
    inp = make_inputs(device, lead=(6,), bias=True)
    inp["y"][1] = -100
    clean = run(flashkd.linear_cross_entropy, inp, **kw)
    inp["h"][1, 0] = math.nan
    ignored_only = run(flashkd.linear_cross_entropy, inp, **kw)
    inp["h"][4, 2] = math.nan
    loss, _, grads = run(flashkd.linear_cross_entropy, inp, **kw)
    others = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(ignored_only[0], clean[0])
    assert torch.equal(ignored_only[2]["h"], clean[2]["h"]) and torch.equal(ignored_only[2]["b"], clean[2]["b"])
    assert ignored_only[2]["W"][:, 0].isnan().all() and torch.equal(ignored_only[2]["W"][:, 1:], clean[2]["W"][:, 1:])
    assert loss[4].isnan() and torch.equal(loss[others], clean[0][others])
    assert grads["h"][4].isnan().all() and torch.equal(grads["h"][others], clean[2]["h"][others])
    assert grads["W"].isnan().all() and grads["b"].isnan().all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_length_one_sequences(reduction, device):
    """shift=True on sequences of length 1: every position is ignored."""
    inp = make_inputs(device, lead=(3, 1), bias=True)
    loss, _, grads = run(flashkd.linear_cross_entropy, inp, reduction=reduction, shift=True, z_loss=0.1)
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    for k, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), f"grad {k} not exactly 0"
    # ... but their LSE is still computed, and differentiable.
    check_case(device, lead=(3, 1), bias=True, shift=True, reduction=reduction, return_lse=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lse_gradient_from_forwards_logits(dtype):
    """CPU, 16-bit inputs, head GEMMs in float32 (cpu_16bit_gemm "float32", the
    default where ATen has no fast 16-bit GEMM): the LSE comes from float32
    logits, so its gradient must be formed from them too. Until 2026-12-07 the
    backward recomputed the logits in 16 bits: softmax(z) was off by their
    rounding (at |z| ~ 30, 6% in bfloat16), 10 float16 ulps in a random case.
    Bound: one rounding of each d(logit) (u per product of d hidden's sum) and
    one of the result."""
    inp = make_inputs("cpu", lead=(16,), V=300, D=32, dtype=dtype, scale=10.0)
    with cpu_16bit_gemm("float32"):
        h = inp["h"].clone().requires_grad_()
        _, lse = flashkd.linear_cross_entropy(h, inp["W"], inp["y"], return_lse=True,
                                              chunk_budget_bytes=rows_budget(300, 5))
        lse.sum().backward()
    h64 = inp["h"].double().requires_grad_()
    z = h64 @ inp["W"].double().T
    torch.logsumexp(z, -1).sum().backward()
    terms = torch.softmax(z.detach(), -1) @ inp["W"].double().abs()
    err = (h.grad.double() - h64.grad).abs()
    assert (err <= UNIT[dtype] * (2 * terms + h64.grad.abs())).all(), (err / terms).max().item()


def test_lse_values_all_tokens(device):
    """return_lse gives the LSE of every token, ignored ones included (as the oracle)."""
    inp = make_inputs(device, bias=True, ignore=0.5, lead=(13,))
    loss, lse = flashkd.linear_cross_entropy(inp["h"], inp["W"], inp["y"], inp["b"], return_lse=True,
                                             chunk_budget_bytes=rows_budget(37, 2.5))
    _, lse_ref = R.linear_cross_entropy(inp["h"].double(), inp["W"].double(), inp["y"], inp["b"].double(),
                                        return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (13,)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tied_weight(reduction, device):
    """The head weight is also the input embedding and is regularized: its gradient is the
    sum of the three paths (autograd accumulation into the same leaf)."""
    g = torch.Generator().manual_seed(3)
    V, D, N = 41, 16, 12
    W0 = torch.randn(V, D, generator=g) * 0.8
    A0 = torch.randn(D, D, generator=g) / math.sqrt(D) * 2
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    y[::4] = -100

    def step(impl, dtype, **kw):
        W = W0.to(device=device, dtype=dtype).clone().requires_grad_()
        A = A0.to(device=device, dtype=dtype).clone().requires_grad_()
        h = torch.tanh(W[ids] @ A)  # embedding lookup with the tied weight
        loss = impl(h, W, y, reduction=reduction, **kw)
        if reduction == "none":
            loss = (loss * torch.linspace(0.5, 1.5, N, device=device, dtype=loss.dtype)).sum()
        total = loss + (W ** 2).sum() * 1e-3
        total.backward()
        return total.detach().double(), W.grad.double(), A.grad.double()

    ours = step(flashkd.linear_cross_entropy, torch.float32, chunk_budget_bytes=rows_budget(V, 2.5))
    ref = step(R.linear_cross_entropy, torch.float64)
    for name, a, b in zip(("loss", "dW", "dA"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


def test_backward_twice_raises(device):
    """The gradient made in forward is scaled in place by backward (no second
    gradient-sized buffer), so a retained graph cannot be backpropagated twice:
    torch's saved-tensor version check must raise instead of scaling twice."""
    inp = make_inputs(device, bias=True, ignore=0.2)
    h, W, b = (inp[k].clone().requires_grad_() for k in ("h", "W", "b"))
    loss = flashkd.linear_cross_entropy(h, W, inp["y"], b, chunk_budget_bytes=rows_budget(37, 3.5))
    (loss * 2.0).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss * 3.0).backward()


# ----------------------------------------------------------------------------- random option combinations

# The tests above vary a few options at a time. Here each case draws all of them at once
# from a generator seeded by the case number (checks.RANDOM_CASES cases). Where the
# tolerance model stops being informative the draws stop too: V >= 3 (at V = 1 the
# cross-entropy gradient cancels to exactly 0 in float64, so float32 noise of the size of
# the softmax has nothing to be relative to), and bf16/fp16 only with >= 32 tokens and
# V >= 100 (on a few tokens, "gradients no worse than plain torch's" is decided by
# which logits happen to round luckily: both round them to the dtype).


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_option_combinations(case, device):
    rng = random.Random(f"linear_ce-{case}")
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    low = dtype != torch.float32
    lead = random_lead(rng, low)
    kw = dict(lead=lead, V=rng.choice([100, 513] if low else [3, 17, 37, 100, 513]),
              D=rng.choice([24, 65] if low else [1, 3, 8, 24, 65]), dtype=dtype, bias=rng.random() < 0.4,
              scale=rng.choice([1.0, 3.0, 8.0]), ignore=rng.choice([0.0, 0.3, 1.0]), weights=rng.random() < 0.3,
              seed=case, reduction=rng.choice(["none", "sum", "mean", "batchmean"]), shift=rng.random() < 0.3,
              return_lse=rng.random() < 0.3, budget_rows=rng.choice([None, 0.5, 1, 2.5, 7]))
    if rng.random() < 0.3:
        kw["ignore_index"] = rng.choice([-1, 0, 2])  # a valid class too: its targets are then ignored
    if rng.random() < 0.3:
        kw["softcap"] = rng.choice([4.0, 30.0])
    if rng.random() < 0.3:
        kw["label_smoothing"] = rng.choice([0.1, 0.5])
    if rng.random() < 0.3:
        kw["z_loss"] = rng.choice([1e-4, 0.01])
    if kw["reduction"] != "none" and rng.random() < 0.3:
        kw["num_items"] = rng.choice([1.0, 7.0])
    if rng.random() < 0.2:
        kw["requires"] = rng.choice([("h",), ("W",), ("W", "b"), ("b",)])
    layouts = (["sliced_last_dim"] if kw["D"] >= 5 else []) + (["transposed_lead"] if len(lead) >= 2 else [])
    if layouts and rng.random() < 0.25:
        kw["view"] = LAYOUTS[rng.choice(layouts)]
    with cpu_16bit_gemm(rng.choice(CPU_16BIT_GEMMS)):
        check_case(device, **kw)

# ----------------------------------------------------------------------------- finite differences


# Finite-difference gradient checks: see checks.directional_check.
FD_CASES = {
    "mean_all_options": dict(reduction="mean", softcap=5.0, label_smoothing=0.1, z_loss=0.02, weighted=True),
    "none_cotangent": dict(reduction="none", label_smoothing=0.1),
    "lse": dict(reduction="mean", return_lse=True, softcap=5.0),
    "shift_num_items": dict(reduction="mean", shift=True, num_items=9.0),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_gradcheck_linear_cross_entropy(case, device):
    kw = dict(FD_CASES[case])
    weighted = kw.pop("weighted", False)
    inp = make_inputs(device, lead=(2, 6), V=23, D=12, bias=True, ignore=0.2, weights=weighted)
    cot = torch.linspace(0.5, 1.5, 12, device=device).reshape(2, 6) / 12
    lse_cot = torch.linspace(-0.1, 0.1, 12, device=device).reshape(2, 6)

    def f(h, W, b):
        out = flashkd.linear_cross_entropy(h, W, inp["y"], b, weights=inp["weights"],
                                           chunk_budget_bytes=rows_budget(23, 2.5), **kw)
        loss, lse = out if kw.get("return_lse") else (out, None)
        if loss.dim():
            loss = (loss * cot).sum()
        return loss if lse is None else loss + (lse * lse_cot).sum()

    directional_check(f, [inp["h"], inp["W"], inp["b"]], device)


# ----------------------------------------------------------------------------- opcheck, torch.compile


OPCHECK_CASES = {
    "mean_mask7_lse": dict(reduction="mean", grad_mask=7, return_lse=True, label_smoothing=0.1, z_loss=0.01,
                           softcap=5.0),
    "none_mask7": dict(reduction="none", grad_mask=7),
    "mean_mask3_nobias": dict(reduction="mean", grad_mask=3, bias=False),
    "none_mask5_bias": dict(reduction="none", grad_mask=5),  # frozen weight, trainable bias: one empty output
    # Absent gradients are distinct empty tensors: outputs never alias each other.
    "none_mask0_nobias": dict(reduction="none", grad_mask=0, bias=False),
    "mean_mask1_frozen_head": dict(reduction="mean", grad_mask=1, bias=False),
    "mean_mask7_dw_in_dtype": dict(reduction="mean", grad_mask=7, float32_weight_grad=False),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES.values()), ids=list(OPCHECK_CASES))
def test_opcheck(case, device):
    inp = make_inputs(device, lead=(2, 5), V=19, D=8, bias=True, ignore=0.2, weights=True)
    args = op_args(inp, budget=rows_budget(19, 3.5), **case)
    # In eager mode backward finishes the gradients in the buffers the op returned
    # (scale_saved_grad; with the LSE, lse_backward adds its part there too), so that
    # no second weight-sized tensor exists. opcheck's AOT check compares the op's
    # outputs after a backward whose loss cotangent is 1 (a no-op scale) but whose
    # LSE cotangent is not: with the LSE it would see those buffers changed. The
    # compiled LSE path is compared with eager's results by test_compile_fullgraph.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not case.get("return_lse"):
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.flashkd.linear_loss.default, args, test_utils=utils)


def test_compile_fullgraph(device):
    """torch.compile(fullgraph=True) of a function calling both fused linear losses:
    forward and backward equal eager."""
    V, Vt, D, Dt = 29, 33, 16, 12
    inp = make_inputs(device, lead=(2, 6), V=V, D=D, bias=True, ignore=0.2, weights=True)
    g = torch.Generator().manual_seed(7)
    th = torch.randn(2, 6, Dt, generator=g).to(device)
    tW = (torch.randn(Vt, Dt, generator=g) / 2).to(device)
    budget = rows_budget(V, 2.5)

    def f(h, W, b):
        ce, lse = flashkd.linear_cross_entropy(h, W, inp["y"], b, label_smoothing=0.1, return_lse=True,
                                               shift=True, chunk_budget_bytes=budget)
        kd, stats = flashkd.linear_distill_loss(h, W, th, tW, student_bias=b, labels=inp["y"], hard_weight=0.5,
                                                divergence="jsd", reduction="none", weights=inp["weights"],
                                                return_stats=True, chunk_budget_bytes=budget)
        return ce + (kd * inp["weights"]).sum() + 0.05 * lse.sum(), stats["teacher_entropy"]

    assert_compile_matches_eager(f, lambda: [inp[k].clone().requires_grad_() for k in ("h", "W", "b")])


# ----------------------------------------------------------------------------- bad inputs


def _bad(device):
    inp = make_inputs(device, lead=(4,), V=10, D=8)
    h, W, y = inp["h"], inp["W"], inp["y"]
    f = flashkd.linear_cross_entropy
    return {
        "hidden_weight_D": (lambda: f(h, W[:, :7], y), ValueError, r"^weight has D=7 but hidden has D=8"),
        "weight_not_2d": (lambda: f(h, W.unsqueeze(0), y), ValueError, r"^weight must be 2-D"),
        "weight_1d": (lambda: f(h, W[0], y), ValueError, r"weight must be 2-D"),
        "target_too_large": (lambda: f(h, W, torch.tensor([0, 1, 10, 2], device=device)), ValueError,
                             r"targets must be in \[0, 10\)"),
        "target_negative": (lambda: f(h, W, torch.tensor([0, -1, 3, 2], device=device)), ValueError,
                            r"targets must be in \[0, 10\) or equal ignore_index=-100"),
        "float_targets": (lambda: f(h, W, y.float()), TypeError, r"targets.* must be an integer tensor"),
        "targets_shape": (lambda: f(h, W, y[:3]), ValueError, r"targets must have shape \[4\]"),
        "targets_shape_2d": (lambda: f(h, W, y.reshape(2, 2)), ValueError, r"targets must have shape"),
        "weight_dtype": (lambda: f(h, W.bfloat16(), y), TypeError, r"weight dtype"),
        "hidden_float64": (lambda: f(h.double(), W.double(), y), TypeError,
                           r"hidden must be float32, bfloat16 or float16"),
        "hidden_int": (lambda: f(h.long(), W, y), TypeError, r"^hidden must be float32, bfloat16 or float16"),
        "bias_shape": (lambda: f(h, W, y, torch.zeros(9, device=device)), ValueError, r"^bias must have shape"),
        "weights_shape": (lambda: f(h, W, y, weights=torch.ones(3, device=device)), ValueError,
                          r"weights must have shape"),
        "negative_weights": (lambda: f(h, W, y, weights=-torch.ones(4, device=device)), ValueError,
                             r"weights must be >= 0"),
        "reduction": (lambda: f(h, W, y, reduction="avg"), ValueError, r"reduction must be one of"),
        "label_smoothing": (lambda: f(h, W, y, label_smoothing=1.5), ValueError, r"label_smoothing"),
        "softcap": (lambda: f(h, W, y, softcap=0.0), ValueError, r"softcap must be > 0"),
        "z_loss": (lambda: f(h, W, y, z_loss=-1.0), ValueError, r"z_loss must be >= 0"),
        "num_items": (lambda: f(h, W, y, num_items=0), ValueError, r"num_items must be > 0"),
        "budget": (lambda: f(h, W, y, chunk_budget_bytes=0), ValueError, r"chunk_budget_bytes must be > 0"),
        "budget_float": (lambda: f(h, W, y, chunk_budget_bytes=1e6), TypeError, r"chunk_budget_bytes must be an int"),
        "budget_too_big": (lambda: f(h, W, y, chunk_budget_bytes=2**70), ValueError,
                           r"chunk_budget_bytes must fit in 64 bits"),
        "weights_not_tensor": (lambda: f(h, W, y, weights=[1.0] * 4), TypeError, r"weights must be a torch.Tensor"),
        "teacher_logits_not_tensor": (lambda: flashkd.linear_distill_loss(h, W, teacher_logits=[[0.0] * 10] * 4),
                                      TypeError, r"teacher_logits must be a torch.Tensor"),
        "hidden_no_features": (lambda: f(h[:, :0], W[:, :0], y), ValueError, r"hidden must have a hidden size D >= 1"),
        "weight_no_rows": (lambda: f(h, W[:0], y), ValueError, r"weight must have at least one row"),
        "teacher_weight_no_features": (lambda: flashkd.linear_distill_loss(h, W, h[:, :0], W[:, :0]), ValueError,
                                       r"teacher_hidden must have a hidden size D >= 1"),
        "hidden_not_tensor": (lambda: f(h.tolist(), W, y), TypeError, r"hidden must be a torch.Tensor"),
        # a meta tensor beside real ones reaches the fake kernel, which must not answer with empty memory
        "weight_meta": (lambda: f(h, W.to("meta"), y), ValueError, r"^weight must be on the device of hidden"),
        "teacher_logits_meta": (lambda: flashkd.linear_distill_loss(h, W, teacher_logits=torch.zeros(
            4, 10, device="meta")), ValueError, r"^teacher_logits must be on the device of student_hidden"),
    }


@pytest.mark.parametrize("case", list(_bad("cpu")))
def test_bad_inputs(case, device):
    fn, exc, pattern = _bad(device)[case]
    with pytest.raises(exc, match=pattern):
        fn()
