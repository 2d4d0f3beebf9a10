"""Which cases a run measures: ``--ops`` and ``--shapes`` resolved against the
op modules' variants and named shape sets, with per-device defaults."""
from __future__ import annotations

from typing import Dict, List

from .cases import Case
from .ops import OPS


def parse_ops(spec: str | None, device_type: str) -> Dict[str, List[str]]:
    """``"distill_loss"`` or ``"distill_loss:fkl,distill_loss:jsd"`` -> {op: variants}.
    Without a spec, each op's default variants for the device."""
    if not spec:
        return {name: list(mod.DEFAULT_VARIANTS[device_type]) for name, mod in OPS.items()
                if mod.DEFAULT_VARIANTS[device_type]}
    chosen: Dict[str, List[str]] = {}
    for item in spec.split(","):
        name, _, variant = item.strip().partition(":")
        if name not in OPS:
            raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS)}")
        variants = OPS[name].VARIANTS if not variant else (variant,)
        for v in variants:
            if v not in OPS[name].VARIANTS:
                raise ValueError(f"unknown variant {v!r} of {name}; known: {', '.join(OPS[name].VARIANTS)}")
            chosen.setdefault(name, [])
            if v not in chosen[name]:
                chosen[name].append(v)
    return chosen


def _shape_specs(mod, spec: str | None, device_type: str) -> List[str]:
    items = [s.strip() for s in (spec or mod.DEFAULT_SHAPES[device_type]).split(",")]
    specs: List[str] = []
    for item in items:
        specs.extend(mod.SHAPE_SETS.get(item, (item,)))
    return specs


def select_cases(ops_spec: str | None, shapes_spec: str | None, device_type: str) -> List[Case]:
    """Cases in run order: op, then shape, then variant.

    Ops write shapes differently (NxV, NxDxV, ...): a literal shape goes to
    the selected ops that read its form; one that none of them reads is an
    error."""
    cases, taken, rejected = [], set(), {}
    for name, variants in parse_ops(ops_spec, device_type).items():
        mod = OPS[name]
        for spec in _shape_specs(mod, shapes_spec, device_type):
            try:
                shape, dtype = mod.parse_shape(spec)
            except ValueError as exc:
                rejected.setdefault(spec, []).append(str(exc))
                continue
            taken.add(spec)
            cases.extend(Case(name, v, shape, dtype) for v in variants)
    unread = [message for spec, messages in rejected.items() if spec not in taken for message in messages]
    if unread:
        hint = "" if ops_spec else " (an op a bare run leaves out needs --ops)"
        raise ValueError("; ".join(unread) + hint)
    return cases
