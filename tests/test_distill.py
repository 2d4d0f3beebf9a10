"""flashkd.distill_loss against the float64 oracle, one or two options at a
time: every divergence x dtype x vocabulary, temperature, reductions, labels,
weights, statistics, in-place and loss-only forms, layouts and shapes, the
CPU's fixed summation order, the CUDA kernels' row splits, grad_output
scaling; and the kernel's gradient against finite differences of its own
loss. The tolerance model: tests/distill_cases.py."""
import math
import os

import pytest
import torch

import flashkd
from flashkd import reference as R

from checks import DIV_KW, assert_same_bits, results_per_cpu_isa
from distill_cases import (  # noqa: F401  (fixture)
    DIVS, DTYPES, EPS32, STAT_KEYS, check_run, cpu64, default_cot,
    device, gen, logits, make_labels, make_weights, run_all, split_stats,
)
import memory


# ----------------------------------------------------------------------------
# Correctness matrix
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("V", [1, 3, 50257])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_matches_oracle(div, dtype, V, device):
    """Every divergence x dtype x vocabulary size, per-token losses and gradients."""
    g = gen("oracle", div, dtype, V)
    lead = (2, 3) if V > 1000 else (4, 5)
    dt = DTYPES[dtype]
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    kw = dict(divergence=div, reduction="none", **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    if V == 1:
        # One class: both softmaxes are 1 and every divergence is 0 (up to the
        # float32 rounding of the mixture weights' logs in jsd/skl/srkl). Each
        # gradient has the form q_j (x_j - sum_k q_k x_k), exactly 0 for q = 1.
        assert (r.loss.abs() <= 4 * EPS32).all(), r.loss.abs().max()
        assert (r.grad == 0).all()


@pytest.mark.parametrize("t2_scaling", [False, True])
@pytest.mark.parametrize("T", [0.5, 3.0])
@pytest.mark.parametrize("div", DIVS)
def test_temperature(div, T, t2_scaling, device):
    g = gen("temperature", div, T, t2_scaling)
    dt = torch.bfloat16 if t2_scaling else torch.float32
    s, t = logits((3, 4, 257), g, dt, device), logits((3, 4, 257), g, dt, device)
    kw = dict(divergence=div, temperature=T, t2_scaling=t2_scaling, reduction="sum", **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    if t2_scaling:  # the T^2 factor is exactly a scale of the loss without it
        plain = flashkd.distill_loss(s, t, **{**kw, "t2_scaling": False})
        torch.testing.assert_close(r.loss, plain * (T * T), rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("div", DIVS)
def test_reductions(div, reduction, device):
    """Each reduction with labels (some ignored); weights with half of them."""
    g = gen("reduction", div, reduction)
    lead, V = (5, 7), 129
    s, t = logits((*lead, V), g, device=device), logits((*lead, V), g, device=device)
    kw = dict(divergence=div, reduction=reduction, labels=make_labels(lead, V, g, device), **DIV_KW[div])
    if reduction in ("none", "mean"):
        kw["weights"] = make_weights(lead, g, device)
    cot = default_cot(lead, g, device) if reduction == "none" else None
    r = run_all(s, t, cot=cot, **kw)
    check_run(r, s, t, kw, dtype=torch.float32)
    per_tok = flashkd.distill_loss(s, t, **{**kw, "reduction": "none"})
    valid = (kw["labels"] != -100).sum()
    expected = {"none": per_tok, "sum": per_tok.sum(), "mean": per_tok.sum() / valid,
                "batchmean": per_tok.sum() / valid}[reduction]
    torch.testing.assert_close(r.loss, expected, rtol=8 * EPS32 * math.sqrt(per_tok.numel()), atol=0)


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("div", DIVS)
def test_num_items(div, reduction, device):
    """num_items replaces the divisor of mean (gradient accumulation); sum ignores it."""
    g = gen("num_items", div, reduction)
    lead, V = (4, 6), 64
    s, t = logits((*lead, V), g, device=device), logits((*lead, V), g, device=device)
    kw = dict(divergence=div, reduction=reduction, labels=make_labels(lead, V, g, device), num_items=37.5,
              **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.float32)
    total = flashkd.distill_loss(s, t, **{**kw, "reduction": "sum", "num_items": None})
    expected = total if reduction == "sum" else total / 37.5
    torch.testing.assert_close(r.loss, expected, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
@pytest.mark.parametrize("div", DIVS)
def test_ignore_index(div, ignore_index, device):
    """Ignored tokens: zero loss, exactly zero gradient, not counted by mean.
    ignore_index may be a valid class (3): those labels are then ignored."""
    g = gen("ignore", div, ignore_index)
    lead, V = (6, 5), 40
    dt = torch.bfloat16 if ignore_index == -1 else torch.float32
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    labels = make_labels(lead, V, g, device, ignore_index=ignore_index, frac_ignored=0.4)
    kw = dict(divergence=div, labels=labels, ignore_index=ignore_index, hard_weight=0.5, reduction="none",
              **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    ignored = (labels == ignore_index).cpu()
    assert ignored.any() and (~ignored).any()
    assert (r.loss.cpu()[ignored] == 0).all()
    assert (r.grad.cpu()[ignored] == 0).all()
    assert (r.loss.cpu()[~ignored] != 0).all()
    mean = flashkd.distill_loss(s, t, **{**kw, "reduction": "mean"})
    torch.testing.assert_close(mean, r.loss.sum() / (~ignored).sum(), rtol=8 * EPS32, atol=0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("div", DIVS)
def test_all_ignored(div, reduction, device):
    """Every token ignored: the loss is exactly 0 and the gradient exactly 0, never NaN."""
    g = gen("all_ignored", div, reduction)
    lead, V = (3, 4), 33
    dt = torch.float16 if reduction == "sum" else torch.float32
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    labels = torch.full(lead, -100, dtype=torch.long, device=device)
    kw = dict(divergence=div, labels=labels, hard_weight=0.7, reduction=reduction,
              weights=make_weights(lead, g, device), return_stats=reduction == "none", **DIV_KW[div])
    leaf = s.clone().requires_grad_(True)
    loss, *stats = split_stats(flashkd.distill_loss(leaf, t, **kw), kw)
    loss.sum().backward()
    assert not loss.isnan().any() and (loss == 0).all()
    assert not leaf.grad.isnan().any() and (leaf.grad == 0).all()
    if kw["return_stats"]:  # statistics are still computed for ignored tokens
        st = stats[0]
        assert all(torch.isfinite(st[k]).all() for k in STAT_KEYS[:-1])
        assert (st["student_logprob"] == 0).all() and (st["teacher_logprob"] == 0).all()
        assert (st["divergence"] > 0).all()


@pytest.mark.parametrize("div", DIVS)
def test_weights(div, device):
    """Per-token weights multiply each token's loss and gradient; weight 0 gives 0."""
    g = gen("weights", div)
    lead, V = (4, 5), 77
    dt = torch.float16 if div in ("jsd", "tvd") else torch.float32
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    w = make_weights(lead, g, device)
    w[0, :2] = 0.0
    kw = dict(divergence=div, weights=w, reduction="none", labels=make_labels(lead, V, g, device),
              hard_weight=0.25, **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    assert (r.loss[0, :2] == 0).all() and (r.grad[0, :2] == 0).all()
    unweighted = flashkd.distill_loss(s, t, **{**kw, "weights": None})
    torch.testing.assert_close(r.loss, unweighted * w, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_vocab_padding(div, dtype, device):
    """Columns >= vocab_size are excluded from both softmaxes (their contents,
    NaN included, do not matter) and receive exactly zero gradient."""
    g = gen("padding", div, dtype)
    dt = DTYPES[dtype]
    lead, cols, vocab = (3, 5), 72, 50
    s, t = logits((*lead, cols), g, dt), logits((*lead, cols), g, dt)
    junk = float("nan") if dtype == "fp32" else 3.0e4
    s[..., vocab:], t[..., vocab:] = junk, -junk
    s, t = s.to(device), t.to(device)
    kw = dict(divergence=div, vocab_size=vocab, labels=make_labels(lead, vocab, g, device), hard_weight=0.3,
              reduction="mean", return_stats=True, **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    assert (r.grad[..., vocab:] == 0).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_return_stats(div, dtype, device):
    """Every statistic against the oracle, with labels (some ignored); the loss
    and gradient are those of the call without statistics."""
    g = gen("stats", div, dtype)
    dt = DTYPES[dtype]
    lead, V = (4, 6), 301
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    # The student's argmax equals the teacher's on some tokens only.
    s[0, :3] = t[0, :3] + 0.01 * s[0, :3]
    kw = dict(divergence=div, labels=make_labels(lead, V, g, device), reduction="none", return_stats=True,
              temperature=1.5, **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    assert r.stats["agree"].any() and not r.stats["agree"].all()
    leaf = s.clone().requires_grad_(True)
    loss = flashkd.distill_loss(leaf, t, **{**kw, "return_stats": False})
    loss.sum().backward()
    torch.testing.assert_close(loss, r.loss, rtol=4 * EPS32, atol=0)
    torch.testing.assert_close(leaf.grad, r.grad, rtol=4 * EPS32, atol=0)
    if leaf.device.type == "cpu":
        # Without statistics, a hard term or a cap the CPU kernel runs a gradient
        # pass without their terms (kSoftOnly in csrc/cpu/distill_row.h): the same bits.
        assert torch.equal(loss, r.loss) and torch.equal(leaf.grad, r.grad)
    counted = kw["labels"] != -100  # soft_weight 1, no hard loss: the loss is the divergence where counted
    torch.testing.assert_close(r.stats["divergence"][counted], loss[counted], rtol=4 * EPS32, atol=0)
    assert (loss[~counted] == 0).all() and (r.stats["divergence"][~counted] > 0).all()


def test_return_stats_without_labels(device):
    g = gen("stats_nolabels")
    s, t = logits((5, 40), g, device=device), logits((5, 40), g, device=device)
    kw = dict(divergence="fkl", return_stats=True)
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.float32)
    assert (r.stats["student_logprob"] == 0).all() and (r.stats["teacher_logprob"] == 0).all()


@pytest.mark.parametrize("no_grad", ["no_grad", "detached"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_loss_only(div, dtype, no_grad, device):
    """Without a gradient to compute (torch.no_grad(), or student logits that
    do not require grad) the loss-only path gives the training path's loss and
    statistics: labels with some ignored, a hard term, weights, T != 1 and
    padded vocabulary columns."""
    g = gen("loss_only", div, dtype)
    dt = DTYPES[dtype]
    lead, V = (3, 7), 257
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    kw = dict(divergence=div, labels=make_labels(lead, V - 9, g, device), weights=make_weights(lead, g, device),
              hard_weight=0.3, temperature=1.7, vocab_size=V - 9, return_stats=True, **DIV_KW[div])
    for reduction in ("none", "mean"):
        leaf = s.clone().requires_grad_(True)
        ref_loss, ref_stats = flashkd.distill_loss(leaf, t, reduction=reduction, **kw)
        if no_grad == "no_grad":
            with torch.no_grad():
                loss, stats = flashkd.distill_loss(leaf, t, reduction=reduction, **kw)
        else:
            loss, stats = flashkd.distill_loss(s, t, reduction=reduction, **kw)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=4 * EPS32, atol=0)
        for k in STAT_KEYS:
            torch.testing.assert_close(stats[k], ref_stats[k], rtol=4 * EPS32, atol=0, msg=k)


def test_loss_only_allocates_no_gradient(device):
    """The loss-only path allocates nothing of the logits' size (the training
    path's gradient buffer is N x V)."""
    g = gen("loss_only_memory")
    s, t = logits((64, 4096), g, device=device), logits((64, 4096), g, device=device)
    labels = make_labels((64,), 4096, g, device)
    call = lambda: flashkd.distill_loss(s, t, divergence="jsd", labels=labels, hard_weight=0.5)  # noqa: E731
    with torch.no_grad():
        assert memory.measure(call, device).peak < s.numel() * s.element_size() // 8
    leaf = s.clone().requires_grad_(True)
    assert memory.measure(lambda: flashkd.distill_loss(leaf, t, divergence="jsd"), device).peak >= \
        s.numel() * s.element_size()  # the check can fail: the training path does allocate the gradient


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("div", DIVS)
def test_inplace_backward(div, dtype, device):
    """inplace_backward=True: the gradient equals the out-of-place one, bit for
    bit, and it is written into the student's storage."""
    g = gen("inplace", div, dtype)
    dt = DTYPES[dtype]
    lead, V = (3, 4), 200
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    kw = dict(divergence=div, labels=make_labels(lead, V, g, device), hard_weight=0.4, reduction="mean",
              return_stats=True, **DIV_KW[div])
    ref_leaf = s.clone().requires_grad_(True)
    ref_loss, ref_stats = flashkd.distill_loss(ref_leaf, t, **kw)
    ref_loss.backward()

    # The usual case: the logits come out of a model (a non-leaf), and only
    # the loss reads them.
    w = s.clone().requires_grad_(True)
    student = w * 1.0
    loss, stats = flashkd.distill_loss(student, t, inplace_backward=True, **kw)
    assert torch.equal(loss, ref_loss)
    for k in STAT_KEYS:
        assert torch.equal(stats[k], ref_stats[k]), k
    assert not torch.equal(student.detach(), s), "the student logits were not overwritten"
    loss.backward()
    assert torch.equal(w.grad, ref_leaf.grad)
    assert torch.equal(student.detach(), ref_leaf.grad), "the student's storage should hold the gradient"


@pytest.mark.parametrize("div", ["fkl", "srkl"])
def test_inplace_backward_per_token_and_strided(div, device):
    """inplace_backward with reduction='none' (per-token cotangent) and a
    strided student (every other column of a wider tensor)."""
    g = gen("inplace_strided", div)
    lead, V = (3, 5), 90
    base = logits((*lead, 2 * V), g, device=device)
    t = logits((*lead, V), g, device=device)
    kw = dict(divergence=div, reduction="none", **DIV_KW[div])
    cot = default_cot(lead, g, device)
    ref_leaf = base[..., ::2].clone().requires_grad_(True)
    flashkd.distill_loss(ref_leaf, t, **kw).backward(cot)

    w = base.clone().requires_grad_(True)
    wide = w * 1.0
    student = wide[..., ::2]
    assert student.stride(-1) == 2
    loss = flashkd.distill_loss(student, t, inplace_backward=True, **kw)
    loss.backward(cot)
    assert torch.equal(w.grad[..., ::2], ref_leaf.grad)
    assert (w.grad[..., 1::2] == 0).all()
    assert torch.equal(wide.detach()[..., 1::2], base[..., 1::2]), "columns outside the view were written"


SHAPES = {
    "1d": (97,),
    "N1": (1, 97),
    "lead3": (2, 3, 97),
    "lead4": (2, 1, 3, 2, 31),
    "empty": (0, 16),
    "V1_lead": (3, 2, 1),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("div", DIVS)
def test_shapes(div, shape, device):
    """Any number of leading dims (none at all, one token, size-1 dims, zero tokens)."""
    g = gen("shape", div, shape)
    sh = SHAPES[shape]
    s, t = logits(sh, g, device=device), logits(sh, g, device=device)
    labels = make_labels(sh[:-1], sh[-1], g, device) if len(sh) > 1 else torch.tensor(1, device=device)
    for reduction in ("none", "mean"):
        kw = dict(divergence=div, reduction=reduction, labels=labels, hard_weight=0.5, return_stats=True,
                  **DIV_KW[div])
        r = run_all(s, t, **kw)
        check_run(r, s, t, kw, dtype=torch.float32)
        assert r.loss.shape == (sh[:-1] if reduction == "none" else ())
        assert r.stats["divergence"].shape == sh[:-1] and r.stats["agree"].shape == sh[:-1]


def _transposed_lead(x):
    return x.transpose(0, 1)


LAYOUTS = {
    # leading dims transposed: rows are not in memory order
    "transposed_lead": (lambda sh: (sh[1], sh[0], sh[2]), _transposed_lead),
    # every other vocabulary column: last-dim stride 2
    "sliced_vocab": (lambda sh: (sh[0], sh[1], 2 * sh[2]), lambda x: x[..., ::2]),
    # vocabulary-major storage: last-dim stride = number of tokens
    "vocab_major": (lambda sh: (sh[2], sh[0], sh[1]), lambda x: x.permute(1, 2, 0)),
    # more non-mergeable leading dims than the kernel's row layout describes
    # (the kernel describes at most 4; this one is copied to a contiguous tensor)
    "many_lead_dims": (lambda sh: (2, 2, 2, 2, 2, sh[2]), lambda x: x.permute(4, 3, 2, 1, 0, 5)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("div", DIVS)
def test_noncontiguous(div, layout, device):
    """Strided student and teacher views give the results of their contiguous copies."""
    g = gen("layout", div, layout)
    base_shape, view = LAYOUTS[layout]
    sh = base_shape((3, 4, 61))
    dt = torch.bfloat16 if layout == "vocab_major" else torch.float32
    s_base, t_base = logits(sh, g, dt, device), logits(sh, g, dt, device)
    t = view(t_base)
    assert not view(s_base).is_contiguous() and not t.is_contiguous()
    lead, V = t.shape[:-1], t.shape[-1]
    kw = dict(divergence=div, labels=make_labels(lead, V, g, device), hard_weight=0.2, reduction="none",
              **DIV_KW[div])
    r = run_all(s_base, t, view=view, **kw)
    check_run(r, view(s_base), t, kw, dtype=dt)
    # Same values, contiguous: same results up to float32 summation order.
    rc = run_all(view(s_base).contiguous(), t.contiguous(), cot=None, **kw)
    torch.testing.assert_close(r.loss, rc.loss, rtol=16 * EPS32, atol=16 * EPS32)


def test_broadcast_teacher(device):
    """A teacher expanded along the tokens (row stride 0) is read correctly."""
    g = gen("broadcast")
    s = logits((6, 50), g, device=device)
    t = logits((50,), g, device=device).expand(6, 50)
    kw = dict(divergence="jsd", reduction="none", beta=0.7)
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.float32)


MIXED = [("bf16", "fp32"), ("fp32", "fp16"), ("fp16", "bf16")]


@pytest.mark.parametrize("pair", MIXED, ids=["-".join(p) for p in MIXED])
@pytest.mark.parametrize("div", DIVS)
def test_mixed_dtypes(div, pair, device):
    """Student and teacher in different dtypes; the gradient has the student's."""
    g = gen("mixed", div, pair)
    ds, dtch = DTYPES[pair[0]], DTYPES[pair[1]]
    s, t = logits((4, 5, 130), g, ds, device), logits((4, 5, 130), g, dtch, device)
    kw = dict(divergence=div, reduction="mean", labels=make_labels((4, 5), 130, g, device), hard_weight=0.1,
              **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=ds)


def test_vocab_128256(device):
    """A Llama-3-sized vocabulary, once (fkl with the hard loss and statistics)."""
    g = gen("v128256")
    s, t = logits((3, 128256), g, torch.bfloat16, device), logits((3, 128256), g, torch.bfloat16, device)
    kw = dict(divergence="fkl", labels=torch.tensor([5, -100, 128255], device=device), hard_weight=0.5,
              temperature=2.0, t2_scaling=True, reduction="none", return_stats=True)
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.bfloat16)


@pytest.mark.parametrize("div", ["fkl", "jsd", "taid"])
def test_long_rows_sum_in_a_fixed_order_on_the_cpu(div):
    """The CPU kernel's row sums (softmax normalisers, divergence terms) run in
    one order written in csrc/cpu/row_sums.h, not the vectorizer's: every
    instruction set gives the same bits, and over a 262144-entry row the loss
    and the gradient stay within a few float32 roundings of the oracle. (Here
    the vectorizer's order, one running sum per vector lane, was 13 to 43 units
    of roundoff off in the loss and 5 to 35 in the gradient, and AVX2 and
    AVX-512 disagreed; the fixed order is within about one unit.)"""
    g = gen("long rows", div)
    s, t = logits((4, 262144), g, scale=3.0), logits((4, 262144), g, scale=3.0)
    kw = dict(divergence=div, temperature=2.0, labels=torch.tensor([7, 0, -100, 262143]), hard_weight=0.5,
              reduction="none", **DIV_KW[div])
    def run():
        leaf = s.clone().requires_grad_()
        loss = flashkd.distill_loss(leaf, t, **kw)
        loss.sum().backward()
        return loss.detach(), leaf.grad

    results = results_per_cpu_isa(run)
    assert_same_bits(results)
    loss, grad = next(iter(results.values()))
    leaf = s.double().requires_grad_()
    loss_o = R.distill_loss(leaf, t.double(), **kw)
    loss_o.sum().backward()
    assert ((loss.double() - loss_o).abs() <= 8 * EPS32 * loss_o.abs()).all(), (loss, loss_o)
    grad_err = (grad.double() - leaf.grad).abs().amax(-1)
    assert (grad_err <= 8 * EPS32 * leaf.grad.abs().amax(-1)).all(), grad_err / leaf.grad.abs().amax(-1)


# Shapes aimed at the CUDA cluster kernel (csrc/cuda/distill_cluster.cu), which
# splits a row over up to 8 blocks, each caching a 16-byte-aligned slice in
# shared memory: slices of unequal length (V = 128248 over 8), a vocabulary
# tail that is not a multiple of 8 columns (read from global memory), padding
# columns past vocab_size, more rows than resident clusters (V = 12000 fp32
# fills 192 KiB of shared memory, one block per SM, so on an H100 each block
# walks three or four rows: both stages and both barrier phases), a teacher of
# another dtype (another slice size). Elsewhere they are more oracle checks.
ROW_SPLIT_CASES = {
    "bf16-V128248-N40": (40, 128248, "bf16", "bf16", None),
    "fp32-V1028-N64": (64, 1028, "fp32", "fp32", None),
    "fp32-V12000-N400": (400, 12000, "fp32", "fp32", None),
    "bf16-V4096-vocab4001-N300": (300, 4096, "bf16", "bf16", 4001),
    "bf16-fp32-V32000-N70": (70, 32000, "bf16", "fp32", None),
    "fp16-V2048-N512": (512, 2048, "fp16", "fp16", None),
    # At cluster size 8: the last block's slice ends in a 5-column tail read
    # from global memory (one row: more rows of 128253 bf16 would not start
    # on 16-byte boundaries, and would stream); straddles vocab_size; lies
    # wholly past it.
    "bf16-V128253-N1": (1, 128253, "bf16", "bf16", None),
    "bf16-V128256-vocab127999-N40": (40, 128256, "bf16", "bf16", 127999),
    "bf16-V128256-vocab100000-N40": (40, 128256, "bf16", "bf16", 100000),
}


@pytest.mark.parametrize("div", ["fkl", "jsd", "taid"])
@pytest.mark.parametrize("case", list(ROW_SPLIT_CASES))
def test_row_split_shapes(case, div, device):
    n, V, sdt, tdt, vocab_size = ROW_SPLIT_CASES[case]
    g = gen("row_split", case, div)
    s, t = logits((n, V), g, DTYPES[sdt], device), logits((n, V), g, DTYPES[tdt], device)
    kw = dict(divergence=div, labels=make_labels((n,), vocab_size or V, g, device), hard_weight=0.3,
              weights=make_weights((n,), g, device), temperature=1.5, reduction="none", return_stats=True,
              vocab_size=vocab_size, **DIV_KW[div])
    r = run_all(s, t, **kw)
    if device != "cpu" and torch.ops.flashkd.distill_cuda_kernel()[0] == "cluster":
        assert torch.ops.flashkd.distill_cuda_kernel()[1] == "cluster", "the case streamed: it tests nothing more"
    check_run(r, s, t, kw, dtype=DTYPES[sdt])
    # Written in place, the gradient is the same, bit for bit.
    student = s.clone().requires_grad_(True) * 1.0
    loss, _ = flashkd.distill_loss(student, t, inplace_backward=True, **kw)
    assert torch.equal(loss, r.loss.detach())
    assert torch.equal(student.detach(), r.grad)


def test_argmax_ties_across_row_slices(device):
    """The 'agree' statistic takes the first of tied maxima, also when the tied
    columns fall in slices of the row that different blocks own."""
    V = 128256
    g = gen("argmax_ties")
    s, t = logits((3, V), g, torch.bfloat16, device), logits((3, V), g, torch.bfloat16, device)
    s[:, [5, 70000, 127000]] = 30.0   # student: first maximum at column 5
    t[0, [5, 127000]] = 30.0          # teacher: first at 5, agree
    t[1, [70000, 127000]] = 30.0      # first at 70000, disagree
    t[2, 127000] = 30.0               # only 127000, disagree
    kw = dict(divergence="fkl", reduction="none", return_stats=True)
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=torch.bfloat16)
    assert r.stats["agree"].cpu().tolist() == [True, False, False]


def test_cuda_kernel_choice(device):
    """The CUDA kernel that ran: the streaming one when forced, else the
    cluster kernel on contiguous 16-byte-aligned rows; strided rows stream."""
    if device == "cpu":
        pytest.skip("a CUDA kernel choice")
    choice, _ = torch.ops.flashkd.distill_cuda_kernel()
    g = gen("kernel_choice")
    s, t = logits((4, 4096), g, torch.bfloat16, device), logits((4, 4096), g, torch.bfloat16, device)
    flashkd.distill_loss(s, t)
    assert torch.ops.flashkd.distill_cuda_kernel()[1] == ("stream" if choice == "stream" else "cluster")
    flashkd.distill_loss(s[:, ::2], t[:, ::2])
    assert torch.ops.flashkd.distill_cuda_kernel()[1] == "stream"


def test_cuda_kernel_choice_errors():
    if not flashkd.has_cuda_kernels():
        pytest.skip("no CUDA kernels in this build")
    before = torch.ops.flashkd.distill_cuda_kernel()[0]
    with pytest.raises(ValueError, match="unknown distillation kernel"):
        torch.ops.flashkd.distill_cuda_kernel("fastest")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs an sm_90 GPU"):
            torch.ops.flashkd.distill_cuda_kernel("cluster")
    assert torch.ops.flashkd.distill_cuda_kernel()[0] == before, "a refused choice changed the preference"
    # Forcing, then resetting, returns to the environment's choice.
    assert torch.ops.flashkd.distill_cuda_kernel("stream")[0] == "stream"
    assert torch.ops.flashkd.distill_cuda_kernel("", True)[0] == os.environ.get("FLASHKD_DISTILL_KERNEL", "auto")


@pytest.mark.parametrize("t2_scaling", [False, True])
@pytest.mark.parametrize("div", DIVS)
def test_hard_loss_mixing(div, t2_scaling, device):
    """hard_weight * CE(at T = 1) + soft_weight * (T^2) * D, both weights > 0."""
    g = gen("mixing", div, t2_scaling)
    lead, V = (5, 4), 150
    dt = torch.bfloat16 if t2_scaling else torch.float32
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    labels = make_labels(lead, V, g, device)
    kw = dict(divergence=div, labels=labels, hard_weight=0.35, soft_weight=0.65, temperature=2.5,
              t2_scaling=t2_scaling, reduction="none", **DIV_KW[div])
    r = run_all(s, t, **kw)
    check_run(r, s, t, kw, dtype=dt)
    # The parts add up: hard-only + soft-only = mixed.
    hard = flashkd.distill_loss(s, t, **{**kw, "soft_weight": 0.0})
    soft = flashkd.distill_loss(s, t, **{**kw, "hard_weight": 0.0})
    torch.testing.assert_close(hard + soft, r.loss, rtol=8 * EPS32, atol=8 * EPS32)
    ce = torch.nn.functional.cross_entropy(cpu64(s).reshape(-1, V), cpu64(labels).reshape(-1), reduction="none")
    torch.testing.assert_close(cpu64(hard).reshape(-1), 0.35 * ce, rtol=0, atol=64 * EPS32 * (1 + ce.abs().max()))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("div", DIVS)
def test_grad_output_scaling(div, dtype, device):
    """A cotangent other than 1 (reduction='none' with per-token cotangents,
    then 'mean' with a scalar one, as in loss / accumulation_steps).

    The gradient is computed in forward and stored in the student's dtype, and
    backward multiplies it by the cotangent: two roundings to the student's
    dtype where torch autograd has one. That is inherent in the design, so the
    bound allows two roundings. The CPU path rounds a third time (the
    cotangent itself, see test_backward_scaling_rounds_once), so there the
    bound allows three.
    """
    dt = DTYPES[dtype]
    rounds = 3 if device == "cpu" else 2
    g = gen("cotangent", div, dtype)
    lead, V = (16, 32), 300
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    kw = dict(divergence=div, reduction="none", **DIV_KW[div])
    r = run_all(s, t, cot=default_cot(lead, g, device), **kw)
    check_run(r, s, t, kw, dtype=dt, rounds=rounds)
    kw = dict(divergence=div, reduction="mean", **DIV_KW[div])
    r = run_all(s, t, cot=torch.tensor(1.0 / 3.0, device=device), **kw)
    check_run(r, s, t, kw, dtype=dt, rounds=rounds)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_backward_scaling_rounds_once(dtype, device):
    """Backward multiplies the saved gradient (student dtype) by the cotangent:
    the result must be that product computed exactly and rounded once, the
    float32 product cast to the student's dtype, as torch's own mul does."""
    dt = DTYPES[dtype]
    g = gen("rounds_once", dtype)
    lead, V = (8, 16), 128
    s, t = logits((*lead, V), g, dt, device), logits((*lead, V), g, dt, device)
    for reduction, cot in (("none", default_cot(lead, g, device)), ("mean", torch.tensor(1 / 3, device=device))):
        unit, scaled = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        flashkd.distill_loss(unit, t, divergence="rkl", reduction=reduction).backward(torch.ones_like(cot))
        flashkd.distill_loss(scaled, t, divergence="rkl", reduction=reduction).backward(cot)
        factor = cot[..., None] if cot.dim() else cot
        expected = (unit.grad.float() * factor).to(dt)
        mismatch = (scaled.grad != expected).sum().item()
        assert mismatch == 0, f"{reduction}: {mismatch} of {expected.numel()} gradient elements differ"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_scale_rows_long_and_strided_rows(dtype, device):
    """The backward's in-place scaling on rows longer than the CPU's conversion
    chunk (2048), with a partial last chunk, per-row and scalar factors (some
    exactly 1, which skip their row), on a column-strided view: every element
    is the float32 product rounded once, and the elements between the view's
    columns are left alone."""
    dt = DTYPES[dtype]
    g = gen("scale_rows", dtype)
    rows, V = 6, 2 * 2048 + 77
    base = torch.randn(rows, 2 * V, generator=g).to(dt).to(device)
    view = base[:, ::2]
    per_row = torch.rand(rows, generator=g).to(device) * 3
    per_row[2] = 1.0
    for factor in (per_row, torch.tensor(0.37, device=device)):
        before = base.clone()
        torch.ops.flashkd.scale_rows_(view, factor)
        f = factor[:, None] if factor.dim() else factor
        expected = (before[:, ::2].float() * f).to(dt)
        assert torch.equal(view, expected)
        assert torch.equal(base[:, 1::2], before[:, 1::2])



# ----------------------------------------------------------------------------
# Gradient check by finite differences
# ----------------------------------------------------------------------------
#
# torch.autograd.gradcheck wants float64 inputs, and the kernels accept only
# float32, bfloat16 and float16 (they compute in float32), so gradcheck cannot
# be pointed at flashkd.distill_loss; running it on the float64 oracle would
# check the oracle, not the kernel. Instead this checks the kernel's own
# gradient against central finite differences of the kernel's own loss, in
# float32, along random unit directions d:
#
#     (L(x + h d) - L(x - h d)) / (2 h)  ~  <grad L(x), d>
#
# With h = 1e-2 and logits of O(1) (T >= 1), the truncation error is
# h^2 / 6 * |L'''| (a few 1e-5: third derivatives of these losses are O(1)
# for such logits), and the rounding error is about 2 * delta * |L| / (2 h),
# delta the float32 noise of L (~1e-6 here): a few 1e-5 as well. The tolerance
# 5e-4 + 2e-3 * |<grad, d>| sits above both, and far below a wrong gradient
# (a missing term or factor moves <grad, d> by O(|grad|) ~ 0.1 to 1).

def _fd_directional(fn, x, d, h):
    return (fn(x + h * d).double() - fn(x - h * d).double()) / (2 * h)


@pytest.mark.parametrize("config", ["mean_labels_weights", "none_cotangent"])
@pytest.mark.parametrize("div", DIVS)
def test_gradcheck_finite_differences(div, config, device):
    g = gen("gradcheck", div, config)
    lead, V = (3, 4), 7
    s = logits((*lead, V), g, device=device, scale=1.0)
    t = logits((*lead, V), g, device=device, scale=1.0)
    kw = dict(divergence=div, temperature=1.3, **DIV_KW[div])
    if config == "mean_labels_weights":
        kw.update(reduction="mean", labels=make_labels(lead, V, g, device), hard_weight=0.6, soft_weight=0.9,
                  weights=make_weights(lead, g, device), t2_scaling=True)
        cot = None
    else:
        kw.update(reduction="none")
        cot = default_cot(lead, g, device)
    h = 1e-2

    def fn(x):
        loss = flashkd.distill_loss(x, t, **kw)
        return loss if cot is None else (loss * cot).sum()

    T = kw["temperature"]
    if div == "tvd":
        # TVD is not differentiable where p_j = q_j: move the teacher well away
        # from the student; the stencil is checked to keep every sign below.
        t = t + 3.0 * torch.randn(t.shape, generator=g, dtype=torch.float64).float().to(device)
    leaf = s.clone().requires_grad_(True)
    fn(leaf).backward()
    grad = leaf.grad.double()
    assert grad.abs().max() > 1e-3  # a real gradient to check
    if div == "taid":
        # TAID's gradient treats r = softmax(((1 - l) z_s + l z_t) / T) as a
        # constant (stop-gradient on z_s), so the finite differences are taken
        # with r frozen at the point: KL(r0 || q(x)) is fkl against the fixed
        # teacher logits (1 - l) z_s + l z_t.
        lam = kw["taid_lambda"]
        frozen = dict(kw, divergence="fkl", taid_lambda=None)
        t_frozen = (1 - lam) * s + lam * t

        def fd_fn(x):
            loss = flashkd.distill_loss(x, t_frozen, **frozen)
            return loss if cot is None else (loss * cot).sum()

        torch.testing.assert_close(fd_fn(s), fn(s), rtol=1e-5, atol=1e-6)
    else:
        fd_fn = fn
    p = torch.softmax(t.double() / T, -1)
    for k in range(4):
        d = torch.randn(s.shape, generator=g, dtype=torch.float64)
        d = (d / d.norm()).float().to(device)
        if div == "tvd":
            for sign in (1, -1):
                q = torch.softmax((s + sign * h * d).double() / T, -1)
                assert ((q - p).sign() == (torch.softmax(s.double() / T, -1) - p).sign()).all()
        numeric = _fd_directional(fd_fn, s, d, h).item()
        analytic = (grad * d.double()).sum().item()
        assert abs(numeric - analytic) <= 5e-4 + 2e-3 * abs(analytic), (k, numeric, analytic)
