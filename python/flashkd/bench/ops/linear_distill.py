"""linear_distill cases: JSD (beta 0.5, temperature 1, soft loss only, mean
over tokens) between the student head hidden [N, Ds] @ weight [V, Ds]ᵀ and the
teacher head teacher_hidden [N, Dt] @ teacher_weight [V, Dt]ᵀ; gradients for
the student's hidden and weight (the teacher is frozen).

Providers:
  flashkd        flashkd.linear_distill_loss with the teacher's hidden and weight
  flashkd-dw-in-dtype  the same with float32_weight_grad=False (the student's d weight
                 summed over the chunks in its own dtype; 16-bit cases only)
  torch          what a user writes: both heads' logits in the input dtype, float32
                 log-softmax, JSD (the teacher's head under no_grad)
  torch.compile  torch.compile of that, compiled afresh per case
  liger          liger-kernel's chunked LigerFusedLinearJSDLoss (torch, chunked over
                 tokens, torch.compile'd as by default; runs on a CPU too), hard loss off
  gemm           the four GEMMs alone (student and teacher logits, dhidden, dweight):
                 the floor, so ``x floor`` is the time over the GEMMs' time
"""
from __future__ import annotations

import math

import torch

import flashkd
from flashkd import reference

from ..cases import DTYPES, Inputs, Provider, Unsupported, import_peer
from . import _linear

NAME = "linear_distill"
VARIANTS = ("jsd",)
DEFAULT_VARIANTS = {"cpu": VARIANTS, "cuda": VARIANTS}
SHAPE_SETS = {
    "quick": ("256x128x256x8192:fp32", "256x128x256x8192:bf16"),
    "overview": ("512x256x512x32000:fp32",),
    "accept": ("2048x256x512x32000:fp32",),  # the CPU acceptance shape
    "cpu": ("2048x256x512x32000:fp32", "2048x256x512x32000:bf16"),
    # Llama-3.2-1B from Llama-3-8B (the GPU target), Gemma-2-2B from Gemma-2-9B.
    "gpu": ("8192x2048x4096x128256:bf16", "8192x2304x3584x256000:bf16"),
    "gpu-target": ("8192x2048x4096x128256:bf16",),
}
DEFAULT_SHAPES = {"cpu": "overview", "cuda": "gpu-target"}
FLOOR_PROVIDER = _linear.GEMM
BETA = 0.5


def parse_shape(spec):
    """"NxDsxDtxV:dtype" -> ("NxDsxDtxV", dtype)."""
    return _linear.parse_shape(NAME, spec, ("N", "Ds", "Dt", "V"), "2048x256x512x32000:fp32")


def make_inputs(case, device, seed):
    n, ds, dt, v = _linear.dims(case)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    hidden, weight = _linear.random_head(gen, n, ds, v, dtype, device)
    teacher_hidden, teacher_weight = _linear.random_head(gen, n, dt, v, dtype, device)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)  # liger's signature wants labels
    return Inputs({"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(),
                   "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "targets": targets},
                  _linear.GRAD_NAMES)


accuracy_inputs = _linear.accuracy_inputs


def floor_bytes(case):
    n, ds, dt, v = _linear.dims(case)
    return _linear.floor_bytes((n, ds, v), (n, dt, v), itemsize=DTYPES[case.dtype].itemsize)


def _flashkd(case, device, float32_weight_grad=True):
    if device.type == "cuda" and not flashkd.has_cuda_kernels():
        raise Unsupported("this flashkd build has no CUDA kernels")
    return lambda x: flashkd.linear_distill_loss(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"],
                                                 divergence="jsd", beta=BETA, temperature=1.0,
                                                 float32_weight_grad=float32_weight_grad)


def _flashkd_dw_in_dtype(case, device):
    _linear.check_16_bit(case)
    return _flashkd(case, device, float32_weight_grad=False)


def plain_jsd(hidden, weight, teacher_hidden, teacher_weight):
    """The eager baseline: JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),
    m = beta p + (1 - beta) q, p the teacher's and q the student's softmax."""
    lq = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    with torch.no_grad():
        lp = torch.log_softmax((teacher_hidden @ teacher_weight.T).float(), dim=-1)
    lm = torch.logaddexp(lp + math.log(BETA), lq + math.log1p(-BETA))
    per_token = BETA * (lp.exp() * (lp - lm)).sum(-1) + (1 - BETA) * (lq.exp() * (lq - lm)).sum(-1)
    return per_token.mean()


def _torch(case, device):
    return lambda x: plain_jsd(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"])


def _compiled(case, device):
    # A fresh compile per case: past torch._dynamo's recompile limit a reused
    # function would silently run eager and be reported as compiled.
    torch._dynamo.reset()
    fn = torch.compile(plain_jsd, dynamic=False)
    return lambda x: fn(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"])


def _liger(case, device):
    LigerFusedLinearJSDLoss, = import_peer("liger-kernel", "liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss")
    # Liger's beta weights KL(teacher || m) with m = beta p + (1 - beta) q, as flashkd's does.
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, temperature=1.0)
    return lambda x: loss(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["targets"])


PROVIDERS = {
    "flashkd": Provider(_flashkd),
    "flashkd-dw-in-dtype": Provider(_flashkd_dw_in_dtype),
    "torch": Provider(_torch),
    "torch.compile": Provider(_compiled, per_shape_warmup=True),
    "liger": Provider(_liger, per_shape_warmup=True),
    _linear.GEMM: _linear.GEMM_PROVIDER,
}


def errors(case, inputs, outputs):
    """Errors against reference.linear_distill_loss in float64 (see _linear.oracle_errors)."""
    teacher_hidden = inputs.tensors["teacher_hidden"]
    teacher_weight = inputs.tensors["teacher_weight"].double()

    def oracle_sum(h, w, rows):
        return reference.linear_distill_loss(h, w, teacher_hidden[rows].double(), teacher_weight,
                                             divergence="jsd", beta=BETA, reduction="sum")

    return _linear.oracle_errors(inputs, outputs, oracle_sum)
