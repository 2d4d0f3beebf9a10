"""Top-k token pruning: one fused op (selection, gather and the optional fused
remainder token) with its backward."""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _tome_ops  # noqa: F401  (fake kernels and autograd)


def topk_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, *, fuse_remainder: bool = False,
                protect_first: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep` highest-scoring tokens of x (B, T, C).

    scores (B, T), e.g. the class token's attention to each token. Returns
    (x_kept, index): index (B, keep) int64 holds the kept positions in
    descending score order (equal scores: lower position first; NaN ranks
    above everything, as torch.sort), x_kept = x gathered at index.
    protect_first: token 0 (the class token) is always kept and placed first;
    it counts toward `keep` and its score is ignored, so keep >= 2.
    fuse_remainder (EViT): one more token is appended, the score-weighted mean
    of the dropped tokens, sum_i (s_i / S) x_i with S = sum of their scores
    (no softmax: scores are used as given, so they should be positive, e.g.
    attention probabilities; S == 0 gives NaN). When no token is dropped
    (keep == T) the appended token is zeros. Output (B, keep + 1, C).

    Gradients flow to x (the kept rows, and the dropped rows through the
    remainder) and, with fuse_remainder, to the dropped tokens' scores:
    d remainder / d s_i = (x_i - remainder) / S. The selection itself has no
    gradient. Computes in float32 for float32 / bfloat16 / float16 inputs.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor (batch, tokens, channels), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(x.shape[:2]):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must have shape {tuple(x.shape[:2])} (batch, tokens), got {got}")
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    low = 2 if protect_first else 1
    if not low <= keep <= x.shape[1]:
        raise ValueError(f"keep must be in [{low}, {x.shape[1]}] (tokens), got {keep}")
    return torch.ops.flashkd.topk_tokens(x, scores, keep, bool(fuse_remainder), bool(protect_first))
