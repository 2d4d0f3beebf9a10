"""flashkd.linear_distill_loss as an op: torch.library.opcheck, torch.compile
fullgraph, and bad inputs raising errors that name the argument."""
import pytest
import torch

import flashkd

from checks import assert_compile_matches_eager
from linear_distill_cases import make_inputs, op_args, rows_budget


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
