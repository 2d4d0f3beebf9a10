"""Weight quantizers and bit packing of the quantized schemes (vectorized
torch; run once per training step or once at freeze()). The formats are
stated in flashkd.reference.quant and csrc/include/flashkd/quant_params.h.
"""
from __future__ import annotations

import torch

#: Quantization schemes of :class:`flashkd.quant.QuantLinear`.
SCHEMES = ("w1.58a8", "w8a8", "w4a16")
_EPS = 1e-5


def _div(t: torch.Tensor, d: float) -> torch.Tensor:
    """t / d in one rounding on every device (torch may turn a division by a
    number into a multiplication by its rounded reciprocal)."""
    return t / torch.full_like(t, d)


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


def ternary_weights(w: torch.Tensor, per_tensor: bool = False):
    """BitNet b1.58 absmean: (Wq int8 in {-1, 0, 1}, scale float32 [N] or [1]).

    gamma = mean |W| accumulated in float64 and rounded to float32 (independent
    of summation order); scale = max(gamma, 1e-5); Wq = clamp(rint(W / scale), -1, 1).
    """
    absw = w.detach().float().abs()  # exact; the sums below accumulate in float64 without a float64 copy
    if per_tensor:
        gamma = (absw.sum(dtype=torch.float64) / absw.numel()).reshape(1).float()
    else:
        gamma = (absw.sum(dim=1, dtype=torch.float64) / absw.shape[1]).float()
    scale = gamma.clamp_min(_EPS)
    wq = torch.round(w.detach().float() / (scale if per_tensor else scale.unsqueeze(1))).clamp_(-1, 1)
    return wq.to(torch.int8), scale


def int8_weights(w: torch.Tensor):
    """Absmax per output row: (Wq int8 in [-127, 127], scale float32 [N])."""
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1) if wf.shape[1] else wf.new_zeros(wf.shape[0])
    scale = _div(amax.clamp_min(_EPS), 127.0)
    return torch.round(wf / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8), scale


def _grouped(wf: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group_size], the partial last group padded with copies of
    the row's last value (which leaves its min and max unchanged)."""
    n, k = wf.shape
    groups = num_groups(k, group_size)
    pad = groups * group_size - k
    if pad:
        wf = torch.nn.functional.pad(wf, (0, pad), mode="replicate") if k else wf.new_zeros(n, pad)
    return wf.reshape(n, groups, group_size)


def int4_weights(w: torch.Tensor, group_size: int):
    """Asymmetric 4-bit per group: (q uint8 [N, K] in [0, 15], scale [N, G], zero [N, G]) float32."""
    wf = w.detach().float()
    n, k = wf.shape
    wg = _grouped(wf, group_size)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scale = _div((hi - lo).clamp_min(_EPS), 15.0)
    zero = torch.round(-lo / scale).clamp_(0, 15)
    q = (torch.round(wg / scale.unsqueeze(2)) + zero.unsqueeze(2)).clamp_(0, 15)
    return q.to(torch.uint8).reshape(n, -1)[:, :k], scale, zero


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - zero) * scale per group, float32 [N, K]."""
    n, k = q.shape
    wg = _grouped(q.float(), group_size)
    return ((wg - zero.unsqueeze(2)) * scale.unsqueeze(2)).reshape(n, -1)[:, :k]


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 128, per_tensor: bool = False):
    """(q, scale, zero) of a latent float weight, unpacked: int8 Wq with its
    scale [N] or [1] and an empty zero for w1.58a8 / w8a8; uint8 q in [0, 15]
    with scale and zero [N, G] for w4a16."""
    if scheme == "w4a16":
        return int4_weights(w, group_size)
    wq, scale = ternary_weights(w, per_tensor) if scheme == "w1.58a8" else int8_weights(w)
    return wq, scale, scale.new_empty(0)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = 128):
    """The float32 weight that quantize_weight's (q, scale, zero) stand for."""
    if q.dtype == torch.uint8:
        return int4_dequantize(q, scale, zero, group_size)
    return q.float() * scale.unsqueeze(1)  # scale [N], or [1] per tensor


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
