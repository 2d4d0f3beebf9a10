"""QuantLinear: an nn.Linear whose matmul runs on quantized weights and
activations, for quantization-aware distillation (training form) and
inference (frozen form, packed weights)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._autocast import autocast_inputs
from ._ops import ops
from .formats import SCHEMES, check_group_size, check_scheme, int4_weights, int8_weights, pack, ternary_weights
from .functional import check_float_input, quant_linear

#: Buffers of the frozen form per scheme (besides the optional bias).
FROZEN_BUFFERS = {"w1.58a8": ("weight_packed", "weight_scale"), "w8a8": ("weight_int8", "weight_scale"),
                   "w4a16": ("weight_packed", "weight_scale", "weight_zero")}


def frozen_linear(x: torch.Tensor, buffers: dict, bias, scheme: str, group_size: int) -> torch.Tensor:
    """Inference-form forward from the frozen buffers (names as in QuantLinear.freeze())."""
    if scheme == "w4a16":
        return ops.int4_linear(x, buffers["weight_packed"], buffers["weight_scale"], buffers["weight_zero"],
                               group_size, None if bias is None else bias.to(x.dtype))
    qa, a_scale = ops.quantize_int8_rows(x)
    if scheme == "w8a8":
        return ops.int8_linear(qa, buffers["weight_int8"], a_scale, buffers["weight_scale"], bias, x.dtype)
    return ops.ternary_linear(qa, buffers["weight_packed"], a_scale, buffers["weight_scale"], bias, x.dtype)


def frozen_buffers(weight: torch.Tensor, scheme: str, group_size: int = 128, per_tensor: bool = False) -> dict:
    """The packed buffers of the inference form of a layer with this float weight."""
    w = weight.detach()
    if scheme == "w1.58a8":
        wq, scale = ternary_weights(w, per_tensor)
        values = (pack(wq, scheme), scale)
    elif scheme == "w8a8":
        values = int8_weights(w)
    else:
        q, scale, zero = int4_weights(w, group_size)
        values = (pack(q, scheme), scale, zero)
    return {name: v.contiguous() for name, v in zip(FROZEN_BUFFERS[scheme], values)}


class QuantLinear(nn.Module):
    """Linear layer with quantized matmuls.

    Schemes (``scheme=``):
      * ``"w1.58a8"``: ternary weights {-1, 0, +1} times an absmean scale (BitNet
        b1.58): gamma = mean |W| per output channel (the whole matrix with
        ``per_tensor=True``), accumulated in float64 and rounded to float32;
        Wq = clamp(rint(W / max(gamma, 1e-5)), -1, 1). Activations int8 per token.
      * ``"w8a8"``: int8 weights per output channel, s = max(max |W|, 1e-5) / 127,
        Wq = clamp(rint(W / s), -127, 127). Activations int8 per token.
      * ``"w4a16"``: 4-bit asymmetric weights per group of ``group_size`` input
        features (scale = max(max - min, 1e-5) / 15, zero = clamp(rint(-min /
        scale), 0, 15)); when ``group_size`` does not divide ``in_features`` the
        last group of each row is partial. Activations stay in their float dtype.

    Per-token int8 activations: scale = max(max |x|, 1e-5) / 127,
    q = clamp(rint(x * 127 / max(max |x|, 1e-5)), -128, 127).

    Training form (after construction): ``weight`` and ``bias`` are float
    parameters, quantized on every forward. w8a8 / w1.58a8 run the exact int8
    GEMM (int32 accumulation) with the dequantizing epilogue
    out = float(acc) * a_scale * w_scale + bias; w4a16 multiplies by the
    dequantized weight with ATen's GEMM (faster on CPU than packing each step).
    Backward is the straight-through estimator:
    grad_input = grad_out @ dequantized(W), grad_weight = grad_out^T @ input (the
    float input, not quantized), grad_bias = grad_out summed over tokens.

    Inference form (:meth:`freeze`): packed buffers ``weight_packed`` (ternary,
    4 per byte) + ``weight_scale``; ``weight_int8`` + ``weight_scale``; or
    ``weight_packed`` (int4, 2 per byte) + ``weight_scale`` + ``weight_zero``
    [out_features, groups]. Outputs equal the training form's bit for bit for
    w1.58a8 and w8a8; w4a16 runs the int4 kernel (float32 accumulation in
    another order: equal within float rounding). The frozen form has no
    gradients. ``state_dict`` round-trips in either form (load a frozen state
    into a frozen layer).

    Under ``torch.autocast`` the input is cast to the autocast dtype, and the
    output is in that dtype, as with ``nn.Linear``; the weight is quantized from
    its own (master) precision and the bias is added in float32, where
    ``nn.Linear`` would round both to the autocast dtype first.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: str,
                 group_size: int = 128, per_tensor: bool = False, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.scheme = check_scheme(scheme)
        self.group_size = check_group_size(group_size)
        if per_tensor and scheme != "w1.58a8":
            raise ValueError(f"per_tensor=True is only defined for scheme 'w1.58a8', got scheme {scheme!r}")
        self.in_features, self.out_features = in_features, out_features
        self.per_tensor = bool(per_tensor)
        self.frozen = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's initialization."""
        if self.frozen:
            raise RuntimeError("reset_parameters() needs the training form; this layer is frozen")
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, *, group_size: int = 128, per_tensor: bool = False):
        """A training-form QuantLinear holding a copy of ``linear``'s weight and bias."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme,
                    group_size=group_size, per_tensor=per_tensor, device=linear.weight.device,
                    dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def freeze(self) -> "QuantLinear":
        """Converts to the inference form in place (packed buffers; ``weight`` is removed). Returns self."""
        if self.frozen:
            return self
        buffers = frozen_buffers(self.weight, self.scheme, self.group_size, self.per_tensor)
        del self.weight
        for name, value in buffers.items():
            self.register_buffer(name, value)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.frozen = True
        return self

    def frozen_bytes_per_weight(self) -> float:
        """Bytes of packed weight storage (scales and zeros included) per weight."""
        if not self.frozen:
            raise RuntimeError("frozen_bytes_per_weight() needs a frozen layer (call freeze())")
        total = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in FROZEN_BUFFERS[self.scheme])
        return total / (self.in_features * self.out_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            return quant_linear(input, self.weight, self.bias, scheme=self.scheme, group_size=self.group_size,
                                per_tensor=self.per_tensor)
        check_float_input(input, "input", self.in_features)
        buffers = {name: getattr(self, name) for name in FROZEN_BUFFERS[self.scheme]}
        (x,) = autocast_inputs(input.device, input)
        return frozen_linear(x, buffers, self.bias, self.scheme, self.group_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state of the other form would otherwise fail as bare missing and
        # unexpected keys, or, under strict=False, be skipped and leave this
        # layer's weights as they were.
        has_frozen = any(prefix + name in state_dict for name in FROZEN_BUFFERS[self.scheme])
        has_training = prefix + "weight" in state_dict
        where = f"QuantLinear {prefix[:-1]!r}" if prefix else "QuantLinear"
        if has_frozen and not has_training and not self.frozen:
            raise RuntimeError(f"{where}: the state holds a frozen layer's packed buffers, but this layer is in "
                               "training form; call freeze() on it (or on the model) before loading")
        if has_training and not has_frozen and self.frozen:
            raise RuntimeError(f"{where}: the state holds a training-form weight, but this layer is frozen; load "
                               "it into the training form and freeze() after")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.scheme == "w4a16" else ""
        extra += ", per_tensor=True" if self.per_tensor else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme!r}{extra}, frozen={self.frozen}")


__all__ = ["QuantLinear", "SCHEMES", "frozen_linear", "frozen_buffers", "FROZEN_BUFFERS"]
