"""One (case, provider) measurement, done the same way on every device:

1. the accuracy call, forward+backward on the op's accuracy inputs (the case's
   own inputs when the float64 oracle can afford them, else a row subset of
   them), whose loss and gradients the runner compares with the oracle; it also
   warms the provider up;
2. for providers that compile per input shape, an untimed call at the timed shape;
   for those that prepare each input set (a peer's quantized weights), one per set;
3. one untimed forward+backward call whose peak extra memory is recorded, and
   its workspace: that peak minus the gradients it returns;
4. ``before_timing()``, where given (the CPU worker's change of allocator
   regime, see worker.py);
5. the median time of forward calls, then of forward+backward calls, rotating
   through enough input sets that they do not sit in the cache.

A provider whose result does not require grad (an inference-only op) is
measured forward only: no backward, ``fwd_bwd_*`` fields None, and the peak
memory taken on a forward call.
"""
from __future__ import annotations

import gc
import math

import torch

from .cases import Unsupported
from .memory import PeakMemory
from .ops import OPS
from .timing import Budget, time_calls

# Elements of [N, V] the float64 oracle evaluates: all of them on a GPU (which
# also checks large offsets), a row subset on a CPU, where the oracle of one
# acceptance-shape case takes about a minute.
ORACLE_ELEMENTS = {"cpu": 1 << 22, "cuda": None}
_MAX_INPUT_SETS = 16


def input_sets(case, device, cache_bytes):
    """Seeded input sets (set 0 is the accuracy set): as many as it takes for
    three times the cache, so timed calls read memory, not cache."""
    mod = OPS[case.op]
    count = min(_MAX_INPUT_SETS, max(1, math.ceil(3 * cache_bytes / mod.floor_bytes(case))))
    return [mod.make_inputs(case, device, seed) for seed in range(count)]


def accuracy_inputs(case, sets, device):
    limit = ORACLE_ELEMENTS[device.type]
    return sets[0] if limit is None else OPS[case.op].accuracy_inputs(sets[0], limit)


def failure_status(exc):
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"failed: {type(exc).__name__}: {first_line}"[:300]


def build(case, provider_name, device):
    """(fn, None), or (None, "skipped: why") when the provider cannot run here,
    or (None, "failed: why") when building it raised."""
    try:
        return OPS[case.op].PROVIDERS[provider_name].build(case, device), None
    except Unsupported as exc:
        return None, f"skipped: {exc}"
    except Exception as exc:  # noqa: BLE001  (a provider that cannot even be built is reported, not raised)
        return None, failure_status(exc)


def measure(case, provider_name, device, sets, budget=Budget(), before_timing=None):
    """Returns (record, outputs): outputs = (loss, {leaf name: gradient on the
    CPU}) of the accuracy call (the loss a float, or the output tensor on the
    CPU for ops with a grad_output), or None when the provider did not run."""
    fn, skipped = build(case, provider_name, device)
    if skipped:
        return {"status": skipped}, None
    try:
        return _measure(fn, OPS[case.op].PROVIDERS[provider_name], case, device, sets, budget, before_timing)
    except Exception as exc:  # noqa: BLE001  (a provider's failure is reported, not raised)
        status = failure_status(exc)
    # Outside the except block, so the traceback no longer pins the failed call's tensors.
    for inputs in sets:
        inputs.clear_grads()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"status": status}, None


def _measure(fn, provider, case, device, sets, budget, before_timing):
    acc = accuracy_inputs(case, sets, device)
    acc.clear_grads()
    loss = fn(acc.tensors)
    forward_only = not loss.requires_grad  # inference-only cases (e.g. a frozen quantized layer)
    if not forward_only:
        acc.backward(loss)
    value = float(loss.detach()) if loss.dim() == 0 else loss.detach().cpu()  # a loss, or an op's output
    outputs = (value, {name: g.detach().cpu() for name, g in acc.take_grads().items()})
    del loss
    if provider.per_shape_warmup and acc is not sets[0]:
        warm = fn(sets[0].tensors)
        if not forward_only:
            sets[0].backward(warm)
    if provider.per_input_warmup:
        for inputs in sets:
            fn(inputs.tensors)

    def setup(i):
        # Every set's gradients, not only call i's: one call's gradients live at a
        # time, as in a training step, and the allocator hands the next call the
        # memory the last one freed instead of growing to a gradient per set.
        for inputs in sets:
            inputs.clear_grads()

    def forward(i):
        return fn(sets[i % len(sets)].tensors)

    def forward_backward(i):
        inputs = sets[i % len(sets)]
        inputs.backward(fn(inputs.tensors))

    setup(0)
    with PeakMemory(device) as peak:
        (forward if forward_only else forward_backward)(0)
    if before_timing:
        before_timing()
    fwd = time_calls(forward, setup, device, budget)
    fwd_bwd = None if forward_only else time_calls(forward_backward, setup, device, budget)
    for inputs in sets:
        inputs.clear_grads()
    grad_bytes = sum(sets[0].tensors[name].nbytes for name in sets[0].grad_names)  # a grad matches its leaf
    record = {
        "status": "ok",
        **_timing_fields("fwd", fwd),
        **_timing_fields("fwd_bwd", fwd_bwd),
        "peak_mb": peak.extra_bytes / 2**20,
        "work_mb": max(0, peak.extra_bytes - grad_bytes) / 2**20,
        "accuracy_shape": "x".join(map(str, next(iter(acc.tensors.values())).shape)),
    }
    return record, outputs


def _timing_fields(prefix, timing):
    if timing is None:
        return {f"{prefix}_{key}": None for key in ("ms", "min_ms", "max_ms", "reps")}
    return {
        f"{prefix}_ms": timing.median_ms,
        f"{prefix}_min_ms": timing.min_ms,
        f"{prefix}_max_ms": timing.max_ms,
        f"{prefix}_reps": timing.reps,
    }
