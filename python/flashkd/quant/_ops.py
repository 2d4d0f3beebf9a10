"""Fake kernels of the quantized-matmul ops (csrc/ops/quant.cpp) and the
training-form linear ``flashkd::qat_linear`` with its straight-through
estimator backward."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._ops import check_same_device, cpu_gemm_dtype  # (importing it loads the compiled library)
from .._autocast import autocast_off
from .formats import dequantize_weight, int4_dequantize, num_groups, quantize_weight

ops = torch.ops.flashkd


def _gemm_dtype(t):
    """The dtype the float GEMMs below run in for operands like `t`: float32 for a
    16-bit CPU tensor where ATen has no fast 16-bit GEMM (flashkd.cpu_gemm_dtype)."""
    return cpu_gemm_dtype(t.dtype) if t.device.type == "cpu" else t.dtype


@torch.library.register_fake("flashkd::quantize_int8_rows")
def _quantize_int8_rows_fake(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _gemm_out(a, n, a_scale, out_dtype):
    return a.new_empty((*a.shape[:-1], n), dtype=torch.int32 if a_scale is None else out_dtype)


@torch.library.register_fake("flashkd::quantize_weight")
def _quantize_weight_fake(w, scheme, group_size=128, per_tensor=False):
    return _quantized_weight_like(w, scheme, group_size, per_tensor)


def _quantized_weight_like(w, scheme, group_size, per_tensor):
    """Empty (q, scale, zero) shaped as quantize_weight returns them for w [N, K]."""
    n, k = w.shape
    f32 = dict(dtype=torch.float32)
    if scheme == "w4a16":
        g = num_groups(k, group_size)
        return w.new_empty((n, k), dtype=torch.uint8), w.new_empty((n, g), **f32), w.new_empty((n, g), **f32)
    rows = 1 if per_tensor and scheme == "w1.58a8" else n
    return w.new_empty((n, k), dtype=torch.int8), w.new_empty((rows,), **f32), w.new_empty((0,), **f32)


@torch.library.register_fake("flashkd::int8_linear")
def _int8_linear_fake(a, w, a_scale=None, w_scale=None, bias=None, out_dtype=None):
    check_same_device("a", {"a": a, "w": w, "a_scale": a_scale, "w_scale": w_scale, "bias": bias})
    return _gemm_out(a, w.shape[0], a_scale, out_dtype)


@torch.library.register_fake("flashkd::ternary_linear")
def _ternary_linear_fake(a, w_packed, a_scale=None, w_scale=None, bias=None, out_dtype=None):
    check_same_device("a", {"a": a, "w_packed": w_packed, "a_scale": a_scale, "w_scale": w_scale, "bias": bias})
    return _gemm_out(a, w_packed.shape[0], a_scale, out_dtype)


@torch.library.register_fake("flashkd::int4_linear")
def _int4_linear_fake(x, w_packed, scale, zero, group_size, bias=None):
    check_same_device("x", {"x": x, "w_packed": w_packed, "scale": scale, "zero": zero, "bias": bias})
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


@torch.library.custom_op("flashkd::qat_linear", mutates_args=())
def qat_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scheme: str, group_size: int,
               per_tensor: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-form quantized linear: weights quantized on the fly from the latent float weight.

    w8a8 / w1.58a8: per-token int8 activations x int8-held weights through the
    int8 GEMM with the dequantizing epilogue. w4a16: x @ dequantized(W).T
    through ATen's GEMM (BLAS), which is faster on CPU than the int4 kernel
    on freshly packed weights (in float32 for 16-bit x where flashkd.cpu_gemm_dtype
    says so).

    Returns (out, q, scale, zero): the output and the quantized weight it used
    (formats.quantize_weight), which the backward dequantizes instead of
    quantizing the weight again; q costs 1 byte a weight while it is saved.
    """
    q, scale, zero = quantize_weight(weight, scheme, group_size, per_tensor)
    if scheme == "w4a16":
        cd = _gemm_dtype(x)
        wd = int4_dequantize(q, scale, zero, group_size).to(cd)
        with autocast_off(x.device):  # the result's dtype is x's, as the fake says
            out = torch.nn.functional.linear(x.to(cd), wd, None if bias is None else bias.to(cd)).to(x.dtype)
    else:
        qa, a_scale = ops.quantize_int8_rows(x)
        out = ops.int8_linear(qa, q, a_scale, scale, bias, x.dtype)
    return out, q.contiguous(), scale, zero


@qat_linear.register_fake
def _qat_linear_fake(x, weight, bias, scheme, group_size, per_tensor):
    check_same_device("x", {"x": x, "weight": weight, "bias": bias})
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            *_quantized_weight_like(weight, scheme, group_size, per_tensor))


def _qat_setup_context(ctx, inputs, output):
    x, weight, bias, scheme, group_size, per_tensor = inputs
    _, q, scale, zero = output
    ctx.save_for_backward(x, q, scale, zero)
    ctx.mark_non_differentiable(q, scale, zero)
    ctx.group_size = group_size
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _qat_backward(ctx, grad_out, *_quantized_weight_grads):
    """Straight-through estimator: the rounding is treated as the identity. The
    products run in grad_out's dtype, or in float32 where flashkd.cpu_gemm_dtype
    says so."""
    x, q, scale, zero = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    cd = _gemm_dtype(grad_out)
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    if ctx.needs_input_grad[0]:
        wd = dequantize_weight(q, scale, zero, ctx.group_size).to(cd)
        grad_x = (grad_out.to(cd) @ wd).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = (g2.to(cd).T @ x.reshape(-1, x.shape[-1]).to(cd)).to(ctx.weight_dtype)
    if ctx.needs_input_grad[2]:
        grad_b = g2.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None


qat_linear.register_autograd(_qat_backward, setup_context=_qat_setup_context)
