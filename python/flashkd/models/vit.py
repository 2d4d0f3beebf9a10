"""A reference Vision Transformer for the token-merging and pruning examples,
tests and benchmarks.

Plain ViT (Dosovitskiy et al.): a convolutional patch embedding, a class token,
learned positional embeddings, ``depth`` pre-norm blocks (LayerNorm ->
multi-head self-attention -> residual, LayerNorm -> GELU MLP -> residual), a
final LayerNorm and a linear head on the class token. No dropout.

Token reduction hooks in between attention and MLP, where ToMe and EViT put it.
A patch (:func:`flashkd.tome.patch`, :func:`flashkd.prune.patch`) installs a
:class:`TokenReduction` as ``model.token_reduction``; each forward asks it for a
fresh :class:`TokenReducer`, which every block consults: for an additive
attention bias (ToMe's proportional attention), for what the attention must
return besides its output (the ToMe metric, the class-token attention), and to
shrink the tokens after the attention residual. Without a patch none of that
runs, so the plain model pays nothing::

    model = VisionTransformer("vit-s16", seed=0)
    logits = model(images)                      # (B, num_classes)
    flashkd.tome.patch(model, r=16)             # now 197 -> 197 - 12*16 tokens

Initialization is seeded through a private ``torch.Generator``: the same config
and seed give bit-identical parameters, and the global RNG is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ReferenceModel, TransformerConfig

__all__ = ["ViTConfig", "VIT_PRESETS", "VisionTransformer", "Attention", "AttentionOutput", "Block",
           "TokenReduction", "TokenReducer"]


@dataclass(frozen=True)
class ViTConfig(TransformerConfig):
    """Shape of a :class:`VisionTransformer`.

    img_size: side of the square input image, in pixels.
    patch_size: side of a square patch; must divide ``img_size``.
    in_chans: input channels.
    num_classes: width of the classification head.
    dim: residual stream width; divisible by ``n_heads``.
    depth: number of blocks.
    n_heads: attention heads; head size = dim // n_heads.
    mlp_hidden: GELU MLP inner width (4 * dim in the standard sizes).
    norm_eps: LayerNorm epsilon (1e-6 as in timm's ViTs).
    init_std: standard deviation of the normal init of every weight and of the
        class token and positional embeddings (biases start at zero).
    """

    img_size: int = 32
    patch_size: int = 8
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    n_heads: int = 4
    mlp_hidden: int = 256
    norm_eps: float = 1e-6
    init_std: float = 0.02

    KIND = "ViT"
    POSITIVE_INTS = ("img_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "n_heads", "mlp_hidden")

    def __post_init__(self):
        super().__post_init__()
        if self.img_size % self.patch_size:
            raise ValueError(f"ViTConfig.patch_size ({self.patch_size}) must divide img_size ({self.img_size})")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block: the patches and the class token."""
        return self.num_patches + 1

    @classmethod
    def _presets(cls) -> dict:
        return VIT_PRESETS

    def num_parameters(self) -> int:
        """Parameter count of a :class:`VisionTransformer` with this config."""
        d, h, p = self.dim, self.mlp_hidden, self.patch_size
        embed = self.in_chans * p * p * d + d + d + self.num_tokens * d  # conv + bias, class token, positions
        block = (3 * d * d + 3 * d) + (d * d + d) + (2 * d * h + h + d) + 4 * d  # qkv, proj, MLP, two norms
        return embed + self.depth * block + 2 * d + d * self.num_classes + self.num_classes


#: "tiny" (17 tokens, ~0.2M parameters) is for tests; the others are the
#: standard 224 px, 16 px-patch sizes (197 tokens) of the ViT and DeiT papers.
VIT_PRESETS = {
    "tiny": ViTConfig(img_size=32, patch_size=8, num_classes=10, dim=64, depth=4, n_heads=4, mlp_hidden=256),
    "vit-ti16": ViTConfig(img_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, n_heads=3,
                          mlp_hidden=768),  # ~5.7M
    "vit-s16": ViTConfig(img_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, n_heads=6,
                         mlp_hidden=1536),  # ~22M
    "vit-b16": ViTConfig(img_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, n_heads=12,
                         mlp_hidden=3072),  # ~86M
    "vit-l16": ViTConfig(img_size=224, patch_size=16, num_classes=1000, dim=1024, depth=24, n_heads=16,
                         mlp_hidden=4096),  # ~304M
}


class AttentionOutput(NamedTuple):
    """What :class:`Attention` returns; the extras are None unless asked for.

    out: (B, T, dim), the projected attention output.
    metric: (B, T, head_dim), the keys averaged over heads (ToMe's similarity metric).
    cls_attn: (B, T), the class token's attention probabilities over all T
        tokens, averaged over heads (EViT's token importance).
    """

    out: torch.Tensor
    metric: Optional[torch.Tensor] = None
    cls_attn: Optional[torch.Tensor] = None


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, *, metric: bool = False,
                cls_attn: bool = False) -> AttentionOutput:
        """x (B, T, dim); bias: additive attention logits bias broadcastable to
        (B, heads, T, T), in x's dtype (e.g. ToMe's log token sizes)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = self.proj(y.transpose(1, 2).reshape(B, T, D))
        return AttentionOutput(
            out,
            k.mean(1) if metric else None,
            self._class_attention(q, k, bias) if cls_attn else None,
        )

    def _class_attention(self, q, k, bias):
        # Only the class token's row of the attention matrix: O(T) per head,
        # recomputed because the fused attention above never forms the matrix.
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, H, 1, T)
        if bias is not None:
            logits = logits + bias
        return logits.float().softmax(-1).mean(1)[:, 0].to(q.dtype)


class MLP(nn.Module):
    """fc2(gelu(fc1(x))), exact (erf) GELU."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TokenReducer(Protocol):
    """One forward's token reduction, consulted by every block (``layer`` is the
    block's index); made fresh for each forward by a :class:`TokenReduction`."""

    def attention_bias(self, layer: int) -> Optional[torch.Tensor]:
        """Additive attention bias for this layer, or None."""

    def needs(self, layer: int) -> tuple:
        """(metric, cls_attn): which :class:`AttentionOutput` extras ``reduce`` reads."""

    def reduce(self, layer: int, x: torch.Tensor, attn: AttentionOutput) -> torch.Tensor:
        """The tokens after ``x`` (the attention residual's output) is reduced."""


class TokenReduction(Protocol):
    """What a patch installs as ``VisionTransformer.token_reduction``."""

    def start(self, x: torch.Tensor) -> TokenReducer:
        """A fresh reducer for one forward; ``x`` is the first block's input."""


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), [token reduction], x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, reducer: Optional[TokenReducer] = None) -> torch.Tensor:
        if reducer is None:
            x = x + self.attn(self.norm1(x)).out
        else:
            bias = reducer.attention_bias(self.layer)
            if bias is not None:
                bias = bias.to(x.dtype)  # SDPA wants a float mask in the query's dtype
            metric, cls_attn = reducer.needs(self.layer)
            attn = self.attn(self.norm1(x), bias, metric=metric, cls_attn=cls_attn)
            x = reducer.reduce(self.layer, x + attn.out, attn)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(ReferenceModel):
    """ViT classifier. ``forward(images)`` -> logits (B, num_classes).

    Args:
        config: a :class:`ViTConfig` (or a preset name).
        seed: seed of the parameter init (private generator; the global RNG is untouched).
        device, dtype: where and in what the parameters live (init happens in
            float32 on the CPU first, so the values do not depend on the device).

    ``token_reduction`` (None until a patch installs one) is a
    :class:`TokenReduction`; see :func:`flashkd.tome.patch` and
    :func:`flashkd.prune.patch`.
    """

    def __init__(self, config: ViTConfig | str, *, seed: int = 0, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = cfg = ViTConfig.resolve(config)
        self.token_reduction: Optional[TokenReduction] = None
        with torch.random.fork_rng(devices=[]):  # torch's default inits are overwritten below; keep the global RNG
            self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
            self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.dim))
            self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_tokens, cfg.dim))
            self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
            self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
            self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.reset_parameters(seed)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Re-initialize every parameter from ``seed``: ones and zeros for the
        norms, zero biases, normal(0, init_std) for everything else."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        for name, p in self.named_parameters():
            if p.is_meta:  # shape-only model (built under torch.device("meta"))
                continue
            if name.endswith("bias"):
                p.zero_()
            elif ".norm" in name or name.startswith("norm."):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu") * self.config.init_std)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The first block's input (B, num_tokens, dim): class token, then the
        patches in row-major order, plus positional embeddings."""
        cfg = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ValueError(f"images must be (batch, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), "
                             f"got shape {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.pos_embed

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens (B, T', dim); T' < num_tokens when a patch reduces tokens."""
        x = self.tokens(images)
        reducer = None if self.token_reduction is None else self.token_reduction.start(x)
        for block in self.blocks:
            x = block(x, reducer)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, img_size, img_size) -> logits (B, num_classes)."""
        return self.head(self.features(images)[:, 0])
