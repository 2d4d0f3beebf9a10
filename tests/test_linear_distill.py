"""Tests of flashkd.linear_distill_loss: the student head (and, when given as
weights, the teacher head) fused with the distillation loss, chunk by chunk, so
that neither [tokens x vocab] logit matrix exists (DESIGN.md sections 2, 3, 5).

How results are judged (as in test_linear_cross_entropy.py)
---------------------------------------------------------
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
import random

import pytest
import torch
import torch.nn.functional as F

import flashkd
from flashkd import reference as R
from flashkd._ops import LINEAR_LOSS_ARGS

import memory
from checks import (CPU_16BIT_GEMMS, DIV_KW, RANDOM_CASES, assert_compile_matches_eager, cpu_16bit_gemm,
                    directional_check, loss_options, random_lead, scalar_objective, token_factors)
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


# ----------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("div", DIVS)
def test_teacher_weights(div, device):
    """Teacher as hidden + weight: Ds != Dt, larger teacher vocabulary, both biases,
    labels with ignored tokens and a hard loss, T != 1 with T^2 scaling, many chunks."""
    check_case(device, divergence=div, **DIV_KW[div], sbias=True, tbias=True, ignore=0.25, hard_weight=0.5,
               temperature=2.0, t2_scaling=True)


@pytest.mark.parametrize("div", DIVS)
def test_teacher_logits(div, device):
    """Teacher as precomputed bf16 logits with a larger vocabulary; per-token weights,
    reduction none, shift, ignored labels, hard + soft weights, T < 1."""
    check_case(device, divergence=div, **DIV_KW[div], teacher="logits", tdtype=torch.bfloat16, sbias=True,
               ignore=0.25, weights=True, reduction="none", shift=True, hard_weight=0.3, soft_weight=0.7,
               temperature=0.7)


@pytest.mark.parametrize("teacher", ["weights", "logits"])
@pytest.mark.parametrize("div", DIVS)
def test_return_stats_and_vocab_size(div, teacher, device):
    """return_stats against the oracle's statistics, with a padded vocabulary: columns
    >= vocab_size are excluded from both softmaxes, and their weight rows get exactly 0."""
    kern, _, _ = check_case(device, divergence=div, **DIV_KW[div], teacher=teacher, V=37, Vt=40,
                            label_vocab=30, vocab_size=30, ignore=0.2, hard_weight=0.2, reduction="sum",
                            return_stats=True, sbias=True, tbias=teacher == "weights")
    assert torch.equal(kern[2]["W"][30:], torch.zeros_like(kern[2]["W"][30:]))
    assert torch.equal(kern[2]["b"][30:], torch.zeros_like(kern[2]["b"][30:]))


@pytest.mark.parametrize("teacher", ["weights", "logits"])
@pytest.mark.parametrize("div", DIVS)
def test_bf16(div, teacher, device, cpu_gemm_mode):
    """bf16 student and teacher (weights or logits): error no worse than plain torch's."""
    check_case(device, divergence=div, **DIV_KW[div], teacher=teacher, dtype=torch.bfloat16, lead=(4, 12),
               V=300, Vt=310, Ds=64, Dt=48, sbias=True, ignore=0.2, hard_weight=0.3, budget_rows=7.5)


@pytest.mark.parametrize("div", ["fkl", "jsd"])
def test_fp16(div, device, cpu_gemm_mode):
    check_case(device, divergence=div, **DIV_KW[div], dtype=torch.float16, lead=(4, 12), V=300, Vt=310, Ds=64,
               Dt=48, ignore=0.2, hard_weight=0.3, budget_rows=7.5)


@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64, torch.float16])
def test_teacher_logits_dtypes(tdtype, device):
    """Teacher logits of any float dtype with a float32 student (float64 ones are converted
    per chunk)."""
    check_case(device, divergence="jsd", teacher="logits", tdtype=tdtype, ignore=0.2, hard_weight=0.5)


@pytest.mark.parametrize("labels", ["labels", "no_labels"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("div", ["fkl", "tvd", "taid"])
def test_reductions(div, reduction, labels, device):
    """mean divides by the non-ignored tokens (all tokens without labels)."""
    check_case(device, divergence=div, **DIV_KW[div], reduction=reduction, labels=labels == "labels",
               ignore=0.3, weights=True)


@pytest.mark.parametrize("div", DIVS)
def test_num_items(div, device):
    check_case(device, divergence=div, **DIV_KW[div], num_items=23.0, ignore=0.3, weights=True, hard_weight=0.4)


@pytest.mark.parametrize("teacher", ["weights", "logits"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_taid_lambda_edges(lam, teacher, device):
    """lambda = 0: r = q, the divergence and its gradient vanish (the hard loss gives the
    gradient its scale); lambda = 1: KL(p || q), i.e. fkl."""
    check_case(device, divergence="taid", taid_lambda=lam, teacher=teacher, temperature=1.5, ignore=0.2,
               hard_weight=0.4)


@pytest.mark.parametrize("div,kw", [("skl", {"alpha": 0.0}), ("srkl", {"alpha": 0.0}), ("jsd", {"beta": 0.9}),
                                    ("skl", {"alpha": 0.9})])
def test_divergence_parameters(div, kw, device):
    check_case(device, divergence=div, **kw, sbias=True, ignore=0.2)


@pytest.mark.parametrize("div", DIVS)
def test_softcap_and_shift(div, device):
    """softcap applies to the student logits only; shift moves the labels only."""
    check_case(device, divergence=div, **DIV_KW[div], softcap=4.0, scale=6.0, shift=True, ignore=0.2,
               hard_weight=0.5, teacher="weights", tbias=True)


SHAPES = {
    "N1": dict(lead=(1,), V=37, Vt=37),
    "no_lead": dict(lead=(), V=37, Vt=40),
    "V1": dict(lead=(5,), V=1, Vt=2),
    "V3": dict(lead=(5,), V=3, Vt=3),
    "lead3": dict(lead=(2, 3, 4), V=29, Vt=31),
    "V50257": dict(lead=(5,), V=50257, Vt=50260, Ds=8, Dt=12),
}


@pytest.mark.parametrize("teacher", ["weights", "logits"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes(shape, teacher, device):
    check_case(device, divergence="jsd", teacher=teacher, hard_weight=0.5, ignore=0.2, **SHAPES[shape])


@pytest.mark.parametrize("div", DIVS)
def test_requires_grad_subsets(div, device):
    for requires in (("h",), ("W",), ("b",), ("h", "b")):
        check_case(device, divergence=div, **DIV_KW[div], sbias=True, requires=requires, ignore=0.2)


LAYOUTS = {
    "student_transposed": dict(
        make=lambda inp: dict(inp, h=inp["h"].transpose(0, 1).contiguous()), view=lambda x: x.transpose(0, 1)),
    "teacher_hidden_sliced": dict(make=lambda inp: dict(inp, th=torch.cat([inp["th"], inp["th"]], -1)[..., 3:43])),
    "teacher_weight_colmajor": dict(make=lambda inp: dict(inp, tW=inp["tW"].t().contiguous().t())),
    "teacher_hidden_transposed": dict(make=lambda inp: dict(inp, th=inp["th"].transpose(0, 1).contiguous()
                                                            .transpose(0, 1))),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_noncontiguous(layout, device):
    lay = LAYOUTS[layout]
    check_case(device, divergence="fkl", make=lay["make"], view=lay.get("view"), ignore=0.2, hard_weight=0.3,
               sbias=True, tbias=True)


@pytest.mark.parametrize("div", ["fkl", "srkl"])
def test_noncontiguous_teacher_logits(div, device):
    def make(inp):
        tl = inp["tl"]
        return dict(inp, tl=tl.transpose(0, 1).contiguous().transpose(0, 1))  # strided leading dims
    check_case(device, divergence=div, **DIV_KW[div], teacher="logits", make=make, ignore=0.2)


# ----------------------------------------------------------------------------- random option combinations

# The tests above vary a few options at a time. Here each case draws all of them at once
# (divergence and parameter, teacher as weights or logits of any dtype, Ds != Dt, a larger
# teacher vocabulary, biases, labels with any ignore_index, hard/soft weights, token
# weights, reductions, shift, vocab_size, statistics, soft cap, chunk budget, which
# student tensors need gradients) from a generator seeded by the case number
# (checks.RANDOM_CASES cases; 12000 passed on the CPU). In float32 anything goes,
# vocabularies and hidden sizes of 1 and taid_lambda = 0 included (their gradients
# cancel to ~0, held to the per-element floor of grad_terms). bf16 is drawn only with
# >= 32 tokens, V >= 100 and hidden sizes >= 8, and not for tvd: there its logits'
# rounding (2^-8 relative) moves the gradient by more than float32 noise, and on a few
# tokens "no worse than plain torch" is decided by which logits round luckily (tvd's
# gradient, a sign per element, flips where rounding moves p_j - q_j across 0).


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_random_option_combinations(case, device):
    rng = random.Random(f"linear_distill-{case}")
    div = rng.choice(DIVS)
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16] if div != "tvd" else [torch.float32])
    low = dtype != torch.float32
    lead = random_lead(rng, low)
    V = rng.choice([100, 513] if low else [1, 2, 3, 17, 37, 100, 513])
    kw = dict(divergence=div, lead=lead, V=V, Vt=V + rng.choice([0, 0, 1, 8]),
              Ds=rng.choice([8, 24] if low else [1, 3, 8, 24]), Dt=rng.choice([16, 40] if low else [1, 5, 16, 40]),
              dtype=dtype, teacher=rng.choice(["weights", "logits"]),
              sbias=rng.random() < 0.4, tbias=rng.random() < 0.4, labels=rng.random() < 0.6,
              ignore=rng.choice([0.0, 0.3, 1.0]), weights=rng.random() < 0.3, scale=rng.choice([1.0, 3.0, 8.0]),
              seed=case, reduction=rng.choice(["none", "sum", "mean", "batchmean"]),
              t2_scaling=rng.random() < 0.3, return_stats=rng.random() < 0.3,
              budget_rows=rng.choice([None, 0.5, 1, 2.5, 7]))
    if kw["teacher"] == "logits" and rng.random() < 0.5:
        kw["tdtype"] = rng.choice([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    if div == "jsd":
        kw["beta"] = rng.choice([0.5, 0.1, 0.9])
    if div in ("skl", "srkl"):
        kw["alpha"] = rng.choice([0.1, 0.0, 0.5])
    if div == "taid":
        kw["taid_lambda"] = rng.choice([0.0, 0.1, 1.0, 0.4])
    if rng.random() < 0.5:
        kw["temperature"] = rng.choice([0.5, 2.0, 3.7])
    if rng.random() < 0.3:
        kw["soft_weight"] = rng.choice([0.0, 0.5, 2.0])
    if kw["labels"]:
        kw["shift"] = rng.random() < 0.3  # shift moves the labels: it needs them
        if rng.random() < 0.6:
            kw["hard_weight"] = rng.choice([0.5, 1.0])
        if rng.random() < 0.3:
            kw["ignore_index"] = rng.choice([-1, 0])  # a valid class too: its labels are then ignored
    if rng.random() < 0.3:
        kw["softcap"] = rng.choice([4.0, 30.0])
    if kw["reduction"] != "none" and rng.random() < 0.3:
        kw["num_items"] = rng.choice([1.0, 7.0])
    if rng.random() < 0.3:
        kw["vocab_size"] = kw["label_vocab"] = rng.randint(1, V)
    if rng.random() < 0.2:
        kw["requires"] = rng.choice([("h",), ("W",), ("W", "b"), ("b",)])
    with cpu_16bit_gemm(rng.choice(CPU_16BIT_GEMMS)):
        check_case(device, **kw)


# ----------------------------------------------------------------------------- special values


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


# ----------------------------------------------------------------------------- finite differences


# Finite-difference gradient checks (see checks.directional_check). tvd is not
# differentiable where p_j = q_j: its directions are kept small enough (eps 1e-3) that
# few entries cross, with a correspondingly larger rounding term.
@pytest.mark.parametrize("teacher", ["weights", "logits"])
@pytest.mark.parametrize("div", DIVS)
def test_gradcheck_linear_distill(div, teacher, device):
    inp = make_inputs(device, lead=(2, 6), V=23, Vt=25, Ds=12, Dt=10, teacher=teacher, sbias=True, tbias=True,
                      ignore=0.2, weights=True)
    budget = rows_budget(inp, 2.5)

    def f(h, W, b):
        return flashkd.linear_distill_loss(h, W, inp["th"], inp["tW"], teacher_logits=inp["tl"], student_bias=b,
                                           teacher_bias=inp["tb"], labels=inp["y"], weights=inp["weights"],
                                           hard_weight=0.3, temperature=1.5, divergence=div, **DIV_KW[div],
                                           chunk_budget_bytes=budget)

    params = [inp["h"], inp["W"], inp["b"]]
    if div == "taid":
        # TAID's target r = softmax(((1 - l) stopgrad(z_s) + l z_t) / T) is a constant for
        # the gradient but moves with the student in the forward, so a finite difference of
        # the forward is not its gradient. At the point x, its gradient is that of fkl
        # against the teacher logits (1 - l) z_s(x) + l z_t frozen there: check the TAID
        # gradient against finite differences of that function (and the values agree at x).
        lam = DIV_KW["taid"]["taid_lambda"]
        with torch.no_grad():
            zs = F.linear(inp["h"], inp["W"], inp["b"])
            zt = F.linear(inp["th"], inp["tW"], inp["tb"]) if inp["tl"] is None else inp["tl"]
            zr = (1 - lam) * zs + lam * zt[..., :zs.shape[-1]]

        def frozen(h, W, b):
            return flashkd.linear_distill_loss(h, W, teacher_logits=zr, student_bias=b, labels=inp["y"],
                                               weights=inp["weights"], hard_weight=0.3, temperature=1.5,
                                               divergence="fkl", chunk_budget_bytes=budget)

        torch.testing.assert_close(f(*params), frozen(*params), rtol=1e-5, atol=1e-6)
        directional_check(frozen, params, device, eps=1e-2, analytic_from=f)
    else:
        directional_check(f, params, device, eps=1e-3 if div == "tvd" else 1e-2)


# ----------------------------------------------------------------------------- opcheck, compile


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


OPCHECK_CASES = {
    "weights_mean_stats_mask7": dict(teacher="weights", sbias=True, tbias=True, op=dict(
        divergence="jsd", reduction="mean", grad_mask=7, return_stats=True)),
    "logits_none_mask3": dict(teacher="logits", op=dict(divergence="taid", taid_lambda=0.3, reduction="none",
                                                        grad_mask=3, vocab_size=30)),
    "weights_sum_mask7_bias": dict(teacher="weights", sbias=True, op=dict(divergence="tvd", reduction="sum",
                                                                          grad_mask=7)),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, device):
    c = dict(OPCHECK_CASES[case])
    op = c.pop("op")
    inp = make_inputs(device, lead=(2, 5), V=37, Vt=41, Ds=8, Dt=6, ignore=0.2, weights=True, label_vocab=30, **c)
    args = op_args(inp, budget=rows_budget(inp, 3.5), **op)
    torch.library.opcheck(torch.ops.flashkd.linear_loss.default, args)


# (torch.compile(fullgraph=True) of a function calling both linear_cross_entropy and
# linear_distill_loss is test_linear_cross_entropy.py::test_compile_fullgraph.)
@pytest.mark.parametrize("teacher", ["logits"])
def test_compile_fullgraph_teacher_logits(teacher, device):
    inp = make_inputs(device, teacher=teacher, sbias=True, ignore=0.2, weights=True)
    budget = rows_budget(inp, 3.5)

    def f(h, W, b):
        loss, stats = flashkd.linear_distill_loss(h, W, teacher_logits=inp["tl"], student_bias=b, labels=inp["y"],
                                                  weights=inp["weights"], divergence="skl", shift=True,
                                                  hard_weight=0.2, return_stats=True, chunk_budget_bytes=budget)
        return loss, stats["divergence"]

    assert_compile_matches_eager(f, lambda: [inp[k].clone().requires_grad_() for k in ("h", "W", "b")], scale=1.3)


# ----------------------------------------------------------------------------- bad inputs


def _bad(device):
    inp = make_inputs(device, lead=(4,), V=10, Vt=12, Ds=8, Dt=6)
    h, W, th, tW = inp["h"], inp["W"], inp["th"], inp["tW"]
    tl = torch.randn(4, 12, device=device)
    f = flashkd.linear_distill_loss
    return {
        "student_D": (lambda: f(h, W[:, :7], th, tW), ValueError,
                      r"student_weight has D=7 but student_hidden has D=8"),
        "student_hidden_int": (lambda: f(h.long(), W, th, tW), TypeError, r"^student_hidden must be float32"),
        "student_weight_dtype": (lambda: f(h, W.double(), th, tW), TypeError,
                                 r"^student_weight dtype Double differs from student_hidden"),
        "student_weight_meta": (lambda: f(h, W.to("meta"), th, tW), ValueError,
                                r"^student_weight must be on the device of student_hidden"),
        "student_bias_shape": (lambda: f(h, W, th, tW, student_bias=torch.zeros(5, device=device)), ValueError,
                               r"^student_bias must have shape \(10,\)"),
        "student_bias_type": (lambda: f(h, W, th, tW, student_bias=[0.0] * 10), TypeError,
                              r"^student_bias must be a torch.Tensor"),
        "teacher_logits_meta": (lambda: f(h, W, teacher_logits=tl.to("meta")), ValueError,
                                r"^teacher_logits must be on the device of student_hidden"),
        "teacher_D": (lambda: f(h, W, th, tW[:, :5]), ValueError,
                      r"teacher_weight has D=5 but teacher_hidden has D=6"),
        "both_teachers": (lambda: f(h, W, th, tW, teacher_logits=tl), ValueError,
                          r"teacher_hidden \+ teacher_weight or as teacher_logits, not both"),
        "no_teacher": (lambda: f(h, W), ValueError, r"teacher_hidden \+ teacher_weight, or as teacher_logits"),
        "teacher_hidden_only": (lambda: f(h, W, th), ValueError, r"teacher_hidden \+ teacher_weight"),
        "teacher_weight_vocab": (lambda: f(h, W, th, tW[:9]), ValueError,
                                 r"teacher_weight has a vocabulary of 9, smaller than the student's 10"),
        "teacher_logits_vocab": (lambda: f(h, W, teacher_logits=tl[:, :9]), ValueError,
                                 r"teacher_logits has a vocabulary of 9, smaller than the student's 10"),
        "teacher_hidden_lead": (lambda: f(h, W, th[:3], tW), ValueError,
                                r"teacher_hidden must have the leading shape"),
        "teacher_logits_lead": (lambda: f(h, W, teacher_logits=tl[:3]), ValueError,
                                r"teacher_logits must have shape"),
        "teacher_logits_int": (lambda: f(h, W, teacher_logits=tl.long()), TypeError,
                               r"teacher_logits must be a float tensor"),
        "teacher_weight_dtype": (lambda: f(h, W, th, tW.bfloat16()), TypeError, r"teacher_weight dtype"),
        "teacher_bias_shape": (lambda: f(h, W, th, tW, teacher_bias=torch.zeros(5, device=device)), ValueError,
                               r"teacher_bias must have shape"),
        "student_weight_3d": (lambda: f(h, W.unsqueeze(0), th, tW), ValueError, r"^student_weight must be 2-D"),
        "labels_range": (lambda: f(h, W, th, tW, labels=torch.tensor([0, 1, 2, 10], device=device)), ValueError,
                         r"labels must be in \[0, 10\)"),
        "labels_float": (lambda: f(h, W, th, tW, labels=torch.zeros(4, device=device)), TypeError,
                         r"labels must be an integer tensor"),
        "labels_shape": (lambda: f(h, W, th, tW, labels=torch.zeros(5, dtype=torch.long, device=device)),
                         ValueError, r"labels must have shape \[4\] \(student_hidden without its last dim\)"),
        "vocab_size": (lambda: f(h, W, th, tW, vocab_size=11), ValueError, r"vocab_size must be in \[1, 10\]"),
        "divergence": (lambda: f(h, W, th, tW, divergence="kl"), ValueError, r"divergence must be one of"),
        "taid_no_lambda": (lambda: f(h, W, th, tW, divergence="taid"), ValueError, r"taid_lambda"),
        "jsd_beta": (lambda: f(h, W, th, tW, divergence="jsd", beta=1.0), ValueError, r"fkl|rkl"),
        "temperature": (lambda: f(h, W, th, tW, temperature=0.0), ValueError, r"temperature must be > 0"),
        "hard_without_labels": (lambda: f(h, W, th, tW, hard_weight=1.0), ValueError,
                                r"hard_weight > 0 needs labels"),
        "shift_without_labels": (lambda: f(h, W, th, tW, shift=True), ValueError, r"shift=True needs labels"),
    }


@pytest.mark.parametrize("case", list(_bad("cpu")))
def test_bad_inputs(case, device):
    fn, exc, pattern = _bad(device)[case]
    with pytest.raises(exc, match=pattern):
        fn()


# ----------------------------------------------------------------------------- workspace


@pytest.mark.parametrize("teacher", ["weights", "logits_fp64"])
@pytest.mark.parametrize("V", [4000, 32000])
def test_workspace_forward(V, teacher, device):
    """One op call (forward computes the gradients): beyond what it returns, at most
    chunk_budget_bytes (student + computed teacher logits of a chunk, or float64 teacher
    logits converted per chunk) + a small constant, for V = 4000 and 8x that."""
    budget = 256 << 10
    N = 64
    inp = make_inputs(device, lead=(N,), V=V, Vt=V + 7, Ds=32, Dt=24, ignore=0.1,
                      teacher="weights" if teacher == "weights" else "logits",
                      tdtype=torch.float64 if teacher == "logits_fp64" else None)
    args = op_args(inp, divergence="jsd", grad_mask=3, budget=budget)
    torch.ops.flashkd.linear_loss(*args)  # warm-up: one-time allocations (cuBLAS workspace) are not workspace
    m = memory.measure(lambda: torch.ops.flashkd.linear_loss(*args), device)
    workspace = m.peak - memory.nbytes(m.result)
    assert workspace <= budget + memory.glue_allowance(N), \
        f"V={V} teacher={teacher}: workspace {workspace} B > budget {budget} B + {memory.glue_allowance(N)} B"
