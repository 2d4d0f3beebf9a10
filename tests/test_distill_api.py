"""flashkd.distill_loss as a torch op and a module: torch.library.opcheck,
torch.compile, flashkd.nn.DistillLoss, and bad inputs that must raise a clear
error naming the argument."""
import math

import pytest
import torch

import flashkd

from checks import DIV_KW
from distill_cases import EPS32, default_cot, device, gen, logits, make_labels, make_weights  # noqa: F401  (fixture)


# ----------------------------------------------------------------------------
# torch.library.opcheck, torch.compile, the nn.Module
# ----------------------------------------------------------------------------

def _op_args(student, teacher, labels=None, weights=None, divergence="fkl", temperature=1.0, beta=0.5, alpha=0.1,
             taid_lambda=None, ignore_index=-100, hard_weight=0.0, soft_weight=1.0, t2_scaling=False,
             vocab_size=None, reduction="mean", num_items=None, return_stats=False):
    return (student, teacher, labels, weights, divergence, temperature, beta, alpha, taid_lambda, ignore_index,
            hard_weight, soft_weight, t2_scaling, vocab_size, reduction, num_items, return_stats)


OPCHECK_CASES = {
    "fkl_mean": dict(),
    "stats_none": dict(divergence="jsd", beta=0.3, reduction="none", return_stats=True),
    "labels_weights": dict(divergence="taid", taid_lambda=0.5, labels=True, weights=True, hard_weight=0.5,
                           temperature=2.0, t2_scaling=True, reduction="sum"),
    "padded_bf16": dict(divergence="skl", alpha=0.2, vocab_size=20, labels=True, num_items=3.0,
                        return_stats=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("op", ["distill_loss", "distill_loss_value"])
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, op, device):
    g = gen("opcheck", case)
    opts = dict(OPCHECK_CASES[case])
    dt = opts.pop("dtype", torch.float32)
    lead, V = (2, 3), 24
    s = logits((*lead, V), g, dt, device).requires_grad_(op == "distill_loss")  # the value op has no backward
    t = logits((*lead, V), g, dt, device)
    if opts.pop("labels", False):
        opts["labels"] = make_labels(lead, opts.get("vocab_size") or V, g, device)
    if opts.pop("weights", False):
        opts["weights"] = make_weights(lead, g, device)
    torch.library.opcheck(getattr(torch.ops.flashkd, op).default, _op_args(s, t, **opts))


def test_torch_compile_no_grad(device):
    """torch.compile(fullgraph=True) under torch.no_grad() (the loss-only op)."""
    torch._dynamo.reset()
    g = gen("compile_no_grad")
    s, t = logits((6, 50), g, device=device), logits((6, 50), g, device=device)
    labels = make_labels((6,), 50, g, device)

    def f(x, y, lab):
        loss, st = flashkd.distill_loss(x, y, divergence="tvd", labels=lab, hard_weight=0.5, return_stats=True)
        return loss, st["teacher_entropy"]

    with torch.no_grad():
        eager, compiled = f(s, t, labels), torch.compile(f, fullgraph=True)(s, t, labels)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["mean_labels", "none_stats"])
def test_torch_compile(case, device):
    """torch.compile(fullgraph=True) of a function calling distill_loss: forward
    and backward equal to eager."""
    torch._dynamo.reset()
    g = gen("compile", case)
    lead, V = (2, 5), 64
    s, t = logits((*lead, V), g, device=device), logits((*lead, V), g, device=device)
    labels = make_labels(lead, V, g, device)
    if case == "mean_labels":
        def f(x, y, lab):
            return flashkd.distill_loss(x, y, divergence="jsd", beta=0.3, labels=lab, hard_weight=0.5,
                                        temperature=2.0) * 2.0
        cot = None
    else:
        def f(x, y, lab):
            loss, st = flashkd.distill_loss(x, y, divergence="srkl", alpha=0.2, labels=lab, reduction="none",
                                            return_stats=True)
            return loss, st["divergence"], st["student_logprob"], st["agree"]
        cot = default_cot(lead, g, device)
    compiled = torch.compile(f, fullgraph=True)
    outs = []
    for fn in (f, compiled):
        x = s.clone().requires_grad_(True)
        out = fn(x, t, labels)
        first = out if cot is None else out[0]
        first.backward(cot)
        outs.append((out if isinstance(out, tuple) else (out,), x.grad))
    (o_eager, g_eager), (o_comp, g_comp) = outs
    for a, b in zip(o_eager, o_comp):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(g_comp, g_eager, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("div", ["fkl", "taid"])
def test_module_equals_functional(div, device):
    g = gen("module", div)
    lead, V = (3, 4), 45
    s, t = logits((*lead, V), g, device=device), logits((*lead, V), g, device=device)
    labels, weights = make_labels(lead, V, g, device), make_weights(lead, g, device)
    opts = dict(divergence=div, temperature=2.0, hard_weight=0.3, reduction="sum", **DIV_KW[div])
    per_call = {}
    if div == "taid":  # lambda changes during training: given per call
        per_call = {"taid_lambda": opts.pop("taid_lambda")}
    mod = flashkd.nn.DistillLoss(**opts)
    assert "temperature=2.0" in repr(mod)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    la = mod(a, t, labels, weights, **per_call)
    lb = flashkd.distill_loss(b, t, labels=labels, weights=weights, **opts, **per_call)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)
    if div == "taid":
        with pytest.raises(ValueError, match="taid_lambda"):
            mod(s, t, labels)
    with pytest.raises(TypeError, match="labels"):
        flashkd.nn.DistillLoss(labels=labels)
    with pytest.raises(TypeError, match="temprature"):
        flashkd.nn.DistillLoss(temprature=2.0)
    with pytest.raises(ValueError, match="divergence"):
        flashkd.nn.DistillLoss(divergence="kl")


MODULE_BAD_OPTIONS = [
    ("DistillLoss", dict(temperature=0.0), "temperature"),
    ("DistillLoss", dict(divergence="jsd", beta=2.0), "beta"),
    ("DistillLoss", dict(num_items=-1.0), "num_items"),
    ("DistillLoss", dict(soft_weight=math.inf), "soft_weight"),
    ("LinearDistillLoss", dict(divergence="skl", alpha=1.0), "alpha"),
    ("LinearDistillLoss", dict(softcap=-1.0), "softcap"),
    ("LinearDistillLoss", dict(chunk_budget_bytes=0), "chunk_budget_bytes"),
    ("LinearCrossEntropyLoss", dict(label_smoothing=2.0), "label_smoothing"),
    ("LinearCrossEntropyLoss", dict(z_loss=-0.1), "z_loss"),
]


@pytest.mark.parametrize("module,options,name", MODULE_BAD_OPTIONS, ids=[f"{m}-{n}" for m, _, n in MODULE_BAD_OPTIONS])
def test_module_checks_options_when_constructed(module, options, name):
    """A bad option fails where it is set (the module runs its op once on one
    token), naming the module and the argument, not at the first batch."""
    with pytest.raises(ValueError, match=f"{module}: .*{name}"):
        getattr(flashkd.nn, module)(**options)
    with torch.device("meta"), pytest.raises(ValueError, match=f"{module}: .*{name}"):
        getattr(flashkd.nn, module)(**options)  # built under a meta-device context (large-model init)
    # taid_lambda may come per call: not required at construction
    getattr(flashkd.nn, module)(**({} if module == "LinearCrossEntropyLoss" else dict(divergence="taid")))



# ----------------------------------------------------------------------------
# Bad inputs: a clear exception that names the argument
# ----------------------------------------------------------------------------

def _bad_cases(device):
    g = gen("bad")
    s = logits((2, 3, 10), g, device=device)
    t = logits((2, 3, 10), g, device=device)
    lab = make_labels((2, 3), 10, g, device)
    s_shared = logits((2, 3, 10), g, device=device).requires_grad_(True)
    cases = {
        "teacher_shape": (ValueError, "teacher_logits", dict(teacher_logits=t[..., :9])),
        "teacher_lead_shape": (ValueError, "teacher_logits", dict(teacher_logits=t[:1])),
        "int_student": (TypeError, "student_logits", dict(student_logits=s.long())),
        "float64_student": (TypeError, "student_logits", dict(student_logits=s.double())),
        "int_teacher": (TypeError, "teacher_logits", dict(teacher_logits=t.int())),
        "not_a_tensor": (TypeError, "student_logits", dict(student_logits=s.tolist())),
        "jsd_beta_0": (ValueError, r"beta.*fkl.*rkl", dict(divergence="jsd", beta=0.0)),
        "jsd_beta_1": (ValueError, r"beta.*fkl.*rkl", dict(divergence="jsd", beta=1.0)),
        "jsd_beta_neg": (ValueError, r"beta.*fkl.*rkl", dict(divergence="jsd", beta=-0.5)),
        "skl_alpha_1": (ValueError, "alpha", dict(divergence="skl", alpha=1.0)),
        "srkl_alpha_neg": (ValueError, "alpha", dict(divergence="srkl", alpha=-0.1)),
        "temperature_0": (ValueError, "temperature", dict(temperature=0.0)),
        "temperature_neg": (ValueError, "temperature", dict(temperature=-1.0)),
        "temperature_nan": (ValueError, "temperature", dict(temperature=float("nan"))),
        "temperature_inf": (ValueError, "temperature", dict(temperature=float("inf"))),
        "taid_no_lambda": (ValueError, "taid_lambda", dict(divergence="taid")),
        "taid_lambda_range": (ValueError, "taid_lambda", dict(divergence="taid", taid_lambda=1.5)),
        "unknown_divergence": (ValueError, "divergence", dict(divergence="kl")),
        "unknown_reduction": (ValueError, "reduction", dict(reduction="avg")),
        "labels_shape": (ValueError, "labels", dict(labels=lab[:, :2])),
        "labels_shape_full": (ValueError, "labels", dict(labels=lab[..., None].expand(2, 3, 10).contiguous())),
        "labels_too_big": (ValueError, "labels", dict(labels=torch.full_like(lab, 10))),
        "labels_negative": (ValueError, "labels", dict(labels=torch.full_like(lab, -3))),
        "labels_beyond_vocab_size": (ValueError, "labels", dict(labels=torch.full_like(lab, 8), vocab_size=8)),
        "float_labels": (TypeError, "labels", dict(labels=lab.float())),
        "hard_weight_no_labels": (ValueError, r"hard_weight.*labels", dict(hard_weight=0.5)),
        "negative_hard_weight": (ValueError, "hard_weight", dict(hard_weight=-1.0, labels=lab)),
        # the value is the error, not the missing labels that a positive weight would need
        "negative_hard_weight_no_labels": (ValueError, "hard_weight must be finite and >= 0", dict(hard_weight=-1.0)),
        "labels_not_tensor": (TypeError, "labels must be a torch.Tensor", dict(labels=lab.tolist(), hard_weight=0.5)),
        "weights_not_tensor": (TypeError, "weights must be a torch.Tensor", dict(weights=[[1.0] * 3] * 2)),
        "ignore_index_float": (TypeError, "ignore_index must be an int", dict(ignore_index=1.5)),
        "vocab_size_float": (TypeError, "vocab_size must be an int", dict(vocab_size=8.0)),
        "negative_soft_weight": (ValueError, "soft_weight", dict(soft_weight=-1.0)),
        "inf_soft_weight": (ValueError, "soft_weight must be finite", dict(soft_weight=math.inf)),
        "nan_hard_weight": (ValueError, "hard_weight must be finite", dict(hard_weight=math.nan, labels=lab)),
        "negative_weights": (ValueError, "weights", dict(weights=-torch.ones(2, 3, device=device))),
        "weights_shape": (ValueError, "weights", dict(weights=torch.ones(3, 2, device=device))),
        "int_weights": (TypeError, "weights", dict(weights=torch.ones(2, 3, dtype=torch.long, device=device))),
        # a meta tensor beside real ones reaches the fake kernel, which must not answer with empty memory
        "meta_teacher": (ValueError, "teacher_logits must be on the device of student_logits",
                         dict(teacher_logits=t.to("meta"))),
        "meta_labels": (ValueError, "labels must be on the device of student_logits",
                        dict(labels=lab.to("meta"), hard_weight=0.5)),
        "vocab_size_0": (ValueError, "vocab_size", dict(vocab_size=0)),
        "vocab_size_big": (ValueError, "vocab_size", dict(vocab_size=11)),
        "num_items_0": (ValueError, "num_items", dict(num_items=0.0)),
        # inplace_backward writes into the student: strides the kernel cannot describe are refused
        "inplace_undescribable": (ValueError, "student_logits", dict(
            student_logits=logits((2, 2, 2, 2, 2, 10), g, device=device).requires_grad_(True)
            .permute(4, 3, 2, 1, 0, 5),
            teacher_logits=logits((2, 2, 2, 2, 2, 10), g, device=device), inplace_backward=True)),
        # ... and so are rows that share memory, which would be read after being overwritten
        "inplace_expanded": (ValueError, "student_logits", dict(
            student_logits=logits((1, 1, 10), g, device=device).requires_grad_(True).expand(2, 3, 10),
            inplace_backward=True)),
        "inplace_teacher_is_student": (ValueError, "student_logits", dict(
            student_logits=s_shared, teacher_logits=s_shared.detach(), inplace_backward=True)),
    }
    return s, t, cases


BAD = list(_bad_cases("cpu")[2])


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs(case, device):
    s, t, cases = _bad_cases(device)
    exc, pattern, kw = cases[case]
    args = {"student_logits": s, "teacher_logits": t, **kw}
    student, teacher = args.pop("student_logits"), args.pop("teacher_logits")
    with pytest.raises(exc, match=pattern):
        flashkd.distill_loss(student, teacher, **args)


@pytest.mark.cuda
def test_labels_on_other_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = gen("device_mismatch")
    s, t = logits((2, 10), g, device="cuda"), logits((2, 10), g, device="cuda")
    with pytest.raises(ValueError, match="labels"):
        flashkd.distill_loss(s, t, labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="weights"):
        flashkd.distill_loss(s, t, weights=torch.ones(2))
    with pytest.raises(ValueError, match="teacher_logits"):
        flashkd.distill_loss(s, t.cpu())
