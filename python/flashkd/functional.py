"""User-facing fused losses. Validation of Python-level options happens here;
shape, dtype and range checks live in the C++ glue, which names the argument."""
from __future__ import annotations

import operator
from typing import Optional

import torch

from ._ops import NUM_STATS, first_order_only, ops, scale_saved_grad

DIVERGENCES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "taid")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
STAT_NAMES = ("divergence", "student_entropy", "teacher_entropy", "student_logprob", "teacher_logprob")
assert len(STAT_NAMES) == NUM_STATS


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_optional_tensor(x, name):
    if x is not None:
        _check_tensor(x, name)


def _as_int(x, name, optional=False):
    """x as a Python int (an int, a NumPy integer or an integer 0-d tensor);
    a float, even an integral one, is an error rather than truncated."""
    if x is None and optional:
        return None
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must fit in 64 bits, got {value}")
    return value


def _check_options(divergence, reduction, taid_lambda):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if divergence == "taid" and taid_lambda is None:
        raise ValueError("divergence='taid' needs taid_lambda (see flashkd.TAIDSchedule)")


def _stats_dict(stats, agree):
    out = {name: stats[..., i] for i, name in enumerate(STAT_NAMES)}
    out["agree"] = agree
    return out


class _DistillInplace(torch.autograd.Function):
    """distill_loss(inplace_backward=True): the gradient overwrites the student logits."""

    @staticmethod
    def forward(ctx, student, teacher, labels, weights, *options):
        loss, stats, agree = ops.distill_loss_(student, teacher, labels, weights, *options)
        ctx.save_for_backward(student)
        ctx.mark_non_differentiable(stats, agree)
        return loss, stats, agree

    @staticmethod
    @first_order_only("distill_loss")
    def backward(ctx, grad_loss, _grad_stats, _grad_agree):
        (grad,) = ctx.saved_tensors
        return (scale_saved_grad(grad, grad_loss),) + (None,) * 16


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
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
    inplace_backward: bool = False,
):
    """Fused distillation loss on logits, forward and gradient in one pass.

    Computes ``hard_weight * CE(student, labels) + soft_weight * c * D(p || q)``
    per token, with ``q = softmax(student / T)``, ``p = softmax(teacher / T)``,
    ``c = T**2`` if ``t2_scaling`` else 1, and ``D`` chosen by ``divergence``:

    ======  ==================================================  ===========
    fkl     KL(p || q)
    rkl     KL(q || p)
    jsd     beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q   beta in (0,1)
    skl     KL(p || alpha p + (1-alpha) q)                      alpha in [0,1)
    srkl    KL(q || (1-alpha) p + alpha q)                      alpha in [0,1)
    tvd     1/2 sum |p - q|
    taid    KL(r || q), r = softmax(((1-l) sg(z_s) + l z_t) / T)  l = taid_lambda
    ======  ==================================================  ===========

    Args:
        student_logits, teacher_logits: (..., V) float32/bfloat16/float16, any
            strides, dtypes may differ. Only the student receives gradient.
        labels: (...) integer labels for the hard cross-entropy (at T = 1) and
            for masking: tokens whose label is ``ignore_index`` contribute 0 and
            get zero gradient. Required when ``hard_weight > 0``.
        weights: (...) non-negative per-token weights multiplying each loss.
        vocab_size: columns >= vocab_size are padding, excluded from both softmaxes.
        reduction: "none" (per token), "sum", "mean" = "batchmean" (sum / number
            of non-ignored tokens, or / ``num_items`` when given).
        return_stats: also return a dict of per-token float32 tensors
            "divergence", "student_entropy", "teacher_entropy" (at temperature T),
            "student_logprob", "teacher_logprob" (log-prob of the label at T; 0
            where there is none) and bool "agree" (argmax equal), from the same pass.
        inplace_backward: write the gradient into ``student_logits``' storage
            during forward, saving one [..., V] buffer. The student logits are
            destroyed: do not read them afterwards, and do not use this when
            another op saved them for its own backward. Ignored when no
            gradient is needed.

    A NaN or +inf among a counted token's logits (student or teacher) makes
    its loss, its gradient row and its statistics of that side NaN, as
    ``log_softmax`` does; -inf entries are masked classes; an ignored token
    stays 0 whatever its logits hold.

    When no gradient is needed (``torch.no_grad()``, or student logits that do
    not require grad) only the loss is computed: no gradient buffer, and the
    kernel skips the gradient's sweep.

    Returns:
        The loss (0-d float32, or float32 of shape (...) for "none"), and with
        ``return_stats`` a ``(loss, stats)`` pair.
    """
    _check_tensor(student_logits, "student_logits")
    _check_tensor(teacher_logits, "teacher_logits")
    _check_optional_tensor(labels, "labels")
    _check_optional_tensor(weights, "weights")
    _check_options(divergence, reduction, taid_lambda)
    if hard_weight > 0 and labels is None:
        raise ValueError("hard_weight > 0 needs labels")
    options = (
        divergence, float(temperature), float(beta), float(alpha),
        None if taid_lambda is None else float(taid_lambda), _as_int(ignore_index, "ignore_index"),
        float(hard_weight), float(soft_weight), bool(t2_scaling), _as_int(vocab_size, "vocab_size", optional=True),
        reduction,
        None if num_items is None else float(num_items), bool(return_stats),
    )
    teacher = teacher_logits.detach()
    if not (torch.is_grad_enabled() and student_logits.requires_grad):
        # Nothing will call backward: the loss alone, no gradient sweep, no [..., V] buffer.
        loss, stats, agree = ops.distill_loss_value(student_logits, teacher, labels, weights, *options)
    elif inplace_backward:
        loss, stats, agree = _DistillInplace.apply(student_logits, teacher, labels, weights, *options)
    else:
        loss, _grad, stats, agree = ops.distill_loss(student_logits, teacher, labels, weights, *options)
    return (loss, _stats_dict(stats, agree)) if return_stats else loss
