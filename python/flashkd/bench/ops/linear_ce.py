"""linear_ce cases: cross-entropy of hidden [N, D] @ weight [V, D]ᵀ against
random targets, mean over tokens; gradients for hidden and weight.

Providers:
  flashkd        flashkd.linear_cross_entropy (token chunks: the [N, V] logits never exist)
  flashkd-dw-in-dtype  the same with float32_weight_grad=False (d weight summed over the
                 chunks in its own dtype, as cce does; 16-bit cases only)
  torch          F.cross_entropy(hidden @ weight.T, targets) in the input dtype: what a user writes
  torch.compile  torch.compile of that, compiled afresh per case
  cce            cut-cross-entropy's linear_cross_entropy as users get it: its Triton
                 "cce" kernels on CUDA (default gradient filtering included); on a CPU,
                 where Triton does not run, its "torch_compile" implementation
  liger          liger-kernel's LigerFusedLinearCrossEntropyLoss (Triton: CUDA only)
  gemm           the three GEMMs alone (forward logits, dhidden, dweight): the floor,
                 so ``x floor`` is the time over the GEMMs' time
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import flashkd
from flashkd import reference

from ..cases import DTYPES, Inputs, Provider, Unsupported, import_peer
from . import _linear

NAME = "linear_ce"
VARIANTS = ("ce",)
DEFAULT_VARIANTS = {"cpu": VARIANTS, "cuda": VARIANTS}
SHAPE_SETS = {
    "quick": ("256x256x8192:fp32", "256x256x8192:bf16"),
    "overview": ("512x512x32000:fp32",),
    "accept": ("2048x512x32000:fp32",),  # the CPU acceptance shape
    "cpu": ("2048x512x32000:fp32", "2048x512x32000:bf16"),
    "gpu": ("8192x2304x256000:bf16", "8192x4096x128256:bf16"),  # Gemma-2-2B and Llama-3-8B heads
    "gpu-target": ("8192x2304x256000:bf16",),  # the GPU target
}
DEFAULT_SHAPES = {"cpu": "overview", "cuda": "gpu-target"}
FLOOR_PROVIDER = _linear.GEMM


def parse_shape(spec):
    """"NxDxV:dtype" -> ("NxDxV", dtype)."""
    return _linear.parse_shape(NAME, spec, ("N", "D", "V"), "2048x512x32000:fp32")


def make_inputs(case, device, seed):
    n, d, v = _linear.dims(case)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, weight = _linear.random_head(gen, n, d, v, DTYPES[case.dtype], device)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    return Inputs({"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(), "targets": targets},
                  _linear.GRAD_NAMES)


accuracy_inputs = _linear.accuracy_inputs


def floor_bytes(case):
    n, d, v = _linear.dims(case)
    return _linear.floor_bytes((n, d, v), itemsize=DTYPES[case.dtype].itemsize)


def _flashkd(case, device, float32_weight_grad=True):
    if device.type == "cuda" and not flashkd.has_cuda_kernels():
        raise Unsupported("this flashkd build has no CUDA kernels")
    return lambda x: flashkd.linear_cross_entropy(x["hidden"], x["weight"], x["targets"],
                                                  float32_weight_grad=float32_weight_grad)


def _flashkd_dw_in_dtype(case, device):
    _linear.check_16_bit(case)
    return _flashkd(case, device, float32_weight_grad=False)


def plain_cross_entropy(hidden, weight, targets):
    """The eager baseline: logits materialized in the input dtype."""
    return F.cross_entropy(hidden @ weight.T, targets)


def _torch(case, device):
    return lambda x: plain_cross_entropy(x["hidden"], x["weight"], x["targets"])


def _compiled(case, device):
    # A fresh compile per case: past torch._dynamo's recompile limit a reused
    # function would silently run eager and be reported as compiled.
    torch._dynamo.reset()
    fn = torch.compile(plain_cross_entropy, dynamic=False)
    return lambda x: fn(x["hidden"], x["weight"], x["targets"])


def _cce(case, device):
    linear_cross_entropy, = import_peer("cut-cross-entropy", "cut_cross_entropy", "linear_cross_entropy")
    impl = "cce" if device.type == "cuda" else "torch_compile"
    return lambda x: linear_cross_entropy(x["hidden"], x["weight"], x["targets"], impl=impl)


def _liger(case, device):
    if device.type != "cuda":
        raise Unsupported("liger-kernel's fused linear cross-entropy runs Triton kernels: CUDA only")
    LigerFusedLinearCrossEntropyLoss, = import_peer("liger-kernel", "liger_kernel.transformers",
                                                    "LigerFusedLinearCrossEntropyLoss")
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x: loss(x["weight"], x["hidden"], x["targets"])


PROVIDERS = {
    "flashkd": Provider(_flashkd),
    "flashkd-dw-in-dtype": Provider(_flashkd_dw_in_dtype),
    "torch": Provider(_torch),
    "torch.compile": Provider(_compiled, per_shape_warmup=True),
    "cce": Provider(_cce, per_shape_warmup=True),
    "liger": Provider(_liger, per_shape_warmup=True),
    _linear.GEMM: _linear.GEMM_PROVIDER,
}


def errors(case, inputs, outputs):
    """Errors against reference.linear_cross_entropy in float64 (see _linear.oracle_errors)."""
    targets = inputs.tensors["targets"]
    return _linear.oracle_errors(
        inputs, outputs, lambda h, w, rows: reference.linear_cross_entropy(h, w, targets[rows], reduction="sum"))
