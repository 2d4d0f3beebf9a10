"""A small decoder-only language model for distillation examples and tests.

Llama-style and deliberately plain: token embedding, ``n_layers`` pre-norm
blocks (RMSNorm -> causal self-attention with rotary position embeddings ->
residual, RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and an LM head
(optionally tied to the embedding). No dropout, no biases.

``forward(tokens)`` returns the hidden states *before* the head, so a fused
linear loss (:func:`flashkd.linear_distill_loss`,
:func:`flashkd.linear_cross_entropy`) can take ``(hidden, model.head_weight)``
without the [tokens x vocab] logits ever existing::

    cfg = LMConfig.preset("tiny")
    model = DecoderLM(cfg, seed=0)
    hidden = model(tokens)                      # (B, T, dim)
    loss = flashkd.linear_cross_entropy(hidden, model.head_weight, targets)

Initialization is seeded through a private ``torch.Generator``: the same
config and seed give bit-identical parameters, and the global RNG is untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ReferenceModel, TransformerConfig

__all__ = ["LMConfig", "PRESETS", "DecoderLM", "RMSNorm", "Attention", "SwiGLU", "Block"]


@dataclass(frozen=True)
class LMConfig(TransformerConfig):
    """Shape of a :class:`DecoderLM`.

    vocab_size: number of token ids (the head's output width).
    dim: model (residual stream) width; divisible by ``n_heads`` with an even head size.
    n_layers: number of transformer blocks.
    n_heads: attention heads; head size = dim // n_heads.
    mlp_hidden: SwiGLU inner width (three dim x mlp_hidden matrices per block).
    max_seq_len: longest sequence the rotary tables cover.
    tie_head: share the LM head with the token embedding.
    rope_base: rotary frequency base.
    norm_eps: RMSNorm epsilon.
    init_std: standard deviation of the normal init (residual output
        projections are further scaled by 1/sqrt(2 * n_layers), as in GPT-2).
    """

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden: int = 128
    max_seq_len: int = 256
    tie_head: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    KIND = "LM"
    POSITIVE_INTS = ("vocab_size", "dim", "n_layers", "n_heads", "mlp_hidden", "max_seq_len")

    def __post_init__(self):
        super().__post_init__()
        if self.head_dim % 2:
            raise ValueError(f"LMConfig: head size dim // n_heads = {self.head_dim} must be even "
                             "(rotary embeddings rotate pairs of channels)")
        if not self.rope_base > 1:
            raise ValueError(f"LMConfig.rope_base must be > 1, got {self.rope_base!r}")

    @classmethod
    def _presets(cls) -> dict:
        return PRESETS

    def num_parameters(self) -> int:
        """Parameter count of a :class:`DecoderLM` with this config (tied head counted once)."""
        d, v, h = self.dim, self.vocab_size, self.mlp_hidden
        block = 4 * d * d + 3 * d * h + 2 * d      # qkv + out, SwiGLU, two norms
        head = 0 if self.tie_head else v * d
        return v * d + self.n_layers * block + d + head


#: Presets from ~100k parameters to GPT-2-small size (SwiGLU hidden 2048 at dim
#: 768 has the same parameter count as GPT-2's 4 x 768 GELU MLP).
PRESETS = {
    "tiny": LMConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, mlp_hidden=128, max_seq_len=256),  # ~99k
    "mini": LMConfig(vocab_size=1024, dim=128, n_layers=4, n_heads=4, mlp_hidden=384, max_seq_len=512),  # ~0.98M
    "small": LMConfig(vocab_size=8192, dim=256, n_layers=6, n_heads=8, mlp_hidden=768,
                      max_seq_len=1024),  # ~7.2M
    "medium": LMConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, mlp_hidden=1408,
                       max_seq_len=2048),  # ~42M
    "gpt2-small": LMConfig(vocab_size=50257, dim=768, n_layers=12, n_heads=12, mlp_hidden=2048,
                           max_seq_len=1024),  # ~124M
}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, base: float):
    """cos and sin tables, each (max_seq_len, head_dim // 2), in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (B, H, T, head_dim) by the
    position angles (the half-split layout of GPT-NeoX / Llama in HF)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings on q and k."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(ReferenceModel):
    """Decoder-only LM. ``forward(tokens)`` -> final-normed hidden states (B, T, dim).

    Args:
        config: an :class:`LMConfig` (or a preset name).
        seed: seed of the parameter init (private generator; the global RNG is untouched).
        device, dtype: where and in what the parameters live (init happens in
            float32 on the CPU first, so the values do not depend on the device).
    """

    def __init__(self, config: LMConfig | str, *, seed: int = 0, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = cfg = LMConfig.resolve(config)
        with torch.random.fork_rng(devices=[]):  # torch's default inits are overwritten below; keep the global RNG
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = None if cfg.tie_head else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(seed)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Re-initialize every parameter from ``seed``: normal(0, init_std) for the
        embedding and linear layers, /sqrt(2 n_layers) for the projections that
        write into the residual stream, ones for the norms."""
        cfg = self.config
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = residual_std if name.endswith(("attn.out.weight", "mlp.down.weight")) else cfg.init_std
            if p.is_meta:  # shape-only model (built under torch.device("meta"))
                continue
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu") * std)

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head weight (vocab_size, dim): the embedding table when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> hidden states (B, T, dim) after the final norm."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer token ids, got {tokens.dtype}")
        T = tokens.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Materialized logits (B, T, vocab_size) — for evaluation and small vocabularies."""
        return self.forward(tokens) @ self.head_weight.T
