"""Median time of repeated calls.

CUDA: a few untimed warm-up calls, then CUDA events around each call and one
synchronize at the end; the number of calls adapts to their cost. The timed
calls are queued behind a GPU sleep about as long as queueing them takes, so
that their kernels run back to back: otherwise a call of a few microseconds
(a one-token GEMV) would be timed at Python's launch rate, its kernels
waiting on the CPU between the events. CPU: the wall
clock around each call, repeated until a time budget is spent (at least once:
some eager baselines take tens of seconds per call); the caller warms up.
A ``Budget`` says how many calls: a fixed count, or the CPU's time budget.

``setup(i)`` runs untimed before call i (dropping the last gradient, say, whose
freeing is not the call's work), and a call's result is dropped after its clock
stops, for the same reason.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

CPU_BUDGET_S = 3.0
CPU_MAX_REPS = 20
CUDA_WARMUP = 3
CUDA_BUDGET_S = 0.3
CUDA_MIN_REPS, CUDA_MAX_REPS = 10, 100
CUDA_MAX_SLEEP_MS = 20.0  # 100 calls queued at 130 us each; a call that syncs pays it per measurement


@dataclass(frozen=True)
class Budget:
    """Timed calls per measurement: ``reps`` fixes their number; otherwise a CPU
    times calls until ``cpu_seconds`` are spent (at most CPU_MAX_REPS) and a
    GPU adapts the count to the call's cost."""
    reps: Optional[int] = None
    cpu_seconds: float = CPU_BUDGET_S


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int

    @classmethod
    def of(cls, times_ms):
        return cls(statistics.median(times_ms), min(times_ms), max(times_ms), len(times_ms))


def time_calls(fn, setup, device, budget=Budget()):
    """Time ``fn(i)`` for i = 0, 1, ... as ``budget`` says."""
    if device.type == "cuda":
        return _time_cuda(fn, setup, budget.reps)
    return _time_cpu(fn, setup, budget.reps, budget.cpu_seconds)


def _time_cpu(fn, setup, reps, seconds):
    times = []
    start = time.perf_counter()
    i = 0
    while True:
        setup(i)
        t0 = time.perf_counter()
        out = fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
        del out  # freed after the clock stopped: freeing the result is not timed
        i += 1
        done = i >= reps if reps else (i >= CPU_MAX_REPS or time.perf_counter() - start >= seconds)
        if done:
            return Timing.of(times)


def _time_cuda(fn, setup, reps):
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    start = time.perf_counter()
    for i in range(CUDA_WARMUP):
        setup(i)
        fn(i)
    queue_ms = (time.perf_counter() - start) * 1e3 / CUDA_WARMUP  # the CPU's time to queue a call
    end.record()
    torch.cuda.synchronize()
    if not reps:
        per_call_ms = begin.elapsed_time(end) / CUDA_WARMUP
        reps = int(min(CUDA_MAX_REPS, max(CUDA_MIN_REPS, CUDA_BUDGET_S * 1e3 / max(per_call_ms, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    _keep_gpu_busy(min(CUDA_MAX_SLEEP_MS, 1.5 * reps * queue_ms))
    for i, (b, e) in enumerate(events):
        setup(i)
        b.record()
        out = fn(i)
        e.record()
        del out  # freed after the end event: the free is not timed
    torch.cuda.synchronize()
    return Timing.of([b.elapsed_time(e) for b, e in events])


_sleep_cycles_per_ms = None


def _keep_gpu_busy(ms):
    """Queues a GPU spin of about ``ms`` (torch.cuda._sleep counts clock
    cycles: their rate is measured once)."""
    global _sleep_cycles_per_ms
    if _sleep_cycles_per_ms is None:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.cuda._sleep(1_000_000)
        end.record()
        end.synchronize()
        _sleep_cycles_per_ms = 1e6 / max(begin.elapsed_time(end), 1e-3)
    torch.cuda._sleep(int(ms * _sleep_cycles_per_ms))
