"""What a benchmark case, its inputs and a provider are.

A case is plain data (op, variant, shape, dtype) so that a fresh child process
can rebuild exactly the same inputs from its JSON form and a seed; the op
modules in ``flashkd.bench.ops`` give it meaning.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    op: str
    variant: str
    shape: str  # op-specific, e.g. "4096x32000"
    dtype: str  # a key of DTYPES

    @property
    def label(self) -> str:
        return f"{self.op}:{self.variant} {self.shape}:{self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


class Unsupported(Exception):
    """A provider cannot run this case here (package missing, wrong device); the
    message says why and is shown in place of the numbers."""


def import_peer(package, module, *names):
    """``names`` from a peer library's ``module``; Unsupported, naming the
    ``package`` and the reason, when it is missing or fails to import (a
    Triton/torch mismatch raises at import, not only ImportError)."""
    try:
        mod = importlib.import_module(module)
        return tuple(getattr(mod, n) for n in names)
    except Exception as exc:
        raise Unsupported(f"{package} not importable ({type(exc).__name__}: {exc})") from None


def under_kernel_choice(fn, select, name):
    """``fn`` run with a process-wide flashkd kernel choice forced to ``name``
    (``select(name)``, then ``select("", True)`` back to automatic)."""
    def run(inputs):
        select(name)
        try:
            return fn(inputs)
        finally:
            select("", True)
    return run


@dataclass(frozen=True)
class Provider:
    """How to build a provider's loss function for a case.

    ``build(case, device)`` returns ``fn(tensors) -> scalar loss`` (or, for
    ops whose inputs carry a ``grad_output``, an output tensor) or raises
    Unsupported. ``per_shape_warmup`` marks providers that compile for each
    input shape (torch.compile, Triton kernels): when the accuracy call ran on
    a smaller input they get an untimed call at the timed shape, while for the
    others the accuracy call is warm-up enough. ``per_input_warmup`` marks
    providers that prepare something for each input set on its first call (a
    peer's quantized copy of the weights): every set gets one untimed call.
    ``same_call(case, device)``, where given, is a key shared by cases on which
    the provider makes the very same call (quant's float baseline ignores the
    scheme): a run measures the first such case and reuses its record.
    """

    build: Callable
    per_shape_warmup: bool = False
    per_input_warmup: bool = False
    same_call: Optional[Callable[["Case", torch.device], Hashable]] = None


class Inputs:
    """A case's tensors, the names of the leaves whose gradients are checked,
    and, for ops whose output is not a scalar loss, the gradient that seeds
    the backward pass (``grad_output``, shaped like the output)."""

    def __init__(self, tensors: Dict[str, torch.Tensor], grad_names: Tuple[str, ...],
                 grad_output: Optional[torch.Tensor] = None):
        self.tensors = tensors
        self.grad_names = grad_names
        self.grad_output = grad_output

    def backward(self, output: torch.Tensor) -> None:
        """Backward from a provider's output: a scalar loss, or a tensor seeded with grad_output."""
        output.backward(self.grad_output)

    def clear_grads(self) -> None:
        for name in self.grad_names:
            self.tensors[name].grad = None

    def take_grads(self) -> Dict[str, torch.Tensor]:
        """The gradients of the last backward; the leaves no longer hold them."""
        grads = {name: self.tensors[name].grad for name in self.grad_names}
        self.clear_grads()
        return grads

