"""The accuracy record of a benchmark case. Each op's ``errors()`` compares a
provider's result with its float64 oracle and reports it through
:func:`error_record`, so that the columns mean the same thing for every op."""
from __future__ import annotations

import math

import torch

# A zero oracle value divides as this: the relative error is then huge or 0, never an exception.
_TINY = 1e-300


def max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in float64 on want's device; a NaN anywhere gives NaN."""
    return (got.to(device=want.device, dtype=torch.float64) - want.double()).abs().max().item()


def error_record(loss_err: float, loss_ref: float, grads: dict) -> dict:
    """``loss_rel_err`` = loss_err / |loss_ref| (for an op whose output is a tensor:
    its largest error over its largest oracle value). ``grads`` maps each
    gradient to (its largest absolute error, its largest oracle magnitude):
    ``grad_err`` is the worst relative error among them (a NaN the worst of all)
    and ``grad_max_abs_err`` that gradient's absolute error; with several,
    ``grad_err_<name>`` is each one's. Without gradients (a forward-only
    provider) the record has the loss error only."""
    record = {"loss_rel_err": loss_err / max(abs(loss_ref), _TINY)}
    if grads:
        rel = {leaf: err / max(ref, _TINY) for leaf, (err, ref) in grads.items()}
        worst = max(rel, key=lambda leaf: (math.isnan(rel[leaf]), rel[leaf]))
        record.update(grad_err=rel[worst], grad_max_abs_err=grads[worst][0])
        if len(grads) > 1:
            record.update({f"grad_err_{leaf}": value for leaf, value in rel.items()})
    return record
