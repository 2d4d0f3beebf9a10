"""Token pruning (keep the top-k tokens by a score, EViT-style fused remainder)
on flashkd's fused kernels."""
from .topk import topk_tokens
from .patch import patch

__all__ = ["topk_tokens", "patch"]
