"""What the tests of flashkd.linear_cross_entropy (tests/test_linear_cross_entropy*.py,
tests/test_cpu_16bit_heads.py) share: inputs, runs of the kernel, the float64 oracle and
plain torch, the op's argument list, and the tolerance model (DESIGN.md sections 2, 3 and 5).

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

import torch
import torch.nn.functional as F

import flashkd
from flashkd import reference as R
from flashkd._ops import LINEAR_LOSS_ARGS

from checks import loss_options, scalar_objective, token_factors
from linear_tolerance import EPS32, K_FLOOR, SLACK, UNIT, check_close, max_err, product_magnitudes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
