"""CPU measurements each run in a fresh child process:
``python -m flashkd.bench.worker SPEC``.

A CPU's peak memory is the process's resident set, which an earlier case's
allocations, a compiler's caches or the allocator's state would blur; a fresh
process per (case, provider) measures the case alone. The child pins glibc's
mmap threshold (``CHILD_ENV``) until its memory probe is done: by default
glibc raises it as large blocks are freed, after which blocks up to 32 MiB (a
chunked op's per-chunk buffers) come from heaps it keeps resident and
fragments, so the resident set grew with each call, to several times the live
memory (measured: 99 -> 285 MiB for linear_ce at the acceptance shape).
Pinned, every block of 128 KiB or more is mapped and returned on free, and
the resident set follows live tensors, as ``torch.cuda.max_memory_allocated``
does on a GPU. The timed calls then run with the threshold at glibc's
ceiling (``memory.reuse_heap_blocks``), as in a training process: pinned,
every mid-size temporary would be mapped and page-faulted afresh by every
call (measured: oneDNN's int8 GEMM at 1024^3 took 4.1 ms instead of 1.3 ms,
faulting 5 MiB a call), charging providers for their allocations at a rate
no long-running process pays. SPEC is JSON (case,
provider, budget, cache_bytes, out); the child saves the accuracy outputs to
``out`` with torch.save and prints its record as the last line of stdout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

RESULT_PREFIX = "flashkd-bench-record "
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def measure_in_child(case, provider, budget, cache_bytes, workdir):
    """Parent side: (record, outputs) as ``measure.measure`` returns them."""
    out = Path(workdir) / f"{provider}.pt"
    out.unlink(missing_ok=True)
    spec = {"case": case.to_dict(), "provider": provider, "budget": asdict(budget),
            "cache_bytes": cache_bytes, "out": str(out)}
    proc = subprocess.run([sys.executable, "-m", "flashkd.bench.worker", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed: worker exited with {proc.returncode}: {tail}"[:300]}, None
    record = json.loads(lines[-1][len(RESULT_PREFIX):])
    outputs = torch.load(out, weights_only=True) if out.exists() else None
    out.unlink(missing_ok=True)
    return record, outputs


def main():
    from .cases import Case
    from .measure import input_sets, measure
    from .memory import reuse_heap_blocks
    from .timing import Budget

    spec = json.loads(sys.argv[1])
    case, device = Case(**spec["case"]), torch.device("cpu")
    sets = input_sets(case, device, spec["cache_bytes"])
    record, outputs = measure(case, spec["provider"], device, sets, Budget(**spec["budget"]),
                              before_timing=reuse_heap_blocks)
    if outputs is not None:
        torch.save(outputs, spec["out"])
    print(RESULT_PREFIX + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
