"""Token merging (ToMe) patched into :class:`flashkd.models.VisionTransformer`.

Each block runs exactly what ToMe's timm patch (facebookresearch/ToMe,
``tome/patch/timm.py``) runs: attention, with proportional attention (log of
each token's size added to the attention logits) once tokens have been merged;
the residual ``x = x + attn``; then, when the layer's r > 0, bipartite soft
matching on the keys averaged over heads with the class token protected,
``x, size = merge_wavg(merge, x, size)`` (and ``merge_source`` when sources are
traced); then the MLP. Sizes and sources start afresh at each forward.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["patch", "unpatch", "parse_r", "ToMe"]

RSchedule = Union[int, Sequence[int], Tuple[int, float]]


def parse_r(num_layers: int, r: RSchedule) -> List[int]:
    """Tokens merged away per layer, as ToMe's ``parse_r``:

    - int: the same r in every layer;
    - list: one r per layer, padded with zeros when shorter than the model;
    - tuple (r, inflection), inflection in [-1, 1]: a linear schedule from
      ``int(r * (1 - inflection))`` to ``2 r - int(r * (1 - inflection))``,
      each layer's value truncated to an int; 0 is constant r, -1 ToMe's
      "decreasing schedule" (2r first, 0 last), +1 increasing.

    Each layer then merges at most half of its non-class tokens (ToMe's cap,
    applied inside ``bipartite_soft_matching``).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be (r, inflection), got {r!r}")
        r, inflection = r
        if not isinstance(inflection, numbers.Real) or isinstance(inflection, bool) or not -1 <= inflection <= 1:
            raise ValueError(f"r's inflection must be a number in [-1, 1], got {inflection!r}")
        _check_count("r", r)
        low = int(r * (1.0 - inflection))
        high = 2 * r - low
        step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0  # ToMe divides by zero here
        return [int(low + step * i) for i in range(num_layers)]
    if isinstance(r, Sequence) and not isinstance(r, str):
        r = list(r)
        if len(r) > num_layers:
            raise ValueError(f"r lists {len(r)} layers but the model has {num_layers}")
        for i, value in enumerate(r):
            _check_count(f"r[{i}]", value)
        return r + [0] * (num_layers - len(r))
    _check_count("r", r)
    return [int(r)] * num_layers


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


class _ToMeForward:
    """One forward's merging state: token sizes (B, T, 1) and sources (B, T, T0)."""

    def __init__(self, owner: "ToMe"):
        self.owner = owner
        self.size: Optional[torch.Tensor] = None
        self.source: Optional[torch.Tensor] = None

    def attention_bias(self, layer):
        if not self.owner.prop_attn or self.size is None:
            return None
        return self.owner.impl.attention_bias(self.size)

    def needs(self, layer):
        return self.owner.r[layer] > 0, False

    def reduce(self, layer, x, attn):
        r = self.owner.r[layer]
        if r <= 0:
            return x
        impl = self.owner.impl
        merge, _ = impl.bipartite_soft_matching(attn.metric, r, class_token=True)
        if self.owner.trace_source:
            self.source = impl.merge_source(merge, x, self.source)
        x, self.size = impl.merge_wavg(merge, x, self.size)
        return x


class ToMe:
    """The :class:`~flashkd.models.vit.TokenReduction` that :func:`patch` installs.

    r: the per-layer schedule (a list; assign a new :func:`parse_r` result to change it).
    impl: the module providing the merging functions.
    source: after a forward with ``trace_source``, (B, T', num_tokens) 0/1
        rows telling which input tokens each output token holds; else None.
    size: after a forward, (B, T', 1) token sizes (None when nothing merged).
    """

    def __init__(self, r: List[int], *, trace_source: bool, prop_attn: bool, impl):
        self.r, self.trace_source, self.prop_attn, self.impl = r, trace_source, prop_attn, impl
        self._last: Optional[_ToMeForward] = None

    def start(self, x):
        self._last = _ToMeForward(self)
        return self._last

    @property
    def source(self):
        return None if self._last is None else self._last.source

    @property
    def size(self):
        return None if self._last is None else self._last.size

    def __repr__(self):
        return f"ToMe(r={self.r}, trace_source={self.trace_source}, prop_attn={self.prop_attn}, " \
               f"impl={getattr(self.impl, '__name__', self.impl)})"


def patch(model, r: RSchedule, *, trace_source: bool = False, prop_attn: bool = True, impl=None):
    """Apply ToMe to ``model`` (a :class:`flashkd.models.VisionTransformer`) in
    place and return it; any earlier token reduction is replaced.

    Args:
        r: tokens merged away per layer: an int, a per-layer list or
            ``(r, inflection)`` (see :func:`parse_r`).
        trace_source: track which input tokens each merged token holds
            (``model.token_reduction.source`` after a forward), for visualization.
        prop_attn: proportional attention, ToMe's default for evaluating
            off-the-shelf models (ToMe turns it off for training MAE models).
        impl: the module providing ``bipartite_soft_matching``, ``merge_wavg``,
            ``merge_source`` and ``attention_bias``: :mod:`flashkd.tome` (the
            kernels) by default; :mod:`flashkd.reference.tome` runs the
            pure-torch oracle in the same model.
    """
    from flashkd.models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a flashkd.models.VisionTransformer, got {type(model).__name__}")
    for name, flag in (("trace_source", trace_source), ("prop_attn", prop_attn)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if impl is None:
        import flashkd.tome as impl
    model.token_reduction = ToMe(parse_r(model.config.depth, r), trace_source=trace_source,
                                 prop_attn=prop_attn, impl=impl)
    return model


def unpatch(model):
    """Remove whatever token reduction (merging or pruning) ``model`` has; returns it."""
    from flashkd.models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a flashkd.models.VisionTransformer, got {type(model).__name__}")
    model.token_reduction = None
    return model
