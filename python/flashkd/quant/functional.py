"""Functional forms of the quantized matmuls, with argument checks that name
the bad argument. The module API is :class:`flashkd.quant.QuantLinear`."""
from __future__ import annotations

from typing import Optional

import torch

from .._autocast import autocast_inputs
from ._ops import ops, qat_linear
from .formats import check_group_size, check_scheme

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float_input(x, name: str = "input", in_features: Optional[int] = None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim")
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(f"{name}.shape[-1] must equal in_features ({in_features}), got {x.shape[-1]}")


def quantize_activations(x: torch.Tensor):
    """Per-token int8 quantization of x [..., K]: (q int8 [..., K], scale float32 [...]).

    scale = max(max_k |x|, 1e-5) / 127 and q = clamp(rint(x * 127 / max(max_k |x|, 1e-5)), -128, 127).
    """
    check_float_input(x, "x")
    return ops.quantize_int8_rows(x)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulators a [..., K] @ w [N, K]^T of int8 tensors."""
    return ops.int8_linear(a, w)


def ternary_matmul(a: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulators of int8 a [..., K] against packed ternary weights [N, ceil(K/4)]."""
    return ops.ternary_linear(a, w_packed)


def int4_linear(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ ((q - zero) * scale)^T + bias from packed int4 weights, accumulated in float32, in x's dtype.

    ``zero`` holds integers in [0, 15] (as ``int4_weights`` makes them): the CUDA tensor-core path
    (bf16/fp16 x with more than 16 rows, ``group_size`` a multiple of 32) forms q - zero exactly in
    x's dtype, which a fractional zero would round.
    """
    check_float_input(x, "x")
    check_group_size(group_size)
    return ops.int4_linear(x, w_packed, scale, zero, group_size, bias)


def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, scheme: str,
                 group_size: int = 128, per_tensor: bool = False) -> torch.Tensor:
    """Training-form quantized linear (see :class:`flashkd.quant.QuantLinear`), differentiable by the STE."""
    check_scheme(scheme)
    check_group_size(group_size)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a float 2-D tensor [out_features, in_features]")
    check_float_input(x, "input", weight.shape[1])
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape [out_features] ({weight.shape[0]}), got {list(bias.shape)}")
    (x,) = autocast_inputs(x.device, x)  # under torch.autocast: see QuantLinear
    return qat_linear(x, weight, bias, scheme, group_size, bool(per_tensor))[0]


def cpu_int8_kernel() -> str:
    """Which int8 dot product the CPU int8 GEMM runs here: "avx512-vnni",
    "avx512", "avx2" or "generic" (follows flashkd.cpu_isa). The ternary GEMM
    runs vpdpbusd under "avx512-vnni", scalar code under "generic", and
    vpmaddubsw otherwise."""
    return ops.quant_cpu_dot_kind()
