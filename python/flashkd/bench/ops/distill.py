"""distill_loss cases: student and teacher logits [N, V], soft loss only, mean
over tokens, temperature 1 (the common training setting).

Providers:
  flashkd        flashkd.distill_loss
  torch          flashkd.reference.distill_loss, which computes in float32
                 whatever the input dtype: the eager baseline
  torch.compile  torch.compile of that reference, compiled afresh per case
  liger          liger-kernel's Triton losses (LigerKLDIVLoss, LigerJSD,
                 LigerTVDLoss) on float32 log-probs / probs made by torch from
                 the logits, since they take distributions, not logits (CUDA only)
"""
from __future__ import annotations

import torch

import flashkd
from flashkd import reference

from ..cases import DTYPES, Inputs, Provider, Unsupported, import_peer, under_kernel_choice
from ..errors import error_record

NAME = "distill_loss"
VARIANTS = ("fkl", "jsd", "rkl", "tvd")
# A bare run must stay short (a CPU's eager jsd alone takes tens of seconds per
# call at the acceptance shape; a GPU run also measures the linear ops), so it
# measures the two divergences the issue names.
DEFAULT_VARIANTS = {"cpu": ("fkl", "jsd"), "cuda": ("fkl", "jsd")}
SHAPE_SETS = {
    "quick": ("256x8192:fp32", "256x8192:bf16"),
    "overview": ("1024x32000:fp32",),
    "accept": ("4096x32000:fp32",),  # the CPU acceptance shape
    "cpu": ("4096x32000:fp32", "4096x32000:bf16", "1024x128256:fp32"),
    "gpu": ("8192x32000:bf16", "8192x128256:bf16", "8192x256000:bf16"),
    "gpu-target": ("8192x128256:bf16",),  # the GPU target
}
DEFAULT_SHAPES = {"cpu": "overview", "cuda": "gpu-target"}

# Rows of float64 oracle evaluated at once: bounds its memory at any shape.
_ORACLE_CHUNK_ELEMENTS = 1 << 25


def parse_shape(spec):
    """"NxV:dtype" -> ("NxV", dtype)."""
    shape, _, dtype = spec.partition(":")
    dims = shape.lower().split("x")
    if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims) or dtype not in DTYPES:
        raise ValueError(f"{NAME} shape must look like 4096x32000:fp32 (dtype in {', '.join(DTYPES)}), got {spec!r}")
    return f"{int(dims[0])}x{int(dims[1])}", dtype


def _dims(case):
    n, v = case.shape.split("x")
    return int(n), int(v)


def make_inputs(case, device, seed):
    n, v = _dims(case)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    student = torch.randn(n, v, generator=gen, device=device, dtype=dtype).mul_(2).requires_grad_()
    teacher = torch.randn(n, v, generator=gen, device=device, dtype=dtype).mul_(2)
    return Inputs({"student": student, "teacher": teacher}, ("student",))


def accuracy_inputs(inputs, max_elements):
    """The inputs themselves when the oracle can afford them, else their first
    and last rows (rows are independent; the last ones exercise large offsets)."""
    student, teacher = inputs.tensors["student"], inputs.tensors["teacher"]
    n, v = student.shape
    keep = max(2, max_elements // v)
    if keep >= n:
        return inputs
    rows = torch.cat([torch.arange(keep // 2), torch.arange(n - (keep - keep // 2), n)]).to(student.device)
    return Inputs({"student": student.detach()[rows].requires_grad_(), "teacher": teacher[rows]}, ("student",))


def floor_bytes(case):
    """Both logits read once and the gradient written once."""
    n, v = _dims(case)
    return 3 * n * v * DTYPES[case.dtype].itemsize


def _flashkd(case, device):
    if device.type == "cuda" and not flashkd.has_cuda_kernels():
        raise Unsupported("this flashkd build has no CUDA kernels")
    return lambda x: flashkd.distill_loss(x["student"], x["teacher"], divergence=case.variant)


def _flashkd_stream(case, device):
    """flashkd's streaming kernel where the cluster kernel is the default (an H100)."""
    if device.type != "cuda" or not flashkd.has_cuda_kernels():
        raise Unsupported("a CUDA kernel choice")
    select = torch.ops.flashkd.distill_cuda_kernel
    try:
        select("cluster")
    except (RuntimeError, ValueError):
        raise Unsupported("no cluster kernel here: flashkd runs the streaming kernel already") from None
    finally:
        select("", True)
    return under_kernel_choice(_flashkd(case, device), select, "stream")


def _torch(case, device):
    return lambda x: reference.distill_loss(x["student"], x["teacher"], divergence=case.variant)


def _compiled(case, device):
    # A fresh compile per case: past torch._dynamo's recompile limit a reused
    # function would silently run eager and be reported as compiled.
    torch._dynamo.reset()
    fn = torch.compile(reference.distill_loss, dynamic=False)
    return lambda x: fn(x["student"], x["teacher"], divergence=case.variant)


def _liger(case, device):
    if device.type != "cuda":
        raise Unsupported("liger-kernel runs Triton kernels: CUDA only")
    LigerJSD, LigerKLDIVLoss, LigerTVDLoss = import_peer(
        "liger-kernel", "liger_kernel.transformers", "LigerJSD", "LigerKLDIVLoss", "LigerTVDLoss")

    def logp(z):
        return torch.log_softmax(z.float(), dim=-1)

    if case.variant == "tvd":
        tvd = LigerTVDLoss(reduction="batchmean")  # gradient flows to its first argument
        probs = lambda z: torch.softmax(z.float(), dim=-1)  # noqa: E731
        return lambda x: tvd(probs(x["student"]), probs(x["teacher"]))
    if case.variant == "fkl":
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)  # KL(target || input)
        return lambda x: kl(logp(x["student"]), logp(x["teacher"]))
    # LigerJSD(beta) weights KL(teacher || mixture) by beta; beta = 1 is KL(student || teacher).
    jsd = LigerJSD(beta={"jsd": 0.5, "rkl": 1.0}[case.variant])
    return lambda x: jsd(logp(x["student"]), logp(x["teacher"]))


PROVIDERS = {
    "flashkd": Provider(_flashkd),
    "flashkd-stream": Provider(_flashkd_stream),
    "torch": Provider(_torch),
    "torch.compile": Provider(_compiled, per_shape_warmup=True),
    "liger": Provider(_liger, per_shape_warmup=True),
}


def errors(case, inputs, outputs):
    """Each provider's loss relative error and gradient errors against
    reference.distill_loss in float64 on the same inputs.

    The oracle runs once for all providers, over row chunks (the mean is a sum
    of independent rows divided by N), so it fits in memory at any shape.
    ``grad_err`` is the largest absolute gradient error divided by the largest
    oracle gradient, comparable across N (mean-reduced gradients scale as 1/N).
    """
    student, teacher = inputs.tensors["student"].detach(), inputs.tensors["teacher"]
    n, v = student.shape
    rows = max(1, _ORACLE_CHUNK_ELEMENTS // v)
    loss_sum = torch.zeros((), dtype=torch.float64, device=student.device)
    ref_max = torch.zeros_like(loss_sum)
    diff_max = {name: torch.zeros_like(loss_sum) for name in outputs}
    for r0 in range(0, n, rows):
        s = student[r0:r0 + rows].double().requires_grad_()
        part = reference.distill_loss(s, teacher[r0:r0 + rows].double(), divergence=case.variant, reduction="sum")
        (grad,) = torch.autograd.grad(part, s)
        grad /= n
        loss_sum += part.detach()
        ref_max = torch.maximum(ref_max, grad.abs().max())
        for name, (_, grads) in outputs.items():
            got = grads["student"][r0:r0 + rows].to(device=grad.device, dtype=torch.float64)
            diff_max[name] = torch.maximum(diff_max[name], (got - grad).abs().max())  # NaN propagates
    ref_loss = loss_sum.item() / n
    return {name: error_record(abs(loss - ref_loss), ref_loss, {"student": (diff_max[name].item(), ref_max.item())})
            for name, (loss, _) in outputs.items()}
