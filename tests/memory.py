"""Measure the memory a piece of code allocates, for the workspace tests.

``measure(fn, device)`` runs ``fn()`` once and returns a :class:`Measurement`
with

- ``peak``: the largest number of bytes that were allocated during the call and
  not yet freed, at any instant (so tensors that existed before the call do not
  count, and neither does the caller's own data);
- ``net``: the bytes allocated during the call that are still alive when it
  returns (the outputs it handed back, the gradients it accumulated into
  ``.grad``, whatever it kept);
- ``result``: what ``fn`` returned.

The "workspace" of a call is then ``peak - bytes_of(what it returned)``: the
extra memory it needed beyond its results.

CPU: there is no allocator statistics API for CPU tensors, so the peak is
reconstructed from the allocation events of ``torch.profiler`` with
``profile_memory=True``. Every allocation and free through c10's CPU allocator
is one ``[memory]`` event with a signed byte count; summing them in time order
gives the bytes alive at each instant, and the maximum of that running sum is
the peak. The events are read from the profiler's kineto result (all of them,
including those nested inside operators, which ``prof.events()`` folds into
the operators' self-memory columns). Limits, all of which make the measure
conservative or are outside what a workspace bound is about:

- frees of blocks allocated before profiling started are not reported, so the
  running sum never goes down for them (the peak can only be over-estimated);
- memory that BLAS/oneDNN allocate with their own malloc (packing buffers) is
  invisible, as it is to ``torch.cuda.max_memory_allocated`` on the GPU;
- only threads the profiler observes are seen; flashkd allocates on the calling
  thread (the OpenMP workers only run row kernels that write into buffers
  allocated beforehand), and CPU autograd runs on the calling thread.

``self_test()`` checks the reconstruction on known allocations.

CUDA: ``torch.cuda.max_memory_allocated`` around the call, relative to
``torch.cuda.memory_allocated`` before it (after a synchronize and a reset of
the peak statistics).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable

import torch


@dataclasses.dataclass
class Measurement:
    result: Any
    peak: int
    net: int


def _memory_events(prof) -> list:
    results = prof.profiler.kineto_results
    if results is None:  # pragma: no cover - profiler without kineto results
        raise RuntimeError("torch.profiler produced no kineto results; cannot reconstruct CPU memory")
    return [e for e in results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]


def measure_cpu(fn: Callable[[], Any]) -> Measurement:
    """Peak and net bytes allocated on the CPU by ``fn()`` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    events = sorted(_memory_events(prof), key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return Measurement(result=result, peak=peak, net=current)


def measure_cuda(fn: Callable[[], Any], device=None) -> Measurement:
    """Peak and net bytes allocated on the GPU by ``fn()`` (caching allocator statistics)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    net = torch.cuda.memory_allocated(device) - base
    return Measurement(result=result, peak=peak, net=net)


def measure(fn: Callable[[], Any], device) -> Measurement:
    """:func:`measure_cpu` or :func:`measure_cuda`, by ``device`` ("cpu", "cuda", torch.device)."""
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu(fn)
    if device.type == "cuda":
        return measure_cuda(fn, device)
    raise ValueError(f"cannot measure memory on {device}")


def nbytes(tensors: Iterable) -> int:
    """Total bytes of the storage of the given tensors (None entries are skipped)."""
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


def self_test() -> None:
    """The CPU reconstruction finds a known transient peak and a known survivor."""
    a_bytes, b_bytes = 3 << 20, 1 << 20

    def fn():
        a = torch.empty(a_bytes // 4, dtype=torch.float32)
        a.fill_(1.0)
        b = torch.empty(b_bytes, dtype=torch.uint8)
        del a
        return b

    m = measure_cpu(fn)
    assert m.peak >= a_bytes + b_bytes, m
    assert m.peak <= a_bytes + b_bytes + (64 << 10), m
    assert b_bytes <= m.net <= b_bytes + (64 << 10), m


def glue_allowance(n_tokens):
    """Bytes a linear loss's glue may allocate besides its logits chunks and the
    gradients it returns: per-token vectors (int64 labels copy, float32 loss,
    weights and LSE, the label check's masks: under 64 bytes a token), a few
    scalars, and allocator rounding."""
    return 64 * n_tokens + (64 << 10)
