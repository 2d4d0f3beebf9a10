"""What the fused linear ops (``linear_ce``, ``linear_distill``) share: shape
specs with several dims, random heads, row subsets for the oracle, the
float64 oracle's errors for hidden and weight gradients, and the ``gemm``
provider, whose time is the floor these ops are judged against.

Every tensor whose first dim is the token dim is listed in ``ROW_TENSORS``;
weights are shared by all rows and never subset.
"""
from __future__ import annotations

import math

import torch

import flashkd

from ..cases import DTYPES, Inputs, Provider, Unsupported
from ..errors import error_record, max_abs_diff

GEMM = "gemm"
ROW_TENSORS = ("hidden", "targets", "teacher_hidden")
GRAD_NAMES = ("hidden", "weight")
# Float64 logits the oracle holds at once (x 8 bytes, a few copies with its
# autograd graph): bounds its memory at the GPU shapes.
_ORACLE_CHUNK_ELEMENTS = 1 << 25


def parse_shape(op, spec, dim_names, example):
    """"AxBx...:dtype" with len(dim_names) positive dims -> (shape, dtype) strings."""
    shape, _, dtype = spec.partition(":")
    dims = shape.lower().split("x")
    if len(dims) != len(dim_names) or not all(d.isdigit() and int(d) > 0 for d in dims) or dtype not in DTYPES:
        raise ValueError(f"{op} shape must look like {example} ({'x'.join(dim_names)}, dtype in "
                         f"{', '.join(DTYPES)}), got {spec!r}")
    return "x".join(str(int(d)) for d in dims), dtype


def dims(case):
    return tuple(int(d) for d in case.shape.split("x"))


def check_16_bit(case):
    """Unsupported for float32 cases: where float32_weight_grad=False changes nothing."""
    if DTYPES[case.dtype] == torch.float32:
        raise Unsupported("float32 weights: d weight is summed in float32 either way")


def random_head(gen, rows, hidden_size, vocab, dtype, device):
    """hidden [rows, D] ~ N(0, 1) and weight [V, D] scaled so logits have
    standard deviation about 2, like the distill_loss cases' logits."""
    hidden = torch.randn(rows, hidden_size, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen, device=device, dtype=dtype).mul_(2 / math.sqrt(hidden_size))
    return hidden, weight


def accuracy_inputs(inputs, max_elements):
    """The inputs themselves when the oracle can afford their [N, V] logits,
    else their first and last rows (rows are independent; the last ones
    exercise large offsets). The subset's hidden is a new leaf; weights are the
    same tensors, so their gradient is the subset's."""
    t = inputs.tensors
    n, v = t["hidden"].shape[0], t["weight"].shape[0]
    keep = max(2, max_elements // v)
    if keep >= n:
        return inputs
    rows = torch.cat([torch.arange(keep // 2), torch.arange(n - (keep - keep // 2), n)]).to(t["hidden"].device)
    subset = {name: (x.detach()[rows] if name in ROW_TENSORS else x) for name, x in t.items()}
    subset["hidden"].requires_grad_()
    return Inputs(subset, inputs.grad_names)


def floor_bytes(*heads, itemsize):
    """Fewest bytes any implementation moves: each (rows, D, V) head's hidden
    and weight read once; the student's (the first) gradients written once."""
    read = sum(n * d + v * d for n, d, v in heads)
    n, d, v = heads[0]
    return (read + n * d + v * d) * itemsize


class _GemmsOnly(torch.autograd.Function):
    """The GEMMs of a fused linear loss with nothing between them: forward
    logits = hidden @ weightᵀ (and the teacher's, when given, computed and
    dropped); backward dhidden = dlogits @ weight and dweight = dlogitsᵀ @
    hidden, the student logits standing in for dlogits (same shape and dtype;
    a GEMM's time does not depend on the values). flashkd computes exactly
    these products, chunk by chunk, in float32 for a 16-bit CPU head where
    flashkd.cpu_gemm_dtype says so: then so does this, its operands converted
    first (the conversions' time included, as in flashkd's); returns a zero
    scalar to call backward on."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight):
        ctx.input_dtype = hidden.dtype
        if hidden.device.type == "cpu" and flashkd.cpu_gemm_dtype(hidden.dtype) != hidden.dtype:
            hidden, weight = hidden.float(), weight.float()
            if teacher_hidden is not None:
                teacher_hidden, teacher_weight = teacher_hidden.float(), teacher_weight.float()
        logits = hidden @ weight.T
        if teacher_hidden is not None:
            _ = teacher_hidden @ teacher_weight.T
        ctx.save_for_backward(hidden, weight, logits)
        return hidden.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, logits = ctx.saved_tensors
        dtype = ctx.input_dtype
        return (logits @ weight).to(dtype), (logits.T @ hidden).to(dtype), None, None


def _gemms(case, device):
    return lambda x: _GemmsOnly.apply(x["hidden"], x["weight"], x.get("teacher_hidden"), x.get("teacher_weight"))


GEMM_PROVIDER = Provider(_gemms)


def oracle_errors(inputs, outputs, oracle_sum):
    """Each provider's loss relative error and gradient errors against a
    float64 oracle on the same inputs (the ``gemm`` provider computes no loss
    and is left out).

    ``oracle_sum(hidden_rows, weight, rows)`` is the sum-reduced float64 loss
    of the token rows ``rows`` (a slice); it runs over row chunks so the
    oracle's logits fit in memory at any shape, the weight gradient summed
    over chunks. Mean reduction over all-valid tokens divides by N. Per leaf,
    the error is max |grad - oracle| / max |oracle|, comparable across N;
    ``grad_err`` is the worse of hidden's and weight's, and
    ``grad_max_abs_err`` that leaf's raw maximum.
    """
    outputs = {name: out for name, out in outputs.items() if name != GEMM}
    if not outputs:
        return {}
    hidden = inputs.tensors["hidden"].detach()
    weight = inputs.tensors["weight"].detach().double().requires_grad_()
    n, v = hidden.shape[0], weight.shape[0]
    step = max(1, _ORACLE_CHUNK_ELEMENTS // v)
    ref = {"hidden": torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device),
           "weight": torch.zeros_like(weight)}
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        h = hidden[rows].double().requires_grad_()
        part = oracle_sum(h, weight, rows)
        dh, dw = torch.autograd.grad(part, (h, weight))
        ref["hidden"][rows] = dh
        ref["weight"] += dw
        total += part.detach()
    ref_loss = total.item() / n
    for grad in ref.values():
        grad /= n
    return {name: error_record(abs(loss - ref_loss), ref_loss,
                               {leaf: (max_abs_diff(grads[leaf], ref[leaf]), ref[leaf].abs().max().item())
                                for leaf in GRAD_NAMES})
            for name, (loss, grads) in outputs.items()}
