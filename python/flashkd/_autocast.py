"""torch.autocast for flashkd's ops that multiply by a weight (the linear losses,
QuantLinear): inside an enabled autocast region they cast their floating-point
activations, weights and biases to the autocast dtype first, as torch's own
F.linear does, so that swapping a head + loss for the fused op needs no cast by
hand; outside one, inputs are taken as they are. The losses themselves stay
float32 (torch runs cross-entropy and softmax in float32 under autocast too).
The casts are ordinary autograd ops: a float32 master weight gets a float32
gradient.

Op bodies never see autocast: an op's result dtype must not depend on it,
or its fake (meta) implementation, which torch.compile traces, would disagree.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in effect for `device`, or None where autocast is off."""
    if device.type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def autocast_inputs(device: torch.device, *tensors):
    """`tensors` (None allowed), floating-point ones cast to the autocast dtype of
    `device` when autocast is on there; unchanged otherwise."""
    dt = autocast_dtype(device)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def autocast_off(device: torch.device):
    """A context in which torch's own ops on `device` do not autocast (for op bodies)."""
    if device.type not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
