"""bf16/fp16 heads of both fused linear losses on the CPU: run in float32 they compute
what the same call on float32 inputs computes, rounded once; and the choice of the head
GEMM (float32 or native 16-bit), automatic or from FLASHKD_CPU_16BIT_GEMM."""
import os
import subprocess
import sys

import pytest
import torch

import flashkd

from checks import cpu_16bit_gemm
from linear_ce_cases import make_inputs


@pytest.mark.parametrize("panel_rows", [1, 7, 300])
@pytest.mark.parametrize("fn", [flashkd.linear_cross_entropy, flashkd.linear_distill_loss],
                         ids=["cross_entropy", "distill"])
def test_float32_heads_compute_the_float32_values(panel_rows, fn):
    """A bf16 head run in float32 on the CPU computes what the same call on the inputs
    converted to float32 computes, rounded once to bf16: its weight panels (here of
    1 and 7 rows, 300 not a multiple of 7, and one panel for the whole weight) and
    chunks only change the order of float32 sums. A panel read twice or skipped, or
    logits written to the wrong columns, would be off by far more than 1e-5. (d weight
    summed in bf16: test_linear_cross_entropy_workspace.py::test_weight_grad_summed_in_its_dtype.)"""
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
