"""quantize_student: swap a model's nn.Linear layers for QuantLinear in place."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from .formats import check_group_size, check_scheme
from .linear import QuantLinear


def quantize_student(model: nn.Module, scheme: str, *, skip: Iterable[str] = ("lm_head",), group_size: int = 128,
                     per_tensor: bool = False) -> nn.Module:
    """Replaces every nn.Linear of ``model`` by a training-form :class:`QuantLinear`
    (weight and bias copied) in place, and returns ``model``.

    A layer is left alone when its qualified name (``"blocks.0.mlp.up"``) or the
    last component of it (``"up"``) is in ``skip``. Layers that are already
    QuantLinear are untouched. Call ``.freeze()`` on the layers (or
    :func:`freeze_student`) for inference.
    """
    check_scheme(scheme)
    check_group_size(group_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        raise TypeError("skip must be a collection of module names, not a single string")
    skip = set(skip)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name not in skip and name.rsplit(".", 1)[-1] not in skip]
    for name, linear in targets:
        if not name:
            raise ValueError("model itself is an nn.Linear; use QuantLinear.from_linear(model, scheme) instead")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear.from_linear(linear, scheme, group_size=group_size, per_tensor=per_tensor))
    return model


def freeze_student(model: nn.Module) -> nn.Module:
    """Freezes every QuantLinear of ``model`` (inference form, packed weights); returns ``model``."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.freeze()
    return model
