"""Public token-merging functions. The plan (which tokens merge where) is one
fused op, torch.ops.flashkd.tome_plan; the merge and unmerge closures only hold
its index tensors and call the fused merge ops, so the whole path traces under
torch.compile(fullgraph=True)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import _tome_ops  # noqa: F401  (fake kernels and autograd)

ops = torch.ops.flashkd
MERGE_MODES = ("mean", "sum", "amax")

Plan = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _identity(x, mode="mean"):
    return x


def _check_3d(t, name):
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 3-D tensor (batch, tokens, channels), got {shape}")


def _check_r(r):
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")


def capped_r(tokens: int, r: int, class_token: bool = False, distill_token: bool = False) -> int:
    """ToMe's cap, at most half of the unprotected tokens merged away, and no
    more than the odd tokens that may receive a merge (the distill token may
    not: for an odd token count ToMe's cap alone would merge into it)."""
    half = (tokens - int(class_token) - int(distill_token)) // 2
    return max(0, min(r, half, tokens // 2 - int(distill_token)))


def matching_plan(metric: torch.Tensor, r: int, *, class_token: bool = False,
                  distill_token: bool = False) -> Plan:
    """The merge plan as index tensors (unm_idx, src_idx, dst_idx), int64 of
    shapes (B, ceil(T/2) - r), (B, r), (B, r) with r already capped. Indices
    count within their half: A row i is token 2i, B row j is token 2j + 1.
    No gradient flows through the plan."""
    _check_3d(metric, "metric")
    _check_r(r)
    r = capped_r(metric.shape[1], r, class_token, distill_token)
    return ops.tome_plan(metric.detach(), r, bool(class_token), bool(distill_token))


def bipartite_soft_matching(metric: torch.Tensor, r: int, *, class_token: bool = False,
                            distill_token: bool = False) -> Tuple[Callable, Callable]:
    """ToMe's bipartite soft matching: (merge, unmerge) closures.

    metric (B, T, C) (e.g. the attention keys averaged over heads) is split into
    A = even tokens and B = odd tokens; every A token's most cosine-similar B
    token is its partner, and the r A tokens with the most similar partners are
    merged into them. r is capped at (T - protected) // 2 (ToMe's cap), and
    with a distill token at T // 2 - 1 (see capped_r); with r == 0 both
    closures are the identity. class_token: token 0 is never merged;
    distill_token: token 1 never receives a merge (and merged outputs keep it
    at position 1). Ties: the smallest B index wins a row, and equal best
    scores keep the smaller A index first (stable sort). Similarities are
    float32 (any input dtype); only scores closer than float32 rounding (seen
    with 2-3 channel metrics, and for tokens equal to one of the other half,
    whose cosine 1 comes out a few ulp off 1 either way) can order differently
    from a float64 oracle.
    A zero metric row has NaN similarities, which never win: it is no
    token's partner and ranks after every candidate with a partner (but
    before the class token, which always ranks last); merged all the same
    (r forces it), it goes to the first B token that may receive a merge.

    merge(x, mode="mean") maps (B, T, C') to (B, T - r, C'); mode "mean"
    averages each destination with the tokens merged into it, "sum" adds them,
    "amax" takes the elementwise maximum (gradient shared equally among the
    members equal to the maximum, as torch's scatter_reduce). unmerge(x) maps
    (B, T - r, C') back to (B, T, C'), every merged token taking its
    destination's row; like ToMe's code it reads x as [unmerged, destinations]
    even when a distill token reordered the merge output.
    """
    _check_3d(metric, "metric")
    _check_r(r)
    tokens = metric.shape[1]
    r = capped_r(tokens, r, class_token, distill_token)
    if r <= 0:
        return _identity, lambda x: x
    unm_idx, src_idx, dst_idx = ops.tome_plan(metric.detach(), r, bool(class_token), bool(distill_token))
    distill = bool(distill_token)
    batch, merged = metric.shape[0], tokens - r

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        _check_x(x, batch, tokens, "x")
        if mode not in MERGE_MODES:
            raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
        return ops.tome_merge(x, unm_idx, src_idx, dst_idx, mode, distill)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        _check_x(x, batch, merged, "x", "the merged tokens of the plan")
        return ops.tome_unmerge(x, unm_idx, src_idx, dst_idx, tokens)

    # merge_wavg reads the plan here to run its single fused op instead of two merges.
    merge.plan = unmerge.plan = (unm_idx, src_idx, dst_idx, tokens, distill)
    return merge, unmerge


def _check_x(x, batch, tokens, name, whose="those of metric"):
    _check_3d(x, name)
    if x.shape[0] != batch or x.shape[1] != tokens:
        raise ValueError(f"{name} must have batch {batch} and {tokens} tokens ({whose}), "
                         f"got shape {tuple(x.shape)}")


def merge_wavg(merge: Callable, x: torch.Tensor,
               size: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: x' = merge(x * size, "sum") / merge(size,
    "sum") and size' = merge(size, "sum"), fused into one op. size (B, T, 1)
    counts the original tokens each token holds (ones when None); it is
    returned in x's dtype. Differentiable in x and size."""
    _check_3d(x, "x")
    if size is not None:
        if not isinstance(size, torch.Tensor) or tuple(size.shape) != (x.shape[0], x.shape[1], 1):
            got = tuple(size.shape) if isinstance(size, torch.Tensor) else type(size).__name__
            raise ValueError(f"size must have shape {(x.shape[0], x.shape[1], 1)}, got {got}")
        size = size.to(x.dtype)
    plan = getattr(merge, "plan", None)
    if plan is None:  # identity merge (r == 0) or a merge from elsewhere: ToMe's formula
        if size is None:
            size = torch.ones_like(x[..., :1])
        size_out = merge(size, mode="sum")
        return merge(x * size, mode="sum") / size_out, size_out
    unm_idx, src_idx, dst_idx, tokens, distill = plan
    _check_x(x, unm_idx.shape[0], tokens, "x")
    return ops.tome_merge_wavg(x, size, unm_idx, src_idx, dst_idx, distill)


def merge_source(merge: Callable, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Source tracking: row i of the result marks (1) the original tokens that
    merged token i holds. source (B, T, T0) is the previous layer's result;
    None starts from the identity (B, T, T) in x's dtype. Merged with "amax"."""
    _check_3d(x, "x")
    if source is None:
        b, t = x.shape[0], x.shape[1]
        source = torch.eye(t, dtype=x.dtype, device=x.device).expand(b, t, t)
    return merge(source, mode="amax")


def attention_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention (ToMe §3): log(size) added to the attention
    logits so that a token holding s originals counts s times in the softmax.

    size (B, T, 1) or (B, T) -> (B, 1, 1, T), which broadcasts onto logits
    (B, heads, T_q, T) and can be passed as `attn_mask` (a float additive mask)
    of torch.nn.functional.scaled_dot_product_attention. Differentiable."""
    if not isinstance(size, torch.Tensor) or not (size.dim() == 2 or (size.dim() == 3 and size.shape[2] == 1)):
        got = tuple(size.shape) if isinstance(size, torch.Tensor) else type(size).__name__
        raise ValueError(f"size must have shape (B, T, 1) or (B, T), got {got}")
    return size.reshape(size.shape[0], 1, 1, size.shape[1]).log()
