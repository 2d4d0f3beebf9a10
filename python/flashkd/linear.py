"""Fused linear losses: the LM head and the loss in one op, chunk by chunk, so
the [tokens x vocab] logits never exist in memory (DESIGN.md §3)."""
from __future__ import annotations

from typing import Optional

import torch

from ._autocast import autocast_inputs
from ._ops import GRAD_BIAS, GRAD_HIDDEN, GRAD_WEIGHT, cpu_gemm_dtype, linear_loss_namer, ops
from .functional import _as_int, _check_optional_tensor, _check_options, _check_tensor, _stats_dict


def _shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Position i predicts labels[i + 1] along the last (sequence) dim; the last
    position of each sequence is ignored. Only the small label tensor moves."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def _grad_mask(hidden, weight, bias) -> int:
    """Which gradients forward makes: none under torch.no_grad() / inference_mode (one
    GEMM per chunk instead of three)."""
    if not torch.is_grad_enabled():
        return 0
    mask = GRAD_HIDDEN if hidden.requires_grad else 0
    mask |= GRAD_WEIGHT if weight.requires_grad else 0
    mask |= GRAD_BIAS if bias is not None and bias.requires_grad else 0
    return mask


def _linear_loss(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, labels,
                 weights, *, divergence, temperature, beta, alpha, taid_lambda, ignore_index, hard_weight,
                 soft_weight, t2_scaling, vocab_size, label_smoothing, z_loss, softcap, reduction, num_items,
                 return_stats, return_lse, shift, chunk_budget_bytes, float32_weight_grad):
    name = linear_loss_namer(teacher_hidden, teacher_weight, teacher_logits)  # as the caller wrote them
    labels_name = name("labels")
    _check_tensor(hidden, name("hidden"))
    _check_tensor(weight, name("weight"))
    for arg, t in (("bias", bias), ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                   ("teacher_bias", teacher_bias), ("teacher_logits", teacher_logits), ("weights", weights)):
        _check_optional_tensor(t, name(arg))
    _check_options(divergence, reduction, taid_lambda)
    # Under torch.autocast the heads run in its dtype, as F.linear would (_autocast.py).
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = autocast_inputs(
        hidden.device, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    if labels is not None:
        _check_tensor(labels, labels_name)
        if labels.is_floating_point():
            raise TypeError(f"{labels_name} must be an integer tensor, got {labels.dtype}")
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"{labels_name} must have shape {list(hidden.shape[:-1])} ({name('hidden')} without "
                             f"its last dim), got {list(labels.shape)}")
        if shift:
            labels = _shift_labels(labels, ignore_index)
    elif shift:
        raise ValueError(f"shift=True needs {labels_name}")
    # reduction="none" makes its gradients in backward, from grad_output.
    mask = 0 if reduction == "none" else _grad_mask(hidden, weight, bias)
    detach = lambda t: None if t is None else t.detach()
    out = ops.linear_loss(
        hidden, weight, bias, detach(teacher_hidden), detach(teacher_weight), detach(teacher_bias),
        detach(teacher_logits), labels, weights, divergence, float(temperature), float(beta), float(alpha),
        None if taid_lambda is None else float(taid_lambda), _as_int(ignore_index, "ignore_index"),
        float(hard_weight), float(soft_weight), bool(t2_scaling), _as_int(vocab_size, "vocab_size", optional=True),
        float(label_smoothing), float(z_loss), None if softcap is None else float(softcap), reduction,
        None if num_items is None else float(num_items), bool(return_stats), bool(return_lse), mask, None,
        _as_int(chunk_budget_bytes, "chunk_budget_bytes", optional=True), bool(float32_weight_grad))
    loss, _dh, _dw, _db, lse, stats, agree = out
    return loss, lse, stats, agree


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items: Optional[float] = None,
    shift: bool = False,
    return_lse: bool = False,
    chunk_budget_bytes: Optional[int] = None,
    float32_weight_grad: bool = True,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without
    materializing the logits.

    Equals ``torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets,
    ignore_index=..., label_smoothing=..., reduction=...)`` (values and gradients
    for hidden, weight and bias), plus:

    - ``softcap`` s: logits z -> s * tanh(z / s) first (Gemma 2);
    - ``z_loss`` c: adds c * LSE^2 per valid token;
    - ``weights``: per-token non-negative weights; ``num_items`` overrides the
      mean's divisor (gradient accumulation);
    - ``shift``: position i predicts ``targets[..., i + 1]`` (no copy of hidden;
      the last position of each sequence is ignored);
    - ``return_lse``: also return the per-token float32 log-sum-exp (differentiable).

    hidden (..., D) and weight (V, D) in float32/bfloat16/float16 (same dtype;
    under ``torch.autocast`` both, and the bias, are cast to its dtype first, as
    F.linear casts them); gradients come back in the input dtypes, d(weight)
    summed over the token chunks in float32. ``float32_weight_grad=False`` sums
    it in the weight's dtype instead, as cut-cross-entropy does: for a 16-bit
    weight that takes a float32 copy of d(weight), twice the gradient's size
    (2.4 GB for Gemma-2-2B's head), off the peak memory, and rounds the sum
    once per chunk. It changes nothing for float32 weights; the LSE's own
    gradient (``return_lse``) is summed in float32 either way.
    ``chunk_budget_bytes`` bounds the logits held at once (default 32 MiB on
    CPU, 512 MiB on CUDA); peak extra memory is that plus the gradients. A
    larger budget means fewer, larger GEMMs: with bfloat16 on a CPU whose GEMMs
    are fast (oneDNN on AMX) that can pay, e.g. N=2048, D=512, V=32000 forward
    and backward took 246 ms at the default and 187 ms, the GEMMs' own time,
    at 128 MiB (2-core Sapphire Rapids VM, 2026-12-06).
    """
    loss, lse, _, _ = _linear_loss(
        hidden, weight, bias, None, None, None, None, targets, weights, divergence="fkl", temperature=1.0,
        beta=0.5, alpha=0.1, taid_lambda=None, ignore_index=ignore_index, hard_weight=1.0, soft_weight=0.0,
        t2_scaling=False, vocab_size=None, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        reduction=reduction, num_items=num_items, return_stats=False, return_lse=return_lse, shift=shift,
        chunk_budget_bytes=chunk_budget_bytes, float32_weight_grad=float32_weight_grad)
    return (loss, lse) if return_lse else loss


def linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    shift: bool = False,
    chunk_budget_bytes: Optional[int] = None,
    float32_weight_grad: bool = True,
    divergence: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    taid_lambda: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    weights: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    t2_scaling: bool = False,
    vocab_size: Optional[int] = None,
    reduction: str = "mean",
    num_items: Optional[float] = None,
    return_stats: bool = False,
):
    """:func:`flashkd.distill_loss` of the student head's logits against the
    teacher's, without ever holding either [tokens x vocab] logit matrix.

    The teacher is ``teacher_hidden`` (..., Dt) with ``teacher_weight`` (Vt, Dt)
    [+ ``teacher_bias``] — its logits computed chunk by chunk — or precomputed
    ``teacher_logits`` (..., Vt) of any float dtype; exactly one of the two.
    Vt >= V (the student's vocabulary): extra teacher columns are ignored.
    Student and teacher hidden sizes may differ. ``softcap`` applies to the
    student logits. Gradients flow to the student hidden, weight and bias only.
    Under ``torch.autocast`` both heads (hidden, weight, bias) are cast to its
    dtype first, as F.linear casts them; ``teacher_logits`` are not.
    Every other option is :func:`flashkd.distill_loss`'s.

    ``chunk_budget_bytes`` bounds the logits held at once: the student's chunk,
    plus the teacher's when it is computed from weights or converted to
    float32 (float64 teacher logits). The default gives the student's
    logits what :func:`linear_cross_entropy` gives them (32 MiB on CPU,
    512 MiB on CUDA) and the teacher's chunk the same number of rows.
    ``float32_weight_grad`` is :func:`linear_cross_entropy`'s: False sums the
    student's d(weight) over the chunks in its own dtype, not in float32.
    """
    if teacher_logits is None and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("give the teacher as teacher_hidden + teacher_weight, or as teacher_logits")
    loss, _, stats, agree = _linear_loss(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
        labels, weights, divergence=divergence, temperature=temperature, beta=beta, alpha=alpha,
        taid_lambda=taid_lambda, ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
        t2_scaling=t2_scaling, vocab_size=vocab_size, label_smoothing=0.0, z_loss=0.0, softcap=softcap,
        reduction=reduction, num_items=num_items, return_stats=return_stats, return_lse=False, shift=shift,
        chunk_budget_bytes=chunk_budget_bytes, float32_weight_grad=float32_weight_grad)
    return (loss, _stats_dict(stats, agree)) if return_stats else loss


def lse_backward(hidden, weight, bias, lse, grad_lse, softcap, chunk_budget_bytes, grad_mask, start):
    """start + the gradient of sum(grad_lse * lse) w.r.t. hidden/weight/bias, recomputing
    the logits tile by tile: d lse / d z = softmax(z) (times the cap's derivative).
    start: {"hidden"|"weight"|"bias": the loss's gradient or None}; the sum is formed in
    float32 (in place when start is float32) and rounded once to each input's dtype.

    The logits are recomputed as forward's head made them (head_gemm.h): in float32
    where the CPU has no fast 16-bit GEMM. Recomputed in 16 bits there, they would be
    off from the ones the LSE came from by their rounding (a float16 gradient was 10
    ulps off), and slow. Tiles of tokens x vocabulary keep the workspace within the
    budget: a tile's float32 logits and the weight panel (converted to float32 where
    the GEMMs run in it) each take at most a quarter of it; a tile's softmax is made
    in place, and float32 products are added in place."""
    h = hidden.reshape(-1, hidden.shape[-1])
    g = grad_lse.reshape(-1).float()
    budget = chunk_budget_bytes or ((512 << 20) if h.is_cuda else (32 << 20))
    V, D = weight.shape
    panel = min(V, max(1, budget // 4 // (D * 4)))
    chunk = max(1, budget // 4 // (panel * 4))
    in_float32 = h.device.type == "cpu" and cpu_gemm_dtype(h.dtype) != h.dtype
    as_gemm = (lambda t: t.float()) if in_float32 else (lambda t: t)

    def accumulator(name, like, wanted):
        if not wanted:
            return None
        s = start.get(name)
        return torch.zeros(like.shape, dtype=torch.float32, device=h.device) if s is None else \
            s.reshape(like.shape).float()

    def accumulate(acc, a, b):  # acc += a @ b, acc float32
        if a.dtype == torch.float32:
            acc.addmm_(a, b)
        else:
            acc += (a @ b).float()

    dh = accumulator("hidden", h, grad_mask & GRAD_HIDDEN)
    dw = accumulator("weight", weight, grad_mask & GRAD_WEIGHT)
    db = accumulator("bias", bias, grad_mask & GRAD_BIAS and bias is not None)
    lse_flat = lse.reshape(-1)
    for v0 in range(0, V, panel):
        cols = slice(v0, v0 + panel)
        w = as_gemm(weight[cols])
        b = None if bias is None else as_gemm(bias[cols])
        for r0 in range(0, h.shape[0], chunk):
            rows = slice(r0, r0 + chunk)
            hc = as_gemm(h[rows])
            dz = (hc @ w.T if b is None else torch.addmm(b, hc, w.T)).float()
            if softcap:
                # The capped logits as the kernel made them (torch.ops.flashkd.soft_cap), so
                # that exp(capped - lse) is their softmax; torch's tanh differs in the last bits.
                capped = ops.soft_cap(dz, softcap)
                # into the logits' buffer: two tiles alive, as the budget above counts
                dz = torch.sub(capped, lse_flat[rows, None], out=dz).exp_().mul_(g[rows, None])
                dz.mul_(capped.mul_(1.0 / softcap).square_().neg_().add_(1))  # the cap's derivative 1 - (capped / c)^2
                del capped
            else:
                dz.sub_(lse_flat[rows, None]).exp_().mul_(g[rows, None])
            dz = dz.to(hc.dtype)
            if dh is not None:
                accumulate(dh[rows], dz, w)
            if dw is not None:
                accumulate(dw[cols], dz.T, hc)
            if db is not None:
                db[cols] += dz.float().sum(0)
    return {"hidden": None if dh is None else dh.to(hidden.dtype).reshape(hidden.shape),
            "weight": None if dw is None else dw.to(weight.dtype),
            "bias": None if db is None else db.to(bias.dtype)}
