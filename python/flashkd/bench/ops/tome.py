"""tome_merge cases: one ToMe merge step as a ViT block runs it, "plan +
merge_wavg": bipartite soft matching of the metric with a class token, then
the size-weighted merge of x, forward and backward (to x).

Shape "b<B>t<T>c<C>[m<M>]:dtype" (letters keep it apart from the linear ops'
NxDxV): x (B, T, C) and a metric (B, T, M), M = C when omitted. In a real ViT
the metric is ToMe's keys averaged over heads, head_dim wide: M = 64 for
ViT-S/16 (C = 384) and ViT-B/16 (C = 768); M = C is the heavier matching of a
full-width metric. Token sizes (B, T, 1) from 1 to 4 as after
earlier merges, the class token's size 1. The variant is r ("r16": 16 tokens
merged away, capped at (T - 1) // 2 as in ToMe). The output is the merged x
(B, T - r, C); backward is seeded with a fixed random gradient. The plan has
no gradient (it is an argmax and a sort), the sizes none either.

Providers:
  flashkd        flashkd.tome.bipartite_soft_matching + merge_wavg (fused kernels)
  torch          the same two from flashkd.reference.tome: ToMe's algorithm in
                 eager PyTorch (argsort / gather / scatter_reduce), in the input dtype
  torch.compile  torch.compile of that oracle, compiled afresh per case
"""
from __future__ import annotations

import re

import torch

import flashkd
import flashkd.tome
from flashkd.reference import tome as oracle

from ..cases import DTYPES, Inputs, Provider, Unsupported
from ..errors import error_record, max_abs_diff

NAME = "tome_merge"
VARIANTS = ("r8", "r16", "r32")
DEFAULT_VARIANTS = {"cpu": ("r16",), "cuda": ("r16",)}
SHAPE_SETS = {
    "quick": ("b4t197c384m64:fp32",),
    # the CPU shape: ViT-S/16 (ToMe's 64-wide metric), and a full-width metric
    "overview": ("b8t197c384m64:fp32",),
    "accept": ("b32t197c384m64:fp32", "b32t197c384:fp32"),
    "cpu": ("b32t197c384m64:fp32", "b32t197c384:fp32", "b32t197c384m64:bf16"),
    "gpu": ("b256t197c768m64:fp32", "b256t197c768m64:bf16", "b256t197c768m64:fp16", "b256t197c768:bf16"),
    # the GPU shape: ViT-B/16 (ToMe's 64-wide metric), and a full-width metric
    "gpu-target": ("b256t197c768m64:fp32", "b256t197c768m64:bf16", "b256t197c768:bf16"),
}
DEFAULT_SHAPES = {"cpu": "overview", "cuda": "gpu-target"}

_SHAPE = re.compile(r"^b(\d+)t(\d+)c(\d+)(?:m(\d+))?$")


def parse_shape(spec):
    """"b32t197c384:fp32" -> ("b32t197c384", "fp32")."""
    shape, _, dtype = spec.partition(":")
    match = _SHAPE.match(shape.lower())
    if not match or not all(int(d) > 0 for d in match.groups() if d is not None) or dtype not in DTYPES:
        raise ValueError(f"{NAME} shape must look like b32t197c384m64:fp32 (batch, tokens, channels, optional "
                         f"metric width; dtype in {', '.join(DTYPES)}), got {spec!r}")
    b, t, c, m = (int(d) if d is not None else None for d in match.groups())
    return f"b{b}t{t}c{c}" + (f"m{m}" if m is not None and m != c else ""), dtype


def _dims(case):
    """(batch, tokens, channels, metric width, r after ToMe's cap)."""
    b, t, c, m = (int(d) if d is not None else None for d in _SHAPE.match(case.shape).groups())
    return b, t, c, m or c, oracle.capped_r(t, int(case.variant[1:]), True, False)


def make_inputs(case, device, seed):
    b, t, c, m, r = _dims(case)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    x = torch.randn(b, t, c, generator=gen, device=device, dtype=dtype).requires_grad_()
    metric = torch.randn(b, t, m, generator=gen, device=device, dtype=dtype)
    size = torch.randint(1, 5, (b, t, 1), generator=gen, device=device).to(dtype)
    size[:, 0] = 1
    grad_output = torch.randn(b, t - r, c, generator=gen, device=device, dtype=dtype)
    return Inputs({"x": x, "metric": metric, "size": size}, ("x",), grad_output)


def accuracy_inputs(inputs, max_elements):
    """The inputs themselves when the oracle can afford them, else their first
    batch rows (rows are independent)."""
    x = inputs.tensors["x"]
    keep = max(1, max_elements // (x.shape[1] * x.shape[2]))
    if keep >= x.shape[0]:
        return inputs
    tensors = {name: t.detach()[:keep] for name, t in inputs.tensors.items()}
    tensors["x"].requires_grad_()
    return Inputs(tensors, inputs.grad_names, inputs.grad_output[:keep])


def floor_bytes(case):
    """x, metric and sizes read, the merged x written; backward reads its
    gradient and writes x's."""
    b, t, c, m, r = _dims(case)
    item = DTYPES[case.dtype].itemsize
    return item * (b * t * m + 2 * b * t * c + 2 * b * (t - r) * c + b * t)


def merge_step(impl, x, metric, size, r):
    merge, _ = impl.bipartite_soft_matching(metric, r, class_token=True)
    return impl.merge_wavg(merge, x, size)[0]


def _provider(impl):
    def build(case, device):
        if impl is None and device.type == "cuda" and not flashkd.has_cuda_kernels():
            raise Unsupported("this flashkd build has no CUDA kernels")
        module = flashkd.tome if impl is None else impl
        r = _dims(case)[-1]
        return lambda t: merge_step(module, t["x"], t["metric"], t["size"], r)
    return build


def _compiled(case, device):
    # A fresh compile per case: past torch._dynamo's recompile limit a reused
    # function would silently run eager and be reported as compiled.
    torch._dynamo.reset()
    fn = torch.compile(merge_step, dynamic=False)
    r = _dims(case)[-1]
    return lambda t: fn(oracle, t["x"], t["metric"], t["size"], r)


PROVIDERS = {
    "flashkd": Provider(_provider(None)),
    "torch": Provider(_provider(oracle)),
    "torch.compile": Provider(_compiled, per_shape_warmup=True),
}


def errors(case, inputs, outputs):
    """Each provider's output and x-gradient errors against the oracle in
    float64 on the same inputs: max abs error over the largest oracle value.
    A near-tie in the matching scores can pick a different plan in another
    precision; such a case shows as an O(1) error."""
    t = {name: v.detach().double() for name, v in inputs.tensors.items()}
    x = t["x"].requires_grad_()
    out = merge_step(oracle, x, t["metric"], t["size"], _dims(case)[-1])
    (grad,) = torch.autograd.grad(out, x, inputs.grad_output.double())
    out, grad = out.detach().cpu(), grad.cpu()
    return {name: error_record(max_abs_diff(got, out), out.abs().max().item(),
                               {"x": (max_abs_diff(grads["x"], grad), grad.abs().max().item())})
            for name, (got, grads) in outputs.items()}
