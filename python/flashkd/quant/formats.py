"""Weight quantizers (a fused kernel) and bit packing (vectorized torch) of the
quantized schemes, run once per training step or once at freeze(). The
formats are stated in flashkd.reference.quant and
csrc/include/flashkd/quant_params.h.
"""
from __future__ import annotations

import torch

#: Quantization schemes of :class:`flashkd.quant.QuantLinear`.
SCHEMES = ("w1.58a8", "w8a8", "w4a16")


def check_scheme(scheme) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return scheme


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row; the last one is partial when group_size does not divide in_features."""
    return max(1, -(-in_features // group_size))


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 128, per_tensor: bool = False):
    """(q, scale, zero) of a latent float weight [N, K], unpacked, by the fused
    kernel (``torch.ops.flashkd.quantize_weight``, formulas in
    flashkd.reference.quant and quant_params.h):

    - w1.58a8 (BitNet b1.58 absmean): int8 Wq in {-1, 0, 1}, scale [N] (or [1]
      with ``per_tensor``) = max(mean |W| (summed in float64, rounded to
      float32), 1e-5), an empty zero;
    - w8a8 (absmax per row): int8 Wq in [-127, 127], scale [N] = max(max |W|, 1e-5) / 127;
    - w4a16 (asymmetric per group): uint8 q in [0, 15], scale and zero [N, G]
      float32, G = ceil(K / group_size).
    """
    w = w.detach()
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()
    return torch.ops.flashkd.quantize_weight(w, scheme, group_size, per_tensor)


def ternary_weights(w: torch.Tensor, per_tensor: bool = False):
    """(Wq int8 in {-1, 0, 1}, scale float32 [N] or [1]): see quantize_weight."""
    return quantize_weight(w, "w1.58a8", 1, per_tensor)[:2]


def int8_weights(w: torch.Tensor):
    """(Wq int8 in [-127, 127], scale float32 [N]): see quantize_weight."""
    return quantize_weight(w, "w8a8")[:2]


def int4_weights(w: torch.Tensor, group_size: int):
    """(q uint8 [N, K] in [0, 15], scale [N, G], zero [N, G]) float32: see quantize_weight."""
    return quantize_weight(w, "w4a16", group_size)


def _grouped(wf: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group_size], the partial last group padded (callers slice
    the padding off again)."""
    n, k = wf.shape
    groups = num_groups(k, group_size)
    pad = groups * group_size - k
    if pad:
        wf = torch.nn.functional.pad(wf, (0, pad), mode="replicate") if k else wf.new_zeros(n, pad)
    return wf.reshape(n, groups, group_size)


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - zero) * scale per group, float32 [N, K]."""
    n, k = q.shape
    # In place on a float copy (a copy even of a float q, which must not
    # change): on the CPU each new [N, K] float32 temporary costs more than
    # its arithmetic (1024 x 1024, three runs: 0.5-3.0 -> 0.2-0.35 ms).
    wg = _grouped(q.to(torch.float32, copy=True), group_size)
    return wg.sub_(zero.unsqueeze(2)).mul_(scale.unsqueeze(2)).reshape(n, -1)[:, :k]


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = 128):
    """The float32 weight that quantize_weight's (q, scale, zero) stand for."""
    if q.dtype == torch.uint8:
        return int4_dequantize(q, scale, zero, group_size)
    return q.to(torch.float32, copy=True).mul_(scale.unsqueeze(1))  # scale [N], or [1] per tensor


def dequantized_weight(w: torch.Tensor, scheme: str, group_size: int = 128, per_tensor: bool = False):
    """The float32 weight a quantized layer computes with (what the STE backward multiplies by)."""
    return dequantize_weight(*quantize_weight(w, scheme, group_size, per_tensor), group_size)


def _check_int_matrix(w_int: torch.Tensor, lo: int, hi: int, name: str = "w_int"):
    if not isinstance(w_int, torch.Tensor) or w_int.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [out_features, in_features]")
    if w_int.is_floating_point() or w_int.is_complex() or w_int.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {w_int.dtype}")
    if w_int.numel() and (int(w_int.min()) < lo or int(w_int.max()) > hi):
        raise ValueError(f"{name} values must lie in [{lo}, {hi}]")


def pack(w_int: torch.Tensor, scheme: str) -> torch.Tensor:
    """Packs integer weights [N, K] into the scheme's storage.

    w1.58a8: values in {-1, 0, 1} -> uint8 [N, ceil(K/4)], 2-bit code w + 1 at
    bits 2 * (k % 4) of byte k // 4, padding codes 1 (w = 0).
    w4a16: values in [0, 15] -> uint8 [N, ceil(K/2)], even k in the low nibble.
    w8a8: values in [-127, 127] -> int8 [N, K] (stored as is).
    """
    check_scheme(scheme)
    if scheme == "w8a8":
        _check_int_matrix(w_int, -127, 127)
        return w_int.to(torch.int8).contiguous()
    per_byte, lo, hi, pad_value = (4, -1, 1, 0) if scheme == "w1.58a8" else (2, 0, 15, 0)
    _check_int_matrix(w_int, lo, hi)
    n, k = w_int.shape
    codes = w_int.to(torch.int32) - lo  # ternary: w + 1; int4: q
    codes = torch.nn.functional.pad(codes, (0, -k % per_byte), value=pad_value - lo).reshape(n, -1, per_byte)
    bits = 8 // per_byte
    shifts = torch.arange(per_byte, device=w_int.device, dtype=torch.int32) * bits
    return (codes << shifts).sum(dim=2).to(torch.uint8)


def unpack(packed: torch.Tensor, scheme: str, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int8 {-1, 0, 1}, uint8 [0, 15] or int8 weights [N, in_features]."""
    check_scheme(scheme)
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 0:
        raise ValueError(f"in_features must be an int >= 0, got {in_features!r}")
    if scheme == "w8a8":
        if packed.dtype != torch.int8 or packed.dim() != 2 or packed.shape[1] != in_features:
            raise ValueError(f"packed must be int8 [out_features, {in_features}], got {packed.dtype} {list(packed.shape)}")
        return packed
    per_byte, lo = (4, -1) if scheme == "w1.58a8" else (2, 0)
    width = -(-in_features // per_byte)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != width:
        raise ValueError(f"packed must be uint8 [out_features, ceil(in_features / {per_byte}) = {width}], "
                         f"got {packed.dtype} {list(packed.shape)}")
    bits = 8 // per_byte
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    values = codes.reshape(packed.shape[0], -1)[:, :in_features] + lo
    return values.to(torch.int8 if scheme == "w1.58a8" else torch.uint8)
