"""Fake kernels of the quantized-matmul ops (csrc/ops/quant.cpp) and the
training-form linear ``flashkd::qat_linear`` with its straight-through
estimator backward."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ops as _loaded  # noqa: F401  (loads the compiled library)
from .formats import dequantized_weight, int4_dequantize, int4_weights, int8_weights, ternary_weights

ops = torch.ops.flashkd


@torch.library.register_fake("flashkd::quantize_int8_rows")
def _quantize_int8_rows_fake(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _gemm_out(a, n, a_scale, out_dtype):
    return a.new_empty((*a.shape[:-1], n), dtype=torch.int32 if a_scale is None else out_dtype)


@torch.library.register_fake("flashkd::int8_linear")
def _int8_linear_fake(a, w, a_scale=None, w_scale=None, bias=None, out_dtype=None):
    return _gemm_out(a, w.shape[0], a_scale, out_dtype)


@torch.library.register_fake("flashkd::ternary_linear")
def _ternary_linear_fake(a, w_packed, a_scale=None, w_scale=None, bias=None, out_dtype=None):
    return _gemm_out(a, w_packed.shape[0], a_scale, out_dtype)


@torch.library.register_fake("flashkd::int4_linear")
def _int4_linear_fake(x, w_packed, scale, zero, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


def int8_weights_for(weight: torch.Tensor, scheme: str, per_tensor: bool):
    """Integer weights and scale the int8 GEMM takes for w1.58a8 / w8a8."""
    return ternary_weights(weight, per_tensor) if scheme == "w1.58a8" else int8_weights(weight)


@torch.library.custom_op("flashkd::qat_linear", mutates_args=())
def qat_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scheme: str, group_size: int,
               per_tensor: bool) -> torch.Tensor:
    """Training-form quantized linear: weights quantized on the fly from the latent float weight.

    w8a8 / w1.58a8: per-token int8 activations x int8-held weights through the
    int8 GEMM with the dequantizing epilogue. w4a16: x @ dequantized(W).T
    through ATen's GEMM (BLAS), which is faster on CPU than the int4 kernel
    on freshly packed weights.
    """
    if scheme == "w4a16":
        wd = int4_dequantize(*int4_weights(weight, group_size), group_size).to(x.dtype)
        return torch.nn.functional.linear(x, wd, None if bias is None else bias.to(x.dtype))
    qa, a_scale = ops.quantize_int8_rows(x)
    wq, w_scale = int8_weights_for(weight, scheme, per_tensor)
    return ops.int8_linear(qa, wq, a_scale, w_scale, bias, x.dtype)


@qat_linear.register_fake
def _qat_linear_fake(x, weight, bias, scheme, group_size, per_tensor):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _qat_setup_context(ctx, inputs, output):
    x, weight, bias, scheme, group_size, per_tensor = inputs
    ctx.save_for_backward(x, weight)
    ctx.config = (scheme, group_size, per_tensor)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _qat_backward(ctx, grad_out):
    """Straight-through estimator: the rounding is treated as the identity."""
    x, weight = ctx.saved_tensors
    scheme, group_size, per_tensor = ctx.config
    grad_x = grad_w = grad_b = None
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    if ctx.needs_input_grad[0]:
        wd = dequantized_weight(weight, scheme, group_size, per_tensor).to(grad_out.dtype)
        grad_x = (grad_out @ wd).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = (g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_b = g2.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None


qat_linear.register_autograd(_qat_backward, setup_context=_qat_setup_context)
