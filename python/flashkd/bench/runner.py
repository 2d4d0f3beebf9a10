"""Walks cases and providers, then adds to each record what needs several
providers: the float64 oracle's errors (one oracle pass per case), the
physical floor (for ops with a FLOOR_PROVIDER, that provider's time where it
exceeds the bytes' floor), the speedups against torch eager and torch.compile
and the memory ratios to torch eager.

On a CPU each measurement runs in a fresh child process (see ``worker``); on a
GPU they run here, sharing one case's input sets.
"""
from __future__ import annotations

import gc
import tempfile

import torch

from .measure import accuracy_inputs, build, failure_status, input_sets, measure
from .ops import OPS
from .timing import Budget
from .worker import measure_in_child

EAGER, COMPILED = "torch", "torch.compile"


def compared_ms(rec):
    """The time ratios compare: forward+backward, or forward for a forward-only provider."""
    return rec["fwd_bwd_ms"] if rec.get("fwd_bwd_ms") is not None else rec["fwd_ms"]


def run(cases, providers, device, bandwidth, cache_bytes, progress, budget=Budget(), skip=None):
    """Yields each case's records as soon as the case is done. ``skip`` maps
    providers ("torch.compile") and op:provider pairs not to run to the reason
    shown in their place."""
    skip = skip or {}
    measured = {}  # same_call key -> (record, outputs) of the case that measured it
    with tempfile.TemporaryDirectory(prefix="flashkd-bench-") as workdir:
        for case in cases:
            names = [p for p in providers if p in OPS[case.op].PROVIDERS]
            results = {}
            try:
                sets, inputs_failed = None if device.type == "cpu" else input_sets(case, device, cache_bytes), None
            except Exception as exc:  # noqa: BLE001  (e.g. out of memory: the case fails, the run goes on)
                sets, inputs_failed = None, failure_status(exc)
            if inputs_failed:  # (out of the except block: its traceback no longer pins the tensors)
                progress.note(f"{case.label}: inputs: {inputs_failed}")
                _release(device)
                yield [{**case.to_dict(), "provider": name, "status": inputs_failed} for name in names]
                continue
            for name in names:
                progress.step(f"{case.label} {name}")
                same_call = OPS[case.op].PROVIDERS[name].same_call
                key = same_call and (case.op, name, same_call(case, device))
                if key in measured:
                    results[name] = measured[key]
                    continue
                results[name] = _measure_one(case, name, device, sets, cache_bytes, budget, workdir, skip)
                if key:
                    rec, outputs = results[name]
                    measured[key] = ({**rec, "same_as": case.label}, outputs)
                status = results[name][0]["status"]
                if status != "ok":
                    progress.note(f"{case.label} {name}: {status}")
            records = _records(case, results, device, bandwidth, sets)
            oracle_failed = next((r["accuracy"] for r in records if "accuracy" in r), None)
            if oracle_failed:
                progress.note(f"{case.label}: oracle check {oracle_failed}")
            del sets
            _release(device)
            yield records


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_one(case, name, device, sets, cache_bytes, budget, workdir, skip):
    reason = skip.get(name) or skip.get(f"{case.op}:{name}")
    if reason:
        return {"status": f"skipped: {reason}"}, None
    if sets is not None:
        return measure(case, name, device, sets, budget)
    _, skipped = build(case, name, device)  # a provider that cannot run here needs no child
    if skipped:
        return {"status": skipped}, None
    return measure_in_child(case, name, budget, cache_bytes, workdir)


def _records(case, results, device, bandwidth, sets):
    mod = OPS[case.op]
    outputs = {name: out for name, (_, out) in results.items() if out is not None}
    errors = {}
    if outputs:
        try:
            sets = sets or [mod.make_inputs(case, device, seed=0)]
            errors = mod.errors(case, accuracy_inputs(case, sets, device), outputs)
        except Exception as exc:  # noqa: BLE001  (the timings stand; the error columns stay empty, and say why)
            errors = {name: {"accuracy": failure_status(exc)} for name in results}
    ok = {name: rec for name, (rec, _) in results.items() if rec["status"] == "ok"}
    floor_ms = mod.floor_bytes(case) / bandwidth * 1e3
    floor_provider = getattr(mod, "FLOOR_PROVIDER", None)
    if floor_provider in ok:
        floor_ms = max(floor_ms, compared_ms(ok[floor_provider]))
    records = []
    for name, (rec, _) in results.items():
        record = {**case.to_dict(), "provider": name, **rec, **errors.get(name, {}), "floor_ms": floor_ms}
        if name in ok:
            record["x_floor"] = compared_ms(rec) / floor_ms
            for key, base in (("x_torch", EAGER), ("x_compile", COMPILED)):
                if base in ok:
                    record[key] = compared_ms(ok[base]) / compared_ms(rec)
            for key in ("peak", "work"):
                if EAGER in ok and ok[EAGER][f"{key}_mb"] > 0:
                    record[f"{key}_vs_torch"] = rec[f"{key}_mb"] / ok[EAGER][f"{key}_mb"]
        records.append(record)
    return records
