"""Tests of flashkd.linear_cross_entropy (fused LM head + cross-entropy that never
materializes the [tokens x vocab] logits, DESIGN.md sections 2, 3 and 5) and of the
op behind it, torch.ops.flashkd.linear_loss.

How results are judged
----------------------
Each case runs three computations on the same input values:
  * the kernel: flashkd.linear_cross_entropy, chunked over tokens (most cases
    force many chunks with a tiny chunk_budget_bytes, so that a chunk boundary
    falls inside the tokens and the last chunk is partial);
  * the oracle: flashkd.reference.linear_cross_entropy on float64 copies of the
    very same (already rounded) inputs, with float64 autograd: "the truth";
  * plain torch: F.cross_entropy(F.linear(hidden, weight, bias), ...) in the
    inputs' own dtype, with torch autograd: what a user would otherwise write.

For every output (loss, lse, d hidden, d weight, d bias) a case passes when

    |kernel - oracle| <= SLACK * max|plain - oracle| + floor,
    floor = (K_FLOOR * EPS32 * sqrt(D + V) + u) * max|oracle|,

u being, for gradients, the unit roundoff of their dtype (2^-8 bf16, 2^-11 fp16,
2^-24 fp32; 0 for the float32 loss and LSE): one rounding of the largest element
to the stored dtype, which neither the kernel nor torch avoids and in which
torch may be luckier on a given case. For the loss, max|oracle| is at least the
size of what it is made of (tolerance_terms): a token whose target logit
dominates has a loss LSE - z_y near 0, the difference of two values of size |z|,
each known to float32 noise at that size (found by a random case, 100991: a
loss of 9.7e-4 from logits up to 14.4, off by 5.9e-8, a 15th of an ulp of the
logit, which a bound relative to the loss itself failed).

SLACK = 2 allows for a different order of summation ("no worse than torch").
The K_FLOOR term is a float32 noise level: logits are dot products of length D
and the softmax normaliser a sum of V terms, each carrying about sqrt(length)
units of float32 roundoff for random rounding; plain torch in float32 is
sometimes much luckier than that on a given case, and the kernel must not be
failed for it (measured: the kernel stays under 0.1 of this bound in float32).
In bf16/fp16 the SLACK term dominates for the gradients (both the kernel and
torch round the logits and the gradients to the input dtype: the error has the
same origin). The loss and LSE get one more term, SLACK times how far the
oracle's own loss and LSE move when its logits are rounded to the dtype first
(as the kernel's GEMM and torch's F.linear round them): torch returns its loss
in the dtype, and an fp16 loss of 19.47, stored to +-0.008, may land next to
the oracle's value by luck, which makes it no guide at that size.

The bound above is on the largest error of a tensor; gradients also get a
per-element term for what a maximum does not see (tests/linear_tolerance.py,
tolerance_terms): an element of d hidden = G @ W or d weight = G^T h is a dot product
that keeps the noise of its products however much it cancels, and each entry of
G = a_t (p_j - target_j) carries noise of order a_t p_j (in bf16/fp16, one
rounding of it) however small the difference. FLASHKD_TEST_REPORT_TOL=1 pytest -s
prints every error next to its bound.
"""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import flashkd
from flashkd import reference as R
from flashkd._ops import LINEAR_LOSS_ARGS

import memory
from checks import (CPU_16BIT_GEMMS, RANDOM_CASES, assert_compile_matches_eager, cpu_16bit_gemm,
                    directional_check, loss_options, random_lead, scalar_objective, token_factors)
from linear_tolerance import EPS32, K_FLOOR, SLACK, UNIT, check_close, max_err, product_magnitudes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- helpers


def rows_budget(V, rows, elem=4):
    """A chunk_budget_bytes that fits `rows` (fractional) rows of float32 logits:
    the glue uses floor(budget / (V * elem)) rows per chunk."""
    return int(rows * V * elem)


def float32_head_budget(rows, V, D, heads):
    """A chunk_budget_bytes that gives `rows` rows per chunk to 16-bit heads run in
    float32 on the CPU (csrc/ops/head_gemm.h), `heads` of them with hidden size D: a
    quarter of the budget goes to the weight panels, and each row of the rest holds
    float32 logits and hidden states per head and the student's float32 d hidden."""
    row = heads * (V + D) * 4 + D * 4
    return (rows * row + row // 2) * 4 // 3


def make_inputs(device, *, lead=(2, 7), V=37, D=24, dtype=torch.float32, bias=False, scale=3.0, ignore=0.0,
                ignore_index=-100, weights=False, seed=0):
    """Random hidden (lead..., D), weight (V, D), targets (lead...) and optional bias and
    per-token weights. Logits have a standard deviation of about `scale`."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, D, generator=g)
    W = torch.randn(V, D, generator=g) * (scale / math.sqrt(D))
    b = torch.randn(V, generator=g) if bias else None
    y = torch.randint(0, V, lead, generator=g)
    if ignore:
        y[torch.rand(lead, generator=g) < ignore] = ignore_index
    w = (torch.rand(lead, generator=g) * 1.5 + 0.25) if weights else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return dict(h=cast(h), W=cast(W), b=cast(b), y=y.to(device),
                weights=None if w is None else w.to(device))


def plain_ce(h, W, y, b=None, *, ignore_index=-100, softcap=None, label_smoothing=0.0, z_loss=0.0, weights=None,
             reduction="mean", num_items=None, shift=False, return_lse=False, chunk_budget_bytes=None):
    """What a user writes in plain torch, computed in the inputs' dtype."""
    z = R.soft_cap(F.linear(h, W, b), softcap)
    if shift:
        y2 = torch.full_like(y, ignore_index)
        y2[..., :-1] = y[..., 1:]
        y = y2
    V = z.shape[-1]
    per = F.cross_entropy(z.reshape(-1, V), y.reshape(-1), ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction="none").reshape(y.shape)
    lse = torch.logsumexp(z, -1)
    valid = y != ignore_index
    if z_loss:
        per = per + z_loss * torch.where(valid, lse * lse, torch.zeros_like(lse))
    if weights is not None:
        per = per * weights.to(per.dtype)
    if reduction == "none":
        loss = per
    elif reduction == "sum":
        loss = per.sum()
    else:
        denom = num_items if num_items is not None else valid.sum().clamp_min(1)
        loss = per.sum() / denom
    return (loss, lse) if return_lse else loss


def objective(loss, lse, seed):
    """The scalar `run` differentiates: the loss times a non-trivial cotangent
    (checks.scalar_objective) plus, when the LSE is returned, a random linear function
    of it (multiples of 1/256 in [-1/8, 1/8], exact in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    obj = scalar_objective(loss, g)
    if lse is not None:
        cot = (torch.randint(-32, 33, lse.shape, generator=g, dtype=torch.float64) / 256).to(lse.device)
        obj = obj + (lse * cot.to(lse.dtype)).sum()
    return obj


def run(impl, inp, *, dtype=None, requires=("h", "W", "b"), view=None, seed=1, **kw):
    """Forward + backward of `impl` (flashkd, the oracle or plain torch) on copies of the
    inputs cast to `dtype` (float64 for the oracle). The objective multiplies the loss by a
    non-trivial cotangent (a scalar for sum/mean, a random per-token tensor for "none") and
    adds a random linear function of the LSE when it is returned, so that backward sees
    grad_output != 1. `view` maps the leaf hidden to the hidden passed in (layout tests).
    Returns the loss, the lse and the gradients of the leaves, all in float64."""
    leaves = {}
    for k in ("h", "W", "b"):
        t = inp[k]
        if t is None:
            leaves[k] = None
            continue
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        leaves[k] = t.requires_grad_(k in requires)
    h = leaves["h"] if view is None else view(leaves["h"])
    out = impl(h, leaves["W"], inp["y"], leaves["b"], weights=inp.get("weights"), **kw)
    loss, lse = out if kw.get("return_lse") else (out, None)
    obj = objective(loss, lse, seed)
    grads = {}
    if obj.requires_grad:
        obj.backward()
        grads = {k: None if (t is None or t.grad is None) else t.grad.double() for k, t in leaves.items()}
    lse64 = None if lse is None else lse.detach().double()
    return loss.detach().double(), lse64, grads


def check_against(kern, oracle, plain, *, V, D, dtype=torch.float32, rounded=None, terms=None, loss_terms=0.0):
    """kern/oracle/plain: results of `run`. Applies the tolerance model of the module docstring;
    `rounded`: the oracle's loss and lse on logits rounded to a bf16/fp16 `dtype`; `terms`,
    `loss_terms`: tolerance_terms of the case."""
    noise = K_FLOOR * EPS32 * math.sqrt(D + V)
    for i, name in enumerate(("loss", "lse")):
        extra = SLACK * max_err(rounded[name], oracle[i]) if rounded is not None and oracle[i] is not None else 0.0
        check_close(name, kern[i], oracle[i], plain[i], noise, min_scale=loss_terms if i == 0 else 0.0,
                    extra=extra)
    for k in ("h", "W", "b"):
        check_close(f"grad {k}", kern[2].get(k), oracle[2].get(k), plain[2].get(k), noise, unit=UNIT[dtype],
                    terms=None if terms is None else terms[k])


def tolerance_terms(inp, view, kw, seed=1):
    """The per-case terms of the tolerance model, from the float64 logits z (capped: zc):
    * grad terms, per element of d hidden, d weight, d bias: linear_tolerance.product_magnitudes
      with M = |G| + a_t P_tj, G the oracle's d objective / d logits, P = softmax(zc) and a_t
      the token's softmax coefficient in G: its loss cotangent (token weight, mean divisor,
      objective) times 1 + 2 z_loss |LSE_t|, plus its LSE cotangent. An element a_t (p_j -
      target_j) carries float32 noise of order a_t p_j however much it cancels; a dot product,
      noise relative to its products' magnitudes;
    * the loss magnitude, the size of the terms the loss is made of where it cancels to ~0 (a
      token whose target logit dominates: LSE_t - z_ty ~ 0 from two operands of size |z|): the
      sum over tokens of their loss coefficients times |LSE_t| (1 + 2 z_loss |LSE_t|) +
      max_j |zc_tj| (the target's and, with label smoothing, the mean logit); the largest
      token's for reduction "none".
    Returns (grad terms, loss magnitude)."""
    h = inp["h"] if view is None else view(inp["h"])
    z = R.head_logits(h, inp["W"], inp["b"], torch.float64).detach().requires_grad_()
    out = R.cross_entropy(z, inp["y"], weights=inp.get("weights"), **kw)
    loss, lse = out if kw.get("return_lse") else (out, None)
    objective(loss, lse, seed).backward()
    capped = R.soft_cap(z.detach(), kw.get("softcap"))
    lead = tuple(z.shape[:-1])
    per_token, red = token_factors(lead, loss_options(inp["y"], inp.get("weights"), kw), 0.0, 1.0)
    probe_loss = torch.zeros(lead if red == "none" else (), dtype=torch.float64, requires_grad=True)
    probe_lse = torch.zeros(lead, dtype=torch.float64, requires_grad=True) if kw.get("return_lse") else None
    objective(probe_loss, probe_lse, seed).backward()
    lse_capped = torch.logsumexp(capped, -1).abs().cpu()
    lse_factor = 1 + 2 * kw.get("z_loss", 0.0) * lse_capped
    a = per_token * probe_loss.grad.abs() * lse_factor
    if probe_lse is not None:
        a = a + probe_lse.grad.abs()
    M = z.grad.abs() + a.to(z.device).unsqueeze(-1) * torch.softmax(capped, -1)
    weighted = per_token * (lse_capped * lse_factor + capped.abs().amax(-1).cpu())
    magnitude = (weighted.amax() if red == "none" else weighted.sum()).item() if weighted.numel() else 0.0
    return product_magnitudes(inp, view, M), magnitude


def check_case(device, *, dtype=torch.float32, lead=(2, 7), V=37, D=24, bias=False, scale=3.0, ignore=0.0,
               weights=False, seed=0, budget_rows=None, requires=("h", "W", "b"), view=None, **kw):
    ignore_index = kw.get("ignore_index", -100)
    inp = make_inputs(device, lead=lead, V=V, D=D, dtype=dtype, bias=bias, scale=scale, ignore=ignore,
                      ignore_index=ignore_index, weights=weights, seed=seed)
    if view is not None:
        inp["h"] = view["make"](inp["h"])
    kv = view["view"] if view is not None else None
    budget = None if budget_rows is None else rows_budget(V, budget_rows, torch.empty((), dtype=dtype).element_size())
    kern = run(flashkd.linear_cross_entropy, inp, requires=requires, view=kv, chunk_budget_bytes=budget, **kw)
    oracle = run(R.linear_cross_entropy, inp, dtype=torch.float64, requires=requires, view=kv, **kw)
    plain = run(plain_ce, inp, requires=requires, view=kv, **kw)
    rounded = None if dtype == torch.float32 else oracle_on_rounded_logits(inp, kv, **kw)
    terms, loss_terms = tolerance_terms(inp, kv, kw)
    check_against(kern, oracle, plain, V=V, D=D, dtype=dtype, rounded=rounded, terms=terms, loss_terms=loss_terms)
    return kern, oracle


def oracle_on_rounded_logits(inp, view=None, *, return_lse=False, **kw):
    """The float64 oracle's loss and LSE on the logits rounded to the inputs' dtype, as the
    kernel's GEMM (like F.linear) rounds them: {"loss": ..., "lse": ... or None}."""
    h = inp["h"] if view is None else view(inp["h"])
    z = F.linear(h, inp["W"], inp["b"]).double()
    loss, lse = R.cross_entropy(z, inp["y"], weights=inp.get("weights"), return_lse=True, **kw)
    return {"loss": loss, "lse": lse if return_lse else None}


# ----------------------------------------------------------------------------- 1. values and gradients


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
    # Judged against plain torch in the same dtype (module docstring): both round the
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

# ----------------------------------------------------------------------------- 2. finite differences


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


# ----------------------------------------------------------------------------- 3. opcheck, torch.compile


def op_args(inp, *, bias=True, reduction="mean", grad_mask=7, return_lse=False, label_smoothing=0.0,
            z_loss=0.0, softcap=None, budget=None, float32_weight_grad=True):
    a = dict.fromkeys(LINEAR_LOSS_ARGS)
    rg = lambda t, bit: t.detach().clone().requires_grad_(bool(grad_mask & bit))
    a.update(hidden=rg(inp["h"], 1), weight=rg(inp["W"], 2), bias=rg(inp["b"], 4) if bias else None,
             labels=inp["y"], weights=inp["weights"], divergence="fkl", temperature=1.0, beta=0.5, alpha=0.1,
             taid_lambda=None, ignore_index=-100, hard_weight=1.0, soft_weight=0.0, t2_scaling=False,
             vocab_size=None, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
             reduction=reduction, num_items=None, return_stats=False, return_lse=return_lse,
             grad_mask=grad_mask, row_scale=None, chunk_budget_bytes=budget,
             float32_weight_grad=float32_weight_grad)
    return tuple(a[k] for k in LINEAR_LOSS_ARGS)


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


# ----------------------------------------------------------------------------- 4. bad inputs


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


# ----------------------------------------------------------------------------- 5. 16-bit heads on the CPU


@pytest.mark.parametrize("panel_rows", [1, 7, 300])
@pytest.mark.parametrize("fn", [flashkd.linear_cross_entropy, flashkd.linear_distill_loss],
                         ids=["cross_entropy", "distill"])
def test_float32_heads_compute_the_float32_values(panel_rows, fn):
    """A bf16 head run in float32 on the CPU computes what the same call on the inputs
    converted to float32 computes, rounded once to bf16: its weight panels (here of
    1 and 7 rows, 300 not a multiple of 7, and one panel for the whole weight) and
    chunks only change the order of float32 sums. A panel read twice or skipped, or
    logits written to the wrong columns, would be off by far more than 1e-5. (d weight
    summed in bf16: test_weight_grad_summed_in_its_dtype.)"""
    N, V, D = 30, 300, 24
    inp = make_inputs("cpu", lead=(N,), V=V, D=D, dtype=torch.bfloat16, bias=True, ignore=0.2)
    heads = 1 if fn is flashkd.linear_cross_entropy else 2
    # the panel takes a quarter of the budget: 4 bytes x D per row, shared by the heads
    budget = panel_rows * heads * D * 4 * 4

    def call(dtype, **kw):
        h = inp["h"].to(dtype).requires_grad_()
        W = inp["W"].to(dtype).requires_grad_()
        b = inp["b"].to(dtype).requires_grad_()
        if fn is flashkd.linear_cross_entropy:
            loss = fn(h, W, inp["y"], b, label_smoothing=0.1, **kw)
        else:
            loss = fn(h, W, h.detach().flip(-1), W.detach().flip(0), student_bias=b, teacher_bias=b.detach().flip(0),
                      labels=inp["y"], hard_weight=0.5, divergence="jsd", **kw)
        loss.backward()
        return loss.detach(), h.grad, W.grad, b.grad

    want = call(torch.float32)
    with cpu_16bit_gemm("float32"):
        got = call(torch.bfloat16, chunk_budget_bytes=budget)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg="loss")
    for name, g, w in zip(("d hidden", "d weight", "d bias"), got[1:], want[1:]):
        assert g.dtype == torch.bfloat16
        tol = 2.0 ** -8 * w.abs() + 1e-5 * w.abs().max()  # one rounding to bf16, float32 noise
        err = (g.float() - w).abs()
        assert (err <= tol).all(), f"{name}: max excess {(err - tol).max().item():.3e}"


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags
def test_cpu_head_gemm_choice():
    """cpu_16bit_gemm: "auto" runs a 16-bit head in float32 exactly where ATen has no
    oneDNN GEMM for its dtype (or oneDNN is disabled), in the dtype elsewhere, as
    flashkd.cpu_gemm_dtype reports; a bad name is refused, and reset goes back to auto."""
    ops = torch.ops.flashkd
    inp = make_inputs("cpu", lead=(16,), V=50, D=8, dtype=torch.bfloat16)

    def bits():
        h, W = inp["h"].clone().requires_grad_(), inp["W"].clone().requires_grad_()
        loss = flashkd.linear_cross_entropy(h, W, inp["y"])
        loss.backward()
        return loss.detach(), h.grad, W.grad

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    runs = {}
    for mode in ("native", "float32"):
        with cpu_16bit_gemm(mode):
            runs[mode] = bits()
    assert not same(runs["native"], runs["float32"])  # the two really differ, so the checks below can fail
    assert ops.cpu_16bit_gemm("", True) == "auto"
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert same(bits(), runs["native" if onednn else "float32"])
    assert flashkd.cpu_gemm_dtype(torch.bfloat16) == (torch.bfloat16 if onednn else torch.float32)
    assert flashkd.cpu_gemm_dtype(torch.float32) == torch.float32
    with torch.backends.mkldnn.flags(enabled=False):
        assert same(bits(), runs["float32"])
        assert flashkd.cpu_gemm_dtype(torch.bfloat16) == torch.float32
    with cpu_16bit_gemm("native"):
        assert flashkd.cpu_gemm_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="CPU 16-bit GEMM must be auto, float32 or native, got 'fp32'"):
        ops.cpu_16bit_gemm("fp32")
    assert ops.cpu_16bit_gemm() == "auto"


def test_cpu_16bit_gemm_from_the_environment():
    """FLASHKD_CPU_16BIT_GEMM sets the choice a process starts with; a bad value is an
    error naming the variable."""
    code = "import torch, flashkd; print(torch.ops.flashkd.cpu_16bit_gemm())"

    def start(value):
        env = dict(os.environ, FLASHKD_CPU_16BIT_GEMM=value)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    assert start("float32").stdout.strip() == "float32"
    bad = start("fp32")
    assert bad.returncode != 0
    assert "FLASHKD_CPU_16BIT_GEMM=fp32: CPU 16-bit GEMM must be auto, float32 or native" in bad.stderr


# ----------------------------------------------------------------------------- 6. workspace


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
