"""Fake kernels and autograd of the token-merging and token-pruning ops
(torch.ops.flashkd.tome_* and topk_tokens); the public functions are in
flashkd.tome and flashkd.prune."""
from __future__ import annotations

import torch

from ._ops import check_same_device, first_order_only  # (importing it loads the library)

ops = torch.ops.flashkd


def _merged_tokens(unm_idx, x):
    return unm_idx.shape[1] + x.shape[1] // 2


# --- plan ---------------------------------------------------------------------


@torch.library.register_fake("flashkd::tome_plan")
def _tome_plan_fake(metric, r, class_token, distill_token):
    b, t = metric.shape[0], metric.shape[1]
    n_a = (t + 1) // 2
    new = lambda n: metric.new_empty((b, n), dtype=torch.long)  # noqa: E731
    return new(n_a - r), new(r), new(r)


# --- merge (mean / sum / amax) -------------------------------------------------


@torch.library.register_fake("flashkd::tome_merge")
def _tome_merge_fake(x, unm_idx, src_idx, dst_idx, mode, distill_token):
    check_same_device("x", {"x": x, "unm_idx": unm_idx, "src_idx": src_idx, "dst_idx": dst_idx})
    return x.new_empty((x.shape[0], _merged_tokens(unm_idx, x), x.shape[2]))


@torch.library.register_fake("flashkd::tome_merge_backward")
def _tome_merge_backward_fake(grad_out, x, out, unm_idx, src_idx, dst_idx, mode, distill_token):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _merge_setup(ctx, inputs, output):
    x, unm_idx, src_idx, dst_idx, mode, distill_token = inputs
    ctx.mode, ctx.distill_token = mode, distill_token
    # amax shares the gradient among the members equal to the maximum: it needs x and out.
    saved = (x, output) if mode == "amax" else (x, output.new_empty((0,)))
    ctx.save_for_backward(unm_idx, src_idx, dst_idx, *saved)


@first_order_only("tome.merge")
def _merge_backward(ctx, grad_out):
    unm_idx, src_idx, dst_idx, x, out = ctx.saved_tensors
    if ctx.mode != "amax":
        out = grad_out  # unused by sum / mean; any tensor of the merged shape
    grad_x = ops.tome_merge_backward(grad_out, x, out, unm_idx, src_idx, dst_idx, ctx.mode, ctx.distill_token)
    return grad_x, None, None, None, None, None


torch.library.register_autograd("flashkd::tome_merge", _merge_backward, setup_context=_merge_setup)


# --- size-weighted merge -------------------------------------------------------


@torch.library.register_fake("flashkd::tome_merge_wavg")
def _tome_merge_wavg_fake(x, size, unm_idx, src_idx, dst_idx, distill_token):
    check_same_device("x", {"x": x, "size": size, "unm_idx": unm_idx, "src_idx": src_idx, "dst_idx": dst_idx})
    n = _merged_tokens(unm_idx, x)
    return x.new_empty((x.shape[0], n, x.shape[2])), x.new_empty((x.shape[0], n, 1))


@torch.library.register_fake("flashkd::tome_merge_wavg_backward")
def _tome_merge_wavg_backward_fake(grad_out, grad_size_out, x, size, out, size_out, unm_idx, src_idx, dst_idx,
                                   distill_token, size_grad):
    grad_size = x.new_empty((x.shape[0], x.shape[1], 1)) if size_grad else x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_size


def _wavg_setup(ctx, inputs, output):
    x, size, unm_idx, src_idx, dst_idx, distill_token = inputs
    ctx.distill_token = distill_token
    ctx.has_size = size is not None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, size, output[0], output[1], unm_idx, src_idx, dst_idx)
    if size is None or not size.requires_grad:
        # size_out = merge(size, "sum") depends on size alone: without a size
        # that requires grad it is a constant, as in ToMe, and must not require
        # grad because x does (an attention bias log(size_out) that requires
        # grad sends scaled_dot_product_attention from its fused CPU kernel to
        # the math path).
        ctx.mark_non_differentiable(output[1])


@first_order_only("tome.merge_wavg")
def _wavg_backward(ctx, grad_out, grad_size_out):
    x, size, out, size_out, unm_idx, src_idx, dst_idx = ctx.saved_tensors
    size_grad = ctx.has_size and ctx.needs_input_grad[1]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_x, grad_size = ops.tome_merge_wavg_backward(grad_out, grad_size_out, x, size, out, size_out, unm_idx,
                                                     src_idx, dst_idx, ctx.distill_token, size_grad)
    return grad_x, (grad_size if size_grad else None), None, None, None, None


torch.library.register_autograd("flashkd::tome_merge_wavg", _wavg_backward, setup_context=_wavg_setup)


# --- unmerge -------------------------------------------------------------------


@torch.library.register_fake("flashkd::tome_unmerge")
def _tome_unmerge_fake(x, unm_idx, src_idx, dst_idx, tokens):
    check_same_device("x", {"x": x, "unm_idx": unm_idx, "src_idx": src_idx, "dst_idx": dst_idx})
    return x.new_empty((x.shape[0], tokens, x.shape[2]))


def _unmerge_setup(ctx, inputs, output):
    x, unm_idx, src_idx, dst_idx, tokens = inputs
    ctx.save_for_backward(unm_idx, src_idx, dst_idx)


@first_order_only("tome.merge's unmerge")
def _unmerge_backward(ctx, grad_out):
    unm_idx, src_idx, dst_idx = ctx.saved_tensors
    # unmerge copies merged row -> tokens; its adjoint sums the tokens back: a
    # "sum" merge in ToMe's plain [unm, dst] order.
    grad_x = ops.tome_merge(grad_out, unm_idx, src_idx, dst_idx, "sum", False)
    return grad_x, None, None, None, None


torch.library.register_autograd("flashkd::tome_unmerge", _unmerge_backward, setup_context=_unmerge_setup)


# --- top-k pruning -------------------------------------------------------------


@torch.library.register_fake("flashkd::topk_tokens")
def _topk_tokens_fake(x, scores, keep, fuse_remainder, protect_first):
    check_same_device("x", {"x": x, "scores": scores})
    out = x.new_empty((x.shape[0], keep + int(fuse_remainder), x.shape[2]))
    return out, x.new_empty((x.shape[0], keep), dtype=torch.long)


@torch.library.register_fake("flashkd::topk_tokens_backward")
def _topk_tokens_backward_fake(grad_out, x, scores, out, index, fuse_remainder, protect_first, scores_grad):
    grad_scores = torch.empty_like(scores, memory_format=torch.contiguous_format) \
        if (scores_grad and fuse_remainder) else scores.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_scores


def _topk_setup(ctx, inputs, output):
    x, scores, keep, fuse_remainder, protect_first = inputs
    ctx.fuse_remainder, ctx.protect_first = fuse_remainder, protect_first
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, scores, output[0], output[1])


@first_order_only("prune.topk_tokens")
def _topk_backward(ctx, grad_out, _grad_index):
    x, scores, out, index = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    scores_grad = ctx.fuse_remainder and ctx.needs_input_grad[1]
    grad_x, grad_scores = ops.topk_tokens_backward(grad_out, x, scores, out, index, ctx.fuse_remainder,
                                                   ctx.protect_first, scores_grad)
    return grad_x, (grad_scores if scores_grad else None), None, None, None


torch.library.register_autograd("flashkd::topk_tokens", _topk_backward, setup_context=_topk_setup)
