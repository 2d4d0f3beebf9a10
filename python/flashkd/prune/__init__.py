"""Token pruning (keep the top-k tokens by a score, EViT-style fused remainder)
on flashkd's fused kernels."""
from .topk import topk_tokens

__all__ = ["topk_tokens"]
