"""Token merging (ToMe, Bolya et al., "Token Merging: Your ViT but Faster") on
flashkd's fused kernels: bipartite soft matching, merge / unmerge, size-weighted
merging, source tracking and the proportional-attention bias."""
from .merge import attention_bias, bipartite_soft_matching, capped_r, matching_plan, merge_source, merge_wavg
from .patch import parse_r, patch, unpatch

__all__ = ["bipartite_soft_matching", "matching_plan", "capped_r", "merge_wavg", "merge_source", "attention_bias",
           "patch", "unpatch", "parse_r"]
