"""Loads the compiled library and registers fake kernels and autograd.

Every fused loss computes its gradient during forward (the loss is terminal),
so backward only multiplies the saved gradient by grad_output, in place.
"""
from __future__ import annotations

import functools

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


def check_same_device(first, tensors):
    """The device check of the C++ glue, in the fake kernels: a `meta` input
    beside real ones dispatches here, and the outputs made from the first input
    would be uninitialized memory on its device, returned as results."""
    device = tensors[first].device
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{name} must be on the device of {first} ({device}), got {t.device}")


def _check_distill_devices(student, teacher, labels, weights):
    check_same_device("student_logits", {"student_logits": student, "teacher_logits": teacher,
                                          "labels": labels, "weights": weights})


@torch.library.register_fake("flashkd::distill_loss")
def _distill_loss_fake(student, teacher, labels, weights, divergence, temperature, beta, alpha, taid_lambda,
                       ignore_index, hard_weight, soft_weight, t2_scaling, vocab_size, reduction, num_items,
                       return_stats):
    _check_distill_devices(student, teacher, labels, weights)
    lead = student.shape[:-1]
    loss = student.new_empty(_loss_shape(lead, reduction), dtype=torch.float32)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    return (loss, grad, *_stats_like(student, lead, return_stats))


@torch.library.register_fake("flashkd::distill_loss_")
@torch.library.register_fake("flashkd::distill_loss_value")
def _distill_loss_no_grad_output_fake(student, teacher, labels, weights, divergence, temperature, beta, alpha,
                                      taid_lambda, ignore_index, hard_weight, soft_weight, t2_scaling, vocab_size,
                                      reduction, num_items, return_stats):
    _check_distill_devices(student, teacher, labels, weights)
    lead = student.shape[:-1]
    loss = student.new_empty(_loss_shape(lead, reduction), dtype=torch.float32)
    return (loss, *_stats_like(student, lead, return_stats))


@torch.library.register_fake("flashkd::scale_rows_")
def _scale_rows_fake(grad, factor):
    return None


@torch.library.register_fake("flashkd::soft_cap")
def _soft_cap_fake(z, cap):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


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
    # The kernel writes through the data pointer; mark the mutation so that a
    # second backward through a retained graph fails loudly instead of scaling twice.
    torch.autograd.graph.increment_version(grad)
    return grad


class _NoSecondDerivative(torch.autograd.Function):
    """Stands behind the gradients a fused backward returns under
    create_graph=True, so that differentiating them again raises instead of
    silently leaving out this op's second-order terms."""

    @staticmethod
    def forward(ctx, op_name, count, *grads_then_anchors):
        ctx.op_name = op_name
        # detach(), not a view: a view made in a custom Function may not be modified in place later
        return tuple(g.detach() for g in grads_then_anchors[:count])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"flashkd.{ctx.op_name} is differentiable once: its backward is a fused kernel without a derivative "
            "of its own. Gradients taken with create_graph=True are correct, but they cannot be differentiated "
            "again through this op (double backward, Hessian-vector products).")


def first_order_only(op_name: str):
    """Decorates a backward(ctx, *grad_outputs). With grad mode off (every
    plain backward, and the backward torch.compile traces) it runs as is; under
    create_graph=True it runs without recording, and its tensor outputs come
    back behind a _NoSecondDerivative node. That node hangs on the grad_outputs
    and saved tensors that require grad, the paths a true second derivative
    would take, so that torch.autograd.grad(..., inputs=x) reaches it too."""

    def decorate(backward):
        @functools.wraps(backward)
        def run(ctx, *grad_outputs):
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return backward(ctx, *grad_outputs)
            anchors = [t for t in (*grad_outputs, *ctx.saved_tensors)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            with torch.no_grad():
                grads = list(backward(ctx, *grad_outputs))
            where = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            if not where or any(type(grads[i]) is not torch.Tensor for i in where):  # traced: fakes, wrappers
                return tuple(grads)
            anchors = anchors or [torch.empty(0, requires_grad=True)]  # so that the outputs require grad
            wrapped = _NoSecondDerivative.apply(op_name, len(where), *(grads[i] for i in where), *anchors)
            for i, g in zip(where, wrapped):
                grads[i] = g
            return tuple(grads)

        return run

    return decorate


def _distill_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled [N, V] gradient for the unused grad output
    ctx.save_for_backward(output[1])


@first_order_only("distill_loss")
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


def cpu_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which flashkd runs CPU GEMMs on `dtype` operands (the linear
    losses' heads; QuantLinear's w4a16 product and straight-through backward):
    float32 for bfloat16 / float16 where ATen has no oneDNN GEMM for them (its
    fallback loop is 7-250x slower than float32), else `dtype`.
    ``torch.ops.flashkd.cpu_16bit_gemm("auto" | "float32" | "native")`` or
    FLASHKD_CPU_16BIT_GEMM chooses."""
    return torch.float32 if ops.cpu_16bit_gemm_in_float32(dtype) else dtype


# --- fused linear losses (cut cross-entropy, linear distillation) -------------

GRAD_HIDDEN, GRAD_WEIGHT, GRAD_BIAS = 1, 2, 4
LINEAR_LOSS_ARGS = (
    "hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias", "teacher_logits", "labels",
    "weights", "divergence", "temperature", "beta", "alpha", "taid_lambda", "ignore_index", "hard_weight",
    "soft_weight", "t2_scaling", "vocab_size", "label_smoothing", "z_loss", "softcap", "reduction", "num_items",
    "return_stats", "return_lse", "grad_mask", "row_scale", "chunk_budget_bytes", "float32_weight_grad",
)


def linear_loss_namer(teacher_hidden, teacher_weight, teacher_logits):
    """name(arg): the name the caller wrote for the linear_loss op's argument
    `arg`, for error messages. With a teacher the op is linear_distill_loss,
    whose student arguments are student_hidden, student_weight and
    student_bias; without one it is linear_cross_entropy, whose labels are
    called targets. The C++ glue (csrc/ops/linear_loss.cpp) follows the same rule."""
    has_teacher = any(t is not None for t in (teacher_hidden, teacher_weight, teacher_logits))

    def name(arg):
        if has_teacher and arg in ("hidden", "weight", "bias"):
            return "student_" + arg
        return "targets" if arg == "labels" and not has_teacher else arg

    return name


@torch.library.register_fake("flashkd::linear_loss")
def _linear_loss_fake(*args):
    a = dict(zip(LINEAR_LOSS_ARGS, args))
    name = linear_loss_namer(a["teacher_hidden"], a["teacher_weight"], a["teacher_logits"])
    check_same_device(name("hidden"), {name(k): t for k, t in a.items()})
    hidden, weight, bias, mask = a["hidden"], a["weight"], a["bias"], a["grad_mask"]
    lead = hidden.shape[:-1]
    empty = lambda: hidden.new_empty((0,))  # one per absent gradient: outputs never alias
    loss = hidden.new_empty(_loss_shape(lead, a["reduction"]), dtype=torch.float32)
    dhidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if mask & GRAD_HIDDEN else empty()
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if mask & GRAD_WEIGHT else empty()
    dbias = torch.empty_like(bias) if (mask & GRAD_BIAS and bias is not None) else empty()
    lse = hidden.new_empty(tuple(lead) if a["return_lse"] else (0,), dtype=torch.float32)
    return (loss, dhidden, dweight, dbias, lse, *_stats_like(hidden, lead, a["return_stats"]))


def _linear_setup_context(ctx, inputs, output):
    a = dict(zip(LINEAR_LOSS_ARGS, inputs))
    ctx.set_materialize_grads(False)  # unused outputs get no zero-filled gradients
    ctx.options = {k: v for k, v in a.items() if not isinstance(v, torch.Tensor)}
    ctx.tensor_names = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    _loss, dhidden, dweight, dbias, lse, _stats, _agree = output
    # The inputs are kept only where backward recomputes: reduction="none"
    # (whose forward computes no gradients) and a differentiable LSE output.
    keep_inputs = a["reduction"] == "none" or a["return_lse"]
    saved = [a[k] for k in ctx.tensor_names] if keep_inputs else []
    ctx.save_for_backward(dhidden, dweight, dbias, lse, *saved)


def _float32_scaled(grad, grad_output):
    """grad * grad_output in float32: a float32 gradient saved by forward is scaled in
    place (no second weight-sized tensor), a 16-bit one converted."""
    if grad.dtype == torch.float32 and grad.numel():
        return scale_saved_grad(grad, grad_output)
    return grad.float() * grad_output


@first_order_only("linear_cross_entropy / linear_distill_loss")
def _linear_backward(ctx, grad_loss, _gdh, _gdw, _gdb, grad_lse, _gstats, _gagree):
    dhidden, dweight, dbias, lse, *saved = ctx.saved_tensors
    inputs = dict(zip(ctx.tensor_names, saved))
    mask = (GRAD_HIDDEN if ctx.needs_input_grad[0] else 0) | (GRAD_WEIGHT if ctx.needs_input_grad[1] else 0) \
        | (GRAD_BIAS if ctx.needs_input_grad[2] else 0)
    grads = {"hidden": None, "weight": None, "bias": None}
    with_lse = grad_lse is not None and ctx.options["return_lse"]
    if grad_loss is not None:
        if ctx.options["reduction"] == "none":
            a = dict(ctx.options, **inputs)
            a.update(reduction="sum", return_stats=False, return_lse=False, row_scale=grad_loss, num_items=None,
                     grad_mask=mask)
            _, dh, dw, db, *_ = ops.linear_loss(*(a.get(k) for k in LINEAR_LOSS_ARGS))
        elif with_lse:  # scaled in float32: the LSE's gradient is added before the one rounding
            dh, dw, db = (_float32_scaled(g, grad_loss) for g in (dhidden, dweight, dbias))
        else:  # gradients were made in forward: scale them by grad_output
            dh, dw, db = (scale_saved_grad(g, grad_loss) if g.numel() else g for g in (dhidden, dweight, dbias))
        grads.update(hidden=dh if mask & GRAD_HIDDEN else None, weight=dw if mask & GRAD_WEIGHT else None,
                     bias=db if mask & GRAD_BIAS else None)
    if with_lse:
        from .linear import lse_backward

        grads = lse_backward(inputs["hidden"], inputs["weight"], inputs.get("bias"), lse, grad_lse,
                             ctx.options["softcap"], ctx.options["chunk_budget_bytes"], mask, grads)
    return (grads["hidden"], grads["weight"], grads["bias"]) + (None,) * (len(LINEAR_LOSS_ARGS) - 3)


torch.library.register_autograd("flashkd::linear_loss", _linear_backward, setup_context=_linear_setup_context)
