"""flashkd.linear_distill_loss against the float64 oracle, a few options at a time
(every divergence, teacher as weights or logits, dtypes, reductions, shapes, layouts),
and finite-difference gradient checks; the tolerance model is tests/linear_distill_cases.py."""
import pytest
import torch
import torch.nn.functional as F

import flashkd

from checks import DIV_KW, directional_check
from linear_distill_cases import DIVS, check_case, make_inputs, rows_budget


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
