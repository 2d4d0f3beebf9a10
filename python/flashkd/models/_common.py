"""What the two reference models share: the checks every transformer shape
needs, presets by name, a model built from a config or a preset's name, and
the parameter count."""
from __future__ import annotations

import dataclasses

from torch import nn


class TransformerConfig:
    """Base of the frozen config dataclasses (:class:`LMConfig`, :class:`ViTConfig`).

    A subclass has the fields ``dim``, ``n_heads``, ``norm_eps`` and ``init_std``,
    and sets ``KIND`` (the model's name in messages), ``POSITIVE_INTS`` (its int
    fields that must be >= 1) and ``_presets()`` (its named configs). Checks of
    its own go in its ``__post_init__``, after ``super().__post_init__()``.
    """

    KIND = ""
    POSITIVE_INTS: tuple = ()

    def __post_init__(self):
        cls = type(self).__name__
        for name in self.POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{cls}.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"{cls}.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if not self.norm_eps > 0:
            raise ValueError(f"{cls}.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std > 0:
            raise ValueError(f"{cls}.init_std must be > 0, got {self.init_std!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def _presets(cls) -> dict:
        raise NotImplementedError

    @classmethod
    def preset(cls, name: str, **overrides):
        """A named preset (the module's PRESETS or VIT_PRESETS), with any field overridden."""
        presets = cls._presets()
        if name not in presets:
            raise ValueError(f"unknown {cls.KIND} preset {name!r}; choose from {sorted(presets)}")
        return dataclasses.replace(presets[name], **overrides)

    @classmethod
    def resolve(cls, config):
        """``config`` itself, or the preset it names."""
        if isinstance(config, str):
            config = cls.preset(config)
        if not isinstance(config, cls):
            raise TypeError(f"config must be an instance of {cls.__name__} or a preset name, "
                            f"got {type(config).__name__}")
        return config


class ReferenceModel(nn.Module):
    """Base of the reference models: the parameter count, in the repr too."""

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tensor shared by two modules counts once)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"params={self.num_parameters():,}"
