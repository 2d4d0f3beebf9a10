"""Oracle of the quantized matmuls (issue #6), written for clarity: integer
matmuls in int64, packing one 2-bit / 4-bit field at a time, the dequantizing
epilogue in float32 in the order the kernels use, and the straight-through
estimator (STE) gradients. Formats: csrc/include/flashkd/quant_params.h.

Schemes:
  "w1.58a8"  ternary weights (BitNet b1.58): gamma = mean |W| per output row
             (or over the whole matrix, per_tensor=True), accumulated in float64
             and rounded to float32; scale = max(gamma, 1e-5);
             Wq = clamp(rint(W / scale), -1, 1). Activations int8 per token.
  "w8a8"     int8 weights per output row: s = max(max |W|, 1e-5) / 127,
             Wq = clamp(rint(W / s), -127, 127). Activations int8 per token.
  "w4a16"    4-bit asymmetric weights per group of group_size input features
             (the last group of a row may be partial): scale = max(max - min,
             1e-5) / 15, zero = clamp(rint(-min / scale), 0, 15),
             q = clamp(rint(W / scale) + zero, 0, 15), W ~ (q - zero) * scale.
             Activations stay in their float dtype.
Weights are quantized from their float32 values; rint rounds half to even.

Training forward (QuantLinear before freeze()):
  w8a8 / w1.58a8: out = epilogue(int_matmul(qa, Wq), a_scale, w_scale, bias)
  w4a16:          out = x @ dequantized(W).T + bias
STE backward: grad_input = grad_out @ dequantized(W); grad_weight =
grad_out^T @ x (the saved float input, not quantized); grad_bias = sum of
grad_out over all leading dims.
"""
from __future__ import annotations

import torch

SCHEMES = ("w1.58a8", "w8a8", "w4a16")
_EPS = 1e-5


def _div(a, b):
    """a / b with both sides tensors of a's shape: torch computes `number / tensor`
    as number * reciprocal(tensor) (two roundings); the formats use one division."""
    full = lambda v: v if isinstance(v, torch.Tensor) else torch.full_like(a if isinstance(a, torch.Tensor) else b, v)  # noqa: E731
    return full(a) / full(b)


def quantize_activations(x: torch.Tensor):
    """Per-token int8: (q int8 of x's shape, a_scale float32 of x.shape[:-1])."""
    xf = x.float()
    clipped = xf.abs().amax(dim=-1).clamp_min(_EPS) if x.shape[-1] else xf.new_full(x.shape[:-1], _EPS)
    inv = _div(127.0, clipped)
    q = torch.round(xf * inv.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return q, _div(clipped, 127.0)


def ternary_weights(w: torch.Tensor, per_tensor: bool = False):
    """(Wq int8 in {-1, 0, 1}, scale float32 of shape [N] or [1])."""
    wf = w.float()
    gamma = (w.double().abs().mean().reshape(1) if per_tensor else w.double().abs().mean(dim=1)).float()
    scale = gamma.clamp_min(_EPS)
    per_row = scale if per_tensor else scale.unsqueeze(1)
    return torch.round(wf / per_row).clamp(-1, 1).to(torch.int8), scale


def int8_weights(w: torch.Tensor):
    """(Wq int8 in [-127, 127], scale float32 [N])."""
    wf = w.float()
    scale = _div(wf.abs().amax(dim=1).clamp_min(_EPS), 127.0)
    return torch.round(wf / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8), scale


def int4_weights(w: torch.Tensor, group_size: int):
    """(q uint8 [N, K] in [0, 15], scale float32 [N, G], zero float32 [N, G]), G = ceil(K / group_size)."""
    wf = w.float()
    n, k = wf.shape
    groups = max(1, -(-k // group_size))
    q = torch.zeros(n, k, dtype=torch.uint8)
    scale = torch.ones(n, groups)
    zero = torch.zeros(n, groups)
    for g in range(groups):
        block = wf[:, g * group_size:(g + 1) * group_size]
        if block.shape[1] == 0:
            continue
        lo, hi = block.amin(dim=1), block.amax(dim=1)
        s = _div((hi - lo).clamp_min(_EPS), 15.0)
        z = torch.round(-lo / s).clamp(0, 15)
        q[:, g * group_size:(g + 1) * group_size] = (torch.round(block / s.unsqueeze(1)) + z.unsqueeze(1)).clamp(0, 15).to(torch.uint8)
        scale[:, g], zero[:, g] = s, z
    return q, scale, zero


def pack_ternary(wq: torch.Tensor) -> torch.Tensor:
    """int8 {-1, 0, 1} [N, K] -> uint8 [N, ceil(K/4)]: code w + 1 at bits 2 * (k % 4) of byte k // 4."""
    n, k = wq.shape
    out = torch.zeros(n, -(-k // 4), dtype=torch.int64)
    for col in range(out.shape[1] * 4):
        code = (wq[:, col].long() + 1) if col < k else torch.ones(n, dtype=torch.int64)
        out[:, col // 4] |= code << (2 * (col % 4))
    return out.to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, k: int) -> torch.Tensor:
    p = packed.long()
    cols = [((p[:, col // 4] >> (2 * (col % 4))) & 3) - 1 for col in range(k)]
    return torch.stack(cols, dim=1).to(torch.int8) if cols else torch.zeros(packed.shape[0], 0, dtype=torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 15] [N, K] -> uint8 [N, ceil(K/2)]: even k in the low nibble, odd k in the high one."""
    n, k = q.shape
    out = torch.zeros(n, -(-k // 2), dtype=torch.int64)
    for col in range(k):
        out[:, col // 2] |= q[:, col].long() << (4 * (col % 2))
    return out.to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    p = packed.long()
    cols = [(p[:, col // 2] >> (4 * (col % 2))) & 15 for col in range(k)]
    return torch.stack(cols, dim=1).to(torch.uint8) if cols else torch.zeros(packed.shape[0], 0, dtype=torch.uint8)


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact a [..., K] @ w [N, K]^T in int64 (on the CPU)."""
    return a.cpu().long() @ w.cpu().long().T


def epilogue(acc, a_scale, w_scale, bias, out_dtype):
    """float(acc) * a_scale[m] * w_scale[n] + bias[n], in float32, in that order."""
    out = acc.float() * a_scale.float().unsqueeze(-1)
    out = out * w_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def dequantized_weight(w: torch.Tensor, scheme: str, group_size: int = 128, per_tensor: bool = False):
    """The float32 weight the quantized layer computes with: Wq * scale, or (q - zero) * scale."""
    if scheme == "w1.58a8":
        wq, scale = ternary_weights(w, per_tensor)
        return wq.float() * (scale if per_tensor else scale.unsqueeze(1))
    if scheme == "w8a8":
        wq, scale = int8_weights(w)
        return wq.float() * scale.unsqueeze(1)
    if scheme == "w4a16":
        q, scale, zero = int4_weights(w, group_size)
        k = w.shape[1]
        expand = lambda t: t.repeat_interleave(group_size, dim=1)[:, :k]  # noqa: E731
        return (q.float() - expand(zero)) * expand(scale)
    raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")


def quant_linear(x, w, bias, scheme: str, group_size: int = 128, per_tensor: bool = False):
    """Forward of a training-form QuantLinear, output in x's dtype. w4a16 in float64."""
    if scheme == "w4a16":
        wd = dequantized_weight(w.cpu(), scheme, group_size).double()
        out = x.cpu().double() @ wd.T
        if bias is not None:
            out = out + bias.cpu().double()
        return out.to(x.dtype)
    qa, a_scale = quantize_activations(x.cpu())
    wq, w_scale = ternary_weights(w.cpu(), per_tensor) if scheme == "w1.58a8" else int8_weights(w.cpu())
    return epilogue(int_matmul(qa, wq), a_scale, w_scale, None if bias is None else bias.cpu(), x.dtype)


def ste_grads(x, w, grad_out, scheme: str, group_size: int = 128, per_tensor: bool = False, has_bias: bool = True):
    """(grad_input, grad_weight, grad_bias or None) of the straight-through estimator, in float64."""
    wd = dequantized_weight(w.cpu(), scheme, group_size, per_tensor).double()
    g = grad_out.cpu().double().reshape(-1, grad_out.shape[-1])
    xf = x.cpu().double().reshape(-1, x.shape[-1])
    grad_input = (g @ wd).reshape(x.shape)
    return grad_input, g.T @ xf, g.sum(0) if has_bias else None
