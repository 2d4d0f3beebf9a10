"""Token pruning by class-token attention (EViT, Liang et al. 2022) patched into
:class:`flashkd.models.VisionTransformer`.

In each listed layer, after the attention residual ``x = x + attn`` and before
the MLP, the layer keeps the class token and the ``ceil(keep_rate * (T - 1))``
other tokens the class token attends to most (attention probabilities averaged
over heads), in descending order of that attention; with ``fuse_remainder``
the dropped tokens are fused into one extra token appended last (their
attention-weighted average, see ``topk_tokens``), which later layers treat as
an ordinary token.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

__all__ = ["patch", "TokenPruning"]


class _PruneForward:
    def __init__(self, owner: "TokenPruning"):
        self.owner = owner

    def attention_bias(self, layer):
        return None

    def needs(self, layer):
        return False, layer in self.owner.layers

    def reduce(self, layer, x, attn):
        if layer not in self.owner.layers:
            return x
        patches = x.shape[1] - 1
        keep = 1 + math.ceil(self.owner.keep_rate * patches)
        if keep > patches:  # nothing to drop (and no empty fused token to add)
            return x
        x, _ = self.owner.impl.topk_tokens(x, attn.cls_attn, keep, fuse_remainder=self.owner.fuse_remainder,
                                           protect_first=True)
        return x


class TokenPruning:
    """The :class:`~flashkd.models.vit.TokenReduction` that :func:`patch` installs;
    stateless across a forward, so ``start`` hands out one shared reducer."""

    def __init__(self, keep_rate: float, layers: frozenset, *, fuse_remainder: bool, impl):
        self.keep_rate, self.layers, self.fuse_remainder, self.impl = keep_rate, layers, fuse_remainder, impl
        self._reducer = _PruneForward(self)

    def start(self, x):
        return self._reducer

    def __repr__(self):
        return f"TokenPruning(keep_rate={self.keep_rate}, layers={sorted(self.layers)}, " \
               f"fuse_remainder={self.fuse_remainder}, impl={getattr(self.impl, '__name__', self.impl)})"


def patch(model, keep_rate: float, layers: Iterable[int], *, fuse_remainder: bool = False, impl=None):
    """Prune tokens in ``model`` (a :class:`flashkd.models.VisionTransformer`) in
    place and return it; any earlier token reduction is replaced
    (``flashkd.tome.unpatch`` removes it).

    Args:
        keep_rate: share of the non-class tokens kept in each listed layer, in (0, 1]
            (EViT uses 0.7 at layers 3, 6, 9 of a 12-layer ViT, 0-based).
        layers: block indices (0-based) that prune.
        fuse_remainder: append one token fusing the dropped ones (EViT's
            "inattentive token fusion").
        impl: the module providing ``topk_tokens``: :mod:`flashkd.prune` (the
            kernels) by default; :mod:`flashkd.reference.tome` runs the
            pure-torch oracle in the same model.
    """
    from flashkd.models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a flashkd.models.VisionTransformer, got {type(model).__name__}")
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real) or not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
    if not isinstance(fuse_remainder, bool):
        raise TypeError(f"fuse_remainder must be a bool, got {type(fuse_remainder).__name__}")
    depth = model.config.depth
    layers = list(layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < depth:
            raise ValueError(f"layers must hold block indices in [0, {depth}), got {layer!r}")
    if impl is None:
        import flashkd.prune as impl
    model.token_reduction = TokenPruning(float(keep_rate), frozenset(int(i) for i in layers),
                                         fuse_remainder=fuse_remainder, impl=impl)
    return model
