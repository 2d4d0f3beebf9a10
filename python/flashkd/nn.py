"""nn.Module forms of the fused losses: the module holds the options, the call
takes the tensors. Options that change during training (``taid_lambda``) may
also be given per call."""
from __future__ import annotations

import torch

from . import functional as F
from . import linear as L

__all__ = ["DistillLoss", "LinearDistillLoss", "LinearCrossEntropyLoss"]


def _options(cls_name, fn, options, tensor_args):
    for name in tensor_args:
        if name in options:
            raise TypeError(f"{cls_name}: pass {name} when calling the module, not to its constructor")
    unknown = set(options) - set(fn.__kwdefaults__)
    if unknown:
        raise TypeError(f"{cls_name} got unknown options {sorted(unknown)}")
    return dict(options)


def _dry_run(cls_name, options, call):
    """Checks the options where they are set, not at the first batch: call(options,
    vocab) runs the op once on one token of zero logits with label 0 (the op's own
    checks: one source of truth). taid_lambda, which may come per call, is stood in for."""
    opts = dict(options)
    if opts.get("divergence") == "taid" and opts.get("taid_lambda") is None:
        opts["taid_lambda"] = 0.5
    vocab = opts.get("vocab_size")
    if vocab is not None and not (isinstance(vocab, int) and vocab >= 1):
        raise ValueError(f"{cls_name}: vocab_size must be an int >= 1, got {vocab!r}")
    try:
        with torch.no_grad():
            call(opts, vocab or 2)  # a vocabulary of exactly vocab_size
    except (ValueError, TypeError) as e:
        raise type(e)(f"{cls_name}: {e}") from None


def _zeros(*shape, dtype=torch.float32):
    # On the CPU whatever the default device (a meta-device context would skip the checks)
    return torch.zeros(*shape, dtype=dtype, device="cpu")


class DistillLoss(torch.nn.Module):
    """Module form of :func:`flashkd.distill_loss`; accepts the same keyword options.

    ``loss = DistillLoss(divergence="skl", alpha=0.1)(student_logits, teacher_logits, labels=labels)``
    """

    _TENSORS = ("labels", "weights")

    def __init__(self, **options):
        super().__init__()
        self.options = _options("DistillLoss", F.distill_loss, options, self._TENSORS)
        _dry_run("DistillLoss", self.options, lambda o, v: F.distill_loss(
            _zeros(1, v), _zeros(1, v), labels=_zeros(1, dtype=torch.long), **o))

    def forward(self, student_logits, teacher_logits, labels=None, weights=None, **per_call):
        return F.distill_loss(student_logits, teacher_logits, labels=labels, weights=weights,
                              **{**self.options, **per_call})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearDistillLoss(torch.nn.Module):
    """Module form of :func:`flashkd.linear_distill_loss`; accepts the same keyword options.

    ``loss_fn = LinearDistillLoss(divergence="fkl", temperature=2.0, hard_weight=0.5, soft_weight=0.5)``
    ``loss = loss_fn(student_hidden, student.head_weight, teacher_hidden, teacher.head_weight, labels=labels)``

    The teacher is ``teacher_hidden`` + ``teacher_weight`` or ``teacher_logits``.
    Options that change during training (``taid_lambda``) may be given per call.
    """

    _TENSORS = ("teacher_logits", "labels", "weights", "student_bias", "teacher_bias")

    def __init__(self, **options):
        super().__init__()
        self.options = _options("LinearDistillLoss", L.linear_distill_loss, options, self._TENSORS)
        _dry_run("LinearDistillLoss", self.options, lambda o, v: L.linear_distill_loss(
            _zeros(1, 1), _zeros(v, 1), teacher_logits=_zeros(1, v), labels=_zeros(1, dtype=torch.long), **o))

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                teacher_logits=None, labels=None, weights=None, student_bias=None, teacher_bias=None, **per_call):
        for name in self._TENSORS:
            if name in per_call:
                raise TypeError(f"LinearDistillLoss: duplicate argument {name}")
        return L.linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                     teacher_logits=teacher_logits, labels=labels, weights=weights,
                                     student_bias=student_bias, teacher_bias=teacher_bias,
                                     **{**self.options, **per_call})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`flashkd.linear_cross_entropy`; accepts the same keyword options.

    ``loss = LinearCrossEntropyLoss(shift=True)(hidden, model.head_weight, tokens)``
    """

    _TENSORS = ("bias", "weights")

    def __init__(self, **options):
        super().__init__()
        self.options = _options("LinearCrossEntropyLoss", L.linear_cross_entropy, options, self._TENSORS)
        _dry_run("LinearCrossEntropyLoss", self.options, lambda o, v: L.linear_cross_entropy(
            _zeros(1, 1), _zeros(2, 1), _zeros(1, dtype=torch.long), **o))

    def forward(self, hidden, weight, targets, bias=None, weights=None, **per_call):
        return L.linear_cross_entropy(hidden, weight, targets, bias, weights=weights,
                                      **{**self.options, **per_call})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
