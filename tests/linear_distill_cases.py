"""What the tests of flashkd.linear_distill_loss (tests/test_linear_distill*.py) share:
inputs, runs of the kernel, the float64 oracle and plain torch, the op's argument list,
and the tolerance model. The op fuses the student head (and, when given as weights,
the teacher head) with the distillation loss, chunk by chunk, so that neither
[tokens x vocab] logit matrix exists (DESIGN.md sections 2, 3, 5).

How results are judged (as in linear_ce_cases.py)
-------------------------------------------------
Each case runs the kernel (most cases with a tiny chunk_budget_bytes forcing
many chunks, the last one partial), the float64 oracle
flashkd.reference.linear_distill_loss on float64 copies of the same inputs, and
plain torch: F.linear in the inputs' dtype, then reference.distill_loss on those
logits (float32 math for fp32/bf16 logits, torch autograd back through the
bf16/fp32 matmul) - what a user writes without flashkd. For each output (loss,
every statistic, d hidden, d weight, d bias of the student)

    max|kernel - oracle| <= SLACK * max|plain - oracle| + floor,
    floor = (K_FLOOR * EPS32 * (sqrt(D + V) + S) + u) * max|oracle|,

S the largest spread (max - min) of a row of logits / min(T, 1): a dot product of
length D and a sum of V terms carry about sqrt(length) units of float32
roundoff, a log-probability z - LSE about EPS32 * S absolutely (rkl, srkl, jsd
multiply log-ratios into the gradient). SLACK = 2 for a different summation
order. u is the unit roundoff of the dtype a gradient is stored in (2^-8 for
bf16): one rounding of the largest element to that dtype, which neither the
kernel nor torch can avoid and in which torch may be luckier on a given case.
In bf16 both the kernel and plain
torch round the logits and gradients to bf16 and the first term dominates.

Two more terms, for what a maximum over the tensor does not see:
  * a gradient element is a dot product (d hidden = G @ W, d weight = G^T h, d bias =
    sum G, G = d objective / d logits) and keeps the noise of its products however much
    it cancels: each element is also allowed K_TERMS (noise + u) times the sum of the
    magnitudes of its products, with |G_tj| + c_t P_tj for G (P_tj the largest probability at that
    logit, c_t the token's gradient coefficient: an element q_j (x_j - sum_k q_k x_k)
    carries float32 noise of order q_j however much its bracket cancels);
  * in bf16 the loss and statistics may also move by SLACK times as much as rounding the
    logits to bf16 moves the oracle's (torch rounds its loss to bf16 as well, so on a few
    tokens its error is a matter of luck).
The loss's scale is at least the sum of the per-token coefficients (soft_weight (T^2) +
hard_weight, token weights, mean divisor): the divergences are sums of terms of order 1.
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

DIVS = flashkd.DIVERGENCES
STAT_KEYS = ("divergence", "student_entropy", "teacher_entropy", "student_logprob", "teacher_logprob")


# ----------------------------------------------------------------------------- inputs


def make_inputs(device, *, lead=(2, 7), V=37, Vt=45, Ds=24, Dt=40, dtype=torch.float32, tdtype=None,
                teacher="weights", sbias=False, tbias=False, labels=True, ignore=0.0, label_vocab=None,
                ignore_index=-100, weights=False, scale=3.0, seed=0):
    """Student hidden (lead..., Ds), weight (V, Ds) [+ bias]; the teacher as hidden
    (lead..., Dt) + weight (Vt, Dt) [+ bias], or as logits (lead..., Vt) in `tdtype`."""
    tdtype = tdtype or dtype
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, Ds, generator=g)
    W = torch.randn(V, Ds, generator=g) * (scale / math.sqrt(Ds))
    b = torch.randn(V, generator=g) if sbias else None
    th = torch.randn(*lead, Dt, generator=g)
    tW = torch.randn(Vt, Dt, generator=g) * (scale / math.sqrt(Dt))
    tb = torch.randn(Vt, generator=g) if tbias else None
    y = torch.randint(0, label_vocab or V, lead, generator=g) if labels else None
    if labels and ignore:
        y[torch.rand(lead, generator=g) < ignore] = ignore_index
    w = (torch.rand(lead, generator=g) * 1.5 + 0.25) if weights else None
    cast = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)
    inp = dict(h=cast(h, dtype), W=cast(W, dtype), b=cast(b, dtype), th=None, tW=None, tb=None, tl=None,
               y=None if y is None else y.to(device), weights=cast(w, torch.float32))
    if teacher == "weights":
        inp.update(th=cast(th, tdtype), tW=cast(tW, tdtype), tb=cast(tb, tdtype))
    else:
        tl = F.linear(th, tW, tb) + 0.5 * torch.randn(*lead, Vt, generator=g)
        inp["tl"] = cast(tl, tdtype)
    return inp


def rows_budget(inp, rows):
    """chunk_budget_bytes fitting `rows` rows of logits: the glue counts, per row, V
    elements of the student's dtype plus V of a computed teacher's dtype (4 more bytes
    per element when float64 teacher logits are converted per chunk)."""
    V = inp["W"].shape[0]
    per = inp["h"].element_size()
    if inp["th"] is not None:
        per += inp["th"].element_size()
    if inp["tl"] is not None and inp["tl"].dtype == torch.float64:
        per += 4
    return int(rows * V * per)


def plain_distill(h, W, th=None, tW=None, *, teacher_logits=None, student_bias=None, teacher_bias=None,
                  softcap=None, shift=False, chunk_budget_bytes=None, labels=None, ignore_index=-100, **opts):
    """Plain torch: logits by F.linear in the inputs' dtype, then the loss (reference
    formulas, float32 math for fp32/bf16/fp16 logits)."""
    zs = R.soft_cap(F.linear(h, W, student_bias), softcap)
    V = zs.shape[-1]
    zt = F.linear(th, tW, teacher_bias)[..., :V] if teacher_logits is None else teacher_logits[..., :V]
    if zt.dtype == torch.float64:
        zt = zt.float()
    if shift and labels is not None:
        shifted = torch.full_like(labels, ignore_index)
        shifted[..., :-1] = labels[..., 1:]
        labels = shifted
    return R.distill_loss(zs, zt, labels=labels, ignore_index=ignore_index, **opts)


def run(impl, inp, *, dtype=None, requires=("h", "W", "b"), view=None, seed=1, **kw):
    """Forward + backward on copies of the inputs (cast to `dtype`: float64 for the oracle,
    teacher included). Cotangent: 1.75 for a scalar loss, random per token for "none".
    Returns loss, stats, student gradients (float64)."""
    cast = lambda t: None if t is None else (t.detach().clone() if dtype is None else t.detach().to(dtype))
    leaves = {k: None if inp[k] is None else cast(inp[k]).requires_grad_(k in requires) for k in ("h", "W", "b")}
    h = leaves["h"] if view is None else view(leaves["h"])
    out = impl(h, leaves["W"], cast(inp["th"]), cast(inp["tW"]), teacher_logits=cast(inp["tl"]),
               student_bias=leaves["b"], teacher_bias=cast(inp["tb"]), labels=inp["y"], weights=inp["weights"],
               **kw)
    loss, stats = out if kw.get("return_stats") else (out, None)
    g = torch.Generator().manual_seed(seed)
    obj = scalar_objective(loss, g)
    grads = {}
    if obj.requires_grad:
        obj.backward()
        grads = {k: None if (t is None or t.grad is None) else t.grad.double() for k, t in leaves.items()}
    if stats is not None:
        stats = {k: v.detach() for k, v in stats.items()}
    return loss.detach().double(), stats, grads


def student_input(inp, view):
    return inp["h"] if view is None else view(inp["h"])


def oracle_from_logits(zs, zt, inp, kw, seed=1):
    """The float64 oracle's loss (and stats) on given student logits zs (pre-cap, float64,
    made a leaf here) and teacher logits zt; with the objective of `run`, its gradient
    lands in zs.grad (d objective / d student logits)."""
    zs = zs.detach().double().requires_grad_()
    eye = torch.eye(zs.shape[-1], dtype=torch.float64, device=zs.device)
    out = R.linear_distill_loss(zs, eye, teacher_logits=zt.double(), labels=inp["y"], weights=inp["weights"], **kw)
    loss, stats = out if kw.get("return_stats") else (out, None)
    scalar_objective(loss, torch.Generator().manual_seed(seed)).backward()
    return loss.detach(), stats, zs


def token_coefficients(inp, kw, view=None, seed=1):
    """Per token, what multiplies a divergence or cross-entropy term of order 1: in the
    loss (soft_weight (T^2) + hard_weight, token weight, mean divisor), and in the
    gradient of `run`'s objective (the same with soft_weight (T^2) / T, times the
    objective's cotangent)."""
    lead = tuple(student_input(inp, view).shape[:-1])
    opts = loss_options(inp["y"], inp["weights"], kw)
    T = kw.get("temperature", 1.0)
    soft = kw.get("soft_weight", 1.0) * (T * T if kw.get("t2_scaling") else 1.0)
    hard = kw.get("hard_weight", 0.0)
    loss_c, red = token_factors(lead, opts, soft, hard)
    grad_c, _ = token_factors(lead, opts, soft / T, hard)
    probe = torch.zeros(lead if red == "none" else (), dtype=torch.float64, requires_grad=True)
    scalar_objective(probe, torch.Generator().manual_seed(seed)).backward()
    return loss_c, grad_c * probe.grad.abs()


def grad_terms(inp, view, kw, logits, grad_coef):
    """Per element of d hidden, d weight, d bias: the magnitudes of the products it is
    summed from, M @ |W|, M^T |h| and sum M, where M = |G| + c_t P_tj: G the oracle's
    d objective / d logits, P_tj the largest probability at that logit (student and
    teacher at T, student at T = 1, TAID's mixture) and c_t the token's gradient
    coefficient (`grad_coef`, of token_coefficients). An element q_j (x_j - sum_k q_k x_k)
    carries float32 noise of order q_j however much its bracket cancels; a dot product,
    noise relative to the sum of its products' magnitudes. In the leaves' layouts
    (through the view's autograd). `logits`: oracle_logits of the case."""
    G = oracle_from_logits(*logits, inp, kw)[2].grad.abs()
    capped, zt = used_logits(logits, kw)
    T = kw.get("temperature", 1.0)
    probs = [torch.softmax(capped / T, -1), torch.softmax(zt / T, -1), torch.softmax(capped, -1)]
    if kw.get("taid_lambda") is not None:
        probs.append(torch.softmax(R.taid_logit(capped / T, zt / T, kw["taid_lambda"]), -1))
    P = torch.stack(probs).amax(0)
    M = G.clone()
    M[..., :P.shape[-1]] += grad_coef.to(M.device).unsqueeze(-1) * P
    return product_magnitudes(inp, view, M)


def oracle_on_rounded_logits(inp, view, kw):
    """The float64 oracle's loss and stats on the logits rounded as native 16-bit GEMMs
    round them (to the student's / the computed teacher's dtype), and those logits
    (float64; the student's before the soft cap)."""
    zs = F.linear(student_input(inp, view), inp["W"], inp["b"])
    zt = F.linear(inp["th"], inp["tW"], inp["tb"]) if inp["tl"] is None else inp["tl"]
    loss, stats, _ = oracle_from_logits(zs, zt, inp, kw)
    return loss, stats, zs.double(), zt.double()


def oracle_logits(inp, view):
    """The float64 logits, formed once per case: the student's before the soft cap
    (all V columns) and the teacher's (all Vt)."""
    zs = R.head_logits(student_input(inp, view), inp["W"], inp["b"], torch.float64)
    zt = R.head_logits(inp["th"], inp["tW"], inp["tb"], torch.float64) if inp["tl"] is None else inp["tl"].double()
    return zs, zt


def used_logits(logits, kw):
    """The student's capped logits and the teacher's over the used vocabulary, from
    oracle_logits: what the tolerance and the argmax check look at."""
    zs = R.soft_cap(logits[0], kw.get("softcap"))
    V = kw.get("vocab_size") or zs.shape[-1]
    return zs[..., :V], logits[1][..., :V]


def logit_spread(used, kw):
    """Largest max - min of a row of logits, at the scale the log-probabilities are formed
    (/ T, and at T = 1 for the hard loss): a log-probability z - LSE carries an absolute
    float32 error of about EPS32 times that, and divergences such as rkl multiply it into
    the gradient (q_j (log q_j - log p_j - KL))."""
    worst = 0.0
    for z in used:
        if z.numel():
            worst = max(worst, (z.amax(-1) - z.amin(-1)).max().item())
    return worst / min(kw.get("temperature", 1.0), 1.0)


def top2_gap(z):
    top = z.topk(2, -1).values if z.shape[-1] > 1 else torch.cat([z, z - math.inf], -1)
    return top[..., 0] - top[..., 1]


def check_case(device, *, budget_rows=3.5, requires=("h", "W", "b"), view=None, make=None, inp=None, **kw):
    """Kernel vs oracle vs plain torch (module docstring); returns the three results."""
    keys = ("lead", "V", "Vt", "Ds", "Dt", "dtype", "tdtype", "teacher", "sbias", "tbias", "labels", "ignore",
            "label_vocab", "weights", "scale", "seed")
    mk = {k: kw.pop(k) for k in keys if k in kw}
    if "ignore_index" in kw:
        mk["ignore_index"] = kw["ignore_index"]
    if inp is None:
        inp = make_inputs(device, **mk)
    if make is not None:
        inp = make(inp)
    budget = None if budget_rows is None else rows_budget(inp, budget_rows)
    kern = run(flashkd.linear_distill_loss, inp, requires=requires, view=view, chunk_budget_bytes=budget, **kw)
    oracle = run(R.linear_distill_loss, inp, dtype=torch.float64, requires=requires, view=view, **kw)
    plain = run(plain_distill, inp, requires=requires, view=view, **kw)
    V, D = inp["W"].shape
    logits = oracle_logits(inp, view)
    used = used_logits(logits, kw)
    noise = K_FLOOR * EPS32 * (math.sqrt(D + V) + logit_spread(used, kw))
    # bf16: the loss and statistics may move as far as rounding the logits moves the oracle's
    low = inp["h"].dtype != torch.float32
    rounded = oracle_on_rounded_logits(inp, view, kw) if low else None

    def rounding_shift(r, o):
        return SLACK * max_err(r, o) if low else 0.0

    loss_c, grad_c = token_coefficients(inp, kw, view)
    loss_scale = loss_c.amax().item() if kw.get("reduction") == "none" and loss_c.numel() else loss_c.sum().item()
    check_close("loss", kern[0], oracle[0], plain[0], noise, min_scale=max(1.0, loss_scale),
                extra=rounding_shift(rounded and rounded[0], oracle[0]))
    terms = grad_terms(inp, view, kw, logits, grad_c)
    for k in ("h", "W", "b"):
        o = oracle[2].get(k)
        if o is None:
            assert kern[2].get(k) is None, f"grad {k}: kernel gave a gradient where the oracle has none"
        else:
            check_close("grad " + k, kern[2].get(k), o, plain[2][k], noise, unit=UNIT[inp["h"].dtype], terms=terms[k])
    if kw.get("return_stats"):
        ks, os_, ps = kern[1], oracle[1], plain[1]
        assert set(ks) == set(STAT_KEYS) | {"agree"}, sorted(ks)
        for k in STAT_KEYS:
            assert ks[k].dtype == torch.float32, f"stat {k}: dtype {ks[k].dtype}"
            check_close("stat " + k, ks[k].double(), os_[k].double(), ps[k].double(), noise, min_scale=1.0,
                        extra=rounding_shift(rounded and rounded[1][k], os_[k]))
        # argmax agreement: exact wherever the top-2 margins of the logits the kernel
        # may see are not within float32 noise. In bf16 those are the logits as a
        # native 16-bit GEMM rounds them, or (CPU "float32" GEMM mode) unrounded, so
        # both margins must be clear: there the two argmaxes are the same.
        zs, zt = used
        clear = (top2_gap(zs) > 1e-3) & (top2_gap(zt) > 1e-3)
        if low:
            zs_r, zt_r = R.soft_cap(rounded[2], kw.get("softcap"))[..., :zs.shape[-1]], rounded[3][..., :zs.shape[-1]]
            clear &= (top2_gap(zs_r) > 1e-3) & (top2_gap(zt_r) > 1e-3)
        agree = os_["agree"]
        assert ks["agree"].dtype == torch.bool and ks["agree"].shape == agree.shape
        assert torch.equal(ks["agree"][clear], agree[clear]), "argmax agreement differs from the oracle"
    return kern, oracle, plain


def op_args(inp, *, divergence="fkl", reduction="mean", grad_mask=7, return_stats=False, budget=None, **opts):
    a = dict.fromkeys(LINEAR_LOSS_ARGS)
    rg = lambda t, bit: None if t is None else t.detach().clone().requires_grad_(bool(grad_mask & bit))
    a.update(hidden=rg(inp["h"], 1), weight=rg(inp["W"], 2), bias=rg(inp["b"], 4), teacher_hidden=inp["th"],
             teacher_weight=inp["tW"], teacher_bias=inp["tb"], teacher_logits=inp["tl"], labels=inp["y"],
             weights=inp["weights"], divergence=divergence, temperature=1.5, beta=0.5, alpha=0.1, taid_lambda=None,
             ignore_index=-100, hard_weight=0.3, soft_weight=1.0, t2_scaling=True, vocab_size=None,
             label_smoothing=0.0, z_loss=0.0, softcap=None, reduction=reduction, num_items=None,
             return_stats=return_stats, return_lse=False, grad_mask=grad_mask, row_scale=None,
             chunk_budget_bytes=budget, float32_weight_grad=True)
    a.update(opts)
    return tuple(a[k] for k in LINEAR_LOSS_ARGS)
