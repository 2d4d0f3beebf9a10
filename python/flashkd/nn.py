"""nn.Module forms of the fused losses: the module holds the options, the call
takes the tensors."""
from __future__ import annotations

import torch

from . import functional as F


class DistillLoss(torch.nn.Module):
    """Module form of :func:`flashkd.distill_loss`; accepts the same keyword options.

    ``loss = DistillLoss(divergence="skl", alpha=0.1)(student_logits, teacher_logits, labels=labels)``.
    ``taid_lambda`` may be given per call (it changes during training).
    """

    def __init__(self, **options):
        super().__init__()
        for name in ("labels", "weights"):
            if name in options:
                raise TypeError(f"DistillLoss: pass {name} when calling the module, not to its constructor")
        unknown = set(options) - set(F.distill_loss.__kwdefaults__)
        if unknown:
            raise TypeError(f"DistillLoss got unknown options {sorted(unknown)}")
        F._check_options(options.get("divergence", "fkl"), options.get("reduction", "mean"),
                         options.get("taid_lambda", 0.0))
        self.options = options

    def forward(self, student_logits, teacher_logits, labels=None, weights=None, **per_call):
        return F.distill_loss(student_logits, teacher_logits, labels=labels, weights=weights,
                              **{**self.options, **per_call})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
