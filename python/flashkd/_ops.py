"""Loads the compiled library and registers fake kernels and autograd.

Every fused loss computes its gradient during forward (the loss is terminal),
so backward only multiplies the saved gradient by grad_output, in place.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing registers torch.ops.flashkd.*)

ops = torch.ops.flashkd

NUM_STATS = 5  # divergence, student/teacher entropy, student/teacher label log-prob


def _loss_shape(lead, reduction):
    return tuple(lead) if reduction == "none" else ()


def _stats_like(student, lead, return_stats):
    stats = student.new_empty((*lead, NUM_STATS) if return_stats else (0, NUM_STATS), dtype=torch.float32)
    agree = student.new_empty(tuple(lead) if return_stats else (0,), dtype=torch.bool)
    return stats, agree


@torch.library.register_fake("flashkd::distill_loss")
def _distill_loss_fake(student, teacher, labels, weights, divergence, temperature, beta, alpha, taid_lambda,
                       ignore_index, hard_weight, soft_weight, t2_scaling, vocab_size, reduction, num_items,
                       return_stats):
    lead = student.shape[:-1]
    loss = student.new_empty(_loss_shape(lead, reduction), dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return (loss, grad, *_stats_like(student, lead, return_stats))


@torch.library.register_fake("flashkd::distill_loss_")
def _distill_loss_inplace_fake(student, teacher, labels, weights, divergence, temperature, beta, alpha,
                               taid_lambda, ignore_index, hard_weight, soft_weight, t2_scaling, vocab_size,
                               reduction, num_items, return_stats):
    lead = student.shape[:-1]
    loss = student.new_empty(_loss_shape(lead, reduction), dtype=torch.float32)
    return (loss, *_stats_like(student, lead, return_stats))


@torch.library.register_fake("flashkd::scale_rows_")
def _scale_rows_fake(grad, factor):
    return None


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad * grad_output, broadcasting a per-token grad_output over the vocabulary.

    Eager mode scales the saved buffer in place (a no-op on the device when
    grad_output is 1). When traced (torch.compile, AOTAutograd, opcheck) the
    tensors are fakes or functional wrappers and a mutation of a forward output
    inside backward would break graph partitioning, so the product is left to
    the compiler there.
    A second backward through the same graph fails torch's saved-tensor
    version check instead of scaling twice.
    """
    if grad_output.dim() > 0:
        grad_output = grad_output.reshape(grad.shape[:-1])
    traced = torch.compiler.is_compiling() or type(grad) is not torch.Tensor or type(grad_output) is not torch.Tensor
    if traced:
        factor = grad_output.unsqueeze(-1) if grad_output.dim() > 0 else grad_output
        return grad * factor.to(grad.dtype)
    ops.scale_rows_(grad, grad_output)
    return grad


def _distill_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _distill_backward(ctx, grad_loss, _grad_grad, _grad_stats, _grad_agree):
    (grad,) = ctx.saved_tensors
    dstudent = None if grad_loss is None else scale_saved_grad(grad, grad_loss)
    return (dstudent,) + (None,) * 16


torch.library.register_autograd("flashkd::distill_loss", _distill_backward, setup_context=_distill_setup_context)


def has_cuda_kernels() -> bool:
    """Whether this build of flashkd contains its CUDA kernels."""
    return bool(ops.has_cuda_kernels())


def cpu_isa(force: str = "", reset: bool = False) -> str:
    """The CPU instruction set in use ("avx512", "avx2" or "generic"); `force` switches it."""
    return ops.cpu_isa(force, reset)
