"""Pure-torch oracles of token merging (ToMe, Bolya et al. 2023) and top-k token
pruning (EViT-style), written for clarity: argsort / gather / scatter_reduce as
in the paper's code, with every tie rule made explicit. Computes in the input
dtype (float64 in gives float64 arithmetic).

Tie rules (the kernels follow them exactly):
- a row's best partner is the smallest B index among equal maxima;
- edges are ordered by descending best score with a stable sort (equal scores
  keep the smaller A index first), the class token last;
- NaN similarities (a zero metric row) never win; a row without a finite
  score goes to the first B row that may receive a merge;
- top-k pruning keeps equal scores in ascending position order.
The scores come from one GEMM, as in ToMe; its float64 result can differ in
the last bit for two identical rows (seen: 2.8e-17), so ties between copied
tokens are exact here only as far as the GEMM keeps them so.
"""
from __future__ import annotations

import math

import torch

MERGE_MODES = ("mean", "sum", "amax")


def capped_r(tokens: int, r: int, class_token: bool, distill_token: bool) -> int:
    """ToMe's cap (half of the unprotected tokens), and at most the B tokens
    that may receive a merge: all of them but the distill token."""
    protected = int(class_token) + int(distill_token)
    return max(0, min(r, (tokens - protected) // 2, tokens // 2 - int(distill_token)))


def matching_plan(metric, r, class_token=False, distill_token=False):
    """(unm_idx, src_idx, dst_idx): int64 (B, ceil(T/2) - r), (B, r), (B, r).

    Indices count within their half: A row i is token 2i, B row j is token 2j+1.
    `r` must already be capped (see capped_r)."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, 0::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        # A zero metric row has NaN similarities: they never win.
        scores = scores.masked_fill(scores.isnan(), -math.inf)
        # The distill token (B row 0) receives nothing: a row without a finite
        # score falls back to the first B row that may receive a merge.
        first_b = int(distill_token and scores.shape[-1] > 0)
        allowed = scores[:, :, first_b:]
        if allowed.shape[-1] == 0:  # no B row may receive a merge: r is 0
            node_max = torch.full(scores.shape[:2], -math.inf, dtype=scores.dtype, device=scores.device)
            node_idx = torch.zeros(scores.shape[:2], dtype=torch.long, device=scores.device)
        else:
            node_max = allowed.amax(dim=-1)
            # first (smallest j) among equal maxima
            node_idx = (allowed == node_max[..., None]).to(torch.uint8).argmax(dim=-1) + first_b
        if class_token and node_max.shape[1] > 0:  # the class token ranks after every other row: never merged
            node_max[:, 0] = -math.inf
            rest = torch.sort(node_max[:, 1:], dim=-1, descending=True, stable=True).indices + 1
            edge_idx = torch.cat([rest, rest.new_zeros(rest.shape[0], 1)], dim=1)
        else:
            edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=-1).values
    return unm_idx, src_idx, dst_idx


def merge(x, plan, mode="mean", distill_token=False):
    """ToMe's merge: (B, T, C) -> (B, T - r, C) for a plan from matching_plan."""
    unm_idx, src_idx, dst_idx = plan
    src, dst = x[:, 0::2], x[:, 1::2]
    n, _, c = src.shape
    unm = src.gather(1, unm_idx[..., None].expand(n, unm_idx.shape[1], c))
    moved = src.gather(1, src_idx[..., None].expand(n, src_idx.shape[1], c))
    dst = dst.scatter_reduce(1, dst_idx[..., None].expand(n, dst_idx.shape[1], c), moved, reduce=mode)
    if distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def unmerge(x, plan, tokens):
    """ToMe's unmerge: (B, T - r, C) -> (B, T, C). Like ToMe's code it reads x as
    [unmerged, destinations] even when the merge used the distill-token order."""
    unm_idx, src_idx, dst_idx = plan
    n_unm = unm_idx.shape[1]
    unm, dst = x[:, :n_unm], x[:, n_unm:]
    n, _, c = unm.shape
    moved = dst.gather(1, dst_idx[..., None].expand(n, dst_idx.shape[1], c))
    out = torch.zeros(n, tokens, c, device=x.device, dtype=x.dtype)
    out[:, 1::2] = dst
    out.scatter_(1, (2 * unm_idx)[..., None].expand(n, n_unm, c), unm)
    out.scatter_(1, (2 * src_idx)[..., None].expand(n, src_idx.shape[1], c), moved)
    return out


def bipartite_soft_matching(metric, r, class_token=False, distill_token=False):
    """(merge(x, mode), unmerge(x)) closures, identity when nothing is merged."""
    r = capped_r(metric.shape[1], r, class_token, distill_token)
    if r <= 0:
        return (lambda x, mode="mean": x), (lambda x: x)
    plan = matching_plan(metric, r, class_token, distill_token)
    tokens = metric.shape[1]
    return (lambda x, mode="mean": merge(x, plan, mode, distill_token)), (lambda x: unmerge(x, plan, tokens))


def merge_wavg(merge_fn, x, size=None):
    """Size-weighted average merge: (merged x, merged sizes)."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge_fn(x * size, mode="sum")
    size = merge_fn(size, mode="sum")
    return x / size, size


def merge_source(merge_fn, x, source=None):
    """Which original tokens each merged token holds (0/1 rows)."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge_fn(source, mode="amax")


def attention_bias(size):
    """log(size) as a (B, 1, 1, T) additive bias on attention logits."""
    return size.reshape(size.shape[0], -1).log()[:, None, None, :]


def topk_tokens(x, scores, keep, fuse_remainder=False, protect_first=True):
    """Keep the `keep` highest-scoring tokens (token 0 first when protected);
    with fuse_remainder append sum_i (s_i / sum s) x_i over the dropped tokens
    (zeros when none is dropped)."""
    n, t, c = x.shape
    if protect_first:
        order = torch.sort(scores[:, 1:], dim=1, descending=True, stable=True).indices + 1
        first = torch.zeros(n, 1, dtype=torch.long, device=x.device)
        order = torch.cat([first, order], dim=1)
    else:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    index = order[:, :keep]
    kept = x.gather(1, index[..., None].expand(n, keep, c))
    if not fuse_remainder:
        return kept, index
    dropped = torch.ones(n, t, dtype=torch.bool, device=x.device)
    dropped.scatter_(1, index, False)
    w = torch.where(dropped, scores, torch.zeros((), dtype=scores.dtype, device=x.device))
    if keep == t:
        extra = torch.zeros(n, 1, c, dtype=x.dtype, device=x.device)
    else:
        w = w / w.sum(dim=1, keepdim=True)
        extra = (w[..., None].to(x.dtype) * x).sum(dim=1, keepdim=True)
    return torch.cat([kept, extra], dim=1), index
