"""vit_tome cases: the reference ViT (flashkd.models.VisionTransformer) with
ToMe merging, forward throughput against the same model unmerged.

Variant: the model preset (vit-s16, vit-b16, ...), seed 0 weights in the
case's dtype. Shape "b<batch>r<r>:dtype", e.g. "b256r16:fp16": a batch of
random images, r tokens merged per layer (ToMe's constant schedule, with
proportional attention). The forward time is the number to read (images/s =
batch / fwd ms * 1000); forward+backward backpropagates a fixed random
gradient of the logits to the images only, the weights frozen (no weight
gradients), so it is not a training step.

Providers:
  flashkd        merged with flashkd.tome.patch (fused kernels)
  torch          merged with ToMe's algorithm in eager PyTorch
                 (flashkd.reference.tome patched in the same way)
  torch.compile  torch.compile of that eager-merged model, compiled afresh per case
  flashkd+compile  torch.compile of the flashkd-merged model (its ops are opaque
                 to the compiler, the rest of the ViT fuses as in torch.compile):
                 the like-for-like comparison with the row above
  unmerged       the same model without merging: the flashkd row's fwd ms
                 against this row's is the merging speedup

Errors are against the float64 model merged with the oracle; merging decisions
are discrete, so in bf16 / fp16 a near-tie can merge other tokens than float64
does and the logits differ by O(1): only fp32 errors are a correctness check.
"""
from __future__ import annotations

import re

import torch

import flashkd
import flashkd.tome
from flashkd.models import VIT_PRESETS, VisionTransformer
from flashkd.reference import tome as oracle

from ..cases import DTYPES, Inputs, Provider, Unsupported
from ..errors import error_record, max_abs_diff

NAME = "vit_tome"
VARIANTS = tuple(VIT_PRESETS)
DEFAULT_VARIANTS = {"cpu": ("vit-s16",), "cuda": ("vit-b16",)}
SHAPE_SETS = {
    "quick": ("b2r16:fp32",),
    "overview": ("b2r16:fp32",),
    "accept": ("b8r16:fp32",),  # ViT-S/16 on a CPU at a small batch
    "cpu": ("b8r16:fp32", "b8r8:fp32", "b8r16:bf16"),
    "gpu": ("b256r16:fp32", "b256r16:fp16", "b256r16:bf16", "b256r8:fp16"),
    "gpu-target": ("b256r16:fp16",),  # the target: ViT-B/16, r = 16, ToMe's fp16 setting
}
DEFAULT_SHAPES = {"cpu": "overview", "cuda": "gpu-target"}

_SHAPE = re.compile(r"^b(\d+)r(\d+)$")
# Images the float64 oracle model runs at once: bounds its activation memory.
_ORACLE_BATCH = 16


def parse_shape(spec):
    """"b<batch>r<r>:dtype" -> ("b<batch>r<r>", dtype)."""
    shape, _, dtype = spec.partition(":")
    match = _SHAPE.match(shape.lower())
    if not match or int(match.group(1)) < 1 or dtype not in DTYPES:
        raise ValueError(f"{NAME} shape must look like b256r16:fp16 (batch, tokens merged per layer; dtype in "
                         f"{', '.join(DTYPES)}), got {spec!r}")
    return f"b{int(match.group(1))}r{int(match.group(2))}", dtype


def _dims(case):
    batch, r = _SHAPE.match(case.shape).groups()
    return int(batch), int(r)


def make_inputs(case, device, seed):
    batch, _ = _dims(case)
    cfg = VIT_PRESETS[case.variant]
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen, device=device,
                         dtype=dtype).requires_grad_()
    grad_output = torch.randn(batch, cfg.num_classes, generator=gen, device=device, dtype=dtype)
    return Inputs({"images": images}, ("images",), grad_output)


def accuracy_inputs(inputs, max_elements):
    """The inputs themselves when the oracle can afford them, else their first images."""
    images = inputs.tensors["images"]
    keep = max(1, max_elements // images[0].numel())
    if keep >= images.shape[0]:
        return inputs
    return Inputs({"images": images.detach()[:keep].requires_grad_()}, ("images",), inputs.grad_output[:keep])


def floor_bytes(case):
    """The weights and the images read once (a loose floor: a ViT is compute-bound)."""
    batch, _ = _dims(case)
    cfg = VIT_PRESETS[case.variant]
    return DTYPES[case.dtype].itemsize * (cfg.num_parameters() + batch * cfg.in_chans * cfg.img_size ** 2)


def _model(case, device, dtype, impl):
    model = VisionTransformer(case.variant, seed=0, device=device, dtype=dtype).eval().requires_grad_(False)
    if impl is not False:
        flashkd.tome.patch(model, _dims(case)[1], impl=impl)
    return model


def _flashkd_model(case, device):
    if device.type == "cuda" and not flashkd.has_cuda_kernels():
        raise Unsupported("this flashkd build has no CUDA kernels")
    return _model(case, device, DTYPES[case.dtype], None)


def _flashkd(case, device):
    model = _flashkd_model(case, device)
    return lambda t: model(t["images"])


def _torch(case, device):
    model = _model(case, device, DTYPES[case.dtype], oracle)
    return lambda t: model(t["images"])


def _compile(model):
    torch._dynamo.reset()  # a fresh compile per case (see distill.py)
    model = torch.compile(model, dynamic=False)
    return lambda t: model(t["images"])


def _compiled(case, device):
    return _compile(_model(case, device, DTYPES[case.dtype], oracle))


def _flashkd_compiled(case, device):
    return _compile(_flashkd_model(case, device))


def _unmerged(case, device):
    model = _model(case, device, DTYPES[case.dtype], False)
    return lambda t: model(t["images"])


PROVIDERS = {
    "flashkd": Provider(_flashkd),
    "torch": Provider(_torch),
    "torch.compile": Provider(_compiled, per_shape_warmup=True),
    "flashkd+compile": Provider(_flashkd_compiled, per_shape_warmup=True),
    "unmerged": Provider(_unmerged),
}


def errors(case, inputs, outputs):
    """Logit and image-gradient errors of the merged providers against the
    float64 oracle-merged model, run over chunks of images (they are
    independent); the unmerged model computes something else and gets none."""
    images = inputs.tensors["images"].detach()
    model = _model(case, images.device, DTYPES[case.dtype], oracle).double()  # the case's weights, exactly
    logits, grads = [], []
    for i in range(0, images.shape[0], _ORACLE_BATCH):
        chunk = images[i:i + _ORACLE_BATCH].double().requires_grad_()
        out = model(chunk)
        (grad,) = torch.autograd.grad(out, chunk, inputs.grad_output[i:i + _ORACLE_BATCH].double())
        logits.append(out.detach().cpu())
        grads.append(grad.cpu())
    ref, ref_grad = torch.cat(logits), torch.cat(grads)
    return {name: error_record(max_abs_diff(got, ref), ref.abs().max().item(),
                               {"images": (max_abs_diff(got_grads["images"], ref_grad), ref_grad.abs().max().item())})
            for name, (got, got_grads) in outputs.items() if name != "unmerged"}
